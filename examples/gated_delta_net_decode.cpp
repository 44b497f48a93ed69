// SPDX-License-Identifier: MIT
// Gated DeltaNet as a Qwen3-Next-style layer uses it: gates from the gate helper, q/k
// l2-normalised inside the kernel, grouped value heads (GVA: 2 q/k heads shared by 4 value
// heads). A prompt is prefilled with the chunked form, then tokens are decoded one by one with
// step(); the decoded outputs are checked against one call over the whole sequence.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>

#include <seqmix/mixers/gated_delta_net.hpp>

int main() {
  using namespace seqmix;
  const index_t B = 1, H = 2, HV = 4, K = 32, V = 16;            // HV % H == 0: value head hv reads
  const index_t prompt = 100, decode = 20, T = prompt + decode;  // q/k head hv / (HV / H)

  // Inputs a model's projections would produce: q, k [B,T,H,K], v [B,T,HV,V], and per value
  // head the raw gate inputs a, b [B,T,HV] with the layer parameters A_log, dt_bias [HV].
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.f, 1.f);
  tensor<float, 4> q({B, T, H, K}), k({B, T, H, K}), v({B, T, HV, V});
  tensor<float, 3> a({B, T, HV}), b({B, T, HV});
  tensor<float, 1> A_log({HV}), dt_bias({HV});
  for (auto* t : {&q, &k, &v})
    for (index_t i = 0; i < t->size(); ++i) (*t)[i] = normal(rng);
  for (auto* t : {&a, &b})
    for (index_t i = 0; i < t->size(); ++i) (*t)[i] = normal(rng);
  for (index_t h = 0; h < HV; ++h) {
    A_log[h] = std::log(1.f + float(h));  // decay rates 1..4
    dt_bias[h] = -1.f;
  }

  // Gate helper: g = -exp(A_log) softplus(a + dt_bias) (log decay), beta = sigmoid(b).
  tensor<float, 3> g({B, T, HV}), beta({B, T, HV});
  gated_delta_gates<float>(a, b, A_log, dt_bias, g, beta);

  gated_delta_net<float> mixer({.use_qk_l2norm = true, .chunk_size = 64});

  // Reference for this demo: the whole sequence in one chunked call.
  tensor<float, 4> o_full({B, T, HV, V});
  auto state_full = mixer.make_state(B, HV, K, V);
  mixer.forward_chunked(q, k, v, g, beta, o_full, state_full);

  // 1. Prefill the prompt (tokens [0, prompt)) with the chunked form: state holds S_prompt.
  auto prefix4 = [&](const tensor<float, 4>& x) {
    return tensor_view<const float, 4>(x).slice<1>(0, prompt);
  };
  auto prefix3 = [&](const tensor<float, 3>& x) {
    return tensor_view<const float, 3>(x).slice<1>(0, prompt);
  };
  tensor<float, 4> o_prompt({B, prompt, HV, V});
  auto state = mixer.make_state(B, HV, K, V);
  mixer.forward_chunked(prefix4(q), prefix4(k), prefix4(v), prefix3(g), prefix3(beta), o_prompt,
                        state);

  // 2. Decode: one token per step, state updated in place, nothing allocated.
  float max_diff = 0.f;
  tensor<float, 3> o_t({B, HV, V});
  for (index_t t = prompt; t < T; ++t) {
    tensor_view<const float, 4> qv = q, kv = k, vv = v;
    tensor_view<const float, 3> gv = g, bv = beta;
    mixer.step(qv.select<1>(t), kv.select<1>(t), vv.select<1>(t), gv.select<1>(t), bv.select<1>(t),
               o_t, state);
    for (index_t h = 0; h < HV; ++h)
      for (index_t j = 0; j < V; ++j)
        max_diff = std::max(max_diff, std::abs(o_t(0, h, j) - o_full(0, t, h, j)));
  }
  float state_diff = 0.f;
  for (index_t i = 0; i < state.size(); ++i)
    state_diff = std::max(state_diff, std::abs(state[i] - state_full[i]));

  std::printf("gated_delta_net: prefill %td tokens (chunked), decode %td tokens (step)\n", prompt,
              decode);
  std::printf("  H = %td q/k heads, HV = %td value heads, K = %td, V = %td, l2norm on\n", H, HV, K,
              V);
  std::printf("  gates: g[0,0,:] = %.4f %.4f %.4f %.4f\n", double(g(0, 0, 0)), double(g(0, 0, 1)),
              double(g(0, 0, 2)), double(g(0, 0, 3)));
  std::printf("  max |decoded - one call| = %.3g (outputs), %.3g (final state)\n", double(max_diff),
              double(state_diff));
  return max_diff < 1e-4f && state_diff < 1e-4f ? 0 : 1;
}
