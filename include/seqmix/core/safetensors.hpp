// SPDX-License-Identifier: MIT
// safetensors read and write (https://github.com/huggingface/safetensors format):
//   [8 bytes: little-endian u64 N][N bytes: JSON header][data section]
// header: {"name": {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, ...,
//          "__metadata__": {"key": "value", ...}}; offsets are relative to the data section.
// dtypes: F32 F64 BF16 F16 I32 I64 U8 BOOL (seqmix::dtype).
//
//   auto f = safetensors_file::load("model.safetensors");   // mmap: no copy, no read of the data
//   f.names(), f.names("model.layers.3."), f.info(name)      // sorted listing, dtype/shape/offsets
//   any_tensor t = f.at(name);                               // borrowed from the mapping
//   tensor_view<const bf16, 2> w = f.view<bf16, 2>(name);    // zero copy, exact dtype and rank
//   tensor<float, 2> x = f.get<float, 2>(name);              // converting copy (any dtype)
//   std::vector<std::int64_t> ids = f.get_flat<std::int64_t>(name);
// Several files or a folder (sharded checkpoints, prefixes): core/io/checkpoint.hpp.
//
// Cost: load maps the file and parses only the header (the data pages are read from disk
// when first touched: a 10 GB checkpoint costs no resident memory until used); views are O(1);
// get/get_flat copy one tensor. Copies of a safetensors_file share the mapping; views and
// borrowed any_tensors stay valid while the file object or an any_tensor from it lives.
//
// Validation, all at load, each a seqmix::io_error naming the function, the file and the entry:
// file shorter than 8 bytes; header length beyond the file; header not valid JSON / not an
// object / nested deeper than 64; a duplicate key at any level (nlohmann's parser would keep
// only the last: keys are checked during the parse); an entry without a known dtype, a shape
// of non-negative integers or [begin, end] offsets; an element or byte count that overflows
// (checked multiplication: [2^62] F32 or [2^32, 2^32] are rejected, never wrapped to 0 bytes);
// offsets outside the data section; byte count != dtype size x elements; overlapping entries;
// holes between entries or bytes after the last (the format requires a fully indexed data
// section); a __metadata__ that is not an object of strings. Unreadable paths and directories
// are io_errors too (no std::ios_base::failure). Asking for a missing name, a wrong rank, a
// wrong dtype in view(), or converting a value that does not fit (get_flat<int32_t> of a NaN or
// 1e300) are io_errors naming the tensor.
//
// Writing: safetensors_writer collects tensors of any dtype (typed views, any_tensor, or float
// data rounded to BF16/F16 by add_as) and writes one file (save) or a sharded checkpoint with
// its model.safetensors.index.json (save_sharded). The header is padded to 8 bytes so every
// tensor written after 8-byte-sized ones stays aligned.
#pragma once

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include <seqmix/core/any_tensor.hpp>
#include <seqmix/core/dtype.hpp>
#include <seqmix/core/error.hpp>
#include <seqmix/core/io/mapped_file.hpp>
#include <seqmix/core/tensor.hpp>

namespace seqmix {

static_assert(std::endian::native == std::endian::little,
              "seqmix's safetensors I/O assumes a little-endian host");

namespace detail {

/// Parses JSON text, rejecting duplicate keys at any level and nesting deeper than 64 (a hostile
/// header must not exhaust memory). Errors call `bad(what)`, which must throw.
template <class Bad>
nlohmann::json parse_strict_json(const char* begin, const char* end, Bad&& bad) {
  std::vector<std::set<std::string>> open_objects;
  std::string duplicate;
  bool too_deep = false;
  auto callback = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    using ev = nlohmann::json::parse_event_t;
    if (depth > 64) too_deep = true;
    if (event == ev::object_start) {
      open_objects.emplace_back();
    } else if (event == ev::object_end) {
      if (!open_objects.empty()) open_objects.pop_back();
    } else if (event == ev::key && !open_objects.empty() && duplicate.empty()) {
      const auto& key = parsed.get_ref<const std::string&>();
      if (!open_objects.back().insert(key).second) duplicate = key;
    }
    return !too_deep;
  };
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(begin, end, callback);
  } catch (const nlohmann::json::exception& e) {
    if (!too_deep && duplicate.empty()) bad(std::string("header is not valid JSON: ") + e.what());
  }
  if (too_deep) bad("header is not valid JSON for safetensors: nested deeper than 64 levels");
  if (!duplicate.empty()) bad("header has the key '" + duplicate + "' twice");
  return j;
}

}  // namespace detail

