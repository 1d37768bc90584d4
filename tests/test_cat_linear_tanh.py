"""Pattern `cat_linear_tanh` on the CPU: the real Triton kernel under TRITON_INTERPRET=1
(conftest sets it), with odd widths, 2- to 4-way cats, no bias, saturating inputs, a
stateful RNN module, gradients and near-misses.

Every check compares the compiled model with eager (the same weights) and with a float64
copy of the model; fp32 at matmul precision "highest" is accepted within
`tolerance(float32, eager_err=...)` = max(2 x eager's own error vs fp64, 1e-6).
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusion_backend
from fusion_backend import models
from fusion_backend import devices
from fusion_backend.backend import fusedtriton
from tolerances import assert_matches, grad_close, rel_err, tolerance

# CPU tests: the kernels run under Triton's interpreter, which conftest turns on only where
# there is no GPU (tests/test_gpu.py covers the GPU).
pytestmark = pytest.mark.skipif(not devices.interpreter_enabled(),
                                reason="needs TRITON_INTERPRET=1 (conftest sets it when there is no GPU)")

NAME = "cat_linear_tanh"
B, I, H, O = 8, 37, 23, 29  # batch, input width, hidden width, output width: all odd


class RNNCell(nn.Module):
    """hidden = tanh(i2h(cat((x, h[, extra...]), dim))); out = h2o(hidden)."""

    def __init__(self, extra=(), bias=True, dim=1):
        super().__init__()
        self.dim = dim
        self.i2h = nn.Linear(I + H + sum(extra), H, bias=bias)
        self.h2o = nn.Linear(H, O)

    def forward(self, x, h, *extra):
        hidden = torch.tanh(self.i2h(torch.cat((x, h, *extra), self.dim)))
        return self.h2o(hidden), hidden


class VanillaRNN(nn.Module):
    """KernelBench style: the hidden state lives on the module between calls."""

    def __init__(self, storage="attribute"):
        super().__init__()
        if storage == "buffer":
            self.register_buffer("hidden", torch.randn(B, H))
        else:
            self.hidden = torch.randn(B, H)
        self.i2h = nn.Linear(I + H, H)
        self.h2o = nn.Linear(H, O)
        self.tanh = nn.Tanh()

    def forward(self, x, initial_hidden=None):
        if initial_hidden is not None:
            self.hidden.copy_(initial_hidden)
        self.hidden = self.hidden.to(x.device)
        combined = torch.cat((x, self.hidden), dim=1)
        self.hidden = self.tanh(self.i2h(combined))
        return self.h2o(self.hidden)


def compile_(model):
    return torch.compile(model, backend="fusedtriton")


def run_all(model, *inputs):
    """(compiled, eager, fp64) results of `model` on `inputs`, without autograd."""
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    with torch.no_grad():
        return compile_(model)(*inputs), eager(*inputs), ref(*(t.double() for t in inputs))


# ----------------------------------------------------------------------------- fused and correct

CASES = {  # id: (extra operand widths, bias, cat dim, non-contiguous operands)
    "2way-dim1": ((), True, 1, False),
    "3way-dim-1": ((11,), True, -1, False),
    "2way-nobias": ((), False, 1, False),
    "4way-dim-1-noncontiguous": ((5, 17), False, -1, True),  # MAX_SEGMENTS operands
}


@pytest.mark.parametrize("case", list(CASES))
def test_rnn_cell_fused_and_correct(case):
    extra, bias, dim, strided = CASES[case]
    torch.manual_seed(len(case) + 10 * len(extra))
    model = RNNCell(extra, bias, dim)
    inputs = [torch.randn(B, I) * 2, torch.randn(B, H)] + [torch.randn(B, w) for w in extra]
    if strided:  # a transposed view and a strided column slice
        inputs[0] = inputs[0].t().contiguous().t()
        inputs[1] = torch.cat((inputs[1], torch.randn(B, H)), 1)[:, ::2]
        assert not inputs[0].is_contiguous() and not inputs[1].is_contiguous()
    out, e, r = run_all(model, *inputs)
    assert fusion_backend.counters[NAME] == 1, dict(fusion_backend.counters)
    assert (model.i2h.bias is None) == (not bias)
    assert_matches(out[1], e[1], r[1], "hidden")
    assert_matches(out[0], e[0], r[0], "output")


def test_saturating_inputs():
    torch.manual_seed(21)
    model = RNNCell()
    x = (torch.rand(B, I) * 2 - 1) * 1e3
    h = (torch.rand(B, H) * 2 - 1) * 1e3
    x[0, 0], h[1, 1] = 1e3, -1e3
    out, e, r = run_all(model, x, h)
    assert fusion_backend.counters[NAME] == 1
    hidden, eh, rh = out[1], e[1], r[1]
    assert not hidden.isnan().any() and torch.isfinite(hidden).all()
    saturated = eh.abs() == 1
    assert saturated.sum() > hidden.numel() // 2  # the inputs do saturate
    assert torch.equal(hidden[saturated], eh[saturated])  # exactly +-1 where eager is
    assert hidden.abs().max() <= 1
    assert_matches(hidden, eh, rh, "hidden")
    assert_matches(out[0], e[0], r[0], "output")


# ----------------------------------------------------------------------------- the stateful module

@pytest.mark.parametrize("storage,initial", [("attribute", False), ("buffer", False),
                                             ("attribute", True), ("buffer", True)],
                         ids=["attribute", "buffer", "attribute-initial_hidden", "buffer-initial_hidden"])
def test_stateful_hidden_over_three_calls(storage, initial):
    torch.manual_seed(22)
    model = VanillaRNN(storage)
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    if storage == "attribute":  # .double() converts parameters and buffers only
        ref.hidden = ref.hidden.double()
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return fusedtriton(gm, example_inputs)

    compiled = torch.compile(model, backend=counting)
    with torch.no_grad():
        for step in range(3):
            x = torch.randn(B, I)
            h0 = torch.randn(B, H) if initial and step == 0 else None
            out = compiled(x, h0)
            e = eager(x, h0)
            r = ref(x.double(), None if h0 is None else h0.double())
            assert_matches(out, e, r, f"output, call {step}")
            assert_matches(model.hidden, eager.hidden, ref.hidden, f"hidden, call {step}")
    assert isinstance(model.hidden, torch.Tensor) and model.hidden.shape == (B, H)
    if storage == "buffer":
        assert [n for n, _ in model.named_buffers()] == ["hidden"]
    # one graph (two when the first call passes initial_hidden), each with its site fused
    assert len(graphs) == (2 if initial else 1)
    assert fusion_backend.counters[NAME] == len(graphs)


# ----------------------------------------------------------------------------- gradients

def cell_grads(model, x, h):
    """Outputs and gradients of the compiled model, eager and an fp64 copy (in that order) for
    random output cotangents: dicts with out, hidden and the grads of x, h, i2h and h2o."""
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    g_out, g_hidden = torch.randn(B, O), torch.randn(B, H)
    runs = []
    for m, dtype, fn in ((model, torch.float32, compile_(model)), (eager, torch.float32, eager),
                         (ref, torch.float64, ref)):
        xi = x.detach().clone().to(dtype).requires_grad_(True)
        hi = h.detach().clone().to(dtype).requires_grad_(True)
        out, hidden = fn(xi, hi)
        ((out * g_out.to(dtype)).sum() + (hidden * g_hidden.to(dtype)).sum()).backward()
        runs.append({"out": out.detach(), "hidden": hidden.detach(), "x": xi.grad, "h": hi.grad,
                     "W": m.i2h.weight.grad, "b": m.i2h.bias.grad, "W_h2o": m.h2o.weight.grad,
                     "b_h2o": m.h2o.bias.grad})
    return runs


def assert_grads_close(got, want, ref64, names):
    for name in names:
        assert got[name] is not None and got[name].abs().max() > 0, name
        torch.testing.assert_close(got[name], want[name], **grad_close(want[name]),
                                   msg=lambda m: f"grad {name} vs eager: {m}")
        torch.testing.assert_close(got[name], ref64[name].float(), **grad_close(ref64[name]),
                                   msg=lambda m: f"grad {name} vs fp64: {m}")


def test_gradients_match_eager():
    torch.manual_seed(23)
    model = RNNCell()
    got, want, ref64 = cell_grads(model, torch.randn(B, I) * 2, torch.randn(B, H))
    assert fusion_backend.counters[NAME] == 1
    assert_matches(got["hidden"], want["hidden"], ref64["hidden"], "hidden")
    assert_grads_close(got, want, ref64, ("x", "h", "W", "b"))


def _gram_and_cell(a, b, w, bias):
    c = torch.cat((a, b), dim=1)
    gram = torch.tanh(c @ c.t())  # a Linear whose input and weight are both the cat
    cell = torch.tanh(F.linear(torch.cat((b, a), 1), w, bias))
    return gram, cell


def test_cat_read_twice_by_the_linear_is_not_fused():
    """`tanh(c @ c.t())` with c a cat: the Linear is the cat's one user but reads it twice.
    Left unfused with that reason, the other cell fused, no rewrite error (the replacement
    erased the tanh and the Linear, then failed to erase the cat the new op read: a fused op
    in the graph reported unfused, with a warning)."""
    torch.manual_seed(27)
    a, b = torch.randn(B, I), torch.randn(B, H)
    w, bias = torch.randn(H, I + H) * 0.2, torch.randn(H)
    args = (a, b, w, bias)
    with torch.no_grad():
        report = fusion_backend.explain(_gram_and_cell, *args)
        torch._dynamo.reset()
        fusion_backend.counters.clear()
        out = torch.compile(_gram_and_cell, backend="fusedtriton")(*args)
    assert [s.node for s in report.fused] == ["cell"], report
    assert [s.node for s in report.skipped] == ["gram"], report
    assert "read more than once by" in report.skipped[0].reason, report
    assert fusion_backend.counters[NAME] == 1
    eager, ref = _gram_and_cell(*args), _gram_and_cell(*(t.double() for t in args))
    for o, e, r, what in zip(out, eager, ref, ("gram", "cell")):
        assert_matches(o, e, r, what)


def test_explain_names_the_saving_op_where_a_backward_will_run():
    """With gradients on, the cell's site runs the op that saves its operands for dW: explain()
    says so (mode=saving), as it says eval_keep_y for the MLP block; under no_grad, mode=plain."""
    model = RNNCell()
    x, h = torch.randn(B, I), torch.randn(B, H)
    site = fusion_backend.explain(model, x, h).fused[0]
    assert site.pattern == NAME and site.info["mode"] == "saving", site
    torch._dynamo.reset()
    with torch.no_grad():
        report = fusion_backend.explain(model, x, h)
    site = report.fused[0]
    assert site.pattern == NAME and site.info["mode"] == "plain", site
    assert "cat_linear_tanh at" in str(report) and "mode=plain" in str(report), report


def test_gradients_with_a_frozen_weight():
    """i2h's weight frozen (requires_grad False): the op saves no cat operands (no dW to
    compute) and x, h and the bias still get eager's gradients."""
    torch.manual_seed(27)
    model = RNNCell()
    model.i2h.weight.requires_grad_(False)
    got, want, ref64 = cell_grads(model, torch.randn(B, I), torch.randn(B, H))
    assert fusion_backend.counters[NAME] == 1
    assert got["W"] is None and want["W"] is None
    for name in ("out", "hidden"):
        assert_matches(got[name], want[name], ref64[name], name)
    assert_grads_close(got, want, ref64, ("x", "h", "b"))


