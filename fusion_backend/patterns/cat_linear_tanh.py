"""Pattern `cat_linear_tanh`: tanh(Linear(cat((x, h, ...), dim=-1))), the vanilla RNN cell.

The concatenated tensor is never built for the kernel: it walks the reduction dimension
across the cat operands, each read from its own pointer and strides (any widths), against the
matching column range of W as stored, then applies bias and an overflow-free tanh. (Where W
requires grad, the op also returns the cat, saved for dW as eager saves its own.)
"""
from __future__ import annotations

import math
import operator
from typing import List, Optional

import torch
import triton
import triton.language as tl
from torch import fx

from fusion_backend import autotune, config_spaces, triton_lib
from fusion_backend.normalize import CAT, LINEAR, TANH, example_value, is_op
from fusion_backend.registry import Pattern, register_pattern
from fusion_backend.triton_lib import (dot_3xtf32, finish_3xtf32, gemm_segment, opaque_zeros, ptx_cvt,
                                       store_cell_tile, tanh, tile_ids)

from . import _checks
from ._common import (INLINE_MAX_FLOP, Replay, backward_will_run, cast_to, cdiv, compute_dtype, define_inline_op,
                      define_op, descriptor, gemm_flop, gluon_code, grad_mode_problem, hint, inline_meta, launch,
                      linear_shape_problem, meta_kwargs, only_user, other_uses, saved_input_written, size_text, space,
                      static_shapes, tensor_problem, tf32_split_all, tma_ready, tuned_unfused_reason, written_inside)

NAME = "cat_linear_tanh"
MAX_SEGMENTS = 4

@triton.jit
def _cat_gemm_tanh_kernel(
        a0_ptr, a1_ptr, a2_ptr, a3_ptr, w_ptr, b_ptr, out_ptr, M, N, K0, K1, K2, K3,
        s0m, s0k, s1m, s1k, s2m, s2k, s3m, s3k, stride_wn, stride_wk, stride_om, stride_on,
        NUM_SEGMENTS: tl.constexpr, HAS_BIAS: tl.constexpr, APPLY_TANH: tl.constexpr, PRECISION: tl.constexpr,
        EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr):
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows, cols = offs_m % M, offs_n % N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # segment s multiplies W[:, K0 + ... + K(s-1) : ... + Ks]
    acc = gemm_segment(acc, a0_ptr, s0m, s0k, w_ptr, stride_wn, stride_wk, rows, cols, K0, BLOCK_K, PRECISION, EVEN_K)
    if NUM_SEGMENTS > 1:
        acc = gemm_segment(acc, a1_ptr, s1m, s1k, w_ptr + K0 * stride_wk, stride_wn, stride_wk,
                           rows, cols, K1, BLOCK_K, PRECISION, EVEN_K)
    if NUM_SEGMENTS > 2:
        acc = gemm_segment(acc, a2_ptr, s2m, s2k, w_ptr + (K0 + K1) * stride_wk, stride_wn, stride_wk,
                           rows, cols, K2, BLOCK_K, PRECISION, EVEN_K)
    if NUM_SEGMENTS > 3:
        acc = gemm_segment(acc, a3_ptr, s3m, s3k, w_ptr + (K0 + K1 + K2) * stride_wk, stride_wn, stride_wk,
                           rows, cols, K3, BLOCK_K, PRECISION, EVEN_K)
    n_ok = offs_n < N
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if APPLY_TANH:
        acc = tanh(acc)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & n_ok[None, :])


