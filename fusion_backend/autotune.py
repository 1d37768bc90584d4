"""Config choice per shape key: tuned once, cached on disk, never slower than the unfused path.

Key: kernel family, profile, dtype, dot precision, batch M bucketed to the next power of
two (dynamic batch sizes share a tuned result), and the exact other dims (K, N, ...).
The on-disk cache lives in $FUSEDTRITON_CACHE_DIR (default: $XDG_CACHE_HOME/fusedtriton or
~/.cache/fusedtriton), one JSON file per (device, Triton version, torch version); each entry
also carries the hash of the kernel source it was tuned for.

When a key is tuned, the unfused path (cuBLAS GEMM + pointwise, as Inductor would run the
site) is timed too, and the fused kernel is kept only if it is faster. A choice with
config None means "run unfused".
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import secrets
import threading
import time
from typing import Callable, Dict, List, Optional

import torch

log = logging.getLogger("fusion_backend")

#: "benchmarked": candidates timed in this process; "cache_hits": keys answered from disk;
#: "tuned": keys tuned here. Tests observe tuning through these.
stats: collections.Counter = collections.Counter()

CACHE_ENV = "FUSEDTRITON_CACHE_DIR"
_SCHEMA = 1


@dataclasses.dataclass
class Choice:
    config: Optional[dict]          # None = the unfused path
    source: str                     # "tuned" | "cache" | "heuristic" | "fixed" | "fallback"
    fused_ms: Optional[float] = None
    unfused_ms: Optional[float] = None
    #: the budget that cut this choice's search short (None: every config was timed); a caller
    #: with a larger budget searches again
    partial_budget_s: Optional[float] = dataclasses.field(default=None, compare=False)
    kwargs: Optional[dict] = dataclasses.field(default=None, repr=False, compare=False)  # launch kwargs, memoized
    #: where the unfused path won: the fastest fused config (a tie inside FUSED_MARGIN may still
    #: be fused, for the run-time trial to settle: `patterns._common.tuned_unfused_reason`)
    runner_up: Optional[dict] = None

    def describe(self) -> str:
        what = "unfused (cuBLAS + pointwise)" if self.config is None else describe_config(self.config)
        times = ""
        if self.fused_ms is not None or self.unfused_ms is not None:
            times = f" [fused {self.fused_ms if self.fused_ms is None else round(self.fused_ms, 4)} ms, " \
                    f"unfused {self.unfused_ms if self.unfused_ms is None else round(self.unfused_ms, 4)} ms]"
        return f"{what} ({self.source}){times}"


def describe_config(config: dict) -> str:
    """A config in one line, as `explain()` shows it."""
    return " ".join(f"{k}={v}" for k, v in config.items() if k != "dtypes")


def bucket(m: int) -> int:
    """Batch bucket: the next power of two (0 stays 0)."""
    return 0 if m <= 0 else 1 << (int(m) - 1).bit_length()


@functools.lru_cache(maxsize=4096)  # launchers build the key on every call: memoized, a dict lookup
def make_key(family: str, profile_name: str, dtype: torch.dtype, precision: str, m: int, **dims) -> str:
    rest = "|".join(f"{k}={v}" for k, v in sorted(dims.items()))
    return f"{family}|{profile_name}|{str(dtype).replace('torch.', '')}|{precision}|M<={bucket(m)}|{rest}"


def source_hash(*code) -> str:
    """Hash of the source of Triton kernels (`tl` or Gluon), plain Python launchers and whole
    modules (the `triton_lib` helpers a kernel calls, e.g. its GEMM main loop): a cached choice
    is only reused for the same code. Anything without source is refused: hashing its repr
    (which holds an address) would give a new key in every process."""
    import inspect

    h = hashlib.sha1()
    for k in code:
        src = getattr(k, "src", None) or getattr(getattr(k, "fn", None), "src", None)
        if src is None:
            fn = getattr(k, "fn", k)  # the interpreter's kernels wrap the Python function
            if not (inspect.isfunction(fn) or inspect.ismodule(fn)):
                raise TypeError(f"source_hash: {k!r} is neither a Triton kernel, a Python function nor a module")
            src = inspect.getsource(fn)
        h.update(src.encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- disk cache

def cache_dir() -> str:
    env = os.environ.get(CACHE_ENV)
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fusedtriton")


def _environment(device_name: str) -> str:
    import triton

    return f"{device_name}|triton={triton.__version__}|torch={torch.__version__}"


def cache_file(device_name: str) -> str:
    env = _environment(device_name)
    return os.path.join(cache_dir(), f"autotune-{hashlib.sha1(env.encode()).hexdigest()[:16]}.json")


_warned_files = set()


def _load(path: str):
    with open(path) as f:
        return json.load(f)


def _read(path: str, environment: str) -> Dict[str, dict]:
    try:
        data = _load(path)
        if not isinstance(data, dict) or data.get("schema") != _SCHEMA or data.get("environment") != environment \
                or not isinstance(data.get("entries"), dict):
            raise ValueError("not a fusedtriton autotune cache for this device and versions")
        return data["entries"]
    except FileNotFoundError:
        return {}
    except Exception as exc:  # corrupt, truncated or foreign: ignore (once), never crash
        if path not in _warned_files:
            _warned_files.add(path)
            log.warning("fusedtriton: ignoring autotune cache %s (%s: %s)", path, type(exc).__name__, exc)
        return {}


def _foreign(path: str, environment: str) -> bool:
    """Whether `path` holds a well-formed cache of another schema or environment."""
    try:
        data = _load(path)
    except Exception:  # missing, unreadable, corrupt: not another version's cache
        return False
    return isinstance(data, dict) and "schema" in data and (
        data.get("schema") != _SCHEMA or data.get("environment") != environment)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(v) -> bool:
    """A number that is not NaN or infinite (JSON files may hold NaN and Infinity, and integers
    too large for a float)."""
    try:
        return _number(v) and math.isfinite(v)
    except OverflowError:
        return False


def _times_ok(entry: dict) -> bool:
    """Whether a cache entry's times are finite, non-negative numbers or absent (a hand-edited
    or foreign entry is tuned again rather than failing later, in explain() or the run-time
    trial's rule: a NaN or negative time turned the trial on, 10**400 raised in it)."""
    times = [entry.get("fused_ms"), entry.get("unfused_ms")]
    return all(t is None or (_finite(t) and t >= 0) for t in times)


