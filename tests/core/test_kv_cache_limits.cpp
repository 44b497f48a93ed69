// SPDX-License-Identifier: MIT
// kv_cache under hostile sizes and indices (issue 20): overflowing capacities and windows,
// out-of-range (b, h), edited snapshots. Every failure is a seqmix error naming the function the
// user called, the argument and the expected and actual values, and leaves the cache untouched.
#include <limits>
#include <new>
#include <string>

#include <catch2/catch.hpp>

#include <seqmix/mixers/kv_cache.hpp>

using namespace seqmix;
using Catch::Matchers::Contains;

namespace {

// A cache whose rows hold recognisable values: key (b, h, r, i) = 1000 b + 100 h + r + i / 100.
kv_cache<float> filled_full(index_t B, index_t H, index_t K, index_t V, index_t cap, index_t len) {
  auto c = kv_cache<float>::full(B, H, K, V, cap);
  for (index_t b = 0; b < B; ++b) {
    for (index_t h = 0; h < H; ++h) {
      for (index_t r = 0; r < len; ++r) {
        float* k = c.key_row(b, h, r);
        float* v = c.value_row(b, h, r);
        for (index_t i = 0; i < K; ++i) k[i] = float(1000 * b + 100 * h + r) + float(i) / 100;
        for (index_t i = 0; i < V; ++i) v[i] = -float(1000 * b + 100 * h + r) - float(i) / 100;
      }
    }
    c.set_length(b, len);
  }
  return c;
}

bool same_contents(const kv_cache<float>& a, const kv_cache<float>& b) {
  if (a.batch() != b.batch() || a.kv_heads() != b.kv_heads()) return false;
  for (index_t s = 0; s < a.batch(); ++s) {
    if (a.length(s) != b.length(s)) return false;
    for (index_t h = 0; h < a.kv_heads(); ++h) {
      auto ka = a.keys(s, h), kb = b.keys(s, h);
      auto va = a.values(s, h), vb = b.values(s, h);
      if (ka.shape() != kb.shape() || va.shape() != vb.shape()) return false;
      for (index_t r = 0; r < ka.extent(0); ++r) {
        for (index_t i = 0; i < ka.extent(1); ++i) {
          if (ka(r, i) != kb(r, i)) return false;
        }
        for (index_t i = 0; i < va.extent(1); ++i) {
          if (va(r, i) != vb(r, i)) return false;
        }
      }
    }
  }
  return true;
}

}  // namespace

TEST_CASE("kv_cache limits: overflowing capacity and window are clear shape_errors",
          "[core][kv_cache][hostile]") {
  const index_t huge = index_t(1) << 62;
  CHECK_THROWS_MATCHES(kv_cache<float>::full(1, 1, 16, 16, huge), shape_error,
                       Catch::Matchers::Predicate<shape_error>([](const shape_error& e) {
                         const std::string m = e.what();
                         return m.find("seqmix::kv_cache::full: argument 'capacity'") == 0 &&
                                m.find("4611686018427387904") != std::string::npos &&
                                m.find("overflows") != std::string::npos;
                       }));
  CHECK_THROWS_WITH(
      kv_cache<float>::ring(1, 1, 16, 16, huge),
      Contains("seqmix::kv_cache::ring: argument 'window'") && Contains("4611686018427387904"));
  // Each factor is fine on its own; their product overflows.
  const index_t big = index_t(1) << 31;
  CHECK_THROWS_WITH(kv_cache<double>::full(big, big, 4, 4, 4),
                    Contains("kv_cache::full: argument 'capacity'") && Contains("overflows"));
  CHECK_THROWS_WITH(kv_cache<float>::full(1, 1, std::numeric_limits<index_t>::max(), 1, 1),
                    Contains("kv_cache::full") && Contains("overflows"));
  // Sizes that fit index_t but not in bytes.
  CHECK_THROWS_WITH(kv_cache<double>::full(1, 1, 1, 1, index_t(1) << 60),
                    Contains("kv_cache::full: argument 'capacity'") && Contains("bytes"));
  // Non-positive sizes name their argument.
  CHECK_THROWS_WITH(kv_cache<float>::full(0, 1, 16, 16, 4),
                    Contains("kv_cache::full: argument 'batch'") && Contains("got 0"));
  CHECK_THROWS_WITH(kv_cache<float>::ring(1, 1, 16, -3, 4),
                    Contains("kv_cache::ring: argument 'value_dim'") && Contains("got -3"));
}

