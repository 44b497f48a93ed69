// SPDX-License-Identifier: MIT
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include <seqmix/core/io/checkpoint.hpp>
#include <seqmix/core/safetensors.hpp>

#include "golden.hpp"
#include "test_safetensors_util.hpp"

using namespace seqmix;
using Catch::Matchers::Contains;

using namespace seqmix::testing::io;

TEST_CASE("safetensors: write then read round-trips F32, F64, I64 and metadata",
          "[core][safetensors]") {
  tensor<float, 2> a({2, 3});
  tensor<double, 3> b({1, 2, 2});
  tensor<std::int64_t, 1> c({4});
  for (index_t i = 0; i < a.size(); ++i) a[i] = 0.5f * float(i);
  for (index_t i = 0; i < b.size(); ++i) b[i] = -1.25 * double(i);
  for (index_t i = 0; i < c.size(); ++i) c[i] = (std::int64_t(1) << 40) + i;
  safetensors_writer w;
  w.add("a", a);
  w.add("b", b);
  w.add("c", c);
  w.set_metadata("commit", "abc");
  const auto path = (std::filesystem::temp_directory_path() / "seqmix_rt.safetensors").string();
  w.save(path);
  auto f = safetensors_file::load(path);
  CHECK(f.names().size() == 3);
  CHECK(f.metadata().at("commit") == "abc");
  CHECK(f.info("b").type == dtype::f64);
  auto a2 = f.get<float, 2>("a");
  auto b2 = f.get<double, 3>("b");
  auto c2 = f.get<std::int64_t, 1>("c");
  CHECK(a2.shape() == a.shape());
  for (index_t i = 0; i < a.size(); ++i) CHECK(a2[i] == a[i]);
  for (index_t i = 0; i < b.size(); ++i) CHECK(b2[i] == b[i]);
  for (index_t i = 0; i < c.size(); ++i) CHECK(c2[i] == c[i]);
  auto b_as_float = f.get<float, 3>("b");  // converting read
  CHECK(b_as_float(0, 1, 1) == -3.75f);
  CHECK_THROWS_WITH((f.get<float, 2>("b")), Contains("rank 3"));
  CHECK_THROWS_WITH((f.get<float, 2>("nope")), Contains("no tensor named 'nope'"));
  std::filesystem::remove(path);
}

TEST_CASE("safetensors: malformed and truncated files raise io_error", "[core][safetensors]") {
  CHECK_THROWS_WITH(safetensors_file::parse({'a', 'b'}), Contains("shorter than"));
  CHECK_THROWS_WITH(safetensors_file::parse(image_with_header("{}", 0, 1000)),
                    Contains("exceeds the file size"));
  CHECK_THROWS_WITH(safetensors_file::parse(image_with_header("{\"a\": [1,", 0)),
                    Contains("not valid JSON"));
  CHECK_THROWS_WITH(safetensors_file::parse(image_with_header("[]", 0)),
                    Contains("not a JSON object"));
  const std::string ok = R"({"x":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}})";
  CHECK_NOTHROW(safetensors_file::parse(image_with_header(ok, 16)));
  // truncated data section
  CHECK_THROWS_WITH(safetensors_file::parse(image_with_header(ok, 12)), Contains("truncated"));
  // size does not match dtype and shape
  CHECK_THROWS_WITH(safetensors_file::parse(image_with_header(
                        R"({"x":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}})", 16)),
                    Contains("need 12"));
  CHECK_THROWS_WITH(safetensors_file::parse(image_with_header(
                        R"({"x":{"dtype":"Q4","shape":[3],"data_offsets":[0,12]}})", 12)),
                    Contains("unsupported dtype"));
  CHECK_THROWS_WITH(safetensors_file::parse(image_with_header(
                        R"({"x":{"dtype":"F32","shape":[-3],"data_offsets":[0,12]}})", 12)),
                    Contains("non-negative"));
  CHECK_THROWS_WITH(safetensors_file::parse(image_with_header(R"({"x":{"dtype":"F32"}})", 0)),
                    Contains("no shape"));
  CHECK_THROWS_WITH(safetensors_file::load("/nonexistent/file.safetensors"),
                    Contains("cannot open"));
}

