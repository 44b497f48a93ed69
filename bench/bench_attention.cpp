// SPDX-License-Identifier: MIT
// Softmax attention family benchmarks (B = 1, H = 8 query heads = 8 kv heads, K = V = D, fp32).
//
//  - BM_softmax_attention_prefill  {T, D, threads}: causal forward_chunked (flash-style tiles).
//      FLOP = H · (2·T²·D [QKᵀ] + 2·T²·D [PV]) / 2 (causal half) = 2·H·T²·D.
//  - BM_softmax_attention_decode   {L, D, Hkv, threads}: one step against a full cache of L
//      tokens (written directly, truncated back to L after each step); Hkv = 8 (MHA), 2 (GQA,
//      4 query heads per kv head) or 1 (8 per kv head, as Qwen3-Next's 16 / 2). bytes =
//      Hkv·(L+1)·2·D·4 (K and V read once: the split-KV decode reads each kv head's rows once for
//      its query heads); FLOP = H · 4·(L+1)·D. Beyond the L3 (L·Hkv·D large) this is the DRAM read
//      rate; below it, cache-resident. threads: 1, 2 and the powers of two up to the machine's
//      hardware threads (seqmix_bench::thread_counts).
//  - BM_softmax_attention_short_prefill {L, n, Hkv, threads}: n new tokens into a cache of L
//      (D = 128); n <= 16 takes the split-KV row path, n = 17 the 64-row query tiles.
//  - BM_sliding_window_attention_prefill {T, W, threads}: D = 64; FLOP = 2·H·D·Σ_t min(t+1, W)·2
//      (QKᵀ and PV over the visible keys only): linear in T.
//  - BM_sliding_window_attention_step {L, W, threads}: D = 64, one step against a ring of W rows
//      after L tokens: bytes = H·min(L, W)·2·D·4, constant in L.
//  - BM_softmax_attention_peer_{prefill,decode}: the ggml flash_attn_ext shapes (H = 8, D = 64,
//      T = 2048 / 8192 prefill, decode at L = 8192); counter `x_ggml` = ggml's time / ours
//      (ggml fp32, measured on this machine kind: docs/bench/peers.md).
#include <random>
#include <vector>

#include <seqmix/mixers/sliding_window_attention.hpp>
#include <seqmix/mixers/softmax_attention.hpp>

#include "bench_common.hpp"

namespace {

using seqmix::index_t;
using seqmix::tensor;
constexpr index_t H = 8;

tensor<float, 4> random_tensor(const seqmix::shape_t<4>& shape, unsigned seed) {
  tensor<float, 4> t(shape);
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.f, 1.f);
  for (index_t i = 0; i < t.size(); ++i) t[i] = dist(rng);
  return t;
}

double causal_flops(index_t T, index_t D) {
  return 2.0 * double(H) * double(T) * double(T) * double(D);
}

void prefill(benchmark::State& state, double ggml_seconds) {
  const index_t T = state.range(0), D = state.range(1);
  seqmix_bench::use_threads(static_cast<int>(state.range(2)));
  const auto q = random_tensor({1, T, H, D}, 1), k = random_tensor({1, T, H, D}, 2),
             v = random_tensor({1, T, H, D}, 3);
  tensor<float, 4> o({1, T, H, D});
  seqmix::softmax_attention<float> m;
  for (auto _ : state) {
    m.forward_chunked(q, k, v, o);
    benchmark::DoNotOptimize(o.data());
  }
  seqmix_bench::report_rates(state, double(T), causal_flops(T, D));
  if (ggml_seconds > 0) {
    state.counters["x_ggml"] =
        benchmark::Counter(ggml_seconds, benchmark::Counter::kIsIterationInvariantRate);
  }
}

