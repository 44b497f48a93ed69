// SPDX-License-Identifier: MIT
// Multi-head latent attention layer (DeepSeek-V2/V3's MLA in the NoPE form Kimi-Linear uses,
// transformers' KimiMLAAttention), on softmax_attention (mixers/softmax_attention.hpp).
//
//   q            = q_proj(x)                    or q_b_proj(rmsnorm_q(q_a_proj(x))) (q-LoRA)
//                                               per head [q_nope dn | q_rot dr]
//   [c | k_rot]  = kv_a_proj_with_mqa(x)        latent c [r], k_rot [dr] shared by all heads
//   c            = rmsnorm(c) · w               kv_a_layernorm, eps kv_norm_eps (1e-6: the
//                                               module's default, not rms_norm_eps)
//   [k_nope | v] = kv_b_proj(c)                 per head [k_nope dn | v dv]
//   k            = [k_nope | k_rot]             per head (k_rot copied to every head; NoPE:
//                                               not rotated)
//   o            = softmax(s · q kᵀ + causal) v   s = (dn + dr)^-1/2 unless `scale` is set
//   y            = o_proj(o)
//
// Weights (under the prefix; f32 or bf16): q_proj.weight [H·(dn+dr), D] (or q_a_proj.weight
// [rq, D], q_a_layernorm.weight [rq], q_b_proj.weight [H·(dn+dr), rq]), kv_a_proj_with_mqa.weight
// [r + dr, D], kv_a_layernorm.weight [r], kv_b_proj.weight [H·(dn+dv), r], o_proj.weight
// [D, H·dv]. q_proj (or q_a_proj) and kv_a_proj_with_mqa are fused at load time into one GEMM.
//
// RoPE: Kimi-Linear's MLA has none (its config has no rope fields); this layer implements only
// the NoPE form, and a loader that sees a rope setting for MLA must reject it.
//
// Caches (mla_attention_config::cache, chosen at load; one layer class, one cache type: both
// are attention_cache objects, so models hold either):
//  - mla_cache::expanded (default): the decompressed keys and values per head (a full kv_cache of
//    [B, H, capacity, dn+dr] keys and [B, H, capacity, dv] values): H·(dn+dr+dv) floats per token
//    (Kimi-Linear-48B, H 32, dn 128, dr 64, dv 128: 10240 floats = 40 KiB). A decode step reads
//    all of it: 4·H·(dn+dr+dv)·L bytes and 2·H·(dn+dr+dv)·L FLOP over L cached tokens
//    (memory-bound), after expanding the new token (2·r·H·(dn+dv) FLOP).
//  - mla_cache::latent: transformers' compressed cache, the normed latent c [r] and k_rot [dr]
//    per token, r + dr floats (there: 576 floats = 2.25 KiB, 17.8x less), in a kv_cache of one
//    head whose two row arrays hold the latent's two parts: keys = c [B, 1, capacity, r],
//    values = k_rot [B, 1, capacity, max(dr, 1)] (one zero column when dr = 0). Decode uses the
//    absorbed form: q~_h = W_kb,hᵀ q_nope_h (W_kb,h the [dn, r] k_nope rows of head h in
//    kv_b_proj), s_hj = s·(q~_h · c_j + q_rot,h · k_rot_j), o~_h = Σ_j softmax(s_h)_j c_j [r],
//    o_h = W_vb,h o~_h (W_vb,h its [dv, r] value rows), then o_proj. Per step it reads
//    4·(r+dr)·L bytes of cache and does 2·H·(2r+dr)·L FLOP (every head against the same latent
//    rows: a compute-bound [H, r+dr]×[r+dr, L] and [H, L]×[L, r] product, one pass over the
//    cache for all heads), plus 2·H·r·(dn+dv) FLOP of absorption (the same weights and FLOP as
//    the expansion it replaces). Measured (bench/bench_mla_cache.cpp, the Kimi-48B shape above,
//    B = 1, 1 thread, f32, the 2-core dev Xeon, medians of 5), expanded / latent µs per step:
//    L = 1k 10729 / 8293 (1.29x), 8k 36054 / 12767 (2.82x), 32k 116855 / 29652 (3.94x);
//    ~6.5 ms of it the projections both share. The latent layer also holds W_kbᵀ ([H·r, dn], the
//    dtype of kv_b_proj) for the absorption.
//    Prefill: the expanded form (flash tiles; compute-bound) or the absorbed one, whichever
//    costs less by FLOP count: the absorbed form costs (2r+dr)/(dn+dr+dv) times the expanded
//    FLOP per (query, key) pair (3.4x at the Kimi shape), the expanded one must first expand
//    the L cached latents (2·r·H·(dn+dv)·L FLOP, into a temporary expanded cache of the call,
//    H·(dn+dr+dv)·(L+T) floats). So a first prefill (L = 0) and long prefills (beyond
//    T ≈ r·(dn+dv)/(2r-dn-dv) new tokens, 170 at the Kimi shape, for L >> T) expand; a few
//    tokens over a long cache go through the absorbed kernel, split over the keys as decode
//    when the call has at most 16 tokens. Either way only the latent is written to the cache.
// Both: truncate / snapshot / restore / reserve as attention_cache (kv_cache); state-index steps;
// varlen prefill; B > 1. Latent-cache decode == expanded-cache decode to float rounding
// (tests/layers/test_mla_latent.cpp).
//
// Forms: forward (prefill, chunked attention over the cache and the new tokens), packed
// variable-length forward (cu_seqlens, one cache row per sequence), step (decode, allocation-
// free once the layer has stepped that batch size). Cost per token: 2·D·(H·(dn+dr) + r + dr) +
// 2·r·H·(dn+dv) + 2·H·dv·D FLOP in projections, 2·H·(dn+dr+dv)·L (expanded) or 2·H·(2r+dr)·L
// (latent) in attention over L cached tokens. Scratch grow-only; the layer object is not shareable
// between threads calling it at once. Checks: x, y shapes and the cache geometry
// (seqmix::shape_error naming the function and argument); weights: name, shape, dtype
// (seqmix::io_error).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <seqmix/core/error.hpp>
#include <seqmix/core/io/checkpoint.hpp>
#include <seqmix/core/matmul.hpp>
#include <seqmix/core/parallel.hpp>
#include <seqmix/core/simd.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/core/workspace.hpp>
#include <seqmix/layers/gated_attention.hpp>
#include <seqmix/layers/rms_norm.hpp>
#include <seqmix/layers/weights.hpp>
#include <seqmix/mixers/kv_cache.hpp>
#include <seqmix/mixers/softmax_attention.hpp>