# ----------------------------------------------------------------------------- near-misses

class CatReturned(RNNCell):
    def forward(self, x, h):
        combined = torch.cat((x, h), 1)
        hidden = torch.tanh(self.i2h(combined))
        return self.h2o(hidden), combined


class CatDim0(nn.Module):
    def __init__(self):
        super().__init__()
        self.i2h = nn.Linear(I, H)

    def forward(self, x, y):
        return torch.tanh(self.i2h(torch.cat((x, y), 0)))


class FiveWay(nn.Module):
    def __init__(self, widths):
        super().__init__()
        self.i2h = nn.Linear(sum(widths), H)

    def forward(self, *xs):
        return torch.tanh(self.i2h(torch.cat(xs, 1)))


class StridedBias(nn.Module):
    """The bias is a strided view (every other element of a longer vector)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(H, I + H) / (I + H) ** 0.5)
        self.bias2 = nn.Parameter(torch.randn(2 * H))

    def forward(self, x, h):
        return torch.tanh(nn.functional.linear(torch.cat((x, h), 1), self.weight, self.bias2[::2]))


class BroadcastBias(nn.Module):
    """F.linear broadcasts a bias of shape `shape` (0-d, (1,)) over the N outputs."""

    def __init__(self, shape):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(H, I + H) / (I + H) ** 0.5)
        self.bias = nn.Parameter(torch.randn(shape))

    def forward(self, x, h):
        return torch.tanh(nn.functional.linear(torch.cat((x, h), 1), self.weight, self.bias))


class VectorWeight(nn.Module):
    """F.linear with a 1-D weight: a dot product per row, output (B,)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(I + H) / (I + H) ** 0.5)

    def forward(self, x, h):
        return torch.tanh(nn.functional.linear(torch.cat((x, h), 1), self.weight))


NEAR_MISSES = {  # id: (model factory, input shapes, expected reason)
    "bias_0d": (lambda: BroadcastBias(()), [(B, I), (B, H)], "not (23,): a broadcast per-feature vector"),
    "bias_1": (lambda: BroadcastBias((1,)), [(B, I), (B, H)], "not (23,): a broadcast per-feature vector"),
    "weight_1d": (VectorWeight, [(B, I), (B, H)], "is not 2-D"),
    "cat_used_elsewhere": (CatReturned, [(B, I), (B, H)], "has other users"),
    "cat_dim0": (CatDim0, [(B, I), (B + 3, I)], "cat along dim 0"),
    "five_operands": (lambda: FiveWay([7, 9, 11, 13, 5]), [(B, w) for w in (7, 9, 11, 13, 5)],
                      "cat of 5 tensors; the kernel takes 1 to 4"),
    "strided_bias": (StridedBias, [(B, I), (B, H)], "strided vector (stride 2)"),
}


