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
#include <seqmix/layers/rwkv7.hpp>
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

// ---------------------------------------------------------------------------------------------
// RWKV-7

namespace {

layers::rwkv7_layer_config rwkv_cfg(index_t layer_idx) {
  layers::rwkv7_layer_config c;
  c.hidden = 32;
  c.head_dim = 8;  // 4 heads
  c.layer_idx = layer_idx;
  c.decay_low_rank_dim = 8;
  c.a_low_rank_dim = 8;
  c.v_low_rank_dim = 4;
  c.gate_low_rank_dim = 16;
  c.chunk_size = 8;
  c.prefill = layers::prefill_form::chunked;
  return c;
}

weight_set rwkv_weights(const layers::rwkv7_layer_config& c, std::uint64_t salt) {
  auto rng = testing::make_rng(salt);
  const index_t D = c.hidden, hd = c.head_dim ? c.head_dim : D / c.heads, H = D / hd;
  const index_t Dv = c.value_dim ? c.value_dim : D;
  weight_set w;
  for (const char* m : {"x_r", "x_w", "x_k", "x_v", "x_a", "x_g"})
    add(w, rng, m, {1, 1, D}, 0.2, 0.5);
  add(w, rng, "k_k", {D}, 0.1, 0.7);
  add(w, rng, "k_a", {D}, 0.1, 1.0);
  add(w, rng, "r_k", {H, hd}, 0.2);
  add_matrix(w, rng, "r_proj.weight", D, D);
  add_matrix(w, rng, "k_proj.weight", D, D);
  add_matrix(w, rng, "v_proj.weight", Dv, D);
  add_matrix(w, rng, "o_proj.weight", D, Dv);
  add_matrix(w, rng, "w_lora.lora.0.weight", c.decay_low_rank_dim, D);
  add_matrix(w, rng, "w_lora.lora.2.weight", D, c.decay_low_rank_dim);
  add(w, rng, "w_lora.lora.2.bias", {D}, 1.0, -1.0);
  add_matrix(w, rng, "a_lora.lora.0.weight", c.a_low_rank_dim, D);
  add_matrix(w, rng, "a_lora.lora.2.weight", D, c.a_low_rank_dim);
  add(w, rng, "a_lora.lora.2.bias", {D}, 0.5);
  if (c.layer_idx != 0) {
    add_matrix(w, rng, "v_lora.lora.0.weight", c.v_low_rank_dim, D);
    add_matrix(w, rng, "v_lora.lora.2.weight", Dv, c.v_low_rank_dim);
    add(w, rng, "v_lora.lora.2.bias", {Dv}, 0.5);
  }
  add_matrix(w, rng, "g_lora.lora.0.weight", c.gate_low_rank_dim, D);
  add_matrix(w, rng, "g_lora.lora.2.weight", Dv, c.gate_low_rank_dim);
  if (c.elementwise_affine) {
    add(w, rng, "g_norm.weight", {Dv}, 0.1, 1.0);
    add(w, rng, "g_norm.bias", {Dv}, 0.1);
  }
  return w;
}

layers::rwkv7_layer load_rwkv(const weight_set& ws, const layers::rwkv7_layer_config& c,
                              dtype type = dtype::f32) {
  const std::string path = write_set(ws, type, "rwkv_load");
  auto l = layers::rwkv7_layer::load(checkpoint::open(path), "L.", c);
  std::filesystem::remove(path);
  return l;
}

/// A later layer (layer_idx != 0) seen through the plain layer API: v_first is a fixed
/// function of each token's x (the same token gets the same v_first however it is fed).
struct later_layer {
  using cache_type = layers::recurrent_cache;
  layers::rwkv7_layer* l;
  static void fill(const float* x, float* vf, index_t D, index_t Dv) {
    for (index_t j = 0; j < Dv; ++j) vf[j] = 0.7f * x[j % D] - 0.2f;
  }
  cache_type make_cache(index_t b) const { return l->make_cache(b); }
  tensor<float, 3> vfirst3(const tensor_view<const float, 3>& x) const {
    tensor<float, 3> vf({x.extent(0), x.extent(1), l->value_dim()});
    for (index_t b = 0; b < x.extent(0); ++b)
      for (index_t t = 0; t < x.extent(1); ++t)
        fill(x.ptr({b, t, 0}), vf.view().ptr({b, t, 0}), x.extent(2), l->value_dim());
    return vf;
  }
  tensor<float, 2> vfirst2(const tensor_view<const float, 2>& x) const {
    tensor<float, 2> vf({x.extent(0), l->value_dim()});
    for (index_t b = 0; b < x.extent(0); ++b)
      fill(x.ptr({b, 0}), vf.view().ptr({b, 0}), x.extent(1), l->value_dim());
    return vf;
  }
  void forward(tensor_view<const float, 3> x, tensor_view<float, 3> y, cache_type& c) {
    auto vf = vfirst3(x);
    l->forward(x, y, c, vf.view());
  }
  void forward(tensor_view<const float, 3> x, tensor_view<float, 3> y, cache_type& c,
               std::span<const index_t> cu) {
    auto vf = vfirst3(x);
    l->forward(x, y, c, cu, vf.view());
  }
  // steps: v_first buffers kept so that a warm step allocates nothing
  tensor<float, 2> vf_;
  void step(tensor_view<const float, 2> x, tensor_view<float, 2> y, cache_type& c) {
    prepare(x);
    l->step(x, y, c, vf_.view());
  }
  void step(tensor_view<const float, 2> x, tensor_view<float, 2> y, cache_type& c,
            std::span<const index_t> rows) {
    prepare(x);
    l->step(x, y, c, rows, vf_.view());
  }
  void prepare(const tensor_view<const float, 2>& x) {
    if (vf_.extent(0) != x.extent(0)) vf_ = tensor<float, 2>({x.extent(0), l->value_dim()});
    for (index_t b = 0; b < x.extent(0); ++b)
      fill(x.ptr({b, 0}), vf_.view().ptr({b, 0}), x.extent(1), l->value_dim());
  }
};

struct rwkv_case {
  std::string name;
  layers::rwkv7_layer_config c0, c1;
};
std::vector<rwkv_case> rwkv_cases() {
  std::vector<rwkv_case> out;
  out.push_back({"chunked, F.normalize kk, affine GroupNorm", rwkv_cfg(0), rwkv_cfg(1)});
  auto a = rwkv_cfg(0), b = rwkv_cfg(3);
  for (auto* c : {&a, &b}) {
    c->prefill = layers::prefill_form::recurrent;
    c->fuse_norm = true;
    c->elementwise_affine = false;
    c->value_dim = 64;
    c->head_dim = 0;
    c->heads = 2;
  }
  out.push_back({"recurrent, l2_norm kk, no affine, value_dim 2D, heads 2", a, b});
  return out;
}

}  // namespace

