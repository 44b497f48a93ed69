// SPDX-License-Identifier: MIT
// tensor_view<T, R>: a non-owning strided view of rank R <= 5 over elements of type T; use
// `tensor_view<const T, R>` for inputs, so the direction of data is checked by the compiler
// (a view of const cannot be written, a tensor_view<T> does not bind to const data).
//
// Element (i0, .., iR-1) lives at data() + Σ i_d · stride(d) (strides in elements, may be 0 for
// broadcast dimensions). Every view operation is O(R), copies nothing, and checks its arguments
// (a bad dimension, index, range or part size is a seqmix::shape_error naming the operation, the
// argument and the expected and actual value). Element access `v(i, j, ..)` / ptr() is the
// unchecked hot path; `at(i, j, ..)` checks.
//
//   tensor_view<const float, 2> x = fused;          // [T, 3·H·D]: q | k | v of a fused projection
//   auto k = x.slice(1, H * D, 2 * H * D);          // [T, H·D] column block, row stride 3·H·D
//   auto k3 = k.split(1, {H, D});                   // [T, H, D], strides {3·H·D, D, 1}, no copy
//   auto kt = k3.permute({1, 0, 2});                // [H, T, D]
//   auto o2 = o3.merge(1);                          // [T, H, D] -> [T, H·D]
//   auto bias = b.unsqueeze(0).broadcast_to({T, N}); // [N] -> [T, N] with row stride 0 (read-only)
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <string>
#include <type_traits>

#include <seqmix/core/error.hpp>
#include <seqmix/core/memory.hpp>

namespace seqmix {

template <class T, std::size_t R>
class tensor;
template <class T, std::size_t R>
class tensor_view;

template <std::size_t R>
using shape_t = std::array<index_t, R>;

namespace detail {

template <std::size_t R>
constexpr shape_t<R> contiguous_strides(const shape_t<R>& shape) {
  shape_t<R> strides{};
  index_t s = 1;
  for (std::size_t d = R; d-- > 0;) {
    strides[d] = s;
    s *= shape[d];
  }
  return strides;
}

/// Product of the extents (unchecked: views and tensors validate their shape when made).
template <std::size_t R>
constexpr index_t element_count(const shape_t<R>& shape) {
  index_t n = 1;
  for (index_t e : shape) n *= e;
  return n;
}

template <std::size_t R>
std::string shape_string(const shape_t<R>& s) {
  return dims_string({s.data(), R});
}

inline std::string range_string(index_t lo, index_t hi) {
  std::string out = "[";  // appended, not "[" + to_string(..): g++ 12 -O3 warns (-Wrestrict)
  out += std::to_string(lo);
  out += ", ";
  out += std::to_string(hi);
  out += ")";
  return out;
}

}  // namespace detail

/// Non-owning strided view of rank R over elements of type T (use `const T` for inputs).
template <class T, std::size_t R>
class tensor_view {
  static_assert(R >= 1 && R <= 5, "seqmix tensors have rank 1 to 5");

 public:
  using value_type = std::remove_const_t<T>;
  using element_type = T;
  static constexpr std::size_t rank = R;

  constexpr tensor_view() = default;
  /// A view over external memory with explicit strides (in elements). Extents must be >= 0 with
  /// a product that fits in index_t, and data may be null only for an empty view.
  constexpr tensor_view(T* data, const shape_t<R>& shape, const shape_t<R>& strides)
      : data_(data), shape_(shape), strides_(strides) {
    validate("tensor_view", "shape");
  }
  /// A contiguous row-major view over external memory.
  constexpr tensor_view(T* data, const shape_t<R>& shape) : data_(data), shape_(shape), strides_{} {
    validate("tensor_view", "shape");  // before the strides: their products must not overflow
    strides_ = detail::contiguous_strides<R>(shape);
  }

  /// Mutable view -> read-only view.
  template <class U>
  requires(std::is_same_v<const U, T> && !std::is_same_v<U, T>) constexpr tensor_view(
      const tensor_view<U, R>& other)  // NOLINT: implicit by design
      : data_(other.data()), shape_(other.shape()), strides_(other.strides()) {}

  /// Tensor -> view (a read-only view also binds to a const tensor).
  template <class U>
  requires(std::is_same_v<std::remove_const_t<T>, U>) constexpr tensor_view(
      tensor<U, R>& t)  // NOLINT: implicit by design
      : tensor_view(t.view()) {}
  template <class U>
  requires(std::is_same_v<const U, T>) constexpr tensor_view(
      const tensor<U, R>& t)  // NOLINT: implicit by design
      : tensor_view(t.view()) {}

