// SPDX-License-Identifier: MIT
// linalg::matmul (y = x·Wᵀ, W as stored in checkpoints) beside Eigen 3.4 and OpenBLAS in the same
// process, so the ratios are measured under the same machine load.
//
//   matmul/<lib>/M/N/K/threads   C[M,N] = A[M,K]·B[N,K]ᵀ, f32: lib = seqmix | eigen | openblas
//                                | seqmix packed (3: linalg::packed_weights, packed once)
//   matmul_bf16/<mode>/M/N/K/t   bf16 weights: mode 0 = exact (widened), 1 = bf16_dot (A rounded
//                                to bf16; AMX tiles where the CPU and OS allow, else vdpbf16ps),
//                                2 / 3 = the same on packed_weights (bf16_dot on vdpbf16ps)
//   gemv/<lib>/dtype/N/K/t       M = 1 decode over a rotating set of weight matrices (> 512 MiB
//                                in all, so the weights come from DRAM); bytes = weight bytes;
//                                lib 3 = seqmix on packed_weights (a packed copy of the set)
//   gemv_m/M/dtype/N/K/t         seqmix with M = 2..8 rows (batched decode), weights as above;
//                                dtype 0 f32, 1 bf16, 2 / 3 the same packed
//   dram_read/t                  a plain read of the same rotating buffers (the bandwidth bound)
//
// Counters: GFLOPs (2·M·N·K per iteration), pct_peak (of bench_peak's FMA peak per thread:
// SEQMIX_BENCH_PEAK_GFLOPS, default 117, see bench_common.hpp), x_openblas on seqmix's rows
// (OpenBLAS's time / seqmix's from interleaved calls in the same benchmark, when OpenBLAS is
// linked), GBs (weight bytes per second, decode), and GFLOPs_cpu / GBs_cpu: the same per CPU-second
// of this process (times the threads), which discounts the time it spent descheduled on a shared
// machine (the dev VM runs several jobs; wall-clock rates there measure its share). bench_peak's
// FMA probe itself runs at ~240 GFLOP per CPU-second and thread on that VM. Eigen runs
// single-threaded (EIGEN_DONT_PARALLELIZE); OpenBLAS with openblas_set_num_threads(threads). Run
// with
//   --benchmark_repetitions=3 --benchmark_enable_random_interleaving=true
// so the three libraries alternate under the same load, and once per thread count
// (--benchmark_filter='/threads:1/', then '/threads:2/'): OpenBLAS's pthread workers spin in
// sched_yield for a while after each call, and left over from a 2-thread row they slowed the
// 1-thread rows of the same process by up to 10 % on the 2-core AMD EPYC (2026-12-04).
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <random>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include <seqmix/core/matmul.hpp>
#include <seqmix/core/packed_weights.hpp>

#include "bench_common.hpp"

#if defined(SEQMIX_BENCH_OPENBLAS)
#include <cblas.h>
#endif

