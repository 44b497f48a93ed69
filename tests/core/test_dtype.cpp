// SPDX-License-Identifier: MIT
// dtype tags and the bf16 / f16 conversions: exhaustive over all 65,536 bit patterns of each
// 16-bit type, float -> 16-bit rounding checked against an independent reference (nearest value
// found by search in the sorted table of all finite values, ties by even bits), and every
// compiled bulk-conversion path bitwise equal to the scalar conversion at odd lengths/offsets.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include <seqmix/core/dtype.hpp>

using namespace seqmix;

namespace {

std::uint32_t bits_of(float f) {
  return std::bit_cast<std::uint32_t>(f);
}

// Independent widening: the value from its fields, in double.
double ref_value(std::uint16_t h, int exp_bits, int man_bits) {
  const int bias = (1 << (exp_bits - 1)) - 1;
  const int e = (h >> man_bits) & ((1 << exp_bits) - 1);
  const int m = h & ((1 << man_bits) - 1);
  const double sign = (h >> 15) ? -1.0 : 1.0;
  if (e == (1 << exp_bits) - 1) {
    return m ? std::numeric_limits<double>::quiet_NaN()
             : sign * std::numeric_limits<double>::infinity();
  }
  if (e == 0) return sign * std::ldexp(double(m), 1 - bias - man_bits);
  return sign * std::ldexp(double((1 << man_bits) + m), e - bias - man_bits);
}

// Nearest-even rounding of x into a 16-bit format whose non-negative finite values, in bit
// order, are `table` (ascending), and whose overflow threshold value (the value inf stands for
// in the rounding) is `beyond`. Returns the bits (inf = table.size()).
std::uint16_t ref_round(float x, const std::vector<double>& table, double beyond) {
  const std::uint16_t sign = std::signbit(x) ? 0x8000 : 0;
  const double ax = std::fabs(double(x));
  const auto inf_bits = static_cast<std::uint16_t>(table.size());
  if (std::isinf(ax)) return static_cast<std::uint16_t>(sign | inf_bits);
  const auto it = std::upper_bound(table.begin(), table.end(), ax);
  const auto lo = static_cast<std::size_t>(it - table.begin()) - 1;  // table[lo] <= ax
  const double lo_v = table[lo];
  const double hi_v = lo + 1 < table.size() ? table[lo + 1] : beyond;
  const double mid = (lo_v + hi_v) / 2;  // exact: both have few significant bits
  std::size_t pick = lo;
  if (ax > mid || (ax == mid && (lo & 1))) pick = lo + 1;
  return static_cast<std::uint16_t>(sign | pick);
}

const std::vector<double>& bf16_table() {
  static const std::vector<double> t = [] {
    std::vector<double> v;
    for (std::uint32_t h = 0; h < 0x7f80; ++h) v.push_back(ref_value(std::uint16_t(h), 8, 7));
    return v;
  }();
  return t;
}
const std::vector<double>& f16_table() {
  static const std::vector<double> t = [] {
    std::vector<double> v;
    for (std::uint32_t h = 0; h < 0x7c00; ++h) v.push_back(ref_value(std::uint16_t(h), 5, 10));
    return v;
  }();
  return t;
}

// Float bit patterns that stress rounding: every bf16 upper half with low halves at and around
// the tie; every f16 value, its midpoints and their neighbours; float subnormals, NaNs, inf,
// overflow thresholds; and seeded random patterns.
std::vector<float> rounding_patterns() {
  std::vector<std::uint32_t> u;
  std::mt19937 rng(12345);
  for (std::uint32_t hi = 0; hi < 0x10000; ++hi) {
    for (std::uint32_t lo : {0x0000u, 0x0001u, 0x7fffu, 0x8000u, 0x8001u, 0xffffu}) {
      u.push_back(hi << 16 | lo);
    }
    u.push_back(hi << 16 | (rng() & 0xffffu));
  }
  const auto& t = f16_table();
  for (std::size_t i = 0; i < t.size(); ++i) {
    const double next = i + 1 < t.size() ? t[i + 1] : 65536.0;
    const std::uint32_t mid = bits_of(float((t[i] + next) / 2));
    const std::uint32_t at = bits_of(float(t[i]));
    for (std::uint32_t b : {mid - 2, mid - 1, mid, mid + 1, mid + 2, at, at + 1}) {
      u.push_back(b);
      u.push_back(b | 0x80000000u);
    }
  }
  for (std::uint32_t b :
       {0x00000001u, 0x00000002u, 0x003fffffu, 0x00400000u, 0x007fffffu, 0x00800000u, 0x7f7fffffu,
        0x7f7f7fffu, 0x7f7f8000u, 0x7f800000u, 0x7f800001u, 0x7fc00000u, 0x7fbfffffu, 0x7fffffffu,
        0x7f802000u, 0x477fefffu, 0x477ff000u, 0x477ff001u, 0x47800000u, 0x33000000u, 0x33000001u,
        0x337fffffu, 0x32ffffffu, 0x387fffffu, 0x38800000u}) {
    u.push_back(b);
    u.push_back(b | 0x80000000u);
  }
  for (int i = 0; i < 200000; ++i) u.push_back(static_cast<std::uint32_t>(rng()));
  std::vector<float> f(u.size());
  for (std::size_t i = 0; i < u.size(); ++i) f[i] = std::bit_cast<float>(u[i]);
  return f;
}

}  // namespace

