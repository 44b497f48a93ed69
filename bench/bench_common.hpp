// SPDX-License-Identifier: MIT
// Shared by every seqmix benchmark: threads as an explicit argument, and the counters every
// report reads (tokens/s, flops = FLOP/s, bytes = B/s). The FLOP formula of each form is written
// next to its benchmark and counts multiply and add as two operations.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <thread>
#include <vector>

#include <benchmark/benchmark.h>

#include <seqmix/core/parallel.hpp>
#include <seqmix/core/simd.hpp>
#include <seqmix/version.hpp>

namespace seqmix_bench {

/// Every benchmark's JSON/console context names the SIMD target seqmix was compiled for and
/// seqmix's version (registered once, before main runs).
inline const bool context_registered = [] {
  benchmark::AddCustomContext("seqmix_simd_arch", seqmix::simd::arch_name());
  benchmark::AddCustomContext("seqmix_version", seqmix::version_string);
  return true;
}();

/// Sets the thread count used by seqmix kernels (and OpenMP) for one benchmark run; n = 0: every
/// processor. (omp_set_num_threads(0) is not "all": libgomp takes it as 1, which made every
/// "all threads" row of bench_models single-threaded; the 16-core device showed it.)
inline void use_threads(int n) {
  seqmix::set_num_threads(n);
#if SEQMIX_HAS_OPENMP
  omp_set_num_threads(n > 0 ? n : omp_get_num_procs());
#endif
}

/// Thread counts a scaling benchmark registers: 1, 2, then 4, 8, 16, ... while the machine has
/// that many hardware threads (on the 2-core dev VM: 1 and 2; on the 16-core device: up to 16).
inline std::vector<std::int64_t> thread_counts() {
  const auto hw = static_cast<std::int64_t>(std::thread::hardware_concurrency());
  std::vector<std::int64_t> t{1, 2};
  for (std::int64_t n = 4; n <= hw; n *= 2) t.push_back(n);
  return t;
}

/// bench_peak's FMA peak per thread (FLOP/s) of the machine a report is made for:
/// SEQMIX_BENCH_PEAK_GFLOPS, else 117 (the 2-core AMD EPYC, Zen 4, of the 2026-12-02 sessions;
/// the 2-core Intel Xeon of 2026-12-01 and 2026-12-03 measures 198).
inline double peak_flops_per_thread() {
  const char* e = std::getenv("SEQMIX_BENCH_PEAK_GFLOPS");
  const double v = e ? std::atof(e) : 0.0;
  return v > 0 ? v * 1e9 : 117.0e9;
}

/// Adds rate counters per iteration: tokens/s, FLOP/s and bytes/s (zeros are omitted).
inline void report_rates(benchmark::State& state, double tokens, double flops, double bytes = 0) {
  using benchmark::Counter;
  if (tokens > 0) state.counters["tokens"] = Counter(tokens, Counter::kIsIterationInvariantRate);
  if (flops > 0) state.counters["flops"] = Counter(flops, Counter::kIsIterationInvariantRate);
  if (bytes > 0) state.counters["bytes"] = Counter(bytes, Counter::kIsIterationInvariantRate);
}

/// pct_peak: `flops` per iteration as a percentage of `threads` × peak_flops_per_thread().
inline void report_peak_share(benchmark::State& state, double flops, int threads) {
  using benchmark::Counter;
  state.counters["pct_peak"] = Counter(100.0 * flops / (peak_flops_per_thread() * threads),
                                       Counter::kIsIterationInvariantRate);
}

}  // namespace seqmix_bench
