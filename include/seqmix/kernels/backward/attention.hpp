// SPDX-License-Identifier: MIT
// Flash backward of causal softmax attention, optionally windowed (docs/math.md §8): tiles of C
// queries × C keys, recomputed, never a T×T matrix.
//
//   forward   Z = s Q Kᵀ (masked: key j visible to query t iff j <= t and t - j < W), P =
//   softmax(Z)
//             row by row, O = P V
//   backward  dV = Pᵀ dO,  dP = dO Vᵀ,  dZ = P ⊙ (dP - δ),  δ_t = do_t · o_t,
//             dQ = s dZ K,  dK = s dZᵀ Q
//
// Per (batch, kv head) item and each query head of its group: pass 1 recomputes, per query
// tile, the row statistics (LSE_t = m_t + log l_t, online over the visible key tiles) and the
// output O (returned when asked), hence δ; pass 2 walks the key tiles and, for each, the query
// tiles that see it: P = e^{Z - LSE} (each entry e^{<=0}), dV_j += Pᵀ dO_i, dZ as above,
// dQ_i += s dZ K_j (into the output rows, owned by this item), dK_j += s dZᵀ Q_i.
//
// Cost per query head and visible (query, key) pair: pass 1 2·(K+V) FLOP, pass 2 2·(3K+2V)
// (about 3.5x the forward's 2·(K+V)); causal has T(T+1)/2 pairs, a window W about T·W. Memory
// per thread: the kv head's keys and values transposed ((K+V)·T values, so no tile packs Kᵀ or
// Vᵀ), O(T) row statistics and O(C·(C+K+V)) tiles. Items run in parallel, each on one
// thread with a fixed order: results are bitwise the same for any thread count.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <seqmix/core/gemm.hpp>
#include <seqmix/core/parallel.hpp>
#include <seqmix/core/simd.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/kernels/backward/gated.hpp>

