// SPDX-License-Identifier: MIT
// native_sparse_attention<T> and nsa_cache<T>: NSA-style block-sparse attention (docs/math.md
// §5.1), the semantics of fla's naive_nsa (tests/golden/v2/README.md §5), on the attention
// engine (kernels/nsa.hpp over kernels/attention.hpp's pieces; the window branch is
// sliding_window_attention; the cache is a kv_cache plus block means).
//
// Per token t, query head h (kv head h / G), block size bs, S selected blocks, scale s:
//   o = g_cmp ⊙ o_cmp + g_slc ⊙ o_slc (+ g_swa ⊙ o_swa)
//   o_cmp: softmax over the means of the complete blocks ending at or before t (lse_cmp its
//          log-sum-exp; none visible: 0 and -inf)
//   o_slc: causal softmax over the keys of the S blocks picked per (t, kv head) by the
//          compressed probabilities averaged over the group (blocks 0, t/bs, t/bs - 1 forced;
//          ties to the lower index; fewer candidates than S: empty slots, -1)
//   o_swa: sliding-window attention over the last W keys (options.window > 0 only)
//
// Shapes: q [B,T,H,K], k [B,T,Hkv,K], v [B,T,Hkv,V], o [B,T,H,V]; gates [B,T,H] (per token and
// query head); block_indices [B,T,Hkv,S] (int64, ascending, -1 padded); k_cmp / v_cmp
// [B,T/bs,Hkv,K|V] (packed sequences: [1, Σ_n len_n/bs, Hkv, *], sequence after sequence).
// Decode: q1 [B,H,K], k1/v1 [B,Hkv,*], o1 [B,H,V], gates [B,H], block_indices [B,Hkv,S].
//
// Forms and cost (per kv head and token; G = H/Hkv, nv = visible blocks <= t/bs):
//  - forward (prefill / training): one work item per (token, kv head), visiting the nv block
//    means and the S selected blocks only: the G query heads along the SIMD lanes when G >= L
//    (the SIMD width), else each head a row with the keys along the lanes (kernels/nsa.hpp;
//    the keys of each (sequence, kv head) transposed once per call for it). Items run kv head
//    after kv head, 16 tokens at a time. Time O(G·(nv + S·bs)·(K+V)) per item, so
//    O(T·(T/bs + S·bs)) per head instead of O(T²); memory: the block means (T/bs rows), for
//    G < L a transposed copy of the keys, + O(64·(nv + K + V)) scratch per thread. Never a T×T
//    matrix. All scratch comes from the calling thread's workspace arena: a repeated call of
//    the same shapes allocates nothing (without the window branch, whose scratch is
//    sliding_window_attention's).
//  - step (decode): appends one token to an nsa_cache (its block mean computed when the block
//    completes), then the same item: O(nv·(K+V)) for the means plus O(S·bs·(K+V)) for the
//    selected keys, independent of the cached length otherwise. Allocates nothing after the
//    first step (workspace arena).
//  - prefill then steps gives bitwise the outputs of one call (the same kernel reads the same
//    rows; the window branch, when present, to float rounding: tiles vs decode).
// nsa_cache memory: B·Hkv·capacity·((K+V)·(1 + 1/bs) + K/bs)·sizeof(T) (keys, values, block
// means as rows, and the key means once more transposed for the keys-along-lanes form).
//
// Checks (before anything is written; messages name the entry called and the argument):
// options (block_size >= 1, block_count >= 1, window >= 0, scale finite); block_count <= the
// number of blocks ceil(T / block_size) (with a cache: ceil(capacity / block_size)); gates of
// shape [B,T,H] (g.swa only with a window); given block indices in [-1, blocks of the sequence),
// no block twice in a row; optional outputs of their shapes; o disjoint from q, k, v.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <seqmix/core/error.hpp>
#include <seqmix/core/parallel.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/core/workspace.hpp>
#include <seqmix/kernels/attention.hpp>
#include <seqmix/kernels/nsa.hpp>
#include <seqmix/mixers/detail/front_checks.hpp>
#include <seqmix/mixers/kv_cache.hpp>
#include <seqmix/mixers/sliding_window_attention.hpp>

namespace seqmix {

/// A copy of an nsa_cache's keys, values and lengths (the block means are recomputed on restore).
template <class T>
struct nsa_cache_snapshot {
  kv_cache_snapshot<T> kv;
  index_t block_size = 0;
};

/// The decode state of native_sparse_attention: a full kv_cache of `capacity` tokens per
/// sequence plus the mean key and value of every complete block, [B, Hkv, capacity/bs, K|V],
/// each written when its block completes. truncate() is O(1) (a mean is recomputed when its
/// block completes again); snapshot()/restore() copy the rows and recompute the means.
template <class T>
class nsa_cache {
 public:
  nsa_cache() = default;
  nsa_cache(index_t batch, index_t kv_heads, index_t key_dim, index_t value_dim, index_t capacity,
            index_t block_size)
      : bs_(checked_block_size(block_size)),
        kv_(kv_cache<T>::full(batch, kv_heads, key_dim, value_dim, capacity)),
        kc_({batch, kv_heads, std::max<index_t>(capacity / bs_, 1), key_dim}),
        vc_({batch, kv_heads, std::max<index_t>(capacity / bs_, 1), value_dim}),
        ldt_((std::max<index_t>(capacity / bs_, 1) + kernels::nsa::detail::kl_tile - 1) /
             kernels::nsa::detail::kl_tile * kernels::nsa::detail::kl_tile),
        kct_({batch, kv_heads, key_dim, ldt_}, T(0)) {}

