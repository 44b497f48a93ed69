// SPDX-License-Identifier: MIT
// The diagonal-plus-low-rank (DPLR) delta engine behind seqmix::kda and seqmix::rwkv7
// (docs/math.md §2.3 and §3). DeltaNet and Gated DeltaNet (scalar gates) keep the specialised
// kernels of kernels/delta_rule.hpp; this file adds the per-key gate and the general rank-one
// term, sharing that header's segments, lanes and matrix helpers.
//
// Recurrence, per (sequence, value head), S a [K, V] matrix, D_t = Diag(exp(g_t)) with g_t a
// per-key natural-log gate (g <= 0, -inf allowed):
//     S_t = D_t S_{t-1} + b_t (a_tᵀ S_{t-1}) + k_t v_tᵀ,      o_t = S_tᵀ (s q_t)
// Two kinds:
//  - kda (Kimi Delta Attention; a = -beta D_t k, b = k, v -> beta v: the delta update reads the
//    decayed state):  S' = D_t S_{t-1};  u_t = beta_t (v_t - S'ᵀ k_t);  S_t = S' + k_t u_tᵀ.
//    q, k [B,T,H,K] (optionally l2-normalised), v [B,T,HV,V] (GVA: value head hv reads q/k
//    head hv / (HV / H)), g [B,T,HV,K], beta [B,T,HV].
//  - rwkv7: a, b given ([B,T,H,K], H == HV), the rank-one term reads S_{t-1} before the decay;
//    q is RWKV's receptance r, g its log decay w.
// state [N, HV, K, V] (N = B, or the number of packed sequences).
//
// Forms and cost (per value head, FLOPs with multiply-add = 2):
//  - recurrent: kda 7·K·V per token (decay 1, update 2, the two reads Sᵀ(e^g k), Sᵀ(e^g q) 4),
//    rwkv7 9·K·V (two rank-one terms); plus 1-2 vector exps of K per token and column tile.
//    Column-tile-major as in kernels/delta_rule.hpp: a [K, 64] tile of S stays in L1 while the
//    tokens stream past, and one pass per token does token t's update and token t+1's reads,
//    using o_t = S_{t-1}ᵀ(e^{g_t} ⊙ s q_t) + (k_t·s q_t) u_t (kda) or
//    S_{t-1}ᵀ(e^{g_t} ⊙ s q_t) + (b_t·s q_t)(a_tᵀS_{t-1}) + (k_t·s q_t) v_t (rwkv7). The
//    per-key factors live in fixed stack blocks of `key_block` keys: nothing is allocated.
//  - chunked (WY/UT with per-key decays, chunk C, sub-chunk L = 16): G_i the chunk-local
//    cumulative gate (a K-vector, summed in double), G⁻_i = G_{i-1} (G⁻_0 = 0). Interaction
//    matrices M[i, j] = Σ_c x_ic y_jc exp(E_ic - G_jc) with E = G (inclusive, j <= i) or G⁻
//    (strict, j < i):
//      kda:   A = diag(beta) M(k, k; G, strict), P = M(s q, k; G, incl.), T = (I + A)^-1,
//             [W U] = T [diag(beta) (K ⊙ e^G)  diag(beta) V],  U' = U - W S_n,
//             O = (s Q ⊙ e^G) S_n + P U',  S_{n+1} = e^{G_C} ⊙ S_n + (K ⊙ e^{G_C - G})ᵀ U'
//      rwkv7: A_ab = M(a, b; G⁻), A_ak = M(a, k; G⁻), P_b = M(s q, b; G), P_k = M(s q, k; G),
//             T = (I - A_ab)^-1, Ŝ = T ((a ⊙ e^{G⁻}) S_n + A_ak V)   (row i = a_iᵀ S_{i-1}),
//             O = (s Q ⊙ e^G) S_n + P_b Ŝ + P_k V,
//             S_{n+1} = e^{G_C} ⊙ S_n + (B ⊙ e^{G_C - G})ᵀ Ŝ + (K ⊙ e^{G_C - G})ᵀ V.
//    Exponents: every exponential taken has an argument <= 0 (no overflow for any gate). For
//    the block of rows of sub-chunk p against all earlier columns j < p0 the product is
//    factored through the gate at the sub-chunk boundary, R = G_{p0-1}:
//      exp(E_i - G_j) = exp(E_i - R) · exp(R - G_j),  both factors <= 1,
//    and done as one GEMM; inside a sub-chunk (the diagonal L x L blocks) the exponentials are
//    taken element by element (exact). A factor that underflows to 0 bounds a product that is
//    smaller still. Gates are clamped at -1000 (exp = 0 in float and double) so -inf becomes
//    finite and G_i - G_j is never -inf - (-inf).
//    Cost per token: kda ≈ 2C(3K + 2V) + 6·K·V + (L/2 + C/2)·K exps, rwkv7 ≈ 2C(4K + 4V) +
//    8·K·V; O(C·(K+V) + C² + K·V) working memory per thread, independent of T, from the
//    workspace arena (core/workspace.hpp): a repeated shape allocates nothing.
// forward() runs the recurrent form (the chunked one executes more FLOPs per token, see
// kernels/delta_rule.hpp's measurements for the scalar gate; bench/bench_delta.cpp).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <new>
#include <span>
#include <string>
#include <vector>

