// SPDX-License-Identifier: MIT
// moe_ffn: the mixture-of-experts feed-forward layer of a checkpoint, with its weights read by
// their on-disk names, on seqmix::moe (mixers/moe.hpp, docs/math.md §6).
//
//   y_t = Σ_{j < k} w_tj · down_e(silu(gate_e x_t) ⊙ up_e x_t)  +  [sigmoid(g·x_t)] · shared(x_t)
//
// The router (softmax top-k, top-k softmax, or DeepSeek-V3's biased sigmoid) is moe_options;
// the names of the tensors are moe_ffn_names, with a preset per family:
//   qwen3_next()        under "model.layers.{i}.mlp.": gate.weight [E, D],
//                       experts.{e}.{gate,up,down}_proj.weight, shared_expert.{gate,up,down}_proj
//                       .weight [S, D] / [D, S], shared_expert_gate.weight [1, D]
//   transformers_fused() the in-memory module layout of transformers 5 (moe_blocks golden):
//                       experts.gate_up_proj [E, 2I, D] (rows 0..I-1 gate), experts.down_proj
//                       [E, D, I]
//   granite()           under "model.layers.{i}.": block_sparse_moe.router.layer.weight,
//                       block_sparse_moe.input_linear.weight [E, 2I, D], .output_linear.weight
//                       [E, D, I]; shared_mlp.input_linear.weight [2S, D] (rows 0..S-1 the silu
//                       half), shared_mlp.output_linear.weight [D, S]; no shared gate
//   deepseek()          Kimi-Linear / DeepSeek-V3 under "...block_sparse_moe." or "...mlp.":
//                       gate.weight, gate.e_score_correction_bias [E], experts.{e}.w1 / w3 / w2
//                       (gate / up / down) or {gate,up,down}_proj, shared_experts.*
// Storage: bf16 when every tensor of the layer is bf16 (as the checkpoint holds it), otherwise
// f32 (bf16 widened exactly); activations f32. tensor_names() lists every tensor the layer
// reads, so a model loader can report a checkpoint's extra and missing tensors.
//
// x [M, D] -> y [M, D] (y overwritten); optional router outputs logits [M, E], ids and weights
// [M, k]. Cost: 2·M·D·E (router) + 6·M·k·D·I (experts) + 6·M·D·S (shared) FLOP; the per-token
// form (M = 1, decode) reads k experts' weights, the grouped form each chosen expert once.
// The layer object is movable, not copyable (the block holds views into its own storage).
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <seqmix/core/dtype.hpp>
#include <seqmix/core/error.hpp>
#include <seqmix/core/io/checkpoint.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/layers/weights.hpp>
#include <seqmix/mixers/moe.hpp>

namespace seqmix::layers {

/// Where a moe_ffn's tensors live, relative to the scope it is loaded from.
struct moe_ffn_names {
  enum class experts_layout {
    per_expert,  ///< {expert_prefix}{e}.{gate,up,down} (each [I, D] / [D, I])
    fused        ///< gate_up [E, 2I, D] and down [E, D, I]
  };
  enum class shared_layout {
    none,
    swiglu,  ///< {shared_prefix}{gate,up,down}: [S, D], [S, D], [D, S]
    fused    ///< shared_gate_up [2S, D] (silu half first), shared_down [D, S]
  };
  std::string router = "gate.weight";
  std::string score_bias;  ///< empty: none
  experts_layout experts = experts_layout::per_expert;
  std::string expert_prefix = "experts.";
  std::string expert_gate = "gate_proj.weight", expert_up = "up_proj.weight",
              expert_down = "down_proj.weight";
  std::string fused_gate_up = "experts.gate_up_proj", fused_down = "experts.down_proj";
  shared_layout shared = shared_layout::none;
  std::string shared_prefix = "shared_expert.";
  std::string shared_gate_up;  ///< fused shared layout
  std::string shared_down;     ///< fused shared layout
  std::string shared_gate;     ///< [1, D] sigmoid gate of the shared expert; empty: none

