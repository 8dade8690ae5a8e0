// Grouped linear layers for 3-64 tokens on Hopper tensor cores (sm_90a): the batched decode steps (32-64 sequences,
// beams) whose projections are still bound by reading the weights once, but where a GEMV's FMAs per weight byte
// would make it compute-bound. Same contract as the GEMV kernel (GroupedLinearParams); grouped_linear.cu dispatches
// by token count.
//
// One CTA = a tile of kTileRows rows of one weight x all m tokens (padded to N = 32 or 64) x one split of k:
//   a producer warp streams [kTileRows x 64] weight boxes and the matching [N x 64] x boxes into a ring of kStages
//     stages by TMA (128-byte swizzle, rows past n or tokens past m read as zeros), each stage signalled by a "full"
//     mbarrier and recycled through an "empty" one;
//   one consumer warpgroup multiplies each stage with wgmma m64nNk16 (both operands from shared memory, K-major:
//     A = 64 weight rows, B = the tokens), fp32 accumulators in registers, one stage's GEMMs in flight while the
//     next is awaited.
// Split-k: the CTAs of a thread block cluster (grid x = the cluster) share a tile and take consecutive k ranges; at
// the end each writes its partial sums to its shared memory and, after a cluster barrier, CTA r adds up rows
// [r * kTileRows / s, (r + 1) * kTileRows / s) of all s partials through distributed shared memory in rank order
// (deterministic), adds the bias and writes the outputs. No global workspace, no extra launch. The split count
// fills the GPU for the small matrices (q/k/v, o, down: a few dozen tiles) as far as all clusters stay resident at
// once (choose_splits).
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../../params.h"
#include "../common/convert.cuh"
#include "../common/pdl.cuh"
#include "../common/ptx.cuh"
#include "../common/sm90_ptx.cuh"
#include "../common/sm90a_body.cuh"
#include "../common/tensor_map_encoder.h"
#include "../launchers.h"

