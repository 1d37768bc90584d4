"""The run-time trial of a fused graph against the original one (fusion_backend/trial.py).

GraphTrial itself runs on fake graphs and a fake clock; the backend's use of it runs on the
CPU interpreter with the trial forced on (on a CPU there is no GPU time to weigh, so the
backend never starts one by itself) and a fake clock that makes one graph the faster.
Results are compared with eager and a float64 copy of the model at every call, since the
calls alternate between the two compiled graphs.
"""
import copy

import pytest
import torch

import fusion_backend
from fusion_backend import backend, trial
from fusion_backend.options import Options
from test_backend import LBGR, Block, needs_interpreter, randomize
from tolerances import assert_matches, grad_close, stats_close


class FakeClock:
    """Spans in the order they are stopped: even ones are the fused graph's (the trial
    alternates blocks of `block` calls: fused, unfused, ...), timed `fused_ms` / `unfused_ms`
    a call; `ready` and `capturing` are switches."""

    def __init__(self, fused_ms=1.0, unfused_ms=2.0, block=trial.TRIAL_BLOCK, calls=None):
        self.times = (fused_ms * block, unfused_ms * block)
        self.stopped = 0
        self.ready_now = True
        self.capturing_now = False
        self.calls = calls  # the graphs' call log, if given: each span records which calls it covers
        self.covered = []

    def start(self):
        return None if self.calls is None else len(self.calls)

    def stop(self, start):
        self.stopped += 1
        if self.calls is not None:
            self.covered.append(self.calls[start:])
        return self.times[(self.stopped - 1) % 2]

    def ready(self, span):
        return self.ready_now

    def ms(self, span):
        return span

    def capturing(self):
        return self.capturing_now


def _graphs():
    calls = []

    def fused(*args):
        calls.append("fused")
        return "F"

    def unfused(*args):
        calls.append("unfused")
        return "U"

    return fused, unfused, calls


@pytest.mark.parametrize("fused_ms,unfused_ms,winner", [(1.0, 2.0, "F"), (2.0, 1.0, "U"), (1.0, 1.0, "F")])
def test_trial_alternates_then_keeps_the_faster(fused_ms, unfused_ms, winner):
    fused, unfused, calls = _graphs()
    decisions = []
    clock = FakeClock(fused_ms, unfused_ms, block=2)
    run = trial.as_compiled_fn(trial.GraphTrial(fused, unfused, lambda *d: decisions.append(d), calls=3,
                                                clock=clock, block=2))
    outs = [run() for _ in range(2 + 2 * 4)]  # 3 timed calls each, rounded up to 2 blocks of 2
    # one warm-up call each, then blocks of back-to-back calls of one graph, alternating
    assert calls == ["fused", "unfused"] + ["fused", "fused", "unfused", "unfused"] * 2
    assert outs == ["F", "U"] + ["F", "F", "U", "U"] * 2
    assert clock.stopped == 4  # one span per block; the warm-up calls are not timed
    assert decisions == []
    outs = [run() for _ in range(5)]
    assert outs == [winner] * 5
    assert decisions == [(fused_ms, unfused_ms, winner == "F")]


def test_each_span_covers_one_whole_block_and_a_capture_drops_the_open_block():
    """Every timed span holds exactly `block` back-to-back calls of one graph; a CUDA-graph
    capture that starts inside a block drops that block (its span would hold the capture):
    the block is run again from its first call."""
    fused, unfused, calls = _graphs()
    decisions = []
    clock = FakeClock(1.0, 2.0, block=3, calls=calls)
    run = trial.as_compiled_fn(trial.GraphTrial(fused, unfused, lambda *d: decisions.append(d), calls=6,
                                                clock=clock, block=3))
    for _ in range(2 + 2):  # warm-ups, then two calls into the first fused block
        run()
    clock.capturing_now = True
    run()
    clock.capturing_now = False
    for _ in range(4 * 3):  # 2 blocks of 3 calls each
        run()
    assert clock.covered == [["fused"] * 3, ["unfused"] * 3] * 2
    assert decisions == [] and run() == "F" and decisions == [(1.0, 2.0, True)]


