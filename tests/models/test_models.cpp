// SPDX-License-Identifier: MIT
// Models tier (issue 14): the golden transformers checkpoints of tests/golden/v2/models
// (qwen3_next, mamba2_hybrid) loaded as they are: prefill logits, every hidden state, the
// routers, the caches after prefill and after decode, the greedy decode steps and the full
// forward; the MoE FFN layer against moe_blocks; packed batch == separate runs; snapshot /
// restore; config and checkpoint errors; sampling.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <string>
#include <tuple>
#include <unistd.h>
#include <vector>

#include <catch2/catch.hpp>

#include <seqmix/core/io/checkpoint.hpp>
#include <seqmix/core/safetensors.hpp>
#include <seqmix/layers/moe_ffn.hpp>
#include <seqmix/mixers/mamba2_ssd.hpp>
#include <seqmix/models/models.hpp>

#include "alloc_counter.hpp"
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

/// An MLA layer's decompressed cache (keys [1, H, L, dn+dr], values [1, H, L, dv]) against
/// transformers' compressed one (`keys` = the normed latent [1, 1, L, r], `values` = k_rot
/// [1, 1, L, dr]): k_rot is every head's key tail; kv_b_proj(latent) gives [k_nope | v].
void check_mla_cache(const std::string& model, index_t layer, const layers::mla_attention_config& c,
                     const layers::attention_cache& a, const std::string& p) {
  const auto lat = vec<4>(model, p + "keys");
  const auto rot = vec<4>(model, p + "values");
  const auto keys = kv_of(a, true), vals = kv_of(a, false);
  const index_t H = c.heads, L = lat.extent(2), r = c.kv_lora_rank, dn = c.qk_nope_dim,
                dr = c.qk_rope_dim, dv = c.v_dim;
  REQUIRE(keys.extent(2) == L);
  const auto wb = gl::file("v2/models/" + model + "/model")
                      .get<float, 2>("model.layers." + std::to_string(layer) +
                                     ".self_attn.kv_b_proj.weight");  // [H·(dn+dv), r]
  tensor<float, 4> ref_k({1, H, L, dn + dr}), ref_v({1, H, L, dv});
  for (index_t h = 0; h < H; ++h)
    for (index_t t = 0; t < L; ++t) {
      for (index_t e = 0; e < dn + dv; ++e) {
        double acc = 0;
        for (index_t j = 0; j < r; ++j) acc += double(wb(h * (dn + dv) + e, j)) * lat(0, 0, t, j);
        if (e < dn) {
          ref_k(0, h, t, e) = static_cast<float>(acc);
        } else {
          ref_v(0, h, t, e - dn) = static_cast<float>(acc);
        }
      }
      for (index_t e = 0; e < dr; ++e) ref_k(0, h, t, dn + e) = rot(0, 0, t, e);
    }
  check_rel(model + " " + p + "keys (k_nope = kv_b(latent) | k_rot)", compare(ref_k, keys));
  check_rel(model + " " + p + "values (kv_b(latent))", compare(ref_v, vals));
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
    } else if (m.config().layers[static_cast<std::size_t>(i)].mixer == models::mixer_kind::mla) {
      check_mla_cache(model, i, m.config().mla, std::get<layers::attention_cache>(e), p);
    } else {
      const auto& a = std::get<layers::attention_cache>(e);
      check_rel(model + " " + p + "keys", compare(vec<4>(model, p + "keys"), kv_of(a, true)));
      check_rel(model + " " + p + "values", compare(vec<4>(model, p + "values"), kv_of(a, false)));
    }
  }
}

