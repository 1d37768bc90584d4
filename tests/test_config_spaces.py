"""Config spaces are data: every entry must be valid on every profile that uses it."""
import pytest
import torch

from conftest import device_params, load_props, profile_named, props_named
from fusion_backend import config_spaces as cs
from fusion_backend.devices import INTERPRETER, from_properties

FAMILIES = sorted(cs.SPACES)

# (device file stem, family) pairs known to fail validation because of a library bug.
KNOWN_BAD = {}  # (profile id, family) -> reason; empty: every space fits its devices


def _profile_params():
    params = []
    for p in device_params():
        path = p.values[0]
        if path is None:
            params.append(p)
            continue
        props = load_props(path)
        profile = from_properties(props, is_hip=props.get("is_hip"))
        if profile is not None:
            params.append(pytest.param(profile, id=path.stem))
    params.append(pytest.param(INTERPRETER, id="interpreter"))
    return params


PROFILES = _profile_params()


@pytest.fixture
def rtx4090():
    return profile_named("rtx4090")


@pytest.fixture
def mi300x():
    return profile_named("mi300x")


@pytest.fixture
def h100():
    return profile_named("h100-sxm")


def _space_params():
    params = []
    for p in PROFILES:
        profile = p.values[0]
        for family in FAMILIES:
            marks = list(p.marks)
            reason = KNOWN_BAD.get((p.id, family))
            if reason:
                marks.append(pytest.mark.xfail(strict=True, reason=reason))
            params.append(pytest.param(profile, family, id=f"{p.id}-{family}", marks=marks))
    return params


@pytest.mark.parametrize("profile, family", _space_params())
def test_every_config_valid(profile, family):
    space = cs.space_for(profile, family)
    assert space, "empty config space"
    problems = {i: cs.validate(profile, family, cfg) for i, cfg in enumerate(space)}
    assert {i: p for i, p in problems.items() if p} == {}


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_space_nonempty_for_every_dtype(profile, family, dtype):
    # choose() falls back to space[0]: a dtype filter that empties a space would crash it
    assert cs.for_dtype(cs.space_for(profile, family), dtype)


def test_for_dtype_filters_half_only_entries(h100):
    space = cs.space_for(h100, cs.GEMM)
    fp32 = cs.for_dtype(space, torch.float32)
    half = cs.for_dtype(space, torch.float16)
    assert all("float32" in c.get("dtypes", ("float32",)) for c in fp32)
    assert any(c.get("dtypes") == cs.HALF for c in half) and not any(c.get("dtypes") == cs.HALF for c in fp32)
    assert all("float16" in c.get("dtypes", ("float16",)) for c in half)
    assert not any(c.get("PRESPLIT") for c in half)  # 3xTF32 is for fp32 inputs only


def test_presplit_entries_only_for_3xtf32(h100):
    from fusion_backend.patterns._common import space

    highest = space(h100, cs.GEMM, torch.float32, precision="tf32x3")
    high = space(h100, cs.GEMM, torch.float32, precision="tf32")
    assert any(c.get("PRESPLIT") for c in highest)
    assert not any(c.get("PRESPLIT") for c in high) and high
    assert not any(c.get("PRESPLIT") for c in space(h100, cs.GEMM, torch.float32, tma=False))
    bad = _gemm(TMA=True, PRESPLIT=True, precisions=("tf32",), dtypes=("float32",))
    assert _has(cs.validate(h100, cs.GEMM, bad), "PRESPLIT")
    # a pre-split operand brings a second tile per stage into shared memory
    big = _gemm(BLOCK_M=128, BLOCK_N=256, num_stages=4, **cs.PRESPLIT)
    assert _has(cs.validate(h100, cs.GEMM, big), "shared memory")


def test_space_resolution(h100, mi300x, rtx4090):
    assert cs.space_for(rtx4090, cs.GEMM) == cs.SPACES[cs.GEMM]["rtx4090"]
    assert cs.space_for(mi300x, cs.GEMM) == cs.SPACES[cs.GEMM]["mi300x"]
    assert cs.space_for(h100, cs.GEMM) == cs.SPACES[cs.GEMM]["nvidia"]  # by vendor
    assert cs.space_for(INTERPRETER, cs.GEMM) == cs.SPACES[cs.GEMM]["interpreter"]


