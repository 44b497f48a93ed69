// SPDX-License-Identifier: MIT
// Hostile input to the gated-accumulation mixers (linear_attention, simple_gla, gla,
// mamba2_ssd): bad shapes per argument and per entry, negative extents, bad options, invalid
// values (NaN/finf options, NaN inputs, log gates > 0) and aliased outputs. Every case asserts
// the exact function name, argument name and numbers in the message.
#include <string>
#include <vector>

#include <seqmix/mixers/gla.hpp>
#include <seqmix/mixers/linear_attention.hpp>
#include <seqmix/mixers/mamba2_ssd.hpp>
#include <seqmix/mixers/simple_gla.hpp>

#include "hostile_common.hpp"

using namespace hostile;
using seqmix::gla;
using seqmix::linear_attention;
using seqmix::mamba2_ssd;
using seqmix::simple_gla;

namespace {

constexpr index_t B = 2, T = 5, H = 2, K = 20, V = 24;

const char* const forms[] = {"forward_chunked", "forward_recurrent", "forward"};

/// Inputs of one GLA / simple GLA / linear attention call, sequence and step forms.
struct qkv {
  tensor<float, 4> q = randn<4>({B, T, H, K}, 1), k = randn<4>({B, T, H, K}, 2),
                   v = randn<4>({B, T, H, V}, 3), o{{B, T, H, V}};
  tensor<float, 4> gk = gates<4>({B, T, H, K}, 4), gv = gates<4>({B, T, H, V}, 5);
  tensor<float, 3> g = gates<3>({B, T, H}, 6);
  tensor<float, 4> state{{B, H, K, V}};
  tensor<float, 3> z{{B, H, K}};
  tensor<float, 3> q1 = randn<3>({B, H, K}, 7), k1 = randn<3>({B, H, K}, 8),
                   v1 = randn<3>({B, H, V}, 9), o1{{B, H, V}};
  tensor<float, 3> gk1 = gates<3>({B, H, K}, 10), gv1 = gates<3>({B, H, V}, 11);
  tensor<float, 2> g1 = gates<2>({B, H}, 12);
};

std::string where(const char* mixer, const char* entry) {
  return std::string("seqmix::") + mixer + "::" + entry + ": ";
}

}  // namespace

// ---- GLA -------------------------------------------------------------------------------------

TEST_CASE("hostile gla: every sequence entry names its argument with the numbers",
          "[hostile][gla]") {
  qkv a;
  const gla<float> m;
  for (int f = 0; f < 3; ++f) {
    const std::string w = where("gla", forms[f]);
    INFO(w);
    auto run = [&](tensor_view<const float, 4> q, tensor_view<const float, 4> k,
                   tensor_view<const float, 4> v, tensor_view<const float, 4> gk,
                   tensor_view<float, 4> o, tensor_view<float, 4> s) {
      if (f == 0) m.forward_chunked(q, k, v, gk, o, s);
      if (f == 1) m.forward_recurrent(q, k, v, gk, o, s);
      if (f == 2) m.forward(q, k, v, gk, o, s);
    };
    auto run_gv = [&](tensor_view<const float, 4> gv, tensor_view<float, 4> o) {
      if (f == 0) m.forward_chunked(a.q, a.k, a.v, a.gk, gv, o, a.state);
      if (f == 1) m.forward_recurrent(a.q, a.k, a.v, a.gk, gv, o, a.state);
      if (f == 2) m.forward(a.q, a.k, a.v, a.gk, gv, o, a.state);
    };
    REQUIRE_NOTHROW(run(a.q, a.k, a.v, a.gk, a.o, a.state));
    REQUIRE_NOTHROW(run_gv(a.gv, a.o));
    tensor<float, 4> k21({B, T, H, 21}), v3({B, T, 3, V}), o23({B, T, H, 23}), gk19({B, T, H, 19}),
        gv25({B, T, H, 25}), sT({B, H, V, K});
    REQUIRE_SHAPE_ERROR(run(a.q, k21, a.v, a.gk, a.o, a.state), w, "argument 'k'",
                        "expected shape [2, 5, 2, 20]", "got [2, 5, 2, 21]");
    REQUIRE_SHAPE_ERROR(run(a.q, a.k, v3, a.gk, a.o, a.state), w, "argument 'v'",
                        "expected shape [2, 5, 2, any]", "got [2, 5, 3, 24]");
    REQUIRE_SHAPE_ERROR(run(a.q, a.k, a.v, a.gk, o23, a.state), w, "argument 'o'",
                        "expected shape [2, 5, 2, 24]", "got [2, 5, 2, 23]");
    REQUIRE_SHAPE_ERROR(run(a.q, a.k, a.v, gk19, a.o, a.state), w, "argument 'gk'",
                        "expected shape [2, 5, 2, 20]", "got [2, 5, 2, 19]");
    REQUIRE_SHAPE_ERROR(run(a.q, a.k, a.v, a.gk, a.o, sT), w, "argument 'state'",
                        "expected shape [2, 2, 20, 24]", "got [2, 2, 24, 20]");
    REQUIRE_SHAPE_ERROR(run_gv(gv25, a.o), w, "argument 'gv'", "expected shape [2, 5, 2, 24]",
                        "got [2, 5, 2, 25]");
    REQUIRE_SHAPE_ERROR(run_gv(tensor_view<const float, 4>(a.gv.data(), {B, T, H, 0}), a.o), w,
                        "argument 'gv'", "must not be empty", "[2, 5, 2, 0]");
    REQUIRE_SHAPE_ERROR(run(reshaped<4>(a.q, {B, 0, H, K}), a.k, a.v, a.gk, a.o, a.state), w,
                        "argument 'q'", "must not be empty", "[2, 0, 2, 20]");
    // strided rows
    tensor<float, 4> wide({B, T, H, 2 * V});
    tensor_view<float, 4> o_str(wide.data(), {B, T, H, V}, {T * H * 2 * V, H * 2 * V, 2 * V, 2});
    REQUIRE_SHAPE_ERROR(run(a.q, a.k, a.v, a.gk, o_str, a.state), w, "argument 'o'",
                        "stride 1, got stride 2");
  }
}

