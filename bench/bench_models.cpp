// SPDX-License-Identifier: MIT
// The models tier (include/seqmix/models, issue 14): a Qwen3-Next-shaped hybrid with random
// weights, written here as a Hugging Face checkpoint folder (config.json + model.safetensors)
// and loaded by hybrid_model::load, against the same model with every layer softmax attention.
//
// Two shapes, chosen by the environment variable SEQMIX_BENCH_MODEL:
// - unset or "small" (runs on a shared 2-core machine): hidden 512, 8 layers, vocab 2048; GDN 4
//   key / 8 value heads × 64, conv 4; attention 8 heads × 64, 2 KV heads, partial RoPE 0.25;
//   MoE on every layer: 16 experts top-4, expert I = 128, shared expert 256 with its sigmoid
//   gate. ~33 M parameters. T ∈ {256, 1024, 4096}.
// - "0.5b" (issue 14's model): hidden 1024, 16 layers, vocab 32000; GDN 8 key / 16 value heads
//   × 64; attention 16 heads × 64, 2 KV heads; 64 experts top-4, I = 128, shared expert 512.
//   ~0.56 B parameters (f32: 2.2 GB), ~0.15 B active per token (embedding row + 16 layers'
//   projections, 4 experts and the shared one + lm_head). T ∈ {512, 1024, 4096, 8192, 32768}.
// Hybrid = 3:1 Gated DeltaNet : gated attention (every 4th layer attention); f32 or bf16 storage.
//
//   model_prefill/T/kind/dtype/threads   prefill of T tokens (one sequence, fresh cache), last
//                                        logits
//   model_decode/T/kind/dtype/threads    one decode step at context T (after a T-token prefill
//                                        on every thread)
//   kind: 0 = hybrid (3:1), 1 = all attention; dtype: 0 = f32, 1 = bf16; threads: 0 = all
//   (every processor since 2026-12-03; before, use_threads(0) left libgomp at 1 thread, so
//   the "0" rows recorded earlier ran on one thread)
//
// Counters: tokens/s; cache_MB (the model cache's bytes at T + the decode steps); decode also
// read_MB (weights read per token + the cache) and bytes (read_MB per step time). The hybrid's
// decode cost should grow only through its attention layers' KV reads; the all-attention
// model's through every layer's. The machine is shared while this runs: repeat and compare ratios
// measured in the same run.
//
// Measured 2026-12-02 on the 2-core Intel Xeon (AVX-512) at load average 14-16 (9 agents
// building): OMP_NUM_THREADS=1, CPU time per call (wall time was ~6x that), f32. Decode per
// token: hybrid 8.6 ms at T=256, 10.1 ms at T=4096 (x1.18); all-attention 7.7 -> 14.3 ms
// (x1.85). Prefill: hybrid 1640 tokens/s at T=1024, 1570 at 4096; all-attention 1770 ->
// 1220. Cache: hybrid 9.3 MB, all-attention 33.8 MB at T=4096. Repeat on a quiet machine.
//
// The 0.5b shape, measured 2026-12-03 on the quiet 2-core AMD EPYC VM: docs/bench/models.md
// (prefill 360 / 658 tok/s at T=1024 on 1 / 2 threads, 65-77 % of the FMA peak; decode 51.1 ms
// at T=1024 and 72.3 ms at T=32768 on 1 thread, f32, 11.8 GB/s). The 16-core device
// (2026-12-03, all 16 threads): prefill 1013 tok/s at T=1024, 875 at 32768; decode 7.2 ms at
// 1k, 10.7 ms at 32k (docs/bench/models.md).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <unistd.h>
#include <vector>

#include <nlohmann/json.hpp>

#include <seqmix/core/safetensors.hpp>
#include <seqmix/models/models.hpp>

#include "bench_common.hpp"