def test_rtx4090_space_follows_the_seed_rules(rtx4090):
    space = cs.space_for(rtx4090, cs.GEMM)
    assert 3 <= len(space) <= 4
    assert (space[0]["num_warps"], space[0]["num_stages"]) == (4, 2), "baseline (4 warps, 2 stages) first"
    assert all(c["num_warps"] in (4, 8) and c["num_stages"] in (2, 3) for c in space)


def test_mi300x_space_uses_amd_knobs(mi300x):
    for cfg in cs.space_for(mi300x, cs.GEMM):
        assert cfg["num_stages"] == 2
        assert cfg["matrix_instr_nonkdim"] == 16
        assert "waves_per_eu" in cfg and "kpack" in cfg
    for cfg in cs.space_for(mi300x, cs.POINTWISE):
        assert cfg["num_stages"] == 1


# ----------------------------------------------------------------------------- validate catches bad configs

def _gemm(**kw):
    cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2)
    cfg.update(kw)
    return cfg


def _has(problems, *words):
    return any(all(w in p for w in words) for p in problems)


def test_baseline_is_valid_everywhere(h100, mi300x, rtx4090):
    for profile in (h100, mi300x, rtx4090):
        assert cs.validate(profile, cs.GEMM, _gemm()) == []


def test_validate_non_power_of_two(h100):
    problems = cs.validate(h100, cs.GEMM, _gemm(BLOCK_N=48))
    assert _has(problems, "BLOCK_N=48", "power of two")
    assert _has(cs.validate(h100, cs.GEMM, _gemm(num_warps=3)), "num_warps=3")


def test_validate_dot_block_minimum(h100):
    assert _has(cs.validate(h100, cs.GEMM, _gemm(BLOCK_K=8)), "at least 16")


def test_validate_amd_num_warps_32(mi300x):
    assert _has(cs.validate(mi300x, cs.GEMM, _gemm(num_warps=32)), "num_warps=32")
    assert cs.validate(mi300x, cs.GEMM, _gemm(num_warps=16)) == []


def test_validate_amd_gemm_num_stages_3(mi300x):
    assert _has(cs.validate(mi300x, cs.GEMM, _gemm(num_stages=3)), "num_stages=3", "AMD")
    assert _has(cs.validate(mi300x, cs.POINTWISE, dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)),
                "num_stages=2", "AMD")


def test_validate_amd_knobs_on_nvidia(h100, rtx4090):
    for profile in (h100, rtx4090):
        assert _has(cs.validate(profile, cs.GEMM, _gemm(waves_per_eu=2)), "AMD knobs")
        assert _has(cs.validate(profile, cs.GEMM, _gemm(matrix_instr_nonkdim=16)), "AMD knobs")


def test_validate_smem_too_big_on_4090(rtx4090, h100):
    big = _gemm(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)  # 192 KiB in fp32
    assert _has(cs.validate(rtx4090, cs.GEMM, big), "shared memory")
    assert cs.validate(h100, cs.GEMM, big) == []  # 227 KiB on the H100
    # the same tile in fp16 only needs 96 KiB
    assert cs.validate(rtx4090, cs.GEMM, dict(big, dtypes=("float16", "bfloat16"))) == []


def test_validate_4090_rules(rtx4090):
    assert _has(cs.validate(rtx4090, cs.GEMM, _gemm(num_warps=2)), "num_warps=2", "4090")
    assert _has(cs.validate(rtx4090, cs.GEMM, _gemm(num_warps=16)), "num_warps=16")
    assert _has(cs.validate(rtx4090, cs.GEMM, _gemm(num_stages=4)), "num_stages=4", "4090")
    assert _has(cs.validate(rtx4090, cs.GEMM, _gemm(num_stages=1)), "num_stages=1", "4090")


# ----------------------------------------------------------------------------- helpers

