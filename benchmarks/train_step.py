"""A training step (forward + backward, grad on) of the MLP block and of the RNN cell at fp32
"highest": eager, Inductor and fusedtriton (trial on and off), each timed by do_bench in 5 rounds
interleaved across the variants (median). Shows what the compile-time decision does with sites whose backward will run; the
cell's rows time the op that also returns cat(x, h) for dW (`cat_linear_tanh_saving`).

    python benchmarks/train_step.py [mlp|rnn|small ...]   # on the GPU machine, PYTHONPATH=$PWD
"""
import sys
import statistics

import torch
import triton

import fusion_backend
from fusion_backend import autotune
from fusion_backend.backend import _report_sinks
from fusion_backend.models import MLPBlock, RNNCell
from fusion_backend.trial import TRIAL_CALLS

CASES = {"mlp": ((4096, 2048, 2048, "highest", True), (4096, 2048, 2048, "highest", False),
                 (16384, 4096, 4096, "highest", True), (16384, 4096, 4096, "highest", False)),
         # RNN cell (batch, input = hidden, output): the quickstart's size and the KernelBench one
         "rnn": ((256, 4096, 1024, "highest", True), (256, 16384, 8192, "highest", True)),
         # issue #3's small block: host-bound, where the run-time trial decides
         "small": ((512, 1024, 1024, "high", True), (512, 1024, 1024, "highest", True))}


#: do_bench rounds per variant, interleaved across the variants (median)
ROUNDS = 5


def run(M, K, N, precision, train, kind="mlp"):
    torch.set_float32_matmul_precision(precision)
    torch.manual_seed(0)
    if kind in ("mlp", "small"):
        model = MLPBlock(K, N).cuda().train(train)
        inputs = (torch.randn(M, K, device="cuda"),)
    else:
        model = RNNCell(K, K, N).cuda()
        inputs = (torch.randn(M, K, device="cuda"), torch.randn(M, K, device="cuda"))
    variants = {"eager": lambda: model, "Inductor": lambda: torch.compile(model),
                "fusedtriton": lambda: torch.compile(model, backend="fusedtriton"),
                "fusedtriton trial off": lambda: torch.compile(model, backend="fusedtriton", options={"trial": False})}
    steps = {}
    torch._dynamo.reset()
    for name, make in variants.items():
        # no reset between variants: each compiled model keeps its own cache entry (one per
        # backend object) and all stay alive for the interleaved rounds below
        fusion_backend.counters.clear()
        reports = []
        _report_sinks.append(reports)
        f = make()

        def step(f=f):
            out = f(*inputs)
            sum(o.sum() for o in out).backward() if isinstance(out, tuple) else out.sum().backward()

        for _ in range(2 + 2 * TRIAL_CALLS + 2):  # compile, and the run-time trial where there is one
            step()
        _report_sinks.remove(reports)
        if name.startswith("fusedtriton"):
            for site in (site for r in reports for site in r.sites):
                choice = autotune.TUNER.lookup(site.info.get("key"))
                print(f"  {name}: {site.line().strip()}; {choice.describe() if choice else 'no choice'}", flush=True)
            for note in {r.note for r in reports if "trial" in r.note}:
                print(f"  {name}: {note}", flush=True)
        steps[name] = step
    # interleaved rounds: host-bound steps (the small block) drift by tens of percent within a run
    rounds = {name: [] for name in steps}
    for _ in range(ROUNDS):
        for name, step in steps.items():
            rounds[name].append(triton.testing.do_bench(step, return_mode="median"))
    times = {name: statistics.median(r) for name, r in rounds.items()}
    label = f"{M}x{K}->{N} {precision} {'train' if train else 'eval'}" if kind != "rnn" else f"RNN cell B{M} I=H={K} O={N} {precision}"
    print(f"{label}, forward + backward ms: "
          + ", ".join(f"{k} {v:.3f}" for k, v in times.items()), flush=True)


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    for kind in sys.argv[1:] or list(CASES):
        for case in CASES[kind]:
            run(*case, kind=kind)
