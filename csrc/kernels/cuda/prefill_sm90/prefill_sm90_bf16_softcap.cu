// bf16 instantiation of the sm_90a prefill kernel with logit softcapping (p.softcap > 0).
#include "prefill_sm90_launch.cuh"

namespace flashcore {
namespace prefill_sm90 {

cudaError_t launch_bf16_softcap(const PagedAttentionParams& p, cudaStream_t stream) {
  return launch<__nv_bfloat16, true>(p, stream);
}

}  // namespace prefill_sm90
}  // namespace flashcore
