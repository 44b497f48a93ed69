// SPDX-License-Identifier: MIT
// softmax_attention<T>: causal softmax attention (docs/math.md §5), the O(N²) baseline every linear
// mixer is compared with. GQA, optional window W, optional per-head sink logit, packed
// variable-length input.
//
//   logit_tj = s q_t · k_j                for j <= t and t - j < W   (W = ∞ when absent)
//   o_t = Σ_j exp(logit_tj - m_t) v_j / (Σ_j exp(logit_tj - m_t) + [exp(sink_h - m_t)])
//
// Legend: B batch, T tokens, H query heads, Hkv key/value heads (query head h reads kv head
// h / (H / Hkv), H a multiple of Hkv), K key dim, V value dim, W window, L tokens already in a
// cache, N packed sequences.
//
// Forms (see kernels/attention.hpp for the engine):
//  - forward_chunked: flash-style tiles with a running max and sum. Time O(T·min(T, W)·(K+V))
//    per head; memory O(T·Hkv·(K+V)) for a head-major copy of k and v (when their rows are
//    strided, i.e. Hkv > 1) + O(64·(K+V+chunk_size)) scratch per thread; never a T×T matrix.
//    All of it, with the call's segment and job lists, comes from the calling thread's workspace
//    arena (core/workspace.hpp): a repeated prefill of one shape allocates nothing.
//    Measured (B=1, H=8, D=128, T=2048..8192, fp32): 77-87 GFLOP/s on 1 thread, 152-165 on 2
//    (66-71 % of the 2-core FMA peak), causal FLOP = 2·H·T²·D.
//    With a kv_cache it is the prefill: the T new tokens attend over the L cached ones and
//    themselves, and are appended.
//  - step / forward_recurrent: decode against the kv_cache (the recurrent "state"): one token
//    per sequence, appended, then attending over min(L+1, W) cached rows. Time O(min(L, W)·(K+V))
//    per head and token, memory-bound; step allocates nothing (its split partials live in 64 KiB
//    on the stack). Split-KV: each (sequence, kv head) reads its rows once for its G query heads,
//    the cache length is split into up to 16 pieces computed in parallel and merged in a fixed
//    order (kernels/attention.hpp run_row_jobs), so B = 1 with few kv heads uses every thread.
//    step(..., cache, rows) is the continuous-batching step: token i into cache row rows[i] of
//    a cache of any batch (the attention layers' state-index decode).
//  - a prefill of at most 16 new tokens (query_tile / 4) per sequence goes through the same
//    row path instead of the 64-row query tiles (measured 1.5x faster at 16 tokens and 3.6x at
//    4 into a 32k cache, D = 128, 1 thread, on a quiet 16-core Xeon).
//  - prefill with forward_chunked then step()s gives the outputs of one forward_chunked over the
//    whole sequence (up to float rounding).
// The "state" is the cache: kv_cache::full grows with T (capacity set by the user, overflow is
// an error), kv_cache::ring keeps the last W tokens (constant memory; windowed attention only).
//
// Checks (every entry, before anything is written): messages name the entry the user called
// (forward, not the forward_chunked or step it dispatches to; sliding_window_attention's own
// names through it) and its arguments (q1, k1, ... for step); o must not share memory with q, k,
// v or the cache's storage, and q, k, v not with the cache (which is written): in place is not
// supported and is rejected (checker::no_overlap). options: window >= 1, chunk_size > 0, scale
// finite, sink logits finite or -inf (the first bad one reported with its index).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <seqmix/core/error.hpp>
#include <seqmix/core/parallel.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/core/workspace.hpp>
#include <seqmix/kernels/attention.hpp>
#include <seqmix/mixers/detail/front_checks.hpp>
#include <seqmix/mixers/kv_cache.hpp>

namespace seqmix {

template <class T>
class softmax_attention {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "softmax_attention<T>: T is float or double");

 public:
  struct options {
    std::optional<T> scale{};         ///< s; default K^-1/2
    std::optional<index_t> window{};  ///< W >= 1: token t sees keys t-W+1 .. t; absent: all
    std::vector<T> sink{};            ///< empty, or [H] per-head sink logits (finite or -inf)
    index_t chunk_size = 64;          ///< key tile of the chunked form (> 0)
  };

  softmax_attention() : softmax_attention(options{}) {}
  explicit softmax_attention(options opt) : softmax_attention(std::move(opt), false) {}

