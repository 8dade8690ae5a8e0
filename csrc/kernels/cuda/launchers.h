// Host entry points of the CUDA kernels (torch-free). The binding layer (csrc/bindings/ops_cuda.cpp) validates
// arguments, allocates outputs/workspace through torch, and calls these. None of them syncs or allocates, so every
// call is safe inside CUDA graph capture. Each returns cudaGetLastError() after its launches.
#pragma once
#include <cstddef>
#include <cuda_runtime_api.h>

#include "../params.h"

namespace flashcore {

// ---- decode (split-KV, few queries per sequence) -------------------------------------------------------------
// Queries per sequence up to which an exactly known batch takes the decode kernel (which covers any count; longer
// query runs are better served by the prefill kernels).
constexpr int kDecodeMaxQueriesPerSeq = 16;
// True when the decode kernel supports this dtype / head_dim / page_size (and, when set, 16-byte aligned pools and
// output; a plan made without pointers only checks the rest).
bool paged_decode_supported(const PagedAttentionParams& p);
// Split-KV blocks per (sequence, kv head) for layout rows of `pages` pages on a GPU of num_sms multiprocessors.
int paged_decode_splits(const PagedAttentionParams& p, int num_sms, int pages);
// Bytes of workspace the decode kernel needs with `splits` splits (split counters and partials, key positions; 0 if
// none).
size_t paged_decode_workspace_bytes(const PagedAttentionParams& p, int splits);
// Bytes at the start of that workspace holding the split counters (0 without splits). counters_zeroed: they are
// zero (a workspace zeroed once: every run leaves them zero), so the kernel merges the splits itself; false (fresh,
// uninitialised scratch): a second kernel merges them.
size_t paged_decode_counter_bytes(const PagedAttentionParams& p, int splits);
cudaError_t launch_paged_decode(const PagedAttentionParams& p, int splits, void* workspace, size_t workspace_bytes,
                                bool counters_zeroed, cudaStream_t stream);

// ---- prefill (tensor cores, many queries per sequence) -------------------------------------------------------
enum class PrefillKernel { kMma, kWgmma };
// True when a prefill kernel supports this configuration (pointers and strides are checked when set).
bool paged_prefill_supported(const PagedAttentionParams& p);
// Whether the Hopper wgmma kernel runs this call on a device of compute capability cc_major.cc_minor: head dim 128,
// one layout row per sequence, an sm_90a build, and FLASHCORE_PREFILL_KERNEL not "mma" (read at every plan).
bool paged_prefill_wgmma_applies(const PagedAttentionParams& p, int cc_major, int cc_minor);
cudaError_t launch_paged_prefill(const PagedAttentionParams& p, PrefillKernel kernel, cudaStream_t stream);

// ---- merge of attention states (cascade decode) --------------------------------------------------------------
cudaError_t launch_merge_states(const MergeStatesParams& p, cudaStream_t stream);

// ---- cache writes --------------------------------------------------------------------------------------------
cudaError_t launch_append_kv(const AppendKVParams& p, cudaStream_t stream);

// ---- sparse "topk" page selection (csrc/kernels/cuda/sparse/) -------------------------------------------------
// True when the selection kernels support these shapes, dtypes and alignments (head_dim % 4 == 0, <= 256, ...).
bool select_pages_supported(const SelectPagesParams& p);
// Scores pages into p.scores, then writes p.out_cols / p.out_counts.
cudaError_t launch_select_pages(const SelectPagesParams& p, cudaStream_t stream);
// True when the select kernel takes these rows (1 <= budget <= max_pages).
bool select_top_supported(const SelectTopParams& p);
// The budget best entries of each row of scores (the rerank stage's pick among its candidates; select_pages' second
// kernel): one radix-select block per row.
cudaError_t launch_select_top(const SelectTopParams& p, cudaStream_t stream);
// True when the candidate-score kernel supports these shapes and alignments (head_dim % 8 == 0, <= 256, ...).
bool candidate_scores_supported(const CandidateScoresParams& p);
// Writes p.scores (the exact scores of the rerank stage's candidate pages).
cudaError_t launch_candidate_scores(const CandidateScoresParams& p, cudaStream_t stream);
// append_kv (a) that also folds the new keys into their pages' bounds and sign bits (b: the same pool and slots).
cudaError_t launch_append_kv_with_bounds(const AppendKVParams& a, const UpdatePageBoundsParams& b,
                                         cudaStream_t stream);

// ---- linear layers of a few tokens (csrc/kernels/cuda/linear/) ----------------------------------------------------
// The device a grouped linear call runs on (the binding reads it from torch's cached properties).
struct GroupedLinearDevice {
  int num_sms = 0;
  int cc_major = 0;
  int cc_minor = 0;
};
// True when a kernel supports these shapes, dtypes and alignments (m <= kMaxRows, k % 8 == 0, 16-byte aligned x
// rows and weights, float16 / bfloat16) on some device.
bool grouped_linear_supported(const GroupedLinearParams& p);
// Whether a kernel takes this call on this device and is also the faster way (measured: see the definition);
// otherwise the binding runs torch's linear per weight.
bool grouped_linear_prefers_kernel(const GroupedLinearParams& p, const GroupedLinearDevice& device);
// 1-2 tokens: the GEMV (grid = the resident capacity of the device's multiprocessors); more: the tensor-core kernel
// (grouped_linear_wgmma.cu, sm_90a only).
cudaError_t launch_grouped_linear(const GroupedLinearParams& p, const GroupedLinearDevice& device, cudaStream_t stream);
// Whether this build has the sm_90a tensor-core kernel for this dtype and the driver can encode its TMA maps.
bool grouped_linear_wgmma_available(DType dtype);
cudaError_t launch_grouped_linear_wgmma(const GroupedLinearParams& p, cudaStream_t stream);

}  // namespace flashcore
