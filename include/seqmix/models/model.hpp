// SPDX-License-Identifier: MIT
// hybrid_model: a Linear-MoE decoder from a Hugging Face checkpoint folder (config.json +
// model.safetensors or model.safetensors.index.json), run exactly as transformers does in
// float32: prefill with the mixers' chunked forms, decode with their recurrent forms.
//
//   h_0 = embed(ids) · embedding_multiplier
//   for each layer i:  h += residual_multiplier · mixer_i(norm(h))          (GDN / attention /
//                      h += residual_multiplier · ffn_i(post_norm(h))       Mamba2 / KDA / MLA;
//                                                                          MoE or dense)
//   logits = lm_head(norm(h)) / logits_scaling
//
//   auto m = models::hybrid_model::load("path/to/model_dir");
//   auto cache = m.make_cache(2, 4096);                    // 2 sequences, 4096 tokens of KV
//   auto lp = m.prefill(ids, cu_seqlens, cache, logits_mode::last);     // [2, V]
//   auto ld = m.decode(next_ids, cache);                    // [2, V], one token per sequence
//
// prefill(ids [T], cu_seqlens [N+1], cache): N packed sequences (cu_seqlens empty: one), each
// continuing row n of `cache` (a cache of exactly N rows); logits of every token [T, V] or of
// each sequence's last token [N, V]. decode(ids [B], cache): one token per sequence of a cache
// of B rows -> [B, V]; decode(ids [B], state_indices [B], cache): token i continues row
// state_indices[i] of a cache of any size (continuous batching). The cache (model_cache) holds one
// entry per layer: conv window + recurrent state (GDN, Mamba2, KDA) or a full KV cache of
// `capacity` tokens (attention; MLA keeps its decompressed per-head keys and values, see
// layers/mla_attention.hpp); snapshot() / restore() copy all of it (speculative decoding, prefix
// reuse).
//
// Loading checks the checkpoint against the model: every tensor the layers read must be present
// with its shape and a dtype of F32 or BF16 (bf16 matrices stay bf16, f32 compute), and every
// tensor of the checkpoint must be read (mtp.* of Qwen3-Next and Qwen3.5, their
// multi-token-prediction head, and model.visual.* of Qwen3.5, its vision tower, are listed in
// unused_tensors() and not loaded: model_config::unused_prefixes). Missing and extra tensors
// are one seqmix::io_error listing them all. Qwen3.5-MoE's text prefix and expert layout are
// read from the checkpoint's names (resolve_layout).
//
// Cost per token: the layers' (see their headers) + 2·D·V for the logits (all positions:
// T·2·D·V; logits_mode::last: N·2·D·V). Scratch is grow-only; decode allocates nothing but
// its returned logits once warm (decode_into writes a caller's buffer). A model object is not
// shareable between threads calling it at once.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <variant>
#include <vector>

#include <seqmix/core/error.hpp>
#include <seqmix/core/io/checkpoint.hpp>
#include <seqmix/core/safetensors.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/layers/gated_attention.hpp>
#include <seqmix/layers/gated_deltanet.hpp>
#include <seqmix/layers/kda.hpp>
#include <seqmix/layers/mamba2.hpp>
#include <seqmix/layers/mla_attention.hpp>
#include <seqmix/layers/moe_ffn.hpp>
#include <seqmix/layers/recurrent_cache.hpp>
#include <seqmix/layers/rms_norm.hpp>
#include <seqmix/layers/swiglu_mlp.hpp>
#include <seqmix/layers/weights.hpp>
#include <seqmix/models/config.hpp>

namespace seqmix::models {

enum class logits_mode { all, last };

/// The decode state of every layer for a batch of sequences.
class model_cache {
 public:
  using entry = std::variant<layers::recurrent_cache, layers::attention_cache>;

  model_cache() = default;
  model_cache(std::vector<entry> layers, index_t batch, index_t capacity)
      : layers_(std::move(layers)),
        batch_(batch),
        capacity_(capacity),
        len_(static_cast<std::size_t>(batch), 0) {}

  index_t batch() const noexcept { return batch_; }
  index_t capacity() const noexcept { return capacity_; }
  index_t num_layers() const noexcept { return static_cast<index_t>(layers_.size()); }
  /// Tokens seen by sequence b.
  index_t length(index_t b) const {
    if (b < 0 || b >= batch_)
      throw shape_error("seqmix::model_cache::length: argument 'b': expected 0 <= b < " +
                        std::to_string(batch_) + ", got " + std::to_string(b));
    return len_[static_cast<std::size_t>(b)];
  }
  entry& layer(index_t i) { return layers_.at(static_cast<std::size_t>(i)); }
  const entry& layer(index_t i) const { return layers_.at(static_cast<std::size_t>(i)); }
  /// Bytes of state and KV storage.
  std::size_t bytes() const {
    std::size_t n = 0;
    for (const auto& e : layers_) {
      if (const auto* r = std::get_if<layers::recurrent_cache>(&e)) {
        n += static_cast<std::size_t>(r->conv().size() + r->state().size()) * sizeof(float);
      } else {
        n += std::get<layers::attention_cache>(e).kv().storage_bytes();
      }
    }
    return n;
  }
  void reset() {
    for (auto& e : layers_) std::visit([](auto& c) { c.reset(); }, e);
    std::fill(len_.begin(), len_.end(), index_t(0));
  }
  /// A deep copy of every layer's state and KV rows.
  model_cache snapshot() const {
    model_cache s;
    s.batch_ = batch_;
    s.capacity_ = capacity_;
    s.len_ = len_;
    for (const auto& e : layers_)
      s.layers_.push_back(std::visit([](const auto& c) -> entry { return c.snapshot(); }, e));
    return s;
  }
  /// Restores a snapshot of a cache of the same model and batch (checked before any copy).
  void restore(const model_cache& s) {
    if (s.batch_ != batch_ || s.layers_.size() != layers_.size())
      throw shape_error("seqmix::model_cache::restore: argument 's': a snapshot of " +
                        std::to_string(s.layers_.size()) + " layers and " +
                        std::to_string(s.batch_) + " sequences, expected " +
                        std::to_string(layers_.size()) + " layers and " + std::to_string(batch_) +
                        " sequences");
    for (std::size_t i = 0; i < layers_.size(); ++i)
      if (s.layers_[i].index() != layers_[i].index())
        throw shape_error("seqmix::model_cache::restore: argument 's': layer " + std::to_string(i) +
                          " holds another kind of cache");
    for (std::size_t i = 0; i < layers_.size(); ++i) {
      if (auto* r = std::get_if<layers::recurrent_cache>(&layers_[i])) {
        r->restore(std::get<layers::recurrent_cache>(s.layers_[i]));
      } else {
        std::get<layers::attention_cache>(layers_[i])
            .restore(std::get<layers::attention_cache>(s.layers_[i]));
      }
    }
    len_ = s.len_;
  }
  void advance(index_t b, index_t n) { len_[static_cast<std::size_t>(b)] += n; }