/// One entry of a safetensors header.
struct tensor_info {
  std::string name;
  dtype type = dtype::f32;
  std::vector<index_t> shape;
  std::size_t begin = 0;  // byte offsets into the data section
  std::size_t end = 0;
  std::size_t numel = 0;  // number of elements (product of shape)

  std::size_t nbytes() const noexcept { return end - begin; }
};

/// A safetensors file, memory-mapped (or in memory) and validated on load.
class safetensors_file {
 public:
  safetensors_file() = default;

  /// Maps and validates `path`. Throws io_error on any problem.
  static safetensors_file load(const std::string& path) {
    return parse(io::mapped_bytes::map_file(path, "safetensors_file::load"), path,
                 "safetensors_file::load");
  }

  /// Validates an in-memory image; `source` names it in error messages.
  static safetensors_file parse(std::vector<char> bytes, const std::string& source = "<memory>") {
    return parse(io::mapped_bytes::from_vector(std::move(bytes)), source,
                 "safetensors_file::parse");
  }

  /// Validates shared bytes (a mapping or a buffer). `who` starts error messages.
  static safetensors_file parse(std::shared_ptr<const io::mapped_bytes> bytes,
                                const std::string& source,
                                std::string_view who = "safetensors_file::parse") {
    safetensors_file f;
    f.source_ = source;
    f.bytes_ = std::move(bytes);
    f.index(who);
    return f;
  }

  /// The path (or the name given to parse) of the file.
  const std::string& source() const noexcept { return source_; }
  /// Number of tensors.
  std::size_t size() const noexcept { return entries_.size(); }
  bool contains(const std::string& name) const { return entries_.count(name) != 0; }
  /// True when the bytes are a file mapping.
  bool is_mapped() const noexcept { return bytes_ && bytes_->is_mapped(); }
  /// Offset of the data section in the file (8 + header length).
  std::size_t data_offset() const noexcept { return data_begin_; }

  const tensor_info& info(const std::string& name) const {
    return find(name, "safetensors_file::info");
  }

  /// Every tensor name, sorted.
  std::vector<std::string> names() const { return names(""); }
  /// The names that start with `prefix`, sorted (whole names, prefix included).
  std::vector<std::string> names(std::string_view prefix) const {
    std::vector<std::string> out;
    for (auto it = entries_.lower_bound(std::string(prefix));
         it != entries_.end() && std::string_view(it->first).substr(0, prefix.size()) == prefix;
         ++it) {
      out.push_back(it->first);
    }
    return out;
  }

  /// The "__metadata__" object (string to string), empty when absent.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  /// Tensor `name`, borrowing the file's bytes (no copy).
  any_tensor at(const std::string& name) const { return at_as(name, "safetensors_file::at"); }

  /// Zero-copy view of tensor `name`: its dtype must be T and its rank R.
  template <class T, std::size_t R>
  tensor_view<const T, R> view(const std::string& name) const {
    return at_as(name, "safetensors_file::view")
        .template view_as<T, R>("safetensors_file::view (file '" + source_ + "')");
  }

  /// Tensor `name` converted to T; its rank must be R.
  template <class T, std::size_t R>
  tensor<T, R> get(const std::string& name) const {
    return at_as(name, "safetensors_file::get")
        .template to_as<T, R>("safetensors_file::get (file '" + source_ + "')");
  }

  /// Tensor `name` converted to T, flattened (row-major).
  template <class T>
  std::vector<T> get_flat(const std::string& name) const {
    return at_as(name, "safetensors_file::get_flat")
        .template to_vector_as<T>("safetensors_file::get_flat (file '" + source_ + "')");
  }

  /// at(name) with `who` in the message when the name is missing.
  any_tensor at_as(const std::string& name, std::string_view who) const {
    const tensor_info& e = find(name, who);
    return any_tensor::borrow(e.name, e.type, e.shape, bytes_->data() + data_begin_ + e.begin,
                              e.nbytes(), bytes_);
  }

 private:
  const tensor_info& find(const std::string& name, std::string_view who) const {
    auto it = entries_.find(name);
    if (it == entries_.end()) {
      throw io_error("seqmix::" + std::string(who) + ": '" + source_ + "' has no tensor named '" +
                     name + "'");
    }
    return it->second;
  }

