// SPDX-License-Identifier: MIT
// MoBA (mixture of block attention, docs/math.md §5.2) on the flash tiles of
// kernels/attention.hpp: the kernel behind mixers/moba.hpp.
//
//   chunks of c keys per sequence; m_b = mean of the keys of chunk b (only complete chunks are
//   ever gated: a query gates the chunks strictly before its own)
//   gate_tb = q_t · m_b                      (no scale), for b < t / c
//   S_t = own chunk ∪ top-(k-1) of {b < t / c} by gate (every earlier chunk when there are
//         at most k-1; equal gates go to the lower chunk index; a NaN gate ranks as -inf)
//   o_t = softmax_{j in S_t, j <= t}(s q_t · k_j) · V    (s = K^-1/2 by default)
//
// Legend: T tokens of one sequence, K key dim, V value dim, c chunk size, k top-k,
// n = T / c chunks, Q the query tile (64 floats / 32 doubles), Bk the key tile (64).
//
// Form (prefill / training), per (sequence, query head) work item:
//  1. gates: Q consecutive queries at a time against the means of the chunks before the tile's
//     last row, through the engine's scores micro-kernel (queries along the SIMD lanes); the
//     top-(k-1) per query lane by a branch-free insertion network over whole SIMD vectors
//     (skipped for a vector when no lane's gate beats its list's last entry). Time O(T·n·K/2).
//  2. inversion: per earlier chunk b, the ascending list of queries that selected b (counting
//     sort, O(T·k)).
//  3. attention, online softmax (per query: running max, sum and V accumulators in one state
//     row) persisting across chunks:
//     a. earlier chunks, ascending: b's key tile is transposed once (keys along the lanes) and
//        every query of b's list is run against it, read in place through row pointers in
//        blocks of 6 rows, with a software prefetch of the rows ahead (the rows are scattered
//        over megabytes at long T: without it the gathers cost 40 % more time at T = 32768).
//        No mask: b is strictly earlier than each of these queries.
//     b. own chunk: tiles of up to Q consecutive queries against their chunk's keys with the
//        causal diagonal (the engine's layout: queries along the lanes; a query never reads a
//        later key, so NaN / inf there cannot reach it).
//     Time O(T·(k-1/2)·c·(K+V)): never a T×T matrix, never all keys per query.
//  Memory: O(T·(k + K + V)) selection, query copy and state + O(n·Q + Q·(K+V+Bk)) scratch per
//  thread, grow-only (sized before the parallel region).
//  Measured (H = 8, Hkv = 2, D = 64, c = 64, k = 8, T = 32768, 1 thread): 1.5-1.6x the time of
//  dense flash tiles over the same number of (query, key) pairs (a window of 480 keys) on Intel
//  Xeons, 1.7x on the AMD EPYC (bench/bench_moba.cpp); about a fifth of MoBA's time is its gate
//  and top-k, which dense attention does not have.
//
// Decode (one query row per head against a moba cache): gates of every complete chunk with the
// means stored transposed ([K, chunks], chunks along the lanes: the same fma sequence over d as
// the tile's, so decode and prefill select bitwise the same chunks), top-(k-1), then the engine's
// decode_group over the selected chunks' runs plus the own chunk's. Time O(n·K + k·c·(K+V)).
//
// Determinism: every work item is computed by one thread in a fixed order (chunks ascending, the
// own chunk last); rows never interact, so results are bitwise identical for any thread count.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>

#include <seqmix/core/parallel.hpp>
#include <seqmix/core/simd.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/core/workspace.hpp>
#include <seqmix/kernels/attention.hpp>

