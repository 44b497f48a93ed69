// SPDX-License-Identifier: MIT
// The delta-rule engine behind seqmix::delta_net and seqmix::gated_delta_net (docs/math.md §2).
//
// Recurrence, per (sequence, value head), q_t, k_t rows of K (l2-normalised first when asked,
// q scaled by s), v_t a row of V, S a [K, V] matrix, gate g_t = 0 for DeltaNet:
//     S'_t = exp(g_t) S_{t-1}                 (decay first)
//     u_t  = beta_t (v_t - S'_tᵀ k_t)          (the correction reads the decayed state)
//     S_t  = S'_t + k_t u_tᵀ
//     o_t  = S_tᵀ (s q_t)
//
// Dimensions: B batch, T tokens, H q/k heads, HV value heads (GVA: HV % H == 0, value head hv
// reads q/k head hv / (HV / H)), K key width, V value width, N packed sequences, C chunk length.
//
// Forms and their cost (per value head, FLOPs count multiply and add as two):
//  - recurrent: 7·K·V per token (decay 1, Sᵀk 2, rank-1 update 2, Sᵀq 2); O(1) extra memory,
//    nothing allocated. Implemented column-tile-major: the columns of S evolve independently
//    (column j only sees v_t[j]), so a [K, 64] column tile of S stays in L1 while all tokens of
//    the sequence stream past it, and one pass over the tile per token does the update of
//    token t and the reads Sᵀk_{t+1}, Sᵀq_{t+1} of the next token:
//        o_t = exp(g_t) S_{t-1}ᵀ q_t + (k_t·q_t) u_t      (same value as S_tᵀ q_t).
//  - chunked (WY/UT transform, chunk C): per chunk
//        A_ij = beta_i (k_i·k_j) exp(G_i - G_j), j < i    (G: chunk-local cumulative gate)
//        T    = (I + A)^-1                                   (forward substitution)
//        W    = T diag(beta ⊙ exp(G)) K,   U = T diag(beta) V
//        V'   = U - W S_n
//        O    = (s Q ⊙ exp(G)) S_n + ((s Q Kᵀ) ⊙ D) V',     D_ij = exp(G_i - G_j), j <= i
//        S_{n+1} = exp(G_C) S_n + (K ⊙ exp(G_C - G))ᵀ V'
//    ≈ 2C(3K + 2V) + C²/3 + 6·K·V FLOPs per token (GEMMs: core/gemm.hpp), O(C·(K+V) + K·V)
//    working memory per thread, independent of T, from the workspace arena (core/workspace.hpp):
//    a repeated shape allocates nothing.
//
// Measured (bench/bench_delta.cpp, B = 1, H = 8, 1 thread, FMA peak 116.6 GFLOP/s): recurrent
// 81 GFLOP/s (69 %) at K = V = 64 and 73 (63 %) at 128 while the inputs are cache-resident
// (T = 512); chunked 51-56 GFLOP/s (44-48 %) at 64 and 62-66 (54-57 %) at 128. The recurrent
// form therefore wins in tokens/s at every T (see prefer_chunked). With the [B, T, H, D] layout a
// head's rows are H·D apart; once the inputs come from DRAM (T >= 8192) this costs the token
// loop TLB and cache misses: K = V = 64, T = 65536 runs at 150k tokens/s plainly, 250k with the
// row touching below (touch_rows), and 328k when the same data is stored head-major
// ([B, H, T, D], passed as strided [B, T, H, D] views): callers whose projections can write
// head-major should do so.
//
// Gates. Every exponent above is <= 0 when the gates are <= 0 (no exp(G_i)·exp(-G_j)
// factoring). G is accumulated in double, with each gate clamped at -1000 first: exp(-1000) is 0
// in float and double alike, so the clamp changes no result, while it turns -inf gates ("forget
// everything") into finite numbers so that G_i - G_j never becomes -inf - (-inf) = NaN, and the
// double sum keeps G_i - G_j exact to ~1e-11 even after gates of -1e4.
//
// Stability. The recurrence multiplies S by (I - beta k kᵀ) along k: eigenvalue
// 1 - beta·|k|². It is stable while |1 - beta·|k|²| <= 1 (beta in [0, 2] with unit keys, which
// use_qk_l2norm gives; beta = 2 is the eigenvalue -1 edge). Outside that range S grows
// geometrically in every form. Measured (test "unstable recurrence", |k| = 2, beta = 1, so
// eigenvalue -3): with |S_T| ~ 2e19 after 256 tokens, chunked and recurrent float both stay
// within ~3e-6 relative RMS of the double reference, because the error follows the dominant
// growing direction; the forms part only where the true values leave float's range, and then
// both produce inf/NaN (no form can represent them). In the chunked form, T = (I + A)^-1 then
// has entries of the size of the per-chunk growth, so chunk 16 keeps more headroom than 64.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <limits>
#include <new>
#include <optional>
#include <span>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include <seqmix/core/error.hpp>
#include <seqmix/core/gemm.hpp>
#include <seqmix/core/parallel.hpp>
#include <seqmix/core/simd.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/core/workspace.hpp>
#include <seqmix/kernels/common/scratch.hpp>

