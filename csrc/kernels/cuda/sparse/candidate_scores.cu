// Exact scores of the rerank stage's candidate pages (contract: CandidateScoresParams in params.h): grid
// (candidate chunks, batch * Hkv), a warp per candidate page. The block stages the kv head's query heads in shared
// memory (fp32, kHeadsPerPass at a time); in the warp, 8 lanes share a key (each holding every 8th group of 4 dims),
// 4 keys per pass over the page, and the loads of several passes (kPassesInFlight: 16 keys at head dim 128,
// 16-bit) are issued before the first use; the 8 lanes' partial dots are summed with 3 shuffles per head, and the
// page's score is the warp's max over keys and heads.
// Replaces a gather of the candidates' keys into a [B, Hkv, C, P, D] copy and an einsum (torch ops: ~290 us per
// layer at 128K context, 256 candidates of 64 tokens, H200).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../launchers.h"
#include "../common/convert.cuh"
#include "../common/pdl.cuh"

namespace flashcore {
namespace {

constexpr int kWarps = 4;            // warps per block, one candidate page each
constexpr int kLanesPerKey = 8;      // lanes sharing one key's dims
constexpr int kKeysPerPass = 32 / kLanesPerKey;
constexpr int kDimsPerLoad = 4;
constexpr int kMaxHeadDim = 256;
constexpr int kMaxQuads = kMaxHeadDim / kDimsPerLoad / kLanesPerKey;  // groups of 4 dims a lane holds (8)
constexpr int kHeadsPerPass = 8;     // query heads staged in shared memory per pass over the page's keys

template <typename T>
using Quad = std::conditional_t<sizeof(T) == 4, float4, uint2>;

template <typename T>
__device__ __forceinline__ float4 quad_to_float4(const Quad<T>& raw) {
  if constexpr (sizeof(T) == 4) {
    return raw;
  } else {
    const T* e = reinterpret_cast<const T*>(&raw);
    return make_float4(to_float(e[0]), to_float(e[1]), to_float(e[2]), to_float(e[3]));
  }
}

// Passes over a page whose loads are issued together: up to 4, within 32 registers of raw key data per lane (one
// pass at a time left each warp 1 KB in flight at head dim 128: a memory latency per 4 keys).
template <typename T, int kQuads>
constexpr int kPassesInFlight() {
  constexpr int registers_per_pass = kQuads * int(sizeof(Quad<T>)) / 4;
  constexpr int fit = 32 / registers_per_pass;
  return fit < 1 ? 1 : fit > 4 ? 4 : fit;
}

template <typename T, int kQuads>
__global__ void __launch_bounds__(kWarps * 32) candidate_scores_kernel(const CandidateScoresParams p) {
  __shared__ float4 q_pass[kHeadsPerPass * kMaxHeadDim / kDimsPerLoad];  // [head][quad] of the pass's heads
  grid_dependency_wait();
  allow_dependent_launch();
  const int row = blockIdx.y;  // b * Hkv + h
  const int b = row / p.num_kv_heads, h = row % p.num_kv_heads;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int key_lane = lane % kLanesPerKey, key_slot = lane / kLanesPerKey;
  const int d = p.head_dim, quads = d / kDimsPerLoad, group = p.num_q_heads / p.num_kv_heads;
  const int query_heads = p.query_len * group;
  const int c = blockIdx.x * kWarps + warp;
  const int64_t entry = (int64_t)row * p.candidates + c;
  const int page = c < p.candidates ? p.cols[entry] : -1;
  const int keys = c < p.candidates ? min(p.counts[entry], p.page_size) : 0;
  const bool valid = keys > 0 && page >= 0 && page < p.num_pages;  // warp-uniform
  bool forced = false;
  for (int f = 0; valid && f < p.num_forced; ++f) forced |= p.forced[(int64_t)b * p.num_forced + f] == page;
  const bool scan = valid && !forced;

  const T* q = static_cast<const T*>(p.q);
  const int64_t token_stride = (int64_t)p.num_kv_heads * d;
  const T* page_keys = static_cast<const T*>(p.k_cache) + (int64_t)(scan ? page : 0) * p.page_size * token_stride +
                       (int64_t)h * d;
  float best = -INFINITY;
  for (int first_head = 0; first_head < query_heads; first_head += kHeadsPerPass) {
    const int heads = min(kHeadsPerPass, query_heads - first_head);
    __syncthreads();  // the previous pass is done with q_pass
    for (int i = threadIdx.x; i < heads * quads; i += kWarps * 32) {
      const int qh = first_head + i / quads;  // (query qh / group, head-in-group qh % group)
      const int64_t offset = ((int64_t)b * p.query_len + qh / group) * p.q_stride_token +
                             (int64_t)(h * group + qh % group) * p.q_stride_head + (i % quads) * kDimsPerLoad;
      q_pass[(i / quads) * (kMaxHeadDim / kDimsPerLoad) + i % quads] =
          make_float4(to_float(q[offset]), to_float(q[offset + 1]), to_float(q[offset + 2]), to_float(q[offset + 3]));
    }
    __syncthreads();
    if (!scan) continue;
    constexpr int kPasses = kPassesInFlight<T, kQuads>();
    for (int t0 = 0; t0 < keys; t0 += kKeysPerPass * kPasses) {
      // Every load of this lane's share of kPasses keys before the first use (one memory latency per kPasses
      // passes); lanes past the head dim or the page's keys hold zeros (their dots are dropped below).
      Quad<T> raw[kPasses][kQuads];
#pragma unroll
      for (int u = 0; u < kPasses; ++u) {
        const int t = t0 + u * kKeysPerPass + key_slot;
#pragma unroll
        for (int i = 0; i < kQuads; ++i) {
          const int quad = key_lane + i * kLanesPerKey;
          raw[u][i] = Quad<T>{};
          if (t < keys && quad < quads)
            raw[u][i] = *reinterpret_cast<const Quad<T>*>(page_keys + (int64_t)t * token_stride + quad * kDimsPerLoad);
        }
      }
#pragma unroll
      for (int u = 0; u < kPasses; ++u) {
        const int t = t0 + u * kKeysPerPass + key_slot;
        if (t0 + u * kKeysPerPass >= keys) break;  // warp-uniform: no key of this pass is on the page
        float4 k[kQuads];
#pragma unroll
        for (int i = 0; i < kQuads; ++i) k[i] = quad_to_float4<T>(raw[u][i]);
#pragma unroll
        for (int g = 0; g < kHeadsPerPass; ++g) {
          if (g < heads) {  // block-uniform
            float dot = 0.f;
#pragma unroll
            for (int i = 0; i < kQuads; ++i) {
              const int quad = key_lane + i * kLanesPerKey;
              if (quad < quads) {
                const float4 qv = q_pass[g * (kMaxHeadDim / kDimsPerLoad) + quad];
                dot += qv.x * k[i].x + qv.y * k[i].y + qv.z * k[i].z + qv.w * k[i].w;
              }
            }
#pragma unroll
            for (int s = kLanesPerKey / 2; s >= 1; s >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, s);
            if (t < keys) best = fmaxf(best, dot);
          }
        }
      }
    }
  }
#pragma unroll
  for (int s = 16; s >= 1; s >>= 1) best = fmaxf(best, __shfl_xor_sync(0xffffffffu, best, s));
  if (lane == 0 && c < p.candidates) p.scores[entry] = !valid ? -INFINITY : forced ? INFINITY : best;
}

template <typename T>
cudaError_t launch_for(const CandidateScoresParams& p, cudaStream_t stream) {
  const dim3 grid((p.candidates + kWarps - 1) / kWarps, p.batch * p.num_kv_heads);
  // Registers for the key quads a lane holds: a quarter as many up to head dim 64, half up to 128.
  constexpr int kQuadsAt64 = 64 / kDimsPerLoad / kLanesPerKey, kQuadsAt128 = 128 / kDimsPerLoad / kLanesPerKey;
  const auto kernel = p.head_dim <= 64    ? candidate_scores_kernel<T, kQuadsAt64>
                      : p.head_dim <= 128 ? candidate_scores_kernel<T, kQuadsAt128>
                                          : candidate_scores_kernel<T, kMaxQuads>;
  return launch_pdl(kernel, grid, dim3(kWarps * 32), 0, stream, p);
}

}  // namespace

bool candidate_scores_supported(const CandidateScoresParams& p) {
  const int bytes = p.dtype == DType::kFloat32 ? 4 : 2;
  return p.head_dim % kDimsPerLoad == 0 && p.head_dim <= kMaxHeadDim &&
         reinterpret_cast<uintptr_t>(p.k_cache) % (kDimsPerLoad * bytes) == 0 &&
         p.batch * (int64_t)p.num_kv_heads <= 65535;
}

cudaError_t launch_candidate_scores(const CandidateScoresParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.num_kv_heads == 0 || p.candidates == 0) return cudaSuccess;
  if (!candidate_scores_supported(p)) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kFloat32: return launch_for<float>(p, stream);
    case DType::kFloat16: return launch_for<__half>(p, stream);
    default: return launch_for<__nv_bfloat16>(p, stream);
  }
}

}  // namespace flashcore
