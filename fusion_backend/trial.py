"""Run-time trial of a rewritten graph against the original one, both compiled by Inductor.

Why: the compile-time decision times each site alone (its kernels' GPU time, and the op's own
host time a call), not the rest of the graph's host time (Dynamo's guards, AOT's and
Inductor's wrappers: ~0.1-0.3 ms a call on the H100 machine). Below ~1 ms of GPU time a call
that can decide which graph is faster, and it differs between machines of one kind: the
quickstart's small RNN cell ran fused 0.40 ms vs Inductor's 0.50 on one H100 host and 0.66 vs
0.50 on another (benchmarks/NOTES.md, seventh session). A per-site rule that counted the op's
host time as never overlapping was tried and reverted: it also gave away a 1.9x win.

So where the fused sites' tuned GPU time is small, the backend compiles both graphs and
`GraphTrial` alternates between them for the first calls, in blocks of back-to-back calls of
one graph. Before each block the trial waits for the GPU to finish what is queued (the only
synchronization, once per block), then times the block with CUDA events: the block starts on
an idle GPU, so a host-bound graph shows up as the GPU waiting for it. Single alternating calls
were timed before: a call queued behind the other graph's longer GPU work found the GPU busy,
so its own host time never showed (H100, the quickstart's stateful cell: trial 0.27 ms fused
vs 0.50, while back to back the fused graph ran 0.52-0.99 ms a call vs Inductor's 0.50 on one
host; benchmarks/back_to_back.py); blocks without the wait still inherit the other graph's
backlog. A program that runs other work between its calls of this graph (other models, in
turn) has that work inside every block of either graph alike: the comparison holds, but the
time per call reported includes it. The decision waits until the last events have completed
(no further synchronization), then keeps the faster graph for good. Both
graphs compute the same thing, so alternating changes no result beyond each graph's own
rounding (both are within the precision class; a user who wants one fixed graph turns the
trial off with options={"trial": False}).
"""
from __future__ import annotations

import statistics
import threading
from typing import Callable, Optional

#: a graph gets a trial when its fused sites' tuned GPU time adds up to less than this (ms a call)
TRIAL_BELOW_MS = 1.0
#: timed calls per graph, after one untimed warm-up call of each (3 blocks: one outlier cannot decide)
TRIAL_CALLS = 12
#: back-to-back calls of one graph per timed block (the graphs alternate block by block)
TRIAL_BLOCK = 4
#: calls of one graph in a row that raised (not out of memory) before it loses the trial
FAILURES_TO_LOSE = 3


class CudaClock:
    """Spans of work on the current CUDA stream of `device` (the graph's; None: the current
    device's), by CUDA events, read only once they completed. A model on another GPU than the
    current one runs under Inductor's device guard, so events on the current device's stream
    would time nothing of it."""

    def __init__(self, device=None):
        import torch

        self._torch = torch
        self._device = device

    def _stream(self):
        return self._torch.cuda.current_stream(self._device)

    def start(self):
        """An event recorded once the GPU has finished all queued work: what follows runs on an
        idle GPU."""
        stream = self._stream()
        stream.synchronize()
        ev = self._torch.cuda.Event(enable_timing=True)
        ev.record(stream)
        return ev

    def stop(self, start):
        end = self._torch.cuda.Event(enable_timing=True)
        end.record(self._stream())
        return start, end

    @staticmethod
    def ready(span) -> bool:
        return span[1].query()

    @staticmethod
    def ms(span) -> float:
        return span[0].elapsed_time(span[1])

    def capturing(self) -> bool:
        return self._torch.cuda.is_current_stream_capturing()


