// SPDX-License-Identifier: MIT
// Plain references of the layer tier's building blocks (layers/*.hpp), in any scalar type
// (double in the tests), written the obvious way for clarity, not speed: token loops, no
// fusion, no reordering of weights, positions and angles in T.
//
//   short_conv      y[t,c] = act(b[c] + Σ_j w[c,j] x[t-K+1+j, c]), x < 0 from the state [K-1, C]
//   rms_norm        y = x / sqrt(mean_group(x²) + ε) · w'      (w' = w or 1 + w)
//   gated_rms_norm  before: rmsnorm(x·silu(z))·w; after: rmsnorm(x)·w·silu(z); sigmoid: ·σ(z)
//   l2norm          y = x / sqrt(Σ_group x² + ε)
//   rope            rotate-half or interleaved pairs on the first R dims, angle p·θ^(-2i/R)
//   linear          y = x Wᵀ + b;  swiglu  y = W_d (silu(W_g x) ⊙ W_u x)
//   gla_layer       fla's GatedLinearAttention, one sequence, token by token (layers/gla.hpp)
//   rwkv7_layer     fla's RWKV7Attention, one sequence, token by token (layers/rwkv7.hpp)
//
// Shapes as in the layers' headers; every function returns a new tensor. Cost: the obvious
// O(size · work per element); no checks beyond what the tests need (they build the inputs).
#pragma once

#include <algorithm>
#include <cmath>
#include <map>
#include <span>
#include <string>
#include <vector>

#include <seqmix/core/simd.hpp>
#include <seqmix/core/tensor.hpp>

