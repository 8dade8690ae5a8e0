// CPU paged attention: a tiled flash-attention kernel in portable, torch-free C++ (GCC/Clang vector extensions).
//
// Design. One work item is (sequence, kv head, query tile). A query tile stacks Bq query positions times the
// `group` query heads of the kv head into M = Bq * group rows that share every key and value (GQA costs no extra
// key traffic). For each tile of kBlockKeys keys the item computes the scores transposed, S^T [keys, rows], so that
//   - q.k^T is a register-blocked microkernel: vectors run over rows (Q^T is staged once per item, pre-scaled), key
//     elements are broadcast straight from the cache pages (float32 pages are read in place; 16-bit pages are
//     converted once per key tile), and there is no transpose of K anywhere;
//   - the online softmax is vertical: running max, sum and rescale factors of W rows live in one vector, so the
//     max/exp/sum run W rows at a time with no horizontal reductions (exp is a vectorised Cephes polynomial);
//     causal / window masks are two vector compares against each row's visible range [lo, hi) and only tiles on a
//     mask edge pay for them;
//   - p.v is a second microkernel: accumulators RB rows x DV vectors of the head dim, one broadcast of p and one
//     vector load of the value row per key.
// Everything accumulates in float32. Rows with no visible key, sinks, softcap and lse follow params.h exactly.
// Work items are ordered (sequence, kv head, query tile in zig-zag order) so that torch's contiguous split of the
// item range gives each thread a similar share of a causal prefill's triangle; even B = 1 uses every core.
//
// Why not a BLAS from the binding layer (at::native::cpublas::gemm / at::mm + at::vec): that is exactly how torch's
// own CPU flash attention (SDPA) is built, so we measured it on the example model's shapes (head dim 32, 8 query /
// 2 kv heads, causal, float32; one thread, CPU time, Zen 4 with AVX-512): SDPA 54 / 60 / 65 GFLOP/s at 2K / 4K / 8K
// tokens, this kernel 72 / 77 / 80. With a head dim of 32 every GEMM is skinny (k = 32), so call overheads,
// packing and a separate softmax pass over S dominate; a fused microkernel that keeps S in L1 and the GQA heads of a
// kv head together does better, and it stays torch-free as csrc/kernels/ requires.
//
// Portability. The microkernels are written once as templates over the vector width W and instantiated three
// times: AVX-512 (W = 16) and AVX2+FMA (W = 8) through function target attributes, picked at run time with
// __builtin_cpu_supports, and a baseline build (W = 4: SSE2 on x86-64, NEON on AArch64). The wheel therefore needs
// no -march flag and runs on any x86-64. Decode-sized tiles (<= 8 rows) use the 8-lane instantiation on AVX-512
// machines too. FLASHCORE_CPU_ISA=avx2 / =baseline caps the choice (the tests check every instantiation).
// Tile sizes: 64 keys x ~64 rows measured best (32 rows: 0.8x, 128 rows: 0.97x single-thread at a 4K prefill).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <limits>
#include <vector>

#include "cpu_kernels.h"
#include "float_convert.h"

#define FC_INLINE inline __attribute__((always_inline))
// Every function that takes or returns a vector is force-inlined into its ISA's entry point, so no vector crosses a
// call boundary and GCC's ABI notes about vector arguments do not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace flashcore::cpu {

int paged_attention_query_block(const PagedAttentionParams& p) {
  const int group = std::max(1, p.num_kv_heads > 0 ? p.num_q_heads / p.num_kv_heads : 1);
  return std::max(1, kPagedAttentionTileRows / group);
}

