"""Experiment for the eval Linear+BN+GELU+ReLU kernel at TF32 / bf16 on Hopper: a persistent,
warp-specialized "cooperative" main loop in Gluon (CUTLASS's other Hopper schedule), against
cuBLAS, the unfused path and `benchmarks/pingpong_gemm.py`'s ping-pong kernel. Not used by the
package.

Why: the ping-pong kernel's main loop (one warpgroup on a 128x128 tile) was its limit
(`pingpong_gemm.py`'s docstring). Here the two consumer warpgroups work on the same 128x256
tile, each on its 64 rows with the widest wgmma (64x256 per instruction, N = 256): per K step
each reads its 64x32 rows of x and the shared 256x32 W tile from one ring of stages (a stage is
released when both have read it). One loader warp issues the TMA loads; the epilogue (bias,
BatchNorm, GELU, ReLU) runs in both warpgroups at once while the loader already fills the next
tile's stages.

    python benchmarks/coop_gemm.py [--M 16384 --K 4096 --N 4096] [--rounds 3]
"""
import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait

from bench import eval_block_inputs, eval_block_references, print_variants, sweep_args, try_variant
from fusion_backend import devices
from fusion_backend.patterns._cell_gluon import _acc_layout, _descriptor, _tma_load
from fusion_backend.triton_lib import store_eval_tile
from pingpong_gemm import _tile_coords, pingpong_eval, pp


