// CPU implementations of the flashcore ops (torch-free). Arguments are validated by the binding layer first.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "../params.h"

namespace flashcore::cpu {

// The CPU kernels are split into independent work items so that the caller (the binding, through torch's thread
// pool) decides the parallelism; a kernel must not start threads of its own.

// How a paged_attention call is cut into work items (the plan decides: flashcore_hf/ops/plan.py).
//   tile kernel (decode = false): one item per (sequence, kv head, query tile). A query tile holds
//     paged_attention_query_block(p) query positions of every query head of the kv head (about
//     kPagedAttentionTileRows rows in all); the number of tiles per sequence comes from the host bound p.max_q_len
//     (tiles past a sequence's queries are empty items).
//   decode kernel (decode = true; every sequence's queries fit one query tile): one item per (sequence, key split)
//     holding every kv head, or per (sequence, key split, kv head) when each kv head has its own page list
//     (p.per_kv_head_rows). With key_splits > 1 every split writes partial rows normalised over its keys,
//     partial_out [key_splits, total_q, Hq, D] and partial_lse [key_splits, total_q, Hq] (float32), and
//     merge_key_splits combines them into p.out / p.lse.
struct CpuAttentionSchedule {
  bool decode = false;
  int32_t key_splits = 1;
  float* partial_out = nullptr;
  float* partial_lse = nullptr;
};
constexpr int kPagedAttentionTileRows = 64;
int paged_attention_query_block(const PagedAttentionParams& p);
inline int64_t paged_attention_work_items(const PagedAttentionParams& p, const CpuAttentionSchedule& sched) {
  if (sched.decode) return int64_t(p.batch) * sched.key_splits * (p.per_kv_head_rows ? p.num_kv_heads : 1);
  const int64_t block = paged_attention_query_block(p);
  return int64_t(p.batch) * p.num_kv_heads * ((int64_t(p.max_q_len) + block - 1) / block);
}
// Fills p.out [total_q, Hq, D] and p.lse [total_q, Hq] (or the split partials) for work items [begin, end).
void paged_attention(const PagedAttentionParams& p, const CpuAttentionSchedule& sched, int64_t begin, int64_t end);
// Decode kernel with key_splits > 1: p.out / p.lse rows [begin, end) of the total_q * Hq rows from the partials.
void merge_key_splits(const PagedAttentionParams& p, const CpuAttentionSchedule& sched, int64_t begin, int64_t end);
// The instruction set the paged_attention kernel dispatched to on this CPU: "avx512", "avx2" or "baseline".
const char* paged_attention_isa();

// Merged rows [begin, end) of the rows * num_heads (row, head) rows of a MergeStatesParams.
void merge_states(const MergeStatesParams& p, int64_t begin, int64_t end);

// Copies the p.k / p.v rows of tokens [begin, end) into their page slots.
void append_kv(const AppendKVParams& p, int64_t begin, int64_t end);

// Work items of select_pages: one per (sequence, kv head); fills their rows of p.out_cols / p.out_counts.
inline int64_t select_pages_work_items(const SelectPagesParams& p) { return int64_t(p.batch) * p.num_kv_heads; }
void select_pages(const SelectPagesParams& p, int64_t begin, int64_t end);
// Work items of select_top: one per row; fills its row of p.out_cols / p.out_counts.
inline int64_t select_top_work_items(const SelectTopParams& p) { return p.rows; }
void select_top(const SelectTopParams& p, int64_t begin, int64_t end);
// Work items of candidate_scores: one per (sequence, kv head); fills their rows of p.scores.
inline int64_t candidate_scores_work_items(const CandidateScoresParams& p) {
  return int64_t(p.batch) * p.num_kv_heads;
}
void candidate_scores(const CandidateScoresParams& p, int64_t begin, int64_t end);

// Applies a decode step's new keys to the page bounds (sequential: tokens are few, one per sequence).
void update_page_bounds(const UpdatePageBoundsParams& p);

struct PageLayoutHost {
  std::vector<int32_t> row_offsets, cols, token_counts, staging_ids;
};

// Returns an empty optional-like error message on success, else a description naming the offending argument.
// On success `out` holds the layout.
std::string build_layout(const BuildLayoutParams& p, PageLayoutHost& out);

}  // namespace flashcore::cpu
