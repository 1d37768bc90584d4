"""Behaviours a mutation audit (twenty-first session: 56 one-line mutants of the code changed
since the eighteenth) found no test for: each test here fails on the mutant it is named after
in the audit's notes (benchmarks/NOTES.md) and passes on the code. Their reasons are the
users' ones: a direct op call taking an integer bias, an empty batch against a wider one or an
unknown precision; a write after the site refusing (or not) fusion where a backward runs; the
trial's failure rule; the tuner's budget and cache rules; per-step views of one stored weight;
an in-place ReLU under inference_mode."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusion_backend
from fusion_backend import trial
from fusion_backend.patterns import cat_linear_tanh as clt, cell_h2o as ch, rnn_sequence as rs
from tolerances import assert_matches, grad_close

needs_interpreter = pytest.mark.skipif(not fusion_backend.devices.interpreter_enabled(),
                                       reason="compiles CPU models: needs TRITON_INTERPRET=1")

# ---------------------------------------------------------------- the ops' input checks

@pytest.mark.parametrize("call, expect", [
    (lambda: ch.cell_h2o(torch.randn(5, 8), torch.randn(6, 8), torch.arange(6), "ieee", False, 1.0),
     "bias has dtype torch.int64, expected a floating-point dtype"),
    (lambda: clt.cat_linear_tanh([torch.randn(0, 3), torch.randn(2, 5)], torch.randn(6, 8), None, "ieee", False, 1.0),
     r"xs\[1\] has 2 rows, expected 0"),
    (lambda: clt.cat_linear_tanh([torch.randn(5, 3), torch.randn(5, 5)], torch.randn(6, 8), None, "fp8", False, 1.0),
     "precision='fp8' is not one of"),
    (lambda: rs.rnn_recurrence(torch.randn(4, 3, 5), torch.randn(3, 1), torch.randn(5, 5), "ieee"),
     "h0 has 1 columns, expected 5"),
    (lambda: rs.rnn_recurrence(torch.randn(4, 3, 5), torch.randn(3, 5), torch.randn(5, 5), "fp8"),
     "precision='fp8' is not one of"),
], ids=["int_bias", "empty_batch_rows", "cell_precision", "h0_columns", "recurrence_precision"])
def test_more_direct_calls_are_refused(call, expect):
    with pytest.raises(RuntimeError, match=expect):
        call()

# ---------------------------------------------------------------- writes after a site (saved_input_written)

@needs_interpreter
def test_bias_free_block_whose_bn_bias_is_written_after_it_is_not_fused_with_a_backward():
    from test_linear_bn_gelu_relu import M, K, WritesBnBiasData, randomize
    torch.manual_seed(19)
    model = randomize(WritesBnBiasData("no_bias")).train()
    assert model.lin.bias is None
    report = fusion_backend.explain(copy.deepcopy(model), torch.randn(M, K).requires_grad_())
    assert report.fused == [] and "is mutated in the graph" in report.skipped[0].reason, report


@needs_interpreter
def test_h2o_whose_weight_is_written_after_it_is_fused_only_without_a_backward(monkeypatch):
    import dataclasses
    from fusion_backend import devices
    profile = dataclasses.replace(devices.INTERPRETER, fp32_highest="tf32x3", dot_precisions=("ieee", "tf32x3"))
    real = devices.device_profile
    monkeypatch.setattr(devices, "device_profile",
                        lambda device=None: profile if torch.device(device or "cpu").type == "cpu" else real(device))

    class DecaysH2O(nn.Module):
        def __init__(self, I=37, H=23, O=29):
            super().__init__()
            self.i2h, self.h2o = nn.Linear(I + H, H), nn.Linear(H, O)

        def forward(self, x, h):
            hidden = torch.tanh(self.i2h(torch.cat((x, h), 1)))
            out = self.h2o(hidden)
            self.h2o.weight.data.mul_(0.5)
            return out, hidden

    torch.manual_seed(0)
    x, h = torch.randn(8, 37), torch.randn(8, 23)
    with torch.no_grad():
        report = fusion_backend.explain(DecaysH2O(), x, h)
    assert [s.pattern for s in report.fused] == ["cat_linear_tanh", "cell_h2o"], report
    torch._dynamo.reset()
    report = fusion_backend.explain(DecaysH2O(), x, h)
    (site,) = [s for s in report.skipped if s.pattern == "cell_h2o"]
    assert "is mutated in the graph" in site.reason, report

# ---------------------------------------------------------------- the run-time trial's failure rule

def _fake():
    from test_trial import FakeClock, _graphs
    fused, unfused, _ = _graphs()
    return fused, unfused, FakeClock(block=2)


def test_failures_not_in_a_row_do_not_end_the_trial():
    fused, unfused, clock = _fake()
    schedule = iter([True, True, False, True] + [False] * 100)  # the fused graph: raise, raise, ok, raise, ok...

    def flaky(*args):
        if next(schedule):
            raise IndexError("the caller's bad index")
        return fused()

    decisions = []
    run = trial.as_compiled_fn(trial.GraphTrial(flaky, unfused, lambda *d: decisions.append(d), calls=4,
                                                clock=clock, block=2))
    for _ in range(40):
        try:
            run()
        except IndexError:
            pass
    assert decisions == [(1.0, 2.0, True)]  # timed both, fused kept (3 failures in a row would lose)


def test_interrupts_are_not_the_graphs_failures():
    fused, unfused, clock = _fake()
    interrupts = [3]

    def interrupted(*args):
        if interrupts[0]:
            interrupts[0] -= 1
            raise KeyboardInterrupt
        return fused()

    decisions = []
    run = trial.as_compiled_fn(trial.GraphTrial(interrupted, unfused, lambda *d: decisions.append(d), calls=4,
                                                clock=clock, block=2))
    for _ in range(3):
        with pytest.raises(KeyboardInterrupt):
            run()
    for _ in range(2 + 8 + 1):
        run()
    assert decisions == [(1.0, 2.0, True)]

# ---------------------------------------------------------------- per-step views of one stored weight

class PerStepW(nn.Module):
    def __init__(self, how, I=5, H=7):
        super().__init__()
        self.how, self.H, self.shape = how, H, (H, I + H)
        self.w_packed = nn.Parameter(0.3 * torch.randn(2 * H, I + H))
        self.w_flat = nn.Parameter(0.3 * torch.randn(H * (I + H)))
        self.b = nn.Parameter(torch.randn(H))

    def forward(self, xs, h):
        for t in range(xs.shape[0]):
            if self.how == "no_bias":
                w, b = self.w_packed[:self.H], None
            elif self.how == "reshape":
                w, b = self.w_flat.reshape(self.shape), self.b
            else:  # "bias_computed"
                w, b = self.w_packed[:self.H], self.b * 2
            h = torch.tanh(F.linear(torch.cat((xs[t], h), 1), w, b))
        return h


@needs_interpreter
@pytest.mark.parametrize("how", ["no_bias", "reshape"], ids=["no_bias", "reshape_view"])
def test_per_step_views_of_a_stored_weight_are_one_sequence(how):
    torch.manual_seed(3)
    model = PerStepW(how)
    eager = copy.deepcopy(model)
    xs, h = torch.randn(4, 3, 5), torch.randn(3, 7)
    with torch.no_grad():
        got, want = torch.compile(model, backend="fusedtriton")(xs, h), eager(xs, h)
        ref = copy.deepcopy(eager).double()(xs.double(), h.double())
    assert_matches(got, want, ref, "last hidden state")
    assert fusion_backend.counters["rnn_sequence"] == 1


@needs_interpreter
def test_a_bias_computed_each_step_gets_the_caching_advice():
    torch.manual_seed(3)
    with torch.no_grad():
        report = fusion_backend.explain(PerStepW("bias_computed"), torch.randn(4, 3, 5), torch.randn(3, 7))
    (site,) = [s for s in report.skipped if s.pattern == "rnn_sequence"]
    assert "parametrize.cached()" in site.reason, report

# ---------------------------------------------------------------- in-place ReLU under inference_mode

@needs_interpreter
def test_inplace_relu_under_inference_mode_keeps_the_history():
    from fusion_backend.models import MLPBlock

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.lin2 = MLPBlock(6, 8).eval(), nn.Linear(6, 8)

        def forward(self, x):
            g = self.lin2(x) * 1.0
            with torch.inference_mode():
                g.relu_()
            return self.block(x), g * 2

    torch.manual_seed(0)
    model = M()
    eager = copy.deepcopy(model)
    x = torch.randn(5, 6)
    got, want = torch.compile(model, backend="fusedtriton")(x), eager(x)
    assert fusion_backend.counters["linear_bn_gelu_relu"] == 1
    assert got[1].requires_grad == want[1].requires_grad is True
    sum(o.sum() for o in got).backward()
    sum(o.sum() for o in want).backward()
    torch.testing.assert_close(model.lin2.weight.grad, eager.lin2.weight.grad, **grad_close(eager.lin2.weight.grad))