 private:
  std::vector<entry> layers_;
  index_t batch_ = 0, capacity_ = 0;
  std::vector<index_t> len_;
};

/// What a prefill can record (tests, debugging): hidden states and router outputs.
struct forward_trace {
  /// [L+1] of [T, D]: the decoder's input, the output of each layer i < L-1, then after the
  /// final norm (transformers' output_hidden_states); layer_out: the last layer's output.
  std::vector<tensor<float, 2>> hidden;
  tensor<float, 2> last_layer_out;
  struct router {
    index_t layer = 0;
    tensor<float, 2> logits;   ///< [T, E]
    tensor<index_t, 2> ids;    ///< [T, k], router order
    tensor<float, 2> weights;  ///< [T, k]
  };
  std::vector<router> routers;
};

struct load_options {
  /// Tensors of the checkpoint that the model does not read are an error unless listed by a
  /// known unused prefix (mtp.) or this is true (then they are only listed in unused_tensors()).
  bool allow_unused = false;
  /// The cache of the MLA layers (Kimi-Linear): unset keeps the config's (expanded K/V unless
  /// model_config::mla.cache says otherwise); mla_cache::latent stores c and k_rot per token
  /// (layers/mla_attention.hpp gives the memory and the measured decode speed of both). Models
  /// without MLA layers ignore it.
  std::optional<layers::mla_cache> mla_cache{};
  /// Pack the MoE experts at load (moe_options::pack_experts; unset: its default, on): both
  /// forms then run on the packed copy, which is resident memory of the experts' size. Off:
  /// the experts are read through the checkpoint's mapping as stored (for a checkpoint larger
  /// than RAM; prefill's expert GEMMs then pack per call, ~15-25 % slower).
  std::optional<bool> pack_experts{};
};

namespace detail {

/// Normal numbers from (seed, tensor name): splitmix64 + Box-Muller in double, the same on any
/// platform with a correctly rounded log / sqrt / cos (a tensor's values do not depend on the
/// order tensors are drawn in).
class seeded_normal {
 public:
  seeded_normal(std::uint64_t seed, const std::string& name) {
    std::uint64_t h = 1469598103934665603ull;  // FNV-1a of the name
    for (const char ch : name) {
      h ^= static_cast<unsigned char>(ch);
      h *= 1099511628211ull;
    }
    state_ = seed * 0x9E3779B97F4A7C15ull ^ h;
  }
  double uniform() {  // (0, 1)
    return (static_cast<double>(next() >> 11) + 0.5) * (1.0 / 9007199254740992.0);
  }
  double normal() {
    const double u = uniform(), v = uniform();
    return std::sqrt(-2.0 * std::log(u)) * std::cos(6.283185307179586 * v);
  }

 private:
  std::uint64_t next() {
    std::uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  std::uint64_t state_ = 0;
};

/// How a random tensor is drawn.
enum class init_kind {
  matrix,  ///< N(0, 1/fan_in), fan_in = the last extent
  embed,   ///< N(0, 1)
  ones,    ///< norm weights (plain mode) and Mamba2's D
  zeros,   ///< norm weights of 1 + w mode, conv biases
  a_log,   ///< log A, A uniform in [1, 16]
  dt_bias  ///< softplus⁻¹(dt), dt log-uniform in [1e-3, 1e-1]
};

struct random_tensor {
  std::string name;
  std::vector<index_t> shape;
  init_kind init = init_kind::matrix;
};

}  // namespace detail

class hybrid_model {
 public:
  hybrid_model() = default;
  hybrid_model(hybrid_model&&) noexcept = default;
  hybrid_model& operator=(hybrid_model&&) noexcept = default;

  /// config.json and the checkpoint of a folder. A seqmix config (model_type "seqmix") needs
  /// no checkpoint: without model.safetensors(.index.json) its weights are drawn from its seed.
  static hybrid_model load(const std::string& dir, const load_options& opt = {}) {
    const model_config cfg = load_config(dir);
    if (cfg.random_weights) {
      std::error_code ec;
      const std::filesystem::path p(dir);
      const bool folder = std::filesystem::is_directory(p, ec);
      const bool has_weights =
          folder && (std::filesystem::exists(p / "model.safetensors", ec) ||
                     std::filesystem::exists(p / "model.safetensors.index.json", ec));
      if (!has_weights) return random(cfg);
    }
    return load(cfg, checkpoint::open(dir), opt);
  }

