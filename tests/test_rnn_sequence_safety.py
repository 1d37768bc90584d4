"""Pattern `rnn_sequence` where moving work to the first step would change the result: grad-mode
and autocast switches inside the unrolled loop, in-place writes between steps, the user's xs
changed in place between forward and backward, and steps over `xs.unbind(0)`.

The rewrite hoists every step's input projection (and the h2o of every step) to the first
step's cat and runs the recurrence there. Across a no_grad / autocast region or an in-place
write, that computes something else than eager: the chain must be left unfused (with the
reason in explain()) or be fused in a form that matches eager in outputs, gradients and dtypes.
Tiny shapes, a few steps: the kernels run under Triton's interpreter (conftest).
"""
import copy

import pytest
import torch
import torch.nn as nn

import fusion_backend
from fusion_backend import devices, models
from conftest import randomize_batch_norm
from tolerances import HALF, grad_close, rel_err, tolerance

pytestmark = pytest.mark.skipif(not devices.interpreter_enabled(),
                                reason="needs TRITON_INTERPRET=1 (conftest sets it when there is no GPU)")

SEQ = "rnn_sequence"
T, B, I, H, O = 4, 3, 5, 7, 3  # steps, batch, input width, hidden width, h2o width


class Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.i2h = nn.Linear(I + H, H)
        self.h2o = nn.Linear(H, O)

    def step(self, x, h):
        return torch.tanh(self.i2h(torch.cat((x, h), 1)))


def compile_(model):
    return torch.compile(model, backend="fusedtriton")


def refused(model, *inputs, reason):
    """explain() leaves the sequence unfused, naming `reason`; inputs are cloned (the models
    may write to them)."""
    torch._dynamo.reset()
    fusion_backend.counters.clear()
    report = fusion_backend.explain(model, *(t.clone() for t in inputs))
    assert not [s for s in report.fused if s.pattern == SEQ], str(report)
    sites = [s for s in report.skipped if s.pattern == SEQ]
    assert sites and all(reason in s.reason for s in sites), str(report)
    assert sites[0].reason in str(report)
    assert fusion_backend.counters[SEQ] == 0, dict(fusion_backend.counters)
    torch._dynamo.reset()
    fusion_backend.counters.clear()


def assert_close_to(got, eager, ref64):
    """Within the tolerance of fp64 and of eager: fp32 at "highest" (relative to eager's own
    error), bf16/fp16 within HALF (or twice eager's own error, where eager's is larger)."""
    assert got.dtype == eager.dtype and got.shape == eager.shape, (got.dtype, eager.dtype)
    if got.dtype in (torch.float16, torch.bfloat16):
        tol = max(HALF, 2 * rel_err(eager, ref64))
    else:
        tol = tolerance(torch.float32, "highest", eager_err=rel_err(eager, ref64))
    assert rel_err(got, ref64) <= tol and rel_err(got, eager) <= tol, (rel_err(got, ref64), rel_err(got, eager), tol)


def train_step(model, xs, h0):
    """(compiled result, eager result, fp64 result, the three models) after backward of sum()."""
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    results = []
    for m, fn, dtype in ((model, compile_(model), torch.float32), (eager, eager, torch.float32),
                         (ref, ref, torch.float64)):
        out = fn(xs.to(dtype), h0.to(dtype))
        if out.requires_grad:
            out.float().square().sum().backward()
        results.append(out)
    return (*results, (model, eager, ref))


def assert_grads_match(models_):
    got, want, ref = (dict(m.named_parameters()) for m in models_)
    for name in got:
        g, w, r = got[name].grad, want[name].grad, ref[name].grad
        assert (g is None) == (w is None), f"{name}: grad {'missing' if g is None else 'computed'} unlike eager"
        if w is not None:
            torch.testing.assert_close(g, w, **grad_close(r), msg=lambda m: f"grad {name} vs eager: {m}")


# ----------------------------------------------------------------------------- grad mode, autocast