  void index(std::string_view who) {
    const std::string prefix =
        "seqmix::" + std::string(who) + ": malformed file '" + source_ + "': ";
    auto bad = [&](const std::string& what) { throw io_error(prefix + what); };
    const std::size_t file_size = bytes_->size();
    const char* base = reinterpret_cast<const char*>(bytes_->data());
    if (file_size < 8) {
      bad("shorter than the 8-byte header length (" + std::to_string(file_size) + " bytes)");
    }
    std::uint64_t header_len = 0;
    std::memcpy(&header_len, base, 8);
    if (header_len > file_size - 8) {
      bad("header length " + std::to_string(header_len) + " exceeds the file size " +
          std::to_string(file_size));
    }
    data_begin_ = 8 + static_cast<std::size_t>(header_len);
    const std::size_t data_size = file_size - data_begin_;
    nlohmann::json header = detail::parse_strict_json(base + 8, base + data_begin_, bad);
    if (!header.is_object()) bad("header is not a JSON object");

    std::vector<const tensor_info*> by_offset;
    for (auto& [name, value] : header.items()) {
      if (name == "__metadata__") {
        if (!value.is_object()) bad("__metadata__ is not an object");
        for (const auto& [k, v] : value.items()) {
          if (!v.is_string()) bad("__metadata__ value of '" + k + "' is not a string");
          metadata_[k] = v.get<std::string>();
        }
        continue;
      }
      const std::string entry = "entry '" + name + "' ";
      if (!value.is_object()) bad(entry + "is not an object");
      tensor_info e;
      e.name = name;
      const auto dt = value.find("dtype");
      if (dt == value.end() || !dt->is_string()) bad(entry + "has no dtype string");
      const auto& dts = dt->get_ref<const std::string&>();
      const auto parsed = parse_dtype(dts);
      if (!parsed) {
        bad(entry + "has unsupported dtype '" + dts +
            "' (seqmix reads F32 F64 BF16 F16 I32 I64 U8 BOOL)");
      }
      e.type = *parsed;
      const auto sh = value.find("shape");
      if (sh == value.end() || !sh->is_array()) bad(entry + "has no shape array");
      for (const auto& d : *sh) {
        if (d.is_number_unsigned() &&
            d.get<std::uint64_t>() <= std::uint64_t(std::numeric_limits<index_t>::max())) {
          e.shape.push_back(static_cast<index_t>(d.get<std::uint64_t>()));
        } else {
          bad(entry + "has a shape that is not non-negative integers: " + sh->dump());
        }
      }
      std::size_t nbytes = 0;
      if (!detail::checked_sizes(e.shape, dtype_size(e.type), e.numel, nbytes)) {
        bad(entry + "has shape " + sh->dump() + " of " + dts +
            ": its element or byte count overflows");
      }
      const auto off = value.find("data_offsets");
      if (off == value.end() || !off->is_array() || off->size() != 2 ||
          !(*off)[0].is_number_unsigned() || !(*off)[1].is_number_unsigned()) {
        bad(entry + "has no data_offsets [begin, end] of non-negative integers");
      }
      const auto b = (*off)[0].get<std::uint64_t>(), en = (*off)[1].get<std::uint64_t>();
      if (b > en || en > data_size) {
        bad(entry + "data_offsets [" + std::to_string(b) + ", " + std::to_string(en) +
            "] outside the data section of " + std::to_string(data_size) +
            " bytes (truncated file?)");
      }
      e.begin = static_cast<std::size_t>(b);
      e.end = static_cast<std::size_t>(en);
      if (e.end - e.begin != nbytes) {
        bad(entry + "holds " + std::to_string(e.end - e.begin) + " bytes, its dtype " + dts +
            " and shape " + sh->dump() + " need " + std::to_string(nbytes));
      }
      by_offset.push_back(&entries_.emplace(name, std::move(e)).first->second);
    }
    // Coverage: sorted by offsets, each entry starts where the previous ended, the last ends at
    // the end of the file (empty tensors sort first at their offset).
    std::sort(by_offset.begin(), by_offset.end(), [](const tensor_info* x, const tensor_info* y) {
      return x->begin != y->begin ? x->begin < y->begin : x->end < y->end;
    });
    std::size_t expect = 0;
    const tensor_info* prev = nullptr;
    for (const tensor_info* e : by_offset) {
      if (e->begin < expect) {
        bad("entry '" + e->name + "' [" + std::to_string(e->begin) + ", " + std::to_string(e->end) +
            ") overlaps entry '" + prev->name + "' [" + std::to_string(prev->begin) + ", " +
            std::to_string(prev->end) + ")");
      }
      if (e->begin > expect) {
        bad("bytes [" + std::to_string(expect) + ", " + std::to_string(e->begin) +
            ") of the data section belong to no tensor (a hole before entry '" + e->name + "')");
      }
      expect = e->end;
      prev = e;
    }
    if (expect != data_size) {
      bad("bytes [" + std::to_string(expect) + ", " + std::to_string(data_size) +
          ") at the end of the data section belong to no tensor (trailing unindexed bytes)");
    }
  }

