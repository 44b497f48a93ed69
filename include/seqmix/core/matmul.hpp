// SPDX-License-Identifier: MIT
// The projection GEMM of layers: y = x · Wᵀ with W as stored in checkpoints.
//
//   C[M, N] = (accumulate ? C : 0) + residual + row_scale[i] · act(A[M, K] · B[N, K]ᵀ + bias[N])
//
// A (activations) is f32, B (weights) f32 or bf16 ([N, K] row-major, the HuggingFace layout of
// `nn.Linear.weight`), C f32. Every term of the epilogue is optional and fused into the store of
// the output tile (one pass over C). act ∈ {none, SiLU, GELU (erf), GELU (tanh)}.
//
// Weights used for many calls are better packed once: core/packed_weights.hpp (the same
// kernels, no per-call packing of B, a faster decode GEMV; layers' weight_matrix does it).
//
// Cost: 2·M·N·K FLOP. Reads B once per call (each thread its own columns), A once per B slab
// of up to 1024 columns. Scratch per thread (grow-only, reused: steady-state calls allocate
// nothing): the packed B slab (<= 16 MiB, f32), an A block (192 KiB) and partial-sum tiles.
//
// Design (measurements: bench/bench_linalg.cpp):
//  * M > 8: Goto-style blocking. Each thread owns a contiguous range of output columns (or of
//    rows when N is narrow), packs its B slab [NC columns × all K] into NR-wide k-major panels
//    (bf16 widened to f32, exactly, while packing), packs MC×KC blocks of A into MR-row panels,
//    and runs an MR×NR register tile (AVX-512: 12 × 32, 24 zmm accumulators; AVX2: 6 × 16;
//    otherwise xsimd's widest batch) over KC-deep blocks. Partial sums of a tile between KC
//    blocks go through a per-thread tile buffer; after the last block the epilogue is applied
//    to the accumulators in registers and C is written once.
//  * M <= 8 (decode): a GEMV kernel that streams each weight row once (threads over N in
//    contiguous row ranges). M = 1: one row after another (a single sequential stream, which
//    the hardware prefetcher follows even when rows are short, as a MoE expert's are), 4
//    accumulators per row over even/odd-split 32-blocks (bf16 widened by a shift and a mask);
//    M = 2..8: M × (4, 2 or 1 rows) accumulators along K.
//  * Determinism: every output element is one fma chain over k = 0..K-1 in order (GEMM path) or
//    a dot of fixed shape (decode path, which depends on M only); K is never split across
//    threads and no blocking choice changes the chain, so results are bitwise identical for any
//    thread count.
//  * bf16 weights are widened exactly: results equal the f32 path on the widened weights, bit
//    for bit, at the f32 speed. The opt-in `matmul_precision::bf16_dot` rounds A to bf16 (rel.
//    RMS error of C vs exact ~1.7e-3; vdpbf16ps and AMX also flush denormals to zero) and runs
//    on AMX tiles where the CPU and Linux allow it (2.7-4.2x the f32 rate per CPU-second on the
//    Intel Xeon), else on vdpbf16ps (AMD Zen 4: it issues at the FMA rate with twice the
//    multiply-adds; A rounded and packed once per call, B packed through 16×16 transposes: 1.6-
//    1.9x the f32 rate per CPU-second on the AMD EPYC, 1 and 2 threads, M >= 512; 0.73x on the
//    Xeon, where it issues at 0.26x the FMA rate), else in f32 on the rounded A;
//    bf16_dot_engine() says which. M <= 8 computes in f32 on the rounded A (bandwidth-bound).
//  * Measured on the 2-core AMD EPYC (Zen 4, 32 KiB L1d, 1 MiB L2; load average 9-13 from other
//    jobs, GFLOP per CPU-second, best of 3-5 interleaved calls): f32 1 thread 84-97 (0.95-1.04x
//    OpenBLAS 0.3.21's COOPERLAKE kernel, 72-83 % of 117), 2 threads 167-183 (0.95-1.04x);
//    KC 128/192 measured slower than 256. Decode M = 1 from DRAM, 1024 × 512 and 512 × 1024
//    (a MoE expert): f32 0.85-0.95x a plain read of the same bytes, bf16 0.65-0.9x.
//  * Measured on the 2-core dev VM (bench_linalg, GFLOP per CPU-second, the machine shared):
//    f32 1 thread 112-128 (0.73-0.86x OpenBLAS 0.3.21, 0.85-0.95x Eigen 3.4), 2 threads 160-240
//    (0.56-0.80x OpenBLAS); the register kernel alone, operands in L1, runs at ~200 (the FMA peak
//    per CPU-second is ~240). Decode M = 1 reads weights at 1.1x (f32) / 0.9x (bf16) the rate of
//    a plain one-stream read of the same memory.
//    On the 2-core Intel Xeon (AVX-512, 48 KiB L1d, 2 MiB L2; load average 12-15 from other
//    jobs, so only same-process ratios mean anything), 1 thread, per thread-CPU-second, best of
//    3-6 interleaved calls: the B-panel prefetch of the micro-kernel raised 1024³ / 2048³ from
//    0.73-0.82x / 0.75-0.81x OpenBLAS 0.3.21 (its SKYLAKEX kernel) to 0.81-0.93x / 0.85-0.93x;
//    KC 128/384, MR 14, NC 256/512, MC 96 and an ir-outer loop order all measured within noise
//    of KC 256, MR 12, NC 1024, MC 192 (ir-outer and KC 384 a little slower).
//    The same Xeon quiet (2026-12-03, bench_peak 198 GFLOP/s per thread): f32 1 thread 100-126
//    GFLOP/s (0.86-0.95x OpenBLAS), 2 threads 208-231 (0.94-0.99x); later, probe 229: 1 thread
//    123-149 against Eigen 3.4's 139-156 and OpenBLAS's 154-176 (Eigen is faster on 1 thread
//    here), 2 threads 262-292 against OpenBLAS 297-337; decode from DRAM, 4096 ×
//    4096, 1 thread: M = 1 f32 12.6 GB/s, bf16 14.1 (Eigen 13.9, OpenBLAS 13.0 f32; a plain
//    one-stream read 11.6), M = 8 f32 40 GFLOP/s, bf16 59 (were 24 / 31 with one B row per pass).
//  * The AMD EPYC again, quiet (2026-12-04, bench_peak 108-109 / 210-212 GFLOP/s on 1 / 2
//    threads; medians of 3 interleaved calls, the 1- and 2-thread rows in separate processes:
//    OpenBLAS's idle pthread workers spin in sched_yield and, left over from a 2-thread row, cost
//    a 1-thread row of the same process up to 10 %): f32 1 thread 81-94 GFLOP/s (74-86 % of the
//    probe; M = 512, N = K = 1024 the lowest, B's packing ~7 % of it), OpenBLAS 84-99, Eigen
//    73-78; 2 threads 162-195 (76-92 %), OpenBLAS 142-178. bf16_dot 150-183 / 270-368 GFLOP/s
//    (1.8-2.0x f32). Decode M = 1 from DRAM, 4096 x 4096: f32 19.0 GB/s, bf16 17.7, a plain
//    read of the same buffers 18.6 (1.02x / 0.95x); 2 threads 28.8 / 27.9 against 29.1.
//  * The same VM later that day, probe 116 / 229 (docs/bench/linalg.md): f32 1 thread 95-102
//    GFLOP/s (82-87 %), 2 threads 186-206 (81-90 %); on packed_weights 99-106 / 190-205.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AMX_TILE__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <seqmix/core/dtype.hpp>
#include <seqmix/core/error.hpp>
#include <seqmix/core/parallel.hpp>
#include <seqmix/core/simd.hpp>
#include <seqmix/core/tensor.hpp>