@triton.jit
def _wxt_segment(acc, small, seed, w_desc, xhi_desc, xlo_desc, m0, n0, K_seg, NUM_STAGES: tl.constexpr,
                 BLOCK_K: tl.constexpr, PTX: tl.constexpr):
    """acc (out^T tile) += W_seg[n0:, :] @ x_seg[m0:, :]^T in 3xTF32, x_seg given pre-split.
    W_seg is the segment's own column range of W (`_segment_descriptors`): the K tail reads
    zeros from TMA, not the next operand's columns, so no tile needs masking in registers."""
    for k in tl.range(0, tl.cdiv(K_seg, BLOCK_K), num_stages=NUM_STAGES):
        w = w_desc.load([n0, k * BLOCK_K])
        x_hi = xhi_desc.load([m0, k * BLOCK_K])
        x_lo = xlo_desc.load([m0, k * BLOCK_K])
        acc, small = dot_3xtf32(w, x_hi.T, x_lo.T, acc, small, seed, PTX)
    return acc, small


@triton.jit
def _cat_gemm_tanh_presplit_kernel(
        w0, w1, w2, w3, h0, l0, h1, l1, h2, l2, h3, l3, b_ptr, out_ptr, M, N, K0, K1, K2, K3, stride_om, stride_on,
        NUM_SEGMENTS: tl.constexpr, HAS_BIAS: tl.constexpr, APPLY_TANH: tl.constexpr, NUM_STAGES: tl.constexpr,
        PTX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr):
    """fp32 "highest" for small batches, computed as out^T = W x^T: W, by far the larger
    operand, is the MMA's A operand and is split into TF32 head and remainder in registers;
    the cat operands were split once per call (small) and come in by TMA. The batch tiles of
    one W tile are neighbours in the launch order, so W is read from HBM once."""
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = tl.program_id(0) % num_m
    pid_n = tl.program_id(0) // num_m
    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    small = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    seed = opaque_zeros(acc, K0 + K1 + K2 + K3)  # not N: Triton specializes an int arg equal to 1
    acc, small = _wxt_segment(acc, small, seed, w0, h0, l0, m0, n0, K0, NUM_STAGES, BLOCK_K, PTX)
    if NUM_SEGMENTS > 1:
        acc, small = _wxt_segment(acc, small, seed, w1, h1, l1, m0, n0, K1, NUM_STAGES, BLOCK_K, PTX)
    if NUM_SEGMENTS > 2:
        acc, small = _wxt_segment(acc, small, seed, w2, h2, l2, m0, n0, K2, NUM_STAGES, BLOCK_K, PTX)
    if NUM_SEGMENTS > 3:
        acc, small = _wxt_segment(acc, small, seed, w3, h3, l3, m0, n0, K3, NUM_STAGES, BLOCK_K, PTX)
    store_cell_tile(finish_3xtf32(acc, small), b_ptr, out_ptr, n0 + tl.arange(0, BLOCK_N),
                     m0 + tl.arange(0, BLOCK_M), M, N, stride_om, stride_on, HAS_BIAS, APPLY_TANH)