  index_t batch() const noexcept { return kv_.batch(); }
  index_t kv_heads() const noexcept { return kv_.kv_heads(); }
  index_t key_dim() const noexcept { return kv_.key_dim(); }
  index_t value_dim() const noexcept { return kv_.value_dim(); }
  index_t capacity() const noexcept { return kv_.capacity(); }
  index_t block_size() const noexcept { return bs_; }
  index_t length(index_t b) const { return kv_.length(b); }
  /// Complete blocks of sequence b (those with a mean).
  index_t blocks(index_t b) const { return kv_.length(b) / bs_; }
  /// Bytes of keys, values and block means (rows and the transposed key means).
  std::size_t storage_bytes() const noexcept {
    return kv_.storage_bytes() +
           static_cast<std::size_t>(kc_.size() + vc_.size() + kct_.size()) * sizeof(T);
  }
  /// Bytes per cached token and kv head: (K + V)·sizeof(T)·(1 + 1/bs) + K·sizeof(T)/bs (the
  /// block means as rows, and the key means once more transposed for groups smaller than a
  /// SIMD vector).
  double bytes_per_token() const noexcept {
    return (double(key_dim() + value_dim()) * (1.0 + 1.0 / double(bs_)) +
            double(key_dim()) / double(bs_)) *
           double(sizeof(T));
  }

  void reset() { kv_.reset(); }
  void reset(index_t b) { kv_.reset(b); }
  /// Rolls sequence b back to its first n tokens (O(1)).
  void truncate(index_t b, index_t n) { kv_.truncate(b, n); }
  nsa_cache_snapshot<T> snapshot() const { return {kv_.snapshot(), bs_}; }
  /// Restores a snapshot of a cache of the same geometry and block size (validated first).
  void restore(const nsa_cache_snapshot<T>& s) {
    if (s.block_size != bs_) {
      detail::fail("nsa_cache::restore", "s.block_size",
                   "expected a snapshot of a cache of block size " + std::to_string(bs_) +
                       ", got " + std::to_string(s.block_size));
    }
    kv_.restore(s.kv);
    for (index_t b = 0; b < batch(); ++b) complete_blocks(b, 0, kv_.length(b));
  }
  /// Keys / values of (b, h) as kv_cache::keys: [length(b), K|V].
  tensor_view<const T, 2> keys(index_t b, index_t h) const { return kv_.keys(b, h); }
  tensor_view<const T, 2> values(index_t b, index_t h) const { return kv_.values(b, h); }
  /// Block means of (b, h): [blocks(b), K] / [blocks(b), V].
  tensor_view<const T, 2> block_keys(index_t b, index_t h) const {
    (void)kv_.keys(b, h);  // range checks
    return kc_.view().template select<0>(b).template select<0>(h).template slice<0>(0, blocks(b));
  }
  tensor_view<const T, 2> block_values(index_t b, index_t h) const {
    (void)kv_.values(b, h);
    return vc_.view().template select<0>(b).template select<0>(h).template slice<0>(0, blocks(b));
  }

  // ---- used by native_sparse_attention -----------------------------------------------------
  kv_cache<T>& kv() noexcept { return kv_; }
  const kv_cache<T>& kv() const noexcept { return kv_; }
  const T* block_key_row(index_t b, index_t h, index_t c) const noexcept {
    return kc_.view().ptr({b, h, c, 0});
  }
  const T* block_value_row(index_t b, index_t h, index_t c) const noexcept {
    return vc_.view().ptr({b, h, c, 0});
  }
  /// The key means of (b, h) transposed, [K, block_means_stride()] (columns past blocks(b)
  /// readable, their values stale).
  const T* block_keys_t(index_t b, index_t h) const noexcept {
    return kct_.view().ptr({b, h, 0, 0});
  }
  index_t block_keys_t_stride() const noexcept { return ldt_; }
  /// Writes the means of the blocks of sequence b that complete between lengths `from` and `to`
  /// (rows already in the kv cache), for every kv head.
  void complete_blocks(index_t b, index_t from, index_t to) noexcept {
    for (index_t c = from / bs_; (c + 1) * bs_ <= to; ++c)
      for (index_t h = 0; h < kv_heads(); ++h) complete_block(b, h, c);
  }
  void complete_block(index_t b, index_t h, index_t c) noexcept {
    kernels::nsa::block_mean(kv_.key_row(b, h, c * bs_), key_dim(), bs_, key_dim(),
                             kc_.view().ptr({b, h, c, 0}));
    kernels::nsa::block_mean(kv_.value_row(b, h, c * bs_), value_dim(), bs_, value_dim(),
                             vc_.view().ptr({b, h, c, 0}));
    const T* row = kc_.view().ptr({b, h, c, 0});
    T* col = kct_.view().ptr({b, h, 0, c});
    for (index_t d = 0; d < key_dim(); ++d) col[d * ldt_] = row[d];
  }

 private:
  static index_t checked_block_size(index_t bs) {
    if (bs < 1) {
      detail::fail("nsa_cache", "block_size", "must be >= 1, got " + std::to_string(bs));
    }
    return bs;
  }
  index_t bs_ = 1;
  kv_cache<T> kv_;
  tensor<T, 4> kc_, vc_;
  index_t ldt_ = 0;
  tensor<T, 4> kct_;  // [B, Hkv, K, ldt]: the key means transposed
};

template <class T>
class native_sparse_attention {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "native_sparse_attention<T>: T is float or double");

 public:
  struct options {
    index_t block_size = 64;   ///< bs >= 1 (compression and selection block)
    index_t block_count = 16;  ///< S >= 1 selected blocks per (token, kv head)
    index_t window = 0;        ///< W of the sliding-window branch; 0: no such branch
    std::optional<T> scale{};  ///< s; default K^-1/2
    index_t chunk_size = 64;   ///< key tile of the window branch (sliding_window_attention)
  };
  /// Gates [B,T,H] per token and query head (g.swa only with a window).
  struct gates {
    tensor_view<const T, 3> cmp, slc, swa;
  };
  /// Decode gates [B,H].
  struct step_gates {
    tensor_view<const T, 2> cmp, slc, swa;
  };
  /// Optional outputs of a whole-sequence call; an empty view (default) is not written.
  struct extras {
    tensor_view<T, 4> o_cmp, o_slc, o_swa;  // [B,T,H,V]
    tensor_view<T, 3> lse_cmp;              // [B,T,H]
    tensor_view<index_t, 4> block_indices;  // [B,T,Hkv,S] (with given indices: not written)
    tensor_view<T, 4> k_cmp, v_cmp;         // [B,T/bs,Hkv,K|V] (packed: Σ len_n/bs rows)
  };
  /// Optional outputs of a step.
  struct step_extras {
    tensor_view<T, 3> o_cmp, o_slc, o_swa;  // [B,H,V]
    tensor_view<T, 2> lse_cmp;              // [B,H]
    tensor_view<index_t, 3> block_indices;  // [B,Hkv,S]
  };

