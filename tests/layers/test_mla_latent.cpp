// SPDX-License-Identifier: MIT
// mla_attention's latent cache (issue 13, layers/mla_attention.hpp): on random weights of a
// Kimi-like MLA shape (shrunk), the latent-cache layer (absorbed decode over c and k_rot) against
// the expanded-cache layer of the same weights: prefill (first; short over a cache: absorbed;
// long over a cache: expanded), decode steps with the split-KV path, snapshot / restore,
// truncate, state-index steps, B > 1, packed prefill into empty and non-empty caches, q-LoRA,
// bf16-stored weights, odd sizes (heads and r off the SIMD width, no k_rot); allocation-free
// latent steps, 1 vs 2 threads bitwise; cache geometry errors; and the golden kimi_linear model
// run with the latent cache (logits, greedy tokens, and the cache itself == transformers'
// compressed cache).
#include <cmath>
#include <filesystem>
#include <random>
#include <string>
#include <unistd.h>
#include <vector>

#include <catch2/catch.hpp>

#include <seqmix/core/io/checkpoint.hpp>
#include <seqmix/core/safetensors.hpp>
#include <seqmix/layers/mla_attention.hpp>
#include <seqmix/models/models.hpp>

#include "alloc_counter.hpp"
#include "golden.hpp"
#include "testing.hpp"

namespace {

using namespace seqmix;
using seqmix::testing::compare;
namespace gl = seqmix::testing::golden;

// latent (absorbed) vs expanded: the same math in another summation order, float rounding only
constexpr double tol = 1e-5;

void check_rel(const std::string& what, const testing::comparison& c, double limit = tol) {
  INFO(what << ": " << c.report);
  UNSCOPED_INFO(what << " rel_rms " << c.rel_rms);
  CHECK(c.rel_rms <= limit);
}

/// Random MLA weights (N(0, 1/fan_in) matrices, norm weights 1 + N(0, 0.1)) under "L.".
std::string write_weights(const layers::mla_attention_config& c, dtype type,
                          const std::string& stem, std::uint64_t salt) {
  auto rng = testing::make_rng(salt);
  const index_t H = c.heads, D = c.hidden, r = c.kv_lora_rank, dn = c.qk_nope_dim,
                dr = c.qk_rope_dim, dv = c.v_dim;
  const std::string path =
      (std::filesystem::temp_directory_path() /
       ("seqmix_mla_latent_" + stem + "_" + std::to_string(::getpid()) + ".safetensors"))
          .string();
  safetensors_writer wr;
  std::vector<tensor<float, 2>> keep;
  std::vector<tensor<float, 1>> keep_1d;
  keep.reserve(8);
  keep_1d.reserve(2);
  auto matrix = [&](const std::string& n, index_t out, index_t in) {
    keep.push_back(
        testing::random_normal<float, 2>({out, in}, rng, 1.0 / std::sqrt(static_cast<double>(in))));
    wr.add_as("L." + n, tensor_view<const float, 2>(keep.back().view()), type);
  };
  if (c.q_lora_rank > 0) {
    matrix("q_a_proj.weight", c.q_lora_rank, D);
    matrix("q_b_proj.weight", H * (dn + dr), c.q_lora_rank);
    const auto qn = testing::random_normal<float, 1>({c.q_lora_rank}, rng, 0.1, 1.0);
    keep_1d.push_back(tensor<float, 1>::copy_of(qn.view()));
    wr.add_as("L.q_a_layernorm.weight", tensor_view<const float, 1>(keep_1d.back().view()),
              dtype::f32);
  } else {
    matrix("q_proj.weight", H * (dn + dr), D);
  }
  matrix("kv_a_proj_with_mqa.weight", r + dr, D);
  matrix("kv_b_proj.weight", H * (dn + dv), r);
  matrix("o_proj.weight", D, H * dv);
  const auto norm = testing::random_normal<float, 1>({r}, rng, 0.1, 1.0);
  wr.add_as("L.kv_a_layernorm.weight", tensor_view<const float, 1>(norm.view()), dtype::f32);
  wr.save(path);
  return path;
}

struct pair_of_layers {
  layers::mla_attention expanded, latent;
};
pair_of_layers load_pair(layers::mla_attention_config c, dtype type, const std::string& stem,
                         std::uint64_t salt) {
  const std::string path = write_weights(c, type, stem, salt);
  const auto ck = checkpoint::open(path);
  c.cache = layers::mla_cache::expanded;
  auto e = layers::mla_attention::load(ck, "L.", c);
  c.cache = layers::mla_cache::latent;
  auto l = layers::mla_attention::load(ck, "L.", c);
  std::filesystem::remove(path);  // the layers hold copies (every run used to leave one behind)
  return {std::move(e), std::move(l)};
}

/// Kimi-Linear-48B's MLA (H 32, dn 128, dr 64, dv 128, r 512, hidden 2304) shrunk by 4 (heads
/// by 4 too; the sanitizer build by 8).
layers::mla_attention_config kimi_like() {
  const index_t f = testing::sanitized_build ? 2 : 1;
  layers::mla_attention_config c;
  c.hidden = 576 / f;
  c.heads = 8 / f;
  c.kv_lora_rank = 128 / f;
  c.qk_nope_dim = 32 / f;
  c.qk_rope_dim = 16 / f;
  c.v_dim = 32 / f;
  return c;
}

tensor<float, 2> token_rows(std::mt19937_64& rng, index_t B, index_t D) {
  return testing::random_normal<float, 2>({B, D}, rng);
}

/// n decode steps of both layers on the same random tokens, outputs compared every step.
void steps_agree(pair_of_layers& p, layers::attention_cache& ce, layers::attention_cache& cl,
                 std::mt19937_64& rng, index_t B, int n, const std::string& what) {
  const index_t D = p.latent.config().hidden;
  tensor<float, 2> ye({B, D}), yl({B, D});
  for (int s = 0; s < n; ++s) {
    const auto x = token_rows(rng, B, D);
    p.expanded.step(x.view(), ye.view(), ce);
    p.latent.step(x.view(), yl.view(), cl);
    check_rel(what + " step " + std::to_string(s), compare(ye, yl));
  }
}

}  // namespace

