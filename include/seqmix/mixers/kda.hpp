// SPDX-License-Identifier: MIT
// Kimi Delta Attention (KDA, Kimi-Linear): Gated DeltaNet with a per-key gate, docs/math.md §2.3.
//
//     S'_t = Diag(exp(g_t)) S_{t-1}             (decay first; g_t [K] natural-log gate per head)
//     u_t  = beta_t (v_t - S'_tᵀ k_t)            (the correction reads the decayed state)
//     S_t  = S'_t + k_t u_tᵀ
//     o_t  = S_tᵀ (s q_t)                         (s = K^-1/2 unless given)
//
// Layouts: q, k [B, T, H, K]; v, o [B, T, HV, V] (GVA: HV % H == 0, value head hv reads q/k
// head hv / (HV / H)); g [B, T, HV, K]; beta [B, T, HV]; state [B, HV, K, V] (N rows packed).
// Cost per value head (kernels/delta/dplr.hpp): recurrent / step 7·K·V FLOPs per token plus a
// vector exp of K, allocation-free; chunked (WY/UT, per-key decays, exact 16-token diagonal
// blocks) ≈ 2C(3K + 2V) + 6·K·V per token, O(C·(K+V) + C² + K·V) memory per thread; forward
// runs the recurrent form. Checks: shapes with the numbers, g log gates (<= 0 or -inf; NaN or
// > 0 rejected with its index), beta finite, o and state disjoint from the inputs.
#pragma once

#include <optional>
#include <span>

#include <seqmix/mixers/detail/dplr_front.hpp>

namespace seqmix {

namespace detail {
template <class T>
struct kda_options {
  std::optional<T> scale{};    ///< multiplies q; default K^-1/2
  bool use_qk_l2norm = false;  ///< q, k -> x / sqrt(Σx² + 1e-6) before scaling
  index_t chunk_size = 64;     ///< chunk length C of forward_chunked
};
}  // namespace detail

/// KDA mixer over float or double.
template <class T>
class kda
    : public front::dplr_front<T, kernels::delta_rule::dplr::kind::kda, detail::kda_options<T>> {
  using base = front::dplr_front<T, kernels::delta_rule::dplr::kind::kda, detail::kda_options<T>>;
  using typename base::form;
  using c4 = typename base::template call<4>;
  using v4 = tensor_view<const T, 4>;
  using v3 = tensor_view<const T, 3>;

 public:
  using typename base::options;
  kda() : base(options{}) {}
  explicit kda(const options& opt) : base(opt) {}

  /// A zero state [B, HV, K, V] (B = N for packed input).
  static tensor<T, 4> make_state(index_t B, index_t HV, index_t K, index_t V) {
    return base::make_state_checked("kda::make_state", B, HV, K, V);
  }

  /// Chunked form. q, k [B,T,H,K]; v [B,T,HV,V]; g [B,T,HV,K] log gates (<= 0 or -inf);
  /// beta [B,T,HV]; o [B,T,HV,V] (out); state [B,HV,K,V] S_0 in, S_T out. With cu_seqlens
  /// ([N+1], 0 ... T): B == 1, packed sequences, state [N,HV,K,V].
  void forward_chunked(v4 q, v4 k, v4 v, v4 g, v3 beta, tensor_view<T, 4> o,
                       tensor_view<T, 4> state, std::span<const index_t> cu_seqlens = {}) const {
    this->run("kda::forward_chunked", form::chunked,
              c4{q, k, v, g, beta, {}, {}, o, state, cu_seqlens});
  }
  /// Token-by-token form, same arguments. Allocates nothing.
  void forward_recurrent(v4 q, v4 k, v4 v, v4 g, v3 beta, tensor_view<T, 4> o,
                         tensor_view<T, 4> state, std::span<const index_t> cu_seqlens = {}) const {
    this->run("kda::forward_recurrent", form::recurrent,
              c4{q, k, v, g, beta, {}, {}, o, state, cu_seqlens});
  }
  /// The faster form for the shape (the recurrent one on the measured machines).
  void forward(v4 q, v4 k, v4 v, v4 g, v3 beta, tensor_view<T, 4> o, tensor_view<T, 4> state,
               std::span<const index_t> cu_seqlens = {}) const {
    this->run("kda::forward", form::automatic, c4{q, k, v, g, beta, {}, {}, o, state, cu_seqlens});
  }
  /// One token per sequence (decode): q, k [B,H,K]; v [B,HV,V]; g [B,HV,K]; beta [B,HV];
  /// o [B,HV,V]; state updated in place. Allocates nothing.
  void step(v3 q, v3 k, v3 v, v3 g, tensor_view<const T, 2> beta, tensor_view<T, 3> o,
            tensor_view<T, 4> state) const {
    this->run_step("kda::step", {q, k, v, g, beta, {}, {}, o, state, {}});
  }
};

/// KDA gate helper (Kimi-Linear): g = -exp(A_log_h) · softplus(g_raw + dt_bias_{h,c}), finite
/// for every finite input (kernels::delta_rule::gate_value); non-finite inputs are rejected.
/// @param g_raw [B, T, HV, K] (in);  A_log [HV] (in);  dt_bias [HV·K] (in);  g [B, T, HV, K] (out)
template <class T>
void kda_gates(tensor_view<const T, 4> g_raw, tensor_view<const T, 1> A_log,
               tensor_view<const T, 1> dt_bias, tensor_view<T, 4> g) {
  const checker check{"kda_gates"};
  check.extents("g_raw", g_raw);
  const index_t B = g_raw.extent(0), TT = g_raw.extent(1), HV = g_raw.extent(2),
                K = g_raw.extent(3);
  check.shape("A_log", A_log, {HV});
  check.shape("dt_bias", dt_bias, {HV * K});
  check.shape("g", g, {B, TT, HV, K});
  check.distinct_elements("g", g);
  check.no_overlap({range_of("g", g)}, {range_of("g_raw", g_raw), range_of("A_log", A_log),
                                        range_of("dt_bias", dt_bias)});
  check.finite("g_raw", g_raw);
  check.finite("A_log", A_log);
  check.finite("dt_bias", dt_bias);
  for (index_t b = 0; b < B; ++b)
    for (index_t t = 0; t < TT; ++t)
      for (index_t h = 0; h < HV; ++h)
        for (index_t c = 0; c < K; ++c)
          g(b, t, h, c) =
              kernels::delta_rule::gate_value(g_raw(b, t, h, c), A_log(h), dt_bias(h * K + c));
}

}  // namespace seqmix