 private:
  template <class U>
  friend class sliding_window_attention;
  // sliding: messages name sliding_window_attention's entries (it is a front over this class)
  softmax_attention(options opt, bool sliding) : opt_(std::move(opt)), sliding_(sliding) {
    checker check{sliding_ ? "sliding_window_attention" : "softmax_attention"};
    if (opt_.window) {
      check.require(
          *opt_.window >= 1, "options.window",
          "must be >= 1 (a token always sees itself), got " + std::to_string(*opt_.window));
    }
    check.require(opt_.chunk_size > 0, "options.chunk_size",
                  "must be > 0, got " + std::to_string(opt_.chunk_size));
    if (opt_.scale) check.finite_value("options.scale", *opt_.scale);
    for (std::size_t h = 0; h < opt_.sink.size(); ++h) {
      const T x = opt_.sink[h];
      if (std::isnan(x) || (std::isinf(x) && x > 0)) {
        check.fail("options.sink", "sink logits must be finite or -inf, got " +
                                       detail::format_value(x) + " at [" + std::to_string(h) + "]");
      }
    }
  }

 public:
  const options& get_options() const noexcept { return opt_; }
  /// W, or 0 when unbounded.
  index_t window() const noexcept { return opt_.window ? *opt_.window : 0; }

  /// A cache for decode of at most `capacity` tokens per sequence: a ring of the last W tokens
  /// when the window is set and W < capacity (memory constant in T), else a full cache of
  /// `capacity` rows (a window W >= capacity never excludes a cached token, so a full cache is
  /// exact and no larger than needed: a window of 1e15 costs `capacity` rows, not 1e15).
  kv_cache<T> make_cache(index_t B, index_t Hkv, index_t K, index_t V, index_t capacity) const {
    const checker check{name(entry::make_cache)};
    front::check_sizes(check, {"B", "Hkv", "K", "V", "capacity"}, {B, Hkv, K, V, capacity});
    if (opt_.window && *opt_.window < capacity)
      return kv_cache<T>::ring(B, Hkv, K, V, *opt_.window);
    return kv_cache<T>::full(B, Hkv, K, V, capacity);
  }

  /// Chunked (flash-style) forward over whole sequences.
  /// q: [B,T,H,K] in; k: [B,T,Hkv,K] in; v: [B,T,Hkv,V] in; o: [B,T,H,V] out.
  void forward_chunked(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                       tensor_view<const T, 4> v, tensor_view<T, 4> o) const {
    chunked(checker{name(entry::forward_chunked)}, q, k, v, o);
  }

  /// Packed variable-length forward: B == 1, sequence n is tokens cu_seqlens[n] ..
  /// cu_seqlens[n+1]-1; nothing crosses a boundary (windows included).
  void forward_chunked(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                       tensor_view<const T, 4> v, tensor_view<T, 4> o,
                       std::span<const index_t> cu_seqlens) const {
    const checker check{name(entry::forward_chunked)};
    const dims d = validate(check, q, k, v, o);
    auto frame = thread_workspace().scope();
    run_chunked(d, q, k, v, o, varlen_seqs(check, d, cu_seqlens, frame), nullptr);
  }

  /// Prefill: the T new tokens of each sequence attend over the cache's tokens and themselves,
  /// and are appended to `cache` ([B] sequences; kv heads, K, V as k and v).
  void forward_chunked(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                       tensor_view<const T, 4> v, tensor_view<T, 4> o, kv_cache<T>& cache) const {
    const checker check{name(entry::forward_chunked)};
    prefill(check, validate(check, q, k, v, o), q, k, v, o, cache);
  }

  /// Packed variable-length prefill: sequence n appends to row n of `cache` ([N] sequences).
  void forward_chunked(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                       tensor_view<const T, 4> v, tensor_view<T, 4> o, kv_cache<T>& cache,
                       std::span<const index_t> cu_seqlens) const {
    const checker check{name(entry::forward_chunked)};
    const dims d = validate(check, q, k, v, o);
    auto frame = thread_workspace().scope();
    const std::span<const seq> seqs = varlen_seqs(check, d, cu_seqlens, frame);
    validate_cache(check, d, cache, static_cast<index_t>(cu_seqlens.size()) - 1, seqs);
    check_cache_overlap(check, {"q", "k", "v", "o"}, q, k, v, o, cache);
    run_chunked(d, q, k, v, o, seqs, &cache);
  }

