// SPDX-License-Identifier: MIT
// GLA, prefill then decode: the reference a newcomer reads first.
//
// A GLA mixer keeps one [K, V] state per (sequence, head). We
//   1. prefill a prompt of 200 tokens with forward_chunked (chunk-parallel, fast for long T),
//   2. decode 20 more tokens one at a time with step (O(K·V) per token, allocates nothing),
// and check that the outputs and the final state equal one forward_chunked call over all
// 220 tokens: the state carries everything the mixer needs to continue a sequence.
#include <cmath>
#include <cstdio>
#include <random>

#include <seqmix/mixers/gla.hpp>

int main() {
  using namespace seqmix;
  const index_t B = 2, H = 4, K = 32, V = 48, prompt = 200, decode = 20, T = prompt + decode;

  // Random activations [B, T, H, D]; the GLA layer's gate is logsigmoid(x) / 16 (log space, < 0).
  std::mt19937 rng(42);
  std::normal_distribution<float> normal(0.f, 1.f);
  tensor<float, 4> q({B, T, H, K}), k({B, T, H, K}), v({B, T, H, V}), gk({B, T, H, K});
  for (index_t i = 0; i < q.size(); ++i) {
    q[i] = normal(rng);
    k[i] = normal(rng);
    gk[i] = math::logsigmoid(normal(rng)) / 16.f;
  }
  for (index_t i = 0; i < v.size(); ++i) v[i] = normal(rng);

  gla<float> mixer({.scale = {}, .chunk_size = 64});  // scale defaults to K^-1/2

  // One long call: the answer to reproduce.
  tensor<float, 4> o_full({B, T, H, V});
  auto state_full = mixer.make_state(B, H, K, V);  // zeros [B, H, K, V]
  mixer.forward_chunked(q, k, v, gk, o_full, state_full);

  // 1. Prefill: tokens [0, prompt) in one chunked call; `state` now holds S_prompt.
  tensor<float, 4> o({B, T, H, V});
  auto state = mixer.make_state(B, H, K, V);
  auto first = [](const auto& x, index_t t0, index_t t1) {
    return tensor_view<const float, 4>(x.view().template slice<1>(t0, t1));
  };
  mixer.forward_chunked(first(q, 0, prompt), first(k, 0, prompt), first(v, 0, prompt),
                        first(gk, 0, prompt), o.view().slice<1>(0, prompt), state);

  // 2. Decode: one token per sequence at a time; inputs are [B, H, D] views of token t.
  for (index_t t = prompt; t < T; ++t) {
    mixer.step(q.select<1>(t), k.select<1>(t), v.select<1>(t), gk.select<1>(t), o.select<1>(t),
               state);
  }

  // Both paths agree (float rounding differs between the chunked and the token-by-token form).
  double max_o = 0, max_s = 0;
  for (index_t i = 0; i < o.size(); ++i) max_o = std::fmax(max_o, std::fabs(o[i] - o_full[i]));
  for (index_t i = 0; i < state.size(); ++i) {
    max_s = std::fmax(max_s, std::fabs(state[i] - state_full[i]));
  }
  std::printf("GLA B=%td H=%td K=%td V=%td: prefill %td tokens (chunked) + decode %td (step)\n", B,
              H, K, V, prompt, decode);
  std::printf("max |o - o_one_call| = %.3g, max |S - S_one_call| = %.3g\n", max_o, max_s);
  const bool ok = max_o < 1e-4 && max_s < 1e-4;
  std::printf("%s\n", ok ? "agree" : "DISAGREE");
  return ok ? 0 : 1;
}
