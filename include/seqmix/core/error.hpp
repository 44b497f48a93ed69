// SPDX-License-Identifier: MIT
// Errors raised by seqmix's public entry points, and the checking helpers every entry uses.
//
// Every public function validates its arguments before touching memory. A failed check throws
// `seqmix::shape_error` (an `std::invalid_argument`) whose message names the function the user
// called, the argument as it appears in that function's signature, what was expected and what
// was given, e.g.
//   seqmix::gla::forward_chunked: argument 'k': expected shape [2, 64, 4, 32], got [2, 64, 4, 16]
// Shapes print every extent as given (a view's -1 prints as -1); an expected extent that accepts
// anything prints as "any". Values print NaN, +inf and -inf by name.
//
// Aliasing (checker::no_overlap): an output (or the in/out state) that shares memory with an
// input or another output is rejected. The test compares the byte ranges [lowest, highest
// element] the views span: O(rank) per pair, no allocation, so even `step` affords it. It is
// conservative: two strided views whose elements interleave without touching (e.g. o and v as
// alternating slices of one buffer) span overlapping ranges and are rejected too; pass separate
// buffers. In-place computation is never supported by the mixers: the engines read an input
// after writing outputs (tiles, chunks, the state) and would silently compute garbage. An output
// must also not overlap itself (checker::distinct_elements: no stride-0 broadcast as an output).
// Cost of all of a front's checks in a GLA step at H = 8, K = V = 64: 0.12-0.20 µs of CPU time
// against 2.7 µs for the step (4-7 %, measured on a loaded 2-core machine); the log-gate check
// (core/gate_check.hpp) is 12 ns of it (bench/bench_gated.cpp: BM_gla_step vs
// BM_gla_step_unchecked and BM_gla_gate_check).
#pragma once

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <span>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

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

/// Wildcard in an expected shape: any extent is accepted in that dimension. It is not a value a
/// view can meaningfully hold (a user's -1 extent is an error, not a wildcard).
inline constexpr index_t any_extent = std::numeric_limits<index_t>::min();

namespace detail {

/// "[2, -1, 4]": every extent as given.
inline std::string format_shape(std::span<const index_t> dims) {
  std::ostringstream out;
  out << '[';
  for (std::size_t i = 0; i < dims.size(); ++i) {
    if (i) out << ", ";
    out << dims[i];
  }
  out << ']';
  return out.str();
}

/// An expected shape: wildcards (any_extent) print as "any".
inline std::string format_expected_shape(std::span<const index_t> dims) {
  std::ostringstream out;
  out << '[';
  for (std::size_t i = 0; i < dims.size(); ++i) {
    if (i) out << ", ";
    if (dims[i] == any_extent) {
      out << "any";
    } else {
      out << dims[i];
    }
  }
  out << ']';
  return out.str();
}

/// A value for a message: NaN, +inf, -inf by name, else the shortest round-trip-ish form.
template <class T>
std::string format_value(T x) {
  if constexpr (std::is_floating_point_v<T>) {
    if (std::isnan(x)) return "NaN";
    if (std::isinf(x)) return x > 0 ? "+inf" : "-inf";
    std::ostringstream out;
    out.precision(std::numeric_limits<T>::max_digits10);
    out << x;
    return out.str();
  } else {
    return std::to_string(x);
  }
}

/// Row-major multi-index of flat position `flat` in `shape`, as "[0, 3, 1]".
inline std::string format_flat_index(std::span<const index_t> shape, index_t flat) {
  std::string out = "]";
  for (std::size_t d = shape.size(); d-- > 0;) {
    const index_t e = shape[d] > 0 ? shape[d] : 1;
    out.insert(0, std::to_string(flat % e));
    flat /= e;
    if (d) out.insert(0, ", ");
  }
  return "[" + out;
}

/// Calls f(flat, x) on every element of `view` in row-major order until f returns true;
/// returns that flat index, or -1.
template <class View, class F>
index_t find_first(const View& view, F&& f) {
  constexpr std::size_t R = View::rank;
  const auto& shape = view.shape();
  for (std::size_t d = 0; d < R; ++d) {
    if (shape[d] <= 0) return -1;
  }
  std::array<index_t, R> idx{};
  index_t flat = 0;
  for (;;) {
    if (f(*view.ptr(idx))) return flat;
    ++flat;
    std::size_t d = R;
    for (;;) {
      --d;
      if (++idx[d] < shape[d]) break;
      idx[d] = 0;
      if (d == 0) return -1;
    }
  }
}

[[noreturn]] inline void fail(std::string_view where, std::string_view argument,
                              std::string_view what) {
  std::ostringstream out;
  out << "seqmix::" << where << ": argument '" << argument << "': " << what;
  throw shape_error(out.str());
}

}  // namespace detail

