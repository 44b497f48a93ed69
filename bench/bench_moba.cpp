// SPDX-License-Identifier: MIT
// MoBA benchmarks (issue 12): B = 1, H = 8 query heads over Hkv = 2 kv heads, K = V = D = 64,
// chunk c = 64, top-k = 8, fp32, beside seqmix's own softmax attention in the same run.
//
//  - BM_moba_prefill {T, threads}: moba_attention::forward. FLOP counted = the selected
//      (query, key) pairs · 4·D per head (QKᵀ and PV) + the gates 2·D per (query, earlier
//      chunk); counter `pairs` = selected pairs per query and head.
//  - BM_moba_full_causal_prefill {T, threads}: softmax_attention::forward_chunked, causal,
//      same heads: FLOP = 2·H·T²·D (the O(N²) baseline).
//  - BM_moba_selected_bound {T, threads}: "full attention on just the selected tokens": dense
//      flash tiles over the same number of (query, key) pairs, i.e. sliding-window attention with
//      W = (k-1)·c + c/2 = 480 keys per query (a MoBA query at steady state sees (k-1)·c keys
//      of earlier chunks and on average (c+1)/2 of its own). MoBA's gate (T·(T/c)·D/2 more
//      multiply-adds, inherent to the method) is not in this bound.
//  - BM_moba_decode {L, threads}: one moba step against a cache of L tokens (truncated back to L
//      after each step; L a multiple of c, so that is O(1)). counter cache_bytes_per_token.
//  - BM_moba_full_decode {L, threads}: softmax_attention::step against a full kv_cache of L.
//
// Measured (2026-12-02, the 2-core Intel Xeon with AVX-512, load average 14-19 from other
// builds: CPU-time ratios, same run; the wall times were 4-8x the CPU times):
//   prefill T = 32768, 1 thread: full causal 15438 ms, MoBA 823 ms (18.8x faster), selected
//     bound 563 ms (MoBA 1.46x of it; 1.6-1.9x in quieter A/B runs of the two alone);
//     2 threads (main thread's CPU time): 9144 / 487 / 285 ms (18.8x, 1.71x).
//     T = 8192, 1 thread: 811 / 143 / 131 ms (5.7x, 1.09x).
//   decode, 1 thread: MoBA 68 / 114 / 170 us at L = 4096 / 16384 / 65536, full decode 788 /
//     5437 / 11439 us (67x at 65536). MoBA's growth with L is its selected keys coming from
//     DRAM instead of cache (8 heads x ~480 keys x 512 B = 1.9 MB a step), not its gates.
//   prefill, steady state (one untimed call first; 2026-12-03, same Xeon, quiet, min_time 2-3 s,
//     4 runs): T = 32768, 1 thread MoBA 555-576 ms, selected bound 358-384 ms (1.45-1.59x,
//     median 1.53x); 2 threads 281-295 / 187-193 ms (1.49-1.58x). Profile (1 thread): earlier
//     chunks' rows 52 %, gates + top-k 21 %, own chunk 8 %, selection inversion and
//     epilogue 5 %, the K/V copy 4 % (reading the inputs in place instead, stride Hkv·K, was
//     no faster: tried, dropped).
//   decode after the GQA-grouped row path (2026-12-03, same Xeon, quiet, 3 interleaved rounds
//     old / new, 1 thread): MoBA 41-43 -> 30-33 us at L = 4096, 111-117 -> 86-100 us at 65536;
//     full decode 250 -> 171-204 us, 4551-6510 -> 3822-4543 us (moba_attention::step's
//     selected chunks now go through the same decode engine as softmax_attention::step).
//   cache: 1032 bytes per token (Hkv = 2, D = 64: 1024 of keys and values, 8 of chunk means).
//   2026-12-04: the 2-core AMD EPYC (bench_peak 108 GFLOP/s), quiet, T = 32768, 1 thread: MoBA
//     786 ms, selected bound 459 ms (1.71x; T = 8192: 149 / 115 ms, 1.30x). Profile: earlier
//     chunks' rows 53 % (at the bound's own rate, ~71 GFLOP/s; a third of it the per-row softmax),
//     gates + top-k 22 % (the gate FMAs at ~79 ms are at the FMA peak; the top-k the rest),
//     own chunk 8 %, K/V tile transposes and prefetches 5.5 %, copies 4 %, inversion 3.5 %. The
//     per-row softmax of the earlier-chunk rows now takes the R rows' rescale factors from one
//     vector exp (it was a libm exp per row) and each row max from a shuffle tree: on the
//     16-core Xeon device, 1 thread, 4 interleaved rounds, MoBA 569-641 -> 495-560 ms (median
//     577 -> 549), selected bound 340-377 ms (median 358): 1.61x -> 1.53x. Tried and dropped: a
//     parallel (bottom-up) top-k insertion instead of the sinking one (no faster: its
//     data-dependent branches cost what the serial chain did), and a two-pass top-k (a
//     threshold from 8-chunk group maxima, then scalar insertion of the candidates: no faster).
#include <random>
#include <vector>

