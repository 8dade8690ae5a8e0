// The merge of attention states for one (row, head) (MergeStatesParams in params.h), shared by the CPU and CUDA
// kernels: each part's weight after normalising by the merged denominator.
#pragma once
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define FC_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FC_HOST_DEVICE inline
#endif

namespace flashcore {

// The merged denominator of one (row, head): a part whose natural-log sum-exp is lse weighs exp(lse - m) / denom.
struct MergeScale {
  float m = -INFINITY;  // the largest lse of the parts and the sink
  float denom = 0.f;    // sum of exp(lse - m) over the parts and the sink; 0: no key and no sink
  FC_HOST_DEVICE float weight(float lse) const { return denom > 0.f ? expf(lse - m) / denom : 0.f; }
};

// lse_a: the a_splits partial states of part a, a_stride floats apart (nullptr: part a has nothing for this row);
// lse_b: part b's (-inf: no key); sink: the head's sink logit (-inf: none).
FC_HOST_DEVICE MergeScale merge_scale(const float* lse_a, int a_splits, int64_t a_stride, float lse_b, float sink) {
  MergeScale s;
  float m = fmaxf(lse_b, sink);
  for (int i = 0; lse_a != nullptr && i < a_splits; ++i) m = fmaxf(m, lse_a[i * a_stride]);
  if (!(m > -INFINITY)) return s;  // no key and no sink
  float denom = expf(lse_b - m) + expf(sink - m);
  for (int i = 0; lse_a != nullptr && i < a_splits; ++i) denom += expf(lse_a[i * a_stride] - m);
  s.m = m;
  s.denom = denom;
  return s;
}

}  // namespace flashcore
