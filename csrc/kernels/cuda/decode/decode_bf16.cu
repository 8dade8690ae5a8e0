// Instantiations of the paged decode kernels for __nv_bfloat16 (head dims 64 and 128); one file per dtype so they build
// in parallel.
#include "decode_kernel.cuh"

namespace flashcore::decode {
template cudaError_t launch_decode_typed<__nv_bfloat16, 64>(const DecodeArgs&, int, cudaStream_t);
template cudaError_t launch_decode_typed<__nv_bfloat16, 128>(const DecodeArgs&, int, cudaStream_t);
}  // namespace flashcore::decode
