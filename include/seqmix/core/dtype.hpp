// SPDX-License-Identifier: MIT
// Element types of checkpoints and tensors: the `dtype` tag, the 16-bit float scalar types
// `bf16` and `f16`, and bulk conversions between them and float.
//
//   dtype        f32 f64 bf16 f16 i32 i64 u8 boolean     (safetensors: F32 F64 BF16 F16 I32 I64
//                                                         U8 BOOL; parse_dtype / dtype_name)
//   bf16         1 sign, 8 exponent, 7 mantissa bits: the upper half of an IEEE binary32.
//   f16          IEEE binary16: 1 sign, 5 exponent, 10 mantissa bits (max 65504, subnormals
//                down to 2^-24).
//
// Scalar conversions (constexpr, no FP-environment dependence: integer arithmetic only):
//   to_float(bf16)       exact: the bits shifted into the upper half (a NaN keeps its bits).
//   to_float(f16)        exact, subnormals included; a NaN becomes a quiet NaN with its payload
//                        (the IEEE widening, and what F16C's vcvtph2ps does).
//   bf16_from_float(f)   round to nearest, ties to even, float subnormals rounded exactly (not
//                        flushed); overflow rounds to inf; NaN -> quiet NaN, payload truncated.
//   f16_from_float(f)    round to nearest, ties to even, into f16 subnormals exactly; |f| >= 65520
//                        -> inf; NaN -> quiet NaN, payload truncated (as F16C's vcvtps2ph).
//
// Bulk conversions, bitwise equal to the scalar ones for every input:
//   to_float(const bf16* src, float* dst, n)     from_float(const float* src, bf16* dst, n)
//   to_float(const f16* src, float* dst, n)      from_float(const float* src, f16* dst, n)
// They use the best instruction set the code is compiled for (-march):
//   bf16 <- f32: AVX-512 BF16 vcvtne2ps2bf16, 32 per instruction (it flushes float subnormal
//                inputs to zero, so a block that holds one takes the bit path instead);
//                else AVX-512F / AVX2 integer rounding (add 0x7fff + lsb, shift, NaN blend).
//   bf16 -> f32: a zero-extending 16-bit load and a shift (AVX-512F / AVX2).
//   f16 <-> f32: AVX-512F vcvtph2ps / vcvtps2ph (16 lanes), else F16C (8 lanes), else scalar.
// Scalar tails. Cost, measured on a 2.6 GHz Xeon (loaded machine, 16 Ki elements in L2): 0.13-0.26
// ns per element for every vector path (f32 -> bf16 0.13-0.17 with vcvtne2ps2bf16); scalar f16
// conversions 1.8 ns (the scalar bf16 loops auto-vectorise: 0.15-0.26).
// Pointers need only the element type's alignment (2 bytes for bf16/f16); loads are unaligned.
// No path depends on MXCSR (rounding is explicit; with DAZ and FTZ set, as -ffast-math does,
// every path still equals the scalar one on all f16 patterns: checked on an AVX-512 BF16 Xeon).
// detail::conversion_kernels() lists every compiled path, so tests check each one.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string_view>
#include <type_traits>

#if defined(__x86_64__) || defined(__i386__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace seqmix {

/// Element type of a stored tensor.
enum class dtype : std::uint8_t { f32, f64, bf16, f16, i32, i64, u8, boolean };

/// Every dtype, in enum order.
inline constexpr dtype all_dtypes[] = {dtype::f32, dtype::f64, dtype::bf16, dtype::f16,
                                       dtype::i32, dtype::i64, dtype::u8,   dtype::boolean};

/// The safetensors name of a dtype ("F32", "BF16", "BOOL", ...).
constexpr const char* dtype_name(dtype t) noexcept {
  switch (t) {
    case dtype::f32:
      return "F32";
    case dtype::f64:
      return "F64";
    case dtype::bf16:
      return "BF16";
    case dtype::f16:
      return "F16";
    case dtype::i32:
      return "I32";
    case dtype::i64:
      return "I64";
    case dtype::u8:
      return "U8";
    case dtype::boolean:
      return "BOOL";
  }
  return "?";
}

