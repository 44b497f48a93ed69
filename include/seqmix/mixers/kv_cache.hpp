// SPDX-License-Identifier: MIT
// kv_cache<T>: the recurrent state of softmax attention, owned by the user.
//
// Softmax attention has no fixed-size state: its "state" after t tokens is every key and value
// seen so far (full attention, memory O(t·(K+V)) per kv head), or the last W of them (sliding
// window, memory O(W·(K+V)), constant in t). This object holds either:
//  - full(B, Hkv, K, V, capacity): rows 0 .. capacity-1 per (sequence, kv head); appending past
//    the capacity is an error (shape_error naming the cache, its capacity and the request),
//    never an overrun. Grow explicitly with reserve(), which reallocates and keeps the contents.
//  - ring(B, Hkv, K, V, W): a ring buffer of the last W rows per (sequence, kv head); token at
//    position p lives in slot p mod W. Never full, never reallocates: memory constant in t.
//
// Layout: keys [B, Hkv, C, K], values [B, Hkv, C, V] (C = capacity or W), each (sequence, head)
// a contiguous block of rows, so a decode step streams it at memory bandwidth.
// Lengths are per sequence (length(b) = tokens appended so far), so sequences of a batch may be
// at different positions.
//
// Prefix snapshot / restore:
//  - truncate(b, n): O(1) roll-back of sequence b to its first n tokens (full caches; a ring can
//    only be truncated to its current length or reset, older rows are overwritten);
//  - snapshot() / restore(s): a copy of every sequence's rows and lengths, for either kind.
//
// Checked: sizes are computed with checked arithmetic (a capacity or window whose storage
// overflows is a shape_error naming it; one the system cannot allocate is an allocation_error,
// a std::bad_alloc naming it); every (b, h) argument is range-checked (shape_error naming the
// function and the argument); restore() validates the whole snapshot before writing anything.
// The row accessors key_row / value_row / set_length used by the attention engines are the
// unchecked hot path (their callers validated the request).
#pragma once

#include <algorithm>
#include <array>
#include <new>
#include <string>
#include <vector>

#include <seqmix/core/error.hpp>
#include <seqmix/core/memory.hpp>
#include <seqmix/core/tensor.hpp>

namespace seqmix {

template <class T>
class kv_cache;

/// A copy of a kv_cache's contents and lengths (see kv_cache::snapshot).
template <class T>
struct kv_cache_snapshot {
  std::vector<index_t> lengths;  // [B]
  tensor<T, 4> keys;             // [B, Hkv, rows, K], rows = max held rows at snapshot time
  tensor<T, 4> values;           // [B, Hkv, rows, V]
  bool ring = false;
  index_t capacity = 0;
};

template <class T>
class kv_cache {
 public:
  kv_cache() = default;

  /// A full cache with room for `capacity` tokens per sequence (rows of K and V floats per kv
  /// head). Memory: B·Hkv·capacity·(K+V)·sizeof(T) bytes, allocated here, zeroed.
  static kv_cache full(index_t batch, index_t kv_heads, index_t key_dim, index_t value_dim,
                       index_t capacity) {
    return kv_cache("kv_cache::full", batch, kv_heads, key_dim, value_dim, capacity, false);
  }
  /// A ring buffer of the last `window` tokens per sequence (sliding-window attention).
  /// Memory: B·Hkv·window·(K+V)·sizeof(T) bytes, constant in the number of tokens.
  static kv_cache ring(index_t batch, index_t kv_heads, index_t key_dim, index_t value_dim,
                       index_t window) {
    return kv_cache("kv_cache::ring", batch, kv_heads, key_dim, value_dim, window, true);
  }