/// The whole golden protocol on one model (unordered_ids: the router's top-k ids as a set,
/// compared with their weights as pairs sorted by id: Kimi's topk(sorted=False)).
void golden_model(const std::string& name, bool unordered_ids = false) {
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
    if (unordered_ids) {
      const index_t k = ids.extent(1);
      tensor<float, 2> w_ref({T, k}), w_ours({T, k});
      for (index_t t = 0; t < T; ++t) {
        std::vector<std::pair<std::int64_t, float>> a, b;
        for (index_t j = 0; j < k; ++j) {
          a.emplace_back(ids(t, j), w(t, j));
          b.emplace_back(static_cast<std::int64_t>(r.ids(t, j)), r.weights(t, j));
        }
        std::sort(a.begin(), a.end());
        std::sort(b.begin(), b.end());
        for (index_t j = 0; j < k; ++j) {
          diff += a[static_cast<std::size_t>(j)].first != b[static_cast<std::size_t>(j)].first;
          w_ref(t, j) = a[static_cast<std::size_t>(j)].second;
          w_ours(t, j) = b[static_cast<std::size_t>(j)].second;
        }
      }
      CHECK(diff == 0);
      check_rel(name + " " + p + "topk_weights (sorted by id)", compare(w_ref, w_ours));
    } else {
      for (index_t t = 0; t < T; ++t)
        for (index_t j = 0; j < ids.extent(1); ++j)
          diff += ids(t, j) != static_cast<std::int64_t>(r.ids(t, j));
      CHECK(diff == 0);
      check_rel(name + " " + p + "topk_weights", compare(w, r.weights));
    }
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

TEST_CASE("kimi_linear model matches transformers' KimiLinearForCausalLM",
          "[golden][models][kimi]") {
  golden_model("kimi_linear", true);
}

// --- the MoE FFN layer alone: transformers' MoE blocks ------------------------------------------

namespace {

void golden_moe_block(const std::string& block, const std::string& weights,
                      layers::moe_ffn_config cfg) {
  const auto& f = gl::file("v2/moe_blocks");
  const auto ck = checkpoint::open(gl::path("v2/moe_blocks.safetensors"));
  const auto layer = layers::moe_ffn::load(ck, weights + ".w.", cfg);
  const auto x = f.get<float, 2>(block + ".x");
  const index_t T = x.extent(0), k = cfg.routing.top_k;
  tensor<float, 2> y({T, cfg.hidden}), logits({T, cfg.experts}), w({T, k});
  tensor<index_t, 2> ids({T, k});
  layer.forward(x.view(), y.view(), {logits.view(), ids.view(), w.view()});
  check_rel(block + ".y", compare(f.get<float, 2>(block + ".y"), y), 1e-5);
  check_rel(block + ".router_logits", compare(f.get<float, 2>(block + ".router_logits"), logits),
            1e-5);
  // pairs sorted by expert id (DeepSeek's topk is unsorted)
  const auto ref_ids = f.get<std::int64_t, 2>(block + ".topk_ids_sorted");
  const auto ref_w = f.get<float, 2>(block + ".topk_weights_sorted");
  tensor<float, 2> ws({T, k});
  index_t diff = 0;
  for (index_t t = 0; t < T; ++t) {
    std::vector<std::pair<index_t, float>> p;
    for (index_t j = 0; j < k; ++j) p.emplace_back(ids(t, j), w(t, j));
    std::sort(p.begin(), p.end());
    for (index_t j = 0; j < k; ++j) {
      diff += p[static_cast<std::size_t>(j)].first != ref_ids(t, j);
      ws(t, j) = p[static_cast<std::size_t>(j)].second;
    }
  }
  INFO(block << " expert ids differing: " << diff);
  CHECK(diff == 0);
  check_rel(block + ".topk_weights", compare(ref_w, ws), 1e-5);
}

layers::moe_ffn_config block_cfg(moe_options r, layers::moe_ffn_names n, index_t shared) {
  layers::moe_ffn_config c;
  c.hidden = 64;
  c.experts = 8;
  c.expert_dim = 32;
  c.shared_dim = shared;
  c.routing = r;
  c.names = std::move(n);
  return c;
}

}  // namespace

TEST_CASE("moe_ffn matches transformers' MoE blocks (moe_blocks)", "[golden][models][moe_ffn]") {
  using N = layers::moe_ffn_names;
  golden_moe_block("qwen3_next", "qwen3_next",
                   block_cfg(moe_options::qwen_moe(true), N::transformers_fused(true, true), 48));
  golden_moe_block("mixtral", "mixtral",
                   block_cfg(moe_options::mixtral(), N::transformers_fused(false, false), 0));
  golden_moe_block("qwen3_moe_norm", "qwen3_moe_norm",
                   block_cfg(moe_options::qwen_moe(true), N::transformers_fused(false, false), 0));
  golden_moe_block("qwen3_moe_nonorm", "qwen3_moe_norm",
                   block_cfg(moe_options::qwen_moe(false), N::transformers_fused(false, false), 0));
  auto ds = N::transformers_fused(true, false, "shared_experts.");
  ds.score_bias = "gate.e_score_correction_bias";
  golden_moe_block("deepseek_v3", "deepseek_v3",
                   block_cfg(moe_options::deepseek_v3(4, 2, 2.5f, 2), ds, 32));
}

// --- batches, snapshots ------------------------------------------------------------------------

namespace {

tensor<float, 2> rows(const tensor<float, 2>& t, index_t r0, index_t r1) {
  tensor<float, 2> out({r1 - r0, t.extent(1)});
  std::copy(t.data() + r0 * t.extent(1), t.data() + r1 * t.extent(1), out.data());
  return out;
}

void packed_equals_separate(const std::string& name) {
  auto m = models::hybrid_model::load(model_dir(name));
  const auto a = ids_of(name, "prompt_ids");                 // 37 tokens
  std::vector<std::int64_t> b(a.rbegin(), a.rbegin() + 21);  // 21 others
  std::vector<std::int64_t> ab(a);
  ab.insert(ab.end(), b.begin(), b.end());
  const std::vector<index_t> cu{0, 37, 58};
  auto cp = m.make_cache(2, 64);
  const auto lp = m.prefill(ab, cu, cp);
  auto ca = m.make_cache(1, 64), cb = m.make_cache(1, 64);
  const auto la = m.prefill(a, {}, ca);
  const auto lb = m.prefill(b, {}, cb);
  check_rel(name + " packed sequence 0", compare(la, rows(lp, 0, 37)), 1e-5);
  check_rel(name + " packed sequence 1", compare(lb, rows(lp, 37, 58)), 1e-5);
  // last-token logits of the packed prefill
  auto cl = m.make_cache(2, 64);
  const auto ll = m.prefill(ab, cu, cl, models::logits_mode::last);
  REQUIRE(ll.extent(0) == 2);
  check_rel(name + " last logits 0", compare(rows(lp, 36, 37), rows(ll, 0, 1)), 1e-6);
  check_rel(name + " last logits 1", compare(rows(lp, 57, 58), rows(ll, 1, 2)), 1e-6);
  // two decode steps: batch of two == each alone
  std::vector<std::int64_t> next{5, 17};
  for (int s = 0; s < 2; ++s) {
    const auto d2 = m.decode(next, cp);
    const auto da = m.decode(std::vector<std::int64_t>{next[0]}, ca);
    const auto db = m.decode(std::vector<std::int64_t>{next[1]}, cb);
    check_rel(name + " batched decode 0", compare(da, rows(d2, 0, 1)), 1e-5);
    check_rel(name + " batched decode 1", compare(db, rows(d2, 1, 2)), 1e-5);
    next = {models::greedy_token({d2.data(), static_cast<std::size_t>(m.vocab())}),
            models::greedy_token({d2.data() + m.vocab(), static_cast<std::size_t>(m.vocab())})};
  }
  CHECK(cp.length(0) == 39);
  CHECK(cp.length(1) == 23);
}

// continuous batching: rows {2, 0} of a 3-row cache stepped by state indices == each stream
// decoded on its own cache; row 1 untouched (and decoding it afterwards still matches)
void state_index_decode(const std::string& name) {
  auto m = models::hybrid_model::load(model_dir(name));
  const auto a = ids_of(name, "prompt_ids");                 // 37 tokens
  std::vector<std::int64_t> b(a.rbegin(), a.rbegin() + 21);  // 21 others
  std::vector<std::int64_t> c(a.begin() + 5, a.begin() + 18);
  std::vector<std::int64_t> acb(a);
  acb.insert(acb.end(), c.begin(), c.end());
  acb.insert(acb.end(), b.begin(), b.end());
  const index_t na = 37, nc = 13, nb = 21;
  const std::vector<index_t> cu{0, na, na + nc, na + nc + nb};
  auto shared = m.make_cache(3, 64);
  m.prefill(acb, cu, shared, models::logits_mode::last);
  auto ca = m.make_cache(1, 64), cb = m.make_cache(1, 64), cc = m.make_cache(1, 64);
  m.prefill(a, {}, ca, models::logits_mode::last);
  m.prefill(b, {}, cb, models::logits_mode::last);
  m.prefill(c, {}, cc, models::logits_mode::last);
  const std::vector<index_t> sidx{2, 0};
  std::vector<std::int64_t> next{17, 5};  // b's token, a's token
  for (int s = 0; s < 3; ++s) {
    const auto d2 = m.decode(next, sidx, shared);
    const auto db = m.decode(std::vector<std::int64_t>{next[0]}, cb);
    const auto da = m.decode(std::vector<std::int64_t>{next[1]}, ca);
    check_rel(name + " state-index decode row 2", compare(db, rows(d2, 0, 1)), 1e-5);
    check_rel(name + " state-index decode row 0", compare(da, rows(d2, 1, 2)), 1e-5);
    next = {models::greedy_token({d2.data(), static_cast<std::size_t>(m.vocab())}),
            models::greedy_token({d2.data() + m.vocab(), static_cast<std::size_t>(m.vocab())})};
  }
  CHECK(shared.length(0) == na + 3);
  CHECK(shared.length(1) == nc);
  CHECK(shared.length(2) == nb + 3);
  const std::vector<index_t> row1{1};
  const auto d1 = m.decode(std::vector<std::int64_t>{9}, row1, shared);
  const auto dc = m.decode(std::vector<std::int64_t>{9}, cc);
  check_rel(name + " state-index decode row 1 after the others", compare(dc, d1), 1e-5);
  // a warm indexed step allocates nothing (decode_into)
  tensor<float, 2> out({2, m.vocab()});
  const std::vector<std::int64_t> ids2{1, 2};
  m.decode_into(ids2, sidx, shared, out.view());
  {
    testing::allocation_scope scope;
    m.decode_into(ids2, sidx, shared, out.view());
    CHECK(scope.stats().count == 0);
  }
  std::string err;
  try {
    m.decode(next, std::vector<index_t>{0, 0}, shared);
  } catch (const shape_error& e) {
    err = e.what();
  }
  CHECK(err.find("hybrid_model::decode") != std::string::npos);
  CHECK(err.find("both row 0") != std::string::npos);
  CHECK_THROWS_AS(m.decode(next, std::vector<index_t>{0, 3}, shared), shape_error);
}

void snapshot_round_trip(const std::string& name) {
  auto m = models::hybrid_model::load(model_dir(name));
  const auto a = ids_of(name, "prompt_ids");
  auto c = m.make_cache(1, 64);
  m.prefill(a, {}, c, models::logits_mode::last);
  const auto snap = c.snapshot();
  const std::vector<std::int64_t> t1{3}, t2{99};
  const auto l1 = m.decode(t1, c);
  const auto l2 = m.decode(t2, c);
  CHECK(c.length(0) == 39);
  // a different continuation, then back to the snapshot
  m.decode(std::vector<std::int64_t>{400}, c);
  c.restore(snap);
  CHECK(c.length(0) == 37);
  const auto r1 = m.decode(t1, c);
  const auto r2 = m.decode(t2, c);
  CHECK(testing::bitwise_equal(l1, r1));
  CHECK(testing::bitwise_equal(l2, r2));
  // a snapshot of another batch size is refused, the cache untouched
  auto other = m.make_cache(2, 64);
  CHECK_THROWS_AS(c.restore(other.snapshot()), shape_error);
  CHECK(c.length(0) == 39);
  CHECK(c.bytes() > 0);
}

}  // namespace

TEST_CASE("models: a packed batch of two prompts == two separate runs", "[models]") {
  packed_equals_separate("qwen3_next");
  packed_equals_separate("mamba2_hybrid");
  packed_equals_separate("kimi_linear");
}

TEST_CASE("models: cache snapshot / restore round trip", "[models]") {
  snapshot_round_trip("qwen3_next");
}

TEST_CASE("models: decode by state indices (rows {2, 0} of 3) == each sequence on its own cache",
          "[models]") {
  state_index_decode("qwen3_next");
  snapshot_round_trip("mamba2_hybrid");
  snapshot_round_trip("kimi_linear");
}

// --- checkpoints and configs that do not match ---------------------------------------------------

namespace {

std::filesystem::path temp_model(const std::string& tag) {
  const auto p = std::filesystem::temp_directory_path() /
                 ("seqmix_models_" + tag + "_" + std::to_string(::getpid()) + "_" +
                  std::to_string(Catch::rngSeed()));
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  return p;
}

/// The golden model's tensors re-written into `dir` (dropping, adding, reshaping or widening
/// to bf16 as asked) with its config.json.
void write_model(const std::string& name, const std::filesystem::path& dir,
                 const std::string& drop = {}, const std::string& extra = {},
                 const std::string& reshape = {}, int bf16_mode = 0) {
  const auto ck = checkpoint::open(model_dir(name));
  safetensors_writer w;
  for (const auto& n : ck.names()) {
    if (n == drop) continue;
    const auto& info = ck.info(n);
    if (n == reshape) {
      std::vector<index_t> s = info.shape;
      s.back() += 1;
      w.add(any_tensor(n, dtype::f32, s));
    } else if (bf16_mode == 1) {  // stored as bf16
      const auto f = ck.get_flat<float>(n);
      any_tensor t(n, dtype::bf16, info.shape);
      auto* d = reinterpret_cast<bf16*>(t.mutable_data());
      for (std::size_t i = 0; i < f.size(); ++i) d[i] = bf16_from_float(f[i]);
      w.add(std::move(t));
    } else if (bf16_mode == 2) {  // rounded to bf16, stored as f32
      const auto f = ck.get_flat<float>(n);
      any_tensor t(n, dtype::f32, info.shape);
      auto* d = reinterpret_cast<float*>(t.mutable_data());
      for (std::size_t i = 0; i < f.size(); ++i) d[i] = static_cast<float>(bf16_from_float(f[i]));
      w.add(std::move(t));
    } else {
      w.add(ck.at(n));
    }
  }
  if (!extra.empty()) w.add(any_tensor(extra, dtype::f32, {4}));
  w.save((dir / "model.safetensors").string());
  std::filesystem::copy_file(std::filesystem::path(model_dir(name)) / "config.json",
                             dir / "config.json",
                             std::filesystem::copy_options::overwrite_existing);
}

void write_config(const std::string& name, const std::filesystem::path& dir,
                  const std::function<void(nlohmann::json&)>& edit) {
  std::ifstream in(std::filesystem::path(model_dir(name)) / "config.json");
  nlohmann::json j = nlohmann::json::parse(in);
  edit(j);
  std::ofstream(dir / "config.json") << j.dump(2);
}

template <class E>
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace

TEST_CASE("models: missing, extra, mis-shaped tensors and truncated files are clear errors",
          "[models]") {
  const auto dir = temp_model("errors");
  const auto load = [&] { (void)models::hybrid_model::load(dir.string()); };
  SECTION("missing tensor") {
    write_model("qwen3_next", dir, "model.layers.1.linear_attn.A_log");
    const auto msg = error_of<io_error>(load);
    INFO(msg);
    CHECK(msg.find("1 tensor(s) missing: model.layers.1.linear_attn.A_log") != std::string::npos);
  }
  SECTION("missing kimi_linear tensors (KDA conv, MLA kv_b) and a mis-shaped one") {
    write_model("kimi_linear", dir, "model.layers.3.self_attn.v_conv1d.weight");
    auto msg = error_of<io_error>(load);
    INFO(msg);
    CHECK(msg.find("1 tensor(s) missing: model.layers.3.self_attn.v_conv1d.weight") !=
          std::string::npos);
    write_model("kimi_linear", dir, "model.layers.2.self_attn.kv_b_proj.weight");
    msg = error_of<io_error>(load);
    INFO(msg);
    CHECK(msg.find("missing: model.layers.2.self_attn.kv_b_proj.weight") != std::string::npos);
    write_model("kimi_linear", dir, {}, {}, "model.layers.1.self_attn.dt_bias");
    msg = error_of<io_error>(load);
    INFO(msg);
    CHECK(msg.find("model.layers.1.self_attn.dt_bias") != std::string::npos);
    CHECK(msg.find("expected shape [128]") != std::string::npos);
  }
  SECTION("extra tensor") {
    write_model("mamba2_hybrid", dir, {}, "model.layers.0.mamba.extra_bias");
    const auto msg = error_of<io_error>(load);
    INFO(msg);
    CHECK(msg.find("does not use: model.layers.0.mamba.extra_bias") != std::string::npos);
    models::load_options opt;
    opt.allow_unused = true;
    const auto m = models::hybrid_model::load(models::load_config(dir.string()),
                                              checkpoint::open(dir.string()), opt);
    CHECK(m.unused_tensors() == std::vector<std::string>{"model.layers.0.mamba.extra_bias"});
  }
  SECTION("mis-shaped tensor") {
    write_model("qwen3_next", dir, {}, {}, "model.layers.2.self_attn.q_norm.weight");
    const auto msg = error_of<io_error>(load);
    INFO(msg);
    CHECK(msg.find("model.layers.2.self_attn.q_norm.weight") != std::string::npos);
    CHECK(msg.find("expected shape [32]") != std::string::npos);
    CHECK(msg.find("got shape [33]") != std::string::npos);
  }
  SECTION("truncated checkpoint") {
    write_model("qwen3_next", dir);
    const auto file = dir / "model.safetensors";
    const auto size = std::filesystem::file_size(file);
    std::filesystem::resize_file(file, size / 2);
    const auto msg = error_of<io_error>(load);
    INFO(msg);
    CHECK(msg.find("model.safetensors") != std::string::npos);
    CHECK(msg != "(no error)");
  }
  SECTION("no checkpoint in the folder") {
    write_config("qwen3_next", dir, [](nlohmann::json&) {});
    const auto msg = error_of<io_error>(load);
    INFO(msg);
    CHECK(msg.find("holds neither") != std::string::npos);
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("models: unknown model_type, unknown fields, unsupported values are clear errors",
          "[models]") {
  const auto dir = temp_model("config");
  const auto parse = [&] { (void)models::load_config(dir.string()); };
  SECTION("unknown model_type") {
    write_config("qwen3_next", dir, [](nlohmann::json& j) { j["model_type"] = "llama"; });
    const auto msg = error_of<io_error>(parse);
    INFO(msg);
    CHECK(msg.find("unknown model_type \"llama\"") != std::string::npos);
    CHECK(msg.find("qwen3_next, granitemoehybrid") != std::string::npos);
  }
  SECTION("unknown fields, all listed") {
    write_config("mamba2_hybrid", dir, [](nlohmann::json& j) {
      j["mamba_fancy_mode"] = true;
      j["zz_other"] = 3;
    });
    const auto msg = error_of<io_error>(parse);
    INFO(msg);
    CHECK(msg.find("2 field(s)") != std::string::npos);
    CHECK(msg.find("\"mamba_fancy_mode\", \"zz_other\"") != std::string::npos);
  }
  SECTION("unsupported value") {
    write_config("qwen3_next", dir, [](nlohmann::json& j) { j["hidden_act"] = "gelu"; });
    const auto msg = error_of<io_error>(parse);
    INFO(msg);
    CHECK(msg.find("\"hidden_act\" is \"gelu\"") != std::string::npos);
  }
  SECTION("layer_types of the wrong length") {
    write_config("qwen3_next", dir, [](nlohmann::json& j) { j["layer_types"].erase(0); });
    const auto msg = error_of<io_error>(parse);
    INFO(msg);
    CHECK(msg.find("\"layer_types\" must be an array of num_hidden_layers = 4") !=
          std::string::npos);
  }
  SECTION("kimi_linear: another family's fields are listed, unsupported values named") {
    write_config("qwen3_next", dir, [](nlohmann::json& j) { j["model_type"] = "kimi_linear"; });
    auto msg = error_of<io_error>(parse);
    INFO(msg);
    CHECK(msg.find("kimi_linear loader does not understand") != std::string::npos);
    CHECK(msg.find("\"linear_num_key_heads\"") != std::string::npos);
    write_config("kimi_linear", dir, [](nlohmann::json& j) { j["mlp_layer_types"][1] = "moe"; });
    msg = error_of<io_error>(parse);
    INFO(msg);
    CHECK(msg.find("\"mlp_layer_types\"[1] is \"moe\"") != std::string::npos);
    write_config("kimi_linear", dir, [](nlohmann::json& j) { j["qk_head_dim"] = 48; });
    msg = error_of<io_error>(parse);
    INFO(msg);
    CHECK(msg.find("\"qk_head_dim\" is 48") != std::string::npos);
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("models: config patterns and multipliers as each family reads them", "[models]") {
  const auto q = models::load_config(model_dir("qwen3_next"));
  REQUIRE(q.num_layers() == 4);
  CHECK(q.layers[2].mixer == models::mixer_kind::attention);
  CHECK(q.layers[0].mixer == models::mixer_kind::gated_deltanet);
  CHECK(q.layers[3].ffn == models::ffn_kind::dense);  // mlp_only_layers
  CHECK(q.layers[0].ffn == models::ffn_kind::moe);
  CHECK(q.attention.partial_rotary == 0.25);
  CHECK(q.norm_mode == layers::norm_weight::one_plus);
  const auto g = models::load_config(model_dir("mamba2_hybrid"));
  CHECK(g.layers[1].mixer == models::mixer_kind::attention);
  CHECK(g.layers[0].mixer == models::mixer_kind::mamba2);
  CHECK(g.embedding_multiplier == 2.0f);
  CHECK(g.residual_multiplier == 0.5f);
  CHECK(g.logits_scaling == 4.0f);
  CHECK(g.attention.scale.value() == 0.125f);
  CHECK(std::isinf(g.mamba.dt_max));
  const auto k = models::load_config(model_dir("kimi_linear"));
  REQUIRE(k.num_layers() == 4);
  CHECK(k.family == models::model_family::kimi_linear);
  CHECK(k.layers[2].mixer == models::mixer_kind::mla);
  CHECK(k.layers[0].mixer == models::mixer_kind::kda);
  CHECK(k.layers[0].ffn == models::ffn_kind::dense);
  CHECK(k.layers[1].ffn == models::ffn_kind::moe);
  CHECK(k.mla.kv_norm_eps == 1e-6f);
  CHECK(k.kda.norm_eps == 1e-5f);
  CHECK(k.mla.q_lora_rank == 0);
  CHECK(k.moe.shared_dim == 32);
  CHECK(k.moe.routing.n_group == 2);
  CHECK(k.moe.routing.routed_scaling_factor == 2.446f);
  CHECK(k.ffn_prefix == "block_sparse_moe.");
  {  // without mlp_layer_types: first_k_dense_replace and moe_layer_freq
    nlohmann::json kj;
    std::ifstream in(std::filesystem::path(model_dir("kimi_linear")) / "config.json");
    kj = nlohmann::json::parse(in);
    kj.erase("mlp_layer_types");
    kj["first_k_dense_replace"] = 2;
    const auto kd = models::parse_config(kj, "test");
    CHECK(kd.layers[1].ffn == models::ffn_kind::dense);
    CHECK(kd.layers[2].ffn == models::ffn_kind::moe);
    CHECK(kd.layers[3].ffn == models::ffn_kind::moe);
  }
  // the default pattern without layer_types: every full_attention_interval-th layer
  nlohmann::json j;
  {
    std::ifstream in(std::filesystem::path(model_dir("qwen3_next")) / "config.json");
    j = nlohmann::json::parse(in);
  }
  j.erase("layer_types");
  j["num_hidden_layers"] = 8;
  j["full_attention_interval"] = 4;
  j["mlp_only_layers"] = nlohmann::json::array();
  const auto d = models::parse_config(j, "test");
  for (index_t i = 0; i < 8; ++i) {
    CHECK((d.layers[static_cast<std::size_t>(i)].mixer == models::mixer_kind::attention) ==
          (i % 4 == 3));
    CHECK(d.layers[static_cast<std::size_t>(i)].ffn == models::ffn_kind::moe);
  }
}

TEST_CASE("models: bf16 checkpoints run as the f32 model of the same (rounded) weights",
          "[models]") {
  // bf16 storage is exact widening: the bf16 model must equal, to f32 rounding, the f32 model
  // whose weights are the bf16 values (the f32 original is further away: a routing flip)
  const auto d16 = temp_model("bf16"), d32 = temp_model("bf16r");
  write_model("qwen3_next", d16, {}, {}, {}, 1);
  write_model("qwen3_next", d32, {}, {}, {}, 2);
  auto m16 = models::hybrid_model::load(d16.string());
  auto m32 = models::hybrid_model::load(d32.string());
  const auto a = ids_of("qwen3_next", "prompt_ids");
  auto c16 = m16.make_cache(1, 64), c32 = m32.make_cache(1, 64);
  const auto l16 = m16.prefill(a, {}, c16);
  const auto l32 = m32.prefill(a, {}, c32);
  check_rel("bf16 vs rounded f32 prefill", compare(l32, l16), 1e-5);
  const std::vector<std::int64_t> t{7};
  check_rel("bf16 vs rounded f32 decode", compare(m32.decode(t, c32), m16.decode(t, c16)), 1e-5);
  std::filesystem::remove_all(d16);
  std::filesystem::remove_all(d32);
}

TEST_CASE("models: experts packed (the default) or read as stored agree to rounding", "[models]") {
  // the two GEMV/GEMM paths round differently; through the layers that stays within the
  // model's golden tolerance against transformers (1e-5)
  const auto a = ids_of("qwen3_next", "prompt_ids");
  auto packed = models::hybrid_model::load(model_dir("qwen3_next"));
  auto mapped = models::hybrid_model::load(model_dir("qwen3_next"), {.pack_experts = false});
  auto cp = packed.make_cache(1, 64), cm = mapped.make_cache(1, 64);
  check_rel("packed vs mapped experts, prefill",
            compare(mapped.prefill(a, {}, cm), packed.prefill(a, {}, cp)), 1e-5);
  const std::vector<std::int64_t> t{7};
  check_rel("packed vs mapped experts, decode", compare(mapped.decode(t, cm), packed.decode(t, cp)),
            1e-6);
}

TEST_CASE("models: sampling is greedy at temperature 0 and reproducible by seed", "[models]") {
  const std::vector<float> l{0.1f, 2.0f, 2.0f, -1.0f, 1.9f};
  CHECK(models::greedy_token(l) == 1);  // first of the equal maxima
  models::sampler g({0.0f, 1.0f, 7});
  CHECK(g.sample(l) == 1);
  models::sampler a({1.0f, 0.9f, 42}), b({1.0f, 0.9f, 42});
  std::vector<int> count(5, 0);
  for (int i = 0; i < 400; ++i) {
    const auto x = a.sample(l);
    CHECK(x == b.sample(l));
    ++count[static_cast<std::size_t>(x)];
  }
  CHECK(count[0] == 0);  // outside the 0.9 nucleus
  CHECK(count[3] == 0);
  CHECK(count[1] > 50);
  CHECK(count[2] > 50);
  CHECK(count[4] > 50);
  models::sampler tiny({1.0f, 1e-6f, 1});
  for (int i = 0; i < 20; ++i) CHECK(tiny.sample(l) == 1);
  CHECK_THROWS_AS(models::sampler({1.0f, 0.0f, 1}), shape_error);
  const std::vector<float> bad{0.0f, NAN};
  CHECK_THROWS_AS(a.sample(bad), shape_error);
}

TEST_CASE("models: bad prefill / decode arguments name the argument", "[models]") {
  auto m = models::hybrid_model::load(model_dir("qwen3_next"));
  auto c = m.make_cache(1, 8);
  const std::vector<std::int64_t> bad{1, 512};
  auto msg = error_of<shape_error>([&] { m.prefill(bad, {}, c); });
  CHECK(msg.find("hybrid_model::prefill") != std::string::npos);
  CHECK(msg.find("entry 1 is 512") != std::string::npos);
  const std::vector<std::int64_t> ten(10, 3);
  msg = error_of<shape_error>([&] { m.prefill(ten, {}, c); });
  CHECK(msg.find("capacity is 8") != std::string::npos);
  CHECK(c.length(0) == 0);
  const std::vector<std::int64_t> two{1, 2};
  msg = error_of<shape_error>([&] { m.decode(two, c); });
  CHECK(msg.find("2 rows") != std::string::npos);
  const std::vector<index_t> cu{0, 1, 2};
  msg = error_of<shape_error>([&] { m.prefill(two, cu, c); });
  CHECK(msg.find("cache") != std::string::npos);
}

TEST_CASE("models: a warm decode step allocates nothing", "[models]") {
  for (const std::string name : {"qwen3_next", "mamba2_hybrid", "kimi_linear"}) {
    auto m = models::hybrid_model::load(model_dir(name));
    auto c = m.make_cache(2, 64);
    const auto a = ids_of(name, "prompt_ids");
    std::vector<std::int64_t> ab(a);
    ab.insert(ab.end(), a.begin(), a.begin() + 5);
    const std::vector<index_t> cu{0, 37, 42};
    m.prefill(ab, cu, c, models::logits_mode::last);
    tensor<float, 2> logits({2, m.vocab()});
    std::vector<std::int64_t> next{1, 2};
    m.decode_into(next, c, logits.view());  // warm-up: scratch reaches its size
    m.decode_into(next, c, logits.view());
    std::size_t count = 0;
    {
      testing::allocation_scope scope;
      for (int s = 0; s < 3; ++s) m.decode_into(next, c, logits.view());
      count = scope.stats().count;
    }
    INFO(name);
    CHECK(count == 0);
  }
}

TEST_CASE("models: a prefill in two parts == one prefill (the cache continues)", "[models]") {
  for (const std::string name : {"qwen3_next", "mamba2_hybrid", "kimi_linear"}) {
    auto m = models::hybrid_model::load(model_dir(name));
    const auto a = ids_of(name, "prompt_ids");
    auto c1 = m.make_cache(1, 64), c2 = m.make_cache(1, 64);
    const auto whole = m.prefill(a, {}, c1);
    const std::vector<std::int64_t> p1(a.begin(), a.begin() + 20), p2(a.begin() + 20, a.end());
    const auto l1 = m.prefill(p1, {}, c2);
    const auto l2 = m.prefill(p2, {}, c2);
    CHECK(c2.length(0) == 37);
    check_rel(name + " first part", compare(rows(whole, 0, 20), l1), 1e-5);
    check_rel(name + " second part", compare(rows(whole, 20, 37), l2), 1e-5);
  }
}

TEST_CASE("kda_layer, mla_attention: prefill then steps == one prefill, cache rows == own caches",
          "[models][kimi]") {
  const std::string name = "kimi_linear";
  const auto cfg = models::load_config(model_dir(name));
  const auto ck = checkpoint::open(model_dir(name));
  const auto x = vec<2>(name, "prefill.hidden_states.1");  // any realistic input [37, D]
  const index_t T = x.extent(0), D = x.extent(1), T1 = 30;
  const auto x3 = tensor_view<const float, 3>(x.data(), {1, T, D}, {T * D, D, 1});
  const auto x3a = tensor_view<const float, 3>(x.data(), {1, T1, D}, {T1 * D, D, 1});
  auto token = [&](index_t t) { return tensor_view<const float, 2>(x.data() + t * D, {1, D}); };
  auto whole_vs_parts = [&](auto& layer, auto c1, auto c2, const std::string& what) {
    tensor<float, 3> y({1, T, D}), ya({1, T1, D});
    layer.forward(x3, y.view(), c1);
    layer.forward(x3a, ya.view(), c2);
    tensor<float, 2> parts({T, D}), ref({T, D}), y1({1, D});
    for (index_t t = 0; t < T; ++t) std::copy_n(y.data() + t * D, D, ref.data() + t * D);
    for (index_t t = 0; t < T1; ++t) std::copy_n(ya.data() + t * D, D, parts.data() + t * D);
    for (index_t t = T1; t < T; ++t) {
      layer.step(token(t), y1.view(), c2);
      std::copy_n(y1.data(), D, parts.data() + t * D);
    }
    check_rel(what + " prefill 30 + 7 steps vs prefill 37", compare(ref, parts), 1e-5);
  };
  auto kda = layers::kda_layer::load(ck, "model.layers.1.self_attn.", cfg.kda);
  whole_vs_parts(kda, kda.make_cache(1), kda.make_cache(1), "kda_layer");
  auto mla = layers::mla_attention::load(ck, "model.layers.2.self_attn.", cfg.mla);
  whole_vs_parts(mla, mla.make_cache(1, 64), mla.make_cache(1, 64), "mla_attention");
  // continuous batching: two streams on rows 2 and 0 of a 3-row cache == each on its own cache
  auto shared = kda.make_cache(3);
  auto own_a = kda.make_cache(1), own_b = kda.make_cache(1);
  tensor<float, 2> x2({2, D}), y2({2, D}), ya({1, D}), yb({1, D});
  const std::vector<index_t> rows_ab{2, 0};
  for (index_t t = 0; t < 8; ++t) {
    std::copy_n(x.data() + t * D, D, x2.data());
    std::copy_n(x.data() + (T - 1 - t) * D, D, x2.data() + D);
    kda.step(x2.view(), y2.view(), shared, rows_ab);
    kda.step(token(t), ya.view(), own_a);
    kda.step(token(T - 1 - t), yb.view(), own_b);
    check_rel("kda_layer row 2", compare(ya, rows(y2, 0, 1)), 1e-6);
    check_rel("kda_layer row 0", compare(yb, rows(y2, 1, 2)), 1e-6);
  }
  CHECK(shared.length(1) == 0);
  CHECK(shared.length(2) == 8);
  // the same for mla_attention over its KV cache
  auto mshared = mla.make_cache(3, 16);
  auto mown_a = mla.make_cache(1, 16), mown_b = mla.make_cache(1, 16);
  for (index_t t = 0; t < 8; ++t) {
    std::copy_n(x.data() + t * D, D, x2.data());
    std::copy_n(x.data() + (T - 1 - t) * D, D, x2.data() + D);
    mla.step(x2.view(), y2.view(), mshared, rows_ab);
    mla.step(token(t), ya.view(), mown_a);
    mla.step(token(T - 1 - t), yb.view(), mown_b);
    check_rel("mla_attention row 2", compare(ya, rows(y2, 0, 1)), 1e-5);
    check_rel("mla_attention row 0", compare(yb, rows(y2, 1, 2)), 1e-5);
  }
  CHECK(mshared.length(1) == 0);
  CHECK(mshared.length(2) == 8);
  const auto err = error_of<shape_error>([&] { kda.step(x2.view(), y2.view(), own_a); });
  CHECK(err.find("kda_layer::step") != std::string::npos);
}

// --- seqmix-native configs (random weights from a seed) ----------------------------------------

namespace {

nlohmann::json seqmix_json(const std::string& linear, const std::string& attention,
                           const std::string& ffn, std::int64_t seed) {
  return {{"model_type", "seqmix"},
          {"pattern", "LLLA"},
          {"linear", linear},
          {"attention", attention},
          {"ffn", ffn},
          {"hidden_size", 64},
          {"vocab_size", 128},
          {"num_attention_heads", 4},
          {"num_key_value_heads", 2},
          {"linear_num_heads", 4},
          {"linear_num_key_heads", 2},
          {"linear_head_dim", 16},
          {"num_experts", 4},
          {"num_experts_per_tok", 2},
          {"moe_intermediate_size", 32},
          {"intermediate_size", 96},
          {"seed", seed}};
}

models::hybrid_model seqmix_model(const nlohmann::json& j) {
  return models::hybrid_model::random(models::parse_config(j, "<seqmix test>"));
}

std::vector<std::int64_t> seqmix_ids(index_t n) {
  std::vector<std::int64_t> ids;
  for (index_t t = 0; t < n; ++t) ids.push_back((t * 37 + 11) % 128);
  return ids;
}

std::string seqmix_error(const nlohmann::json& j) {
  try {
    models::parse_config(j, "<seqmix test>");
  } catch (const io_error& e) {
    return e.what();
  }
  return {};
}

}  // namespace

TEST_CASE("models: a seqmix config builds a Linear-MoE stack: prefill + decode == longer prefill",
          "[models][seqmix]") {
  const index_t T = 32, n = 8;
  const auto ids = seqmix_ids(T + n);
  using variant = std::tuple<std::string, std::string, std::string>;
  const std::vector<variant> variants{{"gdn", "softmax", "moe"},
                                      {"mamba2", "gated", "dense"},
                                      {"gdn", "gated", "MDMD"},
                                      {"kda", "softmax", "moe"}};
  for (const auto& [linear, attention, ffn] : variants) {
    const std::string what = "seqmix " + linear + "/" + attention + "/" + ffn;
    auto j = seqmix_json(linear, attention, ffn, 3);
    if (ffn == "MDMD") j["shared_expert_intermediate_size"] = 48;
    auto m = seqmix_model(j);
    CHECK(m.config().num_layers() == 4);
    CHECK(m.config().count(models::mixer_kind::attention) == 1);
    auto cw = m.make_cache(1, 64), cp = m.make_cache(1, 64);
    const auto whole = m.prefill(ids, {}, cw);
    const std::vector<std::int64_t> head_ids(ids.begin(), ids.begin() + T);
    const auto part = m.prefill(head_ids, {}, cp);
    check_rel(what + " prefill of T vs the first T of T + n", compare(rows(whole, 0, T), part),
              1e-5);
    for (index_t s = 0; s < n; ++s) {
      const auto d = m.decode(std::vector<std::int64_t>{ids[static_cast<std::size_t>(T + s)]}, cp);
      check_rel(what + " decode step vs prefill of T + n",
                compare(rows(whole, T + s, T + s + 1), d), 1e-5);
    }
    // the logits are not degenerate
    const float* last = whole.data() + (T + n - 1) * m.vocab();
    float lo = last[0], hi = last[0];
    for (index_t v = 0; v < m.vocab(); ++v) {
      lo = std::min(lo, last[v]);
      hi = std::max(hi, last[v]);
    }
    CHECK(hi - lo > 0.1f);
    CHECK(std::isfinite(hi));
  }
}

TEST_CASE("models: a seqmix config's weights are a function of its seed", "[models][seqmix]") {
  const auto ids = seqmix_ids(20);
  auto logits = [&](std::int64_t seed) {
    auto m = seqmix_model(seqmix_json("gdn", "softmax", "moe", seed));
    auto c = m.make_cache(1, 32);
    return m.prefill(ids, {}, c);
  };
  const auto a = logits(7), b = logits(7), c = logits(8);
  CHECK(testing::bitwise_equal(a, b));
  CHECK(compare(a, c).rel_rms > 0.1);
  // a folder holding only config.json loads as the same model (seqmix-generate --model DIR)
  const auto dir = std::filesystem::temp_directory_path() / "seqmix_cfg_only_test";
  std::filesystem::create_directories(dir);
  {
    std::ofstream out(dir / "config.json");
    out << seqmix_json("gdn", "softmax", "moe", 7).dump(2);
  }
  auto md = models::hybrid_model::load(dir.string());
  auto cd = md.make_cache(1, 32);
  CHECK(testing::bitwise_equal(a, md.prefill(ids, {}, cd)));
  // and saved weights beside it load as a checkpoint, bitwise the same
  models::hybrid_model::save_random_weights(md.config(), (dir / "model.safetensors").string());
  auto ms = models::hybrid_model::load(dir.string());
  auto cs = ms.make_cache(1, 32);
  CHECK(testing::bitwise_equal(a, ms.prefill(ids, {}, cs)));
  std::filesystem::remove_all(dir);
}

TEST_CASE("models: a seqmix config's unknown letters, mixers and fields are clear errors",
          "[models][seqmix]") {
  auto j = seqmix_json("gdn", "softmax", "moe", 0);
  j["pattern"] = "LLXA";
  CHECK_THAT(seqmix_error(j), Catch::Contains("letter 2 is 'X'") && Catch::Contains("'L'"));
  j = seqmix_json("rwkv9", "softmax", "moe", 0);
  CHECK_THAT(seqmix_error(j),
             Catch::Contains("\"linear\" is \"rwkv9\"") && Catch::Contains("\"mamba2\""));
  j = seqmix_json("gdn", "sparse", "moe", 0);
  CHECK_THAT(seqmix_error(j), Catch::Contains("\"attention\" is \"sparse\""));
  j = seqmix_json("gdn", "softmax", "MMM", 0);
  CHECK_THAT(seqmix_error(j),
             Catch::Contains("\"ffn\" is \"MMM\"") && Catch::Contains("4 letters"));
  j = seqmix_json("gdn", "softmax", "moe", 0);
  j["hidden"] = 32;
  j["num_layers"] = 4;
  CHECK_THAT(seqmix_error(j), Catch::Contains("2 field(s) the seqmix loader does not understand") &&
                                  Catch::Contains("\"hidden\"") &&
                                  Catch::Contains("\"num_layers\""));
  j = seqmix_json("gdn", "softmax", "moe", 0);
  j.erase("pattern");
  CHECK_THAT(seqmix_error(j), Catch::Contains("\"pattern\""));
  j = seqmix_json("gdn", "softmax", "moe", 0);
  j["num_experts_per_tok"] = 9;
  CHECK_THAT(seqmix_error(j), Catch::Contains("num_experts_per_tok"));
  // a HF family's config with random weights: the layers random() can draw
  auto q = models::load_config(model_dir("qwen3_next"));
  auto mq = models::hybrid_model::random(q);
  CHECK(mq.vocab() == q.vocab);
  const auto k = models::load_config(model_dir("kimi_linear"));
  CHECK_THROWS_WITH(models::hybrid_model::random(k), Catch::Contains("not implemented"));
}
