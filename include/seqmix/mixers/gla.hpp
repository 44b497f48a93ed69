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
#pragma once

#include <cmath>
#include <limits>
#include <optional>
#include <span>

#include <seqmix/core/error.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/kernels/gated_accumulation.hpp>

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
  };
  /// forward()'s switch-over without options::switch_over_t (kernels::gated says why).
  static constexpr index_t default_switch_over_t = kernels::gated::default_switch_over_t;

  gla() = default;
  explicit gla(options opt) : opt_(opt) {}
  const options& get_options() const { return opt_; }

  /// A zero state [B,H,K,V].
  static tensor<T, 4> make_state(index_t B, index_t H, index_t K, index_t V) {
    return tensor<T, 4>({B, H, K, V});
  }

  /// Chunked form. q, k: [B,T,H,K] in; v: [B,T,H,V] in; gk: [B,T,H,K] log gates in;
  /// o: [B,T,H,V] out; state: [B,H,K,V] (or [N,H,K,V] with cu_seqlens [N+1], B == 1) in/out.
  void forward_chunked(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                       tensor_view<const T, 4> v, tensor_view<const T, 4> gk, tensor_view<T, 4> o,
                       tensor_view<T, 4> state, std::span<const index_t> cu_seqlens = {}) const {
    run("gla::forward_chunked", kernels::gated::form::chunked, q, k, v, gk, {}, o, state,
        cu_seqlens);
  }
  /// Recurrent form; arguments as forward_chunked.
  void forward_recurrent(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                         tensor_view<const T, 4> v, tensor_view<const T, 4> gk, tensor_view<T, 4> o,
                         tensor_view<T, 4> state, std::span<const index_t> cu_seqlens = {}) const {
    run("gla::forward_recurrent", kernels::gated::form::recurrent, q, k, v, gk, {}, o, state,
        cu_seqlens);
  }
  /// The faster form for this shape.
  void forward(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
               tensor_view<const T, 4> gk, tensor_view<T, 4> o, tensor_view<T, 4> state,
               std::span<const index_t> cu_seqlens = {}) const {
    run("gla::forward", kernels::gated::form::automatic, q, k, v, gk, {}, o, state, cu_seqlens);
  }
  /// One token per sequence, allocates nothing. q1, k1, gk1: [B,H,K]; v1, o1: [B,H,V].
  void step(tensor_view<const T, 3> q1, tensor_view<const T, 3> k1, tensor_view<const T, 3> v1,
            tensor_view<const T, 3> gk1, tensor_view<T, 3> o1, tensor_view<T, 4> state) const {
    using kernels::gated::as_one_token;
    run("gla::step", kernels::gated::form::recurrent, as_one_token(q1), as_one_token(k1),
        as_one_token(v1), as_one_token(gk1), {}, as_one_token(o1), state, {});
  }

  /// With a per-value gate gv: [B,T,H,V] (step: [B,H,V]).
  void forward_chunked(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                       tensor_view<const T, 4> v, tensor_view<const T, 4> gk,
                       tensor_view<const T, 4> gv, tensor_view<T, 4> o, tensor_view<T, 4> state,
                       std::span<const index_t> cu_seqlens = {}) const {
    run("gla::forward_chunked", kernels::gated::form::chunked, q, k, v, gk, require_gv(gv), o,
        state, cu_seqlens);
  }
  void forward_recurrent(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                         tensor_view<const T, 4> v, tensor_view<const T, 4> gk,
                         tensor_view<const T, 4> gv, tensor_view<T, 4> o, tensor_view<T, 4> state,
                         std::span<const index_t> cu_seqlens = {}) const {
    run("gla::forward_recurrent", kernels::gated::form::recurrent, q, k, v, gk, require_gv(gv), o,
        state, cu_seqlens);
  }
  void forward(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
               tensor_view<const T, 4> gk, tensor_view<const T, 4> gv, tensor_view<T, 4> o,
               tensor_view<T, 4> state, std::span<const index_t> cu_seqlens = {}) const {
    run("gla::forward", kernels::gated::form::automatic, q, k, v, gk, require_gv(gv), o, state,
        cu_seqlens);
  }
  void step(tensor_view<const T, 3> q1, tensor_view<const T, 3> k1, tensor_view<const T, 3> v1,
            tensor_view<const T, 3> gk1, tensor_view<const T, 3> gv1, tensor_view<T, 3> o1,
            tensor_view<T, 4> state) const {
    using kernels::gated::as_one_token;
    run("gla::step", kernels::gated::form::recurrent, as_one_token(q1), as_one_token(k1),
        as_one_token(v1), as_one_token(gk1), require_gv(as_one_token(gv1)), as_one_token(o1), state,
        {});
  }

 private:
  static tensor_view<const T, 4> require_gv(tensor_view<const T, 4> gv) {
    checker{"gla"}.nonempty("gv", gv);
    return gv;
  }
  void run(const char* where, kernels::gated::form f, tensor_view<const T, 4> q,
           tensor_view<const T, 4> k, tensor_view<const T, 4> v, tensor_view<const T, 4> gk,
           tensor_view<const T, 4> gv, tensor_view<T, 4> o, tensor_view<T, 4> state,
           std::span<const index_t> cu) const {
    const checker check{where};
    kernels::gated::problem<T> p{q, k, v, o, state, {}, T(1), cu};
    kernels::gated::validate(check, p, opt_.chunk_size);
    check.require(v.extent(2) == q.extent(2), "v", "must have the heads of q");
    check.shape("gk", gk, {q.extent(0), q.extent(1), q.extent(2), q.extent(3)});
    check.inner_contiguous("gk", gk);
    kernels::gated::check_log_gate<T>(check, "gk", gk);
    if (gv.data()) {
      check.shape("gv", gv, {v.extent(0), v.extent(1), v.extent(2), v.extent(3)});
      check.inner_contiguous("gv", gv);
      kernels::gated::check_log_gate<T>(check, "gv", gv);
    }
    p.scale = opt_.scale ? *opt_.scale : T(1) / std::sqrt(static_cast<T>(q.extent(3)));
    kernels::gated::run(f, p, kernels::gated::key_gate<T>{gk, gv}, opt_.chunk_size,
                        opt_.switch_over_t.value_or(default_switch_over_t));
  }

  options opt_;
};

}  // namespace seqmix