namespace seqmix::reference {

/// x [B, T, C], w [C, K], bias [C] or empty, state [B, K-1, C] (in/out) -> y [B, T, C].
template <class T>
tensor<T, 3> short_conv(tensor_view<const T, 3> x, tensor_view<const T, 2> w,
                        tensor_view<const T, 1> bias, bool silu, tensor_view<T, 3> state) {
  const index_t B = x.extent(0), TT = x.extent(1), C = x.extent(2), K = w.extent(1);
  tensor<T, 3> y({B, TT, C});
  for (index_t b = 0; b < B; ++b) {
    // the window: state rows then x, as one sequence of positions -(K-1) .. T-1
    auto at = [&](index_t p, index_t c) { return p < 0 ? state(b, K - 1 + p, c) : x(b, p, c); };
    for (index_t t = 0; t < TT; ++t)
      for (index_t c = 0; c < C; ++c) {
        T acc = bias.data() ? bias(c) : T(0);
        for (index_t j = 0; j < K; ++j) acc += w(c, j) * at(t - (K - 1) + j, c);
        y(b, t, c) = silu ? math::silu(acc) : acc;
      }
    std::vector<T> last(static_cast<std::size_t>((K - 1) * C));
    for (index_t r = 0; r < K - 1; ++r)
      for (index_t c = 0; c < C; ++c)
        last[static_cast<std::size_t>(r * C + c)] = at(TT - (K - 1) + r, c);
    for (index_t r = 0; r < K - 1; ++r)
      for (index_t c = 0; c < C; ++c) state(b, r, c) = last[static_cast<std::size_t>(r * C + c)];
  }
  return y;
}

enum class gate_kind { none, silu_before, silu_after, sigmoid_after };

/// x [M, W] (z [M, W] when gated) -> y [M, W]; groups of G; weight [W] or [G]; one_plus: 1 + w.
template <class T>
tensor<T, 2> rms_norm(tensor_view<const T, 2> x, tensor_view<const T, 1> w, T eps, bool one_plus,
                      index_t G, gate_kind gate = gate_kind::none, tensor_view<const T, 2> z = {}) {
  const index_t M = x.extent(0), W = x.extent(1);
  tensor<T, 2> y({M, W});
  for (index_t m = 0; m < M; ++m)
    for (index_t g0 = 0; g0 < W; g0 += G) {
      std::vector<T> v(static_cast<std::size_t>(G));
      for (index_t i = 0; i < G; ++i) {
        v[static_cast<std::size_t>(i)] = x(m, g0 + i);
        if (gate == gate_kind::silu_before)
          v[static_cast<std::size_t>(i)] *= math::silu(z(m, g0 + i));
      }
      T ms = 0;
      for (T e : v) ms += e * e;
      ms /= T(G);
      const T r = T(1) / std::sqrt(ms + eps);
      for (index_t i = 0; i < G; ++i) {
        const T wi = w.extent(0) == W ? w(g0 + i) : w(i);
        T out = v[static_cast<std::size_t>(i)] * r * (one_plus ? T(1) + wi : wi);
        if (gate == gate_kind::silu_after) out *= math::silu(z(m, g0 + i));
        if (gate == gate_kind::sigmoid_after) out *= math::sigmoid(z(m, g0 + i));
        y(m, g0 + i) = out;
      }
    }
  return y;
}

/// x [M, W] -> y [M, W], each group of G to unit norm: x / sqrt(Σx² + ε).
template <class T>
tensor<T, 2> l2norm(tensor_view<const T, 2> x, index_t G, T eps) {
  const index_t M = x.extent(0), W = x.extent(1);
  tensor<T, 2> y({M, W});
  for (index_t m = 0; m < M; ++m)
    for (index_t g0 = 0; g0 < W; g0 += G) {
      T ss = 0;
      for (index_t i = 0; i < G; ++i) ss += x(m, g0 + i) * x(m, g0 + i);
      for (index_t i = 0; i < G; ++i) y(m, g0 + i) = x(m, g0 + i) / std::sqrt(ss + eps);
    }
  return y;
}

/// x [B, T, H, hd] -> rotated copy; token t of row b at position start[b] + t.
template <class T>
tensor<T, 4> rope(tensor_view<const T, 4> x, index_t R, T theta, bool interleaved,
                  std::span<const index_t> start) {
  tensor<T, 4> y = tensor<T, 4>::copy_of(x);
  const index_t half = R / 2;
  for (index_t b = 0; b < x.extent(0); ++b)
    for (index_t t = 0; t < x.extent(1); ++t)
      for (index_t h = 0; h < x.extent(2); ++h)
        for (index_t i = 0; i < half; ++i) {
          const T p = T(start[static_cast<std::size_t>(b)] + t);
          const T angle = p * std::pow(theta, -T(2 * i) / T(R));
          const index_t i0 = interleaved ? 2 * i : i, i1 = interleaved ? 2 * i + 1 : i + half;
          const T a = x(b, t, h, i0), c = x(b, t, h, i1);
          y(b, t, h, i0) = a * std::cos(angle) - c * std::sin(angle);
          y(b, t, h, i1) = c * std::cos(angle) + a * std::sin(angle);
        }
  return y;
}

/// x [M, in], W [out, in], bias [out] or empty -> y [M, out].
template <class T>
tensor<T, 2> linear(tensor_view<const T, 2> x, tensor_view<const T, 2> W,
                    tensor_view<const T, 1> bias = {}) {
  tensor<T, 2> y({x.extent(0), W.extent(0)});
  for (index_t m = 0; m < x.extent(0); ++m)
    for (index_t o = 0; o < W.extent(0); ++o) {
      T acc = bias.data() ? bias(o) : T(0);
      for (index_t i = 0; i < W.extent(1); ++i) acc += x(m, i) * W(o, i);
      y(m, o) = acc;
    }
  return y;
}

/// x [M, D]; gate, up [I, D]; down [D, I] -> y [M, D].
template <class T>
tensor<T, 2> swiglu(tensor_view<const T, 2> x, tensor_view<const T, 2> gate,
                    tensor_view<const T, 2> up, tensor_view<const T, 2> down) {
  const auto g = linear<T>(x, gate), u = linear<T>(x, up);
  tensor<T, 2> a(g.shape());
  for (index_t m = 0; m < g.extent(0); ++m)
    for (index_t i = 0; i < g.extent(1); ++i) a(m, i) = math::silu(g(m, i)) * u(m, i);
  return linear<T>(a.view(), down);
}

/// A layer's weights by their on-disk names (under no prefix), each flat and row-major.
template <class T>
using named_weights = std::map<std::string, std::vector<T>>;

namespace detail {
// y = W x (+ b) for W [out, in] flat
template <class T>
std::vector<T> matvec(const std::vector<T>& W, const std::vector<T>& x, index_t out,
                      const std::vector<T>* b = nullptr) {
  const index_t in = static_cast<index_t>(x.size());
  std::vector<T> y(static_cast<std::size_t>(out));
  for (index_t o = 0; o < out; ++o) {
    T acc = b ? (*b)[static_cast<std::size_t>(o)] : T(0);
    for (index_t i = 0; i < in; ++i)
      acc += W[static_cast<std::size_t>(o * in + i)] * x[static_cast<std::size_t>(i)];
    y[static_cast<std::size_t>(o)] = acc;
  }
  return y;
}
template <class T>
T logsigmoid(T x) {
  return std::min(x, T(0)) - std::log1p(std::exp(-std::abs(x)));
}
template <class T>
T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}
}  // namespace detail

