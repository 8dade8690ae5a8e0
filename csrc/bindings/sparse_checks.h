// Argument checks of the sparse selection ops (select_pages, candidate_page_scores, select_candidate_pages) and of
// append_kv's key bounds, shared by the CPU and CUDA implementations: shapes, dtypes and devices for every backend;
// index values on the host (CPU tensors) only.
#pragma once
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "bindings/checks.h"

namespace flashcore::binding {

inline DType bounds_dtype(const at::Tensor& bounds, const char* op) {
  FC_CHECK(bounds.scalar_type() == at::kFloat || bounds.scalar_type() == at::kBFloat16, op,
           ": bounds must be float32 or bfloat16, got ", bounds.scalar_type());
  return bounds.scalar_type() == at::kFloat ? DType::kFloat32 : DType::kBFloat16;
}

// Key sign bits [num_pages, num_kv_heads, page_size, ceil(head_dim / 8)] uint8 (PageKeySummaries.signs) of either
// op; page_size < 0: any size >= 1 (select_pages reads it from signs).
inline void check_signs(const at::Tensor& signs, const char* op, int64_t num_pages, int64_t hkv, int64_t page_size,
                        int64_t sign_bytes, const at::Tensor& like, const char* like_name) {
  const bool page_size_ok = page_size < 0 ? signs.dim() == 4 && signs.size(2) >= 1
                                          : signs.dim() == 4 && signs.size(2) == page_size;
  FC_CHECK(page_size_ok && signs.size(0) == num_pages && signs.size(1) == hkv && signs.size(3) == sign_bytes, op,
           ": signs must be [num_pages=", num_pages, ", num_kv_heads=", hkv, ", page_size",
           page_size < 0 ? std::string() : "=" + std::to_string(page_size), ", ceil(head_dim / 8)=", sign_bytes,
           "], got shape ", signs.sizes());
  FC_CHECK(signs.scalar_type() == at::kByte && signs.is_contiguous(), op,
           ": signs must be a contiguous uint8 tensor, got ", signs.scalar_type());
  FC_CHECK(signs.device() == like.device(), op, ": signs must be on ", like_name, "'s device, got ", signs.device());
  check_fits_int32(signs.size(2), op, "signs.size(2)");
}

// q of a selection op: [batch * query_len, num_q_heads, head_dim] with a contiguous last dimension.
inline void check_packed_queries(const at::Tensor& q, const char* op) {
  FC_CHECK(q.dim() == 3, op, ": q must be [batch * query_len, num_q_heads, head_dim], got shape ", q.sizes());
  FC_CHECK(q.stride(2) == 1, op, ": q must have a contiguous last dimension");
}

// q's heads are a multiple of the hkv kv heads (read from `hkv_source`) and its rows batch * query_len.
inline void check_query_heads_and_rows(const at::Tensor& q, int64_t hkv, const char* hkv_source, int64_t batch,
                                       int64_t query_len, const char* op) {
  FC_CHECK(hkv >= 1 && q.size(1) % hkv == 0, op, ": num_q_heads (q.size(1) = ", q.size(1),
           ") must be a multiple of num_kv_heads (", hkv_source, " = ", hkv, ")");
  FC_CHECK(query_len >= 1, op, ": query_len must be >= 1, got ", query_len);
  FC_CHECK(q.size(0) == batch * query_len, op, ": q.size(0) = ", q.size(0), " must equal batch (", batch,
           ") * query_len (", query_len, ")");
}

// Validates select_pages' arguments and fills the params; scores / outputs are set by the caller.
inline SelectPagesParams make_select_pages_params(const at::Tensor& q, const at::Tensor& bounds,
                                                  const at::Tensor& table_pages, const at::Tensor& table_counts,
                                                  const at::Tensor& table_bias, int64_t budget, int64_t query_len,
                                                  const std::string& head_reduction,
                                                  const std::optional<at::Tensor>& signs) {
  constexpr const char* op = "select_pages";
  check_packed_queries(q, op);
  const DType q_dtype = to_dtype(q.scalar_type(), "select_pages: q");
  FC_CHECK(bounds.dim() == 3 && bounds.size(2) == 2 * q.size(2), op,
           ": bounds must be [num_pages, num_kv_heads, 2 * head_dim=", 2 * q.size(2), "], got shape ",
           bounds.sizes());
  FC_CHECK(bounds.is_contiguous(), op, ": bounds must be contiguous");
  const DType b_dtype = bounds_dtype(bounds, op);
  const int64_t hkv = bounds.size(1);
  FC_CHECK(table_pages.dim() == 2, op, ": table_pages must be [batch, max_pages], got shape ", table_pages.sizes());
  const int64_t batch = table_pages.size(0), max_pages = table_pages.size(1);
  FC_CHECK(table_counts.sizes() == table_pages.sizes() && table_bias.sizes() == table_pages.sizes(), op,
           ": table_pages, table_counts and table_bias must share one shape [batch, max_pages], got ",
           table_pages.sizes(), ", ", table_counts.sizes(), ", ", table_bias.sizes());
  FC_CHECK(table_pages.scalar_type() == at::kInt && table_counts.scalar_type() == at::kInt, op,
           ": table_pages and table_counts must be int32");
  FC_CHECK(table_bias.scalar_type() == at::kFloat, op, ": table_bias must be float32, got ",
           table_bias.scalar_type());
  for (const auto* t : {&bounds, &table_pages, &table_counts, &table_bias}) {
    FC_CHECK(t->device() == q.device(), op, ": q, bounds and the table tensors must share one device, got ",
             q.device(), " and ", t->device());
  }
  FC_CHECK(table_pages.is_contiguous() && table_counts.is_contiguous() && table_bias.is_contiguous(), op,
           ": table_pages, table_counts and table_bias must be contiguous");
  check_query_heads_and_rows(q, hkv, "bounds.size(1)", batch, query_len, op);
  FC_CHECK(budget >= 1 && budget <= max_pages, op, ": budget must be in [1, max_pages = ", max_pages, "], got ",
           budget);
  FC_CHECK(head_reduction == "max" || head_reduction == "sum", op,
           ": head_reduction must be 'max' or 'sum', got '", head_reduction, "'");
  check_fits_int32(bounds.size(0), op, "key_bounds.size(0)");
  check_fits_int32(batch * max_pages, op, "batch * max_pages");
  check_fits_int32(q.size(0), op, "q.size(0)");
  const int64_t sign_bytes = (q.size(2) + 7) / 8;
  if (signs.has_value()) check_signs(*signs, op, bounds.size(0), hkv, -1, sign_bytes, q, "q");
  if (table_pages.device().is_cpu()) {
    const int32_t* pages = table_pages.data_ptr<int32_t>();
    for (int64_t i = 0; i < table_pages.numel(); ++i) {
      FC_CHECK(pages[i] >= 0 && pages[i] < bounds.size(0), op, ": table_pages has page id ", pages[i],
               " at flat index ", i, ", outside the bounds' pages [0, ", bounds.size(0), ")");
    }
  }
  SelectPagesParams p;
  p.q = q.data_ptr();
  p.bounds = bounds.data_ptr();
  p.table_pages = table_pages.data_ptr<int32_t>();
  p.table_counts = table_counts.data_ptr<int32_t>();
  p.table_bias = table_bias.data_ptr<float>();
  p.q_stride_token = q.stride(0);
  p.q_stride_head = q.stride(1);
  p.batch = static_cast<int32_t>(batch);
  p.query_len = static_cast<int32_t>(query_len);
  p.num_q_heads = static_cast<int32_t>(q.size(1));
  p.num_kv_heads = static_cast<int32_t>(hkv);
  p.head_dim = static_cast<int32_t>(q.size(2));
  p.num_bound_rows = static_cast<int32_t>(bounds.size(0));
  p.max_pages = static_cast<int32_t>(max_pages);
  p.budget = static_cast<int32_t>(budget);
  p.head_reduce_sum = head_reduction == "sum";
  p.q_dtype = q_dtype;
  p.bounds_dtype = b_dtype;
  if (signs.has_value()) {
    p.signs = signs->data_ptr<uint8_t>();
    p.page_size = static_cast<int32_t>(signs->size(2));
    p.sign_bytes = static_cast<int32_t>(sign_bytes);
  }
  return p;
}

// Validates candidate_page_scores' arguments and fills the params; scores are set by the caller.
inline CandidateScoresParams make_candidate_scores_params(const at::Tensor& q, const at::Tensor& k_cache,
                                                          const at::Tensor& cols, const at::Tensor& counts,
                                                          const at::Tensor& forced_pages, int64_t query_len) {
  constexpr const char* op = "candidate_page_scores";
  check_packed_queries(q, op);
  const DType dtype = to_dtype(q.scalar_type(), "candidate_page_scores: q");
  FC_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && k_cache.size(3) == q.size(2), op,
           ": k_cache must be a contiguous [num_pages, page_size, num_kv_heads, head_dim=", q.size(2),
           "] tensor, got shape ", k_cache.sizes());
  FC_CHECK(k_cache.scalar_type() == q.scalar_type(), op, ": k_cache must have q's dtype ", q.scalar_type(),
           ", got ", k_cache.scalar_type());
  const int64_t hkv = k_cache.size(2);
  FC_CHECK(cols.dim() == 3 && cols.size(1) == hkv, op, ": cols must be [batch, num_kv_heads=", hkv,
           ", candidates], got shape ", cols.sizes());
  FC_CHECK(counts.sizes() == cols.sizes(), op, ": counts must have cols' shape ", cols.sizes(), ", got ",
           counts.sizes());
  const int64_t batch = cols.size(0);
  FC_CHECK(forced_pages.dim() == 2 && forced_pages.size(0) == batch, op,
           ": forced_pages must be [batch=", batch, ", num_forced], got shape ", forced_pages.sizes());
  for (const auto* t : {&cols, &counts, &forced_pages}) {
    FC_CHECK(t->scalar_type() == at::kInt && t->is_contiguous(), op,
             ": cols, counts and forced_pages must be contiguous int32 tensors, got ", t->scalar_type());
  }
  for (const auto* t : {&k_cache, &cols, &counts, &forced_pages}) {
    FC_CHECK(t->device() == q.device(), op, ": q, k_cache, cols, counts and forced_pages must share one device, got ",
             q.device(), " and ", t->device());
  }
  check_query_heads_and_rows(q, hkv, "k_cache.size(2)", batch, query_len, op);
  check_fits_int32(k_cache.size(0), op, "k_cache.size(0)");
  check_fits_int32(cols.size(2), op, "cols.size(2)");
  check_fits_int32(forced_pages.size(1), op, "forced_pages.size(1)");
  check_fits_int32(q.size(0), op, "q.size(0)");
  CandidateScoresParams p;
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.cols = cols.data_ptr<int32_t>();
  p.counts = counts.data_ptr<int32_t>();
  p.forced = forced_pages.data_ptr<int32_t>();
  p.q_stride_token = q.stride(0);
  p.q_stride_head = q.stride(1);
  p.batch = static_cast<int32_t>(batch);
  p.query_len = static_cast<int32_t>(query_len);
  p.num_q_heads = static_cast<int32_t>(q.size(1));
  p.num_kv_heads = static_cast<int32_t>(hkv);
  p.head_dim = static_cast<int32_t>(q.size(2));
  p.num_pages = static_cast<int32_t>(k_cache.size(0));
  p.page_size = static_cast<int32_t>(k_cache.size(1));
  p.candidates = static_cast<int32_t>(cols.size(2));
  p.num_forced = static_cast<int32_t>(forced_pages.size(1));
  p.dtype = dtype;
  return p;
}

