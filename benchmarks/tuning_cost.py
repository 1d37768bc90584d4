"""Cold vs warm tuning cost: run in two processes sharing FUSEDTRITON_CACHE_DIR.

    FUSEDTRITON_CACHE_DIR=/tmp/ftcache python benchmarks/tuning_cost.py   # cold: tunes, writes the cache
    FUSEDTRITON_CACHE_DIR=/tmp/ftcache python benchmarks/tuning_cost.py   # warm: reads it, benchmarks nothing
Prints the first-call (compile + tune) time per seed shape and the tuner's counters.
"""
import json
import time

import torch

from fusion_backend import autotune
from fusion_backend.models import MLPBlock, RNNCell

torch.set_float32_matmul_precision("high")
rows = []
for name, make in (
        ("lbgr 16384x4096->4096 eval", lambda: (MLPBlock(4096, 4096).cuda().eval(), (torch.randn(16384, 4096, device="cuda"),))),
        ("lbgr 512x1024->1024 train", lambda: (MLPBlock(1024, 1024).cuda().train(), (torch.randn(512, 1024, device="cuda"),))),
        ("rnn cell B256 I=H=16384", lambda: (RNNCell(16384, 16384, 8192).cuda(),
                                             (torch.randn(256, 16384, device="cuda"), torch.randn(256, 16384, device="cuda"))))):
    model, inputs = make()
    torch._dynamo.reset()
    before = dict(autotune.stats)
    t0 = time.perf_counter()
    with torch.no_grad():
        torch.compile(model, backend="fusedtriton")(*inputs)
    torch.cuda.synchronize()
    after = dict(autotune.stats)
    rows.append({"case": name, "first_call_s": round(time.perf_counter() - t0, 2),
                 "benchmarked": after.get("benchmarked", 0) - before.get("benchmarked", 0),
                 "cache_hits": after.get("cache_hits", 0) - before.get("cache_hits", 0)})
    del model, inputs
    torch.cuda.empty_cache()
print(json.dumps(rows))
