"""Pattern structures the rewrite leaves alone, and what explain() says about them: inside a
higher-order op's body (torch.utils.checkpoint), under a torch.func transform, and an unrolled
RNN whose steps each compute W again (an uncached parametrization). Each runs as eager does, and
the report names the reason (it said "no pattern's structure in this graph", or gave an
internal error, or nothing).
Tiny shapes: the kernels run under Triton's interpreter (conftest).
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrizations, parametrize
from torch.utils.checkpoint import checkpoint

import fusion_backend
from fusion_backend import backend, devices
from fusion_backend.models import MLPBlock, RNNCell, UnrolledRNN
from conftest import randomize_batch_norm
from tolerances import assert_matches

pytestmark = pytest.mark.skipif(not devices.interpreter_enabled(),
                                reason="needs TRITON_INTERPRET=1 (conftest sets it when there is no GPU)")


class Checkpointed(nn.Module):
    def __init__(self, inner, reentrant):
        super().__init__()
        self.inner, self.reentrant = inner, reentrant

    def forward(self, *args):
        return checkpoint(self.inner, *args, use_reentrant=self.reentrant)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("inner", ["mlp", "cell"])
def test_pattern_inside_checkpoint_is_a_named_near_miss(inner, reentrant):
    torch.manual_seed(0)
    model = Checkpointed(MLPBlock(16, 12) if inner == "mlp" else RNNCell(16, 16, 8), reentrant)
    x = torch.randn(8, 16, requires_grad=True)
    args = (x,) if inner == "mlp" else (x, torch.randn(8, 16))
    report = fusion_backend.explain(model, *args)
    pattern = "linear_bn_gelu_relu" if inner == "mlp" else "cat_linear_tanh"
    sites = [s for s in report.skipped if s.pattern == pattern]
    assert sites and "inside the body of tag_activation_checkpoint" in sites[0].reason, str(report)
    assert sites[0].node.startswith("wrap_body"), str(report)
    assert "no pattern's structure" not in str(report)
    assert not report.fused


def test_body_sites_are_reported_beside_fused_ones():
    """A graph with a fused site and another inside a checkpoint lists both."""
    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = MLPBlock(16, 16), MLPBlock(16, 12)

        def forward(self, x):
            return checkpoint(self.b, self.a(x), use_reentrant=False)

    torch.manual_seed(0)
    model = Both().eval()
    x = torch.randn(8, 16)
    with torch.no_grad():
        report = fusion_backend.explain(model, x)
        ref = model.double()(x.double())
        model.float()
        eager = model(x)
        torch._dynamo.reset()
        out = torch.compile(model, backend="fusedtriton")(x)
    assert len(report.fused) == 1 and len(report.skipped) == 1, str(report)
    assert report.skipped[0].reason == backend.BODY_REASON.format(op="tag_activation_checkpoint"), str(report)
    assert_matches(out, eager, ref)


def test_under_torch_func_transforms_the_reason_is_the_transform():
    torch.manual_seed(0)
    mlp = MLPBlock(16, 12).eval()
    x = torch.randn(8, 16)
    params = {k: v.detach() for k, v in mlp.named_parameters()}

    def per_param_grad(p, x):
        return torch.func.grad(lambda p: torch.func.functional_call(mlp, p, (x,)).pow(2).sum())(p)

    cell = RNNCell(16, 16, 8)

    def batched_cells(xs, hs):
        return torch.func.vmap(cell)(xs, hs)

    for fn, args, pattern in ((per_param_grad, (params, x), "linear_bn_gelu_relu"),
                              (batched_cells, (torch.randn(3, 8, 16), torch.randn(3, 8, 16)), "cat_linear_tanh")):
        torch._dynamo.reset()
        report = fusion_backend.explain(fn, *args)
        sites = [s for s in report.skipped if s.pattern == pattern]
        assert sites and "inside a torch.func transform" in sites[0].reason, str(report)
        assert not report.fused
        torch._dynamo.reset()
        got, want = torch.compile(fn, backend="fusedtriton")(*args), fn(*args)
        torch.testing.assert_close(got, want)


def test_sequence_with_w_computed_per_step_says_how_to_fuse_it():
    """weight_norm on i2h without parametrize.cached(): each step computes W again, so the
    steps are not one sequence (each cell is fused alone); the near-miss says so, and with the
    cache the sequence is fused."""
    torch.manual_seed(0)
    model = UnrolledRNN(16, 16, 8)
    parametrizations.weight_norm(model.i2h)
    xs, h = torch.randn(4, 8, 16), torch.randn(8, 16)
    with torch.no_grad():
        report = fusion_backend.explain(model, xs, h)
        sequence = [s for s in report.skipped if s.pattern == "rnn_sequence"]
        assert sequence and "parametrize.cached()" in sequence[0].reason, str(report)
        assert [s for s in report.fused if s.pattern == "cat_linear_tanh"], str(report)
        torch._dynamo.reset()
        with parametrize.cached():
            report = fusion_backend.explain(model, xs, h)
    assert [s.pattern for s in report.fused] == ["rnn_sequence"], str(report)


def test_steps_with_two_weights_are_two_sequences():
    """Steps 0-2 read W1 and steps 3-5 W2 (h carried across): two sequences, as before the
    near-miss above was matched."""
    class TwoWeights(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = nn.Linear(5 + 7, 7), nn.Linear(5 + 7, 7)

        def forward(self, xs, h):
            for t in range(6):
                cell = self.first if t < 3 else self.second
                h = torch.tanh(cell(torch.cat((xs[t], h), 1)))
            return h

    torch.manual_seed(0)
    model = TwoWeights()
    xs, h = torch.randn(6, 3, 5), torch.randn(3, 7)
    with torch.no_grad():
        report = fusion_backend.explain(model, xs, h)
        ref = model.double()(xs.double(), h.double())
        model.float()
        eager = model(xs, h)
        torch._dynamo.reset()
        out = torch.compile(model, backend="fusedtriton")(xs, h)
    assert [s.pattern for s in report.fused] == ["rnn_sequence", "rnn_sequence"], str(report)
    assert not [s for s in report.skipped if s.pattern == "rnn_sequence"], str(report)
    assert_matches(out, eager, ref)


def test_two_different_cells_are_no_sequence():
    """A second cell (another Linear) reading the first's h: both fused, and no rnn_sequence
    near-miss telling the user to cache a parametrization there is none of."""
    class TwoCells(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(5 + 7, 7), nn.Linear(5 + 7, 7)

        def forward(self, x, h):
            h = torch.tanh(self.a(torch.cat((x, h), 1)))
            return torch.tanh(self.b(torch.cat((x, h), 1)))

    torch.manual_seed(0)
    with torch.no_grad():
        report = fusion_backend.explain(TwoCells(), torch.randn(3, 5), torch.randn(3, 7))
    assert [s.pattern for s in report.fused] == ["cat_linear_tanh"] * 2 and not report.skipped, str(report)


def _write_own_tensor(x):
    t = x * 2
    t.relu_()  # in place, but on the branch's own tensor: x is not written
    return t.sum(0)


def test_cond_writing_only_its_own_tensor_does_not_block_fusion():
    """A torch.cond branch that writes in place only to a tensor it made: the site reading the
    cond's operand is fused (every operand counted as written, the site was refused)."""
    torch.manual_seed(0)
    mlp = randomize_batch_norm(MLPBlock(12, 10).eval())

    def f(x):
        return mlp(x) + torch.cond(x.sum() > 0, _write_own_tensor, lambda x: x.sum(0), (x,))[:10]

    x = torch.randn(6, 12)
    with torch.no_grad():
        report = fusion_backend.explain(f, x)
        assert [s.pattern for s in report.fused] == ["linear_bn_gelu_relu"], str(report)
        torch._dynamo.reset()
        out = torch.compile(f, backend="fusedtriton")(x)
        eager = f(x)
        mlp.double()
        ref = f(x.double())
        mlp.float()
    assert_matches(out, eager, ref)


