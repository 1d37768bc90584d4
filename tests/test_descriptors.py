"""The TMA descriptor cache (`_common.cached_descriptor`): one descriptor per address, shape,
strides, dtype and tile, holding no tensor alive. On the CPU the launchers build descriptors
uncached (the interpreter needs the tensor), so these tests switch the cache on for CPU tensors;
the GPU tests launch the TMA and Gluon kernels through it."""
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
