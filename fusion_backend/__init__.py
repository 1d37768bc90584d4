"""fusedtriton: a torch.compile backend that fuses two subgraphs into autotuned Triton kernels.

    torch.compile(model, backend="fusedtriton", mode=None, options={...})

Importing this package is cheap (no Triton compilation, no GPU work) and registers the
backend name once, whether or not the `torch_dynamo_backends` entry point was seen first.
"""
from __future__ import annotations

from .backend import counters, fusedtriton
from .devices import DeviceProfile, device_profile, from_properties
from .options import MODES, OPTION_DOCS, Options
from .registry import Pattern, pattern_names, register_pattern

BACKEND_NAME = "fusedtriton"
__version__ = "0.1.0"


def _register_backend() -> None:
    from torch._dynamo.backends import registry as dynamo_registry

    if BACKEND_NAME in dynamo_registry._COMPILER_FNS:
        return
    # When installed, torch finds us through the entry point and registers the same
    # function on first lookup; registering here too would make that lookup fail with
    # "duplicate name". Only register by hand when no entry point announces us.
    dynamo_registry._discover_entrypoint_backends()
    if dynamo_registry._BACKENDS.get(BACKEND_NAME) is None:
        dynamo_registry.register_backend(compiler_fn=fusedtriton, name=BACKEND_NAME)


_register_backend()


def release_graphs() -> None:
    """Free the CUDA graphs that replay fused launches (the cell's opaque ops: see README,
    "Replayed launches") and the memory they hold; later calls capture again as needed."""
    from .patterns import _common

    _common.release_graphs()


def explain(model, *args, mode=None, options=None, **kwargs):
    """Compile `model` with fusedtriton, run it once on (*args, **kwargs), and report:
    the device profile, each fused site (pattern, shapes, dtype, precision, chosen config)
    and each near-miss with its reason. `print(report)` reads well. The call is a real one: a
    model in training mode updates its BatchNorm running statistics, as any call does."""
    import torch

    from . import autotune
    from .backend import _report_sinks
    from .report import ExplainReport

    sink: list = []

    def backend(gm, example_inputs):
        return fusedtriton(gm, example_inputs, mode=mode, options=options)

    backend.__name__ = BACKEND_NAME  # Dynamo names it in errors: "backend='fusedtriton' raised"

    codes: list = []  # every code object Dynamo compiles meanwhile (graph breaks' resume functions too)
    hook = _record_compiled_codes(codes)
    _report_sinks.append(sink)
    try:
        compiled = torch.compile(model, backend=backend)
        compiled(*args, **kwargs)
    finally:
        _report_sinks.remove(sink)
        if hook is not None:
            hook.remove()
        # Dynamo keeps a cache entry per backend for each compiled code: every explain() left
        # one more, and at Dynamo's recompile limit (8) explain() reported nothing and the user's
        # own compiled model stopped recompiling (new shapes ran eagerly). Its compiled entries
        # go too, as with torch._dynamo.explain (which resets all): it compiles again once.
        _forget_compiled_code(model, codes)
    for graph in sink:
        for site in graph.fused:
            choice = autotune.TUNER.lookup(site.info.get("key"))
            if choice is not None:
                site.info["choice"] = choice.describe()
    return ExplainReport(sink)


def _record_compiled_codes(codes: list):
    """Collect into `codes` the code objects Dynamo compiles until the returned handle is
    removed (None on a torch without bytecode hooks)."""
    try:
        from torch._dynamo.convert_frame import register_bytecode_hook
    except ImportError:
        return None

    def hook(code, new_code):
        codes.append(code)
        return None

    return register_bytecode_hook(hook)


def _forget_compiled_code(model, codes=()) -> None:
    try:
        from torch._dynamo.eval_frame import remove_from_cache
    except ImportError:  # a torch without it: entries stay, as before
        return
    if hasattr(model, "__code__") or hasattr(getattr(model, "forward", None), "__code__"):
        # (for anything else, a functools.partial say, torch resets every compiled model of the
        # process; the codes recorded below are what this explain() compiled)
        remove_from_cache(model)
    for code in dict.fromkeys(codes):
        remove_from_cache(code)


__all__ = [
    "BACKEND_NAME", "DeviceProfile", "MODES", "OPTION_DOCS", "Options", "Pattern", "counters",
    "device_profile", "explain", "from_properties", "fusedtriton", "pattern_names", "register_pattern",
    "release_graphs",
]
