"""Triton config spaces per kernel family and device, kept as data.

A space is resolved profile name -> vendor -> "default" (FlagGems style). Each entry is
a dict: the kernel's meta-parameters (BLOCK_*, GROUP_M), the launch options num_warps
and num_stages, on ROCm the AMD knobs, and optionally "dtypes" (the input dtypes the
entry is meant for; absent = all). The first entry of a space is the heuristic default
used when autotuning is off; `heuristic_pick` refines that by problem size.

Every entry is checked against its profile's limits by `validate` (tests/test_config_spaces.py
does this for every device property set in ../shared/devices).
"""
from __future__ import annotations

from typing import Dict, List

import torch

GEMM = "gemm"            # one GEMM main loop + a fused epilogue
POINTWISE = "pointwise"  # no GEMM: normalisation/activation passes, stat merges
RECURRENCE = "recurrence"  # one program walking all time steps of an RNN (BLOCK_M = largest batch)

LAUNCH_KEYS = ("num_warps", "num_stages")
AMD_KEYS = ("waves_per_eu", "matrix_instr_nonkdim", "kpack")
NOT_META = LAUNCH_KEYS + AMD_KEYS + ("dtypes", "precisions", "SMALL")
HALF = ("float16", "bfloat16")


# 3xTF32 with a pre-split operand: TMA tiles, fp32 inputs at the "highest" precision only
PRESPLIT = dict(TMA=True, PRESPLIT=True, dtypes=("float32",), precisions=("tf32x3",))


# the pre-split 3xTF32 kernels written in Gluon (patterns/_cell_gluon.py, _eval_gluon.py):
# wgmma, so Hopper (sm_90) only; BLOCK_M is the tile of x's rows, BLOCK_N of W's rows
GLUON = dict(PRESPLIT, GLUON=True)


# small batches (RNN cells): out^T = W x^T with TMA tiles spanning the batch (BLOCK_M) and
# BLOCK_N rows of W, K shared among SPLIT_K programs per tile; TF32/fp16/bf16 (not 3xTF32)
WXT = dict(TMA=True, WXT=True, precisions=("tf32", "ieee"))


def _w(bm, bn, bk, w, s, split_k, **kw):
    return _g(bm, bn, bk, w, s, SPLIT_K=split_k, **WXT, **kw)


def _g(bm, bn, bk, w, s, group=8, **kw):
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group, num_warps=w, num_stages=s, **kw)


def _p(bm, bn, w, s):
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)


