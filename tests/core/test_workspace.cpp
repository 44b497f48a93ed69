// SPDX-License-Identifier: MIT
// workspace (issue 11 item 5): aligned pieces, nested frames, growth without moving what was
// handed out, merging into one block, release, checked sizes, one arena per thread, and the
// point of it all: after the first call a steady loop allocates nothing (allocation counter).
#include <cstdint>
#include <set>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>

#include <seqmix/core/parallel.hpp>
#include <seqmix/core/workspace.hpp>

#include "alloc_counter.hpp"

using namespace seqmix;
using Catch::Matchers::Contains;

namespace {

bool aligned64(const void* p) {
  return reinterpret_cast<std::uintptr_t>(p) % 64 == 0;
}

// The scratch pattern of a chunked form: per call a few [C, D] tiles and a [T, V] buffer, and a
// nested helper taking its own scratch. Returns a checksum so the work is not optimised away.
double chunked_like_call(workspace& ws, index_t T, index_t C, index_t D) {
  auto frame = ws.scope();
  auto tile = frame.take_view<float>({C, D}, 0.0f);
  auto acc = frame.take<double>(T * D, 0.0);
  auto ids = frame.take<index_t>(T);
  double sum = 0;
  for (index_t t = 0; t < T; ++t) {
    ids[static_cast<std::size_t>(t)] = t;
    auto inner = ws.scope();  // a nested user takes and returns its own scratch
    auto tmp = inner.take<float>(C * D + t % 7);
    for (std::size_t i = 0; i < tmp.size(); ++i) tmp[i] = float(i % 13);
    tile(t % C, t % D) += tmp[tmp.size() - 1];
    acc[static_cast<std::size_t>(t * D)] = double(tile(t % C, t % D));
  }
  for (double a : acc) sum += a;
  return sum + double(ids[static_cast<std::size_t>(T - 1)]);
}

}  // namespace

TEST_CASE("workspace: pieces are 64-byte aligned, disjoint and typed", "[core][workspace]") {
  workspace ws;
  CHECK(ws.capacity() == 0);
  {
    auto f = ws.scope();
    auto a = f.take<float>(3);
    auto b = f.take<char>(1);
    auto c = f.take<double>(100, 2.5);
    auto v = f.take_view<float>({4, 5, 6}, 1.0f);
    CHECK(a.size() == 3);
    CHECK(c.size() == 100);
    CHECK(aligned64(a.data()));
    CHECK(aligned64(b.data()));
    CHECK(aligned64(c.data()));
    CHECK(aligned64(v.data()));
    CHECK(v.shape() == shape_t<3>{4, 5, 6});
    CHECK(v.is_contiguous());
    CHECK(v(3, 4, 5) == 1.0f);
    const shape_t<2> like{2, 3};
    auto w = f.take_view<double>(like);  // a shape from elsewhere (e.g. another tensor's)
    CHECK(w.shape() == like);
    CHECK(aligned64(w.data()));
    ws.rewind(ws.mark());  // rewinding to the current position returns nothing
    CHECK(c[99] == 2.5);
    // rounded to 64 bytes each: 64 + 64 + 832 + 512 + 64
    CHECK(ws.used() == 64 + 64 + 832 + 512 + 64);
    auto* pa = reinterpret_cast<const char*>(a.data());
    auto* pb = reinterpret_cast<const char*>(b.data());
    auto* pc = reinterpret_cast<const char*>(c.data());
    CHECK(pb >= pa + 12);
    CHECK(pc >= pb + 1);
    CHECK(f.take<float>(0).empty());
    CHECK(ws.take_bytes(0) == nullptr);
    CHECK(ws.used() == 64 + 64 + 832 + 512 + 64);
  }
  CHECK(ws.used() == 0);
  CHECK(ws.high_water() == 64 + 64 + 832 + 512 + 64);
  CHECK(ws.block_count() == 1);
}

TEST_CASE("workspace: frames nest and return their scratch in LIFO order", "[core][workspace]") {
  workspace ws;
  auto outer = ws.scope();
  auto a = outer.take<int>(10, 7);
  const std::size_t after_a = ws.used();
  float* first_inner = nullptr;
  {
    auto inner = ws.scope();
    first_inner = inner.take<float>(1000).data();
    {
      auto innermost = ws.scope();
      innermost.take<float>(5000);
      CHECK(ws.used() > after_a + 4000);
    }
    CHECK(ws.used() == after_a + 4032);  // 1000 floats rounded to 64 bytes
  }
  CHECK(ws.used() == after_a);
  {
    auto again = ws.scope();
    CHECK(again.take<float>(1000).data() == first_inner);  // the same memory is reused
  }
  CHECK(a[9] == 7);
  // A stale mark (already returned) is ignored, not a jump forward.
  const auto m = ws.mark();
  auto p = ws.take<char>(64);
  ws.rewind(m);
  CHECK(ws.used() == after_a);
  ws.rewind({m.block, m.offset + 640, m.used + 640});
  CHECK(ws.used() == after_a);
  (void)p;
}

