// SPDX-License-Identifier: MIT
// seqmix-generate: run a Hugging Face hybrid checkpoint (qwen3_next, granitemoehybrid, kimi_linear)
// from its folder on the CPU: prefill a prompt of token ids, then generate tokens one at a time.
//
//   seqmix-generate --model DIR --prompt-ids 1,2,3 --max-new-tokens N [--threads N]
//                   [--dump-logits FILE.safetensors] [--temperature T --top-p P --seed S]
//                   [--mla-cache expanded|latent] [--pack-experts on|off]
//
// --mla-cache picks the cache of Kimi-Linear's MLA layers: the expanded K/V (default) or the
// latent c + k_rot (17.8x less memory per token, faster decode on long contexts; other models
// ignore it). --pack-experts off reads the MoE experts through the checkpoint's mapping instead
// of a packed copy (default on; off for a checkpoint larger than memory).
// Prints (stdout) `generated_ids: a,b,...` and the prefill / decode throughput; with
// --dump-logits writes `prefill.logits` [T, V] (every prompt position) and `decode.logits`
// [N, V] (row j: the logits that chose new token j: the prompt's last row, then each decode
// step's) as float32 safetensors. Greedy unless --temperature > 0. Long prompts are prefilled
// in chunks of 512 tokens (continuing the cache) with a progress line on stderr. Exit status 0
// on success, 2 on bad arguments, 1 on any error (its message on stderr). These flags are
// stable: scripts call this program. DIR may also hold just a seqmix config.json (model_type
// "seqmix": a Linear-MoE stack by a pattern string, random weights from its seed; see
// include/seqmix/models/config.hpp), for experiments without a checkpoint.
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <iostream>
#include <string>
#include <vector>

#include <seqmix/core/parallel.hpp>
#include <seqmix/core/safetensors.hpp>
#include <seqmix/models/models.hpp>