@gluon.jit
def _loader(x_desc, w_desc, x_bufs, w_bufs, ready, empty, b_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr,
            out_ptr, M, N, K, stride_om, stride_on, eps, my_tiles, HAS_BIAS: gl.constexpr,
            HAS_GAMMA: gl.constexpr, HAS_BETA: gl.constexpr, APPROX_TANH: gl.constexpr, GROUP_M: gl.constexpr,
            NUM_PROGRAMS: gl.constexpr):
    """One warp: per K step of each tile, the two 64-row halves of the x tile and the W tile
    into one stage of the ring."""
    HALF: gl.constexpr = x_desc.block_type.shape[0]
    BK: gl.constexpr = x_desc.block_type.shape[1]
    BN: gl.constexpr = w_desc.block_type.shape[0]
    S: gl.constexpr = w_bufs.type.shape[0]
    ksteps = gl.cdiv(K, BK)
    num_m = gl.cdiv(M, 2 * HALF)
    num_n = gl.cdiv(N, BN)
    for i in range(my_tiles):
        pid_m, pid_n = _tile_coords(i, num_m, num_n, GROUP_M, NUM_PROGRAMS)
        for k in range(ksteps):
            g = i * ksteps + k
            st = g % S
            mbarrier.wait(empty.index(st), ((g // S) & 1) ^ 1)  # a fresh barrier passes phase 1
            bar = ready.index(st)
            mbarrier.expect(bar, 2 * x_desc.block_type.nbytes + w_desc.block_type.nbytes)
            _tma_load(x_desc, [pid_m * 2 * HALF, k * BK], bar, x_bufs.index(2 * st), True)
            _tma_load(x_desc, [pid_m * 2 * HALF + HALF, k * BK], bar, x_bufs.index(2 * st + 1), True)
            _tma_load(w_desc, [pid_n * BN, k * BK], bar, w_bufs.index(st), True)


@gluon.jit
def _consume(x_desc, w_desc, x_bufs, w_bufs, ready, empty, b_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr,
             out_ptr, M, N, K, stride_om, stride_on, eps, my_tiles, HAS_BIAS: gl.constexpr,
             HAS_GAMMA: gl.constexpr, HAS_BETA: gl.constexpr, APPROX_TANH: gl.constexpr, GROUP_M: gl.constexpr,
             NUM_PROGRAMS: gl.constexpr, WHICH: gl.constexpr):
    """One warpgroup: rows WHICH * 64 .. + 64 of every tile of the program, main loop and
    epilogue. Both consumers read every stage, in the same order; each arrives on the stage's
    `empty` barrier (count 2) once its MMA reading it is done."""
    HALF: gl.constexpr = x_desc.block_type.shape[0]
    BK: gl.constexpr = x_desc.block_type.shape[1]
    BN: gl.constexpr = w_desc.block_type.shape[0]
    S: gl.constexpr = w_bufs.type.shape[0]
    acc_layout: gl.constexpr = _acc_layout(HALF, BN, 4, 256 // x_desc.dtype.primitive_bitwidth)
    ksteps = gl.cdiv(K, BK)
    num_m = gl.cdiv(M, 2 * HALF)
    num_n = gl.cdiv(N, BN)
    for i in range(my_tiles):
        pid_m, pid_n = _tile_coords(i, num_m, num_n, GROUP_M, NUM_PROGRAMS)
        acc = gl.zeros([HALF, BN], gl.float32, acc_layout)
        g0 = i * ksteps
        for k in range(ksteps):
            g = g0 + k
            st = g % S
            mbarrier.wait(ready.index(st), (g // S) & 1)
            acc = warpgroup_mma(x_bufs.index(2 * st + WHICH), w_bufs.index(st).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(1, deps=(acc,))  # the MMA of step g - 1 is done: release its stage
            mbarrier.arrive(empty.index((g + S - 1) % S), count=1, pred=k > 0)
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(empty.index((g0 + ksteps - 1) % S), count=1)
        offs_m = pid_m * 2 * HALF + WHICH * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, acc_layout))
        offs_n = pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, acc_layout))
        store_eval_tile(acc, offs_m, offs_n, M, N, b_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, out_ptr,
                        stride_om, stride_on, eps, HAS_BIAS, HAS_GAMMA, HAS_BETA, APPROX_TANH)


# one function per consumer, as in pingpong_gemm.py (Triton 3.6's partitions take no literal)
@gluon.jit
def _consume0(x_desc, w_desc, x_bufs, w_bufs, ready, empty, b_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr,
              out_ptr, M, N, K, stride_om, stride_on, eps, my_tiles, HAS_BIAS: gl.constexpr,
              HAS_GAMMA: gl.constexpr, HAS_BETA: gl.constexpr, APPROX_TANH: gl.constexpr, GROUP_M: gl.constexpr,
              NUM_PROGRAMS: gl.constexpr):
    _consume(x_desc, w_desc, x_bufs, w_bufs, ready, empty, b_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr,
             out_ptr, M, N, K, stride_om, stride_on, eps, my_tiles, HAS_BIAS, HAS_GAMMA, HAS_BETA, APPROX_TANH,
             GROUP_M, NUM_PROGRAMS, 0)


@gluon.jit
def _consume1(x_desc, w_desc, x_bufs, w_bufs, ready, empty, b_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr,
              out_ptr, M, N, K, stride_om, stride_on, eps, my_tiles, HAS_BIAS: gl.constexpr,
              HAS_GAMMA: gl.constexpr, HAS_BETA: gl.constexpr, APPROX_TANH: gl.constexpr, GROUP_M: gl.constexpr,
              NUM_PROGRAMS: gl.constexpr):
    _consume(x_desc, w_desc, x_bufs, w_bufs, ready, empty, b_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr,
             out_ptr, M, N, K, stride_om, stride_on, eps, my_tiles, HAS_BIAS, HAS_GAMMA, HAS_BETA, APPROX_TANH,
             GROUP_M, NUM_PROGRAMS, 1)


@gluon.jit
def _coop_eval_kernel(x_desc, w_desc, b_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, out_ptr,
                      M, N, K, stride_om, stride_on, eps, HAS_BIAS: gl.constexpr, HAS_GAMMA: gl.constexpr,
                      HAS_BETA: gl.constexpr, APPROX_TANH: gl.constexpr, GROUP_M: gl.constexpr,
                      NUM_STAGES: gl.constexpr, NUM_PROGRAMS: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                      num_warps: gl.constexpr):
    HALF: gl.constexpr = x_desc.block_type.shape[0]
    BK: gl.constexpr = x_desc.block_type.shape[1]
    BN: gl.constexpr = w_desc.block_type.shape[0]
    x_bufs = gl.allocate_shared_memory(x_desc.dtype, [2 * NUM_STAGES, HALF, BK], x_desc.layout)
    w_bufs = gl.allocate_shared_memory(w_desc.dtype, [NUM_STAGES, BN, BK], w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    total = gl.cdiv(M, 2 * HALF) * gl.cdiv(N, BN)
    my_tiles = (total - gl.program_id(0) + NUM_PROGRAMS - 1) // NUM_PROGRAMS
    args = (x_desc, w_desc, x_bufs, w_bufs, ready, empty, b_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, out_ptr,
            M, N, K, stride_om, stride_on, eps, my_tiles, HAS_BIAS, HAS_GAMMA, HAS_BETA, APPROX_TANH, GROUP_M,
            NUM_PROGRAMS)
    gl.warp_specialize([(_consume0, args), (_consume1, args), (_loader, args)], [4, 1], [CONSUMER_REGS, 24])


def coop_eval(x, w, b, gamma, beta, mean, var, out, config):
    M, K = x.shape
    N = w.shape[0]
    BM, BN, BK = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    programs = min(torch.cuda.get_device_properties(x.device).multi_processor_count,
                   triton.cdiv(M, BM) * triton.cdiv(N, BN))
    _coop_eval_kernel[(programs,)](
        _descriptor(x, BM // 2, BK), _descriptor(w, BN, BK), b, gamma, beta, mean, var, out, M, N, K,
        out.stride(0), out.stride(1), 1e-5, HAS_BIAS=True, HAS_GAMMA=True, HAS_BETA=True, APPROX_TANH=False,
        GROUP_M=config["GROUP_M"], NUM_STAGES=config["num_stages"], NUM_PROGRAMS=programs,
        CONSUMER_REGS=config["regs"], num_warps=4, maxnreg=config["maxnreg"],
        default_dot_input_precision="tf32")
    return out


# (dtype, matmul setting, cooperative configs, ping-pong configs for comparison)
CASES = (
    (torch.float32, "high", [pp(128, 256, 32, 4), pp(128, 256, 32, 3), pp(128, 256, 32, 4, group=16)],
     [pp(128, 128, 32, 6)]),
    (torch.bfloat16, "high", [pp(128, 256, 64, 4), pp(128, 256, 64, 3)], [pp(128, 128, 64, 6)]),
)


def main():
    args = sweep_args(__doc__)
    M, K, N = args.M, args.K, args.N
    profile = devices.device_profile(torch.device("cuda"))
    rows = []
    for dtype, setting, coop_configs, pp_configs in CASES:
        torch.set_float32_matmul_precision(setting)
        (x, w, b, gamma, beta, mean, var), ref = eval_block_inputs(M, K, N, dtype)
        tag = str(dtype)[6:]
        eval_block_references(rows, tag, (x, w, b, gamma, beta, mean, var), ref, profile)
        for kind, fn, configs in (("coop", coop_eval, coop_configs), ("pingpong", pingpong_eval, pp_configs)):
            for c in configs:
                out = torch.empty((M, N), device="cuda", dtype=dtype)
                name = f"{kind} {c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} s{c['num_stages']} g{c['GROUP_M']}"
                t = (x, w, b, gamma, beta, mean, var, out, c)
                try_variant(rows, tag, name, lambda t=t, fn=fn: fn(*t), out, ref)
    print_variants(rows, f"M={M} K={K} N={N}")


if __name__ == "__main__":
    main()
