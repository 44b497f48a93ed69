// SPDX-License-Identifier: MIT
// model_config: a Hugging Face config.json read into a description of a hybrid Linear-MoE
// decoder (which mixer and which feed-forward block each layer has, and every hyperparameter
// the layers read), for the families seqmix runs from their checkpoints:
//
//   model_type         mixers (layer_types / pattern)                       feed-forward
//   qwen3_next         linear_attention = Gated DeltaNet, full_attention =   MoE + sigmoid-gated
//                      gated attention; default pattern: every              shared expert; dense
//                      full_attention_interval-th layer is attention         SwiGLU in
//                                                                            mlp_only_layers
//   qwen3_5_moe        Qwen3-Next's mixers and math; fields under             MoE + gated shared
//   (_text)            "text_config" (qwen3_5_moe), GDN projections split,    expert in every
//                      tensors under model.language_model. or model.          layer; experts per
//                      (parse_qwen3_5_moe_text lists every difference)        expert or fused
//   granitemoehybrid   linear_attention / "mamba" = Mamba2, full_attention   MoE (top-k softmax)
//                      / "attention" = GQA with scale attention_multiplier   + shared MLP
//                      (layer_types, or layers_block_type)
//
//   kimi_linear        linear_attention = KDA (kda_layer), full_attention =   DeepSeek-V3 MoE
//                      MLA without RoPE (mla_attention); layer_types          (sigmoid + bias,
//                                                                            groups, shared
//                                                                            experts); dense
//                                                                            SwiGLU where
//                                                                            mlp_layer_types
//                                                                            says "dense" (or
//                                                                            first_k_dense_replace
//                                                                            / moe_layer_freq)
//
//   seqmix             "pattern" of L = linear ("linear": "gdn", "mamba2" or  "ffn": "moe",
//                      "kda"),
//                      and A = attention ("attention": "softmax", GQA +       "dense", or one
//                      RoPE, or "gated", Qwen3-Next's); random weights from   letter M / D per
//                      "seed" (hybrid_model::random; no checkpoint needed)    layer
//
// Multipliers (Granite; 1 elsewhere): embedding × embedding_multiplier, each residual branch ×
// residual_multiplier, attention scale = attention_multiplier, logits ÷ logits_scaling. Norm
// epsilons as the modules read them: every RMSNorm uses rms_norm_eps (Qwen3-Next's norms
// multiply by 1 + w), except Kimi's MLA kv_a_layernorm (its module default, 1e-6).
//
// Strictness: an unknown model_type, or a field the loader does not know for that model_type,
// is a seqmix::io_error listing every such field. Fields that only matter to training or to
// other runtimes (dropout, initializer_range, router_aux_loss_coef, token ids, ...) are known
// and ignored; fields the loader knows but whose value it cannot run (hidden_act other than
// silu, attention_bias true, a rope_type other than default, ...) are errors naming the field
// and the value. Non-finite numbers are read as transformers writes them ({"__float__":
// "Infinity"}). Cost: a JSON parse, O(size of config.json).
#pragma once

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <seqmix/core/error.hpp>
#include <seqmix/layers/gated_attention.hpp>
#include <seqmix/layers/gated_deltanet.hpp>
#include <seqmix/layers/kda.hpp>
#include <seqmix/layers/mamba2.hpp>
#include <seqmix/layers/mla_attention.hpp>
#include <seqmix/layers/moe_ffn.hpp>
#include <seqmix/layers/rms_norm.hpp>

namespace seqmix::models {

enum class model_family { qwen3_next, qwen3_5_moe, granitemoehybrid, kimi_linear, seqmix };
enum class mixer_kind { gated_deltanet, attention, mamba2, kda, mla };
enum class ffn_kind { dense, moe };

inline const char* mixer_name(mixer_kind k) {
  switch (k) {
    case mixer_kind::gated_deltanet:
      return "gated_deltanet";
    case mixer_kind::attention:
      return "attention";
    case mixer_kind::mamba2:
      return "mamba2";
    case mixer_kind::kda:
      return "kda";
    default:
      return "mla";
  }
}

struct layer_spec {
  mixer_kind mixer = mixer_kind::attention;
  ffn_kind ffn = ffn_kind::dense;
};

/// Everything the model needs to build its layers.
struct model_config {
  model_family family = model_family::qwen3_next;
  std::string model_type;
  index_t hidden = 0, vocab = 0;
  std::vector<layer_spec> layers;
  float norm_eps = 1e-6f;
  layers::norm_weight norm_mode = layers::norm_weight::plain;  ///< decoder / final norms
  bool tie_embeddings = false;
  float embedding_multiplier = 1.0f, residual_multiplier = 1.0f, logits_scaling = 1.0f;
  layers::gated_deltanet_config gdn{};
  layers::gated_attention_config attention{};
  layers::mamba2_config mamba{};
  layers::kda_layer_config kda{};
  layers::mla_attention_config mla{};
  layers::moe_ffn_config moe{};
  index_t dense_dim = 0;  ///< intermediate of the dense SwiGLU layers (Qwen3-Next, Kimi)
  /// Where each layer's feed-forward block lives: "mlp." (Qwen3-Next), "" (Granite: the MoE at
  /// the layer's root), "block_sparse_moe." (Kimi, dense and MoE alike).
  std::string ffn_prefix = "mlp.";
  /// Where the decoder's tensors sit ("model.": embed_tokens, layers.*, norm): Qwen3.5's
  /// multimodal checkpoints hold the text model under "model.language_model."
  /// (hybrid_model::load resolves it from the checkpoint). lm_head.weight is at the root.
  std::string text_prefix = "model.";
  /// Checkpoint tensors under these prefixes are parts of the model seqmix does not run
  /// (Qwen3-Next / Qwen3.5 "mtp.": the multi-token-prediction head; Qwen3.5 "model.visual.":
  /// the vision tower): listed in unused_tensors(), not an error.
  std::vector<std::string> unused_prefixes;
  /// model_type "seqmix" (random weights from a seed): the seed, and whether config.json
  /// alone describes the model (no checkpoint is read; hybrid_model::load builds the weights).
  std::uint64_t seed = 0;
  bool random_weights = false;

  index_t num_layers() const noexcept { return static_cast<index_t>(layers.size()); }
  index_t count(mixer_kind k) const {
    index_t n = 0;
    for (const auto& l : layers) n += l.mixer == k;
    return n;
  }
};

namespace detail {

[[noreturn]] inline void config_fail(const std::string& source, const std::string& what) {
  throw io_error("seqmix::models::load_config: '" + source + "': " + what);
}

class config_reader {
 public:
  config_reader(const nlohmann::json& j, std::string source) : j_(j), src_(std::move(source)) {}

