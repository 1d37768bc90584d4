"""Pattern `linear_bn_gelu_relu`: Linear -> BatchNorm1d -> GELU -> ReLU as one fused op.

Eval (running statistics): one kernel, GEMM main loop + epilogue (bias, BatchNorm from
running_mean/var/weight/bias/eps computed in the kernel, GELU, ReLU), one store.
Train (batch statistics): the GEMM kernel writes y = xW^T + b into the output buffer and
per-tile Welford partials (mean, M2) per feature; a small kernel merges the partials with
Chan's formula; one pass normalizes the output in place and applies GELU + ReLU. The
running statistics are updated in the graph exactly as eager does (momentum, unbiased var).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import fx
from torch.utils._pytree import tree_leaves

from fusion_backend import autotune, config_spaces, devices, triton_lib
from fusion_backend.normalize import BATCH_NORM, GELU, LINEAR, RELU, example_value, is_op
from fusion_backend.registry import Pattern, register_pattern
from fusion_backend.triton_lib import (dot_3xtf32, finish_3xtf32, gelu, gemm_segment, grouped_tile, opaque_zeros,
                                       ptx_cvt, relu, store_eval_tile, tile_ids)

from . import _checks
from ._common import (INLINE_MAX_FLOP, backward_will_run, cast_to, cdiv, compute_dtype, define_inline_op, define_op,
                      descriptor, gemm_flop, gluon_code, grad_mode_problem, grad_modes, grad_on, heuristic_kwargs, hint,
                      inline_meta, launch, linear_shape_problem, meta_kwargs, only_user, other_uses, saved_input_written,
                      size_text, space, static_shapes, tensor_problem, tf32_split, tma_ready, tuned_unfused_reason,
                      written_inside)

NAME = "linear_bn_gelu_relu"


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _gemm_bn_gelu_relu_eval_kernel(
        x_ptr, w_ptr, b_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, out_ptr, y_ptr,
        M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on, eps,
        HAS_BIAS: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
        APPROX_TANH: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr, KEEP_Y: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """KEEP_Y: the Linear's output x W^T + b is stored to `y_ptr` too (strides as out's), for
    the backward of an eval-mode site with gradients (no GEMM to recompute there)."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = gemm_segment(acc, x_ptr, stride_xm, stride_xk, w_ptr, stride_wn, stride_wk,
                       offs_m % M, offs_n % N, K, BLOCK_K, PRECISION, EVEN_K)
    if KEEP_Y:
        y = acc
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, y.to(y_ptr.dtype.element_ty),
                 mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))
    store_eval_tile(acc, offs_m, offs_n, M, N, b_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, out_ptr,
                    stride_om, stride_on, eps, HAS_BIAS, HAS_GAMMA, HAS_BETA, APPROX_TANH)


