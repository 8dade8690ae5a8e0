// Host check shared by the sm_90a-only kernels (the wgmma prefill, the tensor-core linear layers): their body exists
// only in sm_90a code (guarded by __CUDA_ARCH_FEAT_SM90_ALL) and is the only part that declares static shared memory
// (its mbarriers), so a build for other targets yields an empty kernel with none, which must never be launched.
#pragma once
#include <cuda_runtime_api.h>

namespace flashcore {

// Whether kKernel's sm_90a body is in this build (asked once per kernel).
template <auto kKernel>
bool sm90a_body_built() {
  static const bool built = [] {
    cudaFuncAttributes attr;
    const bool ok = cudaFuncGetAttributes(&attr, kKernel) == cudaSuccess;
    if (!ok) (void)cudaGetLastError();
    return ok && attr.sharedSizeBytes > 0;
  }();
  return built;
}

}  // namespace flashcore
