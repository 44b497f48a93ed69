// SPDX-License-Identifier: MIT
// Chunked backward of the gated-accumulation family (docs/math.md §8): linear attention, simple
// GLA (scalar gate), GLA (per-key gate) and, through a key scale c_t, Mamba2 SSD.
//
//   forward  S_t = Diag(e^{gk_t + g_t}) S_{t-1} + c_t k_t v_tᵀ,   o_t = S_tᵀ (s q_t)
//   loss     L = Σ o·do + Σ S_T·dht;   gradients of q, k, v, g / gk, c and S_0 (h0)
//
// Per (sequence, head), chunks of C tokens with chunk-local cumulative gates b_r (double,
// inclusive of row r), Γ = b_{L-1}, and the state S_n entering chunk n:
//   o_r = Σ_{j<=r} A_rj v_j + Q̄_rᵀ S_n,  A_rj = s q_r·(c_j k_j ⊙ e^{b_r - b_j}),  Q̄_r = s q_r ⊙
//   e^{b_r} S_{n+1} = e^Γ ⊙ S_n + K̂ᵀ V,          K̂_j = c_j k_j ⊙ e^{Γ - b_j}
// Backward (dS = gradient of S_{n+1}, chunks in reverse order):
//   dA = (dO Vᵀ) masked to j <= r;   dV = Aᵀ dO + K̂ dS
//   dq_r = s Σ_j dA_rj (c_j k_j ⊙ e^{b_r-b_j}) + s e^{b_r} ⊙ (S_n do_r)
//   d(c_j k_j) = s Σ_r dA_rj (q_r ⊙ e^{b_r-b_j}) + e^{Γ-b_j} ⊙ (dS v_j)
//   dS_n = e^Γ ⊙ dS + Q̄ᵀ dO
// Gate gradients need no extra pass: the log gates enter only through the global cumulative gate
// G_t, as q_t e^{G_t}, k_t e^{-G_t} and e^{G_T} S_T's prefactor, so
//   dL/dG_t = q_t ⊙ dq_t - k_t ⊙ dk_t (+ rowsum(dht ⊙ S_T) at the last token),
//   dgk_t = Σ_{t' >= t} dL/dG_t' (a reverse cumulative sum in double), dg_t = Σ_i dgk_t,i,
// formed from this head's own dq, dk before the query/key heads of a group are summed.
//
// Numerics: log gates are clamped at -1e4 per token (exp is exactly 0 there in float and double,
// so -inf and "kill" gates are exact and -inf - -inf never happens); exponents are differences
// formed in double and rounded to T just before exp. Every factor is e^{<=0} for gates <= 0:
// the intra-chunk terms of a per-key gate factor through the first row ρ of the query's
// sub-chunk of 16 rows, e^{b_r - b_j} = e^{b_r - b_ρ} e^{b_ρ - b_j} (both <= 1 for earlier
// sub-chunks); the 16×16 diagonal block joins that GEMM when the sub-chunk spans at most
// e^{±diag_bound} in every channel, else it is formed pair by pair (strong gates, kills).
// Scalar gates use the C×C decay matrix directly.
//
// Saved state (measured choice, docs/math.md §8): the backward recomputes the chunk-boundary
// states S_0..S_{T/C} of the head it works on (one GEMM per chunk, 2·K·V FLOP per token, about
// 10 % of the backward) instead of taking them from a training-mode forward, so the forward saves
// nothing and the backward's extra memory is (T/C + 1)·K·V + O(C·(C+K+V)) per thread, flat in
// the number of heads; per token that is K·V/C values (64 values at K = V = 64, C = 64).
//
// Dimensions: B batch, T tokens, H heads of v/o/state, Hk heads of q/k (H % Hk == 0), K key
// size, V value size, C chunk, N sequences (cu_seqlens with B == 1). Cost per (sequence, head)
// and token: about 2C(3K+2V)·5/8 + 10KV FLOP (triangular products on 16-row blocks), plus about
// 6·K exps for a per-key gate (14·K where its diagonal blocks go pair by pair).
// Parallel over (sequence, q/k head) items, each one thread's: results are bitwise the same for
// any thread count (the chunk scheduler's reverse direction in kernels/common was not available
// when this was written: this is its own static loop over items).
#pragma once

