// SPDX-License-Identifier: MIT
// Plain references of softmax attention (docs/math.md §5): a readable token loop, any scalar type,
// written for clarity, not speed (time O(B·H·T²·(K+V)), memory O(T) per query row).
//
//   logit_tj = s q_t · k_j                for j <= t and t - j < W   (W = ∞ when absent)
//   o_t = Σ_j exp(logit_tj - m_t) v_j / (Σ_j exp(logit_tj - m_t) + [exp(sink_h - m_t)])
//   m_t = max(max_j logit_tj, [sink_h])
//
// Legend: B batch, T tokens, H query heads, Hkv key/value heads (query head h reads kv head
// h / (H / Hkv)), K key dim, V value dim, W window (0 = unbounded).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <span>
#include <vector>

#include <seqmix/core/tensor.hpp>

namespace seqmix::reference {

/// Causal softmax attention, plain softmax per query row.
/// q: [B,T,H,K] in; k: [B,T,Hkv,K] in; v: [B,T,Hkv,V] in; o: [B,T,H,V] out.
/// scale: s (default K^-1/2); window: W (0 = unbounded); sink: empty or [H] sink logits;
/// first_query: rows t < first_query of o are not computed (left as they are), for tests that
/// check only the last rows of a long sequence.
template <class T>
void softmax_attention(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                       tensor_view<const T, 4> v, tensor_view<T, 4> o,
                       std::optional<T> scale = std::nullopt, index_t window = 0,
                       std::span<const T> sink = {}, index_t first_query = 0) {
  const index_t B = q.extent(0), Tn = q.extent(1), H = q.extent(2), K = q.extent(3);
  const index_t Hkv = k.extent(2), V = v.extent(3);
  const index_t group = H / Hkv;
  const T s = scale ? *scale : T(1) / std::sqrt(T(K));
  std::vector<T> logit(static_cast<std::size_t>(Tn));
  for (index_t b = 0; b < B; ++b) {
    for (index_t h = 0; h < H; ++h) {
      const index_t hk = h / group;
      for (index_t t = first_query; t < Tn; ++t) {
        const index_t first = window > 0 ? std::max<index_t>(0, t - window + 1) : 0;
        // logits of the visible keys and their max (the sink counts as one more logit)
        T m =
            sink.empty() ? -std::numeric_limits<T>::infinity() : sink[static_cast<std::size_t>(h)];
        for (index_t j = first; j <= t; ++j) {
          T dot = T(0);
          for (index_t d = 0; d < K; ++d) dot += q(b, t, h, d) * k(b, j, hk, d);
          logit[static_cast<std::size_t>(j)] = s * dot;
          m = std::max(m, s * dot);
        }
        // the weights exp(logit - m), once per key (kept in the logit buffer)
        T denom = sink.empty() ? T(0) : std::exp(sink[static_cast<std::size_t>(h)] - m);
        for (index_t j = first; j <= t; ++j) {
          T& p = logit[static_cast<std::size_t>(j)];
          p = std::exp(p - m);
          denom += p;
        }
        for (index_t c = 0; c < V; ++c) {
          T acc = T(0);
          for (index_t j = first; j <= t; ++j)
            acc += logit[static_cast<std::size_t>(j)] * v(b, j, hk, c);
          o(b, t, h, c) = acc / denom;
        }
      }
    }
  }
}

}  // namespace seqmix::reference
