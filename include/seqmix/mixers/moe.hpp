// SPDX-License-Identifier: MIT
// Mixture-of-experts feed-forward block: router + k of E experts (+ a shared expert), a thin
// front over kernels/moe.hpp (docs/math.md §6, where the router kinds, capacity and losses are
// defined; the engine's header repeats them with the cost of each form).
//
//   y_t = Σ_{j < k, kept} w_tj · W2_e (act(W1_e x_t) ⊙ W3_e x_t)  + [sigmoid(w_g·x_t)] ·
//   shared(x_t)
//
// Shapes: x, y [T, D]; router weight [E, D] (`gate.weight`); experts gate/up [I, D], down [D, I]
// each (or transformers' fused gate_up_proj [E, 2I, D] and down_proj [E, D, I]); shared expert
// gate/up [S, D], down [D, S]; shared gate [1, D]; e_score_correction_bias [E]. Weights W = float
// or bf16 (widened exactly); activations and outputs f32.
//
// Forms: forward_grouped (training / prefill: tokens permuted into expert groups, one grouped
// GEMM per expert, all experts in one parallel region) and forward_per_token (inference /
// decode: per token, k GEMVs, no permutation buffers, no allocation in steady state). They give
// the same outputs to rounding; forward picks per_token below options::switch_over_t tokens
// (default 2: one token).
// Both return the load-balancing and z losses and the count of dropped assignments.
//
// Checks: at construction every weight's shape, contiguity and count, and the options (k in
// [1, E], groups dividing E with >= 2 experts each, finite factors, a bias only for the sigmoid
// router); at each call x and y [T, D], the optional router outputs' shapes, y not sharing
// memory with x; router logits that are NaN or infinite are rejected naming the token and
// expert. Every message names the function, the argument, the expected and the actual value.
#pragma once

#include <cmath>
#include <string>
#include <utility>

#include <seqmix/core/error.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/kernels/moe.hpp>

namespace seqmix {

/// Options of seqmix::moe (shared by its f32 and bf16 instantiations).
struct moe_options {
  kernels::moe::router_kind router = kernels::moe::router_kind::softmax_topk;
  index_t top_k = 2;
  bool renormalize = false;  ///< norm_topk_prob (softmax_topk, sigmoid_bias)
  index_t n_group = 1;       ///< sigmoid_bias: expert groups
  index_t topk_group = 1;    ///< sigmoid_bias: groups kept
  float routed_scaling_factor = 1.0f;
  float masked_choice_score = 0.0f;  ///< sigmoid_bias: choice score outside kept groups
  kernels::moe::expert_activation activation = kernels::moe::expert_activation::silu;
  bool gated = true;             ///< act(W1 x) ⊙ W3 x; false: act(W3 x)
  float capacity_factor = 0.0f;  ///< 0: unlimited; C = ceil(T·k/E · factor)
  kernels::moe::drop_policy drop = kernels::moe::drop_policy::by_score;
  bool compute_losses = true;  ///< aux and z losses in the result
  /// forward(): the per-token form for T below this. The per-token form reads k experts' weights
  /// per token, the grouped form each chosen expert once per call, so from T = 2 on (tokens can
  /// share experts) the grouped form reads no more; the per-token form wins on one token (no
  /// permutation, every thread on the same GEMVs).
  index_t switch_over_t = 2;
  /// Pack the experts' (and the shared expert's) matrices once, at construction
  /// (linalg::packed_weights): both forms then run on the panels and the weight views are not
  /// read again. The grouped form's expert GEMMs skip packing B per call and expert (AMD EPYC,
  /// E = 8, top-2, D = 512, I = 1024, T = 512: 42-50 -> 36 ms on 1 thread, 28-29 -> 19.5-21 on
  /// 2; expert GEMMs 48-67 % -> 66-77 % of peak; docs/bench/linalg.md); the per-token form's
  /// GEMVs stay within 1.2x of the weight-read bound. Costs a copy of the experts in memory (a
  /// checkpoint's mapped pages are read once, here, and then left to the page cache) and the
  /// packing time. Off: the views are read as stored (the grouped form packs per call).
  /// Groups of > 8 rows give the unpacked grouped form's bits (the same micro-kernel chains),
  /// the per-token form and smaller groups the panels' GEMV (equal to rounding).
  bool pack_experts = true;

