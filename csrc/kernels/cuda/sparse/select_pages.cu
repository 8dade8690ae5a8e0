// "topk" page selection on the GPU (see SelectPagesParams in params.h for the contract), in two PDL-chained kernels:
//
// 1. score_pages_kernel, grid (page chunks, batch * Hkv): each warp scores up to 8 pages at a time with all their
//    loads in flight together (the kernel is latency-bound: measured 21 us at 2 pages per warp
//    for 2048 pages x 8 heads, whose 8 MB of bounds take ~3 us to read). Each lane holds 4 consecutive dims of
//    up to 8 query heads in registers and reads the same 4 dims of the page's max and min (8 bytes of bfloat16
//    bounds, 16 of float32), so a warp reads a 128-dim bounds row in one coalesced pass.
// 2. select_top_pages_kernel, one block per (sequence, kv head): radix select of the budget-th largest score
//    (up to 4 passes of 8 bits over an order-preserving uint32 image of the floats, kept in shared memory when the
//    row fits; it stops early once the bucket holding the threshold is taken whole; warp-aggregated histogram
//    increments, since similar scores share their top bits and would serialize on one counter), then an in-order compaction
//    (block prefix sums), which yields the picks in key order with ties to the lower index, without sorting.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>
#include <cub/block/block_scan.cuh>

#include "../launchers.h"
#include "../pdl.cuh"

