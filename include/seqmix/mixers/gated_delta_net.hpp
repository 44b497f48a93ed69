// SPDX-License-Identifier: MIT
// Gated DeltaNet (Yang et al. 2024; the mixer of Qwen3-Next-style hybrids), docs/math.md §2.
//
//     S'_t = exp(g_t) S_{t-1}                  (decay first: g_t natural-log gate per value head)
//     u_t  = beta_t (v_t - S'_tᵀ k_t)
//     S_t  = S'_t + k_t u_tᵀ
//     o_t  = S_tᵀ (s q_t)                       (s = K^-1/2 unless given)
//
// Dimensions: B batch, T tokens, H q/k heads, HV value heads (GVA: HV % H == 0, value head hv
// uses q/k head hv / (HV / H)), K key width, V value width, N packed sequences, C chunk length.
// Layouts: q, k [B, T, H, K]; v, o [B, T, HV, V]; g, beta [B, T, HV]; state [B, HV, K, V].
//
// Cost per value head (FLOPs, multiply-add = 2):
//  - forward_recurrent / step: 7·K·V per token, O(1) extra memory, allocation-free;
//  - forward_chunked (WY/UT, chunk C): about 2C(3K + 2V) + C²/3 + 6·K·V per token in GEMMs,
//    O(C·(K+V) + K·V) working memory per thread;
//  - forward: the form measured faster for the shape (kernels::delta_rule::prefer_chunked): on
//    the reference machine the recurrent form won at every T, so forward() runs it.
// Numerics, -inf gates and the unstable regime (|1 - beta·|k|²| > 1): kernels/delta_rule.hpp.
//
// Checks (every entry, step included, before the engine runs): shapes with the numbers; g are
// log gates: <= 0 or -inf, a gate > 0 (alpha passed instead of log alpha) or NaN is rejected
// with its index (b, t, hv) and value (core/gate_check.hpp); construct with gate_growth::allow
// to accept growth; beta finite; options.scale finite; options.chunk_size > 0; o and state must
// not share memory with any input or with each other (in place is not supported: rejected).
// gated_delta_gates rejects non-finite a, b with their index and value, and outputs that share
// memory with its inputs.
#pragma once

#include <cmath>
#include <optional>
#include <span>

#include <seqmix/core/error.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/kernels/delta_rule.hpp>
#include <seqmix/mixers/detail/front_checks.hpp>

namespace seqmix {

/// Gated DeltaNet mixer over float or double.
template <class T>
class gated_delta_net : public kernels::delta_rule::front<T> {
  using base = kernels::delta_rule::front<T>;
  using typename base::form;

 public:
  using typename base::options;
  gated_delta_net() : base(options{}) {}
  /// `growth`: gate_growth::allow accepts log gates > 0 (the state grows); by default they are
  /// rejected (core/gate_check.hpp says why).
  explicit gated_delta_net(const options& opt, gate_growth growth = gate_growth::reject)
      : base(opt), allow_growth_(growth == gate_growth::allow) {}

  /// A zero state [B, HV, K, V] (B = N for packed input).
  static tensor<T, 4> make_state(index_t B, index_t HV, index_t K, index_t V) {
    front::check_sizes(checker{"gated_delta_net::make_state"}, {"B", "HV", "K", "V"},
                       {B, HV, K, V});
    return base::make_state(B, HV, K, V);
  }

  /// Chunked-parallel form (WY/UT transform).
  /// @param q     [B, T, H, K] queries (in)
  /// @param k     [B, T, H, K] keys (in)
  /// @param v     [B, T, HV, V] values (in)
  /// @param g     [B, T, HV] natural-log gates, finite or -inf (in)
  /// @param beta  [B, T, HV] write strengths, finite (in)
  /// @param o     [B, T, HV, V] outputs (out; must not overlap the inputs)
  /// @param state [B, HV, K, V] S_0 (in), S_T (out)
  void forward_chunked(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                       tensor_view<const T, 4> v, tensor_view<const T, 3> g,
                       tensor_view<const T, 3> beta, tensor_view<T, 4> o,
                       tensor_view<T, 4> state) const {
    this->run("gated_delta_net::forward_chunked", form::chunked, {q, k, v, g, beta, o, state, {}},
              true);
  }
  /// Packed variable-length chunked form: B == 1, `cu_seqlens` [N+1] (0, ..., T, non-decreasing),
  /// state [N, HV, K, V], one row per sequence.
  void forward_chunked(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                       tensor_view<const T, 4> v, tensor_view<const T, 3> g,
                       tensor_view<const T, 3> beta, tensor_view<T, 4> o, tensor_view<T, 4> state,
                       std::span<const index_t> cu_seqlens) const {
    this->run("gated_delta_net::forward_chunked", form::chunked,
              {q, k, v, g, beta, o, state, cu_seqlens}, true);
  }

