// The `flashcore` op library: schemas (declared once, mutations annotated) and the CPU implementations.
// CUDA implementations of the same ops are registered in ops_cuda.cpp when the extension is built with CUDA.
#include <Python.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "bindings/checks.h"
#include "bindings/sparse_checks.h"
#include "bindings/plan.h"
#include "kernels/cpu/cpu_kernels.h"

// A Python module named _C so that `import flashcore_hf._C` loads this library and runs its registrations.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "flashcore op library (see torch.ops.flashcore)", -1,
                               nullptr};
  return PyModule_Create(&module);
}

namespace flashcore::binding {
namespace {

void check_layout_values_host(const PagedAttentionParams& p, const at::Tensor& row_offsets, const at::Tensor& q_indptr) {
  constexpr const char* op = "paged_attention";
  check_offsets_host(row_offsets, p.nnz, /*must_end_at_limit=*/false, op, "row_offsets", "len(cols)");
  check_offsets_host(q_indptr, p.total_q, /*must_end_at_limit=*/true, op, "q_indptr", "total_q (q.size(0))");
  for (int32_t j = 0; j < p.nnz; ++j) {
    FC_CHECK(p.cols[j] >= 0 && p.cols[j] < p.num_pages, op, ": cols[", j, "] = ", p.cols[j],
                " is not a page id in [0, num_pages=", p.num_pages, ")");
    FC_CHECK(p.token_counts[j] >= 0 && p.token_counts[j] <= p.page_size, op, ": token_counts[", j, "] = ",
                p.token_counts[j], " must be in [0, page_size=", p.page_size, "]");
  }
  for (int32_t b = 0; b < p.batch; ++b) {
    const int32_t n_q = p.q_indptr[b + 1] - p.q_indptr[b];
    FC_CHECK(n_q <= p.max_q_len, op, ": max_q_len = ", p.max_q_len, " but sequence ", b, " has ", n_q, " queries");
  }
  for (int64_t r = 0; r + 1 < row_offsets.numel(); ++r) {
    const int32_t n_pages = p.row_offsets[r + 1] - p.row_offsets[r];
    FC_CHECK(n_pages <= p.max_pages_per_seq, op, ": max_pages_per_seq = ", p.max_pages_per_seq,
                " but layout row ", r, " reads ", n_pages, " pages");
  }
}

// Bytes of the CPU decode kernel's split partials: out [splits, total_q, Hq, D] and lse [splits, total_q, Hq].
int64_t cpu_decode_workspace_bytes(const PagedAttentionParams& p, int64_t splits) {
  return splits * p.total_q * p.num_q_heads * (p.head_dim + 1) * static_cast<int64_t>(sizeof(float));
}

// The CPU plan: the decode kernel when every sequence's queries fit one query tile, with enough key splits that
// torch's threads get ~2 items each (one decode sequence still uses every core) but no split under kMinSplitKeys
// keys; else the tile kernel.
AttentionPlanData plan_cpu(AttentionPlanData d) {
  constexpr int64_t kMinSplitKeys = 512;
  PagedAttentionParams p;
  p.num_q_heads = static_cast<int32_t>(d.num_q_heads);
  p.num_kv_heads = static_cast<int32_t>(d.num_kv_heads);
  p.total_q = static_cast<int32_t>(d.total_q);
  p.head_dim = static_cast<int32_t>(d.head_dim);
  d.kernel = PlanKernel::kCpu;
  if (d.max_q_len > cpu::paged_attention_query_block(p)) return d;
  d.kernel = PlanKernel::kCpuDecode;
  const bool per_head = d.layout_rows != d.batch;
  const int64_t items = std::max<int64_t>(1, d.batch * (per_head ? d.num_kv_heads : 1));
  const int64_t wanted = 2 * static_cast<int64_t>(at::get_num_threads());
  const int64_t max_keys = d.max_pages_per_seq * d.page_size;
  d.splits = std::max<int64_t>(1, std::min((wanted + items - 1) / items, max_keys / kMinSplitKeys));
  d.workspace_bytes = d.splits > 1 ? cpu_decode_workspace_bytes(p, d.splits) : 0;
  return d;
}

std::tuple<at::Tensor, at::Tensor> paged_attention_cpu(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& row_offsets,
    const at::Tensor& cols, const at::Tensor& token_counts, const at::Tensor& q_indptr, bool causal, double sm_scale,
    int64_t window, double softcap, const std::optional<at::Tensor>& sinks, at::IntArrayRef plan,
    const std::optional<at::Tensor>& workspace) {
  PagedAttentionParams p = make_paged_attention_params(q, k_cache, v_cache, row_offsets, cols, token_counts, q_indptr,
                                                       causal, sm_scale, window, softcap, sinks);
  const AttentionPlanData planned = AttentionPlanData::decode(plan);
  FC_CHECK(is_cpu_kernel(planned.kernel), "paged_attention: the plan was made for another device (kernel ",
           static_cast<int64_t>(planned.kernel), "); plan again for the CPU");
  planned.apply_to(p, row_offsets.numel() - 1);
  check_layout_values_host(p, row_offsets, q_indptr);
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1)}, q.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  cpu::CpuAttentionSchedule sched;
  sched.decode = planned.kernel == PlanKernel::kCpuDecode;
  sched.key_splits = static_cast<int32_t>(planned.splits);
  at::Tensor scratch;
  if (sched.decode && sched.key_splits > 1) {
    FC_CHECK(planned.workspace_bytes >= cpu_decode_workspace_bytes(p, planned.splits),
             "paged_attention: the plan holds invalid bounds");
    sched.partial_out = plan_workspace(workspace, planned.workspace_bytes, q, scratch);
    sched.partial_lse = sched.partial_out + int64_t(sched.key_splits) * p.total_q * p.num_q_heads * p.head_dim;
  }
  // Tile items are ~64 rows by up to 64 keys or more, big enough that torch's pool pays off even for one item each,
  // and B = 1 prefills get many items; the kernel orders the tiles so that torch's contiguous per-thread ranges get
  // similar shares of a causal triangle. Decode items are whole key splits of a sequence. Grain 1 lets every
  // thread take a share.
  at::parallel_for(0, cpu::paged_attention_work_items(p, sched), 1,
                   [&](int64_t begin, int64_t end) { cpu::paged_attention(p, sched, begin, end); });
  if (sched.partial_out) {
    at::parallel_for(0, int64_t(p.total_q) * p.num_q_heads, 64,
                     [&](int64_t begin, int64_t end) { cpu::merge_key_splits(p, sched, begin, end); });
  }
  return {out, lse};
}

