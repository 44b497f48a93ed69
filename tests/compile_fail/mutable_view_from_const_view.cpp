// SPDX-License-Identifier: MIT
// Compile-fail: a read-only view does not convert back to a mutable one.
#include <seqmix/core/tensor.hpp>

int main() {
  seqmix::tensor<float, 2> t({2, 2}, 1.0f);
  const seqmix::tensor_view<const float, 2> c = t;
#ifdef SEQMIX_SHOULD_FAIL
  seqmix::tensor_view<float, 2> v = c;  // compile-fail: casts const away
#else
  seqmix::tensor_view<const float, 2> v = c;
#endif
  return static_cast<int>(v(1, 1));
}
