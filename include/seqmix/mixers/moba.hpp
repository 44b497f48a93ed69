// SPDX-License-Identifier: MIT
// moba_attention<T> and moba_cache<T>: MoBA, mixture of block attention (docs/math.md §5.2),
// on the attention engine (kernels/moba.hpp over kernels/attention.hpp's tiles and decode).
//
//   chunks of c tokens per sequence; m_b = mean key of chunk b
//   gate_tb = q_t · m_b (no scale) for the chunks b < t / c before t's own
//   t attends its own chunk (keys j <= t) and the top-(k-1) earlier chunks by gate (all of them
//   when there are at most k-1; equal gates: lower chunk index; NaN ranks as -inf)
//   o_t = softmax over the selected keys of s q_t · k_j, times v   (s = K^-1/2 by default)
//
// Legend: B batch, T tokens, H query heads, Hkv key/value heads (query head h reads kv head
// h / (H / Hkv), MoBA's repeat_interleave), K key dim, V value dim, c chunk size, k top-k,
// N packed tokens, L cached tokens.
//
// Layouts: q [B,T,H,K], k [B,T,Hkv,K], v [B,T,Hkv,V], o [B,T,H,V] as the other mixers; packed
// q [N,H,K], k [N,Hkv,K], v [N,Hkv,V], o [N,H,V] with cu_seqlens [n+1] as MoBA's own varlen API.
//
// Forms and cost per head:
//  - forward (prefill / training): selection by tiles of queries against the chunk means, then
//    tiles that visit only the selected chunks (kernels/moba.hpp). Time
//    O(T·(T/c)·K/2 + T·(k - 1/2)·c·(K+V)); memory O(T·(K+V)) for head-major copies of k and v,
//    O(T·(k + K + V)) per thread for the selection, query copy and softmax state, and
//    O(64·(K+V+64) + 64·T/c) scratch per thread. Never a T×T matrix. With a moba_cache
//    ([B,T,H,D] or packed) it is the prefill: the new tokens also see the cached ones, and are
//    appended. Parallel over (sequence, query head): one long sequence of one head is serial.
//  - step (decode, one token per sequence) against a moba_cache: the new key joins its chunk's
//    running sum (a completed chunk stores its mean), gates over the L/c complete chunks, then
//    the engine's decode over the selected chunks and the own one. Time O((L/c)·K +
//    k·c·(K+V)), flat in L while k·c·(K+V) dominates; step allocates nothing after its first
//    call with a given top-k.
//  - prefill then steps gives the outputs of one forward over the whole sequence (up to float
//    rounding; the chunk selection is bitwise the same: both forms sum the means in double in
//    token order and compute gates with the same fma sequence).
// Cache memory per token and kv head: (K + V)·sizeof(T) for keys and values plus
// K·sizeof(T)/c for the chunk means (+ 8·K bytes of running sum per (sequence, kv head) and
// one scratch row of gates).
//
// Checks (every entry, before anything is written): chunk_size >= 1, top_k >= 1, scale finite;
// shapes (H a multiple of Hkv), cu_seqlens, cache geometry, chunk size and room; o must not
// share memory with the inputs or the cache. Messages name the entry and the argument.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <seqmix/core/error.hpp>
#include <seqmix/core/parallel.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/core/workspace.hpp>
#include <seqmix/kernels/attention.hpp>
#include <seqmix/kernels/moba.hpp>
#include <seqmix/mixers/detail/front_checks.hpp>
#include <seqmix/mixers/kv_cache.hpp>

