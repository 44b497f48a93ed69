// SPDX-License-Identifier: MIT
// MLA decode (layers/mla_attention.hpp, issue 13): one step of the expanded-K/V cache against one
// of the latent cache (absorbed decode), per layer, at Kimi-Linear-48B's MLA shape: hidden 2304,
// H 32, dn 128, dr 64 (k_rot, not rotated: NoPE), dv 128, r 512, no q-LoRA; f32 weights written
// here (random, scaled 1/sqrt(fan-in)); B = 1; L tokens already cached.
//
//   mla_decode/cache/L/threads      cache: 0 = expanded, 1 = latent
//
// The two caches hold the same tokens: random latents c (normed) and k_rot are written into the
// latent cache, and their expansion kv_b_proj(c) | k_rot into the expanded one, so the first
// step of either gives the same output (counter `rel_diff`: rel. RMS of the latent step's output
// against the expanded one's, at the same L). Each iteration appends one token and truncates it
// again (O(1)).
//
// Counters: step_bytes (bytes a step must read: weights + cache; expanded: 4·(W + H·(dn+dr+dv)·L),
// latent: 4·(W + H·r·dn + (r+dr)·L) with W the layer's weight floats; `bytes` = that per second),
// flops (2·(D·(H·(dn+dr) + r + dr) + r·H·(dn+dv) + H·dv·D) + attention: expanded
// 2·H·(dn+dr+dv)·L, latent 2·H·(2r+dr)·L), cache_bytes_per_token (4·H·(dn+dr+dv) = 40960 or
// 4·(r+dr) = 2304).
// The machine is shared with other builds: run with --benchmark_repetitions=3
// --benchmark_enable_random_interleaving=true and compare medians measured in the same run.
//
// Measured on the 2-core dev VM (Intel Xeon, Sapphire Rapids, AVX-512; 1 thread; shared with
// other builds, load average ~3.6), medians of 5 interleaved repetitions (real time; CPU time
// within 3 % of it in this run):
//
//   L cached | expanded µs/step | latent µs/step | expanded/latent | MB read per step exp / lat
//   16       |   6532           |   6475         | 1.01            |  117 /  125
//   1024     |  10729           |   8293         | 1.29            |  158 /  127
//   8192     |  36054           |  12767         | 2.82            |  452 /  144
//   32768    | 116855           |  29652         | 3.94            | 1459 /  200
//
// Noise: the 5 repetitions spread -15 % .. +10 % around these medians; an earlier run at load
// 4.5 gave real-time ratios 0.97 / 1.39 / 2.49 / 4.56 (CPU-time 0.96 / 1.35 / 2.75 / 3.74).
// Both steps pay ~6.5 ms of projections (117 MB of f32 weights at one core's bandwidth). The
// expanded step reads its cache at ~12 GB/s (memory-bound, 40960 B per token); the latent step
// reads 2304 B per token and is compute-bound, its attention at ~98 GFLOP/s (2·H·(2r+dr) =
// 69632 FLOP per cached token).
#include <cmath>
#include <filesystem>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <unistd.h>

#include <seqmix/core/io/checkpoint.hpp>
#include <seqmix/core/matmul.hpp>
#include <seqmix/core/safetensors.hpp>
#include <seqmix/layers/mla_attention.hpp>

#include "bench_common.hpp"

namespace {

using seqmix::index_t;
using seqmix::tensor;
namespace L = seqmix::layers;

L::mla_attention_config kimi48b() {
  L::mla_attention_config c;
  c.hidden = 2304;
  c.heads = 32;
  c.kv_lora_rank = 512;
  c.qk_nope_dim = 128;
  c.qk_rope_dim = 64;
  c.v_dim = 128;
  return c;
}

tensor<float, 2> random_matrix(std::mt19937_64& rng, index_t rows, index_t cols, double sd) {
  tensor<float, 2> t({rows, cols});
  std::normal_distribution<float> d(0.0f, static_cast<float>(sd));
  for (index_t i = 0; i < t.size(); ++i) t[i] = d(rng);
  return t;
}

/// Both layers (same weights) and, per L, both caches holding the same L tokens.
struct setup {
  L::mla_attention expanded, latent;
  tensor<float, 2> kv_b;  // [H·(dn+dv), r]
  std::map<index_t, std::pair<L::attention_cache, L::attention_cache>> caches;

  setup() {
    const auto c = kimi48b();
    const index_t H = c.heads, D = c.hidden, r = c.kv_lora_rank, dn = c.qk_nope_dim,
                  dr = c.qk_rope_dim, dv = c.v_dim;
    std::mt19937_64 rng(7);
    const auto path = (std::filesystem::temp_directory_path() /
                       ("seqmix_bench_mla_" + std::to_string(::getpid()) + ".safetensors"))
                          .string();
    {
      seqmix::safetensors_writer w;
      std::vector<tensor<float, 2>> keep;
      auto add = [&](const std::string& n, index_t out, index_t in) {
        keep.push_back(random_matrix(rng, out, in, 1.0 / std::sqrt(double(in))));
        w.add_as("L." + n, seqmix::tensor_view<const float, 2>(keep.back().view()),
                 seqmix::dtype::f32);
      };
      add("q_proj.weight", H * (dn + dr), D);
      add("kv_a_proj_with_mqa.weight", r + dr, D);
      add("kv_b_proj.weight", H * (dn + dv), r);
      add("o_proj.weight", D, H * dv);
      kv_b = tensor<float, 2>::copy_of(keep[2].view());
      tensor<float, 1> norm({r});
      for (index_t i = 0; i < r; ++i) norm[i] = 1.0f;
      w.add_as("L.kv_a_layernorm.weight", seqmix::tensor_view<const float, 1>(norm.view()),
               seqmix::dtype::f32);
      w.save(path);
    }
    const auto ck = seqmix::checkpoint::open(path);
    auto ce = c;
    ce.cache = L::mla_cache::expanded;
    expanded = L::mla_attention::load(ck, "L.", ce);
    ce.cache = L::mla_cache::latent;
    latent = L::mla_attention::load(ck, "L.", ce);
    std::filesystem::remove(path);
  }

