// TMA tensor maps over a paged K/V pool, for the sm_90a prefill kernel's producer (host encoding in
// kv_tensor_maps.cu; the kernel reads them as a __grid_constant__ parameter).
#pragma once
#include <cuda.h>

#include "../../params.h"

namespace flashcore {
namespace prefill_sm90 {

// One map per pool, both over [num_pages, page_size, num_kv_heads, head_dim] (16-bit elements, contiguous; head dim
// 64 or 128) with boxes of [box_rows tokens of one page][1 head][64 dims]: one 128-byte-swizzled 64-dim half of
// box_rows rows of a K/V tile, the shared layout the wgmma descriptors read. box_rows = min(page_size, 128); 0 means no maps (the producer gathers
// every tile with cp.async).
struct KvTensorMaps {
  CUtensorMap k;
  CUtensorMap v;
  int box_rows = 0;
};

// Page sizes whose K/V tiles of 128 keys are whole boxes: multiples of 128, or 8..64 dividing 128 (smaller boxes
// would break the 1024-byte swizzle atom).
inline bool tma_page_size(int page_size) {
  return page_size > 0 && (page_size % 128 == 0 || (page_size >= 8 && 128 % page_size == 0));
}

// The maps for p's pools (fp16/bf16); box_rows = 0 when the page size or the pools' alignment does not
// allow TMA or the driver cannot encode them (the kernel then gathers with cp.async: same results).
KvTensorMaps encode_kv_tensor_maps(const PagedAttentionParams& p);

}  // namespace prefill_sm90
}  // namespace flashcore
