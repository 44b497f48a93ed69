// SPDX-License-Identifier: MIT
// Gated Linear Attention layer (fla's GatedLinearAttention, fla/layers/gla.py), on the gla
// mixer (mixers/gla.hpp, docs/math.md §1).
//
//   q, k, v = q_proj(x), k_proj(x), v_proj(x)    H heads of dk (q); HKV heads of dk (k), dv (v)
//   q, k, v = silu(conv1d([q ‖ k ‖ v]))           only with use_short_conv (q_conv1d, k_conv1d,
//                                                 v_conv1d: depthwise causal, kernel K)
//   gk      = gk_proj.1(gk_proj.0(x))             low-rank gate: [r, D] then [HKV·dk, r] + bias
//   gk      = max(logsigmoid(gk) / normalizer, clamp_min)      per key channel, <= 0
//   k, gk, v repeated per group of G = H / HKV query heads (query head h reads kv head h / G)
//   o       = GLA(q, k, v, gk)                    S = Diag(exp gk) S + k vᵀ, o = Sᵀ q · dk^-1/2
//   y       = o_proj( rmsnorm(o) · w · act(g_proj(x)) )        per value head (dv), eps norm_eps
//
// dk = D·expand_k / H, dv = D·expand_v / H (fla's key_dim = int(D·expand_k), value_dim =
// int(D·expand_v)). act = silu (gate_fn "swish"/"silu") or sigmoid; without the output gate
// (use_output_gate = false) y = o_proj(rmsnorm(o)·w). With fuse_norm, gate_fn swish and the
// output gate, fla names the norm g_norm_swish_gate (FusedRMSNormGated: the same math),
// otherwise g_norm; elementwise_affine = false means no norm weight (w = 1).
//
// Weights (fla's names under the prefix, f32 or bf16 matrices): q_proj.weight [H·dk, D],
// k_proj.weight [HKV·dk, D], v_proj.weight [HKV·dv, D], g_proj.weight [H·dv, D] (output gate),
// gk_proj.0.weight [r, D], gk_proj.1.weight [HKV·dk, r], gk_proj.1.bias [HKV·dk],
// {q,k,v}_conv1d.weight [·, 1, K] (+ .bias with conv_bias), g_norm(.|_swish_gate.)weight [dv],
// o_proj.weight [D, H·dv]. The projections that read x are fused at load time into one matrix
// with rows [q | k | v | g | gk_proj.0], so one GEMM writes every block; gk_proj.1 is the
// gate's second GEMM (bias in its epilogue). The three convs become one conv over
// C = H·dk + HKV·(dk + dv) channels [q ‖ k ‖ v].
//
// Supported fla options: expand_k, expand_v, num_heads, num_kv_heads (GQA), use_short_conv,
// conv_size, conv_bias, use_output_gate, gate_fn (swish, silu, sigmoid), elementwise_affine,
// norm_eps, gate_logit_normalizer, gate_low_rank_dim, clamp_min, fuse_norm; mode (chunk /
// fused_recurrent / fused_chunk) changes no math: seqmix picks the form. Refused (a clear error
// at load): feature_map other than none, any other gate_fn, clamp_min > 0 (a growing gate), an
// expand that does not divide into the heads, num_heads not a multiple of num_kv_heads.
//
// Forms: forward(x [B, T, D]) prefill — the mixer's chosen form (gla::forward: chunked from
// config.switch_over_t tokens per sequence, chunk `chunk_size`, recurrent below), continuing from
// the cache; packed variable-length forward with cu_seqlens; step(x [B, D]) decode — recurrent,
// allocation-free once the layer has run a step of that batch size; step with cache rows
// (continuous batching). The cache (layers/recurrent_cache.hpp) is conv [B, K-1, C] (the last K-1
// pre-activation conv inputs; fla's ShortConvolution cache keeps K columns [B, C, K], the oldest
// never read; [B, 0, 0] without short convs) + state [B, H, dk, dv] (fla's recurrent_state with
// state_v_first is [B, H, dv, dk]: the transpose of each head's matrix).
//
// Cost per token: 2·D·(H·dk + HKV·(dk + dv) + H·dv + r) + 2·r·HKV·dk + 2·H·dv·D FLOP in
// projections, 2·K·C in the conv, the mixer's (5·dk·dv per head recurrent, about 2C(dk+dv) +
// 4·dk·dv chunked), O(HKV·dk) logsigmoids for the gate. Scratch grow-only; the layer object is
// not shareable between threads calling it at once. Checks: x, y shapes and the cache's
// geometry (seqmix::shape_error naming the function and argument); weights: name, shape, dtype
// (seqmix::io_error); config: seqmix::shape_error naming the field.
#pragma once

