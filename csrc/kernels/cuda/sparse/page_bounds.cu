// Decode-step update of the page key bounds (see UpdatePageBoundsParams in params.h): one thread per element of
// one (new token, kv head) key, reading the key back from the pool append_kv just wrote; with signs, every 8th
// thread also packs its 8 channels' sign bits into one byte.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../launchers.h"
#include "../common/convert.cuh"
#include "../common/pdl.cuh"

namespace flashcore {
namespace {

constexpr int kThreads = 256;

template <typename TK, typename TB>
__global__ void __launch_bounds__(kThreads) update_page_bounds_kernel(const UpdatePageBoundsParams p) {
  grid_dependency_wait();
  allow_dependent_launch();
  const int64_t per_token = (int64_t)p.num_kv_heads * p.head_dim;
  const int64_t total = p.num_tokens * per_token;
  const int64_t num_slots = (int64_t)p.num_pages * p.page_size;
  for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t t = idx / per_token;
    const int64_t within = idx % per_token;  // h * D + d
    const int64_t slot = p.slot_is_int64 ? static_cast<const int64_t*>(p.slot_mapping)[t]
                                         : static_cast<const int32_t*>(p.slot_mapping)[t];
    if (slot < 0 || slot >= num_slots) continue;
    const int64_t page = slot / p.page_size;
    if (page >= p.num_bound_rows) continue;
    const float key = to_float(static_cast<const TK*>(p.k_cache)[slot * per_token + within]);
    const int64_t h = within / p.head_dim, d = within % p.head_dim;
    TB* row = static_cast<TB*>(p.bounds) + (page * p.num_kv_heads + h) * 2 * p.head_dim;
    // bfloat16 bounds only come with bfloat16 keys, so max / min of keys and bounds stay exact in TB.
    const bool first = slot % p.page_size == 0;
    row[d] = from_float<TB>(first ? key : fmaxf(to_float(row[d]), key));
    row[p.head_dim + d] = from_float<TB>(first ? key : fminf(to_float(row[p.head_dim + d]), key));
    if (p.signs != nullptr && d % 8 == 0) {  // this thread packs channels d..d+7 (re-read from L1)
      const TK* k = static_cast<const TK*>(p.k_cache) + slot * per_token + h * p.head_dim;
      uint32_t byte = 0;
      for (int64_t c = 0; c < 8 && d + c < p.head_dim; ++c) byte |= uint32_t(to_float(k[d + c]) > 0.f) << c;
      p.signs[((page * p.num_kv_heads + h) * p.page_size + slot % p.page_size) * p.sign_bytes + d / 8] =
          static_cast<uint8_t>(byte);
    }
  }
}

template <typename TK, typename TB>
cudaError_t launch_typed(const UpdatePageBoundsParams& p, cudaStream_t stream) {
  const int64_t total = (int64_t)p.num_tokens * p.num_kv_heads * p.head_dim;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, 1 << 16);
  return launch_pdl(update_page_bounds_kernel<TK, TB>, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0,
                    stream, p);
}

}  // namespace

cudaError_t launch_update_page_bounds(const UpdatePageBoundsParams& p, cudaStream_t stream) {
  if (p.num_tokens <= 0 || p.num_kv_heads <= 0 || p.head_dim <= 0) return cudaSuccess;
  if (p.bounds_dtype == DType::kBFloat16) {
    if (p.k_dtype != DType::kBFloat16) return cudaErrorInvalidValue;
    return launch_typed<__nv_bfloat16, __nv_bfloat16>(p, stream);
  }
  if (p.bounds_dtype != DType::kFloat32) return cudaErrorInvalidValue;
  switch (p.k_dtype) {
    case DType::kFloat32: return launch_typed<float, float>(p, stream);
    case DType::kFloat16: return launch_typed<__half, float>(p, stream);
    default: return launch_typed<__nv_bfloat16, float>(p, stream);
  }
}

}  // namespace flashcore
