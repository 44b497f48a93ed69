// SPDX-License-Identifier: MIT
// DeltaNet: golden vectors (fla), reference == recurrent == chunked, state carry, step, varlen,
// threads, beta sweep incl. negative eigenvalues, unstable keys, bad inputs.
#include <cmath>
#include <limits>

#include <catch2/catch.hpp>

#include "alloc_counter.hpp"
#include "delta_common.hpp"

using namespace delta_test;

namespace {
constexpr double golden_tol = 1e-5;  // float forms and double reference vs fla *_naive
constexpr double form_tol = 1e-5;    // float chunked / recurrent vs double reference
constexpr double carry_tol = 1e-6;   // split calls vs one call, same form (float)
constexpr double varlen_tol = 1e-6;  // packed vs separate calls (float)
constexpr bool ungated = false;
}  // namespace

TEST_CASE("delta_net: golden delta_rule (fla, k = k_l2)", "[delta_net][golden]") {
  check_golden<ungated>("delta_rule", false, golden_tol);
}

TEST_CASE("delta_net: golden delta_rule_l2norm (fla, in-kernel l2norm)", "[delta_net][golden]") {
  check_golden<ungated>("delta_rule_l2norm", true, golden_tol);
}

TEST_CASE("delta_net: reference == recurrent == chunked over T, chunk, K, V",
          "[delta_net][forms]") {
  const index_t T = GENERATE(1, 2, 63, 64, 65, 257);
  const auto kv = GENERATE(std::pair<index_t, index_t>{1, 1}, std::pair<index_t, index_t>{7, 7},
                           std::pair<index_t, index_t>{64, 64}, std::pair<index_t, index_t>{65, 7},
                           std::pair<index_t, index_t>{7, 65});
  check_forms<ungated>({1, T, 2, 2, kv.first, kv.second}, {16, 32, 64}, false, form_tol,
                       100 + std::uint64_t(T));
}
