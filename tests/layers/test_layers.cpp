// SPDX-License-Identifier: MIT
// Mixer layers with weights (issue 13): golden transformers layers (Qwen3-Next Gated DeltaNet and
// gated attention, Mamba2), prefill then steps == one prefill, packed == separate, snapshot /
// restore, allocation-free steps, bf16-stored weights, bad weights and arguments.
#include <cmath>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include <seqmix/core/io/checkpoint.hpp>
#include <seqmix/core/safetensors.hpp>
#include <seqmix/layers/gated_attention.hpp>
#include <seqmix/layers/gated_deltanet.hpp>
#include <seqmix/layers/mamba2.hpp>

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
template <std::size_t R>
tensor_view<const float, R> ro(const tensor<float, R>& t) {
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