TEST_CASE("dtype: names, sizes and parsing of safetensors dtype strings", "[core][dtype]") {
  const char* names[] = {"F32", "F64", "BF16", "F16", "I32", "I64", "U8", "BOOL"};
  const std::size_t sizes[] = {4, 8, 2, 2, 4, 8, 1, 1};
  for (std::size_t i = 0; i < std::size(all_dtypes); ++i) {
    CHECK(std::string(dtype_name(all_dtypes[i])) == names[i]);
    CHECK(dtype_size(all_dtypes[i]) == sizes[i]);
    REQUIRE(parse_dtype(names[i]).has_value());
    CHECK(*parse_dtype(names[i]) == all_dtypes[i]);
  }
  for (const char* bad : {"", "f32", "F8_E4M3", "I8", "U16", "BF16 ", "bool"}) {
    CHECK_FALSE(parse_dtype(bad).has_value());
  }
  CHECK_FALSE(parse_dtype(std::string_view("F32\0", 4)).has_value());
  CHECK(is_floating_point(dtype::bf16));
  CHECK_FALSE(is_floating_point(dtype::i64));
  STATIC_REQUIRE(dtype_of<float>() == dtype::f32);
  STATIC_REQUIRE(dtype_of<const double>() == dtype::f64);
  STATIC_REQUIRE(dtype_of<bf16>() == dtype::bf16);
  STATIC_REQUIRE(dtype_of<f16>() == dtype::f16);
  STATIC_REQUIRE(dtype_of<std::int32_t>() == dtype::i32);
  STATIC_REQUIRE(dtype_of<std::int64_t>() == dtype::i64);
  STATIC_REQUIRE(dtype_of<std::uint8_t>() == dtype::u8);
  STATIC_REQUIRE(dtype_of<bool>() == dtype::boolean);
  STATIC_REQUIRE(to_float(bf16{0x3f80}) == 1.0f);
  STATIC_REQUIRE(to_float(f16{0x3c00}) == 1.0f);
  STATIC_REQUIRE(bf16_from_float(1.0f).bits == 0x3f80);
  STATIC_REQUIRE(f16_from_float(-2.0f).bits == 0xc000);
}

TEST_CASE("dtype: all 65,536 bf16 patterns widen exactly and round-trip", "[core][dtype]") {
  int bad = 0;
  for (std::uint32_t h = 0; h < 0x10000; ++h) {
    const bf16 x{static_cast<std::uint16_t>(h)};
    const float f = to_float(x);
    const double ref = ref_value(x.bits, 8, 7);
    bool ok = bits_of(f) == h << 16 && bits_of(static_cast<float>(x)) == bits_of(f);
    if (std::isnan(ref)) {
      ok = ok && std::isnan(f) && bf16_from_float(f).bits == (h | 0x40u);  // back: quieted
    } else {
      ok = ok && double(f) == ref && std::signbit(f) == bool(h >> 15);
      ok = ok && bf16_from_float(f).bits == h;
    }
    if (!ok && bad++ < 5) FAIL_CHECK("bf16 pattern 0x" << std::hex << h);
  }
  CHECK(bad == 0);
}

