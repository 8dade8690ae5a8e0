// Exact scores of the rerank stage's candidate pages on the host (contract: CandidateScoresParams in params.h). Each
// (sequence, kv head) row converts its query heads to fp32 once and each key once, then dots the key with every head.
#include <algorithm>
#include <limits>
#include <vector>

#include "cpu_kernels.h"
#include "float_convert.h"

namespace flashcore::cpu {

void candidate_scores(const CandidateScoresParams& p, int64_t begin, int64_t end) {
  const int64_t d = p.head_dim, c_count = p.candidates;
  const int group = p.num_q_heads / p.num_kv_heads, heads = p.query_len * group;
  const int64_t token_stride = int64_t(p.num_kv_heads) * d;
  constexpr float kInf = std::numeric_limits<float>::infinity();
  std::vector<float> queries(heads * d), key(d);
  for (int64_t row = begin; row < end; ++row) {  // row = b * Hkv + h
    const int64_t b = row / p.num_kv_heads, h = row % p.num_kv_heads;
    for (int qi = 0; qi < p.query_len; ++qi) {
      for (int g = 0; g < group; ++g) {
        const int64_t q_row = (b * p.query_len + qi) * p.q_stride_token + (h * group + g) * p.q_stride_head;
        for (int64_t e = 0; e < d; ++e) queries[(qi * group + g) * d + e] = load_as_float(p.q, q_row + e, p.dtype);
      }
    }
    const int32_t* forced = p.forced + b * p.num_forced;
    for (int64_t c = 0; c < c_count; ++c) {
      const int32_t page = p.cols[row * c_count + c];
      const int32_t keys = std::min(p.counts[row * c_count + c], p.page_size);
      float score = -kInf;
      if (keys > 0 && page >= 0 && page < p.num_pages) {
        if (std::find(forced, forced + p.num_forced, page) != forced + p.num_forced) {
          score = kInf;
        } else {
          for (int32_t t = 0; t < keys; ++t) {
            const int64_t k_row = (int64_t(page) * p.page_size + t) * token_stride + h * d;
            for (int64_t e = 0; e < d; ++e) key[e] = load_as_float(p.k_cache, k_row + e, p.dtype);
            for (int qh = 0; qh < heads; ++qh) {
              const float* q = queries.data() + qh * d;
              float dot = 0.f;
              for (int64_t e = 0; e < d; ++e) dot += q[e] * key[e];
              score = std::max(score, dot);
            }
          }
        }
      }
      p.scores[row * c_count + c] = score;
    }
  }
}

}  // namespace flashcore::cpu