def test_random_w_per_step_gets_no_caching_advice():
    """DropConnect (a dropout on W in each step): W differs per step for real, so the sequence
    near-miss must not advise parametrize.cached(); each cell is fused alone."""
    class DropConnect(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = nn.Linear(6 + 8, 8)

        def forward(self, xs, h):
            for t in range(3):
                w = F.dropout(self.cell.weight, 0.3, training=True)
                h = torch.tanh(F.linear(torch.cat((xs[t], h), 1), w, self.cell.bias))
            return h

    torch.manual_seed(0)
    with torch.no_grad():
        report = fusion_backend.explain(DropConnect(), torch.randn(3, 4, 6), torch.randn(4, 8))
    assert not [s for s in report.fused + report.skipped if s.pattern == "rnn_sequence"], str(report)
    assert [s.pattern for s in report.fused] == ["cat_linear_tanh"] * 3, str(report)


class ViewedWeights(nn.Module):
    """An unrolled RNN whose steps each take W as a view of a stored tensor: a slice of a packed
    weight, or a weight stored (in, out) and transposed."""

    def __init__(self, how, I=5, H=7, O=3):
        super().__init__()
        self.how, self.H = how, H
        if how == "slice":
            self.w_packed = nn.Parameter(0.3 * torch.randn(2 * H, I + H))
        else:
            self.w_io = nn.Parameter(0.3 * torch.randn(I + H, H))
        self.b = nn.Parameter(torch.randn(H))
        self.h2o = nn.Linear(H, O)

    def forward(self, xs, h):
        outs = []
        for t in range(xs.shape[0]):
            w = self.w_packed[:self.H] if self.how == "slice" else self.w_io.t()
            h = torch.tanh(F.linear(torch.cat((xs[t], h), 1), w, self.b))
            outs.append(self.h2o(h))
        return torch.stack(outs), h


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("how", ["slice", "transpose"])
def test_sequence_whose_steps_view_one_stored_weight_is_fused(how, grad):
    """Each step's W is a view of one stored tensor (the same values): one sequence. It was
    refused with advice to use parametrize.cached(), which cannot help there."""
    torch.manual_seed(3)
    model = ViewedWeights(how)
    eager = copy.deepcopy(model)
    ref = copy.deepcopy(model).double()
    xs, h = torch.randn(4, 6, 5), torch.randn(6, 7)
    fusion_backend.counters.clear()
    compiled = torch.compile(model, backend="fusedtriton")
    with torch.set_grad_enabled(grad):
        got, want, exact = compiled(xs, h), eager(xs, h), ref(xs.double(), h.double())
    for g, w, r in zip(got, want, exact):
        assert_matches(g, w, r)
    assert fusion_backend.counters["rnn_sequence"] == 1
    if grad:
        sum(t.sum() for t in got).backward()
        sum(t.sum() for t in want).backward()
        sum(t.sum() for t in exact).backward()
        for p, e, r in zip(model.parameters(), eager.parameters(), ref.parameters()):
            assert_matches(p.grad, e.grad, r.grad, "grad")


@pytest.mark.parametrize("how", ["view_written", "index", "reshape", "index_changed"])
def test_a_weight_written_between_steps_or_copied_per_step_is_not_one_sequence(how):
    """Steps reading the stored weight as it is at each step: a view of it written between
    steps (an in-place decay inside the loop), or W taken per step by indexing with a tensor or
    `reshape` of a strided tensor (copies) with the stored tensor, or the index, written
    between steps. Eager's later steps read other values than the first's: the steps are not
    one sequence, and results (and the written state) match eager. (Copies were taken for
    views once: the sequence used the first copy for every step, outputs 0.47-0.64 off.)"""
    class Written(nn.Module):
        def __init__(self, I=5, H=7):
            super().__init__()
            self.w = nn.Parameter(0.3 * torch.randn(H, I + H))
            self.w_io = nn.Parameter(0.3 * torch.randn(I + H, H))
            self.register_buffer("perm", torch.arange(H).flip(0))
            self.b = nn.Parameter(torch.randn(H))
            self.H, self.shape = H, (H, I + H)

        def forward(self, xs, h):
            for t in range(xs.shape[0]):
                if how == "view_written":
                    w = self.w[:self.H]
                elif how == "reshape":
                    w = self.w_io.t().reshape(-1).reshape(self.shape)
                else:
                    w = self.w[self.perm]
                h = torch.tanh(F.linear(torch.cat((xs[t], h), 1), w, self.b))
                if how == "index_changed":
                    self.perm.copy_(self.perm.roll(1))
                else:
                    (self.w_io if how == "reshape" else self.w).mul_(0.5)
            return h

    torch.manual_seed(5)
    model = Written()
    eager = copy.deepcopy(model)
    xs, h = torch.randn(4, 3, 5), torch.randn(3, 7)
    fusion_backend.counters.clear()
    with torch.no_grad():
        got = torch.compile(model, backend="fusedtriton")(xs, h)
        want = eager(xs, h)
    torch.testing.assert_close(got, want)
    for mine, theirs in zip(model.state_dict().values(), eager.state_dict().values()):
        torch.testing.assert_close(mine, theirs)
    assert fusion_backend.counters["rnn_sequence"] == 0


def test_blocks_whose_linear_the_sequence_hoists_are_named():
    """Each h_t feeding an MLP block: the sequence hoists the blocks' Linear as its h2o GEMM,
    and their BatchNorm, GELU and ReLU go to Inductor. explain() said nothing about those
    blocks (no site fused or not); the sequence's line names them now. Results match eager."""
    from fusion_backend.models import MLPBlock

    class LoopIntoBlocks(nn.Module):
        def __init__(self, I=6, H=7, O=5):
            super().__init__()
            self.i2h, self.block = nn.Linear(I + H, H), randomize_batch_norm(MLPBlock(H, O))

        def forward(self, xs, h):
            outs = []
            for t in range(xs.shape[0]):
                h = torch.tanh(self.i2h(torch.cat((xs[t], h), 1)))
                outs.append(self.block(h))
            return torch.stack(outs), h

    torch.manual_seed(6)
    model = LoopIntoBlocks().eval()
    xs, h = torch.randn(3, 4, 6), torch.randn(4, 7)
    with torch.no_grad():
        report = fusion_backend.explain(model, xs, h)
        (sequence,) = [s for s in report.fused if s.pattern == "rnn_sequence"]
        assert "the Linear of 3 Linear->BatchNorm blocks" in str(report), str(report)
        torch._dynamo.reset()
        got, want = torch.compile(model, backend="fusedtriton")(xs, h), model(xs, h)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
