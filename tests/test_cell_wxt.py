"""The RNN cell's W x^T kernel with split-K (`cat_linear_tanh._cat_gemm_tanh_wxt_kernel`, the
TF32/fp16/bf16 path for small batches on Hopper-class profiles), on the CPU under Triton's
interpreter.

The GPU chooses it through WXT configs, which the interpreter profile's space does not have
(TMA needs CUDA tensors there, so `runner` takes the pointer kernel), so the kernel is
launched directly here with small tiles; tests/test_gpu.py runs it through the tuner on
large shapes.
"""
import pytest
import torch
import torch.nn.functional as F

import fusion_backend.patterns.cat_linear_tanh as clt
from fusion_backend import config_spaces, devices
from fusion_backend.patterns._common import kernel_kwargs
from conftest import profile_named
from tolerances import REORDERED_SUMS, rel_err, tolerance

pytestmark = pytest.mark.skipif(not devices.interpreter_enabled(),
                                reason="needs TRITON_INTERPRET=1 (conftest sets it when there is no GPU)")


def tiles(split_k, bm=16, bn=16, bk=16):
    """A small WXT config as the launchers get it (`kernel_kwargs`: no dtypes/precisions keys)."""
    return kernel_kwargs(config_spaces._w(bm, bn, bk, 1, 2, split_k), devices.INTERPRETER)


