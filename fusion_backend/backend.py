"""The `fusedtriton` torch.compile backend: profile -> normalize -> patterns -> Inductor."""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import warnings
from typing import List, Optional

import torch
from torch import fx
from torch._dynamo.exc import RestartAnalysis
from torch.utils import _pytree as pytree

from . import devices, normalize as _normalize, registry, trial as _trial
from .options import Options
from .report import GraphReport, Site

log = logging.getLogger("fusion_backend")

#: +1 per replaced site, keyed by pattern name.
counters: collections.Counter = collections.Counter()

# explain() pushes a list here; every graph compiled meanwhile appends its report to it.
_report_sinks: List[list] = []


@dataclasses.dataclass
class RewriteContext:
    gm: fx.GraphModule
    profile: devices.DeviceProfile
    options: Options
    device: torch.device
    examples: dict = dataclasses.field(default_factory=dict)  # placeholder node -> real example tensor
    # tuning key -> why a site was fused only for the run-time trial to settle (launch-bound
    # alone, or a tie with the unfused path: patterns/_common.py)
    launch_bound: dict = dataclasses.field(default_factory=dict)
    # tuning key -> the fused config of a site the tuner left unfused but this compile fuses
    # for the trial (`_common._fuse_for_the_trial`); kept here, not in the tuner, so a later
    # compile without the trial (or under CUDA graphs) sees the tuner's own verdict
    trial_configs: dict = dataclasses.field(default_factory=dict)
    graph_problem: Optional[str] = None  # why no site of this graph is fused (every site's reason)

    def dot_precision(self, dtype: torch.dtype) -> str:
        return self.profile.dot_precision(dtype)

    @property
    def tunes_at_compile_time(self) -> bool:
        """On a GPU with autotuning on, each site is timed while compiling (fused configs and
        the unfused path, on the real parameters), and a site whose unfused path is faster is
        left to Inductor. The interpreter times nothing."""
        return self.options.autotune and self.profile.vendor != "interpreter"

    def real_tensor(self, node):
        """The real example tensor of a placeholder (parameters, buffers and inputs under
        Dynamo), else a random tensor shaped like the node's example value; None stays None."""
        if node is None:
            return None
        if node in self.examples:
            return self.examples[node]
        val = _normalize.example_value(node)
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        from .patterns._common import hint  # (here: `import fusion_backend` loads no pattern code)

        with unset_fake_temporarily():
            shape = [hint(s) for s in val.shape]
            return torch.randn(shape, device=val.device, dtype=val.dtype)


def _graph_device(gm: fx.GraphModule, example_inputs) -> Optional[torch.device]:
    """The accelerator the graph runs on: the first CUDA/HIP tensor among the inputs
    (parameters and buffers are inputs under Dynamo), else the CPU."""
    tensors = [t for t in example_inputs if isinstance(t, torch.Tensor)]
    for node in gm.graph.nodes:
        val = _normalize.example_value(node)
        if isinstance(val, torch.Tensor):
            tensors.append(val)
    for t in tensors:
        if t.device.type == "cuda":
            return t.device
    return torch.device(tensors[0].device.type) if tensors else torch.device("cpu")


def _copy_graph(gm: fx.GraphModule) -> fx.Graph:
    """An independent copy of gm's graph, including what Dynamo attaches to nodes outside
    `meta` (e.g. each placeholder's `_dynamo_source`, which tells Inductor what is a parameter)."""
    graph = fx.Graph()
    val_map: dict = {}
    out = graph.graph_copy(gm.graph, val_map)
    graph.output(out)
    for old, new in val_map.items():
        for name, value in getattr(old, "__dict__", {}).items():
            if name.startswith("_dynamo"):
                setattr(new, name, value)
    return graph


def _restore(gm: fx.GraphModule, graph: fx.Graph) -> fx.GraphModule:
    """Put the untouched graph back into Dynamo's own GraphModule. A new GraphModule would lose
    what Dynamo attached to this one (meta, shape_env, parameter sources), and Inductor would
    then, e.g., treat parameters as non-static and copy them into CUDA graphs on every replay."""
    gm.graph = graph
    gm.recompile()
    return gm


def _sets_matmul_precision(graph: fx.Graph) -> bool:
    """Whether the graph calls torch.set_float32_matmul_precision. Dynamo has applied the last
    such call before the backend runs, so a site before it would be compiled at the precision
    eager uses only after it."""
    return any(n.op == "call_function" and n.target is torch.set_float32_matmul_precision for n in graph.nodes)