  /// MixtralSparseMoeBlock: softmax, top-k, renormalised (= softmax of the top-k logits).
  static moe_options mixtral(index_t k = 2) {
    moe_options o;
    o.top_k = k;
    o.renormalize = true;
    return o;
  }
  /// GraniteMoe(Hybrid): top-k of the logits, softmax over those k.
  static moe_options granite(index_t k = 2) {
    moe_options o;
    o.router = kernels::moe::router_kind::topk_softmax;
    o.top_k = k;
    return o;
  }
  /// Qwen2-MoE / Qwen3-MoE / Qwen3-Next: softmax, top-k, renormalised iff norm_topk_prob.
  static moe_options qwen_moe(bool norm_topk_prob, index_t k = 2) {
    moe_options o;
    o.top_k = k;
    o.renormalize = norm_topk_prob;
    return o;
  }
  /// DeepSeek-V3 / Kimi-Linear: sigmoid + e_score_correction_bias, group-limited,
  /// renormalised (+ 1e-20), × routed_scaling_factor.
  static moe_options deepseek_v3(index_t n_group, index_t topk_group, float scaling, index_t k,
                                 bool norm_topk_prob = true) {
    moe_options o;
    o.router = kernels::moe::router_kind::sigmoid_bias;
    o.top_k = k;
    o.n_group = n_group;
    o.topk_group = topk_group;
    o.routed_scaling_factor = scaling;
    o.renormalize = norm_topk_prob;
    return o;
  }
};

/// MoE feed-forward block over borrowed weights (the views must outlive the object).
/// Const calls are thread-safe (scratch is thread_local).
template <class W = float>
class moe {
 public:
  using router_kind = kernels::moe::router_kind;
  using drop_policy = kernels::moe::drop_policy;
  using expert_activation = kernels::moe::expert_activation;
  using expert_set = kernels::moe::expert_set<W>;
  using mlp_weights = kernels::moe::mlp_weights<W>;
  using router_outputs = kernels::moe::router_outputs;
  using result = kernels::moe::result;
  using balance_stats = kernels::moe::balance_stats;

  using options = moe_options;

  struct weights {
    tensor_view<const W, 2> router{};          ///< [E, D] (gate.weight)
    tensor_view<const float, 1> score_bias{};  ///< [E] e_score_correction_bias (sigmoid_bias)
    expert_set experts{};                      ///< E experts
    mlp_weights shared{};                      ///< optional shared expert
    tensor_view<const W, 2> shared_gate{};     ///< optional [1, D] (shared_expert_gate.weight)
  };

  moe(options opt, weights w) : opt_(std::move(opt)), w_(std::move(w)) {
    validate();
    if (opt_.pack_experts) {
      w_.experts.pack();
      if (w_.shared.present()) w_.shared.pack();
    }
  }

  const options& get_options() const { return opt_; }
  index_t num_experts() const { return E_; }
  index_t model_dim() const { return D_; }
  index_t expert_dim() const { return I_; }
  index_t shared_dim() const { return S_; }

  /// Grouped (training / prefill) form. x: [T, D] in; y: [T, D] out; out: optional router
  /// logits [T, E], ids [T, k], weights [T, k]; stats: optional per-thread busy time.
  result forward_grouped(tensor_view<const float, 2> x, tensor_view<float, 2> y,
                         router_outputs out = {}, balance_stats* stats = nullptr) const {
    const checker check{"moe::forward_grouped"};
    auto p = make_problem(check, x, y, out);
    p.stats = stats;
    return kernels::moe::run_grouped<W>(check, p);
  }
  /// Per-token (inference / decode) form; arguments as forward_grouped.
  result forward_per_token(tensor_view<const float, 2> x, tensor_view<float, 2> y,
                           router_outputs out = {}) const {
    const checker check{"moe::forward_per_token"};
    auto p = make_problem(check, x, y, out);
    return kernels::moe::run_per_token<W>(check, p);
  }
  /// Per-token form below options::switch_over_t tokens, grouped form from there.
  result forward(tensor_view<const float, 2> x, tensor_view<float, 2> y,
                 router_outputs out = {}) const {
    const checker check{"moe::forward"};
    auto p = make_problem(check, x, y, out);
    if (x.extent(0) < opt_.switch_over_t) return kernels::moe::run_per_token<W>(check, p);
    return kernels::moe::run_grouped<W>(check, p);
  }
  /// One token: x1, y1 [D]. Allocates nothing in steady state.
  result step(tensor_view<const float, 1> x1, tensor_view<float, 1> y1) const {
    const checker check{"moe::step"};
    check.shape("x1", x1, {D_});
    check.shape("y1", y1, {D_});
    const tensor_view<const float, 2> x(x1.data(), {1, D_}, {D_, x1.stride(0)});
    const tensor_view<float, 2> y(y1.data(), {1, D_}, {D_, y1.stride(0)});
    check.no_overlap({range_of("y1", y1)}, {range_of("x1", x1)});
    auto p = base_problem(x, y, {});
    return kernels::moe::run_per_token<W>(check, p);
  }

