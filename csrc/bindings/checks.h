// Argument checks shared by the CPU and CUDA implementations of the flashcore ops. Every check runs before any
// memory is touched and names the offending argument. Shape/dtype/device checks apply to every backend; checks of
// index *values* (page ids, counts, offsets) need the data on the host and run for CPU tensors only (the CUDA kernels
// bounds-guard every index on the device instead, so a bad value never reads or writes out of bounds).
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>

#include "bindings/message.h"
#include "kernels/params.h"

namespace flashcore::binding {

inline DType to_dtype(at::ScalarType t, const char* what) {
  FC_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, what,
              " must be float32, float16 or bfloat16, got ", t);
  return t == at::kFloat ? DType::kFloat32 : t == at::kHalf ? DType::kFloat16 : DType::kBFloat16;
}

inline void check_index_tensor(const at::Tensor& t, const char* op, const char* name, const at::Device& device) {
  FC_CHECK(t.dim() == 1, op, ": ", name, " must be 1-D, got shape ", t.sizes());
  FC_CHECK(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", t.scalar_type());
  FC_CHECK(t.device() == device, op, ": ", name, " must be on ", device, ", got ", t.device());
  FC_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_fits_int32(int64_t v, const char* op, const char* what) {
  FC_CHECK(v >= 0 && v <= INT32_MAX, op, ": ", what, " = ", v, " does not fit the kernels' int32 indexing");
}

inline void check_offsets_host(const at::Tensor& offsets, int64_t limit, bool must_end_at_limit, const char* op,
                               const char* name, const char* limit_name) {
  const int32_t* o = offsets.data_ptr<int32_t>();
  const int64_t n = offsets.numel();
  FC_CHECK(o[0] == 0, op, ": ", name, "[0] must be 0, got ", o[0]);
  for (int64_t i = 1; i < n; ++i) {
    FC_CHECK(o[i] >= o[i - 1], op, ": ", name, " must be non-decreasing, but ", name, "[", i, "] = ", o[i],
                " < ", name, "[", i - 1, "] = ", o[i - 1]);
  }
  FC_CHECK(o[n - 1] <= limit, op, ": ", name, "[-1] = ", o[n - 1], " exceeds ", limit_name, " = ", limit);
  FC_CHECK(!must_end_at_limit || o[n - 1] == limit, op, ": ", name, "[-1] = ", o[n - 1], " must equal ",
              limit_name, " = ", limit);
}

// Validates paged_attention's arguments (all backends) and fills the kernel params. out/lse are set by the caller,
// the bounds by the plan (AttentionPlanData::apply_to).
inline PagedAttentionParams make_paged_attention_params(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& row_offsets,
    const at::Tensor& cols, const at::Tensor& token_counts, const at::Tensor& q_indptr, bool causal, double sm_scale,
    int64_t window, double softcap, const std::optional<at::Tensor>& sinks) {
  constexpr const char* op = "paged_attention";
  FC_CHECK(q.dim() == 3, op, ": q must be [total_q, num_q_heads, head_dim], got shape ", q.sizes());
  FC_CHECK(k_cache.dim() == 4, op, ": k_cache must be [num_pages, page_size, num_kv_heads, head_dim], got shape ",
              k_cache.sizes());
  FC_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache shape ", v_cache.sizes(),
              " must equal k_cache shape ", k_cache.sizes());
  const DType dtype = to_dtype(q.scalar_type(), "paged_attention: q");
  FC_CHECK(k_cache.scalar_type() == q.scalar_type(), op, ": k_cache dtype ", k_cache.scalar_type(),
              " must equal q dtype ", q.scalar_type());
  FC_CHECK(v_cache.scalar_type() == q.scalar_type(), op, ": v_cache dtype ", v_cache.scalar_type(),
              " must equal q dtype ", q.scalar_type());
  const at::Device device = q.device();
  FC_CHECK(k_cache.device() == device, op, ": k_cache must be on ", device, ", got ", k_cache.device());
  FC_CHECK(v_cache.device() == device, op, ": v_cache must be on ", device, ", got ", v_cache.device());
  FC_CHECK(k_cache.is_contiguous(), op, ": k_cache must be contiguous");
  FC_CHECK(v_cache.is_contiguous(), op, ": v_cache must be contiguous");
  FC_CHECK(q.stride(2) == 1 || q.size(2) == 1, op, ": q's last dimension must be contiguous");
  const int64_t head_dim = q.size(2), num_q_heads = q.size(1), num_kv_heads = k_cache.size(2);
  FC_CHECK(head_dim >= 1 && head_dim <= 256, op, ": head_dim must be in [1, 256], got ", head_dim);
  FC_CHECK(k_cache.size(3) == head_dim, op, ": k_cache head_dim ", k_cache.size(3), " must equal q head_dim ",
              head_dim);
  FC_CHECK(num_kv_heads >= 1 && num_q_heads >= 1 && num_q_heads % num_kv_heads == 0, op,
              ": num_q_heads (q.size(1) = ", num_q_heads, ") must be a multiple of num_kv_heads (k_cache.size(2) = ",
              num_kv_heads, ")");
  FC_CHECK(k_cache.size(1) >= 1, op, ": page_size (k_cache.size(1)) must be >= 1");
  check_index_tensor(row_offsets, op, "row_offsets", device);
  check_index_tensor(cols, op, "cols", device);
  check_index_tensor(token_counts, op, "token_counts", device);
  check_index_tensor(q_indptr, op, "q_indptr", device);
  FC_CHECK(q_indptr.numel() >= 1, op, ": q_indptr must have batch + 1 >= 1 entries");
  const int64_t batch = q_indptr.numel() - 1, layout_rows = row_offsets.numel() - 1;
  FC_CHECK(layout_rows == batch || layout_rows == batch * num_kv_heads, op, ": row_offsets has ",
              row_offsets.numel(), " entries; it must have batch + 1 = ", batch + 1,
              " (one page list per sequence) or batch * num_kv_heads + 1 = ", batch * num_kv_heads + 1,
              " (one per sequence and kv head), where batch + 1 = len(q_indptr)");
  FC_CHECK(cols.numel() == token_counts.numel(), op, ": cols (", cols.numel(), ") and token_counts (",
              token_counts.numel(), ") must have the same length");
  FC_CHECK(std::isfinite(sm_scale), op, ": sm_scale must be finite, got ", sm_scale);
  FC_CHECK(window >= 0, op, ": sliding_window must be positive (0 = none), got ", window);
  FC_CHECK(std::isfinite(softcap) && softcap >= 0, op, ": softcap must be a finite number >= 0 (0 = none), got ",
           softcap);
  if (sinks.has_value()) {
    const at::Tensor& s = *sinks;
    FC_CHECK(s.dim() == 1 && s.numel() == num_q_heads, op, ": sinks must be [num_q_heads=", num_q_heads,
             "], got shape ", s.sizes());
    FC_CHECK(s.scalar_type() == at::kFloat, op, ": sinks must be float32, got ", s.scalar_type());
    FC_CHECK(s.device() == device, op, ": sinks must be on ", device, ", got ", s.device());
    FC_CHECK(s.is_contiguous(), op, ": sinks must be contiguous");
  }
  check_fits_int32(q.size(0), op, "total_q");
  check_fits_int32(k_cache.size(0), op, "num_pages");
  check_fits_int32(cols.numel(), op, "len(cols)");
  check_fits_int32(window, op, "sliding_window");

  PagedAttentionParams p;
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.row_offsets = row_offsets.data_ptr<int32_t>();
  p.cols = cols.data_ptr<int32_t>();
  p.token_counts = token_counts.data_ptr<int32_t>();
  p.q_indptr = q_indptr.data_ptr<int32_t>();
  p.q_stride_token = q.stride(0);
  p.q_stride_head = q.stride(1);
  p.batch = static_cast<int32_t>(batch);
  p.per_kv_head_rows = layout_rows != batch;  // equal counts (num_kv_heads == 1) mean the same thing either way
  p.total_q = static_cast<int32_t>(q.size(0));
  p.num_q_heads = static_cast<int32_t>(num_q_heads);
  p.num_kv_heads = static_cast<int32_t>(num_kv_heads);
  p.head_dim = static_cast<int32_t>(head_dim);
  p.page_size = static_cast<int32_t>(k_cache.size(1));
  p.num_pages = static_cast<int32_t>(k_cache.size(0));
  p.nnz = static_cast<int32_t>(cols.numel());
  p.causal = causal;
  p.window = static_cast<int32_t>(window);
  p.sm_scale = static_cast<float>(sm_scale);
  p.softcap = static_cast<float>(softcap);
  p.sinks = sinks.has_value() ? sinks->data_ptr<float>() : nullptr;
  p.dtype = dtype;
  return p;  // max_q_len / max_pages_per_seq come from the plan (plan.h)
}

// Validates merge_attention_states' arguments (all backends), makes the output and fills the kernel params.
inline MergeStatesParams make_merge_states_params(const at::Tensor& out_a, const at::Tensor& lse_a,
                                                  const at::Tensor& out_b, const at::Tensor& lse_b,
                                                  const std::optional<at::Tensor>& sinks,
                                                  const std::optional<at::Tensor>& a_rows, at::Tensor& out) {
  constexpr const char* op = "merge_attention_states";
  // Part a: one state [rows_a, num_heads, head_dim] or a_splits partial states [a_splits, rows_a, num_heads, head_dim].
  FC_CHECK((out_a.dim() == 3 || out_a.dim() == 4) && out_b.dim() == 3, op, ": out_a must be [rows_a, num_heads, "
           "head_dim] or [splits, rows_a, num_heads, head_dim] and out_b [rows, num_heads, head_dim], got ",
           out_a.sizes(), " and ", out_b.sizes());
  const bool split_a = out_a.dim() == 4;
  const int64_t a_splits = split_a ? out_a.size(0) : 1, rows_a = out_a.size(split_a ? 1 : 0);
  FC_CHECK(out_a.size(-2) == out_b.size(1) && out_a.size(-1) == out_b.size(2), op, ": out_a ", out_a.sizes(),
           " and out_b ", out_b.sizes(), " differ in num_heads or head_dim");
  FC_CHECK(a_splits >= 1, op, ": out_a has no splits");
  FC_CHECK(out_a.scalar_type() == out_b.scalar_type(), op, ": out_a and out_b must have one dtype, got ",
           out_a.scalar_type(), " and ", out_b.scalar_type());
  FC_CHECK(out_a.is_contiguous() && out_b.is_contiguous(), op, ": out_a and out_b must be contiguous");
  const at::IntArrayRef lse_a_shape = out_a.sizes().slice(0, out_a.dim() - 1);
  FC_CHECK(lse_a.scalar_type() == at::kFloat && lse_a.is_contiguous() && lse_a.sizes() == lse_a_shape, op,
           ": lse_a must be a contiguous float32 ", lse_a_shape, " tensor, got ", lse_a.scalar_type(), " ",
           lse_a.sizes());
  FC_CHECK(lse_b.scalar_type() == at::kFloat && lse_b.is_contiguous() && lse_b.dim() == 2 &&
           lse_b.size(0) == out_b.size(0) && lse_b.size(1) == out_b.size(1), op,
           ": lse_b must be a contiguous float32 [", out_b.size(0), ", ", out_b.size(1), "] tensor, got ",
           lse_b.scalar_type(), " ", lse_b.sizes());
  const at::Device device = out_b.device();
  for (const auto& [t, name] : {std::pair{&out_a, "out_a"}, {&lse_a, "lse_a"}, {&lse_b, "lse_b"}}) {
    FC_CHECK(t->device() == device, op, ": ", name, " is on ", t->device(), " but out_b on ", device);
  }
  if (sinks.has_value()) {
    FC_CHECK(sinks->scalar_type() == at::kFloat && sinks->is_contiguous() && sinks->dim() == 1 &&
             sinks->size(0) == out_b.size(1) && sinks->device() == device, op,
             ": sinks must be a contiguous float32 [num_heads=", out_b.size(1), "] tensor on ", device, ", got ",
             sinks->scalar_type(), " ", sinks->sizes(), " on ", sinks->device());
  }
  if (a_rows.has_value()) {
    FC_CHECK(a_rows->scalar_type() == at::kInt && a_rows->is_contiguous() && a_rows->dim() == 1 &&
             a_rows->size(0) == out_b.size(0) && a_rows->device() == device, op,
             ": a_rows must be a contiguous int32 [rows=", out_b.size(0), "] tensor on ", device, ", got ",
             a_rows->scalar_type(), " ", a_rows->sizes(), " on ", a_rows->device());
  } else {
    FC_CHECK(rows_a == out_b.size(0), op, ": without a_rows, out_a and out_b need the same rows, got ", rows_a,
             " and ", out_b.size(0));
  }
  FC_CHECK(out_b.size(0) <= INT32_MAX && rows_a <= INT32_MAX && a_splits <= INT32_MAX, op, ": too many rows");
  out = at::empty_like(out_b);
  MergeStatesParams p;
  p.out_a = out_a.data_ptr();
  p.lse_a = lse_a.data_ptr<float>();
  p.out_b = out_b.data_ptr();
  p.lse_b = lse_b.data_ptr<float>();
  p.sinks = sinks.has_value() ? sinks->data_ptr<float>() : nullptr;
  p.a_rows = a_rows.has_value() ? a_rows->data_ptr<int32_t>() : nullptr;
  p.out = out.data_ptr();
  p.a_splits = static_cast<int32_t>(a_splits);
  p.rows_a = static_cast<int32_t>(rows_a);
  p.rows = static_cast<int32_t>(out_b.size(0));
  p.num_heads = static_cast<int32_t>(out_b.size(1));
  p.head_dim = static_cast<int32_t>(out_b.size(2));
  p.dtype = to_dtype(out_b.scalar_type(), "merge_attention_states: out_b");
  return p;
}

// Validates append_kv's arguments (all backends) and fills the kernel params.
inline AppendKVParams make_append_kv_params(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k,
                                            const at::Tensor& v, const at::Tensor& slot_mapping) {
  constexpr const char* op = "append_kv";
  FC_CHECK(k_cache.dim() == 4, op, ": k_cache must be [num_pages, page_size, num_kv_heads, head_dim], got shape ",
              k_cache.sizes());
  FC_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache shape ", v_cache.sizes(),
              " must equal k_cache shape ", k_cache.sizes());
  FC_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), op, ": k_cache and v_cache must be contiguous");
  const DType dtype = to_dtype(k_cache.scalar_type(), "append_kv: k_cache");
  FC_CHECK(k.dim() == 3, op, ": k must be [num_tokens, num_kv_heads, head_dim], got shape ", k.sizes());
  FC_CHECK(v.sizes() == k.sizes(), op, ": v shape ", v.sizes(), " must equal k shape ", k.sizes());
  FC_CHECK(k.size(1) == k_cache.size(2) && k.size(2) == k_cache.size(3), op, ": k shape ", k.sizes(),
              " does not match k_cache [.., .., num_kv_heads=", k_cache.size(2), ", head_dim=", k_cache.size(3), "]");
  for (const auto* t : {&v_cache, &k, &v}) {
    FC_CHECK(t->scalar_type() == k_cache.scalar_type(), op, ": k_cache, v_cache, k and v must share one dtype, got ",
                k_cache.scalar_type(), " and ", t->scalar_type());
    FC_CHECK(t->device() == k_cache.device(), op, ": all tensors must be on ", k_cache.device(), ", got ",
                t->device());
  }
  FC_CHECK(k.stride(2) == 1 && v.stride(2) == 1, op, ": k and v must have a contiguous last dimension");
  FC_CHECK(slot_mapping.dim() == 1 && slot_mapping.numel() == k.size(0), op, ": slot_mapping must be [num_tokens=",
              k.size(0), "], got shape ", slot_mapping.sizes());
  FC_CHECK(slot_mapping.scalar_type() == at::kInt || slot_mapping.scalar_type() == at::kLong, op,
              ": slot_mapping must be int32 or int64, got ", slot_mapping.scalar_type());
  FC_CHECK(slot_mapping.device() == k_cache.device(), op, ": slot_mapping must be on ", k_cache.device());
  FC_CHECK(slot_mapping.is_contiguous(), op, ": slot_mapping must be contiguous");
  check_fits_int32(k.size(0), op, "num_tokens");
  check_fits_int32(k_cache.size(0), op, "num_pages");

  AppendKVParams p;
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.slot_mapping = slot_mapping.data_ptr();
  p.slot_is_int64 = slot_mapping.scalar_type() == at::kLong;
  p.k_stride_token = k.stride(0);
  p.k_stride_head = k.stride(1);
  p.v_stride_token = v.stride(0);
  p.v_stride_head = v.stride(1);
  p.num_tokens = static_cast<int32_t>(k.size(0));
  p.num_kv_heads = static_cast<int32_t>(k.size(1));
  p.head_dim = static_cast<int32_t>(k.size(2));
  p.page_size = static_cast<int32_t>(k_cache.size(1));
  p.num_pages = static_cast<int32_t>(k_cache.size(0));
  p.dtype = dtype;
  return p;
}

