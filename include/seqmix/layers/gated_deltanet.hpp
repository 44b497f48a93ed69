// SPDX-License-Identifier: MIT
// Gated DeltaNet layer (Qwen3-Next's linear_attn, transformers' Qwen3NextGatedDeltaNet), on the
// gated_delta_net mixer (mixers/gated_delta_net.hpp, docs/math.md §2).
//
//   [q | k | v | z] = in_proj_qkvz(x)      grouped per key head on disk: [q dk | k dk | v r·dv |
//   [b | a]         = in_proj_ba(x)         z r·dv] and [b r | a r], r = HV / Hk
//   q, k, v = silu(conv1d([q ‖ k ‖ v]))     depthwise causal, kernel K, no bias
//   q, k    = l2norm(q), l2norm(k)          x · rsqrt(Σx² + 1e-6) per head; q scaled by dk^-1/2
//   g       = -exp(A_log) · softplus(a + dt_bias),  beta = sigmoid(b)
//   o       = gated delta rule(q, k, v, g, beta)    value head h reads key head h / r
//   y       = out_proj( rmsnorm(o) · w · silu(z) )  per value head, eps = norm_eps
//
// Weights (Hugging Face names under the prefix, f32 or bf16 matrices): in_proj_qkvz.weight
// [2·Hk·dk + 2·HV·dv, D], in_proj_ba.weight [2·HV, D], conv1d.weight [2·Hk·dk + HV·dv, 1, K],
// A_log [HV], dt_bias [HV], norm.weight [dv], out_proj.weight [D, HV·dv]. At load time the two
// projections are fused into one matrix whose rows are re-ordered to [q_all | k_all | v_all |
// z_all | b_all | a_all], so one GEMM writes every block contiguously. Qwen3.5 stores the
// projections split: in_proj_qkv.weight [2·Hk·dk + HV·dv, D] (q_all | k_all | v_all),
// in_proj_z.weight [HV·dv, D], in_proj_b.weight, in_proj_a.weight [HV, D]; they are
// concatenated into the same matrix (config.layout: detected from the names by default).
//
// Forms: forward(x [B, T, D]) prefill — the mixer's chosen form (chunked or recurrent, chunk
// `chunk_size`), continuing from the cache; packed variable-length forward over [1, T, D] with
// cu_seqlens and a cache row per sequence; step(x [B, D]) decode — recurrent, allocation-free
// once the layer has run a step of that batch size. The cache (layers/recurrent_cache.hpp) is
// conv [B, K-1, C] + state [B, HV, dk, dv] (transformers' recurrent_state layout).
//
// Cost per token: 2·D·(2·Hk·dk + 3·HV·dv + 2·HV) FLOP in projections, 2·K·C in the conv, the
// mixer's (7·dk·dv per head recurrent), O(HV·dv) for norms and gates. Scratch: ~(P + 4·C)·B·T
// floats, grow-only; the layer object is not shareable between threads calling it at once.
// Checks: x, y shapes and the cache's geometry (seqmix::shape_error naming the function and
// argument); weights: name, shape, dtype (seqmix::io_error).
#pragma once

#include <span>
#include <string>
#include <vector>

#include <seqmix/core/error.hpp>
#include <seqmix/core/io/checkpoint.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/layers/l2norm.hpp>
#include <seqmix/layers/recurrent_cache.hpp>
#include <seqmix/layers/recurrent_layer.hpp>
#include <seqmix/layers/rms_norm.hpp>
#include <seqmix/layers/short_conv.hpp>
#include <seqmix/layers/weights.hpp>
#include <seqmix/mixers/gated_delta_net.hpp>

namespace seqmix::layers {

struct gated_deltanet_config {
  index_t hidden = 0;       ///< D (hidden_size)
  index_t key_heads = 0;    ///< Hk (linear_num_key_heads)
  index_t value_heads = 0;  ///< HV (linear_num_value_heads), a multiple of Hk
  index_t key_dim = 0;      ///< dk (linear_key_head_dim)
  index_t value_dim = 0;    ///< dv (linear_value_head_dim)
  index_t conv_kernel = 4;  ///< K (linear_conv_kernel_dim)
  float norm_eps = 1e-6f;   ///< rms_norm_eps
  index_t chunk_size = 64;  ///< chunk of the mixer's chunked form
  /// Projection names: Qwen3-Next's fused in_proj_qkvz / in_proj_ba, Qwen3.5's split
  /// in_proj_qkv / in_proj_z / in_proj_b / in_proj_a, or detected from the checkpoint.
  enum class projection_layout { detect, qwen3_next_fused, qwen3_5_split };
  projection_layout layout = projection_layout::detect;
};

class gated_deltanet : public recurrent_layer<gated_deltanet> {
 public:
  using config_type = gated_deltanet_config;
  using cache_type = recurrent_cache;
  static constexpr layer_names names{"gated_deltanet::make_cache", "gated_deltanet::forward",
                                     "gated_deltanet::step"};

