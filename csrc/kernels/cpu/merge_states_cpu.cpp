// CPU merge of two attention states (MergeStatesParams in params.h): one pass per (row, head).
#include <cmath>
#include <limits>

#include "../merge_states_math.h"
#include "cpu_kernels.h"
#include "float_convert.h"

namespace flashcore::cpu {

void merge_states(const MergeStatesParams& p, int64_t begin, int64_t end) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int64_t row = begin; row < end; ++row) {  // row = t * num_heads + h
    const int64_t t = row / p.num_heads, h = row % p.num_heads;
    const int64_t a = p.a_rows ? p.a_rows[t] : t;
    const bool has_a = a >= 0 && a < p.rows_a;
    const float lse_a = has_a ? p.lse_a[a * p.num_heads + h] : kNegInf;
    const MergeWeights w = merge_weights(lse_a, p.lse_b[row], p.sinks ? p.sinks[h] : kNegInf);
    const int64_t a_base = (a * p.num_heads + h) * p.head_dim, base = row * p.head_dim;
    for (int d = 0; d < p.head_dim; ++d) {
      const float va = w.a != 0.f ? load_as_float(p.out_a, a_base + d, p.dtype) : 0.f;
      const float vb = w.b != 0.f ? load_as_float(p.out_b, base + d, p.dtype) : 0.f;
      store_from_float(p.out, base + d, w.a * va + w.b * vb, p.dtype);
    }
  }
}

}  // namespace flashcore::cpu
