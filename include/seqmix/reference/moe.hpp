// SPDX-License-Identifier: MIT
// Plain reference of the mixture-of-experts block (docs/math.md §6): a token loop in any scalar
// type, written for clarity, not speed. It shares only the option types with kernels/moe.hpp;
// routing, capacity, experts and losses are written out again here, the obvious way (sorts
// with explicit tie-breaks instead of the engine's selection scans).
//
//   logits_t = W_r x_t; (ids_t, w_t) = router(logits_t) (kinds in kernels/moe.hpp)
//   capacity C = ceil(T·k/E · factor): an expert keeps its C best assignments (by score: larger
//     w first, then lower token; by position: lower token first)
//   y_t = Σ_{kept j} w_tj · W2_e (act(W1_e x_t) ⊙ W3_e x_t) + g_t · shared(x_t)
//   aux = E · Σ_e f_e P_e, z = mean_t logsumexp(logits_t)²
//
// Shapes: x [T, D]; router [E, D]; bias [E] or empty; gate, up [E, I, D] (gate empty when not
// gated); down [E, D, I]; shared gate, up [S, D], down [D, S] (all empty: none); shared_gate
// [1, D] or empty. Cost O(T·(E·D + k·3·D·I)) time, O(E + I) memory per token.
#pragma once

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include <seqmix/core/simd.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/kernels/moe.hpp>

