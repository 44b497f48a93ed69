// SPDX-License-Identifier: MIT
// Mamba2's state-space dual (SSD) scan: simple GLA with q = C, k = B, v = dt·x, g = dt·A,
// scale 1, plus the D skip (docs/math.md §4). A thin front over kernels/gated_accumulation.hpp with
// its own gate policy (dt computed on the fly, so `step` allocates nothing).
//
//   dt_t = clamp(softplus(dt_raw_t + dt_bias_h), dt_min, dt_max)      (softplus optional)
//   A_h  = -exp(A_log_h)
//   S_t  = exp(dt_t A_h) S_{t-1} + B_t (dt_t x_t)ᵀ                     S: [N, P]
//   y_t  = S_tᵀ C_t + D_h x_t
//
// State layout: seqmix returns [B,H,N,P] (fla's [K,V] layout). mamba's reference
// implementations use [B,H,P,N]: convert with mamba2_state_to_pn / mamba2_state_from_pn.
//
// Dimensions: B batch, T tokens, H heads, P head dim, G groups of B/C (head h uses group
// h / (H/G)), N state size, C chunk (default 64). Cost per (sequence, head) and token:
// recurrent 5·N·P FLOP, no extra memory; chunked 2C(N+P) + 4NP FLOP, O(C·(C+N+P) + N·P) scratch
// per thread.
//
// Checks (every entry, step included, before the engine runs): messages name Mamba2's own
// arguments (x, dt, Bm, Cm, y; x1, dt1, B1, C1, y1 for step, with their step shapes), never the
// engine's q/k/v/o roles; dt, A_log, D and dt_bias must be finite (the first bad element is
// reported with its index); options: chunk_size > 0, 0 <= dt_min <= dt_max, dt_min finite,
// dt_max not NaN (+inf: no upper clamp), checked when the mixer is built. The log gate dt·A is
// <= 0 by construction (A = -exp(A_log) < 0, dt >= dt_min >= 0), so no gate-growth check
// applies. y and state must not share memory with any input or with each other (y = x in
// place is not supported: rejected).
#pragma once

#include <cmath>
#include <limits>
#include <optional>
#include <span>

#include <seqmix/core/error.hpp>
#include <seqmix/core/simd.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/kernels/gated_accumulation.hpp>
#include <seqmix/mixers/detail/front_checks.hpp>

namespace seqmix {

/// [B,H,N,P] (seqmix) -> [B,H,P,N] (mamba's ssd_minimal / mamba_chunk_scan_combined).
template <class T>
tensor<T, 4> mamba2_state_to_pn(tensor_view<const T, 4> s) {
  tensor<T, 4> out({s.extent(0), s.extent(1), s.extent(3), s.extent(2)});
  for (index_t b = 0; b < s.extent(0); ++b)
    for (index_t h = 0; h < s.extent(1); ++h)
      for (index_t n = 0; n < s.extent(2); ++n)
        for (index_t p = 0; p < s.extent(3); ++p) out(b, h, p, n) = s(b, h, n, p);
  return out;
}
/// [B,H,P,N] (mamba) -> [B,H,N,P] (seqmix).
template <class T>
tensor<T, 4> mamba2_state_from_pn(tensor_view<const T, 4> s) {
  return mamba2_state_to_pn<T>(s);  // the transpose of the last two dimensions is an involution
}

namespace kernels::gated {
/// Mamba2's gate policy: dt from the raw input on the fly; log gate dt·A, key scale dt.
template <class T>
struct mamba2_gate {
  static constexpr bool has_gate = true, per_key = false, scales_k = true;
  tensor_view<const T, 3> dt;       // [B,T,H] raw
  tensor_view<const T, 1> dt_bias;  // [H] or empty
  tensor_view<const T, 1> A_log;    // [H]
  bool softplus = true;
  T dt_min = T(0), dt_max = std::numeric_limits<T>::infinity();

  T delta(index_t b, index_t t, index_t h) const {
    T x = dt(b, t, h) + (dt_bias.data() ? dt_bias(h) : T(0));
    if (softplus) x = math::softplus(x);
    return std::min(std::max(x, dt_min), dt_max);
  }
  T log_gate(index_t b, index_t t, index_t h) const {
    const T d = delta(b, t, h);
    return d == T(0) ? T(0) : -std::exp(A_log(h)) * d;  // 0·inf would be NaN
  }
  T k_scale(index_t b, index_t t, index_t h) const { return delta(b, t, h); }
  bool has_value_gate() const { return false; }
};
}  // namespace kernels::gated

/// Mamba2 SSD scan.
template <class T>
class mamba2_ssd {
 public:
  struct options {
    index_t chunk_size = 64;  ///< chunk length of forward_chunked
    /// forward() takes the chunked form from this many tokens per sequence (mean over the
    /// packed sequences), the recurrent form below; empty: default_switch_over_t.
    std::optional<index_t> switch_over_t{};
    bool dt_softplus = true;                        ///< dt = softplus(dt_raw + dt_bias)
    T dt_min = T(0);                                ///< clamp of dt (after softplus)
    T dt_max = std::numeric_limits<T>::infinity();  ///< clamp of dt
  };
  /// forward()'s switch-over without options::switch_over_t (kernels::gated says why).
  static constexpr index_t default_switch_over_t = kernels::gated::default_switch_over_t;

