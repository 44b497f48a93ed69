// SPDX-License-Identifier: MIT
// Compile-fail: fill() exists only on mutable views.
#include <seqmix/core/tensor.hpp>

int main() {
  seqmix::tensor<float, 1> t({4});
  seqmix::tensor_view<const float, 1> v = t;
#ifdef SEQMIX_SHOULD_FAIL
  v.fill(1.0f);  // compile-fail: fill of a read-only view
#else
  t.view().fill(1.0f);
#endif
  return static_cast<int>(v(3));
}
