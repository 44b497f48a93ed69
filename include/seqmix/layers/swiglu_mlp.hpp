// SPDX-License-Identifier: MIT
// SwiGLU MLP (Llama / Qwen / Mixtral experts): y = down( silu(gate·x) ⊙ up·x ).
//
// Weights as stored: gate_proj, up_proj [I, D], down_proj [D, I] (f32 or bf16). gate and up are
// concatenated at load time into one [2I, D] GEMM. x [M, D] -> y [M, D]; 6·M·D·I FLOP.
// Scratch [M, 3I] floats, grow-only (forward allocates nothing once it has seen the largest M;
// the object is therefore not shareable between threads calling forward at once).
#pragma once

#include <string>

#include <seqmix/core/error.hpp>
#include <seqmix/core/matmul.hpp>
#include <seqmix/core/simd.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/layers/weights.hpp>

namespace seqmix::layers {

class swiglu_mlp {
 public:
  swiglu_mlp() = default;
  /// gate_up [2I, D] = [gate; up]; down [D, I].
  swiglu_mlp(weight_matrix gate_up, weight_matrix down)
      : gate_up_(std::move(gate_up)), down_(std::move(down)) {
    const checker check{"swiglu_mlp"};
    I_ = down_.cols();
    D_ = down_.rows();
    if (!(gate_up_.rows() == 2 * I_ && gate_up_.cols() == D_))
      check.fail("gate_up", "expected shape [" + std::to_string(2 * I_) + ", " +
                                std::to_string(D_) + "], got [" + std::to_string(gate_up_.rows()) +
                                ", " + std::to_string(gate_up_.cols()) + "]");
  }
  /// `gate_proj.weight`, `up_proj.weight` [I, D] and `down_proj.weight` [D, I] under scope.
  static swiglu_mlp load(std::string_view who, const checkpoint_scope& scope, index_t hidden,
                         index_t intermediate) {
    // in order (function arguments would be evaluated in any order): the first bad tensor is
    // the one reported
    weight_matrix gate_up = weight_matrix::load(who, scope, {"gate_proj.weight", "up_proj.weight"},
                                                {intermediate, intermediate}, hidden);
    weight_matrix down =
        weight_matrix::load(who, scope, {"down_proj.weight"}, {hidden}, intermediate);
    return swiglu_mlp(std::move(gate_up), std::move(down));
  }
  index_t hidden() const noexcept { return D_; }
  index_t intermediate() const noexcept { return I_; }

  /// y [M, D] = down(silu(gate x) ⊙ up x); `accumulate` adds into y (a residual).
  void forward(tensor_view<const float, 2> x, tensor_view<float, 2> y, bool accumulate = false) {
    const checker check{"swiglu_mlp::forward"};
    check.shape("x", x, {any_extent, D_});
    const index_t M = x.extent(0);
    check.shape("y", y, {M, D_});
    auto h = scratch_.view<2>(0, {M, 2 * I_});
    auto a = scratch_.view<2>(1, {M, I_});
    gate_up_.apply(x, h);
    for (index_t m = 0; m < M; ++m) {
      const float* g = h.ptr({m, 0});
      const float* u = g + I_;
      float* o = a.ptr({m, 0});
      simd::silu(g, o, I_);
      for (index_t i = 0; i < I_; ++i) o[i] *= u[i];
    }
    linalg::matmul_options opt;
    opt.accumulate = accumulate;
    down_.apply(a, y, opt);
  }

 private:
  weight_matrix gate_up_, down_;
  index_t D_ = 0, I_ = 0;
  scratch scratch_;
};

}  // namespace seqmix::layers
