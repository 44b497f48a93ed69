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
// parallel info (single-threaded, no global state). Cost 2·m·n·k FLOP; extra memory k·n for a
// transposed B (the caller's `pack` buffer, reused across calls).
#pragma once

#include <algorithm>
#include <cstddef>
#include <vector>

#include <Eigen/Core>

#include <seqmix/core/simd.hpp>
#include <seqmix/core/tensor.hpp>

namespace seqmix::linalg {

using simd::batch;

/// Register-blocked micro-kernel: an MR×(NV·lanes) tile of C (row-major, ldc) += A·B over
/// depth k, A element (i, p) at a[i·rsa + p·csa] (broadcast from memory, so A may be
/// transposed for free), B row-major (ldb). The tile's accumulators stay in registers.
template <class T, std::size_t MR, std::size_t NV>
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
  for (std::size_t r = 0; r < MR; ++r) {
    for (std::size_t u = 0; u < NV; ++u)
      simd::store(c + static_cast<index_t>(r) * ldc + static_cast<index_t>(u) * L, acc[r][u]);
  }
}

/// All rows of one column panel of NV vectors: tiles of 6 rows, then the remaining 1-5. With
/// `lower` (A square, zero above its diagonal) the tile of rows [i, i + MR) stops at depth i + MR.
template <class T, std::size_t NV>
void micro_panel(index_t m, index_t k, const T* a, index_t rsa, index_t csa, const T* b,
                 index_t ldb, T* c, index_t ldc, bool accumulate, bool lower) {
  auto tile = [&]<std::size_t MR>(index_t i) {
    const index_t depth = lower ? std::min(k, i + static_cast<index_t>(MR)) : k;
    micro_tile<T, MR, NV>(depth, a + i * rsa, rsa, csa, b, ldb, c + i * ldc, ldc, accumulate);
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

/// C (row-major, m×n, ldc) = A·B (+ C when accumulate), A m×k and B k×n either row-major
/// (trans = false) or the transpose of a row-major buffer. Chunk-sized products (m, k <= a few
/// hundred) whose n is a multiple of the SIMD width run on the register-blocked kernel above
/// (B transposed is packed first, into `pack`); other shapes (odd value sizes) use Eigen's GEMM
/// kernel without its OpenMP layer. Both are single-threaded with a fixed summation order, so
/// results are bitwise identical for any number of seqmix threads. `lower_a`: A is square
/// (k == m) and zero above its diagonal, so row tiles skip its zero upper part (half the
/// product; the dense fallback simply multiplies the zeros).
template <class T, bool TransA, bool TransB>
void gemm(index_t m, index_t n, index_t k, const T* a, index_t lda, const T* b, index_t ldb, T* c,
          index_t ldc, bool accumulate, std::vector<T>& pack, bool lower_a = false) {
  constexpr index_t L = simd::lanes<T>;
  if (!accumulate && (k == 0 || n % L != 0)) {
    for (index_t i = 0; i < m; ++i) std::fill_n(c + i * ldc, n, T(0));
  }
  if (m == 0 || n == 0 || k == 0) return;
  if (n % L == 0) {
    const T* bb = b;
    index_t lb = ldb;
    if constexpr (TransB) {
      // B = (row-major n×k buffer)ᵀ: pack it k×n
      pack.resize(static_cast<std::size_t>(k * n));
      for (index_t j = 0; j < n; ++j) {
        for (index_t p = 0; p < k; ++p) pack[static_cast<std::size_t>(p * n + j)] = b[j * ldb + p];
      }
      bb = pack.data();
      lb = n;
    }
    const index_t rsa = TransA ? 1 : lda, csa = TransA ? lda : 1;
    index_t j = 0;
    for (; j + 4 * L <= n; j += 4 * L)
      micro_panel<T, 4>(m, k, a, rsa, csa, bb + j, lb, c + j, ldc, accumulate, lower_a);
    const index_t rest = (n - j) / L;
    if (rest == 3)
      micro_panel<T, 3>(m, k, a, rsa, csa, bb + j, lb, c + j, ldc, accumulate, lower_a);
    if (rest == 2)
      micro_panel<T, 2>(m, k, a, rsa, csa, bb + j, lb, c + j, ldc, accumulate, lower_a);
    if (rest == 1)
      micro_panel<T, 1>(m, k, a, rsa, csa, bb + j, lb, c + j, ldc, accumulate, lower_a);
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