 private:
  kernels::moe::problem<W> base_problem(tensor_view<const float, 2> x, tensor_view<float, 2> y,
                                        router_outputs out) const {
    kernels::moe::problem<W> p;
    p.x = x;
    p.y = y;
    p.router = w_.router;
    p.bias = w_.score_bias;
    p.experts = &w_.experts;
    p.shared = w_.shared.present() ? &w_.shared : nullptr;
    p.shared_gate = w_.shared_gate;
    p.route.kind = opt_.router;
    p.route.top_k = opt_.top_k;
    p.route.renormalize = opt_.renormalize;
    p.route.n_group = opt_.n_group;
    p.route.topk_group = opt_.topk_group;
    p.route.routed_scaling_factor = opt_.routed_scaling_factor;
    p.route.masked_choice_score = opt_.masked_choice_score;
    p.expert.act = opt_.activation;
    p.expert.gated = opt_.gated;
    p.capacity.factor = opt_.capacity_factor;
    p.capacity.policy = opt_.drop;
    p.losses = opt_.compute_losses;
    p.out = out;
    return p;
  }

  kernels::moe::problem<W> make_problem(const checker& check, tensor_view<const float, 2> x,
                                        tensor_view<float, 2> y, router_outputs out) const {
    check.shape("x", x, {any_extent, D_});
    const index_t T = x.extent(0);
    check.shape("y", y, {T, D_});
    if (out.logits.data()) check.shape("out.logits", out.logits, {T, E_});
    if (out.ids.data()) check.shape("out.ids", out.ids, {T, opt_.top_k});
    if (out.weights.data()) check.shape("out.weights", out.weights, {T, opt_.top_k});
    check.no_overlap({range_of("y", y), range_of("out.logits", out.logits),
                      range_of("out.ids", out.ids), range_of("out.weights", out.weights)},
                     {range_of("x", x), range_of("weights.router", w_.router)});
    return base_problem(x, y, out);
  }

  template <class V>
  static bool given(const V& v) {
    return v.data() != nullptr;
  }