class TruncatedBPTT(Base):
    """Burn-in steps without grad, then steps trained with backpropagation through time."""

    def forward(self, xs, h):
        with torch.no_grad():
            for t in range(2):
                h = self.step(xs[t], h)
        for t in range(2, xs.shape[0]):
            h = self.step(xs[t], h)
        return h


class FrozenEncoder(Base):
    """Each step's input goes through an embedding under no_grad (frozen)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(I, I)

    def forward(self, xs, h):
        for t in range(xs.shape[0]):
            with torch.no_grad():
                x = self.emb(xs[t])
            h = self.step(x, h)
        return h


@pytest.mark.parametrize("model_cls, sequences", [(FrozenEncoder, 0), (TruncatedBPTT, 2)])
def test_no_grad_inside_the_loop_and_grads_match(model_cls, sequences):
    """A no_grad encoder inside every step: the chain is refused. A no_grad burn-in, then
    trained steps: the chain is cut where the grad mode changes (`_cut`), a sequence each (the
    whole chain was refused, and neither part was fused). Gradients as eager's either way (emb
    has none, as in eager)."""
    torch.manual_seed(1)
    model = model_cls()
    xs, h0 = torch.randn(T + 1, B, I), torch.randn(B, H)
    out, e, r, models_ = train_step(copy.deepcopy(model), xs, h0)
    assert out.requires_grad == e.requires_grad is True
    assert_close_to(out, e, r)
    assert_grads_match(models_)
    assert fusion_backend.counters[SEQ] == sequences, dict(fusion_backend.counters)
    if not sequences:
        refused(model, xs, h0, reason="runs in another grad mode or autocast region")


class PrimedGenerator(Base):
    """A prompt of given inputs, then steps that read the previous step's output (a char-RNN
    sampling greedily): the prompt is a sequence, the generating steps are cells."""

    def forward(self, prompt, h, steps=3):
        for t in range(prompt.shape[0]):
            h = self.step(prompt[t], h)
        outs = []
        for _ in range(steps):
            x = self.emb(self.h2o(h))
            h = self.step(x, h)
            outs.append(x)
        return torch.stack(outs), h

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(O, I)


def test_prompt_then_generated_steps_fuse_the_prompt_as_a_sequence():
    """The chain is cut before the first step whose input depends on an earlier step: the whole
    chain was refused ("input ... depends on an earlier step") and no part was a sequence."""
    torch.manual_seed(4)
    model = PrimedGenerator()
    prompt, h0 = torch.randn(T, B, I), torch.randn(B, H)
    with torch.no_grad():
        got = compile_(copy.deepcopy(model))(prompt, h0)
        want = model(prompt, h0)
        ref = copy.deepcopy(model).double()(prompt.double(), h0.double())
    for g, w, r64 in zip(got, want, ref):
        assert_close_to(g, w, r64)
    assert fusion_backend.counters[SEQ] == 1 and fusion_backend.counters["cat_linear_tanh"] == 3, dict(
        fusion_backend.counters)


class AutocastReadoutPerStep(Base):
    """Only the h2o of each step runs under autocast (bf16)."""

    def forward(self, xs, h):
        outs = []
        for t in range(xs.shape[0]):
            h = self.step(xs[t], h)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outs.append(self.h2o(h))
        return torch.stack(outs)


class AutocastReadoutAfterLoop(Base):
    """The recurrence in fp32; the h2o of all steps afterwards, under autocast: hoisting the
    h2o to the first step would take it out of the autocast region."""

    def forward(self, xs, h):
        hs = []
        for t in range(xs.shape[0]):
            h = self.step(xs[t], h)
            hs.append(h)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return torch.stack([self.h2o(h) for h in hs])


@pytest.mark.parametrize("model_cls", [AutocastReadoutPerStep, AutocastReadoutAfterLoop])
def test_autocast_h2o_is_not_hoisted_out_of_autocast(model_cls):
    torch.manual_seed(2)
    model = model_cls()
    xs, h0 = torch.randn(T, B, I), torch.randn(B, H)
    with torch.no_grad():
        out, e = compile_(model)(xs, h0), model(xs, h0)
        r = copy.deepcopy(model).double()(xs.double(), h0.double())  # (autocast leaves fp64 alone)
    assert e.dtype == torch.bfloat16
    assert_close_to(out, e, r)
    assert fusion_backend.counters[SEQ] == 0
    refused(model, xs, h0, reason="runs in another grad mode or autocast region")


class _Scale(torch.autograd.Function):
    """A custom autograd.Function (Dynamo: autograd_function_apply, which switches no mode)."""

    @staticmethod
    def forward(ctx, y):
        return y * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


class CustomFunctionReadout(Base):
    def forward(self, xs, h):
        return torch.stack([_Scale.apply(self.h2o(h := self.step(xs[t], h))) for t in range(xs.shape[0])])


class NoGradStatBetweenSteps(Base):
    """A no_grad block between steps that holds no node of the chain (a statistic of h_t)."""

    def forward(self, xs, h):
        outs = []
        for t in range(xs.shape[0]):
            h = self.step(xs[t], h)
            with torch.no_grad():
                scale = h.abs().amax() + 1
            outs.append(self.h2o(h) / scale)
        return torch.stack(outs)


@pytest.mark.parametrize("model_cls", [CustomFunctionReadout, NoGradStatBetweenSteps])
def test_mode_switches_that_do_not_touch_the_chain_keep_it_fused(model_cls):
    torch.manual_seed(3)
    model = model_cls()
    xs, h0 = torch.randn(T, B, I), torch.randn(B, H)
    out, e, r, models_ = train_step(copy.deepcopy(model), xs, h0)
    assert fusion_backend.counters[SEQ] == 1, dict(fusion_backend.counters)
    assert_close_to(out, e, r)
    assert_grads_match(models_)


class GradInsideNoGradCall(Base):
    """The loop under `torch.enable_grad()`, the model called under no_grad: the graph starts
    without grad, the chain runs with it."""

    def forward(self, xs, h):
        with torch.enable_grad():
            for t in range(xs.shape[0]):
                h = self.step(xs[t], h)
        return h


def test_xs_changed_before_backward_with_grad_enabled_inside_the_graph():
    torch.manual_seed(4)
    model = GradInsideNoGradCall()
    xs, h0 = torch.randn(T, B, I), torch.randn(B, H)
    grads, hs = [], []
    ref = copy.deepcopy(model).double()
    for m, f in ((model, compile_(model)), (copy.deepcopy(model), None)):
        x = xs.clone()
        with torch.no_grad():
            h = (m if f is None else f)(x, h0.clone())
        hs.append(h.detach().clone())
        x.zero_()  # after the forward, before the backward: eager's cats copied it
        h.sum().backward()
        grads.append(m.i2h.weight.grad)
    assert fusion_backend.counters[SEQ] == 1
    with torch.no_grad():
        assert_close_to(hs[0], hs[1], ref(xs.double(), h0.double()).detach())
    torch.testing.assert_close(grads[0], grads[1], **grad_close(grads[1]))


# ----------------------------------------------------------------------------- in-place writes

class XsScaled(Base):
    def forward(self, xs, h):
        for t in range(xs.shape[0]):
            h = self.step(xs[t], h)
            xs.mul_(0.5)  # later steps read the rescaled input
        return h


class XsScaledByDunder(Base):
    def forward(self, xs, h):
        for t in range(xs.shape[0]):
            h = self.step(xs[t], h)
            xs.__iadd__(1.0)  # an explicit in-place dunder, recorded under its own name
        return h


class XsRectified(Base):
    def forward(self, xs, h):
        xs = xs * 1.0  # an intermediate: normalize leaves an in-place ReLU on it as it is
        for t in range(xs.shape[0]):
            h = self.step(xs[t], h)
            nn.functional.relu(xs, inplace=True)  # what nn.ReLU(inplace=True) becomes
        return h


class HiddenViewZeroed(Base):
    def forward(self, xs, h):
        for t in range(xs.shape[0]):
            h = self.step(xs[t], h)
            h[:, :2].zero_()  # step t+1 reads h_t with its first columns zeroed
        return h


class WeightViewScaled(Base):
    def forward(self, xs, h):
        for t in range(xs.shape[0]):
            h = self.step(xs[t], h)
            self.i2h.weight[:, :I].mul_(0.5)  # W_x changes between steps
        return h


class H2OWeightScaled(Base):
    def forward(self, xs, h):
        outs = []
        for t in range(xs.shape[0]):
            h = self.step(xs[t], h)
            outs.append(self.h2o(h))
            self.h2o.weight.mul_(0.5)  # the next step's h2o reads the scaled weight
        return torch.stack(outs)


@pytest.mark.parametrize("model_cls", [XsScaled, XsScaledByDunder, XsRectified, HiddenViewZeroed, WeightViewScaled,
                                       H2OWeightScaled])
def test_in_place_write_between_steps_is_refused(model_cls):
    torch.manual_seed(3)
    model = model_cls()
    xs, h0 = torch.randn(T, B, I), torch.randn(B, H)
    with torch.no_grad():
        eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
        xs_c, xs_e, xs_r = xs.clone(), xs.clone(), xs.double()
        out = compile_(model)(xs_c, h0.clone())
        e, r = eager(xs_e, h0.clone()), ref(xs_r, h0.double())
    assert_close_to(out, e, r)
    torch.testing.assert_close(xs_c, xs_e, rtol=0, atol=0)  # the writes themselves happened
    for (name, p), (_, q) in zip(model.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    assert fusion_backend.counters[SEQ] == 0
    with torch.no_grad():
        refused(copy.deepcopy(eager), xs, h0, reason="writes in place")


# ----------------------------------------------------------------------------- xs after forward

def test_xs_changed_in_place_before_backward_keeps_weight_grads():
    """Eager's cats copy x_t; the fused form must not save the user's xs for dW either."""
    torch.manual_seed(4)
    model = models.UnrolledRNN(I, H, O)
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    xs, h0 = torch.randn(T, B, I), torch.randn(B, H)
    runs = []
    for m, fn, dtype in ((model, compile_(model), torch.float32), (eager, eager, torch.float32),
                         (ref, ref, torch.float64)):
        x = xs.clone().to(dtype)
        out, h = fn(x, h0.to(dtype))
        x.zero_()  # the input buffer reused before backward
        (out.square().sum() + h.sum()).backward()
        runs.append((out.detach(), h.detach()))
    assert fusion_backend.counters[SEQ] == 1  # still fused, from a copy of xs
    for got, want, r in zip(*runs):
        assert_close_to(got, want, r)
    assert_grads_match((model, eager, ref))


# ----------------------------------------------------------------------------- xs.unbind(0)

class Unbound(Base):
    def forward(self, xs, h):
        for x in xs.unbind(0):
            h = self.step(x, h)
        return h


def test_steps_over_unbind_are_fused_and_match():
    torch.manual_seed(5)
    model = Unbound()
    xs, h0 = torch.randn(T, B, I), torch.randn(B, H)
    out, e, r, models_ = train_step(model, xs, h0)
    assert fusion_backend.counters[SEQ] == 1, dict(fusion_backend.counters)
    assert_close_to(out, e, r)
    assert_grads_match(models_)


class CachedWeightNorm(Base):
    """W from a weight_norm parametrization, computed once per forward under
    `parametrize.cached()`: the first step's Linear computes it, after the first cat."""

    def __init__(self):
        super().__init__()
        self.i2h = nn.utils.parametrizations.weight_norm(nn.Linear(I + H, H))
        # eval: in training the gemm bias's exact gradient is zero (BatchNorm cancels it), and
        # eager's and ours are rounding noise that grad_close cannot compare
        self.block = randomize_batch_norm(models.MLPBlock(H, O)).eval()

    def forward(self, xs, h):
        with nn.utils.parametrize.cached():
            for t in range(xs.shape[0]):
                h = self.step(xs[t], h)
        return self.block(h)


