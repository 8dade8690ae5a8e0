// "topk" page selection on the GPU (see SelectPagesParams in params.h for the contract), in two PDL-chained kernels:
//
// 1. Scores, grid (page chunks, batch * Hkv):
//    score_pages_kernel (page bounds alone): one thread scores one page, streaming its bounds row (max then min, 4
//    dims per load, 4 loads in flight) against the query heads' positive and negative parts, which the block keeps
//    in shared memory (read as broadcasts). No cross-lane reductions: a first version with one warp per page spent
//    ~7x the instructions on shuffles and icache misses (ncu: 23 us for 2048 pages x 8 heads).
//    score_sign_pages_kernel (key signs): one warp per page, its lanes over the page's keys. A key's estimate is
//    q.min + sum over the channels e whose sign bit is set of q[e] (max[e] - min[e]); the warp first tabulates, per
//    nibble position n and nibble value v, the sum of those terms over the set bits of v (16 entries per 4 channels,
//    4 query heads per entry), so a key costs one table lookup per 4 channels instead of 4 multiply-adds per head.
// 2. select_top_pages_kernel, one block per (sequence, kv head): radix select of the budget-th largest score over an
//    order-preserving uint32 image of the floats (kept in shared memory when the row fits): 8-bit digits from the
//    highest bit in which the row's keys differ (similar scores share their top bits, which would pile every
//    histogram increment onto one counter), stopping once the bucket holding the threshold is taken whole; then an
//    in-order compaction (block prefix sums), which yields the picks in key order with ties to the lower index.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>
#include <cub/block/block_scan.cuh>

#include "../launchers.h"
#include "../common/pdl.cuh"