/// fla's GatedLinearAttention on one sequence x [T, D] -> y [T, D], from the state [H, dk, dv]
/// and (with short convs) the conv window [K-1, C] (oldest first, channels [q ‖ k ‖ v]), both
/// updated in place. Cfg is layers::gla_layer_config (the sizes are re-derived here).
template <class T, class Cfg>
tensor<T, 2> gla_layer(const named_weights<T>& w, const Cfg& c, tensor_view<const T, 2> x,
                       tensor_view<T, 3> state, tensor_view<T, 2> conv) {
  const index_t D = c.hidden, H = c.heads, HKV = c.kv_heads ? c.kv_heads : c.heads;
  const index_t dk = static_cast<index_t>(static_cast<double>(D) * c.expand_k) / H;
  const index_t dv = static_cast<index_t>(static_cast<double>(D) * c.expand_v) / H;
  const index_t G = H / HKV, r = c.gate_low_rank_dim, TT = x.extent(0);
  const index_t Kq = H * dk, Kk = HKV * dk, Kv = HKV * dv, C = Kq + Kk + Kv;
  const bool sig = c.gate_fn == "sigmoid";
  const std::string norm = (c.gate_fn == "swish" && c.fuse_norm && c.use_output_gate)
                               ? "g_norm_swish_gate.weight"
                               : "g_norm.weight";
  tensor<T, 2> y({TT, D});
  for (index_t t = 0; t < TT; ++t) {
    std::vector<T> xt(static_cast<std::size_t>(D));
    for (index_t i = 0; i < D; ++i) xt[static_cast<std::size_t>(i)] = x(t, i);
    // q | k | v as one row of C channels
    std::vector<T> qkv;
    for (const char* n : {"q_proj.weight", "k_proj.weight", "v_proj.weight"}) {
      const auto& W = w.at(n);
      const auto part = detail::matvec(W, xt, static_cast<index_t>(W.size()) / D);
      qkv.insert(qkv.end(), part.begin(), part.end());
    }
    if (c.use_short_conv) {
      const index_t K = c.conv_size;
      std::vector<T> cw, cb;
      for (const char* n : {"q_conv1d", "k_conv1d", "v_conv1d"}) {
        const auto& wn = w.at(std::string(n) + ".weight");
        cw.insert(cw.end(), wn.begin(), wn.end());
        if (c.conv_bias) {
          const auto& bn = w.at(std::string(n) + ".bias");
          cb.insert(cb.end(), bn.begin(), bn.end());
        }
      }
      std::vector<T> out(static_cast<std::size_t>(C));
      for (index_t ch = 0; ch < C; ++ch) {
        T acc = c.conv_bias ? cb[static_cast<std::size_t>(ch)] : T(0);
        for (index_t j = 0; j < K - 1; ++j)
          acc += cw[static_cast<std::size_t>(ch * K + j)] * conv(j, ch);
        acc += cw[static_cast<std::size_t>(ch * K + K - 1)] * qkv[static_cast<std::size_t>(ch)];
        out[static_cast<std::size_t>(ch)] = acc * detail::sigmoid(acc);
      }
      for (index_t j = 0; j + 1 < K - 1; ++j)
        for (index_t ch = 0; ch < C; ++ch) conv(j, ch) = conv(j + 1, ch);
      for (index_t ch = 0; ch < C; ++ch) conv(K - 2, ch) = qkv[static_cast<std::size_t>(ch)];
      qkv = out;
    }
    // the low-rank log gate per kv key channel
    const auto low = detail::matvec(w.at("gk_proj.0.weight"), xt, r);
    auto gk = detail::matvec(w.at("gk_proj.1.weight"), low, Kk, &w.at("gk_proj.1.bias"));
    for (auto& e : gk) {
      e = detail::logsigmoid(e) / T(c.gate_logit_normalizer);
      if (c.clamp_min) e = std::max(e, T(*c.clamp_min));
    }
    std::vector<T> g;
    if (c.use_output_gate) g = detail::matvec(w.at("g_proj.weight"), xt, H * dv);
    std::vector<T> o(static_cast<std::size_t>(H * dv));
    const T scale = T(1) / std::sqrt(T(dk));
    for (index_t h = 0; h < H; ++h) {
      const index_t j = h / G;  // the kv head of query head h
      const T* q = qkv.data() + h * dk;
      const T* k = qkv.data() + Kq + j * dk;
      const T* v = qkv.data() + Kq + Kk + j * dv;
      const T* gh = gk.data() + j * dk;
      for (index_t a = 0; a < dk; ++a)
        for (index_t b = 0; b < dv; ++b)
          state(h, a, b) = std::exp(gh[a]) * state(h, a, b) + k[a] * v[b];
      T* oh = o.data() + h * dv;
      for (index_t b = 0; b < dv; ++b) {
        T acc = 0;
        for (index_t a = 0; a < dk; ++a) acc += state(h, a, b) * q[a] * scale;
        oh[b] = acc;
      }
      // RMSNorm over the head, weight, then the output gate
      T ms = 0;
      for (index_t b = 0; b < dv; ++b) ms += oh[b] * oh[b];
      const T rs = T(1) / std::sqrt(ms / T(dv) + T(c.norm_eps));
      for (index_t b = 0; b < dv; ++b) {
        T e = oh[b] * rs * (c.elementwise_affine ? w.at(norm)[static_cast<std::size_t>(b)] : T(1));
        if (c.use_output_gate) {
          const T z = g[static_cast<std::size_t>(h * dv + b)];
          e *= sig ? detail::sigmoid(z) : z * detail::sigmoid(z);
        }
        oh[b] = e;
      }
    }
    const auto yt = detail::matvec(w.at("o_proj.weight"), o, D);
    for (index_t i = 0; i < D; ++i) y(t, i) = yt[static_cast<std::size_t>(i)];
  }
  return y;
}