// The host half of a paged-attention call (flashcore_hf/ops/plan.py): which kernel runs it and with which bounds,
// split-KV partition and workspace. No tensor is touched; max_q_len / max_pages_per_seq are bounds on the metadata
// (exact maxima when `exact`, else bounds derived from the shapes).
std::vector<int64_t> plan_paged_attention(const std::string& device_type, int64_t device_index, at::ScalarType dtype,
                                          int64_t head_dim, int64_t page_size, int64_t num_q_heads,
                                          int64_t num_kv_heads, int64_t batch, int64_t layout_rows, int64_t total_q,
                                          int64_t nnz, int64_t max_q_len, int64_t max_pages_per_seq, bool exact,
                                          bool causal, int64_t window) {
  AttentionPlanData d;
  d.max_q_len = std::max<int64_t>(0, std::min(max_q_len, total_q));
  d.max_pages_per_seq = std::max<int64_t>(0, std::min(max_pages_per_seq, nnz));
  d.batch = batch;
  d.layout_rows = layout_rows;
  d.total_q = total_q;
  d.nnz = nnz;
  d.num_q_heads = num_q_heads;
  d.num_kv_heads = num_kv_heads;
  d.head_dim = head_dim;
  d.page_size = page_size;
  d.causal = causal ? 1 : 0;
  d.window = window;
  const bool dtype_ok = dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
  const bool shape_ok = head_dim >= 1 && head_dim <= 256 && page_size >= 1 && num_kv_heads >= 1 && num_q_heads >= 1 &&
                        num_q_heads % num_kv_heads == 0 && batch >= 0 && total_q >= 0 && nnz >= 0 &&
                        total_q <= INT32_MAX && nnz <= INT32_MAX && batch <= INT32_MAX;
  if (!dtype_ok || !shape_ok) return d.encode();
  d.dtype = static_cast<int64_t>(to_dtype(dtype, "dtype"));
  if (device_type == "cpu") return plan_cpu(d).encode();
  if (device_type != "cuda") return d.encode();
  PagedAttentionParams p;
  p.batch = static_cast<int32_t>(batch);
  p.total_q = static_cast<int32_t>(total_q);
  p.nnz = static_cast<int32_t>(nnz);
  p.num_q_heads = static_cast<int32_t>(num_q_heads);
  p.num_kv_heads = static_cast<int32_t>(num_kv_heads);
  p.head_dim = static_cast<int32_t>(head_dim);
  p.page_size = static_cast<int32_t>(page_size);
  p.per_kv_head_rows = layout_rows != batch;
  p.causal = causal;
  p.window = static_cast<int32_t>(std::min<int64_t>(window, INT32_MAX));
  p.dtype = static_cast<DType>(d.dtype);
  p.max_q_len = static_cast<int32_t>(d.max_q_len);
  p.max_pages_per_seq = static_cast<int32_t>(d.max_pages_per_seq);
  const AttentionPlanData cuda = plan_cuda(p, device_index, exact);
  d.kernel = cuda.kernel;
  d.splits = cuda.splits;
  d.workspace_bytes = cuda.workspace_bytes;
  d.split_counter_bytes = cuda.split_counter_bytes;
  return d.encode();
}

