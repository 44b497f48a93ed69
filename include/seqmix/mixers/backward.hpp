// SPDX-License-Identifier: MIT
// Backward passes of the chunked ("training") forms (docs/math.md §8): free functions, one per
// mixer, taking the forward's inputs, the cotangents `do_` (of o) and `dht` (of the final state)
// and writing the gradient of every input and of the initial state h0.
//
//   linear_attention_backward(q, k, v, h0, do_, dht, dq, dk, dv, dh0, opt, cu_seqlens)
//   simple_gla_backward      (q, k, v, g,  h0, do_, dht, dq, dk, dv, dg,  dh0, opt, cu_seqlens)
//   simple_gla_constant_backward(q, k, v, g_gamma, h0, do_, dht, dq, dk, dv, dg_gamma, dh0, ...)
//   gla_backward             (q, k, v, gk, h0, do_, dht, dq, dk, dv, dgk, dh0, opt, cu_seqlens)
//   mamba2_ssd_backward      (x, dt, A, Bm, Cm, D, h0, dy, dht, grads, opt, cu_seqlens)
//   softmax_attention_backward(q, k, v, do_, dq, dk, dv, opt)            (causal; opt.window)
//   delta_rule_backward      (q, k, v, beta, h0, do_, dht, dq, dk, dv, dbeta, dh0, opt, cu_seqlens)
//   gated_delta_rule_backward(q, k, v, g, beta, h0, do_, dht, dq, dk, dv, dg, dbeta, dh0, ...)
//   kda_backward             (q, k, v, g, beta, h0, do_, dht, dq, dk, dv, dg, dbeta, dh0, ...)
//   rwkv7_backward           (r, k, v, w, a, b, h0, do_, dht, dr, dk, dv, dw, da, db, dh0, ...)
//   rwkv6_backward           (r, k, v, w, u, h0, do_, dht, dr, dk, dv, dw, du, dh0, ...)
//
// Shapes as in the forward fronts: q, k: [B,T,Hk,K]; v, do_: [B,T,H,V]; g: [B,T,H]; gk:
// [B,T,H,K]; h0, dht, dh0: [N,H,K,V] (N = B, or the number of packed sequences with cu_seqlens
// [N+1] and B == 1). h0 and dht may be empty views (zero); dh0 may be empty (not computed).
// Each gradient has its input's shape. Mamba2: x, dy: [B,T,H,P]; dt: [B,T,H] (the step after
// softplus/clamp: chain dt_raw, dt_bias, A_log through it, ddt·sigmoid and dA·A); A, D: [H];
// Bm, Cm: [B,T,G,N]; states [N,H,N,P] (seqmix's layout). Softmax: k, v: [B,T,Hkv,·].
// Delta family (the forward's conventions, mixers/delta_net.hpp, gated_delta_net.hpp, kda.hpp):
// q, k: [B,T,Hk,K] (used as given: l2-normalise before, as the golden file's k_l2); v: [B,T,H,V]
// (GVA: H % Hk == 0); beta: [B,T,H]; g: [B,T,H] (GDN) or [B,T,H,K] (KDA) log gates; scale
// default K^-1/2. RWKV-7: r, k, w, a, b: [B,T,H,K] (a, b independent inputs), scale default 1.
// RWKV-6: r, k, w: [B,T,H,K], u: [H,K] (du sums over every sequence and token), scale default 1.
// These five run kernels/backward/dplr.hpp, opt.chunk_size being its checkpoint interval.
//
// What is saved: nothing. The forward runs in inference mode and the backward recomputes what it
// needs per (sequence, head): the chunk-boundary states (gated family and the DPLR engine,
// (T/C + 1)·K·V values per thread) or the row statistics and output (softmax, O(T) per thread).
// docs/math.md §8 gives the measurement behind the choice. Cost: kernels/backward/gated.hpp and
// attention.hpp.
//
// Checks: every shape, the chunk size (> 0), scale (finite), window (>= 0), cu_seqlens; shape
// errors name this function and the argument. Gates are not re-checked (the forward did).
#pragma once

#include <algorithm>
#include <cmath>
#include <optional>
#include <span>
#include <string>
#include <utility>

#include <seqmix/core/error.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/core/workspace.hpp>
#include <seqmix/kernels/backward/attention.hpp>
#include <seqmix/kernels/backward/dplr.hpp>
#include <seqmix/kernels/backward/gated.hpp>
#include <seqmix/kernels/common/scratch.hpp>