  explicit native_sparse_attention(options opt) : opt_(std::move(opt)) {
    const checker check{"native_sparse_attention"};
    check.require(opt_.block_size >= 1, "options.block_size",
                  "must be >= 1, got " + std::to_string(opt_.block_size));
    check.require(opt_.block_count >= 1, "options.block_count",
                  "must be >= 1, got " + std::to_string(opt_.block_count));
    check.require(opt_.window >= 0, "options.window",
                  "must be >= 0 (0: no sliding-window branch), got " + std::to_string(opt_.window));
    check.require(opt_.chunk_size > 0, "options.chunk_size",
                  "must be > 0, got " + std::to_string(opt_.chunk_size));
    if (opt_.scale) check.finite_value("options.scale", *opt_.scale);
    if (opt_.window > 0) {
      swa_.emplace(typename sliding_window_attention<T>::options{
          .window = opt_.window, .scale = opt_.scale, .sink = {}, .chunk_size = opt_.chunk_size});
    }
  }
  native_sparse_attention() : native_sparse_attention(options{}) {}

  const options& get_options() const noexcept { return opt_; }

  /// A decode cache for at most `capacity` tokens per sequence.
  nsa_cache<T> make_cache(index_t B, index_t Hkv, index_t K, index_t V, index_t capacity) const {
    const checker check{"native_sparse_attention::make_cache"};
    check.require(capacity >= 1, "capacity", "must be >= 1, got " + std::to_string(capacity));
    check_block_count(check, capacity, "capacity");
    return nsa_cache<T>(B, Hkv, K, V, capacity, opt_.block_size);
  }

  /// Whole sequences. q [B,T,H,K], k [B,T,Hkv,K], v [B,T,Hkv,V], o [B,T,H,V] out.
  void forward(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
               const gates& g, tensor_view<T, 4> o, const extras& x = {}) const {
    const checker check{"native_sparse_attention::forward"};
    auto frame = thread_workspace().scope();
    const dims d = validate(check, q, k, v, g, o, x, nullptr);
    check_block_count(check, d.Tn, "T");
    check_compressed(check, d, x, d.B, d.Tn / opt_.block_size);
    run(d, q, k, v, g, o, x, batch_seqs(frame, d), nullptr, nullptr, {});
  }
  /// Packed sequences (B == 1): sequence n is tokens cu_seqlens[n] .. cu_seqlens[n+1]-1.
  void forward(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
               const gates& g, tensor_view<T, 4> o, std::span<const index_t> cu_seqlens,
               const extras& x = {}) const {
    const checker check{"native_sparse_attention::forward"};
    auto frame = thread_workspace().scope();
    const dims d = validate(check, q, k, v, g, o, x, nullptr);
    check_block_count(check, d.Tn, "T");
    const auto seqs = packed_seqs(frame, check, d, cu_seqlens);
    check_compressed(check, d, x, 1,
                     seqs.empty() ? 0 : seqs.back().c0 + seqs.back().len / opt_.block_size);
    run(d, q, k, v, g, o, x, seqs, nullptr, nullptr, cu_seqlens);
  }
  /// Prefill: the T new tokens of each of the B sequences attend over the cache and themselves
  /// and are appended (block means written as blocks complete).
  void forward(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
               const gates& g, tensor_view<T, 4> o, nsa_cache<T>& cache,
               const extras& x = {}) const {
    const checker check{"native_sparse_attention::forward"};
    auto frame = thread_workspace().scope();
    const dims d = validate(check, q, k, v, g, o, x, nullptr);
    check_cache(check, d, cache);
    for (index_t b = 0; b < d.B; ++b) check_room(check, cache, b, d.Tn);
    check.require(!x.k_cmp.data() && !x.v_cmp.data(), "x",
                  "k_cmp / v_cmp are outputs of the calls without a cache (the cache holds the "
                  "block means: nsa_cache::block_keys / block_values)");
    run(d, q, k, v, g, o, x, batch_seqs(frame, d), &cache, nullptr, {});
  }
  /// Packed prefill (B == 1): sequence n appends to row n of `cache` ([N] sequences).
  void forward(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
               const gates& g, tensor_view<T, 4> o, nsa_cache<T>& cache,
               std::span<const index_t> cu_seqlens, const extras& x = {}) const {
    const checker check{"native_sparse_attention::forward"};
    auto frame = thread_workspace().scope();
    const dims d = validate(check, q, k, v, g, o, x, nullptr);
    const auto seqs = packed_seqs(frame, check, d, cu_seqlens);
    check_cache(check, d, cache, static_cast<index_t>(seqs.size()));
    for (const seq& s : seqs) check_room(check, cache, s.row, s.len);
    check.require(!x.k_cmp.data() && !x.v_cmp.data(), "x",
                  "k_cmp / v_cmp are outputs of the calls without a cache (the cache holds the "
                  "block means: nsa_cache::block_keys / block_values)");
    run(d, q, k, v, g, o, x, seqs, &cache, nullptr, cu_seqlens);
  }
  /// Given selection (reuse across layers): block_indices [B,T,Hkv,S'] (-1 empty) replace the
  /// selection; the compressed branch still runs (its output is gated in).
  void forward_selected(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                        tensor_view<const T, 4> v, const gates& g,
                        tensor_view<const index_t, 4> block_indices, tensor_view<T, 4> o,
                        const extras& x = {}) const {
    const checker check{"native_sparse_attention::forward_selected"};
    auto frame = thread_workspace().scope();
    const dims d = validate(check, q, k, v, g, o, x, &block_indices);
    check_compressed(check, d, x, d.B, d.Tn / opt_.block_size);
    const auto seqs = batch_seqs(frame, d);
    check_given(check, block_indices, seqs);
    run(d, q, k, v, g, o, x, seqs, nullptr, &block_indices, {});
  }
  /// Given selection over packed sequences.
  void forward_selected(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                        tensor_view<const T, 4> v, const gates& g,
                        tensor_view<const index_t, 4> block_indices, tensor_view<T, 4> o,
                        std::span<const index_t> cu_seqlens, const extras& x = {}) const {
    const checker check{"native_sparse_attention::forward_selected"};
    auto frame = thread_workspace().scope();
    const dims d = validate(check, q, k, v, g, o, x, &block_indices);
    const auto seqs = packed_seqs(frame, check, d, cu_seqlens);
    check_compressed(check, d, x, 1,
                     seqs.empty() ? 0 : seqs.back().c0 + seqs.back().len / opt_.block_size);
    check_given(check, block_indices, seqs);
    run(d, q, k, v, g, o, x, seqs, nullptr, &block_indices, cu_seqlens);
  }

