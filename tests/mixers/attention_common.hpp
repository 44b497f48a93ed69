// SPDX-License-Identifier: MIT
// Helpers shared by the softmax-attention tests: random problems, the double reference, and the
// three forms (chunked, recurrent through step, prefill + steps) run on float copies.
#pragma once

#include <optional>
#include <random>
#include <span>
#include <vector>

#include <seqmix/mixers/kv_cache.hpp>
#include <seqmix/mixers/sliding_window_attention.hpp>
#include <seqmix/mixers/softmax_attention.hpp>
#include <seqmix/reference/attention.hpp>

#include "testing.hpp"

namespace seqmix::testing::attn {

struct problem {
  index_t B = 1, T = 1, H = 1, Hkv = 1, K = 16, V = 16;
};

/// q, k, v in double (standard normal, keys and queries scaled by `qk_scale`).
struct inputs {
  tensor<double, 4> q, k, v;
};
inline inputs make_inputs(const problem& p, std::mt19937_64& rng, double qk_scale = 1.0) {
  return {random_normal<double, 4>({p.B, p.T, p.H, p.K}, rng, qk_scale),
          random_normal<double, 4>({p.B, p.T, p.Hkv, p.K}, rng, qk_scale),
          random_normal<double, 4>({p.B, p.T, p.Hkv, p.V}, rng)};
}

/// Reference output (double) for a problem.
/// first_query: rows before it are left zero (not computed).
inline tensor<double, 4> reference_out(const inputs& in, std::optional<double> scale = {},
                                       index_t window = 0, std::span<const double> sink = {},
                                       index_t first_query = 0) {
  tensor<double, 4> o({in.q.extent(0), in.q.extent(1), in.q.extent(2), in.v.extent(3)});
  reference::softmax_attention<double>(in.q, in.k, in.v, o, scale, window, sink, first_query);
  return o;
}

/// The T tokens of t0 .. t0+n-1 of a [B,T,H,D] tensor, as a view.
template <class T>
tensor_view<const T, 4> tokens(const tensor<T, 4>& x, index_t t0, index_t n) {
  return x.view().template slice<1>(t0, t0 + n);
}
template <class T>
tensor_view<T, 4> tokens(tensor<T, 4>& x, index_t t0, index_t n) {
  return x.view().template slice<1>(t0, t0 + n);
}

}  // namespace seqmix::testing::attn
