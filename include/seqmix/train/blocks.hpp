// SPDX-License-Identifier: MIT
// Training building blocks: forward and backward of the pieces around a mixer (issue 15).
// Free functions over views, any floating type T (float for training, double for the
// finite-difference tests). Rows are tokens: M = B·T rows of width D, inner-contiguous.
//
//   embedding     y[i] = E[id_i]                     dE[id_i] += dy[i]        (scatter-add)
//   linear        y = x Wᵀ (+ b)                     dx = dy W, dW += dyᵀ x, db += Σ_i dy_i
//   rms_norm      y = x r ⊙ w, r = (mean(x²) + ε)^-½ dx = r (dx̂ - x̂ mean(dx̂ ⊙ x̂)), dx̂ = dy ⊙ w,
//                                                    dw += Σ_i dy_i ⊙ x̂_i
//   l2norm        y = x r, r = (Σ x² + ε)^-½ (per group of G)   dx = r (dy - y (y·dy))
//   short_conv    z[t,c] = Σ_j w[c,j] x[t-(W-1)+j, c] (x = 0 before t = 0), y = act(z)
//                 dz = dy ⊙ act'(z), dx[s,c] = Σ_j w[c,j] dz[s+(W-1)-j, c],
//                 dw[c,j] += Σ_t dz[t,c] x[t-(W-1)+j, c]
//   swiglu        h = silu(a) ⊙ u                    da = dh ⊙ u ⊙ silu'(a), du = dh ⊙ silu(a)
//   swiglu_mlp    y = (silu(x W_gᵀ) ⊙ x W_uᵀ) W_dᵀ   (the three linears + swiglu, activations
//                                                    kept in swiglu_mlp_cache)
//   pointwise     silu, sigmoid, logsigmoid, softplus, exp and their derivatives
//   cross_entropy ℓ = (1/n) Σ_{i valid} (logsumexp(z_i) - z_i[y_i]),
//                 dz_i = (softmax(z_i) - e_{y_i}) / n    (0 on the ignored rows)
//
// Conventions: silu(x) = x σ(x), silu'(x) = σ(x)(1 + x(1 - σ(x))); logsigmoid' = σ(-x);
// softplus' = σ(x). Parameter gradients accumulate (+=), so one buffer can gather several uses
// (a tied embedding/readout); input gradients are written (=) unless the function says so.
// An empty view (data() == nullptr) for an optional gradient skips it.
//
// Cost (M rows): linear 2·M·N·K FLOP forward, 4·M·N·K backward, through linalg::matmul
// (core/matmul.hpp: threaded, blocked, deterministic) for float and linalg::gemm
// (core/gemm.hpp, single-threaded) for other types; the backward makes transposed copies of W
// (N·K), dy (M·N) and x (M·K). rms_norm / l2norm ~6 FLOP per element each way, short conv
// 2·W FLOP per element forward, 4·W backward (z recomputed, nothing saved), cross-entropy
// two passes over the logits and one (vectorised) exp per logit. Row-wise work runs parallel_for
// over rows (column blocks for the parameter reductions) when a call touches >= 2^15 values,
// serially below; every reduction has a fixed order, so results do not depend on the thread
// count (tested bitwise, 1 vs 2 threads).
//
// Checks: every shape, before anything is written; a mismatch throws seqmix::shape_error
// naming train::<function>, the argument, the expected and the actual shape.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <seqmix/core/error.hpp>
#include <seqmix/core/gemm.hpp>
#include <seqmix/core/matmul.hpp>
#include <seqmix/core/parallel.hpp>
#include <seqmix/core/simd.hpp>
#include <seqmix/core/tensor.hpp>

