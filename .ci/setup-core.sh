#!/usr/bin/env bash
# The core install (what the README's quick start runs): a virtual environment in .venv, the pinned
# CPU build of torch FIRST (an unpinned torch would pull a multi-GB CUDA build), then this project.
# No triton, no data-pipeline backends, no test tools: enough for `fastdmtg train` on CPU.
#   TORCH_INDEX_URL: the wheel index for torch (the README uses https://download.pytorch.org/whl/cpu;
#   empty = pip's configured index, e.g. a CI machine's local mirror).
# Idempotent: re-running only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
$PIP install -q "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
$PIP install -q "numpy>=1.24"
$PIP install -q -e .
