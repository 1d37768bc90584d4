"""What the fused ops' kernels assume of their inputs, checked where an op is called.

The backend's pattern checks ensure all of this for every site it fuses; these checks are for
the ops themselves, which are public (`torch.ops.fusedtriton.*`). A direct call with
mismatched shapes used to read past the end of a tensor, a strided or broadcast per-feature
vector was read at stride 1, fp64 came back computed at fp32 precision (or uninitialised), bf16
on the CPU interpreter came back as garbage, and operands of mixed dtypes made the kernel fail,
which switched the fused kernel off for that tuning key in the whole process, compiled models
included. Each check raises RuntimeError (ValueError where eager's BatchNorm does) naming the
op, the argument and what was expected. Everything here reads sizes, strides and dtypes only
(a few microseconds a call), on real tensors; `torch._check` keeps it guard-free should an
inline op be traced with symbolic sizes.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.fx.experimental.symbolic_shapes import sym_or

from fusion_backend import devices

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
PRECISIONS = ("ieee", "tf32", "tf32x3")
APPROXIMATE = ("none", "tanh")


def _check(op: str, cond, message) -> None:
    """`message()` is only formatted on failure (formatting every call cost ~5 us a check)."""
    if cond is not True:  # a False, or a SymBool: torch._check decides without a guard
        torch._check(cond, lambda: f"fusedtriton::{op}: {message()}")


def operand_dtype(op: str, t: torch.Tensor) -> None:
    """A dtype the fused kernels compute in on this device (fp32/fp16/bf16; the CPU
    interpreter's bf16 dots are wrong, so not there)."""
    profile = devices.tensor_profile(t)
    allowed = profile.input_dtypes if profile is not None else tuple(_DTYPE_NAMES.values())
    _check(op, _DTYPE_NAMES.get(t.dtype) in allowed,
           lambda: f"dtype {t.dtype} is not supported on {t.device} (supported: {', '.join(allowed)}); "
                   "leave this computation to torch ops")


def matrix(op: str, name: str, t: torch.Tensor, like: torch.Tensor, rows=None, cols=None) -> None:
    """2-D, `like`'s dtype and device, and (rows, cols) where given (any strides)."""
    _check(op, t.dim() == 2, lambda: f"{name} must be 2-D, got shape {tuple(t.shape)}")
    _check(op, t.dtype == like.dtype, lambda: f"{name} has dtype {t.dtype}, expected {like.dtype} (all operands alike)")
    _check(op, t.device == like.device, lambda: f"{name} is on {t.device}, expected {like.device}")
    if rows is not None:
        _check(op, t.shape[0] == rows, lambda: f"{name} has {t.shape[0]} rows, expected {rows} (shape {tuple(t.shape)})")
    if cols is not None:
        _check(op, t.shape[1] == cols, lambda: f"{name} has {t.shape[1]} columns, expected {cols} (shape {tuple(t.shape)})")


def vector(op: str, name: str, t: Optional[torch.Tensor], n, like: torch.Tensor) -> None:
    """A per-feature vector (bias, BatchNorm's tensors): None, or 1-D of n floats on `like`'s
    device with unit stride (the kernels read it so)."""
    if t is None:
        return
    _check(op, t.dim() == 1, lambda: f"{name} must be 1-D, got shape {tuple(t.shape)}")
    _check(op, t.shape[0] == n, lambda: f"{name} has {t.shape[0]} elements, expected {n}")
    _check(op, t.is_floating_point(), lambda: f"{name} has dtype {t.dtype}, expected a floating-point dtype")
    _check(op, t.device == like.device, lambda: f"{name} is on {t.device}, expected {like.device}")
    stride, size = t.stride(0), t.shape[0]
    unit = stride == 1 or size <= 1 if type(stride) is int and type(size) is int else sym_or(stride == 1, size <= 1)
    _check(op, unit,
           lambda: f"{name} must have unit stride, got stride {t.stride(0)} (pass {name}.contiguous())")


def profile(op: str, t: torch.Tensor) -> devices.DeviceProfile:
    """The device profile the op's kernels are planned with; RuntimeError naming the op where
    the device has none (every op said so, but rnn_recurrence raised an AttributeError and the
    inline ops Triton's "0 active drivers")."""
    found = devices.tensor_profile(t)
    if found is None:
        raise RuntimeError(f"fusedtriton::{op} has no Triton profile for device {t.device}: the fused ops run on the "
                           "GPUs README lists, and on CPU only under Triton's interpreter (TRITON_INTERPRET=1 set "
                           "before importing triton); elsewhere leave this computation to torch ops")
    return found


def choice(op: str, name: str, value, allowed: Sequence[str]) -> None:
    _check(op, value in allowed, lambda: f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}")


def _vector_ok(t, n, device) -> bool:
    return t is None or (t.dim() == 1 and t.shape[0] == n and (t.stride(0) == 1 or n <= 1) and t.is_floating_point()
                         and t.device == device)


def _fast_dtype_ok(t) -> bool:
    """A GPU's dtypes without the profile lookup (every GPU profile takes all three); a device
    without a profile (CPU without the interpreter) takes the checks one by one, and then the
    forward's own error naming TRITON_INTERPRET (an empty batch still returns empty)."""
    if t.dtype not in _DTYPE_NAMES:
        return False
    if t.is_cuda:
        return True
    profile = devices.tensor_profile(t)
    return profile is not None and _DTYPE_NAMES[t.dtype] in profile.input_dtypes


def linear_bn(op: str, x, weight, bias, gamma, beta, running_mean, running_var, approximate, precision,
              training: bool) -> None:
    """The MLP block's ops: x (M, K), W (N, K), the per-feature vectors of length N."""
    if x.dim() == 2 and weight.dim() == 2 and type(x.shape[0]) is int and type(weight.shape[0]) is int:
        # real tensors (a graph's every call): all of it in one expression, ~5x faster than the
        # checks one by one; anything false takes them, for the message
        n = weight.shape[0]
        if (weight.shape[1] == x.shape[1] and weight.dtype == x.dtype and weight.device == x.device
                and _fast_dtype_ok(x) and approximate in APPROXIMATE and precision in PRECISIONS
                and not (training and x.shape[0] == 1) and _vector_ok(bias, n, x.device)
                and _vector_ok(gamma, n, x.device) and _vector_ok(beta, n, x.device)
                and _vector_ok(running_mean, n, x.device) and _vector_ok(running_var, n, x.device)):
            return
    matrix(op, "x", x, x)
    operand_dtype(op, x)
    matrix(op, "weight", weight, x, cols=x.shape[1])
    n = weight.shape[0]
    for name, t in (("bias", bias), ("bn_weight", gamma), ("bn_bias", beta), ("running_mean", running_mean),
                    ("running_var", running_var)):
        vector(op, name, t, n, x)
    choice(op, "approximate", approximate, APPROXIMATE)
    choice(op, "precision", precision, PRECISIONS)
    if training:  # eager's BatchNorm raises ValueError here, with this message
        torch._check_value(x.shape[0] != 1, lambda: "Expected more than 1 value per channel when training, "
                                                    f"got input size {tuple(x.shape)}")


def cat_linear(op: str, xs, weight, bias, precision, max_operands: int) -> None:
    """The cell's ops: operands (M, K_i) of one dtype and device, W (N, sum K_i)."""
    if 1 <= len(xs) <= max_operands and weight.dim() == 2 and type(weight.shape[0]) is int:
        x0 = xs[0]
        if (all(t.dim() == 2 and type(t.shape[0]) is int and t.shape[0] == x0.shape[0] and t.dtype == x0.dtype
                and t.device == x0.device for t in xs)
                and weight.shape[1] == sum(t.shape[1] for t in xs) and weight.dtype == x0.dtype
                and weight.device == x0.device and _fast_dtype_ok(x0) and precision in PRECISIONS
                and _vector_ok(bias, weight.shape[0], x0.device)):
            return  # (as in linear_bn)
    _check(op, 1 <= len(xs) <= max_operands, lambda: f"takes 1 to {max_operands} operands in xs, got {len(xs)}")
    x0 = xs[0]
    operand_dtype(op, x0)
    for i, t in enumerate(xs):
        matrix(op, f"xs[{i}]", t, x0, rows=x0.shape[0])
    matrix(op, "weight", weight, x0, cols=sum(t.shape[1] for t in xs))
    vector(op, "bias", bias, weight.shape[0], x0)
    choice(op, "precision", precision, PRECISIONS)


def recurrence(op: str, p, h0, w_h, precision) -> None:
    """p (T, B, H) in fp32 or h0's dtype, h0 (B, H), W_h (H, H) in h0's dtype."""
    _check(op, p.dim() == 3, lambda: f"p must be 3-D (T, B, H), got shape {tuple(p.shape)}")
    operand_dtype(op, h0)
    _check(op, p.dtype in (h0.dtype, torch.float32), lambda: f"p has dtype {p.dtype}, expected {h0.dtype} or torch.float32")
    _check(op, p.device == h0.device, lambda: f"p is on {p.device}, expected {h0.device}")
    matrix(op, "h0", h0, h0, rows=p.shape[1], cols=p.shape[2])
    matrix(op, "w_h", w_h, h0, rows=p.shape[2], cols=p.shape[2])
    choice(op, "precision", precision, PRECISIONS)
