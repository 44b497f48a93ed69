// SPDX-License-Identifier: MIT
// tiny_lm<T>: a small trainable language model on seqmix's forward passes and backward passes
// (train/blocks.hpp for the blocks, mixers/backward.hpp for the mixer), for tasks such as
// multi-query associative recall (examples/train_mqar.cpp).
//
//   x_0 = E[ids]                                                       embedding [Vocab, D]
//   per layer l (L of them):
//     u   = rms_norm(x_l) W_inᵀ + b_in                  [M, P]   P = 3·H·K + gate columns
//     q|k|v = silu(short_conv(u[:, :3HK]))              depthwise causal, W taps
//     gla:     gk = logsigmoid(u_gate) / 16             [M, H·K]  (fla's GLA gate)
//              o  = gla(q, k, v, gk)                    scale K^-½
//     gdn:     q, k ← l2norm per head;  β = σ(u_β);  g = -e^{A_log} softplus(u_a + dt_bias)
//              o  = gated_delta_rule(q, k, v, g, β)     scale K^-½
//     softmax: o  = causal softmax attention(q, k, v)   scale K^-½ (no positional encoding:
//                                                       the short conv gives local order)
//     h   = x_l + rms_norm_per_head(o) W_oᵀ             [M, D]
//     x_{l+1} = h + swiglu_mlp(rms_norm(h))             hidden F
//   logits = rms_norm(x_L)[rows] Rᵀ                     only the rows with a target (R = E tied,
//                                                       or its own [Vocab, D] readout)
//   loss = mean cross-entropy over the rows with a target >= 0
//
// Dimensions: B sequences, T tokens, M = B·T rows, D model width, H heads, K = V head width,
// W conv taps, F MLP hidden, Vocab. Cost per token and layer (FLOP, forward): 2·D·(P + H·K)
// projections + 6·D·F MLP + the mixer's (mixers/*.hpp); backward about twice that, the mixer
// backward its own multiple (mixers/backward.hpp: nothing saved, states recomputed). Readout
// 2·D·Vocab per target row only. Activations kept for the backward: about (4·D + P + 5·H·K +
// 3·F) values per token and layer.
//
// Parameters are tensors of rank 2 with their gradients (param<T>); biases, norms, A_log and
// dt_bias are registered without weight decay. forward_backward accumulates gradients (+=).
#pragma once

#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <seqmix/core/error.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/mixers/backward.hpp>
#include <seqmix/mixers/gated_delta_net.hpp>
#include <seqmix/mixers/gla.hpp>
#include <seqmix/mixers/softmax_attention.hpp>
#include <seqmix/train/blocks.hpp>