// Validates select_candidate_pages' arguments and fills the params; outputs are set by the caller.
inline SelectTopParams make_select_top_params(const at::Tensor& scores, const at::Tensor& cols,
                                              const at::Tensor& counts, int64_t budget) {
  constexpr const char* op = "select_candidate_pages";
  FC_CHECK(scores.dim() >= 1 && scores.scalar_type() == at::kFloat && scores.is_contiguous(), op,
           ": scores must be a contiguous float32 [..., candidates] tensor, got ", scores.scalar_type(), " of shape ",
           scores.sizes());
  FC_CHECK(cols.sizes() == scores.sizes() && counts.sizes() == scores.sizes(), op,
           ": cols and counts must have scores' shape ", scores.sizes(), ", got ", cols.sizes(), " and ",
           counts.sizes());
  for (const auto* t : {&cols, &counts}) {
    FC_CHECK(t->scalar_type() == at::kInt && t->is_contiguous(), op,
             ": cols and counts must be contiguous int32 tensors, got ", t->scalar_type());
    FC_CHECK(t->device() == scores.device(), op, ": scores, cols and counts must share one device, got ",
             scores.device(), " and ", t->device());
  }
  const int64_t candidates = scores.size(-1);
  FC_CHECK(budget >= 1 && budget <= candidates, op, ": budget must be in [1, candidates = ", candidates, "], got ",
           budget);
  const int64_t rows = scores.numel() / candidates;
  check_fits_int32(rows, op, "the number of rows (scores.numel() / candidates)");
  check_fits_int32(rows * candidates, op, "scores.numel()");
  check_fits_int32(rows * budget, op, "rows * budget");
  SelectTopParams p;
  p.scores = scores.data_ptr<float>();
  p.table_pages = cols.data_ptr<int32_t>();
  p.table_counts = counts.data_ptr<int32_t>();
  p.rows = static_cast<int32_t>(rows);
  p.rows_per_table = 1;
  p.max_pages = static_cast<int32_t>(candidates);
  p.budget = static_cast<int32_t>(budget);
  return p;
}

