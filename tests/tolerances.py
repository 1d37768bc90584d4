"""Acceptance tolerances and the error measure, in one place (DESIGN.md, "Precision classes").

Relative error ‖out − ref‖/‖ref‖ against a float64 reference (`rel_err`):
  fp32 at matmul precision "highest":  max(2 × eager's own error, 1e-6)
  fp32 at "high" (and "medium"):       2e-3
  fp16 / bf16:                         2e-2
"""
import math

import torch

HIGHEST_EAGER_FACTOR = 2.0
HIGHEST_FLOOR = 1e-6
HIGH = 2e-3
HALF = 2e-2
#: rel_err between two fp32 results of the same products summed in another order (split-K
#: partials vs one program): a few roundings of ~sqrt(K) x eps, far inside any class above.
REORDERED_SUMS = 1e-5


def rel_err(out, ref) -> float:
    """‖out − ref‖ / ‖ref‖ (Frobenius norms), computed in float64 on the CPU.

    NaN/Inf anywhere gives NaN/Inf: check non-finite positions separately."""
    out = torch.as_tensor(out).detach().to("cpu", torch.float64)
    ref = torch.as_tensor(ref).detach().to("cpu", torch.float64)
    if out.shape != ref.shape:
        raise AssertionError(f"shape mismatch: {tuple(out.shape)} vs {tuple(ref.shape)}")
    num = torch.linalg.vector_norm(out - ref).item()
    den = torch.linalg.vector_norm(ref).item()
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def highest(eager_err: float) -> float:
    """Tolerance at "highest": twice what eager itself gets wrong vs fp64, at least 1e-6."""
    return max(HIGHEST_EAGER_FACTOR * float(eager_err), HIGHEST_FLOOR)


def tolerance(dtype: torch.dtype, matmul_precision=None, eager_err=None) -> float:
    """The largest acceptable rel_err for outputs computed from `dtype` inputs.

    matmul_precision defaults to torch.get_float32_matmul_precision(); eager_err (eager's
    rel_err vs the same fp64 reference) is required for fp32 at "highest"."""
    if dtype in (torch.float16, torch.bfloat16):
        return HALF
    if dtype != torch.float32:
        raise ValueError(f"no tolerance defined for {dtype}")
    setting = matmul_precision or torch.get_float32_matmul_precision()
    if setting == "highest":
        if eager_err is None:
            raise ValueError('the "highest" tolerance is relative to eager\'s error: pass eager_err')
        return highest(eager_err)
    if setting in ("high", "medium"):
        return HIGH
    raise ValueError(f"unknown float32 matmul precision {setting!r}")


#: allowed_error(dtype, precision, eager_err): the name tests/test_gpu.py uses.
allowed_error = tolerance


def stats_close(dtype: torch.dtype) -> dict:
    """assert_close tolerances for BatchNorm running statistics stored in `dtype`: the fused
    op computes the batch statistics in fp32 from the stored GEMM output, as eager does, so
    they agree to rounding of the storage type (2 ulp)."""
    eps = torch.finfo(dtype).eps
    return {"rtol": max(2 * eps, 1e-5), "atol": max(2 * eps, 1e-5) * 1e-1}


#: Relative tolerance for fp32 gradients of a fused op, element by element (see grad_close).
GRAD_RTOL = 1e-4


def grad_close(ref, scale=None) -> dict:
    """assert_close tolerances for an fp32 gradient against eager's (or fp64's) `ref`.

    A gradient is a sum over the batch or the feature dim (dW = dYᵀX over M rows, dx = dY W
    over N columns, dgamma/dbeta over M); the fused backward recomputes Y and sums in
    another order than eager, so each element carries a few fp32 roundings per term:
    ~sqrt(terms) x eps ~ 1e-6 relative for well-conditioned elements, larger where terms
    cancel. rtol = GRAD_RTOL (~800 eps) bounds the former; elements that cancel to near zero
    get an absolute slack of GRAD_RTOL x `scale`, the magnitude of the summed terms (default
    max|ref|), since their relative error is unbounded in any order of summation. Pass
    `scale` where the exact gradient is zero and `ref` is rounding noise (the Linear bias in
    front of a training-mode BatchNorm: db = sum over the batch of dY, which BatchNorm makes
    cancel exactly); then scale = max|dY|."""
    if scale is None:
        scale = torch.as_tensor(ref).detach().abs().max().item()
    return {"rtol": GRAD_RTOL, "atol": GRAD_RTOL * float(scale)}


def assert_matches(out, eager, ref64, what="output"):
    """out within the fp32 "highest" tolerance of the fp64 reference, and of eager."""
    assert out.shape == eager.shape == ref64.shape, (out.shape, eager.shape, ref64.shape)
    assert out.dtype == eager.dtype
    eager_err = rel_err(eager, ref64)
    tol = tolerance(torch.float32, eager_err=eager_err)
    err = rel_err(out, ref64)
    assert err <= tol, f"{what}: rel_err vs fp64 {err:.3g} > {tol:.3g} (eager's {eager_err:.3g})"
    vs_eager = rel_err(out, eager)
    assert vs_eager <= tol, f"{what}: rel_err vs eager {vs_eager:.3g} > {tol:.3g}"
