// SPDX-License-Identifier: MIT
// simple_gla (scalar gate g [B,T,H]), retention and Lightning (constant g_gamma [H]).
#include <seqmix/mixers/simple_gla.hpp>
#include <seqmix/reference/gated_accumulation.hpp>

#include "gated_common.hpp"

using namespace gated_test;
using seqmix::simple_gla;

namespace {

/// Data-dependent gate: g of the bundle.
struct sgla {
  static seqmix::shape_t<4> state_shape(const auto& b, index_t N) {
    return {N, b.v.extent(2), b.q.extent(3), b.v.extent(3)};
  }
  static seqmix::shape_t<4> out_shape(const auto& b) { return b.v.shape(); }
  static bundle<double> make(std::mt19937_64& rng, index_t B, index_t T, index_t H, index_t K,
                             index_t V, double strength) {
    bundle<double> b;
    b.q = seqmix::testing::random_normal<double, 4>({B, T, H, K}, rng);
    b.k = seqmix::testing::random_normal<double, 4>({B, T, H, K}, rng);
    b.v = seqmix::testing::random_normal<double, 4>({B, T, H, V}, rng);
    b.g = random_gate<double, 3>({B, T, H}, rng, strength);
    return b;
  }
  template <class T>
  static void run(int f, const bundle<T>& b, index_t chunk, tensor<T, 4>& o, tensor<T, 4>& s,
                  std::span<const index_t> cu) {
    simple_gla<T> m({.chunk_size = chunk});
    if (f == 0) m.forward_chunked(b.q, b.k, b.v, b.g, o, s, cu);
    if (f == 1) m.forward_recurrent(b.q, b.k, b.v, b.g, o, s, cu);
    if (f == 2) m.forward(b.q, b.k, b.v, b.g, o, s, cu);
  }
  template <class T>
  static void step(const bundle<T>& b, index_t t, tensor<T, 4>& o, tensor<T, 4>& s) {
    simple_gla<T> m;
    m.step(b.q.template select<1>(t), b.k.template select<1>(t), b.v.template select<1>(t),
           b.g.template select<1>(t), o.template select<1>(t), s);
  }
  static void reference(const bundle<double>& b, tensor<double, 4>& o, tensor<double, 4>& s) {
    seqmix::reference::simple_gla<double>(b.q, b.k, b.v, b.g,
                                          1.0 / std::sqrt(double(b.q.extent(3))), o, s);
  }
};

/// Constant gate g_gamma = p1 (retention's decays unless a test sets others).
struct retention {
  static seqmix::shape_t<4> state_shape(const auto& b, index_t N) {
    return sgla::state_shape(b, N);
  }
  static seqmix::shape_t<4> out_shape(const auto& b) { return b.v.shape(); }
  static bundle<double> make(std::mt19937_64& rng, index_t B, index_t T, index_t H, index_t K,
                             index_t V) {
    bundle<double> b = sgla::make(rng, B, T, H, K, V, 1.0);
    b.g = {};
    const auto gg = seqmix::retention_g_gamma<double>(H);
    b.p1 = tensor<double, 1>({H});
    for (index_t h = 0; h < H; ++h) b.p1[h] = gg[static_cast<std::size_t>(h)];
    return b;
  }
  template <class T>
  static simple_gla<T> mixer(const bundle<T>& b, index_t chunk) {
    return simple_gla<T>(
        {.chunk_size = chunk, .g_gamma = std::vector<T>(b.p1.data(), b.p1.data() + b.p1.size())});
  }
  template <class T>
  static void run(int f, const bundle<T>& b, index_t chunk, tensor<T, 4>& o, tensor<T, 4>& s,
                  std::span<const index_t> cu) {
    const auto m = mixer(b, chunk);
    if (f == 0) m.forward_chunked(b.q, b.k, b.v, o, s, cu);
    if (f == 1) m.forward_recurrent(b.q, b.k, b.v, o, s, cu);
    if (f == 2) m.forward(b.q, b.k, b.v, o, s, cu);
  }
  template <class T>
  static void step(const bundle<T>& b, index_t t, tensor<T, 4>& o, tensor<T, 4>& s) {
    mixer(b, 64).step(b.q.template select<1>(t), b.k.template select<1>(t),
                      b.v.template select<1>(t), o.template select<1>(t), s);
  }
  static void reference(const bundle<double>& b, tensor<double, 4>& o, tensor<double, 4>& s) {
    seqmix::reference::simple_gla_constant<double>(b.q, b.k, b.v, b.p1,
                                                   1.0 / std::sqrt(double(b.q.extent(3))), o, s);
  }
};

// golden: op in {simple_gla, retention, lightning_attn}
void golden_case(const std::string& op, int c, bool h0) {
  const auto& in = seqmix::testing::golden::file("inputs");
  const auto& gf = seqmix::testing::golden::file("fla_scalar_decay");
  const std::string pre = "case" + std::to_string(c) + ".";
  const std::string key = op + ".case" + std::to_string(c) + (h0 ? ".h0." : ".noh0.");
  INFO(key);
  auto q = in.get<float, 4>(pre + "q"), k = in.get<float, 4>(pre + "k"),
       v = in.get<float, 4>(pre + "v");
  auto o_ref = gf.get<float, 4>(key + "o_naive");
  auto s_ref = gf.get<float, 4>(key + "ht_naive");
  const index_t B = q.extent(0), H = q.extent(2), K = q.extent(3), V = v.extent(3);
  for (int f = 0; f < 3; ++f) {
    INFO("form " << f);
    tensor<float, 4> o(v.shape());
    auto s = h0 ? in.get<float, 4>(pre + "h0") : simple_gla<float>::make_state(B, H, K, V);
    if (op == "simple_gla") {
      auto g = in.get<float, 3>(pre + "g");
      simple_gla<float> m;
      if (f == 0) m.forward_chunked(q, k, v, g, o, s);
      if (f == 1) m.forward_recurrent(q, k, v, g, o, s);
      if (f == 2) {  // the double reference
        auto od = tensor<double, 4>(v.shape());
        auto sd = seqmix::testing::cast<double>(s);
        seqmix::reference::simple_gla<double>(
            seqmix::testing::cast<double>(q), seqmix::testing::cast<double>(k),
            seqmix::testing::cast<double>(v), seqmix::testing::cast<double>(g),
            1.0 / std::sqrt(double(K)), od, sd);
        o = seqmix::testing::cast<float>(od);
        s = seqmix::testing::cast<float>(sd);
      }
    } else {
      auto gg = gf.get_flat<float>(op + ".case" + std::to_string(c) + ".g_gamma");
      simple_gla<float> m({.g_gamma = gg});
      if (f == 0) m.forward_chunked(q, k, v, o, s);
      if (f == 1) m.forward_recurrent(q, k, v, o, s);
      if (f == 2) m.forward(q, k, v, o, s);
    }
    SEQMIX_CHECK_CLOSE(o_ref, o, tol_golden);
    SEQMIX_CHECK_CLOSE(s_ref, s, tol_golden);
  }
}

}  // namespace