namespace seqmix::train {

/// The sequence mixer of every layer of a tiny_lm.
enum class mixer_kind { gla, gdn, softmax };

/// Shape and initialisation of a tiny_lm.
struct model_config {
  mixer_kind mixer = mixer_kind::gdn;
  index_t vocab = 8192;
  index_t dim = 128;      ///< D
  index_t layers = 2;     ///< L
  index_t heads = 2;      ///< H
  index_t head_dim = 64;  ///< K = V
  index_t conv_taps = 4;  ///< W
  index_t mlp_hidden = 256;
  index_t chunk_size = 64;      ///< chunk of the mixers' forward and backward
  bool tie_embeddings = true;   ///< readout = embedding table
  double init_std = 0.02;       ///< normal init of projections and the embedding
  double gla_gate_bias = 4.0;   ///< initial bias of GLA's gate (slow decay: long memory)
  double gla_gate_norm = 16.0;  ///< gk = logsigmoid(·) / this
  /// GDN gate init: e^{A_log} ~ U(a_min, a_max), dt = softplus(dt_bias) log-uniform in
  /// [dt_min, dt_max] (fla's defaults; recall tasks train faster with weak decays)
  double gdn_a_min = 1.0, gdn_a_max = 16.0, gdn_dt_min = 1e-3, gdn_dt_max = 1e-1;
  std::uint64_t seed = 1;
};

/// A parameter and its gradient.
template <class T>
struct param {
  std::string name;
  tensor<T, 2> value, grad;
  bool decay = true;
  std::span<T> values() { return {value.data(), static_cast<std::size_t>(value.size())}; }
  std::span<T> grads() { return {grad.data(), static_cast<std::size_t>(grad.size())}; }
};

/// Embedding → L × [rms_norm → mixer layer → residual → rms_norm → SwiGLU → residual] →
/// rms_norm → readout, with forward and backward.
template <class T>
class tiny_lm {
 public:
  explicit tiny_lm(const model_config& cfg) : cfg_(cfg) {
    const checker check{"train::tiny_lm"};
    for (auto [name, v] : {std::pair<const char*, index_t>{"cfg.vocab", cfg.vocab},
                           {"cfg.dim", cfg.dim},
                           {"cfg.layers", cfg.layers},
                           {"cfg.heads", cfg.heads},
                           {"cfg.head_dim", cfg.head_dim},
                           {"cfg.conv_taps", cfg.conv_taps},
                           {"cfg.mlp_hidden", cfg.mlp_hidden},
                           {"cfg.chunk_size", cfg.chunk_size}}) {
      if (v <= 0) check.fail(name, "must be > 0, got " + std::to_string(v));
    }
    std::mt19937_64 rng(cfg.seed);
    const index_t D = cfg.dim, HK = cfg.heads * cfg.head_dim, F = cfg.mlp_hidden;
    const double out_std = cfg.init_std / std::sqrt(2.0 * static_cast<double>(cfg.layers));
    emb_ = add("embedding", {cfg.vocab, D}, rng, cfg.init_std, true);
    for (index_t l = 0; l < cfg.layers; ++l) {
      const std::string p = "layers." + std::to_string(l) + ".";
      layer_ids ids;
      ids.norm1 = add(p + "attn_norm", {1, D}, rng, 0, false, T(1));
      ids.w_in = add(p + "in_proj", {proj_width(), D}, rng, cfg.init_std, true);
      ids.b_in = add(p + "in_proj_bias", {1, proj_width()}, rng, 0, false);
      if (cfg.mixer == mixer_kind::gla) {
        tensor<T, 2>& b = params_[static_cast<std::size_t>(ids.b_in)]->value;
        for (index_t j = 3 * HK; j < proj_width(); ++j) b(0, j) = static_cast<T>(cfg.gla_gate_bias);
      }
      ids.conv = add(p + "conv", {3 * HK, cfg.conv_taps}, rng,
                     1.0 / std::sqrt(static_cast<double>(cfg.conv_taps)), true);
      if (cfg.mixer == mixer_kind::gdn) {
        ids.a_log = add(p + "A_log", {1, cfg.heads}, rng, 0, false);
        ids.dt_bias = add(p + "dt_bias", {1, cfg.heads}, rng, 0, false);
        std::uniform_real_distribution<double> ua(cfg.gdn_a_min, cfg.gdn_a_max),
            udt(std::log(cfg.gdn_dt_min), std::log(cfg.gdn_dt_max));
        for (index_t h = 0; h < cfg.heads; ++h) {
          params_[static_cast<std::size_t>(ids.a_log)]->value(0, h) =
              static_cast<T>(std::log(ua(rng)));
          const double dt = std::exp(udt(rng));
          params_[static_cast<std::size_t>(ids.dt_bias)]->value(0, h) =
              static_cast<T>(dt + std::log(-std::expm1(-dt)));  // softplus⁻¹(dt)
        }
      }
      ids.o_norm = add(p + "o_norm", {1, cfg.head_dim}, rng, 0, false, T(1));
      ids.w_o = add(p + "o_proj", {D, HK}, rng, out_std, true);
      ids.norm2 = add(p + "mlp_norm", {1, D}, rng, 0, false, T(1));
      ids.w_gate = add(p + "mlp.gate_proj", {F, D}, rng, cfg.init_std, true);
      ids.w_up = add(p + "mlp.up_proj", {F, D}, rng, cfg.init_std, true);
      ids.w_down = add(p + "mlp.down_proj", {D, F}, rng, out_std, true);
      layers_.push_back(ids);
    }
    norm_f_ = add("norm", {1, D}, rng, 0, false, T(1));
    readout_ = cfg.tie_embeddings ? emb_ : add("lm_head", {cfg.vocab, D}, rng, cfg.init_std, true);
  }

