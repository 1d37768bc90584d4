"""fusion_backend/normalize.py on the CPU: the canonical spellings must never change what the
program does. The whole normalized graph goes to Inductor whenever a site fuses, so an
in-place write dropped here (relu_ on a view, an `out=` call) is silently lost.

Every model puts an MLP block (Linear -> BatchNorm1d -> GELU -> ReLU) next to the op under
test: the block fuses, so the normalized graph is the one that runs. Buffers and inputs the
program writes must hold eager's values afterwards; outputs match eager (and a float64 copy).
"""
import copy
import logging
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusion_backend
import fusion_backend.normalize as normalize
from fusion_backend import devices
from fusion_backend.models import MLPBlock
from conftest import randomize_batch_norm
from tolerances import assert_matches, grad_close, rel_err, tolerance

LBGR = "linear_bn_gelu_relu"

needs_interpreter = pytest.mark.skipif(not devices.interpreter_enabled(),
                                       reason="needs TRITON_INTERPRET=1 (conftest sets it when there is no GPU)")


def capture(fn, *args):
    """The first FX graph Dynamo hands a backend for fn(*args)."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(fn, backend=record)(*args)
    torch._dynamo.reset()
    return graphs[0]


def calls(gm):
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def compile_quietly(model):
    """torch.compile(model, backend="fusedtriton"), failing on any fusedtriton warning (a
    warning means the graph fell back to Inductor unfused)."""
    compiled = torch.compile(model, backend="fusedtriton")

    def run(*args):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = compiled(*args)
        assert not [str(w.message) for w in caught if "fusedtriton" in str(w.message)]
        return out

    return run


def block(k=16, n=16, seed=0):
    torch.manual_seed(seed)
    blk = MLPBlock(k, n).eval()
    with torch.no_grad():
        blk.batch_norm.running_mean.uniform_(-0.5, 0.5)
        blk.batch_norm.running_var.uniform_(0.5, 1.5)
    return blk


class InplaceReluMLP(nn.Module):
    """Linear -> BatchNorm1d -> GELU -> nn.ReLU(inplace=True): the GELU output is fresh, so the
    in-place ReLU may (and must, for the pattern) become torch.relu."""

    def __init__(self, k=16, n=16):
        super().__init__()
        self.gemm = nn.Linear(k, n)
        self.batch_norm = nn.BatchNorm1d(n)
        self.gelu = nn.GELU()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.gelu(self.batch_norm(self.gemm(x))))


def inplace_mlp(seed=0):
    torch.manual_seed(seed)
    m = InplaceReluMLP().eval()
    with torch.no_grad():
        m.batch_norm.running_mean.uniform_(-0.5, 0.5)
        m.batch_norm.running_var.uniform_(0.5, 1.5)
    return m


def assert_block_fused_beside(model):
    """`model(x)` returns (its MLP block `model.blk` of x, something else): compiled, the block
    fuses once and both outputs match eager (the block also fp64)."""
    x = torch.randn(8, 16)
    with torch.no_grad():
        y_eager, other_eager = model(x)
        y, other = compile_quietly(model)(x)
    assert dict(fusion_backend.counters) == {LBGR: 1}
    torch.testing.assert_close(other, other_eager)
    assert_matches(y, y_eager, copy.deepcopy(model.blk).double()(x.double()))


# ----------------------------------------------------------------------------- in-place ReLU on aliases

VIEW_WRITES = {
    "F.relu(z[:, :4], inplace=True)": lambda z: F.relu(z[:, :4], inplace=True),
    "F.relu(input=z[2:], inplace=True)": lambda z: F.relu(input=z[2:], inplace=True),
    "z[:, 1:].relu_()": lambda z: z[:, 1:].relu_(),
    "torch.relu_(z.t())": lambda z: torch.relu_(z.t()),
    "F.relu_(z.view(-1))": lambda z: F.relu_(z.view(-1)),
    "nn.ReLU(inplace=True)(z.T)": lambda z: nn.ReLU(inplace=True)(z.T),
    # contiguous() of a contiguous tensor is z itself: no view op, but the same storage
    "F.relu(z.contiguous(), inplace=True)": lambda z: F.relu(z.contiguous(), inplace=True),
}


class WritesInput(nn.Module):
    def __init__(self, write):
        super().__init__()
        self.blk = inplace_mlp()
        self.write = write

    def forward(self, x, z):
        y = self.blk(x)
        self.write(z)  # eager writes z through the alias
        return y, z * 2


@needs_interpreter
@pytest.mark.parametrize("spelling", list(VIEW_WRITES))
def test_inplace_relu_through_an_alias_writes_the_input(spelling):
    model = WritesInput(VIEW_WRITES[spelling])
    torch.manual_seed(1)
    x, z = torch.randn(8, 16), torch.randn(8, 8)
    z_eager, z_compiled = z.clone(), z.clone()
    with torch.no_grad():
        y_eager, z2_eager = model(x, z_eager)
        y, z2 = compile_quietly(model)(x, z_compiled)
    assert dict(fusion_backend.counters) == {LBGR: 1}  # the in-place ReLU after GELU still fuses
    assert not torch.equal(z_eager, z)  # eager did write z
    torch.testing.assert_close(z_compiled, z_eager, rtol=0, atol=0)
    torch.testing.assert_close(z2, z2_eager, rtol=0, atol=0)
    assert_matches(y, y_eager, copy.deepcopy(model.blk).double()(x.double()))


class WritesState(nn.Module):
    """In-place ReLUs on views of a registered buffer and of a plain tensor attribute."""

    def __init__(self):
        super().__init__()
        self.blk = inplace_mlp()
        torch.manual_seed(2)
        self.register_buffer("state", torch.randn(4, 4))
        self.plain = torch.randn(4, 4)

    def forward(self, x):
        self.state.view(-1).relu_()
        F.relu(self.plain.t(), inplace=True)
        return self.blk(x)


@needs_interpreter
def test_inplace_relu_on_views_of_module_state_writes_it():
    eager, model = WritesState(), WritesState()
    assert (model.state < 0).any() and (model.plain < 0).any()
    x = torch.randn(8, 16)
    with torch.no_grad():
        y_eager = eager(x)
        y = compile_quietly(model)(x)
    assert dict(fusion_backend.counters) == {LBGR: 1}
    torch.testing.assert_close(model.state, eager.state, rtol=0, atol=0)
    torch.testing.assert_close(model.plain, eager.plain, rtol=0, atol=0)
    assert_matches(y, y_eager, copy.deepcopy(eager.blk).double()(x.double()))


def test_inplace_relu_normalized_only_on_a_fresh_private_input():
    """Graph level: the ReLU after GELU becomes torch.relu; those on a view, a placeholder or
    the alias contiguous() returns keep their in-place spelling."""
    blk = inplace_mlp()

    def f(x, z):
        F.relu(z[:, :4], inplace=True)
        z.relu_()
        F.relu(z.contiguous(), inplace=True)
        return blk(x)

    gm = capture(f, torch.randn(8, 16), torch.randn(8, 8))
    normalize.normalize(gm)
    relus = [n for n in calls(gm) if "relu" in str(n.target)]
    assert len(relus) == 4
    fresh = [n for n in relus if n.args and normalize.is_op(n.args[0], normalize.GELU)]
    assert len(fresh) == 1 and fresh[0].target is normalize.RELU and not fresh[0].kwargs
    for node in relus:
        if node is not fresh[0]:
            assert node.target is not normalize.RELU, node.format_node()


# ----------------------------------------------------------------------------- out= calls

class ModeSwitchesThenInplaceMLP(nn.Module):
    """Grad-mode and autocast regions (nodes without a tensor example value) before a block
    whose ReLU is in place."""

    def __init__(self):
        super().__init__()
        self.mlp = inplace_mlp()

    def forward(self, x):
        with torch.no_grad():
            x = x * 2
        with torch.autocast("cpu", enabled=False):
            x = x + 1
        return self.mlp(torch.sin(x))


@needs_interpreter
def test_inplace_relu_block_after_mode_switches_still_fuses():
    model = ModeSwitchesThenInplaceMLP()
    x = torch.randn(9, 16)
    eager = copy.deepcopy(model)
    with torch.no_grad():
        out = compile_quietly(model)(x)
        want = eager(x)
    assert fusion_backend.counters[LBGR] == 1
    assert_matches(out, want, eager.double()(x.double()))


class WritesOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.blk = block()

    def forward(self, x, a, buf1, buf2, buf3):
        torch.cat((a, a), dim=0, out=buf1)
        torch.mm(a, a.t(), out=buf2)  # unused result: the write is the point
        torch.matmul(a, a.t(), out=buf3)
        return self.blk(x)


@needs_interpreter
def test_out_calls_keep_writing():
    model = WritesOut()
    torch.manual_seed(3)
    x, a = torch.randn(8, 16), torch.randn(2, 3)
    bufs_eager = [torch.zeros(4, 3), torch.zeros(2, 2), torch.zeros(2, 2)]
    bufs = [b.clone() for b in bufs_eager]
    with torch.no_grad():
        y_eager = model(x, a, *bufs_eager)
        y = compile_quietly(model)(x, a, *bufs)
    assert dict(fusion_backend.counters) == {LBGR: 1}
    for got, want in zip(bufs, bufs_eager):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want)
    assert_matches(y, y_eager, copy.deepcopy(model.blk).double()(x.double()))


def test_out_calls_are_neither_respelled_nor_erased():
    def f(a, b1, b2, b3):
        torch.cat([a, a], 0, out=b1)
        torch.mm(a, a.t(), out=b2)
        torch.matmul(a, a.t(), out=b3)
        return a + 1

    gm = capture(f, torch.randn(2, 3), torch.zeros(4, 3), torch.zeros(2, 2), torch.zeros(2, 2))
    before = [(n.target, n.args, dict(n.kwargs)) for n in calls(gm) if "out" in n.kwargs]
    assert len(before) == 3
    normalize.normalize(gm)
    assert [(n.target, n.args, dict(n.kwargs)) for n in calls(gm) if "out" in n.kwargs] == before


# ----------------------------------------------------------------------------- keyword spellings

W = torch.randn(4, 16)

TRANSPOSES = {
    "torch.permute(w, dims=(1, 0))": lambda w: torch.permute(w, dims=(1, 0)),
    "w.permute(dims=(1, 0))": lambda w: w.permute(dims=(1, 0)),
    "torch.transpose(w, dim0=0, dim1=1)": lambda w: torch.transpose(w, dim0=0, dim1=1),
    "w.transpose(dim0=-1, dim1=-2)": lambda w: w.transpose(dim0=-1, dim1=-2),
}


@pytest.mark.parametrize("spelling", list(TRANSPOSES))
def test_keyword_transpose_becomes_linear(spelling):
    transpose = TRANSPOSES[spelling]
    gm = capture(lambda x: x @ transpose(W), torch.randn(8, 16))
    normalize.normalize(gm)
    (node,) = calls(gm)  # the transpose, orphaned by the rewrite, is gone
    assert node.target is normalize.LINEAR and node.args[2] is None


class UnrelatedMatmul(nn.Module):
    def __init__(self):
        super().__init__()
        self.blk = block()
        self.w = nn.Parameter(torch.randn(4, 16))

    def forward(self, x):
        return self.blk(x), x @ torch.permute(self.w, dims=(1, 0))


@needs_interpreter
def test_permute_with_dims_keyword_does_not_unfuse_the_graph():
    assert_block_fused_beside(UnrelatedMatmul())


# ----------------------------------------------------------------------------- one bad node

def _broken_on_tanh(node):
    # half-rewrites the node, then fails: the node must come back whole
    if normalize._is_call(node, (torch.tanh,), ("tanh",)):
        node.target = torch.sigmoid
        node.args = ()
        raise IndexError("unexpected spelling")


class BlockAndTanh(nn.Module):
    def __init__(self):
        super().__init__()
        self.blk = inplace_mlp()

    def forward(self, x):
        y = self.blk(x)
        return y, x.tanh()


def test_failing_node_is_left_as_it_was(monkeypatch, caplog):
    monkeypatch.setattr(normalize, "_STEPS", (_broken_on_tanh,) + normalize._STEPS)
    model = BlockAndTanh()
    gm = capture(model, torch.randn(8, 16))
    tanh = next(n for n in calls(gm) if n.target == "tanh")
    before = (tanh.op, tanh.target, tanh.args, dict(tanh.kwargs))
    with caplog.at_level(logging.INFO, logger="fusion_backend"):
        normalize.normalize(gm)
    assert (tanh.op, tanh.target, tanh.args, dict(tanh.kwargs)) == before
    assert any("tanh" in r.getMessage() and "IndexError" in r.getMessage() for r in caplog.records)
    # the other nodes were still normalized: the nn.ReLU(inplace=True) after GELU is torch.relu
    assert any(n.target is normalize.RELU and not n.kwargs for n in calls(gm))


@needs_interpreter
def test_failing_node_does_not_unfuse_the_graph(monkeypatch):
    monkeypatch.setattr(normalize, "_STEPS", (_broken_on_tanh,) + normalize._STEPS)
    assert_block_fused_beside(BlockAndTanh())


class _BlockThenHead(nn.Module):
    """A fusable MLP block, then an output head written as `h @ W.t() + b`, its bias in
    `bias_dtype` (e.g. a float64 buffer from torch.from_numpy)."""

    def __init__(self, bias_dtype=torch.float32):
        super().__init__()
        self.block = randomize_batch_norm(MLPBlock(32, 32))
        self.w = nn.Parameter(torch.randn(16, 32) / 6)
        self.register_buffer("b", (torch.randn(16) * 100).to(bias_dtype))

    def forward(self, x):
        return self.block(x) @ self.w.t() + self.b


@needs_interpreter
def test_matmul_plus_bias_of_another_dtype_is_not_folded_into_a_linear():
    """fp32 product + float64 bias promotes to float64 in eager; folded into F.linear it raised
    at run time (mixed dtypes), in a graph whose other site was fused."""
    torch.manual_seed(11)
    model = _BlockThenHead(torch.float64).eval()
    x = torch.randn(16, 32)
    with torch.no_grad():
        out, eager = torch.compile(model, backend="fusedtriton")(x), model(x)
        ref = copy.deepcopy(model).double()(x.double())
    assert fusion_backend.counters["linear_bn_gelu_relu"] == 1
    assert out.dtype == eager.dtype == torch.float64
    assert_matches(out, eager, ref)


@needs_interpreter
def test_matmul_plus_bias_under_autocast_keeps_the_promoted_dtype():
    """Under autocast the product is fp16 and the fp32 bias add promotes to fp32; folded into
    F.linear, autocast ran it all in fp16 and the model returned fp16."""
    torch.manual_seed(12)
    model = _BlockThenHead().eval()
    x = torch.randn(16, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        out, eager = torch.compile(model, backend="fusedtriton")(x), model(x)
    assert fusion_backend.counters["linear_bn_gelu_relu"] == 1
    assert out.dtype == eager.dtype == torch.float32
    assert rel_err(out, eager) <= tolerance(torch.float16)  # the block computes in fp16, as eager's


# ----------------------------------------------------------------------------- matmul + bias add

class _MatmulThenAdd(nn.Module):
    """`y = x @ W.t()`, something in between, then `y + b`; beside it a fused MLP block, so
    that the rewritten graph is the one Inductor compiles."""

    def __init__(self, between):
        super().__init__()
        self.between = between
        self.w, self.b = nn.Parameter(torch.randn(8, 6)), nn.Parameter(torch.randn(8))
        self.block = randomize_batch_norm(MLPBlock(6, 8))

    def forward(self, x):
        if self.between == "no_grad":  # a frozen projection: W gets no gradient
            with torch.no_grad():
                y = h = x * 1.0 @ self.w.t()
        else:
            h = x * 1.0
            y = h @ self.w.t()
        if self.between == "write":  # after the matmul read h
            h.view(-1).add_(100.0)
        if self.between == "write W by dunder":  # W.__imul__: Dynamo records the dunder by name
            with torch.no_grad():
                self.w.__imul__(2.0)
        if self.between == "autocast":  # the add inside autocast, the matmul outside: fp32 both
            with torch.autocast("cpu", dtype=torch.float16):
                z = y + self.b
        else:
            z = y + self.b
        return z, self.block(x)


@pytest.mark.skipif(not devices.interpreter_enabled(), reason="needs TRITON_INTERPRET=1 for a fused site")
@pytest.mark.parametrize("between", ["write", "write W by dunder", "no_grad", "autocast", "nothing"])
def test_matmul_folded_into_its_bias_add_only_where_nothing_is_between(between):
    """normalize turns `x @ W.t()` + `b` into F.linear at the add; with an in-place write, a
    grad-mode or an autocast switch between the two that computed with other values (off by
    315), gave W a gradient eager does not, or computed in fp16. Now folded only where
    nothing is between; the results and gradients match eager."""
    torch.manual_seed(51)
    model = _MatmulThenAdd(between)
    eager, model64 = copy.deepcopy(model), copy.deepcopy(model).double()
    x = torch.randn(4, 6)
    # (the write after the matmul read h: a backward would raise in eager too)
    with torch.set_grad_enabled(not between.startswith("write")):
        out, want = torch.compile(model, backend="fusedtriton")(x), eager(x)
        want64 = model64(x.double())  # (autocast aside: the fp64 truth)
    assert fusion_backend.counters["linear_bn_gelu_relu"] == 1
    for got, ref, ref64 in zip(out, want, want64):
        assert got.dtype == ref.dtype
        if between == "autocast":  # the add in fp32 of an fp32 product: eager's own error is fp16's
            assert rel_err(got, ref64) <= max(tolerance(torch.float16), 2 * rel_err(ref, ref64))
        else:
            assert_matches(got, ref, ref64)
    if between.startswith("write"):
        return
    (out[0].sum() + out[1].sum()).backward()
    (want[0].sum() + want[1].sum()).backward()
    assert (model.w.grad is None) == (eager.w.grad is None) == (between == "no_grad")
    torch.testing.assert_close(model.b.grad, eager.b.grad, **grad_close(eager.b.grad))


class _InplaceReluAfterAnotherUse(nn.Module):
    """`F.relu(g, inplace=True)` after another op read g (that op must see g before the ReLU);
    beside it a plain block."""

    def __init__(self):
        super().__init__()
        self.inner = randomize_batch_norm(MLPBlock(6, 8), seed=3).eval()
        self.block = randomize_batch_norm(MLPBlock(6, 8), seed=4).eval()

    def forward(self, x):
        g = F.gelu(self.inner.batch_norm(self.inner.gemm(x)))
        pre = g * 2
        F.relu(g, inplace=True)
        return g, pre, self.block(x)


@pytest.mark.skipif(not devices.interpreter_enabled(), reason="needs TRITON_INTERPRET=1 for a fused site")
def test_inplace_relu_after_another_reader_is_left_in_place():
    """An in-place ReLU whose input another node read before it is not respelled out of place
    (moving the write would change what that node reads, and the graph would no longer be
    ordered: the whole graph fell back with a warning); the plain block stays fused."""
    torch.manual_seed(53)
    model = _InplaceReluAfterAnotherUse()
    eager, model64 = copy.deepcopy(model), copy.deepcopy(model).double()
    x = torch.randn(5, 6)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a whole-graph fallback warns
        out, want, want64 = torch.compile(model, backend="fusedtriton")(x), eager(x), model64(x.double())
    assert fusion_backend.counters["linear_bn_gelu_relu"] == 1
    for got, ref, ref64 in zip(out, want, want64):
        assert_matches(got, ref, ref64)


class _ReluUnderNoGradBesideABlock(nn.Module):
    """A fused block, and beside it `g.relu_()` under no_grad on a fresh g that requires grad
    (clamping the values while keeping g's history, as eager's in-place op does)."""

    def __init__(self):
        super().__init__()
        self.block = randomize_batch_norm(MLPBlock(6, 8), seed=3)
        self.lin2 = nn.Linear(6, 8)

    def forward(self, x):
        g = self.lin2(x) * 1.0
        with torch.no_grad():
            g.relu_()
        return self.block(x), g * 2


def test_inplace_relu_under_no_grad_keeps_the_history():
    """The in-place ReLU was respelled out of place at its no_grad node: its result had no
    autograd history, so g's readers lost their gradients (a backward raised "does not require
    grad", or lin2 silently got none). It stays in place now; the block is still fused."""
    torch.manual_seed(54)
    # eval: in training the Linear's bias before BatchNorm has a zero gradient, and relative
    # errors of zero say nothing
    model = _ReluUnderNoGradBesideABlock().eval()
    eager, model64 = copy.deepcopy(model), copy.deepcopy(model).double()
    x = torch.randn(5, 6)
    got = torch.compile(model, backend="fusedtriton")(x)
    want, want64 = eager(x), model64(x.double())
    assert fusion_backend.counters["linear_bn_gelu_relu"] == 1
    assert got[1].requires_grad == want[1].requires_grad is True
    for out, ref, ref64 in zip(got, want, want64):
        assert_matches(out.detach(), ref.detach(), ref64.detach())
    for outs in (got, want, want64):
        sum(o.sum() for o in outs).backward()
    for p, e, r in zip(model.parameters(), eager.parameters(), model64.parameters()):
        assert_matches(p.grad, e.grad, r.grad, "grad")