namespace seqmix::linalg {

/// Activation applied after the bias in matmul's epilogue.
enum class activation {
  none,
  silu,       ///< x · sigmoid(x)
  gelu,       ///< x · Φ(x) = 0.5·x·(1 + erf(x/√2)) (torch's default GELU)
  gelu_tanh,  ///< 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) (torch's approximate="tanh")
};

/// How bf16 weights are multiplied.
enum class matmul_precision {
  exact,     ///< widen bf16 weights to f32 (exact) and compute in f32: the default
  bf16_dot,  ///< round A to bf16 (nearest-even) and use vdpbf16ps pair dot products (bf16 only)
};

/// Optional fused terms of matmul; an absent view (data() == nullptr) is not applied.
/// C = (accumulate ? C : 0) + residual + row_scale[i] · act(A·Bᵀ + bias)
struct matmul_options {
  tensor_view<const float, 1> bias{};       ///< [N]
  activation act = activation::none;        ///<
  tensor_view<const float, 1> row_scale{};  ///< [M], e.g. a router weight per token
  tensor_view<const float, 2> residual{};   ///< [M, N]; may be C itself (same data and strides)
  bool accumulate = false;                  ///< add into C instead of overwriting it
  matmul_precision precision = matmul_precision::exact;
};

namespace matmul_detail {

using simd::batch;
inline constexpr index_t L = simd::lanes<float>;

// Register tile: MR rows × NV vectors of C. 24 accumulators of 32 zmm on AVX-512 (plus 2 B
// vectors and a broadcast); 12 of 16 ymm on AVX2.
inline constexpr index_t NV = 2;
inline constexpr index_t NR = NV * L;
#ifndef SEQMIX_MATMUL_MR
#define SEQMIX_MATMUL_MR (L >= 16 ? 12 : 6)
#endif
inline constexpr index_t MR = SEQMIX_MATMUL_MR;
// Blocking (for 48 KiB L1d / 2 MiB L2 per core; the SEQMIX_MATMUL_* macros override it, and no
// choice changes a result bit, since partial sums are stored exactly between KC blocks):
//  KC = 256: a KC×NR micro-panel of packed B (32 KiB) is reused from L1 across the MR-row tiles
//            of an MC block (with the A panels streaming past it, it does not stay there whole:
//            the micro-kernel prefetches it pf_b k-steps ahead); MC = 192 rows: the packed A block
//            (MC×KC×4 = 192 KiB) stays in L2 and is reused across every panel of the slab;
//  NC <= 1024 columns, B slab (NC × K, packed once per call and thread) <= 16 MiB: it lives in
//            L3, its KC-deep region (KC×NC×4 <= 1 MiB) in L2 while an A block sweeps it.
#ifndef SEQMIX_MATMUL_KC
#define SEQMIX_MATMUL_KC 256
#endif
inline constexpr index_t KC = SEQMIX_MATMUL_KC;
#ifndef SEQMIX_MATMUL_MC
#define SEQMIX_MATMUL_MC 16
#endif
inline constexpr index_t MC = MR * SEQMIX_MATMUL_MC;
#ifndef SEQMIX_MATMUL_SLAB
#define SEQMIX_MATMUL_SLAB (index_t(16) << 20)
#endif
inline constexpr index_t slab_bytes = SEQMIX_MATMUL_SLAB;
#ifndef SEQMIX_MATMUL_NC
#define SEQMIX_MATMUL_NC 1024
#endif
inline constexpr index_t max_nc = SEQMIX_MATMUL_NC;
// Prefetch distance (k-steps) of the packed B panel in the micro-kernel.
#ifndef SEQMIX_MATMUL_PFB
#define SEQMIX_MATMUL_PFB 8
#endif
inline constexpr index_t pf_b = SEQMIX_MATMUL_PFB;
// M at or below this takes the decode (GEMV) path.
inline constexpr index_t gemv_max_m = 8;

/// a·b + c with one rounding. xsimd 8.1 has no AVX-512 fma (it falls back to a·b + c): g++ in
/// GNU mode contracts that into vfmadd, clang does not (half the speed, other rounding), so the
/// kernels call the instruction directly.
inline batch<float> fmadd(const batch<float>& a, const batch<float>& b, const batch<float>& c) {
#if defined(__AVX512F__)
  return batch<float>(_mm512_fmadd_ps(a, b, c));
#else
  return simd::fma(a, b, c);
#endif
}

/// Grow-only per-thread scratch (OpenMP's threads persist, so steady-state calls allocate
/// nothing).
inline float* scratch(int which, std::size_t n) {
  thread_local std::vector<float> buf[6];  // B slab, tiles, A block, A copy, decode rows, xp
  auto& v = buf[which];
  if (v.size() < n) v.resize(n);
  return v.data();
}

inline float widen(float x) noexcept {
  return x;
}
inline float widen(bf16 x) noexcept {
  return to_float(x);
}

/// One vector of weights as f32 (bf16 widened exactly).
inline batch<float> load_w(const float* p) {
  return simd::load(p);
}
inline batch<float> load_w(const bf16* p) {
#if defined(__AVX512F__)
  static_assert(L == 16, "xsimd's default architecture is AVX-512 when __AVX512F__ is defined");
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return batch<float>(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
#elif defined(__AVX2__)
  static_assert(L == 8, "xsimd's default architecture is AVX2 when __AVX2__ is defined");
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return batch<float>(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
#else
  alignas(64) float tmp[L];
  for (index_t i = 0; i < L; ++i) tmp[i] = to_float(p[i]);
  return batch<float>::load_aligned(tmp);
#endif
}
template <class W>
batch<float> load_w_partial(const W* p, index_t n) {
  alignas(64) float tmp[L] = {};
  for (index_t i = 0; i < n; ++i) tmp[i] = widen(p[i]);
  return batch<float>::load_aligned(tmp);
}

// ---- epilogue ------------------------------------------------------------------------------

/// erf(x) for the vector GELU: Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7), odd extension.
inline batch<float> erf_as(const batch<float>& x) {
  const batch<float> z = xsimd::abs(x);
  const batch<float> t =
      batch<float>(1.0f) / fmadd(batch<float>(0.3275911f), z, batch<float>(1.0f));
  batch<float> p(1.061405429f);
  p = fmadd(p, t, batch<float>(-1.453152027f));
  p = fmadd(p, t, batch<float>(1.421413741f));
  p = fmadd(p, t, batch<float>(-0.284496736f));
  p = fmadd(p, t, batch<float>(0.254829592f));
  p = p * t;
  const batch<float> r = batch<float>(1.0f) - p * simd::exp(-(z * z));
  return xsimd::select(x < batch<float>(0.0f), -r, r);
}

inline batch<float> apply_act(activation act, const batch<float>& v) {
  switch (act) {
    case activation::silu:
      return simd::silu(v);
    case activation::gelu:
      return batch<float>(0.5f) * v *
             (batch<float>(1.0f) + erf_as(v * batch<float>(0.70710678118654752f)));
    case activation::gelu_tanh: {
      // 0.5·(1 + tanh(u)) = sigmoid(2u)
      const batch<float> u =
          batch<float>(1.5957691216057308f) *
          fmadd(batch<float>(0.044715f) * v, v * v, v);  // 2·√(2/π)·(x + 0.044715x³)
      return v * simd::sigmoid(u);
    }
    case activation::none:
      break;
  }
  return v;
}

inline float apply_act(activation act, float v) {
  switch (act) {
    case activation::silu:
      return math::silu(v);
    case activation::gelu:
      return 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752f));
    case activation::gelu_tanh:
      return v * math::sigmoid(1.5957691216057308f * std::fma(0.044715f * v, v * v, v));
    case activation::none:
      break;
  }
  return v;
}

/// Everything the epilogue needs, resolved once per call.
struct epilogue {
  float* c;
  index_t rsc, csc;
  const float* bias;
  index_t sb;
  const float* scale;
  index_t ss;
  const float* res;
  index_t rsr, csr;
  activation act;
  bool accumulate;
  bool vector;  // every inner stride is 1: the row runs on vectors (with a masked tail)

  /// One vector of C[i, j .. j + w) from its raw products `v` (vector epilogue only).
  void store(index_t i, index_t j, index_t w, batch<float> v) const {
    float* cij = c + i * rsc + j;
    const bool full = w == L;
    if (bias) v += full ? simd::load(bias + j) : simd::load_partial(bias + j, w);
    v = apply_act(act, v);
    if (scale) v *= batch<float>(scale[i * ss]);
    if (res) {
      const float* r = res + i * rsr + j;
      v += full ? simd::load(r) : simd::load_partial(r, w);
    }
    if (accumulate) v += full ? simd::load(cij) : simd::load_partial(cij, w);
    if (full) {
      simd::store(cij, v);
    } else {
      simd::store_partial(cij, v, w);
    }
  }

