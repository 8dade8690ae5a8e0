// append_kv: scatter new tokens' K/V rows into their page slots. One thread copies one 16-byte unit of one
// (token, kv head) row when every pointer and stride allows it (the usual case), else one element.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "launchers.h"

namespace flashcore {
namespace {

constexpr int kAppendThreads = 256;

// U: the copy unit (uint4 for 16-byte copies, uint16_t / uint32_t for single elements).
template <typename U>
__global__ void __launch_bounds__(kAppendThreads) append_kv_kernel(const AppendKVParams p, int elem_bytes) {
  const int units_per_row = p.head_dim * elem_bytes / static_cast<int>(sizeof(U));
  const int64_t total = (int64_t)p.num_tokens * p.num_kv_heads * units_per_row;
  const int64_t num_slots = (int64_t)p.num_pages * p.page_size;
  for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int c = static_cast<int>(idx % units_per_row);
    const int64_t rest = idx / units_per_row;
    const int h = static_cast<int>(rest % p.num_kv_heads);
    const int64_t t = rest / p.num_kv_heads;
    const int64_t slot = p.slot_is_int64 ? static_cast<const int64_t*>(p.slot_mapping)[t]
                                         : static_cast<const int32_t*>(p.slot_mapping)[t];
    if (slot < 0 || slot >= num_slots) continue;  // padding token, or a slot outside the pool: never written
    const int64_t dst = (slot * p.num_kv_heads + h) * units_per_row + c;
    const int64_t k_src = (t * p.k_stride_token + h * p.k_stride_head) * elem_bytes;
    const int64_t v_src = (t * p.v_stride_token + h * p.v_stride_head) * elem_bytes;
    static_cast<U*>(p.k_cache)[dst] = reinterpret_cast<const U*>(static_cast<const char*>(p.k) + k_src)[c];
    static_cast<U*>(p.v_cache)[dst] = reinterpret_cast<const U*>(static_cast<const char*>(p.v) + v_src)[c];
  }
}

template <typename U>
cudaError_t launch_append(const AppendKVParams& p, int elem_bytes, cudaStream_t stream) {
  const int64_t units = (int64_t)p.num_tokens * p.num_kv_heads * (p.head_dim * elem_bytes / sizeof(U));
  const int64_t blocks = std::min<int64_t>((units + kAppendThreads - 1) / kAppendThreads, 1 << 20);
  append_kv_kernel<U><<<static_cast<unsigned>(blocks), kAppendThreads, 0, stream>>>(p, elem_bytes);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_append_kv(const AppendKVParams& p, cudaStream_t stream) {
  if (p.num_tokens <= 0 || p.num_kv_heads <= 0 || p.head_dim <= 0) return cudaSuccess;
  const int elem_bytes = p.dtype == DType::kFloat32 ? 4 : 2;
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  const bool vec = (int64_t)p.head_dim * elem_bytes % 16 == 0 && aligned(p.k) && aligned(p.v) &&
                   aligned(p.k_cache) && aligned(p.v_cache) && (p.k_stride_token * elem_bytes) % 16 == 0 &&
                   (p.k_stride_head * elem_bytes) % 16 == 0 && (p.v_stride_token * elem_bytes) % 16 == 0 &&
                   (p.v_stride_head * elem_bytes) % 16 == 0;
  if (vec) return launch_append<uint4>(p, elem_bytes, stream);
  return elem_bytes == 4 ? launch_append<uint32_t>(p, elem_bytes, stream)
                         : launch_append<uint16_t>(p, elem_bytes, stream);
}

}  // namespace flashcore
