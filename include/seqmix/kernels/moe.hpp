// SPDX-License-Identifier: MIT
// Mixture-of-experts engine: routers, capacity, permutation, grouped expert GEMMs, combine
// (docs/math.md §6). The front is mixers/moe.hpp; the plain reference reference/moe.hpp.
//
//   logits_t = W_r x_t                                            W_r: [E, D]
//   router (ties always to the lower expert index):
//     softmax_topk : p = softmax(logits_t); ids = top-k(p); w = p[ids] (/ Σ w if renormalize)
//     topk_softmax : ids = top-k(logits_t); w = softmax(logits_t[ids])
//     sigmoid_bias : s = sigmoid(logits_t); c = s + bias; n_group > 1: groups ranked by the sum
//                    of their two largest c, the best topk_group kept, c of the others set to
//                    masked_choice_score (0, as transformers' masked_fill); ids = top-k(c);
//                    w = s[ids] (/ (Σ w + 1e-20) if renormalize)
//     every kind   : w ×= routed_scaling_factor
//   capacity C = ceil(T·k/E · factor) assignments per expert (factor 0: unlimited); over C, an
//     expert keeps the C assignments of largest w (by_score, ties to the lower token) or of
//     lowest token index (by_position); a dropped assignment contributes nothing (the token
//     keeps the shared expert; the residual is the caller's).
//   expert e (gated): h = act(W1_e x) ⊙ (W3_e x), out = W2_e h; act ∈ {SiLU, GELU, GELU-tanh,
//     ReLU²}; not gated: h = act(W3_e x)
//   y_t = Σ_{kept slots j, in slot order} w_tj · expert_{ids_tj}(x_t)
//         + [sigmoid(w_g · x_t)] · shared(x_t)
//   aux = E · Σ_e f_e · P_e (transformers' load_balancing_loss_func: softmax of the logits for
//     every router kind, f_e = share of the T·k top-k-of-softmax choices, P_e = mean p_te;
//     minimum k); z = mean_t (logsumexp logits_t)².
//
// Dimensions: T tokens, D model width, E experts, k chosen per token, I expert width, S shared
// expert width.
//
// Two forms with equal outputs (to rounding: they run the same per-row products through the
// GEMM and the GEMV paths of linalg::matmul):
//  * grouped (training / prefill): route every token (parallel over 64-token blocks), a stable
//    counting sort of the T·k assignments by expert (token order inside an expert), capacity,
//    then ONE parallel region over work items (expert, row block) and (shared expert, row block)
//    assigned largest first to the least-loaded worker (a fixed rule: the same routing gives
//    each thread the same items, so scratch never grows in steady state), each item gathering
//    its rows and running its expert's three GEMMs single-threaded (matmul inside the region is
//    serial); a row block of an expert never has <= 8 rows unless the whole group does, so every
//    row takes the same fma chain for any thread count and block size (bitwise identical results);
//    then the combine over tokens in slot order. With expert_set::pack() (moe_options::
//    pack_experts) the expert GEMMs run on packed_weights copies instead (no B packing per call),
//    and so do the per-token form's GEMVs (whole panels per thread).
//    Cost 2·T·D·E + 2·T·k·(2 or 1 + 1)·D·I FLOP (+ shared), memory T·k·D floats of permuted outputs
//    + per thread rows×(D + 2I) gathered rows.
//  * per token (inference / decode): per token, route, then per chosen expert three GEMVs
//    (matmul's M = 1 path, or linalg::matmul_panels on packed experts; threaded over output
//    rows, in whole panels when packed) accumulating into y_t; no permutation
//    buffers; scratch is grow-only thread_local, so steady-state calls allocate nothing. Reads
//    k·(3 or 2)·D·I weights per token: bandwidth-bound.
// Losses are summed in double over fixed 64-token blocks (grouped) or tokens (per token), so
// they too are independent of the thread count.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <vector>

#if defined(__linux__)
#include <time.h>
#endif

#include <seqmix/core/dtype.hpp>
#include <seqmix/core/error.hpp>
#include <seqmix/core/matmul.hpp>
#include <seqmix/core/packed_weights.hpp>
#include <seqmix/core/parallel.hpp>
#include <seqmix/core/simd.hpp>
#include <seqmix/core/tensor.hpp>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace seqmix::kernels::moe {

/// How the router turns logits into k experts and weights (header comment).
enum class router_kind {
  softmax_topk,  ///< Qwen2/Qwen3-MoE, Qwen3-Next, DeepSeek-V2, Mixtral (renormalize = true)
  topk_softmax,  ///< GraniteMoe(Hybrid): softmax over the k largest logits
  sigmoid_bias,  ///< DeepSeek-V3, Kimi-Linear: sigmoid, biased choice, group-limited
};
/// Which assignments an expert over capacity keeps.
enum class drop_policy {
  by_score,     ///< the largest routing weights (ties: lower token index)
  by_position,  ///< the lowest token indices
};
/// Expert nonlinearity: act(W1 x) ⊙ W3 x when gated, act(W3 x) otherwise.
enum class expert_activation { silu, gelu, gelu_tanh, relu2 };

struct router_options {
  router_kind kind = router_kind::softmax_topk;
  index_t top_k = 2;
  /// softmax_topk: divide the k weights by their sum (norm_topk_prob); sigmoid_bias: divide by
  /// (sum + 1e-20). Ignored by topk_softmax (its weights sum to 1 already).
  bool renormalize = false;
  index_t n_group = 1;     ///< sigmoid_bias: expert groups (E % n_group == 0)
  index_t topk_group = 1;  ///< sigmoid_bias: groups kept (1 <= topk_group <= n_group)
  float routed_scaling_factor = 1.0f;
  /// sigmoid_bias: the choice score of experts outside the kept groups. transformers'
  /// DeepseekV3TopkRouter writes 0 (masked_fill(..., 0.0)); -inf never picks them.
  float masked_choice_score = 0.0f;
};

struct expert_options {
  expert_activation act = expert_activation::silu;
  bool gated = true;
};

struct capacity_options {
  float factor = 0.0f;  ///< 0: no capacity limit; else C = ceil(T·k/E · factor)
  drop_policy policy = drop_policy::by_score;
};

/// Per-expert weight matrices as stored in checkpoints (views; the memory is the caller's).
/// gate[e]: [I, D] (W1; empty when not gated), up[e]: [I, D] (W3), down[e]: [D, I] (W2).
template <class W>
struct expert_set {
  std::vector<tensor_view<const W, 2>> gate, up, down;

