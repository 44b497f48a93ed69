// SPDX-License-Identifier: MIT
// checkpoint: the tensors of a model on disk as they are, by their on-disk (Hugging Face) names,
// from one safetensors file or a sharded set with its index.
//
//   auto ck = checkpoint::open("path/to/model_dir");     // or a .safetensors / .index.json file
//   ck.names(), ck.names("model.layers.3."), ck.info(name), ck.shard_of(name)
//   auto attn = ck.scope("model.layers.3.linear_attn."); // a prefix: names relative to it
//   auto w = attn.view<bf16, 2>("in_proj_qkvz.weight");  // zero copy from the mapping
//   tensor<float, 1> a = attn.get<float, 1>("A_log");    // converting copy
//
// open(path): a directory is searched for model.safetensors.index.json, then model.safetensors;
// a path ending in .json is an index; any other path is one safetensors file. An index is
// {"metadata": {...}, "weight_map": {"tensor name": "shard file", ...}}; shard files are
// relative to the index's folder (absolute paths and ".." are rejected), each is opened once
// (memory-mapped, see core/safetensors.hpp) and must hold every tensor the index maps to it.
// Tensors a shard holds but the index does not list are not visible (as in transformers).
// Errors are seqmix::io_error naming the function, the file (index or shard) and the tensor:
// no checkpoint in a folder, an unreadable or malformed index or shard, a duplicate key, a
// missing shard, a tensor missing from its shard, and every access error of safetensors_file.
//
// Cost: open maps each shard and parses the headers only (no tensor data is read). Copies of a
// checkpoint and its scopes share the open shards; views stay valid while any of them lives.
#pragma once

#include <cstddef>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include <seqmix/core/any_tensor.hpp>
#include <seqmix/core/error.hpp>
#include <seqmix/core/io/mapped_file.hpp>
#include <seqmix/core/safetensors.hpp>
#include <seqmix/core/tensor.hpp>

namespace seqmix {

class checkpoint_scope;

/// One safetensors file or a sharded checkpoint, by tensor name.
class checkpoint {
 public:
  checkpoint() : state_(std::make_shared<state>()) {}

  /// Opens a checkpoint folder, an index file (.json) or a single safetensors file.
  static checkpoint open(const std::string& path) {
    constexpr std::string_view who = "checkpoint::open";
    std::error_code ec;
    const std::filesystem::path p(path);
    const auto status = std::filesystem::status(p, ec);
    if (ec || !std::filesystem::exists(status)) {
      throw io_error("seqmix::checkpoint::open: cannot open '" + path +
                     "': " + (ec ? ec.message() : std::string("no such file or directory")));
    }
    if (std::filesystem::is_directory(status)) {
      const auto index = p / "model.safetensors.index.json";
      const auto single = p / "model.safetensors";
      if (std::filesystem::exists(index, ec)) return open_index(index.string(), who);
      if (std::filesystem::exists(single, ec)) return open_single(single.string(), who);
      throw io_error("seqmix::checkpoint::open: folder '" + path +
                     "' holds neither model.safetensors.index.json nor model.safetensors");
    }
    if (p.extension() == ".json") return open_index(path, who);
    return open_single(path, who);
  }

  /// The index file, or the single safetensors file.
  const std::string& path() const noexcept { return state_->path; }
  /// Number of tensors.
  std::size_t size() const noexcept { return state_->where.size(); }
  bool contains(const std::string& name) const { return state_->where.count(name) != 0; }

  /// Names starting with `prefix` (whole names), sorted.
  std::vector<std::string> names(std::string_view prefix = {}) const {
    std::vector<std::string> out;
    const auto& w = state_->where;
    for (auto it = w.lower_bound(std::string(prefix));
         it != w.end() && std::string_view(it->first).substr(0, prefix.size()) == prefix; ++it) {
      out.push_back(it->first);
    }
    return out;
  }

  /// The shards in index order of their first tensor (one for a single file).
  const std::vector<safetensors_file>& shards() const noexcept { return state_->shards; }
  /// The shard that holds `name`.
  const safetensors_file& shard_of(const std::string& name) const {
    return state_->shards[locate(name, "checkpoint::shard_of")];
  }
  /// Metadata: of the index ("metadata", values as strings; numbers as their JSON text), or
  /// the __metadata__ of a single file.
  const std::map<std::string, std::string>& metadata() const noexcept { return state_->metadata; }

  const tensor_info& info(const std::string& name) const {
    return state_->shards[locate(name, "checkpoint::info")].info(name);
  }
  any_tensor at(const std::string& name) const {
    return state_->shards[locate(name, "checkpoint::at")].at_as(name, "checkpoint::at");
  }
  template <class T, std::size_t R>
  tensor_view<const T, R> view(const std::string& name) const {
    return state_->shards[locate(name, "checkpoint::view")].template view<T, R>(name);
  }
  template <class T, std::size_t R>
  tensor<T, R> get(const std::string& name) const {
    return state_->shards[locate(name, "checkpoint::get")].template get<T, R>(name);
  }
  template <class T>
  std::vector<T> get_flat(const std::string& name) const {
    return state_->shards[locate(name, "checkpoint::get_flat")].template get_flat<T>(name);
  }

  /// The tensors under `prefix` (e.g. "model.layers.3.linear_attn."), by relative names.
  checkpoint_scope scope(std::string prefix) const;

 private:
  friend class checkpoint_scope;

  struct state {
    std::string path;
    std::vector<safetensors_file> shards;
    std::map<std::string, std::size_t> where;  // tensor name -> shard
    std::map<std::string, std::string> metadata;
  };