namespace seqmix::train {

// ---- pointwise functions and their derivatives ----------------------------------------------

template <class T>
inline T sigmoid(T x) {
  return x >= T(0) ? T(1) / (T(1) + std::exp(-x)) : std::exp(x) / (T(1) + std::exp(x));
}
template <class T>
inline T silu(T x) {
  return x * sigmoid(x);
}
/// d silu / dx
template <class T>
inline T silu_grad(T x) {
  const T s = sigmoid(x);
  return s * (T(1) + x * (T(1) - s));
}
template <class T>
inline T logsigmoid(T x) {
  return std::min(x, T(0)) - std::log1p(std::exp(-std::abs(x)));
}
template <class T>
inline T softplus(T x) {
  return x > T(20) ? x : std::max(x, T(0)) + std::log1p(std::exp(-std::abs(x)));
}

/// Activation of short_conv.
enum class conv_act { none, silu };

namespace detail {

/// parallel_for over n independent items when the call touches at least 2^15 values in all
/// (`work`), serially below: a parallel region costs more than small blocks gain (and spinning
/// barriers on a shared machine cost far more). Results are the same either way.
template <class Body>
inline void for_rows(index_t n, index_t work, Body&& body) {
  if (work < (index_t{1} << 15)) {
    for (index_t i = 0; i < n; ++i) body(i);
  } else {
    parallel_for(n, std::forward<Body>(body));
  }
}

/// dst [C, R] = srcᵀ (src [R, C] and dst inner-contiguous), in 32×32 blocks.
template <class T>
inline void transpose_into(tensor_view<const T, 2> src, tensor_view<T, 2> dst) {
  const index_t R = src.extent(0), C = src.extent(1);
  const index_t ls = src.stride(0), ld = dst.stride(0);
  const T* sp = src.data();
  T* dp = dst.data();
  constexpr index_t bs = 32;
  const index_t nb = (C + bs - 1) / bs;
  for_rows(nb, R * C, [&](index_t cb) {
    const index_t c0 = cb * bs, c1 = std::min(C, c0 + bs);
    for (index_t r0 = 0; r0 < R; r0 += bs) {
      const index_t r1 = std::min(R, r0 + bs);
      for (index_t c = c0; c < c1; ++c)
        for (index_t r = r0; r < r1; ++r) dp[c * ld + r] = sp[r * ls + c];
    }
  });
}

/// Column sums of x [M, N] (inner-contiguous) added to out[0..N), in row order per column.
template <class T>
inline void add_column_sums(tensor_view<const T, 2> x, T* out) {
  const index_t M = x.extent(0), N = x.extent(1), ld = x.stride(0);
  constexpr index_t cb = 64;
  for_rows((N + cb - 1) / cb, M * N, [&](index_t blk) {
    const index_t j0 = blk * cb, j1 = std::min(N, j0 + cb);
    T acc[cb] = {};
    for (index_t i = 0; i < M; ++i) {
      const T* row = x.data() + i * ld;
      for (index_t j = j0; j < j1; ++j) acc[j - j0] += row[j];
    }
    for (index_t j = j0; j < j1; ++j) out[j] += acc[j - j0];
  });
}

template <class T>
inline tensor<T, 2> transposed(tensor_view<const T, 2> src) {
  tensor<T, 2> t({src.extent(1), src.extent(0)});
  transpose_into<T>(src, t.view());
  return t;
}

/// C[M, N] (+)= A[M, K] · B[N, K]ᵀ. A and C inner-contiguous rows for T != float.
template <class T>
inline void gemm_nt(tensor_view<const T, 2> a, tensor_view<const T, 2> b, tensor_view<T, 2> c,
                    bool accumulate) {
  const index_t M = a.extent(0), K = a.extent(1), N = b.extent(0);
  if (M == 0 || N == 0) return;
  if constexpr (std::is_same_v<T, float>) {
    linalg::matmul_options opt;
    opt.accumulate = accumulate;
    linalg::matmul(a, b, c, opt);
  } else {
    std::vector<T> pack;
    linalg::gemm<T, false, true>(M, N, K, a.data(), a.stride(0), b.data(), b.stride(0), c.data(),
                                 c.stride(0), accumulate, pack);
  }
}

/// Every token id in [0, V), else a shape_error naming `ids`, the id and its position.
inline void check_ids(const checker& check, std::span<const std::int32_t> ids, index_t V) {
  for (std::size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= V) {
      check.fail("ids", "expected ids in [0, " + std::to_string(V) + "), got " +
                            std::to_string(ids[i]) + " at " + std::to_string(i));
    }
  }
}

}  // namespace detail

// ---- embedding -------------------------------------------------------------------------------

/// y[i, :] = table[ids[i], :]. table: [V, D] in; ids: [M] token ids in [0, V); y: [M, D] out.
template <class T>
void embedding_forward(tensor_view<const T, 2> table, std::span<const std::int32_t> ids,
                       tensor_view<T, 2> y) {
  const checker check{"train::embedding_forward"};
  const index_t V = table.extent(0), D = table.extent(1), M = static_cast<index_t>(ids.size());
  check.shape("y", y, {M, D});
  detail::check_ids(check, ids, V);
  detail::for_rows(M, M * D, [&](index_t i) {
    const index_t id = ids[static_cast<std::size_t>(i)];
    for (index_t d = 0; d < D; ++d) y(i, d) = table(id, d);
  });
}

