// Launch helper shared by the per-dtype translation units of the prefill kernel (split so they compile in parallel).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "../../params.h"
#include "prefill_kernel.cuh"

namespace flashcore {
namespace prefill {

template <typename T, class Cfg, bool kSoftcap>
cudaError_t launch_tiles(const PagedAttentionParams& p, cudaStream_t stream) {
  static_assert(Cfg::kBlockM == kBlockM, "one query tile height for grid sizing");
  const int64_t tiles = query_tiles(p);
  if (tiles == 0 || p.batch == 0 || p.total_q == 0) return cudaSuccess;
  auto kernel = paged_prefill_kernel<T, Cfg, kSoftcap>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)Cfg::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid((unsigned)tiles, (unsigned)p.num_kv_heads, (unsigned)p.batch);  // see prefill::tile_work
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

// Tiles of 128 query rows x 64 keys at head dim 128 (O 128 + S 64 fp32 registers per thread, 255 registers, no
// spills, 2 CTAs/SM) and x 128 keys at head dim 64 (O 64 + S 128): the longer tile halves the per-tile barrier,
// page-slot and softmax bookkeeping, which weighs twice as much at D64 (measured 0.85x -> 0.96x of FA2).
// kSoftcap: the logit-softcapping variant (p.softcap > 0), instantiated in files of its own.
template <typename T, bool kSoftcap>
cudaError_t launch_for_head_dim(const PagedAttentionParams& p, cudaStream_t stream) {
  return p.head_dim == 128 ? launch_tiles<T, TileConfig<128, 64>, kSoftcap>(p, stream)
                           : launch_tiles<T, TileConfig<64, 128>, kSoftcap>(p, stream);
}

// One per dtype and softcap variant (prefill_{fp16,bf16}{,_softcap}.cu), so they build in parallel.
cudaError_t launch_prefill_fp16(const PagedAttentionParams& p, cudaStream_t stream);
cudaError_t launch_prefill_bf16(const PagedAttentionParams& p, cudaStream_t stream);
cudaError_t launch_prefill_fp16_softcap(const PagedAttentionParams& p, cudaStream_t stream);
cudaError_t launch_prefill_bf16_softcap(const PagedAttentionParams& p, cudaStream_t stream);

}  // namespace prefill
}  // namespace flashcore
