// SPDX-License-Identifier: MIT
// Gated attention layer (Qwen3-Next / Qwen3.5 full-attention layers, transformers'
// Qwen3NextAttention), on softmax_attention (mixers/softmax_attention.hpp, docs/math.md §5).
//
//   [q | gate] = q_proj(x)          per head on disk: [q hd | gate hd] (view [.., H, 2·hd])
//   k, v       = k_proj(x), v_proj(x)                         Hkv heads (GQA: H % Hkv == 0)
//   q, k       = rmsnorm(q)·(1 + w_q), rmsnorm(k)·(1 + w_k)   per head (norm_weight::one_plus)
//   q, k       = rope(q, p), rope(k, p)    rotate-half on the first int(hd·partial_rotary) dims
//   o          = softmax(s · q kᵀ + causal) v               s = hd^-1/2 unless `scale` is set
//   y          = o_proj( o · sigmoid(gate) )
//
// Weights (under the prefix; f32 or bf16): q_proj.weight [2·H·hd, D], k_proj.weight,
// v_proj.weight [Hkv·hd, D], o_proj.weight [D, H·hd], q_norm.weight, k_norm.weight [hd]. The
// three input projections are fused at load time into one GEMM with rows [q_all | gate_all |
// k | v]. `gated = false` gives a plain GQA layer (q_proj [H·hd, D]; no gate) and
// `qk_norm = false` drops the norms (Granite: no q/k norm, full RoPE, scale =
// attention_multiplier); rope_theta <= 0 or partial_rotary = 0 turns RoPE off.
//
// Positions: token t of sequence b is at cache.length(b) + t (a prefill from 0, then decode),
// per sequence for packed input. The cache (attention_cache) wraps a full kv_cache of post-RoPE
// keys and values [B, Hkv, capacity, hd] (transformers' DynamicLayer keys / values); it can be
// truncated (roll back a sequence), snapshot and restored.
//
// Forms: forward (prefill, flash-style chunked attention over the cache and the new tokens),
// packed variable-length forward (cu_seqlens, one cache row per sequence), step (decode,
// allocation-free once the layer has stepped that batch size). Cost per token: 2·D·hd·(3H +
// 2Hkv) FLOP in projections, 4·H·hd·L in attention over L cached tokens. Scratch grow-only; the
// layer object is not shareable between threads calling it at once.
#pragma once

#include <array>
#include <cmath>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <seqmix/core/error.hpp>
#include <seqmix/core/io/checkpoint.hpp>
#include <seqmix/core/simd.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/layers/rms_norm.hpp>
#include <seqmix/layers/rope.hpp>
#include <seqmix/layers/weights.hpp>
#include <seqmix/mixers/kv_cache.hpp>
#include <seqmix/mixers/softmax_attention.hpp>

namespace seqmix::layers {

struct gated_attention_config {
  index_t hidden = 0;           ///< D
  index_t heads = 0;            ///< H (num_attention_heads)
  index_t kv_heads = 0;         ///< Hkv (num_key_value_heads)
  index_t head_dim = 0;         ///< hd
  double partial_rotary = 1.0;  ///< partial_rotary_factor
  double rope_theta = 10000.0;  ///< θ; <= 0: no RoPE
  rope_style rope_kind = rope_style::rotate_half;
  float norm_eps = 1e-6f;        ///< rms_norm_eps of q_norm / k_norm
  bool gated = true;             ///< q_proj gives [q | gate] per head
  bool qk_norm = true;           ///< q_norm / k_norm (1 + w) present
  std::optional<float> scale{};  ///< softmax scale; default hd^-1/2
  index_t chunk_size = 64;       ///< key tile of the chunked attention
};

/// The decode state of an attention layer: a full kv_cache of post-RoPE keys and values.
class attention_cache {
 public:
  attention_cache() = default;
  explicit attention_cache(kv_cache<float> kv) : kv_(std::move(kv)) {}
  kv_cache<float>& kv() noexcept { return kv_; }
  const kv_cache<float>& kv() const noexcept { return kv_; }
  index_t batch() const noexcept { return kv_.batch(); }
  index_t length(index_t b) const { return kv_.length(b); }
  void reset() { kv_.reset(); }
  void reset(index_t b) { kv_.reset(b); }
  /// Rolls sequence b back to its first n tokens.
  void truncate(index_t b, index_t n) { kv_.truncate(b, n); }
  /// A deep copy (rows and lengths).
  attention_cache snapshot() const { return *this; }
  /// Contents and lengths of a snapshot of a cache of the same geometry (validated first).
  void restore(const attention_cache& s) { kv_.restore(s.kv_.snapshot()); }

