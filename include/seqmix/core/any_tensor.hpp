// SPDX-License-Identifier: MIT
// any_tensor: a type-erased, read-mostly tensor for I/O: a name, a dtype, a dynamic row-major
// shape and the bytes, either owned (64-byte aligned, zero-initialised) or borrowed from a
// mapped file and kept alive by a shared handle (no copy).
//
//   any_tensor t = file.at("model.layers.0.mlp.up_proj.weight");   // BF16 [I, D], mapped
//   tensor_view<const bf16, 2> w = t.view<bf16, 2>();              // zero copy, checked
//   tensor<float, 2> wf = t.to<float, 2>();                        // converting copy
//   std::vector<std::int64_t> ids = t.to_vector<std::int64_t>();   // flat, converting
//
// view<T, R>() checks that T is the stored dtype, that R is the rank and that the bytes are
// aligned for T, and throws seqmix::io_error naming the tensor, the dtype and rank expected and
// found otherwise (BOOL views also check that every byte is 0 or 1). Cost: O(1) (O(n) for BOOL).
// to<T, R>() / to_vector<T>() / copy_to() convert from any dtype: floats and bf16/f16 to float,
// double, bf16 or f16 (double -> bf16/f16 rounds through float); integers and BOOL to any type;
// to an integer type or bool only when every value fits exactly (a NaN, an inf, a fraction or a
// value out of range is an io_error naming the element and value: never undefined behaviour).
// Cost: one pass, vectorised for bf16/f16 -> float and float -> bf16/f16, memcpy when the dtype
// matches. Copies of an any_tensor share its bytes (a handle, like shared_ptr).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <iomanip>
#include <limits>
#include <memory>
#include <new>
#include <sstream>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <seqmix/core/dtype.hpp>
#include <seqmix/core/error.hpp>
#include <seqmix/core/tensor.hpp>