/// The bytes a view spans, [lo, hi) as addresses, with the argument's name (checker::no_overlap).
struct memory_range {
  std::string_view name;
  std::uintptr_t lo = 0, hi = 0;  // lo == hi: empty (nothing to overlap)
};

/// The range of `view`: from its lowest to just past its highest element (negative strides
/// included). Empty and null views span nothing.
template <class View>
memory_range range_of(std::string_view name, const View& view) {
  if (view.data() == nullptr) return {name, 0, 0};
  for (index_t e : view.shape()) {
    if (e <= 0) return {name, 0, 0};
  }
  using E = typename View::value_type;
  index_t lo = 0, hi = 0;  // element offsets from data()
  for (std::size_t d = 0; d < View::rank; ++d) {
    const index_t span = (view.extent(d) - 1) * view.stride(d);
    if (span < 0) {
      lo += span;
    } else {
      hi += span;
    }
  }
  const auto base = reinterpret_cast<std::uintptr_t>(view.data());
  const auto size = static_cast<std::intptr_t>(sizeof(E));
  return {name, base + static_cast<std::uintptr_t>(static_cast<std::intptr_t>(lo) * size),
          base + static_cast<std::uintptr_t>(static_cast<std::intptr_t>(hi + 1) * size)};
}

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
    extents(argument, view);
    bool ok = expected.size() == actual.size();
    std::size_t d = 0;
    for (index_t e : expected) {
      if (!ok) break;
      if (e != any_extent && e != actual[d]) ok = false;
      ++d;
    }
    if (!ok) {
      fail(argument, "expected shape " +
                         detail::format_expected_shape({expected.begin(), expected.size()}) +
                         ", got " + detail::format_shape({actual.data(), actual.size()}));
    }
  }

  /// No extent of the view may be negative (a hand-made view with a bad shape).
  template <class View>
  void extents(std::string_view argument, const View& view) const {
    const auto& actual = view.shape();
    for (std::size_t d = 0; d < actual.size(); ++d) {
      if (actual[d] < 0) {
        fail(argument, "extents must be >= 0, got shape " +
                           detail::format_shape({actual.data(), actual.size()}) + " (dimension " +
                           std::to_string(d) + " is " + std::to_string(actual[d]) + ")");
      }
    }
  }

  /// The view must hold at least one element (and no negative extent).
  template <class View>
  void nonempty(std::string_view argument, const View& view) const {
    extents(argument, view);
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
  /// and +inf gates would poison the state silently. One scalar pass; the mixers use the
  /// vectorised check_log_gates (core/gate_check.hpp), which also rejects gates > 0.
  template <class View>
  void log_gate(std::string_view argument, const View& view) const {
    const index_t at =
        detail::find_first(view, [](auto x) { return std::isnan(x) || (std::isinf(x) && x > 0); });
    if (at >= 0) {
      fail(argument, "log gates must be finite or -inf, got " + value_at(view, at));
    }
  }

  /// Every element must be finite.
  template <class View>
  void finite(std::string_view argument, const View& view) const {
    const index_t at = detail::find_first(view, [](auto x) { return !std::isfinite(x); });
    if (at >= 0) fail(argument, "must be finite, got " + value_at(view, at));
  }

  /// A scalar (an option) must be finite.
  template <class T>
  void finite_value(std::string_view argument, T x) const {
    if (!std::isfinite(x)) fail(argument, "must be finite, got " + detail::format_value(x));
  }

  /// "NaN at [0, 3, 1]": the element at flat row-major position `flat` of `view`.
  template <class View>
  static std::string value_at(const View& view, index_t flat) {
    const auto& shape = view.shape();
    std::array<index_t, View::rank> idx{};
    index_t rest = flat;
    for (std::size_t d = View::rank; d-- > 0;) {
      idx[d] = rest % shape[d];
      rest /= shape[d];
    }
    return detail::format_value(*view.ptr(idx)) + " at " +
           detail::format_flat_index({shape.data(), shape.size()}, flat);
  }

  /// An output (or the state) must address a distinct element for every index: a stride-0
  /// (broadcast) or otherwise self-overlapping view would have the kernels' writes overwrite
  /// each other. Sufficient test, O(rank²): with the dimensions of extent > 1 ordered by |stride|,
  /// each stride exceeds the span of the dimensions inside it.
  template <class View>
  void distinct_elements(std::string_view argument, const View& view) const {
    constexpr std::size_t R = View::rank;
    std::array<index_t, R> st{}, ex{};
    std::size_t n = 0;
    for (std::size_t d = 0; d < R; ++d) {
      if (view.extent(d) > 1) {
        st[n] = view.stride(d) < 0 ? -view.stride(d) : view.stride(d);
        ex[n] = view.extent(d);
        ++n;
      }
    }
    for (std::size_t i = 1; i < n; ++i) {  // insertion sort by stride
      for (std::size_t j = i; j > 0 && st[j] < st[j - 1]; --j) {
        std::swap(st[j], st[j - 1]);
        std::swap(ex[j], ex[j - 1]);
      }
    }
    index_t span = 0;  // largest offset the inner dimensions reach
    for (std::size_t i = 0; i < n; ++i) {
      if (st[i] <= span) {
        const auto& sh = view.shape();
        const auto& sd = view.strides();
        fail(argument,
             "is written, so every index must address its own element: expected "
             "non-overlapping strides, got strides " +
                 detail::format_shape({sd.data(), sd.size()}) + " for shape " +
                 detail::format_shape({sh.data(), sh.size()}));
      }
      span += (ex[i] - 1) * st[i];
    }
  }

  /// No output may share memory with an input, nor with another output (the state counts as an
  /// output: it is written). Compares byte ranges (see the header comment); allocates nothing
  /// unless it throws.
  void no_overlap(std::initializer_list<memory_range> outputs,
                  std::initializer_list<memory_range> inputs) const {
    for (auto o = outputs.begin(); o != outputs.end(); ++o) {
      for (const memory_range& i : inputs) overlap_pair(*o, i);
      for (auto p = o + 1; p != outputs.end(); ++p) overlap_pair(*o, *p);
    }
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
  void overlap_pair(const memory_range& out, const memory_range& in) const {
    if (out.lo == out.hi || in.lo == in.hi) return;
    const std::uintptr_t lo = out.lo > in.lo ? out.lo : in.lo;
    const std::uintptr_t hi = out.hi < in.hi ? out.hi : in.hi;
    if (lo < hi) {
      fail(out.name, "must not share memory with argument '" + std::string(in.name) +
                         "': expected disjoint memory, got " + std::to_string(hi - lo) +
                         " bytes in common (" + std::to_string(out.hi - out.lo) + " and " +
                         std::to_string(in.hi - in.lo) +
                         " bytes spanned); outputs and the state are written while inputs are "
                         "read: pass separate buffers");
    }
  }

  std::string_view where_;
};

}  // namespace seqmix
