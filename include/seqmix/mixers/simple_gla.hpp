// SPDX-License-Identifier: MIT
// Simple GLA (scalar gate per head and token), retention and Lightning attention (constant gate
// per head): a thin front over kernels/gated_accumulation.hpp (docs/math.md §1).
//
//   S_t = exp(g_t) S_{t-1} + k_t v_tᵀ        g: [B,T,H] data-dependent, or g_gamma: [H] constant
//   o_t = S_tᵀ (s q_t)                       s defaults to K^-1/2
//
// Dimensions: B batch, T tokens, H heads, K key size, V value size, C chunk (default 64),
// N packed sequences (cu_seqlens). Cost per (sequence, head) and token: recurrent 5·K·V FLOP and
// no extra memory; chunked 2C(K+V) + 4KV FLOP and O(C·(C+K+V) + K·V) scratch per thread.
//
// Retention: g_gamma = retention_g_gamma(H) = ln(1 - 2^(-5-h)). Lightning: g_gamma from
// lightning_g_gamma_transnormer(H, layer, layers) (scale K^-1/2) or lightning_g_gamma_alibi(H)
// (Linear-MoE; use scale 1).
//
// Checks (every entry, step included, before the engine runs; messages name the arguments of
// the entry called, q1/k1/g1/... with their [B,H,K] shapes for step): shapes; g and
// options::g_gamma are log gates: <= 0 or -inf, a gate > 0 (alpha passed instead of log alpha)
// or NaN is rejected with its index and value (core/gate_check.hpp), growth is allowed with
// options::allow_gate_growth; options.scale finite, options.chunk_size > 0 and g_gamma's values
// when the mixer is built; o and state must not share memory with any input or with each other
// (in place is not supported: rejected).
#pragma once

#include <cmath>
#include <limits>
#include <optional>
#include <span>
#include <utility>
#include <vector>

#include <seqmix/core/error.hpp>
#include <seqmix/core/gate_check.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/kernels/gated_accumulation.hpp>
#include <seqmix/mixers/detail/front_checks.hpp>

namespace seqmix {

/// Retention's decays: g_gamma_h = ln(1 - 2^(-5-h)), h = 0..H-1.
template <class T>
std::vector<T> retention_g_gamma(index_t H) {
  if (H < 1) {
    throw shape_error("seqmix::retention_g_gamma: argument 'H': must be >= 1, got " +
                      std::to_string(H));
  }
  std::vector<T> g(static_cast<std::size_t>(H));
  for (index_t h = 0; h < H; ++h) {
    g[static_cast<std::size_t>(h)] = static_cast<T>(std::log1p(-std::exp2(-5.0 - double(h))));
  }
  return g;
}

/// Lightning attention, TransNormerLLM / fla schedule: g_gamma_h = -(8/H)(1 - layer/layers)·h.
template <class T>
std::vector<T> lightning_g_gamma_transnormer(index_t H, index_t layer, index_t layers) {
  const checker check{"lightning_g_gamma_transnormer"};
  if (H < 1) check.fail("H", "must be >= 1, got " + std::to_string(H));
  if (layers < 1) check.fail("layers", "must be >= 1, got " + std::to_string(layers));
  if (layer < 0 || layer >= layers) {
    check.fail("layer", "must be in [0, layers) = [0, " + std::to_string(layers) + "), got " +
                            std::to_string(layer));
  }
  std::vector<T> g(static_cast<std::size_t>(H));
  for (index_t h = 0; h < H; ++h) {
    g[static_cast<std::size_t>(h)] =
        static_cast<T>(-(8.0 / double(H)) * (1.0 - double(layer) / double(layers)) * double(h));
  }
  return g;
}

/// Lightning attention, ALiBi slopes (Linear-MoE): g_gamma_h = -2^(-8(h+1)/H) (H a power of 2).
template <class T>
std::vector<T> lightning_g_gamma_alibi(index_t H) {
  if (H <= 0 || (H & (H - 1)) != 0) {
    throw shape_error(
        "seqmix::lightning_g_gamma_alibi: argument 'H': must be a power of two >= 1, got " +
        std::to_string(H));
  }
  std::vector<T> g(static_cast<std::size_t>(H));
  for (index_t h = 0; h < H; ++h) {
    g[static_cast<std::size_t>(h)] = static_cast<T>(-std::exp2(-8.0 * double(h + 1) / double(H)));
  }
  return g;
}

/// Simple GLA / retention / Lightning. With `options::g_gamma` empty, every call takes a
/// data-dependent gate g [B,T,H]; with g_gamma set ([H]), the gate-less overloads are used.
template <class T>
class simple_gla {
 public:
  struct options {
    std::optional<T> scale{};  ///< multiplies q; default K^-1/2
    index_t chunk_size = 64;   ///< chunk length C of forward_chunked
    /// forward() takes the chunked form from this many tokens per sequence (mean over the
    /// packed sequences), the recurrent form below; empty: default_switch_over_t.
    std::optional<index_t> switch_over_t{};
    std::vector<T> g_gamma{};  ///< constant log gate per head [H]; empty: g given per call
    /// Accept log gates > 0 (decays above 1: the state grows). Off by default: a positive gate
    /// is nearly always alpha passed instead of log alpha (core/gate_check.hpp).
    bool allow_gate_growth = false;
  };
  /// forward()'s switch-over without options::switch_over_t (kernels::gated says why).
  static constexpr index_t default_switch_over_t = kernels::gated::default_switch_over_t;