namespace {

using seqmix::bf16;
using seqmix::index_t;

std::vector<float> random_floats(std::size_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = u(rng);
  return v;
}

double wall_seconds() {
  timespec t{};
  clock_gettime(CLOCK_MONOTONIC, &t);
  return double(t.tv_sec) + 1e-9 * double(t.tv_nsec);
}

double process_cpu_seconds() {
  timespec t{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return double(t.tv_sec) + 1e-9 * double(t.tv_nsec);
}

/// GFLOPs and pct_peak per wall-clock second (the headline figures), and GFLOPs_cpu: FLOP per
/// CPU-second of the process, times the thread count, which discounts time this process spent
/// descheduled on a machine shared with other jobs (spinning OpenMP/OpenBLAS workers count as
/// busy, so it is a lower bound of the unloaded rate for 2 threads).
void gemm_counters(benchmark::State& state, double flops, int threads, double cpu_seconds) {
  using benchmark::Counter;
  state.counters["GFLOPs"] = Counter(flops * 1e-9, Counter::kIsIterationInvariantRate);
  seqmix_bench::report_peak_share(state, flops, threads);
  if (cpu_seconds > 0) {
    state.counters["GFLOPs_cpu"] =
        flops * 1e-9 * double(state.iterations()) * threads / cpu_seconds;
  }
}

enum lib { seqmix_lib = 0, eigen_lib = 1, openblas_lib = 2, packed_lib = 3 };

void BM_matmul(benchmark::State& state) {
  const auto which = static_cast<lib>(state.range(0));
  const index_t M = state.range(1), N = state.range(2), K = state.range(3);
  const int threads = static_cast<int>(state.range(4));
  seqmix_bench::use_threads(threads);
  const auto a = random_floats(static_cast<std::size_t>(M * K), 1);
  const auto b = random_floats(static_cast<std::size_t>(N * K), 2);
  std::vector<float> c(static_cast<std::size_t>(M * N));
  using rowmat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  Eigen::Map<const rowmat> ea(a.data(), M, K), eb(b.data(), N, K);
  Eigen::Map<rowmat> ec(c.data(), M, N);
  seqmix::linalg::packed_weights packed;
  if (which == packed_lib) packed = seqmix::linalg::packed_weights({b.data(), {N, K}});
  auto ours = [&] {
    if (which == packed_lib) {
      seqmix::linalg::matmul({a.data(), {M, K}}, packed, {c.data(), {M, N}});
    } else {
      seqmix::linalg::matmul({a.data(), {M, K}}, {b.data(), {N, K}}, {c.data(), {M, N}});
    }
  };
#if defined(SEQMIX_BENCH_OPENBLAS)
  if (which == openblas_lib) openblas_set_num_threads(threads);
#else
  if (which == openblas_lib) {
    state.SkipWithError("OpenBLAS not found at configure time (install libopenblas-dev)");
    return;
  }
#endif
  if (which == eigen_lib && threads != 1) {
    state.SkipWithError("Eigen runs single-threaded inside seqmix's targets");
    return;
  }
  const double cpu0 = process_cpu_seconds();
  for (auto _ : state) {
    switch (which) {
      case seqmix_lib:
      case packed_lib:
        ours();
        break;
      case eigen_lib:
        ec.noalias() = ea * eb.transpose();
        break;
      case openblas_lib:
#if defined(SEQMIX_BENCH_OPENBLAS)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(M),
                    static_cast<int>(N), static_cast<int>(K), 1.0f, a.data(), static_cast<int>(K),
                    b.data(), static_cast<int>(K), 0.0f, c.data(), static_cast<int>(N));
#endif
        break;
    }
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
  }
  gemm_counters(state, 2.0 * double(M) * double(N) * double(K), threads,
                process_cpu_seconds() - cpu0);
#if defined(SEQMIX_BENCH_OPENBLAS)
  if (which == seqmix_lib || which == packed_lib) {
    // x_openblas: OpenBLAS's time / seqmix's, from 3 interleaved pairs of calls right after the
    // timed loop (best of each: the two see the same machine load, which on a shared machine
    // moves more between benchmark rows than between these calls)
    // (x_openblas_cpu: the same from process CPU time, which discounts descheduling)
    double best_s = 1e30, best_o = 1e30, cpu_s = 1e30, cpu_o = 1e30;
    for (int r = 0; r < 3; ++r) {
      const double t0 = wall_seconds(), c0 = process_cpu_seconds();
      ours();
      const double t1 = wall_seconds(), c1 = process_cpu_seconds();
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(M), static_cast<int>(N),
                  static_cast<int>(K), 1.0f, a.data(), static_cast<int>(K), b.data(),
                  static_cast<int>(K), 0.0f, c.data(), static_cast<int>(N));
      const double t2 = wall_seconds(), c2 = process_cpu_seconds();
      best_s = std::min(best_s, t1 - t0);
      best_o = std::min(best_o, t2 - t1);
      cpu_s = std::min(cpu_s, c1 - c0);
      cpu_o = std::min(cpu_o, c2 - c1);
    }
    state.counters["x_openblas"] = best_o / best_s;
    state.counters["x_openblas_cpu"] = cpu_o / cpu_s;
  }
#endif
  static const char* names[] = {"seqmix", "eigen", "openblas", "seqmix packed"};
  state.SetLabel(names[which]);
}

