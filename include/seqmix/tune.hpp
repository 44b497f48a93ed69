// SPDX-License-Identifier: MIT
// Measured form choice for the gated-accumulation mixers (linear attention, simple GLA /
// retention / Lightning, GLA, Mamba2 SSD).
//
// Both forms cost O(T) per sequence, so which one is faster is a property of the machine and
// the head shape more than of T: on the 2-core AVX-512 dev machine the recurrent form wins at
// every T (5·K·V FLOP per token at 60-70 % of peak against the chunked form's 2C(K+V) + 4KV at
// 50-65 %), on a 16-core Xeon the chunked form wins at K = V = 128 (docs/bench/README.md). The
// fronts' forward() therefore takes the recurrent form unless `options::switch_over_t` says
// otherwise, and measure_switch_over() is how a user finds the value for their machine:
//
//   seqmix::gla<float>::options opt;
//   opt.switch_over_t = seqmix::measure_switch_over<float>(seqmix::gate_kind::per_key, H, K, V);
//   seqmix::gla<float> mixer(opt);   // forward() now runs the measured faster form
//
// The measurement runs the engine itself (both forms, synthetic inputs, weak gates) at the
// calling thread count: about 0.5-2 s at H = 8, K = V = 128 on one core. It is never run
// implicitly: forward() depends only on its options, so results are reproducible.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <utility>
#include <vector>

#include <seqmix/core/error.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/kernels/gated_accumulation.hpp>

namespace seqmix {

/// The gate of a gated-accumulation mixer, which decides the chunked form's extra work.
enum class gate_kind {
  none,     ///< linear attention
  scalar,   ///< simple GLA, retention, Lightning, Mamba2 SSD (one decay per head and token)
  per_key,  ///< GLA (one decay per key channel)
};

namespace detail {

/// Deterministic uniform fill in [lo, hi) (a 64-bit LCG: no <random> state, same data everywhere).
template <class T, std::size_t R>
void fill_uniform(tensor_view<T, R> t, std::uint64_t seed, double lo, double hi) {
  std::uint64_t x = seed * 6364136223846793005ULL + 1442695040888963407ULL;
  t.for_each([&](T& v) {
    x = x * 6364136223846793005ULL + 1442695040888963407ULL;
    const double u = double(x >> 11) * (1.0 / 9007199254740992.0);
    v = static_cast<T>(lo + (hi - lo) * u);
  });
}

/// Best-of-`repeats` wall times of a() and b() in seconds, after one warm-up call of each. The
/// runs alternate (a, b, a, b, ...) so that a burst of load on a shared machine hits both.
template <class A, class B>
std::pair<double, double> best_times(A&& a, B&& b, int repeats) {
  a();
  b();
  auto timed = [](auto& f) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  double best_a = std::numeric_limits<double>::infinity(), best_b = best_a;
  for (int r = 0; r < repeats; ++r) {
    best_a = std::min(best_a, timed(a));
    best_b = std::min(best_b, timed(b));
  }
  return {best_a, best_b};
}

}  // namespace detail

/// Wall times of both forms at each sequence length of a measurement.
struct form_timings {
  std::vector<index_t> lengths;   ///< T, ascending
  std::vector<double> chunked;    ///< best time of forward_chunked at lengths[i], seconds
  std::vector<double> recurrent;  ///< best time of forward_recurrent at lengths[i], seconds