@pytest.mark.parametrize("case", list(NEAR_MISSES))
def test_near_miss_reported_and_correct(case):
    factory, shapes, reason = NEAR_MISSES[case]
    torch.manual_seed(24)
    model = factory()
    inputs = [torch.randn(*s) for s in shapes]
    with torch.no_grad():
        report = fusion_backend.explain(model, *inputs)
    assert report.profile == "interpreter" and report.fused == []
    sites = [s for s in report.skipped if s.pattern == NAME]
    assert len(sites) == 1, str(report)
    assert reason in sites[0].reason, sites[0].reason
    text = str(report)
    assert NAME in text and sites[0].reason in text and "NOT fused" in text
    fusion_backend.counters.clear()
    torch._dynamo.reset()
    out, e, r = run_all(model, *inputs)
    assert fusion_backend.counters[NAME] == 0
    outs, es, rs = (o if isinstance(o, tuple) else (o,) for o in (out, e, r))
    for o, ee, rr in zip(outs, es, rs):
        assert_matches(o, ee, rr)


# ----------------------------------------------------------------------------- aliasing

def _double_in_place(t):
    t.mul_(2)
    return t.sum()


class MutatesAliasAfterCat(nn.Module):
    """The cat reads a view of h; h is written in place (spelled `how`) before the Linear/tanh run."""

    def __init__(self, how="mul_"):
        super().__init__()
        self.how = how
        self.i2h = nn.Linear(I + H, H)

    def forward(self, x, h):
        combined = torch.cat((x, h[:, :]), 1)
        if self.how == "mul_":
            h.mul_(2)
        elif self.how == "imul":
            h *= 2  # Dynamo: operator.imul
        elif self.how == "iadd":
            h += 1  # operator.iadd
        elif self.how == "relu(inplace=True)":
            nn.functional.relu(h, inplace=True)
        elif self.how == "_foreach_mul_":
            torch._foreach_mul_([h], 2.0)  # a private in-place op, its first argument a list
        elif self.how == "__imul__":
            h.__imul__(2.0)  # an explicit in-place dunder: Dynamo records the method by that name
        elif self.how == "Tensor.__iadd__":
            torch.Tensor.__iadd__(h, 1.0)
        elif self.how == "batch_norm(training=True)":
            # writes its running statistics, here rows of h (not its first argument)
            nn.functional.batch_norm(x[:, :H] * 3 + 5, h[0], h[1], training=True)
        elif self.how == "_native_batch_norm_legit":  # a builtin: aten's schema says what it writes
            torch._native_batch_norm_legit(x[:, :H] * 3 + 5, None, None, h[0], h[1], True, 0.1, 1e-5)
        elif self.how == "embedding(max_norm=)":  # renormalizes the looked-up rows of h in place
            nn.functional.embedding(torch.tensor([0, 2]), h, max_norm=0.1)
        elif self.how == "checkpoint":  # the write inside a higher-order op's body
            torch.utils.checkpoint.checkpoint(_double_in_place, h, use_reentrant=False)
        elif self.how == "cond":  # a higher-order op taking its operands as a tuple
            torch.cond(h.sum() > -1e9, _double_in_place, lambda t: t.sum(), (h,))
        else:
            torch.add(h, 1, out=h)
        return torch.tanh(self.i2h(combined))


@pytest.mark.parametrize("how", ["mul_", "imul", "iadd", "relu(inplace=True)", "_foreach_mul_", "out=", "__imul__",
                                 "Tensor.__iadd__", "batch_norm(training=True)", "_native_batch_norm_legit",
                                 "embedding(max_norm=)", "checkpoint", "cond"])
def test_inplace_write_to_cat_operand_alias_after_cat(how):
    """Any spelling of an in-place write to a cat operand between the cat and the tanh leaves
    the site unfused (the fused op would read the written value), with the reason."""
    torch.manual_seed(25)
    model = MutatesAliasAfterCat(how)
    x, h = torch.randn(B, I), torch.randn(B, H)
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    with torch.no_grad():
        report = fusion_backend.explain(model, x, h.clone())
    assert report.fused == [] and "writes in place" in report.skipped[0].reason, report
    torch._dynamo.reset()
    fusion_backend.counters.clear()
    h_c, h_e, h_r = h.clone(), h.clone(), h.double()
    with torch.no_grad():
        out, e, r = compile_(model)(x, h_c), eager(x, h_e), ref(x.double(), h_r)
    if "batch_norm" in how:  # Inductor's batch variance: a rounding apart
        torch.testing.assert_close(h_c, h_e)  # the in-place write itself happened
    else:
        assert torch.equal(h_c, h_e)
    assert fusion_backend.counters[NAME] == 0
    assert_matches(out, e, r)  # the cat saw h before the write


class TanhOut(nn.Module):
    """The new state written into a buffer by `torch.tanh(..., out=)`, read by h2o."""

    def __init__(self):
        super().__init__()
        self.i2h, self.h2o = nn.Linear(I + H, H), nn.Linear(H, O)
        self.register_buffer("last", torch.zeros(B, H))

    def forward(self, x, h):
        torch.tanh(self.i2h(torch.cat((x, h), 1)), out=self.last)
        return self.h2o(self.last)


class CatOut(nn.Module):
    """The cat written into a buffer by `torch.cat(..., out=)`."""

    def __init__(self):
        super().__init__()
        self.i2h = nn.Linear(I + H, H)
        self.register_buffer("combined", torch.zeros(B, I + H))

    def forward(self, x, h):
        return torch.tanh(self.i2h(torch.cat((x, h), 1, out=self.combined)))


@pytest.mark.parametrize("cls", [TanhOut, CatOut])
def test_out_kwarg_sites_are_not_matched(cls):
    """A tanh or cat called with `out=` writes a tensor the program reads: not matched (the
    fused op in its place dropped the write: the buffer kept zeros, and TanhOut's h2o read them)."""
    torch.manual_seed(29)
    model = cls()
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    x, h = torch.randn(B, I), torch.randn(B, H)
    fusion_backend.counters.clear()
    with torch.no_grad():
        out, e, r = compile_(model)(x, h), eager(x, h), ref(x.double(), h.double())
    assert fusion_backend.counters[NAME] == 0
    assert_matches(out, e, r)
    for b, be, br in zip(model.buffers(), eager.buffers(), ref.buffers()):
        assert_matches(b, be, br)


class NoGradInsideCell(nn.Module):
    """A part of the cell under `torch.no_grad()`: the cat (truncated BPTT: no gradient into x
    and h) or the Linear (a frozen projection: no gradient at all)."""

    def __init__(self, part):
        super().__init__()
        self.part = part
        self.i2h = nn.Linear(I + H, H)

    def forward(self, x, h):
        with torch.set_grad_enabled(self.part != "cat"):
            c = torch.cat((x, h), 1)
        with torch.set_grad_enabled(self.part != "linear"):
            z = self.i2h(c)
        return torch.tanh(z)


