"""One spelling per op in a Dynamo FX graph, so patterns match one form.

Canonical forms (all call_function):
  LINEAR(x, w, b_or_None)                 F.linear, addmm(b, x, w.t()), x @ w.t() (+ b), mm
  CAT(tensors, dim)                       torch.cat / concat / concatenate
  TANH(x)                                 torch.tanh, Tensor.tanh, F.tanh, nn.Tanh
  GELU(x, approximate=...)                F.gelu, nn.GELU
  RELU(x)                                 torch.relu, F.relu, Tensor.relu, nn.ReLU; in-place forms
                                          only when the input is a fresh tensor nothing else sees
  BATCH_NORM(x, rm, rv, w, b, training, momentum, eps)  F.batch_norm, torch.batch_norm, nn.BatchNorm1d
Nodes are rewritten in place (target/args changed); nothing is erased but the transposes and
matmuls that normalization itself left dead. A node that writes (an `out=` kwarg) is never
rewritten nor erased; a node whose normalization raises is left as it was.
"""
from __future__ import annotations

import inspect
import logging
import operator

import torch
import torch.nn.functional as F
from torch import fx
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_leaves

log = logging.getLogger(__name__)

LINEAR = F.linear
CAT = torch.cat
TANH = torch.tanh
GELU = F.gelu
RELU = torch.relu
BATCH_NORM = F.batch_norm

_BN_SIG = inspect.signature(F.batch_norm)


def example_value(node):
    """The FakeTensor Dynamo recorded for a node, or None."""
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def is_op(node, target) -> bool:
    """A call of `target` that returns its result (not an `out=` call: its write into the out
    tensor is what the program reads, and a fused op in its place would drop it)."""
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target is target
            and "out" not in node.kwargs)


def _is_call(node, functions=(), methods=()) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function" and node.target in functions:
        return True
    return node.op == "call_method" and node.target in methods


_MISSING = object()


def _arg(node, i, *names, default=_MISSING):
    """Argument `i` of a call, whether passed positionally or by any of `names` (`i` None: a
    keyword-only argument)."""
    if i is not None and len(node.args) > i:
        return node.args[i]
    for name in names:
        if name in node.kwargs:
            return node.kwargs[name]
    return default


def _permute_dims(node):
    # permute(x, (1, 0)), x.permute(1, 0), permute(x, dims=(1, 0)), x.permute(dims=[1, 0])
    if len(node.args) > 2:
        return tuple(node.args[1:])
    dims = _arg(node, 1, "dims", default=None)
    return tuple(dims) if isinstance(dims, (list, tuple)) else None


def _transposed_2d(node, reader):
    """If `node` is the transpose of a 2-D tensor, that tensor; else None. Only where `reader`
    (the matmul) runs with grad on or off as the transpose does: W.t() taken under no_grad is a
    frozen use of W, and F.linear(x, W) at the matmul would give W a gradient eager never does.
    (Autocast does not matter: a transpose keeps the dtype, and autocast casts W either way.)"""
    if not isinstance(node, fx.Node) or "out" in node.kwargs or not _same_grad_mode(node, reader):
        return None
    if _is_call(node, (torch.t,), ("t",)):
        src = _arg(node, 0, "input", default=None)
    elif _is_call(node, (torch.transpose,), ("transpose",)) and \
            {_arg(node, 1, "dim0", default=None), _arg(node, 2, "dim1", default=None)} in ({0, 1}, {-2, -1}, {-1, 0}):
        src = _arg(node, 0, "input", default=None)
    elif _is_call(node, (torch.permute,), ("permute",)) and _permute_dims(node) == (1, 0):
        src = _arg(node, 0, "input", default=None)
    elif node.op == "call_function" and node.target is getattr and node.args[1] in ("T", "mT"):
        src = node.args[0]
    else:
        return None
    val = example_value(src)
    return src if isinstance(val, torch.Tensor) and val.dim() == 2 else None


def _rank(node):
    val = example_value(node)
    return val.dim() if isinstance(val, torch.Tensor) else None


def _set(node, target, args, kwargs=None):
    node.op = "call_function"
    node.target = target
    node.args = tuple(args)
    node.kwargs = dict(kwargs or {})


def _normalize_matmul(node):
    # x @ w.t() (+ b), torch.mm / torch.matmul; only 2-D x so that it is exactly a Linear
    if not _is_call(node, (operator.matmul, torch.matmul, torch.mm), ("matmul", "mm", "__matmul__")):
        return
    if len(node.args) != 2 or node.kwargs or _rank(node.args[0]) != 2:
        return
    w = _transposed_2d(node.args[1], node)
    if w is None:
        return
    users = list(node.users)
    if len(users) == 1 and _is_call(users[0], (operator.add, torch.add), ("add",)) and not users[0].kwargs \
            and len(users[0].args) == 2:
        add = users[0]
        bias = add.args[1] if add.args[0] is node else add.args[0]
        if isinstance(bias, fx.Node) and _rank(bias) == 1 and bias is not node and _same_dtypes(node, add, bias) \
                and _adds_per_column(node, add, bias) and _nothing_between(node, add):
            # bias + x@w.t() == F.linear(x, w, bias): rewrite the add node, leave matmul dead
            _set(add, LINEAR, (node.args[0], w, bias))
            return
    _set(node, LINEAR, (node.args[0], w, None))