namespace seqmix {

template <class T>
class moba_attention;

/// A copy of a moba_cache's keys, values and lengths (the means are rebuilt on restore).
template <class T>
struct moba_cache_snapshot {
  kv_cache_snapshot<T> kv;
  index_t chunk_size = 0;
};

/// The decode state of MoBA: a full kv_cache plus, per (sequence, kv head), the mean key of
/// every complete chunk (stored transposed, [K, chunks]) and the running key sum of the current
/// chunk (double). Memory: B·Hkv·capacity·(K+V)·sizeof(T) + B·Hkv·K·ceil(capacity/c)·sizeof(T).
template <class T>
class moba_cache {
 public:
  moba_cache() = default;
  /// Room for `capacity` tokens per sequence; chunk_size c must match the mixer's.
  moba_cache(index_t batch, index_t kv_heads, index_t key_dim, index_t value_dim, index_t capacity,
             index_t chunk_size)
      : kv_(kv_cache<T>::full(batch, kv_heads, key_dim, value_dim, capacity)), chunk_(chunk_size) {
    checker check{"moba_cache"};
    check.require(chunk_size >= 1, "chunk_size", "must be >= 1, got " + std::to_string(chunk_size));
    constexpr index_t Ln = simd::lanes<T>;
    ld_ = ((capacity + chunk_size - 1) / chunk_size + Ln - 1) / Ln * Ln;
    means_t_ = tensor<T, 4>({batch, kv_heads, key_dim, ld_});
    sums_ = tensor<double, 3>({batch, kv_heads, key_dim});
    gates_ = tensor<T, 3>({batch, kv_heads, ld_});
  }

  index_t batch() const noexcept { return kv_.batch(); }
  index_t kv_heads() const noexcept { return kv_.kv_heads(); }
  index_t key_dim() const noexcept { return kv_.key_dim(); }
  index_t value_dim() const noexcept { return kv_.value_dim(); }
  index_t capacity() const noexcept { return kv_.capacity(); }
  index_t chunk_size() const noexcept { return chunk_; }
  index_t length(index_t b) const { return kv_.length(b); }
  /// The keys and values (a full kv_cache).
  const kv_cache<T>& kv() const noexcept { return kv_; }
  /// Bytes of keys, values, chunk means, running sums and gate scratch.
  std::size_t storage_bytes() const noexcept {
    return kv_.storage_bytes() +
           static_cast<std::size_t>(means_t_.size() + gates_.size()) * sizeof(T) +
           static_cast<std::size_t>(sums_.size()) * sizeof(double);
  }

  void reset() {
    kv_.reset();
    sums_.fill(0.0);
  }
  void reset(index_t b) {
    kv_.reset(b);
    rebuild(b);
  }
  /// Rolls sequence b back to its first n tokens: O(c·K) (the partial chunk's sum is rebuilt;
  /// the means of earlier chunks stay valid).
  void truncate(index_t b, index_t n) {
    checker check{"moba_cache::truncate"};
    if (b < 0 || b >= batch()) {
      check.fail("b", "must be in [0, " + std::to_string(batch()) + ") (the cache's batch), got " +
                          std::to_string(b));
    }
    const index_t len = kv_.length(b);
    check.require(n >= 0 && n <= len, "n",
                  "must be in [0, " + std::to_string(len) + "], got " + std::to_string(n));
    kv_.truncate(b, n);
    rebuild_partial(b);
  }
  moba_cache_snapshot<T> snapshot() const { return {kv_.snapshot(), chunk_}; }
  /// Restores keys, values and lengths and rebuilds the means (O(L·K)); validated first.
  void restore(const moba_cache_snapshot<T>& s) {
    checker check{"moba_cache::restore"};
    if (s.chunk_size != chunk_) {
      check.fail("s.chunk_size", "expected a snapshot of a cache of chunk size " +
                                     std::to_string(chunk_) + ", got " +
                                     std::to_string(s.chunk_size));
    }
    kv_.restore(s.kv);
    for (index_t b = 0; b < batch(); ++b) rebuild(b);
  }

 private:
  friend class moba_attention<T>;