#include <algorithm>
#include <cmath>
#include <span>
#include <type_traits>
#include <vector>

#include <seqmix/core/error.hpp>
#include <seqmix/core/gemm.hpp>
#include <seqmix/core/parallel.hpp>
#include <seqmix/core/simd.hpp>
#include <seqmix/core/tensor.hpp>

namespace seqmix::kernels::backward {

/// One backward call. Empty views: absent input (zero h0 / dht, no gate, c = 1) or gradient not
/// wanted (dg, dgk, dk_scale, dh0). dq, dk, dv are always written.
template <class T>
struct gated_problem {
  tensor_view<const T, 4> q, k;     ///< [B,T,Hk,K]
  tensor_view<const T, 4> v;        ///< [B,T,H,V]
  tensor_view<const T, 3> g;        ///< [B,T,H] scalar log gate, or empty
  tensor_view<const T, 4> gk;       ///< [B,T,H,K] per-key log gate, or empty
  tensor_view<const T, 3> k_scale;  ///< [B,T,H] c_t, or empty (1)
  tensor_view<const T, 4> h0;       ///< [N,H,K,V] or empty
  tensor_view<const T, 4> do_;      ///< [B,T,H,V]
  tensor_view<const T, 4> dht;      ///< [N,H,K,V] or empty
  tensor_view<T, 4> dq, dk;         ///< [B,T,Hk,K]
  tensor_view<T, 4> dv;             ///< [B,T,H,V]
  tensor_view<T, 3> dg;             ///< [B,T,H]
  tensor_view<T, 4> dgk;            ///< [B,T,H,K]
  tensor_view<T, 3> dk_scale;       ///< [B,T,H]
  tensor_view<T, 4> dh0;            ///< [N,H,K,V]
  tensor_view<T, 4> ht;             ///< [N,H,K,V] optional out: the forward's final state
  T scale = T(1);
  std::span<const index_t> cu_seqlens;