  /// Writes C[i, j0 .. j0 + n) from the raw products `raw[0 .. n)`.
  void row(index_t i, index_t j0, index_t n, const float* raw) const {
    float* ci = c + i * rsc + j0 * csc;
    const float* ri = res ? res + i * rsr + j0 * csr : nullptr;
    const float* bi = bias ? bias + j0 * sb : nullptr;
    const float s = scale ? scale[i * ss] : 1.0f;
    if (vector) {
      const batch<float> sv(s);
      for (index_t j = 0; j < n; j += L) {
        const index_t w = std::min(L, n - j);
        const bool full = w == L;
        batch<float> v = full ? simd::load(raw + j) : simd::load_partial(raw + j, w);
        if (bi) v += full ? simd::load(bi + j) : simd::load_partial(bi + j, w);
        v = apply_act(act, v);
        if (scale) v *= sv;
        if (ri) v += full ? simd::load(ri + j) : simd::load_partial(ri + j, w);
        if (accumulate) v += full ? simd::load(ci + j) : simd::load_partial(ci + j, w);
        if (full) {
          simd::store(ci + j, v);
        } else {
          simd::store_partial(ci + j, v, w);
        }
      }
      return;
    }
    for (index_t j = 0; j < n; ++j) {
      float v = raw[j];
      if (bi) v += bi[j * sb];
      v = apply_act(act, v);
      if (scale) v *= s;
      if (ri) v += ri[j * csr];
      if (accumulate) v += ci[j * csc];
      ci[j * csc] = v;
    }
  }
};

// ---- GEMM path (M > 8) ---------------------------------------------------------------------

#if defined(__AVX512F__)
/// In-register 16×16 transpose: r[i] = row i (16 consecutive k) -> r[k] = column k.
inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    u[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int h = 0; h < 16; h += 8) {
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_f32x4(u[h + i], u[h + i + 4], 0x88);
      t[h + i + 4] = _mm512_shuffle_f32x4(u[h + i], u[h + i + 4], 0xDD);
    }
  }
  for (int k = 0; k < 8; ++k) {
    r[k] = _mm512_shuffle_f32x4(t[k], t[8 + k], 0x88);
    r[k + 8] = _mm512_shuffle_f32x4(t[k], t[8 + k], 0xDD);
  }
}
#endif

/// Packs B rows [j0, j0 + nc) (all K) into ceil(nc / NR) panels of K × NR floats, panel p at
/// dst + p·K·NR, element (k, j) at [k·NR + j]; columns past nc are zero.
template <class W>
void pack_b(const W* b, index_t ldb, index_t j0, index_t nc, index_t K, float* dst) {
  const index_t panels = (nc + NR - 1) / NR;
  constexpr index_t kb = 64;  // k block: keeps the NR written rows of a block in L1
  for (index_t p = 0; p < panels; ++p) {
    float* d = dst + p * K * NR;
    const index_t cols = std::min(NR, nc - p * NR);
    for (index_t k0 = 0; k0 < K; k0 += kb) {
      const index_t k1 = std::min(K, k0 + kb);
      const W* src = b + (j0 + p * NR) * ldb;
#if defined(__AVX512F__)
      if (cols == NR) {
        // 16×16 blocks through registers; the k tail of the block below
        static_assert(NR == 32 && L == 16);
        index_t k = k0;
        for (; k + 16 <= k1; k += 16) {
          for (index_t h = 0; h < NR; h += 16) {
            __m512 r[16];
            for (index_t i = 0; i < 16; ++i) r[i] = load_w(src + (h + i) * ldb + k);
            transpose16(r);
            for (index_t kk = 0; kk < 16; ++kk) _mm512_storeu_ps(d + (k + kk) * NR + h, r[kk]);
          }
        }
        for (; k < k1; ++k) {
          for (index_t jj = 0; jj < NR; ++jj) d[k * NR + jj] = widen(src[jj * ldb + k]);
        }
        continue;
      }
#endif
      if (cols == NR) {
        for (index_t k = k0; k < k1; ++k) {
          for (index_t jj = 0; jj < NR; ++jj) d[k * NR + jj] = widen(src[jj * ldb + k]);
        }
      } else {
        for (index_t k = k0; k < k1; ++k) {
          for (index_t jj = 0; jj < NR; ++jj) {
            d[k * NR + jj] = jj < cols ? widen(src[jj * ldb + k]) : 0.0f;
          }
        }
      }
    }
  }
}

/// Packs rows [i0, i0 + mc) × depth [p0, p0 + kc) of A into ceil(mc / MR) panels of kc × MR
/// floats (element (k, r) of panel t at dst[t·kc·MR + k·MR + r]); rows past mc are zero.
inline void pack_a(const float* a, index_t lda, index_t i0, index_t mc, index_t p0, index_t kc,
                   float* dst) {
  for (index_t t = 0; t * MR < mc; ++t) {
    float* d = dst + t * kc * MR;
    const index_t rows = std::min(MR, mc - t * MR);
    const float* src = a + (i0 + t * MR) * lda + p0;
    index_t k = 0;
#if defined(__AVX512F__)
    if constexpr (MR <= 16) {
      // 16 k at a time through an in-register transpose (rows past `rows` zero), stored as 16
      // k-rows of MR floats (masked): the scalar gather below was ~5 % of an M = 512 call's time
      const __mmask16 keep = static_cast<__mmask16>((1u << MR) - 1u);
      for (; k + 16 <= kc; k += 16) {
        __m512 r[16];
        for (index_t i = 0; i < 16; ++i)
          r[i] = i < rows ? _mm512_loadu_ps(src + i * lda + k) : _mm512_setzero_ps();
        transpose16(r);
        for (index_t kk = 0; kk < 16; ++kk) _mm512_mask_storeu_ps(d + (k + kk) * MR, keep, r[kk]);
      }
    }
#endif
    for (; k < kc; ++k) {
      for (index_t r = 0; r < MR; ++r) d[k * MR + r] = r < rows ? src[r * lda + k] : 0.0f;
    }
  }
}

/// tile[MR × NR] (row-major) (+)= Ap[kc × MR] · Bp[kc × NR] (both packed); `load`: continue the
/// chains stored in `tile` (a previous KC block), else start them at 0. `ep` (last KC block):
/// finish rows [i0, i0 + mr) × columns [j0, j0 + nv) of C through the epilogue instead.
inline void micro_tile(index_t kc, const float* ap, const float* bp, float* tile, bool load,
                       const epilogue* ep, index_t i0, index_t j0, index_t mr, index_t nv) {
  batch<float> acc[std::size_t(MR)][std::size_t(NV)];
  for (index_t r = 0; r < MR; ++r) {
    for (index_t u = 0; u < NV; ++u) {
      acc[r][u] = load ? simd::load(tile + r * NR + u * L) : batch<float>(0.0f);
    }
  }
  for (index_t p = 0; p < kc; ++p) {
#if defined(__GNUC__)
    // The KC×NR panel of B (32 KiB) does not survive in the 48 KiB L1 while the A panels
    // stream past it: fetch it pf_b k-steps ahead (+8-12 % on the Xeon, 1 thread, same run;
    // no result bit depends on it). Past the panel's end this touches the next panel or, at
    // the end of the slab, nothing that faults (prefetches never do).
    // (integer arithmetic: a pointer past the end of the scratch would be UB, an address is not)
    for (index_t u = 0; u < NR; u += 16) {
      const auto ahead = reinterpret_cast<std::uintptr_t>(bp) +
                         static_cast<std::uintptr_t>((p + pf_b) * NR + u) * sizeof(float);
      __builtin_prefetch(reinterpret_cast<const void*>(ahead), 0, 3);
    }
#endif
    batch<float> bb[std::size_t(NV)];
    for (index_t u = 0; u < NV; ++u) bb[u] = simd::load(bp + p * NR + u * L);
    for (index_t r = 0; r < MR; ++r) {
      const batch<float> av(ap[p * MR + r]);
      for (index_t u = 0; u < NV; ++u) acc[r][u] = fmadd(av, bb[u], acc[r][u]);
    }
  }
  if (ep && ep->vector) {
    for (index_t r = 0; r < std::min(mr, MR); ++r) {
      for (index_t u = 0; u < NV; ++u) {
        if (u * L < nv) ep->store(i0 + r, j0 + u * L, std::min(L, nv - u * L), acc[r][u]);
      }
    }
    return;
  }
  for (index_t r = 0; r < MR; ++r) {
    for (index_t u = 0; u < NV; ++u) simd::store(tile + r * NR + u * L, acc[r][u]);
  }
  if (ep) {
    for (index_t r = 0; r < mr; ++r) ep->row(i0 + r, j0, nv, tile + r * NR);
  }
}

