// bf16 instantiations of the prefill kernel (head dims 64 and 128) with logit softcapping (p.softcap > 0).
#include "prefill_launch.cuh"

namespace flashcore {
namespace prefill {

cudaError_t launch_prefill_bf16_softcap(const PagedAttentionParams& p, cudaStream_t stream) {
  return launch_for_head_dim<__nv_bfloat16, true>(p, stream);
}

}  // namespace prefill
}  // namespace flashcore