#include <seqmix/core/error.hpp>
#include <seqmix/core/gemm.hpp>
#include <seqmix/core/parallel.hpp>
#include <seqmix/core/simd.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/core/workspace.hpp>
#include <seqmix/kernels/common/scratch.hpp>
#include <seqmix/kernels/delta_rule.hpp>

namespace seqmix::kernels::delta_rule::dplr {

enum class kind { kda, rwkv7 };

/// Everything one call needs. Views keep the caller's strides (inner dimension contiguous).
template <class T>
struct problem {
  kind kd = kind::kda;
  tensor_view<const T, 4> q;     // [B, T, H, K] queries (rwkv7: receptance r)
  tensor_view<const T, 4> k;     // [B, T, H, K]
  tensor_view<const T, 4> v;     // [B, T, HV, V]
  tensor_view<const T, 4> g;     // [B, T, HV, K] per-key natural-log gates (rwkv7: w)
  tensor_view<const T, 3> beta;  // [B, T, HV] (kda)
  tensor_view<const T, 4> a;     // [B, T, H, K] (rwkv7)
  tensor_view<const T, 4> b;     // [B, T, H, K] (rwkv7)
  tensor_view<T, 4> o;           // [B, T, HV, V]
  tensor_view<T, 4> state;       // [N, HV, K, V]
  T scale = T(1);
  bool l2norm = false;  // kda only
  std::span<const index_t> cu_seqlens{};

