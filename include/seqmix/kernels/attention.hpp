// SPDX-License-Identifier: MIT
// Flash-style softmax attention engine (docs/math.md §5): the shared kernel behind
// mixers/softmax_attention.hpp and mixers/sliding_window_attention.hpp.
//
//   logit_tj = s q_t · k_j                for j <= t and t - j < W   (W = ∞ when absent)
//   o_t = Σ_j exp(logit_tj - m_t) v_j / (Σ_j exp(logit_tj - m_t) + [exp(sink_h - m_t)])
//
// Legend: B batch, T tokens, H query heads, Hkv key/value heads (GQA: query head h reads kv
// head h / (H / Hkv)), K key dim, V value dim, W window, L cached tokens, Bq query tile,
// Bk key tile (the mixer's chunk_size).
//
// Forms and cost (per query head):
//  - tiles (prefill / training): for every query tile of Bq rows, walk the key tiles it can see
//    with a running max m and sum l per query row (online softmax); S = K·(sQ)ᵀ and O += P·V go
//    through register-blocked SIMD micro-kernels. Time O(T·min(T, W)·(K+V)), memory
//    O(Bq·(K + V + Bk)) scratch per thread: no T×T matrix ever exists.
//  - decode (one query row per head against L cached keys): memory-bound sweep over the cache,
//    online softmax in blocks of 64 keys, the query heads of a GQA group up to 4 at a time
//    sharing each key and value load; time O(min(L, W)·(K+V)), no allocation.
//    decode_group runs one GQA group in one piece; run_row_jobs (split-KV, flash-decoding) cuts
//    each (sequence, kv head)'s keys into up to 16 splits of >= 512 keys (a function of the key
//    count, rows and V only), computes the partial (m, l, acc) of every split as its own work
//    item and merges them in split order: thread-parallel at B·Hkv = 1, bitwise identical for
//    any thread count. The same path takes a short prefill (a few tokens × G heads of rows with
//    their own causal limits) without padding it to a 64-row query tile.
//
// Layout trick of the tile kernel: scores are computed transposed, S^T [Bk, Bq], with queries
// along the SIMD lanes. Then the row max, exp and row sum of the online softmax are plain
// lane-wise operations over key rows (no horizontal reductions), Q is the only operand that is
// packed (once per query tile, scaled by s), and K and V are read in place from their strided
// [T, H, D] rows: a broadcast of k[j][d] times a vector of 16 queries' q[d].
//
// Causality and non-finite inputs: a tile's P·V reads, per query row, only the values of the keys
// that row sees (the causal diagonal and the window edge are a band, not zeros multiplied in), so
// a NaN or inf key or value at token t never reaches an output before t (nor one whose window
// excludes t). A visible NaN score (a NaN key, or an inf one, whose score is inf - inf) makes
// its row's output NaN in the tile form and in decode alike: IEEE propagation, never a silently
// dropped key.
//
// Determinism: every (segment, query tile) work item is computed by one thread in a fixed order,
// so results are bitwise identical for any thread count.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <new>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include <seqmix/core/parallel.hpp>
#include <seqmix/core/simd.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/core/workspace.hpp>