  // Recomputes every complete chunk's mean and the partial chunk's sum of sequence b, with the
  // same arithmetic as the incremental updates (double sums in token order).
  void rebuild(index_t b) {
    const index_t n = kv_.length(b), K = key_dim();
    std::vector<double> sum(static_cast<std::size_t>(K));
    std::vector<T> mean(static_cast<std::size_t>(K));
    for (index_t h = 0; h < kv_heads(); ++h) {
      for (index_t c = 0; c < n / chunk_; ++c) {
        kernels::moba::detail::chunk_mean(kv_.key_row(b, h, c * chunk_), K, chunk_, K, sum.data(),
                                          mean.data());
        for (index_t d = 0; d < K; ++d)
          *means_t_.view().ptr({b, h, d, c}) = mean[static_cast<std::size_t>(d)];
      }
    }
    rebuild_partial(b);
  }
  void rebuild_partial(index_t b) {
    const index_t n = kv_.length(b), K = key_dim(), c0 = n / chunk_ * chunk_;
    for (index_t h = 0; h < kv_heads(); ++h) {
      double* s = sums_.view().ptr({b, h, 0});
      std::fill_n(s, K, 0.0);
      for (index_t j = c0; j < n; ++j) {
        const T* kj = kv_.key_row(b, h, j);
        for (index_t d = 0; d < K; ++d) s[d] += static_cast<double>(kj[d]);
      }
    }
  }
  // Adds key row kj (position pos) of (b, h) to the running sum; a completed chunk stores its
  // mean (the same arithmetic as kernels::moba::detail::chunk_mean).
  void add_key(index_t b, index_t h, index_t pos, const T* kj) {
    const index_t K = key_dim();
    double* s = sums_.view().ptr({b, h, 0});
    for (index_t d = 0; d < K; ++d) s[d] += static_cast<double>(kj[d]);
    if ((pos + 1) % chunk_ == 0) {
      const index_t c = pos / chunk_;
      for (index_t d = 0; d < K; ++d) {
        *means_t_.view().ptr({b, h, d, c}) = static_cast<T>(s[d] / static_cast<double>(chunk_));
        s[d] = 0.0;
      }
    }
  }
  // grow-only per-(sequence, kv head) decode scratch for top-k (called before parallel work)
  void prepare(index_t top_k) {
    const auto n = static_cast<std::size_t>(batch() * kv_heads());
    const auto k1 = static_cast<std::size_t>(std::max<index_t>(top_k - 1, 1));
    if (k1 > k1_) {
      sel_.assign(n * k1, 0);
      selval_.assign(n * k1, T(0));
      runs_.assign(n * (k1 + 1), {});
      k1_ = k1;
    }
  }

  kv_cache<T> kv_;
  index_t chunk_ = 0, ld_ = 0;
  tensor<T, 4> means_t_;  // [B, Hkv, K, ld]
  tensor<double, 3> sums_;
  tensor<T, 3> gates_;  // [B, Hkv, ld]
  std::size_t k1_ = 0;
  std::vector<std::int32_t> sel_;
  std::vector<T> selval_;
  std::vector<kernels::attention::key_run<T>> runs_;
};

template <class T>
class moba_attention {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "moba_attention<T>: T is float or double");

 public:
  struct options {
    index_t chunk_size = 64;   ///< c >= 1
    index_t top_k = 8;         ///< k >= 1 chunks per query, its own included
    std::optional<T> scale{};  ///< s; default K^-1/2
  };

  moba_attention() : moba_attention(options{}) {}
  explicit moba_attention(options opt) : opt_(opt) {
    checker check{"moba_attention"};
    check.require(opt_.chunk_size >= 1, "options.chunk_size",
                  "must be >= 1, got " + std::to_string(opt_.chunk_size));
    check.require(
        opt_.top_k >= 1, "options.top_k",
        "must be >= 1 (the own chunk is always attended), got " + std::to_string(opt_.top_k));
    if (opt_.scale) check.finite_value("options.scale", *opt_.scale);
  }
  const options& get_options() const noexcept { return opt_; }

  /// A cache for decode of at most `capacity` tokens per sequence.
  moba_cache<T> make_cache(index_t B, index_t Hkv, index_t K, index_t V, index_t capacity) const {
    checker check{"moba_attention::make_cache"};
    const std::array<const char*, 5> names{"B", "Hkv", "K", "V", "capacity"};
    const std::array<index_t, 5> vals{B, Hkv, K, V, capacity};
    for (std::size_t i = 0; i < names.size(); ++i)
      check.require(vals[i] >= 1, names[i], "must be >= 1, got " + std::to_string(vals[i]));
    return moba_cache<T>(B, Hkv, K, V, capacity, opt_.chunk_size);
  }

  /// Whole sequences: q [B,T,H,K], k [B,T,Hkv,K], v [B,T,Hkv,V] in; o [B,T,H,V] out.
  void forward(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
               tensor_view<T, 4> o) const {
    const checker check{"moba_attention::forward"};
    const dims d = validate(check, q, k, v, o);
    check.no_overlap({range_of("o", o)}, {range_of("q", q), range_of("k", k), range_of("v", v)});
    auto frame = thread_workspace().scope();
    run(d, q, k, v, o, batch_seqs(frame, d.B, d.Tn), nullptr, {});
  }

