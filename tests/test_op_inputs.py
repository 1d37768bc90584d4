"""The fusedtriton ops called directly (`torch.ops.fusedtriton.*`) with inputs their kernels do
not take: a clear RuntimeError naming the op and the argument (ValueError for a training batch
of one, as eager's BatchNorm), never a result. The backend's checks keep such inputs away from
the ops it inserts; these calls used to read past a tensor's end (mismatched shapes), read a
strided vector at stride 1, return fp64 at fp32 precision or uninitialised, and bf16 garbage on
the interpreter; mixed operand dtypes made the kernel fail, which switched it off for that
tuning key in the whole process, compiled models included."""
import pytest
import torch

from fusion_backend import devices
from fusion_backend.patterns import cat_linear_tanh as clt
from fusion_backend.patterns import cell_h2o as ch
from fusion_backend.patterns import linear_bn_gelu_relu as lbgr
from fusion_backend.patterns import rnn_sequence as rs
from test_opcheck import DEVICE, META

M, K, N = 5, 8, 6


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def _eval_args(**changed):
    args = dict(x=_t(M, K), weight=_t(N, K), bias=_t(N), bn_weight=_t(N), bn_bias=_t(N), running_mean=_t(N),
                running_var=torch.rand(N, device=DEVICE) + 0.5, eps=1e-5, approximate="none", precision="ieee")
    args.update(changed)
    return list(args.values())


def _train_args(**changed):
    args = dict(x=_t(M, K), weight=_t(N, K), bias=_t(N), bn_weight=_t(N), bn_bias=_t(N), eps=1e-5,
                approximate="none", precision="ieee")
    args.update(changed)
    return list(args.values())


def _calls_of(name, args_of):
    """The opaque op and its inline twin with the same inputs."""
    return [(name, lambda **c: (getattr(lbgr, name), args_of(**c) + [False, 1.0])),
            (name + "_inline", lambda **c: (getattr(lbgr, name + "_inline"), args_of(**c) + [META]))]


MLP_OPS = (_calls_of("linear_bn_gelu_relu_eval", _eval_args) + _calls_of("linear_bn_gelu_relu_eval_keep_y", _eval_args)
           + _calls_of("linear_bn_gelu_relu_train", _train_args))
STRIDED = _t(2 * N)[::2]


@pytest.mark.parametrize("name, call", MLP_OPS, ids=[n for n, _ in MLP_OPS])
@pytest.mark.parametrize("bad, expect", [
    (dict(weight=_t(N, K + 4)), "weight has 12 columns, expected 8"),
    (dict(x=_t(M, K, 1)), "x must be 2-D"),
    (dict(bias=_t(N - 3)), "bias has 3 elements, expected 6"),
    (dict(bn_weight=STRIDED), "bn_weight must have unit stride"),
    (dict(bn_bias=_t(1).expand(N)), "bn_bias must have unit stride"),
    (dict(weight=_t(N, K, dtype=torch.float16)), "weight has dtype torch.float16, expected torch.float32"),
    (dict(x=_t(M, K, dtype=torch.float64), weight=_t(N, K, dtype=torch.float64)), "dtype torch.float64 is not supported"),
    (dict(approximate="bogus"), "approximate='bogus' is not one of"),
    (dict(precision="fp8"), "precision='fp8' is not one of"),
], ids=["weight_cols", "x_3d", "bias_len", "strided_gamma", "expanded_beta", "mixed_dtype", "fp64", "approximate",
        "precision"])
def test_mlp_ops_refuse_what_their_kernels_do_not_take(name, call, bad, expect):
    if "train" in name and set(bad) & {"running_mean", "running_var"}:
        pytest.skip("the training op takes no running statistics")
    op, args = call(**bad)
    with pytest.raises(RuntimeError, match=f"fusedtriton::{name}: {expect}"):
        op(*args)


@pytest.mark.parametrize("name, call", MLP_OPS[:4], ids=[n for n, _ in MLP_OPS[:4]])
def test_eval_ops_refuse_strided_running_statistics(name, call):
    op, args = call(running_var=(torch.rand(2 * N, device=DEVICE) + 0.5)[::2])
    with pytest.raises(RuntimeError, match="running_var must have unit stride"):
        op(*args)


@pytest.mark.parametrize("name", ["linear_bn_gelu_relu_train", "linear_bn_gelu_relu_train_inline"])
def test_train_ops_refuse_a_batch_of_one_as_eager_does(name):
    args = _train_args(x=_t(1, K))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        torch.nn.functional.batch_norm(_t(1, N), None, None, training=True)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        getattr(lbgr, name)(*args, *([False, 1.0] if "inline" not in name else [META]))


