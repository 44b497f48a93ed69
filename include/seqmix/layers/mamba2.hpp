// SPDX-License-Identifier: MIT
// Mamba2 layer (transformers' Mamba2Mixer; GraniteMoeHybrid's mamba layers), on the mamba2_ssd
// mixer (mixers/mamba2_ssd.hpp, docs/math.md §4).
//
//   [z | xBC | dt] = in_proj(x)                      z [I], xBC [I + 2·G·N], dt [H]; I = H·P
//   xBC            = silu(conv1d(xBC) + conv bias)    depthwise causal, kernel K
//   x, B, C        = split(xBC)                       x [H, P]; B, C [G, N], head h uses group
//   h/(H/G) dt             = clamp(softplus(dt + dt_bias), time_step_limit),  A = -exp(A_log) y =
//   SSD(x, dt, A, B, C) + D·x        (chunk `chunk_size` in prefill) out            = out_proj(
//   rmsnorm(y · silu(z)) · w )          gate before the norm, eps
//
// Weights (under the prefix; f32 or bf16 matrices): in_proj.weight [2I + 2GN + H, D] (+ .bias
// when use_bias), conv1d.weight [I + 2GN, 1, K] (+ conv1d.bias when use_conv_bias), dt_bias,
// A_log, D [H], norm.weight [I], out_proj.weight [D, I] (+ .bias). The gated norm runs over the
// full width I (transformers' MambaRMSNormGated) or, with norm_groups = G, over groups of I/G
// (mamba_ssm's RMSNormGated with group_size).
//
// Cache: layers/recurrent_cache.hpp, conv [B, K-1, I + 2GN] and state [B, H, N, P] (seqmix's
// layout; mamba2_state_to_pn gives transformers' [B, H, P, N]). Forms: forward (prefill,
// continuing from the cache), packed variable-length forward (cu_seqlens), step (decode,
// recurrent, allocation-free once the layer has stepped that batch size).
//
// Cost per token: 2·D·(3I + 2GN + H) FLOP in projections, 2·K·(I + 2GN) in the conv, the scan's
// (5·N·P per head recurrent; 2C(N+P) + 4NP chunked). Scratch grow-only; the layer object is not
// shareable between threads calling it at once.
#pragma once

#include <limits>
#include <span>
#include <string>

#include <seqmix/core/error.hpp>
#include <seqmix/core/io/checkpoint.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/layers/linear.hpp>
#include <seqmix/layers/recurrent_cache.hpp>
#include <seqmix/layers/recurrent_layer.hpp>
#include <seqmix/layers/rms_norm.hpp>
#include <seqmix/layers/short_conv.hpp>
#include <seqmix/layers/weights.hpp>
#include <seqmix/mixers/mamba2_ssd.hpp>

namespace seqmix::layers {

struct mamba2_config {
  index_t hidden = 0;        ///< D
  index_t heads = 0;         ///< H (num_heads / mamba_n_heads)
  index_t head_dim = 0;      ///< P (head_dim / mamba_d_head); I = H·P
  index_t state_size = 0;    ///< N (state_size / mamba_d_state)
  index_t groups = 1;        ///< G (n_groups / mamba_n_groups)
  index_t conv_kernel = 4;   ///< K (conv_kernel / mamba_d_conv)
  index_t chunk_size = 256;  ///< SSD chunk (chunk_size / mamba_chunk_size)
  float norm_eps = 1e-5f;    ///< layer_norm_epsilon / rms_norm_eps
  float dt_min = 0.0f;       ///< time_step_limit[0]
  float dt_max = std::numeric_limits<float>::infinity();  ///< time_step_limit[1]
  bool use_conv_bias = true;
  bool use_bias = false;    ///< in_proj / out_proj bias
  index_t norm_groups = 1;  ///< gated norm over I / norm_groups elements
};

class mamba2 : public recurrent_layer<mamba2> {
 public:
  using config_type = mamba2_config;
  using cache_type = recurrent_cache;
  static constexpr layer_names names{"mamba2::make_cache", "mamba2::forward", "mamba2::step"};

