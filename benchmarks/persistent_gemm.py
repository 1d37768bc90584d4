"""Experiment for the eval Linear+BN+GELU+ReLU kernel: a persistent TMA main loop (one program
per multiprocessor walking output tiles) against the one-tile-per-program TMA kernel and cuBLAS.

Variants: plain persistent loop; `flatten=True` (the tile and K loops software-pipelined as
one, so the next tile's loads overlap the epilogue); `warp_specialize=True` where the Triton
build accepts it on this GPU (loads and MMAs in separate warp groups). Not used by the package.

    python benchmarks/persistent_gemm.py [--M 16384 --K 4096 --N 4096]
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import fusion_backend.patterns.linear_bn_gelu_relu as lbgr
from bench import bench, eval_block_inputs, mkn_args, print_variants, try_variant
from fusion_backend import config_spaces, devices
from fusion_backend.triton_lib import store_eval_tile
from fusion_backend.patterns._common import descriptor, kernel_kwargs


@triton.jit
def _persistent_eval_kernel(x_desc, w_desc, b_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, out_ptr,
                            M, N, K, stride_om, stride_on, eps, PRECISION: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
                            FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, NUM_STAGES: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            GROUP_M: tl.constexpr):
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_group = GROUP_M * num_n
    for tile in tl.range(tl.program_id(0), num_m * num_n, NUM_PROGRAMS, flatten=FLATTEN,
                         warp_specialize=WARP_SPECIALIZE):
        first_m = (tile // per_group) * GROUP_M
        group_size = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (tile % per_group) % group_size
        pid_n = (tile % per_group) // group_size
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in tl.range(0, k_tiles, num_stages=NUM_STAGES):
            a = x_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
            w = w_desc.load([pid_n * BLOCK_N, k * BLOCK_K])
            acc = tl.dot(a, w.T, acc, input_precision=PRECISION)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        store_eval_tile(acc, offs_m, offs_n, M, N, b_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, out_ptr,
                        stride_om, stride_on, eps, True, True, True, False)


def persistent_eval(x, w, b, gamma, beta, mean, var, out, precision, config, flatten, ws):
    M, K = x.shape
    N = w.shape[0]
    BM, BN, BK = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    programs = min(torch.cuda.get_device_properties(x.device).multi_processor_count,
                   triton.cdiv(M, BM) * triton.cdiv(N, BN))
    _persistent_eval_kernel[(programs,)](
        descriptor(x, BM, BK), descriptor(w, BN, BK), b, gamma, beta, mean, var, out, M, N, K,
        out.stride(0), out.stride(1), 1e-5, PRECISION=precision, NUM_PROGRAMS=programs, FLATTEN=flatten,
        WARP_SPECIALIZE=ws, NUM_STAGES=config["num_stages"], BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_M=8,
        num_warps=config["num_warps"], num_stages=config["num_stages"])
    return out


FP32 = [(128, 256, 32, 8, 3), (128, 128, 32, 8, 4), (128, 64, 32, 4, 4)]
HALF = [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4)]


def main():
    M, K, N = mkn_args(__doc__)
    profile = devices.device_profile(torch.device("cuda"))
    rows = []
    for dtype, precision, setting, shapes in ((torch.float32, "tf32", "high", FP32),
                                              (torch.bfloat16, "ieee", "high", HALF),
                                              (torch.float32, "tf32x3", "highest", FP32[1:])):
        torch.set_float32_matmul_precision(setting)
        (x, w, b, gamma, beta, mean, var), ref = eval_block_inputs(M, K, N, dtype)
        tag = f"{str(dtype)[6:]} {precision}"
        rows.append((tag, "cuBLAS GEMM alone", bench(lambda: F.linear(x, w)), float("nan")))
        out = torch.empty(M, N, device="cuda", dtype=dtype)
        for shape in shapes:
            config = config_spaces._g(*shape, TMA=True)
            run = lbgr.eval_runner(x, w, b, gamma, beta, mean, var, 1e-5, "none", precision, out)
            kwargs = kernel_kwargs(config, profile)
            variants = [("one tile/program", lambda: run(kwargs))]
            for flatten, ws in ((False, False), (True, False), (False, True), (True, True)):
                variants.append((f"persistent flatten={int(flatten)} ws={int(ws)}",
                                 lambda f=flatten, s=ws: persistent_eval(x, w, b, gamma, beta, mean, var, out,
                                                                         precision, config, f, s)))
            for vname, fn in variants:
                name = f"{vname} " + "x".join(map(str, shape[:3])) + f" w{shape[3]} s{shape[4]}"
                try_variant(rows, tag, name, fn, out, ref)
    print_variants(rows, f"M={M} K={K} N={N}", top=6)

if __name__ == "__main__":
    main()