CELL_OPS = [
    ("cat_linear_tanh", lambda xs, w, b, p="ieee": clt.cat_linear_tanh(xs, w, b, p, False, 1.0)),
    ("cat_linear_tanh_saving", lambda xs, w, b, p="ieee": clt.cat_linear_tanh_saving(xs, w, b, p, False, 1.0)),
    ("cat_linear_tanh_inline", lambda xs, w, b, p="ieee": clt.cat_linear_tanh_inline(xs, w, b, p, META)),
]


@pytest.mark.parametrize("name, call", CELL_OPS, ids=[n for n, _ in CELL_OPS])
@pytest.mark.parametrize("xs, w, b, expect", [
    (lambda: [_t(M, 3), _t(M, 4)], lambda: _t(N, 8), lambda: _t(N), "weight has 8 columns, expected 7"),
    (lambda: [_t(M, 3), _t(M + 2, 5)], lambda: _t(N, 8), lambda: _t(N), r"xs\[1\] has 7 rows, expected 5"),
    (lambda: [_t(M, 3), _t(M, 5, dtype=torch.float16)], lambda: _t(N, 8), lambda: _t(N),
     r"xs\[1\] has dtype torch.float16, expected torch.float32"),
    (lambda: [_t(M, 4)] * 5, lambda: _t(N, 20), lambda: _t(N), "takes 1 to 4 operands in xs, got 5"),
    (lambda: [_t(M, 3), _t(M, 5)], lambda: _t(N, 8), lambda: _t(2 * N)[::2], "bias must have unit stride"),
], ids=["widths", "rows", "mixed_dtype", "five_operands", "strided_bias"])
def test_cell_ops_refuse_what_their_kernels_do_not_take(name, call, xs, w, b, expect):
    name = name.replace("_saving", "")  # the saving op runs the plain one's forward
    with pytest.raises(RuntimeError, match=f"fusedtriton::{name}: {expect}"):
        call(xs(), w(), b())


@pytest.mark.parametrize("inline", [False, True], ids=["op", "inline"])
@pytest.mark.parametrize("bad, expect", [
    (dict(weight=_t(N, K + 1)), "weight has 9 columns, expected 8"),
    (dict(bias=_t(N + 1)), "bias has 7 elements, expected 6"),
    (dict(x=_t(M, K, dtype=torch.float64), weight=_t(N, K, dtype=torch.float64)), "dtype torch.float64 is not supported"),
], ids=["weight_cols", "bias_len", "fp64"])
def test_h2o_ops_refuse_what_their_kernels_do_not_take(inline, bad, expect):
    args = dict(x=_t(M, K), weight=_t(N, K), bias=_t(N))
    args.update(bad)
    name = "cell_h2o_inline" if inline else "cell_h2o"
    with pytest.raises(RuntimeError, match=f"fusedtriton::{name}: {expect}"):
        if inline:
            ch.cell_h2o_inline(*args.values(), "ieee", META)
        else:
            ch.cell_h2o(*args.values(), "ieee", False, 1.0)


@pytest.mark.parametrize("p, h0, w_h, expect", [
    (lambda: _t(4, 3, 5), lambda: _t(3, 5), lambda: _t(3, 3), "w_h has 3 rows, expected 5"),
    (lambda: _t(4, 3, 5), lambda: _t(2, 5), lambda: _t(5, 5), "h0 has 2 rows, expected 3"),
    (lambda: _t(4, 3), lambda: _t(3, 5), lambda: _t(5, 5), "p must be 3-D"),
    (lambda: _t(4, 3, 5), lambda: _t(3, 5), lambda: _t(5, 5, dtype=torch.float16),
     "w_h has dtype torch.float16, expected torch.float32"),
], ids=["w_rows", "h0_rows", "p_2d", "mixed_dtype"])
def test_recurrence_op_refuses_what_its_kernel_does_not_take(p, h0, w_h, expect):
    with pytest.raises(RuntimeError, match=f"fusedtriton::rnn_recurrence: {expect}"):
        rs.rnn_recurrence(p(), h0(), w_h(), "ieee")


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's dtypes (a GPU takes bf16)")
def test_bf16_is_refused_on_the_interpreter():
    x, w = _t(M, K, dtype=torch.bfloat16), _t(N, K, dtype=torch.bfloat16)
    assert "bfloat16" not in devices.tensor_profile(x).input_dtypes
    with pytest.raises(RuntimeError, match="dtype torch.bfloat16 is not supported on cpu"):
        ch.cell_h2o(x, w, None, "ieee", False, 1.0)


