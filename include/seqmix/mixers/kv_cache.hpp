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
#pragma once

#include <algorithm>
#include <string>
#include <vector>

#include <seqmix/core/error.hpp>
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
  index_t length(index_t b) const { return lengths_.at(static_cast<std::size_t>(b)); }
  /// Rows held for sequence b: length(b) for a full cache, min(length(b), W) for a ring.
  index_t held(index_t b) const { return std::min(length(b), capacity()); }
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
    const index_t len = length(b);
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
    check.require(new_capacity >= 1, "new_capacity", "must be >= 1");
    if (new_capacity <= capacity()) return;
    tensor<T, 4> k({batch(), kv_heads(), new_capacity, key_dim()});
    tensor<T, 4> v({batch(), kv_heads(), new_capacity, value_dim()});
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
  /// cache may have grown since; the snapshot must fit its capacity).
  void restore(const kv_cache_snapshot<T>& s) {
    checker check{"kv_cache::restore"};
    check.require(s.ring == ring_ && static_cast<index_t>(s.lengths.size()) == batch() &&
                      s.keys.extent(1) == kv_heads() && s.keys.extent(3) == key_dim() &&
                      s.values.extent(3) == value_dim() && s.keys.extent(2) <= capacity() &&
                      (!ring_ || s.capacity == capacity()),
                  "s", "snapshot of a cache of another kind, geometry or larger capacity");
    const index_t rows = s.keys.extent(2);
    copy(s.keys.view(), keys_.view().template slice<2>(0, rows));
    copy(s.values.view(), values_.view().template slice<2>(0, rows));
    lengths_ = s.lengths;
  }

  /// Keys of (b, h) in slot order: [held(b), K] (for a ring, slot p mod W holds position p).
  tensor_view<const T, 2> keys(index_t b, index_t h) const {
    return keys_.view().template select<0>(b).template select<0>(h).template slice<0>(0, held(b));
  }
  /// Values of (b, h) in slot order: [held(b), V].
  tensor_view<const T, 2> values(index_t b, index_t h) const {
    return values_.view().template select<0>(b).template select<0>(h).template slice<0>(0, held(b));
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
    keys_ = tensor<T, 4>({batch, kv_heads, rows, key_dim});
    values_ = tensor<T, 4>({batch, kv_heads, rows, value_dim});
    lengths_.assign(static_cast<std::size_t>(batch), 0);
  }
  void check_seq(const char* where, index_t b) const {
    checker{where}.require(
        b >= 0 && b < batch(), "b",
        "must be in [0, " + std::to_string(batch()) + "), got " + std::to_string(b));
  }

  tensor<T, 4> keys_, values_;
  std::vector<index_t> lengths_;
  bool ring_ = false;
};

}  // namespace seqmix