namespace seqmix {

/// Options of the backward fronts.
template <class T>
struct backward_options {
  std::optional<T> scale{};  ///< multiplies q; default K^-1/2 (Mamba2: always 1)
  index_t chunk_size = 64;   ///< chunk length C (gated family) / tile rows (softmax)
  index_t window = 0;        ///< softmax only: sliding window W (0 = causal, unbounded)
};

/// Gradients of Mamba2 SSD; every view but dD and dh0 is required.
template <class T>
struct mamba2_ssd_grads {
  tensor_view<T, 4> dx;   ///< [B,T,H,P]
  tensor_view<T, 3> ddt;  ///< [B,T,H]
  tensor_view<T, 1> dA;   ///< [H]
  tensor_view<T, 4> dB;   ///< [B,T,G,N]
  tensor_view<T, 4> dC;   ///< [B,T,G,N]
  tensor_view<T, 1> dD;   ///< [H] (empty: not computed)
  tensor_view<T, 4> dh0;  ///< [N_seq,H,N,P] (empty: not computed)
};

namespace detail {

template <class T>
void check_gated_backward(const checker& check, const kernels::backward::gated_problem<T>& p,
                          const backward_options<T>& opt) {
  check.nonempty("q", p.q);
  const index_t B = p.q.extent(0), TT = p.q.extent(1), Hk = p.q.extent(2), K = p.q.extent(3);
  check.shape("k", p.k, {B, TT, Hk, K});
  check.nonempty("v", p.v);
  check.shape("v", p.v, {B, TT, any_extent, any_extent});
  const index_t H = p.v.extent(2), V = p.v.extent(3);
  if (H % Hk != 0) {
    check.fail("v", "heads of v (" + std::to_string(H) +
                        ") must be a multiple of the heads of q/k (" + std::to_string(Hk) + ")");
  }
  if (opt.chunk_size <= 0)
    check.fail("opt.chunk_size", "must be > 0, got " + std::to_string(opt.chunk_size));
  if (opt.scale && !std::isfinite(static_cast<double>(*opt.scale)))
    check.fail("opt.scale", "must be finite");
  const index_t N = p.cu_seqlens.empty() ? B : check.cu_seqlens(p.cu_seqlens, B, TT);
  check.shape("do_", p.do_, {B, TT, H, V});
  if (p.h0.data()) check.shape("h0", p.h0, {N, H, K, V});
  if (p.dht.data()) check.shape("dht", p.dht, {N, H, K, V});
  if (p.g.data()) check.shape("g", p.g, {B, TT, H});
  if (p.gk.data()) check.shape("gk", p.gk, {B, TT, H, K});
  if (p.k_scale.data()) check.shape("dt", p.k_scale, {B, TT, H});
  check.shape("dq", p.dq, {B, TT, Hk, K});
  check.shape("dk", p.dk, {B, TT, Hk, K});
  check.shape("dv", p.dv, {B, TT, H, V});
  if (p.dg.data()) check.shape("dg", p.dg, {B, TT, H});
  if (p.dgk.data()) check.shape("dgk", p.dgk, {B, TT, H, K});
  if (p.dh0.data()) check.shape("dh0", p.dh0, {N, H, K, V});
  if (p.ht.data()) check.shape("ht", p.ht, {N, H, K, V});
  check.inner_contiguous("q", p.q);
  check.inner_contiguous("k", p.k);
  check.inner_contiguous("v", p.v);
  check.inner_contiguous("do_", p.do_);
  check.inner_contiguous("dq", p.dq);
  check.inner_contiguous("dk", p.dk);
  check.inner_contiguous("dv", p.dv);
  if (p.gk.data()) check.inner_contiguous("gk", p.gk);
  if (p.dgk.data()) check.inner_contiguous("dgk", p.dgk);
}

template <class T>
void run_gated_backward(const char* where, kernels::backward::gated_problem<T> p,
                        const backward_options<T>& opt, bool default_scale = true) {
  const checker check{where};
  check_gated_backward(check, p, opt);
  p.scale = opt.scale ? *opt.scale
                      : (default_scale ? T(1) / std::sqrt(static_cast<T>(p.q.extent(3))) : T(1));
  kernels::backward::gated_backward(p, opt.chunk_size);
}

}  // namespace detail

/// Backward of linear attention (no normaliser). ht (optional out): the forward's final state.
template <class T>
void linear_attention_backward(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                               tensor_view<const T, 4> v, tensor_view<const T, 4> h0,
                               tensor_view<const T, 4> do_, tensor_view<const T, 4> dht,
                               tensor_view<T, 4> dq, tensor_view<T, 4> dk, tensor_view<T, 4> dv,
                               tensor_view<T, 4> dh0, const backward_options<T>& opt = {},
                               std::span<const index_t> cu_seqlens = {},
                               tensor_view<T, 4> ht = {}) {
  kernels::backward::gated_problem<T> p;
  p.q = q, p.k = k, p.v = v, p.h0 = h0, p.do_ = do_, p.dht = dht;
  p.dq = dq, p.dk = dk, p.dv = dv, p.dh0 = dh0, p.ht = ht, p.cu_seqlens = cu_seqlens;
  detail::run_gated_backward("linear_attention_backward", p, opt);
}

/// Backward of simple GLA (scalar log gate g: [B,T,H]; dg: [B,T,H]).
template <class T>
void simple_gla_backward(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                         tensor_view<const T, 4> v, tensor_view<const T, 3> g,
                         tensor_view<const T, 4> h0, tensor_view<const T, 4> do_,
                         tensor_view<const T, 4> dht, tensor_view<T, 4> dq, tensor_view<T, 4> dk,
                         tensor_view<T, 4> dv, tensor_view<T, 3> dg, tensor_view<T, 4> dh0,
                         const backward_options<T>& opt = {},
                         std::span<const index_t> cu_seqlens = {}, tensor_view<T, 4> ht = {}) {
  const checker check{"simple_gla_backward"};
  check.nonempty("g", g);
  check.nonempty("dg", dg);
  kernels::backward::gated_problem<T> p;
  p.q = q, p.k = k, p.v = v, p.g = g, p.h0 = h0, p.do_ = do_, p.dht = dht;
  p.dq = dq, p.dk = dk, p.dv = dv, p.dg = dg, p.dh0 = dh0, p.ht = ht, p.cu_seqlens = cu_seqlens;
  detail::run_gated_backward("simple_gla_backward", p, opt);
}

/// Backward of simple GLA with a constant per-head log gate g_gamma [H] (retention, Lightning);
/// dg_gamma: [H], the sum over every token of the scalar gate's gradient. Allocates 2·B·T·H values.
template <class T>
void simple_gla_constant_backward(
    tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
    tensor_view<const T, 1> g_gamma, tensor_view<const T, 4> h0, tensor_view<const T, 4> do_,
    tensor_view<const T, 4> dht, tensor_view<T, 4> dq, tensor_view<T, 4> dk, tensor_view<T, 4> dv,
    tensor_view<T, 1> dg_gamma, tensor_view<T, 4> dh0, const backward_options<T>& opt = {},
    std::span<const index_t> cu_seqlens = {}, tensor_view<T, 4> ht = {}) {
  const checker check{"simple_gla_constant_backward"};
  check.nonempty("q", q);
  check.nonempty("v", v);
  const index_t B = q.extent(0), TT = q.extent(1), H = v.extent(2);
  check.shape("g_gamma", g_gamma, {H});
  check.shape("dg_gamma", dg_gamma, {H});
  tensor<T, 3> g({B, TT, H}), dg({B, TT, H});
  for (index_t b = 0; b < B; ++b)
    for (index_t t = 0; t < TT; ++t)
      for (index_t h = 0; h < H; ++h) g(b, t, h) = g_gamma(h);
  kernels::backward::gated_problem<T> p;
  p.q = q, p.k = k, p.v = v, p.g = g, p.h0 = h0, p.do_ = do_, p.dht = dht;
  p.dq = dq, p.dk = dk, p.dv = dv, p.dg = dg, p.dh0 = dh0, p.ht = ht, p.cu_seqlens = cu_seqlens;
  detail::run_gated_backward("simple_gla_constant_backward", p, opt);
  for (index_t h = 0; h < H; ++h) {
    double sum = 0;  // fixed order, in double
    for (index_t b = 0; b < B; ++b)
      for (index_t t = 0; t < TT; ++t) sum += static_cast<double>(dg(b, t, h));
    dg_gamma(h) = static_cast<T>(sum);
  }
}

/// Backward of GLA (per-key log gate gk: [B,T,H,K]; dgk: [B,T,H,K]). No per-value gate.
template <class T>
void gla_backward(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                  tensor_view<const T, 4> gk, tensor_view<const T, 4> h0,
                  tensor_view<const T, 4> do_, tensor_view<const T, 4> dht, tensor_view<T, 4> dq,
                  tensor_view<T, 4> dk, tensor_view<T, 4> dv, tensor_view<T, 4> dgk,
                  tensor_view<T, 4> dh0, const backward_options<T>& opt = {},
                  std::span<const index_t> cu_seqlens = {}, tensor_view<T, 4> ht = {}) {
  const checker check{"gla_backward"};
  check.nonempty("gk", gk);
  check.nonempty("dgk", dgk);
  kernels::backward::gated_problem<T> p;
  p.q = q, p.k = k, p.v = v, p.gk = gk, p.h0 = h0, p.do_ = do_, p.dht = dht;
  p.dq = dq, p.dk = dk, p.dv = dv, p.dgk = dgk, p.dh0 = dh0, p.ht = ht, p.cu_seqlens = cu_seqlens;
  detail::run_gated_backward("gla_backward", p, opt);
}

/// Backward of Mamba2 SSD in its discrete form (dt after softplus/clamp, A = -exp(A_log)):
/// S_t = e^{dt_t A} S_{t-1} + B_t (dt_t x_t)ᵀ, y_t = S_tᵀ C_t + D x_t (D may be empty).
/// Runs the gated backward with q = C, k = B, v = x, g = dt·A, key scale dt, scale 1, then
/// ddt = dc + A·dg, dA = Σ dt·dg, dx += D dy, dD = Σ x·dy. Allocates 3·B·T·H values.
template <class T>
void mamba2_ssd_backward(tensor_view<const T, 4> x, tensor_view<const T, 3> dt,
                         tensor_view<const T, 1> A, tensor_view<const T, 4> Bm,
                         tensor_view<const T, 4> Cm, tensor_view<const T, 1> D,
                         tensor_view<const T, 4> h0, tensor_view<const T, 4> dy,
                         tensor_view<const T, 4> dht, const mamba2_ssd_grads<T>& grads,
                         const backward_options<T>& opt = {},
                         std::span<const index_t> cu_seqlens = {}, tensor_view<T, 4> ht = {}) {
  const checker check{"mamba2_ssd_backward"};
  check.nonempty("x", x);
  const index_t Bn = x.extent(0), TT = x.extent(1), H = x.extent(2), P = x.extent(3);
  check.shape("dt", dt, {Bn, TT, H});
  check.shape("dy", dy, {Bn, TT, H, P});
  check.shape("A", A, {H});
  if (D.data()) check.shape("D", D, {H});
  check.shape("dx", grads.dx, {Bn, TT, H, P});
  check.shape("ddt", grads.ddt, {Bn, TT, H});
  check.shape("dA", grads.dA, {H});
  check.nonempty("Bm", Bm);
  check.shape("Bm", Bm, {Bn, TT, any_extent, any_extent});
  const index_t G = Bm.extent(2), N = Bm.extent(3);
  if (H % G != 0) {
    check.fail("Bm", "groups of B/C (" + std::to_string(G) + ") must divide the heads of x (" +
                         std::to_string(H) + ")");
  }
  check.shape("Cm", Cm, {Bn, TT, G, N});
  check.shape("dB", grads.dB, {Bn, TT, G, N});
  check.shape("dC", grads.dC, {Bn, TT, G, N});
  if (grads.dD.data()) check.shape("dD", grads.dD, {H});
  tensor<T, 3> g({Bn, TT, H}), dg({Bn, TT, H}), dc({Bn, TT, H});
  for (index_t b = 0; b < Bn; ++b)
    for (index_t t = 0; t < TT; ++t)
      for (index_t h = 0; h < H; ++h) g(b, t, h) = dt(b, t, h) * A(h);
  kernels::backward::gated_problem<T> p;
  p.q = Cm, p.k = Bm, p.v = x, p.g = g, p.k_scale = dt, p.h0 = h0, p.do_ = dy, p.dht = dht;
  p.dq = grads.dC, p.dk = grads.dB, p.dv = grads.dx, p.dg = dg, p.dk_scale = dc;
  p.dh0 = grads.dh0, p.ht = ht, p.cu_seqlens = cu_seqlens;
  backward_options<T> o2 = opt;
  o2.scale = T(1);
  detail::run_gated_backward("mamba2_ssd_backward", p, o2, false);
  // chain rule through g = dt·A and the D skip; sums in double, in a fixed order
  for (index_t h = 0; h < H; ++h) {
    double sa = 0, sd = 0;
    for (index_t b = 0; b < Bn; ++b) {
      for (index_t t = 0; t < TT; ++t) {
        grads.ddt(b, t, h) = dc(b, t, h) + A(h) * dg(b, t, h);
        sa += static_cast<double>(dt(b, t, h)) * static_cast<double>(dg(b, t, h));
        if (D.data()) {
          for (index_t q = 0; q < P; ++q) {
            grads.dx(b, t, h, q) += D(h) * dy(b, t, h, q);
            sd += static_cast<double>(x(b, t, h, q)) * static_cast<double>(dy(b, t, h, q));
          }
        }
      }
    }
    grads.dA(h) = static_cast<T>(sa);
    if (grads.dD.data()) grads.dD(h) = static_cast<T>(sd);
  }
}

/// Flash backward of causal softmax attention (opt.window > 0: sliding window of W keys,
/// the query's own included). q: [B,T,H,K]; k: [B,T,Hkv,K]; v: [B,T,Hkv,V]; do_: [B,T,H,V];
/// dq, dk, dv as q, k, v. o (optional out): the forward's output, recomputed on the way.
template <class T>
void softmax_attention_backward(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                                tensor_view<const T, 4> v, tensor_view<const T, 4> do_,
                                tensor_view<T, 4> dq, tensor_view<T, 4> dk, tensor_view<T, 4> dv,
                                const backward_options<T>& opt = {}, tensor_view<T, 4> o = {}) {
  const checker check{"softmax_attention_backward"};
  check.nonempty("q", q);
  const index_t B = q.extent(0), TT = q.extent(1), H = q.extent(2), K = q.extent(3);
  check.nonempty("k", k);
  check.shape("k", k, {B, TT, any_extent, K});
  const index_t Hkv = k.extent(2);
  check.nonempty("v", v);
  check.shape("v", v, {B, TT, Hkv, any_extent});
  const index_t V = v.extent(3);
  if (H % Hkv != 0) {
    check.fail("k", "heads of k/v (" + std::to_string(Hkv) + ") must divide the heads of q (" +
                        std::to_string(H) + ")");
  }
  check.shape("do_", do_, {B, TT, H, V});
  check.shape("dq", dq, {B, TT, H, K});
  check.shape("dk", dk, {B, TT, Hkv, K});
  check.shape("dv", dv, {B, TT, Hkv, V});
  if (o.data()) check.shape("o", o, {B, TT, H, V});
  if (opt.chunk_size <= 0)
    check.fail("opt.chunk_size", "must be > 0, got " + std::to_string(opt.chunk_size));
  if (opt.window < 0) check.fail("opt.window", "must be >= 0, got " + std::to_string(opt.window));
  if (opt.scale && !std::isfinite(static_cast<double>(*opt.scale)))
    check.fail("opt.scale", "must be finite");
  for (auto [name, view] :
       {std::pair<const char*, tensor_view<const T, 4>>{"q", q}, {"k", k}, {"v", v}, {"do_", do_}})
    check.inner_contiguous(name, view);
  check.inner_contiguous("dq", dq);
  check.inner_contiguous("dk", dk);
  check.inner_contiguous("dv", dv);
  kernels::backward::attention_problem<T> p{
      q,         k,  v,
      do_,       dq, dk,
      dv,        o,  opt.scale ? *opt.scale : T(1) / std::sqrt(static_cast<T>(K)),
      opt.window};
  kernels::backward::attention_backward(p, opt.chunk_size);
}

// ---- the DPLR family (kernels/backward/dplr.hpp) ------------------------------------------

namespace detail {

namespace dplrb = kernels::backward::dplr;

/// The state in/out views of a DPLR backward call, read and written through the engine's hooks.
template <class T>
struct dplr_state_io {
  tensor_view<const T, 4> h0_, dht_;
  tensor_view<T, 4> ht_, dh0_;
  T h0(index_t n, index_t h, index_t i, index_t j) const {
    return h0_.data() ? h0_(n, h, i, j) : T(0);
  }
  T dht(index_t n, index_t h, index_t i, index_t j) const {
    return dht_.data() ? dht_(n, h, i, j) : T(0);
  }
  void put_ht(index_t n, index_t h, index_t i, index_t j, T x) const {
    if (ht_.data()) ht_(n, h, i, j) = x;
  }
  void put_dh0(index_t n, index_t h, index_t i, index_t j, T x) const {
    if (dh0_.data()) dh0_(n, h, i, j) = x;
  }
};

/// e^{g}, the log gate clamped at -1e4 first (exactly 0 there; -inf gives 0, never NaN).
template <class T>
T gate_exp(T g) {
  return std::exp(std::max(g, static_cast<T>(dplrb::gate_floor)));
}

/// DeltaNet / Gated DeltaNet / KDA on the engine: a = -β e^{g} ⊙ k, b = k, v̂ = β v, q̂ = s q.
/// Chain rule: dq = s dq̂, dk = dk̂ + db - β e^{g} ⊙ dâ, dv = β dv̂,
/// dβ = v·dv̂ - Σ_i e^{g_i} k_i dâ_i, dg_i = dg_engine,i + â_i dâ_i (summed over i for GDN).
template <class T>
struct delta_op : dplr_state_io<T> {
  tensor_view<const T, 4> q, k, v, do_, gk;  // gk: KDA's per-key gate, or empty
  tensor_view<const T, 3> beta, g;           // g: GDN's scalar gate, or empty
  tensor_view<T, 4> dq, dk, dv, dgk;
  tensor_view<T, 3> dbeta, dg;
  T scale = T(1);
  index_t K = 0, V = 0;

