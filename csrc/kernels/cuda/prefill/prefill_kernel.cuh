// Tensor-core paged attention for prompts and chunked prefill (many queries per sequence).
//
// One CTA computes a tile of kBlockM query rows of one KV head of one sequence. Rows are (query, head-in-group)
// pairs packed as m = i * G + g (G = Hq / Hkv), so the G query heads that share a KV head share every K/V tile that
// the CTA loads, and short query runs (chunked prefill) still fill the tile.
//
// Per K/V tile of kBlockN keys, forward over keys, K and V double-buffered (one barrier per tile):
//   wait tile n | barrier | issue cp.async of tile n+1 into the other stage | S = Q K^T (mma.sync m16n8k16,
//   ldmatrix) | mask (boundary tiles only) | online softmax in fp32 registers | O += P V (P stays in registers,
//   V via ldmatrix.trans)
// K/V rows are gathered through the page list with cp.async: warp 0 resolves each key of the tile after next to its
// physical token slot (page * page_size + offset) into a small shared table, walking the sequence's pages in windows
// of 32 (warp prefix sum of token_counts; then a direct index when the window's pages are full and page_size is a
// power of two, else a shuffle binary search per key). Any page size and partial pages
// anywhere are handled; a page id outside [0, num_pages) or a count outside [0, page_size] counts as an empty page.
// Shared tiles are XOR-swizzled in 16-byte chunks (chunk ^ (row & 7)) so ldmatrix and cp.async are conflict-free.
// Causal tiles fully above the diagonal and window tiles fully below the band are never visited; masks are applied
// only on tiles that touch a boundary.
// Softcap (kSoftcap instantiations): S becomes tanh(S * sm_scale / softcap) before the mask, and the softmax scale
// softcap (instead of sm_scale) turns it into the capped logit. Sinks join each row once, in the epilogue.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "../../params.h"
#include "../softcap_sinks.cuh"