/// Bytes per element.
constexpr std::size_t dtype_size(dtype t) noexcept {
  switch (t) {
    case dtype::f64:
    case dtype::i64:
      return 8;
    case dtype::f32:
    case dtype::i32:
      return 4;
    case dtype::bf16:
    case dtype::f16:
      return 2;
    case dtype::u8:
    case dtype::boolean:
      return 1;
  }
  return 0;
}

/// True for f32, f64, bf16, f16.
constexpr bool is_floating_point(dtype t) noexcept {
  return t == dtype::f32 || t == dtype::f64 || t == dtype::bf16 || t == dtype::f16;
}

/// The dtype of a safetensors dtype string, or nullopt when seqmix does not handle it (e.g.
/// "I8", "F8_E4M3"). Case-sensitive, as the format is.
constexpr std::optional<dtype> parse_dtype(std::string_view s) noexcept {
  for (dtype t : all_dtypes) {
    if (s == dtype_name(t)) return t;
  }
  return std::nullopt;
}

/// bfloat16 storage: the upper 16 bits of an IEEE-754 binary32. An aggregate of its bits
/// (`bf16{0x3f80}` is 1.0); convert with to_float / bf16_from_float.
struct bf16 {
  std::uint16_t bits = 0;
  static constexpr bf16 from_bits(std::uint16_t b) noexcept { return bf16{b}; }
  explicit constexpr operator float() const noexcept {
    return std::bit_cast<float>(static_cast<std::uint32_t>(bits) << 16);
  }
};

/// IEEE binary16 storage. An aggregate of its bits (`f16{0x3c00}` is 1.0); convert with
/// to_float / f16_from_float.
struct f16 {
  std::uint16_t bits = 0;
  static constexpr f16 from_bits(std::uint16_t b) noexcept { return f16{b}; }
  explicit constexpr operator float() const noexcept;
};

static_assert(sizeof(bf16) == 2 && sizeof(f16) == 2 && std::is_trivially_copyable_v<bf16> &&
              std::is_trivially_copyable_v<f16>);

/// Exact widening of a bf16 to float.
constexpr float to_float(bf16 x) noexcept {
  return std::bit_cast<float>(static_cast<std::uint32_t>(x.bits) << 16);
}

/// Exact widening of an f16 to float (subnormals normalised; NaN quieted, payload kept).
constexpr float to_float(f16 x) noexcept {
  const std::uint32_t h = x.bits;
  const std::uint32_t sign = (h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  std::uint32_t man = h & 0x3ffu;
  if (exp == 0x1fu) {
    const std::uint32_t quiet = man ? 0x400000u : 0u;
    return std::bit_cast<float>(sign | 0x7f800000u | quiet | (man << 13));
  }
  if (exp != 0) return std::bit_cast<float>(sign | ((exp + 112u) << 23) | (man << 13));
  if (man == 0) return std::bit_cast<float>(sign);
  // Subnormal man * 2^-24: shift the leading one up to bit 10, lowering the exponent each time.
  std::uint32_t e = 113;
  while ((man & 0x400u) == 0) {
    man <<= 1;
    --e;
  }
  return std::bit_cast<float>(sign | (e << 23) | ((man & 0x3ffu) << 13));
}

constexpr f16::operator float() const noexcept {
  return to_float(*this);
}

/// float -> bf16, round to nearest, ties to even (subnormals exact); NaN stays a quiet NaN.
constexpr bf16 bf16_from_float(float f) noexcept {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<std::uint16_t>((u >> 16) | 0x40u)};
  // Adding 0x7fff + lsb carries into bit 16 exactly when the dropped half is above one half,
  // or equal to it with an odd kept part; a carry out of the mantissa bumps the exponent, and
  // past the largest finite value lands on inf: all of RNE in one add.
  const std::uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);
  return bf16{static_cast<std::uint16_t>(rounded >> 16)};
}

