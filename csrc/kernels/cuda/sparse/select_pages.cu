// "topk" page selection on the GPU (see SelectPagesParams in params.h for the contract), in two PDL-chained kernels:
//
// 1. Scores, grid (page chunks, batch * Hkv):
//    score_pages_kernel (page bounds alone): 8 threads per page, each holding every 8th group of 4 dims of the
//    page's bounds row (max and min; all loads issued up front, so a page costs one memory latency), dotted with
//    the query heads' positive and negative parts that the block keeps in shared memory, then summed over the 8
//    lanes (3 shuffles per query head); the entry's bias is loaded beside its page id, not after the dot products
//    (13 -> 10 us for 2048 pages x 8 heads, ncu, H200: one memory latency less per block). Two earlier versions:
//    one thread per page streaming its 512-byte row with 4 loads in flight was latency-bound (11.8 us for 2048
//    pages x 8 heads, H200); one warp per page spent ~7x the instructions on shuffles and icache misses (23 us).
//    score_sign_pages_kernel (key signs): a warp per page (4 pages each in turn), its lanes over the page's keys. A
//    key's estimate is q.min + the sum over the channels e whose sign bit is set of w_e = q_e (max_e - min_e); the
//    warp first tabulates, per group of 3 channels, the 8 sums of w over the group's bit patterns (4 query heads per
//    float4 entry), so a key costs one lookup per 3 channels. 8 entries of 16 B are 128 B, one pass over the 32
//    banks: lookups never conflict (a first version with 16-entry nibble tables, rebuilt per page from global
//    bounds with a branch per bit, took 96 us for 2048 pages x 8 heads, bounds scoring ~17 us).
// 2. select_top_pages_kernel, one block of 1,024 threads per row (select_pages: a (sequence, kv head), reading its
//    sequence's table; launch_select_top alone: the rerank stage's pick among a row's candidates, a table per row):
//    radix select of the budget-th largest score over an order-preserving uint32 image of the floats, held in
//    registers (rows up to 8,192 entries): 8-bit digits from the highest bit in which the row's keys differ (similar
//    scores share their top bits, which would pile every histogram increment onto one counter), stopping once the
//    bucket holding the threshold is taken whole; then an in-order compaction by warp ballots, which yields the picks
//    in key order with ties to the lower index. 2048 entries x 8 rows: 6.7-7.7 us (ncu, H200) against 12.5 for the
//    earlier 256-thread version (keys in shared memory, CUB block scans).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../launchers.h"
#include "../common/convert.cuh"
#include "../common/pdl.cuh"

namespace flashcore {
namespace {

constexpr int kScoreThreads = 256;       // threads per score_pages_kernel block
constexpr int kScoreLanes = 8;           // threads per page (a page's bounds row in one coalesced sweep)
constexpr int kScorePages = kScoreThreads / kScoreLanes;  // pages per score_pages_kernel block
constexpr int kQueryHeadsPerPass = 8;    // query heads whose parts sit in shared memory per pass over the bounds
constexpr int kDimsPerLoad = 4;
constexpr int kMaxHeadDim = 256;
constexpr int kSelectThreads = 1024;     // threads per select_top_pages_kernel block (one row)
constexpr int kSelectWarps = kSelectThreads / 32;  // at most 32: warp 0 scans one count per warp
static_assert(kSelectWarps <= 32 && kSelectThreads % 32 == 0, "select_top_pages_kernel's block");
constexpr int kMaxHeldKeys = 8;          // rows of up to 8 x 1024 entries keep their keys in registers
constexpr int kPrefetchKeys = 4;         // ... and up to 4 x 1024 their table entries too

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

// kLaneQuads: groups of 4 dims each thread holds (head_dim <= 4 * kScoreLanes * kLaneQuads).
template <typename TQ, typename TB, int kLaneQuads>
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
  const int lane = threadIdx.x % kScoreLanes;  // this thread's share of the page: quads lane, lane + kScoreLanes, ...
  const int j = blockIdx.x * kScorePages + threadIdx.x / kScoreLanes;
  const int page = j < p.max_pages ? p.table_pages[(int64_t)b * p.max_pages + j] : -1;
  const float bias = j < p.max_pages && lane == 0 ? p.table_bias[(int64_t)b * p.max_pages + j] : 0.f;  // in flight now
  const bool has_row = page >= 0 && page < p.num_bound_rows;
  const TB* hi_row = static_cast<const TB*>(p.bounds) + ((int64_t)(has_row ? page : 0) * p.num_kv_heads + h) * 2 * d;
  const TB* lo_row = hi_row + d;
  const TQ* q = static_cast<const TQ*>(p.q);

