// SPDX-License-Identifier: MIT
// Access to ../shared/golden/ (reference vectors from fla, mamba and PyTorch). The folder is
// configured by CMake (SEQMIX_GOLDEN_DIR). When it is missing the golden tests FAIL with a
// message saying where it was looked for: they never pass silently.
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

/// Loads (once) and returns a golden file, e.g. file("fla_delta"). FAILs the running test when
/// the folder or file is missing.
inline const safetensors_file& file(const std::string& stem) {
  static std::map<std::string, std::unique_ptr<safetensors_file>> cache;
  auto it = cache.find(stem);
  if (it != cache.end()) return *it->second;
  if (!available()) {
    FAIL("golden reference folder not found at '"
         << dir() << "' (configure with -DSEQMIX_GOLDEN_DIR=<path to shared/golden>): "
         << "golden tests cannot run and are reported as failures, not skipped");
  }
  const std::string path = (std::filesystem::path(dir()) / (stem + ".safetensors")).string();
  auto f = std::make_unique<safetensors_file>(safetensors_file::load(path));
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
