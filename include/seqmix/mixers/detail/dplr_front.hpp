// SPDX-License-Identifier: MIT
// The front shared by seqmix::kda and seqmix::rwkv7 (kernels/delta/dplr.hpp): the argument
// checks with the names of the user's signature, the state factory, the scale and the dispatch
// of a call to a form. The two mixers only spell their signatures.
//
// Layouts: q (rwkv7: r), k [B,(T),H,K]; v, o [B,(T),HV,V]; g (rwkv7: w) [B,(T),HV,K];
// beta [B,(T),HV] (kda); a, b [B,(T),H,K] (rwkv7, HV == H); state [N,HV,K,V]. One-token
// entries (step) drop T. Cost of the checks: one pass over g (log gates) and beta or a, b
// (finite); nothing is allocated unless a check fails.
#pragma once

#include <cmath>
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include <seqmix/core/error.hpp>
#include <seqmix/core/gate_check.hpp>
#include <seqmix/core/simd.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/kernels/delta/dplr.hpp>
#include <seqmix/mixers/detail/front_checks.hpp>

namespace seqmix::front {

/// checker::finite with a vector fast path for contiguous views (a, b are as large as k, and
/// the element-wise search cost 15 % of a recurrent RWKV-7 call); a view with a non-finite
/// element, or a strided one, goes through checker::finite, which reports it.
template <class T, std::size_t R>
void check_finite_fast(const checker& check, std::string_view name,
                       const tensor_view<const T, R>& x) {
  if (x.empty()) return;
  if (x.is_contiguous()) {
    using B = simd::batch<T>;
    constexpr index_t L = simd::lanes<T>;
    const T* p = x.data();
    const index_t n = x.size();
    bool ok = true;
    index_t i = 0;
    for (; ok && i + L <= n; i += L) {
      const B v = simd::load(p + i);
      ok = xsimd::all((v - v) == B(T(0)));  // x - x is NaN for NaN and ±inf
    }
    for (; ok && i < n; ++i) ok = std::isfinite(p[i]);
    if (ok) return;
  }
  check.finite(name, x);
}

/// Base of kda<T> (Kd = kind::kda) and rwkv7<T>; Options has scale, chunk_size and (kda)
/// use_qk_l2norm. `default_scale_one`: scale defaults to 1 (rwkv7) instead of K^-1/2.
template <class T, kernels::delta_rule::dplr::kind Kd, class Options>
class dplr_front {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "kda<T> / rwkv7<T>: T is float or double");
  static constexpr bool is_kda = Kd == kernels::delta_rule::dplr::kind::kda;

 public:
  using value_type = T;
  using options = Options;

  explicit dplr_front(const Options& opt) : opt_(opt) {}

  const Options& config() const { return opt_; }

  /// The scale applied to q (r) for key width K.
  T scale_for(index_t K) const {
    if (opt_.scale) return *opt_.scale;
    return is_kda ? T(1) / std::sqrt(static_cast<T>(K)) : T(1);
  }

 protected:
  enum class form { chunked, recurrent, automatic };
  /// The arguments of one call (R = 4: sequence, R = 3: one token); unused views empty.
  template <std::size_t R>
  struct call {
    tensor_view<const T, R> q, k, v, g;
    tensor_view<const T, R - 1> beta;
    tensor_view<const T, R> a, b;
    tensor_view<T, R> o;
    tensor_view<T, 4> state;
    std::span<const index_t> cu{};
  };

  static tensor<T, 4> make_state_checked(const char* where, index_t B, index_t HV, index_t K,
                                         index_t V) {
    check_sizes(checker{where}, {"B", "HV", "K", "V"}, {B, HV, K, V});
    return tensor<T, 4>({B, HV, K, V});
  }