@pytest.mark.parametrize("where", ["clock", "graph"])
def test_a_call_that_raises_inside_a_block_drops_that_block(where):
    """A Ctrl-C while the clock waits for the GPU (or a graph call that raises) in the middle
    of the trial: the call raises, the block it was in is run again from its first call, every
    span still covers one whole block of one graph, and the decision comes (it used to take
    the span's start from another block, or from none, and then raise at every call)."""
    fused, unfused, calls = _graphs()
    decisions = []
    clock = FakeClock(1.0, 2.0, block=3, calls=calls)
    graph_trial = trial.GraphTrial(fused, unfused, lambda *d: decisions.append(d), calls=6, clock=clock, block=3)
    run = trial.as_compiled_fn(graph_trial)
    for _ in range(2 + 3 + 1):  # warm-ups, the first fused block, one call into the unfused one
        run()
    raise_once = [True]

    def interrupted(orig):
        def wrapper(*args):
            if raise_once and raise_once.pop():
                raise KeyboardInterrupt
            return orig(*args)
        return wrapper

    if where == "clock":
        clock.start = interrupted(clock.start)
        run(), run()  # the rest of the unfused block: the next block's start is interrupted
    else:
        run()
        graph_trial.graphs = (fused, interrupted(unfused))
    with pytest.raises(KeyboardInterrupt):
        run()
    for _ in range(30):
        run()
    assert all(len(set(span)) == 1 and len(span) == 3 for span in clock.covered), clock.covered
    assert decisions == [(1.0, 2.0, True)] and run() == "F"


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("when", ["warm-up", "block"])
def test_a_graph_that_raises_loses_the_trial(which, when):
    """A graph that raises during the trial (the original one out of memory where it keeps an
    intermediate the fused one does not): that call's error reaches the caller, and the other
    graph runs from then on. The failing graph's warm-up call used to be retried at every
    call, so the model never ran again."""
    fused, unfused, calls = _graphs()
    decisions = []
    ran = [0]

    def failing(*args):
        ran[0] += 1
        if when == "warm-up" or ran[0] > 1:  # "block": its warm-up call passes
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return "X"

    graphs = [fused, unfused]
    graphs[which] = failing
    run = trial.as_compiled_fn(trial.GraphTrial(*graphs, lambda *d: decisions.append(d), calls=4,
                                                clock=FakeClock(block=2), block=2))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        for _ in range(10):
            run()
    assert decisions == [(None, None, which == 1)]
    assert [run() for _ in range(5)] == ["U" if which == 0 else "F"] * 5
    assert ran[0] == (1 if when == "warm-up" else 2)


@pytest.mark.parametrize("which", [0, 1])
def test_a_callers_error_does_not_end_the_trial_but_a_graph_failing_each_call_loses(which):
    """An error raised once (a bad index in the caller's input raises in both graphs) is that
    call's: the trial goes on and times both graphs (it used to end the trial against the graph
    that happened to run). A graph raising FAILURES_TO_LOSE calls in a row loses."""
    fused, unfused, calls = _graphs()
    decisions = []
    fail = [1]

    def sometimes(*args):
        if fail[0]:
            fail[0] -= 1
            raise IndexError("index 7 is out of bounds for dimension 0 with size 3")
        return "X"

    graphs = [fused, unfused]
    graphs[which] = sometimes
    run = trial.as_compiled_fn(trial.GraphTrial(*graphs, lambda *d: decisions.append(d), calls=4,
                                                clock=FakeClock(block=2), block=2))
    with pytest.raises(IndexError):
        run() if which == 0 else (run(), run())
    for _ in range(2 + 8 + 1):  # warm-ups, 2 blocks of 2 each, the deciding call
        run()
    assert decisions == [(1.0, 2.0, True)]  # timed both, by the fake clock

    fused, unfused, calls = _graphs()
    decisions.clear()
    fail[0] = 100
    graphs = [fused, unfused]
    graphs[which] = sometimes
    run = trial.as_compiled_fn(trial.GraphTrial(*graphs, lambda *d: decisions.append(d), calls=4,
                                                clock=FakeClock(block=2), block=2))
    if which == 1:
        run()  # the fused graph's warm-up
    for _ in range(trial.FAILURES_TO_LOSE):
        with pytest.raises(IndexError):
            run()
    assert decisions == [(None, None, which == 1)]
    assert [run() for _ in range(3)] == ["U" if which == 0 else "F"] * 3


