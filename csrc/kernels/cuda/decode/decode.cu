// Host side of the split-KV paged decode: support check, launch plan, workspace size, key-position pre-pass and
// dispatch to the per-dtype kernels (decode_{bf16,fp16}.cu, and decode_{bf16,fp16}_softcap.cu when p.softcap > 0).
// No host sync, no allocation.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../common/ptx.cuh"
#include "../launchers.h"
#include "decode_common.cuh"

namespace flashcore {
namespace decode {
namespace {

constexpr int kPosThreads = 256;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Key positions for the masks: page_pos[j] = keys of the row before page entry j, seq_len[r] = n_k of layout row r.
// One block per layout row; a block-wide exclusive scan over the effective token counts, 256 pages at a time.
__global__ void __launch_bounds__(kPosThreads) key_positions_kernel(const PagedAttentionParams p, int32_t* page_pos,
                                                                    int32_t* seq_len) {
  __shared__ int warp_sums[kPosThreads / 32];
  const int r = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  SeqBounds sb;
  load_row_pages(p, r, sb.page_begin, sb.n_pages);
  int carry = 0;
  for (int base = 0; base < sb.n_pages; base += kPosThreads) {
    const int l = base + tid;
    const int j = sb.page_begin + l;
    const int c = l < sb.n_pages ? effective_count(p, p.cols[j], p.token_counts[j]) : 0;
    int x = c;  // inclusive scan within the warp
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, x, off);
      if (lane >= off) x += y;
    }
    if (lane == 31) warp_sums[warp] = x;
    __syncthreads();
    if (warp == 0) {
      int w = lane < kPosThreads / 32 ? warp_sums[lane] : 0;
#pragma unroll
      for (int off = 1; off < kPosThreads / 32; off <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, w, off);
        if (lane >= off) w += y;
      }
      if (lane < kPosThreads / 32) warp_sums[lane] = w;
    }
    __syncthreads();
    if (l < sb.n_pages) page_pos[j] = carry + x - c + (warp > 0 ? warp_sums[warp - 1] : 0);
    carry += warp_sums[kPosThreads / 32 - 1];
    __syncthreads();
  }
  if (tid == 0) seq_len[r] = carry;
}

// The kernels of one dtype (head dim and softcap picked here).
template <typename T>
cudaError_t launch_kernel(const DecodeArgs& a, const DecodePlan& plan, cudaStream_t stream) {
  const bool d64 = a.p.head_dim == 64;
  const int w = plan.warps_m, st = plan.stages;
  return a.p.softcap > 0.f ? (d64 ? launch_decode_typed<T, 64, true>(a, w, st, stream)
                                  : launch_decode_typed<T, 128, true>(a, w, st, stream))
                           : (d64 ? launch_decode_typed<T, 64, false>(a, w, st, stream)
                                  : launch_decode_typed<T, 128, false>(a, w, st, stream));
}

}  // namespace

// Query rows of a typical sequence: the average queries per sequence, at most max_q_len (uniform batches: exactly
// max_q_len), times the group. A plan whose max_q_len is only a bound from the shapes thus gets the warp layout and
// grid of the batch it really is (one query per sequence for decode), not of the bound.
int64_t typical_rows(const PagedAttentionParams& p, int group) {
  const int64_t avg_q = p.batch > 0 ? ceil_div(p.total_q, p.batch) : 1;
  return std::max<int64_t>(std::min<int64_t>(std::max(p.max_q_len, 1), std::max<int64_t>(avg_q, 1)), 1) * group;
}

int decode_splits(const PagedAttentionParams& p, int num_sms, int pages) {
  const DecodePlan shape = make_decode_plan(p, 1);
  const int64_t base_blocks = (int64_t)p.batch * p.num_kv_heads * shape.row_chunks;
  const int64_t slots = (int64_t)std::max(num_sms, 1) * kBlocksPerSm;
  if (pages <= 1 || base_blocks <= 0 || base_blocks >= slots) return 1;
  const int64_t want = slots / base_blocks;
  const int64_t pps = std::max<int64_t>(ceil_div(pages, want), shape.min_pages_per_split);
  return static_cast<int>(ceil_div(pages, pps));
}

