// SPDX-License-Identifier: MIT
// Backward passes (mixers/backward.hpp) beside the chunked forward of the same mixer, same shapes:
// B = 1, H = 8, args {T, K (= V; Mamba2's N = P), threads}. The backward recomputes its chunk-
// boundary states (softmax: its row statistics), so each row is the whole backward's time.
//
// FLOP per head and token (multiply and add count as two), C = 64:
//   chunked forward:      2·C·(K + V) + 4·K·V
//   gated backward:       2·C·(3K + 2V) + 10·K·V   (the C×C products dA, A, dq, dk, dv, and five
//                         K×V products: the recomputed state, K̂ dS, dO Sᵀ, V dSᵀ, Q̄ᵀ dO);
//                         GLA's per-key gate adds about 14·K exps (not counted)
//   softmax forward:      2·(K + V) per visible (query, key) pair
//   softmax backward:     2·(K + V) (recomputed forward: Z, P·V) + 2·(3K + 2V) per visible pair
// Softmax causal runs at T = 2048 (its cost grows with T²), sliding window W = 512 at T = 8192.
// The machine's FMA peak is bench_peak's BM_fma_peak.
//
// The DPLR family (kernels/backward/dplr.hpp: DeltaNet, Gated DeltaNet, KDA, RWKV-7, RWKV-6) runs
// as BM_<op>_backward_ratio: every iteration times the op's chunked forward, its recurrent
// forward and its backward one after the other in the same process, by process CPU time (the
// 2-core machine is shared: same-process CPU-time ratios are what survives the load), and
// reports fwd_chunked_ms, fwd_recurrent_ms, bwd_ms, the ratios bwd/chunked and bwd/recurrent and
// bwd_gflops = backward FLOP / CPU second (per core busy). Backward FLOP per head and token:
//   with the rank-one term (delta family, RWKV-7): 33·K·V (checkpoint sweep 7, recompute 7,
//   reverse 19); RWKV-6: 17·K·V (3 + 3 + 11).
// Keys (and RWKV-7's a, b) are unit rows, so every recurrence stays bounded.
#include <cmath>
#include <random>
#include <time.h>

#include <seqmix/core/simd.hpp>
#include <seqmix/mixers/backward.hpp>
#include <seqmix/mixers/delta_net.hpp>
#include <seqmix/mixers/gated_delta_net.hpp>
#include <seqmix/mixers/gla.hpp>
#include <seqmix/mixers/kda.hpp>
#include <seqmix/mixers/linear_attention.hpp>
#include <seqmix/mixers/mamba2_ssd.hpp>
#include <seqmix/mixers/rwkv6.hpp>
#include <seqmix/mixers/rwkv7.hpp>
#include <seqmix/mixers/simple_gla.hpp>
#include <seqmix/mixers/sliding_window_attention.hpp>
#include <seqmix/mixers/softmax_attention.hpp>

#include "bench_common.hpp"