 private:
  kv_cache<float> kv_;
};

class gated_attention {
 public:
  using config_type = gated_attention_config;
  using cache_type = attention_cache;

  gated_attention() = default;

  static gated_attention load(const checkpoint& ck, const std::string& prefix,
                              const config_type& cfg) {
    return load(ck.scope(prefix), cfg);
  }
  static gated_attention load(const checkpoint_scope& scope, const config_type& cfg) {
    constexpr std::string_view who = "gated_attention::load";
    const checker check{who};
    detail::check_config_positive(
        check, {"hidden", "heads", "kv_heads", "head_dim", "chunk_size"},
        {cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.chunk_size});
    if (!(cfg.heads % cfg.kv_heads == 0))
      check.fail("config.heads", "must be a multiple of kv_heads (" + std::to_string(cfg.kv_heads) +
                                     "), got " + std::to_string(cfg.heads));
    gated_attention l;
    l.cfg_ = cfg;
    const index_t H = cfg.heads, Hkv = cfg.kv_heads, hd = cfg.head_dim, D = cfg.hidden;
    const index_t qrows = (cfg.gated ? 2 : 1) * H * hd;
    std::vector<index_t> order;
    order.reserve(static_cast<std::size_t>(qrows + 2 * Hkv * hd));
    const index_t per = cfg.gated ? 2 * hd : hd;
    for (index_t h = 0; h < H; ++h)
      for (index_t e = 0; e < hd; ++e) order.push_back(h * per + e);  // q
    if (cfg.gated)
      for (index_t h = 0; h < H; ++h)
        for (index_t e = 0; e < hd; ++e) order.push_back(h * per + hd + e);  // gate
    for (index_t r = 0; r < 2 * Hkv * hd; ++r) order.push_back(qrows + r);   // k, v
    l.in_ = weight_matrix::load(who, scope, {"q_proj.weight", "k_proj.weight", "v_proj.weight"},
                                {qrows, Hkv * hd, Hkv * hd}, D, order);
    l.out_ = weight_matrix::load(who, scope, {"o_proj.weight"}, {D}, H * hd);
    if (cfg.qk_norm) {
      l.q_norm_ =
          rms_norm::load(who, scope, "q_norm.weight", hd, cfg.norm_eps, norm_weight::one_plus, hd);
      l.k_norm_ =
          rms_norm::load(who, scope, "k_norm.weight", hd, cfg.norm_eps, norm_weight::one_plus, hd);
    }
    l.use_rope_ = cfg.rope_theta > 0 && cfg.partial_rotary > 0;
    if (l.use_rope_) l.rope_ = rope::partial(hd, cfg.partial_rotary, cfg.rope_theta, cfg.rope_kind);
    typename softmax_attention<float>::options opt;
    opt.scale = cfg.scale;
    opt.chunk_size = cfg.chunk_size;
    l.attn_ = softmax_attention<float>(opt);
    l.off_gate_ = H * hd;
    l.off_k_ = qrows;
    l.off_v_ = qrows + Hkv * hd;
    l.P_ = qrows + 2 * Hkv * hd;
    return l;
  }

