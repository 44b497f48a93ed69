// SPDX-License-Identifier: MIT
// KDA (Kimi Delta Attention): golden vectors (fla naive_recurrent_kda, every case, both
// variants), reference == recurrent == chunked over T, chunk, K, V, GVA, l2norm, strong gates
// (-1e4, -inf), state carry, step, varlen, threads, allocations, bad inputs, gate helper.
#include <cmath>
#include <limits>

#include <catch2/catch.hpp>

#include <seqmix/mixers/gated_delta_net.hpp>

#include "dplr_common.hpp"

using namespace dplr_test;

namespace {
constexpr kind K_ = kind::kda;
constexpr double golden_tol = 1e-5;  // float forms and double reference vs fla *_naive
constexpr double form_tol = 1e-5;    // float forms vs double reference
constexpr double carry_tol = 1e-6;
using kv = std::pair<index_t, index_t>;
}  // namespace

TEST_CASE("kda: golden naive_recurrent_kda (fla), every case, noh0 and h0", "[kda][golden]") {
  const auto& f = testing::golden::file("v2/kda");
  double worst[3] = {0, 0, 0};
  for (int s = 0; s < testing::golden::case_count; ++s) {
    const std::string cs = "kda.case" + std::to_string(s);
    inputs<double> in;
    in.q = f.get<double, 4>(cs + ".q");
    in.k = f.get<double, 4>(cs + ".k");
    in.v = f.get<double, 4>(cs + ".v");
    in.g = f.get<double, 4>(cs + ".g");
    in.beta = f.get<double, 3>(cs + ".beta");
    const auto h0 = f.get<double, 4>(cs + ".h0");
    const auto inf = cast<float>(in);
    {  // the gate helper reproduces the stored gates from g_raw, A_log, dt_bias
      const auto g_raw = f.get<float, 4>(cs + ".g_raw");
      const auto A_log = f.get<float, 1>(cs + ".A_log");
      const auto dt_bias = f.get<float, 1>(cs + ".dt_bias");
      tensor<float, 4> g(g_raw.shape());
      kda_gates<float>(g_raw, A_log, dt_bias, g);
      INFO(cs << " gate helper");
      const auto g_ref = f.get<float, 4>(cs + ".g");
      SEQMIX_CHECK_CLOSE(g_ref, g, 1e-6);
    }
    for (const std::string variant : {"noh0", "h0"}) {
      const std::string key = cs + "." + variant;
      const auto o_ref = f.get<float, 4>(key + ".o_naive");
      const auto ht_ref = f.get<float, 4>(key + ".ht_naive");
      const bool with_h0 = variant == "h0";
      for (form fm : {form::reference, form::chunked, form::recurrent}) {
        INFO(key << " form " << int(fm));
        if (fm == form::reference) {
          tensor<double, 4> st = with_h0 ? h0 : tensor<double, 4>(h0.shape());
          const auto o = run<K_, double>(fm, make_mixer<K_, double>(), in, st);
          SEQMIX_CHECK_CLOSE(o_ref, o, golden_tol);
          SEQMIX_CHECK_CLOSE(ht_ref, st, golden_tol);
          worst[0] = std::max(
              {worst[0], testing::compare(o_ref, o).rel_rms, testing::compare(ht_ref, st).rel_rms});
        } else {
          for (index_t c : {16, 64}) {
            if (fm == form::recurrent && c != 64) continue;
            tensor<float, 4> st = with_h0 ? testing::cast<float>(h0) : tensor<float, 4>(h0.shape());
            const auto o = run<K_, float>(fm, make_mixer<K_, float>(false, c), inf, st);
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
      "kda vs naive_recurrent_kda, max rel RMS over cases 0-3 x {noh0, h0}, o and ht: "
      "reference(double) "
      << worst[0] << ", chunked(float) " << worst[1] << ", recurrent(float) " << worst[2]);
}

TEST_CASE("kda: reference == recurrent == chunked over T, chunk, K, V", "[kda][forms]") {
  const index_t T = GENERATE(1, 2, 63, 64, 65, 257);
  const auto s = GENERATE(kv{1, 1}, kv{7, 7}, kv{64, 64}, kv{65, 33}, kv{16, 65});
  check_forms<K_>({1, T, 1, 1, s.first, s.second}, {16, 32, 64}, form_tol, 300 + std::uint64_t(T));
}

TEST_CASE("kda: the same gate on every key == gated_delta_net (the special case)", "[kda][forms]") {
  // GDN is KDA with g_t broadcast over the keys: both forms agree with gated_delta_net's
  const dims d{2, 150, 2, 4, 24, 20};
  auto in = cast<float>(random_inputs<K_>(d, 380, 1.0, true));
  tensor<float, 3> g3({d.B, d.T, d.HV});
  for (index_t b = 0; b < d.B; ++b)
    for (index_t t = 0; t < d.T; ++t)
      for (index_t h = 0; h < d.HV; ++h) {
        g3(b, t, h) = in.g(b, t, h, 0);
        for (index_t i = 0; i < d.K; ++i) in.g(b, t, h, i) = g3(b, t, h);
      }
  const gated_delta_net<float> gdn({.use_qk_l2norm = true, .chunk_size = 32});
  for (form f : {form::recurrent, form::chunked}) {
    INFO("form " << int(f));
    tensor<float, 4> s1 = in.h0, s2 = in.h0;
    tensor<float, 4> o1({d.B, d.T, d.HV, d.V});
    if (f == form::recurrent) {
      gdn.forward_recurrent(in.q, in.k, in.v, g3, in.beta, o1, s1);
    } else {
      gdn.forward_chunked(in.q, in.k, in.v, g3, in.beta, o1, s1);
    }
    const auto o2 = run<K_, float>(f, make_mixer<K_, float>(true, 32), in, s2);
    SEQMIX_CHECK_CLOSE(o1, o2, 1e-6);
    SEQMIX_CHECK_CLOSE(s1, s2, 1e-6);
  }
}

TEST_CASE("kda: longer sequences, K = V = 128, K = 300, GVA, l2norm", "[kda][forms]") {
  check_forms<K_>({1, 1000, 1, 1, 32, 32}, {64}, form_tol, 310);
  check_forms<K_>({1, 130, 1, 1, 128, 128}, {32}, form_tol, 311);
  check_forms<K_>({1, 40, 1, 1, 300, 9}, {16}, form_tol, 313);  // K > key_block (256)
  check_forms<K_>({2, 77, 2, 6, 32, 16}, {16, 64}, form_tol, 312, 1.0, true);
}

TEST_CASE("kda: gate strength sweep (g = 0 ... x1e4)", "[kda][sweep]") {
  const double mult = GENERATE(0.0, 0.1, 1.0, 10.0, 100.0, 1e4);
  check_forms<K_>({1, 200, 1, 2, 32, 32}, {16, 64}, form_tol, 320, mult);
}

TEST_CASE("kda: -inf and -1e4 gates at chosen tokens and keys", "[kda][sweep]") {
  check_strong_gates<K_>(-1e4, form_tol, 330);
  check_strong_gates<K_>(-std::numeric_limits<double>::infinity(), form_tol, 331);
}

TEST_CASE("kda: state carried across random split points == one call", "[kda][carry]") {
  const dims d{2, 300, 2, 4, 33, 40};
  check_state_carry<K_>(d, form::chunked, 32, carry_tol, 340);
  check_state_carry<K_>(d, form::recurrent, 32, carry_tol, 341);
}

TEST_CASE("kda: step x T == forward_recurrent (bitwise)", "[kda][step]") {
  check_step<K_>({2, 40, 2, 4, 32, 70}, true, 350);
  check_step<K_>({1, 40, 1, 1, 7, 5}, false, 351);
  check_step<K_>({1, 20, 1, 1, 130, 17}, false, 352);
}

TEST_CASE("kda: varlen == separate calls", "[kda][varlen]") {
  const dims d{1, 0, 2, 4, 32, 24};
  check_varlen<K_>(d, form::chunked, {5, 0, 70, 33, 1, 16}, 1e-6, 360);
  check_varlen<K_>(d, form::recurrent, {5, 0, 70, 33, 1, 16}, 1e-6, 361);
}

TEST_CASE("kda: 1 vs 2 vs 3 threads bitwise equal", "[kda][threads]") {
  check_threads<K_>({2, 200, 2, 4, 40, 72}, form::chunked, 370);
  check_threads<K_>({2, 200, 2, 4, 40, 72}, form::recurrent, 371);
}

TEST_CASE("kda: recurrent and step allocate nothing, chunked memory flat in T", "[kda][alloc]") {
  check_allocations<K_>();
}

TEST_CASE("kda: bad inputs raise shape_error naming the argument", "[kda][errors]") {
  const dims d{2, 8, 2, 4, 8, 6};
  const auto good = cast<float>(random_inputs<K_>(d, 900));
  const auto m = make_mixer<K_, float>();
  auto expect = [&](const inputs<float>& in, tensor<float, 4> st, const char* name,
                    std::span<const index_t> cu = {}) {
    for (form f : {form::chunked, form::recurrent, form::automatic}) {
      INFO("form " << int(f) << ", expecting '" << name << "'");
      try {
        (void)run<K_, float>(f, m, in, st, cu);
        FAIL("no exception");
      } catch (const shape_error& e) {
        CHECK_THAT(e.what(), Catch::Matchers::Contains(std::string("'") + name + "'"));
      }
    }
  };
  {
    tensor<float, 4> st = good.h0;
    CHECK_NOTHROW((run<K_, float>(form::chunked, m, good, st)));
  }
  auto bad = good;
  bad.k = tensor<float, 4>({2, 8, 2, 7});
  expect(bad, good.h0, "k");
  bad = good;
  bad.g = tensor<float, 4>({2, 8, 4, 7});
  expect(bad, good.h0, "g");
  bad = good;
  bad.g = tensor<float, 4>({2, 8, 2, 8});
  expect(bad, good.h0, "g");
  bad = good;
  bad.g[5] = std::numeric_limits<float>::quiet_NaN();
  expect(bad, good.h0, "g");
  bad.g[5] = 0.5f;
  expect(bad, good.h0, "g");
  bad.g[5] = std::numeric_limits<float>::infinity();
  expect(bad, good.h0, "g");
  bad = good;
  bad.beta = tensor<float, 3>({2, 8, 2});
  expect(bad, good.h0, "beta");
  bad = good;
  bad.beta[3] = std::numeric_limits<float>::infinity();
  expect(bad, good.h0, "beta");
  expect(good, tensor<float, 4>({2, 4, 6, 8}), "state");
  bad = good;
  bad.v = tensor<float, 4>({2, 8, 3, 6});
  expect(bad, good.h0, "v");
  bad = good;
  bad.g[5] = -std::numeric_limits<float>::infinity();  // -inf is a reset, allowed
  {
    tensor<float, 4> st = good.h0;
    CHECK_NOTHROW((run<K_, float>(form::recurrent, m, bad, st)));
  }
  const std::vector<index_t> not_last{0, 3, 7};
  expect(good, tensor<float, 4>({2, 4, 8, 6}), "cu_seqlens", not_last);
  {  // o overlapping an input
    tensor<float, 4> st = good.h0;
    tensor<float, 4> qv({2, 8, 4, 6});
    CHECK_THROWS_AS(m.forward_recurrent(good.q, good.k, qv, good.g, good.beta, qv, st),
                    shape_error);
  }
  {  // options
    tensor<float, 4> st = good.h0;
    const auto m0 = make_mixer<K_, float>(false, 0);
    CHECK_THROWS_AS((run<K_, float>(form::chunked, m0, good, st)), shape_error);
  }
  {  // step names its arguments with their one-token shapes
    tensor<float, 4> st = good.h0;
    tensor<float, 3> q({2, 2, 8}), k({2, 2, 7}), v({2, 4, 6}), g({2, 4, 8}), o({2, 4, 6});
    tensor<float, 2> beta({2, 4});
    try {
      m.step(q, k, v, g, beta, o, st);
      FAIL("no exception");
    } catch (const shape_error& e) {
      CHECK_THAT(e.what(), Catch::Matchers::Contains("'k'") &&
                               Catch::Matchers::Contains("expected shape [2, 2, 8]"));
    }
    tensor<float, 3> k_ok({2, 2, 8});
    g[3] = 1.f;
    CHECK_THROWS_AS(m.step(q, k_ok, v, g, beta, o, st), shape_error);
  }
  CHECK_THROWS_AS(kda<float>::make_state(1, 0, 4, 4), shape_error);
}

TEST_CASE("kda: gate helper finite for every finite input, == long double reference",
          "[kda][gates]") {
  const std::vector<float> xs{-1e30f,
                              -1e4f,
                              -100.f,
                              -20.f,
                              -1.f,
                              0.f,
                              0.5f,
                              19.f,
                              20.f,
                              21.f,
                              100.f,
                              1e4f,
                              1e30f,
                              std::numeric_limits<float>::max(),
                              std::numeric_limits<float>::lowest()};
  const index_t n = index_t(xs.size());
  tensor<float, 4> g_raw({1, n, n, 3}), g({1, n, n, 3});
  tensor<float, 1> A_log({n}), dt_bias({n * 3});
  for (index_t h = 0; h < n; ++h) A_log[h] = xs[std::size_t(h)];
  for (index_t i = 0; i < n * 3; ++i) dt_bias[i] = xs[std::size_t((i * 7) % n)];
  for (index_t t = 0; t < n; ++t)
    for (index_t h = 0; h < n; ++h)
      for (index_t c = 0; c < 3; ++c) g_raw(0, t, h, c) = xs[std::size_t(t)];
  kda_gates<float>(g_raw, A_log, dt_bias, g);
  CHECK(testing::all_finite(g));
  for (index_t t = 0; t < n; ++t)
    for (index_t h = 0; h < n; ++h)
      for (index_t c = 0; c < 3; ++c) {
        const float ref =
            reference::gated_delta_gate(g_raw(0, t, h, c), A_log[h], dt_bias[h * 3 + c]);
        INFO("g_raw " << g_raw(0, t, h, c) << " A_log " << A_log[h] << " g " << g(0, t, h, c)
                      << " ref " << ref);
        CHECK(g(0, t, h, c) <= 0.f);
        CHECK(std::abs(g(0, t, h, c) - ref) <= 1e-6f * std::abs(ref) + 1e-30f);
      }
  g_raw[4] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_AS(kda_gates<float>(g_raw, A_log, dt_bias, g), shape_error);
  CHECK_THROWS_AS(kda_gates<float>(g_raw, A_log, tensor<float, 1>({n}), g), shape_error);
}
