// SPDX-License-Identifier: MIT
// Linear attention (no gate), optionally normalised: a thin front over
// kernels/gated_accumulation.hpp (docs/math.md §1).
//
//   S_t = S_{t-1} + k_t v_tᵀ;   o_t = S_tᵀ (s q_t)                 s defaults to K^-1/2
//   with the normaliser: z_t = z_{t-1} + k_t,  o_t = S_tᵀ (s q_t) / (s q_t · z_t + 1e-10)
//
// Dimensions: B batch, T tokens, H heads, K key size, V value size, C chunk (default 64).
// Cost per (sequence, head) and token: recurrent 4·K·V FLOP, no extra memory; chunked
// 2C(K+V) + 4KV FLOP, O(C·(C+K+V) + K·V) scratch per thread; the normaliser adds O(K + V).
//
// Checks (every entry, step included, before the engine runs; messages name the arguments of
// the entry called, q1/k1/... with their [B,H,K] shapes for step): shapes; options.scale finite
// and options.chunk_size > 0 when the mixer is built; o, state and z must not share memory with
// any input or with each other (in place is not supported: rejected).
#pragma once

#include <cmath>
#include <limits>
#include <optional>
#include <span>

#include <seqmix/core/error.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/kernels/gated_accumulation.hpp>
#include <seqmix/mixers/detail/front_checks.hpp>

namespace seqmix {

/// Linear attention. The overloads taking `z` ([B,H,K], in/out) use the normaliser.
template <class T>
class linear_attention {
 public:
  struct options {
    std::optional<T> scale{};  ///< multiplies q; default K^-1/2
    index_t chunk_size = 64;   ///< chunk length C of forward_chunked
    /// forward() takes the chunked form from this many tokens per sequence (mean over the
    /// packed sequences), the recurrent form below; empty: default_switch_over_t.
    std::optional<index_t> switch_over_t{};
  };
  /// forward()'s switch-over without options::switch_over_t (kernels::gated says why).
  static constexpr index_t default_switch_over_t = kernels::gated::default_switch_over_t;

  linear_attention() = default;
  explicit linear_attention(options opt) : opt_(opt) {
    front::check_common_options(checker{"linear_attention"}, opt_);
  }
  const options& get_options() const { return opt_; }

  /// A zero state [B,H,K,V].
  static tensor<T, 4> make_state(index_t B, index_t H, index_t K, index_t V) {
    front::check_sizes(checker{"linear_attention::make_state"}, {"B", "H", "K", "V"}, {B, H, K, V});
    return tensor<T, 4>({B, H, K, V});
  }
  /// A zero normaliser state [B,H,K].
  static tensor<T, 3> make_normaliser_state(index_t B, index_t H, index_t K) {
    front::check_sizes(checker{"linear_attention::make_normaliser_state"}, {"B", "H", "K"},
                       {B, H, K});
    return tensor<T, 3>({B, H, K});
  }

  /// Chunked form. q, k: [B,T,H,K] in; v: [B,T,H,V] in; o: [B,T,H,V] out; state: [B,H,K,V]
  /// (or [N,H,K,V] with cu_seqlens [N+1], B == 1) in S_0, out S_T.
  void forward_chunked(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                       tensor_view<const T, 4> v, tensor_view<T, 4> o, tensor_view<T, 4> state,
                       std::span<const index_t> cu_seqlens = {}) const {
    run<4>("linear_attention::forward_chunked", kernels::gated::form::chunked, q, k, v, o, state,
           {}, cu_seqlens);
  }
  /// Recurrent form; arguments as forward_chunked.
  void forward_recurrent(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                         tensor_view<const T, 4> v, tensor_view<T, 4> o, tensor_view<T, 4> state,
                         std::span<const index_t> cu_seqlens = {}) const {
    run<4>("linear_attention::forward_recurrent", kernels::gated::form::recurrent, q, k, v, o,
           state, {}, cu_seqlens);
  }
  /// The faster form for this shape.
  void forward(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
               tensor_view<T, 4> o, tensor_view<T, 4> state,
               std::span<const index_t> cu_seqlens = {}) const {
    run<4>("linear_attention::forward", kernels::gated::form::automatic, q, k, v, o, state, {},
           cu_seqlens);
  }
  /// One token per sequence, allocates nothing. q1, k1: [B,H,K]; v1, o1: [B,H,V]; state in/out.
  void step(tensor_view<const T, 3> q1, tensor_view<const T, 3> k1, tensor_view<const T, 3> v1,
            tensor_view<T, 3> o1, tensor_view<T, 4> state) const {
    run<3>("linear_attention::step", kernels::gated::form::recurrent, q1, k1, v1, o1, state, {},
           {});
  }