namespace seqmix::kernels::backward {

/// One call; the front (mixers/backward.hpp) checks shapes.
template <class T>
struct attention_problem {
  tensor_view<const T, 4> q;    ///< [B,T,H,K]
  tensor_view<const T, 4> k;    ///< [B,T,Hkv,K]
  tensor_view<const T, 4> v;    ///< [B,T,Hkv,V]
  tensor_view<const T, 4> do_;  ///< [B,T,H,V]
  tensor_view<T, 4> dq;         ///< [B,T,H,K]
  tensor_view<T, 4> dk;         ///< [B,T,Hkv,K]
  tensor_view<T, 4> dv;         ///< [B,T,Hkv,V]
  tensor_view<T, 4> o;          ///< [B,T,H,V] optional out
  T scale = T(1);
  index_t window = 0;  ///< 0: unbounded
};

namespace detail {

template <class T>
struct attention_scratch {
  std::vector<T> lse, delta, Z, dZ, O, tmp, KT, VT, pack;
  std::vector<T> m, l;
};

/// Z (ldz = C) = s Q_i K_jᵀ for query rows [i0, i0+ni) and keys [j0, j0+nj), masked to -inf.
/// KT: the kv head's keys transposed, [K, T] (one transposition per item, not one pack per tile).
template <class T>
void scores(const attention_problem<T>& p, index_t b, index_t h, const T* KT, index_t i0,
            index_t ni, index_t j0, index_t nj, index_t C, T* Z, std::vector<T>& pack) {
  linalg::gemm<T, false, false>(ni, nj, p.q.extent(3), p.q.ptr({b, i0, h, 0}), p.q.stride(1),
                                KT + j0, p.q.extent(1), Z, C, false, pack);
  const T ninf = -std::numeric_limits<T>::infinity();
  for (index_t r = 0; r < ni; ++r) {
    const index_t t = i0 + r;
    T* z = Z + r * C;
    for (index_t c = 0; c < nj; ++c) {
      const index_t j = j0 + c;
      const bool visible = j <= t && (p.window <= 0 || t - j < p.window);
      z[c] = visible ? p.scale * z[c] : ninf;
    }
  }
}

/// First key visible to any query in [i0, i1): the window's left edge.
inline index_t first_key(index_t i0, index_t window) {
  return window > 0 ? std::max<index_t>(0, i0 - window + 1) : 0;
}

template <class T>
void attention_head(const attention_problem<T>& p, index_t C, index_t b, index_t h, index_t hk,
                    attention_scratch<T>& s) {
  const T* KT = s.KT.data();
  const T* VT = s.VT.data();
  const index_t TT = p.q.extent(1), K = p.q.extent(3), V = p.v.extent(3);
  const auto sz = [](index_t n) { return static_cast<std::size_t>(n); };
  s.lse.resize(sz(TT));
  s.delta.resize(sz(TT));
  s.Z.resize(sz(C * C));
  s.dZ.resize(sz(C * C));
  s.O.resize(sz(C * V));
  s.tmp.resize(sz(C * std::max(K, V)));
  s.m.resize(sz(C));
  s.l.resize(sz(C));
  T* Z = s.Z.data();
  T* dZ = s.dZ.data();
  // ---- pass 1: row statistics and the output --------------------------------------------------
  for (index_t i0 = 0; i0 < TT; i0 += C) {
    const index_t ni = std::min(C, TT - i0);
    std::fill_n(s.m.data(), ni, -std::numeric_limits<T>::infinity());
    std::fill_n(s.l.data(), ni, T(0));
    std::fill_n(s.O.data(), ni * V, T(0));
    const index_t jfirst = first_key(i0, p.window) / C * C;
    for (index_t j0 = jfirst; j0 < i0 + ni; j0 += C) {
      const index_t nj = std::min(C, TT - j0);
      scores(p, b, h, KT, i0, ni, j0, nj, C, Z, s.pack);
      for (index_t r = 0; r < ni; ++r) {
        T* z = Z + r * C;
        T mx = s.m[sz(r)];
        for (index_t c = 0; c < nj; ++c) mx = std::max(mx, z[c]);
        if (mx == -std::numeric_limits<T>::infinity()) {  // nothing visible in this tile yet
          std::fill_n(z, nj, T(0));
          continue;
        }
        const T alpha =
            s.m[sz(r)] == -std::numeric_limits<T>::infinity() ? T(0) : std::exp(s.m[sz(r)] - mx);
        for (index_t c = 0; c < nj; ++c) z[c] -= mx;
        exp_inplace(z, nj);
        T sum = T(0);
        for (index_t c = 0; c < nj; ++c) sum += z[c];
        s.l[sz(r)] = s.l[sz(r)] * alpha + sum;
        s.m[sz(r)] = mx;
        T* orow = s.O.data() + r * V;
        for (index_t c = 0; c < V; ++c) orow[c] *= alpha;
      }
      linalg::gemm<T, false, false>(ni, V, nj, Z, C, p.v.ptr({b, j0, hk, 0}), p.v.stride(1),
                                    s.O.data(), V, true, s.pack);
    }
    for (index_t r = 0; r < ni; ++r) {
      const index_t t = i0 + r;
      const T inv = T(1) / s.l[sz(r)];
      T* orow = s.O.data() + r * V;
      const T* dorow = p.do_.ptr({b, t, h, 0});
      T d = T(0);
      for (index_t c = 0; c < V; ++c) {
        orow[c] *= inv;
        d += dorow[c] * orow[c];
      }
      s.delta[sz(t)] = d;
      s.lse[sz(t)] = s.m[sz(r)] + std::log(s.l[sz(r)]);
      if (p.o.data()) std::copy_n(orow, V, p.o.ptr({b, t, h, 0}));
    }
  }
  // ---- pass 2: key tiles ---------------------------------------------------------------------
  for (index_t t = 0; t < TT; ++t) std::fill_n(p.dq.ptr({b, t, h, 0}), K, T(0));
  for (index_t j0 = 0; j0 < TT; j0 += C) {
    const index_t nj = std::min(C, TT - j0);
    const index_t ilast = p.window > 0 ? std::min(TT, j0 + nj - 1 + p.window) : TT;
    for (index_t i0 = j0 / C * C; i0 < ilast; i0 += C) {
      const index_t ni = std::min(C, TT - i0);
      scores(p, b, h, KT, i0, ni, j0, nj, C, Z, s.pack);
      for (index_t r = 0; r < ni; ++r) {
        T* z = Z + r * C;
        const T lse = s.lse[sz(i0 + r)];
        for (index_t c = 0; c < nj; ++c) z[c] -= lse;
        exp_inplace(z, nj);  // P (masked entries: e^{-inf} = 0)
      }
      const T* dor = p.do_.ptr({b, i0, h, 0});
      const index_t ldo = p.do_.stride(1);
      // dV_j += Pᵀ dO_i
      linalg::gemm<T, true, false>(nj, V, ni, Z, C, dor, ldo, p.dv.ptr({b, j0, hk, 0}),
                                   p.dv.stride(1), true, s.pack);
      // dP = dO_i V_jᵀ, dZ = P ⊙ (dP - δ) · s
      linalg::gemm<T, false, false>(ni, nj, V, dor, ldo, VT + j0, TT, dZ, C, false, s.pack);
      for (index_t r = 0; r < ni; ++r) {
        const T d = s.delta[sz(i0 + r)];
        for (index_t c = 0; c < nj; ++c)
          dZ[r * C + c] = p.scale * Z[r * C + c] * (dZ[r * C + c] - d);
      }
      // dQ_i += dZ K_j ; dK_j += dZᵀ Q_i
      linalg::gemm<T, false, false>(ni, K, nj, dZ, C, p.k.ptr({b, j0, hk, 0}), p.k.stride(1),
                                    p.dq.ptr({b, i0, h, 0}), p.dq.stride(1), true, s.pack);
      linalg::gemm<T, true, false>(nj, K, ni, dZ, C, p.q.ptr({b, i0, h, 0}), p.q.stride(1),
                                   p.dk.ptr({b, j0, hk, 0}), p.dk.stride(1), true, s.pack);
    }
  }
}

}  // namespace detail

/// Runs the flash backward with tiles of C rows.
template <class T>
void attention_backward(const attention_problem<T>& p, index_t C) {
  const index_t B = p.q.extent(0), TT = p.q.extent(1), H = p.q.extent(2), Hkv = p.k.extent(2);
  const index_t group = H / Hkv, K = p.q.extent(3), V = p.v.extent(3);
  thread_local std::vector<detail::attention_scratch<T>> scratch;  // grow-only, per caller
  if (scratch.size() < static_cast<std::size_t>(max_slots()))
    scratch.resize(static_cast<std::size_t>(max_slots()));
  // the workers index the caller's slots (a thread_local named inside the lambda would be theirs)
  auto* slots = scratch.data();
  parallel_for_with_slot(B * Hkv, [&](index_t item, int tid) {
    const index_t b = item / Hkv, hk = item % Hkv;
    auto& s = slots[tid];
    s.KT.resize(static_cast<std::size_t>(K * TT));
    s.VT.resize(static_cast<std::size_t>(V * TT));
    for (index_t t = 0; t < TT; ++t) {
      std::fill_n(p.dk.ptr({b, t, hk, 0}), K, T(0));
      std::fill_n(p.dv.ptr({b, t, hk, 0}), V, T(0));
      const T* kr = p.k.ptr({b, t, hk, 0});
      const T* vr = p.v.ptr({b, t, hk, 0});
      for (index_t d = 0; d < K; ++d) s.KT[static_cast<std::size_t>(d * TT + t)] = kr[d];
      for (index_t d = 0; d < V; ++d) s.VT[static_cast<std::size_t>(d * TT + t)] = vr[d];
    }
    for (index_t h = hk * group; h < (hk + 1) * group; ++h)
      detail::attention_head(p, C, b, h, hk, s);
  });
}

}  // namespace seqmix::kernels::backward
