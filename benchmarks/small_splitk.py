"""Experiment: split-K pointer tiles for the small eval MLP block (512x1024->1024 TF32 "high").
The L2->SM traffic of 64x32 tiles is ~98 MB (x re-read by 32 column tiles, W by 8 row tiles);
bigger tiles cut it, split-K keeps the multiprocessors busy. Partials + last-arriver fixup.

    python benchmarks/small_splitk.py [--M 512 --K 1024 --N 1024]    # PYTHONPATH=$PWD

Result (sixteenth session, H100, torch 2.11.0+cu130, Triton 3.6.0, do_bench medians of 5
interleaved rounds, ms): no gain. cuBLAS GEMM alone 0.0139; the current 64x32x64 w4 s3 0.0161
(this kernel at split 1: 0.0156); split-K's best 64x64x64 S2 0.0165, 64x64x32 S2 0.0172,
64x32x32 S2 0.0177, S4 0.0183; 128-wide tiles not in the fastest ten; unfused 0.0312. The
kernel is not bound by L2 traffic at this size; issue #3's 2x at 512x1024 (<= 0.0125 against
Inductor's 0.025) stays out of reach of the kernel alone. Counters reset by the last arriver
("reset") or zeroed per call ("zeros") made no difference worth keeping.
"""
import argparse
import statistics
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, "benchmarks")  # bench.py's helpers
from bench import eval_block_inputs, rel_err  # noqa: E402

import fusion_backend.patterns.linear_bn_gelu_relu as lbgr  # noqa: E402
from fusion_backend import devices  # noqa: E402
from fusion_backend.patterns._common import kernel_kwargs  # noqa: E402
from fusion_backend import config_spaces  # noqa: E402
from fusion_backend.triton_lib import store_eval_tile  # noqa: E402


