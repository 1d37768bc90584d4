"""Pattern `linear_bn_gelu_relu` on the CPU: the real Triton kernels under TRITON_INTERPRET=1
(conftest sets it), in eval and train, several spellings of the model, awkward inputs,
running statistics, gradients and near-misses.

Every check compares the compiled model with eager (the same weights) and with a float64
copy of the model; fp32 at matmul precision "highest" is accepted within
`tolerance(float32, eager_err=...)` = max(2 x eager's own error vs fp64, 1e-6).
"""
import copy
import math
import zlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusion_backend
from fusion_backend import devices
from conftest import randomize_batch_norm as randomize
from tolerances import HIGHEST_FLOOR, assert_matches, grad_close, rel_err, stats_close, tolerance

# CPU tests: the kernels run under Triton's interpreter, which conftest turns on only where
# there is no GPU (tests/test_gpu.py covers the GPU).
pytestmark = pytest.mark.skipif(not devices.interpreter_enabled(),
                                reason="needs TRITON_INTERPRET=1 (conftest sets it when there is no GPU)")

NAME = "linear_bn_gelu_relu"
M, K, N = 37, 100, 75  # no multiple of the interpreter's 16x16x16 tiles


# ----------------------------------------------------------------------------- models

class LBGR(nn.Module):
    """Linear -> BatchNorm1d -> GELU -> ReLU; `spelling` picks how each op is written."""

    def __init__(self, spelling="modules", approximate="none", k=K, n=N, momentum=0.1):
        super().__init__()
        self.spelling, self.approximate = spelling, approximate
        self.lin = nn.Linear(k, n, bias=spelling != "no_bias")
        bn_kwargs = {"momentum": momentum}
        if spelling == "affine_false":
            bn_kwargs["affine"] = False
        if spelling == "no_running_stats":
            bn_kwargs["track_running_stats"] = False
        self.bn = nn.BatchNorm1d(n, **bn_kwargs)
        self.gelu = nn.GELU(approximate=approximate)
        self.relu = nn.ReLU(inplace=True)

    def linear(self, x):
        if self.spelling == "addmm":
            return torch.addmm(self.lin.bias, x, self.lin.weight.t())
        if self.spelling == "matmul":
            return x @ self.lin.weight.T + self.lin.bias
        return self.lin(x)

    def batch_norm(self, y):
        bn = self.bn
        if self.spelling == "F.batch_norm":
            return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                self.training, bn.momentum, bn.eps)
        return bn(y)

    def forward(self, x):
        z = self.batch_norm(self.linear(x))
        a = self.approximate
        if self.spelling == "F.relu":
            return F.relu(F.gelu(z, approximate=a))
        if self.spelling == "torch.relu":
            return torch.relu(F.gelu(z, approximate=a))
        if self.spelling == "Tensor.relu":
            return F.gelu(z, approximate=a).relu()
        return self.relu(self.gelu(z))


class BnOutToo(LBGR):
    """Near-miss: the BatchNorm output is also returned."""

    def forward(self, x):
        z = self.bn(self.lin(x))
        return self.relu(self.gelu(z)), z


def trio(model, train):
    """(model to compile, eager copy, float64 copy), all with the same state."""
    model.train(train)
    return model, copy.deepcopy(model), copy.deepcopy(model).double()


def compile_(model, **kwargs):
    return torch.compile(model, backend="fusedtriton", **kwargs)


def assert_stats_match(model, eager, ref64):
    bn, ebn, rbn = model.bn, eager.bn, ref64.bn
    for name in ("running_mean", "running_var"):
        got, want, ref = getattr(bn, name), getattr(ebn, name), getattr(rbn, name)
        torch.testing.assert_close(got, want, **stats_close(torch.float32), msg=lambda m: f"{name} vs eager: {m}")
        torch.testing.assert_close(got, ref.float(), **stats_close(torch.float32), msg=lambda m: f"{name} vs fp64: {m}")
    assert bn.num_batches_tracked.item() == ebn.num_batches_tracked.item() == rbn.num_batches_tracked.item()


# ----------------------------------------------------------------------------- spellings, eval and train

SPELLINGS = [  # (spelling, GELU approximate)
    ("modules", "none"),
    ("modules", "tanh"),
    ("F.relu", "tanh"),
    ("torch.relu", "none"),
    ("Tensor.relu", "tanh"),
    ("F.batch_norm", "none"),
    ("addmm", "tanh"),
    ("matmul", "none"),
    ("no_bias", "tanh"),
    ("affine_false", "none"),
    ("no_running_stats", "tanh"),
]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("spelling,approximate", SPELLINGS, ids=[f"{s}-{a}" for s, a in SPELLINGS])
def test_spellings_fused_and_correct(spelling, approximate, train):
    torch.manual_seed(zlib.crc32(f"{spelling}{approximate}".encode()) % 1000)
    model, eager, ref = trio(randomize(LBGR(spelling, approximate)), train)
    x = torch.randn(M, K)
    with torch.no_grad():
        out = compile_(model)(x)
        e, r = eager(x), ref(x.double())
    assert fusion_backend.counters[NAME] == 1, dict(fusion_backend.counters)
    assert (e > 0).any() and (e == 0).any()  # the data exercises both sides of the ReLU
    assert_matches(out, e, r)
    if train and spelling != "no_running_stats":
        assert_stats_match(model, eager, ref)
    if spelling == "no_running_stats":
        assert model.bn.running_mean is None and model.bn.num_batches_tracked is None


# ----------------------------------------------------------------------------- awkward inputs

@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_noncontiguous_input(train):
    torch.manual_seed(1)
    model, eager, ref = trio(randomize(LBGR()), train)
    xt = torch.randn(K, M).t()                     # transposed view (column-major)
    xs = torch.randn(M, 2 * K + 1)[:, 1::2]        # strided view with an offset
    assert not xt.is_contiguous() and not xs.is_contiguous()
    compiled = compile_(model)
    with torch.no_grad():
        for layouts, x in enumerate((xt, xs), 1):
            out, e, r = compiled(x), eager(x), ref(x.double())
            assert_matches(out, e, r)
            assert fusion_backend.counters[NAME] == layouts  # each layout its own graph, fused
    if train:
        assert_stats_match(model, eager, ref)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_empty_batch(train, grad):
    """An empty batch is left to Inductor (nothing to gain; in training eager keeps the running
    statistics; in eval with grad on, the op's backward traced by AOT divided by the batch, and
    the whole graph fell back with a warning). The next real batch gets its own graph, fused."""
    import warnings

    torch.manual_seed(2)
    model, eager, ref = trio(randomize(LBGR()), train)
    compiled = compile_(model)
    x = torch.randn(0, K)
    with torch.set_grad_enabled(grad), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback warning
        out, e, r = compiled(x), eager(x), ref(x.double())
    assert out.shape == e.shape == r.shape == (0, N)
    assert out.dtype == e.dtype
    assert fusion_backend.counters[NAME] == 0
    if train:
        assert_stats_match(model, eager, ref)  # eager leaves the running statistics alone
    # the same compiled model still works on a real batch afterwards
    x = torch.randn(M, K)
    with torch.no_grad():
        assert_matches(compiled(x), eager(x), ref(x.double()))
    assert fusion_backend.counters[NAME] == 1
    if train:
        assert_stats_match(model, eager, ref)