TEST_CASE("golden: the reference folder is present and every file parses", "[core][golden]") {
  INFO("golden folder: " << testing::golden::dir());
  REQUIRE(testing::golden::available());
  for (const char* stem : {"inputs", "fla_scalar_decay", "fla_vector_decay", "fla_delta",
                           "mamba2_ssd", "softmax_attn"}) {
    const auto& f = testing::golden::file(stem);
    CHECK(!f.names().empty());
  }
  const auto& in = testing::golden::file("inputs");
  auto q = in.get<float, 4>("case3.q");
  CHECK(q.shape() == shape_t<4>{2, 100, 2, 32});
}

TEST_CASE("safetensors: every dtype round-trips through a mapped file, bit for bit",
          "[core][safetensors]") {
  tensor<float, 2> f32({3, 5});
  tensor<double, 1> f64({7});
  tensor<bf16, 2> b16({2, 9});
  tensor<f16, 3> h16({1, 3, 3});
  tensor<std::int32_t, 1> i32({5});
  tensor<std::int64_t, 2> i64({2, 2});
  tensor<std::uint8_t, 1> u8({11});
  tensor<bool, 1> flags({6});
  for (index_t i = 0; i < f32.size(); ++i) f32[i] = 0.1f * float(i) - 0.7f;
  for (index_t i = 0; i < f64.size(); ++i) f64[i] = 1e300 / double(i + 1);
  for (index_t i = 0; i < b16.size(); ++i) b16[i] = bf16_from_float(float(i) * -1.5f + 0.3f);
  for (index_t i = 0; i < h16.size(); ++i) h16[i] = f16_from_float(float(i) / 3.0f);
  for (index_t i = 0; i < i32.size(); ++i) i32[i] = std::int32_t(-2147483647 + i);
  for (index_t i = 0; i < i64.size(); ++i) i64[i] = (std::int64_t(1) << 62) - i;
  for (index_t i = 0; i < u8.size(); ++i) u8[i] = std::uint8_t(250 + i % 6);
  for (index_t i = 0; i < flags.size(); ++i) flags[i] = (i % 3) == 1;
  safetensors_writer w;
  w.add("f32", f32);
  w.add("f64", f64);
  w.add("bf16", b16);
  w.add("f16", h16);
  w.add("i32", i32);
  w.add("i64", i64);
  w.add("u8", u8);
  w.add("bool", flags);
  w.add_as("f32_as_bf16", f32, dtype::bf16);
  w.add_as("f32_as_f16", f32, dtype::f16);
  w.add_as("f64_as_f32", f64, dtype::f32);
  w.add(any_tensor("empty", dtype::f32, {0, 4}));
  w.add(any_tensor("scalar", dtype::i64, {}));
  w.set_metadata("format", "pt");
  const auto dir = temp_dir("roundtrip");
  const std::string path = (dir / "all.safetensors").string();
  w.save(path);
  const auto f = safetensors_file::load(path);
  CHECK(f.is_mapped());
  CHECK(f.size() == 13);
  CHECK(f.data_offset() % 8 == 0);
  CHECK(f.metadata().at("format") == "pt");
  // The image in memory is the same file.
  const auto img = w.serialize();
  CHECK(safetensors_file::parse(img).names() == f.names());
  CHECK(std::filesystem::file_size(path) == img.size());

  auto same_bits = [](const auto& want, const auto& got) {
    REQUIRE(got.size() == want.size());
    return std::memcmp(want.data(), got.data(), std::size_t(want.size()) * sizeof(want[0])) == 0;
  };
  CHECK(f.info("f32").type == dtype::f32);
  CHECK(f.info("bf16").type == dtype::bf16);
  CHECK(f.info("bool").type == dtype::boolean);
  CHECK(f.info("f16").shape == std::vector<index_t>{1, 3, 3});
  CHECK(same_bits(f32, f.get<float, 2>("f32")));
  CHECK(same_bits(f64, f.get<double, 1>("f64")));
  CHECK(same_bits(b16, f.get<bf16, 2>("bf16")));
  CHECK(same_bits(h16, f.get<f16, 3>("f16")));
  CHECK(same_bits(i32, f.get<std::int32_t, 1>("i32")));
  CHECK(same_bits(i64, f.get<std::int64_t, 2>("i64")));
  CHECK(same_bits(u8, f.get<std::uint8_t, 1>("u8")));
  CHECK(same_bits(flags, f.get<bool, 1>("bool")));
  // Zero-copy views point into the mapping and hold the same values.
  const auto vb = f.view<bf16, 2>("bf16");
  CHECK(vb.shape() == b16.shape());
  for (index_t i = 0; i < b16.size(); ++i) CHECK(vb.data()[i].bits == b16[i].bits);
  const auto vbool = f.view<bool, 1>("bool");
  for (index_t i = 0; i < flags.size(); ++i) CHECK(vbool.data()[i] == flags[i]);
  // Converting reads: bf16/f16 widen exactly, rounding writes round to nearest even.
  const auto bf = f.get<float, 2>("bf16");
  for (index_t i = 0; i < b16.size(); ++i) CHECK(bf[i] == to_float(b16[i]));
  const auto rb = f.get<bf16, 2>("f32_as_bf16");
  const auto rh = f.get<f16, 2>("f32_as_f16");
  for (index_t i = 0; i < f32.size(); ++i) {
    CHECK(rb[i].bits == bf16_from_float(f32[i]).bits);
    CHECK(rh[i].bits == f16_from_float(f32[i]).bits);
  }
  CHECK(f.get<bf16, 2>("f32")[3].bits == bf16_from_float(f32[3]).bits);  // F32 read as bf16
  const auto d32 = f.get_flat<float>("f64_as_f32");
  for (index_t i = 0; i < f64.size(); ++i) CHECK(d32[std::size_t(i)] == float(f64[i]));
  CHECK(f.get_flat<double>("i64")[1] == double((std::int64_t(1) << 62) - 1));
  CHECK(f.get_flat<std::int64_t>("i32")[0] == -2147483647);
  CHECK(f.get_flat<float>("bool") == std::vector<float>{0, 1, 0, 0, 1, 0});
  CHECK(f.get_flat<std::int32_t>("u8")[5] == 255);
  CHECK(f.info("empty").numel == 0);
  CHECK(f.get<float, 2>("empty").size() == 0);
  CHECK(f.get_flat<std::int64_t>("scalar") == std::vector<std::int64_t>{0});
  CHECK(f.at("scalar").rank() == 0);
  std::filesystem::remove_all(dir);
}

