// Split-KV paged decode kernel (tensor cores, mma.sync m16n8k16), split merge included.
// Included only by the per-dtype instantiation files decode_bf16.cu / decode_fp16.cu (and their softcap variants).
//
// Data path per block: a ring of STAGES K/V tiles (tile_keys(D) key slots each) filled with 16-byte cp.async from
// the paged cache, XOR-swizzled so ldmatrix reads are bank-conflict free; the page ids for tile t + STAGES are
// fetched into registers while tile t is being computed, and turned into a shared row table (cache offset + key
// position of every slot) afterwards, so the page-table latency never sits in front of a K/V load.
// Compute per warp: 16 query rows (its m-tile) x the warp's share of the tile's keys; S = Q K^T and O += P V on
// tensor cores, online softmax in fp32 in registers. Warps that share rows but saw different keys are merged
// through shared memory at the end. Blocks of different key splits write fp32 partials; the last of them to finish
// (a counter per (sequence, kv head, row chunk), kept in a plan's zeroed workspace) merges them into the output, so
// no second kernel waits on this one; with fresh scratch (no counters) merge_splits_kernel runs behind it.
// Softcap (kSoftcap instantiations) changes only the score scaling; the sink of a row joins once: in the output of a
// row that one block computes alone, else in the merge (partials stay sink-free).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/mma_sm80.cuh"
#include "../common/pdl.cuh"
#include "../common/ptx.cuh"
#include "../common/softcap_sinks.cuh"
#include "decode_common.cuh"

namespace flashcore::decode {

// ---- split merge -----------------------------------------------------------------------------------------------

// Row r of sequence sb, kv head kvh from the partials of its `active` (>= 2) splits, by one warp (lanes over the
// head dim): out = sum_s exp(lse_s - lse) * out_s, lse = log sum_s exp(lse_s); lse_s == -inf means "saw no key".
// The head's sink logit, if any, joins as one more term with lse_s = sink and out_s = 0 (the partials have none), so
// a row that no split saw gets zeros and lse = sink. Partials are read through L2 (ld.global.cg): in the decode
// kernel, other blocks wrote them during the same launch.
template <typename T, int D>
__device__ __forceinline__ void merge_split_row(const DecodeArgs& a, const SeqBounds& sb, const int kvh, const int r,
                                                const int active) {
  constexpr int V = D / 32;  // floats per lane
  static_assert(V == 2 || V == 4, "head dim");
  const PagedAttentionParams& p = a.p;
  const int lane = threadIdx.x & 31;
  const int64_t split_stride = (int64_t)p.total_q * p.num_q_heads;
  const int hq = kvh * a.group + r % a.group;
  const int64_t row = (int64_t)(sb.q0 + r / a.group) * p.num_q_heads + hq;
  float lse_max = -INFINITY;
  for (int s = lane; s < active; s += 32) lse_max = fmaxf(lse_max, __ldcg(a.part_lse + s * split_stride + row));
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) lse_max = fmaxf(lse_max, __shfl_xor_sync(0xffffffffu, lse_max, off));
  const float sink = p.sinks != nullptr ? __ldg(p.sinks + hq) : -INFINITY;
  lse_max = fmaxf(lse_max, sink);