def _rewrite_site(pattern, match, ctx: RewriteContext, anchor: fx.Node) -> Site:
    graph = ctx.gm.graph
    before = set(graph.nodes)
    try:
        reason = ctx.graph_problem or pattern.check(match, ctx)
        if reason:
            return Site(pattern.name, anchor.name, fused=False, reason=reason)
        info = pattern.replace(match, ctx)
    except Exception as exc:  # one bad site must never break the model: leave it unfused
        for node in reversed(list(graph.nodes)):
            if node not in before and not node.users:
                graph.erase_node(node)
        if set(graph.nodes) != before:
            # the replacement failed halfway (old nodes erased, a new op already read): the
            # site cannot be left as it was, so the whole graph goes to Inductor untouched
            # (`fusedtriton`'s last net), not a half-rewritten graph reported unfused
            raise
        log.warning("fusedtriton: rewriting %s at %s failed (%s: %s); left unfused",
                    pattern.name, anchor.name, type(exc).__name__, exc)
        return Site(pattern.name, anchor.name, fused=False, reason=f"rewrite error: {type(exc).__name__}: {exc}")
    counters[pattern.name] += 1
    return Site(pattern.name, anchor.name, fused=True, info=info)


def rewrite(gm: fx.GraphModule, profile, options: Options, device, example_inputs=()) -> GraphReport:
    """Normalize `gm` and apply every enabled pattern in place; return what happened."""
    report = GraphReport(profile=profile.name, mode=options.mode, patterns=options.patterns)
    _normalize.normalize(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    from torch._subclasses.fake_tensor import is_fake

    # Dynamo's DDP optimizer compiles its subgraphs with FakeTensor example inputs: taken for
    # real ones, the compile-time timing ran kernels on fakes and every MLP block was left
    # unfused for "Cannot access data pointer of Tensor" (real_tensor makes random ones instead)
    examples = {n: t for n, t in zip(placeholders, example_inputs) if isinstance(t, torch.Tensor) and not is_fake(t)}
    ctx = RewriteContext(gm=gm, profile=profile, options=options, device=device, examples=examples)
    if _sets_matmul_precision(gm.graph):
        ctx.graph_problem = ("the graph calls torch.set_float32_matmul_precision: its sites would not all run at "
                             "the precision eager uses for them")
    for pattern in registry.enabled_patterns(options.patterns):
        for node in list(gm.graph.nodes):
            if node.graph is not gm.graph or node not in gm.graph.nodes:
                continue
            try:
                match = pattern.match(node)
            except Exception as exc:  # an unexpected spelling must not break the compile
                log.warning("fusedtriton: %s.match failed at %s (%s: %s); skipped",
                            pattern.name, node.name, type(exc).__name__, exc)
                continue
            if match is not None:
                report.sites.append(_rewrite_site(pattern, match, ctx, node))
    report.sites += _sites_in_bodies(gm, options)
    for site in report.fused:
        if site.info.get("key") in ctx.launch_bound:
            site.info["launch_bound"] = ctx.launch_bound[site.info["key"]]
    if report.fused and registry.use_inference_twins(gm):
        log.debug("fusedtriton: grad is off in this graph: fused ops without autograd kernels")
    # no eliminate_dead_code(): it would drop unused in-place method calls such as
    # num_batches_tracked.add_(1); patterns erase exactly the nodes they replaced
    gm.graph.lint()
    gm.recompile()
    return report


BODY_REASON = ("inside the body of {op} (torch.utils.checkpoint, torch.cond, ...), which the backend does not "
               "rewrite (README, Known limits): left to Inductor")


def _sites_in_bodies(gm: fx.GraphModule, options: Options) -> List[Site]:
    """Pattern structures inside higher-order ops' bodies (subgraphs the graph reaches by
    get_attr), nested ones included: the rewrite does not enter them, so they are reported as
    near-misses rather than not at all. Matched on a normalized copy; the bodies stay as they are."""
    import copy

    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.HigherOrderOperator):
            continue
        for arg in (a for a in pytree.tree_leaves((node.args, node.kwargs)) if isinstance(a, fx.Node)):
            body = getattr(gm, arg.target, None) if arg.op == "get_attr" else None
            if not isinstance(body, fx.GraphModule):
                continue
            try:
                body = copy.deepcopy(body)
                _normalize.normalize(body)
                found = [(pattern.name, n.name) for pattern in registry.enabled_patterns(options.patterns)
                         for n in body.graph.nodes if pattern.match(n) is not None]
            except Exception as exc:  # only a report: never a reason to fail the compile
                log.debug("fusedtriton: no patterns searched in %s (%s: %s)", arg.target, type(exc).__name__, exc)
                continue
            reason = BODY_REASON.format(op=getattr(node.target, "__name__", node.target))
            sites += [Site(name, f"{arg.target}.{where}", False, reason) for name, where in found]
            sites += [dataclasses.replace(site, node=f"{arg.target}.{site.node}")
                      for site in _sites_in_bodies(body, options)]
    return sites


