"""Host-side launch plumbing of the opaque ops.

- The TMA descriptor cache (`_common.cached_descriptor`): one descriptor per address, shape,
  strides, dtype and tile, holding no tensor alive. On the CPU the launchers build descriptors
  uncached (the interpreter needs the tensor), so these tests switch the cache on for CPU
  tensors; the GPU tests launch the TMA and Gluon kernels through it.
- The replay of a fused launch as a CUDA graph (`_common.replay_launch`): its bookkeeping here,
  with a stand-in graph that records the launch and runs it at replay; the real capture in
  `tests/test_gpu.py::test_replayed_launch_gpu`."""
import gc
import weakref

import pytest
import torch

from fusion_backend.patterns import _common

_real_capture = _common._capture


@pytest.fixture
def cache_on_cpu(monkeypatch):
    monkeypatch.setattr(_common, "_cacheable", lambda t: True)
    monkeypatch.setattr(_common, "_DESCRIPTORS", {})
    return _common._DESCRIPTORS


def _makers():
    makers = [_common._make_descriptor]
    try:
        from fusion_backend.patterns import _cell_gluon
    except ImportError:
        return makers
    return makers + [_cell_gluon._make_descriptor]


@pytest.mark.parametrize("make", _makers(), ids=lambda m: m.__module__.rsplit(".", 1)[-1])
def test_descriptor_reused_per_address_and_layout(cache_on_cpu, make):
    w = torch.randn(64, 96)
    d = _common.cached_descriptor(make, w, 32, 16)
    assert _common.cached_descriptor(make, w, 32, 16) is d
    assert list(d.shape) == [64, 96] and list(d.strides) == [96, 1] and list(d.block_shape) == [32, 16]
    assert d.base.data_ptr() == w.data_ptr() and d.base.dtype == torch.float32
    # the same storage seen through another shape, offset or tile is another descriptor
    right = w[:, 32:]
    other = [_common.cached_descriptor(make, right, 32, 16), _common.cached_descriptor(make, w[:32], 32, 16),
             _common.cached_descriptor(make, w, 16, 16)]
    assert len({id(d), *map(id, other)}) == 4
    assert other[0].base.data_ptr() == right.data_ptr() and list(other[0].shape) == [64, 64]
    assert list(other[0].strides) == [96, 1]
    assert list(other[1].shape) == [32, 96] and list(other[2].block_shape) == [16, 16]
    # a tensor of another dtype at the same address is not served the fp32 descriptor
    as_half = w.view(torch.bfloat16)
    half = _common.cached_descriptor(make, as_half, 32, 16)
    assert half.base.dtype == torch.bfloat16 and list(half.shape) == [64, 192]


def test_cached_descriptor_keeps_no_tensor_alive(cache_on_cpu):
    t = torch.randn(32, 32)
    alive = weakref.ref(t)
    _common.cached_descriptor(_common._make_descriptor, t[:, :16], 16, 16)
    del t
    gc.collect()
    assert alive() is None and len(cache_on_cpu) == 1


def test_descriptor_cache_is_bounded(cache_on_cpu, monkeypatch):
    monkeypatch.setattr(_common, "DESCRIPTOR_CACHE_SIZE", 3)
    keep = [torch.randn(16, 16) for _ in range(7)]
    for t in keep:
        _common.cached_descriptor(_common._make_descriptor, t, 16, 16)
        assert len(cache_on_cpu) <= 3


def test_cpu_tensors_get_a_fresh_descriptor_on_the_tensor():
    t = torch.randn(16, 16)
    d = _common.descriptor(t, 16, 16)
    assert d.base is t and _common.descriptor(t, 16, 16) is not d


# ----------------------------------------------------------------------------- graph replay

class _RecordedGraph:
    """Stands in for a captured CUDA graph: the launch it recorded, run again at replay."""

    def __init__(self, replay):
        self.replay = replay


class _Stream:
    cuda_stream = 0

    def __init__(self):
        self.waits = 0

    def synchronize(self):
        self.waits += 1


class _Captures(list):
    """The launches captured, and the stand-in stream they replay on."""
    stream = None