  index_t count() const { return static_cast<index_t>(up.size()); }
  /// transformers' fused layout: gate_up [E, 2I, D] (rows 0..I-1 gate, I..2I-1 up), down
  /// [E, D, I]. Not gated: gate_up is [E, I, D] and holds W3.
  static expert_set fused(tensor_view<const W, 3> gate_up, tensor_view<const W, 3> down,
                          bool gated = true) {
    const checker check{"moe::expert_set::fused"};
    check.extents("gate_up", gate_up);
    check.extents("down", down);
    const index_t E = gate_up.extent(0), rows = gate_up.extent(1), D = gate_up.extent(2);
    if (gated && rows % 2 != 0) {
      check.fail("gate_up", "expected [E, 2I, D] with an even middle extent, got shape " +
                                detail::format_shape({gate_up.shape().data(), 3}));
    }
    const index_t I = gated ? rows / 2 : rows;
    check.shape("down", down, {E, D, I});
    expert_set s;
    for (index_t e = 0; e < E; ++e) {
      const auto m = gate_up.template select<0>(e);
      if (gated) {
        s.gate.push_back(m.template slice<0>(0, I));
        s.up.push_back(m.template slice<0>(I, 2 * I));
      } else {
        s.up.push_back(m);
      }
      s.down.push_back(down.template select<0>(e));
    }
    return s;
  }
  /// Stacked separate matrices: gate, up [E, I, D], down [E, D, I] (gate empty: not gated).
  static expert_set stacked(tensor_view<const W, 3> gate, tensor_view<const W, 3> up,
                            tensor_view<const W, 3> down) {
    const checker check{"moe::expert_set::stacked"};
    check.extents("up", up);
    const index_t E = up.extent(0), I = up.extent(1), D = up.extent(2);
    if (gate.data() != nullptr || gate.size() != 0) check.shape("gate", gate, {E, I, D});
    check.shape("down", down, {E, D, I});
    expert_set s;
    for (index_t e = 0; e < E; ++e) {
      if (gate.data() != nullptr) s.gate.push_back(gate.template select<0>(e));
      s.up.push_back(up.template select<0>(e));
      s.down.push_back(down.template select<0>(e));
    }
    return s;
  }
  /// Appends one expert's matrices (checkpoints' experts.{e}.{gate,up,down}_proj.weight, or
  /// Mixtral's w1, w3, w2). gate may be empty (not gated).
  void add(tensor_view<const W, 2> gate_e, tensor_view<const W, 2> up_e,
           tensor_view<const W, 2> down_e) {
    if (gate_e.data() != nullptr) gate.push_back(gate_e);
    up.push_back(up_e);
    down.push_back(down_e);
  }

  /// Optional copies of the matrices packed for linalg::matmul (pack()): when present both
  /// forms run on them (the grouped form's expert GEMMs no longer pack 3 matrices per call and
  /// expert; the per-token form's GEMVs read the panels) and the views are not read. A copy of
  /// the weights (a checkpoint's mapped pages are read once, by pack()); pack() again after
  /// changing them.
  std::vector<linalg::packed_weights> packed_gate, packed_up, packed_down;
  void pack() {
    packed_gate.clear();
    packed_up.clear();
    packed_down.clear();
    for (const auto& m : gate) packed_gate.emplace_back(m);
    for (const auto& m : up) packed_up.emplace_back(m);
    for (const auto& m : down) packed_down.emplace_back(m);
  }
  bool is_packed() const noexcept { return !up.empty() && packed_up.size() == up.size(); }
};

/// A dense (shared) expert: gate, up [S, D] (gate empty: not gated), down [D, S].
template <class W>
struct mlp_weights {
  tensor_view<const W, 2> gate{}, up{}, down{};
  bool present() const { return up.data() != nullptr; }

  /// Optional packed copies for both forms, as expert_set::pack().
  linalg::packed_weights packed_gate, packed_up, packed_down;
  void pack() {
    packed_gate = gate.data() ? linalg::packed_weights(gate) : linalg::packed_weights();
    packed_up = linalg::packed_weights(up);
    packed_down = linalg::packed_weights(down);
  }
  bool is_packed() const noexcept { return present() && !packed_up.empty(); }
};

/// Optional router outputs the caller wants back (absent views are not written).
struct router_outputs {
  tensor_view<float, 2> logits{};   ///< [T, E]
  tensor_view<index_t, 2> ids{};    ///< [T, k], in the router's order (descending score)
  tensor_view<float, 2> weights{};  ///< [T, k], as routed (dropped assignments included)
};

/// Load balance of the grouped form's expert region (optional, for benchmarks).
struct balance_stats {
  std::vector<double> busy_seconds;      ///< per thread, wall time spent in work items
  std::vector<double> busy_cpu_seconds;  ///< per thread, its CPU time in work items (Linux;
                                         ///< else empty): what a shared machine does not blur
  index_t items = 0;                     ///< work items of the last call
  double max_over_mean() const {
    if (busy_seconds.empty()) return 0;
    double mx = 0, sum = 0;
    for (double b : busy_seconds) {
      mx = std::max(mx, b);
      sum += b;
    }
    return sum > 0 ? mx / (sum / double(busy_seconds.size())) : 0;
  }
};

/// What a forward returns besides y.
struct result {
  double aux_loss = 0;   ///< load-balancing loss of this call's tokens (0 when not computed)
  double z_loss = 0;     ///< router z-loss (0 when not computed)
  index_t dropped = 0;   ///< assignments dropped by the capacity limit
  index_t capacity = 0;  ///< C (0: unlimited)
};

/// Everything one call needs (built and validated by the front).
template <class W>
struct problem {
  tensor_view<const float, 2> x{};     ///< [T, D]
  tensor_view<float, 2> y{};           ///< [T, D]
  tensor_view<const W, 2> router{};    ///< [E, D]
  tensor_view<const float, 1> bias{};  ///< [E] or empty (sigmoid_bias only)
  const expert_set<W>* experts = nullptr;
  const mlp_weights<W>* shared = nullptr;  ///< nullptr or !present(): none
  tensor_view<const W, 2> shared_gate{};   ///< [1, D] or empty: ungated shared expert
  router_options route{};
  expert_options expert{};
  capacity_options capacity{};
  bool losses = true;
  router_outputs out{};
  balance_stats* stats = nullptr;
};

