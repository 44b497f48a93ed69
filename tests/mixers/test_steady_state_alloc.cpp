// SPDX-License-Identifier: MIT
// Steady state allocates nothing (issue 11, item 5): the chunked forms and attention take their
// per-call scratch from the workspace arena (core/workspace.hpp), so a second identical call
// makes no heap allocation at all. Every entry tested here writes into caller-provided outputs
// (o / y / state views, a kv_cache), so the expected count is exactly 0, on 1 thread and on 2
// (both chunk schedules of the gated and delta engines: item ranges with at least as many
// (sequence, head) items as threads, windows with fewer). The first call may allocate (the arena
// and gemm's packing buffer grow to the shape's high-water mark; OpenMP starts its team).
#include <cstddef>
#include <functional>
#include <random>
#include <vector>

#include <seqmix/core/parallel.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/core/workspace.hpp>
#include <seqmix/mixers/delta_net.hpp>
#include <seqmix/mixers/gated_delta_net.hpp>
#include <seqmix/mixers/gla.hpp>
#include <seqmix/mixers/kda.hpp>
#include <seqmix/mixers/kv_cache.hpp>
#include <seqmix/mixers/mamba2_ssd.hpp>
#include <seqmix/mixers/rwkv7.hpp>
#include <seqmix/mixers/simple_gla.hpp>
#include <seqmix/mixers/sliding_window_attention.hpp>
#include <seqmix/mixers/softmax_attention.hpp>

#include "alloc_counter.hpp"
#include "testing.hpp"

using namespace seqmix;
using seqmix::testing::allocation_scope;

namespace {

template <std::size_t R>
tensor<float, R> randn(const shape_t<R>& shape, std::uint64_t salt, double sd = 1.0) {
  auto rng = seqmix::testing::make_rng(9100 + salt);
  return seqmix::testing::random_normal<float, R>(shape, rng, sd);
}
/// Log gates in [lo, hi] (<= 0).
template <std::size_t R>
tensor<float, R> log_gates(const shape_t<R>& shape, std::uint64_t salt, double lo = -0.2,
                           double hi = -0.001) {
  auto rng = seqmix::testing::make_rng(9200 + salt);
  return seqmix::testing::random_uniform<float, R>(shape, rng, lo, hi);
}

/// Allocations of the second of two identical calls (the first warms the arena up).
std::size_t second_call_allocations(const std::function<void()>& call) {
  call();
  allocation_scope scope;
  call();
  return scope.stats().count;
}

/// Runs `check(threads)` on 1 and 2 threads.
template <class Check>
void on_threads(Check&& check) {
  for (int threads : {1, 2}) {
    scoped_num_threads n(threads);
    INFO("threads " << threads);
    check(threads);
  }
}

// Shapes: (B, H) = (2, 2) gives 4 (sequence, head) items (item ranges on 2 threads), (1, 1)
// gives one item (windows on 2 threads). T = 200 with chunks of 64: three full chunks and a
// short one.
struct shape {
  index_t B, H;
};
constexpr shape shapes[] = {{2, 2}, {1, 1}};
constexpr index_t T = 200, K = 64, V = 64;

}  // namespace

TEST_CASE("steady state: GLA chunked (per-key and per-value gates) allocates nothing",
          "[alloc][steady_state][gla]") {
  for (const shape s : shapes) {
    auto q = randn<4>({s.B, T, s.H, K}, 1), k = randn<4>({s.B, T, s.H, K}, 2);
    auto v = randn<4>({s.B, T, s.H, V}, 3);
    auto gk = log_gates<4>({s.B, T, s.H, K}, 4), gv = log_gates<4>({s.B, T, s.H, V}, 5);
    tensor<float, 4> o({s.B, T, s.H, V}), st({s.B, s.H, K, V});
    const gla<float> m;
    on_threads([&](int) {
      INFO("B " << s.B << " H " << s.H);
      CHECK(second_call_allocations([&] { m.forward_chunked(q, k, v, gk, o, st); }) == 0);
      CHECK(second_call_allocations([&] { m.forward_chunked(q, k, v, gk, gv, o, st); }) == 0);
    });
  }
}