  simple_gla() = default;
  explicit simple_gla(options opt) : opt_(std::move(opt)) {
    const checker check{"simple_gla"};
    front::check_common_options(check, opt_);
    check_log_gates<T, 1>(check, "options.g_gamma", g_gamma_view(), opt_.allow_gate_growth, "h");
  }
  const options& get_options() const { return opt_; }

  /// A zero state [B,H,K,V].
  static tensor<T, 4> make_state(index_t B, index_t H, index_t K, index_t V) {
    front::check_sizes(checker{"simple_gla::make_state"}, {"B", "H", "K", "V"}, {B, H, K, V});
    return tensor<T, 4>({B, H, K, V});
  }

  /// Chunked form. q, k: [B,T,H,K] in; v: [B,T,H,V] in; g: [B,T,H] log gates in; o: [B,T,H,V]
  /// out; state: [B,H,K,V] (or [N,H,K,V] with cu_seqlens [N+1], B == 1) in S_0, out S_T.
  void forward_chunked(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                       tensor_view<const T, 4> v, tensor_view<const T, 3> g, tensor_view<T, 4> o,
                       tensor_view<T, 4> state, std::span<const index_t> cu_seqlens = {}) const {
    run_g<4>("simple_gla::forward_chunked", kernels::gated::form::chunked, q, k, v, g, o, state,
             cu_seqlens);
  }
  /// Recurrent form; arguments as forward_chunked.
  void forward_recurrent(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                         tensor_view<const T, 4> v, tensor_view<const T, 3> g, tensor_view<T, 4> o,
                         tensor_view<T, 4> state, std::span<const index_t> cu_seqlens = {}) const {
    run_g<4>("simple_gla::forward_recurrent", kernels::gated::form::recurrent, q, k, v, g, o, state,
             cu_seqlens);
  }
  /// The faster form for this shape (recurrent below switch_over_t tokens per sequence).
  void forward(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
               tensor_view<const T, 3> g, tensor_view<T, 4> o, tensor_view<T, 4> state,
               std::span<const index_t> cu_seqlens = {}) const {
    run_g<4>("simple_gla::forward", kernels::gated::form::automatic, q, k, v, g, o, state,
             cu_seqlens);
  }
  /// One token per sequence, in place, allocates nothing. q1, k1: [B,H,K]; v1: [B,H,V];
  /// g1: [B,H]; o1: [B,H,V] out; state: [B,H,K,V] in/out.
  void step(tensor_view<const T, 3> q1, tensor_view<const T, 3> k1, tensor_view<const T, 3> v1,
            tensor_view<const T, 2> g1, tensor_view<T, 3> o1, tensor_view<T, 4> state) const {
    run_g<3>("simple_gla::step", kernels::gated::form::recurrent, q1, k1, v1, g1, o1, state, {});
  }

  /// Constant-gate overloads (options::g_gamma set): as above without g.
  void forward_chunked(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                       tensor_view<const T, 4> v, tensor_view<T, 4> o, tensor_view<T, 4> state,
                       std::span<const index_t> cu_seqlens = {}) const {
    run_c<4>("simple_gla::forward_chunked", kernels::gated::form::chunked, q, k, v, o, state,
             cu_seqlens);
  }
  void forward_recurrent(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                         tensor_view<const T, 4> v, tensor_view<T, 4> o, tensor_view<T, 4> state,
                         std::span<const index_t> cu_seqlens = {}) const {
    run_c<4>("simple_gla::forward_recurrent", kernels::gated::form::recurrent, q, k, v, o, state,
             cu_seqlens);
  }
  void forward(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
               tensor_view<T, 4> o, tensor_view<T, 4> state,
               std::span<const index_t> cu_seqlens = {}) const {
    run_c<4>("simple_gla::forward", kernels::gated::form::automatic, q, k, v, o, state, cu_seqlens);
  }
  void step(tensor_view<const T, 3> q1, tensor_view<const T, 3> k1, tensor_view<const T, 3> v1,
            tensor_view<T, 3> o1, tensor_view<T, 4> state) const {
    run_c<3>("simple_gla::step", kernels::gated::form::recurrent, q1, k1, v1, o1, state, {});
  }