def _inductor(gm, example_inputs, options: Options):
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=options.inductor_config_patches())


def _abandon(counted, report=None):
    """Dynamo restarts this compile (RestartAnalysis, e.g. TensorifyScalarRestartAnalysis: a
    float input such as a BatchNorm momentum changed between calls is to be specialized). Not a
    failure of ours or Inductor's, so it is passed through, not answered by compiling the
    original graph; this attempt's sites and report are not the graph's."""
    counters.clear()
    counters.update(counted)
    for sink in _report_sinks:
        sink[:] = [r for r in sink if r is not report]


def _inductor_for(report, counted, gm, example_inputs, opts):
    """Inductor on `gm`, the graph `report` describes: where Dynamo restarts the compile from
    inside Inductor, the report goes with the attempt (`_abandon`), whether or not it fused
    anything (explain() listed a second, unfused graph for one that was then fused)."""
    try:
        return _inductor(gm, example_inputs, opts)
    except RestartAnalysis:
        _abandon(counted, report)
        raise


def fusedtriton(gm: fx.GraphModule, example_inputs, mode: Optional[str] = None, options: Optional[dict] = None):
    """torch.compile backend: `torch.compile(model, backend="fusedtriton", mode=..., options={...})`."""
    opts = Options.parse(mode, options)
    counted = collections.Counter(counters)
    device = _graph_device(gm, example_inputs)
    profile = devices.device_profile(device)
    if profile is not None and opts.only_named_devices and profile.name not in devices.NAMED_PROFILES + ("interpreter",):
        report = GraphReport(profile=None, mode=opts.mode, note=f"profile {profile.name} off by only_named_devices")
        profile = None
    elif profile is None:
        report = GraphReport(profile=None, mode=opts.mode, note=f"device {device} has none"
                             + ("; Triton's interpreter gives CPU graphs one: TRITON_INTERPRET=1, small shapes only"
                                if device.type == "cpu" else ""))
    if profile is None:
        log.info(report.text())
        for sink in _report_sinks:
            sink.append(report)
        return _inductor_for(report, counted, gm, example_inputs, opts)

    original = _copy_graph(gm)
    try:
        with _on_device(device):  # compile-time tuning launches on the graph's GPU, not the current one
            report = rewrite(gm, profile, opts, device, example_inputs)
    except RestartAnalysis:
        _abandon(counted)
        raise
    except Exception as exc:  # the last net: whatever went wrong, Inductor gets the untouched graph
        warnings.warn(f"fusedtriton: rewriting the graph failed ({type(exc).__name__}: {exc}); "
                      "compiling it unchanged with Inductor (results are Inductor's; please report this)",
                      RuntimeWarning)
        counters.clear()
        counters.update(counted)  # the sites counted before the failure are not in the graph
        report = GraphReport(profile=profile.name, mode=opts.mode, note=f"rewrite failed: {exc}")
    if opts.trial and any(site.info.get("launch_bound") for site in report.fused):
        why_not = _no_trial_reason(report, profile, opts)
        if why_not:
            # sites fused only for the run-time trial, which this graph will not get: rewrite
            # again without it, so they go where the compile-time decision put them
            log.info("fusedtriton: no run-time trial (%s): sites fused for it are left unfused", why_not)
            return _compile_again(report, _restore(gm, original), example_inputs, mode, options, trial=False)
    log.info(report.text())
    for sink in _report_sinks:
        sink.append(report)
    if not report.fused:
        return _inductor_for(report, counted, _restore(gm, original), example_inputs, opts)
    try:
        compiled = _inductor_for(report, counted, gm, example_inputs, opts)
    except RestartAnalysis:
        raise
    except Exception as exc:
        if opts.inline and any(site.info.get("launch") == "inline" for site in report.fused):
            # the kernels Inductor was to launch itself: retry with the sites behind their ops
            warnings.warn(f"fusedtriton: Inductor failed on the graph with inline kernel launches "
                          f"({type(exc).__name__}: {exc}); retrying with options['inline']=False", RuntimeWarning)
            return _compile_again(report, _restore(gm, original), example_inputs, mode, options, inline=False)
        # Never break what Inductor alone compiles: retry without our rewrites.
        warnings.warn(f"fusedtriton: Inductor failed on the rewritten graph ({type(exc).__name__}: {exc}); "
                      "compiling the original graph instead (results are Inductor's; to skip the rewrite, leave "
                      "the fused pattern out with options={'patterns': [...]}, fusion_backend.explain() names it; "
                      "please report this)", RuntimeWarning)
        _unfuse(report, f"graph fell back to Inductor: {type(exc).__name__}")
        return _inductor_for(report, counted, _restore(gm, original), example_inputs, opts)
    if opts.cudagraphs:
        compiled = _without_replays(compiled)
    why_not = _no_trial_reason(report, profile, opts)
    if why_not:
        log.debug("fusedtriton: no run-time trial: %s", why_not)
        return compiled
    try:
        original_compiled = _inductor_for(report, counted, _restore(gm, original), example_inputs, opts)
    except RestartAnalysis:
        raise
    except Exception as exc:
        # the original graph is only the trial's rival: keep the fused one, which compiled, with
        # the sites fused for the trial too (rewriting without them would hand Inductor more of
        # the graph it just failed on)
        log.warning("fusedtriton: Inductor failed on the original graph (%s: %s); no run-time trial, "
                    "the fused graph is kept", type(exc).__name__, exc)
        report.note = f"no run-time trial: Inductor failed on the original graph ({type(exc).__name__}); fused graph kept"
        return compiled
    report.note = (f"run-time trial against the original graph: pending ({_trial.TRIAL_CALLS} calls of each, "
                   f"in blocks of {_trial.TRIAL_BLOCK})")
    return _trial.as_compiled_fn(_trial.GraphTrial(compiled, original_compiled, _trial_decided(report),
                                                   clock=_trial.CudaClock(device)))