TEST_CASE("steady state: simple GLA chunked allocates nothing", "[alloc][steady_state][gla]") {
  for (const shape s : shapes) {
    auto q = randn<4>({s.B, T, s.H, K}, 11), k = randn<4>({s.B, T, s.H, K}, 12);
    auto v = randn<4>({s.B, T, s.H, V}, 13);
    auto g = log_gates<3>({s.B, T, s.H}, 14);
    tensor<float, 4> o({s.B, T, s.H, V}), st({s.B, s.H, K, V});
    const simple_gla<float> m;
    on_threads([&](int) {
      INFO("B " << s.B << " H " << s.H);
      CHECK(second_call_allocations([&] { m.forward_chunked(q, k, v, g, o, st); }) == 0);
    });
  }
}

TEST_CASE("steady state: Mamba2 SSD chunked allocates nothing", "[alloc][steady_state][mamba2]") {
  constexpr index_t P = 64, N = 64, G = 1;
  for (const shape s : shapes) {
    auto x = randn<4>({s.B, T, s.H, P}, 21);
    auto dt = randn<3>({s.B, T, s.H}, 22, 0.5);
    auto A_log = randn<1>({s.H}, 23, 0.3), D = randn<1>({s.H}, 24), dt_bias = randn<1>({s.H}, 25);
    auto Bm = randn<4>({s.B, T, G, N}, 26), Cm = randn<4>({s.B, T, G, N}, 27);
    tensor<float, 4> y({s.B, T, s.H, P}), st({s.B, s.H, N, P});
    const mamba2_ssd<float> m;
    on_threads([&](int) {
      INFO("B " << s.B << " H " << s.H);
      CHECK(second_call_allocations(
                [&] { m.forward_chunked(x, dt, A_log, Bm, Cm, D, dt_bias, y, st); }) == 0);
    });
  }
}

TEST_CASE("steady state: DeltaNet and Gated DeltaNet chunked allocate nothing",
          "[alloc][steady_state][delta]") {
  for (const shape s : shapes) {
    auto q = randn<4>({s.B, T, s.H, K}, 31), k = randn<4>({s.B, T, s.H, K}, 32);
    auto v = randn<4>({s.B, T, s.H, V}, 33);
    auto g = log_gates<3>({s.B, T, s.H}, 34);
    auto beta = log_gates<3>({s.B, T, s.H}, 35, 0.1, 0.9);  // in (0, 1)
    tensor<float, 4> o({s.B, T, s.H, V}), st({s.B, s.H, K, V});
    const delta_net<float> dn({.use_qk_l2norm = true});
    const gated_delta_net<float> gdn({.use_qk_l2norm = true});
    on_threads([&](int) {
      INFO("B " << s.B << " H " << s.H);
      CHECK(second_call_allocations([&] { dn.forward_chunked(q, k, v, beta, o, st); }) == 0);
      CHECK(second_call_allocations([&] { gdn.forward_chunked(q, k, v, g, beta, o, st); }) == 0);
    });
  }
}

TEST_CASE("steady state: KDA and RWKV-7 chunked allocate nothing", "[alloc][steady_state][dplr]") {
  for (const shape s : shapes) {
    auto q = randn<4>({s.B, T, s.H, K}, 41), k = randn<4>({s.B, T, s.H, K}, 42, 0.2);
    auto v = randn<4>({s.B, T, s.H, V}, 43);
    auto g = log_gates<4>({s.B, T, s.H, K}, 44);
    auto beta = log_gates<3>({s.B, T, s.H}, 45, 0.1, 0.9);
    auto a = randn<4>({s.B, T, s.H, K}, 46, 0.1), b = randn<4>({s.B, T, s.H, K}, 47, 0.1);
    tensor<float, 4> o({s.B, T, s.H, V}), st({s.B, s.H, K, V});
    const kda<float> m;
    const rwkv7<float> r;
    on_threads([&](int) {
      INFO("B " << s.B << " H " << s.H);
      CHECK(second_call_allocations([&] { m.forward_chunked(q, k, v, g, beta, o, st); }) == 0);
      CHECK(second_call_allocations([&] { r.forward_chunked(q, k, v, g, a, b, o, st); }) == 0);
    });
  }
}

