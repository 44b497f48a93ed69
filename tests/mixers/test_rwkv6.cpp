// SPDX-License-Identifier: MIT
// rwkv6: r, k, w [B,T,H,K], v [B,T,H,V], bonus u [H,K]; the read comes before the write.
// Golden against fla's naive_recurrent_rwkv6, then the equivalence list of the gated family
// (tests/mixers/gated_common.hpp): reference (double) vs recurrent vs chunked, odd sizes, gate
// strengths and kills, split points, step, varlen, threads, allocations, bad inputs.
#include <atomic>

#include <seqmix/mixers/rwkv6.hpp>
#include <seqmix/reference/gated_accumulation.hpp>

#include "alloc_counter.hpp"
#include "gated_common.hpp"

using namespace gated_test;
using seqmix::rwkv6;

namespace {

/// Bundle roles: q = r, gk = w, p1 = u flattened [H·K].
struct rwkv6_a {
  static seqmix::shape_t<4> state_shape(const auto& b, index_t N) {
    return {N, b.v.extent(2), b.q.extent(3), b.v.extent(3)};
  }
  static seqmix::shape_t<4> out_shape(const auto& b) { return b.v.shape(); }
  template <class T>
  static tensor_view<const T, 2> u_of(const bundle<T>& b) {
    const index_t H = b.q.extent(2), K = b.q.extent(3);
    return tensor_view<const T, 2>(b.p1.data(), {H, K}, {K, 1});
  }
  static bundle<double> make(std::mt19937_64& rng, index_t B, index_t T, index_t H, index_t K,
                             index_t V, double strength) {
    bundle<double> b;
    b.q = seqmix::testing::random_normal<double, 4>({B, T, H, K}, rng);
    b.k = seqmix::testing::random_normal<double, 4>({B, T, H, K}, rng);
    b.v = seqmix::testing::random_normal<double, 4>({B, T, H, V}, rng);
    b.gk = random_gate<double, 4>({B, T, H, K}, rng, strength);
    b.p1 = seqmix::testing::random_normal<double, 1>({H * K}, rng);
    return b;
  }
  template <class T>
  static void run(int f, const bundle<T>& b, index_t chunk, tensor<T, 4>& o, tensor<T, 4>& s,
                  std::span<const index_t> cu) {
    rwkv6<T> m({.scale = T(0.5), .chunk_size = chunk});
    if (f == 0) m.forward_chunked(b.q, b.k, b.v, b.gk, u_of(b), o, s, cu);
    if (f == 1) m.forward_recurrent(b.q, b.k, b.v, b.gk, u_of(b), o, s, cu);
    if (f == 2) m.forward(b.q, b.k, b.v, b.gk, u_of(b), o, s, cu);
  }
  template <class T>
  static void step(const bundle<T>& b, index_t t, tensor<T, 4>& o, tensor<T, 4>& s) {
    rwkv6<T> m({.scale = T(0.5)});
    m.step(b.q.template select<1>(t), b.k.template select<1>(t), b.v.template select<1>(t),
           b.gk.template select<1>(t), u_of(b), o.template select<1>(t), s);
  }
  static void reference(const bundle<double>& b, tensor<double, 4>& o, tensor<double, 4>& s) {
    seqmix::reference::rwkv6<double>(b.q, b.k, b.v, b.gk, u_of(b), 0.5, o, s);
  }
};

}  // namespace