def test_weight_computed_inside_the_first_step_moves_with_the_inputs():
    """The hoisted projection reads W before the first cat: the nodes computing W move there
    with the steps' inputs (the graph was left failing lint, and the whole graph, the MLP
    block's site too, fell back to Inductor with a warning)."""
    import warnings

    torch.manual_seed(6)
    model = CachedWeightNorm()
    xs, h0 = torch.randn(T, B, I), torch.randn(B, H)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback warns
        out, e, r, models_ = train_step(model, xs, h0)
    assert fusion_backend.counters[SEQ] == 1 and fusion_backend.counters["linear_bn_gelu_relu"] == 1, \
        dict(fusion_backend.counters)
    assert_close_to(out, e, r)
    assert_grads_match(models_)


class StackUnderNoGrad(Base):
    """The h2o outputs stacked under no_grad (kept for metrics), the last h trained."""

    def forward(self, xs, h):
        outs = []
        for t in range(xs.shape[0]):
            h = self.step(xs[t], h)
            outs.append(self.h2o(h))
        with torch.no_grad():
            preds = torch.stack(outs)
        return preds, h


def test_stack_in_another_grad_mode_is_not_replaced_by_the_hoisted_gemm():
    """The hoisted h2o GEMM stands in for a stack of its rows only in its own grad mode: a stack
    under no_grad became the GEMM's result, with a gradient (i2h's off by 1.1, h2o's set where
    eager's is None)."""
    torch.manual_seed(7)
    model = StackUnderNoGrad()
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    xs, h0 = torch.randn(T, B, I), torch.randn(B, H)
    results = []
    for m, fn, dtype in ((model, compile_(model), torch.float32), (eager, eager, torch.float32),
                         (ref, ref, torch.float64)):
        preds, h = fn(xs.to(dtype), h0.to(dtype))
        (h.square().sum() + preds.square().sum()).backward()  # preds: a constant, as in eager
        results.append((preds, h))
    assert fusion_backend.counters[SEQ] == 1, dict(fusion_backend.counters)
    (preds, h), (e_preds, e_h), (r_preds, r_h) = results
    assert not preds.requires_grad and not e_preds.requires_grad
    assert_close_to(preds, e_preds, r_preds)
    assert_close_to(h, e_h, r_h)
    assert_grads_match((model, eager, ref))


