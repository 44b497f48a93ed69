// SPDX-License-Identifier: MIT
// gla: per-key gate gk [B,T,H,K], optional per-value gate gv [B,T,H,V].
#include <seqmix/mixers/gla.hpp>
#include <seqmix/reference/gated_accumulation.hpp>

#include "gated_common.hpp"

using namespace gated_test;
using seqmix::gla;

namespace {

/// Per-key gate gk; per-value gate gv when the bundle has one.
struct gla_a {
  static seqmix::shape_t<4> state_shape(const auto& b, index_t N) {
    return {N, b.v.extent(2), b.q.extent(3), b.v.extent(3)};
  }
  static seqmix::shape_t<4> out_shape(const auto& b) { return b.v.shape(); }
  static bundle<double> make(std::mt19937_64& rng, index_t B, index_t T, index_t H, index_t K,
                             index_t V, double strength, bool with_gv = false) {
    bundle<double> b;
    b.q = seqmix::testing::random_normal<double, 4>({B, T, H, K}, rng);
    b.k = seqmix::testing::random_normal<double, 4>({B, T, H, K}, rng);
    b.v = seqmix::testing::random_normal<double, 4>({B, T, H, V}, rng);
    b.gk = random_gate<double, 4>({B, T, H, K}, rng, strength);
    if (with_gv) b.gv = random_gate<double, 4>({B, T, H, V}, rng, strength);
    return b;
  }
  template <class T>
  static void run(int f, const bundle<T>& b, index_t chunk, tensor<T, 4>& o, tensor<T, 4>& s,
                  std::span<const index_t> cu) {
    gla<T> m({.scale = {}, .chunk_size = chunk});
    if (b.gv.size() == 0) {
      if (f == 0) m.forward_chunked(b.q, b.k, b.v, b.gk, o, s, cu);
      if (f == 1) m.forward_recurrent(b.q, b.k, b.v, b.gk, o, s, cu);
      if (f == 2) m.forward(b.q, b.k, b.v, b.gk, o, s, cu);
    } else {
      if (f == 0) m.forward_chunked(b.q, b.k, b.v, b.gk, b.gv, o, s, cu);
      if (f == 1) m.forward_recurrent(b.q, b.k, b.v, b.gk, b.gv, o, s, cu);
      if (f == 2) m.forward(b.q, b.k, b.v, b.gk, b.gv, o, s, cu);
    }
  }
  template <class T>
  static void step(const bundle<T>& b, index_t t, tensor<T, 4>& o, tensor<T, 4>& s) {
    gla<T> m;
    if (b.gv.size() == 0) {
      m.step(b.q.template select<1>(t), b.k.template select<1>(t), b.v.template select<1>(t),
             b.gk.template select<1>(t), o.template select<1>(t), s);
    } else {
      m.step(b.q.template select<1>(t), b.k.template select<1>(t), b.v.template select<1>(t),
             b.gk.template select<1>(t), b.gv.template select<1>(t), o.template select<1>(t), s);
    }
  }
  static void reference(const bundle<double>& b, tensor<double, 4>& o, tensor<double, 4>& s) {
    seqmix::reference::gla<double>(
        b.q, b.k, b.v, b.gk,
        b.gv.size() ? tensor_view<const double, 4>(b.gv) : tensor_view<const double, 4>(),
        1.0 / std::sqrt(double(b.q.extent(3))), o, s);
  }
};

}  // namespace

TEST_CASE("gla: golden (fla naive), every case, with and without h0", "[gla][golden]") {
  const auto& in = seqmix::testing::golden::file("inputs");
  const auto& gf = seqmix::testing::golden::file("fla_vector_decay");
  for (int c = 0; c < seqmix::testing::golden::case_count; ++c) {
    for (bool h0 : {false, true}) {
      const std::string pre = "case" + std::to_string(c) + ".";
      const std::string key = "gla.case" + std::to_string(c) + (h0 ? ".h0." : ".noh0.");
      INFO(key);
      auto q = in.get<float, 4>(pre + "q"), k = in.get<float, 4>(pre + "k"),
           v = in.get<float, 4>(pre + "v"), gk = in.get<float, 4>(pre + "gk");
      auto o_ref = gf.get<float, 4>(key + "o_naive");
      auto s_ref = gf.get<float, 4>(key + "ht_naive");
      for (int f = 0; f < 3; ++f) {
        INFO("form " << f << " (0 chunked, 1 recurrent, 2 double reference)");
        tensor<float, 4> o(v.shape());
        auto s = h0 ? in.get<float, 4>(pre + "h0")
                    : gla<float>::make_state(q.extent(0), q.extent(2), q.extent(3), v.extent(3));
        gla<float> m;
        if (f == 0) m.forward_chunked(q, k, v, gk, o, s);
        if (f == 1) m.forward_recurrent(q, k, v, gk, o, s);
        if (f == 2) {
          tensor<double, 4> od(v.shape());
          auto sd = seqmix::testing::cast<double>(s);
          seqmix::reference::gla<double>(
              seqmix::testing::cast<double>(q), seqmix::testing::cast<double>(k),
              seqmix::testing::cast<double>(v), seqmix::testing::cast<double>(gk), {},
              1.0 / std::sqrt(double(q.extent(3))), od, sd);
          o = seqmix::testing::cast<float>(od);
          s = seqmix::testing::cast<float>(sd);
        }
        SEQMIX_CHECK_CLOSE(o_ref, o, tol_golden);
        SEQMIX_CHECK_CLOSE(s_ref, s, tol_golden);
      }
    }
  }
}