#include <algorithm>
#include <cmath>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <seqmix/core/error.hpp>
#include <seqmix/core/io/checkpoint.hpp>
#include <seqmix/core/matmul.hpp>
#include <seqmix/core/simd.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/layers/recurrent_cache.hpp>
#include <seqmix/layers/recurrent_layer.hpp>
#include <seqmix/layers/rms_norm.hpp>
#include <seqmix/layers/short_conv.hpp>
#include <seqmix/layers/weights.hpp>
#include <seqmix/mixers/gla.hpp>

namespace seqmix::layers {

struct gla_layer_config {
  index_t hidden = 0;                ///< D (hidden_size)
  index_t heads = 4;                 ///< H (num_heads)
  index_t kv_heads = 0;              ///< HKV (num_kv_heads); 0: H
  double expand_k = 0.5;             ///< key_dim = int(D · expand_k)
  double expand_v = 1.0;             ///< value_dim = int(D · expand_v)
  std::string feature_map{};         ///< only none ("") is supported
  bool use_short_conv = false;       ///< q/k/v_conv1d with SiLU
  index_t conv_size = 4;             ///< K
  bool conv_bias = false;            ///< conv biases
  bool use_output_gate = true;       ///< g_proj
  std::string gate_fn = "swish";     ///< swish / silu / sigmoid
  bool elementwise_affine = true;    ///< the norm has a weight
  float norm_eps = 1e-5f;            ///< eps of the per-head RMSNorm
  float gate_logit_normalizer = 16;  ///< gk = logsigmoid(gk) / normalizer
  index_t gate_low_rank_dim = 16;    ///< r
  std::optional<float> clamp_min{};  ///< gk = max(gk, clamp_min) (must be <= 0)
  bool fuse_norm = true;             ///< the norm's name: g_norm_swish_gate (fused) or g_norm
  index_t chunk_size = 64;           ///< chunk of the mixer's chunked form
  /// the mixer's switch-over to the chunked form (gla::options::switch_over_t); empty: the
  /// mixer's default (kernels::gated::default_switch_over_t says why and how to measure it)
  std::optional<index_t> switch_over_t{};
};

class gla_layer : public recurrent_layer<gla_layer> {
 public:
  using config_type = gla_layer_config;
  using cache_type = recurrent_cache;
  static constexpr layer_names names{"gla_layer::make_cache", "gla_layer::forward",
                                     "gla_layer::step"};

  gla_layer() = default;

