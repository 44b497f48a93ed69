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
//
// Shapes as in the layers' headers; every function returns a new tensor. Cost: the obvious
// O(size · work per element); no checks beyond what the tests need (they build the inputs).
#pragma once

#include <cmath>
#include <span>
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

}  // namespace seqmix::reference