@pytest.fixture
def fake_graphs(monkeypatch):
    for name, empty in (("_REPLAYS", {}), ("_SEEN", {}), ("_DROPS", {}), ("_DIRECT", {})):
        monkeypatch.setattr(_common, name, empty)
    monkeypatch.setattr(_common, "_replayable", lambda out: True)
    stream = _Stream()
    monkeypatch.setattr(_common, "_stream", lambda device: stream)
    captured = _Captures()

    def capture(r, kwargs, stream):
        inputs, out = _common._graph_buffers(r)  # the real capture's buffers
        captured.append(r)
        return _common._Captured(kwargs, _RecordedGraph(lambda: r.launch(inputs, out, kwargs)), inputs, out, stream)

    monkeypatch.setattr(_common, "_capture", capture)
    captured.stream = stream
    return captured


def _linear_replay(x, w, calls):
    """A Replay of out = x @ w.T + kwargs['shift'], logging each launch (direct or recorded)."""
    out = torch.empty(x.shape[0], w.shape[0])

    def launch(ins, o, kw):
        calls.append("launch")
        return torch.add(ins[0] @ w.t(), kw["shift"], out=o)

    return _common.Replay([x], out, (w,), launch), lambda kw: launch([x], out, kw)


def _call(w, kwargs, calls, m=3, x=None):
    x = torch.randn(m, w.shape[1]) if x is None else x
    r, run_fused = _linear_replay(x, w, calls)
    got = _common.replay_launch("k", r, kwargs, run_fused)
    assert got is r.out
    torch.testing.assert_close(got, x @ w.t() + kwargs["shift"])
    return got


def test_replay_launches_directly_once_then_replays(fake_graphs):
    w, kwargs, calls = torch.randn(5, 7), {"shift": 0.5}, []
    for step in range(4):
        _call(w, kwargs, calls)  # fresh activations every call, as in a model
        assert len(fake_graphs) == (0 if step == 0 else 1)  # captured at the second call
    # the weight is read where it is: changed in place, the replay sees the new values
    w.mul_(2)
    _call(w, kwargs, calls)
    assert len(fake_graphs) == 1


def test_replay_key_covers_weights_config_and_shapes(fake_graphs):
    w, calls = torch.randn(5, 7), []
    kwargs = {"shift": 0.0}
    for weight, kw, m in [(w, kwargs, 3)] * 2 + [
            (w.clone(), kwargs, 3),        # another weight tensor (address)
            (w, {"shift": 0.0}, 3),        # another config object
            (w, kwargs, 4)]:               # another batch size
        _call(weight, kw, calls, m)
    assert len(fake_graphs) == 1 and len(_common._REPLAYS) == 1 and len(_common._SEEN) == 4


def test_replay_skips_inputs_laid_out_otherwise(fake_graphs):
    w, kwargs, calls = torch.randn(5, 7), {"shift": 1.0}, []
    wide = torch.randn(3, 14)
    flat = torch.randn(3 * 7 + 1)
    row = torch.randn(4, 9)[1:2, :7]  # one row of a wider tensor: is_contiguous(), row stride 9
    assert row.is_contiguous()
    for x in (wide[:, ::2], flat[1:].view(3, 7), row):  # strided; contiguous but 4 bytes off; a row
        for _ in range(3):
            _call(w, kwargs, calls, x=x)
    assert not fake_graphs and not _common._REPLAYS and not _common._SEEN


def test_failed_capture_launches_directly_from_then_on(fake_graphs, monkeypatch):
    monkeypatch.setattr(_common, "_capture", lambda r, kwargs, stream: None)
    w, kwargs, calls = torch.randn(5, 7), {"shift": 0.0}, []
    for _ in range(4):
        _call(w, kwargs, calls)
    assert calls == ["launch"] * 4 and len(_common._DIRECT) == 1


def test_failed_replay_launches_directly_from_then_on(fake_graphs):
    """A replay that raises (here: the graph's buffers are inference tensors, copied into
    outside inference mode) does not pin the site to the unfused path: launched directly."""
    w, kwargs, calls = torch.randn(5, 7), {"shift": 0.0}, []
    _call(w, kwargs, calls)
    _call(w, kwargs, calls)
    entry = next(iter(_common._REPLAYS.values()))
    with torch.inference_mode():
        entry.inputs[0] = torch.empty_like(entry.inputs[0])
    _call(w, kwargs, calls)
    _call(w, kwargs, calls)
    assert not _common._REPLAYS and len(_common._DIRECT) == 1


def test_graph_captured_under_inference_mode_replays_outside_it(fake_graphs):
    w, kwargs, calls = torch.randn(5, 7), {"shift": 0.25}, []
    with torch.inference_mode():
        _call(w, kwargs, calls)
        _call(w, kwargs, calls)
    with torch.no_grad():
        _call(w, kwargs, calls)
    _call(w, kwargs, calls)
    assert len(fake_graphs) == 1 and not _common._DIRECT


