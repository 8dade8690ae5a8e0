// CPU implementation of the sparse selection ops (schema in ops.cpp; CUDA in ops_cuda.cpp; append_kv's key bounds are
// in ops.cpp).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "bindings/sparse_checks.h"
#include "kernels/cpu/cpu_kernels.h"

namespace flashcore::binding {
namespace {

std::tuple<at::Tensor, at::Tensor> select_pages_cpu(const at::Tensor& q, const at::Tensor& bounds,
                                                    const at::Tensor& table_pages, const at::Tensor& table_counts,
                                                    const at::Tensor& table_bias, int64_t budget, int64_t query_len,
                                                    const std::string& head_reduction,
                                                    const std::optional<at::Tensor>& signs) {
  SelectPagesParams p = make_select_pages_params(q, bounds, table_pages, table_counts, table_bias, budget,
                                                 query_len, head_reduction, signs);
  const auto int_options = table_pages.options();
  at::Tensor cols = at::empty({p.batch, p.num_kv_heads, budget}, int_options);
  at::Tensor counts = at::empty({p.batch, p.num_kv_heads, budget}, int_options);
  p.out_cols = cols.data_ptr<int32_t>();
  p.out_counts = counts.data_ptr<int32_t>();
  at::parallel_for(0, cpu::select_pages_work_items(p), 1,
                   [&](int64_t begin, int64_t end) { cpu::select_pages(p, begin, end); });
  return {cols, counts};
}

at::Tensor candidate_page_scores_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& cols,
                                     const at::Tensor& counts, const at::Tensor& forced_pages, int64_t query_len) {
  CandidateScoresParams p = make_candidate_scores_params(q, k_cache, cols, counts, forced_pages, query_len);
  at::Tensor scores = at::empty(cols.sizes(), cols.options().dtype(at::kFloat));
  p.scores = scores.data_ptr<float>();
  at::parallel_for(0, cpu::candidate_scores_work_items(p), 1,
                   [&](int64_t begin, int64_t end) { cpu::candidate_scores(p, begin, end); });
  return scores;
}

std::tuple<at::Tensor, at::Tensor> select_candidate_pages_cpu(const at::Tensor& scores, const at::Tensor& cols,
                                                              const at::Tensor& counts, int64_t budget) {
  SelectTopParams p = make_select_top_params(scores, cols, counts, budget);
  const auto shape = select_top_output_shape(scores, budget);
  at::Tensor out_cols = at::empty(shape, cols.options());
  at::Tensor out_counts = at::empty(shape, cols.options());
  p.out_cols = out_cols.data_ptr<int32_t>();
  p.out_counts = out_counts.data_ptr<int32_t>();
  at::parallel_for(0, cpu::select_top_work_items(p), 1,
                   [&](int64_t begin, int64_t end) { cpu::select_top(p, begin, end); });
  return {out_cols, out_counts};
}

}  // namespace
}  // namespace flashcore::binding

TORCH_LIBRARY_IMPL(flashcore, CPU, m) {
  m.impl("select_pages", &flashcore::binding::select_pages_cpu);
  m.impl("candidate_page_scores", &flashcore::binding::candidate_page_scores_cpu);
  m.impl("select_candidate_pages", &flashcore::binding::select_candidate_pages_cpu);
}