/// Columns per B slab of a thread (whole NR panels; the slab of K × NC floats <= slab_bytes).
inline index_t slab_columns(index_t K) {
  const index_t nc = slab_bytes / (index_t(sizeof(float)) * std::max<index_t>(K, 1) * NR) * NR;
  return std::clamp<index_t>(nc, NR, max_nc);
}

/// Serial blocked GEMM of rows [m0, m1) × columns [n0, n1) (A inner-contiguous; n0 a multiple
/// of NR). `slab(jc, nc)` returns B's columns [jc, jc + nc) as packed K × NR panels (panel jr at
/// + jr·K·NR): packed here from the checkpoint layout (gemm_block), or already packed once at
/// load (packed_weights). Every output is the same fma chain whichever source B comes from.
template <class Slab>
void gemm_block_on(const float* a, index_t lda, index_t K, index_t m0, index_t m1, index_t n0,
                   index_t n1, const epilogue& ep, Slab&& slab) {
  const index_t nc_max = slab_columns(K);
  const index_t panels_max = nc_max / NR;
  const index_t kc_max = std::min(KC, K);
  float* tiles = scratch(1, static_cast<std::size_t>((MC / MR) * panels_max * MR * NR));
  float* apack = scratch(2, static_cast<std::size_t>(MC * kc_max));
  for (index_t jc = n0; jc < n1; jc += nc_max) {
    const index_t nc = std::min(nc_max, n1 - jc);
    const index_t panels = (nc + NR - 1) / NR;
    const float* bpack = slab(jc, nc);
    for (index_t ic = m0; ic < m1; ic += MC) {
      const index_t mc = std::min(MC, m1 - ic);
      for (index_t pc = 0; pc < K; pc += KC) {
        const index_t kc = std::min(KC, K - pc);
        const bool last = pc + kc == K;
        pack_a(a, lda, ic, mc, pc, kc, apack);
        for (index_t jr = 0; jr < panels; ++jr) {
          const float* bp = bpack + jr * K * NR + pc * NR;
          const index_t j0 = jc + jr * NR;
          const index_t nv = std::min(NR, jc + nc - j0);
          for (index_t ir = 0; ir < mc; ir += MR) {
            const index_t mr = std::min(MR, mc - ir);
            float* tile = tiles + (jr * (MC / MR) + ir / MR) * MR * NR;
            micro_tile(kc, apack + (ir / MR) * kc * MR, bp, tile, pc > 0, last ? &ep : nullptr,
                       ic + ir, j0, mr, nv);
          }
        }
      }
    }
  }
}

/// gemm_block_on with B in the checkpoint layout [N, K], packed slab by slab into scratch.
template <class W>
void gemm_block(const float* a, index_t lda, const W* b, index_t ldb, index_t K, index_t m0,
                index_t m1, index_t n0, index_t n1, const epilogue& ep) {
  float* bpack = scratch(0, static_cast<std::size_t>(slab_columns(K) * K));
  gemm_block_on(a, lda, K, m0, m1, n0, n1, ep, [&](index_t jc, index_t nc) {
    pack_b(b, ldb, jc, nc, K, bpack);
    return static_cast<const float*>(bpack);
  });
}

/// Splits an M × N product over threads: whole NR panels of columns per thread, or whole
/// tiles of `tile` rows (the micro-kernel's MR, AMX's 32) when there are fewer panels than
/// threads (narrow N); block(m0, m1, n0, n1).
template <class Block>
void split_gemm(index_t M, index_t N, Block&& block, index_t tile = MR) {
  const index_t T = std::max(1, num_threads());
  const index_t panels = (N + NR - 1) / NR;
  const index_t row_tiles = (M + tile - 1) / tile;
  const bool by_cols = panels >= T || panels >= row_tiles;
  const index_t parts = std::min<index_t>(T, by_cols ? panels : row_tiles);
  parallel_for(parts, [&](index_t t) {
    if (by_cols) {
      const index_t n0 = std::min(N, panels * t / parts * NR);
      const index_t n1 = std::min(N, panels * (t + 1) / parts * NR);
      if (n1 > n0) block(index_t(0), M, n0, n1);
    } else {
      const index_t m0 = std::min(M, row_tiles * t / parts * tile);
      const index_t m1 = std::min(M, row_tiles * (t + 1) / parts * tile);
      if (m1 > m0) block(m0, m1, index_t(0), N);
    }
  });
}

// ---- decode path (M <= 8) ------------------------------------------------------------------

/// raw[m·ldr + j - j0] = dot(A[m, :], B[j, :]) for j in [j0, j1), M rows.
/// M = 1: a thread's range of weight rows is split into gemv_streams = 4 contiguous parts that
/// are read in lockstep, one row of each per pass: 4 long sequential streams through memory
/// (the rows of a matrix are contiguous), which the hardware prefetchers follow from the first
/// lines and which keep more reads in flight than one stream (measured on the 2-core Xeon, from
/// DRAM, one thread: 4096 × 4096 f32 11.6 -> 13.2 GB/s, bf16 8.9 -> 11.3; 1024 × 512 bf16 10.4
/// -> 11.5; a plain one-stream read of the same bytes 12-13). Several adjacent rows read in
/// parallel would instead be several short streams when K is small (a MoE expert's 512 to
/// 1024), which the prefetchers learn too late (AMD EPYC, 1024 × 512 bf16: 8 adjacent rows 7-8
/// GB/s, one row at a time 13). Each row runs 4 accumulators over 64-wide steps of k: on
/// AVX-512 a 32-wide block is split into its even and odd elements (bf16: a shift and a mask of
/// one load, no shuffle; f32: two permutes of two loads, the same values in the same lanes),
/// multiplied by `xp`, the activation row permuted alike (gemv_permute_x); a last 32-block goes
/// to accumulators 0 and 1, a last full vector and the partial tail to accumulator 0 in plain
/// order; the row's value is reduce((a0 + a1) + (a2 + a3)). f32 and bf16 weights (widened) take
/// the same chain, bit for bit, and a row's chain does not depend on its group.
inline constexpr index_t gemv_blk = 2 * L;
inline constexpr index_t gemv_streams = 4;

/// xp for gemv_row1: per 32-block (AVX-512) xp[b + i] = x[b + 2i], xp[b + 16 + i] = x[b + 2i + 1];
/// the rest (and elsewhere all of it) unpermuted.
inline void gemv_permute_x(const float* x, index_t K, float* xp) {
  index_t k = 0;
#if defined(__AVX512F__)
  for (; k + gemv_blk <= K; k += gemv_blk) {
    for (index_t i = 0; i < L; ++i) {
      xp[k + i] = x[k + 2 * i];
      xp[k + L + i] = x[k + 2 * i + 1];
    }
  }
#endif
  for (; k < K; ++k) xp[k] = x[k];
}

#if defined(__AVX512F__)
/// The even and odd elements of weights p[0 .. 32) as f32.
inline void split_even_odd(const bf16* p, __m512& even, __m512& odd) {
  const __m512i v = _mm512_loadu_si512(p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int(0xffff0000u))));
}
inline void split_even_odd(const float* p, __m512& even, __m512& odd) {
  const __m512 w0 = _mm512_loadu_ps(p), w1 = _mm512_loadu_ps(p + 16);
  const __m512i ie = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i io = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  even = _mm512_permutex2var_ps(w0, ie, w1);
  odd = _mm512_permutex2var_ps(w0, io, w1);
}
#endif

