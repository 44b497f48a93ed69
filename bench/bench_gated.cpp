// SPDX-License-Identifier: MIT
// Gated-accumulation family: linear attention, simple GLA, GLA, RWKV-6, Mamba2 SSD, both forms and
// the decode step. B = 1, H = 8 throughout; args {T, K (= V, or N = P for Mamba2), threads}.
//
// FLOP per head and token (multiply and add count as two):
//   chunked:   2·C·(K + V) + 4·K·V    (C = min(chunk 64, T); dense C×C blocks, docs/math.md §1)
//   recurrent: 5·K·V gated (decay mul + 2 FMA per state element), 4·K·V linear attention
//   step:      5·K·V (one token per head)
// The machine's FMA peak is bench_peak's BM_fma_peak (116.6 GFLOP/s on 1 thread, 232.6 on 2).
// ggml peer shapes (docs/bench/peers.md): gated_linear_attn at H=8, K=V=64, T=8192 (150-190k
// tokens/s on 1 thread, 230-270k on 2; decode 6.0 µs) and Mamba2 ssm_scan at H=8, P=N=64
// (185k / 345k tokens/s, decode 6.2 µs): BM_gla_* and BM_mamba2_ssd_* with {8192, 64, t}.
// Switch-over: BM_linear_attention_* sweeps T = 16..256 and the forward benchmarks T = 512..65536;
// on the 2-core dev machine the recurrent form is faster at every T, so forward() takes it.
// The decode step runs on the calling thread below 2^20 state updates (a parallel region costs
// more than the step), so its threads:2 rows measure the same code as threads:1.
#include <cmath>
#include <random>

#include <seqmix/core/gate_check.hpp>
#include <seqmix/mixers/gla.hpp>
#include <seqmix/mixers/linear_attention.hpp>
#include <seqmix/mixers/mamba2_ssd.hpp>
#include <seqmix/mixers/rwkv6.hpp>
#include <seqmix/mixers/simple_gla.hpp>

#include "bench_common.hpp"

