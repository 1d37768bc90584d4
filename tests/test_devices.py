"""Device detection: every property set in ../shared/devices maps to its expected profile."""
import dataclasses

import pytest
import torch

from conftest import device_params, load_props, profile_named, props_named, requires_gpu
from fusion_backend import devices
from fusion_backend.devices import INTERPRETER, from_properties

DEVICES = device_params()


def _profile(path):
    props = load_props(path)
    return props, from_properties(props, is_hip=props.get("is_hip"))


@pytest.mark.parametrize("path", DEVICES)
def test_expected_profile(path):
    props, profile = _profile(path)
    expected = props["expected_profile"]
    if expected == "none":
        assert profile is None, f"{path.name}: expected no profile, got {profile}"
    else:
        assert profile is not None, f"{path.name}: expected {expected}, got None"
        assert profile.name == expected


@pytest.mark.parametrize("path", DEVICES)
def test_profile_fields(path):
    props, profile = _profile(path)
    if profile is None:
        pytest.skip("no profile (plain Inductor) for this device")
    if str(props.get("gcnArchName", "")).startswith("gfx"):
        assert profile.vendor == "amd"
        assert profile.warp_size == 64
        assert profile.max_num_warps <= 16
        assert profile.arch == props["gcnArchName"].split(":")[0]
    else:
        assert profile.vendor == "nvidia"
        assert profile.warp_size == 32
        assert profile.arch == f"sm_{props['major']}{props['minor']}"
    assert profile.multiprocessors == props["multi_processor_count"]
    assert profile.smem_per_block == (props.get("shared_memory_per_block_optin") or props["shared_memory_per_block"])
    # whatever precision the profile picks, tl.dot must accept it there
    assert profile.fp32_highest in profile.dot_precisions
    assert profile.fp32_high in profile.dot_precisions
    for dtype in (torch.float16, torch.bfloat16):
        assert profile.dot_precision(dtype, "highest") == "ieee"
        assert profile.dot_precision(dtype, "high") == "ieee"


@pytest.mark.parametrize("stem, highest", [
    ("h100-sxm", "tf32x3"), ("a100-sxm", "tf32x3"), ("rtx4090", "ieee"), ("mi300x", "ieee"),
    ("mi300x-generic-name", "ieee"),
])
def test_fp32_dot_precision(stem, highest):
    profile = profile_named(stem)
    assert profile.dot_precision(torch.float32, "highest") == highest
    assert profile.dot_precision(torch.float32, "high") == "tf32"
    assert profile.dot_precision(torch.float32, "medium") == "tf32"
    assert profile.dot_precision(torch.float16, "highest") == "ieee"
    assert profile.dot_precision(torch.bfloat16, "high") == "ieee"


def test_dot_precision_follows_torch_setting():
    profile = profile_named("h100-sxm")
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert profile.dot_precision(torch.float32) == "tf32x3"
        torch.set_float32_matmul_precision("high")
        assert profile.dot_precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)


def test_cdna2_has_no_tf32():
    profile = profile_named("mi250x")
    assert profile.dot_precision(torch.float32, "high") == "ieee"
    assert "tf32" not in profile.dot_precisions


def test_mi300x_detected_by_arch_and_cus_not_name():
    props = props_named("mi300x")
    for name in ("AMD Instinct MI300X", "AMD Radeon Graphics", ""):
        assert from_properties(dict(props, name=name), is_hip=True).name == "mi300x"
    # gfx942 with 228 CUs is an MI300A: generic ROCm profile
    assert from_properties(dict(props, multi_processor_count=228), is_hip=True).name == "rocm"
    # RDNA (no matrix cores Triton targets here): Inductor alone
    assert from_properties(dict(props, gcnArchName="gfx1100"), is_hip=True) is None


def test_rtx4090_detected_by_capability_and_sms():
    profile = profile_named("rtx4090")
    assert profile.max_num_warps == 8
    assert profile.smem_per_block == 101376  # 99 KiB opt-in


def test_pre_ampere_has_no_profile():
    assert from_properties({"major": 7, "minor": 0, "multi_processor_count": 80}, is_hip=False) is None


def test_geforce_blackwell_highest_is_ieee():
    props = {"name": "NVIDIA GeForce RTX 5090", "major": 12, "minor": 0, "multi_processor_count": 170,
             "warp_size": 32, "shared_memory_per_block_optin": 101376}
    profile = from_properties(props, is_hip=False)
    assert profile is not None and profile.fp32_highest == "ieee"


def test_device_profile_cpu_follows_env(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert devices.interpreter_enabled()
    assert devices.device_profile("cpu") == INTERPRETER
    assert devices.device_profile(torch.device("cpu")) is INTERPRETER
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert devices.device_profile("cpu") is None
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not devices.interpreter_enabled()
    assert devices.device_profile("cpu") is None


@pytest.mark.parametrize("value, on", [("1", True), ("true", True), ("on", True), ("0", False), ("false", False),
                                       ("off", False), ("no", False), ("", False)])
def test_interpreter_env_read_as_triton_reads_it(monkeypatch, value, on):
    """TRITON_INTERPRET=false is off for Triton: it was on here, and CPU graphs were fused for
    kernels that could not launch."""
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert devices.interpreter_enabled() is on
    assert (devices.device_profile("cpu") is INTERPRETER) is on


def test_interpreter_profile_is_small_and_ieee():
    assert INTERPRETER.dot_precision(torch.float32, "highest") == "ieee"
    assert INTERPRETER.dot_precision(torch.float32, "high") == "ieee"
    assert dataclasses.asdict(INTERPRETER)["vendor"] == "interpreter"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_no_cuda_profile_without_gpu():
    assert devices.device_profile("cuda") is None
    assert devices.device_profile() in (INTERPRETER, None)


@requires_gpu
def test_live_gpu_profile_matches_its_properties():
    props = torch.cuda.get_device_properties(0)
    expected = from_properties(props, is_hip=torch.version.hip is not None)
    assert devices.device_profile("cuda:0") == expected
    assert devices.device_profile() == expected


def test_tuning_id_tells_generic_gpus_apart():
    """Generic profiles cover GPUs with other limits: their tuning keys differ (an A100's
    tuned tile, 147 KB of shared memory, was served to an RTX 3090 with 101 KB in the same
    process); named profiles are one device each and keep their name."""
    from conftest import profile_named

    a100, rtx3090, h100 = (profile_named(s) for s in ("a100-sxm", "rtx3090", "h100-sxm"))
    assert a100.name == rtx3090.name == h100.name == "nvidia"
    assert len({a100.tuning_id, rtx3090.tuning_id, h100.tuning_id}) == 3
    assert h100.tuning_id.startswith("nvidia-sm_90")
    for stem in ("rtx4090", "mi300x"):
        assert profile_named(stem).tuning_id == profile_named(stem).name == stem
