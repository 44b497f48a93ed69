// SPDX-License-Identifier: MIT
// Compile-fail: a broadcast (stride-0) view is read-only, even over mutable data.
#include <seqmix/core/tensor.hpp>

int main() {
  seqmix::tensor<float, 1> bias({4});
  auto b = bias.unsqueeze(0).broadcast_to({3, 4});
#ifdef SEQMIX_SHOULD_FAIL
  b(2, 1) = 1.0f;  // compile-fail: would write one element three times
#else
  bias(1) = b(2, 1) + 1.0f;
#endif
  return static_cast<int>(bias(1));
}
