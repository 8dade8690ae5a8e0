// Instantiations of the paged decode kernels for __nv_bfloat16 (head dims 64 and 128) with logit softcapping
// (p.softcap > 0); a file of their own so they build in parallel with decode_bf16.cu.
#include "decode_kernel.cuh"

namespace flashcore::decode {
template cudaError_t launch_decode_typed<__nv_bfloat16, 64, true>(const DecodeArgs&, int, int, cudaStream_t);
template cudaError_t launch_decode_typed<__nv_bfloat16, 128, true>(const DecodeArgs&, int, int, cudaStream_t);
}  // namespace flashcore::decode
