// Hopper (sm_90a) paged prefill attention, head dims 64 and 128: warp-specialized, wgmma, same semantics as the
// mma.sync kernel in ../prefill/prefill_kernel.cuh (packed (query, head-in-group) rows, any page list, causal /
// window, LSE always written, no host sync).
//
// One CTA = a producer warpgroup and kConsumers (2 at head dim 128, 3 at 64: Layout) consumer warpgroups over a tile
// of 64 * kConsumers (query, head) rows of one KV head of one sequence:
//   warpgroup 0, producer (registers lowered with setmaxnreg) fills a ring of kStages K and V stages, each signalled
//     by a "full" mbarrier and recycled through an "empty" mbarrier that the consumers arrive on. A tile whose 128
//     keys all lie on full pages is copied by TMA (boxes of one page's rows through a tensor map over the pool, see
//     kv_tensor_maps.h); any other tile is gathered key by key with 16-byte cp.async (cp.async.mbarrier.arrive.noinc)
//     through the token slots warp 0 resolves with the page walk of common/page_walk.cuh.
//   consumer warpgroups (registers raised): 64 rows each. S = Q K^T is wgmma m64n128k16 with Q and K in shared
//     memory; the online softmax runs in fp32 registers (a row's running max is kept until it grows by 2^8,
//     common/online_softmax.cuh, so O is rarely rescaled); O += P V is wgmma with P from registers (bf16/fp16) and
//     V read transposed (MN-major) from shared memory.
//   Schedule: S_{j+1} is issued together with P_j V_j; the consumer warpgroups take turns issuing their GEMMs
//   (named barriers, round robin), so one warpgroup's softmax overlaps the others' GEMMs. Within a warpgroup, ptxas
//   places the wait for P_j V_j ahead of the softmax of j+1 (SASS), so those two run one after the other: forcing
//   the overlap (the K release made to depend on the row sums) measured no faster at head dim 128 and 4-5% slower
//   at 64 (benchmarks/notes/prefill.md), so it is left to ptxas. The CTA loads the key tiles of all its rows; each
//   consumer warpgroup computes (and masks) only those its own rows see, and lets the others go by in turn.
// Shared tiles use the 128-byte swizzle that wgmma descriptors and TMA share: a [rows][128] tile is two [rows][64]
// halves, each made of 8-row x 128-byte atoms in which 16-byte chunk c of row r sits at position c ^ (r & 7).
// Softcap (kSoftcap instantiation): the softmax first turns S into tanh(S * sm_scale / softcap) (before the mask)
// and uses the scale softcap instead of sm_scale. Sinks join each row once, in the epilogue.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "../../params.h"
#include "../common/fast_divmod.cuh"
#include "../common/mma_sm80.cuh"
#include "../common/online_softmax.cuh"
#include "../common/page_walk.cuh"
#include "../common/ptx.cuh"
#include "../common/sm90_ptx.cuh"
#include "../common/softcap_sinks.cuh"
#include "kv_tensor_maps.h"