@pytest.mark.parametrize("train,approximate", [(False, "none"), (False, "tanh"), (True, "none")],
                         ids=["eval-none", "eval-tanh", "train-none"])
def test_nan_inf_positions_match_eager(train, approximate):
    torch.manual_seed(3)
    model, eager, ref = trio(randomize(LBGR(approximate=approximate)), train)
    x = torch.randn(M, K)
    x[3, 7] = math.nan
    x[10, 2] = math.inf
    x[20, 50] = -math.inf
    with torch.no_grad():
        out, e, r = compile_(model)(x), eager(x), ref(x.double())
    assert fusion_backend.counters[NAME] == 1
    assert e.isnan().any()
    # Eager's vectorized CPU fp32 erf-GELU returns NaN for +inf (its scalar path, fp64 and
    # the GPU return +inf: F.gelu(torch.full((8,), inf)) is NaN, F.gelu(torch.tensor([inf]))
    # is inf). Only there the fused op may follow the fp64 reference instead of eager.
    quirk = e.isnan() & (r == math.inf)
    if approximate == "tanh" or train:
        assert not quirk.any()
    assert (out[quirk] == math.inf).all()
    assert torch.equal(out.isnan(), e.isnan() & ~quirk)
    assert torch.equal(out.isinf(), e.isinf() | quirk)
    finite = torch.isfinite(e)
    assert torch.equal(torch.isfinite(out), finite)
    if train:  # batch statistics are NaN: every output is
        assert out.isnan().all()
    else:  # the rows without NaN/Inf inputs are independent of the others
        assert finite.sum() >= (M - 3) * N // 2
        assert_matches(out[finite], e[finite], r[finite])


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("how", ["half", "autocast"])
def test_fp16_linear_output_overflows_as_eager(how, grad):
    """In fp16 the Linear's output is stored as fp16 before BatchNorm reads it (eager's and
    Inductor's graphs alike): beyond 65504 it is inf there, and BatchNorm, GELU and ReLU carry
    that (inf, or NaN from -inf). The eval epilogue rounds its fp32 accumulator the same way
    (it normalized the fp32 value: finite outputs where eager had inf/NaN, and with gradients a
    finite forward whose backward, from the stored fp16 y, was NaN)."""
    torch.manual_seed(5)
    model = randomize(LBGR(approximate="tanh")).eval()  # (tanh form: no CPU erf quirk at +inf)
    with torch.no_grad():
        w = model.lin.weight
        w.uniform_(-0.1, 0.1)
        w[:10].uniform_(20, 40)  # x W^T beyond fp16's range in these features only
        w[5:10] *= -1            # -inf there: NaN after GELU
        model.bn.running_var.uniform_(3e4, 6e4)
    x = torch.rand(M, K) * 50
    if how == "half":
        model, x = model.half(), x.half()
    model, eager, ref = trio(model, False)
    xs = [x.clone().requires_grad_(grad) for _ in range(2)]
    with torch.set_grad_enabled(grad), torch.autocast("cpu", torch.float16, enabled=how == "autocast"):
        out, e = compile_(model)(xs[0]), eager(xs[1])
    r = ref(x.double())
    assert fusion_backend.counters[NAME] == 1
    assert out.dtype == e.dtype == torch.float16
    assert e[:, :5].isinf().any() and e[:, 5:10].isnan().any() and e[:, 10:].isfinite().all()
    assert torch.equal(out.isnan(), e.isnan()) and torch.equal(out.isinf(), e.isinf())
    assert rel_err(out[:, 10:], r[:, 10:]) <= tolerance(torch.float16)
    if grad:
        g = torch.rand_like(out)
        (out * g).sum().backward()
        (e * g).sum().backward()
        assert torch.equal(xs[0].grad.isfinite(), xs[1].grad.isfinite())


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_large_inputs_stay_finite(train):
    torch.manual_seed(4)
    model, eager, ref = trio(randomize(LBGR(approximate="none" if train else "tanh")), train)
    x = (torch.rand(M, K) * 2 - 1) * 1e4
    x[0, 0], x[1, 1] = 1e4, -1e4
    with torch.no_grad():
        out, e, r = compile_(model)(x), eager(x), ref(x.double())
    assert fusion_backend.counters[NAME] == 1
    finite = torch.isfinite(e)
    assert finite.all()
    assert torch.isfinite(out).all()
    if not train:  # large values made it through the epilogue (train: BatchNorm rescales them)
        assert out.abs().max() > 100
    assert_matches(out, e, r)


# ----------------------------------------------------------------------------- training statistics

def test_training_statistics_under_a_large_common_offset():
    """y ~ 1e6 with a spread ~1 (a big Linear bias): the batch variance stays as accurate as
    eager's against fp64 (within the "highest" factor). The tile sums ran over the 1e6-sized
    values and lost the variance to 3x eager's error; they now run over deviations from each
    feature's first value in the tile."""
    from tolerances import highest

    torch.manual_seed(1)
    model = LBGR(momentum=1.0, k=24, n=20)
    with torch.no_grad():
        model.lin.bias.fill_(1e6)
    model, eager, ref = trio(model, True)
    compiled = compile_(model)
    with torch.no_grad():
        for step in range(4):
            x = torch.randn(64, 24)
            compiled(x), eager(x), ref(x.double())
            got, want = rel_err(model.bn.running_var, ref.bn.running_var), rel_err(eager.bn.running_var,
                                                                                  ref.bn.running_var)
            assert got <= highest(want), f"step {step}: running_var rel_err {got:.3g} vs eager's {want:.3g}"
    assert fusion_backend.counters[NAME] == 1


def test_infinite_inputs_give_eagers_running_mean():
    """An inf (and a -inf) in a column of a batch spanning several row tiles: the merged mean
    is inf, or NaN where both meet, as eager's (the merge's `mb - mean` made every such mean
    NaN); running_var NaN as eager's, outputs' NaN positions as eager's."""
    import math

    torch.manual_seed(7)
    model, eager, _ = trio(LBGR(k=12, n=10), True)
    x = torch.randn(21, 12)
    x[0, 0], x[20, 1] = math.inf, -math.inf
    with torch.no_grad():
        out, want = compile_(model)(x), eager(x)
    assert fusion_backend.counters[NAME] == 1
    for name in ("running_mean", "running_var"):
        got, ref = getattr(model.bn, name), getattr(eager.bn, name)
        assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.isinf(), ref.isinf()), (name, got, ref)
        assert torch.equal(got[got.isinf()], ref[ref.isinf()])
    assert torch.equal(out.isnan(), want.isnan())


