// SPDX-License-Identifier: MIT
// tensor<T, R>: owning, 64-byte aligned, row-major, zero-initialised storage of rank R <= 5.
// tensor_view<T, R> (core/view.hpp): non-owning strided view; tensor_view<const T, R> for
// inputs, so the direction of data is checked by the compiler. Views convert implicitly from
// tensors, and a tensor offers the view operations itself (select, slice, transpose, permute,
// split, merge, unsqueeze, squeeze, broadcast_to, reshape), const-correct: those of a const tensor
// are read-only views, and they are deleted on temporaries (the view would dangle).
//
//   tensor<float, 4> q({B, T, H, K});          // zeros, contiguous, D innermost
//   tensor_view<const float, 4> in = q;        // read-only view
//   auto q_b = in.select<0>(b);                // [T, H, K] view of q[b]
//   auto q_bh = q_b.select<1>(h);              // [T, K] view of q[b, :, h, :]
//   auto m = as_matrix(q_bh);                  // Eigen::Map with q_bh's strides
//
// The shape is checked when a tensor is made: a negative extent, an element count beyond
// index_t or a byte count beyond one allocation is a seqmix::shape_error (never a wrapped-around
// small allocation); an allocation the system refuses is a seqmix::allocation_error (a
// std::bad_alloc naming the shape and the bytes). Cost: one allocation + one memset.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>

#include <Eigen/Core>

#include <seqmix/core/error.hpp>
#include <seqmix/core/memory.hpp>
#include <seqmix/core/view.hpp>

