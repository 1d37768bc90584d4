"""Fused sites in graphs with dynamic sizes: Dynamo's automatic dynamic shapes (a second size
seen), `dynamic=True`, and sizes known only at run time (the rows `nonzero` picks).

The rewrite runs once per graph, on example values whose sizes may be symbols: what it puts in
the graph must hold for every size the graph accepts (no example size baked in), and it must
not add guards that recompile per size where Inductor alone compiles once.
Tiny shapes: the kernels run under Triton's interpreter (conftest).
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters as dynamo_counters

import fusion_backend
from fusion_backend import devices
from fusion_backend.models import RNNCell, UnrolledRNN
from fusion_backend.patterns import rnn_sequence
from tolerances import assert_matches

pytestmark = pytest.mark.skipif(not devices.interpreter_enabled(),
                                reason="needs TRITON_INTERPRET=1 (conftest sets it when there is no GPU)")

STEPS = 3


def unrolled(xs, h, weight, bias):
    """STEPS cells over the first STEPS rows of xs (which may have more), W passed in."""
    for t in range(STEPS):
        h = torch.tanh(F.linear(torch.cat((xs[t], h), 1), weight, bias))
    return h


def fp64(fn, *args):
    return fn(*(a.double() for a in args))


def unique_graphs() -> int:
    return dynamo_counters["stats"]["unique_graphs"]


@pytest.fixture
def recurrence_lengths(monkeypatch):
    """The length (steps) of every recurrence launch."""
    lengths = []
    launch = rnn_sequence.launch

    def spy(p, *args, **kwargs):
        lengths.append(p.shape[0])
        return launch(p, *args, **kwargs)

    monkeypatch.setattr(rnn_sequence, "launch", spy)
    return lengths


def test_sequence_over_the_first_rows_of_a_dynamic_length_input(recurrence_lengths):
    """The steps read xs[0..2] of an xs whose length becomes dynamic (3, then 40 rows): the
    recurrence runs 3 steps at every length, over a view of those rows (the example's length
    equalled the steps' once, and the whole xs was taken as the steps' stack)."""
    torch.manual_seed(0)
    weight, bias, h0 = torch.randn(9, 5 + 9) * 0.4, torch.randn(9), torch.randn(4, 9)
    compiled = torch.compile(unrolled, backend="fusedtriton")
    with torch.no_grad():
        for length in (5, 3, 40, 7):
            xs = torch.randn(length, 4, 5)
            recurrence_lengths.clear()
            out = compiled(xs, h0, weight, bias)
            assert recurrence_lengths == [STEPS], (length, recurrence_lengths)
            assert_matches(out, unrolled(xs, h0, weight, bias), fp64(unrolled, xs, h0, weight, bias))
    assert fusion_backend.counters["rnn_sequence"] == 2, dict(fusion_backend.counters)  # static 5, then dynamic


def test_sequence_widths_follow_the_graph(recurrence_lengths):
    """dynamic=True with new input and hidden widths per call: one graph for all of them (the
    example's widths used to split W, adding a guard on them: a recompile per input width, and a
    hidden-weight slice of the first call's width for a wider h)."""
    torch.manual_seed(0)
    dynamo_counters.clear()
    compiled = torch.compile(unrolled, backend="fusedtriton", dynamic=True)
    with torch.no_grad():
        for batch, width, hidden in ((4, 8, 16), (5, 12, 16), (6, 8, 20), (7, 4, 24), (3, 6, 16)):
            args = (torch.randn(STEPS, batch, width), torch.randn(batch, hidden),
                    torch.randn(hidden, width + hidden) * 0.3, torch.randn(hidden))
            assert_matches(compiled(*args), unrolled(*args), fp64(unrolled, *args))
    assert unique_graphs() == 1, dict(dynamo_counters["stats"])
    assert fusion_backend.counters["rnn_sequence"] == 1, dict(fusion_backend.counters)
    assert recurrence_lengths == [STEPS] * 5


@pytest.mark.kernel_failure_expected
def test_sequence_fallback_with_a_new_hidden_width(monkeypatch):
    """The torch loop a failed recurrence launch falls back to gets W_h at this call's width
    (it multiplied by the first call's slice: a shape error for a wider h)."""
    def failing(*args, **kwargs):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(rnn_sequence, "launch", failing)
    torch.manual_seed(0)
    compiled = torch.compile(unrolled, backend="fusedtriton", dynamic=True)
    with torch.no_grad():
        for hidden in (16, 20):
            args = (torch.randn(STEPS, 6, 8), torch.randn(6, hidden), torch.randn(hidden, 8 + hidden) * 0.3,
                    torch.randn(hidden))
            assert_matches(compiled(*args), unrolled(*args), fp64(unrolled, *args))
    assert fusion_backend.counters["rnn_sequence"] == 1, dict(fusion_backend.counters)


class Picked(nn.Module):
    """`inner` on the rows a mask picks (batch dim `x_dim` of x, 0 of h): a batch size known
    only at run time."""

    def __init__(self, inner, x_dim=0):
        super().__init__()
        self.inner, self.x_dim = inner, x_dim

    def forward(self, x, h, keep):
        rows = torch.nonzero(keep).squeeze(1)
        return self.inner(x.index_select(self.x_dim, rows), h.index_select(0, rows))


@torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True)  # (monkeypatch would delete the setting)
def test_cell_on_a_batch_known_only_at_run_time():
    """A cell whose batch comes from `nonzero` (an unbacked size: no example value to read)
    is fused; the check crashed reading the size's hint and left it unfused with a TypeError
    for its reason. explain() shows the size's symbol."""
    torch.manual_seed(0)
    model = Picked(RNNCell(8, 16, 4))
    compiled = torch.compile(model, backend="fusedtriton")
    with torch.no_grad():
        for batch in (9, 14):
            x, h, keep = torch.randn(batch, 8), torch.randn(batch, 16), torch.rand(batch) > 0.3
            out, hidden = compiled(x, h, keep)
            eager_out, eager_hidden = model(x, h, keep)
            ref_out, ref_hidden = model.double()(x.double(), h.double(), keep)
            model.float()
            assert_matches(out, eager_out, ref_out)
            assert_matches(hidden, eager_hidden, ref_hidden, "hidden state")
    assert fusion_backend.counters["cat_linear_tanh"] >= 1, dict(fusion_backend.counters)
    torch._dynamo.reset()
    with torch.no_grad():
        report = fusion_backend.explain(model, x, h, keep)
    cells = [s for s in report.fused if s.pattern == "cat_linear_tanh"]
    assert cells and cells[0].info["shape"].startswith("u"), str(report)


@torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True)
def test_sequence_on_a_batch_known_only_at_run_time():
    """Not refused for "batch 8192 > 64" (the stand-in for the unknown batch): fused, and a
    batch over the kernel's limit would run in torch ops at run time."""
    torch.manual_seed(0)
    model = Picked(UnrolledRNN(6, 8, 4), x_dim=1)  # xs: (steps, batch, width)
    xs, h, keep = torch.randn(3, 9, 6), torch.randn(9, 8), torch.rand(9) > 0.3
    with torch.no_grad():
        report = fusion_backend.explain(model, xs, h, keep)
        assert [s.pattern for s in report.fused] == ["rnn_sequence"], str(report)
        torch._dynamo.reset()
        out, hidden = torch.compile(model, backend="fusedtriton")(xs, h, keep)
        eager_out, eager_hidden = model(xs, h, keep)
        ref_out, ref_hidden = model.double()(xs.double(), h.double(), keep)
    assert_matches(out, eager_out, ref_out)
    assert_matches(hidden, eager_hidden, ref_hidden, "hidden state")


def test_chained_cells_of_two_modules_add_no_guard():
    """Two different cells, the second reading the first's h, with dynamic widths: one graph
    (comparing the cells' symbolic shapes installed a guard on the widths, and a recompile)."""
    def two_cells(x1, x2, h, w1, b1, w2, b2):
        h = torch.tanh(F.linear(torch.cat((x1, h), 1), w1, b1))
        return torch.tanh(F.linear(torch.cat((x2, h), 1), w2, b2))

    torch.manual_seed(0)
    dynamo_counters.clear()
    compiled = torch.compile(two_cells, backend="fusedtriton", dynamic=True)
    with torch.no_grad():
        for i1, i2 in ((4, 6), (5, 7), (6, 6)):
            args = (torch.randn(3, i1), torch.randn(3, i2), torch.randn(3, 8), torch.randn(8, i1 + 8) * 0.3,
                    torch.randn(8), torch.randn(8, i2 + 8) * 0.3, torch.randn(8))
            assert_matches(compiled(*args), two_cells(*args), fp64(two_cells, *args))
    assert unique_graphs() == 1, dict(dynamo_counters["stats"])


def test_mixed_cat_orders_add_no_guard():
    """Step 0 cat((x, h)), later steps cat((h, x)), with dynamic widths: matched with h first,
    the steps' inputs are h0 and x_t, whose widths differ; refused without a guard on them
    (comparing the symbolic shapes installed `I != H` and a recompile Inductor does not have)."""
    def mixed(xs, h, w, b):
        outs = []
        for t in range(3):
            cat = torch.cat((xs[t], h), 1) if t == 0 else torch.cat((h, xs[t]), 1)
            h = torch.tanh(F.linear(cat, w, b))
            outs.append(h)
        return torch.stack(outs)

    torch.manual_seed(0)
    dynamo_counters.clear()
    compiled = torch.compile(mixed, backend="fusedtriton", dynamic=True)
    with torch.no_grad():
        for width in (4, 6, 9):
            args = (torch.randn(3, 5, width), torch.randn(5, 6), torch.randn(6, width + 6) * 0.3, torch.randn(6))
            assert_matches(compiled(*args), mixed(*args), fp64(mixed, *args))
    assert unique_graphs() == 1, dict(dynamo_counters["stats"])