  index_t batch() const noexcept { return keys_.extent(0); }
  index_t kv_heads() const noexcept { return keys_.extent(1); }
  /// Rows per (sequence, head): the capacity of a full cache, the window of a ring.
  index_t capacity() const noexcept { return keys_.extent(2); }
  index_t key_dim() const noexcept { return keys_.extent(3); }
  index_t value_dim() const noexcept { return values_.extent(3); }
  bool is_ring() const noexcept { return ring_; }
  /// Tokens appended to sequence b so far (its position).
  index_t length(index_t b) const {
    check_seq("kv_cache::length", b);
    return lengths_[static_cast<std::size_t>(b)];
  }
  /// Rows held for sequence b: length(b) for a full cache, min(length(b), W) for a ring.
  index_t held(index_t b) const {
    check_seq("kv_cache::held", b);
    return held_unchecked(b);
  }
  /// Bytes of key and value storage (constant for a ring, whatever the number of tokens).
  std::size_t storage_bytes() const noexcept {
    return static_cast<std::size_t>(keys_.size() + values_.size()) * sizeof(T);
  }

  /// Empties every sequence (O(B); the storage is kept).
  void reset() { std::fill(lengths_.begin(), lengths_.end(), index_t(0)); }
  /// Empties sequence b.
  void reset(index_t b) {
    check_seq("kv_cache::reset", b);
    lengths_[static_cast<std::size_t>(b)] = 0;
  }
  /// Rolls sequence b back to its first n tokens (0 <= n <= length(b)); O(1) for full caches.
  void truncate(index_t b, index_t n) {
    checker check{"kv_cache::truncate"};
    check_seq("kv_cache::truncate", b);
    const index_t len = lengths_[static_cast<std::size_t>(b)];
    check.require(n >= 0 && n <= len, "n",
                  "must be in [0, " + std::to_string(len) + "], got " + std::to_string(n));
    check.require(!ring_ || n == len || n == 0, "n",
                  "a ring cache keeps only its last " + std::to_string(capacity()) +
                      " rows: it can be truncated to its length or to 0 only");
    lengths_[static_cast<std::size_t>(b)] = n;
  }
  /// Reallocates a full cache to `new_capacity` rows per sequence, keeping the contents
  /// (the documented way to grow; never done implicitly).
  void reserve(index_t new_capacity) {
    checker check{"kv_cache::reserve"};
    check.require(!ring_, "this", "a ring cache has a fixed window and cannot be resized");
    check.require(new_capacity >= 1, "new_capacity",
                  "must be >= 1, got " + std::to_string(new_capacity));
    if (new_capacity <= capacity()) return;
    tensor<T, 4> k, v;
    allocate("kv_cache::reserve", "new_capacity", batch(), kv_heads(), key_dim(), value_dim(),
             new_capacity, k, v);
    copy(keys_.view().template slice<2>(0, capacity()), k.view().template slice<2>(0, capacity()));
    copy(values_.view().template slice<2>(0, capacity()),
         v.view().template slice<2>(0, capacity()));
    keys_ = std::move(k);
    values_ = std::move(v);
  }

