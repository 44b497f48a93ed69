// SPDX-License-Identifier: MIT
// safetensors read and write (https://github.com/huggingface/safetensors format):
//   [8 bytes: little-endian u64 N][N bytes: JSON header][data]
// header: {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
//          "__metadata__": {"key": "value", ...}}; offsets are relative to the data section.
// Reading validates everything before use (sizes, offsets, dtypes, shapes) and throws
// seqmix::io_error with the file name and what is wrong; a malformed file never crashes.
// Supported dtypes: F32, F64, I64, I32 (read, converted to the requested T; and written).
#pragma once

#include <bit>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <string>
#include <type_traits>
#include <vector>

#include <nlohmann/json.hpp>

#include <seqmix/core/error.hpp>
#include <seqmix/core/tensor.hpp>

namespace seqmix {

static_assert(std::endian::native == std::endian::little,
              "seqmix's safetensors I/O assumes a little-endian host");

enum class dtype { f32, f64, i64, i32 };

inline const char* dtype_name(dtype t) {
  switch (t) {
    case dtype::f32:
      return "F32";
    case dtype::f64:
      return "F64";
    case dtype::i64:
      return "I64";
    case dtype::i32:
      return "I32";
  }
  return "?";
}

inline std::size_t dtype_size(dtype t) {
  switch (t) {
    case dtype::f32:
      return 4;
    case dtype::f64:
      return 8;
    case dtype::i64:
      return 8;
    case dtype::i32:
      return 4;
  }
  return 0;
}

template <class T>
constexpr dtype dtype_of() {
  if constexpr (std::is_same_v<T, float>)
    return dtype::f32;
  else if constexpr (std::is_same_v<T, double>)
    return dtype::f64;
  else if constexpr (std::is_same_v<T, std::int64_t>)
    return dtype::i64;
  else if constexpr (std::is_same_v<T, std::int32_t>)
    return dtype::i32;
  else
    static_assert(sizeof(T) == 0, "unsupported safetensors element type");
}

/// One entry of a safetensors header.
struct tensor_info {
  std::string name;
  dtype type = dtype::f32;
  std::vector<index_t> shape;
  std::size_t begin = 0;  // byte offsets into the data section
  std::size_t end = 0;
};

/// A safetensors file held in memory, validated on load.
class safetensors_file {
 public:
  /// Reads and validates `path`. Throws io_error on any problem.
  static safetensors_file load(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw io_error("seqmix::safetensors: cannot open '" + path + "'");
    std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    return parse(std::move(bytes), path);
  }

  /// Validates an in-memory image; `source` names it in error messages.
  static safetensors_file parse(std::vector<char> bytes, const std::string& source = "<memory>") {
    safetensors_file f;
    f.source_ = source;
    f.bytes_ = std::move(bytes);
    f.index();
    return f;
  }

  bool contains(const std::string& name) const { return entries_.count(name) != 0; }