  /// Token-by-token form; same arguments as forward_chunked. Allocates nothing.
  void forward_recurrent(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                         tensor_view<const T, 4> v, tensor_view<const T, 3> g,
                         tensor_view<const T, 3> beta, tensor_view<T, 4> o,
                         tensor_view<T, 4> state) const {
    this->run("gated_delta_net::forward_recurrent", form::recurrent,
              {q, k, v, g, beta, o, state, {}}, true);
  }
  /// Packed variable-length recurrent form (see forward_chunked).
  void forward_recurrent(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                         tensor_view<const T, 4> v, tensor_view<const T, 3> g,
                         tensor_view<const T, 3> beta, tensor_view<T, 4> o, tensor_view<T, 4> state,
                         std::span<const index_t> cu_seqlens) const {
    this->run("gated_delta_net::forward_recurrent", form::recurrent,
              {q, k, v, g, beta, o, state, cu_seqlens}, true);
  }

  /// Picks the faster form for the shape (recurrent for short sequences, chunked otherwise).
  void forward(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
               tensor_view<const T, 3> g, tensor_view<const T, 3> beta, tensor_view<T, 4> o,
               tensor_view<T, 4> state) const {
    this->run("gated_delta_net::forward", form::automatic, {q, k, v, g, beta, o, state, {}}, true);
  }
  /// Packed variable-length form choosing by the mean sequence length.
  void forward(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
               tensor_view<const T, 3> g, tensor_view<const T, 3> beta, tensor_view<T, 4> o,
               tensor_view<T, 4> state, std::span<const index_t> cu_seqlens) const {
    this->run("gated_delta_net::forward", form::automatic, {q, k, v, g, beta, o, state, cu_seqlens},
              true);
  }

  /// One token per sequence (decode), state updated in place; allocates nothing.
  /// @param q, k  [B, H, K] (in);  v [B, HV, V] (in);  g, beta [B, HV] (in)
  /// @param o     [B, HV, V] (out);  state [B, HV, K, V] (in/out)
  void step(tensor_view<const T, 3> q, tensor_view<const T, 3> k, tensor_view<const T, 3> v,
            tensor_view<const T, 2> g, tensor_view<const T, 2> beta, tensor_view<T, 3> o,
            tensor_view<T, 4> state) const {
    this->run_step("gated_delta_net::step", q, k, v, g, true, beta, o, state);
  }

 private:
  using typename base::call;
  // The front's checks (names and shapes as in the signatures, gates, aliasing), then the shared
  // dispatch of kernels::delta_rule::front (whose own checks then pass).
  void run(const char* where, form f, const call& c, bool gated) const {
    front::check_delta_call<T, 4>(checker{where}, this->opt_, gated, allow_growth_, c.q, c.k, c.v,
                                  c.g, c.beta, c.o, c.state, c.cu);
    base::run(where, f, c, gated);
  }
  void run_step(const char* where, tensor_view<const T, 3> q, tensor_view<const T, 3> k,
                tensor_view<const T, 3> v, tensor_view<const T, 2> g, bool gated,
                tensor_view<const T, 2> beta, tensor_view<T, 3> o, tensor_view<T, 4> state) const {
    front::check_delta_call<T, 3>(checker{where}, this->opt_, gated, allow_growth_, q, k, v, g,
                                  beta, o, state, {});
    base::run_step(where, q, k, v, g, gated, beta, o, state);
  }

  bool allow_growth_ = false;
};

/// Gate helper of Gated DeltaNet layers: g = -exp(A_log_h) · softplus(a + dt_bias_h) and
/// beta = sigmoid(b), finite for every finite input (clamped at the lowest finite value); a
/// non-finite input is rejected with its index and value, g and beta must not share memory
/// with the inputs.
/// @param a, b     [B, T, HV] projections (in)
/// @param A_log    [HV] (in);  dt_bias [HV] (in)
/// @param g, beta  [B, T, HV] (out)
template <class T>
void gated_delta_gates(tensor_view<const T, 3> a, tensor_view<const T, 3> b,
                       tensor_view<const T, 1> A_log, tensor_view<const T, 1> dt_bias,
                       tensor_view<T, 3> g, tensor_view<T, 3> beta) {
  const checker check{"gated_delta_gates"};
  check.extents("a", a);
  const index_t B = a.extent(0), TT = a.extent(1), HV = a.extent(2);
  check.shape("b", b, {B, TT, HV});
  check.shape("A_log", A_log, {HV});
  check.shape("dt_bias", dt_bias, {HV});
  check.shape("g", g, {B, TT, HV});
  check.shape("beta", beta, {B, TT, HV});
  check.distinct_elements("g", g);
  check.distinct_elements("beta", beta);
  check.no_overlap(
      {range_of("g", g), range_of("beta", beta)},
      {range_of("a", a), range_of("b", b), range_of("A_log", A_log), range_of("dt_bias", dt_bias)});
  // a NaN would become g = lowest (a silent "forget everything"), a NaN b a NaN beta
  check.finite("a", a);
  check.finite("b", b);
  check.finite("A_log", A_log);
  check.finite("dt_bias", dt_bias);
  for (index_t i = 0; i < B; ++i)
    for (index_t t = 0; t < TT; ++t)
      for (index_t h = 0; h < HV; ++h) {
        g(i, t, h) = kernels::delta_rule::gate_value(a(i, t, h), A_log(h), dt_bias(h));
        beta(i, t, h) = math::sigmoid(b(i, t, h));
      }
}

}  // namespace seqmix