TEST_CASE("hostile gla: step reports q1/k1/... with their [B,H,D] shapes", "[hostile][gla]") {
  qkv a;
  const gla<float> m;
  const std::string w = where("gla", "step");
  REQUIRE_NOTHROW(m.step(a.q1, a.k1, a.v1, a.gk1, a.o1, a.state));
  REQUIRE_NOTHROW(m.step(a.q1, a.k1, a.v1, a.gk1, a.gv1, a.o1, a.state));
  tensor<float, 3> k21({B, H, 21}), v3({B, 3, V}), o23({B, H, 23}), gk19({B, H, 19}),
      gv25({B, H, 25}), q3({3, H, K});
  REQUIRE_SHAPE_ERROR(m.step(a.q1, k21, a.v1, a.gk1, a.o1, a.state), w, "argument 'k1'",
                      "expected shape [2, 2, 20]", "got [2, 2, 21]");
  REQUIRE_SHAPE_ERROR(m.step(a.q1, a.k1, v3, a.gk1, a.o1, a.state), w, "argument 'v1'",
                      "expected shape [2, 2, any]", "got [2, 3, 24]");
  REQUIRE_SHAPE_ERROR(m.step(a.q1, a.k1, a.v1, a.gk1, o23, a.state), w, "argument 'o1'",
                      "expected shape [2, 2, 24]", "got [2, 2, 23]");
  REQUIRE_SHAPE_ERROR(m.step(a.q1, a.k1, a.v1, gk19, a.o1, a.state), w, "argument 'gk1'",
                      "expected shape [2, 2, 20]", "got [2, 2, 19]");
  REQUIRE_SHAPE_ERROR(m.step(a.q1, a.k1, a.v1, a.gk1, gv25, a.o1, a.state), w, "argument 'gv1'",
                      "expected shape [2, 2, 24]", "got [2, 2, 25]");
  REQUIRE_SHAPE_ERROR(m.step(q3, a.k1, a.v1, a.gk1, a.o1, a.state), w, "argument 'k1'",
                      "expected shape [3, 2, 20]", "got [2, 2, 20]");
  tensor<float, 4> s3({3, H, K, V});
  REQUIRE_SHAPE_ERROR(m.step(a.q1, a.k1, a.v1, a.gk1, a.o1, s3), w, "argument 'state'",
                      "expected shape [2, 2, 20, 24]", "got [3, 2, 20, 24]");
  REQUIRE_SHAPE_ERROR(m.step(reshaped<3>(a.q1, {B, 0, K}), a.k1, a.v1, a.gk1, a.o1, a.state), w,
                      "argument 'q1'", "must not be empty", "[2, 0, 20]");
}

TEST_CASE("hostile gla: options and make_state", "[hostile][gla]") {
  using O = gla<float>::options;
  REQUIRE_SHAPE_ERROR(gla<float>(O{.scale = fnan}), "seqmix::gla: ", "argument 'options.scale'",
                      "must be finite, got NaN");
  REQUIRE_SHAPE_ERROR(gla<float>(O{.scale = finf}), "seqmix::gla: ", "argument 'options.scale'",
                      "got +inf");
  REQUIRE_SHAPE_ERROR(gla<float>(O{.chunk_size = -3}),
                      "seqmix::gla: ", "argument 'options.chunk_size'", "must be > 0, got -3");
  REQUIRE_SHAPE_ERROR(gla<float>(O{.switch_over_t = -1}),
                      "seqmix::gla: ", "argument 'options.switch_over_t'", "must be >= 0",
                      "got -1");
  REQUIRE_SHAPE_ERROR(gla<float>::make_state(2, -1, 4, 4),
                      "seqmix::gla::make_state: ", "argument 'H'", "must be >= 1, got -1");
  REQUIRE_SHAPE_ERROR(gla<float>::make_state(2, 2, 4, 0),
                      "seqmix::gla::make_state: ", "argument 'V'", "got 0");
}

