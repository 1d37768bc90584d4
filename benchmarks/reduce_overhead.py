"""The 512x1024->1024 MLP block (eval, TF32) under CUDA graphs, side by side in one process:
Inductor and fusedtriton with `mode="reduce-overhead"` (fused inline and through the op), and
both without CUDA graphs. Each compiled model is timed 5 times by do_bench and by a 200-call loop.

    python benchmarks/reduce_overhead.py        # on the GPU machine, PYTHONPATH=$PWD
"""
import statistics

import torch
import triton

import fusion_backend
from bench import bench
from fusion_backend.models import MLPBlock
from fusion_backend.patterns._common import per_call_ms

VARIANTS = {
    "Inductor reduce-overhead": dict(mode="reduce-overhead"),
    "fusedtriton reduce-overhead, inline": dict(backend="fusedtriton", options={"mode": "reduce-overhead", "inline": True}),
    "fusedtriton reduce-overhead, op": dict(backend="fusedtriton", options={"mode": "reduce-overhead", "inline": False}),
    "fusedtriton default (no trial)": dict(backend="fusedtriton", options={"trial": False}),
    "Inductor default": dict(),
}


def main(rounds=5):
    torch.set_float32_matmul_precision("high")
    model = MLPBlock(1024, 1024).cuda().eval()
    x = torch.randn(512, 1024, device="cuda")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    print("| variant | fused sites | do_bench ms (median of rounds) | loop ms/call | rounds (do_bench) |\n|---|---|---|---|---|")
    with torch.no_grad():
        for name, kwargs in VARIANTS.items():
            torch._dynamo.reset()
            fusion_backend.counters.clear()
            f = torch.compile(model, **kwargs)
            for _ in range(5):  # compile, CUDA-graph warm-up and recording
                f(x)
            timed = [bench(lambda: f(x)) for _ in range(rounds)]
            loops = [per_call_ms(lambda: f(x), calls=200) for _ in range(rounds)]
            print(f"| {name} | {dict(fusion_backend.counters)} | {statistics.median(timed):.4f} | "
                  f"{statistics.median(loops):.4f} | {' / '.join(f'{b:.4f}' for b in timed)} |", flush=True)


if __name__ == "__main__":
    main()
