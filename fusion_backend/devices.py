"""Device profiles: what the kernels need to know about the GPU they run on.

`from_properties` is a pure function of the attributes that
`torch.cuda.get_device_properties` reports, so every rule here is tested without
the hardware (tests/test_devices.py runs it over ../shared/devices/*.json).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Optional

import torch

# Profiles on which fusion is on when options["only_named_devices"] is set.
NAMED_PROFILES = ("mi300x", "rtx4090")


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    name: str                 # mi300x | rtx4090 | nvidia | rocm | interpreter
    vendor: str               # "amd" | "nvidia" | "interpreter"
    arch: str                 # "sm_90", "gfx942", "cpu"
    warp_size: int
    smem_per_block: int       # bytes a block may use (the opt-in limit)
    multiprocessors: int
    max_num_warps: int
    dot_precisions: tuple     # input_precision values tl.dot accepts for fp32 here
    fp32_highest: str         # dot precision used for fp32 at matmul precision "highest"
    fp32_high: str            # ... at "high" / "medium"
    input_dtypes: tuple = ("float32", "float16", "bfloat16")  # dtypes the fused kernels take here

    @functools.cached_property  # read by the launchers on every call
    def tuning_id(self) -> str:
        """The profile in tuning keys: a named profile is one device; a generic one (`nvidia`,
        `rocm`) covers GPUs with other limits (an A100 and an RTX 3090 are both `nvidia`), so
        its architecture, multiprocessors and shared memory are part of it. One process with
        two such GPUs then never serves one's tuned config on the other (where it may not fit)."""
        if self.name not in ("nvidia", "rocm"):
            return self.name
        return f"{self.name}-{self.arch}-{self.multiprocessors}sm-{self.smem_per_block // 1024}k"

    def dot_precision(self, dtype: torch.dtype, matmul_precision: Optional[str] = None) -> str:
        """The tl.dot input_precision for `dtype` inputs, following torch's fp32 matmul setting.

        fp16/bf16 always run natively with fp32 accumulation ("ieee" is what tl.dot
        expects for them)."""
        if dtype != torch.float32:
            return "ieee"
        setting = matmul_precision or torch.get_float32_matmul_precision()
        return self.fp32_highest if setting == "highest" else self.fp32_high

    def config_space(self, family: str):
        from . import config_spaces

        return config_spaces.space_for(self, family)


def _get(props: Any, name: str, default=None):
    if isinstance(props, dict):
        return props.get(name, default)
    return getattr(props, name, default)


def from_properties(props: Any, is_hip: Optional[bool] = None) -> Optional[DeviceProfile]:
    """Map device properties (torch.cuda.get_device_properties or a dict of them) to a profile;
    `is_hip` None: the properties' own `is_hip`, or where they have none (torch's own property
    object has none), whether they name a gfx architecture (an MI300X's were read as NVIDIA's).

    Returns None where the backend should not fuse: the graph then goes to Inductor untouched.
    """
    if is_hip is None:
        own = _get(props, "is_hip", None)
        is_hip = bool(own) if own is not None else str(_get(props, "gcnArchName", "") or "").startswith("gfx")
    sms = int(_get(props, "multi_processor_count", 0) or 0)
    smem = int(_get(props, "shared_memory_per_block_optin", 0) or _get(props, "shared_memory_per_block", 0) or 0)
    warp = int(_get(props, "warp_size", 64 if is_hip else 32) or (64 if is_hip else 32))
    if is_hip:
        arch = str(_get(props, "gcnArchName", "") or "").split(":")[0]
        # CDNA only (MI100 gfx908, MI200 gfx90a, MI300 gfx94x, MI350 gfx950): matrix cores.
        if not (arch.startswith("gfx908") or arch.startswith("gfx90a") or arch.startswith("gfx94")
                or arch.startswith("gfx95")):
            return None
        # TF32 on AMD is gfx942's alone (MI300X/A, MI325X): Triton's AMD backend refuses
        # input_precision="tf32" elsewhere, gfx950 (MI350, CDNA4) and the early gfx940/941 included
        tf32 = arch == "gfx942"
        # The MI300X is recognised by architecture and CU count, never by name: some ROCm
        # stacks report "AMD Radeon Graphics". gfx942 with 228 CUs is an MI300A.
        name = "mi300x" if arch == "gfx942" and sms == 304 else "rocm"
        return DeviceProfile(
            name=name, vendor="amd", arch=arch, warp_size=warp, smem_per_block=smem or 65536,
            multiprocessors=sms, max_num_warps=16,
            dot_precisions=("ieee", "tf32") if tf32 else ("ieee",),
            fp32_highest="ieee", fp32_high="tf32" if tf32 else "ieee",
        )
    major, minor = int(_get(props, "major", 0) or 0), int(_get(props, "minor", 0) or 0)
    if major < 8:  # no TF32/bf16 tensor cores that Triton targets well: Inductor alone
        return None
    arch = f"sm_{major}{minor}"
    if (major, minor) == (8, 9) and sms == 128:
        name = "rtx4090"
    else:
        name = "nvidia"
    # 3xTF32 only pays where the TF32 rate is far above the FP32 rate: the datacenter
    # parts (A100 sm_80, H100/H200 sm_90, B200/B300 sm_10x). On GeForce/workstation chips
    # (sm_86, sm_89, sm_120) TF32 runs at the FP32 rate, so "highest" is plain FP32 there.
    datacenter = (major, minor) in ((8, 0), (9, 0)) or major == 10
    return DeviceProfile(
        name=name, vendor="nvidia", arch=arch, warp_size=warp, smem_per_block=smem or 49152,
        multiprocessors=sms, max_num_warps=8 if name == "rtx4090" else 16,
        dot_precisions=("ieee", "tf32", "tf32x3"),
        fp32_highest="tf32x3" if datacenter else "ieee", fp32_high="tf32",
    )


INTERPRETER = DeviceProfile(
    name="interpreter", vendor="interpreter", arch="cpu", warp_size=32, smem_per_block=1 << 30,
    multiprocessors=1, max_num_warps=4, dot_precisions=("ieee",),
    fp32_highest="ieee", fp32_high="ieee",
    # Triton's interpreter (3.9) returns garbage from tl.dot on bfloat16 operands (seen here:
    # |error| ~1e10 on a 16x16 product); bf16 sites stay with Inductor on this profile.
    input_dtypes=("float32", "float16"),
)


def interpreter_enabled() -> bool:
    """Whether Triton runs kernels under its interpreter, as Triton itself reads TRITON_INTERPRET
    ("false", "off" and "no" are off: counted as on, CPU graphs were fused for kernels that then
    could not launch)."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # a Triton before knobs (< 3.4)
        return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on", "y")


@functools.lru_cache(maxsize=None)
def _cuda_profile(index: int) -> Optional[DeviceProfile]:
    props = torch.cuda.get_device_properties(index)
    return from_properties(props, is_hip=torch.version.hip is not None)


def device_profile(device: Any = None) -> Optional[DeviceProfile]:
    """The profile for a live device (default: the current CUDA device, else the CPU)."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        return _cuda_profile(device.index if device.index is not None else torch.cuda.current_device())
    if device.type == "cpu" and interpreter_enabled():
        return INTERPRETER
    return None


def tensor_profile(t: torch.Tensor) -> Optional[DeviceProfile]:
    """`device_profile(t.device)` for the launchers' hot path: a tensor on a CUDA device needs
    no availability check (`torch.cuda.is_available()` cost ~5 us a call on the H100 host)."""
    device = t.device
    if device.type == "cuda":
        return _cuda_profile(device.index)
    return device_profile(device)