TEST_CASE("simple_gla: golden (fla naive), every case, with and without h0",
          "[simple_gla][golden]") {
  for (const char* op : {"simple_gla", "retention", "lightning_attn"}) {
    for (int c = 0; c < seqmix::testing::golden::case_count; ++c) {
      golden_case(op, c, false);
      golden_case(op, c, true);
    }
  }
}

TEST_CASE("simple_gla: g_gamma helpers match the golden files and SPEC", "[simple_gla]") {
  const auto& gf = seqmix::testing::golden::file("fla_scalar_decay");
  const auto ret = gf.get_flat<float>("retention.case1.g_gamma");
  const auto r = seqmix::retention_g_gamma<float>(3);
  const auto lig = gf.get_flat<float>("lightning_attn.case1.g_gamma");
  const auto l = seqmix::lightning_g_gamma_transnormer<float>(3, 2, 4);
  for (std::size_t h = 0; h < 3; ++h) {
    CHECK(r[h] == Approx(ret[h]).epsilon(1e-6));
    CHECK(l[h] == Approx(lig[h]).epsilon(1e-6).margin(1e-7));
  }
  const auto a = seqmix::lightning_g_gamma_alibi<double>(8);
  for (std::size_t h = 0; h < 8; ++h) CHECK(a[h] == Approx(-std::exp2(-8.0 * double(h + 1) / 8)));
  CHECK_THROWS_AS(seqmix::lightning_g_gamma_alibi<float>(6), seqmix::shape_error);
}

