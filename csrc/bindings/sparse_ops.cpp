// CPU implementations of the sparse selection ops (schemas in ops.cpp; CUDA ones in ops_cuda.cpp).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <set>

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

void update_page_bounds_cpu(at::Tensor& bounds, const at::Tensor& k_cache, const at::Tensor& slot_mapping,
                            const std::optional<at::Tensor>& signs) {
  constexpr const char* op = "update_page_bounds";
  const UpdatePageBoundsParams p = make_update_page_bounds_params(bounds, k_cache, slot_mapping, signs);
  const at::Tensor slots = slot_mapping.to(at::kLong);
  const int64_t* s = slots.data_ptr<int64_t>();
  const int64_t num_slots = int64_t(p.num_pages) * p.page_size;
  std::set<int64_t> pages;
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    if (s[t] < 0) continue;
    FC_CHECK(s[t] < num_slots, op, ": slot_mapping[", t, "] = ", s[t], " is outside the cache's ", num_slots,
             " slots; negative slots mean 'skip'");
    FC_CHECK(s[t] / p.page_size < p.num_bound_rows, op, ": slot_mapping[", t, "] = ", s[t], " is on page ",
             s[t] / p.page_size, ", which has no bounds row (bounds.size(0) = ", p.num_bound_rows, ")");
    FC_CHECK(pages.insert(s[t] / p.page_size).second, op, ": slot_mapping[", t, "] = ", s[t], " is on page ",
             s[t] / p.page_size, " like an earlier slot; one new token per page per call");
  }
  cpu::update_page_bounds(p);
}

}  // namespace
}  // namespace flashcore::binding

TORCH_LIBRARY_IMPL(flashcore, CPU, m) {
  m.impl("select_pages", &flashcore::binding::select_pages_cpu);
  m.impl("update_page_bounds", &flashcore::binding::update_page_bounds_cpu);
}
