// SPDX-License-Identifier: MIT
// recurrent_cache: the decode state of a recurrent mixer layer (Gated DeltaNet, Mamba2): the
// short conv's window and the mixer's state, per sequence, plus the tokens seen.
//
//   conv  [B, K-1, C]   the last K-1 conv inputs, oldest first (layers/short_conv.hpp says how
//                       this relates to transformers' [B, C, K] conv_state)
//   state [B, H, a, b]  the mixer's state (Gated DeltaNet [B, HV, K, V]; Mamba2 [B, H, N, P],
//                       mamba2_state_to_pn gives transformers' [B, H, P, N])
//
// Memory is constant in the number of tokens. snapshot() is a deep copy; restore() checks the
// geometry and copies back (the cache is untouched when it does not match). Truncation has no
// meaning for a recurrent state (it cannot be rolled back): snapshot before, restore after.
#pragma once

#include <string>
#include <vector>

#include <seqmix/core/error.hpp>
#include <seqmix/core/tensor.hpp>

namespace seqmix::layers {

class recurrent_cache {
 public:
  recurrent_cache() = default;
  recurrent_cache(index_t batch, index_t conv_rows, index_t conv_channels,
                  const shape_t<3>& state_dims)
      : conv_({batch, conv_rows, conv_channels}),
        state_({batch, state_dims[0], state_dims[1], state_dims[2]}),
        len_(static_cast<std::size_t>(batch), 0) {}

  index_t batch() const noexcept { return conv_.extent(0); }
  tensor<float, 3>& conv() noexcept { return conv_; }
  const tensor<float, 3>& conv() const noexcept { return conv_; }
  tensor<float, 4>& state() noexcept { return state_; }
  const tensor<float, 4>& state() const noexcept { return state_; }
  /// Tokens seen by sequence b.
  index_t length(index_t b) const {
    check_row("recurrent_cache::length", b);
    return len_[static_cast<std::size_t>(b)];
  }
  void advance(index_t b, index_t n) noexcept { len_[static_cast<std::size_t>(b)] += n; }
  /// Zeroes every sequence's conv window and state.
  void reset() {
    conv_.fill(0.0f);
    state_.fill(0.0f);
    std::fill(len_.begin(), len_.end(), index_t(0));
  }
  /// Zeroes sequence b (a new request in that row).
  void reset(index_t b) {
    check_row("recurrent_cache::reset", b);
    conv_.select<0>(b).fill(0.0f);
    state_.select<0>(b).fill(0.0f);
    len_[static_cast<std::size_t>(b)] = 0;
  }
  recurrent_cache snapshot() const { return *this; }
  void restore(const recurrent_cache& s) {
    if (s.conv_.shape() != conv_.shape() || s.state_.shape() != state_.shape()) {
      throw shape_error("seqmix::recurrent_cache::restore: argument 's': geometry " + describe(s) +
                        " does not match the cache's " + describe(*this));
    }
    conv_ = s.conv_;
    state_ = s.state_;
    len_ = s.len_;
  }

 private:
  static std::string describe(const recurrent_cache& c) {
    std::string out = "conv [";
    for (std::size_t d = 0; d < 3; ++d) out += (d ? ", " : "") + std::to_string(c.conv_.extent(d));
    out += "], state [";
    for (std::size_t d = 0; d < 4; ++d) out += (d ? ", " : "") + std::to_string(c.state_.extent(d));
    return out + "]";
  }
  void check_row(const char* where, index_t b) const {
    if (b < 0 || b >= batch()) {
      throw shape_error(std::string("seqmix::") + where + ": argument 'b': expected 0 <= b < " +
                        std::to_string(batch()) + ", got " + std::to_string(b));
    }
  }

  tensor<float, 3> conv_;
  tensor<float, 4> state_;
  std::vector<index_t> len_;
};

}  // namespace seqmix::layers