/// float -> f16, round to nearest, ties to even (into subnormals exactly); |f| >= 65520 -> inf;
/// NaN -> quiet NaN with the payload's top bits.
constexpr f16 f16_from_float(float f) noexcept {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  const std::uint32_t sign = (u >> 16) & 0x8000u;
  const std::uint32_t a = u & 0x7fffffffu;
  auto make = [sign](std::uint32_t magnitude) {
    return f16{static_cast<std::uint16_t>(sign | magnitude)};
  };
  if (a > 0x7f800000u) return make(0x7e00u | ((a >> 13) & 0x3ffu));
  if (a >= 0x477ff000u) return make(0x7c00u);  // >= 65504 + half an ulp (and inf)
  if (a >= 0x38800000u) {                      // >= 2^-14: normal; rebias 127 -> 15
    const std::uint32_t r = a - 0x38000000u;
    return make((r + 0xfffu + ((r >> 13) & 1u)) >> 13);
  }
  // Below the smallest normal: units of 2^-24. The value is m * 2^(e - 150) with the implicit
  // one in m, i.e. m >> (126 - e) units, rounded to nearest even by hand.
  const std::uint32_t e = a >> 23;
  if (e < 102) return make(0);  // below 2^-25: rounds to zero
  const std::uint32_t m = (a & 0x7fffffu) | 0x800000u;
  const std::uint32_t s = 126u - e;  // 14 .. 24
  std::uint32_t q = m >> s;
  const std::uint32_t rem = m & ((1u << s) - 1u);
  const std::uint32_t half = 1u << (s - 1u);
  if (rem > half || (rem == half && (q & 1u))) ++q;  // may reach 0x400: the smallest normal
  return make(q);
}

/// The dtype tag of a C++ element type (float, double, bf16, f16, int32_t, int64_t, uint8_t,
/// bool).
template <class T>
constexpr dtype dtype_of() noexcept {
  using U = std::remove_cv_t<T>;
  if constexpr (std::is_same_v<U, float>)
    return dtype::f32;
  else if constexpr (std::is_same_v<U, double>)
    return dtype::f64;
  else if constexpr (std::is_same_v<U, bf16>)
    return dtype::bf16;
  else if constexpr (std::is_same_v<U, f16>)
    return dtype::f16;
  else if constexpr (std::is_same_v<U, std::int32_t>)
    return dtype::i32;
  else if constexpr (std::is_same_v<U, std::int64_t>)
    return dtype::i64;
  else if constexpr (std::is_same_v<U, std::uint8_t>)
    return dtype::u8;
  else if constexpr (std::is_same_v<U, bool>)
    return dtype::boolean;
  else
    static_assert(sizeof(T) == 0, "seqmix: no dtype for this element type");
}

/// True when T is one of the element types dtype_of accepts.
template <class T>
inline constexpr bool is_dtype_element_v =
    std::is_same_v<std::remove_cv_t<T>, float> || std::is_same_v<std::remove_cv_t<T>, double> ||
    std::is_same_v<std::remove_cv_t<T>, bf16> || std::is_same_v<std::remove_cv_t<T>, f16> ||
    std::is_same_v<std::remove_cv_t<T>, std::int32_t> ||
    std::is_same_v<std::remove_cv_t<T>, std::int64_t> ||
    std::is_same_v<std::remove_cv_t<T>, std::uint8_t> || std::is_same_v<std::remove_cv_t<T>, bool>;