def test_training_three_steps_custom_momentum():
    torch.manual_seed(5)
    model, eager, ref = trio(randomize(LBGR(momentum=0.3)), True)
    compiled = compile_(model)
    with torch.no_grad():
        for step in range(3):
            x = torch.randn(M, K) * (1 + step)
            assert_matches(compiled(x), eager(x), ref(x.double()), what=f"step {step}")
    assert fusion_backend.counters[NAME] == 1
    assert model.bn.num_batches_tracked.item() == 3
    assert_stats_match(model, eager, ref)
    # the statistics really moved (momentum 0.3 from randomized running stats)
    assert not torch.allclose(model.bn.running_mean, randomize(LBGR()).bn.running_mean)


def test_training_batch_of_one_raises_like_eager():
    torch.manual_seed(6)
    model, eager, ref = trio(randomize(LBGR()), True)
    x = torch.randn(1, K)
    excs = []
    for m, inp in ((eager, x), (ref, x.double())):
        with pytest.raises(Exception) as info:
            m(inp)
        excs.append(info.value)
    assert type(excs[0]) is type(excs[1]) is ValueError
    message = "Expected more than 1 value per channel"
    assert message in str(excs[0])
    # Dynamo (torch 2.13) runs BatchNorm's batch-size check while tracing and wraps eager's
    # ValueError in its own TorchRuntimeError for every backend, before any backend runs;
    # so the compiled model must raise what torch.compile itself raises, with eager's message.
    with pytest.raises(Exception) as with_inductor:
        torch.compile(copy.deepcopy(model), backend="inductor")(x)
    torch._dynamo.reset()
    with pytest.raises(Exception) as info:
        compile_(model)(x)
    assert type(info.value) is type(with_inductor.value)
    assert isinstance(info.value, ValueError) or message in str(info.value), repr(info.value)
    assert fusion_backend.counters[NAME] == 0
    # running statistics untouched everywhere (eager's BatchNorm1d did bump
    # num_batches_tracked before its check raised; the traced graph never ran)
    assert model.bn.num_batches_tracked.item() == 0
    for m in (eager, ref):
        m.bn.num_batches_tracked.zero_()
    assert_stats_match(model, eager, ref)
    # the compiled model still trains on a real batch afterwards
    x = torch.randn(M, K)
    with torch.no_grad():
        assert_matches(compile_(model)(x), eager(x), ref(x.double()))
    assert fusion_backend.counters[NAME] == 1
    assert_stats_match(model, eager, ref)


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_gradients_match_eager(train):
    torch.manual_seed(7)
    model, eager, ref = trio(randomize(LBGR(approximate="tanh" if train else "none")), train)
    x = torch.randn(M, K)
    grad_out = torch.randn(M, N)
    linear_out = []  # the fp64 model's Linear output, to read dY (the scale of the summed terms)

    def keep(mod, inp, y):
        y.retain_grad()
        linear_out.append(y)

    ref.lin.register_forward_hook(keep)
    grads = []
    for m, dtype, fn in ((model, torch.float32, compile_(model)), (eager, torch.float32, eager),
                         (ref, torch.float64, ref)):
        xi = x.detach().clone().to(dtype).requires_grad_(True)
        out = fn(xi)
        (out * grad_out.to(dtype)).sum().backward()
        grads.append({"x": xi.grad, "W": m.lin.weight.grad, "b": m.lin.bias.grad,
                      "gamma": m.bn.weight.grad, "beta": m.bn.bias.grad, "out": out.detach()})
    assert fusion_backend.counters[NAME] == 1
    got, want, ref64 = grads
    assert_matches(got["out"], want["out"], ref64["out"])
    dy_scale = linear_out[0].grad.abs().max().item()
    for name in ("x", "W", "b", "gamma", "beta"):
        assert got[name] is not None, name
        # in training BatchNorm removes the batch mean, so db is exactly 0: compare it at
        # the scale of the dY terms it sums (its fp32 value is rounding noise)
        scale = dy_scale if (train and name == "b") else None
        if scale is None:
            assert got[name].abs().max() > 0, name
        else:
            assert ref64[name].abs().max() < 1e-12 * scale
        torch.testing.assert_close(got[name], want[name], **grad_close(want[name], scale),
                                   msg=lambda m: f"grad {name} vs eager: {m}")
        torch.testing.assert_close(got[name], ref64[name].float(), **grad_close(ref64[name], scale),
                                   msg=lambda m: f"grad {name} vs fp64: {m}")
    if train:
        assert_stats_match(model, eager, ref)


# ----------------------------------------------------------------------------- near-misses

def _explain_and_check(model, x, expected_reason, dtype=torch.float32):
    """explain() names the site as not fused with the expected reason; the compiled model
    still equals eager and the fp64 reference."""
    model.eval()
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    with torch.no_grad():
        report = fusion_backend.explain(model, x)
    assert report.profile == "interpreter"
    assert report.fused == []
    sites = [s for s in report.skipped if s.pattern == NAME]
    assert len(sites) == 1, str(report)
    assert expected_reason in sites[0].reason, sites[0].reason
    text = str(report)
    assert NAME in text and sites[0].reason in text and "NOT fused" in text
    fusion_backend.counters.clear()
    torch._dynamo.reset()
    with torch.no_grad():
        out, e, r = compile_(model)(x), eager(x), ref(x.double())
    assert fusion_backend.counters[NAME] == 0
    outs, es, rs = (o if isinstance(o, tuple) else (o,) for o in (out, e, r))
    for o, ee, rr in zip(outs, es, rs):
        if dtype == torch.float64:  # the fp64 model is its own fp64 reference
            torch.testing.assert_close(o, ee)
            torch.testing.assert_close(o, rr)
            assert rel_err(o, rr) <= HIGHEST_FLOOR
        else:
            assert_matches(o, ee, rr)
    return report


def test_near_miss_intermediate_used_elsewhere():
    torch.manual_seed(8)
    _explain_and_check(randomize(BnOutToo()), torch.randn(M, K), "has other users")


def test_near_miss_3d_batchnorm_input():
    torch.manual_seed(9)
    # (N, C, L) input: Linear over L, BatchNorm1d over the C channels
    model = LBGR(k=20, n=16)
    model.bn = nn.BatchNorm1d(12)
    randomize(model)
    _explain_and_check(model, torch.randn(8, 12, 20), "must be 2-D")


