// SPDX-License-Identifier: MIT
// checkpoint: single files, sharded checkpoints with their index, folders, prefix scopes, the
// errors of bad indexes and missing shards, and the golden v2 model checkpoints (names and
// shapes against report.json's checkpoint_keys).
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include <nlohmann/json.hpp>

#include <seqmix/core/io/checkpoint.hpp>

#include "golden.hpp"
#include "test_safetensors_util.hpp"

using namespace seqmix;
using namespace seqmix::testing::io;
using Catch::Matchers::Contains;

namespace {

void write_text(const std::filesystem::path& p, const std::string& text) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << text;
  REQUIRE(out.good());
}

// A small two-layer "model" in HF naming.
safetensors_writer small_model() {
  safetensors_writer w;
  for (int layer = 0; layer < 2; ++layer) {
    const std::string p = "model.layers." + std::to_string(layer) + ".";
    tensor<float, 2> qkv({24, 8});
    for (index_t i = 0; i < qkv.size(); ++i) qkv[i] = float(layer * 1000 + i);
    w.add_as(p + "linear_attn.in_proj_qkvz.weight", qkv, dtype::bf16);
    tensor<float, 1> a({4}, float(layer) - 0.5f);
    w.add(p + "linear_attn.A_log", a);
    tensor<float, 1> norm({8}, 1.0f);
    w.add(p + "input_layernorm.weight", norm);
  }
  tensor<float, 2> emb({16, 8}, 0.25f);
  w.add("model.embed_tokens.weight", emb);
  return w;
}

}  // namespace