namespace seqmix::kernels::attention {

/// One attention problem of a single query head: nq query rows at key positions
/// q_pos0 .. q_pos0 + nq - 1 against the keys 0 .. q_pos0 + nq - 1 (causal, optional window).
template <class T>
struct segment {
  const T* q = nullptr;  // q rows: [nq, K], row stride q_stride
  index_t q_stride = 0;
  const T* k = nullptr;  // key rows: [q_pos0 + nq, K], row stride k_stride
  index_t k_stride = 0;
  const T* v = nullptr;  // value rows: [q_pos0 + nq, V], row stride v_stride
  index_t v_stride = 0;
  T* o = nullptr;  // output rows: [nq, V], row stride o_stride
  index_t o_stride = 0;
  index_t nq = 0;                                // query rows
  index_t q_pos0 = 0;                            // key index of the first query's own key
  T sink = -std::numeric_limits<T>::infinity();  // sink logit (-inf: no sink)
};

/// Parameters shared by all segments of a call.
template <class T>
struct params {
  index_t key_dim = 0;    // K
  index_t value_dim = 0;  // V
  T scale = T(1);         // s
  index_t window = 0;     // W (0: unbounded)
  index_t key_tile = 64;  // Bk
};

namespace detail {

template <class T>
using batch = simd::batch<T>;
template <class T>
inline constexpr index_t L = simd::lanes<T>;

// Query tile: QV vectors of queries (64 floats / 32 doubles on AVX-512).
#ifndef SEQMIX_ATTN_QV
#define SEQMIX_ATTN_QV 4
#define SEQMIX_ATTN_RK 6
#define SEQMIX_ATTN_RQ 8
#define SEQMIX_ATTN_CV 2
#endif
inline constexpr index_t qv = SEQMIX_ATTN_QV;
template <class T>
inline constexpr index_t bq = qv* L<T>;
// Micro-kernel register blocks: RK key rows x QV query vectors for S, RQ query rows x CV value
// vectors for P·V (24 and 16 accumulators: fit the 32 AVX-512 registers with the operands).
// Measured on the 2-core Zen 4 VM, T = 2048, 1 thread (GFLOP/s at D = 64 / 128): (QV,RK,RQ,CV) =
// (4,6,8,2) 85 / 86, (4,6,4,4) 78 / 74, (2,12,8,2) 83 / 78, (4,6,16,1) 73 / 70, (4,4,4,4) 70 / 67.
// Key tile (chunk_size) 64..256 changes < 3 %. Overridable for experiments only.
#if defined(__GNUC__)
#define SEQMIX_ATTN_INLINE __attribute__((always_inline))
#else
#define SEQMIX_ATTN_INLINE
#endif
inline constexpr index_t rk = SEQMIX_ATTN_RK;
inline constexpr index_t rq = SEQMIX_ATTN_RQ;
inline constexpr index_t cv = SEQMIX_ATTN_CV;

/// S^T[r][0:Bq] = Σ_d k[r][d] · qt[d][0:Bq] for R key rows (qt: [K, Bq], packed, scaled).
template <class T, index_t R>
inline void scores_block(const T* k, index_t k_stride, const T* qt, index_t key_dim, T* st) {
  constexpr auto NR = static_cast<std::size_t>(R), NC = static_cast<std::size_t>(qv);
  std::array<std::array<batch<T>, NC>, NR> acc;
  for (std::size_t r = 0; r < NR; ++r)
    for (std::size_t c = 0; c < NC; ++c) acc[r][c] = batch<T>(T(0));
  for (index_t d = 0; d < key_dim; ++d) {
    std::array<batch<T>, NC> qd;
    for (std::size_t c = 0; c < NC; ++c) qd[c] = simd::load(qt + d * bq<T> + index_t(c) * L<T>);
    for (std::size_t r = 0; r < NR; ++r) {
      const batch<T> kr(k[index_t(r) * k_stride + d]);
      for (std::size_t c = 0; c < NC; ++c) acc[r][c] = simd::fma(kr, qd[c], acc[r][c]);
    }
  }
  for (std::size_t r = 0; r < NR; ++r)
    for (std::size_t c = 0; c < NC; ++c)
      simd::store(st + index_t(r) * bq<T> + index_t(c) * L<T>, acc[r][c]);
}

/// acc[i][c0:c0+CV·L] = alpha[i] · acc[i][..] + Σ_j pt[j][i] · v[j][c0:..] for RQ rows i, where
/// row i takes the keys lo0 + i <= j <= d0 + i of the kn in the tile (tile-relative: d0 is row
/// 0's own key, lo0 the first key its window sees; d0 >= kn - 1 and lo0 <= 0 in interior tiles).
/// The keys a row may not see are skipped, not multiplied by their zero probability: a future
/// (or out-of-window) value of NaN or inf would make 0 · NaN.
/// Band = false (tiles every row sees whole: no causal diagonal, no window edge) is the plain
/// product, with nothing but the full loop in the function.
template <class T, index_t CV, bool Band>
inline void pv_block(const T* pt, index_t kn, index_t lo0, index_t d0, const T* v, index_t v_stride,
                     const T* alpha, T* acc, index_t acc_stride) {
  constexpr auto NR = static_cast<std::size_t>(rq), NC = static_cast<std::size_t>(CV);
  std::array<std::array<batch<T>, NC>, NR> a;
  for (std::size_t r = 0; r < NR; ++r) {
    const batch<T> al(alpha[r]);
    for (std::size_t c = 0; c < NC; ++c)
      a[r][c] = al * simd::load(acc + index_t(r) * acc_stride + index_t(c) * L<T>);
  }
  // keys [jb, je) reach some row; [fb, fe) reach all of them; the rest is the band's two edges
  index_t jb = 0, je = kn, fb = 0, fe = kn;
  if constexpr (Band) {
    jb = std::clamp<index_t>(lo0, 0, kn), je = std::clamp<index_t>(d0 + rq, jb, kn);
    fb = std::clamp<index_t>(lo0 + rq - 1, jb, je);
    fe = std::clamp<index_t>(d0 + 1, fb, je);
  }
  // one key of the band's edges: rows rmin .. rmax see it (the row loop unrolls like the
  // full one, so the accumulators stay in registers; the test is per row, not per element)
  auto partial = [&](index_t j) SEQMIX_ATTN_INLINE {
    std::array<batch<T>, NC> vj;
    for (std::size_t c = 0; c < NC; ++c) vj[c] = simd::load(v + j * v_stride + index_t(c) * L<T>);
    const index_t rmin = j - d0, rmax = j - lo0;
    for (std::size_t r = 0; r < NR; ++r) {
      if (index_t(r) < rmin || index_t(r) > rmax) continue;
      const batch<T> p(pt[j * bq<T> + index_t(r)]);
      for (std::size_t c = 0; c < NC; ++c) a[r][c] = simd::fma(p, vj[c], a[r][c]);
    }
  };
  if constexpr (Band) {
    for (index_t j = jb; j < fb; ++j) partial(j);
  }
  for (index_t j = fb; j < fe; ++j) {
    std::array<batch<T>, NC> vj;
    for (std::size_t c = 0; c < NC; ++c) vj[c] = simd::load(v + j * v_stride + index_t(c) * L<T>);
    for (std::size_t r = 0; r < NR; ++r) {
      const batch<T> p(pt[j * bq<T> + index_t(r)]);
      for (std::size_t c = 0; c < NC; ++c) a[r][c] = simd::fma(p, vj[c], a[r][c]);
    }
  }
  if constexpr (Band) {
    for (index_t j = fe; j < je; ++j) partial(j);
  }
  for (std::size_t r = 0; r < NR; ++r)
    for (std::size_t c = 0; c < NC; ++c)
      simd::store(acc + index_t(r) * acc_stride + index_t(c) * L<T>, a[r][c]);
}

/// exp(x) for x <= 0 that may be -inf (masked scores, rows with no key yet) or NaN (a visible
/// key of NaN or inf). Clamped first: xsimd's double exp converts its argument to int64 through
/// scalar code on AVX-512 without DQ conversions, which is undefined for -inf and NaN (UBSan);
/// exp(-1e4) is 0 in both types anyway. NaN comes back NaN, as in decode_group: a NaN score
/// makes its row's output NaN in every form (IEEE propagation, never a silently dropped key).
template <class T>
inline batch<T> exp_nonpositive(const batch<T>& x) {
  const auto nan = xsimd::isnan(x);  // (xsimd's != is the ordered compare: false for NaN)
  const batch<T> lo(T(-1e4));
  return xsimd::select(nan, x, simd::exp(xsimd::select(nan, lo, xsimd::max(x, lo))));
}

/// Per-thread scratch of the tile kernel: views of workspace memory (64-byte aligned, zeroed by
/// take()); trivially copyable.
template <class T>
struct tile_scratch {
  std::span<T> qt, st, acc, m, l, alpha;
  index_t acc_stride = 0;
  void take(workspace::frame& f, index_t key_dim, index_t value_dim, index_t key_tile) {
    acc_stride = (value_dim + L<T> - 1) / L<T> * L<T>;
    qt = f.take<T>(key_dim * bq<T>, T(0));
    st = f.take<T>(key_tile * bq<T>, T(0));
    acc = f.take<T>(bq<T> * acc_stride, T(0));
    m = f.take<T>(bq<T>, T(0));
    l = f.take<T>(bq<T>, T(0));
    alpha = f.take<T>(bq<T>, T(0));
  }
};

/// One query tile (rows i0 .. i0 + Bq - 1 of `seg`) against every key tile it can see.
template <class T>
void run_tile(const segment<T>& seg, const params<T>& p, index_t i0, tile_scratch<T>& w) {
  const index_t K = p.key_dim, V = p.value_dim, Bk = p.key_tile;
  constexpr index_t Q = bq<T>;
  static_assert(Q % rq == 0, "the query tile must be a whole number of RQ-row blocks");
  const index_t nqi = std::min(Q, seg.nq - i0);
  const T ninf = -std::numeric_limits<T>::infinity();

  // pack: qt[d][i] = s · q[i0 + i][d] (zero rows past the end of the segment)
  T* qt = w.qt.data();
  for (index_t i = 0; i < Q; ++i) {
    if (i < nqi) {
      const T* qi = seg.q + (i0 + i) * seg.q_stride;
      for (index_t d = 0; d < K; ++d) qt[d * Q + i] = p.scale * qi[d];
    } else {
      for (index_t d = 0; d < K; ++d) qt[d * Q + i] = T(0);
    }
  }
  // online-softmax state: the sink acts as one extra key of value 0 seen first
  const bool has_sink = seg.sink > ninf;
  std::fill(w.m.begin(), w.m.end(), seg.sink);
  std::fill(w.l.begin(), w.l.end(), has_sink ? T(1) : T(0));
  std::fill(w.acc.begin(), w.acc.end(), T(0));

  const index_t pos_lo = seg.q_pos0 + i0;            // key index of query row 0 of the tile
  const index_t pos_hi = seg.q_pos0 + i0 + nqi - 1;  // ... of the last real row
  const index_t ke = pos_hi + 1;
  // a window reaching past key 0 for every row is no window (and W near INT64_MAX cannot
  // overflow the index arithmetic below)
  const index_t W = p.window > 0 && p.window <= ke ? p.window : 0;
  const index_t kb = W > 0 ? std::max<index_t>(0, pos_lo - W + 1) : 0;
  T* st = w.st.data();
  const index_t acc_stride = w.acc_stride;
  const index_t Vfull = V / (cv * L<T>)*(cv * L<T>);
  const index_t Vvec = V / L<T> * L<T>;

  std::array<batch<T>, static_cast<std::size_t>(qv)> iota;
  {
    alignas(64) std::array<T, static_cast<std::size_t>(Q)> idx{};
    for (index_t i = 0; i < Q; ++i) idx[static_cast<std::size_t>(i)] = T(i);
    for (std::size_t c = 0; c < iota.size(); ++c)
      iota[c] = batch<T>::load_aligned(idx.data() + index_t(c) * L<T>);
  }

  for (index_t j0 = kb; j0 < ke; j0 += Bk) {
    const index_t kn = std::min(Bk, ke - j0);
    const T* kj = seg.k + j0 * seg.k_stride;
    // phase 1: S^T = K_tile · (sQ)^T
    index_t j = 0;
    for (; j + rk <= kn; j += rk)
      scores_block<T, rk>(kj + j * seg.k_stride, seg.k_stride, qt, K, st + j * Q);
    for (; j < kn; ++j) scores_block<T, 1>(kj + j * seg.k_stride, seg.k_stride, qt, K, st + j * Q);
    // phase 2: mask (causal diagonal, window edge): key j0+j is visible to row i iff
    //   j0 + j <= pos_lo + i  and  j0 + j > pos_lo + i - W
    const bool diag = j0 + kn - 1 > pos_lo;
    const bool edge = W > 0 && j0 <= pos_hi - W;
    if (diag || edge) {
      for (j = 0; j < kn; ++j) {
        // row i visible iff lo <= i < hi, with lo = key - pos_lo, hi = lo + W (clamped: exact)
        const index_t rel = j0 + j - pos_lo;
        const T lo = T(std::clamp<index_t>(rel, -1, Q + 1));
        const T hi = W > 0 ? T(std::clamp<index_t>(rel + W, -1, Q + 1)) : T(Q + 1);
        for (index_t c = 0; c < qv; ++c) {
          T* sp = st + j * Q + c * L<T>;
          const auto& ic = iota[static_cast<std::size_t>(c)];
          const auto vis = (ic >= batch<T>(lo)) && (ic < batch<T>(hi));
          simd::store(sp, xsimd::select(vis, simd::load(sp), batch<T>(ninf)));
        }
      }
    }
    // phase 3: online softmax over the kn key rows, lane-wise over queries
    for (index_t c = 0; c < qv; ++c) {
      const index_t off = c * L<T>;
      const batch<T> m_old = simd::load(w.m.data() + off);
      batch<T> m_new = m_old;
      for (j = 0; j < kn; ++j) m_new = xsimd::max(m_new, simd::load(st + j * Q + off));
      // rows that saw no visible key yet keep m = -inf; subtract 0 instead (exp(-inf) = 0)
      const batch<T> m_use = xsimd::select(m_new == batch<T>(ninf), batch<T>(T(0)), m_new);
      const batch<T> alpha = exp_nonpositive<T>(m_old - m_use);
      batch<T> sum(T(0));
      for (j = 0; j < kn; ++j) {
        T* sp = st + j * Q + off;
        const batch<T> e = exp_nonpositive<T>(simd::load(sp) - m_use);
        simd::store(sp, e);
        sum += e;
      }
      simd::store(w.l.data() + off, simd::fma(simd::load(w.l.data() + off), alpha, sum));
      simd::store(w.m.data() + off, m_new);
      simd::store(w.alpha.data() + off, alpha);
    }
    // phase 4: acc = diag(alpha) · acc + P · V_tile. Each row reads only the values it sees
    // (d0: tile-relative key of row i's position; lo0: the first key of its window), so no
    // future or out-of-window value is ever read: masked products are skipped, not zeroed.
    const T* vj = seg.v + j0 * seg.v_stride;
    for (index_t i = 0; i < Q; i += rq) {
      T* acc_i = w.acc.data() + i * acc_stride;
      const index_t d0 = pos_lo + i - j0;
      const index_t lo0 = W > 0 ? d0 - W + 1 : -(kn + rq);  // no window: every row from key 0
      const T* al = w.alpha.data() + i;
      index_t c0 = 0;
      for (; c0 < Vfull; c0 += cv * L<T>) {
        if (diag || edge) {
          pv_block<T, cv, true>(st + i, kn, lo0, d0, vj + c0, seg.v_stride, al, acc_i + c0,
                                acc_stride);
        } else {
          pv_block<T, cv, false>(st + i, kn, lo0, d0, vj + c0, seg.v_stride, al, acc_i + c0,
                                 acc_stride);
        }
      }
      for (; c0 < Vvec; c0 += L<T>) {
        if (diag || edge) {
          pv_block<T, 1, true>(st + i, kn, lo0, d0, vj + c0, seg.v_stride, al, acc_i + c0,
                               acc_stride);
        } else {
          pv_block<T, 1, false>(st + i, kn, lo0, d0, vj + c0, seg.v_stride, al, acc_i + c0,
                                acc_stride);
        }
      }
      for (; c0 < V; ++c0) {  // scalar tail of odd value dims
        for (index_t r = 0; r < rq; ++r) {
          T a = w.alpha[static_cast<std::size_t>(i + r)] * acc_i[r * acc_stride + c0];
          const index_t jb = std::clamp<index_t>(lo0 + r, 0, kn);
          const index_t jn = std::clamp<index_t>(d0 + r + 1, jb, kn);
          for (j = jb; j < jn; ++j) a += st[j * Q + i + r] * vj[j * seg.v_stride + c0];
          acc_i[r * acc_stride + c0] = a;
        }
      }
    }
  }
  // epilogue: o = acc / l
  for (index_t i = 0; i < nqi; ++i) {
    const T inv = T(1) / w.l[static_cast<std::size_t>(i)];
    const T* a = w.acc.data() + i * acc_stride;
    T* oi = seg.o + (i0 + i) * seg.o_stride;
    for (index_t c = 0; c < V; ++c) oi[c] = a[c] * inv;
  }
}

}  // namespace detail

/// Query tile size Bq of the tile kernel for T (a multiple of the SIMD width).
template <class T>
constexpr index_t query_tile() {
  return detail::bq<T>;
}

/// Runs every segment (all query tiles) in one parallel region. Work items are
/// (segment, query tile), ordered per segment 0, n-1, 1, n-2, ... so that a static split of the
/// list balances the causal triangle.
/// Scratch (the item list and one tile_scratch per thread) comes from the calling thread's
/// workspace arena, taken before the parallel region (workers only use their slot's): a repeated
/// call of one shape allocates nothing.
template <class T>
void run_tiles(std::span<const segment<T>> segs, const params<T>& p) {
  constexpr index_t Q = detail::bq<T>;
  struct item {
    index_t seg, i0;
  };
  index_t total = 0;
  for (const auto& sg : segs) total += (sg.nq + Q - 1) / Q;
  if (total == 0) return;
  auto frame = thread_workspace().scope();
  const std::span<item> items = frame.take<item>(total);
  std::size_t nitems = 0;
  for (index_t s = 0; s < static_cast<index_t>(segs.size()); ++s) {
    const index_t nt = (segs[static_cast<std::size_t>(s)].nq + Q - 1) / Q;
    for (index_t a = 0, b = nt - 1; a <= b; ++a, --b) {
      items[nitems++] = {s, a * Q};
      if (a != b) items[nitems++] = {s, b * Q};
    }
  }
  // A key tile longer than any tile's key range changes nothing (every tile then sees its keys
  // in one piece) but sizes the scratch: clamp it to the most keys a query tile can see.
  params<T> pc = p;
  index_t most_keys = 1;
  for (const auto& sg : segs) most_keys = std::max(most_keys, sg.q_pos0 + sg.nq);
  pc.key_tile = std::min(p.key_tile, most_keys);
  const int slots = max_slots();
  const std::span<detail::tile_scratch<T>> scratch = frame.take<detail::tile_scratch<T>>(slots);
  for (auto& w : scratch) {
    ::new (static_cast<void*>(&w)) detail::tile_scratch<T>{};
    w.take(frame, pc.key_dim, pc.value_dim, pc.key_tile);
  }
  parallel_for_with_slot(static_cast<index_t>(nitems), [&](index_t n, int tid) {
    const item& it = items[static_cast<std::size_t>(n)];
    detail::run_tile(segs[static_cast<std::size_t>(it.seg)], pc, it.i0,
                     scratch[static_cast<std::size_t>(tid)]);
  });
}

/// The same from a vector of segments (the signature before the workspace).
template <class T>
void run_tiles(const std::vector<segment<T>>& segs, const params<T>& p) {
  run_tiles<T>(std::span<const segment<T>>(segs), p);
}

/// A run of n contiguous cached key/value rows (row strides k_stride / v_stride).
template <class T>
struct key_run {
  const T* k = nullptr;
  const T* v = nullptr;
  index_t n = 0;
  index_t k_stride = 0, v_stride = 0;
};

// ---- split-KV decode (flash-decoding) -------------------------------------------------------
//
// A row job is the query rows of one (sequence, kv head): ntok tokens × nhead heads of a GQA
// group (decode: ntok = 1; a short prefill into a long cache: a few tokens). Token t's rows see
// the keys lo_t <= j < pos0 + t + 1 (lo_t = pos0 + t - W + 1 with a window, else 0) of the
// concatenated runs. The job's key range is cut into splits whose number and boundaries depend
// only on the number of keys, the rows and V (never on the thread count); each (job, split) is
// one work item that computes the unnormalised partial state (m, l, acc[V]) of every row over
// its keys, and the partials are then merged in split order 0, 1, 2, ... by one thread per job:
// results are bitwise identical for any thread count. Cost: the keys are read once per job (not
// once per query tile of 64 rows as in run_tiles); the merge is O(splits · rows · V).

/// The rows and keys of one row job.
template <class T>
struct row_job {
  const T* q = nullptr;  // row (t, g) at q + t·q_tstride + g·q_hstride, [K]
  index_t q_tstride = 0, q_hstride = 0;
  T* o = nullptr;  // row (t, g) at o + t·o_tstride + g·o_hstride, [V]
  index_t o_tstride = 0, o_hstride = 0;
  index_t ntok = 1, nhead = 1;
  index_t pos0 = 0;                // key index of token 0's own key
  std::array<key_run<T>, 2> runs;  // keys 0 .. pos0 + ntok - 1, in order (a ring wraps once)
  int nruns = 1;
  const T* sinks = nullptr;  // [nhead] sink logits, or nullptr
};

namespace detail {

inline constexpr index_t decode_block = 64;  // keys per online-softmax block
inline constexpr index_t split_min = 512;    // a split holds at least this many keys ...
inline constexpr index_t split_max = 16;     // ... and a job has at most this many splits

/// Padded row length of a partial accumulator.
template <class T>
constexpr index_t acc_pad(index_t V) {
  return (V + L<T> - 1) / L<T> * L<T>;
}

/// First key and end of the keys any row of `job` sees.
template <class T>
std::pair<index_t, index_t> job_keys(const row_job<T>& job, index_t W) {
  const index_t end = job.pos0 + job.ntok;
  const index_t first = W > 0 ? std::max<index_t>(0, job.pos0 - W + 1) : 0;
  return {first, end};
}

/// Keys per split of a job (a multiple of the block), from its key count, rows and V only;
/// `cap` elements of scratch bound splits · rows · (V + 2). Returns 0 when even one split's
/// partials do not fit (the job then runs in one piece straight into o).
inline index_t split_keys(index_t nkeys, index_t rows, index_t vpad, index_t cap) {
  const index_t per_split = rows * (vpad + 2);
  if (per_split > cap) return 0;
  index_t ns = std::clamp<index_t>(nkeys / split_min, 1, split_max);
  ns = std::min(ns, cap / per_split);
  const index_t per = (nkeys + ns - 1) / ns;
  return std::max<index_t>(decode_block, (per + decode_block - 1) / decode_block * decode_block);
}

/// Σ a[i]·b[i], forced inline: simd::dot as an out-of-line call per key cost the row path ~25 %
/// of its time at L = 8192 (profile), since the call blocks overlapping consecutive keys.
template <class T>
SEQMIX_ATTN_INLINE inline T dot_inline(const T* a, const T* b, index_t n) {
  batch<T> acc0(T(0)), acc1(T(0));
  index_t i = 0;
  for (; i + 2 * L<T> <= n; i += 2 * L<T>) {
    acc0 = simd::fma(simd::load(a + i), simd::load(b + i), acc0);
    acc1 = simd::fma(simd::load(a + i + L<T>), simd::load(b + i + L<T>), acc1);
  }
  for (; i + L<T> <= n; i += L<T>) acc0 = simd::fma(simd::load(a + i), simd::load(b + i), acc0);
  T sum = simd::reduce_sum(acc0 + acc1);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

#if defined(__AVX512F__)
/// out[i] = Σ_lanes r[i] for 16 vectors: pairs of rows added within 128-bit lanes (unpack,
/// shuffle), then the four 128-bit lanes (shuffle_f32x4): 15 adds and 30 shuffles for 16 sums.
inline __m512 reduce16(const batch<float>* r) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i) {
    const __m512 a = r[2 * i], b = r[2 * i + 1];
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  }
  for (int i = 0; i < 4; ++i) {
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0xEE));
  }
  const __m512 v01 =
      _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x44), _mm512_shuffle_f32x4(u[0], u[1], 0xEE));
  const __m512 v23 =
      _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x44), _mm512_shuffle_f32x4(u[2], u[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(v01, v23, 0x88), _mm512_shuffle_f32x4(v01, v23, 0xDD));
}
#endif