TEST_CASE("rwkv7 layer == the double reference (fla's RWKV7Attention, two layers)",
          "[layers][timemix]") {
  CHECK(layers::rwkv7_layer::default_low_rank(2.5, 1024, 1.0) == 64);  // round(2.5) == 2
  CHECK(layers::rwkv7_layer::default_low_rank(5.0, 1024, 1.0) == 160);
  CHECK(layers::rwkv7_layer::default_low_rank(1.7, 4096, 1.0) == 96);
  CHECK(layers::rwkv7_layer::default_low_rank(2.5, 64, 1.0) == 32);
  for (const auto& tc : rwkv_cases()) {
    INFO(tc.name);
    const auto w0 = rwkv_weights(tc.c0, 7), w1 = rwkv_weights(tc.c1, 8);
    auto l0 = load_rwkv(w0, tc.c0);
    auto l1 = load_rwkv(w1, tc.c1);
    auto rng = testing::make_rng(9);
    const index_t B = 2, T = 19, D = tc.c0.hidden, Dv = l0.value_dim();
    const auto x = testing::random_normal<float, 3>({B, T, D}, rng);
    auto c0 = l0.make_cache(B), c1 = l1.make_cache(B);
    tensor<float, 3> y0({B, T, D}), y1({B, T, D}), vf({B, T, Dv});
    l0.forward(x.view(), y0.view(), c0, vf.view());
    l1.forward(y0.view(), y1.view(), c1, vf.view());
    const auto r0 = ref_weights(w0), r1 = ref_weights(w1);
    const auto sd = l0.state_dims();
    tensor<double, 3> ry0({B, T, D}), ry1({B, T, D}), rvf({B, T, Dv});
    tensor<double, 4> rs0({B, sd[0], sd[1], sd[2]}), rs1({B, sd[0], sd[1], sd[2]});
    tensor<double, 2> sh0({B, D}), sh1({B, D});
    for (index_t b = 0; b < B; ++b) {
      const auto xb = row_double(x, b, 0, T);
      auto vb = rvf.view().select(0, b);
      const auto yb0 = reference::rwkv7_layer<double>(r0, tc.c0, xb.view(), rs0.view().select(0, b),
                                                      sh0.view().select(0, b), vb);
      const auto yb1 = reference::rwkv7_layer<double>(
          r1, tc.c1, yb0.view(), rs1.view().select(0, b), sh1.view().select(0, b), vb);
      std::copy(yb0.data(), yb0.data() + yb0.size(), ry0.data() + b * T * D);
      std::copy(yb1.data(), yb1.data() + yb1.size(), ry1.data() + b * T * D);
    }
    check_rel(tc.name + " layer 0 y", compare(ry0, y0), 1e-5);
    check_rel(tc.name + " v_first", compare(rvf, vf), 1e-5);
    check_rel(tc.name + " layer 1 y (from the reference's own layer 0)", compare(ry1, y1), 1e-5);
    check_rel(tc.name + " layer 0 state", compare(rs0, c0.state()), 1e-5);
    check_rel(tc.name + " layer 1 state", compare(rs1, c1.state()), 1e-5);
    tensor<double, 3> sh3({B, 1, D});
    std::copy(sh1.data(), sh1.data() + sh1.size(), sh3.data());
    check_rel(tc.name + " token-shift state", compare(sh3, c1.conv()), 1e-6);
  }
}

