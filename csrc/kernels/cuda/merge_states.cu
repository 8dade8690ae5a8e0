// Merge of attention states (MergeStatesParams in params.h): one warp per (row, head), lanes over the head dim in
// 8-byte vectors where the shapes and pointers allow.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../merge_states_math.h"
#include "common/convert.cuh"
#include "launchers.h"

namespace flashcore {
namespace {

constexpr int kMergeThreads = 256;
constexpr int kWarpsPerBlock = kMergeThreads / 32;

// V consecutive elements of T, loaded and stored as one (8 bytes when V > 1).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T e[V];
};

// One warp per (row, head); lane l covers elements [l * V, l * V + V) of every 32 * V. V > 1 needs head_dim % V == 0
// and 8-byte aligned out_a / out_b / out (launch checks).
template <typename T, int V>
__global__ void __launch_bounds__(kMergeThreads) merge_states_kernel(const MergeStatesParams p) {
  const int64_t total = (int64_t)p.rows * p.num_heads;
  const int64_t split_stride = (int64_t)p.rows_a * p.num_heads;  // between part a's splits, in (row, head) rows
  const int lane = threadIdx.x % 32;
  for (int64_t row = (int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.x / 32; row < total;
       row += (int64_t)gridDim.x * kWarpsPerBlock) {
    const int64_t t = row / p.num_heads, h = row % p.num_heads;
    const int64_t a = p.a_rows ? p.a_rows[t] : t;
    const bool has_a = a >= 0 && a < p.rows_a;  // a row index outside part a contributes nothing
    const int64_t a_row = a * p.num_heads + h;
    const float* lse_a = has_a ? p.lse_a + a_row : nullptr;
    const MergeScale scale =
        merge_scale(lse_a, p.a_splits, split_stride, p.lse_b[row], p.sinks ? p.sinks[h] : -INFINITY);
    const float w_b = scale.weight(p.lse_b[row]);
    const T* out_a = static_cast<const T*>(p.out_a) + (has_a ? a_row * p.head_dim : 0);
    const T* out_b = static_cast<const T*>(p.out_b) + row * p.head_dim;
    T* out = static_cast<T*>(p.out) + row * p.head_dim;
    for (int d = lane * V; d < p.head_dim; d += 32 * V) {
      float acc[V];
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] = 0.f;
      for (int s = 0; has_a && s < p.a_splits; ++s) {
        const float w = scale.weight(lse_a[s * split_stride]);
        if (w == 0.f) continue;
        const Pack<T, V> x = *reinterpret_cast<const Pack<T, V>*>(out_a + s * split_stride * p.head_dim + d);
#pragma unroll
        for (int i = 0; i < V; ++i) acc[i] += w * to_float(x.e[i]);
      }
      if (w_b != 0.f) {
        const Pack<T, V> x = *reinterpret_cast<const Pack<T, V>*>(out_b + d);
#pragma unroll
        for (int i = 0; i < V; ++i) acc[i] += w_b * to_float(x.e[i]);
      }
      Pack<T, V> y;
#pragma unroll
      for (int i = 0; i < V; ++i) y.e[i] = from_float<T>(acc[i]);
      *reinterpret_cast<Pack<T, V>*>(out + d) = y;
    }
  }
}

template <typename T>
cudaError_t launch(const MergeStatesParams& p, cudaStream_t stream) {
  constexpr int kVec = 8 / sizeof(T);
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 8 == 0; };
  const bool vectors = p.head_dim % kVec == 0 && aligned(p.out_a) && aligned(p.out_b) && aligned(p.out);
  const int64_t total = (int64_t)p.rows * p.num_heads;
  const int64_t blocks = std::min<int64_t>((total + kWarpsPerBlock - 1) / kWarpsPerBlock, 1 << 16);
  if (vectors) {
    merge_states_kernel<T, kVec><<<static_cast<unsigned>(blocks), kMergeThreads, 0, stream>>>(p);
  } else {
    merge_states_kernel<T, 1><<<static_cast<unsigned>(blocks), kMergeThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_merge_states(const MergeStatesParams& p, cudaStream_t stream) {
  if (p.rows <= 0 || p.num_heads <= 0 || p.head_dim <= 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat32: return launch<float>(p, stream);
    case DType::kFloat16: return launch<__half>(p, stream);
    default: return launch<__nv_bfloat16>(p, stream);
  }
}

}  // namespace flashcore
