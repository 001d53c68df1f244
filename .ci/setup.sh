#!/usr/bin/env bash
# Fresh-machine set-up for development and CI (CPU): a virtual environment in .venv with the pinned
# CPU build of torch FIRST (an unpinned torch would pull a multi-GB CUDA build), the triton that
# torch 2.13's CUDA build pins (so CPU CI tests the kernels a GPU user runs, via TRITON_INTERPRET=1),
# the optional data-pipeline backends (FFCV, DALI), then this project with its [dev] extras.
# Idempotent: re-running only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
t0=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
$PIP install -q "torch==2.13.0" "triton==3.7.1" "numpy>=1.24"
if [ -f .ci/install-pipelines.sh ]; then
  bash .ci/install-pipelines.sh "$VENV"
fi
$PIP install -q -e ".[dev]"
echo "setup: done in $(( $(date +%s) - t0 )) s ($("$VENV/bin/python" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'))"