  /// Decode one token per sequence: appends k1, v1 to `cache`, then attends.
  /// q1 [B,H,K], k1 [B,Hkv,K], v1 [B,Hkv,V], gates [B,H], o1 [B,H,V] out.
  void step(tensor_view<const T, 3> q1, tensor_view<const T, 3> k1, tensor_view<const T, 3> v1,
            const step_gates& g, tensor_view<T, 3> o1, nsa_cache<T>& cache,
            const step_extras& x = {}) const {
    const checker check{"native_sparse_attention::step"};
    const dims d =
        front::check_attention_qkvo3<T>(check, {"q1", "k1", "v1", "o1"}, q1, k1, v1, o1,
                                        [this](const checker& c, std::string_view name, index_t H_,
                                               index_t Hkv_) { check_heads(c, name, H_, Hkv_); });
    const index_t B = d.B, H = d.H, Hkv = d.Hkv, K = d.K, V = d.V;
    check.shape("g.cmp", g.cmp, {B, H});
    check.shape("g.slc", g.slc, {B, H});
    if (opt_.window > 0) {
      check.shape("g.swa", g.swa, {B, H});
    } else if (g.swa.data()) {
      check.fail("g.swa", "given, but options.window is 0 (no sliding-window branch)");
    }
    if (x.o_cmp.data()) check.shape("x.o_cmp", x.o_cmp, {B, H, V});
    if (x.o_slc.data()) check.shape("x.o_slc", x.o_slc, {B, H, V});
    if (x.o_swa.data()) {
      check.require(opt_.window > 0, "x.o_swa", "given, but options.window is 0");
      check.shape("x.o_swa", x.o_swa, {B, H, V});
    }
    if (x.lse_cmp.data()) check.shape("x.lse_cmp", x.lse_cmp, {B, H});
    if (x.block_indices.data())
      check.shape("x.block_indices", x.block_indices, {B, Hkv, opt_.block_count});
    check_cache(check, d, cache);
    for (index_t b = 0; b < B; ++b) check_room(check, cache, b, 1);
    check.no_overlap({range_of("o1", o1)},
                     {range_of("q1", q1), range_of("k1", k1), range_of("v1", v1)});

    const index_t G = H / Hkv;
    const auto p = kernel_params(d);
    kv_cache<T>& kv = cache.kv();
    const index_t bs = opt_.block_size, W = opt_.window;
    index_t max_blocks = 1;
    for (index_t b = 0; b < B; ++b) max_blocks = std::max(max_blocks, (kv.length(b) + 1) / bs + 1);
    auto frame = thread_workspace().scope();  // the step's scratch: allocated once, then reused
    std::span<kernels::nsa::scratch<T>> work =
        frame.take<kernels::nsa::scratch<T>>(static_cast<index_t>(max_slots()));
    for (auto& w : work) w.take(frame, p, max_blocks);
    parallel_for_with_slot(B * Hkv, [&](index_t n, int tid) {
      const index_t b = n / Hkv, h = n % Hkv;
      auto& w = work[static_cast<std::size_t>(tid)];
      const index_t pos = kv.length(b);
      std::copy_n(k1.ptr({b, h, 0}), K, kv.key_row(b, h, pos));
      std::copy_n(v1.ptr({b, h, 0}), V, kv.value_row(b, h, pos));
      if ((pos + 1) % bs == 0) cache.complete_block(b, h, pos / bs);
      kernels::nsa::token_problem<T> tp;
      tp.q = q1.ptr({b, h * G, 0});
      tp.q_stride = q1.stride(1);
      tp.kc = cache.block_key_row(b, h, 0);
      tp.kc_stride = K;
      tp.vc = cache.block_value_row(b, h, 0);
      tp.vc_stride = V;
      tp.k = kv.key_row(b, h, 0);
      tp.k_stride = K;
      tp.v = kv.value_row(b, h, 0);
      tp.v_stride = V;
      tp.kct = cache.block_keys_t(b, h);
      tp.kct_stride = cache.block_keys_t_stride();
      tp.pos = pos;
      kernels::nsa::token(tp, p, w);
      if (W > 0) {  // window branch: decode over the last W rows, into w.acc's spare rows
        const index_t first = std::max<index_t>(0, pos - W + 1);
        const kernels::attention::key_run<T> run{kv.key_row(b, h, first), kv.value_row(b, h, first),
                                                 pos - first + 1, K, V};
        kernels::attention::params<T> ap;
        ap.key_dim = K;
        ap.value_dim = V;
        ap.scale = p.scale;
        kernels::attention::decode_group<T>(tp.q, tp.q_stride, G, &run, 1, w.o_swa.data(), V,
                                            nullptr, ap);
      }
      for (index_t gi = 0; gi < G; ++gi) {
        const index_t hq = h * G + gi;
        const T* oc = w.o_cmp.data() + gi * V;
        const T* os = w.o_slc.data() + gi * V;
        const T* ow = w.o_swa.data() + gi * V;
        const T gc = g.cmp(b, hq), gs = g.slc(b, hq), gw = W > 0 ? g.swa(b, hq) : T(0);
        T* out = o1.ptr({b, hq, 0});
        for (index_t c = 0; c < V; ++c) out[c] = combine(gc, oc[c], gs, os[c], W > 0, gw, ow[c]);
        if (x.o_cmp.data()) std::copy_n(oc, V, x.o_cmp.ptr({b, hq, 0}));
        if (x.o_slc.data()) std::copy_n(os, V, x.o_slc.ptr({b, hq, 0}));
        if (x.o_swa.data()) std::copy_n(ow, V, x.o_swa.ptr({b, hq, 0}));
        if (x.lse_cmp.data()) x.lse_cmp(b, hq) = w.lse[static_cast<std::size_t>(gi)];
      }
      if (x.block_indices.data())
        for (index_t s = 0; s < opt_.block_count; ++s)
          x.block_indices(b, h, s) = w.sel[static_cast<std::size_t>(s)];
    });
    for (index_t b = 0; b < B; ++b) kv.set_length(b, kv.length(b) + 1);
  }