  T gate(index_t b, index_t t, index_t h, index_t i) const {
    if (gk.data()) return gate_exp(gk(b, t, h, i));
    if (g.data()) return gate_exp(g(b, t, h));
    return T(1);
  }
  void load(const dplrb::segment& sg, index_t hv, index_t hk, index_t t0,
            dplrb::chunk_rows<T>& c) const {
    const index_t Kp = c.Kp;
    for (index_t r = 0; r < c.L; ++r) {
      const index_t t = t0 + r;
      const T bt = beta(sg.b, t, hv);
      const T* qr = q.ptr({sg.b, t, hk, 0});
      const T* kr = k.ptr({sg.b, t, hk, 0});
      const T* vr = v.ptr({sg.b, t, hv, 0});
      const T* dr = do_.ptr({sg.b, t, hv, 0});
      for (index_t i = 0; i < K; ++i) {
        const T e = gate(sg.b, t, hv, i);
        c.q[r * Kp + i] = scale * qr[i];
        c.k[r * Kp + i] = kr[i];
        c.b[r * Kp + i] = kr[i];
        c.a[r * Kp + i] = -bt * e * kr[i];
        c.eg[r * Kp + i] = e;
      }
      for (index_t j = 0; j < V; ++j) {
        c.v[r * V + j] = bt * vr[j];
        c.dout[r * V + j] = dr[j];
      }
    }
  }
  void store(const dplrb::segment& sg, index_t hv, index_t hk, bool first, index_t t0,
             const dplrb::chunk_rows<T>& c) const {
    const index_t Kp = c.Kp;
    for (index_t r = 0; r < c.L; ++r) {
      const index_t t = t0 + r;
      const T bt = beta(sg.b, t, hv);
      const T* vr = v.ptr({sg.b, t, hv, 0});
      T* dqo = dq.ptr({sg.b, t, hk, 0});
      T* dko = dk.ptr({sg.b, t, hk, 0});
      T* dvo = dv.ptr({sg.b, t, hv, 0});
      const T *dq_ = c.dq + r * Kp, *da = c.da + r * Kp, *db = c.db + r * Kp;
      const T *dk_ = c.dk + r * Kp, *dge = c.dg + r * Kp, *a = c.a + r * Kp, *e = c.eg + r * Kp;
      const T* kr = c.k + r * Kp;
      T dbt = T(0), dgs = T(0);
      for (index_t j = 0; j < V; ++j) {
        dvo[j] = bt * c.dv[r * V + j];
        dbt += vr[j] * c.dv[r * V + j];
      }
      for (index_t i = 0; i < K; ++i) {
        const T gq = scale * dq_[i], gkk = dk_[i] + db[i] - bt * e[i] * da[i];
        dqo[i] = first ? gq : dqo[i] + gq;
        dko[i] = first ? gkk : dko[i] + gkk;
        dbt -= e[i] * kr[i] * da[i];
        const T gg = dge[i] + a[i] * da[i];
        if (dgk.data()) dgk(sg.b, t, hv, i) = gg;
        dgs += gg;
      }
      if (dbeta.data()) dbeta(sg.b, t, hv) = dbt;
      if (dg.data()) dg(sg.b, t, hv) = dgs;
    }
  }
};

/// RWKV-7 on the engine: q̂ = s r, a, b, k, v, e^{w} as given; dr = s dq̂, the rest directly.
template <class T>
struct rwkv7_op : dplr_state_io<T> {
  tensor_view<const T, 4> r, k, v, w, a, b, do_;
  tensor_view<T, 4> dr, dk, dv, dw, da, db;
  T scale = T(1);
  index_t K = 0, V = 0;

