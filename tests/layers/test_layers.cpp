// SPDX-License-Identifier: MIT
// Mixer layers with weights (issue 13): golden transformers layers (Qwen3-Next Gated DeltaNet and
// gated attention, Mamba2), prefill then steps == one prefill, packed == separate, snapshot /
// restore, allocation-free steps, bf16-stored weights, bad weights and arguments.
#include <cmath>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>

#include <seqmix/core/io/checkpoint.hpp>
#include <seqmix/core/parallel.hpp>
#include <seqmix/core/safetensors.hpp>
#include <seqmix/layers/gated_attention.hpp>
#include <seqmix/layers/gated_deltanet.hpp>
#include <seqmix/layers/mamba2.hpp>
#include <seqmix/reference/attention.hpp>
#include <seqmix/reference/layers.hpp>

#include "alloc_counter.hpp"
#include "golden.hpp"
#include "testing.hpp"

namespace {

using namespace seqmix;
using seqmix::testing::compare;
namespace gl = seqmix::testing::golden;

constexpr double tol = 1e-5;

const safetensors_file& gold() {
  return gl::file("v2/layers");
}
template <std::size_t R>
tensor<float, R> g(const std::string& name) {
  return gold().get<float, R>(name);
}
template <class T, std::size_t R>
tensor_view<const T, R> ro(const tensor<T, R>& t) {
  return t.view();
}
checkpoint gold_ck() {
  return checkpoint::open(gl::path("v2/layers.safetensors"));
}

layers::gated_deltanet_config gdn_cfg() {
  layers::gated_deltanet_config c;
  c.hidden = 64;
  c.key_heads = 2;
  c.value_heads = 4;
  c.key_dim = 32;
  c.value_dim = 32;
  c.conv_kernel = 4;
  c.norm_eps = 1e-6f;
  return c;
}
layers::gated_attention_config attn_cfg() {
  layers::gated_attention_config c;
  c.hidden = 64;
  c.heads = 4;
  c.kv_heads = 2;
  c.head_dim = 32;
  c.partial_rotary = 0.25;
  c.rope_theta = 1e4;
  c.norm_eps = 1e-6f;
  return c;
}
layers::mamba2_config mamba_cfg() {
  layers::mamba2_config c;
  c.hidden = 64;
  c.heads = 4;
  c.head_dim = 32;
  c.state_size = 16;
  c.groups = 2;
  c.conv_kernel = 4;
  c.chunk_size = 16;
  c.norm_eps = 1e-5f;
  return c;
}

/// [1, C, K] transformers conv state -> our [1, K-1, C] (its last K-1 columns).
tensor<float, 3> conv_state_ours(const tensor<float, 3>& hf) {
  const index_t C = hf.extent(1), K = hf.extent(2);
  tensor<float, 3> out({1, K - 1, C});
  for (index_t c = 0; c < C; ++c)
    for (index_t j = 1; j < K; ++j) out(0, j - 1, c) = hf(0, c, j);
  return out;
}

void check_rel(const std::string& what, const testing::comparison& c, double limit = tol) {
  INFO(what << ": " << c.report);
  UNSCOPED_INFO(what << " rel_rms " << c.rel_rms);
  CHECK(c.rel_rms <= limit);
}

/// x [T, D] -> [1, T, D]
tensor<float, 3> batch1(const tensor<float, 2>& x) {
  tensor<float, 3> out({1, x.extent(0), x.extent(1)});
  std::copy(x.data(), x.data() + x.size(), out.data());
  return out;
}

/// Runs the golden protocol (prefill 37, 4 steps) on any layer; returns y, y_decode.
template <class Layer>
void golden_run(Layer& layer, typename Layer::cache_type& cache, const std::string& unit,
                tensor<float, 2>& y_out, tensor<float, 2>& yd_out,
                typename Layer::cache_type* after_prefill = nullptr) {
  const auto x = batch1(g<2>(unit + ".x"));
  const auto xd = g<2>(unit + ".x_decode");
  tensor<float, 3> y({1, x.extent(1), x.extent(2)});
  layer.forward(x.view(), y.view(), cache);
  if (after_prefill) *after_prefill = cache.snapshot();
  y_out = tensor<float, 2>({x.extent(1), x.extent(2)});
  std::copy(y.data(), y.data() + y.size(), y_out.data());
  yd_out = tensor<float, 2>({xd.extent(0), xd.extent(1)});
  for (index_t t = 0; t < xd.extent(0); ++t) {
    tensor<float, 2> x1({1, xd.extent(1)}), y1({1, xd.extent(1)});
    std::copy_n(xd.data() + t * xd.extent(1), xd.extent(1), x1.data());
    layer.step(x1.view(), y1.view(), cache);
    std::copy_n(y1.data(), xd.extent(1), yd_out.data() + t * xd.extent(1));
  }
}

}  // namespace