  std::string source_;
  std::shared_ptr<const io::mapped_bytes> bytes_;
  std::size_t data_begin_ = 0;
  std::map<std::string, tensor_info> entries_;
  std::map<std::string, std::string> metadata_;
};

/// Collects tensors and metadata, then writes one safetensors file or a sharded checkpoint.
class safetensors_writer {
 public:
  /// Adds a copy of `t` (any strides) under `name`, stored as T's dtype.
  template <class T, std::size_t R>
  void add(const std::string& name, const tensor_view<const T, R>& t) {
    add(any_tensor::copy_of<T, R>(name, t));
  }
  template <class T, std::size_t R>
  requires(!std::is_const_v<T>) void add(const std::string& name, const tensor_view<T, R>& t) {
    add<T, R>(name, tensor_view<const T, R>(t));
  }
  template <class T, std::size_t R>
  void add(const std::string& name, const tensor<T, R>& t) {
    add<T, R>(name, t.view());
  }

  /// Adds a float or double view stored as `type` (F32, F64, BF16 or F16: rounded to nearest
  /// even; double -> BF16/F16 rounds through float).
  template <class T, std::size_t R>
  void add_as(const std::string& name, const tensor_view<const T, R>& t, dtype type) {
    static_assert(std::is_floating_point_v<T>, "add_as converts float or double data");
    if (!is_floating_point(type)) {
      throw shape_error(
          "seqmix::safetensors_writer::add_as: argument 'type': expected F32, F64, "
          "BF16 or F16, got " +
          std::string(dtype_name(type)));
    }
    const auto src = any_tensor::copy_of<T, R>(name, t);
    any_tensor out(name, type, src.shape());
    auto convert = [&](auto* dst) {
      detail::convert_elements(src.type(), src.data(), static_cast<std::size_t>(src.size()), dst,
                               "safetensors_writer::add_as", name);
    };
    std::byte* p = out.mutable_data();
    switch (type) {
      case dtype::f32:
        convert(reinterpret_cast<float*>(p));
        break;
      case dtype::f64:
        convert(reinterpret_cast<double*>(p));
        break;
      case dtype::bf16:
        convert(reinterpret_cast<bf16*>(p));
        break;
      default:
        convert(reinterpret_cast<f16*>(p));
        break;
    }
    add(std::move(out));
  }
  template <class T, std::size_t R>
  void add_as(const std::string& name, const tensor<T, R>& t, dtype type) {
    add_as<T, R>(name, t.view(), type);
  }

  /// Adds a type-erased tensor (its name, dtype, shape and bytes; the bytes are shared).
  void add(any_tensor t) {
    const std::string& name = t.name();
    if (name == "__metadata__" || names_.count(name)) {
      throw io_error("seqmix::safetensors_writer: duplicate or reserved tensor name '" + name +
                     "'");
    }
    names_.insert({name, entries_.size()});
    entries_.push_back(std::move(t));
  }

