"""Pattern `rnn_sequence`: an unrolled RNN, i.e. a chain of `cat_linear_tanh` steps that share
W and b, where step t+1 concatenates (x_{t+1}, h_t).

Experimental (opt-in through options["patterns"]) until its kernel has been run on a GPU.
Runs after `cat_linear_tanh` (order 1) on its fused ops. The input projections of all steps
are hoisted into one GEMM that Inductor compiles, P = stack(x_t) W_x^T + b, and only
h_t = tanh(P_t + h_{t-1} W_h^T) stays sequential: one Triton program walks every step, so
the sequence costs two launches instead of one per step. Every h_t stays available to its
other users (the h2o Linear, the outputs) as a row of the op's result.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import fx

from fusion_backend import config_spaces, devices
from fusion_backend.normalize import example_value
from fusion_backend.registry import Pattern, register_pattern
from fusion_backend.triton_lib import tanh

from ._common import define_op, heuristic_kwargs, hint, log

NAME = "rnn_sequence"


@triton.jit
def _rnn_recurrence_kernel(p_ptr, w_ptr, hs_ptr, T, B, H,
                           stride_pt, stride_pb, stride_ph, stride_wn, stride_wk, stride_ht, stride_hb, stride_hh,
                           PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    """hs[t + 1] = tanh(p[t] + hs[t] @ W^T) for t = 0..T-1; hs[0] holds h0 on entry.

    One program does every step (the steps depend on each other); a barrier after each step
    makes its stores to hs[t + 1] visible to all threads before step t + 1 reads them."""
    offs_b = tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    for t in range(0, T):
        for n0 in range(0, H, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < H
            mask = b_ok[:, None] & n_ok[None, :]
            acc = tl.load(p_ptr + t * stride_pt + offs_b[:, None] * stride_pb + offs_n[None, :] * stride_ph,
                          mask=mask, other=0.0).to(tl.float32)
            for k0 in range(0, H, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < H
                h = tl.load(hs_ptr + t * stride_ht + offs_b[:, None] * stride_hb + offs_k[None, :] * stride_hh,
                            mask=b_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                            mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                acc = tl.dot(h, w, acc, input_precision=PRECISION)
            tl.store(hs_ptr + (t + 1) * stride_ht + offs_b[:, None] * stride_hb + offs_n[None, :] * stride_hh,
                     tanh(acc).to(hs_ptr.dtype.element_ty), mask=mask)
        tl.debug_barrier()


def recurrence(p: torch.Tensor, h0: torch.Tensor, w_h: torch.Tensor, precision: str) -> torch.Tensor:
    """(T+1, B, H): row 0 is h0, row t+1 is h_t."""
    T, B, H = p.shape
    hs = torch.empty((T + 1, B, H), device=p.device, dtype=p.dtype)
    hs[0].copy_(h0)
    if T == 0 or B == 0:
        return hs
    profile = devices.device_profile(p.device)
    config = heuristic_kwargs(profile, config_spaces.RECURRENCE, p.dtype, 1)
    block_b = max(16, triton.next_power_of_2(B))
    launch = {k: v for k, v in config.items() if k != "BLOCK_M"}
    if _failed:
        return _reference(p, w_h, hs)
    try:
        _rnn_recurrence_kernel[(1,)](
            p, w_h, hs, T, B, H, p.stride(0), p.stride(1), p.stride(2), w_h.stride(0), w_h.stride(1),
            hs.stride(0), hs.stride(1), hs.stride(2), PRECISION=precision, BLOCK_B=block_b, **launch)
    except Exception as exc:  # a kernel that fails to compile must not break the model
        _failed.append(exc)
        log.warning("fusedtriton: %s kernel failed (%s: %s); using the unfused computation",
                    NAME, type(exc).__name__, exc)
        return _reference(p, w_h, hs)
    return hs


_failed: list = []


def _reference(p, w_h, hs):
    for t in range(p.shape[0]):
        hs[t + 1] = torch.tanh(p[t] + hs[t] @ w_h.t())
    return hs


def _fake(p, h0, w_h, precision):
    return p.new_empty((p.shape[0] + 1, p.shape[1], p.shape[2]))


def _setup(ctx, inputs, output):
    _, _, w_h, _ = inputs
    ctx.save_for_backward(w_h, output)


def _backward(ctx, grad_hs):
    """Backpropagation through time with torch ops (cuBLAS GEMMs)."""
    w_h, hs = ctx.saved_tensors
    T = hs.shape[0] - 1
    grad_hs = torch.zeros_like(hs) if grad_hs is None else grad_hs
    grad_p = torch.empty_like(hs[1:])
    grad_w = torch.zeros_like(w_h)
    carry = torch.zeros_like(hs[0])
    for t in range(T - 1, -1, -1):
        dz = (grad_hs[t + 1] + carry) * (1 - hs[t + 1] * hs[t + 1])
        grad_p[t] = dz
        grad_w = grad_w + dz.t() @ hs[t]
        carry = dz @ w_h
    return grad_p, grad_hs[0] + carry, grad_w, None


rnn_recurrence = define_op("rnn_recurrence", "(Tensor p, Tensor h0, Tensor w_h, str precision) -> Tensor",
                           recurrence, _fake, _backward, _setup)


# ----------------------------------------------------------------------------- the graph pattern

def _is_step(node) -> bool:
    from .cat_linear_tanh import cat_linear_tanh

    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is cat_linear_tanh


def _same_cell(a: fx.Node, b: fx.Node) -> bool:
    return a.args[1:4] == b.args[1:4] and len(a.args[0]) == len(b.args[0]) == 2


@register_pattern
class RnnSequence(Pattern):
    name = NAME
    order = 1  # after cat_linear_tanh has turned each step into its op
    # opt-in (options={"patterns": [..., "rnn_sequence"]}) until the recurrence kernel has run on
    # a GPU: so far it is tested under the CPU interpreter only
    experimental = True

    def match(self, node):
        if not _is_step(node) or len(node.args[0]) != 2:
            return None
        prev = node.args[0][1]
        if _is_step(prev) and _same_cell(prev, node):
            return None  # not the first step
        chain = [node]
        while True:
            nxt = [u for u in chain[-1].users if _is_step(u) and _same_cell(u, node) and u.args[0][1] is chain[-1]]
            if len(nxt) != 1:
                break
            chain.append(nxt[0])
        return chain if len(chain) >= 2 else None

    def check(self, chain, ctx) -> Optional[str]:
        xs = [step.args[0][0] for step in chain]
        h0 = chain[0].args[0][1]
        x_val, h_val = example_value(xs[0]), example_value(h0)
        if any(example_value(x).shape != x_val.shape for x in xs):
            return "steps' inputs differ in shape"
        batch_limit = config_spaces.space_for(ctx.profile, config_spaces.RECURRENCE)[0]["BLOCK_M"]
        if hint(h_val.shape[0]) > batch_limit:
            return f"batch {hint(h_val.shape[0])} > {batch_limit}: one program per sequence would be too slow"
        members = set(chain)
        for x in xs:  # the hoisted projection must not need any step's output
            if _depends_on(x, members):
                return f"input {x.name} of a step depends on an earlier step"
            if _impure_ancestor_after(x, chain[0]):
                return f"input {x.name} is computed by an in-place op inside the sequence"
        return None

    def replace(self, chain, ctx) -> dict:
        graph = ctx.gm.graph
        first = chain[0]
        xs = [step.args[0][0] for step in chain]
        h0 = first.args[0][1]
        _, weight, bias, precision = first.args[:4]
        in_width = hint(example_value(xs[0]).shape[1])
        hidden = hint(example_value(h0).shape[1])
        for x in xs:  # move each input's computation before the first step
            _move_before(x, first)
        with graph.inserting_before(first):
            stacked = graph.call_function(torch.stack, (list(xs),))
            w_x = graph.call_function(torch.narrow, (weight, 1, 0, in_width))
            w_h = graph.call_function(torch.narrow, (weight, 1, in_width, hidden))
            p = graph.call_function(torch.nn.functional.linear, (stacked, w_x, bias))
            hs = graph.call_function(rnn_recurrence, (p, h0, w_h, precision))
            rows = [graph.call_function(torch.select, (hs, 0, t + 1)) for t in range(len(chain))]
        for step, row in zip(chain, rows):
            row.meta.update(step.meta)
            step.replace_all_uses_with(row)
        for step in reversed(chain):
            graph.erase_node(step)
        B = hint(example_value(h0).shape[0])
        hoisted = "input projection of all steps: one GEMM"
        if _hoist_output_projection(graph, rows, hs):
            hoisted += "; h2o of all steps: one GEMM"
        return {"steps": len(chain), "shape": f"{B}x({in_width}+{hidden})->{hidden}", "precision": precision,
                "hoisted": hoisted}


def _hoist_output_projection(graph, rows, hs) -> bool:
    """If every h_t feeds one Linear with the same weights (the h2o), run it once over all
    steps; a torch.stack of exactly those outputs becomes that result itself."""
    from fusion_backend.normalize import LINEAR, is_op

    linears = []
    for row in rows:
        users = [u for u in row.users if is_op(u, LINEAR) and u.args[0] is row]
        if len(users) != 1:
            return False
        linears.append(users[0])
    weight, bias = linears[0].args[1], linears[0].args[2]
    if any(lin.args[1] is not weight or lin.args[2] is not bias for lin in linears):
        return False
    if any(_after(n, hs) for n in (weight, bias) if isinstance(n, fx.Node)):
        return False  # the weights are computed after the recurrence
    with graph.inserting_before(rows[-1].next):
        steps = graph.call_function(torch.narrow, (hs, 0, 1, len(rows)))
        out_all = graph.call_function(torch.nn.functional.linear, (steps, weight, bias))
        out_rows = [graph.call_function(torch.select, (out_all, 0, t)) for t in range(len(rows))]
    for lin, out_row in zip(linears, out_rows):
        out_row.meta.update(lin.meta)
        lin.replace_all_uses_with(out_row)
        graph.erase_node(lin)
    users = set(out_rows[0].users)
    for node in users:
        if (node.op == "call_function" and node.target is torch.stack and not node.kwargs
                and list(node.args[0]) == out_rows and (len(node.args) < 2 or node.args[1] == 0)):
            node.replace_all_uses_with(out_all)
            graph.erase_node(node)
    for out_row in out_rows:
        if not out_row.users:
            graph.erase_node(out_row)
    return True


def _depends_on(node: fx.Node, targets: set) -> bool:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in targets:
            return True
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def _after(node: fx.Node, anchor: fx.Node) -> list:
    """Ancestors of `node` (itself included) placed after `anchor`, in graph order."""
    order = {n: i for i, n in enumerate(anchor.graph.nodes)}
    limit = order[anchor]
    found, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in found or order[n] < limit:
            continue
        found.add(n)
        stack.extend(n.all_input_nodes)
    return sorted(found, key=order.__getitem__)


def _impure_ancestor_after(node: fx.Node, anchor: fx.Node) -> bool:
    for n in _after(node, anchor):
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
        if n.op not in ("call_function", "call_method", "get_attr") or name.endswith("_"):
            return True
    return False


def _move_before(node: fx.Node, anchor: fx.Node) -> None:
    for n in _after(node, anchor):
        anchor.prepend(n)
