"""Run-time trial of a rewritten graph against the original one, both compiled by Inductor.

Why: the compile-time decision times each site alone (its kernels' GPU time, and the op's own
host time a call), not the rest of the graph's host time (Dynamo's guards, AOT's and
Inductor's wrappers: ~0.1-0.3 ms a call on the H100 machine). Below ~1 ms of GPU time a call
that can decide which graph is faster, and it differs between machines of one kind: the
quickstart's small RNN cell ran fused 0.40 ms vs Inductor's 0.50 on one H100 host and 0.66 vs
0.50 on another (benchmarks/NOTES.md, seventh session). A per-site rule that counted the op's
host time as never overlapping was tried and reverted: it also gave away a 1.9x win.

So where the fused sites' tuned GPU time is small, the backend compiles both graphs and
`GraphTrial` alternates between them for the first calls, timing each whole call with CUDA
events (a host-bound call shows up as the GPU waiting for it), and then keeps the faster one
for good. Nothing synchronizes: the decision waits until the events have completed. Both
graphs compute the same thing, so alternating changes no result beyond each graph's own
rounding (both are within the precision class; a user who wants one fixed graph turns the
trial off with options={"trial": False}).
"""
from __future__ import annotations

import statistics
from typing import Callable, Optional

#: a graph gets a trial when its fused sites' tuned GPU time adds up to less than this (ms a call)
TRIAL_BELOW_MS = 1.0
#: timed calls per graph, after one untimed warm-up call of each
TRIAL_CALLS = 8


class CudaClock:
    """Spans of work on the current CUDA stream: CUDA events, read only once they completed."""

    def __init__(self):
        import torch

        self._torch = torch

    def start(self):
        ev = self._torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def stop(self, start):
        end = self._torch.cuda.Event(enable_timing=True)
        end.record()
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
    """Alternates calls between `fused` and `unfused` (compiled graphs of the same arguments),
    times `calls` calls of each after one warm-up call each, then sends every call to the
    faster one (by median; the fused graph on a tie) and calls `on_decided(fused_ms,
    unfused_ms, keep_fused)` once."""

    def __init__(self, fused: Callable, unfused: Callable, on_decided: Callable, calls: int = TRIAL_CALLS,
                 clock=None):
        self.graphs = (fused, unfused)
        self.on_decided = on_decided
        self.calls = calls
        self.clock = clock if clock is not None else CudaClock()
        self.spans: tuple = ([], [])
        self.count = 0
        self.chosen: Optional[Callable] = None

    def __call__(self, args: tuple):
        if self.chosen is not None:
            return self.chosen(*args)
        if self.clock.capturing():  # no events and no switching inside a CUDA graph capture
            return self.graphs[0](*args)
        if self._done_timing():
            self._decide()
            return (self.chosen or self.graphs[0])(*args)
        which = self.count % 2
        timed = self.count >= 2  # the first call of each graph warms it up
        self.count += 1
        if not timed:
            return self.graphs[which](*args)
        start = self.clock.start()
        out = self.graphs[which](*args)
        self.spans[which].append(self.clock.stop(start))
        return out

    def _done_timing(self) -> bool:
        return all(len(s) >= self.calls for s in self.spans)

    def _decide(self):
        if not all(self.clock.ready(span) for spans in self.spans for span in spans):
            return  # the GPU has not reached the last events yet: the fused graph meanwhile
        fused_ms, unfused_ms = (statistics.median(self.clock.ms(s) for s in spans) for spans in self.spans)
        keep_fused = fused_ms <= unfused_ms
        self.chosen = self.graphs[0 if keep_fused else 1]
        self.spans = ([], [])
        self.on_decided(fused_ms, unfused_ms, keep_fused)


def as_compiled_fn(trial: GraphTrial) -> Callable:
    """The trial as a compiled graph for Dynamo (which calls it with the graph's arguments)."""

    def run(*args):
        return trial(args)

    return run
