// SPDX-License-Identifier: MIT
// Hostile input to the delta-rule mixers (delta_net, gated_delta_net, gated_delta_gates): bad
// shapes per argument and per entry, bad options, invalid values (NaN beta, log gates > 0, NaN
// gate inputs) and aliased outputs; every case asserts the function, argument and numbers.
#include <string>
#include <vector>

#include <seqmix/mixers/delta_net.hpp>
#include <seqmix/mixers/gated_delta_net.hpp>

#include "hostile_common.hpp"

using namespace hostile;
using seqmix::delta_net;
using seqmix::gate_growth;
using seqmix::gated_delta_net;

namespace {

constexpr index_t B = 2, T = 5, H = 2, HV = 4, K = 8, V = 24;
const char* const forms[] = {"forward_chunked", "forward_recurrent", "forward"};

struct inputs {
  tensor<float, 4> q = randn<4>({B, T, H, K}, 1, 0.3f), k = randn<4>({B, T, H, K}, 2, 0.3f),
                   v = randn<4>({B, T, HV, V}, 3), o{{B, T, HV, V}};
  tensor<float, 3> g = gates<3>({B, T, HV}, 4), beta = gates<3>({B, T, HV}, 5);
  tensor<float, 4> state{{B, HV, K, V}};
  tensor<float, 3> q1 = randn<3>({B, H, K}, 6, 0.3f), k1 = randn<3>({B, H, K}, 7, 0.3f),
                   v1 = randn<3>({B, HV, V}, 8), o1{{B, HV, V}};
  tensor<float, 2> g1 = gates<2>({B, HV}, 9), beta1 = gates<2>({B, HV}, 10);
};

/// Calls entry f (0 chunked, 1 recurrent, 2 forward) of either mixer.
template <class M>
void call(const M& m, int f, tensor_view<const float, 4> q, tensor_view<const float, 4> k,
          tensor_view<const float, 4> v, tensor_view<const float, 3> g,
          tensor_view<const float, 3> beta, tensor_view<float, 4> o, tensor_view<float, 4> s,
          std::span<const index_t> cu = {}) {
  if constexpr (std::is_same_v<M, gated_delta_net<float>>) {
    if (f == 0) m.forward_chunked(q, k, v, g, beta, o, s, cu);
    if (f == 1) m.forward_recurrent(q, k, v, g, beta, o, s, cu);
    if (f == 2) m.forward(q, k, v, g, beta, o, s, cu);
  } else {
    (void)g;
    if (f == 0) m.forward_chunked(q, k, v, beta, o, s, cu);
    if (f == 1) m.forward_recurrent(q, k, v, beta, o, s, cu);
    if (f == 2) m.forward(q, k, v, beta, o, s, cu);
  }
}
template <class M>
void call_step(const M& m, tensor_view<const float, 3> q, tensor_view<const float, 3> k,
               tensor_view<const float, 3> v, tensor_view<const float, 2> g,
               tensor_view<const float, 2> beta, tensor_view<float, 3> o, tensor_view<float, 4> s) {
  if constexpr (std::is_same_v<M, gated_delta_net<float>>) {
    m.step(q, k, v, g, beta, o, s);
  } else {
    (void)g;
    m.step(q, k, v, beta, o, s);
  }
}

template <class M>
void shapes_and_aliasing(const char* mixer) {
  inputs a;
  const M m;
  for (int f = 0; f < 3; ++f) {
    const std::string w = std::string("seqmix::") + mixer + "::" + forms[f] + ": ";
    INFO(w);
    auto run = [&](tensor_view<const float, 4> q, tensor_view<const float, 4> k,
                   tensor_view<const float, 4> v, tensor_view<const float, 3> beta,
                   tensor_view<float, 4> o,
                   tensor_view<float, 4> s) { call(m, f, q, k, v, a.g, beta, o, s); };
    REQUIRE_NOTHROW(run(a.q, a.k, a.v, a.beta, a.o, a.state));
    tensor<float, 4> k9({B, T, H, 9}), v3({B, T, 3, V}), o23({B, T, HV, 23}), sT({B, HV, V, K}),
        q0({B, T, H, 0});
    tensor<float, 3> beta3({B, T, 3});
    REQUIRE_SHAPE_ERROR(run(a.q, k9, a.v, a.beta, a.o, a.state), w, "argument 'k'",
                        "expected shape [2, 5, 2, 8]", "got [2, 5, 2, 9]");
    // value heads not a multiple of q/k heads: the numbers are given
    REQUIRE_SHAPE_ERROR(run(a.q, a.k, v3, a.beta, a.o, a.state), w, "argument 'v'",
                        "heads of v (3) must be a multiple of the heads of q (2)");
    REQUIRE_SHAPE_ERROR(run(a.q, a.k, a.v, a.beta, o23, a.state), w, "argument 'o'",
                        "expected shape [2, 5, 4, 24]", "got [2, 5, 4, 23]");
    REQUIRE_SHAPE_ERROR(run(a.q, a.k, a.v, beta3, a.o, a.state), w, "argument 'beta'",
                        "expected shape [2, 5, 4]", "got [2, 5, 3]");
    REQUIRE_SHAPE_ERROR(run(a.q, a.k, a.v, a.beta, a.o, sT), w, "argument 'state'",
                        "expected shape [2, 4, 8, 24]", "got [2, 4, 24, 8]");
    REQUIRE_SHAPE_ERROR(run(q0, a.k, a.v, a.beta, a.o, a.state), w, "argument 'q'",
                        "must not be empty", "[2, 5, 2, 0]");
    auto beta = a.beta;
    beta.view()(1, 2, 3) = fnan;
    REQUIRE_SHAPE_ERROR(run(a.q, a.k, a.v, beta, a.o, a.state), w, "argument 'beta'",
                        "must be finite, got NaN at [1, 2, 3]");
    // aliasing: o = v, o over q, the state over k, o over the state
    REQUIRE_SHAPE_ERROR(
        run(a.q, a.k, a.v, a.beta, tensor_view<float, 4>(a.v.data(), a.v.shape()), a.state), w,
        "argument 'o'", "must not share memory with argument 'v'", "3840 bytes in common");
    tensor<float, 4> pool({B, HV, K, V});
    tensor_view<const float, 4> k_in_state(pool.data(), {B, T, H, K});
    REQUIRE_SHAPE_ERROR(run(a.q, k_in_state, a.v, a.beta, a.o, pool), w, "argument 'state'",
                        "must not share memory with argument 'k'");
    tensor<float, 4> so({B, T, HV, V});
    REQUIRE_SHAPE_ERROR(
        run(a.q, a.k, a.v, a.beta, so, tensor_view<float, 4>(so.data() + 100, {B, HV, K, V})), w,
        "argument 'o'", "must not share memory with argument 'state'");
    // packed sequences
    const std::vector<index_t> cu{0, 2, 6};
    tensor<float, 4> s2({2, HV, K, V});
    REQUIRE_SHAPE_ERROR(
        call(m, f, a.q.view().template slice<0>(0, 1), a.k.view().template slice<0>(0, 1),
             a.v.view().template slice<0>(0, 1), a.g.view().template slice<0>(0, 1),
             a.beta.view().template slice<0>(0, 1), a.o.view().template slice<0>(0, 1), s2, cu),
        w, "argument 'cu_seqlens'", "last offset must be T = 5, got 6");
  }
  // step: the [B, H, D] arguments with their shapes
  const std::string w = std::string("seqmix::") + mixer + "::step: ";
  REQUIRE_NOTHROW(call_step(m, a.q1, a.k1, a.v1, a.g1, a.beta1, a.o1, a.state));
  tensor<float, 3> k9({B, H, 9}), v3({B, 3, V}), o23({B, HV, 23});
  tensor<float, 2> beta3({B, 3});
  REQUIRE_SHAPE_ERROR(call_step(m, a.q1, k9, a.v1, a.g1, a.beta1, a.o1, a.state), w, "argument 'k'",
                      "expected shape [2, 2, 8]", "got [2, 2, 9]");
  REQUIRE_SHAPE_ERROR(call_step(m, a.q1, a.k1, v3, a.g1, a.beta1, a.o1, a.state), w, "argument 'v'",
                      "heads of v (3) must be a multiple of the heads of q (2)");
  REQUIRE_SHAPE_ERROR(call_step(m, a.q1, a.k1, a.v1, a.g1, a.beta1, o23, a.state), w,
                      "argument 'o'", "expected shape [2, 4, 24]", "got [2, 4, 23]");
  REQUIRE_SHAPE_ERROR(call_step(m, a.q1, a.k1, a.v1, a.g1, beta3, a.o1, a.state), w,
                      "argument 'beta'", "expected shape [2, 4]", "got [2, 3]");
  REQUIRE_SHAPE_ERROR(call_step(m, a.q1, a.k1, a.v1, a.g1, a.beta1,
                                tensor_view<float, 3>(a.v1.data(), a.v1.shape()), a.state),
                      w, "argument 'o'", "must not share memory with argument 'v'");
  // options and make_state
  typename M::options bad_scale;
  bad_scale.scale = finf;
  REQUIRE_SHAPE_ERROR(call_step(M(bad_scale), a.q1, a.k1, a.v1, a.g1, a.beta1, a.o1, a.state), w,
                      "argument 'options.scale'", "must be finite, got +inf");
  typename M::options bad_chunk;
  bad_chunk.chunk_size = -2;
  REQUIRE_SHAPE_ERROR(call(M(bad_chunk), 0, a.q, a.k, a.v, a.g, a.beta, a.o, a.state),
                      "argument 'options.chunk_size'", "must be > 0, got -2");
  REQUIRE_SHAPE_ERROR(M::make_state(2, 0, 8, 8), std::string("seqmix::") + mixer + "::make_state",
                      "argument 'HV'", "must be >= 1, got 0");
}

}  // namespace

