// CUDA implementations of the flashcore ops: argument checks (shared with the CPU path), output/workspace
// allocation through torch, then the torch-free launchers in csrc/kernels/cuda/. No host sync anywhere here.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>

#include <mutex>
#include <unordered_map>

#include "bindings/checks.h"
#include "bindings/linear_checks.h"
#include "bindings/plan.h"
#include "bindings/sparse_checks.h"
#include "kernels/cuda/launchers.h"

namespace flashcore::binding {
namespace {

void check_launch(cudaError_t err, const char* what) {
  FC_CHECK(err == cudaSuccess, "flashcore: ", what, " failed: ", cudaGetErrorString(err));
}

const char* dtype_name(DType d) {
  return d == DType::kFloat32 ? "float32" : d == DType::kFloat16 ? "float16" : "bfloat16";
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

std::tuple<at::Tensor, at::Tensor> paged_attention_cuda(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& row_offsets,
    const at::Tensor& cols, const at::Tensor& token_counts, const at::Tensor& q_indptr, bool causal, double sm_scale,
    int64_t window, double softcap, const std::optional<at::Tensor>& sinks, at::IntArrayRef plan,
    const std::optional<at::Tensor>& workspace) {
  PagedAttentionParams p = make_paged_attention_params(q, k_cache, v_cache, row_offsets, cols, token_counts, q_indptr,
                                                       causal, sm_scale, window, softcap, sinks);
  const AttentionPlanData planned = AttentionPlanData::decode(plan);
  planned.apply_to(p, row_offsets.numel() - 1);
  FC_CHECK(!is_cpu_kernel(planned.kernel), "paged_attention: the plan was made for the CPU; plan again for ",
           q.device());
  FC_CHECK(planned.kernel != PlanKernel::kUnsupported, "paged_attention: the CUDA kernels do not support dtype=",
           dtype_name(p.dtype), ", head_dim=", p.head_dim, ", page_size=", p.page_size, ", num_q_heads/num_kv_heads=",
           p.num_q_heads, "/", p.num_kv_heads, " with these shapes (see the README support matrix; "
           "flashcore_hf.kernel_supports tells in advance)");
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1)}, q.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  FC_CHECK(aligned16(p.k_cache) && aligned16(p.v_cache), "paged_attention: the CUDA kernels need k_cache and v_cache "
           "16-byte aligned");
  if (p.total_q == 0) return {out, lse};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  if (planned.kernel == PlanKernel::kDecode) {
    const size_t bytes = static_cast<size_t>(planned.workspace_bytes);
    at::Tensor scratch;
    void* ws_ptr = plan_workspace(workspace, planned.workspace_bytes, q, scratch);
    // A plan's own workspace (zeroed when made) keeps its split counters at zero between runs; fresh scratch has
    // none, so its splits are merged by a second kernel.
    const bool counters_zeroed = workspace.has_value();
    check_launch(launch_paged_decode(p, static_cast<int>(planned.splits), ws_ptr, bytes, counters_zeroed, stream),
                 "paged decode kernel");
    return {out, lse};
  }
  FC_CHECK(paged_prefill_supported(p), "paged_attention: the CUDA prefill kernels need q, k_cache, v_cache 16-byte "
           "aligned, q's token and head strides multiples of 8 elements and sm_scale > 0; got q strides ",
           p.q_stride_token, "/", p.q_stride_head, ", sm_scale=", p.sm_scale);
  const PrefillKernel kernel =
      planned.kernel == PlanKernel::kPrefillWgmma ? PrefillKernel::kWgmma : PrefillKernel::kMma;
  check_launch(launch_paged_prefill(p, kernel, stream), "paged prefill kernel");
  return {out, lse};
}

// a_rows values are not read on the host (no sync): the kernel treats a row index outside out_a as "no keys".
at::Tensor merge_attention_states_cuda(const at::Tensor& out_a, const at::Tensor& lse_a, const at::Tensor& out_b,
                                       const at::Tensor& lse_b, const std::optional<at::Tensor>& sinks,
                                       const std::optional<at::Tensor>& a_rows) {
  const c10::cuda::CUDAGuard guard(out_b.device());
  at::Tensor out;
  const MergeStatesParams p = make_merge_states_params(out_a, lse_a, out_b, lse_b, sinks, a_rows, out);
  check_launch(launch_merge_states(p, at::cuda::getCurrentCUDAStream()), "merge_attention_states kernel");
  return out;
}

void append_kv_cuda(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& slot_mapping, const std::optional<at::Tensor>& key_bounds,
                    const std::optional<at::Tensor>& key_signs) {
  const AppendKVParams p = make_append_kv_params(k_cache, v_cache, k, v, slot_mapping);
  FC_CHECK(key_bounds.has_value() || !key_signs.has_value(), "append_kv: key_signs needs key_bounds");
  std::optional<UpdatePageBoundsParams> bounds;
  if (key_bounds.has_value()) bounds = make_update_page_bounds_params(*key_bounds, k_cache, slot_mapping, key_signs);
  if (p.num_tokens == 0) return;
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (bounds.has_value()) {
    check_launch(launch_append_kv_with_bounds(p, *bounds, stream), "append_kv (with key bounds) kernel");
  } else {
    check_launch(launch_append_kv(p, stream), "append_kv kernel");
  }
}

std::tuple<at::Tensor, at::Tensor> select_pages_cuda(const at::Tensor& q, const at::Tensor& bounds,
                                                     const at::Tensor& table_pages, const at::Tensor& table_counts,
                                                     const at::Tensor& table_bias, int64_t budget, int64_t query_len,
                                                     const std::string& head_reduction,
                                                     const std::optional<at::Tensor>& signs) {
  SelectPagesParams p = make_select_pages_params(q, bounds, table_pages, table_counts, table_bias, budget,
                                                 query_len, head_reduction, signs);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto int_options = table_pages.options();
  at::Tensor cols = at::empty({p.batch, p.num_kv_heads, budget}, int_options);
  at::Tensor counts = at::empty({p.batch, p.num_kv_heads, budget}, int_options);
  at::Tensor scores = at::empty({int64_t(p.batch) * p.num_kv_heads, p.max_pages}, table_bias.options());
  p.out_cols = cols.data_ptr<int32_t>();
  p.out_counts = counts.data_ptr<int32_t>();
  p.scores = scores.data_ptr<float>();
  if (p.batch == 0) return {cols, counts};
  FC_CHECK(select_pages_supported(p), "select_pages: the CUDA kernels need head_dim % 4 == 0 and <= 256, q and "
           "bounds aligned to 4 elements, and batch * num_kv_heads <= 65535; got head_dim=", p.head_dim,
           ", batch * num_kv_heads=", int64_t(p.batch) * p.num_kv_heads);
  check_launch(launch_select_pages(p, at::cuda::getCurrentCUDAStream()), "select_pages kernels");
  return {cols, counts};
}

at::Tensor candidate_page_scores_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& cols,
                                      const at::Tensor& counts, const at::Tensor& forced_pages, int64_t query_len) {
  CandidateScoresParams p = make_candidate_scores_params(q, k_cache, cols, counts, forced_pages, query_len);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor scores = at::empty(cols.sizes(), cols.options().dtype(at::kFloat));
  p.scores = scores.data_ptr<float>();
  FC_CHECK(candidate_scores_supported(p), "candidate_page_scores: the CUDA kernel needs head_dim % 4 == 0 and <= 256, "
           "k_cache aligned to 4 elements, and batch * num_kv_heads <= 65535; got head_dim=", p.head_dim,
           ", batch * num_kv_heads=", int64_t(p.batch) * p.num_kv_heads);
  check_launch(launch_candidate_scores(p, at::cuda::getCurrentCUDAStream()), "candidate_page_scores kernel");
  return scores;
}