  const model_config& config() const { return cfg_; }
  std::vector<std::unique_ptr<param<T>>>& params() { return params_; }
  /// Parameter values in all.
  index_t size() const {
    index_t n = 0;
    for (const auto& p : params_) n += p->value.size();
    return n;
  }
  void zero_grad() {
    for (auto& p : params_) p->grad.fill(T(0));
  }

  /// Runs the model over ids [B·T] (B sequences of T tokens, row-major) and the cross-entropy
  /// over the positions whose target [B·T] is >= 0; with `backward`, adds the gradient of that
  /// mean loss to every parameter's grad.
  cross_entropy_result forward_backward(std::span<const std::int32_t> ids,
                                        std::span<const std::int32_t> targets, index_t B,
                                        index_t TT, bool backward = true) {
    const checker check{"train::tiny_lm::forward_backward"};
    const index_t M = B * TT, D = cfg_.dim;
    if (B <= 0 || TT <= 0) check.fail("B", "B and T must be > 0");
    if (static_cast<index_t>(ids.size()) != M)
      check.fail("ids",
                 "expected " + std::to_string(M) + " ids, got " + std::to_string(ids.size()));
    if (static_cast<index_t>(targets.size()) != M) {
      check.fail("targets", "expected " + std::to_string(M) + " targets, got " +
                                std::to_string(targets.size()));
    }
    const index_t Ln = cfg_.layers;
    acts_.resize(static_cast<std::size_t>(Ln));
    xs_.resize(static_cast<std::size_t>(Ln + 1));
    xs_[0] = tensor<T, 2>({M, D});
    embedding_forward<T>(P(emb_).value, ids, xs_[0]);
    for (index_t l = 0; l < Ln; ++l)
      layer_forward(layers_[static_cast<std::size_t>(l)], acts_[static_cast<std::size_t>(l)], B, TT,
                    xs_[static_cast<std::size_t>(l)], xs_[static_cast<std::size_t>(l + 1)]);
    // final norm and readout on the target rows
    const tensor<T, 2>& xl = xs_[static_cast<std::size_t>(Ln)];
    tensor<T, 2> xf({M, D});
    rms_norm_forward<T>(xl, vec(norm_f_), xf, eps());
    std::vector<index_t> rows;
    std::vector<std::int32_t> row_targets;
    for (index_t i = 0; i < M; ++i) {
      if (targets[static_cast<std::size_t>(i)] >= 0) {
        rows.push_back(i);
        row_targets.push_back(targets[static_cast<std::size_t>(i)]);
      }
    }
    const index_t R = static_cast<index_t>(rows.size());
    tensor<T, 2> hr({R, D});
    for (index_t r = 0; r < R; ++r)
      for (index_t d = 0; d < D; ++d) hr(r, d) = xf(rows[static_cast<std::size_t>(r)], d);
    tensor<T, 2> logits({R, cfg_.vocab});
    linear_forward<T>(hr, P(readout_).value, logits);
    const cross_entropy_result res = softmax_cross_entropy<T>(
        logits, row_targets, backward ? logits.view() : tensor_view<T, 2>{});
    if (!backward) return res;
    // ---- backward ----
    tensor<T, 2> dhr({R, D});
    linear_backward<T>(hr, P(readout_).value, logits, dhr, P(readout_).grad);
    tensor<T, 2> dxf({M, D});
    for (index_t r = 0; r < R; ++r)
      for (index_t d = 0; d < D; ++d) dxf(rows[static_cast<std::size_t>(r)], d) = dhr(r, d);
    tensor<T, 2> dx({M, D});
    rms_norm_backward<T>(xl, vec(norm_f_), dxf, dx, gvec(norm_f_), eps());
    for (index_t l = Ln - 1; l >= 0; --l)
      layer_backward(layers_[static_cast<std::size_t>(l)], acts_[static_cast<std::size_t>(l)], B,
                     TT, xs_[static_cast<std::size_t>(l)], dx);
    embedding_backward<T>(ids, dx, P(emb_).grad);
    return res;
  }