class StridedBnVectors(LBGR):
    """F.batch_norm with strided running statistics and weight (views of longer buffers)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("stats", torch.rand(2, 2 * self.lin.out_features) + 0.5)

    def forward(self, x):
        y = self.lin(x)
        y = torch.nn.functional.batch_norm(y, self.stats[0, ::2], self.stats[1, ::2], self.bn.weight, self.bn.bias,
                                           False, 0.1, 1e-5)
        return torch.relu(torch.nn.functional.gelu(y))


def test_near_miss_strided_vectors():
    torch.manual_seed(11)
    _explain_and_check(randomize(StridedBnVectors()).eval(), torch.randn(M, K), "strided vector (stride 2)")


class BroadcastBias(LBGR):
    """`x @ W.T + b` with a bias of one element, broadcast over the N features."""

    def __init__(self):
        super().__init__()
        self.b1 = nn.Parameter(torch.randn(1))

    def forward(self, x):
        return self.relu(self.gelu(self.bn(x @ self.lin.weight.T + self.b1)))


def test_near_miss_broadcast_bias():
    torch.manual_seed(12)
    _explain_and_check(randomize(BroadcastBias()).eval(), torch.randn(M, K), "not (75,): a broadcast per-feature")


def test_near_miss_float64():
    torch.manual_seed(10)
    model = randomize(LBGR()).double()
    _explain_and_check(model, torch.randn(M, K, dtype=torch.float64), "unsupported dtype torch.float64",
                       dtype=torch.float64)


class StatsReadFirst(nn.Module):
    """A penalty on the running mean, computed before the training-mode block (autograd saves
    running_mean for the gradient of `scale`)."""

    def __init__(self):
        super().__init__()
        self.lin, self.bn, self.scale = nn.Linear(K, N), nn.BatchNorm1d(N), nn.Parameter(torch.rand(N))

    def forward(self, x):
        penalty = (self.bn.running_mean * self.scale).sum()
        return torch.relu(F.gelu(self.bn(self.lin(x)))), penalty


class SharedBatchNorm(nn.Module):
    """One BatchNorm after two Linears: two training sites updating the same statistics."""

    def __init__(self):
        super().__init__()
        self.lin1, self.lin2, self.bn = nn.Linear(K, N), nn.Linear(K, N), nn.BatchNorm1d(N)

    def forward(self, x):
        return torch.relu(F.gelu(self.bn(self.lin1(x)))) + torch.relu(F.gelu(self.bn(self.lin2(x))))


def test_running_stats_saved_before_the_training_site_leave_it_unfused():
    """The site's in-graph update of the running statistics bumps their version, eager's kernel
    does not: a backward that saved them before (here for d penalty / d scale) failed, and the
    whole graph fell back to Inductor with a warning. The site is left unfused with the reason;
    results, gradients and statistics as eager's."""
    import warnings

    torch.manual_seed(14)
    model = randomize(StatsReadFirst()).train()
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    x = torch.randn(M, K)
    report = fusion_backend.explain(copy.deepcopy(model), x)
    assert report.fused == [] and "read with grad on before the BatchNorm" in report.skipped[0].reason, report
    torch._dynamo.reset()
    fusion_backend.counters.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback warns
        outs = [compile_(model)(x), eager(x), ref(x.double())]
        for out, penalty in outs:
            (out.sum() + penalty).backward()
    for got, want, r in zip(*outs):
        assert_matches(got, want, r)
    assert_stats_match(model, eager, ref)
    # (d penalty / d scale is left out: eager's backward reads the running mean its BatchNorm has
    # updated since, Inductor's the value the penalty read; the site is Inductor's here)
    for name in ("lin.weight", "bn.weight", "bn.bias"):
        got, want = model.get_parameter(name).grad, eager.get_parameter(name).grad
        torch.testing.assert_close(got, want, **grad_close(want), msg=lambda m: f"{name}: {m}")


def test_batch_norm_shared_by_two_training_sites():
    """The second site's statistics are read by the first site's update (not saved by any
    backward): both fused, statistics updated twice as in eager, gradients as eager's."""
    torch.manual_seed(15)
    model = randomize(SharedBatchNorm()).train()
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    x = torch.randn(M, K)
    outs = [compile_(model)(x), eager(x), ref(x.double())]
    assert fusion_backend.counters[NAME] == 2
    assert_matches(*outs)
    for out in outs:
        out.square().sum().backward()
    assert_stats_match(model, eager, ref)
    for name in ("lin1.weight", "lin2.weight", "bn.weight", "bn.bias"):
        got, want = model.get_parameter(name).grad, eager.get_parameter(name).grad
        torch.testing.assert_close(got, want, **grad_close(want), msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("half", ["module", "statistics", "weight"])
def test_near_miss_batch_norm_dtypes_eager_refuses(half):
    """BatchNorm tensors in fp16 beside an fp32 Linear (or fp16 and fp32 mixed among them):
    eager raises; Dynamo compiles the graph (it traces shapes), so the site is left to Inductor,
    named in explain(), not fused as if the dtypes were fine."""
    torch.manual_seed(13)
    model = randomize(LBGR()).eval()
    x = torch.randn(M, K)
    bn = model.bn
    if half == "module":
        bn.half()
    elif half == "statistics":
        bn.running_mean.data = bn.running_mean.half()
        bn.running_var.data = bn.running_var.half()
    else:
        bn.weight.data = bn.weight.half()
    with pytest.raises(RuntimeError):
        copy.deepcopy(model)(x)
    with torch.no_grad():
        report = fusion_backend.explain(model, x)
    assert report.fused == [] and len(report.skipped) == 1, report
    assert "eager raises" in report.skipped[0].reason, report


# ----------------------------------------------------------------------------- aliasing

class MutatesAliasAfterLinear(LBGR):
    """The Linear reads a view of x; x is written in place (spelled `how`) before
    BatchNorm/GELU/ReLU run."""

    def __init__(self, how="mul_"):
        super().__init__()
        self.how = how

    def forward(self, x):
        y = self.lin(x[:, :])
        if self.how == "mul_":
            x.mul_(2)
        else:  # what nn.ReLU(inplace=True) on x becomes in the graph
            F.relu(x, inplace=True)
        return self.relu(self.gelu(self.bn(y)))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("how", ["mul_", "relu(inplace=True)"])
def test_inplace_write_to_input_alias_after_linear(how, train):
    """The site is left unfused (the fused op would read x after the write); outputs and the
    running statistics are eager's."""
    torch.manual_seed(11)
    model, eager, ref = trio(randomize(MutatesAliasAfterLinear(how)), train)
    x = torch.randn(M, K)
    x_c, x_e, x_r = x.clone(), x.clone(), x.double()
    with torch.no_grad():
        out, e, r = compile_(model)(x_c), eager(x_e), ref(x_r)
    assert torch.equal(x_c, x_e)  # the in-place write itself happened
    assert fusion_backend.counters[NAME] == 0
    assert_matches(out, e, r)  # the Linear saw x before the write
    if train:
        assert_stats_match(model, eager, ref)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("variant", ["tma", "persistent", "persistent-4", "pointer"])
def test_tma_eval_kernel_matches_pointer_kernel(monkeypatch, approximate, variant):
    """The eval kernel's TMA variant (Hopper configs with TMA=True) under the interpreter:
    descriptors zero-fill the ragged tiles (37 rows, K = 100, 75 columns), same result as the
    fp64 reference within eager's class, and so does the pointer kernel; on the CPU the
    readiness check (CUDA only) is bypassed so the variant runs at all. PERSISTENT: the 15
    tiles walked by one program (the interpreter profile's one multiprocessor) or by 4."""
    import dataclasses

    import fusion_backend.patterns.linear_bn_gelu_relu as lbgr
    from fusion_backend import devices

    monkeypatch.setattr(lbgr, "tma_ready", lambda t: True)
    if variant == "persistent-4":
        four = dataclasses.replace(devices.tensor_profile(torch.empty(0)), multiprocessors=4)
        monkeypatch.setattr(devices, "tensor_profile", lambda t: four)
    torch.manual_seed(21)
    x, w = torch.randn(37, 100), torch.randn(75, 100) / 10
    b, gamma, beta, mean = (torch.randn(75) for _ in range(4))
    var = torch.rand(75) + 0.5
    ref = lbgr._reference(*(t.double() for t in (x, w, b, gamma, beta, mean, var)), 1e-5, approximate)
    config = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=4, num_warps=1, num_stages=1)
    if variant != "pointer":
        config.update(TMA=True, PERSISTENT=variant.startswith("persistent"))
    out = torch.full((37, 75), float("nan"))
    lbgr.eval_runner(x, w, b, gamma, beta, mean, var, 1e-5, approximate, "ieee", out)(config)
    assert_matches(out, lbgr._reference(x, w, b, gamma, beta, mean, var, 1e-5, approximate), ref)