  /// A model of `cfg` with random weights drawn from cfg.seed (same seed: bitwise the same
  /// weights): matrices N(0, 1/fan_in), embeddings N(0, 1), norms 1, Mamba2/GDN decay and
  /// dt parameters in their usual ranges. Layers: Gated DeltaNet, (gated) attention, Mamba2, KDA;
  /// feed-forward: dense SwiGLU or a per-expert MoE (qwen3_next names, optional shared expert).
  /// The weights pass through a temporary safetensors file (the checkpoint loader reads files).
  static hybrid_model random(const model_config& cfg) {
    static std::atomic<unsigned> calls{0};
    const auto stamp = std::chrono::steady_clock::now().time_since_epoch().count();
    const auto tmp = std::filesystem::temp_directory_path() /
                     ("seqmix-random-" + std::to_string(stamp) + "-" +
                      std::to_string(reinterpret_cast<std::uintptr_t>(&calls)) + "-" +
                      std::to_string(calls++) + ".safetensors");
    save_random_weights(cfg, tmp.string());
    struct remover {
      std::filesystem::path p;
      ~remover() {
        std::error_code ec;
        std::filesystem::remove(p, ec);
      }
    } rm{tmp};
    return load(cfg, checkpoint::open(tmp.string()));
  }

  /// Writes the random weights of `cfg` (as random() draws them) to a safetensors file: with
  /// the config.json beside it, a folder hybrid_model::load reads as any checkpoint.
  static void save_random_weights(const model_config& cfg, const std::string& path) {
    safetensors_writer w;
    for (const auto& t : random_tensors(cfg)) {
      detail::seeded_normal g(cfg.seed, t.name);
      index_t n = 1;
      for (index_t e : t.shape) n *= e;
      std::vector<float> v(static_cast<std::size_t>(n));
      const double fan = static_cast<double>(t.shape.back());
      for (index_t i = 0; i < n; ++i) {
        double x = 0;
        switch (t.init) {
          case detail::init_kind::matrix:
            x = g.normal() / std::sqrt(fan);
            break;
          case detail::init_kind::embed:
            x = g.normal();
            break;
          case detail::init_kind::ones:
            x = 1.0;
            break;
          case detail::init_kind::zeros:
            x = 0.0;
            break;
          case detail::init_kind::a_log:
            x = std::log(1.0 + 15.0 * g.uniform());
            break;
          case detail::init_kind::dt_bias: {
            const double dt =
                std::exp(std::log(1e-3) + (std::log(1e-1) - std::log(1e-3)) * g.uniform());
            x = dt + std::log(-std::expm1(-dt));
            break;
          }
        }
        v[static_cast<std::size_t>(i)] = static_cast<float>(x);
      }
      const auto& sh = t.shape;
      if (sh.size() == 1) {
        w.add(t.name, tensor_view<const float, 1>(v.data(), {sh[0]}));
      } else if (sh.size() == 2) {
        w.add(t.name, tensor_view<const float, 2>(v.data(), {sh[0], sh[1]}));
      } else {
        w.add(t.name, tensor_view<const float, 3>(v.data(), {sh[0], sh[1], sh[2]}));
      }
    }
    w.save(path);
  }
  /// The parts of the layout a config does not fix, read from the checkpoint's names (only
  /// for Qwen3.5-MoE; other families are returned as they are):
  ///  - the text model's prefix: "model.language_model." (Qwen3_5MoeForConditionalGeneration)
  ///    when the checkpoint has model.language_model.embed_tokens.weight, else "model."
  ///    (Qwen3_5MoeForCausalLM; transformers' conversion maps either onto its modules);
  ///  - the experts: fused (experts.gate_up_proj [E, 2I, D] + experts.down_proj [E, D, I], as
  ///    transformers 5 saves and the released checkpoints ship) when the first layer has
  ///    experts.gate_up_proj, else per expert (experts.{e}.gate_proj / up_proj / down_proj).
  /// Anything else that does not fit is reported by load's missing / extra tensor check.
  static model_config resolve_layout(model_config cfg, const checkpoint& ck) {
    if (cfg.family != model_family::qwen3_5_moe) return cfg;
    cfg.text_prefix = ck.contains("model.language_model.embed_tokens.weight")
                          ? "model.language_model."
                          : "model.";
    const std::string moe = cfg.text_prefix + "layers.0." + cfg.ffn_prefix;
    if (ck.contains(moe + "experts.gate_up_proj") || ck.contains(moe + "experts.down_proj"))
      cfg.moe.names = layers::moe_ffn_names::transformers_fused(true, true);
    return cfg;
  }