namespace seqmix::layers {

/// Which cache an mla_attention layer keeps (see the file comment for memory and cost).
enum class mla_cache {
  expanded,  ///< decompressed K/V per head: H·(dn+dr+dv) floats per token
  latent,    ///< transformers' compressed cache: c [r] and k_rot [dr], r + dr floats per token
};

struct mla_attention_config {
  index_t hidden = 0;                     ///< D
  index_t heads = 0;                      ///< H (num_attention_heads)
  index_t q_lora_rank = 0;                ///< rq; 0: a plain q_proj
  index_t kv_lora_rank = 0;               ///< r
  index_t qk_nope_dim = 0;                ///< dn (qk_nope_head_dim)
  index_t qk_rope_dim = 0;                ///< dr (qk_rope_head_dim; not rotated: NoPE)
  index_t v_dim = 0;                      ///< dv (v_head_dim)
  float kv_norm_eps = 1e-6f;              ///< kv_a_layernorm's eps (and q_a_layernorm's)
  std::optional<float> scale{};           ///< softmax scale; default (dn + dr)^-1/2
  index_t chunk_size = 64;                ///< key tile of the chunked attention
  mla_cache cache = mla_cache::expanded;  ///< the cache make_cache gives and the layer uses
};

namespace detail::mla {

// The absorbed (latent-cache) attention kernel: for one query token, every head h < H at once,
// over the cached latent rows j of one sequence:
//   s_hj = Σ_d qt[d][h] · [c_j | k_rot_j][d]          (qt: [r+dr, Hp], scaled and packed)
//   acc_h = Σ_j exp(s_hj - m_h) c_j,  l_h = Σ_j exp(s_hj - m_h)   (online softmax, blocks of Bk)
// Heads run along the SIMD lanes (Hp: H rounded up to the lanes and to the PV row block), so the
// scores are an [Bk keys × Hp] register-blocked product (a broadcast of c_j[d] times a vector of
// heads' q[d], the tile kernel's layout trick of kernels/attention.hpp), the softmax is
// lane-wise, and P·C is an [Hp × r] product of register blocks of 8 heads × 2 vectors of r.
// The cache is read once per key block for all heads.

using batch = simd::batch<float>;
inline constexpr index_t lanes = simd::lanes<float>;
inline constexpr index_t key_block = 64;  // keys per online-softmax block (Bk)
inline constexpr index_t rk =
    lanes >= 16 ? 12 : 6;                  // key rows per score micro-kernel (24 / 12 accumulators)
inline constexpr index_t rq = 8;           // head rows per P·C micro-kernel
inline constexpr index_t split_min = 512;  // a split of a decode token holds >= this many keys
inline constexpr index_t split_max = 16;   // ... and a token has at most this many splits
inline constexpr index_t split_tokens = 16;  // calls of at most this many tokens split keys

/// Geometry of one call.
struct geom {
  index_t H = 0, Hp = 0;  // heads, padded heads (a multiple of lanes and of rq)
  index_t r = 0, rp = 0;  // latent dim, padded accumulator row (a multiple of lanes)
  index_t dr = 0;         // k_rot dim (0: none)
  index_t ks = 1;         // row stride of the k_rot rows (max(dr, 1))
  float scale = 1;
};

inline index_t padded_heads(index_t H) {
  const index_t m = std::max(lanes, rq);
  return (H + m - 1) / m * m;
}

/// st[k][0:NV·L] = Σ_d [c | kr]_{j+k}[d] · qt[d][0:NV·L] for R key rows (qt row stride Hp).
template <index_t R, index_t NV>
inline void scores(const geom& g, const float* c, const float* kr, const float* qt, float* st) {
  constexpr auto NR = static_cast<std::size_t>(R), NC = static_cast<std::size_t>(NV);
  std::array<std::array<batch, NC>, NR> acc;
  for (auto& row : acc)
    for (auto& a : row) a = batch(0.0f);
  const index_t Hp = g.Hp;
  for (index_t d = 0; d < g.r; ++d) {
    std::array<batch, NC> qd;
    for (std::size_t v = 0; v < NC; ++v) qd[v] = simd::load(qt + d * Hp + index_t(v) * lanes);
    for (std::size_t k = 0; k < NR; ++k) {
      const batch x(c[index_t(k) * g.r + d]);
      for (std::size_t v = 0; v < NC; ++v) acc[k][v] = simd::fma(x, qd[v], acc[k][v]);
    }
  }
  for (index_t d = 0; d < g.dr; ++d) {
    std::array<batch, NC> qd;
    for (std::size_t v = 0; v < NC; ++v)
      qd[v] = simd::load(qt + (g.r + d) * Hp + index_t(v) * lanes);
    for (std::size_t k = 0; k < NR; ++k) {
      const batch x(kr[index_t(k) * g.ks + d]);
      for (std::size_t v = 0; v < NC; ++v) acc[k][v] = simd::fma(x, qd[v], acc[k][v]);
    }
  }
  for (std::size_t k = 0; k < NR; ++k)
    for (std::size_t v = 0; v < NC; ++v)
      simd::store(st + index_t(k) * Hp + index_t(v) * lanes, acc[k][v]);
}

/// acc[i][0:CV·L] = alpha[i] · acc[i][..] + Σ_j pt[j][i] · c_j[0:CV·L] for rq head rows i
/// (pt row stride Hp, acc row stride rp, c rows of stride r).
template <index_t CV>
inline void pv(const geom& g, const float* pt, index_t kn, const float* c, const float* alpha,
               float* acc) {
  constexpr auto NR = static_cast<std::size_t>(rq), NC = static_cast<std::size_t>(CV);
  std::array<std::array<batch, NC>, NR> a;
  for (std::size_t i = 0; i < NR; ++i) {
    const batch al(alpha[i]);
    for (std::size_t v = 0; v < NC; ++v)
      a[i][v] = al * simd::load(acc + index_t(i) * g.rp + index_t(v) * lanes);
  }
  for (index_t j = 0; j < kn; ++j) {
    std::array<batch, NC> cj;
    for (std::size_t v = 0; v < NC; ++v) cj[v] = simd::load(c + j * g.r + index_t(v) * lanes);
    for (std::size_t i = 0; i < NR; ++i) {
      const batch p(pt[j * g.Hp + index_t(i)]);
      for (std::size_t v = 0; v < NC; ++v) a[i][v] = simd::fma(p, cj[v], a[i][v]);
    }
  }
  for (std::size_t i = 0; i < NR; ++i)
    for (std::size_t v = 0; v < NC; ++v)
      simd::store(acc + index_t(i) * g.rp + index_t(v) * lanes, a[i][v]);
}

/// Unnormalised partial state of all heads over keys [j0, j1): m [Hp], l [Hp], acc [Hp, rp].
/// c rows [r] and kr rows [ks] of key 0 at `c` and `kr`; st [Bk·Hp] and alpha [Hp] scratch.
inline void partial(const geom& g, const float* qt, const float* c, const float* kr, index_t j0,
                    index_t j1, float* acc, float* m, float* l, float* st, float* alpha) {
  const index_t Hp = g.Hp, nv = Hp / lanes;
  const float ninf = -std::numeric_limits<float>::infinity();
  std::fill_n(m, Hp, ninf);
  std::fill_n(l, Hp, 0.0f);
  std::fill_n(acc, Hp * g.rp, 0.0f);
  const index_t cfull = g.r / (2 * lanes) * (2 * lanes), cvec = g.r / lanes * lanes;
  for (index_t jb = j0; jb < j1; jb += key_block) {
    const index_t kn = std::min(key_block, j1 - jb);
    const float* cb = c + jb * g.r;
    const float* kb = kr + jb * g.ks;
    // phase 1: S^T [kn, Hp] = [C | K_rot]_block · qt, head vectors in groups of two
    for (index_t v0 = 0; v0 < nv; v0 += 2) {
      const float* q = qt + v0 * lanes;
      float* s = st + v0 * lanes;
      index_t j = 0;
      if (v0 + 2 <= nv) {
        for (; j + rk <= kn; j += rk) scores<rk, 2>(g, cb + j * g.r, kb + j * g.ks, q, s + j * Hp);
        for (; j < kn; ++j) scores<1, 2>(g, cb + j * g.r, kb + j * g.ks, q, s + j * Hp);
      } else {
        for (; j + rk <= kn; j += rk) scores<rk, 1>(g, cb + j * g.r, kb + j * g.ks, q, s + j * Hp);
        for (; j < kn; ++j) scores<1, 1>(g, cb + j * g.r, kb + j * g.ks, q, s + j * Hp);
      }
    }
    // phase 2: online softmax over the kn keys, lane-wise over heads
    for (index_t v = 0; v < nv; ++v) {
      const index_t off = v * lanes;
      const batch m_old = simd::load(m + off);
      batch m_new = m_old;
      for (index_t j = 0; j < kn; ++j) m_new = xsimd::max(m_new, simd::load(st + j * Hp + off));
      const batch m_use = xsimd::select(m_new == batch(ninf), batch(0.0f), m_new);
      const batch al = kernels::attention::detail::exp_nonpositive<float>(m_old - m_use);
      batch sum(0.0f);
      for (index_t j = 0; j < kn; ++j) {
        float* sp = st + j * Hp + off;
        const batch e = kernels::attention::detail::exp_nonpositive<float>(simd::load(sp) - m_use);
        simd::store(sp, e);
        sum += e;
      }
      simd::store(l + off, simd::fma(simd::load(l + off), al, sum));
      simd::store(m + off, m_new);
      simd::store(alpha + off, al);
    }
    // phase 3: acc = diag(alpha) · acc + P · C_block (columns outer: a column block of the
    // key block stays in L1 across the head blocks)
    index_t c0 = 0;
    for (; c0 < cfull; c0 += 2 * lanes)
      for (index_t h0 = 0; h0 < Hp; h0 += rq)
        pv<2>(g, st + h0, kn, cb + c0, alpha + h0, acc + h0 * g.rp + c0);
    for (; c0 < cvec; c0 += lanes)
      for (index_t h0 = 0; h0 < Hp; h0 += rq)
        pv<1>(g, st + h0, kn, cb + c0, alpha + h0, acc + h0 * g.rp + c0);
    for (; c0 < g.r; ++c0)  // scalar tail of r
      for (index_t h = 0; h < Hp; ++h) {
        float a = alpha[h] * acc[h * g.rp + c0];
        for (index_t j = 0; j < kn; ++j) a += st[j * Hp + h] * cb[j * g.r + c0];
        acc[h * g.rp + c0] = a;
      }
  }
}

/// One query token: row `m` of the absorbed queries and of the latent outputs, cache row `row`,
/// keys 0 .. end-1 visible.
struct token {
  index_t m = 0, row = 0, end = 0;
};

/// Keys per split of a token with `end` keys (0: no split), from the key count and the call's
/// token count only: results do not depend on the thread count.
inline index_t split_keys(index_t end, index_t ntok) {
  if (ntok > split_tokens) return 0;
  const index_t ns = std::clamp<index_t>(end / split_min, 1, split_max);
  if (ns == 1) return 0;
  const index_t per = (end + ns - 1) / ns;
  return (per + key_block - 1) / key_block * key_block;
}

/// Latent attention of every token of `toks`: qcat rows [H, r+dr] (unscaled, row m at
/// qcat + m·q_rs) -> olat rows [Hp, rp] (row m at olat + m·o_rs; heads >= H are junk).
/// kv: the latent cache (keys = c, values = k_rot). Allocates nothing once the calling thread's
/// workspace has seen the call's shape.
inline void attend(const geom& g, std::span<const token> toks, const float* qcat, index_t q_rs,
                   const kv_cache<float>& kv, float* olat, index_t o_rs) {
  const auto nt = static_cast<index_t>(toks.size());
  if (nt == 0) return;
  const index_t Hp = g.Hp, Kc = g.r + g.dr, prow = Hp * g.rp;
  auto frame = thread_workspace().scope();
  // work items: (token, split); split partials: acc [ns, Hp, rp], m, l [ns, Hp]
  const std::span<index_t> item0 = frame.take<index_t>(nt + 1);
  const std::span<index_t> per = frame.take<index_t>(nt);
  const std::span<index_t> off = frame.take<index_t>(nt);
  item0[0] = 0;
  index_t need = 0;
  for (index_t i = 0; i < nt; ++i) {
    const auto u = static_cast<std::size_t>(i);
    const index_t end = toks[u].end;
    per[u] = split_keys(end, nt);
    const index_t ns = per[u] > 0 ? (end + per[u] - 1) / per[u] : 1;
    off[u] = need;
    if (per[u] > 0) need += ns * (prow + 2 * Hp);
    item0[u + 1] = item0[u] + ns;
  }
  const std::span<float> parts = frame.take<float>(std::max<index_t>(need, 1));
  const int slots = max_slots();
  const index_t slot_elems = Kc * Hp + key_block * Hp + 3 * Hp;
  const std::span<float> slot_mem = frame.take<float>(slot_elems * slots);
  const float* c0 = kv.key_row(0, 0, 0);
  const float* k0 = kv.value_row(0, 0, 0);
  // kv_cache rows [B, 1, capacity, dim]: sequence b starts capacity·dim floats after b-1
  const index_t crow = kv.capacity() * kv.key_dim(), krow = kv.capacity() * kv.value_dim();
  parallel_for_with_slot(item0[static_cast<std::size_t>(nt)], [&](index_t it, int tid) {
    const auto u = static_cast<std::size_t>(std::upper_bound(item0.begin() + 1, item0.end(), it) -
                                            item0.begin() - 1);
    const token& tk = toks[u];
    float* qt = slot_mem.data() + slot_elems * tid;
    float* st = qt + Kc * Hp;
    float* alpha = st + key_block * Hp;
    float* ml = alpha + Hp;
    // pack: qt[d][h] = s · q[h][d], zero for the padding heads
    const float* q = qcat + tk.m * q_rs;
    for (index_t h = 0; h < Hp; ++h) {
      if (h < g.H) {
        for (index_t d = 0; d < Kc; ++d) qt[d * Hp + h] = g.scale * q[h * Kc + d];
      } else {
        for (index_t d = 0; d < Kc; ++d) qt[d * Hp + h] = 0.0f;
      }
    }
    const float* c = c0 + tk.row * crow;
    const float* kr = k0 + tk.row * krow;
    if (per[u] == 0) {  // one piece, straight into the output row
      float* acc = olat + tk.m * o_rs;
      partial(g, qt, c, kr, 0, tk.end, acc, ml, ml + Hp, st, alpha);
      for (index_t h = 0; h < g.H; ++h) {
        const float inv = 1.0f / ml[Hp + h];
        for (index_t e = 0; e < g.r; ++e) acc[h * g.rp + e] *= inv;
      }
      return;
    }
    const index_t ns = item0[u + 1] - item0[u], s = it - item0[u];
    const index_t ja = s * per[u], jb = std::min(tk.end, ja + per[u]);
    float* base = parts.data() + off[u];
    float* m = base + ns * prow + s * Hp;
    partial(g, qt, c, kr, ja, jb, base + s * prow, m, m + ns * Hp, st, alpha);
  });
  // merge the splits of each split token in split order
  parallel_for(nt, [&](index_t i) {
    const auto u = static_cast<std::size_t>(i);
    if (per[u] == 0) return;
    const token& tk = toks[u];
    const index_t ns = item0[u + 1] - item0[u];
    const float* base = parts.data() + off[u];
    const float* m = base + ns * prow;
    const float* l = m + ns * Hp;
    float* o = olat + tk.m * o_rs;
    for (index_t h = 0; h < g.H; ++h) {
      float mx = -std::numeric_limits<float>::infinity();
      for (index_t s = 0; s < ns; ++s) mx = std::max(mx, m[s * Hp + h]);
      float lsum = 0;
      float* oh = o + h * g.rp;
      std::fill_n(oh, g.r, 0.0f);
      for (index_t s = 0; s < ns; ++s) {
        const float w = std::exp(m[s * Hp + h] - mx);
        lsum += w * l[s * Hp + h];
        simd::axpy(oh, w, base + s * prow + h * g.rp, g.r);
      }
      simd::scale(oh, 1.0f / lsum, g.r);
    }
  });
}

}  // namespace detail::mla

class mla_attention {
 public:
  using config_type = mla_attention_config;
  using cache_type = attention_cache;

