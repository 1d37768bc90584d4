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


@pytest.fixture
def fake_graphs(monkeypatch):
    monkeypatch.setattr(_common, "_REPLAYS", {})
    monkeypatch.setattr(_common, "_replayable", lambda out: True)
    monkeypatch.setattr(_common, "_stream", lambda device: 0)
    captured = []

    def capture(entry, r):
        inputs, out = [torch.empty_like(t) for t in r.inputs], torch.empty_like(r.out)
        entry.graph = _RecordedGraph(lambda: r.launch(inputs, out, entry.kwargs))
        entry.inputs, entry.out = inputs, out
        captured.append(entry)
        return True

    monkeypatch.setattr(_common, "_capture", capture)
    return captured


def _linear_replay(x, w, calls):
    """A Replay of out = x @ w.T + kwargs['shift'], logging each launch (direct or recorded)."""
    out = torch.empty(x.shape[0], w.shape[0])

    def launch(ins, o, kw):
        calls.append("launch")
        return torch.add(ins[0] @ w.t(), kw["shift"], out=o)

    return _common.Replay([x], out, (w,), launch), lambda kw: launch([x], out, kw)


def test_replay_launches_directly_once_then_replays(fake_graphs):
    w, kwargs, calls = torch.randn(5, 7), {"shift": 0.5}, []
    results = []
    for step in range(4):
        x = torch.randn(3, 7)  # fresh activations every call, as in a model
        r, run_fused = _linear_replay(x, w, calls)
        got = _common.replay_launch("k", r, kwargs, run_fused)
        assert got is r.out
        results.append((got.clone(), x @ w.t() + 0.5))
        assert len(fake_graphs) == (0 if step == 0 else 1)  # captured at the second call
    for got, want in results:
        torch.testing.assert_close(got, want)
    # the weight is read where it is: changed in place, the replay sees the new values
    w.mul_(2)
    x = torch.randn(3, 7)
    r, run_fused = _linear_replay(x, w, calls)
    torch.testing.assert_close(_common.replay_launch("k", r, kwargs, run_fused), x @ w.t() + 0.5)
    assert len(fake_graphs) == 1


def test_replay_key_covers_weights_config_and_shapes(fake_graphs):
    w, calls = torch.randn(5, 7), []
    kwargs = {"shift": 0.0}
    for x, weight, kw in [(torch.randn(3, 7), w, kwargs)] * 2 + [
            (torch.randn(3, 7), w.clone(), kwargs),        # another weight tensor (address)
            (torch.randn(3, 7), w, {"shift": 0.0}),        # another config object
            (torch.randn(4, 7), w, kwargs)]:               # another batch size
        r, run_fused = _linear_replay(x, weight, calls)
        torch.testing.assert_close(_common.replay_launch("k", r, kw, run_fused), x @ weight.t())
    assert len(fake_graphs) == 1 and len(_common._REPLAYS) == 4


def test_replay_skips_strided_and_unaligned_inputs(fake_graphs):
    w, kwargs, calls = torch.randn(5, 7), {"shift": 1.0}, []
    wide = torch.randn(3, 14)
    flat = torch.randn(3 * 7 + 1)
    for x in (wide[:, ::2], flat[1:].view(3, 7)):  # not contiguous; contiguous but 4 bytes off
        for _ in range(3):
            r, run_fused = _linear_replay(x, w, calls)
            torch.testing.assert_close(_common.replay_launch("k", r, kwargs, run_fused), x @ w.t() + 1.0)
    assert not fake_graphs and not _common._REPLAYS


def test_failed_capture_launches_directly_from_then_on(fake_graphs, monkeypatch):
    def failing(entry, r):
        entry.graph = False
        return False

    monkeypatch.setattr(_common, "_capture", failing)
    w, kwargs, calls = torch.randn(5, 7), {"shift": 0.0}, []
    for _ in range(4):
        x = torch.randn(3, 7)
        r, run_fused = _linear_replay(x, w, calls)
        torch.testing.assert_close(_common.replay_launch("k", r, kwargs, run_fused), x @ w.t())
    assert calls == ["launch"] * 4


def test_replay_cache_is_bounded(fake_graphs, monkeypatch):
    monkeypatch.setattr(_common, "REPLAY_CACHE_SIZE", 2)
    waits = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: waits.append(a))
    w, kwargs, calls = torch.randn(5, 7), {"shift": 0.0}, []
    for m in range(1, 6):
        for _ in range(2):  # seen, then captured
            x = torch.randn(m, 7)
            r, run_fused = _linear_replay(x, w, calls)
            torch.testing.assert_close(_common.replay_launch("k", r, kwargs, run_fused), x @ w.t())
        assert len(_common._REPLAYS) <= 2
    # a captured graph is dropped only once no replay of it can be in flight
    assert len(fake_graphs) == 5 and len(waits) == 3


def test_replay_off_on_the_cpu():
    """Without the fakes: CPU tensors are launched directly, nothing is remembered."""
    w, kwargs, calls = torch.randn(5, 7), {"shift": 0.0}, []
    before = dict(_common._REPLAYS)
    for _ in range(3):
        r, run_fused = _linear_replay(torch.randn(3, 7), w, calls)
        _common.replay_launch("k", r, kwargs, run_fused)
    assert _common._REPLAYS == before and calls == ["launch"] * 3


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
