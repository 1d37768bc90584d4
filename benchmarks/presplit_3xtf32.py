"""fp32 "highest" GEMMs with one operand pre-split for 3xTF32 (triton_lib.dot_3xtf32) on a GPU:
each pre-split config (the profile's space plus a few more tiles) next to eager's cuBLAS fp32
and Triton's in-kernel tf32x3, for the Linear+BN+GELU+ReLU eval kernel (W pre-split) and the
RNN cell kernel (out^T = W x^T, the cat operands pre-split; with and without tanh = h2o), each
in `tl` ("pre-split" rows) and in Gluon ("gluon" rows, sm_90: patterns/_eval_gluon.py,
patterns/_cell_gluon.py).

    python benchmarks/presplit_3xtf32.py [--rounds 3]

Median do_bench ms and rel. error vs fp64 per variant, split pass included; a table last (with
--rounds, the fastest variants and eager again, timed in interleaved rounds: single timings
of these ms-long kernels vary by ~10% on the H100, e.g. the eval block's Gluon 128x128 tile
5.81 ms in a sweep, then 5.32 / 5.87 / 5.32 interleaved with the `tl` tiles at 5.81-5.97).
History (H100, this script's first versions): the three MMAs chained into one accumulator
over all of K: 4.6 ms but error 1.5e-5; heads truncated instead of rounded: 5.1-6.0 ms,
error 1.7-2.5e-7 (3.2e-6 on a cancelling CPU case); NaN masked every K step: ~10% slower;
`acc + dot(a, b, 0)` left for the compiler to fold into one chain: 4.8 ms, error 5e-6.
"""
import torch
import torch.nn.functional as F

import fusion_backend.patterns.cat_linear_tanh as clt
import fusion_backend.patterns.linear_bn_gelu_relu as lbgr
from bench import bench, eval_block_inputs, print_variants, reference, rel_err, sweep_args, try_variant
from fusion_backend import config_spaces, devices
from fusion_backend.patterns._common import kernel_kwargs, space, tf32_split

# tiles measured and left out of the space, for comparison (256-row tiles spill: 7-40 ms),
# then tiles not measured yet (fourth session: the cell needs ~5% to hold 3.4 ms reliably)
EXTRA = [config_spaces._g(128, 64, 32, 4, 4, **config_spaces.PRESPLIT),
         config_spaces._g(64, 128, 32, 4, 4, **config_spaces.PRESPLIT)]
EXTRA += [config_spaces._g(bm, bn, bk, w, s, **config_spaces.PRESPLIT) for bm, bn, bk, w, s in (
    (128, 64, 32, 4, 2), (128, 64, 16, 4, 5), (64, 64, 32, 4, 4), (128, 32, 32, 4, 4), (128, 128, 16, 8, 4))]


def name_of(c):
    return f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} w{c['num_warps']} s{c['num_stages']}"


def sweep(rows, tag, run_for, out, ref, configs, profile):
    for config in configs:
        run, kwargs = run_for(), kernel_kwargs(config, profile)
        name = ("gluon " if config.get("GLUON") else "pre-split ") + name_of(config) + (
            "" if config in EXTRA else " (space)")
        try_variant(rows, tag, name, lambda run=run, kwargs=kwargs: run(kwargs), out, ref)  # bound now: --rounds


def main():
    sweep_args(__doc__, shape=False)
    torch.manual_seed(0)
    torch.set_float32_matmul_precision("highest")
    profile = devices.device_profile(torch.device("cuda"))
    configs = [c for c in space(profile, config_spaces.GEMM, torch.float32, precision="tf32x3") if c.get("PRESPLIT")]
    configs += [c for c in EXTRA if not config_spaces.validate(profile, config_spaces.GEMM, c)]
    rows = []

    M, K, N = 16384, 4096, 4096
    tag = f"LBGR eval {M}x{K}->{N}"
    tensors, ref = eval_block_inputs(M, K, N, torch.float32)
    w = tensors[1]
    args = (*tensors, 1e-5, "none")
    reference(rows, tag, "eager (cuBLAS fp32 + torch ops)", lambda: lbgr._reference(*args),
              rel_err(lbgr._reference(*args), ref))
    out = torch.empty(M, N, device="cuda")
    run = lbgr.eval_runner(*args, "tf32x3", out)
    tf32x3 = kernel_kwargs(config_spaces._g(128, 64, 32, 4, 4, TMA=True), profile)
    run(tf32x3)
    rows.append((tag, "in-kernel tf32x3, TMA 128x64x32 w4 s4", bench(lambda: run(tf32x3)), rel_err(out, ref)))
    rows.append((tag, "split pass over W (included below)", bench(lambda: tf32_split(w)), float("nan")))
    sweep(rows, tag, lambda: lbgr.eval_runner(*args, "tf32x3", out), out, ref, configs, profile)

    for tag, (M, widths, N, act) in {"cell i2h 256x(16384+16384)->16384 +tanh": (256, (16384, 16384), 16384, True),
                                     "h2o 256x16384->8192": (256, (16384,), 8192, False)}.items():
        xs = [torch.randn(M, k, device="cuda") for k in widths]
        K = sum(widths)
        w = torch.randn(N, K, device="cuda") / K ** 0.5
        b = torch.randn(N, device="cuda")
        y = F.linear(torch.cat(xs, 1).double(), w.double(), b.double())
        ref = torch.tanh(y) if act else y

        def eager(xs=xs, w=w, b=b, act=act):  # bound now: --rounds times it after the loop
            y32 = F.linear(torch.cat(xs, 1), w, b)
            return torch.tanh(y32) if act else y32

        reference(rows, tag, "eager (cuBLAS fp32)", eager, rel_err(eager(), ref))
        rows.append((tag, "split pass over x (included below)", bench(lambda: [tf32_split(t) for t in xs]),
                     float("nan")))
        out = torch.empty(M, N, device="cuda")
        sweep(rows, tag, lambda: clt.runner(xs, w, b, "tf32x3", out, act), out, ref, configs, profile)
    print_variants(rows, "fp32 'highest'")

if __name__ == "__main__":
    main()