namespace seqmix::kernels::delta_rule {

/// Everything one call of the engine needs. Views keep the caller's strides.
template <class T>
struct problem {
  tensor_view<const T, 4> q;     // [B, T, H, K]
  tensor_view<const T, 4> k;     // [B, T, H, K]
  tensor_view<const T, 4> v;     // [B, T, HV, V]
  tensor_view<const T, 3> g;     // [B, T, HV] natural-log gates; empty for DeltaNet
  tensor_view<const T, 3> beta;  // [B, T, HV]
  tensor_view<T, 4> o;           // [B, T, HV, V]
  tensor_view<T, 4> state;       // [B or N, HV, K, V]
  T scale = T(1);
  bool l2norm = false;
  std::span<const index_t> cu_seqlens{};  // empty: B sequences of length T

  bool gated() const { return !g.empty(); }
  index_t sequences() const {
    return cu_seqlens.empty() ? q.extent(0) : static_cast<index_t>(cu_seqlens.size()) - 1;
  }
};

/// One sequence: batch row b, tokens [t0, t0 + len), state row n.
struct segment {
  index_t b, t0, len, n;
};

template <class T>
inline segment segment_of(const problem<T>& p, index_t i) {
  if (p.cu_seqlens.empty()) return {i, 0, p.q.extent(1), i};
  const auto u = static_cast<std::size_t>(i);
  return {0, p.cu_seqlens[u], p.cu_seqlens[u + 1] - p.cu_seqlens[u], i};
}

/// Gates below this are clamped (exp(-1000) == 0 in float and double; see the header comment).
inline constexpr double gate_floor = -1000.0;

// ---- validation ------------------------------------------------------------------------------

/// Validates a full-sequence call (forward_*). Throws shape_error naming the argument.
template <class T>
void validate(const checker& check, const problem<T>& p, index_t chunk_size = 1) {
  const auto& qs = p.q.shape();
  const index_t B = qs[0], TT = qs[1], H = qs[2], K = qs[3];
  check.nonempty("q", p.q);
  if (!(p.v.extent(2) > 0 && p.v.extent(3) > 0))
    check.fail("v", "must not be empty, got shape " +
                        detail::format_shape({p.v.shape().data(), p.v.shape().size()}));
  const index_t HV = p.v.extent(2), V = p.v.extent(3);
  check.shape("k", p.k, {B, TT, H, K});
  check.shape("v", p.v, {B, TT, any_extent, any_extent});
  if (!(HV % H == 0))
    check.fail("v", "value heads (" + std::to_string(HV) + ") must be a multiple of q/k heads (" +
                        std::to_string(H) + ")");
  if (p.gated()) check.shape("g", p.g, {B, TT, HV});
  check.shape("beta", p.beta, {B, TT, HV});
  check.shape("o", p.o, {B, TT, HV, V});
  if (!(chunk_size > 0)) check.fail("chunk_size", "must be > 0, got " + std::to_string(chunk_size));
  const index_t N = p.cu_seqlens.empty() ? B : check.cu_seqlens(p.cu_seqlens, B, TT);
  check.shape("state", p.state, {N, HV, K, V});
  check.inner_contiguous("q", p.q);
  check.inner_contiguous("k", p.k);
  check.inner_contiguous("v", p.v);
  check.inner_contiguous("o", p.o);
  check.inner_contiguous("state", p.state);
  if (p.gated()) check.log_gate("g", p.g);
  check.finite("beta", p.beta);
  if (!(std::isfinite(p.scale))) check.fail("scale", "must be finite");
}

// ---- recurrent form --------------------------------------------------------------------------

// Lane policies: the column-tile kernel is written once over "a vector of columns", either an
// xsimd batch or a plain scalar (for the columns left over after the full batches).
template <class T>
struct simd_lane {
  using type = simd::batch<T>;
  static constexpr index_t width = simd::lanes<T>;
  static type load(const T* p) { return simd::load(p); }
  static void store(T* p, const type& x) { simd::store(p, x); }
  static type fma(const type& a, const type& b, const type& c) { return simd::fma(a, b, c); }
  static type zero() { return type(T(0)); }
  static type bcast(T x) { return type(x); }
};
template <class T>
struct scalar_lane {
  using type = T;
  static constexpr index_t width = 1;
  static T load(const T* p) { return *p; }
  static void store(T* p, T x) { *p = x; }
  static T fma(T a, T b, T c) { return std::fma(a, b, c); }
  static T zero() { return T(0); }
  static T bcast(T x) { return x; }
};

/// Row pointers of one token of one (segment, value head); `t` counts from the segment start.
template <class T>
struct token_rows {
  const problem<T>& p;
  segment sg;
  index_t hv, hq;
  const T* q(index_t t) const {
    return p.q.data() + sg.b * p.q.stride(0) + (sg.t0 + t) * p.q.stride(1) + hq * p.q.stride(2);
  }
  const T* k(index_t t) const {
    return p.k.data() + sg.b * p.k.stride(0) + (sg.t0 + t) * p.k.stride(1) + hq * p.k.stride(2);
  }
  const T* v(index_t t) const {
    return p.v.data() + sg.b * p.v.stride(0) + (sg.t0 + t) * p.v.stride(1) + hv * p.v.stride(2);
  }
  T* o(index_t t) const {
    return p.o.data() + sg.b * p.o.stride(0) + (sg.t0 + t) * p.o.stride(1) + hv * p.o.stride(2);
  }
  T beta(index_t t) const {
    return p.beta
        .data()[sg.b * p.beta.stride(0) + (sg.t0 + t) * p.beta.stride(1) + hv * p.beta.stride(2)];
  }
  T gate(index_t t) const {
    return p.g.data()[sg.b * p.g.stride(0) + (sg.t0 + t) * p.g.stride(1) + hv * p.g.stride(2)];
  }
};

/// 1 / sqrt(Σx² + 1e-6) when l2-normalising, else 1.
template <class T>
inline T inv_norm(const T* x, index_t n, bool l2norm) {
  return l2norm ? T(1) / std::sqrt(simd::dot(x, x, n) + T(1e-6)) : T(1);
}

/// The token loop reads one row of q, k, v and o per token, H·D elements apart ([B, T, H, D]
/// layout); from DRAM each such row costs a TLB miss and a cache miss that the loop, busy with
/// the state, cannot overlap. Every `touch_block` tokens it therefore loads one element per cache
/// line of the rows of the next block in a tight loop, so those misses overlap (measured:
/// K = V = 64, T = 65536, 1 thread: 150k -> 250k tokens/s; software prefetch alone did not help).
inline constexpr index_t touch_block = 16;

template <class T>
inline T& touch_sink() {
  static thread_local T sink{};
  return sink;
}

template <class T>
inline T touch_rows(const token_rows<T>& rows, index_t t0, index_t t1, index_t K, index_t c0,
                    index_t width) {
  constexpr index_t line = 64 / index_t(sizeof(T));
  T acc = T(0);
  for (index_t t = t0; t < t1; ++t) {
    const T* q = rows.q(t);
    const T* k = rows.k(t);
    for (index_t i = 0; i < K; i += line) acc += q[i] + k[i];
    const T* v = rows.v(t) + c0;
    T* o = rows.o(t) + c0;  // output: prefetched for writing, never read
    for (index_t i = 0; i < width; i += line) {
      acc += v[i];
#if defined(__GNUC__) || defined(__clang__)
      __builtin_prefetch(o + i, 1);
#endif
    }
  }
  return acc;
}

/// Runs all tokens of one segment over the columns [c0, c0 + NB·width) of one state matrix
/// S ([K, V], row stride lds), updating S in place and writing those columns of o.
template <class T, class Lane, std::size_t NB, bool Gated>
inline void recurrent_columns(const token_rows<T>& rows, index_t K, index_t c0, T* S, index_t lds) {
  using vec = typename Lane::type;
  constexpr index_t W = Lane::width;
  const problem<T>& p = rows.p;
  const index_t n = rows.sg.len;
  if (n == 0) return;
  std::array<vec, NB> acc_k, acc_q, u;  // Sᵀk_t, Sᵀq_t (raw k, q), u_t on this column tile
  for (std::size_t r = 0; r < NB; ++r) acc_k[r] = acc_q[r] = Lane::zero();
  {  // prologue: Sᵀk_0 and Sᵀq_0 from S_0
    const T* kt = rows.k(0);
    const T* qt = rows.q(0);
    for (index_t i = 0; i < K; ++i) {
      const vec ki = Lane::bcast(kt[i]), qi = Lane::bcast(qt[i]);
      const T* s = S + i * lds + c0;
      for (std::size_t r = 0; r < NB; ++r) {
        const vec x = Lane::load(s + index_t(r) * W);
        acc_k[r] = Lane::fma(ki, x, acc_k[r]);
        acc_q[r] = Lane::fma(qi, x, acc_q[r]);
      }
    }
  }
  T touched = T(0);
  for (index_t t = 0; t < n; ++t) {
    if (t % touch_block == 0)
      touched += touch_rows(rows, t + touch_block, std::min(n, t + 2 * touch_block), K, c0,
                            index_t(NB) * W);
    const T* kt = rows.k(t);
    const T* qt = rows.q(t);
    const T rk = inv_norm(kt, K, p.l2norm);
    const T cq = p.scale * inv_norm(qt, K, p.l2norm);  // q_t = cq · q_raw
    const T kq = rk * cq * simd::dot(kt, qt, K);       // k_t · q_t (normalised, scaled)
    const T decay = Gated ? std::exp(std::max(rows.gate(t), T(gate_floor))) : T(1);
    const T bt = rows.beta(t);
    const T* vt = rows.v(t) + c0;
    T* ot = rows.o(t) + c0;
    // u = beta (v - decay·rk·Sᵀk_raw);  o = cq·decay·Sᵀq_raw + (k·q) u
    const vec vrk = Lane::bcast(-decay * rk), vb = Lane::bcast(bt), vcq = Lane::bcast(cq * decay),
              vkq = Lane::bcast(kq);
    for (std::size_t r = 0; r < NB; ++r) {
      u[r] = vb * Lane::fma(vrk, acc_k[r], Lane::load(vt + index_t(r) * W));
      Lane::store(ot + index_t(r) * W, Lane::fma(vkq, u[r], vcq * acc_q[r]));
    }
    // S = decay·S + k uᵀ, and in the same pass Sᵀk_{t+1}, Sᵀq_{t+1} for the next token.
    const vec vdecay = Lane::bcast(decay);
    if (t + 1 < n) {
      const T* kn = rows.k(t + 1);
      const T* qn = rows.q(t + 1);
      for (std::size_t r = 0; r < NB; ++r) acc_k[r] = acc_q[r] = Lane::zero();
      for (index_t i = 0; i < K; ++i) {
        const vec ki = Lane::bcast(rk * kt[i]), kx = Lane::bcast(kn[i]), qx = Lane::bcast(qn[i]);
        T* s = S + i * lds + c0;
        for (std::size_t r = 0; r < NB; ++r) {
          vec x = Lane::load(s + index_t(r) * W);
          x = Lane::fma(ki, u[r], Gated ? vdecay * x : x);
          Lane::store(s + index_t(r) * W, x);
          acc_k[r] = Lane::fma(kx, x, acc_k[r]);
          acc_q[r] = Lane::fma(qx, x, acc_q[r]);
        }
      }
    } else {
      for (index_t i = 0; i < K; ++i) {
        const vec ki = Lane::bcast(rk * kt[i]);
        T* s = S + i * lds + c0;
        for (std::size_t r = 0; r < NB; ++r) {
          const vec x = Lane::load(s + index_t(r) * W);
          Lane::store(s + index_t(r) * W, Lane::fma(ki, u[r], Gated ? vdecay * x : x));
        }
      }
    }
  }
  touch_sink<T>() = touched;
}

/// Column tile width (elements) of the recurrent kernel: 4 registers of columns where there are
/// 32 vector registers (AVX-512), 2 otherwise (3·NB accumulators must stay in registers).
template <class T>
inline constexpr std::size_t tile_batches = sizeof(simd::batch<T>) >= 64 ? 4 : 2;
template <class T>
inline constexpr index_t tile_width = index_t(tile_batches<T>) * simd::lanes<T>;

/// Recurrent calls with less work than this (FLOPs) run on the calling thread only.
inline constexpr double serial_below_flops = 5e5;

/// The recurrent forms' driver, shared with the DPLR engine (kernels/delta/dplr.hpp): one job
/// per (segment, value head, column tile of tile_width<T> state columns), each running
/// cols.template operator()<Lane, NB>(sg, hv, h, col, S, lds) over the tile (one full-width call,
/// or vector then scalar calls on the last, partial tile); S is the head's state [K, V] (row
/// stride lds). A call of less than serial_below_flops (flops_per_kv · B·T·HV·K·V) stays on the
/// calling thread: a decode step of H = 8, K = V = 64 is ~2 µs of work and waking a second thread
/// costs about as much (docs/bench/peers.md: 1.6 µs dispatch floor, 2 threads). The result does
/// not depend on that choice nor on the thread count (each job is computed the same way).
/// Allocates nothing.
template <class T, class P, class Cols>
void for_each_recurrent_tile(const P& p, double flops_per_kv, const Cols& cols) {
  const index_t K = p.q.extent(3), H = p.q.extent(2), HV = p.v.extent(2), V = p.v.extent(3);
  const index_t group = HV / H;
  const index_t N = p.sequences();
  constexpr index_t TW = tile_width<T>;
  const index_t tiles = (V + TW - 1) / TW;
  auto body = [&](index_t job) {
    const index_t tile = job % tiles, hv = (job / tiles) % HV, seq = job / (tiles * HV);
    const auto sg = segment_of(p, seq);
    if (sg.len == 0) return;
    T* S = p.state.data() + sg.n * p.state.stride(0) + hv * p.state.stride(1);
    const index_t lds = p.state.stride(2), h = hv / group;
    index_t c = tile * TW;
    const index_t end = std::min(V, c + TW);
    if (end - c == TW) {
      cols.template operator()<simd_lane<T>, tile_batches<T>>(sg, hv, h, c, S, lds);
      return;
    }
    for (; c + simd::lanes<T> <= end; c += simd::lanes<T>)
      cols.template operator()<simd_lane<T>, 1>(sg, hv, h, c, S, lds);
    for (; c < end; ++c) cols.template operator()<scalar_lane<T>, 1>(sg, hv, h, c, S, lds);
  };
  const double work = flops_per_kv * double(p.q.extent(0)) * double(p.q.extent(1)) * double(HV) *
                      double(K) * double(V);
  if (work < serial_below_flops) {
    for (index_t job = 0; job < N * HV * tiles; ++job) body(job);
  } else {
    parallel_for(N * HV * tiles, body);
  }
}

/// Runs the recurrent form; allocates nothing: all per-token scalars are recomputed per tile
/// (3 dots of K per token).
template <class T>
void run_recurrent(const problem<T>& p) {
  const index_t K = p.q.extent(3);
  const bool gated = p.gated();
  for_each_recurrent_tile<T>(
      p, 7.0,
      [&]<class Lane, std::size_t NB>(const segment& sg, index_t hv, index_t h, index_t col, T* S,
                                      index_t lds) {
        const token_rows<T> rows{p, sg, hv, h};
        if (gated) {
          recurrent_columns<T, Lane, NB, true>(rows, K, col, S, lds);
        } else {
          recurrent_columns<T, Lane, NB, false>(rows, K, col, S, lds);
        }
      });
}

// ---- chunked form (WY/UT transform) ---------------------------------------------------------

template <class T>
using row_matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using row_map = Eigen::Map<row_matrix<T>, Eigen::Unaligned, Eigen::OuterStride<>>;
template <class T>
using const_row_map = Eigen::Map<const row_matrix<T>, Eigen::Unaligned, Eigen::OuterStride<>>;

template <class T>
inline row_map<T> mat(T* p, index_t rows, index_t cols, index_t ld) {
  return row_map<T>(p, rows, cols, Eigen::OuterStride<>(ld));
}

/// Per-thread scratch of the chunked form: O(C·(K+V) + C² + K·V) elements, views of workspace
/// memory (take() carves them from a frame, zeroed, 64-byte aligned); trivially copyable.
template <class T>
struct chunk_workspace {
  index_t C = 0, K = 0, V = 0;
  std::span<T> kq;           // [2C, K]: rows [0,c) keys, [c,2c) queries
  std::span<T> kk;           // [2C, C]: K Kᵀ on top, Q Kᵀ (-> P) below
  std::span<T> a;            // [C, C] A (strictly lower)
  std::span<T> tm;           // [C, C] T = (I + A)^-1
  std::span<T> x;            // [C, K+V] diag(beta·exp(G)) K | diag(beta) V
  std::span<T> y;            // [2C, K] W over Q ⊙ exp(G)
  std::span<T> w;            // [C, K+V] W | U
  std::span<T> uu;           // [2C, V] W S_n -> V' over (Q ⊙ e^G) S_n
  std::span<T> s;            // [K, V] the running state S_n
  std::span<T> e;            // [C] a row of exponents
  std::span<double> G;       // [C] chunk-local cumulative gate
  std::span<T> eg, egc, bt;  // [C] exp(G), exp(G_c - G), beta
  // linalg::gemm's packing of a transposed B: common::gemm_pack<T>(), this thread's buffer

