// SPDX-License-Identifier: MIT
// The O(N) vs O(N²) suite: every mixer in both forms, and causal softmax attention, over one T
// sweep in one run, so every ratio comes from the same machine state. Driven by bench/suite.py
// (scripts/bench.sh), which turns the JSON into the report table, crossovers and plots.
//
//   bench_suite --sweep=quick|full|scaling --threads=1,2 [Google Benchmark flags]
//     quick:   T = 256, 1024, 4096, 16384
//     full:    T = 256, 512, …, 65536 (softmax prefill stops at 32768: one T=65536 causal
//              prefill is ~2.2e12 FLOP, over 10 s per iteration on 2 cores)
//     scaling: chunked and recurrent forms, B = 4, H = 8, T = 8192 (B·H = 32 work items), for
//     thread
//              scaling on a many-core machine
//
// Shapes: B = 1, H = 8, K = V = 64 (softmax D = 64, sliding window W = 512), fp32.
// Names: <mixer>/<form>/T:<T>/threads:<n>. Forms: chunked (whole sequence, chunked-parallel),
// recurrent (token loop over the sequence), step (one decode token; cost independent of T, so
// measured once), decode (softmax: one token against a KV cache holding T tokens).
//
// FLOP per head and token (multiply-add = 2), the counts every "GFLOP/s" below uses:
//   gated accumulation, recurrent/step: 4·K·V (update + readout; decay multiplies not counted)
//   gated accumulation, chunked (C = 64): 2·C·(K + V) + 4·K·V (dense C×C blocks, docs/math.md §1)
//   delta rule, recurrent/step: 6·K·V (Sᵀk, update, readout)
//   delta rule, chunked: 2·C·(3K + 2V) + C²/3 + 6·K·V (WY/UT: A, T solve, W, U, QKᵀ, PV', QS, KᵀV')
//   kda: as the delta rule (chunked without C²/3); rwkv7: 8·K·V recurrent/step,
//   2·C·(4K + 4V) + 8·K·V chunked (docs/math.md §2.3)
//   softmax causal prefill: 2·T·D per token on average (QKᵀ and PV, each 2·T²·D/2 per head)
//   softmax decode at cache length L: 4·L·D per head; bytes = L·(K + V)·4 per kv head
//   sliding window W: 4·D·(mean keys per token), mean = (T+1)/2 for T <= W, else
//   (W(W+1)/2 + (T-W)·W)/T: exactly the keys the window visits
//   nsa (bs 64, S 16, the H query heads over one key/value head): 4·D·(complete blocks)
//   + 4·D·min(t + 1, S·bs) per token and query head (no window branch)
//   moba (chunk 64, top-k 8): 4·D·(mean selected keys per token) + 2·D·(mean earlier chunks
//   gated per token); decode at L: the same for the token at position L
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <seqmix/seqmix.hpp>

#include "bench_common.hpp"

