// SPDX-License-Identifier: MIT
// Rotary position embedding on the first R dims of each head (partial rotary), in place.
//
//   inv_freq_i = θ^(-2i/R),  angle = p · inv_freq_i,  i = 0 .. R/2-1,  p the token's position
//   rotate_half (GPT-NeoX, Hugging Face default): pairs (i, i + R/2)
//   interleaved (GPT-J, Meta's original):          pairs (2i, 2i + 1)
//   (a, b) -> (a cos - b sin, b cos + a sin); dims R .. head_dim-1 pass through.
//
// R = rotary_dim (even, <= head_dim); partial(head_dim, fraction) takes R = int(head_dim ·
// fraction) as transformers does (Qwen3-Next: 0.25 · 256 = 64). Positions: token t of batch row
// b is at start[b] + t, so a prefill from 0 and decode steps at L, L+1, ... continue the
// sequence; packed variable-length input takes one start per sequence. Numerics follow
// transformers: inv_freq and the angle rounded to float, cos/sin of that float angle.
//
// Cost: R/2 sin/cos pairs per token (shared by its heads) + 6 FLOP per rotated pair per head;
// allocates nothing. Checks: shapes, positions >= 0, unit inner stride.
#pragma once

#include <cmath>
#include <span>
#include <string>
#include <vector>

#include <seqmix/core/error.hpp>
#include <seqmix/core/tensor.hpp>

namespace seqmix::layers {

enum class rope_style { rotate_half, interleaved };

class rope {
 public:
  rope() = default;
  rope(index_t head_dim, index_t rotary_dim, double theta,
       rope_style style = rope_style::rotate_half)
      : hd_(head_dim), rot_(rotary_dim), theta_(theta), style_(style) {
    const checker check{"rope"};
    if (!(head_dim > 0)) check.fail("head_dim", "must be > 0, got " + std::to_string(head_dim));
    if (!(rotary_dim >= 0 && rotary_dim <= head_dim && rotary_dim % 2 == 0))
      check.fail("rotary_dim", "must be even and in 0.." + std::to_string(head_dim) + ", got " +
                                   std::to_string(rotary_dim));
    if (!(std::isfinite(theta) && theta > 0))
      check.fail("theta", "must be finite and > 0, got " + std::to_string(theta));
    inv_freq_.resize(static_cast<std::size_t>(rot_ / 2));
    for (index_t i = 0; i < rot_ / 2; ++i) {
      const float e = static_cast<float>(2 * i) / static_cast<float>(rot_);
      inv_freq_[static_cast<std::size_t>(i)] =
          static_cast<float>(1.0 / static_cast<double>(std::pow(static_cast<float>(theta), e)));
    }
  }
  /// R = int(head_dim · fraction) rounded down to even.
  static rope partial(index_t head_dim, double fraction, double theta,
                      rope_style style = rope_style::rotate_half) {
    const checker check{"rope::partial"};
    if (!(fraction >= 0 && fraction <= 1))
      check.fail("fraction", "must be in [0, 1], got " + std::to_string(fraction));
    const auto r = static_cast<index_t>(static_cast<double>(head_dim) * fraction);
    return rope(head_dim, r - r % 2, theta, style);
  }

  index_t head_dim() const noexcept { return hd_; }
  index_t rotary_dim() const noexcept { return rot_; }
  double theta() const noexcept { return theta_; }
  rope_style style() const noexcept { return style_; }

  /// cos and sin of rotary frequency i at position p (as applied).
  void cos_sin(index_t p, index_t i, float& c, float& s) const noexcept {
    const float angle = static_cast<float>(p) * inv_freq_[static_cast<std::size_t>(i)];
    c = static_cast<float>(std::cos(static_cast<double>(angle)));
    s = static_cast<float>(std::sin(static_cast<double>(angle)));
  }

