// SPDX-License-Identifier: MIT
// Kimi Delta Attention layer (Kimi-Linear's linear-attention layers, transformers'
// KimiDeltaAttention), on the kda mixer (mixers/kda.hpp, docs/math.md §2.3).
//
//   q, k, v = q_proj(x), k_proj(x), v_proj(x)      H heads of dk (q, k), HV heads of dv (v)
//   q, k, v = silu(conv1d([q ‖ k ‖ v]))            q_conv1d, k_conv1d, v_conv1d: depthwise causal,
//                                                  kernel K, no bias (one conv over 3 blocks)
//   q, k    = l2norm(q), l2norm(k)                 x / sqrt(Σx² + 1e-6) per head; q · dk^-1/2
//   g       = -exp(A_log[h]) · softplus(f_b(f_a(x)) + dt_bias)     per key channel [HV, dk]
//   beta    = sigmoid(b_proj(x))                   [HV]
//   o       = KDA(q, k, v, g, beta)                S = Diag(exp g) S, then the delta update
//   y       = o_proj( rmsnorm(o) · w · sigmoid(g_b(g_a(x))) )     per value head, eps norm_eps
//
// Weights (Hugging Face names under the prefix, f32 or bf16 matrices): q_proj.weight,
// k_proj.weight [H·dk, D], v_proj.weight [HV·dv, D], {q,k,v}_conv1d.weight [·, 1, K],
// f_a_proj.weight [r_f, D], f_b_proj.weight [HV·dk, r_f], b_proj.weight [HV, D], A_log [HV]
// or [1, 1, HV, 1] (as Kimi stores it), dt_bias [HV·dk], g_a_proj.weight [r_g, D],
// g_b_proj.weight [HV·dv, r_g], o_norm.weight [dv], o_proj.weight [D, HV·dv]. The five
// projections that read x are fused at load time into one matrix with rows [q | k | v | f_a |
// b | g_a], so one GEMM writes every block; f_b and g_b are the second GEMMs of the two
// low-rank gates. The three convs become one conv over C = 2·H·dk + HV·dv channels [q ‖ k ‖ v]
// (transformers' conv_state0 order).
//
// Forms: forward(x [B, T, D]) prefill — the mixer's chosen form (kda::forward: chunked or
// recurrent, chunk `chunk_size`), continuing from the cache; packed variable-length forward
// with cu_seqlens; step(x [B, D]) decode — recurrent, allocation-free once the layer has run a
// step of that batch size; step with cache rows (continuous batching). The cache
// (layers/recurrent_cache.hpp) is conv [B, K-1, C] (the last K-1 pre-activation inputs;
// transformers keeps K columns, the oldest never read) + state [B, HV, dk, dv].
//
// Cost per token: 2·D·(2·H·dk + HV·dv + r_f + HV + r_g) + 2·r_f·HV·dk + 2·r_g·HV·dv + 2·HV·dv·D
// FLOP in projections, 2·K·C in the conv, the mixer's (7·dk·dv per head recurrent), O(HV·dk)
// exps for the gates. Scratch grow-only; the layer object is not shareable between threads
// calling it at once. Checks: x, y shapes and the cache's geometry (seqmix::shape_error naming
// the function and argument); weights: name, shape, dtype (seqmix::io_error).
#pragma once

#include <span>
#include <string>
#include <vector>

#include <seqmix/core/error.hpp>
#include <seqmix/core/io/checkpoint.hpp>
#include <seqmix/core/simd.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/layers/l2norm.hpp>
#include <seqmix/layers/recurrent_cache.hpp>
#include <seqmix/layers/recurrent_layer.hpp>
#include <seqmix/layers/rms_norm.hpp>
#include <seqmix/layers/short_conv.hpp>
#include <seqmix/layers/weights.hpp>
#include <seqmix/mixers/kda.hpp>

namespace seqmix::layers {

struct kda_layer_config {
  index_t hidden = 0;       ///< D (hidden_size)
  index_t heads = 0;        ///< H = HV (linear_num_heads): q/k heads and value heads
  index_t head_dim = 0;     ///< dk = dv (linear_head_dim)
  index_t conv_kernel = 4;  ///< K (linear_conv_kernel_dim)
  float norm_eps = 1e-5f;   ///< rms_norm_eps of o_norm
  index_t chunk_size = 64;  ///< chunk of the mixer's chunked form
};

class kda_layer : public recurrent_layer<kda_layer> {
 public:
  using config_type = kda_layer_config;
  using cache_type = recurrent_cache;
  static constexpr layer_names names{"kda_layer::make_cache", "kda_layer::forward",
                                     "kda_layer::step"};

  kda_layer() = default;

