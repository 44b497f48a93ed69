// SPDX-License-Identifier: MIT
// Checkpoint load cost: wall time and resident memory (VmRSS, Linux) of opening safetensors files
// by memory map, and of building a model from a checkpoint folder.
//   load_probe PATH...      PATH: a *.safetensors file, or a model folder (config.json +
//                           model.safetensors or model.safetensors.index.json)
// A file: safetensors_file::load (maps the file, parses the header; no data page is read), then
// one element of the first tensor read (one page faulted in). A folder: the same for its
// checkpoint, then models::hybrid_model::load (layers copy their matrices into packed panels:
// the resident growth is the model's weight bytes, the mapping's pages stay clean page cache).
// Drop the page cache first (`echo 3 > /proc/sys/vm/drop_caches`) for a cold open.
#include <chrono>
#include <cstddef>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <string>

#include <seqmix/core/io/checkpoint.hpp>
#include <seqmix/core/safetensors.hpp>
#include <seqmix/models/model.hpp>

namespace {

using clock_type = std::chrono::steady_clock;

/// Resident set size in KiB, or -1 where /proc/self/status is not there.
long rss_kib() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::stol(line.substr(6));
  }
  return -1;
}

double ms_since(clock_type::time_point t0) {
  return std::chrono::duration<double, std::milli>(clock_type::now() - t0).count();
}

/// Opens one file; prints tensors, bytes, open time and resident growth (open, then one page).
void probe_file(const std::string& path) {
  const long r0 = rss_kib();
  const auto t0 = clock_type::now();
  const auto f = seqmix::safetensors_file::load(path);
  const double open_ms = ms_since(t0);
  const long r1 = rss_kib();
  std::size_t bytes = 0;
  for (const auto& n : f.names()) bytes += f.info(n).nbytes();
  long r2 = r1;
  if (f.size() > 0) {
    const auto t = f.at(f.names().front());
    volatile std::byte first = t.nbytes() > 0 ? *t.data() : std::byte{0};
    static_cast<void>(first);
    r2 = rss_kib();
  }
  std::printf("%s: %zu tensors, %.3f MB; open %.3f ms, RSS +%ld KiB; after one element +%ld KiB\n",
              path.c_str(), f.size(), static_cast<double>(bytes) * 1e-6, open_ms, r1 - r0, r2 - r0);
}

/// A model folder: its checkpoint file(s), then the model built from it.
void probe_model(const std::string& dir) {
  const auto single = std::filesystem::path(dir) / "model.safetensors";
  if (std::filesystem::exists(single)) probe_file(single.string());
  const long r0 = rss_kib();
  const auto t0 = clock_type::now();
  const auto m = seqmix::models::hybrid_model::load(dir);
  const double load_ms = ms_since(t0);
  std::printf("%s: hybrid_model::load %.1f ms, RSS +%ld KiB (%zu checkpoint tensors unused)\n",
              dir.c_str(), load_ms, rss_kib() - r0, m.unused_tensors().size());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: load_probe PATH...  (a .safetensors file or a model folder)\n");
    return 2;
  }
  try {
    for (int i = 1; i < argc; ++i) {
      const std::string path = argv[i];
      if (std::filesystem::is_directory(path)) {
        probe_model(path);
      } else {
        probe_file(path);
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "load_probe: %s\n", e.what());
    return 1;
  }
  return 0;
}