# ----------------------------------------------------------------------------- inline op

INLINE_META = [16, 16, 16, 4, 1, 1]  # BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages


@pytest.mark.parametrize("spelling,approximate", [("modules", "none"), ("no_bias", "tanh"), ("affine_false", "none")])
def test_inline_eval_op_matches_eager(spelling, approximate):
    """The triton_op form of the eval kernel (what Inductor launches itself on a GPU, see
    `_common.inline_meta`), called eagerly: the same kernel, launched directly. Odd sizes, a
    strided x, gradients through its autograd registration vs eager and fp64."""
    from fusion_backend.patterns.linear_bn_gelu_relu import linear_bn_gelu_relu_eval_inline as op

    torch.manual_seed(11)
    model, eager, ref = trio(randomize(LBGR(spelling, approximate)), False)
    bn = model.bn
    x = torch.randn(M, 2 * K + 1)[:, 1::2]
    assert not x.is_contiguous()
    grad_out = torch.randn(M, N)
    results = []
    for m, dtype, fn in ((model, torch.float32, None), (eager, torch.float32, eager), (ref, torch.float64, ref)):
        xi = x.detach().clone().to(dtype).requires_grad_(True)
        if fn is None:
            out = op(xi, m.lin.weight, m.lin.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps,
                     approximate, "ieee", INLINE_META)
        else:
            out = fn(xi)
        (out * grad_out.to(dtype)).sum().backward()
        results.append((out.detach(), xi.grad, m.lin.weight.grad))
    (out, gx, gw), (e_out, e_gx, e_gw), (r_out, r_gx, r_gw) = results
    assert_matches(out, e_out, r_out)
    for name, got, want, ref64 in (("x", gx, e_gx, r_gx), ("W", gw, e_gw, r_gw)):
        torch.testing.assert_close(got, want, **grad_close(want), msg=lambda m: f"grad {name} vs eager: {m}")
        torch.testing.assert_close(got, ref64.float(), **grad_close(ref64), msg=lambda m: f"grad {name} vs fp64: {m}")
    with torch.no_grad():  # an empty batch launches nothing
        empty = op(torch.randn(0, K), model.lin.weight, None, None, None, bn.running_mean, bn.running_var, bn.eps,
                   "none", "ieee", INLINE_META)
    assert empty.shape == (0, N)


@pytest.mark.parametrize("keep_y", [False, True], ids=["recompute", "keep_y"])
def test_inline_train_op_matches_eager(monkeypatch, keep_y):
    """The training op's triton_op form called eagerly: output, batch mean and biased variance
    against eager's BatchNorm and fp64, gradients through its autograd registration; with
    keep_y the Linear's output comes back for the backward, which then runs no GEMM of its own
    to recompute it (counted), else it recomputes it."""
    from fusion_backend.patterns.linear_bn_gelu_relu import linear_bn_gelu_relu_train_inline as op

    torch.manual_seed(13)
    model, eager, ref = trio(randomize(LBGR("modules", "none")), True)
    x = torch.randn(M, 2 * K + 1)[:, 1::2]
    grad_out = torch.randn(M, N)
    xi = x.clone().requires_grad_(True)
    bn = model.bn
    out, mean, var, kept = op(xi, model.lin.weight, model.lin.bias, bn.weight, bn.bias, bn.eps, "none", "ieee",
                              INLINE_META, keep_y)
    if keep_y:
        assert_matches(kept.detach(), F.linear(x, model.lin.weight, model.lin.bias).detach(),
                       F.linear(x.double(), ref.lin.weight, ref.lin.bias).detach())
    else:
        assert kept.numel() == 0
    recomputed = []
    linear = F.linear
    monkeypatch.setattr(F, "linear", lambda *a: recomputed.append(1) or linear(*a))
    (out * grad_out).sum().backward()
    monkeypatch.setattr(F, "linear", linear)
    assert len(recomputed) == (0 if keep_y else 1)
    xe, xr = x.clone().requires_grad_(True), x.double().requires_grad_(True)
    e, r = eager(xe), ref(xr)
    (e * grad_out).sum().backward()
    (r * grad_out.double()).sum().backward()
    assert_matches(out.detach(), e.detach(), r.detach())
    y64 = F.linear(x.double(), ref.lin.weight.detach(), ref.lin.bias.detach())
    torch.testing.assert_close(mean, y64.mean(0).float(), **stats_close(torch.float32))
    torch.testing.assert_close(var, y64.var(0, unbiased=False).float(), **stats_close(torch.float32))
    for name, got, want, ref64 in (("x", xi.grad, xe.grad, xr.grad), ("W", model.lin.weight.grad,
                                                                        eager.lin.weight.grad, ref.lin.weight.grad)):
        torch.testing.assert_close(got, want, **grad_close(want), msg=lambda m: f"grad {name} vs eager: {m}")
        torch.testing.assert_close(got, ref64.float(), **grad_close(ref64), msg=lambda m: f"grad {name} vs fp64: {m}")