 private:
  tensor_view<const T, 1> g_gamma_view() const {
    return {opt_.g_gamma.data(), {static_cast<index_t>(opt_.g_gamma.size())}};
  }
  static front::qkvo_names names(bool one) {
    return one ? front::qkvo_names{"q1", "k1", "v1", "o1", "state"}
               : front::qkvo_names{"q", "k", "v", "o", "state"};
  }
  template <class U, std::size_t R>
  static tensor_view<U, 4> to4(const tensor_view<U, R>& x) {
    return kernels::gated::as_rank4(x);
  }
  template <std::size_t R>
  void run_g(const char* where, kernels::gated::form f, tensor_view<const T, R> q,
             tensor_view<const T, R> k, tensor_view<const T, R> v, tensor_view<const T, R - 1> g,
             tensor_view<T, R> o, tensor_view<T, 4> state, std::span<const index_t> cu) const {
    const checker check{where};
    constexpr bool one = R == 3;
    const front::qkvo_names n = names(one);
    const std::string_view g_name = one ? "g1" : "g";
    const auto d = front::check_qkvo<T, R>(check, n, q, k, v, o, state, cu, true);
    check.require(opt_.g_gamma.empty(), g_name,
                  "options::g_gamma is set: call the overload without g");
    front::head_shape<R>(check, g_name, g, d.B, d.TT, d.H);
    check.no_overlap({range_of(n.o, o), range_of(n.state, state)},
                     {range_of(n.q, q), range_of(n.k, k), range_of(n.v, v), range_of(g_name, g)});
    check_log_gates<T, R - 1>(check, g_name, g, opt_.allow_gate_growth, one ? "b, h" : "b, t, h");
    const auto p = make_problem(check, to4(q), to4(k), to4(v), to4(o), state, cu);
    tensor_view<const T, 3> g3;
    if constexpr (one) {
      g3 = kernels::gated::as_one_token(g);  // [B,H] -> [B,1,H]
    } else {
      g3 = g;
    }
    kernels::gated::run(f, p, kernels::gated::scalar_gate<T>{g3}, opt_.chunk_size,
                        opt_.switch_over_t.value_or(default_switch_over_t));
  }
  template <std::size_t R>
  void run_c(const char* where, kernels::gated::form f, tensor_view<const T, R> q,
             tensor_view<const T, R> k, tensor_view<const T, R> v, tensor_view<T, R> o,
             tensor_view<T, 4> state, std::span<const index_t> cu) const {
    const checker check{where};
    const front::qkvo_names n = names(R == 3);
    const auto d = front::check_qkvo<T, R>(check, n, q, k, v, o, state, cu, true);
    const tensor_view<const T, 1> gg = g_gamma_view();
    if (opt_.g_gamma.empty()) {
      check.fail("options.g_gamma", "is empty: set it ([H] constant log gates) or pass g");
    }
    check.shape("options.g_gamma", gg, {d.H});
    check.no_overlap({range_of(n.o, o), range_of(n.state, state)},
                     {range_of(n.q, q), range_of(n.k, k), range_of(n.v, v)});
    const auto p = make_problem(check, to4(q), to4(k), to4(v), to4(o), state, cu);
    kernels::gated::run(f, p, kernels::gated::constant_gate<T>{gg}, opt_.chunk_size,
                        opt_.switch_over_t.value_or(default_switch_over_t));
  }
  kernels::gated::problem<T> make_problem(const checker& check, tensor_view<const T, 4> q,
                                          tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                                          tensor_view<T, 4> o, tensor_view<T, 4> state,
                                          std::span<const index_t> cu) const {
    kernels::gated::problem<T> p{q, k, v, o, state, {}, T(1), cu};
    kernels::gated::validate(check, p, opt_.chunk_size);  // passes: the front checked it all
    p.scale = opt_.scale ? *opt_.scale : T(1) / std::sqrt(static_cast<T>(q.extent(3)));
    return p;
  }

  options opt_;
};

}  // namespace seqmix