namespace detail {

/// A unit of the grouped form's expert region: rows [r0, r1) of `expert`'s group (expert == E:
/// tokens [r0, r1) of the shared expert).
struct work_item {
  index_t expert = 0, r0 = 0, r1 = 0;
};

inline std::size_t uz(index_t i) {
  return static_cast<std::size_t>(i);
}

/// Grow-only thread_local scratch, `which` selecting the buffer (steady state: no allocation).
template <class T>
T* scratch(int which, index_t n) {
  thread_local std::vector<T> buf[8];
  auto& v = buf[which];
  if (v.size() < uz(n)) v.resize(uz(n));
  return v.data();
}

/// idx[0..k) = the k largest s[0..n) in descending order, ties to the lower index (strict >
/// while scanning upwards). `taken`: n bytes of scratch. O(n·k).
inline void top_k(const float* s, index_t n, index_t k, index_t* idx, unsigned char* taken) {
  std::fill_n(taken, n, static_cast<unsigned char>(0));
  for (index_t j = 0; j < k; ++j) {
    index_t best = -1;
    for (index_t i = 0; i < n; ++i) {
      if (taken[i]) continue;
      if (best < 0 || s[i] > s[best]) best = i;
    }
    idx[j] = best;
    taken[best] = 1;
  }
}

/// Scratch floats route_token needs for E experts.
inline index_t route_scratch_floats(index_t E) {
  return 3 * E + (E + 3) / 4 + 1;  // p [E], c [E], group scores [E], `taken` bytes [E]
}

/// Routes one token: ids[0..k), w[0..k) from logits[0..E). `scr`: route_scratch_floats(E).
inline void route_token(const router_options& o, const float* logits, index_t E, const float* bias,
                        float* scr, index_t* ids, float* w) {
  const index_t k = o.top_k;
  float* p = scr;                                               // [E]
  float* c = scr + E;                                           // [E]
  auto* taken = reinterpret_cast<unsigned char*>(scr + 3 * E);  // [E] bytes
  switch (o.kind) {
    case router_kind::softmax_topk: {
      float m = logits[0];
      for (index_t e = 1; e < E; ++e) m = std::max(m, logits[e]);
      float s = 0;
      for (index_t e = 0; e < E; ++e) {
        p[e] = std::exp(logits[e] - m);
        s += p[e];
      }
      for (index_t e = 0; e < E; ++e) p[e] /= s;
      top_k(p, E, k, ids, taken);
      float sum = 0;
      for (index_t j = 0; j < k; ++j) {
        w[j] = p[ids[j]];
        sum += w[j];
      }
      if (o.renormalize) {
        for (index_t j = 0; j < k; ++j) w[j] /= sum;
      }
      break;
    }
    case router_kind::topk_softmax: {
      top_k(logits, E, k, ids, taken);
      const float m = logits[ids[0]];
      float s = 0;
      for (index_t j = 0; j < k; ++j) {
        w[j] = std::exp(logits[ids[j]] - m);
        s += w[j];
      }
      for (index_t j = 0; j < k; ++j) w[j] /= s;
      break;
    }
    case router_kind::sigmoid_bias: {
      for (index_t e = 0; e < E; ++e) {
        p[e] = math::sigmoid(logits[e]);
        c[e] = bias ? p[e] + bias[e] : p[e];
      }
      if (o.n_group > 1) {
        // group score: the sum of the two largest choice scores of the group; keep the best
        // topk_group groups (ties: lower group), mask the rest.
        const index_t G = o.n_group, per = E / G;
        float* g = scr + 2 * E;  // [G], G <= E / 2
        for (index_t gi = 0; gi < G; ++gi) {
          float a = -std::numeric_limits<float>::infinity(), b = a;
          for (index_t e = gi * per; e < (gi + 1) * per; ++e) {
            if (c[e] > a) {
              b = a;
              a = c[e];
            } else if (c[e] > b) {
              b = c[e];
            }
          }
          g[gi] = a + b;
        }
        // pick the best topk_group groups one by one (ties: lower group), marking each picked
        // group's score +inf (finite scores can never equal it: logits are checked finite)
        for (index_t r = 0; r < o.topk_group; ++r) {
          index_t best = -1;
          for (index_t gi = 0; gi < G; ++gi) {
            if (g[gi] == std::numeric_limits<float>::infinity()) continue;
            if (best < 0 || g[gi] > g[best]) best = gi;
          }
          g[best] = std::numeric_limits<float>::infinity();
        }
        for (index_t gi = 0; gi < G; ++gi) {
          if (g[gi] == std::numeric_limits<float>::infinity()) continue;
          for (index_t e = gi * per; e < (gi + 1) * per; ++e) c[e] = o.masked_choice_score;
        }
      }
      top_k(c, E, k, ids, taken);
      float sum = 0;
      for (index_t j = 0; j < k; ++j) {
        w[j] = p[ids[j]];
        sum += w[j];
      }
      if (o.renormalize) {
        const float den = sum + 1e-20f;
        for (index_t j = 0; j < k; ++j) w[j] /= den;
      }
      break;
    }
  }
  if (o.routed_scaling_factor != 1.0f) {
    for (index_t j = 0; j < k; ++j) w[j] *= o.routed_scaling_factor;
  }
}

/// Adds one token's share of the losses: counts[e] += [e in top-k(softmax)], psum[e] += p_e,
/// z += logsumexp². `p`: E floats, `idx`: k, `taken`: E bytes of scratch.
inline void loss_token(const float* logits, index_t E, index_t k, double* counts, double* psum,
                       double& z, double* p, index_t* idx, unsigned char* taken) {
  double m = logits[0];
  for (index_t e = 1; e < E; ++e) m = std::max(m, double(logits[e]));
  double s = 0;
  for (index_t e = 0; e < E; ++e) {
    p[e] = std::exp(double(logits[e]) - m);
    s += p[e];
  }
  const double lse = m + std::log(s);
  z += lse * lse;
  // top-k of the softmax in float (as torch computes it), ties to the lower index
  float* pf = reinterpret_cast<float*>(p + E);  // E more floats after the E doubles
  for (index_t e = 0; e < E; ++e) {
    p[e] /= s;
    psum[e] += p[e];
    pf[e] = static_cast<float>(p[e]);
  }
  top_k(pf, E, k, idx, taken);
  for (index_t j = 0; j < k; ++j) counts[idx[j]] += 1.0;
}

/// E · Σ_e (counts_e / T) · (psum_e / T).
inline double aux_from(const double* counts, const double* psum, index_t E, index_t T) {
  if (T == 0) return 0;
  double acc = 0;
  for (index_t e = 0; e < E; ++e) acc += (counts[e] / double(T)) * (psum[e] / double(T));
  return acc * double(E);
}

/// C = ceil(T·k/E · factor), 0 when unlimited.
inline index_t capacity_of(const capacity_options& c, index_t T, index_t k, index_t E) {
  if (c.factor <= 0) return 0;
  const double cap = std::ceil(double(T) * double(k) / double(E) * double(c.factor));
  return static_cast<index_t>(cap);
}

/// The grouping of the T·k assignments (run_grouped's steps 3-4, and the backward's): a
/// stable counting sort by expert (token order inside), then per expert over capacity C the C
/// kept ones first (by_score: largest weight, ties to the lower assignment, then back in token
/// order; by_position: the first C). off [E+1]: group starts; perm [T·k]: position ->
/// assignment; cnt [E]: kept per expert (positions off[e] .. off[e] + cnt[e]); pos_of [T·k]:
/// assignment -> position, -1 when dropped. Returns the dropped count.
inline index_t group_assignments(const index_t* ids, const float* wts, index_t T, index_t k,
                                 index_t E, index_t C, drop_policy policy, index_t* off,
                                 index_t* perm, index_t* cnt, index_t* pos_of, index_t* fill) {
  std::fill_n(off, E + 1, index_t(0));
  for (index_t a = 0; a < T * k; ++a) ++off[ids[a] + 1];
  for (index_t e = 0; e < E; ++e) off[e + 1] += off[e];
  std::copy_n(off, E, fill);
  for (index_t a = 0; a < T * k; ++a) perm[fill[ids[a]]++] = a;
  index_t dropped = 0;
  for (index_t e = 0; e < E; ++e) {
    index_t* g = perm + off[e];
    const index_t n = off[e + 1] - off[e];
    index_t keep = n;
    if (C > 0 && n > C) {
      if (policy == drop_policy::by_score) {
        std::sort(g, g + n, [&](index_t a, index_t b) {
          return wts[a] > wts[b] || (wts[a] == wts[b] && a < b);
        });
        std::sort(g, g + C);
      }
      keep = C;
      dropped += n - C;
    }
    cnt[e] = keep;
  }
  std::fill_n(pos_of, T * k, index_t(-1));
  for (index_t e = 0; e < E; ++e) {
    for (index_t r = 0; r < cnt[e]; ++r) pos_of[perm[off[e] + r]] = off[e] + r;
  }
  return dropped;
}

/// h[i] = act(h[i]) (gated: · u[i]) over n values. act applied here only for ReLU² (matmul's
/// epilogue does the others).
inline void finish_hidden(expert_activation act, bool gated, float* h, const float* u, index_t n) {
  if (act == expert_activation::relu2) {
    for (index_t i = 0; i < n; ++i) {
      const float r = std::max(h[i], 0.0f);
      h[i] = r * r;
    }
  }
  if (gated) {
    constexpr index_t L = simd::lanes<float>;
    index_t i = 0;
    for (; i + L <= n; i += L) simd::store(h + i, simd::load(h + i) * simd::load(u + i));
    for (; i < n; ++i) h[i] *= u[i];
  }
}

inline linalg::activation matmul_act(expert_activation a) {
  switch (a) {
    case expert_activation::silu:
      return linalg::activation::silu;
    case expert_activation::gelu:
      return linalg::activation::gelu;
    case expert_activation::gelu_tanh:
      return linalg::activation::gelu_tanh;
    case expert_activation::relu2:
      break;
  }
  return linalg::activation::none;
}

inline index_t mat_rows(const linalg::packed_weights& m) {
  return m.rows();
}
template <class W>
index_t mat_rows(const tensor_view<const W, 2>& m) {
  return m.extent(0);
}

/// One MLP over n rows: out[n, D] = row_scale ⊙ W2 (act(W1 x) ⊙ W3 x) (+ out if accumulate).
/// x: [n, D] rows; hbuf: n·I floats; ubuf: n·I floats (gated). Mat: a weight view, or
/// linalg::packed_weights. Runs matmul (threaded unless called inside a parallel region).
template <class Mat>
void mlp_rows(const expert_options& eo, tensor_view<const float, 2> x, const Mat& gate,
              const Mat& up, const Mat& down, float* hbuf, float* ubuf, tensor_view<float, 2> out,
              tensor_view<const float, 1> row_scale, bool accumulate) {
  const index_t n = x.extent(0), I = mat_rows(up);
  const bool gated = eo.gated;
  tensor_view<float, 2> h(hbuf, {n, I});
  linalg::matmul_options first{};
  first.act = matmul_act(eo.act);
  if (gated) {
    tensor_view<float, 2> u(ubuf, {n, I});
    linalg::matmul(x, gate, h, first);
    linalg::matmul(x, up, u, {});
  } else {
    linalg::matmul(x, up, h, first);
  }
  for (index_t r = 0; r < n; ++r) finish_hidden(eo.act, gated, hbuf + r * I, ubuf + r * I, I);
  linalg::matmul_options last{};
  last.row_scale = row_scale;
  last.accumulate = accumulate;
  linalg::matmul(tensor_view<const float, 2>(h), down, out, last);
}

/// NaN / inf in the router logits: a clear error naming the entry and x.
inline void check_logits(const checker& check, const float* logits, index_t T, index_t E) {
  for (index_t t = 0; t < T; ++t) {
    for (index_t e = 0; e < E; ++e) {
      const float v = logits[t * E + e];
      if (!std::isfinite(v)) {
        check.fail("x", "router logits (x · router weightᵀ) must be finite, got " +
                            seqmix::detail::format_value(v) + " at [" + std::to_string(t) + ", " +
                            std::to_string(e) + "] (token " + std::to_string(t) + ", expert " +
                            std::to_string(e) + ")");
      }
    }
  }
}

/// Shared-expert gate per token: g[t] = sigmoid(x_t · w_g) (1 when ungated).
template <class W>
void shared_gates(const problem<W>& p, float* g, index_t T) {
  if (p.shared_gate.data() == nullptr) {
    std::fill_n(g, T, 1.0f);
    return;
  }
  tensor_view<float, 2> gv(g, {T, 1});
  linalg::matmul(p.x, p.shared_gate, gv, {});
  for (index_t t = 0; t < T; ++t) g[t] = math::sigmoid(g[t]);
}

}  // namespace detail