def test_replay_cache_keeps_the_recently_used_and_stops_thrashing(fake_graphs, monkeypatch):
    monkeypatch.setattr(_common, "REPLAY_CACHE_SIZE", 2)
    weights, kwargs, calls = [torch.randn(5, 7) for _ in range(3)], {"shift": 0.0}, []
    # two sites, each called often, and a third called once in between: seen-once keys and a
    # hit never push out the graphs in use
    for _ in range(3):
        _call(weights[0], kwargs, calls)
        _call(weights[1], kwargs, calls)
    _call(weights[2], kwargs, calls)
    _call(weights[0], kwargs, calls)
    assert len(fake_graphs) == 2 and fake_graphs.stream.waits == 0
    # three sites in turn through two slots: each is dropped (after a wait for its stream) and
    # captured again until REPLAY_MAX_DROPS, then launched directly
    for _ in range(6):
        for w in weights:
            _call(w, kwargs, calls)
    assert len(_common._REPLAYS) <= 2 and len(_common._DIRECT) >= 1
    captures = len(fake_graphs)
    for _ in range(4):
        for w in weights:
            _call(w, kwargs, calls)
    assert len(fake_graphs) == captures  # settled: no more captures
    assert fake_graphs.stream.waits == sum(drops for drops, _ in _common._DROPS.values())


def test_no_replays_region_and_release(fake_graphs, monkeypatch):
    w, kwargs, calls = torch.randn(5, 7), {"shift": 0.0}, []
    with _common.no_replays():
        for _ in range(3):
            _call(w, kwargs, calls)
    assert not fake_graphs and not _common._SEEN
    _call(w, kwargs, calls)
    _call(w, kwargs, calls)
    assert len(_common._REPLAYS) == 1
    import fusion_backend

    fusion_backend.release_graphs()
    # each graph's own stream waited for (whichever device it is on), then all forgotten
    assert not _common._REPLAYS and not _common._SEEN and fake_graphs.stream.waits == 1


def test_replay_off_on_the_cpu():
    """Without the fakes: CPU tensors are launched directly, nothing is remembered."""
    w, kwargs, calls = torch.randn(5, 7), {"shift": 0.0}, []
    before = (dict(_common._REPLAYS), dict(_common._SEEN))
    for _ in range(3):
        _call(w, kwargs, calls)
    assert (_common._REPLAYS, _common._SEEN) == before and calls == ["launch"] * 3


@pytest.mark.parametrize("fused_ms,replayed", [(0.2, True), (None, True), (2.5, False)])
def test_launch_replays_only_short_fused_kernels(monkeypatch, fused_ms, replayed):
    """`_common.launch` hands a fused launch to the replay only under the trial's 1 ms: a longer
    kernel is not bound by host time, and the replay's copies would cost it GPU time."""
    from fusion_backend import autotune, trial

    assert trial.TRIAL_BELOW_MS == 1.0  # the parameters straddle it
    key = f"test_replay|{fused_ms}"
    monkeypatch.setitem(autotune.TUNER.choices, key, autotune.Choice({"BLOCK_M": 16}, "tuned", fused_ms, 1.0,
                                                                      kwargs={"BLOCK_M": 16}))
    seen = []
    monkeypatch.setattr(_common, "replay_launch", lambda k, r, kw, run: seen.append(k) or run(kw))
    direct = []
    out = _common.launch(key, ctx_args=(None, False, 0.0, torch.device("cpu")), space=list, m=1,
                         run_fused=lambda kw: direct.append(kw) or "fused", run_unfused=lambda: "unfused",
                         run_reference=lambda: "reference", src_hash="",
                         replay=_common.Replay([], torch.empty(0), (), None))
    assert out == "fused" and direct == [{"BLOCK_M": 16}]
    assert seen == ([key] if replayed else [])


def test_capture_that_cannot_allocate_launches_directly(fake_graphs, monkeypatch):
    """Out of memory for the graph's buffers: the site launches directly (fused), it is not
    handed to `launch`'s unfused fallback."""
    def no_memory(r):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(_common, "_capture", _real_capture)
    monkeypatch.setattr(_common, "_graph_buffers", no_memory)
    w, kwargs, calls = torch.randn(5, 7), {"shift": 0.0}, []
    for _ in range(3):
        _call(w, kwargs, calls)
    assert calls == ["launch"] * 3 and len(_common._DIRECT) == 1


