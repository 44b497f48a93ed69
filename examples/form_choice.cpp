// SPDX-License-Identifier: MIT
// Which form forward() runs, measured on this machine.
//
// The chunked and the recurrent form of a gated mixer compute the same thing, both in O(T); which
// one is faster depends on the machine, the head size and how many (sequence, head) pairs each
// thread gets. forward() runs the recurrent form unless options::switch_over_t says otherwise,
// and seqmix::measure_switch_over finds that value by timing both forms here. The measurement is
// explicit (never run behind your back), so forward()'s results depend only on its options.
#include <cmath>
#include <cstdio>
#include <limits>

#include <seqmix/mixers/simple_gla.hpp>
#include <seqmix/tune.hpp>

int main() {
  using namespace seqmix;
  const index_t B = 1, H = 4, K = 64, V = 64, T = 2048;

  // 1. Measure: tokens/s of both forms at a few lengths, for this head shape and thread count
  //    (small lengths keep this example fast; use the defaults, up to T = 16384, for real use).
  const index_t lengths[] = {256, 1024, T};
  const form_timings timings = measure_forms<float>(gate_kind::scalar, H, K, V, 64, lengths, 2);
  for (std::size_t i = 0; i < timings.lengths.size(); ++i) {
    const double n = double(timings.lengths[i]);
    std::printf("T = %5ld: chunked %6.0fk tokens/s, recurrent %6.0fk tokens/s\n",
                static_cast<long>(timings.lengths[i]), n / timings.chunked[i] / 1e3,
                n / timings.recurrent[i] / 1e3);
  }
  const index_t switch_over = timings.switch_over();
  if (switch_over == std::numeric_limits<index_t>::max()) {
    std::printf("forward() should stay recurrent on this machine for this shape\n");
  } else {
    std::printf("forward() should run the chunked form from T = %ld\n",
                static_cast<long>(switch_over));
  }

  // 2. Configure: the mixer's forward() now takes the measured faster form.
  simple_gla<float>::options opt;
  opt.switch_over_t = switch_over;
  const simple_gla<float> mixer(opt);

  tensor<float, 4> q({B, T, H, K}), k({B, T, H, K}), v({B, T, H, V}), o({B, T, H, V});
  tensor<float, 3> g({B, T, H});
  for (index_t i = 0; i < q.size(); ++i) {
    q[i] = std::sin(0.01f * float(i));
    k[i] = std::cos(0.013f * float(i));
  }
  for (index_t i = 0; i < v.size(); ++i) v[i] = std::sin(0.007f * float(i));
  for (index_t i = 0; i < g.size(); ++i) g[i] = -0.05f;
  auto state = mixer.make_state(B, H, K, V);
  mixer.forward(q, k, v, g, o, state);

  // 3. Either form gives the same numbers up to float rounding.
  tensor<float, 4> o_other({B, T, H, V});
  auto state_other = mixer.make_state(B, H, K, V);
  if (T >= switch_over) {
    mixer.forward_recurrent(q, k, v, g, o_other, state_other);
  } else {
    mixer.forward_chunked(q, k, v, g, o_other, state_other);
  }
  double err = 0, ref = 0;
  for (index_t i = 0; i < o.size(); ++i) {
    err += double(o[i] - o_other[i]) * double(o[i] - o_other[i]);
    ref += double(o[i]) * double(o[i]);
  }
  const double rel = std::sqrt(err / ref);
  std::printf("forward() vs the other form: relative RMS difference %.2e\n", rel);
  return rel < 1e-5 ? 0 : 1;
}