  index_t sequences() const {
    return cu_seqlens.empty() ? q.extent(0) : static_cast<index_t>(cu_seqlens.size()) - 1;
  }
};

template <class T>
inline segment segment_of(const problem<T>& p, index_t i) {
  if (p.cu_seqlens.empty()) return {i, 0, p.q.extent(1), i};
  const auto u = static_cast<std::size_t>(i);
  return {0, p.cu_seqlens[u], p.cu_seqlens[u + 1] - p.cu_seqlens[u], i};
}

/// Row pointers of one token of one (segment, value head); `t` counts from the segment start.
template <class T>
struct rows {
  const problem<T>& p;
  segment sg;
  index_t hv, hq;
  template <class X>
  static X* at(const tensor_view<X, 4>& x, const segment& s, index_t t, index_t h) {
    return x.data() + s.b * x.stride(0) + (s.t0 + t) * x.stride(1) + h * x.stride(2);
  }
  const T* q(index_t t) const { return at(p.q, sg, t, hq); }
  const T* k(index_t t) const { return at(p.k, sg, t, hq); }
  const T* v(index_t t) const { return at(p.v, sg, t, hv); }
  const T* g(index_t t) const { return at(p.g, sg, t, hv); }
  const T* a(index_t t) const { return at(p.a, sg, t, hq); }
  const T* b(index_t t) const { return at(p.b, sg, t, hq); }
  T* o(index_t t) const { return at(p.o, sg, t, hv); }
  T beta(index_t t) const {
    return p.beta
        .data()[sg.b * p.beta.stride(0) + (sg.t0 + t) * p.beta.stride(1) + hv * p.beta.stride(2)];
  }
};

inline constexpr std::size_t sz(index_t n) {
  return static_cast<std::size_t>(n);
}

/// exp(g) for n gates into out; -inf gives 0 (simd::exp clamps at -1000 first). Written on
/// batches here rather than through simd::exp(in, out, n): an out-of-line call inside the token
/// loop made the compiler keep the column accumulators in memory.
template <class T>
inline void decay_block(const T* g, index_t n, T* out) {
  constexpr index_t L = simd::lanes<T>;
  index_t j = 0;
  for (; j + L <= n; j += L) simd::store(out + j, simd::exp(simd::load(g + j)));
  if (j < n) {  // tail through a zero-padded batch (no out-of-line call: see above)
    alignas(64) std::array<T, std::size_t(L)> buf{};
    for (index_t i = j; i < n; ++i) buf[std::size_t(i - j)] = g[i];
    simd::store(buf.data(), simd::exp(simd::load(buf.data())));
    for (index_t i = j; i < n; ++i) out[i] = buf[std::size_t(i - j)];
  }
}

// ---- validation ------------------------------------------------------------------------------

/// Validates a full-sequence call (the engine's own checks; the fronts check names first).
template <class T>
void validate(const checker& check, const problem<T>& p, index_t chunk_size) {
  check.nonempty("q", p.q);
  const index_t B = p.q.extent(0), TT = p.q.extent(1), H = p.q.extent(2), K = p.q.extent(3);
  check.shape("k", p.k, {B, TT, H, K});
  check.nonempty("v", p.v);
  check.shape("v", p.v, {B, TT, any_extent, any_extent});
  const index_t HV = p.v.extent(2), V = p.v.extent(3);
  if (HV % H != 0) check.fail("v", "value heads must be a multiple of q/k heads");
  check.shape("g", p.g, {B, TT, HV, K});
  if (p.kd == kind::kda) {
    check.shape("beta", p.beta, {B, TT, HV});
    check.finite("beta", p.beta);
  } else {
    if (HV != H) check.fail("v", "rwkv7 has as many value heads as key heads");
    check.shape("a", p.a, {B, TT, H, K});
    check.shape("b", p.b, {B, TT, H, K});
    check.inner_contiguous("a", p.a);
    check.inner_contiguous("b", p.b);
  }
  check.shape("o", p.o, {B, TT, HV, V});
  if (chunk_size <= 0) check.fail("chunk_size", "must be > 0, got " + std::to_string(chunk_size));
  const index_t N = p.cu_seqlens.empty() ? B : check.cu_seqlens(p.cu_seqlens, B, TT);
  check.shape("state", p.state, {N, HV, K, V});
  check.inner_contiguous("q", p.q);
  check.inner_contiguous("k", p.k);
  check.inner_contiguous("v", p.v);
  check.inner_contiguous("g", p.g);
  check.inner_contiguous("o", p.o);
  check.inner_contiguous("state", p.state);
  if (!std::isfinite(p.scale)) check.fail("scale", "must be finite");
}

// ---- recurrent form --------------------------------------------------------------------------

/// Keys handled per block of the per-key factors (stack arrays, so nothing is allocated).
inline constexpr index_t key_block = 256;

/// Per-key factors of one token for keys [i0, i0 + kb): the decay d = e^g, the read vectors
/// rq = d ⊙ q and ra = d ⊙ k (kda) or a (rwkv7); raw q, k (the norms are applied as scalars).
template <class T, kind Kd>
inline void read_factors(const rows<T>& rw, index_t t, index_t i0, index_t kb, T* d, T* ra, T* rq) {
  // one pass on batches (separate passes read the 512-bit stores of d back as halves, which
  // defeats store forwarding); the tail through zero-padded batches
  constexpr index_t L = simd::lanes<T>;
  const T* gt = rw.g(t) + i0;
  const T* qt = rw.q(t) + i0;
  const T* xt = Kd == kind::kda ? rw.k(t) + i0 : rw.a(t) + i0;
  index_t j = 0;
  for (; j + L <= kb; j += L) {
    const auto e = simd::exp(simd::load(gt + j));
    simd::store(d + j, e);
    simd::store(rq + j, e * simd::load(qt + j));
    simd::store(ra + j, Kd == kind::kda ? e * simd::load(xt + j) : simd::load(xt + j));
  }
  if (j < kb) {
    alignas(64) std::array<T, std::size_t(L)> bg{}, bq{}, bx{};
    for (index_t i = j; i < kb; ++i) {
      const auto u = std::size_t(i - j);
      bg[u] = gt[i], bq[u] = qt[i], bx[u] = xt[i];
    }
    const auto e = simd::exp(simd::load(bg.data()));
    simd::store(bg.data(), e);
    simd::store(bq.data(), e * simd::load(bq.data()));
    if (Kd == kind::kda) simd::store(bx.data(), e * simd::load(bx.data()));
    for (index_t i = j; i < kb; ++i) {
      const auto u = std::size_t(i - j);
      d[i] = bg[u], rq[i] = bq[u], ra[i] = bx[u];
    }
  }
}

/// Runs all tokens of one segment over the columns [c0, c0 + NB·width) of S ([K, V], row
/// stride lds), updating S in place and writing those columns of o. OneBlock: K <= key_block,
/// so every per-key factor of a token fits the stack arrays at once and the token loop has a
/// single key loop (as kernels/delta_rule.hpp's, which keeps the accumulators in registers).
template <class T, class Lane, std::size_t NB, kind Kd, bool OneBlock>
inline void recurrent_columns(const rows<T>& rw, index_t K, index_t c0, T* S, index_t lds) {
  using vec = typename Lane::type;
  constexpr index_t W = Lane::width;
  constexpr bool R7 = Kd == kind::rwkv7;
  const problem<T>& p = rw.p;
  const index_t n = rw.sg.len;
  if (n == 0) return;
  // acc_a = S_{t-1}ᵀ ra_t and acc_q = S_{t-1}ᵀ rq_t on this column tile.
  std::array<vec, NB> acc_a, acc_q, u, vv;
  // two sets of factors, swapped per token: the next token's (read in this token's pass) and
  // this token's decay (computed for its reads in the previous pass)
  alignas(64) std::array<T, key_block> d0, d1, ra, rq;
  T* dcur = d0.data();
  T* dnext = d1.data();
  for (std::size_t r = 0; r < NB; ++r) acc_a[r] = acc_q[r] = Lane::zero();
  for (index_t i0 = 0; i0 < K; i0 += key_block) {  // prologue: token 0's reads from S_0
    const index_t kb = std::min(key_block, K - i0);
    read_factors<T, Kd>(rw, 0, i0, kb, dcur, ra.data(), rq.data());
    for (index_t i = 0; i < kb; ++i) {
      const vec ai = Lane::bcast(ra[sz(i)]), qi = Lane::bcast(rq[sz(i)]);
      const T* s = S + (i0 + i) * lds + c0;
      for (std::size_t r = 0; r < NB; ++r) {
        const vec x = Lane::load(s + index_t(r) * W);
        acc_a[r] = Lane::fma(ai, x, acc_a[r]);
        acc_q[r] = Lane::fma(qi, x, acc_q[r]);
      }
    }
  }
  for (index_t t = 0; t < n; ++t) {
    const T* kt = rw.k(t);
    const T* qt = rw.q(t);
    const T* vt = rw.v(t) + c0;
    T* ot = rw.o(t) + c0;
    T rk = T(1);  // kda: k_t = rk · k_raw
    if constexpr (!R7) {
      rk = inv_norm(kt, K, p.l2norm);
      const T cq = p.scale * inv_norm(qt, K, p.l2norm);
      const T kq = rk * cq * simd::dot(kt, qt, K);
      // u = beta (v - rk·acc_a);  o = cq·acc_q + (k·q) u
      const vec vb = Lane::bcast(rw.beta(t)), vrk = Lane::bcast(-rk), vcq = Lane::bcast(cq),
                vkq = Lane::bcast(kq);
      for (std::size_t r = 0; r < NB; ++r) {
        u[r] = vb * Lane::fma(vrk, acc_a[r], Lane::load(vt + index_t(r) * W));
        Lane::store(ot + index_t(r) * W, Lane::fma(vkq, u[r], vcq * acc_q[r]));
      }
    } else {
      // u = a_tᵀ S_{t-1} = acc_a;  o = s·acc_q + s(b·r) u + s(k·r) v
      const T br = p.scale * simd::dot(rw.b(t), qt, K), kr = p.scale * simd::dot(kt, qt, K);
      const vec vs = Lane::bcast(p.scale), vbr = Lane::bcast(br), vkr = Lane::bcast(kr);
      for (std::size_t r = 0; r < NB; ++r) {
        u[r] = acc_a[r];
        vv[r] = Lane::load(vt + index_t(r) * W);
        Lane::store(ot + index_t(r) * W,
                    Lane::fma(vkr, vv[r], Lane::fma(vbr, u[r], vs * acc_q[r])));
      }
    }
    const T* c1 = R7 ? rw.b(t) : kt;  // rank-one row factor of u (kda: times rk)
    if (t + 1 < n) {
      if (OneBlock) read_factors<T, Kd>(rw, t + 1, 0, K, dnext, ra.data(), rq.data());
      for (std::size_t r = 0; r < NB; ++r) acc_a[r] = acc_q[r] = Lane::zero();
      for (index_t i0 = 0; i0 < K; i0 += key_block) {
        const index_t kb = std::min(key_block, K - i0);
        if (!OneBlock) {
          decay_block(rw.g(t) + i0, kb, dcur);
          read_factors<T, Kd>(rw, t + 1, i0, kb, dnext, ra.data(), rq.data());
        }
        for (index_t i = 0; i < kb; ++i) {
          const index_t ik = i0 + i;
          const vec di = Lane::bcast(dcur[i]), c1i = Lane::bcast(rk * c1[ik]);
          const vec ai = Lane::bcast(ra[sz(i)]), qi = Lane::bcast(rq[sz(i)]);
          T* s = S + ik * lds + c0;
          if constexpr (R7) {
            const vec c2i = Lane::bcast(kt[ik]);
            for (std::size_t r = 0; r < NB; ++r) {
              vec x = Lane::fma(c1i, u[r], di * Lane::load(s + index_t(r) * W));
              x = Lane::fma(c2i, vv[r], x);
              Lane::store(s + index_t(r) * W, x);
              acc_a[r] = Lane::fma(ai, x, acc_a[r]);
              acc_q[r] = Lane::fma(qi, x, acc_q[r]);
            }
          } else {
            for (std::size_t r = 0; r < NB; ++r) {
              const vec x = Lane::fma(c1i, u[r], di * Lane::load(s + index_t(r) * W));
              Lane::store(s + index_t(r) * W, x);
              acc_a[r] = Lane::fma(ai, x, acc_a[r]);
              acc_q[r] = Lane::fma(qi, x, acc_q[r]);
            }
          }
        }
      }
      std::swap(dcur, dnext);
    } else {
      for (index_t i0 = 0; i0 < K; i0 += key_block) {
        const index_t kb = std::min(key_block, K - i0);
        if (!OneBlock) decay_block(rw.g(t) + i0, kb, dcur);
        for (index_t i = 0; i < kb; ++i) {
          const index_t ik = i0 + i;
          const vec di = Lane::bcast(dcur[i]), c1i = Lane::bcast(rk * c1[ik]);
          T* s = S + ik * lds + c0;
          for (std::size_t r = 0; r < NB; ++r) {
            vec x = Lane::fma(c1i, u[r], di * Lane::load(s + index_t(r) * W));
            if constexpr (R7) x = Lane::fma(Lane::bcast(kt[ik]), vv[r], x);
            Lane::store(s + index_t(r) * W, x);
          }
        }
      }
    }
  }
}

/// Runs the recurrent form (delta_rule::for_each_recurrent_tile); allocates nothing.
template <class T>
void run_recurrent(const problem<T>& p) {
  const index_t K = p.q.extent(3);
  const bool one = K <= key_block;
  delta_rule::for_each_recurrent_tile<T>(
      p, 9.0,
      [&]<class Lane, std::size_t NB>(const auto& sg, index_t hv, index_t h, index_t col, T* S,
                                      index_t lds) {
        const rows<T> rw{p, sg, hv, h};
        if (p.kd == kind::kda) {
          if (one) {
            recurrent_columns<T, Lane, NB, kind::kda, true>(rw, K, col, S, lds);
          } else {
            recurrent_columns<T, Lane, NB, kind::kda, false>(rw, K, col, S, lds);
          }
        } else {
          if (one) {
            recurrent_columns<T, Lane, NB, kind::rwkv7, true>(rw, K, col, S, lds);
          } else {
            recurrent_columns<T, Lane, NB, kind::rwkv7, false>(rw, K, col, S, lds);
          }
        }
      });
}

// ---- chunked form ----------------------------------------------------------------------------

/// Sub-chunk length of the exact diagonal blocks.
inline constexpr index_t sub_chunk = 16;

/// Per-thread scratch of the chunked form: O(C·(K+V) + C² + K·V), views of workspace memory
/// (take() carves them from a frame, zeroed, 64-byte aligned); trivially copyable.
template <class T>
struct chunk_workspace {
  index_t C = 0, K = 0, V = 0;
  std::span<T> kc, qc, ac, bc;  // [C, K] keys, s·queries, a, b
  std::span<T> eG, eGm, eGc;    // [C, K] e^G, e^{G⁻}, e^{G_C - G}
  std::span<T> xs, ys;          // [C, K] factored rows of the strip products
  std::span<T> m1, m2, m3, m4;  // [C, C] interaction matrices
  std::span<T> tm;              // [C, C] T
  std::span<T> x, wu;           // [C, K+V]
  std::span<T> r;               // [2C, V]
  std::span<T> wq;              // [2C, K]
  std::span<T> s;               // [K, V]
  std::span<T> e, tmp;          // [K]
  std::span<double> G;          // [C + 1, K] row 0 = 0, row i+1 = G_i
  std::span<T> bt;              // [C] beta
  // linalg::gemm's packing of a transposed B: common::gemm_pack<T>(), this thread's buffer