def test_a_graph_that_paid_for_itself_is_captured_again(fake_graphs, monkeypatch):
    """Dropped after REPLAY_USEFUL replays, a site's graph leaves no mark: a hot site pushed out
    in two bursts far apart is captured again, not launched directly for good."""
    monkeypatch.setattr(_common, "REPLAY_CACHE_SIZE", 2)
    hot, kwargs, calls = torch.randn(5, 7), {"shift": 0.0}, []
    for burst in range(3):
        for _ in range(_common.REPLAY_USEFUL + 2):
            _call(hot, kwargs, calls)
        for _ in range(2):  # two other sites, each captured: the hot one is dropped
            other = torch.randn(5, 7)
            _call(other, kwargs, calls)
            _call(other, kwargs, calls)
    def of_hot(table):
        return [k for k in table if k[-1][0][0] == hot.data_ptr()]  # the key's weight address

    assert not _common._DIRECT and _common._DROPS and not of_hot(_common._DROPS)
    _call(hot, kwargs, calls)
    _call(hot, kwargs, calls)
    assert len(fake_graphs) == 4 + 2 * 3 and of_hot(_common._REPLAYS)  # the hot site: a capture a burst, and now


def test_tables_hold_the_config_their_key_names_by_id(fake_graphs):
    """Keys carry id(kwargs): the tables keep that dict alive, so a later config dict cannot
    take its id and inherit its state (seen once, launched directly)."""
    class Config(dict):
        pass

    w, calls = torch.randn(5, 7), []
    kwargs = Config(shift=0.0)
    alive = weakref.ref(kwargs)
    _call(w, kwargs, calls)
    del kwargs
    gc.collect()
    assert alive() is not None and alive() in _common._SEEN.values()


def test_launch_memoizes_the_kwargs_of_a_recorded_choice():
    """A choice recorded without its launch kwargs (e.g. by `Tuner.record` outside `launch`):
    the kwargs are built once and kept on it, so the replay key (which holds their id) is the
    same at every call (a fresh dict each call never replayed and filled the seen-keys table)."""
    import fusion_backend.patterns._common as common
    from fusion_backend import autotune, devices

    config = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 4, "num_warps": 1, "num_stages": 1}
    key = "test|launch-memo"
    autotune.TUNER.record(key, autotune.Choice(config, "tuned", 0.1, 0.2))
    seen = []
    for _ in range(2):
        common.launch(key, ctx_args=(devices.INTERPRETER, True, 1.0, torch.device("cpu")), space=lambda: [config],
                      m=16, run_fused=lambda kwargs: seen.append(kwargs), run_unfused=None, run_reference=None,
                      src_hash="x")
    assert len(seen) == 2 and seen[0] is seen[1] and autotune.TUNER.lookup(key).kwargs is seen[0]


def test_a_launch_that_runs_replayed_is_tuned_by_gpu_time(tmp_path, monkeypatch):
    """The cell ops' launches that run as CUDA graph replays are tuned by GPU time alone
    (`autotune.gpu_time`): do_bench counted Triton's host launch path, which the replay
    removes. Inside `no_replays()` (a reduce-overhead graph's warm-up) and without a replay,
    the tuner's own timer."""
    import dataclasses

    from fusion_backend import autotune, devices
    from fusion_backend.autotune import Tuner

    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path))
    profile = dataclasses.replace(devices.INTERPRETER, name="a GPU's")  # (the interpreter's times nothing)
    space = [{"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 2},
             {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 2}]
    timers = []
    monkeypatch.setattr(autotune, "gpu_time", lambda fn: timers.append("gpu_time") or 1.0)
    monkeypatch.setattr(autotune, "TUNER", Tuner(timer=lambda fn: timers.append("own") or 1.0))
    monkeypatch.setattr(_common, "_replayable", lambda out: True)
    monkeypatch.setattr(_common, "replay_launch", lambda key, r, kw, run: run(kw))

    def launch(key, replay):
        return _common.launch(key, ctx_args=(profile, True, 30.0, torch.device("cpu")), space=lambda: space, m=8,
                              run_fused=lambda kw: None, run_unfused=lambda: None, run_reference=lambda: None,
                              src_hash="s", replay=replay)

    replay = _common.Replay([torch.zeros(1)], torch.zeros(1), (), None)
    launch("replayed", replay)
    assert timers and set(timers) == {"gpu_time"}
    timers.clear()
    with _common.no_replays():
        launch("inside no_replays", replay)
    launch("no replay", None)
    assert timers and set(timers) == {"own"}
