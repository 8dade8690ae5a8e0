// Exact scores of the rerank stage's candidate pages on the host (contract: CandidateScoresParams in params.h).
#include <algorithm>
#include <limits>

#include "cpu_kernels.h"
#include "float_convert.h"

namespace flashcore::cpu {

void candidate_scores(const CandidateScoresParams& p, int64_t begin, int64_t end) {
  const int64_t d = p.head_dim, c_count = p.candidates;
  const int group = p.num_q_heads / p.num_kv_heads;
  const int64_t token_stride = int64_t(p.num_kv_heads) * d;
  constexpr float kInf = std::numeric_limits<float>::infinity();
  for (int64_t row = begin; row < end; ++row) {  // row = b * Hkv + h
    const int64_t b = row / p.num_kv_heads, h = row % p.num_kv_heads;
    for (int64_t c = 0; c < c_count; ++c) {
      const int32_t page = p.cols[row * c_count + c];
      const int32_t keys = std::min(p.counts[row * c_count + c], p.page_size);
      float score = -kInf;
      if (keys > 0 && page >= 0 && page < p.num_pages) {
        const bool forced = std::any_of(p.forced + b * p.num_forced, p.forced + (b + 1) * p.num_forced,
                                        [page](int32_t f) { return f == page; });
        if (forced) {
          score = kInf;
        } else {
          for (int32_t t = 0; t < keys; ++t) {
            const int64_t k_row = (int64_t(page) * p.page_size + t) * token_stride + h * d;
            for (int qi = 0; qi < p.query_len; ++qi) {
              for (int g = 0; g < group; ++g) {
                const int64_t q_row = (b * p.query_len + qi) * p.q_stride_token + (h * group + g) * p.q_stride_head;
                float dot = 0.f;
                for (int64_t e = 0; e < d; ++e)
                  dot += load_as_float(p.q, q_row + e, p.dtype) * load_as_float(p.k_cache, k_row + e, p.dtype);
                score = std::max(score, dot);
              }
            }
          }
        }
      }
      p.scores[row * c_count + c] = score;
    }
  }
}

}  // namespace flashcore::cpu