// A full cache of L tokens of random rows, written directly (a causal prefill of L = 64k would
// take minutes).
seqmix::kv_cache<float> filled_cache(index_t L, index_t Hkv, index_t D, index_t extra) {
  auto cache = seqmix::kv_cache<float>::full(1, Hkv, D, D, L + extra);
  std::mt19937 rng(7);
  std::normal_distribution<float> dist(0.f, 1.f);
  for (index_t h = 0; h < Hkv; ++h) {
    for (index_t t = 0; t < L; ++t) {
      float* kr = cache.key_row(0, h, t);
      float* vr = cache.value_row(0, h, t);
      for (index_t d = 0; d < D; ++d) kr[d] = dist(rng), vr[d] = dist(rng);
    }
  }
  cache.set_length(0, L);
  return cache;
}

// One decode step against L cached tokens (then truncated back to L): bytes = Hkv·(L+1)·2·D·4.
void decode(benchmark::State& state, index_t L, index_t D, index_t Hkv, int threads,
            double ggml_seconds) {
  seqmix_bench::use_threads(threads);
  seqmix::softmax_attention<float> m;
  auto cache = filled_cache(L, Hkv, D, 1);
  const auto q1 = random_tensor({1, 1, H, D}, 4), k1 = random_tensor({1, 1, Hkv, D}, 5),
             v1 = random_tensor({1, 1, Hkv, D}, 6);
  tensor<float, 4> o1({1, 1, H, D});
  for (auto _ : state) {
    m.step(q1.select<1>(0), k1.select<1>(0), v1.select<1>(0), o1.select<1>(0), cache);
    cache.truncate(0, L);
    benchmark::DoNotOptimize(o1.data());
  }
  const double keys = double(L + 1);
  seqmix_bench::report_rates(state, 1.0, 4.0 * double(H) * keys * double(D),
                             double(Hkv) * keys * 2.0 * double(D) * 4.0);
  state.counters["cache_MB"] = double(Hkv) * keys * 2.0 * double(D) * 4.0 / 1e6;
  if (ggml_seconds > 0) {
    state.counters["x_ggml"] =
        benchmark::Counter(ggml_seconds, benchmark::Counter::kIsIterationInvariantRate);
  }
}

void BM_softmax_attention_prefill(benchmark::State& state) {
  prefill(state, 0);
}
void BM_softmax_attention_decode(benchmark::State& state) {
  decode(state, state.range(0), state.range(1), state.range(2), static_cast<int>(state.range(3)),
         0);
}

// n new tokens (a short prefill: the split-KV row path for n <= 16) into a cache of L tokens,
// truncated back after each call. bytes = Hkv·(L+n)·2·D·4 (the cache read once), D = 128.
void BM_softmax_attention_short_prefill(benchmark::State& state) {
  const index_t L = state.range(0), n = state.range(1), Hkv = state.range(2), D = 128;
  seqmix_bench::use_threads(static_cast<int>(state.range(3)));
  seqmix::softmax_attention<float> m;
  auto cache = filled_cache(L, Hkv, D, n);
  const auto q = random_tensor({1, n, H, D}, 4), k = random_tensor({1, n, Hkv, D}, 5),
             v = random_tensor({1, n, Hkv, D}, 6);
  tensor<float, 4> o({1, n, H, D});
  for (auto _ : state) {
    m.forward(q, k, v, o, cache);
    cache.truncate(0, L);
    benchmark::DoNotOptimize(o.data());
  }
  const double keys = double(L + n);
  seqmix_bench::report_rates(state, double(n), 4.0 * double(H) * keys * double(n) * double(D),
                             double(Hkv) * keys * 2.0 * double(D) * 4.0);
}

// ggml flash_attn_ext, fp32 KV, H=8, D=64 (docs/bench/peers.md): prefill T=2048 164 / 81 ms,
// T=8192 2.74 / 1.33 s; decode at L=8192 1.8 / 1.08 ms (1 / 2 threads).
void BM_softmax_attention_peer_prefill(benchmark::State& state) {
  const bool one = state.range(2) == 1;
  const double ggml = state.range(0) == 2048 ? (one ? 0.164 : 0.081) : (one ? 2.74 : 1.33);
  prefill(state, ggml);
}
void BM_softmax_attention_peer_decode(benchmark::State& state) {
  decode(state, state.range(0), state.range(1), H, static_cast<int>(state.range(2)),
         state.range(2) == 1 ? 1.8e-3 : 1.08e-3);
}