  // Every load of this thread's bounds is issued before the first is used (one memory latency per page); lanes
  // past the head dim (or of pages without a row) hold zeros.
  float4 hi[kLaneQuads], lo[kLaneQuads];
#pragma unroll
  for (int i = 0; i < kLaneQuads; ++i) {
    const int c = lane + i * kScoreLanes;
    const bool in = has_row && c < quads;
    hi[i] = in ? load_quad(hi_row + c * kDimsPerLoad) : make_float4(0.f, 0.f, 0.f, 0.f);
    lo[i] = in ? load_quad(lo_row + c * kDimsPerLoad) : make_float4(0.f, 0.f, 0.f, 0.f);
  }

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
#pragma unroll
    for (int g = 0; g < kQueryHeadsPerPass; ++g) {
      if (g < heads) {  // block-uniform
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < kLaneQuads; ++i) {
          const int c = lane + i * kScoreLanes;
          if (c < quads) {
            const float4 qp = q_pos[g * quads + c], qn = q_neg[g * quads + c];
            dot += qp.x * hi[i].x + qp.y * hi[i].y + qp.z * hi[i].z + qp.w * hi[i].w +
                   qn.x * lo[i].x + qn.y * lo[i].y + qn.z * lo[i].z + qn.w * lo[i].w;
          }
        }
#pragma unroll
        for (int s = kScoreLanes / 2; s >= 1; s >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, s);
        const bool first = first_head == 0 && g == 0;
        score = first ? dot : (p.head_reduce_sum ? score + dot : fmaxf(score, dot));
      }
    }
  }
  if (j >= p.max_pages || lane != 0) return;
  // Pages without a bounds row never win; forced pages (+inf) and entries past the end (-inf) ignore the score;
  // a NaN bound (inf * 0) keeps its page.
  score = !has_row ? -INFINITY : isinf(bias) ? bias : isnan(score) ? INFINITY : score + bias;
  p.scores[(int64_t)row * p.max_pages + j] = score;
}

constexpr int kSignWarps = 4;         // warps per score_sign_pages_kernel block
constexpr int kSignPagesPerWarp = 4;  // pages a warp scores in turn (the block stages the query once for all)
constexpr int kSignHeads = 4;         // query heads per pass: one float4 per table entry
constexpr int kGroupChannels = 3;     // channels per table lookup: 8 entries x 16 B fill the 32 banks exactly once
constexpr int kMaxGroups = (kMaxHeadDim + kGroupChannels - 1) / kGroupChannels;

__device__ __forceinline__ float4 operator+(float4 a, float4 b) {
  return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
}
__device__ __forceinline__ float4 operator*(float4 a, float s) { return make_float4(a.x * s, a.y * s, a.z * s, a.w * s); }
__device__ __forceinline__ float4 fma4(float4 a, float s, float4 c) {
  return make_float4(fmaf(a.x, s, c.x), fmaf(a.y, s, c.y), fmaf(a.z, s, c.z), fmaf(a.w, s, c.w));
}
__device__ __forceinline__ float4 max4(float4 a, float4 b) {
  return make_float4(fmaxf(a.x, b.x), fmaxf(a.y, b.y), fmaxf(a.z, b.z), fmaxf(a.w, b.w));
}
__device__ __forceinline__ float component(float4 v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }
__device__ __forceinline__ float4 warp_sum4(float4 v) {
#pragma unroll
  for (int s = 16; s >= 1; s >>= 1) {
    v.x += __shfl_xor_sync(0xffffffffu, v.x, s);
    v.y += __shfl_xor_sync(0xffffffffu, v.y, s);
    v.z += __shfl_xor_sync(0xffffffffu, v.z, s);
    v.w += __shfl_xor_sync(0xffffffffu, v.w, s);
  }
  return v;
}
__device__ __forceinline__ float4 warp_max4(float4 v) {
#pragma unroll
  for (int s = 16; s >= 1; s >>= 1) {
    v.x = fmaxf(v.x, __shfl_xor_sync(0xffffffffu, v.x, s));
    v.y = fmaxf(v.y, __shfl_xor_sync(0xffffffffu, v.y, s));
    v.z = fmaxf(v.z, __shfl_xor_sync(0xffffffffu, v.z, s));
    v.w = fmaxf(v.w, __shfl_xor_sync(0xffffffffu, v.w, s));
  }
  return v;
}

