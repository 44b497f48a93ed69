// SPDX-License-Identifier: MIT
// Plain reference backward passes (docs/math.md §8): readable token loops over any scalar type,
// written for clarity, not speed. Tests run them in double against the golden gradients, the
// chunked backward (kernels/backward/) and finite differences.
//
// Gated accumulation (linear attention, simple GLA, retention/Lightning, GLA, Mamba2 SSD):
//   S_t = Diag(a_t) S_{t-1} + c_t k_t v_tᵀ,  a_t = exp(g_t + g_gamma + gk_t),  o_t = S_tᵀ (s q_t)
// with loss L = Σ o·do + Σ S_T·dht. The adjoint dS of S_t runs backwards:
//   dS_T = dht;  per token t = T-1 .. 0:  dS += (s q_t) do_tᵀ          (o_t reads S_t)
//     dq_t = s S_t do_t,  dk_t = c_t dS v_t,  dv_t = c_t dSᵀ k_t,  dc_t = k_tᵀ dS v_t
//     d(log a_t)_i = a_t,i Σ_j dS_ij S_{t-1,ij}   (dgk_t; dg_t = Σ_i of it)
//     dS ← Diag(a_t) dS                                                (to S_{t-1})
//   dh0 = dS_0.
// The forward states S_0..S_T are kept (O(T·K·V) per (sequence, head): a reference, not a kernel).
//
// Softmax attention (causal, optional window W): P = softmax(s Q Kᵀ + mask), O = P V;
//   dV = Pᵀ dO, dP = dO Vᵀ, dZ = P ⊙ (dP - rowsum(dO ⊙ O)), dQ = s dZ K, dK = s dZᵀ Q.
//
// Delta family (DeltaNet, Gated DeltaNet, KDA), in the forward's own form, decay first:
//   S'_t = Diag(e^{g_t}) S_{t-1},  e_t = v_t - S'_tᵀ k_t,  u_t = β_t e_t,  S_t = S'_t + k_t u_tᵀ
//   dS += (s q_t) do_tᵀ;  dq_t = s S_t do_t;  du = dSᵀ k_t;  dk_t = dS u_t;  dv_t = β_t du;
//   dβ_t = e_t·du;  dS' = dS - k_t (β_t du)ᵀ;  dk_t -= S'_t (β_t du);
//   dg_t,i = Σ_j dS'_ij S'_ij (log gate; GDN: Σ_i);  dS <- Diag(e^{g_t}) dS'.
// RWKV-7: S_t = Diag(e^{w_t}) S_{t-1} + b_t z_tᵀ + k_t v_tᵀ with z_t = S_{t-1}ᵀ a_t:
//   dS += (s r_t) do_tᵀ;  dr_t = s S_t do_t;  dk = dS v;  dv = dSᵀ k;  db = dS z;  dz = dSᵀ b;
//   da = S_{t-1} dz;  dw_i = e^{w_i} Σ_j dS_ij S_{t-1,ij};  dS <- Diag(e^{w}) dS + a dzᵀ.
// RWKV-6: o_t = S_{t-1}ᵀ (s r_t) + (s r_t·(u⊙k_t)) v_t,  S_t = Diag(e^{w_t}) S_{t-1} + k_t v_tᵀ:
//   dk = dS v + u ⊙ s r c,  dv = dSᵀ k + (s r·(u⊙k)) do,  dw_i = e^{w_i} Σ_j dS_ij S_{t-1,ij},
//   dS <- Diag(e^{w}) dS + (s r) doᵀ,  dr = s S_{t-1} do + s (u⊙k) c,  du += s r ⊙ k c,
//   with c = v_t·do_t.
//
// Dimensions: B batch, T tokens, H heads of v/o/state, Hk heads of q/k (head h reads q/k head
// h / (H / Hk); their gradients sum over the group), K key size, V value size, N sequences
// (cu_seqlens [N+1] with B == 1, else N = B). Cost O(B·T·H·K·V) (softmax O(B·H·T²·(K+V))).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <span>
#include <vector>

#include <seqmix/core/tensor.hpp>
#include <seqmix/reference/gated_accumulation.hpp>