@pytest.mark.parametrize("path", ["op", "inline", "unfused"])
@pytest.mark.parametrize("spelling", ["modules", "no_bias"])
def test_eval_keep_y_op_matches_eager(monkeypatch, path, spelling):
    """The eval op for sites whose backward will run (eval-mode BatchNorm with grad): its
    kernel stores the Linear's output beside the block's output, in the opaque op (fused, with
    the interpreter's config), its triton_op form, and through the unfused path (cuBLAS into
    the kept buffer, the pointwise pass from it). Outputs, the kept output and gradients
    against eager and fp64; the backward runs no GEMM of its own to recompute the Linear."""
    import fusion_backend.patterns.linear_bn_gelu_relu as lbgr
    from fusion_backend import autotune

    torch.manual_seed(16)
    model, eager, ref = trio(randomize(LBGR(spelling, "tanh")), False)
    x = torch.randn(M, 2 * K + 1)[:, 1::2]  # non-contiguous
    grad_out = torch.randn(M, N)
    xi = x.clone().requires_grad_(True)
    bn, lin = model.bn, model.lin
    args = (xi, lin.weight, lin.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps, "tanh", "ieee")
    if path == "inline":
        out, kept = lbgr.linear_bn_gelu_relu_eval_keep_y_inline(*args, INLINE_META)
    else:
        key = autotune.make_key("eval_keep_y:" + NAME, "interpreter", torch.float32, "ieee", M, K=K, N=N)
        if path == "unfused":
            monkeypatch.setitem(autotune.TUNER.choices, key, autotune.Choice(None, "tuned"))
            monkeypatch.setattr(lbgr, "_launch_eval_pointer", None)  # the fused path would fail...
        out, kept = lbgr.linear_bn_gelu_relu_eval_keep_y(*args, False, 1.0)
        assert autotune.TUNER.choices[key].source != "fallback"  # ...and be recorded as such
    assert_matches(kept.detach(), F.linear(x, lin.weight, lin.bias).detach(),
                   F.linear(x.double(), ref.lin.weight, ref.lin.bias).detach())
    recomputed = []
    linear = F.linear
    monkeypatch.setattr(F, "linear", lambda *a: recomputed.append(1) or linear(*a))
    (out * grad_out).sum().backward()
    monkeypatch.setattr(F, "linear", linear)
    assert recomputed == []
    xe, xr = x.clone().requires_grad_(True), x.double().requires_grad_(True)
    e, r = eager(xe), ref(xr)
    (e * grad_out).sum().backward()
    (r * grad_out.double()).sum().backward()
    assert_matches(out.detach(), e.detach(), r.detach())
    grads = [("x", xi.grad, xe.grad, xr.grad), ("W", lin.weight.grad, eager.lin.weight.grad, ref.lin.weight.grad),
             ("gamma", bn.weight.grad, eager.bn.weight.grad, ref.bn.weight.grad)]
    if spelling != "no_bias":
        grads.append(("b", lin.bias.grad, eager.lin.bias.grad, ref.lin.bias.grad))
    for name, got, want, ref64 in grads:
        torch.testing.assert_close(got, want, **grad_close(want), msg=lambda m: f"grad {name} vs eager: {m}")
        torch.testing.assert_close(got, ref64.float(), **grad_close(ref64), msg=lambda m: f"grad {name} vs fp64: {m}")
    empty, kept_empty = lbgr.linear_bn_gelu_relu_eval_keep_y(x[:0], *args[1:], False, 1.0)
    assert empty.shape == kept_empty.shape == (0, N)


class GradInsideBlock(LBGR):
    def forward(self, x):
        with torch.enable_grad():
            return super().forward(x)


@pytest.mark.parametrize("outside", ["no_grad", "grad"])
def test_backward_judged_by_the_grad_mode_where_the_site_runs(outside):
    """A block under `torch.enable_grad()` in a model called under no_grad will run a backward:
    it keeps the Linear's output (the graph starts without grad, the site runs with it)."""
    torch.manual_seed(17)
    model = randomize(GradInsideBlock()).eval()
    with torch.set_grad_enabled(outside == "grad"):
        report = fusion_backend.explain(model, torch.randn(M, K))
    (site,) = report.fused
    assert site.info["mode"] == "eval_keep_y"


class NoGradPart(LBGR):
    """One op of the block under `torch.no_grad()`: the Linear (a frozen projection) or the ReLU."""

    def __init__(self, part):
        super().__init__()
        self.part = part

    def forward(self, x):
        with torch.set_grad_enabled(self.part != "linear"):
            y = self.lin(x)
        z = F.gelu(self.bn(y))
        with torch.set_grad_enabled(self.part != "relu"):
            return F.relu(z)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("part", ["linear", "relu"])
def test_grad_mode_switch_inside_the_block_is_not_fused(part, train):
    """The fused op runs in one grad mode (the BatchNorm's): a block with its Linear or ReLU
    under no_grad is left unfused with the reason. Fused, W and x got gradients eager does
    not give (Linear), and the output required grad where eager's does not (ReLU)."""
    torch.manual_seed(18)
    model = randomize(NoGradPart(part)).train(train)
    eager = copy.deepcopy(model)
    x = torch.randn(M, K)
    report = fusion_backend.explain(copy.deepcopy(model), x.clone().requires_grad_())
    assert report.fused == [] and "grad" in report.skipped[0].reason, report
    torch._dynamo.reset()
    fusion_backend.counters.clear()
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, e = torch.compile(model, backend="fusedtriton")(xc), eager(xe)
    assert fusion_backend.counters[NAME] == 0
    assert out.requires_grad == e.requires_grad
    if e.requires_grad:
        out.square().sum().backward()
        e.square().sum().backward()
        assert (xc.grad is None) == (xe.grad is None) and (model.lin.weight.grad is None) == (eager.lin.weight.grad
                                                                                              is None)
        torch.testing.assert_close(model.bn.weight.grad, eager.bn.weight.grad, **grad_close(eager.bn.weight.grad))
    with torch.no_grad():
        assert_matches(out.detach(), e.detach(), copy.deepcopy(eager).double()(x.double()))


class WritesBnBiasData(LBGR):
    """Writes the BatchNorm bias through `.data` after the block (a parameter decay done in the
    forward): eager's backward never reads beta, the fused backward recomputed z from it."""

    def forward(self, x):
        out = F.relu(F.gelu(self.bn(self.lin(x))))
        self.bn.bias.data.mul_(0.5)
        return out


class DriftsStatistics(LBGR):
    """Eval mode, then writes the running mean and the Linear's bias in place after the block
    (a drift or decay done in forward)."""

    def forward(self, x):
        out = F.relu(F.gelu(self.bn(self.lin(x))))
        self.bn.running_mean.add_(0.25)
        self.lin.bias.mul_(0.5)
        return out


def test_direct_write_after_the_block_without_a_backward_is_fused():
    """Without a backward, a write to an input after the site comes too late to matter: the
    site was refused ("input ... is mutated in the graph"). Three calls, each reading what the
    previous one wrote, as eager's do."""
    torch.manual_seed(20)
    model = randomize(DriftsStatistics()).eval()
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    compiled = torch.compile(model, backend="fusedtriton")
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(M, K)
            assert_matches(compiled(x), eager(x), ref(x.double()))
            assert_matches(model.bn.running_mean, eager.bn.running_mean, ref.bn.running_mean, "running_mean")
            assert_matches(model.lin.bias, eager.lin.bias, ref.lin.bias, "bias")
    assert fusion_backend.counters[NAME] == 1


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_alias_write_after_the_block_with_a_backward_is_not_fused(train):
    """With a backward to run, a `.data` write to an input after the site leaves it unfused (the
    gradients were silently ~25% off); without one the site stays fused."""
    torch.manual_seed(19)
    model = randomize(WritesBnBiasData()).train(train)
    x = torch.randn(M, K)
    report = fusion_backend.explain(copy.deepcopy(model), x.clone().requires_grad_())
    assert report.fused == [] and "is mutated in the graph" in report.skipped[0].reason, report
    with torch.no_grad():
        report = fusion_backend.explain(copy.deepcopy(model), x)
    assert len(report.fused) == 1, report


