"""The tuner: shape keys, never slower than unfused, budget, heuristic mode, and the disk cache.

Nothing here runs a kernel: the timer is a stub that calls the candidate, which returns its
pretend time in ms (timer=lambda fn: fn()).
"""
import json
import logging
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

from conftest import requires_gpu
from fusion_backend import autotune, config_spaces
from fusion_backend.autotune import Choice, Tuner, bucket, make_key
from fusion_backend.devices import INTERPRETER, from_properties

H100_PROPS = {
    "name": "NVIDIA H100 80GB HBM3", "major": 9, "minor": 0, "multi_processor_count": 132, "warp_size": 32,
    "shared_memory_per_block": 49152, "shared_memory_per_block_optin": 232448,
}
DEVICE = H100_PROPS["name"]
PROFILE = from_properties(H100_PROPS, is_hip=False)
# in the order the tuner times it (config_spaces.search_order), so that index = timing order
SPACE = config_spaces.search_order(config_spaces.for_dtype(config_spaces.space_for(PROFILE, config_spaces.GEMM),
                                                           torch.float32))
M, K, N = 100, 64, 48
KEY = make_key("eval:test_pattern", PROFILE.name, torch.float32, "tf32x3", M, K=K, N=N)


def stub_timer(fn):
    return fn()


def fused_times(fastest=2, fastest_ms=0.5):
    """run_fused for SPACE: config i takes 1 + i ms, except `fastest`."""
    def run_fused(config):
        i = SPACE.index(config)
        return fastest_ms if i == fastest else 1.0 + i
    return run_fused


def choose(tuner, key=KEY, **kw):
    args = dict(profile=PROFILE, space=SPACE, m=M, src_hash="src1", device_name=DEVICE, autotune=True,
                budget_s=30.0, run_fused=fused_times(), run_unfused=lambda: 0.9)
    args.update(kw)
    return tuner.choose(key, **args)


def _cache_path():
    return autotune.cache_file(DEVICE)


# ----------------------------------------------------------------------------- keys

@pytest.mark.parametrize("m, b", [(0, 0), (1, 1), (2, 2), (3, 4), (8, 8), (13, 16), (64, 64), (65, 128), (-1, 0)])
def test_bucket(m, b):
    assert bucket(m) == b


def test_make_key_buckets_m_keeps_k_n():
    key = make_key("gemm", "nvidia", torch.float32, "tf32", 13, K=100, N=37)
    assert key == "gemm|nvidia|float32|tf32|M<=16|K=100|N=37"
    assert all(make_key("gemm", "nvidia", torch.float32, "tf32", m, K=100, N=37) == key for m in range(9, 17))
    assert make_key("gemm", "nvidia", torch.float32, "tf32", 17, K=100, N=37) != key
    assert make_key("gemm", "nvidia", torch.float32, "tf32", 13, K=101, N=37) != key
    assert make_key("gemm", "nvidia", torch.float32, "tf32", 13, K=100, N=36) != key
    assert make_key("gemm", "nvidia", torch.float16, "tf32", 13, K=100, N=37) != key
    assert make_key("gemm", "nvidia", torch.float32, "ieee", 13, K=100, N=37) != key
    assert make_key("gemm", "rtx4090", torch.float32, "tf32", 13, K=100, N=37) != key
    # keyword order does not matter
    assert make_key("gemm", "nvidia", torch.float32, "tf32", 13, N=37, K=100) == key


def test_source_hashes_are_the_same_in_every_process():
    """The disk cache is keyed by the patterns' source hashes: they must not change between
    processes (a plain Python function hashed by its repr, an address, did for the RNN cell)."""
    code = ("import fusion_backend.patterns.cat_linear_tanh as c, fusion_backend.patterns.linear_bn_gelu_relu as l; "
            "print(c._SRC, l._SRC)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(__file__)),
                                                       os.environ.get("PYTHONPATH", "")]))
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
            for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:]
    first, second = (r.stdout.split() for r in runs)
    assert first == second and len(first) == 2


def test_source_hashes_cover_the_triton_lib_helpers(tmp_path):
    """The kernels call triton_lib's helpers (the GEMM main loop among them): an edit there
    is an edit of every kernel, so no cached choice survives it."""
    import shutil

    root = os.path.dirname(os.path.dirname(__file__))
    shutil.copytree(os.path.join(root, "fusion_backend"), tmp_path / "fusion_backend")
    with open(tmp_path / "fusion_backend" / "triton_lib.py", "a") as f:
        f.write("\n# an edit\n")
    code = ("import fusion_backend.patterns.cat_linear_tanh as c, fusion_backend.patterns.linear_bn_gelu_relu as l; "
            "print(c._SRC, l._SRC)")
    edited = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert edited.returncode == 0, edited.stderr[-2000:]
    import fusion_backend.patterns.cat_linear_tanh as cell
    import fusion_backend.patterns.linear_bn_gelu_relu as block

    cell_src, block_src = edited.stdout.split()
    assert cell_src != cell._SRC and block_src != block._SRC