  /// What the layer passed to and got from the mixer in its last forward (views into its
  /// scratch, valid until the next call): q, k after the conv and before the l2norm
  /// [B, T, Hk, dk]; v [B, T, HV, dv]; g (log decay), beta [B, T, HV]; o [B, T, HV, dv].
  struct mixer_io {
    tensor_view<const float, 4> q, k, v;
    tensor_view<const float, 3> g, beta;
    tensor_view<const float, 4> o;
  };

  gated_deltanet() = default;

  static gated_deltanet load(const checkpoint& ck, const std::string& prefix,
                             const config_type& cfg) {
    return load(ck.scope(prefix), cfg);
  }
  static gated_deltanet load(const checkpoint_scope& scope, const config_type& cfg) {
    constexpr std::string_view who = "gated_deltanet::load";
    const checker check{who};
    detail::check_config_positive(
        check, {"hidden", "key_heads", "value_heads", "key_dim", "value_dim", "chunk_size"},
        {cfg.hidden, cfg.key_heads, cfg.value_heads, cfg.key_dim, cfg.value_dim, cfg.chunk_size});
    if (!(cfg.value_heads % cfg.key_heads == 0))
      check.fail("config.value_heads", "must be a multiple of key_heads (" +
                                           std::to_string(cfg.key_heads) + "), got " +
                                           std::to_string(cfg.value_heads));
    gated_deltanet l;
    l.cfg_ = cfg;
    const index_t Hk = cfg.key_heads, HV = cfg.value_heads, dk = cfg.key_dim, dv = cfg.value_dim;
    const index_t r = HV / Hk, D = cfg.hidden;
    const index_t per_head = 2 * dk + 2 * r * dv, qkvz = Hk * per_head;
    // new row -> row of [in_proj_qkvz; in_proj_ba]
    std::vector<index_t> order;
    order.reserve(static_cast<std::size_t>(qkvz + 2 * HV));
    for (index_t j = 0; j < Hk; ++j)
      for (index_t e = 0; e < dk; ++e) order.push_back(j * per_head + e);  // q
    for (index_t j = 0; j < Hk; ++j)
      for (index_t e = 0; e < dk; ++e) order.push_back(j * per_head + dk + e);  // k
    for (index_t j = 0; j < Hk; ++j)
      for (index_t e = 0; e < r * dv; ++e) order.push_back(j * per_head + 2 * dk + e);  // v
    for (index_t j = 0; j < Hk; ++j)
      for (index_t e = 0; e < r * dv; ++e) order.push_back(j * per_head + 2 * dk + r * dv + e);
    for (index_t j = 0; j < Hk; ++j)
      for (index_t i = 0; i < r; ++i) order.push_back(qkvz + j * 2 * r + i);  // b
    for (index_t j = 0; j < Hk; ++j)
      for (index_t i = 0; i < r; ++i) order.push_back(qkvz + j * 2 * r + r + i);  // a
    using layout_t = gated_deltanet_config::projection_layout;
    layout_t layout = cfg.layout;
    if (layout == layout_t::detect) {
      layout = scope.contains("in_proj_qkvz.weight") || !scope.contains("in_proj_qkv.weight")
                   ? layout_t::qwen3_next_fused
                   : layout_t::qwen3_5_split;
    }
    if (layout == layout_t::qwen3_next_fused) {
      l.in_ = weight_matrix::load(who, scope, {"in_proj_qkvz.weight", "in_proj_ba.weight"},
                                  {qkvz, 2 * HV}, D, order);
    } else {  // already [q_all | k_all | v_all], z, b, a: concatenated as stored
      l.in_ = weight_matrix::load(
          who, scope,
          {"in_proj_qkv.weight", "in_proj_z.weight", "in_proj_b.weight", "in_proj_a.weight"},
          {2 * Hk * dk + HV * dv, HV * dv, HV, HV}, D);
    }
    l.C_ = 2 * Hk * dk + HV * dv;
    l.P_ = l.C_ + HV * dv + 2 * HV;
    l.conv_ =
        short_conv::load(who, scope, "conv1d", l.C_, cfg.conv_kernel, false, conv_activation::silu);
    l.A_log_ = load_vector_tensor(who, scope, "A_log", HV);
    l.dt_bias_ = load_vector_tensor(who, scope, "dt_bias", HV);
    l.norm_ = gated_rms_norm::load(who, scope, "norm.weight", dv, cfg.norm_eps,
                                   norm_gate::silu_after, dv);
    l.out_ = weight_matrix::load(who, scope, {"out_proj.weight"}, {D}, HV * dv);
    typename gated_delta_net<float>::options opt;
    opt.chunk_size = cfg.chunk_size;
    l.mixer_ = gated_delta_net<float>(opt);
    return l;
  }