  /// The caches of L tokens (built once per L): latents N(0, 1) (what the RMS norm gives),
  /// k_rot N(0, 1); the expanded cache from kv_b_proj in blocks of 1024 tokens.
  std::pair<L::attention_cache, L::attention_cache>& at(index_t len) {
    auto it = caches.find(len);
    if (it != caches.end()) return it->second;
    const auto c = kimi48b();
    const index_t H = c.heads, r = c.kv_lora_rank, dn = c.qk_nope_dim, dr = c.qk_rope_dim,
                  dv = c.v_dim;
    auto ec = expanded.make_cache(1, len + 1), lc = latent.make_cache(1, len + 1);
    std::mt19937_64 rng(static_cast<std::uint64_t>(len));
    std::normal_distribution<float> nd(0.0f, 1.0f);
    constexpr index_t blk = 1024;
    tensor<float, 2> cb({blk, r}), kvb({blk, H * (dn + dv)});
    for (index_t t0 = 0; t0 < len; t0 += blk) {
      const index_t n = std::min(blk, len - t0);
      for (index_t t = 0; t < n; ++t) {
        float* cr = lc.kv().key_row(0, 0, t0 + t);
        float* kr = lc.kv().value_row(0, 0, t0 + t);
        for (index_t e = 0; e < r; ++e) cb(t, e) = cr[e] = nd(rng);
        for (index_t e = 0; e < dr; ++e) kr[e] = nd(rng);
      }
      seqmix::linalg::matmul(cb.view().slice(0, 0, n), kv_b.view(), kvb.view().slice(0, 0, n));
      for (index_t t = 0; t < n; ++t) {
        const float* kr = lc.kv().value_row(0, 0, t0 + t);
        for (index_t h = 0; h < H; ++h) {
          float* k = ec.kv().key_row(0, h, t0 + t);
          float* v = ec.kv().value_row(0, h, t0 + t);
          std::copy_n(kvb.view().ptr({t, h * (dn + dv)}), dn, k);
          std::copy_n(kr, dr, k + dn);
          std::copy_n(kvb.view().ptr({t, h * (dn + dv) + dn}), dv, v);
        }
      }
    }
    ec.kv().set_length(0, len);
    lc.kv().set_length(0, len);
    return caches.emplace(len, std::make_pair(std::move(ec), std::move(lc))).first->second;
  }
};

setup& shared() {
  static setup s;
  return s;
}

void mla_decode(benchmark::State& state) {
  const bool lat = state.range(0) != 0;
  const index_t len = state.range(1);
  seqmix_bench::use_threads(static_cast<int>(state.range(2)));
  setup& s = shared();
  auto& [ec, lc] = s.at(len);
  const auto c = kimi48b();
  const index_t D = c.hidden, H = c.heads, r = c.kv_lora_rank, dn = c.qk_nope_dim,
                dr = c.qk_rope_dim, dv = c.v_dim;
  tensor<float, 2> x({1, D}), y({1, D}), y_other({1, D});
  std::mt19937_64 rng(1);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (index_t i = 0; i < D; ++i) x[i] = nd(rng);
  L::mla_attention& layer = lat ? s.latent : s.expanded;
  L::attention_cache& cache = lat ? lc : ec;
  {  // the other cache's output for the same token
    L::mla_attention& other = lat ? s.expanded : s.latent;
    L::attention_cache& oc = lat ? ec : lc;
    other.step(x.view(), y_other.view(), oc);
    oc.truncate(0, len);
  }
  layer.step(x.view(), y.view(), cache);  // warm
  cache.truncate(0, len);
  double num = 0, den = 0;
  for (index_t i = 0; i < D; ++i) {
    const double e = double(y[i]) - double(y_other[i]);
    num += e * e;
    den += double(y_other[i]) * double(y_other[i]);
  }
  for (auto _ : state) {
    layer.step(x.view(), y.view(), cache);
    benchmark::DoNotOptimize(y.data());
    cache.truncate(0, len);
  }
  const double wfloats = double(D * (H * (dn + dr) + r + dr) + H * (dn + dv) * r + D * H * dv);
  const double Ld = double(len);
  const double step_bytes = 4.0 * (wfloats + (lat ? double(H * r * dn) + double(r + dr) * Ld
                                                  : double(H * (dn + dr + dv)) * Ld));
  const double proj = 2.0 * double(D * (H * (dn + dr) + r + dr) + r * H * (dn + dv) + H * dv * D);
  const double attn =
      lat ? 2.0 * double(H * (2 * r + dr)) * Ld : 2.0 * double(H * (dn + dr + dv)) * Ld;
  seqmix_bench::report_rates(state, 1.0, proj + attn, step_bytes);
  state.counters["step_MB"] = step_bytes / 1e6;
  state.counters["cache_bytes_per_token"] = double(layer.cache_floats_per_token()) * 4.0;
  state.counters["rel_diff"] = den > 0 ? std::sqrt(num / den) : 0.0;
}

void args(benchmark::internal::Benchmark* b) {
  for (index_t len : {16, 1024, 8192, 32768})
    for (int lat : {0, 1}) b->Args({lat, len, 1});
}

}  // namespace

BENCHMARK(mla_decode)->Apply(args)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK_MAIN();
