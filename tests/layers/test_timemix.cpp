// SPDX-License-Identifier: MIT
// fla's time-mix layers (issue 13): GatedLinearAttention (layers/gla.hpp) and RWKV7Attention
// (layers/rwkv7.hpp) on random weights written under fla's names, against the double
// references (reference/layers.hpp); prefill then steps == one prefill; state-index stepping ==
// separate caches; packed == separate; snapshot / restore; allocation-free steps; bf16-stored
// weights; missing / mis-shaped / mis-typed weights. Small shapes (the sanitizer pass runs it at
// -O0).
#include <cmath>
#include <filesystem>
#include <random>
#include <string>
#include <unistd.h>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>

#include <seqmix/core/io/checkpoint.hpp>
#include <seqmix/core/safetensors.hpp>
#include <seqmix/layers/gla.hpp>
#include <seqmix/reference/layers.hpp>

#include "alloc_counter.hpp"
#include "testing.hpp"

namespace {

using namespace seqmix;
using seqmix::testing::compare;

/// One tensor of a layer: fla's name, shape, values (row-major).
struct named_tensor {
  std::string name;
  std::vector<index_t> shape;
  std::vector<float> data;
};
using weight_set = std::vector<named_tensor>;

void add(weight_set& w, std::mt19937_64& rng, const std::string& name, std::vector<index_t> shape,
         double stddev, double mean = 0) {
  index_t n = 1;
  for (index_t e : shape) n *= e;
  std::normal_distribution<double> d(mean, stddev);
  std::vector<float> v(static_cast<std::size_t>(n));
  for (auto& e : v) e = static_cast<float>(d(rng));
  w.push_back({name, std::move(shape), std::move(v)});
}
void add_matrix(weight_set& w, std::mt19937_64& rng, const std::string& name, index_t out,
                index_t in) {
  add(w, rng, name, {out, in}, 1.0 / std::sqrt(static_cast<double>(in)));
}

float bf16_round(float x) {
  return to_float(bf16_from_float(x));
}

/// Writes `w` under prefix "L." (matrices as `type`, the rest f32), optionally dropping one
/// tensor, flattening one (a wrong shape) or storing one as F64 (a wrong dtype).
std::string write_set(const weight_set& w, dtype type, const std::string& stem,
                      const std::string& drop = {}, const std::string& reshape = {},
                      const std::string& retype = {}) {
  const std::string path =
      (std::filesystem::temp_directory_path() /
       ("seqmix_timemix_" + stem + "_" + std::to_string(::getpid()) + ".safetensors"))
          .string();
  safetensors_writer wr;
  for (const auto& t : w) {
    if (t.name == drop) continue;
    std::vector<index_t> shape = t.shape;
    if (t.name == reshape) shape = {static_cast<index_t>(t.data.size())};
    const dtype ty = t.name == retype ? dtype::f64 : (shape.size() == 2 ? type : dtype::f32);
    tensor<float, 1> flat({static_cast<index_t>(t.data.size())});
    std::copy(t.data.begin(), t.data.end(), flat.data());
    const std::string n = "L." + t.name;
    if (shape.size() == 1) wr.add_as(n, tensor_view<const float, 1>(flat.view()), ty);
    if (shape.size() == 2)
      wr.add_as(n, tensor_view<const float, 2>(flat.view().reshape(shape_t<2>{shape[0], shape[1]})),
                ty);
    if (shape.size() == 3)
      wr.add_as(n,
                tensor_view<const float, 3>(
                    flat.view().reshape(shape_t<3>{shape[0], shape[1], shape[2]})),
                ty);
  }
  wr.save(path);
  return path;
}

/// The same weights in double for the references (matrices rounded to bf16 first if asked).
reference::named_weights<double> ref_weights(const weight_set& w, bool bf16_matrices = false) {
  reference::named_weights<double> out;
  for (const auto& t : w) {
    std::vector<double> v(t.data.size());
    const bool round = bf16_matrices && t.shape.size() == 2;
    for (std::size_t i = 0; i < v.size(); ++i) v[i] = round ? bf16_round(t.data[i]) : t.data[i];
    out[t.name] = std::move(v);
  }
  return out;
}

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "no error";
}

void check_rel(const std::string& what, const testing::comparison& c, double limit) {
  INFO(what << ": " << c.report);
  UNSCOPED_INFO(what << " rel_rms " << c.rel_rms);
  CHECK(c.rel_rms <= limit);
}