def test_meta_and_launch_options(h100, mi300x):
    cfg = cs.space_for(mi300x, cs.GEMM)[3]
    meta = cs.meta_of(cfg)
    assert set(meta) == {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"}
    assert set(cs.launch_options(cfg, mi300x)) == {"num_warps", "num_stages", "waves_per_eu",
                                                    "matrix_instr_nonkdim", "kpack"}
    assert set(cs.launch_options(cfg, h100)) == {"num_warps", "num_stages"}


def test_heuristic_pick_small_batch(rtx4090, h100):
    interp = cs.space_for(INTERPRETER, cs.GEMM)
    assert cs.heuristic_pick(interp, 1) is interp[0]
    space = cs.space_for(rtx4090, cs.GEMM)
    for m in (1, 8, 32):
        assert cs.heuristic_pick(space, m)["BLOCK_M"] == 64  # the baseline, the smallest tile
    nv = cs.space_for(h100, cs.GEMM)
    assert nv[0]["BLOCK_M"] == 128
    assert cs.heuristic_pick(nv, 32)["BLOCK_M"] == 64  # no 128-row tile for a 32-row batch
    assert cs.heuristic_pick(nv, 63)["BLOCK_M"] == 64
    assert cs.heuristic_pick(nv, 64)["BLOCK_M"] == 128  # within 2x of the batch
    assert cs.heuristic_pick(nv, 4096) is nv[0]


@pytest.mark.parametrize("m", [1, 2, 7, 8, 16, 31, 64, 100, 1000])
def test_heuristic_pick_rule(h100, rtx4090, mi300x, m):
    for profile in (h100, rtx4090, mi300x, INTERPRETER):
        space = cs.space_for(profile, cs.GEMM)
        pick = cs.heuristic_pick(space, m)
        fitting = [c for c in space if c["BLOCK_M"] <= max(16, 2 * m)]
        assert pick is (fitting[0] if fitting else min(space, key=lambda c: c["BLOCK_M"]))


def test_validate_tma_only_on_hopper_class(h100, rtx4090, mi300x):
    tma = _gemm(TMA=True)
    assert cs.validate(h100, cs.GEMM, tma) == []
    assert _has(cs.validate(rtx4090, cs.GEMM, tma), "TMA", "sm_89")
    assert _has(cs.validate(mi300x, cs.GEMM, tma), "TMA")
    a100 = from_properties(props_named("a100-sxm"))
    assert _has(cs.validate(a100, cs.GEMM, tma), "TMA", "sm_80")


def test_persistent_tiles_only_for_the_eval_kernel_at_tf32_and_half(h100):
    """PERSISTENT (one program per multiprocessor walking the tiles) is the eval kernel's TMA
    tile at TF32 / bf16: rejected without TMA or with PRESPLIT / WXT, offered by the eval space
    at "high" and bf16 but not at "highest" (3xTF32 has its own kernels) nor to the cell."""
    assert cs.validate(h100, cs.GEMM, _gemm(TMA=True, PERSISTENT=True)) == []
    for bad in (_gemm(PERSISTENT=True), _gemm(**cs.PRESPLIT, PERSISTENT=True), _gemm(**cs.WXT, PERSISTENT=True)):
        assert _has(cs.validate(h100, cs.GEMM, bad), "PERSISTENT")
    import fusion_backend.patterns.cat_linear_tanh as clt
    import fusion_backend.patterns.linear_bn_gelu_relu as lbgr

    assert any(c.get("PERSISTENT") for c in lbgr.eval_space(h100, torch.float32, "tf32"))
    assert any(c.get("PERSISTENT") for c in lbgr.eval_space(h100, torch.bfloat16, "ieee"))
    assert not any(c.get("PERSISTENT") for c in lbgr.eval_space(h100, torch.float32, "tf32x3"))
    for dtype, precision in ((torch.float32, "tf32"), (torch.bfloat16, "ieee")):
        assert not any(c.get("PERSISTENT") for c in clt.cell_space(h100, dtype, precision))


def test_gluon_kernels_only_on_sm90_at_3xtf32(h100):
    """The Gluon kernels issue wgmma: Hopper (sm_90) only, and only as pre-split 3xTF32
    configs; the H100 space has such tiles, the A100 space and a Blackwell-class profile do
    not. The cell and the MLP block's eval kernel are offered them at "highest" only."""
    gluon = _gemm(**cs.GLUON)
    assert cs.validate(h100, cs.GEMM, gluon) == []
    assert any(c.get("GLUON") for c in cs.space_for(h100, cs.GEMM))
    a100 = from_properties(props_named("a100-sxm"))
    assert not any(c.get("GLUON") for c in cs.space_for(a100, cs.GEMM))
    blackwell = from_properties(dict(props_named("h100-sxm"), major=10, minor=0, name="NVIDIA B200"))
    assert _has(cs.validate(blackwell, cs.GEMM, gluon), "GLUON", "sm_100")
    assert not any(c.get("GLUON") for c in cs.space_for(blackwell, cs.GEMM))
    assert _has(cs.validate(h100, cs.GEMM, _gemm(TMA=True, GLUON=True)), "GLUON", "PRESPLIT")
    import fusion_backend.patterns.cat_linear_tanh as clt
    import fusion_backend.patterns.linear_bn_gelu_relu as lbgr

    for space in (clt.cell_space, lbgr.eval_space):
        assert any(c.get("GLUON") for c in space(h100, torch.float32, "tf32x3"))
        assert not any(c.get("GLUON") for c in space(h100, torch.float32, "tf32"))
        assert not any(c.get("GLUON") for c in space(h100, torch.bfloat16, "ieee"))


def test_tuner_times_the_specialized_kernels_first(h100, tmp_path, monkeypatch):
    """The tuner stops at its time budget, so on the H100 it times the Gluon and pre-split
    tiles first at "highest", the TMA tiles first at TF32 / bf16 (the eval space) and the W x^T
    tiles first for the cell, each group in its listed order."""
    import fusion_backend.patterns.cat_linear_tanh as clt
    import fusion_backend.patterns.linear_bn_gelu_relu as lbgr
    from fusion_backend import autotune

    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path))

    def kind(c):
        return "GLUON" if c.get("GLUON") else "PRESPLIT" if c.get("PRESPLIT") else "WXT" if c.get("WXT") \
            else "TMA" if c.get("TMA") else "pointer"

    def timed_order(space):
        seen = []
        tuner = autotune.Tuner(timer=lambda fn: fn() or 1.0)
        tuner.choose(f"k{len(space)}-{id(space)}", profile=h100, space=space, m=256, src_hash="s", device_name="test", autotune=True,
                     budget_s=1e9, run_fused=lambda c: seen.append(kind(c)), run_unfused=None)
        seen = seen[:len(space)]  # the search; the finalists are re-timed after it
        return [k for i, k in enumerate(seen) if i == 0 or seen[i - 1] != k]  # runs of one kind

    highest = lbgr.eval_space(h100, torch.float32, "tf32x3")
    assert timed_order(highest) == ["GLUON", "PRESPLIT", "TMA", "pointer"]
    assert [c for c in cs.search_order(highest) if c.get("GLUON")] == [c for c in highest if c.get("GLUON")]
    assert timed_order(lbgr.eval_space(h100, torch.float32, "tf32"))[:2] == ["TMA", "pointer"]
    assert timed_order(lbgr.eval_space(h100, torch.bfloat16, "ieee"))[:2] == ["TMA", "pointer"]
    assert timed_order(clt.cell_space(h100, torch.float32, "tf32"))[:2] == ["WXT", "pointer"]