  /// The front's checks: shapes with the user's names, gates, finiteness, aliasing.
  template <std::size_t R>
  void check_call(const checker& check, const call<R>& c) const {
    if (opt_.scale) check.finite_value("options.scale", *opt_.scale);
    if (R == 4 && opt_.chunk_size <= 0)
      check.fail("options.chunk_size", "must be > 0, got " + std::to_string(opt_.chunk_size));
    const char* qn = is_kda ? "q" : "r";
    const char* gn = is_kda ? "g" : "w";
    const qkvo_dims d = check_qkvo<T, R>(check, {qn, "k", "v", "o", "state"}, c.q, c.k, c.v, c.o,
                                         c.state, c.cu, !is_kda);
    token_shape<R>(check, gn, c.g, d.B, d.TT, d.H, d.K);
    check.inner_contiguous(gn, c.g);
    const char* idx = R == 4 ? "b, t, h, k" : "b, h, k";
    if constexpr (is_kda) {
      head_shape<R>(check, "beta", c.beta, d.B, d.TT, d.H);
      check.no_overlap({range_of("o", c.o), range_of("state", c.state)},
                       {range_of("q", c.q), range_of("k", c.k), range_of("v", c.v),
                        range_of("g", c.g), range_of("beta", c.beta)});
      check_log_gates<T, R>(check, "g", c.g, false, idx);
      check.finite("beta", c.beta);
    } else {
      token_shape<R>(check, "a", c.a, d.B, d.TT, d.H, d.K);
      token_shape<R>(check, "b", c.b, d.B, d.TT, d.H, d.K);
      check.inner_contiguous("a", c.a);
      check.inner_contiguous("b", c.b);
      check.no_overlap({range_of("o", c.o), range_of("state", c.state)},
                       {range_of("r", c.q), range_of("k", c.k), range_of("v", c.v),
                        range_of("w", c.g), range_of("a", c.a), range_of("b", c.b)});
      check_log_gates<T, R>(check, "w", c.g, false, idx);
      check_finite_fast<T, R>(check, "a", c.a);
      check_finite_fast<T, R>(check, "b", c.b);
    }
  }

  kernels::delta_rule::dplr::problem<T> make_problem(const call<4>& c) const {
    kernels::delta_rule::dplr::problem<T> p;
    p.kd = Kd;
    p.q = c.q, p.k = c.k, p.v = c.v, p.g = c.g, p.beta = c.beta, p.a = c.a, p.b = c.b;
    p.o = c.o, p.state = c.state;
    p.scale = scale_for(c.q.extent(3));
    if constexpr (is_kda) p.l2norm = opt_.use_qk_l2norm;
    p.cu_seqlens = c.cu;
    return p;
  }

  /// Validates a whole-sequence call and runs it in form f (automatic: prefer_chunked).
  void run(const char* where, form f, const call<4>& c) const {
    namespace dr = kernels::delta_rule;
    const checker check{where};
    check_call<4>(check, c);
    const auto p = make_problem(c);
    dr::dplr::validate(check, p, opt_.chunk_size);
    if (f == form::automatic) {
      f = dr::prefer_chunked(c.q.extent(1) / std::max<index_t>(1, p.sequences()), c.q.extent(3),
                             c.v.extent(3))
              ? form::chunked
              : form::recurrent;
    }
    if (f == form::chunked) {
      dr::dplr::run_chunked(p, opt_.chunk_size);
    } else {
      dr::dplr::run_recurrent(p);
    }
  }

  /// One token per sequence, allocation-free.
  void run_step(const char* where, const call<3>& c) const {
    namespace dr = kernels::delta_rule;
    const checker check{where};
    check_call<3>(check, c);
    call<4> c4{dr::as_one_token(c.q),
               dr::as_one_token(c.k),
               dr::as_one_token(c.v),
               dr::as_one_token(c.g),
               is_kda ? dr::as_one_token(c.beta) : tensor_view<const T, 3>(),
               is_kda ? tensor_view<const T, 4>() : dr::as_one_token(c.a),
               is_kda ? tensor_view<const T, 4>() : dr::as_one_token(c.b),
               dr::as_one_token(c.o),
               c.state,
               {}};
    dr::dplr::run_recurrent(make_problem(c4));
  }

  Options opt_;
};

}  // namespace seqmix::front
