// What a CTA of either prefill kernel (mma.sync: ../prefill/, wgmma: ../prefill_sm90/) works on, and how it finds
// its keys: the (query tile, KV head, sequence) grid and the walk from key index to token slot through a sequence's
// page list. Torch-free.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "../../params.h"

namespace flashcore {
namespace prefill {

constexpr int kBlockM = 128;  // query rows (query, head) per CTA of the mma.sync kernel (the largest grid)

// Query tiles of block_m (query, head) rows for a max_q_len-long run of every sequence (the grid's first dimension);
// blocks past a sequence's real length exit at once.
inline int64_t query_tiles(const PagedAttentionParams& p, int block_m = kBlockM) {
  const int64_t group = p.num_q_heads / p.num_kv_heads;
  return ((int64_t)p.max_q_len * group + block_m - 1) / block_m;
}

// What one CTA of either prefill kernel works on. Grid (query tile, KV head, sequence), launched in that order (tile
// fastest): one KV head of one sequence at a time, so the CTAs resident at once read the same K/V and share it in L2.
// Ordered by KV head first (the earlier order), the resident CTAs streamed every KV head's K/V at once, more than L2
// holds past ~16K keys: a 32K prompt read 4.6 GB from DRAM per call (ncu) where its K/V is 128 MB, and a model of
// the grid through a 50 MB LRU (notes/l2_grid_model.py) puts a 128K prompt at ~62 GB against ~4-7 GB in this order.
// Across sequences the order stays sequence by sequence (a tile-major order over many sequences streams every
// sequence's K/V from DRAM once per query tile). Tiles reversed, so each head's last tile -- the heaviest under a
// causal mask -- comes first (longest first keeps the tail of the grid short). Layout indices are clamped into range.
struct TileWork {
  int hkv, b, tile, G;
  int q0, n_q, rows_total, m0;  // the sequence's queries [q0, q0 + n_q); tile rows [m0, m0 + M) of n_q * G
  int page_begin, n_pages;      // its layout entries
};

__device__ __forceinline__ TileWork tile_work(const PagedAttentionParams& p, int M) {
  TileWork w;
  w.tile = gridDim.x - 1 - blockIdx.x;
  w.hkv = blockIdx.y;
  w.b = blockIdx.z;
  w.G = p.num_q_heads / p.num_kv_heads;
  w.q0 = min(max(p.q_indptr[w.b], 0), p.total_q);
  w.n_q = min(max(p.q_indptr[w.b + 1], w.q0), p.total_q) - w.q0;
  w.rows_total = w.n_q * w.G;
  w.m0 = w.tile * M;
  w.page_begin = min(max(p.row_offsets[w.b], 0), p.nnz);
  w.n_pages = min(max(p.row_offsets[w.b + 1], w.page_begin), p.nnz) - w.page_begin;
  return w;
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

}  // namespace prefill
}  // namespace flashcore
