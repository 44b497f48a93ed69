// SPDX-License-Identifier: MIT
// Weights of layers as read from checkpoints: checked loading by on-disk (Hugging Face) names,
// storage in the dtype the checkpoint holds (f32 or bf16 matrices; vectors are widened to f32),
// and a grow-only scratch arena for the layers' activations.
//
//   weight_matrix w = weight_matrix::load(scope, {"q_proj.weight"}, {256}, 64,
//   "gated_attention::load"); w.apply(x [M, 64], y [M, 256]);                  // y = x · Wᵀ
//   (linalg::matmul)
//
// Loading: every tensor is looked up by its full name (scope prefix + name); a missing tensor,
// a shape other than the expected one, or a dtype other than F32 / BF16 is a seqmix::io_error
// whose message names the function the user called, the full tensor name, the expected shape
// and dtypes, and what the file holds. Several tensors may be concatenated along the rows (one
// GEMM for q|k|v, say) and their rows permuted (a fused projection re-ordered at load time so
// the GEMM writes contiguous blocks); the concatenation keeps bf16 when every part is bf16,
// otherwise it is widened to f32 exactly.
//
// Storage: by default the matrix is packed once at load into matmul's panels
// (linalg::packed_weights: the same bytes as the checkpoint's dtype, the columns padded to 32),
// which spares every call the packing of B and streams decode's weights as 4 sequential panels
// (AMD EPYC, 4096², 1 thread: GEMM +3-10 %, M = 1 decode from DRAM f32 20 -> 25 GB/s, bf16 20 ->
// 28 GB/s; bench_linalg's packed rows). A layer that reads rows of a matrix itself (MLA's
// absorbed kv_b_proj) keeps the checkpoint layout (weight_layout::checkpoint).
//
// Cost: load copies the tensor once (O(size)); apply is one linalg::matmul (2·M·N·K FLOP).
// scratch::get is O(1) once its slots have reached their high-water marks: steady-state loops
// allocate nothing.
#pragma once

#include <algorithm>
#include <cstddef>
#include <numeric>
#include <span>
#include <string>
#include <vector>

#include <seqmix/core/dtype.hpp>
#include <seqmix/core/error.hpp>
#include <seqmix/core/io/checkpoint.hpp>
#include <seqmix/core/matmul.hpp>
#include <seqmix/core/packed_weights.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/mixers/detail/front_checks.hpp>

namespace seqmix::layers {

namespace detail {

inline std::string shape_string(const std::vector<index_t>& s) {
  std::string out = "[";
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(s[i]);
  }
  return out + "]";
}

[[noreturn]] inline void weight_fail(std::string_view who, const checkpoint_scope& scope,
                                     const std::string& name, const std::string& what) {
  throw io_error("seqmix::" + std::string(who) + ": tensor '" + scope.prefix() + name +
                 "': " + what);
}

/// The tensor's info after checking it exists, has `shape` and dtype F32 or BF16 (or F16 for
/// a vector, `matrix` false).
inline const tensor_info& checked_info(std::string_view who, const checkpoint_scope& scope,
                                       const std::string& name, const std::vector<index_t>& shape,
                                       bool matrix) {
  const std::string expect = "expected shape " + shape_string(shape) +
                             (matrix ? " of F32 or BF16" : " of F32, BF16 or F16");
  if (!scope.contains(name)) {
    weight_fail(who, scope, name, "missing from the checkpoint (" + expect + ")");
  }
  const tensor_info& info = scope.info(name);
  if (info.shape != shape) {
    weight_fail(who, scope, name, expect + ", got shape " + shape_string(info.shape));
  }
  const bool ok =
      info.type == dtype::f32 || info.type == dtype::bf16 || (info.type == dtype::f16 && !matrix);
  if (!ok) {
    weight_fail(who, scope, name, expect + ", got dtype " + std::string(dtype_name(info.type)));
  }
  return info;
}

}  // namespace detail