/// Query rows that share one pass over a decode block (the heads of one token, which see the
/// same keys): each key vector loaded serves this many rows in the scores, each value vector
/// up to this many in P·V. A GQA step (4-8 query heads per kv head) was compute-bound with one
/// row per pass: G = 8, K = V = 64, 1 thread, 1k / 32k keys: 34 / 1490 µs -> 26 / 1165 µs.
#if defined(__AVX512F__)
inline constexpr index_t group_rows = 4;
#else
inline constexpr index_t group_rows = 2;
#endif

/// s[i·decode_block + j] = scale · (q_i · k_j) for R query rows q_i and the kn keys
/// k_j = k + j·ks of a decode block. A pass holds L accumulators, (L/R keys) × (R rows), one per
/// (row, key) over the vectors of the K dimension, so each key vector loaded serves R rows;
/// the L sums are then reduced together (AVX-512 f32: by one transpose-and-add tree, reduce16,
/// rather than one horizontal reduction per sum; xsimd 8.1's haddp would do it, but its AVX-512
/// version returns the lanes permuted). That reduction was most of the score cost at K = 64.
/// The tree treats every lane alike, so a score does not depend on R; the last kn mod (L/R)
/// keys take dot_inline. A score depends only on kn and its index in the block (never on
/// threads).
template <class T, index_t R>
SEQMIX_ATTN_INLINE inline void block_scores(const T* const* q, const T* k, index_t ks, index_t K,
                                            index_t kn, T scale, T* s) {
  constexpr index_t Lt = L<T>, kp = Lt / R, blk = decode_block;
  static_assert(R >= 1 && kp * R == Lt, "rows per pass must divide the lanes");
  const index_t kv = K / Lt * Lt;
  index_t j = 0;
  if (kv > 0) {
    for (; j + kp <= kn; j += kp) {
      batch<T> acc[static_cast<std::size_t>(Lt)];
      for (auto& a : acc) a = batch<T>(T(0));
      for (index_t d = 0; d < kv; d += Lt) {
        batch<T> qd[static_cast<std::size_t>(R)];
        for (index_t i = 0; i < R; ++i) qd[i] = simd::load(q[i] + d);
        for (index_t u = 0; u < kp; ++u) {
          const batch<T> kd = simd::load(k + (j + u) * ks + d);
          for (index_t i = 0; i < R; ++i) acc[i * kp + u] = simd::fma(qd[i], kd, acc[i * kp + u]);
        }
      }
      alignas(64) T r[static_cast<std::size_t>(Lt)];
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<T, float>) {
        _mm512_store_ps(r, reduce16(acc));
      } else
#endif
      {
        for (index_t u = 0; u < Lt; ++u) r[u] = simd::reduce_sum(acc[u]);
      }
      if (kv < K) {  // the K tail, per (row, key)
        for (index_t i = 0; i < R; ++i) {
          for (index_t u = 0; u < kp; ++u) {
            const T* ku = k + (j + u) * ks;
            for (index_t d = kv; d < K; ++d) r[i * kp + u] += q[i][d] * ku[d];
          }
        }
      }
      (batch<T>::load_aligned(r) * batch<T>(scale)).store_aligned(r);
      for (index_t i = 0; i < R; ++i) std::copy_n(r + i * kp, kp, s + i * blk + j);
    }
  }
  for (; j < kn; ++j) {
    for (index_t i = 0; i < R; ++i) s[i * blk + j] = scale * dot_inline(q[i], k + j * ks, K);
  }
}

