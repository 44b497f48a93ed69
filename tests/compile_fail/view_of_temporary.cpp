// SPDX-License-Identifier: MIT
// Compile-fail: a view of a temporary tensor would dangle: the view operations are deleted on
// rvalue tensors.
#include <seqmix/core/tensor.hpp>

namespace {
seqmix::tensor<float, 2> make() {
  return seqmix::tensor<float, 2>({2, 2}, 1.0f);
}
}  // namespace

int main() {
#ifdef SEQMIX_SHOULD_FAIL
  auto v = make().slice<0>(0, 1);  // compile-fail: slice of a temporary
  return static_cast<int>(v(0, 0));
#else
  auto t = make();
  auto v = t.slice<0>(0, 1);
  return static_cast<int>(v(0, 0));
#endif
}