namespace flashcore {
namespace prefill {

constexpr int kBlockM = 128;  // query rows (query, head) per CTA

template <int kHeadDim_, int kBlockN_>
struct TileConfig {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = prefill::kBlockM;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kWarpRows = kBlockM / kWarps;  // 32: each warp owns two 16-row MMA tiles
  static constexpr int kMTiles = kWarpRows / 16;
  static constexpr int kNTiles = kBlockN / 8;    // 8-key MMA column tiles of S
  static constexpr int kDTiles = kHeadDim / 8;   // 8-wide MMA column tiles of O
  static constexpr int kChunks = kHeadDim / 8;   // 16-byte chunks per row
  static constexpr int kStages = 2;  // K/V tiles in flight: tile n+1 loads during all of tile n's compute
  static constexpr size_t kSmemBytes = size_t(kBlockM + 2 * kStages * kBlockN) * kHeadDim * 2 + 2 * kBlockN * sizeof(int) +
                                       32 * sizeof(int4) + (kWarps + 8) * sizeof(int);
  static_assert(kHeadDim % 64 == 0 && kBlockN % 32 == 0, "tile shape");
};

// ---- small PTX wrappers ------------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// What one CTA of either prefill kernel works on. Grid (KV head, sequence, query tile) with the tile slowest and
// reversed: every (sequence, KV head) pair's last tile -- the heaviest under a causal mask -- is scheduled before any
// earlier one (longest first keeps the tail of the grid short). Layout indices are clamped into range.
struct TileWork {
  int hkv, b, tile, G;
  int q0, n_q, rows_total, m0;  // the sequence's queries [q0, q0 + n_q); tile rows [m0, m0 + M) of n_q * G
  int page_begin, n_pages;      // its layout entries
};

__device__ __forceinline__ TileWork tile_work(const PagedAttentionParams& p, int M) {
  TileWork w;
  w.hkv = blockIdx.x;
  w.b = blockIdx.y;
  w.tile = gridDim.z - 1 - blockIdx.z;
  w.G = p.num_q_heads / p.num_kv_heads;
  w.q0 = min(max(p.q_indptr[w.b], 0), p.total_q);
  w.n_q = min(max(p.q_indptr[w.b + 1], w.q0), p.total_q) - w.q0;
  w.rows_total = w.n_q * w.G;
  w.m0 = w.tile * M;
  w.page_begin = min(max(p.row_offsets[w.b], 0), p.nnz);
  w.n_pages = min(max(p.row_offsets[w.b + 1], w.page_begin), p.nnz) - w.page_begin;
  return w;
}


// 16-byte async copy global -> shared; src_bytes = 0 writes zeros without reading src.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

template <typename T>
struct MmaOps;

template <>
struct MmaOps<__half> {
  __device__ __forceinline__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

template <>
struct MmaOps<__nv_bfloat16> {
  __device__ __forceinline__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

// Element offset of 16-byte chunk `chunk` of row `row` in a swizzled [rows][kHeadDim] shared tile.
template <int kHeadDim>
__device__ __forceinline__ int swizzle(int row, int chunk) {
  return row * kHeadDim + ((chunk ^ (row & 7)) << 3);
}

// ---- page walking ------------------------------------------------------------------------------------------------

__device__ __forceinline__ int checked_count(const PagedAttentionParams& p, int j, int* page_out) {
  const int page = p.cols[j];
  const int count = p.token_counts[j];
  *page_out = page;
  const bool ok = page >= 0 && page < p.num_pages && count >= 0 && count <= p.page_size;
  return ok ? count : 0;
}

// A window of 32 consecutive pages of one sequence, one page per lane of warp 0: lane L holds page j + L, covering
// the sequence's keys [begin, end) from token slot `slot0` on. Empty/invalid pages have begin == end.
// Lives in shared memory between tiles (one int4 per lane) so that it costs the other warps no registers.
struct PageWindow {
  int j;         // index (within the sequence's page list) of lane 0's page
  int slot0;     // page * page_size of this lane's page
  int begin;     // first key of this lane's page
  int end;       // one past its last key (inclusive prefix sum)
  int last_end;  // end of lane 31: keys below it are covered by this or earlier windows
};

__device__ __forceinline__ void load_window(PageWindow& w, int j, int key_base, const PagedAttentionParams& p,
                                            int page_begin, int n_pages, int lane) {
  int page = 0, count = 0;
  if (j + lane < n_pages) count = checked_count(p, page_begin + j + lane, &page);
  int incl = count;
#pragma unroll
  for (int s = 1; s < 32; s <<= 1) {
    const int other = __shfl_up_sync(0xffffffffu, incl, s);
    if (lane >= s) incl += other;
  }
  w.j = j;
  w.end = key_base + incl;
  w.begin = w.end - count;
  w.slot0 = page * p.page_size;
  w.last_end = __shfl_sync(0xffffffffu, w.end, 31);
}

// Warp 0: token slot of every key of the tile [k0, k0 + kBlockN) into slots[] (-1 for keys >= n_k).
// Precondition: the window starts at or before k0 (windows only move forward, tiles are visited in key order).
template <int kBlockN>
__device__ __forceinline__ void fill_slots(int4* saved, int k0, int n_k, int* slots, const PagedAttentionParams& p,
                                           int page_begin, int n_pages, int lane) {
  constexpr int kPerLane = kBlockN / 32;
  const int4 state = saved[lane];
  PageWindow w{state.x, state.y, state.z, state.w, 0};
  w.last_end = __shfl_sync(0xffffffffu, w.end, 31);
  int res[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) res[i] = -1;
  const int k_end = min(k0 + kBlockN, n_k);
  const bool pow2_pages = (p.page_size & (p.page_size - 1)) == 0;
  const int log2_pages = __ffs(p.page_size) - 1;
  while (true) {
    // Fast path: every page of the window that is followed by more keys is full, so key k sits on lane
    // (k - begin of lane 0) / page_size. Otherwise (partial or empty pages inside the window) binary search.
    const int begin0 = __shfl_sync(0xffffffffu, w.begin, 0);
    const bool uniform =
        pow2_pages && !__any_sync(0xffffffffu, w.end - w.begin != p.page_size && w.end < w.last_end);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int k = k0 + i * 32 + lane;
      int src_lane;
      if (uniform) {
        src_lane = min((k - begin0) >> log2_pages, 31);
      } else {
        src_lane = 0;  // number of lanes whose page ends at or before k: k lies on that lane's page
#pragma unroll
        for (int s = 16; s >= 1; s >>= 1) {
          const int e = __shfl_sync(0xffffffffu, w.end, src_lane + s - 1);
          if (e <= k) src_lane += s;
        }
      }
      const int slot0 = __shfl_sync(0xffffffffu, w.slot0, src_lane & 31);
      const int begin = __shfl_sync(0xffffffffu, w.begin, src_lane & 31);
      // src_lane saturates at 31, so keys past the window (k >= last_end) are excluded explicitly; keys before it
      // were resolved by an earlier window.
      if (k < k_end && k < w.last_end && res[i] < 0) res[i] = slot0 + (k - begin);
    }
    if (w.last_end >= k_end || w.j + 32 >= n_pages) break;
    load_window(w, w.j + 32, w.last_end, p, page_begin, n_pages, lane);
  }
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) slots[i * 32 + lane] = res[i];
  saved[lane] = make_int4(w.j, w.slot0, w.begin, w.end);
}

// ---- the kernel --------------------------------------------------------------------------------------------------

template <typename T, class Cfg, bool kSoftcap>
__global__ void __launch_bounds__(Cfg::kThreads, 2) paged_prefill_kernel(const PagedAttentionParams p) {
  constexpr int D = Cfg::kHeadDim, M = Cfg::kBlockM, N = Cfg::kBlockN;
  constexpr int kMT = Cfg::kMTiles, kNT = Cfg::kNTiles, kDT = Cfg::kDTiles, kCh = Cfg::kChunks;
  using Ops = MmaOps<T>;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + M * D;                 // [kStages][N][D]
  T* sV = sK + Cfg::kStages * N * D;  // [kStages][N][D]
  int* sSlots = reinterpret_cast<int*>(sV + Cfg::kStages * N * D);        // [2][N] token slots of the next two K/V tiles
  int4* sWindow = reinterpret_cast<int4*>(sSlots + 2 * N);  // [32] PageWindow of warp 0
  int* sReduce = reinterpret_cast<int*>(sWindow + 32);       // [kWarps]
  // Per-CTA scalars the main loop needs only now and then; kept in shared memory so they cost no registers.
  int* sMeta = sReduce + Cfg::kWarps;  // [8]
  enum { kNk, kQposBase, kPageBegin, kNPages, kFullLo, kFullHi, kCapIn };

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const TileWork work = tile_work(p, M);
  if (work.m0 >= work.rows_total) return;
  const int hkv = work.hkv, G = work.G;
  const int q0 = work.q0, n_q = work.n_q, rows_total = work.rows_total, m0 = work.m0;
  const int page_begin = work.page_begin, n_pages = work.n_pages;

  // Q tile first so that its load overlaps the page scan below.
  {
    const T* q = static_cast<const T*>(p.q);
    const uint32_t sQ_base = smem_addr(sQ);
#pragma unroll
    for (int it = 0; it < M * kCh / Cfg::kThreads; ++it) {
      const int idx = it * Cfg::kThreads + tid;
      const int row = idx / kCh, chunk = idx % kCh;
      const int m = m0 + row;
      const bool valid = m < rows_total;
      const int i = valid ? m / G : 0, g = valid ? m - i * G : 0;
      const T* src = q + (int64_t)(q0 + i) * p.q_stride_token + (int64_t)(hkv * G + g) * p.q_stride_head + chunk * 8;
      cp_async_16(sQ_base + swizzle<D>(row, chunk) * 2, valid ? src : q, valid ? 16 : 0);
    }
    cp_async_commit();
  }

  // n_k = keys of this sequence.
  int part = 0;
  for (int j = tid; j < n_pages; j += Cfg::kThreads) {
    int page;
    part += checked_count(p, page_begin + j, &page);
  }
#pragma unroll
  for (int s = 16; s >= 1; s >>= 1) part += __shfl_xor_sync(0xffffffffu, part, s);
  if (lane == 0) sReduce[warp] = part;
  __syncthreads();
  int n_k = 0;
#pragma unroll
  for (int w = 0; w < Cfg::kWarps; ++w) n_k += sReduce[w];

  // Positions and the key range this tile can see.
  const int qpos_base = n_k - n_q;
  const int qpos_lo = qpos_base + m0 / G;
  const int qpos_hi = qpos_base + (min(rows_total, m0 + M) - 1) / G;
  int k_hi = n_k, k_lo = 0;
  if (p.causal) k_hi = min(k_hi, qpos_hi + 1);
  if (p.window > 0) k_lo = max(0, qpos_lo - p.window + 1);
  const int nb_begin = k_lo / N;
  const int nb_end = k_hi > k_lo ? (k_hi + N - 1) / N : nb_begin;
  // Tiles in [nb_full_lo, nb_full_hi) are visible to every row: below the end of the keys, at or below the first
  // row's diagonal, at or above the last row's window start. Only the others are masked.
  const int nb_full_hi = min(n_k / N, p.causal ? max(qpos_lo + 1, 0) / N : n_k / N);
  const int nb_full_lo = p.window > 0 ? (max(qpos_hi - p.window + 1, 0) + N - 1) / N : 0;
  if (tid == 0) {
    sMeta[kNk] = n_k, sMeta[kQposBase] = qpos_base, sMeta[kPageBegin] = page_begin, sMeta[kNPages] = n_pages;
    sMeta[kFullLo] = nb_full_lo, sMeta[kFullHi] = nb_full_hi;
    if (kSoftcap) sMeta[kCapIn] = __float_as_int(__fdiv_rn(p.sm_scale, p.softcap));
  }

  // This thread's four rows: (mi, half) -> tile row warp*32 + mi*16 + half*8 + lane/4.
  const int my_m = m0 + warp * Cfg::kWarpRows + lane / 4;

  float acc_o[kMT][kDT][4];
  float row_max[kMT][2], row_sum[kMT][2];
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mi][dt][e] = 0.f;
    row_max[mi][0] = row_max[mi][1] = -INFINITY;
    row_sum[mi][0] = row_sum[mi][1] = 0.f;
  }