  bool has(const std::string& k) const { return j_.contains(k) && !j_.at(k).is_null(); }
  const nlohmann::json& at(const std::string& k) const {
    if (!j_.contains(k)) config_fail(src_, "required field \"" + k + "\" is missing");
    return j_.at(k);
  }
  std::int64_t integer(const std::string& k) const {
    const auto& v = at(k);
    if (!v.is_number_integer())
      config_fail(src_, "field \"" + k + "\" must be an integer, got " + v.dump());
    return v.get<std::int64_t>();
  }
  std::int64_t integer(const std::string& k, std::int64_t def) const {
    return has(k) ? integer(k) : def;
  }
  index_t positive(const std::string& k) const {
    const auto v = integer(k);
    if (v <= 0) config_fail(src_, "field \"" + k + "\" must be > 0, got " + std::to_string(v));
    return static_cast<index_t>(v);
  }
  static std::optional<double> as_number(const nlohmann::json& v) {
    if (v.is_number()) return v.get<double>();
    if (v.is_object() && v.size() == 1 && v.contains("__float__") && v["__float__"].is_string()) {
      const std::string s = v["__float__"].get<std::string>();
      if (s == "Infinity" || s == "inf") return std::numeric_limits<double>::infinity();
      if (s == "-Infinity" || s == "-inf") return -std::numeric_limits<double>::infinity();
      if (s == "NaN" || s == "nan") return std::numeric_limits<double>::quiet_NaN();
    }
    return std::nullopt;
  }
  double number(const std::string& k) const {
    const auto v = as_number(at(k));
    if (!v) config_fail(src_, "field \"" + k + "\" must be a number, got " + at(k).dump());
    return *v;
  }
  double number(const std::string& k, double def) const { return has(k) ? number(k) : def; }
  bool boolean(const std::string& k, bool def) const {
    if (!has(k)) return def;
    const auto& v = at(k);
    if (!v.is_boolean())
      config_fail(src_, "field \"" + k + "\" must be true or false, got " + v.dump());
    return v.get<bool>();
  }
  std::string string(const std::string& k, const std::string& def) const {
    if (!has(k)) return def;
    const auto& v = at(k);
    if (!v.is_string()) config_fail(src_, "field \"" + k + "\" must be a string, got " + v.dump());
    return v.get<std::string>();
  }
  template <class T>
  void require_value(const std::string& k, const T& supported, const std::string& why) const {
    if (!has(k)) return;
    const auto& v = at(k);
    if (v != nlohmann::json(supported))
      config_fail(src_, "field \"" + k + "\" is " + v.dump() + ": only " +
                            nlohmann::json(supported).dump() + " is supported (" + why + ")");
  }
  /// Every key of the object must be in `known`; otherwise one error listing all the others.
  void only_known(const std::set<std::string>& known, const std::string& what) const {
    std::vector<std::string> unknown;
    for (const auto& [k, v] : j_.items())
      if (!known.count(k)) unknown.push_back(k);
    if (unknown.empty()) return;
    std::string list;
    for (const auto& u : unknown) {
      if (!list.empty()) list += ", ";
      list += "\"";
      list += u;
      list += "\"";
    }
    config_fail(src_, std::to_string(unknown.size()) + " field(s) the " + what +
                          " loader does not understand: " + list +
                          " (a field seqmix cannot interpret might change the model; "
                          "remove it only if it does not)");
  }
  const std::string& source() const noexcept { return src_; }

