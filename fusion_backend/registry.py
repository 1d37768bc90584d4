"""Pattern registry: the backend rewrites with every registered pattern and knows none by name.

A pattern (one module in the `fusion_backend.patterns` package, discovered by file) is a small
class in the style of Inductor's fx_passes:

    @register_pattern
    class MyPattern(Pattern):
        name = "my_pattern"
        def match(self, node): ...          # structure ending at `node`, or None
        def check(self, match, ctx): ...    # reason not to fuse, or None
        def replace(self, match, ctx): ...  # insert the fused op, return the site's report info
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Dict, List, Optional

_PATTERNS: Dict[str, "Pattern"] = {}
_discovered = False

#: fused op -> the same op without an autograd kernel, for graphs that run with grad disabled:
#: the autograd kernel `torch.library.register_autograd` installs is Python, entered on every
#: call even under no_grad (~4.5 us a call on the CI machine, 7.0 vs 2.5)
INFERENCE_TWINS: dict = {}


def use_inference_twins(gm) -> int:
    """Swap each fused op of `gm` for its twin without autograd when the graph runs with grad
    disabled: Dynamo compiled it under no_grad / inference_mode (and guards on the grad mode,
    so it never runs with grad on) and nothing in it turns grad back on. Returns the count."""
    import torch

    if torch.is_grad_enabled():
        return 0
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    # _set_grad_enabled and any other grad switch; a higher-order op's subgraph could hold one
    if any("grad" in getattr(n.target, "__name__", "") or isinstance(n.target, torch._ops.HigherOrderOperator)
           for n in nodes):
        return 0
    swapped = 0
    for node in nodes:
        twin = INFERENCE_TWINS.get(node.target)
        if twin is not None:
            node.target = twin
            swapped += 1
    return swapped


class Pattern:
    name: str = ""
    #: patterns run in (order, name) order; one that builds on another's ops runs after it
    order: int = 0
    #: an experimental pattern runs only when options["patterns"] names it (e.g. until its
    #: kernels have been checked on a GPU)
    experimental: bool = False

    def match(self, node):
        """A match object if `node` ends this pattern's structure, else None."""
        raise NotImplementedError

    def check(self, match, ctx) -> Optional[str]:
        """Why the match must not be fused (a near-miss reason), or None when it is safe."""
        raise NotImplementedError

    def replace(self, match, ctx) -> dict:
        """Rewrite the graph; return the site's description for the report."""
        raise NotImplementedError


def register_pattern(cls):
    instance = cls()
    if not instance.name:
        raise ValueError(f"pattern class {cls.__name__} has no name")
    if instance.name in _PATTERNS and type(_PATTERNS[instance.name]) is not cls:
        raise ValueError(f"two patterns are named {instance.name!r}")
    _PATTERNS[instance.name] = instance
    return cls


def discover() -> None:
    """Import every module of the `patterns` package once (each registers itself)."""
    global _discovered
    if _discovered:
        return
    from . import patterns

    for info in sorted(pkgutil.iter_modules(patterns.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{patterns.__name__}.{info.name}")
    _discovered = True


def pattern_names() -> List[str]:
    discover()
    return sorted(_PATTERNS)


def enabled_patterns(names=None) -> List[Pattern]:
    discover()
    chosen = [p for n, p in _PATTERNS.items() if (n in names if names is not None else not p.experimental)]
    return sorted(chosen, key=lambda p: (p.order, p.name))