  const config_type& config() const noexcept { return cfg_; }
  std::size_t weight_bytes() const noexcept { return in_.bytes() + out_.bytes(); }
  const rope& rotary() const noexcept { return rope_; }

  /// A cache of `capacity` tokens per sequence (a full kv_cache; grow with cache.kv().reserve).
  cache_type make_cache(index_t batch, index_t capacity) const {
    const checker check{"gated_attention::make_cache"};
    if (!(batch >= 1)) check.fail("batch", "must be >= 1, got " + std::to_string(batch));
    if (!(capacity >= 1)) check.fail("capacity", "must be >= 1, got " + std::to_string(capacity));
    return cache_type(
        attn_.make_cache(batch, cfg_.kv_heads, cfg_.head_dim, cfg_.head_dim, capacity));
  }

  /// Prefill: x [B, T, D] -> y [B, T, D]; the tokens are appended to `cache` ([B] sequences).
  void forward(tensor_view<const float, 3> x, tensor_view<float, 3> y, cache_type& cache) {
    const checker check{"gated_attention::forward"};
    check_x(check, x, y);
    check_cache(check, cache, x.extent(0));
    for (index_t b = 0; b < x.extent(0); ++b) check_room(check, cache, b, x.extent(1));
    run(x, y, cache, {});
  }
  /// Packed variable-length prefill: x, y [1, T, D], cu_seqlens [N+1]; row n of `cache`.
  void forward(tensor_view<const float, 3> x, tensor_view<float, 3> y, cache_type& cache,
               std::span<const index_t> cu_seqlens) {
    const checker check{"gated_attention::forward"};
    check_x(check, x, y);
    const index_t N = check.cu_seqlens(cu_seqlens, x.extent(0), x.extent(1));
    check_cache(check, cache, N);
    for (index_t n = 0; n < N; ++n)
      check_room(
          check, cache, n,
          cu_seqlens[static_cast<std::size_t>(n) + 1] - cu_seqlens[static_cast<std::size_t>(n)]);
    run(x, y, cache, cu_seqlens);
  }
  tensor<float, 3> forward(tensor_view<const float, 3> x, cache_type& cache) {
    tensor<float, 3> y({x.extent(0), x.extent(1), cfg_.hidden});
    forward(x, y.view(), cache);
    return y;
  }

  /// Decode one token per sequence: x [B, D] -> y [B, D].
  void step(tensor_view<const float, 2> x, tensor_view<float, 2> y, cache_type& cache) {
    const checker check{"gated_attention::step"};
    check.nonempty("x", x);
    const index_t B = x.extent(0);
    check.shape("x", x, {B, cfg_.hidden});
    check.shape("y", y, {B, cfg_.hidden});
    check_cache(check, cache, B);
    for (index_t b = 0; b < B; ++b) check_room(check, cache, b, 1);
    const index_t H = cfg_.heads, Hkv = cfg_.kv_heads, hd = cfg_.head_dim;
    auto proj = ws_.view<2>(0, {B, P_});
    auto q = ws_.view<2>(1, {B, H * hd});
    auto k = ws_.view<2>(2, {B, Hkv * hd});
    auto o = ws_.view<2>(3, {B, H * hd});
    in_.apply(x, proj);
    prepare_qk(proj, q, k);
    if (use_rope_) {
      pos_.resize(static_cast<std::size_t>(B));
      for (index_t b = 0; b < B; ++b) pos_[static_cast<std::size_t>(b)] = cache.length(b);
      rope_.apply_step(q.split(1, {H, hd}), pos_);
      rope_.apply_step(k.split(1, {Hkv, hd}), pos_);
    }
    attn_.step(q.split(1, {H, hd}), k.split(1, {Hkv, hd}),
               proj.slice(1, off_v_, off_v_ + Hkv * hd).split(1, {Hkv, hd}), o.split(1, {H, hd}),
               cache.kv());
    apply_gate(proj, o);
    out_.apply(o, y);
  }