TEST_CASE("hostile gla: a log gate > 0 is rejected with its index and value", "[hostile][gla]") {
  qkv a;
  const gla<float> m;
  for (int f = 0; f < 3; ++f) {
    const std::string w = where("gla", forms[f]);
    INFO(w);
    auto run = [&](const gla<float>& mm, tensor_view<const float, 4> gk,
                   tensor_view<const float, 4> gv) {
      if (f == 0) mm.forward_chunked(a.q, a.k, a.v, gk, gv, a.o, a.state);
      if (f == 1) mm.forward_recurrent(a.q, a.k, a.v, gk, gv, a.o, a.state);
      if (f == 2) mm.forward(a.q, a.k, a.v, gk, gv, a.o, a.state);
    };
    auto gk = a.gk;
    gk.view()(1, 3, 1, 5) = 0.9f;  // alpha instead of log alpha
    REQUIRE_SHAPE_ERROR(run(m, gk, a.gv), w, "argument 'gk'", "got 0.899999976 at [1, 3, 1, 5]",
                        "[b, t, h, k]", "log(alpha)", "allow_gate_growth");
    gk.view()(1, 3, 1, 5) = fnan;
    REQUIRE_SHAPE_ERROR(run(m, gk, a.gv), w, "argument 'gk'", "got NaN at [1, 3, 1, 5]");
    gk.view()(1, 3, 1, 5) = finf;
    REQUIRE_SHAPE_ERROR(run(m, gk, a.gv), w, "argument 'gk'", "got +inf at [1, 3, 1, 5]");
    gk.view()(1, 3, 1, 5) = -finf;  // "forget everything" stays valid
    REQUIRE_NOTHROW(run(m, gk, a.gv));
    auto gv = a.gv;
    gv.view()(1, 4, 1, 23) = 1e-6f;  // the last element
    REQUIRE_SHAPE_ERROR(run(m, a.gk, gv), w, "argument 'gv'", "at [1, 4, 1, 23]", "[b, t, h, v]");
    // growth allowed: positive gates pass, NaN and +finf still do not
    const gla<float> grow(gla<float>::options{.allow_gate_growth = true});
    gk = a.gk;
    gk.view()(1, 3, 1, 5) = 0.9f;
    REQUIRE_NOTHROW(run(grow, gk, a.gv));
    gk.view()(1, 3, 1, 5) = finf;
    REQUIRE_SHAPE_ERROR(run(grow, gk, a.gv), w, "argument 'gk'", "must be finite or -inf",
                        "got +inf at [1, 3, 1, 5]");
    gk.view()(1, 3, 1, 5) = fnan;
    REQUIRE_SHAPE_ERROR(run(grow, gk, a.gv), w, "argument 'gk'", "got NaN at [1, 3, 1, 5]");
  }
  // a strided (row-contiguous) gate view is scanned too
  tensor<float, 4> big = gates<4>({B, T, 2 * H, K}, 30);
  tensor_view<const float, 4> gk_str(big.data(), {B, T, H, K}, {T * 2 * H * K, 2 * H * K, K, 1});
  big.view()(1, 2, 1, 19) = 0.5f;
  REQUIRE_SHAPE_ERROR(m.forward(a.q, a.k, a.v, gk_str, a.o, a.state),
                      "seqmix::gla::forward: ", "argument 'gk'", "got 0.5 at [1, 2, 1, 19]");
  // step
  const std::string w = where("gla", "step");
  auto gk1 = a.gk1;
  gk1.view()(1, 1, 5) = 0.9f;
  REQUIRE_SHAPE_ERROR(m.step(a.q1, a.k1, a.v1, gk1, a.o1, a.state), w, "argument 'gk1'",
                      "at [1, 1, 5]", "[b, h, k]", "log(alpha)");
  auto gv1 = a.gv1;
  gv1.view()(0, 1, 7) = fnan;
  REQUIRE_SHAPE_ERROR(m.step(a.q1, a.k1, a.v1, a.gk1, gv1, a.o1, a.state), w, "argument 'gv1'",
                      "got NaN at [0, 1, 7]");
}

TEST_CASE("hostile gla: outputs that share memory with inputs are rejected", "[hostile][gla]") {
  qkv a;
  const gla<float> m;
  // o1 = v1 (the reported case: V = 24 gave wrong columns 16..23)
  tensor_view<float, 3> o_on_v(a.v1.data(), {B, H, V});
  REQUIRE_SHAPE_ERROR(m.step(a.q1, a.k1, a.v1, a.gk1, o_on_v, a.state),
                      "seqmix::gla::step: ", "argument 'o1'",
                      "must not share memory with argument 'v1'", "384 bytes in common");
  // a state over the gates
  tensor<float, 4> pool({B, H, K, V});
  tensor_view<const float, 3> gk_in_state(pool.data() + 8, {B, H, K});
  REQUIRE_SHAPE_ERROR(m.step(a.q1, a.k1, a.v1, gk_in_state, a.o1, pool),
                      "seqmix::gla::step: ", "argument 'state'", "argument 'gk1'");
  for (int f = 0; f < 3; ++f) {
    const std::string w = where("gla", forms[f]);
    INFO(w);
    auto run = [&](tensor_view<const float, 4> v, tensor_view<float, 4> o,
                   tensor_view<float, 4> s) {
      if (f == 0) m.forward_chunked(a.q, a.k, v, a.gk, a.gv, o, s);
      if (f == 1) m.forward_recurrent(a.q, a.k, v, a.gk, a.gv, o, s);
      if (f == 2) m.forward(a.q, a.k, v, a.gk, a.gv, o, s);
    };
    tensor<float, 4> vo = randn<4>({B, T, H, V}, 40);
    REQUIRE_SHAPE_ERROR(run(vo, vo, a.state), w, "argument 'o'",
                        "must not share memory with argument 'v'");
    // partial overlap: o starts in the last row of v
    tensor<float, 5> pool2({2, B, T, H, V});
    tensor_view<float, 4> v2(pool2.data(), {B, T, H, V});
    tensor_view<float, 4> o2(pool2.data() + B * T * H * V - 4, {B, T, H, V});
    REQUIRE_SHAPE_ERROR(run(v2, o2, a.state), w, "argument 'o'", "argument 'v'",
                        "16 bytes in common");
    // o over the state
    tensor<float, 4> so({B, T, H, V});
    tensor_view<float, 4> s_on_o(so.data(), {B, H, K, V});
    REQUIRE_SHAPE_ERROR(run(a.v, so, s_on_o), w, "argument 'o'",
                        "must not share memory with argument 'state'");
    // gv as the output
    REQUIRE_SHAPE_ERROR(
        m.forward_recurrent(a.q, a.k, a.v, a.gk, a.gv,
                            tensor_view<float, 4>(a.gv.data(), {B, T, H, V}), a.state),
        "argument 'o'", "argument 'gv'");
  }
  // disjoint neighbours in one buffer pass
  tensor<float, 5> pool3({2, B, T, H, V});
  tensor_view<float, 4> v3(pool3.data(), {B, T, H, V});
  tensor_view<float, 4> o3(pool3.data() + B * T * H * V, {B, T, H, V});
  REQUIRE_NOTHROW(m.forward(a.q, a.k, v3, a.gk, o3, a.state));
}

