// SPDX-License-Identifier: MIT
// The MoE block's backward (kernels/backward/moe.hpp, front mixers/moe_backward.hpp) beside the
// grouped forward it differentiates, same block, same process (docs/math.md §6).
//
//   moe_bw_forward/E/k/D/I/T/threads    moe<float>::forward_grouped (Mixtral routing, SwiGLU)
//   moe_bw_backward/E/k/D/I/T/threads   moe_backward<float> on the same block, aux + z losses on
//
// FLOP formulas (multiply and add counted as two):
//   forward  2·T·D·E (router) + 6·T·k·D·I (experts: W1, W3, W2)
//   backward 6·T·D·E (logits, dx, dW_r) + 16·T·k·D·I (G and U recomputed, W2ᵀdy, two for dx,
//            dW1, dW3, dW2)
// Counters: ms_route, ms_rows, ms_weights, ms_tokens, ms_router: the backward's phases
// (kernels/backward/moe.hpp: routing + grouping, row items, weight GEMMs, per token, dW_r), wall
// ms per call; GFLOPs (per wall second), ms_cpu (process CPU time per call and thread: the time as
// if alone on a shared machine), GFLOPs_cpu (FLOP per CPU second and thread). The backward /
// forward time ratio is the ratio of the two rows' times (FLOP ratio 2.6 at the default shape).
#include <ctime>
#include <random>
#include <vector>

#include <seqmix/mixers/moe.hpp>
#include <seqmix/mixers/moe_backward.hpp>

#include "bench_common.hpp"

namespace {

using seqmix::index_t;
namespace km = seqmix::kernels::moe;

double process_cpu_seconds() {
  timespec t{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return double(t.tv_sec) + 1e-9 * double(t.tv_nsec);
}

struct block {
  seqmix::tensor<float, 2> router, x, dy;
  seqmix::tensor<float, 3> gate, up, down;
  seqmix::moe<float>::weights w;
};

block make_block(index_t E, index_t D, index_t I, index_t T) {
  std::mt19937_64 rng(7);
  std::normal_distribution<float> n(0.0f, 1.0f);
  block b{seqmix::tensor<float, 2>({E, D}),
          seqmix::tensor<float, 2>({T, D}),
          seqmix::tensor<float, 2>({T, D}),
          seqmix::tensor<float, 3>({E, I, D}),
          seqmix::tensor<float, 3>({E, I, D}),
          seqmix::tensor<float, 3>({E, D, I}),
          {}};
  const float sd = 1.0f / std::sqrt(float(D)), si = 1.0f / std::sqrt(float(I));
  for (index_t i = 0; i < b.router.size(); ++i) b.router[i] = n(rng) * sd;
  for (index_t i = 0; i < b.gate.size(); ++i) b.gate[i] = n(rng) * sd;
  for (index_t i = 0; i < b.up.size(); ++i) b.up[i] = n(rng) * sd;
  for (index_t i = 0; i < b.down.size(); ++i) b.down[i] = n(rng) * si;
  for (index_t i = 0; i < b.x.size(); ++i) b.x[i] = n(rng);
  for (index_t i = 0; i < b.dy.size(); ++i) b.dy[i] = n(rng);
  b.w.router = b.router;
  b.w.experts = km::expert_set<float>::stacked(b.gate, b.up, b.down);
  return b;
}

void counters(benchmark::State& state, double flops, double cpu, int threads) {
  using benchmark::Counter;
  state.counters["GFLOPs"] = Counter(flops * 1e-9, Counter::kIsIterationInvariantRate);
  const double per_call = cpu / double(state.iterations()) / threads;
  state.counters["ms_cpu"] = per_call * 1e3;
  state.counters["GFLOPs_cpu"] = flops / per_call * 1e-9;
}

void BM_moe_bw_forward(benchmark::State& state) {
  const index_t E = state.range(0), k = state.range(1), D = state.range(2), I = state.range(3),
                T = state.range(4);
  const int threads = static_cast<int>(state.range(5));
  seqmix_bench::use_threads(threads);
  const auto b = make_block(E, D, I, T);
  const seqmix::moe<float> m(seqmix::moe_options::mixtral(k), b.w);
  seqmix::tensor<float, 2> y({T, D});
  m.forward_grouped(b.x, y);  // warm the scratch
  const double cpu0 = process_cpu_seconds();
  for (auto _ : state) {
    m.forward_grouped(b.x, y);
    benchmark::ClobberMemory();
  }
  const double flops =
      2.0 * double(T) * double(D) * double(E) + 6.0 * double(T) * double(k) * double(D) * double(I);
  seqmix_bench::report_rates(state, double(T), flops);
  counters(state, flops, process_cpu_seconds() - cpu0, threads);
}

void BM_moe_bw_backward(benchmark::State& state) {
  const index_t E = state.range(0), k = state.range(1), D = state.range(2), I = state.range(3),
                T = state.range(4);
  const int threads = static_cast<int>(state.range(5));
  seqmix_bench::use_threads(threads);
  const auto b = make_block(E, D, I, T);
  const auto opt = seqmix::moe_options::mixtral(k);
  seqmix::tensor<float, 2> dx({T, D}), dr({E, D});
  seqmix::tensor<float, 3> dg({E, I, D}), du({E, I, D}), dd({E, D, I});
  seqmix::moe_grads g;
  g.dx = dx;
  g.drouter = dr;
  g.experts = seqmix::moe_expert_grads::stacked(dg, du, dd);
  const seqmix::moe_loss_weights losses{0.01, 0.001};
  seqmix::moe_backward<float>(opt, b.w, b.x, b.dy, g, losses);  // warm the scratch
  seqmix::moe_backward_times t, sum;
  const double cpu0 = process_cpu_seconds();
  for (auto _ : state) {
    seqmix::moe_backward<float>(opt, b.w, b.x, b.dy, g, losses, &t);
    benchmark::ClobberMemory();
    sum.route += t.route;
    sum.rows += t.rows;
    sum.weights += t.weights;
    sum.tokens += t.tokens;
    sum.router += t.router;
  }
  const double it = double(state.iterations()) * 1e-3;  // -> ms per call
  state.counters["ms_route"] = sum.route / it;
  state.counters["ms_rows"] = sum.rows / it;
  state.counters["ms_weights"] = sum.weights / it;
  state.counters["ms_tokens"] = sum.tokens / it;
  state.counters["ms_router"] = sum.router / it;
  const double flops = 6.0 * double(T) * double(D) * double(E) +
                       16.0 * double(T) * double(k) * double(D) * double(I);
  seqmix_bench::report_rates(state, double(T), flops);
  counters(state, flops, process_cpu_seconds() - cpu0, threads);
}

void shapes(benchmark::internal::Benchmark* b) {
  for (int threads : {1, 2, 4, 8, 16}) b->Args({8, 2, 1024, 512, 1024, threads});
}

}  // namespace

BENCHMARK(BM_moe_bw_forward)
    ->ArgNames({"E", "k", "D", "I", "T", "threads"})
    ->Apply(shapes)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_moe_bw_backward)
    ->ArgNames({"E", "k", "D", "I", "T", "threads"})
    ->Apply(shapes)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK_MAIN();
