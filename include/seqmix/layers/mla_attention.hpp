// SPDX-License-Identifier: MIT
// Multi-head latent attention layer (DeepSeek-V2/V3's MLA in the NoPE form Kimi-Linear uses,
// transformers' KimiMLAAttention), on softmax_attention (mixers/softmax_attention.hpp).
//
//   q            = q_proj(x)                    or q_b_proj(rmsnorm_q(q_a_proj(x))) (q-LoRA)
//                                               per head [q_nope dn | q_rot dr]
//   [c | k_rot]  = kv_a_proj_with_mqa(x)        latent c [r], k_rot [dr] shared by all heads
//   c            = rmsnorm(c) · w               kv_a_layernorm, eps kv_norm_eps (1e-6: the
//                                               module's default, not rms_norm_eps)
//   [k_nope | v] = kv_b_proj(c)                 per head [k_nope dn | v dv]
//   k            = [k_nope | k_rot]             per head (k_rot copied to every head; NoPE:
//                                               not rotated)
//   o            = softmax(s · q kᵀ + causal) v   s = (dn + dr)^-1/2 unless `scale` is set
//   y            = o_proj(o)
//
// Weights (under the prefix; f32 or bf16): q_proj.weight [H·(dn+dr), D] (or q_a_proj.weight
// [rq, D], q_a_layernorm.weight [rq], q_b_proj.weight [H·(dn+dr), rq]), kv_a_proj_with_mqa.weight
// [r + dr, D], kv_a_layernorm.weight [r], kv_b_proj.weight [H·(dn+dv), r], o_proj.weight
// [D, H·dv]. q_proj (or q_a_proj) and kv_a_proj_with_mqa are fused at load time into one GEMM.
//
// RoPE: Kimi-Linear's MLA has none (its config has no rope fields); this layer implements only
// the NoPE form, and a loader that sees a rope setting for MLA must reject it.
//
// Cache: the decompressed keys and values per head, an attention_cache (a full kv_cache of
// [B, H, capacity, dn+dr] keys and [B, H, capacity, dv] values), not transformers' compressed
// (latent, k_rot) cache: (dn+dr+dv)·H floats per token instead of r + dr (here 224 vs 48), in
// exchange for a decode step that reads K/V directly instead of re-expanding every cached
// latent (or absorbing kv_b into q and o). Truncate / snapshot / restore as attention_cache.
//
// Forms: forward (prefill, chunked attention over the cache and the new tokens), packed
// variable-length forward (cu_seqlens, one cache row per sequence), step (decode, allocation-
// free once the layer has stepped that batch size). Cost per token: 2·D·(H·(dn+dr) + r + dr) +
// 2·r·H·(dn+dv) + 2·H·dv·D FLOP in projections, 2·H·(dn+dr+dv)·L in attention over L cached
// tokens. Scratch grow-only; the layer object is not shareable between threads calling it at
// once. Checks: x, y shapes and the cache geometry (seqmix::shape_error naming the function and
// argument); weights: name, shape, dtype (seqmix::io_error).
#pragma once

#include <cmath>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <seqmix/core/error.hpp>
#include <seqmix/core/io/checkpoint.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/layers/gated_attention.hpp>
#include <seqmix/layers/rms_norm.hpp>
#include <seqmix/layers/weights.hpp>
#include <seqmix/mixers/kv_cache.hpp>
#include <seqmix/mixers/softmax_attention.hpp>

namespace seqmix::layers {

struct mla_attention_config {
  index_t hidden = 0;            ///< D
  index_t heads = 0;             ///< H (num_attention_heads)
  index_t q_lora_rank = 0;       ///< rq; 0: a plain q_proj
  index_t kv_lora_rank = 0;      ///< r
  index_t qk_nope_dim = 0;       ///< dn (qk_nope_head_dim)
  index_t qk_rope_dim = 0;       ///< dr (qk_rope_head_dim; not rotated: NoPE)
  index_t v_dim = 0;             ///< dv (v_head_dim)
  float kv_norm_eps = 1e-6f;     ///< kv_a_layernorm's eps (and q_a_layernorm's)
  std::optional<float> scale{};  ///< softmax scale; default (dn + dr)^-1/2
  index_t chunk_size = 64;       ///< key tile of the chunked attention
};

class mla_attention {
 public:
  using config_type = mla_attention_config;
  using cache_type = attention_cache;