TEST_CASE("rwkv6: golden (fla naive), every case, with and without h0", "[rwkv6][golden]") {
  const auto& in = seqmix::testing::golden::file("inputs");
  const auto& gf = seqmix::testing::golden::file("fla_vector_decay");
  for (int c = 0; c < seqmix::testing::golden::case_count; ++c) {
    for (bool h0 : {false, true}) {
      const std::string pre = "case" + std::to_string(c) + ".";
      const std::string key = "rwkv6.case" + std::to_string(c) + (h0 ? ".h0." : ".noh0.");
      INFO(key);
      auto r = in.get<float, 4>(pre + "q"), k = in.get<float, 4>(pre + "k"),
           v = in.get<float, 4>(pre + "v"), w = in.get<float, 4>(pre + "gk");
      auto u = gf.get<float, 2>("rwkv6.case" + std::to_string(c) + ".u");
      auto o_ref = gf.get<float, 4>(key + "o_naive");
      auto s_ref = gf.get<float, 4>(key + "ht_naive");
      for (int f = 0; f < 5; ++f) {
        INFO("form " << f << " (0 chunked, 1 recurrent, 2 forward, 3 step, 4 double reference)");
        tensor<float, 4> o(v.shape());
        auto s = h0 ? in.get<float, 4>(pre + "h0")
                    : rwkv6<float>::make_state(r.extent(0), r.extent(2), r.extent(3), v.extent(3));
        rwkv6<float> m;  // scale 1, as the golden data
        if (f == 0) m.forward_chunked(r, k, v, w, u, o, s);
        if (f == 1) m.forward_recurrent(r, k, v, w, u, o, s);
        if (f == 2) m.forward(r, k, v, w, u, o, s);
        if (f == 3) {
          for (index_t t = 0; t < r.extent(1); ++t) {
            m.step(r.select<1>(t), k.select<1>(t), v.select<1>(t), w.select<1>(t), u,
                   o.select<1>(t), s);
          }
        }
        if (f == 4) {
          tensor<double, 4> od(v.shape());
          auto sd = seqmix::testing::cast<double>(s);
          seqmix::reference::rwkv6<double>(
              seqmix::testing::cast<double>(r), seqmix::testing::cast<double>(k),
              seqmix::testing::cast<double>(v), seqmix::testing::cast<double>(w),
              seqmix::testing::cast<double>(u), 1.0, od, sd);
          o = seqmix::testing::cast<float>(od);
          s = seqmix::testing::cast<float>(sd);
        }
        SEQMIX_CHECK_CLOSE(o_ref, o, tol_golden);
        SEQMIX_CHECK_CLOSE(s_ref, s, tol_golden);
      }
    }
  }
}

TEST_CASE("rwkv6: reference vs recurrent vs chunked over odd sizes", "[rwkv6]") {
  auto rng = seqmix::testing::make_rng(61);
  for (const auto& c : sweep_cases()) {
    const auto in = rwkv6_a::make(rng, 2, c.T, 2, c.K, c.V, 1.0);
    check_forms<rwkv6_a>(
        in, c.chunk,
        "T " + std::to_string(c.T) + " K " + std::to_string(c.K) + " V " + std::to_string(c.V));
  }
}

TEST_CASE("rwkv6: gate-strength sweep, -1e4 and -inf gates stay finite and exact", "[rwkv6]") {
  auto rng = seqmix::testing::make_rng(63);
  for (double strength : {0.0, 1e-3, 0.1, 1.0, 10.0, 100.0, 1e4}) {
    check_forms<rwkv6_a>(rwkv6_a::make(rng, 1, 300, 2, 32, 32, strength), 64,
                         "strength " + std::to_string(strength));
  }
  auto in = rwkv6_a::make(rng, 1, 300, 2, 32, 32, 1.0);
  sprinkle_kills(in.gk, rng, 0.02);
  check_forms<rwkv6_a>(in, 64, "-inf sprinkled per channel");
  // one channel killed every token, others weak; a -1e4 token now and then, at the first row of a
  // sub-chunk too (the exclusive readout's reference row is the row before it)
  for (index_t t = 0; t < 300; ++t) {
    in.gk(0, t, 0, 3) = -std::numeric_limits<double>::infinity();
    if (t % 37 == 5 || t % 64 == 16) {
      for (index_t c = 0; c < 32; ++c) in.gk(0, t, 1, c) = -1e4;
    }
  }
  check_forms<rwkv6_a>(in, 64, "mixed -inf channel and -1e4 tokens");
  in.gk.fill(-1e4);
  check_forms<rwkv6_a>(in, 64, "all -1e4");
  in.gk.fill(-std::numeric_limits<double>::infinity());
  check_forms<rwkv6_a>(in, 32, "all -inf: only the bonus term is left");
}