namespace flashcore {
namespace prefill_sm90 {

constexpr int kBlockN = 128;  // keys per K/V tile
// K/V stages in the ring. Measured at head dim 128: 2 stages run as fast; 3 leave the producer more slack.
constexpr int kStages = 3;
constexpr uint32_t kHalfBytes = kBlockN * 128;  // one [128 keys][64 dims] half of a K or V tile (16 KB)

// Shape of the kernel at head dim 64 or 128 and its dynamic shared memory (byte offsets from a 1024-byte aligned
// base). Head dim 128: 2 consumer warpgroups over 128 rows (64 each), registers 56 / 224 (128 * 56 + 256 * 224 =
// 64512 <= 65536). Head dim 64: the exps of a 128-key tile take as long as its two GEMMs, so a third consumer
// warpgroup (192 rows) keeps the tensor cores fed while two others are in their softmax (FA3's shape for head dim
// 64); registers 32 / 160 (128 * 32 + 384 * 160 = 65536).
template <int kHeadDim>
struct Layout {
  static_assert(kHeadDim == 64 || kHeadDim == 128, "head dim 64 or 128");
  static constexpr int kConsumers = kHeadDim == 64 ? 3 : 2;  // consumer warpgroups, 64 rows each
  static constexpr int kBlockM = 64 * kConsumers;            // (query, head) rows per CTA
  static constexpr int kThreads = 128 * (1 + kConsumers);
  static constexpr int kProducerRegs = kConsumers == 2 ? 56 : 32;
  static constexpr int kConsumerRegs = kConsumers == 2 ? 224 : 160;
  static_assert(128 * kProducerRegs + 128 * kConsumers * kConsumerRegs <= 65536, "register file");
  static constexpr int kHalves = kHeadDim / 64;        // 64-dim halves per row
  static constexpr int kChunks = kHeadDim / 8;         // 16-byte chunks per row
  static constexpr uint32_t kQHalfBytes = kBlockM * 128;           // one [kBlockM rows][64 dims] half of Q
  static constexpr uint32_t kTileBytes = kHalves * kHalfBytes;     // a K or V tile
  static constexpr uint32_t kOffQ = 0;
  static constexpr uint32_t kOffK = kOffQ + kHalves * kQHalfBytes;
  static constexpr uint32_t kOffV = kOffK + kStages * kTileBytes;
  static constexpr uint32_t kOffSlots = kOffV + kStages * kTileBytes;  // int [2][kBlockN]
  static constexpr uint32_t kOffWindow = kOffSlots + 2 * kBlockN * 4;  // int4 [32]
  static constexpr uint32_t kOffReduce = kOffWindow + 32 * 16;         // int [2][warps]
  static constexpr uint32_t kSmemBytes = kOffReduce + 2 * 4 * kThreads / 32 + 1024;  // + slack to align the base
  static_assert(kOffK % 1024 == 0 && kSmemBytes + 4 * kStages * 8 <= 227 * 1024, "shared memory per block");
};

// Byte offset of 16-byte chunk `chunk` (0..15) of row `row` in a swizzled [rows][64 or 128] tile of `rows` rows.
__device__ __forceinline__ uint32_t tile_offset(int row, int chunk, uint32_t half_bytes) {
  return (chunk >> 3) * half_bytes + row * 128 + (swizzled_chunk(row, chunk & 7) << 4);
}

// Named barrier ids (0 is __syncthreads): the producer warpgroup's, one per consumer warpgroup, one turn per consumer
// warpgroup.
enum : int { kBarProducer = 1, kBarConsumer0 = 2, kBarTurn0 = 5 };

template <typename T, bool kSoftcap, int kHeadDim>
__global__ void __launch_bounds__(Layout<kHeadDim>::kThreads, 1)
    prefill_sm90_kernel(const PagedAttentionParams p, const __grid_constant__ KvTensorMaps maps,
                        const FastDivmod group) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;
  using L = Layout<kHeadDim>;
  constexpr int D = kHeadDim, M = L::kBlockM, N = kBlockN, kThreads = L::kThreads, kConsumers = L::kConsumers;
  constexpr uint32_t kTileBytes = L::kTileBytes, kOffQ = L::kOffQ, kOffK = L::kOffK, kOffV = L::kOffV;
  constexpr int kChunks = L::kChunks, kRowsPerPass = 128 / kChunks;  // rows one pass of the 128 producer threads copies
  // mbarriers full_k, full_v, empty_k, empty_v [kStages] each: K and V stages are filled and recycled separately
  // (K as soon as S = Q K^T is done, V after P V), which lets the producer run further ahead. Static shared memory
  // also tells the host that this body was built (an sm_90a build); see common/sm90a_body.cuh.
  __shared__ __align__(8) uint64_t bars[4 * kStages];
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw_addr = smem_addr(smem_raw);
  const uint32_t base = (raw_addr + 1023) & ~1023u;
  unsigned char* smem = smem_raw + (base - raw_addr);
  int* sSlots = reinterpret_cast<int*>(smem + L::kOffSlots);
  int4* sWindow = reinterpret_cast<int4*>(smem + L::kOffWindow);
  int* sReduce = reinterpret_cast<int*>(smem + L::kOffReduce);
  const uint32_t bar_full_k = smem_addr(&bars[0]);
  const uint32_t bar_full_v = bar_full_k + 8 * kStages;
  const uint32_t bar_empty_k = bar_full_v + 8 * kStages;
  const uint32_t bar_empty_v = bar_empty_k + 8 * kStages;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const prefill::TileWork work = prefill::tile_work(p, M);
  if (work.m0 >= work.rows_total) return;
  const int hkv = work.hkv, G = work.G;
  const int q0 = work.q0, n_q = work.n_q, rows_total = work.rows_total, m0 = work.m0;
  const int page_begin = work.page_begin, n_pages = work.n_pages;

