// SPDX-License-Identifier: MIT
// Shared pieces of the hostile-input tests (test_hostile_*.cpp): a matcher that requires every
// given fragment in an exception's message, a macro that also requires the type shape_error,
// and small constructors of inputs and of views with hand-made (bad) shapes.
#pragma once

#include <cmath>
#include <initializer_list>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include <seqmix/core/error.hpp>
#include <seqmix/core/tensor.hpp>

namespace hostile {

using seqmix::index_t;
using seqmix::shape_t;
using seqmix::tensor;
using seqmix::tensor_view;

/// Matches a message holding every fragment.
class contains_all : public Catch::MatcherBase<std::string> {
 public:
  explicit contains_all(std::vector<std::string> parts) : parts_(std::move(parts)) {}
  bool match(const std::string& s) const override {
    for (const auto& p : parts_) {
      if (s.find(p) == std::string::npos) return false;
    }
    return true;
  }
  std::string describe() const override {
    std::string d = "contains all of";
    for (const auto& p : parts_) d += " \"" + p + "\"";
    return d;
  }

 private:
  std::vector<std::string> parts_;
};
inline contains_all msg(std::initializer_list<std::string> parts) {
  return contains_all(parts);
}

inline constexpr float fnan = std::numeric_limits<float>::quiet_NaN();
inline constexpr float finf = std::numeric_limits<float>::infinity();

/// Random normal tensor (deterministic per salt).
template <std::size_t R>
tensor<float, R> randn(const shape_t<R>& shape, unsigned salt = 1, float scale = 1.f) {
  std::mt19937 rng(1000 + salt);
  std::normal_distribution<float> d(0.f, 1.f);
  tensor<float, R> t(shape);
  for (index_t i = 0; i < t.size(); ++i) t[i] = d(rng) * scale;
  return t;
}
/// Log gates in (-1, 0).
template <std::size_t R>
tensor<float, R> gates(const shape_t<R>& shape, unsigned salt = 2) {
  std::mt19937 rng(2000 + salt);
  std::uniform_real_distribution<float> d(-1.f, -0.01f);
  tensor<float, R> t(shape);
  for (index_t i = 0; i < t.size(); ++i) t[i] = d(rng);
  return t;
}

/// A view over `t`'s memory with another shape (contiguous strides): how a user hands a
/// mis-shaped or negative-extent view to an entry. Only shapes the checks reject before reading.
template <std::size_t R, class T, std::size_t Q>
tensor_view<T, R> reshaped(tensor<T, Q>& t, const shape_t<R>& shape) {
  return tensor_view<T, R>(t.data(), shape);
}

}  // namespace hostile

/// `expr` throws seqmix::shape_error whose message holds every fragment.
#define REQUIRE_SHAPE_ERROR(expr, ...)                      \
  do {                                                      \
    REQUIRE_THROWS_AS(expr, seqmix::shape_error);           \
    REQUIRE_THROWS_WITH(expr, hostile::msg({__VA_ARGS__})); \
  } while (false)