TEST_CASE("gla: reference vs recurrent vs chunked over odd sizes", "[gla]") {
  auto rng = seqmix::testing::make_rng(21);
  for (const auto& c : sweep_cases()) {
    const auto in = gla_a::make(rng, 2, c.T, 2, c.K, c.V, 1.0);
    check_forms<gla_a>(
        in, c.chunk,
        "T " + std::to_string(c.T) + " K " + std::to_string(c.K) + " V " + std::to_string(c.V));
  }
}

TEST_CASE("gla: per-value gate gv, all forms vs reference", "[gla]") {
  auto rng = seqmix::testing::make_rng(22);
  for (index_t T : {1, 17, 64, 130}) {
    check_forms<gla_a>(gla_a::make(rng, 2, T, 2, 24, 40, 1.0, true), 32,
                       "gv T " + std::to_string(T));
  }
  auto in = gla_a::make(rng, 1, 100, 2, 16, 20, 1.0, true);
  sprinkle_kills(in.gv, rng, 0.05);
  check_forms<gla_a>(in, 64, "gv with -inf");
  check_step<gla_a>(gla_a::make(rng, 2, 10, 2, 16, 40, 1.0, true));
}

TEST_CASE("gla: gate-strength sweep, -1e4 and -inf gates stay finite and exact", "[gla]") {
  auto rng = seqmix::testing::make_rng(23);
  for (double strength : {0.0, 1e-3, 0.1, 1.0, 10.0, 100.0, 1e4}) {
    check_forms<gla_a>(gla_a::make(rng, 1, 300, 2, 32, 32, strength), 64,
                       "strength " + std::to_string(strength));
  }
  auto in = gla_a::make(rng, 1, 300, 2, 32, 32, 1.0);
  sprinkle_kills(in.gk, rng, 0.02);
  check_forms<gla_a>(in, 64, "-inf sprinkled per channel");
  // mixed: one channel killed every token, others weak; and a -1e4 token then weak gates
  for (index_t t = 0; t < 300; ++t) {
    in.gk(0, t, 0, 3) = -std::numeric_limits<double>::infinity();
    if (t % 37 == 5) {
      for (index_t c = 0; c < 32; ++c) in.gk(0, t, 1, c) = -1e4;
    }
  }
  check_forms<gla_a>(in, 64, "mixed -inf channel and -1e4 tokens");
  in.gk.fill(-1e4);
  check_forms<gla_a>(in, 64, "all -1e4");
}

TEST_CASE("gla: factored chunk path keeps float precision up to its bound", "[gla]") {
  // Per-token gates of -g in every channel: a 16-row sub-chunk spans 15·g. g <= 2 keeps every
  // sub-chunk within factor_bound (30 in float: the factored path); g = 2.1 and 2.5 push some
  // or all over (the exact path), mixed chunk by chunk with the random part. Both paths must
  // stay at float precision (rel-RMS 4e-7, 25 times below the golden gate) right up to it.
  auto rng = seqmix::testing::make_rng(31);
  for (double g : {0.05, 1.0, 1.9, 2.0, 2.1, 2.5}) {
    auto in = gla_a::make(rng, 1, 200, 2, 48, 32, 0.0);
    auto jitter = seqmix::testing::random_normal<double, 4>(in.gk.shape(), rng);
    for (index_t i = 0; i < in.gk.size(); ++i) in.gk[i] = -g * (1.0 + 0.05 * std::tanh(jitter[i]));
    const auto s0 = seqmix::testing::random_normal<double, 4>({1, 2, 48, 32}, rng);
    tensor<double, 4> o_ref(in.v.shape());
    auto s_ref = s0;
    gla_a::reference(in, o_ref, s_ref);
    const auto inf = cast_bundle<float>(in);
    tensor<float, 4> o(in.v.shape());
    auto s = seqmix::testing::cast<float>(s0);
    gla_a::run<float>(0, inf, 64, o, s, {});
    INFO("per-token gate " << -g);
    SEQMIX_CHECK_CLOSE(o_ref, o, 4e-7);
    SEQMIX_CHECK_CLOSE(s_ref, s, 4e-7);
  }
}