  mla_attention() = default;

  static mla_attention load(const checkpoint& ck, const std::string& prefix,
                            const config_type& cfg) {
    return load(ck.scope(prefix), cfg);
  }
  static mla_attention load(const checkpoint_scope& scope, const config_type& cfg) {
    constexpr std::string_view who = "mla_attention::load";
    const checker check{who};
    detail::check_config_positive(
        check, {"hidden", "heads", "kv_lora_rank", "qk_nope_dim", "v_dim", "chunk_size"},
        {cfg.hidden, cfg.heads, cfg.kv_lora_rank, cfg.qk_nope_dim, cfg.v_dim, cfg.chunk_size});
    if (!(cfg.qk_rope_dim >= 0 && cfg.q_lora_rank >= 0))
      check.fail("config.qk_rope_dim", "qk_rope_dim and q_lora_rank must be >= 0");
    mla_attention l;
    l.cfg_ = cfg;
    const index_t H = cfg.heads, D = cfg.hidden, r = cfg.kv_lora_rank;
    l.dk_ = cfg.qk_nope_dim + cfg.qk_rope_dim;
    const index_t qw = cfg.q_lora_rank > 0 ? cfg.q_lora_rank : H * l.dk_;
    l.in_ = weight_matrix::load(
        who, scope,
        {cfg.q_lora_rank > 0 ? "q_a_proj.weight" : "q_proj.weight", "kv_a_proj_with_mqa.weight"},
        {qw, r + cfg.qk_rope_dim}, D);
    l.qw_ = qw;
    l.P_ = qw + r + cfg.qk_rope_dim;
    if (cfg.q_lora_rank > 0) {
      l.q_norm_ = rms_norm::load(who, scope, "q_a_layernorm.weight", qw, cfg.kv_norm_eps,
                                 norm_weight::plain);
      l.q_b_ = weight_matrix::load(who, scope, {"q_b_proj.weight"}, {H * l.dk_}, qw);
    }
    l.kv_norm_ =
        rms_norm::load(who, scope, "kv_a_layernorm.weight", r, cfg.kv_norm_eps, norm_weight::plain);
    l.kv_b_ = weight_matrix::load(who, scope, {"kv_b_proj.weight"},
                                  {H * (cfg.qk_nope_dim + cfg.v_dim)}, r);
    l.out_ = weight_matrix::load(who, scope, {"o_proj.weight"}, {D}, H * cfg.v_dim);
    typename softmax_attention<float>::options opt;
    opt.scale = cfg.scale;
    opt.chunk_size = cfg.chunk_size;
    l.attn_ = softmax_attention<float>(opt);
    return l;
  }

  /// Every tensor the layer reads for `cfg` (names under its prefix).
  static std::vector<std::string> tensor_names(const config_type& cfg) {
    std::vector<std::string> n{"kv_a_proj_with_mqa.weight", "kv_a_layernorm.weight",
                               "kv_b_proj.weight", "o_proj.weight"};
    if (cfg.q_lora_rank > 0) {
      n.insert(n.end(), {"q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight"});
    } else {
      n.push_back("q_proj.weight");
    }
    return n;
  }

  const config_type& config() const noexcept { return cfg_; }
  std::size_t weight_bytes() const noexcept {
    return in_.bytes() + q_b_.bytes() + kv_b_.bytes() + out_.bytes();
  }
  index_t key_dim() const noexcept { return dk_; }