TEST_CASE("mla_attention latent cache: decode == expanded cache (prefill, snapshot, truncate, B>1)",
          "[layers][mla]") {
  const auto cfg = kimi_like();
  auto p = load_pair(cfg, dtype::f32, "kimi_like", 1);
  const index_t B = 2, T0 = 37, D = cfg.hidden;
  const index_t cap = testing::sanitized_build ? 300 : 1300;
  auto rng = testing::make_rng(11);
  auto ce = p.expanded.make_cache(B, cap), cl = p.latent.make_cache(B, cap);
  // memory per token: r + dr floats instead of H·(dn+dr+dv)
  CHECK(p.latent.cache_floats_per_token() == cfg.kv_lora_rank + cfg.qk_rope_dim);
  CHECK(p.expanded.cache_floats_per_token() ==
        cfg.heads * (cfg.qk_nope_dim + cfg.qk_rope_dim + cfg.v_dim));
  CHECK(cl.kv().storage_bytes() ==
        static_cast<std::size_t>(B * cap * (cfg.kv_lora_rank + cfg.qk_rope_dim)) * sizeof(float));
  // first prefill (empty caches: the expanded tiles), then a short one over the cache (absorbed)
  for (const index_t T : {T0, index_t(5)}) {
    const auto x = testing::random_normal<float, 3>({B, T, D}, rng);
    const auto ye = p.expanded.forward(x.view(), ce);
    const auto yl = p.latent.forward(x.view(), cl);
    check_rel("prefill T=" + std::to_string(T), compare(ye, yl));
  }
  REQUIRE(cl.length(0) == T0 + 5);
  steps_agree(p, ce, cl, rng, B, 4, "decode");
  // snapshot, diverge, restore, continue: both layers from the same restored point
  const auto se = ce.snapshot(), sl = cl.snapshot();
  steps_agree(p, ce, cl, rng, B, 3, "before restore");
  ce.restore(se);
  cl.restore(sl);
  REQUIRE(cl.length(1) == T0 + 9);
  steps_agree(p, ce, cl, rng, B, 3, "after restore");
  // truncate one sequence (rows at different positions), then decode
  ce.truncate(1, 20);
  cl.truncate(1, 20);
  steps_agree(p, ce, cl, rng, B, 3, "after truncate");
  // a long prefill over the filled cache (the cached latents expanded into a temporary cache),
  // then the split-KV path (>= 2 splits of 512 keys; the sanitizer build covers splits in the
  // allocation test)
  {
    const index_t T = cap - cl.length(0) - 8;
    const auto x = testing::random_normal<float, 3>({B, T, D}, rng, 0.5);
    const auto ye = p.expanded.forward(x.view(), ce);
    const auto yl = p.latent.forward(x.view(), cl);
    check_rel("long prefill over the cache", compare(ye, yl));
    // a short prefill (<= 16 tokens) over the long cache: split over the keys like decode
    const auto x3 = testing::random_normal<float, 3>({B, 3, D}, rng);
    check_rel("short prefill over the long cache",
              compare(p.expanded.forward(x3.view(), ce), p.latent.forward(x3.view(), cl)));
    steps_agree(p, ce, cl, rng, B, 3, "long decode L=" + std::to_string(cl.length(0)));
  }
}