namespace {

using seqmix::index_t;
using seqmix::tensor;
constexpr index_t H = 8;
constexpr index_t chunk = 64;

template <std::size_t R>
tensor<float, R> randn(const seqmix::shape_t<R>& shape, float scale = 1.f, float shift = 0.f) {
  std::mt19937 rng(1234);
  std::normal_distribution<float> d(0.f, 1.f);
  tensor<float, R> t(shape);
  for (index_t i = 0; i < t.size(); ++i) t[i] = d(rng) * scale + shift;
  return t;
}
template <std::size_t R>
tensor<float, R> gates(const seqmix::shape_t<R>& shape) {
  auto g = randn<R>(shape);
  for (index_t i = 0; i < g.size(); ++i) g[i] = seqmix::math::logsigmoid(g[i]) / 16.f;
  return g;
}

double chunked_flops(index_t T, index_t K, index_t V) {
  const double C = double(std::min(chunk, T));
  return double(T) * H * (2.0 * C * double(K + V) + 4.0 * double(K) * double(V));
}
double recurrent_flops(index_t T, index_t K, index_t V, double per_elem = 5.0) {
  return double(T) * H * per_elem * double(K) * double(V);
}

struct inputs {
  index_t T, K, V;
  tensor<float, 4> q, k, v, gk, o;
  tensor<float, 3> g;
  tensor<float, 4> state;
  inputs(index_t t, index_t kk, index_t vv, bool per_key)
      : T(t),
        K(kk),
        V(vv),
        q(randn<4>({1, t, H, kk})),
        k(randn<4>({1, t, H, kk})),
        v(randn<4>({1, t, H, vv})),
        gk(per_key ? gates<4>({1, t, H, kk}) : tensor<float, 4>()),
        o({1, t, H, vv}),
        g(gates<3>({1, t, H})),
        state({1, H, kk, vv}) {}
};

// ---- simple GLA ------------------------------------------------------------------------------
void BM_simple_gla_chunked(benchmark::State& st) {
  seqmix_bench::use_threads(int(st.range(2)));
  inputs in(st.range(0), st.range(1), st.range(1), false);
  seqmix::simple_gla<float> m({.scale = {}, .chunk_size = chunk});
  for (auto _ : st) m.forward_chunked(in.q, in.k, in.v, in.g, in.o, in.state);
  seqmix_bench::report_rates(st, double(in.T), chunked_flops(in.T, in.K, in.V));
}
void BM_simple_gla_recurrent(benchmark::State& st) {
  seqmix_bench::use_threads(int(st.range(2)));
  inputs in(st.range(0), st.range(1), st.range(1), false);
  seqmix::simple_gla<float> m;
  for (auto _ : st) m.forward_recurrent(in.q, in.k, in.v, in.g, in.o, in.state);
  seqmix_bench::report_rates(st, double(in.T), recurrent_flops(in.T, in.K, in.V));
}

// ---- GLA -------------------------------------------------------------------------------------
void BM_gla_chunked(benchmark::State& st) {
  seqmix_bench::use_threads(int(st.range(2)));
  inputs in(st.range(0), st.range(1), st.range(1), true);
  seqmix::gla<float> m({.scale = {}, .chunk_size = chunk});
  for (auto _ : st) m.forward_chunked(in.q, in.k, in.v, in.gk, in.o, in.state);
  seqmix_bench::report_rates(st, double(in.T), chunked_flops(in.T, in.K, in.V));
}
void BM_gla_recurrent(benchmark::State& st) {
  seqmix_bench::use_threads(int(st.range(2)));
  inputs in(st.range(0), st.range(1), st.range(1), true);
  seqmix::gla<float> m;
  for (auto _ : st) m.forward_recurrent(in.q, in.k, in.v, in.gk, in.o, in.state);
  seqmix_bench::report_rates(st, double(in.T), recurrent_flops(in.T, in.K, in.V));
}
// ---- RWKV-6 (GLA's per-key gate, read before the write, bonus u [H, K]) ----------------------
// ggml peer (issue 18, measured on another machine than this one): rwkv_wkv6 at H=8, K=V=64,
// T=8192: 130k / 204k tokens/s on 1 / 2 threads, decode 5.7 / 8.8 µs. FLOP counted as GLA's
// (the bonus adds 3·K per token: under 1 % at K = 64).
void BM_rwkv6_chunked(benchmark::State& st) {
  seqmix_bench::use_threads(int(st.range(2)));
  inputs in(st.range(0), st.range(1), st.range(1), true);
  const auto u = randn<2>({H, in.K}, 0.5f);
  seqmix::rwkv6<float> m({.scale = {}, .chunk_size = chunk});
  for (auto _ : st) m.forward_chunked(in.q, in.k, in.v, in.gk, u, in.o, in.state);
  seqmix_bench::report_rates(st, double(in.T), chunked_flops(in.T, in.K, in.V));
}
void BM_rwkv6_recurrent(benchmark::State& st) {
  seqmix_bench::use_threads(int(st.range(2)));
  inputs in(st.range(0), st.range(1), st.range(1), true);
  const auto u = randn<2>({H, in.K}, 0.5f);
  seqmix::rwkv6<float> m;
  for (auto _ : st) m.forward_recurrent(in.q, in.k, in.v, in.gk, u, in.o, in.state);
  seqmix_bench::report_rates(st, double(in.T), recurrent_flops(in.T, in.K, in.V));
}
void BM_rwkv6_step(benchmark::State& st) {
  seqmix_bench::use_threads(int(st.range(1)));
  const index_t K = st.range(0);
  inputs in(1, K, K, true);
  const auto u = randn<2>({H, K}, 0.5f);
  seqmix::rwkv6<float> m;
  for (auto _ : st) {
    m.step(in.q.select<1>(0), in.k.select<1>(0), in.v.select<1>(0), in.gk.select<1>(0), u,
           in.o.select<1>(0), in.state);
  }
  seqmix_bench::report_rates(st, 1.0, recurrent_flops(1, K, K));
}

/// Decode: one token for B = 1, H heads, state [1, H, K, K]. Args {K, threads}.
void BM_gla_step(benchmark::State& st) {
  seqmix_bench::use_threads(int(st.range(1)));
  const index_t K = st.range(0);
  inputs in(1, K, K, true);
  seqmix::gla<float> m;
  for (auto _ : st) {
    m.step(in.q.select<1>(0), in.k.select<1>(0), in.v.select<1>(0), in.gk.select<1>(0),
           in.o.select<1>(0), in.state);
  }
  seqmix_bench::report_rates(st, 1.0, recurrent_flops(1, K, K));
}
void BM_simple_gla_step(benchmark::State& st) {
  seqmix_bench::use_threads(int(st.range(1)));
  const index_t K = st.range(0);
  inputs in(1, K, K, false);
  seqmix::simple_gla<float> m;
  for (auto _ : st) {
    m.step(in.q.select<1>(0), in.k.select<1>(0), in.v.select<1>(0), in.g.select<1>(0),
           in.o.select<1>(0), in.state);
  }
  seqmix_bench::report_rates(st, 1.0, recurrent_flops(1, K, K));
}

// ---- cost of the front checks in a decode step (issue 10 item 5) -----------------------------
// BM_gla_step runs every check of the public step (shapes, aliasing, log gates <= 0);
// BM_gla_step_unchecked calls the engine on the same views with none of them;
// BM_gla_gate_check is the log-gate check alone on gk1 [1, H, K]. Args {K, threads}; compare
// rows of one run (alternate and repeat them on a loaded machine).
void BM_gla_step_unchecked(benchmark::State& st) {
  seqmix_bench::use_threads(int(st.range(1)));
  const index_t K = st.range(0);
  inputs in(1, K, K, true);
  namespace eng = seqmix::kernels::gated;
  const eng::problem<float> p{in.q, in.k, in.v, in.o, in.state, {}, 1.f / std::sqrt(float(K)), {}};
  const eng::key_gate<float> gate{in.gk, {}};
  for (auto _ : st) eng::run(eng::form::recurrent, p, gate, chunk, 0);
  seqmix_bench::report_rates(st, 1.0, recurrent_flops(1, K, K));
}
void BM_gla_gate_check(benchmark::State& st) {
  seqmix_bench::use_threads(int(st.range(1)));
  const index_t K = st.range(0);
  inputs in(1, K, K, true);
  const seqmix::tensor_view<const float, 3> gk1 = in.gk.view().select<1>(0);
  const seqmix::checker check{"gla::step"};
  for (auto _ : st) {
    seqmix::check_log_gates<float, 3>(check, "gk1", gk1, false, "b, h, k");
    benchmark::ClobberMemory();
  }
  st.counters["gates"] = double(gk1.size());
}

// ---- linear attention ------------------------------------------------------------------------
void BM_linear_attention_chunked(benchmark::State& st) {
  seqmix_bench::use_threads(int(st.range(2)));
  inputs in(st.range(0), st.range(1), st.range(1), false);
  seqmix::linear_attention<float> m;
  for (auto _ : st) m.forward_chunked(in.q, in.k, in.v, in.o, in.state);
  seqmix_bench::report_rates(st, double(in.T), chunked_flops(in.T, in.K, in.V));
}
void BM_linear_attention_recurrent(benchmark::State& st) {
  seqmix_bench::use_threads(int(st.range(2)));
  inputs in(st.range(0), st.range(1), st.range(1), false);
  seqmix::linear_attention<float> m;
  for (auto _ : st) m.forward_recurrent(in.q, in.k, in.v, in.o, in.state);
  seqmix_bench::report_rates(st, double(in.T), recurrent_flops(in.T, in.K, in.V, 4.0));
}

// ---- Mamba2 SSD (G = 1 group, N = P) ---------------------------------------------------------
struct mamba_inputs {
  index_t T, N, P;
  tensor<float, 4> x, Bm, Cm, y, state;
  tensor<float, 3> dt;
  tensor<float, 1> A_log, D, dt_bias;
  mamba_inputs(index_t t, index_t n)
      : T(t),
        N(n),
        P(n),
        x(randn<4>({1, t, H, n})),
        Bm(randn<4>({1, t, 1, n})),
        Cm(randn<4>({1, t, 1, n})),
        y({1, t, H, n}),
        state({1, H, n, n}),
        dt(randn<3>({1, t, H}, 1.f, -3.f)),
        A_log(randn<1>({H}, 0.5f)),
        D(randn<1>({H})),
        dt_bias(randn<1>({H}, 0.1f)) {}
};
void BM_mamba2_ssd_chunked(benchmark::State& st) {
  seqmix_bench::use_threads(int(st.range(2)));
  mamba_inputs in(st.range(0), st.range(1));
  seqmix::mamba2_ssd<float> m;
  for (auto _ : st)
    m.forward_chunked(in.x, in.dt, in.A_log, in.Bm, in.Cm, in.D, in.dt_bias, in.y, in.state);
  seqmix_bench::report_rates(st, double(in.T), chunked_flops(in.T, in.N, in.P));
}
void BM_mamba2_ssd_recurrent(benchmark::State& st) {
  seqmix_bench::use_threads(int(st.range(2)));
  mamba_inputs in(st.range(0), st.range(1));
  seqmix::mamba2_ssd<float> m;
  for (auto _ : st)
    m.forward_recurrent(in.x, in.dt, in.A_log, in.Bm, in.Cm, in.D, in.dt_bias, in.y, in.state);
  seqmix_bench::report_rates(st, double(in.T), recurrent_flops(in.T, in.N, in.P));
}
void BM_mamba2_ssd_step(benchmark::State& st) {
  seqmix_bench::use_threads(int(st.range(1)));
  mamba_inputs in(1, st.range(0));
  seqmix::mamba2_ssd<float> m;
  for (auto _ : st) {
    m.step(in.x.select<1>(0), in.dt.select<1>(0), in.A_log, in.Bm.select<1>(0), in.Cm.select<1>(0),
           in.D, in.dt_bias, in.y.select<1>(0), in.state);
  }
  seqmix_bench::report_rates(st, 1.0, recurrent_flops(1, in.N, in.P));
}

void rwkv6_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"T", "K", "threads"});
  for (int threads : {1, 2}) {
    for (index_t T : {512, 2048, 8192}) b->Args({T, 64, threads});
  }
  b->UseRealTime();
}
void rwkv6_step_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"K", "threads"});
  for (int threads : {1, 2}) b->Args({64, threads});
  b->UseRealTime();
}

