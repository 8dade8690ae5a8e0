// append_kv on the host: copy each token's K/V rows into its page slot (negative slot = padding, skipped).
#include <cstring>

#include "cpu_kernels.h"
#include "float_convert.h"

namespace flashcore::cpu {

void append_kv(const AppendKVParams& p, int64_t begin, int64_t end) {
  const int64_t D = p.head_dim;
  const int64_t token_stride = int64_t(p.num_kv_heads) * D;
  const int64_t num_slots = int64_t(p.num_pages) * p.page_size;
  const int64_t elem = dtype_size(p.dtype);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t slot = p.slot_is_int64 ? static_cast<const int64_t*>(p.slot_mapping)[t]
                                         : static_cast<const int32_t*>(p.slot_mapping)[t];
    if (slot < 0 || slot >= num_slots) continue;  // padding token (the binding rejects slot >= num_slots)
    for (int64_t h = 0; h < p.num_kv_heads; ++h) {
      char* k_dst = static_cast<char*>(p.k_cache) + (slot * token_stride + h * D) * elem;
      char* v_dst = static_cast<char*>(p.v_cache) + (slot * token_stride + h * D) * elem;
      const char* k_src = static_cast<const char*>(p.k) + (t * p.k_stride_token + h * p.k_stride_head) * elem;
      const char* v_src = static_cast<const char*>(p.v) + (t * p.v_stride_token + h * p.v_stride_head) * elem;
      std::memcpy(k_dst, k_src, D * elem);
      std::memcpy(v_dst, v_src, D * elem);
    }
  }
}

}  // namespace flashcore::cpu
