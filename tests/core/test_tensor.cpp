// SPDX-License-Identifier: MIT
#include <limits>
#include <new>
#include <string>
#include <type_traits>

#include <catch2/catch.hpp>

#include <seqmix/core/tensor.hpp>

using namespace seqmix;

TEST_CASE("tensor: zero-initialised, aligned, row-major", "[core][tensor]") {
  tensor<float, 3> t({2, 3, 5});
  CHECK(t.size() == 30);
  CHECK(reinterpret_cast<std::uintptr_t>(t.data()) % 64 == 0);
  CHECK(t.strides() == shape_t<3>{15, 5, 1});
  for (index_t i = 0; i < t.size(); ++i) CHECK(t[i] == 0.0f);
  t(1, 2, 4) = 7.0f;
  CHECK(t[29] == 7.0f);
}

TEST_CASE("tensor: copy is deep, move leaves the source empty", "[core][tensor]") {
  tensor<double, 2> a({2, 2}, 1.5);
  tensor<double, 2> b = a;
  b(0, 0) = 3.0;
  CHECK(a(0, 0) == 1.5);
  tensor<double, 2> c = std::move(b);
  CHECK(c(0, 0) == 3.0);
  CHECK(c(1, 1) == 1.5);
  // The moved-from tensor is empty (not a shape over a null pointer).
  CHECK(b.size() == 0);  // NOLINT(bugprone-use-after-move)
  CHECK(b.data() == nullptr);
  tensor<double, 2> d({3, 1});
  d = std::move(c);
  CHECK(d.shape() == shape_t<2>{2, 2});
  CHECK(c.empty());  // NOLINT(bugprone-use-after-move)
}

TEST_CASE("tensor: empty shapes are allowed, negative extents rejected", "[core][tensor]") {
  tensor<float, 2> e({0, 4});
  CHECK(e.empty());
  CHECK(e.data() == nullptr);
  CHECK_THROWS_AS((tensor<float, 2>({-1, 4})), shape_error);
  CHECK_THROWS_WITH((tensor<float, 2>({3, -1})),
                    Catch::Matchers::Contains("seqmix::tensor: argument 'shape'") &&
                        Catch::Matchers::Contains("[3, -1]"));
}

TEST_CASE("tensor: element and byte counts are checked, never wrapped", "[core][tensor][hostile]") {
  using Catch::Matchers::Contains;
  // 2^32 · 2^32 = 2^64 wraps to 0 in 64-bit arithmetic: it must not become an empty tensor.
  const index_t e32 = index_t(1) << 32;
  CHECK_THROWS_WITH((tensor<float, 2>({e32, e32})), Contains("seqmix::tensor: argument 'shape'") &&
                                                        Contains("[4294967296, 4294967296]") &&
                                                        Contains("overflows"));
  CHECK_THROWS_AS((tensor<float, 1>({std::numeric_limits<index_t>::max()})), shape_error);
  // The element count fits, the byte count does not (2^62 floats = 2^64 bytes).
  CHECK_THROWS_WITH((tensor<float, 1>({index_t(1) << 62})),
                    Contains("seqmix::tensor: argument 'shape'") && Contains("bytes"));
  CHECK_THROWS_WITH((tensor<double, 3>({index_t(1) << 20, index_t(1) << 20, index_t(1) << 20})),
                    Contains("bytes"));
  // Overflow through an intermediate product even when a later extent is 0 is still rejected:
  // the order of the extents must not decide.
  CHECK_THROWS_AS((tensor<float, 3>({e32, e32, 0})), shape_error);
  CHECK_NOTHROW((tensor<float, 3>({0, e32, e32 / 4})));  // 0 elements, no overflow
  // A product that fits exactly works (no allocation: one extent is 0 ... or small).
  tensor<float, 5> ok({1, 2, 3, 4, 5});
  CHECK(ok.size() == 120);
  CHECK(ok.data() != nullptr);
}

#if !defined(__SANITIZE_ADDRESS__) && !(defined(__has_feature) && __has_feature(address_sanitizer))
// ASan aborts on allocations beyond its limit instead of throwing: plain builds only.
TEST_CASE("tensor: a refused allocation is an allocation_error naming the shape",
          "[core][tensor][hostile]") {
  try {
    tensor<float, 2>({index_t(1) << 24, index_t(1) << 24});  // 2^50 bytes (1 PiB)
    FAIL("1 PiB was allocated");
  } catch (const allocation_error& e) {
    const std::string m = e.what();
    CHECK_THAT(m, Catch::Matchers::Contains("seqmix::tensor: shape [16777216, 16777216]") &&
                      Catch::Matchers::Contains("1125899906842624 bytes"));
  }
  CHECK_THROWS_AS((tensor<float, 2>({index_t(1) << 24, index_t(1) << 24})), std::bad_alloc);
}
#endif

