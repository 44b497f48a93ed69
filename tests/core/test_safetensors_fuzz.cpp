// SPDX-License-Identifier: MIT
// Fuzzing the safetensors reader: every truncation of a small valid file, seeded random byte
// flips, and seeded edits of the JSON header (numbers swapped for hostile ones, dtypes, keys,
// deleted and repeated characters), 12,000+ variants in all. Each variant is parsed and every
// tensor it yields is read in every way; only success or seqmix::io_error may come out (never
// another exception, a crash or, under ASan/UBSan, an over-read or undefined behaviour).
#include <cctype>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include <seqmix/core/safetensors.hpp>

using namespace seqmix;

namespace {

std::vector<char> base_image() {
  safetensors_writer w;
  tensor<float, 2> a({2, 3});
  for (index_t i = 0; i < a.size(); ++i) a[i] = float(i) - 2.5f;
  w.add("a", a);
  tensor<bf16, 1> b({5});
  for (index_t i = 0; i < b.size(); ++i) b[i] = bf16_from_float(float(i) * 3.0f);
  w.add("b", b);
  tensor<std::int64_t, 1> c({2});
  c[0] = -3;
  c[1] = 1 << 20;
  w.add("c", c);
  tensor<bool, 1> d({3});
  d[1] = true;
  w.add("d", d);
  tensor<f16, 2> e({1, 2});
  e[0] = f16_from_float(0.5f);
  w.add("e", e);
  tensor<double, 1> f({2}, 1e300);
  w.add("f", f);
  tensor<std::int32_t, 1> g({1}, 7);
  w.add("g", g);
  tensor<std::uint8_t, 1> h({2}, 200);
  w.add("h", h);
  w.set_metadata("format", "pt");
  return w.serialize();
}

// Reads everything a file offers; io_errors from single reads are expected outcomes.
template <class F>
void attempt(F&& f) {
  try {
    f();
  } catch (const io_error&) {
  }
}

template <class T, std::size_t R>
void read_view(const safetensors_file& file, const std::string& name) {
  attempt([&] {
    const auto v = file.view<T, R>(name);
    volatile std::size_t sink = 0;
    if (v.size() > 0) {
      const auto* bytes = reinterpret_cast<const unsigned char*>(v.data());
      sink = sink + bytes[0] + bytes[std::size_t(v.size()) * sizeof(T) - 1];
    }
  });
}

void exercise(const std::vector<char>& image) {
  const auto file = safetensors_file::parse(image, "fuzz");
  (void)file.metadata();
  for (const auto& name : file.names()) {
    const auto& info = file.info(name);
    (void)info;
    attempt([&] { (void)file.get_flat<float>(name); });
    attempt([&] { (void)file.get_flat<double>(name); });
    attempt([&] { (void)file.get_flat<bf16>(name); });
    attempt([&] { (void)file.get_flat<f16>(name); });
    attempt([&] { (void)file.get_flat<std::int32_t>(name); });
    attempt([&] { (void)file.get_flat<std::int64_t>(name); });
    attempt([&] { (void)file.get_flat<std::uint8_t>(name); });
    attempt([&] { (void)file.get<bool, 1>(name); });
    attempt([&] { (void)file.get<float, 2>(name); });
    read_view<float, 2>(file, name);
    read_view<bf16, 1>(file, name);
    read_view<std::int64_t, 1>(file, name);
    read_view<bool, 1>(file, name);
    read_view<f16, 2>(file, name);
    read_view<double, 1>(file, name);
    read_view<std::int32_t, 1>(file, name);
    read_view<std::uint8_t, 1>(file, name);
  }
}

struct tally {
  int ok = 0, rejected = 0, wrong = 0;
  std::string first_wrong;
};

void run(const std::vector<char>& image, tally& t) {
  try {
    exercise(image);
    ++t.ok;
  } catch (const io_error&) {
    ++t.rejected;
  } catch (const std::exception& e) {
    if (t.wrong++ == 0) t.first_wrong = e.what();
  }
}

std::vector<char> with_header(const std::string& header, const std::vector<char>& data) {
  std::vector<char> out(8 + header.size());
  const std::uint64_t n = header.size();
  std::memcpy(out.data(), &n, 8);
  std::memcpy(out.data() + 8, header.data(), header.size());
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

}  // namespace

TEST_CASE("safetensors fuzz: every truncation of a valid file is an io_error",
          "[core][safetensors][fuzz]") {
  const auto image = base_image();
  REQUIRE_NOTHROW(exercise(image));
  tally t;
  for (std::size_t len = 0; len < image.size(); ++len) {
    run(std::vector<char>(image.begin(), image.begin() + std::ptrdiff_t(len)), t);
  }
  INFO("first non-io_error: " << t.first_wrong);
  CHECK(t.wrong == 0);
  CHECK(t.ok == 0);  // the data section is fully indexed: any cut loses bytes of a tensor
  CHECK(t.rejected == int(image.size()));
  // Padding bytes appended are trailing unindexed bytes.
  auto longer = image;
  longer.push_back(0);
  CHECK_THROWS_AS(exercise(longer), io_error);
}

TEST_CASE("safetensors fuzz: seeded random byte flips and header edits",
          "[core][safetensors][fuzz]") {
  const auto image = base_image();
  std::uint64_t header_len = 0;
  std::memcpy(&header_len, image.data(), 8);
  const std::string header(image.begin() + 8, image.begin() + 8 + std::ptrdiff_t(header_len));
  const std::vector<char> data(image.begin() + 8 + std::ptrdiff_t(header_len), image.end());
  std::mt19937_64 rng(20261201);
  auto pick = [&](std::size_t n) { return std::size_t(rng() % n); };
  tally t;
  int variants = 0;

  // 1. Byte flips anywhere (mostly in the length field and header, where parsing happens).
  for (int i = 0; i < 6000; ++i) {
    auto v = image;
    const int flips = 1 + int(pick(3));
    for (int k = 0; k < flips; ++k) {
      const std::size_t at = pick(4) != 0 ? pick(8 + header_len) : pick(v.size());
      v[at] = static_cast<char>(pick(256));
    }
    run(v, t);
    ++variants;
  }

  // 2. Header edits, re-framed with the right length (so the parser sees the edited JSON).
  const char* numbers[] = {"0",
                           "1",
                           "3",
                           "7",
                           "24",
                           "-1",
                           "2147483648",
                           "4294967296",
                           "4611686018427387904",
                           "9223372036854775807",
                           "9223372036854775808",
                           "18446744073709551615",
                           "18446744073709551616",
                           "1e30",
                           "0.5",
                           "null",
                           "[]",
                           "{}",
                           "\"F32\""};
  const char* dtypes[] = {"F32", "F64", "BF16", "F16", "I32", "I64", "U8", "BOOL", "I8", "", "f32"};
  std::vector<std::size_t> digit_runs, dtype_values;
  for (std::size_t i = 0; i < header.size(); ++i) {
    if (std::isdigit(static_cast<unsigned char>(header[i])) &&
        (i == 0 || !std::isdigit(static_cast<unsigned char>(header[i - 1])))) {
      digit_runs.push_back(i);
    }
  }
  for (std::size_t p = header.find("\"dtype\":\""); p != std::string::npos;
       p = header.find("\"dtype\":\"", p + 1)) {
    dtype_values.push_back(p + 9);
  }
  REQUIRE(digit_runs.size() > 20);
  REQUIRE(dtype_values.size() == 8);
  for (int i = 0; i < 6000; ++i) {
    std::string h = header;
    const int edits = 1 + int(pick(2));
    for (int k = 0; k < edits; ++k) {
      switch (pick(6)) {
        case 0:
        case 1: {  // a number for another (offsets, shape extents)
          const std::size_t at = digit_runs[pick(digit_runs.size())];
          if (at >= h.size()) break;
          std::size_t end = at;
          while (end < h.size() && std::isdigit(static_cast<unsigned char>(h[end]))) ++end;
          h.replace(at, end - at, numbers[pick(std::size(numbers))]);
          break;
        }
        case 2: {  // another dtype
          const std::size_t at = dtype_values[pick(dtype_values.size())];
          const std::size_t end = h.find('"', at);
          if (at < h.size() && end != std::string::npos) {
            h.replace(at, end - at, dtypes[pick(std::size(dtypes))]);
          }
          break;
        }
        case 3:  // delete a character
          if (!h.empty()) h.erase(pick(h.size()), 1);
          break;
        case 4: {  // repeat a piece (duplicates keys, entries, brackets)
          const std::size_t at = pick(h.size());
          const std::size_t len = 1 + pick(40);
          h.insert(at, h.substr(at, len));
          break;
        }
        default: {  // rename an entry to another one's name (duplicate names)
          char needle[] = "\"a\":";
          needle[1] = char('a' + pick(8));
          const std::size_t at = h.find(needle);
          if (at != std::string::npos) h[at + 1] = char('a' + pick(8));
          break;
        }
      }
    }
    auto v = with_header(h, data);
    if (pick(8) == 0) {  // sometimes also a wrong length field
      const std::uint64_t n = header_len + pick(64) - 32;
      std::memcpy(v.data(), &n, 8);
    }
    run(v, t);
    ++variants;
  }
  INFO("first non-io_error: " << t.first_wrong);
  CHECK(variants >= 12000);
  CHECK(t.wrong == 0);
  CHECK(t.rejected > variants / 2);  // most edits break the file
  CHECK(t.ok > 100);                 // some survive (e.g. another dtype of the same size)
}