  mamba2_ssd() = default;
  explicit mamba2_ssd(options opt) : opt_(opt) {
    const checker check{"mamba2_ssd"};
    if (opt_.chunk_size <= 0) {
      check.fail("options.chunk_size", "must be > 0, got " + std::to_string(opt_.chunk_size));
    }
    if (!std::isfinite(opt_.dt_min) || opt_.dt_min < T(0)) {
      check.fail("options.dt_min",
                 "must be finite and >= 0, got " + detail::format_value(opt_.dt_min));
    }
    if (std::isnan(opt_.dt_max) || opt_.dt_max < opt_.dt_min) {
      check.fail("options.dt_max", "must be >= options.dt_min (" +
                                       detail::format_value(opt_.dt_min) + ") or +inf, got " +
                                       detail::format_value(opt_.dt_max));
    }
    if (opt_.switch_over_t && *opt_.switch_over_t < 0) {
      check.fail("options.switch_over_t",
                 "must be >= 0, got " + std::to_string(*opt_.switch_over_t));
    }
  }
  const options& get_options() const { return opt_; }

  /// A zero state [B,H,N,P] (layout N, P: see mamba2_state_to_pn).
  static tensor<T, 4> make_state(index_t B, index_t H, index_t N, index_t P) {
    front::check_sizes(checker{"mamba2_ssd::make_state"}, {"B", "H", "N", "P"}, {B, H, N, P});
    return tensor<T, 4>({B, H, N, P});
  }

  /// Chunked form. x: [B,T,H,P]; dt: [B,T,H] raw; A_log: [H]; Bm, Cm: [B,T,G,N]; D: [H] or
  /// empty; dt_bias: [H] or empty; y: [B,T,H,P] out; state: [B,H,N,P] (or [Nseq,H,N,P] with
  /// cu_seqlens, B == 1) in/out.
  void forward_chunked(tensor_view<const T, 4> x, tensor_view<const T, 3> dt,
                       tensor_view<const T, 1> A_log, tensor_view<const T, 4> Bm,
                       tensor_view<const T, 4> Cm, tensor_view<const T, 1> D,
                       tensor_view<const T, 1> dt_bias, tensor_view<T, 4> y,
                       tensor_view<T, 4> state, std::span<const index_t> cu_seqlens = {}) const {
    run<4>("mamba2_ssd::forward_chunked", kernels::gated::form::chunked, x, dt, A_log, Bm, Cm, D,
           dt_bias, y, state, cu_seqlens);
  }
  /// Recurrent form; arguments as forward_chunked.
  void forward_recurrent(tensor_view<const T, 4> x, tensor_view<const T, 3> dt,
                         tensor_view<const T, 1> A_log, tensor_view<const T, 4> Bm,
                         tensor_view<const T, 4> Cm, tensor_view<const T, 1> D,
                         tensor_view<const T, 1> dt_bias, tensor_view<T, 4> y,
                         tensor_view<T, 4> state, std::span<const index_t> cu_seqlens = {}) const {
    run<4>("mamba2_ssd::forward_recurrent", kernels::gated::form::recurrent, x, dt, A_log, Bm, Cm,
           D, dt_bias, y, state, cu_seqlens);
  }
  /// The faster form for this shape.
  void forward(tensor_view<const T, 4> x, tensor_view<const T, 3> dt, tensor_view<const T, 1> A_log,
               tensor_view<const T, 4> Bm, tensor_view<const T, 4> Cm, tensor_view<const T, 1> D,
               tensor_view<const T, 1> dt_bias, tensor_view<T, 4> y, tensor_view<T, 4> state,
               std::span<const index_t> cu_seqlens = {}) const {
    run<4>("mamba2_ssd::forward", kernels::gated::form::automatic, x, dt, A_log, Bm, Cm, D, dt_bias,
           y, state, cu_seqlens);
  }
  /// One token per sequence, allocates nothing. x1, y1: [B,H,P]; dt1: [B,H]; B1, C1: [B,G,N].
  void step(tensor_view<const T, 3> x1, tensor_view<const T, 2> dt1, tensor_view<const T, 1> A_log,
            tensor_view<const T, 3> B1, tensor_view<const T, 3> C1, tensor_view<const T, 1> D,
            tensor_view<const T, 1> dt_bias, tensor_view<T, 3> y1, tensor_view<T, 4> state) const {
    run<3>("mamba2_ssd::step", kernels::gated::form::recurrent, x1, dt1, A_log, B1, C1, D, dt_bias,
           y1, state, {});
  }

