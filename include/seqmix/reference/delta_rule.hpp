// SPDX-License-Identifier: MIT
// Plain references of the delta-rule family (docs/math.md §2): a readable token loop, any scalar
// type, written for clarity, not speed. Tests compare every fast form against these (in double).
//
// DeltaNet, per (sequence, value head), with q_t, k_t rows of K, v_t a row of V, S a [K, V] matrix:
//     u_t = beta_t (v_t - S_{t-1}ᵀ k_t)
//     S_t = S_{t-1} + k_t u_tᵀ
//     o_t = S_tᵀ (s q_t)
// Gated DeltaNet (scalar natural-log gate g_t per head): decay first, then the correction
//     S'_t = exp(g_t) S_{t-1};  u_t = beta_t (v_t - S'_tᵀ k_t);  S_t = S'_t + k_t u_tᵀ
//
// KDA (per-key natural-log gate g_t, a K-vector per value head): decay first, then the correction
//     S'_t = Diag(exp(g_t)) S_{t-1};  u_t = beta_t (v_t - S'_tᵀ k_t);  S_t = S'_t + k_t u_tᵀ
// RWKV-7 (per-key log decay w_t, vectors a_t, b_t; the rank-one term reads S_{t-1} before decay)
//     S_t = Diag(exp(w_t)) S_{t-1} + b_t (a_tᵀ S_{t-1}) + k_t v_tᵀ;  o_t = S_tᵀ (s r_t)
//
// Dimensions: B batch, T tokens, H query/key heads, HV value heads (HV % H == 0; value head hv
// reads q/k head hv / (HV / H)), K key width, V value width.
// Cost: O(B·T·HV·K·V) time, O(K + V) extra memory.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <seqmix/core/tensor.hpp>

