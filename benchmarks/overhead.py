"""Host overhead per call of the fused op (small shapes are launch-bound): cProfile of the
compiled model, and the op called directly, side by side with Inductor."""
import cProfile
import pstats

import torch

import fusion_backend
from fusion_backend.models import MLPBlock
from patterns._common import per_call_ms


def per_call_us(fn):
    return per_call_ms(fn, calls=300) * 1e3


torch.set_float32_matmul_precision("high")
m = MLPBlock(1024, 1024).cuda().eval()
x = torch.randn(512, 1024, device="cuda")
with torch.no_grad():
    ft = torch.compile(m, backend="fusedtriton")
    ft(x)
    torch._dynamo.reset()
    ind = torch.compile(m)
    ind(x)
    from patterns import linear_bn_gelu_relu as L
    op = lambda: torch.ops.fusedtriton.linear_bn_gelu_relu_eval(  # noqa: E731
        x, m.gemm.weight, m.gemm.bias, m.batch_norm.weight, m.batch_norm.bias, m.batch_norm.running_mean,
        m.batch_norm.running_var, 1e-5, "none", "tf32", True, 30.0)
    direct = lambda: L.eval_forward(  # noqa: E731
        x, m.gemm.weight, m.gemm.bias, m.batch_norm.weight, m.batch_norm.bias, m.batch_norm.running_mean,
        m.batch_norm.running_var, 1e-5, "none", "tf32", True, 30.0)
    print({"fusedtriton_us": per_call_us(lambda: ft(x)), "inductor_us": per_call_us(lambda: ind(x)),
           "op_us": per_call_us(op), "eval_forward_us": per_call_us(direct)})
    print(fusion_backend.autotune.TUNER.choices)
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(200):
        ft(x)
    torch.cuda.synchronize()
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(18)