namespace seqmix {

namespace detail {

/// Element count and byte count of `shape` for elements of `elem_size` bytes; false when an
/// extent is negative or a product exceeds PTRDIFF_MAX (checked before multiplying).
inline bool checked_sizes(std::span<const index_t> shape, std::size_t elem_size, std::size_t& count,
                          std::size_t& bytes) noexcept {
  constexpr auto limit = static_cast<std::size_t>(std::numeric_limits<std::ptrdiff_t>::max());
  std::size_t n = 1;
  for (index_t e : shape) {
    if (e < 0) return false;
    const auto u = static_cast<std::size_t>(e);
    if (u != 0 && n > limit / u) return false;
    n *= u;
  }
  if (elem_size != 0 && n > limit / elem_size) return false;
  count = n;
  bytes = n * elem_size;
  return true;
}

template <class T>
constexpr const char* element_type_name() noexcept {
  using U = std::remove_cv_t<T>;
  if constexpr (std::is_same_v<U, float>) return "float";
  if constexpr (std::is_same_v<U, double>) return "double";
  if constexpr (std::is_same_v<U, bf16>) return "bf16";
  if constexpr (std::is_same_v<U, f16>) return "f16";
  if constexpr (std::is_same_v<U, std::int32_t>) return "int32";
  if constexpr (std::is_same_v<U, std::int64_t>) return "int64";
  if constexpr (std::is_same_v<U, std::uint8_t>) return "uint8";
  if constexpr (std::is_same_v<U, bool>) return "bool";
  return "?";
}

template <class S>
std::string value_text(S v) {
  std::ostringstream out;
  if constexpr (std::is_floating_point_v<S>) {
    out << std::setprecision(17) << v;
  } else {
    out << static_cast<long long>(v);
  }
  return out.str();
}

// One element S -> T; false when the value does not fit T exactly (integer and bool targets).
template <class T, class S>
bool convert_element(S s, T& out) noexcept {
  if constexpr (std::is_same_v<S, bf16> || std::is_same_v<S, f16>) {
    return convert_element<T, float>(to_float(s), out);
  } else if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    out = static_cast<T>(s);  // double -> float overflow gives inf (IEEE), never UB
    return true;
  } else if constexpr (std::is_same_v<T, bf16>) {
    out = bf16_from_float(static_cast<float>(s));
    return true;
  } else if constexpr (std::is_same_v<T, f16>) {
    out = f16_from_float(static_cast<float>(s));
    return true;
  } else if constexpr (std::is_same_v<T, bool>) {
    if (s == S(0) || s == S(1)) {
      out = s == S(1);
      return true;
    }
    return false;
  } else if constexpr (std::is_floating_point_v<S>) {  // float -> integer: exact values only
    const double d = static_cast<double>(s);
    constexpr double hi = static_cast<double>(std::uint64_t(1) << std::numeric_limits<T>::digits);
    constexpr double lo = std::numeric_limits<T>::is_signed ? -hi : 0.0;
    if (!(d >= lo && d < hi) || std::trunc(d) != d) return false;  // NaN fails the first test
    out = static_cast<T>(d);
    return true;
  } else {  // integer -> integer (sources int32, int64, uint8: all fit int64, as do T's bounds)
    const auto v = static_cast<std::int64_t>(s);
    if (v < static_cast<std::int64_t>(std::numeric_limits<T>::min()) ||
        v > static_cast<std::int64_t>(std::numeric_limits<T>::max())) {
      return false;
    }
    out = static_cast<T>(v);
    return true;
  }
}

// Converts n elements of source type S (read byte-wise, any alignment) to T. `is_bool` marks a
// BOOL source read as uint8 (every byte must be 0 or 1).
template <class S, class T>
void convert_from(const std::byte* src, std::size_t n, T* out, dtype type, std::string_view who,
                  std::string_view name) {
  constexpr std::size_t chunk = 256;
  alignas(64) S buf[chunk];
  for (std::size_t i0 = 0; i0 < n; i0 += chunk) {
    const std::size_t m = std::min(chunk, n - i0);
    std::memcpy(static_cast<void*>(buf), src + i0 * sizeof(S), m * sizeof(S));
    if constexpr ((std::is_same_v<S, bf16> || std::is_same_v<S, f16>)&&std::is_same_v<T, float>) {
      to_float(buf, out + i0, m);
      continue;
    } else if constexpr (std::is_same_v<S, float> &&
                         (std::is_same_v<T, bf16> || std::is_same_v<T, f16>)) {
      from_float(buf, out + i0, m);
      continue;
    } else {
      for (std::size_t i = 0; i < m; ++i) {
        bool ok;
        if constexpr (std::is_same_v<S, std::uint8_t>) {
          ok = (type != dtype::boolean || buf[i] <= 1) && convert_element<T>(buf[i], out[i0 + i]);
        } else {
          ok = convert_element<T>(buf[i], out[i0 + i]);
        }
        if (!ok) {
          std::string v;
          if constexpr (std::is_same_v<S, bf16> || std::is_same_v<S, f16>) {
            v = value_text(to_float(buf[i]));
          } else {
            v = value_text(buf[i]);
          }
          throw io_error("seqmix::" + std::string(who) + ": tensor '" + std::string(name) + "' (" +
                         dtype_name(type) + "): element " + std::to_string(i0 + i) + " = " + v +
                         " does not convert exactly to " + element_type_name<T>());
        }
      }
    }
  }
}

/// Converts n elements of dtype `type` at `src` (any alignment) into out[0..n).
template <class T>
void convert_elements(dtype type, const std::byte* src, std::size_t n, T* out, std::string_view who,
                      std::string_view name) {
  static_assert(is_dtype_element_v<T>, "seqmix: unsupported element type");
  if (n == 0) return;
  if (type == dtype_of<T>() && !std::is_same_v<T, bool>) {
    std::memcpy(static_cast<void*>(out), src, n * sizeof(T));
    return;
  }
  switch (type) {
    case dtype::f32:
      return convert_from<float>(src, n, out, type, who, name);
    case dtype::f64:
      return convert_from<double>(src, n, out, type, who, name);
    case dtype::bf16:
      return convert_from<bf16>(src, n, out, type, who, name);
    case dtype::f16:
      return convert_from<f16>(src, n, out, type, who, name);
    case dtype::i32:
      return convert_from<std::int32_t>(src, n, out, type, who, name);
    case dtype::i64:
      return convert_from<std::int64_t>(src, n, out, type, who, name);
    case dtype::u8:
    case dtype::boolean:
      return convert_from<std::uint8_t>(src, n, out, type, who, name);
  }
}

struct aligned_bytes_deleter {
  void operator()(void* p) const noexcept { ::operator delete (p, std::align_val_t{64}); }
};

}  // namespace detail

