// bf16 instantiation of the sm_90a prefill kernel without softcapping (see prefill_sm90_bf16_softcap.cu).
#include "prefill_sm90_launch.cuh"

namespace flashcore {
namespace prefill_sm90 {

cudaError_t launch_bf16(const PagedAttentionParams& p, cudaStream_t stream) {
  return launch<__nv_bfloat16, false>(p, stream);
}

}  // namespace prefill_sm90
}  // namespace flashcore
