"""Helpers the pattern modules share: graph checks and the launch plumbing."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import operator
import threading
import time
import types
from typing import Optional

import torch
from torch import fx
from torch.nn import functional as F
from torch.utils import _pytree as pytree

from fusion_backend import autotune, config_spaces, registry, trial
from fusion_backend.normalize import _arg, example_value

log = logging.getLogger("fusion_backend")

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def only_user(node: fx.Node, user: fx.Node) -> bool:
    """`user` is the one user of `node` and reads it once: a Linear whose input and weight are
    both the cat (`c @ c.t()`) is its one user too, and the site's replacement would erase a
    node the op still reads."""
    if list(node.users) != [user]:
        return False
    uses = []
    fx.node.map_arg((user.args, user.kwargs), lambda n: uses.append(n) if n is node else None)
    return len(uses) == 1


def other_uses(node: fx.Node, user: fx.Node) -> str:
    """For a reason: what besides one read by `user` uses `node`."""
    others = [u.name for u in node.users if u is not user]
    return f"other users: {others}" if others else f"read more than once by {user.name}"


def hint(size) -> int:
    """A concrete int for a possibly symbolic size (for reports, tuning keys and the example
    tensors timed at compile time), read from the symbol's hint: int() on a SymInt would install
    a guard and specialize the batch size. A size known only at run time (unbacked: the rows
    `nonzero` picks) has no hint; it reads as Inductor's own stand-in for such sizes."""
    if isinstance(size, torch.SymInt):
        if unbacked(size):
            from torch._inductor import config as inductor_config

            return int(inductor_config.unbacked_symint_fallback)
        return int(size.node.hint)
    return int(size)


def size_text(size) -> str:
    """A size as a report shows it: its value, or the symbol of a size known only at run time
    (whose `hint` is a stand-in)."""
    return str(size.node.expr) if unbacked(size) else str(hint(size))


def unbacked(size) -> bool:
    """Whether `size` is known only at run time (no example value: its `hint` is a stand-in)."""
    return isinstance(size, torch.SymInt) and size.node.hint is None


def static_size(size) -> Optional[int]:
    """`size` as an int where it is the same for every call of the compiled graph, else None
    (a dynamic size: comparing its hint would hold for the example only)."""
    if isinstance(size, torch.SymInt):
        return size.node.maybe_as_int()
    return int(size)


def compute_dtype(linear: fx.Node, inputs, profile):
    """(dtype the Linear computes in, None) or (None, reason). Without autocast every input
    has the Linear's output dtype; under autocast Dynamo records an fp16/bf16 output from
    inputs that are fp32 or already that dtype, and the fused op then computes in it."""
    lin_val = example_value(linear)
    if lin_val is None:
        return None, f"{linear.name} has no tensor metadata"
    dtype = lin_val.dtype
    dtypes = {example_value(n).dtype for n in inputs if n is not None}
    if dtypes == {dtype}:
        return dtype, None
    if dtype in (torch.float16, torch.bfloat16) and dtypes <= {torch.float32, dtype}:
        if str(dtype).replace("torch.", "") not in profile.input_dtypes:
            return None, f"autocast dtype {dtype} is not supported on profile {profile.name}"
        return dtype, None
    return None, f"dtype mismatch: the Linear computes in {dtype} from inputs of {sorted(map(str, dtypes))}"


def cast_to(graph, nodes, dtype):
    """The nodes as `dtype` (autocast's casts made explicit, so the op sees what eager's
    Linear saw); None and nodes already in `dtype` pass through. Inserts at the current point."""
    return [n if n is None or example_value(n).dtype == dtype else graph.call_method("to", (n, dtype))
            for n in nodes]


def written_inside(first: fx.Node, last: Optional[fx.Node], inputs) -> Optional[str]:
    """An in-place write between `first` and `last` (the fused op runs at `last`; None: the
    graph's end) to storage that one of `inputs` shares (the input itself or any view of it),
    or None."""
    from torch.multiprocessing.reductions import StorageWeakRef

    storages = set()
    for node in inputs:
        val = example_value(node) if isinstance(node, fx.Node) else None
        if isinstance(val, torch.Tensor):
            storages.add(StorageWeakRef(val.untyped_storage()))
    node = first.next
    while node is not last and node.op != "output":
        for target in written_nodes(node):
            val = example_value(target)
            if isinstance(val, torch.Tensor) and StorageWeakRef(val.untyped_storage()) in storages:
                return f"{node.name} writes in place to memory of a fused input before the fused op would run"
        node = node.next
    return None


def tensor_problem(nodes, *, device, profile) -> Optional[str]:
    """Why these tensor nodes cannot feed a fused kernel (device, dtype, a strided vector), or
    None. The kernels read 2-D operands through their strides, but per-feature vectors (bias,
    BatchNorm weight, bias and statistics) at stride 1."""
    for node in nodes:
        if node is None:
            continue
        val = example_value(node)
        if not isinstance(val, torch.Tensor):
            return f"{getattr(node, 'name', node)} has no tensor metadata"
        if torch._C._functorch.is_functorch_wrapped_tensor(val):
            # the ops have no batching rules and their autograd is not functorch's
            return (f"inside a torch.func transform (grad, vmap, jacrev, ...; {node.name} is a functorch-wrapped "
                    "tensor): left to Inductor")
        if val.device.type != device.type or (device.index is not None and val.device.index not in (None, device.index)):
            return f"mixed devices: {node.name} is on {val.device}, the graph on {device}"
        if val.dtype not in SUPPORTED_DTYPES:
            return f"unsupported dtype {val.dtype} ({node.name}); fused kernels take float32/float16/bfloat16"
        if str(val.dtype).replace("torch.", "") not in profile.input_dtypes:
            return f"dtype {val.dtype} ({node.name}) is not supported on profile {profile.name}"
        if val.dim() == 1 and val.shape[0] != 1 and val.stride(0) != 1:
            return (f"{node.name} is a strided vector (stride {val.stride(0)}); the fused kernels read "
                    "per-feature vectors at stride 1")
    return None


