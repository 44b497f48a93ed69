// SPDX-License-Identifier: MIT
// The only file in seqmix that includes xsimd. A small vocabulary over `xsimd::batch<T>` for
// the architecture the user compiles for (-march), plus array helpers with scalar tails, so
// kernels never see xsimd's version differences (Debian ships 8.1: `hadd`, no `reduce_max`).
//
// Numerically safe activations (batch and scalar forms agree):
//   sigmoid(x)    = 1 / (1 + e^-x)          computed from e^-|x|: no overflow for any x
//   logsigmoid(x) = min(x, 0) - log1p(e^-|x|)
//   softplus(x)   = x for x > 20, else max(x, 0) + log1p(e^-|x|)   (torch's threshold)
//   silu(x)       = x · sigmoid(x)
// Accuracy (tests/core/test_simd.cpp measures it against long double over [-1e4, 1e4] and the
// extremes of the type; relative error where the result is above 1e3 x the smallest normal):
//   float:  exp 1.2e-7, log 6.3e-8, sigmoid 1.9e-7, logsigmoid/softplus 1.4e-7, silu 2.3e-7
//   double: all below 4e-16
// exp flushes results below the smallest normal to 0 (and exp(-inf) = 0).
//
// ISA: the vector width is the one of the compiler's target. An x86-64 build without AVX2 and FMA
// (the compilers' default target is SSE2) runs the kernels 2-5x slower, so such a build says so
// at compile time (a #pragma message; define SEQMIX_NO_ISA_WARNING to silence it), and
// arch_name() tells at run time. Compile with -march=native (or e.g. -mavx2 -mfma).
#pragma once

#if !defined(SEQMIX_NO_ISA_WARNING) && (defined(__x86_64__) || defined(_M_X64)) && \
    !(defined(__AVX2__) && defined(__FMA__))
#pragma message(                                                                               \
    "seqmix: compiled without AVX2/FMA (SSE2 only): its kernels run 2-5x slower than with "    \
    "-march=native; compile with -march=native or -mavx2 -mfma (define SEQMIX_NO_ISA_WARNING " \
    "to silence this message)")
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <xsimd/xsimd.hpp>

#include <seqmix/core/error.hpp>

namespace seqmix {

/// Scalar math used by references and by scalar tails; any floating-point type.
namespace math {

template <class T>
T sigmoid(T x) {
  const T e = std::exp(-std::abs(x));
  return x >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
}
template <class T>
T logsigmoid(T x) {
  return std::min(x, T(0)) - std::log1p(std::exp(-std::abs(x)));
}
template <class T>
T softplus(T x) {
  if (x > T(20)) return x;
  return std::max(x, T(0)) + std::log1p(std::exp(-std::abs(x)));
}
template <class T>
T silu(T x) {
  return x * sigmoid(x);
}

}  // namespace math

namespace simd {

template <class T>
using batch = xsimd::batch<T>;

/// Number of T lanes in one register of the target architecture.
template <class T>
inline constexpr index_t lanes = static_cast<index_t>(batch<T>::size);

/// Name of the instruction set the code was compiled for ("avx512bw", "avx2", "sse2", ...): every
/// benchmark report and the README's example print it.
inline const char* arch_name() {
  return xsimd::default_arch::name();
}

template <class T>
batch<T> load(const T* p) {
  return batch<T>::load_unaligned(p);
}
template <class T>
void store(T* p, const batch<T>& b) {
  b.store_unaligned(p);
}
template <class T>
batch<T> broadcast(T x) {
  return batch<T>(x);
}
/// Loads n < lanes<T> elements, zero-filling the rest.
template <class T>
batch<T> load_partial(const T* p, index_t n) {
  alignas(64) std::array<T, batch<T>::size> buf{};
  std::copy_n(p, n, buf.begin());
  return batch<T>::load_aligned(buf.data());
}
/// Stores the first n < lanes<T> lanes.
template <class T>
void store_partial(T* p, const batch<T>& b, index_t n) {
  alignas(64) std::array<T, batch<T>::size> buf{};
  b.store_aligned(buf.data());
  std::copy_n(buf.begin(), n, p);
}

/// a·b + c, one rounding. xsimd 8.1 has no AVX-512 fma: it falls back to a*b+c, which g++
/// contracts into an FMA but clang does not (a separate multiply and add: half the FLOP rate
/// and a second rounding), so the AVX-512 registers call the instruction directly.
template <class T>
batch<T> fma(const batch<T>& a, const batch<T>& b, const batch<T>& c) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float> && batch<T>::size == 16) {
    return batch<T>(_mm512_fmadd_ps(a, b, c));
  } else if constexpr (std::is_same_v<T, double> && batch<T>::size == 8) {
    return batch<T>(_mm512_fmadd_pd(a, b, c));
  } else {
    return xsimd::fma(a, b, c);
  }
#else
  return xsimd::fma(a, b, c);
#endif
}
template <class T>
T reduce_sum(const batch<T>& b) {
  return xsimd::hadd(b);
}
/// Largest lane (for NaN-free input; with a NaN lane the result is unspecified). AVX-512: a
/// shuffle tree (4 dependent max steps) instead of a store and a serial chain of 15.
template <class T>
T reduce_max(const batch<T>& b) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float> && batch<T>::size == 16) {
    return _mm512_reduce_max_ps(b);
  } else if constexpr (std::is_same_v<T, double> && batch<T>::size == 8) {
    return _mm512_reduce_max_pd(b);
  }