# ------------------------------------------------- stacked outputs, autocast operands, random ops

class StackAndLast(Base):
    """Returns the stack of the h2o outputs and the last step's output too."""

    def forward(self, xs, h):
        outs = []
        for t in range(xs.shape[0]):
            h = self.step(xs[t], h)
            outs.append(self.h2o(h))
        return torch.stack(outs), outs[-1]


def test_stack_of_outputs_returned_with_a_step_output_is_its_own_tensor():
    """The hoisted h2o's result replaces the stack only when the stack is the per-step outputs'
    one user: returned as well, a step's output would share memory with the "stack" (eager's
    stack is a copy), so an in-place write to it would change the stack."""
    torch.manual_seed(6)
    model = StackAndLast()
    xs, h0 = torch.randn(T, B, I), torch.randn(B, H)
    with torch.no_grad():
        (ys, last), (ys_e, last_e) = compile_(copy.deepcopy(model))(xs, h0), model(xs, h0)
        assert fusion_backend.counters[SEQ] == 1
        ys64 = model.double()(xs.double(), h0.double())[0]
        assert_close_to(ys, ys_e, ys64)
        last.zero_()
        last_e.zero_()
    assert ys.untyped_storage().data_ptr() != last.untyped_storage().data_ptr()
    assert_close_to(ys, ys_e, ys64)  # the stack kept the last row


