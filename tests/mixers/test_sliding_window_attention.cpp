// SPDX-License-Identifier: MIT
// sliding_window_attention: golden (softmax_swa32), the ring-buffer recurrent form (constant
// memory, no allocation per step, wrap-around inside a prefill), prefill + steps == one call,
// ring == full cache, threads, bad input.
#include <vector>

#include <catch2/catch.hpp>

#include "alloc_counter.hpp"
#include "attention_common.hpp"
#include "golden.hpp"
#include "testing.hpp"

using namespace seqmix;
using namespace seqmix::testing;
using attn::problem;

namespace {

constexpr double golden_tol = 1e-5;            // float kernel vs golden o_naive (issue: <= 1e-5)
constexpr double reference_golden_tol = 2e-6;  // double reference vs float-stored golden
constexpr double float_tol = 1e-5;             // float forms vs double reference
constexpr double split_tol = 1e-6;             // float prefill+steps vs one float chunked call

}  // namespace

TEST_CASE("sliding_window_attention: golden softmax_swa32", "[swa][golden]") {
  const auto& in = golden::file("inputs");
  const auto& gold = golden::file("softmax_attn");
  sliding_window_attention<float> m({.window = 32});
  for (int c = 0; c < golden::case_count; ++c) {
    const std::string pre = "case" + std::to_string(c) + ".";
    auto q = in.get<double, 4>(pre + "q"), k = in.get<double, 4>(pre + "k"),
         v = in.get<double, 4>(pre + "v");
    auto expect = gold.get<double, 4>("softmax_swa32." + pre + "o_naive");
    INFO("case " << c);
    tensor<double, 4> ref(expect.shape());
    reference::softmax_attention<double>(q, k, v, ref, {}, 32);
    SEQMIX_CHECK_CLOSE(expect, ref, reference_golden_tol);
    auto qf = cast<float>(q), kf = cast<float>(k), vf = cast<float>(v);
    tensor<float, 4> oc(expect.shape()), orec(expect.shape());
    m.forward_chunked(qf, kf, vf, oc);
    m.forward_recurrent(qf, kf, vf, orec);
    const auto c1 = compare(expect, oc);
    const auto c2 = compare(expect, orec);
    std::printf("golden softmax_swa32 case %d: chunked rel_rms %.3g, recurrent (ring) %.3g\n", c,
                c1.rel_rms, c2.rel_rms);
    SEQMIX_CHECK_CLOSE(expect, oc, golden_tol);
    SEQMIX_CHECK_CLOSE(expect, orec, golden_tol);
  }
}

TEST_CASE("sliding_window_attention: ring buffer memory is constant in T", "[swa][cache]") {
  auto rng = make_rng(21);
  const index_t W = 16;
  const problem p{2, 600, 4, 2, 32, 24};
  const auto in = attn::make_inputs(p, rng);
  auto q = cast<float>(in.q), k = cast<float>(in.k), v = cast<float>(in.v);
  sliding_window_attention<float> m({.window = W});
  auto cache = m.make_cache(p.B, p.Hkv, p.K, p.V);
  const std::size_t bytes = cache.storage_bytes();
  CHECK(bytes == static_cast<std::size_t>(p.B * p.Hkv * W * (p.K + p.V)) * sizeof(float));
  tensor<float, 4> o({p.B, p.T, p.H, p.V});
  scoped_num_threads one(1);
  // The OpenMP runtime allocates once, on its first call (libomp loads its OMPT tool then):
  // start it before counting, so the count is what steps allocate.
  (void)seqmix::num_threads();
  std::size_t allocs = 0, peak = 0;
  for (index_t t = 0; t < p.T; ++t) {
    allocation_scope scope;
    m.step(q.view().template select<1>(t), k.view().template select<1>(t),
           v.view().template select<1>(t), o.view().template select<1>(t), cache);
    allocs += scope.stats().count;
    peak = std::max(peak, scope.stats().peak_bytes);
    CHECK(cache.storage_bytes() == bytes);
  }
  CHECK(allocs == 0);
  CHECK(peak == 0);
  CHECK(cache.length(0) == p.T);
  CHECK(cache.held(0) == W);
  // 600 tokens through a 16-row ring still give exact sliding-window attention
  SEQMIX_CHECK_CLOSE(attn::reference_out(in, {}, W), o, float_tol);
}

TEST_CASE("sliding_window_attention: prefill (wrapping the ring) then steps == one call",
          "[swa][cache]") {
  auto rng = make_rng(22);
  const problem p{2, 300, 4, 4, 64, 64};
  const auto in = attn::make_inputs(p, rng);
  auto q = cast<float>(in.q), k = cast<float>(in.k), v = cast<float>(in.v);
  for (index_t W : {1, 7, 64, 100}) {
    sliding_window_attention<float> m({.window = W});
    tensor<float, 4> whole({p.B, p.T, p.H, p.V});
    m.forward_chunked(q, k, v, whole);
    SEQMIX_CHECK_CLOSE(attn::reference_out(in, {}, W), whole, float_tol);
    std::uniform_int_distribution<index_t> cut(1, p.T - 1);
    for (int trial = 0; trial < 3; ++trial) {
      index_t a = cut(rng), b = cut(rng);
      if (a > b) std::swap(a, b);
      if (a == b) ++b;  // both prefills non-empty
      INFO("W " << W << " splits " << a << " " << b);
      // ring of exactly W rows, a larger ring, and a full cache all agree
      auto ring = m.make_cache(p.B, p.Hkv, p.K, p.V);
      auto big = kv_cache<float>::ring(p.B, p.Hkv, p.K, p.V, W + 13);
      auto full = kv_cache<float>::full(p.B, p.Hkv, p.K, p.V, p.T);
      for (kv_cache<float>* c : {&ring, &big, &full}) {
        tensor<float, 4> o({p.B, p.T, p.H, p.V});
        m.forward_chunked(attn::tokens(q, 0, a), attn::tokens(k, 0, a), attn::tokens(v, 0, a),
                          attn::tokens(o, 0, a), *c);
        m.forward_chunked(attn::tokens(q, a, b - a), attn::tokens(k, a, b - a),
                          attn::tokens(v, a, b - a), attn::tokens(o, a, b - a), *c);
        for (index_t t = b; t < p.T; ++t) {
          m.step(q.view().template select<1>(t), k.view().template select<1>(t),
                 v.view().template select<1>(t), o.view().template select<1>(t), *c);
        }
        SEQMIX_CHECK_CLOSE(whole, o, split_tol);
      }
    }
  }
}

