// SPDX-License-Identifier: MIT
// RMSNorm and gated RMSNorm over groups of a row.
//
//   rms_norm:        y = x · rsqrt(mean_group(x²) + ε) · w'            w' = w or 1 + w
//   gated_rms_norm:  gate before  y = rmsnorm(x · silu(z)) · w          (Mamba2 / Granite)
//                    gate after   y = rmsnorm(x) · w · silu(z)          (Qwen3-Next)
//                    sigmoid      y = rmsnorm(x) · w · sigmoid(z)       (Kimi-Linear)
//
// Rows are [M, W]; each row is normalised in groups of G consecutive elements (G divides W):
// G = W is the full width, G = head_dim per head (q_norm / k_norm, Qwen3-Next's per-head output
// norm), G = W / n_groups per group (mamba_ssm's grouped norm). The weight is [W] (one per
// element) or [G] (shared by every group, as Qwen3-Next's head norms). w' = 1 + w is
// Qwen3-Next's zero-centred weight (Qwen3NextRMSNorm); every other model multiplies by w.
// The mean square is accumulated in float in element order (as torch's float32 mean).
//
// Cost: ~4 FLOP per element (+ the gate's exp), one pass to reduce and one to scale; allocates
// nothing. x and y may be the same view (in place); otherwise they, and z, must be disjoint.
#pragma once

#include <cmath>
#include <string>

#include <seqmix/core/error.hpp>
#include <seqmix/core/simd.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/layers/weights.hpp>

namespace seqmix::layers {

enum class norm_weight { plain, one_plus };  ///< w or 1 + w
enum class norm_gate { silu_before, silu_after, sigmoid_after };

namespace detail {
template <class View>
bool same_view(const View& a, const tensor_view<float, 2>& b) {
  return static_cast<const void*>(a.data()) == static_cast<const void*>(b.data()) &&
         a.shape() == b.shape() && a.strides() == b.strides();
}
}  // namespace detail

class rms_norm {
 public:
  rms_norm() = default;
  /// weight [W] or [G] (G = group); eps >= 0; group > 0 (0: the weight's size).
  rms_norm(tensor<float, 1> weight, float eps, norm_weight mode, index_t group = 0)
      : eps_(eps), mode_(mode) {
    const checker check{"rms_norm"};
    check.nonempty("weight", weight.view());
    check.finite("weight", weight.view());
    if (!(std::isfinite(eps) && eps >= 0))
      check.fail("eps", "must be finite and >= 0, got " + std::to_string(eps));
    group_ = group ? group : weight.extent(0);
    if (!(group_ > 0)) check.fail("group", "must be > 0, got " + std::to_string(group_));
    w_ = std::move(weight);
    if (mode_ == norm_weight::one_plus)
      for (index_t i = 0; i < w_.extent(0); ++i) w_(i) += 1.0f;  // stored as the factor w'
  }
  /// Loads `name` ([size]) under scope.
  static rms_norm load(std::string_view who, const checkpoint_scope& scope, const std::string& name,
                       index_t size, float eps, norm_weight mode, index_t group = 0) {
    const auto v = load_vector(who, scope, name, {size});
    tensor<float, 1> w({size});
    std::copy(v.begin(), v.end(), w.data());
    return rms_norm(std::move(w), eps, mode, group);
  }

  index_t group() const noexcept { return group_; }
  index_t weight_size() const noexcept { return w_.extent(0); }
  float eps() const noexcept { return eps_; }
  /// The factor multiplied after the normalisation (w or 1 + w).
  const tensor<float, 1>& factor() const noexcept { return w_; }

  /// x [M, W] -> y [M, W]; W a multiple of the group and the weight [W] or [G].
  void forward(tensor_view<const float, 2> x, tensor_view<float, 2> y) const {
    const checker check{"rms_norm::forward"};
    check_rows(check, x, y, static_cast<const tensor_view<const float, 2>*>(nullptr));
    run(x, y, tensor_view<const float, 2>{}, norm_gate::silu_after);
  }