def test_validate_recurrence_rules(h100):
    good = dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=128, GRID_SYNC=True, RESIDENT=True, RESIDENT_MAX_K=512, K_SPLIT=4,
                num_warps=4, num_stages=1)
    assert cs.validate(h100, cs.RECURRENCE, good) == []
    assert _has(cs.validate(h100, cs.RECURRENCE, dict(good, K_SPLIT=3)), "K_SPLIT=3")
    assert _has(cs.validate(h100, cs.RECURRENCE, dict(good, BLOCK_N=8)), "at least 16")


@pytest.mark.parametrize("dtype,precision", [(torch.float32, "tf32"), (torch.float32, "tf32x3"),
                                             (torch.bfloat16, "ieee")])
def test_small_eval_gemms_take_inline_launchable_tiles_only(dtype, precision):
    """Up to INLINE_MAX_FLOP the eval space holds only tiles an inline op can launch (the
    others gain nothing there and need the opaque op's host time); above it, every tile."""
    import fusion_backend.patterns.linear_bn_gelu_relu as lbgr
    from fusion_backend.patterns._common import INLINE_MAX_FLOP, inlinable

    h100 = profile_named("h100-sxm")
    small = lbgr.eval_space(h100, dtype, precision, 2 * 512 * 1024 * 1024)
    full = lbgr.eval_space(h100, dtype, precision, 2 * 4096 * 2048 * 2048)
    assert 2 * 512 * 1024 * 1024 <= INLINE_MAX_FLOP < 2 * 4096 * 2048 * 2048
    assert small and all(inlinable(c) for c in small)
    assert any(not inlinable(c) for c in full) and not any(c.get("SMALL") for c in full)
    assert any(c.get("SMALL") for c in small)
    assert lbgr.eval_space(h100, dtype, precision) == full