  /// Continuous batching: token i of x [B, D] continues cache row rows[i] (B distinct rows of
  /// a cache of any size; RoPE at that row's length); the other rows are untouched. Each row's
  /// attention is bitwise the step of a cache holding only that sequence. Allocates nothing
  /// once warm.
  void step(tensor_view<const float, 2> x, tensor_view<float, 2> y, cache_type& cache,
            std::span<const index_t> rows) {
    const checker check{"gated_attention::step"};
    check.nonempty("x", x);
    const index_t B = x.extent(0);
    check.shape("x", x, {B, cfg_.hidden});
    check.shape("y", y, {B, cfg_.hidden});
    check.inner_contiguous("x", x);
    check.inner_contiguous("y", y);
    check.no_overlap({range_of("y", y)}, {range_of("x", x)});
    check_cache(check, cache, cache.batch());
    front::check_rows(check, rows, B, cache.batch());
    if (cache.kv().is_ring()) check.fail("cache", "a state-index step needs a full cache");
    for (index_t b : rows) check_room(check, cache, b, 1);
    const index_t H = cfg_.heads, Hkv = cfg_.kv_heads, hd = cfg_.head_dim;
    auto proj = ws_.view<2>(0, {B, P_});
    auto q = ws_.view<2>(1, {B, H * hd});
    auto k = ws_.view<2>(2, {B, Hkv * hd});
    auto o = ws_.view<2>(3, {B, H * hd});
    in_.apply(x, proj);
    prepare_qk(proj, q, k);
    if (use_rope_) {
      pos_.resize(static_cast<std::size_t>(B));
      for (index_t i = 0; i < B; ++i)
        pos_[static_cast<std::size_t>(i)] = cache.length(rows[static_cast<std::size_t>(i)]);
      rope_.apply_step(q.split(1, {H, hd}), pos_);
      rope_.apply_step(k.split(1, {Hkv, hd}), pos_);
    }
    attn_.step(q.split(1, {H, hd}), k.split(1, {Hkv, hd}),
               proj.slice(1, off_v_, off_v_ + Hkv * hd).split(1, {Hkv, hd}), o.split(1, {H, hd}),
               cache.kv(), rows);
    apply_gate(proj, o);
    out_.apply(o, y);
  }

 private:
  void check_x(const checker& check, const tensor_view<const float, 3>& x,
               const tensor_view<float, 3>& y) const {
    check.nonempty("x", x);
    check.shape("x", x, {any_extent, any_extent, cfg_.hidden});
    check.shape("y", y, {x.extent(0), x.extent(1), cfg_.hidden});
    check.inner_contiguous("x", x);
    check.inner_contiguous("y", y);
    check.no_overlap({range_of("y", y)}, {range_of("x", x)});
  }
  void check_cache(const checker& check, const cache_type& cache, index_t rows) const {
    const kv_cache<float>& kv = cache.kv();
    if (kv.batch() != rows || kv.kv_heads() != cfg_.kv_heads || kv.key_dim() != cfg_.head_dim ||
        kv.value_dim() != cfg_.head_dim) {
      check.fail("cache", "expected a cache of " + std::to_string(rows) + " sequences, " +
                              std::to_string(cfg_.kv_heads) + " kv heads of " +
                              std::to_string(cfg_.head_dim) + " dims, got " +
                              std::to_string(kv.batch()) + " sequences, " +
                              std::to_string(kv.kv_heads()) + " heads, key dim " +
                              std::to_string(kv.key_dim()) + ", value dim " +
                              std::to_string(kv.value_dim()));
    }
  }
  // room for n[r] more tokens in row r of a full cache (n: T for every row, or the packed
  // lengths), named after this layer's entry rather than the mixer's
  static void check_room(const checker& check, const cache_type& cache, index_t row, index_t n) {
    const kv_cache<float>& kv = cache.kv();
    if (!kv.is_ring() && kv.length(row) + n > kv.capacity()) {
      check.fail("cache", "sequence " + std::to_string(row) + " holds " +
                              std::to_string(kv.length(row)) + " tokens and cannot take " +
                              std::to_string(n) + " more: the capacity is " +
                              std::to_string(kv.capacity()) +
                              " (make_cache with a larger capacity, or cache.kv().reserve)");
    }
  }
  void prepare_qk(const tensor_view<float, 2>& proj, const tensor_view<float, 2>& q,
                  const tensor_view<float, 2>& k) const {
    const index_t H = cfg_.heads, Hkv = cfg_.kv_heads, hd = cfg_.head_dim;
    auto qin = proj.slice(1, 0, H * hd);
    auto kin = proj.slice(1, off_k_, off_k_ + Hkv * hd);
    if (cfg_.qk_norm) {
      q_norm_.forward(qin, q);
      k_norm_.forward(kin, k);
    } else {
      for (index_t m = 0; m < proj.extent(0); ++m) {
        std::copy_n(qin.ptr({m, 0}), H * hd, q.ptr({m, 0}));
        std::copy_n(kin.ptr({m, 0}), Hkv * hd, k.ptr({m, 0}));
      }
    }
  }
  void apply_gate(const tensor_view<float, 2>& proj, const tensor_view<float, 2>& o) const {
    if (!cfg_.gated) return;
    const index_t n = cfg_.heads * cfg_.head_dim;
    for (index_t m = 0; m < o.extent(0); ++m) {
      const float* gr = proj.ptr({m, off_gate_});
      float* orow = o.ptr({m, 0});
      for (index_t i = 0; i < n; ++i) orow[i] *= math::sigmoid(gr[i]);
    }
  }