TEST_CASE("steady state: causal softmax prefill allocates nothing",
          "[alloc][steady_state][attention]") {
  // H = 4 query heads over Hkv = 2: the [B, T, Hkv, D] rows are strided, so the prefill makes
  // head-major copies of k and v (workspace memory now); the cache variant appends to a full
  // cache and reads it in place; a 3-token prefill into the cache runs the split-KV row path.
  constexpr index_t B = 2, H = 4, Hkv = 2, D = 64;
  auto q = randn<4>({B, T, H, D}, 51), k = randn<4>({B, T, Hkv, D}, 52);
  auto v = randn<4>({B, T, Hkv, D}, 53);
  tensor<float, 4> o({B, T, H, D});
  const softmax_attention<float> m({.sink = std::vector<float>{0.f, 1.f, -1.f, 0.5f}});
  on_threads([&](int) {
    CHECK(second_call_allocations([&] { m.forward_chunked(q, k, v, o); }) == 0);
    auto cache = m.make_cache(B, Hkv, D, D, 2 * T + 8);
    CHECK(second_call_allocations([&] {
            cache.reset();
            m.forward_chunked(q, k, v, o, cache);
          }) == 0);
    const index_t cu_data[] = {0, 70, 130, T};
    const std::span<const index_t> cu(cu_data);
    auto q1 = randn<4>({1, T, H, D}, 54), k1 = randn<4>({1, T, Hkv, D}, 55);
    auto v1 = randn<4>({1, T, Hkv, D}, 56);
    tensor<float, 4> o1({1, T, H, D});
    CHECK(second_call_allocations([&] { m.forward_chunked(q1, k1, v1, o1, cu); }) == 0);
    // a short prefill (3 tokens per sequence) after T cached ones: the row path
    auto qs = randn<4>({B, 3, H, D}, 57), ks = randn<4>({B, 3, Hkv, D}, 58);
    auto vs = randn<4>({B, 3, Hkv, D}, 59);
    tensor<float, 4> os({B, 3, H, D});
    CHECK(second_call_allocations([&] {
            cache.reset();
            m.forward_chunked(q, k, v, o, cache);
            m.forward_chunked(qs, ks, vs, os, cache);
          }) == 0);
  });
}

TEST_CASE("steady state: sliding window prefill allocates nothing",
          "[alloc][steady_state][attention]") {
  constexpr index_t B = 2, H = 4, Hkv = 2, D = 64, W = 48;
  auto q = randn<4>({B, T, H, D}, 61), k = randn<4>({B, T, Hkv, D}, 62);
  auto v = randn<4>({B, T, Hkv, D}, 63);
  tensor<float, 4> o({B, T, H, D});
  const sliding_window_attention<float> m({.window = W});
  on_threads([&](int) {
    CHECK(second_call_allocations([&] { m.forward_chunked(q, k, v, o); }) == 0);
    // ring cache of W rows: the second prefill gathers the ring's last W - 1 rows
    auto cache = m.make_cache(B, Hkv, D, D);
    REQUIRE(cache.is_ring());
    CHECK(second_call_allocations([&] {
            cache.reset();
            m.forward_chunked(q, k, v, o, cache);
            m.forward_chunked(q, k, v, o, cache);
          }) == 0);
  });
}

TEST_CASE("steady state: softmax decode over a kv_cache allocates nothing",
          "[alloc][steady_state][attention]") {
  constexpr index_t B = 2, H = 4, Hkv = 2, D = 64, steps = 40;
  auto q = randn<4>({B, T, H, D}, 71), k = randn<4>({B, T, Hkv, D}, 72);
  auto v = randn<4>({B, T, Hkv, D}, 73);
  tensor<float, 4> o({B, T, H, D});
  const softmax_attention<float> m;
  on_threads([&](int) {
    auto cache = m.make_cache(B, Hkv, D, D, T + steps);
    m.forward_chunked(q, k, v, o, cache);  // prefill (warms the arena up)
    auto q1 = randn<3>({B, H, D}, 74), k1 = randn<3>({B, Hkv, D}, 75),
         v1 = randn<3>({B, Hkv, D}, 76);
    tensor<float, 3> o1({B, H, D});
    m.step(q1, k1, v1, o1, cache);
    allocation_scope scope;
    for (index_t t = 1; t < steps; ++t) m.step(q1, k1, v1, o1, cache);
    CHECK(scope.stats().count == 0);
  });
}

TEST_CASE("steady state: the workspace is back to empty after every call",
          "[alloc][steady_state]") {
  // nothing stays taken past a call (frames are scoped), and the arena is one block
  auto q = randn<4>({1, T, 2, K}, 81), k = randn<4>({1, T, 2, K}, 82);
  auto v = randn<4>({1, T, 2, V}, 83);
  auto gk = log_gates<4>({1, T, 2, K}, 84);
  tensor<float, 4> o({1, T, 2, V}), st({1, 2, K, V});
  const gla<float> m;
  m.forward_chunked(q, k, v, gk, o, st);
  const softmax_attention<float> a;
  a.forward_chunked(q, k, v, o);
  CHECK(thread_workspace().used() == 0);
  CHECK(thread_workspace().block_count() == 1);
}
