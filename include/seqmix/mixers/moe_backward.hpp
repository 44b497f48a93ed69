// SPDX-License-Identifier: MIT
// Backward of the MoE block (docs/math.md §6): a free function over the forward's options and
// weights (mixers/moe.hpp), the engine kernels/backward/moe.hpp (math, algorithm, cost there),
// the plain reference reference/moe_backward.hpp.
//
//   moe_backward<W>(opt, weights, x, dy, grads, losses, times)  ->  kernels::moe::result
//
// The loss is L = Σ y·dy + losses.aux · aux + losses.z · z (aux: transformers'
// load_balancing_loss_func of this call's tokens, z: mean_t logsumexp(logits_t)²). Gradients
// flow through the chosen top-k weights; the choice itself (top-k, groups, capacity) is piecewise
// constant, so the selection bias (weights.score_bias) gets no gradient and has no output here.
// Dropped assignments (capacity) get none either. The aux loss's token fraction term is
// constant; its gradient goes through the mean router probability. losses.pooled_counts and
// losses.pooled_tokens pool it over several layers, as transformers does (the counts and number
// of every pooled token; the returned aux_loss is still this call's own).
//
// Shapes: x, dy, grads.dx [T, D]; grads.drouter [E, D]; grads.experts.gate[e], up[e] [I, D]
// (gate empty when not gated), down[e] [D, I]; grads.dshared_gate_proj, dshared_up [S, D],
// dshared_down [D, S] (required iff the shared expert is present; dshared_gate_proj iff gated);
// grads.dshared_gate [1, D] (required iff weights.shared_gate is given). Every gradient is f32
// and overwritten (not accumulated); weights W = float or bf16.
//
// What is saved: nothing; the backward recomputes the routing, the permutation and each
// expert's G = W1 x, U = W3 x. Cost 16·A·D·I + 16·T·D·S + 6·T·D·E FLOP (A kept assignments,
// gated): 2.7x the grouped forward's FLOP.
//
// Checks: the weights and options as the forward's constructor checks them (its messages, named
// moe_backward), x, dy and every gradient's shape and inner contiguity, the expert gradients'
// count, no gradient sharing memory with an input, finite loss weights; router logits that are
// NaN or inf are rejected naming the token and expert. Every message names moe_backward, the
// argument, the expected and the actual value.
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <string_view>

#include <seqmix/core/error.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/kernels/backward/moe.hpp>
#include <seqmix/kernels/moe.hpp>
#include <seqmix/mixers/moe.hpp>

