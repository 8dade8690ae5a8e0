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
#include "../common/mma_sm80.cuh"
#include "../common/page_walk.cuh"
#include "../common/ptx.cuh"
#include "../common/softcap_sinks.cuh"

namespace flashcore {
namespace prefill {

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

// Element offset of 16-byte chunk `chunk` of row `row` in a swizzled [rows][kHeadDim] shared tile.
template <int kHeadDim>
__device__ __forceinline__ int swizzle(int row, int chunk) {
  return row * kHeadDim + (swizzled_chunk(row, chunk) << 3);
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
  const float scale_log2 = score_scale * kLog2e;
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
    cp_async_wait<0>();
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
        const float mx_scaled = mx == -INFINITY ? 0.f : __fmul_rn(mx, scale_log2);
        // The old max's product rounded like mx_scaled's (no FFMA contraction): an unchanged max gives exactly 1,
        // which the rescale skip below needs.
        const float corr = fast_exp2(__fmul_rn(row_max[mi][h], scale_log2) - mx_scaled);
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
  cp_async_wait<0>();
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
