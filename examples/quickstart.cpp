// SPDX-License-Identifier: MIT
// The smallest seqmix program: tensors, views, the thread setting and the SIMD vocabulary.
// Mixer examples (prefill with forward_chunked, decode with step) sit beside this file.
#include <cstdio>

#include <seqmix/seqmix.hpp>

int main() {
  using namespace seqmix;
  const index_t B = 1, T = 4, H = 2, K = 8;
  tensor<float, 4> q({B, T, H, K});  // [B, T, H, K], zeros, 64-byte aligned
  for (index_t i = 0; i < q.size(); ++i) q[i] = 0.1f * static_cast<float>(i % 7);

  // q_bh: [T, K] view of q[0, :, 1, :]; no copy, strides kept.
  tensor_view<const float, 2> q_bh = tensor_view<const float, 4>(q).select<0>(0).select<1>(1);
  const float norm2 = simd::dot(q_bh.data(), q_bh.data(), K);  // first row, SIMD with tail
  std::printf("seqmix %s on %s, %d threads: |q[0,0,1,:]|^2 = %.4f\n", version_string,
              simd::arch_name(), num_threads(), static_cast<double>(norm2));

  // Every public entry checks its arguments and says what it expected.
  try {
    checker{"quickstart"}.shape("q", q.view(), {B, T, H, 16});
  } catch (const shape_error& e) {
    std::printf("caught: %s\n", e.what());
    return 0;
  }
  return 1;
}