def test_the_losing_graph_is_released():
    import gc
    import weakref

    fused, unfused, calls = _graphs()

    class Graph:  # weakref-able callables standing for the compiled graphs
        def __init__(self, fn):
            self.fn = fn

        def __call__(self, *args):
            return self.fn(*args)

    f, u = Graph(fused), Graph(unfused)
    lost = weakref.ref(u)
    run = trial.as_compiled_fn(trial.GraphTrial(f, u, lambda *d: None, calls=2, clock=FakeClock(1.0, 2.0, block=2),
                                                block=2))
    del u
    for _ in range(2 + 2 * 2 + 1):
        run()
    gc.collect()
    assert lost() is None and run() == "F"


def test_trial_waits_for_the_events_and_skips_captures():
    fused, unfused, calls = _graphs()
    decisions = []
    clock = FakeClock(2.0, 1.0, block=2)
    run = trial.as_compiled_fn(trial.GraphTrial(fused, unfused, lambda *d: decisions.append(d), calls=2,
                                                clock=clock, block=2))
    clock.capturing_now = True
    assert [run() for _ in range(3)] == ["F"] * 3 and clock.stopped == 0  # capture: fused, nothing timed
    clock.capturing_now = False
    for _ in range(2 + 2 * 2):
        run()
    clock.ready_now = False
    assert [run() for _ in range(3)] == ["F"] * 3 and decisions == []  # GPU not there yet: fused meanwhile
    clock.ready_now = True
    assert run() == "U" and len(decisions) == 1


def _options(**kw):
    return Options.parse(None, kw)


def test_no_trial_reasons(monkeypatch):
    from fusion_backend import autotune
    from fusion_backend.report import GraphReport, Site

    gpu = devices_like("nvidia")
    report = GraphReport(profile="nvidia", mode=None, sites=[Site(LBGR, "relu", True, info={"key": "k1"})])
    monkeypatch.setattr(autotune.TUNER, "lookup", lambda key: autotune.Choice({"BLOCK_M": 64}, "tuned", 0.3, 0.5))
    assert backend._no_trial_reason(report, gpu, _options()) == ""
    assert "trial" in backend._no_trial_reason(report, gpu, _options(trial=False))
    assert "timed" in backend._no_trial_reason(report, gpu, _options(autotune=False))
    assert "CUDA graphs" in backend._no_trial_reason(report, gpu, _options(mode="reduce-overhead"))
    assert "timed" in backend._no_trial_reason(report, devices_like("interpreter"), _options())
    monkeypatch.setattr(autotune.TUNER, "lookup", lambda key: autotune.Choice({"BLOCK_M": 64}, "tuned", 1.5, 3.0))
    assert "1.500 ms" in backend._no_trial_reason(report, gpu, _options())
    report.sites.append(Site("rnn_sequence", "stack", True, info={}))  # no tuned time: never a trial
    monkeypatch.setattr(autotune.TUNER, "lookup", lambda key: autotune.Choice({"BLOCK_M": 64}, "tuned", 0.3, 0.5))
    assert "rnn_sequence" in backend._no_trial_reason(report, gpu, _options())


def devices_like(vendor):
    import dataclasses

    from fusion_backend import devices

    return dataclasses.replace(devices.INTERPRETER, name=vendor, vendor=vendor)


