// SPDX-License-Identifier: MIT
// RWKV-7: golden vectors (fla's recurrent_dplr_delta_rule_ref at scale 1, every case, both
// variants), reference == recurrent == chunked over T, chunk, K, V, strong decays (-1e4, -inf),
// state carry, step, varlen, threads, allocations, bad inputs, gate helper.
#include <cmath>
#include <limits>

#include <catch2/catch.hpp>

#include "dplr_common.hpp"

using namespace dplr_test;

namespace {
constexpr kind R7 = kind::rwkv7;
constexpr double golden_tol = 1e-5;
constexpr double form_tol = 1e-5;
constexpr double carry_tol = 1e-6;
using kv = std::pair<index_t, index_t>;
}  // namespace

TEST_CASE("rwkv7: golden rwkv7 (fla dplr reference, scale 1), every case, noh0 and h0",
          "[rwkv7][golden]") {
  const auto& inp = testing::golden::file("inputs");
  const auto& ref = testing::golden::file("fla_delta");
  double worst[3] = {0, 0, 0};
  for (int s = 0; s < testing::golden::case_count; ++s) {
    const std::string cs = "case" + std::to_string(s);
    const std::string op = "rwkv7." + cs;
    inputs<double> in;
    in.q = inp.get<double, 4>(cs + ".q");
    in.k = inp.get<double, 4>(cs + ".k");
    in.v = inp.get<double, 4>(cs + ".v");
    in.g = ref.get<double, 4>(op + ".w");
    in.a = ref.get<double, 4>(op + ".a");
    in.b = ref.get<double, 4>(op + ".b");
    const auto h0 = inp.get<double, 4>(cs + ".h0");
    const auto inf = cast<float>(in);
    for (const std::string variant : {"noh0", "h0"}) {
      const std::string key = op + "." + variant;
      const auto o_ref = ref.get<float, 4>(key + ".o_naive");
      const auto ht_ref = ref.get<float, 4>(key + ".ht_naive");
      const bool with_h0 = variant == "h0";
      for (form fm : {form::reference, form::chunked, form::recurrent}) {
        INFO(key << " form " << int(fm));
        if (fm == form::reference) {
          tensor<double, 4> st = with_h0 ? h0 : tensor<double, 4>(h0.shape());
          const auto o = run<R7, double>(fm, make_mixer<R7, double>(), in, st);
          SEQMIX_CHECK_CLOSE(o_ref, o, golden_tol);
          SEQMIX_CHECK_CLOSE(ht_ref, st, golden_tol);
          worst[0] = std::max(
              {worst[0], testing::compare(o_ref, o).rel_rms, testing::compare(ht_ref, st).rel_rms});
        } else {
          for (index_t c : {16, 64}) {
            if (fm == form::recurrent && c != 64) continue;
            tensor<float, 4> st = with_h0 ? testing::cast<float>(h0) : tensor<float, 4>(h0.shape());
            const auto o = run<R7, float>(fm, make_mixer<R7, float>(false, c), inf, st);
            INFO("chunk " << c);
            SEQMIX_CHECK_CLOSE(o_ref, o, golden_tol);
            SEQMIX_CHECK_CLOSE(ht_ref, st, golden_tol);
            const std::size_t w = fm == form::chunked ? 1 : 2;
            worst[w] = std::max({worst[w], testing::compare(o_ref, o).rel_rms,
                                 testing::compare(ht_ref, st).rel_rms});
          }
        }
      }
    }
  }
  WARN(
      "rwkv7 vs fla's dplr reference, max rel RMS over cases 0-3 x {noh0, h0}, o and ht: "
      "reference(double) "
      << worst[0] << ", chunked(float) " << worst[1] << ", recurrent(float) " << worst[2]);
}

TEST_CASE("rwkv7: reference == recurrent == chunked over T, chunk, K, V", "[rwkv7][forms]") {
  const index_t T = GENERATE(1, 2, 63, 64, 65, 257);
  const auto s = GENERATE(kv{1, 1}, kv{7, 7}, kv{64, 64}, kv{65, 33}, kv{16, 65});
  check_forms<R7>({1, T, 1, 1, s.first, s.second}, {16, 32, 64}, form_tol, 400 + std::uint64_t(T));
}

TEST_CASE("rwkv7: longer sequences, K = V = 128, K = 300, B > 1", "[rwkv7][forms]") {
  check_forms<R7>({1, 1000, 1, 1, 32, 32}, {64}, form_tol, 410);
  check_forms<R7>({1, 130, 1, 1, 128, 128}, {32}, form_tol, 411);
  check_forms<R7>({1, 40, 1, 1, 300, 9}, {16}, form_tol, 413);  // K > key_block (256)
  check_forms<R7>({2, 77, 3, 3, 32, 16}, {16, 64}, form_tol, 412);
}

TEST_CASE("rwkv7: decay strength sweep (w = 0 ... x1e4)", "[rwkv7][sweep]") {
  const double mult = GENERATE(0.0, 0.1, 1.0, 10.0, 100.0, 1e4);
  check_forms<R7>({1, 200, 2, 2, 32, 32}, {16, 64}, form_tol, 420, mult);
}

TEST_CASE("rwkv7: -inf and -1e4 decays at chosen tokens and keys", "[rwkv7][sweep]") {
  check_strong_gates<R7>(-1e4, form_tol, 430);
  check_strong_gates<R7>(-std::numeric_limits<double>::infinity(), form_tol, 431);
}

