"""GEMM main-loop variants of the eval Linear+BN+GELU+ReLU kernel on a GPU: pointer loads vs
TMA descriptors, per tile config, next to the bare cuBLAS GEMM and the unfused path.

    python benchmarks/gemm_variants.py [--M 16384 --K 4096 --N 4096] [--rounds 3]

Median do_bench ms and rel. error vs fp64 per variant; prints a table last (with --rounds, the
fastest variants and the references again, timed in interleaved rounds).
"""
import torch

import fusion_backend.patterns.linear_bn_gelu_relu as lbgr
from bench import eval_block_inputs, eval_block_references, print_variants, sweep_args, try_variant
from fusion_backend import config_spaces, devices
from fusion_backend.patterns._common import kernel_kwargs


def g(bm, bn, bk, w, s, tma):
    return config_spaces._g(bm, bn, bk, w, s, **({"TMA": True} if tma else {}))


# the last two of each: one warpgroup per 128x128 tile in <= 96 KB of shared memory, so two
# programs share an SM and one's epilogue could overlap the other's main loop. H100, sixth
# session (3 interleaved rounds): TF32 128x128x32 w4 s3 2.02-2.20 ms, s2 2.22-2.24 vs 128x256
# w8 s3 1.78-1.84 (cuBLAS 1.49-1.53); bf16 128x128x64 w4 s3 1.05-1.09, 128x128x32 w4 s4
# 1.16-1.22 vs 128x256x64 w8 s4 0.94-0.99 (cuBLAS 0.75-0.83): slower.
FP32 = [(128, 64, 32, 4, 4), (128, 128, 32, 8, 3), (128, 128, 32, 8, 4), (128, 64, 32, 4, 5), (128, 256, 32, 8, 3),
        (256, 128, 32, 8, 3), (128, 128, 32, 4, 3), (128, 128, 32, 4, 2)]
HALF = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 64, 64, 4, 4),
        (128, 128, 64, 4, 3), (128, 128, 32, 4, 4)]


def main():
    args = sweep_args(__doc__)
    M, K, N = args.M, args.K, args.N
    profile = devices.device_profile(torch.device("cuda"))
    rows = []
    for dtype, precision, setting, shapes in ((torch.float32, "tf32x3", "highest", FP32),
                                              (torch.float32, "tf32", "high", FP32),
                                              (torch.bfloat16, "ieee", "high", HALF)):
        torch.set_float32_matmul_precision(setting)
        (x, w, b, gamma, beta, mean, var), ref = eval_block_inputs(M, K, N, dtype)
        tag = f"{str(dtype)[6:]} {precision}"
        eval_block_references(rows, tag, (x, w, b, gamma, beta, mean, var), ref, profile)
        for tma in (False, True):
            for shape in shapes:
                config = g(*shape, tma)
                name = ("TMA " if tma else "ptr ") + "x".join(map(str, shape[:3])) + f" w{shape[3]} s{shape[4]}"
                out = torch.empty((M, N), device="cuda", dtype=dtype)
                run = lbgr.eval_runner(x, w, b, gamma, beta, mean, var, 1e-5, "none", precision, out)
                kwargs = kernel_kwargs(config, profile)
                try_variant(rows, tag, name, lambda run=run, kwargs=kwargs: run(kwargs), out, ref)
    print_variants(rows, f"M={M} K={K} N={N}", top=7)

if __name__ == "__main__":
    main()
