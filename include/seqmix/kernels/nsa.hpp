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
// bs block size, L the SIMD width. Query heads sit along the SIMD lanes (up to 4·L = the
// attention engine's query tile per pass; larger groups run in passes of that many heads).
//
// Cost per (token, kv head): compressed O(G·nv·(K + V)), selection O(nv + S²) (a running
// insertion into the S best), selected O(G·S·bs·(K + V)); memory O(nv·4L + 4L·(K + V)) scratch
// per thread, no T×T matrix, never all keys of a query. Keys and values are read in place from
// strided rows, so the same function serves prefill (rows of the [B,T,H,D] inputs) and decode
// (rows of an nsa_cache): the two give bitwise the same numbers, and so do all thread counts
// (each (token, kv head) is computed by one thread in a fixed order).
//
// Lanes and small groups: a group of G < L heads fills G of the L lanes of a vector (GQA 1 or 2
// computes L/G times the needed score lanes); NSA's own shapes (G = 16, fla requires >= 16) fill
// one float vector exactly.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <vector>

#include <seqmix/core/simd.hpp>
#include <seqmix/core/tensor.hpp>
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
/// (row stride V), lse G values, sel the S selected blocks (ascending, -1 padded).
template <class T>
struct scratch {
  template <class U>
  using avec = std::vector<U, xsimd::aligned_allocator<U, 64>>;
  avec<T> qt, st, acc, m, l, alpha, score;
  std::vector<T> o_cmp, o_slc, o_swa, lse;  // o_swa: the mixer's window branch in decode
  std::vector<index_t> sel, best;
  std::vector<T> best_score;
  index_t acc_stride = 0;
  static constexpr index_t key_tile = 64;  // keys per online-softmax step of the selected branch

  /// Sizes for groups of G heads, blocks up to max_blocks, S selected blocks.
  void resize(const params<T>& p, index_t max_blocks) {
    using detail::bq;
    using detail::L;
    const index_t K = p.key_dim, V = p.value_dim, G = p.group;
    acc_stride = (V + L<T> - 1) / L<T> * L<T>;
    qt.assign(static_cast<std::size_t>(K * bq<T>), T(0));
    st.assign(static_cast<std::size_t>(std::max(max_blocks, key_tile) * bq<T>), T(0));
    acc.assign(static_cast<std::size_t>(bq<T> * acc_stride), T(0));
    m.assign(static_cast<std::size_t>(bq<T>), T(0));
    l.assign(static_cast<std::size_t>(bq<T>), T(0));
    alpha.assign(static_cast<std::size_t>(bq<T>), T(0));
    score.assign(static_cast<std::size_t>(std::max<index_t>(max_blocks, 1)), T(0));
    o_cmp.assign(static_cast<std::size_t>(G * V), T(0));
    o_slc.assign(static_cast<std::size_t>(G * V), T(0));
    o_swa.assign(static_cast<std::size_t>(G * V), T(0));
    lse.assign(static_cast<std::size_t>(G), T(0));
    sel.assign(static_cast<std::size_t>(p.block_count), -1);
    best.assign(static_cast<std::size_t>(p.block_count), -1);
    best_score.assign(static_cast<std::size_t>(p.block_count), T(0));
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

}  // namespace detail

/// Computes one (token, kv head): w.o_cmp, w.lse, w.sel (selected or the given blocks, sorted)
/// and w.o_slc. Allocates nothing (w sized by scratch::resize for these params and at least
/// (pos + 1) / bs blocks).
template <class T>
void token(const token_problem<T>& tp, const params<T>& p, scratch<T>& w) {
  using detail::bq;
  using detail::L;
  const index_t G = p.group, nv = (tp.pos + 1) / p.block_size;
  if (!tp.given) std::fill_n(w.score.data(), nv, T(0));
  // compressed branch (and the selection scores), in passes of up to bq heads
  for (index_t g0 = 0; g0 < G; g0 += bq<T>) {
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
  for (index_t g0 = 0; g0 < G; g0 += bq<T>) {
    const index_t gn = std::min(bq<T>, G - g0), nvec = (gn + L<T> - 1) / L<T>;
    // one pass (G <= bq) leaves qt packed from the compressed branch
    if (G > bq<T>) detail::pack_queries(tp, p, g0, gn, nvec, w.qt.data());
    detail::selected(tp, p, blocks, nsel, g0, gn, nvec, w);
  }
}

}  // namespace seqmix::kernels::nsa