@contextlib.contextmanager
def _locked(path: str):
    try:
        import fcntl
    except ImportError:  # not POSIX: atomic replace alone
        yield
        return
    # opened for writing where allowed (NFS grants an exclusive flock on such a descriptor
    # only), else read-only: local file systems lock it all the same, and the lock file another
    # user made (0644 under the usual umask) must not stop this user's entries in a shared folder
    try:
        fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        fd = os.open(path + ".lock", os.O_RDONLY)
    with os.fdopen(fd) as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            locked = True
        except OSError as exc:  # a file system without locks (some NFS mounts): atomic replace alone
            log.debug("fusedtriton: no lock on %s (%s); writing without it", path, exc)
            locked = False
        try:
            yield
        finally:
            if locked:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _write(path: str, environment: str, key: str, entry: dict) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with _locked(path):  # read-merge-write under a lock; concurrent writers keep each other's keys
            if os.path.exists(path) and not os.access(path, os.R_OK):
                # another user's cache we cannot read: replacing it would drop its entries
                log.warning("fusedtriton: not writing autotune cache %s: it exists and is not readable", path)
                return
            if _foreign(path, environment):
                # e.g. a newer fusedtriton's cache under the same name: replacing it would drop
                # its entries (a corrupt or truncated file is replaced)
                # (reading it warned already, once: this is the same file, ignored both ways)
                (log.debug if path in _warned_files else log.warning)(
                    "fusedtriton: not writing autotune cache %s: it belongs to another fusedtriton version or "
                    "environment", path)
                _warned_files.add(path)
                return
            entries = _read(path, environment)
            entries[key] = entry
            tmp = os.path.join(os.path.dirname(path), f".autotune-{os.getpid()}-{secrets.token_hex(6)}.tmp")
            # made 0666 less the umask, as any file (mkstemp's 0600 survived os.replace: a cache
            # shared by a group became unreadable to the others; reading the umask by setting
            # it is process-wide, and other threads' files got 0666 meanwhile)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump({"schema": _SCHEMA, "environment": environment, "entries": entries}, f, indent=1)
                os.replace(tmp, path)  # readers see the old or the new file, never half of one
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    except OSError as exc:
        log.warning("fusedtriton: could not write autotune cache %s: %s", path, exc)


