// SPDX-License-Identifier: MIT
// sliding_window_attention<T>: causal softmax attention over the last W tokens (docs/math.md §5),
// a front over softmax_attention<T> with the window required.
//
//   logit_tj = s q_t · k_j                for t - W < j <= t   (W keys, the current one included)
//   o_t = Σ_j exp(logit_tj - m_t) v_j / (Σ_j exp(logit_tj - m_t) + [exp(sink_h - m_t)])
//
// Legend: B batch, T tokens, H query heads, Hkv key/value heads (GQA as softmax_attention),
// K key dim, V value dim, W window.
//
// Forms:
//  - forward_chunked: flash-style tiles that only visit the key tiles inside the window:
//    time O(T·W·(K+V)) per head, linear in T; memory O(T·(K+V)).
//  - step / forward_recurrent: the state is a ring buffer of the last W keys and values per
//    (sequence, kv head) (make_cache): memory B·Hkv·W·(K+V), constant in T; time per token
//    O(W·(K+V)) per head.
// Checks as softmax_attention's (this is a front over it): messages name this class's entries.
#pragma once

#include <limits>

#include <seqmix/mixers/softmax_attention.hpp>

namespace seqmix {

template <class T>
class sliding_window_attention {
 public:
  struct options {
    index_t window = 0;        ///< W >= 1 (required): token t sees keys t-W+1 .. t
    std::optional<T> scale{};  ///< s; default K^-1/2
    std::vector<T> sink{};     ///< empty, or [H] per-head sink logits
    index_t chunk_size = 64;   ///< key tile of the chunked form (> 0)
  };

  explicit sliding_window_attention(options opt)
      : impl_(typename softmax_attention<T>::options{.scale = opt.scale,
                                                     .window = checked_window(opt.window),
                                                     .sink = std::move(opt.sink),
                                                     .chunk_size = opt.chunk_size},
              true) {}

  index_t window() const noexcept { return impl_.window(); }
  /// The underlying softmax_attention (same window).
  const softmax_attention<T>& attention() const noexcept { return impl_; }

  /// The recurrent state: a ring buffer of the last W keys/values per (sequence, kv head), for
  /// any number of tokens.
  kv_cache<T> make_cache(index_t B, index_t Hkv, index_t K, index_t V) const {
    const index_t w = window();
    return impl_.make_cache(B, Hkv, K, V, w < std::numeric_limits<index_t>::max() ? w + 1 : w);
  }
  /// A cache for at most `capacity` tokens per sequence: the ring of W rows, or a full cache of
  /// `capacity` rows when W >= capacity (so a huge window costs only what the tokens need).
  kv_cache<T> make_cache(index_t B, index_t Hkv, index_t K, index_t V, index_t capacity) const {
    return impl_.make_cache(B, Hkv, K, V, capacity);
  }

  /// q: [B,T,H,K] in; k: [B,T,Hkv,K] in; v: [B,T,Hkv,V] in; o: [B,T,H,V] out.
  void forward_chunked(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                       tensor_view<const T, 4> v, tensor_view<T, 4> o) const {
    impl_.forward_chunked(q, k, v, o);
  }
  /// Packed variable-length input (B == 1, offsets cu_seqlens [N+1]).
  void forward_chunked(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                       tensor_view<const T, 4> v, tensor_view<T, 4> o,
                       std::span<const index_t> cu_seqlens) const {
    impl_.forward_chunked(q, k, v, o, cu_seqlens);
  }
  /// Prefill into a cache (ring of >= W rows, or a full cache), appending the T tokens.
  void forward_chunked(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                       tensor_view<const T, 4> v, tensor_view<T, 4> o, kv_cache<T>& cache) const {
    impl_.forward_chunked(q, k, v, o, cache);
  }
  void forward_chunked(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                       tensor_view<const T, 4> v, tensor_view<T, 4> o, kv_cache<T>& cache,
                       std::span<const index_t> cu_seqlens) const {
    impl_.forward_chunked(q, k, v, o, cache, cu_seqlens);
  }
  /// Decode one token per sequence. q1: [B,H,K]; k1: [B,Hkv,K]; v1: [B,Hkv,V]; o1: [B,H,V].
  void step(tensor_view<const T, 3> q1, tensor_view<const T, 3> k1, tensor_view<const T, 3> v1,
            tensor_view<T, 3> o1, kv_cache<T>& cache) const {
    impl_.step(q1, k1, v1, o1, cache);
  }
  /// Token loop with a ring cache of its own (constant memory).
  void forward_recurrent(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                         tensor_view<const T, 4> v, tensor_view<T, 4> o) const {
    impl_.forward_recurrent(q, k, v, o);
  }
  void forward_recurrent(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                         tensor_view<const T, 4> v, tensor_view<T, 4> o, kv_cache<T>& cache) const {
    impl_.forward_recurrent(q, k, v, o, cache);
  }
  void forward(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
               tensor_view<T, 4> o) const {
    impl_.forward(q, k, v, o);
  }
  void forward(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
               tensor_view<T, 4> o, kv_cache<T>& cache) const {
    impl_.forward(q, k, v, o, cache);
  }

 private:
  static index_t checked_window(index_t w) {
    checker{"sliding_window_attention"}.require(
        w >= 1, "options.window", "must be >= 1 (required), got " + std::to_string(w));
    return w;
  }
  softmax_attention<T> impl_;
};

}  // namespace seqmix
