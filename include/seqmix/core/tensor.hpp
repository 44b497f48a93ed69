// SPDX-License-Identifier: MIT
// tensor<T, R>: owning, 64-byte aligned, row-major, zero-initialised storage of rank R <= 5.
// tensor_view<T, R>: non-owning strided view; tensor_view<const T, R> for inputs, so the
// direction of data is checked by the compiler. Views convert implicitly from tensors.
//
//   tensor<float, 4> q({B, T, H, K});          // zeros, contiguous, D innermost
//   tensor_view<const float, 4> in = q;        // read-only view
//   auto q_b = in.select<0>(b);                // [T, H, K] view of q[b]
//   auto q_bh = q_b.select<1>(h);              // [T, K] view of q[b, :, h, :]
//   auto m = as_matrix(q_bh);                  // Eigen::Map with q_bh's strides
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>

#include <Eigen/Core>

#include <seqmix/core/error.hpp>

namespace seqmix {

template <class T, std::size_t R>
class tensor;

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

template <std::size_t R>
constexpr index_t element_count(const shape_t<R>& shape) {
  index_t n = 1;
  for (index_t e : shape) n *= e;
  return n;
}

inline constexpr std::size_t tensor_alignment = 64;

// Aligned operator new/delete (not aligned_alloc) so that allocation counters that replace the
// global operators (tests/support/alloc_counter.cpp) see tensor storage too.
struct aligned_deleter {
  void operator()(void* p) const noexcept {
    ::operator delete (p, std::align_val_t{tensor_alignment});
  }
};

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
  /// A view over external memory with explicit strides (in elements).
  constexpr tensor_view(T* data, const shape_t<R>& shape, const shape_t<R>& strides)
      : data_(data), shape_(shape), strides_(strides) {}
  /// A contiguous row-major view over external memory.
  constexpr tensor_view(T* data, const shape_t<R>& shape)
      : tensor_view(data, shape, detail::contiguous_strides<R>(shape)) {}

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

  template <class... I>
  requires(sizeof...(I) == R && (std::is_integral_v<I> && ...)) constexpr T& operator()(
      I... idx) const noexcept {
    const std::array<index_t, R> i{static_cast<index_t>(idx)...};
    index_t off = 0;
    for (std::size_t d = 0; d < R; ++d) off += i[d] * strides_[d];
    return data_[off];
  }

  /// Pointer to element `idx` (`idx` has R entries).
  constexpr T* ptr(const shape_t<R>& idx) const noexcept {
    index_t off = 0;
    for (std::size_t d = 0; d < R; ++d) off += idx[d] * strides_[d];
    return data_ + off;
  }

  /// Drops dimension D at index i: a rank R-1 view.
  template <std::size_t D>
  requires(D<R && R> 1) constexpr tensor_view<T, R - 1> select(index_t i) const noexcept {
    shape_t<R - 1> s{}, st{};
    for (std::size_t d = 0, j = 0; d < R; ++d) {
      if (d == D) continue;
      s[j] = shape_[d];
      st[j] = strides_[d];
      ++j;
    }
    return {data_ + i * strides_[D], s, st};
  }

  /// Elements [begin, end) of dimension D.
  template <std::size_t D>
  requires(D < R) constexpr tensor_view slice(index_t begin, index_t end) const noexcept {
    shape_t<R> s = shape_;
    s[D] = end - begin;
    return {data_ + begin * strides_[D], s, strides_};
  }

  /// Same elements under another shape; the view must be contiguous.
  template <std::size_t R2>
  tensor_view<T, R2> reshape(const shape_t<R2>& new_shape) const {
    if (!is_contiguous() || detail::element_count<R2>(new_shape) != size()) {
      throw shape_error("seqmix::tensor_view::reshape: view must be contiguous and keep its size");
    }
    return {data_, new_shape};
  }

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
  T* data_ = nullptr;
  shape_t<R> shape_{};
  shape_t<R> strides_{};
};

/// Owning tensor: contiguous, row-major, 64-byte aligned, zero-initialised.
template <class T, std::size_t R>
class tensor {
  static_assert(std::is_trivially_copyable_v<T> && !std::is_const_v<T>,
                "tensor<T, R> holds trivially copyable, non-const elements");
  static_assert(R >= 1 && R <= 5, "seqmix tensors have rank 1 to 5");

 public:
  using value_type = T;
  static constexpr std::size_t rank = R;

  tensor() = default;
  explicit tensor(const shape_t<R>& shape) : shape_(shape) {
    for (index_t e : shape) {
      if (e < 0) throw shape_error("seqmix::tensor: negative extent in shape " + describe());
    }
    allocate();
    if (size()) std::memset(static_cast<void*>(data_.get()), 0, bytes());
  }
  tensor(const shape_t<R>& shape, T value) : tensor(shape) { view().fill(value); }