TEST_CASE("simple_gla: reference vs recurrent vs chunked over odd sizes", "[simple_gla]") {
  auto rng = seqmix::testing::make_rng(1);
  for (const auto& c : sweep_cases()) {
    const auto in = sgla::make(rng, 2, c.T, 2, c.K, c.V, 1.0);
    check_forms<sgla>(
        in, c.chunk,
        "T " + std::to_string(c.T) + " K " + std::to_string(c.K) + " V " + std::to_string(c.V));
  }
}

TEST_CASE("simple_gla: retention and lightning (constant gates) vs reference", "[simple_gla]") {
  auto rng = seqmix::testing::make_rng(2);
  for (index_t T : {1, 65, 257}) {
    auto in = retention::make(rng, 2, T, 4, 32, 48);
    check_forms<retention>(in, 32, "retention T " + std::to_string(T));
    const auto l = seqmix::lightning_g_gamma_transnormer<double>(4, 0, 4);  // strong decays
    for (index_t h = 0; h < 4; ++h) in.p1[h] = l[static_cast<std::size_t>(h)];
    check_forms<retention>(in, 64, "lightning T " + std::to_string(T));
  }
}

TEST_CASE("simple_gla: gate-strength sweep, -1e4 and -inf gates stay finite and exact",
          "[simple_gla]") {
  auto rng = seqmix::testing::make_rng(3);
  for (double strength : {0.0, 1e-3, 0.1, 1.0, 10.0, 100.0, 1e4}) {
    auto in = sgla::make(rng, 1, 300, 2, 32, 32, strength);
    check_forms<sgla>(in, 64, "strength " + std::to_string(strength));
  }
  auto in = sgla::make(rng, 1, 300, 2, 32, 32, 1.0);
  sprinkle_kills(in.g, rng, 0.05);
  check_forms<sgla>(in, 64, "-inf sprinkled");
  in.g.fill(-1e4);
  check_forms<sgla>(in, 64, "all -1e4");
  in.g.fill(-std::numeric_limits<double>::infinity());
  check_forms<sgla>(in, 64, "all -inf");
}

TEST_CASE("simple_gla: state carried over random split points equals one call", "[simple_gla]") {
  auto rng = seqmix::testing::make_rng(4);
  check_split<sgla>(sgla::make(rng, 2, 200, 2, 32, 40, 1.0), 32);
  check_split<retention>(retention::make(rng, 1, 150, 3, 16, 16), 64);
}

TEST_CASE("simple_gla: step T times equals forward_recurrent", "[simple_gla]") {
  auto rng = seqmix::testing::make_rng(5);
  check_step<sgla>(sgla::make(rng, 2, 40, 3, 64, 65, 1.0));
  check_step<retention>(retention::make(rng, 2, 20, 2, 7, 130));
}

TEST_CASE("simple_gla: varlen equals separate calls", "[simple_gla]") {
  auto rng = seqmix::testing::make_rng(6);
  check_varlen<sgla>(sgla::make(rng, 1, 300, 2, 32, 32, 1.0), {0, 0, 7, 100, 164, 300}, 64);
  check_varlen<retention>(retention::make(rng, 1, 90, 2, 16, 24), {0, 1, 90}, 16);
}

TEST_CASE("simple_gla: 1 vs 2 threads bitwise identical", "[simple_gla]") {
  auto rng = seqmix::testing::make_rng(8);
  check_threads<sgla>(sgla::make(rng, 2, 300, 3, 64, 64, 1.0), 64);
  check_threads<sgla>(sgla::make(rng, 1, 700, 1, 64, 64, 1.0), 64);
  check_threads<sgla>(sgla::make(rng, 1, 333, 1, 24, 40, 1.0), 32);
}

