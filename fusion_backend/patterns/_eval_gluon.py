"""The MLP block's fp32 "highest" eval kernel (3xTF32, out = x W^T + epilogue) in Gluon, for
Hopper (sm_90).

Same math as `linear_bn_gelu_relu._gemm_bn_gelu_relu_eval_presplit_kernel` (W pre-split into
TF32 head and remainder once per call and brought in by TMA, x split in registers, the head
product started fresh at each K step), with the K step of the Gluon cell kernel
(`_cell_gluon.mma_3xtf32_step`): the loop waits only for the head product, so the two
remainder products overlap the add and the next x tile's split. The epilogue is the `tl`
kernels' own (`triton_lib.store_eval_tile`: bias, BatchNorm from running statistics, GELU,
ReLU, one store). H100, 16384x4096->4096 with the split pass (`python
benchmarks/presplit_3xtf32.py --rounds 3`): 5.38-5.45 ms at 128x128x32 w8 s3 vs 5.75-6.04 for
the best `tl` tile; in the benchmark the whole block 5.22 / 5.30 ms (`tl`: 5.79-6.01).

Not run under the interpreter: on CPU the `tl` kernels are what is tested, this one is compiled
for sm_90 there (tests/test_presplit_3xtf32.py) and run by the GPU tests.
"""
from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from fusion_backend.triton_lib import store_eval_tile, tile_ids

from ._cell_gluon import _acc_layout, _descriptor, _tma_load, drain_3xtf32, mma_3xtf32_step, stage_ring
from ._common import cdiv


@gluon.jit
def _issue_loads(j, total, x_desc, whi_desc, wlo_desc, x_bufs, hi_bufs, lo_bufs, bars, m0, n0,
                 NUM_STAGES: gl.constexpr):
    """TMA loads of K step j (x tile, W head and remainder tiles) into stage j % NUM_STAGES;
    nothing past the last step. Returns j + 1."""
    BK: gl.constexpr = x_desc.block_type.shape[1]
    pred = j < total
    st = j % NUM_STAGES
    bar = bars.index(st)
    mbarrier.expect(bar, x_desc.block_type.nbytes + 2 * whi_desc.block_type.nbytes, pred=pred)
    _tma_load(x_desc, [m0, j * BK], bar, x_bufs.index(st), pred)
    _tma_load(whi_desc, [n0, j * BK], bar, hi_bufs.index(st), pred)
    _tma_load(wlo_desc, [n0, j * BK], bar, lo_bufs.index(st), pred)
    return j + 1


@gluon.jit
def _eval_3xtf32_kernel(x_desc, whi_desc, wlo_desc, b_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, out_ptr,
                        M, N, K, stride_om, stride_on, eps,
                        HAS_BIAS: gl.constexpr, HAS_GAMMA: gl.constexpr, HAS_BETA: gl.constexpr,
                        APPROX_TANH: gl.constexpr, GROUP_M: gl.constexpr, NUM_STAGES: gl.constexpr,
                        num_warps: gl.constexpr):
    """out = relu(gelu(batchnorm(x W^T + b))) with running statistics, one (BM x BN) tile per
    program, tiles in grouped order (`tile_ids`); x, W head and W remainder by TMA (K tail and
    out-of-range rows read zeros)."""
    BM: gl.constexpr = x_desc.block_type.shape[0]
    BK: gl.constexpr = x_desc.block_type.shape[1]
    BN: gl.constexpr = whi_desc.block_type.shape[0]
    acc_layout: gl.constexpr = _acc_layout(BM, BN, num_warps)
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=1)

    x_bufs, hi_bufs, lo_bufs, bars = stage_ring(NUM_STAGES, x_desc, whi_desc, wlo_desc)

    pid_m, pid_n = tile_ids(M, N, BM, BN, GROUP_M)
    m0 = pid_m * BM
    n0 = pid_n * BN
    total = gl.cdiv(K, BK)
    j = 0
    for _ in gl.static_range(NUM_STAGES - 1):
        j = _issue_loads(j, total, x_desc, whi_desc, wlo_desc, x_bufs, hi_bufs, lo_bufs, bars, m0, n0, NUM_STAGES)
    acc = gl.zeros([BM, BN], gl.float32, acc_layout)
    small = gl.zeros([BM, BN], gl.float32, acc_layout)
    head = gl.zeros([BM, BN], gl.float32, acc_layout)
    for c in range(total):
        st = c % NUM_STAGES
        mbarrier.wait(bars.index(st), (c // NUM_STAGES) & 1)
        acc, head, small = mma_3xtf32_step(x_bufs.index(st).load(a_layout), hi_bufs.index(st).permute((1, 0)),
                                           lo_bufs.index(st).permute((1, 0)), acc, head, small)
        # step c - 1 is done with its stage: load step c - 1 + NUM_STAGES into it
        j = _issue_loads(j, total, x_desc, whi_desc, wlo_desc, x_bufs, hi_bufs, lo_bufs, bars, m0, n0, NUM_STAGES)
    acc = drain_3xtf32(acc, small, bars, NUM_STAGES)
    store_eval_tile(acc, m0 + gl.arange(0, BM, layout=gl.SliceLayout(1, acc_layout)),
                    n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, acc_layout)), M, N,
                    b_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, out_ptr, stride_om, stride_on, eps,
                    HAS_BIAS, HAS_GAMMA, HAS_BETA, APPROX_TANH)


def launch(x, w_hi, w_lo, tensors, M, N, K, eps, flags, config):
    """`_eval_3xtf32_kernel` on TMA-ready x and the pre-split W (`tf32_split`); `tensors` =
    (bias, gamma, beta, running_mean, running_var, out) and `flags` their HAS_BIAS, HAS_GAMMA,
    HAS_BETA, APPROX_TANH, as `linear_bn_gelu_relu.launch_presplit` takes them."""
    BM, BN, BK = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    out = tensors[-1]
    _eval_3xtf32_kernel[(cdiv(M, BM) * cdiv(N, BN),)](
        _descriptor(x, BM, BK), _descriptor(w_hi, BN, BK), _descriptor(w_lo, BN, BK), *tensors,
        M, N, K, out.stride(0), out.stride(1), eps, **flags, GROUP_M=config["GROUP_M"],
        NUM_STAGES=config["num_stages"], num_warps=config["num_warps"],
        # Triton 3.6's Gluon does not take a precision literal in warpgroup_mma
        default_dot_input_precision="tf32")
    return out