class AutocastSequence(Base):
    def forward(self, xs, h):
        with torch.autocast("cpu", dtype=torch.float16):
            for t in range(xs.shape[0]):
                h = self.step(xs[t], h)
            return h


def test_fp16_operands_with_fp32_weights_under_autocast_are_refused():
    """Under autocast, fp16 x_t and h0 give an fp16 Linear while W stays fp32: the recurrence op
    takes one dtype, so the sequence is left unfused (it raised before), and matches eager."""
    torch.manual_seed(7)
    model = AutocastSequence()
    xs, h0 = torch.randn(T, B, I).half(), torch.randn(B, H).half()
    with torch.no_grad():
        got, want = compile_(copy.deepcopy(model))(xs, h0), model(xs, h0)
    assert got.dtype == want.dtype == torch.float16
    assert rel_err(got, want) <= HALF
    assert fusion_backend.counters[SEQ] == 0
    refused(model, xs, h0, reason="autocast changes the cell's dtype")


class DropoutSequence(Base):
    """Dropout on each step's input and on each step's output, in training."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, xs, h):
        outs = []
        for t in range(xs.shape[0]):
            h = self.step(self.drop(xs[t]), h)
            outs.append(self.drop(self.h2o(h)))
        return torch.stack(outs)


def assert_same_draws(model, xs, h0, seed=9):
    """The compiled copy of `model` and `model` itself, each from the same seed with Inductor's
    eager-order random numbers (`fallback_random`), agree: every op got the masks eager draws
    for it. (No fp64 reference draws them; a mask drawn for another op is off by O(1).)"""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fallback_random=True), torch.no_grad():
        compiled = compile_(copy.deepcopy(model))
        torch.manual_seed(seed)
        got = compiled(xs, h0)
        torch.manual_seed(seed)
        want = model(xs, h0)
    assert rel_err(got, want) <= tolerance(torch.float32, "high"), rel_err(got, want)


def test_random_ops_keep_their_order():
    """Hoisting the steps' inputs would draw every x_t's dropout mask before the outputs'
    masks: with Inductor's eager-order random numbers (`fallback_random`) the model must draw
    the same masks as eager, so the sequence is left unfused; in eval (no draws) it is fused."""
    torch.manual_seed(8)
    model = DropoutSequence()
    xs, h0 = torch.randn(T, B, I), torch.randn(B, H)
    assert_same_draws(model, xs, h0)
    assert fusion_backend.counters[SEQ] == 0
    refused(model, xs, h0, reason="draw random numbers")
    model.eval()
    with torch.no_grad():
        torch._dynamo.reset()
        got, want = compile_(copy.deepcopy(model))(xs, h0), model(xs, h0)
        want64 = copy.deepcopy(model).double()(xs.double(), h0.double())
    assert fusion_backend.counters[SEQ] == 1
    assert_close_to(got, want, want64)


class _DropConnect(nn.Module):
    def forward(self, w):
        return nn.functional.dropout(w, 0.5, self.training)


class DropConnectAndInputDropout(Base):
    """W drawn inside the first step (a DropConnect parametrization, computed once under
    `parametrize.cached()`), each x_t's dropout drawn in its own step after it."""

    def __init__(self):
        super().__init__()
        nn.utils.parametrize.register_parametrization(self.i2h, "weight", _DropConnect())
        self.drop = nn.Dropout(0.5)

    def forward(self, xs, h):
        with nn.utils.parametrize.cached():
            for t in range(xs.shape[0]):
                h = self.step(self.drop(xs[t]), h)
        return h


