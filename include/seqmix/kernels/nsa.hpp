// SPDX-License-Identifier: MIT
// NSA (native sparse attention) engine, docs/math.md §5.1: the per-(token, kv head) work behind
// mixers/nsa.hpp, built from the pieces of the attention engine (kernels/attention.hpp: its
// transposed-score layout, pv_block micro-kernel, exp_nonpositive and online softmax).
//
// For one token at position t of a sequence and one kv head, with the G query heads of its group
// as the rows of a tile (block size bs, S selected blocks, scale s):
//
//   k_cmp[c] = mean(k[c·bs .. c·bs+bs-1]),  v_cmp[c] likewise     (complete blocks only)
//   visible blocks: c < nv(t) = (t + 1) / bs                      ((c+1)·bs - 1 <= t)
//   compressed:  p_gc = softmax_c(s q_g · k_cmp[c]),  o_cmp_g = Σ_c p_gc v_cmp[c],
//                lse_g = log Σ_c exp(s q_g · k_cmp[c])            (nv = 0: o_cmp = 0, lse = -inf)
//   selection:   score_c = (1/G) Σ_g p_gc; blocks 0, t/bs and t/bs - 1 forced (score 1);
//                the S best by (score desc, block index asc) among visible ∪ forced blocks;
//                fewer candidates than S leave slots empty (-1). Stored in ascending block order.
//   selected:    o_slc_g = softmax over the keys j <= t of the selected blocks (online softmax,
//                one running max / sum per query head); no key: o_slc = 0.
//
// Legend: G query heads per kv head, K key dim, V value dim, nv visible blocks, S block count,
// bs block size, L the SIMD width.
//
// Two layouts, by group size (keys_along_lanes):
//  - G >= L (NSA's own shapes, G = 16; fla requires >= 16): the query heads sit along the SIMD
//    lanes (up to 4·L = the attention engine's query tile per pass; larger groups run in passes).
//  - G < L (MHA, GQA 2 / 4 / 8): heads along the lanes would fill G of L lanes (G = 1: 1/16 of
//    the work useful, 20-100x slower per FLOP). Each head is a row and the keys (block means)
//    of a 64-wide tile are the lanes: scores of up to 4 rows against a transposed key tile, the
//    softmax along the lanes, P·V with the probabilities broadcast over value rows; the G heads
//    share the token's selection, so each key / value tile serves all G rows. The block means
//    are read transposed (the cache keeps them so), the keys from a transposed copy made once
//    per prefill call (or each tile transposed on the fly in decode: the same values).
//    Per FLOP still slower than G = 16 at long T: each key and value row read serves G heads
//    instead of 16, so the per-token gathers of S·bs keys are memory-bound (MHA, T = 8192, 16
//    heads: 5.2x the time of G = 16 over the same FLOPs, loaded 2-core EPYC, 1 thread, CPU time).
//
// Cost per (token, kv head): compressed O(G·nv·(K + V)), selection O(nv + S²) (a running
// insertion into the S best), selected O(G·S·bs·(K + V)); memory O(nv·4L + 4L·(K + V)) scratch
// per thread (workspace memory), no T×T matrix, never all keys of a query. Keys and values are
// read in place from strided rows, so the same function serves prefill (rows of the [B,T,H,D]
// inputs) and decode (rows of an nsa_cache): the two give bitwise the same numbers, and so do all
// thread counts (each (token, kv head) is computed by one thread in a fixed order).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <span>
#include <type_traits>

#include <seqmix/core/simd.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/core/workspace.hpp>
#include <seqmix/kernels/attention.hpp>