/// fla's RWKV7Attention on one sequence x [T, D] -> y [T, D], from the mixer state [H, hd, dv]
/// and the token-shift state `shift` [D] (the previous x), both updated in place. v_first
/// [T, Dv]: written by layer 0 (cfg.layer_idx == 0), read by the others. Cfg is
/// layers::rwkv7_layer_config (the low-rank sizes are read from the weights' sizes).
template <class T, class Cfg>
tensor<T, 2> rwkv7_layer(const named_weights<T>& w, const Cfg& c, tensor_view<const T, 2> x,
                         tensor_view<T, 3> state, tensor_view<T, 1> shift,
                         tensor_view<T, 2> v_first) {
  const index_t D = c.hidden, TT = x.extent(0);
  const index_t hd = c.head_dim ? c.head_dim : D / c.heads, H = D / hd;
  const index_t Dv = c.value_dim ? c.value_dim : D, dv = Dv / H;
  const bool first = c.layer_idx == 0;
  auto at = [&](const char* n) -> const std::vector<T>& { return w.at(n); };
  auto rows_of = [&](const char* n, index_t in) { return static_cast<index_t>(at(n).size()) / in; };
  tensor<T, 2> y({TT, D});
  for (index_t t = 0; t < TT; ++t) {
    std::vector<T> xt(static_cast<std::size_t>(D)), prev(static_cast<std::size_t>(D));
    for (index_t i = 0; i < D; ++i) {
      xt[static_cast<std::size_t>(i)] = x(t, i);
      prev[static_cast<std::size_t>(i)] = shift(i);
      shift(i) = x(t, i);
    }
    // the six token-shift mixes x + (x_prev - x) · mu
    auto mixed = [&](const char* mu) {
      std::vector<T> out(static_cast<std::size_t>(D));
      for (std::size_t i = 0; i < out.size(); ++i) out[i] = xt[i] + (prev[i] - xt[i]) * at(mu)[i];
      return out;
    };
    const auto xr = mixed("x_r"), xw = mixed("x_w"), xk = mixed("x_k"), xv = mixed("x_v"),
               xa = mixed("x_a"), xg = mixed("x_g");
    const auto r = detail::matvec(at("r_proj.weight"), xr, D);
    auto k = detail::matvec(at("k_proj.weight"), xk, D);
    auto v = detail::matvec(at("v_proj.weight"), xv, Dv);
    // LoRAs: B act(A x) + b
    auto lora = [&](const std::string& name, const std::vector<T>& in, index_t out, int act,
                    bool bias) {
      const std::string a = name + ".lora.0.weight", b = name + ".lora.2.weight";
      auto low = detail::matvec(at(a.c_str()), in, rows_of(a.c_str(), D));
      for (auto& e : low) e = act == 1 ? std::tanh(e) : act == 2 ? detail::sigmoid(e) : e;
      const std::string bn = name + ".lora.2.bias";
      return detail::matvec(at(b.c_str()), low, out, bias ? &w.at(bn) : nullptr);
    };
    auto dw = lora("w_lora", xw, D, 1, true);
    auto a = lora("a_lora", xa, D, 0, true);
    const auto g = lora("g_lora", xg, Dv, 2, false);
    for (auto& e : dw) e = -std::exp(T(-0.5)) * detail::sigmoid(e);  // log decay
    for (auto& e : a) e = detail::sigmoid(e);
    if (first) {
      for (index_t j = 0; j < Dv; ++j) v_first(t, j) = v[static_cast<std::size_t>(j)];
    } else {
      const auto vl = lora("v_lora", xv, Dv, 0, true);
      for (index_t j = 0; j < Dv; ++j) {
        const T s = detail::sigmoid(vl[static_cast<std::size_t>(j)]);
        auto& vj = v[static_cast<std::size_t>(j)];
        vj = vj + s * (v_first(t, j) - vj);
      }
    }
    std::vector<T> kk(static_cast<std::size_t>(D));
    for (index_t h = 0; h < H; ++h) {
      T ss = 0;
      for (index_t i = h * hd; i < (h + 1) * hd; ++i) {
        kk[static_cast<std::size_t>(i)] =
            k[static_cast<std::size_t>(i)] * at("k_k")[std::size_t(i)];
        ss += kk[static_cast<std::size_t>(i)] * kk[static_cast<std::size_t>(i)];
      }
      const T den = c.fuse_norm ? std::sqrt(ss + T(1e-6)) : std::max(std::sqrt(ss), T(1e-12));
      for (index_t i = h * hd; i < (h + 1) * hd; ++i) kk[static_cast<std::size_t>(i)] /= den;
    }
    for (index_t i = 0; i < D; ++i) {
      const auto s = static_cast<std::size_t>(i);
      k[s] = k[s] * (T(1) + (a[s] - T(1)) * at("k_a")[s]);
    }
    std::vector<T> z(static_cast<std::size_t>(Dv));
    const T eps = T(hd) * T(c.norm_eps);
    for (index_t h = 0; h < H; ++h) {
      const auto K0 = static_cast<std::size_t>(h * hd), V0 = static_cast<std::size_t>(h * dv);
      // S ← Diag(e^w) S + (kk⊙a) (−kkᵀ S) + k vᵀ, then o = Sᵀ r
      std::vector<T> sa(static_cast<std::size_t>(dv), T(0));
      for (index_t j = 0; j < dv; ++j)
        for (index_t i = 0; i < hd; ++i)
          sa[std::size_t(j)] += -kk[K0 + std::size_t(i)] * state(h, i, j);
      std::vector<T> o(static_cast<std::size_t>(dv), T(0));
      for (index_t i = 0; i < hd; ++i)
        for (index_t j = 0; j < dv; ++j) {
          const std::size_t ki = K0 + std::size_t(i);
          state(h, i, j) = std::exp(dw[ki]) * state(h, i, j) + kk[ki] * a[ki] * sa[std::size_t(j)] +
                           k[ki] * v[V0 + std::size_t(j)];
        }
      for (index_t j = 0; j < dv; ++j)
        for (index_t i = 0; i < hd; ++i)
          o[std::size_t(j)] += state(h, i, j) * r[K0 + std::size_t(i)];
      // GroupNorm over the head, the r·k·r_k bonus, the gate
      T mean = 0, var = 0;
      for (T e : o) mean += e;
      mean /= T(dv);
      for (T e : o) var += (e - mean) * (e - mean);
      var /= T(dv);
      T bonus = 0;
      for (index_t i = 0; i < hd; ++i) {
        const std::size_t ki = K0 + std::size_t(i);
        bonus += r[ki] * k[ki] * at("r_k")[ki];
      }
      for (index_t j = 0; j < dv; ++j) {
        const std::size_t vj = V0 + std::size_t(j);
        T n = (o[std::size_t(j)] - mean) / std::sqrt(var + eps);
        if (c.elementwise_affine) n = n * at("g_norm.weight")[vj] + at("g_norm.bias")[vj];
        z[vj] = (n + bonus * v[vj]) * g[vj];
      }
    }
    const auto yt = detail::matvec(at("o_proj.weight"), z, D);
    for (index_t i = 0; i < D; ++i) y(t, i) = yt[static_cast<std::size_t>(i)];
  }
  return y;
}

}  // namespace seqmix::reference