/// Row b of x [B, T, D] as [T, D] doubles.
tensor<double, 2> row_double(const tensor<float, 3>& x, index_t b, index_t t0, index_t t1) {
  tensor<double, 2> out({t1 - t0, x.extent(2)});
  for (index_t t = t0; t < t1; ++t)
    for (index_t d = 0; d < x.extent(2); ++d) out(t - t0, d) = x(b, t, d);
  return out;
}

// ---------------------------------------------------------------------------------------------
// GLA

layers::gla_layer_config gla_cfg() {
  layers::gla_layer_config c;
  c.hidden = 32;
  c.heads = 4;
  c.kv_heads = 2;  // GQA: 2 query heads per kv head
  c.expand_k = 0.5;
  c.expand_v = 1.0;
  c.use_short_conv = true;
  c.conv_size = 4;
  c.conv_bias = true;
  c.gate_low_rank_dim = 8;
  c.clamp_min = -0.05f;
  c.chunk_size = 8;
  c.switch_over_t = 1;  // chunked prefill
  return c;
}

weight_set gla_weights(const layers::gla_layer_config& c, std::uint64_t salt) {
  auto rng = testing::make_rng(salt);
  const index_t D = c.hidden, H = c.heads, HKV = c.kv_heads ? c.kv_heads : c.heads;
  const index_t dk = static_cast<index_t>(static_cast<double>(D) * c.expand_k) / H;
  const index_t dv = static_cast<index_t>(static_cast<double>(D) * c.expand_v) / H;
  const index_t r = c.gate_low_rank_dim;
  weight_set w;
  add_matrix(w, rng, "q_proj.weight", H * dk, D);
  add_matrix(w, rng, "k_proj.weight", HKV * dk, D);
  add_matrix(w, rng, "v_proj.weight", HKV * dv, D);
  if (c.use_output_gate) add_matrix(w, rng, "g_proj.weight", H * dv, D);
  add_matrix(w, rng, "gk_proj.0.weight", r, D);
  add_matrix(w, rng, "gk_proj.1.weight", HKV * dk, r);
  add(w, rng, "gk_proj.1.bias", {HKV * dk}, 1.0, -1.0);  // logsigmoid / 16 in about -0.1 .. 0
  if (c.use_short_conv) {
    const index_t widths[3] = {H * dk, HKV * dk, HKV * dv};
    const char* names[3] = {"q_conv1d", "k_conv1d", "v_conv1d"};
    for (int i = 0; i < 3; ++i) {
      add(w, rng, std::string(names[i]) + ".weight", {widths[i], 1, c.conv_size}, 0.5);
      if (c.conv_bias) add(w, rng, std::string(names[i]) + ".bias", {widths[i]}, 0.1);
    }
  }
  if (c.elementwise_affine) {
    const bool fused = c.gate_fn == "swish" && c.fuse_norm && c.use_output_gate;
    add(w, rng, fused ? "g_norm_swish_gate.weight" : "g_norm.weight", {dv}, 0.1, 1.0);
  }
  add_matrix(w, rng, "o_proj.weight", D, H * dv);
  return w;
}

/// The GLA reference over rows of x [B, T, D] from zero caches; states [B, H, dk, dv] out.
tensor<double, 3> gla_ref(const reference::named_weights<double>& w,
                          const layers::gla_layer_config& c, const layers::gla_layer& l,
                          const tensor<float, 3>& x, tensor<double, 4>& states) {
  const index_t B = x.extent(0), T = x.extent(1), D = x.extent(2);
  const auto sd = l.state_dims();
  states = tensor<double, 4>({B, sd[0], sd[1], sd[2]});
  tensor<double, 3> y({B, T, D});
  for (index_t b = 0; b < B; ++b) {
    tensor<double, 2> conv({std::max<index_t>(l.conv_rows(), 1), l.conv_channels()});
    const auto xb = row_double(x, b, 0, T);
    const auto yb =
        reference::gla_layer<double>(w, c, xb.view(), states.view().select(0, b), conv.view());
    std::copy(yb.data(), yb.data() + yb.size(), y.data() + b * T * D);
  }
  return y;
}