def test_source_hash_refuses_what_has_no_source():
    assert autotune.source_hash(bucket) == autotune.source_hash(bucket)
    with pytest.raises(TypeError, match="neither a Triton kernel, a Python function nor a module"):
        autotune.source_hash(object())


# ----------------------------------------------------------------------------- choosing

def test_picks_fastest_fused_config(tmp_cache):
    tuner = Tuner(timer=stub_timer)
    choice = choose(tuner, run_unfused=lambda: 5.0)
    assert choice.source == "tuned"
    assert choice.config is SPACE[2]
    assert (choice.fused_ms, choice.unfused_ms) == (0.5, 5.0)
    # every config and the unfused path, then the winner and the unfused path twice more
    assert autotune.stats["benchmarked"] == len(SPACE) + 1 + 2 * autotune.CONFIRM_ROUNDS
    assert autotune.stats["tuned"] == 1
    # a second call is answered from memory
    assert choose(tuner, run_unfused=lambda: 5.0) is choice
    assert autotune.stats["benchmarked"] == len(SPACE) + 1 + 2 * autotune.CONFIRM_ROUNDS


def test_never_slower_than_unfused(tmp_cache):
    tuner = Tuner(timer=stub_timer)
    choice = choose(tuner, run_unfused=lambda: 0.4)  # best fused is 0.5 ms
    assert choice.config is None
    assert choice.source == "tuned"
    assert (choice.fused_ms, choice.unfused_ms) == (0.5, 0.4)
    assert "unfused" in choice.describe()


@pytest.mark.parametrize("unfused_ms,fused_wins", [(0.5 / 0.97 - 1e-6, False), (0.52, True), (0.5, False)])
def test_fused_must_win_by_the_margin(tmp_cache, unfused_ms, fused_wins):
    """A tie or a win inside FUSED_MARGIN goes to the unfused path (Inductor)."""
    assert autotune.FUSED_MARGIN == 0.97
    choice = choose(Tuner(timer=stub_timer), run_unfused=lambda: unfused_ms)  # best fused: 0.5 ms
    assert (choice.config is SPACE[2]) == fused_wins, choice.describe()


def test_confirmation_rounds_are_interleaved_and_decide(tmp_cache):
    """The search times the unfused path once, first; the decision uses interleaved
    re-timings. Here every measurement runs 1% slower than the one before (a GPU heating
    up): the search's figures (fused 0.5 ms measured 4th, unfused 0.53 measured 1st) differ
    by less than the margin, the interleaved ones by the true 6%, and fused wins."""
    count = []

    def drifting_timer(fn):
        count.append(1)
        return fn() * (1 + 0.01 * len(count))

    calls = []
    run_fused = fused_times()
    choice = choose(Tuner(timer=drifting_timer), run_unfused=lambda: calls.append("u") or 0.53,
                    run_fused=lambda c: calls.append("f") or run_fused(c))
    assert calls[-2 * autotune.CONFIRM_ROUNDS:] == ["u", "f"] * autotune.CONFIRM_ROUNDS
    assert 0.5 * 1.04 > autotune.FUSED_MARGIN * 0.53 * 1.01  # the search alone would not fuse
    assert choice.config is SPACE[2], choice.describe()


def test_close_configs_go_to_an_interleaved_runoff(tmp_cache):
    """Each config is timed once in the search; those within RUNOFF_SPREAD of the best are
    timed again with the unfused path, interleaved, and the re-timings pick the winner. Here
    config 1 wins the search by 3% but config 0 is faster in every re-timing; config 2 (6%
    off) and the rest are not re-timed."""
    assert autotune.RUNOFF_SPREAD == 1.05 and autotune.RUNOFF_MAX >= 2
    search = {0: 1.03, 1: 1.0, 2: 1.06}
    calls = []

    def run_fused(config):
        i = SPACE.index(config)
        calls.append(i)
        if len(calls) <= len(SPACE) + 1:  # the search (after the unfused path)
            return search.get(i, 2.0 + i)
        return {0: 0.95, 1: 1.01}[i]  # the re-timings: only configs 0 and 1 get here

    choice = choose(Tuner(timer=stub_timer), run_fused=run_fused, run_unfused=lambda: calls.append("u") or 5.0)
    assert choice.config is SPACE[0] and choice.fused_ms == 0.95, choice.describe()
    assert calls[len(SPACE) + 1:] == ["u", 1, 0] * autotune.CONFIRM_ROUNDS  # fastest first, then the rest
    assert autotune.stats["benchmarked"] == len(SPACE) + 1 + 3 * autotune.CONFIRM_ROUNDS