namespace detail::cvt {

// --- scalar paths (also the tails of the vector ones) --------------------------------------
inline void bf16_to_f32_scalar(const bf16* s, float* d, std::size_t n) noexcept {
  for (std::size_t i = 0; i < n; ++i) d[i] = to_float(s[i]);
}
inline void f32_to_bf16_scalar(const float* s, bf16* d, std::size_t n) noexcept {
  for (std::size_t i = 0; i < n; ++i) d[i] = bf16_from_float(s[i]);
}
inline void f16_to_f32_scalar(const f16* s, float* d, std::size_t n) noexcept {
  for (std::size_t i = 0; i < n; ++i) d[i] = to_float(s[i]);
}
inline void f32_to_f16_scalar(const float* s, f16* d, std::size_t n) noexcept {
  for (std::size_t i = 0; i < n; ++i) d[i] = f16_from_float(s[i]);
}

#if defined(__AVX2__)
inline void bf16_to_f32_avx2(const bf16* s, float* d, std::size_t n) noexcept {
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    const __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), w);
  }
  bf16_to_f32_scalar(s + i, d + i, n - i);
}

// bf16_from_float on 8 lanes: returns the rounded values in the low 16 bits of each lane.
inline __m256i f32_to_bf16_lanes_avx2(__m256i u) noexcept {
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i bias = _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb);
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
  const __m256i magnitude = _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
  const __m256i nan = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x7f800000));
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  return _mm256_blendv_epi8(rounded, quiet, nan);
}

inline void f32_to_bf16_avx2(const float* s, bf16* d, std::size_t n) noexcept {
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i r =
        f32_to_bf16_lanes_avx2(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)));
    // Lanes hold values < 2^16, so the unsigned-saturating pack is exact.
    const __m128i packed =
        _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), packed);
  }
  f32_to_bf16_scalar(s + i, d + i, n - i);
}
#endif

#if defined(__F16C__)
inline void f16_to_f32_f16c(const f16* s, float* d, std::size_t n) noexcept {
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    _mm256_storeu_ps(d + i, _mm256_cvtph_ps(h));
  }
  f16_to_f32_scalar(s + i, d + i, n - i);
}
inline void f32_to_f16_f16c(const float* s, f16* d, std::size_t n) noexcept {
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), h);
  }
  f32_to_f16_scalar(s + i, d + i, n - i);
}
#endif

#if defined(__AVX512F__)
inline void bf16_to_f32_avx512(const bf16* s, float* d, std::size_t n) noexcept {
  std::size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i));
    const __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
    _mm512_storeu_si512(reinterpret_cast<void*>(d + i), w);
  }
  bf16_to_f32_scalar(s + i, d + i, n - i);
}

inline __m256i f32_to_bf16_lanes_avx512(__m512i u) noexcept {
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb);
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  const __m512i magnitude = _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff));
  const __mmask16 nan = _mm512_cmpgt_epi32_mask(magnitude, _mm512_set1_epi32(0x7f800000));
  const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, quiet));
}

inline void f32_to_bf16_avx512(const float* s, bf16* d, std::size_t n) noexcept {
  std::size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i u = _mm512_loadu_si512(reinterpret_cast<const void*>(s + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), f32_to_bf16_lanes_avx512(u));
  }
  f32_to_bf16_scalar(s + i, d + i, n - i);
}

inline void f16_to_f32_avx512(const f16* s, float* d, std::size_t n) noexcept {
  std::size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i));
    _mm512_storeu_ps(d + i, _mm512_cvtph_ps(h));
  }
  f16_to_f32_scalar(s + i, d + i, n - i);
}
inline void f32_to_f16_avx512(const float* s, f16* d, std::size_t n) noexcept {
  std::size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    // At -O0 g++'s _mm512_cvtps_ph is a macro that passes (__mmask16)-1: -Wsign-conversion.
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wsign-conversion"
#endif
    const __m256i h = _mm512_cvtps_ph(_mm512_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT);
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), h);
  }
  f32_to_f16_scalar(s + i, d + i, n - i);
}
#endif

