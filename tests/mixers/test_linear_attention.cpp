// SPDX-License-Identifier: MIT
// linear_attention (no gate), with and without the normaliser; allocation behaviour of the
// gated engine's forms.
#include <seqmix/mixers/linear_attention.hpp>
#include <seqmix/mixers/simple_gla.hpp>
#include <seqmix/reference/gated_accumulation.hpp>

#include "alloc_counter.hpp"
#include "gated_common.hpp"

using namespace gated_test;
using seqmix::linear_attention;

namespace {

struct la {
  static seqmix::shape_t<4> state_shape(const auto& b, index_t N) {
    return {N, b.v.extent(2), b.q.extent(3), b.v.extent(3)};
  }
  static seqmix::shape_t<4> out_shape(const auto& b) { return b.v.shape(); }
  static bundle<double> make(std::mt19937_64& rng, index_t B, index_t T, index_t H, index_t K,
                             index_t V) {
    bundle<double> b;
    b.q = seqmix::testing::random_normal<double, 4>({B, T, H, K}, rng);
    b.k = seqmix::testing::random_normal<double, 4>({B, T, H, K}, rng);
    b.v = seqmix::testing::random_normal<double, 4>({B, T, H, V}, rng);
    return b;
  }
  template <class T>
  static void run(int f, const bundle<T>& b, index_t chunk, tensor<T, 4>& o, tensor<T, 4>& s,
                  std::span<const index_t> cu) {
    linear_attention<T> m({.scale = {}, .chunk_size = chunk});
    if (f == 0) m.forward_chunked(b.q, b.k, b.v, o, s, cu);
    if (f == 1) m.forward_recurrent(b.q, b.k, b.v, o, s, cu);
    if (f == 2) m.forward(b.q, b.k, b.v, o, s, cu);
  }
  template <class T>
  static void step(const bundle<T>& b, index_t t, tensor<T, 4>& o, tensor<T, 4>& s) {
    linear_attention<T>().step(b.q.template select<1>(t), b.k.template select<1>(t),
                               b.v.template select<1>(t), o.template select<1>(t), s);
  }
  static void reference(const bundle<double>& b, tensor<double, 4>& o, tensor<double, 4>& s) {
    seqmix::reference::linear_attention<double>(b.q, b.k, b.v,
                                                1.0 / std::sqrt(double(b.q.extent(3))), o, s);
  }
};

}  // namespace

TEST_CASE("linear_attention: golden (fla naive), every case, with and without h0",
          "[linear_attention][golden]") {
  const auto& in = seqmix::testing::golden::file("inputs");
  const auto& gf = seqmix::testing::golden::file("fla_scalar_decay");
  for (int c = 0; c < seqmix::testing::golden::case_count; ++c) {
    for (bool h0 : {false, true}) {
      const std::string pre = "case" + std::to_string(c) + ".";
      const std::string key = "linear_attn.case" + std::to_string(c) + (h0 ? ".h0." : ".noh0.");
      INFO(key);
      auto q = in.get<float, 4>(pre + "q"), k = in.get<float, 4>(pre + "k"),
           v = in.get<float, 4>(pre + "v");
      auto o_ref = gf.get<float, 4>(key + "o_naive");
      auto s_ref = gf.get<float, 4>(key + "ht_naive");
      for (int f = 0; f < 3; ++f) {
        INFO("form " << f);
        tensor<float, 4> o(v.shape());
        auto s = h0 ? in.get<float, 4>(pre + "h0")
                    : linear_attention<float>::make_state(q.extent(0), q.extent(2), q.extent(3),
                                                          v.extent(3));
        linear_attention<float> m;
        if (f == 0) m.forward_chunked(q, k, v, o, s);
        if (f == 1) m.forward_recurrent(q, k, v, o, s);
        if (f == 2) {
          tensor<double, 4> od(v.shape());
          auto sd = seqmix::testing::cast<double>(s);
          seqmix::reference::linear_attention<double>(
              seqmix::testing::cast<double>(q), seqmix::testing::cast<double>(k),
              seqmix::testing::cast<double>(v), 1.0 / std::sqrt(double(q.extent(3))), od, sd);
          o = seqmix::testing::cast<float>(od);
          s = seqmix::testing::cast<float>(sd);
        }
        SEQMIX_CHECK_CLOSE(o_ref, o, tol_golden);
        SEQMIX_CHECK_CLOSE(s_ref, s, tol_golden);
      }
    }
  }
}

TEST_CASE("linear_attention: reference vs recurrent vs chunked over odd sizes",
          "[linear_attention]") {
  auto rng = seqmix::testing::make_rng(31);
  for (const auto& c : sweep_cases()) {
    check_forms<la>(
        la::make(rng, 2, c.T, 2, c.K, c.V), c.chunk,
        "T " + std::to_string(c.T) + " K " + std::to_string(c.K) + " V " + std::to_string(c.V));
  }
}

