"""Pattern `rnn_sequence`: an unrolled RNN, i.e. a chain of cat -> Linear -> tanh cells that
share W and b, where step t+1 concatenates (x_{t+1}, h_t) (or (h_t, x_{t+1}) in every step).

Runs before `cat_linear_tanh` (which would judge each step alone). The input projections of
all steps are hoisted into one GEMM that Inductor compiles, P = stack(x_t) W_x^T + b, and only
h_t = tanh(P_t + h_{t-1} W_h^T) stays sequential, in one launch of the recurrence kernel
(programs split the hidden columns and meet at a grid barrier after each step). Every h_t
stays available to its other users as a row of the op's result; when each h_t feeds the same
Linear (the h2o), that becomes one GEMM over all steps too.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import fx

from fusion_backend import config_spaces
from fusion_backend.normalize import BATCH_NORM, example_value, is_op
from fusion_backend.registry import Pattern, register_pattern
from fusion_backend.triton_lib import tanh

from . import _checks
from ._common import (backward_will_run, cdiv, define_op, draws_random, grad_modes, hint, kernel_kwargs, log, size_text,
                      space, static_size, unbacked, writes_in_place, written_inside)
from .cat_linear_tanh import CatLinearTanh, _Match

NAME = "rnn_sequence"


@triton.jit
def _grid_barrier(sync_ptr, target, GRID_SYNC: tl.constexpr):
    """All threads of this program have stored their part of the step; with GRID_SYNC, wait
    until every program has (a counter in global memory, `target` = arrivals expected so far)."""
    tl.debug_barrier()
    if GRID_SYNC:
        # arrive (acq_rel at GPU scope publishes this program's stores), then wait for all
        tl.atomic_add(sync_ptr, 1, sem="acq_rel", scope="gpu")
        while tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu") < target:
            pass
        tl.debug_barrier()


@triton.jit
def _rnn_recurrence_kernel(p_ptr, w_ptr, hs_ptr, sync_ptr, T, B, H,
                           stride_pt, stride_pb, stride_ph, stride_wn, stride_wk, stride_ht, stride_hb, stride_hh,
                           PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, GRID_SYNC: tl.constexpr, RESIDENT: tl.constexpr,
                           K_SPLIT: tl.constexpr):
    """hs[t + 1] = tanh(p[t] + hs[t] @ W^T) for t = 0..T-1; hs[0] holds h0 on entry.

    The steps depend on each other, so every program walks all of them; program i computes
    the hidden columns of tiles i, i + P, ... (P programs). After each step the programs meet
    at a grid barrier (GRID_SYNC: all P programs must be resident at once, so the launcher
    keeps P small, see `grid_sync_programs`) before anyone reads h_{t+1}. RESIDENT (one tile per program,
    BLOCK_K >= H): the program's slice of W is loaded once and kept in registers, and the
    next step's p tile is loaded before the barrier (it does not depend on h); streamed W
    (large H) ignores K_SPLIT."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    offs_b = tl.arange(0, BLOCK_B)
    b_ok = offs_b < B
    if RESIDENT:
        # W's slice as K_SPLIT chunks of the reduction: one batched dot runs the chunks'
        # accumulation chains side by side (one long chain of dependent MMAs per step is what
        # bounds a step here), then the chunks are summed
        KC: tl.constexpr = BLOCK_K // K_SPLIT
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, K_SPLIT)[:, None, None] * KC + tl.arange(0, KC)[None, None, :]  # [S, 1, KC]
        n_ok = offs_n < H
        mask = b_ok[:, None] & n_ok[None, :]
        w_k = tl.reshape(offs_k, (K_SPLIT, KC, 1))
        w = tl.load(w_ptr + offs_n[None, None, :] * stride_wn + w_k * stride_wk,
                    mask=(w_k < H) & n_ok[None, None, :], other=0.0)  # [S, KC, N]
        p_tile = p_ptr + offs_b[:, None] * stride_pb + offs_n[None, :] * stride_ph
        h_tile = hs_ptr + offs_b[None, :, None] * stride_hb + offs_k * stride_hh  # [S, B, KC]
        h_ok = b_ok[None, :, None] & (offs_k < H)
        out_tile = hs_ptr + offs_b[:, None] * stride_hb + offs_n[None, :] * stride_hh
        p_next = tl.load(p_tile, mask=mask, other=0.0).to(tl.float32)
        for t in range(0, T):
            # h_t was written by other programs: read it from L2 (".cg"), never a stale L1 line
            h = tl.load(h_tile + t * stride_ht, mask=h_ok, other=0.0, cache_modifier=".cg")
            acc = tl.sum(tl.dot(h, w, input_precision=PRECISION), axis=0) + p_next
            tl.store(out_tile + (t + 1) * stride_ht, tanh(acc).to(hs_ptr.dtype.element_ty), mask=mask)
            # (after the last step this reloads step 0: one harmless extra load, no branch)
            p_next = tl.load(p_tile + ((t + 1) % T) * stride_pt, mask=mask, other=0.0).to(tl.float32)
            _grid_barrier(sync_ptr, (t + 1) * num_programs, GRID_SYNC)
    else:
        for t in range(0, T):
            for n0 in range(pid * BLOCK_N, H, num_programs * BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                n_ok = offs_n < H
                mask = b_ok[:, None] & n_ok[None, :]
                acc = tl.load(p_ptr + t * stride_pt + offs_b[:, None] * stride_pb + offs_n[None, :] * stride_ph,
                              mask=mask, other=0.0).to(tl.float32)
                for k0 in range(0, H, BLOCK_K):
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    k_ok = offs_k < H
                    h = tl.load(hs_ptr + t * stride_ht + offs_b[:, None] * stride_hb + offs_k[None, :] * stride_hh,
                                mask=b_ok[:, None] & k_ok[None, :], other=0.0, cache_modifier=".cg")
                    w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                                mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                    acc = tl.dot(h, w, acc, input_precision=PRECISION)
                tl.store(hs_ptr + (t + 1) * stride_ht + offs_b[:, None] * stride_hb + offs_n[None, :] * stride_hh,
                         tanh(acc).to(hs_ptr.dtype.element_ty), mask=mask)
            _grid_barrier(sync_ptr, (t + 1) * num_programs, GRID_SYNC)


def recurrence(p: torch.Tensor, h0: torch.Tensor, w_h: torch.Tensor, precision: str) -> torch.Tensor:
    """(T+1, B, H) in h0's dtype: row 0 is h0, row t+1 is h_t. p (the input projections, fp32
    for fp16/bf16 cells) is added in fp32."""
    _checks.recurrence("rnn_recurrence", p, h0, w_h, precision)
    T, B, H = p.shape
    hs = torch.empty((T + 1, B, H), device=p.device, dtype=h0.dtype)
    hs[0].copy_(h0)
    if T == 0 or B == 0:
        return hs
    failure_key = (p.device, hs.dtype, precision, B, H)
    if failure_key in _failed:
        return _reference(p, w_h, hs)
    profile = _checks.profile("rnn_recurrence", p)
    planned = _planned(profile, hs.dtype, precision, B, H)
    if planned is None:
        return _reference(p, w_h, hs)
    try:
        launch(p, w_h, hs, precision, *planned)
    except Exception as exc:  # a kernel that fails to compile must not break the model
        if not isinstance(exc, torch.OutOfMemoryError):  # (out of memory may pass: tried again next call)
            _failed[failure_key] = exc
        log.warning("fusedtriton: %s kernel failed (%s: %s); using the unfused computation",
                    NAME, type(exc).__name__, exc)
        return _reference(p, w_h, hs)
    return hs


#: at most this many programs meet at the grid barrier (16 at H = 256, as measured); fewer
#: programs walk more tiles each, and a cap far below the multiprocessor count keeps them all
#: resident even when other work holds part of the GPU
MAX_GRID_PROGRAMS = 32


def grid_sync_programs(profile) -> int:
    """How many programs may wait on each other: all must be resident at once (a program that
    never gets a multiprocessor would hang the others), so at most MAX_GRID_PROGRAMS and at most
    the multiprocessors this process may use (MPS can limit it to a percentage)."""
    usable = profile.multiprocessors
    share = os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE")
    if share:
        try:
            usable = int(usable * min(100.0, max(0.0, float(share))) / 100)
        except ValueError:
            pass
    return max(1, min(MAX_GRID_PROGRAMS, usable))


def keeps_w_resident(config: dict, block_b: int, H: int) -> bool:
    """Whether W's slice (and the BLOCK_B x padded-H tile of h) may stay in registers: the
    config asks for it and H <= RESIDENT_MAX_K, a limit set for batches of up to 16 rows
    (measured: 16 x 256 on the H100); larger batches get proportionally less."""
    return bool(config.get("RESIDENT")) and block_b * triton.next_power_of_2(H) <= 16 * config.get("RESIDENT_MAX_K", 0)


@functools.lru_cache(maxsize=None)
def _config(profile, dtype, precision) -> dict:
    """Launch kwargs of the first recurrence config for this dot precision (memoized)."""
    configs = space(profile, config_spaces.RECURRENCE, dtype)
    config = next((c for c in configs if precision in c.get("precisions", (precision,))), configs[0])
    return kernel_kwargs(config, profile)


def plan(config: dict, profile, B: int, H: int):
    """(programs, kernel kwargs) for launch kwargs `config` (BLOCK_M is the batch limit, not a
    kernel parameter): one program per hidden tile, at most `grid_sync_programs`. A config
    with RESIDENT keeps W in registers where one tile per program covers H and H is at most
    RESIDENT_MAX_K (for batches up to 16); otherwise it streams W through BLOCK_K tiles each step."""
    kwargs = {k: v for k, v in config.items() if k not in ("BLOCK_M", "RESIDENT_MAX_K")}
    tiles = cdiv(H, kwargs["BLOCK_N"])
    programs = max(1, min(tiles, grid_sync_programs(profile))) if kwargs["GRID_SYNC"] else 1
    block_b = max(16, triton.next_power_of_2(B))
    resident = programs == tiles and keeps_w_resident(config, block_b, H)
    kwargs.update(RESIDENT=resident, BLOCK_B=block_b)
    kwargs.setdefault("K_SPLIT", 1)
    if resident:  # chunks of at least 16 (tl.dot's minimum)
        kwargs["BLOCK_K"] = max(16 * kwargs["K_SPLIT"], triton.next_power_of_2(H))
    return programs, kwargs


@functools.lru_cache(maxsize=None)
def _planned(profile, dtype, precision, B, H):
    """`plan` of this device's config, once per (dtype, precision, B, H): the call path only
    allocates and launches. None where B is over the config's batch limit (BLOCK_M)."""
    config = _config(profile, dtype, precision)
    if B > config["BLOCK_M"]:
        return None  # a batch past the kernel's limit (dynamic, so the rewrite's check saw another)
    return plan(config, profile, B, H)


def launch(p, w_h, hs, precision, programs, kwargs) -> None:
    """One launch of the recurrence kernel (`programs`, `kwargs` from `plan`)."""
    T, B, H = p.shape
    sync = torch.zeros(1, device=p.device, dtype=torch.int32)
    _rnn_recurrence_kernel[(programs,)](
        p, w_h, hs, sync, T, B, H, p.stride(0), p.stride(1), p.stride(2), w_h.stride(0), w_h.stride(1),
        hs.stride(0), hs.stride(1), hs.stride(2), PRECISION=precision, **kwargs)


#: (device, dtype, precision, B, H) -> the exception of a launch that failed there: those
#: calls take the torch loop from then on (one failure used to switch the kernel off for every
#: model and shape of the process)
_failed: dict = {}


def _reference(p, w_h, hs):
    """The recurrence in torch ops, summed in p's dtype (fp32 for fp16/bf16 cells, as the
    kernel: h W_h^T rounded to fp16 first could overflow where the sum does not)."""
    w_t = w_h.to(p.dtype).t()
    for t in range(p.shape[0]):
        hs[t + 1] = torch.tanh(p[t] + hs[t].to(p.dtype) @ w_t)
    return hs


def _fake(p, h0, w_h, precision):
    return p.new_empty((p.shape[0] + 1, p.shape[1], p.shape[2]), dtype=h0.dtype)


def _setup(ctx, inputs, output):
    p, _, w_h, _ = inputs
    ctx.p_dtype = p.dtype
    ctx.save_for_backward(w_h, output)


def _backward(ctx, grad_hs):
    """Backpropagation through time with torch ops (cuBLAS GEMMs)."""
    w_h, hs = ctx.saved_tensors
    T = hs.shape[0] - 1
    grad_hs = torch.zeros_like(hs) if grad_hs is None else grad_hs
    grad_p = torch.empty_like(hs[1:], dtype=ctx.p_dtype)
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

def _step(node) -> Optional[_Match]:
    """The cat -> Linear -> tanh cell ending at `node` when its cat is (x, h), else None."""
    m = CatLinearTanh.match(node) if isinstance(node, fx.Node) else None
    if m is None or not isinstance(m.tensors, (list, tuple)) or len(m.tensors) != 2:
        return None
    return m


def _same_cell(a: _Match, b: _Match) -> bool:
    return a.weight is b.weight and a.bias is b.bias and a.dim == b.dim


def _like_cell(a: _Match, b: _Match) -> bool:
    """Cells whose W (and b) are computed the same way from the same nodes, each step again
    (an uncached parametrization): matched, so that `check` can say how to make them one
    sequence. Cells of other modules (a second, stacked cell) are not alike."""
    return a.dim == b.dim and _same_computation(a.weight, b.weight) and _same_computation(a.bias, b.bias)


#: ops that only view their first argument (no arithmetic: every step's result is the same
#: memory read the same way)
_VIEW_OPS = frozenset(("getitem", "__getitem__", "t", "transpose", "permute", "view", "reshape", "narrow", "select",
                       "expand", "detach", "unsqueeze", "squeeze"))


def _view_of_stored(node) -> bool:
    """Whether `node` (W or b, or None) is a graph input or attribute itself, or views of one:
    the view ops above, ending in the stored tensor's own memory. (`reshape` of a strided
    tensor and indexing with a tensor copy: a write to the stored tensor, or the index, between
    steps then changes eager's later W but not the first step's copy, which the sequence reads.)"""
    from torch.multiprocessing.reductions import StorageWeakRef

    if node is None:
        return True
    leaf = node
    while isinstance(leaf, fx.Node) and leaf.op in ("call_function", "call_method"):
        name = leaf.target if isinstance(leaf.target, str) else getattr(leaf.target, "__name__", "")
        if name not in _VIEW_OPS or not leaf.args:
            return False
        leaf = leaf.args[0]
    if not (isinstance(leaf, fx.Node) and leaf.op in ("placeholder", "get_attr")):
        return False
    val, base = example_value(node), example_value(leaf)
    return (isinstance(val, torch.Tensor) and isinstance(base, torch.Tensor)
            and StorageWeakRef(val.untyped_storage()) == StorageWeakRef(base.untyped_storage()))


def _same_weights(a: _Match, b: _Match) -> bool:
    """One W and b, or each step's own view of the same stored tensors (`self.w_packed[:H]`, a
    weight stored (in, out) and `.t()`-ed per step): the same values, so the first step's serve
    all (a write to the stored tensor between steps is `_moved_across`'s to find). A W computed
    per step (an uncached parametrization) is not: `check` says how to cache it."""
    return _same_cell(a, b) or (_like_cell(a, b) and _view_of_stored(a.weight) and _view_of_stored(a.bias))


def _same_computation(a, b, depth: int = 8) -> bool:
    """Whether `a` and `b` are one node, or calls of one target on arguments that are (up to
    `depth` calls deep)."""
    if a is b:
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_computation(x, y, depth) for x, y in zip(a, b))
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        if isinstance(a, (fx.Node, torch.SymInt, torch.SymFloat, torch.SymBool)) or type(a) is not type(b):
            return False  # (a symbolic value's == would install a guard)
        return a == b
    if depth == 0 or a.op != b.op or a.op not in ("call_function", "call_method", "call_module"):
        return False
    if draws_random(a):  # (DropConnect: another W each step, which caching would change)
        return False
    return (a.target == b.target and a.kwargs.keys() == b.kwargs.keys()
            and _same_computation(a.args, b.args, depth - 1)
            and all(_same_computation(a.kwargs[k], b.kwargs[k], depth - 1) for k in a.kwargs))


