// SPDX-License-Identifier: MIT
// The gated-accumulation engine (docs/math.md §1): one chunk pipeline and one recurrent sweep for
// linear attention, simple GLA, retention, Lightning, GLA, RWKV-6 and Mamba2 SSD. The mixers in
// include/seqmix/mixers/ are thin fronts: they check shapes and pick a gate policy.
//
//   S_t = Diag(exp(gk_t)) · exp(g_t) · S_{t-1} · Diag(exp(gv_t)) + (c_t k_t) v_tᵀ
//   o_t = S_tᵀ (s q_t)            (optionally divided by s q_t · z_t + 1e-10, z_t = a_t z_{t-1} +
//   c_t k_t)
//
// Dimensions: B batch, T tokens, H heads of v/o/state, Hk heads of q/k (H % Hk == 0: head h
// reads q/k head h / (H / Hk), Mamba2's groups), K key size (Mamba2's N), V value size (P),
// C chunk length, N packed sequences (varlen). c_t is a per-token key scale (Mamba2's dt, else 1).
//
// Gate policies (compile-time): no_gate, scalar_gate (g [B,T,H]), constant_gate (g_gamma [H]),
// key_gate (gk [B,T,H,K] and optional gv [B,T,H,V]); a front may add its own (mamba2_ssd.hpp).
// Readout policies (compile-time, a gate policy's member `readout`, with_readout<Gate, R>):
// inclusive (the o_t above, by default) or bonus_readout (RWKV-6, per-key gates without gv):
//   o_t = (S_{t-1} + Diag(u) c_t k_t v_tᵀ)ᵀ (s q_t), read before the write, u: [H, K].
// The recurrent sweep reads each state row before its update and adds (s q_t · (u ⊙ c_t k_t)) v_t.
// The chunked form uses the exclusive cumulative gate Ĝ_i = G_{i-1} on the query side (the same
// array shifted by one row behind a zero row), a strictly lower A with the bonus on its diagonal,
// and factors each sub-chunk through the row before it; the bounds (every exact-path exponent
// <= 0, the factored k side <= e^{span} with span a sum of 16 gates, checked by factorable())
// are proved in docs/math.md §3.
//
// Forms and cost per (sequence, head), T tokens:
// - recurrent: a column tile of S (up to 8 vectors wide, <= 128 KiB) swept over the tokens with
//   the state row tile, v and o tiles in registers; 5·K·V FLOP per token (4·K·V ungated), no
//   allocation at all. A thread's heads take turns over blocks of 64 tokens, so the rows of a
//   token (all heads share one page of the [T, H, D] layout) are read once from memory.
// - chunked: per chunk of C tokens, A = (sQ Kᵀ) ⊙ D (C×C), O = A·V + (sQ ⊙ e^G)·S,
//   S ← e^{G_C} S + (K ⊙ e^{G_C - G})ᵀ V; 2C(K+V) + 4KV FLOP per token, on core/gemm.hpp's
//   register-blocked kernel. Each chunk is a local phase (everything but the state: A·V, the
//   state update U, the decays), the inter term Q̃·S_n and the scan S_{n+1} = D S_n + U. With at
//   least as many (sequence, head) items as threads a thread's items take turns chunk by chunk;
//   with fewer, the local phases and inter terms of all chunks run in parallel around a
//   sequential scan (chunk_windows), so B = 1 with few heads still uses every thread. Both
//   schedules run the same per-chunk code: results are bitwise equal for any thread count.
//   The two schedules are kernels/common/chunk_schedule.hpp's (shared with the delta engine).
//   Extra memory O(C·(C+K+V) + K·V) per thread plus K·V per item, independent of T, taken
//   from the workspace arena (core/workspace.hpp): a repeated shape allocates nothing.
// Which is faster depends on the machine and the head size, hardly on T (both are O(T)): on the
// 2-core AVX-512 dev machine the recurrent form wins at every T and shape measured, on a 16-core
// Xeon the chunked form wins at K = V = 128. The fronts' forward() follows options::switch_over_t
// (default: recurrent), which seqmix/tune.hpp measures for the machine at hand.
//
// Numerics (docs/math.md §1; the helpers are kernels/common/log_gate.hpp's): cumulative gates are
// chunk-local and accumulated in double, every exponential has an argument <= 0 when gates are <=
// 0, and differences are formed in double before rounding to T, so no precision is lost to a large
// cumulative sum. A log gate below kill_threshold<T> (including -inf) is "forget everything": exp
// of it is below the smallest normal float (double), so treating it as an exact zero changes
// nothing representable and keeps -inf - -inf out of the arithmetic. Per-key gates use sub-chunks
// of 16 rows and two paths:
// - factored (factorable(): no kill and no positive gate in the chunk, no sub-chunk spanning a
//   decay above e^{factor_bound}, 30 in float, and the chunk's |k|·e^{span} and |q|·e^{-span}
//   inside float's range, one max/min-abs pass): every A entry goes through the first row r of its
//   query's sub-chunk, exp(G_i - G_r)·exp(G_r - G_j); the k side exceeds 1 only inside the
//   sub-chunk, by at most e^{factor_bound}. Exponents are formed in double and split into a float
//   head and tail, so the factors are as exact as a direct exp. Trained GLA layers
//   (gk = logsigmoid(x)/16) always take this path: each A row block is one GEMM.
// - exact (strong gates, kills): blocks below the diagonal are factored the same way with both
//   factors <= 1; the 16×16 diagonal blocks are computed pair by pair from sub-chunk-local sums
//   (at most 16 gates, each above the kill threshold), 16·K/2 exponentials per token.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <new>
#include <span>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include <seqmix/core/error.hpp>
#include <seqmix/core/gemm.hpp>
#include <seqmix/core/parallel.hpp>
#include <seqmix/core/simd.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/kernels/common/chunk_schedule.hpp>
#include <seqmix/kernels/common/log_gate.hpp>
#include <seqmix/kernels/common/scratch.hpp>

namespace seqmix::kernels::gated {

// The -inf convention and the cumulative-gate numerics live in kernels/common/log_gate.hpp.
using common::kill_threshold;

// ---- gate policies ---------------------------------------------------------------------------
// A policy answers, per (b, t, h): the scalar log gate (log_gate) or the per-key row (key_gate,
// K values) and optionally a per-value row (value_gate), and a key scale (k_scale).

/// No decay (linear attention).
template <class T>
struct no_gate {
  static constexpr bool has_gate = false, per_key = false, scales_k = false;
  T log_gate(index_t, index_t, index_t) const { return T(0); }
  T k_scale(index_t, index_t, index_t) const { return T(1); }
  bool has_value_gate() const { return false; }
};

/// Data-dependent scalar gate g: [B,T,H] (simple GLA).
template <class T>
struct scalar_gate {
  static constexpr bool has_gate = true, per_key = false, scales_k = false;
  tensor_view<const T, 3> g;  // [B,T,H]
  T log_gate(index_t b, index_t t, index_t h) const { return g(b, t, h); }
  T k_scale(index_t, index_t, index_t) const { return T(1); }
  bool has_value_gate() const { return false; }
};

/// Constant per-head gate g_gamma: [H] (retention, Lightning).
template <class T>
struct constant_gate {
  static constexpr bool has_gate = true, per_key = false, scales_k = false;
  tensor_view<const T, 1> g_gamma;  // [H]
  T log_gate(index_t, index_t, index_t h) const { return g_gamma(h); }
  T k_scale(index_t, index_t, index_t) const { return T(1); }
  bool has_value_gate() const { return false; }
};

/// Per-key gate gk: [B,T,H,K] and optional per-value gate gv: [B,T,H,V] (GLA).
template <class T>
struct key_gate {
  static constexpr bool has_gate = true, per_key = true, scales_k = false;
  tensor_view<const T, 4> gk;  // [B,T,H,K]
  tensor_view<const T, 4> gv;  // [B,T,H,V] or empty
  const T* key_gate_row(index_t b, index_t t, index_t h) const { return gk.ptr({b, t, h, 0}); }
  const T* value_gate_row(index_t b, index_t t, index_t h) const { return gv.ptr({b, t, h, 0}); }
  T k_scale(index_t, index_t, index_t) const { return T(1); }
  bool has_value_gate() const { return gv.data() != nullptr && gv.size() > 0; }
};

// ---- readout policies ------------------------------------------------------------------------
// Where a token reads the state. A gate policy carries one as a member `readout` (with_readout
// below); without one the readout is inclusive.

/// o_t = S_tᵀ (s q_t): the read after the write of token t (every mixer but RWKV-6).
struct inclusive_readout {
  static constexpr bool exclusive = false;
};

/// RWKV-6: o_t = (S_{t-1} + Diag(u) k_t v_tᵀ)ᵀ (s q_t) = S_{t-1}ᵀ (s q_t) + (s q_t · (u ⊙ c_t
/// k_t)) v_t, the read before the write plus the current token weighted by the bonus u: [H, K].
/// Per-key gates without gv only (the fronts guarantee it; the chunked bounds are docs/math.md
/// §3's).
template <class T>
struct bonus_readout {
  static constexpr bool exclusive = true;
  tensor_view<const T, 2> u;  // [H, K]
  const T* row(index_t h) const { return u.ptr({h, 0}); }
};

/// A gate policy with a readout policy: Gate's members, plus `readout`.
template <class Gate, class Readout>
struct with_readout : Gate {
  Readout readout;
};

/// Whether a gate policy reads out before the write (exclusive) and adds a bonus term.
template <class Gate>
inline constexpr bool exclusive_readout = [] {
  if constexpr (requires { Gate::readout; }) {
    return decltype(Gate::readout)::exclusive;
  } else {
    return false;
  }
}();

// ---- the problem -----------------------------------------------------------------------------

/// One call of the engine. Views are validated by the fronts (validate() below).
template <class T>
struct problem {
  tensor_view<const T, 4> q, k;  // [B,T,Hk,K]
  tensor_view<const T, 4> v;     // [B,T,H,V]
  tensor_view<T, 4> o;           // [B,T,H,V] out
  tensor_view<T, 4> state;       // [N,H,K,V] in S_0, out S_T
  tensor_view<T, 3> z;           // [N,H,K] normaliser state, or empty
  T scale = T(1);
  std::span<const index_t> cu_seqlens;  // empty: N = B sequences of length T