  float acc[V];
#pragma unroll
  for (int e = 0; e < V; ++e) acc[e] = 0.f;
  float w_sum = 0.f;
  if (lse_max != -INFINITY) {
    // Every active split wrote finite partials for every row of the sequence (zeros where it saw no key, with
    // lse -inf, whose weight is exactly 0), so the loads are unconditional and can all be in flight at once.
#pragma unroll 16
    for (int s = 0; s < active; ++s) {
      const float w = fast_exp2((__ldcg(a.part_lse + s * split_stride + row) - lse_max) * kLog2e);
      const float* src = a.part_out + (s * split_stride + row) * D + lane * V;
      w_sum += w;
      if constexpr (V == 4) {
        const float4 x = __ldcg(reinterpret_cast<const float4*>(src));
        acc[0] += w * x.x; acc[1] += w * x.y; acc[2] += w * x.z; acc[3] += w * x.w;
      } else {
        const float2 x = __ldcg(reinterpret_cast<const float2*>(src));
        acc[0] += w * x.x; acc[1] += w * x.y;
      }
    }
    // The sink's weight (no value); exactly 1 when it is the largest term (e.g. a row that no split saw).
    if (p.sinks != nullptr) w_sum += fast_exp2((sink - lse_max) * kLog2e);
  }
  const float inv = w_sum > 0.f ? 1.f / w_sum : 0.f;
  T* out = static_cast<T*>(p.out) + row * D + lane * V;
  if constexpr (V == 4) {
    uint2 v;
    v.x = MmaOps<T>::pack(acc[0] * inv, acc[1] * inv);
    v.y = MmaOps<T>::pack(acc[2] * inv, acc[3] * inv);
    *reinterpret_cast<uint2*>(out) = v;
  } else {
    *reinterpret_cast<uint32_t*>(out) = MmaOps<T>::pack(acc[0] * inv, acc[1] * inv);
  }
  if (lane == 0) p.lse[row] = w_sum > 0.f ? lse_max + __logf(w_sum) : -INFINITY;
}

// ---- main kernel -----------------------------------------------------------------------------------------------