namespace seqmix {

using moe_grads = kernels::backward::moe::grads;
using moe_expert_grads = kernels::backward::moe::expert_grads;
using moe_loss_weights = kernels::backward::moe::loss_weights;
using moe_backward_times = kernels::backward::moe::phase_times;

/// Backward of seqmix::moe<W> (header comment). opt, w: as given to the forward's moe<W>; x: [T,
/// D] in; dy: [T, D] in (the cotangent of y); grads: out (every view written); losses: weights of
/// the aux and z losses in L; times: optional wall time per phase. Returns the losses, dropped
/// count and capacity of the routing (as the forward returns them). Call as
/// moe_backward<float>(...) or moe_backward<bf16>(...).
template <class W>
kernels::moe::result moe_backward(const moe_options& opt, const typename moe<W>::weights& w,
                                  tensor_view<const float, 2> x, tensor_view<const float, 2> dy,
                                  const moe_grads& grads, moe_loss_weights losses = {},
                                  moe_backward_times* times = nullptr) {
  const checker check{"moe_backward"};
  // weights and options: the forward's own checks, reported under this function's name
  try {
    moe_options checked = opt;
    checked.pack_experts = false;  // only the checks: no packed copy of the experts
    const moe<W> layer(checked, w);
    (void)layer;
  } catch (const shape_error& e) {
    std::string m = e.what();
    const std::string_view from = "seqmix::moe: ";
    if (m.rfind(from, 0) == 0) m = "seqmix::moe_backward: " + m.substr(from.size());
    throw shape_error(m);
  }
  const index_t E = w.router.extent(0), D = w.router.extent(1), I = w.experts.up[0].extent(0);
  const bool shared = w.shared.present();
  check.shape("x", x, {any_extent, D});
  const index_t T = x.extent(0);
  check.shape("dy", dy, {T, D});
  check.inner_contiguous("x", x);
  check.inner_contiguous("dy", dy);
  check.shape("grads.dx", grads.dx, {T, D});
  check.inner_contiguous("grads.dx", grads.dx);
  check.shape("grads.drouter", grads.drouter, {E, D});
  check.inner_contiguous("grads.drouter", grads.drouter);
  check.finite_value("losses.aux", losses.aux);
  check.finite_value("losses.z", losses.z);
  if (!losses.pooled_counts.empty()) {
    check.require(static_cast<index_t>(losses.pooled_counts.size()) == E, "losses.pooled_counts",
                  "expected E = " + std::to_string(E) + " counts, got " +
                      std::to_string(losses.pooled_counts.size()));
    check.require(losses.pooled_tokens >= std::max<index_t>(T, 1), "losses.pooled_tokens",
                  "must be >= T = " + std::to_string(T) + " (and >= 1), got " +
                      std::to_string(losses.pooled_tokens));
    for (double c : losses.pooled_counts) {
      check.require(std::isfinite(c) && c >= 0, "losses.pooled_counts",
                    "counts must be finite and >= 0, got " + seqmix::detail::format_value(c));
    }
  }
  const auto& ge = grads.experts;
  check.require(
      ge.count() == E, "grads.experts.up",
      "expected E = " + std::to_string(E) + " matrices, got " + std::to_string(ge.count()));
  check.require(
      static_cast<index_t>(ge.down.size()) == E, "grads.experts.down",
      "expected E = " + std::to_string(E) + " matrices, got " + std::to_string(ge.down.size()));
  if (opt.gated) {
    check.require(static_cast<index_t>(ge.gate.size()) == E, "grads.experts.gate",
                  "gated experts need E = " + std::to_string(E) + " matrices, got " +
                      std::to_string(ge.gate.size()));
  } else {
    check.require(ge.gate.empty(), "grads.experts.gate",
                  "options.gated is false: expected no gate gradients, got " +
                      std::to_string(ge.gate.size()));
  }
  for (index_t e = 0; e < E; ++e) {
    std::string n = "[";
    n += std::to_string(e);
    n += "]";
    const auto i = static_cast<std::size_t>(e);
    check.shape("grads.experts.up" + n, ge.up[i], {I, D});
    check.inner_contiguous("grads.experts.up" + n, ge.up[i]);
    check.shape("grads.experts.down" + n, ge.down[i], {D, I});
    check.inner_contiguous("grads.experts.down" + n, ge.down[i]);
    if (opt.gated) {
      check.shape("grads.experts.gate" + n, ge.gate[i], {I, D});
      check.inner_contiguous("grads.experts.gate" + n, ge.gate[i]);
    }
  }
  if (shared) {
    const index_t S = w.shared.up.extent(0);
    check.shape("grads.dshared_up", grads.dshared_up, {S, D});
    check.inner_contiguous("grads.dshared_up", grads.dshared_up);
    check.shape("grads.dshared_down", grads.dshared_down, {D, S});
    check.inner_contiguous("grads.dshared_down", grads.dshared_down);
    if (opt.gated) {
      check.shape("grads.dshared_gate_proj", grads.dshared_gate_proj, {S, D});
      check.inner_contiguous("grads.dshared_gate_proj", grads.dshared_gate_proj);
    }
    if (w.shared_gate.data() != nullptr) {
      check.shape("grads.dshared_gate", grads.dshared_gate, {1, D});
      check.inner_contiguous("grads.dshared_gate", grads.dshared_gate);
    }
  }
  check.no_overlap({range_of("grads.dx", grads.dx), range_of("grads.drouter", grads.drouter),
                    range_of("grads.dshared_gate_proj", grads.dshared_gate_proj),
                    range_of("grads.dshared_up", grads.dshared_up),
                    range_of("grads.dshared_down", grads.dshared_down),
                    range_of("grads.dshared_gate", grads.dshared_gate)},
                   {range_of("x", x), range_of("dy", dy), range_of("weights.router", w.router)});

  kernels::backward::moe::grad_problem<W> bp;
  auto& p = bp.fwd;
  p.x = x;
  p.router = w.router;
  p.bias = w.score_bias;
  p.experts = &w.experts;
  p.shared = shared ? &w.shared : nullptr;
  p.shared_gate = w.shared_gate;
  p.route.kind = opt.router;
  p.route.top_k = opt.top_k;
  p.route.renormalize = opt.renormalize;
  p.route.n_group = opt.n_group;
  p.route.topk_group = opt.topk_group;
  p.route.routed_scaling_factor = opt.routed_scaling_factor;
  p.route.masked_choice_score = opt.masked_choice_score;
  p.expert.act = opt.activation;
  p.expert.gated = opt.gated;
  p.capacity.factor = opt.capacity_factor;
  p.capacity.policy = opt.drop;
  p.losses = opt.compute_losses;
  bp.dy = dy;
  bp.g = grads;
  bp.losses = losses;
  bp.times = times;
  return kernels::backward::moe::run<W>(check, bp);
}

}  // namespace seqmix