void BM_matmul_bf16(benchmark::State& state) {
  const bool dot = state.range(0) % 2 != 0, pack = state.range(0) >= 2;
  const index_t M = state.range(1), N = state.range(2), K = state.range(3);
  const int threads = static_cast<int>(state.range(4));
  seqmix_bench::use_threads(threads);
  const auto a = random_floats(static_cast<std::size_t>(M * K), 1);
  const auto bf = random_floats(static_cast<std::size_t>(N * K), 2);
  std::vector<bf16> b(bf.size());
  for (std::size_t i = 0; i < b.size(); ++i) b[i] = seqmix::bf16_from_float(bf[i]);
  std::vector<float> c(static_cast<std::size_t>(M * N));
  seqmix::linalg::matmul_options o;
  if (dot) o.precision = seqmix::linalg::matmul_precision::bf16_dot;
  seqmix::linalg::packed_weights packed;
  if (pack) packed = seqmix::linalg::packed_weights({b.data(), {N, K}});
  auto ours = [&] {
    if (pack) {
      seqmix::linalg::matmul({a.data(), {M, K}}, packed, {c.data(), {M, N}}, o);
    } else {
      seqmix::linalg::matmul({a.data(), {M, K}}, {b.data(), {N, K}}, {c.data(), {M, N}}, o);
    }
  };
  const double cpu0 = process_cpu_seconds();
  for (auto _ : state) {
    ours();
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
  }
  gemm_counters(state, 2.0 * double(M) * double(N) * double(K), threads,
                process_cpu_seconds() - cpu0);
  {
    // x_f32: the f32 matmul's time (same A, f32 weights) / this call's, from 3 interleaved pairs
    // of calls right after the timed loop (best of each; x_f32_cpu from process CPU time)
    double best_b = 1e30, best_f = 1e30, cpu_b = 1e30, cpu_f = 1e30;
    for (int r = 0; r < 3; ++r) {
      const double t0 = wall_seconds(), c0 = process_cpu_seconds();
      ours();
      const double t1 = wall_seconds(), c1 = process_cpu_seconds();
      seqmix::linalg::matmul({a.data(), {M, K}}, {bf.data(), {N, K}}, {c.data(), {M, N}});
      const double t2 = wall_seconds(), c2 = process_cpu_seconds();
      best_b = std::min(best_b, t1 - t0);
      best_f = std::min(best_f, t2 - t1);
      cpu_b = std::min(cpu_b, c1 - c0);
      cpu_f = std::min(cpu_f, c2 - c1);
    }
    state.counters["x_f32"] = best_f / best_b;
    state.counters["x_f32_cpu"] = cpu_f / cpu_b;
  }
  const std::string engine = pack ? "avx512_bf16" : seqmix::linalg::bf16_dot_engine();
  state.SetLabel(std::string(pack ? "seqmix packed" : "seqmix") +
                 (dot ? " bf16_dot (" + engine + ")" : std::string(" bf16 exact")));
}

// Rotating weights for the decode benchmarks: more than 512 MiB in all, so each call's weights
// were evicted from every cache level by the calls before it.
template <class W>
struct weight_set {
  index_t N, K;
  std::vector<std::vector<W>> mats;
  weight_set(index_t n, index_t k) : N(n), K(k) {
    const std::size_t bytes = static_cast<std::size_t>(n * k) * sizeof(W);
    const std::size_t count = std::max<std::size_t>(2, (std::size_t(640) << 20) / bytes + 1);
    const auto src = random_floats(static_cast<std::size_t>(n * k), 3);
    mats.resize(count);
    for (auto& m : mats) {
      m.resize(src.size());
      for (std::size_t i = 0; i < src.size(); ++i) {
        if constexpr (std::is_same_v<W, float>) {
          m[i] = src[i];
        } else {
          m[i] = seqmix::bf16_from_float(src[i]);
        }
      }
    }
  }
};

template <class W>
weight_set<W>& weights(index_t N, index_t K) {
  static weight_set<W> set(N, K);
  return set;
}

/// The weight set above packed (linalg::packed_weights, the same values).
template <class W>
std::vector<seqmix::linalg::packed_weights>& packed_set(index_t N, index_t K) {
  static std::vector<seqmix::linalg::packed_weights> set = [&] {
    std::vector<seqmix::linalg::packed_weights> out;
    for (const auto& m : weights<W>(N, K).mats)
      out.emplace_back(seqmix::tensor_view<const W, 2>(m.data(), {N, K}));
    return out;
  }();
  return set;
}