TEST_CASE("hostile delta_net: shapes, values, options and aliasing per entry",
          "[hostile][delta_net]") {
  shapes_and_aliasing<delta_net<float>>("delta_net");
}

TEST_CASE("hostile gated_delta_net: shapes, values, options and aliasing per entry",
          "[hostile][gated_delta_net]") {
  shapes_and_aliasing<gated_delta_net<float>>("gated_delta_net");
}

TEST_CASE("hostile gated_delta_net: a log gate > 0 is rejected with its index and value",
          "[hostile][gated_delta_net]") {
  inputs a;
  const gated_delta_net<float> m;
  const gated_delta_net<float> grow({}, gate_growth::allow);
  for (int f = 0; f < 3; ++f) {
    const std::string w = std::string("seqmix::gated_delta_net::") + forms[f] + ": ";
    INFO(w);
    auto g = a.g;
    g.view()(1, 3, 2) = 0.9f;
    REQUIRE_SHAPE_ERROR(call(m, f, a.q, a.k, a.v, g, a.beta, a.o, a.state), w, "argument 'g'",
                        "got 0.899999976 at [1, 3, 2]", "[b, t, hv]", "log(alpha)");
    REQUIRE_NOTHROW(call(grow, f, a.q, a.k, a.v, g, a.beta, a.o, a.state));
    g.view()(1, 3, 2) = fnan;
    REQUIRE_SHAPE_ERROR(call(m, f, a.q, a.k, a.v, g, a.beta, a.o, a.state), w, "argument 'g'",
                        "got NaN at [1, 3, 2]");
    REQUIRE_SHAPE_ERROR(call(grow, f, a.q, a.k, a.v, g, a.beta, a.o, a.state), w, "argument 'g'",
                        "got NaN at [1, 3, 2]");
    g.view()(1, 3, 2) = -finf;  // forget everything
    REQUIRE_NOTHROW(call(m, f, a.q, a.k, a.v, g, a.beta, a.o, a.state));
    tensor<float, 3> g3({B, T, 3});
    REQUIRE_SHAPE_ERROR(call(m, f, a.q, a.k, a.v, g3, a.beta, a.o, a.state), w, "argument 'g'",
                        "expected shape [2, 5, 4]", "got [2, 5, 3]");
    REQUIRE_SHAPE_ERROR(
        call(m, f, a.q, a.k, a.v, tensor_view<const float, 3>(), a.beta, a.o, a.state), w,
        "argument 'g'", "must not be empty");
    REQUIRE_SHAPE_ERROR(
        call(m, f, a.q, a.k, a.v, a.g, a.beta, tensor_view<float, 4>(a.o.data(), a.o.shape()),
             tensor_view<float, 4>(a.o.data() + 8, a.state.shape())),
        w, "argument 'o'", "argument 'state'");
  }
  const std::string w = "seqmix::gated_delta_net::step: ";
  auto g1 = a.g1;
  g1.view()(0, 3) = 2.f;
  REQUIRE_SHAPE_ERROR(m.step(a.q1, a.k1, a.v1, g1, a.beta1, a.o1, a.state), w, "argument 'g'",
                      "got 2 at [0, 3]", "[b, hv]");
  REQUIRE_NOTHROW(grow.step(a.q1, a.k1, a.v1, g1, a.beta1, a.o1, a.state));
  tensor<float, 2> g3({B, 3});
  REQUIRE_SHAPE_ERROR(m.step(a.q1, a.k1, a.v1, g3, a.beta1, a.o1, a.state), w, "argument 'g'",
                      "expected shape [2, 4]", "got [2, 3]");
}