TEST_CASE("gated_deltanet layer matches transformers' Qwen3NextGatedDeltaNet", "[golden][layers]") {
  auto layer = layers::gated_deltanet::load(gold_ck(), "gdn.w.", gdn_cfg());
  auto cache = layer.make_cache(1);
  layers::recurrent_cache mid;
  tensor<float, 2> y, yd;
  const auto x = batch1(g<2>("gdn.x"));
  // the mixer's inputs: run a prefill on a fresh cache and read its taps
  {
    auto c0 = layer.make_cache(1);
    tensor<float, 3> y0({1, 37, 64});
    layer.forward(x.view(), y0.view(), c0);
    const auto io = layer.last_mixer_io();
    const auto q = g<4>("gdn.kernel_in.q"), k = g<4>("gdn.kernel_in.k");
    tensor<float, 4> qe(q.shape()), ke(k.shape());  // ours, repeated to the value heads
    for (index_t t = 0; t < 37; ++t)
      for (index_t h = 0; h < 4; ++h)
        for (index_t e = 0; e < 32; ++e) {
          qe(0, t, h, e) = io.q(0, t, h / 2, e);
          ke(0, t, h, e) = io.k(0, t, h / 2, e);
        }
    check_rel("gdn.kernel_in.q", compare(q, qe));
    check_rel("gdn.kernel_in.k", compare(k, ke));
    check_rel("gdn.kernel_in.v", compare(ro(g<4>("gdn.kernel_in.v")), io.v));
    check_rel("gdn.kernel_in.g", compare(ro(g<3>("gdn.kernel_in.g")), io.g));
    check_rel("gdn.kernel_in.beta", compare(ro(g<3>("gdn.kernel_in.beta")), io.beta));
    check_rel("gdn.kernel_out.o", compare(ro(g<4>("gdn.kernel_out.o")), io.o));
  }
  golden_run(layer, cache, "gdn", y, yd, &mid);
  check_rel("gdn.y", compare(g<2>("gdn.y"), y));
  check_rel("gdn.y_decode", compare(g<2>("gdn.y_decode"), yd));
  check_rel(
      "gdn.cache_after_prefill.conv",
      compare(conv_state_ours(g<3>("gdn.cache_after_prefill.layer0.conv_state0")), mid.conv()));
  check_rel("gdn.cache_after_prefill.state",
            compare(g<4>("gdn.cache_after_prefill.layer0.recurrent_state0"), mid.state()));
  check_rel(
      "gdn.cache_after_decode.conv",
      compare(conv_state_ours(g<3>("gdn.cache_after_decode.layer0.conv_state0")), cache.conv()));
  check_rel("gdn.cache_after_decode.state",
            compare(g<4>("gdn.cache_after_decode.layer0.recurrent_state0"), cache.state()));
}

TEST_CASE("gated_attention layer matches transformers' Qwen3NextAttention", "[golden][layers]") {
  auto layer = layers::gated_attention::load(gold_ck(), "gated_attn.w.", attn_cfg());
  // the RoPE tables of positions 0..40
  const auto cs = g<2>("gated_attn.rope_cos"), sn = g<2>("gated_attn.rope_sin");
  tensor<float, 2> oc(cs.shape()), os(sn.shape());
  for (index_t p = 0; p < cs.extent(0); ++p)
    for (index_t i = 0; i < 4; ++i) {
      float c, s;
      layer.rotary().cos_sin(p, i, c, s);
      oc(p, i) = oc(p, i + 4) = c;
      os(p, i) = os(p, i + 4) = s;
    }
  check_rel("gated_attn.rope_cos", compare(cs, oc));
  check_rel("gated_attn.rope_sin", compare(sn, os));
  auto cache = layer.make_cache(1, 64);
  layers::attention_cache mid;
  tensor<float, 2> y, yd;
  golden_run(layer, cache, "gated_attn", y, yd, &mid);
  check_rel("gated_attn.y", compare(g<2>("gated_attn.y"), y));
  check_rel("gated_attn.y_decode", compare(g<2>("gated_attn.y_decode"), yd));
  auto kv_of = [](const layers::attention_cache& c, bool keys) {
    const auto& kv = c.kv();
    const index_t L = kv.held(0), hd = kv.key_dim();
    tensor<float, 4> out({1, kv.kv_heads(), L, hd});
    for (index_t h = 0; h < kv.kv_heads(); ++h) {
      const auto rows = keys ? kv.keys(0, h) : kv.values(0, h);
      for (index_t t = 0; t < L; ++t)
        for (index_t e = 0; e < hd; ++e) out(0, h, t, e) = rows(t, e);
    }
    return out;
  };
  check_rel("gated_attn.cache_after_prefill.keys",
            compare(g<4>("gated_attn.cache_after_prefill.layer0.keys"), kv_of(mid, true)));
  check_rel("gated_attn.cache_after_prefill.values",
            compare(g<4>("gated_attn.cache_after_prefill.layer0.values"), kv_of(mid, false)));
  check_rel("gated_attn.cache_after_decode.keys",
            compare(g<4>("gated_attn.cache_after_decode.layer0.keys"), kv_of(cache, true)));
  check_rel("gated_attn.cache_after_decode.values",
            compare(g<4>("gated_attn.cache_after_decode.layer0.values"), kv_of(cache, false)));
}