namespace seqmix::kernels::nsa {

/// Parameters of one NSA call.
template <class T>
struct params {
  index_t key_dim = 0;       // K
  index_t value_dim = 0;     // V
  index_t block_size = 64;   // bs
  index_t block_count = 16;  // S
  index_t group = 1;         // G query heads per kv head
  T scale = T(1);            // s
};

/// One (token, kv head) problem. Rows are strided; the block rows k_cmp / v_cmp hold at least
/// nv = (pos + 1) / bs entries and the token rows k / v at least pos + 1.
template <class T>
struct token_problem {
  const T* q = nullptr;  // G query rows [K], row stride q_stride (the heads of the group)
  index_t q_stride = 0;
  const T* kc = nullptr;  // compressed key rows [K], stride kc_stride
  index_t kc_stride = 0;
  const T* vc = nullptr;  // compressed value rows [V], stride vc_stride
  index_t vc_stride = 0;
  const T* k = nullptr;  // key rows of the sequence, stride k_stride (row = position)
  index_t k_stride = 0;
  const T* v = nullptr;
  index_t v_stride = 0;
  index_t pos = 0;  // t, the token's position in its sequence
  // Keys along the lanes (groups G < L, see kl_token): the block means transposed, kct[d][c]
  // at kct + d·kct_stride + c (columns past nv readable: kl_tile-rounded), required; the keys
  // transposed, kt[d][j] at kt + d·kt_stride + j (columns up to pos + kl_tile readable), or
  // nullptr: each key tile is transposed on the fly (decode). Either gives the same numbers.
  const T* kct = nullptr;
  index_t kct_stride = 0;
  const T* kt = nullptr;
  index_t kt_stride = 0;
  // A given selection (reuse across layers): n slots, -1 empty, no duplicates; nullptr: select.
  const index_t* given = nullptr;
  index_t given_n = 0;
};

namespace detail {

using kernels::attention::detail::batch;
using kernels::attention::detail::bq;
using kernels::attention::detail::exp_nonpositive;
using kernels::attention::detail::L;
using kernels::attention::detail::rq;

/// st[r][0 : NV·L] = Σ_d k[r][d] · qt[d][0 : NV·L] for R key rows (st rows of bq<T> lanes).
/// The attention engine's scores_block for a tile of NV (<= 4) query vectors.
template <class T, index_t R, index_t NV>
inline void scores_rows(const T* k, index_t k_stride, const T* qt, index_t key_dim, T* st) {
  constexpr auto NR = static_cast<std::size_t>(R), NC = static_cast<std::size_t>(NV);
  std::array<std::array<batch<T>, NC>, NR> acc;
#pragma GCC unroll 16
  for (std::size_t r = 0; r < NR; ++r)
#pragma GCC unroll 4
    for (std::size_t c = 0; c < NC; ++c) acc[r][c] = batch<T>(T(0));
  for (index_t d = 0; d < key_dim; ++d) {
    std::array<batch<T>, NC> qd;
#pragma GCC unroll 4
    for (std::size_t c = 0; c < NC; ++c) qd[c] = simd::load(qt + d * bq<T> + index_t(c) * L<T>);
#pragma GCC unroll 16
    for (std::size_t r = 0; r < NR; ++r) {
      const batch<T> kr(k[index_t(r) * k_stride + d]);
#pragma GCC unroll 4
      for (std::size_t c = 0; c < NC; ++c) acc[r][c] = simd::fma(kr, qd[c], acc[r][c]);
    }
  }
#pragma GCC unroll 16
  for (std::size_t r = 0; r < NR; ++r)
#pragma GCC unroll 4
    for (std::size_t c = 0; c < NC; ++c)
      simd::store(st + index_t(r) * bq<T> + index_t(c) * L<T>, acc[r][c]);
}

// Register blocks: R key rows × NV query vectors, 8-24 accumulators (g++ 12 keeps an
// 8 x 1 or 6 x 4 block in registers; a 16 x 1 one it spilled to the stack: 1.5x slower).
template <index_t NV>
inline constexpr index_t rows_for = NV == 1   ? 8
                                    : NV == 2 ? 6
                                    : NV == 3 ? 4
                                              : 6;

template <class T, index_t NV>
inline void scores_nv(const T* k, index_t k_stride, index_t kn, const T* qt, index_t key_dim,
                      T* st) {
  constexpr index_t R = rows_for<NV>;
  index_t j = 0;
  for (; j + R <= kn; j += R)
    scores_rows<T, R, NV>(k + j * k_stride, k_stride, qt, key_dim, st + j * bq<T>);
  for (; j + 4 <= kn; j += 4)
    scores_rows<T, 4, NV>(k + j * k_stride, k_stride, qt, key_dim, st + j * bq<T>);
  for (; j < kn; ++j)
    scores_rows<T, 1, NV>(k + j * k_stride, k_stride, qt, key_dim, st + j * bq<T>);
}

/// Scores of kn key rows against the packed queries (nv vectors of lanes).
template <class T>
inline void scores(const T* k, index_t k_stride, index_t kn, const T* qt, index_t key_dim,
                   index_t nvec, T* st) {
  switch (nvec) {
    case 1:
      scores_nv<T, 1>(k, k_stride, kn, qt, key_dim, st);
      break;
    case 2:
      scores_nv<T, 2>(k, k_stride, kn, qt, key_dim, st);
      break;
    case 3:
      scores_nv<T, 3>(k, k_stride, kn, qt, key_dim, st);
      break;
    default:
      scores_nv<T, 4>(k, k_stride, kn, qt, key_dim, st);
      break;
  }
}

/// acc[i] = alpha[i]·acc[i] + Σ_j pt[j][i] v[j] for rows i < nrows (a multiple of rq), through
/// the attention engine's pv_block (no band: every row sees every key of the run).
template <class T>
inline void pv_rows(const T* pt, index_t kn, const T* v, index_t v_stride, const T* alpha, T* acc,
                    index_t acc_stride, index_t nrows, index_t V) {
  using kernels::attention::detail::cv;
  using kernels::attention::detail::pv_block;
  const index_t Vfull = V / (cv * L<T>)*(cv * L<T>);
  const index_t Vvec = V / L<T> * L<T>;
  for (index_t i = 0; i < nrows; i += rq) {
    T* acc_i = acc + i * acc_stride;
    const T* al = alpha + i;
    index_t c0 = 0;
    for (; c0 < Vfull; c0 += cv * L<T>)
      pv_block<T, cv, false>(pt + i, kn, 0, kn, v + c0, v_stride, al, acc_i + c0, acc_stride);
    for (; c0 < Vvec; c0 += L<T>)
      pv_block<T, 1, false>(pt + i, kn, 0, kn, v + c0, v_stride, al, acc_i + c0, acc_stride);
    for (; c0 < V; ++c0) {  // scalar tail of odd value dims
      for (index_t r = 0; r < rq; ++r) {
        T a = al[r] * acc_i[r * acc_stride + c0];
        for (index_t j = 0; j < kn; ++j) a += pt[j * bq<T> + i + r] * v[j * v_stride + c0];
        acc_i[r * acc_stride + c0] = a;
      }
    }
  }
}

}  // namespace detail

/// out[0:D] = mean of n rows of D values (row stride `stride`): summed in row order, divided by
/// n. One definition for prefill and the cache, so both hold bitwise the same block means.
template <class T>
inline void block_mean(const T* rows, index_t stride, index_t n, index_t D, T* out) {
  std::fill_n(out, D, T(0));
  for (index_t r = 0; r < n; ++r) {
    const T* x = rows + r * stride;
    for (index_t d = 0; d < D; ++d) out[d] += x[d];
  }
  const T inv = T(n);
  for (index_t d = 0; d < D; ++d) out[d] /= inv;
}

/// Per-thread scratch and results of token(): after a call, o_cmp / o_slc hold G rows of V
/// (row stride V), lse G values, sel the S selected blocks (ascending, -1 padded). Views of
/// workspace memory (take()): trivially copyable, nothing allocated once the arena has grown.
template <class T>
struct scratch {
  std::span<T> qt, st, acc, m, l, alpha, score;
  std::span<T> o_cmp, o_slc, o_swa, lse;  // o_swa: the mixer's window branch in decode
  std::span<index_t> sel, best;
  std::span<T> best_score;
  // keys along the lanes (groups smaller than a SIMD vector): scaled query rows [G, K], the
  // compressed scores [kl_rows, blocks rounded up to kl_tile], a key tile [K, kl_tile]
  // transposed on the fly (decode), the score tile [kl_rows, kl_tile]
  std::span<T> qs, cmp, kt, srow;
  index_t acc_stride = 0, cmp_stride = 0;
  static constexpr index_t key_tile = 64;  // keys per online-softmax step of the selected branch

