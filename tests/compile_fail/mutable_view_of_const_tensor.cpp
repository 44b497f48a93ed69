// SPDX-License-Identifier: MIT
// Compile-fail: a tensor_view<T> does not bind to a const tensor.
#include <seqmix/core/tensor.hpp>

int main() {
  const seqmix::tensor<float, 2> t({2, 2}, 1.0f);
#ifdef SEQMIX_SHOULD_FAIL
  seqmix::tensor_view<float, 2> v = t;  // compile-fail: mutable view of const data
#else
  seqmix::tensor_view<const float, 2> v = t;
#endif
  return static_cast<int>(v(1, 1));
}