/// dtable[ids[i], :] += dy[i, :] (scatter-add, in token order). dtable: [V, D] in/out.
template <class T>
void embedding_backward(std::span<const std::int32_t> ids, tensor_view<const T, 2> dy,
                        tensor_view<T, 2> dtable) {
  const checker check{"train::embedding_backward"};
  const index_t V = dtable.extent(0), D = dtable.extent(1), M = static_cast<index_t>(ids.size());
  check.shape("dy", dy, {M, D});
  detail::check_ids(check, ids, V);
  // columns in parallel, tokens in order: the same sums for any thread count
  constexpr index_t cb = 16;
  detail::for_rows((D + cb - 1) / cb, M * D, [&](index_t blk) {
    const index_t d0 = blk * cb, d1 = std::min(D, d0 + cb);
    for (index_t i = 0; i < M; ++i) {
      const index_t id = ids[static_cast<std::size_t>(i)];
      for (index_t d = d0; d < d1; ++d) dtable(id, d) += dy(i, d);
    }
  });
}

// ---- linear ----------------------------------------------------------------------------------

/// y = x Wᵀ (+ bias). x: [M, K]; w: [N, K] (nn.Linear layout); bias: [N] or empty; y: [M, N].
template <class T>
void linear_forward(tensor_view<const T, 2> x, tensor_view<const T, 2> w, tensor_view<T, 2> y,
                    tensor_view<const T, 1> bias = {}) {
  const checker check{"train::linear_forward"};
  const index_t M = x.extent(0), K = x.extent(1), N = w.extent(0);
  check.shape("w", w, {N, K});
  check.shape("y", y, {M, N});
  if (bias.data()) check.shape("bias", bias, {N});
  check.inner_contiguous("x", x);
  check.inner_contiguous("w", w);
  check.inner_contiguous("y", y);
  detail::gemm_nt<T>(x, w, y, false);
  if (bias.data()) {
    detail::for_rows(M, M * N, [&](index_t i) {
      for (index_t j = 0; j < N; ++j) y(i, j) += bias(j);
    });
  }
}

/// Backward of linear_forward. dy: [M, N] in; dx: [M, K] out (written, or added to with
/// accumulate_dx; empty: skipped); dw: [N, K] += dyᵀ x (empty: skipped); dbias: [N] += Σ dy.
template <class T>
void linear_backward(tensor_view<const T, 2> x, tensor_view<const T, 2> w,
                     tensor_view<const T, 2> dy, tensor_view<T, 2> dx, tensor_view<T, 2> dw,
                     tensor_view<T, 1> dbias = {}, bool accumulate_dx = false) {
  const checker check{"train::linear_backward"};
  const index_t M = x.extent(0), K = x.extent(1), N = w.extent(0);
  check.shape("w", w, {N, K});
  check.shape("dy", dy, {M, N});
  if (dx.data()) check.shape("dx", dx, {M, K});
  if (dw.data()) check.shape("dw", dw, {N, K});
  if (dbias.data()) check.shape("dbias", dbias, {N});
  check.inner_contiguous("x", x);
  check.inner_contiguous("dy", dy);
  if (dx.data()) check.inner_contiguous("dx", dx);
  if (dw.data()) check.inner_contiguous("dw", dw);
  if (dx.data()) {
    const tensor<T, 2> wt = detail::transposed<T>(w);  // [K, N]
    detail::gemm_nt<T>(dy, wt.view(), dx, accumulate_dx);
  }
  if (dw.data() && M > 0) {
    const tensor<T, 2> dyt = detail::transposed<T>(dy);  // [N, M]
    const tensor<T, 2> xt = detail::transposed<T>(x);    // [K, M]
    detail::gemm_nt<T>(dyt.view(), xt.view(), dw, true);
  }
  if (dbias.data()) {
    check.inner_contiguous("dbias", dbias);
    detail::add_column_sums<T>(dy, dbias.data());
  }
}

// ---- rms_norm --------------------------------------------------------------------------------

