// SPDX-License-Identifier: MIT
// Gated linear attention (GLA): per-key gate, optional per-value gate. A thin front over
// kernels/gated_accumulation.hpp (docs/math.md §1).
//
//   S_t = Diag(exp(gk_t)) S_{t-1} Diag(exp(gv_t)) + k_t v_tᵀ     gk: [B,T,H,K], gv: [B,T,H,V]
//   o_t = S_tᵀ (s q_t)                                            s defaults to K^-1/2
//
// Dimensions: B batch, T tokens, H heads, K key size, V value size, C chunk (default 64),
// N packed sequences. Cost per (sequence, head) and token: recurrent 5·K·V FLOP (+ K exps), no
// extra memory; chunked 2C(K+V) + 4KV FLOP + about 2·K exps when the chunk's gates allow the
// factored path (every trained layer's do), 10·K (exact 16×16 diagonal blocks) otherwise,
// O(C·(C+K+V) + K·V) scratch per thread. The GLA layer uses gk = logsigmoid(x) / 16; any gate
// in [-inf, 0] is finite and exact here (see the engine).
//
// Checks (every entry, step included, before the engine runs; messages name the arguments of
// the entry called, q1/k1/... with their [B,H,K] shapes for step): shapes; gk and gv are log
// gates: <= 0 or -inf, a gate > 0 (alpha passed instead of log alpha) or NaN is rejected with
// its index and value (core/gate_check.hpp), growth is allowed with options::allow_gate_growth;
// options.scale finite and options.chunk_size > 0 when the mixer is built; o and state must not
// share memory with any input or with each other (in place is not supported: rejected).
#pragma once

#include <cmath>
#include <limits>
#include <optional>
#include <span>

#include <seqmix/core/error.hpp>
#include <seqmix/core/gate_check.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/kernels/gated_accumulation.hpp>
#include <seqmix/mixers/detail/front_checks.hpp>

namespace seqmix {

/// GLA. Overloads without gv have a per-key gate only.
template <class T>
class gla {
 public:
  struct options {
    std::optional<T> scale{};  ///< multiplies q; default K^-1/2
    index_t chunk_size = 64;   ///< chunk length C of forward_chunked
    /// forward() takes the chunked form from this many tokens per sequence (mean over the
    /// packed sequences), the recurrent form below; empty: default_switch_over_t.
    std::optional<index_t> switch_over_t{};
    /// Accept log gates > 0 (decays above 1: the state grows). Off by default: a positive gate
    /// is nearly always alpha passed instead of log alpha (core/gate_check.hpp).
    bool allow_gate_growth = false;
  };
  /// forward()'s switch-over without options::switch_over_t (kernels::gated says why).
  static constexpr index_t default_switch_over_t = kernels::gated::default_switch_over_t;

  gla() = default;
  explicit gla(options opt) : opt_(opt) { front::check_common_options(checker{"gla"}, opt_); }
  const options& get_options() const { return opt_; }

  /// A zero state [B,H,K,V].
  static tensor<T, 4> make_state(index_t B, index_t H, index_t K, index_t V) {
    front::check_sizes(checker{"gla::make_state"}, {"B", "H", "K", "V"}, {B, H, K, V});
    return tensor<T, 4>({B, H, K, V});
  }

  /// Chunked form. q, k: [B,T,H,K] in; v: [B,T,H,V] in; gk: [B,T,H,K] log gates in;
  /// o: [B,T,H,V] out; state: [B,H,K,V] (or [N,H,K,V] with cu_seqlens [N+1], B == 1) in/out.
  void forward_chunked(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                       tensor_view<const T, 4> v, tensor_view<const T, 4> gk, tensor_view<T, 4> o,
                       tensor_view<T, 4> state, std::span<const index_t> cu_seqlens = {}) const {
    run<4>("gla::forward_chunked", kernels::gated::form::chunked, q, k, v, gk, {}, o, state,
           cu_seqlens);
  }
  /// Recurrent form; arguments as forward_chunked.
  void forward_recurrent(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                         tensor_view<const T, 4> v, tensor_view<const T, 4> gk, tensor_view<T, 4> o,
                         tensor_view<T, 4> state, std::span<const index_t> cu_seqlens = {}) const {
    run<4>("gla::forward_recurrent", kernels::gated::form::recurrent, q, k, v, gk, {}, o, state,
           cu_seqlens);
  }
  /// The faster form for this shape.
  void forward(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
               tensor_view<const T, 4> gk, tensor_view<T, 4> o, tensor_view<T, 4> state,
               std::span<const index_t> cu_seqlens = {}) const {
    run<4>("gla::forward", kernels::gated::form::automatic, q, k, v, gk, {}, o, state, cu_seqlens);
  }
  /// One token per sequence, allocates nothing. q1, k1, gk1: [B,H,K]; v1, o1: [B,H,V].
  void step(tensor_view<const T, 3> q1, tensor_view<const T, 3> k1, tensor_view<const T, 3> v1,
            tensor_view<const T, 3> gk1, tensor_view<T, 3> o1, tensor_view<T, 4> state) const {
    run<3>("gla::step", kernels::gated::form::recurrent, q1, k1, v1, gk1, {}, o1, state, {});
  }