struct gla_case {
  std::string name;
  layers::gla_layer_config cfg;
};
std::vector<gla_case> gla_cases() {
  std::vector<gla_case> out;
  out.push_back({"GQA, short convs with bias, clamp_min, fused norm, chunked", gla_cfg()});
  auto c = gla_cfg();
  c.kv_heads = 0;
  c.use_short_conv = false;
  c.clamp_min.reset();
  c.fuse_norm = false;
  c.gate_fn = "sigmoid";
  c.switch_over_t.reset();  // recurrent prefill
  c.gate_logit_normalizer = 8;
  out.push_back({"MHA, no convs, g_norm + sigmoid gate, recurrent", c});
  c = gla_cfg();
  c.use_output_gate = false;
  c.elementwise_affine = false;
  c.expand_k = 1.0;
  out.push_back({"no output gate, no norm weight, expand_k 1", c});
  return out;
}

}  // namespace

TEST_CASE("gla layer == the double reference (fla's GatedLinearAttention)", "[layers][timemix]") {
  for (const auto& tc : gla_cases()) {
    INFO(tc.name);
    const auto ws = gla_weights(tc.cfg, 1);
    const std::string path = write_set(ws, dtype::f32, "gla_ref");
    auto layer = layers::gla_layer::load(checkpoint::open(path), "L.", tc.cfg);
    std::filesystem::remove(path);
    auto rng = testing::make_rng(2);
    const index_t B = 2, T = 27, D = tc.cfg.hidden;
    const auto x = testing::random_normal<float, 3>({B, T, D}, rng);
    auto cache = layer.make_cache(B);
    const auto y = layer.forward(x.view(), cache);
    tensor<double, 4> states;
    const auto yr = gla_ref(ref_weights(ws), tc.cfg, layer, x, states);
    check_rel(tc.name + " y", compare(yr, y), 1e-5);
    check_rel(tc.name + " state", compare(states, cache.state()), 1e-5);
    CHECK(cache.length(0) == T);
  }
}