  mamba2() = default;

  static mamba2 load(const checkpoint& ck, const std::string& prefix, const config_type& cfg) {
    return load(ck.scope(prefix), cfg);
  }
  static mamba2 load(const checkpoint_scope& scope, const config_type& cfg) {
    constexpr std::string_view who = "mamba2::load";
    const checker check{who};
    detail::check_config_positive(
        check, {"hidden", "heads", "head_dim", "state_size", "groups", "chunk_size", "norm_groups"},
        {cfg.hidden, cfg.heads, cfg.head_dim, cfg.state_size, cfg.groups, cfg.chunk_size,
         cfg.norm_groups});
    if (!(cfg.heads % cfg.groups == 0))
      check.fail("config.groups", "must divide heads (" + std::to_string(cfg.heads) + "), got " +
                                      std::to_string(cfg.groups));
    mamba2 l;
    l.cfg_ = cfg;
    const index_t H = cfg.heads, I = H * cfg.head_dim, GN = cfg.groups * cfg.state_size;
    if (!(I % cfg.norm_groups == 0))
      check.fail("config.norm_groups", "must divide heads · head_dim (" + std::to_string(I) +
                                           "), got " + std::to_string(cfg.norm_groups));
    l.I_ = I;
    l.C_ = I + 2 * GN;
    l.P_ = I + l.C_ + H;
    l.in_ = linear::load(who, scope, "in_proj", l.P_, cfg.hidden, cfg.use_bias);
    l.out_ = linear::load(who, scope, "out_proj", cfg.hidden, I, cfg.use_bias);
    l.conv_ = short_conv::load(who, scope, "conv1d", l.C_, cfg.conv_kernel, cfg.use_conv_bias,
                               conv_activation::silu);
    l.A_log_ = load_vector_tensor(who, scope, "A_log", H);
    l.dt_bias_ = load_vector_tensor(who, scope, "dt_bias", H);
    l.D_ = load_vector_tensor(who, scope, "D", H);
    l.norm_ = gated_rms_norm::load(who, scope, "norm.weight", I, cfg.norm_eps,
                                   norm_gate::silu_before, I / cfg.norm_groups);
    typename mamba2_ssd<float>::options opt;
    opt.chunk_size = cfg.chunk_size;
    opt.dt_softplus = true;
    opt.dt_min = cfg.dt_min;
    opt.dt_max = cfg.dt_max;
    l.ssd_ = mamba2_ssd<float>(opt);
    return l;
  }

  const config_type& config() const noexcept { return cfg_; }
  std::size_t weight_bytes() const noexcept { return in_.weight().bytes() + out_.weight().bytes(); }

  index_t hidden_size() const noexcept { return cfg_.hidden; }
  index_t conv_rows() const noexcept { return cfg_.conv_kernel - 1; }
  index_t conv_channels() const noexcept { return C_; }
  shape_t<3> state_dims() const noexcept { return {cfg_.heads, cfg_.state_size, cfg_.head_dim}; }

