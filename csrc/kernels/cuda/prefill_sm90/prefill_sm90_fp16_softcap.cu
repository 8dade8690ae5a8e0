// fp16 instantiation of the sm_90a prefill kernel with logit softcapping (p.softcap > 0).
#include "prefill_sm90_launch.cuh"

namespace flashcore {
namespace prefill_sm90 {

cudaError_t launch_fp16_softcap(const PagedAttentionParams& p, cudaStream_t stream) {
  return launch<__half, true>(p, stream);
}

}  // namespace prefill_sm90
}  // namespace flashcore
