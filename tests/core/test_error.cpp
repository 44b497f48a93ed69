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

namespace {
/// A hand-made "view" with a negative extent (tensor_view itself refuses one).
struct bad_view {
  std::array<index_t, 2> s{2, -1};
  const std::array<index_t, 2>& shape() const { return s; }
};
}  // namespace

TEST_CASE("checker: wildcards print as 'any', a negative extent as itself", "[core][error]") {
  tensor<float, 4> k({2, 64, 4, 16});
  checker check{"f"};
  CHECK_THROWS_WITH(check.shape("k", k.view(), {any_extent, 64, 4, 32}),
                    Contains("expected shape [any, 64, 4, 32]") && Contains("got [2, 64, 4, 16]"));
  // -1 is not a wildcard: an expected -1 matches nothing and prints as -1
  CHECK_THROWS_WITH(check.shape("k", k.view(), {-1, 64, 4, 16}),
                    Contains("expected shape [-1, 64, 4, 16]"));
  CHECK_THROWS_WITH(check.shape("x", bad_view{}, {2, any_extent}),
                    Contains("'x'") && Contains("extents must be >= 0") && Contains("[2, -1]") &&
                        Contains("dimension 1 is -1"));
  CHECK(detail::format_shape(std::array<index_t, 3>{3, -1, 0}) == "[3, -1, 0]");
}

TEST_CASE("checker: non-finite values are reported with their index and value", "[core][error]") {
  checker check{"f"};
  tensor<float, 3> x({2, 3, 4});
  CHECK_NOTHROW(check.finite("x", x.view()));
  x.view()(1, 2, 3) = std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH(check.finite("x", x.view()),
                    Contains("seqmix::f: argument 'x': must be finite, got +inf at [1, 2, 3]"));
  x.view()(0, 1, 0) = std::nanf("");
  CHECK_THROWS_WITH(check.finite("x", x.view()), Contains("got NaN at [0, 1, 0]"));
  CHECK_THROWS_WITH(check.finite_value("options.scale", -std::numeric_limits<double>::infinity()),
                    Contains("'options.scale'") && Contains("got -inf"));
  CHECK_NOTHROW(check.finite_value("options.scale", 0.5));
  // strided view: the index is in the view's own coordinates
  tensor_view<float, 2> col(x.data() + 1, {6, 1}, {4, 1});
  x.view()(0, 1, 0) = 0.f;
  x.view()(1, 0, 1) = std::nanf("");  // row 3 of the column view
  CHECK_THROWS_WITH(check.finite("c", col), Contains("got NaN at [3, 0]"));
}

TEST_CASE("checker: no_overlap compares the byte ranges views span", "[core][error]") {
  checker check{"mixer::step"};
  tensor<float, 2> buf({4, 8});
  const tensor_view<float, 2> all = buf.view();
  const tensor_view<float, 2> top = all.slice<0>(0, 2), bottom = all.slice<0>(2, 4);
  const tensor_view<float, 2> mid = all.slice<0>(1, 3);
  CHECK_NOTHROW(check.no_overlap({range_of("o", bottom)}, {range_of("v", top)}));
  CHECK_THROWS_WITH(check.no_overlap({range_of("o", mid)}, {range_of("v", top)}),
                    Contains("seqmix::mixer::step: argument 'o': must not share memory with "
                             "argument 'v'") &&
                        Contains("32 bytes in common"));
  // two outputs may not overlap each other either
  CHECK_THROWS_WITH(check.no_overlap({range_of("o", top), range_of("state", mid)}, {}),
                    Contains("argument 'o'") && Contains("argument 'state'"));
  // empty and null views overlap nothing; negative strides span below data()
  CHECK_NOTHROW(check.no_overlap({range_of("o", all.slice<0>(1, 1))}, {range_of("v", all)}));
  CHECK_NOTHROW(check.no_overlap({range_of("o", tensor_view<float, 2>())}, {range_of("v", all)}));
  const tensor_view<float, 1> reversed(buf.data() + 15, {8}, {-1});  // elements 8 .. 15
  CHECK_NOTHROW(check.no_overlap({range_of("o", reversed)}, {range_of("v", top.slice<0>(0, 1))}));
  CHECK_THROWS_WITH(check.no_overlap({range_of("o", reversed)}, {range_of("v", top)}),
                    Contains("32 bytes in common"));
  const memory_range r = range_of("r", reversed);
  CHECK(r.hi - r.lo == 8 * sizeof(float));
  CHECK(r.lo == reinterpret_cast<std::uintptr_t>(buf.data() + 8));
}

TEST_CASE("checker: distinct_elements rejects broadcast and overlapping strides", "[core][error]") {
  checker check{"f"};
  tensor<float, 3> t({2, 3, 4});
  CHECK_NOTHROW(check.distinct_elements("o", t.view()));
  CHECK_NOTHROW(check.distinct_elements("o", t.view().slice<2>(1, 3)));  // strided rows
  CHECK_NOTHROW(check.distinct_elements("o", tensor_view<float, 2>(t.data(), {1, 4}, {0, 1})));
  CHECK_NOTHROW(check.distinct_elements("o", tensor_view<float, 2>(t.data(), {4, 6}, {1, 4})));
  CHECK_THROWS_WITH(check.distinct_elements("o", tensor_view<float, 2>(t.data(), {3, 4}, {0, 1})),
                    Contains("argument 'o'") && Contains("got strides [0, 1] for shape [3, 4]"));
  CHECK_THROWS_WITH(check.distinct_elements("s", tensor_view<float, 2>(t.data(), {3, 4}, {3, 1})),
                    Contains("got strides [3, 1]"));
  CHECK_THROWS_AS(check.distinct_elements("s", tensor_view<float, 2>(t.data(), {4, 3}, {-1, 2})),
                  shape_error);
}
