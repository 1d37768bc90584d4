"""Experiment for the eval Linear+BN+GELU+ReLU kernel at TF32 / bf16 on Hopper: a persistent,
warp-specialized "ping-pong" main loop in Gluon, against cuBLAS, the unfused path and the
package's `tl` tiles (one per program and persistent). Not used by the package.

Why: the `tl` kernels stay 10-20% behind the bare cuBLAS GEMM at TF32 and bf16, and the
epilogue (bias, BatchNorm, erf GELU, ReLU) holds the tensor cores idle while it runs. Here one
warp issues the TMA loads into one ring of stages in tile order, and two consumer warpgroups
take the program's tiles in turn (0, 2, 4 ... and 1, 3, 5 ...), their main loops one after the
other (`order` barriers), so one runs its epilogue while the other has the tensor cores
(CUTLASS's ping-pong schedule).

Measured (H100, torch 2.11, Triton 3.6, 16384x4096->4096, `--rounds 5`, medians, ms): TF32
ping-pong 128x128x32 6 stages 1.820, `tl` persistent 128x256x32 w8 s3 1.778, `tl` one tile per
program 1.870, unfused 1.861, cuBLAS alone 1.614; bf16 ping-pong 128x128x64 1.308, `tl`
persistent 0.971, `tl` 0.981, unfused 0.935, cuBLAS 0.839. With the epilogue replaced by a
plain store the ping-pong kernel ran the same (TF32 1.772 vs 1.770, bf16 1.307 vs 1.309): its
one-warpgroup 128x128 main loop is the limit, not the epilogue. First versions: one ring per
consumer (3 stages each) 2.22 / 1.41; a shared ring without the order barriers is wrong (a
consumer waiting two rounds ahead of the loader sees its round's parity).

    python benchmarks/pingpong_gemm.py [--M 16384 --K 4096 --N 4096] [--rounds 3]
"""
import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait

import fusion_backend.patterns.linear_bn_gelu_relu as lbgr
from persistent_gemm import persistent_eval
from bench import eval_block_inputs, eval_block_references, print_variants, sweep_args, try_variant
from fusion_backend import config_spaces, devices
from fusion_backend.triton_lib import store_eval_tile
from fusion_backend.patterns._cell_gluon import _acc_layout, _descriptor, _tma_load
from fusion_backend.patterns._common import kernel_kwargs


