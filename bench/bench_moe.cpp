// SPDX-License-Identifier: MIT
// seqmix::moe, the full MoE feed-forward block (router + top-k + SwiGLU experts + combine), in
// both forms (docs/math.md §6; peer figures: docs/bench/peers.md, ggml mul_mat_id).
//
//   moe_grouped/E/k/D/I/T/threads/skew/packed   forward_grouped, f32 weights; skew = 1: a
//                                        router bias toward expert 0 (it gets most first
//                                        choices), to show the load balance over threads;
//                                        packed: moe_options::pack_experts (1, the
//                                        default) or off (0: B packed per call)
//   moe_read_bound/k/D/I/threads/wbytes  a plain read of the bytes one decode token reads, in
//                                        the same process (the bandwidth bound)
//   moe_decode/dtype/E/k/D/I/threads/packed   forward_per_token on one token (T = 1),
//                                        rotating over copies of the block (> 512 MiB of
//                                        weights in all, so the experts come from DRAM);
//                                        packed as above (the GEMVs on the panels)
//
// Counters: tokens (tokens/s); GFLOPs of the block, cost convention 2·T·D·E (router) +
// 2·T·k·3·D·I (experts); pct_peak of the FMA peak (bench_peak: 117 GFLOP/s per thread);
// expert_GFLOPs / expert_pct_peak: the experts' FLOP over the expert region's busiest thread
// time (balance_stats); busy_max_over_mean: the region's load balance; decode: GBs = bytes of
// the k chosen experts' weights + the router per second (the bandwidth bound is ~21-26 GB/s on
// one thread here), ms per token. The machine is shared: repeat (--benchmark_repetitions=3).
#include <cstring>
#include <ctime>
#include <random>
#include <vector>

#include <seqmix/mixers/moe.hpp>

#include "bench_common.hpp"