namespace {

using seqmix::index_t;
using seqmix::tensor;
constexpr index_t H = 8;
constexpr index_t chunk = 64;
constexpr index_t swa_window = 512;

template <std::size_t R>
tensor<float, R> randn(const seqmix::shape_t<R>& shape, float scale = 1.f) {
  std::mt19937 rng(4321);
  std::normal_distribution<float> d(0.f, 1.f);
  tensor<float, R> t(shape);
  for (index_t i = 0; i < t.size(); ++i) t[i] = d(rng) * scale;
  return t;
}
template <std::size_t R>
tensor<float, R> gates(const seqmix::shape_t<R>& shape) {
  auto g = randn<R>(shape);
  for (index_t i = 0; i < g.size(); ++i) g[i] = seqmix::math::logsigmoid(g[i]) / 16.f;
  return g;
}

double fwd_flops(index_t T, index_t K) {
  return double(T) * H * (2.0 * chunk * double(2 * K) + 4.0 * double(K * K));
}
double bwd_flops(index_t T, index_t K) {
  return double(T) * H * (2.0 * chunk * double(5 * K) + 10.0 * double(K * K));
}
double pairs(index_t T, index_t W) {
  if (W <= 0 || W >= T) return double(T) * double(T + 1) / 2;
  return double(W) * double(W + 1) / 2 + double(T - W) * double(W);
}

struct data {
  index_t T, K;
  tensor<float, 4> q, k, v, gk, o, do_, dq, dk, dv, dgk, state, h0, dht, dh0;
  tensor<float, 3> g, dg, dt, ddt;
  tensor<float, 1> A, A_log, dA;
  data(index_t t, index_t kk)
      : T(t),
        K(kk),
        q(randn<4>({1, t, H, kk})),
        k(randn<4>({1, t, H, kk})),
        v(randn<4>({1, t, H, kk})),
        gk(gates<4>({1, t, H, kk})),
        o({1, t, H, kk}),
        do_(randn<4>({1, t, H, kk})),
        dq({1, t, H, kk}),
        dk({1, t, H, kk}),
        dv({1, t, H, kk}),
        dgk({1, t, H, kk}),
        state({1, H, kk, kk}),
        h0(randn<4>({1, H, kk, kk})),
        dht(randn<4>({1, H, kk, kk})),
        dh0({1, H, kk, kk}),
        g(gates<3>({1, t, H})),
        dg({1, t, H}),
        dt({1, t, H}, 0.1f),
        ddt({1, t, H}),
        A({H}, -0.5f),
        A_log({H}, std::log(0.5f)),
        dA({H}) {}
};

void finish(benchmark::State& st, const data& d, double flops) {
  seqmix_bench::report_rates(st, double(d.T), flops);
}

// ---- forward (chunked) -----------------------------------------------------------------------
void BM_linear_attention_forward(benchmark::State& st) {
  seqmix_bench::use_threads(int(st.range(2)));
  data d(st.range(0), st.range(1));
  seqmix::linear_attention<float> m({.scale = {}, .chunk_size = chunk});
  for (auto _ : st) m.forward_chunked(d.q, d.k, d.v, d.o, d.state);
  finish(st, d, fwd_flops(d.T, d.K));
}
void BM_simple_gla_forward(benchmark::State& st) {
  seqmix_bench::use_threads(int(st.range(2)));
  data d(st.range(0), st.range(1));
  seqmix::simple_gla<float> m({.scale = {}, .chunk_size = chunk});
  for (auto _ : st) m.forward_chunked(d.q, d.k, d.v, d.g, d.o, d.state);
  finish(st, d, fwd_flops(d.T, d.K));
}
void BM_gla_forward(benchmark::State& st) {
  seqmix_bench::use_threads(int(st.range(2)));
  data d(st.range(0), st.range(1));
  seqmix::gla<float> m({.scale = {}, .chunk_size = chunk});
  for (auto _ : st) m.forward_chunked(d.q, d.k, d.v, d.gk, d.o, d.state);
  finish(st, d, fwd_flops(d.T, d.K));
}
void BM_mamba2_ssd_forward(benchmark::State& st) {
  seqmix_bench::use_threads(int(st.range(2)));
  data d(st.range(0), st.range(1));
  seqmix::mamba2_ssd<float> m({.dt_softplus = false});
  for (auto _ : st) m.forward_chunked(d.v, d.dt, d.A_log, d.k, d.q, {}, {}, d.o, d.state);
  finish(st, d, fwd_flops(d.T, d.K));
}
void BM_softmax_forward(benchmark::State& st) {
  seqmix_bench::use_threads(int(st.range(2)));
  data d(st.range(0), st.range(1));
  seqmix::softmax_attention<float> m;
  for (auto _ : st) m.forward(d.q, d.k, d.v, d.o);
  finish(st, d, H * pairs(d.T, 0) * 2.0 * double(2 * d.K));
}
void BM_swa_forward(benchmark::State& st) {
  seqmix_bench::use_threads(int(st.range(2)));
  data d(st.range(0), st.range(1));
  seqmix::sliding_window_attention<float> m({.window = swa_window});
  for (auto _ : st) m.forward(d.q, d.k, d.v, d.o);
  finish(st, d, H * pairs(d.T, swa_window) * 2.0 * double(2 * d.K));
}

// ---- backward --------------------------------------------------------------------------------
void BM_linear_attention_backward(benchmark::State& st) {
  seqmix_bench::use_threads(int(st.range(2)));
  data d(st.range(0), st.range(1));
  for (auto _ : st)
    seqmix::linear_attention_backward<float>(d.q, d.k, d.v, d.h0, d.do_, d.dht, d.dq, d.dk, d.dv,
                                             d.dh0);
  finish(st, d, bwd_flops(d.T, d.K));
}
void BM_simple_gla_backward(benchmark::State& st) {
  seqmix_bench::use_threads(int(st.range(2)));
  data d(st.range(0), st.range(1));
  for (auto _ : st)
    seqmix::simple_gla_backward<float>(d.q, d.k, d.v, d.g, d.h0, d.do_, d.dht, d.dq, d.dk, d.dv,
                                       d.dg, d.dh0);
  finish(st, d, bwd_flops(d.T, d.K));
}
void BM_gla_backward(benchmark::State& st) {
  seqmix_bench::use_threads(int(st.range(2)));
  data d(st.range(0), st.range(1));
  for (auto _ : st)
    seqmix::gla_backward<float>(d.q, d.k, d.v, d.gk, d.h0, d.do_, d.dht, d.dq, d.dk, d.dv, d.dgk,
                                d.dh0);
  finish(st, d, bwd_flops(d.T, d.K));
}
void BM_mamba2_ssd_backward(benchmark::State& st) {
  seqmix_bench::use_threads(int(st.range(2)));
  data d(st.range(0), st.range(1));
  seqmix::mamba2_ssd_grads<float> gr{d.dv, d.ddt, d.dA, d.dk, d.dq, {}, d.dh0};
  for (auto _ : st)
    seqmix::mamba2_ssd_backward<float>(d.v, d.dt, d.A, d.k, d.q, {}, d.h0, d.do_, d.dht, gr);
  finish(st, d, bwd_flops(d.T, d.K));
}
void BM_softmax_backward(benchmark::State& st) {
  seqmix_bench::use_threads(int(st.range(2)));
  data d(st.range(0), st.range(1));
  for (auto _ : st)
    seqmix::softmax_attention_backward<float>(d.q, d.k, d.v, d.do_, d.dq, d.dk, d.dv);
  finish(st, d, H * pairs(d.T, 0) * (2.0 * double(2 * d.K) + 2.0 * double(5 * d.K)));
}
void BM_swa_backward(benchmark::State& st) {
  seqmix_bench::use_threads(int(st.range(2)));
  data d(st.range(0), st.range(1));
  seqmix::backward_options<float> o;
  o.window = swa_window;
  for (auto _ : st)
    seqmix::softmax_attention_backward<float>(d.q, d.k, d.v, d.do_, d.dq, d.dk, d.dv, o);
  finish(st, d, H * pairs(d.T, swa_window) * (2.0 * double(2 * d.K) + 2.0 * double(5 * d.K)));
}

void gated_args(benchmark::internal::Benchmark* b) {
  for (index_t K : {64, 128})
    for (int t : {1, 2}) b->Args({8192, K, t});
  b->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(0.2);
}
void softmax_args(benchmark::internal::Benchmark* b) {
  for (index_t K : {64, 128})
    for (int t : {1, 2}) b->Args({2048, K, t});
  b->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(0.2);
}

// ---- DPLR family: backward vs chunked and recurrent forward, same process, CPU time ------------
enum class dop { delta, gdn, kda, rwkv7, rwkv6 };

double cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

struct dplr_data : data {
  tensor<float, 4> kn, a, b, dw, da, db;
  tensor<float, 3> beta, dbeta;
  tensor<float, 2> u, du;
  dplr_data(index_t t, index_t kk)
      : data(t, kk),
        kn(randn<4>({1, t, H, kk})),
        a({1, t, H, kk}),
        b({1, t, H, kk}),
        dw({1, t, H, kk}),
        da({1, t, H, kk}),
        db({1, t, H, kk}),
        beta({1, t, H}, 0.5f),
        dbeta({1, t, H}),
        u(randn<2>({H, kk})),
        du({H, kk}) {
    for (index_t r = 0; r < kn.size() / kk; ++r) {
      float ss = 0;
      for (index_t i = 0; i < kk; ++i) ss += kn[r * kk + i] * kn[r * kk + i];
      for (index_t i = 0; i < kk; ++i) {
        kn[r * kk + i] /= std::sqrt(ss);
        a[r * kk + i] = -kn[r * kk + i];
        b[r * kk + i] = 0.5f * kn[r * kk + i];
      }
    }
  }
};

template <dop D>
void BM_dplr_backward_ratio(benchmark::State& st) {
  const int threads = int(st.range(2));
  seqmix_bench::use_threads(threads);
  dplr_data d(st.range(0), st.range(1));
  const index_t K = d.K;
  auto& S = d.state;
  auto forward = [&](bool chunked) {
    if constexpr (D == dop::delta) {
      seqmix::delta_net<float> m;
      chunked ? m.forward_chunked(d.q, d.kn, d.v, d.beta, d.o, S)
              : m.forward_recurrent(d.q, d.kn, d.v, d.beta, d.o, S);
    } else if constexpr (D == dop::gdn) {
      seqmix::gated_delta_net<float> m;
      chunked ? m.forward_chunked(d.q, d.kn, d.v, d.g, d.beta, d.o, S)
              : m.forward_recurrent(d.q, d.kn, d.v, d.g, d.beta, d.o, S);
    } else if constexpr (D == dop::kda) {
      seqmix::kda<float> m;
      chunked ? m.forward_chunked(d.q, d.kn, d.v, d.gk, d.beta, d.o, S)
              : m.forward_recurrent(d.q, d.kn, d.v, d.gk, d.beta, d.o, S);
    } else if constexpr (D == dop::rwkv7) {
      seqmix::rwkv7<float> m;
      chunked ? m.forward_chunked(d.q, d.kn, d.v, d.gk, d.a, d.b, d.o, S)
              : m.forward_recurrent(d.q, d.kn, d.v, d.gk, d.a, d.b, d.o, S);
    } else {
      seqmix::rwkv6<float> m;
      chunked ? m.forward_chunked(d.q, d.kn, d.v, d.gk, d.u, d.o, S)
              : m.forward_recurrent(d.q, d.kn, d.v, d.gk, d.u, d.o, S);
    }
  };
  auto backward = [&] {
    if constexpr (D == dop::delta) {
      seqmix::delta_rule_backward<float>(d.q, d.kn, d.v, d.beta, d.h0, d.do_, d.dht, d.dq, d.dk,
                                         d.dv, d.dbeta, d.dh0);
    } else if constexpr (D == dop::gdn) {
      seqmix::gated_delta_rule_backward<float>(d.q, d.kn, d.v, d.g, d.beta, d.h0, d.do_, d.dht,
                                               d.dq, d.dk, d.dv, d.dg, d.dbeta, d.dh0);
    } else if constexpr (D == dop::kda) {
      seqmix::kda_backward<float>(d.q, d.kn, d.v, d.gk, d.beta, d.h0, d.do_, d.dht, d.dq, d.dk,
                                  d.dv, d.dgk, d.dbeta, d.dh0);
    } else if constexpr (D == dop::rwkv7) {
      seqmix::rwkv7_backward<float>(d.q, d.kn, d.v, d.gk, d.a, d.b, d.h0, d.do_, d.dht, d.dq, d.dk,
                                    d.dv, d.dw, d.da, d.db, d.dh0);
    } else {
      seqmix::rwkv6_backward<float>(d.q, d.kn, d.v, d.gk, d.u, d.h0, d.do_, d.dht, d.dq, d.dk, d.dv,
                                    d.dw, d.du, d.dh0);
    }
  };
  forward(true), forward(false), backward();  // warm the arenas
  double tc = 0, tr = 0, tb = 0;
  for (auto _ : st) {
    double t0 = cpu_seconds();
    forward(true);
    double t1 = cpu_seconds();
    forward(false);
    double t2 = cpu_seconds();
    backward();
    double t3 = cpu_seconds();
    tc += t1 - t0, tr += t2 - t1, tb += t3 - t2;
  }
  const double it = double(st.iterations());
  const double per = (D == dop::rwkv6 ? 17.0 : 33.0) * double(K * K);
  const double flops = double(d.T) * H * per;
  st.counters["fwd_chunked_ms"] = 1e3 * tc / it;
  st.counters["fwd_recurrent_ms"] = 1e3 * tr / it;
  st.counters["bwd_ms"] = 1e3 * tb / it;
  st.counters["bwd_over_chunked"] = tb / tc;
  st.counters["bwd_over_recurrent"] = tb / tr;
  st.counters["bwd_gflops"] = 1e-9 * flops * it / tb;
}

void dplr_args(benchmark::internal::Benchmark* b) {
  for (index_t K : {64, 128})
    for (int t : {1, 2}) b->Args({8192, K, t});
  b->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(2);
}

}  // namespace