TEST_CASE("rwkv6: factored chunk path keeps float precision up to its bound", "[rwkv6]") {
  // Per-token gates of -g in every channel. The exclusive readout factors a 16-row sub-chunk
  // through the row before it, so the k side spans 16·g: g <= 1.8 stays within factor_bound
  // (30 in float: the factored path), g = 1.9 and 2.5 push some or all sub-chunks over (the
  // exact path). Both must stay at float precision right up to the bound.
  auto rng = seqmix::testing::make_rng(64);
  for (double g : {0.05, 1.0, 1.8, 1.85, 1.9, 2.5}) {
    auto in = rwkv6_a::make(rng, 1, 200, 2, 48, 32, 0.0);
    auto jitter = seqmix::testing::random_normal<double, 4>(in.gk.shape(), rng);
    for (index_t i = 0; i < in.gk.size(); ++i) in.gk[i] = -g * (1.0 + 0.05 * std::tanh(jitter[i]));
    const auto s0 = seqmix::testing::random_normal<double, 4>({1, 2, 48, 32}, rng);
    tensor<double, 4> o_ref(in.v.shape());
    auto s_ref = s0;
    rwkv6_a::reference(in, o_ref, s_ref);
    const auto inf = cast_bundle<float>(in);
    tensor<float, 4> o(in.v.shape());
    auto s = seqmix::testing::cast<float>(s0);
    rwkv6_a::run<float>(0, inf, 64, o, s, {});
    INFO("per-token gate " << -g);
    SEQMIX_CHECK_CLOSE(o_ref, o, 4e-7);
    SEQMIX_CHECK_CLOSE(s_ref, s, 4e-7);
  }
}

TEST_CASE("rwkv6: state carried over random split points equals one call", "[rwkv6]") {
  auto rng = seqmix::testing::make_rng(65);
  check_split<rwkv6_a>(rwkv6_a::make(rng, 2, 200, 2, 32, 40, 1.0), 32);
}

TEST_CASE("rwkv6: step T times equals forward_recurrent", "[rwkv6]") {
  auto rng = seqmix::testing::make_rng(66);
  check_step<rwkv6_a>(rwkv6_a::make(rng, 2, 40, 3, 64, 65, 1.0));
  check_step<rwkv6_a>(rwkv6_a::make(rng, 1, 20, 2, 7, 1, 1.0));
}

TEST_CASE("rwkv6: varlen equals separate calls", "[rwkv6]") {
  auto rng = seqmix::testing::make_rng(67);
  check_varlen<rwkv6_a>(rwkv6_a::make(rng, 1, 300, 2, 32, 32, 1.0), {0, 0, 7, 100, 164, 300}, 64);
}

TEST_CASE("rwkv6: 1 vs 2, 3, 7 threads bitwise identical", "[rwkv6]") {
  auto rng = seqmix::testing::make_rng(68);
  check_threads<rwkv6_a>(rwkv6_a::make(rng, 2, 300, 3, 64, 64, 1.0), 64);
  // one (sequence, head): the chunks themselves are spread over the threads
  check_threads<rwkv6_a>(rwkv6_a::make(rng, 1, 700, 1, 64, 64, 1.0), 64);
  check_threads<rwkv6_a>(rwkv6_a::make(rng, 1, 333, 1, 24, 40, 10.0), 32);
  seqmix::scoped_num_threads seven(7);
  check_forms<rwkv6_a>(rwkv6_a::make(rng, 1, 300, 1, 32, 32, 1.0), 64, "7 threads, one item");
  check_varlen<rwkv6_a>(rwkv6_a::make(rng, 1, 300, 1, 32, 32, 1.0), {0, 0, 7, 100, 164, 300}, 32);
}