at::Tensor merge_attention_states_cpu(const at::Tensor& out_a, const at::Tensor& lse_a, const at::Tensor& out_b,
                                      const at::Tensor& lse_b, const std::optional<at::Tensor>& sinks,
                                      const std::optional<at::Tensor>& a_rows) {
  at::Tensor out;
  const MergeStatesParams p = make_merge_states_params(out_a, lse_a, out_b, lse_b, sinks, a_rows, out);
  for (int32_t t = 0; p.a_rows && t < p.rows; ++t) {
    FC_CHECK(p.a_rows[t] >= 0 && p.a_rows[t] < p.rows_a, "merge_attention_states: a_rows[", t, "] = ", p.a_rows[t],
             " is not a row of out_a (", p.rows_a, " rows)");
  }
  at::parallel_for(0, int64_t(p.rows) * p.num_heads, 64,
                   [&](int64_t begin, int64_t end) { cpu::merge_states(p, begin, end); });
  return out;
}

void append_kv_cpu(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& slot_mapping, const std::optional<at::Tensor>& key_bounds,
                   const std::optional<at::Tensor>& key_signs) {
  AppendKVParams p = make_append_kv_params(k_cache, v_cache, k, v, slot_mapping);
  const int64_t num_slots = int64_t(p.num_pages) * p.page_size;
  const at::Tensor slots = slot_mapping.to(at::kLong);
  const int64_t* s = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    FC_CHECK(s[t] < num_slots, "append_kv: slot_mapping[", t, "] = ", s[t], " is outside the cache's ", num_slots,
                " slots (num_pages * page_size); negative slots mean 'skip'");
  }
  FC_CHECK(key_bounds.has_value() || !key_signs.has_value(), "append_kv: key_signs needs key_bounds");
  std::optional<UpdatePageBoundsParams> bounds;
  if (key_bounds.has_value()) {   // every check before anything is written
    bounds = make_update_page_bounds_params(*key_bounds, k_cache, slot_mapping, key_signs);
    check_one_new_key_per_page(*bounds, s);
  }
  const int64_t bytes_per_token = int64_t(2) * p.num_kv_heads * p.head_dim * (p.dtype == DType::kFloat32 ? 4 : 2);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(bytes_per_token, 1));
  at::parallel_for(0, p.num_tokens, grain, [&](int64_t begin, int64_t end) { cpu::append_kv(p, begin, end); });
  if (bounds.has_value()) cpu::update_page_bounds(*bounds);   // from the keys just appended
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> build_layout_cpu(
    const at::Tensor& token_to_page, const at::Tensor& seq_starts, const at::Tensor& seq_ends,
    const at::Tensor& page_resident_bitmap, int64_t page_tokens, int64_t num_pages) {
  constexpr const char* op = "build_layout";
  const at::Device cpu(at::kCPU);
  check_index_tensor(token_to_page, op, "token_to_page", cpu);
  check_index_tensor(seq_starts, op, "seq_starts", cpu);
  check_index_tensor(seq_ends, op, "seq_ends", cpu);
  FC_CHECK(seq_starts.numel() == seq_ends.numel(), op, ": seq_starts (", seq_starts.numel(), ") and seq_ends (",
              seq_ends.numel(), ") must have the same length");
  FC_CHECK(page_tokens >= 1, op, ": page_tokens must be >= 1, got ", page_tokens);
  FC_CHECK(num_pages >= 0, op, ": num_pages must be >= 0, got ", num_pages);
  check_fits_int32(num_pages, op, "num_pages");
  check_fits_int32(page_tokens, op, "page_tokens");
  check_fits_int32(token_to_page.numel(), op, "len(token_to_page)");
  FC_CHECK(page_resident_bitmap.dim() == 1 && page_resident_bitmap.scalar_type() == at::kBool, op,
              ": page_resident_bitmap must be a 1-D bool tensor, got ", page_resident_bitmap.scalar_type(), " of shape ",
              page_resident_bitmap.sizes());
  FC_CHECK(page_resident_bitmap.numel() == num_pages, op, ": page_resident_bitmap has ",
              page_resident_bitmap.numel(), " entries but num_pages = ", num_pages);
  FC_CHECK(page_resident_bitmap.device() == cpu && page_resident_bitmap.is_contiguous(), op,
              ": page_resident_bitmap must be a contiguous CPU tensor");
  const int32_t* pages = token_to_page.data_ptr<int32_t>();
  const int64_t num_tokens = token_to_page.numel();
  for (int64_t t = 0; t < num_tokens; ++t) {
    FC_CHECK(pages[t] >= 0 && pages[t] < num_pages, op, ": token_to_page[", t, "] = ", pages[t],
                " is not a page id in [0, num_pages=", num_pages, ")");
  }
  const int32_t* starts = seq_starts.data_ptr<int32_t>();
  const int32_t* ends = seq_ends.data_ptr<int32_t>();
  for (int64_t b = 0; b < seq_starts.numel(); ++b) {
    FC_CHECK(0 <= starts[b] && starts[b] <= ends[b] && ends[b] <= num_tokens, op, ": sequence ", b,
                " has seq_starts = ", starts[b], ", seq_ends = ", ends[b], "; need 0 <= start <= end <= len(token_to_page) = ",
                num_tokens);
  }
  BuildLayoutParams p;
  p.token_to_page = pages;
  p.seq_starts = starts;
  p.seq_ends = ends;
  p.page_resident = page_resident_bitmap.data_ptr<bool>();
  p.num_tokens = static_cast<int32_t>(num_tokens);
  p.batch = static_cast<int32_t>(seq_starts.numel());
  p.page_tokens = static_cast<int32_t>(page_tokens);
  p.num_pages = static_cast<int32_t>(num_pages);
  cpu::PageLayoutHost layout;
  const std::string error = cpu::build_layout(p, layout);
  FC_CHECK(error.empty(), error);
  auto to_tensor = [](const std::vector<int32_t>& v) {
    return at::from_blob(const_cast<int32_t*>(v.data()), {static_cast<int64_t>(v.size())}, at::kInt).clone();
  };
  return {to_tensor(layout.row_offsets), to_tensor(layout.cols), to_tensor(layout.token_counts),
          to_tensor(layout.staging_ids)};
}