namespace seqmix {

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
  /// Zeros of extents `shape` (each >= 0; element and byte counts checked for overflow).
  explicit tensor(const shape_t<R>& shape) : shape_(shape) {
    detail::checked_storage("tensor", "shape", {shape_.data(), R}, sizeof(T));
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
  tensor(tensor&& other) noexcept
      : shape_(std::exchange(other.shape_, shape_t<R>{})), data_(std::move(other.data_)) {}
  tensor& operator=(tensor&& other) noexcept {
    shape_ = std::exchange(other.shape_, shape_t<R>{});
    data_ = std::move(other.data_);
    return *this;
  }
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

  tensor_view<T, R> view() noexcept { return {unchecked(), data(), shape_, strides()}; }
  tensor_view<const T, R> view() const noexcept {
    return {typename tensor_view<const T, R>::unchecked_t{}, data(), shape_, strides()};
  }

  /// Element access, unchecked (see at()).
  template <class... I>
  T& operator()(I... idx) noexcept {
    return view()(idx...);
  }
  template <class... I>
  const T& operator()(I... idx) const noexcept {
    return view()(idx...);
  }
  /// Element access with every index checked.
  template <class... I>
  T& at(I... idx) {
    return *checked_ptr(idx...);
  }
  template <class... I>
  const T& at(I... idx) const {
    return *checked_ptr(idx...);
  }
  T& operator[](index_t i) noexcept { return data_.get()[i]; }
  const T& operator[](index_t i) const noexcept { return data_.get()[i]; }

  void fill(T value) noexcept { view().fill(value); }

  // ---- views of the tensor (see tensor_view; checked, named tensor::<operation>) -----------
  // The mutable overloads give tensor_view<T>, the const ones tensor_view<const T>; on a
  // temporary tensor they are deleted, as the view would outlive the storage.

  template <std::size_t D>
  requires(D<R && R> 1) tensor_view<T, R - 1> select(index_t i)
  &{ return view().select_impl("tensor::select", D, i); }
  template <std::size_t D>
  requires(D<R && R> 1) tensor_view<const T, R - 1> select(index_t i)
  const& { return view().select_impl("tensor::select", D, i); }
  tensor_view<T, R - 1> select(std::size_t dim, index_t i) & requires(R > 1) {
    view().check_dim("tensor::select", dim);
    return view().select_impl("tensor::select", dim, i);
  }
  tensor_view<const T, R - 1> select(std::size_t dim, index_t i) const& requires(R > 1) {
    view().check_dim("tensor::select", dim);
    return view().select_impl("tensor::select", dim, i);
  }
  template <std::size_t D>
  void select(index_t) && = delete;
  void select(std::size_t, index_t) && = delete;

  template <std::size_t D>
  requires(D < R) tensor_view<T, R> slice(index_t begin, index_t end)
  &{ return view().slice_impl("tensor::slice", D, begin, end); }
  template <std::size_t D>
  requires(D < R) tensor_view<const T, R> slice(index_t begin, index_t end)
  const& { return view().slice_impl("tensor::slice", D, begin, end); }
  tensor_view<T, R> slice(std::size_t dim, index_t begin, index_t end) & {
    view().check_dim("tensor::slice", dim);
    return view().slice_impl("tensor::slice", dim, begin, end);
  }
  tensor_view<const T, R> slice(std::size_t dim, index_t begin, index_t end) const& {
    view().check_dim("tensor::slice", dim);
    return view().slice_impl("tensor::slice", dim, begin, end);
  }
  template <std::size_t D>
  void slice(index_t, index_t) && = delete;
  void slice(std::size_t, index_t, index_t) && = delete;

  template <std::size_t D0, std::size_t D1>
  requires(D0 < R && D1 < R) tensor_view<T, R> transpose()
  &noexcept { return view().template transpose<D0, D1>(); }
  template <std::size_t D0, std::size_t D1>
  requires(D0 < R && D1 < R) tensor_view<const T, R> transpose()
  const& noexcept { return view().template transpose<D0, D1>(); }
  tensor_view<T, R> transpose() & noexcept requires(R == 2) { return view().transpose(); }
  tensor_view<const T, R> transpose() const& noexcept requires(R == 2) {
    return view().transpose();
  }
  tensor_view<T, R> transpose(std::size_t d0, std::size_t d1) & {
    return transpose_impl(view(), d0, d1);
  }
  tensor_view<const T, R> transpose(std::size_t d0, std::size_t d1) const& {
    return transpose_impl(view(), d0, d1);
  }
  template <std::size_t D0, std::size_t D1>
  void transpose() && = delete;
  void transpose() && = delete;
  void transpose(std::size_t, std::size_t) && = delete;

  tensor_view<T, R> permute(const std::array<std::size_t, R>& order) & {
    return view().permute_impl("tensor::permute", order);
  }
  tensor_view<const T, R> permute(const std::array<std::size_t, R>& order) const& {
    return view().permute_impl("tensor::permute", order);
  }
  void permute(const std::array<std::size_t, R>&) && = delete;

  template <std::size_t N>
  requires(N >= 1 && R + N - 1 <= 5) tensor_view<T, R + N - 1> split(std::size_t dim,
                                                                     const index_t (&parts)[N])
  &{ return view().template split_impl<N>("tensor::split", dim, parts); }
  template <std::size_t N>
  requires(N >= 1 &&
           R + N - 1 <= 5) tensor_view<const T, R + N - 1> split(std::size_t dim,
                                                                 const index_t (&parts)[N])
  const& { return view().template split_impl<N>("tensor::split", dim, parts); }
  template <std::size_t N>
  void split(std::size_t, const index_t (&)[N]) && = delete;

  tensor_view<T, R - 1> merge(std::size_t dim) & requires(R > 1) {
    return view().merge_impl("tensor::merge", dim);
  }
  tensor_view<const T, R - 1> merge(std::size_t dim) const& requires(R > 1) {
    return view().merge_impl("tensor::merge", dim);
  }
  void merge(std::size_t) && = delete;

  tensor_view<T, R + 1> unsqueeze(std::size_t dim) & requires(R < 5) {
    return view().unsqueeze_impl("tensor::unsqueeze", dim);
  }
  tensor_view<const T, R + 1> unsqueeze(std::size_t dim) const& requires(R < 5) {
    return view().unsqueeze_impl("tensor::unsqueeze", dim);
  }
  void unsqueeze(std::size_t) && = delete;

  tensor_view<T, R - 1> squeeze(std::size_t dim) & requires(R > 1) {
    return view().squeeze_impl("tensor::squeeze", dim);
  }
  tensor_view<const T, R - 1> squeeze(std::size_t dim) const& requires(R > 1) {
    return view().squeeze_impl("tensor::squeeze", dim);
  }
  void squeeze(std::size_t) && = delete;

  /// Read-only (stride-0) broadcast view; see tensor_view::broadcast_to.
  tensor_view<const T, R> broadcast_to(const shape_t<R>& shape) const& {
    return view().broadcast_impl("tensor::broadcast_to", shape);
  }
  void broadcast_to(const shape_t<R>&) && = delete;

  template <std::size_t R2>
  tensor_view<T, R2> reshape(const shape_t<R2>& new_shape) & {
    return view().template reshape_impl<R2>("tensor::reshape", new_shape);
  }
  template <std::size_t R2>
  tensor_view<const T, R2> reshape(const shape_t<R2>& new_shape) const& {
    return view().template reshape_impl<R2>("tensor::reshape", new_shape);
  }
  template <std::size_t R2>
  void reshape(const shape_t<R2>&) && = delete;

 private:
  static typename tensor_view<T, R>::unchecked_t unchecked() noexcept { return {}; }
  template <class V>
  static V transpose_impl(const V& v, std::size_t d0, std::size_t d1) {
    v.check_dim("tensor::transpose", d0, "d0");
    v.check_dim("tensor::transpose", d1, "d1");
    return v.transpose(d0, d1);
  }
  template <class... I>
  const T* checked_ptr(I... idx) const {
    static_assert(sizeof...(I) == R && (std::is_integral_v<I> && ...),
                  "tensor::at takes R integral indices");
    const std::array<index_t, R> i{static_cast<index_t>(idx)...};
    for (std::size_t d = 0; d < R; ++d) view().check_index("tensor::at", "idx", d, i[d]);
    return view().ptr(i);
  }
  template <class... I>
  T* checked_ptr(I... idx) {
    return const_cast<T*>(std::as_const(*this).checked_ptr(idx...));
  }

  std::size_t bytes() const noexcept { return static_cast<std::size_t>(size()) * sizeof(T); }
  void allocate() {
    const std::size_t n = bytes();
    if (n == 0) return;
    data_.reset(static_cast<T*>(detail::aligned_allocate(
        n, [&] { return "seqmix::tensor: shape " + detail::shape_string<R>(shape_); })));
  }

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
    detail::fail("copy", "dst",
                 "expected the shape of src " + detail::shape_string<R>(src.shape()) + ", got " +
                     detail::shape_string<R>(dst.shape()));
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