@pytest.mark.parametrize("dtype,precision", [(torch.float32, "tf32"), (torch.float32, "tf32x3")])
def test_small_cell_gemms_take_inline_launchable_tiles_only(dtype, precision):
    """The cell's space follows the same rule as the eval block's (above)."""
    import fusion_backend.patterns.cat_linear_tanh as clt
    from fusion_backend.patterns._common import inlinable

    h100 = profile_named("h100-sxm")
    small = clt.cell_space(h100, dtype, precision, 2 * 64 * 1024 * 512)
    full = clt.cell_space(h100, dtype, precision, 2 * 256 * 32768 * 16384)
    assert small and all(inlinable(c) for c in small) and any(c.get("SMALL") for c in small)
    assert any(c.get("WXT") or c.get("PRESPLIT") for c in full) and not any(c.get("SMALL") for c in full)
    assert clt.cell_space(h100, dtype, precision) == full


# ----------------------------------------------------------------------------- compiled sizes

_RECURRENCE_SHARED = """
import json, sys
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fusion_backend import config_spaces as cs
from fusion_backend.devices import from_properties
from fusion_backend.patterns import rnn_sequence as R

props, target, cases = json.loads(sys.argv[1])
profile = from_properties(props)
out = []
for precision in profile.dot_precisions:
    for B, H in cases:
        programs, kw = R.plan(R._config(profile, torch.float32, precision), profile, B, H)
        options = {k: kw.pop(k) for k in list(kw) if k in cs.LAUNCH_KEYS}
        const = dict(PRECISION=precision, stride_ph=1, stride_hh=1, **kw)  # unit strides: the JIT specializes them
        sig = {"p_ptr": "*fp32", "w_ptr": "*fp32", "hs_ptr": "*fp32", "sync_ptr": "*i32"}
        sig.update({n: "i32" for n in ("T", "B", "H", "stride_pt", "stride_pb", "stride_wn", "stride_wk", "stride_ht",
                                       "stride_hb")})
        sig.update({k: "constexpr" for k in const})
        fn = R._rnn_recurrence_kernel
        compiled = triton.compile(ASTSource(fn=fn, signature={n: sig[n] for n in fn.arg_names}, constexprs=const),
                                  target=GPUTarget(*target), options=options)
        out.append([precision, B, H, kw["RESIDENT"], compiled.metadata.shared])
print(json.dumps(out))
"""


@pytest.mark.parametrize("stem, target", [("h100-sxm", ("cuda", 90, 32)), ("rtx4090", ("cuda", 89, 32)),
                                          ("a100-sxm", ("cuda", 80, 32)), ("mi300x", ("hip", "gfx942", 64))])
def test_recurrence_shared_memory_estimate_covers_the_compiled_kernel(stem, target):
    """The recurrence kernel compiled (for the device, no GPU needed) at the widest cases
    `plan()` allows, W resident (16 rows, H = RESIDENT_MAX_K) and streamed (the batch limit):
    its shared memory is at most `smem_bytes`' estimate, which is within the device's limit
    (the estimate was one fp32 tile, 4 KB, against 96 KB compiled at 3xTF32 on sm_90)."""
    from test_presplit_3xtf32 import _compile_in_subprocess

    props = props_named(stem)
    profile = from_properties(props)
    raw = cs.space_for(profile, cs.RECURRENCE)
    max_k = max(c.get("RESIDENT_MAX_K", 0) for c in raw)
    cases = [[16, max_k], [max(c["BLOCK_M"] for c in raw), 2 * max_k]]
    compiled = _compile_in_subprocess(_RECURRENCE_SHARED, [props, list(target), cases])
    assert {resident for *_, resident, _ in compiled} == {True, False}  # both paths compiled
    for precision, B, H, resident, shared in compiled:
        config = next(c for c in raw if precision in c.get("precisions", (precision,)))
        estimate = cs.smem_bytes(config, cs.RECURRENCE, 4, tf32x3=precision == "tf32x3")
        assert shared <= estimate <= profile.smem_per_block, (precision, B, H, resident, shared, estimate)