@pytest.mark.parametrize("part", ["cat", "linear"])
def test_grad_mode_switch_inside_the_cell_is_not_fused(part):
    """One op runs in one grad mode: a cell whose cat or Linear runs under no_grad is left
    unfused with the reason (fused, x got a gradient eager does not give, and with the Linear
    under no_grad the output required grad)."""
    torch.manual_seed(30)
    model = NoGradInsideCell(part)
    eager = copy.deepcopy(model)
    x, h = torch.randn(B, I), torch.randn(B, H)
    report = fusion_backend.explain(copy.deepcopy(model), x.requires_grad_(), h.requires_grad_())
    assert report.fused == [] and "grad" in report.skipped[0].reason, report
    torch._dynamo.reset()
    fusion_backend.counters.clear()
    results = []
    for m, f in ((model, compile_(model)), (eager, eager)):
        xi, hi = x.detach().clone().requires_grad_(), h.detach().clone().requires_grad_()
        y = f(xi, hi)
        if y.requires_grad:
            y.square().sum().backward()
        results.append((y, y.requires_grad, xi.grad, m.i2h.weight.grad))
    assert fusion_backend.counters[NAME] == 0
    (y, rg, gx, gw), (ye, rge, gxe, gwe) = results
    assert rg == rge and (gx is None) == (gxe is None) and (gw is None) == (gwe is None)
    with torch.no_grad():
        r = copy.deepcopy(eager).double()(x.double(), h.double())
    assert_matches(y.detach(), ye.detach(), r)
    if gw is not None:
        torch.testing.assert_close(gw, gwe, **grad_close(gwe))


class TruncatedBPTT(nn.Module):
    """An unrolled loop whose cats run under no_grad: no gradient through time (truncated BPTT)."""

    def __init__(self):
        super().__init__()
        self.i2h = nn.Linear(I + H, H)

    def forward(self, xs, h):
        for t in range(xs.shape[0]):
            with torch.no_grad():
                c = torch.cat((xs[t], h), 1)
            h = torch.tanh(self.i2h(c))
        return h


def test_truncated_bptt_loop_is_not_fused():
    """Neither the sequence nor its cells fuse (fused cells back-propagated through time: h0
    got a gradient and dW was 30% off); gradients match eager."""
    torch.manual_seed(31)
    model = TruncatedBPTT()
    eager = copy.deepcopy(model)
    xs, h0 = torch.randn(5, B, I), torch.randn(B, H)
    fusion_backend.counters.clear()
    hc, he = h0.clone().requires_grad_(), h0.clone().requires_grad_()
    compile_(model)(xs, hc).square().sum().backward()
    eager(xs, he).square().sum().backward()
    assert fusion_backend.counters[NAME] == 0 and fusion_backend.counters["rnn_sequence"] == 0
    assert hc.grad is None and he.grad is None
    torch.testing.assert_close(model.i2h.weight.grad, eager.i2h.weight.grad, **grad_close(eager.i2h.weight.grad))


@pytest.mark.parametrize("h2o", [False, True], ids=["cell", "cell+h2o"])
@pytest.mark.parametrize("how", ["copy_", ".data"])
def test_caller_writes_the_hidden_buffer_between_forward_and_backward(monkeypatch, how, h2o):
    """`h.copy_(new_h.detach())` into a persistent hidden buffer after the forward, then the
    backward: eager's cat is a copy, so dW sees the forward's values. The op saved h itself:
    autograd's "modified by an inplace operation" error for copy_, and a silently wrong dW
    (35% off) for a write through `.data`. Where W requires grad the op now returns a copy of
    its operands, saved for dW (cat_linear_tanh_saving); its hidden state still feeds the h2o
    site (CellH2O.check bypassed: the interpreter profile has no h2o kernel)."""
    import fusion_backend.patterns.cat_linear_tanh as clt
    import fusion_backend.patterns.cell_h2o as ch
    from fusion_backend import backend

    if h2o:
        monkeypatch.setattr(ch.CellH2O, "check", lambda self, m, ctx: None)
    graphs = []
    inductor = backend._inductor
    monkeypatch.setattr(backend, "_inductor", lambda gm, ex, opts: graphs.append(gm) or inductor(gm, ex, opts))
    torch.manual_seed(41)
    model = RNNCell()
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    x, h0, g_out = torch.randn(B, I), torch.randn(B, H), torch.randn(B, O)
    compiled = compile_(model)
    for m, fn, dtype in ((model, compiled, torch.float32), (eager, eager, torch.float32), (ref, ref, torch.float64)):
        h = h0.clone().to(dtype)
        out, hidden = fn(x.to(dtype), h)
        (h.data if how == ".data" else h).copy_(hidden.detach())
        (out * g_out.to(dtype)).sum().backward()
    assert fusion_backend.counters[NAME] == 1 and fusion_backend.counters["cell_h2o"] == int(h2o)
    targets = [n.target for g in graphs for n in g.graph.nodes]
    assert clt.cat_linear_tanh_saving in targets and clt.cat_linear_tanh not in targets
    for name in ("i2h.weight", "i2h.bias", "h2o.weight", "h2o.bias"):
        got, want, ref64 = (dict(m.named_parameters())[name].grad for m in (model, eager, ref))
        torch.testing.assert_close(got, want, **grad_close(want), msg=lambda m: f"{name} vs eager: {m}")
        torch.testing.assert_close(got, ref64.float(), **grad_close(ref64), msg=lambda m: f"{name} vs fp64: {m}")


