// Host entry points of the CUDA kernels (torch-free). The binding layer (csrc/bindings/ops_cuda.cpp) validates
// arguments, allocates outputs/workspace through torch, and calls these. None of them syncs or allocates, so every
// call is safe inside CUDA graph capture. Each returns cudaGetLastError() after its launches.
#pragma once
#include <cstddef>
#include <cuda_runtime_api.h>

#include "../params.h"

namespace flashcore {

// ---- decode (split-KV, few queries per sequence) -------------------------------------------------------------
// Largest n_q per sequence the decode kernel handles; the binding routes longer query runs to the prefill kernel.
constexpr int kDecodeMaxQueriesPerSeq = 16;
// True when the decode kernel supports this dtype / head_dim / page_size.
bool paged_decode_supported(const PagedAttentionParams& p);
// Bytes of float32 workspace the decode kernel needs for its split partials (0 if it needs none).
size_t paged_decode_workspace_bytes(const PagedAttentionParams& p, int num_sms);
cudaError_t launch_paged_decode(const PagedAttentionParams& p, void* workspace, size_t workspace_bytes, int num_sms,
                                cudaStream_t stream);

// ---- prefill (tensor cores, many queries per sequence) -------------------------------------------------------
bool paged_prefill_supported(const PagedAttentionParams& p);
cudaError_t launch_paged_prefill(const PagedAttentionParams& p, cudaStream_t stream);

// ---- cache writes --------------------------------------------------------------------------------------------
cudaError_t launch_append_kv(const AppendKVParams& p, cudaStream_t stream);

// ---- sparse "topk" page selection (csrc/kernels/cuda/sparse/) -------------------------------------------------
// True when the selection kernels support these shapes, dtypes and alignments (head_dim % 4 == 0, <= 256, ...).
bool select_pages_supported(const SelectPagesParams& p);
// Scores pages into p.scores, then writes p.out_cols / p.out_counts.
cudaError_t launch_select_pages(const SelectPagesParams& p, cudaStream_t stream);
cudaError_t launch_update_page_bounds(const UpdatePageBoundsParams& p, cudaStream_t stream);

}  // namespace flashcore
