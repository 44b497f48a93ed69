// SPDX-License-Identifier: MIT
// Errors raised by seqmix's public entry points, and the checking helpers every entry uses.
//
// Every public function validates its arguments before touching memory. A failed check throws
// `seqmix::shape_error` (an `std::invalid_argument`) whose message names the function, the
// argument, what was expected and what was given, e.g.
//   seqmix::gla::forward_chunked: argument 'k': expected shape [2, 64, 4, 32], got [2, 64, 4, 16]
#pragma once

#include <cmath>
#include <cstddef>
#include <initializer_list>
#include <span>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>

namespace seqmix {

using index_t = std::ptrdiff_t;

/// Wrong shape, stride, size or value of an argument of a public function.
class shape_error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// A file or stream could not be read or written (safetensors I/O).
class io_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Wildcard in an expected shape: any extent is accepted in that dimension.
inline constexpr index_t any_extent = -1;

namespace detail {

inline std::string format_shape(std::span<const index_t> dims) {
  std::ostringstream out;
  out << '[';
  for (std::size_t i = 0; i < dims.size(); ++i) {
    if (i) out << ", ";
    if (dims[i] == any_extent) {
      out << '*';
    } else {
      out << dims[i];
    }
  }
  out << ']';
  return out.str();
}

[[noreturn]] inline void fail(std::string_view where, std::string_view argument,
                              std::string_view what) {
  std::ostringstream out;
  out << "seqmix::" << where << ": argument '" << argument << "': " << what;
  throw shape_error(out.str());
}

}  // namespace detail

/// Names the public function being checked, so every message starts with it.
/// Usage: `checker check{"gla::forward_chunked"}; check.shape("q", q, {B, T, H, K});`
class checker {
 public:
  explicit checker(std::string_view where) : where_(where) {}

  [[noreturn]] void fail(std::string_view argument, std::string_view what) const {
    detail::fail(where_, argument, what);
  }

  /// Shape of `view` must equal `expected` (entries equal to `any_extent` match anything).
  template <class View>
  void shape(std::string_view argument, const View& view,
             std::initializer_list<index_t> expected) const {
    const auto& actual = view.shape();
    bool ok = expected.size() == actual.size();
    std::size_t d = 0;
    for (index_t e : expected) {
      if (!ok) break;
      if (e != any_extent && e != actual[d]) ok = false;
      ++d;
    }
    if (!ok) {
      fail(argument, "expected shape " + detail::format_shape({expected.begin(), expected.size()}) +
                         ", got " + detail::format_shape({actual.data(), actual.size()}));
    }
  }

  /// The view must hold at least one element.
  template <class View>
  void nonempty(std::string_view argument, const View& view) const {
    if (view.size() == 0) {
      const auto& actual = view.shape();
      fail(argument,
           "must not be empty, got shape " + detail::format_shape({actual.data(), actual.size()}));
    }
  }

  /// The innermost dimension must be contiguous (stride 1): SIMD kernels read rows.
  template <class View>
  void inner_contiguous(std::string_view argument, const View& view) const {
    if (view.rank > 0 && view.shape()[view.rank - 1] > 1 && view.strides()[view.rank - 1] != 1) {
      fail(argument, "innermost dimension must have stride 1, got stride " +
                         std::to_string(view.strides()[view.rank - 1]));
    }
  }

  /// A scalar condition on an argument; `what` says what was expected.
  void require(bool condition, std::string_view argument, std::string_view what) const {
    if (!condition) fail(argument, what);
  }

  /// Every element must be finite or -inf (a log gate of -inf means "forget everything"); NaN
  /// and +inf gates would poison the state silently. Cheap: one pass over the gate tensor.
  template <class View>
  void log_gate(std::string_view argument, const View& view) const {
    bool bad = false;
    view.for_each([&](auto x) {
      if (std::isnan(x) || (std::isinf(x) && x > 0)) bad = true;
    });
    if (bad) fail(argument, "log gates must be finite or -inf (found NaN or +inf)");
  }

  /// Every element must be finite.
  template <class View>
  void finite(std::string_view argument, const View& view) const {
    bool bad = false;
    view.for_each([&](auto x) {
      if (!std::isfinite(x)) bad = true;
    });
    if (bad) fail(argument, "must be finite (found NaN or inf)");
  }

  /// Offsets of N packed sequences in an input of B rows and T tokens: B == 1, N + 1 >= 2
  /// offsets, the first 0, the last T, non-decreasing. Returns N. Messages are built only on
  /// failure (one-token steps must not allocate).
  index_t cu_seqlens(std::span<const index_t> cu, index_t B, index_t T) const {
    if (B != 1) fail("cu_seqlens", "packed sequences need B == 1, got B = " + std::to_string(B));
    if (cu.size() < 2) {
      fail("cu_seqlens", "needs N + 1 >= 2 offsets, got " + std::to_string(cu.size()));
    }
    if (cu.front() != 0) {
      fail("cu_seqlens", "first offset must be 0, got " + std::to_string(cu.front()));
    }
    if (cu.back() != T) {
      fail("cu_seqlens",
           "last offset must be T = " + std::to_string(T) + ", got " + std::to_string(cu.back()));
    }
    for (std::size_t i = 1; i < cu.size(); ++i) {
      if (cu[i] < cu[i - 1]) {
        fail("cu_seqlens", "offsets must be non-decreasing (offset " + std::to_string(i) + " is " +
                               std::to_string(cu[i]) + " < " + std::to_string(cu[i - 1]) + ")");
      }
    }
    return static_cast<index_t>(cu.size()) - 1;
  }

  std::string_view where() const { return where_; }

 private:
  std::string_view where_;
};

}  // namespace seqmix