 private:
  struct layer_ids {
    index_t norm1 = -1, w_in = -1, b_in = -1, conv = -1, a_log = -1, dt_bias = -1, o_norm = -1,
            w_o = -1, norm2 = -1, w_gate = -1, w_up = -1, w_down = -1;
  };
  /// What one layer's backward reads.
  struct layer_acts {
    tensor<T, 2> xn1, u, c;  // normed input [M,D], projection [M,P], conv output [M,3HK]
    tensor<T, 2> qn, kn;     // gdn: l2-normalised q, k [M,HK]
    tensor<T, 2> gate;       // gla: gk [M,HK]; gdn: g [M,H]
    tensor<T, 2> beta;       // gdn: [M,H]
    tensor<T, 2> o, on;      // mixer output and its per-head norm [M,HK]
    tensor<T, 2> h, xn2;     // after the mixer's residual, normed [M,D]
    swiglu_mlp_cache<T> mlp;
  };

  T eps() const { return T(1e-6); }
  index_t proj_width() const {
    const index_t HK = cfg_.heads * cfg_.head_dim;
    switch (cfg_.mixer) {
      case mixer_kind::gla:
        return 4 * HK;
      case mixer_kind::gdn:
        return 3 * HK + 2 * cfg_.heads;
      default:
        return 3 * HK;
    }
  }
  param<T>& P(index_t i) { return *params_[static_cast<std::size_t>(i)]; }
  tensor_view<const T, 1> vec(index_t i) { return P(i).value.view().template select<0>(0); }
  tensor_view<T, 1> gvec(index_t i) { return P(i).grad.view().template select<0>(0); }

  index_t add(const std::string& name, shape_t<2> shape, std::mt19937_64& rng, double std,
              bool decay, T fill = T(0)) {
    auto p = std::make_unique<param<T>>();
    p->name = name;
    p->value = tensor<T, 2>(shape, fill);
    p->grad = tensor<T, 2>(shape);
    p->decay = decay;
    if (std > 0) {
      std::normal_distribution<double> nd(0.0, std);
      for (index_t i = 0; i < p->value.size(); ++i) p->value[i] = static_cast<T>(nd(rng));
    }
    params_.push_back(std::move(p));
    return static_cast<index_t>(params_.size()) - 1;
  }

  /// [B, T, H, K] view of columns [c0, c0 + H·K) of a [B·T, ·] row-major buffer.
  template <class U>
  static tensor_view<U, 4> heads_of(U* base, index_t ld, index_t c0, index_t B, index_t TT,
                                    index_t H, index_t K) {
    return tensor_view<U, 4>(base + c0, {B, TT, H, K}, {TT * ld, ld, K, 1});
  }
  template <class U>
  static tensor_view<U, 2> cols(U* base, index_t ld, index_t c0, index_t M, index_t n) {
    return tensor_view<U, 2>(base + c0, {M, n}, {ld, 1});
  }