TEST_CASE("safetensors: structural malformations are io_errors naming file and entry",
          "[core][safetensors]") {
  // offsets out of range
  CHECK_THAT(parse_error(R"({"x":{"dtype":"F32","shape":[4],"data_offsets":[0,1000]}})", 16),
             Contains("'<memory>'") && Contains("entry 'x'") && Contains("outside the data"));
  CHECK_THAT(parse_error(R"({"x":{"dtype":"F32","shape":[0],"data_offsets":[9,8]}})", 16),
             Contains("outside the data"));
  // overlapping entries
  CHECK_THAT(parse_error(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},
                             "b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}})",
                         24),
             Contains("entry 'b' [8, 24) overlaps entry 'a' [0, 16)"));
  CHECK_THAT(parse_error(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},
                             "b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                         8),
             Contains("overlaps"));
  // a hole, trailing bytes
  CHECK_THAT(parse_error(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},
                             "b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}})",
                         20),
             Contains("bytes [8, 12) of the data section belong to no tensor") && Contains("'b'"));
  CHECK_THAT(parse_error(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12),
             Contains("bytes [0, 4)"));
  CHECK_THAT(parse_error(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 12),
             Contains("trailing unindexed bytes") && Contains("[8, 12)"));
  CHECK_THAT(parse_error("{}", 3), Contains("trailing unindexed bytes"));
  // empty tensors may share an offset with their neighbours
  CHECK(parse_error(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},
                        "b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},
                        "c":{"dtype":"I64","shape":[3,0],"data_offsets":[8,8]}})",
                    8) == "NO EXCEPTION");
  // element or byte counts that overflow (issue 20: 4 * 2^62 wraps to 0 bytes)
  CHECK_THAT(
      parse_error(R"({"x":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,0]}})", 0),
      Contains("overflows") && Contains("entry 'x'"));
  CHECK_THAT(parse_error(
                 R"({"x":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,0]}})", 0),
             Contains("overflows"));
  CHECK_THAT(
      parse_error(
          R"({"x":{"dtype":"BOOL","shape":[2,4611686018427387904,2],"data_offsets":[0,0]}})", 0),
      Contains("overflows"));
  CHECK_THAT(
      parse_error(R"({"x":{"dtype":"F32","shape":[9223372036854775808],"data_offsets":[0,0]}})", 0),
      Contains("not non-negative integers"));
  CHECK_THAT(parse_error(
                 R"({"x":{"dtype":"F32","shape":[18446744073709551616],"data_offsets":[0,0]}})", 0),
             Contains("not non-negative integers"));
  CHECK_THAT(parse_error(R"({"x":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", 8),
             Contains("not non-negative integers"));
  CHECK(
      parse_error(
          R"({"x":{"dtype":"F32","shape":[0,4611686018427387904,4611686018427387904],"data_offsets":[0,0]}})",
          0) == "NO EXCEPTION");  // zero elements: a valid empty tensor
  // duplicate names (nlohmann would keep the last silently), at every level
  CHECK_THAT(parse_error(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},
                             "x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                         8),
             Contains("the key 'x' twice"));
  CHECK_THAT(
      parse_error(R"({"x":{"dtype":"F32","dtype":"F64","shape":[1],"data_offsets":[0,4]}})", 4),
      Contains("the key 'dtype' twice"));
  CHECK_THAT(parse_error(R"({"__metadata__":{"k":"a","k":"b"}})", 0), Contains("'k' twice"));
  // keys that repeat in different objects are fine
  CHECK(parse_error(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},
                        "b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                    8) == "NO EXCEPTION");
  // other bad headers
  CHECK_THAT(parse_error("", 0), Contains("not valid JSON"));
  CHECK_THAT(parse_error(R"({"x":1})", 0), Contains("entry 'x' is not an object"));
  CHECK_THAT(parse_error(R"({"x":{"dtype":"F32","shape":[1]}})", 4), Contains("no data_offsets"));
  CHECK_THAT(parse_error(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}})", 4),
             Contains("no data_offsets"));
  CHECK_THAT(parse_error(R"({"x":{"dtype":7,"shape":[1],"data_offsets":[0,4]}})", 4),
             Contains("no dtype"));
  CHECK_THAT(parse_error(R"({"__metadata__":{"k":3}})", 0), Contains("is not a string"));
  CHECK_THAT(parse_error(R"({"__metadata__":[]})", 0), Contains("__metadata__ is not an object"));
  CHECK_THAT(parse_error(R"({"a":"\u00ff\xff"})", 0), Contains("not valid JSON"));
  CHECK_THAT(parse_error(std::string(1000, '[') + std::string(1000, ']'), 0),
             Contains("nested deeper than 64"));
  CHECK_THAT(parse_error("{\"a\":" + std::string(100000, '[') + std::string(100000, ']') + "}", 0),
             Contains("nested deeper than 64"));
  CHECK_THAT(io_error_of([] {
               (void)safetensors_file::parse(std::vector<char>(7, 0), "seven.safetensors");
             }),
             Contains("'seven.safetensors'") && Contains("shorter than the 8-byte"));
  CHECK_THAT(io_error_of([] {
               (void)safetensors_file::parse(image_with_header("{}", 0, ~std::uint64_t(0)));
             }),
             Contains("exceeds the file size"));
}

