// Grouped GEMV for the linear layers of a decode step (GroupedLinearParams in params.h): up to kMaxWeights weight
// matrices that share one input of m <= kGemvMaxRows tokens, computed in one launch (more tokens: the tensor-core
// kernel in grouped_linear_wgmma.cu; this file's launch_grouped_linear dispatches and prefers_kernel decides). At
// these sizes a linear layer is bound by reading its weights once, so the kernel's job is to keep enough 16-byte weight loads in flight on every
// SM, including for the small matrices (k/v projections of 8 MB) that a launch per matrix leaves latency-bound.
//
// Work split: the rows of all matrices, one after the other, in tiles of kRowsPerWarp rows; each warp takes tiles
// in a grid-stride loop (the grid is sized to the resident capacity, so there is no tail wave). Within a tile every
// lane streams 16-byte chunks of the tile's rows (L1 bypassed: each weight byte is read once) and the matching
// chunks of x (L1-cached: every warp reads the same x), accumulates in fp32, and the warp sums its lanes at the end.
// The loads of a lane's next group of kUnroll chunks are issued before the FMAs of the current one.
//
// Launched with PDL (common/pdl.cuh): in a decode step the kernel before a linear layer is a short one (a norm, the
// activation, the split-KV merge), so the GEMV's blocks start while it finishes and ask L2 for the weights of their
// first tile before waiting for it. Only an L2 prefetch happens before the wait, never a load into registers: L2 is
// coherent for every SM, so a weight the previous kernel writes is still read correctly after the wait. After the wait
// the kernel lets its successor launch (inductor's kernels of a compiled step launch with PDL too): the successor's
// blocks take SMs as this grid's last tiles finish instead of after the whole grid, and wait for it before reading.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "../../params.h"
#include "../common/convert.cuh"
#include "../common/pdl.cuh"
#include "../launchers.h"

namespace flashcore {
namespace {

constexpr int kWarps = 8;        // warps per block
constexpr int kRowsPerWarp = 2;  // weight rows a warp computes together (they share the x chunks)
constexpr int kUnroll = 4;       // chunks per lane and row loaded before the first is used

__device__ __forceinline__ void prefetch_l2(const void* ptr) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(__cvta_generic_to_global(ptr)));
}

__device__ __forceinline__ uint4 load_streaming(const uint4* ptr) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(ptr));
  return r;
}

// The 8 values of a 16-byte chunk as floats.
template <typename T>
__device__ __forceinline__ void to_float8(const uint4& v, float (&f)[8]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (std::is_same<T, __nv_bfloat16>::value) {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    } else {
      const float2 pair = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
      f[2 * i] = pair.x;
      f[2 * i + 1] = pair.y;
    }
  }
}