// The float32 scratch a planned paged-attention call needs (split-KV partials): the caller's `workspace` when given
// (checked: contiguous float32 on q's device, at least `bytes`), else a fresh tensor kept alive in `scratch`.
inline float* plan_workspace(const std::optional<at::Tensor>& workspace, int64_t bytes, const at::Tensor& q,
                             at::Tensor& scratch) {
  if (bytes <= 0) return nullptr;
  if (workspace.has_value()) {
    const at::Tensor& ws = *workspace;
    FC_CHECK(ws.device() == q.device() && ws.scalar_type() == at::kFloat && ws.is_contiguous(),
             "paged_attention: workspace must be a contiguous float32 tensor on ", q.device());
    FC_CHECK(ws.numel() * static_cast<int64_t>(sizeof(float)) >= bytes, "paged_attention: workspace has ",
             static_cast<int64_t>(ws.numel() * sizeof(float)), " bytes but the plan needs ", bytes);
    return ws.data_ptr<float>();
  }
  scratch = at::empty({(bytes + static_cast<int64_t>(sizeof(float)) - 1) / static_cast<int64_t>(sizeof(float))},
                      q.options().dtype(at::kFloat));
  return scratch.data_ptr<float>();
}

// The plan of a paged-attention call on CUDA (kernel, bounds, split-KV partition, workspace) from host-known
// metadata: `p` has shapes, dtype, options and bounds, no pointers. Defined in ops_cuda.cpp (a CPU-only build plans
// every CUDA call as unsupported).
struct AttentionPlanData;
AttentionPlanData plan_cuda(const PagedAttentionParams& p, int64_t device_index, bool exact);

}  // namespace flashcore::binding