  static hybrid_model load(const model_config& cfg, const checkpoint& ck,
                           const load_options& opt = {}) {
    constexpr std::string_view who = "hybrid_model::load";
    hybrid_model m;
    m.cfg_ = resolve_layout(cfg, ck);
    if (opt.mla_cache) m.cfg_.mla.cache = *opt.mla_cache;
    if (opt.pack_experts) m.cfg_.moe.routing.pack_experts = *opt.pack_experts;
    m.check_tensors(ck, opt);
    const model_config& c = m.cfg_;
    const index_t D = c.hidden, V = c.vocab;
    const auto root = ck.scope(c.text_prefix);
    {
      const auto& info =
          layers::detail::checked_info(who, root, "embed_tokens.weight", {V, D}, true);
      (void)info;
      const auto e = root.get_flat<float>("embed_tokens.weight");
      m.embed_ = tensor<float, 2>({V, D});
      std::copy(e.begin(), e.end(), m.embed_.data());
    }
    m.final_norm_ = layers::rms_norm::load(who, root, "norm.weight", D, c.norm_eps, c.norm_mode);
    if (c.tie_embeddings) {
      m.lm_head_ = layers::weight_matrix::load(who, root, {"embed_tokens.weight"}, {V}, D);
    } else {
      m.lm_head_ = layers::weight_matrix::load(who, ck.scope(""), {"lm_head.weight"}, {V}, D);
    }
    for (index_t i = 0; i < c.num_layers(); ++i) {
      const std::string p = c.text_prefix + "layers." + std::to_string(i) + ".";
      const auto sc = ck.scope(p);
      const layer_spec& spec = c.layers[static_cast<std::size_t>(i)];
      decoder_layer l;
      l.spec = spec;
      l.in_norm =
          layers::rms_norm::load(who, sc, "input_layernorm.weight", D, c.norm_eps, c.norm_mode);
      l.post_norm = layers::rms_norm::load(who, sc, "post_attention_layernorm.weight", D,
                                           c.norm_eps, c.norm_mode);
      switch (spec.mixer) {
        case mixer_kind::gated_deltanet:
          l.gdn.emplace(layers::gated_deltanet::load(sc.scope("linear_attn."), c.gdn));
          break;
        case mixer_kind::attention:
          l.attn.emplace(layers::gated_attention::load(sc.scope("self_attn."), c.attention));
          break;
        case mixer_kind::mamba2:
          l.mamba.emplace(layers::mamba2::load(sc.scope("mamba."), c.mamba));
          break;
        case mixer_kind::kda:
          l.kda.emplace(layers::kda_layer::load(sc.scope("self_attn."), c.kda));
          break;
        case mixer_kind::mla:
          l.mla.emplace(layers::mla_attention::load(sc.scope("self_attn."), c.mla));
          break;
      }
      if (spec.ffn == ffn_kind::moe) {
        l.moe.emplace(layers::moe_ffn::load(sc.scope(c.ffn_prefix), c.moe));
      } else {
        l.mlp.emplace(layers::swiglu_mlp::load(who, sc.scope(c.ffn_prefix), D, c.dense_dim));
      }
      m.layers_.push_back(std::move(l));
    }
    return m;
  }

  const model_config& config() const noexcept { return cfg_; }
  index_t vocab() const noexcept { return cfg_.vocab; }
  index_t hidden() const noexcept { return cfg_.hidden; }
  /// Tensors of the checkpoint not loaded (mtp.*, or any with allow_unused).
  const std::vector<std::string>& unused_tensors() const noexcept { return unused_; }

  /// A zero cache for `batch` sequences with `capacity` tokens of KV per attention layer.
  model_cache make_cache(index_t batch, index_t capacity) const {
    const checker check{"hybrid_model::make_cache"};
    if (!(batch >= 1)) check.fail("batch", "must be >= 1, got " + std::to_string(batch));
    if (!(capacity >= 1)) check.fail("capacity", "must be >= 1, got " + std::to_string(capacity));
    std::vector<model_cache::entry> e;
    for (const auto& l : layers_) {
      if (l.gdn) {
        e.emplace_back(l.gdn->make_cache(batch));
      } else if (l.mamba) {
        e.emplace_back(l.mamba->make_cache(batch));
      } else if (l.kda) {
        e.emplace_back(l.kda->make_cache(batch));
      } else if (l.mla) {
        e.emplace_back(l.mla->make_cache(batch, capacity));
      } else {
        e.emplace_back(l.attn->make_cache(batch, capacity));
      }
    }
    return model_cache(std::move(e), batch, capacity);
  }