TEST_CASE("dtype: all 65,536 f16 patterns widen exactly and round-trip", "[core][dtype]") {
  int bad = 0;
  for (std::uint32_t h = 0; h < 0x10000; ++h) {
    const f16 x{static_cast<std::uint16_t>(h)};
    const float f = to_float(x);
    const double ref = ref_value(x.bits, 5, 10);
    bool ok;
    if (std::isnan(ref)) {
      // NaN: quiet, sign and payload kept (as vcvtph2ps); back: the same quiet NaN.
      ok =
          std::isnan(f) && bits_of(f) == (((h & 0x8000u) << 16) | 0x7fc00000u | (h & 0x3ffu) << 13);
      ok = ok && f16_from_float(f).bits == (h | 0x200u);
    } else {
      ok = double(f) == ref && std::signbit(f) == bool(h >> 15) && static_cast<float>(x) == f;
      ok = ok && f16_from_float(f).bits == h;
    }
    if (!ok && bad++ < 5) FAIL_CHECK("f16 pattern 0x" << std::hex << h);
  }
  CHECK(bad == 0);
}

TEST_CASE("dtype: float -> bf16 / f16 rounds to nearest even (reference search)", "[core][dtype]") {
  const std::vector<float> xs = rounding_patterns();
  INFO(xs.size() << " float patterns");
  int bad_b = 0, bad_h = 0;
  for (float x : xs) {
    const std::uint32_t u = bits_of(x);
    std::uint16_t want_b, want_h;
    if (std::isnan(x)) {
      want_b = static_cast<std::uint16_t>((u >> 16) | 0x40u);
      want_h = static_cast<std::uint16_t>(((u >> 16) & 0x8000u) | 0x7e00u | ((u >> 13) & 0x3ffu));
    } else {
      want_b = ref_round(x, bf16_table(), std::ldexp(1.0, 128));
      want_h = ref_round(x, f16_table(), 65536.0);
    }
    if (bf16_from_float(x).bits != want_b && bad_b++ < 5) {
      FAIL_CHECK("bf16 of float 0x" << std::hex << u << ": got 0x" << bf16_from_float(x).bits
                                    << ", want 0x" << want_b);
    }
    if (f16_from_float(x).bits != want_h && bad_h++ < 5) {
      FAIL_CHECK("f16 of float 0x" << std::hex << u << ": got 0x" << f16_from_float(x).bits
                                   << ", want 0x" << want_h);
    }
  }
  CHECK(bad_b == 0);
  CHECK(bad_h == 0);
  // A few by hand: ties to even, overflow, subnormals.
  CHECK(bf16_from_float(std::bit_cast<float>(0x3f808000u)).bits == 0x3f80);  // tie, even down
  CHECK(bf16_from_float(std::bit_cast<float>(0x3f818000u)).bits == 0x3f82);  // tie, even up
  CHECK(bf16_from_float(std::bit_cast<float>(0x7f7f8000u)).bits == 0x7f80);  // to inf
  CHECK(bf16_from_float(std::bit_cast<float>(0x00008000u)).bits == 0x0000);  // subnormal tie
  CHECK(bf16_from_float(std::bit_cast<float>(0x00018000u)).bits == 0x0002);
  CHECK(f16_from_float(65504.0f).bits == 0x7bff);
  CHECK(f16_from_float(65519.99f).bits == 0x7bff);
  CHECK(f16_from_float(65520.0f).bits == 0x7c00);
  CHECK(f16_from_float(std::ldexp(1.0f, -24)).bits == 0x0001);
  CHECK(f16_from_float(std::ldexp(1.0f, -25)).bits == 0x0000);  // tie to even (zero)
  CHECK(f16_from_float(std::ldexp(3.0f, -25)).bits == 0x0002);  // 1.5 units: tie to even (2)
  CHECK(f16_from_float(-std::ldexp(1.0f, -26)).bits == 0x8000);
  CHECK(f16_from_float(std::numeric_limits<float>::infinity()).bits == 0x7c00);
}