namespace seqmix::reference {

/// Gradients written by gated_accumulation_backward; an empty view is not computed. dq, dk, dv
/// are required; dg/dg_gamma/dgk/dk_scale only where that gate is present.
template <class T>
struct gated_grads {
  tensor_view<T, 4> dq, dk;    ///< [B,T,Hk,K]
  tensor_view<T, 4> dv;        ///< [B,T,H,V]
  tensor_view<T, 3> dg;        ///< [B,T,H]
  tensor_view<T, 1> dg_gamma;  ///< [H]
  tensor_view<T, 4> dgk;       ///< [B,T,H,K]
  tensor_view<T, 3> dk_scale;  ///< [B,T,H]
  tensor_view<T, 4> dh0;       ///< [N,H,K,V]
};

/// Backward of reference::gated_accumulation (no normaliser, no per-value gate).
/// h0: [N,H,K,V] initial state or empty (zero); do_: [B,T,H,V]; dht: [N,H,K,V] or empty (zero).
/// o_out / ht_out (optional, [B,T,H,V] / [N,H,K,V]) receive the forward's o and S_T.
template <class T>
void gated_accumulation_backward(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                                 tensor_view<const T, 4> v, const gated_gates<T>& gates, T scale,
                                 tensor_view<const T, 4> h0, tensor_view<const T, 4> do_,
                                 tensor_view<const T, 4> dht, const gated_grads<T>& grads,
                                 std::span<const index_t> cu_seqlens = {},
                                 tensor_view<T, 4> o_out = {}, tensor_view<T, 4> ht_out = {}) {
  const index_t B = q.extent(0), TT = q.extent(1), Hk = q.extent(2), K = q.extent(3);
  const index_t H = v.extent(2), V = v.extent(3), group = H / Hk;
  const index_t N = cu_seqlens.empty() ? B : static_cast<index_t>(cu_seqlens.size()) - 1;
  grads.dq.fill(T(0));
  grads.dk.fill(T(0));
  if (grads.dg_gamma.data()) grads.dg_gamma.fill(T(0));
  const auto KV = static_cast<std::size_t>(K * V);
  for (index_t n = 0; n < N; ++n) {
    const index_t b = cu_seqlens.empty() ? n : 0;
    const index_t t0 = cu_seqlens.empty() ? 0 : cu_seqlens[static_cast<std::size_t>(n)];
    const index_t t1 = cu_seqlens.empty() ? TT : cu_seqlens[static_cast<std::size_t>(n) + 1];
    const auto L = static_cast<std::size_t>(t1 - t0);
    for (index_t h = 0; h < H; ++h) {
      const index_t hk = h / group;
      // decay a_t (per key channel) and key scale c_t of token t
      auto decay = [&](index_t t, index_t i) {
        T lg = T(0);
        if (gates.g.data()) lg += gates.g(b, t, h);
        if (gates.g_gamma.data()) lg += gates.g_gamma(h);
        if (gates.gk.data()) lg += gates.gk(b, t, h, i);
        return std::exp(lg);
      };
      auto kscale = [&](index_t t) { return gates.k_scale.data() ? gates.k_scale(b, t, h) : T(1); };
      // forward, keeping every state: S[u] is the state after u tokens of the sequence
      std::vector<T> S((L + 1) * KV);
      for (index_t i = 0; i < K; ++i)
        for (index_t j = 0; j < V; ++j)
          S[static_cast<std::size_t>(i * V + j)] = h0.data() ? h0(n, h, i, j) : T(0);
      for (std::size_t u = 0; u < L; ++u) {
        const index_t t = t0 + static_cast<index_t>(u);
        const T c = kscale(t);
        for (index_t i = 0; i < K; ++i) {
          const T a = decay(t, i);
          for (index_t j = 0; j < V; ++j) {
            const auto e = static_cast<std::size_t>(i * V + j);
            S[(u + 1) * KV + e] = a * S[u * KV + e] + c * k(b, t, hk, i) * v(b, t, h, j);
          }
        }
        if (o_out.data()) {
          for (index_t j = 0; j < V; ++j) {
            T acc = T(0);
            for (index_t i = 0; i < K; ++i)
              acc += scale * q(b, t, hk, i) * S[(u + 1) * KV + static_cast<std::size_t>(i * V + j)];
            o_out(b, t, h, j) = acc;
          }
        }
      }
      if (ht_out.data()) {
        for (index_t i = 0; i < K; ++i)
          for (index_t j = 0; j < V; ++j)
            ht_out(n, h, i, j) = S[L * KV + static_cast<std::size_t>(i * V + j)];
      }
      // backward
      std::vector<T> dS(KV);
      for (index_t i = 0; i < K; ++i)
        for (index_t j = 0; j < V; ++j)
          dS[static_cast<std::size_t>(i * V + j)] = dht.data() ? dht(n, h, i, j) : T(0);
      for (std::size_t u = L; u-- > 0;) {
        const index_t t = t0 + static_cast<index_t>(u);
        const T c = kscale(t);
        const T* St = S.data() + (u + 1) * KV;  // S_t
        const T* Sp = S.data() + u * KV;        // S_{t-1}
        for (index_t i = 0; i < K; ++i)
          for (index_t j = 0; j < V; ++j)
            dS[static_cast<std::size_t>(i * V + j)] += scale * q(b, t, hk, i) * do_(b, t, h, j);
        T dc = T(0), dlog_scalar = T(0);
        for (index_t i = 0; i < K; ++i) {
          T dq = T(0), dk = T(0), dla = T(0);
          for (index_t j = 0; j < V; ++j) {
            const auto e = static_cast<std::size_t>(i * V + j);
            dq += St[e] * do_(b, t, h, j);
            dk += dS[e] * v(b, t, h, j);
            dla += dS[e] * Sp[e];
          }
          grads.dq(b, t, hk, i) += scale * dq;
          grads.dk(b, t, hk, i) += c * dk;
          dc += k(b, t, hk, i) * dk;
          dla *= decay(t, i);
          if (grads.dgk.data()) grads.dgk(b, t, h, i) = dla;
          dlog_scalar += dla;
        }
        for (index_t j = 0; j < V; ++j) {
          T dv = T(0);
          for (index_t i = 0; i < K; ++i)
            dv += dS[static_cast<std::size_t>(i * V + j)] * k(b, t, hk, i);
          grads.dv(b, t, h, j) = c * dv;
        }
        if (grads.dg.data()) grads.dg(b, t, h) = dlog_scalar;
        if (grads.dg_gamma.data()) grads.dg_gamma(h) += dlog_scalar;
        if (grads.dk_scale.data()) grads.dk_scale(b, t, h) = dc;
        for (index_t i = 0; i < K; ++i) {
          const T a = decay(t, i);
          for (index_t j = 0; j < V; ++j) dS[static_cast<std::size_t>(i * V + j)] *= a;
        }
      }
      if (grads.dh0.data()) {
        for (index_t i = 0; i < K; ++i)
          for (index_t j = 0; j < V; ++j)
            grads.dh0(n, h, i, j) = dS[static_cast<std::size_t>(i * V + j)];
      }
    }
  }
}

/// Gradients of mamba2_ssd_backward; empty views are not computed.
template <class T>
struct mamba2_grads {
  tensor_view<T, 4> dx;   ///< [B,T,H,P]
  tensor_view<T, 3> ddt;  ///< [B,T,H] (of dt after softplus/clamp, the discretisation step)
  tensor_view<T, 1> dA;   ///< [H]
  tensor_view<T, 4> dB;   ///< [B,T,G,N]
  tensor_view<T, 4> dC;   ///< [B,T,G,N]
  tensor_view<T, 1> dD;   ///< [H]
  tensor_view<T, 4> dh0;  ///< [N_seq,H,N,P]
};

/// Backward of Mamba2 SSD in its discrete form: S_t = exp(dt_t A) S_{t-1} + B_t (dt_t x_t)ᵀ,
/// y_t = S_tᵀ C_t + D x_t. This is gated accumulation with q = C, k = B, v = x, g = dt·A,
/// c = dt, scale 1; then ddt = dc + A·dg, dA = Σ_t dt·dg, dD = Σ x·dy, dx += D dy.
/// x: [B,T,H,P]; dt: [B,T,H] (the step, > 0); A: [H] (< 0); Bm, Cm: [B,T,G,N]; D: [H] or empty;
/// h0: [N_seq,H,N,P] or empty; dy: [B,T,H,P]; dht: [N_seq,H,N,P] or empty; ht_out: optional S_T.
template <class T>
void mamba2_ssd_backward(tensor_view<const T, 4> x, tensor_view<const T, 3> dt,
                         tensor_view<const T, 1> A, tensor_view<const T, 4> Bm,
                         tensor_view<const T, 4> Cm, tensor_view<const T, 1> D,
                         tensor_view<const T, 4> h0, tensor_view<const T, 4> dy,
                         tensor_view<const T, 4> dht, const mamba2_grads<T>& grads,
                         std::span<const index_t> cu_seqlens = {}, tensor_view<T, 4> ht_out = {}) {
  const index_t Bn = x.extent(0), TT = x.extent(1), H = x.extent(2), P = x.extent(3);
  tensor<T, 3> g({Bn, TT, H}), dg({Bn, TT, H}), dc({Bn, TT, H});
  for (index_t b = 0; b < Bn; ++b)
    for (index_t t = 0; t < TT; ++t)
      for (index_t h = 0; h < H; ++h) g(b, t, h) = dt(b, t, h) * A(h);
  gated_gates<T> gates;
  gates.g = g;
  gates.k_scale = dt;
  tensor<T, 4> dC(Cm.shape()), dB(Bm.shape()), dx({Bn, TT, H, P});
  gated_grads<T> gg;
  gg.dq = dC;
  gg.dk = dB;
  gg.dv = dx;
  gg.dg = dg;
  gg.dk_scale = dc;
  gg.dh0 = grads.dh0;
  gated_accumulation_backward<T>(Cm, Bm, x, gates, T(1), h0, dy, dht, gg, cu_seqlens, {}, ht_out);
  if (grads.dA.data()) grads.dA.fill(T(0));
  if (grads.dD.data()) grads.dD.fill(T(0));
  for (index_t b = 0; b < Bn; ++b) {
    for (index_t t = 0; t < TT; ++t) {
      for (index_t h = 0; h < H; ++h) {
        if (grads.ddt.data()) grads.ddt(b, t, h) = dc(b, t, h) + A(h) * dg(b, t, h);
        if (grads.dA.data()) grads.dA(h) += dt(b, t, h) * dg(b, t, h);
        for (index_t p = 0; p < P; ++p) {
          T d = dx(b, t, h, p);
          if (D.data()) {
            d += D(h) * dy(b, t, h, p);
            if (grads.dD.data()) grads.dD(h) += x(b, t, h, p) * dy(b, t, h, p);
          }
          if (grads.dx.data()) grads.dx(b, t, h, p) = d;
        }
      }
    }
  }
  const auto copy = [](const tensor<T, 4>& from, tensor_view<T, 4> to) {
    if (!to.data()) return;
    for (index_t a = 0; a < from.extent(0); ++a)
      for (index_t t = 0; t < from.extent(1); ++t)
        for (index_t g2 = 0; g2 < from.extent(2); ++g2)
          for (index_t d = 0; d < from.extent(3); ++d) to(a, t, g2, d) = from(a, t, g2, d);
  };
  copy(dB, grads.dB);
  copy(dC, grads.dC);
}

/// Backward of reference::softmax_attention (causal, window W = 0 for unbounded, no sink).
/// q: [B,T,H,K]; k: [B,T,Hkv,K]; v: [B,T,Hkv,V]; do_: [B,T,H,V]; dq, dk, dv as q, k, v.
/// o_out (optional, [B,T,H,V]) receives the forward's output.
template <class T>
void softmax_attention_backward(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                                tensor_view<const T, 4> v, tensor_view<const T, 4> do_,
                                tensor_view<T, 4> dq, tensor_view<T, 4> dk, tensor_view<T, 4> dv,
                                std::optional<T> scale = std::nullopt, index_t window = 0,
                                tensor_view<T, 4> o_out = {}) {
  const index_t B = q.extent(0), Tn = q.extent(1), H = q.extent(2), K = q.extent(3);
  const index_t Hkv = k.extent(2), V = v.extent(3), group = H / Hkv;
  const T s = scale ? *scale : T(1) / std::sqrt(T(K));
  dq.fill(T(0));
  dk.fill(T(0));
  dv.fill(T(0));
  std::vector<T> p(static_cast<std::size_t>(Tn)), o(static_cast<std::size_t>(V));
  for (index_t b = 0; b < B; ++b) {
    for (index_t h = 0; h < H; ++h) {
      const index_t hk = h / group;
      for (index_t t = 0; t < Tn; ++t) {
        const index_t first = window > 0 ? std::max<index_t>(0, t - window + 1) : 0;
        T m = -std::numeric_limits<T>::infinity();
        for (index_t j = first; j <= t; ++j) {
          T dot = T(0);
          for (index_t d = 0; d < K; ++d) dot += q(b, t, h, d) * k(b, j, hk, d);
          p[static_cast<std::size_t>(j)] = s * dot;
          m = std::max(m, s * dot);
        }
        T denom = T(0);
        for (index_t j = first; j <= t; ++j) {
          auto& pj = p[static_cast<std::size_t>(j)];
          pj = std::exp(pj - m);
          denom += pj;
        }
        for (index_t j = first; j <= t; ++j) p[static_cast<std::size_t>(j)] /= denom;
        // o_t and rowsum(do_t ⊙ o_t)
        T delta = T(0);
        for (index_t c = 0; c < V; ++c) {
          T acc = T(0);
          for (index_t j = first; j <= t; ++j)
            acc += p[static_cast<std::size_t>(j)] * v(b, j, hk, c);
          o[static_cast<std::size_t>(c)] = acc;
          delta += acc * do_(b, t, h, c);
          if (o_out.data()) o_out(b, t, h, c) = acc;
        }
        for (index_t j = first; j <= t; ++j) {
          const T pj = p[static_cast<std::size_t>(j)];
          T dp = T(0);
          for (index_t c = 0; c < V; ++c) {
            dp += do_(b, t, h, c) * v(b, j, hk, c);
            dv(b, j, hk, c) += pj * do_(b, t, h, c);
          }
          const T dz = pj * (dp - delta);
          for (index_t d = 0; d < K; ++d) {
            dq(b, t, h, d) += s * dz * k(b, j, hk, d);
            dk(b, j, hk, d) += s * dz * q(b, t, h, d);
          }
        }
      }
    }
  }
}

/// Gradients of the delta-family and DPLR references; empty views are not computed (dq, dk, dv
/// required). dg: GDN [B,T,H]; dgk: KDA [B,T,H,K], RWKV's dw; da, db: RWKV-7; du: RWKV-6 [H,K].
template <class T>
struct dplr_grads {
  tensor_view<T, 4> dq, dk, dv;  ///< dq/dk [B,T,Hk,K], dv [B,T,H,V]
  tensor_view<T, 3> dbeta, dg;   ///< [B,T,H]
  tensor_view<T, 4> dgk;         ///< [B,T,H,K]
  tensor_view<T, 4> da, db;      ///< [B,T,H,K]
  tensor_view<T, 2> du;          ///< [H,K]
  tensor_view<T, 4> dh0;         ///< [N,H,K,V]
};

namespace detail {

/// One sequence's slice of the tokens, [t0, t1) of batch row b, state row n.
struct seq_range {
  index_t b, n, t0, t1;
};
inline seq_range seq_of(std::span<const index_t> cu, index_t n, index_t TT) {
  if (cu.empty()) return {n, n, 0, TT};
  return {0, n, cu[static_cast<std::size_t>(n)], cu[static_cast<std::size_t>(n) + 1]};
}

}  // namespace detail

/// Backward of reference::delta_rule (DeltaNet, GDN with g [B,T,H]) and reference::kda (gk
/// [B,T,H,K]); at most one of g, gk non-empty; no l2norm (q, k as given). h0, dht: [N,H,K,V] or
/// empty; o_out, ht_out optional.
template <class T>
void delta_rule_backward(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                         tensor_view<const T, 4> v, tensor_view<const T, 3> g,
                         tensor_view<const T, 4> gk, tensor_view<const T, 3> beta, T scale,
                         tensor_view<const T, 4> h0, tensor_view<const T, 4> do_,
                         tensor_view<const T, 4> dht, const dplr_grads<T>& gr,
                         std::span<const index_t> cu_seqlens = {}, tensor_view<T, 4> o_out = {},
                         tensor_view<T, 4> ht_out = {}) {
  const index_t B = q.extent(0), TT = q.extent(1), Hk = q.extent(2), K = q.extent(3);
  const index_t H = v.extent(2), V = v.extent(3), group = H / Hk;
  const index_t N = cu_seqlens.empty() ? B : static_cast<index_t>(cu_seqlens.size()) - 1;
  gr.dq.fill(T(0));
  gr.dk.fill(T(0));
  const auto KV = static_cast<std::size_t>(K * V);
  auto at = [&](std::vector<T>& m, index_t i, index_t j) -> T& {
    return m[static_cast<std::size_t>(i * V + j)];
  };
  for (index_t n = 0; n < N; ++n) {
    const auto sq = detail::seq_of(cu_seqlens, n, TT);
    const index_t b = sq.b;
    const auto L = static_cast<std::size_t>(sq.t1 - sq.t0);
    for (index_t h = 0; h < H; ++h) {
      const index_t hk = h / group;
      auto decay = [&](index_t t, index_t i) {
        if (gk.data()) return std::exp(gk(b, t, h, i));
        if (g.data()) return std::exp(g(b, t, h));
        return T(1);
      };
      // forward: S[u] = state after u tokens, Sd[u] = S'_t of token u (decayed), E[u] = e_t
      std::vector<T> S((L + 1) * KV), Sd(L * KV), E(L * static_cast<std::size_t>(V));
      for (index_t i = 0; i < K; ++i)
        for (index_t j = 0; j < V; ++j)
          S[static_cast<std::size_t>(i * V + j)] = h0.data() ? h0(n, h, i, j) : T(0);
      for (std::size_t x = 0; x < L; ++x) {
        const index_t t = sq.t0 + static_cast<index_t>(x);
        T* sp = S.data() + x * KV;
        T* sd = Sd.data() + x * KV;
        T* sn = S.data() + (x + 1) * KV;
        for (index_t i = 0; i < K; ++i)
          for (index_t j = 0; j < V; ++j) sd[i * V + j] = decay(t, i) * sp[i * V + j];
        for (index_t j = 0; j < V; ++j) {
          T r = T(0);
          for (index_t i = 0; i < K; ++i) r += sd[i * V + j] * k(b, t, hk, i);
          E[x * static_cast<std::size_t>(V) + static_cast<std::size_t>(j)] = v(b, t, h, j) - r;
        }
        for (index_t i = 0; i < K; ++i)
          for (index_t j = 0; j < V; ++j)
            sn[i * V + j] = sd[i * V + j] +
                            k(b, t, hk, i) * beta(b, t, h) *
                                E[x * static_cast<std::size_t>(V) + static_cast<std::size_t>(j)];
        if (o_out.data()) {
          for (index_t j = 0; j < V; ++j) {
            T acc = T(0);
            for (index_t i = 0; i < K; ++i) acc += scale * q(b, t, hk, i) * sn[i * V + j];
            o_out(b, t, h, j) = acc;
          }
        }
      }
      if (ht_out.data()) {
        for (index_t i = 0; i < K; ++i)
          for (index_t j = 0; j < V; ++j)
            ht_out(n, h, i, j) = S[L * KV + static_cast<std::size_t>(i * V + j)];
      }
      std::vector<T> dS(KV), du(static_cast<std::size_t>(V));
      for (index_t i = 0; i < K; ++i)
        for (index_t j = 0; j < V; ++j) at(dS, i, j) = dht.data() ? dht(n, h, i, j) : T(0);
      for (std::size_t x = L; x-- > 0;) {
        const index_t t = sq.t0 + static_cast<index_t>(x);
        const T* sd = Sd.data() + x * KV;
        const T* sn = S.data() + (x + 1) * KV;
        const T bt = beta(b, t, h);
        const T* e = E.data() + x * static_cast<std::size_t>(V);
        for (index_t i = 0; i < K; ++i)
          for (index_t j = 0; j < V; ++j) at(dS, i, j) += scale * q(b, t, hk, i) * do_(b, t, h, j);
        for (index_t i = 0; i < K; ++i) {
          T acc = T(0);
          for (index_t j = 0; j < V; ++j) acc += sn[i * V + j] * do_(b, t, h, j);
          gr.dq(b, t, hk, i) += scale * acc;
        }
        for (index_t j = 0; j < V; ++j) {
          T acc = T(0);
          for (index_t i = 0; i < K; ++i) acc += at(dS, i, j) * k(b, t, hk, i);
          du[static_cast<std::size_t>(j)] = acc;
        }
        T dbt = T(0);
        for (index_t j = 0; j < V; ++j) {
          gr.dv(b, t, h, j) = bt * du[static_cast<std::size_t>(j)];
          dbt += e[j] * du[static_cast<std::size_t>(j)];
        }
        if (gr.dbeta.data()) gr.dbeta(b, t, h) = dbt;
        for (index_t i = 0; i < K; ++i) {
          T acc = T(0);
          for (index_t j = 0; j < V; ++j)
            acc += at(dS, i, j) * bt * e[j] - sd[i * V + j] * bt * du[static_cast<std::size_t>(j)];
          gr.dk(b, t, hk, i) += acc;
        }
        for (index_t i = 0; i < K; ++i)
          for (index_t j = 0; j < V; ++j)
            at(dS, i, j) -= k(b, t, hk, i) * bt * du[static_cast<std::size_t>(j)];
        T dgs = T(0);
        for (index_t i = 0; i < K; ++i) {
          T acc = T(0);
          for (index_t j = 0; j < V; ++j) acc += at(dS, i, j) * sd[i * V + j];
          if (gr.dgk.data()) gr.dgk(b, t, h, i) = acc;
          dgs += acc;
          const T a = decay(t, i);
          for (index_t j = 0; j < V; ++j) at(dS, i, j) *= a;
        }
        if (gr.dg.data()) gr.dg(b, t, h) = dgs;
      }
      if (gr.dh0.data()) {
        for (index_t i = 0; i < K; ++i)
          for (index_t j = 0; j < V; ++j) gr.dh0(n, h, i, j) = at(dS, i, j);
      }
    }
  }
}

/// Backward of reference::rwkv7 (lowrank) or reference::rwkv6 (!lowrank, bonus u): r, k, w
/// [B,T,H,K], v [B,T,H,V]; a, b [B,T,H,K] (RWKV-7) or u [H,K] (RWKV-6). gr.dgk receives dw.
template <class T>
void rwkv_backward(bool lowrank, tensor_view<const T, 4> r, tensor_view<const T, 4> k,
                   tensor_view<const T, 4> v, tensor_view<const T, 4> w, tensor_view<const T, 4> a,
                   tensor_view<const T, 4> bb, tensor_view<const T, 2> u, T scale,
                   tensor_view<const T, 4> h0, tensor_view<const T, 4> do_,
                   tensor_view<const T, 4> dht, const dplr_grads<T>& gr,
                   std::span<const index_t> cu_seqlens = {}, tensor_view<T, 4> o_out = {},
                   tensor_view<T, 4> ht_out = {}) {
  const index_t B = r.extent(0), TT = r.extent(1), H = r.extent(2), K = r.extent(3);
  const index_t V = v.extent(3);
  const index_t N = cu_seqlens.empty() ? B : static_cast<index_t>(cu_seqlens.size()) - 1;
  if (gr.du.data()) gr.du.fill(T(0));
  const auto KV = static_cast<std::size_t>(K * V);
  for (index_t n = 0; n < N; ++n) {
    const auto sq = detail::seq_of(cu_seqlens, n, TT);
    const index_t b = sq.b;
    const auto L = static_cast<std::size_t>(sq.t1 - sq.t0);
    for (index_t h = 0; h < H; ++h) {
      std::vector<T> S((L + 1) * KV), Z(L * static_cast<std::size_t>(V));
      auto s_at = [&](std::size_t x, index_t i, index_t j) -> T& {
        return S[x * KV + static_cast<std::size_t>(i * V + j)];
      };
      for (index_t i = 0; i < K; ++i)
        for (index_t j = 0; j < V; ++j) s_at(0, i, j) = h0.data() ? h0(n, h, i, j) : T(0);
      for (std::size_t x = 0; x < L; ++x) {
        const index_t t = sq.t0 + static_cast<index_t>(x);
        for (index_t j = 0; j < V; ++j) {
          T z = T(0);
          if (lowrank)
            for (index_t i = 0; i < K; ++i) z += s_at(x, i, j) * a(b, t, h, i);
          Z[x * static_cast<std::size_t>(V) + static_cast<std::size_t>(j)] = z;
          T o = T(0);
          if (!lowrank) {  // read before the write, plus the bonus
            T ku = T(0);
            for (index_t i = 0; i < K; ++i) {
              o += scale * r(b, t, h, i) * s_at(x, i, j);
              ku += scale * r(b, t, h, i) * u(h, i) * k(b, t, h, i);
            }
            o += ku * v(b, t, h, j);
          }
          for (index_t i = 0; i < K; ++i) {
            s_at(x + 1, i, j) = std::exp(w(b, t, h, i)) * s_at(x, i, j) +
                                (lowrank ? bb(b, t, h, i) * z : T(0)) +
                                k(b, t, h, i) * v(b, t, h, j);
          }
          if (lowrank)
            for (index_t i = 0; i < K; ++i) o += scale * r(b, t, h, i) * s_at(x + 1, i, j);
          if (o_out.data()) o_out(b, t, h, j) = o;
        }
      }
      if (ht_out.data()) {
        for (index_t i = 0; i < K; ++i)
          for (index_t j = 0; j < V; ++j) ht_out(n, h, i, j) = s_at(L, i, j);
      }
      std::vector<T> dS(KV), dz(static_cast<std::size_t>(V));
      auto d_at = [&](index_t i, index_t j) -> T& {
        return dS[static_cast<std::size_t>(i * V + j)];
      };
      for (index_t i = 0; i < K; ++i)
        for (index_t j = 0; j < V; ++j) d_at(i, j) = dht.data() ? dht(n, h, i, j) : T(0);
      for (std::size_t x = L; x-- > 0;) {
        const index_t t = sq.t0 + static_cast<index_t>(x);
        if (lowrank) {  // o_t reads S_t
          for (index_t i = 0; i < K; ++i) {
            T acc = T(0);
            for (index_t j = 0; j < V; ++j) {
              d_at(i, j) += scale * r(b, t, h, i) * do_(b, t, h, j);
              acc += s_at(x + 1, i, j) * do_(b, t, h, j);
            }
            gr.dq(b, t, h, i) = scale * acc;
          }
        }
        for (index_t j = 0; j < V; ++j) {
          T dv = T(0), y = T(0);
          for (index_t i = 0; i < K; ++i) {
            dv += d_at(i, j) * k(b, t, h, i);
            if (lowrank) y += d_at(i, j) * bb(b, t, h, i);
          }
          gr.dv(b, t, h, j) = dv;
          dz[static_cast<std::size_t>(j)] = y;
        }
        for (index_t i = 0; i < K; ++i) {
          T dk = T(0), db = T(0), da = T(0), dw = T(0);
          for (index_t j = 0; j < V; ++j) {
            dk += d_at(i, j) * v(b, t, h, j);
            db += d_at(i, j) * Z[x * static_cast<std::size_t>(V) + static_cast<std::size_t>(j)];
            da += s_at(x, i, j) * dz[static_cast<std::size_t>(j)];
            dw += d_at(i, j) * s_at(x, i, j);
          }
          gr.dk(b, t, h, i) = dk;
          gr.dgk(b, t, h, i) = std::exp(w(b, t, h, i)) * dw;
          if (lowrank) {
            gr.da(b, t, h, i) = da;
            gr.db(b, t, h, i) = db;
          }
          const T e = std::exp(w(b, t, h, i));
          for (index_t j = 0; j < V; ++j)
            d_at(i, j) =
                e * d_at(i, j) + (lowrank ? a(b, t, h, i) * dz[static_cast<std::size_t>(j)] : T(0));
        }
        if (!lowrank) {  // the read of S_{t-1} and the bonus
          T c = T(0), ku = T(0);
          for (index_t j = 0; j < V; ++j) c += v(b, t, h, j) * do_(b, t, h, j);
          for (index_t i = 0; i < K; ++i) ku += scale * r(b, t, h, i) * u(h, i) * k(b, t, h, i);
          for (index_t j = 0; j < V; ++j) gr.dv(b, t, h, j) += ku * do_(b, t, h, j);
          for (index_t i = 0; i < K; ++i) {
            T acc = T(0);
            for (index_t j = 0; j < V; ++j) {
              acc += s_at(x, i, j) * do_(b, t, h, j);
              d_at(i, j) += scale * r(b, t, h, i) * do_(b, t, h, j);
            }
            gr.dq(b, t, h, i) = scale * (acc + u(h, i) * k(b, t, h, i) * c);
            gr.dk(b, t, h, i) += u(h, i) * scale * r(b, t, h, i) * c;
            if (gr.du.data()) gr.du(h, i) += scale * r(b, t, h, i) * k(b, t, h, i) * c;
          }
        }
      }
      if (gr.dh0.data()) {
        for (index_t i = 0; i < K; ++i)
          for (index_t j = 0; j < V; ++j) gr.dh0(n, h, i, j) = d_at(i, j);
      }
    }
  }
}

}  // namespace seqmix::reference