SPACES: Dict[str, Dict[str, List[dict]]] = {
    GEMM: {
        # H100/A100-class: Inductor's mm shapes that do well at tf32 and bf16.
        "nvidia": [
            _g(128, 128, 32, 8, 3),
            _g(64, 128, 32, 4, 4),
            _g(128, 64, 32, 4, 4),
            _g(64, 64, 32, 4, 3),
            _g(128, 256, 32, 8, 3),
            _g(64, 256, 32, 8, 3),
            _g(128, 128, 32, 8, 4),
            # skinny batches (RNN cells, M <= 256): one row-tile covers the batch, so each
            # W tile is read from HBM once
            _g(256, 64, 32, 8, 3),
            _g(256, 128, 32, 8, 3),
            _g(128, 128, 64, 8, 3, dtypes=HALF),
            _g(128, 256, 64, 8, 3, dtypes=HALF),
            _g(64, 128, 64, 4, 4, dtypes=HALF),
            # Hopper+: tiles brought in by the TMA engine (eval kernel of linear_bn_gelu_relu;
            # dropped from the space elsewhere). H100 16384x4096->4096: 3xTF32 128x64 6.74 ms
            # (pointer loads 6.87), TF32 128x256 1.73 (1.97), bf16 128x256 0.94 (1.04).
            _g(128, 64, 32, 4, 4, TMA=True),
            _g(128, 256, 32, 8, 3, TMA=True),
            _g(128, 256, 32, 8, 4, TMA=True),
            _g(128, 256, 64, 8, 3, TMA=True, dtypes=HALF),
            _g(128, 256, 64, 8, 4, TMA=True, dtypes=HALF),
            _g(128, 128, 64, 8, 4, TMA=True, dtypes=HALF),
            # the same tiles walked by one program per multiprocessor (eval kernel, TF32 / bf16):
            # H100, benchmarks/pingpong_gemm.py, 5 interleaved rounds: TF32 1.778 ms vs 1.870
            # one tile per program (unfused 1.861, cuBLAS alone 1.614); bf16 0.971 vs 0.981
            _g(128, 256, 32, 8, 3, TMA=True, PERSISTENT=True, precisions=("tf32", "ieee")),
            _g(128, 256, 64, 8, 3, TMA=True, PERSISTENT=True, dtypes=HALF),
            # fp32 "highest" (3xTF32) with one operand split into TF32 head and remainder once
            # per call, both brought in by TMA (triton_lib.dot_3xtf32). H100, kernel + split
            # pass (benchmarks/presplit_3xtf32.py): 16384x4096->4096 eval 5.55-5.85 ms vs 6.93
            # in-kernel tf32x3 (64x128 w4 s3 best); RNN i2h 256x(16384+16384)->16384 2.70-2.88
            # vs 5.27 cuBLAS fp32 (128x64 w4 s3 best); h2o 256x16384->8192 0.67-0.72 vs 1.37
            # (bit-trick head; with cvt.rna the tuner measured 5.65 / 2.62 / 0.61 ms).
            _g(128, 64, 32, 4, 3, **PRESPLIT),
            _g(64, 128, 32, 4, 3, **PRESPLIT),
            _g(128, 128, 32, 8, 3, **PRESPLIT),
            _g(128, 128, 32, 8, 4, **PRESPLIT),
            # the cell's kernel with its MMA waits placed by hand (Gluon), H100, fifth session
            # (tiles batch x W rows; two runs, the second benchmarks/presplit_3xtf32.py): i2h
            # 2.55 / 2.68 ms at 128x128x32 w8 s3, 2.59 / 2.69 at 128x64x32 w4 s2, 2.63 / 2.77 at
            # s4 (the tl kernel's best: 2.71 / 2.83); h2o 0.62-0.63 / 0.65-0.66 / 0.64 (0.65-0.66).
            # Slower: 64-row W tiles with 8 warps, 256-wide batch tiles, BK 16. The eval MLP
            # kernel (patterns/_eval_gluon.py) takes the same tiles, x rows x W rows; sixth
            # session, 16384x4096->4096 (presplit_3xtf32.py --rounds 3, kernel + split pass):
            # 128x128x32 w8 s3 5.38-5.45 ms vs the `tl` kernel's best 5.75-6.04 (128x64 s3) and
            # 5.88-5.89 (64x128 s3); in a probe 128x64 w4 s3 6.9-7.4, 64x128 w4 s3 8.3 (not kept).
            _g(128, 128, 32, 8, 3, **GLUON),
            _g(128, 64, 32, 4, 2, **GLUON),
            _g(128, 64, 32, 4, 4, **GLUON),
            # W x^T for small batches (the RNN cell at TF32/fp16/bf16, bound by reading W).
            # H100 (benchmarks/cell_wxt.py), TF32 i2h 256x(16384+16384)->16384: 256x128x32 s4
            # 0.865 ms (cuBLAS + cat + tanh 0.86, one read of W 0.70); h2o 256x16384->8192:
            # split 2 0.228 (cuBLAS 0.232-0.239); bf16 i2h 256x128x64 s4 0.432 (0.438), h2o
            # 256x64x64 s5 0.122 (0.123). 64-row tiles: batches far below 256 (an MMA over 256
            # rows of zero padding would cost more than the read of W).
            _w(256, 128, 32, 8, 4, 1),
            _w(256, 128, 32, 8, 4, 2),
            _w(256, 64, 32, 4, 5, 1),
            _w(128, 128, 32, 4, 4, 1),
            _w(64, 128, 32, 4, 4, 1),
            _w(64, 128, 32, 4, 4, 4),
            _w(256, 128, 64, 8, 4, 1, dtypes=HALF),
            _w(128, 128, 64, 4, 3, 1, dtypes=HALF),
            _w(256, 64, 64, 4, 5, 1, dtypes=HALF),
            _w(256, 128, 64, 8, 3, 2, dtypes=HALF),
            _w(64, 128, 64, 4, 4, 4, dtypes=HALF),
            # SMALL: only for eval GEMMs of at most _common.INLINE_MAX_FLOP (a few us on the
            # GPU, launched inline), where more, smaller tiles fill the multiprocessors. H100,
            # 512x1024->1024 TF32: Inductor max-autotune's best mm template with the epilogue
            # fused was 32x32x128 w4 s2 (0.0205 ms in its tuning, 0.016 in the benchmark) while
            # our best 64x128x32 w4 s4 ran 0.020.
            _g(32, 32, 128, 4, 2, SMALL=True),
            _g(32, 64, 128, 4, 2, SMALL=True),
            _g(64, 32, 64, 4, 3, SMALL=True),
            _g(64, 64, 64, 4, 3, SMALL=True),
        ],
        # The 4090 seed rules: num_warps in {4, 8}, num_stages in {2, 3}, 3-4 configs,
        # the conservative baseline (4 warps, 2 stages) first; <= 99 KiB shared memory.
        "rtx4090": [
            _g(64, 64, 32, 4, 2),
            _g(128, 64, 32, 4, 3),
            _g(128, 128, 32, 8, 2),
            _g(64, 128, 32, 8, 3),
        ],
        # MI300X: 64-wide wavefronts, num_stages 2 for one GEMM, 64 KiB LDS,
        # matrix_instr_nonkdim 16 (usually beats 32), waves_per_eu for occupancy.
        "mi300x": [
            _g(128, 128, 32, 8, 2, waves_per_eu=2, matrix_instr_nonkdim=16, kpack=1),
            _g(64, 128, 32, 4, 2, waves_per_eu=2, matrix_instr_nonkdim=16, kpack=1),
            _g(128, 64, 32, 4, 2, waves_per_eu=0, matrix_instr_nonkdim=16, kpack=1),
            _g(256, 128, 32, 8, 2, waves_per_eu=0, matrix_instr_nonkdim=16, kpack=2, dtypes=HALF),
            _g(128, 128, 64, 8, 2, waves_per_eu=0, matrix_instr_nonkdim=16, kpack=2, dtypes=HALF),
        ],
        "amd": [
            _g(128, 128, 32, 8, 2, waves_per_eu=0, matrix_instr_nonkdim=16, kpack=1),
            _g(64, 64, 32, 4, 2, waves_per_eu=0, matrix_instr_nonkdim=16, kpack=1),
        ],
        # Interpreter: one small config, nothing is benchmarked.
        "interpreter": [_g(16, 16, 16, 1, 1, group=4)],
        "default": [
            _g(64, 64, 32, 4, 2),
            _g(128, 128, 32, 8, 3),
        ],
    },
    POINTWISE: {
        "nvidia": [_p(64, 128, 4, 1), _p(32, 256, 8, 1), _p(128, 64, 4, 1)],
        "rtx4090": [_p(64, 64, 4, 2), _p(64, 128, 8, 2), _p(32, 128, 4, 2)],
        "mi300x": [_p(64, 128, 4, 1), _p(32, 256, 8, 1)],
        "amd": [_p(64, 128, 4, 1)],
        "interpreter": [_p(16, 16, 1, 1)],
        "default": [_p(64, 128, 4, 1)],
    },
    RECURRENCE: {
        # GRID_SYNC: the programs split the hidden columns and meet at a grid barrier after
        # each step (they must all be resident: the interpreter runs programs one after
        # another, so there one program walks all columns). RESIDENT: W's slice stays in
        # registers when H <= RESIDENT_MAX_K. K_SPLIT: the reduction in that many chunks,
        # whose chains of MMAs run side by side (pays for 3xTF32's three MMAs per chunk;
        # H100, T=256 B=8 H=256: tf32x3 0.90 ms with 4 chunks vs 1.27 with 1; tf32 0.67 with 1).
        # The first entry whose `precisions` holds the dot precision is used.
        "nvidia": [
            dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=128, GRID_SYNC=True, RESIDENT=True, RESIDENT_MAX_K=512, K_SPLIT=4,
                 precisions=("tf32x3",), num_warps=4, num_stages=1),
            dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=128, GRID_SYNC=True, RESIDENT=True, RESIDENT_MAX_K=512, K_SPLIT=1,
                 num_warps=4, num_stages=1),
        ],
        "rtx4090": [dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=128, GRID_SYNC=True, RESIDENT=True, RESIDENT_MAX_K=512,
                         K_SPLIT=1, num_warps=4, num_stages=2)],
        "amd": [dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=128, GRID_SYNC=True, RESIDENT=True, RESIDENT_MAX_K=512,
                     K_SPLIT=1, num_warps=4, num_stages=1)],
        "interpreter": [dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=16, GRID_SYNC=False, RESIDENT=False, K_SPLIT=1,
                             num_warps=1, num_stages=1)],
        "default": [dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=128, GRID_SYNC=True, RESIDENT=True, RESIDENT_MAX_K=512,
                         K_SPLIT=1, num_warps=4, num_stages=1)],
    },
}