/// Accumulator vectors one P·V pass holds in registers (of 32 on AVX-512, 16 on AVX2).
#if defined(__AVX512F__)
inline constexpr index_t pv_budget = 16;
#else
inline constexpr index_t pv_budget = 8;
#endif

/// acc_i[c0 .. c0 + NV·L) = alpha_i · acc_i + Σ_j p_i[j] · v_j for RP rows (p_i = p + i·blk):
/// NV vectors of each row in registers, every value vector loaded once for the RP rows.
template <class T, index_t NV, index_t RP>
SEQMIX_ATTN_INLINE inline void pv_pass(T* const* acc, const T* alpha, const T* p, index_t kn,
                                       const T* v, index_t vs, index_t c0) {
  constexpr index_t Lt = L<T>, blk = decode_block;
  batch<T> a[static_cast<std::size_t>(RP)][static_cast<std::size_t>(NV)];
  for (index_t i = 0; i < RP; ++i) {
    const batch<T> al(alpha[i]);
    for (index_t c = 0; c < NV; ++c) a[i][c] = al * simd::load(acc[i] + c0 + c * Lt);
  }
  for (index_t j = 0; j < kn; ++j) {
    const T* vr = v + j * vs + c0;
    batch<T> vc[static_cast<std::size_t>(NV)];
    for (index_t c = 0; c < NV; ++c) vc[c] = simd::load(vr + c * Lt);
    for (index_t i = 0; i < RP; ++i) {
      const batch<T> pj(p[i * blk + j]);
      for (index_t c = 0; c < NV; ++c) a[i][c] = simd::fma(pj, vc[c], a[i][c]);
    }
  }
  for (index_t i = 0; i < RP; ++i) {
    for (index_t c = 0; c < NV; ++c) simd::store(acc[i] + c0 + c * Lt, a[i][c]);
  }
}