TEST_CASE("simple_gla: bad inputs raise shape_error", "[simple_gla]") {
  using seqmix::shape_error;
  simple_gla<float> m;
  tensor<float, 4> q({1, 8, 2, 4}), k({1, 8, 2, 4}), v({1, 8, 2, 5}), o({1, 8, 2, 5});
  tensor<float, 3> g({1, 8, 2});
  auto s = m.make_state(1, 2, 4, 5);
  CHECK_NOTHROW(m.forward_chunked(q, k, v, g, o, s));
  tensor<float, 4> kbad({1, 8, 2, 3}), obad({1, 8, 2, 4}), sbad({1, 2, 5, 4}), empty({1, 0, 2, 4});
  tensor<float, 3> gbad({1, 7, 2});
  CHECK_THROWS_AS(m.forward_chunked(q, kbad, v, g, o, s), shape_error);
  CHECK_THROWS_AS(m.forward_chunked(q, k, v, g, obad, s), shape_error);
  CHECK_THROWS_AS(m.forward_recurrent(q, k, v, g, o, sbad), shape_error);
  CHECK_THROWS_AS(m.forward_chunked(q, k, v, gbad, o, s), shape_error);
  CHECK_THROWS_AS(m.forward_chunked(empty, empty, v, g, o, s), shape_error);
  auto gnan = g;
  gnan[3] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_AS(m.forward_chunked(q, k, v, gnan, o, s), shape_error);
  gnan[3] = std::numeric_limits<float>::infinity();
  CHECK_THROWS_AS(m.forward_recurrent(q, k, v, gnan, o, s), shape_error);
  CHECK_THROWS_AS(simple_gla<float>({.chunk_size = 0}).forward_chunked(q, k, v, g, o, s),
                  shape_error);
  // cu_seqlens: B must be 1, first 0, last T, non-decreasing, state rows N
  const std::vector<index_t> cu_ok{0, 3, 8}, cu_last{0, 3, 7}, cu_first{1, 3, 8},
      cu_dec{0, 5, 3, 8};
  auto s2 = m.make_state(2, 2, 4, 5);
  CHECK_NOTHROW(m.forward_chunked(q, k, v, g, o, s2, cu_ok));
  CHECK_THROWS_AS(m.forward_chunked(q, k, v, g, o, s, cu_ok), shape_error);
  CHECK_THROWS_AS(m.forward_chunked(q, k, v, g, o, s2, cu_last), shape_error);
  CHECK_THROWS_AS(m.forward_chunked(q, k, v, g, o, s2, cu_first), shape_error);
  CHECK_THROWS_AS(m.forward_recurrent(q, k, v, g, o, s2, cu_dec), shape_error);
  tensor<float, 4> q2({2, 8, 2, 4}), k2({2, 8, 2, 4}), v2({2, 8, 2, 5}), o2({2, 8, 2, 5});
  tensor<float, 3> g2({2, 8, 2});
  CHECK_THROWS_AS(m.forward_chunked(q2, k2, v2, g2, o2, s2, cu_ok), shape_error);
  // non-contiguous inner dimension
  tensor<float, 4> wide({1, 8, 2, 8});
  const tensor_view<const float, 4> strided(wide.data(), {1, 8, 2, 4}, {128, 16, 8, 2});
  CHECK_THROWS_AS(m.forward_chunked(strided, k, v, g, o, s), shape_error);
  // constant-gate misuse
  CHECK_THROWS_AS(m.forward_chunked(q, k, v, o, s), shape_error);  // no g_gamma set
  simple_gla<float> c({.g_gamma = {-0.1f, -0.2f}});
  CHECK_NOTHROW(c.forward_chunked(q, k, v, o, s));
  CHECK_THROWS_AS(c.forward_chunked(q, k, v, g, o, s), shape_error);
  simple_gla<float> c3({.g_gamma = {-0.1f, -0.2f, -0.3f}});
  CHECK_THROWS_AS(c3.forward_recurrent(q, k, v, o, s), shape_error);
  // step shapes
  tensor<float, 3> q1({1, 2, 4}), v1({1, 2, 5}), o1({1, 2, 5}), o1bad({1, 2, 4});
  tensor<float, 2> g1({1, 2});
  CHECK_NOTHROW(m.step(q1, q1, v1, g1, o1, s));
  CHECK_THROWS_AS(m.step(q1, q1, v1, g1, o1bad, s), shape_error);
}