namespace {

using seqmix::bf16;
using seqmix::index_t;
namespace km = seqmix::kernels::moe;

constexpr double peak_per_thread = 117.0e9;  // bench_peak, README "Machine limits"

double process_cpu_seconds() {
  timespec t{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return double(t.tv_sec) + 1e-9 * double(t.tv_nsec);
}
double wall_seconds() {
  timespec t{};
  clock_gettime(CLOCK_MONOTONIC, &t);
  return double(t.tv_sec) + 1e-9 * double(t.tv_nsec);
}

/// A plain read (sum) of n floats, threads over contiguous ranges.
float plain_read(const float* w, index_t n, int threads) {
  std::vector<float> part(static_cast<std::size_t>(threads) * 16, 0.0f);
  seqmix::parallel_for(threads, [&](index_t t) {
    const index_t a = n * t / threads, b = n * (t + 1) / threads;
    part[static_cast<std::size_t>(t) * 16] = seqmix::simd::sum(w + a, b - a);
  });
  float s = 0;
  for (int t = 0; t < threads; ++t) s += part[static_cast<std::size_t>(t) * 16];
  return s;
}

template <class W>
struct block_weights {
  seqmix::tensor<W, 2> router;
  seqmix::tensor<W, 3> gate_up, down;
  seqmix::moe<W> make(const seqmix::moe_options& o) const {
    typename seqmix::moe<W>::weights w;
    w.router = router;
    w.experts = km::expert_set<W>::fused(gate_up, down);
    return seqmix::moe<W>(o, w);
  }
};

template <class W>
W from(float x) {
  if constexpr (std::is_same_v<W, float>) {
    return x;
  } else {
    return seqmix::bf16_from_float(x);
  }
}

template <class W>
block_weights<W> random_block(index_t E, index_t D, index_t I, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> n(0.0f, 1.0f);
  block_weights<W> b{seqmix::tensor<W, 2>({E, D}), seqmix::tensor<W, 3>({E, 2 * I, D}),
                     seqmix::tensor<W, 3>({E, D, I})};
  const float sd = 1.0f / std::sqrt(float(D)), si = 1.0f / std::sqrt(float(I));
  for (index_t i = 0; i < b.router.size(); ++i) b.router[i] = from<W>(n(rng) * sd);
  for (index_t i = 0; i < b.gate_up.size(); ++i) b.gate_up[i] = from<W>(n(rng) * sd);
  for (index_t i = 0; i < b.down.size(); ++i) b.down[i] = from<W>(n(rng) * si);
  return b;
}

seqmix::tensor<float, 2> random_x(index_t T, index_t D, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> n(0.0f, 1.0f);
  seqmix::tensor<float, 2> x({T, D});
  for (index_t i = 0; i < x.size(); ++i) x[i] = n(rng);
  return x;
}

double block_flops(index_t T, index_t D, index_t E, index_t k, index_t I) {
  return 2.0 * double(T) * double(D) * double(E) +
         2.0 * double(T) * double(k) * 3.0 * double(D) * double(I);
}

void BM_moe_grouped(benchmark::State& state) {
  const index_t E = state.range(0), k = state.range(1), D = state.range(2), I = state.range(3),
                T = state.range(4);
  const int threads = static_cast<int>(state.range(5));
  const bool skew = state.range(6) != 0;
  seqmix_bench::use_threads(threads);
  auto opt = seqmix::moe_options::mixtral(k);
  opt.pack_experts = state.range(7) != 0;
  auto b = random_block<float>(E, D, I, 7);
  auto x = random_x(T, D, 11);
  if (skew) {
    // x gets a positive mean along the first 8 dims and router row 0 reads them: expert 0
    // becomes the first choice of most tokens
    for (index_t t = 0; t < T; ++t)
      for (index_t d = 0; d < 8; ++d) x(t, d) += 1.0f;
    for (index_t d = 0; d < 8; ++d) b.router(0, d) = 1.0f;
  }
  const auto m = b.make(opt);
  seqmix::tensor<float, 2> y({T, D});
  km::balance_stats stats;
  double busy_max = 0, busy_mean = 0, n = 0, cbusy_max = 0, cbusy_mean = 0;
  index_t max_rows = 0;
  auto max_mean = [](const std::vector<double>& v, double& mx, double& mean) {
    double top = 0, sum = 0;
    for (double s : v) {
      top = std::max(top, s);
      sum += s;
    }
    mx += top;
    mean += v.empty() ? 0.0 : sum / double(v.size());
  };
  const double cpu0 = process_cpu_seconds();
  for (auto _ : state) {
    m.forward_grouped(x, y, {}, &stats);
    benchmark::ClobberMemory();
    max_mean(stats.busy_seconds, busy_max, busy_mean);
    max_mean(stats.busy_cpu_seconds, cbusy_max, cbusy_mean);
    n += 1;
  }
  const double cpu = process_cpu_seconds() - cpu0;
  {
    // tokens of the busiest expert (first choices and all), from one routed call
    seqmix::tensor<index_t, 2> ids({T, k});
    m.forward_grouped(x, y, {{}, ids, {}});
    std::vector<index_t> cnt(static_cast<std::size_t>(E), 0);
    for (index_t i = 0; i < ids.size(); ++i) ++cnt[static_cast<std::size_t>(ids[i])];
    for (index_t c : cnt) max_rows = std::max(max_rows, c);
  }
  const double flops = block_flops(T, D, E, k, I);
  const double expert_flops = 2.0 * double(T) * double(k) * 3.0 * double(D) * double(I);
  seqmix_bench::report_rates(state, double(T), flops);
  using benchmark::Counter;
  state.counters["GFLOPs"] = Counter(flops * 1e-9, Counter::kIsIterationInvariantRate);
  state.counters["pct_peak"] =
      Counter(flops * 100.0 / (peak_per_thread * threads), Counter::kIsIterationInvariantRate);
  const double region = busy_max / n;
  state.counters["expert_GFLOPs"] = expert_flops / region * 1e-9;
  state.counters["expert_pct_peak"] = expert_flops / region * 100.0 / (peak_per_thread * threads);
  state.counters["busy_max_over_mean"] = busy_max / busy_mean;
  // the same from each thread's CPU time in the region (a shared machine's descheduling does
  // not count), and the whole call's process CPU time per thread: ms_cpu (1 thread: the call's
  // time as if alone), expert_pct_peak_cpu (experts' FLOP over the busiest thread's CPU time)
  if (cbusy_mean > 0) {
    state.counters["busy_max_over_mean_cpu"] = cbusy_max / cbusy_mean;
    state.counters["expert_pct_peak_cpu"] =
        expert_flops / (cbusy_max / n) * 100.0 / (peak_per_thread * threads);
  }
  state.counters["ms_cpu"] = cpu / double(state.iterations()) / threads * 1e3;
  state.counters["pct_peak_cpu"] =
      flops / (cpu / double(state.iterations()) / threads) * 100.0 / (peak_per_thread * threads);
  state.counters["max_expert_share"] = double(max_rows) / double(T * k);
  state.counters["items"] = double(stats.items);
}

template <class W>
void BM_moe_decode(benchmark::State& state) {
  const index_t E = state.range(0), k = state.range(1), D = state.range(2), I = state.range(3);
  const int threads = static_cast<int>(state.range(4));
  seqmix_bench::use_threads(threads);
  auto opt = seqmix::moe_options::mixtral(k);
  opt.pack_experts = state.range(5) != 0;  // the GEMVs on the packed panels
  const double block_bytes = double(E) * (3.0 * double(D) * double(I) + double(D)) * sizeof(W);
  const index_t copies = std::max<index_t>(2, index_t(600.0 * 1024 * 1024 / block_bytes) + 1);
  std::vector<block_weights<W>> blocks;
  std::vector<seqmix::moe<W>> mixers;
  blocks.reserve(static_cast<std::size_t>(copies));
  for (index_t c = 0; c < copies; ++c)
    blocks.push_back(random_block<W>(E, D, I, 100 + std::uint64_t(c)));
  for (const auto& b : blocks) mixers.push_back(b.make(opt));
  const auto xs = random_x(64, D, 5);
  seqmix::tensor<float, 1> y({D});
  std::size_t i = 0;
  for (auto _ : state) {
    const auto& m = mixers[i % mixers.size()];
    m.step(xs.view().select<0>(index_t(i % 64)), y);
    benchmark::ClobberMemory();
    ++i;
  }
  const double bytes =
      (double(k) * 3.0 * double(D) * double(I) + double(E) * double(D)) * sizeof(W);
  {
    // x_bound: this token's time / the time of a plain read of the same bytes (the weights of
    // k experts and the router of another copy, not in cache either), summed over 16
    // interleaved pairs right after the timed loop (target <= 1.3); x_bound_cpu: the same from
    // process CPU time, which a shared machine blurs less
    double ts = 0, tr = 0, cs = 0, cr = 0;
    float sink = 0;
    for (int r = 0; r < 16; ++r) {
      const auto& m = mixers[i % mixers.size()];
      const auto& other = blocks[(i + mixers.size() / 2) % blocks.size()];
      const double t0 = wall_seconds(), c0 = process_cpu_seconds();
      m.step(xs.view().select<0>(index_t(i % 64)), y);
      benchmark::ClobberMemory();
      const double t1 = wall_seconds(), c1 = process_cpu_seconds();
      const auto fl = [](const W* p) { return reinterpret_cast<const float*>(p); };
      const index_t wb = index_t(sizeof(W));  // floats = weights · wb / 4
      sink += plain_read(fl(other.gate_up.data()), k * 2 * I * D * wb / 4, threads);
      sink += plain_read(fl(other.down.data()), k * D * I * wb / 4, threads);
      sink += plain_read(fl(other.router.data()), E * D * wb / 4, threads);
      const double t2 = wall_seconds(), c2 = process_cpu_seconds();
      ts += t1 - t0;
      tr += t2 - t1;
      cs += c1 - c0;
      cr += c2 - c1;
      ++i;
    }
    benchmark::DoNotOptimize(sink);
    state.counters["x_bound"] = ts / tr;
    state.counters["x_bound_cpu"] = cs / cr;
  }
  seqmix_bench::report_rates(state, 1.0, block_flops(1, D, E, k, I), bytes);
  using benchmark::Counter;
  state.counters["GBs"] = Counter(bytes * 1e-9, Counter::kIsIterationInvariantRate);
  state.counters["copies"] = double(copies);
}

/// The bandwidth bound of decode, measured in the same process: a plain vector sum over as
/// many bytes as one decode token reads (k experts' three matrices), rotating over > 512 MiB.
/// threads: the sum is split over threads in contiguous ranges.
void BM_moe_read_bound(benchmark::State& state) {
  const index_t k = state.range(0), D = state.range(1), I = state.range(2);
  const int threads = static_cast<int>(state.range(3));
  const int bytes_per = static_cast<int>(state.range(4));  // 4: f32 weights, 2: bf16
  seqmix_bench::use_threads(threads);
  const index_t n = k * 3 * D * I * bytes_per / 4;  // floats read per token
  const index_t copies = std::max<index_t>(2, index_t(600.0 * 1024 * 1024 / (4.0 * double(n))) + 1);
  std::vector<float> buf(static_cast<std::size_t>(n * copies), 1.0f);
  std::vector<float> part(static_cast<std::size_t>(threads) * 16, 0.0f);
  std::size_t i = 0;
  for (auto _ : state) {
    const float* base = buf.data() + static_cast<std::size_t>(n) * (i % std::size_t(copies));
    seqmix::parallel_for(threads, [&](index_t t) {
      const index_t a = n * t / threads, b = n * (t + 1) / threads;
      part[static_cast<std::size_t>(t) * 16] += seqmix::simd::sum(base + a, b - a);
    });
    benchmark::DoNotOptimize(part.data());
    ++i;
  }
  const double bytes = 4.0 * double(n);
  state.counters["GBs"] =
      benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

}  // namespace

// E=8, top-2, D=512, I=1024, T=512 (the ggml peer's case), uniform and skewed; E=64 top-8
// D=1024 I=512 T=2048 (DeepSeek-style fine-grained).
BENCHMARK(BM_moe_grouped)
    ->ArgNames({"E", "k", "D", "I", "T", "threads", "skew", "packed"})
    ->ArgsProduct({{8}, {2}, {512}, {1024}, {512}, {1, 2}, {0, 1}, {0, 1}})
    ->ArgsProduct({{64}, {8}, {1024}, {512}, {2048}, {1, 2}, {0}, {0, 1}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK(BM_moe_decode<float>)
    ->Name("moe_decode/f32")
    ->ArgNames({"E", "k", "D", "I", "threads", "packed"})
    ->ArgsProduct({{8}, {2}, {512}, {1024}, {1, 2}, {0, 1}})
    ->ArgsProduct({{64}, {8}, {1024}, {512}, {1}, {0, 1}})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();
BENCHMARK(BM_moe_decode<bf16>)
    ->Name("moe_decode/bf16")
    ->ArgNames({"E", "k", "D", "I", "threads", "packed"})
    ->ArgsProduct({{8}, {2}, {512}, {1024}, {1, 2}, {0, 1}})
    ->ArgsProduct({{64}, {8}, {1024}, {512}, {1}, {0, 1}})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

BENCHMARK(BM_moe_read_bound)
    ->ArgNames({"k", "D", "I", "threads", "wbytes"})
    ->Args({2, 512, 1024, 1, 4})
    ->Args({2, 512, 1024, 2, 4})
    ->Args({2, 512, 1024, 1, 2})
    ->Args({2, 512, 1024, 2, 2})
    ->Args({8, 1024, 512, 1, 4})
    ->Args({8, 1024, 512, 1, 2})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

BENCHMARK_MAIN();