def _adds_per_column(mm: fx.Node, add: fx.Node, bias: fx.Node) -> bool:
    """Whether `mm + bias` is what F.linear's bias adds: a bias of N values, or of one (both
    broadcast over the rows only). An add that broadcasts the product itself, a length-L bias
    over an (M, 1) product to (M, L), is not: F.linear refuses those shapes."""
    mm_val, add_val, bias_val = example_value(mm), example_value(add), example_value(bias)
    if not all(isinstance(v, torch.Tensor) for v in (mm_val, add_val, bias_val)):
        return False
    return (_same_size(bias_val.shape[0], mm_val.shape[-1]) or _same_size(bias_val.shape[0], 1)) \
        and len(add_val.shape) == len(mm_val.shape) and all(_same_size(a, b) for a, b in zip(add_val.shape, mm_val.shape))


def _same_size(a, b) -> bool:
    """Sizes known equal without adding a guard (a symbolic size that an earlier guard pinned
    to 8 equals a static 8)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(a == b))


def _nothing_between(first: fx.Node, last: fx.Node) -> bool:
    """Whether computing `first` at `last` changes nothing: no node between them writes in place
    (to x or W through a view, say) or switches a mode (grad, autocast, inference mode) or
    wraps a region (a higher-order op). The matmul folded into its bias add computes at the add:
    past a write it read other values, past `no_grad` around the matmul alone it gave W a
    gradient eager does not, past an autocast switch it computed in another dtype."""
    from fusion_backend.patterns._common import writes_in_place

    return _no_mode_switch_between(first, last, also=writes_in_place)


def _same_grad_mode(first: fx.Node, last: fx.Node) -> bool:
    """Whether autograd records at `last` as it does at `first` (the graph's modes are read only
    where a switch lies between them)."""
    if _no_mode_switch_between(first, last):
        return True
    from fusion_backend.patterns._common import grad_modes, grad_on

    modes = grad_modes(first.graph)
    return grad_on(modes, first) == grad_on(modes, last)


def _no_mode_switch_between(first: fx.Node, last: fx.Node, also=None) -> bool:
    """Whether no node after `first` and before `last` switches a mode (grad, autocast,
    inference mode) or wraps a region (a higher-order op), nor is one `also` names."""
    from fusion_backend.patterns._common import _ENTERS, _EXITS, _SET_GRAD

    node = first.next
    while node is not last:
        if node.op == "output":
            return False
        if node.op == "call_function":
            name = getattr(node.target, "__name__", "")
            if name == _SET_GRAD or name in _ENTERS or name in _EXITS \
                    or isinstance(node.target, torch._ops.HigherOrderOperator):
                return False
        if also is not None and also(node):
            return False
        node = node.next
    return True


def _same_dtypes(*nodes) -> bool:
    """Whether the nodes' example values share one dtype. An add promotes: an fp32 or fp64 bias
    on an fp16 (autocast) or fp32 product gives the wider dtype, which F.linear would not (it
    computes in one dtype under autocast, and raises on mixed ones without)."""
    values = [example_value(n) for n in nodes]
    return all(v is not None for v in values) and len({v.dtype for v in values}) == 1


_LINEAR_ARGS = ("input", "weight", "bias")


def _normalize_linear(node):
    # F.linear(x, weight=w, bias=b) and friends: all positional, bias explicit
    if is_op(node, LINEAR) and (node.kwargs or len(node.args) == 2):
        values = list(node.args) + [node.kwargs.get(k) for k in _LINEAR_ARGS[len(node.args):]]
        if len(values) == 3 and values[0] is not None and values[1] is not None:
            _set(node, LINEAR, values)


def _normalize_addmm(node):
    if not _is_call(node, (torch.addmm,), ("addmm",)):
        return
    if node.op == "call_method" or node.kwargs or len(node.args) != 3:
        return
    bias, x, wt = node.args
    w = _transposed_2d(wt, node)
    if w is not None and _rank(bias) == 1:
        _set(node, LINEAR, (x, w, bias))


def _normalize_bn(node):
    if _is_call(node, (torch.batch_norm,)):
        a = list(node.args) + [None] * (9 - len(node.args))
        kw = node.kwargs
        x, w, b, rm, rv, training, momentum, eps = (
            kw.get(k, a[i]) for i, k in enumerate(
                ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")))
        _set(node, BATCH_NORM, (x, rm, rv, w, b, training, momentum, eps))
    elif is_op(node, F.batch_norm):
        bound = _BN_SIG.bind(*node.args, **node.kwargs)
        bound.apply_defaults()
        _set(node, BATCH_NORM, tuple(bound.arguments.values()))


def _storages(value):
    return {StorageWeakRef(t.untyped_storage()) for t in tree_leaves(value) if isinstance(t, torch.Tensor)}


def _fresh_private_input(node, src) -> bool:
    """Whether the in-place op `node` on `src` may be made out-of-place: `src` is a fresh tensor
    (not an input, a parameter or a view) that nothing else reads or aliases, so no write of the
    in-place op is visible through another name. A view shares its base's storage, so a single
    user is not enough (relu_ on z[:, :4] or buf.view(-1) must still write z / buf). Users of
    `src` after `node` (`g.relu_(); return g`) read what `node` wrote: `_read_result_later`
    points them at the out-of-place result."""
    if not isinstance(src, fx.Node) or src.op not in ("call_function", "call_method", "call_module"):
        return False
    if not _same_grad_mode(src, node):
        # `g.relu_()` under no_grad keeps g's autograd history (only the values change); an
        # out-of-place relu there has none, and its readers' gradients were lost
        return False
    between = set()  # src's users all come after src: one placed before node is in here
    n = src.next
    while n is not node and n.op != "root":
        between.add(n)
        n = n.next
    if any(user in between for user in src.users):
        return False
    val = example_value(src)
    if not isinstance(val, torch.Tensor) or val._is_view():
        return False
    mine = StorageWeakRef(val.untyped_storage())
    for other in node.graph.nodes:
        if other is node:
            break  # later nodes can alias src only through node's own result
        if other is src:
            continue
        # (Dynamo gives every tensor-producing node an example value; nodes without one, such
        # as its grad-mode and autocast switches, produce no tensor)
        if mine in _storages(example_value(other)):
            return False
    return True


def _normalize_activation(node):
    if _is_call(node, (torch.tanh, F.tanh), ("tanh",)):
        src = _arg(node, 0, "input", default=None)
        if src is not None and set(node.kwargs) <= {"input"}:  # (`out=` is a write: never respelled)
            _set(node, TANH, (src,))
    elif _is_call(node, (torch.relu, F.relu), ("relu",)):
        src = _arg(node, 0, "input", default=None)
        inplace = _arg(node, 1, "inplace", default=False)
        if src is not None and not inplace:
            _set(node, RELU, (src,))
        elif src is not None and _fresh_private_input(node, src):
            _set(node, RELU, (src,))
            _read_result_later(node, src)
    elif _is_call(node, (torch.relu_, F.relu_), ("relu_",)):
        src = _arg(node, 0, "input", default=None)
        if src is not None and _fresh_private_input(node, src):
            _set(node, RELU, (src,))
            _read_result_later(node, src)
    elif is_op(node, F.gelu):
        src = node.args[0] if node.args else node.kwargs.get("input")
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        if src is not None:
            _set(node, GELU, (src,), {"approximate": approximate})
    elif _is_call(node, (torch.cat, torch.concat, torch.concatenate)):
        tensors = node.kwargs.get("tensors", node.args[0] if node.args else None)
        dim = node.kwargs.get("dim", node.kwargs.get("axis", node.args[1] if len(node.args) > 1 else 0))
        _set(node, CAT, (tensors, dim))


def _read_result_later(node, src):
    """After an in-place op on `src` became out-of-place `node`, the later reads of `src` read
    `node` (`_fresh_private_input` checked that every other user of `src` comes after it)."""
    for user in list(src.users):
        if user is not node:
            user.replace_input_with(src, node)


_STEPS = (_normalize_matmul, _normalize_linear, _normalize_addmm, _normalize_bn, _normalize_activation)


def _writes(node) -> bool:
    # an `out=` call writes a tensor the program may read later: it is not ours to respell or drop
    return "out" in node.kwargs


def _normalize_node(node):
    """Normalize one node; on an unexpected spelling, leave it (and the users a step may have
    rewritten) as it was, so one odd node never costs the whole graph its fusions."""
    if _writes(node):
        return
    touched = [node, *node.users]
    saved = [(n, n.op, n.target, n.args, dict(n.kwargs)) for n in touched]
    try:
        for step in _STEPS:
            step(node)
    except Exception as exc:
        for n, op, target, args, kwargs in saved:
            n.op, n.target, n.args, n.kwargs = op, target, args, kwargs
        log.info("fusedtriton: normalizing %s (%s) failed (%s: %s); left as it was",
                 node.name, node.target, type(exc).__name__, exc)


def normalize(gm: fx.GraphModule) -> None:
    graph = gm.graph
    used = {node for node in graph.nodes if node.users}
    for node in list(graph.nodes):
        _normalize_node(node)
    # drop only what normalization orphaned (transposes, a matmul folded into a linear): a
    # node the user left unused, or one that writes (mm(..., out=buf)), is Inductor's business
    for node in reversed(list(graph.nodes)):
        if node in used and not node.users and not _writes(node) \
                and (_is_call(node, _ORPHANABLE_FUNCS, _ORPHANABLE_METHODS)
                     or (node.op == "call_function" and node.target is getattr)):
            graph.erase_node(node)
    graph.lint()


_ORPHANABLE_FUNCS = (torch.t, torch.transpose, torch.permute, torch.matmul, operator.matmul, torch.mm)
_ORPHANABLE_METHODS = ("t", "transpose", "permute", "matmul", "mm", "__matmul__")
