// SPDX-License-Identifier: MIT
// Access to the golden reference vectors (from fla, mamba, MoBA, transformers and PyTorch),
// vendored in tests/golden (wave 1) and tests/golden/v2 (wave 2) with their READMEs. The folder
// is configured by CMake (SEQMIX_GOLDEN_DIR, default the vendored copy). A missing file makes
// the test FAIL with a message naming the file and where to get it: never a silent pass.
#pragma once

#include <filesystem>
#include <map>
#include <memory>
#include <string>

#include <catch2/catch.hpp>

#include <seqmix/core/safetensors.hpp>

#ifndef SEQMIX_GOLDEN_DIR
#define SEQMIX_GOLDEN_DIR ""
#endif

namespace seqmix::testing::golden {

/// The configured golden folder (may be overridden by the SEQMIX_GOLDEN_DIR environment variable).
inline std::string dir() {
  if (const char* env = std::getenv("SEQMIX_GOLDEN_DIR"); env && *env) return env;
  return SEQMIX_GOLDEN_DIR;
}

inline bool available() {
  return !dir().empty() &&
         std::filesystem::exists(std::filesystem::path(dir()) / "inputs.safetensors");
}

/// Full path of a golden file relative to the golden folder (e.g. "v2/kda.safetensors"); FAILs
/// the running test, naming the file, when it does not exist.
inline std::string path(const std::string& relative) {
  const std::filesystem::path p = std::filesystem::path(dir()) / relative;
  if (!std::filesystem::exists(p)) {
    FAIL("golden reference file '"
         << p.string() << "' not found: the reference vectors are "
         << "vendored in tests/golden of the seqmix repository (restore it with `git checkout -- "
         << "tests/golden`, or point -DSEQMIX_GOLDEN_DIR / the SEQMIX_GOLDEN_DIR environment "
         << "variable at a copy); golden tests fail when their file is missing, never skip");
  }
  return p.string();
}

/// Loads (once) and returns a golden file by stem, e.g. file("fla_delta") or file("v2/kda").
/// FAILs the running test when the file is missing.
inline const safetensors_file& file(const std::string& stem) {
  static std::map<std::string, std::unique_ptr<safetensors_file>> cache;
  auto it = cache.find(stem);
  if (it != cache.end()) return *it->second;
  auto f = std::make_unique<safetensors_file>(safetensors_file::load(path(stem + ".safetensors")));
  return *cache.emplace(stem, std::move(f)).first->second;
}

/// Shape of the stored cases (golden/README.md); case 4 is not stored.
struct case_dims {
  index_t B, T, H, K, V;
};
inline constexpr case_dims cases[] = {
    {1, 1, 1, 16, 16}, {2, 17, 3, 32, 32}, {1, 64, 2, 64, 64}, {2, 100, 2, 32, 48}};
inline constexpr int case_count = 4;

}  // namespace seqmix::testing::golden
