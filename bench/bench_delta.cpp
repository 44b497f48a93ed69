// SPDX-License-Identifier: MIT
// Delta-rule family benchmarks: Gated DeltaNet (and DeltaNet), KDA and RWKV-7: chunked, recurrent
// and decode step.
// B = 1, H = HV = 8 fixed; K = V; arguments {T, K, threads}. Wall-clock (UseRealTime).
//
// FLOP formulas (multiply and add = 2), per token and value head:
//   recurrent / step:  7·K·V              (decay 1, Sᵀk 2, rank-1 update 2, Sᵀq 2)
//   chunked (C = 64):  2C(3K + 2V) + C²/3 + 6·K·V   (the work the WY/UT form executes:
//                      [K;Q]Kᵀ 4CK, W = T X 2CK, U = T Y 2CV, forward substitution C²/3,
//                      W S and (Q⊙e^G) S 4KV, P V' 2CV, state update 2KV)
// Peer shapes (docs/bench/peers.md, ggml gated_delta_net, B=1, H=8, K=V=64):
//   BM_gated_delta_net_chunked/T:8192/K:64/threads:{1,2} (peer: 64k / 111k tokens/s) and
//   BM_gated_delta_net_step/K:64/threads:1 (peer: 15.5 µs per step).
// KDA and RWKV-7 (kernels/delta/dplr.hpp), B = 1, H = 8, K = V = 64, T in {512, 2048, 8192}:
//   recurrent / step: KDA 7·K·V, RWKV-7 9·K·V (ggml's count for rwkv_wkv7);
//   chunked: KDA 2C(3K + 2V) + 6·K·V, RWKV-7 2C(4K + 4V) + 8·K·V (GEMM work; the exact diagonal
//   blocks' exps are not counted). Peers (ggml d99724f, token by token, quoted in issue 18 and
//   measured on another machine): rwkv_wkv7 154k / 187k tokens/s
//   at T = 8192 on 1 / 2 threads, decode 8.2 / 5.5 µs; ggml runs KDA through gated_delta_net
//   (61k / 104k, decode 14 µs).
#include <cmath>
#include <cstdint>
#include <random>

#include <benchmark/benchmark.h>

#include <seqmix/mixers/delta_net.hpp>
#include <seqmix/mixers/gated_delta_net.hpp>
#include <seqmix/mixers/kda.hpp>
#include <seqmix/mixers/rwkv7.hpp>

#include "bench_common.hpp"