TEST_CASE("checkpoint: a 2-shard checkpoint with its index reads like one file",
          "[core][checkpoint]") {
  const auto dir = temp_dir("sharded");
  const auto w = small_model();
  // 2 x (384 + 16 + 32) bytes of layers, then 512 of embedding: a 1000-byte limit makes 2 shards.
  const auto files = w.save_sharded(dir.string(), 1000);
  REQUIRE(files.size() == 2);
  CHECK(files[0] == "model-00001-of-00002.safetensors");
  CHECK(std::filesystem::exists(dir / "model.safetensors.index.json"));
  const auto one = safetensors_file::parse(w.serialize(), "single");

  for (const auto& path : {dir.string(), (dir / "model.safetensors.index.json").string()}) {
    const auto ck = checkpoint::open(path);
    CHECK(ck.shards().size() == 2);
    CHECK(ck.size() == 7);
    CHECK(ck.names() == one.names());
    CHECK(ck.metadata().at("total_size") == std::to_string(2 * (384 + 16 + 32) + 512));
    CHECK(ck.shard_of("model.embed_tokens.weight").source() ==
          (dir / "model-00002-of-00002.safetensors").string());
    CHECK(ck.shard_of("model.layers.0.linear_attn.A_log").source() ==
          (dir / "model-00001-of-00002.safetensors").string());
    for (const auto& n : one.names()) {
      INFO(n);
      CHECK(ck.info(n).type == one.info(n).type);
      CHECK(ck.info(n).shape == one.info(n).shape);
      CHECK(ck.get_flat<float>(n) == one.get_flat<float>(n));
    }
    CHECK(ck.view<bf16, 2>("model.layers.1.linear_attn.in_proj_qkvz.weight")(0, 1).bits ==
          bf16_from_float(1001.0f).bits);
    CHECK(ck.at("model.layers.1.linear_attn.A_log").type() == dtype::f32);
    CHECK(ck.get<float, 1>("model.layers.1.linear_attn.A_log")(3) == 0.5f);
    CHECK_THAT(io_error_of([&] { (void)ck.get<float, 1>("model.norm.weight"); }),
               Contains("checkpoint::get") && Contains("no tensor named 'model.norm.weight'"));
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("checkpoint: prefix scopes list and fetch by relative names", "[core][checkpoint]") {
  const auto dir = temp_dir("scope");
  small_model().save((dir / "model.safetensors").string());
  const auto ck = checkpoint::open(dir.string());  // a folder with model.safetensors
  CHECK(ck.shards().size() == 1);
  CHECK(ck.names("model.layers.1.") ==
        std::vector<std::string>{"model.layers.1.input_layernorm.weight",
                                 "model.layers.1.linear_attn.A_log",
                                 "model.layers.1.linear_attn.in_proj_qkvz.weight"});
  CHECK(ck.names("model.layers.7.").empty());
  const auto attn = ck.scope("model.layers.1.linear_attn.");
  CHECK(attn.names() == std::vector<std::string>{"A_log", "in_proj_qkvz.weight"});
  CHECK(attn.contains("A_log"));
  CHECK_FALSE(attn.contains("model.layers.1.linear_attn.A_log"));
  CHECK(attn.get<float, 1>("A_log")(0) == 0.5f);
  CHECK(attn.info("in_proj_qkvz.weight").shape == std::vector<index_t>{24, 8});
  CHECK(attn.view<bf16, 2>("in_proj_qkvz.weight").extent(0) == 24);
  CHECK(attn.get_flat<float>("in_proj_qkvz.weight")[9] == to_float(bf16_from_float(1009.0f)));
  CHECK(attn.at("A_log").name() == "model.layers.1.linear_attn.A_log");
  const auto layer = ck.scope("model.layers.").scope("0.");
  CHECK(layer.prefix() == "model.layers.0.");
  CHECK(layer.names().size() == 3);
  CHECK_THAT(io_error_of([&] { (void)attn.get<float, 1>("dt_bias"); }),
             Contains("checkpoint_scope::get") &&
                 Contains("no tensor named 'model.layers.1.linear_attn.dt_bias'") &&
                 Contains("scope 'model.layers.1.linear_attn.'"));
  CHECK_THAT(io_error_of([&] { (void)attn.view<float, 2>("in_proj_qkvz.weight"); }),
             Contains("expected dtype F32 and rank 2, found BF16 and rank 2"));
  // The scope keeps the checkpoint's files open on its own.
  checkpoint_scope kept = checkpoint::open((dir / "model.safetensors").string()).scope("model.");
  CHECK(kept.get<float, 2>("embed_tokens.weight")(15, 7) == 0.25f);
  std::filesystem::remove_all(dir);
}

TEST_CASE("checkpoint: bad folders, indexes and shards are io_errors naming the file",
          "[core][checkpoint]") {
  const auto dir = temp_dir("badindex");
  const auto w = small_model();
  w.save_sharded(dir.string(), 1000);
  const auto index = dir / "model.safetensors.index.json";
  const std::string good = [&] {
    std::ifstream in(index);
    return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }();
  auto open_error = [&](const std::string& text) {
    write_text(index, text);
    return io_error_of([&] { (void)checkpoint::open(dir.string()); });
  };
  CHECK(open_error(good) == "NO EXCEPTION");
  {  // seeded random edits of the index: only success or io_error, never another exception
    std::mt19937 rng(7);
    int wrong = 0, ok = 0;
    std::string first_wrong;
    for (int i = 0; i < 400; ++i) {
      std::string text = good;
      for (int k = 0; k < 2; ++k) {
        const std::size_t at = rng() % text.size();
        switch (rng() % 3) {
          case 0:
            text[at] = static_cast<char>(rng() % 128);
            break;
          case 1:
            text.erase(at, 1 + rng() % 8);
            break;
          default:
            text.insert(at, text.substr(at, 1 + rng() % 40));
            break;
        }
      }
      const std::string msg = open_error(text);
      if (msg.rfind("WRONG EXCEPTION", 0) == 0 && wrong++ == 0) first_wrong = msg;
      if (msg == "NO EXCEPTION") ++ok;
    }
    INFO("first: " << first_wrong);
    CHECK(wrong == 0);
    CHECK(ok < 400);
  }
  CHECK_THAT(open_error("{"), Contains("malformed index") && Contains("not valid JSON"));
  CHECK_THAT(open_error("[]"), Contains("not a JSON object"));
  CHECK_THAT(open_error(R"({"metadata":{}})"), Contains("no \"weight_map\" object"));
  CHECK_THAT(open_error(R"({"weight_map":{"a":"x.safetensors","a":"y.safetensors"}})"),
             Contains("the key 'a' twice"));
  CHECK_THAT(open_error(R"({"weight_map":{"a":3}})"), Contains("is not a string"));
  CHECK_THAT(open_error(R"({"weight_map":{"a":"../secret.safetensors"}})"),
             Contains("not a file name relative"));
  CHECK_THAT(open_error(R"({"weight_map":{"a":"/etc/passwd"}})"),
             Contains("not a file name relative"));
  CHECK_THAT(
      open_error(
          R"({"weight_map":{"model.embed_tokens.weight":"model-00003-of-00002.safetensors"}})"),
      Contains("lists shard 'model-00003-of-00002.safetensors'") &&
          Contains("for tensor 'model.embed_tokens.weight'") && Contains("cannot open"));
  CHECK_THAT(
      open_error(R"({"weight_map":{"model.norm.weight":"model-00001-of-00002.safetensors"}})"),
      Contains("puts 'model.norm.weight' in shard 'model-00001-of-00002.safetensors'") &&
          Contains("no such tensor"));
  // a corrupt shard: the message names the index, the shard and what is wrong
  write_text(index, good);
  write_text(dir / "model-00002-of-00002.safetensors", std::string(20, '\0'));
  CHECK_THAT(io_error_of([&] { (void)checkpoint::open(dir.string()); }),
             Contains("model-00002-of-00002.safetensors") && Contains("malformed file"));
  std::filesystem::remove(dir / "model-00002-of-00002.safetensors");
  CHECK_THAT(io_error_of([&] { (void)checkpoint::open(dir.string()); }),
             Contains("lists shard 'model-00002-of-00002.safetensors'"));
  // folders without a checkpoint, missing paths
  const auto empty = temp_dir("emptyfolder");
  CHECK_THAT(io_error_of([&] { (void)checkpoint::open(empty.string()); }),
             Contains("holds neither model.safetensors.index.json nor model.safetensors"));
  CHECK_THAT(io_error_of([&] { (void)checkpoint::open((empty / "nothing").string()); }),
             Contains("checkpoint::open") && Contains("cannot open"));
  std::filesystem::create_directories(empty / "model.safetensors");
  CHECK_THAT(io_error_of([&] { (void)checkpoint::open(empty.string()); }),
             Contains("is a directory"));
  std::filesystem::remove_all(dir);
  std::filesystem::remove_all(empty);
}

TEST_CASE("golden: the v2 model checkpoints load with the names and shapes of report.json",
          "[core][checkpoint][golden]") {
  std::ifstream in(testing::golden::path("v2/report.json"));
  REQUIRE(in.good());
  const auto report = nlohmann::json::parse(in);
  // Every folder of v2/models with a model.safetensors (at least the three of the README).
  std::vector<std::string> found;
  for (const auto& entry :
       std::filesystem::directory_iterator(testing::golden::path("v2/models"))) {
    if (std::filesystem::exists(entry.path() / "model.safetensors")) {
      found.push_back(entry.path().filename().string());
    }
  }
  std::sort(found.begin(), found.end());
  for (const char* readme_model : {"kimi_linear", "mamba2_hybrid", "qwen3_next"}) {
    CHECK(std::find(found.begin(), found.end(), readme_model) != found.end());
  }
  int models = 0;
  for (const auto& model : found) {
    INFO(model);
    const auto& keys = report.at("units").at("model:" + model).at("checkpoint_keys");
    REQUIRE(keys.is_object());
    const auto folder = testing::golden::path("v2/models/" + model);
    const auto ck = checkpoint::open(folder);
    CHECK(ck.shards().size() == 1);
    CHECK(ck.shards()[0].is_mapped());
    CHECK(ck.size() == keys.size());
    std::vector<std::string> expected_names;
    for (const auto& [name, shape] : keys.items()) {
      expected_names.push_back(name);
      INFO(name);
      REQUIRE(ck.contains(name));
      CHECK(ck.info(name).shape == shape.get<std::vector<index_t>>());
      CHECK(ck.info(name).type == dtype::f32);
    }
    std::sort(expected_names.begin(), expected_names.end());
    CHECK(ck.names() == expected_names);
    // Zero-copy view and converting copy agree.
    const auto v = ck.view<float, 2>("model.embed_tokens.weight");
    const auto t = ck.get<float, 2>("model.embed_tokens.weight");
    CHECK(v.shape() == t.shape());
    bool same = true;
    for (index_t r = 0; r < v.extent(0); ++r)
      for (index_t c = 0; c < v.extent(1); ++c) same = same && v(r, c) == t(r, c);
    CHECK(same);
    ++models;
  }
  CHECK(models == int(found.size()));
}
