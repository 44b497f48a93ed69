// SPDX-License-Identifier: MIT
// Plain reference of MoBA, mixture of block attention (docs/math.md §5.2): readable loops, any
// scalar type (the tests use double), written for clarity, not speed.
//
//   per sequence: chunks of c keys; m_b = mean of chunk b's keys (a partial last chunk averages
//   the keys it has, but only complete chunks are ever gated)
//   gate_tb = q_t · m_b (no scale) for the chunks b < t / c strictly before t's own
//   S_t = own chunk (keys j <= t) ∪ the top-(k-1) earlier chunks by gate (all of them when there
//         are at most k-1; equal gates: the lower chunk index first; a NaN gate ranks as -inf)
//   o_t = Σ_{j in S_t} softmax_j(s q_t · k_j) v_j          (s = K^-1/2 by default)
//
// Shapes: packed q [N,H,K], k [N,Hkv,K], v [N,Hkv,V], o [N,H,V] with cu_seqlens [n+1]
// (MoBA's own layout), or q [B,T,H,K] ... (every batch row one sequence). Query head h reads kv
// head h / (H / Hkv) (MoBA's repeat_interleave). Selection (optional): [N,H,k-1], the chosen
// earlier chunks ascending, -1 in unused slots.
// Cost: O(T·(T/c)·K) gates + O(T·k·c·(K+V)) attention per head, memory O(T/c) per query row.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <optional>
#include <span>
#include <vector>

#include <seqmix/core/tensor.hpp>