// One row chunk (query rows [chunk * ROWS, (chunk + 1) * ROWS) of a group) of sequence b, kv head kvh, split `split`:
// stream the split's K/V tiles through shared memory and write the chunk's rows (or their split partials).
template <typename T, int D, int WARPS_M, int STAGES, bool kSoftcap>
__device__ __forceinline__ void decode_row_chunk(const DecodeArgs& a, const int b, const int kvh, const int split,
                                                 const int chunk, const SeqBounds& sb) {
  constexpr int N = tile_keys(D);           // key slots per tile
  constexpr int WARPS_N = kWarps / WARPS_M; // warps sharing one m-tile, each on its own keys of every tile
  constexpr int KW = N / WARPS_N;           // keys per warp per tile
  constexpr int CPR = D / 8;                // 16-byte chunks per K/V row
  constexpr int ROW_STEP = kThreads / CPR;  // rows covered by one sweep of the block's cp.async
  constexpr int LOADS = N / ROW_STEP;       // cp.async per thread per tile (for K; as many for V)
  constexpr int ROWS = WARPS_M * kRowsPerWarp;
  constexpr int DK = D / 16;                // k-steps of Q K^T
  constexpr int OT = D / 8;                 // n-tiles of the output
  static_assert(KW % 16 == 0 && N <= kThreads && N % ROW_STEP == 0, "tile shape");
  static_assert(STAGES >= 2, "the main loop waits for tile t while tile t + STAGES - 1 is issued");
  static_assert(smem_bytes(D, sizeof(T), STAGES) >=
                    sizeof(float) * kWarps * kRowsPerWarp * (D + 8 + 2),
                "the epilogue's merge buffers reuse the ring");
  using Tr = MmaOps<T>;

  extern __shared__ __align__(16) unsigned char smem[];
  T* s_k = reinterpret_cast<T*>(smem);
  T* s_v = s_k + STAGES * N * D;
  int64_t* s_off = reinterpret_cast<int64_t*>(s_v + STAGES * N * D);  // [STAGES + 1][N]; -1: empty slot
  int32_t* s_pos = reinterpret_cast<int32_t*>(s_off + (STAGES + 1) * N); // [STAGES + 1][N]; -1: masked slot

  const PagedAttentionParams& p = a.p;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;

  const int M = sb.n_q * a.group;
  const int row0 = chunk * ROWS;
  if (row0 >= M) return;  // no query rows here; nobody reads rows that don't exist
  int active, pps;
  row_partition(sb.n_pages, a.splits, a.min_pages_per_split, active, pps);
  if (split >= max(active, 1)) return;  // inactive split (the merge skips it); split 0 also writes rows without keys
  const bool direct = active <= 1;      // this block alone computes its rows: it writes the output itself
  const int pl0 = split * pps;
  const int pages_here = max(0, min(pl0 + pps, sb.n_pages) - pl0);
  const int n_slots = pages_here * p.page_size;
  const int num_tiles = (n_slots + N - 1) / N;
  const int n_k = a.need_pos ? a.seq_len[layout_row(p, b, kvh)] : 0;
  // Slots before this position are invisible to every query of the sequence (sliding window): never loaded.
  const int min_visible = (a.need_pos && p.window > 0) ? n_k - sb.n_q - p.window + 1 : INT32_MIN;

  // ---- page-table prefetch: each of the first N threads owns one slot of a tile --------------------------------
  struct SlotFetch {
    int page, count, pos, slot;
  };
  auto fetch_slot = [&](int tile, SlotFetch& f) {
    f.slot = -1;
    const int u = tile * N + tid;
    if (tid < N && tile < num_tiles && u < n_slots) {
      const int jl = a.page_shift >= 0 ? (u >> a.page_shift) : (u / p.page_size);
      const int j = sb.page_begin + pl0 + jl;
      f.slot = u - jl * p.page_size;
      f.page = __ldg(p.cols + j);
      f.count = __ldg(p.token_counts + j);
      f.pos = a.need_pos ? __ldg(a.page_pos + j) : 0;
    }
  };
  auto store_slot = [&](int tile, const SlotFetch& f) {
    if (tid >= N) return;
    int64_t off = -1;
    int pos = -1;
    if (f.slot >= 0 && f.slot < effective_count(p, f.page, f.count)) {
      const int kp = f.pos + f.slot;
      if (kp >= min_visible) {
        off = ((int64_t)f.page * p.page_size + f.slot) * p.num_kv_heads * D + (int64_t)kvh * D;
        pos = a.need_pos ? kp : 0;
      }
    }
    const int ring = tile % (STAGES + 1);
    s_off[ring * N + tid] = off;
    s_pos[ring * N + tid] = pos;
  };

  const T* k_cache = static_cast<const T*>(p.k_cache);
  const T* v_cache = static_cast<const T*>(p.v_cache);
  auto issue_tile = [&](int tile) {
    if (tile < num_tiles) {
      const int stage = tile % STAGES, ring = tile % (STAGES + 1);
      const int c = tid % CPR;
#pragma unroll
      for (int i = 0; i < LOADS; ++i) {
        const int row = tid / CPR + i * ROW_STEP;
        const int64_t off = s_off[ring * N + row];
        const uint32_t bytes = off >= 0 ? 16u : 0u;
        const int64_t src = off >= 0 ? off + c * 8 : 0;
        const int dst = stage * N * D + row * D + (swizzled_chunk(row, c) << 3);
        cp_async_16(smem_addr(s_k + dst), k_cache + src, bytes);
        cp_async_16(smem_addr(s_v + dst), v_cache + src, bytes);
      }
    }
    cp_async_commit();  // always, so the group count stays in step with the tile count
  };

  // ---- prologue: row tables of the first STAGES tiles, loads of the first STAGES - 1 ---------------------------
  {
    SlotFetch f[STAGES];  // all page-table loads first, then the stores: one memory latency, not STAGES
#pragma unroll
    for (int t = 0; t < STAGES; ++t) fetch_slot(t, f[t]);
#pragma unroll
    for (int t = 0; t < STAGES; ++t) store_slot(t, f[t]);
  }
  __syncthreads();
#pragma unroll
  for (int t = 0; t < STAGES - 1; ++t) issue_tile(t);

  // ---- this warp's query rows: Q fragments straight from global memory ------------------------------------------
  const int g = lane >> 2, tig = lane & 3;
  const int wrow0 = row0 + wm * kRowsPerWarp;
  const bool warp_active = wrow0 < M;
  int qpos[2];
  uint32_t qf[DK][4];
  {
    const uint16_t* q = static_cast<const uint16_t*>(p.q);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = wrow0 + g + 8 * h;
      const bool valid = r < M;
      const int i = valid ? r / a.group : 0;
      qpos[h] = n_k - sb.n_q + i;
      const uint16_t* qrow =
          q + (int64_t)(sb.q0 + i) * p.q_stride_token + (int64_t)(kvh * a.group + (valid ? r % a.group : 0)) *
                                                            p.q_stride_head;
#pragma unroll
      for (int ks = 0; ks < DK; ++ks) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int col = ks * 16 + half * 8 + 2 * tig;
          const uint32_t lo = valid ? qrow[col] : 0u, hi = valid ? qrow[col + 1] : 0u;
          qf[ks][h + 2 * half] = lo | (hi << 16);
        }
      }
    }
  }

  float o[OT][4];
