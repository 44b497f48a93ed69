// SPDX-License-Identifier: MIT
// Helpers shared by the safetensors / checkpoint tests: hand-made file images, the message of
// the io_error an expression throws, and per-process temporary folders.
#pragma once

#include <cstdint>
#include <cstring>
#include <exception>
#include <filesystem>
#include <string>
#include <unistd.h>
#include <vector>

#include <seqmix/core/safetensors.hpp>

namespace seqmix::testing::io {

/// [u64 length][header][data_bytes zero bytes]; declared_len overrides the length field.
inline std::vector<char> image_with_header(const std::string& header, std::size_t data_bytes,
                                           std::uint64_t declared_len = 0) {
  std::vector<char> out(8 + header.size() + data_bytes, 0);
  const std::uint64_t n = declared_len ? declared_len : header.size();
  std::memcpy(out.data(), &n, 8);
  std::memcpy(out.data() + 8, header.data(), header.size());
  return out;
}

/// The message of the io_error that f throws; a marker when it throws something else or nothing.
template <class F>
std::string io_error_of(F&& f) {
  try {
    f();
  } catch (const io_error& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("WRONG EXCEPTION TYPE: ") + e.what();
  }
  return "NO EXCEPTION";
}

/// The io_error message of parsing a hand-made image.
inline std::string parse_error(const std::string& header, std::size_t data_bytes) {
  return io_error_of([&] { (void)safetensors_file::parse(image_with_header(header, data_bytes)); });
}

/// A fresh, empty folder under the temporary directory, unique to this process.
inline std::filesystem::path temp_dir(const std::string& name) {
  const auto p = std::filesystem::temp_directory_path() /
                 ("seqmix_io_" + name + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  return p;
}

}  // namespace seqmix::testing::io
