// SPDX-License-Identifier: MIT
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>

#include <catch2/catch.hpp>

#include <seqmix/core/safetensors.hpp>

#include "golden.hpp"

using namespace seqmix;
using Catch::Matchers::Contains;

namespace {
std::vector<char> image_with_header(const std::string& header, std::size_t data_bytes,
                                    std::uint64_t declared_len = 0) {
  std::vector<char> out(8 + header.size() + data_bytes, 0);
  const std::uint64_t n = declared_len ? declared_len : header.size();
  std::memcpy(out.data(), &n, 8);
  std::memcpy(out.data() + 8, header.data(), header.size());
  return out;
}
}  // namespace

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