def linear_shape_problem(weight: fx.Node, vectors) -> Optional[str]:
    """Why the Linear's weight is not (N, K) or a per-feature vector (bias, BatchNorm's) is not
    exactly (N,), or None. Eager broadcasts a 0-d or (1,) bias; the kernels would read N values."""
    w = example_value(weight)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return f"Linear weight {getattr(weight, 'name', weight)} is not 2-D: left to Inductor"
    n = hint(w.shape[0])
    for node in vectors:
        val = example_value(node) if isinstance(node, fx.Node) else None
        if node is not None and (val is None or val.dim() != 1 or hint(val.shape[0]) != n):
            shape = None if val is None else tuple(hint(d) for d in val.shape)
            return (f"{node.name} has shape {shape}, not ({n},): a broadcast per-feature vector is "
                    "left to Inductor")
    return None


#: the calls by which Dynamo records a switch of grad mode (`torch._C._set_grad_enabled`), and
#: the entry and exit of autocast, inference mode and disabled saved-tensor hooks regions
_SET_GRAD = "_set_grad_enabled"
_ENTERS = {"_enter_autocast", "_enter_inference_mode", "_saved_tensors_hooks_disable"}
_EXITS = {"_exit_autocast", "_exit_inference_mode", "_saved_tensors_hooks_enable"}


def grad_modes(graph) -> dict:
    """The mode each node runs in: (grad enabled, the regions it is inside, by their entry
    nodes), from the grad mode the graph was compiled in (Dynamo guards it). Higher-order ops
    that wrap a region (wrap_with_set_grad_enabled, ...) hold it in a subgraph of their own."""
    grad, regions, modes = torch.is_grad_enabled(), [], {}
    for node in graph.nodes:
        name = getattr(node.target, "__name__", "") if node.op == "call_function" else ""
        if name == _SET_GRAD and node.args:
            grad = bool(node.args[0])
        elif name in _ENTERS:
            regions.append(node)
        elif name in _EXITS and regions:
            regions.pop()
        modes[node] = (grad, tuple(regions))
    return modes


def grad_on(modes: dict, node: fx.Node) -> bool:
    """Whether autograd records at `node` (`modes` from `grad_modes`): grad enabled and not
    inside an inference-mode region."""
    enabled, regions = modes[node]
    inference = any(getattr(r.target, "__name__", "") == "_enter_inference_mode" and (not r.args or r.args[0])
                    for r in regions)
    return enabled and not inference


def grad_mode_problem(nodes) -> Optional[str]:
    """Why nodes of one site cannot become one op (None: they can): a grad mode switch among
    them (`with torch.no_grad():` around the Linear alone, a frozen projection); the op would
    run in one mode and give gradients where eager gives none, or the reverse. (Autocast
    regions are not compared: the sites make autocast's casts explicit.)"""
    modes = grad_modes(nodes[0].graph)

    def grad(node):
        return grad_on(modes, node)

    state = {True: "enabled", False: "disabled"}
    first = grad(nodes[0])
    for node in nodes[1:]:
        if grad(node) != first:
            return (f"{node.name} runs with grad {state[not first]}, {nodes[0].name} with grad {state[first]}: "
                    "one op cannot run in both modes")
    return None


def backward_will_run(at: fx.Node, inputs) -> bool:
    """Whether the compiled graph will run the backward of the site at `at`: grad enabled where
    it runs (the mode the graph was compiled in, as switched inside the graph: `with
    torch.enable_grad():` in a call made under no_grad) and one of `inputs` requiring grad."""
    grad_enabled, _ = grad_modes(at.graph)[at]
    return grad_enabled and any(isinstance(n, fx.Node) and getattr(example_value(n), "requires_grad", False)
                                for n in inputs)


def saved_input_written(inputs, backward: bool) -> Optional[str]:
    """Why a fused op that saves `inputs` for its backward cannot run here: an in-place write in
    the graph to one of them, or, after it, to memory it shares (Dynamo records
    `h.data.copy_(v)` as a copy_ into `_get_data_attr(h)`, and `h.view(-1).copy_(v)` into a view,
    neither a user of `h` that writes); the op's backward would read the written values where
    eager's saved its own. None where no `backward` will run: a write before the site is what
    the op reads, as eager does, and one after it comes too late to matter (writes between the
    matched ops are `written_inside`'s). Refusing those too left a state buffer's `copy_` at the
    end of forward unfused: KernelBench-style cells and whole sequences."""
    if not backward:
        return None
    for node in inputs:
        if not isinstance(node, fx.Node):
            continue
        # (from `node` on: a write before it is what it holds, not a write to it)
        if any(node in written_nodes(user) for user in node.users) or written_inside(node, None, [node]) is not None:
            return f"input {node.name} is mutated in the graph"
    return None


# Dynamo records `t += u` on a tensor as operator.iadd(t, u), which writes t
_AUGMENTED = {getattr(operator, name) for name in ("iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow",
                                                    "imatmul", "iand", "ior", "ixor", "ilshift", "irshift")}
# ... and an explicit `t.__imul__(u)` (or `torch.Tensor.__iadd__(t, u)`) under the dunder's name
_AUGMENTED_DUNDERS = {f"__{f.__name__}__" for f in _AUGMENTED}

#: Python-level calls that write tensors other than their first argument, where a flag says
#: so: batch and instance norm update the running statistics they are given where they compute
#: batch statistics, an embedding lookup with `max_norm` renormalizes the rows of its weight.
#: function -> ((position, name) of each written argument, (position, name, default,
#: the flag's value that means no write)); a flag that is not a constant counts as set
_WRITES_WHERE_FLAGGED = {
    F.batch_norm: (((1, "running_mean"), (2, "running_var")), (5, "training", False, False)),
    F.instance_norm: (((1, "running_mean"), (2, "running_var")), (5, "use_input_stats", True, False)),
    torch.batch_norm: (((3, "running_mean"), (4, "running_var")), (5, "training", None, False)),
    torch.instance_norm: (((3, "running_mean"), (4, "running_var")), (5, "use_input_stats", None, False)),
    torch.native_batch_norm: (((3, "running_mean"), (4, "running_var")), (5, "training", None, False)),  # (no a! in its schema)
    F.embedding: (((1, "weight"),), (3, "max_norm", None, None)),
    F.embedding_bag: (((1, "weight"),), (3, "max_norm", None, None)),
}