  mla_attention() = default;

  static mla_attention load(const checkpoint& ck, const std::string& prefix,
                            const config_type& cfg) {
    return load(ck.scope(prefix), cfg);
  }
  static mla_attention load(const checkpoint_scope& scope, const config_type& cfg) {
    constexpr std::string_view who = "mla_attention::load";
    const checker check{who};
    detail::check_config_positive(
        check, {"hidden", "heads", "kv_lora_rank", "qk_nope_dim", "v_dim", "chunk_size"},
        {cfg.hidden, cfg.heads, cfg.kv_lora_rank, cfg.qk_nope_dim, cfg.v_dim, cfg.chunk_size});
    if (!(cfg.qk_rope_dim >= 0 && cfg.q_lora_rank >= 0))
      check.fail("config.qk_rope_dim", "qk_rope_dim and q_lora_rank must be >= 0");
    mla_attention l;
    l.cfg_ = cfg;
    const index_t H = cfg.heads, D = cfg.hidden, r = cfg.kv_lora_rank;
    l.dk_ = cfg.qk_nope_dim + cfg.qk_rope_dim;
    const index_t qw = cfg.q_lora_rank > 0 ? cfg.q_lora_rank : H * l.dk_;
    l.in_ = weight_matrix::load(
        who, scope,
        {cfg.q_lora_rank > 0 ? "q_a_proj.weight" : "q_proj.weight", "kv_a_proj_with_mqa.weight"},
        {qw, r + cfg.qk_rope_dim}, D);
    l.qw_ = qw;
    l.P_ = qw + r + cfg.qk_rope_dim;
    if (cfg.q_lora_rank > 0) {
      l.q_norm_ = rms_norm::load(who, scope, "q_a_layernorm.weight", qw, cfg.kv_norm_eps,
                                 norm_weight::plain);
      l.q_b_ = weight_matrix::load(who, scope, {"q_b_proj.weight"}, {H * l.dk_}, qw);
    }
    l.kv_norm_ =
        rms_norm::load(who, scope, "kv_a_layernorm.weight", r, cfg.kv_norm_eps, norm_weight::plain);
    // the checkpoint layout: make_absorbed and matmul_rows read its rows
    l.kv_b_ =
        weight_matrix::load(who, scope, {"kv_b_proj.weight"}, {H * (cfg.qk_nope_dim + cfg.v_dim)},
                            r, {}, weight_layout::checkpoint);
    l.out_ = weight_matrix::load(who, scope, {"o_proj.weight"}, {D}, H * cfg.v_dim);
    typename softmax_attention<float>::options opt;
    opt.scale = cfg.scale;
    opt.chunk_size = cfg.chunk_size;
    l.attn_ = softmax_attention<float>(opt);
    l.scale_ = cfg.scale ? *cfg.scale : 1.0f / std::sqrt(static_cast<float>(l.dk_));
    if (cfg.cache == mla_cache::latent) l.make_absorbed();
    return l;
  }