namespace seqmix::reference {

template <class T>
struct moe_result {
  tensor<T, 2> y, logits, weights;  // [T, D], [T, E], [T, k]
  tensor<index_t, 2> ids;           // [T, k] (descending score)
  tensor<unsigned char, 2> kept;    // [T, k]: 0 where the capacity dropped the assignment
  double aux_loss = 0, z_loss = 0;
  index_t dropped = 0;
};

template <class T>
struct moe_weights {
  tensor_view<const T, 2> router{};  // [E, D]
  tensor_view<const T, 1> bias{};    // [E] or empty
  tensor_view<const T, 3> gate{}, up{}, down{};
  tensor_view<const T, 2> shared_gate_proj{}, shared_up{}, shared_down{};
  tensor_view<const T, 2> shared_gate{};  // [1, D]
};

namespace moe_detail {

template <class T>
T act(kernels::moe::expert_activation a, T v) {
  using A = kernels::moe::expert_activation;
  switch (a) {
    case A::silu:
      return v / (T(1) + std::exp(-v));
    case A::gelu:
      return T(0.5) * v * (T(1) + std::erf(v / std::sqrt(T(2))));
    case A::gelu_tanh: {
      const T c = std::sqrt(T(2) / T(3.14159265358979323846));
      return T(0.5) * v * (T(1) + std::tanh(c * (v + T(0.044715) * v * v * v)));
    }
    case A::relu2:
      return v > T(0) ? v * v : T(0);
  }
  return v;
}

/// Indices of the k largest s, descending, ties to the lower index.
template <class T>
std::vector<index_t> top(const std::vector<T>& s, index_t k) {
  std::vector<index_t> order(s.size());
  std::iota(order.begin(), order.end(), index_t(0));
  std::stable_sort(order.begin(), order.end(), [&](index_t a, index_t b) {
    return s[static_cast<std::size_t>(a)] > s[static_cast<std::size_t>(b)];
  });
  order.resize(static_cast<std::size_t>(k));
  return order;
}

/// MLP on one token: out = W2 (act(W1 x) ⊙ W3 x) (W1 absent: act(W3 x)).
template <class T, class M>
std::vector<T> mlp(kernels::moe::expert_activation a, const std::vector<T>& x, const M& gate,
                   const M& up, const M& down, bool gated) {
  const index_t I = up.extent(0), D = up.extent(1);
  std::vector<T> h(static_cast<std::size_t>(I));
  for (index_t i = 0; i < I; ++i) {
    T u = 0, g = 0;
    for (index_t d = 0; d < D; ++d) {
      u += up(i, d) * x[static_cast<std::size_t>(d)];
      if (gated) g += gate(i, d) * x[static_cast<std::size_t>(d)];
    }
    h[static_cast<std::size_t>(i)] = gated ? act(a, g) * u : act(a, u);
  }
  std::vector<T> out(static_cast<std::size_t>(D));
  for (index_t d = 0; d < D; ++d) {
    T s = 0;
    for (index_t i = 0; i < I; ++i) s += down(d, i) * h[static_cast<std::size_t>(i)];
    out[static_cast<std::size_t>(d)] = s;
  }
  return out;
}

}  // namespace moe_detail

/// The MoE block on x [T, D] (see the header comment). Options as the engine's.
template <class T>
moe_result<T> moe(tensor_view<const T, 2> x, const moe_weights<T>& w,
                  const kernels::moe::router_options& ro, const kernels::moe::expert_options& eo,
                  const kernels::moe::capacity_options& co = {}) {
  using kernels::moe::router_kind;
  const index_t Tn = x.extent(0), D = x.extent(1), E = w.router.extent(0), k = ro.top_k;
  auto z = [](index_t i) { return static_cast<std::size_t>(i); };
  moe_result<T> r;
  r.y = tensor<T, 2>({Tn, D});
  r.logits = tensor<T, 2>({Tn, E});
  r.weights = tensor<T, 2>({Tn, k});
  r.ids = tensor<index_t, 2>({Tn, k});
  r.kept = tensor<unsigned char, 2>({Tn, k});
  std::vector<double> f(z(E), 0.0), P(z(E), 0.0);
  double zsum = 0;
  for (index_t t = 0; t < Tn; ++t) {
    std::vector<T> l(z(E));
    for (index_t e = 0; e < E; ++e) {
      T s = 0;
      for (index_t d = 0; d < D; ++d) s += w.router(e, d) * x(t, d);
      l[z(e)] = s;
      r.logits(t, e) = s;
    }
    // softmax (for routing and the losses)
    const T m = *std::max_element(l.begin(), l.end());
    T den = 0;
    for (T v : l) den += std::exp(v - m);
    std::vector<T> p(z(E));
    for (index_t e = 0; e < E; ++e) p[z(e)] = std::exp(l[z(e)] - m) / den;
    const double lse = double(m) + std::log(double(den));
    zsum += lse * lse;
    for (index_t e = 0; e < E; ++e) P[z(e)] += double(p[z(e)]);
    for (index_t e : moe_detail::top(p, k)) f[z(e)] += 1;

    std::vector<index_t> ids;
    std::vector<T> wt(z(k));
    if (ro.kind == router_kind::softmax_topk) {
      ids = moe_detail::top(p, k);
      T sum = 0;
      for (index_t j = 0; j < k; ++j) sum += (wt[z(j)] = p[z(ids[z(j)])]);
      if (ro.renormalize)
        for (T& v : wt) v /= sum;
    } else if (ro.kind == router_kind::topk_softmax) {
      ids = moe_detail::top(l, k);
      T sum = 0;
      for (index_t j = 0; j < k; ++j) sum += (wt[z(j)] = std::exp(l[z(ids[z(j)])] - l[z(ids[0])]));
      for (T& v : wt) v /= sum;
    } else {
      std::vector<T> s(z(E)), c(z(E));
      for (index_t e = 0; e < E; ++e) {
        s[z(e)] = T(1) / (T(1) + std::exp(-l[z(e)]));
        c[z(e)] = s[z(e)] + (w.bias.data() ? w.bias(e) : T(0));
      }
      if (ro.n_group > 1) {
        const index_t per = E / ro.n_group;
        std::vector<T> gscore(z(ro.n_group));
        for (index_t g = 0; g < ro.n_group; ++g) {
          std::vector<T> in(c.begin() + g * per, c.begin() + (g + 1) * per);
          std::sort(in.begin(), in.end(), [](T a, T b) { return a > b; });
          gscore[z(g)] = in[0] + in[1];
        }
        const auto keep = moe_detail::top(gscore, ro.topk_group);
        for (index_t e = 0; e < E; ++e) {
          if (std::find(keep.begin(), keep.end(), e / per) == keep.end())
            c[z(e)] = T(ro.masked_choice_score);
        }
      }
      ids = moe_detail::top(c, k);
      T sum = 0;
      for (index_t j = 0; j < k; ++j) sum += (wt[z(j)] = s[z(ids[z(j)])]);
      if (ro.renormalize)
        for (T& v : wt) v /= (sum + T(1e-20));
    }
    for (index_t j = 0; j < k; ++j) {
      r.ids(t, j) = ids[z(j)];
      r.weights(t, j) = wt[z(j)] * T(ro.routed_scaling_factor);
      r.kept(t, j) = 1;
    }
  }
  r.aux_loss = 0;
  for (index_t e = 0; e < E; ++e) r.aux_loss += (f[z(e)] / double(Tn)) * (P[z(e)] / double(Tn));
  r.aux_loss *= double(E);
  r.z_loss = zsum / double(Tn);

  // capacity: per expert, rank its assignments and drop those past C
  if (co.factor > 0) {
    const auto C =
        static_cast<index_t>(std::ceil(double(Tn) * double(k) / double(E) * double(co.factor)));
    for (index_t e = 0; e < E; ++e) {
      std::vector<std::pair<index_t, index_t>> a;  // (t, j)
      for (index_t t = 0; t < Tn; ++t)
        for (index_t j = 0; j < k; ++j)
          if (r.ids(t, j) == e) a.push_back({t, j});
      std::stable_sort(a.begin(), a.end(), [&](const auto& u, const auto& v) {
        if (co.policy == kernels::moe::drop_policy::by_position) return u.first < v.first;
        return r.weights(u.first, u.second) > r.weights(v.first, v.second);
      });
      for (std::size_t i = z(C); i < a.size(); ++i) {
        r.kept(a[i].first, a[i].second) = 0;
        ++r.dropped;
      }
    }
  }

  // experts and the shared expert
  for (index_t t = 0; t < Tn; ++t) {
    std::vector<T> xt(z(D)), acc(z(D), T(0));
    for (index_t d = 0; d < D; ++d) xt[z(d)] = x(t, d);
    for (index_t j = 0; j < k; ++j) {
      if (!r.kept(t, j)) continue;
      const index_t e = r.ids(t, j);
      const auto g = eo.gated ? w.gate.template select<0>(e) : tensor_view<const T, 2>{};
      const auto o = moe_detail::mlp(eo.act, xt, g, w.up.template select<0>(e),
                                     w.down.template select<0>(e), eo.gated);
      for (index_t d = 0; d < D; ++d) acc[z(d)] += r.weights(t, j) * o[z(d)];
    }
    if (w.shared_up.data()) {
      T gt = 1;
      if (w.shared_gate.data()) {
        T s = 0;
        for (index_t d = 0; d < D; ++d) s += w.shared_gate(0, d) * xt[z(d)];
        gt = T(1) / (T(1) + std::exp(-s));
      }
      const auto o =
          moe_detail::mlp(eo.act, xt, w.shared_gate_proj, w.shared_up, w.shared_down, eo.gated);
      for (index_t d = 0; d < D; ++d) acc[z(d)] += gt * o[z(d)];
    }
    for (index_t d = 0; d < D; ++d) r.y(t, d) = acc[z(d)];
  }
  return r;
}

}  // namespace seqmix::reference