  // The softmax keeps the running max of S as computed (raw q.k, or tanh(q.k * sm_scale / softcap) with softcap),
  // so its scale is sm_scale (softcap): positive either way.
  const float score_scale = kSoftcap ? p.softcap : p.sm_scale;
  const float scale_log2 = score_scale * 1.4426950408889634f;
  const int64_t kv_token_stride = (int64_t)p.num_kv_heads * D;
  const T* k_cache = static_cast<const T*>(p.k_cache) + (int64_t)hkv * D;
  const T* v_cache = static_cast<const T*>(p.v_cache) + (int64_t)hkv * D;
  const uint32_t sQ_base = smem_addr(sQ), sK_base = smem_addr(sK), sV_base = smem_addr(sV);

  // Issue the gather of K/V tile `nb` into stage nb % 2, its token slots in sSlots[nb % 2]. Thread t copies chunk
  // t % kCh of rows t / kCh + it * kRowStep: (row & 7) is the same for all its rows, so their swizzled destinations
  // differ by compile-time constants.
  constexpr int kRowStep = Cfg::kThreads / kCh;
  constexpr int kRowsPerThread = N / kRowStep;
  static_assert(kRowStep % 8 == 0, "rows of one thread share their swizzle phase");
  const int ld_chunk = tid % kCh, ld_row0 = tid / kCh;
  const uint32_t ld_dst = swizzle<D>(ld_row0, ld_chunk) * 2;
  constexpr uint32_t kStageBytes = N * D * 2;
  auto load_kv = [&](int nb) {
    const int* slots = sSlots + (nb & 1) * N + ld_row0;
    int slot[kRowsPerThread];
#pragma unroll
    for (int it = 0; it < kRowsPerThread; ++it) slot[it] = slots[it * kRowStep];
    const uint32_t dst = (nb & 1) * kStageBytes + ld_dst;
#pragma unroll
    for (int it = 0; it < kRowsPerThread; ++it) {
      const int64_t offset = (int64_t)max(slot[it], 0) * kv_token_stride + ld_chunk * 8;
      const uint32_t row_dst = dst + it * kRowStep * D * 2;
      cp_async_16(sK_base + row_dst, k_cache + offset, slot[it] >= 0 ? 16 : 0);
      cp_async_16(sV_base + row_dst, v_cache + offset, slot[it] >= 0 ? 16 : 0);
    }
    cp_async_commit();
  };

