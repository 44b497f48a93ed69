// SPDX-License-Identifier: MIT
// Plain references of the gated-accumulation family (docs/math.md §1, §3 RWKV-6 and §4): readable
// token loops over any scalar type, written for clarity, not speed. Tests run them in double.
//
//   S_t = Diag(exp(gk_t)) · exp(g_t) · S_{t-1} · Diag(exp(gv_t)) + k_t v_tᵀ      S: [K, V]
//   o_t = S_tᵀ (s q_t)                       (linear attention may divide by s q_t · z_t + 1e-10)
//
// Dimensions: B batch, T tokens, H heads (of v/o/state), Hk heads of q/k (H % Hk == 0, head h
// reads q/k head h / (H / Hk)), K key size, V value size. Cost: O(B·T·H·K·V) time, O(K·V) extra.
#pragma once

#include <cmath>
#include <vector>

#include <seqmix/core/simd.hpp>
#include <seqmix/core/tensor.hpp>

namespace seqmix::reference {

/// Gates of one reference call; empty views mean "absent" (no decay from that gate).
template <class T>
struct gated_gates {
  tensor_view<const T, 3> g;        ///< [B,T,H] scalar log gate (simple GLA, Mamba2's dt·A)
  tensor_view<const T, 1> g_gamma;  ///< [H] constant log gate (retention, Lightning)
  tensor_view<const T, 4> gk;       ///< [B,T,H,K] per-key log gate (GLA)
  tensor_view<const T, 4> gv;       ///< [B,T,H,V] per-value log gate (GLA, optional)
  tensor_view<const T, 3> k_scale;  ///< [B,T,H] multiplies k_t (Mamba2's dt), 1 when absent
};

/// The whole family as one token loop.
/// q, k: [B,T,Hk,K] in; v: [B,T,H,V] in; o: [B,T,H,V] out; state: [B,H,K,V] in S_0, out S_T;
/// z: [B,H,K] normaliser state (in/out) or an empty view for no normaliser.
template <class T>
void gated_accumulation(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                        tensor_view<const T, 4> v, const gated_gates<T>& gates, T scale,
                        tensor_view<T, 4> o, tensor_view<T, 4> state, tensor_view<T, 3> z = {}) {
  const index_t B = q.extent(0), TT = q.extent(1), Hk = q.extent(2), K = q.extent(3);
  const index_t H = v.extent(2), V = v.extent(3);
  const index_t group = H / Hk;
  const bool normalise = z.data() != nullptr;
  std::vector<T> qs(static_cast<std::size_t>(K));
  for (index_t b = 0; b < B; ++b) {
    for (index_t h = 0; h < H; ++h) {
      const index_t hk = h / group;
      for (index_t t = 0; t < TT; ++t) {
        // decay factors of this token
        T a = T(1);
        if (gates.g.data()) a *= std::exp(gates.g(b, t, h));
        if (gates.g_gamma.data()) a *= std::exp(gates.g_gamma(h));
        const T ks = gates.k_scale.data() ? gates.k_scale(b, t, h) : T(1);
        for (index_t i = 0; i < K; ++i) {
          T ai = a;
          if (gates.gk.data()) ai *= std::exp(gates.gk(b, t, h, i));
          for (index_t j = 0; j < V; ++j) {
            T aij = ai;
            if (gates.gv.data()) aij *= std::exp(gates.gv(b, t, h, j));
            state(b, h, i, j) = aij * state(b, h, i, j) + ks * k(b, t, hk, i) * v(b, t, h, j);
          }
          if (normalise) z(b, h, i) = ai * z(b, h, i) + ks * k(b, t, hk, i);
          qs[static_cast<std::size_t>(i)] = scale * q(b, t, hk, i);
        }
        // read-out after the write (inclusive)
        T den = T(1);
        if (normalise) {
          den = T(1e-10);
          for (index_t i = 0; i < K; ++i) den += qs[static_cast<std::size_t>(i)] * z(b, h, i);
        }
        for (index_t j = 0; j < V; ++j) {
          T acc = T(0);
          for (index_t i = 0; i < K; ++i)
            acc += qs[static_cast<std::size_t>(i)] * state(b, h, i, j);
          o(b, t, h, j) = acc / den;
        }
      }
    }
  }
}

/// Linear attention: no gate; optional normaliser z [B,H,K].
template <class T>
void linear_attention(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                      tensor_view<const T, 4> v, T scale, tensor_view<T, 4> o,
                      tensor_view<T, 4> state, tensor_view<T, 3> z = {}) {
  gated_accumulation<T>(q, k, v, {}, scale, o, state, z);
}

/// Simple GLA with a data-dependent scalar gate g [B,T,H].
template <class T>
void simple_gla(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                tensor_view<const T, 3> g, T scale, tensor_view<T, 4> o, tensor_view<T, 4> state) {
  gated_gates<T> gates;
  gates.g = g;
  gated_accumulation<T>(q, k, v, gates, scale, o, state);
}

/// Simple GLA with a constant per-head gate g_gamma [H] (retention, Lightning).
template <class T>
void simple_gla_constant(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                         tensor_view<const T, 4> v, tensor_view<const T, 1> g_gamma, T scale,
                         tensor_view<T, 4> o, tensor_view<T, 4> state) {
  gated_gates<T> gates;
  gates.g_gamma = g_gamma;
  gated_accumulation<T>(q, k, v, gates, scale, o, state);
}

/// GLA: per-key gate gk [B,T,H,K], optional per-value gate gv [B,T,H,V] (empty view: none).
template <class T>
void gla(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
         tensor_view<const T, 4> gk, tensor_view<const T, 4> gv, T scale, tensor_view<T, 4> o,
         tensor_view<T, 4> state) {
  gated_gates<T> gates;
  gates.gk = gk;
  gates.gv = gv;
  gated_accumulation<T>(q, k, v, gates, scale, o, state);
}

/// RWKV-6 (docs/math.md §3): the read comes before the write and adds the current token through
/// the bonus u:
///   o_t = (S_{t-1} + Diag(u) k_t v_tᵀ)ᵀ (s r_t),   S_t = Diag(exp(w_t)) S_{t-1} + k_t v_tᵀ.
/// r, k, w: [B,T,H,K]; v: [B,T,H,V]; u: [H,K]; o: [B,T,H,V] out; state: [B,H,K,V] in/out.
template <class T>
void rwkv6(tensor_view<const T, 4> r, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
           tensor_view<const T, 4> w, tensor_view<const T, 2> u, T scale, tensor_view<T, 4> o,
           tensor_view<T, 4> state) {
  const index_t B = r.extent(0), TT = r.extent(1), H = r.extent(2), K = r.extent(3);
  const index_t V = v.extent(3);
  for (index_t b = 0; b < B; ++b) {
    for (index_t h = 0; h < H; ++h) {
      for (index_t t = 0; t < TT; ++t) {
        // read-out before the write (exclusive), plus the bonus on the current token
        for (index_t j = 0; j < V; ++j) {
          T acc = T(0);
          for (index_t i = 0; i < K; ++i) {
            acc += scale * r(b, t, h, i) *
                   (state(b, h, i, j) + u(h, i) * k(b, t, h, i) * v(b, t, h, j));
          }
          o(b, t, h, j) = acc;
        }
        for (index_t i = 0; i < K; ++i) {
          const T a = std::exp(w(b, t, h, i));
          for (index_t j = 0; j < V; ++j) {
            state(b, h, i, j) = a * state(b, h, i, j) + k(b, t, h, i) * v(b, t, h, j);
          }
        }
      }
    }
  }
}

/// Mamba2 SSD (docs/math.md §4) with state layout [B,H,N,P]:
///   dt = softplus(dt_raw + dt_bias) (or dt_raw + dt_bias when !dt_softplus), clamped to
///   [dt_min, dt_max]; A = -exp(A_log); S_t = exp(dt A) S_{t-1} + B_t (dt x_t)ᵀ;
///   y_t = S_tᵀ C_t + D x_t.
/// x: [B,T,H,P]; dt_raw: [B,T,H]; dt_bias, A_log, D: [H]; Bm, Cm: [B,T,G,N]; y: [B,T,H,P] out;
/// state: [B,H,N,P] in/out.
template <class T>
void mamba2_ssd(tensor_view<const T, 4> x, tensor_view<const T, 3> dt_raw,
                tensor_view<const T, 1> dt_bias, tensor_view<const T, 1> A_log,
                tensor_view<const T, 4> Bm, tensor_view<const T, 4> Cm, tensor_view<const T, 1> D,
                bool dt_softplus, T dt_min, T dt_max, tensor_view<T, 4> y,
                tensor_view<T, 4> state) {
  const index_t Bn = x.extent(0), TT = x.extent(1), H = x.extent(2), P = x.extent(3);
  const index_t G = Bm.extent(2), N = Bm.extent(3), group = H / G;
  for (index_t b = 0; b < Bn; ++b) {
    for (index_t h = 0; h < H; ++h) {
      const index_t g = h / group;
      const T A = -std::exp(A_log(h));
      for (index_t t = 0; t < TT; ++t) {
        T dt = dt_raw(b, t, h) + (dt_bias.data() ? dt_bias(h) : T(0));
        if (dt_softplus) dt = math::softplus(dt);
        dt = std::min(std::max(dt, dt_min), dt_max);
        const T a = std::exp(dt * A);
        for (index_t n = 0; n < N; ++n) {
          for (index_t p = 0; p < P; ++p) {
            state(b, h, n, p) = a * state(b, h, n, p) + Bm(b, t, g, n) * (dt * x(b, t, h, p));
          }
        }
        for (index_t p = 0; p < P; ++p) {
          T acc = T(0);
          for (index_t n = 0; n < N; ++n) acc += state(b, h, n, p) * Cm(b, t, g, n);
          y(b, t, h, p) = acc + (D.data() ? D(h) : T(0)) * x(b, t, h, p);
        }
      }
    }
  }
}

}  // namespace seqmix::reference