// ---- simple GLA --------------------------------------------------------------------------------

TEST_CASE("hostile simple_gla: shapes, gates, options, aliasing per entry",
          "[hostile][simple_gla]") {
  qkv a;
  const simple_gla<float> m;
  for (int f = 0; f < 3; ++f) {
    const std::string w = where("simple_gla", forms[f]);
    INFO(w);
    auto run = [&](tensor_view<const float, 4> k, tensor_view<const float, 3> g,
                   tensor_view<float, 4> o) {
      if (f == 0) m.forward_chunked(a.q, k, a.v, g, o, a.state);
      if (f == 1) m.forward_recurrent(a.q, k, a.v, g, o, a.state);
      if (f == 2) m.forward(a.q, k, a.v, g, o, a.state);
    };
    REQUIRE_NOTHROW(run(a.k, a.g, a.o));
    tensor<float, 4> k21({B, T, H, 21});
    tensor<float, 3> g3({B, T, 3});
    REQUIRE_SHAPE_ERROR(run(k21, a.g, a.o), w, "argument 'k'", "expected shape [2, 5, 2, 20]",
                        "got [2, 5, 2, 21]");
    REQUIRE_SHAPE_ERROR(run(a.k, g3, a.o), w, "argument 'g'", "expected shape [2, 5, 2]",
                        "got [2, 5, 3]");
    auto g = a.g;
    g.view()(1, 4, 0) = 0.9f;
    REQUIRE_SHAPE_ERROR(run(a.k, g, a.o), w, "argument 'g'", "at [1, 4, 0]", "[b, t, h]",
                        "log(alpha)");
    g.view()(1, 4, 0) = fnan;
    REQUIRE_SHAPE_ERROR(run(a.k, g, a.o), w, "argument 'g'", "got NaN at [1, 4, 0]");
    g.view()(1, 4, 0) = -finf;
    REQUIRE_NOTHROW(run(a.k, g, a.o));
    REQUIRE_SHAPE_ERROR(run(a.k, a.g, tensor_view<float, 4>(a.v.data(), {B, T, H, V})), w,
                        "argument 'o'", "must not share memory with argument 'v'");
  }
  const std::string w = where("simple_gla", "step");
  tensor<float, 2> g3({B, 3});
  REQUIRE_SHAPE_ERROR(m.step(a.q1, a.k1, a.v1, g3, a.o1, a.state), w, "argument 'g1'",
                      "expected shape [2, 2]", "got [2, 3]");
  tensor<float, 3> k21({B, H, 21});
  REQUIRE_SHAPE_ERROR(m.step(a.q1, k21, a.v1, a.g1, a.o1, a.state), w, "argument 'k1'",
                      "expected shape [2, 2, 20]", "got [2, 2, 21]");
  auto g1 = a.g1;
  g1.view()(1, 1) = 0.5f;
  REQUIRE_SHAPE_ERROR(m.step(a.q1, a.k1, a.v1, g1, a.o1, a.state), w, "argument 'g1'",
                      "got 0.5 at [1, 1]", "[b, h]");
  REQUIRE_SHAPE_ERROR(
      m.step(a.q1, a.k1, a.v1, a.g1, tensor_view<float, 3>(a.v1.data(), {B, H, V}), a.state), w,
      "argument 'o1'", "argument 'v1'");
  const simple_gla<float> grow(simple_gla<float>::options{.allow_gate_growth = true});
  REQUIRE_NOTHROW(grow.step(a.q1, a.k1, a.v1, g1, a.o1, a.state));

  using O = simple_gla<float>::options;
  REQUIRE_SHAPE_ERROR(simple_gla<float>(O{.scale = fnan}),
                      "seqmix::simple_gla: ", "argument 'options.scale'", "NaN");
  REQUIRE_SHAPE_ERROR(simple_gla<float>(O{.scale = -finf}),
                      "seqmix::simple_gla: ", "argument 'options.scale'", "-inf");
  REQUIRE_SHAPE_ERROR(simple_gla<float>(O{.chunk_size = 0}),
                      "seqmix::simple_gla: ", "argument 'options.chunk_size'", "got 0");
  const O pos{.g_gamma = {-0.1f, 0.2f}}, nang{.g_gamma = {fnan, -0.1f}};
  REQUIRE_SHAPE_ERROR(simple_gla<float>(pos), "seqmix::simple_gla: ", "argument 'options.g_gamma'",
                      "got 0.200000003 at [1]");
  REQUIRE_SHAPE_ERROR(simple_gla<float>(nang), "seqmix::simple_gla: ", "argument 'options.g_gamma'",
                      "got NaN at [0]");
  const O kill{.g_gamma = {-finf, 0.f}}, growth{.g_gamma = {0.2f}, .allow_gate_growth = true};
  REQUIRE_NOTHROW(simple_gla<float>(kill));
  REQUIRE_NOTHROW(simple_gla<float>(growth));
  // constant-gate overloads
  const simple_gla<float> c(O{.g_gamma = {-0.1f, -0.2f, -0.3f}});
  REQUIRE_SHAPE_ERROR(c.forward_recurrent(a.q, a.k, a.v, a.o, a.state),
                      "seqmix::simple_gla::forward_recurrent: ", "argument 'options.g_gamma'",
                      "expected shape [2]", "got [3]");
  REQUIRE_SHAPE_ERROR(m.forward(a.q, a.k, a.v, a.o, a.state),
                      "seqmix::simple_gla::forward: ", "argument 'options.g_gamma'", "is empty");
  REQUIRE_SHAPE_ERROR(c.step(a.q1, a.k1, a.v1, a.g1, a.o1, a.state),
                      "seqmix::simple_gla::step: ", "argument 'g1'", "options::g_gamma is set");
  const simple_gla<float> c2(O{.g_gamma = {-0.1f, -0.2f}});
  REQUIRE_SHAPE_ERROR(
      c2.step(a.q1, a.k1, a.v1, tensor_view<float, 3>(a.q1.data(), {B, H, V}), a.state),
      "seqmix::simple_gla::step: ", "argument 'o1'", "argument 'q1'");
  REQUIRE_SHAPE_ERROR(simple_gla<float>::make_state(0, 1, 1, 1),
                      "seqmix::simple_gla::make_state: ", "argument 'B'", "got 0");
}

