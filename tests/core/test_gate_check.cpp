// SPDX-License-Identifier: MIT
// core/gate_check.hpp: the vectorised log-gate check (gates <= 0 or -inf; growth optional;
// NaN and +inf never), on contiguous, row-strided and fully strided views, every position.
#include <cmath>
#include <limits>

#include <catch2/catch.hpp>

#include <seqmix/core/gate_check.hpp>
#include <seqmix/core/tensor.hpp>

using namespace seqmix;
using Catch::Matchers::Contains;

namespace {
constexpr float finf = std::numeric_limits<float>::infinity();
}

TEST_CASE("check_log_gates: valid gates pass, -inf included", "[core][gates]") {
  const checker check{"g::f"};
  tensor<float, 3> g({3, 7, 19}, -0.25f);
  g[5] = -finf;
  g[6] = 0.f;
  g[7] = -std::numeric_limits<float>::max();
  CHECK_NOTHROW(check_log_gates<float, 3>(check, "g", g, false, "b, t, h"));
  CHECK_NOTHROW(check_log_gates<float, 3>(check, "g", g, true, "b, t, h"));
  CHECK_NOTHROW(check_log_gates<float, 3>(check, "g", tensor_view<const float, 3>(), false, ""));
}

TEST_CASE("check_log_gates: the first bad gate at any position is found and named",
          "[core][gates]") {
  const checker check{"g::f"};
  // sizes around the vector widths (tails of 0..L-1 elements, the 4-vector blocks)
  for (index_t n : {1, 3, 15, 16, 17, 63, 64, 65, 129}) {
    tensor<double, 1> gd({n}, -1.0);
    tensor<float, 2> g({2, n}, -1.f);
    for (index_t i = 0; i < n; ++i) {
      INFO("n = " << n << ", i = " << i);
      g.view()(1, i) = 0.5f;
      CHECK_THROWS_WITH((check_log_gates<float, 2>(check, "gk", g, false, "t, k")),
                        Contains("seqmix::g::f: argument 'gk'") &&
                            Contains("got 0.5 at [1, " + std::to_string(i) + "] ([t, k])") &&
                            Contains("log(alpha)"));
      CHECK_NOTHROW(check_log_gates<float, 2>(check, "gk", g, true, "t, k"));
      g.view()(1, i) = std::nanf("");
      CHECK_THROWS_WITH((check_log_gates<float, 2>(check, "gk", g, true, "t, k")),
                        Contains("got NaN at [1, " + std::to_string(i) + "]"));
      g.view()(1, i) = finf;
      CHECK_THROWS_WITH((check_log_gates<float, 2>(check, "gk", g, true, "t, k")),
                        Contains("must be finite or -inf, got +inf"));
      g.view()(1, i) = -1.f;
      gd.view()(i) = 1e-300;
      CHECK_THROWS_WITH((check_log_gates<double, 1>(check, "g", gd, false, "t")),
                        Contains("at [" + std::to_string(i) + "]"));
      gd.view()(i) = -1.0;
    }
  }
}

TEST_CASE("check_log_gates: strided views use their own coordinates", "[core][gates]") {
  const checker check{"g::f"};
  tensor<float, 3> big({4, 6, 40}, -0.5f);
  // rows contiguous, every other row of the middle dimension, 33 of 40 columns
  const tensor_view<const float, 3> rows(big.data(), {4, 3, 33}, {6 * 40, 2 * 40, 1});
  big.view()(3, 4, 32) = 2.f;  // rows(3, 2, 32)
  CHECK_THROWS_WITH((check_log_gates<float, 3>(check, "g", rows, false, "b, t, h")),
                    Contains("got 2 at [3, 2, 32]"));
  big.view()(3, 5, 32) = 7.f;  // not in the view
  big.view()(3, 4, 32) = -0.5f;
  CHECK_NOTHROW(check_log_gates<float, 3>(check, "g", rows, false, "b, t, h"));
  // fully strided (innermost stride 2)
  const tensor_view<const float, 2> cols(big.data(), {24, 20}, {40, 2});
  big.view()(2, 1, 6) = std::nanf("");  // cols(13, 3)
  CHECK_THROWS_WITH((check_log_gates<float, 2>(check, "g", cols, false, "t, k")),
                    Contains("got NaN at [13, 3]"));
}