/// y = x · (mean(x²) + eps)^-½ ⊙ w over each row. x, y: [M, D] (inner-contiguous); w: [D]
/// (contiguous); rstd: [M] out (the row's r, for the backward; empty: not stored).
template <class T>
void rms_norm_forward(tensor_view<const T, 2> x, tensor_view<const T, 1> w, tensor_view<T, 2> y,
                      T eps = T(1e-6), tensor_view<T, 1> rstd = {}) {
  const checker check{"train::rms_norm_forward"};
  const index_t M = x.extent(0), D = x.extent(1);
  check.shape("w", w, {D});
  check.shape("y", y, {M, D});
  if (rstd.data()) check.shape("rstd", rstd, {M});
  check.inner_contiguous("x", x);
  check.inner_contiguous("w", w);
  check.inner_contiguous("y", y);
  const T* wp = w.data();
  detail::for_rows(M, M * D, [&](index_t i) {
    const T* xr = x.data() + i * x.stride(0);
    T* yr = y.data() + i * y.stride(0);
    const T r = T(1) / std::sqrt(simd::dot(xr, xr, D) / static_cast<T>(D) + eps);
    if (rstd.data()) rstd(i) = r;
    for (index_t d = 0; d < D; ++d) yr[d] = xr[d] * r * wp[d];
  });
}

/// Backward of rms_norm_forward (r recomputed from x). dy: [M, D]; dx: [M, D] out (written,
/// or added with accumulate_dx: the residual stream's gradient); dw: [D] += Σ_i dy ⊙ x̂.
/// All inner-contiguous.
template <class T>
void rms_norm_backward(tensor_view<const T, 2> x, tensor_view<const T, 1> w,
                       tensor_view<const T, 2> dy, tensor_view<T, 2> dx, tensor_view<T, 1> dw,
                       T eps = T(1e-6), bool accumulate_dx = false) {
  const checker check{"train::rms_norm_backward"};
  const index_t M = x.extent(0), D = x.extent(1);
  check.shape("w", w, {D});
  check.shape("dy", dy, {M, D});
  check.shape("dx", dx, {M, D});
  if (dw.data()) check.shape("dw", dw, {D});
  check.inner_contiguous("x", x);
  check.inner_contiguous("w", w);
  check.inner_contiguous("dy", dy);
  check.inner_contiguous("dx", dx);
  if (dw.data()) check.inner_contiguous("dw", dw);
  const T* wp = w.data();
  std::vector<T> r(static_cast<std::size_t>(M));
  detail::for_rows(M, M * D, [&](index_t i) {
    const T* xr = x.data() + i * x.stride(0);
    const T* gr = dy.data() + i * dy.stride(0);
    T* dr = dx.data() + i * dx.stride(0);
    const T ri = T(1) / std::sqrt(simd::dot(xr, xr, D) / static_cast<T>(D) + eps);
    r[static_cast<std::size_t>(i)] = ri;
    T dot = T(0);  // Σ dx̂ ⊙ x̂
    for (index_t d = 0; d < D; ++d) dot += gr[d] * wp[d] * xr[d];
    const T c = dot * ri * ri / static_cast<T>(D);
    for (index_t d = 0; d < D; ++d) {
      const T g = ri * (gr[d] * wp[d] - xr[d] * c);
      dr[d] = accumulate_dx ? dr[d] + g : g;
    }
  });
  if (dw.data()) {
    constexpr index_t cb = 64;
    detail::for_rows((D + cb - 1) / cb, M * D, [&](index_t blk) {
      const index_t d0 = blk * cb, d1 = std::min(D, d0 + cb);
      T acc[cb] = {};
      for (index_t i = 0; i < M; ++i) {
        const T* xr = x.data() + i * x.stride(0);
        const T* gr = dy.data() + i * dy.stride(0);
        const T ri = r[static_cast<std::size_t>(i)];
        for (index_t d = d0; d < d1; ++d) acc[d - d0] += gr[d] * xr[d] * ri;
      }
      for (index_t d = d0; d < d1; ++d) dw(d) += acc[d - d0];
    });
  }
}

// ---- l2norm ----------------------------------------------------------------------------------

/// y = x · (Σ_group x² + eps)^-½ over consecutive groups of G elements of each row (G divides
/// D: per head). x, y: [M, D]; eps as fla's l2norm (1e-6).
template <class T>
void l2norm_forward(tensor_view<const T, 2> x, tensor_view<T, 2> y, index_t G, T eps = T(1e-6)) {
  const checker check{"train::l2norm_forward"};
  const index_t M = x.extent(0), D = x.extent(1);
  check.shape("y", y, {M, D});
  if (G <= 0 || D % G != 0)
    check.fail("G", "expected a divisor of " + std::to_string(D) + ", got " + std::to_string(G));
  detail::for_rows(M, M * D, [&](index_t i) {
    for (index_t g0 = 0; g0 < D; g0 += G) {
      T ss = T(0);
      for (index_t d = g0; d < g0 + G; ++d) ss += x(i, d) * x(i, d);
      const T r = T(1) / std::sqrt(ss + eps);
      for (index_t d = g0; d < g0 + G; ++d) y(i, d) = x(i, d) * r;
    }
  });
}

