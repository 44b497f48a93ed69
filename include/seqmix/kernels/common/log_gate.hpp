// SPDX-License-Identifier: MIT
// Log-gate numerics shared by the engines with multiplicative decays (kernels/gated_accumulation,
// kernels/delta_rule): one -inf convention and one set of cumulative-gate helpers for every
// family (docs/math.md §1). Everything here is a plain function of arrays: no tensor views, no
// allocation, no threads.
//
// Conventions. A log gate g multiplies a state by e^g, g in [-inf, 0] (growth g > 0 only where a
// front allows it). Values below kill_threshold<T> (-80 float, -700 double; -inf included) are a
// "kill": e^g is below the smallest normal number, so treating it as an exact 0 changes nothing
// representable and keeps -inf - -inf = NaN out of the arithmetic. Inside a chunk the cumulative
// gate of row i is a pair (value, epoch): the epoch counts the kills in rows 0..i, the value is
// the sum of the gates since the last kill (0 at a kill row), accumulated in double. Two rows
// a >= b combine to e^{G_a - G_b} when their epochs agree and to exactly 0 otherwise; the
// difference is formed in double before rounding to T, so a long chunk loses no precision.
//
// API (namespace seqmix::kernels::common; W = channels per row, n = entries):
//   kill_threshold<T>, factor_bound<T>           the kill threshold and the factored path's bound
//   gexp(batch) / gexp(in, out, n)               exp with arguments clamped at -1e4 (-inf -> 0)
//   epoch_t, rel_arg(va, ea, vb, eb)             one exponent of e^{G_a - G_b} (-inf across kills)
//   cumulate<T>(L, W, row, val, ep)              rows 0..L-1 of the chunk-local cumulative gate
//   rel_args / rel_args_row / local_args          vectorised exponents of G_a - G_b, W at a time
//   exp_diff<T>(n, a, b, out, mul)               e^{a - b}·mul, difference in double (split in
//                                                float into head + tail: as exact as a direct exp)
//   factorable<T>(L, K, sub, gv, ge, qs, kc, ref) whether a per-key chunk may factor its decays
//                                                through one reference row per sub-chunk
// Argument checks of log gates (finite or -inf, > 0 only with growth allowed) are the fronts'
// job: core/gate_check.hpp.
// Cost: every helper is O(entries) (factorable: one pass over the chunk's gates, q and k).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include <seqmix/core/error.hpp>
#include <seqmix/core/simd.hpp>
#include <seqmix/core/tensor.hpp>