#if defined(__AVX512BF16__) && defined(__AVX512F__)
inline void f32_to_bf16_avx512bf16(const float* s, bf16* d, std::size_t n) noexcept {
  const __m512i exp_bits = _mm512_set1_epi32(0x7f800000);
  const __m512i man_bits = _mm512_set1_epi32(0x007fffff);
  std::size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512i ua = _mm512_loadu_si512(reinterpret_cast<const void*>(s + i));
    const __m512i ub = _mm512_loadu_si512(reinterpret_cast<const void*>(s + i + 16));
    // Float subnormals (exponent 0, mantissa != 0): the instruction flushes them to zero.
    const auto subnormal = [&](__m512i u) {
      return static_cast<unsigned>(_mm512_testn_epi32_mask(u, exp_bits) &
                                   _mm512_test_epi32_mask(u, man_bits));
    };
    if ((subnormal(ua) | subnormal(ub)) != 0) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), f32_to_bf16_lanes_avx512(ua));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i + 16), f32_to_bf16_lanes_avx512(ub));
      continue;
    }
    // The first operand fills the upper 16 results, the second the lower 16.
    const __m512bh r = _mm512_cvtne2ps_pbh(_mm512_castsi512_ps(ub), _mm512_castsi512_ps(ua));
    std::memcpy(static_cast<void*>(d + i), &r, sizeof r);
  }
  f32_to_bf16_avx512(s + i, d + i, n - i);
}
#endif

/// One compiled set of bulk conversions (for tests and diagnostics).
struct kernels {
  const char* name;
  void (*bf16_to_f32)(const bf16*, float*, std::size_t) noexcept;
  void (*f32_to_bf16)(const float*, bf16*, std::size_t) noexcept;
  void (*f16_to_f32)(const f16*, float*, std::size_t) noexcept;
  void (*f32_to_f16)(const float*, f16*, std::size_t) noexcept;
};

inline constexpr kernels all_kernels[] = {
    {"scalar", bf16_to_f32_scalar, f32_to_bf16_scalar, f16_to_f32_scalar, f32_to_f16_scalar},
#if defined(__AVX2__)
#if defined(__F16C__)
    {"avx2+f16c", bf16_to_f32_avx2, f32_to_bf16_avx2, f16_to_f32_f16c, f32_to_f16_f16c},
#else
    {"avx2", bf16_to_f32_avx2, f32_to_bf16_avx2, f16_to_f32_scalar, f32_to_f16_scalar},
#endif
#endif
#if defined(__AVX512F__)
    {"avx512f", bf16_to_f32_avx512, f32_to_bf16_avx512, f16_to_f32_avx512, f32_to_f16_avx512},
#endif
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    {"avx512bf16", bf16_to_f32_avx512, f32_to_bf16_avx512bf16, f16_to_f32_avx512,
     f32_to_f16_avx512},
#endif
};

/// The fastest compiled set (the last one).
inline constexpr const kernels& best = all_kernels[std::size(all_kernels) - 1];

}  // namespace detail::cvt

namespace detail {
/// Every compiled conversion path, slowest first; the public functions use the last.
inline std::span<const cvt::kernels> conversion_kernels() noexcept {
  return cvt::all_kernels;
}
}  // namespace detail

/// dst[i] = to_float(src[i]) for i < n.
inline void to_float(const bf16* src, float* dst, std::size_t n) noexcept {
  detail::cvt::best.bf16_to_f32(src, dst, n);
}
/// dst[i] = to_float(src[i]) for i < n.
inline void to_float(const f16* src, float* dst, std::size_t n) noexcept {
  detail::cvt::best.f16_to_f32(src, dst, n);
}
/// dst[i] = bf16_from_float(src[i]) for i < n.
inline void from_float(const float* src, bf16* dst, std::size_t n) noexcept {
  detail::cvt::best.f32_to_bf16(src, dst, n);
}
/// dst[i] = f16_from_float(src[i]) for i < n.
inline void from_float(const float* src, f16* dst, std::size_t n) noexcept {
  detail::cvt::best.f32_to_f16(src, dst, n);
}

}  // namespace seqmix
