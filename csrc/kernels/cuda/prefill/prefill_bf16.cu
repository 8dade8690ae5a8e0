// bf16 instantiations of the prefill kernel (head dims 64 and 128), without softcapping (see prefill_bf16_softcap.cu).
#include "prefill_launch.cuh"

namespace flashcore {
namespace prefill {

cudaError_t launch_prefill_bf16(const PagedAttentionParams& p, cudaStream_t stream) {
  return launch_for_head_dim<__nv_bfloat16, false>(p, stream);
}

}  // namespace prefill
}  // namespace flashcore