namespace flashcore {
namespace {

constexpr int kScoreThreads = 64;        // pages per score block
constexpr int kQueryHeadsPerPass = 8;    // query heads whose parts sit in shared memory per pass over the bounds
constexpr int kDimsPerLoad = 4;
constexpr int kMaxHeadDim = 256;
constexpr int kSelectThreads = 256;
constexpr int kMaxSmemKeys = 48 * 1024;  // 192 KB of shared memory; longer rows read their scores from global

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// 4 consecutive elements as stored (16-byte aligned for float, 8-byte for 16-bit types: guaranteed by the launcher).
template <typename T>
using Quad = std::conditional_t<sizeof(T) == 4, float4, uint2>;

template <typename T>
__device__ __forceinline__ float4 load_quad(const T* src) {
  const Quad<T> raw = *reinterpret_cast<const Quad<T>*>(src);
  if constexpr (sizeof(T) == 4) {
    return raw;
  } else {
    const T* e = reinterpret_cast<const T*>(&raw);
    return make_float4(to_float(e[0]), to_float(e[1]), to_float(e[2]), to_float(e[3]));
  }
}

template <typename TQ, typename TB>
__global__ void __launch_bounds__(kScoreThreads) score_pages_kernel(const SelectPagesParams p) {
  // q_pos / q_neg [kQueryHeadsPerPass][head_dim]: max(q, 0) and min(q, 0) of the pass's query heads.
  __shared__ float4 q_pos[kQueryHeadsPerPass * kMaxHeadDim / kDimsPerLoad];
  __shared__ float4 q_neg[kQueryHeadsPerPass * kMaxHeadDim / kDimsPerLoad];
  grid_dependency_wait();
  allow_dependent_launch();
  const int row = blockIdx.y;  // b * Hkv + h
  const int b = row / p.num_kv_heads, h = row % p.num_kv_heads;
  const int d = p.head_dim, quads = d / kDimsPerLoad, group = p.num_q_heads / p.num_kv_heads;
  const int query_heads = p.query_len * group;
  const int j = blockIdx.x * kScoreThreads + threadIdx.x;
  const int page = j < p.max_pages ? p.table_pages[(int64_t)b * p.max_pages + j] : -1;
  const bool has_row = page >= 0 && page < p.num_bound_rows;
  const TB* hi_row = static_cast<const TB*>(p.bounds) + ((int64_t)(has_row ? page : 0) * p.num_kv_heads + h) * 2 * d;
  const TB* lo_row = hi_row + d;
  const TQ* q = static_cast<const TQ*>(p.q);

  float score = 0.f;
  for (int first_head = 0; first_head < query_heads; first_head += kQueryHeadsPerPass) {
    const int heads = min(kQueryHeadsPerPass, query_heads - first_head);
    __syncthreads();  // the previous pass is done with q_pos / q_neg
    for (int i = threadIdx.x; i < heads * quads; i += kScoreThreads) {
      const int qh = first_head + i / quads;  // (query qh / group, head-in-group qh % group)
      const int64_t token = (int64_t)b * p.query_len + qh / group;
      const float4 v = load_quad(q + token * p.q_stride_token + (int64_t)(h * group + qh % group) * p.q_stride_head +
                                 (i % quads) * kDimsPerLoad);
      q_pos[i] = make_float4(fmaxf(v.x, 0.f), fmaxf(v.y, 0.f), fmaxf(v.z, 0.f), fmaxf(v.w, 0.f));
      q_neg[i] = make_float4(fminf(v.x, 0.f), fminf(v.y, 0.f), fminf(v.z, 0.f), fminf(v.w, 0.f));
    }
    __syncthreads();
    if (!has_row) continue;
    float dot[kQueryHeadsPerPass] = {};
#pragma unroll 4
    for (int c = 0; c < quads; ++c) {
      const float4 hi = load_quad(hi_row + c * kDimsPerLoad);
      const float4 lo = load_quad(lo_row + c * kDimsPerLoad);
#pragma unroll
      for (int g = 0; g < kQueryHeadsPerPass; ++g) {
        if (g < heads) {  // block-uniform
          const float4 qp = q_pos[g * quads + c], qn = q_neg[g * quads + c];
          dot[g] += qp.x * hi.x + qp.y * hi.y + qp.z * hi.z + qp.w * hi.w +
                    qn.x * lo.x + qn.y * lo.y + qn.z * lo.z + qn.w * lo.w;
        }
      }
    }
#pragma unroll
    for (int g = 0; g < kQueryHeadsPerPass; ++g) {
      if (g < heads) {
        const bool first = first_head == 0 && g == 0;
        score = first ? dot[g] : (p.head_reduce_sum ? score + dot[g] : fmaxf(score, dot[g]));
      }
    }
  }
  if (j >= p.max_pages) return;
  const float bias = p.table_bias[(int64_t)b * p.max_pages + j];
  // Pages without a bounds row never win; forced pages (+inf) and entries past the end (-inf) ignore the score;
  // a NaN bound (inf * 0) keeps its page.
  score = !has_row ? -INFINITY : isinf(bias) ? bias : isnan(score) ? INFINITY : score + bias;
  p.scores[(int64_t)row * p.max_pages + j] = score;
}

constexpr int kSignWarps = 4;  // pages per score_sign_pages_kernel block: a warp each
constexpr int kSignHeads = 4;  // query heads per pass: one float4 per table entry

__device__ __forceinline__ float4 operator+(float4 a, float4 b) {
  return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
}
__device__ __forceinline__ float4 fma4(float4 a, float s, float4 c) {
  return make_float4(fmaf(a.x, s, c.x), fmaf(a.y, s, c.y), fmaf(a.z, s, c.z), fmaf(a.w, s, c.w));
}
__device__ __forceinline__ float4 max4(float4 a, float4 b) {
  return make_float4(fmaxf(a.x, b.x), fmaxf(a.y, b.y), fmaxf(a.z, b.z), fmaxf(a.w, b.w));
}
__device__ __forceinline__ float component(float4 v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }
__device__ __forceinline__ float to_float(float x) { return x; }

// Bytes of dynamic shared memory of score_sign_pages_kernel: each warp's nibble table, [head_dim / 4 * 16] float4.
inline size_t sign_table_bytes(int head_dim) { return size_t(kSignWarps) * (head_dim / 4) * 16 * sizeof(float4); }

template <typename TQ, typename TB>
__global__ void __launch_bounds__(kSignWarps * 32) score_sign_pages_kernel(const SelectPagesParams p) {
  __shared__ float4 q_pass[kMaxHeadDim];   // q[e] of the pass's query heads (x, y, z, w: heads 0..3 of the pass)
  extern __shared__ float4 nibble_tables[];  // [kSignWarps][head_dim / 4 * 16]
  grid_dependency_wait();
  allow_dependent_launch();
  const int row = blockIdx.y;  // b * Hkv + h
  const int b = row / p.num_kv_heads, h = row % p.num_kv_heads;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int d = p.head_dim, nibbles = d / 4, group = p.num_q_heads / p.num_kv_heads;
  const int query_heads = p.query_len * group;
  const int64_t m = p.max_pages;
  const int j = blockIdx.x * kSignWarps + warp;
  const int page = j < m ? p.table_pages[b * m + j] : -1;
  const bool has_row = page >= 0 && page < p.num_bound_rows;
  const int keys = has_row ? min(max(p.table_counts[b * m + j], 0), p.page_size) : 0;
  const int64_t head_row = (int64_t)(has_row ? page : 0) * p.num_kv_heads + h;
  const TB* hi_row = static_cast<const TB*>(p.bounds) + head_row * 2 * d;
  const TB* lo_row = hi_row + d;
  const uint8_t* page_signs = p.signs + head_row * p.page_size * p.sign_bytes;
  float4* table = nibble_tables + warp * nibbles * 16;
  const TQ* q = static_cast<const TQ*>(p.q);

  float score = 0.f;
  for (int first_head = 0; first_head < query_heads; first_head += kSignHeads) {
    const int heads = min(kSignHeads, query_heads - first_head);
    __syncthreads();  // the previous pass is done with q_pass
    for (int e = threadIdx.x; e < d; e += kSignWarps * 32) {
      float v[kSignHeads];
#pragma unroll
      for (int g = 0; g < kSignHeads; ++g) {
        v[g] = 0.f;
        if (g < heads) {
          const int qh = first_head + g;  // (query qh / group, head-in-group qh % group)
          const int64_t token = (int64_t)b * p.query_len + qh / group;
          v[g] = to_float(q[token * p.q_stride_token + (int64_t)(h * group + qh % group) * p.q_stride_head + e]);
        }
      }
      q_pass[e] = make_float4(v[0], v[1], v[2], v[3]);
    }
    __syncthreads();
    if (!has_row) continue;  // warp-uniform: this warp's entry has no bounds row (it scores -inf below)
    // q.min, lanes over channels; then the nibble table, a lane per entry (n = i / 16, v = i % 16).
    float4 base = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int e = lane; e < d; e += 32) base = fma4(q_pass[e], to_float(lo_row[e]), base);
#pragma unroll
    for (int s = 16; s >= 1; s >>= 1) {
      base.x += __shfl_xor_sync(0xffffffffu, base.x, s);
      base.y += __shfl_xor_sync(0xffffffffu, base.y, s);
      base.z += __shfl_xor_sync(0xffffffffu, base.z, s);
      base.w += __shfl_xor_sync(0xffffffffu, base.w, s);
    }
    __syncwarp();  // this warp's previous pass is done with its table
    for (int i = lane; i < nibbles * 16; i += 32) {
      const int n = i >> 4, v = i & 15;
      float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int bit = 0; bit < 4; ++bit) {
        if ((v >> bit) & 1) {
          const int e = 4 * n + bit;
          sum = fma4(q_pass[e], to_float(hi_row[e]) - to_float(lo_row[e]), sum);
        }
      }
      table[i] = sum;
    }
    __syncwarp();
    // Each lane's keys: one lookup per nibble of its sign bits (padding bits past head_dim are zero).
    float4 best = make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
    for (int t = lane; t < keys; t += 32) {
      const uint8_t* bits = page_signs + (int64_t)t * p.sign_bytes;
      float4 estimate = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int c = 0; c < p.sign_bytes; ++c) {
        const uint32_t byte = bits[c];
        estimate = estimate + table[(2 * c) * 16 + (byte & 15u)];
        if (2 * c + 1 < nibbles) estimate = estimate + table[(2 * c + 1) * 16 + (byte >> 4)];
      }
      best = max4(best, estimate);
    }
#pragma unroll
    for (int s = 16; s >= 1; s >>= 1) {
      best.x = fmaxf(best.x, __shfl_xor_sync(0xffffffffu, best.x, s));
      best.y = fmaxf(best.y, __shfl_xor_sync(0xffffffffu, best.y, s));
      best.z = fmaxf(best.z, __shfl_xor_sync(0xffffffffu, best.z, s));
      best.w = fmaxf(best.w, __shfl_xor_sync(0xffffffffu, best.w, s));
    }
#pragma unroll
    for (int g = 0; g < kSignHeads; ++g) {
      if (g < heads) {
        const float head_score = component(base, g) + component(best, g);  // -inf for a page without keys
        const bool first = first_head == 0 && g == 0;
        score = first ? head_score : (p.head_reduce_sum ? score + head_score : fmaxf(score, head_score));
      }
    }
  }
  if (lane != 0 || j >= m) return;
  const float bias = p.table_bias[b * m + j];
  // As score_pages_kernel: entries without a bounds row never win, +-inf bias ignores the score, NaN keeps the page.
  score = !has_row ? -INFINITY : isinf(bias) ? bias : isnan(score) ? INFINITY : score + bias;
  p.scores[(int64_t)row * m + j] = score;
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
  __shared__ uint32_t chosen_prefix, warp_and[kSelectThreads / 32], warp_or[kSelectThreads / 32];
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
  // The bits above the highest one in which the row's keys differ are common to all: start the digits below them.
  uint32_t all_and = 0xffffffffu, all_or = 0u;
  for (int j = tid; j < m; j += kSelectThreads) {
    const uint32_t key = key_at(j);
    all_and &= key;
    all_or |= key;
  }
  all_and = __reduce_and_sync(0xffffffffu, all_and);
  all_or = __reduce_or_sync(0xffffffffu, all_or);
  if ((tid & 31) == 0) warp_and[tid / 32] = all_and, warp_or[tid / 32] = all_or;
  __syncthreads();
  all_and = 0xffffffffu, all_or = 0u;
