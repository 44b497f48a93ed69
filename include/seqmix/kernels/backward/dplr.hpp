// SPDX-License-Identifier: MIT
// Checkpointed backward of the diagonal-plus-low-rank (DPLR) recurrence (docs/math.md §8), the
// one engine behind the backward of DeltaNet, Gated DeltaNet, KDA, RWKV-7 and RWKV-6.
//
//   forward   S_t = Diag(e^{g_t}) S_{t-1} + b_t (a_tᵀ S_{t-1}) + k_t v_tᵀ        (S: [K, V])
//             o_t = S_tᵀ q_t  (inclusive readout)   or   o_t = S_{t-1}ᵀ q_t  (exclusive)
//   loss      L = Σ o·do + Σ S_T·dht
// The ops map onto it in their fronts (mixers/backward.hpp): DeltaNet / GDN / KDA take
// a = -β e^{g} ⊙ k (the correction reads the decayed state), b = k, v -> β v, q -> s q; RWKV-7
// takes a, b as given; RWKV-6 has no rank-one term, the exclusive readout, and its bonus term
// (s r·(u⊙k)) v_t is the front's (it needs no state). The fronts chain the engine gradients back
// to β, k (which appears in a, b and the kv term) and the gates.
//
// Reverse recurrence, with dS the gradient of S_t (dS_T = dht), token t = T-1 .. 0:
//   inclusive: dS += q doᵀ,  dq = S_t do
//   dk = dS v,  dv = dSᵀ k,  r = S_{t-1}ᵀ a,  db = dS r,  y = dSᵀ b,  da = S_{t-1} y
//   dg_i = e^{g_i} Σ_j dS_ij S_{t-1,ij}         (gradient of the log gate; finite for g -> -1e4)
//   dS <- Diag(e^{g}) dS + a yᵀ                  (now the gradient of S_{t-1})
//   exclusive: dS += q doᵀ,  dq = S_{t-1} do
//   dh0 = dS after token 0.
// The columns of S are independent given the per-token vectors (every operation above acts on one
// column j of S and dS at a time, or sums over j), so the work runs column-tile-major like the
// recurrent forward of kernels/delta_rule.hpp: a tile of Vt = 16 columns of the states stays in
// L1/L2 while the tokens of a chunk stream past, and the per-key gradients (dq, dk, db, da, dg)
// sum over the tiles in a fixed order.
//
// Saved state (measured choice, docs/math.md §8): nothing is taken from the forward. Per
// (sequence, value head) a forward sweep stores the state at every chunk boundary (every C
// tokens, (T/C + 1)·K·V values); the reverse walk recomputes each chunk's C states of one column
// tile from its boundary ((C + 1)·Vt·K values) and runs the reverse recurrence over them. Memory
// per thread: (T/C + 1)·K·V + (C+1)·16·K + K·V + C·(10·K + 3·V) values (K rounded up to the SIMD
// width), flat per chunk; per token K·V/C values of checkpoints (64 at K = V = 64, C = 64).
// All of it comes from the thread's workspace arena: a repeated shape allocates nothing.
//
// Cost per (sequence, value head) and token (FLOP, multiply-add = 2): with the rank-one term,
// checkpoint sweep 7·K·V (read aᵀs 2, update 5), recompute the same, reverse 19·K·V: 33·K·V
// (3.7x the 9·K·V of RWKV-7's recurrent forward, 4.7x DeltaNet's 7·K·V); RWKV-6 3 + 3 + 11 = 17·K·V
// (3.4x its 5·K·V). Numerics: the recurrence runs in T; log gates are clamped at -1e4 (e^{-1e4} is
// exactly 0) before the only exponentiation, e^{g} <= 1, so strong and -inf gates give finite
// gradients. Parallel over (sequence, q/k head) items, the value heads of a GVA group one after
// the other inside the item (their dq, dk sums have a fixed order): results are bitwise the same
// for any thread count.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <span>

#include <seqmix/core/parallel.hpp>
#include <seqmix/core/simd.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/core/workspace.hpp>
#include <seqmix/kernels/common/scratch.hpp>