namespace {

template <class Layer>
tensor<float, 3> prefill(Layer& l, const tensor<float, 3>& x, typename Layer::cache_type& c) {
  tensor<float, 3> y(x.shape());
  l.forward(x.view(), y.view(), c);
  return y;
}

/// Prefill in parts then steps == one prefill; packed == separate; snapshot / restore; warm
/// steps allocate nothing; stepping cache rows {2, 0} of 3 == separate caches.
template <class Layer>
void cache_properties(Layer& layer, index_t D) {
  auto rng = testing::make_rng(5);
  const index_t B = 2, T = 21;
  const auto x = testing::random_normal<float, 3>({B, T, D}, rng);
  {
    INFO("prefill in parts, then steps == one prefill");
    auto c_all = layer.make_cache(B);
    const auto y_all = prefill(layer, x, c_all);
    auto c = layer.make_cache(B);
    tensor<float, 3> y(x.shape());
    layer.forward(x.view().slice(1, 0, 9), y.view().slice(1, 0, 9), c);
    layer.forward(x.view().slice(1, 9, 15), y.view().slice(1, 9, 15), c);
    for (index_t t = 15; t < T; ++t) {
      tensor<float, 2> x1({B, D}), y1({B, D});
      for (index_t b = 0; b < B; ++b)
        for (index_t d = 0; d < D; ++d) x1(b, d) = x(b, t, d);
      layer.step(x1.view(), y1.view(), c);
      for (index_t b = 0; b < B; ++b)
        for (index_t d = 0; d < D; ++d) y(b, t, d) = y1(b, d);
    }
    check_rel("parts + steps vs one prefill", compare(y_all, y), 1e-5);
    check_rel("state", compare(c_all.state(), c.state()), 1e-5);
    check_rel("conv window", compare(c_all.conv(), c.conv()), 1e-6);  // GEMMs of other M
  }
  {
    INFO("packed sequences continuing their caches == each alone");
    const index_t N = 3;
    const auto hist = testing::random_normal<float, 3>({N, 4, D}, rng);
    const std::vector<index_t> cu{0, 7, 8, 20};
    const auto xp = testing::random_normal<float, 3>({1, 20, D}, rng);
    auto c = layer.make_cache(N);
    prefill(layer, hist, c);
    tensor<float, 3> yp({1, 20, D});
    layer.forward(xp.view(), yp.view(), c, cu);
    for (index_t n = 0; n < N; ++n) {
      auto cn = layer.make_cache(1);
      tensor<float, 3> hn({1, 4, D});
      std::copy_n(hist.data() + n * 4 * D, 4 * D, hn.data());
      prefill(layer, hn, cn);
      const index_t L = cu[std::size_t(n) + 1] - cu[std::size_t(n)];
      tensor<float, 3> xn({1, L, D});
      std::copy_n(xp.data() + cu[std::size_t(n)] * D, L * D, xn.data());
      const auto yn = prefill(layer, xn, cn);
      check_rel("packed sequence " + std::to_string(n),
                compare(tensor_view<const float, 3>(yn.view()),
                        tensor_view<const float, 3>(
                            yp.view().slice(1, cu[std::size_t(n)], cu[std::size_t(n) + 1]))),
                1e-5);
      check_rel("packed state " + std::to_string(n),
                compare(tensor_view<const float, 3>(cn.state().view().select(0, 0)),
                        tensor_view<const float, 3>(c.state().view().select(0, n))),
                1e-5);
      CHECK(c.length(n) == 4 + L);
    }
  }
  {
    INFO("snapshot / restore; warm steps allocate nothing");
    auto c = layer.make_cache(B);
    prefill(layer, x, c);
    const auto snap = c.snapshot();
    tensor<float, 2> x1({B, D}), y1({B, D}), y2({B, D});
    for (index_t i = 0; i < B * D; ++i) x1[i] = static_cast<float>(i % 7) * 0.1f;
    layer.step(x1.view(), y1.view(), c);
    {
      testing::allocation_scope scope;
      for (int i = 0; i < 3; ++i) layer.step(x1.view(), y2.view(), c);
      CHECK(scope.stats().count == 0);
    }
    c.restore(snap);
    layer.step(x1.view(), y2.view(), c);
    CHECK(testing::bitwise_equal(y1, y2));
  }
  {
    INFO("stepping cache rows {2, 0} of 3 == separate caches");
    const auto hist = testing::random_normal<float, 3>({3, 6, D}, rng);
    auto c = layer.make_cache(3);
    prefill(layer, hist, c);
    std::vector<typename Layer::cache_type> alone;
    for (index_t n = 0; n < 3; ++n) {
      alone.push_back(layer.make_cache(1));
      tensor<float, 3> hn({1, 6, D});
      std::copy_n(hist.data() + n * 6 * D, 6 * D, hn.data());
      prefill(layer, hn, alone.back());
    }
    const auto before = c.snapshot();
    const std::vector<index_t> rows{2, 0};
    for (int s = 0; s < 3; ++s) {
      const auto xs = testing::random_normal<float, 2>({2, D}, rng);
      tensor<float, 2> ys({2, D});
      layer.step(xs.view(), ys.view(), c, rows);
      if (s == 0) {
        const auto mid = c.snapshot();
        tensor<float, 2> yw({2, D});
        {
          testing::allocation_scope scope;
          layer.step(xs.view(), yw.view(), c, rows);  // warm: no allocation
          CHECK(scope.stats().count == 0);
        }
        c.restore(mid);
      }
      for (std::size_t i = 0; i < 2; ++i) {
        tensor<float, 2> x1({1, D}), y1({1, D}), yi({1, D});
        std::copy_n(xs.data() + index_t(i) * D, D, x1.data());
        layer.step(x1.view(), y1.view(), alone[std::size_t(rows[i])]);
        std::copy_n(ys.data() + index_t(i) * D, D, yi.data());
        check_rel("row step", compare(y1, yi), 1e-5);
      }
    }
    CHECK(compare(tensor_view<const float, 2>(before.conv().view().select(0, 1)),
                  tensor_view<const float, 2>(c.conv().view().select(0, 1)))
              .max_abs == 0);
    CHECK(compare(tensor_view<const float, 3>(before.state().view().select(0, 1)),
                  tensor_view<const float, 3>(c.state().view().select(0, 1)))
              .max_abs == 0);
    for (index_t n : {0, 2})
      check_rel(
          "row state",
          compare(tensor_view<const float, 3>(alone[std::size_t(n)].state().view().select(0, 0)),
                  tensor_view<const float, 3>(c.state().view().select(0, n))),
          1e-5);
    tensor<float, 2> x2({2, D}), y2({2, D});
    CHECK_THAT(error_of([&] {
                 layer.step(x2.view(), y2.view(), c, std::vector<index_t>{1, 1});
               }),
               Catch::Contains("'rows'"));
  }
}

}  // namespace

TEST_CASE("gla layer: parts + steps, packed, snapshot, rows, no allocation", "[layers][timemix]") {
  for (const auto& tc : gla_cases()) {
    INFO(tc.name);
    const auto ws = gla_weights(tc.cfg, 3);
    const std::string path = write_set(ws, dtype::f32, "gla_cache");
    auto layer = layers::gla_layer::load(checkpoint::open(path), "L.", tc.cfg);
    std::filesystem::remove(path);
    cache_properties(layer, tc.cfg.hidden);
  }
}