def test_runoff_without_an_unfused_path(tmp_cache):
    """No unfused path to compare with: close configs are still re-timed, and decide."""
    retimed = {0: 0.9, 1: 1.2}
    seen = []

    def run_fused(config):
        i = SPACE.index(config)
        seen.append(i)
        return (1.02 if i == 0 else 1.0 if i == 1 else 3.0) if len(seen) <= len(SPACE) else retimed[i]

    choice = choose(Tuner(timer=stub_timer), run_fused=run_fused, run_unfused=None)
    assert choice.config is SPACE[0] and choice.unfused_ms is None


@pytest.mark.kernel_failure_expected  # every candidate fails on purpose
def test_failing_candidates_are_not_chosen(tmp_cache):
    def run_fused(config):
        if SPACE.index(config) in (0, 2):
            raise RuntimeError("out of resources")
        return 1.0 + SPACE.index(config)

    choice = choose(Tuner(timer=stub_timer), run_fused=run_fused, run_unfused=lambda: 9.0)
    assert choice.config is SPACE[1]

    def all_fail(config):
        raise RuntimeError("does not compile")

    choice = choose(Tuner(timer=stub_timer), key=KEY + "|other", run_fused=all_fail, run_unfused=lambda: 9.0)
    assert choice.config is None and choice.unfused_ms == 9.0 and choice.fused_ms is None


@pytest.mark.kernel_failure_expected  # every candidate fails on purpose
def test_a_search_where_every_fused_config_failed_is_not_cached(tmp_cache):
    """Every candidate failing (an out-of-memory or compile hiccup that may pass) leaves this
    process unfused, but is not written to disk: it was served to every later process as
    "unfused is faster", for good, without a fused time ever measured."""
    failing = [True]

    def flaky(config):
        if failing[0]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return fused_times()(config)

    tuner = Tuner(timer=stub_timer)
    first = choose(tuner, run_fused=flaky)
    assert first.config is None and first.fused_ms is None and choose(tuner, run_fused=flaky) is first
    failing[0] = False
    again = choose(Tuner(timer=stub_timer), run_fused=flaky)  # the next process
    assert again.source == "tuned" and again.config is SPACE[2]


def test_a_cached_choice_is_not_served_for_a_grown_space(tmp_cache):
    """A config added to the space since the key was tuned (a new release) is timed: the cached
    choice, made without it, used to be served as long as its own config was still there."""
    slow = lambda config: 5.0  # noqa: E731
    assert choose(Tuner(timer=stub_timer), space=SPACE[:3], run_fused=slow).config is None
    grown = choose(Tuner(timer=stub_timer), run_fused=lambda c: 0.1 if c is SPACE[5] else 5.0)
    assert grown.source == "tuned" and grown.config is SPACE[5]


@pytest.fixture
def one_second_each(monkeypatch):
    """A timer (for Tuner(timer=...)) whose every timing advances the tuner's clock by one
    second: budgets cut searches at known points (the tuner reads time.perf_counter only)."""
    class Clock:
        now = 0.0

        def perf_counter(self):
            return self.now

    clock = Clock()
    monkeypatch.setattr(autotune, "time", clock)

    def timer(fn):
        clock.now += 1.0
        return fn()

    return timer


def test_respects_time_budget(tmp_cache, one_second_each):
    last = len(SPACE) - 1  # the fastest config comes last: the budget stops before it
    choice = choose(Tuner(timer=one_second_each), budget_s=2.5, run_fused=fused_times(fastest=last),
                    run_unfused=lambda: 50.0)
    # unfused (t=1), config 0 (t=2), config 1 (t=3 > 2.5): stop; then the confirmation rounds
    assert autotune.stats["benchmarked"] == 3 + 2 * autotune.CONFIRM_ROUNDS
    assert choice.config is SPACE[0]
    assert len(SPACE) > 3


def test_a_search_cut_short_serves_only_callers_with_no_larger_budget(tmp_cache, one_second_each):
    """A search its budget stopped is cached as partial: the next process searches again (its
    Triton compiles are cached now), and after PARTIAL_TRIES such searches a process with the
    same (or a smaller) budget takes the choice; one with a larger budget searches again (the
    cut-short choice used to be served for good, whatever the budget)."""
    last = len(SPACE) - 1
    kw = dict(run_fused=fused_times(fastest=last), run_unfused=lambda: 50.0)
    assert autotune.PARTIAL_TRIES == 2
    assert choose(Tuner(timer=one_second_each), budget_s=2.5, **kw).config is SPACE[0]
    assert choose(Tuner(timer=one_second_each), budget_s=2.5, **kw).source == "tuned"
    assert choose(Tuner(timer=one_second_each), budget_s=2.5, **kw).source == "cache"
    assert choose(Tuner(timer=one_second_each), budget_s=1.0, **kw).source == "cache"
    full = choose(Tuner(timer=one_second_each), budget_s=1e9, **kw)
    assert full.source == "tuned" and full.config is SPACE[last]
    # complete now: every budget takes it
    again = choose(Tuner(timer=one_second_each), budget_s=2.5, **kw)
    assert again.source == "cache" and again.config is SPACE[last]