  /// The tensors load() reads under its prefix, for `cfg.layout` (detect: the fused names, the
  /// default when the checkpoint has no in_proj_qkv).
  static std::vector<std::string> tensor_names(const config_type& cfg) {
    using layout_t = gated_deltanet_config::projection_layout;
    std::vector<std::string> out;
    if (cfg.layout == layout_t::qwen3_5_split) {
      out = {"in_proj_qkv.weight", "in_proj_z.weight", "in_proj_b.weight", "in_proj_a.weight"};
    } else {
      out = {"in_proj_qkvz.weight", "in_proj_ba.weight"};
    }
    for (const char* n : {"conv1d.weight", "A_log", "dt_bias", "norm.weight", "out_proj.weight"})
      out.emplace_back(n);
    return out;
  }

  const config_type& config() const noexcept { return cfg_; }
  /// Bytes of weights (what a decode step streams).
  std::size_t weight_bytes() const noexcept { return in_.bytes() + out_.bytes(); }

  index_t hidden_size() const noexcept { return cfg_.hidden; }
  index_t conv_rows() const noexcept { return cfg_.conv_kernel - 1; }
  index_t conv_channels() const noexcept { return C_; }
  shape_t<3> state_dims() const noexcept {
    return {cfg_.value_heads, cfg_.key_dim, cfg_.value_dim};
  }

  mixer_io last_mixer_io() const { return io_; }

 private:
  friend class recurrent_layer<gated_deltanet>;
  // rows empty: row b of the cache for token b (one batched conv and mixer step); otherwise
  // one conv and mixer step per token on its cache row (views, no copies)
  void step_rows(const tensor_view<const float, 2>& x, const tensor_view<float, 2>& y,
                 cache_type& cache, std::span<const index_t> rows) {
    const index_t B = x.extent(0);
    const index_t Hk = cfg_.key_heads, HV = cfg_.value_heads, dk = cfg_.key_dim,
                  dv = cfg_.value_dim;
    auto proj = ws_.view<2>(0, {B, P_});
    auto xc = ws_.view<2>(1, {B, C_});
    auto qn = ws_.view<2>(2, {B, Hk * dk});
    auto kn = ws_.view<2>(3, {B, Hk * dk});
    auto g = ws_.view<2>(4, {B, HV});
    auto beta = ws_.view<2>(5, {B, HV});
    auto o = ws_.view<2>(6, {B, HV * dv});
    auto nz = ws_.view<2>(7, {B, HV * dv});
    in_.apply(x, proj);
    auto conv_in = proj.slice(1, 0, C_);
    if (rows.empty()) {
      conv_.step(conv_in, xc, cache.conv().view());
    } else {
      for (index_t i = 0; i < B; ++i) {
        const index_t r = rows[static_cast<std::size_t>(i)];
        conv_.step(conv_in.slice(0, i, i + 1), xc.slice(0, i, i + 1),
                   cache.conv().slice(0, r, r + 1));
      }
    }
    l2norm(xc.slice(1, 0, Hk * dk), qn, dk, 1e-6f, l2_eps::rsqrt_sum);
    l2norm(xc.slice(1, Hk * dk, 2 * Hk * dk), kn, dk, 1e-6f, l2_eps::rsqrt_sum);
    const index_t ob = C_ + HV * dv, oa = ob + HV;
    gated_delta_gates<float>(proj.slice(1, oa, oa + HV).unsqueeze(1),
                             proj.slice(1, ob, ob + HV).unsqueeze(1), A_log_.view(),
                             dt_bias_.view(), g.unsqueeze(1), beta.unsqueeze(1));
    auto q3 = qn.split(1, {Hk, dk});
    auto k3 = kn.split(1, {Hk, dk});
    auto v3 = xc.slice(1, 2 * Hk * dk, C_).split(1, {HV, dv});
    auto o3 = o.split(1, {HV, dv});
    if (rows.empty()) {
      mixer_.step(q3, k3, v3, g, beta, o3, cache.state().view());
      for (index_t b = 0; b < B; ++b) cache.advance(b, 1);
    } else {
      for (index_t i = 0; i < B; ++i) {
        const index_t r = rows[static_cast<std::size_t>(i)];
        mixer_.step(q3.slice(0, i, i + 1), k3.slice(0, i, i + 1), v3.slice(0, i, i + 1),
                    g.slice(0, i, i + 1), beta.slice(0, i, i + 1), o3.slice(0, i, i + 1),
                    cache.state().slice(0, r, r + 1));
        cache.advance(r, 1);
      }
    }
    norm_.forward(o, proj.slice(1, C_, C_ + HV * dv), nz);
    out_.apply(nz, y);
  }