/// Backward of l2norm_forward: dx = r (dy - y (y·dy)) per group. dx: [M, D] out.
template <class T>
void l2norm_backward(tensor_view<const T, 2> x, tensor_view<const T, 2> dy, tensor_view<T, 2> dx,
                     index_t G, T eps = T(1e-6)) {
  const checker check{"train::l2norm_backward"};
  const index_t M = x.extent(0), D = x.extent(1);
  check.shape("dy", dy, {M, D});
  check.shape("dx", dx, {M, D});
  if (G <= 0 || D % G != 0)
    check.fail("G", "expected a divisor of " + std::to_string(D) + ", got " + std::to_string(G));
  detail::for_rows(M, M * D, [&](index_t i) {
    for (index_t g0 = 0; g0 < D; g0 += G) {
      T ss = T(0);
      for (index_t d = g0; d < g0 + G; ++d) ss += x(i, d) * x(i, d);
      const T r = T(1) / std::sqrt(ss + eps);
      T dot = T(0);  // y · dy
      for (index_t d = g0; d < g0 + G; ++d) dot += x(i, d) * r * dy(i, d);
      for (index_t d = g0; d < g0 + G; ++d) dx(i, d) = r * (dy(i, d) - x(i, d) * r * dot);
    }
  });
}

// ---- depthwise causal short convolution ------------------------------------------------------

namespace detail {

template <class T>
inline void check_conv(const checker& check, tensor_view<const T, 3> x, tensor_view<const T, 2> w) {
  const index_t C = x.extent(2);
  check.shape("w", w, {C, any_extent});
  if (w.extent(1) < 1)
    check.fail("w", "expected at least one tap, got " + std::to_string(w.extent(1)));
  check.inner_contiguous("x", x);
}

/// The taps transposed, wt[j·C + c] = w[c, j]: channels innermost for the vector loops.
template <class T>
inline std::vector<T> conv_taps(tensor_view<const T, 2> w) {
  const index_t C = w.extent(0), W = w.extent(1);
  std::vector<T> wt(static_cast<std::size_t>(W * C));
  for (index_t c = 0; c < C; ++c)
    for (index_t j = 0; j < W; ++j) wt[static_cast<std::size_t>(j * C + c)] = w(c, j);
  return wt;
}

/// z[c] = Σ_j wt[j, c] x[b, t - (W-1) + j, c] for every channel (zeros before t = 0).
template <class T>
inline void conv_row(tensor_view<const T, 3> x, const T* wt, index_t W, index_t b, index_t t,
                     T* z) {
  const index_t C = x.extent(2);
  std::fill_n(z, C, T(0));
  for (index_t j = std::max<index_t>(0, W - 1 - t); j < W; ++j) {
    const T* xr = x.data() + b * x.stride(0) + (t - (W - 1) + j) * x.stride(1);
    const T* wj = wt + j * C;
    for (index_t c = 0; c < C; ++c) z[c] += wj[c] * xr[c];
  }
}

}  // namespace detail

/// Depthwise causal conv over [B, T, C] (each sequence starts from zeros), then act.
/// w: [C, W] (Hugging Face [C, 1, W] squeezed: tap W-1 on the newest input); y: [B, T, C].
/// x and y inner-contiguous (any row strides: a column block of a fused projection).
template <class T>
void short_conv_forward(tensor_view<const T, 3> x, tensor_view<const T, 2> w, tensor_view<T, 3> y,
                        conv_act act = conv_act::silu) {
  const checker check{"train::short_conv_forward"};
  detail::check_conv(check, x, w);
  const index_t B = x.extent(0), TT = x.extent(1), C = x.extent(2), W = w.extent(1);
  check.shape("y", y, {B, TT, C});
  check.inner_contiguous("y", y);
  const std::vector<T> wt = detail::conv_taps(w);
  detail::for_rows(B * TT, B * TT * C * W, [&](index_t bt) {
    const index_t b = bt / TT, t = bt % TT;
    T* yr = y.data() + b * y.stride(0) + t * y.stride(1);
    detail::conv_row(x, wt.data(), W, b, t, yr);
    if (act == conv_act::silu) simd::silu(yr, yr, C);
  });
}