DecodePlan make_decode_plan(const PagedAttentionParams& p, int splits) {
  DecodePlan plan;
  plan.group = p.num_q_heads / p.num_kv_heads;
  // Blocks of the grid cover the typical sequence's rows; a longer one loops over its extra row chunks (kernel).
  const int64_t rows = typical_rows(p, plan.group);
  plan.warps_m = rows <= 16 ? 1 : rows <= 32 ? 2 : 4;
  // The short ring when no row has more keys than one tile, for one m-tile of rows per block (warps_m 1: its
  // registers allow 3 blocks per SM).
  const bool one_tile = (int64_t)p.max_pages_per_seq * p.page_size <= tile_keys(p.head_dim);
  plan.stages = plan.warps_m == 1 && one_tile ? kStagesShort : kStagesDefault;
  plan.row_chunks = static_cast<int>(ceil_div(rows, kRowsPerWarp * plan.warps_m));
  plan.max_row_chunks =
      static_cast<int>(std::max<int64_t>(1, ceil_div((int64_t)std::max(p.max_q_len, 1) * plan.group,
                                                     kRowsPerWarp * plan.warps_m)));
  plan.need_pos = p.window > 0 || (p.causal && p.max_q_len > 1);
  plan.splits = std::max(splits, 1);
  plan.min_pages_per_split = static_cast<int>(std::max<int64_t>(1, ceil_div(kMinSplitKeys, p.page_size)));

  size_t offset = 0;
  auto take = [&offset](size_t bytes) {
    const size_t at = offset;
    offset += (bytes + 255) / 256 * 256;
    return at;
  };
  if (plan.splits > 1) {
    take((size_t)p.batch * p.num_kv_heads * plan.max_row_chunks * sizeof(int32_t));  // counters, at offset 0
    plan.counter_bytes = offset;
    const size_t rows_total = (size_t)plan.splits * p.total_q * p.num_q_heads;
    plan.part_out_offset = take(rows_total * p.head_dim * sizeof(float));
    plan.part_lse_offset = take(rows_total * sizeof(float));
  }
  if (plan.need_pos) {
    plan.page_pos_offset = take((size_t)p.nnz * sizeof(int32_t));
    plan.seq_len_offset = take((size_t)num_layout_rows(p) * sizeof(int32_t));
  }
  plan.total_bytes = offset;
  return plan;
}

}  // namespace decode

bool paged_decode_supported(const PagedAttentionParams& p) {
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16) return false;
  if (p.head_dim != 64 && p.head_dim != 128) return false;
  if (p.page_size < 1 || p.num_kv_heads < 1 || p.num_q_heads < 1 || p.num_q_heads % p.num_kv_heads != 0) return false;
  if ((int64_t)p.max_pages_per_seq * p.page_size > INT32_MAX) return false;  // slot indices are int32
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  return aligned(p.k_cache) && aligned(p.v_cache) && aligned(p.out);  // 16-byte cp.async / stores
}

int paged_decode_splits(const PagedAttentionParams& p, int num_sms, int pages) {
  return decode::decode_splits(p, num_sms, pages);
}

size_t paged_decode_workspace_bytes(const PagedAttentionParams& p, int splits) {
  return decode::make_decode_plan(p, splits).total_bytes;
}

size_t paged_decode_counter_bytes(const PagedAttentionParams& p, int splits) {
  return decode::make_decode_plan(p, splits).counter_bytes;
}

cudaError_t launch_paged_decode(const PagedAttentionParams& p, int splits, void* workspace, size_t workspace_bytes,
                                bool counters_zeroed, cudaStream_t stream) {
  using namespace decode;
  if (!paged_decode_supported(p)) return cudaErrorInvalidValue;
  if (p.batch <= 0 || p.total_q <= 0 || p.max_q_len <= 0) return cudaSuccess;  // no query row to write
  const DecodePlan plan = make_decode_plan(p, splits);
  if (workspace_bytes < plan.total_bytes || (plan.total_bytes > 0 && workspace == nullptr)) {
    return cudaErrorInvalidValue;
  }
  char* ws = static_cast<char*>(workspace);
  DecodeArgs a;
  a.p = p;
  a.group = plan.group;
  a.row_chunks = plan.row_chunks;
  a.max_row_chunks = plan.max_row_chunks;
  a.splits = plan.splits;
  a.min_pages_per_split = plan.min_pages_per_split;
  a.need_pos = plan.need_pos;
  a.page_shift = (p.page_size & (p.page_size - 1)) == 0 ? __builtin_ctz(static_cast<unsigned>(p.page_size)) : -1;
  a.scale_log2 = p.sm_scale * kLog2e;
  a.cap_in = p.softcap > 0.f ? p.sm_scale / p.softcap : 0.f;
  a.cap_log2 = p.softcap > 0.f ? p.softcap * kLog2e : 0.f;
  a.split_counters = plan.splits > 1 && counters_zeroed ? reinterpret_cast<int32_t*>(ws) : nullptr;
  a.part_out = plan.splits > 1 ? reinterpret_cast<float*>(ws + plan.part_out_offset) : nullptr;
  a.part_lse = plan.splits > 1 ? reinterpret_cast<float*>(ws + plan.part_lse_offset) : nullptr;
  a.page_pos = plan.need_pos ? reinterpret_cast<int32_t*>(ws + plan.page_pos_offset) : nullptr;
  a.seq_len = plan.need_pos ? reinterpret_cast<int32_t*>(ws + plan.seq_len_offset) : nullptr;

  if (plan.need_pos) {
    key_positions_kernel<<<num_layout_rows(p), kPosThreads, 0, stream>>>(p, a.page_pos, a.seq_len);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const cudaError_t err = p.dtype == DType::kBFloat16 ? launch_kernel<__nv_bfloat16>(a, plan, stream)
                                                      : launch_kernel<__half>(a, plan, stream);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

}  // namespace flashcore