/// A named tensor of any dtype and rank, over owned or borrowed (mapped) bytes.
class any_tensor {
 public:
  any_tensor() = default;

  /// Owned, zero-filled storage. Throws shape_error on a negative extent or a size overflow.
  any_tensor(std::string name, dtype type, std::vector<index_t> shape)
      : name_(std::move(name)), type_(type), shape_(std::move(shape)) {
    if (!detail::checked_sizes(shape_, dtype_size(type_), count_, bytes_)) {
      throw shape_error("seqmix::any_tensor: argument 'shape': " + describe_shape() +
                        " has a negative extent or more elements than memory can index");
    }
    if (bytes_ != 0) {
      void* p = ::operator new (bytes_, std::align_val_t{64});
      std::memset(p, 0, bytes_);
      keep_ = std::shared_ptr<void>(p, detail::aligned_bytes_deleter{});
      data_ = static_cast<const std::byte*>(p);
      owned_ = true;
    }
  }

  /// Over `nbytes` external bytes at `data` kept alive by `keep_alive` (no copy). The byte
  /// count must equal the shape's elements times the dtype size (io_error otherwise).
  static any_tensor borrow(std::string name, dtype type, std::vector<index_t> shape,
                           const std::byte* data, std::size_t nbytes,
                           std::shared_ptr<const void> keep_alive) {
    any_tensor t;
    t.name_ = std::move(name);
    t.type_ = type;
    t.shape_ = std::move(shape);
    if (!detail::checked_sizes(t.shape_, dtype_size(type), t.count_, t.bytes_) ||
        t.bytes_ != nbytes) {
      throw io_error("seqmix::any_tensor::borrow: tensor '" + t.name_ + "' (" + dtype_name(type) +
                     " " + t.describe_shape() + ") does not match its " + std::to_string(nbytes) +
                     " bytes");
    }
    t.data_ = data;
    t.keep_ = std::move(keep_alive);
    return t;
  }

  /// An owned copy of a typed view (any strides).
  template <class T, std::size_t R>
  static any_tensor copy_of(std::string name, const tensor_view<const T, R>& v) {
    std::vector<index_t> shape(v.shape().begin(), v.shape().end());
    any_tensor t(std::move(name), dtype_of<T>(), std::move(shape));
    T* out = reinterpret_cast<T*>(t.mutable_data());
    v.for_each([&](const T& x) { *out++ = x; });
    return t;
  }

  const std::string& name() const noexcept { return name_; }
  dtype type() const noexcept { return type_; }
  const std::vector<index_t>& shape() const noexcept { return shape_; }
  std::size_t rank() const noexcept { return shape_.size(); }
  /// Number of elements.
  index_t size() const noexcept { return static_cast<index_t>(count_); }
  std::size_t nbytes() const noexcept { return bytes_; }
  const std::byte* data() const noexcept { return data_; }
  /// True when the bytes are owned (false: borrowed, e.g. from a mapped file).
  bool owns_data() const noexcept { return owned_; }

  /// Writable bytes of an owned tensor (io_error for a borrowed one: mapped files are read-only).
  std::byte* mutable_data() {
    if (!owned_ && bytes_ != 0) {
      throw io_error("seqmix::any_tensor::mutable_data: tensor '" + name_ +
                     "' borrows read-only bytes (copy it with to<T, R>() first)");
    }
    return const_cast<std::byte*>(data_);
  }

  /// Zero-copy typed view: T must be the stored dtype and R the rank.
  template <class T, std::size_t R>
  tensor_view<const T, R> view() const {
    return view_as<T, R>("any_tensor::view");
  }

