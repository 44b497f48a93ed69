// SPDX-License-Identifier: MIT
// forward()'s form choice (options::switch_over_t) and its measurement (seqmix/tune.hpp).
#include <cmath>
#include <limits>

#include <seqmix/mixers/gla.hpp>
#include <seqmix/mixers/mamba2_ssd.hpp>
#include <seqmix/tune.hpp>

#include "gated_common.hpp"

using namespace gated_test;

namespace {

/// forward() with the given switch-over, against both explicit forms: bitwise equal to exactly
/// the one it should run (the two forms differ in the last bits, so the check can tell them
/// apart; it requires that they do differ on this input).
void check_gla_choice(std::optional<index_t> switch_over, bool expect_chunked) {
  auto rng = seqmix::testing::make_rng(41);
  const index_t B = 2, TT = 150, H = 2, K = 24, V = 40;
  const auto q = seqmix::testing::random_normal<float, 4>({B, TT, H, K}, rng);
  const auto k = seqmix::testing::random_normal<float, 4>({B, TT, H, K}, rng);
  const auto v = seqmix::testing::random_normal<float, 4>({B, TT, H, V}, rng);
  const auto gk = random_gate<float, 4>({B, TT, H, K}, rng, 0.3);
  auto run = [&](int f) {
    seqmix::gla<float>::options opt;
    opt.switch_over_t = switch_over;
    const seqmix::gla<float> m(opt);
    tensor<float, 4> o({B, TT, H, V});
    auto s = seqmix::gla<float>::make_state(B, H, K, V);
    if (f == 0) m.forward_chunked(q, k, v, gk, o, s);
    if (f == 1) m.forward_recurrent(q, k, v, gk, o, s);
    if (f == 2) m.forward(q, k, v, gk, o, s);
    return o;
  };
  const auto chunked = run(0), recurrent = run(1), automatic = run(2);
  auto same = [](const tensor<float, 4>& a, const tensor<float, 4>& b) {
    for (index_t i = 0; i < a.size(); ++i) {
      if (a[i] != b[i]) return false;
    }
    return true;
  };
  REQUIRE_FALSE(same(chunked, recurrent));
  CHECK(same(automatic, expect_chunked ? chunked : recurrent));
}

}  // namespace

TEST_CASE("form choice: forward() follows options::switch_over_t", "[gla][tune]") {
  check_gla_choice(std::nullopt, false);  // default: recurrent (measured faster here)
  check_gla_choice(std::numeric_limits<index_t>::max(), false);
  check_gla_choice(151, false);  // T = 150 is below it
  check_gla_choice(150, true);
  check_gla_choice(1, true);
}

TEST_CASE("form choice: measure_forms times both forms and derives the switch-over", "[tune]") {
  // 8 vs 2048 tokens: 256x the work, so the longer run must take longer in both forms whatever
  // the machine's load (best of 3; on one thread, since OpenMP barriers on an oversubscribed
  // machine can stall a short run for milliseconds); the switch-over must be the one the
  // timings imply.
  seqmix::scoped_num_threads one(1);
  const index_t lengths[] = {8, 64, 2048};
  for (auto kind :
       {seqmix::gate_kind::none, seqmix::gate_kind::scalar, seqmix::gate_kind::per_key}) {
    const auto t = seqmix::measure_forms<float>(kind, 2, 16, 24, 32, lengths, 3);
    REQUIRE(t.lengths == std::vector<index_t>(std::begin(lengths), std::end(lengths)));
    REQUIRE(t.chunked.size() == 3);
    REQUIRE(t.recurrent.size() == 3);
    for (std::size_t i = 0; i < 3; ++i) {
      CHECK(std::isfinite(t.chunked[i]));
      CHECK(std::isfinite(t.recurrent[i]));
      CHECK(t.chunked[i] > 0.0);
      CHECK(t.recurrent[i] > 0.0);
    }
    CHECK(t.chunked[2] > t.chunked[0]);
    CHECK(t.recurrent[2] > t.recurrent[0]);
    // independent derivation: the smallest T from which chunked is faster at that T and every
    // longer one
    index_t expected = std::numeric_limits<index_t>::max();
    for (std::size_t i = 3; i-- > 0;) {
      if (!(t.chunked[i] < t.recurrent[i])) break;
      expected = lengths[i];
    }
    CHECK(t.switch_over() == expected);
  }
  // the derivation itself, on made-up timings: chunked must win at T and every longer T
  seqmix::form_timings t{{100, 200, 400, 800}, {3, 1, 1, 1}, {2, 2, 0.5, 2}};
  CHECK(t.switch_over() == 800);
  t.recurrent[2] = 2;
  CHECK(t.switch_over() == 200);
  t.recurrent[3] = 1;
  CHECK(t.switch_over() == std::numeric_limits<index_t>::max());
  t.recurrent = {4, 4, 4, 4};
  CHECK(t.switch_over() == 100);
}

TEST_CASE("form choice: measure_forms rejects bad arguments", "[tune]") {
  using seqmix::gate_kind;
  const index_t unsorted[] = {64, 8};
  const index_t bad_len[] = {0, 8};
  CHECK_THROWS_AS(seqmix::measure_forms<float>(gate_kind::none, 0, 8, 8), seqmix::shape_error);
  CHECK_THROWS_AS(seqmix::measure_forms<float>(gate_kind::none, 2, 8, 8, 0), seqmix::shape_error);
  CHECK_THROWS_AS(seqmix::measure_forms<float>(gate_kind::none, 2, 8, 8, 16, unsorted),
                  seqmix::shape_error);
  CHECK_THROWS_AS(seqmix::measure_forms<float>(gate_kind::none, 2, 8, 8, 16, bad_len),
                  seqmix::shape_error);
  CHECK_THROWS_WITH(seqmix::measure_forms<float>(gate_kind::scalar, 2, 8, 8, 16, unsorted),
                    Catch::Contains("lengths"));
}