 private:
  using dims = front::attention_dims;
  // one sequence: tokens t0 .. t0+len-1 of batch row qb; cache row `row`; c0: its first block
  // in the k_cmp / v_cmp rows of a call without a cache
  struct seq {
    index_t qb, t0, len, row, c0;
  };

  static T combine(T gc, T oc, T gs, T os, bool swa, T gw, T ow) {
    // fla's order: o = o_slc·g_slc, then + o_cmp·g_cmp, then + o_swa·g_swa
    T r = os * gs;
    r += oc * gc;
    if (swa) r += ow * gw;
    return r;
  }

  kernels::nsa::params<T> kernel_params(const dims& d) const {
    kernels::nsa::params<T> p;
    p.key_dim = d.K;
    p.value_dim = d.V;
    p.block_size = opt_.block_size;
    p.block_count = opt_.block_count;
    p.group = d.H / d.Hkv;
    p.scale = opt_.scale ? *opt_.scale : T(1) / std::sqrt(T(d.K));
    return p;
  }

  void check_heads(const checker& check, std::string_view k_name, index_t H, index_t Hkv) const {
    if (Hkv < 1 || H % Hkv != 0) {
      check.fail(k_name, "query heads (" + std::to_string(H) +
                             ") must be a multiple of key/value heads (" + std::to_string(Hkv) +
                             ")");
    }
  }
  // S <= ceil(n / bs): more selected blocks than a sequence of n tokens can have
  void check_block_count(const checker& check, index_t n, const char* what) const {
    const index_t blocks = (n + opt_.block_size - 1) / opt_.block_size;
    if (opt_.block_count > blocks) {
      check.fail("options.block_count",
                 "must be <= the number of blocks ceil(" + std::string(what) +
                     " / block_size) = ceil(" + std::to_string(n) + " / " +
                     std::to_string(opt_.block_size) + ") = " + std::to_string(blocks) + ", got " +
                     std::to_string(opt_.block_count));
    }
  }

