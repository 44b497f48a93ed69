// SPDX-License-Identifier: MIT
// mamba2_ssd: x [B,T,H,P], dt (raw, + dt_bias, softplus, clamp), A_log [H], B/C [B,T,G,N], D [H].
#include <seqmix/mixers/mamba2_ssd.hpp>
#include <seqmix/reference/gated_accumulation.hpp>

#include "gated_common.hpp"

using namespace gated_test;
using seqmix::mamba2_ssd;

namespace {

// bundle roles: q = C, k = B ([B,T,G,N]), v = x ([B,T,H,P]), g = dt raw, p1 = A_log, p2 = D
struct m2 {
  static seqmix::shape_t<4> state_shape(const auto& b, index_t N) {
    return {N, b.v.extent(2), b.q.extent(3), b.v.extent(3)};
  }
  static seqmix::shape_t<4> out_shape(const auto& b) { return b.v.shape(); }
  static bundle<double> make(std::mt19937_64& rng, index_t B, index_t T, index_t H, index_t G,
                             index_t N, index_t P, double strength = 1.0) {
    bundle<double> b;
    b.q = seqmix::testing::random_normal<double, 4>({B, T, G, N}, rng);
    b.k = seqmix::testing::random_normal<double, 4>({B, T, G, N}, rng);
    b.v = seqmix::testing::random_normal<double, 4>({B, T, H, P}, rng);
    b.g = seqmix::testing::random_normal<double, 3>({B, T, H}, rng, 1.0, -2.0);
    b.p1 = seqmix::testing::random_uniform<double, 1>({H}, rng, 0.0, 1.0);
    for (index_t h = 0; h < H; ++h) b.p1[h] += std::log(strength);
    b.p2 = seqmix::testing::random_normal<double, 1>({H}, rng);
    return b;
  }
  template <class T>
  static void run(int f, const bundle<T>& b, index_t chunk, tensor<T, 4>& o, tensor<T, 4>& s,
                  std::span<const index_t> cu) {
    mamba2_ssd<T> m({.chunk_size = chunk});
    if (f == 0) m.forward_chunked(b.v, b.g, b.p1, b.k, b.q, b.p2, {}, o, s, cu);
    if (f == 1) m.forward_recurrent(b.v, b.g, b.p1, b.k, b.q, b.p2, {}, o, s, cu);
    if (f == 2) m.forward(b.v, b.g, b.p1, b.k, b.q, b.p2, {}, o, s, cu);
  }
  template <class T>
  static void step(const bundle<T>& b, index_t t, tensor<T, 4>& o, tensor<T, 4>& s) {
    mamba2_ssd<T>().step(b.v.template select<1>(t), b.g.template select<1>(t), b.p1,
                         b.k.template select<1>(t), b.q.template select<1>(t), b.p2, {},
                         o.template select<1>(t), s);
  }
  static void reference(const bundle<double>& b, tensor<double, 4>& o, tensor<double, 4>& s) {
    seqmix::reference::mamba2_ssd<double>(b.v, b.g, {}, b.p1, b.k, b.q, b.p2, true, 0.0,
                                          std::numeric_limits<double>::infinity(), o, s);
  }
};

}  // namespace

TEST_CASE("mamba2_ssd: golden (ssd_minimal_discrete), every case, with and without h0",
          "[mamba2_ssd][golden]") {
  const auto& in = seqmix::testing::golden::file("inputs");
  const auto& gf = seqmix::testing::golden::file("mamba2_ssd");
  for (int c = 0; c < seqmix::testing::golden::case_count; ++c) {
    for (bool h0 : {false, true}) {
      const std::string pre = "case" + std::to_string(c) + ".";
      const std::string op = "mamba2_ssd.case" + std::to_string(c) + ".";
      const std::string key = op + (h0 ? "h0." : "noh0.");
      INFO(key);
      // x = v, B = k, C = q (G = H); dt is already positive: pass it raw without softplus
      auto x = in.get<float, 4>(pre + "v"), Bm = in.get<float, 4>(pre + "k"),
           Cm = in.get<float, 4>(pre + "q");
      auto dt = gf.get<float, 3>(op + "dt");
      auto A = gf.get<double, 1>(op + "A");
      tensor<float, 1> A_log(A.shape());
      for (index_t h = 0; h < A.size(); ++h) A_log[h] = static_cast<float>(std::log(-A[h]));
      auto y_ref = gf.get<float, 4>(key + "o_naive");
      auto s_ref_pn = gf.get<float, 4>(key + "ht_naive");  // [B,H,P,N]
      const auto s_ref = seqmix::mamba2_state_from_pn<float>(s_ref_pn);
      const index_t B = x.extent(0), H = x.extent(2), P = x.extent(3), N = Bm.extent(3);
      mamba2_ssd<float> m({.dt_softplus = false});
      for (int f = 0; f < 3; ++f) {
        INFO("form " << f);
        tensor<float, 4> y(x.shape());
        auto s = h0 ? seqmix::mamba2_state_from_pn<float>(gf.get<float, 4>(op + "h0_pn"))
                    : m.make_state(B, H, N, P);
        if (f == 0) m.forward_chunked(x, dt, A_log, Bm, Cm, {}, {}, y, s);
        if (f == 1) m.forward_recurrent(x, dt, A_log, Bm, Cm, {}, {}, y, s);
        if (f == 2) {
          for (index_t t = 0; t < x.extent(1); ++t) {
            m.step(x.select<1>(t), dt.select<1>(t), A_log, Bm.select<1>(t), Cm.select<1>(t), {}, {},
                   y.select<1>(t), s);
          }
        }
        SEQMIX_CHECK_CLOSE(y_ref, y, tol_golden);
        SEQMIX_CHECK_CLOSE(s_ref, s, tol_golden);
        // the converter gives mamba's layout back
        SEQMIX_CHECK_CLOSE(s_ref_pn, seqmix::mamba2_state_to_pn<float>(s), tol_golden);
      }
    }
  }
}