class TiedTransposedWeight(nn.Module):
    """The block's Linear weight is the transpose of a parameter (tied weights): W is read with
    stride (1, N) in K, not 1."""

    def __init__(self):
        super().__init__()
        self.p, self.b, self.bn = nn.Parameter(torch.randn(K, N) / K ** 0.5), nn.Parameter(torch.randn(N)), nn.BatchNorm1d(N)

    def forward(self, x):
        return torch.relu(F.gelu(self.bn(F.linear(x, self.p.t(), self.b))))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_weight_with_a_strided_k_dimension(train):
    """W given as a transposed view is read as stored, with its K stride (every other test's W
    had stride 1 in K: a main loop advancing W by BLOCK_K elements instead of BLOCK_K strides
    passed them all)."""
    torch.manual_seed(16)
    model, eager, ref = trio(randomize(TiedTransposedWeight()), train)
    x = torch.randn(M, K)
    with torch.no_grad():
        out, e, r = compile_(model)(x), eager(x), ref(x.double())
    assert fusion_backend.counters[NAME] == 1
    assert_matches(out, e, r)
    if train:
        assert_stats_match(model, eager, ref)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_float_input_restart_keeps_the_site_fused(train, caplog):
    """A BatchNorm momentum changed between calls: Dynamo's second graph takes it as a float
    input and asks to trace again (TensorifyScalarRestartAnalysis, raised by Inductor on the
    rewritten graph). Passed through, not taken as Inductor failing: no warning, the site
    fused in each graph, counted once per graph; in training the statistics move with each
    call's momentum as eager's (the pass that sees the symbolic momentum leaves the site with
    its reason, not with a logged rewrite failure)."""
    import logging
    import warnings

    torch.manual_seed(20)
    model = randomize(LBGR()).train(train)
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    compiled = torch.compile(model, backend="fusedtriton")
    x = torch.randn(M, K)
    fusion_backend.counters.clear()
    with torch.no_grad(), warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="fusion_backend"):
        # a fallback warns (RuntimeWarning); only those: a library's DeprecationWarning on its
        # first import inside Inductor failed this test when it ran alone
        warnings.simplefilter("error", RuntimeWarning)
        for graphs, momentum in enumerate((0.1, 0.7, 0.0), start=1):
            model.bn.momentum = eager.bn.momentum = ref.bn.momentum = momentum
            out, e, r = compiled(x), eager(x), ref(x.double())
            assert fusion_backend.counters[NAME] == graphs
            assert_matches(out, e, r)
            if train:
                assert_stats_match(model, eager, ref)
    assert not [rec.getMessage() for rec in caplog.records if rec.name == "fusion_backend"]


@pytest.mark.parametrize("profile", ["interpreter", "none"])
@pytest.mark.parametrize("mode, attr, value", [("train", "momentum", 0.5), ("eval", "eps", 1e-3)])
def test_restarted_compile_leaves_no_report_behind(monkeypatch, profile, mode, attr, value):
    """A float attribute changed between calls: Dynamo's next compile sees it as a graph input,
    the check leaves the site unfused, and Inductor restarts the compile (the float is then
    specialized and the site fused). The attempt's report goes with it: explain() shows the one
    graph compiled, fused (it showed a second graph "NOT fused" for a reason that did not hold),
    also where the device has no profile and nothing was rewritten."""
    from fusion_backend import devices as devices_module

    if profile == "none":
        monkeypatch.setattr(devices_module, "device_profile", lambda device: None)
    torch.manual_seed(21)
    model = randomize(LBGR()).train(mode == "train")
    compiled = torch.compile(model, backend="fusedtriton")
    with torch.no_grad():
        compiled(torch.randn(M, K))
        setattr(model.bn, attr, value)
        report = fusion_backend.explain(compiled, torch.randn(M, K))
    assert len(report.graphs) == 1, report
    if profile == "none":
        assert report.fused == [] and report.skipped == [], report
    else:
        assert len(report.fused) == 1 and report.skipped == [], report


class _Ctx:
    """What `inline_meta` reads of the backend's RewriteContext."""

    def __init__(self, profile, tunes=True, **options):
        from fusion_backend.options import Options

        self.profile, self.tunes_at_compile_time, self.options = profile, tunes, Options.parse(None, options)
        self.trial_configs = {}


@pytest.mark.parametrize("case", ["pointer", "tma", "gluon", "unfused", "untuned", "dynamic", "option_off",
                                  "interpreter", "amd"])
def test_inline_meta_only_for_pointer_configs_tuned_at_compile_time(case):
    from conftest import profile_named
    from fusion_backend import autotune
    from fusion_backend.patterns._common import inline_meta

    h100, mi300x = profile_named("h100-sxm"), profile_named("mi300x")
    config = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)
    config = {"tma": dict(config, TMA=True), "gluon": dict(config, TMA=True, PRESPLIT=True, GLUON=True),
              "unfused": None}.get(case, config)
    if case == "amd":
        config = dict(config, waves_per_eu=2, matrix_instr_nonkdim=16, kpack=1)
    key = f"test-inline-meta:{case}"
    if case != "untuned":
        autotune.TUNER.record(key, autotune.Choice(config, "tuned", 0.01, 0.02))
    try:
        ctx = _Ctx(mi300x if case == "amd" else h100, tunes=case != "interpreter", inline=case != "option_off")
        meta = inline_meta(ctx, key, static_shapes=case != "dynamic")
    finally:
        autotune.TUNER.choices.pop(key, None)
    if case == "pointer":
        assert meta == [64, 64, 32, 8, 4, 3]
    else:
        assert meta is None


@pytest.mark.parametrize("train,grad", [(False, False), (False, True), (True, False), (True, True)],
                         ids=["eval-no_grad", "eval-grad", "train-no_grad", "train-grad"])
def test_inline_rewrite(monkeypatch, train, grad):
    """The rewrite with an inline op in the graph (on a GPU `inline_meta` decides; here it is
    forced, and the rewritten graph runs as FX code instead of through Inductor, which on a
    CPU cannot launch Triton kernels): the graph holds the inline op, the report says so, and
    outputs and gradients match eager and fp64."""
    import fusion_backend.patterns.linear_bn_gelu_relu as lbgr
    from fusion_backend import backend

    monkeypatch.setattr(lbgr, "inline_meta", lambda ctx, key, static: INLINE_META if static else None)
    graphs = []
    monkeypatch.setattr(backend, "_inductor", lambda gm, example_inputs, options: graphs.append(gm) or gm)
    torch.manual_seed(12)
    model, eager, ref = trio(randomize(LBGR("modules", "tanh")), train)
    x = torch.randn(M, K)
    sink = []
    backend._report_sinks.append(sink)
    try:
        with torch.set_grad_enabled(grad):
            xs = [x.clone().to(dtype).requires_grad_(grad) for dtype in (torch.float32, torch.float32, torch.float64)]
            outs = [compile_(model)(xs[0]), eager(xs[1]), ref(xs[2])]
    finally:
        backend._report_sinks.remove(sink)
    assert fusion_backend.counters[NAME] == 1
    (site,) = sink[0].fused
    assert site.info["launch"] == "inline"
    targets = [n.target for n in graphs[-1].graph.nodes]
    inline, opaque = ((lbgr.linear_bn_gelu_relu_train_inline, lbgr.linear_bn_gelu_relu_train) if train else
                      (lbgr.linear_bn_gelu_relu_eval_keep_y_inline, lbgr.linear_bn_gelu_relu_eval_keep_y) if grad
                      else (lbgr.linear_bn_gelu_relu_eval_inline, lbgr.linear_bn_gelu_relu_eval))
    assert inline in targets and opaque not in targets
    assert_matches(outs[0].detach(), outs[1].detach(), outs[2].detach())
    if train:
        assert_stats_match(model, eager, ref)
    if grad:
        g = torch.randn(M, N)
        for out, xi in zip(outs, xs):
            (out * g.to(out.dtype)).sum().backward()
        for name, got, want, ref64 in (("x", xs[0].grad, xs[1].grad, xs[2].grad),
                                       ("W", model.lin.weight.grad, eager.lin.weight.grad, ref.lin.weight.grad)):
            torch.testing.assert_close(got, want, **grad_close(want), msg=lambda m: f"grad {name} vs eager: {m}")
            torch.testing.assert_close(got, ref64.float(), **grad_close(ref64), msg=lambda m: f"grad {name} vs fp64: {m}")