  template <class Frame>  // workspace::frame, or common::scratch_size to count the bytes
  void take(Frame& f, index_t c, index_t k, index_t v) {
    C = c, K = k, V = v;
    kq = common::take_zeroed<T>(f, 2 * c * k);
    kk = common::take_zeroed<T>(f, 2 * c * c);
    a = common::take_zeroed<T>(f, c * c);
    tm = common::take_zeroed<T>(f, c * c);
    x = common::take_zeroed<T>(f, c * (k + v));
    y = common::take_zeroed<T>(f, 2 * c * k);
    w = common::take_zeroed<T>(f, c * (k + v));
    uu = common::take_zeroed<T>(f, 2 * c * v);
    s = common::take_zeroed<T>(f, k * v);
    e = common::take_zeroed<T>(f, c);
    G = common::take_zeroed<double>(f, c);
    eg = common::take_zeroed<T>(f, c);
    egc = common::take_zeroed<T>(f, c);
    bt = common::take_zeroed<T>(f, c);
  }
};

/// One (segment, value head): all chunks in order, state carried in ws.s.
template <class T>
void chunked_sequence(const problem<T>& p, const token_rows<T>& rows, index_t C,
                      chunk_workspace<T>& ws) {
  const index_t K = p.q.extent(3), V = p.v.extent(3);
  const index_t len = rows.sg.len;
  T* Sp = p.state.data() + rows.sg.n * p.state.stride(0) + rows.hv * p.state.stride(1);
  const index_t lds = p.state.stride(2);
  auto S = mat(ws.s.data(), K, V, V);  // S_n: [K, V], a contiguous copy of the caller's state
  S = mat(Sp, K, V, lds);
  const bool gated = p.gated();
  const index_t ldo = p.o.stride(1);

  for (index_t t0 = 0; t0 < len; t0 += C) {
    const index_t c = std::min(C, len - t0);
    const auto uc = static_cast<std::size_t>(c);
    // phase 1: chunk-local inputs. kc: [c, K] normalised keys; qc: [c, K] s·normalised queries
    T* kc = ws.kq.data();
    T* qc = ws.kq.data() + c * K;
    double G = 0;
    for (index_t i = 0; i < c; ++i) {
      const T* kr = rows.k(t0 + i);
      const T* qr = rows.q(t0 + i);
      const T rk = inv_norm(kr, K, p.l2norm);
      const T cq = p.scale * inv_norm(qr, K, p.l2norm);
      for (index_t j = 0; j < K; ++j) {
        kc[i * K + j] = rk * kr[j];
        qc[i * K + j] = cq * qr[j];
      }
      if (gated) G += std::max(static_cast<double>(rows.gate(t0 + i)), gate_floor);
      ws.G[std::size_t(i)] = G;
      ws.bt[std::size_t(i)] = rows.beta(t0 + i);
    }
    for (index_t i = 0; i < c; ++i) {
      const auto ui = std::size_t(i);
      ws.e[ui] = static_cast<T>(ws.G[ui]);
      ws.egc[ui] = static_cast<T>(ws.G[uc - 1] - ws.G[ui]);
    }
    simd::exp(ws.e.data(), ws.eg.data(), c);     // exp(G_i) <= 1
    simd::exp(ws.egc.data(), ws.egc.data(), c);  // exp(G_c - G_i) <= 1
    const T gamma = ws.eg[uc - 1];               // exp(G_c)

    // [K; Q] Kᵀ: [2c, c] (top: K Kᵀ, bottom: s Q Kᵀ)
    linalg::gemm<T, false, true>(2 * c, c, K, ws.kq.data(), K, kc, K, ws.kk.data(), c, false,
                                 common::gemm_pack<T>());
    // A (strictly lower) and P = (s Q Kᵀ) ⊙ D (lower with diagonal), D_ij = exp(G_i - G_j)
    T* A = ws.a.data();
    T* P = ws.kk.data() + c * c;
    for (index_t i = 0; i < c; ++i) {
      for (index_t j = 0; j <= i; ++j)
        ws.e[std::size_t(j)] = static_cast<T>(ws.G[std::size_t(i)] - ws.G[std::size_t(j)]);
      simd::exp(ws.e.data(), ws.e.data(), i + 1);
      const T b = ws.bt[std::size_t(i)];
      for (index_t j = 0; j < i; ++j)
        A[i * c + j] = b * ws.kk[std::size_t(i * c + j)] * ws.e[std::size_t(j)];
      for (index_t j = 0; j <= i; ++j) P[i * c + j] *= ws.e[std::size_t(j)];
      for (index_t j = i + 1; j < c; ++j) P[i * c + j] = T(0);
    }
    // T = (I + A)^-1 by forward substitution, row by row: T_i = e_i - Σ_{m<i} A_im T_m
    T* Tm = ws.tm.data();
    for (index_t i = 0; i < c; ++i) {
      T* ti = Tm + i * c;
      std::fill_n(ti, c, T(0));
      ti[i] = T(1);
      for (index_t m = 0; m < i; ++m) simd::axpy(ti, -A[i * c + m], Tm + m * c, m + 1);
    }
    // X = diag(beta ⊙ exp(G)) K, Y = diag(beta) V side by side; [W U] = T [X Y] (one GEMM)
    const index_t KV = K + V;
    T* xy = ws.x.data();  // [c, K+V]
    for (index_t i = 0; i < c; ++i) {
      const auto ui = std::size_t(i);
      const T fx = ws.bt[ui] * ws.eg[ui];
      T* row = xy + i * KV;
      for (index_t j = 0; j < K; ++j) row[j] = fx * kc[i * K + j];
      const T* vr = rows.v(t0 + i);
      for (index_t j = 0; j < V; ++j) row[K + j] = ws.bt[ui] * vr[j];
    }
    T* wu = ws.w.data();  // [c, K+V]: W | U
    // (T is lower triangular: lower_a never reads its upper zeros, so a NaN/inf in a later
    // token's k or v cannot reach an earlier row as 0·NaN; SPEC: outputs never see the future)
    linalg::gemm<T, false, false>(c, KV, c, Tm, c, xy, KV, wu, KV, false, common::gemm_pack<T>(),
                                  /*lower_a=*/true);
    // WQ = [W; Q ⊙ exp(G)]: [2c, K], so that W S_n and (Q ⊙ e^G) S_n are one GEMM.
    // K ⊙ exp(G_c - G) in place (kc is not needed as plain keys any more).
    T* wq = ws.y.data();
    for (index_t i = 0; i < c; ++i) {
      std::copy_n(wu + i * KV, K, wq + i * K);
      const T e = ws.eg[std::size_t(i)];
      const T* qi = qc + i * K;
      T* dst = wq + (c + i) * K;
      for (index_t j = 0; j < K; ++j) dst[j] = e * qi[j];
      simd::scale(kc + i * K, ws.egc[std::size_t(i)], K);
    }
    // phase 2 (sequential over chunks): R = WQ S_n; V' = U - R_top; O = R_bottom + P V'
    T* r = ws.uu.data();  // [2c, V]
    linalg::gemm<T, false, false>(2 * c, V, K, wq, K, ws.s.data(), V, r, V, false,
                                  common::gemm_pack<T>());
    for (index_t i = 0; i < c; ++i) {
      T* ri = r + i * V;
      const T* ui = wu + i * KV + K;
      for (index_t j = 0; j < V; ++j) ri[j] = ui[j] - ri[j];
    }
    T* o = rows.o(t0);
    for (index_t i = 0; i < c; ++i) std::copy_n(r + (c + i) * V, V, o + i * ldo);
    linalg::gemm<T, false, false>(c, V, c, P, c, r, V, o, ldo, true, common::gemm_pack<T>(),
                                  /*lower_a=*/true);
    // S_{n+1} = exp(G_c) S_n + (K ⊙ exp(G_c - G))ᵀ V'
    simd::scale(ws.s.data(), gamma, K * V);
    linalg::gemm<T, true, false>(K, V, c, kc, K, r, V, ws.s.data(), V, true,
                                 common::gemm_pack<T>());
  }
  mat(Sp, K, V, lds) = S;
}

/// The chunked forms' driver, shared with the DPLR engine (kernels/delta/dplr.hpp): runs
/// seq(sg, hv, h, C, ws) for every (segment, value head hv of query/key head h) of problem p in
/// parallel, with one WS per thread slot. C is chunk_size clamped to the longest sequence:
/// beyond it C changes nothing (every chunk is min(C, len - t0) tokens) but would size the C²
/// scratch (2^20 at T = 75 would ask for terabytes), as the gated engine clamps it too.
template <class WS, class P, class Seq>
void for_each_head_chunked(const P& p, index_t chunk_size, const Seq& seq) {
  const index_t K = p.q.extent(3), H = p.q.extent(2), HV = p.v.extent(2), V = p.v.extent(3);
  const index_t group = HV / H;
  const index_t N = p.sequences();
  index_t longest = 0;
  for (index_t n = 0; n < N; ++n) longest = std::max(longest, segment_of(p, n).len);
  if (longest == 0) return;
  const index_t C = std::min(chunk_size, longest);
  workspace& arena = thread_workspace();
  auto frame = arena.scope();  // outlives the parallel region: workers only use their slot's
  const std::span<WS> ws =
      common::take_per_slot<WS>(arena, frame, [&](WS& w, auto& f) { w.take(f, C, K, V); });
  parallel_for_with_slot(N * HV, [&](index_t job, int slot) {
    const index_t hv = job % HV;
    const auto sg = segment_of(p, job / HV);
    if (sg.len == 0) return;
    seq(sg, hv, hv / group, C, ws[static_cast<std::size_t>(slot)]);
  });
}

/// Runs the chunked form over every (segment, value head) in parallel; one workspace per thread.
template <class T>
void run_chunked(const problem<T>& p, index_t chunk_size) {
  for_each_head_chunked<chunk_workspace<T>>(
      p, chunk_size,
      [&](const segment& sg, index_t hv, index_t h, index_t C, chunk_workspace<T>& ws) {
        chunked_sequence(p, token_rows<T>{p, sg, hv, h}, C, ws);
      });
}

/// Which form forward() runs. Measured on the reference machine (2-core Zen 4-class VM, AVX-512,
/// bench/bench_delta.cpp, B = 1, H = 8, T = 64 ... 65536, 1 and 2 threads): the column-tiled
/// recurrent form, whose [K, 64] state tile stays in L1, runs at 60-65 % of the FMA peak and
/// executes 7·K·V FLOPs per token, while the chunked form executes 1.6x (K = V = 128) to 2.3x
/// (K = V = 64) as many FLOPs at 50-62 % of peak (core/gemm.hpp). The recurrent form was
/// faster at every T measured for K = V in {64, 128, 256} (e.g. K = V = 128, T = 1024, 1 thread:
/// 13.8 ms recurrent vs 24.4 ms chunked), so there is no switch-over T on this machine: forward()
/// runs the recurrent form unless the sequences are at least `chunked_min_tokens` long and K·V is
/// at least `chunked_min_kv` (both unreachable defaults here, kept as the knobs for machines where
/// GEMMs are relatively faster, e.g. with AMX or a tuned BLAS).
inline constexpr index_t chunked_min_tokens = std::numeric_limits<index_t>::max();
inline constexpr index_t chunked_min_kv = std::numeric_limits<index_t>::max();

/// True when forward() should run the chunked form for this shape (see above).
inline bool prefer_chunked(index_t tokens_per_sequence, index_t K, index_t V) {
  return tokens_per_sequence >= chunked_min_tokens && K * V >= chunked_min_kv;
}

// ---- gate helper ----------------------------------------------------------------------------

/// g = -exp(A_log) · softplus(a + dt_bias), finite for every finite input. Computed in double
/// (long double for double inputs) so that a + dt_bias cannot overflow; for x = a + dt_bias <= -20
/// softplus(x) is tiny (it may underflow) and the product is taken in log space,
/// exp(A_log + log softplus(x)), so that exp(A_log) = inf times softplus = 0 never makes a NaN.
/// Results beyond the range of T are clamped to its lowest finite value.
template <class T>
inline T gate_value(T a, T A_log, T dt_bias) {
  using W = std::conditional_t<std::is_same_v<T, float>, double, long double>;
  const W x = W(a) + W(dt_bias);
  const W lo = W(std::numeric_limits<T>::lowest());
  W r;
  if (x > W(-20)) {
    const W sp = x > W(20) ? x : std::log1p(std::exp(x));  // softplus, torch's threshold 20
    r = -std::exp(W(A_log)) * sp;                          // sp >= 2e-9: no inf · 0
  } else {
    // log softplus(x) = log(log1p(e^x)) = x + log1p(-e^x/2 + ...): x itself below -700
    const W lsp = x < W(-700) ? x : std::log(std::log1p(std::exp(x)));
    r = -std::exp(W(A_log) + lsp);
  }
  return static_cast<T>(std::isfinite(r) ? std::max(r, lo) : lo);
}

}  // namespace seqmix::kernels::delta_rule

