#!/usr/bin/env bash
# Fresh-machine set-up for development and CI (CPU): the core install (.ci/setup-core.sh: .venv,
# the pinned CPU torch first, this project), then what the tests need: the triton that torch 2.13's
# CUDA build pins (so CPU CI tests the kernels a GPU user runs, via TRITON_INTERPRET=1), the optional
# data-pipeline backends (FFCV, DALI; .ci/install-pipelines.sh), the [dev] extras, the [aggregators] extra
# (torchjd), the [ray] extra (compare --executor ray; ~20 s, ~240 MB) and the optional trackers (MLflow, W&B)
# and ONNX export packages.
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
# the [dev] extras, the aggregators' extra (torchjd and its solvers) and the optional trackers' and
# export's packages for their tests (each test skips without them): ~60 s the first time (warm pip
# cache), a few seconds when installed. The installed torch is pinned so that none of them can replace
# it (torchjd requires an unpinned torch)
CONSTRAINTS="$(mktemp)"; trap 'rm -f "$CONSTRAINTS"' EXIT
"$VENV/bin/python" -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' >"$CONSTRAINTS"
$PIP install -q -c "$CONSTRAINTS" -e ".[dev,aggregators,ray,mlflow,wandb,export]"
echo "setup: done in $(( $(date +%s) - t0 )) s ($("$VENV/bin/python" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'))"
