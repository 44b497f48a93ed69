// SPDX-License-Identifier: MIT
// The layer tier (include/seqmix/layers, issue 13) at hidden 1024: a Gated DeltaNet layer (8 key
// / 16 value heads × 64), a gated attention layer (16 heads × 64, 4 KV heads, partial RoPE 0.25)
// and a Mamba2 layer (16 heads × 64, N = 128, 1 group, chunk 256), weights f32 or bf16 as
// loaded from a checkpoint written here (random, scaled 1/sqrt(fan-in)).
//
//   layer_prefill/kind/T/threads/dtype     forward over B = 1, T tokens, fresh cache
//   layer_proj/kind/T/threads/dtype        only the layer's input and output projection GEMMs
//                                          at the same shapes (the projection share = this
//                                          time / layer_prefill's)
//   layer_decode/kind/B/threads/dtype      one step of B sequences after a 512-token prefill
//                                          (attention reads 512+ cached tokens), over copies
//                                          of the layer (> 512 MiB of weights) in turn, so
//                                          the weights come from DRAM
//   kind: 0 = gated_deltanet, 1 = gated_attention, 2 = mamba2, 3 = gla_layer (fla's defaults: 4
//   heads, expand_k 0.5 -> dk 128, dv 256, gate rank 16, no short conv), 4 = rwkv7_layer
//   (16 heads × 64, fla's default ranks w/a/v 64, g 160, layer_idx 1: with v_lora and v_first);
//   the time-mix kinds run prefill T = 4096 and decode B = 1 only; dtype: 0 = f32, 1 = bf16
//
// Counters: tokens (tokens/s); flops: layer_proj the projection FLOP 2·T·D·(in + out widths),
// layer_prefill those plus the mixer's (mixer_flops below; the time-mix kinds count projections
// only); pct_peak: flops as a share of bench_peak's FMA peak × threads (SEQMIX_BENCH_PEAK_GFLOPS,
// see bench_common.hpp); bytes (decode: the weight bytes one step streams, per second: compare
// with the machine's read bandwidth). The machine is
// shared with other agents while this runs: repeat (--benchmark_repetitions=3) and compare
// ratios measured in the same run.
#include <cmath>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <type_traits>
#include <unistd.h>
#include <vector>

#include <seqmix/core/io/checkpoint.hpp>
#include <seqmix/core/safetensors.hpp>
#include <seqmix/layers/layers.hpp>

#include "bench_common.hpp"