def test_saving_op_double_backward_passes_the_copy_gradient_on():
    """A direct call of the saving op with create_graph=True: dW = dz^T @ copy depends on the
    operands through the copy, whose gradient the backward dropped (dx 3.6 where eager gives
    1.0). Under torch.compile AOTAutograd refuses double backward, as for Inductor alone."""
    import torch.nn.functional as F

    import fusion_backend.patterns.cat_linear_tanh as clt

    torch.manual_seed(0)
    x, h = torch.randn(B, I, requires_grad=True), torch.randn(B, H, requires_grad=True)
    w, b = torch.randn(H, I + H, requires_grad=True), torch.randn(H, requires_grad=True)
    results = []
    for cell in (lambda: clt.cat_linear_tanh_saving([x, h], w, b, "ieee", False, 1.0)[0],
                 lambda: torch.tanh(F.linear(torch.cat((x, h), 1), w, b))):
        gw, = torch.autograd.grad(cell().square().sum(), w, create_graph=True)
        results.append(torch.autograd.grad(gw.square().sum(), (x, h, b)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, **grad_close(want))


def test_no_operand_copy_without_dw(monkeypatch):
    """No backward (no_grad) or a frozen W: the plain op, no copy of the operands."""
    import fusion_backend.patterns.cat_linear_tanh as clt
    from fusion_backend import backend

    graphs = []
    inductor = backend._inductor
    monkeypatch.setattr(backend, "_inductor", lambda gm, ex, opts: graphs.append(gm) or inductor(gm, ex, opts))
    model = RNNCell()
    model.i2h.weight.requires_grad_(False)
    x, h = torch.randn(B, I, requires_grad=True), torch.randn(B, H)
    compile_(model)(x, h)[0].sum().backward()
    assert x.grad is not None
    with torch.no_grad():
        compile_(RNNCell())(x, h)
    targets = [n.target for g in graphs for n in g.graph.nodes]
    assert fusion_backend.counters[NAME] == 2 and clt.cat_linear_tanh in targets
    assert not any(t in clt.SAVING_CELL_OPS for t in targets)


class BufferWrittenThroughAlias(nn.Module):
    """KernelBench-style cell with its hidden state in a buffer, updated in the forward through
    an alias of the buffer (spelled `how`), and a second cell that never touches it."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.register_buffer("hidden", torch.randn(B, H))
        self.i2h = nn.Linear(I + H, H)
        self.other = nn.Linear(I + H, H)

    def forward(self, x):
        new = torch.tanh(self.i2h(torch.cat((x, self.hidden), 1)))
        other = torch.tanh(self.other(torch.cat((x, new), 1)))
        if self.how == ".data":
            self.hidden.data.copy_(new.detach())
        else:
            self.hidden.view(-1).copy_(new.detach().view(-1))
        return other


class StateCopiedBack(nn.Module):
    """Keeps its hidden state in a buffer, written back at the end of forward: the usual idiom
    for carrying state across calls."""

    def __init__(self, in_place_between=False):
        super().__init__()
        self.register_buffer("hidden", torch.randn(B, H))
        self.i2h = nn.Linear(I + H, H)
        self.in_place_between = in_place_between

    def forward(self, x):
        if self.in_place_between:
            self.hidden.mul_(0.5)  # before the site: what the fused op reads, as eager's cat
        new = torch.tanh(self.i2h(torch.cat((x, self.hidden), 1)))
        self.hidden.copy_(new)
        return new


@pytest.mark.parametrize("in_place_between", [False, True], ids=["copy_back", "mul_before_and_copy_back"])
def test_state_buffer_written_back_after_the_site_is_fused_without_a_backward(in_place_between):
    """Without a backward, a write to an operand before the site is what the op reads and one
    after it comes too late to matter: the site was refused ("input ... is mutated in the
    graph"), and the KernelBench-style cell writing its state back stayed unfused."""
    torch.manual_seed(27)
    model = StateCopiedBack(in_place_between)
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    compiled = compile_(model)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(B, I)
            out, e, r = compiled(x), eager(x), ref(x.double())
            assert_matches(out, e, r)
            assert_matches(model.hidden, eager.hidden, ref.hidden)
    assert fusion_backend.counters[NAME] == 1


@pytest.mark.parametrize("how", [".data", "view"])
def test_cat_operand_written_through_an_alias_after_the_site(how):
    """The cell's op saves its cat operands for dW (eager's cat is a copy): a write to the
    buffer through `.data` (no version counter: dW was silently wrong) or a view (AOT failed
    and the whole graph fell back) leaves that site unfused with the reason; the other cell
    stays fused, and gradients match eager."""
    torch.manual_seed(26)
    model = BufferWrittenThroughAlias(how)
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    x = torch.randn(B, I)
    report = fusion_backend.explain(copy.deepcopy(model), x)
    assert [s.node for s in report.fused] == ["other"], report
    assert "is mutated in the graph" in report.skipped[0].reason, report
    torch._dynamo.reset()
    fusion_backend.counters.clear()
    out, e, r = compile_(model)(x), eager(x), ref(x.double())
    assert fusion_backend.counters[NAME] == 1
    assert_matches(out, e, r)
    assert_matches(model.hidden, eager.hidden, ref.hidden, "hidden buffer")
    for o in (out, e, r):
        o.square().sum().backward()
    for (name, p), q, p64 in zip(model.named_parameters(), eager.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **grad_close(q.grad), msg=lambda m: f"{name} vs eager: {m}")
        torch.testing.assert_close(p.grad, p64.grad.float(), **grad_close(p64.grad), msg=lambda m: f"{name} vs fp64: {m}")


#: both patterns named explicitly (the default enables both too)
SEQUENCE = {"patterns": ["cat_linear_tanh", "rnn_sequence"]}


class UnrolledRNN(models.UnrolledRNN):
    """The sequence model of issue 4 at this file's small, odd sizes."""

    def __init__(self):
        super().__init__(I, H, O)


class HFirstRNN(UnrolledRNN):
    """The same loop with h as the cat's first operand: W is [W_h | W_x]."""

    def forward(self, xs, h):
        outputs = []
        for t in range(xs.shape[0]):
            h = torch.tanh(self.i2h(torch.cat((h, xs[t]), dim=1)))
            outputs.append(self.h2o(h))
        return torch.stack(outputs), h


@pytest.mark.parametrize("order", ["(x, h)", "(h, x)"])
def test_unrolled_sequence_one_recurrence_and_bptt(order):
    """Dynamo unrolls the loop; the chain of cells becomes one recurrence op; outputs, final
    hidden state and the gradients through time match eager. Either cat order (cat((h, x_t))
    was fused step by step only)."""
    torch.manual_seed(11)
    steps = 6
    model = UnrolledRNN() if order == "(x, h)" else HFirstRNN()
    eager = copy.deepcopy(model)
    model64 = copy.deepcopy(model).double()
    xs, h0 = torch.randn(steps, B, I), torch.randn(B, H)
    # x and h0 require grad too: their gradients (h0's carried back through every step) as well
    inputs = [(xs.clone().requires_grad_(), h0.clone().requires_grad_()) for _ in range(2)]
    x64, h64 = xs.double().requires_grad_(), h0.double().requires_grad_()
    out, h = torch.compile(model, backend="fusedtriton", options=SEQUENCE)(*inputs[0])
    assert fusion_backend.counters["rnn_sequence"] == 1  # the chain became one recurrence
    assert fusion_backend.counters[NAME] == 0  # no step left for the per-cell pattern
    e_out, e_h = eager(*inputs[1])
    r_out, r_h = model64(x64, h64)
    assert rel_err(out, r_out) <= tolerance(torch.float32, eager_err=rel_err(e_out, r_out))
    assert rel_err(h, r_h) <= tolerance(torch.float32, eager_err=rel_err(e_h, r_h))
    (out.square().sum() + h.sum()).backward()
    (e_out.square().sum() + e_h.sum()).backward()
    (r_out.square().sum() + r_h.sum()).backward()
    grads = [(name, p.grad, q.grad, r.grad) for (name, p), (_, q), (_, r) in
             zip(model.named_parameters(), eager.named_parameters(), model64.named_parameters())]
    grads += [("xs", inputs[0][0].grad, inputs[1][0].grad, x64.grad),
              ("h0", inputs[0][1].grad, inputs[1][1].grad, h64.grad)]
    for name, got, want, ref in grads:
        assert rel_err(got, ref) <= tolerance(torch.float32, eager_err=rel_err(want, ref)), name


@pytest.mark.parametrize("order", ["(x, h)", "(h, x)"])
def test_sequence_shape_reads_in_the_cats_order(order):
    """explain() gives the sequence's widths in its cat's order, as the cell pattern does (it
    gave (x+h) for cat((h, x_t)) too)."""
    model = UnrolledRNN() if order == "(x, h)" else HFirstRNN()
    with torch.no_grad():
        report = fusion_backend.explain(model, torch.randn(3, B, I), torch.randn(B, H))
    (site,) = [s for s in report.fused if s.pattern == "rnn_sequence"]
    widths = f"({I}+{H})" if order == "(x, h)" else f"({H}+{I})"
    assert site.info["shape"] == f"{B}x{widths}->{H}", str(report)


class StackedSharedW(nn.Module):
    """Two stacked layers sharing one Linear (layer 2's x_t is layer 1's h_t), cat order `order`."""

    def __init__(self, order):
        super().__init__()
        self.order = order
        self.cell = nn.Linear(2 * H, H)

    def forward(self, xs, h0):
        h1, h2 = h0, h0 * 0.5
        for t in range(xs.shape[0]):
            if self.order == "(h, x)":
                h1 = torch.tanh(self.cell(torch.cat((h1, xs[t]), 1)))
                h2 = torch.tanh(self.cell(torch.cat((h2, h1), 1)))
            else:
                h1 = torch.tanh(self.cell(torch.cat((xs[t], h1), 1)))
                h2 = torch.tanh(self.cell(torch.cat((h1, h2), 1)))
        return h2


@pytest.mark.parametrize("order", ["(x, h)", "(h, x)"])
def test_stacked_layers_sharing_w_are_two_sequences_through_time(order):
    """Each layer is one recurrence over the steps, in either cat order (in (h, x) order the
    pieces [layer 1, layer 2] of each step were taken as 2-step sequences)."""
    torch.manual_seed(3)
    model = StackedSharedW(order)
    xs, h0 = torch.randn(4, B, H), torch.randn(B, H)
    with torch.no_grad():
        report = fusion_backend.explain(model, xs, h0)
        torch._dynamo.reset()
        out = compile_(model)(xs, h0)
        eager = model(xs, h0)
        ref = copy.deepcopy(model).double()(xs.double(), h0.double())
    assert [(s.pattern, s.info["steps"]) for s in report.fused] == [("rnn_sequence", 4)] * 2, str(report)
    assert_matches(out, eager, ref)


class FeedbackRNN(UnrolledRNN):
    """x_t depends on h_{t-1}: the input projections cannot be hoisted."""

    def forward(self, xs, h):
        for t in range(xs.shape[0]):
            x = xs[t] + h.sum(1, keepdim=True)
            h = torch.tanh(self.i2h(torch.cat((x, h), dim=1)))
        return h


def test_sequence_hoists_both_projections_and_refuses_feedback():
    torch.manual_seed(12)
    model = UnrolledRNN()
    xs, h0 = torch.randn(5, B, I), torch.randn(B, H)
    report = fusion_backend.explain(model, xs, h0, options=SEQUENCE)
    seq = [s for s in report.fused if s.pattern == "rnn_sequence"]
    assert len(seq) == 1 and seq[0].info["steps"] == 5, report
    assert "h2o of all steps: one GEMM" in seq[0].info["hoisted"], report

    torch._dynamo.reset()
    fusion_backend.counters.clear()
    feedback = FeedbackRNN()
    model64 = copy.deepcopy(feedback).double()
    report = fusion_backend.explain(feedback, xs, h0, options=SEQUENCE)
    assert not [s for s in report.fused if s.pattern == "rnn_sequence"]
    assert any(s.pattern == "rnn_sequence" and "depends on an earlier step" in s.reason for s in report.skipped), report
    out = torch.compile(feedback, backend="fusedtriton", options=SEQUENCE)(xs, h0)
    ref = model64(xs.double(), h0.double())
    assert rel_err(out, ref) <= tolerance(torch.float32, eager_err=rel_err(feedback(xs, h0), ref))


@pytest.mark.kernel_failure_expected
@pytest.mark.parametrize("error", [RuntimeError, torch.OutOfMemoryError])
def test_a_recurrence_failure_switches_the_kernel_off_only_where_it_failed(monkeypatch, error):
    """A launch that failed at one (dtype, precision, B, H) sends later calls there to the torch
    loop, not every call of the process (other shapes, other models); an out-of-memory failure
    is tried again at the next call. Results match the loop's either way."""
    import fusion_backend.patterns.rnn_sequence as seq

    launched = []
    real_launch = seq.launch

    def launch(p, w_h, hs, precision, programs, kwargs):
        launched.append(p.shape)
        if p.shape[2] == 7:
            raise error("injected failure")
        return real_launch(p, w_h, hs, precision, programs, kwargs)

    monkeypatch.setattr(seq, "launch", launch)
    monkeypatch.setattr(seq, "_failed", {})
    for H_ in (7, 7, 9):
        p, h0, w_h = torch.randn(3, 2, H_), torch.randn(2, H_), torch.randn(H_, H_) * 0.3
        hs = seq.recurrence(p, h0, w_h, "ieee")
        ref = torch.empty_like(hs)
        ref[0] = h0
        torch.testing.assert_close(hs, seq._reference(p, w_h, ref))
    sticky = error is not torch.OutOfMemoryError
    assert [s[2] for s in launched] == ([7, 9] if sticky else [7, 7, 9])
    assert len(seq._failed) == int(sticky)


@pytest.mark.kernel_failure_expected
def test_sequence_kernel_failure_falls_back_with_one_warning(monkeypatch, caplog):
    import logging

    import fusion_backend.patterns.rnn_sequence as seq

    class Raising:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("injected kernel failure")
            return launch

    monkeypatch.setattr(seq, "_rnn_recurrence_kernel", Raising())
    monkeypatch.setattr(seq, "_failed", {})
    torch.manual_seed(13)
    model = UnrolledRNN()
    model64 = copy.deepcopy(model).double()
    xs, h0 = torch.randn(4, B, I), torch.randn(B, H)
    with caplog.at_level(logging.WARNING, logger="fusion_backend"):
        compiled = torch.compile(model, backend="fusedtriton", options=SEQUENCE)
        out, h = compiled(xs, h0)
        out, h = compiled(xs, h0)
    assert fusion_backend.counters["rnn_sequence"] == 1
    warnings = [r for r in caplog.records if "rnn_sequence kernel failed" in r.getMessage()]
    assert len(warnings) == 1
    r_out, r_h = model64(xs.double(), h0.double())
    e_out, e_h = model(xs, h0)
    assert rel_err(out, r_out) <= tolerance(torch.float32, eager_err=rel_err(e_out, r_out))
    assert rel_err(h, r_h) <= tolerance(torch.float32, eager_err=rel_err(e_h, r_h))


def test_explain_collapses_the_steps_of_an_unrolled_loop():
    """With the sequence pattern off, each step is its own site: explain shows them as one line."""
    model = UnrolledRNN()
    xs, h0 = torch.randn(7, B, I), torch.randn(B, H)
    text = str(fusion_backend.explain(model, xs, h0, options={"patterns": [NAME]}))
    step_lines = [line for line in text.splitlines() if line.lstrip().startswith("+ cat_linear_tanh")]
    assert len(step_lines) == 1 and "(x7)" in step_lines[0], text
    torch._dynamo.reset()
    text = str(fusion_backend.explain(model, xs, h0))
    assert "rnn_sequence" in text and "steps=7" in text and "cat_linear_tanh" not in text, text


def test_sequence_pattern_on_by_default_and_can_be_turned_off():
    model = UnrolledRNN()
    xs, h0 = torch.randn(3, B, I), torch.randn(B, H)
    e_out, e_h = copy.deepcopy(model)(xs, h0)
    r_out, r_h = copy.deepcopy(model).double()(xs.double(), h0.double())
    out, h = torch.compile(model, backend="fusedtriton")(xs, h0)
    assert fusion_backend.counters["rnn_sequence"] == 1 and fusion_backend.counters[NAME] == 0
    assert_matches(out, e_out, r_out)
    assert_matches(h, e_h, r_h, "hidden")
    torch._dynamo.reset()
    fusion_backend.counters.clear()
    out, h = torch.compile(model, backend="fusedtriton", options={"patterns": [NAME]})(xs, h0)
    assert fusion_backend.counters[NAME] == 3 and fusion_backend.counters["rnn_sequence"] == 0
    assert_matches(out, e_out, r_out)
    assert_matches(h, e_h, r_h, "hidden")


@pytest.mark.parametrize("resident", [False, True], ids=["streamed_w", "resident_w"])
@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])
def test_recurrence_kernel_grid_barrier_path(precision, resident):
    """The GPU configs split the hidden columns across programs that meet at a grid barrier
    after each step. The interpreter runs programs one after another (more than one would
    wait forever), so here a single program takes the barrier path (H <= BLOCK_N), with W
    streamed per step or held in registers, and the multi-program split is checked on the GPU
    (tests/test_gpu.py)."""
    import fusion_backend.patterns.rnn_sequence as seq

    torch.manual_seed(14)
    T, hidden = 9, 15
    p, h0 = torch.randn(T, B, hidden) * 3, torch.randn(B, hidden)
    w_h = torch.randn(hidden, 2 * hidden)[:, ::2]  # non-contiguous weight
    profile = devices.device_profile(p.device)
    config = dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=16, GRID_SYNC=True, RESIDENT=resident, RESIDENT_MAX_K=32, K_SPLIT=2,
                  num_warps=1, num_stages=1)
    hs = torch.full((T + 1, B, hidden), float("nan"))  # poisoned: every row must be written
    hs[0] = h0
    seq.launch(p, w_h, hs, precision, *seq.plan(config, profile, B, hidden))
    ref = seq._reference(p.double(), w_h.double(), torch.cat([h0.double()[None], torch.empty(T, B, hidden).double()]))
    eager = seq._reference(p, w_h, torch.cat([h0[None], torch.empty(T, B, hidden)]))
    assert rel_err(hs, ref) <= tolerance(torch.float32, eager_err=rel_err(eager, ref))


