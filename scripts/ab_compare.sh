#!/usr/bin/env bash
# A/B a change against a base on the GPU machine in one device call: both trees built side by side, the change's GPU
# tests (and memcheck) run, then a benchmark alternately on the base and the change, and a table of medians last
# (benchmarks/ab_table.py). Run-to-run spread on one machine is several percent per cell, so a change is judged
# against its base in the same call, never against numbers from another call.
#
#   bash scripts/ab_compare.sh prepare BASE_REV CHANGE    # here: ab/base and ab/change (git-ignored) from git;
#                                                         # CHANGE is a revision or a patch file applied to BASE_REV
#   # then on the device, carrying ab (the run tool's carry: ["ab"]):
#   AB_TESTS="tests/gpu/test_prefill_cuda.py" \
#   AB_MEMCHECK="tests/gpu/test_prefill_cuda.py -k 'wgmma and (mixed_batch and -4- or unused_slots or window)'" \
#   AB_BENCH="python benchmarks/bench_prefill.py --quick --no-flex --no-refs" AB_CSV=bench_prefill.csv \
#     bash scripts/ab_compare.sh run
#
# run's settings (environment): AB_BENCH (the benchmark command; it writes AB_CSV under $OUT), AB_CSV, AB_KEY (the
# CSV columns naming a row, default shape), AB_COLUMNS (columns of the table, default all numeric ones), AB_ROUNDS
# (rounds per build, default 2), AB_TESTS / AB_MEMCHECK (pytest arguments run on the change; empty: skipped),
# AB_SECONDS (the whole call's budget, default 575: every step runs under `timeout` with what is left, and a step
# that would start with under AB_STEP_MIN=50 s left is skipped and reported). Each tree's built extension is also
# kept under /tmp/ab_so with its source stamp, so a second call on a still-warm machine skips the builds.
# Results and logs: $OUT/ab/ (default ./benchmark_results/ab), packed into $OUT/ab.tar.gz when $OUT is set.
set -uo pipefail
cd "$(dirname "$0")/.."
TREES=(base change)

prepare() {
  local base_rev=$1 change=$2
  rm -rf ab && mkdir -p ab/base ab/change
  git archive "$base_rev" | tar -x -C ab/base || return 1
  echo "rev $(git rev-parse "$base_rev")" > ab/base/AB_SOURCE
  if [ -f "$change" ]; then
    git archive "$base_rev" | tar -x -C ab/change || return 1
    patch -p1 --quiet --no-backup-if-mismatch -d ab/change -i "$(realpath "$change")" || return 1
    echo "rev $(git rev-parse "$base_rev") + patch $(sha256sum "$change" | cut -c1-16)" > ab/change/AB_SOURCE
  else
    git archive "$change" | tar -x -C ab/change || return 1
    echo "rev $(git rev-parse "$change")" > ab/change/AB_SOURCE
  fi
  echo "ab/base: $(cat ab/base/AB_SOURCE); ab/change: $(cat ab/change/AB_SOURCE) ($(du -sh ab | cut -f1))"
}