namespace flashcore {
namespace {

constexpr int kScoreThreads = 256;
constexpr int kScoreWarps = kScoreThreads / 32;
constexpr int kQueryHeadsPerPass = 8;   // query heads held in registers per pass over the block's pages
constexpr int kDimsPerLane = 4;
constexpr int kMaxDimChunks = 2;        // head_dim <= 2 * 32 * 4 = 256

// Pages a warp scores at once (their bounds stay in registers): 8 of 16-bit bounds at head dims <= 128; half as
// many for float32 bounds or larger head dims (more would spill).
template <typename TB, int DIM_CHUNKS>
constexpr int pages_per_warp() { return 16 / DIM_CHUNKS / int(sizeof(TB)); }
template <typename TB, int DIM_CHUNKS>
constexpr int pages_per_score_block() { return kScoreWarps * pages_per_warp<TB, DIM_CHUNKS>(); }
constexpr int kSelectThreads = 256;
constexpr int kMaxSmemKeys = 48 * 1024;  // 192 KB of shared memory; longer rows read their scores from global

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// 4 consecutive elements as stored (16-byte aligned for float, 8-byte for 16-bit types: guaranteed by the
// launcher); kept packed in registers until used, which halves the registers of bfloat16 bounds.
template <typename T>
using Quad = std::conditional_t<sizeof(T) == 4, float4, uint2>;

template <typename T>
__device__ __forceinline__ void unpack4(const Quad<T>& raw, float (&dst)[kDimsPerLane]) {
  if constexpr (sizeof(T) == 4) {
    dst[0] = raw.x, dst[1] = raw.y, dst[2] = raw.z, dst[3] = raw.w;
  } else {
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) dst[i] = to_float(e[i]);
  }
}

template <typename T>
__device__ __forceinline__ void load4(const T* src, float (&dst)[kDimsPerLane]) {
  unpack4<T>(*reinterpret_cast<const Quad<T>*>(src), dst);
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

template <typename TQ, typename TB, int DIM_CHUNKS>
__global__ void __launch_bounds__(kScoreThreads) score_pages_kernel(const SelectPagesParams p) {
  constexpr int kPagesPerWarp = pages_per_warp<TB, DIM_CHUNKS>();
  constexpr int kPagesPerScoreBlock = pages_per_score_block<TB, DIM_CHUNKS>();
  grid_dependency_wait();
  allow_dependent_launch();
  __shared__ float partial[kPagesPerScoreBlock];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = blockIdx.y;  // b * Hkv + h
  const int b = row / p.num_kv_heads, h = row % p.num_kv_heads;
  const int d = p.head_dim, group = p.num_q_heads / p.num_kv_heads;
  const int query_heads = p.query_len * group;
  const int first_page = blockIdx.x * kPagesPerScoreBlock;
  const int pages_here = min(kPagesPerScoreBlock, p.max_pages - first_page);
  const TQ* q = static_cast<const TQ*>(p.q);
  const TB* bounds = static_cast<const TB*>(p.bounds);

  for (int first_head = 0; first_head < query_heads; first_head += kQueryHeadsPerPass) {
    const int heads = min(kQueryHeadsPerPass, query_heads - first_head);
    float qv[kQueryHeadsPerPass][DIM_CHUNKS][kDimsPerLane];
#pragma unroll
    for (int g = 0; g < kQueryHeadsPerPass; ++g) {
      const int qh = first_head + g;  // (query i, head-in-group j) = (qh / group, qh % group)
      const int64_t token = (int64_t)b * p.query_len + (g < heads ? qh / group : 0);
      const int head = h * group + (g < heads ? qh % group : 0);
#pragma unroll
      for (int c = 0; c < DIM_CHUNKS; ++c) {
        const int dim = (c * 32 + lane) * kDimsPerLane;
        if (g < heads && dim < d) {
          load4(q + token * p.q_stride_token + head * p.q_stride_head + dim, qv[g][c]);
        } else {
#pragma unroll
          for (int i = 0; i < kDimsPerLane; ++i) qv[g][c][i] = 0.f;
        }
      }
    }
    for (int first = warp * kPagesPerWarp; first < pages_here; first += kPagesPerScoreBlock) {
      bool has_row[kPagesPerWarp];
      Quad<TB> lo[kPagesPerWarp][DIM_CHUNKS], hi[kPagesPerWarp][DIM_CHUNKS];
#pragma unroll
      for (int pi = 0; pi < kPagesPerWarp; ++pi) {
        const int local = first + pi;
        const int page = local < pages_here ? p.table_pages[(int64_t)b * p.max_pages + first_page + local] : -1;
        has_row[pi] = page >= 0 && page < p.num_bound_rows;
#pragma unroll
        for (int c = 0; c < DIM_CHUNKS; ++c) {
          const int dim = (c * 32 + lane) * kDimsPerLane;
          if (has_row[pi] && dim < d) {
            const TB* bound_row = bounds + ((int64_t)page * p.num_kv_heads + h) * 2 * d;
            hi[pi][c] = *reinterpret_cast<const Quad<TB>*>(bound_row + dim);
            lo[pi][c] = *reinterpret_cast<const Quad<TB>*>(bound_row + d + dim);
          } else {
            hi[pi][c] = lo[pi][c] = Quad<TB>{};  // all-zero bits: 0.0 in every format
          }
        }
      }
#pragma unroll
      for (int pi = 0; pi < kPagesPerWarp; ++pi) {
        const int local = first + pi;
        float page_hi[DIM_CHUNKS][kDimsPerLane], page_lo[DIM_CHUNKS][kDimsPerLane];
#pragma unroll
        for (int c = 0; c < DIM_CHUNKS; ++c) {
          unpack4<TB>(hi[pi][c], page_hi[c]);
          unpack4<TB>(lo[pi][c], page_lo[c]);
        }
        float reduced = 0.f;
#pragma unroll
        for (int g = 0; g < kQueryHeadsPerPass; ++g) {
          if (g < heads) {  // warp-uniform
            float dot = 0.f;
#pragma unroll
            for (int c = 0; c < DIM_CHUNKS; ++c)
#pragma unroll
              for (int i = 0; i < kDimsPerLane; ++i)
                dot += fmaxf(qv[g][c][i], 0.f) * page_hi[c][i] + fminf(qv[g][c][i], 0.f) * page_lo[c][i];
            dot = warp_sum(dot);
            reduced = g == 0 ? dot : (p.head_reduce_sum ? reduced + dot : fmaxf(reduced, dot));
          }
        }
        if (lane == 0 && local < pages_here) {
          if (first_head == 0) {
            partial[local] = has_row[pi] ? reduced : -INFINITY;
          } else if (has_row[pi]) {
            partial[local] = p.head_reduce_sum ? partial[local] + reduced : fmaxf(partial[local], reduced);
          }
        }
      }
    }
  }
  __syncthreads();
  for (int local = threadIdx.x; local < pages_here; local += kScoreThreads) {
    const int64_t entry = (int64_t)b * p.max_pages + first_page + local;
    const float bias = p.table_bias[entry];
    float score = partial[local];
    if (score != -INFINITY) {
      // Forced pages (+inf) and entries past the end (-inf) ignore the score; a NaN bound (inf * 0) keeps its page.
      score = isinf(bias) ? bias : (isnan(score) ? INFINITY : score + bias);
    }
    p.scores[(int64_t)row * p.max_pages + first_page + local] = score;
  }
}

// Order-preserving image of a float: a > b (as floats, -inf < finite < +inf) iff key(a) > key(b) (as uint32).
__device__ __forceinline__ uint32_t order_key(float x) {
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// KEYS_IN_SMEM: the row's order keys are staged in dynamic shared memory once (max_pages <= kMaxSmemKeys), else
// every pass re-reads the float scores (L2-resident: the score kernel just wrote them).
template <bool KEYS_IN_SMEM>
__global__ void __launch_bounds__(kSelectThreads) select_top_pages_kernel(const SelectPagesParams p) {
  using Scan = cub::BlockScan<int, kSelectThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ int histogram[256];
  __shared__ uint32_t chosen_prefix;
  __shared__ int still_needed, bucket_size;
  extern __shared__ uint32_t smem_keys[];
  grid_dependency_wait();
  allow_dependent_launch();

  const int row = blockIdx.x;
  const int b = row / p.num_kv_heads;
  const int m = p.max_pages, budget = p.budget;
  const float* scores = p.scores + (int64_t)row * m;
  const int tid = threadIdx.x;
  if constexpr (KEYS_IN_SMEM) {
    for (int j = tid; j < m; j += kSelectThreads) smem_keys[j] = order_key(scores[j]);
  }
  const auto key_at = [&](int j) { return KEYS_IN_SMEM ? smem_keys[j] : order_key(scores[j]); };
  if (tid == 0) {
    chosen_prefix = 0;
    still_needed = budget;
  }
  // Radix select, most significant digit first: after the pass at `shift`, the picks are every key whose bits
  // under `mask` exceed chosen_prefix, plus the first still_needed keys (by index) equal to it there.
  uint32_t mask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    histogram[tid] = 0;  // kSelectThreads == 256 bins
    __syncthreads();
    const uint32_t prefix = chosen_prefix;
    for (int base = 0; base < m; base += kSelectThreads) {  // whole warps iterate together (match_any)
      const int j = base + tid;
      const uint32_t key = j < m ? key_at(j) : 0u;
      const bool counted = j < m && (key & mask) == prefix;
      // Lanes with the same digit add once, through their lowest lane; others get a value no lane shares.
      const uint32_t bin = counted ? (key >> shift) & 255u : 256u + (tid & 31);
      const uint32_t same = __match_any_sync(0xffffffffu, bin);
      if (counted && (tid & 31) == __ffs(same) - 1) atomicAdd(&histogram[bin], __popc(same));
    }
    __syncthreads();
    // Thread t looks at digit 255 - t: an inclusive scan in that order gives the count of keys >= that digit.
    const int digit = 255 - tid;
    const int count = histogram[digit];
    int at_or_above;
    Scan(scan_storage).InclusiveSum(count, at_or_above);
    const int needed = still_needed;
    const int above = at_or_above - count;
    __syncthreads();  // every thread has read chosen_prefix / still_needed before one thread updates them
    if (above < needed && at_or_above >= needed) {
      chosen_prefix = prefix | (uint32_t(digit) << shift);
      still_needed = needed - above;
      bucket_size = count;
    }
    mask |= 255u << shift;
    __syncthreads();
    if (still_needed == bucket_size) break;  // the threshold's bucket is taken whole: no tie to break below it
  }
  const uint32_t threshold = chosen_prefix;
  const int ties_taken = still_needed;  // keys equal to the threshold (under mask) that are picked, lowest first

  // In-order compaction: thread t owns entries [t * per_thread, (t + 1) * per_thread).
  const int per_thread = (m + kSelectThreads - 1) / kSelectThreads;
  const int begin = min(m, tid * per_thread), end = min(m, begin + per_thread);
  int above = 0, ties = 0;
  for (int j = begin; j < end; ++j) {
    const uint32_t key = key_at(j) & mask;
    above += key > threshold;
    ties += key == threshold;
  }
  int above_before, ties_before;
  Scan(scan_storage).ExclusiveSum(above, above_before);
  __syncthreads();
  Scan(scan_storage).ExclusiveSum(ties, ties_before);
  int out = above_before + min(ties_before, ties_taken);
  const int64_t table_row = (int64_t)b * m;
  const int64_t out_row = (int64_t)row * budget;
  for (int j = begin; j < end; ++j) {
    const uint32_t key = key_at(j) & mask;
    bool take = key > threshold;
    if (key == threshold) take = ties_before++ < ties_taken;
    if (take) {
      p.out_cols[out_row + out] = p.table_pages[table_row + j];
      p.out_counts[out_row + out] = p.table_counts[table_row + j];
      ++out;
    }
  }
}

template <typename TQ, typename TB, int DIM_CHUNKS>
cudaError_t launch_score_chunks(const SelectPagesParams& p, cudaStream_t stream) {
  constexpr int per_block = pages_per_score_block<TB, DIM_CHUNKS>();
  const dim3 grid((p.max_pages + per_block - 1) / per_block, p.batch * p.num_kv_heads);
  return launch_pdl(score_pages_kernel<TQ, TB, DIM_CHUNKS>, grid, dim3(kScoreThreads), 0, stream, p);
}

template <typename TQ, typename TB>
cudaError_t launch_score(const SelectPagesParams& p, cudaStream_t stream) {
  return p.head_dim <= 128 ? launch_score_chunks<TQ, TB, 1>(p, stream) : launch_score_chunks<TQ, TB, 2>(p, stream);
}

template <typename TB>
cudaError_t launch_score_for_q(const SelectPagesParams& p, cudaStream_t stream) {
  switch (p.q_dtype) {
    case DType::kFloat32: return launch_score<float, TB>(p, stream);
    case DType::kFloat16: return launch_score<__half, TB>(p, stream);
    default: return launch_score<__nv_bfloat16, TB>(p, stream);
  }
}

}  // namespace

bool select_pages_supported(const SelectPagesParams& p) {
  const auto aligned = [](const void* ptr, int bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; };
  const int q_bytes = p.q_dtype == DType::kFloat32 ? 4 : 2;
  const int bound_bytes = p.bounds_dtype == DType::kFloat32 ? 4 : 2;
  return p.head_dim % kDimsPerLane == 0 && p.head_dim <= 32 * kDimsPerLane * kMaxDimChunks &&
         (p.bounds_dtype == DType::kFloat32 || p.bounds_dtype == DType::kBFloat16) &&
         aligned(p.q, kDimsPerLane * q_bytes) && p.q_stride_token % kDimsPerLane == 0 &&
         p.q_stride_head % kDimsPerLane == 0 && aligned(p.bounds, kDimsPerLane * bound_bytes) &&
         p.batch * (int64_t)p.num_kv_heads <= 65535 && p.budget >= 1 && p.budget <= p.max_pages;
}

cudaError_t launch_select_pages(const SelectPagesParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.num_kv_heads == 0) return cudaSuccess;
  if (!select_pages_supported(p)) return cudaErrorInvalidValue;
  cudaError_t err = p.bounds_dtype == DType::kFloat32 ? launch_score_for_q<float>(p, stream)
                                                      : launch_score_for_q<__nv_bfloat16>(p, stream);
  if (err != cudaSuccess) return err;
  const dim3 grid(p.batch * p.num_kv_heads);
  if (p.max_pages > kMaxSmemKeys) {
    return launch_pdl(select_top_pages_kernel<false>, grid, dim3(kSelectThreads), 0, stream, p);
  }
  const size_t smem = (size_t)p.max_pages * sizeof(uint32_t);
  if (smem > 48 * 1024) {  // opt in to more than 48 KB (a cheap host call, capture-safe)
    err = cudaFuncSetAttribute(select_top_pages_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               kMaxSmemKeys * (int)sizeof(uint32_t));
    if (err != cudaSuccess) return err;
  }
  return launch_pdl(select_top_pages_kernel<true>, grid, dim3(kSelectThreads), smem, stream, p);
}

}  // namespace flashcore