  static kda_layer load(const checkpoint& ck, const std::string& prefix, const config_type& cfg) {
    return load(ck.scope(prefix), cfg);
  }
  static kda_layer load(const checkpoint_scope& scope, const config_type& cfg) {
    constexpr std::string_view who = "kda_layer::load";
    const checker check{who};
    detail::check_config_positive(check, {"hidden", "heads", "head_dim", "chunk_size"},
                                  {cfg.hidden, cfg.heads, cfg.head_dim, cfg.chunk_size});
    kda_layer l;
    l.cfg_ = cfg;
    const index_t H = cfg.heads, d = cfg.head_dim, D = cfg.hidden, K = cfg.conv_kernel;
    // the low-rank gates' inner widths, read from the checkpoint (Kimi: head_dim)
    auto rank_of = [&](const std::string& name) {
      if (!scope.contains(name))
        detail::checked_info(who, scope, name, {d, D}, true);  // throws: missing
      const auto& info = scope.info(name);
      return info.shape.size() == 2 ? info.shape[0] : d;
    };
    l.rf_ = rank_of("f_a_proj.weight");
    l.rg_ = rank_of("g_a_proj.weight");
    l.C_ = 3 * H * d;
    l.in_ = weight_matrix::load(who, scope,
                                {"q_proj.weight", "k_proj.weight", "v_proj.weight",
                                 "f_a_proj.weight", "b_proj.weight", "g_a_proj.weight"},
                                {H * d, H * d, H * d, l.rf_, H, l.rg_}, D);
    l.P_ = l.C_ + l.rf_ + H + l.rg_;
    l.f_b_ = weight_matrix::load(who, scope, {"f_b_proj.weight"}, {H * d}, l.rf_);
    l.g_b_ = weight_matrix::load(who, scope, {"g_b_proj.weight"}, {H * d}, l.rg_);
    {
      tensor<float, 2> w({l.C_, K});
      index_t row = 0;
      for (const char* n : {"q_conv1d.weight", "k_conv1d.weight", "v_conv1d.weight"}) {
        const auto v = load_vector(who, scope, n, {H * d, 1, K});
        std::copy(v.begin(), v.end(), w.data() + row * K);
        row += H * d;
      }
      l.conv_ = short_conv(w.view(), {}, conv_activation::silu);
    }
    {
      const bool kimi_shape = scope.contains("A_log") && scope.info("A_log").shape.size() == 4;
      const auto v = kimi_shape ? load_vector(who, scope, "A_log", {1, 1, H, 1})
                                : load_vector(who, scope, "A_log", {H});
      l.A_log_ = tensor<float, 1>({H});
      std::copy(v.begin(), v.end(), l.A_log_.data());
    }
    l.dt_bias_ = load_vector_tensor(who, scope, "dt_bias", H * d);
    l.norm_ = gated_rms_norm::load(who, scope, "o_norm.weight", d, cfg.norm_eps,
                                   norm_gate::sigmoid_after, d);
    l.out_ = weight_matrix::load(who, scope, {"o_proj.weight"}, {D}, H * d);
    typename kda<float>::options opt;
    opt.chunk_size = cfg.chunk_size;
    l.mixer_ = kda<float>(opt);
    return l;
  }

  /// Every tensor the layer reads (names under its prefix).
  static std::vector<std::string> tensor_names() {
    return {"q_proj.weight",   "k_proj.weight",   "v_proj.weight",   "q_conv1d.weight",
            "k_conv1d.weight", "v_conv1d.weight", "f_a_proj.weight", "f_b_proj.weight",
            "b_proj.weight",   "A_log",           "dt_bias",         "g_a_proj.weight",
            "g_b_proj.weight", "o_norm.weight",   "o_proj.weight"};
  }

  const config_type& config() const noexcept { return cfg_; }
  /// Bytes of weights (what a decode step streams).
  std::size_t weight_bytes() const noexcept {
    return in_.bytes() + f_b_.bytes() + g_b_.bytes() + out_.bytes();
  }

  index_t hidden_size() const noexcept { return cfg_.hidden; }
  index_t conv_rows() const noexcept { return cfg_.conv_kernel - 1; }
  index_t conv_channels() const noexcept { return C_; }
  shape_t<3> state_dims() const noexcept { return {cfg_.heads, cfg_.head_dim, cfg_.head_dim}; }

 private:
  friend class recurrent_layer<kda_layer>;

  // the per-token work after the conv, on M rows: l2norm, gates, beta, output gate
  struct views {
    tensor_view<float, 2> proj, xc, qn, kn, graw, g, beta, z, o, nz;
  };
  views make_views(index_t M) {
    const index_t H = cfg_.heads, d = cfg_.head_dim;
    return {ws_.view<2>(0, {M, P_}),    ws_.view<2>(1, {M, C_}),    ws_.view<2>(2, {M, H * d}),
            ws_.view<2>(3, {M, H * d}), ws_.view<2>(4, {M, H * d}), ws_.view<2>(5, {M, H * d}),
            ws_.view<2>(6, {M, H}),     ws_.view<2>(7, {M, H * d}), ws_.view<2>(8, {M, H * d}),
            ws_.view<2>(9, {M, H * d})};
  }
  // after the conv: q, k normalised; g, beta, z from the projections
  void gates(const views& w) const {
    const index_t H = cfg_.heads, d = cfg_.head_dim, M = w.proj.extent(0);
    l2norm(w.xc.slice(1, 0, H * d), w.qn, d, 1e-6f, l2_eps::div_sqrt);
    l2norm(w.xc.slice(1, H * d, 2 * H * d), w.kn, d, 1e-6f, l2_eps::div_sqrt);
    const index_t of = C_, ob = C_ + rf_, og = ob + H;
    f_b_.apply(w.proj.slice(1, of, of + rf_), w.graw);
    kda_gates<float>(w.graw.split(0, {M, 1}).split(2, {H, d}), A_log_.view(), dt_bias_.view(),
                     w.g.split(0, {M, 1}).split(2, {H, d}));
    for (index_t m = 0; m < M; ++m) {
      const float* br = w.proj.ptr({m, ob});
      float* bt = w.beta.ptr({m, 0});
      for (index_t h = 0; h < H; ++h) bt[h] = math::sigmoid(br[h]);
    }
    g_b_.apply(w.proj.slice(1, og, og + rg_), w.z);
  }

