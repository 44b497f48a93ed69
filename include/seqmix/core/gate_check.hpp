// SPDX-License-Identifier: MIT
// Validation of log gates (the decays of the gated and delta-rule mixers), vectorised so that it
// is cheap enough for a one-token `step`.
//
// A log gate g is the natural log of a decay a = exp(g) in (0, 1]: the state is multiplied by a
// each token. The rules:
//   - g <= 0 is valid; g = -inf means "forget everything" (a = 0) and stays allowed;
//   - g > 0 (growth, a > 1) is rejected by default: it is almost always a caller passing the
//     decay a itself instead of log a (alpha = 0.9 instead of log 0.9 = -0.105), which makes the
//     state grow as e^{0.9 t} and the outputs explode (o ~ -1.8e17 after a few hundred tokens)
//     without any error. Callers who do mean growth set the mixer's
//     `options::allow_gate_growth`;
//   - NaN is always rejected: a NaN gate poisons the state forever, and there is no decay it
//     could stand for (it is neither "keep" nor "forget"); +inf is always rejected (infinite
//     growth turns the state into inf/NaN at once).
// The message names the argument, the index (in the argument's own dimensions, e.g.
// [b, t, h, k]) and the value of the first offending gate in row-major order.
//
// Cost: one compare per element on SIMD vectors (!(g <= limit) catches NaN and values above the
// limit in one instruction; limit = 0, or the largest finite value with growth allowed), an
// early exit at the first bad vector; a GLA step at H = 8, K = 64 checks 512 floats (32 AVX-512
// vectors): 12 ns of CPU time against 2.6 µs for the step, 0.5 % (bench_gated's
// BM_gla_gate_check vs BM_gla_step, 2-core AVX-512 dev machine, loaded). Views whose rows are
// contiguous are scanned row by row; others element by element.
#pragma once

#include <cmath>
#include <cstddef>
#include <limits>
#include <string>
#include <string_view>

#include <seqmix/core/error.hpp>
#include <seqmix/core/simd.hpp>
#include <seqmix/core/tensor.hpp>

namespace seqmix {

/// Whether a mixer accepts log gates > 0 (constructor argument of gated_delta_net; gla and
/// simple_gla have options::allow_gate_growth).
enum class gate_growth { reject, allow };

namespace detail {

/// Index (within n) of the first x[i] that is not <= limit (NaN included), or -1.
template <class T>
inline index_t first_above(const T* x, index_t n, T limit) {
  using B = simd::batch<T>;
  constexpr index_t L = simd::lanes<T>;
  const B lim(limit);
  index_t i = 0;
  // four vectors per test: one branch per 4·L elements
  for (; i + 4 * L <= n; i += 4 * L) {
    const auto ok = (simd::load(x + i) <= lim) & (simd::load(x + i + L) <= lim) &
                    (simd::load(x + i + 2 * L) <= lim) & (simd::load(x + i + 3 * L) <= lim);
    if (!xsimd::all(ok)) break;
  }
  for (; i + L <= n; i += L) {
    if (!xsimd::all(simd::load(x + i) <= lim)) break;
  }
  for (; i < n; ++i) {
    if (!(x[i] <= limit)) return i;
  }
  return -1;
}

}  // namespace detail

/// Checks the log gates `g` (see the header comment): every element <= 0 or -inf, or, with
/// `allow_growth`, finite or -inf. `index_names` labels the dimensions in the message, e.g.
/// "b, t, h, k". Throws shape_error through `check`; allocates nothing unless it throws.
template <class T, std::size_t R>
void check_log_gates(const checker& check, std::string_view name, tensor_view<const T, R> g,
                     bool allow_growth, std::string_view index_names) {
  const T limit = allow_growth ? std::numeric_limits<T>::max() : T(0);
  if (g.empty() || g.data() == nullptr) return;
  index_t bad = -1;  // flat row-major index of the first bad element
  if (g.is_contiguous()) {
    bad = detail::first_above(g.data(), g.size(), limit);
  } else if (g.stride(R - 1) == 1 || g.extent(R - 1) == 1) {
    const index_t n = g.extent(R - 1), rows = g.size() / n;
    shape_t<R> idx{};
    for (index_t r = 0; r < rows && bad < 0; ++r) {
      index_t rest = r;
      for (std::size_t d = R - 1; d-- > 0;) {
        idx[d] = rest % g.extent(d);
        rest /= g.extent(d);
      }
      idx[R - 1] = 0;
      const index_t j = detail::first_above(g.ptr(idx), n, limit);
      if (j >= 0) bad = r * n + j;
    }
  } else {
    bad = detail::find_first(g, [&](T x) { return !(x <= limit); });
  }
  if (bad < 0) return;
  const std::string where = checker::value_at(g, bad);
  // value_at prints "<value> at [i, j, ...]"; name the dimensions too
  const std::string at = where + " ([" + std::string(index_names) + "])";
  shape_t<R> idx{};
  index_t rest = bad;
  for (std::size_t d = R; d-- > 0;) {
    idx[d] = rest % g.extent(d);
    rest /= g.extent(d);
  }
  const T x = *g.ptr(idx);
  if (std::isnan(x)) {
    check.fail(name, "log gates must be <= 0 or -inf, got " + at +
                         ": a NaN gate is neither a decay nor a reset");
  }
  if (std::isinf(x) || allow_growth) {
    check.fail(name, "log gates must be finite or -inf, got " + at);
  }
  check.fail(name,
             "log gates must be <= 0 (the log of a decay in (0, 1]; -inf forgets "
             "everything), got " +
                 at +
                 ": pass log(alpha), not alpha, or set options.allow_gate_growth = true "
                 "for gates that grow the state");
}

}  // namespace seqmix