namespace seqmix::kernels::delta_rule {

// ---- one-token views (step) ----------------------------------------------------------------

/// [B, H, D] -> [B, 1, H, D] (same memory; the stride of the length-1 time axis is unused).
template <class T>
inline tensor_view<T, 4> as_one_token(const tensor_view<T, 3>& x) {
  return {x.data(),
          {x.extent(0), 1, x.extent(1), x.extent(2)},
          {x.stride(0), 0, x.stride(1), x.stride(2)}};
}
/// [B, H] -> [B, 1, H].
template <class T>
inline tensor_view<T, 3> as_one_token(const tensor_view<T, 2>& x) {
  return {x.data(), {x.extent(0), 1, x.extent(1)}, {x.stride(0), 0, x.stride(1)}};
}

/// Validates a one-token call (step), naming the [B, H, D] arguments; allocates nothing unless
/// it throws.
template <class T>
void validate_step(const checker& check, tensor_view<const T, 3> q, tensor_view<const T, 3> k,
                   tensor_view<const T, 3> v, tensor_view<const T, 2> g, bool gated,
                   tensor_view<const T, 2> beta, tensor_view<T, 3> o, tensor_view<T, 4> state,
                   T scale) {
  check.nonempty("q", q);
  check.nonempty("v", v);
  const index_t B = q.extent(0), H = q.extent(1), K = q.extent(2);
  const index_t HV = v.extent(1), V = v.extent(2);
  check.shape("k", k, {B, H, K});
  check.shape("v", v, {B, any_extent, any_extent});
  if (!(HV % H == 0)) check.fail("v", "value heads must be a multiple of q/k heads");
  if (gated) check.shape("g", g, {B, HV});
  check.shape("beta", beta, {B, HV});
  check.shape("o", o, {B, HV, V});
  check.shape("state", state, {B, HV, K, V});
  check.inner_contiguous("q", q);
  check.inner_contiguous("k", k);
  check.inner_contiguous("v", v);
  check.inner_contiguous("o", o);
  check.inner_contiguous("state", state);
  if (gated) check.log_gate("g", g);
  check.finite("beta", beta);
  if (!(std::isfinite(scale))) check.fail("scale", "must be finite");
}

/// What delta_net and gated_delta_net share: options, the state factory, the scale, and the
/// dispatch of a call to a form. The two fronts differ only in whether their calls carry g.
template <class T>
class front {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "delta_net<T> / gated_delta_net<T>: T is float or double");