  index_t heads() const { return v.extent(2); }
  index_t group() const { return v.extent(2) / q.extent(2); }
  index_t sequences() const {
    return cu_seqlens.empty() ? q.extent(0) : static_cast<index_t>(cu_seqlens.size()) - 1;
  }
  bool normalised() const { return z.data() != nullptr && z.size() > 0; }
};

/// Token range [t0, t1) of batch row b, whose state row is n.
struct segment {
  index_t b, t0, t1, n;
};

template <class T>
segment segment_of(const problem<T>& p, index_t n) {
  if (p.cu_seqlens.empty()) return {n, 0, p.q.extent(1), n};
  const auto u = static_cast<std::size_t>(n);
  return {0, p.cu_seqlens[u], p.cu_seqlens[u + 1], n};
}

/// Shape checks shared by every front. q, k: [B,T,Hk,K]; v, o: [B,T,H,V]; state: [N,H,K,V].
template <class T>
void validate(const checker& check, const problem<T>& p, index_t chunk_size) {
  check.nonempty("q", p.q);
  const index_t B = p.q.extent(0), TT = p.q.extent(1), Hk = p.q.extent(2), K = p.q.extent(3);
  check.shape("k", p.k, {B, TT, Hk, K});
  check.nonempty("v", p.v);
  const index_t H = p.v.extent(2), V = p.v.extent(3);
  check.shape("v", p.v, {B, TT, any_extent, any_extent});
  // messages are built only on failure: `step` must not allocate
  if (H % Hk != 0) {
    check.fail("v", "heads of v (" + std::to_string(H) +
                        ") must be a multiple of the heads of q/k (" + std::to_string(Hk) + ")");
  }
  check.shape("o", p.o, {B, TT, H, V});
  if (chunk_size <= 0) check.fail("chunk_size", "must be > 0, got " + std::to_string(chunk_size));
  const index_t N = p.cu_seqlens.empty() ? B : check.cu_seqlens(p.cu_seqlens, B, TT);
  check.shape("state", p.state, {N, H, K, V});
  if (p.normalised()) check.shape("z", p.z, {N, H, K});
  check.inner_contiguous("q", p.q);
  check.inner_contiguous("k", p.k);
  check.inner_contiguous("v", p.v);
  check.inner_contiguous("o", p.o);
  check.inner_contiguous("state", p.state);
  if (p.normalised()) check.inner_contiguous("z", p.z);
}

namespace detail {

using simd::batch;

using common::cumulate;
using common::epoch_t;
using common::exp_diff;
using common::factor_bound;
using common::factorable;
using common::gexp;
using common::local_args;
using common::rel_arg;
using common::rel_args;
using common::rel_args_row;
using linalg::gemm;

// ---- recurrent ------------------------------------------------------------------------------

/// Σ_c a_c b_c d_c (the exclusive readout's bonus weight), one vector accumulator: a scalar
/// loop would be a chain of K dependent FMAs per token.
template <class T>
inline T dot3(const T* a, const T* b, const T* d, index_t n) {
  constexpr index_t VL = simd::lanes<T>;
  batch<T> acc(T(0));
  index_t c = 0;
  for (; c + VL <= n; c += VL) {
    acc = simd::fma(simd::load(a + c) * simd::load(b + c), simd::load(d + c), acc);
  }
  T s = simd::reduce_sum(acc);
  for (; c < n; ++c) s = std::fma(a[c] * b[c], d[c], s);
  return s;
}

/// Prefetches n elements from p into cache (rows of the next tokens: the head-major sweep walks
/// the [T, H, D] layout with a stride of H·D, a new page per token, which hardware prefetchers
/// do not follow).
template <class T>
inline void prefetch(const T* p, index_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  const index_t bytes = n * static_cast<index_t>(sizeof(T));
  for (index_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off);
}

/// Processes tokens [t0, t1) of one (sequence, head) for state columns [j0, j0 + NV·L):
/// the tile of S stays in L1 across tokens, the row tile and v/o tiles in registers.
template <class T, class Gate, std::size_t NV>
void recurrent_tile(const problem<T>& p, const Gate& gate, const segment& sg, index_t h, T* S,
                    index_t lds, index_t j0) {
  constexpr index_t L = simd::lanes<T>;
  using B = batch<T>;
  const index_t K = p.q.extent(3), hk = h / p.group();
  const bool has_gv = gate.has_value_gate();
  constexpr std::size_t UL = static_cast<std::size_t>(L);
  constexpr bool excl = exclusive_readout<Gate>;
  static_assert(!excl || Gate::per_key, "the exclusive readout is defined for per-key gates");
  alignas(64) T dec[8 * UL];  // decays of up to 8 vectors of rows
  for (index_t t = sg.t0; t < sg.t1; ++t) {
    const T* q = p.q.ptr({sg.b, t, hk, 0});  // [K]
    const T* k = p.k.ptr({sg.b, t, hk, 0});  // [K]
    const T* v = p.v.ptr({sg.b, t, h, j0});  // [NV·L] tile of v_t
    T* o = p.o.ptr({sg.b, t, h, j0});        // [NV·L] tile of o_t
    if (t + 2 < sg.t1) {
      prefetch(p.q.ptr({sg.b, t + 2, hk, 0}), K);
      prefetch(p.k.ptr({sg.b, t + 2, hk, 0}), K);
      prefetch(p.v.ptr({sg.b, t + 2, h, j0}), static_cast<index_t>(NV) * L);
      if constexpr (Gate::per_key) {
        prefetch(gate.key_gate_row(sg.b, t + 2, h), K);
        if (has_gv)
          prefetch(gate.value_gate_row(sg.b, t + 2, h) + j0, static_cast<index_t>(NV) * L);
      }
    }
    const T ks = Gate::scales_k ? gate.k_scale(sg.b, t, h) : T(1);
    T a = T(1);
    if constexpr (Gate::has_gate && !Gate::per_key) a = std::exp(gate.log_gate(sg.b, t, h));
    // exclusive readout: the bonus weight q_t · (u ⊙ k_t) (s is applied at the store)
    T beta = T(0);
    if constexpr (excl) {
      const T* u = gate.readout.row(h);
      beta = dot3<T>(q, u, k, K);
    }
    // c_t v_t is folded into the v tile and s into the output, so each state row needs only
    // two broadcasts straight from memory (k_i, q_i) besides its decay
    const B ksb(ks);
    B vv[NV], oo[NV], bb[NV];
    for (std::size_t u = 0; u < NV; ++u) {
      vv[u] = ksb * simd::load(v + u * UL);
      oo[u] = B(T(0));
      bb[u] = B(T(1));
    }
    if constexpr (Gate::per_key) {
      if (has_gv) {
        const T* gv = gate.value_gate_row(sg.b, t, h) + j0;
        for (std::size_t u = 0; u < NV; ++u) bb[u] = gexp<T>(simd::load(gv + u * UL));
      }
    }
    const T* gk = nullptr;
    if constexpr (Gate::per_key) gk = gate.key_gate_row(sg.b, t, h);
    for (index_t i0 = 0; i0 < K; i0 += 8 * L) {
      const index_t rows = std::min(8 * L, K - i0);
      if constexpr (Gate::per_key) {
        // decays of up to 8·L state rows: independent vector exps that pipeline, exp(-inf) = 0
        for (index_t r = 0; r < rows; r += L) {
          const B e = rows - r >= L ? gexp<T>(simd::load(gk + i0 + r))
                                    : gexp<T>(simd::load_partial(gk + i0 + r, rows - r));
          e.store_aligned(dec + r);
        }
      }
      for (index_t ii = 0; ii < rows; ++ii) {
        const index_t i = i0 + ii;
        T* row = S + i * lds + j0;
        const B kb(k[i]), qb(q[i]);
        if constexpr (Gate::per_key) {
          const B ab(dec[static_cast<std::size_t>(ii)]);
          if (has_gv) {
            for (std::size_t u = 0; u < NV; ++u) {
              const B old = simd::load(row + u * UL);
              B s = old * (ab * bb[u]);
              s = simd::fma(kb, vv[u], s);
              simd::store(row + u * UL, s);
              if constexpr (excl) {
                oo[u] = simd::fma(qb, old, oo[u]);  // read before the write
              } else {
                oo[u] = simd::fma(qb, s, oo[u]);
              }
            }
          } else {
            for (std::size_t u = 0; u < NV; ++u) {
              const B old = simd::load(row + u * UL);
              B s = simd::fma(kb, vv[u], old * ab);
              simd::store(row + u * UL, s);
              if constexpr (excl) {
                oo[u] = simd::fma(qb, old, oo[u]);  // read before the write
              } else {
                oo[u] = simd::fma(qb, s, oo[u]);
              }
            }
          }
        } else if constexpr (Gate::has_gate) {
          const B ab(a);
          for (std::size_t u = 0; u < NV; ++u) {
            B s = simd::fma(kb, vv[u], simd::load(row + u * UL) * ab);
            simd::store(row + u * UL, s);
            oo[u] = simd::fma(qb, s, oo[u]);
          }
        } else {
          for (std::size_t u = 0; u < NV; ++u) {
            B s = simd::fma(kb, vv[u], simd::load(row + u * UL));
            simd::store(row + u * UL, s);
            oo[u] = simd::fma(qb, s, oo[u]);
          }
        }
      }
    }
    const B sb(p.scale);
    if constexpr (excl) {
      const B betab(beta);
      for (std::size_t u = 0; u < NV; ++u) {
        simd::store(o + u * UL, sb * simd::fma(betab, vv[u], oo[u]));
      }
    } else {
      for (std::size_t u = 0; u < NV; ++u) simd::store(o + u * UL, sb * oo[u]);
    }
  }
}

/// Columns [j0, V) (fewer than one vector) of one (sequence, head): plain scalar loop.
template <class T, class Gate>
void recurrent_tail(const problem<T>& p, const Gate& gate, const segment& sg, index_t h, T* S,
                    index_t lds, index_t j0) {
  const index_t K = p.q.extent(3), V = p.v.extent(3), hk = h / p.group();
  const bool has_gv = gate.has_value_gate();
  for (index_t t = sg.t0; t < sg.t1; ++t) {
    const T* q = p.q.ptr({sg.b, t, hk, 0});
    const T* k = p.k.ptr({sg.b, t, hk, 0});
    const T* v = p.v.ptr({sg.b, t, h, 0});
    T* o = p.o.ptr({sg.b, t, h, 0});
    const T ks = Gate::scales_k ? gate.k_scale(sg.b, t, h) : T(1);
    T a = T(1);
    if constexpr (Gate::has_gate && !Gate::per_key) a = std::exp(gate.log_gate(sg.b, t, h));
    for (index_t j = j0; j < V; ++j) o[j] = T(0);
    if constexpr (exclusive_readout<Gate>) {
      // bonus term first, (s q_t · (u ⊙ c_t k_t)) v_t; the state terms read S_{t-1} below
      const T* u = gate.readout.row(h);
      T beta = T(0);
      for (index_t i = 0; i < K; ++i) beta = std::fma(p.scale * q[i] * u[i], ks * k[i], beta);
      for (index_t j = j0; j < V; ++j) o[j] = beta * v[j];
    }
    for (index_t i = 0; i < K; ++i) {
      T ai = a;
      if constexpr (Gate::per_key) ai = std::exp(gate.key_gate_row(sg.b, t, h)[i]);
      const T kk = ks * k[i], qq = p.scale * q[i];
      for (index_t j = j0; j < V; ++j) {
        T aij = ai;
        if constexpr (Gate::per_key) {
          if (has_gv) aij = ai * std::exp(gate.value_gate_row(sg.b, t, h)[j]);
        }
        T& s = S[i * lds + j];
        if constexpr (exclusive_readout<Gate>) o[j] = std::fma(qq, s, o[j]);  // before the write
        s = std::fma(kk, v[j], s * aij);
        if constexpr (!exclusive_readout<Gate>) o[j] = std::fma(qq, s, o[j]);
      }
    }
  }
}

/// Normaliser pass (linear attention): z_t = a_t z_{t-1} + c_t k_t, o_t /= s q_t · z_t + 1e-10.
/// Runs after the numerator pass of either form; O(T·(K + V)) per (sequence, head).
template <class T, class Gate>
void normaliser_pass(const problem<T>& p, const Gate& gate, const segment& sg, index_t h) {
  static_assert(!Gate::per_key, "the normaliser is defined for scalar gates only");
  const index_t K = p.q.extent(3), V = p.v.extent(3), hk = h / p.group();
  T* z = p.z.ptr({sg.n, h, 0});  // [K]
  for (index_t t = sg.t0; t < sg.t1; ++t) {
    const T* q = p.q.ptr({sg.b, t, hk, 0});
    const T* k = p.k.ptr({sg.b, t, hk, 0});
    const T ks = Gate::scales_k ? gate.k_scale(sg.b, t, h) : T(1);
    const T a = Gate::has_gate ? std::exp(gate.log_gate(sg.b, t, h)) : T(1);
    T den = T(0);
    for (index_t i = 0; i < K; ++i) {
      z[i] = std::fma(ks, k[i], a * z[i]);
      den = std::fma(p.scale * q[i], z[i], den);
    }
    den += T(1e-10);
    simd::scale(p.o.ptr({sg.b, t, h, 0}), T(1) / den, V);
  }
}

/// The recurrent form for one (sequence, head), in place on its state row.
template <class T, class Gate>
void recurrent_head(const problem<T>& p, const Gate& gate, const segment& sg, index_t h) {
  constexpr index_t L = simd::lanes<T>;
  const index_t K = p.q.extent(3), V = p.v.extent(3);
  T* S = p.state.ptr({sg.n, h, 0, 0});  // [K, V], row stride lds
  const index_t lds = p.state.stride(2);
  if (sg.t1 > sg.t0) {
    // Column tiles of up to 8 vectors whose K×W block stays within 128 KiB (L2) over the
    // sweep: measured faster than L1-sized tiles, which re-read q, k and the gates per tile.
    const index_t max_nv =
        std::clamp<index_t>((128 * 1024) / (K * L * static_cast<index_t>(sizeof(T))), 1, 8);
    index_t j0 = 0;
    while (V - j0 >= L) {
      const index_t nv = std::min(max_nv, (V - j0) / L);
      if (nv >= 8) {
        recurrent_tile<T, Gate, 8>(p, gate, sg, h, S, lds, j0);
        j0 += 8 * L;
      } else if (nv >= 4) {
        recurrent_tile<T, Gate, 4>(p, gate, sg, h, S, lds, j0);
        j0 += 4 * L;
      } else if (nv >= 2) {
        recurrent_tile<T, Gate, 2>(p, gate, sg, h, S, lds, j0);
        j0 += 2 * L;
      } else {
        recurrent_tile<T, Gate, 1>(p, gate, sg, h, S, lds, j0);
        j0 += L;
      }
    }
    if (j0 < V) recurrent_tail<T, Gate>(p, gate, sg, h, S, lds, j0);
  }
}

/// The recurrent form for the (sequence, head) items [i0, i1) (item i = n·H + h), in blocks of
/// 64 tokens that every item of the range sweeps in turn: the heads of a token share its rows'
/// pages, so a block read for one head is still in cache (and in the TLB) for the next, while
/// each head's state stays in L2. Each item's arithmetic is unchanged by the order.
template <class T, class Gate>
void recurrent_items(const problem<T>& p, const Gate& gate, index_t i0, index_t i1) {
  constexpr index_t block = 64;
  const index_t H = p.heads();
  for (index_t off = 0;; off += block) {
    bool any = false;
    for (index_t i = i0; i < i1; ++i) {
      const segment sg = segment_of(p, i / H);
      const index_t t0 = sg.t0 + off;
      if (t0 >= sg.t1) continue;
      any = true;
      recurrent_head<T, Gate>(p, gate, {sg.b, t0, std::min(sg.t1, t0 + block), sg.n}, i % H);
    }
    if (!any) break;
  }
  if constexpr (!Gate::per_key) {
    if (p.normalised()) {
      for (index_t i = i0; i < i1; ++i)
        normaliser_pass<T, Gate>(p, gate, segment_of(p, i / H), i % H);
    }
  }
}

// ---- chunked --------------------------------------------------------------------------------

/// Per-thread buffers of the chunked form: O(C·(C + K + V) + K·V), independent of T. Views
/// of workspace memory (take() carves them from a frame, zeroed); trivially copyable.
template <class T>
struct chunk_scratch {
  std::span<T> aq;          // [C, C]: A, row stride L
  std::span<T> qs, kc, kt;  // [C, K]: s·q, c·k, c·k ⊙ e^{G_L - G}
  std::span<T> e;           // [C, max(C, K)] exponent buffer
  std::span<T> qi, kj;      // [16, K], [C, K]: sub-chunk factors (per-key gates)
  std::span<T> loc, lep;    // [C, K]: sub-chunk-local cumulative gate and epoch (as T)
  std::span<T> vc;          // [C, V]: the chunk's v
  std::span<T> vt, ev;      // [C, V]: per-value gate buffers
  std::span<T> fac;         // [2·ceil(C/16) + 1, K]: per-sub-chunk factors (factored path)
  std::span<T> kdt, khat;   // [K, C]: k side of the factored path, transposed
  std::span<T> bonus;       // [C]: s q_i · (u ⊙ c k_i), the exclusive readout's diagonal
  std::span<double> gval;   // [C + 1, Kg] cumulative gate (Kg = K per-key, 1 scalar)
  std::span<epoch_t> gep;
  std::span<double> vval;  // [C, V] cumulative per-value gate
  std::span<epoch_t> vep;
  // GEMM packing of a transposed B: common::gemm_pack<T>(), this thread's buffer