TEST_CASE("safetensors: asking wrongly is an io_error naming the tensor, dtype and rank",
          "[core][safetensors]") {
  safetensors_writer w;
  tensor<float, 2> a({2, 3}, 1.5f);
  w.add("a", a);
  tensor<double, 1> bad({6});
  const double specials[] = {std::numeric_limits<double>::quiet_NaN(), 1e300, -1e300, 2.5,
                             std::numeric_limits<double>::infinity(),  -7.0};
  for (index_t i = 0; i < 6; ++i) bad[i] = specials[i];
  w.add("bad", bad);
  tensor<std::uint8_t, 1> one({1}, 3);
  w.add("u8", one);  // puts "f" one byte off alignment
  tensor<float, 1> f({2}, 2.0f);
  w.add("z.f", f);
  const auto file = safetensors_file::parse(w.serialize(), "w.safetensors");
  CHECK_THAT(io_error_of([&] { (void)file.view<bf16, 2>("a"); }),
             Contains("safetensors_file::view") && Contains("'w.safetensors'") &&
                 Contains("tensor 'a'") && Contains("expected dtype BF16 and rank 2") &&
                 Contains("found F32 and rank 2"));
  CHECK_THAT(io_error_of([&] { (void)file.view<float, 3>("a"); }),
             Contains("expected dtype F32 and rank 3, found F32 and rank 2 [2, 3]"));
  CHECK_THAT(io_error_of([&] { (void)file.get<float, 1>("a"); }),
             Contains("safetensors_file::get") && Contains("rank 2, expected rank 1"));
  CHECK_THAT(io_error_of([&] { (void)file.get_flat<float>("nope"); }),
             Contains("safetensors_file::get_flat") && Contains("no tensor named 'nope'"));
  CHECK_THAT(io_error_of([&] { (void)file.info("nope"); }), Contains("no tensor named 'nope'"));
  // misaligned data: a view would be undefined behaviour, so it is refused; get copies.
  CHECK_THAT(io_error_of([&] { (void)file.view<float, 1>("z.f"); }), Contains("not aligned"));
  CHECK(file.get<float, 1>("z.f")(1) == 2.0f);
  // F64 NaN / +-1e300 / inf / 2.5 do not fit int32: a clear error, never UB (issue 20).
  for (int i = 0; i < 5; ++i) {
    tensor<double, 1> one_value({1}, specials[i]);
    safetensors_writer w1;
    w1.add("v", one_value);
    const auto f1 = safetensors_file::parse(w1.serialize(), "v.safetensors");
    INFO(specials[i]);
    CHECK_THAT(io_error_of([&] { (void)f1.get_flat<std::int32_t>("v"); }),
               Contains("tensor 'v' (F64): element 0 = ") &&
                   Contains("does not convert exactly to int32"));
    CHECK_THAT(io_error_of([&] { (void)f1.get<std::int64_t, 1>("v"); }), Contains("int64"));
    CHECK_THAT(io_error_of([&] { (void)f1.get_flat<std::uint8_t>("v"); }), Contains("uint8"));
  }
  CHECK_THAT(io_error_of([&] { (void)file.get_flat<std::int32_t>("bad"); }),
             Contains("element 0 = nan"));
  safetensors_writer w2;
  tensor<double, 1> ok({2});
  ok[0] = -7.0;
  ok[1] = 2147483647.0;
  w2.add("ok", ok);
  tensor<std::int64_t, 1> big({2});
  big[0] = 1;
  big[1] = std::int64_t(1) << 40;
  w2.add("big", big);
  const auto f2 = safetensors_file::parse(w2.serialize());
  CHECK(f2.get_flat<std::int32_t>("ok") == std::vector<std::int32_t>{-7, 2147483647});
  CHECK_THAT(io_error_of([&] { (void)f2.get_flat<std::int32_t>("big"); }),
             Contains("element 1 = 1099511627776 does not convert exactly to int32"));
  CHECK_THAT(io_error_of([&] { (void)f2.get<bool, 1>("big"); }), Contains("to bool"));
  // BOOL bytes other than 0/1 are refused by views and conversions.
  auto img = image_with_header(R"({"m":{"dtype":"BOOL","shape":[2],"data_offsets":[0,2]}})", 2);
  img.back() = 2;
  const auto fb = safetensors_file::parse(img);
  CHECK_THAT(io_error_of([&] { (void)fb.view<bool, 1>("m"); }), Contains("holds byte 2"));
  CHECK_THAT(io_error_of([&] { (void)fb.get_flat<float>("m"); }), Contains("element 1 = 2"));
}