  /// Decode one token per sequence: appends k1, v1 to `cache`, then attends over it.
  /// q1: [B,H,K] in; k1: [B,Hkv,K] in; v1: [B,Hkv,V] in; o1: [B,H,V] out; cache: [B] sequences,
  /// updated in place. Allocates nothing.
  void step(tensor_view<const T, 3> q1, tensor_view<const T, 3> k1, tensor_view<const T, 3> v1,
            tensor_view<T, 3> o1, kv_cache<T>& cache) const {
    const checker check{name(entry::step)};
    const dims d = validate_step(check, q1, k1, v1, o1);
    check_cache_geometry(check, d, cache, d.B);
    for (index_t b = 0; b < d.B; ++b) check_room(check, cache, b, 1);
    check_cache_overlap(check, {"q1", "k1", "v1", "o1"}, q1, k1, v1, o1, cache);
    step_unchecked(d, q1, k1, v1, o1, cache, {});
  }
  /// Continuous batching: token i of q1, k1, v1 (shapes as step) is appended to cache row
  /// rows[i] and attends over that row; rows are B distinct rows of a cache of any batch, the
  /// other rows are untouched. Row rows[i]'s output is bitwise the one step() gives on a cache
  /// holding only that sequence. Allocates nothing.
  void step(tensor_view<const T, 3> q1, tensor_view<const T, 3> k1, tensor_view<const T, 3> v1,
            tensor_view<T, 3> o1, kv_cache<T>& cache, std::span<const index_t> rows) const {
    const checker check{name(entry::step)};
    const dims d = validate_step(check, q1, k1, v1, o1);
    check_cache_geometry(check, d, cache, cache.batch());
    front::check_rows(check, rows, d.B, cache.batch());
    for (index_t b : rows) check_room(check, cache, b, 1);
    check_cache_overlap(check, {"q1", "k1", "v1", "o1"}, q1, k1, v1, o1, cache);
    step_unchecked(d, q1, k1, v1, o1, cache, rows);
  }

  /// Recurrent form: T decode steps (token loop), appending to `cache`.
  /// q: [B,T,H,K] in; k: [B,T,Hkv,K] in; v: [B,T,Hkv,V] in; o: [B,T,H,V] out.
  void forward_recurrent(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                         tensor_view<const T, 4> v, tensor_view<T, 4> o, kv_cache<T>& cache) const {
    const checker check{name(entry::forward_recurrent)};
    const dims d = validate(check, q, k, v, o);
    check_cache_geometry(check, d, cache, d.B);
    for (index_t b = 0; b < d.B; ++b) check_room(check, cache, b, d.Tn);
    check_cache_overlap(check, {"q", "k", "v", "o"}, q, k, v, o, cache);
    const dims d1{d.B, 1, d.H, d.Hkv, d.K, d.V};
    for (index_t t = 0; t < d.Tn; ++t) {
      step_unchecked(d1, q.template select<1>(t), k.template select<1>(t), v.template select<1>(t),
                     o.template select<1>(t), cache, {});
    }
  }

  /// Recurrent form over whole sequences with a cache of its own (ring of W or full of T).
  void forward_recurrent(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                         tensor_view<const T, 4> v, tensor_view<T, 4> o) const {
    const checker check{name(entry::forward_recurrent)};
    const dims d = validate(check, q, k, v, o);
    // a window of at least T never drops a key here: a full cache of T rows is the same
    // attention, without a ring of W rows (W = 1e15 would not fit in memory)
    kv_cache<T> cache = opt_.window && *opt_.window < d.Tn
                            ? make_cache(d.B, d.Hkv, d.K, d.V, d.Tn)
                            : kv_cache<T>::full(d.B, d.Hkv, d.K, d.V, d.Tn);
    forward_recurrent(q, k, v, o, cache);
  }

  /// Picks the form: chunked for whole sequences (tiles are faster for any T > 1).
  void forward(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
               tensor_view<T, 4> o) const {
    chunked(checker{name(entry::forward)}, q, k, v, o);
  }
  /// With a cache: one token per sequence decodes as step does, longer inputs prefill (chunked).
  void forward(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
               tensor_view<T, 4> o, kv_cache<T>& cache) const {
    const checker check{name(entry::forward)};
    const dims d = validate(check, q, k, v, o);
    if (d.Tn == 1) {
      check_cache_geometry(check, d, cache, d.B);
      for (index_t b = 0; b < d.B; ++b) check_room(check, cache, b, 1);
      check_cache_overlap(check, {"q", "k", "v", "o"}, q, k, v, o, cache);
      step_unchecked(d, q.template select<1>(0), k.template select<1>(0), v.template select<1>(0),
                     o.template select<1>(0), cache, {});
    } else {
      prefill(check, d, q, k, v, o, cache);
    }
  }