namespace flashcore {
namespace {

constexpr int kTileRows = 128;    // weight rows per CTA (two wgmma M tiles)
constexpr int kChunkK = 64;       // k per stage: one 128-byte swizzle row
constexpr int kStages = 4;        // ring depth: 3 stages in flight while one is multiplied
constexpr int kMaxSplits = 8;     // portable cluster size
constexpr int kThreads = 160;     // one consumer warpgroup + the producer warp
constexpr uint32_t kWeightStageBytes = kTileRows * kChunkK * 2;
constexpr int kReduceStride = kTileRows + 4;  // floats per token row of the partial sums (conflict-free writes)

template <int N>
struct Shape {
  static constexpr uint32_t kXStageBytes = N * kChunkK * 2;
  static constexpr uint32_t kOffX = kStages * kWeightStageBytes;
  static constexpr uint32_t kRingBytes = kOffX + kStages * kXStageBytes;
  static constexpr uint32_t kReduceBytes = N * kReduceStride * 4;
  static_assert(kReduceBytes <= kRingBytes, "the partial sums reuse the ring");
  static constexpr uint32_t kSmemBytes = kRingBytes + 1024;  // + alignment of the base to the swizzle atom
};

// The TMA maps of one launch, passed by value (__grid_constant__): x [m, k] (row stride x_stride) in boxes of
// [N tokens][64], each weight [n_i, k] in boxes of [kTileRows rows][64].
struct LinearTensorMaps {
  CUtensorMap x;
  CUtensorMap w[GroupedLinearParams::kMaxWeights];
};

template <typename T, int N>
__global__ void __launch_bounds__(kThreads, 1)
    grouped_linear_wgmma_kernel(const GroupedLinearParams p, const __grid_constant__ LinearTensorMaps maps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;
  using S = Shape<N>;
  // Static shared memory also tells the host that this body was built (an sm_90a build): sm90a_body_built().
  __shared__ __align__(8) uint64_t bars[2 * kStages];  // full [kStages], empty [kStages]
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw_addr = smem_addr(smem_raw);
  const uint32_t base = (raw_addr + 1023) & ~1023u;
  // The partial sums [N][kReduceStride] reuse the ring once every stage is consumed.
  float* partial = reinterpret_cast<float*>(smem_raw + (base - raw_addr));
  const uint32_t bar_full = smem_addr(&bars[0]), bar_empty = bar_full + 8 * kStages;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;

  // This CTA's tile: weight j's rows [row0, row0 + kTileRows) (weights one after the other), selected with constant
  // indices only (a runtime index into the parameters would copy them to local memory).
  int j = 0, row0 = 0, n = 0, seen = 0;
  const T* bias = nullptr;
  T* out = nullptr;
#pragma unroll
  for (int i = 0; i < GroupedLinearParams::kMaxWeights; ++i) {
    const int tiles = i < p.num_weights ? (p.n[i] + kTileRows - 1) / kTileRows : 0;
    if (static_cast<int>(blockIdx.y) >= seen && static_cast<int>(blockIdx.y) < seen + tiles) {
      j = i;
      row0 = (blockIdx.y - seen) * kTileRows;
      n = p.n[i];
      bias = static_cast<const T*>(p.biases[i]);
      out = static_cast<T*>(p.outs[i]);
    }
    seen += tiles;
  }
  const int splits = gridDim.x, rank = blockIdx.x;  // the cluster spans grid x: rank is the CTA's rank in it
  const int chunks_total = (p.k + kChunkK - 1) / kChunkK;
  const int per_split = (chunks_total + splits - 1) / splits;
  const int chunk0 = rank * per_split;
  const int chunks = max(0, min(chunks_total, chunk0 + per_split) - chunk0);

  // Launched with PDL: the weights are not the previous kernel's output, so their first boxes go into L2 before the
  // wait (only into L2, which every SM sees coherently: see grouped_linear.cu); x and the outputs only after it.
  if (warp == 4 && lane == 0)
    for (int c = 0; c < chunks && c < kStages; ++c) tma_prefetch_l2_2d(&maps.w[j], (chunk0 + c) * kChunkK, row0);
  grid_dependency_wait();
  allow_dependent_launch();  // as in grouped_linear.cu: the successor takes SMs as this grid drains

  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(bar_full + 8 * s, 1);      // the producer's expect_tx arrival; TMA completes the bytes
      mbar_init(bar_empty + 8 * s, 4);     // one arrival per consumer warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  float acc[2][N / 2];  // [M tile][wgmma D fragment]
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int i = 0; i < N / 2; ++i) acc[h][i] = 0.f;

  if (warp == 4) {  // producer
    if (lane == 0) {
      for (int c = 0; c < chunks; ++c) {
        const int stage = c % kStages;
        if (c >= kStages) mbar_wait(bar_empty + 8 * stage, ((c / kStages) - 1) & 1);
        const uint32_t full = bar_full + 8 * stage;
        mbar_arrive_expect_tx(full, kWeightStageBytes + S::kXStageBytes);
        const int k0 = (chunk0 + c) * kChunkK;
        tma_load_2d(base + stage * kWeightStageBytes, &maps.w[j], full, k0, row0);
        tma_load_2d(base + S::kOffX + stage * S::kXStageBytes, &maps.x, full, k0, 0);
      }
    }
  } else {  // consumer warpgroup
    for (int c = 0; c < chunks; ++c) {
      const int stage = c % kStages;
      mbar_wait(bar_full + 8 * stage, (c / kStages) & 1);
      const uint32_t w_base = base + stage * kWeightStageBytes, x_base = base + S::kOffX + stage * S::kXStageBytes;
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kChunkK / 16; ++ks)  // 16 k per step: 32 bytes into the swizzled row
#pragma unroll
        for (int h = 0; h < 2; ++h)
          wgmma_ss<kBf16>(acc[h], make_desc(w_base + h * (kWeightStageBytes / 2) + ks * 32, 16, 1024),
                          make_desc(x_base + ks * 32, 16, 1024), 1);
      wgmma_commit();
      wgmma_wait<1>();  // the previous stage's GEMMs are done: hand it back
      if (c > 0 && lane == 0) mbar_arrive(bar_empty + 8 * ((c - 1) % kStages));
    }
    wgmma_wait<0>();
#pragma unroll
    for (int h = 0; h < 2; ++h) fence_regs(acc[h]);
  }
  __syncthreads();  // every stage consumed (the ring becomes the partial sums)