/// A plain read of n floats (sum of every element, threads over contiguous ranges, as
/// bench_peak's BM_mem_read): the bandwidth bound of the decode benchmarks.
float plain_read(const float* w, index_t n, int threads) {
  std::vector<float> partial(static_cast<std::size_t>(threads) * 16, 0.0f);
  seqmix::parallel_for(threads, [&](index_t t) {
    const index_t begin = n * t / threads, end = n * (t + 1) / threads;
    partial[static_cast<std::size_t>(t) * 16] = seqmix::simd::sum(w + begin, end - begin);
  });
  float s = 0;
  for (int t = 0; t < threads; ++t) s += partial[static_cast<std::size_t>(t) * 16];
  return s;
}

// gemv/<lib>/dtype(0 f32, 1 bf16)/N/K/threads
void BM_gemv(benchmark::State& state) {
  const auto which = static_cast<lib>(state.range(0));
  const bool is16 = state.range(1) != 0;
  const index_t N = state.range(2), K = state.range(3);
  const int threads = static_cast<int>(state.range(4));
  seqmix_bench::use_threads(threads);
  const auto x = random_floats(static_cast<std::size_t>(K), 4);
  std::vector<float> y(static_cast<std::size_t>(N));
  if (which != seqmix_lib && which != packed_lib && is16) {
    state.SkipWithError("bf16 weights: seqmix only");
    return;
  }
#if defined(SEQMIX_BENCH_OPENBLAS)
  if (which == openblas_lib) openblas_set_num_threads(threads);
#else
  if (which == openblas_lib) {
    state.SkipWithError("OpenBLAS not found at configure time (install libopenblas-dev)");
    return;
  }
#endif
  if (which == eigen_lib && threads != 1) {
    state.SkipWithError("Eigen runs single-threaded inside seqmix's targets");
    return;
  }
  std::size_t it = 0;
  double bytes = 0;
  const double cpu0 = process_cpu_seconds();
  if (which == packed_lib) {
    auto run = [&](const auto& set) {
      for (auto _ : state) {
        seqmix::linalg::matmul({x.data(), {1, K}}, set[it++ % set.size()], {y.data(), {1, N}});
        benchmark::DoNotOptimize(y.data());
      }
    };
    if (is16) {
      run(packed_set<bf16>(N, K));
    } else {
      run(packed_set<float>(N, K));
    }
    bytes = double(N * K) * (is16 ? 2.0 : 4.0);
  } else if (is16) {
    auto& set = weights<bf16>(N, K);
    for (auto _ : state) {
      const auto& w = set.mats[it++ % set.mats.size()];
      seqmix::linalg::matmul({x.data(), {1, K}}, {w.data(), {N, K}}, {y.data(), {1, N}});
      benchmark::DoNotOptimize(y.data());
    }
    bytes = double(N * K) * 2.0;
  } else {
    auto& set = weights<float>(N, K);
    using rowmat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    for (auto _ : state) {
      const auto& w = set.mats[it++ % set.mats.size()];
      switch (which) {
        case seqmix_lib:
          seqmix::linalg::matmul({x.data(), {1, K}}, {w.data(), {N, K}}, {y.data(), {1, N}});
          break;
        case eigen_lib: {
          Eigen::Map<const rowmat> ew(w.data(), N, K);
          Eigen::Map<const Eigen::VectorXf> ex(x.data(), K);
          Eigen::Map<Eigen::VectorXf> ey(y.data(), N);
          ey.noalias() = ew * ex;
          break;
        }
        case openblas_lib:
#if defined(SEQMIX_BENCH_OPENBLAS)
          cblas_sgemv(CblasRowMajor, CblasNoTrans, static_cast<int>(N), static_cast<int>(K), 1.0f,
                      w.data(), static_cast<int>(K), x.data(), 1, 0.0f, y.data(), 1);
#endif
          break;
        case packed_lib:
          break;
      }
      benchmark::DoNotOptimize(y.data());
    }
    bytes = double(N * K) * 4.0;
  }
  const double cpu = process_cpu_seconds() - cpu0;
  {
    // x_dram: the time of a plain read of as many bytes (another matrix of the set, not in
    // cache either) / the decode call's, summed over 6 interleaved pairs right after the timed
    // loop (target >= 0.8); x_dram_cpu the same from process CPU time
    double tr = 0, tg = 0, cr = 0, cg = 0;
    float sink = 0;
    auto pair = [&](const auto& set) {
      using WT = typename std::decay_t<decltype(set.mats[0])>::value_type;
      const std::size_t m = set.mats.size();
      for (int r = 0; r < 6; ++r) {
        const std::size_t wi = it++ % m;
        const auto& w = set.mats[wi];
        const auto& other = set.mats[it++ % m];
        const double t0 = wall_seconds(), c0 = process_cpu_seconds();
        if (which == openblas_lib) {
#if defined(SEQMIX_BENCH_OPENBLAS)
          if constexpr (std::is_same_v<WT, float>) {
            cblas_sgemv(CblasRowMajor, CblasNoTrans, static_cast<int>(N), static_cast<int>(K), 1.0f,
                        w.data(), static_cast<int>(K), x.data(), 1, 0.0f, y.data(), 1);
          }
#endif
        } else if (which == eigen_lib) {
          if constexpr (std::is_same_v<WT, float>) {
            using rowmat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
            Eigen::Map<const rowmat> ew(w.data(), N, K);
            Eigen::Map<const Eigen::VectorXf> ex(x.data(), K);
            Eigen::Map<Eigen::VectorXf> ey(y.data(), N);
            ey.noalias() = ew * ex;
          }
        } else if (which == packed_lib) {
          seqmix::linalg::matmul({x.data(), {1, K}}, packed_set<WT>(N, K)[wi], {y.data(), {1, N}});
        } else {
          seqmix::linalg::matmul({x.data(), {1, K}}, {w.data(), {N, K}}, {y.data(), {1, N}});
        }
        benchmark::DoNotOptimize(y.data());
        const double t1 = wall_seconds(), c1 = process_cpu_seconds();
        sink += plain_read(reinterpret_cast<const float*>(other.data()),
                           static_cast<index_t>(bytes / 4.0), threads);
        const double t2 = wall_seconds(), c2 = process_cpu_seconds();
        tg += t1 - t0;
        tr += t2 - t1;
        cg += c1 - c0;
        cr += c2 - c1;
      }
    };
    if (is16) {
      pair(weights<bf16>(N, K));
    } else {
      pair(weights<float>(N, K));
    }
    benchmark::DoNotOptimize(sink);
    state.counters["x_dram"] = tr / tg;
    state.counters["x_dram_cpu"] = cr / cg;
  }
  using benchmark::Counter;
  state.counters["GBs"] = Counter(bytes * 1e-9, Counter::kIsIterationInvariantRate);
  state.counters["GFLOPs"] =
      Counter(2.0 * double(N * K) * 1e-9, Counter::kIsIterationInvariantRate);
  if (cpu > 0)
    state.counters["GBs_cpu"] = bytes * 1e-9 * double(state.iterations()) * threads / cpu;
  static const char* names[] = {"seqmix", "eigen", "openblas", "seqmix packed"};
  state.SetLabel(std::string(names[which]) + (is16 ? " bf16" : " f32"));
}