  /// Packed varlen (MoBA's layout): q [N,H,K], k [N,Hkv,K], v [N,Hkv,V] in; o [N,H,V] out;
  /// sequence n is rows cu_seqlens[n] .. cu_seqlens[n+1]-1.
  void forward(tensor_view<const T, 3> q, tensor_view<const T, 3> k, tensor_view<const T, 3> v,
               tensor_view<T, 3> o, std::span<const index_t> cu_seqlens) const {
    const checker check{"moba_attention::forward"};
    const auto q4 = q.unsqueeze(0), k4 = k.unsqueeze(0), v4 = v.unsqueeze(0);
    const auto o4 = o.unsqueeze(0);
    const dims d = validate3(check, q, k, v, o);
    check.no_overlap({range_of("o", o)}, {range_of("q", q), range_of("k", k), range_of("v", v)});
    auto frame = thread_workspace().scope();
    run(d, q4, k4, v4, o4, packed(frame, check, d, cu_seqlens), nullptr, {});
  }

  /// Prefill: the T new tokens of each sequence attend over the cache's tokens and themselves,
  /// and are appended to `cache` ([B] sequences).
  void forward(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
               tensor_view<T, 4> o, moba_cache<T>& cache) const {
    const checker check{"moba_attention::forward"};
    const dims d = validate(check, q, k, v, o);
    check_cache(check, d, cache, d.Tn);
    check_cache_overlap(check, q, k, v, o, cache);
    auto frame = thread_workspace().scope();
    run(d, q, k, v, o, batch_seqs(frame, d.B, d.Tn), &cache, {});
  }