namespace {

using seqmix::index_t;
using seqmix::tensor;

constexpr index_t H = 8, K = 64, V = 64, C = 64, W = 512;

struct sweep {
  std::vector<index_t> T;
  std::vector<int> threads{2};
  index_t B = 1;
  index_t softmax_max_T = 16384;
  index_t recurrent_softmax_max_T = 4096;
  bool whole_sequence_only = false;  // chunked and recurrent forms, no steps or decode
};

template <std::size_t R>
tensor<float, R> randn(const seqmix::shape_t<R>& shape, unsigned seed, float stddev = 1.0f,
                       float mean = 0.0f) {
  tensor<float, R> t(shape);
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(mean, stddev);
  for (index_t i = 0; i < t.size(); ++i) t[i] = dist(rng);
  return t;
}

template <std::size_t R>
tensor<float, R> logsigmoid_gate(const seqmix::shape_t<R>& shape, unsigned seed) {
  // logsigmoid(randn) / 16 as GLA layers do: weak-to-moderate decays, always < 0.
  tensor<float, R> t = randn<R>(shape, seed);
  for (index_t i = 0; i < t.size(); ++i) t[i] = seqmix::math::logsigmoid(t[i]) / 16.0f;
  return t;
}

// Activations of one benchmark: [B, T, H, D] tensors plus gates.
struct inputs {
  inputs(index_t B, index_t T)
      : q(randn<4>({B, T, H, K}, 1, 0.125f)),
        k(randn<4>({B, T, H, K}, 2, 0.125f)),
        v(randn<4>({B, T, H, V}, 3)),
        o({B, T, H, V}),
        g(logsigmoid_gate<3>({B, T, H}, 4)),
        gk(logsigmoid_gate<4>({B, T, H, K}, 5)),
        beta(randn<3>({B, T, H}, 6)),
        state({B, H, K, V}) {
    for (index_t i = 0; i < beta.size(); ++i) beta[i] = seqmix::math::sigmoid(beta[i]);
    // unit-norm keys keep the delta rule in its stable regime, as l2norm layers do
    for (index_t i = 0; i < B * T * H; ++i) {
      float* row = k.data() + i * K;
      const float n = std::sqrt(seqmix::simd::dot(row, row, K)) + 1e-6f;
      for (index_t j = 0; j < K; ++j) row[j] /= n;
    }
  }
  tensor<float, 4> q, k, v, o;
  tensor<float, 3> g;
  tensor<float, 4> gk;
  tensor<float, 3> beta;
  tensor<float, 4> state;
};

// One token per sequence: [B, H, D] slices.
struct token {
  explicit token(index_t B)
      : q(randn<3>({B, H, K}, 11, 0.125f)),
        k(randn<3>({B, H, K}, 12, 0.125f)),
        v(randn<3>({B, H, V}, 13)),
        o({B, H, V}),
        g(logsigmoid_gate<2>({B, H}, 14)),
        gk(logsigmoid_gate<3>({B, H, K}, 15)),
        beta({B, H}, 0.5f) {}
  tensor<float, 3> q, k, v, o;
  tensor<float, 2> g;
  tensor<float, 3> gk;
  tensor<float, 2> beta;
};

using runner = std::function<void(benchmark::State&, index_t B, index_t T)>;

struct entry {
  std::string mixer, form;
  double flops_per_head_token;  // at the given T (see header)
  runner run;
  bool quadratic = false;  // softmax: limited by sweep::softmax_max_T
};

double flops_gated_chunked() {
  return 2.0 * C * (K + V) + 4.0 * K * V;
}
double flops_gated_recurrent() {
  return 4.0 * K * V;
}
double flops_delta_chunked() {
  return 2.0 * C * (3 * K + 2 * V) + C * C / 3.0 + 6.0 * K * V;
}
double flops_delta_recurrent() {
  return 6.0 * K * V;
}
// MoBA (chunk 64, top-k 8) FLOP of the token at position t, per head: attention over the
// selected keys, plus the gates of the earlier chunks.
double moba_flops(index_t t) {
  const index_t own = t / 64;
  return 4.0 * K * double(std::min<index_t>(own, 7) * 64 + t % 64 + 1) + 2.0 * K * double(own);
}
// NSA (bs 64, S = min(16, blocks of T)) FLOP of the token at position t, per head: the
// compressed branch over its complete blocks (scores and P·V), plus the selected tokens (at
// most S·bs, all of them before S blocks exist).
seqmix::native_sparse_attention<float>::options nsa_options(index_t T) {
  return {.block_size = 64, .block_count = std::min<index_t>(16, (T + 63) / 64)};
}
double nsa_flops(index_t t, index_t T) {
  const index_t S = std::min<index_t>(16, (T + 63) / 64);
  return 4.0 * K * double((t + 1) / 64) + 4.0 * K * double(std::min<index_t>(t + 1, S * 64));
}
// Mean number of keys a token attends to under a causal window W over T tokens.
double window_keys(index_t T) {
  if (T <= W) return (double(T) + 1) / 2;
  return (double(W) * (W + 1) / 2 + double(T - W) * double(W)) / double(T);
}

// Runs `body` per iteration; the state is zeroed inside the timed loop (B·H·K·V floats, noise).
template <class Body>
void timed(benchmark::State& state, inputs& in, Body&& body) {
  for (auto _ : state) {
    in.state.fill(0.0f);
    body();
    benchmark::DoNotOptimize(in.o.data());
    benchmark::ClobberMemory();
  }
}

void report(benchmark::State& state, index_t B, index_t T, double flops_per_head_token,
            double tokens_per_iter = -1, double bytes = 0) {
  const double tokens = tokens_per_iter >= 0 ? tokens_per_iter : double(B) * double(T);
  seqmix_bench::report_rates(state, tokens, tokens * H * flops_per_head_token, bytes);
}

}  // namespace