// Table entry (group g, value v) sits at g * 8 + (v ^ (g & 7)): lanes building consecutive groups store to
// different banks, and a lookup reads within its group's 128 bytes, conflict-free whatever the keys' bits.
__device__ __forceinline__ int table_slot(int g, uint32_t v) { return g * 8 + static_cast<int>(v ^ (g & 7)); }

// Bytes of dynamic shared memory of score_sign_pages_kernel: each warp's table, [ceil(head_dim / 3) * 8] float4.
inline size_t sign_table_bytes(int head_dim) {
  return size_t(kSignWarps) * ((head_dim + kGroupChannels - 1) / kGroupChannels) * 8 * sizeof(float4);
}

// The 3-bit pattern of key bits [3 g, 3 g + 3) from a key's sign words (word[kWords] is 0: a group past the last
// channel reads zero padding).
template <int kWords>
__device__ __forceinline__ uint32_t group_bits(const uint32_t (&word)[kWords + 1], int g) {
  const int bit = kGroupChannels * g, i = bit / 32, s = bit % 32;  // compile-time in an unrolled loop
  uint32_t v = word[i] >> s;
  if (s > 32 - kGroupChannels) v |= word[i + 1] << (32 - s);  // a group across two words
  return v & 7u;
}

// The sum of one key's table entries (its estimate minus the page's base). kDim > 0: a head dim that is a multiple
// of 64, the key's bits in registers and the lookups unrolled (kDim / 3 of them, every index a compile-time
// constant); kDim == 0: any head dim, two byte loads per lookup.
template <int kDim>
__device__ __forceinline__ float4 key_estimate(const uint8_t* bits, const float4* table, int head_dim,
                                               int sign_bytes) {
  float4 estimate = make_float4(0.f, 0.f, 0.f, 0.f);
  if constexpr (kDim > 0) {
    constexpr int kWords = kDim / 32, kGroups = (kDim + kGroupChannels - 1) / kGroupChannels;
    uint32_t word[kWords + 1];
#pragma unroll
    for (int i = 0; i < kWords; i += 2) {  // 8-byte aligned: rows of kDim / 8 bytes from an aligned base
      const uint2 pair = reinterpret_cast<const uint2*>(bits)[i / 2];
      word[i] = pair.x;
      word[i + 1] = pair.y;
    }
    word[kWords] = 0u;
#pragma unroll
    for (int g = 0; g < kGroups; ++g) estimate = estimate + table[table_slot(g, group_bits<kWords>(word, g))];
  } else {
    const int groups = (head_dim + kGroupChannels - 1) / kGroupChannels;
    for (int g = 0; g < groups; ++g) {
      const int bit = kGroupChannels * g, byte = bit / 8;
      uint32_t v = bits[byte];
      if (byte + 1 < sign_bytes) v |= uint32_t(bits[byte + 1]) << 8;
      estimate = estimate + table[table_slot(g, (v >> (bit % 8)) & 7u)];
    }
  }
  return estimate;
}