  const tensor_info& info(const std::string& name) const {
    auto it = entries_.find(name);
    if (it == entries_.end()) {
      throw io_error("seqmix::safetensors: '" + source_ + "' has no tensor named '" + name + "'");
    }
    return it->second;
  }

  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& [name, _] : entries_) out.push_back(name);
    return out;
  }

  /// The "__metadata__" object (string to string), empty when absent.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  /// Tensor `name` converted to T; its rank must be R.
  template <class T, std::size_t R>
  tensor<T, R> get(const std::string& name) const {
    const tensor_info& e = info(name);
    if (e.shape.size() != R) {
      throw io_error("seqmix::safetensors: tensor '" + name + "' in '" + source_ + "' has rank " +
                     std::to_string(e.shape.size()) + ", expected " + std::to_string(R));
    }
    shape_t<R> shape{};
    for (std::size_t d = 0; d < R; ++d) shape[d] = e.shape[d];
    tensor<T, R> out(shape);
    convert(e, out.data());
    return out;
  }

  /// Tensor `name` converted to T, flattened.
  template <class T>
  std::vector<T> get_flat(const std::string& name) const {
    const tensor_info& e = info(name);
    std::vector<T> out(count(e));
    convert(e, out.data());
    return out;
  }

 private:
  static std::size_t count(const tensor_info& e) {
    std::size_t n = 1;
    for (index_t d : e.shape) n *= static_cast<std::size_t>(d);
    return n;
  }

  [[noreturn]] void bad(const std::string& what) const {
    throw io_error("seqmix::safetensors: malformed file '" + source_ + "': " + what);
  }

  template <class T>
  void convert(const tensor_info& e, T* out) const {
    const char* src = bytes_.data() + data_begin_ + e.begin;
    const std::size_t n = count(e);
    auto cast_from = [&](auto tag) {
      using S = decltype(tag);
      for (std::size_t i = 0; i < n; ++i) {
        S x;
        std::memcpy(&x, src + i * sizeof(S), sizeof(S));
        out[i] = static_cast<T>(x);
      }
    };
    switch (e.type) {
      case dtype::f32:
        cast_from(float{});
        break;
      case dtype::f64:
        cast_from(double{});
        break;
      case dtype::i64:
        cast_from(std::int64_t{});
        break;
      case dtype::i32:
        cast_from(std::int32_t{});
        break;
    }
  }

  void index() {
    if (bytes_.size() < 8) bad("shorter than the 8-byte header length");
    std::uint64_t header_len = 0;
    std::memcpy(&header_len, bytes_.data(), 8);
    if (header_len > bytes_.size() - 8) {
      bad("header length " + std::to_string(header_len) + " exceeds the file size " +
          std::to_string(bytes_.size()));
    }
    data_begin_ = 8 + static_cast<std::size_t>(header_len);
    const std::size_t data_size = bytes_.size() - data_begin_;
    nlohmann::json header;
    try {
      header = nlohmann::json::parse(bytes_.begin() + 8,
                                     bytes_.begin() + static_cast<std::ptrdiff_t>(data_begin_));
    } catch (const nlohmann::json::exception& err) {
      bad(std::string("header is not valid JSON: ") + err.what());
    }
    if (!header.is_object()) bad("header is not a JSON object");
    for (const auto& [name, value] : header.items()) {
      if (name == "__metadata__") {
        if (!value.is_object()) bad("__metadata__ is not an object");
        for (const auto& [k, v] : value.items()) {
          if (!v.is_string()) bad("__metadata__ value of '" + k + "' is not a string");
          metadata_[k] = v.get<std::string>();
        }
        continue;
      }
      if (!value.is_object()) bad("entry '" + name + "' is not an object");
      tensor_info e;
      e.name = name;
      const auto dt = value.find("dtype");
      if (dt == value.end() || !dt->is_string()) bad("entry '" + name + "' has no dtype string");
      const std::string dts = dt->get<std::string>();
      if (dts == "F32")
        e.type = dtype::f32;
      else if (dts == "F64")
        e.type = dtype::f64;
      else if (dts == "I64")
        e.type = dtype::i64;
      else if (dts == "I32")
        e.type = dtype::i32;
      else
        bad("entry '" + name + "' has unsupported dtype '" + dts + "'");
      const auto sh = value.find("shape");
      if (sh == value.end() || !sh->is_array()) bad("entry '" + name + "' has no shape array");
      std::size_t n = 1;
      for (const auto& d : *sh) {
        if (!d.is_number_integer() || d.get<std::int64_t>() < 0) {
          bad("entry '" + name + "' has a shape that is not non-negative integers");
        }
        const auto extent = d.get<std::int64_t>();
        e.shape.push_back(static_cast<index_t>(extent));
        n *= static_cast<std::size_t>(extent);
      }
      const auto off = value.find("data_offsets");
      if (off == value.end() || !off->is_array() || off->size() != 2 ||
          !(*off)[0].is_number_unsigned() || !(*off)[1].is_number_unsigned()) {
        bad("entry '" + name + "' has no data_offsets [begin, end]");
      }
      e.begin = (*off)[0].get<std::size_t>();
      e.end = (*off)[1].get<std::size_t>();
      if (e.begin > e.end || e.end > data_size) {
        bad("entry '" + name + "' data_offsets [" + std::to_string(e.begin) + ", " +
            std::to_string(e.end) + "] outside the data section of " + std::to_string(data_size) +
            " bytes (truncated file?)");
      }
      if (e.end - e.begin != n * dtype_size(e.type)) {
        bad("entry '" + name + "' holds " + std::to_string(e.end - e.begin) +
            " bytes, its dtype and shape need " + std::to_string(n * dtype_size(e.type)));
      }
      entries_.emplace(name, std::move(e));
    }
  }

  std::string source_;
  std::vector<char> bytes_;
  std::size_t data_begin_ = 0;
  std::map<std::string, tensor_info> entries_;
  std::map<std::string, std::string> metadata_;
};

/// Collects tensors and metadata, then writes one safetensors file.
class safetensors_writer {
 public:
  template <class T, std::size_t R>
  void add(const std::string& name, const tensor_view<const T, R>& t) {
    if (name == "__metadata__" || names_.count(name)) {
      throw io_error("seqmix::safetensors_writer: duplicate or reserved tensor name '" + name +
                     "'");
    }
    names_.insert({name, entries_.size()});
    entry e;
    e.name = name;
    e.type = dtype_of<T>();
    e.shape.assign(t.shape().begin(), t.shape().end());
    e.data.resize(static_cast<std::size_t>(t.size()) * sizeof(T));
    std::size_t i = 0;
    t.for_each([&](T x) {
      std::memcpy(e.data.data() + i, &x, sizeof(T));
      i += sizeof(T);
    });
    entries_.push_back(std::move(e));
  }
  template <class T, std::size_t R>
  void add(const std::string& name, const tensor<T, R>& t) {
    add<T, R>(name, t.view());
  }

  void set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }

  /// The file image.
  std::vector<char> serialize() const {
    nlohmann::ordered_json header = nlohmann::ordered_json::object();
    if (!metadata_.empty()) header["__metadata__"] = metadata_;
    std::size_t offset = 0;
    for (const entry& e : entries_) {
      header[e.name] = {{"dtype", dtype_name(e.type)},
                        {"shape", e.shape},
                        {"data_offsets", {offset, offset + e.data.size()}}};
      offset += e.data.size();
    }
    std::string text = header.dump();
    while (text.size() % 8) text.push_back(' ');  // data section 8-byte aligned, as the format asks
    std::vector<char> out(8 + text.size() + offset);
    const std::uint64_t n = text.size();
    std::memcpy(out.data(), &n, 8);
    std::memcpy(out.data() + 8, text.data(), text.size());
    char* p = out.data() + 8 + text.size();
    for (const entry& e : entries_) {
      if (!e.data.empty()) std::memcpy(p, e.data.data(), e.data.size());
      p += e.data.size();
    }
    return out;
  }

  void save(const std::string& path) const {
    const std::vector<char> bytes = serialize();
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    if (!out) throw io_error("seqmix::safetensors_writer: cannot open '" + path + "' for writing");
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    if (!out) throw io_error("seqmix::safetensors_writer: write to '" + path + "' failed");
  }

 private:
  struct entry {
    std::string name;
    dtype type = dtype::f32;
    std::vector<index_t> shape;
    std::vector<char> data;
  };
  std::vector<entry> entries_;
  std::map<std::string, std::size_t> names_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace seqmix
