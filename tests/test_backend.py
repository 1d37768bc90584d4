"""The backend around the patterns, on the CPU: the no-profile fallback, dynamic batch sizes,
options and modes, failures at rewrite and at run time, logging and counters.

Every result is compared with eager (the same weights) and a float64 copy of the model;
fp32 at matmul precision "highest" is accepted within
`tolerance(float32, eager_err=...)` = max(2 x eager's own error vs fp64, 1e-6).
"""
import copy
import logging
import math

import conftest
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusion_backend
import fusion_backend.patterns._common as common
import fusion_backend.patterns.linear_bn_gelu_relu as lbgr
from fusion_backend import autotune, devices
from fusion_backend.models import MLPBlock
from fusion_backend.backend import fusedtriton
from tolerances import assert_matches, rel_err, stats_close, tolerance

LBGR, CLT = "linear_bn_gelu_relu", "cat_linear_tanh"

#: Tests that fuse on the CPU need Triton's interpreter, which conftest turns on only where
#: there is no GPU (tests/test_gpu.py covers the GPU).
needs_interpreter = pytest.mark.skipif(not devices.interpreter_enabled(),
                                       reason="needs TRITON_INTERPRET=1 (conftest sets it when there is no GPU)")


class Block(nn.Module):
    """Linear -> BatchNorm1d -> GELU -> ReLU."""

    def __init__(self, k, n):
        super().__init__()
        self.lin = nn.Linear(k, n)
        self.bn = nn.BatchNorm1d(n)

    def forward(self, x):
        return F.relu(F.gelu(self.bn(self.lin(x))))


class TwoBlocksAndCell(nn.Module):
    """Two LBGR sites and one cat_linear_tanh site."""

    def __init__(self, k=24, n=20, h=12, graph_break=False):
        super().__init__()
        self.b1, self.b2 = Block(k, n), Block(n, n)
        self.i2h = nn.Linear(n + h, h)
        self.graph_break = graph_break

    def forward(self, x, h):
        a = self.b1(x)
        if self.graph_break:
            torch._dynamo.graph_break()
        a = self.b2(a)
        return torch.tanh(self.i2h(torch.cat((a, h), 1)))


def randomize(model, seed=0):
    return conftest.randomize_batch_norm(model, seed).eval()


def check(compiled, model, *inputs):
    """compiled(*inputs) against eager and fp64 copies of `model` (taken before the call)."""
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    with torch.no_grad():
        out = compiled(*inputs)
        assert_matches(out, eager(*inputs), ref(*(t.double() for t in inputs)))
    return out


def counting_backend(graphs, **kwargs):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return fusedtriton(gm, example_inputs, **kwargs)
    return backend


def total_fused():
    return sum(fusion_backend.counters.values())


# ----------------------------------------------------------------------------- no device profile

def test_cpu_without_interpreter_falls_back_to_inductor(monkeypatch, caplog):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert devices.device_profile(torch.device("cpu")) is None
    torch.manual_seed(30)
    model = randomize(TwoBlocksAndCell())
    x, h = torch.randn(9, 24), torch.randn(9, 12)
    with caplog.at_level(logging.INFO, logger="fusion_backend"):
        check(torch.compile(model, backend="fusedtriton"), model, x, h)
    assert total_fused() == 0, dict(fusion_backend.counters)
    assert any("no device profile" in r.getMessage() for r in caplog.records if r.name == "fusion_backend")
    with torch.no_grad():
        report = fusion_backend.explain(model, x, h)
    assert report.profile is None
    assert report.fused == [] and report.skipped == []
    assert all(g.note for g in report.graphs) and "device cpu has none" in report.graphs[0].note
    assert "profile=None" in str(report) and "device cpu has none" in str(report)


# ----------------------------------------------------------------------------- dynamic batch

@needs_interpreter
def test_dynamic_batch_correct_and_fused_each_time():
    torch.manual_seed(31)
    k, n = 24, 20
    model = randomize(Block(k, n))
    graphs = []
    compiled = torch.compile(model, backend=counting_backend(graphs))
    for bs in (8, 13, 64):
        check(compiled, model, torch.randn(bs, k))
        # the fused op itself ran at this batch size: its shape key (batch bucket) was chosen
        key = autotune.make_key("eval:" + LBGR, "interpreter", torch.float32, "ieee", bs, K=k, N=n)
        choice = autotune.TUNER.lookup(key)
        assert choice is not None and choice.source == "fixed", (bs, sorted(autotune.TUNER.choices))
    assert len(graphs) >= 1
    assert fusion_backend.counters[LBGR] == len(graphs)  # every compiled graph fused its site


class Cell(nn.Module):
    def __init__(self, i=24, h=12):
        super().__init__()
        self.i2h = nn.Linear(i + h, h)

    def forward(self, x, h):
        return torch.tanh(self.i2h(torch.cat((x, h), 1)))


