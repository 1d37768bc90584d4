"""A training step (forward + backward, grad on) of the MLP block at fp32 "highest": eager,
Inductor and fusedtriton (trial on and off), each timed 3 times by do_bench (median). Shows
what the compile-time decision does with sites whose backward will run.

    python benchmarks/train_step.py        # on the GPU machine, PYTHONPATH=$PWD
"""
import statistics

import torch
import triton

import fusion_backend
from fusion_backend import autotune
from fusion_backend.backend import _report_sinks
from fusion_backend.models import MLPBlock
from fusion_backend.trial import TRIAL_CALLS

CASES = ((4096, 2048, 2048, "highest", True), (4096, 2048, 2048, "highest", False),
         (16384, 4096, 4096, "highest", True), (16384, 4096, 4096, "highest", False))


def run(M, K, N, precision, train):
    torch.set_float32_matmul_precision(precision)
    torch.manual_seed(0)
    model = MLPBlock(K, N).cuda().train(train)
    x = torch.randn(M, K, device="cuda")
    variants = {"eager": lambda: model, "Inductor": lambda: torch.compile(model),
                "fusedtriton": lambda: torch.compile(model, backend="fusedtriton"),
                "fusedtriton trial off": lambda: torch.compile(model, backend="fusedtriton", options={"trial": False})}
    times = {}
    for name, make in variants.items():
        torch._dynamo.reset()
        fusion_backend.counters.clear()
        reports = []
        _report_sinks.append(reports)
        f = make()

        def step(f=f):
            f(x).sum().backward()

        for _ in range(2 + 2 * TRIAL_CALLS + 2):  # compile, and the run-time trial where there is one
            step()
        _report_sinks.remove(reports)
        if name.startswith("fusedtriton"):
            for site in (site for r in reports for site in r.sites):
                choice = autotune.TUNER.lookup(site.info.get("key"))
                print(f"  {name}: {site.line().strip()}; {choice.describe() if choice else 'no choice'}", flush=True)
        times[name] = statistics.median(triton.testing.do_bench(step, return_mode="median") for _ in range(3))
    print(f"{M}x{K}->{N} {precision} {'train' if train else 'eval'}, forward + backward ms: "
          + ", ".join(f"{k} {v:.3f}" for k, v in times.items()), flush=True)


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    for case in CASES:
        run(*case)
