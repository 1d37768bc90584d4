"""One spelling per op in a Dynamo FX graph, so patterns match one form.

Canonical forms (all call_function):
  LINEAR(x, w, b_or_None)                 F.linear, addmm(b, x, w.t()), x @ w.t() (+ b), mm
  CAT(tensors, dim)                       torch.cat / concat / concatenate
  TANH(x)                                 torch.tanh, Tensor.tanh, F.tanh, nn.Tanh
  GELU(x, approximate=...)                F.gelu, nn.GELU
  RELU(x)                                 torch.relu, F.relu, Tensor.relu, nn.ReLU; in-place forms
                                          only when the input has no other user
  BATCH_NORM(x, rm, rv, w, b, training, momentum, eps)  F.batch_norm, torch.batch_norm, nn.BatchNorm1d
Nodes are rewritten in place (target/args changed); nothing is erased but the transposes that
become dead.
"""
from __future__ import annotations

import inspect
import operator

import torch
import torch.nn.functional as F
from torch import fx

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
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def _is_call(node, functions=(), methods=()) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function" and node.target in functions:
        return True
    return node.op == "call_method" and node.target in methods


def _transposed_2d(node):
    """If `node` is the transpose of a 2-D tensor, that tensor; else None."""
    if _is_call(node, (torch.t,), ("t",)):
        src = node.args[0]
    elif _is_call(node, (torch.transpose,), ("transpose",)) and sorted(node.args[1:3]) in ([0, 1], [-2, -1], [-1, 0], [0, -1]):
        src = node.args[0]
    elif _is_call(node, (torch.permute,), ("permute",)) and tuple(node.args[1:] if len(node.args) > 2 else node.args[1]) == (1, 0):
        src = node.args[0]
    elif node is not None and isinstance(node, fx.Node) and node.op == "call_function" and node.target is getattr and node.args[1] in ("T", "mT"):
        src = node.args[0]
    else:
        return None
    val = example_value(src)
    return src if val is not None and val.dim() == 2 else None


def _rank(node):
    val = example_value(node)
    return None if val is None else val.dim()


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
    w = _transposed_2d(node.args[1])
    if w is None:
        return
    users = list(node.users)
    if len(users) == 1 and _is_call(users[0], (operator.add, torch.add), ("add",)) and not users[0].kwargs \
            and len(users[0].args) == 2:
        add = users[0]
        bias = add.args[1] if add.args[0] is node else add.args[0]
        if isinstance(bias, fx.Node) and _rank(bias) == 1 and bias is not node:
            # bias + x@w.t() == F.linear(x, w, bias): rewrite the add node, leave matmul dead
            _set(add, LINEAR, (node.args[0], w, bias))
            return
    _set(node, LINEAR, (node.args[0], w, None))


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
    w = _transposed_2d(wt)
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


def _only_user_of_input(node) -> bool:
    src = node.args[0]
    return isinstance(src, fx.Node) and len(src.users) == 1 and src.op != "placeholder"


def _normalize_activation(node):
    if _is_call(node, (torch.tanh, F.tanh), ("tanh",)) and len(node.args) == 1 and not node.kwargs:
        _set(node, TANH, node.args)
    elif _is_call(node, (torch.relu, F.relu), ("relu",)):
        inplace = node.kwargs.get("inplace", node.args[1] if len(node.args) > 1 else False)
        if not inplace or _only_user_of_input(node):
            _set(node, RELU, node.args[:1])
    elif _is_call(node, (torch.relu_, F.relu_), ("relu_",)) and _only_user_of_input(node):
        _set(node, RELU, node.args[:1])
    elif is_op(node, F.gelu):
        src = node.args[0] if node.args else node.kwargs.get("input")
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        if src is not None:
            _set(node, GELU, (src,), {"approximate": approximate})
    elif _is_call(node, (torch.cat, torch.concat, torch.concatenate)):
        tensors = node.kwargs.get("tensors", node.args[0] if node.args else None)
        dim = node.kwargs.get("dim", node.kwargs.get("axis", node.args[1] if len(node.args) > 1 else 0))
        _set(node, CAT, (tensors, dim))


def normalize(gm: fx.GraphModule) -> None:
    graph = gm.graph
    for node in list(graph.nodes):
        _normalize_matmul(node)
        _normalize_linear(node)
        _normalize_addmm(node)
        _normalize_bn(node)
        _normalize_activation(node)
    # drop only what normalization orphaned (transposes, a matmul folded into a linear);
    # every other node, even an unused one, is Inductor's business
    for node in reversed(list(graph.nodes)):
        if not node.users and (_is_call(node, _ORPHANABLE_FUNCS, _ORPHANABLE_METHODS)
                               or (node.op == "call_function" and node.target is getattr)):
            graph.erase_node(node)
    graph.lint()


_ORPHANABLE_FUNCS = (torch.t, torch.transpose, torch.permute, torch.matmul, operator.matmul, torch.mm)
_ORPHANABLE_METHODS = ("t", "transpose", "permute", "matmul", "mm", "__matmul__")
