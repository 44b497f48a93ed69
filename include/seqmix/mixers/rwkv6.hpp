// SPDX-License-Identifier: MIT
// RWKV-6 (docs/math.md §3): per-key log decay w, bonus u, read before the write. A thin front
// over kernels/gated_accumulation.hpp: GLA's per-key gate with the engine's exclusive readout.
//
//   o_t = (S_{t-1} + Diag(u) k_t v_tᵀ)ᵀ (s r_t)        s defaults to 1 (fla's RWKV layers)
//   S_t = Diag(exp(w_t)) S_{t-1} + k_t v_tᵀ              w <= 0 natural-log decays, -inf allowed
//
// Shapes: r, k, w [B,T,H,K]; v, o [B,T,H,V]; u [H,K]; state [B,H,K,V], or [N,H,K,V] with
// cu_seqlens [N+1] (B == 1, one state per packed sequence). step: r1, k1, w1 [B,H,K]; v1, o1
// [B,H,V]. Cost per (sequence, head) and token: recurrent 5·K·V FLOP + K exps + 3·K for the
// bonus, nothing allocated; chunked 2C(K+V) + 4KV FLOP + about 2·K exps on the factored path
// (weak gates), 16·K/2 exps per token on the exact one (strong gates, kills), O(C·(C+K+V) + K·V)
// scratch per thread. forward() switches between them like the other gated mixers.
//
// Checks (every entry, before the engine runs; names as in the signature called): shapes; w are
// log gates (<= 0 or -inf; > 0 or NaN rejected with index and value, growth with
// options::allow_gate_growth); u finite; o and state disjoint from every input and each other.
#pragma once

#include <optional>
#include <span>

#include <seqmix/core/error.hpp>
#include <seqmix/core/gate_check.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/kernels/gated_accumulation.hpp>
#include <seqmix/mixers/detail/front_checks.hpp>

namespace seqmix {

/// RWKV-6 time mixing (the WKV recurrence; projections, token shift and gating are the layer's).
template <class T>
class rwkv6 {
 public:
  struct options {
    std::optional<T> scale{};  ///< multiplies r; default 1
    index_t chunk_size = 64;   ///< chunk length C of forward_chunked
    /// forward() takes the chunked form from this many tokens per sequence (mean over the
    /// packed sequences), the recurrent form below; empty: default_switch_over_t.
    std::optional<index_t> switch_over_t{};
    /// Accept log decays w > 0 (the state grows). Off by default (core/gate_check.hpp).
    bool allow_gate_growth = false;
  };
  /// forward()'s switch-over without options::switch_over_t (kernels::gated says why).
  static constexpr index_t default_switch_over_t = kernels::gated::default_switch_over_t;

  rwkv6() = default;
  explicit rwkv6(options opt) : opt_(opt) { front::check_common_options(checker{"rwkv6"}, opt_); }
  const options& get_options() const { return opt_; }

  /// A zero state [B,H,K,V].
  static tensor<T, 4> make_state(index_t B, index_t H, index_t K, index_t V) {
    front::check_sizes(checker{"rwkv6::make_state"}, {"B", "H", "K", "V"}, {B, H, K, V});
    return tensor<T, 4>({B, H, K, V});
  }

  /// Chunked form. r, k, w: [B,T,H,K] in; v: [B,T,H,V] in; u: [H,K] in; o: [B,T,H,V] out;
  /// state: [B,H,K,V] (or [N,H,K,V] with cu_seqlens [N+1], B == 1) in/out.
  void forward_chunked(tensor_view<const T, 4> r, tensor_view<const T, 4> k,
                       tensor_view<const T, 4> v, tensor_view<const T, 4> w,
                       tensor_view<const T, 2> u, tensor_view<T, 4> o, tensor_view<T, 4> state,
                       std::span<const index_t> cu_seqlens = {}) const {
    run<4>("rwkv6::forward_chunked", kernels::gated::form::chunked, r, k, v, w, u, o, state,
           cu_seqlens);
  }
  /// Recurrent form; arguments as forward_chunked. Allocates nothing.
  void forward_recurrent(tensor_view<const T, 4> r, tensor_view<const T, 4> k,
                         tensor_view<const T, 4> v, tensor_view<const T, 4> w,
                         tensor_view<const T, 2> u, tensor_view<T, 4> o, tensor_view<T, 4> state,
                         std::span<const index_t> cu_seqlens = {}) const {
    run<4>("rwkv6::forward_recurrent", kernels::gated::form::recurrent, r, k, v, w, u, o, state,
           cu_seqlens);
  }
  /// The faster form for this shape (options::switch_over_t).
  void forward(tensor_view<const T, 4> r, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
               tensor_view<const T, 4> w, tensor_view<const T, 2> u, tensor_view<T, 4> o,
               tensor_view<T, 4> state, std::span<const index_t> cu_seqlens = {}) const {
    run<4>("rwkv6::forward", kernels::gated::form::automatic, r, k, v, w, u, o, state, cu_seqlens);
  }
  /// One token per sequence, allocates nothing. r1, k1, w1: [B,H,K]; v1, o1: [B,H,V].
  void step(tensor_view<const T, 3> r1, tensor_view<const T, 3> k1, tensor_view<const T, 3> v1,
            tensor_view<const T, 3> w1, tensor_view<const T, 2> u, tensor_view<T, 3> o1,
            tensor_view<T, 4> state) const {
    run<3>("rwkv6::step", kernels::gated::form::recurrent, r1, k1, v1, w1, u, o1, state, {});
  }

 private:
  template <std::size_t R>
  void run(const char* where, kernels::gated::form f, tensor_view<const T, R> r,
           tensor_view<const T, R> k, tensor_view<const T, R> v, tensor_view<const T, R> w,
           tensor_view<const T, 2> u, tensor_view<T, R> o, tensor_view<T, 4> state,
           std::span<const index_t> cu) const {
    namespace g = kernels::gated;
    const checker check{where};
    constexpr bool one = R == 3;  // step: [B,H,D] arguments named r1, k1, ...
    const front::qkvo_names n = one ? front::qkvo_names{"r1", "k1", "v1", "o1", "state"}
                                    : front::qkvo_names{"r", "k", "v", "o", "state"};
    const std::string_view w_name = one ? "w1" : "w";
    const auto d = front::check_qkvo<T, R>(check, n, r, k, v, o, state, cu, true);
    front::token_shape<R>(check, w_name, w, d.B, d.TT, d.H, d.K);
    check.inner_contiguous(w_name, w);
    check.shape("u", u, {d.H, d.K});
    check.inner_contiguous("u", u);
    check.no_overlap({range_of(n.o, o), range_of(n.state, state)},
                     {range_of(n.q, r), range_of(n.k, k), range_of(n.v, v), range_of(w_name, w),
                      range_of("u", u)});
    check_log_gates<T, R>(check, w_name, w, opt_.allow_gate_growth, one ? "b, h, k" : "b, t, h, k");
    check.finite("u", u);
    g::problem<T> p{g::as_rank4(r),
                    g::as_rank4(k),
                    g::as_rank4(v),
                    g::as_rank4(o),
                    state,
                    {},
                    opt_.scale.value_or(T(1)),
                    cu};
    g::validate(check, p, opt_.chunk_size);  // passes: the checks above cover it
    const g::with_readout<g::key_gate<T>, g::bonus_readout<T>> gate{{g::as_rank4(w), {}}, {u}};
    g::run(f, p, gate, opt_.chunk_size, opt_.switch_over_t.value_or(default_switch_over_t));
  }

  options opt_;
};

}  // namespace seqmix
