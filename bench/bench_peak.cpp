// SPDX-License-Identifier: MIT
// Machine-peak probe: the limits every other benchmark reports against.
//  - BM_fma_peak: register-resident FMA chains (12 independent accumulators per thread, enough
//    to cover FMA latency x throughput on AVX2 cores), FLOP = 2 · lanes · 12 · steps · threads.
//  - BM_mem_read: streaming sum over 256 MiB (bytes read / s), the bound of memory-bound decode.
//  - BM_mem_triad: a[i] = b[i] + s·c[i] over 3 × 128 MiB (STREAM's count: 3 × 4 bytes / element).
#include <vector>

#include <seqmix/core/simd.hpp>

#include "bench_common.hpp"

namespace {

using seqmix::index_t;
namespace simd = seqmix::simd;

float fma_chains(index_t steps) {
  using B = simd::batch<float>;
  B a0(1.0f), a1(1.1f), a2(1.2f), a3(1.3f), a4(1.4f), a5(1.5f);
  B a6(1.6f), a7(1.7f), a8(1.8f), a9(1.9f), a10(2.0f), a11(2.1f);
  const B m(0.999999f), c(1e-7f);
  for (index_t i = 0; i < steps; ++i) {
    a0 = simd::fma(a0, m, c);
    a1 = simd::fma(a1, m, c);
    a2 = simd::fma(a2, m, c);
    a3 = simd::fma(a3, m, c);
    a4 = simd::fma(a4, m, c);
    a5 = simd::fma(a5, m, c);
    a6 = simd::fma(a6, m, c);
    a7 = simd::fma(a7, m, c);
    a8 = simd::fma(a8, m, c);
    a9 = simd::fma(a9, m, c);
    a10 = simd::fma(a10, m, c);
    a11 = simd::fma(a11, m, c);
  }
  return simd::reduce_sum(((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)) +
                          ((a8 + a9) + (a10 + a11)));
}

void BM_fma_peak(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(0));
  seqmix_bench::use_threads(threads);
  const index_t steps = 1 << 22;
  std::vector<float> sink(static_cast<std::size_t>(threads) * 16);
  for (auto _ : state) {
    seqmix::parallel_for(
        threads, [&](index_t t) { sink[static_cast<std::size_t>(t) * 16] = fma_chains(steps); });
    benchmark::DoNotOptimize(sink.data());
  }
  const double flops = 2.0 * simd::lanes<float> * 12.0 * double(steps) * threads;
  seqmix_bench::report_rates(state, 0, flops);
  state.SetLabel(simd::arch_name());
}

struct stream_buffers {
  explicit stream_buffers(std::size_t n) : a(n, 1.0f), b(n, 2.0f), c(n, 0.5f) {}
  std::vector<float> a, b, c;
};

stream_buffers& buffers() {
  static stream_buffers bufs(std::size_t(32) << 20);  // 3 × 128 MiB of floats
  return bufs;
}

void BM_mem_read(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(0));
  seqmix_bench::use_threads(threads);
  auto& bufs = buffers();
  const auto n = static_cast<index_t>(bufs.a.size() * 2);  // read a and b back to back: 256 MiB
  std::vector<float> partial(static_cast<std::size_t>(threads) * 16);
  for (auto _ : state) {
    seqmix::parallel_for(threads, [&](index_t t) {
      const index_t begin = n / 2 * t / threads, end = n / 2 * (t + 1) / threads;
      partial[static_cast<std::size_t>(t) * 16] = simd::sum(bufs.a.data() + begin, end - begin) +
                                                  simd::sum(bufs.b.data() + begin, end - begin);
    });
    benchmark::DoNotOptimize(partial.data());
  }
  seqmix_bench::report_rates(state, 0, 0, double(n) * sizeof(float));
}

void BM_mem_triad(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(0));
  seqmix_bench::use_threads(threads);
  auto& bufs = buffers();
  const auto n = static_cast<index_t>(bufs.a.size());
  for (auto _ : state) {
    seqmix::parallel_for(threads, [&](index_t t) {
      const index_t begin = n * t / threads, end = n * (t + 1) / threads;
      float* a = bufs.a.data();
      const float* b = bufs.b.data();
      const float* c = bufs.c.data();
      for (index_t i = begin; i < end; ++i) a[i] = b[i] + 0.5f * c[i];
    });
    benchmark::DoNotOptimize(bufs.a.data());
    benchmark::ClobberMemory();
  }
  seqmix_bench::report_rates(state, 0, 0, 3.0 * double(n) * sizeof(float));
}

void thread_args(benchmark::internal::Benchmark* b) {
  b->ArgName("threads");
  b->Arg(1);
  const int all = seqmix::num_threads();
  for (int t = 2; t <= all; t *= 2) b->Arg(t);
  b->UseRealTime()->Unit(benchmark::kMillisecond);
}

}  // namespace

BENCHMARK(BM_fma_peak)->Apply(thread_args);
BENCHMARK(BM_mem_read)->Apply(thread_args);
BENCHMARK(BM_mem_triad)->Apply(thread_args);
BENCHMARK_MAIN();
