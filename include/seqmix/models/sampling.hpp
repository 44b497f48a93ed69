// SPDX-License-Identifier: MIT
// Token sampling from logits: greedy (argmax, lowest id on ties), or temperature + top-p
// (nucleus) with a seeded generator, reproducible on every platform.
//
//   sampler s({.temperature = 0.8f, .top_p = 0.95f, .seed = 42});
//   std::int64_t id = s.sample(logits_row);          // logits_row: [V] floats
//
// temperature <= 0 is greedy. Otherwise p_i = softmax(logits / temperature) (in double, max
// subtracted), the smallest set of the most probable tokens whose mass reaches top_p is kept
// (ties in probability: lower id first; at least one token), renormalised, and one token is
// drawn with u = (next 53 bits of a std::mt19937_64 seeded with `seed`) · 2^-53: the standard
// fixes mt19937_64's output, so the same seed gives the same tokens everywhere (no
// std::*_distribution, whose algorithms are implementation-defined). Non-finite logits are a
// seqmix::shape_error naming the index. Cost: O(V log V) for top-p < 1, O(V) otherwise; the
// sampler's scratch is grow-only.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <vector>

#include <seqmix/core/error.hpp>

namespace seqmix::models {

struct sampling_options {
  float temperature = 0.0f;  ///< <= 0: greedy
  float top_p = 1.0f;        ///< (0, 1]
  std::uint64_t seed = 0;
};

/// The argmax (lowest index among equal maxima).
inline std::int64_t greedy_token(std::span<const float> logits) {
  if (logits.empty()) throw shape_error("seqmix::greedy_token: argument 'logits': is empty");
  std::size_t best = 0;
  for (std::size_t i = 1; i < logits.size(); ++i)
    if (logits[i] > logits[best]) best = i;
  return static_cast<std::int64_t>(best);
}

class sampler {
 public:
  explicit sampler(sampling_options o = {}) : o_(o), rng_(o.seed) {
    if (!(o.top_p > 0.0f && o.top_p <= 1.0f))
      throw shape_error("seqmix::sampler: argument 'o.top_p': must be in (0, 1], got " +
                        std::to_string(o.top_p));
    if (!std::isfinite(o.temperature))
      throw shape_error("seqmix::sampler: argument 'o.temperature': must be finite");
  }
  const sampling_options& options() const noexcept { return o_; }

  std::int64_t sample(std::span<const float> logits) {
    const checker check{"sampler::sample"};
    if (logits.empty()) check.fail("logits", "is empty");
    for (std::size_t i = 0; i < logits.size(); ++i)
      if (!std::isfinite(logits[i]))
        check.fail("logits", "entry " + std::to_string(i) + " is not finite");
    if (o_.temperature <= 0.0f) return greedy_token(logits);
    const std::size_t V = logits.size();
    p_.resize(V);
    double mx = logits[0];
    for (float l : logits) mx = std::max(mx, double(l));
    double sum = 0;
    for (std::size_t i = 0; i < V; ++i) {
      p_[i] = std::exp((double(logits[i]) - mx) / double(o_.temperature));
      sum += p_[i];
    }
    order_.resize(V);
    std::iota(order_.begin(), order_.end(), std::size_t(0));
    std::size_t keep = V;
    if (o_.top_p < 1.0f) {
      std::sort(order_.begin(), order_.end(), [&](std::size_t a, std::size_t b) {
        return p_[a] > p_[b] || (p_[a] == p_[b] && a < b);
      });
      double mass = 0;
      keep = 0;
      while (keep < V) {
        mass += p_[order_[keep]] / sum;
        ++keep;
        if (mass >= double(o_.top_p)) break;
      }
    }
    double kept = 0;
    for (std::size_t j = 0; j < keep; ++j) kept += p_[order_[j]];
    const double u = double(rng_() >> 11) * 0x1.0p-53 * kept;
    double acc = 0;
    for (std::size_t j = 0; j < keep; ++j) {
      acc += p_[order_[j]];
      if (u < acc) return static_cast<std::int64_t>(order_[j]);
    }
    return static_cast<std::int64_t>(order_[keep - 1]);
  }

 private:
  sampling_options o_;
  std::mt19937_64 rng_;
  std::vector<double> p_;
  std::vector<std::size_t> order_;
};

}  // namespace seqmix::models