TEST_CASE("safetensors: paths that are not readable files are io_errors", "[core][safetensors]") {
  const auto dir = temp_dir("paths");
  CHECK_THAT(io_error_of([&] { (void)safetensors_file::load(dir.string()); }),
             Contains("safetensors_file::load") && Contains("is a directory"));
  CHECK_THAT(io_error_of([&] { (void)safetensors_file::load((dir / "missing").string()); }),
             Contains("cannot open") && Contains("missing"));
  CHECK_THAT(io_error_of([&] { (void)safetensors_file::load("/dev/null"); }),
             Contains("not a regular file"));
  {  // an empty file
    std::FILE* fp = std::fopen((dir / "empty.safetensors").c_str(), "wb");
    REQUIRE(fp);
    std::fclose(fp);
  }
  CHECK_THAT(
      io_error_of([&] { (void)safetensors_file::load((dir / "empty.safetensors").string()); }),
      Contains("shorter than the 8-byte"));
  safetensors_writer w;
  tensor<float, 1> a({1});
  w.add("a", a);
  CHECK_THAT(io_error_of([&] { w.save(dir.string()); }), Contains("for writing"));
  CHECK_THAT(io_error_of([&] { w.add("a", a); }), Contains("duplicate or reserved"));
  CHECK_THROWS_AS(w.add_as("x", a, dtype::i32), shape_error);
  std::filesystem::remove_all(dir);
}

