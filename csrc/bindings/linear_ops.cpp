// CPU implementation of flashcore::grouped_linear (schema in ops.cpp; the CUDA one in ops_cuda.cpp): the reference
// semantics, torch.nn.functional.linear once per weight.
#include <torch/library.h>
#include <ATen/ATen.h>

#include "bindings/linear_checks.h"

namespace flashcore::binding {

std::vector<at::Tensor> grouped_linear_reference(const at::Tensor& x, const at::TensorList weights,
                                                 const c10::List<std::optional<at::Tensor>>& biases) {
  std::vector<at::Tensor> outs;
  outs.reserve(weights.size());
  for (size_t i = 0; i < weights.size(); ++i) outs.push_back(at::linear(x, weights[i], biases.get(i)));
  return outs;
}

namespace {

std::vector<at::Tensor> grouped_linear_cpu(const at::Tensor& x, const at::TensorList weights,
                                           const c10::List<std::optional<at::Tensor>>& biases) {
  check_grouped_linear(x, weights, biases);
  return grouped_linear_reference(x, weights, biases);
}

}  // namespace
}  // namespace flashcore::binding

TORCH_LIBRARY_IMPL(flashcore, CPU, m) { m.impl("grouped_linear", &flashcore::binding::grouped_linear_cpu); }