 private:
  using dims = front::attention_dims;
  // A sequence of at most this many new tokens is a short prefill (split-KV row path): below a
  // quarter of the query tile, the tile's padding rows cost more than the row path's slower
  // per-row arithmetic.
  static constexpr index_t short_prefill_tokens = kernels::attention::query_tile<T>() / 4;
  // one sequence: tokens t0 .. t0+len-1 of batch row qb of the inputs; cache row `row`
  struct seq {
    index_t qb, t0, len, row;
  };

  T scale_for(index_t K) const { return opt_.scale ? *opt_.scale : T(1) / std::sqrt(T(K)); }

  enum class entry { forward_chunked, forward_recurrent, forward, step, make_cache };
  // The public name of an entry: sliding_window_attention's when this is its implementation.
  const char* name(entry e) const {
    static constexpr const char* softmax[] = {
        "softmax_attention::forward_chunked", "softmax_attention::forward_recurrent",
        "softmax_attention::forward", "softmax_attention::step", "softmax_attention::make_cache"};
    static constexpr const char* sliding[] = {
        "sliding_window_attention::forward_chunked", "sliding_window_attention::forward_recurrent",
        "sliding_window_attention::forward", "sliding_window_attention::step",
        "sliding_window_attention::make_cache"};
    return (sliding_ ? sliding : softmax)[static_cast<int>(e)];
  }

  void chunked(const checker& check, const tensor_view<const T, 4>& q,
               const tensor_view<const T, 4>& k, const tensor_view<const T, 4>& v,
               const tensor_view<T, 4>& o) const {
    const dims d = validate(check, q, k, v, o);
    check.no_overlap({range_of("o", o)}, {range_of("q", q), range_of("k", k), range_of("v", v)});
    auto frame = thread_workspace().scope();
    run_chunked(d, q, k, v, o, batch_seqs(d, frame), nullptr);
  }
  void prefill(const checker& check, const dims& d, const tensor_view<const T, 4>& q,
               const tensor_view<const T, 4>& k, const tensor_view<const T, 4>& v,
               const tensor_view<T, 4>& o, kv_cache<T>& cache) const {
    auto frame = thread_workspace().scope();
    const std::span<const seq> seqs = batch_seqs(d, frame);
    validate_cache(check, d, cache, d.B, seqs);
    check_cache_overlap(check, {"q", "k", "v", "o"}, q, k, v, o, cache);
    run_chunked(d, q, k, v, o, seqs, &cache);
  }
  /// o against q, k, v, the cache's key and value storage (written) against q, k, v and o.
  /// Call after check_cache_geometry (the cache then has rows).
  template <std::size_t R>
  static void check_cache_overlap(const checker& check, std::array<std::string_view, 4> n,
                                  const tensor_view<const T, R>& q,
                                  const tensor_view<const T, R>& k,
                                  const tensor_view<const T, R>& v, const tensor_view<T, R>& o,
                                  kv_cache<T>& cache) {
    const index_t B = cache.batch(), Hkv = cache.kv_heads(), R_ = cache.capacity();
    const auto span = [&](std::string_view name, const T* first, const T* last, index_t width) {
      return memory_range{
          name, reinterpret_cast<std::uintptr_t>(first),
          reinterpret_cast<std::uintptr_t>(last) + static_cast<std::uintptr_t>(width) * sizeof(T)};
    };
    const memory_range keys = span("cache", cache.key_row(0, 0, 0),
                                   cache.key_row(B - 1, Hkv - 1, R_ - 1), cache.key_dim());
    const memory_range values = span("cache", cache.value_row(0, 0, 0),
                                     cache.value_row(B - 1, Hkv - 1, R_ - 1), cache.value_dim());
    check.no_overlap({range_of(n[3], o), keys, values},
                     {range_of(n[0], q), range_of(n[1], k), range_of(n[2], v)});
  }

  // Checks below build their message only on failure: step() must not allocate.
  void check_heads(const checker& check, std::string_view k_name, index_t H, index_t Hkv) const {
    if (Hkv < 1 || H % Hkv != 0) {
      check.fail(k_name, "query heads (" + std::to_string(H) +
                             ") must be a multiple of key/value heads (" + std::to_string(Hkv) +
                             ")");
    }
    if (!opt_.sink.empty() && static_cast<index_t>(opt_.sink.size()) != H) {
      check.fail("options.sink", "must be empty or hold one logit per query head (" +
                                     std::to_string(H) + "), got " +
                                     std::to_string(opt_.sink.size()));
    }
  }

