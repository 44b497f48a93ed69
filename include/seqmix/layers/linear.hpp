// SPDX-License-Identifier: MIT
// linear: y = act(x · Wᵀ + b), nn.Linear with W [out, in] as stored (f32 or bf16), on
// seqmix::linalg::matmul (core/matmul.hpp: threaded, deterministic, bf16 widened exactly).
//
// x [M, in] or [B, T, in] -> y [M, out] / [B, T, out]; any strides with unit inner stride.
// Cost: 2·M·in·out FLOP; a decode step (M <= 8) streams the weights once (in·out·2 or 4 bytes).
// Checks: shapes (seqmix::shape_error naming linear::forward and the argument); loading: the
// tensor's name, shape and dtype (seqmix::io_error, layers/weights.hpp).
#pragma once

#include <string>

#include <seqmix/core/error.hpp>
#include <seqmix/core/matmul.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/layers/weights.hpp>

namespace seqmix::layers {

class linear {
 public:
  linear() = default;
  explicit linear(weight_matrix w, tensor<float, 1> bias = {},
                  linalg::activation act = linalg::activation::none)
      : w_(std::move(w)), bias_(std::move(bias)), act_(act) {
    if (bias_.size() != 0 && bias_.extent(0) != w_.rows()) {
      throw shape_error("seqmix::linear: argument 'bias': expected shape [" +
                        std::to_string(w_.rows()) + "], got [" + std::to_string(bias_.extent(0)) +
                        "]");
    }
  }
  /// Loads `<name>.weight` [out, in] (and `<name>.bias` [out] when with_bias).
  static linear load(std::string_view who, const checkpoint_scope& scope, const std::string& name,
                     index_t out, index_t in, bool with_bias = false,
                     linalg::activation act = linalg::activation::none) {
    weight_matrix w = weight_matrix::load(who, scope, {name + ".weight"}, {out}, in);
    tensor<float, 1> b;
    if (with_bias) {
      const auto v = load_vector(who, scope, name + ".bias", {out});
      b = tensor<float, 1>({out});
      std::copy(v.begin(), v.end(), b.data());
    }
    return linear(std::move(w), std::move(b), act);
  }

  index_t in_features() const noexcept { return w_.cols(); }
  index_t out_features() const noexcept { return w_.rows(); }
  const weight_matrix& weight() const noexcept { return w_; }
  const tensor<float, 1>& bias() const noexcept { return bias_; }

  /// y [M, out] = act(x [M, in] · Wᵀ + b); `accumulate` adds into y.
  void forward(tensor_view<const float, 2> x, tensor_view<float, 2> y,
               bool accumulate = false) const {
    const checker check{"linear::forward"};
    check.shape("x", x, {any_extent, w_.cols()});
    check.shape("y", y, {x.extent(0), w_.rows()});
    linalg::matmul_options opt;
    if (bias_.size()) opt.bias = bias_.view();
    opt.act = act_;
    opt.accumulate = accumulate;
    w_.apply(x, y, opt);
  }
  /// [B, T, in] -> [B, T, out].
  void forward(tensor_view<const float, 3> x, tensor_view<float, 3> y) const {
    const checker check{"linear::forward"};
    check.shape("x", x, {any_extent, any_extent, w_.cols()});
    check.shape("y", y, {x.extent(0), x.extent(1), w_.rows()});
    tensor_view<const float, 2> x2;
    tensor_view<float, 2> y2;
    if (fuse_rows(x, x2) && fuse_rows(y, y2)) return forward(x2, y2);
    for (index_t b = 0; b < x.extent(0); ++b)
      forward(x.template select<0>(b), y.template select<0>(b));
  }

 private:
  weight_matrix w_;
  tensor<float, 1> bias_;
  linalg::activation act_ = linalg::activation::none;
};

}  // namespace seqmix::layers