namespace seqmix::reference {

namespace detail {

/// One sequence: q [T,H,K], k [T,Hkv,K], v [T,Hkv,V], o [T,H,V]; sel [T,H,k-1] or empty.
template <class T>
void moba_sequence(tensor_view<const T, 3> q, tensor_view<const T, 3> k, tensor_view<const T, 3> v,
                   tensor_view<T, 3> o, index_t chunk, index_t top_k, T scale,
                   tensor_view<std::int32_t, 3> sel) {
  const index_t Tn = q.extent(0), H = q.extent(1), K = q.extent(2);
  const index_t Hkv = k.extent(1), V = v.extent(2), group = H / Hkv;
  const index_t nchunks = (Tn + chunk - 1) / chunk;
  const T ninf = -std::numeric_limits<T>::infinity();
  for (index_t h = 0; h < H; ++h) {
    const index_t hk = h / group;
    // chunk means
    std::vector<T> mean(static_cast<std::size_t>(nchunks * K), T(0));
    for (index_t b = 0; b < nchunks; ++b) {
      const index_t j0 = b * chunk, j1 = std::min(Tn, j0 + chunk);
      for (index_t d = 0; d < K; ++d) {
        T s = T(0);
        for (index_t j = j0; j < j1; ++j) s += k(j, hk, d);
        mean[static_cast<std::size_t>(b * K + d)] = s / T(j1 - j0);
      }
    }
    for (index_t t = 0; t < Tn; ++t) {
      const index_t own = t / chunk;
      // gates of the earlier chunks, ranked
      std::vector<T> gate(static_cast<std::size_t>(own));
      for (index_t b = 0; b < own; ++b) {
        T g = T(0);
        for (index_t d = 0; d < K; ++d) g += q(t, h, d) * mean[static_cast<std::size_t>(b * K + d)];
        gate[static_cast<std::size_t>(b)] = std::isnan(g) ? ninf : g;
      }
      std::vector<index_t> order(static_cast<std::size_t>(own));
      std::iota(order.begin(), order.end(), index_t(0));
      std::stable_sort(order.begin(), order.end(), [&](index_t a, index_t b) {
        return gate[static_cast<std::size_t>(a)] > gate[static_cast<std::size_t>(b)];
      });
      const index_t nsel = std::min(own, top_k - 1);
      std::vector<index_t> chosen(order.begin(), order.begin() + nsel);
      std::sort(chosen.begin(), chosen.end());
      if (sel.data()) {
        for (index_t e = 0; e < top_k - 1; ++e)
          sel(t, h, e) = e < nsel ? static_cast<std::int32_t>(chosen[static_cast<std::size_t>(e)])
                                  : std::int32_t(-1);
      }
      if (!o.data()) continue;
      // the selected keys: chosen chunks, then the own chunk up to t
      std::vector<index_t> keys;
      for (index_t b : chosen)
        for (index_t j = b * chunk; j < (b + 1) * chunk; ++j) keys.push_back(j);
      for (index_t j = own * chunk; j <= t; ++j) keys.push_back(j);
      std::vector<T> logit(keys.size());
      T m = ninf;
      for (std::size_t e = 0; e < keys.size(); ++e) {
        T dot = T(0);
        for (index_t d = 0; d < K; ++d) dot += q(t, h, d) * k(keys[e], hk, d);
        logit[e] = scale * dot;
        m = std::max(m, logit[e]);
      }
      T denom = T(0);
      for (std::size_t e = 0; e < keys.size(); ++e) denom += std::exp(logit[e] - m);
      for (index_t c = 0; c < V; ++c) {
        T acc = T(0);
        for (std::size_t e = 0; e < keys.size(); ++e)
          acc += std::exp(logit[e] - m) * v(keys[e], hk, c);
        o(t, h, c) = acc / denom;
      }
    }
  }
}

}  // namespace detail

/// Packed MoBA: q [N,H,K], k [N,Hkv,K], v [N,Hkv,V] in; o [N,H,V] out (may be an empty view
/// when only the selection is wanted); sequence n is rows cu_seqlens[n] .. cu_seqlens[n+1]-1.
/// selected: empty, or [N,H,top_k-1] out. Inputs are trusted (this is a test oracle).
template <class T>
void moba_attention(tensor_view<const T, 3> q, tensor_view<const T, 3> k, tensor_view<const T, 3> v,
                    tensor_view<T, 3> o, std::span<const index_t> cu_seqlens, index_t chunk,
                    index_t top_k, std::optional<T> scale = std::nullopt,
                    tensor_view<std::int32_t, 3> selected = {}) {
  const T s = scale ? *scale : T(1) / std::sqrt(T(q.extent(2)));
  for (std::size_t n = 0; n + 1 < cu_seqlens.size(); ++n) {
    const index_t a = cu_seqlens[n], b = cu_seqlens[n + 1];
    if (b == a) continue;
    detail::moba_sequence<T>(
        q.template slice<0>(a, b), k.template slice<0>(a, b), v.template slice<0>(a, b),
        o.data() ? o.template slice<0>(a, b) : tensor_view<T, 3>{}, chunk, top_k, s,
        selected.data() ? selected.template slice<0>(a, b) : tensor_view<std::int32_t, 3>{});
  }
}

/// Batched MoBA: q [B,T,H,K], k [B,T,Hkv,K], v [B,T,Hkv,V] in; o [B,T,H,V] out; every batch
/// row is one sequence. selected: empty, or [B,T,H,top_k-1] out.
template <class T>
void moba_attention(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                    tensor_view<T, 4> o, index_t chunk, index_t top_k,
                    std::optional<T> scale = std::nullopt,
                    tensor_view<std::int32_t, 4> selected = {}) {
  const T s = scale ? *scale : T(1) / std::sqrt(T(q.extent(3)));
  for (index_t b = 0; b < q.extent(0); ++b) {
    detail::moba_sequence<T>(
        q.template select<0>(b), k.template select<0>(b), v.template select<0>(b),
        o.data() ? o.template select<0>(b) : tensor_view<T, 3>{}, chunk, top_k, s,
        selected.data() ? selected.template select<0>(b) : tensor_view<std::int32_t, 3>{});
  }
}

}  // namespace seqmix::reference