  /// With a per-value gate gv: [B,T,H,V] (step: [B,H,V]).
  void forward_chunked(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                       tensor_view<const T, 4> v, tensor_view<const T, 4> gk,
                       tensor_view<const T, 4> gv, tensor_view<T, 4> o, tensor_view<T, 4> state,
                       std::span<const index_t> cu_seqlens = {}) const {
    run<4>("gla::forward_chunked", kernels::gated::form::chunked, q, k, v, gk,
           require_gv("gla::forward_chunked", gv), o, state, cu_seqlens);
  }
  void forward_recurrent(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                         tensor_view<const T, 4> v, tensor_view<const T, 4> gk,
                         tensor_view<const T, 4> gv, tensor_view<T, 4> o, tensor_view<T, 4> state,
                         std::span<const index_t> cu_seqlens = {}) const {
    run<4>("gla::forward_recurrent", kernels::gated::form::recurrent, q, k, v, gk,
           require_gv("gla::forward_recurrent", gv), o, state, cu_seqlens);
  }
  void forward(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
               tensor_view<const T, 4> gk, tensor_view<const T, 4> gv, tensor_view<T, 4> o,
               tensor_view<T, 4> state, std::span<const index_t> cu_seqlens = {}) const {
    run<4>("gla::forward", kernels::gated::form::automatic, q, k, v, gk,
           require_gv("gla::forward", gv), o, state, cu_seqlens);
  }
  void step(tensor_view<const T, 3> q1, tensor_view<const T, 3> k1, tensor_view<const T, 3> v1,
            tensor_view<const T, 3> gk1, tensor_view<const T, 3> gv1, tensor_view<T, 3> o1,
            tensor_view<T, 4> state) const {
    run<3>("gla::step", kernels::gated::form::recurrent, q1, k1, v1, gk1,
           require_gv("gla::step", gv1), o1, state, {});
  }

 private:
  template <std::size_t R>
  static tensor_view<const T, R> require_gv(const char* where, tensor_view<const T, R> gv) {
    checker{where}.nonempty(R == 4 ? "gv" : "gv1", gv);
    return gv;
  }
  template <std::size_t R>
  void run(const char* where, kernels::gated::form f, tensor_view<const T, R> q,
           tensor_view<const T, R> k, tensor_view<const T, R> v, tensor_view<const T, R> gk,
           tensor_view<const T, R> gv, tensor_view<T, R> o, tensor_view<T, 4> state,
           std::span<const index_t> cu) const {
    const checker check{where};
    constexpr bool one = R == 3;  // step: [B,H,D] arguments named q1, k1, ...
    const front::qkvo_names n = one ? front::qkvo_names{"q1", "k1", "v1", "o1", "state"}
                                    : front::qkvo_names{"q", "k", "v", "o", "state"};
    const std::string_view gk_name = one ? "gk1" : "gk", gv_name = one ? "gv1" : "gv";
    const auto d = front::check_qkvo<T, R>(check, n, q, k, v, o, state, cu, true);
    front::token_shape<R>(check, gk_name, gk, d.B, d.TT, d.H, d.K);
    check.inner_contiguous(gk_name, gk);
    const bool has_gv = gv.data() != nullptr;
    if (has_gv) {
      front::token_shape<R>(check, gv_name, gv, d.B, d.TT, d.H, d.V);
      check.inner_contiguous(gv_name, gv);
    }
    check.no_overlap({range_of(n.o, o), range_of(n.state, state)},
                     {range_of(n.q, q), range_of(n.k, k), range_of(n.v, v), range_of(gk_name, gk),
                      range_of(gv_name, gv)});
    check_log_gates<T, R>(check, gk_name, gk, opt_.allow_gate_growth,
                          one ? "b, h, k" : "b, t, h, k");
    if (has_gv) {
      check_log_gates<T, R>(check, gv_name, gv, opt_.allow_gate_growth,
                            one ? "b, h, v" : "b, t, h, v");
    }
    run4(check, f, to4(q), to4(k), to4(v), to4(gk), has_gv ? to4(gv) : tensor_view<const T, 4>{},
         to4(o), state, cu);
  }
  template <class U, std::size_t R>
  static tensor_view<U, 4> to4(const tensor_view<U, R>& x) {
    return kernels::gated::as_rank4(x);
  }
  void run4(const checker& check, kernels::gated::form f, tensor_view<const T, 4> q,
            tensor_view<const T, 4> k, tensor_view<const T, 4> v, tensor_view<const T, 4> gk,
            tensor_view<const T, 4> gv, tensor_view<T, 4> o, tensor_view<T, 4> state,
            std::span<const index_t> cu) const {
    kernels::gated::problem<T> p{q, k, v, o, state, {}, T(1), cu};
    kernels::gated::validate(check, p, opt_.chunk_size);  // passes: the front checked it all
    p.scale = opt_.scale ? *opt_.scale : T(1) / std::sqrt(static_cast<T>(q.extent(3)));
    kernels::gated::run(f, p, kernels::gated::key_gate<T>{gk, gv}, opt_.chunk_size,
                        opt_.switch_over_t.value_or(default_switch_over_t));
  }

  options opt_;
};

}  // namespace seqmix