/// A checked float vector from a checkpoint (F32, BF16 or F16, widened exactly). `shape` may
/// have rank > 1 (conv weights [C, 1, K]); the result is flat, row-major.
inline std::vector<float> load_vector(std::string_view who, const checkpoint_scope& scope,
                                      const std::string& name, const std::vector<index_t>& shape) {
  detail::checked_info(who, scope, name, shape, false);
  return scope.get_flat<float>(name);
}

/// A checked per-head parameter vector [n] (A_log, dt_bias, D, ...) as a tensor.
inline tensor<float, 1> load_vector_tensor(std::string_view who, const checkpoint_scope& scope,
                                           const std::string& name, index_t n) {
  const auto v = load_vector(who, scope, name, {n});
  tensor<float, 1> t({n});
  std::copy(v.begin(), v.end(), t.data());
  return t;
}

/// How a weight_matrix stores its matrix.
enum class weight_layout {
  packed,      ///< linalg::packed_weights (the default: faster GEMM and decode)
  checkpoint,  ///< [rows, cols] row-major as on disk, for code that reads rows itself
};

/// A [rows, cols] projection matrix (nn.Linear.weight layout [out, in]) held in f32 or bf16.
class weight_matrix {
 public:
  weight_matrix() = default;
  explicit weight_matrix(tensor<float, 2> w, weight_layout layout = weight_layout::packed)
      : bf16_store_(false) {
    store(std::move(w), layout);
  }
  explicit weight_matrix(tensor<bf16, 2> w, weight_layout layout = weight_layout::packed)
      : bf16_store_(true) {
    store(std::move(w), layout);
  }

  /// Loads and concatenates `names` (each [rows_i, cols]) along the rows; then, if `order` is
  /// not empty, row r of the result is row order[r] of the concatenation (a permutation).
  static weight_matrix load(std::string_view who, const checkpoint_scope& scope,
                            const std::vector<std::string>& names, const std::vector<index_t>& rows,
                            index_t cols, const std::vector<index_t>& order = {},
                            weight_layout layout = weight_layout::packed) {
    bool all_bf16 = true;
    index_t total = 0;
    for (std::size_t i = 0; i < names.size(); ++i) {
      const tensor_info& info = detail::checked_info(who, scope, names[i], {rows[i], cols}, true);
      all_bf16 = all_bf16 && info.type == dtype::bf16;
      total += rows[i];
    }
    if (!order.empty() && static_cast<index_t>(order.size()) != total) {
      throw shape_error("seqmix::" + std::string(who) + ": internal row order of size " +
                        std::to_string(order.size()) + " for " + std::to_string(total) + " rows");
    }
    auto assemble = [&](auto tag) {
      using E = decltype(tag);
      tensor<E, 2> cat({total, cols});
      index_t r0 = 0;
      for (std::size_t i = 0; i < names.size(); ++i) {
        const auto part = scope.get_flat<E>(names[i]);
        std::copy(part.begin(), part.end(), cat.data() + r0 * cols);
        r0 += rows[i];
      }
      if (order.empty()) return cat;
      tensor<E, 2> out({total, cols});
      for (index_t r = 0; r < total; ++r) {
        const index_t src = order[static_cast<std::size_t>(r)];
        std::copy(cat.data() + src * cols, cat.data() + (src + 1) * cols, out.data() + r * cols);
      }
      return out;
    };
    if (all_bf16) return weight_matrix(assemble(bf16{}), layout);
    return weight_matrix(assemble(float{}), layout);
  }

  bool is_bf16() const noexcept { return bf16_store_; }
  bool is_packed() const noexcept { return !packed_.empty(); }
  index_t rows() const noexcept { return rows_; }
  index_t cols() const noexcept { return cols_; }
  /// Bytes of weight storage (what a decode step streams).
  std::size_t bytes() const noexcept {
    if (is_packed()) return packed_.bytes();
    return static_cast<std::size_t>(rows() * cols()) * (bf16_store_ ? 2u : 4u);
  }
  /// The checkpoint layout (weight_layout::checkpoint only; empty when packed).
  const tensor<float, 2>& f32() const noexcept { return f32_; }
  const tensor<bf16, 2>& b16() const noexcept { return b16_; }

