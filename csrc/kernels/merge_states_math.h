// The merge of two attention states for one (row, head) (MergeStatesParams in params.h), shared by the CPU and CUDA
// kernels: the weights of part a and part b after normalising by the merged denominator.
#pragma once
#include <cmath>

#ifdef __CUDACC__
#define FC_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FC_HOST_DEVICE inline
#endif

namespace flashcore {

struct MergeWeights {
  float a, b;
};

// lse_a / lse_b: natural-log sum-exp of each part (-inf: no key); sink: the head's sink logit (-inf: none).
FC_HOST_DEVICE MergeWeights merge_weights(float lse_a, float lse_b, float sink) {
  float m = fmaxf(fmaxf(lse_a, lse_b), sink);
  if (!(m > -INFINITY)) return {0.f, 0.f};  // no key and no sink
  const float w_a = expf(lse_a - m), w_b = expf(lse_b - m);
  const float denom = w_a + w_b + expf(sink - m);
  return {w_a / denom, w_b / denom};
}

}  // namespace flashcore
