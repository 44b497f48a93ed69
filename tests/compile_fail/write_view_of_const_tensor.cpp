// SPDX-License-Identifier: MIT
// Compile-fail: view operations of a const tensor (slice, split, permute, ...) are read-only.
#include <seqmix/core/tensor.hpp>

int main() {
  seqmix::tensor<float, 2> t({2, 4});
  const seqmix::tensor<float, 2>& ct = t;
  auto heads = ct.slice<1>(0, 4).split(1, {2, 2}).permute({1, 0, 2});
#ifdef SEQMIX_SHOULD_FAIL
  heads(1, 0, 1) = 1.0f;  // compile-fail: the view of a const tensor is tensor_view<const float>
#else
  t(0, 3) = heads(1, 0, 1) + 1.0f;
#endif
  return static_cast<int>(t(0, 3));
}