  /// Qwen2-MoE / Qwen3-MoE / Qwen3-Next checkpoints (per-expert matrices).
  static moe_ffn_names qwen3_next(bool with_shared = true) {
    moe_ffn_names n;
    if (with_shared) {
      n.shared = shared_layout::swiglu;
      n.shared_gate = "shared_expert_gate.weight";
    }
    return n;
  }
  /// transformers 5's in-memory fused experts (experts.gate_up_proj / experts.down_proj).
  static moe_ffn_names transformers_fused(bool with_shared, bool with_shared_gate,
                                          std::string shared_prefix = "shared_expert.") {
    moe_ffn_names n;
    n.experts = experts_layout::fused;
    if (with_shared) {
      n.shared = shared_layout::swiglu;
      n.shared_prefix = std::move(shared_prefix);
      if (with_shared_gate) n.shared_gate = "shared_expert_gate.weight";
    }
    return n;
  }
  /// GraniteMoe(Hybrid), loaded from the decoder layer's scope.
  static moe_ffn_names granite(bool with_shared) {
    moe_ffn_names n;
    n.router = "block_sparse_moe.router.layer.weight";
    n.experts = experts_layout::fused;
    n.fused_gate_up = "block_sparse_moe.input_linear.weight";
    n.fused_down = "block_sparse_moe.output_linear.weight";
    if (with_shared) {
      n.shared = shared_layout::fused;
      n.shared_gate_up = "shared_mlp.input_linear.weight";
      n.shared_down = "shared_mlp.output_linear.weight";
    }
    return n;
  }
  /// DeepSeek-V3 / Kimi-Linear: biased sigmoid router; experts as w1 / w3 / w2 (Kimi, Mixtral)
  /// or gate_proj / up_proj / down_proj (DeepSeek); shared_experts.* when with_shared.
  static moe_ffn_names deepseek(bool w123, bool with_shared) {
    moe_ffn_names n;
    n.score_bias = "gate.e_score_correction_bias";
    if (w123) {
      n.expert_gate = "w1.weight";
      n.expert_up = "w3.weight";
      n.expert_down = "w2.weight";
    }
    if (with_shared) {
      n.shared = shared_layout::swiglu;
      n.shared_prefix = "shared_experts.";
    }
    return n;
  }
};

struct moe_ffn_config {
  index_t hidden = 0;      ///< D
  index_t experts = 0;     ///< E
  index_t expert_dim = 0;  ///< I (moe_intermediate_size)
  index_t shared_dim = 0;  ///< S (0 when names.shared is none)
  moe_options routing{};   ///< router kind, top_k, renormalisation, groups, scaling
  moe_ffn_names names{};
};

class moe_ffn {
 public:
  moe_ffn() = default;
  moe_ffn(moe_ffn&&) noexcept = default;
  moe_ffn& operator=(moe_ffn&&) noexcept = default;

  /// Every tensor name the layer reads (relative to its scope).
  static std::vector<std::string> tensor_names(const moe_ffn_config& cfg) {
    const auto& n = cfg.names;
    std::vector<std::string> out{n.router};
    if (!n.score_bias.empty()) out.push_back(n.score_bias);
    if (n.experts == moe_ffn_names::experts_layout::per_expert) {
      for (index_t e = 0; e < cfg.experts; ++e) {
        const std::string p = n.expert_prefix + std::to_string(e) + ".";
        out.push_back(p + n.expert_gate);
        out.push_back(p + n.expert_up);
        out.push_back(p + n.expert_down);
      }
    } else {
      out.push_back(n.fused_gate_up);
      out.push_back(n.fused_down);
    }
    if (n.shared == moe_ffn_names::shared_layout::swiglu) {
      out.push_back(n.shared_prefix + "gate_proj.weight");
      out.push_back(n.shared_prefix + "up_proj.weight");
      out.push_back(n.shared_prefix + "down_proj.weight");
    } else if (n.shared == moe_ffn_names::shared_layout::fused) {
      out.push_back(n.shared_gate_up);
      out.push_back(n.shared_down);
    }
    if (!n.shared_gate.empty()) out.push_back(n.shared_gate);
    return out;
  }

  static moe_ffn load(const checkpoint& ck, const std::string& prefix, const moe_ffn_config& cfg) {
    return load(ck.scope(prefix), cfg);
  }
  static moe_ffn load(const checkpoint_scope& scope, const moe_ffn_config& cfg) {
    constexpr std::string_view who = "moe_ffn::load";
    const checker check{who};
    detail::check_config_positive(check, {"hidden", "experts", "expert_dim"},
                                  {cfg.hidden, cfg.experts, cfg.expert_dim});
    const bool has_shared = cfg.names.shared != moe_ffn_names::shared_layout::none;
    if (has_shared && !(cfg.shared_dim > 0))
      check.fail("config.shared_dim",
                 "must be > 0 with a shared expert, got " + std::to_string(cfg.shared_dim));
    // check every tensor (name, shape, dtype) first; bf16 storage iff all are bf16
    const index_t D = cfg.hidden, E = cfg.experts, I = cfg.expert_dim, S = cfg.shared_dim;
    const auto& n = cfg.names;
    bool all_bf16 = true;
    auto need = [&](const std::string& name, const std::vector<index_t>& shape, bool matrix) {
      const auto& info = detail::checked_info(who, scope, name, shape, matrix);
      if (matrix) all_bf16 = all_bf16 && info.type == dtype::bf16;
    };
    need(n.router, {E, D}, true);
    if (!n.score_bias.empty()) need(n.score_bias, {E}, false);
    if (n.experts == moe_ffn_names::experts_layout::per_expert) {
      for (index_t e = 0; e < E; ++e) {
        const std::string p = n.expert_prefix + std::to_string(e) + ".";
        need(p + n.expert_gate, {I, D}, true);
        need(p + n.expert_up, {I, D}, true);
        need(p + n.expert_down, {D, I}, true);
      }
    } else {
      need(n.fused_gate_up, {E, 2 * I, D}, true);
      need(n.fused_down, {E, D, I}, true);
    }
    if (n.shared == moe_ffn_names::shared_layout::swiglu) {
      need(n.shared_prefix + "gate_proj.weight", {S, D}, true);
      need(n.shared_prefix + "up_proj.weight", {S, D}, true);
      need(n.shared_prefix + "down_proj.weight", {D, S}, true);
    } else if (n.shared == moe_ffn_names::shared_layout::fused) {
      need(n.shared_gate_up, {2 * S, D}, true);
      need(n.shared_down, {D, S}, true);
    }
    if (!n.shared_gate.empty()) {
      if (!has_shared)
        check.fail("config.names.shared_gate", "a shared-expert gate needs a shared expert");
      need(n.shared_gate, {1, D}, true);
    }
    moe_ffn l;
    l.cfg_ = cfg;
    l.cfg_.routing.compute_losses = false;  // inference: no loss reductions per call
    if (all_bf16) {
      l.b16_ = build<bf16>(scope, l.cfg_);
    } else {
      l.f32_ = build<float>(scope, l.cfg_);
    }
    return l;
  }

