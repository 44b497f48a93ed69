// SPDX-License-Identifier: MIT
// workspace: per-call scratch memory from a reusable arena, so a steady-state loop (decode steps,
// repeated prefills of one shape) allocates nothing after its first call.
//
//   workspace& ws = thread_workspace();        // this thread's arena
//   auto frame = ws.scope();                   // everything taken below is returned at '}'
//   std::span<float> acc = frame.take<float>(n);            // n floats, uninitialised
//   tensor_view<float, 2> tile = frame.take_view<float>({C, V}, 0.0f);  // [C, V], zeros
//   { auto inner = ws.scope(); ... }           // nested users take and return scratch (LIFO)
//
// Memory: a list of blocks from the aligned global operator new (so allocation counters see
// them). Every piece is 64-byte aligned (its size is rounded up to 64 bytes). A piece that does
// not fit in the current block goes to the next block, or to a new one of max(request, 2 ·
// capacity, 64 KiB) bytes: the arena grows geometrically and never moves what was handed out.
// When the last frame closes (nothing is in use) and the arena holds several blocks, they are
// merged into one block of the high-water mark, so from then on the same sequence of requests
// fits in one block and allocates nothing. The arena never shrinks below its high-water mark
// unless asked: release() frees everything (and reserve() pre-sizes it).
// Cost: take is O(1) (a pointer bump) unless it grows; a frame is two words.
//
// Threads: a workspace is used by one thread at a time. thread_workspace() is thread_local, one
// arena per OS thread, chosen over an array indexed by omp_get_thread_num() because
//  - several user threads may each run seqmix calls with their own OpenMP team at the same time;
//    thread numbers 0 .. n-1 repeat in every team, so a per-thread-number array would hand one
//    arena to two threads (a race); an OS thread is never in two places at once;
//  - it needs no thread count up front (set_num_threads may change it between calls) and works
//    with std::thread, OpenMP or any pool;
//  - the OpenMP runtimes (libgomp, libomp) keep their pool threads between parallel regions, so
//    each worker's arena survives from call to call: the steady state allocates nothing.
// Nested parallel_for runs serially on the calling thread, i.e. on the same arena: frames are
// strictly nested (LIFO), which is what scope() gives. Memory lives as long as its thread; call
// release() on a thread to return its arena early.
//
// Under AddressSanitizer, memory not currently taken is poisoned: a read or write through a
// span kept past its frame is reported as a use-after-poison.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <new>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <seqmix/core/error.hpp>
#include <seqmix/core/memory.hpp>
#include <seqmix/core/view.hpp>

#if defined(__SANITIZE_ADDRESS__)
#define SEQMIX_WORKSPACE_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SEQMIX_WORKSPACE_ASAN 1
#endif
#endif
#ifdef SEQMIX_WORKSPACE_ASAN
#include <sanitizer/asan_interface.h>
#endif

namespace seqmix {

/// A growing arena of 64-byte aligned scratch memory with mark / rewind (see the file comment).
class workspace {
 public:
  static constexpr std::size_t alignment = detail::tensor_alignment;
  /// Smallest block the arena allocates.
  static constexpr std::size_t min_block_bytes = std::size_t(64) << 10;

  /// A position in the arena: rewind(m) returns everything taken after mark() gave m.
  struct mark_type {
    std::size_t block = 0;
    std::size_t offset = 0;
    std::size_t used = 0;
  };

  class frame;

  workspace() noexcept = default;
  workspace(const workspace&) = delete;
  workspace& operator=(const workspace&) = delete;
  workspace(workspace&& other) noexcept
      : blocks_(std::move(other.blocks_)),
        cur_(std::exchange(other.cur_, 0)),
        off_(std::exchange(other.off_, 0)),
        used_(std::exchange(other.used_, 0)),
        high_water_(std::exchange(other.high_water_, 0)) {
    other.blocks_.clear();
  }
  workspace& operator=(workspace&& other) noexcept {
    if (this != &other) {
      free_blocks();
      blocks_ = std::move(other.blocks_);
      other.blocks_.clear();
      cur_ = std::exchange(other.cur_, 0);
      off_ = std::exchange(other.off_, 0);
      used_ = std::exchange(other.used_, 0);
      high_water_ = std::exchange(other.high_water_, 0);
    }
    return *this;
  }
  ~workspace() { free_blocks(); }

  // ---- taking scratch ----------------------------------------------------------------------

  /// `bytes` of 64-byte aligned, uninitialised memory until the enclosing frame closes
  /// (nullptr for 0 bytes).
  void* take_bytes(std::size_t bytes) { return take_raw("workspace::take_bytes", bytes); }

