"""Host time per call where the work is launch-bound (512x1024->1024 MLP block, TF32): each
layer from an empty Triton launch to the whole compiled model, back-to-back calls (what a
training or serving loop sees: max(host, GPU) per call), median of 5 x 1000 calls, in us.

    python benchmarks/overhead.py [--profile]

The site is forced fused here (the compile-time decision would leave it to Inductor at this
size), so `fusedtriton` is the fused graph's own cost; --profile adds a cProfile of it.
"""
import cProfile
import pstats
import statistics
import sys

import torch
import torch.nn.functional as F
import triton

import fusion_backend
import fusion_backend.patterns.linear_bn_gelu_relu as lbgr
from fusion_backend.models import MLPBlock
from fusion_backend.patterns._common import per_call_ms


@triton.jit
def _empty(x_ptr):
    pass


def per_call_us(fn, calls=1000, reps=5):
    return statistics.median(per_call_ms(fn, calls) for _ in range(reps)) * 1e3


def main():
    torch.set_float32_matmul_precision("high")
    lbgr.tuned_unfused_reason = lambda *args, **kwargs: None  # keep the site fused at any size
    model = MLPBlock(1024, 1024).cuda()
    x = torch.randn(512, 1024, device="cuda")
    bn = model.batch_norm
    rows = {"empty Triton launch": per_call_us(lambda: _empty[(1,)](x)),
            "F.linear (cuBLAS)": per_call_us(lambda: F.linear(x, model.gemm.weight, model.gemm.bias))}
    for train in (False, True):
        mode = "train" if train else "eval"
        torch.set_grad_enabled(train)  # inference under no_grad; training forward with autograd
        model.train(train)
        torch._dynamo.reset()
        fusion_backend.counters.clear()
        fused = torch.compile(model, backend="fusedtriton")
        fused(x)
        assert fusion_backend.counters["linear_bn_gelu_relu"] == 1, "the site was not fused"
        if not train:
            args = (x, model.gemm.weight, model.gemm.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                    1e-5, "none", "tf32")
            out = torch.empty(512, 1024, device="cuda")
            run = lbgr.eval_runner(*args, out)
            choice = next(c for k, c in fusion_backend.autotune.TUNER.choices.items() if k.startswith("eval:"))
            print("eval choice:", choice.describe())
            if choice.config is not None:
                rows["eval kernel launch (launcher's run_fused)"] = per_call_us(lambda: run(choice.kwargs))
            rows["eval op body (eval_forward)"] = per_call_us(lambda: lbgr.eval_forward(*args))
        rows[f"{mode}: fusedtriton, whole model"] = per_call_us(lambda: fused(x))
        if "--profile" in sys.argv:
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(300):
                fused(x)
            torch.cuda.synchronize()
            profile.disable()
            pstats.Stats(profile).sort_stats("tottime").print_stats(15)
        torch._dynamo.reset()
        inductor = torch.compile(model)
        inductor(x)
        rows[f"{mode}: Inductor, whole model"] = per_call_us(lambda: inductor(x))
        rows[f"{mode}: eager"] = per_call_us(lambda: model(x))
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print("| layer | us per call |\n|---|---|")
    for name, us in rows.items():
        print(f"| {name} | {us:.1f} |")


if __name__ == "__main__":
    main()