TEST_CASE("sliding_window_attention: ring snapshot/restore and truncate", "[swa][cache]") {
  auto rng = make_rng(23);
  const problem p{1, 90, 2, 1, 16, 16};
  const auto in = attn::make_inputs(p, rng);
  auto q = cast<float>(in.q), k = cast<float>(in.k), v = cast<float>(in.v);
  sliding_window_attention<float> m({.window = 10});
  auto cache = m.make_cache(1, 1, 16, 16);
  tensor<float, 4> o({p.B, p.T, p.H, p.V});
  m.forward_chunked(attn::tokens(q, 0, 50), attn::tokens(k, 0, 50), attn::tokens(v, 0, 50),
                    attn::tokens(o, 0, 50), cache);
  const auto snap = cache.snapshot();
  auto run = [&] {
    m.forward_chunked(attn::tokens(q, 50, 40), attn::tokens(k, 50, 40), attn::tokens(v, 50, 40),
                      attn::tokens(o, 50, 40), cache);
  };
  run();
  const tensor<float, 4> first(o);
  cache.restore(snap);
  CHECK(cache.length(0) == 50);
  o.fill(0);
  run();
  CHECK(bitwise_equal(tensor<float, 4>::copy_of(attn::tokens(first, 50, 40)),
                      tensor<float, 4>::copy_of(attn::tokens(o, 50, 40))));
  CHECK_THROWS_AS(cache.truncate(0, 60), shape_error);  // older rows are overwritten
  cache.truncate(0, 0);
  CHECK(cache.length(0) == 0);
}

TEST_CASE("sliding_window_attention: GQA, sinks, varlen, threads", "[swa]") {
  auto rng = make_rng(24);
  const std::vector<index_t> cu{0, 40, 41, 200};
  const problem p{1, cu.back(), 6, 3, 32, 32};
  const auto in = attn::make_inputs(p, rng);
  const std::vector<double> sink{0.0, 1.0, -1.0, 3.0, -5.0, 0.5};
  sliding_window_attention<float> m(
      {.window = 24, .sink = std::vector<float>(sink.begin(), sink.end())});
  auto q = cast<float>(in.q), k = cast<float>(in.k), v = cast<float>(in.v);
  tensor<float, 4> o1({p.B, p.T, p.H, p.V}), o2({p.B, p.T, p.H, p.V}), sep({p.B, p.T, p.H, p.V});
  {
    scoped_num_threads t(1);
    m.forward_chunked(q, k, v, o1, cu);
  }
  {
    scoped_num_threads t(2);
    require_team(2);
    m.forward_chunked(q, k, v, o2, cu);
  }
  CHECK(bitwise_equal(o1, o2));
  for (std::size_t n = 0; n + 1 < cu.size(); ++n) {
    const index_t t0 = cu[n], len = cu[n + 1] - cu[n];
    m.forward_recurrent(attn::tokens(q, t0, len), attn::tokens(k, t0, len),
                        attn::tokens(v, t0, len), attn::tokens(sep, t0, len));
    // reference per sequence
    attn::inputs part{tensor<double, 4>::copy_of(attn::tokens(in.q, t0, len)),
                      tensor<double, 4>::copy_of(attn::tokens(in.k, t0, len)),
                      tensor<double, 4>::copy_of(attn::tokens(in.v, t0, len))};
    const auto ref = attn::reference_out(part, {}, 24, sink);
    const auto got = tensor<float, 4>::copy_of(attn::tokens(o1, t0, len));
    SEQMIX_CHECK_CLOSE(ref, got, float_tol);
  }
  SEQMIX_CHECK_CLOSE(sep, o1, split_tol);
}

TEST_CASE("sliding_window_attention: bad input raises shape_error", "[swa][errors]") {
  using opts = sliding_window_attention<float>::options;
  CHECK_THROWS_AS(sliding_window_attention<float>(opts{}), shape_error);  // window required
  CHECK_THROWS_WITH(sliding_window_attention<float>(opts{.window = 0}), Catch::Contains("window"));
  sliding_window_attention<float> m({.window = 4});
  tensor<float, 4> q({1, 8, 3, 16}), k({1, 8, 2, 16}), v({1, 8, 2, 16}), o({1, 8, 3, 16});
  CHECK_THROWS_WITH(m.forward_chunked(q, k, v, o), Catch::Contains("multiple"));
  tensor<float, 3> q1({1, 2, 16}), k1({1, 2, 16}), v1({1, 2, 16}), o1({1, 2, 16});
  auto wrong = kv_cache<float>::ring(1, 2, 16, 8, 4);  // value dim 8 != 16
  CHECK_THROWS_WITH(m.step(q1, k1, v1, o1, wrong), Catch::Contains("cache"));
  auto small = kv_cache<float>::ring(1, 2, 16, 16, 3);  // ring smaller than the window
  CHECK_THROWS_AS(m.step(q1, k1, v1, o1, small), shape_error);
}