def test_inline_compile_failure_falls_back_to_the_op(monkeypatch):
    """If Inductor cannot compile a graph with inline kernel launches, the backend warns and
    compiles the site behind its opaque op instead (still fused, counted once, correct)."""
    import fusion_backend.patterns.linear_bn_gelu_relu as lbgr
    from fusion_backend import backend

    monkeypatch.setattr(lbgr, "inline_meta",  # what _common.inline_meta says where it is allowed
                        lambda ctx, key, static: INLINE_META if static and ctx.options.inline else None)
    real = backend._inductor

    def inductor(gm, example_inputs, options):
        if any(n.target == lbgr.linear_bn_gelu_relu_eval_inline for n in gm.graph.nodes):
            raise RuntimeError("cannot launch this user-defined kernel")
        return real(gm, example_inputs, options)

    monkeypatch.setattr(backend, "_inductor", inductor)
    torch.manual_seed(14)
    model, eager, ref = trio(randomize(LBGR()), False)
    x = torch.randn(M, K)
    with pytest.warns(RuntimeWarning, match="inline"):
        report = fusion_backend.explain(model, x)
    (site,) = report.fused
    assert "launch" not in site.info and len(report.graphs) == 1
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="inline"):
        assert_matches(compile_(model)(x), eager(x), ref(x.double()))
    assert fusion_backend.counters[NAME] == 1  # (explain()'s own compile is not counted)


class _SharedBatchNorm(nn.Module):
    """One BatchNorm (train mode) on two branches, the activations after both: eager updates
    its running statistics at each BatchNorm call, branch 1 then branch 2; `peek` also reads
    them between branch 1's BatchNorm and its activations."""

    def __init__(self, n=24):
        super().__init__()
        self.fc = nn.Linear(n, n)
        self.bn = nn.BatchNorm1d(n, momentum=0.5)

    def forward(self, x1, x2):
        h1 = self.bn(self.fc(x1))
        seen = self.bn.running_mean.clone()
        h2 = self.bn(self.fc(x2))
        return F.relu(F.gelu(h1)), F.relu(F.gelu(h2)), seen


@pytest.mark.parametrize("grad", [False, True])
def test_running_stats_updated_where_the_batchnorm_was(grad):
    """The fused train op updates the running statistics at the BatchNorm's place (it did so at
    the ReLU's: after branch 2's BatchNorm, so the updates ran in the order 2, 1, and the read
    between saw them stale; with grad on, Inductor failed on the rewritten graph)."""
    torch.manual_seed(3)
    model = _SharedBatchNorm()
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    x1, x2 = torch.randn(16, 24), torch.randn(16, 24) + 3
    compiled = torch.compile(model, backend="fusedtriton")
    with torch.set_grad_enabled(grad):
        got, want, want64 = compiled(x1, x2), eager(x1, x2), ref(x1.double(), x2.double())
    # both sites fused: the first's running-statistics update does not concern the second,
    # whose op never reads them (the second was refused as "mutated in the graph")
    assert fusion_backend.counters[NAME] == 2, dict(fusion_backend.counters)
    for g, w, w64 in zip(got, want, want64):
        assert_matches(g, w, w64)
    torch.testing.assert_close(model.bn.running_mean, eager.bn.running_mean, **stats_close(torch.float32))
    torch.testing.assert_close(model.bn.running_var, eager.bn.running_var, **stats_close(torch.float32))
    assert int(model.bn.num_batches_tracked) == int(eager.bn.num_batches_tracked) == 2


class _ReluStatement(LBGR):
    """`g.relu_()` as a statement, then `return g` (Dynamo's graph returns the GELU node)."""

    def forward(self, x):
        g = F.gelu(self.bn(self.lin(x)))
        g.relu_()
        return g


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_in_place_relu_as_a_statement_is_fused(train):
    """The GELU's output has two users (relu_ and the output after it): relu_ is respelled out
    of place and the later read takes its result, so the site is fused (it was not, and
    explain() listed no site at all)."""
    torch.manual_seed(4)
    model, eager, ref = trio(randomize(_ReluStatement()), train)
    x = torch.randn(M, K)
    with torch.no_grad():
        assert_matches(compile_(model)(x), eager(x), ref(x.double()))
    assert fusion_backend.counters[NAME] == 1
    if train:
        assert_stats_match(model, eager, ref)


@pytest.mark.parametrize("op", ["eval", "eval_keep_y", "train"])
def test_double_backward_is_refused_by_name(op):
    """create_graph=True (a gradient penalty) through an op called directly: a clear error, not
    wrong second derivatives (the keep_y op's were off by up to 120 against eager's 870; the
    train op raised deep in native_batch_norm_backward). Under torch.compile AOTAutograd refuses
    double backward itself."""
    import fusion_backend.patterns.linear_bn_gelu_relu as lbgr

    torch.manual_seed(17)
    x = torch.randn(12, 20, requires_grad=True)
    w, b = torch.randn(16, 20, requires_grad=True), torch.randn(16, requires_grad=True)
    gamma, beta = torch.rand(16) + 0.5, torch.randn(16)
    mean, var = torch.randn(16), torch.rand(16) + 0.5
    if op == "train":
        out = lbgr.linear_bn_gelu_relu_train(x, w, b, gamma, beta, 1e-5, "none", "ieee", False, 1.0, True)[0]
    else:
        fn = lbgr.linear_bn_gelu_relu_eval if op == "eval" else lbgr.linear_bn_gelu_relu_eval_keep_y
        out = fn(x, w, b, gamma, beta, mean, var, 1e-5, "none", "ieee", False, 1.0)
        out = out[0] if op == "eval_keep_y" else out
    (gx,) = torch.autograd.grad(out.square().sum(), x, retain_graph=True)  # first order: fine
    assert gx.shape == x.shape
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(out.square().sum(), x, create_graph=True)
