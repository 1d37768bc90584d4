"""3xTF32 with one operand pre-split (`triton_lib.dot_3xtf32`, the fp32 "highest" kernels of
the GPU profiles) and pattern `cell_h2o`, on the CPU under Triton's interpreter.

The GPU chooses these kernels through PRESPLIT configs, which the interpreter profile's
space does not have (TMA needs CUDA tensors there), so the kernels are launched directly
here with small tiles; tests/test_gpu.py runs them through the tuner on large shapes.
"""
import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import fusion_backend
import fusion_backend.patterns.cat_linear_tanh as clt
import fusion_backend.patterns.linear_bn_gelu_relu as lbgr
from fusion_backend import devices
from fusion_backend.patterns._common import tf32_split, tf32_split_all
from test_cat_linear_tanh import B, H, I, O, RNNCell, assert_grads_close, cell_grads, compile_
from tolerances import HIGHEST_FLOOR, assert_matches, rel_err, tolerance

pytestmark = pytest.mark.skipif(not devices.interpreter_enabled(),
                                reason="needs TRITON_INTERPRET=1 (conftest sets it when there is no GPU)")

TILES = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=4, num_warps=1, num_stages=2, TMA=True, PRESPLIT=True)


def padded_weight(n, k):
    """An (n, k) weight whose rows are 16-byte aligned for any k (a view of a wider buffer)."""
    return (torch.randn(n, -(-k // 4) * 4 + 4) / k ** 0.5)[:, :k]


# ----------------------------------------------------------------------------- the split

def test_tf32_split_exact_for_any_layout():
    torch.manual_seed(0)
    t = torch.randn(75, 37) * 1e3
    t[0, 0], t[1, 1], t[2, 2], t[3, 3] = float("inf"), float("nan"), 1e-40, -0.0
    view = t.t()  # non-contiguous, odd width
    hi, lo = tf32_split(view)
    assert hi.shape == lo.shape == view.shape
    assert hi.stride(1) == 1 and hi.stride(0) % 4 == 0  # 16-byte rows: TMA-ready
    finite = torch.isfinite(view)
    assert torch.equal((hi + lo)[finite], view[finite])  # exact
    assert ((hi.view(torch.int32) & 0x1FFF) == 0).all()  # the head is a TF32 value
    normal = finite & (view.abs() >= torch.finfo(torch.float32).tiny)  # a denormal has fewer head bits
    assert (lo.abs() <= hi.abs() * 2.0 ** -11)[normal].all()  # rounded: at most half the head's last bit
    big = torch.tensor([[3.4028235e38, -3.4028235e38, 3.4e38, float("-inf")]])
    b_hi, b_lo = tf32_split(big)
    assert torch.isfinite(b_hi[0, :3]).all() and torch.equal(b_hi[0, :3] + b_lo[0, :3], big[0, :3])
    assert hi[0, 0] == float("inf") and hi[1, 1].isnan()
    e_hi, e_lo = tf32_split(torch.empty(0, 5))
    assert e_hi.shape == e_lo.shape == (0, 5)

def test_tf32_split_all_splits_each_operand_exactly_in_one_launch(monkeypatch):
    """A cell's cat operands (odd widths, one transposed, one empty) split by one launch: each
    (hi, lo) is exact for its own operand and TMA-ready, and no operand's columns spill
    into another's."""
    from fusion_backend import triton_lib

    torch.manual_seed(1)
    a, b, c = torch.randn(13, 37) * 1e3, torch.randn(23, 13).t(), torch.randn(13, 5)
    launches = []
    real = triton_lib.tf32_split_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(triton_lib, "tf32_split_kernel", Counting())
    pairs = tf32_split_all([a, b, torch.empty(13, 0), c])
    assert len(launches) == 1
    for (hi, lo), t in zip(pairs, [a, b, torch.empty(13, 0), c]):
        assert hi.shape == lo.shape == t.shape
        assert hi.stride(1) == 1 and hi.stride(0) % 4 == 0 and hi.storage_offset() % 4 == 0  # TMA-ready
        assert torch.equal(hi + lo, t)
        assert ((hi.view(torch.int32) & 0x1FFF) == 0).all()



# ----------------------------------------------------------------------------- Linear+BN+GELU+ReLU, eval

@pytest.mark.parametrize("affine,bias,approximate", [(True, True, "none"), (False, False, "tanh")])
def test_eval_presplit_kernel_matches_fp64(affine, bias, approximate):
    torch.manual_seed(1)
    M, K, N = 37, 100, 75
    x = torch.randn(M, K) * 3
    w = torch.randn(N, K) / K ** 0.5
    b = torch.randn(N) if bias else None
    gamma, beta = (torch.randn(N), torch.randn(N)) if affine else (None, None)
    mean, var = torch.randn(N), torch.rand(N) + 0.5
    out = torch.full((M, N), float("nan"))
    dummy = mean
    tensors = (b if bias else dummy, gamma if affine else dummy, beta if affine else dummy, mean, var, out)
    flags = dict(HAS_BIAS=bias, HAS_GAMMA=affine, HAS_BETA=affine, APPROX_TANH=approximate == "tanh")
    config = {k: v for k, v in TILES.items() if k not in ("TMA", "PRESPLIT")}
    lbgr.launch_presplit(x, w, tensors, M, N, K, 1e-5, flags, config)
    args64 = [None if t is None else t.double() for t in (x, w, b, gamma, beta, mean, var)]
    ref = lbgr._reference(*args64, 1e-5, approximate)
    eager = lbgr._reference(x, w, b, gamma, beta, mean, var, 1e-5, approximate)
    assert rel_err(out, ref) <= tolerance(torch.float32, eager_err=rel_err(eager, ref))


def test_eval_presplit_kernel_nan_inf_and_large_inputs():
    """inf - inf in a split must not turn a row into NaN: the head product carries the inf."""
    torch.manual_seed(2)
    M, K, N = 19, 36, 23
    x = torch.randn(M, K) * 1e4
    x[3, 7], x[5, 1] = float("inf"), float("nan")
    w = torch.randn(N, K) / K ** 0.5
    b, gamma, beta, mean = (torch.randn(N) for _ in range(4))
    var = torch.rand(N) + 0.5
    out = torch.empty(M, N)
    flags = dict(HAS_BIAS=True, HAS_GAMMA=True, HAS_BETA=True, APPROX_TANH=False)
    config = {k: v for k, v in TILES.items() if k not in ("TMA", "PRESPLIT")}
    lbgr.launch_presplit(x, w, (b, gamma, beta, mean, var, out), M, N, K, 1e-5, flags, config)
    # elementwise fp64 reference: a CPU BLAS turns a row with an inf into NaN through its padding
    y = (x.double()[:, None, :] * w.double()[None]).sum(-1) + b.double()
    ref = F.relu(F.gelu(F.batch_norm(y, mean.double(), var.double(), gamma.double(), beta.double(), False, 0.0,
                                     1e-5)))
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    assert out[3].isinf().any() and out[5].isnan().all()
    finite = torch.isfinite(ref)
    assert rel_err(out[finite], ref[finite]) <= HIGHEST_FLOOR


# ----------------------------------------------------------------------------- the RNN cell kernel

@pytest.mark.parametrize("widths,N,M,bias,apply_tanh", [
    ((36, 23), 29, 5, True, True),       # odd last width: W rows padded, as a view may be
    ((16, 40, 9), 33, 19, False, True),  # 3-way cat, no bias
    ((60,), 40, 1, True, False),         # one operand, batch of one, no tanh (cell_h2o)
])
def test_cell_presplit_kernel_matches_fp64(widths, N, M, bias, apply_tanh):
    torch.manual_seed(sum(widths) + N)
    xs = [(torch.rand(M, w) * 2 - 1) * 1e3 for w in widths]  # saturating tanh
    xs[0] = xs[0].t().contiguous().t()  # column-major: split from its strides
    w = padded_weight(N, sum(widths))
    b = torch.randn(N) if bias else None
    out = torch.full((M, N), float("nan"))
    clt._launch_presplit(xs, w, b, out, TILES, apply_tanh)
    y64 = F.linear(torch.cat(xs, 1).double(), w.double(), None if b is None else b.double())
    y32 = F.linear(torch.cat(xs, 1), w, b)
    ref, eager = (torch.tanh(y64), torch.tanh(y32)) if apply_tanh else (y64, y32)
    assert not out.isnan().any()
    assert rel_err(out, ref) <= tolerance(torch.float32, eager_err=rel_err(eager, ref))
    if apply_tanh:
        assert out.abs().max() <= 1 and torch.equal(out[eager.abs() == 1], eager[eager.abs() == 1])


def test_cell_presplit_needs_aligned_operand_starts():
    """W is read by TMA from each cat operand's first column: with a width that is not a
    multiple of 4 before the last operand, the PRESPLIT config runs the pointer kernel."""
    torch.manual_seed(3)
    xs = [torch.randn(5, 37), torch.randn(5, 23)]
    w = padded_weight(29, 60)
    out = torch.empty(5, 29)
    clt.runner(xs, w, None, "tf32x3", out)(TILES)  # tma_ready is False on CPU tensors anyway
    ref = torch.tanh(F.linear(torch.cat(xs, 1).double(), w.double()))
    assert rel_err(out, ref) <= HIGHEST_FLOOR


def test_cell_gluon_config_falls_back_to_the_pointer_kernel_where_tma_cannot_read():
    """A Gluon config (sm_90 only; Gluon does not run under the interpreter) on tensors TMA
    cannot read runs the pointer kernel with the same tiles, without the routing keys."""
    torch.manual_seed(4)
    xs = [torch.randn(7, 36), torch.randn(7, 20)]
    w = padded_weight(19, 56)
    b = torch.randn(19)
    out = torch.full((7, 19), float("nan"))
    clt.runner(xs, w, b, "tf32x3", out)(dict(TILES, GLUON=True))
    assert rel_err(out, torch.tanh(F.linear(torch.cat(xs, 1).double(), w.double(), b.double()))) <= HIGHEST_FLOOR


def test_eval_gluon_config_falls_back_to_the_pointer_kernel_where_tma_cannot_read():
    """The MLP block's Gluon config on tensors TMA cannot read (here: CPU tensors) runs the
    pointer kernel with the same tiles, without the routing keys."""
    torch.manual_seed(5)
    M, K, N = 9, 20, 11
    x, w, b = torch.randn(M, K), torch.randn(N, K) / K ** 0.5, torch.randn(N)
    gamma, beta, mean, var = torch.randn(N), torch.randn(N), torch.randn(N), torch.rand(N) + 0.5
    out = torch.full((M, N), float("nan"))
    lbgr.eval_runner(x, w, b, gamma, beta, mean, var, 1e-5, "none", "tf32x3", out)(dict(TILES, GLUON=True))
    args64 = [t.double() for t in (x, w, b, gamma, beta, mean, var)]
    eager = lbgr._reference(x, w, b, gamma, beta, mean, var, 1e-5, "none")
    ref = lbgr._reference(*args64, 1e-5, "none")
    assert rel_err(out, ref) <= tolerance(torch.float32, eager_err=rel_err(eager, ref))


# ----------------------------------------------------------------------------- pattern cell_h2o

@pytest.fixture
def tf32x3_profile(monkeypatch):
    """The interpreter profile as a tensor-core GPU sees fp32 at "highest": dots in 3xTF32."""
    profile = dataclasses.replace(devices.INTERPRETER, fp32_highest="tf32x3", dot_precisions=("ieee", "tf32x3"))
    real = devices.device_profile
    monkeypatch.setattr(devices, "device_profile",
                        lambda device=None: profile if torch.device(device or "cpu").type == "cpu" else real(device))
    return profile


def test_cell_h2o_fused_after_the_cell_with_gradients(tf32x3_profile):
    torch.manual_seed(4)
    got, want, ref64 = cell_grads(RNNCell(), torch.randn(B, I) * 2, torch.randn(B, H))
    assert fusion_backend.counters["cat_linear_tanh"] == 1 and fusion_backend.counters["cell_h2o"] == 1
    assert_matches(got["out"], want["out"], ref64["out"], "output")
    assert_grads_close(got, want, ref64, ("x", "h", "W_h2o", "b_h2o", "W", "b"))


def test_cell_h2o_left_to_inductor_without_3xtf32():
    torch.manual_seed(5)
    model = RNNCell()
    x, h = torch.randn(B, I), torch.randn(B, H)
    with torch.no_grad():
        report = fusion_backend.explain(model, x, h)
    sites = [s for s in report.skipped if s.pattern == "cell_h2o"]
    assert len(sites) == 1 and "no kernel for a plain Linear" in sites[0].reason, str(report)
    assert [s.pattern for s in report.fused] == ["cat_linear_tanh"]


def test_cell_h2o_under_autocast_left_to_inductor(tf32x3_profile):
    """Under autocast the cell computes in fp16 and h2o's fp32 weights are cast by autocast:
    h2o is left to Inductor with that reason, and the outputs are eager's within fp16's class."""
    torch.manual_seed(8)
    model = RNNCell()
    eager = copy.deepcopy(model)
    x, h = torch.randn(B, I), torch.randn(B, H)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        report = fusion_backend.explain(model, x, h)
        torch._dynamo.reset()
        out, hidden = compile_(model)(x, h)
        e_out, e_hidden = eager(x, h)
    sites = [s for s in report.skipped if s.pattern == "cell_h2o"]
    assert len(sites) == 1 and "differ in dtype from the hidden state" in sites[0].reason, str(report)
    assert out.dtype == e_out.dtype == torch.float16
    assert rel_err(out, e_out) <= tolerance(torch.float16) and rel_err(hidden, e_hidden) <= tolerance(torch.float16)


# ----------------------------------------------------------------------------- compiled for Hopper

_COMPILE_FOR_HOPPER = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import fusion_backend.patterns.cat_linear_tanh as clt
import fusion_backend.patterns.linear_bn_gelu_relu as lbgr

kernel, sig, const = json.loads(sys.argv[1])
from fusion_backend.triton_lib import tf32_split_kernel
fn = {"eval": lbgr._gemm_bn_gelu_relu_eval_presplit_kernel, "cell": clt._cat_gemm_tanh_presplit_kernel,
      "wxt": clt._cat_gemm_tanh_wxt_kernel, "split": tf32_split_kernel,
      "tma_eval": lbgr._gemm_bn_gelu_relu_eval_tma_kernel}[kernel]
num_warps = const.pop("num_warps", 4)
sig.update({k: "constexpr" for k in const})
compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=const.get("NUM_STAGES", 3)))
print(json.dumps([compiled.asm["ttgir"], compiled.asm["ptx"]]))
"""


def _compile_in_subprocess(script, payload):
    """Run one of the compile scripts below on `payload` (JSON) in a subprocess without
    TRITON_INTERPRET (this process runs the interpreter; Triton's own compiler needs no GPU to
    compile for sm_90) and return the JSON it prints last."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", script, json.dumps(payload)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def compile_for_hopper(kernel, sig, const):
    """(TTGIR, PTX) of one of the `tl` kernels compiled for sm_90."""
    return _compile_in_subprocess(_COMPILE_FOR_HOPPER, [kernel, sig, const])


_COMPILE_GLUON_FOR_HOPPER = """
import json, sys
import torch, triton
from triton.backends.compiler import GPUTarget
try:
    from triton.experimental.gluon._runtime import GluonASTSource
except ImportError:
    from triton.experimental.gluon import GluonASTSource
import fusion_backend.patterns._cell_gluon as cg
import fusion_backend.patterns._eval_gluon as eg

kernel, (BM, BN, BK, stages, warps, segments) = json.loads(sys.argv[1])
w_desc, x_desc = cg._descriptor(torch.empty(1024, 512), BN, BK), cg._descriptor(torch.empty(256, 512), BM, BK)
mangle = lambda d: f"tensordesc<fp32[{','.join(map(str, d.block_shape))}],{d.layout!r}>"
if kernel == "cell":
    fn = cg._cell_3xtf32_kernel
    sig = {**{f"w{i}": mangle(w_desc) for i in range(4)}, **{f"{p}{i}": mangle(x_desc) for i in range(4) for p in "hl"},
           "b_ptr": "*fp32", "out_ptr": "*fp32",
           **{n: "i32" for n in ("M", "N", "K0", "K1", "K2", "K3", "stride_om", "stride_on")}}
    const = dict(NUM_SEGMENTS=segments, HAS_BIAS=True, APPLY_TANH=True, NUM_STAGES=stages, num_warps=warps)
    const.update({f"{p}{i}": None for i in range(segments, 4) for p in "whl"})  # as `launch` pads: None
else:
    fn = eg._eval_3xtf32_kernel
    sig = {"x_desc": mangle(x_desc), "whi_desc": mangle(w_desc), "wlo_desc": mangle(w_desc),
           **{n: "*fp32" for n in ("b_ptr", "gamma_ptr", "beta_ptr", "mean_ptr", "var_ptr", "out_ptr")},
           **{n: "i32" for n in ("M", "N", "K", "stride_om", "stride_on")}, "eps": "fp32"}
    const = dict(HAS_BIAS=True, HAS_GAMMA=True, HAS_BETA=True, APPROX_TANH=False, GROUP_M=8, NUM_STAGES=stages,
                 num_warps=warps)
sig.update({k: "constexpr" for k in const})
compiled = triton.compile(GluonASTSource(fn, sig, const, {}), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "default_dot_input_precision": "tf32"})
print(json.dumps(compiled.asm["ptx"]))
"""


@pytest.mark.parametrize("kernel,tiles", [("cell", (128, 128, 32, 3, 8, 2)), ("cell", (128, 64, 32, 2, 4, 1)),
                                          ("cell", (128, 64, 32, 4, 4, 4)), ("eval", (64, 128, 32, 3, 4, 1)),
                                          ("eval", (128, 128, 32, 3, 8, 1))])
def test_gluon_kernel_waits_for_the_head_product_only(kernel, tiles):
    """The Gluon kernels (GPU-only: compiled here for sm_90 by Triton's own compiler) issue
    the three products of a K step as MMAs (BLOCK_K / 8 instructions each) with TF32 inputs and
    a round-to-nearest split, and in their loop wait only until at most the two remainder MMAs
    are in flight (`wait_group 2`); the one full wait is after the loop."""
    ptx = _compile_in_subprocess(_COMPILE_GLUON_FOR_HOPPER, [kernel, tiles])
    block_k = tiles[2]
    assert ptx.count("wgmma.mma_async") == 3 * block_k // 8
    assert all(".tf32.tf32" in line for line in ptx.splitlines() if "wgmma.mma_async" in line)
    assert ptx.count("cvt.rna.tf32.f32") > 0
    waits = [line.split("aligned")[1].strip(" ;") for line in ptx.splitlines() if "wgmma.wait_group" in line]
    assert waits == ["2", "0"], waits


@pytest.mark.parametrize("kernel", ["eval", "cell"])
def test_hopper_code_keeps_the_head_product_off_the_accumulator_chain(kernel):
    """On the GPU the MMA's own accumulation over all of K lost accuracy (5e-6 instead of 1.4e-7
    at K = 4096), so the head product must start from the opaque seed at each K step, not from
    the running sum (the compiler folds `acc + dot(a, b, zeros)` into one chain when it can see
    the zeros), and the in-loop split must use cvt.rna.tf32.f32. Compiled here for sm_90 by
    Triton's own compiler (no GPU needed), in a subprocess: this process runs the interpreter."""
    f32, bm, bn, bk = "*fp32", 128, 64, 32
    if kernel == "eval":
        sig = {"x_desc": f"tensordesc<fp32[{bm}, {bk}]>", "whi_desc": f"tensordesc<fp32[{bn}, {bk}]>",
               "wlo_desc": f"tensordesc<fp32[{bn}, {bk}]>", **{n: f32 for n in (
                   "b_ptr", "gamma_ptr", "beta_ptr", "mean_ptr", "var_ptr", "out_ptr")},
               **{n: "i32" for n in ("M", "N", "K", "stride_om", "stride_on")}, "eps": "fp32"}
        const = dict(HAS_BIAS=True, HAS_GAMMA=True, HAS_BETA=True, APPROX_TANH=False, PTX=True, NUM_STAGES=3,
                     BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8)
        segments = 1
    else:
        sig = {**{f"w{i}": f"tensordesc<fp32[{bn}, {bk}]>" for i in range(4)},
               **{f"{p}{i}": f"tensordesc<fp32[{bm}, {bk}]>" for i in range(4) for p in "hl"},
               "b_ptr": f32, "out_ptr": f32, **{n: "i32" for n in ("M", "K0", "K1", "K2", "K3", "stride_om",
                                                                     "stride_on")}}
        # N == 1 as Triton specializes it: the seed must not depend on N
        const = dict(N=1, NUM_SEGMENTS=2, HAS_BIAS=True, APPLY_TANH=True, NUM_STAGES=3, PTX=True,
                     BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, w2=None, w3=None, h2=None, l2=None, h3=None,
                     l3=None)  # the unused segments' slots, as the launcher pads them
        segments = 2
    ttgir, ptx = compile_for_hopper(kernel, sig, const)
    dots = [line for line in ttgir.splitlines() if "ttng.warp_group_dot " in line]
    assert len(dots) == 3 * segments, dots
    c_operands = [line.split("warp_group_dot ")[1].split(" {")[0].split(", ")[2] for line in dots]
    assert sum("seed" in c for c in c_operands) == segments, c_operands  # one fresh head product per K loop
    assert "cvt.rna.tf32.f32" in ptx


@pytest.mark.parametrize("persistent", [False, True], ids=["tile-per-program", "persistent"])
@pytest.mark.parametrize("dtype,precision,bk", [("fp32", "tf32", 32), ("bf16", "ieee", 64)])
def test_tma_eval_kernel_compiles_for_hopper(persistent, dtype, precision, bk):
    """The eval kernel's TMA tiles at TF32 / bf16, one tile per program and PERSISTENT, with
    the H100 space's 128x256 tiles, compiled for sm_90 by this Triton (no GPU needed; the
    interpreter runs both kernels, the GPU tests run them with the GPU machine's Triton): one
    wgmma in the K loop, and in the persistent kernel a loop over tiles around it."""
    sig = {"x_desc": f"tensordesc<{dtype}[128, {bk}]>", "w_desc": f"tensordesc<{dtype}[256, {bk}]>",
           **{n: f"*{dtype}" for n in ("b_ptr", "gamma_ptr", "beta_ptr", "mean_ptr", "var_ptr", "out_ptr")},
           **{n: "i32" for n in ("M", "N", "K", "stride_om", "stride_on", "num_programs")}, "eps": "fp32"}
    const = dict(HAS_BIAS=True, HAS_GAMMA=True, HAS_BETA=True, APPROX_TANH=False, PRECISION=precision,
                 NUM_STAGES=3, PERSISTENT=persistent, BLOCK_M=128, BLOCK_N=256, BLOCK_K=bk, GROUP_M=8,
                 num_warps=8)
    ttgir, ptx = compile_for_hopper("tma_eval", sig, const)
    assert ttgir.count("ttng.warp_group_dot ") == 1
    assert ttgir.count("scf.for") == (2 if persistent else 1)
    assert "wgmma" in ptx


@pytest.mark.parametrize("num", [1, 2, 4])
def test_split_kernel_compiles_for_hopper_with_none_past_its_tensors(num):
    """`tf32_split_all` passes None for the slots past its tensors (each argument costs host
    time at every launch): the compiled kernel must never touch them. Compiled here for sm_90
    by Triton's own compiler (no GPU needed); one masked load per tensor slot it reads."""
    names = [f"s{i}" for i in range(4)] + ["hi_ptr", "lo_ptr", "M"] + [f"K{i}" for i in range(4)] + \
        [f"s{i}{d}" for i in range(4) for d in "mk"] + ["c1", "c2", "c3", "stride_out"]
    unused = {f"s{i}" for i in range(num, 4)} | {f"K{i}" for i in range(num, 4)} | \
        {f"s{i}{d}" for i in range(num, 4) for d in "mk"} | {f"c{i}" for i in range(num, 4)}
    pointers = {"s0", "s1", "s2", "s3", "hi_ptr", "lo_ptr"}
    sig = {n: "*fp32" if n in pointers else "i32" for n in names}
    const = dict({n: None for n in unused}, NUM=num, BLOCK_M=32, BLOCK_K=128)
    ttgir, _ = compile_for_hopper("split", {n: t for n, t in sig.items() if n not in unused}, const)
    assert ttgir.count("tt.load") == 1  # one load of the selected tensor's tile
    assert ttgir.count("tt.store") == 2


@pytest.mark.parametrize("batch", [1, 0])
def test_cell_h2o_batch_of_one_and_empty(tf32x3_profile, batch):
    torch.manual_seed(6)
    model = RNNCell()
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    x, h = torch.randn(batch, I), torch.randn(batch, H)
    with torch.no_grad():
        out, hidden = compile_(model)(x, h)
        e_out, e_hidden = eager(x, h)
        r_out, r_hidden = ref(x.double(), h.double())
    assert out.shape == e_out.shape == (batch, O) and hidden.shape == (batch, H)
    if batch:
        assert fusion_backend.counters["cell_h2o"] == 1
        assert_matches(out, e_out, r_out)
        assert_matches(hidden, e_hidden, r_hidden, "hidden")