/// transformers' load_balancing_loss_func over the router logits of one or several layers
/// (concatenated along tokens: pass every layer's [T_l, E] logits): E · Σ_e f_e · P_e, with the
/// top-k taken of the softmax for every router kind. Minimum k (uniform routing). Logits must
/// be finite. `where` names the calling function in errors.
inline double load_balancing_loss(std::span<const tensor_view<const float, 2>> layers,
                                  index_t top_k, const char* where = "moe::load_balancing_loss") {
  const checker check{where};
  check.require(!layers.empty(), "logits", "needs at least one layer's logits");
  const index_t E = layers[0].extent(1);
  check.require(top_k >= 1 && top_k <= E, "top_k",
                "must be in [1, E = " + std::to_string(E) + "], got " + std::to_string(top_k));
  index_t T = 0;
  for (const auto& l : layers) {
    check.shape("logits", l, {any_extent, E});
    check.finite("logits", l);
    T += l.extent(0);
  }
  std::vector<double> counts(detail::uz(E), 0.0), psum(detail::uz(E), 0.0), pd(detail::uz(2 * E));
  std::vector<index_t> idx(detail::uz(top_k));
  std::vector<unsigned char> taken(detail::uz(E));
  std::vector<float> row(detail::uz(E));
  double z = 0;
  for (const auto& l : layers) {
    for (index_t t = 0; t < l.extent(0); ++t) {
      for (index_t e = 0; e < E; ++e) row[detail::uz(e)] = l(t, e);
      detail::loss_token(row.data(), E, top_k, counts.data(), psum.data(), z, pd.data(), idx.data(),
                         taken.data());
    }
  }
  return detail::aux_from(counts.data(), psum.data(), E, T);
}