@needs_interpreter
@pytest.mark.parametrize("pattern", [LBGR, CLT])
def test_dynamic_batch_at_most_one_recompile(pattern):
    torch.manual_seed(39)
    model = randomize(Block(24, 20)) if pattern == LBGR else Cell()
    graphs = []
    compiled = torch.compile(model, backend=counting_backend(graphs))
    for bs in (8, 13, 64):
        inputs = (torch.randn(bs, 24),) if pattern == LBGR else (torch.randn(bs, 24), torch.randn(bs, 12))
        check(compiled, model, *inputs)
    assert fusion_backend.counters[pattern] == len(graphs)
    assert len(graphs) <= 2, f"{len(graphs)} graphs compiled for batch sizes 8, 13, 64"


# ----------------------------------------------------------------------------- options and modes

@needs_interpreter
def test_patterns_option_leaves_other_pattern_unfused():
    torch.manual_seed(32)
    model = randomize(TwoBlocksAndCell())
    x, h = torch.randn(9, 24), torch.randn(9, 12)
    options = {"patterns": [CLT]}
    check(torch.compile(model, backend="fusedtriton", options=options), model, x, h)
    assert fusion_backend.counters[LBGR] == 0
    assert fusion_backend.counters[CLT] == 1
    with torch.no_grad():
        report = fusion_backend.explain(model, x, h, options=options)
    assert [s.pattern for s in report.fused] == [CLT]
    assert all(s.pattern != LBGR for s in report.fused + report.skipped)  # not even looked at
    assert LBGR not in str(report)


@needs_interpreter
@pytest.mark.parametrize("how", ["mode=reduce-overhead", "options.mode=max-autotune-no-cudagraphs"])
def test_modes_compile_and_run_on_cpu(how):
    torch.manual_seed(33)
    model = randomize(Block(16, 16))
    if how.startswith("mode="):
        compiled = torch.compile(model, backend="fusedtriton", mode="reduce-overhead")
    else:
        compiled = torch.compile(model, backend="fusedtriton", options={"mode": "max-autotune-no-cudagraphs"})
    for _ in range(2):  # reduce-overhead records on the first call, replays after (CUDA only)
        check(compiled, model, torch.randn(4, 16))
    assert fusion_backend.counters[LBGR] == 1


@needs_interpreter
@pytest.mark.parametrize("mode", ["reduce-overhead", None])
def test_no_launch_replays_in_graphs_compiled_for_cuda_graphs(monkeypatch, mode):
    """Under mode="reduce-overhead" the compiled graph calls the cell op inside
    `_common.no_replays()` (Inductor's warm-up routes allocations to its own pool, and its
    replays hold the launches already); without CUDA graphs the op may replay its launch."""
    from fusion_backend.models import RNNCell

    regions = []
    real = common.replay_launch
    monkeypatch.setattr(common, "replay_launch", lambda *a: regions.append(common._local.__dict__.get("off", False))
                        or real(*a))
    torch.manual_seed(5)
    model = randomize(RNNCell(24, 20, 12))
    ref = copy.deepcopy(model).double()
    compiled = torch.compile(model, backend="fusedtriton", mode=mode)
    with torch.no_grad():
        for _ in range(3):
            x, h = torch.randn(8, 24), torch.randn(8, 20)
            for got, want, want64 in zip(compiled(x, h), model(x, h), ref(x.double(), h.double())):
                assert_matches(got, want, want64)
    assert fusion_backend.counters[CLT] == 1
    assert regions == [mode is not None] * 3
    assert not common._local.__dict__.get("off", False)  # the region ends with the call


# ----------------------------------------------------------------------------- failures