# ----------------------------------------------------------------------------- tuner

def _do_bench(fn: Callable[[], None]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def gpu_time(fn: Callable[[], None], rounds: int = 5) -> float:
    """GPU time alone (median ms a call), for the cell ops, whose fused launch runs as a CUDA
    graph replay (`_common.replay_launch`) or from Inductor's code (inline): their host time is
    not what a call waits on. Timed by do_bench, host time beyond the L2 flush's ~0.1 ms
    counted, the pre-split/Gluon i2h tiles lost to pointer tiles on a slower host (H100, B256
    4096+4096->4096 "highest": 0.27 ms against 0.17 of GPU time). `fn` is captured a few times
    over in a CUDA graph as `_common._capture` does (a side stream that waits for the current
    one: no write of `fn` can overtake queued work reading the same memory; capture mode
    thread_local: other threads' allocations go on), then replayed on the current stream
    between events. A launch that cannot be captured is timed by do_bench."""
    stream = torch.cuda.current_stream()
    try:
        fn()  # compiles, allocates its caches (e.g. TMA descriptors): not in the capture
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        reps = max(1, min(100, int(5.0 / max(start.elapsed_time(end), 1e-3))))  # ~5 ms a replay
        graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                for _ in range(reps):
                    fn()
            finally:
                graph.capture_end()
        stream.wait_stream(side)
        times = []
        for _ in range(rounds):
            start.record(stream)
            graph.replay()
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end) / reps)
        return sorted(times)[len(times) // 2]
    except Exception as exc:  # noqa: BLE001 - e.g. a launch that synchronizes
        log.info("fusedtriton: timing without a CUDA graph (%s: %s)", type(exc).__name__, exc)
        stream.synchronize()
        return _do_bench(fn)


#: the fused config must beat the unfused path by this factor: closer is within run-to-run and
#: thermal spread (H100: the tuner once measured fused 1.568 vs unfused 1.589 ms, a 100 ms
#: benchmark then fused 1.744 vs Inductor 1.644), and a tie belongs to Inductor
FUSED_MARGIN = 0.97
#: interleaved re-timings of the finalists and the unfused path
CONFIRM_ROUNDS = 2
#: configs whose single search timing is within this factor of the best go to the re-timing
#: too (at most RUNOFF_MAX of them): one timing each, taken while the GPU heats up, ranked
#: two tiles 3-5% apart the wrong way round (H100, the fp32 "highest" RNN cell: 64x128 picked
#: at 2.85 ms, 128x64 then measured 2.77)
RUNOFF_SPREAD = 1.05
RUNOFF_MAX = 3
#: version of `config_spaces.search_order`: what the budget lets the tuner time depends on it
SEARCH_ORDER = 1


def rule() -> str:
    """The decision rule, part of the disk key: a choice made under another is not reused."""
    return f"margin{FUSED_MARGIN}x{CONFIRM_ROUNDS}runoff{RUNOFF_SPREAD}x{RUNOFF_MAX}order{SEARCH_ORDER}"


class Tuner:
    """Chooses a config per key. `timer(fn) -> ms` is injectable for tests."""

    def __init__(self, timer: Callable[[Callable[[], None]], float] = _do_bench):
        self.timer = timer
        self.choices: Dict[str, Choice] = {}
        # one search at a time in a process: two threads meeting one untuned key would tune it
        # twice, and timings taken while another search's candidates run are wrong (re-entrant:
        # a candidate's launcher may choose a config for a helper kernel of its own)
        self._tuning = threading.RLock()

    def lookup(self, key: str) -> Optional[Choice]:
        return self.choices.get(key)

    def forget(self) -> None:
        self.choices.clear()

    def record(self, key: str, choice: Choice) -> Choice:
        self.choices[key] = choice
        return choice

    def choose(self, key: str, *, profile, space: List[dict], m: int, src_hash: str, device_name: str,
               autotune: bool, budget_s: float, run_fused: Callable[[dict], None],
               run_unfused: Optional[Callable[[], None]], timer: Optional[Callable] = None) -> Choice:
        """`timer`: how this key's candidates are timed where not the tuner's own (`gpu_time`
        for launches that run replayed); part of the disk key."""
        hit = self.choices.get(key)
        if hit is not None and not search_again(hit, autotune, budget_s):
            return hit
        with self._tuning:
            hit = self.choices.get(key)  # chosen by another thread while this one waited
            if hit is not None and not search_again(hit, autotune, budget_s):
                return hit
            return self._choose(key, profile=profile, space=space, m=m, src_hash=src_hash, device_name=device_name,
                                autotune=autotune, budget_s=budget_s, run_fused=run_fused, run_unfused=run_unfused,
                                timer=timer)

    def _choose(self, key: str, *, profile, space, m, src_hash, device_name, autotune, budget_s, run_fused,
                run_unfused, timer=None) -> Choice:
        from . import config_spaces

        if profile.name == "interpreter":  # the interpreter cannot benchmark: one fixed config
            return self.record(key, Choice(space[0], "fixed"))
        # no capture can be under way where CUDA is not initialized (asking would initialize it,
        # which fails in a process forked from one that uses CUDA)
        capturing = torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()
        if not autotune or len(space) == 1 and run_unfused is None or capturing:
            choice = Choice(config_spaces.heuristic_pick(space, m), "heuristic")
            # inside a CUDA graph capture nothing may be timed; do not pin the key
            return choice if capturing else self.record(key, choice)

        path, environment = cache_file(device_name), _environment(device_name)
        # a decision made under another rule (margin, confirmation) or over another config
        # space (a config added since could be the fastest) is not reused
        disk_key = f"{key}|src={src_hash}|rule={rule()}|space={_space_hash(space)}"
        if timer is not None:  # times taken another way are not compared with these
            disk_key += f"|timer={getattr(timer, '__name__', 'custom')}"
        entry = previous = _read(path, environment).get(disk_key)
        # a cached config must still be in the space (spaces change between releases); the
        # space's own entry is served (JSON turned its tuples into lists)
        cached = entry.get("config", False) if isinstance(entry, dict) and _times_ok(entry) else False
        if cached is not False and not _searched_enough(entry, budget_s):
            cached = False  # a search cut short by a smaller budget: search again with this one
        stored = _jsonable(space)
        if cached is None or cached in stored:
            stats["cache_hits"] += 1
            config = None if cached is None else space[stored.index(cached)]
            runner_up = entry.get("runner_up")
            runner_up = space[stored.index(runner_up)] if runner_up in stored else None
            partial = entry["partial_budget_s"] if _partial_tries(entry) else None
            return self.record(key, Choice(config, "cache", entry.get("fused_ms"), entry.get("unfused_ms"),
                                           runner_up=runner_up, partial_budget_s=partial))

        choice, complete = self._tune(key, config_spaces.search_order(space), budget_s, run_fused, run_unfused,
                                      timer or self.timer)
        stats["tuned"] += 1
        if not complete:
            choice.partial_budget_s = budget_s
        if choice.config is None and choice.fused_ms is None:
            # every fused config failed (an out-of-memory or a compile hiccup may pass): this
            # process runs unfused, the next one tries again (on disk it read as "unfused is
            # faster" for good, without a fused time ever measured)
            return self.record(key, choice)
        entry = {"config": choice.config, "fused_ms": choice.fused_ms, "unfused_ms": choice.unfused_ms,
                 "runner_up": choice.runner_up}
        if not complete:
            entry["partial_budget_s"] = budget_s
            entry["partial_tries"] = _partial_tries(previous) + 1
        _write(path, environment, disk_key, entry)
        return self.record(key, choice)

    def _time(self, fn, timer) -> float:
        stats["benchmarked"] += 1
        try:
            return timer(fn)
        except Exception as exc:  # a config that fails to compile or launch is just not chosen
            log.info("fusedtriton: candidate failed (%s: %s)", type(exc).__name__, exc)
            return math.inf

    def _tune(self, key, space, budget_s, run_fused, run_unfused, timer):
        """(the choice, whether every config of `space` was timed)"""
        start = time.perf_counter()
        unfused_ms = self._time(run_unfused, timer) if run_unfused is not None else math.inf
        timed = []  # (ms, position in the space, config)
        for i, config in enumerate(space):
            timed.append((self._time(lambda c=config: run_fused(c), timer), i, config))
            best_ms = min(timed)[0]
            elapsed = time.perf_counter() - start
            if elapsed > 1.0:
                log.info("fusedtriton: tuning %s: %d/%d configs, best %.4f ms (unfused %.4f ms), %.1f s",
                         key, i + 1, len(space), best_ms, unfused_ms, elapsed)
            if elapsed > budget_s:
                log.info("fusedtriton: tuning %s stopped at its %.0f s budget", key, budget_s)
                break
        finite = lambda v: None if math.isinf(v) else v  # noqa: E731
        complete = len(timed) == len(space)
        timed = sorted(t for t in timed if not math.isinf(t[0]))
        if not timed:  # every fused config failed to compile or launch
            stats["fused_all_failed"] += 1
            return Choice(None, "tuned", None, finite(unfused_ms)), complete
        finalists = [c for ms, _, c in timed[:RUNOFF_MAX] if ms <= RUNOFF_SPREAD * timed[0][0]]
        best, best_ms = finalists[0], timed[0][0]
        confirm_unfused = run_unfused is not None and not math.isinf(unfused_ms)
        if confirm_unfused or len(finalists) > 1:
            # the search timed the unfused path first, on a cooler GPU, and each config once:
            # time the finalists and the unfused path again, interleaved, and compare those
            # (the mean over the rounds)
            sums = [0.0] * len(finalists)
            unfused_ms = 0.0 if confirm_unfused else unfused_ms
            for _ in range(CONFIRM_ROUNDS):
                if confirm_unfused:
                    unfused_ms += self._time(run_unfused, timer) / CONFIRM_ROUNDS
                for j, config in enumerate(finalists):
                    sums[j] += self._time(lambda c=config: run_fused(c), timer) / CONFIRM_ROUNDS
            best_ms, j = min((ms, j) for j, ms in enumerate(sums))
            best = finalists[j]
            if len(finalists) > 1:
                log.info("fusedtriton: tuning %s: re-timed %s", key,
                         ", ".join(f"{describe_config(c)}: {ms:.4f} ms" for c, ms in zip(finalists, sums)))
        if best_ms > FUSED_MARGIN * unfused_ms:
            return Choice(None, "tuned", finite(best_ms), finite(unfused_ms), runner_up=best), complete
        return Choice(best, "tuned", finite(best_ms), finite(unfused_ms)), complete


#: searches of one key a budget may cut short before their choice is served as it is: the first
#: one often spends its budget on cold Triton compiles, the next one runs with them cached
PARTIAL_TRIES = 2


def _partial_tries(entry) -> int:
    """How many searches of this cache entry's key were cut short by their budget (0: none, or
    no entry)."""
    if not isinstance(entry, dict) or not _finite(entry.get("partial_budget_s")):
        return 0
    tries = entry.get("partial_tries")
    return int(tries) if _finite(tries) else 1  # (a hand-edited NaN or Infinity: one)


def _searched_enough(entry: dict, budget_s: float) -> bool:
    """Whether a cache entry's search serves a caller with this budget: a complete search
    always; one its budget cut short (a small `tune_budget_s`, or cold Triton compiles eating
    the budget) once it was tried PARTIAL_TRIES times, and only callers whose budget is no
    larger (a larger budget searches again)."""
    tries = _partial_tries(entry)
    return not tries or (tries >= PARTIAL_TRIES and budget_s <= entry["partial_budget_s"])


def search_again(hit: Choice, autotune: bool, budget_s: float) -> bool:
    """Whether a choice made in this process does not serve a caller with this budget: a
    heuristic pick where tuning is asked for, or a search cut short by a smaller budget (as
    `_searched_enough` decides for the disk cache)."""
    if not autotune:
        return False
    return hit.source == "heuristic" or (hit.partial_budget_s is not None and budget_s > hit.partial_budget_s)


def _jsonable(space):
    return json.loads(json.dumps(space))


def _space_hash(space) -> str:
    return hashlib.sha1(json.dumps(_jsonable(space), sort_keys=True).encode()).hexdigest()[:12]


TUNER = Tuner()