  /// Every tensor the layer reads for `cfg` (names under its prefix).
  static std::vector<std::string> tensor_names(const config_type& cfg) {
    std::vector<std::string> n{"kv_a_proj_with_mqa.weight", "kv_a_layernorm.weight",
                               "kv_b_proj.weight", "o_proj.weight"};
    if (cfg.q_lora_rank > 0) {
      n.insert(n.end(), {"q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight"});
    } else {
      n.push_back("q_proj.weight");
    }
    return n;
  }

  const config_type& config() const noexcept { return cfg_; }
  /// Bytes of weights (the latent layer's W_kbᵀ copy included).
  std::size_t weight_bytes() const noexcept {
    return in_.bytes() + q_b_.bytes() + kv_b_.bytes() + out_.bytes() + wk_t_.bytes();
  }
  index_t key_dim() const noexcept { return dk_; }
  /// Floats the cache keeps per token and sequence: H·(dn+dr+dv) (expanded) or r + dr (latent).
  index_t cache_floats_per_token() const noexcept {
    return latent() ? cfg_.kv_lora_rank + cfg_.qk_rope_dim : cfg_.heads * (dk_ + cfg_.v_dim);
  }

  /// A cache of `capacity` tokens per sequence: decompressed keys [dn+dr] and values [dv] of
  /// every head (mla_cache::expanded), or the latent c [r] (as keys) and k_rot [dr] (as values)
  /// of one "head" (mla_cache::latent).
  cache_type make_cache(index_t batch, index_t capacity) const {
    const checker check{"mla_attention::make_cache"};
    if (!(batch >= 1)) check.fail("batch", "must be >= 1, got " + std::to_string(batch));
    if (!(capacity >= 1)) check.fail("capacity", "must be >= 1, got " + std::to_string(capacity));
    if (latent())
      return cache_type(kv_cache<float>::full(batch, 1, cfg_.kv_lora_rank, rot_cols(), capacity));
    return cache_type(attn_.make_cache(batch, cfg_.heads, dk_, cfg_.v_dim, capacity));
  }

