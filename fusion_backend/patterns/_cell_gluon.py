"""The RNN cell's fp32 "highest" kernel (3xTF32, out^T = W x^T) in Gluon, for Hopper (sm_90).

Same math as `cat_linear_tanh._cat_gemm_tanh_presplit_kernel` (W split in registers, the cat
operands pre-split and brought in by TMA, the head product started fresh at each K step and
added to an fp32 sum), but with the waits for the tensor cores placed by hand. Triton's `tl`
pipeliner waits for every MMA of a K step twice per step (the remainder products chain inside
the step, the head product is added right away); here the step issues the head product, then
the two remainder products into their chain, and waits only until the head product is done
(`warpgroup_mma_wait(2)`: MMAs complete in issue order), so the remainder products keep the
tensor cores busy while the head is added and the next W tile is split. H100, KernelBench
cell (`python benchmarks/presplit_3xtf32.py`, its "gluon" rows; two runs): i2h 2.55-2.68 ms
vs 2.71-2.83 (`tl`), h2o 0.62-0.63 vs 0.65-0.66, the same error; the whole cell 2.96-3.35 ms
over five runs (3.35-3.56 with the `tl` kernel).

Gluon kernels do not run under the interpreter: on CPU the `tl` kernels are what is tested,
this one is compiled for sm_90 there (tests/test_presplit_3xtf32.py) and run on the GPU tests.
"""
from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from fusion_backend.triton_lib import finish_3xtf32, store_cell_tile, tf32_round

from ._common import cached_descriptor, cdiv, tf32_split_all

# the TMA load was renamed in Triton 3.8 (3.9 keeps the old name as a stub that raises)
_tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
MAX_SEGMENTS = 4


@gluon.constexpr_function
def _acc_layout(rows, cols, num_warps, instr_k=8):
    """wgmma accumulator layout of a (rows x cols) tile: warps stacked along the rows (16 a
    warp), the widest instruction N that divides the columns; instr_k: the instruction's K,
    8 for TF32 operands, 16 for bf16 / fp16."""
    warps_m = num_warps
    while warps_m > 1 and rows < 16 * warps_m:
        warps_m //= 2
    warps_n = num_warps // warps_m
    n = 256
    while n > cols // warps_n or cols % n != 0:
        n -= 8
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps_m, warps_n], instr_shape=[16, n, instr_k])


@gluon.jit
def mma_3xtf32_step(a, b_hi, b_lo, acc, head, small):
    """One K step of 3xTF32 on wgmma: `a` in registers (split here), `b` as TF32 head and
    remainder tiles in shared memory. Issues the head product (started fresh: the MMA's own
    accumulation over all of K loses bits), then the two remainder products into their chain,
    and waits only until the head product is done (MMAs complete in issue order: every MMA
    issued before it is done too, so the previous step's stage may be refilled); the two
    remainder products keep the tensor cores busy while the head is added. Returns
    (acc + head, head, small); after the loop wait for `small` (`warpgroup_mma_wait(0)`)."""
    a_hi = tf32_round(a, True)  # Gluon calls `tl` elementwise functions as they are
    a_lo = a - a_hi
    head = warpgroup_mma(a_hi, b_hi, head, use_acc=False, is_async=True)
    small = warpgroup_mma(a_lo, b_hi, small, is_async=True)
    small = warpgroup_mma(a_hi, b_lo, small, is_async=True)
    # `small` passes through untouched (only the next MMA reads it); a_hi / a_lo stay live
    head, small, a_hi, a_lo = warpgroup_mma_wait(2, deps=(head, small, a_hi, a_lo))
    return acc + head, head, small