  dims validate(const checker& check, const tensor_view<const T, 4>& q,
                const tensor_view<const T, 4>& k, const tensor_view<const T, 4>& v,
                const tensor_view<T, 4>& o) const {
    dims d = front::check_attention_qkvo<T>(
        check, q, k, v, o, [this](const checker& c, std::string_view name, index_t H, index_t Hkv) {
          check_heads(c, name, H, Hkv);
        });
    return d;
  }

  // The sequences of a call, in workspace memory of `frame` (the caller's, open while they are
  // used): whole batch rows, or the packed sequences of cu_seqlens.
  static std::span<const seq> batch_seqs(const dims& d, workspace::frame& frame) {
    const std::span<seq> seqs = frame.take<seq>(d.B);
    for (index_t b = 0; b < d.B; ++b) seqs[static_cast<std::size_t>(b)] = {b, 0, d.Tn, b};
    return seqs;
  }
  std::span<const seq> varlen_seqs(const checker& check, const dims& d, std::span<const index_t> cu,
                                   workspace::frame& frame) const {
    check.cu_seqlens(cu, d.B, d.Tn);
    const std::span<seq> seqs = frame.take<seq>(static_cast<index_t>(cu.size()) - 1);
    for (std::size_t n = 0; n + 1 < cu.size(); ++n) {
      seqs[n] = {0, cu[n], cu[n + 1] - cu[n], static_cast<index_t>(n)};
    }
    return seqs;
  }

  void check_cache_geometry(const checker& check, const dims& d, const kv_cache<T>& cache,
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
    if (cache.is_ring() && (window() == 0 || cache.capacity() < window())) {
      check.fail("cache",
                 "a ring cache of " + std::to_string(cache.capacity()) +
                     " rows needs a mixer whose window W is set and <= the ring size (W = " +
                     std::to_string(window()) + ")");
    }
  }
  void check_room(const checker& check, const kv_cache<T>& cache, index_t row, index_t n) const {
    if (cache.is_ring()) return;
    const index_t len = cache.length(row);
    if (len + n > cache.capacity()) {
      check.fail("cache", "capacity " + std::to_string(cache.capacity()) + " exceeded: sequence " +
                              std::to_string(row) + " holds " + std::to_string(len) +
                              " tokens, appending " + std::to_string(n) +
                              " (grow it with kv_cache::reserve)");
    }
  }
  void validate_cache(const checker& check, const dims& d, const kv_cache<T>& cache, index_t rows,
                      std::span<const seq> seqs) const {
    check_cache_geometry(check, d, cache, rows);
    for (const seq& s : seqs) check_room(check, cache, s.row, s.len);
  }

  // step's shape checks (q1 [B,H,K], k1 [B,Hkv,K], v1 [B,Hkv,V], o1 [B,H,V])
  dims validate_step(const checker& check, const tensor_view<const T, 3>& q1,
                     const tensor_view<const T, 3>& k1, const tensor_view<const T, 3>& v1,
                     const tensor_view<T, 3>& o1) const {
    return front::check_attention_qkvo3<T>(
        check, {"q1", "k1", "v1", "o1"}, q1, k1, v1, o1,
        [this](const checker& c, std::string_view name, index_t H, index_t Hkv) {
          check_heads(c, name, H, Hkv);
        });
  }
  kernels::attention::params<T> kernel_params(const dims& d) const {
    kernels::attention::params<T> p;
    p.key_dim = d.K;
    p.value_dim = d.V;
    p.scale = scale_for(d.K);
    p.window = window();
    p.key_tile = opt_.chunk_size;
    return p;
  }
  T sink_of(index_t h) const {
    return opt_.sink.empty() ? -std::numeric_limits<T>::infinity()
                             : opt_.sink[static_cast<std::size_t>(h)];
  }