// The bandwidth bound of the decode benchmarks: read the f32 weight set (sum of every element),
// threads over contiguous halves, exactly like bench_peak's BM_mem_read.
void BM_dram_read(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(0));
  seqmix_bench::use_threads(threads);
  auto& set = weights<float>(4096, 4096);
  std::size_t it = 0;
  std::vector<float> partial(static_cast<std::size_t>(threads) * 16);
  const auto n = static_cast<index_t>(set.mats[0].size());
  const double cpu0 = process_cpu_seconds();
  for (auto _ : state) {
    const float* w = set.mats[it++ % set.mats.size()].data();
    seqmix::parallel_for(threads, [&](index_t t) {
      const index_t begin = n * t / threads, end = n * (t + 1) / threads;
      partial[static_cast<std::size_t>(t) * 16] = seqmix::simd::sum(w + begin, end - begin);
    });
    benchmark::DoNotOptimize(partial.data());
  }
  const double cpu = process_cpu_seconds() - cpu0;
  using benchmark::Counter;
  state.counters["GBs"] = Counter(double(n) * 4.0 * 1e-9, Counter::kIsIterationInvariantRate);
  if (cpu > 0) {
    state.counters["GBs_cpu"] = double(n) * 4.0 * 1e-9 * double(state.iterations()) * threads / cpu;
  }
}