TEST_CASE("tensor_view: select and slice give strided sub-views", "[core][tensor]") {
  tensor<int, 4> t({2, 3, 4, 5});  // [B, T, H, D]
  for (index_t i = 0; i < t.size(); ++i) t[i] = static_cast<int>(i);
  tensor_view<const int, 4> v = t;
  auto v_bh = v.select<0>(1).select<1>(2);  // [T, D] of t[1, :, 2, :]
  CHECK(v_bh.shape() == shape_t<2>{3, 5});
  CHECK(v_bh.strides() == shape_t<2>{20, 1});
  CHECK(v_bh(2, 3) == t(1, 2, 2, 3));
  CHECK_FALSE(v_bh.is_contiguous());
  auto s = v.slice<1>(1, 3);
  CHECK(s.shape() == shape_t<4>{2, 2, 4, 5});
  CHECK(s(0, 0, 0, 0) == t(0, 1, 0, 0));
  CHECK(v.is_contiguous());
}

TEST_CASE("tensor_view: const-correctness is enforced by the type system", "[core][tensor]") {
  STATIC_REQUIRE(std::is_convertible_v<tensor_view<float, 2>, tensor_view<const float, 2>>);
  STATIC_REQUIRE_FALSE(std::is_convertible_v<tensor_view<const float, 2>, tensor_view<float, 2>>);
  STATIC_REQUIRE(std::is_convertible_v<tensor<float, 2>&, tensor_view<float, 2>>);
  STATIC_REQUIRE(std::is_convertible_v<const tensor<float, 2>&, tensor_view<const float, 2>>);
  STATIC_REQUIRE_FALSE(std::is_convertible_v<const tensor<float, 2>&, tensor_view<float, 2>>);
  STATIC_REQUIRE(
      std::is_same_v<decltype(std::declval<tensor_view<const float, 2>>()(0, 0)), const float&>);
}

TEST_CASE("tensor_view: reshape needs contiguity and equal size", "[core][tensor]") {
  tensor<float, 3> t({2, 3, 4});
  auto r = t.view().reshape<2>({6, 4});
  CHECK(r.shape() == shape_t<2>{6, 4});
  CHECK_THROWS_AS(t.view().reshape<2>({5, 4}), shape_error);
  CHECK_THROWS_AS(t.view().select<1>(0).reshape<1>({8}), shape_error);
}

TEST_CASE("as_matrix: Eigen map with the view's strides, no copy", "[core][tensor]") {
  tensor<float, 3> t({3, 2, 4});  // [T, H, D]
  for (index_t i = 0; i < t.size(); ++i) t[i] = static_cast<float>(i);
  auto m = as_matrix(t.view().select<1>(1));  // [T, D] of head 1
  CHECK(m.rows() == 3);
  CHECK(m.cols() == 4);
  CHECK(m(2, 3) == t(2, 1, 3));
  m(0, 0) = -1.0f;
  CHECK(t(0, 1, 0) == -1.0f);
  Eigen::MatrixXf prod = m * m.transpose();
  CHECK(prod.rows() == 3);
}

TEST_CASE("copy: converts types and keeps strides", "[core][tensor]") {
  tensor<double, 2> a({2, 3});
  for (index_t i = 0; i < a.size(); ++i) a[i] = 0.5 * static_cast<double>(i);
  tensor<float, 2> b({2, 3});
  copy(tensor_view<const double, 2>(a), b.view());
  CHECK(b(1, 2) == 2.5f);
  tensor<float, 2> wrong({3, 2});
  CHECK_THROWS_AS(copy(tensor_view<const double, 2>(a), wrong.view()), shape_error);
}

#include "alloc_counter.hpp"

TEST_CASE("alloc_counter: sees tensor storage and frees", "[core][tensor]") {
  seqmix::testing::allocation_scope scope;
  {
    tensor<float, 2> t({256, 256});
    CHECK(scope.stats().count == 1);
    CHECK(scope.stats().live_bytes == 256 * 256 * sizeof(float));
  }
  CHECK(scope.stats().live_bytes == 0);
  CHECK(scope.stats().peak_bytes == 256 * 256 * sizeof(float));
}