TEST_CASE("mla_attention latent cache: state-index steps, packed prefill, odd sizes, bf16",
          "[layers][mla]") {
  SECTION("state-index rows of a shared cache == the expanded layer's") {
    const auto cfg = kimi_like();
    auto p = load_pair(cfg, dtype::f32, "rows", 2);
    auto rng = testing::make_rng(12);
    const index_t D = cfg.hidden;
    auto ce = p.expanded.make_cache(3, 64), cl = p.latent.make_cache(3, 64);
    const auto x = testing::random_normal<float, 3>({3, 9, D}, rng);
    check_rel("prefill", compare(p.expanded.forward(x.view(), ce), p.latent.forward(x.view(), cl)));
    const std::vector<index_t> rows{2, 0};
    tensor<float, 2> ye({2, D}), yl({2, D});
    for (int s = 0; s < 3; ++s) {
      const auto x2 = token_rows(rng, 2, D);
      p.expanded.step(x2.view(), ye.view(), ce, rows);
      p.latent.step(x2.view(), yl.view(), cl, rows);
      check_rel("rows {2, 0} step " + std::to_string(s), compare(ye, yl));
    }
    CHECK(cl.length(1) == 9);
    CHECK(cl.length(2) == 12);
  }
  SECTION("packed prefill into empty and into filled caches") {
    const auto cfg = kimi_like();
    auto p = load_pair(cfg, dtype::f32, "packed", 3);
    auto rng = testing::make_rng(13);
    const index_t D = cfg.hidden;
    auto ce = p.expanded.make_cache(3, 64), cl = p.latent.make_cache(3, 64);
    for (const std::vector<index_t>& cu :
         {std::vector<index_t>{0, 7, 8, 20}, std::vector<index_t>{0, 3, 13, 14}}) {
      const auto x = testing::random_normal<float, 3>({1, cu.back(), D}, rng);
      tensor<float, 3> ye({1, cu.back(), D}), yl({1, cu.back(), D});
      p.expanded.forward(x.view(), ye.view(), ce, cu);
      p.latent.forward(x.view(), yl.view(), cl, cu);
      check_rel("packed prefill", compare(ye, yl));
    }
    steps_agree(p, ce, cl, rng, 3, 2, "packed then decode");
  }
  SECTION("odd sizes: 5 heads, r = 36, no k_rot / k_rot of 3, explicit scale") {
    for (const index_t dr : {index_t(0), index_t(3)}) {
      layers::mla_attention_config cfg;
      cfg.hidden = 40;
      cfg.heads = 5;
      cfg.kv_lora_rank = 36;
      cfg.qk_nope_dim = 12;
      cfg.qk_rope_dim = dr;
      cfg.v_dim = 7;
      cfg.scale = 0.3f;
      auto p = load_pair(cfg, dtype::f32, "odd", 4 + static_cast<std::uint64_t>(dr));
      auto rng = testing::make_rng(14);
      const index_t T1 = testing::sanitized_build ? 150 : 600;
      auto ce = p.expanded.make_cache(2, T1 + 20), cl = p.latent.make_cache(2, T1 + 20);
      CHECK(cl.kv().value_dim() == std::max<index_t>(dr, 1));
      const auto x = testing::random_normal<float, 3>({2, 11, cfg.hidden}, rng);
      check_rel("odd prefill",
                compare(p.expanded.forward(x.view(), ce), p.latent.forward(x.view(), cl)));
      steps_agree(p, ce, cl, rng, 2, 2, "odd dr=" + std::to_string(dr));
      const auto x2 = testing::random_normal<float, 3>({2, T1, cfg.hidden}, rng);
      check_rel("odd long prefill",
                compare(p.expanded.forward(x2.view(), ce), p.latent.forward(x2.view(), cl)));
      steps_agree(p, ce, cl, rng, 2, 2, "odd split dr=" + std::to_string(dr));
    }
  }
  SECTION("q-LoRA (q_a_proj, q_a_layernorm, q_b_proj)") {
    auto cfg = kimi_like();
    cfg.q_lora_rank = 48;
    auto p = load_pair(cfg, dtype::f32, "qlora", 7);
    auto rng = testing::make_rng(17);
    auto ce = p.expanded.make_cache(2, 32), cl = p.latent.make_cache(2, 32);
    const auto x = testing::random_normal<float, 3>({2, 6, cfg.hidden}, rng);
    check_rel("q-LoRA prefill",
              compare(p.expanded.forward(x.view(), ce), p.latent.forward(x.view(), cl)));
    steps_agree(p, ce, cl, rng, 2, 3, "q-LoRA");
  }
  SECTION("bf16-stored weights: both caches on the same widened weights") {
    const auto cfg = kimi_like();
    auto p = load_pair(cfg, dtype::bf16, "bf16", 5);
    auto rng = testing::make_rng(15);
    auto ce = p.expanded.make_cache(1, 32), cl = p.latent.make_cache(1, 32);
    const auto x = testing::random_normal<float, 3>({1, 6, cfg.hidden}, rng);
    check_rel("bf16 prefill",
              compare(p.expanded.forward(x.view(), ce), p.latent.forward(x.view(), cl)));
    steps_agree(p, ce, cl, rng, 1, 3, "bf16");
  }
}