bool has_cuda_kernels() {
#ifdef FLASHCORE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool kernel_supports(const std::string& device_type, at::ScalarType dtype, int64_t head_dim, int64_t page_size,
                     int64_t max_q_len, int64_t num_q_heads, int64_t num_kv_heads) {
  // One sequence of max_q_len queries over a long row of pages: what the planner answers for such a call.
  const int64_t pages = 1024;
  const std::vector<int64_t> plan = plan_paged_attention(device_type, -1, dtype, head_dim, page_size, num_q_heads,
                                                         num_kv_heads, 1, 1, max_q_len, pages, max_q_len, pages,
                                                         /*exact=*/true, /*causal=*/true, /*window=*/0);
  return AttentionPlanData::decode(plan).kernel != PlanKernel::kUnsupported;
}

}  // namespace

#ifndef FLASHCORE_WITH_CUDA
AttentionPlanData plan_cuda(const PagedAttentionParams&, int64_t, bool) { return {}; }
#endif

}  // namespace flashcore::binding

TORCH_LIBRARY(flashcore, m) {
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor row_offsets, Tensor cols, "
        "Tensor token_counts, Tensor q_indptr, bool causal, float sm_scale, int window, float softcap, "
        "Tensor? sinks, int[] plan, Tensor? workspace) -> (Tensor, Tensor)");
  m.def("plan_paged_attention(str device_type, int device_index, ScalarType dtype, int head_dim, int page_size, "
        "int num_q_heads, int num_kv_heads, int batch, int layout_rows, int total_q, int nnz, int max_q_len, "
        "int max_pages_per_seq, bool exact, bool causal, int window) -> int[]",
        &flashcore::binding::plan_paged_attention);
  m.def("append_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor slot_mapping, "
        "Tensor(c!)? key_bounds=None, Tensor(d!)? key_signs=None) -> ()");
  m.def("merge_attention_states(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b, Tensor? sinks, "
        "Tensor? a_rows) -> Tensor");
  m.def("build_layout(Tensor token_to_page, Tensor seq_starts, Tensor seq_ends, Tensor page_resident_bitmap, "
        "int page_tokens, int num_pages) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("select_pages(Tensor q, Tensor bounds, Tensor table_pages, Tensor table_counts, Tensor table_bias, "
        "int budget, int query_len, str head_reduction, Tensor? signs=None) -> (Tensor, Tensor)");
  m.def("candidate_page_scores(Tensor q, Tensor k_cache, Tensor cols, Tensor counts, Tensor forced_pages, "
        "int query_len) -> Tensor");
  m.def("select_candidate_pages(Tensor scores, Tensor cols, Tensor counts, int budget) -> (Tensor, Tensor)");
  m.def("grouped_linear(Tensor x, Tensor[] weights, Tensor?[] biases) -> Tensor[]");
  m.def("has_cuda_kernels() -> bool", &flashcore::binding::has_cuda_kernels);
  m.def("kernel_supports(str device_type, ScalarType dtype, int head_dim, int page_size, int max_q_len, "
        "int num_q_heads, int num_kv_heads) -> bool",
        &flashcore::binding::kernel_supports);
}

TORCH_LIBRARY_IMPL(flashcore, CPU, m) {
  m.impl("paged_attention", &flashcore::binding::paged_attention_cpu);
  m.impl("append_kv", &flashcore::binding::append_kv_cpu);
  m.impl("merge_attention_states", &flashcore::binding::merge_attention_states_cpu);
  m.impl("build_layout", &flashcore::binding::build_layout_cpu);
}