  void set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }

  /// Number of tensors added.
  std::size_t size() const noexcept { return entries_.size(); }

  /// The file image of all tensors.
  std::vector<char> serialize() const {
    std::vector<std::size_t> all(entries_.size());
    for (std::size_t i = 0; i < all.size(); ++i) all[i] = i;
    return image(all);
  }

  /// Writes all tensors to `path`.
  void save(const std::string& path) const {
    std::vector<std::size_t> all(entries_.size());
    for (std::size_t i = 0; i < all.size(); ++i) all[i] = i;
    write_file(path, image(all), "safetensors_writer::save");
  }

  /// Writes a sharded checkpoint into `directory` (created if needed): files
  /// model-0000i-of-0000n.safetensors of at most `max_shard_bytes` of data each (a larger tensor
  /// gets a shard of its own), in insertion order, and model.safetensors.index.json with
  /// {"metadata": {"total_size": ...}, "weight_map": {name: file}}. Returns the shard names.
  std::vector<std::string> save_sharded(const std::string& directory,
                                        std::size_t max_shard_bytes) const {
    std::vector<std::vector<std::size_t>> shards;
    std::size_t current = 0, total = 0;
    for (std::size_t i = 0; i < entries_.size(); ++i) {
      const std::size_t n = entries_[i].nbytes();
      if (shards.empty() || (current + n > max_shard_bytes && current > 0)) {
        shards.emplace_back();
        current = 0;
      }
      shards.back().push_back(i);
      current += n;
      total += n;
    }
    if (shards.empty()) shards.emplace_back();
    std::error_code ec;
    std::filesystem::create_directories(directory, ec);
    if (ec) {
      throw io_error("seqmix::safetensors_writer::save_sharded: cannot create '" + directory +
                     "': " + ec.message());
    }
    std::vector<std::string> files;
    nlohmann::ordered_json map = nlohmann::ordered_json::object();
    for (std::size_t s = 0; s < shards.size(); ++s) {
      char buf[64];
      std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", s + 1, shards.size());
      files.emplace_back(buf);
      for (std::size_t i : shards[s]) map[entries_[i].name()] = files.back();
      write_file((std::filesystem::path(directory) / files.back()).string(), image(shards[s]),
                 "safetensors_writer::save_sharded");
    }
    nlohmann::ordered_json index = {{"metadata", {{"total_size", total}}}, {"weight_map", map}};
    const std::string text = dump(index, "safetensors_writer::save_sharded") + "\n";
    write_file((std::filesystem::path(directory) / "model.safetensors.index.json").string(),
               std::vector<char>(text.begin(), text.end()), "safetensors_writer::save_sharded");
    return files;
  }

 private:
  template <class J>
  static std::string dump(const J& j, std::string_view who) {
    try {
      return j.dump();
    } catch (const nlohmann::json::exception& e) {  // a name that is not valid UTF-8
      throw io_error("seqmix::" + std::string(who) + ": cannot write the header: " + e.what());
    }
  }

  std::vector<char> image(const std::vector<std::size_t>& which) const {
    nlohmann::ordered_json header = nlohmann::ordered_json::object();
    if (!metadata_.empty()) header["__metadata__"] = metadata_;
    std::size_t offset = 0;
    for (std::size_t i : which) {
      const any_tensor& e = entries_[i];
      header[e.name()] = {{"dtype", dtype_name(e.type())},
                          {"shape", e.shape()},
                          {"data_offsets", {offset, offset + e.nbytes()}}};
      offset += e.nbytes();
    }
    std::string text = dump(header, "safetensors_writer");
    while (text.size() % 8) text.push_back(' ');  // data section 8-byte aligned, as the format asks
    std::vector<char> out(8 + text.size() + offset);
    const std::uint64_t n = text.size();
    std::memcpy(out.data(), &n, 8);
    std::memcpy(out.data() + 8, text.data(), text.size());
    char* p = out.data() + 8 + text.size();
    for (std::size_t i : which) {
      const any_tensor& e = entries_[i];
      if (e.nbytes() != 0) std::memcpy(p, e.data(), e.nbytes());
      p += e.nbytes();
    }
    return out;
  }

  static void write_file(const std::string& path, const std::vector<char>& bytes,
                         std::string_view who) {
    std::FILE* f = std::fopen(path.c_str(), "wb");
    if (!f) {
      throw io_error("seqmix::" + std::string(who) + ": cannot open '" + path +
                     "' for writing: " + std::strerror(errno));
    }
    const bool ok = std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size();
    const bool closed = std::fclose(f) == 0;
    if (!ok || !closed) {
      throw io_error("seqmix::" + std::string(who) + ": write to '" + path + "' failed");
    }
  }

  std::vector<any_tensor> entries_;
  std::map<std::string, std::size_t> names_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace seqmix