#include <seqmix/mixers/moba.hpp>
#include <seqmix/mixers/sliding_window_attention.hpp>
#include <seqmix/mixers/softmax_attention.hpp>

#include "bench_common.hpp"

namespace {

using seqmix::index_t;
using seqmix::tensor;
constexpr index_t H = 8, Hkv = 2, D = 64, C = 64, TOPK = 8;

tensor<float, 4> random_tensor(const seqmix::shape_t<4>& shape, unsigned seed) {
  tensor<float, 4> t(shape);
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.f, 1.f);
  for (index_t i = 0; i < t.size(); ++i) t[i] = dist(rng);
  return t;
}

seqmix::moba_attention<float> moba() {
  seqmix::moba_attention<float>::options o;
  o.chunk_size = C;
  o.top_k = TOPK;
  return seqmix::moba_attention<float>(o);
}

// selected (query, key) pairs and gate products of one head over T tokens
double moba_pairs(index_t T) {
  double pairs = 0;
  for (index_t t = 0; t < T; ++t) pairs += double(std::min(t / C, TOPK - 1) * C + t % C + 1);
  return pairs;
}
double moba_gates(index_t T) {
  double g = 0;
  for (index_t t = 0; t < T; ++t) g += double(t / C);
  return g;
}

void BM_moba_prefill(benchmark::State& state) {
  const index_t T = state.range(0);
  seqmix_bench::use_threads(int(state.range(1)));
  const auto q = random_tensor({1, T, H, D}, 1), k = random_tensor({1, T, Hkv, D}, 2),
             v = random_tensor({1, T, Hkv, D}, 3);
  tensor<float, 4> o({1, T, H, D});
  const auto m = moba();
  // one untimed call first: the threads' workspaces then hold their high-water mark, so the
  // timed calls are the steady state (at T = 32768 an iteration takes ~0.6 s and Google
  // Benchmark may time a single one; a cold first call spent ~15 % of it faulting in pages)
  m.forward(q.view(), k.view(), v.view(), o.view());
  for (auto _ : state) {
    m.forward(q.view(), k.view(), v.view(), o.view());
    benchmark::DoNotOptimize(o.data());
  }
  const double pairs = moba_pairs(T);
  seqmix_bench::report_rates(
      state, double(T), double(H) * (4.0 * double(D) * pairs + 2.0 * double(D) * moba_gates(T)));
  state.counters["pairs"] = pairs / double(T);
}

void BM_moba_full_causal_prefill(benchmark::State& state) {
  const index_t T = state.range(0);
  seqmix_bench::use_threads(int(state.range(1)));
  const auto q = random_tensor({1, T, H, D}, 1), k = random_tensor({1, T, Hkv, D}, 2),
             v = random_tensor({1, T, Hkv, D}, 3);
  tensor<float, 4> o({1, T, H, D});
  const seqmix::softmax_attention<float> m;
  for (auto _ : state) {
    m.forward_chunked(q.view(), k.view(), v.view(), o.view());
    benchmark::DoNotOptimize(o.data());
  }
  seqmix_bench::report_rates(state, double(T), 2.0 * double(H) * double(T) * double(T) * double(D));
}

