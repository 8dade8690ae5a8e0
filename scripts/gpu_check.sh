#!/usr/bin/env bash
# The GPU check: one command on a CUDA machine that builds the CUDA extension, runs the test suite (GPU tests
# included), a reduced GPU set under compute-sanitizer (scripts/sanitize.sh), then the kernel and end-to-end
# benchmarks, and prints a short summary table last.
#
#   bash scripts/gpu_check.sh                 # everything, about 9 minutes on an H200
#   GPU_CHECK_STEPS="build tests decode" bash scripts/gpu_check.sh
#   GPU_CHECK_STEPS="build cascade" bash scripts/gpu_check.sh   # cascade decode (not in the default steps: time)
#
# It keeps to one 10-minute device call: every step runs under `timeout` with what is left of GPU_CHECK_SECONDS
# (default 575), and a step that would start with under a minute left is skipped and reported, so the summary and
# the results always come back.
# Results (CSV, PNG, logs) go to $OUT/gpu_check/ (default ./benchmark_results/gpu_check); when $OUT is set they are
# also packed into $OUT/gpu_check.tar.gz. Exits non-zero if the build or a test fails.
set -uo pipefail
cd "$(dirname "$0")/.."
ORIG_OUT=${OUT:-}
ROOT_OUT=${OUT:-$PWD/benchmark_results}
RESULTS=$ROOT_OUT/gpu_check
mkdir -p "$RESULTS"
export OUT=$RESULTS PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} FLASHCORE_CUDA_ARCHS=${FLASHCORE_CUDA_ARCHS:-90a}
STEPS=${GPU_CHECK_STEPS:-"build tests sanitizer decode prefill linear sparse e2e"}
E2E_ARGS=${GPU_CHECK_E2E_ARGS:-"--new 32"}
SPARSE_ARGS=${GPU_CHECK_SPARSE_ARGS:-"--new-tokens 32"}
DEADLINE=${GPU_CHECK_SECONDS:-575}
RESERVE=25  # seconds kept for the summary and packing the results
failed=()
skipped=()

run_step() {  # run_step NAME COMMAND...: log to $RESULTS/NAME.log, show the tail
  local name=$1; shift
  [[ " $STEPS " == *" $name "* ]] || return 0
  local left=$((DEADLINE - SECONDS - RESERVE))
  if [ "$left" -lt 60 ]; then
    echo "== $name: skipped, ${left} s left of GPU_CHECK_SECONDS=$DEADLINE =="
    skipped+=("$name")
    return 0
  fi
  echo "== $name: $* =="
  local t0=$SECONDS
  if timeout "$left" "$@" > "$RESULTS/$name.log" 2>&1; then
    tail -n 25 "$RESULTS/$name.log"
  else
    tail -n 60 "$RESULTS/$name.log"
    failed+=("$name")
  fi
  echo "== $name took $((SECONDS - t0)) s =="
}

run_step build python -m pip install --no-build-isolation --no-deps -e .
if [[ " ${failed[*]-} " == *" build "* ]]; then echo "build failed"; exit 1; fi
python -c "import flashcore_hf as fc; assert fc.HAS_CUDA_KERNELS, 'extension built without CUDA kernels'" || exit 1
run_step tests python -m pytest tests -q -rs
run_step sanitizer bash scripts/sanitize.sh
run_step decode python benchmarks/bench_decode.py
run_step prefill python benchmarks/bench_prefill.py
run_step linear python benchmarks/bench_linear.py
# shellcheck disable=SC2086
run_step sparse python benchmarks/bench_sparse.py $SPARSE_ARGS
# shellcheck disable=SC2086
run_step e2e python benchmarks/bench_e2e.py $E2E_ARGS
run_step cascade python benchmarks/bench_cascade.py

echo "== summary =="
python benchmarks/summarize.py "$RESULTS" | tee "$RESULTS/summary.txt"
if [ -n "$ORIG_OUT" ]; then
  tar -czf "$ROOT_OUT/gpu_check.tar.gz" -C "$ROOT_OUT" gpu_check && cp "$RESULTS/summary.txt" "$ROOT_OUT/summary.txt"
fi
echo "gpu check took $SECONDS s"
if [ ${#skipped[@]} -gt 0 ]; then echo "SKIPPED steps (out of time): ${skipped[*]}"; fi
if [ ${#failed[@]} -gt 0 ]; then echo "FAILED steps (a timeout counts): ${failed[*]}"; exit 1; fi