namespace seqmix::kernels::moba {

/// One MoBA problem of a single query head over one sequence: nq query rows at positions
/// q_pos0 .. q_pos0 + nq - 1 of the sequence, keys/values at positions 0 .. q_pos0 + nq - 1.
template <class T>
struct problem {
  const T* q = nullptr;  // [nq, K], row stride q_stride
  index_t q_stride = 0;
  const T* k = nullptr;  // [q_pos0 + nq, K], row stride k_stride
  index_t k_stride = 0;
  const T* v = nullptr;  // [q_pos0 + nq, V], row stride v_stride
  index_t v_stride = 0;
  const T* means = nullptr;  // [(q_pos0 + nq - 1) / c, K] complete-chunk key means, stride K
  T* o = nullptr;            // [nq, V], row stride o_stride
  index_t o_stride = 0;
  index_t nq = 0;
  index_t q_pos0 = 0;
  std::int32_t* selected = nullptr;  // optional [nq, k-1]: chosen earlier chunks, ascending, -1
};

/// Parameters shared by all problems of a call.
template <class T>
struct params {
  index_t key_dim = 0;    // K
  index_t value_dim = 0;  // V
  index_t chunk = 0;      // c
  index_t top_k = 0;      // k (own chunk included)
  T scale = T(1);         // s
};

namespace detail {

namespace at = ::seqmix::kernels::attention::detail;
template <class T>
using batch = simd::batch<T>;
template <class T>
inline constexpr index_t L = simd::lanes<T>;
template <class T>
inline constexpr index_t Q = at::bq<T>;
inline constexpr index_t key_tile = 64;

/// Mean of keys [first, first + n) (rows of stride k_stride): summed in double in token order,
/// divided, rounded to T once. The moba cache adds the same terms in the same order, so
/// prefill and decode see bitwise the same means.
template <class T>
void chunk_mean(const T* k, index_t k_stride, index_t n, index_t K, double* sum, T* mean) {
  std::fill_n(sum, K, 0.0);
  for (index_t j = 0; j < n; ++j)
    for (index_t d = 0; d < K; ++d) sum[d] += static_cast<double>(k[j * k_stride + d]);
  for (index_t d = 0; d < K; ++d) mean[d] = static_cast<T>(sum[d] / static_cast<double>(n));
}

/// Gate order: a before b iff a's gate is larger, or equal with the lower chunk index
/// (NaN ranks as -inf).
template <class T>
inline T rank_value(T g) {
  return g != g ? -std::numeric_limits<T>::infinity() : g;
}

/// Per-lane top-(k-1) lists of a query tile, [k-1][Q]: gates and chunk indices (select_tile).
template <class T>
struct topk_lanes {
  std::span<T> val, fidx;  // chunk indices as T: exact below 2^24 chunks
};

/// Per-thread scratch: views of workspace memory (prepare), trivially copyable.
template <class T>
struct scratch {
  std::span<T> qt, st, gst, acc, m, l, alpha;  // tile buffers
  std::span<T> kt;     // [K, Bk]: one key tile of an earlier chunk, transposed (keys along lanes)
  std::span<T> srow;   // [RS, Bk]: scores / probabilities of a block of gathered rows
  std::span<T> qc;     // [nq, K]: the item's query rows, contiguous (gathers stay within it)
  std::span<T> state;  // [nq, ss]: per query row m, l (first SIMD vector), then the V accumulators
  index_t ss = 0;
  std::span<std::int32_t> sel;     // [nq, k-1]
  std::span<index_t> nsel;         // [nq]
  std::span<index_t> list, start;  // per chunk: the rows that selected it
  std::span<index_t> rows;         // tile's item rows
  topk_lanes<T> top;
  index_t acc_stride = 0;
};

/// Loads the state of `nr` item rows into the tile (pad lanes: zero query, empty state), runs
/// keys [kb, ke) of the sequence through the online softmax, stores the state back.
/// causal: the rows are consecutive positions pos_lo .. pos_lo + nr - 1 and key j is visible
/// to row i iff j <= pos_lo + i (the own-chunk tile); otherwise every key is visible.
template <class T>
void tile_pass(const problem<T>& pr, const params<T>& p, const index_t* rows, index_t nr,
               index_t kb, index_t ke, bool causal, index_t pos_lo, scratch<T>& w,
               const index_t* next_rows = nullptr, index_t next_nr = 0) {
  constexpr index_t Qn = Q<T>;
  const index_t K = p.key_dim, V = p.value_dim, as = w.acc_stride;
  const T ninf = -std::numeric_limits<T>::infinity();
  T* qt = w.qt.data();
  T* st = w.st.data();
  for (index_t i = 0; i < Qn; ++i) {
    T* a = w.acc.data() + i * as;
    if (i < nr) {
      const index_t r = rows[i];
      const T* qi = w.qc.data() + r * K;
      for (index_t d = 0; d < K; ++d) qt[d * Qn + i] = p.scale * qi[d];
      const T* sr = w.state.data() + r * w.ss;
      std::copy_n(sr + L<T>, V, a);
      w.m[static_cast<std::size_t>(i)] = sr[0];
      w.l[static_cast<std::size_t>(i)] = sr[1];
    } else {
      for (index_t d = 0; d < K; ++d) qt[d * Qn + i] = T(0);
      std::fill_n(a, V, T(0));
      w.m[static_cast<std::size_t>(i)] = ninf;
      w.l[static_cast<std::size_t>(i)] = T(0);
    }
  }
  // The next tile's rows are scattered over the item's query copy and state (megabytes at long
  // T): ask for them now, so they arrive while this tile computes (a software prefetch into L2;
  // the gathers were a fifth of the time at T = 32768 without it).
#if defined(__GNUC__)
  for (index_t i = 0; i < next_nr; ++i) {
    const char* qr = reinterpret_cast<const char*>(w.qc.data() + next_rows[i] * K);
    const char* sr = reinterpret_cast<const char*>(w.state.data() + next_rows[i] * w.ss);
    for (index_t b = 0; b < K * index_t(sizeof(T)); b += 64) __builtin_prefetch(qr + b, 0, 2);
    for (index_t b = 0; b < (L<T> + V) * index_t(sizeof(T)); b += 64)
      __builtin_prefetch(sr + b, 1, 2);
  }
#endif
  const index_t Vfull = V / (at::cv * L<T>)*(at::cv * L<T>);
  const index_t Vvec = V / L<T> * L<T>;
  const index_t rows_used = (nr + at::rq - 1) / at::rq * at::rq;

  std::array<batch<T>, static_cast<std::size_t>(at::qv)> iota;
  {
    alignas(64) std::array<T, static_cast<std::size_t>(Qn)> id{};
    for (index_t i = 0; i < Qn; ++i) id[static_cast<std::size_t>(i)] = T(i);
    for (std::size_t c = 0; c < iota.size(); ++c)
      iota[c] = batch<T>::load_aligned(id.data() + index_t(c) * L<T>);
  }

  for (index_t j0 = kb; j0 < ke; j0 += key_tile) {
    const index_t kn = std::min(key_tile, ke - j0);
    const T* kj = pr.k + j0 * pr.k_stride;
    index_t j = 0;
    for (; j + at::rk <= kn; j += at::rk)
      at::scores_block<T, at::rk>(kj + j * pr.k_stride, pr.k_stride, qt, K, st + j * Qn);
    for (; j < kn; ++j)
      at::scores_block<T, 1>(kj + j * pr.k_stride, pr.k_stride, qt, K, st + j * Qn);
    const bool diag = causal && j0 + kn - 1 > pos_lo;
    if (diag) {  // key j0+j visible to row i iff i >= j0 + j - pos_lo
      for (j = 0; j < kn; ++j) {
        const T lo = T(std::clamp<index_t>(j0 + j - pos_lo, -1, Qn + 1));
        for (index_t c = 0; c < at::qv; ++c) {
          T* sp = st + j * Qn + c * L<T>;
          const auto vis = iota[static_cast<std::size_t>(c)] >= batch<T>(lo);
          simd::store(sp, xsimd::select(vis, simd::load(sp), batch<T>(ninf)));
        }
      }
    }
    for (index_t c = 0; c < at::qv; ++c) {
      const index_t off = c * L<T>;
      const batch<T> m_old = simd::load(w.m.data() + off);
      batch<T> m_new = m_old;
      for (j = 0; j < kn; ++j) m_new = xsimd::max(m_new, simd::load(st + j * Qn + off));
      const batch<T> m_use = xsimd::select(m_new == batch<T>(ninf), batch<T>(T(0)), m_new);
      const batch<T> alpha = at::exp_nonpositive<T>(m_old - m_use);
      batch<T> sum(T(0));
      for (j = 0; j < kn; ++j) {
        T* sp = st + j * Qn + off;
        const batch<T> e = at::exp_nonpositive<T>(simd::load(sp) - m_use);
        simd::store(sp, e);
        sum += e;
      }
      simd::store(w.l.data() + off, simd::fma(simd::load(w.l.data() + off), alpha, sum));
      simd::store(w.m.data() + off, m_new);
      simd::store(w.alpha.data() + off, alpha);
    }
    const T* vj = pr.v + j0 * pr.v_stride;
    for (index_t i = 0; i < rows_used; i += at::rq) {
      T* acc_i = w.acc.data() + i * as;
      const index_t d0 = pos_lo + i - j0;
      const index_t lo0 = -(kn + at::rq);
      const T* al = w.alpha.data() + i;
      index_t c0 = 0;
      for (; c0 < Vfull; c0 += at::cv * L<T>) {
        if (diag) {
          at::pv_block<T, at::cv, true>(st + i, kn, lo0, d0, vj + c0, pr.v_stride, al, acc_i + c0,
                                        as);
        } else {
          at::pv_block<T, at::cv, false>(st + i, kn, lo0, d0, vj + c0, pr.v_stride, al, acc_i + c0,
                                         as);
        }
      }
      for (; c0 < Vvec; c0 += L<T>) {
        if (diag) {
          at::pv_block<T, 1, true>(st + i, kn, lo0, d0, vj + c0, pr.v_stride, al, acc_i + c0, as);
        } else {
          at::pv_block<T, 1, false>(st + i, kn, lo0, d0, vj + c0, pr.v_stride, al, acc_i + c0, as);
        }
      }
      for (; c0 < V; ++c0) {  // scalar tail of odd value dims
        for (index_t r = 0; r < at::rq; ++r) {
          T a = w.alpha[static_cast<std::size_t>(i + r)] * acc_i[r * as + c0];
          const index_t jn = diag ? std::clamp<index_t>(d0 + r + 1, 0, kn) : kn;
          for (j = 0; j < jn; ++j) a += st[j * Qn + i + r] * vj[j * pr.v_stride + c0];
          acc_i[r * as + c0] = a;
        }
      }
    }
  }
  for (index_t i = 0; i < nr; ++i) {
    T* sr = w.state.data() + rows[i] * w.ss;
    std::copy_n(w.acc.data() + i * as, V, sr + L<T>);
    sr[0] = w.m[static_cast<std::size_t>(i)];
    sr[1] = w.l[static_cast<std::size_t>(i)];
  }
}

// ---- earlier chunks: gathered query rows against one key tile, keys along the lanes --------
// A chunk's key tile is transposed once (kt [K][Bk]) and serves every query row that selected
// the chunk; the rows are read in place (query copy, softmax state) through row pointers, in
// blocks of RS rows: no gathered copies, no padding rows, no transposition per row.
inline constexpr index_t rs = 6;  // rows per block: RS x Bk/L score accumulators (24 for float)

template <class T>
inline constexpr index_t kvec = key_tile / L<T>;  // key vectors per tile (4 floats / 8 doubles)

#if defined(__GNUC__)
#define SEQMIX_MOBA_INLINE __attribute__((always_inline))
#else
#define SEQMIX_MOBA_INLINE
#endif

/// s[r][0:Bk] = scale · Σ_d q_r[d] · kt[d][0:Bk] for R rows.
template <class T, index_t R>
SEQMIX_MOBA_INLINE inline void row_scores(const T* const* qr, const T* kt, index_t K, T scale,
                                          T* s) {
  constexpr index_t NV = kvec<T>;
  std::array<std::array<batch<T>, static_cast<std::size_t>(NV)>, static_cast<std::size_t>(R)> a;
  for (auto& row : a)
    for (auto& x : row) x = batch<T>(T(0));
  for (index_t d = 0; d < K; ++d) {
    std::array<batch<T>, static_cast<std::size_t>(NV)> kd;
    for (index_t c = 0; c < NV; ++c)
      kd[static_cast<std::size_t>(c)] = simd::load(kt + d * key_tile + c * L<T>);
    for (index_t r = 0; r < R; ++r) {
      const batch<T> qv(qr[r][d]);
      for (index_t c = 0; c < NV; ++c)
        a[static_cast<std::size_t>(r)][static_cast<std::size_t>(c)] =
            simd::fma(qv, kd[static_cast<std::size_t>(c)],
                      a[static_cast<std::size_t>(r)][static_cast<std::size_t>(c)]);
    }
  }
  const batch<T> sc(scale);
  for (index_t r = 0; r < R; ++r)
    for (index_t c = 0; c < NV; ++c)
      simd::store(s + r * key_tile + c * L<T>,
                  a[static_cast<std::size_t>(r)][static_cast<std::size_t>(c)] * sc);
}

/// acc_r[c0 : c0 + CV·L] = alpha_r · acc_r + Σ_{j < kn} p[r][j] · v[j][c0 : ..] for R rows.
template <class T, index_t R, index_t CV>
SEQMIX_MOBA_INLINE inline void row_pv(const T* p, index_t kn, const T* v, index_t v_stride,
                                      const T* alpha, T* const* acc, index_t c0) {
  std::array<std::array<batch<T>, static_cast<std::size_t>(CV)>, static_cast<std::size_t>(R)> a;
  for (index_t r = 0; r < R; ++r) {
    const batch<T> al(alpha[r]);
    for (index_t c = 0; c < CV; ++c)
      a[static_cast<std::size_t>(r)][static_cast<std::size_t>(c)] =
          al * simd::load(acc[r] + c0 + c * L<T>);
  }
  for (index_t j = 0; j < kn; ++j) {
    std::array<batch<T>, static_cast<std::size_t>(CV)> vj;
    for (index_t c = 0; c < CV; ++c)
      vj[static_cast<std::size_t>(c)] = simd::load(v + j * v_stride + c0 + c * L<T>);
    for (index_t r = 0; r < R; ++r) {
      const batch<T> pr(p[r * key_tile + j]);
      for (index_t c = 0; c < CV; ++c)
        a[static_cast<std::size_t>(r)][static_cast<std::size_t>(c)] =
            simd::fma(pr, vj[static_cast<std::size_t>(c)],
                      a[static_cast<std::size_t>(r)][static_cast<std::size_t>(c)]);
    }
  }
  for (index_t r = 0; r < R; ++r)
    for (index_t c = 0; c < CV; ++c)
      simd::store(acc[r] + c0 + c * L<T>,
                  a[static_cast<std::size_t>(r)][static_cast<std::size_t>(c)]);
}

/// R gathered rows (state rows st[r]: m, l, then acc at +L) against the packed key tile of kn
/// keys (values v, all keys visible: the chunk is strictly earlier than every row's own).
template <class T, index_t R>
inline void row_block(const T* const* qr, T* const* st, const T* kt, index_t kn, const T* v,
                      const params<T>& p, T* s) {
  const index_t K = p.key_dim, V = p.value_dim;
  const T ninf = -std::numeric_limits<T>::infinity();
  row_scores<T, R>(qr, kt, K, p.scale, s);
  std::array<T, static_cast<std::size_t>(R)> alpha;
  std::array<T*, static_cast<std::size_t>(R)> acc, mp, lp;
  for (index_t r = 0; r < R; ++r) {
    T* sr = s + r * key_tile;
    for (index_t j = kn; j < key_tile; ++j) sr[j] = ninf;  // lanes past the tile's keys
    mp[static_cast<std::size_t>(r)] = st[r];
    lp[static_cast<std::size_t>(r)] = st[r] + 1;
    acc[static_cast<std::size_t>(r)] = st[r] + L<T>;
  }
  at::rows_online_softmax<T, R>(s, key_tile, kvec<T>, mp.data(), lp.data(), alpha.data());
  const index_t Vfull = V / (4 * L<T>)*(4 * L<T>), Vvec = V / L<T> * L<T>;
  index_t c0 = 0;
  for (; c0 < Vfull; c0 += 4 * L<T>) row_pv<T, R, 4>(s, kn, v, V, alpha.data(), acc.data(), c0);
  for (; c0 < Vvec; c0 += L<T>) row_pv<T, R, 1>(s, kn, v, V, alpha.data(), acc.data(), c0);
  for (; c0 < V; ++c0) {  // scalar tail of odd value dims
    for (index_t r = 0; r < R; ++r) {
      T a = alpha[static_cast<std::size_t>(r)] * acc[static_cast<std::size_t>(r)][c0];
      for (index_t j = 0; j < kn; ++j) a += s[r * key_tile + j] * v[j * V + c0];
      acc[static_cast<std::size_t>(r)][c0] = a;
    }
  }
}

/// Every row of `rows` (n of them) against keys [j0, j0 + kn) of the item (kn <= Bk).
template <class T>
void chunk_rows(const problem<T>& pr, const params<T>& p, const index_t* rows, index_t n,
                index_t j0, index_t kn, scratch<T>& w) {
  const index_t K = p.key_dim;
  T* kt = w.kt.data();
  for (index_t j = 0; j < key_tile; ++j) {  // transpose the key tile once (zero past kn)
    const T* kj = pr.k + (j0 + j) * pr.k_stride;
    for (index_t d = 0; d < K; ++d) kt[d * key_tile + j] = j < kn ? kj[d] : T(0);
  }
  const T* v = pr.v + j0 * pr.v_stride;
  std::array<const T*, static_cast<std::size_t>(rs)> qr{};
  std::array<T*, static_cast<std::size_t>(rs)> st{};
  index_t e = 0;
  for (; e + rs <= n; e += rs) {
#if defined(__GNUC__)
    // rows a few blocks ahead are scattered over megabytes: ask for them now
    for (index_t i = e + 4 * rs; i < std::min(n, e + 5 * rs); ++i) {
      const char* q = reinterpret_cast<const char*>(w.qc.data() + rows[i] * K);
      const char* sp = reinterpret_cast<const char*>(w.state.data() + rows[i] * w.ss);
      for (index_t b = 0; b < K * index_t(sizeof(T)); b += 64) __builtin_prefetch(q + b, 0, 3);
      for (index_t b = 0; b < w.ss * index_t(sizeof(T)); b += 64) __builtin_prefetch(sp + b, 1, 3);
    }
#endif
    for (index_t r = 0; r < rs; ++r) {
      qr[static_cast<std::size_t>(r)] = w.qc.data() + rows[e + r] * K;
      st[static_cast<std::size_t>(r)] = w.state.data() + rows[e + r] * w.ss;
    }
    row_block<T, rs>(qr.data(), st.data(), kt, kn, v, p, w.srow.data());
  }
  for (; e < n; ++e) {
    qr[0] = w.qc.data() + rows[e] * K;
    st[0] = w.state.data() + rows[e] * w.ss;
    row_block<T, 1>(qr.data(), st.data(), kt, kn, v, p, w.srow.data());
  }
}

/// Gates and top-(k-1) of the query rows r0 .. r0 + nr - 1 (consecutive positions).
template <class T>
void select_tile(const problem<T>& pr, const params<T>& p, index_t r0, index_t nr, scratch<T>& w) {
  constexpr index_t Qn = Q<T>;
  const index_t K = p.key_dim, c = p.chunk, k1 = p.top_k - 1;
  const index_t pos_lo = pr.q_pos0 + r0;
  const index_t nb = (pos_lo + nr - 1) / c;  // chunks before the last row's own
  for (index_t i = 0; i < nr; ++i) w.nsel[static_cast<std::size_t>(r0 + i)] = 0;
  if (nb == 0 || k1 == 0) return;
  T* qt = w.qt.data();
  for (index_t i = 0; i < Qn; ++i) {
    if (i < nr) {
      const T* qi = w.qc.data() + (r0 + i) * K;
      for (index_t d = 0; d < K; ++d) qt[d * Qn + i] = qi[d];  // unscaled: the gate has no scale
    } else {
      for (index_t d = 0; d < K; ++d) qt[d * Qn + i] = T(0);
    }
  }
  T* g = w.gst.data();
  index_t b = 0;
  for (; b + at::rk <= nb; b += at::rk)
    at::scores_block<T, at::rk>(pr.means + b * K, K, qt, K, g + b * Qn);
  for (; b < nb; ++b) at::scores_block<T, 1>(pr.means + b * K, K, qt, K, g + b * Qn);

  // Per lane, a sorted top-(k-1) list [k-1][Q] (value, chunk as T; chunk -1: empty slot),
  // kept by an insertion network over whole SIMD vectors: chunk b enters at the top of the list
  // and sinks past every entry it beats, exchanging places, so the list stays sorted by (gate
  // descending, chunk ascending) with empty slots last, and no branch depends on the data.
  auto& top = w.top;  // sized by prepare
  T* tv = top.val.data();
  T* ti = top.fidx.data();
  const T ninf = -std::numeric_limits<T>::infinity();
  std::fill_n(tv, k1 * Qn, ninf);
  std::fill_n(ti, k1 * Qn, T(-1));
  // lane i takes chunks b < own chunk of row i: (pos_lo + i) / c
  alignas(64) std::array<T, static_cast<std::size_t>(Qn)> own{};
  for (index_t i = 0; i < Qn; ++i)
    own[static_cast<std::size_t>(i)] = i < nr ? T((pos_lo + i) / c) : T(0);
  const batch<T> neg_inf(ninf), zero(T(0)), none(T(-1));
  for (b = 0; b < nb; ++b) {
    const T* gb = g + b * Qn;
    const batch<T> bb = batch<T>(T(b));
    for (index_t cc = 0; cc < at::qv; ++cc) {
      const index_t off = cc * L<T>;
      batch<T> x = simd::load(gb + off);
      x = xsimd::select(xsimd::isnan(x), neg_inf, x);  // NaN ranks as -inf
      batch<T> xi = xsimd::select(bb < simd::load(own.data() + off), bb, none);
      {  // most chunks beat no lane's last entry: then none of the list changes
        const batch<T> v = simd::load(tv + (k1 - 1) * Qn + off);
        const batch<T> vi = simd::load(ti + (k1 - 1) * Qn + off);
        if (!xsimd::any((xi >= zero) && ((vi < zero) || (x > v) || ((x == v) && (xi < vi)))))
          continue;
      }
      for (index_t j = 0; j < k1; ++j) {
        T* vp = tv + j * Qn + off;
        T* ip = ti + j * Qn + off;
        const batch<T> v = simd::load(vp), vi = simd::load(ip);
        const auto win = (xi >= zero) && ((vi < zero) || (x > v) || ((x == v) && (xi < vi)));
        simd::store(vp, xsimd::select(win, x, v));
        simd::store(ip, xsimd::select(win, xi, vi));
        x = xsimd::select(win, v, x);
        xi = xsimd::select(win, vi, xi);
      }
    }
  }
  for (index_t i = 0; i < nr; ++i) {
    std::int32_t* sr = w.sel.data() + (r0 + i) * k1;
    index_t n = 0;
    for (index_t j = 0; j < k1; ++j) {
      const T id = ti[j * Qn + i];
      if (id >= T(0)) sr[n++] = static_cast<std::int32_t>(id);
    }
    std::sort(sr, sr + n);
    w.nsel[static_cast<std::size_t>(r0 + i)] = n;
  }
}

/// Takes a scratch from `f` for problems of at most max_nq rows ending at or before position
/// max_end (before the parallel region, so nothing inside it allocates or throws). Buffers
/// that are always written before they are read are left uninitialised.
template <class T>
void prepare(workspace::frame& f, scratch<T>& w, const params<T>& p, index_t max_nq,
             index_t max_end) {
  constexpr index_t Qn = Q<T>;
  const index_t K = p.key_dim, V = p.value_dim, k1 = std::max<index_t>(p.top_k - 1, 1);
  const index_t nb = std::max<index_t>((max_end - 1) / p.chunk, 0);
  w.acc_stride = (V + L<T> - 1) / L<T> * L<T>;
  w.qt = f.take<T>(K * Qn, T(0));
  w.st = f.take<T>(key_tile * Qn, T(0));
  w.kt = f.take<T>(K * key_tile, T(0));
  w.srow = f.take<T>(rs * key_tile, T(0));
  w.gst = f.take<T>(std::max<index_t>(nb, 1) * Qn);
  w.acc = f.take<T>(Qn * w.acc_stride, T(0));
  w.m = f.take<T>(Qn, T(0));
  w.l = f.take<T>(Qn, T(0));
  w.alpha = f.take<T>(Qn, T(0));
  w.ss = w.acc_stride + L<T>;
  w.qc = f.take<T>(max_nq * K);
  w.state = f.take<T>(max_nq * w.ss);
  w.sel = f.take<std::int32_t>(max_nq * k1);
  w.nsel = f.take<index_t>(max_nq);
  w.list = f.take<index_t>(std::max<index_t>(max_nq * k1, 1));
  w.start = f.take<index_t>(nb + 2);
  w.rows = f.take<index_t>(Qn);
  w.top.val = f.take<T>(Qn * k1);
  w.top.fidx = f.take<T>(Qn * k1);
}

/// One work item: a whole problem (scratch prepared for it). With pr.o == nullptr only the
/// selection is computed (into pr.selected).
template <class T>
void run_problem(const problem<T>& pr, const params<T>& p, scratch<T>& w) {
  constexpr index_t Qn = Q<T>;
  const index_t V = p.value_dim, c = p.chunk, k1 = p.top_k - 1;
  const index_t nq = pr.nq;
  if (nq <= 0) return;
  w.acc_stride = (V + L<T> - 1) / L<T> * L<T>;
  w.ss = w.acc_stride + L<T>;
  for (index_t r = 0; r < nq; ++r)
    std::copy_n(pr.q + r * pr.q_stride, p.key_dim, w.qc.data() + r * p.key_dim);

  // 1. selection
  for (index_t r0 = 0; r0 < nq; r0 += Qn) select_tile(pr, p, r0, std::min(Qn, nq - r0), w);
  if (pr.selected) {
    for (index_t r = 0; r < nq; ++r) {
      const index_t n = w.nsel[static_cast<std::size_t>(r)];
      std::copy_n(w.sel.data() + r * k1, n, pr.selected + r * k1);
      std::fill(pr.selected + r * k1 + n, pr.selected + (r + 1) * k1, std::int32_t(-1));
    }
  }
  if (!pr.o) return;
  const T ninf = -std::numeric_limits<T>::infinity();
  for (index_t r = 0; r < nq; ++r) {
    T* sr = w.state.data() + r * w.ss;
    sr[0] = ninf;
    sr[1] = T(0);
    std::fill_n(sr + L<T>, V, T(0));
  }
  // 2. per earlier chunk, the rows that selected it (ascending)
  const index_t pos_end = pr.q_pos0 + nq;
  const index_t nb = (pos_end - 1) / c;
  std::fill_n(w.start.data(), nb + 2, index_t(0));
  for (index_t r = 0; r < nq; ++r) {
    const std::int32_t* s = w.sel.data() + r * k1;
    for (index_t e = 0; e < w.nsel[static_cast<std::size_t>(r)]; ++e)
      ++w.start[static_cast<std::size_t>(s[e]) + 1];
  }
  for (index_t b = 0; b < nb; ++b)
    w.start[static_cast<std::size_t>(b + 1)] += w.start[static_cast<std::size_t>(b)];
  for (index_t r = 0; r < nq; ++r) {
    const std::int32_t* s = w.sel.data() + r * k1;
    for (index_t e = 0; e < w.nsel[static_cast<std::size_t>(r)]; ++e)
      w.list[static_cast<std::size_t>(w.start[static_cast<std::size_t>(s[e])]++)] = r;
  }
  // start[b] is now the end of b's list; b's list begins at start[b - 1] (0 for b = 0)
  // 3a. earlier chunks, ascending: each key tile once against every row that selected it
  for (index_t b = 0; b < nb; ++b) {
    const index_t lb = b == 0 ? 0 : w.start[static_cast<std::size_t>(b - 1)];
    const index_t le = w.start[static_cast<std::size_t>(b)];
    if (le == lb) continue;
    for (index_t j0 = b * c; j0 < (b + 1) * c; j0 += key_tile)
      chunk_rows(pr, p, w.list.data() + lb, le - lb, j0, std::min(key_tile, (b + 1) * c - j0), w);
  }
  // 3b. own chunks: tiles of consecutive rows that never cross a chunk boundary
  for (index_t r0 = 0; r0 < nq;) {
    const index_t pos = pr.q_pos0 + r0;
    const index_t cs = pos / c * c;
    const index_t nr = std::min({Qn, nq - r0, cs + c - pos});
    for (index_t i = 0; i < nr; ++i) w.rows[static_cast<std::size_t>(i)] = r0 + i;
    tile_pass(pr, p, w.rows.data(), nr, cs, pos + nr, true, pos, w);
    r0 += nr;
  }
  // epilogue
  for (index_t r = 0; r < nq; ++r) {
    const T* sr = w.state.data() + r * w.ss;
    const T inv = T(1) / sr[1];
    T* o = pr.o + r * pr.o_stride;
    for (index_t d = 0; d < V; ++d) o[d] = sr[L<T> + d] * inv;
  }
}

}  // namespace detail

/// Runs every problem in one parallel region, longest first (a static split then balances
/// the sequences of a varlen batch reasonably); each problem is one thread's, start to end.
/// Scratch: this thread's workspace (nothing allocated once it has grown).
template <class T>
void run_problems(std::span<const problem<T>> probs, const params<T>& p) {
  if (probs.empty()) return;
  auto frame = thread_workspace().scope();
  std::span<index_t> order = frame.take<index_t>(static_cast<index_t>(probs.size()));
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = static_cast<index_t>(i);
  // (a stable insertion sort: std::stable_sort may allocate a buffer)
  for (std::size_t i = 1; i < order.size(); ++i) {
    const index_t x = order[i];
    std::size_t j = i;
    while (j > 0 && probs[static_cast<std::size_t>(order[j - 1])].nq <
                        probs[static_cast<std::size_t>(x)].nq) {
      order[j] = order[j - 1];
      --j;
    }
    order[j] = x;
  }
  const int slots = max_slots();
  std::span<detail::scratch<T>> ws = frame.take<detail::scratch<T>>(slots);
  index_t max_nq = 1, max_end = 1;
  for (const auto& pr : probs) {
    max_nq = std::max(max_nq, pr.nq);
    max_end = std::max(max_end, pr.q_pos0 + pr.nq);
  }
  for (auto& w : ws) {
    w = detail::scratch<T>{};
    detail::prepare(frame, w, p, max_nq, max_end);
  }
  parallel_for_with_slot(static_cast<index_t>(order.size()), [&](index_t n, int tid) {
    detail::run_problem(probs[static_cast<std::size_t>(order[static_cast<std::size_t>(n)])], p,
                        ws[static_cast<std::size_t>(tid)]);
  });
}

/// Complete-chunk means of a sequence's keys: means[b] = mean of keys b·c .. b·c + c - 1 for
/// b < nb (rows of stride k_stride; means rows of K). sum: [K] scratch.
template <class T>
void chunk_means(const T* k, index_t k_stride, index_t nb, index_t c, index_t K, T* means,
                 double* sum) {
  for (index_t b = 0; b < nb; ++b)
    detail::chunk_mean(k + b * c * k_stride, k_stride, c, K, sum, means + b * K);
}

/// Decode gates: g[b] = Σ_d q[d] · mt[d][b] for b < nb (mt: [K, ld] transposed means, ld a
/// multiple of the SIMD width and >= nb rounded up to it; g: as many entries), the same fma
/// sequence over d, from 0, as the tile's scores kernel (so the same chunks are selected).
template <class T>
void decode_gates(const T* q, const T* mt, index_t ld, index_t nb, index_t K, T* g) {
  constexpr index_t Ln = detail::L<T>;
  for (index_t b = 0; b < nb; b += Ln) {
    detail::batch<T> acc(T(0));
    for (index_t d = 0; d < K; ++d)
      acc = simd::fma(detail::batch<T>(q[d]), simd::load(mt + d * ld + b), acc);
    simd::store(g + b, acc);
  }
}

/// Top-(k1) chunks of gates g[0..nb) (rank order as in the tiles), written ascending to sel;
/// returns their count. val: [k1] scratch.
template <class T>
index_t decode_select(const T* g, index_t nb, index_t k1, std::int32_t* sel, T* val) {
  index_t n = 0;
  for (index_t b = 0; b < nb; ++b) {
    const T x = detail::rank_value(g[b]);
    if (n == k1) {
      if (!(x > val[k1 - 1])) continue;
      --n;
    }
    index_t p = n;
    while (p > 0 && x > val[p - 1]) {
      val[p] = val[p - 1];
      sel[p] = sel[p - 1];
      --p;
    }
    val[p] = x;
    sel[p] = static_cast<std::int32_t>(b);
    ++n;
  }
  std::sort(sel, sel + n);
  return n;
}

}  // namespace seqmix::kernels::moba

#undef SEQMIX_MOBA_INLINE