#endif
  alignas(64) std::array<T, batch<T>::size> buf{};
  b.store_aligned(buf.data());
  return *std::max_element(buf.begin(), buf.end());
}

template <class T>
batch<T> exp(const batch<T>& x) {
  // Clamp far outside the finite range first: the result is unchanged (0 or +inf), and xsimd
  // would otherwise convert ±inf to an integer exponent (undefined behaviour in its scalar
  // fallback for double). NaN passes through unchanged: it is tested with isnan (xsimd 8.1's
  // AVX-512 `x != x` is an ordered compare, false for NaN, which made exp(NaN) = 0), kept out of
  // xsimd's exp (whose double path converts it to an integer: undefined behaviour) and put back.
  const batch<T> bound(T(1000));
  const auto nan = xsimd::isnan(x);
  const batch<T> clamped =
      xsimd::select(nan, batch<T>(T(0)), xsimd::min(xsimd::max(x, -bound), bound));
  return xsimd::select(nan, x, xsimd::exp(clamped));
}
template <class T>
batch<T> log(const batch<T>& x) {
  return xsimd::log(x);
}
template <class T>
batch<T> sigmoid(const batch<T>& x) {
  const batch<T> e = simd::exp(-xsimd::abs(x));
  const batch<T> one(T(1));
  const batch<T> r = one / (one + e);
  return xsimd::select(x >= batch<T>(T(0)), r, e * r);
}
template <class T>
batch<T> logsigmoid(const batch<T>& x) {
  return xsimd::min(x, batch<T>(T(0))) - xsimd::log1p(simd::exp(-xsimd::abs(x)));
}
template <class T>
batch<T> softplus(const batch<T>& x) {
  const batch<T> smooth = xsimd::max(x, batch<T>(T(0))) + xsimd::log1p(simd::exp(-xsimd::abs(x)));
  return xsimd::select(x > batch<T>(T(20)), x, smooth);
}
template <class T>
batch<T> silu(const batch<T>& x) {
  return x * sigmoid(x);
}

// ---- array helpers (any n, scalar tails) -------------------------------------------------

/// Σ a[i]·b[i].
template <class T>
T dot(const T* a, const T* b, index_t n) {
  constexpr index_t L = lanes<T>;
  batch<T> acc0(T(0)), acc1(T(0));
  index_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    acc0 = fma(load(a + i), load(b + i), acc0);
    acc1 = fma(load(a + i + L), load(b + i + L), acc1);
  }
  for (; i + L <= n; i += L) acc0 = fma(load(a + i), load(b + i), acc0);
  T s = reduce_sum(acc0 + acc1);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

/// y[i] += alpha·x[i].
template <class T>
void axpy(T* y, T alpha, const T* x, index_t n) {
  constexpr index_t L = lanes<T>;
  const batch<T> va(alpha);
  index_t i = 0;
  for (; i + L <= n; i += L) store(y + i, fma(va, load(x + i), load(y + i)));
  for (; i < n; ++i) y[i] += alpha * x[i];
}

/// x[i] *= alpha.
template <class T>
void scale(T* x, T alpha, index_t n) {
  constexpr index_t L = lanes<T>;
  const batch<T> va(alpha);
  index_t i = 0;
  for (; i + L <= n; i += L) store(x + i, va * load(x + i));
  for (; i < n; ++i) x[i] *= alpha;
}

/// Σ x[i].
template <class T>
T sum(const T* x, index_t n) {
  constexpr index_t L = lanes<T>;
  batch<T> acc(T(0));
  index_t i = 0;
  for (; i + L <= n; i += L) acc += load(x + i);
  T s = reduce_sum(acc);
  for (; i < n; ++i) s += x[i];
  return s;
}

/// max x[i] (n >= 1).
template <class T>
T max(const T* x, index_t n) {
  constexpr index_t L = lanes<T>;
  index_t i = 0;
  T m = x[0];
  if (n >= L) {
    batch<T> acc = load(x);
    for (i = L; i + L <= n; i += L) acc = xsimd::max(acc, load(x + i));
    m = reduce_max(acc);
  }
  for (; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

/// out[i] = f(in[i]) with f a batch function (vector body) and the same f on a partial batch
/// for the tail, so tails get identical rounding. `in` and `out` may alias.
template <class T, class F>
void transform(const T* in, T* out, index_t n, F&& f) {
  constexpr index_t L = lanes<T>;
  index_t i = 0;
  for (; i + L <= n; i += L) store(out + i, f(load(in + i)));
  if (i < n) store_partial(out + i, f(load_partial(in + i, n - i)), n - i);
}

template <class T>
void exp(const T* in, T* out, index_t n) {
  transform(in, out, n, [](const batch<T>& x) { return simd::exp(x); });
}
template <class T>
void log(const T* in, T* out, index_t n) {
  transform(in, out, n, [](const batch<T>& x) { return simd::log(x); });
}
template <class T>
void sigmoid(const T* in, T* out, index_t n) {
  transform(in, out, n, [](const batch<T>& x) { return simd::sigmoid(x); });
}
template <class T>
void logsigmoid(const T* in, T* out, index_t n) {
  transform(in, out, n, [](const batch<T>& x) { return simd::logsigmoid(x); });
}
template <class T>
void softplus(const T* in, T* out, index_t n) {
  transform(in, out, n, [](const batch<T>& x) { return simd::softplus(x); });
}
template <class T>
void silu(const T* in, T* out, index_t n) {
  transform(in, out, n, [](const batch<T>& x) { return simd::silu(x); });
}

}  // namespace simd
}  // namespace seqmix