  constexpr T* data() const noexcept { return data_; }
  constexpr const shape_t<R>& shape() const noexcept { return shape_; }
  constexpr const shape_t<R>& strides() const noexcept { return strides_; }
  constexpr index_t extent(std::size_t d) const noexcept { return shape_[d]; }
  constexpr index_t stride(std::size_t d) const noexcept { return strides_[d]; }
  constexpr index_t size() const noexcept { return detail::element_count<R>(shape_); }
  constexpr bool empty() const noexcept { return size() == 0; }

  /// True when the view is dense and row-major (strides of size-1 dimensions are ignored).
  constexpr bool is_contiguous() const noexcept {
    index_t expect = 1;
    for (std::size_t d = R; d-- > 0;) {
      if (shape_[d] != 1 && strides_[d] != expect) return false;
      expect *= shape_[d];
    }
    return true;
  }

  /// Element access, unchecked (the hot path; see at()).
  template <class... I>
  requires(sizeof...(I) == R && (std::is_integral_v<I> && ...)) constexpr T& operator()(
      I... idx) const noexcept {
    const std::array<index_t, R> i{static_cast<index_t>(idx)...};
    index_t off = 0;
    for (std::size_t d = 0; d < R; ++d) off += i[d] * strides_[d];
    return data_[off];
  }

  /// Element access with every index checked against its extent.
  template <class... I>
  requires(sizeof...(I) == R && (std::is_integral_v<I> && ...)) T& at(I... idx) const {
    const std::array<index_t, R> i{static_cast<index_t>(idx)...};
    for (std::size_t d = 0; d < R; ++d) check_index("tensor_view::at", "idx", d, i[d]);
    return *ptr(i);
  }

  /// Pointer to element `idx` (`idx` has R entries), unchecked.
  constexpr T* ptr(const shape_t<R>& idx) const noexcept {
    index_t off = 0;
    for (std::size_t d = 0; d < R; ++d) off += idx[d] * strides_[d];
    return data_ + off;
  }

  // ---- views ------------------------------------------------------------------------------

  /// Drops dimension D at index i (0 <= i < extent(D)): a rank R-1 view.
  template <std::size_t D>
  requires(D<R && R> 1) constexpr tensor_view<T, R - 1> select(index_t i) const {
    return select_impl("tensor_view::select", D, i);
  }
  /// Drops dimension `dim` at index i.
  constexpr tensor_view<T, R - 1> select(std::size_t dim, index_t i) const requires(R > 1) {
    check_dim("tensor_view::select", dim);
    return select_impl("tensor_view::select", dim, i);
  }

  /// Elements [begin, end) of dimension D (0 <= begin <= end <= extent(D)).
  template <std::size_t D>
  requires(D < R) constexpr tensor_view slice(index_t begin, index_t end) const {
    return slice_impl("tensor_view::slice", D, begin, end);
  }
  /// Elements [begin, end) of dimension `dim`; e.g. the column block of k in a fused [T, 3·H·D]
  /// projection is slice(1, H·D, 2·H·D).
  constexpr tensor_view slice(std::size_t dim, index_t begin, index_t end) const {
    check_dim("tensor_view::slice", dim);
    return slice_impl("tensor_view::slice", dim, begin, end);
  }

  /// Swaps dimensions D0 and D1.
  template <std::size_t D0, std::size_t D1>
  requires(D0 < R && D1 < R) constexpr tensor_view transpose() const noexcept {
    tensor_view r = *this;
    std::swap(r.shape_[D0], r.shape_[D1]);
    std::swap(r.strides_[D0], r.strides_[D1]);
    return r;
  }
  /// Matrix transpose of a rank-2 view.
  constexpr tensor_view transpose() const noexcept requires(R == 2) { return transpose<0, 1>(); }
  /// Swaps dimensions d0 and d1.
  constexpr tensor_view transpose(std::size_t d0, std::size_t d1) const {
    check_dim("tensor_view::transpose", d0, "d0");
    check_dim("tensor_view::transpose", d1, "d1");
    tensor_view r = *this;
    std::swap(r.shape_[d0], r.shape_[d1]);
    std::swap(r.strides_[d0], r.strides_[d1]);
    return r;
  }

  /// Reorders dimensions: dimension d of the result is dimension order[d] of this view
  /// (`order` must be a permutation of 0 .. R-1).
  constexpr tensor_view permute(const std::array<std::size_t, R>& order) const {
    return permute_impl("tensor_view::permute", order);
  }

