"""What the backend did: per compiled graph, the profile, fused sites and near-misses."""
from __future__ import annotations

import dataclasses
from typing import List, Optional


@dataclasses.dataclass
class Site:
    pattern: str
    node: str                 # name of the FX node that ended the matched subgraph
    fused: bool
    reason: str = ""          # why not fused (near-miss)
    info: dict = dataclasses.field(default_factory=dict)  # shapes, dtype, precision, tuning key

    def line(self) -> str:
        if not self.fused:
            return f"  - {self.pattern} at {self.node}: NOT fused: {self.reason}"
        i = self.info
        parts = [f"{k}={v}" for k, v in i.items() if k not in ("choice", "key")]
        text = f"  + {self.pattern} at {self.node}: " + ", ".join(parts)
        choice = i.get("choice")
        if choice:
            text += f"\n      choice: {choice}"
        return text


@dataclasses.dataclass
class GraphReport:
    profile: Optional[str]
    mode: Optional[str]
    sites: List[Site] = dataclasses.field(default_factory=list)
    note: str = ""
    patterns: Optional[tuple] = None  # the enabled ones where options["patterns"] names them

    @property
    def fused(self):
        return [s for s in self.sites if s.fused]

    @property
    def skipped(self):
        return [s for s in self.sites if not s.fused]

    def summary(self) -> str:
        if self.profile is None:
            return f"fusedtriton: no device profile ({self.note}); whole graph to Inductor"
        return (f"fusedtriton[{self.profile}]: {len(self.fused)} site(s) fused, "
                f"{len(self.skipped)} not fused; rest to Inductor (mode={self.mode or 'default'})"
                + ("" if self.sites else self._why_no_sites())
                + (f"; {self.note}" if self.note else ""))

    def text(self) -> str:
        """The summary and one line per site (with its reason where not fused): what the
        backend logs at INFO for each graph."""
        return "\n".join([self.summary()] + _collapsed(self.sites))

    def _why_no_sites(self) -> str:
        if self.patterns is not None:
            return (f" (no structure of the enabled pattern(s) {list(self.patterns)} in this graph; the others are "
                    "off by options['patterns']: see `fusion_backend.pattern_names()`)")
        return " (no pattern's structure in this graph: see `fusion_backend.pattern_names()`)"


def _collapsed(sites: List[Site]) -> List[str]:
    """Site lines, with runs of sites that differ only by node name (an unrolled loop's
    steps) shown once with their count."""
    out: List[str] = []
    run: List[Site] = []

    def key(site):
        return (site.pattern, site.fused, site.reason, tuple(sorted(map(str, site.info.items()))))

    for site in sites + [None]:
        if run and (site is None or key(site) != key(run[0])):
            line = run[0].line()
            if len(run) > 1:
                head, _, rest = line.partition(": ")
                line = f"{head} .. {run[-1].node} (x{len(run)}): {rest}"
            out.append(line)
            run = []
        if site is not None:
            run.append(site)
    return out


@dataclasses.dataclass
class ExplainReport:
    graphs: List[GraphReport]

    @property
    def profile(self):
        """The profile of the compiled graphs; None where no graph was compiled, a sorted list
        where they differ."""
        profiles = {g.profile for g in self.graphs}
        if not profiles:
            return None
        return profiles.pop() if len(profiles) == 1 else sorted(map(str, profiles))

    @property
    def fused(self) -> List[Site]:
        return [s for g in self.graphs for s in g.fused]

    @property
    def skipped(self) -> List[Site]:
        return [s for g in self.graphs for s in g.skipped]

    def __str__(self) -> str:
        if not self.graphs:
            return ("fusedtriton explain: no graph reached the backend (Dynamo captured no tensor operations, "
                    "skipped the frame and ran it eagerly, e.g. at a graph break inside a loop, or the backend's "
                    "error was suppressed by torch._dynamo.config.suppress_errors: TORCH_LOGS=graph_breaks and "
                    "Dynamo's log say which)")
        lines = [f"fusedtriton explain: profile={self.profile}, {len(self.graphs)} graph(s), "
                 f"{len(self.fused)} fused site(s), {len(self.skipped)} not fused"]
        for n, g in enumerate(self.graphs):
            lines.append(f"graph {n}: {g.summary()}")
            lines.extend(_collapsed(g.sites))
        return "\n".join(lines)

    __repr__ = __str__
