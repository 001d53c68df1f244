#!/usr/bin/env bash
# Fresh-machine set-up for development and CI (CPU): the core install (.ci/setup-core.sh: .venv,
# the pinned CPU torch first, this project), then what the tests need: the triton that torch 2.13's
# CUDA build pins (so CPU CI tests the kernels a GPU user runs, via TRITON_INTERPRET=1), the optional
# data-pipeline backends (FFCV, DALI; .ci/install-pipelines.sh), the [dev] extras and the [aggregators] extra.
# Idempotent: re-running only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
t0=$(date +%s)
bash .ci/setup-core.sh
PIP="$VENV/bin/python -m pip"
$PIP install -q "torch==2.13.0" "triton==3.7.1" "numpy>=1.24"
if [ -f .ci/install-pipelines.sh ]; then
  bash .ci/install-pipelines.sh "$VENV"
fi
$PIP install -q -e ".[dev]"
# the aggregators' extra (torchjd and its solvers), with the installed torch pinned so that pip can
# never replace it (torchjd requires an unpinned torch)
TORCH_PIN="$(mktemp)"; trap 'rm -f "$TORCH_PIN"' EXIT
"$VENV/bin/python" -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' >"$TORCH_PIN"
$PIP install -q -e ".[aggregators]" -c "$TORCH_PIN"
echo "setup: done in $(( $(date +%s) - t0 )) s ($("$VENV/bin/python" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'))"