/// The dots of S weight rows br[0 .. S) with the activation row, in lockstep (x loaded once
/// per step for all S); each row runs the same 4-accumulator chain whatever S is, so a row's
/// value does not depend on which rows it was grouped with.
template <index_t S, class W>
void gemv_row1_group(const float* a, const float* xp, const W* const* br, index_t K,
                     float* const* out) {
  const index_t kv = K / L * L;
#if defined(__AVX512F__)
  const index_t k64 = K / (2 * gemv_blk) * (2 * gemv_blk), k32 = K / gemv_blk * gemv_blk;
#else
  const index_t k64 = K / (4 * L) * (4 * L);
  (void)xp;
#endif
  batch<float> acc[std::size_t(S)][4];
  for (index_t s = 0; s < S; ++s) {
    for (auto& v : acc[s]) v = batch<float>(0.0f);
  }
  index_t k = 0;
#if defined(__AVX512F__)
  for (; k < k64; k += 2 * gemv_blk) {
    const batch<float> x0 = simd::load(xp + k), x1 = simd::load(xp + k + L),
                       x2 = simd::load(xp + k + 2 * L), x3 = simd::load(xp + k + 3 * L);
    for (index_t s = 0; s < S; ++s) {
      __m512 e0, o0, e1, o1;
      split_even_odd(br[s] + k, e0, o0);
      split_even_odd(br[s] + k + gemv_blk, e1, o1);
      acc[s][0] = fmadd(x0, batch<float>(e0), acc[s][0]);
      acc[s][1] = fmadd(x1, batch<float>(o0), acc[s][1]);
      acc[s][2] = fmadd(x2, batch<float>(e1), acc[s][2]);
      acc[s][3] = fmadd(x3, batch<float>(o1), acc[s][3]);
    }
  }
  if (k < k32) {
    const batch<float> x0 = simd::load(xp + k), x1 = simd::load(xp + k + L);
    for (index_t s = 0; s < S; ++s) {
      __m512 e0, o0;
      split_even_odd(br[s] + k, e0, o0);
      acc[s][0] = fmadd(x0, batch<float>(e0), acc[s][0]);
      acc[s][1] = fmadd(x1, batch<float>(o0), acc[s][1]);
    }
    k += gemv_blk;
  }
#else
  for (; k < k64; k += 4 * L) {
    for (index_t s = 0; s < S; ++s) {
      for (index_t u = 0; u < 4; ++u) {
        acc[s][u] = fmadd(simd::load(a + k + u * L), load_w(br[s] + k + u * L), acc[s][u]);
      }
    }
  }
#endif
  for (; k < kv; k += L) {
    const batch<float> x0 = simd::load(a + k);
    for (index_t s = 0; s < S; ++s) acc[s][0] = fmadd(x0, load_w(br[s] + k), acc[s][0]);
  }
  if (kv < K) {
    const batch<float> x0 = simd::load_partial(a + kv, K - kv);
    for (index_t s = 0; s < S; ++s) {
      acc[s][0] = fmadd(x0, load_w_partial(br[s] + kv, K - kv), acc[s][0]);
    }
  }
  for (index_t s = 0; s < S; ++s) {
    *out[s] = simd::reduce_sum((acc[s][0] + acc[s][1]) + (acc[s][2] + acc[s][3]));
  }
}

/// raw[j - j0] = dot(a, B[j, :]) for j in [j0, j1): the range split into gemv_streams
/// contiguous parts read in lockstep (the remainder rows one at a time).
template <class W>
void gemv_row1(const float* a, const float* xp, const W* b, index_t ldb, index_t K, index_t j0,
               index_t j1, float* raw) {
  constexpr index_t S = gemv_streams;
  const index_t per = (j1 - j0) / S;
  const W* br[std::size_t(S)];
  float* out[std::size_t(S)];
  for (index_t r = 0; r < per; ++r) {
    for (index_t s = 0; s < S; ++s) {
      br[s] = b + (j0 + s * per + r) * ldb;
      out[s] = raw + s * per + r;
    }
    gemv_row1_group<S>(a, xp, br, K, out);
  }
  for (index_t j = j0 + S * per; j < j1; ++j) {
    br[0] = b + j * ldb;
    out[0] = raw + (j - j0);
    gemv_row1_group<1>(a, xp, br, K, out);
  }
}

template <index_t M, class W>
void gemv_rows(const float* a, index_t lda, const W* b, index_t ldb, index_t K, index_t j0,
               index_t j1, float* raw, index_t ldr) {
  // B rows per pass: R·M accumulators, each one chain over k (so R changes no result bit).
  // With 32 vector registers (AVX-512) up to 24 accumulators: the loads per FMA fall from
  // (1 + M)/M (R = 1) to (R + M)/(R·M), which is what bounds M = 4..8 here (2-core Xeon, 4096²
  // from DRAM, 1 thread, M = 8 f32: R = 1 24 GFLOP/s, R = 3 40; bf16 31 -> 59); with 16
  // registers (AVX2) at most 8. (M = 1 takes gemv_row1.)
  static_assert(M >= 2 && M <= gemv_max_m);
  constexpr index_t RB =
      L >= 16 ? (M <= 2 ? 6 : (M <= 4 ? 4 : 3)) : (M <= 2 ? 4 : (M <= 4 ? 2 : 1));
  const index_t kv = K / L * L;
  index_t j = j0;
  auto block = [&]<index_t R>(index_t jb) {
    batch<float> acc[std::size_t(R)][std::size_t(M)];
    for (index_t r = 0; r < R; ++r) {
      for (index_t m = 0; m < M; ++m) acc[r][m] = batch<float>(0.0f);
    }
    const W* br[std::size_t(R)];
    for (index_t r = 0; r < R; ++r) br[r] = b + (jb + r) * ldb;
    for (index_t k = 0; k < kv; k += L) {
      batch<float> bv[std::size_t(R)];
      for (index_t r = 0; r < R; ++r) bv[r] = load_w(br[r] + k);
      for (index_t m = 0; m < M; ++m) {
        const batch<float> av = simd::load(a + m * lda + k);
        for (index_t r = 0; r < R; ++r) acc[r][m] = fmadd(av, bv[r], acc[r][m]);
      }
    }
    if (kv < K) {
      batch<float> bv[std::size_t(R)];
      for (index_t r = 0; r < R; ++r) bv[r] = load_w_partial(br[r] + kv, K - kv);
      for (index_t m = 0; m < M; ++m) {
        const batch<float> av = simd::load_partial(a + m * lda + kv, K - kv);
        for (index_t r = 0; r < R; ++r) acc[r][m] = fmadd(av, bv[r], acc[r][m]);
      }
    }
    for (index_t r = 0; r < R; ++r) {
      for (index_t m = 0; m < M; ++m) raw[m * ldr + jb + r - j0] = simd::reduce_sum(acc[r][m]);
    }
  };
  for (; j + RB <= j1; j += RB) block.template operator()<RB>(j);
  for (; j < j1; ++j) block.template operator()<1>(j);
}

template <class W, index_t... I>
void gemv_dispatch(std::integer_sequence<index_t, I...>, index_t M, const float* a, index_t lda,
                   const W* b, index_t ldb, index_t K, index_t j0, index_t j1, float* raw,
                   index_t ldr) {
  // M = 2 .. gemv_max_m (M = 1 takes gemv_row1)
  ((M == I + 2 ? gemv_rows<I + 2>(a, lda, b, ldb, K, j0, j1, raw, ldr) : void()), ...);
}

// ---- bf16 pair-dot path (opt-in) -----------------------------------------------------------
// matmul_precision::bf16_dot rounds A to bf16 (nearest-even) up front. With AVX-512 BF16, M > 8
// then runs on vdpbf16ps: each instruction adds a[2q]·b[2q] + a[2q+1]·b[2q+1] (products of two
// bf16 are exact in f32) to 16 f32 accumulators, i.e. twice the multiply-adds of an FMA; the
// instruction flushes denormal inputs and results to zero. Elsewhere (and for M <= 8, where the
// weights' bandwidth bounds the time anyway) the option computes in f32 on the rounded A.

/// Rounds a row of f32 to bf16 values held as f32 (nearest-even), for the bf16_dot option.
inline void round_row_bf16(const float* src, index_t sa, float* dst, index_t n) {
  if (sa != 1) {
    for (index_t k = 0; k < n; ++k) dst[k] = to_float(bf16_from_float(src[k * sa]));
    return;
  }
  // the vectorised exact conversions of core/dtype.hpp, through a small buffer
  constexpr index_t chunk = 512;
  bf16 tmp[chunk];
  for (index_t k = 0; k < n; k += chunk) {
    const auto w = static_cast<std::size_t>(std::min(chunk, n - k));
    from_float(src + k, tmp, w);
    to_float(tmp, dst + k, w);
  }
}

inline std::uint32_t pair_bits(std::uint16_t even, std::uint16_t odd) {
  return std::uint32_t(even) | (std::uint32_t(odd) << 16);
}

