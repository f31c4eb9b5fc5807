#!/usr/bin/env bash
# Set up vlops in ./.venv on a fresh machine: torch, the test/benchmark peers, and the compiled
# extension (CPU part always; CUDA part whenever nvcc and a CUDA build of torch are present).
# Idempotent: a second run reuses the venv and rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.14.1 torchvision==0.29.1
python -m pip install -q "numpy" "pytest" "ninja" "pybind11" "setuptools>=64" "wheel" \
  "diffusers" "open_clip_torch" "timm" "transformers" "matplotlib"
# The GPU machine's triton (3.6) beside the venv's, for tests/test_aot_sm90.py and the dry compiles of
# tests/test_*_triton.py: the kernels must compile with its compiler passes too (it is put first on
# PYTHONPATH for those checks only).
if [ ! -d .venv/triton-3.6/triton ]; then
  python -m pip install -q --no-deps --target .venv/triton-3.6 triton==3.6.0
fi
# nvcc: the CUDA toolkit may sit in a versioned folder that is not on PATH.
if ! command -v nvcc >/dev/null 2>&1; then
  for d in /usr/local/cuda /usr/local/cuda-13.0 /usr/local/cuda-13; do
    if [ -x "$d/bin/nvcc" ]; then export CUDA_HOME="$d"; export PATH="$d/bin:$PATH"; break; fi
  done
fi
MAX_JOBS=${MAX_JOBS:-2} python -m pip install -q --no-build-isolation --no-deps -e .
python -m vlops
