// SPDX-License-Identifier: MIT
// Backward of the mixture-of-experts block (docs/math.md §6; forward kernels/moe.hpp, front
// mixers/moe_backward.hpp, plain reference reference/moe_backward.hpp).
//
// The loss is L = Σ_t y_t·dy_t + λ_aux·aux + λ_z·z. Given the forward's inputs and dy, the
// engine returns dx, d(router weight), d(every expert weight), d(shared expert weights) and
// d(shared gate). Per token (w_j the routed weight of slot j, e_j its expert, kept_j 0 when the
// capacity dropped it; g = sigmoid(w_g·x) the shared gate, 1 when absent):
//
//   expert e on x:  G = W1 x, U = W3 x, a = act(G), h = a ⊙ U, o = W2 h   (not gated: h = act(U))
//   dw_j   = kept_j · o_{e_j}·dy = kept_j · h·(W2ᵀ dy)       (no second down projection)
//   dh     = w_j W2ᵀ dy;  dU = dh ⊙ a;  dG = dh ⊙ U ⊙ act'(G)  (not gated: dU = dh ⊙ act'(U))
//   dW2 += (w_j dy) hᵀ;  dW1 += dG xᵀ;  dW3 += dU xᵀ;  dx += W1ᵀ dG + W3ᵀ dU
//   shared: the same with w = g; dg = shared(x)·dy, d(w_g·x) = dg · g (1 - g)
//   router (the selection ids and the capacity's choice are piecewise constant and carry no
//   gradient; so e_score_correction_bias, which only enters the choice, gets none), with
//   r_j = routed_scaling_factor · dw_j:
//     softmax_topk       : p = softmax(l); dp_{e_j} = r_j (renormalised: (r_j - Σ_m q_m r_m) / P,
//                          q_j = p_{e_j} / P, P = Σ_m p_{e_m}); dl = p ⊙ (dp - p·dp)
//     topk_softmax       : q = softmax(l_{e_1..e_k}); dl_{e_j} = q_j (r_j - Σ_m q_m r_m), else 0
//     sigmoid_bias       : s = sigmoid(l); ds_{e_j} = r_j (renormalised: r_j / (P + ε) -
//                          Σ_m r_m s_{e_m} / (P + ε)², P = Σ_m s_{e_m}, ε = 1e-20);
//                          dl = ds ⊙ s ⊙ (1 - s)
//   aux = E Σ_e f_e P_e (transformers' load_balancing_loss_func): the token fraction f_e (a
//     count of top-k choices) is constant, the gradient goes through the mean probability
//     P_e = mean_t p_te:  dl_t += λ_aux · p_t ⊙ (c - p_t·c),  c_e = E · count_e / T²
//     (pooled over layers: the pooled counts and token count instead, loss_weights)
//   z = mean_t lse(l_t)²:  dl_t += λ_z · (2 lse(l_t) / T) · p_t
//   l = W_r x:  dW_r = Σ_t dl_t x_tᵀ,  dx_t += W_rᵀ dl_t
//
// Shapes: x, dy, dx [T, D]; router, drouter [E, D]; per expert W1, W3, dW1, dW3 [I, D], W2, dW2
// [D, I]; shared [S, D], [S, D], [D, S]; shared gate [1, D]. Weights f32 or bf16 (widened
// exactly), activations and every gradient f32.
//
// Algorithm (the forward's routing functions are called, not copied: the logits through the same
// matmul, kernels::moe::detail::route_token, loss_token, capacity_of, group_assignments,
// shared_gates):
//  1. logits, routes and the loss counts (per 64-token block), the stable counting sort of the
//     T·k assignments by expert and the capacity, as the forward;
//  2. ONE parallel region over row items. The groups' rows (cost rows × width), end to end in
//     group order, are cut into `threads` equal shares (cuts inside a group on multiples of 32
//     rows, never within 32 rows of its end), each share split into items of <= 512 rows; a
//     worker makes the transposed weights W1ᵀ, W3ᵀ, W2ᵀ (matmul wants B as [N, K] rows) once per
//     group its share touches. Per item, single-threaded on linalg::matmul: gather the rows of x
//     and dy; G, U (recomputed), W2ᵀ dy; the elementwise pass (h, dw, dG, dU; SIMD for SiLU);
//     dx_rows = W1ᵀ dG + W3ᵀ dU; and the rows' xᵀ, (w dy)ᵀ, hᵀ, dGᵀ, dUᵀ into the group's
//     K-major buffers, so the weight GEMMs read them as inner-contiguous operands;
//  3. ONE parallel region over weight items (group, matrix, output rows: whole matrices unless
//     that leaves < 4 items per thread, blocks >= 64 rows), workers taking contiguous runs of
//     equal cost: dW1 = dGᵀ-rows · x, dW3 = dUᵀ-rows · x, dW2 = (w dy)ᵀ-rows · h, each element
//     ONE fma chain over all the group's rows in order (matmul never splits K);
//  4. per token (parallel over 16-token blocks): dl from dw, the aux and z terms (double), the
//     shared gate's logit gradient, and dx_t = Σ_{kept j, slot order} dx_rows + shared +
//     W_rᵀ dl_t + w_g da_t;
//  5. dW_r and dw_g: per 64-column block, a sum over tokens in order.
// Every output element is computed by one thread in an order that does not depend on the thread
// count (a row's products take matmul's GEMM path in any block, since blocks have > 8 rows unless
// they are the whole group), so results are bitwise identical for any thread count.
//
// Cost (gated; kept assignments A <= T·k): 16·A·D·I FLOP for the experts (G, U, W2ᵀdy, two for
// dx, three weight GEMMs; the forward's 6·A·D·I, so 2.7x) + 16·T·D·S for the shared expert +
// 6·T·D·E for the router, plus 3·D·I transposed weight values per (worker, expert touched). Not
// gated: 10·A·D·I. Memory: (3·D + 3·I)·(T·k) + (3·D + 3·S)·T floats of group buffers, per worker
// 3·D·max(I, S) transposed weights plus its item's rows × (2·D + 3·max(I, S)). Scratch is
// grow-only thread_local: steady-state calls of one shape allocate nothing (tested).
// Measured (bench/bench_moe_backward.cpp; T = 1024, D = 1024, E = 8, k = 2, I = 512, Mixtral
// routing; the 16-core Intel Xeon device host, shared, medians): backward / forward_grouped time
// 2.7-3.5x on 1 thread (58-80 GFLOP/s against the forward's 73-101), 3.3-4.0x on 2, 2.5-3.1x
// on 16 (475-645 GFLOP/s). About 63 % of the time is the row items, 30 % the weight GEMMs; the
// weight transposes about 8 % (timed on the dev VM; a matmul that packs B from [K, N] would
// remove them).
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <span>
#include <vector>