def test_recurrence_config_follows_the_dot_precision():
    """On the H100 profile 3xTF32 splits the reduction into 4 chunks, TF32 does not (measured:
    benchmarks/recurrence.py); the interpreter has one config for all."""
    import fusion_backend.patterns.rnn_sequence as seq
    from conftest import profile_named

    h100 = profile_named("h100-sxm")
    assert seq._config(h100, torch.float32, "tf32x3")["K_SPLIT"] == 4
    assert seq._config(h100, torch.float32, "tf32")["K_SPLIT"] == 1
    assert "precisions" not in seq._config(h100, torch.float32, "tf32x3")  # data, not a kernel argument
    interp = devices.INTERPRETER
    assert seq._config(interp, torch.float32, "tf32x3") == seq._config(interp, torch.float32, "ieee")


@pytest.mark.parametrize("block_b,H,resident", [(16, 256, True), (16, 300, True), (16, 513, False),
                                                (32, 256, True), (64, 256, False), (64, 100, True)])
def test_resident_w_limit_scales_with_the_batch(block_b, H, resident):
    import fusion_backend.patterns.rnn_sequence as seq

    config = dict(RESIDENT=True, RESIDENT_MAX_K=512)
    assert seq.keeps_w_resident(config, block_b, H) == resident
    assert not seq.keeps_w_resident(dict(config, RESIDENT=False), block_b, H)