  if (warp < 4) {
    // D fragment: rows 16 warp + g (+ 8 for elements 2, 3) of M tile h, tokens 8 i + 2 q (+ 1 for odd elements).
    const int g = lane >> 2, q = lane & 3;
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int i = 0; i < N / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = h * 64 + warp * 16 + g + (e >> 1) * 8, token = 8 * i + 2 * q + (e & 1);
          partial[token * kReduceStride + row] = acc[h][4 * i + e];
        }
  }
  cluster_sync();  // every CTA's partial sums written

  const int rows_per_rank = kTileRows / splits;
  const uint32_t partial_addr = smem_addr(partial);
  for (int idx = tid; idx < p.m * rows_per_rank; idx += kThreads) {
    const int token = idx / rows_per_rank, row = rank * rows_per_rank + idx % rows_per_rank;
    if (row0 + row >= n) continue;
    const uint32_t addr = partial_addr + 4 * (token * kReduceStride + row);
    // All of the splits' loads issued before the first add (a runtime-length loop waited for each remote load in
    // turn: ~50 dependent DSMEM round trips per thread at 8 splits); the sum stays in rank order.
    float part[kMaxSplits];
#pragma unroll
    for (int r = 0; r < kMaxSplits; ++r) part[r] = r < splits ? ld_shared_cluster(addr, r) : 0.f;
    float sum = 0.f;
#pragma unroll
    for (int r = 0; r < kMaxSplits; ++r) sum += part[r];
    if (bias != nullptr) sum += to_float(bias[row0 + row]);
    out[static_cast<int64_t>(token) * n + row0 + row] = from_float<T>(sum);
  }
  cluster_sync();  // no CTA leaves while another still reads its partial sums
#endif
}

// A row-major [rows, k] matrix (row stride `stride` elements) in boxes of [box_rows][kChunkK], 128-byte swizzle.
bool encode_matrix(CUtensorMap* map, const void* ptr, int64_t rows, int64_t k, int64_t stride, int box_rows,
                   DType dtype) {
  const cuuint64_t dims[2] = {(cuuint64_t)k, (cuuint64_t)rows};
  const cuuint64_t strides[1] = {(cuuint64_t)(stride * 2)};
  const cuuint32_t box[2] = {kChunkK, (cuuint32_t)box_rows};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUtensorMapDataType type =
      dtype == DType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  return tensor_map_encoder()(map, type, 2, const_cast<void*>(ptr), dims, strides, box, element_strides,
                           CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                           CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// The most clusters of `splits` CTAs that can be resident at once, for splits 1, 2, 4 and 8 (index log2(splits)),
// queried once per kernel: a cluster is placed within one GPC, so this can be less than the resident CTAs / splits
// (the H200 holds 30 clusters of 8, not 33, at two CTAs per SM).
template <typename T, int N>
const int* max_active_clusters() {
  struct Table {
    int value[4] = {1, 1, 1, 1};
    Table() {
      auto kernel = grouped_linear_wgmma_kernel<T, N>;
      if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)Shape<N>::kSmemBytes) !=
          cudaSuccess) {
        (void)cudaGetLastError();
        return;
      }
      for (int i = 0; i < 4; ++i) {
        cudaLaunchConfig_t config = {};
        config.gridDim = dim3(1u << i, 1, 1);
        config.blockDim = dim3(kThreads, 1, 1);
        config.dynamicSmemBytes = Shape<N>::kSmemBytes;
        cudaLaunchAttribute cluster;
        cluster.id = cudaLaunchAttributeClusterDimension;
        cluster.val.clusterDim.x = 1u << i;
        cluster.val.clusterDim.y = 1;
        cluster.val.clusterDim.z = 1;
        config.attrs = &cluster;
        config.numAttrs = 1;
        int clusters = 0;
        if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) != cudaSuccess || clusters < 1) {
          (void)cudaGetLastError();
          clusters = 1;
        }
        value[i] = clusters;
      }
    }
  };
  static const Table table;
  return table.value;
}