#include <seqmix/core/dtype.hpp>
#include <seqmix/core/error.hpp>
#include <seqmix/core/matmul.hpp>
#include <seqmix/core/parallel.hpp>
#include <seqmix/core/simd.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/kernels/moe.hpp>

namespace seqmix::kernels::backward::moe {

namespace fm = seqmix::kernels::moe;

/// Gradients of the E experts' matrices (f32 views, the memory the caller's), as expert_set:
/// gate[e], up[e]: [I, D] (gate empty when not gated), down[e]: [D, I].
struct expert_grads {
  std::vector<tensor_view<float, 2>> gate, up, down;

  index_t count() const { return static_cast<index_t>(up.size()); }
  /// Stacked: gate, up [E, I, D] (gate empty: not gated), down [E, D, I].
  static expert_grads stacked(tensor_view<float, 3> gate, tensor_view<float, 3> up,
                              tensor_view<float, 3> down) {
    expert_grads g;
    for (index_t e = 0; e < up.extent(0); ++e) {
      if (gate.data() != nullptr) g.gate.push_back(gate.template select<0>(e));
      g.up.push_back(up.template select<0>(e));
    }
    for (index_t e = 0; e < down.extent(0); ++e) g.down.push_back(down.template select<0>(e));
    return g;
  }
};

/// Every gradient of one MoE block (f32, inner-contiguous rows).
struct grads {
  tensor_view<float, 2> dx{};       ///< [T, D]
  tensor_view<float, 2> drouter{};  ///< [E, D] (router weight)
  expert_grads experts{};           ///< E experts
  tensor_view<float, 2> dshared_gate_proj{}, dshared_up{}, dshared_down{};  ///< [S,D],[S,D],[D,S]
  tensor_view<float, 2> dshared_gate{};  ///< [1, D] (shared_expert_gate.weight)
};

/// Weights of the router losses in L = Σ y·dy + aux·aux_loss + z·z_loss.
struct loss_weights {
  double aux = 0;  ///< load-balancing loss (transformers' router_aux_loss_coef)
  double z = 0;    ///< router z-loss
  /// Optional, for an aux loss pooled over several layers (transformers concatenates every
  /// layer's router logits): the top-k-of-softmax counts [E] of ALL the pooled tokens (this
  /// call's included) and their number. The token fractions are then count_e / pooled_tokens
  /// and P_e sums over pooled_tokens, so c_e = E · count_e / pooled_tokens². Empty: this call's
  /// own tokens. (The z-loss stays this call's mean.)
  std::span<const double> pooled_counts{};
  index_t pooled_tokens = 0;
};

/// Wall time of the backward's phases, in seconds (optional, for benchmarks): routing and
/// grouping, row items (recomputed G, U, W2ᵀdy, elementwise, dx rows), weight GEMMs, per token
/// (router gradient, dx combine), router weight gradient.
struct phase_times {
  double route = 0, rows = 0, weights = 0, tokens = 0, router = 0;
};

/// One backward call: the forward's problem (y and out unused), dy, the gradients, loss weights.
template <class W>
struct grad_problem {
  fm::problem<W> fwd{};
  tensor_view<const float, 2> dy{};  ///< [T, D]
  grads g{};
  loss_weights losses{};
  phase_times* times = nullptr;  ///< optional: written when given
};

namespace detail {

using fm::detail::uz;

/// Grow-only thread_local scratch of the backward (its own buffers, not the forward's). Pool 0:
/// the call's buffers, on the calling thread and shared by the workers; pool 1: each worker's
/// own (the calling thread is a worker too, so the pools must differ).
template <class T, int Pool = 0>
T* scratch(int which, index_t n) {
  thread_local std::vector<T> buf[12];
  auto& v = buf[which];
  if (v.size() < uz(n)) v.resize(uz(n));
  return v.data();
}

/// act(v) and act'(v) in float (the forward's activations, kernels/moe.hpp).
inline void act_and_grad(fm::expert_activation a, float v, float& f, float& df) {
  using A = fm::expert_activation;
  switch (a) {
    case A::silu: {
      const float s = math::sigmoid(v);
      f = v * s;
      df = s * (1.0f + v * (1.0f - s));
      return;
    }
    case A::gelu: {
      const float cdf = 0.5f * (1.0f + std::erf(v * 0.70710678118654752f));
      f = v * cdf;
      df = cdf + v * 0.39894228040143268f * std::exp(-0.5f * v * v);
      return;
    }
    case A::gelu_tanh: {
      const float c = 0.79788456080286536f;
      const float th = std::tanh(c * (v + 0.044715f * v * v * v));
      f = 0.5f * v * (1.0f + th);
      df = 0.5f * (1.0f + th) + 0.5f * v * (1.0f - th * th) * c * (1.0f + 3.0f * 0.044715f * v * v);
      return;
    }
    case A::relu2: {
      const float r = std::max(v, 0.0f);
      f = r * r;
      df = 2.0f * r;
      return;
    }
  }
  f = v;
  df = 1.0f;
}

/// dl[0..E) (double) of one token from the slot gradients dw[0..k) (0 for dropped slots) of its
/// routed weights, plus the aux and z terms (aux_c: c_e = E·count_e/T², zc = 2/T; both scaled by
/// their loss weights already; null / 0 when off). `p`: 2·E doubles of scratch.
inline void router_grad(const fm::router_options& o, const float* logits, index_t E,
                        const index_t* ids, const float* dw, const double* aux_c, double zc,
                        double* dl, double* p) {
  const index_t k = o.top_k;
  const double rsf = double(o.routed_scaling_factor);
  std::fill_n(dl, E, 0.0);
  // softmax of the logits in double (routing of softmax_topk, and the losses)
  double m = logits[0];
  for (index_t e = 1; e < E; ++e) m = std::max(m, double(logits[e]));
  double den = 0;
  for (index_t e = 0; e < E; ++e) {
    p[e] = std::exp(double(logits[e]) - m);
    den += p[e];
  }
  for (index_t e = 0; e < E; ++e) p[e] /= den;
  const double lse = m + std::log(den);
  switch (o.kind) {
    case fm::router_kind::softmax_topk: {
      double* dp = p + E;
      std::fill_n(dp, E, 0.0);
      if (o.renormalize) {
        double P = 0, qr = 0;
        for (index_t j = 0; j < k; ++j) P += p[ids[j]];
        for (index_t j = 0; j < k; ++j) qr += p[ids[j]] / P * rsf * double(dw[j]);
        for (index_t j = 0; j < k; ++j) dp[ids[j]] = (rsf * double(dw[j]) - qr) / P;
      } else {
        for (index_t j = 0; j < k; ++j) dp[ids[j]] = rsf * double(dw[j]);
      }
      double pd = 0;
      for (index_t e = 0; e < E; ++e) pd += p[e] * dp[e];
      for (index_t e = 0; e < E; ++e) dl[e] = p[e] * (dp[e] - pd);
      break;
    }
    case fm::router_kind::topk_softmax: {
      const double m0 = logits[ids[0]];
      double s = 0, qr = 0;
      double* q = p + E;
      for (index_t j = 0; j < k; ++j) s += (q[j] = std::exp(double(logits[ids[j]]) - m0));
      for (index_t j = 0; j < k; ++j) {
        q[j] /= s;
        qr += q[j] * rsf * double(dw[j]);
      }
      for (index_t j = 0; j < k; ++j) dl[ids[j]] = q[j] * (rsf * double(dw[j]) - qr);
      break;
    }
    case fm::router_kind::sigmoid_bias: {
      double* sj = p + E;  // [k] sigmoid of the chosen logits
      double P = 0, rs = 0;
      for (index_t j = 0; j < k; ++j) {
        sj[j] = 1.0 / (1.0 + std::exp(-double(logits[ids[j]])));
        P += sj[j];
        rs += rsf * double(dw[j]) * sj[j];
      }
      const double den2 = P + 1e-20;
      for (index_t j = 0; j < k; ++j) {
        const double r = rsf * double(dw[j]);
        const double ds = o.renormalize ? r / den2 - rs / (den2 * den2) : r;
        dl[ids[j]] = ds * sj[j] * (1.0 - sj[j]);
      }
      break;
    }
  }
  if (aux_c) {
    double pc = 0;
    for (index_t e = 0; e < E; ++e) pc += p[e] * aux_c[e];
    for (index_t e = 0; e < E; ++e) dl[e] += p[e] * (aux_c[e] - pc);
  }
  if (zc != 0) {
    for (index_t e = 0; e < E; ++e) dl[e] += zc * lse * p[e];
  }
}

/// dst [cols, rows] = src [rows, cols]ᵀ (row strides lds, ldd), 16 source rows at a time.
template <class T>
void transpose(const T* src, index_t lds, index_t rows, index_t cols, T* dst, index_t ldd) {
  constexpr index_t B = 16;
  for (index_t r0 = 0; r0 < rows; r0 += B) {
    const index_t r1 = std::min(rows, r0 + B);
    for (index_t c = 0; c < cols; ++c) {
      for (index_t r = r0; r < r1; ++r) dst[c * ldd + r] = src[r * lds + c];
    }
  }
}

}  // namespace detail

/// The backward of the grouped form (header comment). bp validated by the front (shapes,
/// contiguity, counts); router logits that are NaN or inf are rejected as in the forward.
template <class W>
fm::result run(const checker& check, const grad_problem<W>& bp) {
  using namespace detail;
  const fm::problem<W>& p = bp.fwd;
  const grads& gr = bp.g;
  const index_t T = p.x.extent(0), D = p.x.extent(1), E = p.router.extent(0);
  const index_t k = p.route.top_k;
  const fm::expert_set<W>& ex = *p.experts;
  const index_t I = ex.up.empty() ? 0 : ex.up[0].extent(0);
  const bool has_shared = p.shared && p.shared->present();
  const bool has_sgate = has_shared && p.shared_gate.data() != nullptr;
  const index_t S = has_shared ? p.shared->up.extent(0) : 0;
  const bool gated = p.expert.gated;
  const fm::expert_activation act = p.expert.act;
  const bool want_losses = p.losses || bp.losses.aux != 0 || bp.losses.z != 0;
  fm::result res;
  auto zero = [](tensor_view<float, 2> v) {
    if (v.data() == nullptr) return;
    for (index_t i = 0; i < v.extent(0); ++i)
      for (index_t j = 0; j < v.extent(1); ++j) v(i, j) = 0.0f;
  };
  if (T == 0) {
    zero(gr.drouter);
    for (index_t e = 0; e < E; ++e) {
      if (gated) zero(gr.experts.gate[uz(e)]);
      zero(gr.experts.up[uz(e)]);
      zero(gr.experts.down[uz(e)]);
    }
    zero(gr.dshared_gate_proj);
    zero(gr.dshared_up);
    zero(gr.dshared_down);
    zero(gr.dshared_gate);
    return res;
  }

  auto t_start = std::chrono::steady_clock::now();
  auto lap = [&](double phase_times::*f) {
    if (!bp.times) return;
    const auto now = std::chrono::steady_clock::now();
    bp.times->*f = std::chrono::duration<double>(now - t_start).count();
    t_start = now;
  };
  // 1. the forward's logits, routes, loss counts and grouping
  float* logits = scratch<float>(0, T * E);
  linalg::matmul(p.x, p.router, tensor_view<float, 2>(logits, {T, E}), {});
  fm::detail::check_logits(check, logits, T, E);
  index_t* ids = scratch<index_t>(0, T * k);
  float* wts = scratch<float>(1, T * k);
  constexpr index_t TB = 64;
  const index_t nblk = (T + TB - 1) / TB;
  double* part = scratch<double>(0, nblk * (2 * E + 1));  // per block: counts[E], psum[E], z
  parallel_for(nblk, [&](index_t b) {
    float* scr = scratch<float, 1>(0, fm::detail::route_scratch_floats(E));
    double* pd = scratch<double, 1>(0, 2 * E);
    index_t* idx = scratch<index_t, 1>(0, k);
    auto* taken = reinterpret_cast<unsigned char*>(scratch<float, 1>(1, E / 4 + 1));
    double* counts = part + b * (2 * E + 1);
    double z = 0;
    std::fill_n(counts, 2 * E, 0.0);
    const index_t t1 = std::min(T, (b + 1) * TB);
    for (index_t t = b * TB; t < t1; ++t) {
      fm::detail::route_token(p.route, logits + t * E, E, p.bias.data(), scr, ids + t * k,
                              wts + t * k);
      if (want_losses)
        fm::detail::loss_token(logits + t * E, E, k, counts, counts + E, z, pd, idx, taken);
    }
    counts[2 * E] = z;
  });
  double* counts = scratch<double>(1, 3 * E);  // [E] counts, [E] probability sums, [E] aux c
  double* aux_c = counts + 2 * E;
  std::fill_n(counts, 3 * E, 0.0);
  if (want_losses) {
    double z = 0;
    for (index_t b = 0; b < nblk; ++b) {  // block order: independent of the thread count
      const double* c = part + b * (2 * E + 1);
      for (index_t e = 0; e < E; ++e) {
        counts[e] += c[e];
        counts[E + e] += c[E + e];
      }
      z += c[2 * E];
    }
    res.aux_loss = fm::detail::aux_from(counts, counts + E, E, T);
    res.z_loss = z / double(T);
    const bool pooled = !bp.losses.pooled_counts.empty();
    for (index_t e = 0; e < E; ++e)
      aux_c[e] = pooled ? bp.losses.aux * double(E) * bp.losses.pooled_counts[uz(e)] /
                              (double(bp.losses.pooled_tokens) * double(bp.losses.pooled_tokens))
                        : bp.losses.aux * double(E) * counts[e] / (double(T) * double(T));
  }
  index_t* off = scratch<index_t>(1, E + 1);
  index_t* perm = scratch<index_t>(2, T * k);
  index_t* cnt = scratch<index_t>(3, E);
  index_t* pos_of = scratch<index_t>(4, T * k);
  const index_t C = fm::detail::capacity_of(p.capacity, T, k, E);
  res.capacity = C;
  res.dropped = fm::detail::group_assignments(ids, wts, T, k, E, C, p.capacity.policy, off, perm,
                                              cnt, pos_of, scratch<index_t>(5, E));
  float* sg = scratch<float>(2, T);  // shared gates
  if (has_shared) fm::detail::shared_gates(p, sg, T);

  // group g in [0, E] (E: the shared expert, rows = tokens): rows n_g, width w_g, and where its
  // rows live. Row space: positions [0, T·k) of the experts, then T·k + t for the shared expert.
  const index_t TK = T * k;
  auto rows_of = [&](index_t g) { return g == E ? T : cnt[g]; };
  auto width_of = [&](index_t g) { return g == E ? S : I; };
  auto row0_of = [&](index_t g) { return g == E ? TK : off[g]; };
  auto hoff_of = [&](index_t g) { return g == E ? TK * I : off[g] * I; };  // in [.., width]
  const index_t R = TK + (has_shared ? T : 0);
  float* xT = scratch<float>(3, R * D);            // per group [D, n_g]: x rows, transposed
  float* dyT = scratch<float>(4, R * D);           // per group [D, n_g]: (w dy) transposed
  float* dxr = scratch<float>(5, R * D);           // [R, D]: dx of every row
  float* hT = scratch<float>(6, TK * I + T * S);   // per group [w_g, n_g]: h
  float* dgT = scratch<float>(7, TK * I + T * S);  // per group [w_g, n_g]: dG
  float* duT = scratch<float>(8, TK * I + T * S);  // per group [w_g, n_g]: dU
  float* dwr = scratch<float>(9, R);               // dw (experts) / dg (shared) per row
  auto gate_w = [&](index_t g) {
    if (!gated) return tensor_view<const W, 2>{};
    return g == E ? p.shared->gate : ex.gate[uz(g)];
  };
  auto up_w = [&](index_t g) { return g == E ? p.shared->up : ex.up[uz(g)]; };
  auto down_w = [&](index_t g) { return g == E ? p.shared->down : ex.down[uz(g)]; };

  lap(&phase_times::route);

  // 2. row items: the groups' rows (cost: rows × width), laid end to end in group order, are cut
  //    into `threads` equal shares; a cut inside a group falls on a multiple of 32 rows, and never
  //    within 32 rows of the group's end, so every piece has > 8 rows unless it is the whole group
  //    (matmul's GEMM path: a row's bits do not depend on its block). Each worker's share is a
  //    contiguous run of (group, rows) pieces, split into items of <= 512 rows: it transposes
  //    the weights of only the few groups its share touches.
  const int threads = std::max(1, num_threads());
  const index_t G = has_shared ? E + 1 : E;
  double total = 0;
  for (index_t g = 0; g < G; ++g) total += double(rows_of(g)) * double(width_of(g));
  // cut w (w = 0..threads) as (group, row); cut 0 = (0, 0), cut threads = (G, 0)
  index_t* cut_g = scratch<index_t>(6, 2 * (threads + 1));
  index_t* cut_r = cut_g + threads + 1;
  {
    index_t g = 0;
    double cum = 0;  // cost of the groups before g
    for (index_t w = 0; w <= threads; ++w) {
      const double pos = total * double(w) / double(threads);
      while (g < G && cum + double(rows_of(g)) * double(width_of(g)) <= pos) {
        cum += double(rows_of(g)) * double(width_of(g));
        ++g;
      }
      index_t r = 0;
      if (w == threads || g == G) {
        g = G;
      } else {
        const index_t n = rows_of(g);
        r = static_cast<index_t>(std::llround((pos - cum) / double(width_of(g)) / 32.0)) * 32;
        if (r < 32) {
          r = 0;
        } else if (n - r < 32) {
          r = n;
        }
      }
      cut_g[w] = g;
      cut_r[w] = r;
    }
  }
  auto* items = scratch<fm::detail::work_item>(0, 0);
  index_t* wbeg = scratch<index_t>(7, threads + 1);  // worker w: items [wbeg[w], wbeg[w + 1])
  index_t n_items = 0;
  for (int pass = 0; pass < 2; ++pass) {  // pass 0 counts, pass 1 writes
    index_t q = 0;
    for (index_t w = 0; w < threads; ++w) {
      wbeg[w] = q;
      for (index_t g = cut_g[w]; g <= std::min(cut_g[w + 1], G - 1); ++g) {
        const index_t a = g == cut_g[w] ? cut_r[w] : 0;
        const index_t b = g == cut_g[w + 1] ? cut_r[w + 1] : rows_of(g);
        if (b <= a) continue;
        const index_t nb = (b - a + 511) / 512;  // pieces > 512 rows: blocks of >= 256
        for (index_t i = 0; i < nb; ++i) {
          if (pass == 1) items[q] = {g, a + (b - a) * i / nb, a + (b - a) * (i + 1) / nb};
          ++q;
        }
      }
    }
    wbeg[threads] = q;
    n_items = q;
    if (pass == 0) items = scratch<fm::detail::work_item>(0, n_items);
  }
  const index_t wmax = std::max(I, S);
  parallel_for(threads, [&](index_t worker) {
    index_t cached = -1;                  // the group whose transposed weights this worker holds
    W* w1t = scratch<W, 2>(0, D * wmax);  // [D, w]: W1ᵀ
    W* w3t = scratch<W, 2>(1, D * wmax);  // [D, w]: W3ᵀ
    W* w2t = scratch<W, 2>(2, D * wmax);  // [w, D]: W2ᵀ
    for (index_t q = wbeg[worker]; q < wbeg[worker + 1]; ++q) {
      const fm::detail::work_item it = items[q];
      const index_t g = it.expert, n = it.r1 - it.r0, wd = width_of(g), ng = rows_of(g);
      const index_t row0 = row0_of(g) + it.r0;
      float* xg = scratch<float, 1>(0, n * D);   // [n, D] rows of x
      float* dyg = scratch<float, 1>(1, n * D);  // [n, D] rows of dy
      float* gm = scratch<float, 1>(2, n * wd);  // [n, w] G, then dG
      float* um = scratch<float, 1>(3, n * wd);  // [n, w] U, then dU
      float* dh = scratch<float, 1>(4, n * wd);  // [n, w] W2ᵀ dy, then h
      float* wr = scratch<float, 1>(5, n);       // routed weight (shared: gate) per row
      for (index_t r = 0; r < n; ++r) {
        const index_t t = g == E ? it.r0 + r : perm[row0 + r] / k;
        std::copy_n(p.x.data() + t * p.x.stride(0), D, xg + r * D);
        std::copy_n(bp.dy.data() + t * bp.dy.stride(0), D, dyg + r * D);
        wr[r] = g == E ? sg[t] : wts[perm[row0 + r]];
      }
      if (cached != g) {
        const auto up = up_w(g), down = down_w(g);
        if (gated) transpose(gate_w(g).data(), gate_w(g).stride(0), wd, D, w1t, wd);
        transpose(up.data(), up.stride(0), wd, D, w3t, wd);
        transpose(down.data(), down.stride(0), D, wd, w2t, D);
        cached = g;
      }
      const tensor_view<const float, 2> xv(xg, {n, D}), dyv(dyg, {n, D});
      if (gated) linalg::matmul(xv, gate_w(g), tensor_view<float, 2>(gm, {n, wd}), {});
      linalg::matmul(xv, up_w(g), tensor_view<float, 2>(um, {n, wd}), {});
      linalg::matmul(dyv, tensor_view<const W, 2>(w2t, {wd, D}), tensor_view<float, 2>(dh, {n, wd}),
                     {});
      // elementwise: h, dw = h·(W2ᵀ dy), dh = w·W2ᵀ dy, dU, dG
      for (index_t r = 0; r < n; ++r) {
        float* gr_ = gm + r * wd;
        float* ur = um + r * wd;
        float* hr = dh + r * wd;
        const float w = wr[r];
        double dw = 0;
        index_t i0 = 0;
        if (gated && act == fm::expert_activation::silu) {  // the common case, SIMD
          using B = simd::batch<float>;
          constexpr index_t L = simd::lanes<float>;
          const B wv(w), one(1.0f);
          B acc(0.0f);
          for (; i0 + L <= wd; i0 += L) {
            const B gv = simd::load(gr_ + i0), uv = simd::load(ur + i0), dv = simd::load(hr + i0);
            const B sg_ = simd::sigmoid(gv), av = gv * sg_;
            const B dav = sg_ * (one + gv * (one - sg_));
            const B hv = av * uv, dhv = wv * dv;
            acc = simd::fma(hv, dv, acc);
            simd::store(hr + i0, hv);
            simd::store(ur + i0, dhv * av);
            simd::store(gr_ + i0, dhv * uv * dav);
          }
          dw = double(simd::reduce_sum(acc));
        }
        for (index_t i = i0; i < wd; ++i) {
          float a, da;
          if (gated) {
            act_and_grad(act, gr_[i], a, da);
            const float u = ur[i], d = hr[i];
            const float h = a * u, dhi = w * d;
            dw += double(h) * double(d);
            hr[i] = h;
            ur[i] = dhi * a;        // dU
            gr_[i] = dhi * u * da;  // dG
          } else {
            act_and_grad(act, ur[i], a, da);
            const float d = hr[i];
            dw += double(a) * double(d);
            hr[i] = a;
            ur[i] = w * d * da;  // dU
          }
        }
        dwr[row0 + r] = static_cast<float>(dw);
      }
      // stores, K-major per group: xᵀ, (w dy)ᵀ [D, n_g]; hᵀ, dGᵀ, dUᵀ [w, n_g]
      for (index_t r = 0; r < n; ++r) {
        for (index_t d = 0; d < D; ++d) dyg[r * D + d] *= wr[r];  // dy -> w dy (dy is used)
      }
      transpose(xg, D, n, D, xT + row0_of(g) * D + it.r0, ng);
      transpose(dyg, D, n, D, dyT + row0_of(g) * D + it.r0, ng);
      transpose(dh, wd, n, wd, hT + hoff_of(g) + it.r0, ng);
      transpose(um, wd, n, wd, duT + hoff_of(g) + it.r0, ng);
      if (gated) transpose(gm, wd, n, wd, dgT + hoff_of(g) + it.r0, ng);
      // dx rows = W1ᵀ dG + W3ᵀ dU
      const tensor_view<float, 2> dxv(dxr + row0 * D, {n, D});
      linalg::matmul_options acc{};
      if (gated) {
        linalg::matmul(tensor_view<const float, 2>(gm, {n, wd}),
                       tensor_view<const W, 2>(w1t, {D, wd}), dxv, {});
        acc.accumulate = true;
      }
      linalg::matmul(tensor_view<const float, 2>(um, {n, wd}),
                     tensor_view<const W, 2>(w3t, {D, wd}), dxv, acc);
    }
  });

  lap(&phase_times::rows);

  // 3. weight items (group, matrix 0 gate / 1 up / 2 down, output rows [r0, r1))
  struct witem {
    index_t g, m, r0, r1;
  };
  // each matrix whole (B packed once per matrix) unless that leaves fewer than 4 items per
  // thread; blocks of >= 64 rows (M > 8: the GEMM path, whose bits do not depend on M)
  const index_t n_mats = G * (gated ? 3 : 2);
  const index_t split = std::max<index_t>(1, (4 * threads + n_mats - 1) / n_mats);
  auto wblocks = [&](index_t rows) { return std::max<index_t>(1, std::min(split, rows / 64)); };
  index_t n_w = 0;
  for (index_t g = 0; g < G; ++g) {
    n_w += (gated ? 2 : 1) * wblocks(width_of(g)) + wblocks(D);
  }
  auto* witems = scratch<witem>(0, n_w);
  {
    index_t q = 0;
    for (index_t g = 0; g < G; ++g) {
      for (index_t m = gated ? 0 : 1; m < 3; ++m) {
        const index_t rows = m == 2 ? D : width_of(g), nb = wblocks(rows);
        for (index_t b = 0; b < nb; ++b) witems[q++] = {g, m, rows * b / nb, rows * (b + 1) / nb};
      }
    }
  }
  auto wgrad = [&](index_t g, index_t m) -> tensor_view<float, 2> {
    if (g == E) return m == 0 ? gr.dshared_gate_proj : m == 1 ? gr.dshared_up : gr.dshared_down;
    return m == 0 ? gr.experts.gate[uz(g)] : m == 1 ? gr.experts.up[uz(g)] : gr.experts.down[uz(g)];
  };
  auto weight_item = [&](const witem& it) {
    const index_t ng = rows_of(it.g), wd = width_of(it.g), mr = it.r1 - it.r0;
    const tensor_view<float, 2> out = wgrad(it.g, it.m).template slice<0>(it.r0, it.r1);
    if (ng == 0) {
      zero(out);
      return;
    }
    if (it.m == 2) {  // dW2 rows = (w dy)ᵀ rows · hᵀᵀ: [mr, n_g] · [w, n_g]ᵀ
      linalg::matmul(tensor_view<const float, 2>(dyT + row0_of(it.g) * D + it.r0 * ng, {mr, ng}),
                     tensor_view<const float, 2>(hT + hoff_of(it.g), {wd, ng}), out, {});
    } else {  // dW1 / dW3 rows = dGᵀ / dUᵀ rows · xᵀᵀ: [mr, n_g] · [D, n_g]ᵀ
      const float* a = (it.m == 0 ? dgT : duT) + hoff_of(it.g) + it.r0 * ng;
      linalg::matmul(tensor_view<const float, 2>(a, {mr, ng}),
                     tensor_view<const float, 2>(xT + row0_of(it.g) * D, {D, ng}), out, {});
    }
  };
  // workers take contiguous runs of equal cost (rows · n_g · width): experts differ in size
  index_t* wb = scratch<index_t>(8, threads + 1);
  {
    auto wcost = [&](const witem& it) {
      return double(it.r1 - it.r0) * double(rows_of(it.g)) * double(it.m == 2 ? width_of(it.g) : D);
    };
    double wtotal = 0;
    for (index_t q = 0; q < n_w; ++q) wtotal += wcost(witems[q]);
    double cum = 0;
    index_t w = 0;
    wb[0] = 0;
    for (index_t q = 0; q < n_w; ++q) {
      const double mid = cum + 0.5 * wcost(witems[q]);
      while (w + 1 < threads && mid >= wtotal * double(w + 1) / double(threads)) wb[++w] = q;
      cum += wcost(witems[q]);
    }
    while (w < threads) wb[++w] = n_w;
  }
  parallel_for(threads, [&](index_t worker) {
    for (index_t q = wb[worker]; q < wb[worker + 1]; ++q) weight_item(witems[q]);
  });

  lap(&phase_times::weights);

  // 4. per token: router and shared-gate logit gradients, then dx
  float* dl = scratch<float>(10, T * (E + 1));  // [T, E + 1]: dl_t, then the shared gate's da_t
  const double zc = want_losses && bp.losses.z != 0 ? bp.losses.z * 2.0 / double(T) : 0.0;
  const bool aux_on = want_losses && bp.losses.aux != 0;
  parallel_for((T + 15) / 16, [&](index_t b) {
    double* dld = scratch<double, 1>(0, 3 * E);
    float* dws = scratch<float, 1>(0, k);
    const index_t t1 = std::min(T, (b + 1) * 16);
    for (index_t t = b * 16; t < t1; ++t) {
      for (index_t j = 0; j < k; ++j) {
        const index_t ps = pos_of[t * k + j];
        dws[j] = ps < 0 ? 0.0f : dwr[ps];
      }
      router_grad(p.route, logits + t * E, E, ids + t * k, dws, aux_on ? aux_c : nullptr, zc, dld,
                  dld + E);
      float* dlt = dl + t * (E + 1);
      for (index_t e = 0; e < E; ++e) dlt[e] = static_cast<float>(dld[e]);
      dlt[E] = 0.0f;
      if (has_sgate) {
        const float gt = sg[t];
        dlt[E] = dwr[TK + t] * gt * (1.0f - gt);
      }
      float* dxt = bp.g.dx.data() + t * bp.g.dx.stride(0);
      std::fill_n(dxt, D, 0.0f);
      for (index_t j = 0; j < k; ++j) {
        const index_t ps = pos_of[t * k + j];
        if (ps < 0) continue;
        const float* s = dxr + ps * D;
        for (index_t d = 0; d < D; ++d) dxt[d] += s[d];
      }
      if (has_shared) {
        const float* s = dxr + (TK + t) * D;
        for (index_t d = 0; d < D; ++d) dxt[d] += s[d];
      }
      for (index_t e = 0; e < E + (has_sgate ? 1 : 0); ++e) {
        const float c = dlt[e];
        const W* wrow = e == E ? p.shared_gate.data() : p.router.data() + e * p.router.stride(0);
        for (index_t d = 0; d < D; ++d) dxt[d] += c * static_cast<float>(wrow[d]);
      }
    }
  });

  lap(&phase_times::tokens);

  // 5. dW_r = Σ_t dl_t x_tᵀ, dw_g = Σ_t da_t x_tᵀ: per 64 columns, tokens in order
  const index_t ER = E + (has_sgate ? 1 : 0);
  parallel_for((D + 63) / 64, [&](index_t b) {
    const index_t d0 = b * 64, d1 = std::min(D, d0 + 64), nd = d1 - d0;
    float* acc = scratch<float, 1>(0, ER * 64);
    std::fill_n(acc, ER * 64, 0.0f);
    for (index_t t = 0; t < T; ++t) {
      const float* xt = p.x.data() + t * p.x.stride(0) + d0;
      const float* dlt = dl + t * (E + 1);
      for (index_t e = 0; e < ER; ++e) {
        const float c = dlt[e];
        float* a = acc + e * 64;
        for (index_t d = 0; d < nd; ++d) a[d] = std::fma(c, xt[d], a[d]);
      }
    }
    for (index_t e = 0; e < ER; ++e) {
      float* dst = e == E ? gr.dshared_gate.data() : gr.drouter.data() + e * gr.drouter.stride(0);
      std::copy_n(acc + e * 64, nd, dst + d0);
    }
  });
  lap(&phase_times::router);
  return res;
}

}  // namespace seqmix::kernels::backward::moe