  /// Prefill N packed sequences: ids [T]; cu_seqlens [N+1] (empty: one sequence of T tokens);
  /// cache of N rows. Returns logits [T, V] (all) or [N, V] (last token of each sequence).
  tensor<float, 2> prefill(std::span<const std::int64_t> ids, std::span<const index_t> cu_seqlens,
                           model_cache& cache, logits_mode mode = logits_mode::all,
                           forward_trace* trace = nullptr) {
    const checker check{"hybrid_model::prefill"};
    const index_t T = static_cast<index_t>(ids.size());
    if (T < 1) check.fail("ids", "must hold at least one token");
    std::vector<index_t> cu_one;
    std::span<const index_t> cu = cu_seqlens;
    if (cu.empty()) {
      cu_one = {0, T};
      cu = cu_one;
    }
    const index_t N = check.cu_seqlens(cu, 1, T);
    check_ids(check, "ids", ids);
    if (cache.batch() != N || cache.num_layers() != static_cast<index_t>(layers_.size()))
      check.fail("cache", "expected a cache of this model with " + std::to_string(N) +
                              " rows (one per sequence of cu_seqlens), got " +
                              std::to_string(cache.batch()) + " rows and " +
                              std::to_string(cache.num_layers()) + " layers");
    for (index_t n = 0; n < N; ++n) {
      const index_t len = cu[static_cast<std::size_t>(n) + 1] - cu[static_cast<std::size_t>(n)];
      if (cache.length(n) + len > cache.capacity() && has_kv())
        check.fail("cache", "sequence " + std::to_string(n) + " holds " +
                                std::to_string(cache.length(n)) + " tokens and cannot take " +
                                std::to_string(len) + " more: the capacity is " +
                                std::to_string(cache.capacity()));
    }
    const index_t D = cfg_.hidden;
    auto h = ws_.view<2>(0, {T, D});
    auto xn = ws_.view<2>(1, {T, D});
    auto y = ws_.view<2>(2, {T, D});
    embed(ids, h);
    if (trace) {
      trace->hidden.clear();
      trace->routers.clear();
      trace->hidden.push_back(tensor<float, 2>::copy_of(tensor_view<const float, 2>(h)));
    }
    const bool packed = N > 1;
    const auto x3 = tensor_view<const float, 3>(xn.data(), {1, T, D}, {T * D, D, 1});
    const auto y3 = tensor_view<float, 3>(y.data(), {1, T, D}, {T * D, D, 1});
    for (std::size_t i = 0; i < layers_.size(); ++i) {
      auto& l = layers_[i];
      l.in_norm.forward(h, xn);
      auto& ce = cache.layer(static_cast<index_t>(i));
      if (l.gdn) {
        auto& c = std::get<layers::recurrent_cache>(ce);
        packed ? l.gdn->forward(x3, y3, c, cu) : l.gdn->forward(x3, y3, c);
      } else if (l.mamba) {
        auto& c = std::get<layers::recurrent_cache>(ce);
        packed ? l.mamba->forward(x3, y3, c, cu) : l.mamba->forward(x3, y3, c);
      } else if (l.kda) {
        auto& c = std::get<layers::recurrent_cache>(ce);
        packed ? l.kda->forward(x3, y3, c, cu) : l.kda->forward(x3, y3, c);
      } else if (l.mla) {
        auto& c = std::get<layers::attention_cache>(ce);
        packed ? l.mla->forward(x3, y3, c, cu) : l.mla->forward(x3, y3, c);
      } else {
        auto& c = std::get<layers::attention_cache>(ce);
        packed ? l.attn->forward(x3, y3, c, cu) : l.attn->forward(x3, y3, c);
      }
      add_scaled(h, y);
      l.post_norm.forward(h, xn);
      if (l.moe) {
        kernels::moe::router_outputs ro;
        forward_trace::router* tr = nullptr;
        if (trace) {
          trace->routers.push_back({});
          tr = &trace->routers.back();
          tr->layer = static_cast<index_t>(i);
          tr->logits = tensor<float, 2>({T, l.moe->experts()});
          tr->ids = tensor<index_t, 2>({T, l.moe->top_k()});
          tr->weights = tensor<float, 2>({T, l.moe->top_k()});
          ro.logits = tr->logits.view();
          ro.ids = tr->ids.view();
          ro.weights = tr->weights.view();
        }
        l.moe->forward(xn, y, ro);
      } else {
        l.mlp->forward(xn, y);
      }
      add_scaled(h, y);
      if (trace) {
        if (i + 1 < layers_.size()) {
          trace->hidden.push_back(tensor<float, 2>::copy_of(tensor_view<const float, 2>(h)));
        } else {
          trace->last_layer_out = tensor<float, 2>::copy_of(tensor_view<const float, 2>(h));
        }
      }
    }
    for (index_t n = 0; n < N; ++n)
      cache.advance(n, cu[static_cast<std::size_t>(n) + 1] - cu[static_cast<std::size_t>(n)]);
    final_norm_.forward(h, xn);
    if (trace) trace->hidden.push_back(tensor<float, 2>::copy_of(tensor_view<const float, 2>(xn)));
    if (mode == logits_mode::all) {
      tensor<float, 2> logits({T, cfg_.vocab});
      head(xn, logits.view());
      return logits;
    }
    auto last = ws_.view<2>(3, {N, D});
    for (index_t n = 0; n < N; ++n)
      std::copy_n(xn.ptr({cu[static_cast<std::size_t>(n) + 1] - 1, 0}), D, last.ptr({n, 0}));
    tensor<float, 2> logits({N, cfg_.vocab});
    head(last, logits.view());
    return logits;
  }

  /// One token per sequence: ids [B] with a cache of B rows -> logits [B, V].
  tensor<float, 2> decode(std::span<const std::int64_t> ids, model_cache& cache) {
    tensor<float, 2> logits({static_cast<index_t>(ids.size()), cfg_.vocab});
    decode_into(ids, cache, logits.view());
    return logits;
  }
  /// decode writing logits [B, V]; allocates nothing once warm.
  void decode_into(std::span<const std::int64_t> ids, model_cache& cache,
                   tensor_view<float, 2> logits) {
    decode_rows(ids, {}, cache, logits);
  }
  /// Continuous batching (fla's / vLLM's state_indices): token i of ids [B] continues row
  /// state_indices[i] of a cache of any number of rows (B distinct rows); the other rows are
  /// untouched. Each row's logits are those of decoding that sequence on a cache of its own.
  tensor<float, 2> decode(std::span<const std::int64_t> ids, std::span<const index_t> state_indices,
                          model_cache& cache) {
    tensor<float, 2> logits({static_cast<index_t>(ids.size()), cfg_.vocab});
    decode_into(ids, state_indices, cache, logits.view());
    return logits;
  }
  /// decode(ids, state_indices, cache) writing logits [B, V]; allocates nothing once warm.
  void decode_into(std::span<const std::int64_t> ids, std::span<const index_t> state_indices,
                   model_cache& cache, tensor_view<float, 2> logits) {
    const checker check{"hybrid_model::decode"};
    seqmix::front::check_rows(check, state_indices, static_cast<index_t>(ids.size()),
                              cache.batch());
    decode_rows(ids, state_indices, cache, logits);
  }

