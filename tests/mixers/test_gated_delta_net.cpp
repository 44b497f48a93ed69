// SPDX-License-Identifier: MIT
// Gated DeltaNet: golden vectors (fla), forms, GVA, gate helper, gate sweep, varlen, threads.
#include <cmath>
#include <limits>

#include <catch2/catch.hpp>

#include "alloc_counter.hpp"
#include "delta_common.hpp"

using namespace delta_test;

namespace {
constexpr double golden_tol = 1e-5;  // float forms and double reference vs fla *_naive
constexpr double form_tol = 1e-5;    // float chunked / recurrent vs double reference
constexpr bool gated = true;
}  // namespace

TEST_CASE("gated_delta_net: golden gated_delta_rule (fla, k = k_l2)", "[gated_delta_net][golden]") {
  check_golden<gated>("gated_delta_rule", false, golden_tol);
}

TEST_CASE("gated_delta_net: golden gated_delta_rule_l2norm (fla, in-kernel l2norm)",
          "[gated_delta_net][golden]") {
  check_golden<gated>("gated_delta_rule_l2norm", true, golden_tol);
}

TEST_CASE("gated_delta_net: reference == recurrent == chunked", "[gated_delta_net][forms]") {
  const index_t T = GENERATE(1, 2, 63, 64, 65, 257);
  check_forms<gated>({1, T, 2, 2, 64, 64}, {16, 32, 64}, false, form_tol, 200 + std::uint64_t(T));
}
