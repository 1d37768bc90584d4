#!/usr/bin/env bash
# One GPU-machine session: install, GPU tests, benchmark. Usage (from the repo root):
#   bash benchmarks/gpu_run.sh [bench cases...]      (env BENCH_ARGS="--reduce-overhead" adds the CUDA-graph columns)
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/fusedtriton-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -2
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  python3 -m pytest -q tests/test_gpu.py tests/test_launch_host.py tests/test_opcheck.py ${GPU_TEST_ARGS:-} 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  # no cases named: every case (`--cases` with nothing after it would select none)
  python3 benchmarks/bench.py ${BENCH_ARGS:-} --json "$OUT/bench.json" ${1:+--cases "$@"} 2>&1 | tee "$OUT/bench.log" | grep -v '^{"case"'
fi
