// SPDX-License-Identifier: MIT
// NSA (native_sparse_attention) beside seqmix's own causal softmax, in the same run: fla's NSA
// shape, H = 16 query heads over 1 kv head, D = K = V = 64, block size 64, S = 16, fp32, B = 1.
//
//  - BM_nsa_prefill {T, threads}: forward (compressed + selected branches, no window).
//  - BM_nsa_softmax_prefill {T, threads}: softmax_attention::forward_chunked, full causal, the
//      O(T²) baseline (FLOP 2·H·T²·D).
//  - BM_nsa_selected_bound {T, threads}: the same dense flash tiles over just as many keys per
//      query as NSA selects, S·bs = 1024 (a sliding window of 1024 keys): "the time full
//      attention would take on just the selected tokens". The bound we state: NSA prefill within
//      1.5x of it (NSA also runs the compressed branch over t/64 block means and its top-k).
//  - BM_nsa_prefill_mha {T, threads}: the same 16 query heads over 16 kv heads (G = 1, MHA):
//      the same FLOPs per query head, run by the keys-along-the-lanes form (kernels/nsa.hpp).
//  - BM_nsa_decode {L, threads}: one step against an nsa_cache of L tokens (truncated back after
//      each step): reads S·bs = 1024 keys and values plus L/64 block means, about flat in L.
//  - BM_nsa_softmax_decode {L, threads}: softmax_attention::step over a kv_cache of L tokens.
// Counters: tokens/s; `keys` = keys (plus block means) visited per query and head.
//
// Measured 2026-12-02 on the 2-core Xeon (AVX-512) while 8 other agents compiled (load average
// 12-19 on 2 cores, so wall times are inflated and noisy; the 1-thread CPU-time ratios are the
// fair ones), fp32:
//   prefill T = 32768, 1 thread: NSA 2.4-2.8 s CPU; full causal softmax 26.9 s (9.7x slower);
//     dense tiles over S·bs keys 1.6-1.9 s: NSA / bound = 1.31, 1.36, 1.54 in three runs
//     (wall: 1.6-1.9). 2 threads, wall: NSA 8.8-9.6 s, softmax 120.9 s (12.6x), bound 5.6-7.4 s.
//   A later run at load 7.5: NSA / bound 1.35 (1 thread, CPU; wall 1.37), 1.46 (2 threads, wall);
//     decode at L = 65536: 111 us vs the softmax step's 11.97 ms CPU (108x).
//   decode, 1 thread, CPU: NSA 54 / 65 / 106 us at L = 4096 / 16384 / 65536 (the L/64 block
//     means equal the 1024 selected keys at L = 65536); softmax step 0.73 / 3.3 / 14.3 ms:
//     135x at L = 65536. Cache: 520 bytes per token and kv head (512 of keys and values + 8 of
//     block means); 524 since the key means are also kept transposed (keys-along-lanes form).
//   After the workspace / keys-along-lanes change, load average 13 (CPU-time medians of 3
//   interleaved repetitions, 1 thread): T = 32768 NSA 3.11 s, bound 1.94 s (1.60x), full
//   softmax 31.0 s (10.0x); decode L = 65536 118 us vs 10.0 ms (85x). MHA (G = 1, 16 kv heads)
//   over the same FLOPs: 5.2x the G = 16 time at T = 8192, 9.9x at T = 32768 (memory-bound:
//   each gathered key / value row serves one head instead of 16; was 20-100x with the heads
//   along the lanes).
#include <random>
#include <vector>

#include <seqmix/mixers/nsa.hpp>
#include <seqmix/mixers/softmax_attention.hpp>

#include "bench_common.hpp"