TEST_CASE("mamba2_ssd: reference vs recurrent vs chunked, groups, D skip, odd sizes",
          "[mamba2_ssd]") {
  auto rng = seqmix::testing::make_rng(41);
  struct c_t {
    index_t T, H, G, N, P, chunk;
  };
  for (const auto& c :
       {c_t{1, 2, 1, 16, 8, 64}, c_t{65, 4, 2, 7, 65, 32}, c_t{257, 4, 4, 64, 64, 64},
        c_t{300, 6, 2, 128, 16, 128}, c_t{1000, 2, 1, 1, 1, 16}}) {
    check_forms<m2>(
        m2::make(rng, 2, c.T, c.H, c.G, c.N, c.P), c.chunk,
        "T " + std::to_string(c.T) + " H " + std::to_string(c.H) + " G " + std::to_string(c.G));
  }
}

TEST_CASE("mamba2_ssd: strong decays (A up to -1e4 per unit dt) stay finite and exact",
          "[mamba2_ssd]") {
  auto rng = seqmix::testing::make_rng(42);
  for (double strength : {1e-3, 1.0, 100.0, 1e4}) {
    check_forms<m2>(m2::make(rng, 1, 200, 2, 1, 32, 32, strength), 64,
                    "strength " + std::to_string(strength));
  }
}

TEST_CASE("mamba2_ssd: dt_bias and clamp match the reference", "[mamba2_ssd]") {
  auto rng = seqmix::testing::make_rng(43);
  const auto in = m2::make(rng, 1, 80, 2, 1, 16, 16);
  const auto bias = seqmix::testing::random_normal<double, 1>({2}, rng);
  tensor<double, 4> y_ref(in.v.shape()), s_ref({1, 2, 16, 16});
  seqmix::reference::mamba2_ssd<double>(in.v, in.g, bias, in.p1, in.k, in.q, in.p2, true, 0.05, 0.3,
                                        y_ref, s_ref);
  const auto f = cast_bundle<float>(in);
  const auto fb = seqmix::testing::cast<float>(bias);
  mamba2_ssd<float> m({.chunk_size = 32, .dt_softplus = true, .dt_min = 0.05f, .dt_max = 0.3f});
  for (int form = 0; form < 2; ++form) {
    tensor<float, 4> y(in.v.shape());
    auto s = m.make_state(1, 2, 16, 16);
    if (form == 0) m.forward_chunked(f.v, f.g, f.p1, f.k, f.q, f.p2, fb, y, s);
    if (form == 1) m.forward_recurrent(f.v, f.g, f.p1, f.k, f.q, f.p2, fb, y, s);
    SEQMIX_CHECK_CLOSE(y_ref, y, tol_float);
    SEQMIX_CHECK_CLOSE(s_ref, s, tol_float);
  }
}

TEST_CASE("mamba2_ssd: split points, step, varlen, threads", "[mamba2_ssd]") {
  auto rng = seqmix::testing::make_rng(44);
  check_split<m2>(m2::make(rng, 2, 150, 4, 2, 16, 24), 32);
  check_step<m2>(m2::make(rng, 2, 30, 8, 1, 64, 64));
  check_varlen<m2>(m2::make(rng, 1, 200, 2, 1, 16, 32), {0, 50, 51, 200}, 64);
  check_threads<m2>(m2::make(rng, 1, 300, 4, 2, 64, 64), 64);
  check_threads<m2>(m2::make(rng, 1, 333, 1, 1, 24, 40), 32);
}

TEST_CASE("mamba2_ssd: bad inputs raise shape_error", "[mamba2_ssd]") {
  using seqmix::shape_error;
  mamba2_ssd<float> m;
  tensor<float, 4> x({1, 8, 4, 6}), Bm({1, 8, 2, 5}), y({1, 8, 4, 6});
  tensor<float, 3> dt({1, 8, 4});
  tensor<float, 1> A_log({4}), D({4});
  auto s = m.make_state(1, 4, 5, 6);
  CHECK_NOTHROW(m.forward_chunked(x, dt, A_log, Bm, Bm, D, {}, y, s));
  tensor<float, 4> B3({1, 8, 3, 5}), Cbad({1, 8, 2, 4});
  CHECK_THROWS_AS(m.forward_chunked(x, dt, A_log, B3, B3, D, {}, y, s), shape_error);  // 4 % 3
  CHECK_THROWS_AS(m.forward_chunked(x, dt, A_log, Bm, Cbad, D, {}, y, s), shape_error);
  tensor<float, 1> A3({3});
  CHECK_THROWS_AS(m.forward_recurrent(x, dt, A3, Bm, Bm, D, {}, y, s), shape_error);
  CHECK_THROWS_AS(m.forward_recurrent(x, dt, A_log, Bm, Bm, A3, {}, y, s), shape_error);
  auto dtnan = dt;
  dtnan[1] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_AS(m.forward_chunked(x, dtnan, A_log, Bm, Bm, D, {}, y, s), shape_error);
  auto spn = m.make_state(1, 4, 6, 5);  // mamba's [P,N] layout is not accepted
  CHECK_THROWS_AS(m.forward_chunked(x, dt, A_log, Bm, Bm, D, {}, y, spn), shape_error);
}
