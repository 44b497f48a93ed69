// SPDX-License-Identifier: MIT
// Argument checks shared by the mixer fronts, run before a call is handed to an engine so that
// a message names the argument as it appears in the signature the user called (q1 of a step,
// x of Mamba2) with the rank the user passed ([B, H, K] for a step, not the engine's
// [B, 1, H, K] view), and gives the numbers.
//
// The layout every recurrent mixer shares: q, k [B, T, Hk, K]; v, o [B, T, H, V] with H a
// multiple of Hk; state [N, H, K, V] (N = B, or the number of packed sequences). One-token
// entries (step) drop the T dimension. Cost O(rank) per argument, no allocation unless a check
// fails (step must not allocate).
#pragma once

#include <array>
#include <cstddef>
#include <initializer_list>
#include <span>
#include <string>
#include <string_view>

#include <seqmix/core/error.hpp>
#include <seqmix/core/gate_check.hpp>
#include <seqmix/core/tensor.hpp>

namespace seqmix::front {

/// The names of the shared arguments in the user's signature.
struct qkvo_names {
  std::string_view q, k, v, o, state;
};

/// Sizes read off a checked call.
struct qkvo_dims {
  index_t B, TT, Hk, H, K, V, N;
};

/// Shape [B, T, h, d] (R == 4) or [B, h, d] (R == 3) of a token-major argument.
template <std::size_t R, class View>
void token_shape(const checker& check, std::string_view name, const View& view, index_t B,
                 index_t TT, index_t h, index_t d) {
  static_assert(R == 3 || R == 4);
  if constexpr (R == 4) {
    check.shape(name, view, {B, TT, h, d});
  } else {
    check.shape(name, view, {B, h, d});
  }
}

/// Shape [B, T, h] (R == 4) or [B, h] (R == 3) of a per-head argument (gates, beta, dt).
template <std::size_t R, class View>
void head_shape(const checker& check, std::string_view name, const View& view, index_t B,
                index_t TT, index_t h) {
  if constexpr (R == 4) {
    check.shape(name, view, {B, TT, h});
  } else {
    check.shape(name, view, {B, h});
  }
}

/// q, k: [B,(T),Hk,K]; v, o: [B,(T),H,V] with H % Hk == 0 (H == Hk when `same_heads`);
/// state [N,H,K,V]; cu_seqlens (sequence form only) gives N. Rows must be contiguous; o and
/// state must not overlap themselves (checker::distinct_elements).
template <class T, std::size_t R>
qkvo_dims check_qkvo(const checker& check, const qkvo_names& n, const tensor_view<const T, R>& q,
                     const tensor_view<const T, R>& k, const tensor_view<const T, R>& v,
                     const tensor_view<T, R>& o, const tensor_view<T, 4>& state,
                     std::span<const index_t> cu, bool same_heads) {
  check.nonempty(n.q, q);
  qkvo_dims d{};
  d.B = q.extent(0);
  d.TT = R == 4 ? q.extent(1) : 1;
  d.Hk = q.extent(R - 2);
  d.K = q.extent(R - 1);
  token_shape<R>(check, n.k, k, d.B, d.TT, d.Hk, d.K);
  check.nonempty(n.v, v);
  if (same_heads) {
    token_shape<R>(check, n.v, v, d.B, d.TT, d.Hk, any_extent);
  } else {
    token_shape<R>(check, n.v, v, d.B, d.TT, any_extent, any_extent);
  }
  d.H = v.extent(R - 2);
  d.V = v.extent(R - 1);
  if (d.H % d.Hk != 0) {
    check.fail(n.v, "heads of " + std::string(n.v) + " (" + std::to_string(d.H) +
                        ") must be a multiple of the heads of " + std::string(n.q) + " (" +
                        std::to_string(d.Hk) + ")");
  }
  token_shape<R>(check, n.o, o, d.B, d.TT, d.H, d.V);
  d.N = cu.empty() ? d.B : check.cu_seqlens(cu, d.B, d.TT);
  check.shape(n.state, state, {d.N, d.H, d.K, d.V});
  check.inner_contiguous(n.q, q);
  check.inner_contiguous(n.k, k);
  check.inner_contiguous(n.v, v);
  check.inner_contiguous(n.o, o);
  check.inner_contiguous(n.state, state);
  check.distinct_elements(n.o, o);
  check.distinct_elements(n.state, state);
  return d;
}

/// options.chunk_size > 0, options.scale (when set) finite and options.switch_over_t (when the
/// mixer has one and it is set) >= 0, checked when a mixer is built.
template <class Options>
void check_common_options(const checker& check, const Options& opt) {
  if (opt.chunk_size <= 0) {
    check.fail("options.chunk_size", "must be > 0, got " + std::to_string(opt.chunk_size));
  }
  if (opt.scale) check.finite_value("options.scale", *opt.scale);
  if constexpr (requires { opt.switch_over_t; }) {
    if (opt.switch_over_t && *opt.switch_over_t < 0) {
      check.fail("options.switch_over_t",
                 "must be >= 0 (tokens per sequence), got " + std::to_string(*opt.switch_over_t));
    }
  }
}

/// Sizes of make_state / make_cache: each >= 1.
inline void check_sizes(const checker& check, std::initializer_list<std::string_view> names,
                        std::initializer_list<index_t> sizes) {
  auto name = names.begin();
  for (index_t s : sizes) {
    if (s < 1) check.fail(*name, "must be >= 1, got " + std::to_string(s));
    ++name;
  }
}

/// A delta-rule call (delta_net, gated_delta_net; R == 4 sequence forms, R == 3 step): q, k
/// [B,(T),H,K]; v, o [B,(T),HV,V]; g (gated), beta [B,(T),HV]; state [N,HV,K,V]; g are log
/// gates (<= 0 unless growth is allowed), beta finite; o and state disjoint from the inputs;
/// options.scale finite and (sequence forms) options.chunk_size > 0.
template <class T, std::size_t R, class Options>
void check_delta_call(const checker& check, const Options& opt, bool gated, bool allow_growth,
                      const tensor_view<const T, R>& q, const tensor_view<const T, R>& k,
                      const tensor_view<const T, R>& v, const tensor_view<const T, R - 1>& g,
                      const tensor_view<const T, R - 1>& beta, const tensor_view<T, R>& o,
                      const tensor_view<T, 4>& state, std::span<const index_t> cu) {
  if (opt.scale) check.finite_value("options.scale", *opt.scale);
  if (R == 4 && opt.chunk_size <= 0) {
    check.fail("options.chunk_size", "must be > 0, got " + std::to_string(opt.chunk_size));
  }
  const qkvo_names n{"q", "k", "v", "o", "state"};
  const qkvo_dims d = check_qkvo<T, R>(check, n, q, k, v, o, state, cu, false);
  if (gated) {
    check.nonempty("g", g);
    head_shape<R>(check, "g", g, d.B, d.TT, d.H);
  }
  head_shape<R>(check, "beta", beta, d.B, d.TT, d.H);
  check.no_overlap({range_of("o", o), range_of("state", state)},
                   {range_of("q", q), range_of("k", k), range_of("v", v), range_of("g", g),
                    range_of("beta", beta)});
  if (gated) check_log_gates<T, R - 1>(check, "g", g, allow_growth, R == 4 ? "b, t, hv" : "b, hv");
  check.finite("beta", beta);
}

/// Sizes of a checked attention call: q [B, T, H, K], k [B, T, Hkv, K], v [B, T, Hkv, V],
/// o [B, T, H, V] (Tn: the T of this call).
struct attention_dims {
  index_t B, Tn, H, Hkv, K, V;
};

/// The q/k/v/o checks every attention front (softmax, MoBA, NSA) runs, in the order a user
/// reads the signature; `heads(check, "k", H, Hkv)` is the front's own head-group check (GQA
/// divisibility, sinks).
template <class T, class HeadCheck>
attention_dims check_attention_qkvo(const checker& check, const tensor_view<const T, 4>& q,
                                    const tensor_view<const T, 4>& k,
                                    const tensor_view<const T, 4>& v, const tensor_view<T, 4>& o,
                                    HeadCheck&& heads) {
  check.nonempty("q", q);
  attention_dims d{q.extent(0), q.extent(1), q.extent(2), k.extent(2), q.extent(3), v.extent(3)};
  check.nonempty("k", k);
  check.shape("k", k, {d.B, d.Tn, any_extent, d.K});
  heads(check, "k", d.H, d.Hkv);
  check.nonempty("v", v);
  check.shape("v", v, {d.B, d.Tn, d.Hkv, any_extent});
  check.shape("o", o, {d.B, d.Tn, d.H, d.V});
  check.inner_contiguous("q", q);
  check.inner_contiguous("k", k);
  check.inner_contiguous("v", v);
  check.inner_contiguous("o", o);
  check.distinct_elements("o", o);
  return d;
}

/// The same checks on rank-3 tensors, one row per token: a decode step (q1 [B, H, K], k1
/// [B, Hkv, K], v1 [B, Hkv, V], o1 [B, H, V]) or MoBA's packed layout ([N, H, ·]). `names` are
/// the front's argument names (q, k, v, o order); the result's B is the leading extent, Tn 1.
template <class T, class HeadCheck>
attention_dims check_attention_qkvo3(const checker& check,
                                     const std::array<std::string_view, 4>& names,
                                     const tensor_view<const T, 3>& q,
                                     const tensor_view<const T, 3>& k,
                                     const tensor_view<const T, 3>& v, const tensor_view<T, 3>& o,
                                     HeadCheck&& heads) {
  check.nonempty(names[0], q);
  attention_dims d{q.extent(0), 1, q.extent(1), k.extent(1), q.extent(2), v.extent(2)};
  check.nonempty(names[1], k);
  check.shape(names[1], k, {d.B, any_extent, d.K});
  heads(check, names[1], d.H, d.Hkv);
  check.nonempty(names[2], v);
  check.shape(names[2], v, {d.B, d.Hkv, any_extent});
  check.shape(names[3], o, {d.B, d.H, d.V});
  check.inner_contiguous(names[0], q);
  check.inner_contiguous(names[1], k);
  check.inner_contiguous(names[2], v);
  check.inner_contiguous(names[3], o);
  check.distinct_elements(names[3], o);
  return d;
}

/// rows [B]: distinct cache rows in [0, capacity) (state indices of continuous batching).
inline void check_rows(const checker& check, std::span<const index_t> rows, index_t B,
                       index_t cache_rows) {
  if (static_cast<index_t>(rows.size()) != B) {
    check.fail("rows", "must hold one cache row per token (B = " + std::to_string(B) + "), got " +
                           std::to_string(rows.size()));
  }
  for (std::size_t i = 0; i < rows.size(); ++i) {
    if (rows[i] < 0 || rows[i] >= cache_rows) {
      check.fail("rows", "entry " + std::to_string(i) + " is " + std::to_string(rows[i]) +
                             ", expected a row in [0, " + std::to_string(cache_rows) + ")");
    }
    for (std::size_t j = 0; j < i; ++j) {
      if (rows[j] == rows[i]) {
        check.fail("rows", "entries " + std::to_string(j) + " and " + std::to_string(i) +
                               " are both row " + std::to_string(rows[i]) +
                               ": each row may be stepped once per call");
      }
    }
  }
}

}  // namespace seqmix::front
