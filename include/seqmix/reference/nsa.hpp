// SPDX-License-Identifier: MIT
// Plain reference of NSA, native sparse attention (docs/math.md §5.1; tests/golden/v2/README.md
// §5 gives fla's naive_nsa, which it follows): a readable token loop, any scalar type (the tests
// run it in double), written for clarity, not speed.
//
// Per sequence, block size bs, S selected blocks, scale s (default K^-1/2), window W (0: none):
//   k_cmp[c], v_cmp[c] = mean of the keys / values of complete block c  (c < len / bs)
//   compressed: query t sees blocks c with (c+1)·bs - 1 <= t; p_hc = softmax_c(s q_th · k_cmp[c]);
//               o_cmp = Σ_c p_hc v_cmp[c]; lse_cmp = log Σ_c exp(s q_th · k_cmp[c]);
//               no visible block: o_cmp = 0, lse_cmp = -inf
//   selection per (t, kv head): score_c = mean over the group's query heads of p_hc; blocks 0,
//               t/bs and t/bs - 1 forced (score 1); top S by (score desc, index asc) among the
//               visible and forced blocks; slots beyond the candidates are -1; stored ascending
//   selected:   softmax over the keys j <= t of the selected blocks (none: 0)
//   window:     o_swa = softmax over the keys t-W+1 .. t (within the sequence)
//   o = g_cmp·o_cmp + g_slc·o_slc (+ g_swa·o_swa), gates [B,T,H] per token and query head.
//
// Legend: B batch, T tokens, H query heads, Hkv kv heads (query head h reads kv head
// h / (H / Hkv)), K key dim, V value dim, NB blocks. Time O(B·H·T·(T/bs + S·bs)·(K+V)).
// Packed sequences (cu_seqlens, B = 1): k_cmp / v_cmp hold each sequence's complete blocks one
// after another, [1, Σ_n len_n / bs, Hkv, *].
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <span>
#include <utility>
#include <vector>

#include <seqmix/core/tensor.hpp>