  std::size_t locate(const std::string& name, std::string_view who,
                     std::string_view prefix = {}) const {
    auto it = state_->where.find(name);
    if (it == state_->where.end()) {
      std::string msg = "seqmix::" + std::string(who) + ": checkpoint '" + state_->path +
                        "' has no tensor named '" + name + "'";
      if (!prefix.empty()) msg += " (in scope '" + std::string(prefix) + "')";
      throw io_error(msg);
    }
    return it->second;
  }

  static checkpoint open_single(const std::string& file, std::string_view who) {
    checkpoint c;
    c.state_->path = file;
    c.state_->shards.push_back(
        safetensors_file::parse(io::mapped_bytes::map_file(file, who), file, who));
    for (const auto& n : c.state_->shards[0].names()) c.state_->where.emplace(n, 0);
    c.state_->metadata = c.state_->shards[0].metadata();
    return c;
  }

  static checkpoint open_index(const std::string& index_path, std::string_view who) {
    const auto bytes = io::mapped_bytes::map_file(index_path, who);
    const std::string prefix =
        "seqmix::" + std::string(who) + ": malformed index '" + index_path + "': ";
    auto bad = [&](const std::string& what) { throw io_error(prefix + what); };
    const char* text = reinterpret_cast<const char*>(bytes->data());
    nlohmann::json j = detail::parse_strict_json(text, text + bytes->size(), bad);
    if (!j.is_object()) bad("not a JSON object");
    const auto wm = j.find("weight_map");
    if (wm == j.end() || !wm->is_object()) bad("has no \"weight_map\" object");
    checkpoint c;
    c.state_->path = index_path;
    if (const auto md = j.find("metadata"); md != j.end()) {
      if (!md->is_object()) bad("\"metadata\" is not an object");
      for (const auto& [k, v] : md->items()) {
        c.state_->metadata[k] = v.is_string() ? v.get<std::string>() : v.dump();
      }
    }
    const std::filesystem::path folder = std::filesystem::path(index_path).parent_path();
    std::map<std::string, std::size_t> shard_index;  // shard file -> position in shards
    for (const auto& [name, file] : wm->items()) {
      if (!file.is_string()) bad("weight_map value of '" + name + "' is not a string");
      const auto& f = file.get_ref<const std::string&>();
      const std::filesystem::path rel(f);
      bool escapes = f.empty() || rel.is_absolute() || f.find('\0') != std::string::npos;
      for (const auto& part : rel) escapes = escapes || part == "..";
      if (escapes) {
        bad("weight_map maps '" + name + "' to '" + f +
            "', which is not a file name relative to the index's folder");
      }
      auto [it, inserted] = shard_index.emplace(f, c.state_->shards.size());
      if (inserted) {
        const std::string shard_path = (folder / rel).string();
        try {
          c.state_->shards.push_back(safetensors_file::parse(
              io::mapped_bytes::map_file(shard_path, who), shard_path, who));
        } catch (const io_error& e) {
          throw io_error("seqmix::" + std::string(who) + ": index '" + index_path +
                         "' lists shard '" + f + "' (for tensor '" + name +
                         "'), which cannot be used: " + e.what());
        }
      }
      if (!c.state_->shards[it->second].contains(name)) {
        bad("weight_map puts '" + name + "' in shard '" + f + "', which has no such tensor");
      }
      c.state_->where.emplace(name, it->second);
    }
    return c;
  }

  std::shared_ptr<state> state_;
};

/// The tensors of a checkpoint under a name prefix; names are relative to the prefix and
/// messages give the whole name and the prefix.
class checkpoint_scope {
 public:
  checkpoint_scope(checkpoint ck, std::string prefix)
      : ck_(std::move(ck)), prefix_(std::move(prefix)) {}

  const std::string& prefix() const noexcept { return prefix_; }
  const checkpoint& file() const noexcept { return ck_; }

  bool contains(const std::string& name) const { return ck_.contains(prefix_ + name); }
  /// Names under the prefix, relative to it, sorted.
  std::vector<std::string> names() const {
    std::vector<std::string> out = ck_.names(prefix_);
    for (auto& n : out) n.erase(0, prefix_.size());
    return out;
  }
  const tensor_info& info(const std::string& name) const {
    return shard("checkpoint_scope::info", name).info(prefix_ + name);
  }
  any_tensor at(const std::string& name) const {
    return shard("checkpoint_scope::at", name).at_as(prefix_ + name, "checkpoint_scope::at");
  }
  template <class T, std::size_t R>
  tensor_view<const T, R> view(const std::string& name) const {
    return shard("checkpoint_scope::view", name).template view<T, R>(prefix_ + name);
  }
  template <class T, std::size_t R>
  tensor<T, R> get(const std::string& name) const {
    return shard("checkpoint_scope::get", name).template get<T, R>(prefix_ + name);
  }
  template <class T>
  std::vector<T> get_flat(const std::string& name) const {
    return shard("checkpoint_scope::get_flat", name).template get_flat<T>(prefix_ + name);
  }
  /// A narrower scope: prefix() + more.
  checkpoint_scope scope(const std::string& more) const { return {ck_, prefix_ + more}; }

 private:
  const safetensors_file& shard(std::string_view who, const std::string& name) const {
    return ck_.state_->shards[ck_.locate(prefix_ + name, who, prefix_)];
  }

  checkpoint ck_;
  std::string prefix_;
};

inline checkpoint_scope checkpoint::scope(std::string prefix) const {
  return {*this, std::move(prefix)};
}

}  // namespace seqmix