  void layer_forward(const layer_ids& id, layer_acts& a, index_t B, index_t TT,
                     const tensor<T, 2>& x, tensor<T, 2>& y) {
    const index_t M = B * TT, D = cfg_.dim, H = cfg_.heads, K = cfg_.head_dim, HK = H * K;
    const index_t Pw = proj_width();
    a.xn1 = tensor<T, 2>({M, D});
    rms_norm_forward<T>(x, vec(id.norm1), a.xn1, eps());
    a.u = tensor<T, 2>({M, Pw});
    linear_forward<T>(a.xn1, P(id.w_in).value, a.u, vec(id.b_in));
    a.c = tensor<T, 2>({M, 3 * HK});
    {
      const tensor_view<const T, 3> u3(a.u.data(), {B, TT, 3 * HK}, {TT * Pw, Pw, 1});
      short_conv_forward<T>(u3, P(id.conv).value, a.c.view().template reshape<3>({B, TT, 3 * HK}),
                            conv_act::silu);
    }
    const T* cb = a.c.data();
    auto v4 = heads_of<const T>(cb, 3 * HK, 2 * HK, B, TT, H, K);
    a.o = tensor<T, 2>({M, HK});
    auto o4 = a.o.view().template reshape<4>({B, TT, H, K});
    if (cfg_.mixer == mixer_kind::gla) {
      a.gate = tensor<T, 2>({M, HK});
      const T inv = static_cast<T>(1.0 / cfg_.gla_gate_norm);
      for (index_t i = 0; i < M; ++i)
        for (index_t j = 0; j < HK; ++j) a.gate(i, j) = logsigmoid(a.u(i, 3 * HK + j)) * inv;
      typename gla<T>::options opt;
      opt.chunk_size = cfg_.chunk_size;
      auto state = gla<T>::make_state(B, H, K, K);
      gla<T>(opt).forward(heads_of<const T>(cb, 3 * HK, 0, B, TT, H, K),
                          heads_of<const T>(cb, 3 * HK, HK, B, TT, H, K), v4,
                          a.gate.view().template reshape<4>({B, TT, H, K}), o4, state);
    } else if (cfg_.mixer == mixer_kind::gdn) {
      a.qn = tensor<T, 2>({M, HK});
      a.kn = tensor<T, 2>({M, HK});
      l2norm_forward<T>(cols<const T>(cb, 3 * HK, 0, M, HK), a.qn, K);
      l2norm_forward<T>(cols<const T>(cb, 3 * HK, HK, M, HK), a.kn, K);
      a.gate = tensor<T, 2>({M, H});
      a.beta = tensor<T, 2>({M, H});
      const auto& alog = P(id.a_log).value;
      const auto& dtb = P(id.dt_bias).value;
      for (index_t i = 0; i < M; ++i) {
        for (index_t h = 0; h < H; ++h) {
          a.beta(i, h) = sigmoid(a.u(i, 3 * HK + h));
          a.gate(i, h) = -std::exp(alog(0, h)) * softplus(a.u(i, 3 * HK + H + h) + dtb(0, h));
        }
      }
      typename gated_delta_net<T>::options opt;
      opt.chunk_size = cfg_.chunk_size;
      auto state = gated_delta_net<T>::make_state(B, H, K, K);
      gated_delta_net<T>(opt).forward(a.qn.view().template reshape<4>({B, TT, H, K}),
                                      a.kn.view().template reshape<4>({B, TT, H, K}), v4,
                                      a.gate.view().template reshape<3>({B, TT, H}),
                                      a.beta.view().template reshape<3>({B, TT, H}), o4, state);
    } else {
      typename softmax_attention<T>::options opt;
      softmax_attention<T>(opt).forward(heads_of<const T>(cb, 3 * HK, 0, B, TT, H, K),
                                        heads_of<const T>(cb, 3 * HK, HK, B, TT, H, K), v4, o4);
    }
    a.on = tensor<T, 2>({M, HK});
    rms_norm_forward<T>(a.o.view().template reshape<2>({M * H, K}), vec(id.o_norm),
                        a.on.view().template reshape<2>({M * H, K}), eps());
    a.h = tensor<T, 2>({M, D});
    linear_forward<T>(a.on, P(id.w_o).value, a.h);
    for (index_t i = 0; i < M * D; ++i) a.h[i] += x[i];
    a.xn2 = tensor<T, 2>({M, D});
    rms_norm_forward<T>(a.h, vec(id.norm2), a.xn2, eps());
    y = tensor<T, 2>({M, D});
    swiglu_mlp_forward<T>(a.xn2, P(id.w_gate).value, P(id.w_up).value, P(id.w_down).value, y,
                          a.mlp);
    for (index_t i = 0; i < M * D; ++i) y[i] += a.h[i];
  }