  dims validate(const checker& check, const tensor_view<const T, 4>& q,
                const tensor_view<const T, 4>& k, const tensor_view<const T, 4>& v, const gates& g,
                const tensor_view<T, 4>& o, const extras& x,
                const tensor_view<const index_t, 4>* given) const {
    dims d = front::check_attention_qkvo<T>(
        check, q, k, v, o, [this](const checker& c, std::string_view name, index_t H, index_t Hkv) {
          check_heads(c, name, H, Hkv);
        });
    check.shape("g.cmp", g.cmp, {d.B, d.Tn, d.H});
    check.shape("g.slc", g.slc, {d.B, d.Tn, d.H});
    if (opt_.window > 0) {
      check.shape("g.swa", g.swa, {d.B, d.Tn, d.H});
    } else if (g.swa.data()) {
      check.fail("g.swa", "given, but options.window is 0 (no sliding-window branch)");
    }
    if (x.o_cmp.data()) check.shape("x.o_cmp", x.o_cmp, {d.B, d.Tn, d.H, d.V});
    if (x.o_slc.data()) check.shape("x.o_slc", x.o_slc, {d.B, d.Tn, d.H, d.V});
    if (x.o_swa.data()) {
      check.require(opt_.window > 0, "x.o_swa", "given, but options.window is 0");
      check.shape("x.o_swa", x.o_swa, {d.B, d.Tn, d.H, d.V});
      check.inner_contiguous("x.o_swa", x.o_swa);
    }
    if (x.lse_cmp.data()) check.shape("x.lse_cmp", x.lse_cmp, {d.B, d.Tn, d.H});
    if (x.block_indices.data()) {
      check.require(given == nullptr, "x.block_indices",
                    "the selection is given (block_indices): nothing to write");
      check.shape("x.block_indices", x.block_indices, {d.B, d.Tn, d.Hkv, opt_.block_count});
    }
    if (given) {
      check.shape("block_indices", *given, {d.B, d.Tn, d.Hkv, any_extent});
      check.require(given->extent(3) >= 1, "block_indices", "needs at least one slot per row");
    }
    check.no_overlap({range_of("o", o)}, {range_of("q", q), range_of("k", k), range_of("v", v)});
    return d;
  }
  void check_compressed(const checker& check, const dims& d, const extras& x, index_t rows,
                        index_t nb) const {
    if (x.k_cmp.data()) {
      check.shape("x.k_cmp", x.k_cmp, {rows, nb, d.Hkv, d.K});
      check.inner_contiguous("x.k_cmp", x.k_cmp);
    }
    if (x.v_cmp.data()) {
      check.shape("x.v_cmp", x.v_cmp, {rows, nb, d.Hkv, d.V});
      check.inner_contiguous("x.v_cmp", x.v_cmp);
    }
  }
  void check_given(const checker& check, const tensor_view<const index_t, 4>& bi,
                   std::span<const seq> seqs) const {
    const index_t Sg = bi.extent(3), bs = opt_.block_size;
    for (const seq& s : seqs) {
      const index_t nb = (s.len + bs - 1) / bs;
      for (index_t t = s.t0; t < s.t0 + s.len; ++t) {
        for (index_t h = 0; h < bi.extent(2); ++h) {
          for (index_t j = 0; j < Sg; ++j) {
            const index_t c = bi(s.qb, t, h, j);
            const auto where = [&] {
              return " at [" + std::to_string(s.qb) + ", " + std::to_string(t) + ", " +
                     std::to_string(h) + ", " + std::to_string(j) + "]";
            };
            if (c < -1 || c >= nb) {
              check.fail("block_indices",
                         "entries must be -1 (empty) or a block of the sequence "
                         "in [0, " +
                             std::to_string(nb) + "), got " + std::to_string(c) + where());
            }
            for (index_t j2 = 0; j2 < j && c >= 0; ++j2) {
              if (bi(s.qb, t, h, j2) == c) {
                check.fail("block_indices", "a block may appear once per row, got block " +
                                                std::to_string(c) + " twice" + where());
              }
            }
          }
        }
      }
    }
  }
  void check_cache(const checker& check, const dims& d, const nsa_cache<T>& cache) const {
    check_cache(check, d, cache, d.B);
  }
  void check_cache(const checker& check, const dims& d, const nsa_cache<T>& cache,
                   index_t rows) const {
    if (cache.batch() != rows || cache.kv_heads() != d.Hkv || cache.key_dim() != d.K ||
        cache.value_dim() != d.V) {
      check.fail("cache",
                 "expected [sequences, kv heads, K, V] = " +
                     detail::format_shape(std::array<index_t, 4>{rows, d.Hkv, d.K, d.V}) +
                     ", got " +
                     detail::format_shape(std::array<index_t, 4>{
                         cache.batch(), cache.kv_heads(), cache.key_dim(), cache.value_dim()}));
    }
    if (cache.block_size() != opt_.block_size) {
      check.fail("cache", "expected block size " + std::to_string(opt_.block_size) +
                              " (options.block_size), got a cache of block size " +
                              std::to_string(cache.block_size()));
    }
    check_block_count(check, cache.capacity(), "capacity");
  }
  void check_room(const checker& check, const nsa_cache<T>& cache, index_t row, index_t n) const {
    const index_t len = cache.length(row);
    if (len + n > cache.capacity()) {
      check.fail("cache", "capacity " + std::to_string(cache.capacity()) + " exceeded: sequence " +
                              std::to_string(row) + " holds " + std::to_string(len) +
                              " tokens, appending " + std::to_string(n));
    }
  }

  std::span<const seq> batch_seqs(workspace::frame& f, const dims& d) const {
    std::span<seq> seqs = f.take<seq>(d.B);
    for (index_t b = 0; b < d.B; ++b) seqs[static_cast<std::size_t>(b)] = {b, 0, d.Tn, b, 0};
    return seqs;
  }
  std::span<const seq> packed_seqs(workspace::frame& f, const checker& check, const dims& d,
                                   std::span<const index_t> cu) const {
    check.cu_seqlens(cu, d.B, d.Tn);
    std::span<seq> seqs = f.take<seq>(static_cast<index_t>(cu.size()) - 1);
    index_t c0 = 0;
    for (std::size_t n = 0; n + 1 < cu.size(); ++n) {
      const index_t len = cu[n + 1] - cu[n];
      seqs[n] = {0, cu[n], len, static_cast<index_t>(n), c0};
      c0 += len / opt_.block_size;
    }
    return seqs;
  }

