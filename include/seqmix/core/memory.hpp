// SPDX-License-Identifier: MIT
// Checked sizes and aligned storage, shared by tensor<T, R>, kv_cache and the workspace arena.
//
// Sizes come from users (shapes, capacities, windows), so every element count and byte count is
// computed with checked multiplication: a product that does not fit in index_t (or a byte count
// beyond what one allocation can address) is a seqmix::shape_error naming the function and the
// argument, never a wrapped-around small allocation. An allocation the system refuses is a
// seqmix::allocation_error: a std::bad_alloc (so `catch (std::bad_alloc&)` keeps working) whose
// what() names the function, the argument and the bytes asked for.
//
// Storage comes from the aligned global operator new (not aligned_alloc) so that allocation
// counters replacing the global operators (tests/support/alloc_counter.cpp) see it too.
// Cost: O(1) per allocation besides the allocator itself.
#pragma once

#include <cstddef>
#include <limits>
#include <memory>
#include <new>
#include <span>
#include <string>
#include <string_view>

#include <seqmix/core/error.hpp>

namespace seqmix {

/// The system refused an allocation (a std::bad_alloc with a message naming what was asked).
class allocation_error : public std::bad_alloc {
 public:
  explicit allocation_error(std::string what)
      : what_(std::make_shared<const std::string>(std::move(what))) {}
  const char* what() const noexcept override { return what_->c_str(); }

 private:
  std::shared_ptr<const std::string> what_;  // shared: copying an exception must not throw
};

namespace detail {

inline constexpr std::size_t tensor_alignment = 64;
/// Largest byte count one allocation may have (operator new and pointer differences need it to
/// fit in ptrdiff_t).
inline constexpr std::size_t max_allocation_bytes =
    static_cast<std::size_t>(std::numeric_limits<index_t>::max());

/// "[a, b, c]" with every number printed as it is (format_shape prints -1 as the wildcard '*').
inline std::string dims_string(std::span<const index_t> dims) {
  std::string out = "[";
  for (std::size_t i = 0; i < dims.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(dims[i]);
  }
  return out + "]";
}

/// a * b, or false when it overflows index_t (or either factor is negative).
inline bool checked_mul(index_t a, index_t b, index_t& out) noexcept {
  if (a < 0 || b < 0) return false;
  return !__builtin_mul_overflow(a, b, &out);
}

/// Product of the extents, or -1 when an extent is negative or the product of the non-zero
/// extents overflows index_t. Zero extents count as 1 in that test so that every partial
/// product (row-major strides multiply from the right, element counts from the left) fits too:
/// [2^32, 2^32, 0] is rejected although it holds no element.
inline index_t checked_element_count(std::span<const index_t> shape) noexcept {
  index_t n = 1;
  bool zero = false;
  for (index_t e : shape) {
    if (e == 0) {
      zero = true;
    } else if (!checked_mul(n, e, n)) {
      return -1;
    }
  }
  return zero ? 0 : n;
}

/// Element count of `shape` for `where`'s argument `argument`; throws shape_error on a negative
/// extent, an element count beyond index_t or a byte count (elements · element_bytes) beyond
/// one allocation.
inline index_t checked_storage(std::string_view where, std::string_view argument,
                               std::span<const index_t> shape, std::size_t element_bytes) {
  for (index_t e : shape) {
    if (e < 0) {
      fail(where, argument, "extents must be >= 0, got shape " + dims_string(shape));
    }
  }
  const index_t n = checked_element_count(shape);
  if (n < 0) {
    fail(where, argument,
         "the element count of shape " + dims_string(shape) + " overflows (more than " +
             std::to_string(std::numeric_limits<index_t>::max()) + " elements)");
  }
  if (static_cast<std::size_t>(n) > max_allocation_bytes / element_bytes) {
    fail(where, argument,
         "shape " + dims_string(shape) + " holds " + std::to_string(n) + " elements of " +
             std::to_string(element_bytes) + " bytes: more than the " +
             std::to_string(max_allocation_bytes) + " bytes one allocation can address");
  }
  return n;
}

/// `bytes` of 64-byte aligned storage (nullptr for 0 bytes). An allocation the system refuses is
/// an allocation_error whose message starts with describe() (e.g. "seqmix::tensor: shape [..]"),
/// called on failure only, so a successful allocation makes no message.
template <class Describe>
void* aligned_allocate(std::size_t bytes, Describe&& describe) {
  if (bytes == 0) return nullptr;
  try {
    return ::operator new (bytes, std::align_val_t{tensor_alignment});
  } catch (const std::bad_alloc&) {
    throw allocation_error(std::string(describe()) + ": cannot allocate " + std::to_string(bytes) +
                           " bytes (the system refused)");
  }
}

inline void aligned_free(void* p) noexcept {
  if (p) ::operator delete (p, std::align_val_t{tensor_alignment});
}

struct aligned_deleter {
  void operator()(void* p) const noexcept { aligned_free(p); }
};

}  // namespace detail
}  // namespace seqmix
