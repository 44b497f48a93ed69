// SPDX-License-Identifier: MIT
// Read-only bytes of a file or of memory, shared by everything that points into them.
//
//   auto bytes = io::mapped_bytes::map_file(path, "safetensors_file::load");  // mmap, no copy
//   auto mem = io::mapped_bytes::from_vector(std::move(v));                      // owns v
//   bytes->data(), bytes->size()
//
// map_file maps the whole file read-only and private (POSIX mmap): opening costs one system
// call and no copy, and pages are read from disk only when touched, so a 10 GB checkpoint
// costs no resident memory until its tensors are read. The mapping lives as long as the last
// shared_ptr to it (tensors borrowed from a file hold one). Errors are seqmix::io_error naming
// the caller, the path and the reason (missing, a directory, not a regular file, no permission).
// Where mmap is not available the file is read into memory instead (same interface).
// Caveat of every mmap reader: if another process truncates the file while it is mapped, reading
// the lost pages raises SIGBUS; seqmix cannot detect that.
#pragma once

#include <cerrno>
#include <cstddef>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <seqmix/core/error.hpp>

#if __has_include(<sys/mman.h>) && __has_include(<sys/stat.h>) && __has_include(<fcntl.h>) && \
    __has_include(<unistd.h>)
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#define SEQMIX_HAVE_MMAP 1
#else
#include <fstream>
#include <iterator>
#define SEQMIX_HAVE_MMAP 0
#endif

namespace seqmix::io {

/// Read-only bytes: a mapped file or an owned buffer.
class mapped_bytes {
 public:
  mapped_bytes(const mapped_bytes&) = delete;
  mapped_bytes& operator=(const mapped_bytes&) = delete;
  ~mapped_bytes() {
#if SEQMIX_HAVE_MMAP
    if (mapped_ && size_ != 0) ::munmap(const_cast<std::byte*>(data_), size_);
#endif
  }

  /// Maps `path` read-only. `who` (the public function being run) starts every error message.
  static std::shared_ptr<const mapped_bytes> map_file(const std::string& path,
                                                      std::string_view who) {
    auto fail = [&](const std::string& why) -> std::shared_ptr<const mapped_bytes> {
      throw io_error("seqmix::" + std::string(who) + ": cannot open '" + path + "': " + why);
    };
#if SEQMIX_HAVE_MMAP
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) return fail(std::strerror(errno));
    if (S_ISDIR(st.st_mode)) return fail("it is a directory, not a file");
    if (!S_ISREG(st.st_mode)) return fail("not a regular file");
    // O_NONBLOCK: should the path be swapped for a FIFO after the check, open does not hang.
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) return fail(std::strerror(errno));
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd);
      return fail("not a regular file");
    }
    const auto size = static_cast<std::size_t>(st.st_size);
    std::shared_ptr<mapped_bytes> out(new mapped_bytes());
    out->size_ = size;
    out->mapped_ = true;
    if (size != 0) {
      void* p = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
      const int err = errno;
      ::close(fd);
      if (p == MAP_FAILED) return fail(std::string("mmap failed: ") + std::strerror(err));
      out->data_ = static_cast<const std::byte*>(p);
    } else {
      ::close(fd);
    }
    return out;
#else
    std::ifstream in(path, std::ios::binary);
    if (!in) return fail("cannot be read");
    std::vector<char> bytes;
    try {
      bytes.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    } catch (const std::ios_base::failure& e) {
      return fail(e.what());
    }
    if (in.bad()) return fail("read error");
    return from_vector(std::move(bytes));
#endif
  }

  /// Takes ownership of an in-memory image.
  static std::shared_ptr<const mapped_bytes> from_vector(std::vector<char> bytes) {
    std::shared_ptr<mapped_bytes> out(new mapped_bytes());
    out->owned_ = std::move(bytes);
    out->data_ = reinterpret_cast<const std::byte*>(out->owned_.data());
    out->size_ = out->owned_.size();
    return out;
  }

  const std::byte* data() const noexcept {
    return data_;
  }
  std::size_t size() const noexcept {
    return size_;
  }
  /// True when the bytes are a file mapping (false: an owned buffer).
  bool is_mapped() const noexcept {
    return mapped_;
  }

 private:
  mapped_bytes() = default;

  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
  bool mapped_ = false;
  std::vector<char> owned_;
};

}  // namespace seqmix::io