def aligned(rows, cols, dtype=torch.float32, scale=1.0):
    """A (rows, cols) tensor with 16-byte aligned rows for any cols (a view of a wider
    buffer, as TMA needs), filled with uniform values in [-scale, scale)."""
    padded = -(-cols // 8) * 8 + 8
    return ((torch.rand(rows, padded) * 2 - 1) * scale).to(dtype)[:, :cols]


def reference(xs, w, b, apply_tanh):
    y64 = F.linear(torch.cat(xs, 1).double(), w.double(), None if b is None else b.double())
    y = F.linear(torch.cat(xs, 1), w, b)
    return (torch.tanh(y64), torch.tanh(y)) if apply_tanh else (y64, y)


@pytest.mark.parametrize("widths,N,M,bias,apply_tanh,split_k", [
    ((36, 23), 29, 5, True, True, 1),        # odd last width and N, one program per tile
    ((36, 23), 29, 5, True, True, 2),        # the same, K shared by two programs per tile
    ((16, 40, 9), 33, 19, False, True, 4),   # 3-way cat, no bias, more splits than some segments have blocks
    ((60,), 40, 1, True, False, 3),          # one operand, batch of one, no tanh (cell_h2o)
    ((8, 8, 8, 12), 17, 7, True, True, 2),   # 4-way cat
])
def test_wxt_kernel_matches_fp64(widths, N, M, bias, apply_tanh, split_k):
    torch.manual_seed(sum(widths) + N + split_k)
    xs = [aligned(M, w, scale=3.0) for w in widths]
    w = aligned(N, sum(widths), scale=1.0 / sum(widths) ** 0.5)
    b = torch.randn(N) if bias else None
    out = torch.full((M, N), float("nan"))
    clt._launch_wxt(xs, w, b, out, tiles(split_k), "tf32", apply_tanh)
    ref, eager = reference(xs, w, b, apply_tanh)
    assert not out.isnan().any()
    assert rel_err(out, ref) <= tolerance(torch.float32, "high")
    assert rel_err(out, eager) <= tolerance(torch.float32, "high")


def test_wxt_split_k_is_deterministic_and_agrees_with_one_split():
    """The partials are summed in split order by whichever program arrives last: the same
    result on every run; and the same as one program per tile up to fp32 rounding (both
    within the class of fp64, and of each other by a few fp32 roundings of the partial sums)."""
    torch.manual_seed(7)
    xs = [aligned(9, 40), aligned(9, 24)]
    w, b = aligned(21, 64, scale=0.2), torch.randn(21)
    runs = []
    for _ in range(2):
        out = torch.empty(9, 21)
        clt._launch_wxt(xs, w, b, out, tiles(2), "tf32", True)
        runs.append(out)
    assert torch.equal(runs[0], runs[1])
    one = torch.empty(9, 21)
    clt._launch_wxt(xs, w, b, one, tiles(1), "tf32", True)
    ref, _ = reference(xs, w, b, True)
    assert rel_err(runs[0], ref) <= tolerance(torch.float32, "high")
    assert rel_err(one, ref) <= tolerance(torch.float32, "high")
    assert rel_err(runs[0], one) <= REORDERED_SUMS


def test_wxt_saturates_and_keeps_non_finite_where_eager_has_them():
    torch.manual_seed(11)
    xs = [aligned(6, 32, scale=1e3), aligned(6, 20, scale=1e3)]
    xs[0][2, 5] = float("inf")
    xs[1][4, 3] = float("nan")
    w, b = aligned(18, 52, scale=0.3), torch.randn(18)
    out = torch.empty(6, 18)
    clt._launch_wxt(xs, w, b, out, tiles(2), "tf32", True)
    _, eager = reference(xs, w, b, True)
    assert torch.equal(out.isnan(), eager.isnan())
    finite = eager.isfinite()
    assert out[finite].abs().max() <= 1
    assert torch.equal(out[eager.abs() == 1], eager[eager.abs() == 1])  # exact +-1 saturation


@pytest.mark.parametrize("dtype", [torch.float16])  # bf16: tests/test_gpu.py (the interpreter's bf16 tl.dot
def test_wxt_half_precision(dtype):                   # multiplies the raw bits: errors of 1e10 in Triton 3.9)
    torch.manual_seed(5)
    xs = [aligned(10, 24, dtype), aligned(10, 19, dtype)]
    w, b = aligned(27, 43, dtype, scale=0.15), torch.randn(27).to(dtype)
    out = torch.empty(10, 27, dtype=dtype)
    clt._launch_wxt(xs, w, b, out, tiles(2), "ieee", True)
    ref, _ = reference([x.float() for x in xs], w.float(), b.float(), True)
    assert rel_err(out, ref) <= tolerance(dtype)


def test_runner_takes_the_pointer_kernel_where_tma_cannot_read():
    """A WXT config on operands TMA cannot address (CPU tensors here; on a GPU: rows not
    16-byte aligned, or a cat operand starting off a 16-byte column of W) runs the pointer
    kernel with the same tiles instead of failing."""
    torch.manual_seed(3)
    xs = [torch.randn(5, 37), torch.randn(5, 23)]
    w = torch.randn(29, 60) / 60 ** 0.5
    out = torch.empty(5, 29)
    clt.runner(xs, w, None, "tf32", out)(tiles(2))
    ref, _ = reference(xs, w, None, True)
    assert rel_err(out, ref) <= tolerance(torch.float32, "high")


def test_wxt_configs_are_in_the_cell_space_only():
    """The cell's space has the WXT tiles on Hopper-class profiles at TF32 and not at 3xTF32;
    the eval kernel of linear_bn_gelu_relu never gets them."""
    import fusion_backend.patterns.linear_bn_gelu_relu as lbgr

    profile = profile_named("h100-sxm")
    assert any(c.get("WXT") for c in clt.cell_space(profile, torch.float32, "tf32"))
    assert not any(c.get("WXT") for c in clt.cell_space(profile, torch.float32, "tf32x3"))
    assert not any(c.get("WXT") for c in lbgr.eval_space(profile, torch.float32, "tf32"))


@pytest.mark.parametrize("split_k", [1, 2])
def test_hopper_code_feeds_w_to_the_mma_from_shared_memory(split_k):
    """Compiled for sm_90 here (no GPU needed): W and x go from their TMA buffers straight into
    the MMA (both operands in shared memory). Masking W's K tail in registers instead (the
    first version) gave wrong tiles on the H100 for some stage counts (rel. error 0.1-0.2 at
    37x(100+76)->75); each segment's own descriptor of W zero-fills the tail. With split-K,
    every thread's partial is stored before one thread's acquire-release on the counter."""
    from test_presplit_3xtf32 import compile_for_hopper

    bm, bn, bk = 64, 64, 32
    sig = {**{f"w{i}": f"tensordesc<fp32[{bn}, {bk}]>" for i in range(4)},
           **{f"x{i}": f"tensordesc<fp32[{bm}, {bk}]>" for i in range(4)},
           "b_ptr": "*fp32", "out_ptr": "*fp32", "part_ptr": "*fp32", "count_ptr": "*i32",
           **{n: "i32" for n in ("M", "N", "K0", "K1", "K2", "K3", "stride_om", "stride_on")}}
    const = dict(NUM_SEGMENTS=2, HAS_BIAS=True, APPLY_TANH=True, PRECISION="tf32", NUM_STAGES=3, SPLIT_K=split_k,
                 BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=4,
                 w2=None, w3=None, x2=None, x3=None)  # the unused segments' slots, as the launcher pads them
    ttgir, ptx = compile_for_hopper("wxt", sig, const)
    dots = [line for line in ttgir.splitlines() if "ttng.warp_group_dot " in line]
    assert len(dots) == 2, dots  # one per segment
    for line in dots:
        a_type, b_type = line.split(" : ")[-1].split(" -> ")[0].split(" * ")
        assert a_type.startswith("!ttg.memdesc<64x32xf32") and b_type.startswith("!ttg.memdesc<32x64xf32"), line
    if split_k > 1:
        lines = [line.strip() for line in ptx.splitlines()]
        atom = next(i for i, line in enumerate(lines) if "atom.global.gpu.acq_rel.add" in line)
        assert "bar.sync" in " ".join(lines[atom - 12:atom]), lines[atom - 12:atom + 1]