  void run(const dims& d, const tensor_view<const T, 4>& q, const tensor_view<const T, 4>& k,
           const tensor_view<const T, 4>& v, const gates& g, const tensor_view<T, 4>& o,
           const extras& x, std::span<const seq> seqs, nsa_cache<T>* cache,
           const tensor_view<const index_t, 4>* given, std::span<const index_t> cu) const {
    namespace kn = kernels::nsa;
    constexpr index_t kl_tile = kn::detail::kl_tile;
    const index_t G = d.H / d.Hkv, bs = opt_.block_size, W = opt_.window;
    const auto ns = seqs.size();
    const auto nsi = static_cast<index_t>(ns);
    auto p = kernel_params(d);
    if (given) p.block_count = given->extent(3);
    const bool kl = kn::keys_along_lanes(p);
    // every piece of scratch below comes from this thread's arena (nothing allocated once it
    // has grown to the call's high-water mark)
    auto frame = thread_workspace().scope();
    std::span<index_t> len0 = frame.take<index_t>(nsi, index_t(0));
    if (cache)
      for (std::size_t n = 0; n < ns; ++n) len0[n] = cache->length(seqs[n].row);

    // window branch first (sliding_window_attention's tiles; with a cache it also appends)
    tensor_view<T, 4> o_swa = x.o_swa;
    if (W > 0) {
      if (!o_swa.data()) o_swa = frame.take_view<T, 4>({d.B, d.Tn, d.H, d.V});
      if (cache && !cu.empty()) {
        swa_->forward_chunked(q, k, v, o_swa, cache->kv(), cu);
      } else if (cache) {
        swa_->forward_chunked(q, k, v, o_swa, cache->kv());
      } else if (!cu.empty()) {
        swa_->forward_chunked(q, k, v, o_swa, cu);
      } else {
        swa_->forward_chunked(q, k, v, o_swa);
      }
    }
    // keys, values and block means of each (sequence, kv head); for groups smaller than a SIMD
    // vector also the key means transposed and (long enough calls) the keys transposed
    struct rows {
      const T *k, *v, *kc, *vc, *kct, *kt;
      index_t ks, vs, kcs, vcs, kcts, kts;
    };
    std::span<rows> src = frame.take<rows>(nsi * d.Hkv);
    if (cache) {
      kv_cache<T>& kv = cache->kv();
      for (std::size_t n = 0; n < ns; ++n) {
        const seq& s = seqs[n];
        if (W == 0) {  // (with a window, sliding_window_attention appended the rows)
          for (index_t h = 0; h < d.Hkv; ++h) {
            for (index_t t = 0; t < s.len; ++t) {
              std::copy_n(k.ptr({s.qb, s.t0 + t, h, 0}), d.K, kv.key_row(s.row, h, len0[n] + t));
              std::copy_n(v.ptr({s.qb, s.t0 + t, h, 0}), d.V, kv.value_row(s.row, h, len0[n] + t));
            }
          }
          kv.set_length(s.row, len0[n] + s.len);
        }
        cache->complete_blocks(s.row, len0[n], len0[n] + s.len);
        for (index_t h = 0; h < d.Hkv; ++h) {
          src[n * static_cast<std::size_t>(d.Hkv) + static_cast<std::size_t>(h)] = {
              kv.key_row(s.row, h, 0),
              kv.value_row(s.row, h, 0),
              cache->block_key_row(s.row, h, 0),
              cache->block_value_row(s.row, h, 0),
              cache->block_keys_t(s.row, h),
              nullptr,
              d.K,
              d.V,
              d.K,
              d.V,
              cache->block_keys_t_stride(),
              0};
        }
      }
    } else {
      const index_t rows_b = seqs.empty() ? 0 : (cu.empty() ? d.B : 1);
      const index_t nb = cu.empty() ? d.Tn / bs : (seqs.back().c0 + seqs.back().len / bs);
      tensor_view<T, 4> kc = x.k_cmp, vc = x.v_cmp;
      if (!kc.data())
        kc = frame.take_view<T, 4>(
            {std::max<index_t>(rows_b, 1), std::max<index_t>(nb, 1), d.Hkv, d.K});
      if (!vc.data())
        vc = frame.take_view<T, 4>(
            {std::max<index_t>(rows_b, 1), std::max<index_t>(nb, 1), d.Hkv, d.V});
      // block means, one (sequence, block) per index, every kv head
      std::span<index_t> first = frame.take<index_t>(nsi + 1);
      first[0] = 0;
      for (std::size_t n = 0; n < ns; ++n) first[n + 1] = first[n] + seqs[n].len / bs;
      parallel_for(first[ns] * d.Hkv, [&](index_t i) {
        const index_t h = i % d.Hkv, gb = i / d.Hkv;
        const std::size_t n = static_cast<std::size_t>(
            std::upper_bound(first.begin(), first.end(), gb) - first.begin() - 1);
        const seq& s = seqs[n];
        const index_t c = gb - first[n];
        kn::block_mean(k.ptr({s.qb, s.t0 + c * bs, h, 0}), k.stride(1), bs, d.K,
                       kc.ptr({s.qb, s.c0 + c, h, 0}));
        kn::block_mean(v.ptr({s.qb, s.t0 + c * bs, h, 0}), v.stride(1), bs, d.V,
                       vc.ptr({s.qb, s.c0 + c, h, 0}));
      });
      // transposed key means [K, ldc] per (sequence, kv head) (keys along the lanes only)
      index_t ldc = 0;
      T* kct = nullptr;
      if (kl) {
        index_t nbmax = 1;
        for (const seq& s : seqs) nbmax = std::max(nbmax, s.len / bs);
        ldc = (nbmax + kl_tile - 1) / kl_tile * kl_tile;
        kct = frame.take<T>(nsi * d.Hkv * d.K * ldc, T(0)).data();
      }
      for (std::size_t n = 0; n < ns; ++n) {
        const seq& s = seqs[n];
        for (index_t h = 0; h < d.Hkv; ++h) {
          T* ct = kl ? kct + (static_cast<index_t>(n) * d.Hkv + h) * d.K * ldc : nullptr;
          if (kl)
            for (index_t c = 0; c < s.len / bs; ++c)
              for (index_t dd = 0; dd < d.K; ++dd) ct[dd * ldc + c] = kc(s.qb, s.c0 + c, h, dd);
          src[n * static_cast<std::size_t>(d.Hkv) + static_cast<std::size_t>(h)] = {
              k.ptr({s.qb, s.t0, h, 0}),
              v.ptr({s.qb, s.t0, h, 0}),
              kc.ptr({s.qb, s.c0, h, 0}),
              vc.ptr({s.qb, s.c0, h, 0}),
              ct,
              nullptr,
              k.stride(1),
              v.stride(1),
              kc.stride(1),
              vc.stride(1),
              ldc,
              0};
        }
      }
    }
    // Keys along the lanes: the keys of each (sequence, kv head) transposed once, [K, ldk], when
    // the call reads them often enough (else each selected tile is transposed on the fly, as in
    // decode: the same values, so the same results)
    if (kl) {
      index_t ldk = 0;
      bool pre = false;
      for (std::size_t n = 0; n < ns; ++n) {
        const index_t total = len0[n] + seqs[n].len;
        ldk = std::max(ldk, (total + 2 * kl_tile - 1) / kl_tile * kl_tile);
        pre = pre || 4 * total <= seqs[n].len * p.block_count * bs;
      }
      if (pre) {
        T* kt = frame.take<T>(nsi * d.Hkv * d.K * ldk).data();
        const index_t tiles = ldk / kl_tile;
        parallel_for(nsi * d.Hkv * tiles, [&](index_t i) {
          const index_t nh = i / tiles, j0 = i % tiles * kl_tile;
          const rows& r = src[static_cast<std::size_t>(nh)];
          const std::size_t n = static_cast<std::size_t>(nh / d.Hkv);
          const index_t total = len0[n] + seqs[n].len;
          T* dst = kt + nh * d.K * ldk;
          for (index_t j = j0; j < j0 + kl_tile; ++j) {
            const T* kj = r.k + j * r.ks;
            for (index_t dd = 0; dd < d.K; ++dd) dst[dd * ldk + j] = j < total ? kj[dd] : T(0);
          }
        });
        for (index_t nh = 0; nh < nsi * d.Hkv; ++nh) {
          src[static_cast<std::size_t>(nh)].kt = kt + nh * d.K * ldk;
          src[static_cast<std::size_t>(nh)].kts = ldk;
        }
      }
    }
    // one (token, kv head): the kernel, then the gated sum and the optional outputs
    const auto one_token = [&](std::size_t n, index_t i, index_t h, kn::scratch<T>& w) {
      const seq& s = seqs[n];
      const rows& r = src[n * static_cast<std::size_t>(d.Hkv) + static_cast<std::size_t>(h)];
      const index_t t = s.t0 + i;  // token in the input
      kn::token_problem<T> tp;
      tp.q = q.ptr({s.qb, t, h * G, 0});
      tp.q_stride = q.stride(2);
      tp.kc = r.kc;
      tp.kc_stride = r.kcs;
      tp.vc = r.vc;
      tp.vc_stride = r.vcs;
      tp.k = r.k;
      tp.k_stride = r.ks;
      tp.v = r.v;
      tp.v_stride = r.vs;
      tp.kct = r.kct;
      tp.kct_stride = r.kcts;
      tp.kt = r.kt;
      tp.kt_stride = r.kts;
      tp.pos = len0[n] + i;
      if (given) {
        tp.given = given->ptr({s.qb, t, h, 0});
        tp.given_n = p.block_count;
        // a view's last dimension may be strided: gather it
        if (given->stride(3) != 1) {
          for (index_t j = 0; j < p.block_count; ++j)
            w.sel[static_cast<std::size_t>(j)] = (*given)(s.qb, t, h, j);
          tp.given = w.sel.data();
        }
      }
      kn::token(tp, p, w);
      for (index_t gi = 0; gi < G; ++gi) {
        const index_t hq = h * G + gi;
        const T* oc = w.o_cmp.data() + gi * d.V;
        const T* os = w.o_slc.data() + gi * d.V;
        const T* ow = W > 0 ? o_swa.ptr({s.qb, t, hq, 0}) : nullptr;
        const T gc = g.cmp(s.qb, t, hq), gs = g.slc(s.qb, t, hq);
        const T gw = W > 0 ? g.swa(s.qb, t, hq) : T(0);
        T* out = o.ptr({s.qb, t, hq, 0});
        for (index_t c = 0; c < d.V; ++c)
          out[c] = combine(gc, oc[c], gs, os[c], W > 0, gw, W > 0 ? ow[c] : T(0));
        if (x.o_cmp.data())
          for (index_t c = 0; c < d.V; ++c) x.o_cmp(s.qb, t, hq, c) = oc[c];
        if (x.o_slc.data())
          for (index_t c = 0; c < d.V; ++c) x.o_slc(s.qb, t, hq, c) = os[c];
        if (x.lse_cmp.data()) x.lse_cmp(s.qb, t, hq) = w.lse[static_cast<std::size_t>(gi)];
      }
      if (x.block_indices.data())
        for (index_t j = 0; j < p.block_count; ++j)
          x.block_indices(s.qb, t, h, j) = w.sel[static_cast<std::size_t>(j)];
    };
    // Work items: runs of `chunk` consecutive tokens of one sequence and kv head (consecutive
    // tokens mostly select the same blocks: their keys stay in cache), ordered per sequence
    // 0, n-1, 1, n-2, ... so that the static split balances the cost growing with t.
    constexpr index_t chunk = 16;
    struct item {
      std::size_t n;
      index_t i0, i1;
    };
    index_t n_items = 0, max_blocks = 1;
    for (std::size_t n = 0; n < ns; ++n) {
      n_items += (seqs[n].len + chunk - 1) / chunk;
      max_blocks = std::max(max_blocks, (len0[n] + seqs[n].len) / bs + 1);
    }
    std::span<item> items = frame.take<item>(n_items);
    std::size_t at = 0;
    for (std::size_t n = 0; n < ns; ++n) {
      const index_t len = seqs[n].len, nc = (len + chunk - 1) / chunk;
      for (index_t a = 0, b = nc - 1; a <= b; ++a, --b) {
        items[at++] = {n, a * chunk, std::min(len, (a + 1) * chunk)};
        if (a != b) items[at++] = {n, b * chunk, std::min(len, (b + 1) * chunk)};
      }
    }
    const auto slots = static_cast<std::size_t>(max_slots());
    std::span<kn::scratch<T>> work = frame.take<kn::scratch<T>>(static_cast<index_t>(slots));
    for (auto& w : work) w.take(frame, p, max_blocks);
    // kv head major: the items of one kv head run back to back, so its keys and values (and
    // their transposed copy) stay in the caches while its tokens gather their blocks (with 16
    // kv heads interleaved, T = 8192 streamed 16x the data from DRAM: 8x slower)
    parallel_for_with_slot(n_items * d.Hkv, [&](index_t idx, int tid) {
      const item& it = items[static_cast<std::size_t>(idx % n_items)];
      for (index_t i = it.i0; i < it.i1; ++i)
        one_token(it.n, i, idx / n_items, work[static_cast<std::size_t>(tid)]);
    });
  }

  options opt_;
  std::optional<sliding_window_attention<T>> swa_;
};

}  // namespace seqmix
