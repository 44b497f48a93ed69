// SPDX-License-Identifier: MIT
// Models tier (issue 14): model_type qwen3_5_moe / qwen3_5_moe_text (transformers'
// Qwen3_5MoeForConditionalGeneration / Qwen3_5MoeForCausalLM). There is no Qwen3.5 golden
// checkpoint, so the test builds one from the Qwen3-Next golden model (tests/golden/v2/models/
// qwen3_next): the same function written in Qwen3.5's on-disk layout, derived from the two
// modeling files:
//
//   Qwen3-Next in_proj_qkvz [Hk·(2dk + 2r·dv), D], grouped per key head j: rows
//     [q_j (dk) | k_j (dk) | v_j (r·dv) | z_j (r·dv)]  (fix_query_key_value_ordering);
//   Qwen3.5 in_proj_qkv = [q_0..q_{Hk-1} | k_0.. | v_0..] (torch.split(mixed_qkv, [key_dim,
//     key_dim, value_dim])), in_proj_z = [z_0..]: value head j·r + i is row block i of group j
//     in both, which is what both models' repeat_interleave (value head h reads key head h / r)
//     assumes; the conv1d channels are [q_all | k_all | v_all] in both (unchanged);
//   Qwen3-Next in_proj_ba [Hk·2r, D], per key head [b_j (r) | a_j (r)]; Qwen3.5 in_proj_b /
//     in_proj_a [HV, D] = [b_0 | b_1 ..] / [a_0 | ..].
//
// The golden model has one dense layer (mlp_only_layers [3], intermediate 96), which Qwen3.5
// cannot express (every Qwen3_5MoeDecoderLayer is the MoE block). It becomes an MoE layer
// computing exactly the same MLP: router and experts zero (the routed part is exactly 0), the
// shared expert = the dense MLP with down_proj × 2 and shared_expert_gate zero (sigmoid(0) =
// 0.5; × 2 and × 0.5 are exact in binary floating point). The shared expert needs 96 units, so
// shared_expert_intermediate_size is 96 and the other layers' 48-unit shared experts are
// padded with zero units (silu(0) · 0 = 0: exact). Only the GEMMs' summation order differs
// from the golden model (~1e-7). The same modified weights are also written as a qwen3_next
// checkpoint: the two loaders must then give bitwise the same logits.
#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <string>
#include <unistd.h>
#include <vector>

#include <catch2/catch.hpp>

#include <nlohmann/json.hpp>

#include <seqmix/core/io/checkpoint.hpp>
#include <seqmix/core/safetensors.hpp>
#include <seqmix/models/models.hpp>

#include "golden.hpp"
#include "testing.hpp"

