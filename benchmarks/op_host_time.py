"""Host time of the cell's opaque op and of the quickstart cell's fused graph, with the fused
launch replayed as a CUDA graph (`_common.REPLAY_GRAPHS`) and launched directly, two rounds
each in turn; then a host profile of the fused graph. B256, 4096+4096->4096 (h2o 1024), fp32
"highest" (3xTF32). The fused graph is forced fused (the compile-time host check patched out),
with the run-time trial off.

"host" = time to queue a call while the GPU is held busy (`torch.cuda._sleep`), so nothing waits
for it; "loop" = back-to-back calls, max(host, GPU).

    python benchmarks/op_host_time.py     # on the GPU machine, PYTHONPATH=$PWD
"""
import copy
import cProfile
import io
import pstats
import time

import torch

from fusion_backend.backend import _report_sinks
from fusion_backend.models import VanillaRNN
from fusion_backend.patterns import _common, cat_linear_tanh


def host_ms(fn, n=50):
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(3e9))
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n * 1e3
    torch.cuda.synchronize()
    return host


_PER_CALL_MS = _common.per_call_ms  # kept: main() patches the module's for the compile-time check


def loop_ms(fn):
    return _PER_CALL_MS(fn, calls=200)


def main():
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    torch.manual_seed(0)
    x, h = torch.randn(256, 4096, device="cuda"), torch.randn(256, 4096, device="cuda")
    w, b = torch.randn(4096, 8192, device="cuda") * 0.01, torch.randn(4096, device="cuda")
    op = getattr(torch.ops.fusedtriton, cat_linear_tanh.NAME + "_inference").default
    rounds = (("direct", False), ("replayed", True)) * 2
    with torch.no_grad():
        def call_op():
            return op([x, h], w, b, "tf32x3", True, 30.0)

        call_op()
        for name, on in rounds:
            _common.REPLAY_GRAPHS = on
            print(f"op {name:9s} host {host_ms(call_op):.4f} ms, loop {loop_ms(call_op):.4f} ms")
        _common.per_call_ms = lambda fn, calls=20: 0.0  # the compile-time host check: fused
        reports = []
        _report_sinks.append(reports)
        model = VanillaRNN(4096, 4096, 1024, 256).cuda()
        fused = torch.compile(copy.deepcopy(model), backend="fusedtriton", options={"trial": False})
        inductor = torch.compile(copy.deepcopy(model))
        xin = torch.randn(256, 4096, device="cuda")
        for _ in range(5):
            fused(xin), inductor(xin)
        for r in reports:
            print(r.summary(), *(s.line() for s in r.sites), sep="\n")
        for name, on in rounds:
            _common.REPLAY_GRAPHS = on
            print(f"graph {name:9s} fused host {host_ms(lambda: fused(xin)):.4f} loop {loop_ms(lambda: fused(xin)):.4f}"
                  f" | Inductor host {host_ms(lambda: inductor(xin)):.4f} loop {loop_ms(lambda: inductor(xin)):.4f} ms")
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(100):
            fused(xin)
        torch.cuda.synchronize()
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
        print(out.getvalue())


if __name__ == "__main__":
    main()
