// Split-KV paged decode: the launch plan shared by the host dispatch (decode.cu) and the kernels (decode_kernel.cuh).
//
// One block handles (sequence b, kv head h, key split s, query-row chunk c): all group * n_q query rows of that kv
// head (grouped-query packing, so every K/V page is read from HBM once for the whole group), over the pages of split s.
// Rows are ordered query-major: row r = i * group + g is query i of head h * group + g. When a row's page list is
// split, each split writes its partial to the workspace and the last split of (b, h, c) to finish merges them (a
// counter per (b, h, c) in a plan's zeroed workspace tells which one is last), so a split decode is one kernel; with
// fresh scratch (no zeroed counters) a second kernel merges them.
#pragma once
#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "../../params.h"

namespace flashcore::decode {

constexpr int kThreads = 128;    // 4 warps per block
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarp = 16; // one m16 MMA tile of query rows per warp

// Depth of a block's K/V ring (cp.async tiles in flight), chosen per launch (make_decode_plan). A deeper
// ring (5 tiles, one block per SM) for grids of at most one block per SM, so that a sparse step's 4-tile splits
// issue all their loads at once, measured slower: 17 -> 19 us for 64 pages x 8 kv heads (H200, notes/sparse.md).
constexpr int kStagesShort = 2;    // every row fits one tile (many short rows, e.g. a cascade's suffixes): 3 blocks
                                   //   per SM instead of 2, a third fewer waves
constexpr int kStagesDefault = 3;  // 2 blocks per SM

// Blocks per SM a ring of `stages` tiles leaves room for (shared memory; registers under __launch_bounds__).
constexpr int blocks_per_sm(int stages) { return stages <= kStagesShort ? 3 : 2; }
constexpr int kBlocksPerSm = blocks_per_sm(kStagesDefault);  // of the default ring; sizes the split count

// Keys per pipeline tile: 16 KB of K plus 16 KB of V per stage whatever the head dim.
constexpr int tile_keys(int head_dim) { return 8192 / head_dim; }

// Fewest keys a split reads (4 tiles at head dim 128, 2 at 64): a split pays a fixed chain of latencies (page ids,
// K/V, partial store, counter, the last split's merge), so short rows take fewer, longer splits. 64 pages of 64 keys
// x 8 kv heads (a sparse decode step): 16 splits of 256 keys ran 16.9 / 17.1 us against 18.4 / 18.3 for 32 of 128
// (H200, graph replays).
constexpr int kMinSplitKeys = 256;

// Dynamic shared memory of the main kernel: K/V ring of `stages` tiles + per-tile row table (offsets and key
// positions, stages + 1 tiles).
constexpr size_t smem_bytes(int head_dim, int elem_bytes, int stages) {
  return size_t(stages) * 2 * tile_keys(head_dim) * head_dim * elem_bytes +
         size_t(stages + 1) * tile_keys(head_dim) * (sizeof(int64_t) + sizeof(int32_t));
}

struct DecodePlan {
  int group = 1;            // num_q_heads / num_kv_heads
  int warps_m = 1;          // warps across query rows (1, 2 or 4); the other 4 / warps_m split each key tile
  int row_chunks = 1;       // blocks per (sequence, kv head) along query rows (warps_m * 16 rows each)
  int max_row_chunks = 1;   // row chunks of the longest sequence (max_q_len queries): the split counters' stride
  int splits = 1;           // blocks per (sequence, kv head, row chunk) along the page list (from the plan)
  int stages = kStagesDefault;  // K/V ring depth: kStagesShort when every row fits one tile (warps_m 1 only)
  int min_pages_per_split = 1;  // a split reads at least this many pages (kMinSplitKeys): see row_partition
  bool need_pos = false;    // masks need key positions (causal with several queries, or a sliding window)
  // Workspace layout (bytes from the start): split counters and partials (only when splits > 1), then key positions.
  size_t counter_bytes = 0;     // int32 [batch, Hkv, max_row_chunks] at offset 0: splits of (b, h, c) done in this
                                //   run; zero when the workspace is new (zeroed by its owner) and again after every
                                //   run (the last split resets it)
  size_t part_out_offset = 0;   // float [splits, total_q, Hq, D]: normalised partial outputs
  size_t part_lse_offset = 0;   // float [splits, total_q, Hq]: natural-log partial LSE (-inf: no visible key);
                                //   partials never include the sink (the merge adds it once)
  size_t page_pos_offset = 0;   // int32 [nnz]: position of the first key of page entry j within its sequence
  size_t seq_len_offset = 0;    // int32 [layout rows]: n_k of each layout row
  size_t total_bytes = 0;
};

// The launch plan for `splits` split-KV blocks per (sequence, kv head, row chunk) (the attention plan's choice:
// decode_splits).
DecodePlan make_decode_plan(const PagedAttentionParams& p, int splits);

// Split-KV blocks per (sequence, kv head, row chunk) for rows of `pages` pages: as many as leave no resident block
// slot empty, each reading at least kMinSplitKeys keys; 1 when the (sequence, kv head, row chunk) blocks alone fill
// every SM.
int decode_splits(const PagedAttentionParams& p, int num_sms, int pages);

// Pages per split of a layout row of n_pages pages: the row uses `active` of the plan's splits (no more than leave
// every split min_pages pages), of pps pages each: split s reads pages [s * pps, min((s + 1) * pps, n_pages)).
// Shared by the main kernel and the merge kernel, so both agree on which splits ran.
__host__ __device__ inline void row_partition(int n_pages, int splits, int min_pages, int& active, int& pps) {
  if (n_pages <= 0) {
    active = 0;
    pps = 0;
    return;
  }
  const int most = (n_pages + min_pages - 1) / min_pages;
  active = splits < most ? splits : most;
  pps = (n_pages + active - 1) / active;
}

// Everything the device code needs, passed by value.
struct DecodeArgs {
  PagedAttentionParams p;
  int group, row_chunks, max_row_chunks, splits, min_pages_per_split;
  bool need_pos;
  int page_shift;      // log2(page_size) when it is a power of two, else -1
  float scale_log2;    // sm_scale * log2(e): scores live in the log2 domain inside the kernel
  int32_t* split_counters;  // [batch, Hkv, max_row_chunks] (splits > 1)
  float* part_out;
  float* part_lse;
  int32_t* page_pos;
  int32_t* seq_len;  // [layout rows]
  // Softcap (p.softcap > 0, the kSoftcap kernels only): log2-domain score = tanh(raw * cap_in) * cap_log2, with
  // cap_in = sm_scale / softcap and cap_log2 = softcap * log2(e). Last, so the fields above keep their offsets.
  float cap_in;
  float cap_log2;
};

#ifdef __CUDACC__
// Layout rows: one per sequence, or one per (sequence, kv head) when p.per_kv_head_rows (sparse per-head lists).
__host__ __device__ __forceinline__ int num_layout_rows(const PagedAttentionParams& p) {
  return p.per_kv_head_rows ? p.batch * p.num_kv_heads : p.batch;
}
__device__ __forceinline__ int layout_row(const PagedAttentionParams& p, int b, int kvh) {
  return p.per_kv_head_rows ? b * p.num_kv_heads + kvh : b;
}

// Page range of layout row r with the device-side guards of the contract: a malformed range is an empty one.
__device__ __forceinline__ void load_row_pages(const PagedAttentionParams& p, int r, int& page_begin, int& n_pages) {
  int r0 = p.row_offsets[r], r1 = p.row_offsets[r + 1];
  if (r0 < 0 || r1 < r0 || r1 > p.nnz) r0 = r1 = 0;
  page_begin = r0;
  n_pages = min(r1 - r0, p.max_pages_per_seq);
}

// Query and page bounds of sequence b as seen by kv head kvh.
struct SeqBounds {
  int q0, n_q, page_begin, n_pages;
};
__device__ __forceinline__ SeqBounds load_seq_bounds(const PagedAttentionParams& p, int b, int kvh) {
  SeqBounds s;
  int q0 = p.q_indptr[b], q1 = p.q_indptr[b + 1];
  if (q0 < 0 || q1 < q0 || q1 > p.total_q) q0 = q1 = 0;
  s.q0 = q0;
  s.n_q = min(q1 - q0, p.max_q_len);
  load_row_pages(p, layout_row(p, b, kvh), s.page_begin, s.n_pages);
  return s;
}

// Keys actually used from page entry j: 0 for a page id or count outside the contract.
__device__ __forceinline__ int effective_count(const PagedAttentionParams& p, int page, int count) {
  return (page >= 0 && page < p.num_pages && count >= 0 && count <= p.page_size) ? count : 0;
}

#endif  // __CUDACC__

// The kernel for one dtype / head dim, with (kSoftcap) or without logit softcapping; instantiated in
// decode_{bf16,fp16}.cu (kSoftcap false) and decode_{bf16,fp16}_softcap.cu (true), so each file builds what it did
// before the flag. stages: the plan's ring depth.
template <typename T, int D, bool kSoftcap>
cudaError_t launch_decode_typed(const DecodeArgs& args, int warps_m, int stages, cudaStream_t stream);

}  // namespace flashcore::decode
