// SPDX-License-Identifier: MIT
#include <vector>

#include <catch2/catch.hpp>

#include <seqmix/core/parallel.hpp>

using namespace seqmix;

TEST_CASE("parallel_for: every index once, any thread count", "[core][parallel]") {
  for (int threads : {1, 2, 3}) {
    scoped_num_threads scope(threads);
    std::vector<int> hits(1001, 0);
    parallel_for(static_cast<index_t>(hits.size()),
                 [&](index_t i) { hits[static_cast<std::size_t>(i)] += 1; });
    for (int h : hits) REQUIRE(h == 1);
  }
}

TEST_CASE("parallel_for: nested calls run serially inside the team", "[core][parallel]") {
  scoped_num_threads scope(2);
  std::vector<int> hits(64, 0);
  parallel_for(8, [&](index_t i) {
    parallel_for(8, [&](index_t j) { hits[static_cast<std::size_t>(i * 8 + j)] += 1; });
  });
  for (int h : hits) REQUIRE(h == 1);
}

TEST_CASE("parallel_for_with_slot: slots are below max_slots", "[core][parallel]") {
  scoped_num_threads scope(2);
  const int slots = max_slots();
  std::vector<int> bad(100, 0);
  parallel_for_with_slot(100, [&](index_t i, int tid) {
    bad[static_cast<std::size_t>(i)] = (tid < 0 || tid >= slots) ? 1 : 0;
  });
  for (int b : bad) REQUIRE(b == 0);
}

TEST_CASE("set_num_threads: rejects negatives, scoped setting restores", "[core][parallel]") {
  CHECK_THROWS_AS(set_num_threads(-1), shape_error);
  set_num_threads(0);
  {
    scoped_num_threads scope(1);
    CHECK(num_threads() == 1);
  }
#if SEQMIX_HAS_OPENMP
  CHECK(num_threads() >= 1);
#else
  CHECK(num_threads() == 1);
#endif
}