TEST_CASE("workspace: growth keeps earlier pieces, then merges into one block",
          "[core][workspace]") {
  workspace ws;
  std::vector<std::span<std::uint32_t>> pieces;
  {
    auto f = ws.scope();
    for (std::uint32_t i = 0; i < 40; ++i) {
      auto s = f.take<std::uint32_t>(index_t(5000) * (i + 1), i);  // 20 KB .. 800 KB
      pieces.push_back(s);
    }
    CHECK(ws.block_count() > 1);  // grew past the first block
    for (std::uint32_t i = 0; i < 40; ++i) {
      const auto& s = pieces[i];
      CHECK(s.front() == i);
      CHECK(s.back() == i);  // nothing moved or was overwritten when the arena grew
    }
  }
  CHECK(ws.used() == 0);
  CHECK(ws.block_count() == 1);  // merged when the last frame closed
  CHECK(ws.capacity() >= ws.high_water());
  const std::size_t cap = ws.capacity();
  {
    seqmix::testing::allocation_scope counter;
    auto f = ws.scope();
    for (std::uint32_t i = 0; i < 40; ++i) f.take<std::uint32_t>(index_t(5000) * (i + 1));
    CHECK(counter.stats().count == 0);  // the same requests now fit in the one block
  }
  CHECK(ws.capacity() == cap);  // never shrinks by itself
}

TEST_CASE("workspace: a steady loop allocates nothing after the first call", "[core][workspace]") {
  workspace& ws = thread_workspace();
  const double first = chunked_like_call(ws, 300, 64, 48);  // grows the arena
  seqmix::testing::allocation_scope counter;
  double last = 0;
  for (int call = 0; call < 50; ++call) last = chunked_like_call(ws, 300, 64, 48);
  // smaller requests fit too
  for (index_t T = 1; T < 300; T += 37) chunked_like_call(ws, T, 32, 48);
  CHECK(counter.stats().count == 0);
  CHECK(last == first);
  CHECK(ws.used() == 0);
}

TEST_CASE("workspace: one arena per thread, parallel steady state allocates nothing",
          "[core][workspace]") {
  scoped_num_threads threads(2);
  const index_t items = 8;
  std::vector<workspace*> arena(static_cast<std::size_t>(items), nullptr);
  std::vector<double> out(static_cast<std::size_t>(items), 0.0);
  auto call = [&] {
    parallel_for(items, [&](index_t i) {
      workspace& ws = thread_workspace();
      arena[static_cast<std::size_t>(i)] = &ws;
      out[static_cast<std::size_t>(i)] = chunked_like_call(ws, 100 + 10 * i, 32, 16);
    });
  };
  call();  // first call: each thread's arena grows
  const std::vector<double> expect = out;
  {
    seqmix::testing::allocation_scope counter;
    for (int c = 0; c < 20; ++c) call();
    CHECK(counter.stats().count == 0);
  }
  CHECK(out == expect);
#if SEQMIX_HAS_OPENMP
  // a static schedule over 2 threads: two distinct arenas
  CHECK(std::set<workspace*>(arena.begin(), arena.end()).size() == 2);
#endif
  // another OS thread has its own arena
  workspace* other = nullptr;
  std::thread([&] { other = &thread_workspace(); }).join();
  CHECK(other != &thread_workspace());
}

TEST_CASE("workspace: release, reserve and checked sizes", "[core][workspace][hostile]") {
  workspace ws;
  ws.reserve(1 << 20);
  CHECK(ws.block_count() == 1);
  CHECK(ws.capacity() >= (1u << 20));
  {
    seqmix::testing::allocation_scope counter;
    auto f = ws.scope();
    f.take<float>(200000);
    CHECK(counter.stats().count == 0);
  }
  {
    auto f = ws.scope();
    f.take<float>(10);
    CHECK_THROWS_WITH(ws.release(), Contains("seqmix::workspace::release: argument 'this'") &&
                                        Contains("in use (64 bytes"));
    CHECK_THROWS_WITH(ws.reserve(1 << 22), Contains("seqmix::workspace::reserve"));
  }
  ws.release();
  CHECK(ws.capacity() == 0);
  CHECK(ws.high_water() == 0);
  CHECK(ws.block_count() == 0);

  CHECK_THROWS_WITH(ws.take<float>(-1),
                    Contains("seqmix::workspace::take: argument 'n'") && Contains("got -1"));
  CHECK_THROWS_WITH(ws.take<double>(index_t(1) << 61),
                    Contains("seqmix::workspace::take: argument 'n'") && Contains("bytes"));
  CHECK_THROWS_WITH(
      ws.take_view<float>({3, -2}),
      Contains("seqmix::workspace::take_view: argument 'shape'") && Contains("[3, -2]"));
  const index_t e32 = index_t(1) << 32;
  CHECK_THROWS_WITH(ws.take_view<float>({e32, e32}),
                    Contains("workspace::take_view: argument 'shape'") && Contains("overflows"));
  CHECK_THROWS_WITH(ws.take_bytes(~std::size_t(0)),
                    Contains("seqmix::workspace::take_bytes: argument 'bytes'"));
  CHECK(ws.used() == 0);  // failed requests took nothing

  // moving an arena moves its blocks
  ws.reserve(4096);
  workspace moved = std::move(ws);
  CHECK(moved.block_count() == 1);
  CHECK(ws.block_count() == 0);  // NOLINT(bugprone-use-after-move)
}

#ifdef SEQMIX_WORKSPACE_ASAN
TEST_CASE("workspace: under ASan, scratch is poisoned once returned", "[core][workspace]") {
  workspace ws;
  float* p = nullptr;
  {
    auto f = ws.scope();
    p = f.take<float>(100, 1.0f).data();
    CHECK(__asan_address_is_poisoned(p) == 0);
    CHECK(__asan_address_is_poisoned(p + 99) == 0);
    CHECK(__asan_address_is_poisoned(p + 112) != 0);  // past the 448 bytes taken: not taken
  }
  CHECK(__asan_address_is_poisoned(p) != 0);  // a span kept past its frame would be reported
  auto f = ws.scope();
  CHECK(f.take<float>(1).data() == p);
  CHECK(__asan_address_is_poisoned(p) == 0);
}
#endif