TEST_CASE("hostile gated_delta_gates: NaN inputs, shapes and aliasing",
          "[hostile][gated_delta_net]") {
  tensor<float, 3> a = randn<3>({B, T, HV}, 20), b = randn<3>({B, T, HV}, 21), g({B, T, HV}),
                   beta({B, T, HV});
  tensor<float, 1> A_log = randn<1>({HV}, 22), dt_bias = randn<1>({HV}, 23);
  const std::string w = "seqmix::gated_delta_gates: ";
  REQUIRE_NOTHROW(seqmix::gated_delta_gates<float>(a, b, A_log, dt_bias, g, beta));
  for (index_t i = 0; i < g.size(); ++i) REQUIRE(g[i] <= 0.f);
  auto an = a;
  an.view()(1, 4, 2) = fnan;  // was: g = -3.4e38, a silent "forget everything"
  REQUIRE_SHAPE_ERROR(seqmix::gated_delta_gates<float>(an, b, A_log, dt_bias, g, beta), w,
                      "argument 'a'", "must be finite, got NaN at [1, 4, 2]");
  auto bn = b;
  bn.view()(0, 0, 1) = finf;
  REQUIRE_SHAPE_ERROR(seqmix::gated_delta_gates<float>(a, bn, A_log, dt_bias, g, beta), w,
                      "argument 'b'", "got +inf at [0, 0, 1]");
  tensor<float, 3> b3({B, T, 3});
  REQUIRE_SHAPE_ERROR(seqmix::gated_delta_gates<float>(a, b3, A_log, dt_bias, g, beta), w,
                      "argument 'b'", "expected shape [2, 5, 4]", "got [2, 5, 3]");
  tensor<float, 1> h3({3});
  REQUIRE_SHAPE_ERROR(seqmix::gated_delta_gates<float>(a, b, h3, dt_bias, g, beta), w,
                      "argument 'A_log'", "expected shape [4]", "got [3]");
  // g written over b would change beta (b read after g is written)
  REQUIRE_SHAPE_ERROR(seqmix::gated_delta_gates<float>(
                          a, b, A_log, dt_bias, tensor_view<float, 3>(b.data(), b.shape()), beta),
                      w, "argument 'g'", "must not share memory with argument 'b'");
  REQUIRE_SHAPE_ERROR(seqmix::gated_delta_gates<float>(a, b, A_log, dt_bias, g,
                                                       tensor_view<float, 3>(g.data(), g.shape())),
                      w, "argument 'g'", "must not share memory with argument 'beta'");
}

TEST_CASE("hostile delta rule: self-overlapping outputs are rejected", "[hostile][delta_net]") {
  inputs a;
  const delta_net<float> m;
  tensor<float, 3> one({HV, K, V});
  tensor_view<float, 4> s_bcast(one.data(), {B, HV, K, V}, {0, K * V, V, 1});
  REQUIRE_SHAPE_ERROR(m.forward(a.q, a.k, a.v, a.beta, a.o, s_bcast),
                      "seqmix::delta_net::forward: ", "argument 'state'",
                      "got strides [0, 192, 24, 1]");
  tensor<float, 3> x = randn<3>({B, T, HV}, 30), y = randn<3>({B, T, HV}, 31), gb({B, T, 1});
  tensor<float, 1> A_log = randn<1>({HV}, 32), dt_bias = randn<1>({HV}, 33);
  tensor<float, 3> beta({B, T, HV});
  REQUIRE_SHAPE_ERROR(
      seqmix::gated_delta_gates<float>(
          x, y, A_log, dt_bias, tensor_view<float, 3>(gb.data(), {B, T, HV}, {T, 1, 0}), beta),
      "seqmix::gated_delta_gates: ", "argument 'g'", "got strides [5, 1, 0]");
}
