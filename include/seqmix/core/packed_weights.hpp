// SPDX-License-Identifier: MIT
// Weights packed once for linalg::matmul: the GEMM's B panels made at load instead of per call.
//
//   packed_weights pw(w);                // w: [N, K] f32 or bf16, the checkpoint layout
//   linalg::matmul(x, pw, y, options);   // y [M, N] = x [M, K] · wᵀ, the same epilogue options
//   linalg::matmul_panels(x, pw, q0, q1, y, options);   // M <= 8: only panels [q0, q1), serial
//
// Layout: ceil(N / NR) panels of NR = 32 columns (AVX-512; 16 on AVX2), k-major, columns past N
// zero:
//   f32 weights:  panel p holds K × NR floats, element (k, j) at [k·NR + j] (4·N·K bytes, the
//                 micro-kernel's own operand: M > 8 runs on it with no packing at all);
//   bf16 weights: panel p holds ceil(K / 2) × NR pairs (w[j, 2q] | w[j, 2q + 1] << 16), the
//                 vdpbf16ps operand (2·N·K bytes, as on disk). The exact f32 GEMM widens a
//                 thread's slab per call (a contiguous shift/mask, not the transposing gather
//                 of the checkpoint layout); precision bf16_dot runs on the pairs directly.
// Why: a call on the checkpoint layout packs its B slabs first, a transposing gather that reads
// rows K apart (at K = 1024 each 16 × 16 block's rows map to the same L1 set: the pack ran 2x
// slower than at K = 1000); it was ~7 % of an M = 512, N = K = 1024 call and more of a MoE
// expert's ~128-row GEMMs, which pack 6 MB of weights per call.
//
// Results: for M > 8 bitwise equal to linalg::matmul on the unpacked weights (the same panels
// reach the same micro-kernel), and for M <= 8 the decode path runs the same single fma chain
// per output over k = 0..K-1 on the panels, so every row of a packed product has the same bits
// whatever M is (prefill and decode agree exactly) and for any thread count. (The unpacked
// matmul's M <= 8 GEMV uses other chains; it agrees with these to rounding.)
//
// Cost: the constructor packs once (O(N·K), threaded over panels); matmul 2·M·N·K FLOP. M <= 8
// reads every panel once, P = 4 / M panels (M = 1: 4) in lockstep so that 2·M·P >= 8
// accumulator chains hide the FMA latency; threads over contiguous panel ranges.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <utility>

#include <seqmix/core/matmul.hpp>
#include <seqmix/core/memory.hpp>

namespace seqmix::linalg {

/// Weights [N, K] (f32 or bf16) packed once into matmul's panels (header comment).
class packed_weights {
 public:
  packed_weights() = default;
  /// Packs w [N, K] (rows inner-contiguous); the result does not refer to w.
  explicit packed_weights(tensor_view<const float, 2> w) { pack(w); }
  explicit packed_weights(tensor_view<const bf16, 2> w) { pack(w); }
  packed_weights(packed_weights&&) noexcept = default;
  packed_weights& operator=(packed_weights&&) noexcept = default;
  packed_weights(const packed_weights& o) { *this = o; }
  packed_weights& operator=(const packed_weights& o) {
    if (this == &o) return *this;
    n_ = o.n_;
    k_ = o.k_;
    bf16_ = o.bf16_;
    bytes_ = o.bytes_;
    allocate();
    if (bytes_) std::memcpy(data_.get(), o.data_.get(), bytes_);
    return *this;
  }

  index_t rows() const noexcept { return n_; }  ///< N (output features)
  index_t cols() const noexcept { return k_; }  ///< K (input features)
  bool is_bf16() const noexcept { return bf16_; }
  bool empty() const noexcept { return n_ == 0; }
  /// Bytes of panel storage (what a decode step streams).
  std::size_t bytes() const noexcept { return bytes_; }