TEST_CASE("rwkv7: state carried across random split points == one call", "[rwkv7][carry]") {
  const dims d{2, 300, 3, 3, 33, 40};
  check_state_carry<R7>(d, form::chunked, 32, carry_tol, 440);
  check_state_carry<R7>(d, form::recurrent, 32, carry_tol, 441);
}

TEST_CASE("rwkv7: step x T == forward_recurrent (bitwise)", "[rwkv7][step]") {
  check_step<R7>({2, 40, 3, 3, 32, 70}, false, 450);
  check_step<R7>({1, 40, 1, 1, 7, 5}, false, 451);
  check_step<R7>({1, 20, 1, 1, 130, 17}, false, 452);
}

TEST_CASE("rwkv7: varlen == separate calls", "[rwkv7][varlen]") {
  const dims d{1, 0, 3, 3, 32, 24};
  check_varlen<R7>(d, form::chunked, {5, 0, 70, 33, 1, 16}, 1e-6, 460);
  check_varlen<R7>(d, form::recurrent, {5, 0, 70, 33, 1, 16}, 1e-6, 461);
}

TEST_CASE("rwkv7: 1 vs 2 vs 3 threads bitwise equal", "[rwkv7][threads]") {
  check_threads<R7>({2, 200, 4, 4, 40, 72}, form::chunked, 470);
  check_threads<R7>({2, 200, 4, 4, 40, 72}, form::recurrent, 471);
}

TEST_CASE("rwkv7: recurrent and step allocate nothing, chunked memory flat in T",
          "[rwkv7][alloc]") {
  check_allocations<R7>();
}

TEST_CASE("rwkv7: bad inputs raise shape_error naming the argument", "[rwkv7][errors]") {
  const dims d{2, 8, 2, 2, 8, 6};
  const auto good = cast<float>(random_inputs<R7>(d, 990));
  const auto m = make_mixer<R7, float>();
  auto expect = [&](const inputs<float>& in, tensor<float, 4> st, const char* name,
                    std::span<const index_t> cu = {}) {
    for (form f : {form::chunked, form::recurrent, form::automatic}) {
      INFO("form " << int(f) << ", expecting '" << name << "'");
      try {
        (void)run<R7, float>(f, m, in, st, cu);
        FAIL("no exception");
      } catch (const shape_error& e) {
        CHECK_THAT(e.what(), Catch::Matchers::Contains(std::string("'") + name + "'"));
      }
    }
  };
  {
    tensor<float, 4> st = good.h0;
    CHECK_NOTHROW((run<R7, float>(form::chunked, m, good, st)));
  }
  auto bad = good;
  bad.k = tensor<float, 4>({2, 8, 2, 7});
  expect(bad, good.h0, "k");
  bad = good;
  bad.a = tensor<float, 4>({2, 8, 2, 7});
  expect(bad, good.h0, "a");
  bad = good;
  bad.b = tensor<float, 4>({2, 8, 1, 8});
  expect(bad, good.h0, "b");
  bad = good;
  bad.b[2] = std::numeric_limits<float>::quiet_NaN();
  expect(bad, good.h0, "b");
  bad = good;
  bad.g[5] = 0.25f;
  expect(bad, good.h0, "w");
  bad.g[5] = std::numeric_limits<float>::quiet_NaN();
  expect(bad, good.h0, "w");
  bad = good;
  bad.v = tensor<float, 4>({2, 8, 4, 6});  // rwkv7 has no grouped value heads
  expect(bad, tensor<float, 4>({2, 4, 8, 6}), "v");
  expect(good, tensor<float, 4>({2, 2, 6, 8}), "state");
  const std::vector<index_t> decreasing{0, 5, 3, 8};
  expect(good, tensor<float, 4>({3, 2, 8, 6}), "cu_seqlens", decreasing);
  {  // step names its arguments with their one-token shapes
    tensor<float, 4> st = good.h0;
    tensor<float, 3> r({2, 2, 8}), k({2, 2, 8}), v({2, 2, 6}), w({2, 2, 8}), a({2, 2, 8}),
        b({2, 2, 9}), o({2, 2, 6});
    try {
      m.step(r, k, v, w, a, b, o, st);
      FAIL("no exception");
    } catch (const shape_error& e) {
      CHECK_THAT(e.what(), Catch::Matchers::Contains("'b'") &&
                               Catch::Matchers::Contains("expected shape [2, 2, 8]"));
    }
  }
  CHECK_THROWS_AS(rwkv7<float>::make_state(0, 1, 4, 4), shape_error);
}

TEST_CASE("rwkv7: gate helper w = -exp(-1/2) sigmoid(x), finite, in (-0.61, 0]", "[rwkv7][gates]") {
  const std::vector<float> xs{-1e30f,
                              -100.f,
                              -20.f,
                              -1.f,
                              0.f,
                              1.f,
                              20.f,
                              100.f,
                              1e30f,
                              std::numeric_limits<float>::max(),
                              std::numeric_limits<float>::lowest()};
  const index_t n = index_t(xs.size());
  tensor<float, 4> x({1, 1, 1, n}), w({1, 1, 1, n});
  for (index_t i = 0; i < n; ++i) x[i] = xs[std::size_t(i)];
  rwkv7_gates<float>(x, w);
  for (index_t i = 0; i < n; ++i) {
    INFO("x " << x[i] << " w " << w[i]);
    CHECK(std::isfinite(w[i]));
    CHECK(w[i] <= 0.f);
    CHECK(w[i] >= -0.6066f);
    CHECK(std::abs(w[i] - reference::rwkv7_gate(x[i])) <= 1e-6f);
  }
  x[3] = std::numeric_limits<float>::infinity();
  CHECK_THROWS_AS(rwkv7_gates<float>(x, w), shape_error);
}