#pragma unroll
  for (int n = 0; n < OT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};

  const int key0 = wn * KW;
  // ldmatrix lane addressing (see the m16n8k16 fragment layouts): K, non-transposed, matrices ordered
  // (keys +0, d +0), (keys +0, d +8), (keys +8, d +0), (keys +8, d +8); V, transposed, ordered
  // (keys +0, d +0), (keys +8, d +0), (keys +0, d +8), (keys +8, d +8).
  const int k_row = (lane >> 4) * 8 + (lane & 7), k_chunk = (lane >> 3) & 1;
  const int v_row = ((lane >> 3) & 1) * 8 + (lane & 7), v_chunk = lane >> 4;

  // ---- main loop -------------------------------------------------------------------------------------------------
  for (int t = 0; t < num_tiles; ++t) {
    SlotFetch f;
    fetch_slot(t + STAGES, f);  // in flight while this tile is computed
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    issue_tile(t + STAGES - 1);

    if (warp_active) {
      const int stage = t % STAGES, ring = t % (STAGES + 1);
      const T* tk = s_k + stage * N * D;
      const T* tv = s_v + stage * N * D;

      float s[KW / 8][4];
#pragma unroll
      for (int n = 0; n < KW / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
      for (int ks = 0; ks < DK; ++ks) {
#pragma unroll
        for (int np = 0; np < KW / 16; ++np) {
          const int row = key0 + np * 16 + k_row;
          const int c = ks * 2 + k_chunk;
          uint32_t b[4];
          ldmatrix_x4(b, smem_addr(tk + row * D + (swizzled_chunk(row, c) << 3)));
          Tr::mma(s[2 * np], qf[ks], b[0], b[1]);
          Tr::mma(s[2 * np + 1], qf[ks], b[2], b[3]);
        }
      }

      // Mask, scale into the log2 domain (softcap first), online softmax (each row lives in one quad of lanes).
      const int32_t* pos = s_pos + ring * N;
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int n = 0; n < KW / 8; ++n) {
        const int2 kp = *reinterpret_cast<const int2*>(pos + key0 + n * 8 + 2 * tig);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key_pos = (e & 1) ? kp.y : kp.x;
          const int qp = qpos[e >> 1];
          bool visible = key_pos >= 0;
          if (a.need_pos) {
            visible = visible && (!p.causal || key_pos <= qp) && (p.window <= 0 || qp - key_pos < p.window);
          }
          float x;
          if constexpr (kSoftcap) {
            x = tanh_approx(s[n][e] * a.cap_in) * a.cap_log2;
          } else {
            x = s[n][e] * a.scale_log2;
          }
          s[n][e] = visible ? x : -INFINITY;
          mx[e >> 1] = fmaxf(mx[e >> 1], s[n][e]);
        }
      }
      float alpha[2], m_use[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
        const float m_new = fmaxf(m_run[h], mx[h]);
        m_use[h] = m_new == -INFINITY ? 0.f : m_new;  // a row with nothing visible yet keeps zeros, not NaN
        alpha[h] = fast_exp2(m_run[h] - m_use[h]);
        m_run[h] = m_new;
        l_run[h] *= alpha[h];
      }
#pragma unroll
      for (int n = 0; n < KW / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[n][e] = fast_exp2(s[n][e] - m_use[e >> 1]);
          l_run[e >> 1] += s[n][e];
        }
      }