int64_t total_tiles(const GroupedLinearParams& p) {
  int64_t tiles = 0;
  for (int i = 0; i < p.num_weights; ++i) tiles += (p.n[i] + kTileRows - 1) / kTileRows;
  return tiles;
}

// Splits of k (the cluster size): doubled while every cluster of the doubled size is still resident at once (one
// wave: a tile whose cluster waits for a second wave doubles the call's time) and each split keeps at least 4 chunks.
int choose_splits(int64_t tiles, int k, const int* max_clusters) {
  const int chunks = (k + kChunkK - 1) / kChunkK;
  int splits = 1, log2_splits = 0;
  while (splits < kMaxSplits && tiles <= max_clusters[log2_splits + 1] && chunks >= 2 * splits * 4) {
    splits *= 2;
    ++log2_splits;
  }
  return splits;
}

template <typename T, int N>
cudaError_t launch_tokens(const GroupedLinearParams& p, cudaStream_t stream) {
  if (!sm90a_body_built<grouped_linear_wgmma_kernel<T, N>>()) return cudaErrorNotSupported;
  const int64_t tiles = total_tiles(p);
  if (tiles == 0) return cudaSuccess;
  LinearTensorMaps maps{};
  if (!encode_matrix(&maps.x, p.x, p.m, p.k, p.x_stride, N, p.dtype)) return cudaErrorInvalidValue;
  for (int i = 0; i < p.num_weights; ++i)
    if (!encode_matrix(&maps.w[i], p.weights[i], p.n[i], p.k, p.k, kTileRows, p.dtype)) return cudaErrorInvalidValue;
  const int splits = choose_splits(tiles, p.k, max_active_clusters<T, N>());
  // Set per launch (a cheap host call): the attribute belongs to the current device.
  const cudaError_t err = cudaFuncSetAttribute(grouped_linear_wgmma_kernel<T, N>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, (int)Shape<N>::kSmemBytes);
  if (err != cudaSuccess) return err;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(splits, static_cast<unsigned>(tiles), 1);
  config.blockDim = dim3(kThreads, 1, 1);
  config.dynamicSmemBytes = Shape<N>::kSmemBytes;
  config.stream = stream;
  cudaLaunchAttribute attribute[2];
  attribute[0].id = cudaLaunchAttributeClusterDimension;
  attribute[0].val.clusterDim.x = splits;
  attribute[0].val.clusterDim.y = 1;
  attribute[0].val.clusterDim.z = 1;
  attribute[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[1].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = 2;
  return cudaLaunchKernelEx(&config, grouped_linear_wgmma_kernel<T, N>, p, maps);
}

template <typename T>
cudaError_t launch_dtype(const GroupedLinearParams& p, cudaStream_t stream) {
  return p.m <= 32 ? launch_tokens<T, 32>(p, stream) : launch_tokens<T, 64>(p, stream);
}

}  // namespace

bool grouped_linear_wgmma_available(DType dtype) {
  if (tensor_map_encoder() == nullptr) return false;
  return dtype == DType::kBFloat16 ? sm90a_body_built<grouped_linear_wgmma_kernel<__nv_bfloat16, 32>>() &&
                                         sm90a_body_built<grouped_linear_wgmma_kernel<__nv_bfloat16, 64>>()
                                   : sm90a_body_built<grouped_linear_wgmma_kernel<__half, 32>>() &&
                                         sm90a_body_built<grouped_linear_wgmma_kernel<__half, 64>>();
}

cudaError_t launch_grouped_linear_wgmma(const GroupedLinearParams& p, cudaStream_t stream) {
  return p.dtype == DType::kBFloat16 ? launch_dtype<__nv_bfloat16>(p, stream) : launch_dtype<__half>(p, stream);
}

}  // namespace flashcore