namespace {

using seqmix::index_t;
using seqmix::tensor;
namespace L = seqmix::layers;

constexpr index_t D = 1024;

L::gated_deltanet_config gdn_cfg() {
  L::gated_deltanet_config c;
  c.hidden = D;
  c.key_heads = 8;
  c.value_heads = 16;
  c.key_dim = 64;
  c.value_dim = 64;
  return c;
}
L::gated_attention_config attn_cfg() {
  L::gated_attention_config c;
  c.hidden = D;
  c.heads = 16;
  c.kv_heads = 4;
  c.head_dim = 64;
  c.partial_rotary = 0.25;
  return c;
}
L::mamba2_config mamba_cfg() {
  L::mamba2_config c;
  c.hidden = D;
  c.heads = 16;
  c.head_dim = 64;
  c.state_size = 128;
  c.groups = 1;
  c.chunk_size = 256;
  return c;
}

L::gla_layer_config gla_cfg() {
  L::gla_layer_config c;  // fla's GatedLinearAttention defaults at hidden 1024
  c.hidden = D;
  c.heads = 4;
  return c;
}
L::rwkv7_layer_config rwkv_cfg() {
  L::rwkv7_layer_config c;
  c.hidden = D;
  c.head_dim = 64;
  c.layer_idx = 1;
  return c;
}

struct writer {
  seqmix::safetensors_writer w;
  std::mt19937_64 rng{42};
  bool bf16 = false;
  void mat(const std::string& name, index_t r, index_t c) {
    tensor<float, 2> t({r, c});
    std::normal_distribution<float> n(0.0f, 1.0f / std::sqrt(static_cast<float>(c)));
    for (index_t i = 0; i < t.size(); ++i) t[i] = n(rng);
    w.add_as(name, t, bf16 ? seqmix::dtype::bf16 : seqmix::dtype::f32);
  }
  void vec(const std::string& name, index_t n, float mean, float sd) {
    tensor<float, 1> t({n});
    std::normal_distribution<float> d(mean, sd);
    for (index_t i = 0; i < n; ++i) t[i] = d(rng);
    w.add(name, t);
  }
  void conv(const std::string& name, index_t C, index_t K) {
    tensor<float, 3> t({C, 1, K});
    std::normal_distribution<float> n(0.0f, 0.5f);
    for (index_t i = 0; i < t.size(); ++i) t[i] = n(rng);
    w.add(name, t);
  }
};

/// A checkpoint holding the three layers under gdn. / attn. / mamba. in the given dtype.
const seqmix::checkpoint& weights(bool bf16) {
  static std::unique_ptr<seqmix::checkpoint> ck[2];
  auto& slot = ck[bf16 ? 1 : 0];
  if (slot) return *slot;
  writer w;
  w.bf16 = bf16;
  {
    const auto c = gdn_cfg();
    const index_t r = c.value_heads / c.key_heads;
    w.mat("gdn.in_proj_qkvz.weight", c.key_heads * (2 * c.key_dim + 2 * r * c.value_dim), D);
    w.mat("gdn.in_proj_ba.weight", 2 * c.value_heads, D);
    w.conv("gdn.conv1d.weight", 2 * c.key_heads * c.key_dim + c.value_heads * c.value_dim, 4);
    w.vec("gdn.A_log", c.value_heads, 1.0f, 0.5f);
    w.vec("gdn.dt_bias", c.value_heads, -2.0f, 0.5f);
    w.vec("gdn.norm.weight", c.value_dim, 1.0f, 0.2f);
    w.mat("gdn.out_proj.weight", D, c.value_heads * c.value_dim);
  }
  {
    const auto c = attn_cfg();
    w.mat("attn.q_proj.weight", 2 * c.heads * c.head_dim, D);
    w.mat("attn.k_proj.weight", c.kv_heads * c.head_dim, D);
    w.mat("attn.v_proj.weight", c.kv_heads * c.head_dim, D);
    w.mat("attn.o_proj.weight", D, c.heads * c.head_dim);
    w.vec("attn.q_norm.weight", c.head_dim, 0.0f, 0.2f);
    w.vec("attn.k_norm.weight", c.head_dim, 0.0f, 0.2f);
  }
  {
    const auto c = mamba_cfg();
    const index_t I = c.heads * c.head_dim, Cc = I + 2 * c.groups * c.state_size;
    w.mat("mamba.in_proj.weight", I + Cc + c.heads, D);
    w.conv("mamba.conv1d.weight", Cc, 4);
    w.vec("mamba.conv1d.bias", Cc, 0.0f, 0.2f);
    w.vec("mamba.A_log", c.heads, 1.0f, 0.5f);
    w.vec("mamba.dt_bias", c.heads, -2.0f, 0.5f);
    w.vec("mamba.D", c.heads, 1.0f, 0.2f);
    w.vec("mamba.norm.weight", I, 1.0f, 0.2f);
    w.mat("mamba.out_proj.weight", D, I);
  }
  {
    const auto c = gla_cfg();
    const index_t dk = D / 2 / c.heads, dv = D / c.heads;
    w.mat("gla.q_proj.weight", c.heads * dk, D);
    w.mat("gla.k_proj.weight", c.heads * dk, D);
    w.mat("gla.v_proj.weight", c.heads * dv, D);
    w.mat("gla.g_proj.weight", c.heads * dv, D);
    w.mat("gla.gk_proj.0.weight", c.gate_low_rank_dim, D);
    w.mat("gla.gk_proj.1.weight", c.heads * dk, c.gate_low_rank_dim);
    w.vec("gla.gk_proj.1.bias", c.heads * dk, 2.0f, 1.0f);
    w.vec("gla.g_norm_swish_gate.weight", dv, 1.0f, 0.2f);
    w.mat("gla.o_proj.weight", D, c.heads * dv);
  }
  {
    const index_t H = D / 64, rw = 64, ra = 64, rv = 64, rg = 160;
    for (const char* m : {"x_r", "x_w", "x_k", "x_v", "x_a", "x_g"}) {
      tensor<float, 3> t({1, 1, D});
      for (index_t i = 0; i < D; ++i) t[i] = 0.5f;
      w.w.add(std::string("rwkv.") + m, t);
    }
    w.vec("rwkv.k_k", D, 0.7f, 0.1f);
    w.vec("rwkv.k_a", D, 1.0f, 0.1f);
    {
      tensor<float, 2> t({H, 64});
      for (index_t i = 0; i < t.size(); ++i) t[i] = -0.04f;
      w.w.add("rwkv.r_k", t);
    }
    w.mat("rwkv.r_proj.weight", D, D);
    w.mat("rwkv.k_proj.weight", D, D);
    w.mat("rwkv.v_proj.weight", D, D);
    w.mat("rwkv.o_proj.weight", D, D);
    w.mat("rwkv.w_lora.lora.0.weight", rw, D);
    w.mat("rwkv.w_lora.lora.2.weight", D, rw);
    w.vec("rwkv.w_lora.lora.2.bias", D, -1.0f, 1.0f);
    w.mat("rwkv.a_lora.lora.0.weight", ra, D);
    w.mat("rwkv.a_lora.lora.2.weight", D, ra);
    w.vec("rwkv.a_lora.lora.2.bias", D, 0.0f, 0.5f);
    w.mat("rwkv.v_lora.lora.0.weight", rv, D);
    w.mat("rwkv.v_lora.lora.2.weight", D, rv);
    w.vec("rwkv.v_lora.lora.2.bias", D, 0.0f, 0.5f);
    w.mat("rwkv.g_lora.lora.0.weight", rg, D);
    w.mat("rwkv.g_lora.lora.2.weight", D, rg);
    w.vec("rwkv.g_norm.weight", D, 1.0f, 0.2f);
    w.vec("rwkv.g_norm.bias", D, 0.0f, 0.1f);
  }
  const std::string path = (std::filesystem::temp_directory_path() /
                            ("seqmix_bench_layers_" + std::to_string(::getpid()) +
                             (bf16 ? "_bf16" : "_f32") + ".safetensors"))
                               .string();
  w.w.save(path);
  slot = std::make_unique<seqmix::checkpoint>(seqmix::checkpoint::open(path));
  std::filesystem::remove(path);  // the mapping stays valid
  return *slot;
}

// projection widths (in, out) of each kind: in = fused input projection rows, out = D
index_t in_width(int kind) {
  if (kind == 3) return 3 * D + 16 + 8;              // q|k|v|g|gk_a, + gk_b (16 -> 512) as 8 rows
  if (kind == 4) return 3 * D + 2 * (3 * 64 + 160);  // r, k, v, LoRA A's and B's
  if (kind == 0) {
    const auto c = gdn_cfg();
    return 2 * c.key_heads * c.key_dim + 2 * c.value_heads * c.value_dim + 2 * c.value_heads;
  }
  if (kind == 1) {
    const auto c = attn_cfg();
    return 2 * c.heads * c.head_dim + 2 * c.kv_heads * c.head_dim;
  }
  const auto c = mamba_cfg();
  const index_t I = c.heads * c.head_dim;
  return 2 * I + 2 * c.groups * c.state_size + c.heads;
}
index_t mixer_width(int kind) {
  if (kind >= 3) return D;
  if (kind == 0) return gdn_cfg().value_heads * gdn_cfg().value_dim;
  if (kind == 1) return attn_cfg().heads * attn_cfg().head_dim;
  return mamba_cfg().heads * mamba_cfg().head_dim;
}

/// The mixer's FLOP over one sequence of T tokens as the chunked kernels compute them (multiply
/// and add count two; triangular products count their half; exponentials, norms, gates, the
/// short convolution and the state passing between chunks are not counted):
///  GDN (chunk C, H value heads, dk, dv): per chunk and head C²·(3dk + 2dv) (KKᵀ, QKᵀ, T·K, T·V,
///    (QKᵀ)·U) + C³/3 (the triangular inverse T) + 6·C·dk·dv (W·S, Q·S, Kᵀ·U);
///  causal attention (H heads, d): 2·d·T·(T + 1)·H (QKᵀ and P·V over i + 1 keys per query);
///  Mamba2 SSD (chunk C, H heads, head dim P, state N, G groups): per chunk G·C²·N (CBᵀ) +
///    H·(C²·P + 4·C·N·P) ((CBᵀ∘L)·X, Bᵀ·X into the state, C·S out of it).
double mixer_flops(int kind, index_t T) {
  const double t = double(T);
  if (kind == 0) {
    const auto c = gdn_cfg();
    const double C = double(c.chunk_size), dk = double(c.key_dim), dv = double(c.value_dim);
    const double chunks = std::ceil(t / C);
    return chunks * double(c.value_heads) *
           (C * C * (3 * dk + 2 * dv) + C * C * C / 3 + 6 * C * dk * dv);
  }
  if (kind == 1) {
    const auto c = attn_cfg();
    return 2.0 * double(c.head_dim) * t * (t + 1) * double(c.heads);
  }
  if (kind == 2) {
    const auto c = mamba_cfg();
    const double C = double(c.chunk_size), P = double(c.head_dim), N = double(c.state_size);
    const double chunks = std::ceil(t / C);
    return chunks * (double(c.groups) * C * C * N + double(c.heads) * (C * C * P + 4 * C * N * P));
  }
  return 0.0;
}

/// rwkv7_layer past layer 0 through the plain API: a fixed v_first (as from layer 0).
struct rwkv7_later {
  L::rwkv7_layer l;
  tensor<float, 3> vf3;
  tensor<float, 2> vf2;
  L::recurrent_cache make_cache(index_t B, index_t) const { return l.make_cache(B); }
  std::size_t weight_bytes() const { return l.weight_bytes(); }
  void forward(seqmix::tensor_view<const float, 3> x, seqmix::tensor_view<float, 3> y,
               L::recurrent_cache& c) {
    if (vf3.extent(0) != x.extent(0) || vf3.extent(1) != x.extent(1)) {
      vf3 = tensor<float, 3>({x.extent(0), x.extent(1), D});
      vf3.fill(0.1f);
    }
    l.forward(x, y, c, vf3.view());
  }
  void step(seqmix::tensor_view<const float, 2> x, seqmix::tensor_view<float, 2> y,
            L::recurrent_cache& c) {
    if (vf2.extent(0) != x.extent(0)) {
      vf2 = tensor<float, 2>({x.extent(0), D});
      vf2.fill(0.1f);
    }
    l.step(x, y, c, vf2.view());
  }
};

template <class F>
void with_layer(int kind, bool bf16, F&& f) {
  const auto& ck = weights(bf16);
  if (kind == 3) {
    auto l = L::gla_layer::load(ck, "gla.", gla_cfg());
    f(l);
  } else if (kind == 4) {
    rwkv7_later l{L::rwkv7_layer::load(ck, "rwkv.", rwkv_cfg()), {}, {}};
    f(l);
  } else if (kind == 0) {
    auto l = L::gated_deltanet::load(ck, "gdn.", gdn_cfg());
    f(l);
  } else if (kind == 1) {
    auto l = L::gated_attention::load(ck, "attn.", attn_cfg());
    f(l);
  } else {
    auto l = L::mamba2::load(ck, "mamba.", mamba_cfg());
    f(l);
  }
}

tensor<float, 3> random_x(index_t B, index_t T) {
  tensor<float, 3> x({B, T, D});
  std::mt19937_64 rng(7);
  std::normal_distribution<float> n(0.0f, 1.0f);
  for (index_t i = 0; i < x.size(); ++i) x[i] = n(rng);
  return x;
}

void layer_prefill(benchmark::State& state) {
  const int kind = static_cast<int>(state.range(0));
  const index_t T = state.range(1);
  seqmix_bench::use_threads(static_cast<int>(state.range(2)));
  const bool bf16 = state.range(3) != 0;
  const auto x = random_x(1, T);
  tensor<float, 3> y({1, T, D});
  with_layer(kind, bf16, [&](auto& layer) {
    for (auto _ : state) {
      auto cache = layer.make_cache(1, T);
      layer.forward(x.view(), y.view(), cache);
      benchmark::DoNotOptimize(y.data());
    }
  });
  const double flops = 2.0 * double(T) * double(D) * double(in_width(kind) + mixer_width(kind)) +
                       mixer_flops(kind, T);
  seqmix_bench::report_rates(state, double(T), flops);
  seqmix_bench::report_peak_share(state, flops, static_cast<int>(state.range(2)));
}

void layer_proj(benchmark::State& state) {
  const int kind = static_cast<int>(state.range(0));
  const index_t T = state.range(1);
  seqmix_bench::use_threads(static_cast<int>(state.range(2)));
  const bool bf16 = state.range(3) != 0;
  std::mt19937_64 rng(3);
  std::normal_distribution<float> n(0.0f, 0.03f);
  auto make = [&](index_t r, index_t c) {
    tensor<float, 2> w({r, c});
    for (index_t i = 0; i < w.size(); ++i) w[i] = n(rng);
    if (!bf16) return L::weight_matrix(std::move(w));
    tensor<seqmix::bf16, 2> b({r, c});
    for (index_t i = 0; i < w.size(); ++i) b[i] = seqmix::bf16_from_float(w[i]);
    return L::weight_matrix(std::move(b));
  };
  const auto win = make(in_width(kind), D), wout = make(D, mixer_width(kind));
  tensor<float, 2> x({T, D}), h({T, in_width(kind)}), m({T, mixer_width(kind)}), y({T, D});
  for (auto _ : state) {
    win.apply(x.view(), h.view());
    wout.apply(m.view(), y.view());
    benchmark::DoNotOptimize(y.data());
  }
  const double flops = 2.0 * double(T) * double(D) * double(in_width(kind) + mixer_width(kind));
  seqmix_bench::report_rates(state, double(T), flops);
  seqmix_bench::report_peak_share(state, flops, static_cast<int>(state.range(2)));
}

void layer_decode(benchmark::State& state) {
  const int kind = static_cast<int>(state.range(0));
  const index_t B = state.range(1);
  seqmix_bench::use_threads(static_cast<int>(state.range(2)));
  const bool bf16 = state.range(3) != 0;
  constexpr index_t L0 = 512;
  const auto hist = random_x(B, L0);
  tensor<float, 3> yh({B, L0, D});
  const auto x1 = random_x(B, 1);
  tensor<float, 2> y1({B, D});
  std::size_t wbytes = 0, cbytes = 0;
  with_layer(kind, bf16, [&](auto& layer) {
    // Copies of the layer (each with its own cache, as the layers of a model) stepped in turn,
    // > 512 MiB of weights in all, so each step reads its weights from DRAM as a model's would,
    // not from the last-level cache.
    using layer_t = std::decay_t<decltype(layer)>;
    wbytes = layer.weight_bytes();
    const std::size_t n = (std::size_t(512) << 20) / wbytes + 1;
    std::vector<layer_t> layers(n, layer);
    // one prefill; every copy's cache starts from its state
    std::vector<decltype(layer.make_cache(B, L0 + 1))> caches;
    for (auto& l : layers) caches.push_back(l.make_cache(B, L0 + 1));
    layers[0].forward(hist.view(), yh.view(), caches[0]);
    const auto snap = caches[0].snapshot();
    for (auto& c : caches) c.restore(snap);
    if (kind == 1) {
      cbytes = static_cast<std::size_t>(B * L0 * 2 * attn_cfg().kv_heads * attn_cfg().head_dim) * 4;
    }
    const seqmix::tensor_view<const float, 2> xv(x1.data(), {B, D});
    std::size_t i = 0;
    for (auto _ : state) {
      const std::size_t l = i++ % n;
      layers[l].step(xv, y1.view(), caches[l]);
      benchmark::DoNotOptimize(y1.data());
      state.PauseTiming();
      caches[l].restore(snap);  // attention: the cache would otherwise fill up
      state.ResumeTiming();
    }
  });
  // bytes: the weights and (attention) the K/V cache one step reads, per second
  seqmix_bench::report_rates(state, double(B), 0, double(wbytes + cbytes));
}

void args_prefill(benchmark::internal::Benchmark* b) {
  for (int kind : {0, 1, 2})
    for (index_t T : {512, 4096, 16384})
      for (int th : {1, 2})
        for (int dt : {0, 1}) b->Args({kind, T, th, dt});
}
void args_decode(benchmark::internal::Benchmark* b) {
  for (int kind : {0, 1, 2})
    for (index_t B : {1, 8})
      for (int th : {1, 2})
        for (int dt : {0, 1}) b->Args({kind, B, th, dt});
}
void args_timemix_prefill(benchmark::internal::Benchmark* b) {
  for (int kind : {3, 4})
    for (int th : {1, 2})
      for (int dt : {0, 1}) b->Args({kind, 4096, th, dt});
}
void args_timemix_decode(benchmark::internal::Benchmark* b) {
  for (int kind : {3, 4})
    for (int th : {1, 2})
      for (int dt : {0, 1}) b->Args({kind, 1, th, dt});
}

}  // namespace

BENCHMARK(layer_prefill)->Apply(args_prefill)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(layer_proj)->Apply(args_prefill)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(layer_decode)->Apply(args_decode)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(layer_prefill)->Apply(args_timemix_prefill)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(layer_decode)->Apply(args_timemix_decode)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK_MAIN();
