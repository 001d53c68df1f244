#!/usr/bin/env bash
# Install the optional data-pipeline backends (FFCV, DALI) into a virtual environment.
#
#   bash .ci/install-pipelines.sh [VENV]        # VENV defaults to .venv in the repository root
#
# Idempotent: Debian packages already present and Python packages already installed at the wanted
# versions are skipped (pip is only called when an import check fails), so a warm CI machine
# spends a few seconds here (most of it importing torch for the final check). Prints step times.
#
# Why these pieces (see docs/pipelines.md):
#   * FFCV 1.0.2 is an sdist; its setup.py asks pkg-config for opencv4 and links libturbojpeg,
#     so the Debian dev packages must exist before pip runs ("Could not find required package:
#     opencv4" otherwise). opencv-python (pulled by ffcv) needs libGL.so.1 and libglib at import.
#   * FFCV does not declare Pillow (installed with it here; fastdmtg requires it anyway).
#   * DALI: the CUDA 13 build is the smaller wheel (~590 MB vs ~955 MB) and runs CPU-only
#     pipelines (device_id=None) on machines without a GPU, which is what CI tests.
#   * torch is never touched here (no unpinned torch): --no-deps is not used for ffcv because its
#     own requirements (numba, opencv, terminaltables, fastargs, assertpy, ...) are needed, but
#     none of them depends on torch.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO/.venv}"
PY="$VENV/bin/python"
FFCV_VERSION="${FFCV_VERSION:-1.0.2}"
DALI_PACKAGE="${DALI_PACKAGE:-nvidia-dali-cuda130}"
DALI_VERSION="${DALI_VERSION:-2.4.0}"
APT_PACKAGES=(pkg-config libopencv-dev libturbojpeg0-dev libgl1 libglib2.0-0)

[ -x "$PY" ] || { echo "install-pipelines: no python at $PY (pass the venv as the first argument)" >&2; exit 2; }
# ffcv's dependency pytorch_pfn_extras requires an unpinned `torch`: install torch first, and pin the
# one that is there so pip can never replace it (e.g. by a multi-GB CUDA build from the index)
TORCH_VERSION="$("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null)" || {
  echo "install-pipelines: torch is not installed in $VENV; install it first (CI: the CPU build)" >&2; exit 2; }
CONSTRAINTS="$(mktemp)"; trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH_VERSION" >"$CONSTRAINTS"

t_all=$EPOCHREALTIME
step() {  # step NAME START: print the elapsed time of a step
  awk -v a="$2" -v b="$EPOCHREALTIME" -v n="$1" 'BEGIN { printf "install-pipelines: %-32s %6.1f s\n", n, b - a }'
}

# --- Debian packages (FFCV's build + opencv's runtime) -----------------------------------------
t=$EPOCHREALTIME
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  step "apt (${#missing[@]} packages)" "$t"
else
  step "apt (already present)" "$t"
fi

# --- FFCV ---------------------------------------------------------------------------------------
t=$EPOCHREALTIME
if "$PY" - "$FFCV_VERSION" <<'PYEOF' 2>/dev/null
import sys, importlib.metadata as md
assert md.version("ffcv") == sys.argv[1]
import importlib.util as u, cv2, numba  # noqa: F401  (fails on a half-installed stack; cheap:
assert u.find_spec("ffcv")             # (find_spec of a top-level name does not import it: importing
                                       # ffcv costs ~8 s of numba compilation)
PYEOF
then
  step "ffcv $FFCV_VERSION (already)" "$t"
else
  # ffcv requires opencv-python itself; adding opencv-python-headless would put a second copy of
  # the same cv2 package into the venv (they overwrite each other's files)
  "$VENV/bin/pip" install -q --disable-pip-version-check -c "$CONSTRAINTS" "ffcv==$FFCV_VERSION" "numba>=0.57" pillow
  "$PY" -c "import ffcv.loader, ffcv.writer" >/dev/null
  step "ffcv $FFCV_VERSION (installed)" "$t"
fi

# --- DALI ---------------------------------------------------------------------------------------
t=$EPOCHREALTIME
if "$PY" - "$DALI_PACKAGE" "$DALI_VERSION" <<'PYEOF' 2>/dev/null
import sys, importlib.metadata as md
assert md.version(sys.argv[1]) == sys.argv[2]
import nvidia.dali.fn  # noqa: F401
PYEOF
then
  step "$DALI_PACKAGE (already)" "$t"
else
  "$VENV/bin/pip" install -q --disable-pip-version-check -c "$CONSTRAINTS" "$DALI_PACKAGE==$DALI_VERSION"
  "$PY" -c "import nvidia.dali.fn" >/dev/null
  step "$DALI_PACKAGE (installed)" "$t"
fi

# torch must still be the one the venv had (neither package may replace it)
"$PY" -c "import torch, sys; print('install-pipelines: torch', torch.__version__)"
step "total" "$t_all"