/// B rows [j0, j0 + nc) as ceil(nc / NR) panels of ceil(K / 2) × NR pairs (k = 2q, 2q + 1; the
/// odd element past K and the columns past nc zero), panel p at dst + p·K2·NR (pair rows
/// [ceil(K / 2), K2) zero). The layout of the pair kernel and of packed bf16 weights.
inline void pack_b_pairs(const bf16* b, index_t ldb, index_t j0, index_t nc, index_t K,
                         std::uint32_t* dst, index_t K2) {
  const index_t Kq = (K + 1) / 2;  // pair rows holding data; rows [Kq, K2) are zero
  for (index_t p = 0; p * NR < nc; ++p) {
    std::uint32_t* d = dst + p * K2 * NR;
    const index_t cols = std::min(NR, nc - p * NR);
    const bf16* src = b + (j0 + p * NR) * ldb;
    index_t q = 0;
#if defined(__AVX512F__)
    if (cols == NR) {
      // 16 rows × 16 pairs (32 bf16) at a time: a 32-bit 16×16 transpose through registers
      for (; 2 * (q + 16) <= K; q += 16) {
        for (index_t h = 0; h < NR; h += 16) {
          __m512 r[16];
          for (index_t i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + (h + i) * ldb + 2 * q);
          transpose16(r);
          for (index_t qq = 0; qq < 16; ++qq) _mm512_storeu_ps(d + (q + qq) * NR + h, r[qq]);
        }
      }
    }
#endif
    for (; q < Kq; ++q) {
      const index_t k = 2 * q;
      for (index_t jj = 0; jj < NR; ++jj) {
        const bf16* row = src + jj * ldb;
        d[q * NR + jj] = jj < cols ? pair_bits(row[k].bits, k + 1 < K ? row[k + 1].bits : 0) : 0;
      }
    }
    std::fill(d + Kq * NR, d + K2 * NR, std::uint32_t(0));
  }
}

#if defined(__AVX512BF16__)
inline constexpr bool has_bf16_dot = true;

inline std::uint32_t* scratch_pairs(int which, std::size_t n) {
  thread_local std::vector<std::uint32_t> buf[2];  // B slab, A block
  auto& v = buf[which];
  if (v.size() < n) v.resize(n);
  return v.data();
}

/// The bf16 bits of a float that already holds a bf16 value (A after round_row_bf16).
inline std::uint16_t bf16_bits(float x) {
  return static_cast<std::uint16_t>(std::bit_cast<std::uint32_t>(x) >> 16);
}

/// The whole of A (rows [0, M), rounded to bf16 here: nearest-even, exactly as bf16_from_float)
/// packed once per call for the pair kernel: for each KC-deep block (pc) and MR-row tile t, a
/// panel of ceil(kc / 2) × MR pairs at dst + (pc / 2)·Mt·MR + t·ceil(kc / 2)·MR (Mt = ceil(M /
/// MR) tiles; rows past M and the odd k past K are zero). Tiles [t0, t1) only (threads split
/// the tiles; the layout does not depend on the split).
inline void pack_a_pairs_all(tensor_view<const float, 2> a, index_t t0, index_t t1,
                             std::uint32_t* dst) {
  const index_t M = a.extent(0), K = a.extent(1), Mt = (M + MR - 1) / MR;
  thread_local std::vector<bf16> row_buf;
  if (row_buf.size() < static_cast<std::size_t>(K + 1))
    row_buf.resize(static_cast<std::size_t>(K + 1));
  bf16* row = row_buf.data();
  row[K] = bf16{};
  for (index_t t = t0; t < t1; ++t) {
    for (index_t r = 0; r < MR; ++r) {
      const index_t i = t * MR + r;
      if (i < M) {
        const float* src = a.data() + i * a.stride(0);
        if (a.stride(1) == 1) {
          from_float(src, row, static_cast<std::size_t>(K));
        } else {
          for (index_t k = 0; k < K; ++k) row[k] = bf16_from_float(src[k * a.stride(1)]);
        }
      }
      for (index_t pc = 0; pc < K; pc += KC) {
        const index_t kc2 = (std::min(KC, K - pc) + 1) / 2;
        std::uint32_t* d = dst + (pc / 2) * Mt * MR + t * kc2 * MR + r;
        if (i < M) {
          for (index_t q = 0; q < kc2; ++q) {
            d[q * MR] = pair_bits(row[pc + 2 * q].bits, row[pc + 2 * q + 1].bits);
          }
        } else {
          for (index_t q = 0; q < kc2; ++q) d[q * MR] = 0;
        }
      }
    }
  }
}

inline void micro_tile_pairs(index_t kc2, const std::uint32_t* ap, const std::uint32_t* bp,
                             float* tile, bool load, const epilogue* ep, index_t i0, index_t j0,
                             index_t mr, index_t nv) {
  __m512 acc[std::size_t(MR)][2];
  for (index_t r = 0; r < MR; ++r) {
    for (index_t u = 0; u < 2; ++u) {
      acc[r][u] = load ? _mm512_loadu_ps(tile + r * NR + u * 16) : _mm512_setzero_ps();
    }
  }
  for (index_t q = 0; q < kc2; ++q) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(bp + q * NR);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(bp + q * NR + 16);
    for (index_t r = 0; r < MR; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(ap[q * MR + r]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
    }
  }
  if (ep && ep->vector) {
    for (index_t r = 0; r < std::min(mr, MR); ++r) {
      for (index_t u = 0; u < 2; ++u) {
        if (u * L < nv) {
          ep->store(i0 + r, j0 + u * L, std::min(L, nv - u * L), batch<float>(acc[r][u]));
        }
      }
    }
    return;
  }
  for (index_t r = 0; r < MR; ++r) {
    for (index_t u = 0; u < 2; ++u) _mm512_storeu_ps(tile + r * NR + u * 16, acc[r][u]);
  }
  if (ep) {
    for (index_t r = 0; r < mr; ++r) ep->row(i0 + r, j0, nv, tile + r * NR);
  }
}

/// Columns per pair slab of a thread (whole NR panels, <= slab_bytes).
inline index_t pair_slab_columns(index_t K2) {
  const index_t nc =
      slab_bytes / (index_t(sizeof(std::uint32_t)) * std::max<index_t>(K2, 1) * NR) * NR;
  return std::clamp<index_t>(nc, NR, max_nc);
}

/// gemm_block_on for bf16 pairs: A packed by pack_a_pairs_all (Mt tiles), rows [m0, m1) with
/// m0 a multiple of MR; `slab(jc, nc)` returns B's columns [jc, jc + nc) as pair panels of
/// K2 = ceil(K / 2) rows (packed here, or at load by packed_weights).
template <class Slab>
void gemm_block_pairs_on(const std::uint32_t* apk, index_t Mt, index_t K, index_t m0, index_t m1,
                         index_t n0, index_t n1, const epilogue& ep, Slab&& slab) {
  static_assert(L == 16 && NR == 32 && KC % 2 == 0, "the pair kernel is written for 12 x 32");
  const index_t K2 = (K + 1) / 2;
  const index_t nc_max = pair_slab_columns(K2);
  const index_t panels_max = nc_max / NR;
  float* tiles = scratch(1, static_cast<std::size_t>((MC / MR) * panels_max * MR * NR));
  for (index_t jc = n0; jc < n1; jc += nc_max) {
    const index_t nc = std::min(nc_max, n1 - jc);
    const index_t panels = (nc + NR - 1) / NR;
    const std::uint32_t* bpack = slab(jc, nc);
    for (index_t ic = m0; ic < m1; ic += MC) {
      const index_t mc = std::min(MC, m1 - ic);
      for (index_t pc = 0; pc < K; pc += KC) {
        const index_t kc = std::min(KC, K - pc);
        const index_t kc2 = (kc + 1) / 2;
        const bool last = pc + kc == K;
        const std::uint32_t* apack = apk + (pc / 2) * Mt * MR + (ic / MR) * kc2 * MR;
        for (index_t jr = 0; jr < panels; ++jr) {
          const std::uint32_t* bp = bpack + jr * K2 * NR + (pc / 2) * NR;
          const index_t j0 = jc + jr * NR;
          const index_t nv = std::min(NR, jc + nc - j0);
          for (index_t ir = 0; ir < mc; ir += MR) {
            const index_t mr = std::min(MR, mc - ir);
            float* tile = tiles + (jr * (MC / MR) + ir / MR) * MR * NR;
            micro_tile_pairs(kc2, apack + (ir / MR) * kc2 * MR, bp, tile, pc > 0,
                             last ? &ep : nullptr, ic + ir, j0, mr, nv);
          }
        }
      }
    }
  }
}