namespace {

constexpr int kBlockKeys = 64;  // keys per tile (multiple of kKeyBlock)
constexpr int kKeyBlock = 4;    // keys per q.k^T microkernel step
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

typedef float f32x4 __attribute__((vector_size(16)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x4 __attribute__((vector_size(16)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
template <int W> struct VecTypes;
template <> struct VecTypes<4> { using vf = f32x4; using vi = i32x4; };
template <> struct VecTypes<8> { using vf = f32x8; using vi = i32x8; };
template <> struct VecTypes<16> { using vf = f32x16; using vi = i32x16; };

template <int W>
struct Simd {
  using vf = typename VecTypes<W>::vf;
  using vi = typename VecTypes<W>::vi;

  static FC_INLINE vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof(v)); return v; }
  static FC_INLINE void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
  static FC_INLINE vi loadi(const int32_t* p) { vi v; std::memcpy(&v, p, sizeof(v)); return v; }
  static FC_INLINE vf splat(float x) { vf v = {}; return v + x; }
  static FC_INLINE vi splati(int32_t x) { vi v = {}; return v + x; }
  static FC_INLINE vf vmax(vf a, vf b) { return a > b ? a : b; }

  // exp(x) for x <= 0 (every caller's case: softmax arguments s - max, tanh's -2|x|), relative error ~2e-7
  // (Cephes expf's polynomial). exp(x) = 0 for x < -87.3, -inf included, so masked scores vanish exactly.
  // Rounding by the 1.5 * 2^23 (+ bias) trick: t's low mantissa bits are n + 127, shifted into 2^n's exponent.
  static FC_INLINE vf exp(vf x) {
    const vf lo = splat(-87.3f);
    const vi underflow = x < lo;
    x = x < lo ? lo : x;
    const vf magic = splat(12582912.0f + 127.0f);
    const vf t = x * 1.44269504088896341f + magic;
    const vf n = t - magic;
    const vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
    vf y = splat(1.9875691500e-4f);
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * (r * r) + r + 1.0f;
    const vf result = y * (vf)(((vi)t) << 23);
    return underflow ? splat(0.f) : result;
  }

  // tanh(x) = sign(x) (1 - e) / (1 + e) with e = exp(-2|x|); absolute error ~1e-7.
  static FC_INLINE vf tanh(vf x) {
    const vf ax = x < 0.f ? -x : x;
    const vf e = exp(ax * -2.0f);
    const vf t = (1.0f - e) / (1.0f + e);
    return x < 0.f ? -t : t;
  }
};

// Per-thread buffers of one call (sized once for the largest tile).
struct Scratch {
  std::vector<float> qt, s, o, m, l, alpha, tile_max, kbuf, vbuf, zero;
  std::vector<int32_t> lo, hi;
  std::vector<const float*> krow, vrow;
  std::vector<int64_t> token;  // element offset of each key's token row (its heads' slice) in the pools
};

// How a row's accumulator becomes its output: out = o * scale, and its lse. m, l: the row's running max and sum of
// exp(s - m) over its keys; sink: the head's sink logit (-inf: none). A row with no key and no sink: zeros, -inf.
struct RowScale {
  float scale, lse;
};
inline RowScale finish_row(float m, float l, float sink) {
  const float m_f = std::max(m, sink);
  if (m_f == kNegInf) return {0.f, kNegInf};
  const float keep = m == kNegInf ? 0.f : std::exp(m - m_f);
  const float denom = l * keep + (sink == kNegInf ? 0.f : std::exp(sink - m_f));
  return {keep / denom, m_f + std::log(denom)};
}

// dst[offset : offset + n] = src * scale, converted to dtype.
inline void store_row(void* dst, int64_t offset, const float* src, float scale, int n, DType dtype) {
  switch (dtype) {
    case DType::kFloat32: {
      float* out = static_cast<float*>(dst) + offset;
      for (int d = 0; d < n; ++d) out[d] = src[d] * scale;
      break;
    }
    case DType::kFloat16: {
      uint16_t* out = static_cast<uint16_t*>(dst) + offset;
      for (int d = 0; d < n; ++d) out[d] = float_to_fp16(src[d] * scale);
      break;
    }
    default: {
      uint16_t* out = static_cast<uint16_t*>(dst) + offset;
      for (int d = 0; d < n; ++d) out[d] = float_to_bf16(src[d] * scale);
      break;
    }
  }
}

// Loads n elements of a cache / q row of the given dtype as float into dst (dst[n..pad) = 0).
FC_INLINE void load_row(const void* base, int64_t offset, int n, int pad, DType dtype, float* dst) {
  switch (dtype) {
    case DType::kFloat32: std::memcpy(dst, static_cast<const float*>(base) + offset, sizeof(float) * n); break;
    case DType::kFloat16: {
      const uint16_t* src = static_cast<const uint16_t*>(base) + offset;
      for (int d = 0; d < n; ++d) dst[d] = fp16_to_float(src[d]);
      break;
    }
    default: {
      const uint16_t* src = static_cast<const uint16_t*>(base) + offset;
      for (int d = 0; d < n; ++d) dst[d] = bits_float(static_cast<uint32_t>(src[d]) << 16);
      break;
    }
  }
  for (int d = n; d < pad; ++d) dst[d] = 0.f;
}

template <int W>
struct Kernel {
  using S = Simd<W>;
  using vf = typename S::vf;
  using vi = typename S::vi;
  // Accumulator registers the microkernels may use: 32 vector registers with AVX-512, 16 otherwise.
  static constexpr int kAcc = W == 16 ? 16 : 8;
  static constexpr int kRowVecs = kAcc / kKeyBlock;  // q.k^T: kKeyBlock keys x kRowVecs row vectors

  // S^T[c][r0 : r0 + RV * W] = sum_d Q^T[d][rows] * K[c][d] for keys c in [c0, c0 + kKeyBlock).
  // With tile_max, also folds the block's scores into the running maxima of its row vectors (unmasked tiles).
  template <int RV>
  static FC_INLINE void qk_block(const float* qt, int64_t mp, int d_len, const float* const* krow, int c0,
                                 int r0, float* s, float* tile_max) {
    vf acc[kKeyBlock][RV];
#pragma GCC unroll 8
    for (int c = 0; c < kKeyBlock; ++c)
#pragma GCC unroll 8
      for (int j = 0; j < RV; ++j) acc[c][j] = S::splat(0.f);
    const float* k0 = krow[c0];
    const float* k1 = krow[c0 + 1];
    const float* k2 = krow[c0 + 2];
    const float* k3 = krow[c0 + 3];
    for (int d = 0; d < d_len; ++d) {
      vf q[RV];
#pragma GCC unroll 8
      for (int j = 0; j < RV; ++j) q[j] = S::load(qt + d * mp + r0 + j * W);
      const float kv[kKeyBlock] = {k0[d], k1[d], k2[d], k3[d]};
#pragma GCC unroll 8
      for (int c = 0; c < kKeyBlock; ++c)
#pragma GCC unroll 8
        for (int j = 0; j < RV; ++j) acc[c][j] += q[j] * kv[c];
    }
#pragma GCC unroll 8
    for (int c = 0; c < kKeyBlock; ++c)
#pragma GCC unroll 8
      for (int j = 0; j < RV; ++j) S::store(s + (c0 + c) * mp + r0 + j * W, acc[c][j]);
    if (tile_max) {
#pragma GCC unroll 8
      for (int j = 0; j < RV; ++j) {
        const vf m = S::vmax(S::vmax(acc[0][j], acc[1][j]), S::vmax(acc[2][j], acc[3][j]));
        S::store(tile_max + r0 + j * W, S::vmax(S::load(tile_max + r0 + j * W), m));
      }
    }
  }

  // O[r][d0 : d0 + DV * W] = alpha[r] * O[r][...] + sum_c P^T[c][r] * V[c][...] for rows [r0, r0 + RB).
  template <int RB, int DV>
  static FC_INLINE void pv_block(float* o, int64_t dp, const float* alpha, const float* p, int64_t mp,
                                 const float* const* vrow, int n_keys, int r0, int d0) {
    vf acc[RB][DV];
#pragma GCC unroll 16
    for (int r = 0; r < RB; ++r)
#pragma GCC unroll 4
      for (int j = 0; j < DV; ++j) acc[r][j] = S::load(o + (r0 + r) * dp + d0 + j * W) * alpha[r0 + r];
    for (int c = 0; c < n_keys; ++c) {
      vf v[DV];
#pragma GCC unroll 4
      for (int j = 0; j < DV; ++j) v[j] = S::load(vrow[c] + d0 + j * W);
      const float* pc = p + c * mp + r0;
#pragma GCC unroll 16
      for (int r = 0; r < RB; ++r)
#pragma GCC unroll 4
        for (int j = 0; j < DV; ++j) acc[r][j] += v[j] * pc[r];
    }
#pragma GCC unroll 16
    for (int r = 0; r < RB; ++r)
#pragma GCC unroll 4
      for (int j = 0; j < DV; ++j) S::store(o + (r0 + r) * dp + d0 + j * W, acc[r][j]);
  }

  // All rows (a multiple of 4) in blocks of RB, the last block of 4 rows where RB = 8 does not divide them.
  template <int DV>
  static FC_INLINE void pv_rows(float* o, int64_t dp, const float* alpha, const float* p, int64_t mp,
                                const float* const* vrow, int n_keys, int rows, int d0) {
    constexpr int RB = std::min(8, kAcc / DV);
    int r0 = 0;
    for (; r0 + RB <= rows; r0 += RB) pv_block<RB, DV>(o, dp, alpha, p, mp, vrow, n_keys, r0, d0);
    if constexpr (RB > 4) {
      if (r0 < rows) pv_block<4, DV>(o, dp, alpha, p, mp, vrow, n_keys, r0, d0);
    }
  }

  // One item's rows for one kv head: Q^T (pre-scaled), the output accumulator and the running softmax state.
  struct HeadState {
    float *qt, *o, *m, *l, *alpha, *tile_max;
  };

  static FC_INLINE void run(const PagedAttentionParams& p, const CpuAttentionSchedule& sched, int64_t begin,
                            int64_t end) {
    const int group = p.num_q_heads / p.num_kv_heads;
    const int D = p.head_dim;
    const int64_t dp = round_up(D, W);
    const int bq = paged_attention_query_block(p);
    const int64_t n_qt = (p.max_q_len + bq - 1) / bq;
    const int64_t mp = round_up(int64_t(bq) * group, std::max(W, 8));
    const int64_t token_stride = int64_t(p.num_kv_heads) * D;
    const int64_t page_stride = int64_t(p.page_size) * token_stride;
    const bool in_place_k = p.dtype == DType::kFloat32;
    const bool in_place_v = p.dtype == DType::kFloat32 && D % W == 0;
    const bool has_softcap = p.softcap > 0.f;
    const int64_t elem = dtype_size(p.dtype);
    const float inv_softcap = has_softcap ? 1.f / p.softcap : 0.f;
    // Decode items hold every kv head of a sequence (unless each head has its own page list), so that one thread
    // reads whole token rows of the pages: measured 1.6-1.9x faster from DRAM than threads reading every other
    // head's half of each row.
    const int heads_per_item = sched.decode && !p.per_kv_head_rows ? p.num_kv_heads : 1;
    const int head_items = p.num_kv_heads / heads_per_item;
    const int splits = sched.decode ? std::max(1, sched.key_splits) : 1;

    Scratch sc;
    sc.qt.assign(heads_per_item * D * mp, 0.f);
    sc.s.resize(kBlockKeys * mp);
    sc.o.resize(heads_per_item * mp * dp);
    sc.m.resize(heads_per_item * mp);
    sc.l.resize(heads_per_item * mp);
    sc.alpha.resize(heads_per_item * mp);
    sc.tile_max.resize(heads_per_item * mp);
    sc.lo.resize(mp);
    sc.hi.resize(mp);
    sc.kbuf.resize(in_place_k ? 0 : kBlockKeys * D);
    sc.vbuf.resize(in_place_v ? 0 : kBlockKeys * dp);
    sc.zero.assign(dp, 0.f);
    sc.krow.resize(kBlockKeys);
    sc.vrow.resize(kBlockKeys);
    sc.token.resize(kBlockKeys);
    float* const s = sc.s.data();
    auto head_state = [&](int hh) {
      return HeadState{sc.qt.data() + hh * D * mp, sc.o.data() + hh * mp * dp, sc.m.data() + hh * mp,
                       sc.l.data() + hh * mp,      sc.alpha.data() + hh * mp, sc.tile_max.data() + hh * mp};
    };

    for (int64_t item = begin; item < end; ++item) {
      // Item -> sequence b, kv heads [h0, h0 + heads), query tile, key split.
      int b, h0, split = 0;
      int64_t tile = 0;
      if (sched.decode) {  // (sequence, key split, head item): a thread's contiguous items share pages
        b = static_cast<int>(item / (int64_t(splits) * head_items));
        split = static_cast<int>(item / head_items % splits);
        h0 = static_cast<int>(item % head_items) * heads_per_item;
      } else {
        const int64_t bh = item / n_qt, t = item % n_qt;
        tile = (t % 2 == 0) ? t / 2 : n_qt - 1 - t / 2;  // zig-zag: cheap and costly causal tiles mix
        b = static_cast<int>(bh / p.num_kv_heads);
        h0 = static_cast<int>(bh % p.num_kv_heads);
      }
      const int q_begin = p.q_indptr[b], n_q = p.q_indptr[b + 1] - q_begin;
      const int i0 = static_cast<int>(tile * bq);
      if (i0 >= n_q) continue;
      const int nqi = std::min(bq, n_q - i0);
      const int rows = nqi * group;  // live rows; row r is query i0 + r / group of head kvh * group + r % group
      const int layout_row = p.per_kv_head_rows ? b * p.num_kv_heads + h0 : b;
      const int j_begin = p.row_offsets[layout_row], j_end = p.row_offsets[layout_row + 1];
      int64_t n_k = 0;
      for (int j = j_begin; j < j_end; ++j) n_k += p.token_counts[j];
      // This split's keys: whole key tiles, so no tile straddles two splits.
      const int64_t split_keys = round_up((n_k + splits - 1) / splits, kBlockKeys);
      const int64_t key_begin = std::min(n_k, split * split_keys);
      const int64_t key_end = std::min(n_k, key_begin + split_keys);

      // Visible key range of every row, and the union (within the split) / intersection over the tile.
      int64_t k_lo = key_end, k_hi = key_begin, lo_max = 0, hi_min = n_k;
      for (int r = 0; r < mp; ++r) {
        const int i = i0 + std::min(r, rows - 1) / group;  // padding rows copy the last live row
        const int64_t q_pos = n_k - n_q + i;
        int64_t lo = 0, hi = n_k;
        if (p.causal) hi = std::max<int64_t>(0, std::min<int64_t>(hi, q_pos + 1));
        if (p.window > 0) lo = std::max<int64_t>(lo, q_pos - p.window + 1);
        lo = std::min(lo, n_k);
        sc.lo[r] = static_cast<int32_t>(lo);
        sc.hi[r] = static_cast<int32_t>(hi);
        if (r < rows) {
          const int64_t lo_in = std::max(lo, key_begin), hi_in = std::min(hi, key_end);
          if (lo_in < hi_in) { k_lo = std::min(k_lo, lo_in); k_hi = std::max(k_hi, hi_in); }
          lo_max = std::max(lo_max, lo);
          hi_min = std::min(hi_min, hi);
        }
      }

      // Q^T [D][mp] per head, scaled; O, m, l.
      for (int hh = 0; hh < heads_per_item; ++hh) {
        const HeadState st = head_state(hh);
        for (int r = 0; r < rows; ++r) {
          const int64_t token = q_begin + i0 + r / group;
          const int qh = (h0 + hh) * group + r % group;
          float row[256];
          load_row(p.q, token * p.q_stride_token + qh * p.q_stride_head, D, D, p.dtype, row);
          for (int d = 0; d < D; ++d) st.qt[d * mp + r] = row[d] * p.sm_scale;
        }
        for (int64_t r = rows; r < mp; ++r)
          for (int d = 0; d < D; ++d) st.qt[d * mp + r] = 0.f;
        std::fill(st.o, st.o + mp * dp, 0.f);
        std::fill(st.m, st.m + mp, kNegInf);
        std::fill(st.l, st.l + mp, 0.f);
      }

      // Rows computed: the live ones rounded up to 4 (p.v blocks) and to whole vectors; padding rows see zeros.
      const int rows4 = static_cast<int>(round_up(rows, 4));
      const int row_vecs = static_cast<int>((rows4 + W - 1) / W);
      // Page cursor at the first key tile.
      int64_t kt0 = k_lo < k_hi ? k_lo / kBlockKeys * kBlockKeys : k_hi;
      int j = j_begin;
      int64_t page_first = 0;  // key index of page j's first token
      while (j < j_end && page_first + p.token_counts[j] <= kt0) page_first += p.token_counts[j++];
      int64_t cursor = kt0 - page_first;  // token within page j
      // Bytes of a token row this item reads: its heads' slice (adjacent heads are adjacent in the row).
      const int64_t read_offset = int64_t(h0) * D;
      const int64_t read_bytes = int64_t(heads_per_item) * D * elem;

      for (; kt0 < k_hi; kt0 += kBlockKeys) {
        const int kn = static_cast<int>(std::min<int64_t>(kBlockKeys, k_hi - kt0));
        for (int c = 0; c < kn; ++c) {  // element offset of each key's token row
          while (cursor >= p.token_counts[j]) { cursor = 0; ++j; }
          sc.token[c] = int64_t(p.cols[j]) * page_stride + cursor * token_stride + read_offset;
          ++cursor;
        }
        // Prefetch the next tile's key / value rows (decode reads every page once, from DRAM: without this the
        // loads wait on memory latency, the hardware prefetchers losing the stream at each page boundary).
        {
          int pj = j;
          int64_t pc = cursor;
          const int next = static_cast<int>(std::min<int64_t>(kBlockKeys, k_hi - kt0 - kn));
          const char* kbase = static_cast<const char*>(p.k_cache);
          const char* vbase = static_cast<const char*>(p.v_cache);
          for (int c = 0; c < next; ++c) {
            while (pc >= p.token_counts[pj]) { pc = 0; ++pj; }
            const int64_t byte = (int64_t(p.cols[pj]) * page_stride + pc * token_stride + read_offset) * elem;
            ++pc;
            for (int64_t x = 0; x < read_bytes; x += 64) {
              __builtin_prefetch(kbase + byte + x);
              __builtin_prefetch(vbase + byte + x);
            }
          }
        }
        const int kn_blocks = static_cast<int>(round_up(kn, kKeyBlock));
        const bool masked = !(lo_max <= kt0 && kt0 + kn_blocks <= hi_min);
        const bool separate_max = masked || has_softcap;

        for (int hh = 0; hh < heads_per_item; ++hh) {
          const HeadState st = head_state(hh);
          // Key / value rows of this head (read in place for float32 where the layout allows).
          const int64_t head_offset = int64_t(hh) * D;
          for (int c = 0; c < kn; ++c) {
            const int64_t src = sc.token[c] + head_offset;
            if (in_place_k) {
              sc.krow[c] = static_cast<const float*>(p.k_cache) + src;
            } else {
              load_row(p.k_cache, src, D, D, p.dtype, sc.kbuf.data() + c * D);
              sc.krow[c] = sc.kbuf.data() + c * D;
            }
            if (in_place_v) {
              sc.vrow[c] = static_cast<const float*>(p.v_cache) + src;
            } else {
              load_row(p.v_cache, src, D, static_cast<int>(dp), p.dtype, sc.vbuf.data() + c * dp);
              sc.vrow[c] = sc.vbuf.data() + c * dp;
            }
          }
          for (int c = kn; c < kn_blocks; ++c) sc.krow[c] = sc.vrow[c] = sc.zero.data();

          // S^T = K Q^T for the live row vectors; on tiles without mask and softcap also the new row maxima.
          float* const tile_max = separate_max ? nullptr : st.tile_max;
          if (!separate_max) std::copy(st.m, st.m + row_vecs * W, st.tile_max);
          for (int c0 = 0; c0 < kn_blocks; c0 += kKeyBlock) {
            int rv = 0;
            for (; rv + kRowVecs <= row_vecs; rv += kRowVecs)
              qk_block<kRowVecs>(st.qt, mp, D, sc.krow.data(), c0, rv * W, s, tile_max);
            for (; rv < row_vecs; ++rv) qk_block<1>(st.qt, mp, D, sc.krow.data(), c0, rv * W, s, tile_max);
          }
          // Online softmax, W rows at a time: P^T overwrites S^T.
          for (int rv = 0; rv < row_vecs; ++rv) {
            float* sr = s + rv * W;
            const vi lo = S::loadi(sc.lo.data() + rv * W), hi = S::loadi(sc.hi.data() + rv * W);
            const vf m_old = S::load(st.m + rv * W);
            vf m_new = separate_max ? m_old : S::load(st.tile_max + rv * W);
            if (separate_max) {
              for (int c = 0; c < kn_blocks; ++c) {
                vf x = S::load(sr + c * mp);
                if (has_softcap) x = S::tanh(x * inv_softcap) * p.softcap;
                if (masked) {
                  const vi key = S::splati(static_cast<int32_t>(kt0 + c));
                  x = (key >= lo) & (key < hi) ? x : S::splat(kNegInf);
                }
                S::store(sr + c * mp, x);
                m_new = S::vmax(m_new, x);
              }
            }
            const vf m_safe = m_new == kNegInf ? S::splat(0.f) : m_new;  // no visible key yet: p = 0, no NaN
            const vf alpha = S::exp(m_old - m_safe);
            vf sum = S::splat(0.f);
            for (int c = 0; c < kn_blocks; ++c) {
              const vf e = S::exp(S::load(sr + c * mp) - m_safe);
              S::store(sr + c * mp, e);
              sum += e;
            }
            S::store(st.l + rv * W, S::load(st.l + rv * W) * alpha + sum);
            S::store(st.m + rv * W, m_new);
            S::store(st.alpha + rv * W, alpha);
          }
          // O = diag(alpha) O + P V.
          int64_t d0 = 0;
          const int64_t dvecs = dp / W;
          int64_t v = 0;
          for (; v + 4 <= dvecs; v += 4, d0 += 4 * W)
            pv_rows<4>(st.o, dp, st.alpha, s, mp, sc.vrow.data(), kn, rows4, static_cast<int>(d0));
          for (; v + 2 <= dvecs; v += 2, d0 += 2 * W)
            pv_rows<2>(st.o, dp, st.alpha, s, mp, sc.vrow.data(), kn, rows4, static_cast<int>(d0));
          for (; v < dvecs; ++v, d0 += W)
            pv_rows<1>(st.o, dp, st.alpha, s, mp, sc.vrow.data(), kn, rows4, static_cast<int>(d0));
        }
      }

      // Normalise and write out and lse: final rows (the sink joins the denominator only), or with several key
      // splits this split's partial rows (normalised over its own keys; merge_key_splits adds the sink).
      for (int hh = 0; hh < heads_per_item; ++hh) {
        const HeadState st = head_state(hh);
        for (int r = 0; r < rows; ++r) {
          const int64_t token = q_begin + i0 + r / group;
          const int qh = (h0 + hh) * group + r % group;
          const int64_t row = token * p.num_q_heads + qh;
          const float* orow = st.o + r * dp;
          if (splits > 1) {
            float* dst = sched.partial_out + (int64_t(split) * p.total_q * p.num_q_heads + row) * D;
            const float l = st.l[r];
            const float scale = st.m[r] == kNegInf ? 0.f : 1.f / l;
            for (int d = 0; d < D; ++d) dst[d] = orow[d] * scale;
            sched.partial_lse[int64_t(split) * p.total_q * p.num_q_heads + row] =
                st.m[r] == kNegInf ? kNegInf : st.m[r] + std::log(l);
            continue;
          }
          const float sink = p.sinks ? p.sinks[qh] : kNegInf;
          const RowScale f = finish_row(st.m[r], st.l[r], sink);
          store_row(p.out, row * D, orow, f.scale, D, p.dtype);
          p.lse[row] = f.lse;
        }
      }
    }
  }
};

void run_baseline(const PagedAttentionParams& p, const CpuAttentionSchedule& sched, int64_t begin, int64_t end) {
  Kernel<4>::run(p, sched, begin, end);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FC_HAVE_X86_DISPATCH 1
__attribute__((target("avx2,fma"))) void run_avx2(const PagedAttentionParams& p, const CpuAttentionSchedule& sched,
                                                  int64_t begin, int64_t end) {
  Kernel<8>::run(p, sched, begin, end);
}
// Tiles of at most 8 rows (decode: one query position times the group's heads) run 8 lanes wide: on cores that
// split a 512-bit FMA in two (Zen 4) that does the same useful work in half the instructions.
__attribute__((target("avx512f,avx2,fma"))) void run_avx512(const PagedAttentionParams& p,
                                                            const CpuAttentionSchedule& sched, int64_t begin,
                                                            int64_t end) {
  const int64_t tile_rows = int64_t(std::min(paged_attention_query_block(p), std::max(p.max_q_len, 1))) *
                            (p.num_q_heads / p.num_kv_heads);
  if (tile_rows <= 8) {
    Kernel<8>::run(p, sched, begin, end);
  } else {
    Kernel<16>::run(p, sched, begin, end);
  }
}
#endif

using RunFn = void (*)(const PagedAttentionParams&, const CpuAttentionSchedule&, int64_t, int64_t);

// The widest instruction set this CPU has; FLASHCORE_CPU_ISA=avx2 or =baseline caps it (tests use this to check
// every instantiation on one machine).
RunFn pick_implementation() {
#ifdef FC_HAVE_X86_DISPATCH
  const char* cap = std::getenv("FLASHCORE_CPU_ISA");
  const std::string limit = cap ? cap : "";
  __builtin_cpu_init();
  const bool fma = __builtin_cpu_supports("fma");
  if (limit != "avx2" && limit != "baseline" && __builtin_cpu_supports("avx512f") && fma) return run_avx512;
  if (limit != "baseline" && __builtin_cpu_supports("avx2") && fma) return run_avx2;
#endif
  return run_baseline;
}

}  // namespace

const char* paged_attention_isa() {
  const RunFn fn = pick_implementation();
#ifdef FC_HAVE_X86_DISPATCH
  if (fn == run_avx512) return "avx512";
  if (fn == run_avx2) return "avx2";
#endif
  return "baseline";
}

void paged_attention(const PagedAttentionParams& p, const CpuAttentionSchedule& sched, int64_t begin, int64_t end) {
  static const RunFn impl = pick_implementation();
  impl(p, sched, begin, end);
}

void merge_key_splits(const PagedAttentionParams& p, const CpuAttentionSchedule& sched, int64_t begin, int64_t end) {
  const int D = p.head_dim;
  const int64_t split_rows = int64_t(p.total_q) * p.num_q_heads;
  std::vector<float> acc(D);
  for (int64_t row = begin; row < end; ++row) {
    float m = kNegInf;
    for (int s = 0; s < sched.key_splits; ++s) m = std::max(m, sched.partial_lse[s * split_rows + row]);
    std::fill(acc.begin(), acc.end(), 0.f);
    float l = 0.f;  // sum over splits of exp(lse_s - m): the partial rows weighted as one softmax over all keys
    if (m != kNegInf) {
      for (int s = 0; s < sched.key_splits; ++s) {
        const float w = std::exp(sched.partial_lse[s * split_rows + row] - m);
        if (w == 0.f) continue;
        const float* o = sched.partial_out + (s * split_rows + row) * D;
        for (int d = 0; d < D; ++d) acc[d] += w * o[d];
        l += w;
      }
    }
    const float sink = p.sinks ? p.sinks[row % p.num_q_heads] : kNegInf;
    const RowScale f = finish_row(m, l, sink);
    store_row(p.out, row * D, acc.data(), f.scale, D, p.dtype);
    p.lse[row] = f.lse;
  }
}

}  // namespace flashcore::cpu