  index_t sequences() const {
    return cu_seqlens.empty() ? q.extent(0) : static_cast<index_t>(cu_seqlens.size()) - 1;
  }
};

namespace detail {

/// Log gates are clamped here: e^{-1e4} is exactly 0 in float and double.
inline constexpr double gate_floor = -1e4;

/// Largest |b_x - b_ρ| a per-key sub-chunk may span for its diagonal block to be factored
/// through row ρ: the k side carries up to e^{diag_bound} (4.9e8 in float), the q side down to
/// e^{-diag_bound}, far from overflow and from subnormals for any ordinary q and k.
template <class T>
inline constexpr double diag_bound = std::is_same_v<T, float> ? 20.0 : 200.0;

/// out[i] = e^{out[i]} in place, arguments clamped at -1e4.
template <class T>
inline void exp_inplace(T* x, index_t n) {
  constexpr index_t L = simd::lanes<T>;
  index_t i = 0;
  const auto lo = simd::broadcast<T>(static_cast<T>(gate_floor));
  for (; i + L <= n; i += L) simd::store(x + i, simd::exp(xsimd::max(simd::load(x + i), lo)));
  for (; i < n; ++i) x[i] = std::exp(std::max(x[i], T(gate_floor)));
}

/// Per-thread buffers; grow-only.
template <class T>
struct gated_scratch {
  std::vector<T> states, dS, Qs, Kc, Qb, Kh, A, dA, dQ, dK, tmp, Qf, Kf, EQ, EK, w, VT, KT, pack;
  std::vector<double> cum, acc;
  void reserve(index_t C, index_t K, index_t V, index_t chunks, index_t W) {
    auto sz = [](index_t n) { return static_cast<std::size_t>(n); };
    states.resize(sz((chunks + 1) * K * V));
    dS.resize(sz(K * V));
    for (auto* b : {&Qs, &Kc, &Qb, &Kh, &dQ, &dK, &Qf, &Kf, &EQ, &EK}) b->resize(sz(C * K));
    tmp.resize(sz(C * std::max(K, V)));
    VT.resize(sz(C * V));
    KT.resize(sz(C * K));
    A.resize(sz(C * C));
    dA.resize(sz(C * C));
    w.resize(sz(std::max(C, K)));
    cum.resize(sz(C * W));
    acc.resize(sz(W));
  }
};

/// Chunk-local cumulative log gates (inclusive), width W (1: scalar or none, K: per key).
template <class T>
void cumulate(const gated_problem<T>& p, index_t b, index_t h, index_t r0, index_t L, index_t W,
              double* cum) {
  const bool per_key = p.gk.data() != nullptr;
  for (index_t w = 0; w < W; ++w) {
    double run = 0;
    for (index_t r = 0; r < L; ++r) {
      double lg = 0;
      if (per_key) lg += static_cast<double>(p.gk(b, r0 + r, h, w));
      if (p.g.data()) lg += static_cast<double>(p.g(b, r0 + r, h));
      run += std::max(lg, gate_floor);
      cum[r * W + w] = run;
    }
  }
}

/// The backward of one (sequence, head); adds (add_qk) or writes this head's dq/dk.
template <class T>
void gated_head(const gated_problem<T>& p, index_t C, index_t b, index_t t0, index_t t1, index_t n,
                index_t h, index_t hk, bool add_qk, gated_scratch<T>& s) {
  const index_t K = p.q.extent(3), V = p.v.extent(3);
  const bool per_key = p.gk.data() != nullptr;
  const index_t W = per_key ? K : 1;
  const index_t len = t1 - t0, chunks = (len + C - 1) / C;
  const auto KV = static_cast<std::size_t>(K * V);
  s.reserve(C, K, V, chunks, W);
  const index_t ldv = p.v.stride(1), ldo = p.do_.stride(1), lddv = p.dv.stride(1);
  auto fexp = [](double x) { return static_cast<T>(std::exp(std::max(x, gate_floor))); };
  auto cscale = [&](index_t t) { return p.k_scale.data() ? p.k_scale(b, t, h) : T(1); };
  // exponent row of e^{Γ - b_j} into w (per channel), then Kh_j = c_j k_j ⊙ it
  auto make_Kh = [&](index_t r0, index_t L, const double* cum) {
    const double* G = cum + (L - 1) * W;
    for (index_t j = 0; j < L; ++j) {
      const T c = cscale(r0 + j);
      const T* kr = p.k.ptr({b, r0 + j, hk, 0});
      T* out = s.Kh.data() + j * K;
      if (per_key) {
        for (index_t i = 0; i < K; ++i) out[i] = static_cast<T>(G[i] - cum[j * W + i]);
        exp_inplace(out, K);
        for (index_t i = 0; i < K; ++i) out[i] *= c * kr[i];
      } else {
        const T e = fexp(G[0] - cum[j]) * c;
        for (index_t i = 0; i < K; ++i) out[i] = e * kr[i];
      }
    }
  };
  // decay of the state over a whole chunk, per key row: e^Γ_i
  auto row_decay = [&](const double* cum, index_t L, index_t i) {
    return fexp(cum[(L - 1) * W + (per_key ? i : 0)]);
  };

  // One head's chunk is L rows a page apart in the [T, H, D] layouts (the rows of one token of
  // all heads share a page), which hardware prefetchers do not follow; the profile puts about a
  // third of the backward at H = 8 on the first touch of those rows (H = 1, contiguous rows: 80
  // instead of 120 ms at T = 65536 vs 8192·8). Each chunk asks for the next chunk's rows (the
  // previous one in reverse); on the loaded 2-core machine this measured no gain yet (open).
  auto prefetch = [&](index_t c2, bool reverse) {
    if (c2 < 0 || c2 >= chunks) return;
    const index_t q0 = t0 + c2 * C, nrow = std::min(C, t1 - q0);
    auto rows = [&](const auto* base, index_t ld, index_t width, bool write) {
      const auto bytes = static_cast<index_t>(sizeof(T)) * width;
      for (index_t r = 0; r < nrow; ++r) {
        const char* row = reinterpret_cast<const char*>(base + r * ld);
        for (index_t off = 0; off < bytes; off += 64) {
          if (write) {
            __builtin_prefetch(row + off, 1);
          } else {
            __builtin_prefetch(row + off, 0);
          }
        }
      }
    };
    rows(p.k.ptr({b, q0, hk, 0}), p.k.stride(1), K, false);
    rows(p.v.ptr({b, q0, h, 0}), p.v.stride(1), V, false);
    if (reverse) {
      rows(p.q.ptr({b, q0, hk, 0}), p.q.stride(1), K, false);
      rows(p.do_.ptr({b, q0, h, 0}), p.do_.stride(1), V, false);
      rows(p.dq.ptr({b, q0, hk, 0}), p.dq.stride(1), K, true);
      rows(p.dk.ptr({b, q0, hk, 0}), p.dk.stride(1), K, true);
      rows(p.dv.ptr({b, q0, h, 0}), p.dv.stride(1), V, true);
    }
  };

  // ---- recompute the chunk-boundary states ---------------------------------------------------
  T* S0 = s.states.data();
  for (index_t i = 0; i < K; ++i)
    for (index_t j = 0; j < V; ++j) S0[i * V + j] = p.h0.data() ? p.h0(n, h, i, j) : T(0);
  prefetch(0, false);
  for (index_t c = 0; c < chunks; ++c) {
    const index_t r0 = t0 + c * C, L = std::min(C, t1 - r0);
    prefetch(c + 1, false);
    cumulate(p, b, h, r0, L, W, s.cum.data());
    make_Kh(r0, L, s.cum.data());
    const T* Sn = s.states.data() + static_cast<std::size_t>(c) * KV;
    T* Sn1 = s.states.data() + static_cast<std::size_t>(c + 1) * KV;
    for (index_t i = 0; i < K; ++i) {
      const T d = row_decay(s.cum.data(), L, i);
      for (index_t j = 0; j < V; ++j) Sn1[i * V + j] = d * Sn[i * V + j];
    }
    linalg::gemm<T, true, false>(K, V, L, s.Kh.data(), K, p.v.ptr({b, r0, h, 0}), ldv, Sn1, V, true,
                                 s.pack);
  }
  const T* ST = s.states.data() + static_cast<std::size_t>(chunks) * KV;
  if (p.ht.data()) {
    for (index_t i = 0; i < K; ++i)
      for (index_t j = 0; j < V; ++j) p.ht(n, h, i, j) = ST[i * V + j];
  }

  // ---- reverse sweep -------------------------------------------------------------------------
  T* dS = s.dS.data();
  std::fill(s.acc.begin(), s.acc.end(), 0.0);
  for (index_t i = 0; i < K; ++i) {
    double a = 0;
    for (index_t j = 0; j < V; ++j) {
      const T d = p.dht.data() ? p.dht(n, h, i, j) : T(0);
      dS[i * V + j] = d;
      a += static_cast<double>(d) * static_cast<double>(ST[i * V + j]);
    }
    s.acc[static_cast<std::size_t>(per_key ? i : 0)] += a;
  }
  const bool want_gate = (p.g.data() && p.dg.data()) || (per_key && p.dgk.data());
  prefetch(chunks - 1, true);
  for (index_t c = chunks; c-- > 0;) {
    const index_t r0 = t0 + c * C, L = std::min(C, t1 - r0);
    prefetch(c - 1, true);
    const T* Sn = s.states.data() + static_cast<std::size_t>(c) * KV;
    double* cum = s.cum.data();
    cumulate(p, b, h, r0, L, W, cum);
    make_Kh(r0, L, cum);
    const T* vr = p.v.ptr({b, r0, h, 0});
    const T* dor = p.do_.ptr({b, r0, h, 0});
    // Qs = s q, Kc = c k, Qb = s q ⊙ e^{b_r}
    for (index_t r = 0; r < L; ++r) {
      const T* qr = p.q.ptr({b, r0 + r, hk, 0});
      const T* kr = p.k.ptr({b, r0 + r, hk, 0});
      const T cc = cscale(r0 + r);
      T* qs = s.Qs.data() + r * K;
      T* kc = s.Kc.data() + r * K;
      T* qb = s.Qb.data() + r * K;
      for (index_t i = 0; i < K; ++i) {
        qs[i] = p.scale * qr[i];
        kc[i] = cc * kr[i];
      }
      if (per_key) {
        for (index_t i = 0; i < K; ++i) qb[i] = static_cast<T>(cum[r * W + i]);
        exp_inplace(qb, K);
        for (index_t i = 0; i < K; ++i) qb[i] *= qs[i];
      } else {
        const T e = fexp(cum[r]);
        for (index_t i = 0; i < K; ++i) qb[i] = e * qs[i];
      }
    }
    // dA = dO Vᵀ (masked below)
    T* A = s.A.data();
    T* dA = s.dA.data();
    // Triangular products run on row blocks of 16 up to the diagonal (the entries above it are
    // zero): 5/8 of the dense C×C work at C = 64. Vᵀ and (ck)ᵀ are transposed once per chunk.
    constexpr index_t bs = 16;
    T* VT = s.VT.data();
    for (index_t j = 0; j < L; ++j)
      for (index_t c2 = 0; c2 < V; ++c2) VT[c2 * C + j] = vr[j * ldv + c2];
    for (index_t rho = 0; rho < L; rho += bs) {
      const index_t nr = std::min(bs, L - rho);
      linalg::gemm<T, false, false>(nr, rho + nr, V, dor + rho * ldo, ldo, VT, C, dA + rho * C, C,
                                    false, s.pack);
    }
    T* dQ = s.dQ.data();
    T* dK = s.dK.data();  // gradient of c_j k_j
    if (!per_key) {
      // A = (Qs Kcᵀ) ⊙ M, dA ⊙= M, M_rj = e^{b_r - b_j} (j <= r)
      T* KT = s.KT.data();
      for (index_t j = 0; j < L; ++j)
        for (index_t i = 0; i < K; ++i) KT[i * C + j] = s.Kc[static_cast<std::size_t>(j * K + i)];
      for (index_t rho = 0; rho < L; rho += bs) {
        const index_t nr = std::min(bs, L - rho);
        linalg::gemm<T, false, false>(nr, rho + nr, K, s.Qs.data() + rho * K, K, KT, C, A + rho * C,
                                      C, false, s.pack);
      }
      const bool gated = p.g.data() != nullptr;
      for (index_t r = 0; r < L; ++r) {
        T* ar = A + r * C;
        T* dar = dA + r * C;
        if (gated) {
          T* m = s.w.data();
          for (index_t j = 0; j <= r; ++j) m[j] = static_cast<T>(cum[r] - cum[j]);
          exp_inplace(m, r + 1);
          for (index_t j = 0; j <= r; ++j) {
            ar[j] *= m[j];
            dar[j] *= m[j];
          }
        }
        for (index_t j = r + 1; j < L; ++j) ar[j] = dar[j] = T(0);
      }
      for (index_t rho = 0; rho < L; rho += bs) {
        const index_t nr = std::min(bs, L - rho);
        // dQ rows rho.. see columns <= their own; dK rows rho.. are seen by rows >= rho
        linalg::gemm<T, false, false>(nr, K, rho + nr, dA + rho * C, C, s.Kc.data(), K,
                                      dQ + rho * K, K, false, s.pack);
        linalg::gemm<T, true, false>(nr, K, L - rho, dA + rho * C + rho, C, s.Qs.data() + rho * K,
                                     K, dK + rho * K, K, false, s.pack);
      }
      for (index_t r = 0; r < L; ++r)
        for (index_t i = 0; i < K; ++i) dQ[r * K + i] *= p.scale;
    } else {
      for (index_t r = 0; r < L; ++r)
        for (index_t j = r + 1; j < L; ++j) dA[r * C + j] = T(0);
      std::fill_n(dQ, L * K, T(0));
      std::fill_n(dK, L * K, T(0));
      constexpr index_t sub = 16;
      for (index_t rho = 0; rho < L; rho += sub) {
        const index_t nr = std::min(sub, L - rho);
        const double* Gr = cum + rho * W;
        // Rows rho.. against columns < ncol through row ρ: e^{b_r - b_j} = e^{b_r - b_ρ}·e^{b_ρ -
        // b_j}. Columns before the sub-chunk have both factors <= 1 (gates <= 0). The diagonal
        // block joins them when every row of the sub-chunk lies within e^{±diag_bound} of row ρ in
        // every channel (its k side is then at most e^{diag_bound}); otherwise (strong gates,
        // kills, NaN) it is formed pair by pair below.
        bool factor_diag = true;
        for (index_t x = rho; x < rho + nr && factor_diag; ++x) {
          for (index_t i = 0; i < K; ++i) {
            if (!(std::abs(cum[x * W + i] - Gr[i]) <= diag_bound<T>)) {
              factor_diag = false;
              break;
            }
          }
        }
        const index_t ncol = factor_diag ? rho + nr : rho;
        if (ncol > 0) {
          T* EQ = s.EQ.data();
          T* EK = s.EK.data();
          T* Qf = s.Qf.data();
          T* Kf = s.Kf.data();
          for (index_t r = 0; r < nr; ++r) {
            T* e = EQ + r * K;
            for (index_t i = 0; i < K; ++i) e[i] = static_cast<T>(cum[(rho + r) * W + i] - Gr[i]);
            exp_inplace(e, K);
            const T* qs = s.Qs.data() + (rho + r) * K;
            for (index_t i = 0; i < K; ++i) Qf[r * K + i] = e[i] * qs[i];
          }
          for (index_t j = 0; j < ncol; ++j) {
            T* e = EK + j * K;
            for (index_t i = 0; i < K; ++i) e[i] = static_cast<T>(Gr[i] - cum[j * W + i]);
            exp_inplace(e, K);
            const T* kc = s.Kc.data() + j * K;
            for (index_t i = 0; i < K; ++i) Kf[j * K + i] = e[i] * kc[i];
          }
          linalg::gemm<T, false, true>(nr, ncol, K, Qf, K, Kf, K, A + rho * C, C, false, s.pack);
          if (factor_diag) {
            for (index_t r = 0; r < nr; ++r)
              for (index_t j = rho + r + 1; j < rho + nr; ++j) A[(rho + r) * C + j] = T(0);
          }
          // dq_r += s e^{b_r - b_ρ} ⊙ (dA Kf)_r ; d(ck)_j += e^{b_ρ - b_j} ⊙ (dAᵀ Qf)_j
          T* tq = s.tmp.data();
          linalg::gemm<T, false, false>(nr, K, ncol, dA + rho * C, C, Kf, K, tq, K, false, s.pack);
          for (index_t r = 0; r < nr; ++r) {
            const T* e = EQ + r * K;
            for (index_t i = 0; i < K; ++i) dQ[(rho + r) * K + i] += p.scale * e[i] * tq[r * K + i];
          }
          linalg::gemm<T, true, false>(ncol, K, nr, dA + rho * C, C, Qf, K, tq, K, false, s.pack);
          for (index_t j = 0; j < ncol; ++j) {
            const T* e = EK + j * K;
            for (index_t i = 0; i < K; ++i) dK[j * K + i] += e[i] * tq[j * K + i];
          }
        }
        if (factor_diag) continue;
        // diagonal block, pair by pair
        for (index_t r = rho; r < rho + nr; ++r) {
          for (index_t j = rho; j <= r; ++j) {
            T* e = s.w.data();
            for (index_t i = 0; i < K; ++i) e[i] = static_cast<T>(cum[r * W + i] - cum[j * W + i]);
            exp_inplace(e, K);
            const T* qs = s.Qs.data() + r * K;
            const T* kc = s.Kc.data() + j * K;
            T acc = T(0);
            for (index_t i = 0; i < K; ++i) acc += qs[i] * kc[i] * e[i];
            A[r * C + j] = acc;
            const T da = dA[r * C + j];
            for (index_t i = 0; i < K; ++i) {
              dQ[r * K + i] += p.scale * da * kc[i] * e[i];
              dK[j * K + i] += da * qs[i] * e[i];
            }
          }
          for (index_t j = r + 1; j < L; ++j) A[r * C + j] = T(0);
        }
      }
    }
    // dV = Aᵀ dO + K̂ dS
    T* dvr = p.dv.ptr({b, r0, h, 0});
    for (index_t rho = 0; rho < L; rho += bs) {
      const index_t nr = std::min(bs, L - rho);
      linalg::gemm<T, true, false>(nr, V, L - rho, A + rho * C + rho, C, dor + rho * ldo, ldo,
                                   dvr + rho * lddv, lddv, false, s.pack);
    }
    linalg::gemm<T, false, false>(L, V, K, s.Kh.data(), K, dS, V, dvr, lddv, true, s.pack);
    // inter: dq_r += s e^{b_r} ⊙ (S_n do_r): Qb/Qs hold s e^{b_r}; form the product, then scale
    T* tq = s.tmp.data();
    linalg::gemm<T, false, true>(L, K, V, dor, ldo, Sn, V, tq, K, false, s.pack);
    for (index_t r = 0; r < L; ++r) {
      if (per_key) {
        T* e = s.w.data();
        for (index_t i = 0; i < K; ++i) e[i] = static_cast<T>(cum[r * W + i]);
        exp_inplace(e, K);
        for (index_t i = 0; i < K; ++i) dQ[r * K + i] += p.scale * e[i] * tq[r * K + i];
      } else {
        const T e = p.scale * fexp(cum[r]);
        for (index_t i = 0; i < K; ++i) dQ[r * K + i] += e * tq[r * K + i];
      }
    }
    // inter: d(c_j k_j) += e^{Γ - b_j} ⊙ (dS v_j)
    linalg::gemm<T, false, true>(L, K, V, vr, ldv, dS, V, tq, K, false, s.pack);
    const double* G = cum + (L - 1) * W;
    for (index_t j = 0; j < L; ++j) {
      if (per_key) {
        T* e = s.w.data();
        for (index_t i = 0; i < K; ++i) e[i] = static_cast<T>(G[i] - cum[j * W + i]);
        exp_inplace(e, K);
        for (index_t i = 0; i < K; ++i) dK[j * K + i] += e[i] * tq[j * K + i];
      } else {
        const T e = fexp(G[0] - cum[j]);
        for (index_t i = 0; i < K; ++i) dK[j * K + i] += e * tq[j * K + i];
      }
    }
    // dS_n = e^Γ ⊙ dS + Q̄ᵀ dO
    for (index_t i = 0; i < K; ++i) {
      const T d = row_decay(cum, L, i);
      for (index_t j = 0; j < V; ++j) dS[i * V + j] *= d;
    }
    linalg::gemm<T, true, false>(K, V, L, s.Qb.data(), K, dor, ldo, dS, V, true, s.pack);
    // outputs: dk = c·d(ck), dc = k·d(ck); gate gradients by the reverse cumulative sum
    for (index_t r = L; r-- > 0;) {
      const index_t t = r0 + r;
      const T cc = cscale(t);
      const T* qr = p.q.ptr({b, t, hk, 0});
      const T* kr = p.k.ptr({b, t, hk, 0});
      T* dqo = p.dq.ptr({b, t, hk, 0});
      T* dko = p.dk.ptr({b, t, hk, 0});
      const T* dq = dQ + r * K;
      const T* dkc = dK + r * K;
      // plain loops the compiler vectorises; the per-token sums are SIMD dot products in T (their
      // rounding is relative to one token's terms), the running sums across tokens are in double
      const T kdk = simd::dot(kr, dkc, K);  // k·d(ck): the key scale's gradient, and k·dk / c
      double dgs = 0;
      if (want_gate && !per_key)
        dgs = static_cast<double>(simd::dot(qr, dq, K)) - static_cast<double>(cc * kdk);
      if (want_gate && per_key) {
        double* acc = s.acc.data();
        for (index_t i = 0; i < K; ++i)
          acc[i] += static_cast<double>(qr[i] * dq[i]) - static_cast<double>(kr[i] * (cc * dkc[i]));
      }
      if (add_qk) {
        for (index_t i = 0; i < K; ++i) dqo[i] += dq[i];
        for (index_t i = 0; i < K; ++i) dko[i] += cc * dkc[i];
      } else {
        for (index_t i = 0; i < K; ++i) dqo[i] = dq[i];
        for (index_t i = 0; i < K; ++i) dko[i] = cc * dkc[i];
      }
      const T dc = kdk;
      if (p.dk_scale.data()) p.dk_scale(b, t, h) = static_cast<T>(dc);
      if (want_gate) {
        if (per_key) {
          if (p.dgk.data()) {
            T* out = p.dgk.ptr({b, t, h, 0});
            double sum = 0;
            for (index_t i = 0; i < K; ++i) {
              out[i] = static_cast<T>(s.acc[static_cast<std::size_t>(i)]);
              sum += s.acc[static_cast<std::size_t>(i)];
            }
            if (p.dg.data()) p.dg(b, t, h) = static_cast<T>(sum);
          }
        } else {
          s.acc[0] += dgs;
          p.dg(b, t, h) = static_cast<T>(s.acc[0]);
        }
      }
    }
  }
  if (p.dh0.data()) {
    for (index_t i = 0; i < K; ++i)
      for (index_t j = 0; j < V; ++j) p.dh0(n, h, i, j) = dS[i * V + j];
  }
}

}  // namespace detail

/// Runs the chunked backward with chunk length C. The fronts (mixers/backward.hpp) check shapes.
template <class T>
void gated_backward(const gated_problem<T>& p, index_t C) {
  const index_t N = p.sequences(), Hk = p.q.extent(2), H = p.v.extent(2), group = H / Hk;
  const index_t TT = p.q.extent(1);
  // grow-only per calling thread, one slot per worker: repeated calls (training steps) allocate
  // nothing and touch no fresh pages (a new 2 MiB state buffer per call cost ~10 % in page faults)
  thread_local std::vector<detail::gated_scratch<T>> scratch;
  if (scratch.size() < static_cast<std::size_t>(max_slots()))
    scratch.resize(static_cast<std::size_t>(max_slots()));
  // the workers index the caller's slots (a thread_local named inside the lambda would be theirs)
  auto* slots = scratch.data();
  parallel_for_with_slot(N * Hk, [&](index_t item, int tid) {
    const index_t n = item / Hk, hk = item % Hk;
    const index_t b = p.cu_seqlens.empty() ? n : 0;
    const index_t t0 = p.cu_seqlens.empty() ? 0 : p.cu_seqlens[static_cast<std::size_t>(n)];
    const index_t t1 = p.cu_seqlens.empty() ? TT : p.cu_seqlens[static_cast<std::size_t>(n) + 1];
    auto& s = slots[tid];
    for (index_t h = hk * group; h < (hk + 1) * group; ++h)
      detail::gated_head(p, C, b, t0, t1, n, h, hk, h != hk * group, s);
  });
}

}  // namespace seqmix::kernels::backward
