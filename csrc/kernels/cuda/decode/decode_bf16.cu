// Instantiations of the paged decode kernels for __nv_bfloat16 (head dims 64 and 128) without softcapping; one file
// per dtype and softcap variant so they build in parallel (softcap: decode_bf16_softcap.cu).
#include "decode_kernel.cuh"

namespace flashcore::decode {
template cudaError_t launch_decode_typed<__nv_bfloat16, 64, false>(const DecodeArgs&, int, int, cudaStream_t);
template cudaError_t launch_decode_typed<__nv_bfloat16, 128, false>(const DecodeArgs&, int, int, cudaStream_t);
}  // namespace flashcore::decode