namespace {

using seqmix::index_t;
namespace M = seqmix::models;

struct model_shape {
  index_t D, V, L, E, I, S;  // hidden, vocab, layers, experts, expert and shared widths
  index_t gdn_k, gdn_v;      // GDN key and value heads (× 64)
  index_t heads;             // attention query heads (× 64); 2 KV heads
  std::vector<index_t> Ts;   // contexts benchmarked
};

const model_shape& shape() {
  static const model_shape s = [] {
    const char* e = std::getenv("SEQMIX_BENCH_MODEL");
    const std::string name = e ? e : "small";
    if (name == "small") return model_shape{512, 2048, 8, 16, 128, 256, 4, 8, 8, {256, 1024, 4096}};
    if (name == "0.5b")
      return model_shape{1024, 32000, 16, 64, 128, 512, 8, 16, 16, {512, 1024, 4096, 8192, 32768}};
    std::fprintf(stderr, "SEQMIX_BENCH_MODEL must be \"small\" or \"0.5b\", got \"%s\"\n",
                 name.c_str());
    std::exit(2);
  }();
  return s;
}

std::string write_model(bool all_attention, bool bf16) {
  const model_shape& sh = shape();
  const index_t D = sh.D, V = sh.V, L = sh.L, E = sh.E, I = sh.I, S = sh.S;
  const index_t nk = sh.gdn_k, nv = sh.gdn_v, nh = sh.heads;
  const auto dir = std::filesystem::temp_directory_path() /
                   ("seqmix_bench_models_" + std::to_string(::getpid()) + "_" +
                    std::to_string(int(all_attention)) + std::to_string(int(bf16)));
  std::filesystem::create_directories(dir);
  nlohmann::json cfg = {{"model_type", "qwen3_next"},
                        {"hidden_size", D},
                        {"vocab_size", V},
                        {"num_hidden_layers", L},
                        {"intermediate_size", 2 * D},
                        {"rms_norm_eps", 1e-6},
                        {"tie_word_embeddings", false},
                        {"head_dim", 64},
                        {"num_attention_heads", nh},
                        {"num_key_value_heads", 2},
                        {"partial_rotary_factor", 0.25},
                        {"rope_theta", 10000.0},
                        {"linear_conv_kernel_dim", 4},
                        {"linear_key_head_dim", 64},
                        {"linear_num_key_heads", nk},
                        {"linear_num_value_heads", nv},
                        {"linear_value_head_dim", 64},
                        {"mlp_only_layers", nlohmann::json::array()},
                        {"decoder_sparse_step", 1},
                        {"moe_intermediate_size", I},
                        {"norm_topk_prob", true},
                        {"num_experts", E},
                        {"num_experts_per_tok", 4},
                        {"shared_expert_intermediate_size", S}};
  nlohmann::json types = nlohmann::json::array();
  for (index_t i = 0; i < L; ++i)
    types.push_back(all_attention || i % 4 == 3 ? "full_attention" : "linear_attention");
  cfg["layer_types"] = types;
  std::ofstream(dir / "config.json") << cfg.dump(2);

  std::mt19937_64 rng(1234);
  seqmix::safetensors_writer w;
  auto add = [&](const std::string& name, std::vector<index_t> shape, double scale,
                 double center = 0) {
    seqmix::any_tensor t(name, bf16 && shape.size() >= 2 ? seqmix::dtype::bf16 : seqmix::dtype::f32,
                         shape);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    const auto n = static_cast<std::size_t>(t.size());
    if (t.type() == seqmix::dtype::bf16) {
      auto* d = reinterpret_cast<seqmix::bf16*>(t.mutable_data());
      for (std::size_t i = 0; i < n; ++i)
        d[i] = seqmix::bf16_from_float(static_cast<float>(center + scale * nd(rng)));
    } else {
      auto* d = reinterpret_cast<float*>(t.mutable_data());
      for (std::size_t i = 0; i < n; ++i) d[i] = static_cast<float>(center + scale * nd(rng));
    }
    w.add(std::move(t));
  };
  auto mat = [&](const std::string& name, index_t rows, index_t cols) {
    add(name, {rows, cols}, 1.0 / std::sqrt(double(cols)));
  };
  mat("model.embed_tokens.weight", V, D);
  mat("lm_head.weight", V, D);
  add("model.norm.weight", {D}, 0.1);
  for (index_t i = 0; i < L; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    add(p + "input_layernorm.weight", {D}, 0.1);
    add(p + "post_attention_layernorm.weight", {D}, 0.1);
    if (all_attention || i % 4 == 3) {
      mat(p + "self_attn.q_proj.weight", 2 * nh * 64, D);
      mat(p + "self_attn.k_proj.weight", 2 * 64, D);
      mat(p + "self_attn.v_proj.weight", 2 * 64, D);
      mat(p + "self_attn.o_proj.weight", D, nh * 64);
      add(p + "self_attn.q_norm.weight", {64}, 0.1);
      add(p + "self_attn.k_norm.weight", {64}, 0.1);
    } else {
      mat(p + "linear_attn.in_proj_qkvz.weight", 2 * nk * 64 + 2 * nv * 64, D);
      mat(p + "linear_attn.in_proj_ba.weight", 2 * nv, D);
      add(p + "linear_attn.conv1d.weight", {2 * nk * 64 + nv * 64, 1, 4}, 0.5);
      add(p + "linear_attn.A_log", {nv}, 0.5, 1.0);
      add(p + "linear_attn.dt_bias", {nv}, 0.5, -2.0);
      add(p + "linear_attn.norm.weight", {64}, 0.1, 1.0);
      mat(p + "linear_attn.out_proj.weight", D, nv * 64);
    }
    mat(p + "mlp.gate.weight", E, D);
    for (index_t e = 0; e < E; ++e) {
      const std::string q = p + "mlp.experts." + std::to_string(e) + ".";
      mat(q + "gate_proj.weight", I, D);
      mat(q + "up_proj.weight", I, D);
      mat(q + "down_proj.weight", D, I);
    }
    mat(p + "mlp.shared_expert.gate_proj.weight", S, D);
    mat(p + "mlp.shared_expert.up_proj.weight", S, D);
    mat(p + "mlp.shared_expert.down_proj.weight", D, S);
    mat(p + "mlp.shared_expert_gate.weight", 1, D);
  }
  w.save((dir / "model.safetensors").string());
  return dir.string();
}

M::hybrid_model& model(bool all_attention, bool bf16) {
  static std::map<int, std::unique_ptr<M::hybrid_model>> cache;
  const int key = int(all_attention) * 2 + int(bf16);
  auto& m = cache[key];
  if (!m) {
    const std::string dir = write_model(all_attention, bf16);
    m = std::make_unique<M::hybrid_model>(M::hybrid_model::load(dir));
    std::filesystem::remove_all(dir);
  }
  return *m;
}

std::vector<std::int64_t> prompt(index_t T) {
  std::vector<std::int64_t> ids(static_cast<std::size_t>(T));
  for (index_t t = 0; t < T; ++t) ids[static_cast<std::size_t>(t)] = (t * 7919 + 13) % shape().V;
  return ids;
}

/// Weight bytes one decode token reads: the embedding row, every layer's projections and norms'
/// vectors (ignored: < 0.1 %), the router, top-4 experts and the shared expert, and the lm_head.
double active_weight_bytes(bool all_attention, bool bf16) {
  const model_shape& sh = shape();
  const double D = double(sh.D), nk = double(sh.gdn_k), nv = double(sh.gdn_v);
  const double nh = double(sh.heads);
  const double gdn = (2 * nk * 64 + 2 * nv * 64) * D + 2 * nv * D + D * nv * 64;
  const double attn = (2 * nh * 64 + 2 * 2 * 64) * D + D * nh * 64;
  const double moe = double(sh.E) * D + 4 * 3 * double(sh.I) * D + 3 * double(sh.S) * D + D;
  double n = D + double(sh.V) * D;
  for (index_t i = 0; i < sh.L; ++i) n += (all_attention || i % 4 == 3 ? attn : gdn) + moe;
  return n * (bf16 ? 2.0 : 4.0);
}

// Arguments: T, kind (0 hybrid, 1 all attention), dtype (0 f32, 1 bf16), threads (0: all).
void model_prefill(benchmark::State& st) {
  const index_t T = st.range(0);
  auto& m = model(st.range(1) != 0, st.range(2) != 0);
  const auto ids = prompt(T);
  auto cache = m.make_cache(1, T);
  seqmix_bench::use_threads(static_cast<int>(st.range(3)));
  for (auto _ : st) {
    cache.reset();
    auto logits = m.prefill(ids, {}, cache, M::logits_mode::last);
    benchmark::DoNotOptimize(logits.data());
  }
  st.counters["tokens"] =
      benchmark::Counter(double(T) * double(st.iterations()), benchmark::Counter::kIsRate);
  st.counters["cache_MB"] = double(cache.bytes()) / 1e6;
  seqmix_bench::use_threads(0);
}

constexpr int decode_steps = 32;

// The context's prefill runs on every thread (setup, not timed); the decode steps on `threads`.
// read_MB: the weights a token reads plus the whole cache (KV of the attention layers, conv and
// recurrent states); bytes/s = read_MB per step time, against the DRAM bandwidth.
void model_decode(benchmark::State& st) {
  const index_t T = st.range(0);
  const bool all_attention = st.range(1) != 0, bf16 = st.range(2) != 0;
  auto& m = model(all_attention, bf16);
  const auto ids = prompt(T);
  auto cache = m.make_cache(1, T + decode_steps + 1);
  seqmix_bench::use_threads(0);
  m.prefill(ids, {}, cache, M::logits_mode::last);
  seqmix_bench::use_threads(static_cast<int>(st.range(3)));
  seqmix::tensor<float, 2> logits({1, shape().V});
  std::vector<std::int64_t> next{1};
  m.decode_into(next, cache, logits.view());  // warm
  for (auto _ : st) {
    m.decode_into(next, cache, logits.view());
    benchmark::DoNotOptimize(logits.data());
  }
  const double read = active_weight_bytes(all_attention, bf16) + double(cache.bytes());
  st.counters["tokens"] = benchmark::Counter(double(st.iterations()), benchmark::Counter::kIsRate);
  st.counters["cache_MB"] = double(cache.bytes()) / 1e6;
  st.counters["read_MB"] = read / 1e6;
  st.counters["bytes"] =
      benchmark::Counter(read * double(st.iterations()), benchmark::Counter::kIsRate);
  seqmix_bench::use_threads(0);
}

// kind × T in f32 on every thread, then T = 1024 in bf16; then 1 and 2 threads (f32, hybrid and
// all attention) at the contexts up to 4096. Filter with --benchmark_filter: the all-attention
// prefill at T = 32768 of the 0.5b shape is ~50 TFLOP.
void model_args(benchmark::internal::Benchmark* b, bool decode) {
  for (int kind : {0, 1})
    for (index_t T : shape().Ts) b->Args({T, kind, 0, 0});
  b->Args({1024, 0, 1, 0});
  b->Args({1024, 1, 1, 0});
  for (int threads : {1, 2})
    for (int kind : {0, 1})
      for (index_t T : shape().Ts)
        if (decode || T <= 4096) b->Args({T, kind, 0, threads});
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}
void prefill_args(benchmark::internal::Benchmark* b) {
  model_args(b, false);
}
void decode_args(benchmark::internal::Benchmark* b) {
  model_args(b, true);
  b->Iterations(decode_steps);
}

}  // namespace

BENCHMARK(model_prefill)->Apply(prefill_args);
BENCHMARK(model_decode)->Apply(decode_args);

BENCHMARK_MAIN();
