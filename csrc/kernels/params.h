// Plain parameter structs shared by the binding layer and every kernel (CPU and CUDA).
// Torch-free on purpose: kernel translation units include only this header, so they compile fast and in parallel.
// All argument checking happens in the binding layer (csrc/bindings/); kernels trust these fields, but still never
// read or write outside the buffers they describe (page ids and counts are bounds-guarded on the device).
#pragma once
#include <cstdint>

namespace flashcore {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// One paged-attention call over a packed (varlen) batch.
//
// Shapes (elements, row-major):
//   q            [total_q, num_q_heads, head_dim]        strides q_stride_token / q_stride_head, last dim contiguous
//   k_cache      [num_pages, page_size, num_kv_heads, head_dim]  contiguous (same for v_cache)
//   out          [total_q, num_q_heads, head_dim]        contiguous, same dtype as q
//   lse          [total_q, num_q_heads] float32          natural-log sum-exp of the scaled scores; -inf for rows that
//                                                        see no key (their out row is zero). Always written.
//   row_offsets  [rows + 1] int32    layout row r reads pages cols[row_offsets[r] : row_offsets[r+1]], where
//                                    rows = batch (row b serves every head of sequence b) or, when
//                                    per_kv_head_rows, rows = batch * num_kv_heads (row b * num_kv_heads + h serves
//                                    kv head h of sequence b and its query heads: sparse per-head page selection)
//   cols         [nnz] int32          physical page ids
//   token_counts [nnz] int32          keys used from the start of page cols[j]
//   q_indptr     [batch + 1] int32   sequence b's queries are q[q_indptr[b] : q_indptr[b+1]]
// Positions: with n_k keys and n_q queries in a sequence, key i sits at position i and query i at n_k - n_q + i.
// causal: key visible iff key_pos <= query_pos; window > 0: also query_pos - key_pos < window.
// Scores: s = sm_scale * q.k; with softcap > 0, s becomes softcap * tanh(s / softcap) (Gemma 2/3 logit softcapping)
// before the softmax. sinks (GPT-OSS): a per-query-head logit that joins every row's softmax denominator and
// contributes no value: out = sum_k exp(s_k) v_k / (sum_k exp(s_k) + exp(sink)); lse includes exp(sink), so a row
// that sees no key gives zeros and lse = sink.
struct PagedAttentionParams {
  const void* q = nullptr;
  const void* k_cache = nullptr;
  const void* v_cache = nullptr;
  void* out = nullptr;
  float* lse = nullptr;
  const int32_t* row_offsets = nullptr;
  const int32_t* cols = nullptr;
  const int32_t* token_counts = nullptr;
  const int32_t* q_indptr = nullptr;

  int64_t q_stride_token = 0;  // elements between consecutive tokens of q
  int64_t q_stride_head = 0;   // elements between consecutive heads of q

  int32_t batch = 0;
  int32_t total_q = 0;
  int32_t num_q_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t page_size = 0;
  int32_t num_pages = 0;
  int32_t nnz = 0;  // length of cols / token_counts
  bool per_kv_head_rows = false;  // see row_offsets above

  bool causal = true;
  int32_t window = 0;  // <= 0: no sliding window
  float sm_scale = 1.0f;
  float softcap = 0.0f;            // <= 0: no softcapping
  const float* sinks = nullptr;    // [num_q_heads] float32 sink logits, or nullptr (none)
  DType dtype = DType::kFloat16;