  /// The smallest T from which the chunked form is faster at that T and every longer T
  /// measured; the largest index_t when the recurrent form is faster at the longest T.
  index_t switch_over() const {
    index_t t = std::numeric_limits<index_t>::max();
    for (std::size_t i = lengths.size(); i-- > 0;) {
      if (!(chunked[i] < recurrent[i])) break;
      t = lengths[i];
    }
    return t;
  }
};

/// Times both forms of the gated-accumulation engine on this machine, at the calling thread
/// count: one sequence of H heads, key size K, value size V, chunk length `chunk_size`, at each
/// T of `lengths` (strictly increasing; default 256, 1024, 4096, 16384), best of `repeats` runs
/// after a warm-up, synthetic inputs with weak gates. Throws shape_error on bad arguments.
template <class T>
form_timings measure_forms(gate_kind kind, index_t H, index_t K, index_t V, index_t chunk_size = 64,
                           std::span<const index_t> lengths = std::span<const index_t>(),
                           int repeats = 3) {
  static constexpr index_t default_lengths[] = {256, 1024, 4096, 16384};
  if (lengths.empty()) lengths = default_lengths;
  const checker check{"measure_forms"};
  check.require(H > 0 && K > 0 && V > 0, "H, K, V", "must be > 0");
  check.require(chunk_size > 0, "chunk_size", "must be > 0");
  check.require(repeats > 0, "repeats", "must be > 0");
  for (std::size_t i = 0; i < lengths.size(); ++i) {
    check.require(lengths[i] > 0 && (i == 0 || lengths[i] > lengths[i - 1]), "lengths",
                  "must be positive and strictly increasing");
  }
  const index_t t_max = lengths.back();
  tensor<T, 4> q({1, t_max, H, K}), k({1, t_max, H, K}), v({1, t_max, H, V}), o({1, t_max, H, V});
  tensor<T, 4> state({1, H, K, V});
  detail::fill_uniform(q.view(), 1, -1.0, 1.0);
  detail::fill_uniform(k.view(), 2, -1.0, 1.0);
  detail::fill_uniform(v.view(), 3, -1.0, 1.0);
  // weak gates, as trained layers have them (GLA: logsigmoid(x)/16 is about -0.04)
  tensor<T, 4> gk(kind == gate_kind::per_key ? shape_t<4>{1, t_max, H, K} : shape_t<4>{0, 0, 0, 0});
  tensor<T, 3> g(kind == gate_kind::scalar ? shape_t<3>{1, t_max, H} : shape_t<3>{0, 0, 0});
  if (kind == gate_kind::per_key) detail::fill_uniform(gk.view(), 4, -0.08, 0.0);
  if (kind == gate_kind::scalar) detail::fill_uniform(g.view(), 5, -0.08, 0.0);

  form_timings out;
  for (const index_t TT : lengths) {
    const tensor<T, 4>& qc = q;  // const views for the engine's inputs
    const tensor<T, 4>& kc = k;
    const tensor<T, 4>& vc = v;
    kernels::gated::problem<T> p{qc.view().template slice<1>(0, TT),
                                 kc.view().template slice<1>(0, TT),
                                 vc.view().template slice<1>(0, TT),
                                 o.view().template slice<1>(0, TT),
                                 state.view(),
                                 {},
                                 T(1) / std::sqrt(static_cast<T>(K)),
                                 {}};
    auto run_form = [&](kernels::gated::form f) {
      state.fill(T(0));
      switch (kind) {
        case gate_kind::none:
          kernels::gated::run(f, p, kernels::gated::no_gate<T>{}, chunk_size, 0);
          break;
        case gate_kind::scalar:
          kernels::gated::run(
              f, p,
              kernels::gated::scalar_gate<T>{std::as_const(g).view().template slice<1>(0, TT)},
              chunk_size, 0);
          break;
        case gate_kind::per_key:
          kernels::gated::run(
              f, p,
              kernels::gated::key_gate<T>{std::as_const(gk).view().template slice<1>(0, TT),
                                          tensor_view<const T, 4>()},
              chunk_size, 0);
          break;
      }
    };
    auto chunked = [&] { run_form(kernels::gated::form::chunked); };
    auto recurrent = [&] { run_form(kernels::gated::form::recurrent); };
    const auto [tc, tr] = detail::best_times(chunked, recurrent, repeats);
    out.lengths.push_back(TT);
    out.chunked.push_back(tc);
    out.recurrent.push_back(tr);
  }
  return out;
}

/// The sequence length from which forward() should run the chunked form on this machine, for
/// `options::switch_over_t`: measure_forms(...).switch_over(), arguments as measure_forms. The
/// largest index_t (the fronts' default) means the recurrent form was faster at the longest T.
template <class T>
index_t measure_switch_over(gate_kind kind, index_t H, index_t K, index_t V,
                            index_t chunk_size = 64,
                            std::span<const index_t> lengths = std::span<const index_t>(),
                            int repeats = 3) {
  return measure_forms<T>(kind, H, K, V, chunk_size, lengths, repeats).switch_over();
}

}  // namespace seqmix