  /// Splits dimension `dim` (extent = Π parts) into N dimensions of extents `parts`, outermost
  /// first, without a copy: a strided [T, H·D] block becomes [T, H, D]. At most one part may be
  /// -1 (or any_extent): it is inferred from the extent.
  template <std::size_t N>
  requires(N >= 1 && R + N - 1 <= 5) constexpr tensor_view<T, R + N - 1> split(
      std::size_t dim, const index_t (&parts)[N]) const {
    return split_impl<N>("tensor_view::split", dim, parts);
  }

  /// Merges dimensions dim and dim + 1 into one of extent extent(dim) · extent(dim + 1), without
  /// a copy (split's inverse: [T, H, D] -> [T, H·D]); needs stride(dim) == stride(dim + 1) ·
  /// extent(dim + 1), which a split always leaves.
  constexpr tensor_view<T, R - 1> merge(std::size_t dim) const requires(R > 1) {
    return merge_impl("tensor_view::merge", dim);
  }

  /// Inserts a dimension of extent 1 (stride 0) before dimension `dim` (0 <= dim <= R).
  constexpr tensor_view<T, R + 1> unsqueeze(std::size_t dim) const requires(R < 5) {
    return unsqueeze_impl("tensor_view::unsqueeze", dim);
  }
  /// Removes dimension `dim`, which must have extent 1.
  constexpr tensor_view<T, R - 1> squeeze(std::size_t dim) const requires(R > 1) {
    return squeeze_impl("tensor_view::squeeze", dim);
  }

  /// Read-only view of extents `shape`: every dimension keeps its extent or, where this view has
  /// extent 1, repeats it with stride 0. Read-only because writing through a stride-0 dimension
  /// would write one element many times (a race under threads).
  constexpr tensor_view<const value_type, R> broadcast_to(const shape_t<R>& shape) const {
    return broadcast_impl("tensor_view::broadcast_to", shape);
  }

  /// Same elements under another shape; the view must be contiguous and keep its size.
  template <std::size_t R2>
  tensor_view<T, R2> reshape(const shape_t<R2>& new_shape) const {
    return reshape_impl<R2>("tensor_view::reshape", new_shape);
  }

  // ---- element-wise -----------------------------------------------------------------------

  /// Calls f(x) on every element, in row-major order.
  template <class F>
  void for_each(F&& f) const {
    if (empty()) return;
    shape_t<R> idx{};
    for (;;) {
      f(*ptr(idx));
      std::size_t d = R;
      while (d-- > 0) {
        if (++idx[d] < shape_[d]) break;
        idx[d] = 0;
        if (d == 0) return;
      }
    }
  }

  /// Sets every element to `value` (mutable views only).
  void fill(value_type value) const requires(!std::is_const_v<T>) {
    if (is_contiguous()) {
      std::fill_n(data_, size(), value);
    } else {
      for_each([&](T& x) { x = value; });
    }
  }

 private:
  template <class, std::size_t>
  friend class tensor_view;
  template <class, std::size_t>
  friend class tensor;

  struct unchecked_t {};
  // Derived views of a valid view are valid: no re-validation.
  constexpr tensor_view(unchecked_t, T* data, const shape_t<R>& shape, const shape_t<R>& strides)
      : data_(data), shape_(shape), strides_(strides) {}

  constexpr void validate(const char* where, const char* argument) const {
    bool bad = false;
    for (index_t e : shape_) bad = bad || e < 0;
    if (bad || detail::checked_element_count(shape_) < 0) {
      detail::fail(where, argument,
                   "extents must be >= 0 with a product that fits in index_t, got " +
                       detail::shape_string<R>(shape_));
    }
    if (data_ == nullptr && size() > 0) {
      detail::fail(where, "data",
                   "is null for a non-empty shape " + detail::shape_string<R>(shape_));
    }
  }
  // Checks are inline (so the compiler sees that an index past them is in range); their
  // messages are built out of line, on failure only.
  constexpr void check_dim(const char* where, std::size_t dim, const char* argument = "dim",
                           std::size_t limit = R) const {
    if (dim >= limit) [[unlikely]]
      dim_error(where, argument, dim, limit);
  }
  [[noreturn]] static void dim_error(const char* where, const char* argument, std::size_t dim,
                                     std::size_t limit) {
    detail::fail(where, argument,
                 "expected a dimension in [0, " + std::to_string(limit) + ") of a rank-" +
                     std::to_string(R) + " view, got " + std::to_string(dim));
  }
  constexpr void check_index(const char* where, const char* argument, std::size_t dim,
                             index_t i) const {
    if (i < 0 || i >= shape_[dim]) [[unlikely]]
      index_error(where, argument, dim, i);
  }
  [[noreturn]] void index_error(const char* where, const char* argument, std::size_t dim,
                                index_t i) const {
    detail::fail(where, argument,
                 "index of dimension " + std::to_string(dim) + " must be in " +
                     detail::range_string(0, shape_[dim]) + " (shape " +
                     detail::shape_string<R>(shape_) + "), got " + std::to_string(i));
  }