  // Consumers issue their Q rows' loads first (they need no key count), so that the loads overlap the page scan.
  if (warp >= 4) {
    const T* q = static_cast<const T*>(p.q);
    const int qwg = warp / 4 - 1, qtid = tid - 128 * (qwg + 1);
#pragma unroll
    for (int it = 0; it < 64 * kChunks / 128; ++it) {
      const int idx = it * 128 + qtid;
      const int row = qwg * 64 + idx / kChunks, chunk = idx % kChunks;
      const int m = m0 + row;
      const bool valid = m < rows_total;
      const int i = valid ? group.div(m) : 0, g = valid ? m - i * G : 0;
      const T* src = q + (int64_t)(q0 + i) * p.q_stride_token + (int64_t)(hkv * G + g) * p.q_stride_head + chunk * 8;
      cp_async_16(base + kOffQ + tile_offset(row, chunk, L::kQHalfBytes), valid ? src : q, valid ? 16 : 0);
    }
    cp_async_commit();
  }

  // n_k = keys of this sequence (invalid pages count as empty); whether every page but the last is full (then key k
  // sits at row k % page_size of page entry k / page_size, which TMA boxes can load).
  int part = 0, partial_pages = 0;
  for (int j = tid; j < n_pages; j += kThreads) {
    int page;
    const int count = prefill::checked_count(p, page_begin + j, &page);
    part += count;
    partial_pages += (count != p.page_size && j + 1 < n_pages) ? 1 : 0;
  }
#pragma unroll
  for (int s = 16; s >= 1; s >>= 1) {
    part += __shfl_xor_sync(0xffffffffu, part, s);
    partial_pages += __shfl_xor_sync(0xffffffffu, partial_pages, s);
  }
  if (lane == 0) {
    sReduce[warp] = part;
    sReduce[kThreads / 32 + warp] = partial_pages;
  }
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(bar_full_k + 8 * s, 128);  // one cp.async-tracking arrival per producer thread
      mbar_init(bar_full_v + 8 * s, 128);
      mbar_init(bar_empty_k + 8 * s, 4 * kConsumers);  // one arrival per consumer warp
      mbar_init(bar_empty_v + 8 * s, 4 * kConsumers);
    }
  }
  __syncthreads();
  int n_k = 0, n_partial = 0;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) {
    n_k += sReduce[w];
    n_partial += sReduce[kThreads / 32 + w];
  }

  const int qpos_base = n_k - n_q;
  const int qpos_lo = qpos_base + group.div(m0);
  const int qpos_hi = qpos_base + group.div(min(rows_total, m0 + M) - 1);
  int k_hi = n_k, k_lo = 0;
  if (p.causal) k_hi = min(k_hi, qpos_hi + 1);
  if (p.window > 0) k_lo = max(0, qpos_lo - p.window + 1);
  const int nb_begin = k_lo / N;
  const int nb_end = k_hi > k_lo ? (k_hi + N - 1) / N : nb_begin;
  const int n_tiles = nb_end - nb_begin;

  if (warp < 4) {
    // ---------------- producer ----------------
    regs_dealloc<L::kProducerRegs>();
    if (n_tiles == 0) return;
    const int64_t kv_token_stride = (int64_t)p.num_kv_heads * D;
    const T* k_cache = static_cast<const T*>(p.k_cache) + (int64_t)hkv * D;
    const T* v_cache = static_cast<const T*>(p.v_cache) + (int64_t)hkv * D;
    // Tiles whose 128 keys all lie on full pages are loaded by TMA: box b (box_rows keys of one page, both 64-dim
    // halves) is copied by lane b / 4 of producer warp b % 4, so small pages' boxes are issued by four warps at once
    // (a warp issues its lanes' copies one after another: 16-row boxes from one warp ran ~15% slower than 32-row
    // ones); thread 0 sets the transaction bytes the full barrier waits for (a copy may land first: the count may
    // go below zero until then, and thread 0's arrival keeps the phase open), every other producer thread just
    // arrives. Other tiles (a partial page, the sequence's end, irregular layouts, page sizes without maps) are
    // gathered key by key with cp.async through the token slots warp 0 resolves.
    const bool tma_pages = maps.box_rows > 0 && n_partial == 0;
    auto tma_tile = [&](int nb) { return tma_pages && (nb + 1) * N <= n_k; };
    const int boxes = tma_pages ? N / maps.box_rows : 0;
    const int my_box = 4 * lane + warp;
    const bool copies_box = my_box < boxes;
    if (warp == 0) {
      prefill::PageWindow win;
      prefill::load_window(win, 0, 0, p, page_begin, n_pages, lane);
      sWindow[lane] = make_int4(win.j, win.slot0, win.begin, win.end);
      __syncwarp();
      if (!tma_tile(nb_begin))
        prefill::fill_slots<N>(sWindow, nb_begin * N, n_k, sSlots, p, page_begin, n_pages, lane);
    }
    // Thread t copies chunk t % kChunks of rows t / kChunks + kRowsPerPass i: all its rows share (row & 7), so the
    // swizzled destinations differ by multiples of kRowsPerPass * 128 bytes.
    const int chunk = tid % kChunks, row0 = tid / kChunks;
    const uint32_t dst0 = tile_offset(row0, chunk, kHalfBytes);
    // This thread's box of a TMA tile: page entry and first row of keys [nb * N + my_box * box_rows, + box_rows).
    auto box_coords = [&](int nb, int& page, int& row) {
      const int key = nb * N + my_box * maps.box_rows;
      page = p.cols[page_begin + key / p.page_size];
      row = key % p.page_size;
    };
    auto tma_copy = [&](const CUtensorMap* map, uint32_t dst, uint32_t bar, int page, int row) {
      if (tid == 0) mbar_arrive_expect_tx(bar, kTileBytes);
      if (copies_box) {
        const uint32_t box_dst = dst + my_box * maps.box_rows * 128;
#pragma unroll
        for (int half = 0; half < L::kHalves; ++half)
          tma_load_4d(box_dst + half * kHalfBytes, map, bar, 64 * half, hkv, row, page);
      }
    };
    for (int t = 0; t < n_tiles; ++t) {
      const int nb = nb_begin + t, stage = t % kStages;
      const bool tma = tma_tile(nb);
      named_bar_sync(kBarProducer, 128);  // slots of tile t written by warp 0
      const uint32_t k_tile = base + kOffK + stage * kTileBytes, v_tile = base + kOffV + stage * kTileBytes;
      const uint32_t full_k = bar_full_k + 8 * stage, full_v = bar_full_v + 8 * stage;
      int page = 0, row = 0;
      if (tma && copies_box) box_coords(nb, page, row);
      mbar_wait(bar_empty_k + 8 * stage, ((t / kStages) & 1) ^ 1);
      const int* slots = sSlots + (t & 1) * N + row0;
      if (tma) {
        tma_copy(&maps.k, k_tile, full_k, page, row);
        if (tid != 0) mbar_arrive(full_k);
      } else {
#pragma unroll 4
        for (int i = 0; i < N / kRowsPerPass; ++i) {
          const int slot = slots[kRowsPerPass * i];
          cp_async_16(k_tile + dst0 + i * kRowsPerPass * 128,
                               k_cache + (int64_t)max(slot, 0) * kv_token_stride + chunk * 8, slot >= 0 ? 16 : 0);
        }
        mbar_arrive_on_cp_async(full_k);
      }
      mbar_wait(bar_empty_v + 8 * stage, ((t / kStages) & 1) ^ 1);
      if (tma) {
        tma_copy(&maps.v, v_tile, full_v, page, row);
        if (tid != 0) mbar_arrive(full_v);
      } else {
#pragma unroll 4
        for (int i = 0; i < N / kRowsPerPass; ++i) {
          const int slot = slots[kRowsPerPass * i];
          cp_async_16(v_tile + dst0 + i * kRowsPerPass * 128,
                               v_cache + (int64_t)max(slot, 0) * kv_token_stride + chunk * 8, slot >= 0 ? 16 : 0);
        }
        mbar_arrive_on_cp_async(full_v);
      }
      if (warp == 0 && t + 1 < n_tiles && !tma_tile(nb + 1))
        prefill::fill_slots<N>(sWindow, (nb + 1) * N, n_k, sSlots + ((t + 1) & 1) * N, p, page_begin, n_pages,
                               lane);
    }
    cp_async_wait<0>();
    return;
  }

  // ---------------- consumers ----------------
  regs_alloc<L::kConsumerRegs>();
  using Ops = MmaOps<T>;
  // Consumer warpgroup 0 / 1: tile rows [64 wg, 64 wg + 64). Read through a shuffle so ptxas sees it warp-uniform
  // and keeps the wgmma descriptors built from it in uniform registers.
  const int wg = __shfl_sync(0xffffffffu, warp / 4 - 1, 0);
  const int wtid = tid - 128 * (wg + 1);
  const int wwarp = wtid >> 5;

  // Q rows of this warpgroup (loads issued before the page scan) landed and visible to wgmma.
  cp_async_wait<0>();
  fence_proxy_async();
  named_bar_sync(kBarConsumer0 + wg, 128);

  // This thread's two rows (h = 0, 1): tile row wg*64 + wwarp*16 + lane/4 + 8h.
  const int my_row = wg * 64 + wwarp * 16 + (lane >> 2);
  // The running max is of S as computed (raw q.k, or tanh(q.k * sm_scale / softcap) with softcap), whose scale is
  // sm_scale (softcap).
  const float score_scale = kSoftcap ? p.softcap : p.sm_scale;
  const float scale_log2 = score_scale * kLog2e;
  const float cap_in = kSoftcap ? __fdiv_rn(p.sm_scale, p.softcap) : 0.f;  // softcap: tanh argument per raw score

  // This warpgroup's own key tiles [nb_begin + t_first, nb_begin + t_end): the CTA loads the tiles of all its rows,
  // but causal rows low in the tile end earlier, window rows high in it start later, and rows past the sequence see
  // nothing. Only tiles outside [nb_full_lo, nb_full_hi) need a mask for some of this warpgroup's rows.
  const int wg_m_lo = m0 + wg * 64, wg_m_hi = min(rows_total, wg_m_lo + 64) - 1;
  const int wg_qpos_lo = qpos_base + group.div(wg_m_lo), wg_qpos_hi = qpos_base + group.div(wg_m_hi);
  const int wg_k_hi = p.causal ? min(n_k, wg_qpos_hi + 1) : n_k;
  const int wg_k_lo = p.window > 0 ? max(0, wg_qpos_lo - p.window + 1) : 0;
  const bool wg_sees_keys = wg_m_lo <= wg_m_hi && wg_k_lo < wg_k_hi;
  const int t_first = wg_sees_keys ? wg_k_lo / N - nb_begin : 0;
  const int t_end = wg_sees_keys ? (wg_k_hi + N - 1) / N - nb_begin : 0;
  const int nb_full_hi = min(n_k / N, p.causal ? max(wg_qpos_lo + 1, 0) / N : n_k / N);
  const int nb_full_lo = p.window > 0 ? (max(wg_qpos_hi - p.window + 1, 0) + N - 1) / N : 0;
  // This thread's rows' key limits [key_lo, key_hi), relative to its first column in a tile (add the tile's start).
  int key_lo[2], key_hi[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int qp = qpos_base + group.div(m0 + my_row + 8 * h);
    const int col0 = (lane & 3) * 2;
    key_hi[h] = (p.causal ? min(n_k, qp + 1) : n_k) - col0;
    key_lo[h] = (p.window > 0 ? qp - p.window + 1 : 0) - col0;
  }

  float acc_o[D / 2], acc_s[64];
  uint32_t pa[8][4];
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
#pragma unroll
  for (int i = 0; i < D / 2; ++i) acc_o[i] = 0.f;

  // Descriptors: Q / K K-major (LBO unused), V MN-major (LBO = the next 64 d-columns, SBO = the next 8 keys).
  const uint32_t q_base = base + kOffQ + wg * 64 * 128;
  // Descriptors built once: every shared address is below 2^18 bytes, so (addr & 0x3FFFF) >> 4 is addr >> 4 and adding
  // (offset >> 4) to the start-address field never carries out of it.
  const uint64_t q_desc = make_desc(q_base, 16, 1024);
  const uint64_t k_desc = make_desc(base + kOffK, 16, 1024);
  const uint64_t v_desc = make_desc(base + kOffV, kHalfBytes, 1024);
  auto issue_s = [&](int stage) {
    const uint64_t kd = k_desc + ((stage * kTileBytes) >> 4);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {  // 16 dims per step: 32 bytes into a 64-dim half
      const uint32_t q_off = (ks >> 2) * L::kQHalfBytes + (ks & 3) * 32, k_off = (ks >> 2) * kHalfBytes + (ks & 3) * 32;
      wgmma_ss<kBf16>(acc_s, q_desc + (q_off >> 4), kd + (k_off >> 4), ks > 0);
    }
    wgmma_commit();
  };
  auto issue_pv = [&](int stage) {
    const uint64_t vd = v_desc + ((stage * kTileBytes) >> 4);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < N / 16; ++kk) wgmma_rs<kBf16>(acc_o, pa[kk], vd + ((kk * 2048) >> 4), 1);
    wgmma_commit();
  };
  auto release = [&](uint32_t bar, int t) {
    __syncwarp();
    if (lane == 0) mbar_arrive(bar + 8 * (t % kStages));
  };
  // The mbarrier completes only once the cp.async data has landed; wgmma then reads it with no proxy fence (as
  // CUTLASS's cp.async + wgmma pipelines do; an added fence.proxy.async per wait measured no different).
  auto wait_full = [&](uint32_t bar, int t) { mbar_wait(bar + 8 * (t % kStages), (t / kStages) & 1); };
  // Softcap, mask (boundary tiles only), online softmax of acc_s in place (probabilities, fp32); returns the O
  // correction.
  auto softmax = [&](int nb, float (&corr)[2]) {
    if constexpr (kSoftcap) {
#pragma unroll
      for (int i = 0; i < 64; ++i) acc_s[i] = tanh_approx(acc_s[i] * cap_in);
    }
    // Boundary tiles only. Without a window (the common case) one compare and select per element; ptxas merges
    // separately guarded bounds into this two-sided form, so the one-sided one is its own branch.
    if (nb < nb_full_lo || nb >= nb_full_hi) {
      const int k0 = nb * N;
      if (p.window > 0) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int lo = key_lo[h] - k0, hi = key_hi[h] - k0;
#pragma unroll
          for (int j = 0; j < N / 8; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e)
              if (j * 8 + e < lo || j * 8 + e >= hi) acc_s[j * 4 + 2 * h + e] = -INFINITY;
        }
      } else {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int hi = key_hi[h] - k0;
#pragma unroll
          for (int j = 0; j < N / 8; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e)
              if (j * 8 + e >= hi) acc_s[j * 4 + 2 * h + e] = -INFINITY;
        }
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = row_max[h];
#pragma unroll
      for (int j = 0; j < N / 8; ++j) mx = fmaxf(mx, fmaxf(acc_s[j * 4 + 2 * h], acc_s[j * 4 + 2 * h + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      float mx_scaled;  // kept unless the max grew by more than 2^8 (then corr < 1 rescales the row)
      corr[h] = advance_running_max(row_max[h], mx, scale_log2, mx_scaled);
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < N / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float pr = fast_exp2(fmaf(acc_s[j * 4 + 2 * h + e], scale_log2, -mx_scaled));
          acc_s[j * 4 + 2 * h + e] = pr;
          sum += pr;
        }
      row_sum[h] = row_sum[h] * corr[h] + sum;
    }
  };
  auto rescale_o = [&](const float (&corr)[2]) {
    if (__any_sync(0xffffffffu, corr[0] != 1.f || corr[1] != 1.f)) {
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        acc_o[j * 4 + 0] *= corr[0];
        acc_o[j * 4 + 1] *= corr[0];
        acc_o[j * 4 + 2] *= corr[1];
        acc_o[j * 4 + 3] *= corr[1];
      }
    }
  };
  // P (accumulator layout of S) -> A fragments of P V: k-step kk covers S columns [16 kk, 16 kk + 16).
  auto convert_p = [&]() {
#pragma unroll
    for (int kk = 0; kk < N / 16; ++kk) {
      pa[kk][0] = Ops::pack(acc_s[8 * kk + 0], acc_s[8 * kk + 1]);
      pa[kk][1] = Ops::pack(acc_s[8 * kk + 2], acc_s[8 * kk + 3]);
      pa[kk][2] = Ops::pack(acc_s[8 * kk + 4], acc_s[8 * kk + 5]);
      pa[kk][3] = Ops::pack(acc_s[8 * kk + 6], acc_s[8 * kk + 7]);
    }
  };

  if (n_tiles > 0) {
    // Turn-taking: warpgroup wg waits on barrier kBarTurn0 + wg before issuing its GEMMs and then opens the next
    // one's (round robin). Every warpgroup runs n_tiles + 1 GEMM phases, whatever its own range: a tile outside it
    // still takes its turn (so the round robin stays in step) and releases its K and V stages once they have landed
    // (so the arrival counts toward that use of the stage, never the next). The last warpgroup opens the first one's
    // turn at the start and skips its own last opening, so every barrier ends balanced.
    const int phases = n_tiles + 1;
    int phase = 0;
    auto turn_begin = [&]() { named_bar_sync(kBarTurn0 + wg, 256); };
    auto turn_end = [&]() {
      if (!(wg == kConsumers - 1 && phase == phases - 1)) named_bar_arrive(kBarTurn0 + (wg + 1) % kConsumers, 256);
      ++phase;
    };
    auto pass_tile = [&](int t) {
      turn_begin();
      turn_end();
      wait_full(bar_full_k, t);
      release(bar_empty_k, t);
      wait_full(bar_full_v, t);
      release(bar_empty_v, t);
    };
    if (wg == kConsumers - 1) named_bar_arrive(kBarTurn0, 256);
    for (int t = 0; t < t_first; ++t) pass_tile(t);
    if (t_first < t_end) {
      float corr[2];
      wait_full(bar_full_k, t_first);
      turn_begin();
      issue_s(t_first % kStages);
      turn_end();
      wgmma_wait<0>();
      fence_regs(acc_s);
      release(bar_empty_k, t_first);
      softmax(nb_begin + t_first, corr);
      convert_p();
      for (int t = t_first + 1; t < t_end; ++t) {
        wait_full(bar_full_k, t);
        turn_begin();
        issue_s(t % kStages);
        wait_full(bar_full_v, t - 1);
        issue_pv((t - 1) % kStages);
        turn_end();
        wgmma_wait<1>();
        fence_regs(acc_s);
        release(bar_empty_k, t);
        softmax(nb_begin + t, corr);
        wgmma_wait<0>();
        fence_regs(acc_o);
        fence_regs(pa);
        release(bar_empty_v, t - 1);
        rescale_o(corr);
        convert_p();
      }
      turn_begin();
      wait_full(bar_full_v, t_end - 1);
      issue_pv((t_end - 1) % kStages);
      turn_end();
      wgmma_wait<0>();
      fence_regs(acc_o);
      release(bar_empty_v, t_end - 1);
    } else {
      turn_begin();
      turn_end();
    }
    for (int t = t_end; t < n_tiles; ++t) pass_tile(t);
  }

  // Epilogue: normalise, stage this warpgroup's 64 rows in its own rows of the Q tile (no wgmma reads them any
  // more), then 16-byte stores and the LSE.
  T* out = static_cast<T*>(p.out);
  unsigned char* sQ = smem + kOffQ;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float sum = row_sum[h];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    float inv = sum > 0.f ? 1.f / sum : 0.f;
    float lse = sum > 0.f ? row_max[h] * score_scale + logf(sum) : -INFINITY;
    const int row = my_row + 8 * h;
    if (p.sinks != nullptr) {  // (a head for any row)
      const int m = m0 + row;
      inv *= add_sink(lse, __ldg(p.sinks + hkv * G + m - group.div(m) * G));
    }
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      const uint32_t packed = Ops::pack(acc_o[j * 4 + 2 * h] * inv, acc_o[j * 4 + 2 * h + 1] * inv);
      *reinterpret_cast<uint32_t*>(sQ + tile_offset(row, j, L::kQHalfBytes) + (lane & 3) * 4) = packed;
    }
    const int m = m0 + row;
    if ((lane & 3) == 0 && m < rows_total) {
      const int i = group.div(m), g = m - i * G;
      p.lse[(int64_t)(q0 + i) * p.num_q_heads + hkv * G + g] = lse;
    }
  }
  named_bar_sync(kBarConsumer0 + wg, 128);
#pragma unroll
  for (int it = 0; it < 64 * kChunks / 128; ++it) {
    const int idx = it * 128 + wtid;
    const int row = wg * 64 + idx / kChunks, chunk = idx % kChunks;
    const int m = m0 + row;
    if (m < rows_total) {
      const int i = group.div(m), g = m - i * G;
      const uint4 v = *reinterpret_cast<const uint4*>(sQ + tile_offset(row, chunk, L::kQHalfBytes));
      *reinterpret_cast<uint4*>(out + ((int64_t)(q0 + i) * p.num_q_heads + hkv * G + g) * D + chunk * 8) = v;
    }
  }
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

}  // namespace prefill_sm90
}  // namespace flashcore