template <typename T, int M>
__global__ void __launch_bounds__(kWarps * 32) grouped_linear_kernel(const GroupedLinearParams p) {
  const int lane = threadIdx.x & 31;
  const int chunks = p.k / 8;
  int first_tile[GroupedLinearParams::kMaxWeights + 1];  // matrix i owns tiles [first_tile[i], first_tile[i + 1])
  first_tile[0] = 0;
#pragma unroll
  for (int i = 0; i < GroupedLinearParams::kMaxWeights; ++i)
    first_tile[i + 1] = first_tile[i] + (i < p.num_weights ? (p.n[i] + kRowsPerWarp - 1) / kRowsPerWarp : 0);
  const int total = first_tile[GroupedLinearParams::kMaxWeights];
  const uint4* x_rows[M];
#pragma unroll
  for (int m = 0; m < M; ++m) x_rows[m] = reinterpret_cast<const uint4*>(static_cast<const T*>(p.x) + m * p.x_stride);

  constexpr int kGroup = 32 * kUnroll;  // chunks a warp's group covers
  // The tile's matrix, selected with constant indices only (a runtime index would put these arrays in local memory).
  struct Tile {
    int n = 0, row0 = 0, rows = 0;
    const T *weight = nullptr, *bias = nullptr;
    T* out = nullptr;
    const uint4* w_rows[kRowsPerWarp];
  };
  auto locate = [&](int tile) {
    Tile t;
#pragma unroll
    for (int j = 0; j < GroupedLinearParams::kMaxWeights; ++j)
      if (tile >= first_tile[j] && tile < first_tile[j + 1]) {
        t.n = p.n[j];
        t.row0 = (tile - first_tile[j]) * kRowsPerWarp;
        t.weight = static_cast<const T*>(p.weights[j]);
        t.bias = static_cast<const T*>(p.biases[j]);
        t.out = static_cast<T*>(p.outs[j]);
      }
    t.rows = min(kRowsPerWarp, t.n - t.row0);
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r)  // a missing last row re-reads the tile's first (its result is dropped)
      t.w_rows[r] = reinterpret_cast<const uint4*>(t.weight + static_cast<int64_t>(t.row0 + (r < t.rows ? r : 0)) * p.k);
    return t;
  };

  const int first = blockIdx.x * kWarps + (threadIdx.x >> 5);
  if (first < total) {  // the first two groups of the warp's first tile, into L2 while the previous kernel finishes
    const Tile t = locate(first);
#pragma unroll
    for (int u = 0; u < 2 * kUnroll; ++u) {
      const int c = lane + 32 * u;
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r)
        if (c < chunks) prefetch_l2(t.w_rows[r] + c);
    }
  }
  grid_dependency_wait();
  allow_dependent_launch();  // the next kernel's blocks fill SMs as this grid's tail drains (it waits for all of it)

  for (int tile = first; tile < total; tile += gridDim.x * kWarps) {
    const Tile t = locate(tile);
    const int n = t.n, row0 = t.row0, rows = t.rows;
    const T* bias = t.bias;
    T* out = t.out;
    const uint4* const(&w_rows)[kRowsPerWarp] = t.w_rows;
    float acc[kRowsPerWarp][M] = {};
    // A group: kUnroll chunks per lane and row (and the matching x chunks).
    auto load_group = [&](int c0, uint4 (&wv)[kUnroll][kRowsPerWarp], uint4 (&xv)[kUnroll][M]) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int c = c0 + 32 * u;
        const bool in = c < chunks;
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) wv[u][r] = in ? load_streaming(w_rows[r] + c) : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int m = 0; m < M; ++m) xv[u][m] = in ? __ldg(x_rows[m] + c) : make_uint4(0, 0, 0, 0);
      }
    };
    auto use_group = [&](const uint4 (&wv)[kUnroll][kRowsPerWarp], const uint4 (&xv)[kUnroll][M]) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int m = 0; m < M; ++m) {
          float xf[8];
          to_float8<T>(xv[u][m], xf);
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) {
            float wf[8];
            to_float8<T>(wv[u][r], wf);
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[r][m] = fmaf(wf[e], xf[e], acc[r][m]);
          }
        }
      }
    };
    // Two groups in registers: the next one's loads are issued before this one's FMAs (alternating buffers, so no
    // register moves). Measured on the H200 against loading each group right before its FMAs (the compiler then
    // interleaves a group's loads with the previous group's FMAs): o 17.3 -> 15.6 us, down 41.8 -> 36.1 us at 1 token.
    uint4 wa[kUnroll][kRowsPerWarp], xa[kUnroll][M], wb[kUnroll][kRowsPerWarp], xb[kUnroll][M];
    load_group(lane, wa, xa);
    for (int c0 = lane; c0 < chunks;) {
      if (c0 + kGroup < chunks) load_group(c0 + kGroup, wb, xb);
      use_group(wa, xa);
      c0 += kGroup;
      if (c0 >= chunks) break;
      if (c0 + kGroup < chunks) load_group(c0 + kGroup, wa, xa);
      use_group(wb, xb);
      c0 += kGroup;
    }
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
      for (int m = 0; m < M; ++m)
#pragma unroll
        for (int s = 16; s >= 1; s >>= 1) acc[r][m] += __shfl_xor_sync(0xffffffffu, acc[r][m], s);
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        if (r >= rows) break;
        const float b = bias != nullptr ? to_float(bias[row0 + r]) : 0.f;
#pragma unroll
        for (int m = 0; m < M; ++m) out[static_cast<int64_t>(m) * n + row0 + r] = from_float<T>(acc[r][m] + b);
      }
    }
  }
}