namespace seqmix::reference {

template <class T>
struct nsa_result {
  tensor<T, 4> o, o_cmp, o_slc, o_swa;  // [B,T,H,V] (o_swa zero without a window)
  tensor<T, 3> lse_cmp;                 // [B,T,H]
  tensor<index_t, 4> block_indices;     // [B,T,Hkv,S], ascending, -1 padded
  tensor<T, 4> k_cmp, v_cmp;            // [B,NB,Hkv,K] / [.., V]
  tensor<T, 4> scores;  // [B,T,Hkv,NBseq] selection scores (forced 1, others visible p, else 0)
};

/// NSA over whole sequences. g_swa is read only when window > 0. `given` ([B,T,Hkv,S'], -1 for
/// an empty slot) replaces the selection (the compressed branch still runs); block_count is
/// then ignored.
template <class T>
nsa_result<T> nsa(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                  tensor_view<const T, 3> g_cmp, tensor_view<const T, 3> g_slc,
                  tensor_view<const T, 3> g_swa, index_t block_size, index_t block_count,
                  index_t window = 0, std::optional<T> scale = std::nullopt,
                  std::span<const index_t> cu_seqlens = {},
                  const tensor_view<const index_t, 4>* given = nullptr) {
  const index_t B = q.extent(0), Tn = q.extent(1), H = q.extent(2), K = q.extent(3);
  const index_t Hkv = k.extent(2), V = v.extent(3), G = H / Hkv, bs = block_size;
  const T s = scale ? *scale : T(1) / std::sqrt(T(K));
  const T ninf = -std::numeric_limits<T>::infinity();
  const index_t S = given ? given->extent(3) : block_count;
  // sequences: (batch row, first token, length, first compressed block)
  struct seq {
    index_t b, t0, len, c0;
  };
  std::vector<seq> seqs;
  index_t nb_total = 0, nb_seq_max = 0;
  if (cu_seqlens.empty()) {
    for (index_t b = 0; b < B; ++b) seqs.push_back({b, 0, Tn, 0});
    nb_total = Tn / bs;
    nb_seq_max = (Tn + bs - 1) / bs;
  } else {
    for (std::size_t n = 0; n + 1 < cu_seqlens.size(); ++n) {
      const index_t len = cu_seqlens[n + 1] - cu_seqlens[n];
      seqs.push_back({0, cu_seqlens[n], len, nb_total});
      nb_total += len / bs;
      nb_seq_max = std::max(nb_seq_max, (len + bs - 1) / bs);
    }
  }
  nsa_result<T> r;
  r.o = tensor<T, 4>({B, Tn, H, V}, T(0));
  r.o_cmp = tensor<T, 4>({B, Tn, H, V}, T(0));
  r.o_slc = tensor<T, 4>({B, Tn, H, V}, T(0));
  r.o_swa = tensor<T, 4>({B, Tn, H, V}, T(0));
  r.lse_cmp = tensor<T, 3>({B, Tn, H}, ninf);
  r.block_indices = tensor<index_t, 4>({B, Tn, Hkv, S}, index_t(-1));
  r.k_cmp = tensor<T, 4>({B, nb_total, Hkv, K}, T(0));
  r.v_cmp = tensor<T, 4>({B, nb_total, Hkv, V}, T(0));
  r.scores = tensor<T, 4>({B, Tn, Hkv, std::max<index_t>(nb_seq_max, 1)}, T(0));

  // softmax attention of query row (b, t, h) over the keys `keys` (positions in the input)
  std::vector<T> logit;
  const auto attend = [&](index_t b, index_t t, index_t h, const std::vector<index_t>& keys,
                          tensor<T, 4>& out) {
    if (keys.empty()) return;
    const index_t hk = h / G;
    logit.assign(keys.size(), T(0));
    T m = ninf;
    for (std::size_t i = 0; i < keys.size(); ++i) {
      T dot = T(0);
      for (index_t d = 0; d < K; ++d) dot += q(b, t, h, d) * k(b, keys[i], hk, d);
      logit[i] = s * dot;
      m = std::max(m, logit[i]);
    }
    T denom = T(0);
    for (T x : logit) denom += std::exp(x - m);
    for (index_t c = 0; c < V; ++c) {
      T acc = T(0);
      for (std::size_t i = 0; i < keys.size(); ++i)
        acc += std::exp(logit[i] - m) * v(b, keys[i], hk, c);
      out(b, t, h, c) = acc / denom;
    }
  };

  for (const seq& sq : seqs) {
    const index_t b = sq.b, nb = sq.len / bs;
    // compressed keys and values: block means
    for (index_t c = 0; c < nb; ++c) {
      for (index_t hk = 0; hk < Hkv; ++hk) {
        for (index_t d = 0; d < K; ++d) {
          T sum = T(0);
          for (index_t j = 0; j < bs; ++j) sum += k(b, sq.t0 + c * bs + j, hk, d);
          r.k_cmp(b, sq.c0 + c, hk, d) = sum / T(bs);
        }
        for (index_t d = 0; d < V; ++d) {
          T sum = T(0);
          for (index_t j = 0; j < bs; ++j) sum += v(b, sq.t0 + c * bs + j, hk, d);
          r.v_cmp(b, sq.c0 + c, hk, d) = sum / T(bs);
        }
      }
    }
    for (index_t i = 0; i < sq.len; ++i) {
      const index_t t = sq.t0 + i, nv = (i + 1) / bs, cur = i / bs;
      for (index_t hk = 0; hk < Hkv; ++hk) {
        std::vector<T> score(static_cast<std::size_t>(nv), T(0));
        for (index_t h = hk * G; h < (hk + 1) * G; ++h) {
          if (nv == 0) continue;  // o_cmp 0, lse -inf
          std::vector<T> lg(static_cast<std::size_t>(nv));
          T m = ninf;
          for (index_t c = 0; c < nv; ++c) {
            T dot = T(0);
            for (index_t d = 0; d < K; ++d) dot += q(b, t, h, d) * r.k_cmp(b, sq.c0 + c, hk, d);
            lg[static_cast<std::size_t>(c)] = s * dot;
            m = std::max(m, s * dot);
          }
          T denom = T(0);
          for (T x : lg) denom += std::exp(x - m);
          r.lse_cmp(b, t, h) = m + std::log(denom);
          for (index_t c = 0; c < nv; ++c)
            score[static_cast<std::size_t>(c)] +=
                std::exp(lg[static_cast<std::size_t>(c)] - m) / denom;
          for (index_t d = 0; d < V; ++d) {
            T acc = T(0);
            for (index_t c = 0; c < nv; ++c)
              acc += std::exp(lg[static_cast<std::size_t>(c)] - m) * r.v_cmp(b, sq.c0 + c, hk, d);
            r.o_cmp(b, t, h, d) = acc / denom;
          }
        }
        // selection
        std::vector<index_t> chosen;
        if (given) {
          for (index_t j = 0; j < S; ++j)
            if ((*given)(b, t, hk, j) >= 0) chosen.push_back((*given)(b, t, hk, j));
        } else {
          std::vector<std::pair<T, index_t>> cand;  // (score, block)
          for (index_t c = 0; c <= std::max(cur, nv - 1); ++c) {
            const bool forced = c == 0 || c == cur || c == cur - 1;
            if (!forced && c >= nv) continue;
            cand.push_back({forced ? T(1) : score[static_cast<std::size_t>(c)] / T(G), c});
          }
          for (const auto& [sc, c] : cand) r.scores(b, t, hk, c) = sc;
          std::stable_sort(cand.begin(), cand.end(),
                           [](const auto& x, const auto& y) { return x.first > y.first; });
          for (std::size_t j = 0; j < cand.size() && static_cast<index_t>(j) < S; ++j)
            chosen.push_back(cand[j].second);
        }
        std::sort(chosen.begin(), chosen.end());
        for (std::size_t j = 0; j < chosen.size(); ++j)
          r.block_indices(b, t, hk, static_cast<index_t>(j)) = chosen[j];
        std::vector<index_t> keys;
        for (index_t c : chosen)
          for (index_t j = c * bs; j < (c + 1) * bs && j <= i; ++j) keys.push_back(sq.t0 + j);
        std::vector<index_t> window_keys;
        if (window > 0)
          for (index_t j = std::max<index_t>(0, i - window + 1); j <= i; ++j)
            window_keys.push_back(sq.t0 + j);
        for (index_t h = hk * G; h < (hk + 1) * G; ++h) {
          attend(b, t, h, keys, r.o_slc);
          if (window > 0) attend(b, t, h, window_keys, r.o_swa);
          for (index_t d = 0; d < V; ++d) {
            T o = g_slc(b, t, h) * r.o_slc(b, t, h, d) + g_cmp(b, t, h) * r.o_cmp(b, t, h, d);
            if (window > 0) o += g_swa(b, t, h) * r.o_swa(b, t, h, d);
            r.o(b, t, h, d) = o;
          }
        }
      }
    }
  }
  return r;
}

}  // namespace seqmix::reference
