"""Triton pieces shared by the patterns: the GEMM main loop, tile ordering, stable activations.

Imported only when a pattern module is (at first compile), never by `import fusion_backend`.
Nothing here needs libdevice, so the same code runs under TRITON_INTERPRET=1.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's tile in grouped order (`grouped_tile`)."""
    return grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)


@triton.jit
def grouped_tile(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Tile number -> (row tile, column tile), grouped: GROUP_M row-tiles sweep the columns
    together so W tiles are reused in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    group = tile // per_group
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % per_group) % group_size
    pid_n = (tile % per_group) // group_size
    return pid_m, pid_n


@triton.jit
def gemm_segment(acc, a_ptr, stride_am, stride_ak, w_ptr, stride_wn, stride_wk, rows, cols, K,
                 BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr):
    """acc += A[rows, :K] @ W[cols, :K]^T, reading W as stored (out_features x in_features).

    `rows`/`cols` are already clamped into range (callers wrap them with % M / % N), so only
    the K tail is masked, and not at all when EVEN_K (K % BLOCK_K == 0); any strides work, so
    non-contiguous inputs need no copy."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            w = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    return acc


@triton.jit
def tanh(x):
    """tanh without overflow at any finite input, exact +-1 saturation, ~1 ulp near 0.

    |x| < 0.3: odd Taylor series to x^11 (next term < 1e-9 relative there);
    else sign(x) * (1 - e) / (1 + e) with e = exp(-2|x|) in (0, 0.55], which never
    overflows (the seed's (e^2x - 1)/(e^2x + 1) is inf/inf = NaN above x ~ 44)."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    xs = tl.where(ax < 0.3, x, 0.0)  # the series is only used there; keeps large x out of it
    x2 = xs * xs
    p = -1382.0 / 155925.0
    p = p * x2 + 62.0 / 2835.0
    p = p * x2 - 17.0 / 315.0
    p = p * x2 + 2.0 / 15.0
    p = p * x2 - 1.0 / 3.0
    small = xs + xs * x2 * p
    return tl.where(ax < 0.3, small, tl.where(x < 0, -big, big))


@triton.jit
def store_cell_tile(acc, b_ptr, out_ptr, offs_n, offs_m, M, N, stride_om, stride_on, HAS_BIAS: tl.constexpr,
                     APPLY_TANH: tl.constexpr):
    """Bias, tanh and the store of an out^T tile (rows: output features, columns: batch): the
    RNN cell kernels' epilogue (`tl` and Gluon: a Gluon kernel calls it with its accumulator
    layout)."""
    n_ok = offs_n < N
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    if APPLY_TANH:
        acc = tanh(acc)
    tl.store(out_ptr + offs_m[None, :] * stride_om + offs_n[:, None] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=n_ok[:, None] & (offs_m[None, :] < M))


@triton.jit
def gelu(x, APPROX_TANH: tl.constexpr):
    """GELU as torch computes it: exact (erf) or the tanh form."""
    if APPROX_TANH:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        return 0.5 * x * (1.0 + tanh(inner))
    else:
        return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))


@triton.jit
def relu(x):
    """max(x, 0) that keeps NaN, as torch.relu does."""
    return tl.where(x < 0.0, 0.0, x)