TEST_CASE("kv_cache limits: reserve past the addressable size throws and keeps the cache",
          "[core][kv_cache][hostile]") {
  auto c = filled_full(1, 1, 16, 16, 4, 3);
  const auto before = c.snapshot();
  CHECK_THROWS_WITH(c.reserve(index_t(1) << 62),
                    Contains("seqmix::kv_cache::reserve: argument 'new_capacity'") &&
                        Contains("4611686018427387904"));
  CHECK_THROWS_WITH(c.reserve(std::numeric_limits<index_t>::max()),
                    Contains("kv_cache::reserve: argument 'new_capacity'"));
  CHECK_THROWS_WITH(c.reserve(-5),
                    Contains("kv_cache::reserve: argument 'new_capacity'") && Contains("-5"));
  // The cache is intact and usable.
  CHECK(c.capacity() == 4);
  CHECK(c.storage_bytes() == 4 * 32 * sizeof(float));
  CHECK(c.keys(0, 0).data() != nullptr);
  CHECK(c.keys(0, 0)(2, 1) == 2.01f);
  c.reserve(9);
  CHECK(c.capacity() == 9);
  CHECK(c.keys(0, 0)(2, 1) == 2.01f);
  CHECK(c.values(0, 0)(1, 0) == -1.0f);
  (void)before;
}

#if defined(__SANITIZE_ADDRESS__)
#define SEQMIX_TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SEQMIX_TEST_ASAN 1
#endif
#endif

#ifndef SEQMIX_TEST_ASAN
// Under ASan an allocation beyond its 1 TiB limit aborts the process instead of throwing, so
// the refused-allocation path is tested in the plain builds only.
TEST_CASE("kv_cache limits: a size the system refuses is an allocation_error naming it",
          "[core][kv_cache][hostile]") {
  // 2^42 rows · 32 floats = 2^49 bytes (512 TiB): representable, never allocatable here.
  try {
    auto c = kv_cache<float>::full(1, 1, 16, 16, index_t(1) << 42);
    FAIL("a 512 TiB cache was allocated");
  } catch (const allocation_error& e) {
    const std::string m = e.what();
    CHECK_THAT(m, Contains("seqmix::kv_cache::full: argument 'capacity'") &&
                      Contains("4398046511104") && Contains("bytes"));
  }
  auto c = kv_cache<float>::full(1, 1, 16, 16, 2);
  CHECK_THROWS_AS(c.reserve(index_t(1) << 42), std::bad_alloc);
  CHECK(c.capacity() == 2);
}
#endif

TEST_CASE("kv_cache limits: keys / values / length / held check b and h",
          "[core][kv_cache][hostile]") {
  const auto c = filled_full(2, 3, 4, 5, 8, 6);
  CHECK(c.keys(1, 2).shape() == shape_t<2>{6, 4});
  CHECK(c.values(1, 2).shape() == shape_t<2>{6, 5});
  CHECK(c.keys(1, 2)(5, 3) == 1205.03f);

  CHECK_THROWS_WITH(c.keys(0, 3), Contains("seqmix::kv_cache::keys: argument 'h'") &&
                                      Contains("[0, 3)") && Contains("got 3"));
  CHECK_THROWS_WITH(c.keys(0, -1),
                    Contains("seqmix::kv_cache::keys: argument 'h'") && Contains("got -1"));
  CHECK_THROWS_WITH(c.values(0, 7), Contains("seqmix::kv_cache::values: argument 'h'"));
  CHECK_THROWS_WITH(c.keys(2, 0), Contains("seqmix::kv_cache::keys: argument 'b'") &&
                                      Contains("[0, 2)") && Contains("got 2"));
  CHECK_THROWS_WITH(c.values(-1, 0), Contains("seqmix::kv_cache::values: argument 'b'"));
  CHECK_THROWS_WITH(c.length(5), Contains("seqmix::kv_cache::length: argument 'b'"));
  CHECK_THROWS_WITH(c.held(-2), Contains("seqmix::kv_cache::held: argument 'b'"));
  // Not std::out_of_range any more: a shape_error (an std::invalid_argument).
  CHECK_THROWS_AS(c.length(2), shape_error);
  CHECK_THROWS_AS(c.keys(0, 9), shape_error);

  auto m = filled_full(2, 3, 4, 5, 8, 6);
  CHECK_THROWS_WITH(m.reset(2), Contains("kv_cache::reset: argument 'b'"));
  CHECK_THROWS_WITH(m.truncate(-1, 0), Contains("kv_cache::truncate: argument 'b'"));
  CHECK_THROWS_WITH(m.truncate(0, 7), Contains("kv_cache::truncate: argument 'n'") &&
                                          Contains("[0, 6]") && Contains("got 7"));
}

