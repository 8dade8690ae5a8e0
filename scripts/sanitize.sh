#!/usr/bin/env bash
# compute-sanitizer over a reduced GPU set (part of scripts/gpu_check.sh, step "sanitizer"):
# - memcheck: repeated generate() calls with sparse policies and CUDA graphs (8K tokens in 16-token pages cross the
#   same 2 MiB bounds-granule boundary as 32K in 64-token pages), the sparse GPU tests (key signs included), graph
#   reuse across calls, the rerank stage's candidate scores and pick, the decode kernel's split merge, growable pools
#   unmapped behind queued kernels, the prefill kernels on a reduced grid, cascade decode with prefix key splits, the
#   grouped linear kernels;
# - racecheck: append_kv, the sparse selection kernels; the decode and prefill kernels are tried and reported (see
#   below).
# Exits non-zero when the sanitizer reports an error or a test fails.
set -uo pipefail
cd "$(dirname "$0")/.."
export FLASHCORE_TEST_CONTEXT=${FLASHCORE_TEST_CONTEXT:-8192} FLASHCORE_TEST_PAGE_SIZE=${FLASHCORE_TEST_PAGE_SIZE:-16}
pytest=(python -m pytest -q -x -p no:cacheprovider)
status=0
echo "== memcheck =="
compute-sanitizer --tool memcheck --error-exitcode 1 "${pytest[@]}" \
  tests/gpu/test_repeated_generate.py -k "topk or kept" || status=1
# (Not test_next_generate_call_reuses_graphs: under compute-sanitizer the previous call's frames stay referenced, so
# its cache is alive when the next generate() asks for the pool arena and the next call captures afresh.)
compute-sanitizer --tool memcheck --error-exitcode 1 "${pytest[@]}" tests/gpu/test_sparse_gpu.py \
  tests/gpu/test_sparse_signs_gpu.py tests/gpu/test_decode_graphs.py::test_greedy_identical_with_and_without_graphs \
  || status=1
# The rerank stage's candidate-score kernel (forced pages, padding entries, page ids outside the pool, graph replay)
# and its pick (select_candidate_pages: rows held in registers and rows read from global memory).
compute-sanitizer --tool memcheck --error-exitcode 1 "${pytest[@]}" tests/gpu/test_select_pages_cuda.py -k candidate \
  || status=1
# The decode kernel's in-kernel split merge (counters in the plan's workspace, reset by the last split of each run)
# over changing page lists, rows without pages, and the one-shot op's separate merge kernel.
compute-sanitizer --tool memcheck --error-exitcode 1 "${pytest[@]}" tests/gpu/test_decode_cuda.py \
  -k "one_plan_many_runs or empty_sequences or cuda_graph_replay" || status=1
# Pools unmapped while kernels that use them are still queued (a cache dropped behind its last graph replays).
compute-sanitizer --tool memcheck --error-exitcode 1 "${pytest[@]}" tests/gpu/test_growable_buffer_cuda.py \
  "tests/gpu/test_decode_graphs.py::test_user_cache_dropped_while_its_last_replays_are_queued[False]" || status=1
# The prefill kernels (the Hopper one loads full-page K/V tiles by TMA, the rest by cp.async) on a reduced grid:
# mixed batches (odd lengths, chunked prefill, empty sequences) at every page size and head dim, and NaN-poisoned
# unused slots at TMA page sizes 8..512.
compute-sanitizer --tool memcheck --error-exitcode 1 "${pytest[@]}" tests/gpu/test_prefill_cuda.py \
  -k "wgmma and (mixed_batch and -4- or unused_slots)" || status=1
# Cascade decode: a large group's prefix in key splits through the prefill kernel (splits without pages among them),
# decode-sized groups through the decode kernel, and the merge of the split partials with each row's own pages.
compute-sanitizer --tool memcheck --error-exitcode 1 "${pytest[@]}" \
  tests/gpu/test_shared_prefix_gpu.py::test_cascade_matches_one_pass_attention || status=1
# The grouped linear kernels: the tensor-core one (TMA ring, wgmma, split-k reduced through distributed shared memory
# across a cluster) over odd token counts, short weights and k not a multiple of a stage, and the GEMV.
compute-sanitizer --tool memcheck --error-exitcode 1 "${pytest[@]}" tests/gpu/test_grouped_linear_cuda.py \
  -k "tensor_core_kernel and bfloat16 or leading_dims or graph_replay" || status=1
echo "== racecheck =="
# Only flashcore's kernels (cuBLAS's own GEMM kernels report races racecheck cannot tell are benign).
compute-sanitizer --tool racecheck --kernel-name kns=append_kv --error-exitcode 1 "${pytest[@]}" \
  tests/gpu/test_append_kv_cuda.py || status=1
# The sparse selection kernels: bounds and sign scoring (queries and sign tables staged in shared memory), the radix
# select (shared histograms, warp 0 scans, ballot compaction), candidate scores, append with the summary fold.
compute-sanitizer --tool racecheck --kernel-name kns=flashcore --error-exitcode 1 "${pytest[@]}" \
  tests/gpu/test_select_pages_cuda.py || status=1
# Measured 2026-12-01 (H200, compute-sanitizer of CUDA 13.0): racecheck stops with "Internal Sanitizer Error: The
# Sanitizer failed to handle a hardware exception" on the first decode or prefill kernel (graphs or not), while
# memcheck runs the same tests clean. Reported, not counted, until that is understood.
compute-sanitizer --tool racecheck --kernel-name kns=flashcore "${pytest[@]}" \
  tests/gpu/test_decode_cuda.py::test_cuda_graph_replay tests/gpu/test_prefill_cuda.py::test_cuda_graph_replay \
  || echo "racecheck on the decode / prefill kernels did not complete (see above); not counted"
exit $status