def test_trial_option_is_a_bool():
    assert _options(trial=False).trial is False and _options().trial is True
    with pytest.raises(ValueError, match="trial"):
        _options(trial="yes")


@needs_interpreter
@pytest.mark.parametrize("unfused_faster", [False, True], ids=["fused-kept", "original-kept"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_backend_trial_on_a_real_graph(monkeypatch, caplog, unfused_faster, train):
    """Both graphs compiled by Inductor, calls alternating: every output and the BatchNorm
    running statistics match eager's at each call; the decision shows in the counters, the
    report and the log."""
    clock = FakeClock(*((2.0, 1.0) if unfused_faster else (1.0, 2.0)))
    monkeypatch.setattr(backend, "_no_trial_reason", lambda report, profile, opts: "")
    monkeypatch.setattr(trial, "CudaClock", lambda device: clock)
    model = randomize(Block(24, 20)).train(train)
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    graphs = []

    def recording_backend(gm, example_inputs):
        from fusion_backend.backend import _report_sinks

        sink = []
        _report_sinks.append(sink)
        try:
            return backend.fusedtriton(gm, example_inputs)
        finally:
            _report_sinks.remove(sink)
            graphs.extend(sink)

    compiled = torch.compile(model, backend=recording_backend)
    caplog.set_level("INFO", logger="fusion_backend")
    torch.manual_seed(1)
    with torch.no_grad():
        for call in range(2 + 2 * trial.TRIAL_CALLS + 2):
            x = torch.randn(37, 24)
            assert_matches(compiled(x), eager(x), ref(x.double()), f"output, call {call}")
            if train:  # each call took one of the two graphs: its running statistics too
                for name in ("running_mean", "running_var"):
                    torch.testing.assert_close(getattr(model.bn, name), getattr(eager.bn, name),
                                               **stats_close(torch.float32), msg=lambda m: f"{name}, call {call}: {m}")
                assert model.bn.num_batches_tracked == eager.bn.num_batches_tracked
    (report,) = graphs
    assert fusion_backend.counters[LBGR] == (0 if unfused_faster else 1)
    kept = "original graph kept" if unfused_faster else "fused graph kept"
    assert kept in report.note and kept in caplog.text
    if unfused_faster:
        assert report.skipped and "run-time trial" in report.skipped[0].reason


@needs_interpreter
@pytest.mark.parametrize("unfused_faster", [False, True], ids=["fused-kept", "original-kept"])
def test_backend_trial_gradients_match_eager_at_every_call(monkeypatch, unfused_faster):
    """With grad on (training), each call's backward runs through the graph that call took:
    at every call of the trial and after it, the output matches eager and a float64 copy, and
    the gradients of x, W, b, gamma and beta match theirs within `grad_close` (the Linear bias's
    exact gradient is 0 in front of a training-mode BatchNorm: compared at the scale of dY)."""
    clock = FakeClock(*((2.0, 1.0) if unfused_faster else (1.0, 2.0)))
    monkeypatch.setattr(backend, "_no_trial_reason", lambda report, profile, opts: "")
    monkeypatch.setattr(trial, "CudaClock", lambda device: clock)
    model = randomize(Block(24, 20)).train()
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    linear_out = []  # the fp64 copy's Linear output, for the scale of dY

    def keep(mod, inp, y):
        y.retain_grad()
        linear_out.append(y)

    ref.lin.register_forward_hook(keep)
    compiled = torch.compile(model, backend="fusedtriton")
    torch.manual_seed(2)
    for _ in range(2 + 2 * trial.TRIAL_CALLS + 2):
        x, grad_out = torch.randn(37, 24), torch.randn(37, 20)
        linear_out.clear()
        grads = []
        for fn, m, dtype in ((compiled, model, torch.float32), (eager, eager, torch.float32),
                             (ref, ref, torch.float64)):
            xi = x.to(dtype, copy=True).requires_grad_()
            out = fn(xi)
            out.backward(grad_out.to(dtype))
            grads.append({"out": out.detach(), "x": xi.grad, "W": m.lin.weight.grad, "b": m.lin.bias.grad,
                          "gamma": m.bn.weight.grad, "beta": m.bn.bias.grad})
            m.zero_grad()
        got, want, ref64 = grads
        assert_matches(got["out"], want["out"], ref64["out"])
        dy_scale = linear_out[0].grad.abs().max().item()
        for name in ("x", "W", "b", "gamma", "beta"):
            scale = dy_scale if name == "b" else None
            torch.testing.assert_close(got[name], want[name], **grad_close(want[name], scale))
            torch.testing.assert_close(got[name], ref64[name].float(), **grad_close(ref64[name], scale))
    assert fusion_backend.counters[LBGR] == (0 if unfused_faster else 1)


def test_no_trial_for_fused_sites_of_a_ms_or_more_even_with_a_site_fused_for_it(monkeypatch):
    """A graph whose fused sites take 1 ms or more of GPU time gets no trial, also where one
    site was fused only for the trial (the backend then rewrites it with the trial off, next
    test): the trial is all or nothing, and would risk the sites that won outright."""
    from fusion_backend import autotune
    from fusion_backend.report import GraphReport, Site

    gpu = devices_like("nvidia")
    site = Site(LBGR, "relu", True, info={"key": "k1", "launch_bound": "launch-bound here: ..."})
    report = GraphReport(profile="nvidia", mode=None, sites=[site])
    monkeypatch.setattr(autotune.TUNER, "lookup", lambda key: autotune.Choice({"BLOCK_M": 64}, "tuned", 1.5, 3.0))
    assert "1.500 ms" in backend._no_trial_reason(report, gpu, _options())
    monkeypatch.setattr(autotune.TUNER, "lookup", lambda key: autotune.Choice({"BLOCK_M": 64}, "tuned", 0.5, 3.0))
    assert backend._no_trial_reason(report, gpu, _options()) == ""


def _tie_fused_only_for_the_trial(ctx, key, call_op, call_unfused, static_shapes=False):
    """A stand-in for `tuned_unfused_reason` that sees a tie: fused for the run-time trial
    when the trial is on, else left to Inductor."""
    if ctx.options.trial:
        ctx.launch_bound[key] = "a tie at compile time (test)"
        return None
    return "unfused path is faster here (test): left to Inductor"


def _tied_block(monkeypatch):
    """(model, its eager copy, the list the backend's reports go to, an input): an eval
    Linear+BN+GELU+ReLU block whose site the tuner finds a tie (`_tie_fused_only_for_the_trial`)."""
    import fusion_backend.patterns.linear_bn_gelu_relu as lbgr

    monkeypatch.setattr(lbgr, "tuned_unfused_reason", _tie_fused_only_for_the_trial)
    model = randomize(Block(24, 20)).eval()
    graphs = []
    monkeypatch.setattr(backend, "_report_sinks", [graphs])
    return model, copy.deepcopy(model), graphs, torch.randn(37, 24)


@needs_interpreter
def test_sites_fused_for_a_trial_that_cannot_run_are_left_unfused(monkeypatch):
    """A site fused only for the run-time trial, in a graph that will not get one (here
    `_no_trial_reason` says so, as it does beside a site without tuned time or beside fused
    sites of 1 ms or more): the backend rewrites the graph with the trial off, where the
    compile-time decision leaves the site to Inductor; counters and reports say so, the result
    matches eager."""
    model, eager, graphs, x = _tied_block(monkeypatch)
    monkeypatch.setattr(backend, "_no_trial_reason",
                        lambda report, profile, opts: "no trial (test)" if opts.trial else "options['trial'] is False")
    with torch.no_grad():
        out = torch.compile(model, backend="fusedtriton")(x)
    torch.testing.assert_close(out, eager(x))
    (report,) = graphs
    assert fusion_backend.counters[LBGR] == 0 and not report.fused
    assert "left to Inductor" in report.skipped[0].reason


@needs_interpreter
def test_inductor_failing_on_the_original_graph_keeps_the_fused_one(monkeypatch):
    """The trial's rival, the original graph, fails in Inductor: the fused graph (which
    compiled) is kept as it is, a site fused for the trial included, without a trial; the
    report's note says why and the result matches eager."""
    model, eager, graphs, x = _tied_block(monkeypatch)
    monkeypatch.setattr(backend, "_no_trial_reason", lambda report, profile, opts: "")
    inductor, compiled_graphs = backend._inductor, []

    def inductor_failing_on_the_original(gm, example_inputs, opts):
        compiled_graphs.append(gm)
        if len(compiled_graphs) == 2:
            raise RuntimeError("Inductor failed (test)")
        return inductor(gm, example_inputs, opts)

    monkeypatch.setattr(backend, "_inductor", inductor_failing_on_the_original)
    with torch.no_grad():
        compiled = torch.compile(model, backend="fusedtriton")
        for _ in range(3):
            torch.testing.assert_close(compiled(x), eager(x))
    (report,) = graphs
    assert fusion_backend.counters[LBGR] == 1 and len(report.fused) == 1
    assert "Inductor failed on the original graph" in report.note and "fused graph kept" in report.note
    assert len(compiled_graphs) == 2


@pytest.mark.parametrize("how", ["trial", "no-trial", "cudagraphs", "slow-kernel"])
def test_launch_bound_site_fused_for_the_trial_or_left_to_inductor(monkeypatch, how):
    """`tuned_unfused_reason` on a site whose op alone is slower per call than the unfused
    path (host time included) though its kernel is faster: fused and noted for the run-time
    trial when the trial is on and the kernel's GPU time is under its bound, else left to
    Inductor with the reason; under CUDA graphs host time is not weighed at all."""
    import types

    import fusion_backend.patterns._common as common
    from fusion_backend import autotune

    kernel_ms = 2.0 if how == "slow-kernel" else 0.02
    monkeypatch.setattr(autotune.TUNER, "lookup", lambda key: autotune.Choice({"BLOCK_M": 64}, "tuned", kernel_ms,
                                                                              kernel_ms + 0.001))

    def call_op():
        return None

    def call_unfused():
        return None

    monkeypatch.setattr(common, "per_call_ms", lambda fn: 0.2 if fn is call_op else 0.1)
    opts = _options(trial=how != "no-trial", **({"mode": "reduce-overhead"} if how == "cudagraphs" else {}))
    ctx = types.SimpleNamespace(tunes_at_compile_time=True, options=opts, launch_bound={}, trial_configs={})
    reason = common.tuned_unfused_reason(ctx, "k1", call_op, call_unfused)
    if how == "trial":
        assert reason is None and "launch-bound" in ctx.launch_bound["k1"]
    elif how == "cudagraphs":
        assert reason is None and not ctx.launch_bound
    else:
        assert "launch-bound" in reason and "left to Inductor" in reason and not ctx.launch_bound


@needs_interpreter
def test_launch_bound_note_reaches_the_report(monkeypatch):
    """A site fused although it looked launch-bound alone carries the note in its report
    (explain() prints it), which is what gives its graph the run-time trial."""
    import fusion_backend.patterns.linear_bn_gelu_relu as lbgr

    def launch_bound(ctx, key, call_op, call_unfused, static_shapes=False):
        ctx.launch_bound[key] = "launch-bound here: fused op 0.2 ms/call vs unfused 0.1 ms/call"
        return None

    monkeypatch.setattr(lbgr, "tuned_unfused_reason", launch_bound)
    with torch.no_grad():
        report = fusion_backend.explain(randomize(Block(24, 20)).eval(), torch.randn(37, 24))
    (site,) = report.fused
    assert site.info["launch_bound"].startswith("launch-bound here") and "launch_bound=" in str(report)


# ----------------------------------------------------------------------------- ties go to the trial

class _TieCtx:
    """What `_fuse_for_the_trial` reads of the backend's RewriteContext."""

    def __init__(self, **options):
        from conftest import profile_named
        from fusion_backend.options import Options

        self.profile, self.tunes_at_compile_time = profile_named("h100-sxm"), True
        self.options, self.launch_bound, self.trial_configs = Options.parse(None, options), {}, {}


POINTER = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)


@pytest.mark.parametrize("case", ["tie", "tie_fused_slower", "tie_host_bound", "fused_slower", "trial_off", "inline_off", "tma", "not_small", "dynamic"])
def test_a_tie_is_fused_for_the_trial_only_where_it_launches_inline(case):
    """A site whose best fused config tied with the unfused path (inside the tuner's margin,
    either way, or both under `_common.HOST_BOUND_MS`) is fused where the trial will settle it
    and the kernel launches inline; the fused choice is recorded and the site noted for the
    trial, for this compile only. Anything else stays unfused."""
    from fusion_backend import autotune
    from fusion_backend.patterns._common import _fuse_for_the_trial

    fused, unfused = {"tie_fused_slower": (0.210, 0.207), "tie_host_bound": (0.0196, 0.0179),
                      "fused_slower": (0.214, 0.207),
                      "not_small": (1.5, 1.52)}.get(case, (0.0203, 0.0207))
    runner_up = dict(POINTER, TMA=True) if case == "tma" else POINTER
    key = f"test-tie:{case}"
    choice = autotune.Choice(None, "tuned", fused, unfused, runner_up=runner_up)
    autotune.TUNER.record(key, choice)
    ctx = _TieCtx(trial=case != "trial_off", inline=case != "inline_off")
    try:
        fused_now = _fuse_for_the_trial(ctx, key, choice, static_shapes=case != "dynamic")
        after = autotune.TUNER.lookup(key)
    finally:
        autotune.TUNER.choices.pop(key, None)
    assert fused_now == case.startswith("tie")
    # the tuner keeps its verdict (a later compile without the trial must not fuse the site)
    assert after is choice and after.config is None
    if case.startswith("tie"):
        assert ctx.trial_configs == {key: runner_up}
        assert ("host-bound" if case == "tie_host_bound" else "a tie") in ctx.launch_bound[key]
        assert "for the run-time trial to settle" in ctx.launch_bound[key]
    else:
        assert not ctx.trial_configs and not ctx.launch_bound


def test_a_site_whose_fused_configs_all_failed_says_so():
    """A key whose every fused config failed to compile or launch: the reason says that (it
    said "unfused path is faster here" without a fused time ever measured)."""
    from fusion_backend import autotune
    from fusion_backend.patterns._common import tuned_unfused_reason

    key = "test-all-failed"
    autotune.TUNER.record(key, autotune.Choice(None, "tuned", None, 0.5))
    try:
        why = tuned_unfused_reason(_TieCtx(), key, lambda: None, lambda: None)
    finally:
        autotune.TUNER.choices.pop(key, None)
    assert why.startswith("every fused config failed to compile or launch here") and "faster" not in why


# ----------------------------------------------------------------------------- sites needing a backward

@needs_interpreter
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_tuned_site_needing_a_backward(monkeypatch, grad, train):
    """Where sites are tuned at compile time (a GPU), a Linear+BN+GELU+ReLU site whose backward
    will run (grad on, parameters requiring grad) keeps the Linear's output for the backward
    (no GEMM to recompute there: H100, recomputing it made an eval-mode step 20% slower than
    Inductor's): in training the train op's `keep_y`, in eval mode the eval keep_y op; the
    site goes on to the timing (faked here as a win), as it does without grad. Outputs and
    gradients match eager either way."""
    import fusion_backend.patterns.linear_bn_gelu_relu as lbgr

    monkeypatch.setattr(backend.RewriteContext, "tunes_at_compile_time", property(lambda self: True))
    monkeypatch.setattr(lbgr, "tuned_unfused_reason", lambda ctx, key, call_op, call_unfused, static_shapes=False: None)
    model = randomize(Block(24, 20)).train(train)
    eager, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    graphs = []
    monkeypatch.setattr(backend, "_report_sinks", [graphs])
    gms = []
    inductor = backend._inductor
    monkeypatch.setattr(backend, "_inductor", lambda gm, ex, opts: gms.append(gm) or inductor(gm, ex, opts))
    x = torch.randn(37, 24)
    with torch.set_grad_enabled(grad):
        out = torch.compile(model, backend="fusedtriton")(x)
        want, want64 = eager(x), ref(x.double())
    assert_matches(out, want, want64)
    if train:
        for name in ("running_mean", "running_var"):
            torch.testing.assert_close(getattr(model.bn, name), getattr(eager.bn, name), **stats_close(torch.float32))
    (report,) = graphs
    assert fusion_backend.counters[LBGR] == 1
    ops = [str(n.target) for gm in gms for n in gm.graph.nodes if "linear_bn_gelu_relu" in str(n.target)]
    if not train:
        assert ops == ["fusedtriton.linear_bn_gelu_relu_eval_keep_y.default" if grad
                       else "fusedtriton.linear_bn_gelu_relu_eval_inference.default"]  # no autograd kernel
    if train:
        (call,) = [n for gm in gms for n in gm.graph.nodes if "linear_bn_gelu_relu_train" in str(n.target)]
        assert call.args[-1] is grad  # keep_y: the Linear's output kept where a backward will run
    if grad:
        dy = torch.randn_like(want)
        (out * dy).sum().backward()
        (want * dy).sum().backward()
        (want64 * dy.double()).sum().backward()
        for (name, p), q, r in zip(model.named_parameters(), eager.parameters(), ref.parameters()):
            # (the Linear bias's exact gradient is 0 in front of a training-mode BatchNorm)
            scale = dy.abs().max().item() if train and name == "lin.bias" else None
            torch.testing.assert_close(p.grad, q.grad, **grad_close(r.grad, scale), msg=lambda m: f"{name}: {m}")


def test_trial_calls_from_two_threads():
    """Two threads calling an undecided trial take turns: every call gets an answer, the
    decision is made once (an empty span list once raised StatisticsError into a call)."""
    import threading
    import time

    class SlowReadyClock(FakeClock):
        def ready(self, span):
            time.sleep(0.002)  # a thread switch while one thread decides
            return True

    fused, unfused, calls = _graphs()
    decided, errors, answers = [], [], []
    t = trial.GraphTrial(fused, unfused, lambda *a: decided.append(a), clock=SlowReadyClock())

    def worker():
        try:
            for _ in range(40):
                answers.append(t(()))
        except Exception as exc:  # noqa: BLE001  (any exception is the failure under test)
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and len(answers) == 80 and len(decided) == 1
    assert set(answers[-10:]) == {"F"}  # the fused graph, faster on this clock, from then on


def test_cuda_clock_times_the_graphs_device():
    """The trial's events go on the current stream of the graph's GPU (a model on cuda:1 with
    cuda:0 current ran under Inductor's device guard, while the events timed cuda:0's stream)."""
    used = []

    class Stream:
        def __init__(self, device):
            self.device = device

        def synchronize(self):
            used.append(("sync", self.device))

    class TimingEvent:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self, stream):
            used.append(("record", stream.device))

    class FakeCuda:
        Event = TimingEvent

        @staticmethod
        def current_stream(device=None):
            return Stream(device)

    clock = trial.CudaClock(torch.device("cuda", 1))
    clock._torch = type("FakeTorch", (), {"cuda": FakeCuda})
    clock.stop(clock.start())
    assert used == [("sync", torch.device("cuda", 1)), ("record", torch.device("cuda", 1)),
                    ("record", torch.device("cuda", 1))]


def test_compile_time_work_runs_under_the_graphs_device_guard():
    guard = backend._on_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(backend._on_device(torch.device("cpu")), torch.cuda.device)