/// Decode with M = 2..8 rows (a batch of sequences, or a few draft tokens): seqmix only, the
/// weights from DRAM as in BM_gemv; GBs = weight bytes per second, GFLOPs = 2·M·N·K per second.
void BM_gemv_m(benchmark::State& state) {
  const index_t M = state.range(0);
  const bool is16 = state.range(1) % 2 != 0, pack = state.range(1) >= 2;
  const index_t N = state.range(2), K = state.range(3);
  const int threads = static_cast<int>(state.range(4));
  seqmix_bench::use_threads(threads);
  const auto x = random_floats(static_cast<std::size_t>(M * K), 4);
  std::vector<float> y(static_cast<std::size_t>(M * N));
  std::size_t it = 0;
  auto run = [&](const auto& set) {
    for (auto _ : state) {
      const auto& w = set.mats[it++ % set.mats.size()];
      seqmix::linalg::matmul({x.data(), {M, K}}, {w.data(), {N, K}}, {y.data(), {M, N}});
      benchmark::DoNotOptimize(y.data());
    }
  };
  auto run_packed = [&](const auto& set) {
    for (auto _ : state) {
      seqmix::linalg::matmul({x.data(), {M, K}}, set[it++ % set.size()], {y.data(), {M, N}});
      benchmark::DoNotOptimize(y.data());
    }
  };
  if (pack) {
    if (is16) {
      run_packed(packed_set<bf16>(N, K));
    } else {
      run_packed(packed_set<float>(N, K));
    }
  } else if (is16) {
    run(weights<bf16>(N, K));
  } else {
    run(weights<float>(N, K));
  }
  state.SetLabel(std::string(pack ? "packed " : "") + (is16 ? "bf16" : "f32"));
  using benchmark::Counter;
  const double bytes = double(N * K) * (is16 ? 2.0 : 4.0);
  state.counters["GBs"] = Counter(bytes * 1e-9, Counter::kIsIterationInvariantRate);
  state.counters["GFLOPs"] =
      Counter(2.0 * double(M * N * K) * 1e-9, Counter::kIsIterationInvariantRate);
}

void gemm_shapes(benchmark::internal::Benchmark* b, bool libs) {
  b->ArgNames({libs ? "lib" : "dot", "M", "N", "K", "threads"});
  const std::vector<std::array<index_t, 3>> shapes = {{512, 1024, 1024},  {1024, 1024, 1024},
                                                      {512, 4096, 4096},  {2048, 2048, 2048},
                                                      {4096, 1024, 1024}, {4096, 4096, 4096}};
  for (int threads : {1, 2}) {
    for (const auto& s : shapes) {
      for (int l = 0; l < 4; ++l) {
        if (libs && l == eigen_lib && threads != 1) continue;
        b->Args({l, s[0], s[1], s[2], threads});
      }
    }
  }
  b->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);
}

void BM_matmul_args(benchmark::internal::Benchmark* b) {
  gemm_shapes(b, true);
}
void BM_matmul_bf16_args(benchmark::internal::Benchmark* b) {
  gemm_shapes(b, false);
}

void BM_gemv_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"lib", "bf16", "N", "K", "threads"});
  for (int threads : {1, 2}) {
    for (int l = 0; l < 4; ++l) {
      if (l == eigen_lib && threads != 1) continue;
      b->Args({l, 0, 4096, 4096, threads});
    }
    b->Args({0, 1, 4096, 4096, threads});
    b->Args({packed_lib, 1, 4096, 4096, threads});
  }
  b->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);
}

void BM_gemv_m_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"M", "dtype", "N", "K", "threads"});
  for (int threads : {1, 2}) {
    for (index_t m : {2, 4, 8}) {
      for (int dtype : {0, 1, 2, 3}) b->Args({m, dtype, 4096, 4096, threads});
    }
  }
  b->UseRealTime()->Unit(benchmark::kMillisecond)->MinTime(0.5);
}

}  // namespace

BENCHMARK(BM_matmul)->Apply(BM_matmul_args);
BENCHMARK(BM_matmul_bf16)->Apply(BM_matmul_bf16_args);
BENCHMARK(BM_gemv)->Apply(BM_gemv_args);
BENCHMARK(BM_gemv_m)->Apply(BM_gemv_m_args);
BENCHMARK(BM_dram_read)
    ->ArgName("threads")
    ->Arg(1)
    ->Arg(2)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond)
    ->MinTime(0.5);

BENCHMARK_MAIN();
