// SPDX-License-Identifier: MIT
// Compile-fail: an element of a view of const cannot be written.
#include <seqmix/core/tensor.hpp>

int main() {
  seqmix::tensor<float, 2> t({2, 2});
  seqmix::tensor_view<const float, 2> v = t;
#ifdef SEQMIX_SHOULD_FAIL
  v(0, 1) = 1.0f;  // compile-fail: assignment through a read-only view
#else
  t(0, 1) = v(0, 0);
#endif
  return static_cast<int>(t(0, 1));
}