 protected:
  template <class Z>
  void check_rows(const checker& check, const tensor_view<const float, 2>& x,
                  const tensor_view<float, 2>& y, const Z* z) const {
    check.extents("x", x);
    const index_t M = x.extent(0), W = x.extent(1);
    check.shape("y", y, {M, W});
    if (z) check.shape("z", *z, {M, W});
    if (!(W % group_ == 0))
      check.fail("x", "width " + std::to_string(W) + " must be a multiple of the group " +
                          std::to_string(group_));
    const index_t ws = w_.extent(0);
    if (!(ws == W || ws == group_))
      check.fail("x", "width " + std::to_string(W) + " must equal the weight's size " +
                          std::to_string(ws) + " (or the weight be one group of " +
                          std::to_string(group_) + ")");
    check.inner_contiguous("x", x);
    check.inner_contiguous("y", y);
    if (z) check.inner_contiguous("z", *z);
    if (!detail::same_view(x, y)) {
      check.no_overlap({range_of("y", y)}, {range_of("x", x)});
    }
    if (z) check.no_overlap({range_of("y", y)}, {range_of("z", *z)});
  }

  // z empty: plain norm.
  void run(const tensor_view<const float, 2>& x, const tensor_view<float, 2>& y,
           const tensor_view<const float, 2>& z, norm_gate gate) const {
    const index_t M = x.extent(0), W = x.extent(1), G = group_;
    const bool gated = z.data() != nullptr;
    const bool shared = w_.extent(0) != W;
    for (index_t m = 0; m < M; ++m) {
      const float* xr = x.ptr({m, 0});
      const float* zr = gated ? z.ptr({m, 0}) : nullptr;
      float* yr = y.ptr({m, 0});
      for (index_t g0 = 0; g0 < W; g0 += G) {
        const float* wr = w_.data() + (shared ? 0 : g0);
        float ss = 0.0f;
        if (gated && gate == norm_gate::silu_before) {
          for (index_t i = 0; i < G; ++i) {
            const float v = xr[g0 + i] * math::silu(zr[g0 + i]);
            yr[g0 + i] = v;
            ss += v * v;
          }
        } else {
          for (index_t i = 0; i < G; ++i) ss += xr[g0 + i] * xr[g0 + i];
        }
        const float r = 1.0f / std::sqrt(ss / static_cast<float>(G) + eps_);
        const float* src = gated && gate == norm_gate::silu_before ? yr : xr;
        if (!gated || gate == norm_gate::silu_before) {
          for (index_t i = 0; i < G; ++i) yr[g0 + i] = wr[i] * (src[g0 + i] * r);
        } else if (gate == norm_gate::silu_after) {
          for (index_t i = 0; i < G; ++i)
            yr[g0 + i] = wr[i] * (src[g0 + i] * r) * math::silu(zr[g0 + i]);
        } else {
          for (index_t i = 0; i < G; ++i)
            yr[g0 + i] = wr[i] * (src[g0 + i] * r) * math::sigmoid(zr[g0 + i]);
        }
      }
    }
  }

  tensor<float, 1> w_;
  float eps_ = 1e-6f;
  norm_weight mode_ = norm_weight::plain;
  index_t group_ = 0;
};

/// RMSNorm with a gate z of the same shape as x (see the header comment for the three kinds).
class gated_rms_norm : public rms_norm {
 public:
  gated_rms_norm() = default;
  gated_rms_norm(tensor<float, 1> weight, float eps, norm_gate gate, index_t group = 0,
                 norm_weight mode = norm_weight::plain)
      : rms_norm(std::move(weight), eps, mode, group), gate_(gate) {}
  static gated_rms_norm load(std::string_view who, const checkpoint_scope& scope,
                             const std::string& name, index_t size, float eps, norm_gate gate,
                             index_t group = 0, norm_weight mode = norm_weight::plain) {
    const auto v = load_vector(who, scope, name, {size});
    tensor<float, 1> w({size});
    std::copy(v.begin(), v.end(), w.data());
    return gated_rms_norm(std::move(w), eps, gate, group, mode);
  }
  norm_gate gate() const noexcept { return gate_; }

  /// x, z [M, W] -> y [M, W] (y may be x itself).
  void forward(tensor_view<const float, 2> x, tensor_view<const float, 2> z,
               tensor_view<float, 2> y) const {
    const checker check{"gated_rms_norm::forward"};
    check_rows(check, x, y, &z);
    run(x, y, z, gate_);
  }

 private:
  norm_gate gate_ = norm_gate::silu_after;
};

}  // namespace seqmix::layers