TEST_CASE("rwkv6: recurrent and step allocate nothing", "[rwkv6][alloc]") {
  auto rng = seqmix::testing::make_rng(69);
  const auto in = cast_bundle<float>(rwkv6_a::make(rng, 1, 300, 2, 32, 32, 1.0));
  const rwkv6<float> m;
  auto s = rwkv6<float>::make_state(1, 2, 32, 32);
  tensor<float, 4> o(in.v.shape());
  const auto u = rwkv6_a::u_of(in);
  m.forward_recurrent(in.q, in.k, in.v, in.gk, u, o, s);  // warm-up (OpenMP thread pool)
  {
    seqmix::testing::allocation_scope scope;
    m.forward_recurrent(in.q, in.k, in.v, in.gk, u, o, s);
    CHECK(scope.stats().count == 0);
  }
  {
    tensor_view<const float, 4> r = in.q, k = in.k, v = in.v, w = in.gk;
    auto o1 = tensor_view<float, 4>(o).template select<1>(0);
    seqmix::testing::allocation_scope scope;
    for (index_t t = 0; t < 50; ++t) {
      m.step(r.select<1>(t), k.select<1>(t), v.select<1>(t), w.select<1>(t), u, o1, s);
    }
    CHECK(scope.stats().count == 0);
  }
}

TEST_CASE("rwkv6: bad inputs raise shape_error naming the argument", "[rwkv6]") {
  using seqmix::shape_error;
  rwkv6<float> m;
  tensor<float, 4> r({1, 8, 2, 4}), v({1, 8, 2, 5}), o({1, 8, 2, 5}), w({1, 8, 2, 4});
  tensor<float, 2> u({2, 4});
  auto s = m.make_state(1, 2, 4, 5);
  CHECK_NOTHROW(m.forward_chunked(r, r, v, w, u, o, s));
  CHECK_NOTHROW(m.forward_recurrent(r, r, v, w, u, o, s));
  tensor<float, 4> wbad({1, 8, 2, 5});
  CHECK_THROWS_AS(m.forward_chunked(r, r, v, wbad, u, o, s), shape_error);
  tensor<float, 2> ubad({2, 5});
  CHECK_THROWS_WITH(m.forward(r, r, v, w, ubad, o, s), Catch::Contains("u"));
  auto unan = u;
  unan[3] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_AS(m.forward_recurrent(r, r, v, w, unan, o, s), shape_error);
  auto wpos = w;
  wpos[5] = 0.5f;  // a decay passed instead of its log
  CHECK_THROWS_WITH(m.forward_chunked(r, r, v, wpos, u, o, s), Catch::Contains("w"));
  auto wnan = w;
  wnan[5] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_AS(m.forward_chunked(r, r, v, wnan, u, o, s), shape_error);
  auto wninf = w;
  wninf[2] = -std::numeric_limits<float>::infinity();
  CHECK_NOTHROW(m.forward_chunked(r, r, v, wninf, u, o, s));
  tensor<float, 4> sbad({1, 2, 4, 4});
  CHECK_THROWS_AS(m.forward_chunked(r, r, v, w, u, o, sbad), shape_error);
  tensor<float, 4> kbad({1, 8, 2, 3});
  CHECK_THROWS_WITH(m.forward_recurrent(r, kbad, v, w, u, o, s), Catch::Contains("k"));
  // o aliasing an input
  CHECK_THROWS_AS(m.forward_recurrent(r, r, v, w, u, tensor_view<float, 4>(v), s), shape_error);
  const std::vector<index_t> cu_bad{0, 3, 9};
  CHECK_THROWS_AS(m.forward_chunked(r, r, v, w, u, o, s, cu_bad), shape_error);
  tensor<float, 3> r1({1, 2, 4}), v1({1, 2, 5}), o1({1, 2, 5});
  CHECK_NOTHROW(m.step(r1, r1, v1, r1, u, o1, s));
  CHECK_THROWS_WITH(m.step(r1, r1, v1, v1, u, o1, s), Catch::Contains("w1"));
  CHECK_THROWS_AS(rwkv6<float>({.scale = {}, .chunk_size = 0}), shape_error);
  CHECK_THROWS_AS(rwkv6<float>::make_state(1, 0, 4, 5), shape_error);
}

