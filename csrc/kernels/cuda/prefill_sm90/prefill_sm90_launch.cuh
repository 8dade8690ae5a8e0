// Launch helper shared by the per-dtype translation units of the sm_90a prefill kernel.
#pragma once
#include <cuda_runtime_api.h>

#include "../common/fast_divmod.cuh"
#include "../common/page_walk.cuh"
#include "../common/sm90a_body.cuh"
#include "kv_tensor_maps.h"
#include "prefill_sm90.h"
#include "prefill_sm90_kernel.cuh"

namespace flashcore {
namespace prefill_sm90 {

// Grid (query tile of Layout::kBlockM (query, head) rows, KV head, sequence; order: prefill::tile_work),
// Layout::kThreads threads; tiles past a sequence's real length exit at once. No host sync, no allocation; the TMA
// maps over the pools are encoded on the host per call (a few microseconds) and passed by value, so a captured launch
// keeps its own.
template <typename T, bool kSoftcap, int kHeadDim>
cudaError_t launch_head_dim(const PagedAttentionParams& p, cudaStream_t stream) {
  if (!sm90a_body_built<prefill_sm90_kernel<T, kSoftcap, kHeadDim>>()) return cudaErrorNotSupported;
  using L = Layout<kHeadDim>;
  const int64_t tiles = prefill::query_tiles(p, L::kBlockM);
  if (tiles == 0 || p.batch == 0 || p.total_q == 0) return cudaSuccess;
  auto kernel = prefill_sm90_kernel<T, kSoftcap, kHeadDim>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)L::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid((unsigned)tiles, (unsigned)p.num_kv_heads, (unsigned)p.batch);  // see prefill::tile_work
  kernel<<<grid, L::kThreads, L::kSmemBytes, stream>>>(p, encode_kv_tensor_maps(p),
                                                      FastDivmod::of(p.num_q_heads / p.num_kv_heads));
  return cudaGetLastError();
}

// kSoftcap: the logit-softcapping variant (p.softcap > 0); head dim 64 or 128 (supports()).
template <typename T, bool kSoftcap>
cudaError_t launch(const PagedAttentionParams& p, cudaStream_t stream) {
  return p.head_dim == 64 ? launch_head_dim<T, kSoftcap, 64>(p, stream) : launch_head_dim<T, kSoftcap, 128>(p, stream);
}

}  // namespace prefill_sm90
}  // namespace flashcore
