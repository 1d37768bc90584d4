"""TF32 operand rounding in the pointer GEMM main loop (experiment): Triton's
`tl.dot(..., input_precision="tf32")` lets the tensor cores truncate the fp32 operands to TF32,
cuBLAS rounds them; a fused site at fp32 "high" shows about 3x eager's error. Rounding each loaded
tile with `cvt.rna.tf32.f32` (`triton_lib.tf32_round`) before the dot should match cuBLAS's error;
this measures what it costs. The kernel is the eval kernel's main loop with a plain store.

    python benchmarks/tf32_rounding.py [--rounds 3]     # on the GPU machine, PYTHONPATH=$PWD

Per shape and tile: median do_bench ms and rel. error vs fp64, truncating vs rounding, next to
cuBLAS TF32 (F.linear) in the same interleaved rounds.
"""
import argparse
import statistics

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fusion_backend.triton_lib import tf32_round, tile_ids


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
                 ROUND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr):
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + (offs_m % M)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + (offs_n % N)[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, K // BLOCK_K):  # K % BLOCK_K == 0 for the shapes below
        a = tl.load(a_ptrs)
        w = tl.load(w_ptrs)
        if ROUND == 1 or ROUND == 2:  # 1: both operands, 2: x only, 3: W only
            a = tf32_round(a, True)
        if ROUND == 1 or ROUND == 3:
            w = tf32_round(w, True)
        acc = tl.dot(a, w, acc, input_precision="tf32")
        a_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, acc, mask=mask)


def gemm(x, w, out, rnd, bm, bn, bk, warps, stages):
    M, K = x.shape
    N = w.shape[0]
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _gemm_kernel[grid](x, w, out, M, N, K, x.stride(0), x.stride(1), w.stride(0), w.stride(1), out.stride(0),
                       out.stride(1), ROUND=rnd, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps,
                       num_stages=stages)
    return out


SHAPES = {(512, 1024, 1024): [(64, 32, 64, 4, 3), (64, 64, 64, 4, 3)],
          (4096, 2048, 2048): [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4)],
          (16384, 4096, 4096): [(128, 256, 32, 8, 3), (128, 128, 32, 8, 3)]}


def rel_err(a, ref):
    return ((a.double() - ref).norm() / ref.norm()).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_float32_matmul_precision("high")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    print("| M x K -> N | variant | ms (median) | rel. err vs fp64 |\n|---|---|---|---|")
    for (M, K, N), tiles in SHAPES.items():
        x = torch.randn(M, K, device="cuda")
        w = torch.randn(N, K, device="cuda") / K ** 0.5
        ref = x.double() @ w.double().T
        out = torch.empty(M, N, device="cuda")
        fns = {"cuBLAS TF32 (F.linear)": lambda: F.linear(x, w)}
        for t in tiles:
            for rnd in (0, 1, 2, 3):
                kind = ("truncated", "rounded", "x rounded", "W rounded")[rnd]
                name = f"{kind} {t[0]}x{t[1]}x{t[2]} w{t[3]} s{t[4]}"
                fns[name] = lambda rnd=rnd, t=t: gemm(x, w, out, rnd, *t)
        errs = {name: rel_err(fn(), ref) for name, fn in fns.items()}
        times = {name: [] for name in fns}
        for _ in range(args.rounds):
            for name, fn in fns.items():
                times[name].append(triton.testing.do_bench(fn, return_mode="median"))
        for name in fns:
            print(f"| {M}x{K}->{N} | {name} | {statistics.median(times[name]):.4f} | {errs[name]:.2e} |", flush=True)


if __name__ == "__main__":
    main()