class GraphTrial:
    """Runs `fused` and `unfused` (compiled graphs of the same arguments) one warm-up call each,
    then in alternating blocks of `block` back-to-back calls until each has had `calls` timed
    calls (rounded up to whole blocks), then sends every call to the faster one (by the median
    of its blocks' time per call; the fused graph on a tie) and calls `on_decided(fused_ms,
    unfused_ms, keep_fused)` once. A graph that runs out of memory during the trial, or raises
    on FAILURES_TO_LOSE of its calls in a row, loses it (the times are then None)."""

    def __init__(self, fused: Callable, unfused: Callable, on_decided: Callable, calls: int = TRIAL_CALLS,
                 clock=None, block: int = TRIAL_BLOCK):
        self.graphs = (fused, unfused)
        self.on_decided = on_decided
        self.block = block
        self.blocks = max(1, -(-calls // block))  # timed blocks per graph
        self.clock = clock if clock is not None else CudaClock()
        self.spans: tuple = ([], [])
        self.count = 0
        self._start = None
        self._failures = [0, 0]  # calls of each graph that raised in a row
        self.chosen: Optional[Callable] = None
        # calls from several threads take turns until the decision (blocks, spans and the
        # decision are one sequence); re-entrant, should a graph call back into the model
        self._lock = threading.RLock()

    def __call__(self, args: tuple):
        chosen = self.chosen
        if chosen is not None:
            return chosen(*args)
        with self._lock:
            return self._trial_call(args)

    def _trial_call(self, args: tuple):
        if self.chosen is not None:  # decided while this call waited for the lock
            return self.chosen(*args)
        if self.clock.capturing():  # no events and no switching inside a CUDA graph capture
            self._drop_open_block()  # its span would hold the capture
            return self.graphs[0](*args)
        if self._done_timing():
            self._decide()
            return (self.chosen or self.graphs[0])(*args)
        n = self.count
        if n < 2:  # the first call of each graph warms it up
            out = self._run(n, args)
            self.count = n + 1
            return out
        block, i = divmod(n - 2, self.block)
        which = block % 2
        try:
            if i == 0:
                self._start = self.clock.start()
            out = self._run(which, args)
        except BaseException:
            # a call that raised (or a Ctrl-C while the clock waited for the GPU) leaves no half
            # block behind: its span would start at another block's event, or at none
            self._drop_open_block()
            raise
        self.count = n + 1
        if i == self.block - 1:
            self.spans[which].append(self.clock.stop(self._start))
            self._start = None
        return out

    def _run(self, which: int, args: tuple):
        """One call of graph `which`, counting the calls of it that raised in a row."""
        try:
            out = self.graphs[which](*args)
        except Exception as exc:
            self._raised(which, exc)
            raise
        self._failures[which] = 0
        return out

    def _raised(self, which: int, exc: Exception):
        """Graph `which` raised. Out of memory (the original graph keeps intermediates the
        fused one does not), or FAILURES_TO_LOSE calls of it in a row: it loses, the other
        one runs from now on (retrying it at every call made a model unusable that the other
        graph runs). Anything else once is taken for the call's own error (a bad index in
        the caller's input raises in both graphs alike: it used to end the trial against the
        fused graph). The error still reaches the caller: the graph may have written its
        inputs before it failed, so running the other one on them could apply those writes twice."""
        import torch

        self._failures[which] += 1
        if isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or self._failures[which] >= FAILURES_TO_LOSE:
            self._lost(which)

    def _lost(self, which: int):
        self.chosen = self.graphs[1 - which]
        self.graphs, self.spans = (self.chosen,), ([], [])
        self.on_decided(None, None, which == 1)

    def _drop_open_block(self):
        """Rewind to the first call of a block that has started but not stopped."""
        if self.count > 2:
            self.count -= (self.count - 2) % self.block
        self._start = None

    def _done_timing(self) -> bool:
        return all(len(s) >= self.blocks for s in self.spans)

    def _decide(self):
        if not all(self.clock.ready(span) for spans in self.spans for span in spans):
            return  # the GPU has not reached the last events yet: the fused graph meanwhile
        fused_ms, unfused_ms = (statistics.median(self.clock.ms(s) / self.block for s in spans)
                                for spans in self.spans)
        keep_fused = fused_ms <= unfused_ms
        self.chosen = self.graphs[0 if keep_fused else 1]
        # the loser and its buffers (constants, CUDA graphs) are not kept for the model's life
        self.graphs, self.spans = (self.chosen,), ([], [])
        self.on_decided(fused_ms, unfused_ms, keep_fused)


def as_compiled_fn(trial: GraphTrial) -> Callable:
    """The trial as a compiled graph for Dynamo (which calls it with the graph's arguments)."""

    def run(*args):
        return trial(args)

    return run