TEST_CASE("mamba2 layer matches transformers' Mamba2Mixer", "[golden][layers]") {
  auto layer = layers::mamba2::load(gold_ck(), "mamba2.w.", mamba_cfg());
  auto cache = layer.make_cache(1);
  layers::recurrent_cache mid;
  tensor<float, 2> y, yd;
  golden_run(layer, cache, "mamba2", y, yd, &mid);
  check_rel("mamba2.y", compare(g<2>("mamba2.y"), y));
  check_rel("mamba2.y_decode", compare(g<2>("mamba2.y_decode"), yd));
  auto pn = [](const tensor<float, 4>& s) { return mamba2_state_to_pn<float>(s.view()); };
  check_rel(
      "mamba2.cache_after_prefill.conv",
      compare(conv_state_ours(g<3>("mamba2.cache_after_prefill.layer0.conv_state0")), mid.conv()));
  check_rel("mamba2.cache_after_prefill.state",
            compare(g<4>("mamba2.cache_after_prefill.layer0.recurrent_state0"), pn(mid.state())));
  check_rel(
      "mamba2.cache_after_decode.conv",
      compare(conv_state_ours(g<3>("mamba2.cache_after_decode.layer0.conv_state0")), cache.conv()));
  check_rel("mamba2.cache_after_decode.state",
            compare(g<4>("mamba2.cache_after_decode.layer0.recurrent_state0"), pn(cache.state())));
}

