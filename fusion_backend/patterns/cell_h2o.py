"""Pattern `cell_h2o`: the output Linear (h2o) that reads a fused RNN cell's hidden state.

Keeping the hidden tile on chip and fusing h2o into the cell kernel only pays when the
hidden state of the batch fits on chip; at the KernelBench size (B 256, H 16384: 16 MB) it
does not, and h2o is one more GEMM. What can win is the GEMM itself, with the cell's kernels
run without tanh (patterns/cat_linear_tanh.py): at fp32 "highest" the pre-split 3xTF32 kernel
against the cuBLAS fp32 GEMM eager and Inductor use (H100, 256x16384->8192: 0.67 ms vs 1.41 ms,
benchmarks/presplit_3xtf32.py), at TF32/bf16 the W x^T tiles with split-K against a GEMM that
only has to read W (benchmarks/cell_wxt.py). The tuner times the fused choice against cuBLAS
at compile time and leaves the site to Inductor when cuBLAS wins; profiles without those
kernels leave it alone.
"""
from __future__ import annotations

import operator
from typing import List, Optional

import torch
from torch import fx

from fusion_backend import autotune
from fusion_backend.normalize import LINEAR, example_value, is_op
from fusion_backend.registry import Pattern, register_pattern

from ._common import (backward_will_run, define_inline_op, define_op, hint, inline_meta, linear_shape_problem, saved_input_written, size_text,
                      static_shapes, tensor_problem, tuned_unfused_reason)
from .cat_linear_tanh import CELL_OPS, SAVING_CELL_OPS, cell_space, inline_forward, linear_forward

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


def _h2o_inline(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], precision: str,
                meta: List[int]) -> torch.Tensor:
    return inline_forward([x], weight, bias, precision, meta, apply_tanh=False)


def _backward_inline(ctx, grad_out):
    return _backward(ctx, grad_out)[:4] + (None,)


cell_h2o_inline = define_inline_op("cell_h2o_inline", _h2o_inline, _backward_inline, _setup)


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
        if cell.op == "call_function" and cell.target is operator.getitem and cell.args[1] == 0:
            cell = cell.args[0]  # the hidden state of a cell op that also returns its operands' copy
            if not (isinstance(cell, fx.Node) and cell.op == "call_function" and cell.target in SAVING_CELL_OPS):
                return None
        elif cell.op != "call_function" or cell.target not in CELL_OPS:
            return None
        return _Match(node)

    def check(self, m: _Match, ctx) -> Optional[str]:
        out_val, hidden_val = example_value(m.linear), example_value(m.hidden)
        params = [example_value(n) for n in (m.weight, m.bias) if isinstance(n, fx.Node)]
        if out_val is None or hidden_val is None or any(v is None for v in params):
            return "h2o's hidden state, weights or output have no example value (shape and dtype unknown)"
        if any(v.dtype != hidden_val.dtype for v in [out_val] + params):
            return "h2o's weights or output differ in dtype from the hidden state (autocast): left to Inductor"
        dtype = out_val.dtype
        precision = ctx.dot_precision(dtype)
        # 3xTF32 on tensor cores against cuBLAS's fp32 FMA GEMM; else only the W x^T tiles
        if precision != "tf32x3" and not any(c.get("WXT") for c in cell_space(ctx.profile, dtype, precision)):
            return (f"profile {ctx.profile.name} has no kernel for a plain Linear that can beat cuBLAS at "
                    f"{str(dtype).replace('torch.', '')} / {precision!r} (3xTF32 at fp32 'highest', or the "
                    "W x^T tiles of Hopper-class GPUs): left to Inductor")
        problem = (tensor_problem([m.weight, m.bias], device=ctx.device, profile=ctx.profile)
                   or linear_shape_problem(m.weight, [m.bias]))
        if problem:
            return problem
        problem = saved_input_written([m.weight, m.bias], backward_will_run(m.linear, [m.hidden, m.weight, m.bias]))
        if problem:
            return problem
        x = ctx.real_tensor(m.hidden)
        w, b = ctx.real_tensor(m.weight), ctx.real_tensor(m.bias)
        return tuned_unfused_reason(ctx, self._site(m, ctx)["key"],
                                    lambda: cell_h2o(x, w, b, precision, True, ctx.options.tune_budget_s),
                                    lambda: torch.nn.functional.linear(x, w, b), static_shapes=self._inline_shapes(m))

    @staticmethod
    def _inline_shapes(m: _Match) -> bool:
        """Whether the site may launch inline: static shapes (`_common.inline_meta`)."""
        return static_shapes(m.hidden, m.weight)

    @staticmethod
    def _site(m: _Match, ctx) -> dict:
        M, K = (hint(s) for s in example_value(m.hidden).shape)
        N = hint(example_value(m.weight).shape[0])
        dtype = example_value(m.linear).dtype
        precision = ctx.dot_precision(dtype)
        rows = size_text(example_value(m.hidden).shape[0])
        return {"shape": f"{rows}x{K}->{N}", "dtype": str(dtype).replace("torch.", ""), "precision": precision,
                "key": autotune.make_key(NAME, ctx.profile.tuning_id, dtype, precision, M, K=str(K), N=N)}

    def replace(self, m: _Match, ctx) -> dict:
        graph = ctx.gm.graph
        site = self._site(m, ctx)
        meta = inline_meta(ctx, site["key"], self._inline_shapes(m))
        with graph.inserting_before(m.linear):
            if meta is not None:
                site["launch"] = "inline"
                out = graph.call_function(cell_h2o_inline, (m.hidden, m.weight, m.bias, site["precision"], meta))
            else:
                out = graph.call_function(cell_h2o, (m.hidden, m.weight, m.bias, site["precision"],
                                                     ctx.options.autotune, ctx.options.tune_budget_s))
        out.meta.update(m.linear.meta)
        m.linear.replace_all_uses_with(out)
        graph.erase_node(m.linear)
        return site