std::tuple<at::Tensor, at::Tensor> select_candidate_pages_cuda(const at::Tensor& scores, const at::Tensor& cols,
                                                               const at::Tensor& counts, int64_t budget) {
  SelectTopParams p = make_select_top_params(scores, cols, counts, budget);
  const c10::cuda::CUDAGuard guard(scores.device());
  const auto shape = select_top_output_shape(scores, budget);
  at::Tensor out_cols = at::empty(shape, cols.options());
  at::Tensor out_counts = at::empty(shape, cols.options());
  p.out_cols = out_cols.data_ptr<int32_t>();
  p.out_counts = out_counts.data_ptr<int32_t>();
  check_launch(launch_select_top(p, at::cuda::getCurrentCUDAStream()), "select_candidate_pages kernel");
  return {out_cols, out_counts};
}

// Tokens up to which a group that torch's linear runs has its GEMMs beside one another (grouped_linear_torch). At up
// to 128 tokens each of them fills a fraction of the SMs (an 8B model's k and v projections at 128 tokens: 9 us each
// for 8 MB, q 14 us for 32 MB, one after the other 31.9 us; H200, notes/decode_graphs.md); at 192 tokens gate/up
// side by side measured 0.96x, so from there on they run one after the other.
constexpr int64_t kSideBySideMaxRows = 128;