  /// dx: in, the gradient of the layer's output; out, of its input x.
  void layer_backward(const layer_ids& id, layer_acts& a, index_t B, index_t TT,
                      const tensor<T, 2>& x, tensor<T, 2>& dx) {
    const index_t M = B * TT, D = cfg_.dim, H = cfg_.heads, K = cfg_.head_dim, HK = H * K;
    const index_t Pw = proj_width();
    // MLP and its residual: dh = dx + norm2ᵀ(mlpᵀ dx)
    tensor<T, 2> dxn2({M, D});
    swiglu_mlp_backward<T>(a.xn2, P(id.w_gate).value, P(id.w_up).value, P(id.w_down).value, a.mlp,
                           dx, dxn2, P(id.w_gate).grad, P(id.w_up).grad, P(id.w_down).grad);
    tensor<T, 2> dh = dx;
    rms_norm_backward<T>(a.h, vec(id.norm2), dxn2, dh, gvec(id.norm2), eps(), true);
    // output projection and the per-head norm
    tensor<T, 2> don({M, HK}), do2({M, HK});
    linear_backward<T>(a.on, P(id.w_o).value, dh, don, P(id.w_o).grad);
    rms_norm_backward<T>(a.o.view().template reshape<2>({M * H, K}), vec(id.o_norm),
                         don.view().template reshape<2>({M * H, K}),
                         do2.view().template reshape<2>({M * H, K}), gvec(id.o_norm), eps());
    // the mixer: gradients of q, k, v into dc [M, 3HK], of the gate pre-activations into du
    tensor<T, 2> dc({M, 3 * HK}), du({M, Pw});
    T* dcb = dc.data();
    const T* cb = a.c.data();
    auto do4 = do2.view().template reshape<4>({B, TT, H, K});
    backward_options<T> bopt;
    bopt.chunk_size = cfg_.chunk_size;
    if (cfg_.mixer == mixer_kind::gla) {
      tensor<T, 2> dgk({M, HK});
      gla_backward<T>(heads_of<const T>(cb, 3 * HK, 0, B, TT, H, K),
                      heads_of<const T>(cb, 3 * HK, HK, B, TT, H, K),
                      heads_of<const T>(cb, 3 * HK, 2 * HK, B, TT, H, K),
                      a.gate.view().template reshape<4>({B, TT, H, K}), {}, do4, {},
                      heads_of<T>(dcb, 3 * HK, 0, B, TT, H, K),
                      heads_of<T>(dcb, 3 * HK, HK, B, TT, H, K),
                      heads_of<T>(dcb, 3 * HK, 2 * HK, B, TT, H, K),
                      dgk.view().template reshape<4>({B, TT, H, K}), {}, bopt);
      const T inv = static_cast<T>(1.0 / cfg_.gla_gate_norm);
      for (index_t i = 0; i < M; ++i)
        for (index_t j = 0; j < HK; ++j)
          du(i, 3 * HK + j) = dgk(i, j) * inv * sigmoid(-a.u(i, 3 * HK + j));
    } else if (cfg_.mixer == mixer_kind::gdn) {
      tensor<T, 2> dqn({M, HK}), dkn({M, HK}), dg({M, H}), dbeta({M, H});
      gated_delta_rule_backward<T>(a.qn.view().template reshape<4>({B, TT, H, K}),
                                   a.kn.view().template reshape<4>({B, TT, H, K}),
                                   heads_of<const T>(cb, 3 * HK, 2 * HK, B, TT, H, K),
                                   a.gate.view().template reshape<3>({B, TT, H}),
                                   a.beta.view().template reshape<3>({B, TT, H}), {}, do4, {},
                                   dqn.view().template reshape<4>({B, TT, H, K}),
                                   dkn.view().template reshape<4>({B, TT, H, K}),
                                   heads_of<T>(dcb, 3 * HK, 2 * HK, B, TT, H, K),
                                   dg.view().template reshape<3>({B, TT, H}),
                                   dbeta.view().template reshape<3>({B, TT, H}), {}, bopt);
      l2norm_backward<T>(cols<const T>(cb, 3 * HK, 0, M, HK), dqn, cols<T>(dcb, 3 * HK, 0, M, HK),
                         K);
      l2norm_backward<T>(cols<const T>(cb, 3 * HK, HK, M, HK), dkn, cols<T>(dcb, 3 * HK, HK, M, HK),
                         K);
      const auto& alog = P(id.a_log).value;
      const auto& dtb = P(id.dt_bias).value;
      auto& dalog = P(id.a_log).grad;
      auto& ddtb = P(id.dt_bias).grad;
      for (index_t h = 0; h < H; ++h) {
        T s_alog = T(0), s_dtb = T(0);
        const T ea = std::exp(alog(0, h));
        for (index_t i = 0; i < M; ++i) {
          const T bb = a.beta(i, h);
          du(i, 3 * HK + h) = dbeta(i, h) * bb * (T(1) - bb);
          const T z = a.u(i, 3 * HK + H + h) + dtb(0, h);
          const T dz = -dg(i, h) * ea * sigmoid(z);
          du(i, 3 * HK + H + h) = dz;
          s_dtb += dz;
          s_alog += dg(i, h) * a.gate(i, h);
        }
        dalog(0, h) += s_alog;
        ddtb(0, h) += s_dtb;
      }
    } else {
      softmax_attention_backward<T>(heads_of<const T>(cb, 3 * HK, 0, B, TT, H, K),
                                    heads_of<const T>(cb, 3 * HK, HK, B, TT, H, K),
                                    heads_of<const T>(cb, 3 * HK, 2 * HK, B, TT, H, K), do4,
                                    heads_of<T>(dcb, 3 * HK, 0, B, TT, H, K),
                                    heads_of<T>(dcb, 3 * HK, HK, B, TT, H, K),
                                    heads_of<T>(dcb, 3 * HK, 2 * HK, B, TT, H, K), bopt);
    }
    // short conv (+SiLU) back to the projection's first 3HK columns
    {
      const tensor_view<const T, 3> u3(a.u.data(), {B, TT, 3 * HK}, {TT * Pw, Pw, 1});
      const tensor_view<T, 3> du3(du.data(), {B, TT, 3 * HK}, {TT * Pw, Pw, 1});
      short_conv_backward<T>(u3, P(id.conv).value, dc.view().template reshape<3>({B, TT, 3 * HK}),
                             du3, P(id.conv).grad, conv_act::silu);
    }
    tensor<T, 2> dxn1({M, D});
    linear_backward<T>(a.xn1, P(id.w_in).value, du, dxn1, P(id.w_in).grad, gvec(id.b_in));
    // residual: dx_in = dh + norm1ᵀ(dxn1)
    dx = std::move(dh);
    rms_norm_backward<T>(x, vec(id.norm1), dxn1, dx, gvec(id.norm1), eps(), true);
  }

  model_config cfg_;
  std::vector<std::unique_ptr<param<T>>> params_;
  std::vector<layer_ids> layers_;
  index_t emb_ = -1, norm_f_ = -1, readout_ = -1;
  std::vector<layer_acts> acts_;
  std::vector<tensor<T, 2>> xs_;
};

}  // namespace seqmix::train