template <typename T, int M>
cudaError_t launch_rows(const GroupedLinearParams& p, int num_sms, cudaStream_t stream) {
  auto kernel = grouped_linear_kernel<T, M>;
  static const int blocks_per_sm = [&] {
    int value = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&value, kernel, kWarps * 32, 0) != cudaSuccess || value < 1) {
      (void)cudaGetLastError();
      return 1;
    }
    return value;
  }();
  int64_t tiles = 0;
  for (int i = 0; i < p.num_weights; ++i) tiles += (p.n[i] + kRowsPerWarp - 1) / kRowsPerWarp;
  if (tiles == 0) return cudaSuccess;
  const int64_t wanted = (tiles + kWarps - 1) / kWarps, resident = int64_t(num_sms) * blocks_per_sm;
  const int blocks = static_cast<int>(wanted < resident ? wanted : resident);
  return launch_pdl(kernel, dim3(blocks), dim3(kWarps * 32), 0, stream, p);
}

template <typename T>
cudaError_t launch_dtype(const GroupedLinearParams& p, int num_sms, cudaStream_t stream) {
  static_assert(GroupedLinearParams::kGemvMaxRows == 2, "one instantiation per row count");
  return p.m == 1 ? launch_rows<T, 1>(p, num_sms, stream) : launch_rows<T, 2>(p, num_sms, stream);
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

bool grouped_linear_supported(const GroupedLinearParams& p) {
  if (p.dtype == DType::kFloat32 || p.m < 1 || p.m > GroupedLinearParams::kMaxRows || p.k <= 0 || p.k % 8 != 0 ||
      p.x_stride % 8 != 0 || p.num_weights < 1 || p.num_weights > GroupedLinearParams::kMaxWeights)
    return false;
  if (p.x != nullptr && !aligned16(p.x)) return false;
  for (int i = 0; i < p.num_weights; ++i)
    if (p.weights[i] != nullptr && !aligned16(p.weights[i])) return false;
  return true;
}

bool grouped_linear_prefers_kernel(const GroupedLinearParams& p, const GroupedLinearDevice& device) {
  if (!grouped_linear_supported(p)) return false;
  if (p.m > GroupedLinearParams::kGemvMaxRows) {
    if (device.cc_major != 9 || device.cc_minor != 0 || !grouped_linear_wgmma_available(p.dtype)) return false;
    // Measured on the H200 (benchmarks/bench_linear.py, 8-64 tokens, an 8B layer): the tensor-core kernel beats
    // three cuBLAS launches for q/k/v (1.25-1.53x) but not one or two large weights (o 0.62-0.86x, down 0.80-0.85x,
    // gate/up 0.92-1.01x), so it takes calls of 3+ weights. FLASHCORE_GROUPED_LINEAR_KERNEL=tensor_core makes it
    // take every call it supports (tests, benchmarks).
    const char* forced = std::getenv("FLASHCORE_GROUPED_LINEAR_KERNEL");
    return p.num_weights >= 3 || (forced != nullptr && std::strcmp(forced, "tensor_core") == 0);
  }
  // A weight alone above this size streams as fast through cuBLAS: measured on the H200, the GEMV's one-launch
  // advantage carries o (33 MB, 1.24x) and down (117 MB, 1.18x) but not an 8B model's lm_head (1 GB, 1.0x).
  constexpr int64_t kSingleWeightMaxBytes = int64_t(128) << 20;
  return !(p.num_weights == 1 && int64_t(p.n[0]) * p.k * 2 > kSingleWeightMaxBytes);
}

cudaError_t launch_grouped_linear(const GroupedLinearParams& p, const GroupedLinearDevice& device,
                                  cudaStream_t stream) {
  if (p.m == 0) return cudaSuccess;
  if (p.m > GroupedLinearParams::kGemvMaxRows) return launch_grouped_linear_wgmma(p, stream);
  return p.dtype == DType::kBFloat16 ? launch_dtype<__nv_bfloat16>(p, device.num_sms, stream)
                                     : launch_dtype<__half>(p, device.num_sms, stream);
}

}  // namespace flashcore