namespace seqmix::kernels::backward::dplr {

/// Log gates are clamped here before exp: e^{-1e4} is exactly 0 in float and double.
inline constexpr double gate_floor = -1e4;

/// Width of a column tile of the state (one AVX-512 float register of keys per column row).
inline constexpr index_t tile_columns = 16;

/// Keys rounded up to whole SIMD registers; the padding lanes stay zero throughout.
template <class T>
constexpr index_t padded_keys(index_t K) {
  constexpr index_t L = simd::lanes<T>;
  return (K + L - 1) / L * L;
}

/// One packed sequence: batch row b, tokens [t0, t1), state row n.
struct segment {
  index_t b = 0, n = 0, t0 = 0, t1 = 0;
};

/// One chunk's engine inputs and gradients, rows of Kp (keys) or V (values), L rows. The op's
/// load() fills the inputs (only the first K entries of a key row; the rest stay zero), its
/// store() reads the gradients (dg already multiplied by e^{g}: the log gate's gradient).
template <class T>
struct chunk_rows {
  index_t L = 0, Kp = 0, V = 0;
  T *q = nullptr, *a = nullptr, *b = nullptr, *k = nullptr, *eg = nullptr;  // [L][Kp]
  T *v = nullptr, *dout = nullptr;                                          // [L][V]
  T *dq = nullptr, *da = nullptr, *db = nullptr, *dk = nullptr, *dg = nullptr;
  T* dv = nullptr;
};

/// Per-thread scratch, from the workspace (take with a frame, or a scratch_size to count).
template <class T>
struct scratch {
  std::span<T> states, buf, rr, dS, in, grads;
  template <class F>
  void take(F& f, index_t C, index_t K, index_t V, index_t chunks) {
    const index_t Kp = padded_keys<T>(K), Vt = std::min(V, tile_columns);
    states = common::take_zeroed<T>(f, (chunks + 1) * V * Kp);
    buf = common::take_zeroed<T>(f, (C + 1) * Vt * Kp);
    rr = common::take_zeroed<T>(f, C * Vt);
    dS = common::take_zeroed<T>(f, V * Kp);
    in = common::take_zeroed<T>(f, C * (5 * Kp + 2 * V));
    grads = common::take_zeroed<T>(f, C * (5 * Kp + V));
  }
  chunk_rows<T> rows(index_t C, index_t Kp, index_t V) {
    chunk_rows<T> c;
    c.Kp = Kp, c.V = V;
    const auto ck = static_cast<std::size_t>(C * Kp), cv = static_cast<std::size_t>(C * V);
    T* p = in.data();
    c.q = p, c.a = p + ck, c.b = p + 2 * ck, c.k = p + 3 * ck, c.eg = p + 4 * ck;
    c.v = p + 5 * ck, c.dout = p + 5 * ck + cv;
    T* g = grads.data();
    c.dq = g, c.da = g + ck, c.db = g + 2 * ck, c.dk = g + 3 * ck, c.dg = g + 4 * ck;
    c.dv = g + 5 * ck;
    return c;
  }
};

namespace detail {

using simd::batch;

/// One token's update of one state column s (Kp keys): s = e^g ⊙ s + b (aᵀs) + v_j k; returns
/// aᵀs (the rank-one read, 0 without it).
template <class T, bool LowRank>
inline T column_step(T* __restrict s, const T* __restrict a, const T* __restrict b,
                     const T* __restrict k, const T* __restrict eg, T vj, index_t Kp) {
  constexpr index_t L = simd::lanes<T>;
  T r = T(0);
  if constexpr (LowRank) r = simd::dot(s, a, Kp);
  const batch<T> br(r), bv(vj);
  for (index_t i = 0; i < Kp; i += L) {
    batch<T> x = simd::load(s + i) * simd::load(eg + i);
    if constexpr (LowRank) x = simd::fma(br, simd::load(b + i), x);
    simd::store(s + i, simd::fma(bv, simd::load(k + i), x));
  }
  return r;
}

/// One token's reverse step on one column: d (the gradient of column j of S_t) becomes that of
/// S_{t-1}; per-key gradients accumulate, dv_j is returned.
template <class T, bool LowRank, bool Inclusive>
inline T column_back(T* __restrict d, const T* __restrict Sp, const T* __restrict Sn, T doj, T vj,
                     T rj, const chunk_rows<T>& c, index_t r) {
  constexpr index_t L = simd::lanes<T>;
  const index_t Kp = c.Kp;
  const auto o = static_cast<std::size_t>(r * Kp);
  const T *q = c.q + o, *a = c.a + o, *b = c.b + o, *k = c.k + o, *eg = c.eg + o;
  T *dq = c.dq + o, *da = c.da + o, *db = c.db + o, *dk = c.dk + o, *dg = c.dg + o;
  const batch<T> bdo(doj), bv(vj), brr(rj);
  batch<T> accv(T(0)), accy(T(0));
  for (index_t i = 0; i < Kp; i += L) {
    batch<T> x = simd::load(d + i);
    if constexpr (Inclusive) {
      x = simd::fma(bdo, simd::load(q + i), x);
      simd::store(dq + i, simd::fma(bdo, simd::load(Sn + i), simd::load(dq + i)));
    }
    const batch<T> sp = simd::load(Sp + i);
    simd::store(dk + i, simd::fma(bv, x, simd::load(dk + i)));
    simd::store(dg + i, simd::fma(x, sp, simd::load(dg + i)));
    accv = simd::fma(x, simd::load(k + i), accv);
    if constexpr (LowRank) {
      simd::store(db + i, simd::fma(brr, x, simd::load(db + i)));
      accy = simd::fma(x, simd::load(b + i), accy);
      simd::store(d + i, x);
    } else {
      x = x * simd::load(eg + i);
      if constexpr (!Inclusive) {
        x = simd::fma(bdo, simd::load(q + i), x);
        simd::store(dq + i, simd::fma(bdo, sp, simd::load(dq + i)));
      }
      simd::store(d + i, x);
    }
  }
  if constexpr (LowRank) {
    const batch<T> by(simd::reduce_sum(accy));
    for (index_t i = 0; i < Kp; i += L) {
      const batch<T> sp = simd::load(Sp + i);
      simd::store(da + i, simd::fma(by, sp, simd::load(da + i)));
      batch<T> x = simd::fma(by, simd::load(a + i), simd::load(d + i) * simd::load(eg + i));
      if constexpr (!Inclusive) {
        x = simd::fma(bdo, simd::load(q + i), x);
        simd::store(dq + i, simd::fma(bdo, sp, simd::load(dq + i)));
      }
      simd::store(d + i, x);
    }
  }
  return simd::reduce_sum(accv);
}

/// The backward of one (sequence, value head) through `op` (see dplr_backward).
template <class T, bool LowRank, bool Inclusive, class Op>
void head(const Op& op, const segment& sg, index_t hv, index_t hk, bool first, index_t C, index_t K,
          index_t V, scratch<T>& s) {
  const index_t Kp = padded_keys<T>(K), len = sg.t1 - sg.t0, chunks = (len + C - 1) / C;
  const auto KV = static_cast<std::size_t>(V * Kp);
  chunk_rows<T> c = s.rows(C, Kp, V);
  // S_0, transposed: column j of S is row j (Kp keys) of the [V][Kp] layout
  T* st = s.states.data();
  for (index_t j = 0; j < V; ++j)
    for (index_t i = 0; i < K; ++i) st[j * Kp + i] = op.h0(sg.n, hv, i, j);
  // ---- forward sweep: the chunk-boundary states ----------------------------------------------
  for (index_t ch = 0; ch < chunks; ++ch) {
    const index_t r0 = sg.t0 + ch * C;
    c.L = std::min(C, sg.t1 - r0);
    op.load(sg, hv, hk, r0, c);
    const T* Sa = st + static_cast<std::size_t>(ch) * KV;
    T* Sb = st + static_cast<std::size_t>(ch + 1) * KV;
    std::copy_n(Sa, KV, Sb);
    for (index_t j0 = 0; j0 < V; j0 += tile_columns) {
      const index_t j1 = std::min(V, j0 + tile_columns);
      for (index_t r = 0; r < c.L; ++r) {
        const auto o = static_cast<std::size_t>(r * Kp);
        for (index_t j = j0; j < j1; ++j)
          column_step<T, LowRank>(Sb + j * Kp, c.a + o, c.b + o, c.k + o, c.eg + o, c.v[r * V + j],
                                  Kp);
      }
    }
  }
  const T* ST = st + static_cast<std::size_t>(chunks) * KV;
  for (index_t j = 0; j < V; ++j)
    for (index_t i = 0; i < K; ++i) op.put_ht(sg.n, hv, i, j, ST[j * Kp + i]);
  // ---- reverse walk --------------------------------------------------------------------------
  T* dS = s.dS.data();
  std::fill_n(dS, KV, T(0));
  for (index_t j = 0; j < V; ++j)
    for (index_t i = 0; i < K; ++i) dS[j * Kp + i] = op.dht(sg.n, hv, i, j);
  const index_t Vt = std::min(V, tile_columns);
  for (index_t ch = chunks; ch-- > 0;) {
    const index_t r0 = sg.t0 + ch * C;
    c.L = std::min(C, sg.t1 - r0);
    op.load(sg, hv, hk, r0, c);
    std::fill_n(c.dq, static_cast<std::size_t>(C * (5 * Kp + V)), T(0));
    const T* Sa = st + static_cast<std::size_t>(ch) * KV;
    for (index_t j0 = 0; j0 < V; j0 += tile_columns) {
      const index_t j1 = std::min(V, j0 + tile_columns), nj = j1 - j0;
      // recompute the chunk's states of this tile: buf[r] = S_{r0+r-1} (r = 0: the boundary)
      T* buf = s.buf.data();
      const auto tile = static_cast<std::size_t>(Vt * Kp);
      std::copy_n(Sa + j0 * Kp, static_cast<std::size_t>(nj * Kp), buf);
      for (index_t r = 0; r < c.L; ++r) {
        const auto o = static_cast<std::size_t>(r * Kp);
        T* prev = buf + static_cast<std::size_t>(r) * tile;
        T* next = prev + tile;
        std::copy_n(prev, static_cast<std::size_t>(nj * Kp), next);
        for (index_t jj = 0; jj < nj; ++jj)
          s.rr[static_cast<std::size_t>(r * Vt + jj)] = column_step<T, LowRank>(
              next + jj * Kp, c.a + o, c.b + o, c.k + o, c.eg + o, c.v[r * V + j0 + jj], Kp);
      }
      // reverse recurrence over the chunk's tokens
      for (index_t r = c.L; r-- > 0;) {
        const T* Sp = buf + static_cast<std::size_t>(r) * tile;
        const T* Sn = Sp + tile;
        for (index_t jj = 0; jj < nj; ++jj) {
          const index_t j = j0 + jj;
          c.dv[r * V + j] = column_back<T, LowRank, Inclusive>(
              dS + j * Kp, Sp + jj * Kp, Sn + jj * Kp, c.dout[r * V + j], c.v[r * V + j],
              s.rr[static_cast<std::size_t>(r * Vt + jj)], c, r);
        }
      }
    }
    for (index_t r = 0; r < c.L; ++r)
      for (index_t i = 0; i < Kp; ++i) c.dg[r * Kp + i] *= c.eg[r * Kp + i];
    op.store(sg, hv, hk, first, r0, c);
  }
  for (index_t j = 0; j < V; ++j)
    for (index_t i = 0; i < K; ++i) op.put_dh0(sg.n, hv, i, j, dS[j * Kp + i]);
}

}  // namespace detail

/// Runs the backward over every (sequence, q/k head) item in parallel, the `group` value heads
/// of an item in order. `op` provides (all const, thread-safe for distinct items):
///   T h0(n, hv, i, j), T dht(n, hv, i, j)           (0 where absent)
///   void put_ht(n, hv, i, j, T), put_dh0(n, hv, i, j, T)   (no-ops where not wanted)
///   void load(segment, hv, hk, t0, chunk_rows&)      fill the L rows of token t0 ..
///   void store(segment, hv, hk, first, t0, const chunk_rows&)   map and write the gradients
///     (first: the group's first value head, which writes the q/k gradients the others add to)
/// LowRank: the b (aᵀS) term is present; Inclusive: o_t reads S_t (else S_{t-1}).
template <class T, bool LowRank, bool Inclusive, class Op>
void dplr_backward(const Op& op, index_t B, index_t TT, std::span<const index_t> cu_seqlens,
                   index_t Hk, index_t H, index_t K, index_t V, index_t chunk_size) {
  const index_t N = cu_seqlens.empty() ? B : static_cast<index_t>(cu_seqlens.size()) - 1;
  auto seg = [&](index_t n) {
    segment sg;
    sg.n = n;
    sg.b = cu_seqlens.empty() ? n : 0;
    sg.t0 = cu_seqlens.empty() ? 0 : cu_seqlens[static_cast<std::size_t>(n)];
    sg.t1 = cu_seqlens.empty() ? TT : cu_seqlens[static_cast<std::size_t>(n) + 1];
    return sg;
  };
  index_t longest = 0;
  for (index_t n = 0; n < N; ++n) longest = std::max(longest, seg(n).t1 - seg(n).t0);
  const index_t C = std::max<index_t>(1, std::min(chunk_size, longest));
  const index_t chunks = (longest + C - 1) / C;
  const index_t group = H / Hk;
  workspace& arena = thread_workspace();
  auto frame = arena.scope();  // outlives the parallel region: workers only use their slot's
  const std::span<scratch<T>> ws = common::take_per_slot<scratch<T>>(
      arena, frame, [&](scratch<T>& w, auto& f) { w.take(f, C, K, V, chunks); });
  parallel_for_with_slot(N * Hk, [&](index_t item, int slot) {
    const index_t n = item / Hk, hk = item % Hk;
    const segment sg = seg(n);
    auto& s = ws[static_cast<std::size_t>(slot)];
    for (index_t hv = hk * group; hv < (hk + 1) * group; ++hv)
      detail::head<T, LowRank, Inclusive>(op, sg, hv, hk, hv == hk * group, C, K, V, s);
  });
}

}  // namespace seqmix::kernels::backward::dplr