def _on_device(device):
    """The CUDA device guard of the graph's device (Triton launches on the current device)."""
    if device is not None and device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _without_replays(compiled):
    """A graph compiled for CUDA graphs calls its ops with their launch-graph replay off
    (`_common.no_replays`): its first runs route this thread's allocations to Inductor's pool,
    and its later runs replay Inductor's own graph, which holds the launches already."""
    from .patterns._common import no_replays

    def run(*args):
        with no_replays():
            return compiled(*args)

    return run


def _compile_again(report: GraphReport, gm, example_inputs, mode, options, **changed):
    """Drop this rewrite's report and counts, and compile the original graph `gm` again with
    `changed` options (the rewrite then decides every site afresh)."""
    for sink in _report_sinks:
        sink[:] = [r for r in sink if r is not report]
    for site in report.fused:
        counters[site.pattern] -= 1
    return fusedtriton(gm, example_inputs, mode=mode, options=dict(options or {}, **changed))


def _unfuse(report: GraphReport, reason: str):
    """The graph runs without its rewrites after all: sites and counters say so."""
    for site in report.fused:
        counters[site.pattern] -= 1
        site.fused, site.reason = False, reason


def _no_trial_reason(report: GraphReport, profile, opts: Options) -> str:
    """Why this fused graph does not get a run-time trial (`trial.py`), or "" when it does:
    only where the compile-time decision timed the sites on a GPU, without CUDA graphs (host
    time per call vanishes under them), and where the fused sites' tuned GPU time is small
    enough for the rest of the graph's host time to matter, or where a site was fused although
    it looked launch-bound alone (`_common.tuned_unfused_reason`); the original graph's extra
    Inductor compile is then cheap too (the unrolled RNN, 77 s with Inductor, never gets one)."""
    if not opts.trial:
        return "options['trial'] is False"
    if not opts.autotune or profile.vendor == "interpreter":
        return "sites not timed at compile time"
    if opts.cudagraphs:
        return "CUDA graphs: no host time per call to weigh"
    from . import autotune

    total = 0.0
    for site in report.fused:
        choice = autotune.TUNER.lookup(site.info.get("key")) if site.info.get("key") else None
        if choice is None or choice.fused_ms is None:
            return f"no tuned GPU time for {site.pattern} at {site.node}"
        total += choice.fused_ms
    if total >= _trial.TRIAL_BELOW_MS:
        return f"fused sites take {total:.3f} ms of GPU time a call (trial below {_trial.TRIAL_BELOW_MS} ms)"
    return ""


def _trial_decided(report: GraphReport):
    def decided(fused_ms: Optional[float], unfused_ms: Optional[float], keep_fused: bool):
        if fused_ms is None:  # the other graph raised during the trial
            times = f"the {'original' if keep_fused else 'fused'} graph raised during the trial"
        else:
            times = (f"{fused_ms:.4f} ms/call fused vs {unfused_ms:.4f} unfused "
                     f"(median of blocks of {_trial.TRIAL_BLOCK} back-to-back calls)")
        if keep_fused:
            report.note = f"run-time trial: fused graph kept, {times}"
        else:
            report.note = f"run-time trial: original graph kept, {times}"
            why = times if fused_ms is None else f"the whole graph ran faster unfused ({times})"
            _unfuse(report, f"run-time trial: {why}: left to Inductor")
        log.info("fusedtriton: %s", report.note)

    return decided