  void run_chunked(const dims& d, const tensor_view<const T, 4>& q,
                   const tensor_view<const T, 4>& k, const tensor_view<const T, 4>& v,
                   const tensor_view<T, 4>& o, std::span<const seq> seqs,
                   kv_cache<T>* cache) const {
    using kernels::attention::segment;
    const index_t G = d.H / d.Hkv;
    // Every per-call buffer from this thread's arena (returned at the end of the call): a
    // repeated prefill of one shape allocates nothing. The parallel loops below only write the
    // head-major copies taken here; no worker takes from this arena.
    auto frame = thread_workspace().scope();
    const auto nseq = static_cast<index_t>(seqs.size());
    const std::span<segment<T>> seg_store = frame.take<segment<T>>(nseq * d.H);
    std::size_t nsegs = 0;
    // Keys/values of each (sequence, kv head): the inputs themselves (no cache), the cache rows
    // (full cache: append, then read L + len rows), or a gathered copy of the ring's last W-1
    // rows followed by the new ones (ring: the window may wrap).
    const std::span<const T*> kp = frame.take<const T*>(nseq * d.Hkv);
    const std::span<const T*> vp = frame.take<const T*>(nseq * d.Hkv);
    const std::span<index_t> pos0 = frame.take<index_t>(nseq, index_t(0));
    index_t ks = k.stride(1), vs = v.stride(1);
    tensor_view<T, 4> gk, gv;  // ring only: [sequences, Hkv, keep + len, K / V]
    for (std::size_t n = 0; n < seqs.size(); ++n) {
      const seq& s = seqs[n];
      for (index_t h = 0; h < d.Hkv; ++h) {
        kp[n * static_cast<std::size_t>(d.Hkv) + static_cast<std::size_t>(h)] =
            k.ptr({s.qb, s.t0, h, 0});
        vp[n * static_cast<std::size_t>(d.Hkv) + static_cast<std::size_t>(h)] =
            v.ptr({s.qb, s.t0, h, 0});
      }
    }
    tensor_view<T, 4> pk, pv;  // no cache, strided rows: [B, Hkv, T, K / V] head-major copies
    if (!cache && (ks != d.K || vs != d.V)) {
      // The rows of one head sit H·D apart in [B, T, H, D]; at D = 128, H = 8 that is 4 KiB, so
      // a tile's 64 key rows share a few L1 sets and evict each other. One head-major copy
      // (O(T·D), memory-bound) made T = 8192 prefill 27 % faster on this machine.
      pk = frame.take_view<T, 4>({d.B, d.Hkv, d.Tn, d.K});
      pv = frame.take_view<T, 4>({d.B, d.Hkv, d.Tn, d.V});
      parallel_for(d.B * d.Hkv, [&](index_t n) {
        const index_t b = n / d.Hkv, h = n % d.Hkv;
        for (index_t t = 0; t < d.Tn; ++t) {
          std::copy_n(k.ptr({b, t, h, 0}), d.K, pk.ptr({b, h, t, 0}));
          std::copy_n(v.ptr({b, t, h, 0}), d.V, pv.ptr({b, h, t, 0}));
        }
      });
      ks = d.K;
      vs = d.V;
      for (std::size_t n = 0; n < seqs.size(); ++n) {
        for (index_t h = 0; h < d.Hkv; ++h) {
          kp[n * static_cast<std::size_t>(d.Hkv) + static_cast<std::size_t>(h)] =
              pk.ptr({seqs[n].qb, h, seqs[n].t0, 0});
          vp[n * static_cast<std::size_t>(d.Hkv) + static_cast<std::size_t>(h)] =
              pv.ptr({seqs[n].qb, h, seqs[n].t0, 0});
        }
      }
    } else if (cache && !cache->is_ring()) {
      ks = d.K;
      vs = d.V;
      for (std::size_t n = 0; n < seqs.size(); ++n) {
        const seq& s = seqs[n];
        const index_t len0 = cache->length(s.row);
        pos0[n] = len0;
        for (index_t h = 0; h < d.Hkv; ++h) {
          for (index_t t = 0; t < s.len; ++t) {
            std::copy_n(k.ptr({s.qb, s.t0 + t, h, 0}), d.K, cache->key_row(s.row, h, len0 + t));
            std::copy_n(v.ptr({s.qb, s.t0 + t, h, 0}), d.V, cache->value_row(s.row, h, len0 + t));
          }
          kp[n * static_cast<std::size_t>(d.Hkv) + static_cast<std::size_t>(h)] =
              cache->key_row(s.row, h, 0);
          vp[n * static_cast<std::size_t>(d.Hkv) + static_cast<std::size_t>(h)] =
              cache->value_row(s.row, h, 0);
        }
      }
    } else if (cache) {
      const index_t R = cache->capacity(), W = window();
      index_t rows = 0;
      for (std::size_t n = 0; n < seqs.size(); ++n) {
        pos0[n] = std::min(cache->length(seqs[n].row), W - 1);
        rows = std::max(rows, pos0[n] + seqs[n].len);
      }
      gk = frame.take_view<T, 4>({nseq, d.Hkv, rows, d.K});
      gv = frame.take_view<T, 4>({nseq, d.Hkv, rows, d.V});
      ks = d.K;
      vs = d.V;
      for (std::size_t n = 0; n < seqs.size(); ++n) {
        const seq& s = seqs[n];
        const index_t len0 = cache->length(s.row), keep = pos0[n];
        const auto ni = static_cast<index_t>(n);
        for (index_t h = 0; h < d.Hkv; ++h) {
          for (index_t r = 0; r < keep; ++r) {  // positions len0-keep .. len0-1, in order
            const index_t slot = (len0 - keep + r) % R;
            std::copy_n(cache->key_row(s.row, h, slot), d.K, gk.ptr({ni, h, r, 0}));
            std::copy_n(cache->value_row(s.row, h, slot), d.V, gv.ptr({ni, h, r, 0}));
          }
          for (index_t t = 0; t < s.len; ++t) {
            std::copy_n(k.ptr({s.qb, s.t0 + t, h, 0}), d.K, gk.ptr({ni, h, keep + t, 0}));
            std::copy_n(v.ptr({s.qb, s.t0 + t, h, 0}), d.V, gv.ptr({ni, h, keep + t, 0}));
          }
          kp[n * static_cast<std::size_t>(d.Hkv) + static_cast<std::size_t>(h)] =
              gk.ptr({ni, h, 0, 0});
          vp[n * static_cast<std::size_t>(d.Hkv) + static_cast<std::size_t>(h)] =
              gv.ptr({ni, h, 0, 0});
        }
      }
    }
    // Short sequences (a few tokens, e.g. into a long cache) go through the split-KV row path:
    // their ntok·G rows read the keys once, instead of one 64-row query tile per head that
    // would be mostly padding.
    const std::span<kernels::attention::row_job<T>> job_store =
        frame.take<kernels::attention::row_job<T>>(nseq * d.Hkv);
    std::size_t njobs = 0;
    for (std::size_t n = 0; n < seqs.size(); ++n) {
      const seq& s = seqs[n];
      if (s.len == 0 || s.len > short_prefill_tokens) continue;
      for (index_t h = 0; h < d.Hkv; ++h) {
        const std::size_t kv = n * static_cast<std::size_t>(d.Hkv) + static_cast<std::size_t>(h);
        kernels::attention::row_job<T> job;
        job.q = q.ptr({s.qb, s.t0, h * G, 0});
        job.q_tstride = q.stride(1);
        job.q_hstride = q.stride(2);
        job.o = o.ptr({s.qb, s.t0, h * G, 0});
        job.o_tstride = o.stride(1);
        job.o_hstride = o.stride(2);
        job.ntok = s.len;
        job.nhead = G;
        job.pos0 = pos0[n];
        job.runs[0] = {kp[kv], vp[kv], pos0[n] + s.len, ks, vs};
        job.sinks = opt_.sink.empty() ? nullptr : opt_.sink.data() + h * G;
        job_store[njobs++] = job;
      }
    }
    if (njobs > 0) {
      // the partials' scratch: run_row_jobs writes before it reads (step passes it uninitialised
      // stack memory), so it is taken uninitialised
      constexpr index_t cap = index_t(1) << 18;
      const std::span<T> scratch = frame.take<T>(cap);
      kernels::attention::run_row_jobs<T>(
          static_cast<index_t>(njobs),
          [&](index_t i) { return job_store[static_cast<std::size_t>(i)]; }, kernel_params(d),
          scratch.data(), cap);
    }
    for (std::size_t n = 0; n < seqs.size(); ++n) {
      const seq& s = seqs[n];
      if (s.len == 0 || s.len <= short_prefill_tokens) continue;
      for (index_t h = 0; h < d.H; ++h) {
        const std::size_t kv =
            n * static_cast<std::size_t>(d.Hkv) + static_cast<std::size_t>(h / G);
        segment<T> sg;
        sg.q = q.ptr({s.qb, s.t0, h, 0});
        sg.q_stride = q.stride(1);
        sg.k = kp[kv];
        sg.k_stride = ks;
        sg.v = vp[kv];
        sg.v_stride = vs;
        sg.o = o.ptr({s.qb, s.t0, h, 0});
        sg.o_stride = o.stride(1);
        sg.nq = s.len;
        sg.q_pos0 = pos0[n];
        sg.sink = sink_of(h);
        seg_store[nsegs++] = sg;
      }
    }
    kernels::attention::run_tiles<T>(seg_store.first(nsegs), kernel_params(d));
    if (!cache) return;
    for (const seq& s : seqs) {
      const index_t len0 = cache->length(s.row);
      if (cache->is_ring()) {  // the ring keeps the last R positions: write the new ones there
        const index_t R = cache->capacity();
        for (index_t t = std::max<index_t>(0, s.len - R); t < s.len; ++t) {
          const index_t slot = (len0 + t) % R;
          for (index_t h = 0; h < d.Hkv; ++h) {
            std::copy_n(k.ptr({s.qb, s.t0 + t, h, 0}), d.K, cache->key_row(s.row, h, slot));
            std::copy_n(v.ptr({s.qb, s.t0 + t, h, 0}), d.V, cache->value_row(s.row, h, slot));
          }
        }
      }
      cache->set_length(s.row, len0 + s.len);
    }
  }