#pragma unroll
      for (int n = 0; n < OT; ++n) {
        o[n][0] *= alpha[0];
        o[n][1] *= alpha[0];
        o[n][2] *= alpha[1];
        o[n][3] *= alpha[1];
      }

      // O += P V: the S accumulators of two adjacent key n-tiles are exactly one A fragment.
#pragma unroll
      for (int kk = 0; kk < KW / 16; ++kk) {
        uint32_t pa[4];
        pa[0] = Tr::pack(s[2 * kk][0], s[2 * kk][1]);
        pa[1] = Tr::pack(s[2 * kk][2], s[2 * kk][3]);
        pa[2] = Tr::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        pa[3] = Tr::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
        const int row = key0 + kk * 16 + v_row;
#pragma unroll
        for (int dp = 0; dp < OT / 2; ++dp) {
          const int c = dp * 2 + v_chunk;
          uint32_t b[4];
          ldmatrix_x4_trans(b, smem_addr(tv + row * D + (swizzled_chunk(row, c) << 3)));
          Tr::mma(o[2 * dp], pa, b[0], b[1]);
          Tr::mma(o[2 * dp + 1], pa, b[2], b[3]);
        }
      }
    }
    store_slot(t + STAGES, f);
  }

  // ---- epilogue: merge the WARPS_N key shares of every row through shared memory --------------------------------
  cp_async_wait<0>();
  __syncthreads();
  constexpr int OS = D + 8;  // padded fp32 row stride
  float* s_o = reinterpret_cast<float*>(smem);          // [kWarps][16][OS]
  float* s_m = s_o + kWarps * kRowsPerWarp * OS;        // [kWarps][16]
  float* s_l = s_m + kWarps * kRowsPerWarp;             // [kWarps][16]
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 1);
    l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 2);
  }
  {
    float* wo = s_o + warp * kRowsPerWarp * OS;
#pragma unroll
    for (int n = 0; n < OT; ++n) {
      *reinterpret_cast<float2*>(wo + g * OS + n * 8 + 2 * tig) = make_float2(o[n][0], o[n][1]);
      *reinterpret_cast<float2*>(wo + (g + 8) * OS + n * 8 + 2 * tig) = make_float2(o[n][2], o[n][3]);
    }
    if (tig == 0) {
      s_m[warp * kRowsPerWarp + g] = m_run[0];
      s_m[warp * kRowsPerWarp + g + 8] = m_run[1];
      s_l[warp * kRowsPerWarp + g] = l_run[0];
      s_l[warp * kRowsPerWarp + g + 8] = l_run[1];
    }
  }
  __syncthreads();

  for (int item = tid; item < ROWS * (D / 8); item += kThreads) {
    const int rl = item / (D / 8), c8 = item % (D / 8);
    const int r = row0 + rl;
    if (r >= M) continue;
    const int rw = rl / kRowsPerWarp, rr = rl % kRowsPerWarp;
    float m_max = -INFINITY;
#pragma unroll
    for (int w = 0; w < WARPS_N; ++w) m_max = fmaxf(m_max, s_m[(rw * WARPS_N + w) * kRowsPerWarp + rr]);
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    float l_sum = 0.f;
    if (m_max != -INFINITY) {
#pragma unroll
      for (int w = 0; w < WARPS_N; ++w) {
        const int ww = rw * WARPS_N + w;
        const float scale = fast_exp2(s_m[ww * kRowsPerWarp + rr] - m_max);
        l_sum += scale * s_l[ww * kRowsPerWarp + rr];
        const float4* src = reinterpret_cast<const float4*>(s_o + (ww * kRowsPerWarp + rr) * OS + c8 * 8);
        const float4 x0 = src[0], x1 = src[1];
        acc[0] += scale * x0.x; acc[1] += scale * x0.y; acc[2] += scale * x0.z; acc[3] += scale * x0.w;
        acc[4] += scale * x1.x; acc[5] += scale * x1.y; acc[6] += scale * x1.z; acc[7] += scale * x1.w;
      }
    }
    float inv = l_sum > 0.f ? 1.f / l_sum : 0.f;
    float lse = l_sum > 0.f ? (m_max + __log2f(l_sum)) * kLn2 : -INFINITY;
    const int tok = sb.q0 + r / a.group, hq = kvh * a.group + r % a.group;
    const int64_t out_row = (int64_t)tok * p.num_q_heads + hq;
    // The sink joins the final row here only when there is no split merge (which adds it itself).
    if (direct && p.sinks != nullptr) inv *= add_sink(lse, __ldg(p.sinks + hq));
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] *= inv;
    if (direct) {
      *reinterpret_cast<uint4*>(static_cast<T*>(p.out) + out_row * D + c8 * 8) = pack8<T>(acc);
      if (c8 == 0) p.lse[out_row] = lse;
    } else {
      const int64_t part_row = (int64_t)split * p.total_q * p.num_q_heads + out_row;
      float4* dst = reinterpret_cast<float4*>(a.part_out + part_row * D + c8 * 8);
      dst[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
      dst[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
      if (c8 == 0) a.part_lse[part_row] = lse;
    }
  }
  if (direct || a.split_counters == nullptr) return;  // no counters (fresh scratch): merge_splits_kernel merges
  // The last of the `active` splits of this row chunk to get here merges their partials. Each block's partials are
  // made visible device-wide before it counts itself (threadfence, then the barrier, then the atomic); the last one
  // resets the counter for the next run, since no other split of this run is left to count.
  __threadfence();
  __syncthreads();
  bool last = false;
  if (tid == 0) {
    int32_t* counter = a.split_counters + ((int64_t)b * p.num_kv_heads + kvh) * a.max_row_chunks + chunk;
    last = atomicAdd(counter, 1) == active - 1;
    if (last) *counter = 0;
  }
  if (!__syncthreads_or(last)) return;
  __threadfence();
  for (int r = row0 + warp; r < min(row0 + ROWS, M); r += kWarps) merge_split_row<T, D>(a, sb, kvh, r, active);
}