  /// Internal: panel 0 of the f32 layout (f32 weights) or of the pair layout (bf16 weights).
  const float* f32_panels() const noexcept {
    return bf16_ ? nullptr : static_cast<const float*>(static_cast<const void*>(data_.get()));
  }
  const std::uint32_t* pair_panels() const noexcept {
    return bf16_ ? static_cast<const std::uint32_t*>(static_cast<const void*>(data_.get()))
                 : nullptr;
  }
  /// Internal: rows of k (f32: K) or of k-pairs (bf16: ceil(K / 2)) per panel.
  index_t panel_depth() const noexcept { return bf16_ ? (k_ + 1) / 2 : k_; }
  index_t panels() const noexcept { return (n_ + matmul_detail::NR - 1) / matmul_detail::NR; }
  /// Columns of output per panel (linalg::matmul_panels' unit).
  static constexpr index_t panel_width() noexcept { return matmul_detail::NR; }
  /// [first, last] byte of the storage (nullptrs when empty), for the aliasing checks.
  std::pair<const char*, const char*> span() const noexcept {
    if (!bytes_) return {nullptr, nullptr};
    const char* p = reinterpret_cast<const char*>(data_.get());
    return {p, p + bytes_ - 1};
  }

 private:
  template <class W>
  void pack(tensor_view<const W, 2> w) {
    using namespace matmul_detail;
    const checker check{"linalg::packed_weights"};
    check.extents("w", w);
    if (w.size() != 0) check.inner_contiguous("w", w);
    n_ = w.extent(0);
    k_ = w.extent(1);
    bf16_ = std::is_same_v<W, bf16>;
    const index_t depth = panel_depth();
    index_t elems = 0;
    if (!detail::checked_mul(panels() * NR, depth, elems)) {
      check.fail("w", "of " + std::to_string(n_) + " × " + std::to_string(k_) +
                          " elements is too large to pack");
    }
    bytes_ = static_cast<std::size_t>(elems) * 4u;
    allocate();
    if (!bytes_) return;
    const index_t P = panels();
    const index_t parts = std::min<index_t>(std::max(1, num_threads()), P);
    parallel_for(parts, [&](index_t t) {
      const index_t p0 = P * t / parts, p1 = P * (t + 1) / parts;
      const index_t j0 = p0 * NR, nc = std::min(n_, p1 * NR) - j0;
      if (nc <= 0) return;
      if constexpr (std::is_same_v<W, bf16>) {
        std::uint32_t* d = const_cast<std::uint32_t*>(pair_panels()) + p0 * depth * NR;
        pack_b_pairs(w.data(), w.stride(0), j0, nc, k_, d, depth);
      } else {
        float* d = const_cast<float*>(f32_panels()) + p0 * depth * NR;
        pack_b(w.data(), w.stride(0), j0, nc, k_, d);
      }
    });
  }
  void allocate() {
    data_.reset();
    if (!bytes_) return;
    data_.reset(static_cast<std::byte*>(detail::aligned_allocate(bytes_, [&] {
      return "seqmix::linalg::packed_weights: " + std::to_string(n_) + " × " + std::to_string(k_) +
             " weights";
    })));
  }

  index_t n_ = 0, k_ = 0;
  bool bf16_ = false;
  std::size_t bytes_ = 0;
  std::unique_ptr<std::byte, detail::aligned_deleter> data_;
};

namespace matmul_detail {

/// One vector of pairs (L of them) as the f32 values of its even and odd k: the low halves
/// shifted up, the high halves masked (bf16 -> f32 is exact).
inline void pair_vectors(const std::uint32_t* p, batch<float>& even, batch<float>& odd) {
#if defined(__AVX512F__)
  const __m512i v = _mm512_loadu_si512(p);
  even = batch<float>(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
  odd = batch<float>(_mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int(0xffff0000u)))));
#elif defined(__AVX2__)
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = batch<float>(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
  odd = batch<float>(_mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int(0xffff0000u)))));
#else
  alignas(64) float e[L], o[L];
  for (index_t j = 0; j < L; ++j) {
    e[j] = std::bit_cast<float>(p[j] << 16);
    o[j] = std::bit_cast<float>(p[j] & 0xffff0000u);
  }
  even = batch<float>::load_aligned(e);
  odd = batch<float>::load_aligned(o);