def test_a_refused_direct_call_leaves_the_kernel_on_for_its_key():
    """A mixed-dtype direct call used to fail inside the kernel, which recorded the tuning key
    as failed ("fallback") for the process: a compiled model sharing the key then ran unfused
    for good. (The kernel-failure guard of conftest.py would fail this test too.)"""
    from fusion_backend import autotune

    x0, w, b = _t(M, 3), _t(N, 8), _t(N)
    with pytest.raises(RuntimeError, match="expected torch.float32"):
        clt.cat_linear_tanh([x0, _t(M, 5, dtype=torch.float16)], w, b, "ieee", False, 1.0)
    assert not [k for k, c in autotune.TUNER.choices.items() if c.source == "fallback"]
    x1 = _t(M, 5)
    out = clt.cat_linear_tanh([x0, x1], w, b, "ieee", False, 1.0)
    ref = torch.tanh(torch.nn.functional.linear(torch.cat([x0, x1], 1).double(), w.double(), b.double()))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["linear_bn_gelu_relu_train", "linear_bn_gelu_relu_train_inline",
                                  "linear_bn_gelu_relu_eval_keep_y", "linear_bn_gelu_relu_eval_keep_y_inline"])
def test_extra_outputs_take_no_gradient(name):
    """The batch statistics and the kept Linear output are for the graph's own use: a gradient
    through them was silently dropped (x.grad 0 from (mean + var).sum().backward()); now they
    do not require grad, so such a backward raises, and out's gradient is unchanged."""
    x, w = _t(M, K).requires_grad_(), _t(N, K).requires_grad_()
    train = "train" in name
    args = (_train_args if train else _eval_args)(x=x, weight=w)
    extra = ([False, 1.0, True] if train else [False, 1.0]) if "inline" not in name else (
        [META, True] if train else [META])
    out, *others = getattr(lbgr, name)(*args, *extra)
    assert out.requires_grad and others and not any(t.requires_grad for t in others)
    with pytest.raises(RuntimeError, match="does not require grad"):
        sum(t.sum() for t in others).backward()
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def _cpu(*shape):
    return torch.randn(*shape)


def _mlp_call_on_cpu(name, make):
    """A direct call of the MLP op `name` (from MLP_OPS) with all its tensors on the CPU."""
    def call():
        tensors = dict(x=_cpu(M, K), weight=_cpu(N, K), bias=_cpu(N), bn_weight=_cpu(N), bn_bias=_cpu(N))
        if "train" not in name:
            tensors.update(running_mean=_cpu(N), running_var=torch.rand(N) + 0.5)
        op, args = make(**tensors)
        return op(*args)
    return call


NO_PROFILE_CALLS = [(name, _mlp_call_on_cpu(name, make)) for name, make in MLP_OPS] + [
    ("cat_linear_tanh", lambda: clt.cat_linear_tanh([_cpu(M, 3), _cpu(M, 5)], _cpu(N, 8), _cpu(N), "ieee", False, 1.0)),
    ("cat_linear_tanh_inline",
     lambda: clt.cat_linear_tanh_inline([_cpu(M, 3), _cpu(M, 5)], _cpu(N, 8), _cpu(N), "ieee", META)),
    ("cell_h2o", lambda: ch.cell_h2o(_cpu(M, K), _cpu(N, K), _cpu(N), "ieee", False, 1.0)),
    ("cell_h2o_inline", lambda: ch.cell_h2o_inline(_cpu(M, K), _cpu(N, K), _cpu(N), "ieee", META)),
    ("rnn_recurrence", lambda: rs.rnn_recurrence(_cpu(4, 3, 5), _cpu(3, 5), _cpu(5, 5), "ieee")),
]


@pytest.mark.parametrize("name, call", NO_PROFILE_CALLS, ids=[n for n, _ in NO_PROFILE_CALLS])
def test_a_device_without_a_profile_gets_the_ops_own_error(monkeypatch, name, call):
    """CPU without TRITON_INTERPRET (no profile; a pre-Ampere GPU alike): a RuntimeError naming
    the op and what to do. The checks' fast path raised AttributeError; later rnn_recurrence
    raised an AttributeError from the config space and the inline ops Triton's "0 active
    drivers"."""
    monkeypatch.setattr(devices, "tensor_profile", lambda t: None)
    with pytest.raises(RuntimeError, match=f"fusedtriton::{name} has no Triton profile for device cpu.*TRITON_INTERPRET=1"):
        call()


def test_an_empty_batch_without_a_profile_returns_empty(monkeypatch):
    monkeypatch.setattr(devices, "tensor_profile", lambda t: None)
    x, w, b = torch.randn(0, K), torch.randn(N, K), torch.randn(N)
    assert ch.cell_h2o(x, w, b, "ieee", False, 1.0).shape == (0, N)
    assert ch.cell_h2o_inline(x, w, b, "ieee", META).shape == (0, N)
    assert rs.rnn_recurrence(_cpu(0, 3, 5), _cpu(3, 5), _cpu(5, 5), "ieee").shape == (1, 3, 5)