// The [..., budget] shape of select_candidate_pages' outputs.
inline std::vector<int64_t> select_top_output_shape(const at::Tensor& scores, int64_t budget) {
  std::vector<int64_t> shape(scores.sizes().begin(), scores.sizes().end());
  shape.back() = budget;
  return shape;
}

// Validates append_kv's key_bounds / key_signs (with the pool and slots it appends to) and fills the params.
inline UpdatePageBoundsParams make_update_page_bounds_params(const at::Tensor& bounds, const at::Tensor& k_cache,
                                                             const at::Tensor& slot_mapping,
                                                             const std::optional<at::Tensor>& signs) {
  constexpr const char* op = "append_kv";
  FC_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous(), op,
           ": k_cache must be a contiguous [num_pages, page_size, num_kv_heads, head_dim] tensor, got shape ",
           k_cache.sizes());
  const DType k_dtype = to_dtype(k_cache.scalar_type(), "append_kv: k_cache");
  FC_CHECK(bounds.dim() == 3 && bounds.size(1) == k_cache.size(2) && bounds.size(2) == 2 * k_cache.size(3), op,
           ": key_bounds must be [num_pages, num_kv_heads=", k_cache.size(2), ", 2 * head_dim=", 2 * k_cache.size(3),
           "], got shape ", bounds.sizes());
  FC_CHECK(bounds.is_contiguous(), op, ": key_bounds must be contiguous");
  const DType b_dtype = bounds_dtype(bounds, op);
  FC_CHECK(b_dtype == DType::kFloat32 || k_dtype == DType::kBFloat16, op,
           ": bfloat16 bounds need bfloat16 keys (the min/max must stay exact), got k_cache ", k_cache.scalar_type());
  FC_CHECK(slot_mapping.dim() == 1 && slot_mapping.is_contiguous(), op,
           ": slot_mapping must be a contiguous 1-D tensor, got shape ", slot_mapping.sizes());
  FC_CHECK(slot_mapping.scalar_type() == at::kInt || slot_mapping.scalar_type() == at::kLong, op,
           ": slot_mapping must be int32 or int64, got ", slot_mapping.scalar_type());
  FC_CHECK(bounds.device() == k_cache.device() && slot_mapping.device() == k_cache.device(), op,
           ": key_bounds, k_cache and slot_mapping must share one device");
  check_fits_int32(k_cache.size(0), op, "num_pages");
  check_fits_int32(bounds.size(0), op, "key_bounds.size(0)");
  check_fits_int32(slot_mapping.numel(), op, "num_tokens");
  const int64_t sign_bytes = (k_cache.size(3) + 7) / 8;
  if (signs.has_value()) {
    check_signs(*signs, op, bounds.size(0), k_cache.size(2), k_cache.size(1), sign_bytes, k_cache, "k_cache");
  }
  UpdatePageBoundsParams p;
  p.bounds = bounds.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.slot_mapping = slot_mapping.data_ptr();
  p.slot_is_int64 = slot_mapping.scalar_type() == at::kLong;
  p.num_tokens = static_cast<int32_t>(slot_mapping.numel());
  p.num_pages = static_cast<int32_t>(k_cache.size(0));
  p.page_size = static_cast<int32_t>(k_cache.size(1));
  p.num_kv_heads = static_cast<int32_t>(k_cache.size(2));
  p.head_dim = static_cast<int32_t>(k_cache.size(3));
  p.num_bound_rows = static_cast<int32_t>(bounds.size(0));
  p.k_dtype = k_dtype;
  p.bounds_dtype = b_dtype;
  if (signs.has_value()) {
    p.signs = signs->data_ptr<uint8_t>();
    p.sign_bytes = static_cast<int32_t>(sign_bytes);
  }
  return p;
}

// CPU only (s: the slots, read on the host): every slot names a page that has a bounds row, one slot per page.
inline void check_one_new_key_per_page(const UpdatePageBoundsParams& p, const int64_t* s) {
  constexpr const char* op = "append_kv";
  std::set<int64_t> pages;
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    if (s[t] < 0) continue;
    FC_CHECK(s[t] / p.page_size < p.num_bound_rows, op, ": slot_mapping[", t, "] = ", s[t], " is on page ",
             s[t] / p.page_size, ", which has no key_bounds row (key_bounds.size(0) = ", p.num_bound_rows, ")");
    FC_CHECK(pages.insert(s[t] / p.page_size).second, op, ": slot_mapping[", t, "] = ", s[t], " is on page ",
             s[t] / p.page_size, " like an earlier slot; with key_bounds, one new token per page per call");
  }
}

}  // namespace flashcore::binding
