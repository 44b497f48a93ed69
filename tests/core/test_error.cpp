// SPDX-License-Identifier: MIT
#include <cmath>
#include <limits>

#include <catch2/catch.hpp>

#include <seqmix/core/error.hpp>
#include <seqmix/core/tensor.hpp>

using namespace seqmix;
using Catch::Matchers::Contains;

TEST_CASE("checker: shape mismatch names the function, argument, expected and actual",
          "[core][error]") {
  tensor<float, 4> k({2, 64, 4, 16});
  checker check{"gla::forward_chunked"};
  CHECK_NOTHROW(check.shape("k", k.view(), {2, 64, 4, 16}));
  CHECK_NOTHROW(check.shape("k", k.view(), {any_extent, 64, 4, 16}));
  try {
    check.shape("k", k.view(), {2, 64, 4, 32});
    FAIL("no exception");
  } catch (const shape_error& e) {
    CHECK_THAT(e.what(), Contains("seqmix::gla::forward_chunked") && Contains("'k'") &&
                             Contains("expected shape [2, 64, 4, 32]") &&
                             Contains("got [2, 64, 4, 16]"));
  }
  STATIC_REQUIRE(std::is_base_of_v<std::invalid_argument, shape_error>);
}

TEST_CASE("checker: empty, non-contiguous and non-finite arguments are rejected", "[core][error]") {
  checker check{"f"};
  tensor<float, 2> empty({0, 3});
  CHECK_THROWS_WITH(check.nonempty("x", empty.view()), Contains("must not be empty"));
  tensor<float, 2> m({4, 4});
  CHECK_NOTHROW(check.inner_contiguous("x", m.view()));
  tensor_view<float, 2> strided(m.data(), {4, 2}, {4, 2});
  CHECK_THROWS_WITH(check.inner_contiguous("x", strided), Contains("stride 1"));
  m(1, 1) = -std::numeric_limits<float>::infinity();
  CHECK_NOTHROW(check.log_gate("g", m.view()));
  CHECK_THROWS_AS(check.finite("g", m.view()), shape_error);
  m(1, 1) = std::nanf("");
  CHECK_THROWS_WITH(check.log_gate("g", m.view()), Contains("'g'") && Contains("NaN"));
  m(1, 1) = std::numeric_limits<float>::infinity();
  CHECK_THROWS_AS(check.log_gate("g", m.view()), shape_error);
}