def space_for(profile, family: str) -> List[dict]:
    """The config list for `family` on `profile`: profile name, then vendor, then default,
    without the entries this device cannot run (e.g. the generic nvidia space on a GPU with
    less shared memory than an H100)."""
    per_device = SPACES[family]
    for key in (profile.name, profile.vendor, "default"):
        if key in per_device:
            fitting = [c for c in per_device[key] if not validate(profile, family, c)]
            if fitting:
                return fitting
    raise ValueError(f"no {family} config fits profile {profile.name}")


def for_dtype(space: List[dict], dtype: torch.dtype) -> List[dict]:
    name = str(dtype).replace("torch.", "")
    return [c for c in space if "dtypes" not in c or name in c["dtypes"]]


def meta_of(config: dict) -> dict:
    """Kernel meta-parameters (constexprs) of a config."""
    return {k: v for k, v in config.items() if k not in NOT_META}


def launch_options(config: dict, profile) -> dict:
    keys = LAUNCH_KEYS + (AMD_KEYS if profile.vendor == "amd" else ())
    return {k: config[k] for k in keys if k in config}


def smem_bytes(config: dict, family: str, elem_bytes: int, tf32x3: bool = False) -> int:
    """Shared-memory estimate: the pipelined A and B tiles of a GEMM (a pre-split operand
    brings two tiles: head and remainder, of either side), one tile for a pointwise pass. The
    recurrence stages its h tile and W's slice for tl.dot: streamed, BLOCK_M rows of h and a
    BLOCK_K x BLOCK_N slice of W per stage; RESIDENT, the widest reduction `plan()` allows
    (RESIDENT_MAX_K at 16 rows), half as much again where the config may run 3xTF32
    (`tf32x3`: the split operands). Compiled sizes for sm_80/89/90 and gfx942 are at most these
    (tests/test_config_spaces.py compiles the worst cases), except Triton's own tf32x3 dot in
    the GEMM tiles, which stages its split operands too: compiled for sm_90 / sm_100 (every
    config of every profile, a review on 2026-11-24) up to 0.6 of one more stage over this
    (64x256x32 s3: 147456 B vs 122880), every one still under its device's limit. Adding a
    whole stage for it would drop a TMA 128x256x32 s4 tile that compiles to 213032 B of 232448."""
    if family == GEMM:
        stages = max(1, config["num_stages"])
        bm, bn = config["BLOCK_M"], config["BLOCK_N"]
        rows = bm + bn + (max(bm, bn) if config.get("PRESPLIT") else 0)
        return stages * rows * config["BLOCK_K"] * elem_bytes
    if family == RECURRENCE:
        streamed = (config["BLOCK_M"] + config["BLOCK_N"]) * config["BLOCK_K"] * elem_bytes * max(1, config["num_stages"])
        resident = 0
        if config.get("RESIDENT"):
            resident = (16 + config["BLOCK_N"]) * config["RESIDENT_MAX_K"] * elem_bytes
            if tf32x3 and "tf32x3" in config.get("precisions", ("tf32x3",)):
                resident += resident // 2
        return max(streamed, resident)
    return config["BLOCK_M"] * config["BLOCK_N"] * 4  # at most one fp32 layout conversion