TEST_CASE("mla_attention latent cache: steps allocate nothing, cache geometry is checked",
          "[layers][mla]") {
  const auto cfg = kimi_like();
  auto p = load_pair(cfg, dtype::f32, "alloc", 6);
  auto rng = testing::make_rng(16);
  const index_t D = cfg.hidden;
  // B = 1 after 1100 tokens: decode in 2 splits of the keys (the sanitizer build: B = 1 only)
  const std::vector<index_t> batches =
      testing::sanitized_build ? std::vector<index_t>{1} : std::vector<index_t>{1, 3};
  for (const index_t B : batches) {
    auto cl = p.latent.make_cache(B, 1200);
    const auto x = testing::random_normal<float, 3>({B, 1100, D}, rng, 0.5);
    p.latent.forward(x.view(), cl);
    const auto x1 = token_rows(rng, B, D);
    tensor<float, 2> y({B, D});
    std::vector<index_t> rows(static_cast<std::size_t>(B));
    for (index_t i = 0; i < B; ++i) rows[static_cast<std::size_t>(i)] = B - 1 - i;
    // warm: sizes the scratch and every thread's arena (run alone, as CTest runs this test, no
    // earlier test has touched the workers' arenas)
    for (int s = 0; s < 2; ++s) {
      p.latent.step(x1.view(), y.view(), cl);
      p.latent.step(x1.view(), y.view(), cl, rows);
    }
    testing::allocation_scope scope;
    for (int s = 0; s < 4; ++s) {
      p.latent.step(x1.view(), y.view(), cl);
      p.latent.step(x1.view(), y.view(), cl, rows);
    }
    const auto allocations = scope.stats().count;  // read before INFO (its stream allocates)
    INFO("B = " << B);
    CHECK(allocations == 0);
    // 1 vs 2 threads: bitwise the same step (the key splits depend on the shape only)
    const auto snap = cl.snapshot();
    tensor<float, 2> y1({B, D}), y2({B, D});
    {
      scoped_num_threads one(1);
      p.latent.step(x1.view(), y1.view(), cl);
    }
    cl.restore(snap);
    {
      scoped_num_threads two(2);
      testing::require_team(2);
      p.latent.step(x1.view(), y2.view(), cl);
    }
    CHECK(compare(y1, y2).max_abs == 0);
  }
  // an expanded cache given to the latent layer (and the reverse) is named
  auto ce = p.expanded.make_cache(1, 8), cl = p.latent.make_cache(1, 8);
  tensor<float, 2> x({1, D}), y({1, D});
  CHECK_THROWS_AS(p.latent.step(x.view(), y.view(), ce), shape_error);
  CHECK_THROWS_WITH(p.latent.step(x.view(), y.view(), ce), Catch::Contains("latent"));
  CHECK_THROWS_AS(p.expanded.step(x.view(), y.view(), cl), shape_error);
  // capacity
  for (int s = 0; s < 8; ++s) p.latent.step(x.view(), y.view(), cl);
  CHECK_THROWS_WITH(p.latent.step(x.view(), y.view(), cl), Catch::Contains("capacity"));
}