#endif
}

/// f32 rows 2q and 2q + 1 of a pair row (NR pairs).
inline void widen_pair_row(const std::uint32_t* src, float* even, float* odd) {
  for (index_t v = 0; v < NV; ++v) {
    batch<float> e, o;
    pair_vectors(src + v * L, e, o);
    simd::store(even + v * L, e);
    simd::store(odd + v * L, o);
  }
}

/// Pair panels [p0, p0 + n) (depth K2 = ceil(K / 2)) widened to f32 panels of K rows at dst.
inline void widen_pair_panels(const std::uint32_t* src, index_t K, index_t n, float* dst) {
  const index_t K2 = (K + 1) / 2;
  float spare[NR];  // the odd row past K of an odd K
  for (index_t p = 0; p < n; ++p) {
    const std::uint32_t* s = src + p * K2 * NR;
    float* d = dst + p * K * NR;
    for (index_t q = 0; q < K2; ++q) {
      widen_pair_row(s + q * NR, d + 2 * q * NR, 2 * q + 1 < K ? d + (2 * q + 1) * NR : spare);
    }
  }
}

/// The M <= 8 rows of C over panels [p0, p0 + P): one fma chain per output over k in order,
/// started at 0 (the micro-kernel's chain), then the epilogue. Pairs: bf16 panels, widened per
/// pair row in registers. MM is M as a constant (the row loops unroll).
template <index_t MM, index_t P, bool Pairs>
void panel_rows(const float* a, index_t lda, const void* panels, index_t K, index_t p0, index_t N,
                const epilogue& ep) {
  batch<float> acc[std::size_t(MM)][std::size_t(P)][std::size_t(NV)];
  for (auto& am : acc) {
    for (auto& au : am) {
      for (auto& v : au) v = batch<float>(0.0f);
    }
  }
  if constexpr (Pairs) {
    const index_t K2 = (K + 1) / 2;
    const auto* bp = static_cast<const std::uint32_t*>(panels) + p0 * K2 * NR;
    for (index_t q = 0; q < K2; ++q) {
      batch<float> e[std::size_t(P)][std::size_t(NV)], o[std::size_t(P)][std::size_t(NV)];
      for (index_t u = 0; u < P; ++u) {
        for (index_t v = 0; v < NV; ++v)
          pair_vectors(bp + (u * K2 + q) * NR + v * L, e[u][v], o[u][v]);
      }
      const bool has_odd = 2 * q + 1 < K;
      for (index_t m = 0; m < MM; ++m) {
        const batch<float> x0(a[m * lda + 2 * q]);
        for (index_t u = 0; u < P; ++u) {
          for (index_t v = 0; v < NV; ++v) acc[m][u][v] = fmadd(x0, e[u][v], acc[m][u][v]);
        }
        if (!has_odd) continue;
        const batch<float> x1(a[m * lda + 2 * q + 1]);
        for (index_t u = 0; u < P; ++u) {
          for (index_t v = 0; v < NV; ++v) acc[m][u][v] = fmadd(x1, o[u][v], acc[m][u][v]);
        }
      }
    }
  } else {
    const float* bp = static_cast<const float*>(panels) + p0 * K * NR;
    for (index_t k = 0; k < K; ++k) {
      batch<float> b[std::size_t(P)][std::size_t(NV)];
      for (index_t u = 0; u < P; ++u) {
        for (index_t v = 0; v < NV; ++v) b[u][v] = simd::load(bp + u * K * NR + k * NR + v * L);
      }
      for (index_t m = 0; m < MM; ++m) {
        const batch<float> x(a[m * lda + k]);
        for (index_t u = 0; u < P; ++u) {
          for (index_t v = 0; v < NV; ++v) acc[m][u][v] = fmadd(x, b[u][v], acc[m][u][v]);
        }
      }
    }
  }
  for (index_t u = 0; u < P; ++u) {
    const index_t j0 = (p0 + u) * NR;
    const index_t nv = std::min(NR, N - j0);
    if (ep.vector) {
      for (index_t m = 0; m < MM; ++m) {
        for (index_t v = 0; v < NV; ++v) {
          if (v * L < nv) ep.store(m, j0 + v * L, std::min(L, nv - v * L), acc[m][u][v]);
        }
      }
      continue;
    }
    alignas(64) float row[NR];
    for (index_t m = 0; m < MM; ++m) {
      for (index_t v = 0; v < NV; ++v) simd::store(row + v * L, acc[m][u][v]);
      ep.row(m, j0, nv, row);
    }
  }
}