namespace seqmix::kernels::common {

using simd::batch;

/// Log gates below this are treated as -inf ("forget everything"): exp of it is < 1e-34 (float)
/// or < 1e-304 (double), far below what the state's precision can see.
template <class T>
inline constexpr double kill_threshold = std::is_same_v<T, float> ? -80.0 : -700.0;

/// exp of log-gate arithmetic: arguments are first raised to -1e4 (exp is already 0 there in
/// float and double), so -inf sentinels and huge negative gates never reach the integer
/// conversion inside the vector exp (undefined for them in xsimd's double path).
template <class T>
#if defined(__GNUC__)
__attribute__((always_inline))
#endif
inline batch<T>
gexp(const batch<T>& x) {
  return xsimd::exp(xsimd::max(x, batch<T>(T(-1e4))));
}
template <class T>
void gexp(const T* in, T* out, index_t n) {
  simd::transform(in, out, n, [](const batch<T>& x) { return gexp<T>(x); });
}

// Epochs are small integers held in doubles, so the loops over (value, epoch) pairs vectorise
// without mixed-width lanes.
using epoch_t = double;

// Chunk-local cumulative gate: value (double) and epoch (number of kills so far in the chunk).
// Two positions a >= b combine to exp(val_a - val_b) in the same epoch, else 0.
template <class T>
inline T rel_arg(double va, epoch_t ea, double vb, epoch_t eb) {
  return ea == eb ? static_cast<T>(va - vb) : -std::numeric_limits<T>::infinity();
}

/// Cumulative chunk-local gates of rows 0..L-1, width W, from `row(i)` (a pointer to W log gates
/// of token i), with kills (gates below the threshold) starting a new epoch at value 0.
template <class T, class Row>
void cumulate(index_t L, index_t W, Row&& row, double* __restrict val, epoch_t* __restrict ep) {
  // The widening conversion has a loop of its own: fused with the all-double select below, the
  // mixed lane widths keep the compiler from vectorising either.
  constexpr index_t block = 256;
  alignas(64) double gd[block];
  constexpr double thr = kill_threshold<T>;
  for (index_t i = 0; i < L; ++i) {
    const T* __restrict g = row(i);
    for (index_t c0 = 0; c0 < W; c0 += block) {
      const index_t m = std::min(block, W - c0);
      for (index_t c = 0; c < m; ++c) gd[c] = static_cast<double>(g[c0 + c]);
      double* __restrict v = val + i * W + c0;
      epoch_t* __restrict e = ep + i * W + c0;
      if (i == 0) {
        for (index_t c = 0; c < m; ++c) {
          const bool kill = gd[c] < thr;
          v[c] = kill ? 0.0 : gd[c];
          e[c] = kill ? 1.0 : 0.0;
        }
      } else {
        const double* __restrict pv = v - W;
        const epoch_t* __restrict pe = e - W;
        for (index_t c = 0; c < m; ++c) {
          const bool kill = gd[c] < thr;
          v[c] = kill ? 0.0 : pv[c] + gd[c];
          e[c] = kill ? pe[c] + 1.0 : pe[c];
        }
      }
    }
  }
}

/// out[c] = exponent of e^{G_a - G_b} for n channels (-inf across a kill); b may be the chunk
/// start (vb = eb = nullptr: value 0, epoch 0).
template <class T>
void rel_args(index_t n, const double* __restrict va, const epoch_t* __restrict ea,
              const double* __restrict vb, const epoch_t* __restrict eb, T* __restrict out) {
  // Two simple loops per block (all-double select, then the narrowing conversion): each
  // vectorises on its own, the fused form does not (mixed lane widths).
  constexpr index_t block = 256;
  alignas(64) double tmp[block];
  const double ninf = -std::numeric_limits<double>::infinity();
  for (index_t c0 = 0; c0 < n; c0 += block) {
    const index_t m = std::min(block, n - c0);
    if (vb == nullptr) {
      for (index_t c = 0; c < m; ++c) tmp[c] = ea[c0 + c] == 0.0 ? va[c0 + c] : ninf;
    } else {
      for (index_t c = 0; c < m; ++c) {
        tmp[c] = ea[c0 + c] == eb[c0 + c] ? va[c0 + c] - vb[c0 + c] : ninf;
      }
    }
    for (index_t c = 0; c < m; ++c) out[c0 + c] = static_cast<T>(tmp[c]);
  }
}

/// out[j] = exponent of e^{G_a - G_j} for one position a against n positions j.
template <class T>
void rel_args_row(index_t n, double va, epoch_t ea, const double* __restrict vb,
                  const epoch_t* __restrict eb, T* __restrict out) {
  constexpr index_t block = 256;
  alignas(64) double tmp[block];
  const double ninf = -std::numeric_limits<double>::infinity();
  for (index_t c0 = 0; c0 < n; c0 += block) {
    const index_t m = std::min(block, n - c0);
    for (index_t c = 0; c < m; ++c) tmp[c] = ea == eb[c0 + c] ? va - vb[c0 + c] : ninf;
    for (index_t c = 0; c < m; ++c) out[c0 + c] = static_cast<T>(tmp[c]);
  }
}

/// Sub-chunk-local gates: loc = va - vb in the same epoch, else va (relative to the kill that
/// opened the epoch); lep = ea - eb. Blocks of two vectorisable loops, as rel_args.
template <class T>
void local_args(index_t n, const double* __restrict va, const epoch_t* __restrict ea,
                const double* __restrict vb, const epoch_t* __restrict eb, T* __restrict loc,
                T* __restrict lep) {
  constexpr index_t block = 256;
  alignas(64) double tmp[block];
  for (index_t c0 = 0; c0 < n; c0 += block) {
    const index_t m = std::min(block, n - c0);
    for (index_t c = 0; c < m; ++c) {
      tmp[c] = ea[c0 + c] == eb[c0 + c] ? va[c0 + c] - vb[c0 + c] : va[c0 + c];
    }
    for (index_t c = 0; c < m; ++c) loc[c0 + c] = static_cast<T>(tmp[c]);
    for (index_t c = 0; c < m; ++c) tmp[c] = ea[c0 + c] - eb[c0 + c];
    for (index_t c = 0; c < m; ++c) lep[c0 + c] = static_cast<T>(tmp[c]);
  }
}

/// e^{a - b} for n channels (b == nullptr: e^{a}), the difference formed in double. In float it
/// is split into a head and a tail, e^{hi}·(1 + lo): rounding the exponent itself to float would
/// cost a relative error of 2^-24·|a - b| in the result, the largest error of the factored path
/// below, whose exponents reach ±factor_bound.
template <class T>
void exp_diff(index_t n, const double* __restrict a, const double* __restrict b, T* __restrict out,
              const T* __restrict mul = nullptr) {
  constexpr index_t block = 256;
  alignas(64) double d[block];
  for (index_t c0 = 0; c0 < n; c0 += block) {
    const index_t m = std::min(block, n - c0);
    if (b != nullptr) {
      for (index_t c = 0; c < m; ++c) d[c] = a[c0 + c] - b[c0 + c];
    } else {
      for (index_t c = 0; c < m; ++c) d[c] = a[c0 + c];
    }
    if constexpr (std::is_same_v<T, double>) {
      gexp<T>(d, out + c0, m);
      if (mul != nullptr) {
        for (index_t c = 0; c < m; ++c) out[c0 + c] *= mul[c0 + c];
      }
    } else {
      using B = batch<T>;
      constexpr index_t VL = simd::lanes<T>;
      alignas(64) T hi[block], lo[block];
      for (index_t c = 0; c < m; ++c) hi[c] = static_cast<T>(d[c]);
      for (index_t c = 0; c < m; ++c) lo[c] = static_cast<T>(d[c] - static_cast<double>(hi[c]));
      index_t c = 0;
      for (; c + VL <= m; c += VL) {
        const B e = gexp<T>(simd::load(hi + c));
        B r = simd::fma(e, simd::load(lo + c), e);
        if (mul != nullptr) r *= simd::load(mul + c0 + c);
        simd::store(out + c0 + c, r);
      }
      if (c < m) {
        const index_t left = m - c;
        const B e = gexp<T>(simd::load_partial(hi + c, left));
        B r = simd::fma(e, simd::load_partial(lo + c, left), e);
        if (mul != nullptr) r *= simd::load_partial(mul + c0 + c, left);
        simd::store_partial(out + c0 + c, r, left);
      }
    }
  }
}

/// Largest decay, e^{factor_bound}, a sub-chunk may span for the factored per-key path: its k side
/// carries e^{G_r - G_j} <= e^{factor_bound} (1.1e13 in float, so |k| up to 1e25 stays finite; its
/// q side e^{G_i - G_r} >= e^{-factor_bound} stays a normal number for |q| >= 1e-25).
template <class T>
inline constexpr double factor_bound = std::is_same_v<T, float> ? 30.0 : 300.0;

/// Whether chunk rows 0..L-1 of per-key cumulative gates (gv, ge: [L, K]) may take the factored
/// path: no kill inside the chunk, no positive gate (so every factor but the in-sub-chunk k side
/// is <= 1), no sub-chunk of `sub` rows spanning more than factor_bound in any channel, and the
/// factors of the chunk's own q and k (qs, kc: [L, K]) inside their safe range: a sub-chunk
/// spanning a decay e^{span} scales its keys up to e^{span} (max|k|·e^{span} must stay finite
/// with room for the GEMM: below max/256) and its queries down to e^{-span} (every nonzero
/// |q|·e^{-span} must stay a normal number, else it loses precision as a subnormal). Outside it
/// the chunk takes the exact path (its factors are <= 1 and its diagonal blocks direct), so the
/// choice costs no accuracy: e.g. gk = -1.8 per token with |k| ~ 1e30 or |q| ~ 1e-30. The bounds
/// are one max/min-abs pass over q and k per chunk (2·L·K, against the L²·K of A). NaN in q or k
/// fails them too (the exact path then carries it, as the recurrent form does).
///
/// `ref` (optional, [L, K]) gives each sub-chunk's reference row: its decays are factored
/// through ref row r0 (the sub-chunk's first row) instead of gv row r0. The gated engine's
/// exclusive readout (RWKV-6) passes its query-side gates G_{i-1} here (docs/math.md §3): the
/// k side of a sub-chunk then spans ref_{r0} - G_{r1-1} = G_{r0-1} - G_{r1-1}, one gate more
/// than the inclusive span, and the bounds below are checked on that span.
template <class T>
bool factorable(index_t L, index_t K, index_t sub, const double* __restrict gv,
                const epoch_t* __restrict ge, const T* __restrict qs, const T* __restrict kc,
                const double* __restrict ref = nullptr) {
  int bad = 0;
  const epoch_t* last = ge + (L - 1) * K;  // epochs never decrease: the last row has them all
  for (index_t c = 0; c < K; ++c) bad |= last[c] != 0.0;
  for (index_t i = 1; i < L; ++i) {
    const double* g = gv + i * K;
    for (index_t c = 0; c < K; ++c) bad |= g[c] > g[c - K];
  }
  if (bad != 0) return false;
  const T inf = std::numeric_limits<T>::infinity();
  for (index_t r0 = 0; r0 < L; r0 += sub) {
    const index_t r1 = std::min(L, r0 + sub);
    const double* first = (ref != nullptr ? ref : gv) + r0 * K;
    const double* end = gv + (r1 - 1) * K;
    double span = 0;
    for (index_t c = 0; c < K; ++c) span = std::max(span, first[c] - end[c]);
    if (!(span <= factor_bound<T>)) return false;
    // max |k| and min nonzero |q| over the sub-chunk's rows (contiguous): one vector pass, NaN
    // counted apart (it fails the bounds); zeros of q are exact on any path
    using B = batch<T>;
    constexpr index_t VL = simd::lanes<T>;
    const T* kk = kc + r0 * K;
    const T* qq = qs + r0 * K;
    const index_t n = (r1 - r0) * K;
    B kv(T(0)), qv(inf);
    auto nan = xsimd::batch_bool<T>(false);
    index_t e = 0;
    for (; e + VL <= n; e += VL) {
      const B ka = xsimd::abs(simd::load(kk + e)), qa = xsimd::abs(simd::load(qq + e));
      nan = nan || xsimd::isnan(ka) || xsimd::isnan(qa);
      kv = xsimd::max(kv, ka);
      qv = xsimd::min(qv, xsimd::select(qa == B(T(0)), B(inf), qa));
    }
    if (xsimd::any(nan)) return false;
    alignas(64) T kb[static_cast<std::size_t>(VL)], qb[static_cast<std::size_t>(VL)];
    kv.store_aligned(kb);
    qv.store_aligned(qb);
    T kmax = 0, qmin = inf;
    for (index_t c = 0; c < VL; ++c) kmax = std::max(kmax, kb[c]), qmin = std::min(qmin, qb[c]);
    for (; e < n; ++e) {
      const T ka = std::abs(kk[e]), qa = std::abs(qq[e]);
      if (std::isnan(ka) || std::isnan(qa)) return false;
      kmax = std::max(kmax, ka);
      if (qa != T(0)) qmin = std::min(qmin, qa);
    }
    const double grow = std::exp(span);
    if (!(static_cast<double>(kmax) * grow <=
          static_cast<double>(std::numeric_limits<T>::max()) / 256))
      return false;
    if (!(static_cast<double>(qmin) / grow >= static_cast<double>(std::numeric_limits<T>::min())))
      return false;
  }
  return true;
}

}  // namespace seqmix::kernels::common