@pytest.mark.parametrize("case", ["fp16", "batch1", "noncontiguous_xs", "large_and_nan"])
def test_sequence_edge_inputs(case):
    """The sequence path on inputs a user may pass: fp16, a batch of one, xs that is a strided
    view, and inputs of +-1e3 with a NaN (tanh saturates to exactly +-1; the NaN spreads
    through later steps as in eager). Compared with eager and fp64 where finite."""
    torch.manual_seed(15)
    steps, batch = 5, (1 if case == "batch1" else B)
    dtype = torch.float16 if case == "fp16" else torch.float32
    model = UnrolledRNN().to(dtype)
    model64 = copy.deepcopy(model).double()
    xs = torch.randn(steps, batch, 2 * I)[:, :, ::2] if case == "noncontiguous_xs" else torch.randn(steps, batch, I)
    h0 = torch.randn(batch, H)
    if case == "large_and_nan":
        xs = xs * 1e3
        xs[2, 0, 5] = float("nan")
    xs, h0 = xs.to(dtype), h0.to(dtype)
    with torch.no_grad():
        out, h = torch.compile(model, backend="fusedtriton")(xs, h0)
        e_out, e_h = model(xs, h0)
        r_out, r_h = model64(xs.double(), h0.double())
    assert fusion_backend.counters["rnn_sequence"] == 1
    for got, eager, ref in ((out, e_out, r_out), (h, e_h, r_h)):
        assert got.dtype == eager.dtype and got.shape == eager.shape
        assert torch.equal(torch.isnan(got), torch.isnan(eager))  # NaN exactly where eager has it
        ok = ~torch.isnan(eager)
        eager_err = rel_err(eager[ok], ref[ok])
        assert rel_err(got[ok], ref[ok]) <= tolerance(dtype, "highest", eager_err=eager_err)
    if case == "large_and_nan":
        assert (h[1:].abs() <= 1).all()  # rows without the NaN: saturated, never above 1


def test_sequence_refused_for_a_batch_over_the_kernel_limit():
    model = UnrolledRNN()
    xs, h0 = torch.randn(3, 65, I), torch.randn(65, H)
    report = fusion_backend.explain(model, xs, h0)
    assert any(s.pattern == "rnn_sequence" and "batch 65 > 64" in s.reason for s in report.skipped), report
    assert fusion_backend.counters["rnn_sequence"] == 0


def test_recurrence_over_the_batch_limit_at_run_time_takes_the_torch_loop(monkeypatch):
    """With a dynamic batch the rewrite's batch check sees one size and the call another: a
    batch over the kernel's limit then runs the torch loop for that call (no launch, and the
    kernel stays on for later calls)."""
    import fusion_backend.patterns.rnn_sequence as seq

    def no_launch(*args):
        raise AssertionError("launched the recurrence kernel over its batch limit")

    monkeypatch.setattr(seq, "launch", no_launch)
    monkeypatch.setattr(seq, "_failed", {})  # a failed launch would switch the kernel off for the process
    T, B = 3, 65
    p, h0, w_h = torch.randn(T, B, H), torch.randn(B, H), torch.randn(H, H) * 0.3
    hs = seq.recurrence(p, h0, w_h, "ieee")
    h = h0
    for t in range(T):
        h = torch.tanh(p[t] + h @ w_h.t())
        torch.testing.assert_close(hs[t + 1], h)
    assert not seq._failed