@needs_interpreter
def test_rewrite_exception_leaves_site_unfused(monkeypatch, caplog):
    """The second LBGR site's rewrite inserts nodes, then raises: that site stays unfused
    (the inserted nodes are removed), the first is fused, the model is correct."""
    real_replace = lbgr.LinearBnGeluRelu.replace

    def flaky_replace(self, m, ctx):
        graph = ctx.gm.graph
        relus = [n for n in graph.nodes if n.op == "call_function" and n.target is torch.relu]
        if m.relu is not relus[-1]:
            return real_replace(self, m, ctx)
        with graph.inserting_before(m.relu):
            graph.call_function(torch.abs, (graph.call_function(torch.neg, (m.x,)),))
        raise RuntimeError("injected rewrite failure")

    monkeypatch.setattr(lbgr.LinearBnGeluRelu, "replace", flaky_replace)
    torch.manual_seed(34)
    model = randomize(TwoBlocksAndCell())
    x, h = torch.randn(9, 24), torch.randn(9, 12)
    graphs = []
    with caplog.at_level(logging.WARNING, logger="fusion_backend"):
        check(torch.compile(model, backend=counting_backend(graphs)), model, x, h)
    # the rewritten graph (rewritten in place) kept none of the failed rewrite's nodes
    assert len(graphs) == 1
    assert not [n for n in graphs[0].graph.nodes if n.target in (torch.neg, torch.abs)]
    warnings = [r for r in caplog.records if r.name == "fusion_backend" and r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "rewriting linear_bn_gelu_relu" in warnings[0].getMessage()
    assert "injected rewrite failure" in warnings[0].getMessage()
    assert dict(fusion_backend.counters) == {LBGR: 1, CLT: 1}
    with torch.no_grad():
        report = fusion_backend.explain(model, x, h)
    skipped = [s for s in report.skipped if s.pattern == LBGR]
    assert len(skipped) == 1
    assert skipped[0].reason == "rewrite error: RuntimeError: injected rewrite failure"
    assert skipped[0].reason in str(report)
    assert sorted(s.pattern for s in report.fused) == [CLT, LBGR]


@needs_interpreter
def test_rewrite_exception_single_site(monkeypatch, caplog):
    def broken_replace(self, m, ctx):
        raise ValueError("injected")

    monkeypatch.setattr(lbgr.LinearBnGeluRelu, "replace", broken_replace)
    torch.manual_seed(35)
    model = randomize(Block(24, 20))
    x = torch.randn(9, 24)
    with caplog.at_level(logging.WARNING, logger="fusion_backend"):
        check(torch.compile(model, backend="fusedtriton"), model, x)
    assert total_fused() == 0
    assert sum("rewriting linear_bn_gelu_relu" in r.getMessage() for r in caplog.records) == 1
    with torch.no_grad():
        report = fusion_backend.explain(model, x)
    assert report.fused == []
    assert [s.reason for s in report.skipped] == ["rewrite error: ValueError: injected"]
    assert "rewrite error: ValueError: injected" in str(report)


@needs_interpreter
def test_replacement_failing_halfway_sends_the_whole_graph_to_inductor(monkeypatch):
    """A replace that raises after changing the graph (old nodes erased, the new op in use)
    cannot be undone site by site: the whole graph is compiled untouched, with a warning, and
    nothing is reported fused (it was compiled half-rewritten and reported unfused)."""
    real_replace = lbgr.LinearBnGeluRelu.replace

    def replace_then_fail(self, m, ctx):
        real_replace(self, m, ctx)
        raise RuntimeError("injected after the rewrite")

    monkeypatch.setattr(lbgr.LinearBnGeluRelu, "replace", replace_then_fail)
    torch.manual_seed(36)
    model = randomize(TwoBlocksAndCell())
    x, h = torch.randn(9, 24), torch.randn(9, 12)
    graphs = []
    with pytest.warns(RuntimeWarning, match="rewriting the graph failed.*injected after the rewrite"):
        check(torch.compile(model, backend=counting_backend(graphs)), model, x, h)
    assert total_fused() == 0
    assert len(graphs) == 1
    assert not [n for n in graphs[0].graph.nodes if "fusedtriton" in str(n.target)]


class _FailingLauncher:
    """Stands in for a @triton.jit kernel: kernel[grid](...) raises `error` at its first `fail`
    calls, then launches `real`."""

    def __init__(self, error, fail=math.inf, real=None):
        self.error, self.fail, self.real, self.calls = error, fail, real, 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls += 1
            if self.calls <= self.fail:
                raise self.error
            return self.real[grid](*args, **kwargs)
        return launch


def _run_failing_eval_kernel(monkeypatch, launcher):
    """Three calls of a compiled eval block whose kernel is `launcher`, each checked against eager."""
    monkeypatch.setattr(lbgr, "_gemm_bn_gelu_relu_eval_kernel", launcher)
    monkeypatch.setattr(common, "_warned", set())
    torch.manual_seed(36)
    model = randomize(Block(24, 20))
    compiled = torch.compile(model, backend="fusedtriton")
    for _ in range(3):
        check(compiled, model, torch.randn(9, 24))
    return autotune.TUNER.lookup(autotune.make_key("eval:" + LBGR, "interpreter", torch.float32, "ieee", 9, K=24, N=20))


@pytest.mark.kernel_failure_expected
@needs_interpreter
def test_kernel_failure_falls_back_with_one_warning(monkeypatch, caplog):
    launcher = _FailingLauncher(RuntimeError("injected kernel failure"))
    with caplog.at_level(logging.WARNING, logger="fusion_backend"):
        choice = _run_failing_eval_kernel(monkeypatch, launcher)
    assert fusion_backend.counters[LBGR] == 1  # the site was fused; its kernel failed at run time
    assert launcher.calls == 1                 # then the key is pinned to the fallback
    warnings = [r for r in caplog.records if r.name == "fusion_backend" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "injected kernel failure" in warnings[0].getMessage()
    assert choice.source == "fallback"
    # what every other test's teardown fails on (conftest._fresh_backend_state)
    assert any("raised at launch" in failure for failure in conftest.kernel_failures())


@needs_interpreter
def test_out_of_memory_in_a_kernel_is_not_pinned(monkeypatch):
    """A fused kernel that ran out of memory: that call takes the unfused computation, and the
    next one launches the kernel again (any other failure pins the key to the fallback)."""
    launcher = _FailingLauncher(torch.OutOfMemoryError("injected: out of memory"), fail=1,
                                real=lbgr._gemm_bn_gelu_relu_eval_kernel)
    choice = _run_failing_eval_kernel(monkeypatch, launcher)
    assert launcher.calls == 3  # tried again after the out-of-memory call
    assert choice.source != "fallback"


# ----------------------------------------------------------------------------- logging and counters

@needs_interpreter
def test_one_info_summary_per_compiled_graph(caplog):
    torch.manual_seed(37)
    model = randomize(TwoBlocksAndCell(graph_break=True))
    x, h = torch.randn(9, 24), torch.randn(9, 12)
    graphs = []
    with caplog.at_level(logging.INFO, logger="fusion_backend"):
        check(torch.compile(model, backend=counting_backend(graphs)), model, x, h)
    assert len(graphs) == 2  # split by the graph break
    summaries = [r.getMessage().split("\n") for r in caplog.records
                 if r.name == "fusion_backend" and r.levelno == logging.INFO and r.getMessage().startswith("fusedtriton[")]
    assert [lines[0] for lines in summaries] == [
        "fusedtriton[interpreter]: 1 site(s) fused, 0 not fused; rest to Inductor (mode=default)",
        "fusedtriton[interpreter]: 2 site(s) fused, 0 not fused; rest to Inductor (mode=default)",
    ]
    # then one line per site, as explain() prints it
    assert [[line.split(" at ")[0].strip() for line in lines[1:] if " at " in line] for lines in summaries] == [
        [f"+ {LBGR}"], [f"+ {CLT}", f"+ {LBGR}"]], summaries


@needs_interpreter
def test_info_log_gives_the_reason_of_a_site_not_fused(caplog):
    """README: the INFO summary names the sites fused and not, with reasons (it gave counts)."""
    class LinearOutputReturned(Block):
        def forward(self, x):
            y = self.lin(x)
            return torch.relu(F.gelu(self.bn(y))), y

    model = randomize(LinearOutputReturned(16, 16)).eval()
    with caplog.at_level(logging.INFO, logger="fusion_backend"), torch.no_grad():
        torch.compile(model, backend="fusedtriton")(torch.randn(8, 16))
    (message,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fusedtriton[")]
    assert f"- {LBGR} at " in message and "NOT fused: intermediate" in message and "other users" in message


@needs_interpreter
def test_counters_keyed_by_pattern_one_per_site():
    torch.manual_seed(38)
    model = randomize(TwoBlocksAndCell())
    x, h = torch.randn(9, 24), torch.randn(9, 12)
    compiled = torch.compile(model, backend="fusedtriton")
    check(compiled, model, x, h)
    assert dict(fusion_backend.counters) == {LBGR: 2, CLT: 1}
    check(compiled, model, torch.randn(9, 24), torch.randn(9, 12))  # same graph: no new sites
    assert dict(fusion_backend.counters) == {LBGR: 2, CLT: 1}


@needs_interpreter
def test_bfloat16_not_fused_on_the_interpreter():
    """Triton's interpreter gets bf16 dots wrong, so on the CPU profile bf16 sites stay with
    Inductor (with the reason in explain()) and the model still gives eager's result."""
    torch.manual_seed(39)
    model = randomize(TwoBlocksAndCell()).to(torch.bfloat16).eval()
    x, h = torch.randn(9, 24, dtype=torch.bfloat16), torch.randn(9, 12, dtype=torch.bfloat16)
    with torch.no_grad():
        report = fusion_backend.explain(model, x, h)
        out = torch.compile(model, backend="fusedtriton")(x, h)
        eager = model(x, h)
    assert not report.fused and len(report.skipped) == 3
    assert all("not supported on profile interpreter" in s.reason for s in report.skipped), report
    assert rel_err(out, eager) <= tolerance(torch.bfloat16)


@needs_interpreter
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_autocast_sites_fused_in_the_autocast_dtype(train):
    """Under autocast the Linear computes in fp16 from fp32 inputs: the rewrite makes the casts
    explicit and fuses; outputs are fp16 like eager's, within the fp16 class of fp64; gradients
    reach the fp32 parameters; running statistics stay fp32 and match eager's."""
    torch.manual_seed(40)
    model = randomize(TwoBlocksAndCell()).train(train)
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    x, h = torch.randn(9, 24), torch.randn(9, 12)
    with torch.autocast("cpu", dtype=torch.float16):
        out = torch.compile(model, backend="fusedtriton")(x, h)
        e = eager(x, h)
    r = ref(x.double(), h.double())
    assert dict(fusion_backend.counters) == {LBGR: 2, CLT: 1}
    assert out.dtype == e.dtype == torch.float16
    assert rel_err(out, r) <= tolerance(torch.float16)
    out.float().square().sum().backward()
    e.float().square().sum().backward()
    r.square().sum().backward()
    for (name, p), (_, q), (_, p64) in zip(model.named_parameters(), eager.named_parameters(), ref.named_parameters()):
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert rel_err(p.grad, p64.grad) <= max(tolerance(torch.float16), 2 * rel_err(q.grad, p64.grad)), name
    if train:
        for b_ours, b_eager in zip(model.buffers(), eager.buffers()):
            assert b_ours.dtype == b_eager.dtype
            torch.testing.assert_close(b_ours.float(), b_eager.float(), **stats_close(torch.float16))


@needs_interpreter
def test_unfused_graph_goes_to_inductor_as_dynamo_built_it(monkeypatch):
    """When nothing is fused, Inductor gets Dynamo's own GraphModule with the original graph,
    including each placeholder's `_dynamo_source` (Inductor uses it to tell parameters, static
    under CUDA graphs, from inputs). A fresh GraphModule lost that, and under
    reduce-overhead every replay then copied all weights (seen on the H100: 3.2 ms vs 1.1)."""
    import fusion_backend.backend as backend_module

    given, compiled = [], []
    real_inductor = backend_module._inductor
    monkeypatch.setattr(backend_module, "_inductor",
                        lambda gm, ex, opts: (compiled.append(gm), real_inductor(gm, ex, opts))[1])

    def backend(gm, example_inputs):
        given.append((gm, [n.target for n in gm.graph.nodes]))
        return fusedtriton(gm, example_inputs, options={"patterns": ["cat_linear_tanh"]})

    model = randomize(Block(24, 20))
    x = torch.randn(9, 24)
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(x)
    assert total_fused() == 0
    (gm, targets), = given
    assert compiled == [gm]
    assert [n.target for n in gm.graph.nodes] == targets  # the graph as Dynamo traced it
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert placeholders and all(hasattr(n, "_dynamo_source") for n in placeholders)
    ref = copy.deepcopy(model).double()
    assert_matches(out, model(x), ref(x.double()))


@needs_interpreter
def test_keyword_spellings_are_normalized_and_fused():
    torch.manual_seed(41)
    w, b = torch.randn(20, 24), torch.randn(20)
    rm, rv = torch.randn(20), torch.rand(20) + 0.5
    wc = torch.randn(12, 20 + 12)

    def f(x, h):
        y = F.linear(x, weight=w, bias=b)
        z = torch.relu(F.gelu(input=F.batch_norm(y, rm, rv), approximate="tanh"))
        return torch.tanh(F.linear(input=torch.cat([z, h], 1), weight=wc))

    x, h = torch.randn(9, 24), torch.randn(9, 12)
    out = torch.compile(f, backend="fusedtriton")(x, h)
    assert dict(fusion_backend.counters) == {LBGR: 1, CLT: 1}
    ref = torch.tanh(F.linear(torch.cat([torch.relu(F.gelu(F.batch_norm(
        F.linear(x.double(), w.double(), b.double()), rm.double(), rv.double()), approximate="tanh")), h.double()], 1),
        wc.double()))
    assert_matches(out, f(x, h), ref)


@needs_interpreter
def test_match_exception_skips_the_pattern_with_a_warning(monkeypatch, caplog):
    def broken(self, node):
        raise IndexError("unexpected spelling")

    monkeypatch.setattr(lbgr.LinearBnGeluRelu, "match", broken)
    model = randomize(Block(24, 20))
    x = torch.randn(9, 24)
    with caplog.at_level(logging.WARNING, logger="fusion_backend"), torch.no_grad():
        out = torch.compile(model, backend="fusedtriton")(x)
    assert total_fused() == 0
    assert any("match failed" in r.getMessage() for r in caplog.records)
    assert_matches(out, model(x), copy.deepcopy(model).double()(x.double()))


@needs_interpreter
def test_any_rewrite_failure_compiles_the_untouched_graph(monkeypatch):
    import fusion_backend.normalize as normalize

    def broken(gm):
        raise RuntimeError("injected normalizer failure")

    monkeypatch.setattr(normalize, "normalize", broken)
    model = randomize(Block(24, 20))
    x = torch.randn(9, 24)
    with pytest.warns(RuntimeWarning, match="rewriting the graph failed"), torch.no_grad():
        out = torch.compile(model, backend="fusedtriton")(x)
    assert total_fused() == 0
    assert_matches(out, model(x), copy.deepcopy(model).double()(x.double()))


def test_experimental_pattern_runs_only_when_named(monkeypatch):
    """A pattern marked experimental is left out of the default set and runs when
    options["patterns"] names it; patterns run in (order, name) order."""
    from fusion_backend import registry

    class Probe(registry.Pattern):
        name = "zz_probe"
        order = -5
        experimental = True

    registry.discover()
    monkeypatch.setitem(registry._PATTERNS, "zz_probe", Probe())
    default = [p.name for p in registry.enabled_patterns()]
    assert "zz_probe" not in default and "rnn_sequence" in default
    assert default.index("rnn_sequence") < default.index("cat_linear_tanh")  # order -1 before 0
    named = [p.name for p in registry.enabled_patterns(["cat_linear_tanh", "zz_probe"])]
    assert named == ["zz_probe", "cat_linear_tanh"]


# ----------------------------------------------------------------------------- grad mode

def _fused_targets(gm):
    return sorted(str(n.target) for n in gm.graph.nodes
                  if n.op == "call_function" and str(n.target).startswith("fusedtriton."))


def _assert_grads_match(run, model, x, h):
    """Gradients of x and the parameters through `run(model, x, h)` against eager's and an
    fp64 copy's: within the fp32 class of the fp64 gradients, given eager's own error."""
    def call(m, a, b):
        return m(a, b)

    grads = {}
    for tag, fn, m, cast in (("ours", run, model, torch.float32), ("eager", call, copy.deepcopy(model), torch.float32),
                             ("fp64", call, copy.deepcopy(model).double(), torch.float64)):
        xi = x.detach().to(cast).requires_grad_()
        fn(m, xi, h.to(cast)).square().sum().backward()
        grads[tag] = [xi.grad] + [p.grad for p in m.parameters()]
    for ours, eager, ref in zip(grads["ours"], grads["eager"], grads["fp64"]):
        assert ours is not None, "a gradient was dropped"
        assert rel_err(ours, ref) <= tolerance(torch.float32, eager_err=rel_err(eager, ref))


@needs_interpreter
def test_no_grad_graphs_use_ops_without_autograd_and_grad_graphs_keep_it():
    """Compiled under no_grad, the fused ops are their inference twins (no Python autograd
    kernel on every call); the same model called with grad on recompiles (Dynamo guards the
    grad mode) with the autograd ops, and its gradients match eager's."""
    torch.manual_seed(40)
    model = randomize(TwoBlocksAndCell())
    x, h = torch.randn(9, 24), torch.randn(9, 12)
    graphs = []
    compiled = torch.compile(model, backend=counting_backend(graphs))
    check(compiled, model, x, h)  # under no_grad
    assert _fused_targets(graphs[-1]) == ["fusedtriton.cat_linear_tanh_inference.default"] + \
        ["fusedtriton.linear_bn_gelu_relu_eval_inference.default"] * 2
    _assert_grads_match(lambda m, a, b: compiled(a, b), model, x, h)
    assert len(graphs) == 2, "grad mode on must recompile"
    # eval-mode BatchNorm with grad: the op that keeps the Linear's output for the backward;
    # the cell's op that returns its operands' copy for dW
    assert _fused_targets(graphs[-1]) == ["fusedtriton.cat_linear_tanh_saving.default"] + \
        ["fusedtriton.linear_bn_gelu_relu_eval_keep_y.default"] * 2


@needs_interpreter
def test_grad_turned_on_inside_a_no_grad_call_keeps_autograd_ops():
    """A graph compiled under no_grad that enables grad inside (torch.enable_grad()) keeps the
    ops with autograd: the twin would silently drop the gradient there."""
    torch.manual_seed(41)
    model = randomize(TwoBlocksAndCell())
    graphs = []

    def f(x, h):
        with torch.enable_grad():
            return model(x, h)

    compiled = torch.compile(f, backend=counting_backend(graphs))

    def run(m, x, h):
        with torch.no_grad():
            out = compiled(x, h)
        assert out.requires_grad
        return out

    _assert_grads_match(run, model, torch.randn(9, 24), torch.randn(9, 12))
    assert fusion_backend.counters[LBGR] == 2 and graphs
    assert all(not t.endswith("_inference.default") for g in graphs for t in _fused_targets(g))


def test_inference_twins_only_where_nothing_can_turn_grad_on():
    """`registry.use_inference_twins` on hand-built graphs: a fused op is swapped for its twin
    under no_grad; not with grad on, nor where a grad switch or a higher-order op (whose
    subgraph could hold one) is in the graph."""
    from torch import fx

    import fusion_backend.patterns.cat_linear_tanh as clt
    from fusion_backend import registry

    def graph(*extra):
        g = fx.Graph()
        x, w = g.placeholder("x"), g.placeholder("w")
        for target, args in extra:
            g.call_function(target, args)
        g.output(g.call_function(clt.cat_linear_tanh, ([x], w, None, "ieee", False, 1.0)))
        return fx.GraphModule(torch.nn.Module(), g)

    twin = registry.INFERENCE_TWINS[clt.cat_linear_tanh]
    with torch.no_grad():
        gm = graph()
        assert registry.use_inference_twins(gm) == 1
        assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [twin]
        assert registry.use_inference_twins(graph((torch._C._set_grad_enabled, (True,)))) == 0
        assert registry.use_inference_twins(graph((torch.ops.higher_order.cond, ()))) == 0
    assert registry.use_inference_twins(graph()) == 0


@needs_interpreter
def test_repeated_explain_leaves_the_models_compiles_working():
    """Each explain() compiles with its own backend; Dynamo kept an entry per call for the
    model's code, so after its recompile limit (8) explain() reported nothing and the user's
    own compiled model ran a new batch size eagerly. explain() now drops the model's entries."""
    torch.manual_seed(21)
    model = randomize(Block(16, 16)).eval()
    compiled = torch.compile(model, backend="fusedtriton")
    with torch.no_grad():
        check(compiled, model, torch.randn(8, 16))
        for _ in range(torch._dynamo.config.recompile_limit + 2):
            report = fusion_backend.explain(model, torch.randn(8, 16))
            assert len(report.graphs) == 1 and [s.pattern for s in report.fused] == [LBGR]
        before = fusion_backend.counters[LBGR]
        check(compiled, model, torch.randn(5, 16))  # a new batch size: compiled again, fused
    assert fusion_backend.counters[LBGR] == before + 1


class _TwoBlocksWithABreak(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = Block(16, 16), Block(16, 16)

    def forward(self, x):
        x = self.a(x)
        torch._dynamo.graph_break()  # the code after it is a resume function of its own
        return self.b(x)


@needs_interpreter
def test_repeated_explain_across_a_graph_break():
    """explain() drops the entries of every code it compiled, the graph break's resume function
    included: it kept one per call there, and past the recompile limit the part after the
    break ran eagerly, unfused, in explain() and in the user's own compile."""
    torch.manual_seed(22)
    model = _TwoBlocksWithABreak()
    for block in (model.a, model.b):
        randomize(block)
    model.eval()
    with torch.no_grad():
        for _ in range(torch._dynamo.config.recompile_limit + 2):
            report = fusion_backend.explain(model, torch.randn(8, 16))
            assert len(report.graphs) == 2 and [s.pattern for s in report.fused] == [LBGR, LBGR]
        fusion_backend.counters.clear()
        check(torch.compile(model, backend="fusedtriton"), model, torch.randn(8, 16))
    assert fusion_backend.counters[LBGR] == 2


@needs_interpreter
def test_explain_of_a_callable_without_code_leaves_other_compiles_alone():
    """explain() on a functools.partial (no __code__): torch's remove_from_cache reset every
    compiled model of the process; now only the codes explain() compiled are dropped."""
    import functools

    torch.manual_seed(23)

    def unrelated(x):  # (a function of its own code: a compiled module runs through Dynamo's
        return torch.cos(x) * 2  # shared wrapper code, which explain() of any module compiles too)

    other = torch.compile(unrelated)
    x3 = torch.randn(2, 3)
    other(x3)
    model = randomize(Block(16, 16)).eval()

    def call(x, model):
        return model(x)

    stats = torch._dynamo.utils.counters["stats"]
    with torch.no_grad():
        report = fusion_backend.explain(functools.partial(call, model=model), torch.randn(8, 16))
        assert [s.pattern for s in report.fused] == [LBGR]
    graphs = stats["unique_graphs"]
    other(x3)  # (with grad on, as compiled)
    assert stats["unique_graphs"] == graphs  # not compiled again


@needs_interpreter
@pytest.mark.parametrize("compiled_as", ["module", "function"])
def test_explain_of_a_compiled_model_uses_its_settings_and_leaves_counters(compiled_as):
    """explain() of what `torch.compile(..., options=...)` returned reports with those options
    (it compiled with its defaults and reported a site the model never fused), unless given
    others; its own compile does not count in `counters`."""
    torch.manual_seed(24)
    model = randomize(Block(16, 16)).eval()
    x = torch.randn(8, 16)
    only_cell = {"patterns": [CLT]}
    target = model if compiled_as == "module" else (lambda t: model(t))
    compiled = torch.compile(target, backend="fusedtriton", options=only_cell)
    with torch.no_grad():
        compiled(x)
        assert fusion_backend.counters[LBGR] == 0
        assert not fusion_backend.explain(compiled, x).fused
        assert fusion_backend.counters[LBGR] == 0
        report = fusion_backend.explain(compiled, x, options=None)  # given here: the defaults
        assert [s.pattern for s in report.fused] == [LBGR]
        assert fusion_backend.counters[LBGR] == 0
        check(torch.compile(model, backend="fusedtriton"), model, x)
    assert fusion_backend.counters[LBGR] == 1


@needs_interpreter
def test_explain_of_a_compiled_model_keeps_its_shape_settings(monkeypatch):
    """A model compiled with dynamic=True runs its sites with symbolic sizes (no inline
    launch on a GPU): explain() compiled it with static sizes, so its report could name a
    launch the model does not take. fullgraph= is kept too."""
    model = randomize(Block(16, 16)).eval()
    x = torch.randn(8, 16)
    batches = []  # per graph compiled: whether it has a symbolic size

    def recording(gm, example_inputs, **kw):
        batches.append(any(isinstance(a, torch.SymInt) for a in example_inputs))  # a dynamic size's input
        return backend_fn(gm, example_inputs, **kw)

    backend_fn = fusion_backend.fusedtriton
    monkeypatch.setattr(fusion_backend, "fusedtriton", recording)
    with torch.no_grad():
        assert fusion_backend.explain(torch.compile(model, backend="fusedtriton"), x).fused
        assert batches and not any(batches)
        batches.clear()
        assert fusion_backend.explain(torch.compile(model, backend="fusedtriton", dynamic=True), x).fused
        assert batches and all(batches)
    assert fusion_backend._shape_settings(torch.compile(model, backend="inductor", dynamic=False, fullgraph=True)) == {
        "dynamic": False, "fullgraph": True}


@needs_interpreter
def test_explain_arguments_replace_the_compiled_models_settings():
    """explain(compiled, x, mode=...) of a model compiled with options={"mode": ...}: the
    model's options are not mixed in (they raised "disagree" for another mode, or overrode
    mode="default" silently)."""
    model = randomize(Block(16, 16)).eval()
    x = torch.randn(8, 16)
    compiled = torch.compile(model, backend="fusedtriton", options={"mode": "max-autotune-no-cudagraphs"})
    with torch.no_grad():
        for mode in ("reduce-overhead", "default"):
            report = fusion_backend.explain(compiled, x, mode=mode)
            assert report.graphs[0].mode in (mode, None if mode == "default" else mode), report
        report = fusion_backend.explain(compiled, x)
        assert report.graphs[0].mode == "max-autotune-no-cudagraphs"


@needs_interpreter
def test_explain_of_a_module_compiled_in_place():
    """`module.compile(backend="fusedtriton", options=...)`: explain() reports with those
    options, or with its own arguments where given (the module's compiled call ran instead
    and the report was its), and the module's compiled call is back afterwards."""
    model = randomize(Block(16, 16)).eval()
    eager = copy.deepcopy(model)
    x = torch.randn(8, 16)
    model.compile(backend="fusedtriton", options={"patterns": [CLT]})
    impl = model._compiled_call_impl
    with torch.no_grad():
        assert not fusion_backend.explain(model, x).fused
        assert [s.pattern for s in fusion_backend.explain(model, x, options=None).fused] == [LBGR]
        assert model._compiled_call_impl is impl
        torch.testing.assert_close(model(x), eager(x))
    assert fusion_backend.counters[LBGR] == 0  # the module's own options leave the block alone


@needs_interpreter
def test_summary_names_the_patterns_option_when_nothing_matched():
    """A graph whose only structure is a pattern left out by options['patterns']: the summary
    says the enabled patterns found nothing, not that the graph has no pattern's structure."""
    model = randomize(Block(16, 16)).eval()
    with torch.no_grad():
        report = fusion_backend.explain(model, torch.randn(8, 16), options={"patterns": ["cat_linear_tanh"]})
    text = str(report)
    assert "enabled pattern(s) ['cat_linear_tanh']" in text and "options['patterns']" in text, text
    assert "no pattern's structure" not in text


@pytest.mark.skipif(not devices.interpreter_enabled(), reason="needs TRITON_INTERPRET=1 for a site to judge")
def test_graph_setting_the_matmul_precision_is_left_unfused():
    """Dynamo records torch.set_float32_matmul_precision as a node and applies it before the
    backend runs: a site before the call would be compiled at the precision eager uses only
    after it. Such a graph's sites are left unfused, with the reason."""
    class SetsPrecision(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = MLPBlock(12, 10)

        def forward(self, x):
            y = self.block(x)
            torch.set_float32_matmul_precision("high")
            return y * 2

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        model = SetsPrecision().eval()
        x = torch.randn(6, 12)
        with torch.no_grad():
            report = fusion_backend.explain(model, x)
            torch.set_float32_matmul_precision("highest")
            out, want = torch.compile(model, backend="fusedtriton")(x), model(x)
    finally:
        torch.set_float32_matmul_precision(before)
    assert not report.fused and report.skipped, str(report)
    assert all("set_float32_matmul_precision" in s.reason for s in report.skipped), str(report)
    assert fusion_backend.counters["linear_bn_gelu_relu"] == 0
    torch.testing.assert_close(out, want)


def test_explain_of_a_call_that_compiles_no_graph():
    """`profile=[]` was printed where Dynamo captured nothing to compile."""
    report = fusion_backend.explain(lambda x: x, torch.randn(3))
    assert report.graphs == [] and report.profile is None
    assert str(report).startswith("fusedtriton explain: no graph reached the backend (Dynamo captured no tensor")


def test_explain_of_a_loop_dynamo_skips_does_not_blame_the_model():
    """A graph break inside a loop makes Dynamo skip the frame and run it eagerly: the report
    said "Dynamo captured no tensor operations", of a model full of them."""
    def loop(x):
        for _ in range(3):
            x = torch.tanh(x @ x.t())
            print(end="")
        return x

    report = fusion_backend.explain(loop, torch.randn(4, 4))
    if report.graphs:
        pytest.skip("this torch compiles the loop's pieces")
    assert "ran it eagerly, e.g. at a graph break inside a loop" in str(report)


def test_explain_takes_model_keywords_named_like_its_own():
    """A model keyword named `mode` could not reach the model through explain(mode=...), which
    is the backend's mode: `model_kwargs` carries it."""
    class Switch(torch.nn.Module):
        def forward(self, x, mode="relu", options=None):
            return torch.relu(x) if mode == "relu" else -x

    report = fusion_backend.explain(Switch(), torch.randn(3), model_kwargs={"mode": "neg", "options": 1})
    assert len(report.graphs) == 1
    with pytest.raises(TypeError, match=r"\['scale'\] given both in model_kwargs and as keywords"):
        fusion_backend.explain(Switch(), torch.randn(3), model_kwargs={"scale": 2}, scale=2)
    with pytest.raises(TypeError, match="model_kwargs must be a dict"):
        fusion_backend.explain(Switch(), torch.randn(3), model_kwargs=["neg"])


@needs_interpreter
def test_fake_example_inputs_are_not_taken_for_real_ones(monkeypatch):
    """Dynamo's DDP optimizer compiles its subgraphs with FakeTensor example inputs. The rewrite
    took them for the real tensors the compile-time timing runs kernels on (GPU profiles): every
    MLP block under DDP was left unfused, its reason "Cannot access data pointer of Tensor".
    Fakes are left out, and the timing gets random tensors of their shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

    from fusion_backend import backend
    from fusion_backend.options import Options

    graphs = []

    def capture(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm

    model = randomize(MLPBlock(12, 10)).eval()
    with torch.no_grad():
        torch.compile(model, backend=capture)(torch.randn(9, 12))
    gm, examples = graphs[0]
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fakes = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in examples]
    contexts = []
    real_context = backend.RewriteContext
    monkeypatch.setattr(backend, "RewriteContext", lambda **kw: contexts.append(real_context(**kw)) or contexts[-1])
    backend.rewrite(gm, devices.INTERPRETER, Options(), torch.device("cpu"), fakes)
    placeholders = [n for n in contexts[0].gm.graph.nodes if n.op == "placeholder"]
    tensors = [contexts[0].real_tensor(n) for n in placeholders]
    assert tensors and not any(is_fake(t) for t in tensors if t is not None)