  void load(const dplrb::segment& sg, index_t h, index_t, index_t t0,
            dplrb::chunk_rows<T>& c) const {
    const index_t Kp = c.Kp;
    for (index_t x = 0; x < c.L; ++x) {
      const index_t t = t0 + x;
      for (index_t i = 0; i < K; ++i) {
        c.q[x * Kp + i] = scale * r(sg.b, t, h, i);
        c.k[x * Kp + i] = k(sg.b, t, h, i);
        c.a[x * Kp + i] = a(sg.b, t, h, i);
        c.b[x * Kp + i] = b(sg.b, t, h, i);
        c.eg[x * Kp + i] = gate_exp(w(sg.b, t, h, i));
      }
      for (index_t j = 0; j < V; ++j) {
        c.v[x * V + j] = v(sg.b, t, h, j);
        c.dout[x * V + j] = do_(sg.b, t, h, j);
      }
    }
  }
  void store(const dplrb::segment& sg, index_t h, index_t, bool, index_t t0,
             const dplrb::chunk_rows<T>& c) const {
    const index_t Kp = c.Kp;
    for (index_t x = 0; x < c.L; ++x) {
      const index_t t = t0 + x;
      for (index_t i = 0; i < K; ++i) {
        dr(sg.b, t, h, i) = scale * c.dq[x * Kp + i];
        dk(sg.b, t, h, i) = c.dk[x * Kp + i];
        da(sg.b, t, h, i) = c.da[x * Kp + i];
        db(sg.b, t, h, i) = c.db[x * Kp + i];
        dw(sg.b, t, h, i) = c.dg[x * Kp + i];
      }
      for (index_t j = 0; j < V; ++j) dv(sg.b, t, h, j) = c.dv[x * V + j];
    }
  }
};

/// RWKV-6 on the engine (no rank-one term, exclusive readout); the bonus o_t += (q̂·(u⊙k)) v_t
/// is chained here with c_t = v_t·do_t: dr += s (u⊙k) c_t, dk += u ⊙ q̂ c_t,
/// dv += (q̂·(u⊙k)) do_t, du += q̂ ⊙ k c_t (per (sequence, head) rows, summed by the caller).
template <class T>
struct rwkv6_op : dplr_state_io<T> {
  tensor_view<const T, 4> r, k, v, w, do_;
  tensor_view<const T, 2> u;
  tensor_view<T, 4> dr, dk, dv, dw;
  double* du_rows = nullptr;  // [N·H·K], zeroed
  index_t H = 0;
  T scale = T(1);
  index_t K = 0, V = 0;