/// A rounded to bf16 and packed once for all threads (each thread packs whole tiles), then
/// gemm_block_pairs_on over the threads' parts (split_gemm); `slab` as there.
template <class Slab>
void gemm_pairs(tensor_view<const float, 2> a, index_t N, const epilogue& ep, Slab&& slab) {
  const index_t M = a.extent(0), K = a.extent(1);
  const index_t T = std::max(1, num_threads());
  const index_t Mt = (M + MR - 1) / MR;
  std::uint32_t* apk = scratch_pairs(1, static_cast<std::size_t>(Mt * MR * ((K + 1) / 2)));
  const index_t pack_parts = std::min<index_t>(T, Mt);
  parallel_for(pack_parts, [&](index_t t) {
    pack_a_pairs_all(a, Mt * t / pack_parts, Mt * (t + 1) / pack_parts, apk);
  });
  split_gemm(M, N, [&](index_t m0, index_t m1, index_t n0, index_t n1) {
    gemm_block_pairs_on(apk, Mt, K, m0, m1, n0, n1, ep, slab);
  });
}
#else
inline constexpr bool has_bf16_dot = false;
#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
// AMX (Sapphire Rapids-class): TDPBF16PS multiplies a 16×32 bf16 tile of A by a 32×16 tile of B
// (in k-pairs, the layout of pack_b_pairs) into a 16×16 f32 tile, 16 k-pairs × 256 outputs per
// instruction. A 32×32 block of C lives in 4 tile registers for the whole of K (2 A and 2 B tiles
// stream through the other 4), so every output is one fixed chain of TDPBF16PS steps over K in
// order: deterministic for any thread count. Inputs/outputs denormal -> 0 (the unit's DAZ/FTZ).
// Linux makes a process ask for the tile state once (arch_prctl ARCH_REQ_XCOMP_PERM); when that
// fails, bf16_dot runs on vdpbf16ps instead.
inline bool amx_usable() {
  static const bool ok = [] {
    constexpr long arch_req_xcomp_perm = 0x1023, xfeature_xtiledata = 18;
    return syscall(SYS_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata) == 0;
  }();
  return ok;
}

struct alignas(64) amx_config {
  std::uint8_t palette = 1;
  std::uint8_t start_row = 0;
  std::uint8_t reserved[14] = {};
  std::uint16_t colsb[16] = {};
  std::uint8_t rows[16] = {};
};