  static gla_layer load(const checkpoint& ck, const std::string& prefix, const config_type& cfg) {
    return load(ck.scope(prefix), cfg);
  }
  static gla_layer load(const checkpoint_scope& scope, const config_type& cfg) {
    constexpr std::string_view who = "gla_layer::load";
    const checker check{who};
    gla_layer l;
    l.cfg_ = cfg;
    l.geometry(check);
    const index_t D = cfg.hidden, H = cfg.heads, HKV = l.hkv_, dk = l.dk_, dv = l.dv_;
    const index_t r = cfg.gate_low_rank_dim;
    std::vector<std::string> in_names{"q_proj.weight", "k_proj.weight", "v_proj.weight"};
    std::vector<index_t> in_rows{H * dk, HKV * dk, HKV * dv};
    if (cfg.use_output_gate) {
      in_names.emplace_back("g_proj.weight");
      in_rows.push_back(H * dv);
    }
    in_names.emplace_back("gk_proj.0.weight");
    in_rows.push_back(r);
    l.in_ = weight_matrix::load(who, scope, in_names, in_rows, D);
    l.gk1_ = weight_matrix::load(who, scope, {"gk_proj.1.weight"}, {HKV * dk}, r);
    l.gk1_bias_ = load_vector_tensor(who, scope, "gk_proj.1.bias", HKV * dk);
    if (cfg.use_short_conv) {
      const index_t K = cfg.conv_size;
      tensor<float, 2> w({l.C_, K});
      tensor<float, 1> b({l.C_});
      index_t row = 0;
      const index_t widths[3] = {H * dk, HKV * dk, HKV * dv};
      const char* convs[3] = {"q_conv1d", "k_conv1d", "v_conv1d"};
      for (int i = 0; i < 3; ++i) {
        const std::string n = convs[i];
        const auto v = load_vector(who, scope, n + ".weight", {widths[i], 1, K});
        std::copy(v.begin(), v.end(), w.data() + row * K);
        if (cfg.conv_bias) {
          const auto bv = load_vector(who, scope, n + ".bias", {widths[i]});
          std::copy(bv.begin(), bv.end(), b.data() + row);
        }
        row += widths[i];
      }
      l.conv_ = short_conv(
          w.view(),
          cfg.conv_bias ? tensor_view<const float, 1>(b.view()) : tensor_view<const float, 1>{},
          conv_activation::silu);
    }
    tensor<float, 1> nw({dv});
    if (cfg.elementwise_affine) {
      const auto v = load_vector(who, scope, l.norm_name(), {dv});
      std::copy(v.begin(), v.end(), nw.data());
    } else {
      nw.fill(1.0f);
    }
    if (cfg.use_output_gate) {
      const norm_gate gate =
          cfg.gate_fn == "sigmoid" ? norm_gate::sigmoid_after : norm_gate::silu_after;
      l.gnorm_ = gated_rms_norm(std::move(nw), cfg.norm_eps, gate, dv);
    } else {
      l.norm_ = rms_norm(std::move(nw), cfg.norm_eps, norm_weight::plain, dv);
    }
    l.out_ = weight_matrix::load(who, scope, {"o_proj.weight"}, {D}, H * dv);
    typename gla<float>::options opt;
    opt.chunk_size = cfg.chunk_size;
    opt.switch_over_t = cfg.switch_over_t;
    l.mixer_ = gla<float>(opt);
    return l;
  }

  /// Every tensor the layer reads for `cfg` (names under its prefix).
  static std::vector<std::string> tensor_names(const config_type& cfg) {
    std::vector<std::string> n{"q_proj.weight", "k_proj.weight", "v_proj.weight"};
    if (cfg.use_output_gate) n.emplace_back("g_proj.weight");
    for (const char* s : {"gk_proj.0.weight", "gk_proj.1.weight", "gk_proj.1.bias"})
      n.emplace_back(s);
    if (cfg.use_short_conv)
      for (const char* c : {"q_conv1d", "k_conv1d", "v_conv1d"}) {
        n.push_back(std::string(c) + ".weight");
        if (cfg.conv_bias) n.push_back(std::string(c) + ".bias");
      }
    if (cfg.elementwise_affine) n.push_back(norm_name(cfg));
    n.emplace_back("o_proj.weight");
    return n;
  }

  const config_type& config() const noexcept { return cfg_; }
  /// Bytes of weights (what a decode step streams).
  std::size_t weight_bytes() const noexcept { return in_.bytes() + gk1_.bytes() + out_.bytes(); }
  index_t key_head_dim() const noexcept { return dk_; }
  index_t value_head_dim() const noexcept { return dv_; }

  index_t hidden_size() const noexcept { return cfg_.hidden; }
  index_t conv_rows() const noexcept { return cfg_.use_short_conv ? cfg_.conv_size - 1 : 0; }
  index_t conv_channels() const noexcept { return cfg_.use_short_conv ? C_ : 0; }
  shape_t<3> state_dims() const noexcept { return {cfg_.heads, dk_, dv_}; }

 private:
  friend class recurrent_layer<gla_layer>;

  static std::string norm_name(const config_type& c) {
    const bool swish = c.gate_fn == "swish";
    return swish && c.fuse_norm && c.use_output_gate ? "g_norm_swish_gate.weight" : "g_norm.weight";
  }
  std::string norm_name() const { return norm_name(cfg_); }

