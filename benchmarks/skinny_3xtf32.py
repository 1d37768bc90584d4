"""Experiment for fp32 "highest" GEMMs with a small batch (the RNN cell: M = 256 rows, K and N
large): 3xTF32 computed as out^T = W x^T, so the big operand W is the MMA's A operand, split
into TF32 head and remainder in registers (A may come from registers), while the small x is
split once per call (32 MB) and both halves come in by TMA as B operands from shared memory.
Each K step's three MMAs start from zero and are added to the sum in fp32. Not used by the
package.

    python benchmarks/skinny_3xtf32.py
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from bench import bench
from fusion_backend.triton_lib import tanh
from patterns._common import descriptor
from presplit_3xtf32 import _tf32_head, split


@triton.jit
def _skinny_kernel(w_desc, xhi_desc, xlo_desc, b_ptr, out_ptr, M, N, K, stride_om, stride_on,
                   TANH: tl.constexpr, NUM_STAGES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k in tl.range(0, tl.cdiv(K, BLOCK_K), num_stages=NUM_STAGES):
        w = w_desc.load([pid_n * BLOCK_N, k * BLOCK_K])
        x_hi = xhi_desc.load([pid_m * BLOCK_M, k * BLOCK_K]).T
        x_lo = xlo_desc.load([pid_m * BLOCK_M, k * BLOCK_K]).T
        w_hi = _tf32_head(w)
        w_lo = w - w_hi
        t = tl.dot(w_lo, x_hi, input_precision="tf32")
        t = tl.dot(w_hi, x_lo, t, input_precision="tf32")
        acc += tl.dot(w_hi, x_hi, t, input_precision="tf32")
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = offs_n < N
    acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0)[:, None]
    if TANH:
        acc = tanh(acc)
    tl.store(out_ptr + offs_m[None, :] * stride_om + offs_n[:, None] * stride_on, acc,
             mask=n_ok[:, None] & (offs_m[None, :] < M))


def skinny(w, x_hi, x_lo, b, out, config, act):
    M, K = x_hi.shape
    N = w.shape[0]
    BN, BM, BK = config["BLOCK_N"], config["BLOCK_M"], config["BLOCK_K"]
    _skinny_kernel[(triton.cdiv(N, BN), triton.cdiv(M, BM))](
        descriptor(w, BN, BK), descriptor(x_hi, BM, BK), descriptor(x_lo, BM, BK), b, out, M, N, K,
        out.stride(0), out.stride(1), TANH=act, NUM_STAGES=config["num_stages"], BLOCK_N=BN, BLOCK_M=BM,
        BLOCK_K=BK, num_warps=config["num_warps"], num_stages=config["num_stages"])
    return out


def main():
    torch.manual_seed(0)
    torch.set_float32_matmul_precision("highest")
    rows = []
    for name, (M, K, N, act) in {"i2h 256x32768->16384 +tanh": (256, 32768, 16384, True),
                                 "h2o 256x16384->8192": (256, 16384, 8192, False)}.items():
        x = torch.randn(M, K, device="cuda")
        w = torch.randn(N, K, device="cuda") / K ** 0.5
        b = torch.randn(N, device="cuda")
        y = F.linear(x.double(), w.double(), b.double())
        ref = torch.tanh(y) if act else y

        def err(out):
            return ((out.double() - ref).norm() / ref.norm()).item()

        eager = (lambda: torch.tanh(F.linear(x, w, b))) if act else (lambda: F.linear(x, w, b))
        rows.append((name, "eager fp32 (cuBLAS)", bench(eager), err(eager())))
        x_hi, x_lo = torch.empty_like(x), torch.empty_like(x)
        rows.append((name, "split pass over x", bench(lambda: split(x, x_hi, x_lo)), float("nan")))
        split(x, x_hi, x_lo)
        out = torch.empty(M, N, device="cuda")
        for bn, bm, bk, warps, stages in ((64, 256, 32, 8, 3), (64, 256, 32, 8, 4), (128, 128, 32, 8, 3),
                                          (64, 256, 64, 8, 2), (128, 256, 32, 8, 2), (64, 128, 32, 4, 4)):
            config = dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, num_warps=warps, num_stages=stages)
            vname = f"W x^T, x pre-split, {bn}x{bm}x{bk} w{warps} s{stages}"
            try:
                out.fill_(float("nan"))
                skinny(w, x_hi, x_lo, b, out, config, act)
                e = err(out)
                ms = bench(lambda: skinny(w, x_hi, x_lo, b, out, config, act))
            except Exception as exc:  # noqa: BLE001 - a variant that does not compile is reported
                print(name, vname, "failed:", type(exc).__name__, str(exc)[:200], flush=True)
                continue
            print(f"{name} {vname}: {ms:.3f} ms err {e:.2e}", flush=True)
            rows.append((name, vname, ms, e))
    print(f"\nfp32 'highest', {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print("| GEMM | variant | ms | rel err |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.2e} |")


if __name__ == "__main__":
    main()