inline std::uint16_t* scratch_bf16(std::size_t n) {
  thread_local std::vector<std::uint16_t> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

/// A (already rounded to bf16 values, rows [0, M), lda) as bf16 bits, [Mp × Kp] row-major with
/// Mp, Kp rounded up to 32 and zero padding.
inline void pack_a_amx(const float* a, index_t lda, index_t M, index_t K, index_t Mp, index_t Kp,
                       std::uint16_t* dst) {
  for (index_t i = 0; i < Mp; ++i) {
    std::uint16_t* d = dst + i * Kp;
    if (i < M) {
      const float* src = a + i * lda;
      for (index_t k = 0; k < K; ++k) d[k] = bf16_bits(src[k]);
      std::fill(d + K, d + Kp, std::uint16_t(0));
    } else {
      std::fill(d, d + Kp, std::uint16_t(0));
    }
  }
}

/// Rows [m0, m1) (multiples of 32 but m1 may be Mp) × columns [n0, n1) of C on AMX tiles.
inline void gemm_block_amx(const std::uint16_t* a16, index_t Kp, index_t M, const bf16* b,
                           index_t ldb, index_t K, index_t m0, index_t m1, index_t n0, index_t n1,
                           const epilogue& ep) {
  const index_t K2 = Kp / 2;  // pair rows per B panel, zero beyond (K + 1) / 2
  index_t nc_max = slab_bytes / (index_t(sizeof(std::uint32_t)) * K2 * NR) * NR;
  nc_max = std::clamp<index_t>(nc_max, NR, max_nc);
  std::uint32_t* bpack = scratch_pairs(0, static_cast<std::size_t>(nc_max * K2));
  alignas(64) float ctile[32 * 32];
  amx_config cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
  constexpr index_t mb_rows = 128;  // A rows per block (<= 1 MiB of bf16 at K = 4096): in L2
  for (index_t jc = n0; jc < n1; jc += nc_max) {
    const index_t nc = std::min(nc_max, n1 - jc);
    const index_t panels = (nc + NR - 1) / NR;
    pack_b_pairs(b, ldb, jc, nc, K, bpack, K2);
    for (index_t mb = m0; mb < m1; mb += mb_rows) {
      const index_t me = std::min(m1, mb + mb_rows);
      for (index_t jr = 0; jr < panels; ++jr) {
        const std::uint32_t* bpanel = bpack + jr * K2 * NR;
        const index_t j0 = jc + jr * NR;
        const index_t nv = std::min(NR, jc + nc - j0);
        for (index_t i0 = mb; i0 < me; i0 += 32) {
          const std::uint16_t* a0 = a16 + i0 * Kp;
          const std::uint16_t* a1 = a0 + 16 * Kp;
          const auto sa = static_cast<long>(Kp * 2);
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
          for (index_t k0 = 0; k0 < Kp; k0 += 32) {
            _tile_loadd(4, a0 + k0, sa);
            _tile_loadd(5, a1 + k0, sa);
            _tile_loadd(6, bpanel + (k0 / 2) * NR, NR * 4);
            _tile_loadd(7, bpanel + (k0 / 2) * NR + 16, NR * 4);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
          }
          _tile_stored(0, ctile, 128);
          _tile_stored(1, ctile + 16, 128);
          _tile_stored(2, ctile + 16 * 32, 128);
          _tile_stored(3, ctile + 16 * 32 + 16, 128);
          const index_t rows = std::min<index_t>(32, M - i0);
          for (index_t r = 0; r < rows; ++r) ep.row(i0 + r, j0, nv, ctile + r * 32);
        }
      }
    }
  }
  _tile_release();
}
#define SEQMIX_MATMUL_AMX 1
#endif

// ---- validation and driver -----------------------------------------------------------------

template <class V>
bool present(const V& v) {
  return v.data() != nullptr;
}

/// [lowest, highest] byte address touched by a view (empty range when the view is empty).
template <class V>
std::pair<const char*, const char*> span_of(const V& v) {
  using T = typename V::value_type;
  if (v.size() == 0) return {nullptr, nullptr};
  index_t lo = 0, hi = 0;
  for (std::size_t d = 0; d < V::rank; ++d) {
    const index_t e = (v.extent(d) - 1) * v.stride(d);
    if (e < 0)
      lo += e;
    else
      hi += e;
  }
  const char* base = reinterpret_cast<const char*>(v.data());
  return {base + lo * index_t(sizeof(T)), base + (hi + 1) * index_t(sizeof(T)) - 1};
}
template <class V1, class V2>
bool overlap(const V1& x, const V2& y) {
  const auto [a0, a1] = span_of(x);
  const auto [b0, b1] = span_of(y);
  if (!a0 || !b0) return false;
  return !(a1 < b0 || b1 < a0);
}

/// The checks every matmul makes besides those of B itself (A, C, the options; B's span for
/// the aliasing checks), and the epilogue they resolve to.
inline epilogue checked_epilogue(const checker& check, tensor_view<const float, 2> a, index_t N,
                                 std::pair<const char*, const char*> b_span,
                                 tensor_view<float, 2> c, const matmul_options& opt) {
  if (a.data() == nullptr && a.size() != 0) check.fail("a", "is null");
  const index_t M = a.extent(0);
  check.shape("c", c, {M, N});
  if (present(opt.bias)) check.shape("bias", opt.bias, {N});
  if (present(opt.row_scale)) check.shape("row_scale", opt.row_scale, {M});
  if (present(opt.residual)) {
    check.shape("residual", opt.residual, {M, N});
    const bool same = opt.residual.data() == c.data() && opt.residual.strides() == c.strides();
    if (!same && overlap(opt.residual, c)) {
      check.fail("residual", "overlaps c without being c itself (same data and strides)");
    }
  }
  if (overlap(a, c)) check.fail("c", "overlaps a (the output must not alias an input)");
  const auto [c0, c1] = span_of(c);
  if (b_span.first && c0 && !(c1 < b_span.first || b_span.second < c0)) {
    check.fail("c", "overlaps b (the output must not alias an input)");
  }
  if (present(opt.bias) && overlap(opt.bias, c)) check.fail("c", "overlaps bias");
  if (present(opt.row_scale) && overlap(opt.row_scale, c)) check.fail("c", "overlaps row_scale");
  if (M > 1 && N > 0 && c.stride(0) == 0) check.fail("c", "has row stride 0");
  if (N > 1 && c.stride(1) == 0) check.fail("c", "has column stride 0");

  epilogue ep{};
  ep.c = c.data();
  ep.rsc = c.stride(0);
  ep.csc = c.stride(1);
  ep.bias = present(opt.bias) ? opt.bias.data() : nullptr;
  ep.sb = present(opt.bias) ? opt.bias.stride(0) : 0;
  ep.scale = present(opt.row_scale) ? opt.row_scale.data() : nullptr;
  ep.ss = present(opt.row_scale) ? opt.row_scale.stride(0) : 0;
  ep.res = present(opt.residual) ? opt.residual.data() : nullptr;
  ep.rsr = present(opt.residual) ? opt.residual.stride(0) : 0;
  ep.csr = present(opt.residual) ? opt.residual.stride(1) : 0;
  ep.act = opt.act;
  ep.accumulate = opt.accumulate;
  ep.vector = (N == 1 || ep.csc == 1) && (!ep.bias || N == 1 || ep.sb == 1) &&
              (!ep.res || N == 1 || ep.csr == 1);
  return ep;
}

/// An empty output or an empty product (K = 0: the epilogue on zeros): done, returns true.
inline bool trivial_product(const epilogue& ep, index_t M, index_t N, index_t K) {
  if (M == 0 || N == 0) return true;
  if (K != 0) return false;
  float* zeros = scratch(3, static_cast<std::size_t>(N));
  std::fill_n(zeros, N, 0.0f);
  for (index_t i = 0; i < M; ++i) ep.row(i, 0, N, zeros);
  return true;
}

/// A with unit inner stride (rounded to bf16 for the bf16_dot option): `a` itself, or a copy in
/// scratch. Returns the data, lda through the argument.
inline const float* unit_stride_a(tensor_view<const float, 2> a, bool round_a, index_t& lda) {
  const index_t M = a.extent(0), K = a.extent(1);
  lda = a.stride(0);
  if (!round_a && (K <= 1 || a.stride(1) == 1)) return a.data();
  float* acopy = scratch(3, static_cast<std::size_t>(M * K));
  for (index_t i = 0; i < M; ++i) {
    const float* src = a.data() + i * a.stride(0);
    float* dst = acopy + i * K;
    if (round_a) {
      round_row_bf16(src, a.stride(1), dst, K);
    } else {
      for (index_t k = 0; k < K; ++k) dst[k] = src[k * a.stride(1)];
    }
  }
  lda = K;
  return acopy;
}

template <class W>
void run(tensor_view<const float, 2> a, tensor_view<const W, 2> b, tensor_view<float, 2> c,
         const matmul_options& opt) {
  const checker check{"linalg::matmul"};
  const index_t M = a.extent(0), K = a.extent(1), N = b.extent(0);
  check.shape("b", b, {any_extent, K});
  if (b.size() != 0) check.inner_contiguous("b", b);
  if constexpr (std::is_same_v<W, float>) {
    if (opt.precision == matmul_precision::bf16_dot) {
      check.fail("options", "precision bf16_dot needs bf16 weights b (b is f32)");
    }
  }
  const epilogue ep = checked_epilogue(check, a, N, span_of(b), c, opt);
  if (trivial_product(ep, M, N, K)) return;

  const bool round_a = opt.precision == matmul_precision::bf16_dot;
  const index_t T = std::max(1, num_threads());
  const W* bp = b.data();
  const index_t ldb = b.stride(0);
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<W, bf16>) {
    bool pairs = round_a && M > gemv_max_m;
#if defined(SEQMIX_MATMUL_AMX)
    pairs = pairs && !amx_usable();
#endif
    if (pairs) {
      // vdpbf16ps: each thread packs its B slabs into pairs as it goes
      const index_t K2 = (K + 1) / 2;
      gemm_pairs(a, N, ep, [&](index_t jc, index_t nc) {
        std::uint32_t* bpack =
            scratch_pairs(0, static_cast<std::size_t>(pair_slab_columns(K2) * K2));
        pack_b_pairs(bp, ldb, jc, nc, K, bpack, K2);
        return static_cast<const std::uint32_t*>(bpack);
      });
      return;
    }
  }
#endif

  index_t lda = 0;
  const float* ap = unit_stride_a(a, round_a, lda);

  if (M <= gemv_max_m) {
    // Decode: threads over N in contiguous ranges of weight rows (multiples of 4).
    const index_t chunks = std::min<index_t>(T, (N + 3) / 4);
    if (M == 1) {
      float* xp = scratch(5, static_cast<std::size_t>(K));
      gemv_permute_x(ap, K, xp);
      parallel_for(chunks, [&](index_t t) {
        const index_t j0 = (N / 4) * t / chunks * 4;
        const index_t j1 = t + 1 == chunks ? N : (N / 4) * (t + 1) / chunks * 4;
        if (j1 <= j0) return;
        float* raw = scratch(4, static_cast<std::size_t>(j1 - j0));
        gemv_row1(ap, xp, bp, ldb, K, j0, j1, raw);
        ep.row(0, j0, j1 - j0, raw);
      });
      return;
    }
    parallel_for(chunks, [&](index_t t) {
      const index_t j0 = (N / 4) * t / chunks * 4;
      const index_t j1 = t + 1 == chunks ? N : (N / 4) * (t + 1) / chunks * 4;
      if (j1 <= j0) return;
      const index_t n = j1 - j0;
      float* raw = scratch(4, static_cast<std::size_t>(M * n));
      gemv_dispatch(std::make_integer_sequence<index_t, gemv_max_m - 1>{}, M, ap, lda, bp, ldb, K,
                    j0, j1, raw, n);
      for (index_t m = 0; m < M; ++m) ep.row(m, j0, n, raw + m * n);
    });
    return;
  }

#if defined(SEQMIX_MATMUL_AMX)
  if constexpr (std::is_same_v<W, bf16>) {
    if (round_a && amx_usable()) {
      const index_t Mp = (M + 31) / 32 * 32, Kp = (K + 31) / 32 * 32;
      std::uint16_t* a16 = scratch_bf16(static_cast<std::size_t>(Mp * Kp));
      pack_a_amx(ap, lda, M, K, Mp, Kp, a16);
      // rows in blocks of 32 over the padded Mp (the A copy is padded with zero rows)
      split_gemm(
          Mp, N,
          [&](index_t m0, index_t m1, index_t n0, index_t n1) {
            gemm_block_amx(a16, Kp, M, bp, ldb, K, m0, m1, n0, n1, ep);
          },
          32);
      return;
    }
  }
#endif

  split_gemm(M, N, [&](index_t m0, index_t m1, index_t n0, index_t n1) {
    gemm_block(ap, lda, bp, ldb, K, m0, m1, n0, n1, ep);
  });
}

}  // namespace matmul_detail

/// Which unit runs `matmul_precision::bf16_dot` for M > 8 in this build and process: "amx",
/// "avx512_bf16" (vdpbf16ps) or "f32" (A rounded to bf16, then the exact f32 kernel).
inline const char* bf16_dot_engine() {
#if defined(SEQMIX_MATMUL_AMX)
  if (matmul_detail::amx_usable()) return "amx";
#endif
  return matmul_detail::has_bf16_dot ? "avx512_bf16" : "f32";
}

/// C[M, N] = (accumulate ? C : 0) + residual + row_scale ⊙ act(A · Bᵀ + bias), B = weights [N, K]
/// (f32). A and C may have any strides; B's rows must be inner-contiguous. Throws
/// seqmix::shape_error naming `linalg::matmul` and the argument on any mismatch.
inline void matmul(tensor_view<const float, 2> a, tensor_view<const float, 2> b,
                   tensor_view<float, 2> c, const matmul_options& options = {}) {
  matmul_detail::run<float>(a, b, c, options);
}

/// As above with bf16 weights [N, K]: widened exactly to f32 (default), or, with
/// `precision = bf16_dot`, A rounded to bf16 for vdpbf16ps.
inline void matmul(tensor_view<const float, 2> a, tensor_view<const bf16, 2> b,
                   tensor_view<float, 2> c, const matmul_options& options = {}) {
  matmul_detail::run<bf16>(a, b, c, options);
}

}  // namespace seqmix::linalg