void BM_moba_selected_bound(benchmark::State& state) {
  const index_t T = state.range(0);
  seqmix_bench::use_threads(int(state.range(1)));
  const auto q = random_tensor({1, T, H, D}, 1), k = random_tensor({1, T, Hkv, D}, 2),
             v = random_tensor({1, T, Hkv, D}, 3);
  tensor<float, 4> o({1, T, H, D});
  const index_t W = (TOPK - 1) * C + C / 2;
  seqmix::softmax_attention<float>::options opt;
  opt.window = W;
  const seqmix::softmax_attention<float> m(opt);
  m.forward_chunked(q.view(), k.view(), v.view(), o.view());  // untimed, as in BM_moba_prefill
  for (auto _ : state) {
    m.forward_chunked(q.view(), k.view(), v.view(), o.view());
    benchmark::DoNotOptimize(o.data());
  }
  double pairs = 0;
  for (index_t t = 0; t < T; ++t) pairs += double(std::min(t + 1, W));
  seqmix_bench::report_rates(state, double(T), double(H) * 4.0 * double(D) * pairs);
  state.counters["pairs"] = pairs / double(T);
}

// a cache of L random tokens (keys, values, then the chunk means rebuilt by restore)
seqmix::kv_cache_snapshot<float> random_snapshot(index_t L) {
  seqmix::kv_cache_snapshot<float> s;
  s.lengths = {L};
  s.capacity = L + 1;
  s.keys = random_tensor({1, Hkv, L, D}, 4);
  s.values = random_tensor({1, Hkv, L, D}, 5);
  return s;
}

void BM_moba_decode(benchmark::State& state) {
  const index_t L = state.range(0);
  seqmix_bench::use_threads(int(state.range(1)));
  const auto m = moba();
  auto cache = m.make_cache(1, Hkv, D, D, L + 1);
  cache.restore({random_snapshot(L), C});
  const auto q = random_tensor({1, 1, H, D}, 6), k = random_tensor({1, 1, Hkv, D}, 7),
             v = random_tensor({1, 1, Hkv, D}, 8);
  tensor<float, 3> o({1, H, D});
  const auto q1 = q.view().select<1>(0), k1 = k.view().select<1>(0), v1 = v.view().select<1>(0);
  for (auto _ : state) {
    m.step(q1, k1, v1, o.view(), cache);
    cache.truncate(0, L);
    benchmark::DoNotOptimize(o.data());
  }
  state.counters["cache_bytes_per_token"] = double(cache.storage_bytes()) / double(L + 1);
}

void BM_moba_full_decode(benchmark::State& state) {
  const index_t L = state.range(0);
  seqmix_bench::use_threads(int(state.range(1)));
  const seqmix::softmax_attention<float> m;
  auto cache = m.make_cache(1, Hkv, D, D, L + 1);
  cache.restore(random_snapshot(L));
  const auto q = random_tensor({1, 1, H, D}, 6), k = random_tensor({1, 1, Hkv, D}, 7),
             v = random_tensor({1, 1, Hkv, D}, 8);
  tensor<float, 3> o({1, H, D});
  const auto q1 = q.view().select<1>(0), k1 = k.view().select<1>(0), v1 = v.view().select<1>(0);
  for (auto _ : state) {
    m.step(q1, k1, v1, o.view(), cache);
    cache.truncate(0, L);
    benchmark::DoNotOptimize(o.data());
  }
  state.counters["cache_bytes_per_token"] = double(cache.storage_bytes()) / double(L + 1);
  state.counters["bytes"] = benchmark::Counter(double(Hkv) * double(L) * 2.0 * double(D) * 4.0,
                                               benchmark::Counter::kIsIterationInvariantRate);
}

}  // namespace

BENCHMARK(BM_moba_prefill)
    ->Unit(benchmark::kMillisecond)
    ->ArgsProduct({{2048, 8192, 32768}, {1, 2}})
    ->Args({65536, 2});
BENCHMARK(BM_moba_selected_bound)
    ->Unit(benchmark::kMillisecond)
    ->ArgsProduct({{2048, 8192, 32768}, {1, 2}});
BENCHMARK(BM_moba_full_causal_prefill)
    ->Unit(benchmark::kMillisecond)
    ->ArgsProduct({{2048, 8192, 32768}, {1, 2}})
    ->Iterations(1);
BENCHMARK(BM_moba_decode)
    ->Unit(benchmark::kMicrosecond)
    ->ArgsProduct({{4096, 16384, 65536}, {1, 2}});
BENCHMARK(BM_moba_full_decode)
    ->Unit(benchmark::kMicrosecond)
    ->ArgsProduct({{4096, 16384, 65536}, {1, 2}});

BENCHMARK_MAIN();
