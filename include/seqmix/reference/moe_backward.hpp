// SPDX-License-Identifier: MIT
// Plain reference of the MoE block's backward (docs/math.md §6; the fast engine is
// kernels/backward/moe.hpp): a token loop in any scalar type, written for clarity. The routing
// (ids, weights, capacity's kept set, logits) is the plain forward's, reference::moe; the
// gradients are the chain rule written out per token, the router's through the full Jacobian
// ∂w_j/∂l_b of each router kind (not the engine's folded formulas).
//
//   L = Σ_t y_t·dy_t + aux_weight·aux + z_weight·z
//   expert e on x: g = W1 x, u = W3 x, h = act(g) ⊙ u (not gated: act(u)), o = W2 h
//   dw_j = o_{e_j}·dy_t (kept slots; dropped: 0, and no gradient into the expert)
//   dh = w_j W2ᵀ dy, du = dh ⊙ act(g), dg = dh ⊙ u ⊙ act'(g); dW2 += w_j dy hᵀ, dW1 += dg xᵀ,
//   dW3 += du xᵀ, dx += W1ᵀ dg + W3ᵀ du; shared expert alike with w = sigmoid(w_g·x) (or 1)
//   dl_b = Σ_j dw_j ∂w_j/∂l_b + aux_weight·E Σ_e (count_e/T²) p_e (δ_eb - p_b)
//          + z_weight·2 lse(l) p_b / T;  dW_r += dl xᵀ, dx += W_rᵀ dl
//   (count_e: top-k of the softmax, constant; the selection bias gets no gradient)
//
// Shapes: x, dy [T, D]; weights as reference::moe's (gate, up [E, I, D], down [E, D, I]; shared
// [S, D], [S, D], [D, S]; shared_gate [1, D]); gradients with the shapes of their inputs.
// Cost O(T·(E²·k + E·D + k·3·D·I)) time, O(E·(I·D) + S·D) memory for the gradients.
#pragma once

#include <cmath>
#include <span>
#include <vector>

#include <seqmix/core/tensor.hpp>
#include <seqmix/kernels/moe.hpp>
#include <seqmix/reference/moe.hpp>

