// SPDX-License-Identifier: MIT
// L2 normalisation of rows (the q / k normalisation of delta-rule layers).
//
//   l2_eps::rsqrt_sum:  y = x · rsqrt(Σx² + ε)     (Qwen3-Next's l2norm, fla's l2norm_fwd)
//   l2_eps::div_sqrt:   y = x / sqrt(Σx² + ε)      (Kimi-Linear, the delta mixers' use_qk_l2norm)
//
// Equal in exact arithmetic, they round differently in float (one multiply by a rounded
// reciprocal vs a division per element); ε = 1e-6 in both models. Rows [M, W], normalised in
// groups of G (G divides W; per head: G = head_dim). Cost: 3 FLOP per element, allocates
// nothing; y may be x itself (in place), otherwise disjoint.
#pragma once

#include <cmath>
#include <string>

#include <seqmix/core/error.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/layers/rms_norm.hpp>

namespace seqmix::layers {

enum class l2_eps { rsqrt_sum, div_sqrt };

/// x [M, W] -> y [M, W], each group of `group` elements to unit L2 norm (ε as `convention`).
inline void l2norm(tensor_view<const float, 2> x, tensor_view<float, 2> y, index_t group,
                   float eps = 1e-6f, l2_eps convention = l2_eps::rsqrt_sum) {
  const checker check{"l2norm"};
  check.extents("x", x);
  const index_t M = x.extent(0), W = x.extent(1);
  check.shape("y", y, {M, W});
  if (!(group > 0 && W % group == 0))
    check.fail("group", "must be > 0 and divide the width " + std::to_string(W) + ", got " +
                            std::to_string(group));
  if (!(std::isfinite(eps) && eps >= 0))
    check.fail("eps", "must be finite and >= 0, got " + std::to_string(eps));
  check.inner_contiguous("x", x);
  check.inner_contiguous("y", y);
  if (!detail::same_view(x, y)) check.no_overlap({range_of("y", y)}, {range_of("x", x)});
  for (index_t m = 0; m < M; ++m) {
    const float* xr = x.ptr({m, 0});
    float* yr = y.ptr({m, 0});
    for (index_t g0 = 0; g0 < W; g0 += group) {
      float ss = 0.0f;
      for (index_t i = 0; i < group; ++i) ss += xr[g0 + i] * xr[g0 + i];
      if (convention == l2_eps::rsqrt_sum) {
        const float r = 1.0f / std::sqrt(ss + eps);
        for (index_t i = 0; i < group; ++i) yr[g0 + i] = xr[g0 + i] * r;
      } else {
        const float d = std::sqrt(ss + eps);
        for (index_t i = 0; i < group; ++i) yr[g0 + i] = xr[g0 + i] / d;
      }
    }
  }
}

}  // namespace seqmix::layers