namespace {

using seqmix::index_t;
using seqmix::tensor;

constexpr index_t B = 1, H = 8;

struct problem {
  tensor<float, 4> q, k, v, o, state;
  tensor<float, 3> g, beta;
  problem(index_t T, index_t K, index_t V)
      : q({B, T, H, K}),
        k({B, T, H, K}),
        v({B, T, H, V}),
        o({B, T, H, V}),
        state({B, H, K, V}),
        g({B, T, H}),
        beta({B, T, H}) {
    std::mt19937 rng(42);
    std::normal_distribution<float> n(0.f, 1.f);
    for (index_t i = 0; i < q.size(); ++i) q[i] = n(rng);
    for (index_t i = 0; i < k.size(); ++i) k[i] = n(rng);
    for (index_t i = 0; i < v.size(); ++i) v[i] = n(rng);
    for (index_t i = 0; i < g.size(); ++i) g[i] = seqmix::math::logsigmoid(n(rng)) * 0.1f;
    for (index_t i = 0; i < beta.size(); ++i) beta[i] = seqmix::math::sigmoid(n(rng));
  }
};

double chunked_flops(double T, double K, double V, double C = 64) {
  return T * H * (2 * C * (3 * K + 2 * V) + C * C / 3 + 6 * K * V);
}
double recurrent_flops(double T, double K, double V) {
  return T * H * 7 * K * V;
}

template <bool Gated, bool Chunked>
void run_form(benchmark::State& state) {
  const index_t T = state.range(0), K = state.range(1), V = K;
  seqmix_bench::use_threads(static_cast<int>(state.range(2)));
  problem p(T, K, V);
  using mixer = std::conditional_t<Gated, seqmix::gated_delta_net<float>, seqmix::delta_net<float>>;
  mixer m(typename mixer::options{.use_qk_l2norm = true});
  for (auto _ : state) {
    p.state.fill(0.f);
    if constexpr (Gated) {
      if constexpr (Chunked) {
        m.forward_chunked(p.q, p.k, p.v, p.g, p.beta, p.o, p.state);
      } else {
        m.forward_recurrent(p.q, p.k, p.v, p.g, p.beta, p.o, p.state);
      }
    } else {
      if constexpr (Chunked) {
        m.forward_chunked(p.q, p.k, p.v, p.beta, p.o, p.state);
      } else {
        m.forward_recurrent(p.q, p.k, p.v, p.beta, p.o, p.state);
      }
    }
    benchmark::DoNotOptimize(p.o.data());
  }
  const double flops = Chunked ? chunked_flops(double(T), double(K), double(V))
                               : recurrent_flops(double(T), double(K), double(V));
  seqmix_bench::report_rates(state, double(T * B), flops);
}

// FLOPs per step: H · 7·K·V.
void BM_gated_delta_net_step(benchmark::State& state) {
  const index_t K = state.range(0), V = K;
  seqmix_bench::use_threads(static_cast<int>(state.range(1)));
  problem p(1, K, V);
  seqmix::gated_delta_net<float> m({.use_qk_l2norm = true});
  seqmix::tensor_view<const float, 4> q = p.q, k = p.k, v = p.v;
  seqmix::tensor_view<const float, 3> g = p.g, beta = p.beta;
  auto o = seqmix::tensor_view<float, 4>(p.o).select<1>(0);
  for (auto _ : state) {
    m.step(q.select<1>(0), k.select<1>(0), v.select<1>(0), g.select<1>(0), beta.select<1>(0), o,
           p.state);
    benchmark::ClobberMemory();
  }
  seqmix_bench::report_rates(state, double(B), recurrent_flops(1, double(K), double(V)));
}

void shapes(benchmark::internal::Benchmark* b, std::initializer_list<int64_t> Ts) {
  b->ArgNames({"T", "K", "threads"});
  for (int64_t K : {64, 128})
    for (int64_t T : Ts)
      for (int64_t th : {1, 2}) b->Args({T, K, th});
  b->UseRealTime()->Unit(benchmark::kMillisecond);
}

void BM_gated_delta_net_chunked(benchmark::State& s) {
  run_form<true, true>(s);
}
void BM_gated_delta_net_recurrent(benchmark::State& s) {
  run_form<true, false>(s);
}
void BM_delta_net_chunked(benchmark::State& s) {
  run_form<false, true>(s);
}
void BM_delta_net_recurrent(benchmark::State& s) {
  run_form<false, false>(s);
}

BENCHMARK(BM_gated_delta_net_chunked)->Apply([](auto* b) {
  shapes(b, {64, 128, 256, 512, 2048, 4096, 8192, 65536});
});
BENCHMARK(BM_gated_delta_net_recurrent)->Apply([](auto* b) {
  shapes(b, {64, 128, 256, 512, 2048, 4096, 8192, 65536});
});
BENCHMARK(BM_delta_net_chunked)->Apply([](auto* b) { shapes(b, {512, 8192}); });
BENCHMARK(BM_delta_net_recurrent)->Apply([](auto* b) { shapes(b, {512, 8192}); });
BENCHMARK(BM_gated_delta_net_step)
    ->ArgNames({"K", "threads"})
    ->Args({64, 1})
    ->Args({64, 2})
    ->Args({128, 1})
    ->Args({128, 2})
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);

// ---- KDA and RWKV-7 ----

/// Per-key gates [B, T, H, K]; KDA: beta, unit keys; RWKV-7: w as its layer makes it, a = -kk,
/// b = kk ⊙ sigmoid(·).
struct dplr_problem {
  tensor<float, 4> q, k, v, g, a, b, o, state;
  tensor<float, 3> beta;
  dplr_problem(index_t T, index_t K, index_t V)
      : q({B, T, H, K}),
        k({B, T, H, K}),
        v({B, T, H, V}),
        g({B, T, H, K}),
        a({B, T, H, K}),
        b({B, T, H, K}),
        o({B, T, H, V}),
        state({B, H, K, V}),
        beta({B, T, H}) {
    std::mt19937 rng(43);
    std::normal_distribution<float> n(0.f, 1.f);
    for (index_t i = 0; i < q.size(); ++i) q[i] = n(rng);
    for (index_t i = 0; i < k.size(); ++i) k[i] = n(rng);
    for (index_t i = 0; i < v.size(); ++i) v[i] = n(rng);
    for (index_t i = 0; i < g.size(); ++i) g[i] = -0.6065f * seqmix::math::sigmoid(n(rng));
    for (index_t i = 0; i < beta.size(); ++i) beta[i] = seqmix::math::sigmoid(n(rng));
    for (index_t r = 0; r < a.size() / K; ++r) {
      float ss = 0;
      for (index_t i = 0; i < K; ++i) ss += k[r * K + i] * k[r * K + i];
      for (index_t i = 0; i < K; ++i) {
        const float kk = k[r * K + i] / std::sqrt(ss);
        a[r * K + i] = -kk;
        b[r * K + i] = kk * seqmix::math::sigmoid(n(rng));
      }
    }
  }
};