@gluon.jit
def _tile_coords(i, num_m, num_n, GROUP_M: gl.constexpr, NUM_PROGRAMS: gl.constexpr):
    """Program-local tile i -> (m0 tile, n0 tile) in grouped order (W tiles reused in L2)."""
    tile = gl.program_id(0) + i * NUM_PROGRAMS
    per_group = GROUP_M * num_n
    first_m = (tile // per_group) * GROUP_M
    group_size = gl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % group_size, (tile % per_group) // group_size


@gluon.jit
def _loader(x_desc, w_desc, x_bufs, w_bufs, ready, empty, order, b_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr,
            out_ptr, M, N, K, stride_om, stride_on, eps, my_tiles, HAS_BIAS: gl.constexpr,
            HAS_GAMMA: gl.constexpr, HAS_BETA: gl.constexpr, APPROX_TANH: gl.constexpr, GROUP_M: gl.constexpr,
            NUM_PROGRAMS: gl.constexpr):
    """One warp: the TMA loads of every K step of the program's tiles, in tile order, into one
    ring of stages shared by the two consumers."""
    BM: gl.constexpr = x_desc.block_type.shape[0]
    BK: gl.constexpr = x_desc.block_type.shape[1]
    BN: gl.constexpr = w_desc.block_type.shape[0]
    S: gl.constexpr = x_bufs.type.shape[0]
    ksteps = gl.cdiv(K, BK)
    num_m = gl.cdiv(M, BM)
    num_n = gl.cdiv(N, BN)
    for i in range(my_tiles):
        pid_m, pid_n = _tile_coords(i, num_m, num_n, GROUP_M, NUM_PROGRAMS)
        for k in range(ksteps):
            g = i * ksteps + k
            st = g % S
            # a fresh mbarrier counts as having completed phase 1: the first round does not wait
            mbarrier.wait(empty.index(st), ((g // S) & 1) ^ 1)
            bar = ready.index(st)
            mbarrier.expect(bar, x_desc.block_type.nbytes + w_desc.block_type.nbytes)
            _tma_load(x_desc, [pid_m * BM, k * BK], bar, x_bufs.index(st), True)
            _tma_load(w_desc, [pid_n * BN, k * BK], bar, w_bufs.index(st), True)


@gluon.jit
def _consume(x_desc, w_desc, x_bufs, w_bufs, ready, empty, order, b_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr,
             out_ptr, M, N, K, stride_om, stride_on, eps, my_tiles, HAS_BIAS: gl.constexpr,
             HAS_GAMMA: gl.constexpr, HAS_BETA: gl.constexpr, APPROX_TANH: gl.constexpr, GROUP_M: gl.constexpr,
             NUM_PROGRAMS: gl.constexpr, WHICH: gl.constexpr):
    """One warpgroup: main loop and epilogue of tiles WHICH, WHICH + 2, ... of the program. The
    two consumers' main loops take turns (`order`: a consumer starts waiting for its tile's
    stages only when the other has passed the waits of the tile before it), which keeps the
    stage parities unambiguous (every slot then holds the round this consumer waits for, or
    the one before it) and gives one consumer the tensor cores while the other runs its epilogue."""
    BM: gl.constexpr = x_desc.block_type.shape[0]
    BK: gl.constexpr = x_desc.block_type.shape[1]
    BN: gl.constexpr = w_desc.block_type.shape[0]
    S: gl.constexpr = x_bufs.type.shape[0]
    acc_layout: gl.constexpr = _acc_layout(BM, BN, 4, 256 // x_desc.dtype.primitive_bitwidth)
    ksteps = gl.cdiv(K, BK)
    num_m = gl.cdiv(M, BM)
    num_n = gl.cdiv(N, BN)
    for i in range(WHICH, my_tiles, 2):
        pid_m, pid_n = _tile_coords(i, num_m, num_n, GROUP_M, NUM_PROGRAMS)
        q = i // 2
        # consumer 0's tile q follows consumer 1's tile q - 1; consumer 1's tile q follows consumer 0's tile q
        mbarrier.wait(order.index(WHICH), (q - 1 + WHICH) & 1, pred=i > 0)
        acc = gl.zeros([BM, BN], gl.float32, acc_layout)
        g0 = i * ksteps
        for k in range(ksteps):
            g = g0 + k
            st = g % S
            mbarrier.wait(ready.index(st), (g // S) & 1)
            acc = warpgroup_mma(x_bufs.index(st), w_bufs.index(st).permute((1, 0)), acc, is_async=True)
            # the MMA of step g - 1 is done: its stage goes back to the loader
            acc = warpgroup_mma_wait(1, deps=(acc,))
            mbarrier.arrive(empty.index((g + S - 1) % S), count=1, pred=k > 0)
        mbarrier.arrive(order.index(1 - WHICH), count=1)
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(empty.index((g0 + ksteps - 1) % S), count=1)
        offs_m = pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, acc_layout))
        offs_n = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, acc_layout))
        store_eval_tile(acc, offs_m, offs_n, M, N, b_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, out_ptr,
                        stride_om, stride_on, eps, HAS_BIAS, HAS_GAMMA, HAS_BETA, APPROX_TANH)


# One function per consumer: the partitions' arguments are one tuple, a literal added to it
# does not pass through, and Triton 3.6 takes neither *args here nor an `if` on a constexpr
# argument inside a partition.
@gluon.jit
def _consume0(x_desc, w_desc, x_bufs, w_bufs, ready, empty, order, b_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr,
              out_ptr, M, N, K, stride_om, stride_on, eps, my_tiles, HAS_BIAS: gl.constexpr,
              HAS_GAMMA: gl.constexpr, HAS_BETA: gl.constexpr, APPROX_TANH: gl.constexpr, GROUP_M: gl.constexpr,
              NUM_PROGRAMS: gl.constexpr):
    _consume(x_desc, w_desc, x_bufs, w_bufs, ready, empty, order, b_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr,
             out_ptr, M, N, K, stride_om, stride_on, eps, my_tiles, HAS_BIAS, HAS_GAMMA, HAS_BETA, APPROX_TANH,
             GROUP_M, NUM_PROGRAMS, 0)


@gluon.jit
def _consume1(x_desc, w_desc, x_bufs, w_bufs, ready, empty, order, b_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr,
              out_ptr, M, N, K, stride_om, stride_on, eps, my_tiles, HAS_BIAS: gl.constexpr,
              HAS_GAMMA: gl.constexpr, HAS_BETA: gl.constexpr, APPROX_TANH: gl.constexpr, GROUP_M: gl.constexpr,
              NUM_PROGRAMS: gl.constexpr):
    _consume(x_desc, w_desc, x_bufs, w_bufs, ready, empty, order, b_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr,
             out_ptr, M, N, K, stride_om, stride_on, eps, my_tiles, HAS_BIAS, HAS_GAMMA, HAS_BETA, APPROX_TANH,
             GROUP_M, NUM_PROGRAMS, 1)


@gluon.jit
def _pingpong_eval_kernel(x_desc, w_desc, b_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, out_ptr,
                          M, N, K, stride_om, stride_on, eps, HAS_BIAS: gl.constexpr, HAS_GAMMA: gl.constexpr,
                          HAS_BETA: gl.constexpr, APPROX_TANH: gl.constexpr, GROUP_M: gl.constexpr,
                          NUM_STAGES: gl.constexpr, NUM_PROGRAMS: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                          num_warps: gl.constexpr):
    BM: gl.constexpr = x_desc.block_type.shape[0]
    BK: gl.constexpr = x_desc.block_type.shape[1]
    BN: gl.constexpr = w_desc.block_type.shape[0]
    x_bufs = gl.allocate_shared_memory(x_desc.dtype, [NUM_STAGES, BM, BK], x_desc.layout)
    w_bufs = gl.allocate_shared_memory(w_desc.dtype, [NUM_STAGES, BN, BK], w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    order = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(order.index(0), count=1)
    mbarrier.init(order.index(1), count=1)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    total = gl.cdiv(M, BM) * gl.cdiv(N, BN)
    my_tiles = (total - gl.program_id(0) + NUM_PROGRAMS - 1) // NUM_PROGRAMS
    args = (x_desc, w_desc, x_bufs, w_bufs, ready, empty, order, b_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, out_ptr,
            M, N, K, stride_om, stride_on, eps, my_tiles, HAS_BIAS, HAS_GAMMA, HAS_BETA, APPROX_TANH, GROUP_M,
            NUM_PROGRAMS)
    gl.warp_specialize([(_consume0, args), (_consume1, args), (_loader, args)], [4, 1], [CONSUMER_REGS, 24])


def pingpong_eval(x, w, b, gamma, beta, mean, var, out, config):
    M, K = x.shape
    N = w.shape[0]
    BM, BN, BK = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    programs = min(torch.cuda.get_device_properties(x.device).multi_processor_count,
                   triton.cdiv(M, BM) * triton.cdiv(N, BN))
    _pingpong_eval_kernel[(programs,)](
        _descriptor(x, BM, BK), _descriptor(w, BN, BK), b, gamma, beta, mean, var, out, M, N, K,
        out.stride(0), out.stride(1), 1e-5, HAS_BIAS=True, HAS_GAMMA=True, HAS_BETA=True, APPROX_TANH=False,
        GROUP_M=config["GROUP_M"], NUM_STAGES=config["num_stages"], NUM_PROGRAMS=programs,
        CONSUMER_REGS=config["regs"], num_warps=4, maxnreg=config["maxnreg"],
        default_dot_input_precision="tf32")
    return out


def pp(bm, bn, bk, stages, regs=232, maxnreg=168, group=8):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_stages": stages, "GROUP_M": group,
            "regs": regs, "maxnreg": maxnreg}


# (dtype, precision, matmul setting, `tl` tiles (BM, BN, BK, warps, stages) one per program and
# persistent (benchmarks/persistent_gemm.py), ping-pong configs)
CASES = (
    (torch.float32, "tf32", "high", [(128, 256, 32, 8, 3)], [(128, 256, 32, 8, 3), (128, 256, 32, 8, 4)],
     [pp(128, 128, 32, 6)]),
    (torch.bfloat16, "ieee", "high", [(128, 256, 64, 8, 3)], [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4)],
     [pp(128, 128, 64, 6)]),
)


def main():
    args = sweep_args(__doc__)
    M, K, N = args.M, args.K, args.N
    profile = devices.device_profile(torch.device("cuda"))
    rows = []
    for dtype, precision, setting, tl_shapes, persistent_shapes, pp_configs in CASES:
        torch.set_float32_matmul_precision(setting)
        (x, w, b, gamma, beta, mean, var), ref = eval_block_inputs(M, K, N, dtype)
        tag = f"{str(dtype)[6:]} {precision}"
        eval_block_references(rows, tag, (x, w, b, gamma, beta, mean, var), ref, profile)
        for shape in tl_shapes:
            config = config_spaces._g(*shape, TMA=True)
            out = torch.empty((M, N), device="cuda", dtype=dtype)
            run = lbgr.eval_runner(x, w, b, gamma, beta, mean, var, 1e-5, "none", precision, out)
            kwargs = kernel_kwargs(config, profile)
            name = "tl TMA " + "x".join(map(str, shape[:3])) + f" w{shape[3]} s{shape[4]}"
            try_variant(rows, tag, name, lambda run=run, kwargs=kwargs: run(kwargs), out, ref)
        for shape in persistent_shapes:
            out = torch.empty((M, N), device="cuda", dtype=dtype)
            name = "tl persistent TMA " + "x".join(map(str, shape[:3])) + f" w{shape[3]} s{shape[4]}"
            t = (x, w, b, gamma, beta, mean, var, out, precision, config_spaces._g(*shape, TMA=True), False, False)
            try_variant(rows, tag, name, lambda t=t: persistent_eval(*t), out, ref)
        for c in pp_configs:
            out = torch.empty((M, N), device="cuda", dtype=dtype)
            name = f"pingpong {c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} s{c['num_stages']} g{c['GROUP_M']}"
            t = (x, w, b, gamma, beta, mean, var, out, c)
            try_variant(rows, tag, name, lambda t=t: pingpong_eval(*t), out, ref)
    print_variants(rows, f"M={M} K={K} N={N}")


if __name__ == "__main__":
    main()
