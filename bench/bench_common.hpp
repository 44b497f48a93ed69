// SPDX-License-Identifier: MIT
// Shared by every seqmix benchmark: threads as an explicit argument, and the counters every
// report reads (tokens/s, flops = FLOP/s, bytes = B/s). The FLOP formula of each form is written
// next to its benchmark and counts multiply and add as two operations.
#pragma once

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

/// Sets the thread count used by seqmix kernels (and OpenMP) for one benchmark run.
inline void use_threads(int n) {
  seqmix::set_num_threads(n);
#if SEQMIX_HAS_OPENMP
  omp_set_num_threads(n);
#endif
}

/// Adds rate counters per iteration: tokens/s, FLOP/s and bytes/s (zeros are omitted).
inline void report_rates(benchmark::State& state, double tokens, double flops, double bytes = 0) {
  using benchmark::Counter;
  if (tokens > 0) state.counters["tokens"] = Counter(tokens, Counter::kIsIterationInvariantRate);
  if (flops > 0) state.counters["flops"] = Counter(flops, Counter::kIsIterationInvariantRate);
  if (bytes > 0) state.counters["bytes"] = Counter(bytes, Counter::kIsIterationInvariantRate);
}

}  // namespace seqmix_bench
