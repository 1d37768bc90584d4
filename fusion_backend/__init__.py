"""fusedtriton: a torch.compile backend that fuses two subgraphs into autotuned Triton kernels.

    torch.compile(model, backend="fusedtriton", mode=None, options={...})

Importing this package is cheap (no Triton compilation, no GPU work) and registers the
backend name once, whether or not the `torch_dynamo_backends` entry point was seen first.
"""
from __future__ import annotations

import collections

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


_UNSET = object()


def explain(model, *args, mode=_UNSET, options=_UNSET, model_kwargs=None, **kwargs):
    """Compile `model` with fusedtriton, run it once on (*args, **kwargs), and report:
    the device profile, each fused site (pattern, shapes, dtype, precision, chosen config)
    and each near-miss with its reason. `print(report)` reads well. The call is a real one: a
    model in training mode updates its BatchNorm running statistics, as any call does.

    `model` may be the result of `torch.compile(..., backend="fusedtriton", mode=...,
    options=...)` or a module compiled in place (`module.compile(backend="fusedtriton", ...)`):
    its mode and options are used unless `mode=` or `options=` is given here (then neither is
    taken from it); its `dynamic=` and `fullgraph=` are used always. explain's own compile is not counted in `counters`. Keyword arguments of
    the model named `mode`, `options` or `model_kwargs` go in `model_kwargs={...}` (merged with
    **kwargs)."""
    import torch

    from . import autotune
    from .backend import _report_sinks
    from .report import ExplainReport

    # a module compiled in place calls its compiled copy from __call__: explain compiles the
    # plain call instead (else the report would be that copy's, with its settings)
    in_place = getattr(model, "_compiled_call_impl", None) if isinstance(model, torch.nn.Module) else None
    compiled_as = in_place if in_place is not None else model
    shape_settings = _shape_settings(compiled_as)
    if mode is _UNSET and options is _UNSET:
        mode, options = _compiled_settings(compiled_as)
    else:
        mode, options = (None if mode is _UNSET else mode), (None if options is _UNSET else options)
    if model_kwargs is not None:
        if not isinstance(model_kwargs, dict):
            raise TypeError(f"fusedtriton.explain: model_kwargs must be a dict, got {type(model_kwargs).__name__}")
        both = sorted(set(model_kwargs) & set(kwargs))
        if both:
            raise TypeError(f"fusedtriton.explain: {both} given both in model_kwargs and as keywords")
        kwargs = {**kwargs, **model_kwargs}
    sink: list = []
    counted = collections.Counter(counters)
    if in_place is not None:
        model._compiled_call_impl = None

    def backend(gm, example_inputs):
        return fusedtriton(gm, example_inputs, mode=mode, options=options)

    backend.__name__ = BACKEND_NAME  # Dynamo names it in errors: "backend='fusedtriton' raised"

    codes: list = []  # every code object Dynamo compiles meanwhile (graph breaks' resume functions too)
    hook = _record_compiled_codes(codes)
    _report_sinks.append(sink)
    try:
        compiled = torch.compile(model, backend=backend, **shape_settings)
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
        if in_place is not None:
            model._compiled_call_impl = in_place
        counters.clear()
        counters.update(counted)  # sites of explain's own compile: not the program's
    for graph in sink:
        for site in graph.fused:
            choice = autotune.TUNER.lookup(site.info.get("key"))
            if choice is not None:
                site.info["choice"] = choice.describe()
    return ExplainReport(sink)


def _dynamo_ctx(model):
    """The Dynamo context torch.compile wrapped `model` in (None for anything else)."""
    ctx = getattr(model, "dynamo_ctx", None)  # an OptimizedModule
    if ctx is None:  # a compiled function: the context is in its closure
        for cell in getattr(model, "__closure__", None) or ():
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            if hasattr(value, "callback") and hasattr(value, "first_ctx"):
                return value
    return ctx


def _shape_settings(model) -> dict:
    """torch.compile's `dynamic=` and `fullgraph=` as `model` was compiled with them (any
    backend): explain compiles with the same, so a dynamic model's report shows the launch
    its sites take with symbolic sizes (the inline launch needs static ones)."""
    ctx = _dynamo_ctx(model)
    settings = {}
    if getattr(ctx, "_dynamic", None) is not None:
        settings["dynamic"] = ctx._dynamic
    if getattr(ctx, "fullgraph", None) is True:
        settings["fullgraph"] = True
    return settings


def _compiled_settings(model):
    """(mode, options) that `torch.compile(..., backend="fusedtriton", mode=, options=)` gave
    `model`, read from torch's wrapper of the backend; (None, None) for anything else (a
    plain module or function, another backend, a torch whose internals differ)."""
    wrapper = getattr(_dynamo_ctx(model), "callback", None)
    for _ in range(8):  # Dynamo's wrappers of the backend, each holding the next
        if wrapper is None:
            break
        kwargs = getattr(wrapper, "kwargs", None)
        if isinstance(kwargs, dict) and getattr(wrapper, "compiler_name", None) == BACKEND_NAME:
            return kwargs.get("mode"), kwargs.get("options")
        wrapper = getattr(wrapper, "_torchdynamo_orig_backend", None)
    return None, None


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
