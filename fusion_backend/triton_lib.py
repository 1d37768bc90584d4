"""Triton pieces shared by the patterns: the GEMM main loop, tile ordering, stable activations.

Imported only when a pattern module is (at first compile), never by `import fusion_backend`.
Nothing here needs libdevice, so the same code runs under TRITON_INTERPRET=1.
"""
import triton
import triton.language as tl


@triton.jit
def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M row-tiles sweep the columns together so W tiles are reused in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
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