namespace {
long resident_kib() {
  std::FILE* f = std::fopen("/proc/self/status", "r");
  if (!f) return -1;
  char line[256];
  long kib = -1;
  while (std::fgets(line, sizeof line, f)) {
    if (std::strncmp(line, "VmRSS:", 6) == 0) kib = std::strtol(line + 6, nullptr, 10);
  }
  std::fclose(f);
  return kib;
}
}  // namespace

TEST_CASE("safetensors: a 10 GiB file is mapped, not read (no resident memory until touched)",
          "[core][safetensors]") {
  if (resident_kib() < 0) return;  // no /proc: nothing to measure
  const auto dir = temp_dir("sparse");
  const std::string path = (dir / "big.safetensors").string();
  const std::size_t n = std::size_t(5) << 30;  // BF16 elements: 10 GiB
  std::string header = "{\"big\":{\"dtype\":\"BF16\",\"shape\":[" + std::to_string(n) +
                       "],\"data_offsets\":[0," + std::to_string(2 * n) +
                       "]},\"small\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[" +
                       std::to_string(2 * n) + "," + std::to_string(2 * n + 16) + "]}}";
  while (header.size() % 8) header.push_back(' ');
  {
    std::FILE* f = std::fopen(path.c_str(), "wb");
    REQUIRE(f);
    const std::uint64_t len = header.size();
    REQUIRE(std::fwrite(&len, 8, 1, f) == 1);
    REQUIRE(std::fwrite(header.data(), 1, header.size(), f) == header.size());
    std::fclose(f);
    // A sparse file: the 10 GiB of zeros take no disk space either.
    std::filesystem::resize_file(path, 8 + header.size() + 2 * n + 16);
  }
  const long before = resident_kib();
  const auto file = safetensors_file::load(path);
  const auto big = file.view<bf16, 1>("big");
  CHECK(big.extent(0) == index_t(n));
  CHECK(big(0).bits == 0);
  CHECK(big(index_t(n) - 1).bits == 0);
  CHECK(file.get<float, 1>("small")(3) == 0.0f);
  const long after = resident_kib();
  INFO("VmRSS before " << before << " KiB, after " << after << " KiB");
  CHECK(file.is_mapped());
  CHECK(after - before < 32 * 1024);  // a copy would be 10 GiB
  std::filesystem::remove_all(dir);
}
