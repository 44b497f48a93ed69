// SPDX-License-Identifier: MIT
// Gated DeltaNet: golden vectors (fla), reference == recurrent == chunked, GVA head mapping,
// gate helper, gate-strength sweep incl. g = 0, -1e4, -inf, beta in {0, 1, 2}, state carry,
// step, varlen, threads, allocations, bad inputs.
#include <cmath>
#include <limits>

#include <catch2/catch.hpp>

#include "alloc_counter.hpp"
#include "delta_common.hpp"

using namespace delta_test;

namespace {
constexpr double golden_tol = 1e-5;    // float forms and double reference vs fla *_naive
constexpr double form_tol = 1e-5;      // float chunked / recurrent vs double reference
constexpr double carry_tol = 1e-6;     // split calls vs one call, same form (float)
constexpr double varlen_tol = 1e-6;    // packed vs separate calls (float)
constexpr double gate_rel_tol = 1e-6;  // gate helper (float) vs long double reference
constexpr bool gated = true;
using kv = std::pair<index_t, index_t>;
}  // namespace

TEST_CASE("gated_delta_net: golden gated_delta_rule (fla, k = k_l2)", "[gated_delta_net][golden]") {
  check_golden<gated>("gated_delta_rule", false, golden_tol);
}

TEST_CASE("gated_delta_net: golden gated_delta_rule_l2norm (fla, in-kernel l2norm)",
          "[gated_delta_net][golden]") {
  check_golden<gated>("gated_delta_rule_l2norm", true, golden_tol);
}

TEST_CASE("gated_delta_net: reference == recurrent == chunked over T, chunk, K, V",
          "[gated_delta_net][forms]") {
  const index_t T = GENERATE(1, 2, 63, 64, 65, 257, 1000);
  const auto s = GENERATE(kv{1, 1}, kv{7, 7}, kv{64, 64}, kv{65, 65}, kv{128, 128}, kv{1, 128},
                          kv{128, 7}, kv{7, 65}, kv{65, 1});
  // under the sanitizers (50x slower) T = 1000 runs one shape: T = 257 takes the same paths
  if (seqmix::testing::sanitized_build && T == 1000 && s != kv{7, 65}) return;
  check_forms<gated>({1, T, 1, 1, s.first, s.second}, {16, 32, 64}, false, form_tol,
                     200 + std::uint64_t(T));
}

TEST_CASE("gated_delta_net: l2norm, GVA and K != V forms", "[gated_delta_net][forms]") {
  check_forms<gated>({2, 77, 2, 6, 32, 16}, {16, 64}, true, form_tol, 210);
  check_forms<gated>({1, 130, 1, 3, 65, 33}, {32}, false, form_tol, 211);
}

TEST_CASE("gated_delta_net: GVA maps value head hv to q/k head hv / (HV / H)",
          "[gated_delta_net][gva]") {
  // H = 2, HV = 6: running with q, k repeated per value head (consecutive heads share) must
  // give the same result as the grouped call.
  const dims d{1, 50, 2, 6, 16, 8};
  const auto in = cast<float>(random_inputs(d, 220, 0.0));
  auto expanded = in;
  expanded.q = tensor<float, 4>({1, d.T, d.HV, d.K});
  expanded.k = tensor<float, 4>({1, d.T, d.HV, d.K});
  for (index_t t = 0; t < d.T; ++t)
    for (index_t hv = 0; hv < d.HV; ++hv)
      for (index_t i = 0; i < d.K; ++i) {
        expanded.q(0, t, hv, i) = in.q(0, t, hv / 3, i);
        expanded.k(0, t, hv, i) = in.k(0, t, hv / 3, i);
      }
  const gated_delta_net<float> m(make_options<gated, float>(true, 16));
  for (form f : {form::chunked, form::recurrent}) {
    tensor<float, 4> s1 = in.h0, s2 = in.h0;
    const auto o1 = run<gated, float>(f, m, in, s1);
    const auto o2 = run<gated, float>(f, m, expanded, s2);
    CHECK(testing::bitwise_equal(o1, o2));
    CHECK(testing::bitwise_equal(s1, s2));
  }
}

TEST_CASE("gated_delta_net: gate strength sweep (g = 0 ... -1e4, -inf) x beta {0, 1, 2}",
          "[gated_delta_net][sweep]") {
  const double mult = GENERATE(0.0, 0.1, 1.0, 10.0, 1e4);
  const double beta = GENERATE(0.0, 1.0, 2.0);
  INFO("gate multiplier " << mult << ", beta " << beta);
  check_forms<gated>({1, 300, 1, 2, 32, 32}, {16, 64}, false, form_tol, 230, 1.0, mult, beta, beta);
}