TEST_CASE("hostile simple_gla: decay helpers reject bad sizes with shape_error",
          "[hostile][simple_gla]") {
  REQUIRE_SHAPE_ERROR(seqmix::retention_g_gamma<float>(-1),
                      "seqmix::retention_g_gamma: ", "argument 'H'", "must be >= 1, got -1");
  REQUIRE_SHAPE_ERROR(seqmix::lightning_g_gamma_alibi<float>(6), "lightning_g_gamma_alibi",
                      "argument 'H'", "power of two", "got 6");
  REQUIRE_SHAPE_ERROR(seqmix::lightning_g_gamma_transnormer<float>(4, 5, 5),
                      "seqmix::lightning_g_gamma_transnormer: ", "argument 'layer'",
                      "[0, 5), got 5");
  REQUIRE_SHAPE_ERROR(seqmix::lightning_g_gamma_transnormer<float>(0, 0, 5), "argument 'H'",
                      "got 0");
}

// ---- linear attention ------------------------------------------------------------------------

TEST_CASE("hostile linear_attention: shapes, options, aliasing per entry",
          "[hostile][linear_attention]") {
  qkv a;
  const linear_attention<float> m;
  for (int f = 0; f < 3; ++f) {
    const std::string w = where("linear_attention", forms[f]);
    INFO(w);
    auto run = [&](tensor_view<const float, 4> v, tensor_view<float, 4> o,
                   tensor_view<float, 3> z) {
      if (f == 0) m.forward_chunked(a.q, a.k, v, o, a.state, z);
      if (f == 1) m.forward_recurrent(a.q, a.k, v, o, a.state, z);
      if (f == 2) m.forward(a.q, a.k, v, o, a.state, z);
    };
    REQUIRE_NOTHROW(run(a.v, a.o, a.z));
    tensor<float, 4> v3({B, T, 1, V});
    tensor<float, 3> z19({B, H, 19});
    // the heads of v must be those of q: the numbers are given
    REQUIRE_SHAPE_ERROR(run(v3, a.o, a.z), w, "argument 'v'", "expected shape [2, 5, 2, any]",
                        "got [2, 5, 1, 24]");
    REQUIRE_SHAPE_ERROR(run(a.v, a.o, z19), w, "argument 'z'", "expected shape [2, 2, 20]",
                        "got [2, 2, 19]");
    REQUIRE_SHAPE_ERROR(run(a.v, a.o, tensor_view<float, 3>(a.o.data(), {B, H, K})), w,
                        "argument 'o'", "must not share memory with argument 'z'");
    REQUIRE_SHAPE_ERROR(run(a.v, tensor_view<float, 4>(a.v.data(), {B, T, H, V}), a.z), w,
                        "argument 'o'", "argument 'v'");
  }
  const std::string w = where("linear_attention", "step");
  tensor<float, 3> o23({B, H, 23});
  REQUIRE_SHAPE_ERROR(m.step(a.q1, a.k1, a.v1, o23, a.state), w, "argument 'o1'",
                      "expected shape [2, 2, 24]", "got [2, 2, 23]");
  REQUIRE_SHAPE_ERROR(
      m.step(a.q1, a.k1, a.v1, tensor_view<float, 3>(a.q1.data(), {B, H, V}), a.state), w,
      "argument 'o1'", "argument 'q1'");
  REQUIRE_SHAPE_ERROR(
      m.step(a.q1, a.k1, a.v1, a.o1, a.state, tensor_view<float, 3>(a.state.data(), {B, H, K})), w,
      "argument 'state'", "argument 'z'");
  using O = linear_attention<float>::options;
  REQUIRE_SHAPE_ERROR(linear_attention<float>(O{.scale = fnan}),
                      "seqmix::linear_attention: ", "argument 'options.scale'", "NaN");
  REQUIRE_SHAPE_ERROR(linear_attention<float>(O{.scale = finf}), "argument 'options.scale'",
                      "+inf");
  REQUIRE_SHAPE_ERROR(linear_attention<float>::make_normaliser_state(1, 1, -5),
                      "seqmix::linear_attention::make_normaliser_state: ", "argument 'K'",
                      "got -5");
  // packed sequences
  const std::vector<index_t> cu{0, 2, 5};
  REQUIRE_SHAPE_ERROR(m.forward(a.q, a.k, a.v, a.o, a.state, cu),
                      "seqmix::linear_attention::forward: ", "argument 'cu_seqlens'",
                      "B == 1, got B = 2");
}

