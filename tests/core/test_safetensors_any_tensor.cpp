// SPDX-License-Identifier: MIT
// any_tensor: owned and borrowed storage, checked views, converting copies, size checks.
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include <seqmix/core/any_tensor.hpp>

#include "test_safetensors_util.hpp"

using namespace seqmix;
using namespace seqmix::testing::io;
using Catch::Matchers::Contains;

TEST_CASE("any_tensor: owned storage, checked views and converting copies", "[core][any_tensor]") {
  any_tensor t("w", dtype::bf16, {2, 3});
  CHECK(t.owns_data());
  CHECK(t.size() == 6);
  CHECK(t.nbytes() == 12);
  CHECK(t.rank() == 2);
  CHECK(reinterpret_cast<std::uintptr_t>(t.data()) % 64 == 0);
  auto* p = reinterpret_cast<bf16*>(t.mutable_data());
  for (int i = 0; i < 6; ++i) {
    CHECK(p[i].bits == 0);  // zero-initialised
    p[i] = bf16_from_float(float(i) + 0.5f);
  }
  const auto v = t.view<bf16, 2>();
  CHECK(v.shape() == shape_t<2>{2, 3});
  CHECK(to_float(v(1, 2)) == 5.5f);
  const auto f = t.to<float, 2>();
  const auto d = t.to<double, 2>();
  for (index_t i = 0; i < 6; ++i) {
    CHECK(f[i] == float(i) + 0.5f);
    CHECK(d[i] == double(i) + 0.5);
  }
  CHECK(t.to_vector<float>()[5] == 5.5f);
  std::vector<float> out(6);
  t.copy_to(out.data(), out.size());
  CHECK(out[2] == 2.5f);
  CHECK_THROWS_AS(t.copy_to(out.data(), 5), shape_error);
  CHECK_THAT(io_error_of([&] { (void)t.view<float, 2>(); }),
             Contains("any_tensor::view") && Contains("tensor 'w'") &&
                 Contains("expected dtype F32 and rank 2, found BF16 and rank 2 [2, 3]"));
  CHECK_THAT(io_error_of([&] { (void)t.view<bf16, 1>(); }),
             Contains("expected dtype BF16 and rank 1, found BF16 and rank 2"));
  CHECK_THAT(io_error_of([&] { (void)t.to<float, 3>(); }),
             Contains("any_tensor::to") && Contains("has rank 2, expected rank 3"));
  // 0.5 fractions do not fit an integer
  CHECK_THAT(io_error_of([&] { (void)t.to_vector<std::int32_t>(); }),
             Contains("element 0 = 0.5 does not convert exactly to int32"));
  // copies share the bytes
  any_tensor copy = t;
  CHECK(copy.data() == t.data());
}

TEST_CASE("any_tensor: borrowed bytes, typed copies and size checks", "[core][any_tensor]") {
  auto keep = std::make_shared<std::vector<std::int64_t>>(std::vector<std::int64_t>{1, -2, 3, 4});
  const auto* bytes = reinterpret_cast<const std::byte*>(keep->data());
  auto b = any_tensor::borrow("ids", dtype::i64, {2, 2}, bytes, 32, keep);
  keep.reset();  // the tensor keeps the bytes alive
  CHECK_FALSE(b.owns_data());
  CHECK(b.view<std::int64_t, 2>()(1, 0) == 3);
  CHECK(b.to_vector<std::int32_t>() == std::vector<std::int32_t>{1, -2, 3, 4});
  CHECK_THAT(io_error_of([&] { (void)b.to_vector<std::uint8_t>(); }),
             Contains("element 1 = -2 does not convert exactly to uint8"));
  CHECK_THAT(io_error_of([&] { (void)b.mutable_data(); }), Contains("read-only"));
  CHECK_THAT(
      io_error_of([&] { (void)any_tensor::borrow("x", dtype::f32, {3}, bytes, 8, nullptr); }),
      Contains("does not match its 8 bytes"));
  CHECK_THAT(io_error_of([&] {
               (void)any_tensor::borrow("x", dtype::f32, {std::numeric_limits<index_t>::max(), 2},
                                        bytes, 0, nullptr);
             }),
             Contains("does not match"));
  CHECK_THROWS_AS(any_tensor("x", dtype::f32, {-1}), shape_error);
  CHECK_THROWS_AS(any_tensor("x", dtype::f32, {index_t(1) << 62}), shape_error);
  CHECK_THROWS_AS(any_tensor("x", dtype::u8, {index_t(1) << 32, index_t(1) << 32}), shape_error);
  // copy_of keeps values and dtype, any strides
  tensor<float, 2> src({3, 4});
  for (index_t i = 0; i < src.size(); ++i) src[i] = float(i);
  const tensor_view<const float, 2> col(src.data() + 1, {3, 2}, {4, 2});  // columns 1 and 3
  const auto c = any_tensor::copy_of<float, 2>("cols", col);
  CHECK(c.type() == dtype::f32);
  CHECK(c.to_vector<float>() == std::vector<float>{1, 3, 5, 7, 9, 11});
  CHECK(c.to_vector<bf16>()[1].bits == bf16_from_float(3.0f).bits);
  CHECK(c.to_vector<f16>()[5].bits == f16_from_float(11.0f).bits);
  CHECK(c.to_vector<std::uint8_t>()[5] == 11);
  // scalars (rank 0) hold one element
  any_tensor s("s", dtype::f64, {});
  CHECK(s.size() == 1);
  CHECK(s.to_vector<float>() == std::vector<float>{0.0f});
}