namespace {

using seqmix::index_t;
using seqmix::tensor;
constexpr index_t H = 16, Hkv = 1, D = 64, BS = 64, S = 16;

tensor<float, 4> random_tensor(const seqmix::shape_t<4>& shape, unsigned seed) {
  tensor<float, 4> t(shape);
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.f, 1.f);
  for (index_t i = 0; i < t.size(); ++i) t[i] = dist(rng);
  return t;
}
tensor<float, 3> gate_tensor(const seqmix::shape_t<3>& shape, unsigned seed) {
  tensor<float, 3> t(shape);
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(0.1f, 0.9f);
  for (index_t i = 0; i < t.size(); ++i) t[i] = dist(rng);
  return t;
}

seqmix::native_sparse_attention<float> make_nsa() {
  return seqmix::native_sparse_attention<float>({.block_size = BS, .block_count = S});
}

void BM_nsa_prefill(benchmark::State& state) {
  const index_t T = state.range(0);
  seqmix_bench::use_threads(static_cast<int>(state.range(1)));
  const auto q = random_tensor({1, T, H, D}, 1), k = random_tensor({1, T, Hkv, D}, 2),
             v = random_tensor({1, T, Hkv, D}, 3);
  const auto gc = gate_tensor({1, T, H}, 4), gs = gate_tensor({1, T, H}, 5);
  tensor<float, 4> o({1, T, H, D});
  const auto m = make_nsa();
  for (auto _ : state) {
    m.forward(q, k, v, {gc, gs, {}}, o);
    benchmark::DoNotOptimize(o.data());
  }
  seqmix_bench::report_rates(state, double(T), 0);
  state.counters["keys"] = double(S * BS) + double(T) / double(2 * BS);
}

// The same 16 query heads, each over its own kv head (G = 1, MHA): the same FLOPs per query
// head as BM_nsa_prefill, run by the keys-along-the-lanes form (heads along the lanes would fill
// 1 of the 16 lanes).
void BM_nsa_prefill_mha(benchmark::State& state) {
  const index_t T = state.range(0);
  seqmix_bench::use_threads(static_cast<int>(state.range(1)));
  const auto q = random_tensor({1, T, H, D}, 1), k = random_tensor({1, T, H, D}, 2),
             v = random_tensor({1, T, H, D}, 3);
  const auto gc = gate_tensor({1, T, H}, 4), gs = gate_tensor({1, T, H}, 5);
  tensor<float, 4> o({1, T, H, D});
  const auto m = make_nsa();
  for (auto _ : state) {
    m.forward(q, k, v, {gc, gs, {}}, o);
    benchmark::DoNotOptimize(o.data());
  }
  seqmix_bench::report_rates(state, double(T), 0);
  state.counters["keys"] = double(S * BS) + double(T) / double(2 * BS);
}

void BM_nsa_softmax_prefill(benchmark::State& state) {
  const index_t T = state.range(0);
  seqmix_bench::use_threads(static_cast<int>(state.range(1)));
  const auto q = random_tensor({1, T, H, D}, 1), k = random_tensor({1, T, Hkv, D}, 2),
             v = random_tensor({1, T, Hkv, D}, 3);
  tensor<float, 4> o({1, T, H, D});
  seqmix::softmax_attention<float> m;
  for (auto _ : state) {
    m.forward_chunked(q, k, v, o);
    benchmark::DoNotOptimize(o.data());
  }
  seqmix_bench::report_rates(state, double(T), 2.0 * double(H) * double(T) * double(T) * double(D));
  state.counters["keys"] = double(T + 1) / 2;
}

void BM_nsa_selected_bound(benchmark::State& state) {
  const index_t T = state.range(0);
  seqmix_bench::use_threads(static_cast<int>(state.range(1)));
  const auto q = random_tensor({1, T, H, D}, 1), k = random_tensor({1, T, Hkv, D}, 2),
             v = random_tensor({1, T, Hkv, D}, 3);
  tensor<float, 4> o({1, T, H, D});
  seqmix::softmax_attention<float> m({.window = S * BS});
  for (auto _ : state) {
    m.forward_chunked(q, k, v, o);
    benchmark::DoNotOptimize(o.data());
  }
  seqmix_bench::report_rates(state, double(T), 0);
  state.counters["keys"] = double(S * BS);
}

