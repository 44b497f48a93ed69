// SPDX-License-Identifier: MIT
// DeltaNet (Schlag et al. 2021; Yang et al. 2024, parallelised), docs/math.md §2.
//
//     u_t = beta_t (v_t - S_{t-1}ᵀ k_t)        (beta_t per value head, usually sigmoid(·))
//     S_t = S_{t-1} + k_t u_tᵀ
//     o_t = S_tᵀ (s q_t)                       (s = K^-1/2 unless given)
//
// Dimensions: B batch, T tokens, H q/k heads, HV value heads (GVA: HV % H == 0, value head hv
// uses q/k head hv / (HV / H)), K key width, V value width, N packed sequences, C chunk length.
// Layouts: q, k [B, T, H, K]; v, o [B, T, HV, V]; beta [B, T, HV]; state [B, HV, K, V].
//
// Cost per value head (FLOPs, multiply-add = 2):
//  - forward_recurrent / step: 7·K·V per token, O(1) extra memory, allocation-free;
//  - forward_chunked (WY/UT, chunk C): about 2C(3K + 2V) + C²/3 + 6·K·V per token in GEMMs,
//    O(C·(K+V) + K·V) working memory per thread;
//  - forward: the form measured faster for the shape (kernels::delta_rule::prefer_chunked): on
//    the reference machine the recurrent form won at every T, so forward() runs it.
// Numerics, -inf gates and the unstable regime (|1 - beta·|k|²| > 1): kernels/delta_rule.hpp.
//
// Checks (every entry, step included, before the engine runs): shapes with the numbers; beta
// finite; options.scale finite; options.chunk_size > 0; o and state must not share memory with
// any input or with each other (in place is not supported: rejected).
#pragma once

#include <cmath>
#include <optional>
#include <span>

#include <seqmix/core/error.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/kernels/delta_rule.hpp>
#include <seqmix/mixers/detail/front_checks.hpp>

namespace seqmix {

/// DeltaNet mixer over float or double.
template <class T>
class delta_net : public kernels::delta_rule::front<T> {
  using base = kernels::delta_rule::front<T>;
  using typename base::form;

 public:
  using typename base::options;
  delta_net() : base(options{}) {}
  explicit delta_net(const options& opt) : base(opt) {}

  /// A zero state [B, HV, K, V] (B = N for packed input).
  static tensor<T, 4> make_state(index_t B, index_t HV, index_t K, index_t V) {
    front::check_sizes(checker{"delta_net::make_state"}, {"B", "HV", "K", "V"}, {B, HV, K, V});
    return base::make_state(B, HV, K, V);
  }

  /// Chunked-parallel form (WY/UT transform).
  /// @param q     [B, T, H, K] queries (in)
  /// @param k     [B, T, H, K] keys (in)
  /// @param v     [B, T, HV, V] values (in)
  /// @param beta  [B, T, HV] write strengths, finite (in)
  /// @param o     [B, T, HV, V] outputs (out; must not overlap the inputs)
  /// @param state [B, HV, K, V] S_0 (in), S_T (out)
  void forward_chunked(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                       tensor_view<const T, 4> v, tensor_view<const T, 3> beta, tensor_view<T, 4> o,
                       tensor_view<T, 4> state) const {
    this->run("delta_net::forward_chunked", form::chunked, {q, k, v, {}, beta, o, state, {}},
              false);
  }
  /// Packed variable-length chunked form: B == 1, `cu_seqlens` [N+1] (0, ..., T, non-decreasing),
  /// state [N, HV, K, V], one row per sequence.
  void forward_chunked(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                       tensor_view<const T, 4> v, tensor_view<const T, 3> beta, tensor_view<T, 4> o,
                       tensor_view<T, 4> state, std::span<const index_t> cu_seqlens) const {
    this->run("delta_net::forward_chunked", form::chunked,
              {q, k, v, {}, beta, o, state, cu_seqlens}, false);
  }

  /// Token-by-token form; same arguments as forward_chunked. Allocates nothing.
  void forward_recurrent(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                         tensor_view<const T, 4> v, tensor_view<const T, 3> beta,
                         tensor_view<T, 4> o, tensor_view<T, 4> state) const {
    this->run("delta_net::forward_recurrent", form::recurrent, {q, k, v, {}, beta, o, state, {}},
              false);
  }
  /// Packed variable-length recurrent form (see forward_chunked).
  void forward_recurrent(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                         tensor_view<const T, 4> v, tensor_view<const T, 3> beta,
                         tensor_view<T, 4> o, tensor_view<T, 4> state,
                         std::span<const index_t> cu_seqlens) const {
    this->run("delta_net::forward_recurrent", form::recurrent,
              {q, k, v, {}, beta, o, state, cu_seqlens}, false);
  }

  /// Picks the faster form for the shape (recurrent for short sequences, chunked otherwise).
  void forward(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
               tensor_view<const T, 3> beta, tensor_view<T, 4> o, tensor_view<T, 4> state) const {
    this->run("delta_net::forward", form::automatic, {q, k, v, {}, beta, o, state, {}}, false);
  }
  /// Packed variable-length form choosing by the mean sequence length.
  void forward(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
               tensor_view<const T, 3> beta, tensor_view<T, 4> o, tensor_view<T, 4> state,
               std::span<const index_t> cu_seqlens) const {
    this->run("delta_net::forward", form::automatic, {q, k, v, {}, beta, o, state, cu_seqlens},
              false);
  }

  /// One token per sequence (decode), state updated in place; allocates nothing.
  /// @param q, k  [B, H, K] (in);  v [B, HV, V] (in);  beta [B, HV] (in)
  /// @param o     [B, HV, V] (out);  state [B, HV, K, V] (in/out)
  void step(tensor_view<const T, 3> q, tensor_view<const T, 3> k, tensor_view<const T, 3> v,
            tensor_view<const T, 2> beta, tensor_view<T, 3> o, tensor_view<T, 4> state) const {
    this->run_step("delta_net::step", q, k, v, {}, false, beta, o, state);
  }

 private:
  using typename base::call;
  // The front's checks (names and shapes as in the signatures, gates, aliasing), then the shared
  // dispatch of kernels::delta_rule::front (whose own checks then pass).
  void run(const char* where, form f, const call& c, bool gated) const {
    front::check_delta_call<T, 4>(checker{where}, this->opt_, gated, false, c.q, c.k, c.v, c.g,
                                  c.beta, c.o, c.state, c.cu);
    base::run(where, f, c, gated);
  }
  void run_step(const char* where, tensor_view<const T, 3> q, tensor_view<const T, 3> k,
                tensor_view<const T, 3> v, tensor_view<const T, 2> g, bool gated,
                tensor_view<const T, 2> beta, tensor_view<T, 3> o, tensor_view<T, 4> state) const {
    front::check_delta_call<T, 3>(checker{where}, this->opt_, gated, false, q, k, v, g, beta, o,
                                  state, {});
    base::run_step(where, q, k, v, g, gated, beta, o, state);
  }
};

}  // namespace seqmix