template <bool Kda>
double dplr_flops(bool chunked, double T, double K, double V, double C = 64) {
  if (chunked)
    return T * H *
           (Kda ? 2 * C * (3 * K + 2 * V) + 6 * K * V : 2 * C * (4 * K + 4 * V) + 8 * K * V);
  return T * H * (Kda ? 7 : 9) * K * V;
}

template <bool Kda, bool Chunked>
void run_dplr(benchmark::State& state) {
  const index_t T = state.range(0), K = state.range(1), V = K;
  seqmix_bench::use_threads(static_cast<int>(state.range(2)));
  dplr_problem p(T, K, V);
  const seqmix::kda<float> kda({.use_qk_l2norm = true});
  const seqmix::rwkv7<float> rwkv7;
  for (auto _ : state) {
    p.state.fill(0.f);
    if constexpr (Kda) {
      if constexpr (Chunked) {
        kda.forward_chunked(p.q, p.k, p.v, p.g, p.beta, p.o, p.state);
      } else {
        kda.forward_recurrent(p.q, p.k, p.v, p.g, p.beta, p.o, p.state);
      }
    } else {
      if constexpr (Chunked) {
        rwkv7.forward_chunked(p.q, p.k, p.v, p.g, p.a, p.b, p.o, p.state);
      } else {
        rwkv7.forward_recurrent(p.q, p.k, p.v, p.g, p.a, p.b, p.o, p.state);
      }
    }
    benchmark::DoNotOptimize(p.o.data());
  }
  seqmix_bench::report_rates(state, double(T * B),
                             dplr_flops<Kda>(Chunked, double(T), double(K), double(V)));
}

template <bool Kda>
void dplr_step(benchmark::State& state) {
  const index_t K = state.range(0), V = K;
  seqmix_bench::use_threads(static_cast<int>(state.range(1)));
  dplr_problem p(1, K, V);
  const seqmix::kda<float> kda({.use_qk_l2norm = true});
  const seqmix::rwkv7<float> rwkv7;
  seqmix::tensor_view<const float, 4> q = p.q, k = p.k, v = p.v, g = p.g, a = p.a, b = p.b;
  seqmix::tensor_view<const float, 3> beta = p.beta;
  auto o = seqmix::tensor_view<float, 4>(p.o).select<1>(0);
  for (auto _ : state) {
    if constexpr (Kda) {
      kda.step(q.select<1>(0), k.select<1>(0), v.select<1>(0), g.select<1>(0), beta.select<1>(0), o,
               p.state);
    } else {
      rwkv7.step(q.select<1>(0), k.select<1>(0), v.select<1>(0), g.select<1>(0), a.select<1>(0),
                 b.select<1>(0), o, p.state);
    }
    benchmark::ClobberMemory();
  }
  seqmix_bench::report_rates(state, double(B), dplr_flops<Kda>(false, 1, double(K), double(V)));
}

void dplr_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"T", "K", "threads"});
  for (int64_t T : {512, 2048, 8192})
    for (int64_t th : {1, 2}) b->Args({T, 64, th});
  b->UseRealTime()->Unit(benchmark::kMillisecond);
}

void BM_kda_chunked(benchmark::State& s) {
  run_dplr<true, true>(s);
}
void BM_kda_recurrent(benchmark::State& s) {
  run_dplr<true, false>(s);
}
void BM_rwkv7_chunked(benchmark::State& s) {
  run_dplr<false, true>(s);
}
void BM_rwkv7_recurrent(benchmark::State& s) {
  run_dplr<false, false>(s);
}
void BM_kda_step(benchmark::State& s) {
  dplr_step<true>(s);
}
void BM_rwkv7_step(benchmark::State& s) {
  dplr_step<false>(s);
}
BENCHMARK(BM_kda_chunked)->Apply(dplr_shapes);
BENCHMARK(BM_kda_recurrent)->Apply(dplr_shapes);
BENCHMARK(BM_rwkv7_chunked)->Apply(dplr_shapes);
BENCHMARK(BM_rwkv7_recurrent)->Apply(dplr_shapes);
BENCHMARK(BM_kda_step)
    ->ArgNames({"K", "threads"})
    ->Args({64, 1})
    ->Args({64, 2})
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_rwkv7_step)
    ->ArgNames({"K", "threads"})
    ->Args({64, 1})
    ->Args({64, 2})
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);

}  // namespace

BENCHMARK_MAIN();