namespace seqmix::reference {

template <class T>
struct moe_backward_result {
  tensor<T, 2> dx, drouter;        // [T, D], [E, D]
  tensor<T, 3> dgate, dup, ddown;  // [E, I, D] (dgate empty when not gated), [E, I, D], [E, D, I]
  tensor<T, 2> dshared_gate_proj, dshared_up, dshared_down;  // [S, D], [S, D], [D, S] or empty
  tensor<T, 2> dshared_gate;                                 // [1, D] or empty
  moe_result<T> forward;  // the forward's outputs, routing and losses
};

namespace moe_detail {

/// act'(v).
template <class T>
T act_grad(kernels::moe::expert_activation a, T v) {
  using A = kernels::moe::expert_activation;
  switch (a) {
    case A::silu: {
      const T s = T(1) / (T(1) + std::exp(-v));
      return s + v * s * (T(1) - s);
    }
    case A::gelu: {
      const T pi = T(3.14159265358979323846);
      return T(0.5) * (T(1) + std::erf(v / std::sqrt(T(2)))) +
             v * std::exp(-v * v / T(2)) / std::sqrt(T(2) * pi);
    }
    case A::gelu_tanh: {
      const T c = std::sqrt(T(2) / T(3.14159265358979323846));
      const T th = std::tanh(c * (v + T(0.044715) * v * v * v));
      return T(0.5) * (T(1) + th) +
             T(0.5) * v * (T(1) - th * th) * c * (T(1) + T(3) * T(0.044715) * v * v);
    }
    case A::relu2:
      return v > T(0) ? T(2) * v : T(0);
  }
  return T(1);
}

/// One MLP's backward on one token, accumulating into its gradients: weight `scale`, cotangent
/// dy; returns o·dy (o = the unscaled MLP output).
template <class T, class M, class G>
T mlp_backward(kernels::moe::expert_activation a, bool gated, const std::vector<T>& x,
               const std::vector<T>& dy, T scale, const M& gate, const M& up, const M& down,
               G dgate, G dup, G ddown, std::vector<T>& dx) {
  auto z = [](index_t i) { return static_cast<std::size_t>(i); };
  const index_t I = up.extent(0), D = up.extent(1);
  std::vector<T> gv(z(I)), uv(z(I)), h(z(I));
  for (index_t i = 0; i < I; ++i) {
    T s_g = 0, s_u = 0;
    for (index_t d = 0; d < D; ++d) {
      s_u += up(i, d) * x[z(d)];
      if (gated) s_g += gate(i, d) * x[z(d)];
    }
    gv[z(i)] = s_g;
    uv[z(i)] = s_u;
    h[z(i)] = gated ? act(a, s_g) * s_u : act(a, s_u);
  }
  T ody = 0;
  for (index_t d = 0; d < D; ++d) {
    T o = 0;
    for (index_t i = 0; i < I; ++i) o += down(d, i) * h[z(i)];
    ody += o * dy[z(d)];
  }
  for (index_t i = 0; i < I; ++i) {
    T dh = 0;
    for (index_t d = 0; d < D; ++d) dh += down(d, i) * scale * dy[z(d)];
    for (index_t d = 0; d < D; ++d) ddown(d, i) += scale * dy[z(d)] * h[z(i)];
    T dgi = 0, dui;
    if (gated) {
      dui = dh * act(a, gv[z(i)]);
      dgi = dh * uv[z(i)] * act_grad(a, gv[z(i)]);
    } else {
      dui = dh * act_grad(a, uv[z(i)]);
    }
    for (index_t d = 0; d < D; ++d) {
      dup(i, d) += dui * x[z(d)];
      dx[z(d)] += dui * up(i, d);
      if (gated) {
        dgate(i, d) += dgi * x[z(d)];
        dx[z(d)] += dgi * gate(i, d);
      }
    }
  }
  return ody;
}

}  // namespace moe_detail

/// Gradients of the MoE block (header comment) for the cotangent dy [T, D] and the loss weights.
/// pooled_counts [E], pooled_tokens: an aux loss pooled over layers (as the engine's
/// loss_weights): the top-k counts and number of all the pooled tokens, this call's included.
template <class T>
moe_backward_result<T> moe_backward(tensor_view<const T, 2> x, const moe_weights<T>& w,
                                    const kernels::moe::router_options& ro,
                                    const kernels::moe::expert_options& eo,
                                    const kernels::moe::capacity_options& co,
                                    tensor_view<const T, 2> dy, double aux_weight = 0,
                                    double z_weight = 0, std::span<const double> pooled_counts = {},
                                    index_t pooled_tokens = 0) {
  using kernels::moe::router_kind;
  auto z = [](index_t i) { return static_cast<std::size_t>(i); };
  const index_t Tn = x.extent(0), D = x.extent(1), E = w.router.extent(0), k = ro.top_k;
  moe_backward_result<T> r;
  r.forward = moe(x, w, ro, eo, co);
  const auto& f = r.forward;
  r.dx = tensor<T, 2>({Tn, D});
  r.drouter = tensor<T, 2>({E, D});
  const index_t I = w.up.extent(1);
  if (eo.gated) r.dgate = tensor<T, 3>({E, I, D});
  r.dup = tensor<T, 3>({E, I, D});
  r.ddown = tensor<T, 3>({E, D, I});
  const bool shared = w.shared_up.data() != nullptr;
  if (shared) {
    const index_t S = w.shared_up.extent(0);
    if (eo.gated) r.dshared_gate_proj = tensor<T, 2>({S, D});
    r.dshared_up = tensor<T, 2>({S, D});
    r.dshared_down = tensor<T, 2>({D, S});
    if (w.shared_gate.data()) r.dshared_gate = tensor<T, 2>({1, D});
  }

  // the aux loss's constant token counts: top-k of each token's softmax
  std::vector<std::vector<T>> probs(z(Tn), std::vector<T>(z(E)));
  std::vector<T> lse(z(Tn));
  std::vector<double> count(z(E), 0.0);
  for (index_t t = 0; t < Tn; ++t) {
    T m = f.logits(t, 0);
    for (index_t e = 1; e < E; ++e) m = std::max(m, f.logits(t, e));
    T den = 0;
    for (index_t e = 0; e < E; ++e) den += std::exp(f.logits(t, e) - m);
    for (index_t e = 0; e < E; ++e) probs[z(t)][z(e)] = std::exp(f.logits(t, e) - m) / den;
    lse[z(t)] = m + std::log(den);
    for (index_t e : moe_detail::top(probs[z(t)], k)) count[z(e)] += 1;
  }

  for (index_t t = 0; t < Tn; ++t) {
    std::vector<T> xt(z(D)), dyt(z(D)), dxt(z(D), T(0));
    for (index_t d = 0; d < D; ++d) {
      xt[z(d)] = x(t, d);
      dyt[z(d)] = dy(t, d);
    }
    // experts: dw_j and the experts' gradients
    std::vector<T> dw(z(k), T(0));
    for (index_t j = 0; j < k; ++j) {
      if (!f.kept(t, j)) continue;
      const index_t e = f.ids(t, j);
      const auto g = eo.gated ? w.gate.template select<0>(e) : tensor_view<const T, 2>{};
      const auto dg = eo.gated ? r.dgate.template select<0>(e) : tensor_view<T, 2>{};
      dw[z(j)] =
          moe_detail::mlp_backward(eo.act, eo.gated, xt, dyt, f.weights(t, j), g,
                                   w.up.template select<0>(e), w.down.template select<0>(e), dg,
                                   r.dup.template select<0>(e), r.ddown.template select<0>(e), dxt);
    }
    // shared expert and its gate
    if (shared) {
      T gt = 1, a = 0;
      if (w.shared_gate.data()) {
        for (index_t d = 0; d < D; ++d) a += w.shared_gate(0, d) * xt[z(d)];
        gt = T(1) / (T(1) + std::exp(-a));
      }
      const T dgt = moe_detail::mlp_backward(
          eo.act, eo.gated, xt, dyt, gt, w.shared_gate_proj, w.shared_up, w.shared_down,
          tensor_view<T, 2>(r.dshared_gate_proj), tensor_view<T, 2>(r.dshared_up),
          tensor_view<T, 2>(r.dshared_down), dxt);
      if (w.shared_gate.data()) {
        const T da = dgt * gt * (T(1) - gt);
        for (index_t d = 0; d < D; ++d) {
          r.dshared_gate(0, d) += da * xt[z(d)];
          dxt[z(d)] += da * w.shared_gate(0, d);
        }
      }
    }
    // router: dl_b = Σ_j dw_j ∂w_j/∂l_b, the Jacobian of each kind written out
    const std::vector<T>& p = probs[z(t)];
    std::vector<T> l(z(E));
    for (index_t e = 0; e < E; ++e) l[z(e)] = f.logits(t, e);
    std::vector<index_t> ids(z(k));
    for (index_t j = 0; j < k; ++j) ids[z(j)] = f.ids(t, j);
    const T rsf = T(ro.routed_scaling_factor);
    auto dsoft = [&](index_t a_, index_t b) {  // ∂p_a/∂l_b
      return p[z(a_)] * ((a_ == b ? T(1) : T(0)) - p[z(b)]);
    };
    std::vector<T> dl(z(E), T(0));
    for (index_t b = 0; b < E; ++b) {
      for (index_t j = 0; j < k; ++j) {
        T J = 0;  // ∂w_j/∂l_b
        const index_t ij = ids[z(j)];
        if (ro.kind == router_kind::softmax_topk) {
          if (ro.renormalize) {
            T P = 0, dP = 0;
            for (index_t m = 0; m < k; ++m) {
              P += p[z(ids[z(m)])];
              dP += dsoft(ids[z(m)], b);
            }
            J = rsf * (dsoft(ij, b) / P - p[z(ij)] * dP / (P * P));
          } else {
            J = rsf * dsoft(ij, b);
          }
        } else if (ro.kind == router_kind::topk_softmax) {
          T s = 0;
          for (index_t m = 0; m < k; ++m) s += std::exp(l[z(ids[z(m)])]);
          const T qj = std::exp(l[z(ij)]) / s;
          const T qb = [&] {
            for (index_t m = 0; m < k; ++m)
              if (ids[z(m)] == b) return std::exp(l[z(b)]) / s;
            return T(0);
          }();
          J = rsf * qj * ((ij == b ? T(1) : T(0)) - qb);
        } else {
          auto sig = [&](index_t e) { return T(1) / (T(1) + std::exp(-l[z(e)])); };
          const T sb = sig(b), dsb = sb * (T(1) - sb);  // ∂s_b/∂l_b (diagonal)
          if (ro.renormalize) {
            T P = 0;
            bool chosen_b = false;
            for (index_t m = 0; m < k; ++m) {
              P += sig(ids[z(m)]);
              chosen_b = chosen_b || ids[z(m)] == b;
            }
            const T den = P + T(1e-20);
            J = rsf *
                ((ij == b ? dsb / den : T(0)) - (chosen_b ? sig(ij) * dsb / (den * den) : T(0)));
          } else {
            J = ij == b ? rsf * dsb : T(0);
          }
        }
        dl[z(b)] += dw[z(j)] * J;
      }
      // aux: E Σ_e (count_e / T) (Σ_t p_te / T); z: mean_t lse_t²
      T da = 0;
      const bool pooled = !pooled_counts.empty();
      const T Tp = T(pooled ? pooled_tokens : Tn);
      for (index_t e = 0; e < E; ++e)
        da += T(pooled ? pooled_counts[z(e)] : count[z(e)]) / (Tp * Tp) * dsoft(e, b);
      dl[z(b)] += T(aux_weight) * T(E) * da + T(z_weight) * T(2) * lse[z(t)] * p[z(b)] / T(Tn);
    }
    for (index_t b = 0; b < E; ++b) {
      for (index_t d = 0; d < D; ++d) {
        r.drouter(b, d) += dl[z(b)] * xt[z(d)];
        dxt[z(d)] += dl[z(b)] * w.router(b, d);
      }
    }
    for (index_t d = 0; d < D; ++d) r.dx(t, d) = dxt[z(d)];
  }
  return r;
}

}  // namespace seqmix::reference
