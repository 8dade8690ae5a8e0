// Host entry points of the Hopper (sm_90a) prefill kernel; the dispatcher is ../prefill/paged_prefill.cu.
#pragma once
#include <cuda_runtime_api.h>

#include "../../params.h"

namespace flashcore {
namespace prefill_sm90 {

// Shapes the wgmma kernel handles (the caller has already checked paged_prefill_supported): fp16/bf16, head dim
// 64 or 128, one layout row per sequence. The device must be compute capability 9.0 (checked by the dispatcher).
inline bool supports(const PagedAttentionParams& p) {
  return (p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16) && (p.head_dim == 64 || p.head_dim == 128) && !p.per_kv_head_rows;
}

// Launches the kernel; cudaErrorNotSupported (before launching anything) when this build holds no sm_90a code for it.
// The _softcap variants (p.softcap > 0) are instantiated in files of their own (prefill_sm90_{fp16,bf16}_softcap.cu).
cudaError_t launch_fp16(const PagedAttentionParams& p, cudaStream_t stream);
cudaError_t launch_bf16(const PagedAttentionParams& p, cudaStream_t stream);
cudaError_t launch_fp16_softcap(const PagedAttentionParams& p, cudaStream_t stream);
cudaError_t launch_bf16_softcap(const PagedAttentionParams& p, cudaStream_t stream);

}  // namespace prefill_sm90
}  // namespace flashcore