/// Panels [q0, q1) of an M <= 8 product: groups of P = max(1, 4 / M) panels, then single ones.
template <index_t MM, bool Pairs>
void panel_range(const float* a, index_t lda, const void* panels, index_t K, index_t q0, index_t q1,
                 index_t N, const epilogue& ep) {
  constexpr index_t P = MM >= 4 ? 1 : 4 / MM;
  index_t p = q0;
  for (; p + P <= q1; p += P) panel_rows<MM, P, Pairs>(a, lda, panels, K, p, N, ep);
  for (; p < q1; ++p) panel_rows<MM, 1, Pairs>(a, lda, panels, K, p, N, ep);
}

template <bool Pairs, index_t... I>
void panel_dispatch(std::integer_sequence<index_t, I...>, index_t M, const float* a, index_t lda,
                    const void* panels, index_t K, index_t q0, index_t q1, index_t N,
                    const epilogue& ep) {
  ((M == I + 1 ? panel_range<I + 1, Pairs>(a, lda, panels, K, q0, q1, N, ep) : void()), ...);
}

/// Panels [q0, q1) of an M <= 8 product on the calling thread (a: unit inner stride).
inline void panel_range_of(const float* a, index_t lda, const packed_weights& b, index_t M,
                           index_t q0, index_t q1, const epilogue& ep) {
  const index_t K = b.cols(), N = b.rows();
  constexpr auto ms = std::make_integer_sequence<index_t, gemv_max_m>{};
  if (b.is_bf16()) {
    panel_dispatch<true>(ms, M, a, lda, b.pair_panels(), K, q0, q1, N, ep);
  } else {
    panel_dispatch<false>(ms, M, a, lda, b.f32_panels(), K, q0, q1, N, ep);
  }
}

/// The checks both packed entry points share; returns the product's epilogue.
inline epilogue checked_packed(const checker& check, tensor_view<const float, 2> a,
                               const packed_weights& b, tensor_view<float, 2> c,
                               const matmul_options& opt) {
  const index_t K = a.extent(1);
  if (b.cols() != K) {
    check.fail("b", "packed weights of " + std::to_string(b.rows()) + " × " +
                        std::to_string(b.cols()) + " do not match a's K = " + std::to_string(K) +
                        " (expected " + std::to_string(K) + " columns)");
  }
  if (!b.is_bf16() && opt.precision == matmul_precision::bf16_dot) {
    check.fail("options", "precision bf16_dot needs bf16 weights b (b is f32)");
  }
  return checked_epilogue(check, a, b.rows(), b.span(), c, opt);
}

