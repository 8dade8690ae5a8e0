// CPU paged attention: for each (sequence, kv head) gather that head's keys/values into float buffers once, then
// every query head of the group and every query reads them. Visible keys of a query form one contiguous range
// (positions are key indices), so each row is an exact two-pass softmax over that range in fp32.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_kernels.h"
#include "float_convert.h"

namespace flashcore::cpu {
namespace {

// Copies the keys (or values) that kv head h of sequence b reads into dst [n_k, D] as float.
void gather_head(const PagedAttentionParams& p, const void* cache, int b, int h, std::vector<float>& dst) {
  const int layout_row = p.per_kv_head_rows ? b * p.num_kv_heads + h : b;
  const int64_t D = p.head_dim;
  const int64_t token_stride = int64_t(p.num_kv_heads) * D;
  const int64_t page_stride = int64_t(p.page_size) * token_stride;
  int64_t row = 0;  // key index within the sequence
  for (int j = p.row_offsets[layout_row]; j < p.row_offsets[layout_row + 1]; ++j) {
    const int64_t page_base = int64_t(p.cols[j]) * page_stride + h * D;
    for (int t = 0; t < p.token_counts[j]; ++t, ++row) {
      const int64_t src = page_base + t * token_stride;
      float* out = dst.data() + row * D;
      for (int64_t d = 0; d < D; ++d) out[d] = load_as_float(cache, src + d, p.dtype);
    }
  }
}

}  // namespace

void paged_attention(const PagedAttentionParams& p, int64_t begin, int64_t end) {
  const int group = p.num_q_heads / p.num_kv_heads;
  const int64_t D = p.head_dim;
  std::vector<float> keys, values, scores, q_row(D), acc(D);
  for (int64_t item = begin; item < end; ++item) {
    const int b = static_cast<int>(item / p.num_kv_heads);
    const int kvh = static_cast<int>(item % p.num_kv_heads);
    const int q_begin = p.q_indptr[b], n_q = p.q_indptr[b + 1] - q_begin;
    if (n_q <= 0) continue;
    const int row = p.per_kv_head_rows ? b * p.num_kv_heads + kvh : b;
    int64_t n_k = 0;
    for (int j = p.row_offsets[row]; j < p.row_offsets[row + 1]; ++j) n_k += p.token_counts[j];
    keys.resize(n_k * D);
    values.resize(n_k * D);
    scores.resize(std::max<int64_t>(n_k, 1));
    gather_head(p, p.k_cache, b, kvh, keys);
    gather_head(p, p.v_cache, b, kvh, values);

    for (int g = 0; g < group; ++g) {
      const int qh = kvh * group + g;
      for (int i = 0; i < n_q; ++i) {
        const int64_t token = q_begin + i;
        const int64_t q_pos = n_k - n_q + i;
        int64_t lo = 0, hi = n_k;  // visible keys [lo, hi)
        if (p.causal) hi = std::min<int64_t>(hi, q_pos + 1);
        if (p.window > 0) lo = std::max<int64_t>(lo, q_pos - p.window + 1);
        const int64_t out_base = (token * p.num_q_heads + qh) * D;
        const float sink = p.sinks ? p.sinks[qh] : -std::numeric_limits<float>::infinity();
        if (lo >= hi) {
          for (int64_t d = 0; d < D; ++d) store_from_float(p.out, out_base + d, 0.f, p.dtype);
          p.lse[token * p.num_q_heads + qh] = sink;
          continue;
        }
        const int64_t q_base = token * p.q_stride_token + qh * p.q_stride_head;
        for (int64_t d = 0; d < D; ++d) q_row[d] = load_as_float(p.q, q_base + d, p.dtype) * p.sm_scale;
        float row_max = -std::numeric_limits<float>::infinity();
        for (int64_t k = lo; k < hi; ++k) {
          const float* key = keys.data() + k * D;
          float s = 0.f;
          for (int64_t d = 0; d < D; ++d) s += q_row[d] * key[d];
          if (p.softcap > 0.f) s = p.softcap * std::tanh(s / p.softcap);
          scores[k] = s;
          row_max = std::max(row_max, s);
        }
        row_max = std::max(row_max, sink);  // the sink joins the denominator only
        std::fill(acc.begin(), acc.end(), 0.f);
        float denom = p.sinks ? std::exp(sink - row_max) : 0.f;
        for (int64_t k = lo; k < hi; ++k) {
          const float w = std::exp(scores[k] - row_max);
          denom += w;
          const float* value = values.data() + k * D;
          for (int64_t d = 0; d < D; ++d) acc[d] += w * value[d];
        }
        const float inv = 1.f / denom;
        for (int64_t d = 0; d < D; ++d) store_from_float(p.out, out_base + d, acc[d] * inv, p.dtype);
        p.lse[token * p.num_q_heads + qh] = row_max + std::log(denom);
      }
    }
  }
}

}  // namespace flashcore::cpu
