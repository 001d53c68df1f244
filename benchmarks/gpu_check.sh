#!/usr/bin/env bash
# Every measurement and test that needs a GPU, in one run of about 10 minutes on one H100/H200
# (compile warm-ups included), most important first: a phase that runs out of time is cut at its own
# budget, and the phases before it have already written their results.
#
#   bash benchmarks/gpu_check.sh                  # all phases; results in benchmarks/results/
#   OUT=DIR BUDGET=900 bash benchmarks/gpu_check.sh tests celeba   # some phases, another folder/budget
#
# Phases (budget in seconds; the run stops starting phases when BUDGET, default 570, is spent):
#   tests       170  GPU tests: full train() under the CUDA defaults, CUDA graph == eager (also under
#                    DDP), pruning with graph re-capture, every fused kernel at real sizes
#   celeba      170  CelebA-9 K=3 step table: current defaults vs the fused stem op (batched), then the
#                    reference-style row, fused stem with separate branches
#   ratio        70  CelebA-40 vs CelebA-9 step time at K=5 (best configuration)
#   taskonomy   130  Taskonomy-5 K=3 at 256²: all features with separate vs batched Xception (MFU;
#                    decides batched_auto of xception's Backbone declaration)
#   profile      50  profiler summary of the CelebA-9 K=3 step with the fused stem
#   op_tests    100  the per-op CPU test files on CUDA (tests/test_ops.py, tests/test_op_*.py)
#   kernels      60  benchmarks/kernels.py for the fused stem op vs eager and compiled PyTorch
#   tx_profile   70  profiler summary of the Taskonomy-5 K=3 step
#   data         90  every dataset x backend on CUDA (gpu-cache on the device, DALI mixed decode, FFCV
#                    ToDevice; tests/test_pipelines.py -k on_cuda) + benchmarks/loaders.py
#   precision   100  Taskonomy loss floors under fp32 / the mixed policy / bf16 on CUDA
#                    (benchmarks/precision.py; the CPU measurement's twin, docs/fidelity.md)
#
# Writes one Markdown file per phase, OUT/<gpu>_<date>_<what>.md, each headed by the GPU, driver,
# versions, date, commit and the exact command, plus OUT/<gpu>_<date>_gpu_check.md (phase status and
# times). Needs only torch and triton on the machine: when fastdmtg is not importable it tries an
# offline `pip install --no-deps --no-build-isolation -e .`, and failing that runs the checkout through
# a temporary package folder (fastdmtg + kernels + pipelines linked in) on PYTHONPATH, leaving the
# checkout untouched. Run from anywhere; it changes to the repository root.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results}
BUDGET=${BUDGET:-570}
ALL=(tests celeba ratio taskonomy profile op_tests kernels tx_profile data precision)
PHASES=("$@")
[ ${#PHASES[@]} -eq 0 ] && PHASES=("${ALL[@]}")
for p in "${PHASES[@]}"; do
  case " ${ALL[*]} " in *" $p "*) ;; *) sed -n 2,31p "$0"; echo "unknown phase: $p" >&2; exit 2 ;; esac
done
START=$(date +%s)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

# ---------------------------------------------------------------- make fastdmtg importable
importable() { (cd "$WORK" && $PY -c "import fastdmtg.kernels, fastdmtg.pipelines, fastdmtg.cli") >/dev/null 2>&1; }
if importable; then
  HOW="already installed"
elif timeout 120 $PY -m pip install -q --no-deps --no-build-isolation -e . >"$WORK/pip.log" 2>&1 && importable; then
  HOW="pip install --no-deps --no-build-isolation -e . (offline)"