  /// n elements of T (n >= 0), uninitialised.
  template <class T>
  std::span<T> take(index_t n) {
    check_type<T>();
    if (n < 0) detail::fail("workspace::take", "n", "must be >= 0, got " + std::to_string(n));
    if (static_cast<std::size_t>(n) > detail::max_allocation_bytes / sizeof(T)) {
      detail::fail("workspace::take", "n",
                   std::to_string(n) + " elements of " + std::to_string(sizeof(T)) +
                       " bytes exceed the " + std::to_string(detail::max_allocation_bytes) +
                       " bytes one allocation can address");
    }
    void* p = take_raw("workspace::take", static_cast<std::size_t>(n) * sizeof(T));
    return {static_cast<T*>(p), static_cast<std::size_t>(n)};
  }
  /// n elements of T, each set to `value`.
  template <class T>
  std::span<T> take(index_t n, T value) {
    std::span<T> s = take<T>(n);
    std::fill(s.begin(), s.end(), value);
    return s;
  }

  /// A contiguous row-major view of extents `shape`, uninitialised.
  template <class T, std::size_t R>
  tensor_view<T, R> take_view(const index_t (&shape)[R]) {
    shape_t<R> s{};
    std::copy_n(shape, R, s.begin());
    return take_view<T, R>(s);
  }
  template <class T, std::size_t R>
  tensor_view<T, R> take_view(const shape_t<R>& shape) {
    check_type<T>();
    const index_t n =
        detail::checked_storage("workspace::take_view", "shape", {shape.data(), R}, sizeof(T));
    void* p = take_raw("workspace::take_view", static_cast<std::size_t>(n) * sizeof(T));
    return tensor_view<T, R>(static_cast<T*>(p), shape);
  }
  /// A contiguous view of extents `shape` with every element set to `value`.
  template <class T, std::size_t R>
  tensor_view<T, R> take_view(const index_t (&shape)[R], T value) {
    tensor_view<T, R> v = take_view<T, R>(shape);
    std::fill_n(v.data(), v.size(), value);
    return v;
  }

  // ---- frames ------------------------------------------------------------------------------

  /// The current position (see rewind).
  mark_type mark() const noexcept { return {cur_, off_, used_}; }
  /// Returns everything taken since `m` was marked. Marks must be rewound in LIFO order; a mark
  /// above the current position (already returned) is ignored. When nothing is in use any more
  /// and the arena has several blocks, they are merged into one of the high-water size.
  void rewind(const mark_type& m) noexcept {
    if (m.block > cur_ || (m.block == cur_ && m.offset > off_)) return;
    poison_above(m);
    cur_ = m.block;
    off_ = m.offset;
    used_ = m.used;
    if (used_ == 0 && blocks_.size() > 1) consolidate();
  }
  /// An RAII frame: its destructor rewinds to the position at its construction.
  [[nodiscard]] frame scope() noexcept;

  // ---- size management ---------------------------------------------------------------------

  /// Bytes currently taken (sizes rounded up to 64).
  std::size_t used() const noexcept { return used_; }
  /// Bytes held in all blocks.
  std::size_t capacity() const noexcept {
    std::size_t c = 0;
    for (const block& b : blocks_) c += b.size;
    return c;
  }
  /// Most bytes in use at once since construction or release().
  std::size_t high_water() const noexcept { return high_water_; }
  /// Number of blocks (1 in the steady state).
  std::size_t block_count() const noexcept { return blocks_.size(); }

  /// Makes the arena one block of at least `bytes` (no-op if it already is). Only while nothing
  /// is taken: pieces handed out must not move.
  void reserve(std::size_t bytes) {
    if (used_ != 0) in_use_error("workspace::reserve");
    if (blocks_.size() == 1 && blocks_[0].size >= bytes) return;
    if (bytes == 0) return;
    const std::size_t size = round_up(std::max(bytes, capacity()), "workspace::reserve");
    std::byte* p = static_cast<std::byte*>(
        detail::aligned_allocate(size, [] { return std::string("seqmix::workspace::reserve"); }));
    free_blocks();
    blocks_.push_back({p, size});
    poison(p, size);
    cur_ = off_ = 0;
  }
  /// Frees every block (the only way the arena shrinks). Only while nothing is taken.
  void release() {
    if (used_ != 0) in_use_error("workspace::release");
    free_blocks();
    cur_ = off_ = used_ = high_water_ = 0;
  }

 private:
  struct block {
    std::byte* data;
    std::size_t size;
  };

  template <class T>
  static constexpr void check_type() {
    static_assert(std::is_trivially_copyable_v<T> && std::is_trivially_destructible_v<T>,
                  "workspace hands out storage for trivially copyable, trivially destructible "
                  "types only (nothing is destroyed on rewind)");
    static_assert(alignof(T) <= alignment, "workspace pieces are 64-byte aligned");
  }

  static std::size_t round_up(std::size_t bytes, const char* where) {
    if (bytes > detail::max_allocation_bytes - alignment) {
      detail::fail(where, "bytes",
                   std::to_string(bytes) + " bytes exceed the " +
                       std::to_string(detail::max_allocation_bytes) +
                       " bytes one allocation can address");
    }
    return (bytes + alignment - 1) / alignment * alignment;
  }

  [[noreturn]] void in_use_error(const char* where) const {
    detail::fail(where, "this",
                 "the workspace is in use (" + std::to_string(used_) +
                     " bytes taken in open frames): close every frame first");
  }