@triton.jit
def _gemm_bn_gelu_relu_eval_tma_kernel(
        x_desc, w_desc, b_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, out_ptr,
        M, N, K, stride_om, stride_on, eps, num_programs,
        HAS_BIAS: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
        APPROX_TANH: tl.constexpr, PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr, PERSISTENT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """The eval kernel with x and W tiles brought in by the tensor-memory accelerator (Hopper
    and newer; x row-major with 16-byte aligned rows). Out-of-range rows and the K tail read
    as zeros, so the main loop has no masks. PERSISTENT: `num_programs` programs walk the tiles
    (grouped order), one per multiprocessor: no block scheduling between tiles, and the next
    tile's first loads can be issued during this one's epilogue (H100, 16384x4096->4096,
    benchmarks/pingpong_gemm.py, 5 interleaved rounds: TF32 128x256 1.778 ms vs 1.870 one tile
    per program, bf16 0.971 vs 0.981)."""
    if PERSISTENT:
        for tile in tl.range(tl.program_id(0), tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N), num_programs):
            pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            _eval_tma_tile(pid_m, pid_n, x_desc, w_desc, b_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, out_ptr,
                           M, N, K, stride_om, stride_on, eps, HAS_BIAS, HAS_GAMMA, HAS_BETA, APPROX_TANH,
                           PRECISION, NUM_STAGES, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        _eval_tma_tile(pid_m, pid_n, x_desc, w_desc, b_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, out_ptr,
                       M, N, K, stride_om, stride_on, eps, HAS_BIAS, HAS_GAMMA, HAS_BETA, APPROX_TANH,
                       PRECISION, NUM_STAGES, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _eval_tma_tile(pid_m, pid_n, x_desc, w_desc, b_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, out_ptr,
                   M, N, K, stride_om, stride_on, eps, HAS_BIAS: tl.constexpr, HAS_GAMMA: tl.constexpr,
                   HAS_BETA: tl.constexpr, APPROX_TANH: tl.constexpr, PRECISION: tl.constexpr,
                   NUM_STAGES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in tl.range(0, tl.cdiv(K, BLOCK_K), num_stages=NUM_STAGES):
        a = x_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
        w = w_desc.load([pid_n * BLOCK_N, k * BLOCK_K])
        acc = tl.dot(a, w.T, acc, input_precision=PRECISION)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    store_eval_tile(acc, offs_m, offs_n, M, N, b_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, out_ptr,
                    stride_om, stride_on, eps, HAS_BIAS, HAS_GAMMA, HAS_BETA, APPROX_TANH)


@triton.jit
def _gemm_bn_gelu_relu_eval_presplit_kernel(
        x_desc, whi_desc, wlo_desc, b_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, out_ptr,
        M, N, K, stride_om, stride_on, eps,
        HAS_BIAS: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
        APPROX_TANH: tl.constexpr, PTX: tl.constexpr, NUM_STAGES: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """The TMA eval kernel at fp32 "highest": 3xTF32 with W given as TF32 head and remainder
    (split once per call), x split in registers."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    small = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    seed = opaque_zeros(acc, K)  # folds only if Triton specializes K == 1: then one K step, no chain
    for k in tl.range(0, tl.cdiv(K, BLOCK_K), num_stages=NUM_STAGES):
        a = x_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
        w_hi = whi_desc.load([pid_n * BLOCK_N, k * BLOCK_K])
        w_lo = wlo_desc.load([pid_n * BLOCK_N, k * BLOCK_K])
        acc, small = dot_3xtf32(a, w_hi.T, w_lo.T, acc, small, seed, PTX)
    acc = finish_3xtf32(acc, small)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    store_eval_tile(acc, offs_m, offs_n, M, N, b_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, out_ptr,
                    stride_om, stride_on, eps, HAS_BIAS, HAS_GAMMA, HAS_BETA, APPROX_TANH)


@triton.jit
def _gemm_bias_welford_kernel(
        x_ptr, w_ptr, b_ptr, out_ptr, pmean_ptr, pm2_ptr,
        M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
        HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """y = x W^T + b into out, plus this row-tile's per-feature mean and M2 (Welford partials)."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = gemm_segment(acc, x_ptr, stride_xm, stride_xk, w_ptr, stride_wn, stride_wk,
                       offs_m % M, offs_n % N, K, BLOCK_K, PRECISION, EVEN_K)
    n_ok = offs_n < N
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    m_ok = offs_m < M
    y = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, y,
             mask=m_ok[:, None] & n_ok[None, :])
    # statistics of the values as stored (as eager's BatchNorm sees them), summed as deviations
    # from each feature's first value in the tile: a large common offset (y ~ 1e6 with spread
    # ~1, a big bias) no longer rounds the tile's sum (fp32 sums of 1e6-sized values lost the
    # variance to 3x eager's error); a non-finite first value shifts by 0, as before
    v = y.to(tl.float32)
    count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
    shift = tl.sum(tl.where((offs_m == pid_m * BLOCK_M)[:, None], v, 0.0), axis=0)
    shift = tl.where(tl.abs(shift) < float("inf"), shift, 0.0)
    s = tl.where(m_ok[:, None], v - shift[None, :], 0.0)
    dmean = tl.sum(s, axis=0) / count
    tile_mean = shift + dmean
    d = tl.where(m_ok[:, None], s - dmean[None, :], 0.0)
    tile_m2 = tl.sum(d * d, axis=0)
    tl.store(pmean_ptr + pid_m * N + offs_n, tile_mean, mask=n_ok)
    tl.store(pm2_ptr + pid_m * N + offs_n, tile_m2, mask=n_ok)


@triton.jit
def _merge_welford_kernel(pmean_ptr, pm2_ptr, mean_ptr, var_ptr, M, N, TILE_M,
                          BLOCK_N: tl.constexpr):
    """Chan's parallel merge of the row-tile partials -> batch mean and biased variance."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    num_tiles = tl.cdiv(M, TILE_M)
    count = tl.zeros((BLOCK_N,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_N,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for t in range(0, num_tiles):
        nb = tl.minimum(M - t * TILE_M, TILE_M).to(tl.float32)
        mb = tl.load(pmean_ptr + t * N + offs_n, mask=n_ok, other=0.0)
        m2b = tl.load(pm2_ptr + t * N + offs_n, mask=n_ok, other=0.0)
        total = count + nb
        delta = mb - mean
        # an infinite tile mean (an inf in the tile): the weighted sum, so that inf and a finite
        # mean give inf and inf and -inf give NaN, as eager's mean does (mb - mean gave NaN)
        finite = (tl.abs(mb) < float("inf")) & (tl.abs(mean) < float("inf"))
        mean = tl.where(finite, mean + delta * (nb / total), (count * mean + nb * mb) / total)
        m2 = m2 + m2b + delta * delta * (count * nb / total)
        count = total
    tl.store(mean_ptr + offs_n, mean, mask=n_ok)
    tl.store(var_ptr + offs_n, m2 / count, mask=n_ok)


@triton.jit
def _bn_gelu_relu_kernel(y_ptr, out_ptr, mean_ptr, var_ptr, gamma_ptr, beta_ptr, M, N,
                         stride_ym, stride_yn, stride_om, stride_on, eps,
                         HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, APPROX_TANH: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """out = relu(gelu(batchnorm(y))) for given per-feature mean/var (in place when out is y)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    mask = (offs_m[:, None] < M) & n_ok[None, :]
    y = tl.load(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, mask=mask, other=0.0)
    mean = tl.load(mean_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    scale = 1.0 / tl.sqrt(tl.load(var_ptr + offs_n, mask=n_ok, other=1.0).to(tl.float32) + tl.cast(eps, tl.float32))
    if HAS_GAMMA:
        scale = scale * tl.load(gamma_ptr + offs_n, mask=n_ok, other=1.0).to(tl.float32)
    z = (y.to(tl.float32) - mean[None, :]) * scale[None, :]
    if HAS_BETA:
        z += tl.load(beta_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    r = relu(gelu(z, APPROX_TANH))
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             r.to(out_ptr.dtype.element_ty), mask=mask)


# triton_lib whole: the kernels call its helpers (the GEMM main loop, GELU, the tile order)
_SRC = autotune.source_hash(_gemm_bn_gelu_relu_eval_kernel, _gemm_bn_gelu_relu_eval_tma_kernel, _eval_tma_tile,
                            _gemm_bn_gelu_relu_eval_presplit_kernel, triton_lib, _gemm_bias_welford_kernel,
                            _merge_welford_kernel, _bn_gelu_relu_kernel,
                            *gluon_code("_eval_gluon", "_eval_3xtf32_kernel", "_issue_loads", "launch"),
                            *gluon_code("_cell_gluon", "mma_3xtf32_step", "stage_ring", "drain_3xtf32"))


# ----------------------------------------------------------------------------- launchers

def _gemm_grid(M, N, config):
    return (cdiv(M, config["BLOCK_M"]) * cdiv(N, config["BLOCK_N"]),)


def _pointwise(y, out, mean, var, gamma, beta, eps, approximate, profile, wrap=None):
    """`wrap`: `torch.library.wrap_triton` in the inline op (Inductor launches the kernels)."""
    M, N = y.shape
    config = heuristic_kwargs(profile, config_spaces.POINTWISE, y.dtype, autotune.bucket(M))
    grid = (cdiv(M, config["BLOCK_M"]), cdiv(N, config["BLOCK_N"]))
    (wrap or _same)(_bn_gelu_relu_kernel)[grid](
        y, out, mean, var, gamma if gamma is not None else mean, beta if beta is not None else mean, M, N,
        y.stride(0), y.stride(1), out.stride(0), out.stride(1), eps,
        HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None, APPROX_TANH=approximate == "tanh", **config)
    return out


def _unfused_eval(x, weight, bias, gamma, beta, running_mean, running_var, eps, approximate, profile,
                  out=None, kept_y=None):
    """The site as Inductor runs it: cuBLAS GEMM (+ bias), then one pointwise pass, in place,
    or, given `kept_y` and `out`, the GEMM into `kept_y` and the pointwise pass from it into `out`."""
    if kept_y is None:
        y = torch.nn.functional.linear(x, weight, bias)
        return _pointwise(y, y, running_mean, running_var, gamma, beta, eps, approximate, profile)
    if bias is None:
        torch.mm(x, weight.t(), out=kept_y)
    else:
        torch.addmm(bias, x, weight.t(), out=kept_y)
    return _pointwise(kept_y, out, running_mean, running_var, gamma, beta, eps, approximate, profile)


def _unfused_train(x, weight, bias, gamma, beta, eps, approximate, profile, out=None, mean=None, var=None,
                   kept_y=None):
    """cuBLAS GEMM, a column reduction for the batch statistics, one pointwise pass; the GEMM's
    output also lands in `kept_y` when one is given (`_launch_train`)."""
    y = torch.nn.functional.linear(x, weight, bias)
    v, m = torch.var_mean(y.float(), dim=0, correction=0)
    mean = m if mean is None else mean.copy_(m)
    var = v if var is None else var.copy_(v)
    out = y if out is None else out
    if kept_y is not None and kept_y.numel():
        kept_y.copy_(y)
    return _pointwise(y, out, mean, var, gamma, beta, eps, approximate, profile), mean, var


def _reference(x, weight, bias, gamma, beta, mean, var, eps, approximate):
    y = torch.nn.functional.linear(x, weight, bias)
    z = torch.nn.functional.batch_norm(y, mean, var, gamma, beta, False, 0.0, eps)
    return torch.relu(torch.nn.functional.gelu(z, approximate=approximate))


def _runtime(op, x, autotune_on, budget):
    profile = _checks.profile(op, x)
    return profile, (profile, autotune_on, budget, x.device)


def eval_runner(x, weight, bias, gamma, beta, running_mean, running_var, eps, approximate, precision, out):
    """run_fused(kwargs): launch the eval kernel with one config's launch kwargs into `out`
    (the TMA kernel for a config with TMA=True where x and W allow it, else the pointer one)."""
    M, K = x.shape
    N = weight.shape[0]
    tensors = _eval_tensors(bias, gamma, beta, running_mean, running_var, out)
    flags = _eval_flags(bias, gamma, beta, approximate, precision)
    split_flags = {k: v for k, v in flags.items() if k != "PRECISION"}  # the pre-split kernel is 3xTF32 by construction
    multiprocessors = devices.tensor_profile(x).multiprocessors

    def run_fused(config):
        if config.get("TMA"):
            presplit = config.get("PRESPLIT") and precision == "tf32x3"
            gluon = config.get("GLUON")
            persistent = bool(config.get("PERSISTENT"))
            config = {k: v for k, v in config.items() if k not in ("TMA", "PRESPLIT", "GLUON", "PERSISTENT")}
            if presplit and tma_ready(x):
                return launch_presplit(x, weight, tensors, M, N, K, eps, split_flags, config, gluon)
            if tma_ready(x) and tma_ready(weight):
                grid = _gemm_grid(M, N, config)
                if persistent:  # one program per multiprocessor
                    grid = (min(grid[0], multiprocessors),)
                _gemm_bn_gelu_relu_eval_tma_kernel[grid](
                    descriptor(x, config["BLOCK_M"], config["BLOCK_K"]),
                    descriptor(weight, config["BLOCK_N"], config["BLOCK_K"]), *tensors,
                    M, N, K, out.stride(0), out.stride(1), eps, grid[0], NUM_STAGES=config["num_stages"],
                    PERSISTENT=persistent, **flags, **config)
                return out
        return _launch_eval_pointer(_gemm_bn_gelu_relu_eval_kernel, x, weight, tensors, eps, flags, config)

    return run_fused


def _eval_tensors(bias, gamma, beta, running_mean, running_var, out):
    """The eval kernels' epilogue tensors, absent ones replaced by a dummy pointer."""
    dummy = running_mean
    return (bias if bias is not None else dummy, gamma if gamma is not None else dummy,
            beta if beta is not None else dummy, running_mean, running_var, out)


def _eval_flags(bias, gamma, beta, approximate, precision):
    return dict(HAS_BIAS=bias is not None, HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None,
                APPROX_TANH=approximate == "tanh", PRECISION=precision)


def _launch_eval_pointer(kernel, x, weight, tensors, eps, flags, config, kept_y=None):
    """The pointer eval kernel (or its `wrap_triton` wrapper, from the inline op) into
    `tensors[-1]`: x and W read through their strides, as stored; the Linear's output also
    into `kept_y` (contiguous, out's shape) where one is given."""
    M, K = x.shape
    N = weight.shape[0]
    out = tensors[-1]
    kernel[_gemm_grid(M, N, config)](
        x, weight, *tensors, kept_y if kept_y is not None else out, M, N, K, x.stride(0), x.stride(1),
        weight.stride(0), weight.stride(1), out.stride(0), out.stride(1), eps, EVEN_K=K % config["BLOCK_K"] == 0,
        KEEP_Y=kept_y is not None, **flags, **config)
    return out


def launch_presplit(x, weight, tensors, M, N, K, eps, flags, config, gluon=False):
    """The 3xTF32 eval kernel: W split into TF32 head and remainder (one pass, 2 x W of
    scratch), then the GEMM with x split in registers. `tensors` = (bias, gamma, beta,
    running_mean, running_var, out) as the other eval kernels take them; `flags` their
    HAS_BIAS, HAS_GAMMA, HAS_BETA, APPROX_TANH. gluon=True: the same kernel in Gluon (sm_90;
    raises where Gluon is missing, and the tuner then does not choose it)."""
    w_hi, w_lo = tf32_split(weight)
    if gluon:
        from . import _eval_gluon

        return _eval_gluon.launch(x, w_hi, w_lo, tensors, M, N, K, eps, flags, config)
    out = tensors[-1]
    _gemm_bn_gelu_relu_eval_presplit_kernel[_gemm_grid(M, N, config)](
        descriptor(x, config["BLOCK_M"], config["BLOCK_K"]), descriptor(w_hi, config["BLOCK_N"], config["BLOCK_K"]),
        descriptor(w_lo, config["BLOCK_N"], config["BLOCK_K"]), *tensors, M, N, K, out.stride(0), out.stride(1), eps,
        PTX=ptx_cvt(x), NUM_STAGES=config["num_stages"], **flags, **config)
    return out


def _same(kernel):
    return kernel


def _launch_train(x, weight, bias, gamma, beta, eps, approximate, precision, config, profile, out, mean, var,
                  wrap=None, kept_y=None):
    """The fused training forward into (out, mean, var): GEMM + per-tile Welford partials,
    their merge, the normalize + GELU + ReLU pass, in place, or, given a non-empty `kept_y`
    (for the backward: no GEMM to recompute there), from `kept_y` into `out`. `wrap` as in
    `_pointwise`."""
    wrap = wrap or _same
    y = kept_y if kept_y is not None and kept_y.numel() else out
    M, K = x.shape
    N = weight.shape[0]
    tiles = cdiv(M, config["BLOCK_M"])
    pmean = torch.empty((tiles, N), device=x.device, dtype=torch.float32)
    pm2 = torch.empty((tiles, N), device=x.device, dtype=torch.float32)
    wrap(_gemm_bias_welford_kernel)[_gemm_grid(M, N, config)](
        x, weight, bias if bias is not None else mean, y, pmean, pm2,
        M, N, K, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, PRECISION=precision, EVEN_K=K % config["BLOCK_K"] == 0, **config)
    block_n = 128 if profile.name != "interpreter" else 16
    wrap(_merge_welford_kernel)[(cdiv(N, block_n),)](pmean, pm2, mean, var, M, N, config["BLOCK_M"], BLOCK_N=block_n)
    return _pointwise(y, out, mean, var, gamma, beta, eps, approximate, profile, wrap), mean, var


def eval_space(profile, dtype, precision, flop=math.inf):
    """The GEMM space without the cell's own W x^T tiles; for a GEMM of at most
    `_common.INLINE_MAX_FLOP` FLOPs only the tiles an inline op can launch, SMALL ones included."""
    return [c for c in space(profile, config_spaces.GEMM, dtype, precision=precision, small=flop <= INLINE_MAX_FLOP)
            if not c.get("WXT")]


def eval_forward(x, weight, bias, gamma, beta, running_mean, running_var, eps, approximate,
                 precision, autotune_on=True, budget=30.0):
    _checks.linear_bn(NAME + "_eval", x, weight, bias, gamma, beta, running_mean, running_var, approximate,
                      precision, training=False)
    M, K = x.shape
    N = weight.shape[0]
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return out
    profile, ctx_args = _runtime(NAME + "_eval", x, autotune_on, budget)
    run_fused = eval_runner(x, weight, bias, gamma, beta, running_mean, running_var, eps, approximate, precision, out)

    def run_unfused():
        return _unfused_eval(x, weight, bias, gamma, beta, running_mean, running_var, eps, approximate, profile)

    key = autotune.make_key("eval:" + NAME, profile.tuning_id, x.dtype, precision, M, K=K, N=N)
    return launch(key, ctx_args=ctx_args, space=lambda: eval_space(profile, x.dtype, precision, gemm_flop(M, N, K)),
                  m=M, run_fused=run_fused, run_unfused=run_unfused, src_hash=_SRC,
                  run_reference=lambda: _reference(x, weight, bias, gamma, beta, running_mean, running_var,
                                                   eps, approximate))


def eval_keep_y_forward(x, weight, bias, gamma, beta, running_mean, running_var, eps, approximate,
                        precision, autotune_on=True, budget=30.0):
    """The eval forward for a site whose backward will run (eval-mode BatchNorm with
    gradients: fine-tuning with frozen statistics): (out, the Linear's output), the latter
    stored by the same kernel's epilogue, kept for the backward. Pointer kernels only."""
    _checks.linear_bn(NAME + "_eval_keep_y", x, weight, bias, gamma, beta, running_mean, running_var, approximate,
                      precision, training=False)
    M, K = x.shape
    N = weight.shape[0]
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return out, y
    profile, ctx_args = _runtime(NAME + "_eval_keep_y", x, autotune_on, budget)
    tensors = _eval_tensors(bias, gamma, beta, running_mean, running_var, out)
    flags = _eval_flags(bias, gamma, beta, approximate, precision)

    def run_fused(config):
        return _launch_eval_pointer(_gemm_bn_gelu_relu_eval_kernel, x, weight, tensors, eps, flags, config, y), y

    def run_unfused():
        return _unfused_eval(x, weight, bias, gamma, beta, running_mean, running_var, eps, approximate, profile,
                             out, y), y

    def run_reference():
        y.copy_(torch.nn.functional.linear(x, weight, bias))
        return out.copy_(_reference(x, weight, bias, gamma, beta, running_mean, running_var, eps, approximate)), y

    key = autotune.make_key("eval_keep_y:" + NAME, profile.tuning_id, x.dtype, precision, M, K=K, N=N)
    return launch(key, ctx_args=ctx_args, space=lambda: eval_keep_y_space(profile, x.dtype, precision, gemm_flop(M, N, K)),
                  m=M, run_fused=run_fused, run_unfused=run_unfused, run_reference=run_reference, src_hash=_SRC)


def eval_keep_y_space(profile, dtype, precision, flop=math.inf):
    """`eval_space` without the TMA kernels, which have no store of the Linear's output."""
    return [c for c in eval_space(profile, dtype, precision, flop) if not c.get("TMA")]


def _kept_y(x, N, keep_y):
    """The buffer the training forward keeps the Linear's output in for the backward, or an
    empty tensor where no backward will run (an op's outputs may not alias each other)."""
    return x.new_empty((x.shape[0], N) if keep_y else (0,))


def train_forward(x, weight, bias, gamma, beta, eps, approximate, precision, autotune_on=True, budget=30.0,
                  keep_y=False):
    """Returns (out, batch mean, biased batch variance, the Linear's output if keep_y else empty)."""
    _checks.linear_bn(NAME + "_train", x, weight, bias, gamma, beta, None, None, approximate, precision, training=True)
    M, K = x.shape
    N = weight.shape[0]
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    mean = torch.empty((N,), device=x.device, dtype=torch.float32)
    var = torch.empty((N,), device=x.device, dtype=torch.float32)
    y = _kept_y(x, N, keep_y)
    if M == 0:  # eager raises for batch size 1 before we get here; empty stays empty
        return out, mean.fill_(float("nan")), var.fill_(float("nan")), y
    profile, ctx_args = _runtime(NAME + "_train", x, autotune_on, budget)

    def run_fused(config):
        return (*_launch_train(x, weight, bias, gamma, beta, eps, approximate, precision, config, profile, out, mean,
                               var, kept_y=y), y)

    def run_unfused():
        return (*_unfused_train(x, weight, bias, gamma, beta, eps, approximate, profile, out, mean, var, y), y)

    def run_reference():
        lin = torch.nn.functional.linear(x, weight, bias)
        v, m = torch.var_mean(lin.float(), dim=0, correction=0)
        z = torch.nn.functional.batch_norm(lin, None, None, gamma, beta, True, 0.0, eps)
        out.copy_(torch.relu(torch.nn.functional.gelu(z, approximate=approximate)))
        if y.numel():
            y.copy_(lin)
        return out, mean.copy_(m), var.copy_(v), y

    key = autotune.make_key("train:" + NAME, profile.tuning_id, x.dtype, precision, M, K=K, N=N)
    return launch(key, ctx_args=ctx_args, space=lambda: space(profile, config_spaces.GEMM, x.dtype, tma=False), m=M,
                  run_fused=run_fused, run_unfused=run_unfused, run_reference=run_reference, src_hash=_SRC)


# ----------------------------------------------------------------------------- ops: fake impls, autograd

def _fake_eval(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, approximate, precision,
               autotune_on, budget):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _fake_train(x, weight, bias, bn_weight, bn_bias, eps, approximate, precision, autotune_on, budget, keep_y=False):
    n = weight.shape[0]
    return (x.new_empty((x.shape[0], n)), x.new_empty((n,), dtype=torch.float32),
            x.new_empty((n,), dtype=torch.float32), _kept_y(x, n, keep_y))


def _backward_common(ctx, grad_out, training):
    """Grads through relu(gelu(batchnorm(x W^T + b))) with eager's own backward kernels.

    Saved: x, W, b, gamma, beta, out, then (batch mean, biased var) in training or
    (running_mean, running_var) in eval, then the Linear's output where the forward kept it
    (the train op with keep_y, the eval keep_y op; absent or empty: recomputed here, a GEMM)."""
    if torch.is_grad_enabled():
        # a backward asked to build its own graph (create_graph=True: gradient penalties,
        # hessians): these formulas are not differentiable as written (the kept output's and
        # the batch statistics' grads are not taken, native_batch_norm_backward has no
        # derivative in training), so say so rather than give wrong second derivatives.
        # Under torch.compile AOTAutograd refuses double backward before it gets here.
        raise RuntimeError("fusedtriton: the linear_bn_gelu_relu ops have no double backward "
                           "(create_graph=True); run that model without them (eagerly, or compiled with "
                           "options={'patterns': [...]} leaving linear_bn_gelu_relu out)")
    x, weight, bias, gamma, beta, out, mean, var, *kept = ctx.saved_tensors
    mean, invstd = mean.float(), torch.rsqrt(var.float() + ctx.eps)
    if kept and kept[0].numel():
        y = kept[0].float()
    else:
        y = torch.nn.functional.linear(x, weight, bias).float()
    z = (y - mean) * (invstd if gamma is None else invstd * gamma.float())
    if beta is not None:
        z = z + beta.float()
    g = torch.ops.aten.threshold_backward(grad_out, out, 0).float()  # relu(gelu(z)) > 0 iff z > 0
    g = torch.ops.aten.gelu_backward(g, z, approximate=ctx.approximate)
    if y.shape[0] == 0:  # an empty eval batch: aten's CPU kernel divides by the batch size (SIGFPE)
        dy, dgamma, dbeta = torch.zeros_like(y), torch.zeros_like(mean), torch.zeros_like(mean)
    else:
        # save_mean/save_invstd given in eval too: aten's CUDA kernel asserts they are defined
        # on its channels-last path, which every contiguous 2-D input takes (it then uses them
        # as they are; the CPU kernel reads the running statistics in eval)
        dy, dgamma, dbeta = torch.ops.aten.native_batch_norm_backward(
            g, y, gamma.float() if gamma is not None else None,
            None if training else mean, None if training else var.float(),
            mean, invstd, training, ctx.eps, [True, gamma is not None, beta is not None])
    dy = dy.to(x.dtype)
    dx = dy @ weight if ctx.needs_input_grad[0] else None
    dw = dy.t() @ x if ctx.needs_input_grad[1] else None
    db = dy.sum(0) if bias is not None and ctx.needs_input_grad[2] else None
    dgamma = dgamma.to(gamma.dtype) if gamma is not None else None
    dbeta = dbeta.to(beta.dtype) if beta is not None else None
    return dx, dw, db, dgamma, dbeta


def _setup_eval(ctx, inputs, output):
    """For the eval ops: `output` is out, or (out, the Linear's output) from the keep_y ones."""
    x, weight, bias, gamma, beta, running_mean, running_var, eps, approximate, *_ = inputs
    out, *kept_y = output if isinstance(output, tuple) else (output,)
    ctx.eps, ctx.approximate = eps, approximate
    ctx.save_for_backward(x, weight, bias, gamma, beta, out, running_mean, running_var, *kept_y)
    # the kept Linear output is for the backward only: a gradient through it would be dropped
    # (a direct call's y.sum().backward() gave x.grad 0), so it takes none
    ctx.mark_non_differentiable(*kept_y)


def _backward_eval(ctx, grad_out):
    grads = _backward_common(ctx, grad_out, training=False)
    return (*grads, None, None, None, None, None, None, None)


# the eval ops' arguments (the plain op and the keep_y one differ in their results only)
_EVAL_SCHEMA_ARGS = ("(Tensor x, Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, Tensor running_mean, "
                     "Tensor running_var, float eps, str approximate, str precision, bool autotune_on, float budget)")

linear_bn_gelu_relu_eval = define_op(
    "linear_bn_gelu_relu_eval", _EVAL_SCHEMA_ARGS + " -> Tensor",
    eval_forward, _fake_eval, _backward_eval, _setup_eval)


def _eval_inline(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor], running_mean: torch.Tensor,
                 running_var: torch.Tensor, eps: float, approximate: str, precision: str,
                 meta: List[int]) -> torch.Tensor:
    """The eval op's fused path with its config fixed at compile time (`meta`, see
    `_common.inline_meta`): Inductor emits this kernel launch in the compiled graph's code."""
    _checks.linear_bn(NAME + "_eval_inline", x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                      approximate, precision, training=False)
    out = x.new_empty((x.shape[0], weight.shape[0]))
    _launch_eval_inline(NAME + "_eval_inline", x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps,
                        approximate, precision, meta, out)
    return out


def _launch_eval_inline(op, x, weight, bias, gamma, beta, running_mean, running_var, eps, approximate, precision,
                        meta, out, kept_y=None):
    """The eval pointer kernel through `wrap_triton` into `out` (and `kept_y`), for the inline ops."""
    if x.shape[0]:
        _checks.profile(op, x)
        _launch_eval_pointer(torch.library.wrap_triton(_gemm_bn_gelu_relu_eval_kernel), x, weight,
                             _eval_tensors(bias, gamma, beta, running_mean, running_var, out), eps,
                             _eval_flags(bias, gamma, beta, approximate, precision), meta_kwargs(meta), kept_y)


def _backward_eval_inline(ctx, grad_out):
    return (*_backward_eval(ctx, grad_out)[:10], None)


linear_bn_gelu_relu_eval_inline = define_inline_op(
    "linear_bn_gelu_relu_eval_inline", _eval_inline, _backward_eval_inline, _setup_eval)


def _fake_eval_keep_y(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, approximate, precision,
                      autotune_on, budget):
    shape = (x.shape[0], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape)


def _backward_eval_keep_y(ctx, grad_out, _grad_kept_y):
    return _backward_eval(ctx, grad_out)


linear_bn_gelu_relu_eval_keep_y = define_op(
    "linear_bn_gelu_relu_eval_keep_y", _EVAL_SCHEMA_ARGS + " -> (Tensor, Tensor)",
    eval_keep_y_forward, _fake_eval_keep_y, _backward_eval_keep_y, _setup_eval)


def _eval_keep_y_inline(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor], running_mean: torch.Tensor,
                        running_var: torch.Tensor, eps: float, approximate: str, precision: str,
                        meta: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """`eval_keep_y_forward`'s fused path with its config fixed at compile time (see `_eval_inline`)."""
    _checks.linear_bn(NAME + "_eval_keep_y_inline", x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                      approximate, precision, training=False)
    out = x.new_empty((x.shape[0], weight.shape[0]))
    y = x.new_empty((x.shape[0], weight.shape[0]))
    _launch_eval_inline(NAME + "_eval_keep_y_inline", x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                        eps, approximate, precision, meta, out, y)
    return out, y


def _backward_eval_keep_y_inline(ctx, grad_out, _grad_kept_y):
    return _backward_eval_inline(ctx, grad_out)


linear_bn_gelu_relu_eval_keep_y_inline = define_inline_op(
    "linear_bn_gelu_relu_eval_keep_y_inline", _eval_keep_y_inline, _backward_eval_keep_y_inline, _setup_eval)


def _setup_train(ctx, inputs, output):
    x, weight, bias, gamma, beta, eps, approximate, *_ = inputs
    out, mean, var, kept_y = output
    ctx.eps, ctx.approximate = eps, approximate
    ctx.save_for_backward(x, weight, bias, gamma, beta, out, mean, var, kept_y)
    # the batch statistics feed the running-statistics update (no gradient in eager either) and
    # the kept Linear output the backward: gradients through them would be dropped (a direct
    # call's (mean + var).sum().backward() gave x.grad 0), so they take none
    ctx.mark_non_differentiable(mean, var, kept_y)


def _backward_train(ctx, grad_out, _grad_mean, _grad_var, _grad_kept_y):
    grads = _backward_common(ctx, grad_out, training=True)
    return (*grads, None, None, None, None, None, None)


def _train_inline(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor], eps: float, approximate: str,
                  precision: str, meta: List[int], keep_y: bool = False
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The train op's fused path with its config fixed at compile time (see `_eval_inline`)."""
    _checks.linear_bn(NAME + "_train_inline", x, weight, bias, bn_weight, bn_bias, None, None, approximate, precision,
                      training=True)
    M, N = x.shape[0], weight.shape[0]
    out = x.new_empty((M, N))
    mean = x.new_empty((N,), dtype=torch.float32)
    var = x.new_empty((N,), dtype=torch.float32)
    y = _kept_y(x, N, keep_y)
    if M == 0:  # never fused (an empty training batch is left to Inductor); as the train op
        return out, torch.full_like(mean, float("nan")), torch.full_like(var, float("nan")), y
    out, mean, var = _launch_train(x, weight, bias, bn_weight, bn_bias, eps, approximate, precision, meta_kwargs(meta),
                                   _checks.profile(NAME + "_train_inline", x), out, mean, var, torch.library.wrap_triton,
                                   kept_y=y)
    return out, mean, var, y


def _backward_train_inline(ctx, grad_out, grad_mean, grad_var, grad_kept_y):
    return (*_backward_train(ctx, grad_out, grad_mean, grad_var, grad_kept_y)[:8], None, None)


linear_bn_gelu_relu_train = define_op(
    "linear_bn_gelu_relu_train",
    "(Tensor x, Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, float eps, str approximate, "
    "str precision, bool autotune_on, float budget, bool keep_y=False) -> (Tensor, Tensor, Tensor, Tensor)",
    train_forward, _fake_train, _backward_train, _setup_train)

linear_bn_gelu_relu_train_inline = define_inline_op(
    "linear_bn_gelu_relu_train_inline", _train_inline, _backward_train_inline, _setup_train)


# ----------------------------------------------------------------------------- the graph pattern

def needs_backward(m) -> bool:
    """Whether the compiled graph will run this site's backward (x, W, b or the BatchNorm
    affine parameters requiring grad): then the Linear's output is kept for it."""
    return backward_will_run(m.linear, (m.x, m.weight, m.bias, m.gamma, m.beta))


def _stats_read_before_update(m) -> Optional[str]:
    """In training the site's running-statistics update is an in-graph copy_, which bumps their
    version counter where eager's BatchNorm kernel writes them without one: a node before the
    site that read them with grad on may have saved them for its backward, which would then
    fail ("modified by an inplace operation"), and with it the whole fused graph."""
    if not m.training or not isinstance(m.running_mean, fx.Node):
        return None
    graph = m.bn.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    modes = grad_modes(graph)

    def may_save(node):  # computes a gradient-tracked value (the updates of a site fused before: no)
        value = node.meta.get("example_value")
        return grad_on(modes, node) and any(isinstance(v, torch.Tensor) and v.requires_grad for v in tree_leaves(value))

    for stat in (m.running_mean, m.running_var):
        readers = [u.name for u in stat.users if u is not m.bn and order[u] < order[m.bn] and may_save(u)]
        if readers:
            return (f"running statistics {stat.name} read with grad on before the BatchNorm updates them "
                    f"({readers}): the fused update would bump their version, eager's does not")
    return None


def _bn_dtype_problem(m, dtype) -> Optional[str]:
    """BatchNorm's parameters and statistics as eager takes them: one dtype for all, the
    input's or fp32 (fp16 statistics for an fp32 input, or an fp16 weight beside fp32
    statistics, raise in eager; Dynamo traces shapes only, so the graph compiles anyway)."""
    dtypes = {n.name: example_value(n).dtype for n in (m.gamma, m.beta, m.running_mean, m.running_var)
              if isinstance(n, fx.Node) and example_value(n) is not None}
    kinds = set(dtypes.values())
    if len(kinds) > 1 or not kinds <= {dtype, torch.float32}:
        return (f"BatchNorm parameters/statistics in {sorted(str(k) for k in kinds)} for a {dtype} input: "
                "eager raises (they take one dtype, the input's or float32)")
    return None


class _Match:
    def __init__(self, linear, bn, gelu, relu):
        self.linear, self.bn, self.gelu, self.relu = linear, bn, gelu, relu
        self.x, self.weight, self.bias = linear.args
        (_, self.running_mean, self.running_var, self.gamma, self.beta,
         self.training, self.momentum, self.eps) = bn.args
        self.approximate = gelu.kwargs.get("approximate", "none")


@register_pattern
class LinearBnGeluRelu(Pattern):
    name = NAME

    def match(self, node):
        if not is_op(node, RELU):
            return None
        gelu_node = node.args[0]
        if not is_op(gelu_node, GELU):
            return None
        bn = gelu_node.args[0]
        if not is_op(bn, BATCH_NORM):
            return None
        linear = bn.args[0]
        if not is_op(linear, LINEAR):
            return None
        return _Match(linear, bn, gelu_node, node)

    def check(self, m: _Match, ctx) -> Optional[str]:
        for inner, outer in ((m.linear, m.bn), (m.bn, m.gelu), (m.gelu, m.relu)):
            if not only_user(inner, outer):
                return f"intermediate {inner.name} has {other_uses(inner, outer)}"
        problem = grad_mode_problem([m.bn, m.linear, m.gelu, m.relu])  # (the op runs at the BatchNorm)
        if problem:
            return problem
        x_val = example_value(m.x)
        if x_val is None or x_val.dim() != 2:
            rank = None if x_val is None else x_val.dim()
            return f"BatchNorm1d input must be 2-D (batch, features) to fuse; got rank {rank}"
        problem = (tensor_problem([m.x, m.weight, m.bias, m.gamma, m.beta, m.running_mean, m.running_var],
                                  device=ctx.device, profile=ctx.profile)
                   or linear_shape_problem(m.weight, [m.bias, m.gamma, m.beta, m.running_mean, m.running_var]))
        if problem:
            return problem
        dtype, problem = compute_dtype(m.linear, [m.x, m.weight, m.bias], ctx.profile)
        if problem:
            return problem
        out_val = example_value(m.relu)
        if out_val is None or out_val.dtype != dtype:
            return f"output dtype {None if out_val is None else out_val.dtype} differs from the Linear's {dtype}"
        problem = _bn_dtype_problem(m, dtype)
        if problem:
            return problem
        if not isinstance(m.training, bool) or not isinstance(m.eps, (int, float)):
            return "BatchNorm training flag or eps is not a constant"
        if m.approximate not in ("none", "tanh"):
            return f"unknown GELU approximate={m.approximate!r}"
        if not m.training and (m.running_mean is None or m.running_var is None):
            return "eval-mode BatchNorm without running statistics"
        if m.training and m.running_mean is not None and not isinstance(m.momentum, (int, float)):
            what = ("momentum=None, a cumulative average" if m.momentum is None
                    else f"a value of the graph ({type(m.momentum).__name__})")  # a float Dynamo made symbolic
            return f"BatchNorm momentum is not a constant: {what}"
        problem = _stats_read_before_update(m)
        if problem:
            return problem
        # in training the op never reads the running statistics (their update is emitted at the
        # BatchNorm's place, as eager reads them): a shared BatchNorm's first site writing them
        # does not concern the second
        inputs = (m.x, m.weight, m.bias, m.gamma, m.beta) + (() if m.training else (m.running_mean, m.running_var))
        # the op's backward recomputes the BatchNorm's output from b, gamma and beta as they
        # are then, where eager's saved it
        problem = saved_input_written(inputs, needs_backward(m))
        if problem:
            return problem
        written = written_inside(m.linear, m.relu, inputs)
        if written:
            return written
        if hint(x_val.shape[0]) == 0:
            # nothing to gain, and in training eager leaves the running statistics alone.
            # Dynamo gives batch 0 a graph of its own, so this costs nothing elsewhere
            return "empty batch: left to Inductor"
        return tuned_unfused_reason(ctx, self._site(m, ctx)["key"], *self._calls(m, ctx),
                                    static_shapes=self._inline_shapes(m))

    @staticmethod
    def _inline_shapes(m: _Match) -> bool:
        """Whether the site's shapes are static, as an inline op needs (`_common.inline_meta`)."""
        return static_shapes(m.x, m.weight)

    @staticmethod
    def _site(m: _Match, ctx) -> dict:
        x_val, w_val = example_value(m.x), example_value(m.weight)
        dtype = example_value(m.linear).dtype  # x's, or the autocast dtype
        precision = ctx.dot_precision(dtype)
        M, K, N = hint(x_val.shape[0]), hint(x_val.shape[1]), hint(w_val.shape[0])
        # eval-mode BatchNorm with gradients: the eval kernel also stores the Linear's output
        # for the backward (H100, fwd + bwd, fp32 "highest", 4096x2048->2048: recomputing it
        # there cost 1.88 ms vs Inductor's 1.57, NOTES.md, tenth session)
        mode = "train" if m.training else "eval_keep_y" if needs_backward(m) else "eval"
        return {"mode": mode, "shape": f"{size_text(x_val.shape[0])}x{K}->{N}", "dtype": str(dtype).replace("torch.", ""),
                "precision": precision, "gelu": m.approximate,
                "autocast": any(example_value(n).dtype != dtype for n in (m.x, m.weight) if n is not None),
                "key": autotune.make_key(f"{mode}:{NAME}", ctx.profile.tuning_id, dtype, precision, M, K=K, N=N)}

    @staticmethod
    def _calls(m: _Match, ctx):
        """(fused op call, unfused path call) on real tensors, for the compile-time decision."""
        t = ctx.real_tensor
        dtype = example_value(m.linear).dtype
        x, w, b = (None if v is None else v.to(dtype) for v in (t(m.x), t(m.weight), t(m.bias)))
        g, be = t(m.gamma), t(m.beta)
        precision, eps, budget = ctx.dot_precision(dtype), float(m.eps), ctx.options.tune_budget_s
        if m.training:
            return (lambda: linear_bn_gelu_relu_train(x, w, b, g, be, eps, m.approximate, precision, True, budget),
                    lambda: _unfused_train(x, w, b, g, be, eps, m.approximate, ctx.profile))
        rm, rv = t(m.running_mean), t(m.running_var)
        if needs_backward(m):
            def unfused_keep_y():
                y = torch.empty((x.shape[0], w.shape[0]), device=x.device, dtype=x.dtype)
                return _unfused_eval(x, w, b, g, be, rm, rv, eps, m.approximate, ctx.profile, torch.empty_like(y), y)

            return (lambda: linear_bn_gelu_relu_eval_keep_y(x, w, b, g, be, rm, rv, eps, m.approximate, precision,
                                                            True, budget), unfused_keep_y)
        return (lambda: linear_bn_gelu_relu_eval(x, w, b, g, be, rm, rv, eps, m.approximate, precision, True, budget),
                lambda: _unfused_eval(x, w, b, g, be, rm, rv, eps, m.approximate, ctx.profile))

    def replace(self, m: _Match, ctx) -> dict:
        graph = ctx.gm.graph
        site = self._site(m, ctx)
        precision = site["precision"]
        tune = (ctx.options.autotune, ctx.options.tune_budget_s)
        # at the BatchNorm's place: its running statistics are updated (and read, in eval) where
        # eager does it, before whatever the graph runs between it and the ReLU (another site
        # sharing the BatchNorm, a read of the statistics); every input exists by then
        with graph.inserting_before(m.bn):
            x, w, b = cast_to(graph, [m.x, m.weight, m.bias], example_value(m.linear).dtype)
            meta = inline_meta(ctx, site["key"], self._inline_shapes(m))
            if meta is not None:
                site["launch"] = "inline"
            if site["mode"] == "eval":
                op, tail = ((linear_bn_gelu_relu_eval, tune) if meta is None
                            else (linear_bn_gelu_relu_eval_inline, (meta,)))
                out = graph.call_function(op, (x, w, b, m.gamma, m.beta, m.running_mean, m.running_var,
                                               float(m.eps), m.approximate, precision, *tail))
            elif site["mode"] == "eval_keep_y":  # (out, the Linear's output for the backward)
                op, tail = ((linear_bn_gelu_relu_eval_keep_y, tune) if meta is None
                            else (linear_bn_gelu_relu_eval_keep_y_inline, (meta,)))
                res = graph.call_function(op, (x, w, b, m.gamma, m.beta, m.running_mean, m.running_var,
                                               float(m.eps), m.approximate, precision, *tail))
                out = graph.call_function(_getitem, (res, 0))
            else:
                op, tail = ((linear_bn_gelu_relu_train, tune) if meta is None
                            else (linear_bn_gelu_relu_train_inline, (meta,)))
                # the Linear's output kept for the backward, where one will run (no GEMM to
                # recompute there): M x N more memory, as eager and Inductor keep it too
                res = graph.call_function(op, (x, w, b, m.gamma, m.beta, float(m.eps), m.approximate, precision,
                                               *tail, needs_backward(m)))
                out = graph.call_function(_getitem, (res, 0))
                if m.running_mean is not None:
                    self._update_running_stats(graph, m, res)
        out.meta.update(m.relu.meta)
        m.relu.replace_all_uses_with(out)
        for node in (m.relu, m.gelu, m.bn, m.linear):
            graph.erase_node(node)
        return site

    @staticmethod
    def _update_running_stats(graph, m: _Match, res):
        """running = momentum * batch_stat + (1 - momentum) * running, with the unbiased
        variance, as eager's BatchNorm does (num_batches_tracked.add_ stays in the graph)."""
        momentum = float(m.momentum)
        # detached: running statistics are no part of the autograd graph, as in eager
        mean = graph.call_method("detach", (graph.call_function(_getitem, (res, 1)),))
        var = graph.call_method("detach", (graph.call_function(_getitem, (res, 2)),))
        n = graph.call_method("size", (m.x, 0))
        correction = graph.call_function(_truediv, (n, graph.call_function(_sub, (n, 1))))
        unbiased = graph.call_function(torch.mul, (var, correction))
        for running, stat in ((m.running_mean, mean), (m.running_var, unbiased)):
            new = graph.call_function(torch.add, (graph.call_function(torch.mul, (stat, momentum)),
                                                  graph.call_function(torch.mul, (running, 1.0 - momentum))))
            graph.call_method("copy_", (running, new))


import operator as _operator  # noqa: E402

_getitem, _truediv, _sub = _operator.getitem, _operator.truediv, _operator.sub