// Scores of one page (its bounds row hi / lo, its keys' sign bits) for the pass's query heads q_pass:
// base = q . min, w_e = q_e (max_e - min_e); a key's estimate is base + the sum of w_e over its set sign bits. The
// warp tabulates, per group of 3 channels, the 8 sums of w over the group's bit patterns, then each lane takes its
// keys, one lookup per group. Returns base + the best key's estimate per head (-inf for a page without keys).
template <int kDim, typename TB>
__device__ __forceinline__ float4 score_sign_page(const float4* q_pass, const TB* hi_row, const TB* lo_row,
                                                 const uint8_t* page_signs, int keys, int head_dim, int sign_bytes,
                                                 float4* table, int lane) {
  const int groups = (head_dim + kGroupChannels - 1) / kGroupChannels;
  float4 base = make_float4(0.f, 0.f, 0.f, 0.f);
  __syncwarp();  // the previous page's lookups are done with the table
  for (int g = lane; g < groups; g += 32) {
    float4 w[kGroupChannels];
#pragma unroll
    for (int c = 0; c < kGroupChannels; ++c) {
      const int e = kGroupChannels * g + c;
      w[c] = make_float4(0.f, 0.f, 0.f, 0.f);
      if (e < head_dim) {
        const float lo = to_float(lo_row[e]);
        w[c] = q_pass[e] * (to_float(hi_row[e]) - lo);
        base = fma4(q_pass[e], lo, base);
      }
    }
    const float4 w01 = w[0] + w[1];
    table[table_slot(g, 0)] = make_float4(0.f, 0.f, 0.f, 0.f);
    table[table_slot(g, 1)] = w[0];
    table[table_slot(g, 2)] = w[1];
    table[table_slot(g, 3)] = w01;
    table[table_slot(g, 4)] = w[2];
    table[table_slot(g, 5)] = w[2] + w[0];
    table[table_slot(g, 6)] = w[2] + w[1];
    table[table_slot(g, 7)] = w[2] + w01;
  }
  base = warp_sum4(base);
  __syncwarp();
  float4 best = make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
  for (int t = lane; t < keys; t += 32) {
    best = max4(best, key_estimate<kDim>(page_signs + (int64_t)t * sign_bytes, table, head_dim, sign_bytes));
  }
  return base + warp_max4(best);
}

template <typename TQ, typename TB, int kDim>
__global__ void __launch_bounds__(kSignWarps * 32) score_sign_pages_kernel(const SelectPagesParams p) {
  __shared__ float4 q_pass[kMaxHeadDim];  // q[e] of the pass's query heads (x, y, z, w: heads 0..3 of the pass)
  extern __shared__ float4 sign_tables[];  // [kSignWarps][ceil(head_dim / 3) * 8]
  grid_dependency_wait();
  allow_dependent_launch();
  const int row = blockIdx.y;  // b * Hkv + h
  const int b = row / p.num_kv_heads, h = row % p.num_kv_heads;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int d = p.head_dim, group = p.num_q_heads / p.num_kv_heads;
  const int query_heads = p.query_len * group;
  const bool one_pass = query_heads <= kSignHeads;  // the usual decode step: the query is staged once
  const int64_t m = p.max_pages;
  float4* table = sign_tables + warp * ((d + kGroupChannels - 1) / kGroupChannels) * 8;
  const TQ* q = static_cast<const TQ*>(p.q);

#pragma unroll 1
  for (int k = 0; k < kSignPagesPerWarp; ++k) {
    const int j = (blockIdx.x * kSignPagesPerWarp + k) * kSignWarps + warp;
    const int page = j < m ? p.table_pages[b * m + j] : -1;
    const bool has_row = page >= 0 && page < p.num_bound_rows;  // warp-uniform
    const int keys = has_row ? min(max(p.table_counts[b * m + j], 0), p.page_size) : 0;
    const int64_t head_row = (int64_t)(has_row ? page : 0) * p.num_kv_heads + h;
    const TB* hi_row = static_cast<const TB*>(p.bounds) + head_row * 2 * d;
    float score = 0.f;
    for (int first_head = 0; first_head < query_heads; first_head += kSignHeads) {
      const int heads = min(kSignHeads, query_heads - first_head);
      if (k == 0 || !one_pass) {  // block-uniform
        __syncthreads();  // every warp is done with q_pass
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
      }
      if (!has_row) continue;
      const float4 page_scores = score_sign_page<kDim>(q_pass, hi_row, hi_row + d,
                                                       p.signs + head_row * p.page_size * p.sign_bytes, keys, d,
                                                       p.sign_bytes, table, lane);
#pragma unroll
      for (int g = 0; g < kSignHeads; ++g) {
        if (g < heads) {
          const float head_score = component(page_scores, g);
          const bool first = first_head == 0 && g == 0;
          score = first ? head_score : (p.head_reduce_sum ? score + head_score : fmaxf(score, head_score));
        }
      }
    }
    if (lane == 0 && j < m) {
      const float bias = p.table_bias[b * m + j];
      // As score_pages_kernel: entries without a bounds row never win, +-inf bias ignores the score, NaN keeps
      // the page.
      p.scores[(int64_t)row * m + j] =
          !has_row ? -INFINITY : isinf(bias) ? bias : isnan(score) ? INFINITY : score + bias;
    }
  }
}