@gluon.jit
def stage_ring(NUM_STAGES: gl.constexpr, a_desc, hi_desc, lo_desc):
    """The K loop's ring of shared-memory stages for `mma_3xtf32_step`: per stage an A tile,
    a B head and a B remainder tile (shapes and layouts of the three TMA descriptors) and one
    mbarrier (initialized) that the stage's TMA loads complete."""
    a_bufs = gl.allocate_shared_memory(gl.float32, [NUM_STAGES] + a_desc.block_type.shape, a_desc.layout)
    hi_bufs = gl.allocate_shared_memory(gl.float32, [NUM_STAGES] + hi_desc.block_type.shape, hi_desc.layout)
    lo_bufs = gl.allocate_shared_memory(gl.float32, [NUM_STAGES] + lo_desc.block_type.shape, lo_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(bars.index(i), count=1)
    return a_bufs, hi_bufs, lo_bufs, bars


@gluon.jit
def drain_3xtf32(acc, small, bars, NUM_STAGES: gl.constexpr):
    """After the K loop: wait for the last remainder products, release the ring's mbarriers,
    and add the remainder sum to the head sum as the `tl` kernels do (`finish_3xtf32`: NaN that
    arose in the remainders only is dropped, the head products carry the inputs' inf / NaN)."""
    small = warpgroup_mma_wait(0, deps=(small,))
    for i in gl.static_range(NUM_STAGES):
        mbarrier.invalidate(bars.index(i))
    return finish_3xtf32(acc, small)


@gluon.jit
def _issue_loads(j, total, e0, e1, e2, w0, w1, w2, w3, h0, l0, h1, l1, h2, l2, h3, l3, w_bufs, h_bufs, l_bufs,
                 bars, n0, m0, NUM_STAGES: gl.constexpr, NUM_SEGMENTS: gl.constexpr):
    """TMA loads of K step j of all segments (segment s ends at step e_s) into stage j %
    NUM_STAGES; nothing past the last step. Returns j + 1."""
    BK: gl.constexpr = w0.block_type.shape[1]
    pred = j < total
    st = j % NUM_STAGES
    bar = bars.index(st)
    mbarrier.expect(bar, w0.block_type.nbytes + 2 * h0.block_type.nbytes, pred=pred)
    # the conditions are compile-time True for the last segment: the slots past it (None) are never compiled
    if NUM_SEGMENTS == 1 or j < e0:
        _tma_load(w0, [n0, j * BK], bar, w_bufs.index(st), pred)
        _tma_load(h0, [m0, j * BK], bar, h_bufs.index(st), pred)
        _tma_load(l0, [m0, j * BK], bar, l_bufs.index(st), pred)
    elif NUM_SEGMENTS == 2 or j < e1:
        _tma_load(w1, [n0, (j - e0) * BK], bar, w_bufs.index(st), pred)
        _tma_load(h1, [m0, (j - e0) * BK], bar, h_bufs.index(st), pred)
        _tma_load(l1, [m0, (j - e0) * BK], bar, l_bufs.index(st), pred)
    elif NUM_SEGMENTS == 3 or j < e2:
        _tma_load(w2, [n0, (j - e1) * BK], bar, w_bufs.index(st), pred)
        _tma_load(h2, [m0, (j - e1) * BK], bar, h_bufs.index(st), pred)
        _tma_load(l2, [m0, (j - e1) * BK], bar, l_bufs.index(st), pred)
    else:
        _tma_load(w3, [n0, (j - e2) * BK], bar, w_bufs.index(st), pred)
        _tma_load(h3, [m0, (j - e2) * BK], bar, h_bufs.index(st), pred)
        _tma_load(l3, [m0, (j - e2) * BK], bar, l_bufs.index(st), pred)
    return j + 1


@gluon.jit
def _cell_3xtf32_kernel(w0, w1, w2, w3, h0, l0, h1, l1, h2, l2, h3, l3, b_ptr, out_ptr, M, N, K0, K1, K2, K3,
                        stride_om, stride_on, NUM_SEGMENTS: gl.constexpr, HAS_BIAS: gl.constexpr,
                        APPLY_TANH: gl.constexpr, NUM_STAGES: gl.constexpr, num_warps: gl.constexpr):
    """out = [tanh](cat(x_s) W^T + b) as out^T tiles (BN rows of W x BM batch rows); w_s: TMA
    descriptors of W's column range of cat operand s, h_s / l_s: of its TF32 head and remainder.
    One pipeline over the K steps of all segments (their tails read zeros from TMA)."""
    BN: gl.constexpr = w0.block_type.shape[0]
    BK: gl.constexpr = w0.block_type.shape[1]
    BM: gl.constexpr = h0.block_type.shape[0]
    acc_layout: gl.constexpr = _acc_layout(BN, BM, num_warps)
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=1)

    w_bufs, h_bufs, l_bufs, bars = stage_ring(NUM_STAGES, w0, h0, l0)

    # the batch tiles of one W tile are neighbours in launch order: W is read from HBM once
    num_m = gl.cdiv(M, BM)
    m0 = (gl.program_id(0) % num_m) * BM
    n0 = (gl.program_id(0) // num_m) * BN
    e0 = gl.cdiv(K0, BK)
    e1 = e0 + gl.cdiv(K1, BK)
    e2 = e1 + gl.cdiv(K2, BK)
    total = e2 + gl.cdiv(K3, BK)

    j = 0
    for _ in gl.static_range(NUM_STAGES - 1):
        j = _issue_loads(j, total, e0, e1, e2, w0, w1, w2, w3, h0, l0, h1, l1, h2, l2, h3, l3, w_bufs, h_bufs,
                         l_bufs, bars, n0, m0, NUM_STAGES, NUM_SEGMENTS)
    acc = gl.zeros([BN, BM], gl.float32, acc_layout)
    small = gl.zeros([BN, BM], gl.float32, acc_layout)
    head = gl.zeros([BN, BM], gl.float32, acc_layout)
    for c in range(total):
        st = c % NUM_STAGES
        mbarrier.wait(bars.index(st), (c // NUM_STAGES) & 1)
        acc, head, small = mma_3xtf32_step(w_bufs.index(st).load(a_layout), h_bufs.index(st).permute((1, 0)),
                                           l_bufs.index(st).permute((1, 0)), acc, head, small)
        # step c - 1 is done with its stage: load step c - 1 + NUM_STAGES into it
        j = _issue_loads(j, total, e0, e1, e2, w0, w1, w2, w3, h0, l0, h1, l1, h2, l2, h3, l3, w_bufs, h_bufs,
                         l_bufs, bars, n0, m0, NUM_STAGES, NUM_SEGMENTS)
    acc = drain_3xtf32(acc, small, bars, NUM_STAGES)
    store_cell_tile(acc, b_ptr, out_ptr, n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, acc_layout)),
                    m0 + gl.arange(0, BM, layout=gl.SliceLayout(0, acc_layout)), M, N, stride_om, stride_on,
                    HAS_BIAS, APPLY_TANH)


_GL_DTYPES = {torch.float32: gl.float32, torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


def _descriptor(t, rows, cols):
    """Host TMA descriptor of (rows x cols) tiles of the 2-D tensor `t`, in the NVMMA shared
    layout wgmma reads (built once per address and shape: `_common.cached_descriptor`)."""
    return cached_descriptor(_make_descriptor, t, rows, cols)


def _make_descriptor(t, rows, cols):
    layout = gl.NVMMASharedLayout.get_default_for([rows, cols], _GL_DTYPES[t.dtype])
    return TensorDescriptor.from_tensor(t, [rows, cols], layout)


def launch(xs, weight, bias, out, config, apply_tanh=True):
    """out = [tanh](cat(xs) W^T + b) in 3xTF32 by `_cell_3xtf32_kernel`: W TMA-ready with every
    cat operand but the last starting on a 16-byte boundary (as `cat_linear_tanh.runner` checks);
    the cat operands are split once per call (`tf32_split_all`, one launch), never concatenated."""
    M, N = out.shape
    BM, BN, BK = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    w_descs, start = [], 0
    for x in xs:
        w_descs.append(_descriptor(weight[:, start:start + x.shape[1]], BN, BK))
        start += x.shape[1]
    x_descs = [_descriptor(part, BM, BK) for pair in tf32_split_all(xs) for part in pair]
    pad = MAX_SEGMENTS - len(xs)  # None past the last segment: nothing to encode at launch
    widths = [x.shape[1] for x in xs] + [0] * pad
    _cell_3xtf32_kernel[(cdiv(M, BM) * cdiv(N, BN),)](
        *w_descs, *[None] * pad, *x_descs, *[None, None] * pad, bias if bias is not None else weight, out,
        M, N, *widths, out.stride(0), out.stride(1), NUM_SEGMENTS=len(xs), HAS_BIAS=bias is not None,
        APPLY_TANH=apply_tanh, NUM_STAGES=config["num_stages"], num_warps=config["num_warps"],
        # Triton 3.6's Gluon does not take a precision literal in warpgroup_mma
        default_dot_input_precision="tf32")
    return out