  void load(const dplrb::segment& sg, index_t h, index_t, index_t t0,
            dplrb::chunk_rows<T>& c) const {
    const index_t Kp = c.Kp;
    for (index_t x = 0; x < c.L; ++x) {
      const index_t t = t0 + x;
      for (index_t i = 0; i < K; ++i) {
        c.q[x * Kp + i] = scale * r(sg.b, t, h, i);
        c.k[x * Kp + i] = k(sg.b, t, h, i);
        c.eg[x * Kp + i] = gate_exp(w(sg.b, t, h, i));
      }
      for (index_t j = 0; j < V; ++j) {
        c.v[x * V + j] = v(sg.b, t, h, j);
        c.dout[x * V + j] = do_(sg.b, t, h, j);
      }
    }
  }
  void store(const dplrb::segment& sg, index_t h, index_t, bool, index_t t0,
             const dplrb::chunk_rows<T>& c) const {
    const index_t Kp = c.Kp;
    double* du = du_rows + (sg.n * H + h) * K;
    for (index_t x = 0; x < c.L; ++x) {
      const index_t t = t0 + x;
      T ct = T(0), qk = T(0);
      for (index_t j = 0; j < V; ++j) ct += v(sg.b, t, h, j) * do_(sg.b, t, h, j);
      const T* qh = c.q + x * Kp;
      const T* kr = c.k + x * Kp;
      for (index_t i = 0; i < K; ++i) qk += qh[i] * u(h, i) * kr[i];
      for (index_t i = 0; i < K; ++i) {
        dr(sg.b, t, h, i) = scale * (c.dq[x * Kp + i] + u(h, i) * kr[i] * ct);
        dk(sg.b, t, h, i) = c.dk[x * Kp + i] + u(h, i) * qh[i] * ct;
        dw(sg.b, t, h, i) = c.dg[x * Kp + i];
        du[i] += static_cast<double>(qh[i] * kr[i]) * static_cast<double>(ct);
      }
      for (index_t j = 0; j < V; ++j) dv(sg.b, t, h, j) = c.dv[x * V + j] + qk * do_(sg.b, t, h, j);
    }
  }
};

/// The checks every DPLR backward shares: q, k [B,T,Hk,K], v, do_ [B,T,H,V] (H % Hk == 0, or
/// H == Hk with same_heads), states [N,H,K,V], gradients as their inputs, options, cu_seqlens.
/// Returns N.
template <class T>
index_t check_dplr_backward(const checker& check, const char* qn, tensor_view<const T, 4> q,
                            tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                            tensor_view<const T, 4> h0, tensor_view<const T, 4> do_,
                            tensor_view<const T, 4> dht, const char* dqn, tensor_view<T, 4> dq,
                            tensor_view<T, 4> dk, tensor_view<T, 4> dv, tensor_view<T, 4> dh0,
                            tensor_view<T, 4> ht, const backward_options<T>& opt,
                            std::span<const index_t> cu, bool same_heads) {
  check.nonempty(qn, q);
  const index_t B = q.extent(0), TT = q.extent(1), Hk = q.extent(2), K = q.extent(3);
  check.shape("k", k, {B, TT, Hk, K});
  check.nonempty("v", v);
  check.shape("v", v, {B, TT, any_extent, any_extent});
  const index_t H = v.extent(2), V = v.extent(3);
  if (same_heads && H != Hk) {
    check.fail("v", "heads of v (" + std::to_string(H) + ") must equal the heads of " + qn + " (" +
                        std::to_string(Hk) + ")");
  }
  if (H % Hk != 0) {
    check.fail("v", "heads of v (" + std::to_string(H) + ") must be a multiple of the heads of " +
                        qn + "/k (" + std::to_string(Hk) + ")");
  }
  if (opt.chunk_size <= 0)
    check.fail("opt.chunk_size", "must be > 0, got " + std::to_string(opt.chunk_size));
  if (opt.scale && !std::isfinite(static_cast<double>(*opt.scale)))
    check.fail("opt.scale", "must be finite");
  const index_t N = cu.empty() ? B : check.cu_seqlens(cu, B, TT);
  check.shape("do_", do_, {B, TT, H, V});
  if (h0.data()) check.shape("h0", h0, {N, H, K, V});
  if (dht.data()) check.shape("dht", dht, {N, H, K, V});
  check.shape(dqn, dq, {B, TT, Hk, K});
  check.shape("dk", dk, {B, TT, Hk, K});
  check.shape("dv", dv, {B, TT, H, V});
  if (dh0.data()) check.shape("dh0", dh0, {N, H, K, V});
  if (ht.data()) check.shape("ht", ht, {N, H, K, V});
  return N;
}

template <class T>
void run_delta_backward(const char* where, delta_op<T> op, const backward_options<T>& opt,
                        std::span<const index_t> cu) {
  const checker check{where};
  check.nonempty("dbeta", op.dbeta);
  check_dplr_backward<T>(check, "q", op.q, op.k, op.v, op.h0_, op.do_, op.dht_, "dq", op.dq, op.dk,
                         op.dv, op.dh0_, op.ht_, opt, cu, false);
  const index_t B = op.q.extent(0), TT = op.q.extent(1), Hk = op.q.extent(2), K = op.q.extent(3);
  const index_t H = op.v.extent(2), V = op.v.extent(3);
  check.shape("beta", op.beta, {B, TT, H});
  check.shape("dbeta", op.dbeta, {B, TT, H});
  if (op.g.data()) {
    check.shape("g", op.g, {B, TT, H});
    check.shape("dg", op.dg, {B, TT, H});
  }
  if (op.gk.data()) {
    check.shape("g", op.gk, {B, TT, H, K});
    check.shape("dg", op.dgk, {B, TT, H, K});
  }
  op.scale = opt.scale ? *opt.scale : T(1) / std::sqrt(static_cast<T>(K));
  op.K = K, op.V = V;
  dplrb::dplr_backward<T, true, true>(op, B, TT, cu, Hk, H, K, V, opt.chunk_size);
}

}  // namespace detail

/// Backward of DeltaNet (mixers/delta_net.hpp; q, k as given, no l2norm inside). beta, dbeta:
/// [B,T,H]. ht (optional out): the forward's final state.
template <class T>
void delta_rule_backward(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                         tensor_view<const T, 4> v, tensor_view<const T, 3> beta,
                         tensor_view<const T, 4> h0, tensor_view<const T, 4> do_,
                         tensor_view<const T, 4> dht, tensor_view<T, 4> dq, tensor_view<T, 4> dk,
                         tensor_view<T, 4> dv, tensor_view<T, 3> dbeta, tensor_view<T, 4> dh0,
                         const backward_options<T>& opt = {},
                         std::span<const index_t> cu_seqlens = {}, tensor_view<T, 4> ht = {}) {
  detail::delta_op<T> op;
  op.q = q, op.k = k, op.v = v, op.beta = beta, op.h0_ = h0, op.do_ = do_, op.dht_ = dht;
  op.dq = dq, op.dk = dk, op.dv = dv, op.dbeta = dbeta, op.dh0_ = dh0, op.ht_ = ht;
  detail::run_delta_backward("delta_rule_backward", op, opt, cu_seqlens);
}

/// Backward of Gated DeltaNet (scalar log gate g, dg: [B,T,H]; beta, dbeta: [B,T,H]).
template <class T>
void gated_delta_rule_backward(tensor_view<const T, 4> q, tensor_view<const T, 4> k,
                               tensor_view<const T, 4> v, tensor_view<const T, 3> g,
                               tensor_view<const T, 3> beta, tensor_view<const T, 4> h0,
                               tensor_view<const T, 4> do_, tensor_view<const T, 4> dht,
                               tensor_view<T, 4> dq, tensor_view<T, 4> dk, tensor_view<T, 4> dv,
                               tensor_view<T, 3> dg, tensor_view<T, 3> dbeta, tensor_view<T, 4> dh0,
                               const backward_options<T>& opt = {},
                               std::span<const index_t> cu_seqlens = {},
                               tensor_view<T, 4> ht = {}) {
  const checker check{"gated_delta_rule_backward"};
  check.nonempty("g", g);
  check.nonempty("dg", dg);
  detail::delta_op<T> op;
  op.q = q, op.k = k, op.v = v, op.g = g, op.beta = beta, op.h0_ = h0, op.do_ = do_, op.dht_ = dht;
  op.dq = dq, op.dk = dk, op.dv = dv, op.dg = dg, op.dbeta = dbeta, op.dh0_ = dh0, op.ht_ = ht;
  detail::run_delta_backward("gated_delta_rule_backward", op, opt, cu_seqlens);
}

/// Backward of KDA (per-key log gate g, dg: [B,T,H,K]; beta, dbeta: [B,T,H]).
template <class T>
void kda_backward(tensor_view<const T, 4> q, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                  tensor_view<const T, 4> g, tensor_view<const T, 3> beta,
                  tensor_view<const T, 4> h0, tensor_view<const T, 4> do_,
                  tensor_view<const T, 4> dht, tensor_view<T, 4> dq, tensor_view<T, 4> dk,
                  tensor_view<T, 4> dv, tensor_view<T, 4> dg, tensor_view<T, 3> dbeta,
                  tensor_view<T, 4> dh0, const backward_options<T>& opt = {},
                  std::span<const index_t> cu_seqlens = {}, tensor_view<T, 4> ht = {}) {
  const checker check{"kda_backward"};
  check.nonempty("g", g);
  check.nonempty("dg", dg);
  detail::delta_op<T> op;
  op.q = q, op.k = k, op.v = v, op.gk = g, op.beta = beta, op.h0_ = h0, op.do_ = do_, op.dht_ = dht;
  op.dq = dq, op.dk = dk, op.dv = dv, op.dgk = dg, op.dbeta = dbeta, op.dh0_ = dh0, op.ht_ = ht;
  detail::run_delta_backward("kda_backward", op, opt, cu_seqlens);
}

/// Backward of RWKV-7 (mixers/rwkv7.hpp): r, k, w, a, b and their gradients [B,T,H,K]; v, do_,
/// dv [B,T,H,V]; a and b are independent inputs (the layer's a = -kk, b = kk ⊙ iclr chain in
/// the caller).
template <class T>
void rwkv7_backward(tensor_view<const T, 4> r, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                    tensor_view<const T, 4> w, tensor_view<const T, 4> a, tensor_view<const T, 4> b,
                    tensor_view<const T, 4> h0, tensor_view<const T, 4> do_,
                    tensor_view<const T, 4> dht, tensor_view<T, 4> dr, tensor_view<T, 4> dk,
                    tensor_view<T, 4> dv, tensor_view<T, 4> dw, tensor_view<T, 4> da,
                    tensor_view<T, 4> db, tensor_view<T, 4> dh0,
                    const backward_options<T>& opt = {}, std::span<const index_t> cu_seqlens = {},
                    tensor_view<T, 4> ht = {}) {
  const checker check{"rwkv7_backward"};
  detail::check_dplr_backward<T>(check, "r", r, k, v, h0, do_, dht, "dr", dr, dk, dv, dh0, ht, opt,
                                 cu_seqlens, true);
  const index_t B = r.extent(0), TT = r.extent(1), H = r.extent(2), K = r.extent(3);
  for (auto [name, x] :
       {std::pair<const char*, tensor_view<const T, 4>>{"w", w}, {"a", a}, {"b", b}})
    check.shape(name, x, {B, TT, H, K});
  for (auto [name, x] :
       {std::pair<const char*, tensor_view<T, 4>>{"dw", dw}, {"da", da}, {"db", db}})
    check.shape(name, x, {B, TT, H, K});
  detail::rwkv7_op<T> op;
  op.r = r, op.k = k, op.v = v, op.w = w, op.a = a, op.b = b, op.do_ = do_;
  op.h0_ = h0, op.dht_ = dht, op.ht_ = ht, op.dh0_ = dh0;
  op.dr = dr, op.dk = dk, op.dv = dv, op.dw = dw, op.da = da, op.db = db;
  op.scale = opt.scale ? *opt.scale : T(1);
  op.K = K, op.V = v.extent(3);
  kernels::backward::dplr::dplr_backward<T, true, true>(op, B, TT, cu_seqlens, H, H, K, op.V,
                                                        opt.chunk_size);
}

/// Backward of RWKV-6 (mixers/rwkv6.hpp): r, k, w and their gradients [B,T,H,K]; u, du [H,K]
/// (du sums over every sequence and token, in double, in a fixed order). Takes N·H·K doubles of
/// workspace for the per-sequence du rows.
template <class T>
void rwkv6_backward(tensor_view<const T, 4> r, tensor_view<const T, 4> k, tensor_view<const T, 4> v,
                    tensor_view<const T, 4> w, tensor_view<const T, 2> u,
                    tensor_view<const T, 4> h0, tensor_view<const T, 4> do_,
                    tensor_view<const T, 4> dht, tensor_view<T, 4> dr, tensor_view<T, 4> dk,
                    tensor_view<T, 4> dv, tensor_view<T, 4> dw, tensor_view<T, 2> du,
                    tensor_view<T, 4> dh0, const backward_options<T>& opt = {},
                    std::span<const index_t> cu_seqlens = {}, tensor_view<T, 4> ht = {}) {
  const checker check{"rwkv6_backward"};
  const index_t N = detail::check_dplr_backward<T>(check, "r", r, k, v, h0, do_, dht, "dr", dr, dk,
                                                   dv, dh0, ht, opt, cu_seqlens, true);
  const index_t B = r.extent(0), TT = r.extent(1), H = r.extent(2), K = r.extent(3);
  check.shape("w", w, {B, TT, H, K});
  check.shape("dw", dw, {B, TT, H, K});
  check.shape("u", u, {H, K});
  check.shape("du", du, {H, K});
  workspace& arena = thread_workspace();
  auto frame = arena.scope();
  const std::span<double> rows = kernels::common::take_zeroed<double>(frame, N * H * K);
  detail::rwkv6_op<T> op;
  op.r = r, op.k = k, op.v = v, op.w = w, op.u = u, op.do_ = do_;
  op.h0_ = h0, op.dht_ = dht, op.ht_ = ht, op.dh0_ = dh0;
  op.dr = dr, op.dk = dk, op.dv = dv, op.dw = dw;
  op.du_rows = rows.data(), op.H = H;
  op.scale = opt.scale ? *opt.scale : T(1);
  op.K = K, op.V = v.extent(3);
  kernels::backward::dplr::dplr_backward<T, false, false>(op, B, TT, cu_seqlens, H, H, K, op.V,
                                                          opt.chunk_size);
  for (index_t h = 0; h < H; ++h) {
    for (index_t i = 0; i < K; ++i) {
      double sum = 0;  // sequences in order
      for (index_t n = 0; n < N; ++n) sum += rows[static_cast<std::size_t>((n * H + h) * K + i)];
      du(h, i) = static_cast<T>(sum);
    }
  }
}

}  // namespace seqmix
