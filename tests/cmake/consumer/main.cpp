// A consumer of the seqmix package: includes the umbrella header and uses the core API.
#include <cstdio>

#include <seqmix/seqmix.hpp>

int main() {
  seqmix::tensor<float, 2> a({3, 5});
  for (seqmix::index_t i = 0; i < a.size(); ++i) a[i] = static_cast<float>(i);
  const float d = seqmix::simd::dot(a.data(), a.data(), a.size());
  std::printf("seqmix %s consumer: dot = %g (arch %s, %d threads)\n", seqmix::version_string,
              static_cast<double>(d), seqmix::simd::arch_name(), seqmix::num_threads());
  return d == 1015.0f ? 0 : 1;
}
