// append_kv with the page key bounds (see UpdatePageBoundsParams in params.h): a decode step's new K/V rows go into
// their page slots and their keys into those pages' bounds (and sign bits) in one kernel, so that a sparse layer's
// step runs no separate summary update. One thread per element of one (new token, kv head) row; with signs, every
// 8th thread also packs its 8 channels' sign bits into one byte.
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
__global__ void __launch_bounds__(kThreads)
    append_kv_with_bounds_kernel(const AppendKVParams a, const UpdatePageBoundsParams b) {
  grid_dependency_wait();
  allow_dependent_launch();
  const int64_t per_token = (int64_t)a.num_kv_heads * a.head_dim;
  const int64_t total = a.num_tokens * per_token;
  const int64_t num_slots = (int64_t)a.num_pages * a.page_size;
  for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t t = idx / per_token;
    const int64_t within = idx % per_token;  // h * D + d
    const int64_t h = within / a.head_dim, d = within % a.head_dim;
    const int64_t slot = a.slot_is_int64 ? static_cast<const int64_t*>(a.slot_mapping)[t]
                                         : static_cast<const int32_t*>(a.slot_mapping)[t];
    if (slot < 0 || slot >= num_slots) continue;  // padding token, or a slot outside the pool: never written
    const TK* k_row = static_cast<const TK*>(a.k) + t * a.k_stride_token + h * a.k_stride_head;
    const TK* v_row = static_cast<const TK*>(a.v) + t * a.v_stride_token + h * a.v_stride_head;
    const TK k_elem = k_row[d];
    static_cast<TK*>(a.k_cache)[slot * per_token + within] = k_elem;
    static_cast<TK*>(a.v_cache)[slot * per_token + within] = v_row[d];
    const int64_t page = slot / a.page_size;
    if (page >= b.num_bound_rows) continue;
    const float key = to_float(k_elem);
    TB* row = static_cast<TB*>(b.bounds) + (page * a.num_kv_heads + h) * 2 * a.head_dim;
    // bfloat16 bounds only come with bfloat16 keys, so max / min of keys and bounds stay exact in TB.
    const bool first = slot % a.page_size == 0;
    row[d] = from_float<TB>(first ? key : fmaxf(to_float(row[d]), key));
    row[a.head_dim + d] = from_float<TB>(first ? key : fminf(to_float(row[a.head_dim + d]), key));
    if (b.signs != nullptr && d % 8 == 0) {  // this thread packs channels d..d+7 (re-read from L1)
      uint32_t byte = 0;
      for (int64_t c = 0; c < 8 && d + c < a.head_dim; ++c) byte |= uint32_t(to_float(k_row[d + c]) > 0.f) << c;
      b.signs[((page * a.num_kv_heads + h) * a.page_size + slot % a.page_size) * b.sign_bytes + d / 8] =
          static_cast<uint8_t>(byte);
    }
  }
}

template <typename TK, typename TB>
cudaError_t launch_typed(const AppendKVParams& a, const UpdatePageBoundsParams& b, cudaStream_t stream) {
  const int64_t total = (int64_t)a.num_tokens * a.num_kv_heads * a.head_dim;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, 1 << 16);
  return launch_pdl(append_kv_with_bounds_kernel<TK, TB>, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0,
                    stream, a, b);
}

}  // namespace

cudaError_t launch_append_kv_with_bounds(const AppendKVParams& a, const UpdatePageBoundsParams& b,
                                         cudaStream_t stream) {
  if (a.num_tokens <= 0 || a.num_kv_heads <= 0 || a.head_dim <= 0) return cudaSuccess;
  if (b.bounds_dtype == DType::kBFloat16) {
    if (a.dtype != DType::kBFloat16) return cudaErrorInvalidValue;
    return launch_typed<__nv_bfloat16, __nv_bfloat16>(a, b, stream);
  }
  if (b.bounds_dtype != DType::kFloat32) return cudaErrorInvalidValue;
  switch (a.dtype) {
    case DType::kFloat32: return launch_typed<float, float>(a, b, stream);
    case DType::kFloat16: return launch_typed<__half, float>(a, b, stream);
    default: return launch_typed<__nv_bfloat16, float>(a, b, stream);
  }
}

}  // namespace flashcore