// The stream a device's side-by-side GEMMs run on: one per device, created at its first use and kept for the process
// (like torch's pool streams; one stream rather than the pool's round robin, so cuBLAS keeps one more workspace, not
// one per pool stream).
at::cuda::CUDAStream side_stream(c10::DeviceIndex device) {
  static std::mutex mutex;
  static std::unordered_map<c10::DeviceIndex, cudaStream_t> streams;
  const std::lock_guard<std::mutex> lock(mutex);
  auto found = streams.find(device);
  if (found == streams.end()) {
    cudaStream_t stream = nullptr;
    check_launch(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    found = streams.emplace(device, stream).first;
  }
  return at::cuda::getStreamFromExternal(found->second, device);
}

// torch's linear once per weight (grouped_linear_reference's results, bit for bit). A group of several weights at up
// to kSideBySideMaxRows tokens runs its first weight on the caller's stream and the others, in order, on the device's
// side stream, forked from the caller's by an event and joined back before returning (in a CUDA graph: two parallel
// branches); the outputs are allocated on the caller's stream, which alone ever owns them.
std::vector<at::Tensor> grouped_linear_torch(const at::Tensor& x, const at::TensorList weights,
                                             const c10::List<std::optional<at::Tensor>>& biases) {
  const int64_t k = x.size(-1), m = k > 0 ? x.numel() / k : 0;
  if (weights.size() < 2 || m == 0 || m > kSideBySideMaxRows) return grouped_linear_reference(x, weights, biases);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor rows = x.reshape({m, k});
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  std::vector<at::Tensor> outs;
  for (const at::Tensor& w : weights) {
    out_shape.back() = w.size(0);
    outs.push_back(at::empty(out_shape, x.options()));
  }
  // What at::linear runs for these shapes: addmm with a bias, else mm, on the [m, k] rows.
  auto linear_into = [&](size_t i) {
    at::Tensor out = outs[i].view({m, weights[i].size(0)});
    const std::optional<at::Tensor> b = biases.get(i);
    if (b.has_value()) {
      at::addmm_out(out, *b, rows, weights[i].t());
    } else {
      at::mm_out(out, rows, weights[i].t());
    }
  };
  const at::cuda::CUDAStream caller = at::cuda::getCurrentCUDAStream();
  const at::cuda::CUDAStream side = side_stream(x.device().index());
  at::cuda::CUDAEvent forked, joined;
  forked.record(caller);
  forked.block(side);
  {
    const c10::cuda::CUDAStreamGuard on_side(side);
    for (size_t i = 1; i < weights.size(); ++i) linear_into(i);
  }
  joined.record(side);
  linear_into(0);
  joined.block(caller);
  return outs;
}

// One kernel launch for every weight when the kernel takes the call and is the faster way
// (grouped_linear_prefers_kernel: at most GroupedLinearParams::kMaxRows tokens, ...), else torch's linear once per
// weight (grouped_linear_torch): the same results up to rounding either way.
std::vector<at::Tensor> grouped_linear_cuda(const at::Tensor& x, const at::TensorList weights,
                                            const c10::List<std::optional<at::Tensor>>& biases) {
  check_grouped_linear(x, weights, biases);
  const int64_t k = x.size(-1), m = k > 0 ? x.numel() / k : 0;
  bool fits = weights.size() <= size_t(GroupedLinearParams::kMaxWeights) && m >= 1 &&
              m <= GroupedLinearParams::kMaxRows && k <= INT32_MAX &&
              (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16);
  for (size_t i = 0; fits && i < weights.size(); ++i) {
    const std::optional<at::Tensor> b = biases.get(i);
    fits = weights[i].is_contiguous() && weights[i].size(0) <= INT32_MAX && (!b.has_value() || b->is_contiguous());
  }
  if (!fits) return grouped_linear_torch(x, weights, biases);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor rows = x.reshape({m, k});
  // Rows the kernels can read in place: unit element stride, 16-byte row stride, and rows that do not overlap (an
  // expanded x has row stride 0, which a TMA map cannot describe).
  const bool in_place = rows.stride(1) == 1 && rows.stride(0) % 8 == 0 && (m == 1 || rows.stride(0) >= k);
  const at::Tensor x2 = in_place ? rows : rows.contiguous();
  GroupedLinearParams p;
  p.x = x2.data_ptr();
  p.x_stride = x2.stride(0);
  p.m = static_cast<int32_t>(m);
  p.k = static_cast<int32_t>(k);
  p.num_weights = static_cast<int32_t>(weights.size());
  p.dtype = x.scalar_type() == at::kHalf ? DType::kFloat16 : DType::kBFloat16;
  for (size_t i = 0; i < weights.size(); ++i) {
    p.weights[i] = weights[i].data_ptr();
    const std::optional<at::Tensor> b = biases.get(i);
    p.biases[i] = b.has_value() ? b->data_ptr() : nullptr;
    p.n[i] = static_cast<int32_t>(weights[i].size(0));
  }
  const cudaDeviceProp* props = at::cuda::getDeviceProperties(x.device().index());
  const GroupedLinearDevice device{props->multiProcessorCount, props->major, props->minor};
  if (!grouped_linear_prefers_kernel(p, device)) return grouped_linear_torch(x, weights, biases);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  std::vector<at::Tensor> outs;
  for (size_t i = 0; i < weights.size(); ++i) {
    out_shape.back() = weights[i].size(0);
    outs.push_back(at::empty(out_shape, x.options()));
    p.outs[i] = outs.back().data_ptr();
  }
  check_launch(launch_grouped_linear(p, device, at::cuda::getCurrentCUDAStream()), "grouped_linear kernel");
  return outs;
}

}  // namespace

