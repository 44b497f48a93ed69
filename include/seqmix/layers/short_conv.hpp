// SPDX-License-Identifier: MIT
// Depthwise causal short convolution: the conv1d of Mamba2, Gated DeltaNet and KDA layers.
//
//   y[t, c] = act( bias[c] + Σ_{j=0}^{K-1} w[c, j] · x[t - (K-1) + j, c] ),   act ∈ {none, SiLU}
//
// with x at positions < 0 taken from the conv state (zeros for a fresh sequence). Kernel K in
// 2..8, C channels, weights as Hugging Face stores them ([C, 1, K], tap K-1 on the newest
// input), optional bias [C].
//
// State: [B, K-1, C], the last K-1 inputs of each sequence, oldest first, channels innermost (a
// step then reads K-1 contiguous rows). transformers' conv_state is [B, C, K] with the last K
// inputs; its oldest column is never read again, so seqmix keeps only K-1: ours is
// transformers' state[:, :, 1:] transposed.
//
// Forms: forward (prefill) over [B, T, C] continuing from the state and leaving the last K-1
// inputs in it; packed variable-length forward over [1, T, C] with cu_seqlens and a state row per
// sequence (nothing crosses a boundary); step over one token per sequence [B, C]. Inputs and
// outputs may be strided views with unit channel stride (e.g. a column block of a fused
// projection). Cost: 2·K·C FLOP per token (+ the activation), memory-bound; step allocates
// nothing, forward one small vector of block offsets (N + 1 indices) per call.
//
// Checks: shapes with the numbers, unit channel stride, x / y / state pairwise disjoint
// (seqmix::shape_error naming the function and the argument).
#pragma once

#include <algorithm>
#include <span>
#include <string>
#include <vector>

#include <seqmix/core/error.hpp>
#include <seqmix/core/parallel.hpp>
#include <seqmix/core/simd.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/layers/weights.hpp>

namespace seqmix::layers {

enum class conv_activation { none, silu };

class short_conv {
 public:
  short_conv() = default;
  /// weight [C, K] (w[c, j]: tap j, j = K-1 multiplies the newest input); bias [C] or empty.
  short_conv(tensor_view<const float, 2> weight, tensor_view<const float, 1> bias,
             conv_activation act)
      : act_(act) {
    const checker check{"short_conv"};
    check.nonempty("weight", weight);
    C_ = weight.extent(0);
    K_ = weight.extent(1);
    if (!(K_ >= 2 && K_ <= 8))
      check.fail("weight", "kernel (weight.extent(1)) must be in 2..8, got " + std::to_string(K_));
    if (bias.data()) check.shape("bias", bias, {C_});
    check.finite("weight", weight);
    w_ = tensor<float, 2>({K_, C_});
    for (index_t c = 0; c < C_; ++c)
      for (index_t j = 0; j < K_; ++j) w_(j, c) = weight(c, j);
    if (bias.data()) {
      check.finite("bias", bias);
      bias_ = tensor<float, 1>({C_});
      for (index_t c = 0; c < C_; ++c) bias_(c) = bias(c);
    }
  }

  /// Loads `<name>.weight` [C, 1, K] (and `<name>.bias` [C] when `with_bias`) under `scope`.
  static short_conv load(std::string_view who, const checkpoint_scope& scope,
                         const std::string& name, index_t channels, index_t kernel, bool with_bias,
                         conv_activation act) {
    const auto w = load_vector(who, scope, name + ".weight", {channels, 1, kernel});
    tensor<float, 2> wt({channels, kernel});
    std::copy(w.begin(), w.end(), wt.data());
    tensor<float, 1> b;
    if (with_bias) {
      const auto bv = load_vector(who, scope, name + ".bias", {channels});
      b = tensor<float, 1>({channels});
      std::copy(bv.begin(), bv.end(), b.data());
    }
    return short_conv(
        wt.view(),
        with_bias ? tensor_view<const float, 1>(b.view()) : tensor_view<const float, 1>{}, act);
  }

  index_t channels() const noexcept { return C_; }
  index_t kernel() const noexcept { return K_; }
  bool has_bias() const noexcept { return bias_.size() != 0; }
  conv_activation activation() const noexcept { return act_; }

  /// A zero state [B, K-1, C].
  tensor<float, 3> make_state(index_t B) const {
    const checker check{"short_conv::make_state"};
    if (!(B >= 1)) check.fail("B", "must be >= 1, got " + std::to_string(B));
    return tensor<float, 3>({B, K_ - 1, C_});
  }