  /// x [B, T, H, head_dim] in place; token t of row b at position start[b] + t ([B] starts).
  void apply(tensor_view<float, 4> x, std::span<const index_t> start) const {
    const checker check{"rope::apply"};
    check_x(check, x);
    if (!(x.extent(0) == static_cast<index_t>(start.size())))
      check.fail("start", "must hold B = " + std::to_string(x.extent(0)) + " positions, got " +
                              std::to_string(start.size()));
    check_starts(check, start);
    for (index_t b = 0; b < x.extent(0); ++b)
      for (index_t t = 0; t < x.extent(1); ++t)
        token(x.template select<0>(b).template select<0>(t),
              start[static_cast<std::size_t>(b)] + t);
  }
  /// Packed: x [1, T, H, head_dim], sequence n (tokens cu_seqlens[n] .. cu_seqlens[n+1]-1)
  /// starting at position start[n].
  void apply(tensor_view<float, 4> x, std::span<const index_t> start,
             std::span<const index_t> cu_seqlens) const {
    const checker check{"rope::apply"};
    check_x(check, x);
    const index_t N = check.cu_seqlens(cu_seqlens, x.extent(0), x.extent(1));
    if (!(N == static_cast<index_t>(start.size())))
      check.fail("start", "must hold N = " + std::to_string(N) +
                              " positions (one per sequence), got " + std::to_string(start.size()));
    check_starts(check, start);
    for (index_t n = 0; n < N; ++n) {
      const index_t t0 = cu_seqlens[static_cast<std::size_t>(n)];
      const index_t t1 = cu_seqlens[static_cast<std::size_t>(n) + 1];
      for (index_t t = t0; t < t1; ++t)
        token(x.template select<0>(0).template select<0>(t),
              start[static_cast<std::size_t>(n)] + t - t0);
    }
  }
  /// Decode: x1 [B, H, head_dim] at positions pos [B].
  void apply_step(tensor_view<float, 3> x1, std::span<const index_t> pos) const {
    const checker check{"rope::apply_step"};
    check.extents("x1", x1);
    check.shape("x1", x1, {any_extent, any_extent, hd_});
    check.inner_contiguous("x1", x1);
    if (!(x1.extent(0) == static_cast<index_t>(pos.size())))
      check.fail("pos", "must hold B = " + std::to_string(x1.extent(0)) + " positions, got " +
                            std::to_string(pos.size()));
    check_starts(check, pos);
    for (index_t b = 0; b < x1.extent(0); ++b)
      token(x1.template select<0>(b), pos[static_cast<std::size_t>(b)]);
  }

 private:
  void check_x(const checker& check, const tensor_view<float, 4>& x) const {
    check.extents("x", x);
    check.shape("x", x, {any_extent, any_extent, any_extent, hd_});
    check.inner_contiguous("x", x);
  }
  static void check_starts(const checker& check, std::span<const index_t> s) {
    for (std::size_t i = 0; i < s.size(); ++i) {
      if (s[i] < 0) {
        check.fail("start", "positions must be >= 0, got " + std::to_string(s[i]) + " at " +
                                std::to_string(i));
      }
    }
  }
  // x [H, head_dim] of one token at position p
  void token(tensor_view<float, 2> x, index_t p) const {
    const index_t half = rot_ / 2;
    for (index_t i = 0; i < half; ++i) {
      float c, s;
      cos_sin(p, i, c, s);
      const index_t i0 = style_ == rope_style::rotate_half ? i : 2 * i;
      const index_t i1 = style_ == rope_style::rotate_half ? i + half : 2 * i + 1;
      for (index_t h = 0; h < x.extent(0); ++h) {
        float* r = x.ptr({h, 0});
        const float a = r[i0], b = r[i1];
        r[i0] = a * c + (-b) * s;
        r[i1] = b * c + a * s;
      }
    }
  }

  index_t hd_ = 0, rot_ = 0;
  double theta_ = 10000.0;
  rope_style style_ = rope_style::rotate_half;
  std::vector<float> inv_freq_;
};

}  // namespace seqmix::layers
