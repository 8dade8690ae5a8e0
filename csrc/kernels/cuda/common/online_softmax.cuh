// The running row max of an online softmax, shared by the kernels that keep one (prefill_sm90 so far).
//
// A tile whose scores stay within 2^kMaxGrowthLog2 of the running max keeps it: the tile's probabilities are then up
// to 2^8 = 256 instead of 1, well inside bf16's and fp16's range and with the same relative precision, and the fp32
// row sums and O accumulators lose nothing. So the O accumulator (64 multiplies per thread at head dim 128) is
// rescaled only when a row's max grows by more than a factor 256, which after a row's first tiles almost never
// happens (FlashAttention-4's conditional rescale), instead of whenever any row of a warp sees a new max.
#pragma once
#include <cuda_runtime.h>

#include <cmath>

#include "ptx.cuh"

namespace flashcore {

constexpr float kMaxGrowthLog2 = 8.f;

// row_max: a row's running max in raw score units (-inf before any key), updated here; tile_max: max(row_max, this
// tile's scores); scale_log2: score scale times log2(e). Sets offset_log2 to what this tile's exps subtract
// (exp2(score * scale_log2 - offset_log2); 0 while the row has seen no key) and returns the factor for the row's
// sums and O so far: exactly 1 when the running max is kept, 0 while the row has seen no key.
__device__ __forceinline__ float advance_running_max(float& row_max, float tile_max, float scale_log2,
                                                     float& offset_log2) {
  // Both products rounded alike (no FFMA contraction), so an unchanged max gives a difference of exactly 0.
  const float kept = __fmul_rn(row_max, scale_log2);
  const float grown = tile_max == -INFINITY ? 0.f : __fmul_rn(tile_max, scale_log2);
  if (grown - kept <= kMaxGrowthLog2) {
    offset_log2 = kept;
    return 1.f;
  }
  offset_log2 = grown;
  row_max = tile_max;
  return fast_exp2(kept - grown);
}

}  // namespace flashcore