  const moe_ffn_config& config() const noexcept { return cfg_; }
  bool is_bf16() const noexcept { return b16_ != nullptr; }
  index_t hidden() const noexcept { return cfg_.hidden; }
  index_t top_k() const noexcept { return cfg_.routing.top_k; }
  index_t experts() const noexcept { return cfg_.experts; }

  /// y [M, D] = the layer's output for x [M, D]; `out` receives the router's outputs.
  void forward(tensor_view<const float, 2> x, tensor_view<float, 2> y,
               kernels::moe::router_outputs out = {}) const {
    if (b16_) {
      b16_->block->forward(x, y, out);
    } else if (f32_) {
      f32_->block->forward(x, y, out);
    } else {
      throw shape_error("seqmix::moe_ffn::forward: the layer has no weights (default-constructed)");
    }
  }

 private:
  template <class W>
  struct store {
    tensor<W, 2> router;
    tensor<float, 1> bias;
    std::vector<tensor<W, 2>> gate, up, down;  // per expert
    tensor<W, 3> gate_up3, down3;              // fused
    tensor<W, 2> sh_gate, sh_up, sh_down, sh_gate_up, sh_g;
    std::optional<moe<W>> block;
  };

  template <class W>
  static std::unique_ptr<store<W>> build(const checkpoint_scope& scope, const moe_ffn_config& cfg) {
    auto s = std::make_unique<store<W>>();
    const auto& n = cfg.names;
    const index_t S = cfg.shared_dim;
    typename moe<W>::weights w;
    s->router = scope.get<W, 2>(n.router);
    w.router = s->router.view();
    if (!n.score_bias.empty()) {
      s->bias = scope.get<float, 1>(n.score_bias);
      w.score_bias = s->bias.view();
    }
    if (n.experts == moe_ffn_names::experts_layout::per_expert) {
      for (index_t e = 0; e < cfg.experts; ++e) {
        const std::string p = n.expert_prefix + std::to_string(e) + ".";
        s->gate.push_back(scope.get<W, 2>(p + n.expert_gate));
        s->up.push_back(scope.get<W, 2>(p + n.expert_up));
        s->down.push_back(scope.get<W, 2>(p + n.expert_down));
      }
      for (std::size_t e = 0; e < s->up.size(); ++e)
        w.experts.add(s->gate[e].view(), s->up[e].view(), s->down[e].view());
    } else {
      s->gate_up3 = scope.get<W, 3>(n.fused_gate_up);
      s->down3 = scope.get<W, 3>(n.fused_down);
      w.experts = moe<W>::expert_set::fused(s->gate_up3.view(), s->down3.view(), true);
    }
    if (n.shared == moe_ffn_names::shared_layout::swiglu) {
      s->sh_gate = scope.get<W, 2>(n.shared_prefix + "gate_proj.weight");
      s->sh_up = scope.get<W, 2>(n.shared_prefix + "up_proj.weight");
      s->sh_down = scope.get<W, 2>(n.shared_prefix + "down_proj.weight");
      w.shared.gate = s->sh_gate.view();
      w.shared.up = s->sh_up.view();
      w.shared.down = s->sh_down.view();
    } else if (n.shared == moe_ffn_names::shared_layout::fused) {
      s->sh_gate_up = scope.get<W, 2>(n.shared_gate_up);
      s->sh_down = scope.get<W, 2>(n.shared_down);
      const tensor_view<const W, 2> gu = s->sh_gate_up.view();
      w.shared.gate = gu.template slice<0>(0, S);
      w.shared.up = gu.template slice<0>(S, 2 * S);
      w.shared.down = s->sh_down.view();
    }
    if (!n.shared_gate.empty()) {
      s->sh_g = scope.get<W, 2>(n.shared_gate);
      w.shared_gate = s->sh_g.view();
    }
    s->block.emplace(cfg.routing, std::move(w));
    return s;
  }

  moe_ffn_config cfg_{};
  std::unique_ptr<store<float>> f32_;
  std::unique_ptr<store<bf16>> b16_;
};

}  // namespace seqmix::layers
