#!/usr/bin/env bash
# The GPU checks that have not run yet (no GPU was lent to the sessions that wrote the code they
# check). One phase per call, so each fits a 10-minute slot; results go to $OUT (default
# benchmarks/results) named after the GPU and the date. Run from the repository root with the
# package importable (pip install -e . or PYTHONPATH=$PWD).
#
#   bash benchmarks/gpu_pending.sh tests       # GPU tests: graph == eager, fresh noise per replay,
#                                              # full train() under the CUDA defaults, pruning with
#                                              # graph re-capture + compile + batched; kernel tests
#   bash benchmarks/gpu_pending.sh celeba      # bench step table + K/N scaling, final defaults
#   bash benchmarks/gpu_pending.sh taskonomy   # Taskonomy-5 K=3: reference row, eager, all features (MFU),
#                                              # + batched Xception branches (decides its auto default)
#   bash benchmarks/gpu_pending.sh profile     # profiler summary of the Taskonomy-5 K=3 step
#   bash benchmarks/gpu_pending.sh precision   # Taskonomy loss floors fp32 / mixed policy / bf16 on CUDA
#                                              # (the CPU measurement's twin, docs/fidelity.md)
set -euo pipefail
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results}
case "${1:-}" in tests|celeba|taskonomy|profile|precision) ;; *) sed -n 2,15p "$0"; exit 2 ;; esac
mkdir -p "$OUT"
gpu=$($PY -c "import torch; n=torch.cuda.get_device_name(0).lower(); print('h200' if 'h200' in n else 'h100' if 'h100' in n else n.split()[-1])")
tag="${gpu}_$(date +%Y-%m-%d)"
export PYTHONUNBUFFERED=1
case "${1:-}" in
  tests)
    $PY -m pytest -q -p no:cacheprovider -rA tests/test_gpu_training.py tests/test_kernels_gpu.py 2>&1 | tee "$OUT/${tag}_gpu_tests.log" ;;
  celeba)
    $PY -m fastdmtg bench step --recipe celeba9_k3 --steps 40 --repeats 5 --warmup 10 --jpegs 4096 --workers 14 \
        --scaling --out "$OUT/${tag}_step_celeba9_k3.md" ;;
  taskonomy)
    $PY -m fastdmtg bench step --recipe taskonomy5_k3 --only 0,1,6,7 --steps 20 --repeats 3 --warmup 10 --workers 14 \
        --out "$OUT/${tag}_step_taskonomy5_k3.md" ;;
  profile)
    $PY -m fastdmtg profile --recipe taskonomy5_k3 --out "$OUT/${tag}_profile_taskonomy5_k3" ;;
  precision)
    $PY benchmarks/precision.py taskonomy --device cuda --size 64 --images 8 --steps 600 --lr 2e-3 --log-every 50 \
        --out "$(mktemp -d)" --report "$OUT/${tag}_precision_taskonomy.md" ;;
  *)
    sed -n 2,15p "$0"; exit 2 ;;
esac