#pragma unroll
  for (int w = 0; w < kSelectThreads / 32; ++w) all_and &= warp_and[w], all_or |= warp_or[w];
  const uint32_t differ = all_and ^ all_or;
  const int top_bit = differ == 0 ? 0 : 31 - __clz(differ);
  uint32_t mask = top_bit == 31 ? 0u : ~((2u << top_bit) - 1u);  // the common bits
  if (tid == 0) {
    chosen_prefix = all_and & mask;
    still_needed = budget;
    bucket_size = 0;
  }
  // Radix select, most significant digit first: after each pass, the picks are every key whose bits under `mask`
  // exceed chosen_prefix, plus the first still_needed keys (by index) equal to it there.
  for (int low = top_bit - 7; low > -8; low -= 8) {
    const int shift = max(low, 0);
    const uint32_t digit_mask = (1u << (8 + min(low, 0))) - 1u;  // the last digit may be narrower
    histogram[tid] = 0;  // kSelectThreads == 256 bins
    __syncthreads();
    const uint32_t prefix = chosen_prefix;
    if (still_needed == bucket_size) break;  // the threshold's bucket was taken whole: no tie to break below it
    for (int j = tid; j < m; j += kSelectThreads) {
      const uint32_t key = key_at(j);
      if ((key & mask) == prefix) atomicAdd(&histogram[(key >> shift) & digit_mask], 1);
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
    mask |= digit_mask << shift;
  }
  __syncthreads();
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

template <typename TQ, typename TB>
cudaError_t launch_score(const SelectPagesParams& p, cudaStream_t stream) {
  const dim3 grid((p.max_pages + kScoreThreads - 1) / kScoreThreads, p.batch * p.num_kv_heads);
  return launch_pdl(score_pages_kernel<TQ, TB>, grid, dim3(kScoreThreads), 0, stream, p);
}

template <typename TQ, typename TB>
cudaError_t launch_sign_score(const SelectPagesParams& p, cudaStream_t stream) {
  const size_t smem = sign_table_bytes(p.head_dim);
  if (smem > 48 * 1024) {  // opt in to more than 48 KB (a cheap host call, capture-safe)
    const cudaError_t err = cudaFuncSetAttribute(score_sign_pages_kernel<TQ, TB>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (err != cudaSuccess) return err;
  }
  const dim3 grid((p.max_pages + kSignWarps - 1) / kSignWarps, p.batch * p.num_kv_heads);
  return launch_pdl(score_sign_pages_kernel<TQ, TB>, grid, dim3(kSignWarps * 32), smem, stream, p);
}

template <typename TB>
cudaError_t launch_score_for_q(const SelectPagesParams& p, cudaStream_t stream) {
  if (p.signs != nullptr) {
    switch (p.q_dtype) {
      case DType::kFloat32: return launch_sign_score<float, TB>(p, stream);
      case DType::kFloat16: return launch_sign_score<__half, TB>(p, stream);
      default: return launch_sign_score<__nv_bfloat16, TB>(p, stream);
    }
  }
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
  return p.head_dim % kDimsPerLoad == 0 && p.head_dim <= kMaxHeadDim &&
         (p.bounds_dtype == DType::kFloat32 || p.bounds_dtype == DType::kBFloat16) &&
         aligned(p.q, kDimsPerLoad * q_bytes) && p.q_stride_token % kDimsPerLoad == 0 &&
         p.q_stride_head % kDimsPerLoad == 0 && aligned(p.bounds, kDimsPerLoad * bound_bytes) &&
         p.batch * (int64_t)p.num_kv_heads <= 65535 && p.budget >= 1 && p.budget <= p.max_pages &&
         (p.signs == nullptr || (p.page_size >= 1 && p.sign_bytes == (p.head_dim + 7) / 8));
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