  /// Prefill: x [B, T, D] -> y [B, T, D]; the tokens are appended to `cache` ([B] sequences).
  void forward(tensor_view<const float, 3> x, tensor_view<float, 3> y, cache_type& cache) {
    const checker check{"mla_attention::forward"};
    check_x(check, x, y);
    check_cache(check, cache, x.extent(0));
    for (index_t b = 0; b < x.extent(0); ++b) check_room(check, cache, b, x.extent(1));
    run(x, y, cache, {});
  }
  /// Packed variable-length prefill: x, y [1, T, D], cu_seqlens [N+1]; row n of `cache`.
  void forward(tensor_view<const float, 3> x, tensor_view<float, 3> y, cache_type& cache,
               std::span<const index_t> cu_seqlens) {
    const checker check{"mla_attention::forward"};
    check_x(check, x, y);
    const index_t N = check.cu_seqlens(cu_seqlens, x.extent(0), x.extent(1));
    check_cache(check, cache, N);
    for (index_t n = 0; n < N; ++n)
      check_room(
          check, cache, n,
          cu_seqlens[static_cast<std::size_t>(n) + 1] - cu_seqlens[static_cast<std::size_t>(n)]);
    run(x, y, cache, cu_seqlens);
  }
  tensor<float, 3> forward(tensor_view<const float, 3> x, cache_type& cache) {
    tensor<float, 3> y({x.extent(0), x.extent(1), cfg_.hidden});
    forward(x, y.view(), cache);
    return y;
  }

  /// Decode one token per sequence: x [B, D] -> y [B, D].
  void step(tensor_view<const float, 2> x, tensor_view<float, 2> y, cache_type& cache) {
    const checker check{"mla_attention::step"};
    check_step(check, x, y);
    const index_t B = x.extent(0);
    check_cache(check, cache, B);
    for (index_t b = 0; b < B; ++b) check_room(check, cache, b, 1);
    step_unchecked(x, y, cache, {});
  }
  /// Continuous batching: token i of x [B, D] continues cache row rows[i] (B distinct rows of
  /// a cache of any size); the other rows are untouched. Allocates nothing once warm.
  void step(tensor_view<const float, 2> x, tensor_view<float, 2> y, cache_type& cache,
            std::span<const index_t> rows) {
    const checker check{"mla_attention::step"};
    check_step(check, x, y);
    const index_t B = x.extent(0);
    check_cache(check, cache, cache.batch());
    front::check_rows(check, rows, B, cache.batch());
    if (cache.kv().is_ring()) check.fail("cache", "a state-index step needs a full cache");
    for (index_t b : rows) check_room(check, cache, b, 1);
    step_unchecked(x, y, cache, rows);
  }