 private:
  struct decoder_layer {
    layer_spec spec;
    layers::rms_norm in_norm, post_norm;
    std::optional<layers::gated_deltanet> gdn;
    std::optional<layers::gated_attention> attn;
    std::optional<layers::mamba2> mamba;
    std::optional<layers::kda_layer> kda;
    std::optional<layers::mla_attention> mla;
    std::optional<layers::moe_ffn> moe;
    std::optional<layers::swiglu_mlp> mlp;
  };

  // decode: token i continues cache row rows[i] (rows empty: row i of a cache of B rows)
  void decode_rows(std::span<const std::int64_t> ids, std::span<const index_t> rows,
                   model_cache& cache, tensor_view<float, 2> logits) {
    const checker check{"hybrid_model::decode"};
    const index_t B = static_cast<index_t>(ids.size());
    if (B < 1) check.fail("ids", "must hold one token per sequence, got none");
    check_ids(check, "ids", ids);
    const bool indexed = !rows.empty();
    if ((!indexed && cache.batch() != B) ||
        cache.num_layers() != static_cast<index_t>(layers_.size()))
      check.fail("cache", "expected a cache of this model with " + std::to_string(B) +
                              " rows (one per token of ids), got " + std::to_string(cache.batch()) +
                              " rows and " + std::to_string(cache.num_layers()) + " layers");
    check.shape("logits", logits, {B, cfg_.vocab});
    const auto row = [&](index_t i) { return indexed ? rows[static_cast<std::size_t>(i)] : i; };
    if (has_kv())
      for (index_t i = 0; i < B; ++i)
        if (cache.length(row(i)) + 1 > cache.capacity())
          check.fail("cache", "sequence " + std::to_string(row(i)) + " is full (" +
                                  std::to_string(cache.capacity()) + " tokens)");
    const index_t D = cfg_.hidden;
    auto h = ws_.view<2>(4, {B, D});
    auto xn = ws_.view<2>(5, {B, D});
    auto y = ws_.view<2>(6, {B, D});
    embed(ids, h);
    auto step = [&](auto& layer, auto& c) {
      if (indexed) {
        layer.step(xn, y, c, rows);
      } else {
        layer.step(xn, y, c);
      }
    };
    for (std::size_t i = 0; i < layers_.size(); ++i) {
      auto& l = layers_[i];
      l.in_norm.forward(h, xn);
      auto& ce = cache.layer(static_cast<index_t>(i));
      if (l.gdn) {
        step(*l.gdn, std::get<layers::recurrent_cache>(ce));
      } else if (l.mamba) {
        step(*l.mamba, std::get<layers::recurrent_cache>(ce));
      } else if (l.kda) {
        step(*l.kda, std::get<layers::recurrent_cache>(ce));
      } else if (l.mla) {
        step(*l.mla, std::get<layers::attention_cache>(ce));
      } else {
        step(*l.attn, std::get<layers::attention_cache>(ce));
      }
      add_scaled(h, y);
      l.post_norm.forward(h, xn);
      if (l.moe) {
        l.moe->forward(xn, y);
      } else {
        l.mlp->forward(xn, y);
      }
      add_scaled(h, y);
    }
    for (index_t i = 0; i < B; ++i) cache.advance(row(i), 1);
    final_norm_.forward(h, xn);
    head(xn, logits);
  }