  /// A cache of `capacity` tokens per sequence: decompressed keys [dn+dr] and values [dv] of
  /// every head.
  cache_type make_cache(index_t batch, index_t capacity) const {
    const checker check{"mla_attention::make_cache"};
    if (!(batch >= 1)) check.fail("batch", "must be >= 1, got " + std::to_string(batch));
    if (!(capacity >= 1)) check.fail("capacity", "must be >= 1, got " + std::to_string(capacity));
    return cache_type(attn_.make_cache(batch, cfg_.heads, dk_, cfg_.v_dim, capacity));
  }

  /// Prefill: x [B, T, D] -> y [B, T, D]; the tokens are appended to `cache` ([B] sequences).
  void forward(tensor_view<const float, 3> x, tensor_view<float, 3> y, cache_type& cache) {
    const checker check{"mla_attention::forward"};
    check_x(check, x, y);
    check_cache(check, cache, x.extent(0));
    for (index_t b = 0; b < x.extent(0); ++b) check_room(check, cache, b, x.extent(1));
    run(x, y, cache, {});
  }
  /// Packed variable-length prefill: x, y [1, T, D], cu_seqlens [N+1]; row n of `cache`.
  void forward(tensor_view<const float, 3> x, tensor_view<float, 3> y, cache_type& cache,
               std::span<const index_t> cu_seqlens) {
    const checker check{"mla_attention::forward"};
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
    const checker check{"mla_attention::step"};
    check.nonempty("x", x);
    const index_t B = x.extent(0), H = cfg_.heads;
    check.shape("x", x, {B, cfg_.hidden});
    check.shape("y", y, {B, cfg_.hidden});
    check.inner_contiguous("x", x);
    check.inner_contiguous("y", y);
    check.no_overlap({range_of("y", y)}, {range_of("x", x)});
    check_cache(check, cache, B);
    for (index_t b = 0; b < B; ++b) check_room(check, cache, b, 1);
    const views w = make_views(B);
    in_.apply(x, w.proj);
    expand(w);
    attn_.step(w.q.split(1, {H, dk_}), w.k.split(1, {H, dk_}), w.v.split(1, {H, cfg_.v_dim}),
               w.o.split(1, {H, cfg_.v_dim}), cache.kv());
    out_.apply(w.o, y);
  }
  /// Continuous batching: token i of x [B, D] continues cache row rows[i] (B distinct rows of
  /// a cache of any size); the other rows are untouched. Allocates nothing once warm.
  void step(tensor_view<const float, 2> x, tensor_view<float, 2> y, cache_type& cache,
            std::span<const index_t> rows) {
    const checker check{"mla_attention::step"};
    check.nonempty("x", x);
    const index_t B = x.extent(0), H = cfg_.heads;
    check.shape("x", x, {B, cfg_.hidden});
    check.shape("y", y, {B, cfg_.hidden});
    check.inner_contiguous("x", x);
    check.inner_contiguous("y", y);
    check.no_overlap({range_of("y", y)}, {range_of("x", x)});
    check_cache(check, cache, cache.batch());
    front::check_rows(check, rows, B, cache.batch());
    if (cache.kv().is_ring()) check.fail("cache", "a state-index step needs a full cache");
    for (index_t b : rows) check_room(check, cache, b, 1);
    const views w = make_views(B);
    in_.apply(x, w.proj);
    expand(w);
    attn_.step(w.q.split(1, {H, dk_}), w.k.split(1, {H, dk_}), w.v.split(1, {H, cfg_.v_dim}),
               w.o.split(1, {H, cfg_.v_dim}), cache.kv(), rows);
    out_.apply(w.o, y);
  }

