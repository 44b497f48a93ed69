// SPDX-License-Identifier: MIT
// Test helpers shared by every seqmix test: random inputs seeded from Catch's --rng-seed, and
// comparisons that report relative RMS error, max-abs error with its index, and the first
// differing values side by side.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <iomanip>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include <seqmix/core/parallel.hpp>
#include <seqmix/core/tensor.hpp>

namespace seqmix::testing {

/// True in a build with AddressSanitizer (the CI's clang -O0 pass, where every test runs 10-50x
/// slower). The few sweeps that cost minutes there skip their largest repeats of a code path
/// the smaller ones already take; the plain build runs them all.
#if defined(__SANITIZE_ADDRESS__)
inline constexpr bool sanitized_build = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
inline constexpr bool sanitized_build = true;
#else
inline constexpr bool sanitized_build = false;
#endif
#else
inline constexpr bool sanitized_build = false;
#endif

/// Asserts that a parallel loop started now really runs on `threads` distinct threads, so a
/// "1 vs N threads" comparison cannot pass by comparing serial with serial (a build without
/// OpenMP, or a thread setting that is ignored, fails here instead).
inline void require_team(int threads) {
  INFO("the thread comparison needs a team of " << threads << " threads");
#if SEQMIX_HAS_OPENMP
  std::vector<int> seen(static_cast<std::size_t>(threads), 0);
  std::vector<int> by_index(static_cast<std::size_t>(threads) * 4, -1);
  seqmix::parallel_for(static_cast<index_t>(by_index.size()), [&](index_t i) {
    by_index[static_cast<std::size_t>(i)] = omp_get_thread_num();
  });
  int distinct = 0;
  for (int tid : by_index) {
    REQUIRE(tid >= 0);
    REQUIRE(tid < threads);
    if (seen[static_cast<std::size_t>(tid)]++ == 0) ++distinct;
  }
  REQUIRE(distinct == threads);
#else
  FAIL("seqmix was built without OpenMP: every kernel is serial, so a 1 vs "
       << threads << " threads comparison would compare serial with serial");
#endif
}

/// A generator seeded from Catch's --rng-seed (plus a per-call salt), so a failure reproduces
/// with the seed Catch prints.
inline std::mt19937_64 make_rng(std::uint64_t salt = 0) {
  return std::mt19937_64(static_cast<std::uint64_t>(Catch::rngSeed()) * 1000003ULL + salt);
}

template <class T, std::size_t R>
tensor<T, R> random_normal(const shape_t<R>& shape, std::mt19937_64& rng, double stddev = 1.0,
                           double mean = 0.0) {
  tensor<T, R> t(shape);
  std::normal_distribution<double> dist(mean, stddev);
  for (index_t i = 0; i < t.size(); ++i) t[i] = static_cast<T>(dist(rng));
  return t;
}

template <class T, std::size_t R>
tensor<T, R> random_uniform(const shape_t<R>& shape, std::mt19937_64& rng, double lo, double hi) {
  tensor<T, R> t(shape);
  std::uniform_real_distribution<double> dist(lo, hi);
  for (index_t i = 0; i < t.size(); ++i) t[i] = static_cast<T>(dist(rng));
  return t;
}

/// Element-wise conversion (e.g. double reference inputs -> float kernel inputs).
template <class To, class From, std::size_t R>
tensor<To, R> cast(const tensor<From, R>& t) {
  return tensor<To, R>::copy_of(t.view());
}

/// Result of comparing an output with a reference.
struct comparison {
  double rel_rms = 0;      // ||out - ref||_2 / ||ref||_2 (absolute RMS when ref is all zero)
  double max_abs = 0;      // max |out - ref|
  index_t max_index = -1;  // flat row-major index of max_abs
  index_t nonfinite = 0;   // NaN/inf count in out
  std::string report;      // human-readable summary for INFO()
};

template <class A, class B, std::size_t R>
comparison compare(const tensor_view<const A, R>& ref, const tensor_view<const B, R>& out,
                   int show = 5) {
  comparison c;
  std::ostringstream msg;
  msg << std::setprecision(9);
  if (ref.shape() != out.shape()) {
    c.rel_rms = std::numeric_limits<double>::infinity();
    c.report = "shape mismatch: ref " + detail::format_shape({ref.shape().data(), R}) + " vs out " +
               detail::format_shape({out.shape().data(), R});
    return c;
  }
  double num = 0, den = 0;
  index_t i = 0;
  int shown = 0;
  std::ostringstream diffs;
  diffs << std::setprecision(9);
  shape_t<R> idx{};
  const index_t n = ref.size();
  for (i = 0; i < n; ++i) {
    // row-major multi-index of i
    index_t rem = i;
    for (std::size_t d = R; d-- > 0;) {
      idx[d] = rem % ref.shape()[d];
      rem /= ref.shape()[d];
    }
    const double r = static_cast<double>(*ref.ptr(idx));
    const double o = static_cast<double>(*out.ptr(idx));
    if (!std::isfinite(o)) ++c.nonfinite;
    const double d = std::abs(o - r);
    num += (o - r) * (o - r);
    den += r * r;
    if (!(d <= c.max_abs)) {
      c.max_abs = std::isnan(d) ? std::numeric_limits<double>::infinity() : d;
      c.max_index = i;
    }
    if (shown < show && !(d <= 1e-6 * (1 + std::abs(r)))) {
      diffs << "    " << detail::format_shape({idx.data(), R}) << " ref " << r << " out " << o
            << "\n";
      ++shown;
    }
  }
  c.rel_rms = den > 0 ? std::sqrt(num / den) : std::sqrt(num / std::max<double>(1, double(n)));
  if (c.nonfinite) c.rel_rms = std::numeric_limits<double>::infinity();
  msg << "rel_rms " << c.rel_rms << ", max_abs " << c.max_abs << " at flat index " << c.max_index
      << ", non-finite outputs " << c.nonfinite << ", elements " << n;
  if (shown) msg << "\n  first differing values:\n" << diffs.str();
  c.report = msg.str();
  return c;
}

template <class A, class B, std::size_t R>
comparison compare(const tensor<A, R>& ref, const tensor<B, R>& out, int show = 5) {
  return compare<A, B, R>(ref.view(), out.view(), show);
}

/// True when every element is finite.
template <class T, std::size_t R>
bool all_finite(const tensor_view<const T, R>& t) {
  bool ok = true;
  t.for_each([&](T x) { ok = ok && std::isfinite(x); });
  return ok;
}
template <class T, std::size_t R>
bool all_finite(const tensor<T, R>& t) {
  return all_finite<T, R>(t.view());
}

/// True when both tensors hold bitwise-identical elements.
template <class T, std::size_t R>
bool bitwise_equal(const tensor<T, R>& a, const tensor<T, R>& b) {
  if (a.shape() != b.shape()) return false;
  return a.size() == 0 ||
         std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.size()) * sizeof(T)) == 0;
}

}  // namespace seqmix::testing

/// CHECK that `out` is within relative RMS `tol` of `ref`; prints the comparison on failure.
#define SEQMIX_CHECK_CLOSE(ref, out, tol)                          \
  do {                                                             \
    const auto seqmix_cmp_ = ::seqmix::testing::compare(ref, out); \
    INFO(#out " vs " #ref ": " << seqmix_cmp_.report);             \
    CHECK(seqmix_cmp_.rel_rms <= (tol));                           \
  } while (0)