namespace {

/// The golden weights of `unit` re-written under prefix "L." as `type` (f32 / bf16), optionally
/// dropping one tensor, replacing one by a wrong shape or storing one as another dtype.
std::string write_weights(const std::string& unit, dtype type, const std::string& stem,
                          const std::string& drop = {}, const std::string& reshape = {},
                          const std::string& retype = {}) {
  const std::string path =
      (std::filesystem::temp_directory_path() /
       ("seqmix_layers_" + stem + "_" + std::to_string(::getpid()) + ".safetensors"))
          .string();
  safetensors_writer wr;
  const auto scope = gold_ck().scope(unit + ".w.");
  for (const auto& n : scope.names()) {
    if (n == drop) continue;
    const auto& info = scope.info(n);
    auto flat = scope.get_flat<float>(n);
    std::vector<index_t> shape = info.shape;
    if (n == reshape) shape = {static_cast<index_t>(flat.size())};
    const dtype t = n == retype ? dtype::f64 : (shape.size() >= 2 ? type : dtype::f32);
    if (shape.size() == 1) {
      tensor<float, 1> v({shape[0]});
      std::copy(flat.begin(), flat.end(), v.data());
      wr.add_as("L." + n, v, t);
    } else if (shape.size() == 2) {
      tensor<float, 2> v({shape[0], shape[1]});
      std::copy(flat.begin(), flat.end(), v.data());
      wr.add_as("L." + n, v, t);
    } else {
      tensor<float, 3> v({shape[0], shape[1], shape[2]});
      std::copy(flat.begin(), flat.end(), v.data());
      wr.add_as("L." + n, v, t);
    }
  }
  wr.save(path);
  return path;
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

template <class Layer>
Layer load_layer(const checkpoint& ck, const std::string& prefix);
template <>
layers::gated_deltanet load_layer(const checkpoint& ck, const std::string& p) {
  return layers::gated_deltanet::load(ck, p, gdn_cfg());
}
template <>
layers::gated_attention load_layer(const checkpoint& ck, const std::string& p) {
  return layers::gated_attention::load(ck, p, attn_cfg());
}
template <>
layers::mamba2 load_layer(const checkpoint& ck, const std::string& p) {
  return layers::mamba2::load(ck, p, mamba_cfg());
}

template <class Layer>
tensor<float, 3> prefill(Layer& l, const tensor<float, 3>& x, typename Layer::cache_type& c) {
  tensor<float, 3> y(x.shape());
  l.forward(x.view(), y.view(), c);
  return y;
}

/// The layer-level properties shared by the three layers.
template <class Layer>
void layer_properties(const std::string& unit) {
  auto ck = gold_ck();
  Layer layer = load_layer<Layer>(ck, unit + ".w.");
  auto rng = testing::make_rng(11);
  const index_t D = 64, B = 2, T = 20, cap = 64;
  const auto x = testing::random_normal<float, 3>({B, T, D}, rng);

  SECTION("one prefill over 41 tokens == transformers' y_full") {
    const auto xs = g<2>(unit + ".x"), xd = g<2>(unit + ".x_decode");
    tensor<float, 3> xf({1, 41, D});
    std::copy(xs.data(), xs.data() + xs.size(), xf.data());
    std::copy(xd.data(), xd.data() + xd.size(), xf.data() + xs.size());
    auto c = layer.make_cache(1, cap);
    const auto y = prefill(layer, xf, c);
    check_rel(unit + ".y_full", compare(ro(g<2>(unit + ".y_full")),
                                        tensor_view<const float, 2>(y.view().select(0, 0))));
  }
  SECTION("prefill in parts, then steps == one prefill; rows of a batch == alone") {
    auto c_all = layer.make_cache(B, cap);
    const auto y_all = prefill(layer, x, c_all);
    auto c = layer.make_cache(B, cap);
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
    check_rel(unit + " parts+steps vs one prefill", compare(y_all, y));
    for (index_t b = 0; b < B; ++b) {
      tensor<float, 3> xb({1, T, D});
      std::copy_n(x.data() + b * T * D, T * D, xb.data());
      auto cb = layer.make_cache(1, cap);
      const auto yb = prefill(layer, xb, cb);
      check_rel(unit + " row alone",
                compare(tensor_view<const float, 2>(yb.view().select(0, 0)),
                        tensor_view<const float, 2>(y_all.view().select(0, b))));
    }
  }
  SECTION("packed sequences continuing their caches == each alone") {
    // three rows with 4 tokens of history each, then a packed continuation of 7, 1 and 12
    const index_t N = 3;
    const auto hist = testing::random_normal<float, 3>({N, 4, D}, rng);
    const std::vector<index_t> cu{0, 7, 8, 20};
    const auto xp = testing::random_normal<float, 3>({1, 20, D}, rng);
    auto c = layer.make_cache(N, cap);
    prefill(layer, hist, c);
    tensor<float, 3> yp({1, 20, D});
    layer.forward(xp.view(), yp.view(), c, cu);
    for (index_t n = 0; n < N; ++n) {
      auto cn = layer.make_cache(1, cap);
      tensor<float, 3> hn({1, 4, D});
      std::copy_n(hist.data() + n * 4 * D, 4 * D, hn.data());
      prefill(layer, hn, cn);
      const index_t L = cu[std::size_t(n) + 1] - cu[std::size_t(n)];
      tensor<float, 3> xn({1, L, D});
      std::copy_n(xp.data() + cu[std::size_t(n)] * D, L * D, xn.data());
      const auto yn = prefill(layer, xn, cn);
      check_rel(unit + " packed sequence",
                compare(tensor_view<const float, 3>(yn.view()),
                        tensor_view<const float, 3>(
                            yp.view().slice(1, cu[std::size_t(n)], cu[std::size_t(n) + 1]))));
    }
  }
  SECTION("snapshot / restore; steps allocate nothing") {
    auto c = layer.make_cache(B, cap);
    prefill(layer, x, c);
    const auto snap = c.snapshot();
    tensor<float, 2> x1({B, D}), y1({B, D}), y2({B, D});
    for (index_t i = 0; i < B * D; ++i) x1[i] = static_cast<float>(i % 7) * 0.1f;
    layer.step(x1.view(), y1.view(), c);
    {
      testing::allocation_scope scope;
      for (int i = 0; i < 5; ++i) layer.step(x1.view(), y2.view(), c);
      CHECK(scope.stats().count == 0);
    }
    c.restore(snap);
    layer.step(x1.view(), y2.view(), c);
    CHECK(testing::bitwise_equal(y1, y2));
  }
  SECTION("bf16-stored weights: exact widening, within bf16 rounding of f32") {
    const std::string p16 = write_weights(unit, dtype::bf16, unit + "_bf16");
    auto ck16 = checkpoint::open(p16);
    Layer l16 = load_layer<Layer>(ck16, "L.");
    auto c1 = layer.make_cache(B, cap), c2 = layer.make_cache(B, cap);
    const auto y32 = prefill(layer, x, c1);
    const auto y16 = prefill(l16, x, c2);
    const auto cmp = compare(y32, y16);
    INFO(cmp.report);
    CHECK(cmp.rel_rms <= 2e-2);
    CHECK(cmp.rel_rms > 1e-5);  // the weights really were rounded
    // the same bf16 numbers stored as f32: bf16 weights are widened exactly
    safetensors_writer wr;
    const auto s16 = ck16.scope("L.");
    for (const auto& n : s16.names()) {
      auto flat = s16.get_flat<float>(n);
      tensor<float, 1> v({static_cast<index_t>(flat.size())});
      std::copy(flat.begin(), flat.end(), v.data());
      const auto& shp = s16.info(n).shape;
      if (shp.size() == 1) wr.add("L." + n, v);
      if (shp.size() == 2) wr.add("L." + n, v.view().reshape(shape_t<2>{shp[0], shp[1]}));
      if (shp.size() == 3) wr.add("L." + n, v.view().reshape(shape_t<3>{shp[0], shp[1], shp[2]}));
    }
    const std::string pw = p16 + ".f32.safetensors";
    wr.save(pw);
    auto ckw = checkpoint::open(pw);
    Layer lw = load_layer<Layer>(ckw, "L.");
    auto c3 = layer.make_cache(B, cap);
    const auto yw = prefill(lw, x, c3);
    CHECK(compare(yw, y16).rel_rms <= 1e-6);
    std::filesystem::remove(p16);
    std::filesystem::remove(pw);
  }
  SECTION("results do not depend on the thread count (bitwise)") {
    const int before = num_threads();
    auto run = [&](int threads) {
      set_num_threads(threads);
      if (threads > 1) testing::require_team(threads);
      auto c = layer.make_cache(B, cap);
      auto y = prefill(layer, x, c);
      tensor<float, 2> x1({B, D}), y1({B, D});
      for (index_t i = 0; i < B * D; ++i) x1[i] = static_cast<float>(i % 5) * 0.2f;
      layer.step(x1.view(), y1.view(), c);
      return std::make_pair(std::move(y), std::move(y1));
    };
    const auto one = run(1), two = run(2);
    set_num_threads(before);
    CHECK(testing::bitwise_equal(one.first, two.first));
    CHECK(testing::bitwise_equal(one.second, two.second));
  }
  SECTION("bad arguments") {
    auto c = layer.make_cache(B, cap);
    tensor<float, 3> xb({B, T, D + 1}), y(x.shape());
    CHECK_THAT(error_of([&] { layer.forward(xb.view(), y.view(), c); }),
               Catch::Contains("::forward") && Catch::Contains("'x'") &&
                   Catch::Contains("[any, any, 64]"));
    auto c1 = layer.make_cache(1, cap);
    CHECK_THAT(error_of([&] { layer.forward(x.view(), y.view(), c1); }),
               Catch::Contains("::forward") && Catch::Contains("cache"));
    tensor<float, 2> x1({B, D}), y1({B + 1, D});
    CHECK_THAT(error_of([&] { layer.step(x1.view(), y1.view(), c); }),
               Catch::Contains("::step") && Catch::Contains("'y'"));
    CHECK_THAT(error_of([&] {
                 layer.forward(x.view(), y.view(), c, std::vector<index_t>{0, 5});
               }),
               Catch::Contains("cu_seqlens"));
  }
}

}  // namespace

TEST_CASE("gated_deltanet layer: parts, packed, snapshot, allocation, bf16, errors", "[layers]") {
  layer_properties<layers::gated_deltanet>("gdn");
}
TEST_CASE("gated_attention layer: parts, packed, snapshot, allocation, bf16, errors", "[layers]") {
  layer_properties<layers::gated_attention>("gated_attn");
}
TEST_CASE("mamba2 layer: parts, packed, snapshot, allocation, bf16, errors", "[layers]") {
  layer_properties<layers::mamba2>("mamba2");
}

TEST_CASE("layers: missing, mis-shaped and mis-typed weights name the tensor and the shape",
          "[layers]") {
  {
    const auto p = write_weights("gdn", dtype::f32, "gdn_missing", "A_log");
    auto ck = checkpoint::open(p);
    CHECK_THAT(error_of([&] { layers::gated_deltanet::load(ck, "L.", gdn_cfg()); }),
               Catch::Contains("gated_deltanet::load") && Catch::Contains("'L.A_log'") &&
                   Catch::Contains("missing") && Catch::Contains("[4]"));
    std::filesystem::remove(p);
  }
  {
    const auto p = write_weights("gdn", dtype::f32, "gdn_shape", {}, "conv1d.weight");
    auto ck = checkpoint::open(p);
    CHECK_THAT(error_of([&] { layers::gated_deltanet::load(ck, "L.", gdn_cfg()); }),
               Catch::Contains("'L.conv1d.weight'") && Catch::Contains("[256, 1, 4]") &&
                   Catch::Contains("got shape [1024]"));
    std::filesystem::remove(p);
  }
  {
    const auto p = write_weights("gated_attn", dtype::f32, "attn_type", {}, {}, "q_proj.weight");
    auto ck = checkpoint::open(p);
    CHECK_THAT(error_of([&] { layers::gated_attention::load(ck, "L.", attn_cfg()); }),
               Catch::Contains("gated_attention::load") && Catch::Contains("'L.q_proj.weight'") &&
                   Catch::Contains("[256, 64]") && Catch::Contains("F64"));
    std::filesystem::remove(p);
  }
  {
    const auto p = write_weights("mamba2", dtype::f32, "mamba_missing", "conv1d.bias");
    auto ck = checkpoint::open(p);
    CHECK_THAT(error_of([&] { layers::mamba2::load(ck, "L.", mamba_cfg()); }),
               Catch::Contains("mamba2::load") && Catch::Contains("'L.conv1d.bias'") &&
                   Catch::Contains("[192]"));
    std::filesystem::remove(p);
  }
  // a config that does not fit the checkpoint
  auto cfg = gdn_cfg();
  cfg.value_dim = 16;
  CHECK_THAT(error_of([&] { layers::gated_deltanet::load(gold_ck(), "gdn.w.", cfg); }),
             Catch::Contains("'gdn.w.in_proj_qkvz.weight'") && Catch::Contains("[256, 64]"));
  cfg = gdn_cfg();
  cfg.value_heads = 3;
  CHECK_THAT(error_of([&] { layers::gated_deltanet::load(gold_ck(), "gdn.w.", cfg); }),
             Catch::Contains("config.value_heads"));
}

namespace {
/// Stepping cache rows {2, 0} of a 3-row cache == stepping those sequences alone.
template <class Layer>
void state_index_stepping(const std::string& unit) {
  Layer layer = load_layer<Layer>(gold_ck(), unit + ".w.");
  auto rng = testing::make_rng(21);
  const index_t D = 64;
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
  const auto before1 = c.snapshot();
  const std::vector<index_t> rows{2, 0};
  for (int s = 0; s < 3; ++s) {
    const auto x = testing::random_normal<float, 2>({2, D}, rng);
    tensor<float, 2> y({2, D});
    layer.step(x.view(), y.view(), c, rows);
    if (s == 0) {
      testing::allocation_scope scope;
      layer.step(x.view(), y.view(), c, rows);  // warm: no allocation
      CHECK(scope.stats().count == 0);
      c.restore(before1);
      layer.step(x.view(), y.view(), c, rows);
    }
    for (std::size_t i = 0; i < 2; ++i) {
      tensor<float, 2> x1({1, D}), y1({1, D});
      std::copy_n(x.data() + index_t(i) * D, D, x1.data());
      layer.step(x1.view(), y1.view(), alone[std::size_t(rows[i])]);
      tensor<float, 2> yi({1, D});
      std::copy_n(y.data() + index_t(i) * D, D, yi.data());
      CHECK(compare(y1, yi).rel_rms <= 1e-5);  // batched vs single-row GEMMs round apart
    }
  }
  // row 1 untouched
  CHECK(compare(ro(before1.conv()).select(0, 1), ro(c.conv()).select(0, 1)).max_abs == 0);
  CHECK(compare(ro(before1.state()).select(0, 1), ro(c.state()).select(0, 1)).max_abs == 0);
  for (index_t n : {0, 2}) {
    CHECK(compare(ro(alone[std::size_t(n)].state()).select(0, 0), ro(c.state()).select(0, n))
              .rel_rms <= 1e-5);
  }
  tensor<float, 2> x({2, D}), y({2, D});
  CHECK_THAT(error_of([&] {
               layer.step(x.view(), y.view(), c, std::vector<index_t>{1, 1});
             }),
             Catch::Contains("'rows'") && Catch::Contains("both row 1"));
  CHECK_THAT(error_of([&] {
               layer.step(x.view(), y.view(), c, std::vector<index_t>{0, 3});
             }),
             Catch::Contains("'rows'") && Catch::Contains("[0, 3)"));
}
}  // namespace

TEST_CASE("recurrent layers: stepping a subset of cache rows == separate caches", "[layers]") {
  state_index_stepping<layers::gated_deltanet>("gdn");
  state_index_stepping<layers::mamba2>("mamba2");
}

TEST_CASE("gated_attention: stepping a subset of KV cache rows == separate caches", "[layers]") {
  auto layer = load_layer<layers::gated_attention>(gold_ck(), "gated_attn.w.");
  auto rng = testing::make_rng(22);
  const index_t D = 64, cap = 16;
  const auto hist = testing::random_normal<float, 3>({3, 6, D}, rng);
  auto c = layer.make_cache(3, cap);
  prefill(layer, hist, c);
  std::vector<layers::attention_cache> alone;
  for (index_t n = 0; n < 3; ++n) {
    alone.push_back(layer.make_cache(1, cap));
    tensor<float, 3> hn({1, 6, D});
    std::copy_n(hist.data() + n * 6 * D, 6 * D, hn.data());
    prefill(layer, hn, alone.back());
  }
  const auto before = c.snapshot();
  const std::vector<index_t> rows{2, 0};
  for (int s = 0; s < 3; ++s) {
    const auto x = testing::random_normal<float, 2>({2, D}, rng);
    tensor<float, 2> y({2, D});
    layer.step(x.view(), y.view(), c, rows);
    if (s == 0) {
      const auto warm = c.snapshot();
      c.restore(before);
      testing::allocation_scope scope;
      layer.step(x.view(), y.view(), c, rows);  // warm: no allocation
      CHECK(scope.stats().count == 0);
      c.restore(warm);
    }
    for (std::size_t i = 0; i < 2; ++i) {
      tensor<float, 2> x1({1, D}), y1({1, D});
      std::copy_n(x.data() + index_t(i) * D, D, x1.data());
      layer.step(x1.view(), y1.view(), alone[std::size_t(rows[i])]);
      tensor<float, 2> yi({1, D});
      std::copy_n(y.data() + index_t(i) * D, D, yi.data());
      CHECK(compare(y1, yi).rel_rms <= 1e-5);  // batched vs single-row GEMMs round apart
    }
  }
  CHECK(c.length(0) == 9);
  CHECK(c.length(1) == 6);
  CHECK(c.length(2) == 9);
  for (index_t h = 0; h < c.kv().kv_heads(); ++h) {
    CHECK(compare(before.kv().keys(1, h), c.kv().keys(1, h)).max_abs == 0);  // row 1 untouched
    CHECK(compare(alone[2].kv().keys(0, h), c.kv().keys(2, h)).rel_rms <= 1e-5);
    CHECK(compare(alone[0].kv().values(0, h), c.kv().values(0, h)).rel_rms <= 1e-5);
  }
  tensor<float, 2> x({2, D}), y({2, D});
  CHECK_THAT(error_of([&] {
               layer.step(x.view(), y.view(), c, std::vector<index_t>{1, 1});
             }),
             Catch::Contains("gated_attention::step") && Catch::Contains("both row 1"));
  CHECK_THAT(error_of([&] {
               layer.step(x.view(), y.view(), c, std::vector<index_t>{0, 3});
             }),
             Catch::Contains("'rows'") && Catch::Contains("[0, 3)"));
  auto full = layer.make_cache(3, 6);
  prefill(layer, hist, full);
  CHECK_THAT(error_of([&] { layer.step(x.view(), y.view(), full, rows); }),
             Catch::Contains("sequence 2 holds 6 tokens"));
}

TEST_CASE("gated_deltanet loads Qwen3.5's split projections (same layer, same bits)", "[layers]") {
  // Qwen3.5's in_proj_qkv / z / b / a, re-derived from the golden Qwen3-Next weights: key head
  // j's block of in_proj_qkvz is [q dk | k dk | v r·dv | z r·dv], of in_proj_ba [b r | a r]
  const auto s = gold_ck().scope("gdn.w.");
  const auto qkvz = s.get<float, 2>("in_proj_qkvz.weight"),
             ba = s.get<float, 2>("in_proj_ba.weight");
  const index_t Hk = 2, r = 2, dk = 32, dv = 32, D = 64, per = 2 * dk + 2 * r * dv;
  tensor<float, 2> qkv({2 * Hk * dk + Hk * r * dv, D}), z({Hk * r * dv, D}), b({Hk * r, D}),
      a({Hk * r, D});
  for (index_t j = 0; j < Hk; ++j) {
    for (index_t e = 0; e < dk; ++e)
      for (index_t c = 0; c < D; ++c) {
        qkv(j * dk + e, c) = qkvz(j * per + e, c);
        qkv(Hk * dk + j * dk + e, c) = qkvz(j * per + dk + e, c);
      }
    for (index_t e = 0; e < r * dv; ++e)
      for (index_t c = 0; c < D; ++c) {
        qkv(2 * Hk * dk + j * r * dv + e, c) = qkvz(j * per + 2 * dk + e, c);
        z(j * r * dv + e, c) = qkvz(j * per + 2 * dk + r * dv + e, c);
      }
    for (index_t i = 0; i < r; ++i)
      for (index_t c = 0; c < D; ++c) {
        b(j * r + i, c) = ba(j * 2 * r + i, c);
        a(j * r + i, c) = ba(j * 2 * r + r + i, c);
      }
  }
  safetensors_writer wr;
  wr.add("L.in_proj_qkv.weight", qkv);
  wr.add("L.in_proj_z.weight", z);
  wr.add("L.in_proj_b.weight", b);
  wr.add("L.in_proj_a.weight", a);
  for (const char* n : {"A_log", "dt_bias", "norm.weight"}) {
    const auto v = s.get<float, 1>(n);
    wr.add(std::string("L.") + n, v);
  }
  wr.add("L.conv1d.weight", s.get<float, 3>("conv1d.weight"));
  wr.add("L.out_proj.weight", s.get<float, 2>("out_proj.weight"));
  const std::string path = (std::filesystem::temp_directory_path() /
                            ("seqmix_layers_qwen35_" + std::to_string(::getpid()) + ".safetensors"))
                               .string();
  wr.save(path);
  auto l35 = layers::gated_deltanet::load(checkpoint::open(path), "L.", gdn_cfg());
  auto l3n = layers::gated_deltanet::load(gold_ck(), "gdn.w.", gdn_cfg());
  const auto x = batch1(g<2>("gdn.x"));
  auto c1 = l35.make_cache(1), c2 = l3n.make_cache(1);
  tensor<float, 3> y1({1, 37, 64}), y2({1, 37, 64});
  l35.forward(x.view(), y1.view(), c1);
  l3n.forward(x.view(), y2.view(), c2);
  CHECK(testing::bitwise_equal(y1, y2));
  check_rel("gdn.y (Qwen3.5 layout)", compare(batch1(g<2>("gdn.y")), y1));
  auto cfg = gdn_cfg();
  cfg.layout = layers::gated_deltanet_config::projection_layout::qwen3_5_split;
  CHECK_THAT(error_of([&] { layers::gated_deltanet::load(gold_ck(), "gdn.w.", cfg); }),
             Catch::Contains("'gdn.w.in_proj_qkv.weight'") && Catch::Contains("missing") &&
                 Catch::Contains("[256, 64]"));
  std::filesystem::remove(path);
}

TEST_CASE(
    "plain GQA attention layer (Granite: no gate, no q/k norm, full RoPE, scale) == "
    "double reference",
    "[layers]") {
  auto rng = testing::make_rng(31);
  const index_t D = 48, H = 4, Hkv = 2, hd = 16, T = 23;
  auto wq = testing::random_normal<float, 2>({H * hd, D}, rng, 0.15);
  auto wk = testing::random_normal<float, 2>({Hkv * hd, D}, rng, 0.15);
  auto wv = testing::random_normal<float, 2>({Hkv * hd, D}, rng, 0.15);
  auto wo = testing::random_normal<float, 2>({D, H * hd}, rng, 0.15);
  safetensors_writer wr;
  wr.add("a.q_proj.weight", wq);
  wr.add("a.k_proj.weight", wk);
  wr.add("a.v_proj.weight", wv);
  wr.add("a.o_proj.weight", wo);
  const std::string path = (std::filesystem::temp_directory_path() /
                            ("seqmix_layers_gqa_" + std::to_string(::getpid()) + ".safetensors"))
                               .string();
  wr.save(path);
  layers::gated_attention_config cfg;
  cfg.hidden = D;
  cfg.heads = H;
  cfg.kv_heads = Hkv;
  cfg.head_dim = hd;
  cfg.partial_rotary = 1.0;
  cfg.rope_theta = 1e4;
  cfg.gated = false;
  cfg.qk_norm = false;
  cfg.scale = 0.125f;
  auto layer = layers::gated_attention::load(checkpoint::open(path), "a.", cfg);
  const auto x = testing::random_normal<float, 3>({1, T, D}, rng);
  auto c = layer.make_cache(1, T);
  tensor<float, 3> y({1, T, D});
  layer.forward(x.view(), y.view(), c);
  // the reference, block by block in double
  const auto xd = testing::cast<double>(x);
  const auto x2 = tensor_view<const double, 2>(xd.data(), {T, D});
  auto proj = [&](const tensor<float, 2>& w) {
    const auto wd = testing::cast<double>(w);
    return reference::linear<double>(x2, ro(wd));
  };
  const auto q = proj(wq);
  const auto k = proj(wk);
  const auto v = proj(wv);
  const std::vector<index_t> start{0};
  const auto qr = reference::rope<double>(tensor_view<const double, 4>(q.data(), {1, T, H, hd}), hd,
                                          1e4, false, start);
  const auto kr = reference::rope<double>(tensor_view<const double, 4>(k.data(), {1, T, Hkv, hd}),
                                          hd, 1e4, false, start);
  tensor<double, 4> o({1, T, H, hd});
  reference::softmax_attention<double>(qr.view(), kr.view(),
                                       tensor_view<const double, 4>(v.data(), {1, T, Hkv, hd}),
                                       o.view(), 0.125);
  const auto wod = testing::cast<double>(wo);
  const auto yr =
      reference::linear<double>(tensor_view<const double, 2>(o.data(), {T, H * hd}), ro(wod));
  check_rel("plain GQA layer", compare(yr.view(), tensor_view<const float, 2>(y.data(), {T, D})));
  std::filesystem::remove(path);
}

TEST_CASE("gated_attention: a full cache is an error naming the layer, the row and the capacity",
          "[layers]") {
  auto layer = layers::gated_attention::load(gold_ck(), "gated_attn.w.", attn_cfg());
  auto c = layer.make_cache(1, 40);
  const auto x = batch1(g<2>("gated_attn.x"));  // 37 tokens
  tensor<float, 3> y({1, 37, 64});
  layer.forward(x.view(), y.view(), c);
  tensor<float, 2> x1({1, 64}), y1({1, 64});
  for (int i = 0; i < 3; ++i) layer.step(x1.view(), y1.view(), c);
  CHECK_THAT(error_of([&] { layer.step(x1.view(), y1.view(), c); }),
             Catch::Contains("gated_attention::step") && Catch::Contains("holds 40 tokens") &&
                 Catch::Contains("capacity is 40"));
  c.truncate(0, 37);  // roll back the three decoded tokens
  CHECK(c.length(0) == 37);
  layer.step(x1.view(), y1.view(), c);
  CHECK(c.length(0) == 38);
}