void forward_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"T", "K", "threads"});
  for (int threads : {1, 2}) {
    for (index_t K : {64, 128}) {
      for (index_t T : {512, 2048, 8192}) b->Args({T, K, threads});
    }
    // the performance gate: K = V = 128, T >= 4096
    for (index_t T : {4096, 16384, 65536}) b->Args({T, 128, threads});
  }
  b->UseRealTime();
}
void switch_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"T", "K", "threads"});
  for (index_t K : {64, 128}) {
    for (index_t T : {16, 32, 64, 128, 256}) b->Args({T, K, 1});
  }
  b->UseRealTime();
}
void step_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"K", "threads"});
  for (int threads : {1, 2}) {
    for (index_t K : {64, 128}) b->Args({K, threads});
  }
  b->UseRealTime();
}
void mamba_args(benchmark::internal::Benchmark* b) {
  b->ArgNames({"T", "N", "threads"});
  for (int threads : {1, 2}) {
    for (index_t T : {512, 8192}) b->Args({T, 64, threads});
  }
  b->UseRealTime();
}

}  // namespace

BENCHMARK(BM_simple_gla_chunked)->Apply(forward_args);
BENCHMARK(BM_simple_gla_recurrent)->Apply(forward_args);
BENCHMARK(BM_gla_chunked)->Apply(forward_args);
BENCHMARK(BM_gla_recurrent)->Apply(forward_args);
BENCHMARK(BM_linear_attention_chunked)->Apply(switch_args);
BENCHMARK(BM_linear_attention_recurrent)->Apply(switch_args);
BENCHMARK(BM_mamba2_ssd_chunked)->Apply(mamba_args);
BENCHMARK(BM_mamba2_ssd_recurrent)->Apply(mamba_args);
BENCHMARK(BM_gla_step)->Apply(step_args);
BENCHMARK(BM_gla_step_unchecked)->Apply(step_args);
BENCHMARK(BM_gla_gate_check)->Apply(step_args);
BENCHMARK(BM_simple_gla_step)->Apply(step_args);
BENCHMARK(BM_mamba2_ssd_step)->Apply(step_args);
BENCHMARK(BM_rwkv6_chunked)->Apply(rwkv6_args);
BENCHMARK(BM_rwkv6_recurrent)->Apply(rwkv6_args);
BENCHMARK(BM_rwkv6_step)->Apply(rwkv6_step_args);

BENCHMARK_MAIN();