def test_a_search_cut_short_in_this_process_is_searched_again_for_a_larger_budget(tmp_cache, one_second_each):
    """In one process too (two models with different tune_budget_s sharing a key): the
    in-memory choice of a cut-short search used to answer before any budget check."""
    last = len(SPACE) - 1
    kw = dict(run_fused=fused_times(fastest=last), run_unfused=lambda: 50.0)
    tuner = Tuner(timer=one_second_each)
    short = choose(tuner, budget_s=2.5, **kw)
    assert short.config is SPACE[0] and choose(tuner, budget_s=2.5, **kw) is short
    assert choose(tuner, budget_s=1.0, **kw) is short
    full = choose(tuner, budget_s=1e9, **kw)
    assert full.source == "tuned" and full.config is SPACE[last]
    assert choose(tuner, budget_s=2.5, **kw) is full


def test_a_launch_with_a_larger_budget_searches_again(tmp_cache, monkeypatch, one_second_each):
    """What the ops call (`_common.launch`) used to serve any choice it had, a search cut short
    by a smaller tune_budget_s (another model's, or another op sharing the key) included."""
    from fusion_backend.patterns import _common

    monkeypatch.setattr(autotune, "TUNER", Tuner(timer=one_second_each))
    last = len(SPACE) - 1
    launched = [_common.kernel_kwargs(c, PROFILE) for c in SPACE]
    pretend = fused_times(fastest=last)

    def launch(budget):
        return _common.launch(KEY, ctx_args=(PROFILE, True, budget, torch.device("cpu")), space=lambda: SPACE, m=M,
                              run_fused=lambda kw: pretend(SPACE[launched.index(kw)]), run_unfused=lambda: 50.0,
                              run_reference=lambda: None, src_hash="src1")

    launch(2.5)
    assert autotune.TUNER.lookup(KEY).config is SPACE[0]
    launch(2.5)
    assert autotune.TUNER.lookup(KEY).config is SPACE[0]
    assert launch(1e9) == 0.5 and autotune.TUNER.lookup(KEY).config is SPACE[last]


