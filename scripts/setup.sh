#!/usr/bin/env bash
# Sets up .venv with what fusedtriton needs on a fresh CPU machine (torch 2.13.0 CPU build,
# Triton, pytest) and installs the project into it, editable. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0" "triton==3.9.0" "pytest>=7" numpy
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