/// acc_i = alpha_i · acc_i + Σ_j p[i·decode_block + j] · v_j for R rows over the kn values
/// v_j = v + j·vs of a block. Columns go in chunks as wide as the register budget allows (up
/// to 16 vectors; V = 128: 8 vectors × 2 rows per pass) so that a pass reads whole value rows:
/// with chunks of half a row (the first pass's stream skipping every other 256 bytes) the
/// V = 128 step at 32k keys ran ~20 % slower. A row's arithmetic (alpha · acc, then one FMA
/// chain per element, keys in order) does not depend on R.
template <class T, index_t R>
SEQMIX_ATTN_INLINE inline void block_pv(T* const* acc, const T* alpha, const T* p, index_t kn,
                                        const T* v, index_t vs, index_t V) {
  constexpr index_t Lt = L<T>, blk = decode_block;
  index_t c0 = 0;
  auto chunks = [&]<index_t NV>() {
    constexpr index_t RP = std::min(R, std::max<index_t>(1, pv_budget / NV));
    for (; c0 + NV * Lt <= V; c0 += NV * Lt) {
      for (index_t i = 0; i < R; i += RP) {
        pv_pass<T, NV, RP>(acc + i, alpha + i, p + i * blk, kn, v, vs, c0);
      }
    }
  };
  if constexpr (pv_budget >= 16) {
    if (V >= 16 * Lt) chunks.template operator()<16>();
  }
  if (V - c0 >= 8 * Lt) chunks.template operator()<8>();
  chunks.template operator()<4>();
  if (c0 < V) {  // the rest of V (< 4 vectors, and a scalar tail), row by row
    for (index_t i = 0; i < R; ++i) {
      simd::scale(acc[i] + c0, alpha[i], V - c0);
      for (index_t j = 0; j < kn; ++j)
        simd::axpy(acc[i] + c0, p[i * blk + j], v + j * vs + c0, V - c0);
    }
  }
}