/// Backward of short_conv_forward (z recomputed). dy: [B, T, C]; dx: [B, T, C] out (written);
/// dw: [C, W] += (empty: skipped). Inner-contiguous.
template <class T>
void short_conv_backward(tensor_view<const T, 3> x, tensor_view<const T, 2> w,
                         tensor_view<const T, 3> dy, tensor_view<T, 3> dx, tensor_view<T, 2> dw,
                         conv_act act = conv_act::silu) {
  const checker check{"train::short_conv_backward"};
  detail::check_conv(check, x, w);
  const index_t B = x.extent(0), TT = x.extent(1), C = x.extent(2), W = w.extent(1);
  check.shape("dy", dy, {B, TT, C});
  check.shape("dx", dx, {B, TT, C});
  if (dw.data()) check.shape("dw", dw, {C, W});
  check.inner_contiguous("dy", dy);
  check.inner_contiguous("dx", dx);
  const std::vector<T> wt = detail::conv_taps(w);
  tensor<T, 3> dz({B, TT, C});  // dz = dy ⊙ act'(z)
  detail::for_rows(B * TT, B * TT * C * W, [&](index_t bt) {
    const index_t b = bt / TT, t = bt % TT;
    const T* g = dy.data() + b * dy.stride(0) + t * dy.stride(1);
    T* dzr = &dz(b, t, 0);
    if (act == conv_act::silu) {
      detail::conv_row(x, wt.data(), W, b, t, dzr);
      simd::transform(dzr, dzr, C, [](const simd::batch<T>& z) {
        const simd::batch<T> sg = simd::sigmoid(z), one(T(1));
        return sg * (one + z * (one - sg));
      });
      for (index_t c = 0; c < C; ++c) dzr[c] *= g[c];
    } else {
      std::copy_n(g, C, dzr);
    }
  });
  // dx[s] = Σ_j wt[j] ⊙ dz[s + (W-1) - j]
  detail::for_rows(B * TT, B * TT * C * W, [&](index_t bs) {
    const index_t b = bs / TT, s = bs % TT;
    T* dxr = dx.data() + b * dx.stride(0) + s * dx.stride(1);
    std::fill_n(dxr, C, T(0));
    for (index_t j = 0; j < W; ++j) {
      const index_t t = s + (W - 1) - j;
      if (t >= TT) continue;
      const T* dzr = &dz(b, t, 0);
      const T* wj = wt.data() + j * C;
      for (index_t c = 0; c < C; ++c) dxr[c] += wj[c] * dzr[c];
    }
  });
  if (dw.data()) {
    // dw[c, j] += Σ_{b,t} dz[b,t,c] x[b, t-(W-1)+j, c]: channel blocks in parallel, tokens in
    // order within a block (the same sums for any thread count)
    constexpr index_t cb = 64;
    detail::for_rows((C + cb - 1) / cb, B * TT * C * W, [&](index_t blk) {
      const index_t c0 = blk * cb, c1 = std::min(C, c0 + cb);
      std::vector<T> acc(static_cast<std::size_t>(W * cb), T(0));
      for (index_t b = 0; b < B; ++b) {
        for (index_t t = 0; t < TT; ++t) {
          const T* dzr = &dz(b, t, 0);
          for (index_t j = std::max<index_t>(0, W - 1 - t); j < W; ++j) {
            const T* xr = x.data() + b * x.stride(0) + (t - (W - 1) + j) * x.stride(1);
            T* a = acc.data() + j * cb - c0;
            for (index_t c = c0; c < c1; ++c) a[c] += dzr[c] * xr[c];
          }
        }
      }
      for (index_t c = c0; c < c1; ++c)
        for (index_t j = 0; j < W; ++j) dw(c, j) += acc[static_cast<std::size_t>(j * cb + c - c0)];
    });
  }
}

// ---- SwiGLU ----------------------------------------------------------------------------------

/// h = silu(a) ⊙ u. a, u, h: [M, F], inner-contiguous.
template <class T>
void swiglu_forward(tensor_view<const T, 2> a, tensor_view<const T, 2> u, tensor_view<T, 2> h) {
  const checker check{"train::swiglu_forward"};
  const index_t M = a.extent(0), F = a.extent(1);
  check.shape("u", u, {M, F});
  check.shape("h", h, {M, F});
  check.inner_contiguous("a", a);
  check.inner_contiguous("u", u);
  check.inner_contiguous("h", h);
  detail::for_rows(M, M * F, [&](index_t i) {
    const T* ar = a.data() + i * a.stride(0);
    const T* ur = u.data() + i * u.stride(0);
    T* hr = h.data() + i * h.stride(0);
    simd::silu(ar, hr, F);
    for (index_t f = 0; f < F; ++f) hr[f] *= ur[f];
  });
}

