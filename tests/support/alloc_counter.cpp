// SPDX-License-Identifier: MIT
// Replacement global operator new/delete that count allocations (thread-safe). Sizes are kept
// in a small header before each block so delete can subtract them.
#include "alloc_counter.hpp"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <new>

namespace {
std::atomic<std::size_t> g_count{0};
std::atomic<long long> g_live{0};
std::atomic<long long> g_peak{0};

constexpr std::size_t header = 64;  // keeps every alignment up to 64 intact

void* counted_alloc(std::size_t n, std::size_t align) {
  const std::size_t a = std::max(align, header);
  void* raw = std::aligned_alloc(a, (n + a + a - 1) / a * a);
  if (!raw) throw std::bad_alloc();
  auto* base = static_cast<unsigned char*>(raw);
  unsigned char* user = base + a;
  reinterpret_cast<std::size_t*>(user)[-1] = n;
  reinterpret_cast<std::size_t*>(user)[-2] = a;
  g_count.fetch_add(1, std::memory_order_relaxed);
  const long long live = g_live.fetch_add(static_cast<long long>(n)) + static_cast<long long>(n);
  long long peak = g_peak.load();
  while (live > peak && !g_peak.compare_exchange_weak(peak, live)) {
  }
  return user;
}

void counted_free(void* p) noexcept {
  if (!p) return;
  auto* user = static_cast<unsigned char*>(p);
  const std::size_t n = reinterpret_cast<std::size_t*>(user)[-1];
  const std::size_t a = reinterpret_cast<std::size_t*>(user)[-2];
  g_live.fetch_sub(static_cast<long long>(n));
  std::free(user - a);
}
}  // namespace

namespace seqmix::testing {
void reset_allocation_stats() {
  g_count = 0;
  g_live = 0;
  g_peak = 0;
}
allocation_stats current_allocation_stats() {
  allocation_stats s;
  s.count = g_count.load();
  s.live_bytes = static_cast<std::size_t>(std::max(0LL, g_live.load()));
  s.peak_bytes = static_cast<std::size_t>(std::max(0LL, g_peak.load()));
  return s;
}
}  // namespace seqmix::testing

void* operator new(std::size_t n) {
  return counted_alloc(n, alignof(std::max_align_t));
}
void* operator new[](std::size_t n) {
  return counted_alloc(n, alignof(std::max_align_t));
}
void* operator new(std::size_t n, std::align_val_t a) {
  return counted_alloc(n, static_cast<std::size_t>(a));
}
void* operator new[](std::size_t n, std::align_val_t a) {
  return counted_alloc(n, static_cast<std::size_t>(a));
}
void operator delete(void* p) noexcept {
  counted_free(p);
}
void operator delete[](void* p) noexcept {
  counted_free(p);
}
void operator delete(void* p, std::size_t) noexcept {
  counted_free(p);
}
void operator delete[](void* p, std::size_t) noexcept {
  counted_free(p);
}
void operator delete(void* p, std::align_val_t) noexcept {
  counted_free(p);
}
void operator delete[](void* p, std::align_val_t) noexcept {
  counted_free(p);
}
void operator delete(void* p, std::size_t, std::align_val_t) noexcept {
  counted_free(p);
}
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept {
  counted_free(p);
}

// The nothrow forms must be replaced too: otherwise a runtime (ASan's, for one) supplies its own
// and its blocks would reach our delete without our header.
namespace {
void* counted_alloc_nothrow(std::size_t n, std::size_t align) noexcept {
  try {
    return counted_alloc(n, align);
  } catch (...) {
    return nullptr;
  }
}
}  // namespace
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  return counted_alloc_nothrow(n, alignof(std::max_align_t));
}
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept {
  return counted_alloc_nothrow(n, alignof(std::max_align_t));
}
void* operator new(std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return counted_alloc_nothrow(n, static_cast<std::size_t>(a));
}
void* operator new[](std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return counted_alloc_nothrow(n, static_cast<std::size_t>(a));
}
void operator delete(void* p, const std::nothrow_t&) noexcept {
  counted_free(p);
}
void operator delete[](void* p, const std::nothrow_t&) noexcept {
  counted_free(p);
}
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept {
  counted_free(p);
}
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept {
  counted_free(p);
}