// Order-preserving image of a float: a > b (as floats, -inf < finite < +inf) iff key(a) > key(b) (as uint32).
__device__ __forceinline__ uint32_t order_key(float x) {
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The radix select's state after a digit: the picks are every key whose bits under the digits done exceed
// `prefix`, plus the first `needed` keys (by index) equal to it there; `bucket` keys are equal to it.
struct RadixState {
  uint32_t prefix;
  int needed;
  int bucket;
};

// KEYS_PER_THREAD > 0: a row of up to kSelectThreads * KEYS_PER_THREAD entries, entry j = k * kSelectThreads + tid
// held by thread tid in registers (and, up to kPrefetchKeys per thread, its table entry too, loaded beside the
// score so the output needs no load of its own); 0: any length, every pass re-reads the float scores (L2-resident:
// the score kernel just wrote them). Each step is a handful of block barriers: shared-memory histogram atomics
// (aggregating a warp's equal digits with __match_any_sync first measured slower: 9.1 against 6.8 us for 8 rows of
// 2,048 on the H200), warp 0's scan of the 256 bins, and the compaction's warp ballots.
template <int KEYS_PER_THREAD>
__global__ void __launch_bounds__(kSelectThreads) select_top_pages_kernel(const SelectTopParams p) {
  constexpr bool kHeld = KEYS_PER_THREAD > 0;
  constexpr int kSlots = kHeld ? KEYS_PER_THREAD : 1;
  constexpr bool kTableHeld = kHeld && KEYS_PER_THREAD <= kPrefetchKeys;
  __shared__ int histogram[2][256];  // pass n counts into [n % 2] while [(n + 1) % 2] is cleared for the next
  __shared__ uint32_t warp_and[kSelectWarps], warp_or[kSelectWarps];
  __shared__ RadixState state;
  __shared__ int2 warp_counts[kSelectWarps], warp_offsets[kSelectWarps];  // (above, ties) of a chunk's warps
  grid_dependency_wait();
  allow_dependent_launch();

  const int row = blockIdx.x, tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int m = p.max_pages, budget = p.budget;
  const int chunks = kHeld ? KEYS_PER_THREAD : (m + kSelectThreads - 1) / kSelectThreads;
  const float* scores = p.scores + (int64_t)row * m;
  const int64_t table_row = (int64_t)(row / p.rows_per_table) * m;
  uint32_t keys[kSlots];
  int pages[kTableHeld ? kSlots : 1], counts[kTableHeld ? kSlots : 1];
  if constexpr (kHeld) {
#pragma unroll
    for (int k = 0; k < kSlots; ++k) {
      const int j = k * kSelectThreads + tid;
      keys[k] = j < m ? order_key(scores[j]) : 0u;
      if constexpr (kTableHeld) {
        pages[k] = j < m ? p.table_pages[table_row + j] : 0;
        counts[k] = j < m ? p.table_counts[table_row + j] : 0;
      }
    }
  }
  // Entry j (chunk k) of this thread's; only called with j < m where the key is not held.
  const auto key_at = [&](int k, int j) -> uint32_t {
    if constexpr (kHeld) {
      return keys[k];
    } else {
      return order_key(scores[j]);
    }
  };

  // The bits above the highest one in which the row's keys differ are common to all: start the digits below them.
  uint32_t all_and = 0xffffffffu, all_or = 0u;
#pragma unroll
  for (int k = 0; k < chunks; ++k) {
    const int j = k * kSelectThreads + tid;
    if (j < m) {
      const uint32_t key = key_at(k, j);
      all_and &= key;
      all_or |= key;
    }
  }
  all_and = __reduce_and_sync(0xffffffffu, all_and);
  all_or = __reduce_or_sync(0xffffffffu, all_or);
  if (lane == 0) warp_and[warp] = all_and, warp_or[warp] = all_or;
  if (tid < 256) histogram[0][tid] = 0;
  __syncthreads();
  all_and = 0xffffffffu, all_or = 0u;
#pragma unroll
  for (int w = 0; w < kSelectWarps; ++w) all_and &= warp_and[w], all_or |= warp_or[w];
  const uint32_t differ = all_and ^ all_or;
  const int top_bit = differ == 0 ? 0 : 31 - __clz(differ);
  uint32_t mask = top_bit == 31 ? 0u : ~((2u << top_bit) - 1u);  // the bits decided so far (the common ones)
  uint32_t prefix = all_and & mask;
  int needed = budget, bucket = 0;

  // Radix select, most significant digit first, until the threshold's bucket is taken whole (no tie to break below
  // it) or every bit is decided.
  int pass = 0;
  for (int low = top_bit - 7; low > -8 && needed != bucket; low -= 8, ++pass) {
    const int shift = max(low, 0);
    const uint32_t digit_mask = (1u << (8 + min(low, 0))) - 1u;  // the last digit may be narrower
    int* bins = histogram[pass & 1];
    if (tid < 256) histogram[(pass + 1) & 1][tid] = 0;
#pragma unroll
    for (int k = 0; k < chunks; ++k) {
      const int j = k * kSelectThreads + tid;
      const uint32_t key = j < m ? key_at(k, j) : 0u;
      if (j < m && (key & mask) == prefix) atomicAdd(&bins[(key >> shift) & digit_mask], 1);
    }
    __syncthreads();
    if (warp == 0) {  // lane l holds digits 255 - 8 l - i, i < 8: an inclusive scan gives the count >= a digit
      int bin[8], sum = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) sum += bin[i] = bins[255 - 8 * lane - i];
      int at_or_above = sum;
#pragma unroll
      for (int s = 1; s < 32; s <<= 1) {
        const int n = __shfl_up_sync(0xffffffffu, at_or_above, s);
        if (lane >= s) at_or_above += n;
      }
      int above = at_or_above - sum;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        if (above < needed && above + bin[i] >= needed) {  // exactly one (lane, i): the bins hold >= needed keys
          state = RadixState{prefix | (uint32_t(255 - 8 * lane - i) << shift), needed - above, bin[i]};
        }
        above += bin[i];
      }
    }
    __syncthreads();
    prefix = state.prefix;
    needed = state.needed;
    bucket = state.bucket;
    mask |= digit_mask << shift;
  }
  const uint32_t threshold = prefix;
  const int ties_taken = needed;  // keys equal to the threshold (under mask) that are picked, lowest index first

  // In-order compaction, chunk by chunk: an entry's output slot is the picks before it (warp ballots, then warp 0's
  // scan of the warps' counts on top of the earlier chunks' totals, which it keeps in registers).
  const int64_t out_row = (int64_t)row * budget;
  const unsigned lanes_below = (1u << lane) - 1u;
  int total_above = 0, total_ties = 0;  // warp 0: picks above the threshold and ties in the chunks done