  /// y [M, rows] = x [M, cols] · Wᵀ (+ the fused epilogue of `opt`).
  void apply(tensor_view<const float, 2> x, tensor_view<float, 2> y,
             const linalg::matmul_options& opt = {}) const {
    if (is_packed()) {
      linalg::matmul(x, packed_, y, opt);
    } else if (bf16_store_) {
      linalg::matmul(x, b16_.view(), y, opt);
    } else {
      linalg::matmul(x, f32_.view(), y, opt);
    }
  }

 private:
  template <class E>
  void store(tensor<E, 2> w, weight_layout layout) {
    rows_ = w.extent(0);
    cols_ = w.extent(1);
    if (layout == weight_layout::packed && w.size() != 0) {
      packed_ = linalg::packed_weights(w.view());
    } else if constexpr (std::is_same_v<E, bf16>) {
      b16_ = std::move(w);
    } else {
      f32_ = std::move(w);
    }
  }

  tensor<float, 2> f32_;
  tensor<bf16, 2> b16_;
  linalg::packed_weights packed_;
  index_t rows_ = 0, cols_ = 0;
  bool bf16_store_ = false;
};

/// Grow-only float buffers, one per slot; views over them stay valid until the slot grows.
class scratch {
 public:
  float* get(std::size_t slot, index_t n) {
    if (slot >= bufs_.size()) bufs_.resize(slot + 1);
    auto& b = bufs_[slot];
    const auto need = static_cast<std::size_t>(n);
    if (b.size() < need) b.assign(need, 0.0f);
    return b.data();
  }
  template <std::size_t R>
  tensor_view<float, R> view(std::size_t slot, const shape_t<R>& shape) {
    index_t n = 1;
    for (index_t e : shape) n *= e;
    return tensor_view<float, R>(get(slot, n), shape);
  }

 private:
  std::vector<std::vector<float>> bufs_;
};

/// [B, T, D] as [B·T, D] when the first two dimensions fuse (stride(0) == T·stride(1)).
template <class T>
bool fuse_rows(const tensor_view<T, 3>& x, tensor_view<T, 2>& out) {
  if (x.extent(0) > 1 && x.stride(0) != x.extent(1) * x.stride(1)) return false;
  out = tensor_view<T, 2>(x.data(), {x.extent(0) * x.extent(1), x.extent(2)},
                          {x.stride(1), x.stride(2)});
  return true;
}

namespace detail {
// y_rows = W x_rows for x [B, T, in] -> out [B·T, n] (contiguous), fusing rows when possible.
inline void project_in(const weight_matrix& w, const tensor_view<const float, 3>& x,
                       const tensor_view<float, 2>& out) {
  tensor_view<const float, 2> x2;
  if (fuse_rows(x, x2)) return w.apply(x2, out);
  const index_t T = x.extent(1);
  for (index_t b = 0; b < x.extent(0); ++b)
    w.apply(x.template select<0>(b), out.slice(0, b * T, (b + 1) * T));
}
inline void project_out(const weight_matrix& w, const tensor_view<const float, 2>& in,
                        const tensor_view<float, 3>& y) {
  tensor_view<float, 2> y2;
  if (fuse_rows(y, y2)) return w.apply(in, y2);
  const index_t T = y.extent(1);
  for (index_t b = 0; b < y.extent(0); ++b)
    w.apply(in.slice(0, b * T, (b + 1) * T), y.template select<0>(b));
}
inline void check_config_positive(const checker& check, std::initializer_list<const char*> names,
                                  std::initializer_list<index_t> values) {
  auto n = names.begin();
  for (index_t v : values) {
    if (v <= 0) check.fail(std::string("config.") + *n, "must be > 0, got " + std::to_string(v));
    ++n;
  }
}
}  // namespace detail

}  // namespace seqmix::layers