  void run(const tensor_view<const float, 3>& x, const tensor_view<float, 3>& y, cache_type& cache,
           std::span<const index_t> cu) {
    const index_t B = x.extent(0), T = x.extent(1), M = B * T;
    const index_t H = cfg_.heads, Hkv = cfg_.kv_heads, hd = cfg_.head_dim;
    auto proj = ws_.view<2>(0, {M, P_});
    auto q = ws_.view<2>(1, {M, H * hd});
    auto k = ws_.view<2>(2, {M, Hkv * hd});
    auto o = ws_.view<2>(3, {M, H * hd});
    detail::project_in(in_, x, proj);
    prepare_qk(proj, q, k);
    auto q4 = q.split(0, {B, T}).split(2, {H, hd});
    auto k4 = k.split(0, {B, T}).split(2, {Hkv, hd});
    auto v4 = proj.slice(1, off_v_, off_v_ + Hkv * hd).split(0, {B, T}).split(2, {Hkv, hd});
    auto o4 = o.split(0, {B, T}).split(2, {H, hd});
    const index_t rows = cu.empty() ? B : static_cast<index_t>(cu.size()) - 1;
    if (use_rope_) {
      pos_.resize(static_cast<std::size_t>(rows));
      for (index_t b = 0; b < rows; ++b) pos_[static_cast<std::size_t>(b)] = cache.length(b);
      if (cu.empty()) {
        rope_.apply(q4, pos_);
        rope_.apply(k4, pos_);
      } else {
        rope_.apply(q4, pos_, cu);
        rope_.apply(k4, pos_, cu);
      }
    }
    if (cu.empty()) {
      attn_.forward_chunked(q4, k4, v4, o4, cache.kv());
    } else {
      attn_.forward_chunked(q4, k4, v4, o4, cache.kv(), cu);
    }
    apply_gate(proj, o);
    detail::project_out(out_, o, y);
  }

  config_type cfg_{};
  weight_matrix in_, out_;
  rms_norm q_norm_, k_norm_;
  rope rope_;
  bool use_rope_ = false;
  softmax_attention<float> attn_;
  index_t off_gate_ = 0, off_k_ = 0, off_v_ = 0, P_ = 0;
  scratch ws_;
  std::vector<index_t> pos_;
};

}  // namespace seqmix::layers