BENCHMARK(BM_linear_attention_forward)->Apply(gated_args);
BENCHMARK(BM_linear_attention_backward)->Apply(gated_args);
BENCHMARK(BM_simple_gla_forward)->Apply(gated_args);
BENCHMARK(BM_simple_gla_backward)->Apply(gated_args);
BENCHMARK(BM_gla_forward)->Apply(gated_args);
BENCHMARK(BM_gla_backward)->Apply(gated_args);
BENCHMARK(BM_mamba2_ssd_forward)->Apply(gated_args);
BENCHMARK(BM_mamba2_ssd_backward)->Apply(gated_args);
BENCHMARK(BM_softmax_forward)->Apply(softmax_args);
BENCHMARK(BM_softmax_backward)->Apply(softmax_args);
BENCHMARK(BM_swa_forward)->Apply(gated_args);
BENCHMARK(BM_swa_backward)->Apply(gated_args);

BENCHMARK(BM_dplr_backward_ratio<dop::delta>)
    ->Name("BM_delta_rule_backward_ratio")
    ->Apply(dplr_args);
BENCHMARK(BM_dplr_backward_ratio<dop::gdn>)
    ->Name("BM_gated_delta_rule_backward_ratio")
    ->Apply(dplr_args);
BENCHMARK(BM_dplr_backward_ratio<dop::kda>)->Name("BM_kda_backward_ratio")->Apply(dplr_args);
BENCHMARK(BM_dplr_backward_ratio<dop::rwkv7>)->Name("BM_rwkv7_backward_ratio")->Apply(dplr_args);
BENCHMARK(BM_dplr_backward_ratio<dop::rwkv6>)->Name("BM_rwkv6_backward_ratio")->Apply(dplr_args);

BENCHMARK_MAIN();