// Grid: one block per (b, kv head, split, row chunk), row chunk fastest so blocks sharing K/V run together. A plan
// sizes the row chunks for the typical sequence; a block whose sequence has more query rows than the grid's chunks
// cover also runs the chunks chunk + row_chunks, chunk + 2 * row_chunks, ... (each re-reads the split's K/V), so
// any query count per sequence is computed without a grid sized for the largest one.
// Dynamic shared memory: smem_bytes(D, sizeof(T), STAGES). kSoftcap: scores go through softcap * tanh(. / softcap).
template <typename T, int D, int WARPS_M, int STAGES, bool kSoftcap>
__global__ void __launch_bounds__(kThreads, blocks_per_sm(STAGES)) paged_decode_kernel(const DecodeArgs a) {
  constexpr int ROWS = WARPS_M * kRowsPerWarp;
  const PagedAttentionParams& p = a.p;
  int bid = blockIdx.x;
  const int first_chunk = bid % a.row_chunks;
  bid /= a.row_chunks;
  const int split = bid % a.splits;
  bid /= a.splits;
  const int kvh = bid % p.num_kv_heads;
  const int b = bid / p.num_kv_heads;

  grid_dependency_wait();
  allow_dependent_launch();
  const SeqBounds sb = load_seq_bounds(p, b, kvh);
  const int M = sb.n_q * a.group;
  for (int chunk = first_chunk; chunk * ROWS < M; chunk += a.row_chunks) {
    if (chunk != first_chunk) __syncthreads();  // the previous chunk's shared memory is no longer read
    decode_row_chunk<T, D, WARPS_M, STAGES, kSoftcap>(a, b, kvh, split, chunk, sb);
  }
}