def test_moved_random_draws_keep_their_order_among_themselves():
    """W's computation and the inputs' move before the first step together, in graph order:
    moved input by input, x_1..x_T's dropout masks were drawn before W's DropConnect mask,
    which eager draws in step 0 (with Inductor's eager-order random numbers the fused model's
    output was off by 1.9)."""
    torch.manual_seed(10)
    model = DropConnectAndInputDropout()
    xs, h0 = torch.randn(T, B, I), torch.randn(B, H)
    assert_same_draws(model, xs, h0)
    assert fusion_backend.counters[SEQ] == 1, dict(fusion_backend.counters)


class ReturnsHiddenAndItsDetach(Base):
    """`return h, h.detach()` (and the last step's h2o output with its detach): the rewrite
    made h a view of the recurrence's buffer, and AOTAutograd (torch 2.13) failed at the first
    call on such a view returned with its detach ("select(): index out of range"), where
    Inductor alone runs the model."""

    def __init__(self, readout):
        super().__init__()
        self.readout = readout

    def forward(self, xs, h):
        outs = []
        for t in range(T):
            h = self.step(xs[t], h)
            outs.append(self.h2o(h))
        if self.readout:
            return outs[1], outs[1].detach(), torch.stack(outs)
        return h, h.detach()


@pytest.mark.parametrize("readout", [False, True], ids=["hidden", "h2o-row"])
def test_a_returned_row_and_its_detach(readout):
    torch.manual_seed(61)
    model = ReturnsHiddenAndItsDetach(readout)
    eager, model64 = copy.deepcopy(model), copy.deepcopy(model).double()
    xs, h0 = torch.randn(T, B, I), torch.randn(B, H)
    out, want = compile_(model)(xs, h0), eager(xs, h0)
    with torch.no_grad():
        want64 = model64(xs.double(), h0.double())
    assert fusion_backend.counters[SEQ] == 1
    for got, ref, ref64 in zip(out, want, want64):
        assert_close_to(got.detach(), ref.detach(), ref64)
    out[0].sum().backward()
    want[0].sum().backward()
    torch.testing.assert_close(model.i2h.weight.grad, eager.i2h.weight.grad, **grad_close(eager.i2h.weight.grad))