def _has_tma(profile) -> bool:
    arch = profile.arch
    return profile.vendor == "nvidia" and arch.startswith("sm_") and int(arch[3:].rstrip("a")) >= 90


def _pow2(v: int) -> bool:
    return v > 0 and (v & (v - 1)) == 0


def validate(profile, family: str, config: dict) -> List[str]:
    """Problems of `config` on `profile` (empty when valid)."""
    problems = []
    for k, v in meta_of(config).items():
        if k.startswith("BLOCK_") and not _pow2(v):
            problems.append(f"{k}={v} is not a power of two")
    if family == GEMM and min(config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]) < 16:
        problems.append("tl.dot needs blocks of at least 16")
    if family == RECURRENCE:
        if config["BLOCK_N"] < 16 or config["BLOCK_K"] < 16:
            problems.append("tl.dot needs blocks of at least 16")
        if not _pow2(config.get("K_SPLIT", 1)):
            problems.append(f"K_SPLIT={config.get('K_SPLIT')} is not a power of two")
    w, s = config["num_warps"], config["num_stages"]
    if not _pow2(w) or w > profile.max_num_warps:
        problems.append(f"num_warps={w} outside powers of two <= {profile.max_num_warps}")
    if profile.name == "rtx4090":
        if w not in (4, 8):
            problems.append(f"num_warps={w} not in {{4, 8}} (4090 rule)")
        if s not in (2, 3):
            problems.append(f"num_stages={s} not in {{2, 3}} (4090 rule)")
    if profile.vendor == "amd":
        want = 2 if family == GEMM else 1
        if s != want:
            problems.append(f"num_stages={s}, AMD rule is {want} for family {family}")
    elif any(k in config for k in AMD_KEYS):
        problems.append("AMD knobs on a non-ROCm profile")
    if config.get("PRESPLIT") and not (config.get("TMA") and config.get("precisions") == ("tf32x3",)
                                       and config.get("dtypes") == ("float32",)):
        problems.append("PRESPLIT is 3xTF32 on fp32 TMA tiles: needs TMA=True, precisions=('tf32x3',), "
                        "dtypes=('float32',)")
    if config.get("WXT") and not (config.get("TMA") and "tf32x3" not in config.get("precisions", ("tf32x3",))
                                  and _pow2(config.get("SPLIT_K", 0))):
        problems.append("WXT tiles are TMA=True, a power-of-two SPLIT_K, and not for 3xTF32 (precisions without "
                        "'tf32x3')")
    if config.get("GLUON") and not (config.get("PRESPLIT") and profile.vendor == "nvidia"
                                    and profile.arch.rstrip("a") == "sm_90"):
        problems.append(f"GLUON is a pre-split 3xTF32 kernel on wgmma: needs PRESPLIT and sm_90, profile arch is "
                        f"{profile.arch}")
    if config.get("PERSISTENT") and not (config.get("TMA") and not config.get("PRESPLIT") and not config.get("WXT")):
        problems.append("PERSISTENT is the eval kernel's TMA tile walked by one program per multiprocessor: needs "
                        "TMA=True, not PRESPLIT or WXT")
    if config.get("SMALL") and any(config.get(k) for k in ("TMA", "PRESPLIT", "GLUON", "WXT", "PERSISTENT")):
        problems.append("SMALL tiles are pointer tiles for inline launches: no TMA, PRESPLIT, GLUON, WXT or "
                        "PERSISTENT")
    if config.get("TMA") and not _has_tma(profile):
        problems.append(f"TMA needs a Hopper-class GPU (sm_90+), profile arch is {profile.arch}")
    dtypes = config.get("dtypes", ("float32",) + HALF)
    elem = 4 if "float32" in dtypes else 2
    need = smem_bytes(config, family, elem, tf32x3=elem == 4 and "tf32x3" in profile.dot_precisions)
    if need > profile.smem_per_block:
        problems.append(f"needs ~{need} B shared memory, limit {profile.smem_per_block}")
    return problems


def search_order(space: List[dict]) -> List[dict]:
    """The order the tuner times a space in: the kernels built for one precision or layout
    first (Gluon's hand-placed MMA waits, pre-split 3xTF32, W x^T, TMA tiles), then the
    generic pointer tiles, each group in its listed order. The tuner stops at its time budget,
    which a long space outruns on a cold compile cache (H100, 16384x4096->4096 at 3xTF32:
    ~3 s a config; budget reached after the pointer and TMA tiles, 5.83 ms picked where the
    Gluon tile, listed last, measured 5.22-5.55); these kernels won every case of their kind
    measured so far."""
    return sorted(space, key=lambda c: (not c.get("GLUON"), not c.get("PRESPLIT"), not c.get("WXT"),
                                        not c.get("TMA")))


def heuristic_pick(space: List[dict], m: int) -> dict:
    """With autotuning off: the first entry whose BLOCK_M does not exceed the batch by more
    than 2x (small batches waste less of the tile); else the one with the smallest BLOCK_M."""
    for config in space:
        if config["BLOCK_M"] <= max(16, 2 * m):
            return config
    return min(space, key=lambda c: c["BLOCK_M"])