  /// Takes the buffers from `f` for groups of G heads, blocks up to max_blocks, S selected
  /// blocks (score and tile buffers uninitialised: always written before they are read).
  void take(workspace::frame& f, const params<T>& p, index_t max_blocks) {
    using detail::bq;
    using detail::L;
    const index_t K = p.key_dim, V = p.value_dim, G = p.group;
    acc_stride = (V + L<T> - 1) / L<T> * L<T>;
    const index_t rows = std::max(bq<T>, G);
    qt = f.take<T>(K * bq<T>, T(0));
    st = f.take<T>(std::max(max_blocks, key_tile) * bq<T>);
    acc = f.take<T>(rows * acc_stride, T(0));
    m = f.take<T>(rows, T(0));
    l = f.take<T>(rows, T(0));
    alpha = f.take<T>(bq<T>, T(0));
    score = f.take<T>(std::max<index_t>(max_blocks, 1) + key_tile, T(0));
    o_cmp = f.take<T>(G * V, T(0));
    o_slc = f.take<T>(G * V, T(0));
    o_swa = f.take<T>(G * V, T(0));
    lse = f.take<T>(G, T(0));
    sel = f.take<index_t>(p.block_count, index_t(-1));
    best = f.take<index_t>(p.block_count, index_t(-1));
    best_score = f.take<T>(p.block_count, T(0));
    qs = f.take<T>(G * K, T(0));
    cmp_stride = (std::max<index_t>(max_blocks, 1) + key_tile - 1) / key_tile * key_tile;
    cmp = f.take<T>(4 * cmp_stride);
    kt = f.take<T>(K * key_tile, T(0));
    srow = f.take<T>(4 * key_tile);
  }
};

namespace detail {

/// Packs qt[d][i] = s · q[g0 + i][d] for i < gn, zero up to nvec·L lanes.
template <class T>
inline void pack_queries(const token_problem<T>& tp, const params<T>& p, index_t g0, index_t gn,
                         index_t nvec, T* qt) {
  const index_t K = p.key_dim, lanes = nvec * L<T>;
  for (index_t i = 0; i < lanes; ++i) {
    if (i < gn) {
      const T* qi = tp.q + (g0 + i) * tp.q_stride;
      for (index_t d = 0; d < K; ++d) qt[d * bq<T> + i] = p.scale * qi[d];
    } else {
      for (index_t d = 0; d < K; ++d) qt[d * bq<T> + i] = T(0);
    }
  }
}

/// Compressed branch for heads g0 .. g0+gn-1; adds their probabilities to w.score[0:nv].
template <class T>
inline void compressed(const token_problem<T>& tp, const params<T>& p, index_t nv, index_t g0,
                       index_t gn, index_t nvec, scratch<T>& w) {
  const index_t V = p.value_dim;
  const T ninf = -std::numeric_limits<T>::infinity();
  if (nv == 0) {
    for (index_t i = 0; i < gn; ++i) {
      std::fill_n(w.o_cmp.data() + (g0 + i) * V, V, T(0));
      w.lse[static_cast<std::size_t>(g0 + i)] = ninf;
    }
    return;
  }
  T* st = w.st.data();
  scores(tp.kc, tp.kc_stride, nv, w.qt.data(), p.key_dim, nvec, st);
  for (index_t c = 0; c < nvec; ++c) {
    const index_t off = c * L<T>;
    batch<T> mx(ninf);
    for (index_t j = 0; j < nv; ++j) mx = xsimd::max(mx, simd::load(st + j * bq<T> + off));
    const batch<T> m_use = xsimd::select(mx == batch<T>(ninf), batch<T>(T(0)), mx);
    batch<T> sum(T(0));
    for (index_t j = 0; j < nv; ++j) {
      T* sp = st + j * bq<T> + off;
      const batch<T> e = exp_nonpositive<T>(simd::load(sp) - m_use);
      simd::store(sp, e);
      sum += e;
    }
    simd::store(w.m.data() + off, mx);
    simd::store(w.l.data() + off, sum);
  }
  const index_t nrows = (gn + rq - 1) / rq * rq;
  std::fill_n(w.alpha.data(), bq<T>, T(0));
  for (index_t i = 0; i < nrows; ++i) std::fill_n(w.acc.data() + i * w.acc_stride, V, T(0));
  pv_rows(st, nv, tp.vc, tp.vc_stride, w.alpha.data(), w.acc.data(), w.acc_stride, nrows, V);
  for (index_t i = 0; i < gn; ++i) {
    const auto is = static_cast<std::size_t>(i);
    const T li = w.l[is];
    const T* a = w.acc.data() + i * w.acc_stride;
    T* oc = w.o_cmp.data() + (g0 + i) * V;
    for (index_t c = 0; c < V; ++c) oc[c] = a[c] / li;
    w.lse[static_cast<std::size_t>(g0 + i)] = w.m[is] + std::log(li);
  }
  if (tp.given) return;  // no selection to score
  // selection scores: score[j] += Σ_{i < gn} e[j][i] / l[i] (the probabilities, summed over the
  // group's heads; lanes past gn are padding and masked out)
  std::array<batch<T>, static_cast<std::size_t>(kernels::attention::detail::qv)> lv, keep;
  for (index_t c = 0; c < nvec; ++c) {
    const auto cs = static_cast<std::size_t>(c);
    lv[cs] = simd::load(w.l.data() + c * L<T>);
    alignas(64) std::array<T, static_cast<std::size_t>(L<T>)> lane{};
    for (index_t i = 0; i < L<T>; ++i)
      lane[static_cast<std::size_t>(i)] = c * L<T> + i < gn ? T(1) : T(0);
    keep[cs] = batch<T>::load_aligned(lane.data());
  }
  for (index_t j = 0; j < nv; ++j) {
    const T* e = st + j * bq<T>;
    const batch<T> half(T(0.5)), zero(T(0));
    batch<T> acc = xsimd::select(keep[0] > half, simd::load(e) / lv[0], zero);
    for (index_t c = 1; c < nvec; ++c) {
      const auto cs = static_cast<std::size_t>(c);
      acc += xsimd::select(keep[cs] > half, simd::load(e + c * L<T>) / lv[cs], zero);
    }
    w.score[static_cast<std::size_t>(j)] += simd::reduce_sum(acc);
  }
}

/// The S best blocks by (score desc, index asc) among the visible blocks 0 .. nv-1 and the forced
/// ones (0, cur, cur-1; cur may be past the visible ones), into w.sel in ascending order.
template <class T>
inline void select(const params<T>& p, index_t pos, index_t nv, scratch<T>& w) {
  const index_t S = p.block_count, cur = pos / p.block_size;
  const T G = T(p.group);
  index_t n = 0;  // filled entries of best (sorted: score desc, index asc)
  const auto offer = [&](index_t c, T s) {
    if (n == S && !(s > w.best_score[static_cast<std::size_t>(S - 1)])) return;
    // insertion point: after every entry of score >= s (those have a lower index on ties)
    index_t at = n < S ? n : S - 1;
    while (at > 0 && !(w.best_score[static_cast<std::size_t>(at - 1)] >= s)) {
      w.best_score[static_cast<std::size_t>(at)] = w.best_score[static_cast<std::size_t>(at - 1)];
      w.best[static_cast<std::size_t>(at)] = w.best[static_cast<std::size_t>(at - 1)];
      --at;
    }
    w.best_score[static_cast<std::size_t>(at)] = s;
    w.best[static_cast<std::size_t>(at)] = c;
    if (n < S) ++n;
  };
  for (index_t c = 0; c < nv; ++c) {
    const bool forced = c == 0 || c == cur || c == cur - 1;
    offer(c, forced ? T(1) : w.score[static_cast<std::size_t>(c)] / G);
  }
  // Of the forced blocks only the current one can be not visible yet (the previous one ends
  // before t, and block 0 is not visible only while it is the current one).
  if (cur >= nv) offer(cur, T(1));
  std::sort(w.best.begin(), w.best.begin() + n);
  for (index_t i = 0; i < S; ++i)
    w.sel[static_cast<std::size_t>(i)] = i < n ? w.best[static_cast<std::size_t>(i)] : -1;
}

/// Selected branch for heads g0 .. g0+gn-1 over the blocks in `blocks` (ascending, -1 ends).
template <class T>
inline void selected(const token_problem<T>& tp, const params<T>& p, const index_t* blocks,
                     index_t nblocks, index_t g0, index_t gn, index_t nvec, scratch<T>& w) {
  const index_t V = p.value_dim, bs = p.block_size, t = tp.pos;
  const T ninf = -std::numeric_limits<T>::infinity();
  const index_t nrows = (gn + rq - 1) / rq * rq;
  std::fill(w.m.begin(), w.m.end(), ninf);
  std::fill(w.l.begin(), w.l.end(), T(0));
  for (index_t i = 0; i < nrows; ++i) std::fill_n(w.acc.data() + i * w.acc_stride, V, T(0));
  T* st = w.st.data();
  bool any = false;
  // runs of adjacent selected blocks, causally cut at t; each walked in tiles of key_tile keys
  for (index_t b = 0; b < nblocks;) {
    const index_t c = blocks[b];
    if (c < 0 || c * bs > t) {
      ++b;
      continue;
    }
    index_t e = b + 1;
    while (e < nblocks && blocks[e] == blocks[e - 1] + 1) ++e;
    const index_t j_begin = c * bs, j_end = std::min((blocks[e - 1] + 1) * bs, t + 1);
    b = e;
    for (index_t j0 = j_begin; j0 < j_end; j0 += scratch<T>::key_tile) {
      const index_t kn = std::min(scratch<T>::key_tile, j_end - j0);
      any = true;
      // the next tile's keys and values (the next selected block is usually far away in a long
      // sequence, where the hardware prefetcher cannot guess it): requested now, used next
      index_t nj = j0 + scratch<T>::key_tile, nn = std::min(scratch<T>::key_tile, j_end - nj);
      if (nn <= 0 && b < nblocks && blocks[b] >= 0 && blocks[b] * bs <= t) {
        nj = blocks[b] * bs;
        nn = std::min({scratch<T>::key_tile, bs, t + 1 - nj});
      }
      for (index_t j = 0; j < nn; ++j) {
        const char* kr = reinterpret_cast<const char*>(tp.k + (nj + j) * tp.k_stride);
        const char* vr = reinterpret_cast<const char*>(tp.v + (nj + j) * tp.v_stride);
        for (index_t byte = 0; byte < p.key_dim * index_t(sizeof(T)); byte += 64)
          __builtin_prefetch(kr + byte);
        for (index_t byte = 0; byte < V * index_t(sizeof(T)); byte += 64)
          __builtin_prefetch(vr + byte);
      }
      scores(tp.k + j0 * tp.k_stride, tp.k_stride, kn, w.qt.data(), p.key_dim, nvec, st);
      for (index_t cc = 0; cc < nvec; ++cc) {
        const index_t off = cc * L<T>;
        const batch<T> m_old = simd::load(w.m.data() + off);
        batch<T> m_new = m_old;
        for (index_t j = 0; j < kn; ++j)
          m_new = xsimd::max(m_new, simd::load(st + j * bq<T> + off));
        const batch<T> m_use = xsimd::select(m_new == batch<T>(ninf), batch<T>(T(0)), m_new);
        const batch<T> alpha = exp_nonpositive<T>(m_old - m_use);
        batch<T> sum(T(0));
        for (index_t j = 0; j < kn; ++j) {
          T* sp = st + j * bq<T> + off;
          const batch<T> ex = exp_nonpositive<T>(simd::load(sp) - m_use);
          simd::store(sp, ex);
          sum += ex;
        }
        simd::store(w.l.data() + off, simd::fma(simd::load(w.l.data() + off), alpha, sum));
        simd::store(w.m.data() + off, m_new);
        simd::store(w.alpha.data() + off, alpha);
      }
      pv_rows(st, kn, tp.v + j0 * tp.v_stride, tp.v_stride, w.alpha.data(), w.acc.data(),
              w.acc_stride, nrows, V);
    }
  }
  for (index_t i = 0; i < gn; ++i) {
    T* os = w.o_slc.data() + (g0 + i) * V;
    if (!any) {
      std::fill_n(os, V, T(0));
      continue;
    }
    const T inv = T(1) / w.l[static_cast<std::size_t>(i)];
    const T* a = w.acc.data() + i * w.acc_stride;
    for (index_t c = 0; c < V; ++c) os[c] = a[c] * inv;
  }
}

// ---- keys along the lanes: groups of G < L heads (MHA, GQA 2 / 4 / 8) ---------------------
// Heads along the lanes would fill G of the L lanes (G = 1: 1/16 of the work useful). Here each
// query head is a row and the keys (or block means) of a tile are the lanes: scores of R <= 4
// rows against a transposed key tile [K, kl_tile] (R x kl_tile/L accumulators), the softmax
// along the lanes, then P·V with the probabilities broadcast over value rows. The G heads of a
// token share its selection, so one key / value tile serves all G rows.
inline constexpr index_t kl_tile = 64;  // keys (block means) per tile
inline constexpr index_t kl_rows = 4;   // query rows per register block

template <class T>
inline constexpr index_t kl_vec = kl_tile / L<T>;

#if defined(__GNUC__)
#define SEQMIX_NSA_INLINE __attribute__((always_inline))
#else
#define SEQMIX_NSA_INLINE
#endif

/// s[r][0:kl_tile] = Σ_d q[r][d] · kt[d·ld + 0:kl_tile] for R rows (q rows of stride K, already
/// scaled; s rows of stride ss). The fma chain runs over d from 0, as scores_rows'.
template <class T, index_t R>
SEQMIX_NSA_INLINE inline void kl_scores(const T* q, index_t K, const T* kt, index_t ld, T* s,
                                        index_t ss) {
  constexpr auto NV = static_cast<std::size_t>(kl_vec<T>), NR = static_cast<std::size_t>(R);
  std::array<std::array<batch<T>, NV>, NR> a;
  for (auto& row : a)
    for (auto& x : row) x = batch<T>(T(0));
  for (index_t d = 0; d < K; ++d) {
    std::array<batch<T>, NV> kd;
    for (std::size_t c = 0; c < NV; ++c) kd[c] = simd::load(kt + d * ld + index_t(c) * L<T>);
    for (std::size_t r = 0; r < NR; ++r) {
      const batch<T> qv(q[index_t(r) * K + d]);
      for (std::size_t c = 0; c < NV; ++c) a[r][c] = simd::fma(qv, kd[c], a[r][c]);
    }
  }
  for (std::size_t r = 0; r < NR; ++r)
    for (std::size_t c = 0; c < NV; ++c)
      simd::store(s + index_t(r) * ss + index_t(c) * L<T>, a[r][c]);
}

/// acc_r[c0 : c0 + CV·L] = alpha_r · acc_r + Σ_{j < kn} p[r][j] · v[j][c0 : ..] for R rows
/// (p rows of stride ps, acc rows of stride as).
template <class T, index_t R, index_t CV>
SEQMIX_NSA_INLINE inline void kl_pv(const T* p, index_t ps, index_t kn, const T* v, index_t vs,
                                    const T* alpha, T* acc, index_t as, index_t c0) {
  constexpr auto NC = static_cast<std::size_t>(CV), NR = static_cast<std::size_t>(R);
  std::array<std::array<batch<T>, NC>, NR> a;
  for (std::size_t r = 0; r < NR; ++r) {
    const batch<T> al(alpha[r]);
    for (std::size_t c = 0; c < NC; ++c)
      a[r][c] = al * simd::load(acc + index_t(r) * as + c0 + index_t(c) * L<T>);
  }
  for (index_t j = 0; j < kn; ++j) {
    std::array<batch<T>, NC> vj;
    for (std::size_t c = 0; c < NC; ++c) vj[c] = simd::load(v + j * vs + c0 + index_t(c) * L<T>);
    for (std::size_t r = 0; r < NR; ++r) {
      const batch<T> pr(p[index_t(r) * ps + j]);
      for (std::size_t c = 0; c < NC; ++c) a[r][c] = simd::fma(pr, vj[c], a[r][c]);
    }
  }
  for (std::size_t r = 0; r < NR; ++r)
    for (std::size_t c = 0; c < NC; ++c)
      simd::store(acc + index_t(r) * as + c0 + index_t(c) * L<T>, a[r][c]);
}

/// The whole value width of kl_pv (vector blocks of 4, then 1, then a scalar tail).
template <class T, index_t R>
inline void kl_pv_all(const T* p, index_t ps, index_t kn, const T* v, index_t vs, index_t V,
                      const T* alpha, T* acc, index_t as) {
  const index_t Vfull = V / (4 * L<T>)*(4 * L<T>), Vvec = V / L<T> * L<T>;
  index_t c0 = 0;
  for (; c0 < Vfull; c0 += 4 * L<T>) kl_pv<T, R, 4>(p, ps, kn, v, vs, alpha, acc, as, c0);
  for (; c0 < Vvec; c0 += L<T>) kl_pv<T, R, 1>(p, ps, kn, v, vs, alpha, acc, as, c0);
  for (; c0 < V; ++c0) {  // scalar tail of odd value dims
    for (index_t r = 0; r < R; ++r) {
      T a = alpha[r] * acc[r * as + c0];
      for (index_t j = 0; j < kn; ++j) a += p[r * ps + j] * v[j * vs + c0];
      acc[r * as + c0] = a;
    }
  }
}

/// Lanes >= n of the vector at x (one kl_tile row) set to -inf.
template <class T>
inline void kl_mask(T* x, index_t n) {
  const T ninf = -std::numeric_limits<T>::infinity();
  for (index_t j = std::max<index_t>(n, 0); j < kl_tile; ++j) x[j] = ninf;
}

/// Compressed branch of R rows (heads r0 .. r0+R-1) over nv > 0 block means; adds the rows'
/// probabilities to w.score[0:nv] unless the selection is given.
template <class T, index_t R>
inline void kl_compressed_rows(const token_problem<T>& tp, const params<T>& p, index_t nv,
                               index_t r0, scratch<T>& w) {
  const index_t K = p.key_dim, V = p.value_dim, cs = w.cmp_stride, as = w.acc_stride;
  const index_t nvp = (nv + kl_tile - 1) / kl_tile * kl_tile;
  const T ninf = -std::numeric_limits<T>::infinity();
  T* sc = w.cmp.data();
  const T* q = w.qs.data() + r0 * K;
  for (index_t c0 = 0; c0 < nv; c0 += kl_tile)
    kl_scores<T, R>(q, K, tp.kct + c0, tp.kct_stride, sc + c0, cs);
  std::array<T, static_cast<std::size_t>(R)> l{}, zero{};
  for (index_t r = 0; r < R; ++r) {
    T* sr = sc + r * cs;
    kl_mask(sr + nvp - kl_tile, nv - (nvp - kl_tile));
    batch<T> mv(ninf);
    for (index_t c = 0; c < nvp; c += L<T>) mv = xsimd::max(mv, simd::load(sr + c));
    const T mx = simd::reduce_max(mv);
    const batch<T> m_use(mx == ninf ? T(0) : mx);
    batch<T> sum(T(0));
    for (index_t c = 0; c < nvp; c += L<T>) {
      const batch<T> e = exp_nonpositive<T>(simd::load(sr + c) - m_use);
      simd::store(sr + c, e);
      sum += e;
    }
    l[static_cast<std::size_t>(r)] = simd::reduce_sum(sum);
    w.lse[static_cast<std::size_t>(r0 + r)] = mx + std::log(l[static_cast<std::size_t>(r)]);
    std::fill_n(w.acc.data() + (r0 + r) * as, V, T(0));
  }
  kl_pv_all<T, R>(sc, cs, nv, tp.vc, tp.vc_stride, V, zero.data(), w.acc.data() + r0 * as, as);
  for (index_t r = 0; r < R; ++r) {
    const T li = l[static_cast<std::size_t>(r)];
    const T* a = w.acc.data() + (r0 + r) * as;
    T* oc = w.o_cmp.data() + (r0 + r) * V;
    for (index_t c = 0; c < V; ++c) oc[c] = a[c] / li;
  }
  if (tp.given) return;
  for (index_t r = 0; r < R; ++r) {  // selection scores: the probabilities, rows in order
    const batch<T> li(l[static_cast<std::size_t>(r)]);
    const T* sr = sc + r * cs;
    for (index_t c = 0; c < nvp; c += L<T>)
      simd::store(w.score.data() + c, simd::load(w.score.data() + c) + simd::load(sr + c) / li);
  }
}

/// R rows against one key tile (kt [K, kl_tile] of stride ld, kn <= kl_tile keys visible to
/// every row; values v of stride vs): the online softmax step of the selected branch.
template <class T, index_t R>
inline void kl_selected_rows(const params<T>& p, const T* q, const T* kt, index_t ld, index_t kn,
                             const T* v, index_t vs, T* m, T* l, T* acc, index_t as, T* s) {
  kl_scores<T, R>(q, p.key_dim, kt, ld, s, kl_tile);
  std::array<T, static_cast<std::size_t>(R)> alpha;
  std::array<T*, static_cast<std::size_t>(R)> mp, lp;
  for (index_t r = 0; r < R; ++r) {
    if (kn < kl_tile) kl_mask(s + r * kl_tile, kn);
    mp[static_cast<std::size_t>(r)] = m + r;
    lp[static_cast<std::size_t>(r)] = l + r;
  }
  kernels::attention::detail::rows_online_softmax<T, R>(s, kl_tile, kl_vec<T>, mp.data(), lp.data(),
                                                        alpha.data());
  kl_pv_all<T, R>(s, kl_tile, kn, v, vs, p.value_dim, alpha.data(), acc, as);
}

template <class T, class F>
inline void kl_row_groups(index_t G, F&& f) {
  index_t r0 = 0;
  for (; r0 + 4 <= G; r0 += 4) f(std::integral_constant<index_t, 4>{}, r0);
  switch (G - r0) {
    case 3:
      f(std::integral_constant<index_t, 3>{}, r0);
      break;
    case 2:
      f(std::integral_constant<index_t, 2>{}, r0);
      break;
    case 1:
      f(std::integral_constant<index_t, 1>{}, r0);
      break;
    default:
      break;
  }
}

/// Selected branch, keys along the lanes, for all G heads.
template <class T>
inline void kl_selected(const token_problem<T>& tp, const params<T>& p, const index_t* blocks,
                        index_t nblocks, scratch<T>& w) {
  const index_t K = p.key_dim, V = p.value_dim, bs = p.block_size, t = tp.pos, G = p.group;
  const index_t as = w.acc_stride;
  const T ninf = -std::numeric_limits<T>::infinity();
  std::fill_n(w.m.data(), G, ninf);
  std::fill_n(w.l.data(), G, T(0));
  for (index_t i = 0; i < G; ++i) std::fill_n(w.acc.data() + i * as, V, T(0));
  bool any = false;
  for (index_t b = 0; b < nblocks;) {
    const index_t c = blocks[b];
    if (c < 0 || c * bs > t) {
      ++b;
      continue;
    }
    index_t e = b + 1;
    while (e < nblocks && blocks[e] == blocks[e - 1] + 1) ++e;
    const index_t j_begin = c * bs, j_end = std::min((blocks[e - 1] + 1) * bs, t + 1);
    b = e;
    for (index_t j0 = j_begin; j0 < j_end; j0 += kl_tile) {
      const index_t kn = std::min(kl_tile, j_end - j0);
      any = true;
      index_t nj = j0 + kl_tile, nn = std::min(kl_tile, j_end - nj);
      if (nn <= 0 && b < nblocks && blocks[b] >= 0 && blocks[b] * bs <= t) {
        nj = blocks[b] * bs;
        nn = std::min({kl_tile, bs, t + 1 - nj});
      }
      if (nn > 0) {  // the next tile (usually far away): requested now, used next
        for (index_t j = 0; j < nn; ++j) {
          const char* vr = reinterpret_cast<const char*>(tp.v + (nj + j) * tp.v_stride);
          for (index_t byte = 0; byte < V * index_t(sizeof(T)); byte += 64)
            __builtin_prefetch(vr + byte);
        }
        if (tp.kt) {
          for (index_t d = 0; d < K; ++d) {
            const char* kr = reinterpret_cast<const char*>(tp.kt + d * tp.kt_stride + nj);
            __builtin_prefetch(kr);
            __builtin_prefetch(kr + kl_tile * index_t(sizeof(T)) - 1);
          }
        }
      }
      const T* kt = nullptr;
      index_t ld = 0;
      if (tp.kt) {
        kt = tp.kt + j0;
        ld = tp.kt_stride;
      } else {  // transpose the tile (zero past kn): the same values as a transposed copy
        T* x = w.kt.data();
        for (index_t j = 0; j < kl_tile; ++j) {
          const T* kj = tp.k + (j0 + j) * tp.k_stride;
          for (index_t d = 0; d < K; ++d) x[d * kl_tile + j] = j < kn ? kj[d] : T(0);
        }
        kt = x;
        ld = kl_tile;
      }
      const T* v = tp.v + j0 * tp.v_stride;
      kl_row_groups<T>(G, [&](auto rr, index_t r0) {
        constexpr index_t R = decltype(rr)::value;
        kl_selected_rows<T, R>(p, w.qs.data() + r0 * K, kt, ld, kn, v, tp.v_stride, w.m.data() + r0,
                               w.l.data() + r0, w.acc.data() + r0 * as, as, w.srow.data());
      });
    }
  }
  for (index_t i = 0; i < G; ++i) {
    T* os = w.o_slc.data() + i * V;
    if (!any) {
      std::fill_n(os, V, T(0));
      continue;
    }
    const T inv = T(1) / w.l[static_cast<std::size_t>(i)];
    const T* a = w.acc.data() + i * as;
    for (index_t c = 0; c < V; ++c) os[c] = a[c] * inv;
  }
}

}  // namespace detail

/// Whether token() runs the keys-along-lanes form (groups smaller than one SIMD vector), which
/// needs token_problem::kct (and reads kt when given).
template <class T>
inline bool keys_along_lanes(const params<T>& p) {
  return p.group < detail::L<T>;
}

/// Computes one (token, kv head): w.o_cmp, w.lse, w.sel (selected or the given blocks, sorted)
/// and w.o_slc. Allocates nothing (w taken by scratch::take for these params and at least
/// (pos + 1) / bs blocks).
template <class T>
void token(const token_problem<T>& tp, const params<T>& p, scratch<T>& w) {
  using detail::bq;
  using detail::L;
  const index_t G = p.group, nv = (tp.pos + 1) / p.block_size;
  const bool kl = keys_along_lanes(p);
  if (!tp.given) std::fill_n(w.score.data(), kl ? nv + detail::kl_tile : nv, T(0));
  if (kl) {
    for (index_t i = 0; i < G; ++i) {
      const T* qi = tp.q + i * tp.q_stride;
      for (index_t d = 0; d < p.key_dim; ++d)
        w.qs[static_cast<std::size_t>(i * p.key_dim + d)] = p.scale * qi[d];
    }
    if (nv == 0) {
      std::fill_n(w.o_cmp.data(), G * p.value_dim, T(0));
      std::fill_n(w.lse.data(), G, -std::numeric_limits<T>::infinity());
    } else {
      detail::kl_row_groups<T>(G, [&](auto rr, index_t r0) {
        detail::kl_compressed_rows<T, decltype(rr)::value>(tp, p, nv, r0, w);
      });
    }
  }
  // compressed branch (and the selection scores), in passes of up to bq heads
  for (index_t g0 = 0; g0 < G && !kl; g0 += bq<T>) {
    const index_t gn = std::min(bq<T>, G - g0), nvec = (gn + L<T> - 1) / L<T>;
    detail::pack_queries(tp, p, g0, gn, nvec, w.qt.data());
    detail::compressed(tp, p, nv, g0, gn, nvec, w);
  }
  index_t nsel = p.block_count;
  const index_t* blocks = nullptr;
  if (tp.given) {
    index_t n = 0;
    for (index_t i = 0; i < tp.given_n; ++i)
      if (tp.given[i] >= 0) w.best[static_cast<std::size_t>(n++)] = tp.given[i];
    std::sort(w.best.begin(), w.best.begin() + n);
    for (index_t i = 0; i < p.block_count; ++i)
      w.sel[static_cast<std::size_t>(i)] = i < n ? w.best[static_cast<std::size_t>(i)] : -1;
    nsel = n;
    blocks = w.best.data();
  } else {
    detail::select(p, tp.pos, nv, w);
    blocks = w.sel.data();
  }
  if (kl) {
    detail::kl_selected(tp, p, blocks, nsel, w);
    return;
  }
  for (index_t g0 = 0; g0 < G; g0 += bq<T>) {
    const index_t gn = std::min(bq<T>, G - g0), nvec = (gn + L<T> - 1) / L<T>;
    // one pass (G <= bq) leaves qt packed from the compressed branch
    if (G > bq<T>) detail::pack_queries(tp, p, g0, gn, nvec, w.qt.data());
    detail::selected(tp, p, blocks, nsel, g0, gn, nvec, w);
  }
}

}  // namespace seqmix::kernels::nsa

#undef SEQMIX_NSA_INLINE