 private:
  struct views {
    tensor_view<float, 2> proj, qa, q, c, kvb, k, v, o;
  };
  views make_views(index_t M) {
    const index_t H = cfg_.heads, r = cfg_.kv_lora_rank, dv = cfg_.v_dim;
    return {ws_.view<2>(0, {M, P_}),
            ws_.view<2>(1, {M, qw_}),
            ws_.view<2>(2, {M, H * dk_}),
            ws_.view<2>(3, {M, r}),
            ws_.view<2>(4, {M, H * (cfg_.qk_nope_dim + dv)}),
            ws_.view<2>(5, {M, H * dk_}),
            ws_.view<2>(6, {M, H * dv}),
            ws_.view<2>(7, {M, H * dv})};
  }
  bool latent() const noexcept { return cfg_.cache == mla_cache::latent; }
  index_t rot_cols() const noexcept { return std::max<index_t>(cfg_.qk_rope_dim, 1); }
  detail::mla::geom latent_geom() const noexcept {
    detail::mla::geom g;
    g.H = cfg_.heads;
    g.Hp = detail::mla::padded_heads(cfg_.heads);
    g.r = cfg_.kv_lora_rank;
    g.rp = (g.r + detail::mla::lanes - 1) / detail::mla::lanes * detail::mla::lanes;
    g.dr = cfg_.qk_rope_dim;
    g.ks = rot_cols();
    g.scale = scale_;
    return g;
  }

  // W_kbᵀ per head: rows h·r .. h·r + r - 1 of wk_t_ are the transpose of kv_b_proj's k_nope rows
  // h·(dn+dv) .. h·(dn+dv) + dn - 1 ([dn, r]), in kv_b_proj's dtype.
  void make_absorbed() {
    const index_t H = cfg_.heads, r = cfg_.kv_lora_rank, dn = cfg_.qk_nope_dim, dv = cfg_.v_dim;
    auto transpose = [&](const auto& src, auto& dst) {
      for (index_t h = 0; h < H; ++h)
        for (index_t i = 0; i < dn; ++i)
          for (index_t e = 0; e < r; ++e) dst(h * r + e, i) = src(h * (dn + dv) + i, e);
    };
    if (kv_b_.is_bf16()) {
      tensor<bf16, 2> t({H * r, dn});
      transpose(kv_b_.b16(), t);
      wk_t_ = weight_matrix(std::move(t), weight_layout::checkpoint);
    } else {
      tensor<float, 2> t({H * r, dn});
      transpose(kv_b_.f32(), t);
      wk_t_ = weight_matrix(std::move(t), weight_layout::checkpoint);
    }
  }
  // c [M, b_rows] = a · (rows [lo, hi) of w)ᵀ, in w's dtype
  static void matmul_rows(tensor_view<const float, 2> a, const weight_matrix& w, index_t lo,
                          index_t hi, tensor_view<float, 2> c) {
    if (w.is_bf16()) {
      linalg::matmul(a, tensor_view<const bf16, 2>(w.b16().view().slice(0, lo, hi)), c);
    } else {
      linalg::matmul(a, tensor_view<const float, 2>(w.f32().view().slice(0, lo, hi)), c);
    }
  }