  // the config's derived sizes, with the refusals of the header comment
  void geometry(const checker& check) {
    const config_type& c = cfg_;
    detail::check_config_positive(check, {"hidden", "heads", "gate_low_rank_dim", "chunk_size"},
                                  {c.hidden, c.heads, c.gate_low_rank_dim, c.chunk_size});
    if (!c.feature_map.empty())
      check.fail("config.feature_map",
                 "only none is supported (fla's default), got '" + c.feature_map + "'");
    if (!(c.gate_fn == "swish" || c.gate_fn == "silu" || c.gate_fn == "sigmoid"))
      check.fail("config.gate_fn", "must be swish, silu or sigmoid, got '" + c.gate_fn + "'");
    if (!(std::isfinite(c.gate_logit_normalizer) && c.gate_logit_normalizer > 0))
      check.fail("config.gate_logit_normalizer",
                 "must be finite and > 0, got " + std::to_string(c.gate_logit_normalizer));
    if (c.clamp_min && !(*c.clamp_min <= 0))
      check.fail("config.clamp_min",
                 "must be <= 0 (a log decay), got " + std::to_string(*c.clamp_min));
    hkv_ = c.kv_heads ? c.kv_heads : c.heads;
    if (!(hkv_ > 0 && c.heads % hkv_ == 0))
      check.fail("config.kv_heads", "must divide heads = " + std::to_string(c.heads) + ", got " +
                                        std::to_string(hkv_));
    const auto kd = static_cast<index_t>(static_cast<double>(c.hidden) * c.expand_k);
    const auto vd = static_cast<index_t>(static_cast<double>(c.hidden) * c.expand_v);
    if (!(kd > 0 && kd % c.heads == 0))
      check.fail("config.expand_k", "key_dim = int(hidden · expand_k) = " + std::to_string(kd) +
                                        " must be a positive multiple of heads");
    if (!(vd > 0 && vd % c.heads == 0))
      check.fail("config.expand_v", "value_dim = int(hidden · expand_v) = " + std::to_string(vd) +
                                        " must be a positive multiple of heads");
    dk_ = kd / c.heads;
    dv_ = vd / c.heads;
    C_ = c.heads * dk_ + hkv_ * (dk_ + dv_);
    P_ = C_ + (c.use_output_gate ? c.heads * dv_ : 0) + c.gate_low_rank_dim;
  }

  struct views {
    tensor_view<float, 2> proj, xc, gk, kx, gx, vx, o, nz;
  };
  views make_views(index_t M) {
    const index_t H = cfg_.heads, Kg = hkv_ * dk_;
    const bool gqa = hkv_ != H;
    views w{};
    w.proj = ws_.view<2>(0, {M, P_});
    if (cfg_.use_short_conv) w.xc = ws_.view<2>(1, {M, C_});
    w.gk = ws_.view<2>(2, {M, Kg});
    if (gqa) {
      w.kx = ws_.view<2>(3, {M, H * dk_});
      w.gx = ws_.view<2>(4, {M, H * dk_});
      w.vx = ws_.view<2>(5, {M, H * dv_});
    }
    w.o = ws_.view<2>(6, {M, H * dv_});
    w.nz = ws_.view<2>(7, {M, H * dv_});
    return w;
  }

  // q, k, v, gk as [M, width] views (after the conv, the gate and the GQA repeat)
  struct qkvg {
    tensor_view<const float, 2> q, k, v, gk;
  };
  qkvg prepare(const views& w) const {
    const index_t M = w.proj.extent(0), H = cfg_.heads, Kq = H * dk_, Kg = hkv_ * dk_;
    // the gate: second low-rank GEMM (+ bias), then log space
    const index_t og = P_ - cfg_.gate_low_rank_dim;
    linalg::matmul_options mo;
    mo.bias = gk1_bias_.view();
    gk1_.apply(w.proj.slice(1, og, P_), w.gk, mo);
    const float inv = 1.0f / cfg_.gate_logit_normalizer;
    for (index_t m = 0; m < M; ++m) {
      float* gr = w.gk.ptr({m, 0});
      simd::logsigmoid(gr, gr, Kg);
      for (index_t i = 0; i < Kg; ++i) gr[i] *= inv;
      if (cfg_.clamp_min)
        for (index_t i = 0; i < Kg; ++i) gr[i] = std::max(gr[i], *cfg_.clamp_min);
    }
    const tensor_view<float, 2> src = cfg_.use_short_conv ? w.xc : w.proj.slice(1, 0, C_);
    qkvg out{src.slice(1, 0, Kq), src.slice(1, Kq, Kq + Kg), src.slice(1, Kq + Kg, C_), w.gk};
    if (hkv_ != H) {  // query head h reads kv head h / G (fla's repeat '(h d) -> (h g) d')
      const index_t G = H / hkv_;
      for (index_t m = 0; m < M; ++m)
        for (index_t h = 0; h < H; ++h) {
          const index_t j = h / G;
          std::copy_n(out.k.ptr({m, j * dk_}), dk_, w.kx.ptr({m, h * dk_}));
          std::copy_n(out.gk.ptr({m, j * dk_}), dk_, w.gx.ptr({m, h * dk_}));
          std::copy_n(out.v.ptr({m, j * dv_}), dv_, w.vx.ptr({m, h * dv_}));
        }
      out.k = w.kx;
      out.gk = w.gx;
      out.v = w.vx;
    }
    return out;
  }

