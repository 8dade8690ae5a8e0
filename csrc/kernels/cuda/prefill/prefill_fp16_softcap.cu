// fp16 instantiations of the prefill kernel (head dims 64 and 128) with logit softcapping (p.softcap > 0).
#include "prefill_launch.cuh"

namespace flashcore {
namespace prefill {

cudaError_t launch_prefill_fp16_softcap(const PagedAttentionParams& p, cudaStream_t stream) {
  return launch_for_head_dim<__half, true>(p, stream);
}

}  // namespace prefill
}  // namespace flashcore