namespace {

using namespace seqmix;
using seqmix::testing::compare;
namespace gl = seqmix::testing::golden;

constexpr double tol = 1e-4;  // the golden gates of test_models.cpp

std::string golden_dir() {
  return std::filesystem::path(gl::path("v2/models/qwen3_next/config.json")).parent_path().string();
}
const safetensors_file& vectors() {
  return gl::file("v2/models/qwen3_next/vectors");
}
std::vector<std::int64_t> ids_of(const std::string& n) {
  return vectors().get_flat<std::int64_t>(n);
}
nlohmann::json golden_config() {
  std::ifstream in(std::filesystem::path(golden_dir()) / "config.json");
  return nlohmann::json::parse(in);
}

std::filesystem::path temp_dir(const std::string& tag) {
  const auto p = std::filesystem::temp_directory_path() /
                 ("seqmix_q35_" + tag + "_" + std::to_string(::getpid()) + "_" +
                  std::to_string(Catch::rngSeed()));
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  return p;
}

struct flat {
  std::vector<index_t> shape;
  std::vector<float> v;
};
using tensor_map = std::map<std::string, flat>;

/// How to write the Qwen3.5 checkpoint.
struct q35_layout {
  bool multimodal = true;      ///< model_type qwen3_5_moe, model.language_model.*; else _text
  bool fused_experts = false;  ///< experts.gate_up_proj / down_proj; else per expert
  bool sharded = false;        ///< model.safetensors.index.json + 2 shards
  bool extras = true;          ///< a vision tower and an MTP head (unused tensors)
  bool wrong_qkv = false;      ///< negative control: in_proj_qkv left grouped per key head
  bool wrong_ba = false;       ///< negative control: in_proj_b and in_proj_a swapped
  std::string drop;            ///< a tensor left out
  std::string extra;           ///< a tensor added
};

/// Sizes of the golden model.
struct dims {
  index_t D, Hk, HV, dk, dv, r, L, E, I, S, dense;
};
dims golden_dims() {
  const auto j = golden_config();
  dims d{};
  d.D = j["hidden_size"];
  d.Hk = j["linear_num_key_heads"];
  d.HV = j["linear_num_value_heads"];
  d.dk = j["linear_key_head_dim"];
  d.dv = j["linear_value_head_dim"];
  d.r = d.HV / d.Hk;
  d.L = j["num_hidden_layers"];
  d.E = j["num_experts"];
  d.I = j["moe_intermediate_size"];
  d.S = j["shared_expert_intermediate_size"];
  d.dense = j["intermediate_size"];
  return d;
}
constexpr index_t dense_layer = 3;  // the golden's mlp_only_layers

flat zeros(std::vector<index_t> shape) {
  std::size_t n = 1;
  for (const index_t e : shape) n *= static_cast<std::size_t>(e);
  return {std::move(shape), std::vector<float>(n, 0.0f)};
}
flat filled(std::vector<index_t> shape, float x) {
  flat f = zeros(std::move(shape));
  std::fill(f.v.begin(), f.v.end(), x);
  return f;
}

flat rows_of(const flat& m, const std::vector<index_t>& rows) {
  const index_t cols = m.shape[1];
  flat out{{static_cast<index_t>(rows.size()), cols}, {}};
  out.v.reserve(rows.size() * static_cast<std::size_t>(cols));
  for (const index_t r : rows)
    out.v.insert(out.v.end(), m.v.begin() + r * cols, m.v.begin() + (r + 1) * cols);
  return out;
}
/// [rows, cols] matrix padded with zero rows to `to` rows.
flat pad_rows(const flat& m, index_t to) {
  flat out = m;
  out.shape[0] = to;
  out.v.resize(static_cast<std::size_t>(to * m.shape[1]), 0.0f);  // trailing rows: 0
  return out;
}
/// [rows, cols] matrix padded with zero columns to `to` columns.
flat pad_cols(const flat& m, index_t to) {
  const index_t R = m.shape[0], C = m.shape[1];
  flat out = zeros({R, to});
  for (index_t i = 0; i < R; ++i) std::copy_n(m.v.begin() + i * C, C, out.v.begin() + i * to);
  return out;
}

/// The golden Qwen3-Next tensors with the dense layer turned into the equivalent MoE layer
/// and the shared experts padded to 2·S' = dense units (see the file comment). Names are
/// Qwen3-Next's ("model." prefix, per-expert MoE, fused GDN projections).
tensor_map equivalent_qwen3_next(const dims& d) {
  const auto ck = checkpoint::open(golden_dir());
  tensor_map t;
  for (const auto& n : ck.names()) t[n] = {ck.info(n).shape, ck.get_flat<float>(n)};
  const index_t S2 = d.dense;  // the shared experts' new width
  for (index_t i = 0; i < d.L; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".mlp.";
    if (i == dense_layer) {
      const flat g = t.at(p + "gate_proj.weight"), u = t.at(p + "up_proj.weight");
      flat dn = t.at(p + "down_proj.weight");
      for (auto& x : dn.v) x *= 2.0f;  // × sigmoid(0) = 0.5 gives it back exactly
      for (const char* n : {"gate_proj.weight", "up_proj.weight", "down_proj.weight"})
        t.erase(p + n);
      t[p + "shared_expert.gate_proj.weight"] = g;
      t[p + "shared_expert.up_proj.weight"] = u;
      t[p + "shared_expert.down_proj.weight"] = dn;
      t[p + "shared_expert_gate.weight"] = zeros({1, d.D});
      t[p + "gate.weight"] = zeros({d.E, d.D});
      for (index_t e = 0; e < d.E; ++e) {
        const std::string x = p + "experts." + std::to_string(e) + ".";
        t[x + "gate_proj.weight"] = zeros({d.I, d.D});
        t[x + "up_proj.weight"] = zeros({d.I, d.D});
        t[x + "down_proj.weight"] = zeros({d.D, d.I});
      }
    } else {
      const std::string s = p + "shared_expert.";
      t[s + "gate_proj.weight"] = pad_rows(t.at(s + "gate_proj.weight"), S2);
      t[s + "up_proj.weight"] = pad_rows(t.at(s + "up_proj.weight"), S2);
      t[s + "down_proj.weight"] = pad_cols(t.at(s + "down_proj.weight"), S2);
    }
  }
  return t;
}

nlohmann::json equivalent_qwen3_next_config(const dims& d) {
  auto j = golden_config();
  j["mlp_only_layers"] = nlohmann::json::array();
  j["shared_expert_intermediate_size"] = d.dense;
  return j;
}

/// Exactly the fields transformers' Qwen3_5MoeTextConfig has (to_dict of the class), with the
/// golden model's sizes.
nlohmann::json q35_text_config(const dims& d) {
  const auto g = golden_config();
  nlohmann::json t;
  for (const char* k : {"vocab_size",
                        "hidden_size",
                        "num_hidden_layers",
                        "num_attention_heads",
                        "num_key_value_heads",
                        "hidden_act",
                        "max_position_embeddings",
                        "initializer_range",
                        "rms_norm_eps",
                        "use_cache",
                        "tie_word_embeddings",
                        "attention_bias",
                        "attention_dropout",
                        "head_dim",
                        "linear_conv_kernel_dim",
                        "linear_key_head_dim",
                        "linear_value_head_dim",
                        "linear_num_key_heads",
                        "linear_num_value_heads",
                        "moe_intermediate_size",
                        "num_experts_per_tok",
                        "num_experts",
                        "output_router_logits",
                        "router_aux_loss_coef",
                        "layer_types",
                        "pad_token_id",
                        "bos_token_id",
                        "eos_token_id",
                        "dtype"})
    t[k] = g.at(k);
  t["shared_expert_intermediate_size"] = d.dense;
  // M-RoPE sections of a 8-dim rotary part (head_dim 32 · 0.25): 4 frequencies, as 2 + 1 + 1
  t["rope_parameters"] = {{"rope_type", "default"},
                          {"rope_theta", g["rope_parameters"]["rope_theta"]},
                          {"partial_rotary_factor", 0.25},
                          {"mrope_section", {2, 1, 1}},
                          {"mrope_interleaved", true}};
  t["model_type"] = "qwen3_5_moe_text";
  return t;
}
nlohmann::json q35_config(const dims& d, bool multimodal) {
  auto t = q35_text_config(d);
  if (!multimodal) {
    t["architectures"] = {"Qwen3_5MoeForCausalLM"};
    t["transformers_version"] = "5.17.0";
    return t;
  }
  nlohmann::json j;
  j["architectures"] = {"Qwen3_5MoeForConditionalGeneration"};
  j["model_type"] = "qwen3_5_moe";
  j["text_config"] = t;
  j["vision_config"] = {{"model_type", "qwen3_5_moe_vision"},
                        {"depth", 1},
                        {"hidden_size", 16},
                        {"hidden_act", "gelu_pytorch_tanh"},
                        {"intermediate_size", 32},
                        {"num_heads", 2},
                        {"in_channels", 3},
                        {"patch_size", 16},
                        {"spatial_merge_size", 2},
                        {"temporal_patch_size", 2},
                        {"out_hidden_size", d.D},
                        {"num_position_embeddings", 64},
                        {"initializer_range", 0.02}};
  j["image_token_id"] = 248056;
  j["video_token_id"] = 248057;
  j["vision_start_token_id"] = 248053;
  j["vision_end_token_id"] = 248054;
  j["tie_word_embeddings"] = false;
  j["transformers_version"] = "5.17.0";
  return j;
}

/// The equivalent Qwen3-Next tensors renamed and re-laid out as Qwen3.5-MoE stores them.
tensor_map to_qwen3_5(const tensor_map& next, const dims& d, const q35_layout& o) {
  const std::string tp = o.multimodal ? "model.language_model." : "model.";
  tensor_map t;
  const index_t per = 2 * d.dk + 2 * d.r * d.dv;  // rows of one key head's group in qkvz
  for (const auto& [n, v] : next) {
    if (n == "lm_head.weight") {
      t[n] = v;
      continue;
    }
    REQUIRE(n.rfind("model.", 0) == 0);
    const std::string rest = n.substr(6);
    const auto at = rest.find("linear_attn.in_proj_");
    if (at != std::string::npos) {
      const std::string p = tp + rest.substr(0, at) + "linear_attn.";
      if (rest.ends_with("in_proj_qkvz.weight")) {
        std::vector<index_t> q, k, val, z;
        for (index_t j = 0; j < d.Hk; ++j) {
          for (index_t e = 0; e < d.dk; ++e) q.push_back(j * per + e);
          for (index_t e = 0; e < d.dk; ++e) k.push_back(j * per + d.dk + e);
          for (index_t e = 0; e < d.r * d.dv; ++e) val.push_back(j * per + 2 * d.dk + e);
          for (index_t e = 0; e < d.r * d.dv; ++e) z.push_back(j * per + 2 * d.dk + d.r * d.dv + e);
        }
        std::vector<index_t> qkv;
        if (o.wrong_qkv) {  // grouped per key head [q_j | k_j | v_j], as if it were Qwen3-Next's
          for (index_t j = 0; j < d.Hk; ++j)
            for (index_t e = 0; e < 2 * d.dk + d.r * d.dv; ++e) qkv.push_back(j * per + e);
        } else {
          qkv = q;
          qkv.insert(qkv.end(), k.begin(), k.end());
          qkv.insert(qkv.end(), val.begin(), val.end());
        }
        t[p + "in_proj_qkv.weight"] = rows_of(v, qkv);
        t[p + "in_proj_z.weight"] = rows_of(v, z);
      } else {  // in_proj_ba
        std::vector<index_t> b, a;
        for (index_t j = 0; j < d.Hk; ++j)
          for (index_t i = 0; i < d.r; ++i) {
            b.push_back(j * 2 * d.r + i);
            a.push_back(j * 2 * d.r + d.r + i);
          }
        t[p + (o.wrong_ba ? "in_proj_a.weight" : "in_proj_b.weight")] = rows_of(v, b);
        t[p + (o.wrong_ba ? "in_proj_b.weight" : "in_proj_a.weight")] = rows_of(v, a);
      }
      continue;
    }
    const auto ex = rest.find("mlp.experts.");
    if (o.fused_experts && ex != std::string::npos) continue;  // fused below
    t[tp + rest] = v;
  }
  if (o.fused_experts) {
    // transformers' Qwen3_5MoeExperts: gate_up_proj [E, 2I, D] (gate rows first: chunk(2) of
    // the linear's output), down_proj [E, D, I]
    for (index_t i = 0; i < d.L; ++i) {
      const std::string p = "model.layers." + std::to_string(i) + ".mlp.experts.";
      flat gu{{d.E, 2 * d.I, d.D}, {}}, dn{{d.E, d.D, d.I}, {}};
      for (index_t e = 0; e < d.E; ++e) {
        const std::string x = p + std::to_string(e) + ".";
        const auto& g = next.at(x + "gate_proj.weight").v;
        const auto& u = next.at(x + "up_proj.weight").v;
        const auto& w = next.at(x + "down_proj.weight").v;
        gu.v.insert(gu.v.end(), g.begin(), g.end());
        gu.v.insert(gu.v.end(), u.begin(), u.end());
        dn.v.insert(dn.v.end(), w.begin(), w.end());
      }
      const std::string q = tp + "layers." + std::to_string(i) + ".mlp.experts.";
      t[q + "gate_up_proj"] = std::move(gu);
      t[q + "down_proj"] = std::move(dn);
    }
  }
  if (o.extras) {
    if (o.multimodal) {
      t["model.visual.patch_embed.proj.weight"] = filled({16, 3, 2, 16, 16}, 0.5f);
      t["model.visual.merger.linear_fc2.weight"] = filled({d.D, 64}, 0.25f);
    }
    t["mtp.fc.weight"] = filled({d.D, 2 * d.D}, 0.125f);
    t["mtp.norm.weight"] = zeros({d.D});
  }
  if (!o.drop.empty()) REQUIRE(t.erase(o.drop) == 1);
  if (!o.extra.empty()) t[o.extra] = filled({4}, 1.0f);
  return t;
}

any_tensor as_any(const std::string& n, const flat& f) {
  any_tensor a(n, dtype::f32, f.shape);
  std::copy(f.v.begin(), f.v.end(), reinterpret_cast<float*>(a.mutable_data()));
  return a;
}

void write_dir(const std::filesystem::path& dir, const nlohmann::json& config, const tensor_map& t,
               bool sharded) {
  std::ofstream(dir / "config.json") << config.dump(2);
  if (!sharded) {
    safetensors_writer w;
    for (const auto& [n, f] : t) w.add(as_any(n, f));
    w.save((dir / "model.safetensors").string());
    return;
  }
  // two shards, names alternating (a layer's tensors are split across files)
  safetensors_writer w0, w1;
  nlohmann::json wm = nlohmann::json::object();
  std::size_t i = 0, bytes = 0;
  for (const auto& [n, f] : t) {
    const bool first = i++ % 2 == 0;
    (first ? w0 : w1).add(as_any(n, f));
    wm[n] = first ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
    bytes += f.v.size() * sizeof(float);
  }
  w0.save((dir / "model-00001-of-00002.safetensors").string());
  w1.save((dir / "model-00002-of-00002.safetensors").string());
  nlohmann::json idx = {{"metadata", {{"total_size", bytes}}}, {"weight_map", wm}};
  std::ofstream(dir / "model.safetensors.index.json") << idx.dump(2);
}

/// A Qwen3.5 checkpoint folder for `o`.
std::filesystem::path write_q35(const std::string& tag, const q35_layout& o) {
  const dims d = golden_dims();
  const auto dir = temp_dir(tag);
  write_dir(dir, q35_config(d, o.multimodal), to_qwen3_5(equivalent_qwen3_next(d), d, o),
            o.sharded);
  return dir;
}

struct run_result {
  tensor<float, 2> prefill;            ///< [T, V]
  std::vector<tensor<float, 2>> step;  ///< the 4 greedy decode steps' logits [1, V]
  std::vector<std::int64_t> generated;
  tensor<float, 2> full;  ///< one forward over prompt + decode inputs
  bool has_full = false;
};

/// The golden protocol's prompt, 4 greedy decode steps and the full forward.
run_result run(models::hybrid_model& m, int steps = 4, bool full = true) {
  const auto prompt = ids_of("prompt_ids");
  const index_t T = static_cast<index_t>(prompt.size());
  auto cache = m.make_cache(1, 64);
  run_result r;
  r.prefill = m.prefill(prompt, {}, cache, models::logits_mode::all);
  std::int64_t next = models::greedy_token(
      {r.prefill.data() + (T - 1) * m.vocab(), static_cast<std::size_t>(m.vocab())});
  r.generated.push_back(next);
  for (int j = 0; j < steps; ++j) {
    const std::vector<std::int64_t> in{next};
    r.step.push_back(m.decode(in, cache));
    next = models::greedy_token({r.step.back().data(), static_cast<std::size_t>(m.vocab())});
    r.generated.push_back(next);
  }
  if (full) {
    auto c2 = m.make_cache(1, 64);
    r.full = m.prefill(ids_of("full.ids"), {}, c2);
    r.has_full = true;
  }
  return r;
}

tensor<float, 1> row1(const tensor<float, 2>& t) {
  tensor<float, 1> out({t.extent(1)});
  std::copy_n(t.data(), t.extent(1), out.data());
  return out;
}

double check_rel(const std::string& what, const testing::comparison& c, double limit = tol) {
  INFO(what << ": " << c.report);
  UNSCOPED_INFO(what << " rel_rms " << c.rel_rms);
  CHECK(c.rel_rms <= limit);
  return c.rel_rms;
}

/// `r` against the stored Qwen3-Next golden vectors (transformers' logits).
double check_golden(const std::string& name, const run_result& r) {
  double worst = check_rel(name + " prefill.logits",
                           compare(vectors().get<float, 2>("prefill.logits"), r.prefill));
  REQUIRE(r.step.size() == 4);
  for (int j = 1; j <= 4; ++j) {
    const std::string p = "decode.step" + std::to_string(j) + ".";
    CHECK(ids_of(p + "input_id")[0] == r.generated[static_cast<std::size_t>(j - 1)]);
    worst = std::max(worst, check_rel(name + " " + p + "logits",
                                      compare(vectors().get<float, 1>(p + "logits"),
                                              row1(r.step[static_cast<std::size_t>(j - 1)]))));
    CHECK(ids_of(p + "next_id")[0] == r.generated[static_cast<std::size_t>(j)]);
  }
  CHECK(r.generated == ids_of("decode.generated_ids"));
  return std::max(worst, check_rel(name + " full.logits",
                                   compare(vectors().get<float, 2>("full.logits"), r.full)));
}

void check_bitwise(const std::string& what, const run_result& a, const run_result& b) {
  auto same = [&](const std::string& w, const tensor<float, 2>& x, const tensor<float, 2>& y) {
    const auto c = compare(x, y);
    INFO(what << " " << w << ": " << c.report);
    CHECK(c.max_abs == 0.0);
  };
  same("prefill", a.prefill, b.prefill);
  REQUIRE(a.step.size() == b.step.size());
  for (std::size_t j = 0; j < a.step.size(); ++j)
    same("decode step " + std::to_string(j + 1), a.step[j], b.step[j]);
  CHECK(a.generated == b.generated);
  if (a.has_full && b.has_full) same("full", a.full, b.full);
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

TEST_CASE("qwen3_5_moe: the Qwen3-Next golden model in Qwen3.5-MoE's layout matches its logits",
          "[golden][models][qwen3_5]") {
  const dims d = golden_dims();
  const q35_layout o;  // multimodal, per-expert, vision tower + MTP head present
  const auto dir = write_q35("main", o);
  auto m = models::hybrid_model::load(dir.string());
  CHECK(m.config().family == models::model_family::qwen3_5_moe);
  CHECK(m.config().model_type == "qwen3_5_moe");
  CHECK(m.config().text_prefix == "model.language_model.");
  CHECK(m.config().gdn.layout == layers::gated_deltanet_config::projection_layout::qwen3_5_split);
  CHECK(m.unused_tensors() == std::vector<std::string>{"model.visual.merger.linear_fc2.weight",
                                                       "model.visual.patch_embed.proj.weight",
                                                       "mtp.fc.weight", "mtp.norm.weight"});
  for (const auto& l : m.config().layers) CHECK(l.ffn == models::ffn_kind::moe);
  const auto q35 = run(m);
  const double worst = check_golden("qwen3_5_moe", q35);

  // the same weights written as a qwen3_next checkpoint: bitwise the same function
  const auto dn = temp_dir("next");
  write_dir(dn, equivalent_qwen3_next_config(d), equivalent_qwen3_next(d), false);
  auto mn = models::hybrid_model::load(dn.string());
  check_bitwise("qwen3_5_moe vs qwen3_next (same weights)", q35, run(mn));

  // and the golden qwen3_next model itself (its dense layer 3): only the GEMMs' order differs
  auto mg = models::hybrid_model::load(golden_dir());
  const auto g = run(mg);
  const double rp =
      check_rel("qwen3_5_moe vs golden qwen3_next prefill", compare(g.prefill, q35.prefill), 1e-6);
  const double rf =
      check_rel("qwen3_5_moe vs golden qwen3_next full", compare(g.full, q35.full), 1e-6);
  for (std::size_t j = 0; j < g.step.size(); ++j)
    check_rel("qwen3_5_moe vs golden qwen3_next step " + std::to_string(j + 1),
              compare(g.step[j], q35.step[j]), 1e-6);
  CHECK(g.generated == q35.generated);
  WARN("qwen3_5_moe vs transformers' golden logits: worst rel_rms " << worst
                                                                    << "; vs the qwen3_next golden "
                                                                       "model: prefill rel "
                                                                    << rp << ", full rel " << rf);
  std::filesystem::remove_all(dir);
  std::filesystem::remove_all(dn);
}

TEST_CASE("qwen3_5_moe_text: text-only prefix, fused experts, sharded index == the same model",
          "[models][qwen3_5]") {
  q35_layout ref;
  ref.extras = false;
  const auto d0 = write_q35("ref", ref);
  auto m0 = models::hybrid_model::load(d0.string());
  const auto r0 = run(m0, 1, false);
  SECTION("qwen3_5_moe_text, model.* names, fused experts, two shards") {
    q35_layout o;
    o.multimodal = false;
    o.fused_experts = true;
    o.sharded = true;
    const auto dir = write_q35("text", o);
    REQUIRE(std::filesystem::exists(dir / "model.safetensors.index.json"));
    auto m = models::hybrid_model::load(dir.string());
    CHECK(m.config().model_type == "qwen3_5_moe_text");
    CHECK(m.config().text_prefix == "model.");
    CHECK(m.config().moe.names.experts == layers::moe_ffn_names::experts_layout::fused);
    CHECK(m.unused_tensors() == std::vector<std::string>{"mtp.fc.weight", "mtp.norm.weight"});
    check_bitwise("qwen3_5_moe_text fused sharded vs qwen3_5_moe", r0, run(m, 1, false));
    std::filesystem::remove_all(dir);
  }
  SECTION("qwen3_5_moe, fused experts, with the MTP head") {
    q35_layout o;
    o.fused_experts = true;
    o.multimodal = true;
    const auto dir = write_q35("fused", o);
    auto m = models::hybrid_model::load(dir.string());
    CHECK(m.config().moe.names.experts == layers::moe_ffn_names::experts_layout::fused);
    check_bitwise("qwen3_5_moe fused vs per expert", r0, run(m, 1, false));
    std::filesystem::remove_all(dir);
  }
  std::filesystem::remove_all(d0);
}

TEST_CASE("qwen3_5_moe: a wrong split of the GDN projections does not match (the test can fail)",
          "[models][qwen3_5]") {
  q35_layout ok;
  ok.extras = false;
  const auto d0 = write_q35("ok", ok);
  auto m0 = models::hybrid_model::load(d0.string());
  auto prefill = [](models::hybrid_model& m) {
    auto c = m.make_cache(1, 64);
    return m.prefill(ids_of("prompt_ids"), {}, c);
  };
  const auto good = prefill(m0);
  for (int which = 0; which < 2; ++which) {
    q35_layout o = ok;
    (which == 0 ? o.wrong_qkv : o.wrong_ba) = true;
    const auto dir = write_q35(which == 0 ? "wrongqkv" : "wrongba", o);
    auto m = models::hybrid_model::load(dir.string());  // shapes fit: only the values are wrong
    const auto c = compare(good, prefill(m));
    INFO((which == 0 ? "in_proj_qkv grouped per key head" : "in_proj_b / in_proj_a swapped")
         << ": " << c.report);
    CHECK(c.rel_rms > 1e-2);
    std::filesystem::remove_all(dir);
  }
  std::filesystem::remove_all(d0);
}

TEST_CASE("qwen3_5_moe: missing and extra tensors are clear errors", "[models][qwen3_5]") {
  const auto load = [](const std::filesystem::path& dir) {
    return [dir] { (void)models::hybrid_model::load(dir.string()); };
  };
  SECTION("missing in_proj_z") {
    q35_layout o;
    o.drop = "model.language_model.layers.1.linear_attn.in_proj_z.weight";
    const auto dir = write_q35("missing", o);
    const auto msg = error_of<io_error>(load(dir));
    INFO(msg);
    CHECK(msg.find("qwen3_5_moe model") != std::string::npos);
    CHECK(msg.find("1 tensor(s) missing: model.language_model.layers.1.linear_attn.in_proj_z."
                   "weight") != std::string::npos);
    std::filesystem::remove_all(dir);
  }
  SECTION("a Qwen3-Next fused projection in a Qwen3.5 checkpoint") {
    q35_layout o;
    o.extra = "model.language_model.layers.0.linear_attn.in_proj_qkvz.weight";
    const auto dir = write_q35("extra", o);
    const auto msg = error_of<io_error>(load(dir));
    INFO(msg);
    CHECK(msg.find("1 tensor(s) the model does not use: "
                   "model.language_model.layers.0.linear_attn.in_proj_qkvz.weight") !=
          std::string::npos);
    std::filesystem::remove_all(dir);
  }
  SECTION("an extra tensor under the text prefix (only model.visual.*, mtp.* are unused)") {
    q35_layout o;
    o.extra = "model.language_model.visual.x";
    const auto dir = write_q35("extra2", o);
    const auto msg = error_of<io_error>(load(dir));
    INFO(msg);
    CHECK(msg.find("does not use: model.language_model.visual.x") != std::string::npos);
    std::filesystem::remove_all(dir);
  }
}

TEST_CASE("qwen3_5_moe: unknown fields and unsupported values are clear errors",
          "[models][qwen3_5]") {
  const dims d = golden_dims();
  const auto parse = [](const nlohmann::json& j) {
    return [j] { (void)models::parse_config(j, "config.json"); };
  };
  auto top = q35_config(d, true);
  SECTION("the config as written parses, defaults as transformers'") {
    const auto c = models::parse_config(top, "config.json");
    CHECK(c.num_layers() == 4);
    CHECK(c.attention.head_dim == 32);
    CHECK(c.attention.partial_rotary == 0.25);
    CHECK(c.moe.shared_dim == d.dense);
    nlohmann::json bare = {{"model_type", "qwen3_5_moe_text"}, {"num_hidden_layers", 8}};
    const auto b = models::parse_config(bare, "config.json");
    CHECK(b.hidden == 2048);
    CHECK(b.attention.head_dim == 256);
    CHECK(b.attention.kv_heads == 2);
    CHECK(b.gdn.value_heads == 32);
    CHECK(b.moe.experts == 256);
    CHECK(b.moe.routing.top_k == 8);
    CHECK(b.layers[3].mixer == models::mixer_kind::attention);
    CHECK(b.layers[2].mixer == models::mixer_kind::gated_deltanet);
  }
  SECTION("unknown text_config fields, all listed") {
    top["text_config"]["mlp_only_layers"] = {3};
    top["text_config"]["decoder_sparse_step"] = 1;
    const auto msg = error_of<io_error>(parse(top));
    INFO(msg);
    CHECK(msg.find("2 field(s) the qwen3_5_moe_text loader does not understand: "
                   "\"decoder_sparse_step\", \"mlp_only_layers\"") != std::string::npos);
    CHECK(msg.find("text_config") != std::string::npos);
  }
  SECTION("unknown top-level field") {
    top["audio_config"] = nlohmann::json::object();
    const auto msg = error_of<io_error>(parse(top));
    INFO(msg);
    CHECK(msg.find("the qwen3_5_moe loader does not understand: \"audio_config\"") !=
          std::string::npos);
  }
  SECTION("unknown rope_parameters field") {
    top["text_config"]["rope_parameters"]["mrope_fancy"] = 1;
    const auto msg = error_of<io_error>(parse(top));
    INFO(msg);
    CHECK(msg.find("\"mrope_fancy\"") != std::string::npos);
  }
  SECTION("values the model cannot run") {
    auto t = top;
    t["text_config"]["norm_topk_prob"] = false;
    CHECK(error_of<io_error>(parse(t)).find("\"norm_topk_prob\" is false") != std::string::npos);
    t = top;
    t["text_config"]["tie_word_embeddings"] = true;
    CHECK(error_of<io_error>(parse(t)).find("ambiguous") != std::string::npos);
    t = top;
    t["text_config"]["model_type"] = "qwen3_next";
    CHECK(error_of<io_error>(parse(t)).find("expected \"qwen3_5_moe_text\"") != std::string::npos);
    t = top;
    t["text_config"]["rope_parameters"]["rope_type"] = "yarn";
    CHECK(error_of<io_error>(parse(t)).find("rope_type") != std::string::npos);
    t = top;
    t.erase("text_config");
    CHECK(error_of<io_error>(parse(t)).find("\"text_config\" is missing") != std::string::npos);
  }
}