/// da = dh ⊙ u ⊙ silu'(a), du = dh ⊙ silu(a). da, du: [M, F] out. Inner-contiguous.
template <class T>
void swiglu_backward(tensor_view<const T, 2> a, tensor_view<const T, 2> u,
                     tensor_view<const T, 2> dh, tensor_view<T, 2> da, tensor_view<T, 2> du) {
  const checker check{"train::swiglu_backward"};
  const index_t M = a.extent(0), F = a.extent(1);
  check.shape("u", u, {M, F});
  check.shape("dh", dh, {M, F});
  check.shape("da", da, {M, F});
  check.shape("du", du, {M, F});
  check.inner_contiguous("a", a);
  check.inner_contiguous("u", u);
  check.inner_contiguous("dh", dh);
  check.inner_contiguous("da", da);
  check.inner_contiguous("du", du);
  using B = simd::batch<T>;
  constexpr index_t L = simd::lanes<T>;
  detail::for_rows(M, M * F, [&](index_t i) {
    const T* ar = a.data() + i * a.stride(0);
    const T* ur = u.data() + i * u.stride(0);
    const T* gr = dh.data() + i * dh.stride(0);
    T* dar = da.data() + i * da.stride(0);
    T* dur = du.data() + i * du.stride(0);
    index_t f = 0;
    const B one(T(1));
    for (; f + L <= F; f += L) {
      const B x = simd::load(ar + f), g = simd::load(gr + f), sg = simd::sigmoid(x);
      simd::store(dar + f, g * simd::load(ur + f) * sg * (one + x * (one - sg)));
      simd::store(dur + f, g * x * sg);
    }
    for (; f < F; ++f) {
      const T x = ar[f], g = gr[f];
      dar[f] = g * ur[f] * silu_grad(x);
      dur[f] = g * silu(x);
    }
  });
}

/// The activations of swiglu_mlp_forward the backward reuses: a = x W_gᵀ, u = x W_uᵀ,
/// h = silu(a) ⊙ u, each [M, F].
template <class T>
struct swiglu_mlp_cache {
  tensor<T, 2> a, u, h;
};

/// y = (silu(x W_gᵀ) ⊙ x W_uᵀ) W_dᵀ. x: [M, D]; w_gate, w_up: [F, D]; w_down: [D, F]; y: [M, D].
/// Cost 6·M·D·F FLOP; cache 3·M·F values (resized when needed).
template <class T>
void swiglu_mlp_forward(tensor_view<const T, 2> x, tensor_view<const T, 2> w_gate,
                        tensor_view<const T, 2> w_up, tensor_view<const T, 2> w_down,
                        tensor_view<T, 2> y, swiglu_mlp_cache<T>& cache) {
  const checker check{"train::swiglu_mlp_forward"};
  const index_t M = x.extent(0), D = x.extent(1), F = w_gate.extent(0);
  check.shape("w_gate", w_gate, {F, D});
  check.shape("w_up", w_up, {F, D});
  check.shape("w_down", w_down, {D, F});
  check.shape("y", y, {M, D});
  for (tensor<T, 2>* t : {&cache.a, &cache.u, &cache.h})
    if (t->extent(0) != M || t->extent(1) != F) *t = tensor<T, 2>({M, F});
  linear_forward<T>(x, w_gate, cache.a);
  linear_forward<T>(x, w_up, cache.u);
  swiglu_forward<T>(cache.a, cache.u, cache.h);
  linear_forward<T>(cache.h, w_down, y);
}

/// Backward of swiglu_mlp_forward (cache from that call). dx: [M, D] out (written, or added
/// with accumulate_dx); dw_gate, dw_up: [F, D] +=; dw_down: [D, F] +=.
template <class T>
void swiglu_mlp_backward(tensor_view<const T, 2> x, tensor_view<const T, 2> w_gate,
                         tensor_view<const T, 2> w_up, tensor_view<const T, 2> w_down,
                         const swiglu_mlp_cache<T>& cache, tensor_view<const T, 2> dy,
                         tensor_view<T, 2> dx, tensor_view<T, 2> dw_gate, tensor_view<T, 2> dw_up,
                         tensor_view<T, 2> dw_down, bool accumulate_dx = false) {
  const checker check{"train::swiglu_mlp_backward"};
  const index_t M = x.extent(0), D = x.extent(1), F = w_gate.extent(0);
  check.shape("w_gate", w_gate, {F, D});
  check.shape("w_up", w_up, {F, D});
  check.shape("w_down", w_down, {D, F});
  check.shape("cache.a", cache.a.view(), {M, F});
  check.shape("cache.u", cache.u.view(), {M, F});
  check.shape("cache.h", cache.h.view(), {M, F});
  check.shape("dy", dy, {M, D});
  check.shape("dx", dx, {M, D});
  tensor<T, 2> dh({M, F}), da({M, F}), du({M, F});
  linear_backward<T>(cache.h, w_down, dy, dh, dw_down);
  swiglu_backward<T>(cache.a, cache.u, dh, da, du);
  linear_backward<T>(x, w_gate, da, dx, dw_gate, {}, accumulate_dx);
  linear_backward<T>(x, w_up, du, dx, dw_up, {}, true);
}