@triton.jit
def _wxt_split_segment(acc, w_desc, x_desc, m0, n0, K_seg, split, PRECISION: tl.constexpr,
                       NUM_STAGES: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc (out^T tile) += W_seg[n0:, blocks] @ x_seg[m0:, blocks]^T over this split's share
    of the segment's K blocks (W_seg: the segment's columns of W, as in `_wxt_segment`)."""
    num_k = tl.cdiv(K_seg, BLOCK_K)
    for k in tl.range(split * num_k // SPLIT_K, (split + 1) * num_k // SPLIT_K, num_stages=NUM_STAGES):
        w = w_desc.load([n0, k * BLOCK_K])
        x = x_desc.load([m0, k * BLOCK_K])
        acc = tl.dot(w, x.T, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _cat_gemm_tanh_wxt_kernel(
        w0, w1, w2, w3, x0, x1, x2, x3, b_ptr, out_ptr, part_ptr, count_ptr, M, N, K0, K1, K2, K3, stride_om,
        stride_on, NUM_SEGMENTS: tl.constexpr, HAS_BIAS: tl.constexpr, APPLY_TANH: tl.constexpr,
        PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Small batches (the cell's M is 8..256 while K and N are large) at TF32/fp16/bf16: the
    GEMM is bound by reading W once from HBM. Computed as out^T = W x^T so W is the MMA's A
    operand, both brought in by TMA; a tile spans the batch, so W tiles are read once.
    SPLIT_K > 1: the K blocks of every segment are shared among SPLIT_K programs per tile
    (N / BLOCK_N tiles alone would leave multiprocessors idle); each stores its fp32 partial,
    and the last to arrive at the tile's counter sums the partials in split order (the
    result does not depend on which program finishes last) and applies bias and tanh."""
    num_m = tl.cdiv(M, BLOCK_M)
    tiles = num_m * tl.cdiv(N, BLOCK_N)
    tile = tl.program_id(0) % tiles
    split = tl.program_id(0) // tiles
    m0 = (tile % num_m) * BLOCK_M
    n0 = (tile // num_m) * BLOCK_N
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc = _wxt_split_segment(acc, w0, x0, m0, n0, K0, split, PRECISION, NUM_STAGES, SPLIT_K, BLOCK_K)
    if NUM_SEGMENTS > 1:
        acc = _wxt_split_segment(acc, w1, x1, m0, n0, K1, split, PRECISION, NUM_STAGES, SPLIT_K, BLOCK_K)
    if NUM_SEGMENTS > 2:
        acc = _wxt_split_segment(acc, w2, x2, m0, n0, K2, split, PRECISION, NUM_STAGES, SPLIT_K, BLOCK_K)
    if NUM_SEGMENTS > 3:
        acc = _wxt_split_segment(acc, w3, x3, m0, n0, K3, split, PRECISION, NUM_STAGES, SPLIT_K, BLOCK_K)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    if SPLIT_K == 1:
        store_cell_tile(acc, b_ptr, out_ptr, offs_n, offs_m, M, N, stride_om, stride_on, HAS_BIAS, APPLY_TANH)
    else:
        # partials: (SPLIT_K, tiles, BLOCK_N, BLOCK_M) fp32, one dense block per program
        block = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
        tile_size = BLOCK_N * BLOCK_M
        tl.store(part_ptr + (split * tiles + tile).to(tl.int64) * tile_size + block, acc)
        tl.debug_barrier()  # every thread's partial is written before the release below
        arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                total += tl.load(part_ptr + (s * tiles + tile).to(tl.int64) * tile_size + block, cache_modifier=".cg")
            store_cell_tile(total, b_ptr, out_ptr, offs_n, offs_m, M, N, stride_om, stride_on, HAS_BIAS, APPLY_TANH)


def _segment_descriptors(weight, widths, rows, cols):
    """TMA descriptors of each cat operand's column range of W (its start must be 16-byte
    aligned), padded to MAX_SEGMENTS with None: the kernels never touch the slots past
    NUM_SEGMENTS, and a descriptor there would still be encoded at every launch."""
    descs, start = [], 0
    for width in widths:
        descs.append(descriptor(weight[:, start:start + width], rows, cols))
        start += width
    return descs + [None] * (MAX_SEGMENTS - len(widths))


def _launch_wxt(xs, weight, bias, out, config, precision, apply_tanh=True):
    """out = tanh(cat(xs) W^T + b) by `_cat_gemm_tanh_wxt_kernel` (all of W and xs TMA-ready)."""
    M, N = out.shape
    BM, BN, BK, split_k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"], config["SPLIT_K"]
    pad = MAX_SEGMENTS - len(xs)
    descs = [descriptor(x, BM, BK) for x in xs] + [None] * pad
    widths = [x.shape[1] for x in xs] + [0] * pad
    tiles = cdiv(M, BM) * cdiv(N, BN)
    if split_k > 1:
        partials = torch.empty((split_k, tiles, BN, BM), device=out.device, dtype=torch.float32)
        counters = torch.zeros(tiles, device=out.device, dtype=torch.int32)
    else:
        partials = counters = out
    meta = {k: v for k, v in config.items() if k not in ("TMA", "WXT")}
    _cat_gemm_tanh_wxt_kernel[(tiles * split_k,)](
        *_segment_descriptors(weight, widths[:len(xs)], BN, BK), *descs, bias if bias is not None else weight, out,
        partials, counters, M, N, *widths, out.stride(0), out.stride(1), NUM_SEGMENTS=len(xs),
        HAS_BIAS=bias is not None, APPLY_TANH=apply_tanh, PRECISION=precision, NUM_STAGES=config["num_stages"],
        **meta)
    return out


def _launch_gluon(xs, weight, bias, out, config, apply_tanh=True):
    """`_launch_presplit`'s kernel written in Gluon (sm_90; raises where Gluon is missing, and
    the tuner then does not choose it)."""
    from . import _cell_gluon

    return _cell_gluon.launch(xs, weight, bias, out, config, apply_tanh)


def _launch_presplit(xs, weight, bias, out, config, apply_tanh=True):
    """out = tanh(cat(xs) W^T + b) in 3xTF32 with each cat operand split (not concatenated)."""
    M, N = out.shape
    BM, BN, BK = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    pad = MAX_SEGMENTS - len(xs)
    descs = [descriptor(part, BM, BK) for pair in tf32_split_all(xs) for part in pair] + [None, None] * pad
    widths = [x.shape[1] for x in xs] + [0] * pad
    meta = {k: v for k, v in config.items() if k not in ("TMA", "PRESPLIT")}
    _cat_gemm_tanh_presplit_kernel[(cdiv(M, BM) * cdiv(N, BN),)](
        *_segment_descriptors(weight, widths[:len(xs)], BN, BK), *descs, bias if bias is not None else weight, out,
        M, N, *widths, out.stride(0), out.stride(1), NUM_SEGMENTS=len(xs), HAS_BIAS=bias is not None, APPLY_TANH=apply_tanh,
        NUM_STAGES=config["num_stages"], PTX=ptx_cvt(weight), **meta)
    return out


# triton_lib whole: the kernels call its helpers (the GEMM main loop, tanh, TF32 rounding)
_SRC = autotune.source_hash(_cat_gemm_tanh_kernel, _cat_gemm_tanh_presplit_kernel, _wxt_segment, triton_lib,
                            _cat_gemm_tanh_wxt_kernel, _wxt_split_segment, _segment_descriptors,
                            *gluon_code("_cell_gluon", "_cell_3xtf32_kernel", "_issue_loads", "launch",
                                        "mma_3xtf32_step", "stage_ring", "drain_3xtf32"))


def _unfused(xs, weight, bias):
    """What Inductor runs: the cat, a cuBLAS addmm, one tanh pass."""
    return torch.tanh_(torch.nn.functional.linear(torch.cat(xs, 1), weight, bias))


def runner(xs, weight, bias, precision, out, apply_tanh=True):
    """run_fused(kwargs): one config's launch of the cell kernel into `out`: the pre-split
    3xTF32 kernel for a PRESPLIT config where W and the operand widths allow TMA, else the
    pointer kernel with the same tiles. apply_tanh=False: the plain Linear (cell_h2o)."""
    widths = [t.shape[1] for t in xs]
    # TMA reads W from 16-byte aligned columns: every cat operand but the last must start there
    starts_aligned = all(w * weight.element_size() % 16 == 0 for w in widths[:-1])
    presplit_ok = tma_ready(weight) and starts_aligned
    wxt_ok = presplit_ok and all(tma_ready(x) for x in xs)

    def run_fused(config):
        if config.get("PRESPLIT"):
            if precision == "tf32x3" and presplit_ok:
                if config.get("GLUON"):
                    return _launch_gluon(xs, weight, bias, out, config, apply_tanh)
                return _launch_presplit(xs, weight, bias, out, config, apply_tanh)
            config = {k: v for k, v in config.items() if k not in ("TMA", "PRESPLIT", "GLUON")}
        if config.get("WXT"):
            if precision != "tf32x3" and wxt_ok:
                return _launch_wxt(xs, weight, bias, out, config, precision, apply_tanh)
            config = {k: v for k, v in config.items() if k not in ("TMA", "WXT", "SPLIT_K")}
        return _launch_pointer(_cat_gemm_tanh_kernel, xs, weight, bias, out, config, precision, apply_tanh)

    return run_fused


def _launch_pointer(kernel, xs, weight, bias, out, config, precision, apply_tanh):
    """The pointer cell kernel (or its `wrap_triton` wrapper, from the inline ops) into `out`:
    each cat operand read through its own pointer and strides, W as stored."""
    M, N = out.shape
    segs = list(xs) + [xs[0]] * (MAX_SEGMENTS - len(xs))
    widths = [t.shape[1] for t in xs] + [0] * (MAX_SEGMENTS - len(xs))
    strides = [s for t in segs for s in t.stride()]
    grid = (cdiv(M, config["BLOCK_M"]) * cdiv(N, config["BLOCK_N"]),)
    kernel[grid](
        *segs, weight, bias if bias is not None else weight, out, M, N, *widths, *strides,
        weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
        NUM_SEGMENTS=len(xs), HAS_BIAS=bias is not None, APPLY_TANH=apply_tanh, PRECISION=precision,
        EVEN_K=all(w % config["BLOCK_K"] == 0 for w in widths), **config)
    return out


def _forward(xs, weight, bias, precision, autotune_on, budget, apply_tanh, name):
    _checks.cat_linear(name, xs, weight, bias, precision, MAX_SEGMENTS if apply_tanh else 1)
    x0 = xs[0]
    M, N = x0.shape[0], weight.shape[0]
    out = torch.empty((M, N), device=x0.device, dtype=x0.dtype)
    if M == 0:
        return out
    profile = _checks.profile(name, x0)

    def run_unfused():
        if apply_tanh:
            return _unfused(xs, weight, bias)
        return torch.nn.functional.linear(x0, weight, bias)

    key = autotune.make_key(name, profile.tuning_id, x0.dtype, precision, M,
                            K="+".join(str(t.shape[1]) for t in xs), N=N)
    return launch(key, ctx_args=(profile, autotune_on, budget, x0.device),
                  space=lambda: cell_space(profile, x0.dtype, precision, gemm_flop(M, N, sum(t.shape[1] for t in xs))),
                  m=M,
                  run_fused=runner(xs, weight, bias, precision, out, apply_tanh),
                  run_unfused=run_unfused, run_reference=run_unfused, src_hash=_SRC,
                  replay=Replay(xs, out, (weight, bias),
                                lambda ins, o, kw: runner(ins, weight, bias, precision, o, apply_tanh)(kw)))


def forward(xs: List[torch.Tensor], weight, bias, precision, autotune_on=True, budget=30.0):
    return _forward(xs, weight, bias, precision, autotune_on, budget, True, NAME)


def linear_forward(x, weight, bias, precision, autotune_on=True, budget=30.0):
    """x W^T + b with the cell's kernels (no tanh): the h2o Linear after a fused cell."""
    return _forward([x], weight, bias, precision, autotune_on, budget, False, "cell_h2o")


def cell_space(profile, dtype, precision, flop=math.inf):
    """The GEMM space without the eval kernel's TMA tiles: the cell takes the pre-split 3xTF32
    tiles (`tl` and, on sm_90, GLUON) and the W x^T tiles (WXT); for a GEMM of at most
    `_common.INLINE_MAX_FLOP` FLOPs only the tiles an inline op can launch, SMALL ones included."""
    return [c for c in space(profile, config_spaces.GEMM, dtype, precision=precision,
                             small=flop <= INLINE_MAX_FLOP)
            if not c.get("TMA") or c.get("PRESPLIT") or c.get("WXT")]


def _fake(xs, weight, bias, precision, autotune_on, budget):
    return xs[0].new_empty((xs[0].shape[0], weight.shape[0]))


def _setup(ctx, inputs, output, for_dw=None):
    """Saves W, the output and what dW reads: `for_dw` (the saving op's copy of the operands)
    or else, where W requires grad, the operands themselves (the op called directly: the
    rewrite uses `cat_linear_tanh_saving`, below, there)."""
    xs, weight, bias = inputs[:3]
    ctx.widths = [x.shape[1] for x in xs]
    ctx.has_bias = bias is not None
    if for_dw is None:
        for_dw = xs if weight.requires_grad else ()
    ctx.save_for_backward(weight, output, *for_dw)


def _backward(ctx, grad_out):
    """(grads of xs, W, b): dx per cat operand (the cat is not built), dW from what `_setup`
    saved for it (the operands, or their copy; nothing: W needs no grad)."""
    weight, out, *xs = ctx.saved_tensors
    dz = grad_out * (1 - out * out)  # tanh' from the saved output
    grads_x, start = [], 0
    for width in ctx.widths:
        grads_x.append(dz @ weight[:, start:start + width])
        start += width
    grad_w = torch.cat([dz.t() @ x for x in xs], 1) if xs else None
    db = dz.sum(0) if ctx.has_bias else None
    return grads_x, grad_w, db, None, None, None


# Where W requires grad the op also returns the cat of its operands, which dW reads: eager's
# cat is a copy, so a caller may write to an operand after the forward (`h.copy_(new_h.detach())`
# into a persistent hidden buffer) and the backward still sees the values of the forward.
# Saving the operands themselves gave autograd's "modified by an inplace operation" error there,
# and a silently wrong dW (35% off) for a write through `.data`. The copy is an output of the op
# because one made in `setup_context` is traced as a plain cat, which AOT's partitioner moves
# into the backward, computed from the operands after the write.

def _saving_forward(xs, weight, bias, precision, autotune_on, budget):
    return forward(xs, weight, bias, precision, autotune_on, budget), torch.cat(xs, 1)


def _saving_fake(xs, weight, bias, precision, autotune_on, budget):
    return _fake(xs, weight, bias, precision, autotune_on, budget), torch.cat(xs, 1)


def _setup_saving(ctx, inputs, output):
    _setup(ctx, inputs, output[0], for_dw=output[1:])


def _backward_saving(ctx, grad_out, grad_copy):
    """`_backward`, plus the copy's own gradient passed on to the operands it copies: zeros in a
    plain backward (nothing but dW reads the copy; one add of B x (I+H)), not in a double
    backward of a direct call (create_graph=True: dW = dz^T @ copy depends on the operands
    through the copy; under torch.compile AOTAutograd refuses double backward)."""
    grads_x, *rest = _backward(ctx, grad_out)
    if grad_copy is not None:
        grads_x = [g + c for g, c in zip(grads_x, grad_copy.split(ctx.widths, 1))]
    return (grads_x, *rest)


_SCHEMA_ARGS = "(Tensor[] xs, Tensor weight, Tensor? bias, str precision, bool autotune_on, float budget)"
cat_linear_tanh = define_op("cat_linear_tanh", _SCHEMA_ARGS + " -> Tensor", forward, _fake, _backward, _setup)
cat_linear_tanh_saving = define_op("cat_linear_tanh_saving", _SCHEMA_ARGS + " -> (Tensor, Tensor)", _saving_forward,
                                   _saving_fake, _backward_saving, _setup_saving)


def inline_forward(xs, weight, bias, precision, meta, apply_tanh=True):
    """The pointer kernel with its config fixed at compile time (`_common.inline_meta`),
    launched through `wrap_triton`: the body of the inline ops here and in cell_h2o."""
    _checks.cat_linear("cat_linear_tanh_inline" if apply_tanh else "cell_h2o_inline", xs, weight, bias, precision,
                       MAX_SEGMENTS if apply_tanh else 1)
    out = xs[0].new_empty((xs[0].shape[0], weight.shape[0]))
    if xs[0].shape[0] == 0:
        return out
    _checks.profile("cat_linear_tanh_inline" if apply_tanh else "cell_h2o_inline", xs[0])
    return _launch_pointer(torch.library.wrap_triton(_cat_gemm_tanh_kernel), xs, weight, bias, out,
                           meta_kwargs(meta), precision, apply_tanh)


def _cell_inline(xs: List[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor], precision: str,
                 meta: List[int]) -> torch.Tensor:
    return inline_forward(xs, weight, bias, precision, meta)


def _backward_inline(ctx, grad_out):
    return _backward(ctx, grad_out)[:4] + (None,)


cat_linear_tanh_inline = define_inline_op("cat_linear_tanh_inline", _cell_inline, _backward_inline, _setup)
#: the cell ops whose result is the hidden state (SAVING_CELL_OPS: their first output): cell_h2o reads it.
#: No inline op saves a copy: Inductor traces into an inline op, so its cat is a plain one again,
#: which the partitioner recomputes in the backward from the operands (H100: a write between
#: forward and backward raised, or through `.data` gave dW 77% off); such sites take the opaque op
CELL_OPS = (cat_linear_tanh, cat_linear_tanh_inline)
SAVING_CELL_OPS = (cat_linear_tanh_saving,)


class _Match:
    def __init__(self, cat, linear, tanh_node):
        self.cat, self.linear, self.tanh = cat, linear, tanh_node
        self.tensors, self.dim = cat.args
        _, self.weight, self.bias = linear.args


@register_pattern
class CatLinearTanh(Pattern):
    name = NAME

    @staticmethod
    def match(node):
        if not is_op(node, TANH) or len(node.args) != 1:  # (a tanh normalize left as it was)
            return None
        linear = node.args[0]
        if not is_op(linear, LINEAR):
            return None
        cat = linear.args[0]
        if not is_op(cat, CAT):
            return None
        return _Match(cat, linear, node)

    def check(self, m: _Match, ctx) -> Optional[str]:
        problem = self.problem(m, ctx)
        if problem:
            return problem
        tensors = list(m.tensors)
        dtype = example_value(m.linear).dtype  # the inputs', or the autocast dtype
        xs = [ctx.real_tensor(t).to(dtype) for t in tensors]  # autocast's casts, made explicit
        w, b = (None if n is None else ctx.real_tensor(n).to(dtype) for n in (m.weight, m.bias))
        precision = ctx.dot_precision(dtype)
        return tuned_unfused_reason(
            ctx, self._site(m, ctx)["key"],
            lambda: cat_linear_tanh(xs, w, b, precision, True, ctx.options.tune_budget_s),
            lambda: _unfused(xs, w, b), static_shapes=self._inline_shapes(m))

    @staticmethod
    def _inline_shapes(m: _Match) -> bool:
        """Whether the site may launch inline: static shapes (`_common.inline_meta`), and no dW
        to compute (the op that saves the operands' copy for it is opaque: CELL_OPS)."""
        return static_shapes(*m.tensors, m.weight) and not backward_will_run(m.cat, [m.weight])

    @staticmethod
    def problem(m: _Match, ctx) -> Optional[str]:
        """Why this cat -> Linear -> tanh cannot become one fused op (None: it can); shared with
        `rnn_sequence`, which fuses chains of such cells."""
        if not only_user(m.linear, m.tanh):
            return f"Linear output {m.linear.name} has {other_uses(m.linear, m.tanh)}"
        if not only_user(m.cat, m.linear):
            return f"cat result {m.cat.name} has {other_uses(m.cat, m.linear)}"
        problem = grad_mode_problem([m.tanh, m.linear, m.cat])  # (the op runs at the tanh)
        if problem:
            return problem
        tensors = list(m.tensors) if isinstance(m.tensors, (list, tuple)) else None
        if not tensors or not all(isinstance(t, fx.Node) for t in tensors):
            return "cat operands are not a list of tensors"
        if not 1 <= len(tensors) <= MAX_SEGMENTS:
            return f"cat of {len(tensors)} tensors; the kernel takes 1 to {MAX_SEGMENTS}"
        vals = [example_value(t) for t in tensors]
        if any(v is None or v.dim() != 2 for v in vals):
            return "cat operands must be 2-D (batch, features)"
        if m.dim not in (1, -1):
            return f"cat along dim {m.dim}; only the feature dim (1 / -1) is fused"
        problem = (tensor_problem(tensors + [m.weight, m.bias], device=ctx.device, profile=ctx.profile)
                   or linear_shape_problem(m.weight, [m.bias]))
        if problem:
            return problem
        dtype, problem = compute_dtype(m.linear, tensors + [m.weight, m.bias], ctx.profile)
        if problem:
            return problem
        out_val = example_value(m.tanh)
        if out_val is None or out_val.dtype != dtype:
            return f"output dtype {None if out_val is None else out_val.dtype} differs from the Linear's {dtype}"
        written = written_inside(m.cat, m.tanh, tensors + [m.weight, m.bias])
        if written:  # (the more precise reason of the two)
            return written
        # the op saves its operands for dW (eager's cat is a copy)
        inputs = tensors + [m.weight, m.bias]
        return saved_input_written(inputs, backward_will_run(m.cat, inputs))

    @staticmethod
    def _site(m: _Match, ctx) -> dict:
        vals = [example_value(t) for t in m.tensors]
        dtype = example_value(m.linear).dtype  # the inputs', or the autocast dtype
        precision = ctx.dot_precision(dtype)
        M, N = hint(vals[0].shape[0]), hint(example_value(m.weight).shape[0])
        widths = "+".join(str(hint(v.shape[1])) for v in vals)
        rows = size_text(vals[0].shape[0])  # (M is a stand-in where the batch is known only at run time)
        return {"shape": f"{rows}x({widths})->{N}", "dtype": str(dtype).replace("torch.", ""), "precision": precision,
                "autocast": any(v.dtype != dtype for v in vals),
                "key": autotune.make_key(NAME, ctx.profile.tuning_id, dtype, precision, M, K=widths, N=N)}

    def replace(self, m: _Match, ctx) -> dict:
        graph = ctx.gm.graph
        # dW to compute: the op that also returns the operands' copy (see `_saving_forward`);
        # explain() names it, as it names the MLP block's eval_keep_y
        saving = backward_will_run(m.cat, [m.weight])
        site = {"mode": "saving" if saving else "plain", **self._site(m, ctx)}
        precision = site["precision"]
        meta = inline_meta(ctx, site["key"], self._inline_shapes(m))
        with graph.inserting_before(m.tanh):
            *xs, w, b = cast_to(graph, list(m.tensors) + [m.weight, m.bias], example_value(m.linear).dtype)
            if meta is not None:  # (never where saving: `_inline_shapes`)
                site["launch"] = "inline"
                out = graph.call_function(cat_linear_tanh_inline, (xs, w, b, precision, meta))
            else:
                out = graph.call_function(cat_linear_tanh_saving if saving else cat_linear_tanh, (
                    xs, w, b, precision, ctx.options.autotune, ctx.options.tune_budget_s))
            if saving:
                out = graph.call_function(operator.getitem, (out, 0))
        out.meta.update(m.tanh.meta)
        m.tanh.replace_all_uses_with(out)
        for node in (m.tanh, m.linear, m.cat):
            graph.erase_node(node)
        return site