#pragma unroll
  for (int k = 0; k < chunks; ++k) {
    const int j = k * kSelectThreads + tid;
    const uint32_t key = j < m ? key_at(k, j) & mask : 0u;
    const bool above = j < m && key > threshold, tie = j < m && key == threshold;
    const unsigned above_lanes = __ballot_sync(0xffffffffu, above), tie_lanes = __ballot_sync(0xffffffffu, tie);
    if (lane == 0) warp_counts[warp] = make_int2(__popc(above_lanes), __popc(tie_lanes));
    __syncthreads();
    if (warp == 0) {
      const int2 c = lane < kSelectWarps ? warp_counts[lane] : make_int2(0, 0);
      int a = c.x, t = c.y;
#pragma unroll
      for (int s = 1; s < 32; s <<= 1) {
        const int na = __shfl_up_sync(0xffffffffu, a, s), nt = __shfl_up_sync(0xffffffffu, t, s);
        if (lane >= s) a += na, t += nt;
      }
      if (lane < kSelectWarps) warp_offsets[lane] = make_int2(total_above + a - c.x, total_ties + t - c.y);
      total_above += __shfl_sync(0xffffffffu, a, 31);
      total_ties += __shfl_sync(0xffffffffu, t, 31);
    }
    __syncthreads();
    if (above || tie) {
      const int2 offset = warp_offsets[warp];
      const int ties_before = offset.y + __popc(tie_lanes & lanes_below);
      if (above || ties_before < ties_taken) {
        const int out = offset.x + __popc(above_lanes & lanes_below) + min(ties_before, ties_taken);
        if constexpr (kTableHeld) {
          p.out_cols[out_row + out] = pages[k];
          p.out_counts[out_row + out] = counts[k];
        } else {
          p.out_cols[out_row + out] = p.table_pages[table_row + j];
          p.out_counts[out_row + out] = p.table_counts[table_row + j];
        }
      }
    }
  }
}