def _chain(first: _Match, linked, h_pos: int) -> list:
    """`first` and the cells after it, each reading the previous one's h as its cat operand
    `h_pos`, while `linked(cell, first)` holds."""
    chain = [first]
    while True:
        ends = [t for cat in chain[-1].tanh.users for lin in cat.users for t in lin.users]
        nxt = [m for m in map(_step, ends)
               if m is not None and m.tensors[h_pos] is chain[-1].tanh and linked(m, first)]
        if len(nxt) != 1:
            return chain
        chain.append(nxt[0])


def _chain_from(first: _Match, h_pos: int) -> Optional[list]:
    """The chain starting at `first` with h as cat operand `h_pos`, or None (`first` is not a
    first step, or no step follows it)."""
    prev = _step(first.tensors[h_pos])
    if prev is not None and _same_cell(prev, first):
        return None  # not the first step
    chain = _chain(first, _same_cell, h_pos)
    if len(chain) >= 2:
        return chain
    # no step after `first` reads its W: a chain of cells alike but for their W nodes is still
    # matched (from its first cell), for `check` to say why it is not a sequence
    if prev is not None and _like_cell(prev, first):
        return None
    chain = _chain(first, _like_cell, h_pos)
    return chain if len(chain) >= 2 else None


def _cut(chain, h_pos: int) -> list:
    """The chain up to the first step whose x_t depends on an earlier step (a model that
    generates from its own output after a prompt) or whose cell runs in another grad mode or
    autocast region than the first step's (a burn-in under no_grad, then steps with grad), where
    at least two steps come before it: those are a sequence, and the steps after it are matched
    again once it is rewritten (their h is then a row of its result). A whole chain was refused
    for such a step, and neither part was fused as a sequence. With fewer than two steps before
    it, the chain stays whole, for `check` to give the reason."""
    modes = grad_modes(chain[0].cat.graph)
    members: set = set()
    for k, step in enumerate(chain):
        cell = (step.cat, step.linear, step.tanh)
        if k >= 2 and (any(modes[n] != modes[chain[0].cat] for n in cell)
                       or _depends_on(step.tensors[1 - h_pos], members)):
            return chain[:k]
        members.update(cell)
    return chain


