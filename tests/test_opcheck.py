"""`torch.library.opcheck` on every fusedtriton op: the schema matches what the op does (no
undeclared mutation or aliasing), the fake kernel gives the real kernel's shapes, dtypes and
strides, the autograd registration is there, and AOTAutograd traces it (static and dynamic).

Small odd shapes, interpreter on CPU (compiled kernels on a GPU). The numerics are tested per
pattern; this file checks the registrations the compiled graph relies on."""
import pytest
import torch
from tolerances import assert_matches, grad_close

from fusion_backend.patterns import cat_linear_tanh as clt
from fusion_backend.patterns import cell_h2o as ch
from fusion_backend.patterns import linear_bn_gelu_relu as lbgr
from fusion_backend.patterns import rnn_sequence as rs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PRECISION = "ieee"
META = [16, 16, 16, 4, 1, 1]  # inline ops: BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages
M, K, N = 5, 7, 6  # K = 3 + 4 for the cells' two cat operands


def _randn(*shape, grad=True):
    return torch.randn(*shape, device=DEVICE, requires_grad=grad)


def _bn_stats():
    return torch.randn(N, device=DEVICE), torch.rand(N, device=DEVICE) + 0.5


def _linear(grad, bias=True):
    return _randn(M, K, grad=grad), _randn(N, K, grad=grad), (_randn(N, grad=grad) if bias else None)


def _cases(grad):
    """(name, op, args) for each op, inputs requiring grad or not."""
    x, w, b = _linear(grad)
    g, beta = _randn(N, grad=grad), _randn(N, grad=grad)
    mean, var = _bn_stats()
    eval_args = (x, w, b, g, beta, mean, var, 1e-5, "none", PRECISION)
    cell_xs = [_randn(M, 3, grad=grad), _randn(M, 4, grad=grad)]
    yield "eval", lbgr.linear_bn_gelu_relu_eval, eval_args + (False, 1.0)
    yield "eval_keep_y", lbgr.linear_bn_gelu_relu_eval_keep_y, eval_args[:8] + ("tanh", PRECISION, False, 1.0)
    yield "eval_inline", lbgr.linear_bn_gelu_relu_eval_inline, eval_args + (META,)
    yield "eval_keep_y_inline", lbgr.linear_bn_gelu_relu_eval_keep_y_inline, eval_args + (META,)
    train_args = (x, w, b, g, beta, 1e-5, "none", PRECISION)
    yield "train", lbgr.linear_bn_gelu_relu_train, train_args + (False, 1.0)
    yield "train_keep_y_no_affine", lbgr.linear_bn_gelu_relu_train, (x, w, None, None, None) + train_args[5:] + (
        False, 1.0, True)
    yield "train_inline", lbgr.linear_bn_gelu_relu_train_inline, train_args + (META, True)
    yield "cell", clt.cat_linear_tanh, (cell_xs, w, b, PRECISION, False, 1.0)
    yield "cell_no_bias", clt.cat_linear_tanh, (cell_xs, w, None, PRECISION, False, 1.0)
    yield "cell_saving", clt.cat_linear_tanh_saving, (cell_xs, w, b, PRECISION, False, 1.0)
    yield "cell_inline", clt.cat_linear_tanh_inline, (cell_xs, w, b, PRECISION, META)
    yield "h2o", ch.cell_h2o, (x, w, b, PRECISION, False, 1.0)
    yield "h2o_inline", ch.cell_h2o_inline, (x, w, b, PRECISION, META)
    empty = _randn(0, K, grad=grad)
    yield "eval_empty_batch", lbgr.linear_bn_gelu_relu_eval, (empty,) + eval_args[1:] + (False, 1.0)
    yield "cell_empty_batch", clt.cat_linear_tanh, ([empty[:, :3], empty[:, 3:]], w, b, PRECISION, False, 1.0)
    yield "recurrence", rs.rnn_recurrence, (_randn(4, 3, 5, grad=grad), _randn(3, 5, grad=grad),
                                            (0.3 * torch.randn(5, 5, device=DEVICE)).requires_grad_(grad), PRECISION)


_NAMES = [name for name, _, _ in _cases(False)]


#: what opcheck can run on the inline ops (torch.library.triton_op) here: under
#: TRITON_INTERPRET=1 `wrap_triton` hands back the interpreted kernel itself, not the traceable
#: wrapper, so their fake kernel (the op's own function) would run the interpreter on fake
#: tensors; with a GPU the whole set runs
INLINE_UTILS = (None if torch.cuda.is_available() else ("test_schema", "test_autograd_registration"))


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("name", _NAMES)
def test_opcheck(name, grad):
    torch.manual_seed(0)
    _, op, args = next(c for c in _cases(grad) if c[0] == name)
    if name.endswith("_inline") and INLINE_UTILS is not None:
        torch.library.opcheck(op, args, test_utils=INLINE_UTILS)
    else:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("name", ["eval", "train", "cell", "h2o", "recurrence"])
def test_opcheck_inference_twin(name):
    """The `_inference` twins the rewrite uses where no gradient is needed (no autograd kernel)."""
    torch.manual_seed(0)
    _, op, args = next(c for c in _cases(False) if c[0] == name)
    twin = getattr(torch.ops.fusedtriton, op._schema.name.split("::")[1] + "_inference").default
    torch.library.opcheck(twin, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("affine", [True, False])
def test_eval_op_backward_called_directly(affine):
    """The eval op's own backward (the Python one; a compiled graph's backward is traced and
    decomposed instead) against eager's BatchNorm in eval mode. On CUDA aten's batch-norm
    backward asserted on a 2-D input when it was given no saved statistics."""
    torch.manual_seed(0)
    x, w, b = _linear(True)
    g, beta = (_randn(N), _randn(N)) if affine else (None, None)
    mean, var = _bn_stats()
    out = lbgr.linear_bn_gelu_relu_eval(x, w, b, g, beta, mean, var, 1e-5, "none", PRECISION, False, 1.0)
    leaves = [t for t in (x, w, b, g, beta) if t is not None]
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    def block(x, w, b, g, beta, mean, var):
        return torch.relu(torch.nn.functional.gelu(torch.nn.functional.batch_norm(
            torch.nn.functional.linear(x, w, b), mean, var, g, beta, False, 0.0, 1e-5)))

    ref = block(x, w, b, g, beta, mean, var)
    ref_grads = torch.autograd.grad(ref, leaves, grad_out)
    with torch.no_grad():
        ref64 = block(*(None if t is None else t.double() for t in (x, w, b, g, beta, mean, var)))
    assert_matches(out.detach(), ref.detach(), ref64)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **grad_close(want))