  // proj [M, q | c | k_rot] -> q [M, H·dk], c [M, r] (normed)
  void make_q_c(const views& w) const {
    const index_t M = w.proj.extent(0), r = cfg_.kv_lora_rank;
    if (cfg_.q_lora_rank > 0) {
      q_norm_.forward(w.proj.slice(1, 0, qw_), w.qa);
      q_b_.apply(w.qa, w.q);
    } else {
      for (index_t m = 0; m < M; ++m) std::copy_n(w.proj.ptr({m, 0}), qw_, w.q.ptr({m, 0}));
    }
    kv_norm_.forward(w.proj.slice(1, qw_, qw_ + r), w.c);
  }
  // c [M, r] -> k [M, H·dk], v [M, H·dv] (k_rot from proj)
  void expand_kv(const views& w) const {
    const index_t M = w.proj.extent(0), H = cfg_.heads, r = cfg_.kv_lora_rank;
    const index_t dn = cfg_.qk_nope_dim, dr = cfg_.qk_rope_dim, dv = cfg_.v_dim;
    kv_b_.apply(w.c, w.kvb);
    for (index_t m = 0; m < M; ++m) {
      const float* kb = w.kvb.ptr({m, 0});
      const float* kr = w.proj.ptr({m, qw_ + r});
      float* kp = w.k.ptr({m, 0});
      float* vp = w.v.ptr({m, 0});
      for (index_t h = 0; h < H; ++h) {
        const float* src = kb + h * (dn + dv);
        std::copy_n(src, dn, kp + h * dk_);
        std::copy_n(kr, dr, kp + h * dk_ + dn);
        std::copy_n(src + dn, dv, vp + h * dv);
      }
    }
  }
  // proj [M, q | c | k_rot] -> q [M, H·dk], k [M, H·dk], v [M, H·dv]
  void expand(const views& w) const {
    make_q_c(w);
    expand_kv(w);
  }
  // Expands the latents cached in rows 0 .. N-1 of `kv` into the expanded cache `full`
  // (k = [kv_b(c)_k_nope | k_rot], v = kv_b(c)_v per head), in blocks of 256 tokens.
  void expand_cached(const kv_cache<float>& kv, kv_cache<float>& full, index_t N) {
    const index_t H = cfg_.heads, dn = cfg_.qk_nope_dim, dr = cfg_.qk_rope_dim, dv = cfg_.v_dim;
    constexpr index_t blk = 256;
    const tensor_view<float, 2> kvb = ws_.view<2>(10, {blk, H * (dn + dv)});
    for (index_t n = 0; n < N; ++n) {
      const index_t len = kv.length(n);
      const tensor_view<const float, 2> c = kv.keys(n, 0), kr = kv.values(n, 0);
      for (index_t t0 = 0; t0 < len; t0 += blk) {
        const index_t nb = std::min(blk, len - t0);
        kv_b_.apply(c.slice(0, t0, t0 + nb), kvb.slice(0, 0, nb));
        for (index_t t = 0; t < nb; ++t)
          for (index_t h = 0; h < H; ++h) {
            const float* src = kvb.ptr({t, h * (dn + dv)});
            float* k = full.key_row(n, h, t0 + t);
            std::copy_n(src, dn, k);
            std::copy_n(kr.ptr({t0 + t, 0}), dr, k + dn);
            std::copy_n(src + dn, dv, full.value_row(n, h, t0 + t));
          }
      }
      full.set_length(n, len);
    }
  }
  // The latent of token m (normed c in w.c, k_rot in w.proj) into slot `slot` of cache row b.
  void write_latent(const views& w, index_t m, kv_cache<float>& kv, index_t b, index_t slot) const {
    const index_t r = cfg_.kv_lora_rank, dr = cfg_.qk_rope_dim;
    std::copy_n(w.c.ptr({m, 0}), r, kv.key_row(b, 0, slot));
    float* kr = kv.value_row(b, 0, slot);
    if (dr > 0) {
      std::copy_n(w.proj.ptr({m, qw_ + r}), dr, kr);
    } else {
      kr[0] = 0.0f;
    }
  }
  // Absorbed attention of the tokens `toks` (query rows of w.q, latents already in the cache):
  // q~ = W_kbᵀ q_nope and q_rot into qcat [M, H, r+dr], the latent kernel into olat [M, Hp, rp],
  // o = W_vb o~ into w.o [M, H·dv].
  void attend_latent(const views& w, std::span<const detail::mla::token> toks,
                     const kv_cache<float>& kv) {
    const index_t M = w.q.extent(0), H = cfg_.heads, r = cfg_.kv_lora_rank;
    const index_t dn = cfg_.qk_nope_dim, dr = cfg_.qk_rope_dim, dv = cfg_.v_dim, Kc = r + dr;
    const detail::mla::geom g = latent_geom();
    const tensor_view<float, 2> qcat = ws_.view<2>(8, {M, H * Kc});
    const tensor_view<float, 2> olat = ws_.view<2>(9, {M, g.Hp * g.rp});
    for (index_t h = 0; h < H; ++h) {
      matmul_rows(w.q.slice(1, h * dk_, h * dk_ + dn), wk_t_, h * r, (h + 1) * r,
                  qcat.slice(1, h * Kc, h * Kc + r));
      for (index_t m = 0; m < M; ++m)
        std::copy_n(w.q.ptr({m, h * dk_ + dn}), dr, qcat.ptr({m, h * Kc + r}));
    }
    detail::mla::attend(g, toks, qcat.data(), qcat.stride(0), kv, olat.data(), olat.stride(0));
    for (index_t h = 0; h < H; ++h) {
      const index_t v0 = h * (dn + dv) + dn;
      matmul_rows(olat.slice(1, h * g.rp, h * g.rp + r), kv_b_, v0, v0 + dv,
                  w.o.slice(1, h * dv, (h + 1) * dv));
    }
  }

  void step_unchecked(const tensor_view<const float, 2>& x, const tensor_view<float, 2>& y,
                      cache_type& cache, std::span<const index_t> rows) {
    const index_t B = x.extent(0), H = cfg_.heads;
    const views w = make_views(B);
    in_.apply(x, w.proj);
    if (!latent()) {
      expand(w);
      if (rows.empty()) {
        attn_.step(w.q.split(1, {H, dk_}), w.k.split(1, {H, dk_}), w.v.split(1, {H, cfg_.v_dim}),
                   w.o.split(1, {H, cfg_.v_dim}), cache.kv());
      } else {
        attn_.step(w.q.split(1, {H, dk_}), w.k.split(1, {H, dk_}), w.v.split(1, {H, cfg_.v_dim}),
                   w.o.split(1, {H, cfg_.v_dim}), cache.kv(), rows);
      }
    } else {
      make_q_c(w);
      kv_cache<float>& kv = cache.kv();
      auto frame = thread_workspace().scope();
      const std::span<detail::mla::token> toks = frame.take<detail::mla::token>(B);
      for (index_t i = 0; i < B; ++i) {
        const index_t b = rows.empty() ? i : rows[static_cast<std::size_t>(i)];
        const index_t pos = kv.length(b);
        write_latent(w, i, kv, b, pos);
        toks[static_cast<std::size_t>(i)] = {i, b, pos + 1};
      }
      attend_latent(w, toks, kv);
      for (const auto& t : toks) kv.set_length(t.row, t.end);
    }
    out_.apply(w.o, y);
  }