namespace {

// Every mixer and form of the suite. Each runner builds its inputs outside the timed loop.
std::vector<entry> registry() {
  using seqmix::kv_cache;
  std::vector<entry> r;

  // ---- gated accumulation ----------------------------------------------------------------------
  // One helper registers the three forms of a mixer from three call shapes.
  auto add_gated = [&r](const std::string& name, auto chunked, auto recurrent, auto step) {
    r.push_back({name, "chunked", flops_gated_chunked(), [chunked](auto& st, index_t B, index_t T) {
                   inputs in(B, T);
                   timed(st, in, [&] { chunked(in); });
                   report(st, B, T, flops_gated_chunked());
                 }});
    r.push_back(
        {name, "recurrent", flops_gated_recurrent(), [recurrent](auto& st, index_t B, index_t T) {
           inputs in(B, T);
           timed(st, in, [&] { recurrent(in); });
           report(st, B, T, flops_gated_recurrent());
         }});
    r.push_back({name, "step", flops_gated_recurrent(), [step](auto& st, index_t B, index_t) {
                   token tk(B);
                   tensor<float, 4> S({B, H, K, V});
                   for ([[maybe_unused]] auto _ : st) {
                     step(tk, S);
                     benchmark::DoNotOptimize(tk.o.data());
                   }
                   report(st, B, 1, flops_gated_recurrent(), double(B));
                 }});
  };
  const seqmix::linear_attention<float> la;
  add_gated(
      "linear_attention",
      [la](inputs& in) { la.forward_chunked(in.q, in.k, in.v, in.o, in.state); },
      [la](inputs& in) { la.forward_recurrent(in.q, in.k, in.v, in.o, in.state); },
      [la](token& t, tensor<float, 4>& S) { la.step(t.q, t.k, t.v, t.o, S); });
  const seqmix::simple_gla<float> sg;
  add_gated(
      "simple_gla",
      [sg](inputs& in) { sg.forward_chunked(in.q, in.k, in.v, in.g, in.o, in.state); },
      [sg](inputs& in) { sg.forward_recurrent(in.q, in.k, in.v, in.g, in.o, in.state); },
      [sg](token& t, tensor<float, 4>& S) { sg.step(t.q, t.k, t.v, t.g, t.o, S); });
  const seqmix::gla<float> gl;
  add_gated(
      "gla", [gl](inputs& in) { gl.forward_chunked(in.q, in.k, in.v, in.gk, in.o, in.state); },
      [gl](inputs& in) { gl.forward_recurrent(in.q, in.k, in.v, in.gk, in.o, in.state); },
      [gl](token& t, tensor<float, 4>& S) { gl.step(t.q, t.k, t.v, t.gk, t.o, S); });
  // RWKV-6: r = q, w = gk, bonus u [H, K] = 0.5 (its value does not change the cost)
  const seqmix::rwkv6<float> rw;
  static const tensor<float, 2> rwkv6_u = [] {
    tensor<float, 2> u({H, K});
    u.fill(0.5f);
    return u;
  }();
  add_gated(
      "rwkv6",
      [rw](inputs& in) { rw.forward_chunked(in.q, in.k, in.v, in.gk, rwkv6_u, in.o, in.state); },
      [rw](inputs& in) { rw.forward_recurrent(in.q, in.k, in.v, in.gk, rwkv6_u, in.o, in.state); },
      [rw](token& t, tensor<float, 4>& S) { rw.step(t.q, t.k, t.v, t.gk, rwkv6_u, t.o, S); });
  // Mamba2: x = v [B,T,H,P], B = k and C = q with G = H groups, N = K, P = V, dt raw = g·(-16)
  // through softplus (dt ≈ 0.7 ± noise), A_log = 0 (A = -1), no D, no dt_bias.
  const seqmix::mamba2_ssd<float> ssd;
  static const tensor<float, 1> A_log({H});
  add_gated(
      "mamba2_ssd",
      [ssd](inputs& in) {
        ssd.forward_chunked(in.v, in.g, A_log, in.k, in.q, {}, {}, in.o, in.state);
      },
      [ssd](inputs& in) {
        ssd.forward_recurrent(in.v, in.g, A_log, in.k, in.q, {}, {}, in.o, in.state);
      },
      [ssd](token& t, tensor<float, 4>& S) {
        ssd.step(t.v, t.g, A_log, t.k, t.q, {}, {}, t.o, S);
      });

  // ---- delta rule ----------------------------------------------------------------------------
  r.push_back({"delta_net", "chunked", flops_delta_chunked(), [](auto& st, index_t B, index_t T) {
                 inputs in(B, T);
                 seqmix::delta_net<float> m;
                 timed(st, in,
                       [&] { m.forward_chunked(in.q, in.k, in.v, in.beta, in.o, in.state); });
                 report(st, B, T, flops_delta_chunked());
               }});
  r.push_back(
      {"delta_net", "recurrent", flops_delta_recurrent(), [](auto& st, index_t B, index_t T) {
         inputs in(B, T);
         seqmix::delta_net<float> m;
         timed(st, in, [&] { m.forward_recurrent(in.q, in.k, in.v, in.beta, in.o, in.state); });
         report(st, B, T, flops_delta_recurrent());
       }});
  r.push_back({"delta_net", "step", flops_delta_recurrent(), [](auto& st, index_t B, index_t) {
                 token tk(B);
                 tensor<float, 4> S({B, H, K, V});
                 seqmix::delta_net<float> m;
                 for ([[maybe_unused]] auto _ : st) {
                   m.step(tk.q, tk.k, tk.v, tk.beta, tk.o, S);
                   benchmark::DoNotOptimize(tk.o.data());
                 }
                 report(st, B, 1, flops_delta_recurrent(), double(B));
               }});
  r.push_back(
      {"gated_delta_net", "chunked", flops_delta_chunked(), [](auto& st, index_t B, index_t T) {
         inputs in(B, T);
         seqmix::gated_delta_net<float> m;
         timed(st, in, [&] { m.forward_chunked(in.q, in.k, in.v, in.g, in.beta, in.o, in.state); });
         report(st, B, T, flops_delta_chunked());
       }});
  r.push_back(
      {"gated_delta_net", "recurrent", flops_delta_recurrent(), [](auto& st, index_t B, index_t T) {
         inputs in(B, T);
         seqmix::gated_delta_net<float> m;
         timed(st, in,
               [&] { m.forward_recurrent(in.q, in.k, in.v, in.g, in.beta, in.o, in.state); });
         report(st, B, T, flops_delta_recurrent());
       }});
  r.push_back(
      {"gated_delta_net", "step", flops_delta_recurrent(), [](auto& st, index_t B, index_t) {
         token tk(B);
         tensor<float, 4> S({B, H, K, V});
         seqmix::gated_delta_net<float> m;
         for ([[maybe_unused]] auto _ : st) {
           m.step(tk.q, tk.k, tk.v, tk.g, tk.beta, tk.o, S);
           benchmark::DoNotOptimize(tk.o.data());
         }
         report(st, B, 1, flops_delta_recurrent(), double(B));
       }});

  // ---- KDA and RWKV-7 (kernels/delta/dplr.hpp; per-key gates gk) ------------------------------
  // kda: 6·K·V recurrent, 2·C·(3K + 2V) + 6·K·V chunked (as the delta rule; decays not counted);
  // rwkv7: 8·K·V recurrent (Sᵀa, two rank-one updates, readout), 2·C·(4K + 4V) + 8·K·V chunked;
  // rwkv7's a = -k (unit rows), b = k / 2.
  const double kda_c = flops_delta_chunked() - C * C / 3.0, kda_r = flops_delta_recurrent();
  const double r7_c = 2.0 * C * (4 * K + 4 * V) + 8.0 * K * V, r7_r = 8.0 * K * V;
  auto ab = [](const auto& k, float f) {
    auto x = k;
    for (index_t i = 0; i < x.size(); ++i) x[i] *= f;
    return x;
  };
  r.push_back({"kda", "chunked", kda_c, [kda_c](auto& st, index_t B, index_t T) {
                 inputs in(B, T);
                 const seqmix::kda<float> m;
                 timed(st, in, [&] {
                   m.forward_chunked(in.q, in.k, in.v, in.gk, in.beta, in.o, in.state);
                 });
                 report(st, B, T, kda_c);
               }});
  r.push_back({"kda", "recurrent", kda_r, [kda_r](auto& st, index_t B, index_t T) {
                 inputs in(B, T);
                 const seqmix::kda<float> m;
                 timed(st, in, [&] {
                   m.forward_recurrent(in.q, in.k, in.v, in.gk, in.beta, in.o, in.state);
                 });
                 report(st, B, T, kda_r);
               }});
  r.push_back({"kda", "step", kda_r, [kda_r](auto& st, index_t B, index_t) {
                 token tk(B);
                 tensor<float, 4> S({B, H, K, V});
                 const seqmix::kda<float> m;
                 for ([[maybe_unused]] auto _ : st) {
                   m.step(tk.q, tk.k, tk.v, tk.gk, tk.beta, tk.o, S);
                   benchmark::DoNotOptimize(tk.o.data());
                 }
                 report(st, B, 1, kda_r, double(B));
               }});
  r.push_back({"rwkv7", "chunked", r7_c, [r7_c, ab](auto& st, index_t B, index_t T) {
                 inputs in(B, T);
                 const auto a = ab(in.k, -1.f), b = ab(in.k, 0.5f);
                 const seqmix::rwkv7<float> m;
                 timed(st, in,
                       [&] { m.forward_chunked(in.q, in.k, in.v, in.gk, a, b, in.o, in.state); });
                 report(st, B, T, r7_c);
               }});
  r.push_back({"rwkv7", "recurrent", r7_r, [r7_r, ab](auto& st, index_t B, index_t T) {
                 inputs in(B, T);
                 const auto a = ab(in.k, -1.f), b = ab(in.k, 0.5f);
                 const seqmix::rwkv7<float> m;
                 timed(st, in,
                       [&] { m.forward_recurrent(in.q, in.k, in.v, in.gk, a, b, in.o, in.state); });
                 report(st, B, T, r7_r);
               }});
  r.push_back({"rwkv7", "step", r7_r, [r7_r, ab](auto& st, index_t B, index_t) {
                 token tk(B);
                 const auto a = ab(tk.k, -1.f), b = ab(tk.k, 0.5f);
                 tensor<float, 4> S({B, H, K, V});
                 const seqmix::rwkv7<float> m;
                 for ([[maybe_unused]] auto _ : st) {
                   m.step(tk.q, tk.k, tk.v, tk.gk, a, b, tk.o, S);
                   benchmark::DoNotOptimize(tk.o.data());
                 }
                 report(st, B, 1, r7_r, double(B));
               }});

  // ---- softmax attention (the O(N²) baseline) and sliding window -----------------------------
  r.push_back({"softmax", "chunked", 0,
               [](auto& st, index_t B, index_t T) {
                 inputs in(B, T);
                 seqmix::softmax_attention<float> m;
                 timed(st, in, [&] { m.forward_chunked(in.q, in.k, in.v, in.o); });
                 report(st, B, T, 2.0 * double(T) * K);  // causal: 2·T·D per token on average
               },
               true});
  r.push_back({"softmax", "recurrent", 0,
               [](auto& st, index_t B, index_t T) {
                 inputs in(B, T);
                 seqmix::softmax_attention<float> m;
                 auto cache = m.make_cache(B, H, K, V, T);
                 timed(st, in, [&] {
                   cache.reset();
                   m.forward_recurrent(in.q, in.k, in.v, in.o, cache);
                 });
                 report(st, B, T, 2.0 * double(T) * K);
               },
               true});
  r.push_back({"softmax", "decode", 0,
               [](auto& st, index_t B, index_t L) {
                 // one token against a cache holding L tokens (prefilled outside the timing)
                 inputs in(B, L);
                 token tk(B);
                 seqmix::softmax_attention<float> m;
                 auto cache = m.make_cache(B, H, K, V, L + 1);
                 m.forward_chunked(in.q, in.k, in.v, in.o, cache);
                 for ([[maybe_unused]] auto _ : st) {
                   m.step(tk.q, tk.k, tk.v, tk.o, cache);
                   for (index_t b = 0; b < B; ++b) cache.truncate(b, L);
                   benchmark::DoNotOptimize(tk.o.data());
                 }
                 const double bytes = double(B) * H * double(L + 1) * (K + V) * sizeof(float);
                 report(st, B, 1, 4.0 * double(L + 1) * K, double(B), bytes);
               },
               true});
  r.push_back({"sliding_window", "chunked", 0, [](auto& st, index_t B, index_t T) {
                 inputs in(B, T);
                 seqmix::sliding_window_attention<float> m({.window = W});
                 timed(st, in, [&] { m.forward_chunked(in.q, in.k, in.v, in.o); });
                 report(st, B, T, 4.0 * window_keys(T) * K);
               }});
  r.push_back({"sliding_window", "recurrent", 0, [](auto& st, index_t B, index_t T) {
                 inputs in(B, T);
                 seqmix::sliding_window_attention<float> m({.window = W});
                 auto cache = m.make_cache(B, H, K, V);
                 timed(st, in, [&] {
                   cache.reset();
                   m.forward_recurrent(in.q, in.k, in.v, in.o, cache);
                 });
                 report(st, B, T, 4.0 * window_keys(T) * K);
               }});
  r.push_back({"sliding_window", "step", 0, [](auto& st, index_t B, index_t) {
                 // steady state: the ring already holds W tokens
                 inputs in(B, W);
                 token tk(B);
                 seqmix::sliding_window_attention<float> m({.window = W});
                 auto cache = m.make_cache(B, H, K, V);
                 m.forward_chunked(in.q, in.k, in.v, in.o, cache);
                 for ([[maybe_unused]] auto _ : st) {
                   m.step(tk.q, tk.k, tk.v, tk.o, cache);
                   benchmark::DoNotOptimize(tk.o.data());
                 }
                 report(st, B, 1, 4.0 * double(W) * K, double(B));
               }});
  // ---- NSA: compressed + selected branches (bs 64, S 16), the other middle ground ------------
  r.push_back({"nsa", "chunked", 0, [](auto& st, index_t B, index_t T) {
                 // NSA's own layout: the H query heads share one key/value head (GQA)
                 inputs in(B, T);
                 const tensor<float, 4> k1 = randn<4>({B, T, 1, K}, 2, 0.125f);
                 const tensor<float, 4> v1 = randn<4>({B, T, 1, V}, 3);
                 const seqmix::native_sparse_attention<float> m(nsa_options(T));
                 const seqmix::native_sparse_attention<float>::gates g{in.beta, in.beta, {}};
                 timed(st, in, [&] { m.forward(in.q, k1, v1, g, in.o); });
                 double f = 0;
                 for (index_t t = 0; t < T; ++t) f += nsa_flops(t, T);
                 report(st, B, T, f / double(T));
               }});
  r.push_back({"nsa", "decode", 0, [](auto& st, index_t B, index_t L) {
                 inputs in(B, L);
                 token tk(B);
                 const tensor<float, 4> k1 = randn<4>({B, L, 1, K}, 2, 0.125f);
                 const tensor<float, 4> v1 = randn<4>({B, L, 1, V}, 3);
                 const tensor<float, 3> kt = randn<3>({B, 1, K}, 12, 0.125f);
                 const tensor<float, 3> vt = randn<3>({B, 1, V}, 13);
                 const seqmix::native_sparse_attention<float> m(nsa_options(L + 1));
                 const seqmix::native_sparse_attention<float>::gates g{in.beta, in.beta, {}};
                 const seqmix::native_sparse_attention<float>::step_gates g1{tk.beta, tk.beta, {}};
                 auto cache = m.make_cache(B, 1, K, V, L + 1);
                 m.forward(in.q, k1, v1, g, in.o, cache);
                 for ([[maybe_unused]] auto _ : st) {
                   m.step(tk.q, kt, vt, g1, tk.o, cache);
                   for (index_t b = 0; b < B; ++b) cache.truncate(b, L);
                   benchmark::DoNotOptimize(tk.o.data());
                 }
                 report(st, B, 1, nsa_flops(L, L + 1), double(B));
               }});
  // ---- MoBA: block-sparse attention, the middle ground O(T·k·c) (+ its O(T²/c) gate) --------
  r.push_back({"moba", "chunked", 0, [](auto& st, index_t B, index_t T) {
                 inputs in(B, T);
                 const seqmix::moba_attention<float> m({.chunk_size = 64, .top_k = 8});
                 timed(st, in, [&] { m.forward(in.q, in.k, in.v, in.o); });
                 double f = 0;
                 for (index_t t = 0; t < T; ++t) f += moba_flops(t);
                 report(st, B, T, f / double(T));
               }});
  r.push_back({"moba", "decode", 0, [](auto& st, index_t B, index_t L) {
                 inputs in(B, L);
                 token tk(B);
                 const seqmix::moba_attention<float> m({.chunk_size = 64, .top_k = 8});
                 auto cache = m.make_cache(B, H, K, V, L + 1);
                 m.forward(in.q, in.k, in.v, in.o, cache);
                 for ([[maybe_unused]] auto _ : st) {
                   m.step(tk.q, tk.k, tk.v, tk.o, cache);
                   for (index_t b = 0; b < B; ++b) cache.truncate(b, L);
                   benchmark::DoNotOptimize(tk.o.data());
                 }
                 report(st, B, 1, moba_flops(L), double(B));
               }});
  return r;
}

}  // namespace