  /// A copy of every sequence's held rows and its length.
  kv_cache_snapshot<T> snapshot() const {
    index_t rows = 0;
    for (index_t b = 0; b < batch(); ++b) rows = std::max(rows, held(b));
    kv_cache_snapshot<T> s;
    s.lengths = lengths_;
    s.ring = ring_;
    s.capacity = capacity();
    s.keys = tensor<T, 4>({batch(), kv_heads(), rows, key_dim()});
    s.values = tensor<T, 4>({batch(), kv_heads(), rows, value_dim()});
    copy(keys_.view().template slice<2>(0, rows), s.keys.view());
    copy(values_.view().template slice<2>(0, rows), s.values.view());
    return s;
  }
  /// Restores contents and lengths from a snapshot of a cache of the same geometry (a full
  /// cache may have grown since; the snapshot must fit its capacity). The whole snapshot is
  /// validated first (kind, geometry, keys and values agreeing, lengths in range), so a bad
  /// snapshot throws with the cache untouched.
  void restore(const kv_cache_snapshot<T>& s) {
    checker check{"kv_cache::restore"};
    const auto geometry = [](index_t b, index_t h, index_t r, index_t d) {
      return detail::dims_string(std::array<index_t, 4>{b, h, r, d});
    };
    if (s.ring != ring_) {
      check.fail("s.ring", std::string("expected a snapshot of a ") + (ring_ ? "ring" : "full") +
                               " cache, got one of a " + (s.ring ? "ring" : "full") + " cache");
    }
    if (ring_ && s.capacity != capacity()) {
      check.fail("s.capacity", "expected a snapshot of a ring of window " +
                                   std::to_string(capacity()) + ", got window " +
                                   std::to_string(s.capacity));
    }
    if (static_cast<index_t>(s.lengths.size()) != batch()) {
      check.fail("s.lengths", "expected lengths of " + std::to_string(batch()) +
                                  " sequences, got " + std::to_string(s.lengths.size()));
    }
    const index_t rows = s.keys.extent(2);
    if (s.keys.extent(0) != batch() || s.keys.extent(1) != kv_heads() ||
        s.keys.extent(3) != key_dim() || rows > capacity()) {
      check.fail("s.keys",
                 "expected keys of shape [batch, kv_heads, rows <= capacity, key_dim] = " +
                     geometry(batch(), kv_heads(), capacity(), key_dim()) + ", got " +
                     detail::dims_string(s.keys.shape()));
    }
    if (s.values.shape() != shape_t<4>{batch(), kv_heads(), rows, value_dim()}) {
      check.fail("s.values", "expected values of shape [batch, kv_heads, rows, value_dim] = " +
                                 geometry(batch(), kv_heads(), rows, value_dim()) +
                                 " (rows as in the keys), got " +
                                 detail::dims_string(s.values.shape()));
    }
    for (std::size_t b = 0; b < s.lengths.size(); ++b) {
      const index_t len = s.lengths[b];
      // A ring holds min(length, W) rows (its length is a position and may exceed W); a full
      // cache holds length rows. Either way they must all be in the snapshot.
      const index_t needs = ring_ ? std::min(len, capacity()) : len;
      if (len < 0) {
        check.fail("s.lengths", "length of sequence " + std::to_string(b) + " must be >= 0, got " +
                                    std::to_string(len));
      }
      if (needs > rows) {
        check.fail("s.lengths", "length of sequence " + std::to_string(b) + " is " +
                                    std::to_string(len) + ": it needs " + std::to_string(needs) +
                                    " rows, but the snapshot stores " + std::to_string(rows));
      }
    }
    copy(s.keys.view(), keys_.view().template slice<2>(0, rows));
    copy(s.values.view(), values_.view().template slice<2>(0, rows));
    lengths_ = s.lengths;
  }

  /// Keys of (b, h) in slot order: [held(b), K] (for a ring, slot p mod W holds position p).
  tensor_view<const T, 2> keys(index_t b, index_t h) const {
    check_seq("kv_cache::keys", b);
    check_head("kv_cache::keys", h);
    return keys_.view().template select<0>(b).template select<0>(h).template slice<0>(
        0, held_unchecked(b));
  }
  /// Values of (b, h) in slot order: [held(b), V].
  tensor_view<const T, 2> values(index_t b, index_t h) const {
    check_seq("kv_cache::values", b);
    check_head("kv_cache::values", h);
    return values_.view().template select<0>(b).template select<0>(h).template slice<0>(
        0, held_unchecked(b));
  }

  // ---- used by the attention mixers -------------------------------------------------------
  /// Row pointers of slot `slot` of (b, h).
  T* key_row(index_t b, index_t h, index_t slot) noexcept {
    return keys_.view().ptr({b, h, slot, 0});
  }
  T* value_row(index_t b, index_t h, index_t slot) noexcept {
    return values_.view().ptr({b, h, slot, 0});
  }
  const T* key_row(index_t b, index_t h, index_t slot) const noexcept {
    return keys_.view().ptr({b, h, slot, 0});
  }
  const T* value_row(index_t b, index_t h, index_t slot) const noexcept {
    return values_.view().ptr({b, h, slot, 0});
  }
  /// Sets the length of sequence b after the mixer wrote its rows.
  void set_length(index_t b, index_t n) noexcept { lengths_[static_cast<std::size_t>(b)] = n; }