// ---- Mamba2 ----------------------------------------------------------------------------------

namespace {
constexpr index_t P = 12, G = 1, N = 8;
struct mamba_in {
  tensor<float, 4> x = randn<4>({B, T, H, P}, 50), Bm = randn<4>({B, T, G, N}, 51),
                   Cm = randn<4>({B, T, G, N}, 52), y{{B, T, H, P}};
  tensor<float, 3> dt = randn<3>({B, T, H}, 53);
  tensor<float, 1> A_log = randn<1>({H}, 54), D = randn<1>({H}, 55), dt_bias = randn<1>({H}, 56);
  tensor<float, 4> state{{B, H, N, P}};
  tensor<float, 3> x1 = randn<3>({B, H, P}, 57), B1 = randn<3>({B, G, N}, 58),
                   C1 = randn<3>({B, G, N}, 59), y1{{B, H, P}};
  tensor<float, 2> dt1 = randn<2>({B, H}, 60);
};
}  // namespace

TEST_CASE("hostile mamba2_ssd: messages use Mamba2's names, never the engine's roles",
          "[hostile][mamba2]") {
  mamba_in a;
  const mamba2_ssd<float> m;
  for (int f = 0; f < 3; ++f) {
    const std::string w = where("mamba2_ssd", forms[f]);
    INFO(w);
    auto run = [&](tensor_view<const float, 4> x, tensor_view<const float, 3> dt,
                   tensor_view<const float, 4> Bm, tensor_view<const float, 4> Cm,
                   tensor_view<float, 4> y) {
      if (f == 0) m.forward_chunked(x, dt, a.A_log, Bm, Cm, a.D, a.dt_bias, y, a.state);
      if (f == 1) m.forward_recurrent(x, dt, a.A_log, Bm, Cm, a.D, a.dt_bias, y, a.state);
      if (f == 2) m.forward(x, dt, a.A_log, Bm, Cm, a.D, a.dt_bias, y, a.state);
    };
    REQUIRE_NOTHROW(run(a.x, a.dt, a.Bm, a.Cm, a.y));
    tensor<float, 4> x4({B, 4, H, P}), y11({B, T, H, 11}), B9({B, T, G, 9}), C9({B, T, G, 9}),
        B3({B, T, 3, N});
    tensor<float, 3> dt3({B, T, 3});
    REQUIRE_SHAPE_ERROR(run(x4, a.dt, a.Bm, a.Cm, a.y), w, "argument 'Bm'",
                        "expected shape [2, 4, any, any]", "got [2, 5, 1, 8]");
    REQUIRE_SHAPE_ERROR(run(a.x, a.dt, a.Bm, a.Cm, y11), w, "argument 'y'",
                        "expected shape [2, 5, 2, 12]", "got [2, 5, 2, 11]");
    REQUIRE_SHAPE_ERROR(run(a.x, a.dt, B9, a.Cm, a.y), w, "argument 'Cm'",
                        "expected shape [2, 5, 1, 9]", "got [2, 5, 1, 8]");
    REQUIRE_SHAPE_ERROR(run(a.x, a.dt, a.Bm, C9, a.y), w, "argument 'Cm'",
                        "expected shape [2, 5, 1, 8]", "got [2, 5, 1, 9]");
    REQUIRE_SHAPE_ERROR(run(a.x, a.dt, B3, B3, a.y), w, "argument 'Bm'",
                        "groups of Bm (3) must divide the heads of x (2)");
    REQUIRE_SHAPE_ERROR(run(a.x, dt3, a.Bm, a.Cm, a.y), w, "argument 'dt'",
                        "expected shape [2, 5, 2]", "got [2, 5, 3]");
    auto dt = a.dt;
    dt.view()(1, 2, 1) = fnan;
    REQUIRE_SHAPE_ERROR(run(a.x, dt, a.Bm, a.Cm, a.y), w, "argument 'dt'",
                        "must be finite, got NaN at [1, 2, 1]");
    // y = x in place
    REQUIRE_SHAPE_ERROR(run(a.x, a.dt, a.Bm, a.Cm, tensor_view<float, 4>(a.x.data(), {B, T, H, P})),
                        w, "argument 'y'", "must not share memory with argument 'x'");
  }
  // the per-head vectors
  tensor<float, 1> h3({3});
  REQUIRE_SHAPE_ERROR(m.forward(a.x, a.dt, h3, a.Bm, a.Cm, a.D, a.dt_bias, a.y, a.state),
                      "seqmix::mamba2_ssd::forward: ", "argument 'A_log'", "expected shape [2]",
                      "got [3]");
  REQUIRE_SHAPE_ERROR(m.forward(a.x, a.dt, a.A_log, a.Bm, a.Cm, h3, a.dt_bias, a.y, a.state),
                      "argument 'D'", "got [3]");
  auto A = a.A_log;
  A[1] = finf;
  REQUIRE_SHAPE_ERROR(m.forward(a.x, a.dt, A, a.Bm, a.Cm, a.D, a.dt_bias, a.y, a.state),
                      "argument 'A_log'", "got +inf at [1]");
  auto bias = a.dt_bias;
  bias[0] = fnan;
  REQUIRE_SHAPE_ERROR(m.forward(a.x, a.dt, a.A_log, a.Bm, a.Cm, a.D, bias, a.y, a.state),
                      "argument 'dt_bias'", "got NaN at [0]");
  tensor<float, 4> spn({B, H, P, N});
  REQUIRE_SHAPE_ERROR(m.forward(a.x, a.dt, a.A_log, a.Bm, a.Cm, a.D, a.dt_bias, a.y, spn),
                      "argument 'state'", "expected shape [2, 2, 8, 12]", "got [2, 2, 12, 8]");

  // step
  const std::string w = where("mamba2_ssd", "step");
  REQUIRE_NOTHROW(m.step(a.x1, a.dt1, a.A_log, a.B1, a.C1, a.D, a.dt_bias, a.y1, a.state));
  tensor<float, 3> y11({B, H, 11}), C9({B, G, 9});
  tensor<float, 2> dt3({B, 3});
  REQUIRE_SHAPE_ERROR(m.step(a.x1, a.dt1, a.A_log, a.B1, a.C1, a.D, a.dt_bias, y11, a.state), w,
                      "argument 'y1'", "expected shape [2, 2, 12]", "got [2, 2, 11]");
  REQUIRE_SHAPE_ERROR(m.step(a.x1, a.dt1, a.A_log, a.B1, C9, a.D, a.dt_bias, a.y1, a.state), w,
                      "argument 'C1'", "expected shape [2, 1, 8]", "got [2, 1, 9]");
  REQUIRE_SHAPE_ERROR(m.step(a.x1, dt3, a.A_log, a.B1, a.C1, a.D, a.dt_bias, a.y1, a.state), w,
                      "argument 'dt1'", "expected shape [2, 2]", "got [2, 3]");
  REQUIRE_SHAPE_ERROR(m.step(a.x1, a.dt1, a.A_log, a.B1, a.C1, a.D, a.dt_bias,
                             tensor_view<float, 3>(a.x1.data(), {B, H, P}), a.state),
                      w, "argument 'y1'", "must not share memory with argument 'x1'");
  tensor<float, 4> pool({B, H, N, P});
  tensor_view<float, 3> y_in_state(pool.data() + 5, {B, H, P});
  REQUIRE_SHAPE_ERROR(m.step(a.x1, a.dt1, a.A_log, a.B1, a.C1, a.D, a.dt_bias, y_in_state, pool), w,
                      "argument 'y1'", "must not share memory with argument 'state'");

  // options
  using O = mamba2_ssd<float>::options;
  REQUIRE_SHAPE_ERROR(mamba2_ssd<float>(O{.dt_max = fnan}),
                      "seqmix::mamba2_ssd: ", "argument 'options.dt_max'", "got NaN");
  REQUIRE_SHAPE_ERROR(mamba2_ssd<float>(O{.dt_min = fnan}), "argument 'options.dt_min'",
                      "must be finite and >= 0, got NaN");
  REQUIRE_SHAPE_ERROR(mamba2_ssd<float>(O{.dt_min = -1.f}), "argument 'options.dt_min'", "got -1");
  const O inverted{.dt_min = 0.5f, .dt_max = 0.25f};
  REQUIRE_SHAPE_ERROR(mamba2_ssd<float>(inverted), "argument 'options.dt_max'",
                      "must be >= options.dt_min (0.5)", "got 0.25");
  REQUIRE_SHAPE_ERROR(mamba2_ssd<float>(O{.chunk_size = 0}), "argument 'options.chunk_size'",
                      "got 0");
  const O unbounded{.dt_min = 0.f, .dt_max = finf};
  REQUIRE_NOTHROW(mamba2_ssd<float>(unbounded));
  REQUIRE_SHAPE_ERROR(mamba2_ssd<float>::make_state(1, 2, -8, 4),
                      "seqmix::mamba2_ssd::make_state: ", "argument 'N'", "got -8");
}