  void run(const tensor_view<const float, 3>& x, const tensor_view<float, 3>& y, cache_type& cache,
           std::span<const index_t> cu) {
    const index_t B = x.extent(0), T = x.extent(1), M = B * T;
    const index_t Hk = cfg_.key_heads, HV = cfg_.value_heads, dk = cfg_.key_dim,
                  dv = cfg_.value_dim;
    auto proj = ws_.view<2>(0, {M, P_});
    auto xc = ws_.view<2>(1, {M, C_});
    auto qn = ws_.view<2>(2, {M, Hk * dk});
    auto kn = ws_.view<2>(3, {M, Hk * dk});
    auto g = ws_.view<2>(4, {M, HV});
    auto beta = ws_.view<2>(5, {M, HV});
    auto o = ws_.view<2>(6, {M, HV * dv});
    auto nz = ws_.view<2>(7, {M, HV * dv});
    detail::project_in(in_, x, proj);
    auto conv_in = proj.slice(1, 0, C_).split(0, {B, T});
    if (cu.empty()) {
      conv_.forward(conv_in, xc.split(0, {B, T}), cache.conv().view());
    } else {
      conv_.forward(conv_in, xc.split(0, {B, T}), cache.conv().view(), cu);
    }
    l2norm(xc.slice(1, 0, Hk * dk), qn, dk, 1e-6f, l2_eps::rsqrt_sum);
    l2norm(xc.slice(1, Hk * dk, 2 * Hk * dk), kn, dk, 1e-6f, l2_eps::rsqrt_sum);
    const index_t ob = C_ + HV * dv, oa = ob + HV;
    auto g3 = g.split(0, {B, T});
    auto beta3 = beta.split(0, {B, T});
    gated_delta_gates<float>(proj.slice(1, oa, oa + HV).split(0, {B, T}),
                             proj.slice(1, ob, ob + HV).split(0, {B, T}), A_log_.view(),
                             dt_bias_.view(), g3, beta3);
    auto q4 = qn.split(0, {B, T}).split(2, {Hk, dk});
    auto k4 = kn.split(0, {B, T}).split(2, {Hk, dk});
    auto v4 = xc.slice(1, 2 * Hk * dk, C_).split(0, {B, T}).split(2, {HV, dv});
    auto o4 = o.split(0, {B, T}).split(2, {HV, dv});
    if (cu.empty()) {
      mixer_.forward(q4, k4, v4, g3, beta3, o4, cache.state().view());
    } else {
      mixer_.forward(q4, k4, v4, g3, beta3, o4, cache.state().view(), cu);
    }
    io_ = {xc.slice(1, 0, Hk * dk).split(0, {B, T}).split(2, {Hk, dk}),
           xc.slice(1, Hk * dk, 2 * Hk * dk).split(0, {B, T}).split(2, {Hk, dk}),
           v4,
           g3,
           beta3,
           o4};
    norm_.forward(o, proj.slice(1, C_, C_ + HV * dv), nz);
    detail::project_out(out_, nz, y);
    if (cu.empty()) {
      for (index_t b = 0; b < B; ++b) cache.advance(b, T);
    } else {
      for (std::size_t n = 0; n + 1 < cu.size(); ++n)
        cache.advance(static_cast<index_t>(n), cu[n + 1] - cu[n]);
    }
  }

  config_type cfg_{};
  index_t C_ = 0, P_ = 0;  // conv channels, fused projection width
  weight_matrix in_, out_;
  short_conv conv_;
  tensor<float, 1> A_log_, dt_bias_;
  gated_rms_norm norm_;
  gated_delta_net<float> mixer_;
  scratch ws_;
  mixer_io io_{};
};

}  // namespace seqmix::layers
