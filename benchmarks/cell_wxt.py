"""The RNN cell's GEMMs at TF32 and bf16 (small batch, large K and N: bound by reading W) on a
GPU: the W x^T kernel with split-K (`cat_linear_tanh._cat_gemm_tanh_wxt_kernel`) for each WXT
tile of the space plus a few more, the pointer kernel's skinny tiles, and cuBLAS, next to the
floor (one read of W by torch's sum, and a copy of W).

    python benchmarks/cell_wxt.py

Median do_bench ms and rel. error vs fp64 per variant; a table last.
"""
import torch
import torch.nn.functional as F

import fusion_backend.patterns.cat_linear_tanh as clt
from bench import bench, print_variants, rel_err, try_variant
from fusion_backend import config_spaces, devices
from fusion_backend.config_spaces import HALF, _g, _w
from fusion_backend.patterns._common import kernel_kwargs, space

# tiles measured and left out of the space, for comparison (BLOCK_M = batch rows, BLOCK_N =
# rows of W; H100 TF32 i2h 0.90-1.77 ms, h2o 0.25-0.31 vs the space's 0.865 / 0.228)
EXTRA = [_w(256, 128, 32, 8, 3, 1), _w(256, 64, 32, 4, 4, 1), _w(256, 64, 32, 4, 4, 2), _w(256, 128, 16, 8, 6, 1),
         _w(256, 128, 32, 8, 4, 4), _w(256, 64, 64, 4, 2, 1), _w(256, 64, 64, 4, 4, 1, dtypes=HALF)]
POINTER = [_g(256, 64, 32, 8, 3), _g(256, 128, 32, 8, 3), _g(128, 128, 32, 8, 3)]


def name_of(c):
    kind = f"W x^T split {c['SPLIT_K']}" if c.get("WXT") else "pointer"
    return f"{kind} {c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} w{c['num_warps']} s{c['num_stages']}"


def main():
    torch.manual_seed(0)
    torch.set_float32_matmul_precision("high")
    profile = devices.device_profile(torch.device("cuda"))
    rows = []
    for dtype, precision in ((torch.float32, "tf32"), (torch.bfloat16, "ieee")):
        dname = str(dtype).replace("torch.", "")
        wxt = [c for c in space(profile, config_spaces.GEMM, dtype, precision=precision) if c.get("WXT")]
        wxt += [c for c in config_spaces.for_dtype(EXTRA, dtype) if not config_spaces.validate(
            profile, config_spaces.GEMM, c)]
        pointer = config_spaces.for_dtype(POINTER, dtype)
        for shape, (M, widths, N, act) in {"i2h 256x(16384+16384)->16384 +tanh": (256, (16384, 16384), 16384, True),
                                           "h2o 256x16384->8192": (256, (16384,), 8192, False)}.items():
            tag = f"{dname} {shape}"
            xs = [torch.randn(M, k, device="cuda").to(dtype) for k in widths]
            K = sum(widths)
            w = (torch.randn(N, K, device="cuda") / K ** 0.5).to(dtype)
            b = torch.randn(N, device="cuda").to(dtype)
            y = F.linear(torch.cat(xs, 1).double(), w.double(), b.double())
            ref = torch.tanh(y) if act else y
            xcat = torch.cat(xs, 1)

            def unfused():
                y32 = F.linear(torch.cat(xs, 1), w, b)
                return torch.tanh_(y32) if act else y32

            rows.append((tag, "floor: torch sum over W (one read)", bench(lambda: w.sum()), float("nan")))
            rows.append((tag, "floor: copy of W (read + write)", bench(lambda: w.clone()), float("nan")))
            rows.append((tag, "bare cuBLAS GEMM (cat prebuilt)", bench(lambda: F.linear(xcat, w)), float("nan")))
            rows.append((tag, "unfused: cat + cuBLAS addmm + tanh", bench(unfused), rel_err(unfused(), ref)))
            out = torch.empty(M, N, device="cuda", dtype=dtype)
            for config in wxt + pointer:
                run = clt.runner(xs, w, b, precision, out, act)
                kwargs = kernel_kwargs(config, profile)
                extra = "" if config in EXTRA or config in POINTER else " (space)"
                try_variant(rows, tag, name_of(config) + extra, lambda: run(kwargs), out, ref)
            xs = w = xcat = out = None  # freed before the next shape
            torch.cuda.empty_cache()
    print_variants(rows, "RNN cell GEMMs, fp32 'high' (TF32) and bf16", top=12)


if __name__ == "__main__":
    main()