  void validate() {
    const checker check{"moe"};
    // options
    check.require(opt_.top_k >= 1, "options.top_k",
                  "must be >= 1, got " + std::to_string(opt_.top_k));
    check.finite_value("options.routed_scaling_factor", opt_.routed_scaling_factor);
    check.require(!std::isnan(opt_.masked_choice_score), "options.masked_choice_score",
                  "must not be NaN");
    check.finite_value("options.capacity_factor", opt_.capacity_factor);
    check.require(
        opt_.capacity_factor >= 0, "options.capacity_factor",
        "must be >= 0 (0: unlimited), got " + seqmix::detail::format_value(opt_.capacity_factor));
    // router
    check.nonempty("weights.router", w_.router);
    check.inner_contiguous("weights.router", w_.router);
    E_ = w_.router.extent(0);
    D_ = w_.router.extent(1);
    check.require(opt_.top_k <= E_, "options.top_k",
                  "must be <= E = " + std::to_string(E_) + " (the router's experts), got " +
                      std::to_string(opt_.top_k));
    if (opt_.router == router_kind::sigmoid_bias) {
      check.require(opt_.n_group >= 1 && E_ % opt_.n_group == 0, "options.n_group",
                    "must be >= 1 and divide E = " + std::to_string(E_) + ", got " +
                        std::to_string(opt_.n_group));
      if (opt_.n_group > 1) {
        check.require(E_ / opt_.n_group >= 2, "options.n_group",
                      "groups are ranked by their two best experts: E / n_group must be >= 2, "
                      "got E = " +
                          std::to_string(E_) + ", n_group = " + std::to_string(opt_.n_group));
      }
      check.require(opt_.topk_group >= 1 && opt_.topk_group <= opt_.n_group, "options.topk_group",
                    "must be in [1, n_group = " + std::to_string(opt_.n_group) + "], got " +
                        std::to_string(opt_.topk_group));
      if (given(w_.score_bias)) {
        check.shape("weights.score_bias", w_.score_bias, {E_});
        check.finite("weights.score_bias", w_.score_bias);
      }
    } else {
      check.require(opt_.n_group == 1 && opt_.topk_group == 1, "options.n_group",
                    "group-limited routing needs router = sigmoid_bias, got n_group = " +
                        std::to_string(opt_.n_group) +
                        ", topk_group = " + std::to_string(opt_.topk_group));
      check.require(!given(w_.score_bias), "weights.score_bias",
                    "a selection bias is only used by router = sigmoid_bias");
    }
    // experts
    const auto& ex = w_.experts;
    check.require(ex.count() == E_, "weights.experts",
                  "expected E = " + std::to_string(E_) + " experts (the router's rows), got " +
                      std::to_string(ex.count()));
    check.require(
        ex.down.size() == ex.up.size(), "weights.experts.down",
        "expected " + std::to_string(E_) + " matrices, got " + std::to_string(ex.down.size()));
    if (opt_.gated) {
      check.require(ex.gate.size() == ex.up.size(), "weights.experts.gate",
                    "gated experts need E = " + std::to_string(E_) + " gate matrices, got " +
                        std::to_string(ex.gate.size()));
    } else {
      check.require(ex.gate.empty(), "weights.experts.gate",
                    "options.gated is false: expected no gate matrices, got " +
                        std::to_string(ex.gate.size()));
    }
    I_ = ex.up[0].extent(0);
    check.require(I_ >= 1, "weights.experts.up[0]", "must have >= 1 rows (I), got 0");
    for (index_t e = 0; e < E_; ++e) {
      // appended, not "[" + ...: g++ 12 -O3 reports a false -Wrestrict on operator+(const char*,
      // string&&) here when the block is inlined into a caller (models / moe_ffn)
      std::string n = "[";
      n += std::to_string(e);
      n += "]";
      const auto i = static_cast<std::size_t>(e);
      check.shape("weights.experts.up" + n, ex.up[i], {I_, D_});
      check.inner_contiguous("weights.experts.up" + n, ex.up[i]);
      if (opt_.gated) {
        check.shape("weights.experts.gate" + n, ex.gate[i], {I_, D_});
        check.inner_contiguous("weights.experts.gate" + n, ex.gate[i]);
      }
      check.shape("weights.experts.down" + n, ex.down[i], {D_, I_});
      check.inner_contiguous("weights.experts.down" + n, ex.down[i]);
    }
    // shared expert
    if (w_.shared.present()) {
      S_ = w_.shared.up.extent(0);
      check.require(S_ >= 1, "weights.shared.up", "must have >= 1 rows, got 0");
      check.shape("weights.shared.up", w_.shared.up, {S_, D_});
      check.inner_contiguous("weights.shared.up", w_.shared.up);
      if (opt_.gated) {
        check.shape("weights.shared.gate", w_.shared.gate, {S_, D_});
        check.inner_contiguous("weights.shared.gate", w_.shared.gate);
      } else {
        check.require(!given(w_.shared.gate), "weights.shared.gate",
                      "options.gated is false: expected no gate matrix");
      }
      check.shape("weights.shared.down", w_.shared.down, {D_, S_});
      check.inner_contiguous("weights.shared.down", w_.shared.down);
      if (given(w_.shared_gate)) {
        check.shape("weights.shared_gate", w_.shared_gate, {1, D_});
        check.inner_contiguous("weights.shared_gate", w_.shared_gate);
      }
    } else {
      check.require(!given(w_.shared_gate), "weights.shared_gate",
                    "a shared-expert gate needs a shared expert (weights.shared)");
    }
  }

  options opt_;
  weights w_;
  index_t E_ = 0, D_ = 0, I_ = 0, S_ = 0;
};

}  // namespace seqmix