  template <class Frame>  // workspace::frame, or common::scratch_size to count the bytes
  void take(Frame& f, index_t C, index_t K, index_t V, bool per_key, bool value_gate) {
    aq = common::take_zeroed<T>(f, C * C);
    vc = common::take_zeroed<T>(f, C * V);
    qs = common::take_zeroed<T>(f, C * K);
    kc = common::take_zeroed<T>(f, C * K);
    kt = common::take_zeroed<T>(f, C * K);
    e = common::take_zeroed<T>(f, C * std::max(C, K));
    // one row more: the exclusive readout's query gates G_{i-1} start from a zero row
    const index_t Kg = per_key ? K : 1;
    gval = common::take_zeroed<double>(f, (C + 1) * Kg);
    gep = common::take_zeroed<epoch_t>(f, (C + 1) * Kg);
    if (per_key) {
      qi = common::take_zeroed<T>(f, 16 * K);
      kj = common::take_zeroed<T>(f, C * K);
      loc = common::take_zeroed<T>(f, C * K);
      lep = common::take_zeroed<T>(f, C * K);
      fac = common::take_zeroed<T>(f, (2 * ((C + 15) / 16) + 1) * K);
      kdt = common::take_zeroed<T>(f, K * C);
      khat = common::take_zeroed<T>(f, K * C);
      bonus = common::take_zeroed<T>(f, C);
    }
    if (value_gate) {
      vt = common::take_zeroed<T>(f, C * V);
      ev = common::take_zeroed<T>(f, C * V);
      vval = common::take_zeroed<double>(f, C * V);
      vep = common::take_zeroed<epoch_t>(f, C * V);
    }
  }
};

/// What a chunk's local phase hands to the state scan and to the inter-chunk output: nothing
/// in it depends on the state entering the chunk, so the local phases of all chunks may run in
/// parallel. In the sequential schedule one carry per thread is reused chunk after chunk.
/// Views of workspace memory, like chunk_scratch.
template <class T>
struct chunk_carry {
  std::span<T> qt;   // [C, K]: Q̃ = sQ ⊙ e^{G}
  std::span<T> u;    // [K, V]: K̃ᵀṼ; the parallel schedule's scan swaps in S_n
  std::span<T> dk;   // [K]: decay of the state rows over the chunk
  std::span<T> dv;   // [V]: decay of the state columns (per-value gates)
  std::span<T> ev;   // [C, V]: e^{Gv_i}, the inter term's column factors (per-value gates)
  index_t rows = 0;  // tokens in the chunk