# ----------------------------------------------------------------------------- writes to the rows

class HiddenScaledAfter(Base):
    def forward(self, xs, h):
        for t in range(T):
            h = self.step(xs[t], h)
        h.mul_(2)
        return h


class DetachThenWrite(Base):
    """The detach aliases h in eager: it sees the write made after it."""

    def forward(self, xs, h):
        for t in range(T):
            h = self.step(xs[t], h)
        d = h.detach()
        h.add_(1)
        return d


class LastOutputScaled(Base):
    def forward(self, xs, h):
        outs = []
        for t in range(T):
            h = self.step(xs[t], h)
            outs.append(self.h2o(h))
        o = outs[-1]
        o.mul_(2)
        return o, torch.stack(outs)


class OutputScaledInLoop(Base):
    def forward(self, xs, h):
        outs = []
        for t in range(T):
            h = self.step(xs[t], h)
            o = self.h2o(h)
            o.mul_(2)
            outs.append(o)
        return outs[1], torch.stack(outs)


class ViewReturnedBeside(Base):
    """`return h, h.view(-1)`: eager's view aliases h (the caller's write to one shows in the
    other)."""

    def forward(self, xs, h):
        for t in range(T):
            h = self.step(xs[t], h)
        return h, h.view(-1)


class OutputScaledInLoopStacked(Base):
    """An h2o output written in the loop and only stacked: the stack copies after the writes."""

    def forward(self, xs, h):
        outs = []
        for t in range(T):
            h = self.step(xs[t], h)
            o = self.h2o(h)
            o.clamp_(-0.5, 0.5)
            outs.append(o)
        return torch.stack(outs), h


@pytest.mark.parametrize("model_cls", [HiddenScaledAfter, DetachThenWrite, LastOutputScaled, OutputScaledInLoop,
                                       ViewReturnedBeside, OutputScaledInLoopStacked])
def test_in_place_write_to_a_step_output_matches_eager(model_cls):
    """Eager's h_t and h2o outputs are tensors of their own; the fused form's are rows of one
    buffer. A returned row was copied for the output alone, before a write to it (`h.mul_(2);
    return h` came back 2x off) and apart from a view returned beside it (the caller's write to
    one no longer showed in the other). A returned row is now a copy that all its users read."""
    torch.manual_seed(5)
    model = model_cls()
    xs, h0 = torch.randn(T, B, I), torch.randn(B, H)
    with torch.no_grad():
        out = compile_(copy.deepcopy(model))(xs, h0)
        want, ref = model(xs, h0), copy.deepcopy(model).double()(xs.double(), h0.double())
    assert fusion_backend.counters[SEQ] == 1
    for got, e, r in zip(out, want, ref):
        assert_close_to(got, e, r)
    if model_cls is ViewReturnedBeside:  # the caller writes through the view
        out[1].add_(1)
        want[1].add_(1)
        assert_close_to(out[0], want[0], ref[0] + 1)