 public:
  using value_type = T;
  struct options {
    std::optional<T> scale{};    ///< multiplies q; default K^-1/2
    bool use_qk_l2norm = false;  ///< q, k -> x / sqrt(Σx² + 1e-6) before scaling
    index_t chunk_size = 64;     ///< chunk length C of forward_chunked
  };

  explicit front(const options& opt) : opt_(opt) {}

  const options& config() const { return opt_; }

  /// A zero state [B, HV, K, V] (B = N for packed input).
  static tensor<T, 4> make_state(index_t B, index_t HV, index_t K, index_t V) {
    return tensor<T, 4>({B, HV, K, V});
  }

  /// The scale applied to q for key width K.
  T scale_for(index_t K) const {
    return opt_.scale ? *opt_.scale : T(1) / std::sqrt(static_cast<T>(K));
  }

 protected:
  enum class form { chunked, recurrent, automatic };
  struct call {
    tensor_view<const T, 4> q, k, v;
    tensor_view<const T, 3> g, beta;  // g empty: ungated
    tensor_view<T, 4> o, state;
    std::span<const index_t> cu;
  };

  /// Validates a whole-sequence call and runs it in form f (automatic: prefer_chunked).
  void run(const char* where, form f, const call& c, bool gated) const {
    const checker check{where};
    if (gated) check.require(!c.g.empty(), "g", "must not be empty");
    problem<T> p{
        c.q, c.k, c.v, c.g, c.beta, c.o, c.state, scale_for(c.q.extent(3)), opt_.use_qk_l2norm,
        c.cu};
    validate(check, p, opt_.chunk_size);
    if (f == form::automatic) {
      f = prefer_chunked(c.q.extent(1) / std::max<index_t>(1, p.sequences()), c.q.extent(3),
                         c.v.extent(3))
              ? form::chunked
              : form::recurrent;
    }
    if (f == form::chunked) {
      run_chunked(p, opt_.chunk_size);
    } else {
      run_recurrent(p);
    }
  }

  /// One token per sequence ([B, H, D] views; g ignored unless gated), allocation-free.
  void run_step(const char* where, tensor_view<const T, 3> q, tensor_view<const T, 3> k,
                tensor_view<const T, 3> v, tensor_view<const T, 2> g, bool gated,
                tensor_view<const T, 2> beta, tensor_view<T, 3> o, tensor_view<T, 4> state) const {
    const checker check{where};
    const T s = scale_for(q.extent(2));
    validate_step<T>(check, q, k, v, g, gated, beta, o, state, s);
    problem<T> p{as_one_token(q),
                 as_one_token(k),
                 as_one_token(v),
                 gated ? as_one_token(g) : tensor_view<const T, 3>(),
                 as_one_token(beta),
                 as_one_token(o),
                 state,
                 s,
                 opt_.use_qk_l2norm,
                 {}};
    run_recurrent(p);
  }

  options opt_;
};

}  // namespace seqmix::kernels::delta_rule