template <typename TQ, typename TB>
cudaError_t launch_score(const SelectPagesParams& p, cudaStream_t stream) {
  const dim3 grid((p.max_pages + kScorePages - 1) / kScorePages, p.batch * p.num_kv_heads);
  // Registers for the bounds a thread holds: half as many up to head dim 128.
  constexpr int kQuadsAt128 = 128 / kDimsPerLoad / kScoreLanes, kQuadsAtMax = kMaxHeadDim / kDimsPerLoad / kScoreLanes;
  const auto kernel =
      p.head_dim <= 128 ? score_pages_kernel<TQ, TB, kQuadsAt128> : score_pages_kernel<TQ, TB, kQuadsAtMax>;
  return launch_pdl(kernel, grid, dim3(kScoreThreads), 0, stream, p);
}

template <typename TQ, typename TB, int kDim>
cudaError_t launch_sign_score_dim(const SelectPagesParams& p, cudaStream_t stream) {
  static_assert(kSignWarps * kMaxGroups * 8 * sizeof(float4) + kMaxHeadDim * sizeof(float4) <= 48 * 1024,
                "score_sign_pages_kernel's tables must fit the default 48 KB of shared memory at head_dim 256");
  const int pages_per_block = kSignWarps * kSignPagesPerWarp;
  const dim3 grid((p.max_pages + pages_per_block - 1) / pages_per_block, p.batch * p.num_kv_heads);
  return launch_pdl(score_sign_pages_kernel<TQ, TB, kDim>, grid, dim3(kSignWarps * 32),
                    sign_table_bytes(p.head_dim), stream, p);
}

template <typename TQ, typename TB>
cudaError_t launch_sign_score(const SelectPagesParams& p, cudaStream_t stream) {
  // The unrolled variants read a key's bits as 8-byte words.
  if (reinterpret_cast<uintptr_t>(p.signs) % 8 == 0) {
    switch (p.head_dim) {
      case 64: return launch_sign_score_dim<TQ, TB, 64>(p, stream);
      case 128: return launch_sign_score_dim<TQ, TB, 128>(p, stream);
      case 256: return launch_sign_score_dim<TQ, TB, 256>(p, stream);
      default: break;
    }
  }
  return launch_sign_score_dim<TQ, TB, 0>(p, stream);
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

bool select_top_supported(const SelectTopParams& p) {
  return p.rows >= 0 && p.rows_per_table >= 1 && p.budget >= 1 && p.budget <= p.max_pages;
}

cudaError_t launch_select_top(const SelectTopParams& p, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  if (!select_top_supported(p)) return cudaErrorInvalidValue;
  const dim3 grid(p.rows), block(kSelectThreads);
  const int keys_per_thread = (p.max_pages + kSelectThreads - 1) / kSelectThreads;
  switch (keys_per_thread) {
    case 1: return launch_pdl(select_top_pages_kernel<1>, grid, block, 0, stream, p);
    case 2: return launch_pdl(select_top_pages_kernel<2>, grid, block, 0, stream, p);
    case 3:
    case 4: return launch_pdl(select_top_pages_kernel<4>, grid, block, 0, stream, p);
    default:
      if (keys_per_thread <= kMaxHeldKeys) {
        return launch_pdl(select_top_pages_kernel<kMaxHeldKeys>, grid, block, 0, stream, p);
      }
      return launch_pdl(select_top_pages_kernel<0>, grid, block, 0, stream, p);  // re-reads the scores each pass
  }
}

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
  SelectTopParams top;
  top.scores = p.scores;
  top.table_pages = p.table_pages;
  top.table_counts = p.table_counts;
  top.out_cols = p.out_cols;
  top.out_counts = p.out_counts;
  top.rows = p.batch * p.num_kv_heads;
  top.rows_per_table = p.num_kv_heads;  // a sequence's kv heads share its table
  top.max_pages = p.max_pages;
  top.budget = p.budget;
  return launch_select_top(top, stream);
}

}  // namespace flashcore