namespace seqmix::reference {

/// Delta rule (DeltaNet, or Gated DeltaNet when `g` is non-empty), token by token.
/// @param q      [B, T, H, K]  queries (in)
/// @param k      [B, T, H, K]  keys (in)
/// @param v      [B, T, HV, V] values (in)
/// @param g      [B, T, HV]    natural-log gates (in); an empty view means no gate (DeltaNet)
/// @param beta   [B, T, HV]    write strengths (in)
/// @param o      [B, T, HV, V] outputs (out)
/// @param state  [B, HV, K, V] S_0 (in) and S_T (out)
/// @param scale  multiplies q (after l2norm)
/// @param use_qk_l2norm  replace q, k by x / sqrt(Σx² + 1e-6) first
template <class T>
void delta_rule(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                tensor_view<const T, 3> g, tensor_view<const T, 3> beta, tensor_view<T, 4> o,
                tensor_view<T, 4> state, T scale, bool use_qk_l2norm) {
  const index_t B = q.extent(0), TT = q.extent(1), H = q.extent(2), K = q.extent(3);
  const index_t HV = v.extent(2), V = v.extent(3);
  const index_t group = HV / H;
  const bool gated = !g.empty();
  std::vector<T> qn(static_cast<std::size_t>(K)), kn(static_cast<std::size_t>(K));
  std::vector<T> u(static_cast<std::size_t>(V));
  auto l2 = [&](std::vector<T>& x) {
    if (!use_qk_l2norm) return;
    T ss = 0;
    for (T e : x) ss += e * e;
    const T r = T(1) / std::sqrt(ss + T(1e-6));
    for (T& e : x) e *= r;
  };
  for (index_t b = 0; b < B; ++b) {
    for (index_t hv = 0; hv < HV; ++hv) {
      const index_t h = hv / group;  // GVA: consecutive value heads share a q/k head
      for (index_t t = 0; t < TT; ++t) {
        for (index_t i = 0; i < K; ++i) {
          qn[std::size_t(i)] = q(b, t, h, i);
          kn[std::size_t(i)] = k(b, t, h, i);
        }
        l2(qn);
        l2(kn);
        for (T& e : qn) e *= scale;
        // decay first (Gated DeltaNet): S' = exp(g_t) S
        if (gated) {
          const T decay = std::exp(g(b, t, hv));
          for (index_t i = 0; i < K; ++i)
            for (index_t j = 0; j < V; ++j) state(b, hv, i, j) *= decay;
        }
        // u = beta (v - S'ᵀ k)
        for (index_t j = 0; j < V; ++j) {
          T sk = 0;
          for (index_t i = 0; i < K; ++i) sk += state(b, hv, i, j) * kn[std::size_t(i)];
          u[std::size_t(j)] = beta(b, t, hv) * (v(b, t, hv, j) - sk);
        }
        // S = S' + k uᵀ
        for (index_t i = 0; i < K; ++i)
          for (index_t j = 0; j < V; ++j)
            state(b, hv, i, j) += kn[std::size_t(i)] * u[std::size_t(j)];
        // o = Sᵀ (s q)
        for (index_t j = 0; j < V; ++j) {
          T acc = 0;
          for (index_t i = 0; i < K; ++i) acc += state(b, hv, i, j) * qn[std::size_t(i)];
          o(b, t, hv, j) = acc;
        }
      }
    }
  }
}

/// The Gated DeltaNet gate helper in plain form: g = -exp(A_log) · softplus(a + dt_bias),
/// written as -exp(A_log + log softplus(x)) in long double (so exp(A_log) = inf never meets
/// softplus = 0), clamped to the finite range of T.
template <class T>
T gated_delta_gate(T a, T A_log, T dt_bias) {
  using L = long double;
  const L x = L(a) + L(dt_bias);
  // log softplus(x): log(x) above torch's threshold 20, x far below 0 (softplus(x) ~ e^x)
  const L lsp = x > 20 ? std::log(x) : x < -40 ? x : std::log(std::log1p(std::exp(x)));
  const L r = -std::exp(L(A_log) + lsp);
  const L lo = L(std::numeric_limits<T>::lowest());
  return T(std::isfinite(r) ? std::max(r, lo) : lo);
}

/// Kimi Delta Attention, token by token.
/// @param q, k   [B, T, H, K] (in);  v [B, T, HV, V] (in)
/// @param g      [B, T, HV, K] per-key natural-log gates (in);  beta [B, T, HV] (in)
/// @param o      [B, T, HV, V] (out);  state [B, HV, K, V] S_0 (in), S_T (out)
template <class T>
void kda(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
         tensor_view<const T, 4> g, tensor_view<const T, 3> beta, tensor_view<T, 4> o,
         tensor_view<T, 4> state, T scale, bool use_qk_l2norm) {
  const index_t B = q.extent(0), TT = q.extent(1), H = q.extent(2), K = q.extent(3);
  const index_t HV = v.extent(2), V = v.extent(3);
  const index_t group = HV / H;
  std::vector<T> qn(static_cast<std::size_t>(K)), kn(static_cast<std::size_t>(K));
  std::vector<T> u(static_cast<std::size_t>(V));
  auto l2 = [&](std::vector<T>& x) {
    if (!use_qk_l2norm) return;
    T ss = 0;
    for (T e : x) ss += e * e;
    const T r = T(1) / std::sqrt(ss + T(1e-6));
    for (T& e : x) e *= r;
  };
  for (index_t b = 0; b < B; ++b)
    for (index_t hv = 0; hv < HV; ++hv) {
      const index_t h = hv / group;
      for (index_t t = 0; t < TT; ++t) {
        for (index_t i = 0; i < K; ++i) {
          qn[std::size_t(i)] = q(b, t, h, i);
          kn[std::size_t(i)] = k(b, t, h, i);
        }
        l2(qn);
        l2(kn);
        for (T& e : qn) e *= scale;
        for (index_t i = 0; i < K; ++i) {  // S' = Diag(exp(g)) S
          const T d = std::exp(g(b, t, hv, i));
          for (index_t j = 0; j < V; ++j) state(b, hv, i, j) *= d;
        }
        for (index_t j = 0; j < V; ++j) {  // u = beta (v - S'ᵀ k)
          T sk = 0;
          for (index_t i = 0; i < K; ++i) sk += state(b, hv, i, j) * kn[std::size_t(i)];
          u[std::size_t(j)] = beta(b, t, hv) * (v(b, t, hv, j) - sk);
        }
        for (index_t i = 0; i < K; ++i)
          for (index_t j = 0; j < V; ++j)
            state(b, hv, i, j) += kn[std::size_t(i)] * u[std::size_t(j)];
        for (index_t j = 0; j < V; ++j) {
          T acc = 0;
          for (index_t i = 0; i < K; ++i) acc += state(b, hv, i, j) * qn[std::size_t(i)];
          o(b, t, hv, j) = acc;
        }
      }
    }
}

/// RWKV-7's state update (fla's dplr delta rule), token by token.
/// @param r, k, w, a, b  [B, T, H, K] (in; w natural-log decay);  v [B, T, H, V] (in)
/// @param o      [B, T, H, V] (out);  state [B, H, K, V] S_0 (in), S_T (out)
template <class T>
void rwkv7(tensor_view<const T, 4> r, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
           tensor_view<const T, 4> w, tensor_view<const T, 4> a, tensor_view<const T, 4> b,
           tensor_view<T, 4> o, tensor_view<T, 4> state, T scale) {
  const index_t B = r.extent(0), TT = r.extent(1), H = r.extent(2), K = r.extent(3);
  const index_t V = v.extent(3);
  std::vector<T> sa(static_cast<std::size_t>(V));
  for (index_t n = 0; n < B; ++n)
    for (index_t h = 0; h < H; ++h)
      for (index_t t = 0; t < TT; ++t) {
        for (index_t j = 0; j < V; ++j) {  // sa = a_tᵀ S_{t-1}, before the decay
          T acc = 0;
          for (index_t i = 0; i < K; ++i) acc += a(n, t, h, i) * state(n, h, i, j);
          sa[std::size_t(j)] = acc;
        }
        for (index_t i = 0; i < K; ++i) {
          const T d = std::exp(w(n, t, h, i));
          for (index_t j = 0; j < V; ++j)
            state(n, h, i, j) = d * state(n, h, i, j) + b(n, t, h, i) * sa[std::size_t(j)] +
                                k(n, t, h, i) * v(n, t, h, j);
        }
        for (index_t j = 0; j < V; ++j) {
          T acc = 0;
          for (index_t i = 0; i < K; ++i) acc += state(n, h, i, j) * scale * r(n, t, h, i);
          o(n, t, h, j) = acc;
        }
      }
}

/// RWKV-7's decay parametrisation (fla's layer): w = -exp(-1/2) · sigmoid(x).
template <class T>
T rwkv7_gate(T x) {
  using L = long double;
  return T(-std::exp(L(-0.5)) / (L(1) + std::exp(-L(x))));
}

}  // namespace seqmix::reference