/// max of s[0 .. n), and `bad` = whether any is NaN or +inf (vectorised: the scalar loop's
/// compare-and-or chain was a quarter of the decode time at K = 64). A score is bad iff
/// !(x < +inf), one ordered compare for both cases.
template <class T>
SEQMIX_ATTN_INLINE inline T block_max(const T* s, index_t n, bool& bad) {
  constexpr index_t Lt = L<T>;
  const T pinf = std::numeric_limits<T>::infinity();
  const batch<T> vinf(pinf);
  batch<T> vmax(-pinf);
  auto ok = batch<T>(T(0)) < vinf;  // all true
  index_t j = 0;
  for (; j + Lt <= n; j += Lt) {
    const batch<T> v = simd::load(s + j);
    ok = ok & (v < vinf);
    vmax = xsimd::max(vmax, v);
  }
  T m = simd::reduce_max(vmax);
  bool b = !xsimd::all(ok);
  for (; j < n; ++j) {
    b = b || !(s[j] < pinf);
    m = std::max(m, s[j]);
  }
  bad = b;
  return m;
}

/// One online-softmax step of R rows (MoBA's and NSA's rows against a key tile, keys along the
/// lanes) whose scores are all visible or already -inf: row r's nvec vectors at s + r·ld are
/// replaced by p = exp(s - m_new), *m[r] and *l[r] updated (l = l·alpha + Σp), alpha[r] =
/// exp(m_old - m_new) (0 when m_old = -inf), for all R rows by one vector exp. Each row's max is
/// a shuffle tree; a NaN score may or may not win it, and exp(s - max) then carries the NaN
/// into the row's sum either way (NaN in, NaN out).
template <class T, index_t R>
SEQMIX_ATTN_INLINE inline void rows_online_softmax(T* s, index_t ld, index_t nvec, T* const* m,
                                                   T* const* l, T* alpha) {
  static_assert(R >= 1 && R <= L<T>, "one alpha lane per row");
  const T ninf = -std::numeric_limits<T>::infinity();
  alignas(64) std::array<T, static_cast<std::size_t>(L<T>)> arg{}, al{};
  std::array<T, static_cast<std::size_t>(R)> mu{};
  for (index_t r = 0; r < R; ++r) {
    const T* sr = s + r * ld;
    batch<T> mv = simd::load(sr);
    for (index_t c = 1; c < nvec; ++c) mv = xsimd::max(mv, simd::load(sr + c * L<T>));
    const T m_old = *m[r], m_new = std::max(m_old, simd::reduce_max(mv));
    const T m_use = m_new == ninf ? T(0) : m_new;
    *m[r] = m_new;
    mu[static_cast<std::size_t>(r)] = m_use;
    arg[static_cast<std::size_t>(r)] = m_old - m_use;  // -inf when m_old is: alpha 0
  }
  exp_nonpositive<T>(batch<T>::load_aligned(arg.data())).store_aligned(al.data());
  for (index_t r = 0; r < R; ++r) {
    T* sr = s + r * ld;
    const batch<T> mv(mu[static_cast<std::size_t>(r)]);
    batch<T> sum(T(0));
    for (index_t c = 0; c < nvec; ++c) {
      const batch<T> e = exp_nonpositive<T>(simd::load(sr + c * L<T>) - mv);
      simd::store(sr + c * L<T>, e);
      sum += e;
    }
    alpha[r] = al[static_cast<std::size_t>(r)];
    *l[r] = *l[r] * alpha[r] + simd::reduce_sum(sum);
  }
}

