// Argument checks of flashcore::grouped_linear, shared by its CPU and CUDA implementations.
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>

#include "bindings/message.h"

namespace flashcore::binding {

// x [..., k]; weights: 1 or more [n_i, k]; biases: one entry per weight, None or [n_i]; all on x's device in x's
// dtype. Names the offending argument.
inline void check_grouped_linear(const at::Tensor& x, const at::TensorList weights,
                                 const c10::List<std::optional<at::Tensor>>& biases) {
  constexpr const char* op = "grouped_linear";
  FC_CHECK(x.dim() >= 1, op, ": x must have at least one dimension");
  FC_CHECK(!weights.empty(), op, ": weights must not be empty");
  FC_CHECK(biases.size() == weights.size(), op, ": biases must have one entry (a tensor or None) per weight, got ",
           static_cast<int64_t>(biases.size()), " for ", static_cast<int64_t>(weights.size()), " weights");
  const int64_t k = x.size(-1);
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    FC_CHECK(w.dim() == 2 && w.size(1) == k, op, ": weights[", static_cast<int64_t>(i), "] must be [n, ", k,
             "] (x's last dimension), got shape ", w.sizes());
    FC_CHECK(w.scalar_type() == x.scalar_type(), op, ": weights[", static_cast<int64_t>(i), "] must have x's dtype ",
             x.scalar_type(), ", got ", w.scalar_type());
    FC_CHECK(w.device() == x.device(), op, ": weights[", static_cast<int64_t>(i), "] must be on x's device ",
             x.device(), ", got ", w.device());
    const std::optional<at::Tensor> b = biases.get(i);
    if (!b.has_value()) continue;
    FC_CHECK(b->dim() == 1 && b->size(0) == w.size(0), op, ": biases[", static_cast<int64_t>(i), "] must be [",
             w.size(0), "], got shape ", b->sizes());
    FC_CHECK(b->scalar_type() == x.scalar_type() && b->device() == x.device(), op, ": biases[",
             static_cast<int64_t>(i), "] must have x's dtype and device");
  }
}

// torch.nn.functional.linear once per weight (the CPU implementation; the CUDA one for what its kernel does not
// cover). Defined in linear_ops.cpp.
std::vector<at::Tensor> grouped_linear_reference(const at::Tensor& x, const at::TensorList weights,
                                                 const c10::List<std::optional<at::Tensor>>& biases);

}  // namespace flashcore::binding
