// fp16 instantiation of the sm_90a prefill kernel.
#include "prefill_sm90_launch.cuh"

namespace flashcore {
namespace prefill_sm90 {

cudaError_t launch_fp16(const PagedAttentionParams& p, cudaStream_t stream) { return launch<__half>(p, stream); }

}  // namespace prefill_sm90
}  // namespace flashcore