  constexpr tensor_view<T, R - 1> select_impl(const char* where, std::size_t dim, index_t i) const {
    check_index(where, "i", dim, i);
    shape_t<R - 1> s{}, st{};
    for (std::size_t d = 0, j = 0; d < R; ++d) {
      if (d == dim) continue;
      s[j] = shape_[d];
      st[j] = strides_[d];
      ++j;
    }
    return {typename tensor_view<T, R - 1>::unchecked_t{}, data_ + i * strides_[dim], s, st};
  }

  constexpr tensor_view slice_impl(const char* where, std::size_t dim, index_t begin,
                                   index_t end) const {
    if (begin < 0 || begin > shape_[dim]) {
      detail::fail(where, "begin",
                   "must be in [0, " + std::to_string(shape_[dim]) + "] (extent of dimension " +
                       std::to_string(dim) + " of " + detail::shape_string<R>(shape_) + "), got " +
                       std::to_string(begin));
    }
    if (end < begin || end > shape_[dim]) {
      detail::fail(where, "end",
                   "must be in [begin, extent] = [" + std::to_string(begin) + ", " +
                       std::to_string(shape_[dim]) + "] (dimension " + std::to_string(dim) +
                       " of " + detail::shape_string<R>(shape_) + "), got " + std::to_string(end));
    }
    shape_t<R> s = shape_;
    s[dim] = end - begin;
    // An empty slice at the end points at the end, never past it.
    return {unchecked_t{}, data_ + begin * strides_[dim], s, strides_};
  }

  constexpr tensor_view permute_impl(const char* where,
                                     const std::array<std::size_t, R>& order) const {
    std::array<bool, R> seen{};
    for (std::size_t d = 0; d < R; ++d) {
      const std::size_t o = order[d];
      if (o >= R || seen[o]) {
        std::string got = "[";
        for (std::size_t j = 0; j < R; ++j) got += (j ? ", " : "") + std::to_string(order[j]);
        detail::fail(
            where, "order",
            "expected a permutation of 0 .. " + std::to_string(R - 1) + ", got " + got + "]");
      }
      seen[o] = true;
    }
    tensor_view r = *this;
    for (std::size_t d = 0; d < R; ++d) {
      r.shape_[d] = shape_[order[d]];
      r.strides_[d] = strides_[order[d]];
    }
    return r;
  }

  template <std::size_t N>
  constexpr tensor_view<T, R + N - 1> split_impl(const char* where, std::size_t dim,
                                                 const index_t (&parts)[N]) const {
    check_dim(where, dim);
    const index_t extent = shape_[dim];
    std::array<index_t, N> p{};
    index_t known = 1;
    std::size_t wildcard = N;
    auto parts_string = [&] { return detail::dims_string({parts, N}); };
    for (std::size_t j = 0; j < N; ++j) {
      p[j] = parts[j];
      if ((p[j] == -1 || p[j] == any_extent) && wildcard == N) {
        wildcard = j;
      } else if (p[j] < 0 || !detail::checked_mul(known, p[j], known)) {
        detail::fail(where, "parts",
                     "expected extents >= 0 (at most one -1 to infer) with a product that fits, "
                     "got " +
                         parts_string());
      }
    }
    if (wildcard != N) {
      if (known == 0 || extent % known != 0) {
        detail::fail(where, "parts",
                     "cannot infer the -1 in " + parts_string() + ": extent " +
                         std::to_string(extent) + " of dimension " + std::to_string(dim) +
                         " is not a multiple of " + std::to_string(known));
      }
      p[wildcard] = extent / known;
      known = extent;
    }
    if (known != extent) {
      detail::fail(where, "parts",
                   "product must equal extent " + std::to_string(extent) + " of dimension " +
                       std::to_string(dim) + " of " + detail::shape_string<R>(shape_) + ", got " +
                       parts_string() + " (product " + std::to_string(known) + ")");
    }
    shape_t<R + N - 1> s{}, st{};
    std::size_t j = 0;
    for (std::size_t d = 0; d < R; ++d) {
      if (d != dim) {
        s[j] = shape_[d];
        st[j] = strides_[d];
        ++j;
        continue;
      }
      index_t inner = strides_[d];
      for (std::size_t q = N; q-- > 0;) {
        s[j + q] = p[q];
        st[j + q] = inner;
        inner *= p[q];
      }
      j += N;
    }
    return {typename tensor_view<T, R + N - 1>::unchecked_t{}, data_, s, st};
  }