 private:
  const nlohmann::json& j_;
  std::string src_;
};

inline const std::set<std::string>& ignored_fields() {
  static const std::set<std::string> s{"architectures",
                                       "attention_dropout",
                                       "bos_token_id",
                                       "eos_token_id",
                                       "pad_token_id",
                                       "dtype",
                                       "torch_dtype",
                                       "initializer_range",
                                       "max_position_embeddings",
                                       "output_router_logits",
                                       "router_aux_loss_coef",
                                       "transformers_version",
                                       "use_cache",
                                       "model_type",
                                       "_name_or_path",
                                       "output_attentions",
                                       "output_hidden_states",
                                       "use_return_dict",
                                       "return_dict",
                                       "chunk_size_feed_forward",
                                       "is_encoder_decoder",
                                       "id2label",
                                       "label2id",
                                       "problem_type",
                                       "tokenizer_class",
                                       "auto_map",
                                       "_attn_implementation",
                                       "_experts_implementation",
                                       "embedding_dropout",
                                       "router_jitter_noise",
                                       "init_method"};
  return s;
}

/// The rope_parameters / rope_scaling / rope_theta fields: θ and the partial factor. `mrope`:
/// Qwen3.5's multimodal RoPE keys (mrope_section, mrope_interleaved) are accepted: with text
/// only, transformers gives the temporal, height and width streams the same position ids, so
/// every frequency slot M-RoPE recomposes is the 1-D RoPE one (the math is plain RoPE).
inline void read_rope(const config_reader& r, double& theta, double& partial, bool mrope = false) {
  if (r.has("rope_scaling")) {
    const auto& rs = r.at("rope_scaling");
    if (!(rs.is_object() &&
          rs.value("rope_type", rs.value("type", std::string("default"))) == "default"))
      config_fail(r.source(), "field \"rope_scaling\" is " + rs.dump() +
                                  ": only the default RoPE (no scaling) is supported");
  }
  theta = r.number("rope_theta", theta);
  if (r.has("rope_parameters")) {
    const auto& rp = r.at("rope_parameters");
    if (!rp.is_object()) config_fail(r.source(), "field \"rope_parameters\" must be an object");
    config_reader sub(rp, r.source() + " rope_parameters");
    std::set<std::string> known{"rope_theta", "rope_type", "partial_rotary_factor"};
    if (mrope) {
      known.insert("mrope_section");
      known.insert("mrope_interleaved");
      if (sub.has("mrope_section")) {
        const auto& ms = sub.at("mrope_section");
        bool ok = ms.is_array();
        if (ok)
          for (const auto& v : ms) ok = ok && v.is_number_integer() && v.get<std::int64_t>() >= 0;
        if (!ok)
          config_fail(r.source(),
                      "field \"rope_parameters.mrope_section\" must be an array of integers >= 0, "
                      "got " +
                          ms.dump());
      }
      (void)sub.boolean("mrope_interleaved", false);  // type check only (see above)
    }
    sub.only_known(known, "rope_parameters");
    sub.require_value("rope_type", std::string("default"),
                      "scaled RoPE variants are not implemented");
    theta = sub.number("rope_theta", theta);
    partial = sub.number("partial_rotary_factor", partial);
  }
}

/// layer_types entries -> mixers; `linear` is the recurrent mixer of the family.
inline std::vector<layer_spec> read_layer_types(const config_reader& r, const std::string& key,
                                                index_t L, mixer_kind linear,
                                                const std::string& linear_name,
                                                const std::string& attention_name) {
  const auto& lt = r.at(key);
  if (!lt.is_array() || static_cast<index_t>(lt.size()) != L)
    config_fail(r.source(), "field \"" + key + "\" must be an array of num_hidden_layers = " +
                                std::to_string(L) + " strings, got " + lt.dump());
  std::vector<layer_spec> out(static_cast<std::size_t>(L));
  for (index_t i = 0; i < L; ++i) {
    const auto& v = lt[static_cast<std::size_t>(i)];
    const std::string s = v.is_string() ? v.get<std::string>() : v.dump();
    if (s == linear_name || s == "linear_attention") {
      out[static_cast<std::size_t>(i)].mixer = linear;
    } else if (s == attention_name || s == "full_attention") {
      out[static_cast<std::size_t>(i)].mixer = mixer_kind::attention;
    } else {
      config_fail(r.source(), "field \"" + key + "\"[" + std::to_string(i) + "] is \"" + s +
                                  "\": expected \"linear_attention\", \"" + linear_name +
                                  "\", \"full_attention\" or \"" + attention_name + "\"");
    }
  }
  return out;
}

/// Qwen3-Next / Qwen3.5's pattern: `layer_types` when present, else every
/// `full_attention_interval`-th layer (default 4) is attention and the rest Gated DeltaNet.
inline std::vector<layer_spec> read_qwen_layer_pattern(const config_reader& r, index_t L) {
  if (r.has("layer_types"))
    return read_layer_types(r, "layer_types", L, mixer_kind::gated_deltanet, "linear_attention",
                            "full_attention");
  const index_t every = static_cast<index_t>(r.integer("full_attention_interval", 4));
  if (every <= 0) config_fail(r.source(), "field \"full_attention_interval\" must be > 0");
  std::vector<layer_spec> out(static_cast<std::size_t>(L));
  for (index_t i = 0; i < L; ++i)
    out[static_cast<std::size_t>(i)].mixer =
        (i + 1) % every == 0 ? mixer_kind::attention : mixer_kind::gated_deltanet;
  return out;
}

inline model_config parse_qwen3_next(const config_reader& r) {
  r.only_known({"hidden_size",
                "vocab_size",
                "num_hidden_layers",
                "intermediate_size",
                "rms_norm_eps",
                "tie_word_embeddings",
                "head_dim",
                "num_attention_heads",
                "num_key_value_heads",
                "partial_rotary_factor",
                "rope_parameters",
                "rope_theta",
                "rope_scaling",
                "layer_types",
                "full_attention_interval",
                "linear_conv_kernel_dim",
                "linear_key_head_dim",
                "linear_num_key_heads",
                "linear_num_value_heads",
                "linear_value_head_dim",
                "mlp_only_layers",
                "decoder_sparse_step",
                "moe_intermediate_size",
                "norm_topk_prob",
                "num_experts",
                "num_experts_per_tok",
                "shared_expert_intermediate_size",
                "hidden_act",
                "attention_bias",
                "use_sliding_window",
                "sliding_window",
                "max_window_layers"},
               "qwen3_next");
  r.require_value("hidden_act", std::string("silu"), "the layers implement SwiGLU");
  r.require_value("attention_bias", false, "the attention layer has no projection biases");
  r.require_value("use_sliding_window", false, "Qwen3-Next's attention layers are global");
  model_config c;
  c.family = model_family::qwen3_next;
  c.model_type = "qwen3_next";
  c.unused_prefixes = {"mtp."};
  c.hidden = r.positive("hidden_size");
  c.vocab = r.positive("vocab_size");
  const index_t L = r.positive("num_hidden_layers");
  c.norm_eps = static_cast<float>(r.number("rms_norm_eps", 1e-6));
  c.norm_mode = layers::norm_weight::one_plus;
  c.tie_embeddings = r.boolean("tie_word_embeddings", false);
  c.layers = read_qwen_layer_pattern(r, L);
  // attention
  auto& a = c.attention;
  a.hidden = c.hidden;
  a.heads = r.positive("num_attention_heads");
  a.kv_heads = r.has("num_key_value_heads") ? r.positive("num_key_value_heads") : a.heads;
  a.head_dim = r.has("head_dim") ? r.positive("head_dim") : c.hidden / a.heads;
  a.partial_rotary = r.number("partial_rotary_factor", 0.25);
  a.rope_theta = 10000.0;
  read_rope(r, a.rope_theta, a.partial_rotary);
  a.norm_eps = c.norm_eps;
  a.gated = true;
  a.qk_norm = true;
  // gated deltanet
  auto& g = c.gdn;
  g.hidden = c.hidden;
  g.key_heads = r.positive("linear_num_key_heads");
  g.value_heads = r.positive("linear_num_value_heads");
  g.key_dim = r.positive("linear_key_head_dim");
  g.value_dim = r.positive("linear_value_head_dim");
  g.conv_kernel = r.has("linear_conv_kernel_dim") ? r.positive("linear_conv_kernel_dim") : 4;
  g.norm_eps = c.norm_eps;
  g.layout = layers::gated_deltanet_config::projection_layout::qwen3_next_fused;
  // feed-forward: MoE unless mlp_only_layers or the sparse step say dense
  c.dense_dim = r.has("intermediate_size") ? r.positive("intermediate_size") : 0;
  const index_t E = static_cast<index_t>(r.integer("num_experts", 0));
  const index_t step = static_cast<index_t>(r.integer("decoder_sparse_step", 1));
  std::set<index_t> dense_only;
  if (r.has("mlp_only_layers")) {
    const auto& m = r.at("mlp_only_layers");
    if (!m.is_array()) config_fail(r.source(), "field \"mlp_only_layers\" must be an array");
    for (const auto& v : m) {
      if (!v.is_number_integer() || v.get<index_t>() < 0 || v.get<index_t>() >= L)
        config_fail(r.source(), "field \"mlp_only_layers\" holds " + v.dump() +
                                    ": expected layer indices in [0, " + std::to_string(L) + ")");
      dense_only.insert(v.get<index_t>());
    }
  }
  for (index_t i = 0; i < L; ++i) {
    const bool moe = E > 0 && step > 0 && (i + 1) % step == 0 && !dense_only.count(i);
    c.layers[static_cast<std::size_t>(i)].ffn = moe ? ffn_kind::moe : ffn_kind::dense;
  }
  for (const auto& l : c.layers)
    if (l.ffn == ffn_kind::dense && c.dense_dim <= 0)
      config_fail(r.source(), "a dense layer needs \"intermediate_size\" > 0");
  if (E > 0) {
    auto& m = c.moe;
    m.hidden = c.hidden;
    m.experts = E;
    m.expert_dim = r.positive("moe_intermediate_size");
    m.shared_dim = static_cast<index_t>(r.integer("shared_expert_intermediate_size", 0));
    m.routing = moe_options::qwen_moe(
        r.boolean("norm_topk_prob", true),
        r.has("num_experts_per_tok") ? r.positive("num_experts_per_tok") : 10);
    m.names = layers::moe_ffn_names::qwen3_next(m.shared_dim > 0);
  }
  return c;
}

/// Qwen3.5-MoE's text model (transformers' Qwen3_5MoeTextConfig, model_type
/// "qwen3_5_moe_text"): the Qwen3-Next decoder with these differences, all read here or by the
/// loader (the math of every module is Qwen3-Next's):
///  - GDN projections split: in_proj_qkv ([q_all | k_all | v_all], not grouped per key head),
///    in_proj_z, in_proj_b, in_proj_a (gated_deltanet_config::projection_layout::qwen3_5_split);
///  - every layer is MoE (no mlp_only_layers / decoder_sparse_step / intermediate_size), the
///    router always renormalizes its top-k (no norm_topk_prob), the shared expert and its
///    sigmoid gate always exist;
///  - experts on disk per expert (experts.{e}.gate_proj ...) or fused as transformers keeps
///    them (experts.gate_up_proj [E, 2I, D], experts.down_proj [E, D, I]): hybrid_model::load
///    picks the layout from the checkpoint;
///  - rope_parameters may hold M-RoPE keys (read_rope: plain RoPE for text);
///  - the sizes transformers defaults when a field is absent are Qwen3.5-35B-A3B's (head_dim 256,
///    2 KV heads, ...), and so are they here.
/// `tie_override`: the top-level tie_word_embeddings of a qwen3_5_moe config, if any.
inline model_config parse_qwen3_5_moe_text(const config_reader& r,
                                           std::optional<bool> tie_override = std::nullopt) {
  r.only_known({"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "hidden_act", "rms_norm_eps", "tie_word_embeddings",
                "rope_parameters", "rope_theta", "rope_scaling", "partial_rotary_factor",
                "attention_bias", "head_dim", "linear_conv_kernel_dim", "linear_key_head_dim",
                "linear_value_head_dim", "linear_num_key_heads", "linear_num_value_heads",
                "moe_intermediate_size", "shared_expert_intermediate_size", "num_experts_per_tok",
                "num_experts", "layer_types", "full_attention_interval",
                // written by the released checkpoints, not declared by transformers' class:
                // the MTP head (not run: its mtp.* tensors are unused), the attention output
                // gate (always on in transformers), the router's renormalization (always on)
                "mtp_num_hidden_layers", "mtp_use_dedicated_embeddings", "attn_output_gate",
                "norm_topk_prob"},
               "qwen3_5_moe_text");
  r.require_value("hidden_act", std::string("silu"), "the layers implement SwiGLU");
  r.require_value("attention_bias", false, "the attention layer has no projection biases");
  r.require_value("attn_output_gate", true,
                  "transformers' Qwen3_5MoeAttention always applies the sigmoid output gate");
  r.require_value("norm_topk_prob", true,
                  "transformers' Qwen3_5MoeTopKRouter always renormalizes the top-k weights");
  auto pos = [&](const std::string& k, index_t def) { return r.has(k) ? r.positive(k) : def; };
  model_config c;
  c.family = model_family::qwen3_5_moe;
  c.model_type = "qwen3_5_moe_text";
  c.unused_prefixes = {"mtp.", "model.visual."};
  c.hidden = pos("hidden_size", 2048);
  c.vocab = pos("vocab_size", 248320);
  const index_t L = pos("num_hidden_layers", 40);
  c.norm_eps = static_cast<float>(r.number("rms_norm_eps", 1e-6));
  c.norm_mode = layers::norm_weight::one_plus;  // Qwen3_5MoeRMSNorm: x̂ · (1 + w)
  const bool tie_text = r.boolean("tie_word_embeddings", false);
  if (tie_override && r.has("tie_word_embeddings") && *tie_override != tie_text)
    config_fail(r.source(), std::string("\"tie_word_embeddings\" is ") +
                                (*tie_override ? "true" : "false") + " but text_config's is " +
                                (tie_text ? "true" : "false") +
                                ": which one ties the lm_head is ambiguous");
  c.tie_embeddings = tie_override ? *tie_override : tie_text;
  c.layers = read_qwen_layer_pattern(r, L);
  auto& a = c.attention;
  a.hidden = c.hidden;
  a.heads = pos("num_attention_heads", 16);
  a.kv_heads = pos("num_key_value_heads", 2);
  a.head_dim = pos("head_dim", 256);
  if (a.heads % a.kv_heads != 0)
    config_fail(r.source(),
                "field \"num_attention_heads\" must be a multiple of \"num_key_value_heads\"");
  a.partial_rotary = r.number("partial_rotary_factor", 0.25);
  a.rope_theta = 10000.0;
  read_rope(r, a.rope_theta, a.partial_rotary, true);
  a.norm_eps = c.norm_eps;
  a.gated = true;
  a.qk_norm = true;
  auto& g = c.gdn;
  g.hidden = c.hidden;
  g.key_heads = pos("linear_num_key_heads", 16);
  g.value_heads = pos("linear_num_value_heads", 32);
  g.key_dim = pos("linear_key_head_dim", 128);
  g.value_dim = pos("linear_value_head_dim", 128);
  g.conv_kernel = pos("linear_conv_kernel_dim", 4);
  g.norm_eps = c.norm_eps;
  g.layout = layers::gated_deltanet_config::projection_layout::qwen3_5_split;
  if (g.value_heads % g.key_heads != 0)
    config_fail(r.source(),
                "field \"linear_num_value_heads\" must be a multiple of \"linear_num_key_heads\"");
  for (auto& l : c.layers) l.ffn = ffn_kind::moe;  // Qwen3_5MoeDecoderLayer: always the MoE block
  auto& m = c.moe;
  m.hidden = c.hidden;
  m.experts = pos("num_experts", 256);
  m.expert_dim = pos("moe_intermediate_size", 512);
  m.shared_dim = pos("shared_expert_intermediate_size", 512);
  const index_t k = pos("num_experts_per_tok", 8);
  if (k > m.experts)
    config_fail(r.source(), "field \"num_experts_per_tok\" (" + std::to_string(k) +
                                ") must be <= num_experts (" + std::to_string(m.experts) + ")");
  m.routing = moe_options::qwen_moe(true, k);
  m.names = layers::moe_ffn_names::qwen3_next(true);  // or fused: hybrid_model::load decides
  return c;
}

/// Qwen3.5-MoE as released (transformers' Qwen3_5MoeConfig, model_type "qwen3_5_moe",
/// Qwen3_5MoeForConditionalGeneration): the text model's fields under "text_config", a
/// vision tower's under "vision_config" (not run: text-only inference; its model.visual.*
/// tensors are listed as unused), the multimodal token ids (unused without images).
inline model_config parse_qwen3_5_moe(const config_reader& r) {
  r.only_known({"text_config", "vision_config", "image_token_id", "video_token_id",
                "vision_start_token_id", "vision_end_token_id", "tie_word_embeddings"},
               "qwen3_5_moe");
  if (r.has("vision_config") && !r.at("vision_config").is_object())
    config_fail(r.source(), "field \"vision_config\" must be an object");
  const auto& t = r.at("text_config");
  if (!t.is_object()) config_fail(r.source(), "field \"text_config\" must be an object");
  const std::string src = r.source() + " text_config";
  const config_reader tr(t, src);
  const std::string tt = tr.string("model_type", "qwen3_5_moe_text");
  if (tt != "qwen3_5_moe_text")
    config_fail(src, "model_type is \"" + tt + "\": expected \"qwen3_5_moe_text\"");
  nlohmann::json rest = t;
  for (const auto& k : ignored_fields()) rest.erase(k);
  std::optional<bool> tie;
  if (r.has("tie_word_embeddings")) tie = r.boolean("tie_word_embeddings", false);
  model_config c = parse_qwen3_5_moe_text(config_reader(rest, src), tie);
  c.model_type = "qwen3_5_moe";
  return c;
}

inline model_config parse_granite(const config_reader& r) {
  r.only_known({"hidden_size",          "vocab_size",
                "num_hidden_layers",    "intermediate_size",
                "rms_norm_eps",         "tie_word_embeddings",
                "attention_multiplier", "embedding_multiplier",
                "residual_multiplier",  "logits_scaling",
                "layer_types",          "layers_block_type",
                "mamba_chunk_size",     "mamba_conv_bias",
                "mamba_d_conv",         "mamba_d_head",
                "mamba_d_state",        "mamba_expand",
                "mamba_n_groups",       "mamba_n_heads",
                "mamba_proj_bias",      "num_attention_heads",
                "num_key_value_heads",  "num_experts_per_tok",
                "num_local_experts",    "position_embedding_type",
                "rope_parameters",      "rope_theta",
                "rope_scaling",         "shared_intermediate_size",
                "time_step_limit",      "hidden_act",
                "attention_bias",       "normalization_function",
                "mamba_dt_rank",        "mamba_dt_min",
                "mamba_dt_max",         "mamba_dt_init_floor"},
               "granitemoehybrid");
  r.require_value("hidden_act", std::string("silu"), "the layers implement SwiGLU");
  r.require_value("attention_bias", false, "the attention layer has no projection biases");
  r.require_value("normalization_function", std::string("rmsnorm"), "the layers use RMSNorm");
  model_config c;
  c.family = model_family::granitemoehybrid;
  c.model_type = "granitemoehybrid";
  c.hidden = r.positive("hidden_size");
  c.vocab = r.positive("vocab_size");
  const index_t L = r.positive("num_hidden_layers");
  c.norm_eps = static_cast<float>(r.number("rms_norm_eps", 1e-6));
  c.norm_mode = layers::norm_weight::plain;
  c.tie_embeddings = r.boolean("tie_word_embeddings", true);
  c.embedding_multiplier = static_cast<float>(r.number("embedding_multiplier", 1.0));
  c.residual_multiplier = static_cast<float>(r.number("residual_multiplier", 1.0));
  c.logits_scaling = static_cast<float>(r.number("logits_scaling", 1.0));
  if (!(c.logits_scaling != 0 && std::isfinite(c.logits_scaling)))
    config_fail(r.source(), "field \"logits_scaling\" must be finite and non-zero");
  if (r.has("layer_types")) {
    c.layers = read_layer_types(r, "layer_types", L, mixer_kind::mamba2, "mamba", "attention");
  } else if (r.has("layers_block_type")) {
    c.layers =
        read_layer_types(r, "layers_block_type", L, mixer_kind::mamba2, "mamba", "attention");
  } else {
    config_fail(r.source(), "neither \"layer_types\" nor \"layers_block_type\" is given");
  }
  auto& a = c.attention;
  a.hidden = c.hidden;
  a.heads = r.positive("num_attention_heads");
  a.kv_heads = r.has("num_key_value_heads") ? r.positive("num_key_value_heads") : a.heads;
  a.head_dim = c.hidden / a.heads;
  a.partial_rotary = 1.0;
  a.rope_theta = 10000.0;
  read_rope(r, a.rope_theta, a.partial_rotary);
  const std::string pe = r.string("position_embedding_type", "rope");
  if (pe == "nope") {
    a.rope_theta = 0;
  } else if (pe != "rope") {
    config_fail(r.source(), "field \"position_embedding_type\" is \"" + pe +
                                "\": expected \"rope\" or \"nope\"");
  }
  a.norm_eps = c.norm_eps;
  a.gated = false;
  a.qk_norm = false;
  a.scale =
      static_cast<float>(r.number("attention_multiplier", 1.0 / std::sqrt(double(a.head_dim))));
  auto& m = c.mamba;
  m.hidden = c.hidden;
  m.heads = r.positive("mamba_n_heads");
  m.head_dim = r.positive("mamba_d_head");
  m.state_size = r.positive("mamba_d_state");
  m.groups = r.has("mamba_n_groups") ? r.positive("mamba_n_groups") : 1;
  m.conv_kernel = r.has("mamba_d_conv") ? r.positive("mamba_d_conv") : 4;
  m.chunk_size = r.has("mamba_chunk_size") ? r.positive("mamba_chunk_size") : 256;
  m.norm_eps = c.norm_eps;
  m.use_conv_bias = r.boolean("mamba_conv_bias", true);
  m.use_bias = r.boolean("mamba_proj_bias", false);
  m.norm_groups = 1;  // GraniteMoeHybridRMSNormGated normalises the full width
  const index_t expand = static_cast<index_t>(r.integer("mamba_expand", 2));
  if (expand * c.hidden != m.heads * m.head_dim)
    config_fail(r.source(), "mamba_expand · hidden_size = " + std::to_string(expand * c.hidden) +
                                " must equal mamba_n_heads · mamba_d_head = " +
                                std::to_string(m.heads * m.head_dim));
  if (r.has("time_step_limit")) {
    const auto& t = r.at("time_step_limit");
    const auto lo = t.is_array() && t.size() == 2 ? config_reader::as_number(t[0]) : std::nullopt;
    const auto hi = t.is_array() && t.size() == 2 ? config_reader::as_number(t[1]) : std::nullopt;
    if (!lo || !hi)
      config_fail(r.source(), "field \"time_step_limit\" must be [min, max], got " + t.dump());
    m.dt_min = static_cast<float>(*lo);
    m.dt_max = static_cast<float>(*hi);
  }
  const index_t E = static_cast<index_t>(r.integer("num_local_experts", 0));
  const index_t S = static_cast<index_t>(r.integer("shared_intermediate_size", 0));
  if (E <= 0)
    config_fail(r.source(), "field \"num_local_experts\" is " + std::to_string(E) +
                                ": the dense (expert-free) Granite hybrid is not implemented");
  for (auto& l : c.layers) l.ffn = ffn_kind::moe;
  auto& f = c.moe;
  f.hidden = c.hidden;
  f.experts = E;
  f.expert_dim = r.positive("intermediate_size");
  f.shared_dim = S;
  f.routing =
      moe_options::granite(r.has("num_experts_per_tok") ? r.positive("num_experts_per_tok") : 2);
  f.names = layers::moe_ffn_names::granite(S > 0);
  c.ffn_prefix = "";
  return c;
}

inline model_config parse_kimi_linear(const config_reader& r) {
  r.only_known({"hidden_size",
                "vocab_size",
                "num_hidden_layers",
                "intermediate_size",
                "rms_norm_eps",
                "tie_word_embeddings",
                "hidden_act",
                "attention_bias",
                "pretraining_tp",
                "model_max_length",
                "layer_types",
                "linear_conv_kernel_dim",
                "linear_head_dim",
                "linear_num_heads",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "q_lora_rank",
                "kv_lora_rank",
                "qk_head_dim",
                "qk_nope_head_dim",
                "qk_rope_head_dim",
                "v_head_dim",
                "mlp_layer_types",
                "first_k_dense_replace",
                "moe_layer_freq",
                "moe_intermediate_size",
                "moe_renormalize",
                "num_expert_group",
                "num_experts",
                "num_experts_per_token",
                "num_shared_experts",
                "routed_scaling_factor",
                "topk_group"},
               "kimi_linear");
  r.require_value("hidden_act", std::string("silu"), "the layers implement SwiGLU");
  r.require_value("attention_bias", false, "the attention layers have no projection biases");
  r.require_value("pretraining_tp", 1, "tensor-parallel slicing of the projections");
  model_config c;
  c.family = model_family::kimi_linear;
  c.model_type = "kimi_linear";
  c.hidden = r.positive("hidden_size");
  c.vocab = r.positive("vocab_size");
  const index_t L = r.positive("num_hidden_layers");
  c.norm_eps = static_cast<float>(r.number("rms_norm_eps", 1e-6));
  c.norm_mode = layers::norm_weight::plain;
  c.tie_embeddings = r.boolean("tie_word_embeddings", false);
  c.ffn_prefix = "block_sparse_moe.";
  c.layers =
      read_layer_types(r, "layer_types", L, mixer_kind::kda, "linear_attention", "full_attention");
  for (auto& l : c.layers)
    if (l.mixer == mixer_kind::attention) l.mixer = mixer_kind::mla;
  auto& k = c.kda;
  k.hidden = c.hidden;
  k.heads = r.positive("linear_num_heads");
  k.head_dim = r.positive("linear_head_dim");
  k.conv_kernel = r.has("linear_conv_kernel_dim") ? r.positive("linear_conv_kernel_dim") : 4;
  k.norm_eps = c.norm_eps;
  auto& a = c.mla;
  a.hidden = c.hidden;
  a.heads = r.positive("num_attention_heads");
  a.q_lora_rank = static_cast<index_t>(r.integer("q_lora_rank", 0));
  a.kv_lora_rank = r.positive("kv_lora_rank");
  a.qk_nope_dim = r.positive("qk_nope_head_dim");
  a.qk_rope_dim = static_cast<index_t>(r.integer("qk_rope_head_dim", 0));
  a.v_dim = r.positive("v_head_dim");
  a.kv_norm_eps = 1e-6f;  // KimiMLAAttention builds kv_a_layernorm with its default eps
  if (r.has("qk_head_dim") && r.integer("qk_head_dim") != a.qk_nope_dim + a.qk_rope_dim)
    config_fail(r.source(), "field \"qk_head_dim\" is " + std::to_string(r.integer("qk_head_dim")) +
                                ": expected qk_nope_head_dim + qk_rope_head_dim = " +
                                std::to_string(a.qk_nope_dim + a.qk_rope_dim));
  if (a.q_lora_rank < 0) config_fail(r.source(), "field \"q_lora_rank\" must be >= 0 or null");
  // feed-forward: mlp_layer_types ("dense" / "sparse"), else first_k_dense_replace and
  // moe_layer_freq as DeepSeek-V3 reads them
  const index_t E = static_cast<index_t>(r.integer("num_experts", 0));
  c.dense_dim = r.has("intermediate_size") ? r.positive("intermediate_size") : 0;
  if (r.has("mlp_layer_types")) {
    const auto& m = r.at("mlp_layer_types");
    if (!m.is_array() || static_cast<index_t>(m.size()) != L)
      config_fail(r.source(), "field \"mlp_layer_types\" must be an array of num_hidden_layers = " +
                                  std::to_string(L) + " strings, got " + m.dump());
    for (index_t i = 0; i < L; ++i) {
      const auto& v = m[static_cast<std::size_t>(i)];
      const std::string s = v.is_string() ? v.get<std::string>() : v.dump();
      if (s != "dense" && s != "sparse")
        config_fail(r.source(), "field \"mlp_layer_types\"[" + std::to_string(i) + "] is \"" + s +
                                    "\": expected \"dense\" or \"sparse\"");
      c.layers[static_cast<std::size_t>(i)].ffn = s == "sparse" ? ffn_kind::moe : ffn_kind::dense;
    }
  } else {
    const index_t first = static_cast<index_t>(r.integer("first_k_dense_replace", 0));
    const index_t freq = static_cast<index_t>(r.integer("moe_layer_freq", 1));
    if (freq <= 0) config_fail(r.source(), "field \"moe_layer_freq\" must be > 0");
    for (index_t i = 0; i < L; ++i)
      c.layers[static_cast<std::size_t>(i)].ffn =
          E > 0 && i >= first && i % freq == 0 ? ffn_kind::moe : ffn_kind::dense;
  }
  for (const auto& l : c.layers) {
    if (l.ffn == ffn_kind::dense && c.dense_dim <= 0)
      config_fail(r.source(), "a dense layer needs \"intermediate_size\" > 0");
    if (l.ffn == ffn_kind::moe && E <= 0)
      config_fail(r.source(), "a sparse layer needs \"num_experts\" > 0");
  }
  if (E > 0) {
    auto& m = c.moe;
    m.hidden = c.hidden;
    m.experts = E;
    m.expert_dim = r.positive("moe_intermediate_size");
    const index_t shared = static_cast<index_t>(r.integer("num_shared_experts", 0));
    if (shared < 0) config_fail(r.source(), "field \"num_shared_experts\" must be >= 0");
    m.shared_dim = shared * m.expert_dim;
    m.routing = moe_options::deepseek_v3(
        r.has("num_expert_group") ? r.positive("num_expert_group") : 1,
        r.has("topk_group") ? r.positive("topk_group") : 1,
        static_cast<float>(r.number("routed_scaling_factor", 1.0)),
        r.has("num_experts_per_token") ? r.positive("num_experts_per_token") : 2,
        r.boolean("moe_renormalize", true));
    m.names = layers::moe_ffn_names::deepseek(true, shared > 0);
  }
  return c;
}

/// model_type "seqmix": a Linear-MoE stack built from the library's layers by a pattern string,
/// with random weights from a seed (no checkpoint).
inline model_config parse_seqmix(const config_reader& r) {
  r.only_known({"pattern",
                "linear",
                "attention",
                "ffn",
                "hidden_size",
                "vocab_size",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "rope_theta",
                "partial_rotary_factor",
                "linear_num_heads",
                "linear_num_key_heads",
                "linear_head_dim",
                "linear_key_head_dim",
                "state_size",
                "n_groups",
                "conv_kernel",
                "intermediate_size",
                "num_experts",
                "num_experts_per_tok",
                "moe_intermediate_size",
                "shared_expert_intermediate_size",
                "norm_topk_prob",
                "rms_norm_eps",
                "tie_word_embeddings",
                "seed",
                "num_hidden_layers"},
               "seqmix");
  model_config c;
  c.family = model_family::seqmix;
  c.model_type = "seqmix";
  c.random_weights = true;
  const std::string pattern = r.string("pattern", "");
  if (pattern.empty())
    config_fail(r.source(),
                "field \"pattern\" (a string of L = linear and A = attention "
                "layers, e.g. \"LLLA\") is required");
  const auto L = static_cast<index_t>(pattern.size());
  if (r.has("num_hidden_layers") && r.integer("num_hidden_layers") != L)
    config_fail(r.source(), "field \"num_hidden_layers\" is " +
                                std::to_string(r.integer("num_hidden_layers")) +
                                " but \"pattern\" has " + std::to_string(L) + " layers");
  c.hidden = r.positive("hidden_size");
  c.vocab = r.positive("vocab_size");
  const std::int64_t seed = r.integer("seed", 0);
  if (seed < 0) config_fail(r.source(), "field \"seed\" must be >= 0");
  c.seed = static_cast<std::uint64_t>(seed);
  c.norm_eps = static_cast<float>(r.number("rms_norm_eps", 1e-6));
  c.norm_mode = layers::norm_weight::plain;
  c.tie_embeddings = r.boolean("tie_word_embeddings", false);
  const std::string linear = r.string("linear", "gdn");
  mixer_kind lin = mixer_kind::gated_deltanet;
  if (linear == "gdn" || linear == "gated_deltanet") {
    lin = mixer_kind::gated_deltanet;
  } else if (linear == "mamba2") {
    lin = mixer_kind::mamba2;
  } else if (linear == "kda") {
    lin = mixer_kind::kda;
  } else {
    config_fail(r.source(), "field \"linear\" is \"" + linear +
                                "\": expected \"gdn\" (gated_deltanet), \"mamba2\" or \"kda\"");
  }
  c.layers.resize(static_cast<std::size_t>(L));
  for (index_t i = 0; i < L; ++i) {
    const char ch = pattern[static_cast<std::size_t>(i)];
    if (ch != 'L' && ch != 'A')
      config_fail(r.source(), "field \"pattern\" is \"" + pattern + "\": letter " +
                                  std::to_string(i) + " is '" + std::string(1, ch) +
                                  "', expected 'L' (a " + linear + " layer) or 'A' (attention)");
    c.layers[static_cast<std::size_t>(i)].mixer = ch == 'L' ? lin : mixer_kind::attention;
  }
  // attention: "softmax" (GQA + RoPE, no gate) or "gated" (Qwen3-Next's gated attention)
  const std::string attn = r.string("attention", "softmax");
  if (attn != "softmax" && attn != "gated")
    config_fail(r.source(),
                "field \"attention\" is \"" + attn + "\": expected \"softmax\" or \"gated\"");
  const index_t H = r.has("num_attention_heads") ? r.positive("num_attention_heads") : 4;
  auto& a = c.attention;
  a.hidden = c.hidden;
  a.heads = H;
  a.kv_heads = r.has("num_key_value_heads") ? r.positive("num_key_value_heads") : H;
  a.head_dim = r.has("head_dim") ? r.positive("head_dim") : c.hidden / H;
  if (a.head_dim <= 0) config_fail(r.source(), "hidden_size / num_attention_heads must be > 0");
  if (H % a.kv_heads != 0)
    config_fail(r.source(),
                "field \"num_attention_heads\" must be a multiple of "
                "\"num_key_value_heads\"");
  a.rope_theta = r.number("rope_theta", 10000.0);
  a.partial_rotary = r.number("partial_rotary_factor", 1.0);
  a.norm_eps = c.norm_eps;
  a.gated = attn == "gated";
  a.qk_norm = attn == "gated";
  // the linear mixers
  const index_t LH = r.has("linear_num_heads") ? r.positive("linear_num_heads") : H;
  const index_t ldim = r.has("linear_head_dim") ? r.positive("linear_head_dim") : c.hidden / LH;
  if (ldim <= 0) config_fail(r.source(), "hidden_size / linear_num_heads must be > 0");
  const index_t conv = r.has("conv_kernel") ? r.positive("conv_kernel") : 4;
  auto& g = c.gdn;
  g.hidden = c.hidden;
  g.value_heads = LH;
  g.key_heads = r.has("linear_num_key_heads") ? r.positive("linear_num_key_heads") : LH;
  g.value_dim = ldim;
  g.key_dim = r.has("linear_key_head_dim") ? r.positive("linear_key_head_dim") : ldim;
  g.conv_kernel = conv;
  g.norm_eps = c.norm_eps;
  g.layout = layers::gated_deltanet_config::projection_layout::qwen3_next_fused;
  if (lin == mixer_kind::gated_deltanet && LH % g.key_heads != 0)
    config_fail(r.source(),
                "field \"linear_num_heads\" must be a multiple of "
                "\"linear_num_key_heads\"");
  auto& mb = c.mamba;
  mb.hidden = c.hidden;
  mb.heads = LH;
  mb.head_dim = ldim;
  mb.state_size = r.has("state_size") ? r.positive("state_size") : 16;
  mb.groups = r.has("n_groups") ? r.positive("n_groups") : 1;
  mb.conv_kernel = conv;
  mb.norm_eps = c.norm_eps;
  mb.use_conv_bias = true;
  mb.use_bias = false;
  auto& kd = c.kda;
  kd.hidden = c.hidden;
  kd.heads = LH;
  kd.head_dim = ldim;
  kd.conv_kernel = conv;
  kd.norm_eps = c.norm_eps;
  if (lin == mixer_kind::mamba2 && LH % mb.groups != 0)
    config_fail(r.source(), "field \"linear_num_heads\" must be a multiple of \"n_groups\"");
  // feed-forward: "moe", "dense", or one letter per layer (M = MoE, D = dense)
  const std::string ffn = r.string("ffn", "moe");
  for (index_t i = 0; i < L; ++i) {
    char f = 0;
    if (ffn == "moe" || ffn == "dense") {
      f = ffn == "moe" ? 'M' : 'D';
    } else if (static_cast<index_t>(ffn.size()) == L) {
      f = ffn[static_cast<std::size_t>(i)];
    }
    if (f != 'M' && f != 'D')
      config_fail(r.source(), "field \"ffn\" is \"" + ffn +
                                  "\": expected \"moe\", \"dense\" or one letter per layer of "
                                  "the pattern (M = MoE, D = dense), " +
                                  std::to_string(L) + " letters");
    c.layers[static_cast<std::size_t>(i)].ffn = f == 'M' ? ffn_kind::moe : ffn_kind::dense;
  }
  c.dense_dim = r.has("intermediate_size") ? r.positive("intermediate_size") : 4 * c.hidden;
  const index_t E = r.has("num_experts") ? r.positive("num_experts") : 8;
  auto& m = c.moe;
  m.hidden = c.hidden;
  m.experts = E;
  m.expert_dim = r.has("moe_intermediate_size") ? r.positive("moe_intermediate_size") : c.hidden;
  m.shared_dim = static_cast<index_t>(r.integer("shared_expert_intermediate_size", 0));
  if (m.shared_dim < 0)
    config_fail(r.source(), "field \"shared_expert_intermediate_size\" must be >= 0");
  const index_t k = r.has("num_experts_per_tok") ? r.positive("num_experts_per_tok") : 2;
  if (k > E)
    config_fail(r.source(), "field \"num_experts_per_tok\" (" + std::to_string(k) +
                                ") must be <= num_experts (" + std::to_string(E) + ")");
  m.routing = moe_options::qwen_moe(r.boolean("norm_topk_prob", true), k);
  m.names = layers::moe_ffn_names::qwen3_next(m.shared_dim > 0);
  return c;
}

}  // namespace detail

/// Reads a parsed config.json (`source` names it in errors).
inline model_config parse_config(const nlohmann::json& j, const std::string& source) {
  if (!j.is_object()) detail::config_fail(source, "not a JSON object");
  const detail::config_reader r(j, source);
  const std::string type = r.string("model_type", "");
  if (type.empty()) detail::config_fail(source, "has no \"model_type\"");
  // every family shares the ignored fields: strip them before the per-family check
  nlohmann::json rest = j;
  for (const auto& k : detail::ignored_fields()) rest.erase(k);
  const detail::config_reader rr(rest, source);
  if (type == "qwen3_next") return detail::parse_qwen3_next(rr);
  if (type == "qwen3_5_moe") return detail::parse_qwen3_5_moe(rr);
  if (type == "qwen3_5_moe_text") return detail::parse_qwen3_5_moe_text(rr);
  if (type == "granitemoehybrid") return detail::parse_granite(rr);
  if (type == "kimi_linear") return detail::parse_kimi_linear(rr);
  if (type == "seqmix") return detail::parse_seqmix(rr);
  detail::config_fail(source, "unknown model_type \"" + type +
                                  "\"; supported: qwen3_next, granitemoehybrid, kimi_linear, "
                                  "qwen3_5_moe, qwen3_5_moe_text, seqmix");
}

/// Reads `path` (a config.json, or a folder holding one).
inline model_config load_config(const std::string& path) {
  std::filesystem::path p(path);
  std::error_code ec;
  if (std::filesystem::is_directory(p, ec)) p /= "config.json";
  std::ifstream in(p, std::ios::binary);
  if (!in) detail::config_fail(p.string(), "cannot be opened");
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string text = ss.str();
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    detail::config_fail(p.string(), std::string("is not valid JSON: ") + e.what());
  }
  return parse_config(j, p.string());
}

}  // namespace seqmix::models
