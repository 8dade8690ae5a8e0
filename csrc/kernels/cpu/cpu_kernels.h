// CPU implementations of the flashcore ops (torch-free). Arguments are validated by the binding layer first.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "../params.h"

namespace flashcore::cpu {

// The CPU kernels are split into independent work items so that the caller (the binding, through torch's thread
// pool) decides the parallelism; a kernel must not start threads of its own.

// Work items of paged_attention: one per (sequence, kv head, query tile). A query tile holds
// paged_attention_query_block(p) query positions of every query head of the kv head (about kPagedAttentionTileRows
// rows in all); the number of tiles per sequence comes from the host bound p.max_q_len (tiles past a sequence's
// queries are empty items).
constexpr int kPagedAttentionTileRows = 64;
int paged_attention_query_block(const PagedAttentionParams& p);
inline int64_t paged_attention_work_items(const PagedAttentionParams& p) {
  const int64_t block = paged_attention_query_block(p);
  return int64_t(p.batch) * p.num_kv_heads * ((int64_t(p.max_q_len) + block - 1) / block);
}
// Fills p.out [total_q, Hq, D] and p.lse [total_q, Hq] for work items [begin, end).
void paged_attention(const PagedAttentionParams& p, int64_t begin, int64_t end);
// The instruction set the paged_attention kernel dispatched to on this CPU: "avx512", "avx2" or "baseline".
const char* paged_attention_isa();

// Copies the p.k / p.v rows of tokens [begin, end) into their page slots.
void append_kv(const AppendKVParams& p, int64_t begin, int64_t end);

// Work items of select_pages: one per (sequence, kv head); fills their rows of p.out_cols / p.out_counts.
inline int64_t select_pages_work_items(const SelectPagesParams& p) { return int64_t(p.batch) * p.num_kv_heads; }
void select_pages(const SelectPagesParams& p, int64_t begin, int64_t end);

// Applies a decode step's new keys to the page bounds (sequential: tokens are few, one per sequence).
void update_page_bounds(const UpdatePageBoundsParams& p);

struct PageLayoutHost {
  std::vector<int32_t> row_offsets, cols, token_counts, staging_ids;
};

// Returns an empty optional-like error message on success, else a description naming the offending argument.
// On success `out` holds the layout.
std::string build_layout(const BuildLayoutParams& p, PageLayoutHost& out);

}  // namespace flashcore::cpu