 private:
  kv_cache(const char* where, index_t batch, index_t kv_heads, index_t key_dim, index_t value_dim,
           index_t rows, bool ring)
      : ring_(ring) {
    checker check{where};
    check.require(batch >= 1, "batch", "must be >= 1, got " + std::to_string(batch));
    check.require(kv_heads >= 1, "kv_heads", "must be >= 1, got " + std::to_string(kv_heads));
    check.require(key_dim >= 1, "key_dim", "must be >= 1, got " + std::to_string(key_dim));
    check.require(value_dim >= 1, "value_dim", "must be >= 1, got " + std::to_string(value_dim));
    check.require(rows >= 1, ring ? "window" : "capacity",
                  "must be >= 1, got " + std::to_string(rows));
    allocate(where, ring ? "window" : "capacity", batch, kv_heads, key_dim, value_dim, rows, keys_,
             values_);
    lengths_.assign(static_cast<std::size_t>(batch), 0);
  }

  // Storage of B·Hkv·rows·(K+V) elements, checked before anything is allocated: an overflow is
  // a shape_error naming `argument` (the row count), a refused allocation an allocation_error.
  static void allocate(const char* where, const char* argument, index_t batch, index_t kv_heads,
                       index_t key_dim, index_t value_dim, index_t rows, tensor<T, 4>& keys,
                       tensor<T, 4>& values) {
    const std::array<index_t, 5> factors{batch, kv_heads, rows, key_dim, value_dim};
    index_t rows_total = 0, elements = 0;
    const bool ok = detail::checked_mul(batch, kv_heads, rows_total) &&
                    detail::checked_mul(rows_total, rows, rows_total) &&
                    !__builtin_add_overflow(key_dim, value_dim, &elements) &&
                    detail::checked_mul(rows_total, elements, elements) &&
                    static_cast<std::size_t>(elements) <= detail::max_allocation_bytes / sizeof(T);
    if (!ok) {
      detail::fail(where, argument,
                   "batch·kv_heads·" + std::string(argument) + "·(key_dim + value_dim) for " +
                       detail::dims_string(factors) + " overflows: " + std::string(argument) +
                       " = " + std::to_string(rows) + " needs more than the " +
                       std::to_string(detail::max_allocation_bytes) +
                       " bytes one allocation can address");
    }
    try {
      tensor<T, 4> k({batch, kv_heads, rows, key_dim});
      tensor<T, 4> v({batch, kv_heads, rows, value_dim});
      keys = std::move(k);
      values = std::move(v);
    } catch (const std::bad_alloc&) {
      throw allocation_error("seqmix::" + std::string(where) + ": argument '" + argument +
                             "': cannot allocate " +
                             std::to_string(static_cast<std::size_t>(elements) * sizeof(T)) +
                             " bytes of keys and values for " + argument + " = " +
                             std::to_string(rows) + " (the system refused)");
    }
  }
  index_t held_unchecked(index_t b) const noexcept {
    return std::min(lengths_[static_cast<std::size_t>(b)], capacity());
  }
  void check_seq(const char* where, index_t b) const {
    if (b < 0 || b >= batch()) {
      detail::fail(where, "b",
                   "must be in [0, " + std::to_string(batch()) + ") (the cache's batch), got " +
                       std::to_string(b));
    }
  }
  void check_head(const char* where, index_t h) const {
    if (h < 0 || h >= kv_heads()) {
      detail::fail(where, "h",
                   "must be in [0, " + std::to_string(kv_heads()) +
                       ") (the cache's kv_heads), got " + std::to_string(h));
    }
  }

  tensor<T, 4> keys_, values_;
  std::vector<index_t> lengths_;
  bool ring_ = false;
};

}  // namespace seqmix
