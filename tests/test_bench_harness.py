"""benchmarks/bench.py's harness on the CPU interpreter, on tiny cases with the timers stubbed:
every column is compiled, timed in rotating rounds and checked against fp64 afterwards; a
column whose outputs are outside the precision class fails the run. (The timings themselves
need the GPU machine.)"""
import os
import sys

import pytest
import torch

from fusion_backend import devices

needs_interpreter = pytest.mark.skipif(not devices.interpreter_enabled(),
                                       reason="the harness's fused column needs TRITON_INTERPRET=1 on the CPU")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench  # noqa: E402

TINY = {
    "mlp_eval": ("mlp", (9, 12, 10), torch.float32, "highest", False),
    "mlp_train": ("mlp", (9, 12, 10), torch.float32, "highest", True),
    "cell": ("rnn", (5, 6, 7, 4), torch.float32, "highest", False),
    "seq": ("seq", (3, 5, 6, 7, 4), torch.float32, "highest", False),
}


@pytest.fixture
def tiny_cases(monkeypatch):
    order = []
    monkeypatch.setattr(bench, "CASES", TINY)
    monkeypatch.setattr(bench, "bench", lambda fn: (fn(), order.append(fn), 1.0)[-1])
    monkeypatch.setattr(bench, "loop_ms", lambda fn: (fn(), 2.0)[-1])
    return order


@needs_interpreter
@pytest.mark.parametrize("case", list(TINY))
def test_every_column_is_timed_and_checked(tiny_cases, case):
    row = bench.run_case(case, max_autotune=False, rounds=2, dev="cpu")
    columns = ["eager", "inductor", "fusedtriton"] + (["cublas_gemm"] if case != "seq" else [])
    for col in columns:
        assert row[col + "_rounds"] == [1.0, 1.0], col
    assert set(row["errors"]) == set(columns) - {"cublas_gemm"}
    assert all(len(errs) == (1 if case.startswith("mlp") else 2) for errs in row["errors"].values())
    assert row["check_failures"] == [] and row["graphs_compiled_during_rounds"] == 0
    assert sum(row["fused_sites"].values()) >= 1, row["fused_sites"]
    # the rounds rotate: round 2 starts with the second column of round 1
    first_round = tiny_cases[:len(columns)]
    assert tiny_cases[len(columns)] is first_round[1]


@needs_interpreter
def test_reduce_overhead_columns_join_the_rounds_and_the_checks(tiny_cases):
    row = bench.run_case("cell", max_autotune=False, reduce_overhead=True, rounds=1, dev="cpu")
    for col in ("inductor_ro", "fusedtriton_ro"):
        assert row[col + "_rounds"] == [1.0] and len(row["errors"][col]) == 2, col
    assert row["check_failures"] == [] and row["graphs_compiled_during_rounds"] == 0


@needs_interpreter
def test_a_column_outside_its_precision_class_is_reported(tiny_cases, monkeypatch):
    monkeypatch.setattr(bench, "_tolerance", lambda dtype, precision, eager_err: -1.0)  # nothing passes
    row = bench.run_case("mlp_eval", max_autotune=False, rounds=1, dev="cpu")
    assert {f.split()[0] for f in row["check_failures"]} == {"eager", "inductor", "fusedtriton"}