 private:
  template <class U, std::size_t R>
  static tensor_view<U, R + 1> one_token(const tensor_view<U, R>& x) {
    return kernels::gated::as_one_token(x);
  }
  template <std::size_t R>
  void run(const char* where, kernels::gated::form f, tensor_view<const T, R> x,
           tensor_view<const T, R - 1> dt, tensor_view<const T, 1> A_log,
           tensor_view<const T, R> Bm, tensor_view<const T, R> Cm, tensor_view<const T, 1> D,
           tensor_view<const T, 1> dt_bias, tensor_view<T, R> y, tensor_view<T, 4> state,
           std::span<const index_t> cu) const {
    const checker check{where};
    constexpr bool one = R == 3;  // step: x1 [B,H,P], dt1 [B,H], B1/C1 [B,G,N], y1 [B,H,P]
    const std::string_view xn = one ? "x1" : "x", dtn = one ? "dt1" : "dt", bn = one ? "B1" : "Bm",
                           cn = one ? "C1" : "Cm", yn = one ? "y1" : "y";
    check.nonempty(xn, x);
    const index_t B = x.extent(0), TT = one ? 1 : x.extent(1), H = x.extent(R - 2),
                  P = x.extent(R - 1);
    check.nonempty(bn, Bm);
    front::token_shape<R>(check, bn, Bm, B, TT, any_extent, any_extent);
    const index_t G = Bm.extent(R - 2), N = Bm.extent(R - 1);
    if (H % G != 0) {
      check.fail(bn, "groups of " + std::string(bn) + " (" + std::to_string(G) +
                         ") must divide the heads of " + std::string(xn) + " (" +
                         std::to_string(H) + ")");
    }
    front::token_shape<R>(check, cn, Cm, B, TT, G, N);
    front::token_shape<R>(check, yn, y, B, TT, H, P);
    front::head_shape<R>(check, dtn, dt, B, TT, H);
    const index_t Ns = cu.empty() ? B : check.cu_seqlens(cu, B, TT);
    check.shape("state", state, {Ns, H, N, P});
    check.shape("A_log", A_log, {H});
    if (D.data()) check.shape("D", D, {H});
    if (dt_bias.data()) check.shape("dt_bias", dt_bias, {H});
    check.inner_contiguous(xn, x);
    check.inner_contiguous(bn, Bm);
    check.inner_contiguous(cn, Cm);
    check.inner_contiguous(yn, y);
    check.inner_contiguous("state", state);
    check.distinct_elements(yn, y);
    check.distinct_elements("state", state);
    check.no_overlap(
        {range_of(yn, y), range_of("state", state)},
        {range_of(xn, x), range_of(dtn, dt), range_of("A_log", A_log), range_of(bn, Bm),
         range_of(cn, Cm), range_of("D", D), range_of("dt_bias", dt_bias)});
    check.finite(dtn, dt);
    check.finite("A_log", A_log);
    if (D.data()) check.finite("D", D);
    if (dt_bias.data()) check.finite("dt_bias", dt_bias);
    if constexpr (one) {
      run4(check, f, one_token(x), one_token(dt), A_log, one_token(Bm), one_token(Cm), D, dt_bias,
           one_token(y), state, cu);
    } else {
      run4(check, f, x, dt, A_log, Bm, Cm, D, dt_bias, y, state, cu);
    }
  }
  void run4(const checker& check, kernels::gated::form f, tensor_view<const T, 4> x,
            tensor_view<const T, 3> dt, tensor_view<const T, 1> A_log, tensor_view<const T, 4> Bm,
            tensor_view<const T, 4> Cm, tensor_view<const T, 1> D, tensor_view<const T, 1> dt_bias,
            tensor_view<T, 4> y, tensor_view<T, 4> state, std::span<const index_t> cu) const {
    // engine roles: q = C, k = B, v = x, o = y (Hk = G groups); validate passes (checked above)
    kernels::gated::problem<T> p{Cm, Bm, x, y, state, {}, T(1), cu};
    kernels::gated::validate(check, p, opt_.chunk_size);
    const index_t B = x.extent(0), TT = x.extent(1), H = x.extent(2);
    const kernels::gated::mamba2_gate<T> gate{dt,          dt_bias,    A_log, opt_.dt_softplus,
                                              opt_.dt_min, opt_.dt_max};
    kernels::gated::run(f, p, gate, opt_.chunk_size,
                        opt_.switch_over_t.value_or(default_switch_over_t));
    if (D.data()) {
      // the D skip: y += D_h x, rows of P
      const index_t P = x.extent(3);
      parallel_for(B * TT, [&](index_t bt) {
        const index_t b = bt / TT, t = bt % TT;
        for (index_t h = 0; h < H; ++h)
          simd::axpy(y.ptr({b, t, h, 0}), D(h), x.ptr({b, t, h, 0}), P);
      });
    }
  }

  options opt_;
};

}  // namespace seqmix
