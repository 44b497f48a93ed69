// SPDX-License-Identifier: MIT
// RWKV-7 ("Goose") time mixing, the state update of fla's chunk_rwkv7, docs/math.md §3.
//
//     S_t = Diag(exp(w_t)) S_{t-1} + b_t (a_tᵀ S_{t-1}) + k_t v_tᵀ   (rank-one term reads S_{t-1}
//     o_t = S_tᵀ (s r_t)                                               before the decay)
//
// w_t [K] natural-log decay per head (<= 0, -inf allowed), s = 1 unless given (fla's layer).
// Layouts: r, k, w, a, b [B, T, H, K]; v, o [B, T, H, V]; state [B, H, K, V] (N rows packed).
// The layer builds a = -kk, b = kk ⊙ iclr with kk = l2norm(k ⊙ k_k), and w with rwkv7_gates.
// Cost per head (kernels/delta/dplr.hpp): recurrent / step 9·K·V FLOPs per token plus a vector
// exp of K, allocation-free; chunked (WY/UT with per-key decays) ≈ 2C(4K + 4V) + 8·K·V per
// token; forward runs the recurrent form. Checks: shapes with the numbers, w log gates, a and
// b finite, o and state disjoint from the inputs.
#pragma once

#include <cmath>
#include <optional>
#include <span>

#include <seqmix/mixers/detail/dplr_front.hpp>

namespace seqmix {

namespace detail {
template <class T>
struct rwkv7_options {
  std::optional<T> scale{};  ///< multiplies r; default 1
  index_t chunk_size = 64;   ///< chunk length C of forward_chunked
};
}  // namespace detail

/// RWKV-7 mixer over float or double.
template <class T>
class rwkv7 : public front::dplr_front<T, kernels::delta_rule::dplr::kind::rwkv7,
                                       detail::rwkv7_options<T>> {
  using base =
      front::dplr_front<T, kernels::delta_rule::dplr::kind::rwkv7, detail::rwkv7_options<T>>;
  using typename base::form;
  using c4 = typename base::template call<4>;
  using v4 = tensor_view<const T, 4>;
  using v3 = tensor_view<const T, 3>;

 public:
  using typename base::options;
  rwkv7() : base(options{}) {}
  explicit rwkv7(const options& opt) : base(opt) {}

  /// A zero state [B, H, K, V] (B = N for packed input).
  static tensor<T, 4> make_state(index_t B, index_t H, index_t K, index_t V) {
    return base::make_state_checked("rwkv7::make_state", B, H, K, V);
  }

  /// Chunked form. r, k, w, a, b [B,T,H,K]; v [B,T,H,V]; o [B,T,H,V] (out); state [B,H,K,V]
  /// S_0 in, S_T out. With cu_seqlens ([N+1], 0 ... T): B == 1, state [N,H,K,V].
  void forward_chunked(v4 r, v4 k, v4 v, v4 w, v4 a, v4 b, tensor_view<T, 4> o,
                       tensor_view<T, 4> state, std::span<const index_t> cu_seqlens = {}) const {
    this->run("rwkv7::forward_chunked", form::chunked,
              c4{r, k, v, w, {}, a, b, o, state, cu_seqlens});
  }
  /// Token-by-token form, same arguments. Allocates nothing.
  void forward_recurrent(v4 r, v4 k, v4 v, v4 w, v4 a, v4 b, tensor_view<T, 4> o,
                         tensor_view<T, 4> state, std::span<const index_t> cu_seqlens = {}) const {
    this->run("rwkv7::forward_recurrent", form::recurrent,
              c4{r, k, v, w, {}, a, b, o, state, cu_seqlens});
  }
  /// The faster form for the shape (the recurrent one on the measured machines).
  void forward(v4 r, v4 k, v4 v, v4 w, v4 a, v4 b, tensor_view<T, 4> o, tensor_view<T, 4> state,
               std::span<const index_t> cu_seqlens = {}) const {
    this->run("rwkv7::forward", form::automatic, c4{r, k, v, w, {}, a, b, o, state, cu_seqlens});
  }
  /// One token per sequence (decode): r, k, w, a, b [B,H,K]; v, o [B,H,V]; state in place.
  void step(v3 r, v3 k, v3 v, v3 w, v3 a, v3 b, tensor_view<T, 3> o,
            tensor_view<T, 4> state) const {
    this->run_step("rwkv7::step", {r, k, v, w, {}, a, b, o, state, {}});
  }
};

/// RWKV-7 decay helper (fla's layer): w = -exp(-1/2) · sigmoid(x), in (-0.61, 0) for every
/// finite x; a non-finite x is rejected with its index.
/// @param x [B, T, H, K] (in);  w [B, T, H, K] (out, must not overlap x)
template <class T>
void rwkv7_gates(tensor_view<const T, 4> x, tensor_view<T, 4> w) {
  const checker check{"rwkv7_gates"};
  check.extents("x", x);
  check.shape("w", w, {x.extent(0), x.extent(1), x.extent(2), x.extent(3)});
  check.distinct_elements("w", w);
  check.no_overlap({range_of("w", w)}, {range_of("x", x)});
  check.finite("x", x);
  const T c = static_cast<T>(std::exp(-0.5));
  for (index_t b = 0; b < x.extent(0); ++b)
    for (index_t t = 0; t < x.extent(1); ++t)
      for (index_t h = 0; h < x.extent(2); ++h)
        for (index_t i = 0; i < x.extent(3); ++i) w(b, t, h, i) = -c * math::sigmoid(x(b, t, h, i));
}

}  // namespace seqmix
