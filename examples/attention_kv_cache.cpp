// SPDX-License-Identifier: MIT
// Softmax attention with a user-owned KV cache: prefill a prompt with forward_chunked, decode
// token by token with step, roll back to the prompt with a snapshot, and run sliding-window
// attention whose ring-buffer cache stays the same size however long the sequence gets.
// Exits non-zero if decoding after the prefill disagrees with one chunked call.
#include <cmath>
#include <cstdio>
#include <random>

#include <seqmix/mixers/kv_cache.hpp>
#include <seqmix/mixers/sliding_window_attention.hpp>
#include <seqmix/mixers/softmax_attention.hpp>

int main() {
  using namespace seqmix;
  const index_t B = 1, T = 96, prompt = 64, H = 4, Hkv = 2,
                D = 32;  // GQA: 2 query heads per kv head
  tensor<float, 4> q({B, T, H, D}), k({B, T, Hkv, D}), v({B, T, Hkv, D});
  std::mt19937 rng(7);
  std::normal_distribution<float> nd;
  for (auto* t : {&q, &k, &v})
    for (index_t i = 0; i < t->size(); ++i) (*t)[i] = nd(rng);

  softmax_attention<float> attn;  // causal, scale D^-1/2
  tensor<float, 4> whole({B, T, H, D}), o({B, T, H, D});
  attn.forward_chunked(q, k, v, whole);  // the reference: one call over all T tokens

  // prefill the prompt: outputs for tokens 0..63, and the cache now holds their keys/values
  auto cache = kv_cache<float>::full(B, Hkv, D, D, /*capacity=*/T);
  auto first = [](auto& x, index_t n) { return x.view().template slice<1>(0, n); };
  attn.forward_chunked(first(q, prompt), first(k, prompt), first(v, prompt), first(o, prompt),
                       cache);
  const auto after_prompt = cache.snapshot();
  // decode the rest one token at a time ([B, H, D] per step; no allocation)
  for (index_t t = prompt; t < T; ++t) {
    attn.step(q.select<1>(t), k.select<1>(t), v.select<1>(t), o.select<1>(t), cache);
  }
  double err = 0;
  for (index_t i = 0; i < o.size(); ++i) err = std::max(err, double(std::abs(o[i] - whole[i])));
  std::printf("prefill %ld + %ld steps vs one call: max |diff| = %.2e, cache length %ld of %ld\n",
              long(prompt), long(T - prompt), err, long(cache.length(0)), long(cache.capacity()));

  // a full cache refuses to overrun; grow it explicitly
  try {
    attn.step(q.select<1>(0), k.select<1>(0), v.select<1>(0), o.select<1>(0), cache);
  } catch (const shape_error& e) {
    std::printf("caught: %s\n", e.what());
  }
  cache.reserve(2 * T);
  // roll back to the prompt and decode another continuation
  cache.restore(after_prompt);
  std::printf("restored to the prompt: length %ld\n", long(cache.length(0)));

  // sliding window: the ring cache keeps the last W tokens, constant memory
  sliding_window_attention<float> swa({.window = 16});
  auto ring = swa.make_cache(B, Hkv, D, D);
  const std::size_t bytes = ring.storage_bytes();
  for (index_t t = 0; t < T; ++t) {
    swa.step(q.select<1>(t), k.select<1>(t), v.select<1>(t), o.select<1>(t), ring);
  }
  std::printf(
      "sliding window W=16 after %ld tokens: ring holds %ld rows, %zu bytes (%zu at start)\n",
      long(ring.length(0)), long(ring.held(0)), ring.storage_bytes(), bytes);
  return err < 1e-5 && ring.storage_bytes() == bytes ? 0 : 1;
}