_DOT_KERNEL = """
import triton, triton.language as tl

@triton.jit
def dot_kernel(a_ptr, b_ptr, c_ptr, PRECISION: tl.constexpr):
    r = tl.arange(0, 32)
    a = tl.load(a_ptr + r[:, None] * 32 + r[None, :])
    b = tl.load(b_ptr + r[:, None] * 32 + r[None, :])
    tl.store(c_ptr + r[:, None] * 32 + r[None, :], tl.dot(a, b, input_precision=PRECISION))
"""

_DOT_AT_EVERY_PRECISION = """
import importlib.util, json, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fusion_backend.devices import from_properties

props, target, source = json.loads(sys.argv[1])
with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:  # triton.jit reads its source file
    f.write(source)
spec = importlib.util.spec_from_file_location("dot_kernel_module", f.name)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
dot_kernel = module.dot_kernel
failed = {}
for precision in from_properties(props).dot_precisions:
    try:
        triton.compile(ASTSource(fn=dot_kernel, signature={"a_ptr": "*fp32", "b_ptr": "*fp32", "c_ptr": "*fp32",
                                                          "PRECISION": "constexpr"},
                                 constexprs={"PRECISION": precision}), target=GPUTarget(*target))
    except Exception as exc:
        failed[precision] = f"{type(exc).__name__}: {str(exc)[-300:]}"
print(json.dumps(failed))
"""


@pytest.mark.parametrize("arch, tf32", [("gfx942", True), ("gfx950", False), ("gfx90a", False)])
def test_amd_profiles_offer_only_dot_precisions_triton_compiles(arch, tf32):
    """TF32 is gfx942's alone on AMD: Triton's AMD backend refuses input_precision="tf32" on
    gfx950 (MI350) and gfx940/941, where the profile used to pick it for fp32 "high" (every
    fused kernel then failed to compile). Every precision a profile offers compiles there."""
    from test_presplit_3xtf32 import _compile_in_subprocess

    props = dict(props_named("mi300x"), gcnArchName=f"{arch}:sramecc+:xnack-")
    profile = from_properties(props)
    assert ("tf32" in profile.dot_precisions) is tf32
    assert profile.fp32_high == ("tf32" if tf32 else "ieee")
    assert _compile_in_subprocess(_DOT_AT_EVERY_PRECISION, [props, ["hip", arch, 64], _DOT_KERNEL]) == {}


def test_early_mi300_parts_have_no_tf32():
    """gfx940/941 (pre-production MI300): no TF32 in the profile, as on gfx950 (Triton 3.9
    has no compile target for them to test against)."""
    for arch in ("gfx940", "gfx941"):
        profile = from_properties(dict(props_named("mi300x"), gcnArchName=f"{arch}:sramecc+:xnack-"))
        assert "tf32" not in profile.dot_precisions and profile.fp32_high == "ieee"


def test_from_properties_reads_is_hip_from_the_properties():
    props = props_named("mi300x")
    assert from_properties(props).vendor == "amd" and from_properties(props).name == "mi300x"
    assert from_properties(props, is_hip=True) == from_properties(props)
    assert from_properties(props_named("h100-sxm")).vendor == "nvidia"


def test_from_properties_without_is_hip_reads_the_architecture():
    """torch's own property object has no `is_hip`: an MI300X's properties without it were
    taken for an NVIDIA part (NVIDIA configs, num_stages 3, no recurrence config)."""
    props = {k: v for k, v in props_named("mi300x").items() if k != "is_hip"}
    assert from_properties(props).name == "mi300x"
    h100 = {k: v for k, v in props_named("h100-sxm").items() if k != "is_hip"}
    assert from_properties(h100).vendor == "nvidia"