  constexpr tensor_view<T, R - 1> merge_impl(const char* where, std::size_t dim) const {
    check_dim(where, dim, "dim", R - 1);
    const index_t e0 = shape_[dim], e1 = shape_[dim + 1];
    index_t stride = strides_[dim + 1];
    if (e1 == 1) {
      stride = strides_[dim];
    } else if (e0 != 1 && e0 * e1 != 0 && strides_[dim] != strides_[dim + 1] * e1) {
      detail::fail(where, "dim",
                   "dimensions " + std::to_string(dim) + " and " + std::to_string(dim + 1) +
                       " of shape " + detail::shape_string<R>(shape_) + " with strides " +
                       detail::shape_string<R>(strides_) +
                       " are not adjacent in memory (need stride " +
                       std::to_string(strides_[dim + 1] * e1) + " for dimension " +
                       std::to_string(dim) + ")");
    }
    shape_t<R - 1> s{}, st{};
    for (std::size_t d = 0, j = 0; d < R; ++d) {
      if (d == dim + 1) continue;
      s[j] = d == dim ? e0 * e1 : shape_[d];
      st[j] = d == dim ? stride : strides_[d];
      ++j;
    }
    return {typename tensor_view<T, R - 1>::unchecked_t{}, data_, s, st};
  }

  constexpr tensor_view<T, R + 1> unsqueeze_impl(const char* where, std::size_t dim) const {
    check_dim(where, dim, "dim", R + 1);
    shape_t<R + 1> s{}, st{};
    for (std::size_t d = 0, j = 0; d <= R; ++d) {
      if (d == dim) {
        s[d] = 1;
        st[d] = 0;
        continue;
      }
      s[d] = shape_[j];
      st[d] = strides_[j];
      ++j;
    }
    return {typename tensor_view<T, R + 1>::unchecked_t{}, data_, s, st};
  }

  constexpr tensor_view<T, R - 1> squeeze_impl(const char* where, std::size_t dim) const {
    check_dim(where, dim);
    if (shape_[dim] != 1) {
      detail::fail(where, "dim",
                   "dimension " + std::to_string(dim) + " of " + detail::shape_string<R>(shape_) +
                       " must have extent 1, got " + std::to_string(shape_[dim]));
    }
    return select_impl(where, dim, 0);
  }

  constexpr tensor_view<const value_type, R> broadcast_impl(const char* where,
                                                            const shape_t<R>& shape) const {
    shape_t<R> st = strides_;
    for (std::size_t d = 0; d < R; ++d) {
      if (shape[d] == shape_[d]) continue;
      if (shape_[d] != 1 || shape[d] < 0) {
        detail::fail(where, "shape",
                     "expected the extents of " + detail::shape_string<R>(shape_) +
                         " (or any extent >= 0 where it is 1), got " +
                         detail::shape_string<R>(shape));
      }
      st[d] = 0;
    }
    if (detail::checked_element_count(shape) < 0) {
      detail::fail(where, "shape",
                   "element count of " + detail::shape_string<R>(shape) + " overflows index_t");
    }
    return {typename tensor_view<const value_type, R>::unchecked_t{}, data_, shape, st};
  }

  template <std::size_t R2>
  tensor_view<T, R2> reshape_impl(const char* where, const shape_t<R2>& new_shape) const {
    if (!is_contiguous()) {
      detail::fail(where, "this",
                   "must be contiguous, got shape " + detail::shape_string<R>(shape_) +
                       " with strides " + detail::shape_string<R>(strides_));
    }
    const index_t n = detail::checked_element_count({new_shape.data(), R2});
    if (n != size()) {
      detail::fail(where, "new_shape",
                   "must hold the " + std::to_string(size()) + " elements of " +
                       detail::shape_string<R>(shape_) + ", got " +
                       detail::shape_string<R2>(new_shape));
    }
    return {typename tensor_view<T, R2>::unchecked_t{}, data_, new_shape,
            detail::contiguous_strides<R2>(new_shape)};
  }

  T* data_ = nullptr;
  shape_t<R> shape_{};
  shape_t<R> strides_{};
};

}  // namespace seqmix
