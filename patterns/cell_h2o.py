"""Pattern `cell_h2o`: the output Linear (h2o) that reads a fused RNN cell's hidden state.

Keeping the hidden tile on chip and fusing h2o into the cell kernel only pays when the
hidden state of the batch fits on chip; at the KernelBench size (B 256, H 16384: 16 MB) it
does not, and h2o is one more GEMM. What can win is the GEMM itself: at fp32 "highest" the
cell's pre-split 3xTF32 kernel (patterns/cat_linear_tanh.py, run without tanh) against the
cuBLAS fp32 GEMM eager and Inductor use (H100, 256x16384->8192: 0.67 ms vs 1.41 ms,
benchmarks/presplit_3xtf32.py). At other precisions cuBLAS runs it at the GEMM floor, so the
site is left alone; on a GPU the tuner also re-times the fused choice against cuBLAS.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import fx

from fusion_backend import autotune
from fusion_backend.normalize import LINEAR, example_value, is_op
from fusion_backend.registry import Pattern, register_pattern

from ._common import define_op, hint, mutated_in_graph, tensor_problem, tuned_unfused_reason
from .cat_linear_tanh import cat_linear_tanh, linear_forward

NAME = "cell_h2o"


def _fake(x, weight, bias, precision, autotune_on, budget):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _setup(ctx, inputs, output):
    x, weight, bias = inputs[:3]
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight)


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    return grad_out @ weight, grad_out.t() @ x, grad_out.sum(0) if ctx.has_bias else None, None, None, None


cell_h2o = define_op(
    NAME, "(Tensor x, Tensor weight, Tensor? bias, str precision, bool autotune_on, float budget) -> Tensor",
    linear_forward, _fake, _backward, _setup)


class _Match:
    def __init__(self, linear):
        self.linear = linear
        self.hidden, self.weight, self.bias = linear.args


@register_pattern
class CellH2O(Pattern):
    name = NAME
    order = 1  # after cat_linear_tanh, whose op output it reads

    def match(self, node):
        if not is_op(node, LINEAR) or not isinstance(node.args[0], fx.Node):
            return None
        cell = node.args[0]
        if cell.op != "call_function" or cell.target is not cat_linear_tanh:
            return None
        return _Match(node)

    def check(self, m: _Match, ctx) -> Optional[str]:
        out_val = example_value(m.linear)
        if out_val is None or out_val.dtype != torch.float32 or example_value(m.hidden).dtype != torch.float32:
            return "h2o is not an fp32 Linear: cuBLAS runs fp16/bf16 at the GEMM floor; left to Inductor"
        precision = ctx.dot_precision(torch.float32)
        if precision != "tf32x3":
            return (f"fp32 dot precision is {precision!r} here: only 3xTF32 (fp32 'highest' on tensor-core GPUs) "
                    "has a kernel faster than cuBLAS for a plain Linear; left to Inductor")
        problem = tensor_problem([m.weight, m.bias], device=ctx.device, profile=ctx.profile)
        if problem:
            return problem
        for node in (m.weight, m.bias):
            if isinstance(node, fx.Node) and mutated_in_graph(node):
                return f"input {node.name} is mutated in the graph"
        x = ctx.real_tensor(m.hidden)
        w, b = ctx.real_tensor(m.weight), ctx.real_tensor(m.bias)
        return tuned_unfused_reason(ctx, self._site(m, ctx)["key"],
                                    lambda: cell_h2o(x, w, b, precision, True, ctx.options.tune_budget_s),
                                    lambda: torch.nn.functional.linear(x, w, b))

    @staticmethod
    def _site(m: _Match, ctx) -> dict:
        M, K = (hint(s) for s in example_value(m.hidden).shape)
        N = hint(example_value(m.weight).shape[0])
        precision = ctx.dot_precision(torch.float32)
        return {"shape": f"{M}x{K}->{N}", "dtype": "float32", "precision": precision,
                "key": autotune.make_key(NAME, ctx.profile.name, torch.float32, precision, M, K=str(K), N=N)}

    def replace(self, m: _Match, ctx) -> dict:
        graph = ctx.gm.graph
        site = self._site(m, ctx)
        with graph.inserting_before(m.linear):
            out = graph.call_function(cell_h2o, (m.hidden, m.weight, m.bias, site["precision"], ctx.options.autotune,
                                                 ctx.options.tune_budget_s))
        out.meta.update(m.linear.meta)
        m.linear.replace_all_uses_with(out)
        graph.erase_node(m.linear)
        return site
