// SPDX-License-Identifier: MIT
// Accuracy of seqmix::simd's vectorised functions against std:: evaluated in long double, over
// wide ranges including inputs where naive formulas overflow. The max relative error measured
// is printed (run with -s) and bounded by the constants below.
#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include <seqmix/core/simd.hpp>

using namespace seqmix;

namespace {

// Bounds on max relative error. Relative error is measured where |ref| >= 1e3 · (smallest
// normal); below that floor (results underflowing into denormals, which the vector exp flushes
// to 0) the absolute error must stay under the floor.
template <class T>
constexpr double tolerance = std::is_same_v<T, float> ? 2e-6 : 1e-13;

template <class T>
std::vector<T> sweep(double lo, double hi, int n) {
  std::vector<T> x;
  for (int i = 0; i < n; ++i) x.push_back(static_cast<T>(lo + (hi - lo) * i / (n - 1)));
  return x;
}

template <class T, class Fast, class Exact>
double max_rel_error(const std::vector<T>& x, Fast fast, Exact exact, const char* name) {
  std::vector<T> y(x.size());
  fast(x.data(), y.data(), static_cast<index_t>(x.size()));
  double worst = 0;
  T worst_x = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const long double ref = exact(static_cast<long double>(x[i]));
    const long double got = y[i];
    if (std::isinf(ref)) {
      CHECK(got == ref);
      continue;
    }
    REQUIRE(std::isfinite(static_cast<double>(got)));
    const long double floor = 1e3L * std::numeric_limits<T>::min();
    if (std::abs(ref) < floor) {
      CHECK(std::abs(got - ref) < floor);
      continue;
    }
    const double err = static_cast<double>(std::abs(got - ref) / std::abs(ref));
    if (err > worst) {
      worst = err;
      worst_x = x[i];
    }
  }
  std::printf("simd %-10s %-6s max rel error %.3g (at x = %.6g)\n", name,
              std::is_same_v<T, float> ? "float" : "double", worst, static_cast<double>(worst_x));
  return worst;
}

long double ref_sigmoid(long double x) {
  return 1.0L / (1.0L + std::exp(-x));
}
long double ref_logsigmoid(long double x) {
  return x < 0 ? x - std::log1p(std::exp(x)) : -std::log1p(std::exp(-x));
}
long double ref_softplus(long double x) {
  return x > 20 ? x : std::log1p(std::exp(x));
}
long double ref_silu(long double x) {
  return x * ref_sigmoid(x);
}

}  // namespace

TEMPLATE_TEST_CASE("simd: exp/log accuracy over wide ranges", "[core][simd]", float, double) {
  using T = TestType;
  const double lim = std::is_same_v<T, float> ? 87.0 : 700.0;
  auto xs = sweep<T>(-lim, lim, 100003);
  CHECK(max_rel_error<T>(
            xs, [](const T* a, T* b, index_t n) { simd::exp(a, b, n); },
            [](long double x) { return std::exp(x); }, "exp") <= tolerance<T>);
  // Beyond the range: underflow to 0 (or a denormal), overflow to +inf, -inf gives 0.
  // NaN stays NaN in every lane position (a vector body and the scalar tail).
  std::vector<T> extreme{T(-1e4), T(-200), -std::numeric_limits<T>::infinity(), T(1e4),
                         std::numeric_limits<T>::infinity()};
  extreme.resize(static_cast<std::size_t>(2 * simd::lanes<T> + 3), T(0));
  for (std::size_t i = 5; i < extreme.size(); i += 3) {
    extreme[i] = std::numeric_limits<T>::quiet_NaN();
  }
  std::vector<T> out(extreme.size());
  simd::exp(extreme.data(), out.data(), static_cast<index_t>(extreme.size()));
  CHECK(out[0] == T(0));
  CHECK(out[2] == T(0));
  CHECK(std::isinf(out[3]));
  CHECK(std::isinf(out[4]));
  for (std::size_t i = 5; i < extreme.size(); ++i) {
    INFO("lane " << i);
    CHECK(std::isnan(out[i]) == ((i - 5) % 3 == 0));
  }

  std::vector<T> pos;
  for (int e = -30; e <= 30; ++e) {
    for (int m = 1; m < 1000; m += 7) pos.push_back(static_cast<T>(m * std::pow(10.0, e) / 100));
  }
  CHECK(max_rel_error<T>(
            pos, [](const T* a, T* b, index_t n) { simd::log(a, b, n); },
            [](long double x) { return std::log(x); }, "log") <= tolerance<T>);
}