TEST_CASE("rwkv7 layer: parts + steps, packed, snapshot, rows, no allocation",
          "[layers][timemix]") {
  for (const auto& tc : rwkv_cases()) {
    INFO(tc.name);
    auto l0 = load_rwkv(rwkv_weights(tc.c0, 10), tc.c0);
    {
      INFO("layer 0 (no v_first)");
      cache_properties(l0, tc.c0.hidden);
    }
    auto l1 = load_rwkv(rwkv_weights(tc.c1, 11), tc.c1);
    later_layer later{&l1, {}};
    INFO("a later layer with v_first");
    cache_properties(later, tc.c1.hidden);
  }
}

TEST_CASE("rwkv7 layer: bf16-stored weights, bad weights, v_first errors", "[layers][timemix]") {
  const auto cfg = rwkv_cfg(1);
  const auto ws = rwkv_weights(cfg, 12);
  auto rng = testing::make_rng(13);
  const index_t B = 2, T = 11, D = cfg.hidden;
  const auto x = testing::random_normal<float, 3>({B, T, D}, rng);
  auto l32 = load_rwkv(ws, cfg), l16 = load_rwkv(ws, cfg, dtype::bf16);
  later_layer a{&l32, {}}, b{&l16, {}};
  {
    auto c1 = l32.make_cache(B), c2 = l16.make_cache(B);
    const auto y32 = prefill(a, x, c1);
    const auto y16 = prefill(b, x, c2);
    const auto cmp = compare(y32, y16);
    INFO("bf16 vs f32 weights: " << cmp.report);
    CHECK(cmp.rel_rms <= 2e-2);
    CHECK(cmp.rel_rms > 1e-5);
  }
  auto err = [&](const std::string& drop, const std::string& reshape, const std::string& retype) {
    const std::string p = write_set(ws, dtype::f32, "rwkv_bad", drop, reshape, retype);
    const auto ck = checkpoint::open(p);
    auto e = error_of([&] { layers::rwkv7_layer::load(ck, "L.", cfg); });
    std::filesystem::remove(p);
    return e;
  };
  CHECK_THAT(err("v_lora.lora.2.bias", {}, {}),
             Catch::Contains("rwkv7_layer::load") && Catch::Contains("'L.v_lora.lora.2.bias'") &&
                 Catch::Contains("missing") && Catch::Contains("[32]"));
  CHECK_THAT(err({}, "r_k", {}), Catch::Contains("'L.r_k'") && Catch::Contains("[4, 8]") &&
                                     Catch::Contains("got shape [32]"));
  CHECK_THAT(err({}, {}, "x_w"),
             Catch::Contains("'L.x_w'") && Catch::Contains("[1, 1, 32]") && Catch::Contains("F64"));
  CHECK_THAT(err({}, {}, "w_lora.lora.2.weight"),
             Catch::Contains("'L.w_lora.lora.2.weight'") && Catch::Contains("[32, 8]"));
  {
    // the config's ranks must match the checkpoint's
    const std::string p = write_set(ws, dtype::f32, "rwkv_rank");
    const auto ck = checkpoint::open(p);
    auto c2 = cfg;
    c2.a_low_rank_dim = 0;  // fla's default for D = 32: 32
    CHECK_THAT(error_of([&] { layers::rwkv7_layer::load(ck, "L.", c2); }),
               Catch::Contains("'L.a_lora.lora.0.weight'") && Catch::Contains("[32, 32]"));
    c2 = cfg;
    c2.head_dim = 5;
    CHECK_THAT(error_of([&] { layers::rwkv7_layer::load(ck, "L.", c2); }),
               Catch::Contains("config.head_dim"));
    std::filesystem::remove(p);
  }
  // a later layer needs v_first; v_first's shape is checked
  auto c = l32.make_cache(B);
  tensor<float, 3> y({B, T, D});
  CHECK_THAT(error_of([&] { l32.forward(x.view(), y.view(), c); }),
             Catch::Contains("rwkv7_layer::forward") && Catch::Contains("'v_first'"));
  CHECK(c.length(0) == 0);  // nothing ran
  tensor<float, 2> x1({B, D}), y1({B, D});
  CHECK_THAT(error_of([&] { l32.step(x1.view(), y1.view(), c); }),
             Catch::Contains("rwkv7_layer::step") && Catch::Contains("'v_first'"));
  tensor<float, 3> vbad({B, T, D + 1});
  CHECK_THAT(error_of([&] { l32.forward(x.view(), y.view(), c, vbad.view()); }),
             Catch::Contains("rwkv7_layer::forward") && Catch::Contains("'v_first'") &&
                 Catch::Contains("[2, 11, 32]"));
}
