// Programmatic dependent launch (PDL, sm_90): a kernel launched with `launch_pdl` may be scheduled while the
// previous kernel in the stream is still running; it must call `grid_dependency_wait()` before touching memory the
// previous kernel writes (and before exiting, so that waiting on it also means waiting on its predecessors).
#pragma once
#include <cuda_runtime.h>

namespace flashcore {

// Wait for the previous kernel in the stream (a no-op when launched without PDL).
__device__ __forceinline__ void grid_dependency_wait() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }

// Let the next PDL-launched kernel be scheduled now; it still waits for this whole grid before reading.
__device__ __forceinline__ void allow_dependent_launch() {
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
}

template <typename... KernelArgs, typename... Args>
cudaError_t launch_pdl(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                       Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<Args&&>(args)...);
}

}  // namespace flashcore
