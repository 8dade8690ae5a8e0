// Host entry points of the prefill kernels (see launchers.h): what they support, and the kernel / dtype dispatch.
//
// Two kernels: the Hopper wgmma kernel (../prefill_sm90/, head dims 64 and 128, fp16/bf16, compute capability 9.0, sm_90a
// build) and the mma.sync kernel here (everything else). The attention plan picks one (paged_prefill_wgmma_applies);
// FLASHCORE_PREFILL_KERNEL, read at every plan, picks one for tests and comparisons: "mma" forces the mma.sync
// kernel; "wgmma" or unset uses the wgmma kernel wherever it applies and the mma.sync kernel elsewhere. Each kernel has a logit-softcapping variant, chosen here when
// p.softcap > 0 (instantiated in the *_softcap.cu files); sinks need no variant (the epilogue applies them).
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "../launchers.h"
#include "../prefill_sm90/prefill_sm90.h"
#include "prefill_launch.cuh"

namespace flashcore {

namespace {
bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

bool mma_kernel_forced() {
  const char* choice = std::getenv("FLASHCORE_PREFILL_KERNEL");
  return choice != nullptr && std::strcmp(choice, "mma") == 0;
}

}  // namespace

bool paged_prefill_supported(const PagedAttentionParams& p) {
  const bool dtype_ok = p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16;
  const bool shape_ok = (p.head_dim == 64 || p.head_dim == 128) && p.num_kv_heads > 0 &&
                        p.num_q_heads % p.num_kv_heads == 0 && p.batch >= 0 && p.page_size > 0 && p.max_q_len >= 0;
  // The softmax keeps the running max of raw scores, which needs a positive scale.
  const bool scale_ok = std::isfinite(p.sm_scale) && p.sm_scale > 0.f;
  // 16-byte cp.async / vector stores: every row start must be 16-byte aligned.
  const bool align_ok = aligned16(p.q) && aligned16(p.k_cache) && aligned16(p.v_cache) && aligned16(p.out) &&
                        p.q_stride_token % 8 == 0 && p.q_stride_head % 8 == 0;
  // Grid (query tile, KV head, sequence) for both kernels: 65535 KV heads and 65535 sequences at most, and few
  // enough tiles of 128 (query, head) rows that a tile's first row (tile * rows per tile, up to 192) is an int.
  const bool grid_ok = !shape_ok || (p.batch <= 65535 && p.num_kv_heads <= 65535 &&
                                     prefill::query_tiles(p) <= 2147483647 / 256);
  return dtype_ok && shape_ok && scale_ok && align_ok && grid_ok;
}

bool paged_prefill_wgmma_applies(const PagedAttentionParams& p, int cc_major, int cc_minor) {
  return prefill_sm90::supports(p) && !mma_kernel_forced() && cc_major == 9 && cc_minor == 0;
}

cudaError_t launch_paged_prefill(const PagedAttentionParams& p, PrefillKernel kernel, cudaStream_t stream) {
  if (!paged_prefill_supported(p)) return cudaErrorInvalidValue;
  const bool fp16 = p.dtype == DType::kFloat16, softcap = p.softcap > 0.f;
  if (kernel == PrefillKernel::kWgmma && prefill_sm90::supports(p)) {
    const cudaError_t err = softcap ? (fp16 ? prefill_sm90::launch_fp16_softcap(p, stream)
                                            : prefill_sm90::launch_bf16_softcap(p, stream))
                                    : (fp16 ? prefill_sm90::launch_fp16(p, stream)
                                            : prefill_sm90::launch_bf16(p, stream));
    if (err != cudaErrorNotSupported) return err;  // else: no sm_90a code in this build
  }
  if (softcap) {
    return fp16 ? prefill::launch_prefill_fp16_softcap(p, stream) : prefill::launch_prefill_bf16_softcap(p, stream);
  }
  return fp16 ? prefill::launch_prefill_fp16(p, stream) : prefill::launch_prefill_bf16(p, stream);
}

}  // namespace flashcore