  if (nb_begin < nb_end) {
    if (warp == 0) {
      PageWindow win;
      load_window(win, 0, 0, p, page_begin, n_pages, lane);
      sWindow[lane] = make_int4(win.j, win.slot0, win.begin, win.end);
      __syncwarp();
      fill_slots<N>(sWindow, nb_begin * N, n_k, sSlots + (nb_begin & 1) * N, p, page_begin, n_pages, lane);
    }
    __syncthreads();
    load_kv(nb_begin);
    if (warp == 0 && nb_begin + 1 < nb_end)
      fill_slots<N>(sWindow, (nb_begin + 1) * N, n_k, sSlots + ((nb_begin + 1) & 1) * N, p, page_begin, n_pages,
                    lane);
  }

  // Per-lane byte offsets of the ldmatrix rows (swizzle folded in; a k-step XORs the chunk bits).
  const int r7 = lane & 7;
  const uint32_t q_lane = (warp * Cfg::kWarpRows + (lane & 15)) * D * 2 + (((lane >> 4) ^ r7) << 4);
  const uint32_t k_lane = (r7 + (lane >> 4) * 8) * D * 2 + ((((lane >> 3) & 1) ^ r7) << 4);
  const uint32_t v_lane = (r7 + ((lane >> 3) & 1) * 8) * D * 2 + (((lane >> 4) ^ r7) << 4);