  void check_step(const checker& check, const tensor_view<const float, 2>& x,
                  const tensor_view<float, 2>& y) const {
    check.nonempty("x", x);
    const index_t B = x.extent(0);
    check.shape("x", x, {B, cfg_.hidden});
    check.shape("y", y, {B, cfg_.hidden});
    check.inner_contiguous("x", x);
    check.inner_contiguous("y", y);
    check.no_overlap({range_of("y", y)}, {range_of("x", x)});
  }
  void check_x(const checker& check, const tensor_view<const float, 3>& x,
               const tensor_view<float, 3>& y) const {
    check.nonempty("x", x);
    check.shape("x", x, {any_extent, any_extent, cfg_.hidden});
    check.shape("y", y, {x.extent(0), x.extent(1), cfg_.hidden});
    check.inner_contiguous("x", x);
    check.inner_contiguous("y", y);
    check.no_overlap({range_of("y", y)}, {range_of("x", x)});
  }
  void check_cache(const checker& check, const cache_type& cache, index_t rows) const {
    const kv_cache<float>& kv = cache.kv();
    const index_t heads = latent() ? 1 : cfg_.heads;
    const index_t kd = latent() ? cfg_.kv_lora_rank : dk_;
    const index_t vd = latent() ? rot_cols() : cfg_.v_dim;
    if (kv.batch() != rows || kv.kv_heads() != heads || kv.key_dim() != kd ||
        kv.value_dim() != vd) {
      check.fail("cache", std::string("expected ") + (latent() ? "a latent" : "an expanded") +
                              " cache of " + std::to_string(rows) + " sequences, " +
                              std::to_string(heads) + " heads, key dim " + std::to_string(kd) +
                              ", value dim " + std::to_string(vd) + ", got " +
                              std::to_string(kv.batch()) + " sequences, " +
                              std::to_string(kv.kv_heads()) + " heads, key dim " +
                              std::to_string(kv.key_dim()) + ", value dim " +
                              std::to_string(kv.value_dim()) + " (make it with make_cache)");
    }
    if (latent() && kv.is_ring()) check.fail("cache", "a latent MLA cache must be a full cache");
  }
  static void check_room(const checker& check, const cache_type& cache, index_t row, index_t n) {
    const kv_cache<float>& kv = cache.kv();
    if (!kv.is_ring() && kv.length(row) + n > kv.capacity()) {
      check.fail("cache", "sequence " + std::to_string(row) + " holds " +
                              std::to_string(kv.length(row)) + " tokens and cannot take " +
                              std::to_string(n) + " more: the capacity is " +
                              std::to_string(kv.capacity()) +
                              " (make_cache with a larger capacity, or cache.kv().reserve)");
    }
  }

  void run(const tensor_view<const float, 3>& x, const tensor_view<float, 3>& y, cache_type& cache,
           std::span<const index_t> cu) {
    const index_t B = x.extent(0), T = x.extent(1), M = B * T, H = cfg_.heads;
    const views w = make_views(M);
    detail::project_in(in_, x, w.proj);
    auto q4 = w.q.split(0, {B, T}).split(2, {H, dk_});
    auto k4 = w.k.split(0, {B, T}).split(2, {H, dk_});
    auto v4 = w.v.split(0, {B, T}).split(2, {H, cfg_.v_dim});
    auto o4 = w.o.split(0, {B, T}).split(2, {H, cfg_.v_dim});
    if (!latent()) {
      expand(w);
      if (cu.empty()) {
        attn_.forward_chunked(q4, k4, v4, o4, cache.kv());
      } else {
        attn_.forward_chunked(q4, k4, v4, o4, cache.kv(), cu);
      }
      detail::project_out(out_, w.o, y);
      return;
    }
    // latent cache: sequence n is rows [s0, s1) of the M tokens, cache row n
    make_q_c(w);
    kv_cache<float>& kv = cache.kv();
    const index_t N = cu.empty() ? B : static_cast<index_t>(cu.size()) - 1;
    const auto first = [&](index_t n) {
      return cu.empty() ? n * T : cu[static_cast<std::size_t>(n)];
    };
    // Expanded attention (flash tiles over the new tokens and, expanded into a temporary cache,
    // the cached ones) when that costs less than the absorbed form: always for a first prefill,
    // and when the absorbed form's extra FLOP per (query, key) pair outweighs expanding the
    // cached latents (a function of the shapes only).
    const index_t r = cfg_.kv_lora_rank, dn = cfg_.qk_nope_dim, dv = cfg_.v_dim;
    const double extra_per_pair = double(2 * r + cfg_.qk_rope_dim - dk_ - dv);
    double absorbed_extra = 0, expansion = 0;
    index_t rows_needed = 1;
    for (index_t n = 0; n < N; ++n) {
      const index_t len = kv.length(n), tn = first(n + 1) - first(n);
      absorbed_extra += double(tn) * (double(len) + 0.5 * double(tn)) * extra_per_pair;
      expansion += double(len) * double(r) * double(dn + dv);
      rows_needed = std::max(rows_needed, len + tn);
    }
    if (absorbed_extra >= expansion) {
      expand_kv(w);
      if (expansion == 0) {  // empty caches: the new tokens only
        if (cu.empty()) {
          attn_.forward_chunked(q4, k4, v4, o4);
        } else {
          attn_.forward_chunked(q4, k4, v4, o4, cu);
        }
      } else {
        kv_cache<float> full = kv_cache<float>::full(N, H, dk_, dv, rows_needed);
        expand_cached(kv, full, N);
        if (cu.empty()) {
          attn_.forward_chunked(q4, k4, v4, o4, full);
        } else {
          attn_.forward_chunked(q4, k4, v4, o4, full, cu);
        }
      }
      for (index_t n = 0; n < N; ++n) {
        const index_t len0 = kv.length(n);
        for (index_t m = first(n); m < first(n + 1); ++m)
          write_latent(w, m, kv, n, len0 + m - first(n));
        kv.set_length(n, len0 + first(n + 1) - first(n));
      }
    } else {  // new tokens over a cache: absorbed, token by token
      auto frame = thread_workspace().scope();
      const std::span<detail::mla::token> toks = frame.take<detail::mla::token>(M);
      std::size_t nt = 0;
      for (index_t n = 0; n < N; ++n) {
        const index_t len0 = kv.length(n);
        for (index_t m = first(n); m < first(n + 1); ++m) {
          write_latent(w, m, kv, n, len0 + m - first(n));
          toks[nt++] = {m, n, len0 + m - first(n) + 1};
        }
      }
      attend_latent(w, toks.first(nt), kv);
      for (index_t n = 0; n < N; ++n) kv.set_length(n, kv.length(n) + first(n + 1) - first(n));
    }
    detail::project_out(out_, w.o, y);
  }

  config_type cfg_{};
  weight_matrix in_, q_b_, kv_b_, out_, wk_t_;
  rms_norm q_norm_, kv_norm_;
  softmax_attention<float> attn_;
  index_t dk_ = 0, qw_ = 0, P_ = 0;
  float scale_ = 1;
  scratch ws_;
};

}  // namespace seqmix::layers