class _FrozenTransposeBlock(nn.Module):
    """A block whose Linear reads W.t() taken under no_grad (a frozen use of W), spelled as a
    matmul + bias or as addmm; beside it a plain block, so that the rewritten graph is the one
    Inductor compiles."""

    def __init__(self, spelling):
        super().__init__()
        self.spelling = spelling
        self.frozen = randomize_batch_norm(MLPBlock(6, 8), seed=1)
        self.block = randomize_batch_norm(MLPBlock(6, 8), seed=2)

    def forward(self, x):
        lin = self.frozen.gemm
        if self.spelling == "no_grad elsewhere":  # W.t() with grad on, a no_grad block between
            wt = lin.weight.t()
            with torch.no_grad():
                self.seen = x.abs().mean()
        else:
            with torch.no_grad():
                wt = lin.weight.t()
        y = torch.addmm(lin.bias, x, wt) if self.spelling == "addmm" else x @ wt + lin.bias
        z = torch.relu(F.gelu(self.frozen.batch_norm(y)))
        return z, self.block(x)


@pytest.mark.skipif(not devices.interpreter_enabled(), reason="needs TRITON_INTERPRET=1 for a fused site")
@pytest.mark.parametrize("spelling", ["matmul", "addmm", "no_grad elsewhere"])
def test_transpose_taken_under_no_grad_is_not_looked_through(spelling):
    """normalize reads `x @ W.t()` as F.linear(x, W) only where the transpose runs in the
    matmul's grad mode: W.t() under no_grad gave W a gradient eager never gives it (an optimizer
    would then move a weight the program froze). A transpose with grad on stays looked through
    across an unrelated no_grad block (a first fix refused any switch between)."""
    frozen = spelling != "no_grad elsewhere"
    torch.manual_seed(52)
    model = _FrozenTransposeBlock(spelling).eval()
    eager, model64 = copy.deepcopy(model), copy.deepcopy(model).double()
    x = torch.randn(5, 6)
    out, want, want64 = torch.compile(model, backend="fusedtriton")(x), eager(x), model64(x.double())
    assert fusion_backend.counters["linear_bn_gelu_relu"] == (1 if frozen else 2)  # (1: the plain block)
    for got, ref, ref64 in zip(out, want, want64):
        assert_matches(got, ref, ref64)
    (out[0].sum() + out[1].sum()).backward()
    (want[0].sum() + want[1].sum()).backward()
    w, w_eager = model.frozen.gemm.weight.grad, eager.frozen.gemm.weight.grad
    assert (w is None) == (w_eager is None) == frozen
    if not frozen:
        torch.testing.assert_close(w, w_eager, **grad_close(w_eager))
    torch.testing.assert_close(model.frozen.gemm.bias.grad, eager.frozen.gemm.bias.grad,
                               **grad_close(eager.frozen.gemm.bias.grad))