void BM_sliding_window_attention_prefill(benchmark::State& state) {
  const index_t T = state.range(0), W = state.range(1), D = 64;
  seqmix_bench::use_threads(static_cast<int>(state.range(2)));
  const auto q = random_tensor({1, T, H, D}, 1), k = random_tensor({1, T, H, D}, 2),
             v = random_tensor({1, T, H, D}, 3);
  tensor<float, 4> o({1, T, H, D});
  seqmix::sliding_window_attention<float> m({.window = W});
  for (auto _ : state) {
    m.forward_chunked(q, k, v, o);
    benchmark::DoNotOptimize(o.data());
  }
  double visible = 0;  // Σ_t min(t+1, W)
  for (index_t t = 0; t < T; ++t) visible += double(std::min(t + 1, W));
  seqmix_bench::report_rates(state, double(T), double(H) * visible * 4.0 * double(D));
}

void BM_sliding_window_attention_step(benchmark::State& state) {
  const index_t L = state.range(0), W = state.range(1), D = 64;
  seqmix_bench::use_threads(static_cast<int>(state.range(2)));
  seqmix::sliding_window_attention<float> m({.window = W});
  auto cache = m.make_cache(1, H, D, D);
  const auto q = random_tensor({1, L, H, D}, 1), k = random_tensor({1, L, H, D}, 2),
             v = random_tensor({1, L, H, D}, 3);
  tensor<float, 4> o({1, L, H, D});
  m.forward_chunked(q, k, v, o, cache);
  tensor<float, 3> o1({1, H, D});
  index_t t = 0;
  for (auto _ : state) {  // keeps decoding (the ring never fills up): cost independent of L
    m.step(q.select<1>(t % L), k.select<1>(t % L), v.select<1>(t % L), o1, cache);
    ++t;
    benchmark::DoNotOptimize(o1.data());
  }
  const double keys = double(std::min(L, W));
  seqmix_bench::report_rates(state, 1.0, 4.0 * double(H) * keys * double(D),
                             double(H) * keys * 2.0 * double(D) * 4.0);
  state.counters["cache_bytes"] = double(cache.storage_bytes());
}

}  // namespace

// D = 128 stops at T = 8192 and D = 64 at T = 16384: one causal prefill there takes 2.5-6 s on
// 1 thread (T = 32768 would take 10-25 s per iteration).
BENCHMARK(BM_softmax_attention_prefill)
    ->ArgNames({"T", "D", "threads"})
    ->ArgsProduct({{512, 1024, 2048, 4096, 8192}, {64, 128}, {1, 2}})
    ->Args({16384, 64, 2})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_softmax_attention_decode)
    ->ArgNames({"L", "D", "Hkv", "threads"})
    ->ArgsProduct({{1024, 4096, 8192, 16384, 32768, 65536},
                   {64, 128},
                   {8, 2, 1},
                   seqmix_bench::thread_counts()})
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_softmax_attention_short_prefill)
    ->ArgNames({"L", "n", "Hkv", "threads"})
    ->ArgsProduct({{8192, 32768}, {4, 16, 17}, {8}, {1, 2}})
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_softmax_attention_peer_prefill)
    ->ArgNames({"T", "D", "threads"})
    ->ArgsProduct({{2048, 8192}, {64}, {1, 2}})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_softmax_attention_peer_decode)
    ->ArgNames({"L", "D", "threads"})
    ->ArgsProduct({{8192}, {64}, {1, 2}})
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_sliding_window_attention_prefill)
    ->ArgNames({"T", "W", "threads"})
    ->ArgsProduct({{1024, 2048, 4096, 8192, 16384, 32768}, {512}, {1, 2}})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_sliding_window_attention_step)
    ->ArgNames({"L", "W", "threads"})
    ->ArgsProduct({{1024, 8192, 32768}, {512}, {1, 2}})
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);

BENCHMARK_MAIN();
