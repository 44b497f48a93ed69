// SPDX-License-Identifier: MIT
// check_generate GENERATE_EXE MODEL WORK_DIR: runs `seqmix-generate --dump-logits` on the golden
// model tests/golden/v2/models/MODEL with its stored prompt and 5 new tokens, then compares the
// dumped prefill.logits [37, V] and decode.logits [5, V] (the prompt's last row, then decode steps
// 1..4) with the stored transformers logits (relative RMS <= 1e-4 each) and the printed ids
// with decode.generated_ids. Exit 0 when everything matches; otherwise 1 with what differs.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include <seqmix/core/safetensors.hpp>

#ifndef SEQMIX_GOLDEN_DIR
#define SEQMIX_GOLDEN_DIR ""
#endif

namespace {

double rel_rms(const float* ref, const float* out, std::size_t n) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double d = double(out[i]) - double(ref[i]);
    if (!std::isfinite(out[i])) return INFINITY;
    num += d * d;
    den += double(ref[i]) * double(ref[i]);
  }
  return std::sqrt(num / (den > 0 ? den : 1.0));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: check_generate GENERATE_EXE MODEL WORK_DIR [EXTRA seqmix-generate ARGS]\n";
    return 2;
  }
  const std::string exe = argv[1], model = argv[2], work = argv[3];
  std::string extra;  // e.g. --mla-cache latent
  for (int i = 4; i < argc; ++i) extra += std::string(" ") + argv[i];
  const std::filesystem::path dir =
      std::filesystem::path(SEQMIX_GOLDEN_DIR) / "v2" / "models" / model;
  try {
    const auto vec = seqmix::safetensors_file::load((dir / "vectors.safetensors").string());
    const auto prompt = vec.get_flat<std::int64_t>("prompt_ids");
    const auto gen = vec.get_flat<std::int64_t>("decode.generated_ids");
    std::filesystem::create_directories(work);
    const std::string dump =
        (std::filesystem::path(work) / (model + ".logits.safetensors")).string();
    const std::string out = (std::filesystem::path(work) / (model + ".stdout.txt")).string();
    std::string ids;
    for (std::size_t i = 0; i < prompt.size(); ++i) {
      if (i) ids += ",";
      ids += std::to_string(prompt[i]);
    }
    const std::string cmd = "\"" + exe + "\" --model \"" + dir.string() + "\" --prompt-ids " + ids +
                            " --max-new-tokens " + std::to_string(gen.size()) + extra +
                            " --dump-logits \"" + dump + "\" > \"" + out + "\"";
    std::cout << cmd << "\n";
    if (std::system(cmd.c_str()) != 0) {
      std::cerr << "check_generate: seqmix-generate failed\n";
      return 1;
    }
    bool ok = true;
    const auto got = seqmix::safetensors_file::load(dump);
    const auto pl = got.get<float, 2>("prefill.logits");
    const auto dl = got.get<float, 2>("decode.logits");
    const auto ref_pl = vec.get<float, 2>("prefill.logits");
    const seqmix::index_t V = ref_pl.extent(1), T = ref_pl.extent(0);
    if (pl.extent(0) != T || pl.extent(1) != V ||
        dl.extent(0) != static_cast<seqmix::index_t>(gen.size()) || dl.extent(1) != V) {
      std::cerr << "check_generate: dumped shapes differ from [" << T << ", " << V << "] / ["
                << gen.size() << ", " << V << "]\n";
      return 1;
    }
    const double e0 = rel_rms(ref_pl.data(), pl.data(), static_cast<std::size_t>(pl.size()));
    std::cout << model << " prefill.logits rel_rms " << e0 << "\n";
    ok = ok && e0 <= 1e-4;
    for (seqmix::index_t j = 0; j < dl.extent(0); ++j) {
      seqmix::tensor<float, 1> ref({V});
      if (j == 0) {
        std::copy_n(ref_pl.data() + (T - 1) * V, V, ref.data());
      } else {
        ref = vec.get<float, 1>("decode.step" + std::to_string(j) + ".logits");
      }
      const double e = rel_rms(ref.data(), dl.data() + j * V, static_cast<std::size_t>(V));
      std::cout << model << " decode.logits[" << j << "] rel_rms " << e << "\n";
      ok = ok && e <= 1e-4;
    }
    std::ifstream in(out);
    std::string line, printed;
    while (std::getline(in, line))
      if (line.rfind("generated_ids: ", 0) == 0) printed = line.substr(15);
    std::string want;
    for (std::size_t i = 0; i < gen.size(); ++i) {
      if (i) want += ",";
      want += std::to_string(gen[i]);
    }
    std::cout << model << " generated " << printed << " (transformers: " << want << ")\n";
    ok = ok && printed == want;
    if (!ok) std::cerr << "check_generate: " << model << " differs from the stored logits\n";
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::cerr << "check_generate: " << e.what() << "\n";
    return 1;
  }
}
