// SPDX-License-Identifier: MIT
// recurrent_layer<Derived>: the public face every recurrent mixer layer (gated_deltanet, mamba2)
// shares, written once: make_cache, prefill over whole sequences or packed ones, decode one token
// per sequence or per listed cache row (continuous batching), each checking its arguments under
// the layer's own name before any work.
//
//   x, y  [B, T, D]   prefill input / output (D = the layer's hidden size), packed: [1, T, D]
//   x, y  [B, D]      decode input / output
//   cache recurrent_cache: conv [B, K-1, C] and state [B, H, a, b] (layers/recurrent_cache.hpp)
//
// Derived supplies the geometry and the work (it befriends this class):
//   static constexpr layer_names names;        the three entry names, e.g. "mamba2::forward"
//   index_t hidden_size(), conv_rows(), conv_channels(); shape_t<3> state_dims()
//   void run(x, y, cache, cu_seqlens)          prefill (cu_seqlens empty: row b is sequence b)
//   void step_rows(x, y, cache, rows)          decode (rows empty: token b continues row b)
#pragma once

#include <span>
#include <string>
#include <string_view>

#include <seqmix/core/error.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/layers/recurrent_cache.hpp>
#include <seqmix/layers/weights.hpp>

namespace seqmix::layers {

/// The names a layer's entries report in their errors.
struct layer_names {
  std::string_view make_cache, forward, step;
};

template <class Derived>
class recurrent_layer {
 public:
  using cache_type = recurrent_cache;

  /// A zero cache for `batch` sequences (capacity unused: the state is constant-size).
  cache_type make_cache(index_t batch, index_t capacity = 0) const {
    const checker check{Derived::names.make_cache};
    if (!(batch >= 1)) check.fail("batch", "must be >= 1, got " + std::to_string(batch));
    if (!(capacity >= 0)) check.fail("capacity", "must be >= 0, got " + std::to_string(capacity));
    return cache_type(batch, self().conv_rows(), self().conv_channels(), self().state_dims());
  }

  /// Prefill: x [B, T, D] -> y [B, T, D], continuing each row of `cache` ([B] sequences).
  void forward(tensor_view<const float, 3> x, tensor_view<float, 3> y, cache_type& cache) {
    const checker check{Derived::names.forward};
    check_x(check, x, y);
    check_cache(check, cache, x.extent(0));
    self().run(x, y, cache, {});
  }
  /// Packed variable-length prefill: x, y [1, T, D]; sequence n is tokens cu_seqlens[n] ..
  /// cu_seqlens[n+1]-1 and continues row n of `cache` ([N] sequences).
  void forward(tensor_view<const float, 3> x, tensor_view<float, 3> y, cache_type& cache,
               std::span<const index_t> cu_seqlens) {
    const checker check{Derived::names.forward};
    check_x(check, x, y);
    const index_t N = check.cu_seqlens(cu_seqlens, x.extent(0), x.extent(1));
    check_cache(check, cache, N);
    self().run(x, y, cache, cu_seqlens);
  }
  /// Prefill returning a fresh y.
  tensor<float, 3> forward(tensor_view<const float, 3> x, cache_type& cache) {
    tensor<float, 3> y({x.extent(0), x.extent(1), self().hidden_size()});
    forward(x, y.view(), cache);
    return y;
  }

  /// Decode one token per sequence: x [B, D] -> y [B, D]; cache [B] updated in place.
  void step(tensor_view<const float, 2> x, tensor_view<float, 2> y, cache_type& cache) {
    const checker check{Derived::names.step};
    check_step(check, x, y);
    check_cache(check, cache, x.extent(0));
    self().step_rows(x, y, cache, {});
  }
  /// Continuous batching: token i of x [B, D] continues cache row rows[i] (B distinct rows of
  /// a cache of any size); the other rows are untouched. Allocates nothing once warm.
  void step(tensor_view<const float, 2> x, tensor_view<float, 2> y, cache_type& cache,
            std::span<const index_t> rows) {
    const checker check{Derived::names.step};
    check_step(check, x, y);
    check_cache(check, cache, cache.batch());
    front::check_rows(check, rows, x.extent(0), cache.batch());
    self().step_rows(x, y, cache, rows);
  }

 protected:
  recurrent_layer() = default;

 private:
  const Derived& self() const noexcept { return static_cast<const Derived&>(*this); }
  Derived& self() noexcept { return static_cast<Derived&>(*this); }

  void check_x(const checker& check, const tensor_view<const float, 3>& x,
               const tensor_view<float, 3>& y) const {
    const index_t D = self().hidden_size();
    check.nonempty("x", x);
    check.shape("x", x, {any_extent, any_extent, D});
    check.shape("y", y, {x.extent(0), x.extent(1), D});
    check.inner_contiguous("x", x);
    check.inner_contiguous("y", y);
    check.no_overlap({range_of("y", y)}, {range_of("x", x)});
  }
  void check_step(const checker& check, const tensor_view<const float, 2>& x,
                  const tensor_view<float, 2>& y) const {
    const index_t D = self().hidden_size();
    check.nonempty("x", x);
    check.shape("x", x, {x.extent(0), D});
    check.shape("y", y, {x.extent(0), D});
    check.inner_contiguous("x", x);
    check.inner_contiguous("y", y);
    check.no_overlap({range_of("y", y)}, {range_of("x", x)});
  }
  void check_cache(const checker& check, const cache_type& cache, index_t rows) const {
    const shape_t<3> s = self().state_dims();
    check.shape("cache.conv", cache.conv().view(),
                {rows, self().conv_rows(), self().conv_channels()});
    check.shape("cache.state", cache.state().view(), {rows, s[0], s[1], s[2]});
  }
};

}  // namespace seqmix::layers