 private:
  friend class recurrent_layer<mamba2>;
  // rows empty: cache row b for token b (batched); otherwise per token on its row (views)
  void step_rows(const tensor_view<const float, 2>& x, const tensor_view<float, 2>& y,
                 cache_type& cache, std::span<const index_t> rows) {
    const index_t B = x.extent(0);
    const index_t H = cfg_.heads, P = cfg_.head_dim, G = cfg_.groups, N = cfg_.state_size;
    auto proj = ws_.view<2>(0, {B, P_});
    auto xc = ws_.view<2>(1, {B, C_});
    auto ys = ws_.view<2>(2, {B, I_});
    in_.forward(x, proj);
    auto conv_in = proj.slice(1, I_, I_ + C_);
    auto x3 = xc.slice(1, 0, I_).split(1, {H, P});
    auto dt = proj.slice(1, I_ + C_, P_);
    auto B3 = xc.slice(1, I_, I_ + G * N).split(1, {G, N});
    auto C3 = xc.slice(1, I_ + G * N, C_).split(1, {G, N});
    auto y3 = ys.split(1, {H, P});
    if (rows.empty()) {
      conv_.step(conv_in, xc, cache.conv().view());
      ssd_.step(x3, dt, A_log_.view(), B3, C3, D_.view(), dt_bias_.view(), y3,
                cache.state().view());
      for (index_t b = 0; b < B; ++b) cache.advance(b, 1);
    } else {
      for (index_t i = 0; i < B; ++i) {
        const index_t r = rows[static_cast<std::size_t>(i)];
        conv_.step(conv_in.slice(0, i, i + 1), xc.slice(0, i, i + 1),
                   cache.conv().slice(0, r, r + 1));
        ssd_.step(x3.slice(0, i, i + 1), dt.slice(0, i, i + 1), A_log_.view(),
                  B3.slice(0, i, i + 1), C3.slice(0, i, i + 1), D_.view(), dt_bias_.view(),
                  y3.slice(0, i, i + 1), cache.state().slice(0, r, r + 1));
        cache.advance(r, 1);
      }
    }
    norm_.forward(ys, proj.slice(1, 0, I_), ys);
    out_.forward(ys, y);
  }

  void run(const tensor_view<const float, 3>& x, const tensor_view<float, 3>& y, cache_type& cache,
           std::span<const index_t> cu) {
    const index_t B = x.extent(0), T = x.extent(1), M = B * T;
    const index_t H = cfg_.heads, P = cfg_.head_dim, G = cfg_.groups, N = cfg_.state_size;
    auto proj = ws_.view<2>(0, {M, P_});
    auto xc = ws_.view<2>(1, {M, C_});
    auto ys = ws_.view<2>(2, {M, I_});
    in_.forward(x, proj.split(0, {B, T}));
    auto conv_in = proj.slice(1, I_, I_ + C_).split(0, {B, T});
    if (cu.empty()) {
      conv_.forward(conv_in, xc.split(0, {B, T}), cache.conv().view());
    } else {
      conv_.forward(conv_in, xc.split(0, {B, T}), cache.conv().view(), cu);
    }
    auto xs = xc.slice(1, 0, I_).split(0, {B, T}).split(2, {H, P});
    auto Bm = xc.slice(1, I_, I_ + G * N).split(0, {B, T}).split(2, {G, N});
    auto Cm = xc.slice(1, I_ + G * N, C_).split(0, {B, T}).split(2, {G, N});
    auto dt = proj.slice(1, I_ + C_, P_).split(0, {B, T});
    auto y4 = ys.split(0, {B, T}).split(2, {H, P});
    ssd_.forward(xs, dt, A_log_.view(), Bm, Cm, D_.view(), dt_bias_.view(), y4,
                 cache.state().view(), cu);
    norm_.forward(ys, proj.slice(1, 0, I_), ys);
    tensor_view<float, 2> y2;
    if (fuse_rows(y, y2)) {
      out_.forward(ys, y2);
    } else {
      for (index_t b = 0; b < B; ++b)
        out_.forward(ys.slice(0, b * T, (b + 1) * T), y.template select<0>(b));
    }
    if (cu.empty()) {
      for (index_t b = 0; b < B; ++b) cache.advance(b, T);
    } else {
      for (std::size_t n = 0; n + 1 < cu.size(); ++n)
        cache.advance(static_cast<index_t>(n), cu[n + 1] - cu[n]);
    }
  }

  config_type cfg_{};
  index_t I_ = 0, C_ = 0, P_ = 0;
  linear in_, out_;
  short_conv conv_;
  tensor<float, 1> A_log_, dt_bias_, D_;
  gated_rms_norm norm_;
  mamba2_ssd<float> ssd_;
  scratch ws_;
};

}  // namespace seqmix::layers