/// One online-softmax step of R rows of one token (rows r .. r + R - 1 of a job: the same
/// visible keys) over the kn keys at kj / vj: scores, then per row the block max (a NaN or +inf
/// score makes the row NaN: kept out of max and exp, whose argument conversion is UB for NaN;
/// such a row, or one NaN already, takes p = 0 and alpha = 1, leaving its accumulator as it
/// is), exp, l, and the P·V update of all R rows in one pass.
template <class T, index_t R>
void rows_block(const T* const* q, T* const* acc, T* m, T* l, const T* kj, index_t ks, const T* vj,
                index_t vs, index_t kn, const params<T>& p) {
  constexpr index_t blk = decode_block;
  const T ninf = -std::numeric_limits<T>::infinity();
  alignas(64) std::array<T, static_cast<std::size_t>(R * blk)> s;
  block_scores<T, R>(q, kj, ks, p.key_dim, kn, p.scale, s.data());
  // exp of arguments known to be <= 0 or -inf, never NaN (bad rows are taken out first): the
  // clamp keeps -inf out of xsimd's exp, whose double path converts it to an integer
  const batch<T> lo(T(-1e4));
  const auto exp_le0 = [&](const batch<T>& x) { return xsimd::exp(xsimd::max(x, lo)); };
  alignas(64) T arg[static_cast<std::size_t>(L<T>)] = {};  // lanes >= R
  alignas(64) T alpha[static_cast<std::size_t>(L<T>)];
  T m_new[static_cast<std::size_t>(R)];
  bool live[static_cast<std::size_t>(R)];
  for (index_t i = 0; i < R; ++i) {
    bool bad = false;
    const T bmax = block_max(s.data() + i * blk, kn, bad);
    live[i] = !bad && m[i] == m[i];
    m_new[i] = std::max(m[i], bmax);
    const T m_use = m_new[i] == ninf ? T(0) : m_new[i];
    arg[i] = live[i] ? m[i] - m_use : T(0);  // alpha = exp(m_old - m_new), one vector exp
  }
  exp_le0(batch<T>::load_aligned(arg)).store_aligned(alpha);
  for (index_t i = 0; i < R; ++i) {
    T* si = s.data() + i * blk;
    if (!live[i]) {  // p = 0 and alpha = 1 (arg 0): the P·V pass leaves the row as it is
      m[i] = std::numeric_limits<T>::quiet_NaN();
      std::fill_n(si, kn, T(0));
      continue;
    }
    const batch<T> mu(m_new[i] == ninf ? T(0) : m_new[i]);
    simd::transform(si, si, kn, [&](const batch<T>& x) { return exp_le0(x - mu); });
    l[i] = l[i] * alpha[i] + simd::sum(si, kn);
    m[i] = m_new[i];
  }
  block_pv<T, R>(acc, alpha, s.data(), kn, vj, vs, p.value_dim);
}

/// Partial state of rows [r0, r1) (row r = t·nhead + g) of `job` over keys [j0, j1):
/// m[r] (NaN after a NaN or +inf score, -inf when no key was visible), l[r] and the
/// unnormalised acc row r at acc + t·a_ts + g·a_hs (indexing m and l by r - r0). The heads of
/// one token go through a block group_rows at a time (they see the same keys).
/// The keys are the nruns runs at `runs` (job.runs, or a caller's longer list: decode_group).
template <class T>
void partial_rows(const row_job<T>& job, const key_run<T>* runs, int nruns, const params<T>& p,
                  index_t r0, index_t r1, index_t j0, index_t j1, T* acc, index_t a_ts,
                  index_t a_hs, T* m, T* l) {
  constexpr index_t blk = decode_block, RM = group_rows;
  const T ninf = -std::numeric_limits<T>::infinity();
  const index_t V = p.value_dim, W = p.window, G = job.nhead;
  for (index_t r = r0; r < r1; ++r) {
    m[r - r0] = ninf;
    l[r - r0] = T(0);
    std::fill_n(acc + (r / G) * a_ts + (r % G) * a_hs, V, T(0));
  }
  index_t run_start = 0;
  for (int ri = 0; ri < nruns; ++ri) {
    const key_run<T>& run = runs[ri];
    const index_t rb = std::max(j0, run_start), re = std::min(j1, run_start + run.n);
    for (index_t jb = rb; jb < re; jb += blk) {
      const index_t je = std::min(jb + blk, re);
      for (index_t r = r0; r < r1;) {
        const index_t t = r / G, g = r % G;
        const index_t same = std::min(r1 - r, G - g);  // rows left of token t
        const index_t n = same >= RM ? RM : same >= 2 ? 2 : 1;
        const index_t hi = job.pos0 + t + 1;
        const index_t lo = W > 0 ? job.pos0 + t - W + 1 : 0;
        const index_t a = std::max(jb, lo), e = std::min(je, hi);
        if (a < e) {
          const T* kj = run.k + (a - run_start) * run.k_stride;
          const T* vj = run.v + (a - run_start) * run.v_stride;
          std::array<const T*, static_cast<std::size_t>(RM)> qs;
          std::array<T*, static_cast<std::size_t>(RM)> as;
          for (index_t i = 0; i < n; ++i) {
            qs[static_cast<std::size_t>(i)] = job.q + t * job.q_tstride + (g + i) * job.q_hstride;
            as[static_cast<std::size_t>(i)] = acc + t * a_ts + (g + i) * a_hs;
          }
          T* mr = m + (r - r0);
          T* lr = l + (r - r0);
          if (n == RM) {
            rows_block<T, RM>(qs.data(), as.data(), mr, lr, kj, run.k_stride, vj, run.v_stride,
                              e - a, p);
          } else if (n == 2) {
            rows_block<T, 2>(qs.data(), as.data(), mr, lr, kj, run.k_stride, vj, run.v_stride,
                             e - a, p);
          } else {
            rows_block<T, 1>(qs.data(), as.data(), mr, lr, kj, run.k_stride, vj, run.v_stride,
                             e - a, p);
          }
        }
        r += n;
      }
    }
    run_start += run.n;
  }
}

template <class T>
void partial_rows(const row_job<T>& job, const params<T>& p, index_t r0, index_t r1, index_t j0,
                  index_t j1, T* acc, index_t a_ts, index_t a_hs, T* m, T* l) {
  partial_rows(job, job.runs.data(), job.nruns, p, r0, r1, j0, j1, acc, a_ts, a_hs, m, l);
}

/// o row = merge, in split order, of the ns partials (m[s·ms], l[s·ms], acc + s·as) and the
/// sink (one extra key of value 0). acc may alias o when ns == 1.
template <class T>
void merge_row(index_t ns, const T* m, const T* l, index_t ms, const T* acc, index_t as, T sink,
               T* o, index_t V) {
  const T ninf = -std::numeric_limits<T>::infinity();
  T M = sink;
  for (index_t s = 0; s < ns; ++s) {
    const T x = m[s * ms];
    if (x != x) {
      std::fill_n(o, V, std::numeric_limits<T>::quiet_NaN());
      return;
    }
    M = std::max(M, x);
  }
  const T m_use = M == ninf ? T(0) : M;
  T lsum = sink > ninf ? std::exp(sink - m_use) : T(0);
  bool first = true;
  for (index_t s = 0; s < ns; ++s) {
    const T x = m[s * ms];
    if (x == ninf) continue;  // no visible key in this split: its accumulator is zero
    const T w = std::exp(x - m_use);
    lsum += w * l[s * ms];
    const T* a = acc + s * as;
    if (first) {
      for (index_t c = 0; c < V; ++c) o[c] = w * a[c];  // elementwise: safe when a == o
      first = false;
    } else {
      simd::axpy(o, w, a, V);
    }
  }
  if (first) std::fill_n(o, V, T(0));
  simd::scale(o, T(1) / lsum, V);
}