class _NarrowHeadAfterBlock(nn.Module):
    """A fused MLP block, then `y @ w.t() + b` whose add broadcasts: (M, 1) + (3,) -> (M, 3), or
    (M, 3) + (1,)."""

    def __init__(self, head):
        super().__init__()
        self.block = randomize_batch_norm(MLPBlock(6, 8))
        self.w = nn.Parameter(torch.randn(1 if head == "column" else 3, 8))
        self.b = nn.Parameter(torch.randn(3 if head == "column" else 1))

    def forward(self, x):
        return self.block(x) @ self.w.t() + self.b


@needs_interpreter
@pytest.mark.parametrize("head", ["column", "scalar-bias"])
def test_broadcasting_bias_add_is_not_folded_into_a_linear(head):
    """An add that broadcasts the product, (M, 1) + (3,) -> (M, 3), was folded into F.linear,
    which refuses those shapes: Inductor failed on the rewritten graph ("a and b must have same
    reduction dim"), and the graph's fused site was lost to the fallback (with a warning). A
    one-element bias (broadcast over the product's columns, as F.linear does too) is folded, and
    stays right."""
    torch.manual_seed(13)
    model = _NarrowHeadAfterBlock(head).eval()
    eager, model64 = copy.deepcopy(model), copy.deepcopy(model).double()
    x = torch.randn(5, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(model, backend="fusedtriton")(x)
    assert not [w for w in caught if "Inductor failed" in str(w.message)], [str(w.message) for w in caught]
    want = eager(x)
    assert fusion_backend.counters["linear_bn_gelu_relu"] == 1
    assert out.shape == want.shape == (5, 3)
    with torch.no_grad():
        assert_matches(out, want, model64(x.double()))
    out.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(model.w.grad, eager.w.grad, **grad_close(eager.w.grad))
    torch.testing.assert_close(model.b.grad, eager.b.grad, **grad_close(eager.b.grad))


class _WeightAsInput(nn.Module):
    """The weight an input (its sizes symbolic under dynamic=True), the bias a parameter."""

    def __init__(self):
        super().__init__()
        self.b = nn.Parameter(torch.randn(8))

    def forward(self, x, w):
        return torch.relu(F.gelu(F.batch_norm(x @ w.t() + self.b, None, None, training=True)))


@needs_interpreter
def test_bias_add_folded_where_a_guard_pinned_the_symbolic_width():
    """Under dynamic=True the product's width is a symbol that the add's guard pins to the
    bias's static 8: the fold into F.linear compared the expressions, not the values, and the
    site stayed unfused."""
    torch.manual_seed(14)
    model = _WeightAsInput()
    x, w = torch.randn(5, 6), torch.randn(8, 6)
    out = torch.compile(model, backend="fusedtriton", dynamic=True)(x, w)
    assert fusion_backend.counters["linear_bn_gelu_relu"] == 1
    with torch.no_grad():
        assert_matches(out, model(x, w), copy.deepcopy(model).double()(x.double(), w.double()))


def test_tanh_with_input_keyword_is_normalized():
    """`torch.tanh(input=y)`: respelled as the positional call, so the cell matches (the
    matchers indexed its missing positional argument, warned and skipped the site)."""
    g = torch.fx.Graph()
    y = g.placeholder("y")
    t = g.call_function(torch.tanh, (), {"input": y})
    g.output(t)
    normalize._normalize_activation(t)
    assert t.target is normalize.TANH and t.args == (y,) and not t.kwargs



def test_written_nodes_sees_every_argument_a_call_writes():
    """What counts as an in-place write (the fusion checks' `written_nodes`): the in-place
    dunders by name, the running statistics of batch/instance norm computing batch statistics,
    and any argument an aten schema marks written (not only the first)."""
    from fusion_backend.patterns._common import written_nodes

    aten = torch.ops.aten
    g = torch.fx.Graph()
    x, w, rm, rv = (g.placeholder(name) for name in ("x", "w", "rm", "rv"))
    calls = {  # name: (op, target, args, kwargs, what it writes)
        "iadd_method": ("call_method", "__iadd__", (x, 1.0), {}, [x]),
        "imul_function": ("call_function", torch.Tensor.__imul__, (w, 2.0), {}, [w]),
        "getitem_method": ("call_method", "__getitem__", (x, 0), {}, []),
        "bn_train": ("call_function", F.batch_norm, (x, rm, rv), {"training": True}, [rm, rv]),
        "bn_eval": ("call_function", F.batch_norm, (x, rm, rv), {}, []),
        "bn_eval_positional": ("call_function", F.batch_norm, (x, rm, rv, None, None, False), {}, []),
        "bn_flag_unknown": ("call_function", F.batch_norm, (x, rm, rv, None, None, x), {}, [rm, rv]),
        "torch_bn_train": ("call_function", torch.batch_norm, (x, None, None, rm, rv, True, 0.1, 1e-5, False), {},
                           [rm, rv]),
        "instance_norm": ("call_function", F.instance_norm, (x, rm, rv), {}, [rm, rv]),
        "aten_bn_legit": ("call_function", aten._native_batch_norm_legit.default,
                          (x, None, None, rm, rv, True, 0.1, 1e-5), {}, [rm, rv]),
        "aten_bn_no_training": ("call_function", aten._native_batch_norm_legit_no_training.default,
                                (x, None, None, rm, rv, 0.1, 1e-5), {}, []),
        "aten_add_out": ("call_function", aten.add.out, (x, w), {"out": rm}, [rm]),
        "aten_add_packet": ("call_function", aten.add_, (w, x), {}, [w]),
        "builtin_by_aten_schema": ("call_function", torch._native_batch_norm_legit,
                                   (x, None, None, rm, rv, True, 0.1, 1e-5), {}, [rm, rv]),
        "builtin_amp_unscale": ("call_function", torch._amp_foreach_non_finite_check_and_unscale_, ([x], rm, rv), {},
                                [x, rm]),
        "method_by_aten_schema": ("call_method", "index_put_", (x, (w,), rm), {}, [x]),
        "native_batch_norm": ("call_function", torch.native_batch_norm, (x, None, None, rm, rv, True, 0.1, 1e-5), {},
                              [rm, rv]),
        "embedding_max_norm": ("call_function", F.embedding, (x, w), {"max_norm": 1.0}, [w]),
        "embedding": ("call_function", F.embedding, (x, w), {}, []),
        "embedding_bag_max_norm": ("call_function", F.embedding_bag, (x, w, None, 2.0), {}, [w]),
    }
    for name, (op, target, args, kwargs, want) in calls.items():
        node = g.create_node(op, target, args, kwargs, name=name)
        assert written_nodes(node) == want, name