else
  mkdir -p "$WORK/pkg/fastdmtg"
  for f in "$ROOT"/fastdmtg/*; do ln -s "$f" "$WORK/pkg/fastdmtg/"; done
  ln -s "$ROOT/kernels" "$WORK/pkg/fastdmtg/kernels"
  ln -s "$ROOT/pipelines" "$WORK/pkg/fastdmtg/pipelines"
  export PYTHONPATH="$WORK/pkg${PYTHONPATH:+:$PYTHONPATH}"
  HOW="PYTHONPATH package folder linking fastdmtg/, kernels/, pipelines/ (pip unavailable: $(tail -1 "$WORK/pip.log" 2>/dev/null))"
  importable || { echo "fastdmtg does not import:"; (cd "$WORK" && $PY -c "import fastdmtg.kernels"); exit 1; }
fi
# -P: the working directory is not put on sys.path, so the package found is the importable one above
RUN="$PY -P"

$RUN - >"$WORK/env" <<'EOF'
import datetime, platform, subprocess, torch
try:
    import triton; tv = triton.__version__
except Exception as e:
    tv = f"unavailable ({type(e).__name__})"
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
try:
    drv = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total,clocks.sm,clocks.mem",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except Exception:
    drv = "nvidia-smi unavailable"
low = name.lower()
tag = "h200" if "h200" in low else "h100" if "h100" in low else low.replace("nvidia", "").strip().split(" ")[0] or "gpu"
print(tag)
print(f"- GPU: {name} (driver, memory, SM/memory clock as found: {drv}); torch {torch.__version__} "
      f"(CUDA {torch.version.cuda}), triton {tv}, Python {platform.python_version()}; "
      f"date {datetime.date.today().isoformat()}")
EOF
TAG="$(head -1 "$WORK/env")_$(date +%Y-%m-%d)"
ENV_LINE=$(sed -n 2p "$WORK/env")
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
[ -n "$(git -C "$ROOT" status --porcelain 2>/dev/null)" ] && COMMIT="$COMMIT (with uncommitted changes)"
SUMMARY="$OUT/${TAG}_gpu_check.md"
{
  echo "# GPU check — $TAG"
  echo
  echo "$ENV_LINE"
  echo "- commit $COMMIT; fastdmtg imported via: $HOW"
  echo "- command: \`bash benchmarks/gpu_check.sh ${*:-}\` (BUDGET=$BUDGET s)"
  echo
  echo "| phase | status | seconds | results |"
  echo "|---|---|---:|---|"
} >"$SUMMARY"

# ---------------------------------------------------------------- phase runner
# run_phase NAME BUDGET WHAT CMD...: runs CMD under a timeout (its budget, or what is left of BUDGET),
# logs to WORK/NAME.log, then writes OUT/TAG_WHAT.md: header + the report CMD wrote to WORK/NAME.md,
# or, if it wrote none (time-out, failure), the end of its log (bench prints each row as it is done).
run_phase() {
  local name=$1 budget=$2 what=$3; shift 3
  local left=$(( BUDGET - ($(date +%s) - START) ))
  local file="$OUT/${TAG}_${what}.md"
  if (( left < 20 )); then
    echo "| $name | skipped: total budget spent | 0 | — |" >>"$SUMMARY"; return
  fi
  (( budget > left )) && budget=$left
  echo "== $name (budget ${budget} s): $*"
  local t0=$(date +%s) rc=0
  timeout --kill-after=10 "$budget" "$@" 2>&1 | tee "$WORK/$name.log" || rc=$?
  local secs=$(( $(date +%s) - t0 )) status="ok"
  (( rc == 124 || rc == 137 )) && status="timed out at ${budget} s (results so far below)"
  (( rc != 0 && rc != 124 && rc != 137 )) && status="failed (exit $rc)"
  {
    echo "# $what — $TAG"
    echo
    echo "$ENV_LINE"
    echo "- commit $COMMIT"
    echo "- command: \`$*\` (run by benchmarks/gpu_check.sh, budget ${budget} s, took ${secs} s): $status"
    echo
    if [ -s "$WORK/$name.md" ]; then cat "$WORK/$name.md"; else echo '```'; tail -n 400 "$WORK/$name.log"; echo; echo '```'; fi
  } | sed -e "s#$WORK/##g" -e "s#$ROOT/##g" >>"$file"     # no machine paths in the results
  echo "| $name | $status | $secs | $(basename "$file") |" >>"$SUMMARY"
}

STEP="$RUN -m fastdmtg bench step"
for phase in "${PHASES[@]}"; do
  case $phase in
    tests)
      xdist=""; $RUN -c "import xdist" 2>/dev/null && xdist="-n 6"
      run_phase tests 170 gpu_tests $RUN -m pytest -v -p no:cacheprovider --timeout 160 -rfEs $xdist \
        tests/test_gpu_training.py tests/test_kernels_gpu.py
      ;;
    op_tests)
      xdist=""; $RUN -c "import xdist" 2>/dev/null && xdist="-n 6"
      run_phase op_tests 100 gpu_op_tests $RUN -m pytest -v -p no:cacheprovider --timeout 90 -rfEs $xdist \
        tests/test_ops.py tests/test_op_gumbel_mask.py tests/test_op_grouped_ce.py tests/test_op_masked_l1.py \
        tests/test_op_ce_ignore.py tests/test_op_bn_relu_maxpool.py
      ;;
    celeba)
      # rows (fastdmtg bench step): 7 = current defaults (batched), 12 = + fused stem op; then
      # 0 = reference style (eager fp32 + JPEG DataLoader), 13 = fused stem with separate branches
      run_phase celeba_a 100 step_celeba9_k3 $STEP --recipe celeba9_k3 --only 7,12 --steps 20 --repeats 3 \
        --warmup 6 --out "$WORK/celeba_a.md"
      run_phase celeba_b 70 step_celeba9_k3 $STEP --recipe celeba9_k3 --only 0,13 --steps 20 --repeats 3 \
        --warmup 6 --jpegs 2048 --workers 14 --out "$WORK/celeba_b.md"
      ;;
    taskonomy)
      # rows 6 = all features with separate branches, 7 = the same with batched Xception branches
      run_phase taskonomy 130 step_taskonomy5_k3 $STEP --recipe taskonomy5_k3 --only 6,7 --steps 10 --repeats 3 \
        --warmup 6 --out "$WORK/taskonomy.md"
      ;;
    ratio)
      run_phase ratio 70 scaling_celeba40_vs_celeba9 $STEP --recipe celeba9_k5 --only none --scaling \
        --scaling-recipes celeba9_k5,celeba40_k5 --scaling-set model.batched=on --steps 20 --repeats 3 \
        --warmup 6 --out "$WORK/ratio.md"
      ;;
    profile)
      run_phase profile 50 profile_celeba9_k3_fused_stem sh -c "$RUN -m fastdmtg profile --recipe celeba9_k3 \
        --set model.batched=on --set model.fused_stem=on --steps 20 --warmup 6 --out '$WORK/prof' \
        && cp '$WORK/prof/summary.md' '$WORK/profile.md'"
      ;;
    kernels)
      run_phase kernels 60 kernels_bn_relu_maxpool $RUN benchmarks/kernels.py --only bn_relu_maxpool \
        --out "$WORK/kernels.md"
      ;;
    tx_profile)
      run_phase tx_profile 70 profile_taskonomy5_k3 sh -c "$RUN -m fastdmtg profile --recipe taskonomy5_k3 \
        --steps 10 --warmup 6 --out '$WORK/txprof' && cp '$WORK/txprof/summary.md' '$WORK/tx_profile.md'"
      ;;
    data)
      run_phase data_tests 40 gpu_data_tests $RUN -m pytest -v -p no:cacheprovider --timeout 35 -rfEs \
        tests/test_pipelines.py -k on_cuda
      run_phase loaders 50 loaders $RUN benchmarks/loaders.py --workers 14 --out "$WORK/loaders.md"
      ;;
    precision)
      run_phase precision 100 precision_taskonomy $RUN benchmarks/precision.py taskonomy --device cuda --size 64 \
        --images 8 --steps 600 --lr 2e-3 --log-every 50 --out "$WORK/precision" --report "$WORK/precision.md"
      ;;
  esac
done
echo >>"$SUMMARY"
echo "Total $(( $(date +%s) - START )) s." >>"$SUMMARY"
cat "$SUMMARY"