inline void run_packed(tensor_view<const float, 2> a, const packed_weights& b,
                       tensor_view<float, 2> c, const matmul_options& opt) {
  const checker check{"linalg::matmul"};
  const index_t M = a.extent(0), K = a.extent(1), N = b.rows();
  const epilogue ep = checked_packed(check, a, b, c, opt);
  if (trivial_product(ep, M, N, K)) return;
  const bool round_a = opt.precision == matmul_precision::bf16_dot;

#if defined(__AVX512BF16__)
  if (round_a && M > gemv_max_m) {
    // vdpbf16ps straight on the stored pairs (thread parts are whole panels: pointer offsets)
    const index_t K2 = b.panel_depth();
    const std::uint32_t* pp = b.pair_panels();
    gemm_pairs(a, N, ep, [&](index_t jc, index_t) { return pp + (jc / NR) * K2 * NR; });
    return;
  }
#endif

  index_t lda = 0;
  const float* ap = unit_stride_a(a, round_a, lda);
  const index_t P = b.panels();
  const std::uint32_t* pairs = b.pair_panels();
  const float* fp = b.f32_panels();
  if (M <= gemv_max_m) {
    const index_t T = std::max(1, num_threads());
    const index_t parts = std::min<index_t>(T, P);
    parallel_for(parts, [&](index_t t) {
      const index_t q0 = P * t / parts, q1 = P * (t + 1) / parts;
      if (q1 > q0) panel_range_of(ap, lda, b, M, q0, q1, ep);
    });
    return;
  }
  split_gemm(M, N, [&](index_t m0, index_t m1, index_t j0, index_t j1) {
    if (b.is_bf16()) {
      float* wide = scratch(0, static_cast<std::size_t>(slab_columns(K) * K));
      gemm_block_on(ap, lda, K, m0, m1, j0, j1, ep, [&](index_t jc, index_t nc) {
        widen_pair_panels(pairs + (jc / NR) * b.panel_depth() * NR, K, (nc + NR - 1) / NR, wide);
        return static_cast<const float*>(wide);
      });
    } else {
      gemm_block_on(ap, lda, K, m0, m1, j0, j1, ep,
                    [&](index_t jc, index_t) { return fp + (jc / NR) * K * NR; });
    }
  });
}

}  // namespace matmul_detail

/// C[M, N] = (accumulate ? C : 0) + residual + row_scale ⊙ act(A · Bᵀ + bias) with B packed
/// once (packed_weights, f32 or bf16). Same options and checks as the unpacked matmul; M > 8
/// gives the same bits as matmul on the unpacked weights, and every row the same bits for any M.
inline void matmul(tensor_view<const float, 2> a, const packed_weights& b, tensor_view<float, 2> c,
                   const matmul_options& options = {}) {
  matmul_detail::run_packed(a, b, c, options);
}

/// The columns [q0·NR, min(N, q1·NR)) of matmul(a, b, c, options) (NR = packed_weights::
/// panel_width(), panels [q0, q1) of b.panels()), for M <= 8 rows, on the calling thread: no
/// parallel region, for callers that split the output over their own threads (the MoE
/// per-token form inside its region). c is the whole [M, N] output; its other columns are not
/// touched. The columns have the bits matmul(a, b, c, options) gives them.
inline void matmul_panels(tensor_view<const float, 2> a, const packed_weights& b, index_t q0,
                          index_t q1, tensor_view<float, 2> c, const matmul_options& options = {}) {
  using namespace matmul_detail;
  const checker check{"linalg::matmul_panels"};
  const index_t M = a.extent(0), K = a.extent(1), N = b.rows();
  const epilogue ep = checked_packed(check, a, b, c, options);
  if (M > gemv_max_m) {
    check.fail("a", "has " + std::to_string(M) + " rows; at most " + std::to_string(gemv_max_m) +
                        " expected (the panel GEMV; matmul takes any M)");
  }
  if (q0 < 0 || q1 < q0 || q1 > b.panels()) {
    check.fail("q0, q1", "panel range [" + std::to_string(q0) + ", " + std::to_string(q1) +
                             ") is not within [0, " + std::to_string(b.panels()) +
                             ") (b's panels of " + std::to_string(NR) + " columns)");
  }
  if (M == 0 || q1 == q0) return;
  const index_t j0 = q0 * NR, nc = std::min(N, q1 * NR) - j0;
  if (K == 0) {
    float* zeros = scratch(3, static_cast<std::size_t>(nc));
    std::fill_n(zeros, nc, 0.0f);
    for (index_t i = 0; i < M; ++i) ep.row(i, j0, nc, zeros);
    return;
  }
  index_t lda = 0;
  const float* ap = unit_stride_a(a, options.precision == matmul_precision::bf16_dot, lda);
  panel_range_of(ap, lda, b, M, q0, q1, ep);
}

}  // namespace seqmix::linalg
