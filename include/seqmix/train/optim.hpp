// SPDX-License-Identifier: MIT
// AdamW (Loshchilov & Hutter, decoupled weight decay) with bias correction, as torch.optim.AdamW:
//
//   step t = 1, 2, ...:  p ← p (1 - lr·λ)                  (decay, only for params with decay on)
//                        m ← β1 m + (1 - β1) g,  v ← β2 v + (1 - β2) g²
//                        p ← p - lr · (m / (1 - β1^t)) / (sqrt(v / (1 - β2^t)) + ε)
//
// plus global-norm gradient clipping (clip_grad_norm: g ← g · min(1, c / ‖g‖₂), ‖g‖ over every
// registered parameter, summed in double in registration order). Parameters are registered as
// spans of value and gradient (any contiguous storage that outlives the optimizer); the
// optimizer owns m and v (2 values per parameter). Cost per step: ~12 FLOP + 1 sqrt per value,
// memory-bound (4 reads, 3 writes per value); parallel over values, deterministic.
//
// Checks: value and gradient spans of equal length (seqmix::shape_error naming
// train::adamw::add and the argument), options finite with lr >= 0, 0 <= β < 1, ε > 0.
#pragma once

#include <algorithm>
#include <cmath>
#include <span>
#include <string>
#include <vector>

#include <seqmix/core/error.hpp>
#include <seqmix/core/parallel.hpp>

namespace seqmix::train {

/// Hyperparameters of adamw (torch's defaults but weight_decay).
struct adamw_options {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;  ///< λ, applied to parameters registered with decay = true
};

/// AdamW over registered (value, gradient) spans.
template <class T>
class adamw {
 public:
  explicit adamw(const adamw_options& opt = {}) : opt_(opt) {
    const checker check{"train::adamw"};
    if (!(opt.lr >= 0) || !std::isfinite(opt.lr)) check.fail("opt.lr", "must be finite and >= 0");
    if (!(opt.beta1 >= 0 && opt.beta1 < 1)) check.fail("opt.beta1", "must be in [0, 1)");
    if (!(opt.beta2 >= 0 && opt.beta2 < 1)) check.fail("opt.beta2", "must be in [0, 1)");
    if (!(opt.eps > 0) || !std::isfinite(opt.eps)) check.fail("opt.eps", "must be finite and > 0");
    if (!std::isfinite(opt.weight_decay)) check.fail("opt.weight_decay", "must be finite");
  }

  /// Registers a parameter: value (updated in place by step) and its gradient (read by step,
  /// zeroed by zero_grad, scaled by clip_grad_norm), same length. decay: apply weight decay.
  void add(std::span<T> value, std::span<T> grad, bool decay = true) {
    const checker check{"train::adamw::add"};
    if (value.size() != grad.size()) {
      check.fail("grad", "expected " + std::to_string(value.size()) +
                             " values (the length of value), got " + std::to_string(grad.size()));
    }
    params_.push_back(
        {value, grad, std::vector<T>(value.size()), std::vector<T>(value.size()), decay});
  }

  /// Sets every registered gradient to zero.
  void zero_grad() {
    for (auto& p : params_) std::fill(p.grad.begin(), p.grad.end(), T(0));
  }

  /// ‖g‖₂ over every registered gradient; when max_norm > 0 and the norm exceeds it, scales
  /// every gradient by max_norm / norm. Returns the norm before clipping.
  double clip_grad_norm(double max_norm) {
    double ss = 0;
    for (auto& p : params_) {
      for (T g : p.grad) ss += static_cast<double>(g) * static_cast<double>(g);
    }
    const double norm = std::sqrt(ss);
    if (max_norm > 0 && norm > max_norm) {
      const T s = static_cast<T>(max_norm / norm);
      for (auto& p : params_)
        for (T& g : p.grad) g *= s;
    }
    return norm;
  }

  /// One AdamW step with learning rate lr (the options' lr when negative). Increments t.
  void step(double lr = -1) {
    if (lr < 0) lr = opt_.lr;
    ++t_;
    const double bc1 = 1 - std::pow(opt_.beta1, static_cast<double>(t_));
    const double bc2 = 1 - std::pow(opt_.beta2, static_cast<double>(t_));
    const T b1 = static_cast<T>(opt_.beta1), b2 = static_cast<T>(opt_.beta2);
    const T step_size = static_cast<T>(lr / bc1);
    const T inv_sqrt_bc2 = static_cast<T>(1 / std::sqrt(bc2));
    const T eps = static_cast<T>(opt_.eps);
    for (auto& p : params_) {
      const T decay = p.decay ? static_cast<T>(1 - lr * opt_.weight_decay) : T(1);
      const index_t n = static_cast<index_t>(p.value.size());
      constexpr index_t blk = 4096;
      parallel_for((n + blk - 1) / blk, [&](index_t bi) {
        const index_t i1 = std::min(n, (bi + 1) * blk);
        for (index_t i = bi * blk; i < i1; ++i) {
          const auto u = static_cast<std::size_t>(i);
          const T g = p.grad[u];
          T& m = p.m[u];
          T& v = p.v[u];
          m = b1 * m + (T(1) - b1) * g;
          v = b2 * v + (T(1) - b2) * g * g;
          p.value[u] = p.value[u] * decay - step_size * m / (std::sqrt(v) * inv_sqrt_bc2 + eps);
        }
      });
    }
  }

  /// Steps taken.
  long long steps() const { return t_; }
  const adamw_options& options() const { return opt_; }
  /// Registered values in all.
  std::size_t size() const {
    std::size_t n = 0;
    for (const auto& p : params_) n += p.value.size();
    return n;
  }

 private:
  struct param {
    std::span<T> value, grad;
    std::vector<T> m, v;
    bool decay;
  };
  adamw_options opt_;
  std::vector<param> params_;
  long long t_ = 0;
};

}  // namespace seqmix::train
