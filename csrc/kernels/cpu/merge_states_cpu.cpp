// CPU merge of attention states (MergeStatesParams in params.h): one pass per (row, head).
#include <cmath>
#include <limits>

#include "../merge_states_math.h"
#include "cpu_kernels.h"
#include "float_convert.h"

namespace flashcore::cpu {

void merge_states(const MergeStatesParams& p, int64_t begin, int64_t end) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t split_stride = int64_t(p.rows_a) * p.num_heads;  // between part a's splits, in (row, head) rows
  for (int64_t row = begin; row < end; ++row) {  // row = t * num_heads + h
    const int64_t t = row / p.num_heads, h = row % p.num_heads;
    const int64_t a = p.a_rows ? p.a_rows[t] : t;
    const bool has_a = a >= 0 && a < p.rows_a;
    const int64_t a_row = a * p.num_heads + h;
    const float* lse_a = has_a ? p.lse_a + a_row : nullptr;
    const MergeScale scale = merge_scale(lse_a, p.a_splits, split_stride, p.lse_b[row], p.sinks ? p.sinks[h] : kNegInf);
    const float w_b = scale.weight(p.lse_b[row]);
    const int64_t base = row * p.head_dim;
    for (int d = 0; d < p.head_dim; ++d) {
      float acc = 0.f;
      for (int s = 0; has_a && s < p.a_splits; ++s) {
        const float w = scale.weight(lse_a[s * split_stride]);
        if (w != 0.f) acc += w * load_as_float(p.out_a, (s * split_stride + a_row) * p.head_dim + d, p.dtype);
      }
      if (w_b != 0.f) acc += w_b * load_as_float(p.out_b, base + d, p.dtype);
      store_from_float(p.out, base + d, acc, p.dtype);
    }
  }
}

}  // namespace flashcore::cpu