TEST_CASE("gla: state carried over random split points equals one call", "[gla]") {
  auto rng = seqmix::testing::make_rng(24);
  check_split<gla_a>(gla_a::make(rng, 2, 200, 2, 32, 40, 1.0), 32);
}

TEST_CASE("gla: step T times equals forward_recurrent", "[gla]") {
  auto rng = seqmix::testing::make_rng(25);
  check_step<gla_a>(gla_a::make(rng, 2, 40, 3, 64, 65, 1.0));
}

TEST_CASE("gla: varlen equals separate calls", "[gla]") {
  auto rng = seqmix::testing::make_rng(26);
  check_varlen<gla_a>(gla_a::make(rng, 1, 300, 2, 32, 32, 1.0), {0, 0, 7, 100, 164, 300}, 64);
}

TEST_CASE("gla: 1 vs 2 threads bitwise identical", "[gla]") {
  auto rng = seqmix::testing::make_rng(27);
  check_threads<gla_a>(gla_a::make(rng, 2, 300, 3, 64, 64, 1.0), 64);
  // one (sequence, head): the chunks themselves are spread over the threads
  check_threads<gla_a>(gla_a::make(rng, 1, 700, 1, 64, 64, 1.0), 64);
  check_threads<gla_a>(gla_a::make(rng, 1, 333, 1, 24, 40, 1.0, true), 32);
  check_threads<gla_a>(gla_a::make(rng, 1, 333, 1, 24, 40, 10.0), 32);
  // chunks spread over threads, against the reference and with packed sequences
  seqmix::scoped_num_threads seven(7);
  check_forms<gla_a>(gla_a::make(rng, 1, 300, 1, 32, 32, 1.0), 64, "7 threads, one item");
  check_forms<gla_a>(gla_a::make(rng, 1, 300, 1, 32, 32, 1.0, true), 32, "7 threads, gv");
  check_varlen<gla_a>(gla_a::make(rng, 1, 300, 1, 32, 32, 1.0), {0, 0, 7, 100, 164, 300}, 32);
}

TEST_CASE("gla: bad inputs raise shape_error", "[gla]") {
  using seqmix::shape_error;
  gla<float> m;
  tensor<float, 4> q({1, 8, 2, 4}), v({1, 8, 2, 5}), o({1, 8, 2, 5}), gk({1, 8, 2, 4}),
      gv({1, 8, 2, 5});
  auto s = m.make_state(1, 2, 4, 5);
  CHECK_NOTHROW(m.forward_chunked(q, q, v, gk, o, s));
  CHECK_NOTHROW(m.forward_chunked(q, q, v, gk, gv, o, s));
  tensor<float, 4> gkbad({1, 8, 2, 5}), gvbad({1, 8, 2, 4});
  CHECK_THROWS_AS(m.forward_chunked(q, q, v, gkbad, o, s), shape_error);
  CHECK_THROWS_AS(m.forward_recurrent(q, q, v, gk, gvbad, o, s), shape_error);
  auto gnan = gk;
  gnan[5] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_AS(m.forward_chunked(q, q, v, gnan, o, s), shape_error);
  auto gvinf = gv;
  gvinf[2] = std::numeric_limits<float>::infinity();
  CHECK_THROWS_AS(m.forward_chunked(q, q, v, gk, gvinf, o, s), shape_error);
  auto gkninf = gk;
  gkninf[2] = -std::numeric_limits<float>::infinity();
  CHECK_NOTHROW(m.forward_chunked(q, q, v, gkninf, o, s));
  tensor<float, 4> sbad({1, 2, 4, 4});
  CHECK_THROWS_AS(m.forward_chunked(q, q, v, gk, o, sbad), shape_error);
  tensor<float, 3> q1({1, 2, 4}), v1({1, 2, 5}), o1({1, 2, 5});
  CHECK_NOTHROW(m.step(q1, q1, v1, q1, o1, s));
  CHECK_THROWS_AS(m.step(q1, q1, v1, v1, o1, s), shape_error);
}