TEMPLATE_TEST_CASE("simd: activations are accurate and finite for any finite input", "[core][simd]",
                   float, double) {
  using T = TestType;
  auto xs = sweep<T>(-1e4, 1e4, 20001);
  auto near = sweep<T>(-60, 60, 100001);
  xs.insert(xs.end(), near.begin(), near.end());
  xs.push_back(std::numeric_limits<T>::max());
  xs.push_back(std::numeric_limits<T>::lowest());
  auto run = [&](auto fast, auto exact, const char* name) {
    CHECK(max_rel_error<T>(xs, fast, exact, name) <= 4 * tolerance<T>);
  };
  run([](const T* a, T* b, index_t n) { simd::sigmoid(a, b, n); }, ref_sigmoid, "sigmoid");
  run([](const T* a, T* b, index_t n) { simd::logsigmoid(a, b, n); }, ref_logsigmoid, "logsigmoid");
  run([](const T* a, T* b, index_t n) { simd::softplus(a, b, n); }, ref_softplus, "softplus");
  run([](const T* a, T* b, index_t n) { simd::silu(a, b, n); }, ref_silu, "silu");
}

TEMPLATE_TEST_CASE("simd: scalar math helpers agree with the vector forms", "[core][simd]", float,
                   double) {
  using T = TestType;
  auto xs = sweep<T>(-100, 100, 2001);
  std::vector<T> y(xs.size());
  simd::softplus(xs.data(), y.data(), static_cast<index_t>(xs.size()));
  for (std::size_t i = 0; i < xs.size(); ++i) {
    CHECK(static_cast<double>(math::softplus(xs[i])) ==
          Approx(static_cast<double>(y[i])).epsilon(1e-5).margin(1e-30));
    CHECK(std::isfinite(math::sigmoid(xs[i])));
    CHECK(std::isfinite(math::logsigmoid(xs[i])));
  }
  CHECK(math::softplus(T(1e30)) == T(1e30));
  CHECK(math::sigmoid(T(-1e30)) == T(0));
  CHECK(math::logsigmoid(T(-1e30)) == T(-1e30));
}

TEMPLATE_TEST_CASE("simd: array helpers handle every tail length", "[core][simd]", float, double) {
  using T = TestType;
  for (index_t n : {0, 1, 3, 7, 8, 9, 15, 16, 17, 33, 65}) {
    CAPTURE(n);
    std::vector<T> a(static_cast<std::size_t>(n) + 1), b(a.size());
    for (std::size_t i = 0; i < a.size(); ++i) {
      a[i] = static_cast<T>(0.25 * double(i) - 3);
      b[i] = static_cast<T>(1.0 / (1.0 + double(i)));
    }
    long double dot = 0, sum = 0;
    T mx = n ? a[0] : T(0);
    for (index_t i = 0; i < n; ++i) {
      dot += static_cast<long double>(a[std::size_t(i)]) * b[std::size_t(i)];
      sum += a[std::size_t(i)];
      mx = std::max(mx, a[std::size_t(i)]);
    }
    CHECK(static_cast<double>(simd::dot(a.data(), b.data(), n)) ==
          Approx(static_cast<double>(dot)).margin(1e-5));
    CHECK(static_cast<double>(simd::sum(a.data(), n)) ==
          Approx(static_cast<double>(sum)).margin(1e-4));
    if (n) CHECK(simd::max(a.data(), n) == mx);
    std::vector<T> y = b;
    simd::axpy(y.data(), T(2), a.data(), n);
    for (index_t i = 0; i < n; ++i) {
      CHECK(y[std::size_t(i)] == Approx(b[std::size_t(i)] + 2 * a[std::size_t(i)]));
    }
    CHECK(y[std::size_t(n)] == b[std::size_t(n)]);  // element past the end untouched
    std::vector<T> e = a;
    simd::exp(a.data(), e.data(), n);
    CHECK(e[std::size_t(n)] == a[std::size_t(n)]);
  }
  INFO("compiled for " << simd::arch_name());
  CHECK(simd::lanes<T> >= 1);
}
