"""Side-by-side benchmark on a GPU: eager, Inductor, Inductor max-autotune, bare cuBLAS GEMM,
fusedtriton (and with --reduce-overhead both under CUDA graphs), all in one run.

    python benchmarks/bench.py --reduce-overhead --json out.json      # all cases, every column
    python benchmarks/bench.py --cases lbgr_small_eval_high --rounds 5

Every column of a case is compiled first, then timed in --rounds interleaved rounds (3 by
default; the column order rotates each round), median of triton.testing.do_bench per round;
then each column's outputs (all of them: the cell's hidden state too) are checked against an
fp64 copy of the model within the precision class (tests/tolerances.py), and a failure, or a
recompile during the rounds, fails the run. "train" cases run the BatchNorm in training mode
(batch statistics, running statistics updated) under no_grad: the forward alone
(benchmarks/train_step.py times forward + backward). The `*_loop_ms` columns time back-to-back
calls (median of 5 runs of 50), what a training or serving loop sees: max(host, GPU) per call.
do_bench flushes the L2 cache between calls, which gives the host that long to queue the next
call: at sizes of ~0.5 ms and less it can hide host time that a loop pays. Prints a table last
(with what the fusedtriton column ran) and writes JSON with --json, the commit included.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from fusion_backend.models import MLPBlock, RNNCell, UnrolledRNN


# name: (kind, dims, dtype, fp32 matmul precision, train)
CASES = {
    "lbgr_eval_highest": ("mlp", (16384, 4096, 4096), torch.float32, "highest", False),
    "lbgr_eval_high": ("mlp", (16384, 4096, 4096), torch.float32, "high", False),
    "lbgr_eval_bf16": ("mlp", (16384, 4096, 4096), torch.bfloat16, "high", False),
    "lbgr_train_high": ("mlp", (16384, 4096, 4096), torch.float32, "high", True),
    "lbgr_small_eval_high": ("mlp", (512, 1024, 1024), torch.float32, "high", False),
    "lbgr_small_train_high": ("mlp", (512, 1024, 1024), torch.float32, "high", True),
    "rnn_cell_high": ("rnn", (256, 16384, 16384, 8192), torch.float32, "high", False),
    "rnn_cell_highest": ("rnn", (256, 16384, 16384, 8192), torch.float32, "highest", False),
    # the quickstart's cell: GPU time ~0.3 ms, where the host time per call starts to count
    "rnn_cell_small_highest": ("rnn", (256, 4096, 4096, 1024), torch.float32, "highest", False),
    # a small cell (67 MFLOP): bound by host time, its kernels launched inline
    "rnn_cell_tiny_high": ("rnn", (64, 512, 512, 256), torch.float32, "high", False),
    "rnn_cell_tiny_highest": ("rnn", (64, 512, 512, 256), torch.float32, "highest", False),
    # the quickstart's MLP block
    "lbgr_mid_eval_highest": ("mlp", (4096, 2048, 2048), torch.float32, "highest", False),
    "rnn_seq256_highest": ("seq", (256, 8, 1024, 256, 128), torch.float32, "highest", False),
    "rnn_seq256_high": ("seq", (256, 8, 1024, 256, 128), torch.float32, "high", False),
}


def bench(fn):
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def loop_ms(fn, calls=50, runs=5):
    """Back-to-back calls: median over `runs` of the wall time per call of `calls` calls."""
    import statistics

    from fusion_backend.patterns._common import per_call_ms

    return statistics.median(per_call_ms(fn, calls) for _ in range(runs))


#: a kernel sweep's --rounds: its fastest variants (and reference rows) re-timed this many
#: times, interleaved. Single timings of ms-long kernels drift by up to ~10% on the H100
#: (clocks under sustained tensor-core load), enough to reorder close variants.
ROUNDS = 0
_FNS: dict = {}  # (case, variant) -> the callable a sweep timed
_REFERENCES: set = set()  # (case, variant) of reference rows (cuBLAS, eager): always re-timed


def sweep_args(description=None, shape=True, rounds=True):
    """A kernel sweep's arguments: --M --K --N with shape=True (default: the KernelBench MLP
    block 16384x4096->4096); --rounds with rounds=True (for sweeps whose callables bind their
    tensors and config when made: the rounds call them after the sweep)."""
    global ROUNDS
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if shape:
        for name, default in (("--M", 16384), ("--K", 4096), ("--N", 4096)):
            ap.add_argument(name, type=int, default=default)
    if rounds:
        ap.add_argument("--rounds", type=int, default=0,
                        help="re-time the fastest variants of each case this many times, interleaved")
    args = ap.parse_args()
    ROUNDS = getattr(args, "rounds", 0)
    return args


def mkn_args(description=None):
    args = sweep_args(description, rounds=False)
    return args.M, args.K, args.N


def reference(rows, tag, name, fn, err=float("nan")):
    """A sweep's reference row (the bare cuBLAS GEMM, eager, the unfused path): timed now and,
    with --rounds, again in each round."""
    _FNS[(tag, name)] = fn
    _REFERENCES.add((tag, name))
    rows.append((tag, name, bench(fn), err))


def eval_block_references(rows, tag, args, ref, profile):
    """The eval-block sweeps' reference rows for inputs `args` = (x, w, b, gamma, beta,
    running_mean, running_var): the bare cuBLAS GEMM and the unfused path (cuBLAS + one
    pointwise pass, as Inductor runs it). The closures bind their tensors now: --rounds calls
    them after the sweep."""
    import torch.nn.functional as F

    import fusion_backend.patterns.linear_bn_gelu_relu as lbgr

    reference(rows, tag, "cuBLAS GEMM alone", lambda x=args[0], w=args[1]: F.linear(x, w))
    unfused = lambda t=tuple(args): lbgr._unfused_eval(*t, 1e-5, "none", profile)  # noqa: E731
    reference(rows, tag, "unfused (cuBLAS + pointwise)", unfused, rel_err(unfused(), ref))


def eval_block_inputs(M, K, N, dtype, device="cuda"):
    """Seeded random inputs of the Linear+BN+GELU+ReLU eval block, (x, w, b, gamma, beta,
    running_mean, running_var), and its fp64 reference output; for the kernel sweeps."""
    import fusion_backend.patterns.linear_bn_gelu_relu as lbgr

    torch.manual_seed(0)
    x = torch.randn(M, K, device=device).to(dtype)
    w = (torch.randn(N, K, device=device) / K ** 0.5).to(dtype)
    b, gamma, beta, mean = (torch.randn(N, device=device).to(dtype) for _ in range(4))
    var = (torch.rand(N, device=device) + 0.5).to(dtype)
    args = (x, w, b, gamma, beta, mean, var)
    return args, lbgr._reference(*(t.double() for t in args), 1e-5, "none")


def rel_err(out, ref):
    return (out.double() - ref).norm().item() / ref.norm().item()


def try_variant(rows, tag, name, fn, out, ref):
    """A kernel sweep's step: run `fn` (it writes `out`) once against `ref`, time it, append
    (tag, name, ms, error) to rows; a variant that fails to compile is reported and skipped."""
    try:
        out.fill_(float("nan"))
        fn()
        err = rel_err(out, ref)
        ms = bench(fn)
    except Exception as exc:  # noqa: BLE001 - a variant that does not compile is reported
        print(tag, name, "failed:", type(exc).__name__, str(exc)[:300], flush=True)
        return
    print(f"{tag} {name}: {ms:.3f} ms err {err:.2e}", flush=True)
    rows.append((tag, name, ms, err))
    _FNS[(tag, name)] = fn


def print_variants(rows, title, top=None):
    """The sweep's table: per tag, the fastest `top` rows (all by default)."""
    import triton

    print(f"\n{title}, {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print("| case | variant | ms | rel err |\n|---|---|---|---|")
    for tag in dict.fromkeys(r[0] for r in rows):
        for r in sorted((r for r in rows if r[0] == tag), key=lambda r: r[2])[:top]:
            print(f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.2e} |")
    if ROUNDS > 0:
        _rounds(rows, title)


def _rounds(rows, title, fastest=5):
    """Per case: the reference rows and the `fastest` variants of the sweep, timed ROUNDS
    times in turn (each round times every one once); sorted by their median."""
    import statistics

    print(f"\n{title}: {ROUNDS} interleaved rounds, ms\n| case | variant | rounds | median |\n|---|---|---|---|")
    for tag in dict.fromkeys(r[0] for r in rows):
        mine = [r for r in rows if r[0] == tag and (tag, r[1]) in _FNS]
        keys = [(tag, r[1]) for r in mine if (tag, r[1]) in _REFERENCES]
        keys += [(tag, r[1]) for r in sorted(mine, key=lambda r: r[2]) if (tag, r[1]) not in _REFERENCES][:fastest]
        times = {k: [] for k in keys}
        for _ in range(ROUNDS):
            for k in keys:
                times[k].append(bench(_FNS[k]))
        for k, ts in sorted(times.items(), key=lambda kv: statistics.median(kv[1])):
            print(f"| {tag} | {k[1]} | {' / '.join(f'{t:.3f}' for t in ts)} | {statistics.median(ts):.3f} |")


def outputs(out):
    """Every output of a model call, as a tuple."""
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _tolerance(dtype, precision, eager_err):
    """The precision class's bound (tests/tolerances.py, the one place tolerances live)."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    try:
        from tolerances import tolerance
    finally:
        sys.path.pop(0)
    return tolerance(dtype, precision, eager_err)


def _git_state():
    """(commit, dirty) of the tree the benchmark runs from; (None, None) outside a git checkout.
    BENCH_COMMIT names it where the tree is a copy whose .git is not its own (dirty: None)."""
    import os
    import subprocess

    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"], None

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit, bool(dirty)
    except (OSError, subprocess.CalledProcessError):
        return None, None


def _sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()


def run_case(name, max_autotune, reduce_overhead=False, inductor=True, rounds=1, dev="cuda"):
    """One case, every column compiled first and kept alive (Dynamo keeps a cache entry per
    backend for the same forward: a graph count taken around the rounds checks that nothing
    recompiles meanwhile), then timed in `rounds` interleaved rounds (the column order
    rotating by one each round), then each column's outputs checked against fp64."""
    import fusion_backend
    from fusion_backend.backend import _report_sinks
    from fusion_backend.trial import TRIAL_CALLS

    kind, dims, dtype, precision, train = CASES[name]
    torch.set_float32_matmul_precision(precision)
    torch.manual_seed(0)
    if kind == "mlp":
        M, K, N = dims
        model = MLPBlock(K, N).to(dev, dtype)
        with torch.no_grad():
            model.batch_norm.running_mean.normal_(0, 0.5)
            model.batch_norm.running_var.uniform_(0.5, 2.0)
            model.batch_norm.weight.uniform_(0.5, 1.5)
            model.batch_norm.bias.normal_(0, 0.1)
        model.train(train)
        inputs = (torch.randn(M, K, device=dev, dtype=dtype),)
        gemm = lambda: F.linear(inputs[0], model.gemm.weight)  # noqa: E731
    elif kind == "seq":
        T, B, I, H, O = dims
        model = UnrolledRNN(I, H, O).to(dev, dtype).eval()
        inputs = (torch.randn(T, B, I, device=dev, dtype=dtype), torch.randn(B, H, device=dev, dtype=dtype))
        gemm = None
    else:
        B, I, H, O = dims
        model = RNNCell(I, H, O).to(dev, dtype).eval()
        inputs = (torch.randn(B, I, device=dev, dtype=dtype), torch.randn(B, H, device=dev, dtype=dtype))
        xh = torch.cat(inputs, 1)
        hh = torch.randn(B, H, device=dev, dtype=dtype)
        gemm = lambda: (F.linear(xh, model.i2h.weight), F.linear(hh, model.h2o.weight))  # noqa: E731
    # "train" = BatchNorm in training mode (batch statistics, running statistics updated);
    # every column runs under no_grad: the forward alone (train_step.py times forward + backward)
    row = {"case": name, "dtype": str(dtype).replace("torch.", ""), "precision": precision, "dims": dims,
           "batch_norm_training": train, "grad": False}
    fns = {}  # column -> callable; all timed at the end, in `rounds` interleaved rounds
    with torch.no_grad():
        state = {k: v.clone() for k, v in model.state_dict().items()}
        ref_model = copy.deepcopy(model).double()
        refs = outputs(ref_model(*(t.double() for t in inputs)))
        del ref_model
        row["err_eager"] = [rel_err(o, r) for o, r in zip(outputs(model(*inputs)), refs)]
        fns["eager"] = lambda: model(*inputs)
        if gemm is not None:
            fns["cublas_gemm"] = gemm
        torch._dynamo.reset()
        if inductor:
            ind = torch.compile(model)
            t0 = time.perf_counter()
            ind(*inputs)
            _sync(dev)
            row["inductor_first_call_s"] = time.perf_counter() - t0
            fns["inductor"] = lambda: ind(*inputs)
        # max-autotune over 256 unrolled steps would spend minutes of GPU time compiling; the
        # issue's sequence figures are eager, Inductor and Inductor reduce-overhead
        if max_autotune and inductor and kind != "seq":
            t0 = time.perf_counter()
            ma = torch.compile(model, mode="max-autotune-no-cudagraphs")
            ma(*inputs)
            row["max_autotune_compile_s"] = time.perf_counter() - t0
            fns["inductor_max_autotune"] = lambda: ma(*inputs)
        model.load_state_dict(state)
        fusion_backend.counters.clear()
        ft = torch.compile(model, backend="fusedtriton")
        reports = []
        _report_sinks.append(reports)
        t0 = time.perf_counter()
        ft(*inputs)
        _sync(dev)
        row["fused_first_call_s"] = time.perf_counter() - t0
        # the run-time trial of a small graph (trial.py) decides over its first calls
        for _ in range(2 + 2 * TRIAL_CALLS + 2):
            ft(*inputs)
        _report_sinks.remove(reports)
        fns["fusedtriton"] = lambda: ft(*inputs)
        row["fused_sites"] = dict(fusion_backend.counters)
        row["trial"] = [r.note for r in reports if "trial" in r.note]
        row["sites"] = [site.line() for r in reports for site in r.sites]
        if reduce_overhead:  # CUDA graphs: launch-bound small shapes
            if inductor:
                ro = torch.compile(model, mode="reduce-overhead")
                fns["inductor_ro"] = lambda: ro(*inputs)
            ft_ro = torch.compile(model, backend="fusedtriton", options={"mode": "reduce-overhead"})
            fns["fusedtriton_ro"] = lambda: ft_ro(*inputs)
            for col in ("inductor_ro", "fusedtriton_ro"):
                for _ in range(3) if col in fns else ():
                    fns[col]()
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        columns = list(fns)
        for r in range(rounds):
            for col in columns[r % len(columns):] + columns[:r % len(columns)]:
                fn = fns[col]
                row.setdefault(col + "_rounds", []).append(bench(fn))
                if col != "cublas_gemm":
                    row.setdefault(col + "_loop_rounds", []).append(loop_ms(fn))
        row["graphs_compiled_during_rounds"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
        for col in fns:
            row[col + "_ms"] = statistics.median(row[col + "_rounds"])
            if col != "cublas_gemm":
                row[col + "_loop_ms"] = statistics.median(row[col + "_loop_rounds"])
        # every column's outputs after the rounds (the path that was timed: the trial decided,
        # replayed launches captured) against fp64, within the precision class
        row["errors"], row["check_failures"] = {}, []
        for col, fn in fns.items():
            if col == "cublas_gemm":
                continue
            errs = [rel_err(o, r) for o, r in zip(outputs(fn()), refs)]  # (a CUDA graph's outputs: read now)
            row["errors"][col] = errs
            for i, (err, eager_err) in enumerate(zip(errs, row["err_eager"])):
                if not err <= _tolerance(dtype, precision, eager_err):
                    row["check_failures"].append(f"{col} output {i}: rel. error {err:.2e}")
        row["err_fused"] = row["errors"]["fusedtriton"]
        row["autotune_stats"] = dict(fusion_backend.autotune.stats)
        row["choices"] = {k: v.describe() for k, v in fusion_backend.autotune.TUNER.choices.items()}
    return row


def _ran(row) -> str:
    """What the fusedtriton column ran: its sites, or that the trial kept the original graph."""
    if any("original graph kept" in note for note in row.get("trial", [])):
        return "original graph (trial)"
    sites = {k: v for k, v in row.get("fused_sites", {}).items() if v}
    return " ".join(f"{k}x{v}" for k, v in sites.items()) or "Inductor (nothing fused)"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    ap.add_argument("--no-max-autotune", dest="max_autotune", action="store_false",
                    help="leave out the Inductor max-autotune column (its compile takes minutes)")
    ap.add_argument("--max-autotune", dest="max_autotune", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--reduce-overhead", action="store_true", help="add CUDA-graph columns")
    ap.add_argument("--no-inductor", action="store_true",
                    help="fusedtriton and eager only (quick checks; not for the README table)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="time every column this many times, interleaved (median; the small cases are "
                         "host-bound and drift by tens of percent between runs)")
    ap.add_argument("--json")
    args = ap.parse_args()
    import triton

    commit, dirty = _git_state()
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "triton": triton.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
           "commit": commit, "dirty": dirty, "rounds": args.rounds}
    print(env, flush=True)
    rows = []
    for name in args.cases:
        row = run_case(name, args.max_autotune, args.reduce_overhead, not args.no_inductor, args.rounds)
        torch.cuda.empty_cache()  # the case's model and inputs died with run_case
        print(json.dumps(row, default=str), flush=True)
        rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1, default=str)
    cols = ["eager_ms", "inductor_ms", "inductor_max_autotune_ms", "cublas_gemm_ms", "fusedtriton_ms",
            "inductor_ro_ms", "fusedtriton_ro_ms", "eager_loop_ms", "inductor_loop_ms", "fusedtriton_loop_ms"]
    print("\n| case | " + " | ".join(cols) + " | err eager / fused | fusedtriton ran |")
    print("|---" * (len(cols) + 3) + "|")
    for r in rows:
        cells = ["—" if r.get(c) is None else f"{r[c]:.3f}" for c in cols]
        errs = f"{max(r['err_eager']):.1e} / {max(r['err_fused']):.1e}"
        print(f"| {r['case']} | " + " | ".join(cells) + f" | {errs} | {_ran(r)} |")
    failures = [f"{r['case']}: {f}" for r in rows for f in r["check_failures"]]
    recompiled = [r["case"] for r in rows if r["graphs_compiled_during_rounds"]]
    for line in failures:
        print("CHECK FAILED", line)
    if recompiled:
        print("RECOMPILED DURING THE ROUNDS (timings include compiles):", recompiled)
    if failures or recompiled:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