  for (int nb = nb_begin; nb < nb_end; ++nb) {
    const int k0 = nb * N;
    cp_async_wait_all();
    // Tile nb landed for every thread; every warp is done with tile nb-1, so its stage takes tile nb+1 now;
    // the slots of tile nb+1 (written by warp 0 during tile nb-1) are visible.
    __syncthreads();
    if (nb + 1 < nb_end) load_kv(nb + 1);
    if (warp == 0 && nb + 2 < nb_end)
      fill_slots<N>(sWindow, (nb + 2) * N, sMeta[kNk], sSlots + (nb & 1) * N, p, sMeta[kPageBegin], sMeta[kNPages],
                    lane);
    const uint32_t sK_tile = sK_base + (nb & 1) * kStageBytes, sV_tile = sV_base + (nb & 1) * kStageBytes;

    // S = Q K^T for this warp's 32 rows.
    float acc_s[kMT][kNT][4];
#pragma unroll
    for (int mi = 0; mi < kMT; ++mi)
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_s[mi][nt][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t a[kMT][4];
#pragma unroll
      for (int mi = 0; mi < kMT; ++mi)
        ldmatrix_x4(a[mi], sQ_base + mi * 16 * D * 2 + (q_lane ^ (ks << 5)));
#pragma unroll
      for (int np = 0; np < N / 16; ++np) {
        uint32_t bk[4];
        ldmatrix_x4(bk, sK_tile + np * 16 * D * 2 + (k_lane ^ (ks << 5)));
#pragma unroll
        for (int mi = 0; mi < kMT; ++mi) {
          Ops::mma(acc_s[mi][2 * np], a[mi], bk[0], bk[1]);
          Ops::mma(acc_s[mi][2 * np + 1], a[mi], bk[2], bk[3]);
        }
      }
    }

    if constexpr (kSoftcap) {
      const float cap_in = __int_as_float(sMeta[kCapIn]);  // sm_scale / softcap
#pragma unroll
      for (int mi = 0; mi < kMT; ++mi)
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc_s[mi][nt][e] = tanh_approx(acc_s[mi][nt][e] * cap_in);
    }

    // Masks only on tiles that touch the end of the keys, the causal diagonal or the window's lower edge.
    if (nb < sMeta[kFullLo] || nb >= sMeta[kFullHi]) {
      const int n_k = sMeta[kNk], qpos_base = sMeta[kQposBase];
#pragma unroll
      for (int mi = 0; mi < kMT; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          // Row's visible keys, relative to this thread's first column: [lo, hi).
          const int qp = qpos_base + (my_m + mi * 16 + h * 8) / G;
          const int col0 = k0 + (lane & 3) * 2;
          const int hi = (p.causal ? min(n_k, qp + 1) : n_k) - col0;
          const int lo = (p.window > 0 ? qp - p.window + 1 : INT32_MIN / 2) - col0;
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int c = nt * 8 + e;
              if (c < lo || c >= hi) acc_s[mi][nt][2 * h + e] = -INFINITY;
            }
        }
    }