TEST_CASE("hostile gated mixers: packed sequences (cu_seqlens) per entry",
          "[hostile][gla][mamba2][simple_gla]") {
  qkv a;
  const std::vector<index_t> cu{0, 2, 5}, cu_bad{0, 3, 2, 5};
  auto one = [](auto& t) { return t.view().template slice<0>(0, 1); };
  const gla<float> m;
  const simple_gla<float> sg;
  tensor<float, 4> s2({2, H, K, V}), s3({3, H, K, V});
  for (int f = 0; f < 3; ++f) {
    const std::string w = where("gla", forms[f]);
    INFO(w);
    auto run = [&](tensor_view<float, 4> o, tensor_view<float, 4> s,
                   std::span<const index_t> offsets) {
      if (f == 0) m.forward_chunked(one(a.q), one(a.k), one(a.v), one(a.gk), o, s, offsets);
      if (f == 1) m.forward_recurrent(one(a.q), one(a.k), one(a.v), one(a.gk), o, s, offsets);
      if (f == 2) m.forward(one(a.q), one(a.k), one(a.v), one(a.gk), o, s, offsets);
    };
    REQUIRE_NOTHROW(run(one(a.o), s2, cu));
    REQUIRE_SHAPE_ERROR(run(one(a.o), s3, cu), w, "argument 'state'",
                        "expected shape [2, 2, 20, 24]", "got [3, 2, 20, 24]");
    REQUIRE_SHAPE_ERROR(run(one(a.o), s3, cu_bad), w, "argument 'cu_seqlens'",
                        "offsets must be non-decreasing (offset 2 is 2 < 3)");
    REQUIRE_SHAPE_ERROR(run(tensor_view<float, 4>(a.v.data(), one(a.o).shape()), s2, cu), w,
                        "argument 'o'", "must not share memory with argument 'v'");
    const std::string ws = where("simple_gla", forms[f]);
    auto g = a.g;
    g.view()(0, 4, 1) = 3.f;
    auto run_sg = [&](std::span<const index_t> offsets) {
      if (f == 0) sg.forward_chunked(one(a.q), one(a.k), one(a.v), one(g), one(a.o), s2, offsets);
      if (f == 1) sg.forward_recurrent(one(a.q), one(a.k), one(a.v), one(g), one(a.o), s2, offsets);
      if (f == 2) sg.forward(one(a.q), one(a.k), one(a.v), one(g), one(a.o), s2, offsets);
    };
    REQUIRE_SHAPE_ERROR(run_sg(cu), ws, "argument 'g'", "got 3 at [0, 4, 1]");
  }
  mamba_in b;
  const mamba2_ssd<float> mm;
  tensor<float, 4> ms2({2, H, N, P}), ms1({1, H, N, P});
  for (int f = 0; f < 3; ++f) {
    const std::string w = where("mamba2_ssd", forms[f]);
    INFO(w);
    auto run = [&](tensor_view<float, 4> s) {
      if (f == 0)
        mm.forward_chunked(one(b.x), one(b.dt), b.A_log, one(b.Bm), one(b.Cm), b.D, b.dt_bias,
                           one(b.y), s, cu);
      if (f == 1)
        mm.forward_recurrent(one(b.x), one(b.dt), b.A_log, one(b.Bm), one(b.Cm), b.D, b.dt_bias,
                             one(b.y), s, cu);
      if (f == 2)
        mm.forward(one(b.x), one(b.dt), b.A_log, one(b.Bm), one(b.Cm), b.D, b.dt_bias, one(b.y), s,
                   cu);
    };
    REQUIRE_NOTHROW(run(ms2));
    REQUIRE_SHAPE_ERROR(run(ms1), w, "argument 'state'", "expected shape [2, 2, 8, 12]",
                        "got [1, 2, 8, 12]");
    REQUIRE_SHAPE_ERROR(mm.forward(b.x, b.dt, b.A_log, b.Bm, b.Cm, b.D, b.dt_bias, b.y, ms2, cu),
                        "argument 'cu_seqlens'", "B == 1, got B = 2");
  }
}