  /// The tensors (names, shapes, how drawn) of a model of `cfg` with random weights.
  static std::vector<detail::random_tensor> random_tensors(const model_config& cfg) {
    using detail::init_kind;
    const checker check{"hybrid_model::random"};
    std::vector<detail::random_tensor> out;
    const index_t D = cfg.hidden, V = cfg.vocab;
    const init_kind norm1 =
        cfg.norm_mode == layers::norm_weight::one_plus ? init_kind::zeros : init_kind::ones;
    auto add = [&](std::string n, std::vector<index_t> shape, init_kind k = init_kind::matrix) {
      out.push_back({std::move(n), std::move(shape), k});
    };
    add("model.embed_tokens.weight", {V, D}, init_kind::embed);
    add("model.norm.weight", {D}, norm1);
    if (!cfg.tie_embeddings) add("lm_head.weight", {V, D});
    const auto& n = cfg.moe.names;
    for (index_t i = 0; i < cfg.num_layers(); ++i) {
      const std::string p = "model.layers." + std::to_string(i) + ".";
      const layer_spec& s = cfg.layers[static_cast<std::size_t>(i)];
      add(p + "input_layernorm.weight", {D}, norm1);
      add(p + "post_attention_layernorm.weight", {D}, norm1);
      if (s.mixer == mixer_kind::gated_deltanet) {
        const auto& g = cfg.gdn;
        const index_t Hk = g.key_heads, HV = g.value_heads, dk = g.key_dim, dv = g.value_dim;
        const std::string q = p + "linear_attn.";
        add(q + "in_proj_qkvz.weight", {2 * Hk * dk + 2 * HV * dv, D});
        add(q + "in_proj_ba.weight", {2 * HV, D});
        add(q + "conv1d.weight", {2 * Hk * dk + HV * dv, 1, g.conv_kernel});
        add(q + "A_log", {HV}, init_kind::a_log);
        add(q + "dt_bias", {HV}, init_kind::dt_bias);
        add(q + "norm.weight", {dv}, init_kind::ones);
        add(q + "out_proj.weight", {D, HV * dv});
      } else if (s.mixer == mixer_kind::attention) {
        const auto& a = cfg.attention;
        const std::string q = p + "self_attn.";
        add(q + "q_proj.weight", {(a.gated ? 2 : 1) * a.heads * a.head_dim, D});
        add(q + "k_proj.weight", {a.kv_heads * a.head_dim, D});
        add(q + "v_proj.weight", {a.kv_heads * a.head_dim, D});
        add(q + "o_proj.weight", {D, a.heads * a.head_dim});
        if (a.qk_norm) {
          add(q + "q_norm.weight", {a.head_dim}, init_kind::zeros);  // 1 + w
          add(q + "k_norm.weight", {a.head_dim}, init_kind::zeros);
        }
      } else if (s.mixer == mixer_kind::mamba2) {
        const auto& m = cfg.mamba;
        const index_t H = m.heads, I = H * m.head_dim, C = I + 2 * m.groups * m.state_size;
        if (m.use_bias) check.fail("config", "random weights of Mamba2 projection biases");
        const std::string q = p + "mamba.";
        add(q + "in_proj.weight", {I + C + H, D});
        add(q + "conv1d.weight", {C, 1, m.conv_kernel});
        if (m.use_conv_bias) add(q + "conv1d.bias", {C}, init_kind::zeros);
        add(q + "dt_bias", {H}, init_kind::dt_bias);
        add(q + "A_log", {H}, init_kind::a_log);
        add(q + "D", {H}, init_kind::ones);
        add(q + "norm.weight", {I}, init_kind::ones);
        add(q + "out_proj.weight", {D, I});
      } else if (s.mixer == mixer_kind::kda) {
        const auto& k = cfg.kda;
        const index_t H = k.heads, d = k.head_dim, Hd = H * d;
        const std::string q = p + "self_attn.";
        for (const char* x : {"q", "k", "v"}) {
          add(q + x + "_proj.weight", {Hd, D});
          add(q + x + "_conv1d.weight", {Hd, 1, k.conv_kernel});
        }
        add(q + "f_a_proj.weight", {d, D});  // gate LoRA of rank head_dim (as Kimi)
        add(q + "f_b_proj.weight", {Hd, d});
        add(q + "b_proj.weight", {H, D});
        add(q + "A_log", {H}, init_kind::a_log);
        add(q + "dt_bias", {Hd}, init_kind::dt_bias);
        add(q + "g_a_proj.weight", {d, D});
        add(q + "g_b_proj.weight", {Hd, d});
        add(q + "o_norm.weight", {d}, init_kind::ones);
        add(q + "o_proj.weight", {D, Hd});
      } else {
        check.fail("config", std::string("random weights of ") + mixer_name(s.mixer) +
                                 " layers are not implemented (gated_deltanet, attention, "
                                 "mamba2 and kda are)");
      }
      const std::string f = p + cfg.ffn_prefix;
      if (s.ffn == ffn_kind::moe) {
        const auto& m = cfg.moe;
        if (!n.score_bias.empty() ||
            n.experts != layers::moe_ffn_names::experts_layout::per_expert ||
            n.shared == layers::moe_ffn_names::shared_layout::fused)
          check.fail("config",
                     "random weights of this MoE layout are not implemented (per-"
                     "expert matrices, optional SwiGLU shared expert are)");
        add(f + n.router, {m.experts, D});
        for (index_t e = 0; e < m.experts; ++e) {
          const std::string x = f + n.expert_prefix + std::to_string(e) + ".";
          add(x + n.expert_gate, {m.expert_dim, D});
          add(x + n.expert_up, {m.expert_dim, D});
          add(x + n.expert_down, {D, m.expert_dim});
        }
        if (n.shared == layers::moe_ffn_names::shared_layout::swiglu) {
          const std::string x = f + n.shared_prefix;
          add(x + "gate_proj.weight", {m.shared_dim, D});
          add(x + "up_proj.weight", {m.shared_dim, D});
          add(x + "down_proj.weight", {D, m.shared_dim});
        }
        if (!n.shared_gate.empty()) add(f + n.shared_gate, {1, D});
      } else {
        add(f + "gate_proj.weight", {cfg.dense_dim, D});
        add(f + "up_proj.weight", {cfg.dense_dim, D});
        add(f + "down_proj.weight", {D, cfg.dense_dim});
      }
    }
    return out;
  }

  // a layer with a KV cache (attention, MLA) bounds the tokens by the cache capacity
  bool has_kv() const {
    return cfg_.count(mixer_kind::attention) + cfg_.count(mixer_kind::mla) > 0;
  }