def _schema_written(node: fx.Node, schemas) -> list:
    """The arguments an aten op writes by its schemas (`Tensor(a!)`), of any overload: the
    positional ones by position or name, the keyword-only ones by name."""
    written = []
    for schema in schemas:
        for position, argument in enumerate(schema.arguments):
            if argument.alias_info is not None and argument.alias_info.is_write:
                written.append(_arg(node, None if argument.kwarg_only else position, argument.name, default=None))
    return written


@functools.lru_cache(maxsize=None)
def _aten_schemas(name: str) -> tuple:
    """The schemas of `torch.ops.aten.<name>`'s overloads (none where there is no such op): a
    torch builtin or a Tensor method reaches the graph by name (`torch._native_batch_norm_legit`,
    `x.index_put_`), with aten's arguments in aten's order."""
    try:
        packet = getattr(torch.ops.aten, name)
        return tuple(getattr(packet, overload)._schema for overload in packet.overloads())
    except (AttributeError, RuntimeError):
        return ()


def _flagged_written(node: fx.Node) -> list:
    try:
        spec = _WRITES_WHERE_FLAGGED.get(node.target)
    except TypeError:  # an unhashable target
        return []
    if spec is None:
        return []
    tensors, (position, name, default, no_write) = spec
    if _arg(node, position, name, default=default) is no_write:
        return []
    return [_arg(node, p, n, default=None) for p, n in tensors]


def _body_writes(node: fx.Node) -> bool:
    """Whether a higher-order op's body (`checkpoint`, `wrap`, `cond`'s branches: submodules the
    graph reaches by get_attr) writes in place to memory of its inputs (a write to a tensor the
    body made itself changes nothing outside); True where a body cannot be found or read."""
    module = node.graph.owning_module
    bodies = [a for a in _hop_operands(node) if a.op == "get_attr"]
    for body in bodies:
        sub = getattr(module, body.target, None) if module is not None else None
        graph = getattr(sub, "graph", None)
        if graph is None:
            return True
        inputs = [n for n in graph.nodes if n.op == "placeholder"]  # (an FX graph's first nodes)
        try:
            if inputs and written_inside(inputs[0], None, inputs) is not None:
                return True
        except Exception:  # (no storage to compare: a functorch-wrapped value, ...)
            return True
    return not bodies


def _hop_operands(node: fx.Node) -> list:
    """Every node among a higher-order op's arguments, nested ones included: `cond` passes its
    operands as a tuple (`cond(pred, true_fn, false_fn, (h,))`)."""
    leaves = pytree.tree_leaves((node.args, node.kwargs))
    return [a for a in leaves if isinstance(a, fx.Node)]


def written_nodes(node: fx.Node) -> list:
    """The nodes whose memory `node` writes in place: the first argument of an in-place op or
    method (`add_`, `copy_`), of an item assignment, of an augmented assignment (`t += u`, also
    spelled `t.__iadd__(u)`) and of a call with `inplace=True` (`F.relu(t, inplace=True)`); the
    `out=` tensors of any call; every argument an aten op's schema marks as written (also where
    a torch builtin or a Tensor method of that name is called); the flagged writes of
    `_WRITES_WHERE_FLAGGED` (running statistics, an embedding's weight); every tensor argument
    of a higher-order op whose body writes."""
    if node.op not in ("call_function", "call_method"):
        return []
    written = []
    out = node.kwargs.get("out")
    if out is not None:
        written += [out]
    target = node.target
    mutable = False
    if isinstance(target, torch._ops.OpOverload):
        written += _schema_written(node, [target._schema])
    elif isinstance(target, torch._ops.OpOverloadPacket):
        written += _schema_written(node, [getattr(target, o)._schema for o in target.overloads()])
    elif isinstance(target, torch._ops.HigherOrderOperator):
        if _body_writes(node):
            written += [a for a in _hop_operands(node) if a.op != "get_attr"]
    else:
        name = target if isinstance(target, str) else getattr(target, "__name__", "")
        # `add_`, and private ones such as `_foreach_mul_` (their first argument a list); of the
        # dunders only the augmented assignments (not `__getitem__`)
        mutable = ((name.endswith("_") and not name.endswith("__")) or name == "setitem"
                   or name in _AUGMENTED_DUNDERS or any(target is f for f in _AUGMENTED))
        if isinstance(target, (str, types.BuiltinFunctionType)) and name:
            written += _schema_written(node, _aten_schemas(name))
        if node.op == "call_function":
            written += _flagged_written(node)
    mutable = mutable or _inplace_flag(node)
    if mutable:
        written += [node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))]
    nodes = [n for w in written for n in (w if isinstance(w, (tuple, list)) else (w,)) if isinstance(n, fx.Node)]
    return list(dict.fromkeys(nodes))  # `out=` is also in the schema