@triton.jit
def store_eval_tile(acc, offs_m, offs_n, M, N, b_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, out_ptr,
                    stride_om, stride_on, eps, HAS_BIAS: tl.constexpr, HAS_GAMMA: tl.constexpr,
                    HAS_BETA: tl.constexpr, APPROX_TANH: tl.constexpr):
    """Bias, BatchNorm with running statistics (computed here, nothing folded on the host),
    GELU, ReLU and the store of an out tile: the eval MLP kernels' epilogue (`tl` and Gluon)."""
    n_ok = offs_n < N
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    # BatchNorm reads the Linear's output as stored in the output dtype (eager's and Inductor's
    # graphs store it): rounded to fp16/bf16, inf beyond their range (a no-op in fp32)
    acc = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
    mean = tl.load(mean_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    # eps in fp32 as Triton's own launcher types a Python float; Inductor's launch of the
    # inline op types it fp64, which would turn the whole tile's epilogue into fp64 math
    scale = 1.0 / tl.sqrt(tl.load(var_ptr + offs_n, mask=n_ok, other=1.0).to(tl.float32) + tl.cast(eps, tl.float32))
    if HAS_GAMMA:
        scale = scale * tl.load(gamma_ptr + offs_n, mask=n_ok, other=1.0).to(tl.float32)
    z = (acc - mean[None, :]) * scale[None, :]
    if HAS_BETA:
        z += tl.load(beta_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = relu(gelu(z, APPROX_TANH))
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & n_ok[None, :])


# ---------------------------------------------------------------- 3xTF32 with one operand pre-split
# tl.dot(..., input_precision="tf32x3") splits both operands in registers at every K step; on
# Hopper the B operand must then go back to shared memory before the MMA, which kept the fp32
# "highest" GEMM at ~3x the TF32 time. Splitting one operand once per call (a pointwise pass)
# and bringing head and remainder in by TMA leaves only the register-resident A operand to
# split in the kernel (H100, 16384x4096->4096: 5.6-5.9 ms vs 6.9 ms; benchmarks/presplit_3xtf32.py).

@triton.jit
def tf32_head(x):
    """x rounded to the nearest TF32 value (10 mantissa bits; x - head is exact in fp32 and at
    most half a TF32 ulp, so head and remainder carry 22 bits: rounding, not truncating, keeps
    the 3xTF32 error below eager's fp32 error). Where rounding would carry into the inf/NaN
    exponent (|x| within half an ulp of FLT_MAX, or x already inf/NaN) the bits are truncated."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x1000) & 0xFFFFE000
    head = tl.where((rounded & 0x7F800000) == 0x7F800000, bits & 0xFFFFE000, rounded)
    return head.to(tl.float32, bitcast=True)


@triton.jit
def tf32_round(x, PTX: tl.constexpr):
    """`tf32_head` for the operand split inside the GEMM loop, where the guard's extra ops cost
    5-10% (H100). On NVIDIA GPUs (PTX=True) one `cvt.rna.tf32.f32`, what Triton's own tf32x3
    uses; elsewhere (the interpreter) the bit trick with only the NaN guard. Either way |x|
    within half a TF32 ulp of FLT_MAX (>= 3.4026e38) may round to inf here. Truncating instead
    would double the remainder, and with it 3xTF32's error where a sum cancels (a CPU test
    with |x| ~ 1e3: 3.2e-6 vs eager's 3.4e-7)."""
    if PTX:
        return tl.inline_asm_elementwise("cvt.rna.tf32.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        head = ((x.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
        return tl.where(x == x, head, x)


@triton.jit
def tf32_split_kernel(s0, s1, s2, s3, hi_ptr, lo_ptr, M, K0, K1, K2, K3, s0m, s0k, s1m, s1k, s2m, s2k, s3m, s3k,
                      c1, c2, c3, stride_out, NUM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """hi = tf32_head(src), lo = src - hi for up to four 2-D fp32 tensors of M rows and any
    strides (one launch for all of a cell's cat operands): tensor s goes to columns c_s.. of
    the two planes (c_0 = 0); the programs along axis 1 walk the column tiles of all of them.
    The slots past NUM are never compiled (the conditions are compile-time True for the last
    tensor), so the launcher passes None there: each argument costs host time per launch."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    tile = tl.program_id(1)
    e0 = tl.cdiv(K0, BLOCK_K)
    if NUM == 1 or tile < e0:
        src, K, sm, sk, col, t = s0, K0, s0m, s0k, 0, tile
    else:
        e1 = e0 + tl.cdiv(K1, BLOCK_K)
        if NUM == 2 or tile < e1:
            src, K, sm, sk, col, t = s1, K1, s1m, s1k, c1, tile - e0
        else:
            e2 = e1 + tl.cdiv(K2, BLOCK_K)
            if NUM == 3 or tile < e2:
                src, K, sm, sk, col, t = s2, K2, s2m, s2k, c2, tile - e1
            else:
                src, K, sm, sk, col, t = s3, K3, s3m, s3k, c3, tile - e2
    offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    rows = offs_m.to(tl.int64)[:, None]
    v = tl.load(src + rows * sm + offs_k[None, :] * sk, mask=ok, other=0.0)
    hi = tf32_head(v)
    out = rows * stride_out + col + offs_k[None, :]
    tl.store(hi_ptr + out, hi, mask=ok)
    tl.store(lo_ptr + out, v - hi, mask=ok)


@triton.jit
def dot_3xtf32(a, b_hi, b_lo, acc, small, seed, PTX: tl.constexpr):
    """(acc, small) after adding a @ b in 3xTF32 (about fp32 accuracy), b given as TF32 head
    and remainder (rounded to nearest by `tf32_split_kernel`), a split here (`tf32_round`).
    Start with acc = small = zeros and `seed = opaque_zeros(...)`; finish with
    `finish_3xtf32(acc, small)`. PTX: see `tf32_round` (`ptx_cvt(tensor)` on the host).

    The MMA's own fp32 accumulation loses bits over a long chain (H100: all three products
    chained over K = 4096: rel. error 1.5e-5; the head products alone: 5e-6), so the head
    product starts fresh at each K step and is added to acc in fp32 (1.4e-7). It starts from
    `seed`, zeros the compiler cannot see as zeros, else it folds `acc + dot(a, b, 0)` back
    into one chain. The remainder products are 2^-11 smaller and chain into `small`, where
    the MMA's rounding is negligible; NaN there (inf - inf in a split, inf * 0 in a cross
    term) is dropped once at the end, as Triton's tf32x3 drops it per dot: the head product
    carries the inf or NaN. (Masking at every K step: ~10% slower on the H100.)"""
    a_hi = tf32_round(a, PTX)
    a_lo = a - a_hi
    small = tl.dot(a_lo, b_hi, small, input_precision="tf32")
    small = tl.dot(a_hi, b_lo, small, input_precision="tf32")
    return acc + tl.dot(a_hi, b_hi, seed, input_precision="tf32"), small


@triton.jit
def opaque_zeros(acc, runtime_value):
    """Zeros shaped like acc, computed from a runtime scalar (x * 0 is not folded under IEEE
    rules), for `dot_3xtf32`'s seed."""
    return tl.zeros_like(acc) * runtime_value.to(tl.float32)


@triton.jit
def finish_3xtf32(acc, small):
    return acc + tl.where(small == small, small, 0.0)


def ptx_cvt(t) -> bool:
    """Whether kernels on `t`'s device may use PTX inline asm (NVIDIA; not ROCm, not the interpreter)."""
    return t.is_cuda and torch.version.hip is None
