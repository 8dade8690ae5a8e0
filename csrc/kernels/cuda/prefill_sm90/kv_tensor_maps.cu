// Host encoding of the TMA tensor maps over the paged K/V pools (see kv_tensor_maps.h).
#include "kv_tensor_maps.h"

#include <cstdint>

#include "../common/tensor_map_encoder.h"

namespace flashcore {
namespace prefill_sm90 {
namespace {

bool encode_pool(CUtensorMap* map, const void* pool, const PagedAttentionParams& p, int box_rows) {
  const cuuint64_t elem = 2;
  const cuuint64_t dims[4] = {(cuuint64_t)p.head_dim, (cuuint64_t)p.num_kv_heads, (cuuint64_t)p.page_size,
                              (cuuint64_t)p.num_pages};
  const cuuint64_t strides[3] = {elem * p.head_dim, elem * p.head_dim * p.num_kv_heads,
                                 elem * p.head_dim * p.num_kv_heads * p.page_size};
  const cuuint32_t box[4] = {64, 1, (cuuint32_t)box_rows, 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  const CUtensorMapDataType type =
      p.dtype == DType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  return tensor_map_encoder()(map, type, 4, const_cast<void*>(pool), dims, strides, box, element_strides,
                              CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                              CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace

KvTensorMaps encode_kv_tensor_maps(const PagedAttentionParams& p) {
  KvTensorMaps maps{};
  const bool aligned = reinterpret_cast<uintptr_t>(p.k_cache) % 16 == 0 && reinterpret_cast<uintptr_t>(p.v_cache) % 16 == 0;
  if (!tma_page_size(p.page_size) || !aligned || (p.head_dim != 64 && p.head_dim != 128) || p.num_pages < 1 ||
      tensor_map_encoder() == nullptr)
    return maps;
  const int box_rows = p.page_size < 128 ? p.page_size : 128;
  if (encode_pool(&maps.k, p.k_cache, p, box_rows) && encode_pool(&maps.v, p.v_cache, p, box_rows))
    maps.box_rows = box_rows;
  return maps;
}

}  // namespace prefill_sm90
}  // namespace flashcore
