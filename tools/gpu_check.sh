#!/usr/bin/env bash
# Everything memcore checks on a lent GPU machine, in one command of at most 9 minutes:
#
#     bash tools/gpu_check.sh [--dry-run] [OUT_DIR]          (OUT_DIR defaults to $OUT)
#
# The machine reaches no network, and its image has torch, triton, JAX and the test tools but
# not array-api-compat. Before the call, fill the ignored .whl/ folder of this tree where a
# registry is reached, and name .whl in the call's carried paths:
#
#     pip download array-api-compat --no-deps -d .whl
#
# Stages, in this order, each under its own `timeout` and all inside one budget (530 s, or
# MEMCORE_GPU_CHECK_BUDGET_S); a stage that fails or runs out of time is recorded and the
# next one runs:
#   setup          array-api-compat from .whl/; memcore installed editable offline, or run
#                  from a copy of the tree laid out as installed (benchmarks/gpu_setup.py)
#   env            versions, the device, the settings the tests read
#   tests_gpu      the tests that skip without a GPU (realistic sizes, compiled kernels)
#   bench_scan, bench_attention, bench_layer
#                  the three sections of `python -m benchmarks gpu`, one process each
#   tests_kernels  every Triton and Pallas test file, compiled, in the time left
# OUT_DIR receives at most 8 flat files: gpu_check.json (every figure, test count and stage
# status; schema in benchmarks/gpu_check.py) and one log per stage (setup.log holds env too).
#
# --dry-run (or MEMCORE_GPU_CHECK_DRY_RUN=1) installs nothing, collects the tests instead of
# running them and gives the benchmark tiny sizes. On a machine without a GPU every stage's
# command still runs: the GPU-only tests each skip with their reason, the other kernel tests
# are collected, and the stages that need a GPU record "skipped: no CUDA device".
# PYTHON names the interpreter (default python3). Exit status: 0 when every stage passed or was
# skipped, 1 otherwise, 2 for bad arguments.
set -uo pipefail

usage() { sed -n '2,4p' "$0" | sed 's/^# \{0,4\}//'; }

DRY=${MEMCORE_GPU_CHECK_DRY_RUN:-0}
OUT_DIR=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $arg" >&2; usage >&2; exit 2 ;;
    *) if [ -n "$OUT_DIR" ]; then
         echo "gpu_check.sh: one output folder expected, got $OUT_DIR and $arg" >&2; exit 2
       fi
       OUT_DIR=$arg ;;
  esac
done
OUT_DIR=${OUT_DIR:-${OUT:-}}
if [ -z "$OUT_DIR" ]; then
  echo "gpu_check.sh: give the output folder as the argument or in \$OUT" >&2; usage >&2; exit 2
fi
BUDGET=${MEMCORE_GPU_CHECK_BUDGET_S:-530}
if ! [[ $BUDGET =~ ^[0-9]+$ ]]; then
  echo "gpu_check.sh: MEMCORE_GPU_CHECK_BUDGET_S must be whole seconds, got '$BUDGET'" >&2
  exit 2
fi
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd) || exit 2
cd "$(dirname "$0")/.." || exit 2
REPO=$PWD
PY=${PYTHON:-python3}
REPORT=$OUT_DIR/gpu_check.json
GRACE=10      # seconds between timeout's SIGINT (pytest still reports) and its SIGKILL
MIN_STAGE=15  # a stage given less than this is recorded as skipped
START=$(date +%s)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
trap 'rm -rf "$WORK"' EXIT
DRY_FLAG=()
[ "$DRY" = 1 ] && DRY_FLAG=(--dry-run)

# Compiled kernels: the tests' conftest picks the interpreter only where no CUDA device is
# present or MEMCORE_KERNELS_INTERPRET=1 asks for it; nothing inherited may force a path.
unset TRITON_INTERPRET MEMCORE_KERNELS_INTERPRET MEMCORE_KERNELS MEMCORE_SCAN
# JAX would otherwise take 75% of the GPU's memory at its first array, starving torch in the
# same test process.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1

record() {
  "$PY" -m benchmarks.gpu_check record "$REPORT" "$@" ||
    echo "gpu_check.sh: recording failed: $*" >&2
}

# run_stage NAME LOG KIND CAP DETAILS STATUS COMMAND...: COMMAND under `timeout`, its output
# appended to OUT_DIR/LOG, then recorded with what it wrote to DETAILS. STATUS, if not empty,
# is the status to record when the command succeeds (a stage that only collects says why).
run_stage() {
  local name=$1 log=$2 kind=$3 cap=$4 details=$5 status=$6
  shift 6
  local left limit t0 rc
  left=$((START + BUDGET - $(date +%s) - GRACE))
  if [ "$left" -lt "$MIN_STAGE" ]; then
    record --stage "$name" --kind "$kind" --log "$log" \
      --status "skipped: no time left in the ${BUDGET} s budget"
    return
  fi
  limit=$((cap < left ? cap : left))
  echo "== $name (timeout ${limit} s)"
  printf '\n== %s (timeout %s s): %s\n' "$name" "$limit" "$*" >> "$OUT_DIR/$log"
  t0=$(date +%s.%N)
  timeout -s INT -k "$GRACE" "$limit" "$@" >> "$OUT_DIR/$log" 2>&1
  rc=$?
  record --stage "$name" --kind "$kind" --log "$log" --rc "$rc" --limit "$limit" \
    --started "$t0" --details "$details" ${status:+--status "$status"}
}