  // Token i goes to cache row rows[i] (row i when rows is empty).
  void step_unchecked(const dims& d, const tensor_view<const T, 3>& q1,
                      const tensor_view<const T, 3>& k1, const tensor_view<const T, 3>& v1,
                      const tensor_view<T, 3>& o1, kv_cache<T>& cache,
                      std::span<const index_t> rows) const {
    using kernels::attention::key_run;
    const index_t G = d.H / d.Hkv;
    const index_t R = cache.capacity(), W = window();
    const bool ring = cache.is_ring();
    const auto p = kernel_params(d);
    const T* sinks = opt_.sink.empty() ? nullptr : opt_.sink.data();
    const auto row_of = [&](index_t i) {
      return rows.empty() ? i : rows[static_cast<std::size_t>(i)];
    };
    parallel_for(d.B * d.Hkv, [&](index_t n) {  // append the new token's key and value
      const index_t i = n / d.Hkv, h = n % d.Hkv, b = row_of(i);
      const index_t pos = cache.length(b);
      const index_t slot = ring ? pos % R : pos;
      std::copy_n(k1.ptr({i, h, 0}), d.K, cache.key_row(b, h, slot));
      std::copy_n(v1.ptr({i, h, 0}), d.V, cache.value_row(b, h, slot));
    });
    // one row job per (sequence, kv head): its G query heads against the visible positions
    // first .. pos (keys renumbered from 0 = position first), split over the cache length
    const auto job_of = [&](index_t n) {
      const index_t i = n / d.Hkv, h = n % d.Hkv, b = row_of(i);
      const index_t pos = cache.length(b);  // position of the new token
      const index_t first = W > 0 ? std::max<index_t>(0, pos - W + 1) : 0;
      kernels::attention::row_job<T> job;
      job.q = q1.ptr({i, h * G, 0});
      job.q_hstride = q1.stride(1);
      job.o = o1.ptr({i, h * G, 0});
      job.o_hstride = o1.stride(1);
      job.ntok = 1;
      job.nhead = G;
      job.pos0 = pos - first;
      job.sinks = sinks ? sinks + h * G : nullptr;
      if (!ring) {
        job.runs[0] = {cache.key_row(b, h, first), cache.value_row(b, h, first), pos - first + 1,
                       d.K, d.V};
      } else {
        const index_t s0 = first % R, count = pos - first + 1;
        const index_t n0 = std::min(count, R - s0);
        job.runs[0] = {cache.key_row(b, h, s0), cache.value_row(b, h, s0), n0, d.K, d.V};
        if (count > n0) {
          job.runs[1] = {cache.key_row(b, h, 0), cache.value_row(b, h, 0), count - n0, d.K, d.V};
          job.nruns = 2;
        }
      }
      return job;
    };
    // partials on the stack: step allocates nothing
    constexpr index_t cap = kernels::attention::row_scratch_elems<T>;
    alignas(64) std::array<T, static_cast<std::size_t>(cap)> scratch;
    kernels::attention::run_row_jobs<T>(d.B * d.Hkv, job_of, p, scratch.data(), cap);
    for (index_t i = 0; i < d.B; ++i) cache.set_length(row_of(i), cache.length(row_of(i)) + 1);
  }

  options opt_;
  bool sliding_ = false;
};

}  // namespace seqmix