TEST_CASE("kimi_linear model with the latent MLA cache matches transformers",
          "[golden][models][kimi][mla]") {
  const std::string name = "kimi_linear";
  const std::string dir =
      std::filesystem::path(gl::path("v2/models/" + name + "/config.json")).parent_path().string();
  const auto& vec = gl::file("v2/models/" + name + "/vectors");
  auto cfg = models::load_config(dir);
  cfg.mla.cache = layers::mla_cache::latent;
  auto m = models::hybrid_model::load(cfg, checkpoint::open(dir));
  const auto prompt = vec.get_flat<std::int64_t>("prompt_ids");
  auto cache = m.make_cache(1, 64);
  const auto logits = m.prefill(prompt, {}, cache, models::logits_mode::all);
  check_rel("prefill.logits", compare(vec.get<float, 2>("prefill.logits"), logits), 1e-4);
  // the MLA layer's cache is transformers' compressed one: keys = normed latent, values = k_rot
  const auto check_latent = [&](const std::string& prefix) {
    for (index_t i = 0; i < cache.num_layers(); ++i) {
      if (m.config().layers[static_cast<std::size_t>(i)].mixer != models::mixer_kind::mla) continue;
      const auto& kv = std::get<layers::attention_cache>(cache.layer(i)).kv();
      const std::string p = prefix + ".layer" + std::to_string(i) + ".";
      const auto lat = vec.get<float, 4>(p + "keys"), rot = vec.get<float, 4>(p + "values");
      REQUIRE(kv.held(0) == lat.extent(2));
      tensor<float, 4> ours_c(lat.shape()), ours_r(rot.shape());
      for (index_t t = 0; t < lat.extent(2); ++t) {
        for (index_t e = 0; e < lat.extent(3); ++e) ours_c(0, 0, t, e) = kv.keys(0, 0)(t, e);
        for (index_t e = 0; e < rot.extent(3); ++e) ours_r(0, 0, t, e) = kv.values(0, 0)(t, e);
      }
      check_rel(p + "keys (latent)", compare(lat, ours_c), 1e-4);
      check_rel(p + "values (k_rot)", compare(rot, ours_r), 1e-4);
    }
  };
  check_latent("cache_after_prefill");
  const index_t T = static_cast<index_t>(prompt.size());
  std::vector<std::int64_t> ours{models::greedy_token(
      {logits.data() + (T - 1) * m.vocab(), static_cast<std::size_t>(m.vocab())})};
  for (int j = 1; j <= 4; ++j) {
    const std::string p = "decode.step" + std::to_string(j) + ".";
    const auto in = vec.get_flat<std::int64_t>(p + "input_id");
    REQUIRE(in.size() == 1);
    CHECK(in[0] == ours.back());
    const auto l = m.decode(in, cache);
    tensor<float, 1> l1({m.vocab()});
    std::copy_n(l.data(), m.vocab(), l1.data());
    check_rel(p + "logits", compare(vec.get<float, 1>(p + "logits"), l1), 1e-4);
    ours.push_back(models::greedy_token({l.data(), static_cast<std::size_t>(m.vocab())}));
    CHECK(ours.back() == vec.get_flat<std::int64_t>(p + "next_id")[0]);
  }
  CHECK(ours == vec.get_flat<std::int64_t>("decode.generated_ids"));
  check_latent("cache_after_decode");
}