"$PY" -m benchmarks.gpu_check init "$REPORT" --budget "$BUDGET" "${DRY_FLAG[@]}" || exit 1
echo "gpu_check: $REPO -> $OUT_DIR (budget ${BUDGET} s${DRY_FLAG:+, dry run})"

run_stage setup setup.log setup 60 "$WORK/setup.json" "" \
  "$PY" -m benchmarks.gpu_setup --repo "$REPO" --wheels "$REPO/.whl" --work "$WORK" \
  "${DRY_FLAG[@]}"
RUN_ROOT=$REPO
# shellcheck source=/dev/null
[ -f "$WORK/env.sh" ] && . "$WORK/env.sh"
cd "$RUN_ROOT" || exit 1

run_stage env setup.log env 45 "$WORK/env.json" "" \
  "$PY" -m benchmarks.gpu_check env --json "$WORK/env.json"

# Without a GPU the GPU-only tests still run: each skips at once, and the report shows why.
# The other kernel tests would run interpreted there (minutes), so they are only collected.
GPU_MODE=() KERNEL_MODE=() GPU_SKIPPED="" KERNEL_SKIPPED=""
if ! "$PY" -m benchmarks.gpu_check has-cuda "$WORK/env.json"; then
  GPU_SKIPPED="skipped: no CUDA device"
  KERNEL_MODE=(--collect-only) KERNEL_SKIPPED="skipped: no CUDA device (tests collected only)"
elif [ "$DRY" = 1 ]; then
  GPU_MODE=(--collect-only) GPU_SKIPPED="skipped: dry run (tests collected only)"
  KERNEL_MODE=(--collect-only) KERNEL_SKIPPED=$GPU_SKIPPED
fi
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -p benchmarks.gpu_check --durations=15)

# An empty list would let pytest run the whole suite: the listing must have found tests.
mapfile -t GPU_TESTS < <("$PY" -m benchmarks.gpu_check gpu-tests)
[ "${#GPU_TESTS[@]}" -gt 0 ] || GPU_TESTS=(--no-gpu-tests-found)
run_stage tests_gpu tests_gpu.log tests 120 "$WORK/tests_gpu.jsonl" "$GPU_SKIPPED" \
  env MEMCORE_GPU_CHECK_RESULTS="$WORK/tests_gpu.jsonl" \
  "${PYTEST[@]}" "${GPU_MODE[@]}" "${GPU_TESTS[@]}"

# The benchmark's sizes (benchmarks/gpu.py's defaults) fit these caps on an H100-class GPU,
# compiles included; a dry run only has to reach each section.
SCAN=() ATTN=() LAYER=()
if [ "$DRY" = 1 ]; then
  SCAN=(--scan-shape 1 8 64 4)
  ATTN=(--attn-shape 1 256 2 16 --window 32 --chunk 16 --capacity 4)
  LAYER=(--d-model 64 --heads 4 --window 32 --chunk 16 --select 2 --capacity 4 --lengths 256)
fi
run_stage bench_scan bench_scan.log bench 75 "$WORK/bench_scan.json" "" \
  "$PY" -m benchmarks gpu --only scan --json "$WORK/bench_scan.json" "${SCAN[@]}"
run_stage bench_attention bench_attention.log bench 60 "$WORK/bench_attention.json" "" \
  "$PY" -m benchmarks gpu --only attention --json "$WORK/bench_attention.json" "${ATTN[@]}"
run_stage bench_layer bench_layer.log bench 90 "$WORK/bench_layer.json" "" \
  "$PY" -m benchmarks gpu --only layer --json "$WORK/bench_layer.json" "${LAYER[@]}"

mapfile -t KERNEL_FILES < <("$PY" -m benchmarks.gpu_check kernel-tests)
[ "${#KERNEL_FILES[@]}" -gt 0 ] || KERNEL_FILES=(--no-kernel-tests-found)
DESELECT=()
for t in "${GPU_TESTS[@]}"; do DESELECT+=(--deselect "$t"); done
run_stage tests_kernels tests_kernels.log tests 300 "$WORK/tests_kernels.jsonl" \
  "$KERNEL_SKIPPED" env MEMCORE_GPU_CHECK_RESULTS="$WORK/tests_kernels.jsonl" \
  "${PYTEST[@]}" "${KERNEL_MODE[@]}" "${KERNEL_FILES[@]}" "${DESELECT[@]}"

"$PY" -m benchmarks.gpu_check finish "$REPORT"