/// Router z-loss mean_t (logsumexp_e logits[t, e])² of [T, E] logits (finite), in double.
inline double router_z_loss(tensor_view<const float, 2> logits,
                            const char* where = "moe::router_z_loss") {
  const checker check{where};
  check.finite("logits", logits);
  const index_t T = logits.extent(0), E = logits.extent(1);
  if (T == 0 || E == 0) return 0;
  double z = 0;
  for (index_t t = 0; t < T; ++t) {
    double m = logits(t, 0);
    for (index_t e = 1; e < E; ++e) m = std::max(m, double(logits(t, e)));
    double s = 0;
    for (index_t e = 0; e < E; ++e) s += std::exp(double(logits(t, e)) - m);
    const double lse = m + std::log(s);
    z += lse * lse;
  }
  return z / double(T);
}

/// CPU time of the calling thread (0 where the platform has no per-thread clock).
inline double thread_cpu_seconds() {
#if defined(__linux__)
  timespec t{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return double(t.tv_sec) + 1e-9 * double(t.tv_nsec);
#else
  return 0.0;
#endif
}

/// Grouped (training / prefill) form. p validated by the front.
template <class W>
result run_grouped(const checker& check, const problem<W>& p) {
  using namespace detail;
  const index_t T = p.x.extent(0), D = p.x.extent(1), E = p.router.extent(0);
  const index_t k = p.route.top_k;
  const expert_set<W>& ex = *p.experts;
  const index_t I = ex.up.empty() ? 0 : ex.up[0].extent(0);
  const bool has_shared = p.shared && p.shared->present();
  const index_t S = has_shared ? p.shared->up.extent(0) : 0;
  result res;
  if (T == 0) return res;

  // 1. router logits [T, E] (threaded matmul)
  float* logits = p.out.logits.data() && p.out.logits.is_contiguous() ? p.out.logits.data()
                                                                      : scratch<float>(0, T * E);
  linalg::matmul(p.x, p.router, tensor_view<float, 2>(logits, {T, E}), {});
  check_logits(check, logits, T, E);
  if (p.out.logits.data() && logits != p.out.logits.data()) {
    for (index_t t = 0; t < T; ++t)
      for (index_t e = 0; e < E; ++e) p.out.logits(t, e) = logits[t * E + e];
  }

  // 2. route every token, and the loss partials per 64-token block
  index_t* ids = scratch<index_t>(0, T * k);
  float* wts = scratch<float>(1, T * k);
  constexpr index_t TB = 64;
  const index_t nblk = (T + TB - 1) / TB;
  double* part = scratch<double>(0, nblk * (2 * E + 1));  // per block: counts[E], psum[E], z
  parallel_for(nblk, [&](index_t b) {
    float* scr = scratch<float>(7, route_scratch_floats(E));
    double* pd = scratch<double>(7, 2 * E);
    index_t* idx = scratch<index_t>(7, k);
    auto* taken = reinterpret_cast<unsigned char*>(scratch<float>(6, E / 4 + 1));
    double* counts = part + b * (2 * E + 1);
    double* psum = counts + E;
    double z = 0;
    std::fill_n(counts, 2 * E, 0.0);
    const index_t t1 = std::min(T, (b + 1) * TB);
    for (index_t t = b * TB; t < t1; ++t) {
      route_token(p.route, logits + t * E, E, p.bias.data(), scr, ids + t * k, wts + t * k);
      if (p.losses) loss_token(logits + t * E, E, k, counts, psum, z, pd, idx, taken);
    }
    counts[2 * E] = z;
  });
  if (p.losses) {
    double* counts = scratch<double>(1, 2 * E);  // [E] counts, [E] probability sums
    double* psum = counts + E;
    std::fill_n(counts, 2 * E, 0.0);
    double z = 0;
    for (index_t b = 0; b < nblk; ++b) {  // block order: independent of the thread count
      const double* c = part + b * (2 * E + 1);
      for (index_t e = 0; e < E; ++e) {
        counts[e] += c[e];
        psum[e] += c[E + e];
      }
      z += c[2 * E];
    }
    res.aux_loss = aux_from(counts, psum, E, T);
    res.z_loss = z / double(T);
  }
  if (p.out.ids.data()) {
    for (index_t t = 0; t < T; ++t)
      for (index_t j = 0; j < k; ++j) p.out.ids(t, j) = ids[t * k + j];
  }
  if (p.out.weights.data()) {
    for (index_t t = 0; t < T; ++t)
      for (index_t j = 0; j < k; ++j) p.out.weights(t, j) = wts[t * k + j];
  }

  // 3-4. stable counting sort of the assignments a = t·k + j by expert (token order inside),
  // then capacity: each expert's group compacted to its kept assignments
  index_t* off = scratch<index_t>(1, E + 1);
  index_t* perm = scratch<index_t>(2, T * k);    // position -> assignment
  index_t* pos_of = scratch<index_t>(3, T * k);  // assignment -> position, -1: dropped
  index_t* cnt = scratch<index_t>(5, E);         // kept per expert
  const index_t C = capacity_of(p.capacity, T, k, E);
  res.capacity = C;
  res.dropped += detail::group_assignments(ids, wts, T, k, E, C, p.capacity.policy, off, perm, cnt,
                                           pos_of, scratch<index_t>(4, E));
  float* pw = scratch<float>(2, T * k);  // weight per position
  for (index_t e = 0; e < E; ++e) {
    for (index_t r = 0; r < cnt[e]; ++r) pw[off[e] + r] = wts[perm[off[e] + r]];
  }

  // 5. work items: (expert, rows [r0, r1)) and (shared, tokens [r0, r1)); largest first
  const int threads = std::max(1, num_threads());
  index_t total_rows = 0;
  for (index_t e = 0; e < E; ++e) total_rows += cnt[e];
  const index_t target = std::clamp<index_t>(
      (total_rows + (has_shared ? T : 0) + 4 * threads - 1) / (4 * threads), 32, 256);
  index_t n_items = 0;
  auto blocks_of = [&](index_t n) -> index_t {
    if (n == 0) return 0;
    if (n < 64) return 1;  // never split below 32 rows: every block keeps M > 8
    return std::min((n + target - 1) / target, n / 32);
  };
  for (index_t e = 0; e < E; ++e) n_items += blocks_of(cnt[e]);
  if (has_shared) n_items += blocks_of(T);
  work_item* items = scratch<work_item>(0, n_items);
  {
    index_t q = 0;
    auto push = [&](index_t e, index_t n) {
      const index_t nb = blocks_of(n);
      for (index_t b = 0; b < nb; ++b) items[q++] = {e, n * b / nb, n * (b + 1) / nb};
    };
    for (index_t e = 0; e < E; ++e) push(e, cnt[e]);
    if (has_shared) push(E, T);
    // largest cost first, ties by (expert, first row): a total order (std::sort, which
    // unlike stable_sort allocates nothing)
    std::sort(items, items + n_items, [&](const work_item& a, const work_item& b) {
      const double ca = double(a.r1 - a.r0) * double(a.expert == E ? S : I);
      const double cb = double(b.r1 - b.r0) * double(b.expert == E ? S : I);
      if (ca != cb) return ca > cb;
      return a.expert < b.expert || (a.expert == b.expert && a.r0 < b.r0);
    });
  }

  float* outp = scratch<float>(3, T * k * D);  // permuted expert outputs (weighted)
  float* sg = scratch<float>(4, T);            // shared gates
  if (has_shared) shared_gates(p, sg, T);
  if (p.stats) {
    p.stats->busy_seconds.assign(uz(threads), 0.0);
#if defined(__linux__)
    p.stats->busy_cpu_seconds.assign(uz(threads), 0.0);
#endif
    p.stats->items = n_items;
  }
  // Items go to workers by a fixed rule (longest processing time first: each item, largest
  // first, to the worker with the least work so far, ties to the lower worker), not by a shared
  // counter: the same routing then gives every thread the same items on every call, so its
  // grow-only scratch (and matmul's) never grows in steady state, whatever the timing.
  index_t* owner = scratch<index_t>(6, n_items);
  {
    double* load = scratch<double>(2, threads);
    std::fill_n(load, threads, 0.0);
    for (index_t q = 0; q < n_items; ++q) {
      const work_item& it = items[q];
      const index_t w = std::min_element(load, load + threads) - load;
      owner[q] = w;
      load[w] += double(it.r1 - it.r0) * double(it.expert == E ? S : I);
    }
  }
  const index_t width = std::max(I, S);
  const bool x_rows = p.x.stride(1) == 1 || D == 1;
  const bool packed = ex.is_packed();
  parallel_for_with_slot(threads, [&](index_t worker, int tid) {
    const auto t0 = std::chrono::steady_clock::now();
    const double c0 = p.stats ? thread_cpu_seconds() : 0.0;
    (void)c0;
    for (index_t q = 0; q < n_items; ++q) {
      if (owner[q] != worker) continue;
      const work_item it = items[q];
      const index_t n = it.r1 - it.r0;
      float* hb = scratch<float>(5, n * width);
      float* ub = scratch<float>(6, n * width);
      if (it.expert == E) {
        // shared expert over tokens [r0, r1): straight into y, scaled by its gate
        const auto xs = p.x.template slice<0>(it.r0, it.r1);
        const auto ys = p.y.template slice<0>(it.r0, it.r1);
        const tensor_view<const float, 1> gs(sg + it.r0, {n});
        const auto& sh = *p.shared;
        if (sh.is_packed()) {
          mlp_rows(p.expert, xs, sh.packed_gate, sh.packed_up, sh.packed_down, hb, ub, ys, gs,
                   false);
        } else {
          mlp_rows(p.expert, xs, sh.gate, sh.up, sh.down, hb, ub, ys, gs, false);
        }
        continue;
      }
      const index_t e = it.expert, pos0 = off[e] + it.r0;
      float* xg = scratch<float>(7, n * D);  // gathered rows [n, D]
      for (index_t r = 0; r < n; ++r) {
        const index_t t = perm[pos0 + r] / k;
        const float* src = p.x.data() + t * p.x.stride(0);
        if (x_rows) {
          std::copy_n(src, D, xg + r * D);
        } else {
          for (index_t d = 0; d < D; ++d) xg[r * D + d] = src[d * p.x.stride(1)];
        }
      }
      const tensor_view<const float, 2> xe(xg, {n, D});
      const tensor_view<float, 2> oe(outp + pos0 * D, {n, D});
      const tensor_view<const float, 1> we(pw + pos0, {n});
      if (packed) {
        static const linalg::packed_weights none;
        mlp_rows(p.expert, xe, p.expert.gated ? ex.packed_gate[uz(e)] : none, ex.packed_up[uz(e)],
                 ex.packed_down[uz(e)], hb, ub, oe, we, false);
      } else {
        const tensor_view<const W, 2> gate_e =
            p.expert.gated ? ex.gate[uz(e)] : tensor_view<const W, 2>{};
        mlp_rows(p.expert, xe, gate_e, ex.up[uz(e)], ex.down[uz(e)], hb, ub, oe, we, false);
      }
    }
    if (p.stats) {
      p.stats->busy_seconds[uz(tid)] +=
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
#if defined(__linux__)
      p.stats->busy_cpu_seconds[uz(tid)] += thread_cpu_seconds() - c0;
#endif
    }
  });

  // 6. combine in slot order: y_t = Σ_j out[pos(t, j)] (+ shared already in y_t)
  parallel_for((T + 15) / 16, [&](index_t b) {
    const index_t t1 = std::min(T, (b + 1) * 16);
    float* acc = scratch<float>(5, D);
    for (index_t t = b * 16; t < t1; ++t) {
      bool any = false;
      for (index_t j = 0; j < k; ++j) {
        const index_t ps = pos_of[t * k + j];
        if (ps < 0) continue;
        const float* o = outp + ps * D;
        if (!any) {
          std::copy_n(o, D, acc);
          any = true;
        } else {
          for (index_t d = 0; d < D; ++d) acc[d] = o[d] + acc[d];
        }
      }
      if (!any) std::fill_n(acc, D, 0.0f);
      float* yt = p.y.data() + t * p.y.stride(0);
      const index_t ys = p.y.stride(1);
      if (has_shared) {
        for (index_t d = 0; d < D; ++d) yt[d * ys] = acc[d] + yt[d * ys];
      } else {
        for (index_t d = 0; d < D; ++d) yt[d * ys] = acc[d];
      }
    }
  });
  return res;
}

namespace detail {

/// Output rows [r0, r1) of one GEMV (a thread's slice in the per-token form).
struct row_range {
  index_t r0 = 0, r1 = 0;
};
/// N, the output rows of a [N, K] matrix in either layout.
template <class W>
index_t out_rows(const tensor_view<const W, 2>& m) {
  return m.extent(0);
}
inline index_t out_rows(const linalg::packed_weights& m) {
  return m.rows();
}
/// Thread tid's slice of the N output rows of m among nt: an even split on the checkpoint
/// layout, whole panels on packed weights.
template <class W>
row_range thread_rows(const tensor_view<const W, 2>& m, index_t tid, index_t nt) {
  const index_t N = m.extent(0);
  return {N * tid / nt, N * (tid + 1) / nt};
}
inline row_range thread_rows(const linalg::packed_weights& m, index_t tid, index_t nt) {
  const index_t P = m.panels(), NR = linalg::packed_weights::panel_width(), N = m.rows();
  return {std::min(N, P * tid / nt * NR), std::min(N, P * (tid + 1) / nt * NR)};
}
/// out[:, r0:r1) = x · m[r0:r1)ᵀ with options o, on this thread (out: the whole [1, N] row).
template <class W>
void gemv_rows(const tensor_view<const float, 2>& x, const tensor_view<const W, 2>& m,
               const row_range& r, tensor_view<float, 2> out, const linalg::matmul_options& o) {
  linalg::matmul(x, m.template slice<0>(r.r0, r.r1), out.template slice<1>(r.r0, r.r1), o);
}
inline void gemv_rows(const tensor_view<const float, 2>& x, const linalg::packed_weights& m,
                      const row_range& r, tensor_view<float, 2> out,
                      const linalg::matmul_options& o) {
  const index_t NR = linalg::packed_weights::panel_width();
  linalg::matmul_panels(x, m, r.r0 / NR, (r.r1 + NR - 1) / NR, out, o);
}

}  // namespace detail

/// Per-token (inference / decode) form. p validated by the front. Allocates nothing once its
/// thread_local scratch (and matmul's) has grown to the shapes used.
template <class W>
result run_per_token(const checker& check, const problem<W>& p) {
  using namespace detail;
  const index_t T = p.x.extent(0), D = p.x.extent(1), E = p.router.extent(0);
  const index_t k = p.route.top_k;
  const expert_set<W>& ex = *p.experts;
  const index_t I = ex.up.empty() ? 0 : ex.up[0].extent(0);
  const bool has_shared = p.shared && p.shared->present();
  const index_t S = has_shared ? p.shared->up.extent(0) : 0;
  result res;
  if (T == 0) return res;
  const index_t width = std::max(I, S);

  // 1. logits and routes of the T tokens (few: decode), checked before any expert runs
  float* logits = scratch<float>(0, T * E);
  linalg::matmul(p.x, p.router, tensor_view<float, 2>(logits, {T, E}), {});
  check_logits(check, logits, T, E);
  index_t* ids = scratch<index_t>(0, T * k);
  float* wts = scratch<float>(1, T * k);
  float* scr = scratch<float>(2, route_scratch_floats(E));
  for (index_t t = 0; t < T; ++t) {
    route_token(p.route, logits + t * E, E, p.bias.data(), scr, ids + t * k, wts + t * k);
  }
  if (p.losses) {
    double* cp = scratch<double>(0, 2 * E);
    double* pd = scratch<double>(1, 2 * E);
    index_t* idx = scratch<index_t>(1, k);
    auto* taken = reinterpret_cast<unsigned char*>(scratch<float>(3, E / 4 + 1));
    std::fill_n(cp, 2 * E, 0.0);
    double z = 0;
    for (index_t t = 0; t < T; ++t) loss_token(logits + t * E, E, k, cp, cp + E, z, pd, idx, taken);
    res.aux_loss = aux_from(cp, cp + E, E, T);
    res.z_loss = z / double(T);
  }
  for (index_t t = 0; t < T; ++t) {
    for (index_t j = 0; j < k; ++j) {
      if (p.out.logits.data() && j == 0) {
        for (index_t e = 0; e < E; ++e) p.out.logits(t, e) = logits[t * E + e];
      }
      if (p.out.ids.data()) p.out.ids(t, j) = ids[t * k + j];
      if (p.out.weights.data()) p.out.weights(t, j) = wts[t * k + j];
    }
  }

  // 2. capacity (the same rule as the grouped form): assignment a is kept iff fewer than C
  //    assignments to its expert have priority over it. O((T·k)²), T is small here.
  const index_t C = capacity_of(p.capacity, T, k, E);
  res.capacity = C;
  unsigned char* kept = reinterpret_cast<unsigned char*>(scratch<float>(4, (T * k + 3) / 4 + 1));
  for (index_t a = 0; a < T * k; ++a) {
    kept[a] = 1;
    if (C == 0) continue;
    index_t ahead = 0;
    for (index_t b = 0; b < T * k; ++b) {
      if (b == a || ids[b] != ids[a]) continue;
      const bool before = p.capacity.policy == drop_policy::by_position
                              ? b < a
                              : (wts[b] > wts[a] || (wts[b] == wts[a] && b < a));
      if (before) ++ahead;
    }
    if (ahead >= C) {
      kept[a] = 0;
      ++res.dropped;
    }
  }

  // 3. ONE parallel region for the T tokens (a region per GEMV would cost a thread wake-up
  //    each: on a loaded machine that is a scheduler quantum, not microseconds). Per token:
  //    phase A, each thread computes its slice of the rows of every hidden vector (the shared
  //    expert's and each kept expert's act(W1 x) ⊙ W3 x); barrier; phase B, its slice of the
  //    output columns: sh = g·W2_s h_s, y_t = Σ_j (slot order) w_j·W2_e h_j, then + sh; barrier.
  //    matmul runs serially inside the region; a GEMV row's value does not depend on the slice
  //    it is computed in, so the result is the same for any thread count.
  const index_t nh = k + 1;  // hidden vectors per token: k experts, then the shared expert
  float* hb = scratch<float>(5, nh * width);
  float* ub = scratch<float>(6, nh * width);
  float* sh = scratch<float>(7, D);
  float* sg = scratch<float>(3, T);  // shared gates (the losses' scratch 3 is free again)
  if (has_shared) shared_gates(p, sg, T);
  const expert_options eo = p.expert;
  // On packed experts (expert_set::pack) every GEMV runs on the panels, a thread's slice in
  // whole panels; the shared expert and the routed ones take the same layout, so phase B's
  // slice of y is one range for both.
  const bool packed = ex.is_packed() && (!has_shared || p.shared->is_packed());
  const linalg::packed_weights no_gate;  // stands for an absent gate matrix (never read)
  // hidden vector(s) of one matrix pair into h (and u), the thread's slice of its rows
  auto hidden = [&](const tensor_view<const float, 2>& xt, const auto& gate, const auto& up,
                    float* h, float* u, index_t tid, index_t nt) {
    const index_t rows = out_rows(up);
    const row_range r = thread_rows(up, tid, nt);
    if (r.r1 <= r.r0) return;
    linalg::matmul_options first{};
    first.act = matmul_act(eo.act);
    const tensor_view<float, 2> hv(h, {1, rows}), uv(u, {1, rows});
    if (eo.gated) {
      gemv_rows(xt, gate, r, hv, first);
      gemv_rows(xt, up, r, uv, {});
    } else {
      gemv_rows(xt, up, r, hv, first);
    }
    finish_hidden(eo.act, eo.gated, h + r.r0, u + r.r0, r.r1 - r.r0);
  };
  auto phase_a = [&](index_t t, index_t tid, index_t nt) {
    const auto xt = p.x.template slice<0>(t, t + 1);  // [1, D]
    if (has_shared) {
      const auto& s = *p.shared;
      if (packed) {
        hidden(xt, s.packed_gate, s.packed_up, hb + k * width, ub + k * width, tid, nt);
      } else {
        hidden(xt, s.gate, s.up, hb + k * width, ub + k * width, tid, nt);
      }
    }
    for (index_t j = 0; j < k; ++j) {
      const index_t a = t * k + j;
      if (!kept[a]) continue;
      const auto e = uz(ids[a]);
      if (packed) {
        hidden(xt, eo.gated ? ex.packed_gate[e] : no_gate, ex.packed_up[e], hb + j * width,
               ub + j * width, tid, nt);
      } else {
        hidden(xt, eo.gated ? ex.gate[e] : tensor_view<const W, 2>{}, ex.up[e], hb + j * width,
               ub + j * width, tid, nt);
      }
    }
  };
  // y_t's slice [d0, d1): the shared expert into sh, the kept experts accumulated into y_t
  auto down_pass = [&](index_t t, const row_range& r, const auto& shared_down,
                       const auto& expert_down) {
    const auto yt = p.y.template slice<0>(t, t + 1);  // [1, D]
    if (has_shared) {
      linalg::matmul_options o{};
      o.row_scale = tensor_view<const float, 1>(sg + t, {1});
      gemv_rows(tensor_view<const float, 2>(hb + k * width, {1, S}), shared_down, r,
                tensor_view<float, 2>(sh, {1, D}), o);
    }
    bool any = false;
    for (index_t j = 0; j < k; ++j) {
      const index_t a = t * k + j;
      if (!kept[a]) continue;
      linalg::matmul_options o{};
      o.row_scale = tensor_view<const float, 1>(wts + a, {1});
      o.accumulate = any;
      gemv_rows(tensor_view<const float, 2>(hb + j * width, {1, I}), expert_down(ids[a]), r, yt, o);
      any = true;
    }
    float* yr = yt.data() + r.r0 * p.y.stride(1);
    const index_t ys = p.y.stride(1), n = r.r1 - r.r0;
    if (!any) {
      for (index_t d = 0; d < n; ++d) yr[d * ys] = has_shared ? sh[r.r0 + d] : 0.0f;
    } else if (has_shared) {
      for (index_t d = 0; d < n; ++d) yr[d * ys] = yr[d * ys] + sh[r.r0 + d];
    }
  };
  auto phase_b = [&](index_t t, index_t tid, index_t nt) {
    if (packed) {
      const auto& d0 = ex.packed_down[0];
      const row_range r = thread_rows(d0, tid, nt);
      if (r.r1 <= r.r0) return;
      down_pass(t, r, has_shared ? p.shared->packed_down : d0,
                [&](index_t e) -> const linalg::packed_weights& { return ex.packed_down[uz(e)]; });
    } else {
      const row_range r = thread_rows(ex.down[0], tid, nt);
      if (r.r1 <= r.r0) return;
      down_pass(t, r, has_shared ? p.shared->down : ex.down[0],
                [&](index_t e) { return ex.down[uz(e)]; });
    }
  };
#if SEQMIX_HAS_OPENMP
  const int threads = num_threads();
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    {
      const index_t tid = omp_get_thread_num(), nt = omp_get_num_threads();
      for (index_t t = 0; t < T; ++t) {
        phase_a(t, tid, nt);
#pragma omp barrier
        phase_b(t, tid, nt);
#pragma omp barrier
      }
    }
    return res;
  }
#endif
  for (index_t t = 0; t < T; ++t) {
    phase_a(t, 0, 1);
    phase_b(t, 0, 1);
  }
  return res;
}

}  // namespace seqmix::kernels::moe
