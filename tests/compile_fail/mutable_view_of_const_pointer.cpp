// SPDX-License-Identifier: MIT
// Compile-fail: a tensor_view<T> over external memory needs a pointer to non-const T.
#include <seqmix/core/tensor.hpp>

int main() {
  static const float data[4] = {1.0f, 2.0f, 3.0f, 4.0f};
  const float* p = data;
#ifdef SEQMIX_SHOULD_FAIL
  seqmix::tensor_view<float, 1> v(p, {4});  // compile-fail: mutable view of const memory
#else
  seqmix::tensor_view<const float, 1> v(p, {4});
#endif
  return static_cast<int>(v(3));
}
