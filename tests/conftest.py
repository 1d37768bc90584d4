"""Shared test setup.

TRITON_INTERPRET must be in the environment before triton is imported (torch._dynamo imports
triton, and `import fusion_backend` imports torch._dynamo), so it is set before anything else.
"""
import atexit
import os
import shutil
import tempfile

# Inductor's on-disk caches (the FX graph and AOT autograd caches) reuse a compiled joint graph
# across processes even after the Python backward of a fused op changed: a broken backward passed
# its gradient tests with a warm cache. Each test session compiles into its own folder.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fusedtriton-tests-inductor-")
atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import torch  # noqa: E402  (plain `import torch` does not import triton)

# No GPU: the kernels run under Triton's interpreter (the "interpreter" profile). With a GPU
# they must run compiled, so the variable is left alone there.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import fusion_backend  # noqa: E402
from fusion_backend import autotune  # noqa: E402

#: Marks a test that needs a real CUDA/ROCm device (the kernels then run compiled, not interpreted).
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm GPU")


# ----------------------------------------------------------------------------- numerics

# rel_err lives with the tolerances (tests/tolerances.py); re-exported here and as a fixture.
from tolerances import rel_err  # noqa: E402,F401


@pytest.fixture(name="rel_err")
def _rel_err_fixture():
    return rel_err


# ----------------------------------------------------------------------------- device property sets

def devices_dir():
    """$FUSEDTRITON_DEVICES_DIR where it names a folder (it was ignored where ../shared/devices
    exists), else ../shared/devices next to the checkout; None when neither exists."""
    env = os.environ.get("FUSEDTRITON_DEVICES_DIR")
    if env and Path(env).is_dir():
        return Path(env)
    here = Path(__file__).resolve().parents[2] / "shared" / "devices"
    return here if here.is_dir() else None


def device_files():
    d = devices_dir()
    return sorted(d.glob("*.json")) if d is not None else []


def load_props(path) -> dict:
    with open(path) as f:
        return json.load(f)


def props_named(stem) -> dict:
    """The property set ../shared/devices/<stem>.json; skips the test when it is not there."""
    for path in device_files():
        if path.stem == stem:
            return load_props(path)
    pytest.skip(f"device property set {stem}.json not found")


def profile_named(stem):
    """fusion_backend's profile for ../shared/devices/<stem>.json (skips when absent)."""
    from fusion_backend.devices import from_properties

    props = props_named(stem)
    return from_properties(props, is_hip=props.get("is_hip"))


def device_params():
    """One pytest.param per device JSON (id = file stem), or one skipped param when there are none."""
    files = device_files()
    if not files:
        return [pytest.param(None, marks=pytest.mark.skip(
            reason="no device property sets: ../shared/devices is absent and FUSEDTRITON_DEVICES_DIR unset"))]
    return [pytest.param(p, id=p.stem) for p in files]


# ----------------------------------------------------------------------------- models

def randomize_batch_norm(model, seed=0):
    """Non-trivial affine parameters and running statistics for every BatchNorm1d of `model`
    (fresh ones are the identity in eval: mean 0, var 1, weight 1, bias 0, which would hide an
    epilogue that drops a term). Returns the model."""
    import torch.nn as nn

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm1d):
                if mod.weight is not None:
                    mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.3)
                if mod.running_mean is not None:
                    mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g) * 0.5)
                    mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) * 1.5 + 0.5)
    return model


# ----------------------------------------------------------------------------- fixtures

def kernel_failures() -> list:
    """Fused kernels that failed in this test and were replaced by torch ops: a launch that
    raised (the key pinned to the reference computation), a tuning in which every fused config
    failed, a recurrence launch that failed. The results then come from torch, so a test
    checking numbers and counters alone would pass with the kernel broken."""
    from fusion_backend.patterns import rnn_sequence

    failed = []
    for key, choice in autotune.TUNER.choices.items():
        if choice.source == "fallback":
            failed.append(f"{key}: the fused kernel raised at launch; torch ops ran instead")
    if autotune.stats.get("fused_all_failed"):
        failed.append(f"{autotune.stats['fused_all_failed']} tuning(s) in which every fused config failed")
    failed += [f"recurrence {key}: {exc!r}" for key, exc in rnn_sequence._failed.items()]
    return failed


@pytest.fixture(autouse=True)
def _fresh_backend_state(request, monkeypatch, tmp_path_factory):
    """Each test starts with no Dynamo caches, zero counters, an empty in-memory tuner, and an
    autotune disk cache outside the user's home (tests that inspect it use `tmp_cache`); it
    fails where a fused kernel failed and torch ops stood in (`kernel_failures`), unless
    marked `kernel_failure_expected`."""
    from fusion_backend.patterns import rnn_sequence

    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "fusedtriton-cache"))
    torch._dynamo.reset()
    fusion_backend.counters.clear()
    autotune.TUNER.forget()
    autotune.stats.clear()
    rnn_sequence._failed.clear()
    yield
    failed = kernel_failures()
    rnn_sequence._failed.clear()
    if failed and request.node.get_closest_marker("kernel_failure_expected") is None:
        pytest.fail("fused kernel failure(s), torch ops stood in: " + "; ".join(failed))
    torch._dynamo.reset()
    fusion_backend.counters.clear()
    autotune.TUNER.forget()
    autotune.stats.clear()


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """A fresh, empty FUSEDTRITON_CACHE_DIR for this test; returns its path."""
    path = tmp_path / "autotune-cache"
    monkeypatch.setenv(autotune.CACHE_ENV, str(path))
    return path