def _same_shape(a, b) -> bool:
    """Shapes equal for every size the graph takes, judged without installing a guard (`!=` on
    symbolic sizes would: a recompile where the sizes differ)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def _h_pos(chain) -> int:
    """Which cat operand is h: 1 for cat((x_t, h)) (seed 002), 0 for cat((h, x_t))."""
    return 1 if chain[1].tensors[1] is chain[0].tanh else 0


def _inputs(chain):
    """(the steps' x_t, h0)."""
    h_pos = _h_pos(chain)
    return [step.tensors[1 - h_pos] for step in chain], chain[0].tensors[h_pos]


@register_pattern
class RnnSequence(Pattern):
    name = NAME
    # before cat_linear_tanh: that pattern decides per step (a single step may be left to
    # cuBLAS), while the whole chain is worth one recurrence
    order = -1
    experimental = False  # ran on the H100 (tests/test_gpu.py, benchmarks/bench.py): on by default

    def match(self, node):
        first = _step(node)
        if first is None:
            return None
        # cat((x_t, h)), or cat((h, x_t)): the longer chain (a stacked RNN sharing W has short
        # chains across its layers too: [layer 1, layer 2] at each step, in the other reading)
        chains = [_cut(c, h_pos) for h_pos in (1, 0) for c in [_chain_from(first, h_pos)] if c is not None]
        return max(chains, key=len) if chains else None

    def check(self, chain, ctx) -> Optional[str]:
        if not all(_same_weights(step, chain[0]) for step in chain):
            return ("each step computes W (or b) again (e.g. an uncached parametrization such as weight_norm): "
                    "run the loop under torch.nn.utils.parametrize.cached() to fuse it as one sequence")
        for step in chain:
            problem = CatLinearTanh.problem(step, ctx)
            if problem:
                return f"step {step.tanh.name}: {problem}"
        xs, h0 = _inputs(chain)
        x_val, h_val = example_value(xs[0]), example_value(h0)
        dtype = example_value(chain[0].linear).dtype
        # under autocast the Linear's output dtype can match fp16 x_t and h0 while W stays fp32
        operands = (*xs, h0, chain[0].weight, chain[0].bias)
        if any(example_value(n).dtype != dtype for n in operands if isinstance(n, fx.Node)):
            return "autocast changes the cell's dtype: sequences are fused without autocast only"
        if not all(_same_shape(example_value(x).shape, x_val.shape) for x in xs):
            return "steps' inputs differ in shape"
        batch_limit = config_spaces.space_for(ctx.profile, config_spaces.RECURRENCE)[0]["BLOCK_M"]
        batch = h_val.shape[0]
        # (a batch known only at run time is not judged by a stand-in: a batch over the limit
        # then runs the recurrence in torch ops, as any call over it does)
        if not unbacked(batch) and hint(batch) > batch_limit:
            return f"batch {hint(batch)} > {batch_limit}: the recurrence kernel holds the whole batch"
        members = {n for step in chain for n in (step.cat, step.linear, step.tanh)}
        moving = xs + _params(chain[0])
        for x in moving:  # the hoisted projection must not need any step's output
            if _depends_on(x, members):
                return f"input {x.name} of a step depends on an earlier step"
            if _impure_ancestor_after(x, chain[0].cat):
                return f"input {x.name} is computed by an in-place op inside the sequence"
        if _random_draws_reordered(chain[0].cat, moving):
            return ("the steps' inputs draw random numbers (e.g. dropout in training) between other random ops: "
                    "moving them before the first step would change which draws each op gets")
        return _moved_across(chain, moving, h0)

    def replace(self, chain, ctx) -> dict:
        graph = ctx.gm.graph
        first = chain[0]
        xs, h0 = _inputs(chain)
        h_first = _h_pos(chain) == 0
        weight, bias = first.weight, first.bias
        dtype = example_value(first.linear).dtype
        precision = ctx.dot_precision(dtype)
        _move_before(xs + _params(first), first.cat)  # the inputs' and W's computations
        with graph.inserting_before(first.cat):
            # W's split at the widths of this graph's x_t and h, which may be dynamic: the
            # example's widths would install guards on them (a recompile per width) or split
            # another W wrong
            in_width, hidden = _size(graph, xs[0], 1), _size(graph, h0, 1)
            # with a backward to run, the Linear saves its input for dW: that must be a copy, as
            # eager's cats are, not the user's tensor, which may be changed in place before backward
            whole = None if _needs_backward(chain, xs, h0) else _whole_of(xs)
            if whole is None:
                stacked = graph.call_function(torch.stack, (list(xs),))
            elif static_size(example_value(whole).shape[0]) == len(xs):
                stacked = whole
            else:  # the steps read the first rows of a longer (or dynamic-length) tensor
                stacked = graph.call_function(torch.narrow, (whole, 0, 0, len(xs)))
            # W = [W_x | W_h], or [W_h | W_x] for cat((h, x_t))
            w_x = graph.call_function(torch.narrow, (weight, 1, hidden if h_first else 0, in_width))
            w_h = graph.call_function(torch.narrow, (weight, 1, 0 if h_first else in_width, hidden))
            p_operands = (stacked, w_x, bias)
            if dtype in (torch.float16, torch.bfloat16):
                # eager sums x_t W_x^T and h W_h^T in one fp32 accumulator and rounds once; P in
                # fp16 would round twice, and overflow where x_t W_x^T passes 65504 but the sum
                # does not (the recurrence kernel adds P in fp32)
                p_operands = tuple(n if n is None else graph.call_method("to", (n, torch.float32)) for n in p_operands)
            p = graph.call_function(torch.nn.functional.linear, p_operands)
            hs = graph.call_function(rnn_recurrence, (p, h0, w_h, precision))
            rows = [graph.call_function(torch.select, (hs, 0, t + 1)) for t in range(len(chain))]
        for step, row in zip(chain, rows):
            row.meta.update(step.tanh.meta)
            step.tanh.replace_all_uses_with(row)
        for step in reversed(chain):
            for node in (step.tanh, step.linear, step.cat):
                graph.erase_node(node)
        hoisted = "input projection of all steps: one GEMM"
        out_rows = _hoist_output_projection(graph, rows, hs)
        if out_rows is not None:
            hoisted += "; h2o of all steps: one GEMM"
            blocks = sum(1 for row in out_rows for user in row.users if is_op(user, BATCH_NORM))
            if blocks:
                # explain() lists no linear_bn_gelu_relu site there: its Linear is gone (it said
                # nothing about those blocks at all)
                hoisted += (f" (the Linear of {blocks} Linear->BatchNorm blocks: their BatchNorm, GELU and "
                            "ReLU are left to Inductor)")
        for row in rows + (out_rows or []):
            _own_memory_where_returned(graph, row)
        in_width, hidden = hint(example_value(xs[0]).shape[1]), hint(example_value(h0).shape[1])
        widths = f"{hidden}+{in_width}" if h_first else f"{in_width}+{hidden}"  # in the cat's order, as the cell's
        return {"steps": len(chain), "shape": f"{size_text(example_value(h0).shape[0])}x({widths})->{hidden}",
                "dtype": str(dtype).replace("torch.", ""), "precision": precision, "hoisted": hoisted}


def _size(graph, node: fx.Node, dim: int):
    """Size `dim` of `node`'s value as a graph argument: an int where it is static, else a
    `size` node (inserted at the graph's insertion point)."""
    size = static_size(example_value(node).shape[dim])
    return size if size is not None else graph.call_method("size", (node, dim))


def _whole_of(xs) -> Optional[fx.Node]:
    """`base` when xs are base[0], base[1], ..., base[T-1] of a 3-D tensor: the stack of the
    steps' inputs is then `base`'s first T rows (all of it where its length is T), no copy."""
    import operator

    bases = set()
    for t, x in enumerate(xs):
        if not (x.op == "call_function" and x.target is operator.getitem and x.args[1] == t):
            return None
        bases.add(x.args[0])
    base = bases.pop() if len(bases) == 1 else None
    val = example_value(base) if isinstance(base, fx.Node) else None
    # (a tuple for the rows of `xs.unbind(0)`)
    if not isinstance(val, torch.Tensor) or val.dim() != 3:
        return None
    return base


def _own_memory_where_returned(graph, row: fx.Node) -> None:
    """A row of the recurrence's buffer (or of the hoisted h2o's result) that the graph returns,
    itself or through a node sharing its memory (a view, its detach), becomes a copy of its own
    right after the row, and every user of the row reads the copy: eager's h_t is a tensor of
    its own, so a view returned beside it aliases it, and a write to it after the loop
    (`h.mul_(2); return h`, or the caller's, after the call) is seen in what is returned, not
    in the buffer. AOTAutograd (torch 2.13) also fails at run time on a graph that returns such
    a row and its detach ("select(): index 5 out of range"). B x H copied. A row that does not
    escape stays a view: a write to it changes only its own row."""
    if not _returned(row):
        return
    with graph.inserting_after(row):
        own = graph.call_function(torch.clone, (row,))
    own.meta.update(row.meta)
    row.replace_all_uses_with(own, delete_user_cb=lambda user: user is not own)


def _returned(node: fx.Node) -> bool:
    """Whether the graph returns `node` or a node sharing its memory, reached through its users
    (views, detach, in-place results)."""
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._pytree import tree_leaves

    def storages(n):
        return {StorageWeakRef(v.untyped_storage()) for v in tree_leaves(example_value(n))
                if isinstance(v, torch.Tensor)}

    mine = storages(node)
    seen, todo = {node}, [node]
    while todo:
        for user in todo.pop().users:
            if user.op == "output":
                return True
            if user not in seen and storages(user) & mine:
                seen.add(user)
                todo.append(user)
    return False


def _hoist_output_projection(graph, rows, hs) -> Optional[list]:
    """If every h_t feeds one Linear with the same weights (the h2o), run it once over all
    steps (returns the rows of that result; None where not hoisted); a torch.stack of exactly
    those outputs becomes that result itself."""
    linears = _output_linears(rows)
    if linears is None:
        return None
    weight, bias = linears[0].args[1], linears[0].args[2]
    if any(_after(n, hs) for n in (weight, bias) if isinstance(n, fx.Node)):
        return None  # the weights are computed after the recurrence
    with graph.inserting_before(rows[-1].next):
        steps = graph.call_function(torch.narrow, (hs, 0, 1, len(rows)))
        out_all = graph.call_function(torch.nn.functional.linear, (steps, weight, bias))
        out_rows = [graph.call_function(torch.select, (out_all, 0, t)) for t in range(len(rows))]
    for lin, out_row in zip(linears, out_rows):
        out_row.meta.update(lin.meta)
        lin.replace_all_uses_with(out_row)
        graph.erase_node(lin)
    users = set(out_rows[0].users)
    modes = grad_modes(graph)
    for node in users:
        # only a stack that is the rows' one user: their result is out_all's memory, where a
        # step's output returned or written in place as well would change the "stack" too;
        # and one in out_all's grad mode (a stack under no_grad has no gradient: out_all has)
        if (node.op == "call_function" and node.target is torch.stack and not node.kwargs
                and list(node.args[0]) == out_rows and (len(node.args) < 2 or node.args[1] == 0)
                and all(len(row.users) == 1 for row in out_rows) and modes[node] == modes[out_all]):
            node.replace_all_uses_with(out_all)
            graph.erase_node(node)
    kept = []
    for out_row in out_rows:
        if out_row.users:
            kept.append(out_row)
        else:
            graph.erase_node(out_row)
    return kept


def _output_linears(hs_nodes) -> Optional[list]:
    """The Linear each h_t feeds when all of them share weights (the h2o `_hoist_output_projection`
    turns into one GEMM), else None. Works on the tanh nodes before the rewrite and on the rows after."""
    from fusion_backend.normalize import LINEAR

    linears = []
    for h in hs_nodes:
        users = [u for u in h.users if is_op(u, LINEAR) and u.args[0] is h]
        if len(users) != 1:
            return None
        linears.append(users[0])
    weight, bias = linears[0].args[1], linears[0].args[2]
    if any(lin.args[1] is not weight or lin.args[2] is not bias for lin in linears):
        return None
    return linears


def _moved_across(chain, xs, h0) -> Optional[str]:
    """Why the rewrite would change what the chain computes by moving work to the first step's
    cat (the inputs' computations, the projections of all steps, the recurrence, the h2o GEMM),
    or None. Work from another grad mode or autocast region would run in the wrong mode there
    (no_grad steps trained, trained steps without grad, an autocast h2o in fp32); moved across
    an in-place write, it would read the memory before the write where eager reads it after."""
    first, last = chain[0].cat, chain[-1].tanh
    tanhs = [step.tanh for step in chain]
    # the h2o Linears move to the first cat too when they are hoisted (decided after the
    # rewrite; judged here on the same structure, so possibly more often than they are)
    h2o = _output_linears(tanhs) or []
    end = h2o[-1] if h2o else last  # (the last h2o reads the last h_t: it comes after it)
    moved = [n for x in xs for n in _after(x, first)]
    modes = grad_modes(first.graph)
    for node in [n for step in chain for n in (step.cat, step.linear, step.tanh)] + moved + h2o:
        if modes[node] != modes[first]:
            return (f"{node.name} runs in another grad mode or autocast region than the first step: the fused "
                    "form would move it")
    # everything the hoisted projection and the recurrence read: x_t and the inputs of the
    # nodes computing them that move, h0, W, b; and the h_t themselves (a write to one between
    # steps is what step t+1 reads in eager)
    reads = [*xs, *(i for n in moved for i in n.all_input_nodes), h0, chain[0].weight, chain[0].bias, *tanhs]
    problem = written_inside(first, last, reads)
    if problem is None and h2o:  # the h2o GEMM reads its weights and every h_t at the first cat
        problem = written_inside(first, end, [h2o[0].args[1], h2o[0].args[2], *tanhs])
    return problem


def _needs_backward(chain, xs, h0) -> bool:
    return backward_will_run(chain[0].cat, (*xs, h0, chain[0].weight, chain[0].bias))


def _params(step) -> list:
    """The step's W and b where they are graph values: computed inside the first step (a
    weight parametrization under `parametrize.cached()` runs in the first Linear, after the
    first cat), they move before it with the inputs, where the hoisted projection reads them."""
    return [n for n in (step.weight, step.bias) if isinstance(n, fx.Node)]


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


def _random_draws_reordered(anchor: fx.Node, xs) -> bool:
    """Whether moving the inputs' computations before `anchor` (`_move_before`) would move a
    random op (dropout in training, ...) ahead of another one that stays behind it."""
    moved = {n for x in xs for n in _after(x, anchor)}
    passed_random = False  # a random op that stays, between the anchor and this node
    node = anchor
    while node.op != "output" and moved:
        if node in moved:
            moved.discard(node)
            if passed_random and draws_random(node):
                return True
        elif draws_random(node):
            passed_random = True
        node = node.next
    return False


def _impure_ancestor_after(node: fx.Node, anchor: fx.Node) -> bool:
    return any(n.op not in ("call_function", "call_method", "get_attr") or writes_in_place(n)
               for n in _after(node, anchor))


def _move_before(nodes, anchor: fx.Node) -> None:
    """Move the computations of `nodes` placed after `anchor` to just before it, all together
    in their graph order (moved one node's ancestry at a time, x_1's dropout went ahead of a
    DropConnect computing W inside the first step: their random draws swapped)."""
    order = {n: i for i, n in enumerate(anchor.graph.nodes)}
    for n in sorted({a for node in nodes for a in _after(node, anchor)}, key=order.__getitem__):
        anchor.prepend(n)