@triton.jit
def _splitk_eval_kernel(x_ptr, w_ptr, b_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, out_ptr, part_ptr, count_ptr,
                        M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on, eps,
                        HAS_BIAS: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
                        APPROX_TANH: tl.constexpr, PRECISION: tl.constexpr, SPLIT_K: tl.constexpr,
                        RESET: tl.constexpr, NUM_STAGES: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    num_m = tl.cdiv(M, BLOCK_M)
    tiles = num_m * tl.cdiv(N, BLOCK_N)
    tile = tl.program_id(0) % tiles
    split = tl.program_id(0) // tiles
    pid_m = tile % num_m
    pid_n = tile // num_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m % M
    cols = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    num_k = tl.cdiv(K, BLOCK_K)
    k_lo = split * num_k // SPLIT_K
    k_hi = (split + 1) * num_k // SPLIT_K
    a_ptrs = x_ptr + rows[:, None] * stride_xm + (k_lo * BLOCK_K + offs_k)[None, :] * stride_xk
    w_ptrs = w_ptr + cols[None, :] * stride_wn + (k_lo * BLOCK_K + offs_k)[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in tl.range(k_lo, k_hi, num_stages=NUM_STAGES):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        w = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if SPLIT_K == 1:
        store_eval_tile(acc, offs_m, offs_n, M, N, b_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, out_ptr,
                        stride_om, stride_on, eps, HAS_BIAS, HAS_GAMMA, HAS_BETA, APPROX_TANH)
    else:
        block = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tile_size = BLOCK_M * BLOCK_N
        tl.store(part_ptr + (split * tiles + tile).to(tl.int64) * tile_size + block, acc)
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                total += tl.load(part_ptr + (s * tiles + tile).to(tl.int64) * tile_size + block, cache_modifier=".cg")
            if RESET:
                tl.store(count_ptr + tile, 0)
            store_eval_tile(total, offs_m, offs_n, M, N, b_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, out_ptr,
                            stride_om, stride_on, eps, HAS_BIAS, HAS_GAMMA, HAS_BETA, APPROX_TANH)


_COUNTERS = {}


def launcher(args, out, bm, bn, bk, split, warps, stages, reset):
    x, w, b, gamma, beta, mean, var = args
    M, K = x.shape
    N = w.shape[0]
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    if reset:
        counters = _COUNTERS.setdefault(tiles, torch.zeros(tiles, device=x.device, dtype=torch.int32))

    def run():
        partials = torch.empty((split, tiles, bm, bn), device=x.device, dtype=torch.float32) if split > 1 else out
        cnt = counters if reset else (torch.zeros(tiles, device=x.device, dtype=torch.int32) if split > 1 else out)
        _splitk_eval_kernel[(tiles * split,)](
            x, w, b, gamma, beta, mean, var, out, partials, cnt, M, N, K, x.stride(0), x.stride(1), w.stride(0),
            w.stride(1), out.stride(0), out.stride(1), 1e-5, HAS_BIAS=True, HAS_GAMMA=True, HAS_BETA=True,
            APPROX_TANH=False, PRECISION="tf32", SPLIT_K=split, RESET=reset, NUM_STAGES=stages,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
        return out
    return run


def bench(fn):
    return triton.testing.do_bench(fn, return_mode="median")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--M", type=int, default=512)
    ap.add_argument("--K", type=int, default=1024)
    ap.add_argument("--N", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    torch.set_float32_matmul_precision("high")
    M, K, N = a.M, a.K, a.N
    args, ref = eval_block_inputs(M, K, N, torch.float32)
    profile = devices.device_profile(torch.device("cuda"))
    fns = {}
    fns["cuBLAS GEMM alone"] = lambda: torch.nn.functional.linear(args[0], args[1])
    fns["unfused"] = lambda: lbgr._unfused_eval(*args, 1e-5, "none", profile)
    for shape in ((64, 32, 64, 4, 3), (32, 32, 128, 4, 2), (32, 64, 128, 4, 2), (64, 64, 64, 4, 3)):
        out = torch.empty((M, N), device="cuda")
        run = lbgr.eval_runner(*args, 1e-5, "none", "tf32", out)
        kwargs = kernel_kwargs(config_spaces._g(*shape, SMALL=True), profile)
        fns["current " + "x".join(map(str, shape[:3])) + f" w{shape[3]} s{shape[4]}"] = (lambda r=run, k=kwargs: r(k))
    variants = []
    for bm, bn in ((64, 64), (128, 64), (64, 128), (128, 128), (32, 64), (64, 32), (32, 128)):
        for split in (1, 2, 4, 8):
            for bk in (32, 64):
                variants.append((bm, bn, bk, split, 4, 3, True))
    for v in ((128, 128, 32, 4, 8, 3, True), (128, 128, 64, 4, 8, 2, True), (128, 64, 32, 4, 8, 3, True),
              (64, 64, 32, 4, 4, 3, False), (128, 64, 32, 4, 4, 3, False), (128, 128, 32, 4, 4, 3, False),
              (64, 64, 32, 8, 4, 2, True), (64, 64, 64, 4, 4, 2, True), (64, 64, 32, 4, 4, 4, True)):
        variants.append(v)
    for v in variants:
        out = torch.empty((M, N), device="cuda")
        run = launcher(args, out, *v)
        name = "splitK {}x{}x{} S{} w{} s{}{}".format(*v[:6], " reset" if v[6] else " zeros")
        try:
            out.fill_(float("nan"))
            run()
            err = rel_err(out, ref)
            for _ in range(3):  # counters must stay right across calls
                run()
            err2 = rel_err(out, ref)
        except Exception as exc:  # noqa: BLE001
            print(name, "failed", type(exc).__name__, str(exc)[:200], flush=True)
            continue
        if not (err < 1e-3 and err2 < 1e-3):
            print(name, "WRONG", err, err2, flush=True)
            continue
        fns[name] = run
    first = {k: bench(f) for k, f in fns.items()}
    keep = sorted(first, key=first.get)[:10] + ["cuBLAS GEMM alone", "unfused"] + [k for k in fns if k.startswith("current")]
    keep = list(dict.fromkeys(keep))
    times = {k: [] for k in keep}
    for _ in range(a.rounds):
        for k in keep:
            times[k].append(bench(fns[k]))
    print(f"\nM={M} K={K} N={N} TF32, {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print("| variant | first | rounds median |\n|---|---|---|")
    for k in sorted(keep, key=lambda k: statistics.median(times[k])):
        print(f"| {k} | {first[k]:.4f} | {statistics.median(times[k]):.4f} |")


if __name__ == "__main__":
    main()