TEST_CASE("dtype: every compiled bulk conversion equals the scalar one, at odd lengths",
          "[core][dtype]") {
  const std::vector<float> xs = rounding_patterns();
  std::vector<bf16> all_b(0x10000);
  std::vector<f16> all_h(0x10000);
  for (std::uint32_t h = 0; h < 0x10000; ++h) {
    all_b[h].bits = static_cast<std::uint16_t>(h);
    all_h[h].bits = static_cast<std::uint16_t>(h);
  }
  // Put float subnormals between normal values, so the AVX-512 BF16 path meets mixed blocks.
  std::vector<float> mixed = xs;
  for (std::size_t i = 0; i < mixed.size(); i += 97) mixed[i] = std::bit_cast<float>(0x00012345u);
  for (const auto& k : detail::conversion_kernels()) {
    INFO("kernel set " << k.name);
    for (const std::vector<float>* in : {&xs, static_cast<const std::vector<float>*>(&mixed)}) {
      std::vector<bf16> b(in->size());
      std::vector<f16> h(in->size());
      k.f32_to_bf16(in->data(), b.data(), in->size());
      k.f32_to_f16(in->data(), h.data(), in->size());
      std::size_t bad = 0;
      for (std::size_t i = 0; i < in->size(); ++i) {
        if (b[i].bits != bf16_from_float((*in)[i]).bits) ++bad;
        if (h[i].bits != f16_from_float((*in)[i]).bits) ++bad;
      }
      CHECK(bad == 0);
    }
    std::vector<float> fb(0x10000), fh(0x10000);
    k.bf16_to_f32(all_b.data(), fb.data(), fb.size());
    k.f16_to_f32(all_h.data(), fh.data(), fh.size());
    std::size_t bad = 0;
    for (std::uint32_t i = 0; i < 0x10000; ++i) {
      if (bits_of(fb[i]) != bits_of(to_float(all_b[i]))) ++bad;
      if (bits_of(fh[i]) != bits_of(to_float(all_h[i]))) ++bad;
    }
    CHECK(bad == 0);
    // Odd lengths and offsets: exact results, nothing written past n.
    for (std::size_t off = 0; off < 3; ++off) {
      for (std::size_t n = 0; n <= 70; ++n) {
        std::vector<bf16> ob(n + 4, bf16{0xdead});
        std::vector<f16> oh(n + 4, f16{0xbeef});
        std::vector<float> of(n + 4, 7.0f), og(n + 4, 7.0f);
        k.f32_to_bf16(mixed.data() + 1000 + off, ob.data() + 1, n);
        k.f32_to_f16(mixed.data() + 1000 + off, oh.data() + 1, n);
        k.bf16_to_f32(all_b.data() + 0x7f70 + off, of.data() + 1, n);
        k.f16_to_f32(all_h.data() + 0x7bf0 + off, og.data() + 1, n);
        bool ok = ob[0].bits == 0xdead && oh[0].bits == 0xbeef && of[0] == 7.0f && og[0] == 7.0f;
        for (std::size_t i = 0; i < n; ++i) {
          ok = ok && ob[i + 1].bits == bf16_from_float(mixed[1000 + off + i]).bits;
          ok = ok && oh[i + 1].bits == f16_from_float(mixed[1000 + off + i]).bits;
          ok = ok && bits_of(of[i + 1]) == bits_of(to_float(all_b[0x7f70 + off + i]));
          ok = ok && bits_of(og[i + 1]) == bits_of(to_float(all_h[0x7bf0 + off + i]));
        }
        for (std::size_t i = n + 1; i < n + 4; ++i) {
          ok = ok && ob[i].bits == 0xdead && oh[i].bits == 0xbeef && of[i] == 7.0f && og[i] == 7.0f;
        }
        if (!ok) FAIL_CHECK("length " << n << " offset " << off);
      }
    }
  }
#if defined(__AVX512BF16__) && defined(__AVX512F__)
  CHECK(std::string(detail::conversion_kernels().back().name) == "avx512bf16");
#endif
  // The public entry points are the best path.
  std::vector<bf16> b(xs.size());
  from_float(xs.data(), b.data(), xs.size());
  std::vector<float> back(xs.size());
  to_float(b.data(), back.data(), b.size());
  std::size_t bad = 0;
  for (std::size_t i = 0; i < xs.size(); ++i) {
    if (bits_of(back[i]) != bits_of(to_float(bf16_from_float(xs[i])))) ++bad;
  }
  CHECK(bad == 0);
}