  template <class Frame>  // workspace::frame, or common::scratch_size to count the bytes
  void take(Frame& f, index_t c, index_t k, index_t v) {
    C = c, K = k, V = v;
    for (auto* m : {&kc, &qc, &ac, &bc, &eG, &eGm, &eGc, &xs, &ys})
      *m = common::take_zeroed<T>(f, c * k);
    for (auto* m : {&m1, &m2, &m3, &m4, &tm}) *m = common::take_zeroed<T>(f, c * c);
    x = common::take_zeroed<T>(f, c * (k + v));
    wu = common::take_zeroed<T>(f, c * (k + v));
    r = common::take_zeroed<T>(f, 2 * c * v);
    wq = common::take_zeroed<T>(f, 2 * c * k);
    s = common::take_zeroed<T>(f, k * v);
    e = common::take_zeroed<T>(f, k);
    tmp = common::take_zeroed<T>(f, k);
    G = common::take_zeroed<double>(f, (c + 1) * k);
    bt = common::take_zeroed<T>(f, c);
  }
};

/// One interaction matrix M[i, j] = Σ_c x_ic y_jc exp(E_ic - G_jc) (see the header comment).
/// `Ex` is the exponent row table of x (ws.G offset: row i+1 is G_i, row i is G⁻_i).
template <class T>
struct interaction {
  const T* x;
  const T* y;
  bool strict;  // j < i with E = G⁻; else j <= i with E = G
  T* M;
};

/// Fills every interaction of `list` for a chunk of c rows (upper parts zero).
template <class T, std::size_t NI>
void interactions(chunk_workspace<T>& ws, index_t c, const std::array<interaction<T>, NI>& list) {
  const index_t K = ws.K;
  const double* G = ws.G.data();  // row i+1 = G_i, row i = G⁻_i
  for (const auto& it : list) std::fill_n(it.M, c * c, T(0));
  for (index_t p0 = 0; p0 < c; p0 += sub_chunk) {
    const index_t p1 = std::min(c, p0 + sub_chunk), L = p1 - p0;
    if (p0 > 0) {  // strip: rows [p0, p1) x columns [0, p0), through R = G_{p0-1} (row p0)
      const double* R = G + p0 * K;
      for (index_t j = 0; j < p0; ++j) {  // ys_j = exp(R - G_j)
        const double* Gj = G + (j + 1) * K;
        T* yj = ws.ys.data() + j * K;
        for (index_t cc = 0; cc < K; ++cc) yj[cc] = static_cast<T>(R[cc] - Gj[cc]);
        simd::exp(yj, yj, K);
      }
      for (const auto& it : list) {
        // x̃_i = x_i ⊙ exp(E_i - R), ỹ_j = y_j ⊙ ys_j; M[p, 0:p0] = X̃ Ỹᵀ
        for (index_t i = p0; i < p1; ++i) {
          const double* Ei = G + (it.strict ? i : i + 1) * K;
          T* xi = ws.xs.data() + (i - p0) * K;
          for (index_t cc = 0; cc < K; ++cc) xi[cc] = static_cast<T>(Ei[cc] - R[cc]);
          simd::exp(xi, xi, K);
          const T* src = it.x + i * K;
          for (index_t cc = 0; cc < K; ++cc) xi[cc] *= src[cc];
        }
        T* yt = ws.wq.data();  // [p0, K] scratch (wq is free during this phase)
        for (index_t j = 0; j < p0; ++j) {
          const T* yj = ws.ys.data() + j * K;
          const T* src = it.y + j * K;
          T* d = yt + j * K;
          for (index_t cc = 0; cc < K; ++cc) d[cc] = yj[cc] * src[cc];
        }
        linalg::gemm<T, false, true>(L, p0, K, ws.xs.data(), K, yt, K, it.M + p0 * c, c, false,
                                     common::gemm_pack<T>());
      }
    }
    // diagonal block, exact: e_c = exp(E_ic - G_jc)
    for (index_t i = p0; i < p1; ++i) {
      for (index_t j = p0; j <= i; ++j) {
        const double* Gj = G + (j + 1) * K;
        bool have_strict = false, have_incl = false;
        for (const auto& it : list) {
          if (it.strict && j == i) continue;
          const bool strict = it.strict;
          if ((strict && !have_strict) || (!strict && !have_incl)) {
            const double* Ei = G + (strict ? i : i + 1) * K;
            T* e = strict ? ws.e.data() : ws.tmp.data();
            for (index_t cc = 0; cc < K; ++cc) e[cc] = static_cast<T>(Ei[cc] - Gj[cc]);
            simd::exp(e, e, K);
            (strict ? have_strict : have_incl) = true;
          }
          const T* e = strict ? ws.e.data() : ws.tmp.data();
          const T* xi = it.x + i * K;
          const T* yj = it.y + j * K;
          T acc = T(0);
          for (index_t cc = 0; cc < K; ++cc) acc += xi[cc] * yj[cc] * e[cc];
          it.M[i * c + j] = acc;
        }
      }
    }
  }
}

/// T = (I + A)^-1 for strictly lower A (forward substitution, row by row).
template <class T>
void unit_lower_inverse(const T* A, T* Tm, index_t c) {
  for (index_t i = 0; i < c; ++i) {
    T* ti = Tm + i * c;
    std::fill_n(ti, c, T(0));
    ti[i] = T(1);
    for (index_t m = 0; m < i; ++m) simd::axpy(ti, -A[i * c + m], Tm + m * c, m + 1);
  }
}

/// One (segment, value head): all chunks in order, the state carried in ws.s.
template <class T, kind Kd>
void chunked_sequence(const problem<T>& p, const rows<T>& rw, index_t C, chunk_workspace<T>& ws) {
  const index_t K = p.q.extent(3), V = p.v.extent(3);
  const index_t len = rw.sg.len;
  T* Sp = p.state.data() + rw.sg.n * p.state.stride(0) + rw.hv * p.state.stride(1);
  const index_t lds = p.state.stride(2);
  auto S = mat(ws.s.data(), K, V, V);
  S = mat(Sp, K, V, lds);
  const index_t ldo = p.o.stride(1);
  const index_t KV = K + V;
  for (index_t t0 = 0; t0 < len; t0 += C) {
    const index_t c = std::min(C, len - t0);
    // inputs and the cumulative gate (double; row 0 = 0, row i+1 = G_i)
    std::fill_n(ws.G.data(), K, 0.0);
    for (index_t i = 0; i < c; ++i) {
      const T* kr = rw.k(t0 + i);
      const T* qr = rw.q(t0 + i);
      T* kd = ws.kc.data() + i * K;
      T* qd = ws.qc.data() + i * K;
      if constexpr (Kd == kind::kda) {
        const T rk = inv_norm(kr, K, p.l2norm);
        const T cq = p.scale * inv_norm(qr, K, p.l2norm);
        for (index_t j = 0; j < K; ++j) kd[j] = rk * kr[j], qd[j] = cq * qr[j];
        ws.bt[sz(i)] = rw.beta(t0 + i);
      } else {
        const T* ar = rw.a(t0 + i);
        const T* br = rw.b(t0 + i);
        for (index_t j = 0; j < K; ++j) {
          kd[j] = kr[j], qd[j] = p.scale * qr[j];
          ws.ac[sz(i * K + j)] = ar[j];
          ws.bc[sz(i * K + j)] = br[j];
        }
      }
      const T* gr = rw.g(t0 + i);
      const double* prev = ws.G.data() + i * K;
      double* cur = ws.G.data() + (i + 1) * K;
      for (index_t j = 0; j < K; ++j)
        cur[j] = prev[j] + std::max(static_cast<double>(gr[j]), gate_floor);
    }
    const double* Gc = ws.G.data() + c * K;
    for (index_t i = 0; i < c; ++i) {
      const double* Gi = ws.G.data() + (i + 1) * K;
      const double* Gm = ws.G.data() + i * K;
      T* eg = ws.eG.data() + i * K;
      T* egm = ws.eGm.data() + i * K;
      T* egc = ws.eGc.data() + i * K;
      for (index_t j = 0; j < K; ++j) {
        eg[j] = static_cast<T>(Gi[j]);
        egm[j] = static_cast<T>(Gm[j]);
        egc[j] = static_cast<T>(Gc[j] - Gi[j]);
      }
      simd::exp(eg, eg, K);
      if constexpr (Kd == kind::rwkv7) simd::exp(egm, egm, K);
      simd::exp(egc, egc, K);
    }
    T* gamma = ws.e.data();  // e^{G_C}, [K] (ws.e is reused inside interactions: set after)
    T* kc = ws.kc.data();
    T* qc = ws.qc.data();
    T* Tm = ws.tm.data();
    T* r = ws.r.data();  // [2c, V]
    T* o = rw.o(t0);
    if constexpr (Kd == kind::kda) {
      T* A = ws.m1.data();
      T* P = ws.m2.data();
      interactions<T, 2>(ws, c, {{{kc, kc, false, A}, {qc, kc, false, P}}});
      // A: strictly lower, times beta_i (the diagonal of M(k, k) is not used)
      for (index_t i = 0; i < c; ++i) {
        const T bi = ws.bt[sz(i)];
        for (index_t j = 0; j < i; ++j) A[i * c + j] *= bi;
        A[i * c + i] = T(0);
      }
      unit_lower_inverse(A, Tm, c);
      T* xy = ws.x.data();  // [c, K+V]: diag(beta)(K ⊙ e^G) | diag(beta) V
      for (index_t i = 0; i < c; ++i) {
        const T bi = ws.bt[sz(i)];
        T* row = xy + i * KV;
        const T* eg = ws.eG.data() + i * K;
        for (index_t j = 0; j < K; ++j) row[j] = bi * kc[i * K + j] * eg[j];
        const T* vr = rw.v(t0 + i);
        for (index_t j = 0; j < V; ++j) row[K + j] = bi * vr[j];
      }
      T* wu = ws.wu.data();
      linalg::gemm<T, false, false>(c, KV, c, Tm, c, xy, KV, wu, KV, false, common::gemm_pack<T>(),
                                    true);
      T* wq = ws.wq.data();  // [W; s Q ⊙ e^G]
      for (index_t i = 0; i < c; ++i) {
        std::copy_n(wu + i * KV, K, wq + i * K);
        const T* eg = ws.eG.data() + i * K;
        for (index_t j = 0; j < K; ++j) wq[(c + i) * K + j] = qc[i * K + j] * eg[j];
      }
      linalg::gemm<T, false, false>(2 * c, V, K, wq, K, ws.s.data(), V, r, V, false,
                                    common::gemm_pack<T>());
      for (index_t i = 0; i < c; ++i) {  // U' = U - W S_n
        T* ri = r + i * V;
        const T* ui = wu + i * KV + K;
        for (index_t j = 0; j < V; ++j) ri[j] = ui[j] - ri[j];
      }
      for (index_t i = 0; i < c; ++i) std::copy_n(r + (c + i) * V, V, o + i * ldo);
      linalg::gemm<T, false, false>(c, V, c, P, c, r, V, o, ldo, true, common::gemm_pack<T>(),
                                    true);
      // S_{n+1} = e^{G_C} ⊙ S_n + (K ⊙ e^{G_C - G})ᵀ U'
      for (index_t j = 0; j < K; ++j) gamma[j] = static_cast<T>(Gc[j]);
      simd::exp(gamma, gamma, K);
      for (index_t j = 0; j < K; ++j) simd::scale(ws.s.data() + j * V, gamma[j], V);
      for (index_t i = 0; i < c; ++i) {
        T* ki = kc + i * K;
        const T* egc = ws.eGc.data() + i * K;
        for (index_t j = 0; j < K; ++j) ki[j] *= egc[j];
      }
      linalg::gemm<T, true, false>(K, V, c, kc, K, r, V, ws.s.data(), V, true,
                                   common::gemm_pack<T>());
    } else {
      T* ac = ws.ac.data();
      T* bc = ws.bc.data();
      T* Aab = ws.m1.data();
      T* Aak = ws.m2.data();
      T* Pb = ws.m3.data();
      T* Pk = ws.m4.data();
      interactions<T, 4>(
          ws, c,
          {{{ac, bc, true, Aab}, {ac, kc, true, Aak}, {qc, bc, false, Pb}, {qc, kc, false, Pk}}});
      for (index_t i = 0; i < c * c; ++i) Aab[i] = -Aab[i];  // (I - A_ab)^-1 = (I + (-A_ab))^-1
      unit_lower_inverse(Aab, Tm, c);
      T* xz = ws.x.data();  // [c, K+V]: a ⊙ e^{G⁻} | A_ak V
      for (index_t i = 0; i < c; ++i) {
        const T* egm = ws.eGm.data() + i * K;
        for (index_t j = 0; j < K; ++j) xz[i * KV + j] = ac[i * K + j] * egm[j];
      }
      // A_ak V: rows of v are strided in the caller's layout; gather into wu's right part first
      T* wu = ws.wu.data();
      for (index_t i = 0; i < c; ++i) std::copy_n(rw.v(t0 + i), V, wu + i * KV + K);
      linalg::gemm<T, false, false>(c, V, c, Aak, c, wu + K, KV, xz + K, KV, false,
                                    common::gemm_pack<T>(), true);
      linalg::gemm<T, false, false>(c, KV, c, Tm, c, xz, KV, wu, KV, false, common::gemm_pack<T>(),
                                    true);
      T* wq = ws.wq.data();  // [W; s Q ⊙ e^G]
      for (index_t i = 0; i < c; ++i) {
        std::copy_n(wu + i * KV, K, wq + i * K);
        const T* eg = ws.eG.data() + i * K;
        for (index_t j = 0; j < K; ++j) wq[(c + i) * K + j] = qc[i * K + j] * eg[j];
      }
      linalg::gemm<T, false, false>(2 * c, V, K, wq, K, ws.s.data(), V, r, V, false,
                                    common::gemm_pack<T>());
      for (index_t i = 0; i < c; ++i) {  // Ŝ = W S_n + U
        T* ri = r + i * V;
        const T* ui = wu + i * KV + K;
        for (index_t j = 0; j < V; ++j) ri[j] += ui[j];
      }
      // values in a contiguous [c, V] block (xz's right part is free now)
      T* vc = xz + K;
      for (index_t i = 0; i < c; ++i) std::copy_n(rw.v(t0 + i), V, vc + i * KV);
      for (index_t i = 0; i < c; ++i) std::copy_n(r + (c + i) * V, V, o + i * ldo);
      linalg::gemm<T, false, false>(c, V, c, Pb, c, r, V, o, ldo, true, common::gemm_pack<T>(),
                                    true);
      linalg::gemm<T, false, false>(c, V, c, Pk, c, vc, KV, o, ldo, true, common::gemm_pack<T>(),
                                    true);
      for (index_t j = 0; j < K; ++j) gamma[j] = static_cast<T>(Gc[j]);
      simd::exp(gamma, gamma, K);
      for (index_t j = 0; j < K; ++j) simd::scale(ws.s.data() + j * V, gamma[j], V);
      for (index_t i = 0; i < c; ++i) {
        const T* egc = ws.eGc.data() + i * K;
        for (index_t j = 0; j < K; ++j) {
          bc[i * K + j] *= egc[j];
          kc[i * K + j] *= egc[j];
        }
      }
      linalg::gemm<T, true, false>(K, V, c, bc, K, r, V, ws.s.data(), V, true,
                                   common::gemm_pack<T>());
      linalg::gemm<T, true, false>(K, V, c, kc, K, vc, KV, ws.s.data(), V, true,
                                   common::gemm_pack<T>());
    }
  }
  mat(Sp, K, V, lds) = S;
}

/// Runs the chunked form over every (segment, value head); one workspace per thread (the delta
/// rule's driver).
template <class T>
void run_chunked(const problem<T>& p, index_t chunk_size) {
  delta_rule::for_each_head_chunked<chunk_workspace<T>>(
      p, chunk_size,
      [&](const segment& sg, index_t hv, index_t h, index_t C, chunk_workspace<T>& ws) {
        const rows<T> rw{p, sg, hv, h};
        if (p.kd == kind::kda) {
          chunked_sequence<T, kind::kda>(p, rw, C, ws);
        } else {
          chunked_sequence<T, kind::rwkv7>(p, rw, C, ws);
        }
      });
}

}  // namespace seqmix::kernels::delta_rule::dplr
