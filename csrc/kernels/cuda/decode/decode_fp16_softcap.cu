// Instantiations of the paged decode kernels for __half (head dims 64 and 128) with logit softcapping (p.softcap > 0);
// a file of their own so they build in parallel with decode_fp16.cu.
#include "decode_kernel.cuh"

namespace flashcore::decode {
template cudaError_t launch_decode_typed<__half, 64, true>(const DecodeArgs&, int, int, cudaStream_t);
template cudaError_t launch_decode_typed<__half, 128, true>(const DecodeArgs&, int, int, cudaStream_t);
}  // namespace flashcore::decode