@functools.lru_cache(maxsize=None)
def _inplace_position(target) -> Optional[int]:
    """The position of a function's `inplace` parameter (F.relu, F.dropout, F.hardtanh, ...),
    or None where it has none (or no Python signature)."""
    import inspect

    try:
        params = list(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return None
    return params.index("inplace") if "inplace" in params else None


def _inplace_flag(node: fx.Node) -> bool:
    """Whether a call writes its input through `inplace=True` (nn.ReLU(inplace=True) reaches the
    graph as F.relu(x, inplace=True)), by keyword or by position."""
    if node.op != "call_function" or not callable(node.target):
        return False
    if "inplace" in node.kwargs:
        return node.kwargs["inplace"] is True
    try:
        position = _inplace_position(node.target)
    except TypeError:  # an unhashable target
        return False
    return position is not None and len(node.args) > position and node.args[position] is True


def writes_in_place(node: fx.Node) -> bool:
    """Whether `node` writes to memory it did not allocate (`written_nodes`)."""
    return bool(written_nodes(node))


#: functions and methods that draw from the random number generator (dropout only in training:
#: `_RANDOM_IF_TRAINING`)
_RANDOM_NAMES = {"rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "bernoulli",
                 "bernoulli_", "normal", "normal_", "multinomial", "poisson", "uniform_", "exponential_",
                 "random_", "cauchy_", "log_normal_", "geometric_", "rrelu", "native_dropout"}
_RANDOM_IF_TRAINING = {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"}


def draws_random(node: fx.Node) -> bool:
    """Whether `node` draws random numbers: moving it across another such node would change
    which draws each gets. Dropout draws only when training (its third argument) with p > 0."""
    if node.op not in ("call_function", "call_method"):
        return False
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if name in _RANDOM_NAMES:
        return True
    if name not in _RANDOM_IF_TRAINING:
        return False
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
    training = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
    return training is not False and p != 0


_warned = set()


def launch(key, *, ctx_args, space, m, run_fused, run_unfused, run_reference, src_hash, replay=None):
    """Pick the config for `key` (tuned, cached or heuristic) and run it.

    run_fused(kwargs) launches the fused kernel with a config's meta-parameters and launch
    options; run_unfused() the cuBLAS + pointwise path; run_reference() plain torch ops,
    used if a kernel fails to compile at the real launch. The hit path is one dict lookup:
    small shapes are bound by host time. `replay` (a `Replay`): a fused launch tuned under
    `trial.TRIAL_BELOW_MS` of GPU time runs as a CUDA graph replay (`replay_launch`)."""
    choice = autotune.TUNER.choices.get(key)
    # a heuristic pick, or a search cut short by a smaller budget, where this caller tunes
    if choice is None or (ctx_args[1] and autotune.search_again(choice, True, ctx_args[2])):
        profile, autotune_on, budget, device = ctx_args
        # an op whose launch runs replayed (where tuned under TRIAL_BELOW_MS) is timed as GPU
        # time alone: timed with its host time, Triton's launch path, which the replay removes,
        # decided the search on a slow host. Not inside `no_replays()` (a reduce-overhead
        # graph's warm-up, whose allocations go to Inductor's pool): no capture of ours there
        replayed = (replay is not None and REPLAY_GRAPHS and _replayable(replay.out)
                    and not getattr(_local, "off", False))
        choice = autotune.TUNER.choose(
            key, profile=profile, space=space(), m=m, src_hash=src_hash,
            device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "interpreter",
            autotune=autotune_on, budget_s=budget,
            run_fused=lambda c: run_fused(kernel_kwargs(c, profile)), run_unfused=run_unfused,
            timer=autotune.gpu_time if replayed else None)
    if choice.source == "fallback":
        return run_reference()
    try:
        if choice.config is None:
            return run_unfused()
        if choice.kwargs is None:  # built once per choice: the replay key holds id(kwargs)
            choice.kwargs = kernel_kwargs(choice.config, ctx_args[0])
        kwargs = choice.kwargs
        if replay is not None and REPLAY_GRAPHS and (choice.fused_ms or 0.0) < trial.TRIAL_BELOW_MS:
            # only where host time can matter: a longer kernel would pay the copies for nothing
            return replay_launch(key, replay, kwargs, run_fused)
        return run_fused(kwargs)
    except Exception as exc:
        if key not in _warned:
            _warned.add(key)
            log.warning("fusedtriton: fused kernel for %s failed (%s: %s); using the unfused computation",
                        key, type(exc).__name__, exc)
        if not isinstance(exc, torch.OutOfMemoryError):  # (out of memory may pass: tried again next call)
            autotune.TUNER.record(key, autotune.Choice(None, "fallback"))
        return run_reference()


#: replay the opaque ops' fused launches as CUDA graphs (`replay_launch`); off: launch each time
REPLAY_GRAPHS = True
#: captured graphs kept, least recently used dropped first (each holds copies of its
#: activations and output, and its kernels' scratch memory: `release_graphs` frees them all)
REPLAY_CACHE_SIZE = 16
#: a key whose graph was dropped this many times after fewer than REPLAY_USEFUL replays is
#: launched directly from then on (more sites than the cache holds would otherwise capture
#: again and again); a graph replayed that often before its drop paid for its capture
REPLAY_MAX_DROPS = 2
REPLAY_USEFUL = 8
#: bound of the tables of keys seen once, dropped or launched directly (cleared when reached)
_TABLE_BOUND = 4096


@dataclasses.dataclass
class Replay:
    """What `replay_launch` needs of an op call: `launch(inputs, out, kwargs)` runs the fused
    kernels reading only `inputs` (the activations, copied into the graph's own buffers each
    call), the tensors named in `stable` (weights: their addresses are part of the graph's key,
    so the graph reads them where they are) and writing only `out`."""
    inputs: list
    out: torch.Tensor
    stable: tuple
    launch: object


@dataclasses.dataclass
class _Captured:
    kwargs: dict     # the config the graph was captured with (its identity is in the key)
    graph: object
    inputs: list     # the graph's own activations and output
    out: torch.Tensor
    stream: object   # where it replays (part of the key)
    replays: int = 0


# Keys hold id(kwargs): every table keeps that config dict alive, so no other dict can take its
# id while the key is remembered.
_REPLAYS: dict = {}     # key -> _Captured, least recently used first
_SEEN: dict = {}        # key -> kwargs, launched once: captured at the second call
_DROPS: dict = {}       # key -> (times its graph was dropped before REPLAY_USEFUL replays, kwargs)
_DIRECT: dict = {}      # key -> kwargs, launched directly for good (failed capture or replay, dropped too often)
_replay_lock = threading.Lock()
_local = threading.local()


@contextlib.contextmanager
def no_replays():
    """Launch directly inside: the backend wraps graphs compiled for CUDA graphs in it, whose
    warm-up runs route this thread's allocations to Inductor's pool (a graph captured there
    would keep its buffers in that pool)."""
    before = getattr(_local, "off", False)
    _local.off = True
    try:
        yield
    finally:
        _local.off = before


def release_graphs() -> None:
    """Free every captured launch graph and its memory (`fusion_backend.release_graphs()`)."""
    with _replay_lock:
        for entry in _REPLAYS.values():
            entry.stream.synchronize()  # no replay of it in flight, on whichever device
        _REPLAYS.clear()
        _SEEN.clear()
        _DROPS.clear()
        _DIRECT.clear()


def _replayable(out: torch.Tensor) -> bool:
    return out.is_cuda and not torch.cuda.is_current_stream_capturing()


def _stream(device):
    return torch.cuda.current_stream(device)


def _dense(t: torch.Tensor) -> bool:
    """Laid out exactly as the graph's own copy (a fresh contiguous tensor) and 16-byte aligned,
    so the launch takes the same kernel path on either: `is_contiguous()` alone passes a (1, K)
    slice of a wider tensor, whose row stride the TMA paths check."""
    stride, expected = t.stride(), 1
    for i in range(t.dim() - 1, -1, -1):
        if stride[i] != expected:
            return False
        expected *= max(t.shape[i], 1)
    return t.data_ptr() % 16 == 0


def _replay_key(key, r: Replay, kwargs, stream):
    out = r.out
    return (key, id(kwargs), out.device.index, stream.cuda_stream, out.shape, out.dtype,
            tuple((t.shape, t.dtype) for t in r.inputs),
            tuple((t.data_ptr(), t.shape, t.stride(), t.dtype) if t is not None else None for t in r.stable))


def replay_launch(key, r: Replay, kwargs, run_fused):
    """The fused launch of an opaque op as the replay of a CUDA graph: its host time is a few
    copies and one replay instead of Triton's launch path (argument binding, specialization,
    TMA descriptors) for every kernel. The cell's Gluon op: 0.18-0.26 ms of host time a call
    on the H100 host for 0.17 ms of GPU time, so a loop of calls waited on the host. The graph
    is captured at the second call with the same key (the first one compiles and warms up),
    copies the activations into its own buffers and its output into `out`: the same kernels on
    the same values, so the results are the launch's own, bit for bit. Launched directly
    instead: while a CUDA graph is being captured (mode="reduce-overhead" captures the whole
    graph), inside `no_replays()`, for inputs not laid out as the graph's copies (`_dense`), and
    for good after a failed capture or replay."""
    if (getattr(_local, "off", False) or not _replayable(r.out)
            or not all(_dense(t) for t in r.inputs)):
        return run_fused(kwargs)
    stream = _stream(r.out.device)
    rkey = _replay_key(key, r, kwargs, stream)
    with _replay_lock:  # copy in, replay, copy out: one unit in the stream's order
        entry = _entry_for(rkey, r, kwargs, stream)
        if entry is not None:
            try:
                for static, t in zip(entry.inputs, r.inputs):
                    static.copy_(t)
                entry.graph.replay()
                entry.replays += 1
                return r.out.copy_(entry.out)
            except Exception as exc:  # launched directly from now on: a graph is only a faster way to launch
                log.debug("fusedtriton: replaying a launch graph failed (%s: %s); launching directly",
                          type(exc).__name__, exc)
                _REPLAYS.pop(rkey).stream.synchronize()  # dropped: no replay of it in flight
                _remember(_DIRECT, rkey, kwargs)
    return run_fused(kwargs)  # outside the lock: a first call compiles


def _entry_for(rkey, r: Replay, kwargs, stream) -> Optional[_Captured]:
    """The key's graph (now the most recently used), captured at the key's second call; None:
    launch directly."""
    if _DIRECT.get(rkey) is kwargs:
        return None
    entry = _REPLAYS.pop(rkey, None)  # its kwargs is the caller's: the entry holds it, so no other dict has its id
    if entry is None:
        if _SEEN.get(rkey) is not kwargs:
            _remember(_SEEN, rkey, kwargs)
            return None
        entry = _capture(r, kwargs, stream)
        if entry is None:
            _remember(_DIRECT, rkey, kwargs)
            return None
        _make_room()
    _REPLAYS[rkey] = entry
    return entry


def _remember(table, rkey, value):
    if len(table) >= _TABLE_BOUND:
        table.clear()
    table[rkey] = value


def _make_room():
    while len(_REPLAYS) >= REPLAY_CACHE_SIZE:
        rkey = next(iter(_REPLAYS))
        oldest = _REPLAYS.pop(rkey)
        oldest.stream.synchronize()  # its memory goes back to the allocator: no replay of it in flight
        if oldest.replays >= REPLAY_USEFUL:
            continue  # it paid for its capture: no mark against the key
        drops = _DROPS.get(rkey, (0, None))[0] + 1
        _remember(_DROPS, rkey, (drops, oldest.kwargs))
        if drops >= REPLAY_MAX_DROPS:
            _remember(_DIRECT, rkey, oldest.kwargs)


def _graph_buffers(r: Replay):
    """The graph's own activations and output: fresh contiguous tensors (`_dense`), plain ones
    even under torch.inference_mode(), so later calls outside it can copy into them."""
    with torch.inference_mode(False):
        return ([torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in r.inputs],
                torch.empty(r.out.shape, dtype=r.out.dtype, device=r.out.device))


def _capture(r: Replay, kwargs, stream) -> Optional[_Captured]:
    try:  # anything failing here (memory for the buffers included) leaves the launch direct
        inputs, out = _graph_buffers(r)
        graph = torch.cuda.CUDAGraph()
        # captured on a side stream (the legacy default stream cannot be captured), in this
        # thread only: torch.cuda.graph() would also collect garbage and empty the allocator's cache
        side = torch.cuda.Stream(out.device)
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                r.launch(inputs, out, kwargs)
            finally:
                graph.capture_end()
        stream.wait_stream(side)
    except Exception as exc:  # launched directly from now on: a graph is only a faster way to launch
        log.debug("fusedtriton: no CUDA graph for this launch (%s: %s); launching directly", type(exc).__name__, exc)
        return None
    return _Captured(kwargs, graph, inputs, out, stream)


def per_call_ms(fn, calls=20) -> float:
    """Wall time per call of back-to-back calls: max(host, GPU) time, what a loop sees."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e3


#: the tuned config's entries an inline op takes as its `meta` argument, in this order
INLINE_META = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
#: config flags of kernels that cannot be launched inline (host-side TMA descriptors, Gluon,
#: pre-split operands, the cell's own W x^T tiles)
_NOT_INLINE = ("TMA", "PRESPLIT", "GLUON", "WXT", "PERSISTENT", "SPLIT_K")


#: GEMMs up to this many FLOPs (2MNK) are tuned over the inline-launchable configs only: they
#: take a few us on the GPU, so the TMA / pre-split / Gluon tiles gain next to nothing there
#: (H100, 512x1024->1024 TF32, 1.1 GFLOP: the tuner's best was TMA 128x64 at 0.0199 ms in one
#: run, pointer 64x128 at 0.0206 in the next, without TMA tiles in its space) while the opaque
#: op they need costs more host time a call than the whole graph's GPU work (inline 59 us a
#: call vs 148 through the op, the same kernel). The quickstart's
#: 4096x2048->2048 block (34 GFLOP) keeps every tile.
INLINE_MAX_FLOP = 4e9


def gemm_flop(m: int, n: int, k: int) -> int:
    """2MNK at the batch bucket's M (`autotune.bucket`), for choosing the space by
    INLINE_MAX_FLOP: every batch of one tuning key gets the same space (with the exact M, batches
    400 and 500 of a 2048x2048 GEMM, one key, got different spaces and re-tuned each other's
    cache entry away)."""
    return 2 * autotune.bucket(m) * n * k


def inlinable(config) -> bool:
    """Whether an inline op can launch this config's kernel (no host-side descriptors, no Gluon)."""
    return config is not None and not any(config.get(flag) for flag in _NOT_INLINE)


def static_shapes(*nodes) -> bool:
    """Whether every node's example value has static shapes, as an inline op needs (its
    config is fixed at compile time for those shapes: `inline_meta`)."""
    return all(isinstance(s, int) for n in nodes for s in example_value(n).shape)


def inline_meta(ctx, key, static_shapes: bool) -> Optional[list]:
    """The tuned config of `key` as an inline op's `meta` list, or None where the site must
    go through the opaque op.

    An inline op (`define_inline_op`) is a `torch.library.triton_op`: Inductor sees its
    kernel launch and emits it in the compiled graph's own code, so a call costs one launch
    by Inductor's launcher instead of the op's dispatch, its Python and Triton's
    `JITFunction.run` (H100 host, 512x1024->1024 MLP block eval TF32, back-to-back calls:
    65 us inline vs 180 us through the opaque op and 129 us for Inductor's unfused graph).
    That needs the config fixed at compile time (tuned there on the real tensors), static
    shapes, and a plain pointer kernel with no launch options beyond num_warps/num_stages."""
    config = ctx.trial_configs.get(key)
    if config is None:
        choice = autotune.TUNER.lookup(key)
        config = None if choice is None else choice.config
    return _inline_list(ctx, config, static_shapes)


def _inline_list(ctx, config, static_shapes: bool) -> Optional[list]:
    """`config` as an inline op's `meta` list (see `inline_meta`), or None."""
    if not (ctx.options.inline and ctx.tunes_at_compile_time and static_shapes):
        return None
    if not inlinable(config):
        return None
    meta = config_spaces.meta_of(config)
    launch = config_spaces.launch_options(config, ctx.profile)
    if set(meta) != set(INLINE_META[:4]) or set(launch) - {"num_warps", "num_stages"}:
        return None
    return [int(dict(meta, **launch)[k]) for k in INLINE_META]


def meta_kwargs(meta) -> dict:
    """An inline op's `meta` list back as kernel launch kwargs."""
    return dict(zip(INLINE_META, meta))


def define_inline_op(name, fn, backward, setup_context):
    """`fusedtriton::<name>` as a `torch.library.triton_op` (see `inline_meta`): `fn` launches
    its kernels through `torch.library.wrap_triton`, which Inductor traces; called eagerly it
    launches them directly. Its fake kernel is `fn` itself, run on fake tensors."""
    op = torch.library.triton_op(f"fusedtriton::{name}", fn, mutates_args=())
    op.register_autograd(backward, setup_context=setup_context)
    return getattr(torch.ops.fusedtriton, name).default  # an FX graph calls the OpOverload


def tuned_unfused_reason(ctx, key, call_op, call_unfused, static_shapes: bool = False) -> Optional[str]:
    """Decide at compile time, on real tensors, whether the site is worth fusing.

    `call_op()` calls the fused op as the compiled graph will (its first call tunes `key`:
    fused configs and the unfused path by GPU time); `call_unfused()` runs the unfused path
    (cuBLAS + one pointwise pass). Without CUDA graphs the per-call host time counts too: at
    launch-bound sizes the op's dispatch and launch cost more than the kernels save, and
    the site is better left to Inductor, unless the site can be launched inline
    (`inline_meta`, given `static_shapes`): Inductor then launches the kernel itself. Returns
    the reason to leave it, or None.

    The rest of the compiled graph's host time (Dynamo's guards, AOT's and Inductor's
    wrappers: ~0.1-0.3 ms a call on the H100 machine) is not known here: with the run-time
    trial on (`fusion_backend/trial.py`), a launch-bound site is fused anyway and noted in
    `ctx.launch_bound`, and the trial keeps whichever whole graph runs faster. Counting the op's
    host time as if none of it overlapped the GPU was tried and not kept: on that machine it
    left a 4096x2048->2048 MLP block at "highest" to Inductor (0.354 + 0.341 ms vs 0.711),
    where fused the whole block ran 0.39-0.43 ms against Inductor's 0.71 (NOTES.md)."""
    if not ctx.tunes_at_compile_time:
        return None
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily(), torch.no_grad():
        call_op()
        choice = autotune.TUNER.lookup(key)
        if choice is not None and choice.config is None:
            if choice.fused_ms is None and choice.source == "tuned":
                return (f"every fused config failed to compile or launch here ({choice.describe()}; "
                        "the log at INFO names the errors): left to Inductor")
            if not _fuse_for_the_trial(ctx, key, choice, static_shapes):
                return f"unfused path is faster here ({choice.describe()}): left to Inductor"
        if ctx.options.cudagraphs or inline_meta(ctx, key, static_shapes) is not None:
            return None  # no host time per call to weigh, or Inductor's own launch of the kernel
        fused_ms, unfused_ms = per_call_ms(call_op), per_call_ms(call_unfused)
    if fused_ms > unfused_ms:
        why = f"launch-bound here: fused op {fused_ms:.4f} ms/call vs unfused {unfused_ms:.4f} ms/call, host time included"
        if ctx.options.trial and choice is not None and (choice.fused_ms or 0.0) < trial.TRIAL_BELOW_MS:
            # fused after all: the graph then gets the run-time trial, which times the whole
            # graph both ways (this check sees the op alone, not the rest of the graph's host time)
            ctx.launch_bound[key] = why
            return None
        return why + " (mode='reduce-overhead' removes it): left to Inductor"
    return None


#: below this much GPU time a fused kernel and the unfused path are both far shorter than a
#: call's host time (a Triton launch alone costs 10-30 us of host time on the H100 hosts, a
#: compiled call 60-180 us at these sizes): which kernel is faster cannot decide, the run-time
#: trial of the whole graph does (a B64 512+512->512 cell: tuner 0.0196 vs 0.0179 ms, one
#: launch against two a call)
HOST_BOUND_MS = 0.05


def _fuse_for_the_trial(ctx, key, choice, static_shapes: bool) -> bool:
    """Fuse a site whose best fused config lost to the unfused path only by kernel time that
    cannot matter (a tie inside the tuner's margin either way, or both under HOST_BOUND_MS)
    where the run-time trial will settle it on the whole graph and the fused kernel launches
    inline: its one launch by Inductor then costs less host time than the unfused path's two.
    H100, 512x1024->1024 eval TF32 before the SMALL tiles: the tuner measured fused 0.0206 vs
    unfused 0.0207 ms; fused, the trial kept it at 0.060 vs 0.091 ms a call. At these sizes the
    tuner's own timings swing by more than the margin between runs (a B64 512+512->512 cell at
    3xTF32: fused 0.0194 vs 0.0231 in one run, the trial then keeping the fused graph at 0.091 vs
    0.138 ms a call; 0.0231 vs 0.0228 in the next).
    Notes the fused config for this compile only (`ctx.trial_configs`; the tuner keeps its own
    verdict for later compiles) and the site for the trial. If the graph then gets no trial
    (another site without a tuned time, fused sites of 1 ms or more), the backend rewrites it
    again with the trial off."""
    fused, unfused = choice.fused_ms, choice.unfused_ms
    if not (ctx.options.trial and not ctx.options.cudagraphs and choice.runner_up is not None
            and fused is not None and unfused is not None and fused < trial.TRIAL_BELOW_MS
            and (fused * autotune.FUSED_MARGIN <= unfused or fused < HOST_BOUND_MS)
            and _inline_list(ctx, choice.runner_up, static_shapes) is not None):
        return False
    ctx.trial_configs[key] = choice.runner_up
    kind = "a tie" if fused * autotune.FUSED_MARGIN <= unfused else f"host-bound (under {HOST_BOUND_MS} ms)"
    ctx.launch_bound[key] = (f"{kind} at compile time (fused {fused:.4f} vs unfused {unfused:.4f} ms): "
                             f"fused with {autotune.describe_config(choice.runner_up)}, launched inline, for the "
                             "run-time trial to settle")
    return True


@functools.lru_cache(maxsize=None)
def space(profile, family, dtype, tma=True, precision=None, small=False):
    """The configs for this device, kernel family and input dtype (computed once: launchers
    call this on their hot path); tma=False for kernels without a TMA variant; with a dot
    `precision`, the entries meant for other precisions are dropped; small=True (a GEMM of at
    most INLINE_MAX_FLOP) keeps only the inline-launchable tiles, the SMALL ones included."""
    configs = config_spaces.for_dtype(config_spaces.space_for(profile, family), dtype)
    configs = [c for c in configs if small or not c.get("SMALL")]
    if precision is not None:
        configs = [c for c in configs if precision in c.get("precisions", (precision,))]
    if small:
        configs = [c for c in configs if inlinable(c)] or configs
    return configs if tma else [c for c in configs if not c.get("TMA")]


@functools.lru_cache(maxsize=None)
def heuristic_kwargs(profile, family, dtype, m_bucket) -> dict:
    """Launch kwargs of the heuristic config, for untuned helper kernels (memoized per bucket)."""
    return kernel_kwargs(config_spaces.heuristic_pick(space(profile, family, dtype), m_bucket), profile)


def gluon_code(module: str, *names: str) -> tuple:
    """The named kernels and launchers of one of this package's Gluon modules, for a pattern's
    `source_hash`; none where this Triton has no Gluon (those configs then fail to launch and
    the tuner does not choose them)."""
    import importlib

    try:
        mod = importlib.import_module(f"{__package__}.{module}")
    except ImportError:
        return ()
    return tuple(getattr(mod, name) for name in names)


def cdiv(a: int, b: int) -> int:
    """Ceiling division for launch grids. `triton.cdiv` is a ConstexprFunction whose host call
    costs ~1.5 us (Triton 3.6 and 3.9, measured on the CI machine), on every launch."""
    return -(-a // b)


def tma_ready(t: torch.Tensor) -> bool:
    """Whether the tensor-memory accelerator can address `t` (2-D, row-major rows, 16-byte
    aligned base and row stride); other layouts take the pointer kernel with the same tiles."""
    size = t.element_size()
    return (t.dim() == 2 and t.stride(1) == 1 and (t.stride(0) * size) % 16 == 0
            and t.data_ptr() % 16 == 0 and t.is_cuda)


def tf32_split(t: torch.Tensor):
    """(hi, lo) with hi the TF32 head of the 2-D fp32 tensor `t` and lo = t - hi, both exact,
    for `triton_lib.dot_3xtf32` (`tf32_split_all` for one tensor)."""
    return tf32_split_all([t])[0]


def tf32_split_all(ts):
    """[(hi, lo), ...] for up to four 2-D fp32 tensors of the same row count (a cell's cat
    operands), split by one launch into one buffer. Each tensor's columns start on a 16-byte
    boundary of rows padded to 16 bytes, so every hi / lo is TMA-ready for any widths and
    strides of the inputs. One pass on the device per call: the operands' values may change
    between calls (weights in training, in-place updates)."""
    from fusion_backend.triton_lib import tf32_split_kernel

    M = ts[0].shape[0]
    widths = [t.shape[1] for t in ts]
    starts, padded = [], 0
    for k in widths:
        starts.append(padded)
        padded += -(-k // 4) * 4
    buf = torch.empty((2, M, padded), device=ts[0].device, dtype=torch.float32)
    plane = M * padded
    pairs = [(buf.as_strided((M, k), (padded, 1), c), buf.as_strided((M, k), (padded, 1), plane + c))
             for k, c in zip(widths, starts)]
    if M and padded:
        pad = [None] * (4 - len(ts))  # slots the kernel never compiles: nothing to bind at launch
        tiles = sum(cdiv(k, 128) for k in widths)
        tf32_split_kernel[(cdiv(M, 32), tiles)](
            *ts, *pad, pairs[0][0], pairs[0][1], M, *widths, *pad, *[s for t in ts for s in t.stride()], *pad, *pad,
            *starts[1:], *pad, padded, NUM=len(ts), BLOCK_M=32, BLOCK_K=128, num_warps=4)
    return pairs


def descriptor(t: torch.Tensor, rows: int, cols: int):
    """A host-side TMA descriptor for (rows x cols) tiles of `t` (zero padding out of range)."""
    return cached_descriptor(_make_descriptor, t, rows, cols)


def _make_descriptor(t, rows, cols):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(t, [rows, cols])


class _Address:
    """What a cached TMA descriptor keeps of its tensor: the address and dtype, all that
    Triton's launcher (`base.data_ptr()`) and specializer (`base.dtype`) read of `base` (3.6
    and 3.9). The cache then holds no tensor, so no memory, alive."""
    __slots__ = ("_ptr", "dtype")

    def __init__(self, ptr: int, dtype: torch.dtype):
        self._ptr, self.dtype = ptr, dtype

    def data_ptr(self) -> int:
        return self._ptr


#: descriptors by (maker, address, shape, strides, dtype, tile); cleared when it reaches the bound
_DESCRIPTORS: dict = {}
DESCRIPTOR_CACHE_SIZE = 256


def _cacheable(t: torch.Tensor) -> bool:
    return t.is_cuda  # the interpreter's launcher copies `base` to the CPU: it needs the tensor


def cached_descriptor(make, t: torch.Tensor, rows: int, cols: int):
    """`make(t, rows, cols)`, built once per address, shape, strides, dtype and tile. A TMA
    descriptor encodes exactly those, so any tensor that matches them (the same weight at every
    call, a buffer the caching allocator hands out again) can use it. Building one costs 8-18 us
    of host time on the H100 host (Python validation, the Gluon layout; measured), six per call
    of the cell's Gluon kernel: more than the kernel's launch."""
    if not _cacheable(t):
        return make(t, rows, cols)
    key = (make, t.data_ptr(), t.shape, t.stride(), t.dtype, rows, cols)
    desc = _DESCRIPTORS.get(key)
    if desc is None:
        desc = make(t, rows, cols)  # validated against the real tensor
        object.__setattr__(desc, "base", _Address(key[1], t.dtype))  # also where frozen
        if len(_DESCRIPTORS) >= DESCRIPTOR_CACHE_SIZE:
            _DESCRIPTORS.clear()
        _DESCRIPTORS[key] = desc
    return desc


def kernel_kwargs(config, profile) -> dict:
    """A config as kernel launch kwargs: constexpr meta-parameters plus launch options."""
    return dict(config_spaces.meta_of(config), **config_spaces.launch_options(config, profile))


# Ops are defined on a torch.library fragment with plain per-device kernels: the
# torch.library.custom_op wrapper re-checks aliasing in Python on every call, which cost
# more host time than the whole Inductor graph at small shapes (measured on the H100 host).
LIB = torch.library.Library("fusedtriton", "FRAGMENT")


def define_op(name, schema, impl, fake, backward, setup_context):
    """`fusedtriton::<name>` with its fake and autograd registrations, and its inference twin
    `<name>_inference` (no autograd kernel; `registry.use_inference_twins`)."""
    for op_name in (name, name + "_inference"):
        LIB.define(op_name + schema)
        for dispatch_key in ("CUDA", "CPU"):
            LIB.impl(op_name, impl, dispatch_key)
        torch.library.register_fake(f"fusedtriton::{op_name}", fake, lib=LIB)
    torch.library.register_autograd(f"fusedtriton::{name}", backward, setup_context=setup_context, lib=LIB)
    op = getattr(torch.ops.fusedtriton, name).default
    registry.INFERENCE_TWINS[op] = getattr(torch.ops.fusedtriton, name + "_inference").default
    return op