def test_grid_barrier_program_count_stays_resident(monkeypatch):
    """All programs of the recurrence wait on each other, so their number stays far below what
    the GPU can hold at once: capped, and scaled down when MPS limits this process."""
    import fusion_backend.patterns.rnn_sequence as seq
    from conftest import profile_named

    h100 = profile_named("h100-sxm")
    monkeypatch.delenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", raising=False)
    assert seq.grid_sync_programs(h100) == seq.MAX_GRID_PROGRAMS == 32
    monkeypatch.setenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "10")
    assert seq.grid_sync_programs(h100) == 13  # 10% of 132 multiprocessors
    monkeypatch.setenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "0")
    assert seq.grid_sync_programs(h100) == 1
    monkeypatch.setenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "not a number")
    assert seq.grid_sync_programs(h100) == 32


# ----------------------------------------------------------------------------- inline ops

INLINE_META = [16, 16, 16, 4, 1, 1]  # BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_inline_cell_ops_match_eager(bias):
    """The triton_op forms of the cell kernel (what Inductor launches itself on a GPU, see
    `_common.inline_meta`), called eagerly: a 3-way cat with odd widths and a strided operand,
    and the h2o Linear (no tanh); outputs and gradients against eager and fp64."""
    from fusion_backend.patterns.cat_linear_tanh import cat_linear_tanh_inline
    from fusion_backend.patterns.cell_h2o import cell_h2o_inline

    torch.manual_seed(31)
    model = RNNCell((11,), bias)
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    x, h, e = torch.randn(B, I) * 2, torch.randn(B, 2 * H)[:, ::2], torch.randn(B, 11)
    g_out, g_hidden = torch.randn(B, O), torch.randn(B, H)
    runs = []
    for m, dtype in ((model, torch.float32), (eager, torch.float32), (ref, torch.float64)):
        xs = [t.detach().clone().to(dtype).requires_grad_(True) for t in (x, h, e)]
        if m is model:
            hidden = cat_linear_tanh_inline(xs, m.i2h.weight, m.i2h.bias, "ieee", INLINE_META)
            out = cell_h2o_inline(hidden, m.h2o.weight, m.h2o.bias, "ieee", INLINE_META)
        else:
            out, hidden = m(*xs)
        ((out * g_out.to(dtype)).sum() + (hidden * g_hidden.to(dtype)).sum()).backward()
        runs.append({"out": out.detach(), "hidden": hidden.detach(), "x": xs[0].grad, "h": xs[1].grad,
                     "W": m.i2h.weight.grad, "W_h2o": m.h2o.weight.grad})
    got, want, ref64 = runs
    assert_matches(got["hidden"], want["hidden"], ref64["hidden"], "hidden")
    assert_matches(got["out"], want["out"], ref64["out"], "out")
    assert_grads_close(got, want, ref64, ("x", "h", "W", "W_h2o"))


def test_inline_cell_rewrite(monkeypatch):
    """The rewrite with the inline cell ops in the graph (forced here; on a GPU `inline_meta`
    decides), run as FX code since Inductor on a CPU cannot launch Triton kernels: a stateful
    module over three calls, its h2o on the inline h2o op reading the inline cell's output
    (`CellH2O.check` bypassed: the interpreter profile has no h2o kernel that beats cuBLAS),
    and gradients of the argument-style cell."""
    import fusion_backend.patterns.cat_linear_tanh as clt
    import fusion_backend.patterns.cell_h2o as ch
    from fusion_backend import backend

    def forced(ctx, key, static):
        return INLINE_META if static else None

    monkeypatch.setattr(clt, "inline_meta", forced)
    monkeypatch.setattr(ch, "inline_meta", forced)
    monkeypatch.setattr(ch.CellH2O, "check", lambda self, m, ctx: None)
    graphs = []
    monkeypatch.setattr(backend, "_inductor", lambda gm, example_inputs, options: graphs.append(gm) or gm)
    torch.manual_seed(32)
    model = VanillaRNN("buffer")
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    compiled = compile_(model)
    with torch.no_grad():
        for step in range(3):
            x = torch.randn(B, I)
            assert_matches(compiled(x), eager(x), ref(x.double()), f"output, call {step}")
            assert_matches(model.hidden, eager.hidden, ref.hidden, f"hidden, call {step}")
    targets = [n.target for g in graphs for n in g.graph.nodes]
    assert clt.cat_linear_tanh_inline in targets and clt.cat_linear_tanh not in targets
    assert ch.cell_h2o_inline in targets and ch.cell_h2o not in targets
    assert fusion_backend.counters["cell_h2o"] == 1
    got, want, ref64 = cell_grads(RNNCell(), torch.randn(B, I) * 2, torch.randn(B, H))
    assert fusion_backend.counters[NAME] == 2
    assert_matches(got["hidden"], want["hidden"], ref64["hidden"], "hidden")
    assert_grads_close(got, want, ref64, ("x", "h", "W", "b"))


def test_h2o_check_names_missing_example_values():
    """A graph without example values (no FakeTensor propagation): the h2o site is refused
    with that reason, not an AttributeError or a dtype reason that blames autocast."""
    import torch.fx as fx

    from fusion_backend.patterns.cat_linear_tanh import cat_linear_tanh
    from fusion_backend.patterns.cell_h2o import CellH2O

    g = fx.Graph()
    x, h, w, b, w2, b2 = (g.placeholder(n) for n in ("x", "h", "w", "b", "w2", "b2"))
    cell = g.call_function(cat_linear_tanh, ([x, h], w, b, "ieee", False, 1.0))
    g.output(g.call_function(torch.nn.functional.linear, (cell, w2, b2)))
    (linear,) = [n for n in g.nodes if n.target is torch.nn.functional.linear]
    pattern = CellH2O()
    m = pattern.match(linear)
    assert m is not None
    assert "no example value" in pattern.check(m, ctx=None)


def test_saved_input_written_matters_only_where_a_backward_runs():
    """The one rule all three op patterns (cell, MLP block, h2o) apply to in-graph writes of
    their inputs: with a backward, a write to an input (also through `.data` after it) refuses
    the site; without one it cannot change the result (before the site it is what the op
    reads, after it comes too late). cell_h2o refused any direct write, backward or not."""
    from fusion_backend.patterns._common import saved_input_written

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def after(x, w):
        y = torch.nn.functional.linear(x, w)
        w.mul_(2)
        return y

    def through_data_after(x, w):
        y = torch.nn.functional.linear(x, w)
        w.data.mul_(2)
        return y

    for fn in (after, through_data_after):
        graphs.clear()
        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(fn, backend=capture)(torch.randn(3, 4), torch.randn(5, 4))
        (gm,) = graphs
        w = [n for n in gm.graph.nodes if n.op == "placeholder"][1]
        assert saved_input_written([w, None], backward=False) is None
        assert saved_input_written([w, None], backward=True) == f"input {w.name} is mutated in the graph", fn