  // the output norm (and gate), then o_proj into y_rows
  void finish(const views& w) const {
    const index_t H = cfg_.heads;
    if (cfg_.use_output_gate) {
      const index_t og = C_;
      gnorm_.forward(w.o, w.proj.slice(1, og, og + H * dv_), w.nz);
    } else {
      norm_.forward(w.o, w.nz);
    }
  }

  // rows empty: row b of the cache for token b; otherwise one conv and mixer step per token on
  // its cache row (views, no copies)
  void step_rows(const tensor_view<const float, 2>& x, const tensor_view<float, 2>& y,
                 cache_type& cache, std::span<const index_t> rows) {
    const index_t B = x.extent(0), H = cfg_.heads;
    const views w = make_views(B);
    in_.apply(x, w.proj);
    if (cfg_.use_short_conv) {
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
    }
    const qkvg p = prepare(w);
    auto q3 = p.q.split(1, {H, dk_});
    auto k3 = p.k.split(1, {H, dk_});
    auto v3 = p.v.split(1, {H, dv_});
    auto g3 = p.gk.split(1, {H, dk_});
    auto o3 = w.o.split(1, {H, dv_});
    if (rows.empty()) {
      mixer_.step(q3, k3, v3, g3, o3, cache.state().view());
      for (index_t b = 0; b < B; ++b) cache.advance(b, 1);
    } else {
      for (index_t i = 0; i < B; ++i) {
        const index_t r = rows[static_cast<std::size_t>(i)];
        mixer_.step(q3.slice(0, i, i + 1), k3.slice(0, i, i + 1), v3.slice(0, i, i + 1),
                    g3.slice(0, i, i + 1), o3.slice(0, i, i + 1), cache.state().slice(0, r, r + 1));
        cache.advance(r, 1);
      }
    }
    finish(w);
    out_.apply(w.nz, y);
  }

  void run(const tensor_view<const float, 3>& x, const tensor_view<float, 3>& y, cache_type& cache,
           std::span<const index_t> cu) {
    const index_t B = x.extent(0), T = x.extent(1), M = B * T, H = cfg_.heads;
    const views w = make_views(M);
    detail::project_in(in_, x, w.proj);
    if (cfg_.use_short_conv) {
      auto conv_in = w.proj.slice(1, 0, C_).split(0, {B, T});
      if (cu.empty()) {
        conv_.forward(conv_in, w.xc.split(0, {B, T}), cache.conv().view());
      } else {
        conv_.forward(conv_in, w.xc.split(0, {B, T}), cache.conv().view(), cu);
      }
    }
    const qkvg p = prepare(w);
    auto q4 = p.q.split(0, {B, T}).split(2, {H, dk_});
    auto k4 = p.k.split(0, {B, T}).split(2, {H, dk_});
    auto v4 = p.v.split(0, {B, T}).split(2, {H, dv_});
    auto g4 = p.gk.split(0, {B, T}).split(2, {H, dk_});
    auto o4 = w.o.split(0, {B, T}).split(2, {H, dv_});
    if (cu.empty()) {
      mixer_.forward(q4, k4, v4, g4, o4, cache.state().view());
    } else {
      mixer_.forward(q4, k4, v4, g4, o4, cache.state().view(), cu);
    }
    finish(w);
    detail::project_out(out_, w.nz, y);
    if (cu.empty()) {
      for (index_t b = 0; b < B; ++b) cache.advance(b, T);
    } else {
      for (std::size_t n = 0; n + 1 < cu.size(); ++n)
        cache.advance(static_cast<index_t>(n), cu[n + 1] - cu[n]);
    }
  }

  config_type cfg_{};
  index_t hkv_ = 0, dk_ = 0, dv_ = 0, C_ = 0, P_ = 0;  // kv heads, head dims, conv, fused width
  weight_matrix in_, gk1_, out_;
  tensor<float, 1> gk1_bias_;
  short_conv conv_;
  gated_rms_norm gnorm_;
  rms_norm norm_;
  gla<float> mixer_;
  scratch ws_;
};

}  // namespace seqmix::layers
