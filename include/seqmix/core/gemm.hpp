// SPDX-License-Identifier: MIT
// Chunk-sized matrix products for the chunked kernels: C (row-major) = A·B (+ C), with A and B
// row-major or transposed, m and k up to a few hundred. Single-threaded with a fixed summation
// order, so a kernel's results are bitwise identical for any number of seqmix threads, and free
// of global state: Eigen's own product expressions consult Eigen::nbThreads() and parallelise
// under OpenMP, which a kernel could only prevent by changing that process-wide setting.
//
// Shapes whose n is a multiple of the SIMD width run on a register-blocked micro-kernel (tiles of
// 6 rows × up to 4 vectors, accumulators in registers, A broadcast from memory so a transposed A
// costs nothing); others run Eigen's GEMM kernel through its internal entry point with no
// parallel info (single-threaded, no global state), except products with a lower-triangular A
// (lower_a), whose tail columns run on the micro-kernel over a zero-padded copy: a triangular
// product never reads A's upper part, so a chunk's masked future tokens never reach it as 0·NaN.
// Cost 2·m·n·k FLOP (about half with lower_a); extra memory k·n for a transposed B, (k + m)·lanes
// for a triangular product's tail (the caller's `pack` buffer, reused across calls).
#pragma once

#include <algorithm>
#include <cstddef>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include <seqmix/core/simd.hpp>
#include <seqmix/core/tensor.hpp>