/// Runs every row of `job` over keys [j0, j1) of `runs` in one piece (no splits): 32 rows at
/// a time accumulated straight in their o rows, each finished there with its sink.
template <class T>
void rows_direct(const row_job<T>& job, const key_run<T>* runs, int nruns, const params<T>& p,
                 index_t j0, index_t j1) {
  constexpr index_t chunk = 32;
  const index_t rows = job.ntok * job.nhead, G = job.nhead;
  std::array<T, chunk> m, l;
  for (index_t r0 = 0; r0 < rows; r0 += chunk) {
    const index_t r1 = std::min(rows, r0 + chunk);
    partial_rows(job, runs, nruns, p, r0, r1, j0, j1, job.o, job.o_tstride, job.o_hstride, m.data(),
                 l.data());
    for (index_t r = r0; r < r1; ++r) {
      T* o = job.o + (r / G) * job.o_tstride + (r % G) * job.o_hstride;
      const T sink = job.sinks ? job.sinks[r % G] : -std::numeric_limits<T>::infinity();
      merge_row(index_t(1), m.data() + (r - r0), l.data() + (r - r0), 0, o, 0, sink, o,
                p.value_dim);
    }
  }
}

}  // namespace detail

/// Decode: G query rows q[g] ([K], already unscaled) of the heads of one GQA group attend over
/// every key of nruns runs of cached rows (a ring buffer's two pieces, MoBA's selected chunks);
/// o[g] ([V], stride o_stride) is used as the accumulator. The engine's row path in one piece
/// (no splits, detail::rows_direct); allocates nothing. p.window is not applied: the runs are the
/// keys.
template <class T>
void decode_group(const T* q, index_t q_stride, index_t G, const key_run<T>* runs, int nruns, T* o,
                  index_t o_stride, const T* sinks, const params<T>& p) {
  row_job<T> job;
  job.q = q, job.q_hstride = q_stride;
  job.o = o, job.o_hstride = o_stride;
  job.ntok = 1, job.nhead = G;
  index_t n = 0;
  for (int r = 0; r < nruns; ++r) n += runs[r].n;
  job.pos0 = n - 1;  // the one token sees keys 0 .. n - 1
  job.sinks = sinks;
  params<T> pw = p;
  pw.window = 0;
  detail::rows_direct(job, runs, nruns, pw, 0, n);
}

/// Scratch elements (of T) that run_row_jobs callers without a heap budget pass on the stack.
template <class T>
inline constexpr index_t row_scratch_elems = index_t(65536 / sizeof(T));

/// Runs njobs row jobs (job_of(i) builds job i; it is called several times per job and must be
/// cheap and pure) with split-KV parallelism: (job, split) work items over the thread team,
/// then one merge per job in split order. `scratch` holds the partials (jobs are taken in
/// batches that fit); nothing is allocated. Bitwise identical for any thread count.
template <class T, class JobOf>
void run_row_jobs(index_t njobs, JobOf&& job_of, const params<T>& p, T* scratch, index_t cap) {
  constexpr index_t max_batch = 256;
  const index_t vpad = detail::acc_pad<T>(p.value_dim), V = p.value_dim;
  constexpr index_t lanes = simd::lanes<T>;
  // per job of the batch: keys per split (0: direct), first key, splits, scratch offset
  std::array<index_t, max_batch> per, first, nsp, off;
  std::array<index_t, max_batch + 1> item0;
  for (index_t j0 = 0; j0 < njobs;) {
    index_t nb = 0, used = 0;
    item0[0] = 0;
    for (; j0 + nb < njobs && nb < max_batch; ++nb) {
      const row_job<T> job = job_of(j0 + nb);
      const auto [kf, ke] = detail::job_keys(job, p.window);
      const index_t rows = job.ntok * job.nhead;
      // partials of a job: acc [splits][rows][vpad], then m and l [splits][rows] each; every
      // job starts on a 64-byte boundary, so every acc row does (vpad is a whole vector)
      const index_t ps = detail::split_keys(ke - kf, rows, vpad, cap - lanes);
      const index_t ns = ps > 0 ? (ke - kf + ps - 1) / ps : 1;
      const index_t need = ps > 0 ? (ns * rows * (vpad + 2) + lanes - 1) / lanes * lanes : 0;
      if (nb > 0 && used + need > cap) break;
      const auto b = static_cast<std::size_t>(nb);
      per[b] = ps, first[b] = kf, nsp[b] = ns, off[b] = used;
      used += need;
      item0[b + 1] = item0[b] + ns;
    }
    const index_t nitems = item0[static_cast<std::size_t>(nb)];
    parallel_for(nitems, [&](index_t it) {
      const auto b = static_cast<std::size_t>(
          std::upper_bound(item0.begin() + 1, item0.begin() + nb + 1, it) - item0.begin() - 1);
      const row_job<T> job = job_of(j0 + index_t(b));
      const index_t rows = job.ntok * job.nhead, G = job.nhead;
      const index_t end = job.pos0 + job.ntok;
      if (per[b] == 0) {  // direct: accumulated in o and finished there
        detail::rows_direct(job, job.runs.data(), job.nruns, p, first[b], end);
        return;
      }
      const index_t s = it - item0[b];
      const index_t ka = first[b] + s * per[b], kb = std::min(end, ka + per[b]);
      T* base = scratch + off[b];
      T* m = base + nsp[b] * rows * vpad + s * rows;
      detail::partial_rows(job, p, 0, rows, ka, kb, base + s * rows * vpad, G * vpad, vpad, m,
                           m + nsp[b] * rows);
    });
    parallel_for(nb, [&](index_t bi) {
      const auto b = static_cast<std::size_t>(bi);
      if (per[b] == 0) return;
      const row_job<T> job = job_of(j0 + bi);
      const index_t rows = job.ntok * job.nhead, G = job.nhead, ns = nsp[b];
      const T* base = scratch + off[b];
      for (index_t r = 0; r < rows; ++r) {
        T* o = job.o + (r / G) * job.o_tstride + (r % G) * job.o_hstride;
        const T sink = job.sinks ? job.sinks[r % G] : -std::numeric_limits<T>::infinity();
        const T* m = base + ns * rows * vpad + r;
        detail::merge_row(ns, m, m + ns * rows, rows, base + r * vpad, rows * vpad, sink, o, V);
      }
    });
    j0 += nb;
  }
}

}  // namespace seqmix::kernels::attention

#undef SEQMIX_ATTN_INLINE