    // Online softmax (base 2; scores scaled by sm_scale (softcap) * log2 e inside the exponent).
#pragma unroll
    for (int mi = 0; mi < kMT; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float mx = row_max[mi][h];
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) mx = fmaxf(mx, fmaxf(acc_s[mi][nt][2 * h], acc_s[mi][nt][2 * h + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float mx_scaled = mx == -INFINITY ? 0.f : mx * scale_log2;
        const float corr = fast_exp2(row_max[mi][h] * scale_log2 - mx_scaled);
        row_max[mi][h] = mx;
        float sum = row_sum[mi][h] * corr;
        // Once the running max settles, most tiles leave it unchanged: skip the O rescale when the whole warp can.
        if (__any_sync(0xffffffffu, corr != 1.f)) {
#pragma unroll
          for (int dt = 0; dt < kDT; ++dt) {
            acc_o[mi][dt][2 * h] *= corr;
            acc_o[mi][dt][2 * h + 1] *= corr;
          }
        }
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
          for (int e = 2 * h; e < 2 * h + 2; ++e) {
            const float pr = fast_exp2(fmaf(acc_s[mi][nt][e], scale_log2, -mx_scaled));
            acc_s[mi][nt][e] = pr;
            sum += pr;
          }
        row_sum[mi][h] = sum;
      }

    // O += P V: P (fp32 accumulator layout) repacks in registers as the A operand.
#pragma unroll
    for (int kk = 0; kk < N / 16; ++kk) {
      uint32_t a[kMT][4];
#pragma unroll
      for (int mi = 0; mi < kMT; ++mi) {
        a[mi][0] = Ops::pack(acc_s[mi][2 * kk][0], acc_s[mi][2 * kk][1]);
        a[mi][1] = Ops::pack(acc_s[mi][2 * kk][2], acc_s[mi][2 * kk][3]);
        a[mi][2] = Ops::pack(acc_s[mi][2 * kk + 1][0], acc_s[mi][2 * kk + 1][1]);
        a[mi][3] = Ops::pack(acc_s[mi][2 * kk + 1][2], acc_s[mi][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t bv[4];
        ldmatrix_x4_trans(bv, sV_tile + kk * 16 * D * 2 + (v_lane ^ (dp << 5)));
#pragma unroll
        for (int mi = 0; mi < kMT; ++mi) {
          Ops::mma(acc_o[mi][2 * dp], a[mi], bv[0], bv[1]);
          Ops::mma(acc_o[mi][2 * dp + 1], a[mi], bv[2], bv[3]);
        }
      }
    }
  }

  // Epilogue: normalise, stage this warp's rows in its own part of sQ, write 16-byte chunks and the LSE.
  cp_async_wait_all();
  __syncthreads();  // a CTA with no K/V tile may still have Q copies (issued by every warp) in flight
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float sum = row_sum[mi][h];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      float inv = sum > 0.f ? 1.f / sum : 0.f;
      float lse = sum > 0.f ? row_max[mi][h] * score_scale + logf(sum) : -INFINITY;
      const int row = warp * Cfg::kWarpRows + mi * 16 + h * 8 + lane / 4;
      if (p.sinks != nullptr) inv *= add_sink(lse, __ldg(p.sinks + hkv * G + (m0 + row) % G));  // (a head for any row)
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        const uint32_t packed = Ops::pack(acc_o[mi][dt][2 * h] * inv, acc_o[mi][dt][2 * h + 1] * inv);
        *reinterpret_cast<uint32_t*>(sQ + swizzle<D>(row, dt) + (lane & 3) * 2) = packed;
      }
      const int m = m0 + row;
      if ((lane & 3) == 0 && m < rows_total) {
        const int i = m / G, g = m - i * G;
        p.lse[(int64_t)(q0 + i) * p.num_q_heads + hkv * G + g] = lse;
      }
    }
  __syncwarp();
#pragma unroll
  for (int it = 0; it < Cfg::kWarpRows * kCh / 32; ++it) {
    const int idx = it * 32 + lane;
    const int row = warp * Cfg::kWarpRows + idx / kCh, chunk = idx % kCh;
    const int m = m0 + row;
    if (m < rows_total) {
      const int i = m / G, g = m - i * G;
      const uint4 v = *reinterpret_cast<const uint4*>(sQ + swizzle<D>(row, chunk));
      *reinterpret_cast<uint4*>(out + ((int64_t)(q0 + i) * p.num_q_heads + hkv * G + g) * D + chunk * 8) = v;
    }
  }
}

}  // namespace prefill
}  // namespace flashcore