// ---- softmax cross-entropy -------------------------------------------------------------------

namespace detail {
/// A grow-only row buffer per thread (the loss-only cross-entropy's exp row).
template <class T>
inline std::vector<T>& ce_buffer() {
  static thread_local std::vector<T> buffer;
  return buffer;
}
}  // namespace detail

/// What softmax_cross_entropy measured.
struct cross_entropy_result {
  double loss = 0;      ///< mean over the counted rows (0 when none)
  index_t count = 0;    ///< rows with a target >= 0
  index_t correct = 0;  ///< counted rows whose argmax (first maximum) is the target
};

/// Fused, stable softmax cross-entropy over the rows of logits [M, V] with targets [M] (a
/// negative target ignores its row). dlogits [M, V] (out; may be logits itself, same strides:
/// in place; empty: loss only) = (softmax - onehot) / count on counted rows, 0 on ignored ones.
/// Per-row losses are summed in double, in row order.
template <class T>
cross_entropy_result softmax_cross_entropy(tensor_view<const T, 2> logits,
                                           std::span<const std::int32_t> targets,
                                           tensor_view<T, 2> dlogits = {}) {
  const checker check{"train::softmax_cross_entropy"};
  const index_t M = logits.extent(0), V = logits.extent(1);
  if (static_cast<index_t>(targets.size()) != M) {
    check.fail("targets", "expected " + std::to_string(M) + " targets (rows of logits), got " +
                              std::to_string(targets.size()));
  }
  if (dlogits.data()) check.shape("dlogits", dlogits, {M, V});
  index_t count = 0;
  for (index_t i = 0; i < M; ++i) {
    const std::int32_t y = targets[static_cast<std::size_t>(i)];
    if (y >= V) {
      check.fail("targets", "expected targets < " + std::to_string(V) + " (or < 0: ignored), got " +
                                std::to_string(y) + " at " + std::to_string(i));
    }
    if (y >= 0) ++count;
  }
  std::vector<double> row_loss(static_cast<std::size_t>(M), 0.0);
  std::vector<char> row_ok(static_cast<std::size_t>(M), 0);
  const T inv = count > 0 ? T(1) / static_cast<T>(count) : T(0);
  check.inner_contiguous("logits", logits);
  if (dlogits.data()) check.inner_contiguous("dlogits", dlogits);
  detail::for_rows(M, M * V, [&](index_t i) {
    const std::int32_t y = targets[static_cast<std::size_t>(i)];
    T* dr = dlogits.data() ? dlogits.data() + i * dlogits.stride(0) : nullptr;
    if (y < 0) {
      if (dr) std::fill_n(dr, V, T(0));
      return;
    }
    const T* zr = logits.data() + i * logits.stride(0);
    // the first maximum (its index: the prediction)
    index_t arg = 0;
    for (index_t j = 1; j < V; ++j)
      if (zr[j] > zr[arg]) arg = j;
    const T mx = zr[arg];
    // e = exp(z - max) into dlogits' row (or this thread's buffer), then its sum
    T* e = dr;
    if (!e) {
      auto& buf = detail::ce_buffer<T>();
      buf.resize(static_cast<std::size_t>(V));
      e = buf.data();
    }
    const T zy = zr[y];
    simd::transform(zr, e, V, [&](const simd::batch<T>& z) { return simd::exp(z - mx); });
    const T sum = simd::sum(e, V);
    row_loss[static_cast<std::size_t>(i)] = static_cast<double>(mx + std::log(sum) - zy);
    row_ok[static_cast<std::size_t>(i)] = arg == y;
    if (dr) {
      simd::scale(dr, inv / sum, V);
      dr[y] -= inv;
    }
  });
  cross_entropy_result r;
  r.count = count;
  for (index_t i = 0; i < M; ++i) {
    r.loss += row_loss[static_cast<std::size_t>(i)];
    r.correct += row_ok[static_cast<std::size_t>(i)];
  }
  if (count > 0) r.loss /= static_cast<double>(count);
  return r;
}

}  // namespace seqmix::train