  // Host-known upper bounds used for grid sizing without a device sync. Kernels must stay correct when the real
  // values are smaller (blocks with no work exit early); the binding layer guarantees they are >= the real values.
  int32_t max_q_len = 0;          // >= max_b (q_indptr[b+1] - q_indptr[b])
  int32_t max_pages_per_seq = 0;  // >= max over layout rows r of (row_offsets[r+1] - row_offsets[r])
};

// Attention over disjoint key sets merged into attention over all of them (cascade decode: a group's shared pages,
// read in a_splits key ranges, and each row's own pages). Row t (of rows) and head h, with a = a_row(t):
//   out[t, h] = (sum_s w_s * out_a[s, a, h] + w_b * out_b[t, h]) / (sum_s w_s + w_b + exp(sink_h - m)),
//   w_x = exp(lse_x - m), m = the largest of lse_a[s, a, h], lse_b[t, h], sink_h; a_row(t) = a_rows ? a_rows[t] : t
// (an a_row outside [0, rows_a) contributes nothing); all float32 math. Rows with no key and no sink give zeros.
//   out_a [a_splits, rows_a, num_heads, head_dim], out_b / out [rows, num_heads, head_dim] (dtype, contiguous)
//   lse_a [a_splits, rows_a, num_heads], lse_b [rows, num_heads] float32; sinks [num_heads] float32 or nullptr
struct MergeStatesParams {
  const void* out_a = nullptr;
  const float* lse_a = nullptr;
  const void* out_b = nullptr;
  const float* lse_b = nullptr;
  const float* sinks = nullptr;
  const int32_t* a_rows = nullptr;
  void* out = nullptr;
  int32_t a_splits = 1;
  int32_t rows_a = 0;
  int32_t rows = 0;
  int32_t num_heads = 0;
  int32_t head_dim = 0;
  DType dtype = DType::kBFloat16;
};

// Write new tokens' K/V into page slots: cache[slot / page_size, slot % page_size] = k[t]; slot < 0 means skip
// (padding token). k, v: [num_tokens, num_kv_heads, head_dim] with strides; caches contiguous as above.
struct AppendKVParams {
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* slot_mapping = nullptr;  // [num_tokens], int32 or int64 (slot_is_int64)
  bool slot_is_int64 = false;
  int64_t k_stride_token = 0, k_stride_head = 0;
  int64_t v_stride_token = 0, v_stride_head = 0;
  int32_t num_tokens = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t page_size = 0;
  int32_t num_pages = 0;
  DType dtype = DType::kFloat16;
};

// Inputs and outputs of build_layout (host memory). See flashcore_hf/ops.py for the contract.
struct BuildLayoutParams {
  const int32_t* token_to_page = nullptr;  // [num_tokens]
  const int32_t* seq_starts = nullptr;     // [batch]
  const int32_t* seq_ends = nullptr;       // [batch]
  const bool* page_resident = nullptr;     // [num_pages]
  int32_t num_tokens = 0;
  int32_t batch = 0;
  int32_t page_tokens = 0;
  int32_t num_pages = 0;
};

// Sparse "topk" page selection for one decode step of one layer: score every page of every (sequence, kv head),
// by an upper bound of q.k over the page (Quest) or, with key signs, by its best key's estimate; then keep the
// `budget` best.
//
//   q            [batch * query_len, num_q_heads, head_dim]  strides q_stride_token / q_stride_head, last dim contiguous
//   bounds       [num_bound_rows, num_kv_heads, 2 * head_dim] contiguous, bounds_dtype (float32 or bfloat16): row
//                `page` holds that page's element-wise key max ([..., :D]) and min ([..., D:])
//   table_pages  [batch, max_pages] int32   sequence b's j-th page (entries past its end repeat a valid page)
//   table_counts [batch, max_pages] int32   valid tokens on it (0 past the end)
//   table_bias   [batch, max_pages] float32 +inf: always keep (sinks, recent pages); -inf: never (past the end)
//   scores       [batch * num_kv_heads, max_pages] float32 workspace (the score pass writes, the select pass reads)
//   out_cols, out_counts [batch, num_kv_heads, budget] int32
//   signs        [num_bound_rows, num_kv_heads, page_size, sign_bytes = ceil(head_dim / 8)] uint8 or null: bit b
//                of byte c of [page, h, t] is (key t of the page, kv head h, channel 8 c + b) > 0
// score(b, h, j) = bias + reduce over the query_len * (Hq / Hkv) query heads g of kv head h of
//   without signs: sum_d relu(q_g[d]) * max[d] + min(q_g[d], 0) * min[d];
//   with signs: the largest over the page's first min(table_counts, page_size) keys t of
//               sum_d q_g[d] * (bit(t, d) ? max[d] : min[d])  (-inf for an entry with no key);
// with reduce = max (head_reduce_sum false) or sum.
// A page id outside [0, num_bound_rows) scores -inf. Row (b, h) of the outputs lists the `budget` entries with
// the largest scores (ties: the lower j first) in increasing j (key order); budget <= max_pages.
struct SelectPagesParams {
  const void* q = nullptr;
  const void* bounds = nullptr;
  const int32_t* table_pages = nullptr;
  const int32_t* table_counts = nullptr;
  const float* table_bias = nullptr;
  float* scores = nullptr;
  int32_t* out_cols = nullptr;
  int32_t* out_counts = nullptr;
  int64_t q_stride_token = 0;
  int64_t q_stride_head = 0;
  int32_t batch = 0;
  int32_t query_len = 0;
  int32_t num_q_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t num_bound_rows = 0;
  int32_t max_pages = 0;
  int32_t budget = 0;
  bool head_reduce_sum = false;
  DType q_dtype = DType::kBFloat16;
  DType bounds_dtype = DType::kBFloat16;
  const uint8_t* signs = nullptr;
  int32_t page_size = 0;   // signs' tokens per page (0 without signs)
  int32_t sign_bytes = 0;  // ceil(head_dim / 8)
};

// The `budget` best entries of each row of scores, as pages and token counts taken from a table: the selection
// step of select_pages (one table per sequence, shared by its kv heads' rows) and of the rerank stage
// (select_candidate_pages: a table per row).
//   scores       [rows, max_pages] float32
//   table_pages, table_counts [rows / rows_per_table, max_pages] int32: row r reads table row r / rows_per_table
//   out_cols, out_counts [rows, budget] int32 (out)
// Row r lists the budget entries with the largest scores in increasing index j (key order); ties go to the lower
// j; scores compare in IEEE total order (-NaN < -inf < ... < -0 < +0 < ... < +inf < +NaN). 1 <= budget <= max_pages.
struct SelectTopParams {
  const float* scores = nullptr;
  const int32_t* table_pages = nullptr;
  const int32_t* table_counts = nullptr;
  int32_t* out_cols = nullptr;
  int32_t* out_counts = nullptr;
  int32_t rows = 0;
  int32_t rows_per_table = 1;
  int32_t max_pages = 0;
  int32_t budget = 0;
};

// Exact scores of candidate pages: the second stage of "topk" with rerank (the first stage, select_pages, picks the
// candidates by their bounds or sign estimates). For (sequence b, kv head h, candidate c):
//   q        [batch * query_len, num_q_heads, head_dim]  strides q_stride_token / q_stride_head, last dim contiguous
//   k_cache  [num_pages, page_size, num_kv_heads, head_dim] contiguous, the same dtype as q
//   cols, counts [batch, num_kv_heads, candidates] int32: the candidate's page and its valid tokens
//   forced   [batch, num_forced] int32: page ids kept whatever their score (sinks, recent pages); -1 = none
//   scores   [batch, num_kv_heads, candidates] float32 (out):
//     -inf if counts <= 0 or the page id is outside [0, num_pages); else +inf if the page is one of b's forced
//     pages; else the largest q_g . k_t (fp32) over the query_len * (Hq / Hkv) query heads g of h and the page's
//     first min(counts, page_size) keys t.
struct CandidateScoresParams {
  const void* q = nullptr;
  const void* k_cache = nullptr;
  const int32_t* cols = nullptr;
  const int32_t* counts = nullptr;
  const int32_t* forced = nullptr;
  float* scores = nullptr;
  int64_t q_stride_token = 0;
  int64_t q_stride_head = 0;
  int32_t batch = 0;
  int32_t query_len = 0;
  int32_t num_q_heads = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t num_pages = 0;
  int32_t page_size = 0;
  int32_t candidates = 0;
  int32_t num_forced = 0;
  DType dtype = DType::kBFloat16;
};

// The page key bounds append_kv folds a decode step's new keys into (layout as in SelectPagesParams): for slot
// s >= 0 (page s / page_size, offset s % page_size) the page's bounds become the token's key when the offset is 0 (a
// page starting over), else the element-wise max / min of the old bounds and the key. Pages fill in slot order, so
// this equals the bounds of the page's valid tokens. Slots must name distinct pages (one new token per sequence);
// slots < 0 or outside the pool, and pages without a bounds row, are skipped. With signs, the token's sign bits are
// written too: bit b of byte j is (key channel 8 j + b) > 0. k_cache is the pool the keys are appended to.
struct UpdatePageBoundsParams {
  void* bounds = nullptr;
  const void* k_cache = nullptr;        // [num_pages, page_size, num_kv_heads, head_dim] contiguous, k_dtype
  const void* slot_mapping = nullptr;   // [num_tokens] int32 or int64 (slot_is_int64)
  bool slot_is_int64 = false;
  int32_t num_tokens = 0;
  int32_t num_pages = 0;
  int32_t page_size = 0;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t num_bound_rows = 0;
  DType k_dtype = DType::kBFloat16;
  DType bounds_dtype = DType::kBFloat16;
  uint8_t* signs = nullptr;  // optional [num_bound_rows, num_kv_heads, page_size, sign_bytes]: the token's sign bits
  int32_t sign_bytes = 0;    // ceil(head_dim / 8)
};

// Linear layers of a few tokens that share their input (a decode step's q/k/v or gate/up projections):
// out_i [m, n_i] = x [m, k] @ w_i [n_i, k]^T (+ bias_i [n_i]) for i < num_weights, fp32 accumulation, outputs in
// x's dtype. Rows of x are x_stride elements apart; weights and outputs are contiguous. Weight-bandwidth bound: each
// weight element is read once for all m rows.
struct GroupedLinearParams {
  static constexpr int kMaxWeights = 4;
  // m. The GEMV kernel takes 1-2 tokens: measured on the H200 (benchmarks/bench_linear.py, an 8B layer) 1.23x cuBLAS
  // at 1 token, 1.16x at 2, 0.63x at 4 (its FMAs per weight byte grow with m while cuBLAS moves to tensor cores). The
  // sm_90a tensor-core kernel (grouped_linear_wgmma.cu) takes 3-64.
  static constexpr int kGemvMaxRows = 2;
  static constexpr int kMaxRows = 64;
  const void* x = nullptr;
  int64_t x_stride = 0;
  int32_t m = 0;
  int32_t k = 0;
  int32_t num_weights = 0;
  const void* weights[kMaxWeights] = {};
  const void* biases[kMaxWeights] = {};  // nullptr: no bias
  void* outs[kMaxWeights] = {};
  int32_t n[kMaxWeights] = {};
  DType dtype = DType::kBFloat16;
};

}  // namespace flashcore