// ---- split merge as a kernel of its own ------------------------------------------------------------------------

// For a workspace without zeroed split counters (fresh scratch of a one-shot call; zeroing them would cost a launch
// of its own): one warp per (sequence, query, q head) of a split row, launched with PDL right behind the decode
// kernel, which triggers at its start, so these blocks are resident early and wait in griddepcontrol.wait.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) merge_splits_kernel(const DecodeArgs a) {
  const PagedAttentionParams& p = a.p;
  const int64_t gw = (int64_t)blockIdx.x * kWarps + (threadIdx.x >> 5);
  const int hq = gw % p.num_q_heads;
  const int64_t rest = gw / p.num_q_heads;
  const int i = rest % p.max_q_len;
  const int b = rest / p.max_q_len;
  if (b >= p.batch) return;
  grid_dependency_wait();
  const int kvh = hq / a.group;
  const SeqBounds sb = load_seq_bounds(p, b, kvh);
  if (i >= sb.n_q) return;
  int active, pps;
  row_partition(sb.n_pages, a.splits, a.min_pages_per_split, active, pps);
  if (active <= 1) return;  // the decode block of this row wrote it
  merge_split_row<T, D>(a, sb, kvh, i * a.group + hq % a.group, active);
}

// ---- host launcher ---------------------------------------------------------------------------------------------

template <typename T, int D, int WARPS_M, int STAGES, bool kSoftcap>
cudaError_t launch_main(const DecodeArgs& a, cudaStream_t stream) {
  constexpr size_t smem = smem_bytes(D, sizeof(T), STAGES);
  auto kernel = paged_decode_kernel<T, D, WARPS_M, STAGES, kSoftcap>;
  // Opt in to > 48 KB of shared memory once per device (cheap host call, no stream work, capture-safe).
  static bool configured[64] = {};
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev >= 64 || !configured[dev]) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
    if (dev < 64) configured[dev] = true;
  }
  const int64_t blocks = (int64_t)a.p.batch * a.p.num_kv_heads * a.splits * a.row_chunks;
  return launch_pdl(kernel, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), smem, stream, a);
}

template <typename T, int D, bool kSoftcap>
cudaError_t launch_decode_typed(const DecodeArgs& a, int warps_m, int stages, cudaStream_t stream) {
  const bool short_ring = stages == kStagesShort;  // warps_m 1 only (make_decode_plan)
  const cudaError_t err = warps_m == 1   ? (short_ring ? launch_main<T, D, 1, kStagesShort, kSoftcap>(a, stream)
                                                       : launch_main<T, D, 1, kStagesDefault, kSoftcap>(a, stream))
                          : warps_m == 2 ? launch_main<T, D, 2, kStagesDefault, kSoftcap>(a, stream)
                                         : launch_main<T, D, 4, kStagesDefault, kSoftcap>(a, stream);
  if (err != cudaSuccess || a.splits == 1 || a.split_counters != nullptr) return err;
  const int64_t warps = (int64_t)a.p.batch * a.p.max_q_len * a.p.num_q_heads;
  const dim3 grid(static_cast<unsigned>((warps + kWarps - 1) / kWarps));
  return launch_pdl(merge_splits_kernel<T, D>, grid, dim3(kThreads), 0, stream, a);
}

}  // namespace flashcore::decode