  /// Prefill: x [B, T, C] -> y [B, T, C], state [B, K-1, C] in/out.
  void forward(tensor_view<const float, 3> x, tensor_view<float, 3> y,
               tensor_view<float, 3> state) const {
    const checker check{"short_conv::forward"};
    check_io(check, x, y);
    const index_t B = x.extent(0);
    check.shape("state", state, {B, K_ - 1, C_});
    check_state(check, x, y, state);
    run(x, y, state, {}, B);
  }
  /// Packed variable-length prefill: x, y [1, T, C]; sequence n is tokens cu_seqlens[n] ..
  /// cu_seqlens[n+1]-1 with state row n of state [N, K-1, C].
  void forward(tensor_view<const float, 3> x, tensor_view<float, 3> y, tensor_view<float, 3> state,
               std::span<const index_t> cu_seqlens) const {
    const checker check{"short_conv::forward"};
    check_io(check, x, y);
    const index_t N = check.cu_seqlens(cu_seqlens, x.extent(0), x.extent(1));
    check.shape("state", state, {N, K_ - 1, C_});
    check_state(check, x, y, state);
    run(x, y, state, cu_seqlens, N);
  }
  /// Decode: x1 [B, C] -> y1 [B, C], state [B, K-1, C] in/out. Allocates nothing.
  void step(tensor_view<const float, 2> x1, tensor_view<float, 2> y1,
            tensor_view<float, 3> state) const {
    const checker check{"short_conv::step"};
    check.nonempty("x1", x1);
    const index_t B = x1.extent(0);
    check.shape("x1", x1, {B, C_});
    check.shape("y1", y1, {B, C_});
    check.shape("state", state, {B, K_ - 1, C_});
    check.inner_contiguous("x1", x1);
    check.inner_contiguous("y1", y1);
    check_state_inner(check, state);
    check.no_overlap({range_of("y1", y1), range_of("state", state)}, {range_of("x1", x1)});
    for (index_t b = 0; b < B; ++b) {
      const float* xb = x1.ptr({b, 0});
      float* yb = y1.ptr({b, 0});
      auto src = [&](index_t j) -> const float* {  // tap j: state rows 0..K-2, then x
        return j == K_ - 1 ? xb : state.ptr({b, j, 0});
      };
      token(src, yb);
      // shift the window: rows 1..K-2 up, x into the last row
      for (index_t j = 0; j + 1 < K_ - 1; ++j)
        std::copy_n(state.ptr({b, j + 1, 0}), C_, state.ptr({b, j, 0}));
      std::copy_n(xb, C_, state.ptr({b, K_ - 2, 0}));
    }
  }

 private:
  void check_io(const checker& check, const tensor_view<const float, 3>& x,
                const tensor_view<float, 3>& y) const {
    check.nonempty("x", x);
    check.shape("x", x, {any_extent, any_extent, C_});
    check.shape("y", y, {x.extent(0), x.extent(1), C_});
    check.inner_contiguous("x", x);
    check.inner_contiguous("y", y);
  }
  void check_state_inner(const checker& check, const tensor_view<float, 3>& state) const {
    check.inner_contiguous("state", state);
  }
  void check_state(const checker& check, const tensor_view<const float, 3>& x,
                   const tensor_view<float, 3>& y, const tensor_view<float, 3>& state) const {
    check_state_inner(check, state);
    check.no_overlap({range_of("y", y), range_of("state", state)}, {range_of("x", x)});
  }

  // One output row from K tap rows src(0..K-1).
  template <class Src>
  void token(const Src& src, float* out) const {
    if (bias_.size()) {
      std::copy_n(bias_.data(), C_, out);
    } else {
      std::fill_n(out, C_, 0.0f);
    }
    for (index_t j = 0; j < K_; ++j) {
      const float* s = src(j);
      const float* w = w_.data() + j * C_;
      for (index_t c = 0; c < C_; ++c) out[c] += w[c] * s[c];
    }
    if (act_ == conv_activation::silu) simd::silu(out, out, C_);
  }

  // Sequences n = 0..N-1: batch row n (cu empty) or tokens cu[n]..cu[n+1] of row 0.
  void run(const tensor_view<const float, 3>& x, const tensor_view<float, 3>& y,
           const tensor_view<float, 3>& state, std::span<const index_t> cu, index_t N) const {
    const index_t T = x.extent(1);
    auto seq = [&](index_t n, index_t& b, index_t& t0, index_t& len) {
      b = cu.empty() ? n : 0;
      t0 = cu.empty() ? 0 : cu[static_cast<std::size_t>(n)];
      len = cu.empty() ? T : cu[static_cast<std::size_t>(n) + 1] - t0;
    };
    // outputs: every token independent (reads the old state), in parallel over sequences and
    // token blocks
    constexpr index_t block = 16;
    std::vector<index_t> starts;  // prefill only: per-call bookkeeping of the block grid
    starts.reserve(static_cast<std::size_t>(N) + 1);
    index_t total = 0;
    for (index_t n = 0; n < N; ++n) {
      index_t b = 0, t0 = 0, len = 0;
      seq(n, b, t0, len);
      starts.push_back(total);
      total += (len + block - 1) / block;
    }
    starts.push_back(total);
    parallel_for(total, [&](index_t i) {
      const auto it = std::upper_bound(starts.begin(), starts.end(), i) - 1;
      const index_t n = it - starts.begin();
      index_t b = 0, t0 = 0, len = 0;
      seq(n, b, t0, len);
      const index_t tb = (i - *it) * block, te = std::min(len, tb + block);
      for (index_t t = tb; t < te; ++t) {
        auto src = [&](index_t j) -> const float* {
          const index_t p = t - (K_ - 1) + j;  // position within the sequence
          return p >= 0 ? x.ptr({b, t0 + p, 0}) : state.ptr({n, K_ - 1 + p, 0});
        };
        token(src, y.ptr({b, t0 + t, 0}));
      }
    });
    // state: the last K-1 inputs of (old state ‖ x)
    for (index_t n = 0; n < N; ++n) {
      index_t b = 0, t0 = 0, len = 0;
      seq(n, b, t0, len);
      if (len == 0) continue;
      const index_t keep = std::max<index_t>(0, K_ - 1 - len);  // old rows still in the window
      for (index_t r = 0; r < keep; ++r)
        std::copy_n(state.ptr({n, r + len, 0}), C_, state.ptr({n, r, 0}));
      for (index_t r = keep; r < K_ - 1; ++r) {
        const index_t p = len - (K_ - 1) + r;
        std::copy_n(x.ptr({b, t0 + p, 0}), C_, state.ptr({n, r, 0}));
      }
    }
  }

  index_t C_ = 0, K_ = 0;
  tensor<float, 2> w_;     // [K, C]
  tensor<float, 1> bias_;  // [C] or empty
  conv_activation act_ = conv_activation::none;
};

}  // namespace seqmix::layers