def test_view_of_the_last_hidden_written_after_a_graph_break():
    """The write happens in the next graph, through a view the first graph returned beside h
    (a compiled function; 3 steps, batch 2, widths 3 and 4: with batch 3 the second graph
    fails in torch itself, with Inductor alone too: AOTAutograd's synthetic base for the two
    aliased inputs)."""
    steps, batch, width, hidden = 3, 2, 3, 4

    def make(i2h):
        def run(xs, h):
            for t in range(steps):
                h = torch.tanh(i2h(torch.cat((xs[t], h), 1)))
            v = h.view(-1)
            torch._dynamo.graph_break()
            v.add_(1)
            return h
        return run

    torch.manual_seed(6)
    i2h = nn.Linear(width + hidden, hidden)
    run, run64 = make(i2h), make(copy.deepcopy(i2h).double())
    xs, h0 = torch.randn(steps, batch, width), torch.randn(batch, hidden)
    with torch.no_grad():
        got, want, ref = compile_(run)(xs, h0), run(xs, h0), run64(xs.double(), h0.double())
    assert fusion_backend.counters[SEQ] == 1
    assert_close_to(got, want, ref)


# ----------------------------------------------------------------------------- fp16 projections

class FirstStepOut(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.i2h = nn.Linear(2 * width, width)

    def forward(self, xs, h):
        first = None
        for t in range(xs.shape[0]):
            h = torch.tanh(self.i2h(torch.cat((xs[t], h), 1)))
            first = h if first is None else first
        return first, h


@pytest.mark.parametrize("path", ["kernel", "torch fallback"])
@pytest.mark.parametrize("big", ["x W_x^T", "h W_h^T"])
def test_fp16_projection_does_not_overflow_before_the_sum(big, path, monkeypatch):
    """One of x_t W_x^T and h0 W_h^T is 8e4, past fp16's 65504, while their sum, -2e4, is
    not: eager sums both in one fp32 accumulator (tanh -> -1). The hoisted projection rounded
    to fp16 first became +inf (tanh -> +1), and so did h0 W_h^T in the torch fallback (a
    batch past the kernel's limit, a failed launch)."""
    import fusion_backend.patterns.rnn_sequence as seq

    if path == "torch fallback":
        monkeypatch.setattr(seq, "_planned", lambda *args: None)
    width = 8
    model = FirstStepOut(width).half()
    with torch.no_grad():
        model.i2h.weight[:, :width] = 1.0 if big == "x W_x^T" else -1.25
        model.i2h.weight[:, width:] = 1.25 if big == "x W_x^T" else 1.0
        model.i2h.bias.zero_()
    xs = torch.full((3, 2, width), 1e4).half()
    h0 = torch.full((2, width), -1e4 if big == "x W_x^T" else 1e4).half()
    with torch.no_grad():
        got, want = compile_(copy.deepcopy(model))(xs, h0), model(xs, h0)
    assert fusion_backend.counters[SEQ] == 1
    assert (want[0] == -1).all()
    for g, w in zip(got, want):
        assert g.dtype == torch.float16
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_half_sequence_matches_eager_with_grads():
    """fp16 (the interpreter profile fuses no bf16 sequence): outputs, dtypes and gradients
    with the projection P in fp32 (its gradient flows back through the casts)."""
    dtype = torch.float16
    torch.manual_seed(9)
    model = models.UnrolledRNN(I, H, O).to(dtype)
    eager = copy.deepcopy(model)
    xs, h0 = torch.randn(T, B, I, dtype=dtype), torch.randn(B, H, dtype=dtype)
    got, want = compile_(model)(xs, h0), eager(xs, h0)
    assert fusion_backend.counters[SEQ] == 1
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == dtype
        assert rel_err(g, w) <= HALF
    sum(o.float().sum() for o in got).backward()
    sum(o.float().sum() for o in want).backward()
    for (name, p), (_, q) in zip(model.named_parameters(), eager.named_parameters()):
        assert p.grad.dtype == q.grad.dtype == dtype, name
        assert rel_err(p.grad, q.grad) <= HALF, name