  void check_ids(const checker& check, const char* arg, std::span<const std::int64_t> ids) const {
    for (std::size_t t = 0; t < ids.size(); ++t)
      if (ids[t] < 0 || ids[t] >= cfg_.vocab)
        check.fail(arg, "entry " + std::to_string(t) + " is " + std::to_string(ids[t]) +
                            ", expected a token id in [0, " + std::to_string(cfg_.vocab) + ")");
  }
  void embed(std::span<const std::int64_t> ids, const tensor_view<float, 2>& h) const {
    const index_t D = cfg_.hidden;
    const float m = cfg_.embedding_multiplier;
    for (std::size_t t = 0; t < ids.size(); ++t) {
      const float* src = embed_.data() + static_cast<index_t>(ids[t]) * D;
      float* dst = h.ptr({static_cast<index_t>(t), 0});
      for (index_t d = 0; d < D; ++d) dst[d] = src[d] * m;
    }
  }
  // h += residual_multiplier · y
  void add_scaled(const tensor_view<float, 2>& h, const tensor_view<float, 2>& y) const {
    const float r = cfg_.residual_multiplier;
    const index_t M = h.extent(0), D = h.extent(1);
    for (index_t m = 0; m < M; ++m) {
      float* hp = h.ptr({m, 0});
      const float* yp = y.ptr({m, 0});
      if (r == 1.0f) {
        for (index_t d = 0; d < D; ++d) hp[d] += yp[d];
      } else {
        for (index_t d = 0; d < D; ++d) hp[d] += yp[d] * r;
      }
    }
  }
  void head(const tensor_view<float, 2>& x, const tensor_view<float, 2>& logits) const {
    lm_head_.apply(x, logits);
    if (cfg_.logits_scaling != 1.0f) {
      const float s = cfg_.logits_scaling;
      for (index_t m = 0; m < logits.extent(0); ++m) {
        float* p = logits.ptr({m, 0});
        for (index_t v = 0; v < logits.extent(1); ++v) p[v] /= s;
      }
    }
  }

  /// Every tensor the model reads, by full name.
  std::vector<std::string> expected_tensors() const {
    const std::string& tp = cfg_.text_prefix;
    std::vector<std::string> out{tp + "embed_tokens.weight", tp + "norm.weight"};
    if (!cfg_.tie_embeddings) out.push_back("lm_head.weight");
    for (index_t i = 0; i < cfg_.num_layers(); ++i) {
      const std::string p = tp + "layers." + std::to_string(i) + ".";
      const layer_spec& s = cfg_.layers[static_cast<std::size_t>(i)];
      out.push_back(p + "input_layernorm.weight");
      out.push_back(p + "post_attention_layernorm.weight");
      if (s.mixer == mixer_kind::gated_deltanet) {
        for (const auto& n : layers::gated_deltanet::tensor_names(cfg_.gdn))
          out.push_back(p + "linear_attn." + n);
      } else if (s.mixer == mixer_kind::attention) {
        for (const char* n : {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"})
          out.push_back(p + "self_attn." + n);
        if (cfg_.attention.qk_norm) {
          out.push_back(p + "self_attn.q_norm.weight");
          out.push_back(p + "self_attn.k_norm.weight");
        }
      } else if (s.mixer == mixer_kind::mamba2) {
        for (const char* n : {"in_proj.weight", "conv1d.weight", "dt_bias", "A_log", "D",
                              "norm.weight", "out_proj.weight"})
          out.push_back(p + "mamba." + n);
        if (cfg_.mamba.use_conv_bias) out.push_back(p + "mamba.conv1d.bias");
        if (cfg_.mamba.use_bias) {
          out.push_back(p + "mamba.in_proj.bias");
          out.push_back(p + "mamba.out_proj.bias");
        }
      } else if (s.mixer == mixer_kind::kda) {
        for (const auto& n : layers::kda_layer::tensor_names()) out.push_back(p + "self_attn." + n);
      } else if (s.mixer == mixer_kind::mla) {
        for (const auto& n : layers::mla_attention::tensor_names(cfg_.mla))
          out.push_back(p + "self_attn." + n);
      }
      const std::string mp = p + cfg_.ffn_prefix;
      if (s.ffn == ffn_kind::moe) {
        for (const auto& n : layers::moe_ffn::tensor_names(cfg_.moe)) out.push_back(mp + n);
      } else {
        for (const char* n : {"gate_proj.weight", "up_proj.weight", "down_proj.weight"})
          out.push_back(mp + n);
      }
    }
    return out;
  }

  void check_tensors(const checkpoint& ck, const load_options& opt) {
    const auto expected = expected_tensors();
    const std::set<std::string> want(expected.begin(), expected.end());
    std::vector<std::string> missing, extra;
    for (const auto& n : expected)
      if (!ck.contains(n)) missing.push_back(n);
    for (const auto& n : ck.names()) {
      if (want.count(n)) continue;
      const bool known_unused =
          std::any_of(cfg_.unused_prefixes.begin(), cfg_.unused_prefixes.end(),
                      [&](const std::string& pre) { return n.rfind(pre, 0) == 0; });
      if (known_unused || opt.allow_unused) {
        unused_.push_back(n);
      } else {
        extra.push_back(n);
      }
    }
    if (missing.empty() && extra.empty()) return;
    auto list = [](const std::vector<std::string>& v) {
      std::string s;
      for (std::size_t i = 0; i < v.size() && i < 24; ++i) {
        if (i) s += ", ";
        s += v[i];
      }
      if (v.size() > 24) s += ", ... (" + std::to_string(v.size() - 24) + " more)";
      return s;
    };
    std::string msg = "seqmix::hybrid_model::load: checkpoint '" + ck.path() +
                      "' does not match the " + cfg_.model_type + " model of its config:";
    if (!missing.empty())
      msg += " " + std::to_string(missing.size()) + " tensor(s) missing: " + list(missing) + ";";
    if (!extra.empty())
      msg += " " + std::to_string(extra.size()) +
             " tensor(s) the model does not use: " + list(extra) +
             " (load_options::allow_unused accepts them);";
    msg.pop_back();
    throw io_error(msg);
  }

  model_config cfg_{};
  tensor<float, 2> embed_;
  layers::rms_norm final_norm_;
  layers::weight_matrix lm_head_;
  std::vector<decoder_layer> layers_;
  std::vector<std::string> unused_;
  layers::scratch ws_;
};

}  // namespace seqmix::models