run() {
  local t0=$SECONDS budget=${AB_SECONDS:-575} step_min=${AB_STEP_MIN:-50} reserve=15
  local orig_out=${OUT:-} root_out=${OUT:-$PWD/benchmark_results}
  local results=$root_out/ab
  rm -rf "$results" && mkdir -p "$results" /tmp/ab_so   # no rounds of an earlier run in the table
  export PYTHONUNBUFFERED=1 FLASHCORE_CUDA_ARCHS=${FLASHCORE_CUDA_ARCHS:-90a}
  local jobs=$(( $(nproc) / 2 )) failed=() skipped=()
  left() { echo $(( budget - (SECONDS - t0) - reserve )); }
  # on_tree TREE NAME COMMAND...: run COMMAND in ab/TREE with that tree's package first on the path, under the
  # time left, logging to $results/NAME.log.
  on_tree() {
    local tree=$1 name=$2; shift 2
    local budget_left; budget_left=$(left)
    if [ "$budget_left" -lt "$step_min" ]; then
      echo "== $name: skipped (${budget_left} s left)"; skipped+=("$name"); return 0
    fi
    local s0=$SECONDS
    if (cd "ab/$tree" && PYTHONPATH=$PWD timeout "$budget_left" "$@") > "$results/$name.log" 2>&1; then
      echo "== $name: ok ($((SECONDS - s0)) s) $(tail -n 1 "$results/$name.log")"
    else
      echo "== $name: FAILED ($((SECONDS - s0)) s)"; tail -n 30 "$results/$name.log"; failed+=("$name")
    fi
  }
  for tree in "${TREES[@]}"; do
    [ -f "ab/$tree/AB_SOURCE" ] || { echo "ab/$tree missing: run 'prepare' here and carry ab"; return 1; }
    ln -sfn ../patches "ab/$tree/flashcore_hf/patches"   # the in-place package finds flashcore_hf.patches
    local kept=/tmp/ab_so/$tree
    if [ -f "$kept.so" ] && cmp -s "$kept.stamp" "ab/$tree/AB_SOURCE"; then
      cp "$kept.so" "ab/$tree/flashcore_hf/$(basename "$(cat "$kept.name")")"
      echo "== build $tree: kept from an earlier call"
    else
      (cd "ab/$tree" && MAX_JOBS=$jobs python setup.py build_ext --inplace > "$results/build_$tree.log" 2>&1 &&
       so=$(ls flashcore_hf/_C*.so) && cp "$so" "$kept.so" && echo "$so" > "$kept.name" &&
       cp AB_SOURCE "$kept.stamp"; echo "== build $tree: rc $?") &
    fi
  done
  wait
  for tree in "${TREES[@]}"; do
    (cd "ab/$tree" && PYTHONPATH=$PWD python -c \
      "import torch, flashcore_hf as fc; assert fc.HAS_CUDA_KERNELS or not torch.cuda.is_available()") ||
      { echo "ab/$tree: not importable, or built without CUDA kernels on a CUDA machine"
        tail -n 30 "$results/build_$tree.log" 2>/dev/null; return 1; }
  done
  echo "== builds ready after $((SECONDS - t0)) s"
  local pytest=(python -m pytest -q -p no:cacheprovider)
  # shellcheck disable=SC2086
  [ -z "${AB_TESTS:-}" ] || eval on_tree change tests "${pytest[*]}" "$AB_TESTS"
  # shellcheck disable=SC2086
  [ -z "${AB_MEMCHECK:-}" ] ||
    eval on_tree change memcheck compute-sanitizer --tool memcheck --error-exitcode 1 "${pytest[*]}" "$AB_MEMCHECK"
  if [ -n "${AB_BENCH:-}" ]; then
    for round in $(seq 1 "${AB_ROUNDS:-2}"); do
      for tree in "${TREES[@]}"; do
        mkdir -p "$results/${tree}_$round"
        eval on_tree "$tree" "bench_${tree}_$round" env "OUT=$results/${tree}_$round" "$AB_BENCH"
      done
    done
    # shellcheck disable=SC2086
    python benchmarks/ab_table.py "$results" "${AB_CSV:?AB_CSV: the CSV file AB_BENCH writes}" \
      --key ${AB_KEY:-shape} ${AB_COLUMNS:+--columns $AB_COLUMNS} | tee "$results/table.md"
  fi
  [ -z "$orig_out" ] || tar -czf "$root_out/ab.tar.gz" -C "$root_out" ab
  echo "ab_compare took $((SECONDS - t0)) s"
  [ ${#skipped[@]} -eq 0 ] || echo "SKIPPED (out of time): ${skipped[*]}"
  [ ${#failed[@]} -eq 0 ] || { echo "FAILED: ${failed[*]}"; return 1; }
}

case "${1:-}" in
  prepare)
    [ $# -eq 3 ] || { echo "usage: $0 prepare BASE_REV CHANGE(rev or patch file)"; exit 2; }
    prepare "$2" "$3" ;;
  run) run ;;
  *) echo "usage: $0 prepare BASE_REV CHANGE | run"; exit 2 ;;
esac