TEST_CASE("linear_attention: normaliser, all forms and step vs reference", "[linear_attention]") {
  auto rng = seqmix::testing::make_rng(32);
  for (index_t T : {1, 63, 200}) {
    const auto in = la::make(rng, 2, T, 2, 16, 24);
    // positive keys and queries keep the denominator away from 0, as in practice (feature maps)
    auto pos = [](tensor<double, 4> x) {
      for (index_t i = 0; i < x.size(); ++i) x[i] = std::abs(x[i]) + 0.1;
      return x;
    };
    const auto q = pos(in.q), k = pos(in.k);
    tensor<double, 4> o_ref(in.v.shape());
    auto s_ref = linear_attention<double>::make_state(2, 2, 16, 24);
    auto z_ref = linear_attention<double>::make_normaliser_state(2, 2, 16);
    seqmix::reference::linear_attention<double>(q, k, in.v, 0.25, o_ref, s_ref, z_ref);
    const auto qf = seqmix::testing::cast<float>(q), kf = seqmix::testing::cast<float>(k),
               vf = seqmix::testing::cast<float>(in.v);
    linear_attention<float> m({.scale = 0.25f, .chunk_size = 32});
    for (int f = 0; f < 3; ++f) {
      INFO("T " << T << " form " << f);
      tensor<float, 4> o(in.v.shape());
      auto s = m.make_state(2, 2, 16, 24);
      auto z = m.make_normaliser_state(2, 2, 16);
      if (f == 0) m.forward_chunked(qf, kf, vf, o, s, z);
      if (f == 1) m.forward_recurrent(qf, kf, vf, o, s, z);
      if (f == 2) {
        for (index_t t = 0; t < T; ++t) {
          m.step(qf.select<1>(t), kf.select<1>(t), vf.select<1>(t), o.select<1>(t), s, z);
        }
      }
      SEQMIX_CHECK_CLOSE(o_ref, o, tol_float);
      SEQMIX_CHECK_CLOSE(s_ref, s, tol_float);
      SEQMIX_CHECK_CLOSE(z_ref, z, tol_float);
    }
  }
}

TEST_CASE("linear_attention: split points, step, varlen, threads", "[linear_attention]") {
  auto rng = seqmix::testing::make_rng(33);
  check_split<la>(la::make(rng, 2, 150, 2, 32, 16), 16);
  check_step<la>(la::make(rng, 1, 30, 2, 128, 128));
  check_varlen<la>(la::make(rng, 1, 200, 2, 16, 32), {0, 64, 65, 200}, 32);
  check_threads<la>(la::make(rng, 1, 200, 4, 64, 64), 64);
  check_threads<la>(la::make(rng, 1, 333, 1, 24, 40), 32);
}

TEST_CASE("linear_attention: bad inputs raise shape_error", "[linear_attention]") {
  using seqmix::shape_error;
  linear_attention<float> m;
  tensor<float, 4> q({2, 8, 2, 4}), v({2, 8, 2, 5}), o({2, 8, 2, 5}), vbad({2, 8, 3, 5});
  auto s = m.make_state(2, 2, 4, 5);
  auto z = m.make_normaliser_state(2, 2, 4);
  CHECK_NOTHROW(m.forward_chunked(q, q, v, o, s, z));
  CHECK_THROWS_AS(m.forward_chunked(q, q, vbad, o, s), shape_error);
  tensor<float, 3> zbad({2, 2, 5}), zempty;
  CHECK_THROWS_AS(m.forward_recurrent(q, q, v, o, s, zbad), shape_error);
  CHECK_THROWS_AS(m.forward_recurrent(q, q, v, o, s, zempty), shape_error);
  tensor<float, 4> wrong_b({3, 8, 2, 5});
  CHECK_THROWS_AS(m.forward(q, q, v, wrong_b, s), shape_error);
}

TEST_CASE(
    "gated engine: recurrent and step allocate nothing per token, chunked memory is "
    "O(C(C+K+V)) per thread + O((C+K)V) per head, independent of T",
    "[linear_attention][alloc]") {
  auto rng = seqmix::testing::make_rng(34);
  const std::size_t H = 2, K = 64, V = 64;
  const auto h = static_cast<index_t>(H), k = static_cast<index_t>(K), vv = static_cast<index_t>(V);
  seqmix::simple_gla<float> m;
  for (index_t T : {256, 2048}) {
    auto q = seqmix::testing::random_normal<float, 4>({1, T, h, k}, rng);
    auto v = seqmix::testing::random_normal<float, 4>({1, T, h, vv}, rng);
    auto g = random_gate<float, 3>({1, T, h}, rng, 1.0);
    tensor<float, 4> o({1, T, h, vv});
    auto s = m.make_state(1, h, k, vv);
    // warm: the first parallel region of the process starts OpenMP's thread team (LLVM's libomp
    // allocates then; run alone, as CTest runs this test, nothing before has started it)
    m.forward_recurrent(q, q, v, g, o, s);
    {
      seqmix::testing::allocation_scope scope;
      m.forward_recurrent(q, q, v, g, o, s);
      const auto count = scope.stats().count;  // read before INFO, which allocates
      INFO("recurrent T " << T << ": " << count << " allocations");
      CHECK(count == 0);
    }
    {
      seqmix::testing::allocation_scope scope;
      for (index_t t = 0; t < 16; ++t) {
        m.step(q.select<1>(t), q.select<1>(t), v.select<1>(t), g.select<1>(t), o.select<1>(t), s);
      }
      const auto count = scope.stats().count;
      CHECK(count == 0);
    }
    {
      seqmix::testing::allocation_scope scope;
      m.forward_chunked(q, q, v, g, o, s);
      const auto peak = scope.stats().peak_bytes;
      const std::size_t C = 64;
      // per thread O(C·(C+K+V)) scratch, plus (C+K)·V per (sequence, head) item: nothing in T
      const std::size_t bound = sizeof(float) * (static_cast<std::size_t>(seqmix::max_slots()) *
                                                     (4 * C * (C + K + V) + 2 * K * V) +
                                                 H * (C + K) * V) +
                                (64u << 10);
      INFO("chunked T " << T << ": peak " << peak << " B, bound " << bound << " B");
      CHECK(peak <= bound);  // no term in T: the same bound holds at T = 256 and T = 2048
    }
  }
}