  void* take_raw(const char* where, std::size_t bytes) {
    if (bytes == 0) return nullptr;
    const std::size_t n = round_up(bytes, where);
    if (blocks_.empty() || n > blocks_[cur_].size - off_) advance(where, n);
    std::byte* p = blocks_[cur_].data + off_;
    off_ += n;
    used_ += n;
    high_water_ = std::max(high_water_, used_);
    unpoison(p, n);
    return p;
  }

  // The current block cannot hold n more bytes: move to the next block if it can, else insert a
  // new block after the current one (blocks after the current one hold nothing taken).
  void advance(const char* where, std::size_t n) {
    const std::size_t next = blocks_.empty() ? 0 : cur_ + 1;
    if (next < blocks_.size() && blocks_[next].size >= n) {
      cur_ = next;
      off_ = 0;
      return;
    }
    const std::size_t cap = capacity();
    const std::size_t grow = cap > detail::max_allocation_bytes / 2 ? cap : 2 * cap;
    const std::size_t size = round_up(std::max({n, grow, min_block_bytes}), where);
    std::byte* p = static_cast<std::byte*>(detail::aligned_allocate(size, [&] {
      return "seqmix::" + std::string(where) + ": growing the workspace by " +
             std::to_string(size) + " bytes (" + std::to_string(used_) + " in use)";
    }));
    try {
      blocks_.insert(blocks_.begin() + static_cast<std::ptrdiff_t>(next), block{p, size});
    } catch (...) {
      detail::aligned_free(p);
      throw;
    }
    poison(p, size);
    cur_ = next;
    off_ = 0;
  }

  // Nothing is taken and there are several blocks: one block of the high-water mark holds the
  // same sequence of requests. Best effort (noexcept): if the allocation fails, keep the blocks.
  void consolidate() noexcept {
    const std::size_t size =
        std::max((high_water_ + alignment - 1) / alignment * alignment, min_block_bytes);
    void* p = ::operator new (size, std::align_val_t{alignment}, std::nothrow);
    if (!p) return;
    free_blocks();
    blocks_.push_back({static_cast<std::byte*>(p), size});  // capacity >= 2 already: no throw
    poison(p, size);
    cur_ = off_ = 0;
  }

  void free_blocks() noexcept {
    for (const block& b : blocks_) {
      unpoison(b.data, b.size);
      detail::aligned_free(b.data);
    }
    blocks_.clear();
  }

  void poison_above(const mark_type& m) noexcept {
#ifdef SEQMIX_WORKSPACE_ASAN
    for (std::size_t b = m.block; b <= cur_ && b < blocks_.size(); ++b) {
      const std::size_t from = b == m.block ? m.offset : 0;
      poison(blocks_[b].data + from, blocks_[b].size - from);
    }
#else
    (void)m;
#endif
  }
  static void poison(void* p, std::size_t n) noexcept {
#ifdef SEQMIX_WORKSPACE_ASAN
    ASAN_POISON_MEMORY_REGION(p, n);
#else
    (void)p;
    (void)n;
#endif
  }
  static void unpoison(void* p, std::size_t n) noexcept {
#ifdef SEQMIX_WORKSPACE_ASAN
    ASAN_UNPOISON_MEMORY_REGION(p, n);
#else
    (void)p;
    (void)n;
#endif
  }

  std::vector<block> blocks_;
  std::size_t cur_ = 0;         // block being filled
  std::size_t off_ = 0;         // bytes taken in blocks_[cur_]
  std::size_t used_ = 0;        // bytes taken in all blocks
  std::size_t high_water_ = 0;  // max of used_
};

/// Scratch taken through a frame (or directly from its workspace while it is open) is returned
/// when the frame is destroyed. Frames nest; they must close in reverse order of opening, which
/// scoping gives.
class workspace::frame {
 public:
  explicit frame(workspace& ws) noexcept : ws_(&ws), mark_(ws.mark()) {}
  frame(const frame&) = delete;
  frame& operator=(const frame&) = delete;
  ~frame() { ws_->rewind(mark_); }

  workspace& arena() const noexcept { return *ws_; }

  template <class T>
  std::span<T> take(index_t n) {
    return ws_->take<T>(n);
  }
  template <class T>
  std::span<T> take(index_t n, T value) {
    return ws_->take<T>(n, value);
  }
  template <class T, std::size_t R>
  tensor_view<T, R> take_view(const index_t (&shape)[R]) {
    return ws_->take_view<T, R>(shape);
  }
  template <class T, std::size_t R>
  tensor_view<T, R> take_view(const shape_t<R>& shape) {
    return ws_->take_view<T, R>(shape);
  }
  template <class T, std::size_t R>
  tensor_view<T, R> take_view(const index_t (&shape)[R], T value) {
    return ws_->take_view<T, R>(shape, value);
  }

 private:
  workspace* ws_;
  mark_type mark_;
};

inline workspace::frame workspace::scope() noexcept {
  return frame(*this);
}

/// This OS thread's arena (thread_local; see the file comment for why not one per OpenMP thread
/// number).
inline workspace& thread_workspace() noexcept {
  thread_local workspace ws;
  return ws;
}

}  // namespace seqmix