  template <class Frame>  // workspace::frame, or common::scratch_size to count the bytes
  void take(Frame& f, index_t C, index_t K, index_t V, bool value_gate) {
    qt = common::take_zeroed<T>(f, C * K);
    u = common::take_zeroed<T>(f, K * V);
    dk = common::take_zeroed<T>(f, K);
    if (value_gate) {
      dv = common::take_zeroed<T>(f, V);
      ev = common::take_zeroed<T>(f, C * V);
    }
  }
};

/// The per-key chunk pieces when factorable(): A (rows at stride lda), Q̃ = sQ ⊙ e^{G} (qt),
/// K̃ = cK ⊙ e^{G_L - G} (kt) and the state decay e^{G_L} (dk). Each A entry is factored through
/// the first row r of its query's sub-chunk, as docs/math.md §1 allows:
///   e^{G_i - G_j} = e^{G_i - G_r} · e^{G_r - G_j},
/// the q side <= 1, the k side <= 1 below the sub-chunk and <= e^{factor_bound} inside it. The k
/// side of an earlier sub-chunk J is its in-sub-chunk factor times e^{G_r - G_{r_J}} (<= 1), and
/// Q̃, K̃ reuse the same factors, so the chunk needs 2·L·K exponentials instead of the exact
/// diagonal blocks' 16·L·K / 2; each A row block is one GEMM of depth K.
///
/// Query-side gates qg ([L, K]): gv for the inclusive readout; for the exclusive one (RWKV-6)
/// G_{i-1} (row 0 the chunk start), with the reference of each sub-chunk qg_r = G_{r-1}, so the
/// q side e^{G_{i-1} - G_{r-1}} and the k side of earlier sub-chunks stay <= 1, and A keeps only
/// j < i plus the bonus diagonal `bonus` (docs/math.md §3).
template <class T>
void factored_key_blocks(index_t L, index_t K, index_t sub, chunk_scratch<T>& w, const T* qs,
                         const T* kc, const double* gv, const double* qg, const T* bonus, T* A,
                         index_t lda, T* qt, T* kt, T* dk) {
  const index_t nsub = (L + sub - 1) / sub;
  T* qh = w.loc.data();   // [L, K]: s q_i ⊙ e^{G_i - G_r(i)}
  T* kd = w.kj.data();    // [L, K]: c k_j ⊙ e^{G_r(j) - G_j}
  T* R = w.fac.data();    // [nsub, K]: e^{G_r}
  T* E = R + nsub * K;    // [nsub, K]: e^{G_L - G_r}
  T* P = E + nsub * K;    // [K]: e^{G_r(I) - G_r(J)}
  T* kdt = w.kdt.data();  // [K, L]: kd transposed
  T* kh = w.khat.data();  // [K, r1]: k side of one row block, transposed
  const double* gl = gv + (L - 1) * K;
  for (index_t s = 0; s < nsub; ++s) {
    const index_t r0 = s * sub, r1 = std::min(L, r0 + sub);
    const double* gr = qg + r0 * K;
    for (index_t i = r0; i < r1; ++i) exp_diff<T>(K, qg + i * K, gr, qh + i * K, qs + i * K);
    for (index_t j = r0; j < r1; ++j) exp_diff<T>(K, gr, gv + j * K, kd + j * K, kc + j * K);
    exp_diff<T>(K, gr, nullptr, R + s * K);
    exp_diff<T>(K, gl, gr, E + s * K);
  }
  exp_diff<T>(K, gl, nullptr, dk);
  for (index_t i = 0; i < L; ++i) {
    const T* r = R + (i / sub) * K;
    const T* e = E + (i / sub) * K;
    for (index_t c = 0; c < K; ++c) {
      qt[i * K + c] = qh[i * K + c] * r[c];
      kt[i * K + c] = kd[i * K + c] * e[c];
    }
  }
  for (index_t c = 0; c < K; ++c) {
    for (index_t j = 0; j < L; ++j) kdt[c * L + j] = kd[j * K + c];
  }
  for (index_t s = 0; s < nsub; ++s) {
    const index_t r0 = s * sub, r1 = std::min(L, r0 + sub);
    for (index_t sj = 0; sj < s; ++sj) {
      const index_t j0 = sj * sub;
      exp_diff<T>(K, qg + r0 * K, qg + j0 * K, P);
      for (index_t c = 0; c < K; ++c) {
        const batch<T> pc(P[c]);
        simd::transform(kdt + c * L + j0, kh + c * r1 + j0, sub,
                        [pc](const batch<T>& x) { return x * pc; });
      }
    }
    for (index_t c = 0; c < K; ++c) std::copy(kdt + c * L + r0, kdt + c * L + r1, kh + c * r1 + r0);
    gemm<T, false, false>(r1 - r0, r1, K, qh + r0 * K, K, kh, r1, A + r0 * lda, lda, false,
                          common::gemm_pack<T>());
    if (bonus == nullptr) {
      for (index_t i = r0; i < r1; ++i) std::fill(A + i * lda + i + 1, A + i * lda + L, T(0));
    } else {
      for (index_t i = r0; i < r1; ++i) {
        std::fill(A + i * lda + i, A + i * lda + L, T(0));
        A[i * lda + i] = bonus[i];
      }
    }
  }
}

/// Per-value gates inside a chunk (GLA's optional gv) act on the output side of O and on the
/// state's columns: o_iv = Σ_j A_ij e^{Gv_iv - Gv_jv} v_jv + (Q̃_i S)_v e^{Gv_iv}. This is the
/// intra term (o written from zero), with the same sub-chunk scheme as the keys: blocks below
/// the diagonal factor through the first row r of the sub-chunk, diagonal blocks exactly.
template <class T>
void value_gated_intra(index_t L, index_t V, chunk_scratch<T>& w, const T* A, index_t lda,
                       const T* Vc, T* o, index_t ldo) {
  constexpr index_t sub = 16;
  const T ninf = -std::numeric_limits<T>::infinity();
  const double* gv = w.vval.data();
  const epoch_t* ge = w.vep.data();
  for (index_t i = 0; i < L; ++i) std::fill_n(o + i * ldo, V, T(0));
  for (index_t r0 = 0; r0 < L; r0 += sub) {
    const index_t r1 = std::min(L, r0 + sub);
    T* tmp = w.vt.data();  // [r1-r0, V] block result before the row factor
    if (r0 > 0) {
      // Ṽ_j = v_j ⊙ e^{Gv_r - Gv_j} for j < r0 (<= 1), then rows i scale by e^{Gv_i - Gv_r}
      T* vj = w.ev.data();  // [r0, V]
      for (index_t j = 0; j < r0; ++j) {
        for (index_t c = 0; c < V; ++c) {
          vj[j * V + c] = rel_arg<T>(gv[r0 * V + c], ge[r0 * V + c], gv[j * V + c], ge[j * V + c]);
        }
      }
      gexp<T>(vj, vj, r0 * V);
      for (index_t n = 0; n < r0 * V; ++n) vj[n] *= Vc[n];
      gemm<T, false, false>(r1 - r0, V, r0, A + r0 * lda, lda, vj, V, tmp, V, false,
                            common::gemm_pack<T>());
      for (index_t i = r0; i < r1; ++i) {
        T* e = w.ev.data();
        for (index_t c = 0; c < V; ++c) {
          e[c] = rel_arg<T>(gv[i * V + c], ge[i * V + c], gv[r0 * V + c], ge[r0 * V + c]);
        }
        gexp<T>(e, e, V);
        for (index_t c = 0; c < V; ++c) o[i * ldo + c] += e[c] * tmp[(i - r0) * V + c];
      }
    }
    // diagonal block, exact: every pair j <= i inside the sub-chunk
    for (index_t i = r0; i < r1; ++i) {
      for (index_t j = r0; j <= i; ++j) {
        const T aij = A[i * lda + j];
        if (aij == T(0)) continue;
        T* e = w.ev.data();
        for (index_t c = 0; c < V; ++c) {
          e[c] =
              ge[i * V + c] == ge[j * V + c] ? static_cast<T>(gv[i * V + c] - gv[j * V + c]) : ninf;
        }
        gexp<T>(e, e, V);
        for (index_t c = 0; c < V; ++c) o[i * ldo + c] += aij * e[c] * Vc[j * V + c];
      }
    }
  }
}

/// The local phase of chunk [c0, c0 + L) of one (sequence, head), everything that does not
/// need the state entering it: the intra term of its outputs (o written), and in `out` Q̃, the
/// state update K̃ᵀṼ and the decays. chunk_inter() and advance() finish the chunk.
template <class T, class Gate>
void chunk_local(const problem<T>& p, const Gate& gate, const segment& sg, index_t c0, index_t h,
                 index_t C, chunk_scratch<T>& w, chunk_carry<T>& out) {
  constexpr index_t sub = 16;
  const T ninf = -std::numeric_limits<T>::infinity();
  const index_t K = p.q.extent(3), V = p.v.extent(3), hk = h / p.group();
  const bool has_gv = gate.has_value_gate();
  const index_t L = std::min(C, sg.t1 - c0);
  const index_t lda = L;
  out.rows = L;
  T* A = w.aq.data();     // [L, L]
  T* Qt = out.qt.data();  // [L, K]: s·q ⊙ e^{G_i}
  T* dk = out.dk.data();  // [K]: e^{G_L}
  T* Vc = w.vc.data();    // [L, V]: v of the chunk
  T* qs = w.qs.data();    // [L, K]
  T* kc = w.kc.data();    // [L, K]
  T* kt = w.kt.data();    // [L, K]
  T* e = w.e.data();
  // pack: s·q, c·k, v (rows of the [T, H, D] layout are a page apart: prefetch ahead, and
  // this chunk's gate rows for the gate pass that follows)
  for (index_t i = 0; i < L; ++i) {
    const index_t t = c0 + i;
    if (t + 16 < sg.t1) {
      prefetch(p.q.ptr({sg.b, t + 16, hk, 0}), K);
      prefetch(p.k.ptr({sg.b, t + 16, hk, 0}), K);
      prefetch(p.v.ptr({sg.b, t + 16, h, 0}), V);
      if constexpr (Gate::per_key) prefetch(gate.key_gate_row(sg.b, t + 16, h), K);
    }
    const T* q = p.q.ptr({sg.b, t, hk, 0});
    const T* k = p.k.ptr({sg.b, t, hk, 0});
    const T ks = Gate::scales_k ? gate.k_scale(sg.b, t, h) : T(1);
    for (index_t c = 0; c < K; ++c) {
      qs[i * K + c] = p.scale * q[c];
      kc[i * K + c] = ks * k[c];
    }
    std::copy_n(p.v.ptr({sg.b, t, h, 0}), V, Vc + i * V);
  }
  if constexpr (!Gate::per_key) {
    double* gv = w.gval.data();
    epoch_t* ge = w.gep.data();
    if constexpr (Gate::has_gate) {
      // one scalar per token; the row lambda hands cumulate() a pointer to it
      T gtok[1];
      cumulate<T>(
          L, 1,
          [&](index_t i) {
            gtok[0] = gate.log_gate(sg.b, c0 + i, h);
            return static_cast<const T*>(gtok);
          },
          gv, ge);
    } else {
      std::fill_n(gv, L, 0.0);
      std::fill_n(ge, L, 0);
    }
    // A = (sQ) Kᵀ ⊙ D, D_ij = e^{G_i - G_j} for j <= i, else 0
    gemm<T, false, true>(L, L, K, qs, K, kc, K, A, lda, false, common::gemm_pack<T>());
    for (index_t i = 0; i < L; ++i) {
      T* a = A + i * lda;  // row i of A: columns j <= i decay, j > i are masked
      if constexpr (Gate::has_gate) {
        rel_args_row<T>(i + 1, gv[i], ge[i], gv, ge, e);
        gexp<T>(e, e, i + 1);
        for (index_t j = 0; j <= i; ++j) a[j] *= e[j];
      }
      std::fill(a + i + 1, a + L, T(0));
    }
    // Q̃ = sQ ⊙ e^{G_i}, K̃ = cK ⊙ e^{G_L - G_j}, state decay e^{G_L}
    for (index_t i = 0; i < L; ++i) {
      e[i] = rel_arg<T>(gv[i], ge[i], 0.0, 0);
      e[L + i] = rel_arg<T>(gv[L - 1], ge[L - 1], gv[i], ge[i]);
    }
    e[2 * L] = rel_arg<T>(gv[L - 1], ge[L - 1], 0.0, 0);
    gexp<T>(e, e, 2 * L + 1);
    for (index_t i = 0; i < L; ++i) {
      for (index_t c = 0; c < K; ++c) {
        Qt[i * K + c] = qs[i * K + c] * e[i];
        kt[i * K + c] = kc[i * K + c] * e[L + i];
      }
    }
    std::fill_n(dk, K, e[2 * L]);
  } else {
    // Exclusive readout (RWKV-6, docs/math.md §3): the queries see the gates up to the previous
    // token, qg_i = G_{i-1} (row -1, the chunk start, is a zero row in front of gv), A keeps
    // j < i only and its diagonal is the bonus. Inclusive: qg = gv, unchanged.
    constexpr bool excl = exclusive_readout<Gate>;
    double* gv = w.gval.data() + (excl ? K : 0);
    epoch_t* ge = w.gep.data() + (excl ? K : 0);
    cumulate<T>(
        L, K, [&](index_t i) { return gate.key_gate_row(sg.b, c0 + i, h); }, gv, ge);
    const double* qg = gv;
    const epoch_t* qe = ge;
    T* bonus = nullptr;
    if constexpr (excl) {
      std::fill_n(w.gval.data(), K, 0.0);
      std::fill_n(w.gep.data(), K, epoch_t(0));
      qg = gv - K;
      qe = ge - K;
      bonus = w.bonus.data();
      const T* u = gate.readout.row(h);
      for (index_t i = 0; i < L; ++i) {
        bonus[i] = dot3<T>(qs + i * K, u, kc + i * K, K);
      }
    }
    if (factorable<T>(L, K, sub, gv, ge, qs, kc, excl ? qg : nullptr)) {
      factored_key_blocks<T>(L, K, sub, w, qs, kc, gv, qg, bonus, A, lda, Qt, kt, dk);
    } else {
      // Q̃_ik = sq_ik e^{qg_ik}; K̃_jk = ck_jk e^{G_Lk - G_jk}; decay e^{G_Lk}
      rel_args<T>(L * K, qg, qe, nullptr, nullptr, e);
      gexp<T>(e, e, L * K);
      for (index_t i = 0; i < L; ++i) {
        for (index_t c = 0; c < K; ++c) Qt[i * K + c] = qs[i * K + c] * e[i * K + c];
      }
      const double* gl = gv + (L - 1) * K;
      const epoch_t* el = ge + (L - 1) * K;
      for (index_t i = 0; i < L; ++i) rel_args<T>(K, gl, el, gv + i * K, ge + i * K, e + i * K);
      gexp<T>(e, e, L * K);
      for (index_t n = 0; n < L * K; ++n) kt[n] = kc[n] * e[n];
      rel_args<T>(K, gl, el, nullptr, nullptr, dk);
      gexp<T>(dk, dk, K);
      // A, sub-chunk by sub-chunk
      for (index_t i = 0; i < L; ++i) std::fill_n(A + i * lda, L, T(0));
      T* loc = w.loc.data();
      T* lep = w.lep.data();
      for (index_t r0 = 0; r0 < L; r0 += sub) {
        const index_t r1 = std::min(L, r0 + sub);
        const double* gr = qg + r0 * K;
        const epoch_t* er = qe + r0 * K;
        if (r0 > 0) {
          // below the diagonal: (sq_i ⊙ e^{qg_i - qg_r}) · (ck_j ⊙ e^{qg_r - G_j}), both <= 1
          T* qi = w.qi.data();  // [r1-r0, K]
          T* kj = w.kj.data();  // [r0, K]
          for (index_t i = r0; i < r1; ++i) {
            rel_args<T>(K, qg + i * K, qe + i * K, gr, er, qi + (i - r0) * K);
          }
          for (index_t j = 0; j < r0; ++j)
            rel_args<T>(K, gr, er, gv + j * K, ge + j * K, kj + j * K);
          gexp<T>(qi, qi, (r1 - r0) * K);
          gexp<T>(kj, kj, r0 * K);
          for (index_t n = 0; n < (r1 - r0) * K; ++n) qi[n] *= qs[r0 * K + n];
          for (index_t n = 0; n < r0 * K; ++n) kj[n] *= kc[n];
          gemm<T, false, true>(r1 - r0, r0, K, qi, K, kj, K, A + r0 * lda, lda, false,
                               common::gemm_pack<T>());
        }
        constexpr index_t VL = simd::lanes<T>;
        using B = batch<T>;
        if constexpr (excl) {
          // diagonal block, exact: pairs j < i, exponent G_{i-1} - G_j formed in double (the
          // sums since row r0 may be far apart when a strong gate sits inside the sub-chunk)
          T* d = e;  // [K], free once Q̃ and K̃ are built
          for (index_t i = r0; i < r1; ++i) {
            for (index_t j = r0; j < i; ++j) {
              rel_args<T>(K, qg + i * K, qe + i * K, gv + j * K, ge + j * K, d);
              gexp<T>(d, d, K);
              B acc(T(0));
              index_t c = 0;
              const T *qq = qs + i * K, *kk = kc + j * K;
              for (; c + VL <= K; c += VL) {
                acc = simd::fma(simd::load(qq + c) * simd::load(kk + c), simd::load(d + c), acc);
              }
              T sum = simd::reduce_sum(acc);
              for (; c < K; ++c) sum += qq[c] * kk[c] * d[c];
              A[i * lda + j] = sum;
            }
            A[i * lda + i] = bonus[i];
          }
          continue;
        }
        // diagonal block, exact. loc: cumulative gate relative to row r0 (same epoch) or to the
        // kill that opened its epoch; lep: epoch relative to row r0. Within an epoch,
        // loc_i - loc_j = G_i - G_j.
        for (index_t i = r0; i < r1; ++i)
          local_args<T>(K, gv + i * K, ge + i * K, gr, er, loc + i * K, lep + i * K);
        const B binf(ninf);
        for (index_t i = r0; i < r1; ++i) {
          for (index_t j = r0; j <= i; ++j) {
            B acc(T(0));
            index_t c = 0;
            const T *li = loc + i * K, *lj = loc + j * K, *ei = lep + i * K, *ej = lep + j * K;
            const T *qq = qs + i * K, *kk = kc + j * K;
            for (; c + VL <= K; c += VL) {
              const B d = xsimd::select(simd::load(ei + c) == simd::load(ej + c),
                                        simd::load(li + c) - simd::load(lj + c), binf);
              acc = simd::fma(simd::load(qq + c) * simd::load(kk + c), gexp<T>(d), acc);
            }
            T s = simd::reduce_sum(acc);
            for (; c < K; ++c) {
              const T d = ei[c] == ej[c] ? li[c] - lj[c] : ninf;
              s += qq[c] * kk[c] * std::exp(d);
            }
            A[i * lda + j] = s;
          }
        }
      }
    }
  }
  T* o = p.o.ptr({sg.b, c0, h, 0});
  const index_t ldo = p.o.stride(1);
  if constexpr (Gate::per_key) {
    if (has_gv) {
      // per-value gates: output and state columns carry e^{Gv}
      double* vv = w.vval.data();
      epoch_t* ve = w.vep.data();
      cumulate<T>(
          L, V, [&](index_t i) { return gate.value_gate_row(sg.b, c0 + i, h); }, vv, ve);
      value_gated_intra<T>(L, V, w, A, lda, Vc, o, ldo);
      T* ev = out.ev.data();  // e^{Gv_i} for the inter term
      for (index_t i = 0; i < L; ++i) {
        for (index_t c = 0; c < V; ++c)
          ev[i * V + c] = rel_arg<T>(vv[i * V + c], ve[i * V + c], 0, 0);
      }
      gexp<T>(ev, ev, L * V);
      // S ← Diag(e^{Gk_L}) S Diag(e^{Gv_L}) + K̃ᵀ Ṽ, Ṽ_j = v_j ⊙ e^{Gv_L - Gv_j}
      T* vt = w.vt.data();
      for (index_t j = 0; j < L; ++j) {
        for (index_t c = 0; c < V; ++c) {
          vt[j * V + c] =
              rel_arg<T>(vv[(L - 1) * V + c], ve[(L - 1) * V + c], vv[j * V + c], ve[j * V + c]);
        }
      }
      gexp<T>(vt, vt, L * V);
      for (index_t n = 0; n < L * V; ++n) vt[n] *= Vc[n];
      T* dv = out.dv.data();
      for (index_t c = 0; c < V; ++c)
        dv[c] = rel_arg<T>(vv[(L - 1) * V + c], ve[(L - 1) * V + c], 0, 0);
      gexp<T>(dv, dv, V);
      gemm<T, true, false>(K, V, L, kt, K, vt, V, out.u.data(), V, false, common::gemm_pack<T>());
      return;
    }
  }
  // intra term A·V, and the state update K̃ᵀV
  gemm<T, false, false>(L, V, L, A, lda, Vc, V, o, ldo, false, common::gemm_pack<T>(),
                        /*lower_a=*/true);
  gemm<T, true, false>(K, V, L, kt, K, Vc, V, out.u.data(), V, false, common::gemm_pack<T>());
}

/// The inter-chunk output of a chunk, o += Q̃·S_n (⊙ e^{Gv} with per-value gates), S_n: [K, V]
/// the state entering the chunk.
template <class T>
void chunk_inter(const chunk_carry<T>& in, index_t K, index_t V, bool has_gv, const T* S, T* o,
                 index_t ldo, chunk_scratch<T>& w) {
  const index_t L = in.rows;
  if (!has_gv) {
    gemm<T, false, false>(L, V, K, in.qt.data(), K, S, V, o, ldo, true, common::gemm_pack<T>());
    return;
  }
  T* tmp = w.vt.data();  // [L, V]
  gemm<T, false, false>(L, V, K, in.qt.data(), K, S, V, tmp, V, false, common::gemm_pack<T>());
  for (index_t i = 0; i < L; ++i) {
    const T* e = in.ev.data() + i * V;
    for (index_t c = 0; c < V; ++c) o[i * ldo + c] = std::fma(tmp[i * V + c], e[c], o[i * ldo + c]);
  }
}

/// S_{n+1} = Diag(dk) S_n Diag(dv) + U, in place on S ([K, V]). With KeepOld the carry's U
/// receives S_n (the parallel schedule's chunk_inter reads it there). Both schedules run this
/// same code, so the state and outputs are bitwise the same whichever schedule ran.
template <class T, bool KeepOld>
void advance(chunk_carry<T>& c, index_t K, index_t V, bool has_gv, T* S) {
  using B = batch<T>;
  constexpr index_t VL = simd::lanes<T>;
  T* u = c.u.data();
  for (index_t i = 0; i < K; ++i) {
    const T di = c.dk[static_cast<std::size_t>(i)];
    T* s = S + i * V;
    T* ui = u + i * V;
    index_t j = 0;
    for (; j + VL <= V; j += VL) {
      const B d = has_gv ? B(di) * simd::load(c.dv.data() + j) : B(di);
      const B old = simd::load(s + j);
      simd::store(s + j, simd::fma(d, old, simd::load(ui + j)));
      if constexpr (KeepOld) simd::store(ui + j, old);
    }
    for (; j < V; ++j) {
      const T d = has_gv ? di * c.dv[static_cast<std::size_t>(j)] : di;
      const T old = s[j];
      s[j] = std::fma(d, old, ui[j]);
      if constexpr (KeepOld) ui[j] = old;
    }
  }
}

/// The tokens of item i = n·H + h (the scheduler's view of a segment).
template <class T>
auto item_tokens(const problem<T>& p) {
  return [&p](index_t i) {
    const segment sg = segment_of(p, i / p.heads());
    return common::token_range{sg.t0, sg.t1};
  };
}

/// The chunked form for the (sequence, head) items [i0, i1) (item i = n·H + h) on one thread:
/// chunk by chunk, every item of the range in turn (common::for_chunks_interleaved; the heads
/// of a token share its rows' pages, as in recurrent_items); each item's state is a [K, V]
/// block of `states`.
template <class T, class Gate>
void chunk_items(const problem<T>& p, const Gate& gate, index_t i0, index_t i1, index_t C,
                 chunk_scratch<T>& w, chunk_carry<T>& carry, T* states) {
  const index_t H = p.heads(), K = p.q.extent(3), V = p.v.extent(3);
  const bool has_gv = gate.has_value_gate();
  common::for_chunks_interleaved(
      i0, i1, C, common::chunk_order::forward, item_tokens(p),
      [&](index_t i, const common::token_range& c) {
        const segment sg = segment_of(p, i / H);
        T* S = states + (i - i0) * K * V;
        chunk_local<T, Gate>(p, gate, sg, c.t0, i % H, C, w, carry);
        chunk_inter<T>(carry, K, V, has_gv, S, p.o.ptr({sg.b, c.t0, i % H, 0}), p.o.stride(1), w);
        advance<T, false>(carry, K, V, has_gv, S);
      });
}

/// Copies the state rows of items [i0, i1) between the caller's tensor and contiguous [K, V]
/// blocks (in: tensor to blocks).
template <class T>
void copy_states(const problem<T>& p, index_t i0, index_t i1, T* blocks, bool in) {
  const index_t H = p.heads(), K = p.q.extent(3), V = p.v.extent(3);
  for (index_t i = i0; i < i1; ++i) {
    T* st = p.state.ptr({i / H, i % H, 0, 0});
    T* bl = blocks + (i - i0) * K * V;
    for (index_t r = 0; r < K; ++r) {
      if (in) {
        std::copy_n(st + r * p.state.stride(2), V, bl + r * V);
      } else {
        std::copy_n(bl + r * V, V, st + r * p.state.stride(2));
      }
    }
  }
}

/// The chunked form when there are fewer (sequence, head) items than threads: windows of `wc`
/// chunks per item, three parallel steps each (common::run_windows). 1) every chunk's local
/// phase (intra outputs, Q̃, K̃ᵀṼ, decays: independent of the state); 2) per item, the scan
/// S_{n+1} = D_n S_n + U_n over the window's chunks, leaving S_n in each carry; 3) every chunk's
/// inter output Q̃·S_n. Each chunk runs exactly the computations of the sequential schedule
/// (chunk_items), so the results are bitwise the same for every thread count.
template <class T, class Gate>
void chunk_windows(const problem<T>& p, const Gate& gate, index_t C, int threads) {
  const index_t items = p.heads() * p.sequences(), H = p.heads();
  const index_t K = p.q.extent(3), V = p.v.extent(3);
  const bool has_gv = gate.has_value_gate();
  const index_t wc = common::window_chunks(items, threads);
  const index_t jobs = items * wc;
  // All of it from the calling thread's arena, taken before the parallel regions: the workers
  // only use (never take) it, each slot by one thread at a time, and the frame outlives them.
  const index_t slots = std::max(1, max_slots());
  workspace& ws = thread_workspace();
  {
    common::scratch_size need, carry_need, scratch_need;
    chunk_carry<T>{}.take(carry_need, C, K, V, has_gv);
    chunk_scratch<T>{}.take(scratch_need, C, K, V, Gate::per_key, has_gv);
    need.add<chunk_carry<T>>(jobs);
    need.add<chunk_scratch<T>>(slots);
    need.add<T>(items * K * V);
    common::presize(ws, need.bytes + static_cast<std::size_t>(jobs) * carry_need.bytes +
                            static_cast<std::size_t>(slots) * scratch_need.bytes);
  }
  auto frame = ws.scope();
  std::span<chunk_carry<T>> carries = frame.take<chunk_carry<T>>(jobs);
  for (auto& c : carries) {
    ::new (static_cast<void*>(&c)) chunk_carry<T>{};
    c.take(frame, C, K, V, has_gv);
  }
  std::span<chunk_scratch<T>> scratch = frame.take<chunk_scratch<T>>(slots);
  for (auto& w : scratch) {
    ::new (static_cast<void*>(&w)) chunk_scratch<T>{};
    w.take(frame, C, K, V, Gate::per_key, has_gv);
  }
  std::span<T> states = common::take_zeroed<T>(frame, items * K * V);
  copy_states<T>(p, 0, items, states.data(), true);
  auto carry = [&](index_t job) -> chunk_carry<T>& {
    return carries[static_cast<std::size_t>(job)];
  };
  common::run_windows(
      items, C, common::chunk_order::forward, wc, item_tokens(p),
      [&](index_t job, index_t i, const common::token_range& c, int slot) {
        chunk_local<T, Gate>(p, gate, segment_of(p, i / H), c.t0, i % H, C,
                             scratch[static_cast<std::size_t>(slot)], carry(job));
      },
      [&](index_t job, index_t i, const common::token_range&) {
        advance<T, true>(carry(job), K, V, has_gv, states.data() + i * K * V);
      },
      [&](index_t job, index_t i, const common::token_range& c, int slot) {
        const auto& cj = carry(job);
        chunk_inter<T>(cj, K, V, has_gv, cj.u.data(),
                       p.o.ptr({segment_of(p, i / H).b, c.t0, i % H, 0}), p.o.stride(1),
                       scratch[static_cast<std::size_t>(slot)]);
      });
  copy_states<T>(p, 0, items, states.data(), false);
}

}  // namespace detail

/// Recurrent form: every (sequence, head) swept token by token, in parallel over them.
/// Allocates nothing. `p` must have been validated.
template <class T, class Gate>
void forward_recurrent(const problem<T>& p, const Gate& gate) {
  const index_t items = p.heads() * p.sequences();
  // A parallel region costs microseconds (far more when cores are oversubscribed), as much as a
  // whole decode step of a small model: below 2^20 state-element updates (about 45 µs at the
  // FMA peak of one core) the sweep runs on the calling thread. Same results either way.
  const double work = double(p.q.extent(0)) * double(p.q.extent(1)) * double(p.heads()) *
                      double(p.q.extent(3)) * double(p.v.extent(3));
  const index_t groups =
      work < double(1 << 20) ? 1 : std::min<index_t>(items, std::max(1, num_threads()));
  if (groups == 1) {
    detail::recurrent_items<T, Gate>(p, gate, 0, items);
    return;
  }
  // one contiguous range of items per thread (static, like parallel_for's own partition)
  parallel_for(groups, [&](index_t g) {
    detail::recurrent_items<T, Gate>(p, gate, g * items / groups, (g + 1) * items / groups);
  });
}

/// Chunked form with chunk length `chunk`. With at least as many (sequence, head) items as
/// threads: one contiguous range of items per thread, chunks in order inside each. With fewer:
/// chunk_windows, parallel over chunks as well. Both schedules give bitwise the same results.
/// Extra memory O(C·(C + K + V) + K·V) per thread plus K·V per item, independent of T, all from
/// the workspace arena (core/workspace.hpp): a repeated shape allocates nothing after its first
/// call.
template <class T, class Gate>
void forward_chunked(const problem<T>& p, const Gate& gate, index_t chunk) {
  const index_t items = p.heads() * p.sequences();
  const index_t K = p.q.extent(3), V = p.v.extent(3);
  const index_t C = std::max<index_t>(1, std::min(chunk, p.q.extent(1)));
  const bool has_gv = gate.has_value_gate();
  const int threads = std::max(1, num_threads());
  const index_t chunks = (p.q.extent(0) * p.q.extent(1) + C - 1) / C;  // about, over all items
  if (common::use_windows(items, chunks * p.heads(), threads)) {
    detail::chunk_windows<T, Gate>(p, gate, C, threads);
  } else {
    // one contiguous range of items per thread (static, like parallel_for's own partition)
    common::for_item_ranges(items, threads, [&](index_t i0, index_t i1) {
      // this thread's arena (the calling thread's, or a worker's inside the region)
      workspace& ws = thread_workspace();
      detail::chunk_scratch<T> w;
      detail::chunk_carry<T> carry;
      {
        common::scratch_size need;
        w.take(need, C, K, V, Gate::per_key, has_gv);
        carry.take(need, C, K, V, has_gv);
        need.add<T>((i1 - i0) * K * V);
        common::presize(ws, need.bytes);
      }
      auto frame = ws.scope();
      w.take(frame, C, K, V, Gate::per_key, has_gv);
      carry.take(frame, C, K, V, has_gv);
      std::span<T> states = common::take_zeroed<T>(frame, (i1 - i0) * K * V);
      detail::copy_states<T>(p, i0, i1, states.data(), true);
      detail::chunk_items<T, Gate>(p, gate, i0, i1, C, w, carry, states.data());
      detail::copy_states<T>(p, i0, i1, states.data(), false);
    });
  }
  if constexpr (!Gate::per_key) {
    if (p.normalised()) {
      parallel_for(items, [&](index_t i) {
        detail::normaliser_pass<T, Gate>(p, gate, segment_of(p, i / p.heads()), i % p.heads());
      });
    }
  }
}

/// The fronts' forward() runs the recurrent form below options::switch_over_t tokens per
/// sequence, the chunked form from it; without the option, from this: never. Measured with
/// bench_gated and measure_forms (seqmix/tune.hpp; B=1, H=8, K=V in {64, 128}, T up to 65536,
/// 1 and 2 threads) the recurrent form is faster at every T on the 2-core AVX-512 dev machine;
/// on a 16-core Xeon the chunked form wins at K=V=128 (docs/bench/README.md). Set the option
/// from measure_switch_over() on the machine that runs the model.
inline constexpr index_t default_switch_over_t = std::numeric_limits<index_t>::max();

/// Which form a front runs.
enum class form { chunked, recurrent, automatic };

/// Runs `p` in form `f`; `automatic` takes the recurrent form when the mean sequence length is
/// below `switch_over` tokens (measured per front, see bench/bench_gated.cpp), else chunked.
template <class T, class Gate>
void run(form f, const problem<T>& p, const Gate& gate, index_t chunk, index_t switch_over) {
  if (f == form::automatic) {
    const index_t mean_len = p.q.extent(1) * p.q.extent(0) / std::max<index_t>(1, p.sequences());
    f = mean_len < switch_over ? form::recurrent : form::chunked;
  }
  if (f == form::recurrent) {
    forward_recurrent<T, Gate>(p, gate);
  } else {
    forward_chunked<T, Gate>(p, gate, chunk);
  }
}

/// Views of one-token inputs [B,H,D] as [B,1,H,D] (no copy), so `step` is the recurrent form
/// on T = 1 and shares its code exactly.
template <class T>
tensor_view<T, 4> as_one_token(const tensor_view<T, 3>& x) {
  return tensor_view<T, 4>(x.data(), {x.extent(0), 1, x.extent(1), x.extent(2)},
                           {x.stride(0), x.stride(0), x.stride(1), x.stride(2)});
}
template <class T>
tensor_view<T, 3> as_one_token(const tensor_view<T, 2>& x) {
  return tensor_view<T, 3>(x.data(), {x.extent(0), 1, x.extent(1)},
                           {x.stride(0), x.stride(0), x.stride(1)});
}
/// The engine's rank-4 view of a front's argument: a sequence [B,T,H,D] as it is, a token
/// [B,H,D] as [B,1,H,D] (the fronts' forward and step share one path through this).
template <class T, std::size_t R>
tensor_view<T, 4> as_rank4(const tensor_view<T, R>& x) {
  static_assert(R == 3 || R == 4, "a sequence [B,T,H,D] or a token [B,H,D]");
  if constexpr (R == 4) {
    return x;
  } else {
    return as_one_token(x);
  }
}

}  // namespace seqmix::kernels::gated