TEST_CASE("kv_cache limits: an edited snapshot is rejected before anything is written",
          "[core][kv_cache][hostile]") {
  auto c = filled_full(2, 2, 4, 3, 8, 5);
  const auto good = c.snapshot();
  auto target = filled_full(2, 2, 4, 3, 8, 2);
  const auto reference = filled_full(2, 2, 4, 3, 8, 2);

  SECTION("lengths beyond the stored rows") {
    auto s = good;
    s.lengths[1] = 6;  // 5 rows stored
    CHECK_THROWS_WITH(target.restore(s),
                      Contains("seqmix::kv_cache::restore: argument 's.lengths'") &&
                          Contains("sequence 1") && Contains("is 6") && Contains("stores 5"));
  }
  SECTION("negative lengths") {
    auto s = good;
    s.lengths[0] = -1;
    CHECK_THROWS_WITH(target.restore(s),
                      Contains("argument 's.lengths'") && Contains(">= 0") && Contains("got -1"));
  }
  SECTION("values disagreeing with keys") {
    auto s = good;
    s.values = tensor<float, 4>({2, 2, 4, 3});  // 4 rows, keys have 5
    CHECK_THROWS_WITH(target.restore(s), Contains("argument 's.values'") &&
                                             Contains("[2, 2, 5, 3]") && Contains("[2, 2, 4, 3]"));
  }
  SECTION("values of another value dim") {
    auto s = good;
    s.values = tensor<float, 4>({2, 2, 5, 4});
    CHECK_THROWS_WITH(target.restore(s), Contains("argument 's.values'"));
  }
  SECTION("keys of another geometry or larger than the capacity") {
    auto s = good;
    s.keys = tensor<float, 4>({2, 3, 5, 4});
    CHECK_THROWS_WITH(target.restore(s), Contains("argument 's.keys'") && Contains("[2, 3, 5, 4]"));
    auto small = kv_cache<float>::full(2, 2, 4, 3, 4);  // capacity 4 < 5 rows
    CHECK_THROWS_WITH(small.restore(good),
                      Contains("argument 's.keys'") && Contains("rows <= capacity"));
  }
  SECTION("batch of another size") {
    auto s = good;
    s.lengths.push_back(0);
    CHECK_THROWS_WITH(target.restore(s),
                      Contains("argument 's.lengths'") && Contains("2 sequences, got 3"));
  }
  SECTION("kind") {
    auto ring = kv_cache<float>::ring(2, 2, 4, 3, 8);
    CHECK_THROWS_WITH(ring.restore(good), Contains("argument 's.ring'"));
  }
  // Whatever failed, the target still holds exactly what it held.
  CHECK(same_contents(target, reference));
  // And the good snapshot restores.
  target.restore(good);
  CHECK(same_contents(target, c));
}

TEST_CASE("kv_cache limits: ring snapshots keep positions beyond the window",
          "[core][kv_cache][hostile]") {
  auto r = kv_cache<float>::ring(1, 1, 2, 2, 4);
  for (index_t p = 0; p < 11; ++p) {
    r.key_row(0, 0, p % 4)[0] = float(p);
    r.set_length(0, p + 1);
  }
  auto s = r.snapshot();
  CHECK(s.keys.extent(2) == 4);
  auto r2 = kv_cache<float>::ring(1, 1, 2, 2, 4);
  r2.restore(s);  // length 11 > 4 rows is fine for a full ring snapshot
  CHECK(r2.length(0) == 11);
  CHECK(r2.keys(0, 0)(10 % 4, 0) == 10.0f);
  s.lengths[0] = -4;
  CHECK_THROWS_WITH(r2.restore(s), Contains("argument 's.lengths'"));
  CHECK(r2.length(0) == 11);
  // A ring snapshot of fewer rows than the window cannot claim more tokens than it stores.
  auto young = kv_cache<float>::ring(1, 1, 2, 2, 4);
  young.set_length(0, 2);
  auto ys = young.snapshot();
  CHECK(ys.keys.extent(2) == 2);
  ys.lengths[0] = 3;
  CHECK_THROWS_WITH(r2.restore(ys), Contains("needs 3 rows") && Contains("stores 2"));
}