  /// Normalised overloads: z [B,H,K] (or [N,H,K]) is the normaliser state, in/out.
  void forward_chunked(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                       tensor_view<const T, 4> v, tensor_view<T, 4> o, tensor_view<T, 4> state,
                       tensor_view<T, 3> z, std::span<const index_t> cu_seqlens = {}) const {
    run<4>("linear_attention::forward_chunked", kernels::gated::form::chunked, q, k, v, o, state,
           require_z("linear_attention::forward_chunked", z), cu_seqlens);
  }
  void forward_recurrent(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                         tensor_view<const T, 4> v, tensor_view<T, 4> o, tensor_view<T, 4> state,
                         tensor_view<T, 3> z, std::span<const index_t> cu_seqlens = {}) const {
    run<4>("linear_attention::forward_recurrent", kernels::gated::form::recurrent, q, k, v, o,
           state, require_z("linear_attention::forward_recurrent", z), cu_seqlens);
  }
  void forward(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
               tensor_view<T, 4> o, tensor_view<T, 4> state, tensor_view<T, 3> z,
               std::span<const index_t> cu_seqlens = {}) const {
    run<4>("linear_attention::forward", kernels::gated::form::automatic, q, k, v, o, state,
           require_z("linear_attention::forward", z), cu_seqlens);
  }
  void step(tensor_view<const T, 3> q1, tensor_view<const T, 3> k1, tensor_view<const T, 3> v1,
            tensor_view<T, 3> o1, tensor_view<T, 4> state, tensor_view<T, 3> z) const {
    run<3>("linear_attention::step", kernels::gated::form::recurrent, q1, k1, v1, o1, state,
           require_z("linear_attention::step", z), {});
  }

 private:
  static tensor_view<T, 3> require_z(const char* where, tensor_view<T, 3> z) {
    checker{where}.nonempty("z", z);
    return z;
  }
  template <std::size_t R>
  void run(const char* where, kernels::gated::form f, tensor_view<const T, R> q,
           tensor_view<const T, R> k, tensor_view<const T, R> v, tensor_view<T, R> o,
           tensor_view<T, 4> state, tensor_view<T, 3> z, std::span<const index_t> cu) const {
    const checker check{where};
    constexpr bool one = R == 3;
    const front::qkvo_names n = one ? front::qkvo_names{"q1", "k1", "v1", "o1", "state"}
                                    : front::qkvo_names{"q", "k", "v", "o", "state"};
    const auto d = front::check_qkvo<T, R>(check, n, q, k, v, o, state, cu, true);
    if (z.data()) {
      check.shape("z", z, {d.N, d.H, d.K});
      check.inner_contiguous("z", z);
      check.distinct_elements("z", z);
    }
    check.no_overlap({range_of(n.o, o), range_of(n.state, state), range_of("z", z)},
                     {range_of(n.q, q), range_of(n.k, k), range_of(n.v, v)});
    kernels::gated::problem<T> p{to4(q), to4(k), to4(v), to4(o), state, z, T(1), cu};
    kernels::gated::validate(check, p, opt_.chunk_size);  // passes: the front checked it all
    p.scale = opt_.scale ? *opt_.scale : T(1) / std::sqrt(static_cast<T>(d.K));
    kernels::gated::run(f, p, kernels::gated::no_gate<T>{}, opt_.chunk_size,
                        opt_.switch_over_t.value_or(default_switch_over_t));
  }
  template <class U, std::size_t R>
  static tensor_view<U, 4> to4(const tensor_view<U, R>& x) {
    return kernels::gated::as_rank4(x);
  }

  options opt_;
};

}  // namespace seqmix