  /// view<T, R>() with `who` (the public function the user called) in its messages.
  template <class T, std::size_t R>
  tensor_view<const T, R> view_as(std::string_view who) const {
    static_assert(is_dtype_element_v<T>, "seqmix: unsupported element type");
    if (type_ != dtype_of<T>() || shape_.size() != R) {
      throw io_error("seqmix::" + std::string(who) + ": tensor '" + name_ + "': expected dtype " +
                     dtype_name(dtype_of<T>()) + " and rank " + std::to_string(R) + ", found " +
                     dtype_name(type_) + " and rank " + std::to_string(shape_.size()) + " " +
                     describe_shape() +
                     (type_ != dtype_of<T>() ? " (to<T, R>() gives a converting copy)" : ""));
    }
    if (reinterpret_cast<std::uintptr_t>(data_) % alignof(T) != 0) {
      throw io_error("seqmix::" + std::string(who) + ": tensor '" + name_ +
                     "': its bytes are not aligned for " + dtype_name(type_) +
                     " in the file (to<T, R>() gives an aligned copy)");
    }
    if constexpr (std::is_same_v<T, bool>) {
      for (std::size_t i = 0; i < bytes_; ++i) {
        if (static_cast<unsigned char>(data_[i]) > 1) {
          throw io_error("seqmix::" + std::string(who) + ": tensor '" + name_ +
                         "' (BOOL): element " + std::to_string(i) + " holds byte " +
                         std::to_string(static_cast<unsigned>(data_[i])) + ", not 0 or 1");
        }
      }
    }
    shape_t<R> s{};
    for (std::size_t d = 0; d < R; ++d) s[d] = shape_[d];
    return tensor_view<const T, R>(reinterpret_cast<const T*>(data_), s);
  }

  /// Converting copy into a new tensor<T, R>; R must be the rank.
  template <class T, std::size_t R>
  tensor<T, R> to() const {
    return to_as<T, R>("any_tensor::to");
  }

  template <class T, std::size_t R>
  tensor<T, R> to_as(std::string_view who) const {
    if (shape_.size() != R) {
      throw io_error("seqmix::" + std::string(who) + ": tensor '" + name_ + "' (" +
                     dtype_name(type_) + " " + describe_shape() + ") has rank " +
                     std::to_string(shape_.size()) + ", expected rank " + std::to_string(R));
    }
    shape_t<R> s{};
    for (std::size_t d = 0; d < R; ++d) s[d] = shape_[d];
    tensor<T, R> out(s);
    detail::convert_elements(type_, data_, count_, out.data(), who, name_);
    return out;
  }

  /// Converting flat copy (row-major order).
  template <class T>
  std::vector<T> to_vector() const {
    return to_vector_as<T>("any_tensor::to_vector");
  }

  template <class T>
  std::vector<T> to_vector_as(std::string_view who) const {
    static_assert(!std::is_same_v<T, bool>, "std::vector<bool> has no data(): use uint8_t");
    std::vector<T> out(count_);
    detail::convert_elements(type_, data_, count_, out.data(), who, name_);
    return out;
  }

  /// Converting copy into out[0..n); n must equal size().
  template <class T>
  void copy_to(T* out, std::size_t n) const {
    if (n != count_) {
      throw shape_error("seqmix::any_tensor::copy_to: argument 'n': expected " +
                        std::to_string(count_) + " (the elements of '" + name_ + "'), got " +
                        std::to_string(n));
    }
    detail::convert_elements(type_, data_, count_, out, "any_tensor::copy_to", name_);
  }

  /// "[2, 3]"
  std::string describe_shape() const {
    return detail::format_shape({shape_.data(), shape_.size()});
  }

 private:
  std::string name_;
  dtype type_ = dtype::f32;
  std::vector<index_t> shape_;
  std::size_t count_ = 0;
  std::size_t bytes_ = 0;
  const std::byte* data_ = nullptr;
  bool owned_ = false;
  std::shared_ptr<const void> keep_;
};

}  // namespace seqmix