namespace {

sweep parse_sweep(int& argc, char** argv) {
  sweep s;
  std::string name = "quick";
  std::vector<char*> rest;
  for (int i = 0; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--sweep=", 0) == 0) {
      name = a.substr(8);
    } else if (a.rfind("--threads=", 0) == 0) {
      s.threads.clear();
      std::string list = a.substr(10);
      for (std::size_t p = 0; p < list.size();) {
        std::size_t q = list.find(',', p);
        if (q == std::string::npos) q = list.size();
        s.threads.push_back(std::atoi(list.substr(p, q - p).c_str()));
        p = q + 1;
      }
    } else {
      rest.push_back(argv[i]);
    }
  }
  for (std::size_t i = 0; i < rest.size(); ++i) argv[i] = rest[i];
  argc = static_cast<int>(rest.size());
  if (name == "full") {
    for (index_t t = 256; t <= 65536; t *= 2) s.T.push_back(t);
    s.softmax_max_T = 32768;
    s.recurrent_softmax_max_T = 8192;
  } else if (name == "scaling") {
    s.T = {8192};
    s.B = 4;
    s.whole_sequence_only = true;
  } else if (name == "quick") {
    s.T = {256, 1024, 4096, 16384};
  } else {
    std::fprintf(stderr, "bench_suite: unknown --sweep=%s (quick|full|scaling)\n", name.c_str());
    std::exit(2);
  }
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  const sweep s = parse_sweep(argc, argv);
  for (const entry& e : registry()) {
    const bool per_token = e.form == "step";
    if (s.whole_sequence_only && e.form != "chunked" && e.form != "recurrent") continue;
    for (int threads : s.threads) {
      for (index_t T : s.T) {
        if (e.quadratic &&
            T > (e.form == "chunked" || e.form == "decode" ? s.softmax_max_T
                                                           : s.recurrent_softmax_max_T)) {
          continue;
        }
        const std::string name = e.mixer + "/" + e.form + "/T:" + std::to_string(T) +
                                 "/threads:" + std::to_string(threads);
        const index_t B = s.B;
        benchmark::RegisterBenchmark(name.c_str(),
                                     [e, B, T, threads](benchmark::State& st) {
                                       seqmix_bench::use_threads(threads);
                                       e.run(st, B, T);
                                     })
            ->UseRealTime()
            ->Unit(per_token ? benchmark::kMicrosecond : benchmark::kMillisecond);
        if (per_token) break;  // a decode step costs the same for every T
      }
    }
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
