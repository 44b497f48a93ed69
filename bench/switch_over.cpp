// SPDX-License-Identifier: MIT
// Which form of the gated-accumulation mixers is faster on this machine, and from which T:
// seqmix::measure_forms (seqmix/tune.hpp) for every gate kind at B = 1, H heads (default 8),
// K = V in {64, 128}, at the thread count given by --threads=N (default: all). Prints a
// Markdown table of tokens/s of both forms per T and the switch-over T that
// options::switch_over_t should get.
//   switch_over [--threads=N] [--heads=H] [--lengths=256,1024,4096,16384] [--repeats=3]
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include <seqmix/core/parallel.hpp>
#include <seqmix/tune.hpp>

int main(int argc, char** argv) {
  using seqmix::index_t;
  std::vector<index_t> lengths{256, 1024, 4096, 16384};
  int repeats = 3;
  index_t H = 8;
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (a.starts_with("--threads=")) {
      seqmix::set_num_threads(std::atoi(argv[i] + 10));
    } else if (a.starts_with("--heads=")) {
      H = std::atol(argv[i] + 8);
    } else if (a.starts_with("--repeats=")) {
      repeats = std::atoi(argv[i] + 10);
    } else if (a.starts_with("--lengths=")) {
      lengths.clear();
      std::string s(a.substr(10));
      for (std::size_t p = 0; p <= s.size();) {
        const std::size_t q = std::min(s.find(',', p), s.size());
        lengths.push_back(std::atol(s.substr(p, q - p).c_str()));
        p = q + 1;
      }
    } else {
      std::fprintf(stderr,
                   "usage: %s [--threads=N] [--heads=H] [--lengths=T1,T2,...] [--repeats=R]\n",
                   argv[0]);
      return 2;
    }
  }
  std::printf("threads: %d, H = %ld, B = 1, float; tokens/s (thousands) chunked / recurrent\n\n",
              seqmix::num_threads(), static_cast<long>(H));
  std::printf("| mixer kind | K = V |");
  for (index_t t : lengths) std::printf(" T = %ld |", static_cast<long>(t));
  std::printf(" switch-over T |\n|---|---|");
  for (std::size_t i = 0; i < lengths.size(); ++i) std::printf("---|");
  std::printf("---|\n");
  const struct {
    seqmix::gate_kind kind;
    const char* name;
  } kinds[] = {{seqmix::gate_kind::none, "none (linear attention)"},
               {seqmix::gate_kind::scalar, "scalar (simple GLA, Mamba2)"},
               {seqmix::gate_kind::per_key, "per-key (GLA)"}};
  for (const auto& k : kinds) {
    for (index_t K : {64, 128}) {
      const auto t = seqmix::measure_forms<float>(k.kind, H, K, K, 64, lengths, repeats);
      std::printf("| %s | %ld |", k.name, static_cast<long>(K));
      for (std::size_t i = 0; i < t.lengths.size(); ++i) {
        const double n = double(t.lengths[i]) / 1e3;
        std::printf(" %.0fk / %.0fk |", n / t.chunked[i], n / t.recurrent[i]);
      }
      const index_t s = t.switch_over();
      if (s == std::numeric_limits<index_t>::max()) {
        std::printf(" never (recurrent) |\n");
      } else {
        std::printf(" %ld |\n", static_cast<long>(s));
      }
      std::fflush(stdout);
    }
  }
  return 0;
}
