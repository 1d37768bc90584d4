"""Experiment: the rewritten graph run as it is (Dynamo's FX graph, like backend="eager"),
without Inductor's compile and its per-call wrappers, where the fused ops are all the graph's
work. Host-bound shapes (512x1024 MLP block, the tiny cell), back-to-back calls.

    python benchmarks/plain_graph.py [--rounds 3]

Columns, us per call (median of `rounds` interleaved runs of 5 x 50 calls): eager, Inductor,
fusedtriton (as it ships), plain (the same rewrite, the graph not compiled by Inductor).
"""
import argparse
import statistics

import torch

from fusion_backend import backend, devices
from fusion_backend.models import MLPBlock, RNNCell
from fusion_backend.options import Options
from fusion_backend.patterns._common import per_call_ms


def plain(gm, example_inputs):
    opts = Options.parse(None, {"trial": False})
    device = backend._graph_device(gm, example_inputs)
    profile = devices.device_profile(device)
    with backend._on_device(device):
        report = backend.rewrite(gm, profile, opts, device, example_inputs)
    print("  plain:", [s.line() for s in report.sites])
    return gm.forward


def us(fn):
    return statistics.median(per_call_ms(fn, 50) for _ in range(5)) * 1e3


def case(name, model, inputs, grad, rounds, backward=False):
    torch.manual_seed(0)
    fns = {"eager": model}
    for col, kw in (("inductor", {}), ("fusedtriton", {"backend": "fusedtriton"}), ("plain", {"backend": plain})):
        torch._dynamo.reset()
        fns[col] = torch.compile(model, **kw)
    ref = None
    calls = {}
    for col, f in fns.items():
        def call(f=f):
            with torch.set_grad_enabled(grad):
                out = f(*inputs)
                out = out[0] if isinstance(out, tuple) else out
                if backward:
                    out.sum().backward()
                return out
        for _ in range(2 + 2 * 12 + 2):  # compile, and the run-time trial's calls
            out = call()
        torch.cuda.synchronize()
        calls[col] = call
        if ref is None:
            ref = out.detach().double()
        err = ((out.detach().double() - ref).norm() / ref.norm()).item()
        print(f"  {col}: rel. diff vs eager {err:.2e}")
    times = {col: [] for col in calls}
    for _ in range(rounds):
        for col, call in calls.items():
            times[col].append(us(call))
    row = {col: statistics.median(t) for col, t in times.items()}
    print(f"| {name} | " + " | ".join(f"{row[c]:.1f}" for c in calls) + " |", flush=True)
    return name, row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_float32_matmul_precision("high")
    rows = []
    mlp = MLPBlock(1024, 1024).cuda()
    with torch.no_grad():
        mlp.batch_norm.running_var.uniform_(0.5, 2.0)
    x = torch.randn(512, 1024, device="cuda")
    rows.append(case("mlp 512x1024 eval, no_grad", mlp.eval(), (x,), False, args.rounds))
    rows.append(case("mlp 512x1024 train-mode, no_grad", mlp.train(), (x,), False, args.rounds))
    rows.append(case("mlp 512x1024 train-mode, grad, fwd", mlp.train(), (x,), True, args.rounds))
    rows.append(case("mlp 512x1024 train-mode, fwd+bwd", mlp.train(), (x,), True, args.rounds, backward=True))
    cell = RNNCell(512, 512, 256).cuda().eval()
    ci = (torch.randn(64, 512, device="cuda"), torch.randn(64, 512, device="cuda"))
    rows.append(case("cell B64 512/512/256, no_grad", cell, ci, False, args.rounds))
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| case | eager | Inductor | fusedtriton | plain |\n|---|---|---|---|---|")
    for name, row in rows:
        print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in row.values()) + " |")


if __name__ == "__main__":
    main()