TEST_CASE("gla layer: bf16-stored weights, bad weights, refused options", "[layers][timemix]") {
  const auto cfg = gla_cfg();
  const auto ws = gla_weights(cfg, 4);
  auto rng = testing::make_rng(6);
  const auto x = testing::random_normal<float, 3>({2, 13, cfg.hidden}, rng);
  const std::string p32 = write_set(ws, dtype::f32, "gla_f32");
  const std::string p16 = write_set(ws, dtype::bf16, "gla_bf16");
  auto l32 = layers::gla_layer::load(checkpoint::open(p32), "L.", cfg);
  auto l16 = layers::gla_layer::load(checkpoint::open(p16), "L.", cfg);
  {
    auto c1 = l32.make_cache(2), c2 = l16.make_cache(2);
    const auto y32 = prefill(l32, x, c1);
    const auto y16 = prefill(l16, x, c2);
    const auto cmp = compare(y32, y16);
    INFO("bf16 vs f32 weights: " << cmp.report);
    CHECK(cmp.rel_rms <= 2e-2);
    CHECK(cmp.rel_rms > 1e-5);  // really rounded
    // the bf16 layer == the reference on the bf16-rounded weights (exact widening)
    tensor<double, 4> st;
    const auto yr = gla_ref(ref_weights(ws, true), cfg, l16, x, st);
    check_rel("bf16 layer vs reference on rounded weights", compare(yr, y16), 1e-5);
  }
  auto err = [&](const std::string& drop, const std::string& reshape, const std::string& retype) {
    const std::string p = write_set(ws, dtype::f32, "gla_bad", drop, reshape, retype);
    const auto ck = checkpoint::open(p);
    auto e = error_of([&] { layers::gla_layer::load(ck, "L.", cfg); });
    std::filesystem::remove(p);
    return e;
  };
  CHECK_THAT(err("gk_proj.1.bias", {}, {}),
             Catch::Contains("gla_layer::load") && Catch::Contains("'L.gk_proj.1.bias'") &&
                 Catch::Contains("missing") && Catch::Contains("[8]"));
  CHECK_THAT(err({}, "k_proj.weight", {}), Catch::Contains("'L.k_proj.weight'") &&
                                               Catch::Contains("[8, 32]") &&
                                               Catch::Contains("got shape [256]"));
  CHECK_THAT(err({}, {}, "v_conv1d.weight"), Catch::Contains("'L.v_conv1d.weight'") &&
                                                 Catch::Contains("[16, 1, 4]") &&
                                                 Catch::Contains("F64"));
  CHECK_THAT(err("g_norm_swish_gate.weight", {}, {}),
             Catch::Contains("'L.g_norm_swish_gate.weight'") && Catch::Contains("[8]"));
  const auto ck = checkpoint::open(p32);
  auto bad = cfg;
  bad.feature_map = "relu";
  CHECK_THAT(error_of([&] { layers::gla_layer::load(ck, "L.", bad); }),
             Catch::Contains("config.feature_map"));
  bad = cfg;
  bad.gate_fn = "gelu";
  CHECK_THAT(error_of([&] { layers::gla_layer::load(ck, "L.", bad); }),
             Catch::Contains("config.gate_fn"));
  bad = cfg;
  bad.kv_heads = 3;
  CHECK_THAT(error_of([&] { layers::gla_layer::load(ck, "L.", bad); }),
             Catch::Contains("config.kv_heads"));
  bad = cfg;
  bad.clamp_min = 0.5f;
  CHECK_THAT(error_of([&] { layers::gla_layer::load(ck, "L.", bad); }),
             Catch::Contains("config.clamp_min"));
  bad = cfg;
  bad.expand_v = 0.3;
  CHECK_THAT(error_of([&] { layers::gla_layer::load(ck, "L.", bad); }),
             Catch::Contains("config.expand_v"));
  // shapes of the arguments
  auto c = l32.make_cache(2);
  tensor<float, 3> xb({2, 5, cfg.hidden + 1}), yb({2, 5, cfg.hidden});
  CHECK_THAT(error_of([&] { l32.forward(xb.view(), yb.view(), c); }),
             Catch::Contains("gla_layer::forward") && Catch::Contains("'x'"));
  std::filesystem::remove(p32);
  std::filesystem::remove(p16);
}