  tensor(const tensor& other) : shape_(other.shape_) {
    allocate();
    if (size()) std::memcpy(static_cast<void*>(data_.get()), other.data(), bytes());
  }
  tensor& operator=(const tensor& other) {
    if (this != &other) {
      tensor copy(other);
      *this = std::move(copy);
    }
    return *this;
  }
  tensor(tensor&&) noexcept = default;
  tensor& operator=(tensor&&) noexcept = default;
  ~tensor() = default;

  /// A tensor holding a copy of the elements of `src` (any strides).
  template <class U>
  static tensor copy_of(const tensor_view<U, R>& src) {
    tensor t(src.shape());
    T* out = t.data();
    src.for_each([&](auto x) { *out++ = static_cast<T>(x); });
    return t;
  }

  T* data() noexcept { return data_.get(); }
  const T* data() const noexcept { return data_.get(); }
  const shape_t<R>& shape() const noexcept { return shape_; }
  shape_t<R> strides() const noexcept { return detail::contiguous_strides<R>(shape_); }
  index_t extent(std::size_t d) const noexcept { return shape_[d]; }
  index_t size() const noexcept { return detail::element_count<R>(shape_); }
  bool empty() const noexcept { return size() == 0; }

  tensor_view<T, R> view() noexcept { return {data(), shape_}; }
  tensor_view<const T, R> view() const noexcept { return {data(), shape_}; }

  template <class... I>
  T& operator()(I... idx) noexcept {
    return view()(idx...);
  }
  template <class... I>
  const T& operator()(I... idx) const noexcept {
    return view()(idx...);
  }
  T& operator[](index_t i) noexcept { return data_.get()[i]; }
  const T& operator[](index_t i) const noexcept { return data_.get()[i]; }

  template <std::size_t D>
  tensor_view<T, R - 1> select(index_t i) noexcept {
    return view().template select<D>(i);
  }
  template <std::size_t D>
  tensor_view<const T, R - 1> select(index_t i) const noexcept {
    return view().template select<D>(i);
  }

  void fill(T value) noexcept { view().fill(value); }

 private:
  std::size_t bytes() const noexcept { return static_cast<std::size_t>(size()) * sizeof(T); }
  void allocate() {
    const std::size_t n = bytes();
    if (n == 0) return;
    void* p = ::operator new (n, std::align_val_t{detail::tensor_alignment});
    data_.reset(static_cast<T*>(p));
  }
  std::string describe() const { return detail::format_shape({shape_.data(), shape_.size()}); }

  shape_t<R> shape_{};
  std::unique_ptr<T, detail::aligned_deleter> data_;
};

/// Eigen row-major map over a rank-2 view, keeping its strides (no copy).
template <class T>
auto as_matrix(const tensor_view<T, 2>& v) {
  using scalar = std::remove_const_t<T>;
  using matrix = Eigen::Matrix<scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using stride = Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>;
  using map = Eigen::Map<std::conditional_t<std::is_const_v<T>, const matrix, matrix>,
                         Eigen::Unaligned, stride>;
  return map(v.data(), v.extent(0), v.extent(1), stride(v.stride(0), v.stride(1)));
}

/// Eigen map over a rank-1 view as a column vector.
template <class T>
auto as_vector(const tensor_view<T, 1>& v) {
  using scalar = std::remove_const_t<T>;
  using vector = Eigen::Matrix<scalar, Eigen::Dynamic, 1>;
  using stride = Eigen::InnerStride<Eigen::Dynamic>;
  using map = Eigen::Map<std::conditional_t<std::is_const_v<T>, const vector, vector>,
                         Eigen::Unaligned, stride>;
  return map(v.data(), v.extent(0), stride(v.stride(0)));
}

/// Copies the elements of `src` into `dst` (same shape, any strides, converting types).
template <class T, class U, std::size_t R>
void copy(const tensor_view<U, R>& src, const tensor_view<T, R>& dst) {
  if (src.shape() != dst.shape()) {
    throw shape_error(
        "seqmix::copy: shapes differ: " + detail::format_shape({src.shape().data(), R}) + " vs " +
        detail::format_shape({dst.shape().data(), R}));
  }
  if (src.empty()) return;
  shape_t<R> idx{};
  for (;;) {
    *dst.ptr(idx) = static_cast<T>(*src.ptr(idx));
    std::size_t d = R;
    while (d-- > 0) {
      if (++idx[d] < src.shape()[d]) break;
      idx[d] = 0;
      if (d == 0) return;
    }
  }
}

}  // namespace seqmix