TEST_CASE("hostile gated mixers: outputs whose elements overlap themselves are rejected",
          "[hostile][gla][mamba2][linear_attention]") {
  qkv a;
  const gla<float> m;
  tensor<float, 2> row({B, V});
  // o1 broadcast over the heads (stride 0): the heads would overwrite each other
  tensor_view<float, 3> o_bcast(row.data(), {B, H, V}, {V, 0, 1});
  REQUIRE_SHAPE_ERROR(m.step(a.q1, a.k1, a.v1, a.gk1, o_bcast, a.state),
                      "seqmix::gla::step: ", "argument 'o1'", "expected non-overlapping strides",
                      "got strides [24, 0, 1] for shape [2, 2, 24]");
  // a state whose rows overlap (row stride 8 < V = 24)
  tensor<float, 1> flat({B * H * K * V});
  tensor_view<float, 4> s_overlap(flat.data(), {B, H, K, V}, {H * K * V, K * V, 8, 1});
  REQUIRE_SHAPE_ERROR(m.forward(a.q, a.k, a.v, a.gk, a.o, s_overlap),
                      "seqmix::gla::forward: ", "argument 'state'", "got strides [960, 480, 8, 1]");
  const linear_attention<float> la;
  tensor_view<float, 3> z_bcast(flat.data(), {B, H, K}, {0, K, 1});
  REQUIRE_SHAPE_ERROR(la.forward_recurrent(a.q, a.k, a.v, a.o, a.state, z_bcast),
                      "seqmix::linear_attention::forward_recurrent: ", "argument 'z'",
                      "got strides [0, 20, 1]");
  mamba_in b;
  const mamba2_ssd<float> mm;
  tensor<float, 4> yb({B, T, 1, P});
  tensor_view<float, 4> y_bcast(yb.data(), {B, T, H, P}, {T * P, P, 0, 1});
  REQUIRE_SHAPE_ERROR(mm.forward(b.x, b.dt, b.A_log, b.Bm, b.Cm, b.D, b.dt_bias, y_bcast, b.state),
                      "seqmix::mamba2_ssd::forward: ", "argument 'y'",
                      "got strides [60, 12, 0, 1]");
}
