// "topk" page selection (page bounds, or key signs and bounds), the rerank stage's pick among candidate scores and
// the decode-step bounds update on the host (contracts: SelectPagesParams, SelectTopParams and
// UpdatePageBoundsParams in params.h). Same results as the CUDA kernels up to float rounding of the scores.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "cpu_kernels.h"
#include "float_convert.h"

namespace flashcore::cpu {
namespace {

// IEEE total order as a uint32 (the CUDA select's order_key): -NaN < -inf < ... < -0 < +0 < ... < +inf < +NaN.
uint32_t order_key(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Row `row` of p's outputs from that row's scores (order: scratch of max_pages entries).
void select_top_row(const SelectTopParams& p, int64_t row, const float* row_scores, std::vector<uint32_t>& keys,
                    std::vector<int32_t>& order) {
  const int64_t m = p.max_pages;
  for (int64_t j = 0; j < m; ++j) keys[j] = order_key(row_scores[j]);
  // The budget best (ties: lower index first), then back into index (key) order.
  std::iota(order.begin(), order.end(), 0);
  const auto better = [&](int32_t a, int32_t c) { return keys[a] > keys[c] || (keys[a] == keys[c] && a < c); };
  std::nth_element(order.begin(), order.begin() + (p.budget - 1), order.end(), better);
  std::sort(order.begin(), order.begin() + p.budget);
  const int64_t table_row = row / p.rows_per_table * m;
  for (int64_t i = 0; i < p.budget; ++i) {
    p.out_cols[row * p.budget + i] = p.table_pages[table_row + order[i]];
    p.out_counts[row * p.budget + i] = p.table_counts[table_row + order[i]];
  }
}

}  // namespace

void select_top(const SelectTopParams& p, int64_t begin, int64_t end) {
  std::vector<uint32_t> keys(p.max_pages);
  std::vector<int32_t> order(p.max_pages);
  for (int64_t row = begin; row < end; ++row) select_top_row(p, row, p.scores + row * p.max_pages, keys, order);
}

void select_pages(const SelectPagesParams& p, int64_t begin, int64_t end) {
  const int64_t d = p.head_dim, m = p.max_pages;
  const int group = p.num_q_heads / p.num_kv_heads;
  constexpr float kInf = std::numeric_limits<float>::infinity();
  std::vector<float> scores(m);
  std::vector<uint32_t> keys(m);
  std::vector<int32_t> order(m);
  SelectTopParams top;
  top.table_pages = p.table_pages;
  top.table_counts = p.table_counts;
  top.out_cols = p.out_cols;
  top.out_counts = p.out_counts;
  top.rows = p.batch * p.num_kv_heads;
  top.rows_per_table = p.num_kv_heads;
  top.max_pages = p.max_pages;
  top.budget = p.budget;
  for (int64_t row = begin; row < end; ++row) {  // row = b * Hkv + h
    const int64_t b = row / p.num_kv_heads, h = row % p.num_kv_heads;
    for (int64_t j = 0; j < m; ++j) {
      const int32_t page = p.table_pages[b * m + j];
      if (page < 0 || page >= p.num_bound_rows) {
        scores[j] = -kInf;
        continue;
      }
      const int64_t bound_row = (int64_t(page) * p.num_kv_heads + h) * 2 * d;
      // With signs: the page's keys, each as sign bits (a key's bit set: estimate max[e], else min[e]).
      const int32_t keys = p.signs ? std::clamp(p.table_counts[b * m + j], 0, p.page_size) : 0;
      const uint8_t* page_signs =
          p.signs ? p.signs + (int64_t(page) * p.num_kv_heads + h) * p.page_size * p.sign_bytes : nullptr;
      float reduced = 0.f;
      for (int qi = 0; qi < p.query_len; ++qi) {
        for (int g = 0; g < group; ++g) {
          const int64_t q_row = (b * p.query_len + qi) * p.q_stride_token + (h * group + g) * p.q_stride_head;
          float dot = 0.f;
          if (page_signs == nullptr) {
            for (int64_t e = 0; e < d; ++e) {
              const float q = load_as_float(p.q, q_row + e, p.q_dtype);
              dot += std::max(q, 0.f) * load_as_float(p.bounds, bound_row + e, p.bounds_dtype) +
                     std::min(q, 0.f) * load_as_float(p.bounds, bound_row + d + e, p.bounds_dtype);
            }
          } else {
            dot = -kInf;
            for (int32_t t = 0; t < keys; ++t) {
              const uint8_t* bits = page_signs + int64_t(t) * p.sign_bytes;
              float estimate = 0.f;
              for (int64_t e = 0; e < d; ++e) {
                const bool positive = (bits[e / 8] >> (e % 8)) & 1;
                estimate += load_as_float(p.q, q_row + e, p.q_dtype) *
                            load_as_float(p.bounds, bound_row + (positive ? 0 : d) + e, p.bounds_dtype);
              }
              dot = std::max(dot, estimate);
            }
          }
          const bool first = qi == 0 && g == 0;
          reduced = first ? dot : (p.head_reduce_sum ? reduced + dot : std::max(reduced, dot));
        }
      }
      const float bias = p.table_bias[b * m + j];
      scores[j] = std::isinf(bias) ? bias : (std::isnan(reduced) ? kInf : reduced + bias);
    }
    select_top_row(top, row, scores.data(), keys, order);
  }
}

void update_page_bounds(const UpdatePageBoundsParams& p) {
  const int64_t d = p.head_dim, per_token = int64_t(p.num_kv_heads) * d;
  const int64_t num_slots = int64_t(p.num_pages) * p.page_size;
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    const int64_t slot = p.slot_is_int64 ? static_cast<const int64_t*>(p.slot_mapping)[t]
                                         : static_cast<const int32_t*>(p.slot_mapping)[t];
    if (slot < 0 || slot >= num_slots) continue;
    const int64_t page = slot / p.page_size;
    if (page >= p.num_bound_rows) continue;
    const bool first = slot % p.page_size == 0;
    for (int64_t h = 0; h < p.num_kv_heads; ++h) {
      const int64_t row = (page * p.num_kv_heads + h) * 2 * d;
      for (int64_t e = 0; e < d; ++e) {
        const float key = load_as_float(p.k_cache, slot * per_token + h * d + e, p.k_dtype);
        const float hi = load_as_float(p.bounds, row + e, p.bounds_dtype);
        const float lo = load_as_float(p.bounds, row + d + e, p.bounds_dtype);
        store_from_float(p.bounds, row + e, first ? key : std::max(hi, key), p.bounds_dtype);
        store_from_float(p.bounds, row + d + e, first ? key : std::min(lo, key), p.bounds_dtype);
      }
      if (p.signs != nullptr) {
        uint8_t* bytes = p.signs + ((page * p.num_kv_heads + h) * p.page_size + slot % p.page_size) * p.sign_bytes;
        for (int64_t j = 0; j < p.sign_bytes; ++j) bytes[j] = 0;
        for (int64_t e = 0; e < d; ++e) {
          if (load_as_float(p.k_cache, slot * per_token + h * d + e, p.k_dtype) > 0.f) bytes[e / 8] |= 1u << (e % 8);
        }
      }
    }
  }
}

}  // namespace flashcore::cpu