TEST_CASE("gated_delta_net: -inf and -1e4 gates at chosen tokens (forget everything)",
          "[gated_delta_net][sweep]") {
  const dims d{1, 200, 1, 2, 32, 24};
  auto in = random_inputs(d, 240);
  const double strong = GENERATE(-1e4, -std::numeric_limits<double>::infinity());
  for (index_t t : {0, 5, 63, 64, 100, 101, 199}) in.g(0, t, 0) = strong;
  in.g(0, 17, 1) = strong;
  tensor<double, 4> st_ref = in.h0;
  const auto o_ref = run<gated, double>(
      form::reference, gated_delta_net<double>(make_options<gated, double>(false)), in, st_ref);
  const auto inf = cast<float>(in);
  for (index_t c : {16, 64}) {
    for (form f : {form::chunked, form::recurrent}) {
      INFO("gate " << strong << " chunk " << c << " form " << int(f));
      tensor<float, 4> st = inf.h0;
      const auto o = run<gated, float>(
          f, gated_delta_net<float>(make_options<gated, float>(false, c)), inf, st);
      CHECK(testing::all_finite(o));
      CHECK(testing::all_finite(st));
      check_near(o_ref, o, form_tol, "o");
      check_near(st_ref, st, form_tol, "state");
    }
  }
}

TEST_CASE("gated_delta_net: gate helper is finite for every finite input",
          "[gated_delta_net][gates]") {
  const std::vector<float> xs{-1e30f,
                              -1e4f,
                              -100.f,
                              -20.f,
                              -1.f,
                              0.f,
                              0.5f,
                              19.f,
                              20.f,
                              21.f,
                              100.f,
                              1e4f,
                              1e30f,
                              std::numeric_limits<float>::max(),
                              std::numeric_limits<float>::lowest()};
  const index_t n = index_t(xs.size());
  tensor<float, 3> a({1, n * n, n}), b({1, n * n, n}), g({1, n * n, n}), beta({1, n * n, n});
  tensor<float, 1> A_log({n}), dt_bias({n});
  for (index_t h = 0; h < n; ++h) A_log[h] = xs[std::size_t(h)];
  for (index_t t = 0; t < n * n; ++t)
    for (index_t h = 0; h < n; ++h) {
      a(0, t, h) = xs[std::size_t(t % n)];
      b(0, t, h) = xs[std::size_t(t / n)];
    }
  for (index_t h = 0; h < n; ++h) dt_bias[h] = xs[std::size_t((h * 7) % n)];
  gated_delta_gates<float>(a, b, A_log, dt_bias, g, beta);
  CHECK(testing::all_finite(g));
  CHECK(testing::all_finite(beta));
  for (index_t t = 0; t < n * n; ++t)
    for (index_t h = 0; h < n; ++h) {
      const float ref = reference::gated_delta_gate(a(0, t, h), A_log[h], dt_bias[h]);
      INFO("a " << a(0, t, h) << " A_log " << A_log[h] << " dt_bias " << dt_bias[h] << " g "
                << g(0, t, h) << " ref " << ref);
      CHECK(g(0, t, h) <= 0.f);
      CHECK(std::abs(g(0, t, h) - ref) <= gate_rel_tol * std::abs(ref));
      CHECK(beta(0, t, h) >= 0.f);
      CHECK(beta(0, t, h) <= 1.f);
    }
  // a typical layer value, by hand: A_log = log(4), a + dt_bias = 0: g = -4 log 2
  CHECK(kernels::delta_rule::gate_value(0.5f, std::log(4.f), -0.5f) ==
        Approx(-4.0 * std::log(2.0)).epsilon(1e-6));
  // the gates feed the mixer without NaN
  tensor<float, 3> a2({1, 64, 2}, 1e30f), b2({1, 64, 2}, -1e30f), g2({1, 64, 2}), be2({1, 64, 2});
  tensor<float, 1> al({2}, 50.f), db({2}, 1e30f);
  gated_delta_gates<float>(a2, b2, al, db, g2, be2);
  CHECK(testing::all_finite(g2));
}

TEST_CASE("gated_delta_net: state carried across random split points == one call",
          "[gated_delta_net][carry]") {
  const dims d{2, 300, 2, 4, 33, 40};
  check_state_carry<gated>(d, form::chunked, 32, carry_tol, 260);
  check_state_carry<gated>(d, form::recurrent, 32, carry_tol, 261);
}

TEST_CASE("gated_delta_net: step x T == forward_recurrent (bitwise)", "[gated_delta_net][step]") {
  check_step<gated>({2, 40, 2, 4, 32, 70}, true, 270);
  check_step<gated>({1, 40, 1, 1, 7, 5}, false, 271);
}

TEST_CASE("gated_delta_net: varlen == separate calls", "[gated_delta_net][varlen]") {
  const dims d{1, 0, 2, 4, 32, 24};
  check_varlen<gated>(d, form::chunked, {5, 0, 70, 33, 1, 16}, varlen_tol, 280);
  check_varlen<gated>(d, form::recurrent, {5, 0, 70, 33, 1, 16}, varlen_tol, 281);
}

TEST_CASE("gated_delta_net: 1 vs 2 threads bitwise equal", "[gated_delta_net][threads]") {
  check_threads<gated>({2, 200, 2, 4, 40, 72}, form::chunked, 290);
  check_threads<gated>({2, 200, 2, 4, 40, 72}, form::recurrent, 291);
}

TEST_CASE("gated_delta_net: bad inputs raise shape_error", "[gated_delta_net][errors]") {
  check_bad_inputs<gated>();
}

TEST_CASE("gated_delta_net: recurrent and step allocate nothing, chunked memory flat in T",
          "[gated_delta_net][alloc]") {
  check_allocations<gated>();
}
