// Instantiations of the paged decode kernels for __half (head dims 64 and 128); one file per dtype so they build
// in parallel.
#include "decode_kernel.cuh"

namespace flashcore::decode {
template cudaError_t launch_decode_typed<__half, 64>(const DecodeArgs&, int, cudaStream_t);
template cudaError_t launch_decode_typed<__half, 128>(const DecodeArgs&, int, cudaStream_t);
}  // namespace flashcore::decode