  // rows empty: row b of the cache for token b; otherwise one conv and mixer step per token on
  // its cache row (views, no copies)
  void step_rows(const tensor_view<const float, 2>& x, const tensor_view<float, 2>& y,
                 cache_type& cache, std::span<const index_t> rows) {
    const index_t B = x.extent(0), H = cfg_.heads, d = cfg_.head_dim;
    const views w = make_views(B);
    in_.apply(x, w.proj);
    auto conv_in = w.proj.slice(1, 0, C_);
    if (rows.empty()) {
      conv_.step(conv_in, w.xc, cache.conv().view());
    } else {
      for (index_t i = 0; i < B; ++i) {
        const index_t r = rows[static_cast<std::size_t>(i)];
        conv_.step(conv_in.slice(0, i, i + 1), w.xc.slice(0, i, i + 1),
                   cache.conv().slice(0, r, r + 1));
      }
    }
    gates(w);
    auto q3 = w.qn.split(1, {H, d});
    auto k3 = w.kn.split(1, {H, d});
    auto v3 = w.xc.slice(1, 2 * H * d, C_).split(1, {H, d});
    auto g3 = w.g.split(1, {H, d});
    auto o3 = w.o.split(1, {H, d});
    if (rows.empty()) {
      mixer_.step(q3, k3, v3, g3, w.beta, o3, cache.state().view());
      for (index_t b = 0; b < B; ++b) cache.advance(b, 1);
    } else {
      for (index_t i = 0; i < B; ++i) {
        const index_t r = rows[static_cast<std::size_t>(i)];
        mixer_.step(q3.slice(0, i, i + 1), k3.slice(0, i, i + 1), v3.slice(0, i, i + 1),
                    g3.slice(0, i, i + 1), w.beta.slice(0, i, i + 1), o3.slice(0, i, i + 1),
                    cache.state().slice(0, r, r + 1));
        cache.advance(r, 1);
      }
    }
    norm_.forward(w.o, w.z, w.nz);
    out_.apply(w.nz, y);
  }

  void run(const tensor_view<const float, 3>& x, const tensor_view<float, 3>& y, cache_type& cache,
           std::span<const index_t> cu) {
    const index_t B = x.extent(0), T = x.extent(1), M = B * T;
    const index_t H = cfg_.heads, d = cfg_.head_dim;
    const views w = make_views(M);
    detail::project_in(in_, x, w.proj);
    auto conv_in = w.proj.slice(1, 0, C_).split(0, {B, T});
    if (cu.empty()) {
      conv_.forward(conv_in, w.xc.split(0, {B, T}), cache.conv().view());
    } else {
      conv_.forward(conv_in, w.xc.split(0, {B, T}), cache.conv().view(), cu);
    }
    gates(w);
    auto q4 = w.qn.split(0, {B, T}).split(2, {H, d});
    auto k4 = w.kn.split(0, {B, T}).split(2, {H, d});
    auto v4 = w.xc.slice(1, 2 * H * d, C_).split(0, {B, T}).split(2, {H, d});
    auto g4 = w.g.split(0, {B, T}).split(2, {H, d});
    auto beta3 = w.beta.split(0, {B, T});
    auto o4 = w.o.split(0, {B, T}).split(2, {H, d});
    if (cu.empty()) {
      mixer_.forward(q4, k4, v4, g4, beta3, o4, cache.state().view());
    } else {
      mixer_.forward(q4, k4, v4, g4, beta3, o4, cache.state().view(), cu);
    }
    norm_.forward(w.o, w.z, w.nz);
    detail::project_out(out_, w.nz, y);
    if (cu.empty()) {
      for (index_t b = 0; b < B; ++b) cache.advance(b, T);
    } else {
      for (std::size_t n = 0; n + 1 < cu.size(); ++n)
        cache.advance(static_cast<index_t>(n), cu[n + 1] - cu[n]);
    }
  }

  config_type cfg_{};
  index_t C_ = 0, P_ = 0, rf_ = 0, rg_ = 0;  // conv channels, fused width, gate ranks
  weight_matrix in_, f_b_, g_b_, out_;
  short_conv conv_;
  tensor<float, 1> A_log_, dt_bias_;
  gated_rms_norm norm_;
  kda<float> mixer_;
  scratch ws_;
};

}  // namespace seqmix::layers