namespace {

[[noreturn]] void usage(const std::string& why) {
  std::cerr << "seqmix-generate: " << why << "\n"
            << "usage: seqmix-generate --model DIR --prompt-ids 1,2,3 --max-new-tokens N "
               "[--threads N] [--dump-logits FILE.safetensors] [--temperature T] [--top-p P] "
               "[--seed S] [--mla-cache expanded|latent] [--pack-experts on|off]\n";
  std::exit(2);
}

std::int64_t parse_int(const std::string& flag, const std::string& s) {
  std::size_t used = 0;
  std::int64_t v = 0;
  try {
    v = std::stoll(s, &used);
  } catch (const std::exception&) {
    usage(flag + " expects an integer, got '" + s + "'");
  }
  if (used != s.size()) usage(flag + " expects an integer, got '" + s + "'");
  return v;
}
double parse_double(const std::string& flag, const std::string& s) {
  std::size_t used = 0;
  double v = 0;
  try {
    v = std::stod(s, &used);
  } catch (const std::exception&) {
    usage(flag + " expects a number, got '" + s + "'");
  }
  if (used != s.size()) usage(flag + " expects a number, got '" + s + "'");
  return v;
}

std::vector<std::int64_t> parse_ids(const std::string& s) {
  std::vector<std::int64_t> ids;
  std::size_t pos = 0;
  while (pos <= s.size()) {
    const std::size_t comma = s.find(',', pos);
    const std::string item =
        s.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    if (item.empty()) usage("--prompt-ids: empty entry in '" + s + "'");
    ids.push_back(parse_int("--prompt-ids", item));
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return ids;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  std::string model_dir, dump;
  std::vector<std::int64_t> prompt;
  std::int64_t max_new = -1, threads = 0;
  seqmix::models::sampling_options so;
  seqmix::models::load_options load;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(a + " needs a value");
      return argv[++i];
    };
    if (a == "--model") {
      model_dir = value();
    } else if (a == "--prompt-ids") {
      prompt = parse_ids(value());
    } else if (a == "--max-new-tokens") {
      max_new = parse_int(a, value());
    } else if (a == "--threads") {
      threads = parse_int(a, value());
    } else if (a == "--dump-logits") {
      dump = value();
    } else if (a == "--temperature") {
      so.temperature = static_cast<float>(parse_double(a, value()));
    } else if (a == "--top-p") {
      so.top_p = static_cast<float>(parse_double(a, value()));
    } else if (a == "--mla-cache") {
      const std::string v = value();
      if (v == "expanded") {
        load.mla_cache = seqmix::layers::mla_cache::expanded;
      } else if (v == "latent") {
        load.mla_cache = seqmix::layers::mla_cache::latent;
      } else {
        usage("--mla-cache expects 'expanded' or 'latent', got '" + v + "'");
      }
    } else if (a == "--pack-experts") {
      const std::string v = value();
      if (v == "on" || v == "off") {
        load.pack_experts = v == "on";
      } else {
        usage("--pack-experts expects 'on' or 'off', got '" + v + "'");
      }
    } else if (a == "--seed") {
      so.seed = static_cast<std::uint64_t>(parse_int(a, value()));
    } else if (a == "--help" || a == "-h") {
      usage("help");
    } else {
      usage("unknown argument '" + a + "'");
    }
  }
  if (model_dir.empty()) usage("--model is required");
  if (prompt.empty()) usage("--prompt-ids is required");
  if (max_new < 0) usage("--max-new-tokens is required (>= 0)");
  if (threads < 0) usage("--threads must be >= 0");
  try {
    seqmix::set_num_threads(static_cast<int>(threads));
    auto model = seqmix::models::hybrid_model::load(model_dir, load);
    seqmix::models::sampler sampler(so);
    const seqmix::index_t T = static_cast<seqmix::index_t>(prompt.size());
    const seqmix::index_t V = model.vocab();
    const seqmix::index_t N = static_cast<seqmix::index_t>(max_new);
    auto cache = model.make_cache(1, T + N + 1);
    const bool all = !dump.empty();
    seqmix::tensor<float, 2> prefill_logits({all ? T : 1, V});
    seqmix::tensor<float, 1> last({V});
    const seqmix::index_t chunk = 512;
    const auto t0 = std::chrono::steady_clock::now();
    for (seqmix::index_t s = 0; s < T; s += chunk) {
      const seqmix::index_t e = std::min(T, s + chunk);
      const std::span<const std::int64_t> part(prompt.data() + s, static_cast<std::size_t>(e - s));
      const auto l =
          model.prefill(part, {}, cache,
                        all ? seqmix::models::logits_mode::all : seqmix::models::logits_mode::last);
      if (all) std::copy(l.data(), l.data() + l.size(), prefill_logits.data() + s * V);
      std::copy_n(l.data() + (l.extent(0) - 1) * V, V, last.data());
      if (T > chunk)
        std::cerr << "prefill: " << e << " / " << T << " tokens (" << seconds_since(t0) << " s)\n";
    }
    const double t_prefill = seconds_since(t0);
    std::vector<std::int64_t> generated;
    seqmix::tensor<float, 2> decode_logits({N, V});
    seqmix::tensor<float, 2> step_logits({1, V});
    const auto t1 = std::chrono::steady_clock::now();
    for (seqmix::index_t j = 0; j < N; ++j) {
      const float* row = j == 0 ? last.data() : step_logits.data();
      std::copy_n(row, V, decode_logits.data() + j * V);
      const std::int64_t next = sampler.sample({row, static_cast<std::size_t>(V)});
      generated.push_back(next);
      if (j + 1 < N) model.decode_into({&generated.back(), 1}, cache, step_logits.view());
    }
    const double t_decode = seconds_since(t1);
    std::cout << "generated_ids: ";
    for (std::size_t i = 0; i < generated.size(); ++i) std::cout << (i ? "," : "") << generated[i];
    std::cout << "\n";
    std::cout << "prefill: " << T << " tokens in " << t_prefill << " s ("
              << (t_prefill > 0 ? double(T) / t_prefill : 0.0) << " tokens/s)\n";
    const double steps = N > 1 ? double(N - 1) : 0.0;
    std::cout << "decode: " << (N > 1 ? N - 1 : 0) << " steps in " << t_decode << " s ("
              << (t_decode > 0 ? steps / t_decode : 0.0) << " tokens/s)\n";
    if (!dump.empty()) {
      seqmix::safetensors_writer w;
      w.add("prefill.logits", prefill_logits);
      w.add("decode.logits", decode_logits);
      w.set_metadata("model", model_dir);
      w.save(dump);
      std::cout << "logits written to " << dump << "\n";
    }
  } catch (const std::exception& e) {
    std::cerr << "seqmix-generate: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