// The shared chunk scheduler (kernels/common/chunk_schedule.hpp) that rwkv6's chunked form runs
// on: chunk boundaries in both orders, and every chunk visited once per step, each item's scan in
// its order, under 1 and 3 threads.
TEST_CASE("chunk_schedule: boundaries, order and coverage, forward and reverse",
          "[rwkv6][schedule]") {
  namespace cs = seqmix::kernels::common;
  const cs::token_range sg{10, 140};  // 130 tokens: chunks of 64, 64, 2
  CHECK(cs::chunk_count(sg.size(), 64) == 3);
  CHECK(cs::nth_chunk(sg, 64, cs::chunk_order::forward, 0).t0 == 10);
  CHECK(cs::nth_chunk(sg, 64, cs::chunk_order::forward, 2).t0 == 138);
  CHECK(cs::nth_chunk(sg, 64, cs::chunk_order::forward, 2).t1 == 140);
  CHECK(cs::nth_chunk(sg, 64, cs::chunk_order::reverse, 0).t0 == 138);
  CHECK(cs::nth_chunk(sg, 64, cs::chunk_order::reverse, 2).t0 == 10);
  CHECK(cs::nth_chunk(sg, 64, cs::chunk_order::reverse, 2).t1 == 74);
  CHECK(cs::nth_chunk(sg, 64, cs::chunk_order::forward, 3).size() == 0);
  CHECK(cs::chunk_count(0, 64) == 0);
  // items of 0, 5, 130 and 64 tokens
  const std::vector<cs::token_range> segs{{0, 0}, {0, 5}, {7, 137}, {0, 64}};
  auto seg = [&](index_t i) { return segs[static_cast<std::size_t>(i)]; };
  const index_t items = 4, C = 16;
  for (auto dir : {cs::chunk_order::forward, cs::chunk_order::reverse}) {
    // interleaved: rank by rank
    std::vector<std::pair<index_t, index_t>> seen;
    cs::for_chunks_interleaved(0, items, C, dir, seg, [&](index_t i, const cs::token_range& c) {
      seen.emplace_back(i, c.t0);
    });
    std::size_t expect = 0;
    for (const auto& s : segs) expect += static_cast<std::size_t>(cs::chunk_count(s.size(), C));
    CHECK(seen.size() == expect);
    CHECK(seen[0].first == 1);  // item 0 is empty; rank 0 of item 1 comes first
    for (int threads : {1, 3}) {
      INFO(threads << " threads, " << (dir == cs::chunk_order::forward ? "forward" : "reverse"));
      seqmix::scoped_num_threads nt(threads);
      const index_t wc = cs::window_chunks(items, threads);
      std::vector<int> local(1000, 0), inter(1000, 0);
      std::atomic<bool> bad_job{false};
      std::vector<std::vector<index_t>> scans(items);
      cs::run_windows(
          items, C, dir, wc, seg,
          [&](index_t job, index_t i, const cs::token_range& c, int) {
            if (job / wc != i) bad_job = true;  // no Catch macros on worker threads
            local[static_cast<std::size_t>(c.t0 + 200 * i)] += 1;
          },
          [&](index_t, index_t i, const cs::token_range& c) {
            scans[static_cast<std::size_t>(i)].push_back(c.t0);
          },
          [&](index_t, index_t i, const cs::token_range& c, int) {
            inter[static_cast<std::size_t>(c.t0 + 200 * i)] += 1;
          });
      CHECK_FALSE(bad_job.load());
      for (index_t i = 0; i < items; ++i) {
        const auto& sc = scans[static_cast<std::size_t>(i)];
        REQUIRE(static_cast<index_t>(sc.size()) == cs::chunk_count(seg(i).size(), C));
        for (std::size_t n = 0; n < sc.size(); ++n) {
          const auto c = cs::nth_chunk(seg(i), C, dir, static_cast<index_t>(n));
          CHECK(sc[n] == c.t0);
          CHECK(local[static_cast<std::size_t>(c.t0 + 200 * i)] == 1);
          CHECK(inter[static_cast<std::size_t>(c.t0 + 200 * i)] == 1);
        }
      }
    }
  }
}