def test_one_key_is_tuned_once_and_searches_do_not_overlap(tmp_cache):
    """Two threads meeting one untuned key: one searches, the other waits and takes its
    choice; no timing runs while another search's candidate runs."""
    import threading
    import time

    lock, busy, overlaps = threading.Lock(), [0], [0]

    def timer(fn):  # a timing that notices another one running meanwhile
        with lock:
            busy[0] += 1
            overlaps[0] += busy[0] > 1
        time.sleep(0.002)
        with lock:
            busy[0] -= 1
        return fn()

    tuner = Tuner(timer=timer)
    space = SPACE[:4]
    choices = []
    threads = [threading.Thread(target=lambda: choices.append(choose(tuner, space=space))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert autotune.stats["tuned"] == 1 and overlaps[0] == 0
    assert len(choices) == 3 and all(c is choices[0] for c in choices)


@pytest.mark.parametrize("pattern", ["eval", "cell"])
def test_batches_of_one_key_get_one_space(tmp_cache, pattern):
    """Batches 400 and 500 of a 2048x2048 GEMM share a key (M<=512): the space, inline tiles
    only or all of them (INLINE_MAX_FLOP), is chosen by the bucket's M, so the second batch is
    a cache hit (by the exact M, 400 got the inline space and 500 the full one, and each new
    process re-tuned the other's entry away)."""
    from fusion_backend.patterns._common import gemm_flop
    from fusion_backend.patterns.cat_linear_tanh import cell_space
    from fusion_backend.patterns.linear_bn_gelu_relu import eval_space

    K = N = 2048
    space_of = eval_space if pattern == "eval" else cell_space
    spaces = [space_of(PROFILE, torch.float32, "tf32x3", gemm_flop(m, N, K)) for m in (400, 500)]
    assert spaces[0] == spaces[1]
    key = make_key("eval:test_pattern", PROFILE.name, torch.float32, "tf32x3", 400, K=K, N=N)
    assert key == make_key("eval:test_pattern", PROFILE.name, torch.float32, "tf32x3", 500, K=K, N=N)
    first = choose(Tuner(timer=stub_timer), key=key, space=spaces[0], m=400,
                   run_fused=lambda c: 0.1 + spaces[0].index(c) * 0.01, run_unfused=lambda: 5.0)
    second = choose(Tuner(timer=stub_timer), key=key, space=spaces[1], m=500,
                    run_fused=lambda c: 0.1 + spaces[1].index(c) * 0.01, run_unfused=lambda: 5.0)
    assert first.source == "tuned" and second.source == "cache" and second.config == first.config


def test_autotune_off_benchmarks_nothing(tmp_cache):
    before = autotune.stats["benchmarked"]
    choice = choose(Tuner(timer=stub_timer), autotune=False, m=32)
    assert choice.source == "heuristic"
    assert choice.config is config_spaces.heuristic_pick(SPACE, 32)
    assert autotune.stats["benchmarked"] == before
    assert not tmp_cache.exists() or not any(tmp_cache.iterdir()), "heuristic choices are not written to disk"


def test_single_config_without_unfused_path_is_not_benchmarked(tmp_cache):
    choice = choose(Tuner(timer=stub_timer), space=SPACE[:1], run_unfused=None)
    assert choice.source == "heuristic" and choice.config is SPACE[0]
    assert autotune.stats["benchmarked"] == 0


def test_interpreter_uses_its_one_config(tmp_cache):
    space = config_spaces.space_for(INTERPRETER, config_spaces.GEMM)

    def boom(fn):
        raise AssertionError("nothing may be timed under the interpreter")

    choice = choose(Tuner(timer=boom), profile=INTERPRETER, space=space)
    assert choice.source == "fixed" and choice.config is space[0]
    assert autotune.stats["benchmarked"] == 0


def test_autotune_after_heuristic_still_tunes(tmp_cache):
    tuner = Tuner(timer=stub_timer)
    assert choose(tuner, autotune=False).source == "heuristic"
    assert choose(tuner, autotune=True).source == "tuned"


def test_choice_describe():
    assert autotune.TUNER.lookup(KEY) is None
    autotune.TUNER.record(KEY, Choice(SPACE[0], "tuned", 1.0, 2.0))
    text = autotune.TUNER.lookup(KEY).describe()
    assert "BLOCK_M=128" in text and "(tuned)" in text and "unfused 2.0 ms" in text


# ----------------------------------------------------------------------------- disk cache

def test_cache_hit_in_a_new_tuner(tmp_cache):
    first = choose(Tuner(timer=stub_timer))
    assert first.source == "tuned"
    path = _cache_path()
    assert os.path.dirname(path) == str(tmp_cache) and os.path.exists(path)
    benchmarked = autotune.stats["benchmarked"]
    second = choose(Tuner(timer=stub_timer))
    # the space's own entry (tuples intact: JSON stores them as lists), a pre-split 3xTF32 tile here
    assert second.source == "cache" and second.config is first.config and first.config.get("PRESPLIT")
    assert autotune.stats["benchmarked"] == benchmarked and autotune.stats["cache_hits"] == 1
    # other kernel source or another device: tuned again
    assert choose(Tuner(timer=stub_timer), src_hash="src2").source == "tuned"
    assert choose(Tuner(timer=stub_timer), device_name="NVIDIA A100-SXM4-80GB").source == "tuned"


def test_cached_choice_of_another_decision_rule_is_not_reused(tmp_cache, monkeypatch):
    assert choose(Tuner(timer=stub_timer)).source == "tuned"
    assert choose(Tuner(timer=stub_timer)).source == "cache"
    monkeypatch.setattr(autotune, "FUSED_MARGIN", 0.9)
    assert choose(Tuner(timer=stub_timer)).source == "tuned"


def test_cached_unfused_choice(tmp_cache):
    first = choose(Tuner(timer=stub_timer), run_unfused=lambda: 0.1)
    assert first.config is None and first.runner_up is SPACE[2]  # the fastest fused config, kept
    again = choose(Tuner(timer=stub_timer), run_unfused=lambda: 0.1)
    assert again.source == "cache" and again.config is None and again.runner_up is SPACE[2]


def test_cached_config_outside_space_is_not_served(tmp_cache):
    assert choose(Tuner(timer=stub_timer)).config is SPACE[2]
    smaller = [c for c in SPACE if c is not SPACE[2]]
    choice = choose(Tuner(timer=stub_timer), space=smaller)
    assert choice.source == "tuned"  # re-tuned, not served from disk
    assert choice.config is None or choice.config in smaller


_SCRIPT = """
import json, sys
import torch
from fusion_backend import autotune, config_spaces
from fusion_backend.devices import from_properties

profile = from_properties({props!r}, is_hip=False)
space = config_spaces.search_order(config_spaces.for_dtype(config_spaces.space_for(profile, "gemm"), torch.float32))
key = autotune.make_key("eval:test_pattern", profile.name, torch.float32, "tf32x3", {m}, K={k}, N={n})
times = [1.0 + i for i in range(len(space))]
times[2] = 0.25
tuner = autotune.Tuner(timer=lambda fn: fn())
choice = tuner.choose(key, profile=profile, space=space, m={m}, src_hash="src1", device_name={device!r},
                      autotune=True, budget_s=30.0, run_fused=lambda c: times[space.index(c)],
                      run_unfused=lambda: 3.0)
print(json.dumps({{"source": choice.source, "config": choice.config,
                  "benchmarked": autotune.stats["benchmarked"], "file": autotune.cache_file({device!r})}}))
"""


def test_cache_round_trip_across_processes(tmp_cache, tmp_path):
    script = tmp_path / "tune.py"
    script.write_text(_SCRIPT.format(props=H100_PROPS, m=M, k=K, n=N, device=DEVICE))
    env = dict(os.environ, FUSEDTRITON_CACHE_DIR=str(tmp_cache))

    def run():
        proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    first = run()
    assert first["source"] == "tuned" and first["benchmarked"] == len(SPACE) + 1 + 2 * autotune.CONFIRM_ROUNDS
    assert first["file"].startswith(str(tmp_cache)) and os.path.exists(first["file"])
    second = run()
    assert second["source"] == "cache"
    assert second["benchmarked"] == 0
    assert second["config"] == first["config"]
    # and this process reads the same file the same way
    hit = choose(Tuner(timer=stub_timer))
    assert hit.source == "cache" and hit.config == SPACE[2]


_BAD_FILES = {
    "garbage": b"\x00\xff\xfe garbage \x89PNG\r\n",
    "truncated": None,  # a valid cache file cut in half
    "foreign-schema": json.dumps({"schema": 99, "entries": {}}).encode(),
    "foreign-list": json.dumps([1, 2, 3]).encode(),
    "foreign-other-env": None,  # right schema, another Triton/torch version
}


@pytest.mark.parametrize("kind", list(_BAD_FILES))
def test_bad_cache_file_is_ignored_with_one_warning(kind, tmp_cache, caplog):
    choose(Tuner(timer=stub_timer), key=KEY + "|seed")  # writes a valid file
    path = _cache_path()
    with open(path, "rb") as f:
        valid = f.read()
    content = _BAD_FILES[kind]
    if kind == "truncated":
        content = valid[: len(valid) // 2]
    elif kind == "foreign-other-env":
        data = json.loads(valid)
        data["environment"] = data["environment"].replace("triton=", "triton=0.0.0-")
        content = json.dumps(data).encode()
    with open(path, "wb") as f:
        f.write(content)

    caplog.set_level(logging.WARNING, logger="fusion_backend")
    tuner = Tuner(timer=stub_timer)
    choice = choose(tuner)
    assert choice.source == "tuned" and choice.config is SPACE[2]
    assert choose(Tuner(timer=stub_timer), key=KEY + "|more").source in ("tuned", "cache")
    warnings = [r for r in caplog.records if r.name == "fusion_backend" and r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "ignoring autotune cache" in warnings[0].getMessage()
    if kind.startswith("foreign-") and kind != "foreign-list":
        # another version's well-formed cache stays for that version
        with open(path, "rb") as f:
            assert f.read() == content
        return
    # a corrupt file was replaced by a valid one holding the new key
    with open(path) as f:
        data = json.load(f)
    assert data["schema"] == 1
    assert any(k.startswith(KEY + "|src=") for k in data["entries"])


@pytest.mark.parametrize("bad", ["0.5", [1], True, math.nan, math.inf, -5.0, 10 ** 400])
def test_cache_entry_with_bad_times_is_tuned_again(bad, tmp_cache):
    """A hand-edited entry whose times are not finite, non-negative numbers is tuned again, not
    served (describe() and the run-time trial's rule would fail on it later: NaN and negative
    times turned the trial on, 10**400 raised OverflowError inside the backend)."""
    choose(Tuner(timer=stub_timer))
    path = _cache_path()
    with open(path) as f:
        data = json.load(f)
    for entry in data["entries"].values():
        entry["fused_ms"] = bad
    with open(path, "w") as f:
        json.dump(data, f)
    choice = choose(Tuner(timer=stub_timer))
    assert choice.source == "tuned" and isinstance(choice.fused_ms, float)
    choice.describe()


@pytest.mark.parametrize("tries", ["NaN", "Infinity", "1e999"])
def test_cache_entry_with_non_finite_partial_tries_is_searched_again(tries, tmp_cache):
    """A hand-edited entry of a search cut short whose try count is NaN or infinite (JSON
    reads both) raised ValueError/OverflowError in every process instead of being searched again."""
    choose(Tuner(timer=stub_timer))
    path = _cache_path()
    with open(path) as f:
        data = json.load(f)
    for entry in data["entries"].values():
        entry.update(partial_budget_s=5.0, partial_tries="@")
    with open(path, "w") as f:
        f.write(json.dumps(data).replace('"@"', tries))
    choice = choose(Tuner(timer=stub_timer), budget_s=5.0)
    assert choice.source == "tuned" and isinstance(choice.fused_ms, float)


def test_unwritable_cache_dir_does_not_break_tuning(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv(autotune.CACHE_ENV, str(blocker))
    choice = choose(Tuner(timer=stub_timer))
    assert choice.source == "tuned" and choice.config is SPACE[2]


def test_cache_file_takes_the_umask_not_0600(tmp_cache):
    """A cache shared by a group: the file is made as any other (mkstemp's 0600 survived
    os.replace, so the next user could not read it and replaced it with their own entries)."""
    old = os.umask(0o002)
    try:
        choose(Tuner(timer=stub_timer))
    finally:
        os.umask(old)
    assert os.stat(_cache_path()).st_mode & 0o777 == 0o664


def test_cache_write_leaves_the_process_umask_alone(tmp_cache, monkeypatch):
    """Reading the umask means setting it, process-wide: files other threads made meanwhile
    got mode 0666. The cache file gets the umask from the kernel instead (test above)."""
    def no_umask(mask):
        raise AssertionError("os.umask called")

    monkeypatch.setattr(autotune.os, "umask", no_umask)
    assert choose(Tuner(timer=stub_timer)).source == "tuned"
    assert os.path.exists(_cache_path())


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file: no unreadable cache to make")
def test_unreadable_cache_file_is_left_as_it_is(tmp_cache, caplog):
    choose(Tuner(timer=stub_timer))
    path = _cache_path()
    with open(path) as f:
        before = f.read()
    os.chmod(path, 0)
    try:
        with caplog.at_level(logging.WARNING, logger="fusion_backend"):
            key = make_key("eval:test_pattern", PROFILE.name, torch.float32, "tf32x3", M, K=1, N=2)
            assert choose(Tuner(timer=stub_timer), key=key).source == "tuned"
    finally:
        os.chmod(path, 0o644)
    with open(path) as f:
        assert f.read() == before  # another user's entries are not dropped
    assert "not readable" in caplog.text


def test_cache_file_of_another_version_is_left_as_it_is(tmp_cache, caplog):
    """A well-formed cache of another schema (a newer fusedtriton under the same file name) is
    ignored when read and never replaced: its entries stay for the version that wrote them."""
    choose(Tuner(timer=stub_timer))
    path = _cache_path()
    with open(path) as f:
        data = json.load(f)
    data["schema"] = "future"
    with open(path, "w") as f:
        json.dump(data, f)
    with open(path) as f:
        before = f.read()
    with caplog.at_level(logging.WARNING, logger="fusion_backend"):
        key = make_key("eval:test_pattern", PROFILE.name, torch.float32, "tf32x3", M, K=1, N=3)
        assert choose(Tuner(timer=stub_timer), key=key).source == "tuned"
    with open(path) as f:
        assert f.read() == before
    warnings = [r.getMessage() for r in caplog.records if r.name == "fusion_backend" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "ignoring autotune cache" in warnings[0], warnings


def test_file_system_without_locks_still_gets_the_cache(tmp_cache, monkeypatch):
    """flock refused (ENOLCK on some NFS mounts): the entry is written all the same (atomic
    replace), not dropped with a warning at every key."""
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert choose(Tuner(timer=stub_timer)).source == "tuned"
    assert choose(Tuner(timer=stub_timer)).source == "cache"


def _tune_as_another_user(cache_dir, result):
    """In a forked child: (as root, become `nobody` first) tune a new key into cache_dir."""
    try:
        if os.geteuid() == 0:
            os.setgid(65534)
            os.setuid(65534)
        os.environ[autotune.CACHE_ENV] = cache_dir
        key = make_key("eval:test_pattern", PROFILE.name, torch.float32, "tf32x3", M, K=7, N=7)
        result.put(choose(Tuner(timer=stub_timer), key=key).source)
    except BaseException as exc:  # reported to the parent, which fails with it
        result.put(repr(exc))


def test_shared_cache_folder_takes_another_users_entries(monkeypatch):
    """A folder shared by a group: the first user's files are 0644 (the usual umask), the
    second user's entry must still be merged in. The lock file was opened for appending,
    which needs write permission on it: every entry of the second user was dropped with a
    warning, and each of its processes tuned again."""
    shared = tempfile.mkdtemp(prefix="fusedtriton-shared-cache-")  # not under pytest's 0700 folder
    try:
        os.chmod(shared, 0o777)
        monkeypatch.setenv(autotune.CACHE_ENV, shared)
        assert choose(Tuner(timer=stub_timer)).source == "tuned"
        path = _cache_path()
        for name in (path, path + ".lock"):
            os.chmod(name, 0o644 if os.geteuid() == 0 else 0o444)  # as root the child is another user
        ctx = multiprocessing.get_context("fork")
        result = ctx.Queue()
        child = ctx.Process(target=_tune_as_another_user, args=(shared, result))
        child.start()
        child.join(120)
        assert result.get(timeout=5) == "tuned"
        with open(path) as f:
            assert len(json.load(f)["entries"]) == 2
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_failed_replace_leaves_no_temporary_file(tmp_cache, monkeypatch):
    def refuse(src, dst):
        raise OSError("replace refused")

    monkeypatch.setattr(autotune.os, "replace", refuse)
    choose(Tuner(timer=stub_timer))
    assert not [p.name for p in tmp_cache.iterdir() if p.name.endswith(".tmp")]


def _writer(worker, n_keys, barrier):
    barrier.wait(timeout=60)
    tuner = Tuner(timer=stub_timer)
    for j in range(n_keys):
        key = make_key("eval:test_pattern", PROFILE.name, torch.float32, "tf32x3", M, K=worker, N=j)
        choose(tuner, key=key)


def test_concurrent_writers_keep_every_key(tmp_cache):
    workers, n_keys = 4, 8
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(workers)
    procs = [ctx.Process(target=_writer, args=(w, n_keys, barrier)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * workers
    with open(_cache_path()) as f:
        data = json.load(f)
    assert data["schema"] == 1
    rule = f"|rule={autotune.rule()}|space={autotune._space_hash(SPACE)}"
    expected = {make_key("eval:test_pattern", PROFILE.name, torch.float32, "tf32x3", M, K=w, N=j) + "|src=src1" + rule
                for w in range(workers) for j in range(n_keys)}
    assert set(data["entries"]) == expected
    assert not [p.name for p in tmp_cache.iterdir() if p.name.endswith(".tmp")], "temporary files left behind"


# ----------------------------------------------------------------------------- on a GPU

@requires_gpu
def test_real_timer_on_gpu(tmp_cache):
    from fusion_backend.devices import device_profile

    profile = device_profile("cuda")
    if profile is None:
        pytest.skip("this GPU has no fusedtriton profile")
    a = torch.randn(256, 256, device="cuda")
    space = config_spaces.space_for(profile, config_spaces.GEMM)[:2]
    choice = Tuner().choose(KEY + "|gpu", profile=profile, space=space, m=256, src_hash="gpu",
                            device_name=torch.cuda.get_device_name(), autotune=True, budget_s=30.0,
                            run_fused=lambda c: a @ a, run_unfused=lambda: a @ a)
    assert choice.source == "tuned"
    assert choice.unfused_ms is not None and math.isfinite(choice.unfused_ms) and choice.unfused_ms > 0


# the budget and cache rules' cases a mutation audit found untested (twenty-first session)

def test_a_caller_without_autotune_takes_the_tuned_choice_whatever_its_budget(tmp_cache, one_second_each):
    last = len(SPACE) - 1
    tuner = Tuner(timer=one_second_each)
    short = choose(tuner, budget_s=2.5, run_fused=fused_times(fastest=last), run_unfused=lambda: 50.0)
    assert short.source == "tuned" and short.partial_budget_s == 2.5
    assert choose(tuner, autotune=False, budget_s=1e9) is short
    assert choose(tuner, autotune=False, budget_s=1e9).source == "tuned"


def test_a_cut_short_choice_read_from_disk_is_searched_again_for_a_larger_budget(tmp_cache, one_second_each):
    last = len(SPACE) - 1
    kw = dict(run_fused=fused_times(fastest=last), run_unfused=lambda: 50.0)
    for _ in range(autotune.PARTIAL_TRIES):
        assert choose(Tuner(timer=one_second_each), budget_s=2.5, **kw).source == "tuned"
    tuner = Tuner(timer=one_second_each)  # a new process
    assert choose(tuner, budget_s=2.5, **kw).source == "cache"
    full = choose(tuner, budget_s=1e9, **kw)  # another model of this process, with a larger budget
    assert full.source == "tuned" and full.config is SPACE[last]


def test_a_cached_time_of_zero_is_served(tmp_cache):
    import json
    choose(Tuner(timer=stub_timer))
    path = _cache_path()
    with open(path) as f:
        data = json.load(f)
    for entry in data["entries"].values():
        entry["fused_ms"] = 0.0
    with open(path, "w") as f:
        json.dump(data, f)
    assert choose(Tuner(timer=stub_timer)).source == "cache"


def test_a_timer_given_to_choose_times_the_key_and_keeps_its_own_cache_entries(tmp_cache):
    """The cell ops' launches that run as CUDA graph replays are timed by `gpu_time` (GPU time
    alone; the tuner's do_bench counted Triton's host launch path, which the replay removes):
    the override times every candidate, and its times are cached apart from do_bench's."""
    used = []

    def counting(fn):
        used.append(fn)
        return fn()

    def untouched(fn):
        raise AssertionError("the tuner's own timer ran")

    choice = choose(Tuner(timer=untouched), timer=counting)
    assert choice.source == "tuned" and len(used) >= len(SPACE) + 1
    assert choose(Tuner(timer=untouched), timer=counting).source == "cache"
    assert choose(Tuner(timer=stub_timer)).source == "tuned"  # do_bench's times: another entry
    with open(_cache_path()) as f:
        keys = list(json.load(f)["entries"])
    assert len(keys) == 2 and sum("|timer=counting" in k for k in keys) == 1
