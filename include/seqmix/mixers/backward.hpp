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
//
// Shapes as in the forward fronts: q, k: [B,T,Hk,K]; v, do_: [B,T,H,V]; g: [B,T,H]; gk:
// [B,T,H,K]; h0, dht, dh0: [N,H,K,V] (N = B, or the number of packed sequences with cu_seqlens
// [N+1] and B == 1). h0 and dht may be empty views (zero); dh0 may be empty (not computed).
// Each gradient has its input's shape. Mamba2: x, dy: [B,T,H,P]; dt: [B,T,H] (the step after
// softplus/clamp: chain dt_raw, dt_bias, A_log through it, ddt·sigmoid and dA·A); A, D: [H];
// Bm, Cm: [B,T,G,N]; states [N,H,N,P] (seqmix's layout). Softmax: k, v: [B,T,Hkv,·].
//
// What is saved: nothing. The forward runs in inference mode and the backward recomputes what it
// needs per (sequence, head): the chunk-boundary states (gated family, (T/C + 1)·K·V values per
// thread) or the row statistics and output (softmax, O(T) per thread). docs/math.md §8 gives the
// measurement behind the choice. Cost: kernels/backward/gated.hpp and attention.hpp.
//
// Checks: every shape, the chunk size (> 0), scale (finite), window (>= 0), cu_seqlens; shape
// errors name this function and the argument. Gates are not re-checked (the forward did).
#pragma once

#include <cmath>
#include <optional>
#include <span>
#include <string>

#include <seqmix/core/error.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/kernels/backward/attention.hpp>
#include <seqmix/kernels/backward/gated.hpp>

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

}  // namespace seqmix