namespace seqmix::linalg {

using simd::batch;

/// Register-blocked micro-kernel: an MR×(NV·lanes) tile of C (row-major, ldc) += A·B over
/// depth k, A element (i, p) at a[i·rsa + p·csa] (broadcast from memory, so A may be
/// transposed for free), B row-major (ldb). The tile's accumulators stay in registers.
/// With Tri, the tile's rows sit on the diagonal of a lower-triangular A: depth k is the part
/// every row sees (columns left of the tile's first row), then row r also takes columns
/// k .. k + r, one step of a triangle. The zeros above the diagonal are never read, and the rows
/// of B they would multiply never reach a row above them: 0 · NaN (a masked future token's value)
/// would be NaN, so a masked product must skip them, not multiply by zero.
template <class T, std::size_t MR, std::size_t NV, bool Tri = false>
inline void micro_tile(index_t k, const T* a, index_t rsa, index_t csa, const T* b, index_t ldb,
                       T* c, index_t ldc, bool accumulate) {
  using B = batch<T>;
  constexpr index_t L = simd::lanes<T>;
  B acc[MR][NV];
  for (std::size_t r = 0; r < MR; ++r) {
    for (std::size_t u = 0; u < NV; ++u) {
      acc[r][u] = accumulate
                      ? simd::load(c + static_cast<index_t>(r) * ldc + static_cast<index_t>(u) * L)
                      : B(T(0));
    }
  }
  for (index_t p = 0; p < k; ++p) {
    const T* bp = b + p * ldb;
    B bb[NV];
    for (std::size_t u = 0; u < NV; ++u) bb[u] = simd::load(bp + static_cast<index_t>(u) * L);
    const T* ap = a + p * csa;
    for (std::size_t r = 0; r < MR; ++r) {
      const B ar(ap[static_cast<index_t>(r) * rsa]);
      for (std::size_t u = 0; u < NV; ++u) acc[r][u] = simd::fma(ar, bb[u], acc[r][u]);
    }
  }
  if constexpr (Tri) {
    // the diagonal block, row by row: row R also takes columns k .. k + R (R a compile-time
    // constant in each expansion, so its accumulators stay in registers; the rows of B it reads
    // come from L1)
    [&]<std::size_t... R>(std::index_sequence<R...>) {
      (
          [&] {
            const T* ar = a + static_cast<index_t>(R) * rsa;
            for (index_t p = k; p <= k + static_cast<index_t>(R); ++p) {
              const B x(ar[p * csa]);
              const T* bp = b + p * ldb;
              for (std::size_t u = 0; u < NV; ++u)
                acc[R][u] = simd::fma(x, simd::load(bp + static_cast<index_t>(u) * L), acc[R][u]);
            }
          }(),
          ...);
    }
    (std::make_index_sequence<MR>{});
  }
  for (std::size_t r = 0; r < MR; ++r) {
    for (std::size_t u = 0; u < NV; ++u)
      simd::store(c + static_cast<index_t>(r) * ldc + static_cast<index_t>(u) * L, acc[r][u]);
  }
}

/// All rows of one column panel of NV vectors: tiles of 6 rows, then the remaining 1-5. With
/// `lower` (A square, zero above its diagonal, never read there) the tile of rows [i, i + MR)
/// runs depth i for all its rows and then its diagonal triangle.
template <class T, std::size_t NV>
void micro_panel(index_t m, index_t k, const T* a, index_t rsa, index_t csa, const T* b,
                 index_t ldb, T* c, index_t ldc, bool accumulate, bool lower) {
  auto tile = [&]<std::size_t MR>(index_t i) {
    if (lower) {
      micro_tile<T, MR, NV, true>(i, a + i * rsa, rsa, csa, b, ldb, c + i * ldc, ldc, accumulate);
    } else {
      micro_tile<T, MR, NV>(k, a + i * rsa, rsa, csa, b, ldb, c + i * ldc, ldc, accumulate);
    }
  };
  index_t i = 0;
  for (; i + 6 <= m; i += 6) tile.template operator()<6>(i);
  switch (m - i) {
    case 5:
      tile.template operator()<5>(i);
      break;
    case 4:
      tile.template operator()<4>(i);
      break;
    case 3:
      tile.template operator()<3>(i);
      break;
    case 2:
      tile.template operator()<2>(i);
      break;
    case 1:
      tile.template operator()<1>(i);
      break;
    default:
      break;
  }
}

/// Runs the register-blocked kernel over the full-vector columns [0, n - n % lanes) of C = A·B
/// (B packed k×n first when transposed, into `pack`).
template <class T, bool TransA, bool TransB>
void micro_gemm(index_t m, index_t n, index_t k, const T* a, index_t lda, const T* b, index_t ldb,
                T* c, index_t ldc, bool accumulate, std::vector<T>& pack, bool lower_a) {
  constexpr index_t L = simd::lanes<T>;
  const index_t nv = n / L * L;
  if (nv == 0) return;
  const T* bb = b;
  index_t lb = ldb;
  if constexpr (TransB) {
    // B = (row-major n×k buffer)ᵀ: pack it k×nv
    pack.resize(static_cast<std::size_t>(k * nv));
    for (index_t j = 0; j < nv; ++j) {
      for (index_t p = 0; p < k; ++p) pack[static_cast<std::size_t>(p * nv + j)] = b[j * ldb + p];
    }
    bb = pack.data();
    lb = nv;
  }
  const index_t rsa = TransA ? 1 : lda, csa = TransA ? lda : 1;
  index_t j = 0;
  for (; j + 4 * L <= nv; j += 4 * L)
    micro_panel<T, 4>(m, k, a, rsa, csa, bb + j, lb, c + j, ldc, accumulate, lower_a);
  const index_t rest = (nv - j) / L;
  if (rest == 3) micro_panel<T, 3>(m, k, a, rsa, csa, bb + j, lb, c + j, ldc, accumulate, lower_a);
  if (rest == 2) micro_panel<T, 2>(m, k, a, rsa, csa, bb + j, lb, c + j, ldc, accumulate, lower_a);
  if (rest == 1) micro_panel<T, 1>(m, k, a, rsa, csa, bb + j, lb, c + j, ldc, accumulate, lower_a);
}

/// C (row-major, m×n, ldc) = A·B (+ C when accumulate), A m×k and B k×n either row-major
/// (trans = false) or the transpose of a row-major buffer. Chunk-sized products (m, k <= a few
/// hundred) whose n is a multiple of the SIMD width run on the register-blocked kernel above
/// (B transposed is packed first, into `pack`); other shapes (odd value sizes) use Eigen's GEMM
/// kernel without its OpenMP layer. Both are single-threaded with a fixed summation order, so
/// results are bitwise identical for any number of seqmix threads.
/// `lower_a`: A is square (k == m) and lower triangular (diagonal included); its upper part is
/// never read, and row i of C reads only rows 0..i of B. This is what makes the chunked kernels
/// causal: the masked entries of a chunk's A are future tokens, and 0 · NaN or 0 · inf from a
/// future value must not reach an earlier output. It also halves the product. With lower_a,
/// the columns past the last full vector run on the same kernel over a zero-padded copy of B's
/// tail columns and of C's (both in `pack`), instead of Eigen's dense kernel.
template <class T, bool TransA, bool TransB>
void gemm(index_t m, index_t n, index_t k, const T* a, index_t lda, const T* b, index_t ldb, T* c,
          index_t ldc, bool accumulate, std::vector<T>& pack, bool lower_a = false) {
  constexpr index_t L = simd::lanes<T>;
  if (!accumulate && (k == 0 || (n % L != 0 && !lower_a))) {
    for (index_t i = 0; i < m; ++i) std::fill_n(c + i * ldc, n, T(0));
  }
  if (m == 0 || n == 0 || k == 0) return;
  if (n % L == 0) {
    micro_gemm<T, TransA, TransB>(m, n, k, a, lda, b, ldb, c, ldc, accumulate, pack, lower_a);
    return;
  }
  if (lower_a) {
    micro_gemm<T, TransA, TransB>(m, n, k, a, lda, b, ldb, c, ldc, accumulate, pack, true);
    // the tail columns [n0, n): B's packed k×L (zeros past n), C's m×L, one panel of one vector
    const index_t n0 = n / L * L, nt = n - n0;
    pack.resize(static_cast<std::size_t>((k + m) * L));
    T* bt = pack.data();
    T* ct = bt + k * L;
    for (index_t p = 0; p < k; ++p) {
      T* row = bt + p * L;
      for (index_t j = 0; j < nt; ++j)
        row[j] = TransB ? b[(n0 + j) * ldb + p] : b[p * ldb + n0 + j];
      std::fill(row + nt, row + L, T(0));
    }
    for (index_t i = 0; i < m; ++i) {
      T* row = ct + i * L;
      if (accumulate) {
        std::copy_n(c + i * ldc + n0, nt, row);
        std::fill(row + nt, row + L, T(0));
      }
    }
    const index_t rsa = TransA ? 1 : lda, csa = TransA ? lda : 1;
    micro_panel<T, 1>(m, k, a, rsa, csa, bt, L, ct, L, accumulate, true);
    for (index_t i = 0; i < m; ++i) std::copy_n(ct + i * L, nt, c + i * ldc + n0);
    return;
  }
  using namespace Eigen;
  using gemm_t =
      internal::general_matrix_matrix_product<index_t, T, TransA ? ColMajor : RowMajor, false, T,
                                              TransB ? ColMajor : RowMajor, false, RowMajor, 1>;
  internal::gemm_blocking_space<RowMajor, T, T, Dynamic, Dynamic, Dynamic> blocking(m, n, k, 1,
                                                                                    true);
  gemm_t::run(m, n, k, a, lda, b, ldb, c, 1, ldc, T(1), blocking, nullptr);
}

}  // namespace seqmix::linalg