 private:
  struct views {
    tensor_view<float, 2> proj, qa, q, c, kvb, k, v, o;
  };
  views make_views(index_t M) {
    const index_t H = cfg_.heads, r = cfg_.kv_lora_rank, dv = cfg_.v_dim;
    return {ws_.view<2>(0, {M, P_}),
            ws_.view<2>(1, {M, qw_}),
            ws_.view<2>(2, {M, H * dk_}),
            ws_.view<2>(3, {M, r}),
            ws_.view<2>(4, {M, H * (cfg_.qk_nope_dim + dv)}),
            ws_.view<2>(5, {M, H * dk_}),
            ws_.view<2>(6, {M, H * dv}),
            ws_.view<2>(7, {M, H * dv})};
  }
  // proj [M, q | c | k_rot] -> q [M, H·dk], k [M, H·dk], v [M, H·dv]
  void expand(const views& w) const {
    const index_t M = w.proj.extent(0), H = cfg_.heads, r = cfg_.kv_lora_rank;
    const index_t dn = cfg_.qk_nope_dim, dr = cfg_.qk_rope_dim, dv = cfg_.v_dim;
    if (cfg_.q_lora_rank > 0) {
      q_norm_.forward(w.proj.slice(1, 0, qw_), w.qa);
      q_b_.apply(w.qa, w.q);
    } else {
      for (index_t m = 0; m < M; ++m) std::copy_n(w.proj.ptr({m, 0}), qw_, w.q.ptr({m, 0}));
    }
    kv_norm_.forward(w.proj.slice(1, qw_, qw_ + r), w.c);
    kv_b_.apply(w.c, w.kvb);
    for (index_t m = 0; m < M; ++m) {
      const float* kb = w.kvb.ptr({m, 0});
      const float* kr = w.proj.ptr({m, qw_ + r});
      float* kp = w.k.ptr({m, 0});
      float* vp = w.v.ptr({m, 0});
      for (index_t h = 0; h < H; ++h) {
        const float* src = kb + h * (dn + dv);
        std::copy_n(src, dn, kp + h * dk_);
        std::copy_n(kr, dr, kp + h * dk_ + dn);
        std::copy_n(src + dn, dv, vp + h * dv);
      }
    }
  }

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
    if (kv.batch() != rows || kv.kv_heads() != cfg_.heads || kv.key_dim() != dk_ ||
        kv.value_dim() != cfg_.v_dim) {
      check.fail("cache", "expected a cache of " + std::to_string(rows) + " sequences, " +
                              std::to_string(cfg_.heads) + " heads, key dim " +
                              std::to_string(dk_) + ", value dim " + std::to_string(cfg_.v_dim) +
                              ", got " + std::to_string(kv.batch()) + " sequences, " +
                              std::to_string(kv.kv_heads()) + " heads, key dim " +
                              std::to_string(kv.key_dim()) + ", value dim " +
                              std::to_string(kv.value_dim()));
    }
  }
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

  void run(const tensor_view<const float, 3>& x, const tensor_view<float, 3>& y, cache_type& cache,
           std::span<const index_t> cu) {
    const index_t B = x.extent(0), T = x.extent(1), M = B * T, H = cfg_.heads;
    const views w = make_views(M);
    detail::project_in(in_, x, w.proj);
    expand(w);
    auto q4 = w.q.split(0, {B, T}).split(2, {H, dk_});
    auto k4 = w.k.split(0, {B, T}).split(2, {H, dk_});
    auto v4 = w.v.split(0, {B, T}).split(2, {H, cfg_.v_dim});
    auto o4 = w.o.split(0, {B, T}).split(2, {H, cfg_.v_dim});
    if (cu.empty()) {
      attn_.forward_chunked(q4, k4, v4, o4, cache.kv());
    } else {
      attn_.forward_chunked(q4, k4, v4, o4, cache.kv(), cu);
    }
    detail::project_out(out_, w.o, y);
  }

  config_type cfg_{};
  weight_matrix in_, q_b_, kv_b_, out_;
  rms_norm q_norm_, kv_norm_;
  softmax_attention<float> attn_;
  index_t dk_ = 0, qw_ = 0, P_ = 0;
  scratch ws_;
};

}  // namespace seqmix::layers