// Fills rows 0 .. L-1 of every sequence with random keys and values (block means included).
void fill(seqmix::kv_cache<float>& kv, index_t L) {
  std::mt19937 rng(7);
  std::normal_distribution<float> dist(0.f, 1.f);
  for (index_t h = 0; h < kv.kv_heads(); ++h)
    for (index_t t = 0; t < L; ++t) {
      float* kr = kv.key_row(0, h, t);
      float* vr = kv.value_row(0, h, t);
      for (index_t d = 0; d < D; ++d) kr[d] = dist(rng), vr[d] = dist(rng);
    }
  kv.set_length(0, L);
}

void BM_nsa_decode(benchmark::State& state) {
  const index_t L = state.range(0);
  seqmix_bench::use_threads(static_cast<int>(state.range(1)));
  const auto m = make_nsa();
  auto cache = m.make_cache(1, Hkv, D, D, L + 1);
  fill(cache.kv(), L);
  cache.complete_blocks(0, 0, L);
  const auto q = random_tensor({1, 1, H, D}, 1), k = random_tensor({1, 1, Hkv, D}, 2),
             v = random_tensor({1, 1, Hkv, D}, 3);
  tensor<float, 3> g({1, H, 1}), o({1, H, D});
  const tensor<float, 2> gc({1, H}, 0.5f);
  for (auto _ : state) {
    m.step(q.view().select<1>(0), k.view().select<1>(0), v.view().select<1>(0), {gc, gc, {}}, o,
           cache);
    cache.truncate(0, L);
    benchmark::DoNotOptimize(o.data());
  }
  seqmix_bench::report_rates(state, 1, 0);
  state.counters["keys"] = double(S * BS) + double(L) / double(BS);
  state.counters["cache_bytes_per_token"] = cache.bytes_per_token();
}

void BM_nsa_softmax_decode(benchmark::State& state) {
  const index_t L = state.range(0);
  seqmix_bench::use_threads(static_cast<int>(state.range(1)));
  seqmix::softmax_attention<float> m;
  auto cache = m.make_cache(1, Hkv, D, D, L + 1);
  fill(cache, L);
  const auto q = random_tensor({1, 1, H, D}, 1), k = random_tensor({1, 1, Hkv, D}, 2),
             v = random_tensor({1, 1, Hkv, D}, 3);
  tensor<float, 3> o({1, H, D});
  for (auto _ : state) {
    m.step(q.view().select<1>(0), k.view().select<1>(0), v.view().select<1>(0), o, cache);
    cache.truncate(0, L);
    benchmark::DoNotOptimize(o.data());
  }
  seqmix_bench::report_rates(state, 1, 4.0 * double(H) * double(L) * double(D),
                             2.0 * double(L) * double(D) * 4);
  state.counters["keys"] = double(L + 1);
}

void prefill_args(benchmark::internal::Benchmark* b) {
  for (int threads : {1, 2})
    for (index_t T : {2048, 8192, 32768}) b->Args({T, threads});
  b->ArgNames({"T", "threads"})->Unit(benchmark::kMillisecond)->UseRealTime();
}
void decode_args(benchmark::internal::Benchmark* b) {
  for (int threads : {1, 2})
    for (index_t L : {4096, 16384, 65536}) b->Args({L, threads});
  b->ArgNames({"L", "threads"})->Unit(benchmark::kMicrosecond)->UseRealTime();
}

}  // namespace

BENCHMARK(BM_nsa_prefill)->Apply(prefill_args);
BENCHMARK(BM_nsa_prefill_mha)->Apply(prefill_args);
BENCHMARK(BM_nsa_selected_bound)->Apply(prefill_args);
BENCHMARK(BM_nsa_softmax_prefill)->Apply(prefill_args);
BENCHMARK(BM_nsa_decode)->Apply(decode_args);
BENCHMARK(BM_nsa_softmax_decode)->Apply(decode_args);
BENCHMARK_MAIN();
