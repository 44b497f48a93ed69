// SPDX-License-Identifier: MIT
#include <set>
#include <thread>
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
  // Each outer index records the OS thread that ran it; every inner index must run on that same
  // thread (a nested team would hand inner indices to other threads), and the outer loop must
  // really have used two threads (otherwise the check would pass on a serial run).
  std::vector<std::thread::id> outer(8), inner(64);
  std::vector<int> hits(64, 0), inner_threads(8, 0);
  parallel_for(8, [&](index_t i) {
    outer[static_cast<std::size_t>(i)] = std::this_thread::get_id();
    inner_threads[static_cast<std::size_t>(i)] = num_threads();
    parallel_for(8, [&](index_t j) {
      const auto at = static_cast<std::size_t>(i * 8 + j);
      hits[at] += 1;
      inner[at] = std::this_thread::get_id();
    });
  });
  for (int h : hits) REQUIRE(h == 1);
  for (std::size_t at = 0; at < inner.size(); ++at) REQUIRE(inner[at] == outer[at / 8]);
  for (int n : inner_threads) REQUIRE(n == 1);  // num_threads() inside a team is 1
#if SEQMIX_HAS_OPENMP
  REQUIRE(std::set<std::thread::id>(outer.begin(), outer.end()).size() == 2);
#endif
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
  set_num_threads(3);
  {
    scoped_num_threads scope(1);
    CHECK(num_threads() == 1);
    {
      scoped_num_threads inner(2);
#if SEQMIX_HAS_OPENMP
      CHECK(num_threads() == 2);
#endif
    }
    CHECK(num_threads() == 1);  // the inner scope restored the outer one's setting
  }
#if SEQMIX_HAS_OPENMP
  CHECK(num_threads() == 3);  // restored to the value set before the scopes
  set_num_threads(0);
  CHECK(num_threads() == omp_get_max_threads());  // 0: OpenMP's default
#else
  CHECK(num_threads() == 1);
  set_num_threads(0);
#endif
}