AttentionPlanData plan_cuda(const PagedAttentionParams& p, int64_t device_index, bool exact) {
  AttentionPlanData d;
  const int device = device_index >= 0 ? static_cast<int>(device_index) : at::cuda::current_device();
  const cudaDeviceProp* props = at::cuda::getDeviceProperties(device);
  // Decode: few queries per sequence (exactly known, or on average when the plan only knows the shapes: the decode
  // kernel covers any count), and always for per-(sequence, kv head) page lists, which only it reads.
  const bool few_queries = p.max_q_len <= kDecodeMaxQueriesPerSeq ||
                           (!exact && p.total_q <= kDecodeQueriesPerSequence * std::max(p.batch, 1));
  if ((few_queries || p.per_kv_head_rows) && paged_decode_supported(p)) {
    // Split-KV partition from the longest row when it is known, else from the average row.
    const int rows = p.per_kv_head_rows ? p.batch * p.num_kv_heads : p.batch;
    const int pages = exact ? p.max_pages_per_seq : static_cast<int>((int64_t(p.nnz) + rows - 1) / std::max(rows, 1));
    d.kernel = PlanKernel::kDecode;
    d.splits = paged_decode_splits(p, props->multiProcessorCount, pages);
    d.workspace_bytes = static_cast<int64_t>(paged_decode_workspace_bytes(p, static_cast<int>(d.splits)));
    d.split_counter_bytes = static_cast<int64_t>(paged_decode_counter_bytes(p, static_cast<int>(d.splits)));
    return d;
  }
  if (p.per_kv_head_rows || !paged_prefill_supported(p)) return d;
  d.kernel = paged_prefill_wgmma_applies(p, props->major, props->minor) ? PlanKernel::kPrefillWgmma
                                                                         : PlanKernel::kPrefillMma;
  return d;
}

}  // namespace flashcore::binding

TORCH_LIBRARY_IMPL(flashcore, CUDA, m) {
  m.impl("paged_attention", &flashcore::binding::paged_attention_cuda);
  m.impl("append_kv", &flashcore::binding::append_kv_cuda);
  m.impl("merge_attention_states", &flashcore::binding::merge_attention_states_cuda);
  m.impl("select_pages", &flashcore::binding::select_pages_cuda);
  m.impl("candidate_page_scores", &flashcore::binding::candidate_page_scores_cuda);
  m.impl("select_candidate_pages", &flashcore::binding::select_candidate_pages_cuda);
  m.impl("grouped_linear", &flashcore::binding::grouped_linear_cuda);
}