  /// Packed varlen prefill: sequence n (rows cu_seqlens[n] .. cu_seqlens[n+1]-1 of q [N,H,K],
  /// k [N,Hkv,K], v [N,Hkv,V]) attends over row n of `cache` ([n] sequences) and itself, and is
  /// appended there; o [N,H,V] out.
  void forward(tensor_view<const T, 3> q, tensor_view<const T, 3> k, tensor_view<const T, 3> v,
               tensor_view<T, 3> o, moba_cache<T>& cache,
               std::span<const index_t> cu_seqlens) const {
    const checker check{"moba_attention::forward"};
    const dims d = validate3(check, q, k, v, o);
    auto frame = thread_workspace().scope();
    const auto seqs = packed(frame, check, d, cu_seqlens);
    const auto n = static_cast<index_t>(seqs.size());
    const dims dn{n, 1, d.H, d.Hkv, d.K, d.V};
    check_cache(check, dn, cache, 0);
    for (const seq& sq : seqs) check_room(check, cache, sq.row, sq.len);
    check_cache_overlap(check, q, k, v, o, cache);
    run(d, q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), o.unsqueeze(0), seqs, &cache, {});
  }

  /// The chosen earlier chunks of every query: [B,T,H,k-1], ascending, -1 in unused slots
  /// (a query at chunk index n has min(n, k-1) of them).
  tensor<std::int32_t, 4> selected_chunks(tensor_view<const T, 4> q,
                                          tensor_view<const T, 4> k) const {
    const checker check{"moba_attention::selected_chunks"};
    check.nonempty("q", q);
    const index_t B = q.extent(0), Tn = q.extent(1), H = q.extent(2), K = q.extent(3);
    check.nonempty("k", k);
    check.shape("k", k, {B, Tn, any_extent, K});
    check_heads(check, "k", H, k.extent(2));
    check.inner_contiguous("q", q);
    check.inner_contiguous("k", k);
    const dims d{B, Tn, H, k.extent(2), K, 1};
    tensor<std::int32_t, 4> sel({B, Tn, H, std::max<index_t>(opt_.top_k - 1, 0)});
    auto frame = thread_workspace().scope();
    run(d, q, k, tensor_view<const T, 4>{}, tensor_view<T, 4>{}, batch_seqs(frame, B, Tn), nullptr,
        sel.view());
    return sel;
  }

  /// Decode one token per sequence: appends k1, v1 to `cache`, then attends over the selected
  /// chunks. q1 [B,H,K], k1 [B,Hkv,K], v1 [B,Hkv,V] in; o1 [B,H,V] out.
  void step(tensor_view<const T, 3> q1, tensor_view<const T, 3> k1, tensor_view<const T, 3> v1,
            tensor_view<T, 3> o1, moba_cache<T>& cache) const {
    const checker check{"moba_attention::step"};
    const dims d =
        front::check_attention_qkvo3<T>(check, {"q1", "k1", "v1", "o1"}, q1, k1, v1, o1,
                                        [this](const checker& c, std::string_view name, index_t H,
                                               index_t Hkv) { check_heads(c, name, H, Hkv); });
    check_cache(check, d, cache, 1);
    check_cache_overlap(check, q1, k1, v1, o1, cache);
    step_unchecked(d, q1, k1, v1, o1, cache);
  }

  /// T decode steps (the recurrent form), appending to `cache`.
  void forward_recurrent(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                         tensor_view<const T, 4> v, tensor_view<T, 4> o,
                         moba_cache<T>& cache) const {
    const checker check{"moba_attention::forward_recurrent"};
    const dims d = validate(check, q, k, v, o);
    check_cache(check, d, cache, d.Tn);
    check_cache_overlap(check, q, k, v, o, cache);
    const dims d1{d.B, 1, d.H, d.Hkv, d.K, d.V};
    for (index_t t = 0; t < d.Tn; ++t) {
      step_unchecked(d1, q.template select<1>(t), k.template select<1>(t), v.template select<1>(t),
                     o.template select<1>(t), cache);
    }
  }

 private:
  using dims = front::attention_dims;
  struct seq {
    index_t qb, t0, len, row;  // batch row of the inputs, first token, tokens, cache row
  };

  T scale_for(index_t K) const { return opt_.scale ? *opt_.scale : T(1) / std::sqrt(T(K)); }
  kernels::moba::params<T> kernel_params(const dims& d) const {
    kernels::moba::params<T> p;
    p.key_dim = d.K;
    p.value_dim = d.V;
    p.chunk = opt_.chunk_size;
    p.top_k = opt_.top_k;
    p.scale = scale_for(d.K);
    return p;
  }

  void check_heads(const checker& check, std::string_view k_name, index_t H, index_t Hkv) const {
    if (Hkv < 1 || H % Hkv != 0) {
      check.fail(k_name, "query heads (" + std::to_string(H) +
                             ") must be a multiple of key/value heads (" + std::to_string(Hkv) +
                             ")");
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
  dims validate3(const checker& check, const tensor_view<const T, 3>& q,
                 const tensor_view<const T, 3>& k, const tensor_view<const T, 3>& v,
                 const tensor_view<T, 3>& o) const {
    dims d =
        front::check_attention_qkvo3<T>(check, {"q", "k", "v", "o"}, q, k, v, o,
                                        [this](const checker& c, std::string_view name, index_t H,
                                               index_t Hkv) { check_heads(c, name, H, Hkv); });
    std::swap(d.B, d.Tn);  // packed: one batch row of N tokens
    return d;
  }
  static std::span<const seq> batch_seqs(workspace::frame& f, index_t B, index_t Tn) {
    std::span<seq> seqs = f.take<seq>(B);
    for (index_t b = 0; b < B; ++b) seqs[static_cast<std::size_t>(b)] = {b, 0, Tn, b};
    return seqs;
  }
  std::span<const seq> packed(workspace::frame& f, const checker& check, const dims& d,
                              std::span<const index_t> cu) const {
    check.cu_seqlens(cu, 1, d.Tn);
    std::span<seq> seqs = f.take<seq>(static_cast<index_t>(cu.size()) - 1);
    for (std::size_t n = 0; n + 1 < cu.size(); ++n)
      seqs[n] = {0, cu[n], cu[n + 1] - cu[n], static_cast<index_t>(n)};
    return seqs;
  }
  void check_cache(const checker& check, const dims& d, const moba_cache<T>& cache,
                   index_t n) const {
    if (cache.batch() != d.B || cache.kv_heads() != d.Hkv || cache.key_dim() != d.K ||
        cache.value_dim() != d.V) {
      check.fail("cache",
                 "expected [sequences, kv heads, K, V] = " +
                     detail::format_shape(std::array<index_t, 4>{d.B, d.Hkv, d.K, d.V}) + ", got " +
                     detail::format_shape(std::array<index_t, 4>{
                         cache.batch(), cache.kv_heads(), cache.key_dim(), cache.value_dim()}));
    }
    if (cache.chunk_size() != opt_.chunk_size) {
      check.fail("cache", "expected a cache of chunk size " + std::to_string(opt_.chunk_size) +
                              " (options.chunk_size), got " + std::to_string(cache.chunk_size()));
    }
    for (index_t b = 0; b < d.B; ++b) check_room(check, cache, b, n);
  }
  static void check_room(const checker& check, const moba_cache<T>& cache, index_t b, index_t n) {
    const index_t len = cache.length(b);
    if (len + n > cache.capacity()) {
      check.fail("cache", "capacity " + std::to_string(cache.capacity()) + " exceeded: sequence " +
                              std::to_string(b) + " holds " + std::to_string(len) +
                              " tokens, appending " + std::to_string(n));
    }
  }
  template <std::size_t R>
  static void check_cache_overlap(const checker& check, const tensor_view<const T, R>& q,
                                  const tensor_view<const T, R>& k,
                                  const tensor_view<const T, R>& v, const tensor_view<T, R>& o,
                                  const moba_cache<T>& cache) {
    const auto span_of = [](const auto& t) {
      return memory_range{"cache", reinterpret_cast<std::uintptr_t>(t.data()),
                          reinterpret_cast<std::uintptr_t>(t.data() + t.size())};
    };
    const auto& kv = cache.kv();
    const memory_range keys{
        "cache", reinterpret_cast<std::uintptr_t>(kv.key_row(0, 0, 0)),
        reinterpret_cast<std::uintptr_t>(
            kv.key_row(kv.batch() - 1, kv.kv_heads() - 1, kv.capacity() - 1) + kv.key_dim())};
    const memory_range values{
        "cache", reinterpret_cast<std::uintptr_t>(kv.value_row(0, 0, 0)),
        reinterpret_cast<std::uintptr_t>(
            kv.value_row(kv.batch() - 1, kv.kv_heads() - 1, kv.capacity() - 1) + kv.value_dim())};
    check.no_overlap({range_of("o", o), keys, values, span_of(cache.means_t_)},
                     {range_of("q", q), range_of("k", k), range_of("v", v)});
  }

  // Builds the problems: head-major keys/values (the inputs copied, or the cache rows after
  // appending), chunk means, then one kernel run.
  void run(const dims& d, const tensor_view<const T, 4>& q, const tensor_view<const T, 4>& k,
           const tensor_view<const T, 4>& v, const tensor_view<T, 4>& o, std::span<const seq> seqs,
           moba_cache<T>* cache, tensor_view<std::int32_t, 4> selected) const {
    namespace km = kernels::moba;
    const index_t G = d.H / d.Hkv, c = opt_.chunk_size, K = d.K, V = d.V;
    const bool values = o.data() != nullptr;
    const auto S = static_cast<index_t>(seqs.size());
    index_t max_end = 1, max_len = 1;
    // all scratch from this thread's arena: nothing allocated once it has grown
    auto frame = thread_workspace().scope();
    std::span<index_t> pos0 = frame.take<index_t>(S, index_t(0));
    for (std::size_t n = 0; n < seqs.size(); ++n) {
      if (cache) pos0[n] = cache->length(seqs[n].row);
      max_end = std::max(max_end, pos0[n] + seqs[n].len);
      max_len = std::max(max_len, seqs[n].len);
    }
    const index_t nbmax = max_end / c;  // complete chunks (the kernel gates (end - 1) / c)
    // keys / values per (sequence, kv head): rows 0 .. pos0 + len - 1, contiguous
    tensor_view<T, 4> pk, pv;
    std::span<const T*> kp = frame.take<const T*>(S * d.Hkv);
    std::span<const T*> vp = frame.take<const T*>(S * d.Hkv);
    if (!cache) {
      pk = frame.take_view<T, 4>({S, d.Hkv, max_len, K});
      if (values) pv = frame.take_view<T, 4>({S, d.Hkv, max_len, V});
    }
    parallel_for(S * d.Hkv, [&](index_t i) {
      const index_t n = i / d.Hkv, h = i % d.Hkv;
      const seq& s = seqs[static_cast<std::size_t>(n)];
      T* kd = cache ? cache->kv_.key_row(s.row, h, pos0[static_cast<std::size_t>(n)])
                    : pk.ptr({n, h, 0, 0});
      for (index_t t = 0; t < s.len; ++t) std::copy_n(k.ptr({s.qb, s.t0 + t, h, 0}), K, kd + t * K);
      if (values) {
        T* vd = cache ? cache->kv_.value_row(s.row, h, pos0[static_cast<std::size_t>(n)])
                      : pv.ptr({n, h, 0, 0});
        for (index_t t = 0; t < s.len; ++t)
          std::copy_n(v.ptr({s.qb, s.t0 + t, h, 0}), V, vd + t * V);
      }
      kp[static_cast<std::size_t>(i)] =
          cache ? cache->kv_.key_row(s.row, h, 0) : pk.ptr({n, h, 0, 0});
      vp[static_cast<std::size_t>(i)] = !values ? nullptr
                                        : cache ? cache->kv_.value_row(s.row, h, 0)
                                                : pv.ptr({n, h, 0, 0});
    });
    // complete-chunk means per (sequence, kv head): [S, Hkv, nbmax, K]; the cache's earlier
    // chunks are copied from it (bitwise what recomputing would give)
    tensor_view<T, 4> means = frame.take_view<T, 4>({S, d.Hkv, std::max<index_t>(nbmax, 1), K});
    std::span<double> sums = frame.take<double>(S * d.Hkv * K);
    parallel_for(S * d.Hkv, [&](index_t i) {
      const index_t n = i / d.Hkv, h = i % d.Hkv;
      const auto ns = static_cast<std::size_t>(n);
      const index_t nb = (pos0[ns] + seqs[ns].len) / c;
      const index_t from = cache ? std::min(nb, pos0[ns] / c) : 0;
      for (index_t b = 0; b < from; ++b)
        for (index_t dd = 0; dd < K; ++dd)
          *means.ptr({n, h, b, dd}) = *cache->means_t_.view().ptr({seqs[ns].row, h, dd, b});
      if (nb > from)
        km::chunk_means(kp[static_cast<std::size_t>(i)] + from * c * K, K, nb - from, c, K,
                        means.ptr({n, h, from, 0}), sums.data() + static_cast<std::size_t>(i * K));
    });
    index_t np = 0;
    for (const seq& sq : seqs) np += sq.len > 0 ? d.H : 0;
    std::span<km::problem<T>> probs = frame.take<km::problem<T>>(np);
    std::size_t at = 0;
    for (std::size_t n = 0; n < seqs.size(); ++n) {
      const seq& s = seqs[n];
      if (s.len == 0) continue;
      for (index_t h = 0; h < d.H; ++h) {
        const std::size_t kv =
            n * static_cast<std::size_t>(d.Hkv) + static_cast<std::size_t>(h / G);
        km::problem<T> pr;
        pr.q = q.ptr({s.qb, s.t0, h, 0});
        pr.q_stride = q.stride(1);
        pr.k = kp[kv];
        pr.k_stride = K;
        pr.v = vp[kv];
        pr.v_stride = V;
        pr.means = means.ptr({static_cast<index_t>(n), h / G, 0, 0});
        pr.o = values ? o.ptr({s.qb, s.t0, h, 0}) : nullptr;
        pr.o_stride = values ? o.stride(1) : 0;
        pr.nq = s.len;
        pr.q_pos0 = pos0[n];
        if (selected.data()) pr.selected = selected.ptr({s.qb, s.t0, h, 0});
        probs[at++] = pr;
      }
    }
    // selected rows are [T, H, k-1]: the kernel writes row r at selected + r·(k-1), so give
    // each head its own contiguous block and scatter after
    if (selected.data() && opt_.top_k > 1) {
      const index_t k1 = opt_.top_k - 1;
      std::span<std::int32_t> tmp = frame.take<std::int32_t>(np * max_len * k1);
      for (std::size_t i = 0; i < probs.size(); ++i)
        probs[i].selected = tmp.data() + static_cast<index_t>(i) * max_len * k1;
      km::run_problems<T>(probs, kernel_params(d));
      std::size_t i = 0;
      for (const seq& s : seqs) {
        if (s.len == 0) continue;
        for (index_t h = 0; h < d.H; ++h, ++i)
          for (index_t t = 0; t < s.len; ++t)
            std::copy_n(probs[i].selected + t * k1, k1, selected.ptr({s.qb, s.t0 + t, h, 0}));
      }
    } else {
      for (auto& pr : probs) pr.selected = nullptr;
      if (values) km::run_problems<T>(probs, kernel_params(d));
    }
    if (!cache) return;
    // the cache: new complete chunks' means, the partial chunk's running sum, the lengths
    for (std::size_t n = 0; n < seqs.size(); ++n) {
      const seq& s = seqs[n];
      const index_t end = pos0[n] + s.len;
      for (index_t h = 0; h < d.Hkv; ++h)
        for (index_t b = pos0[n] / c; b < end / c; ++b)
          for (index_t dd = 0; dd < K; ++dd)
            *cache->means_t_.view().ptr({s.row, h, dd, b}) =
                *means.ptr({static_cast<index_t>(n), h, b, dd});
      cache->kv_.set_length(s.row, end);
      cache->rebuild_partial(s.row);
    }
  }

  void step_unchecked(const dims& d, const tensor_view<const T, 3>& q1,
                      const tensor_view<const T, 3>& k1, const tensor_view<const T, 3>& v1,
                      const tensor_view<T, 3>& o1, moba_cache<T>& cache) const {
    using kernels::attention::key_run;
    const index_t G = d.H / d.Hkv, c = opt_.chunk_size, K = d.K, V = d.V;
    const index_t k1n = opt_.top_k - 1;
    cache.prepare(opt_.top_k);
    kernels::attention::params<T> p;
    p.key_dim = K;
    p.value_dim = V;
    p.scale = scale_for(K);
    const auto stride_k1 = static_cast<index_t>(cache.k1_);
    parallel_for(d.B * d.Hkv, [&](index_t n) {
      const index_t b = n / d.Hkv, h = n % d.Hkv;
      auto& kv = cache.kv_;
      const index_t pos = kv.length(b);
      std::copy_n(k1.ptr({b, h, 0}), K, kv.key_row(b, h, pos));
      std::copy_n(v1.ptr({b, h, 0}), V, kv.value_row(b, h, pos));
      cache.add_key(b, h, pos, kv.key_row(b, h, pos));
      const index_t nb = pos / c, own0 = nb * c;
      T* gates = cache.gates_.view().ptr({b, h, 0});
      std::int32_t* sel = cache.sel_.data() + n * stride_k1;
      T* val = cache.selval_.data() + n * stride_k1;
      key_run<T>* runs = cache.runs_.data() + n * (stride_k1 + 1);
      const T* mt = cache.means_t_.view().ptr({b, h, 0, 0});
      for (index_t g = 0; g < G; ++g) {
        const index_t hq = h * G + g;
        const T* qg = q1.ptr({b, hq, 0});
        index_t ns = 0;
        if (k1n > 0 && nb > 0) {
          kernels::moba::decode_gates(qg, mt, cache.ld_, nb, K, gates);
          ns = kernels::moba::decode_select(gates, nb, k1n, sel, val);
        }
        int nruns = 0;
        for (index_t e = 0; e < ns; ++e) {
          const index_t j0 = index_t(sel[e]) * c;
          runs[nruns++] = {kv.key_row(b, h, j0), kv.value_row(b, h, j0), c, K, V};
        }
        runs[nruns++] = {kv.key_row(b, h, own0), kv.value_row(b, h, own0), pos - own0 + 1, K, V};
        kernels::attention::decode_group<T>(qg, K, 1, runs, nruns, o1.ptr({b, hq, 0}), V, nullptr,
                                            p);
      }
    });
    for (index_t b = 0; b < d.B; ++b) cache.kv_.set_length(b, cache.kv_.length(b) + 1);
  }

  options opt_;
};

}  // namespace seqmix
