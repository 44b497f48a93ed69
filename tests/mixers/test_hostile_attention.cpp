// SPDX-License-Identifier: MIT
// Hostile input to softmax_attention and sliding_window_attention: bad shapes per argument and
// per entry (with and without a cache, packed, step), bad options, aliased outputs (o over q,
// k, v or the cache) and inputs inside the cache; every case asserts the function the user
// called (forward stays forward, sliding_window_attention stays itself), the argument and the
// numbers.
#include <string>
#include <vector>

#include <seqmix/mixers/sliding_window_attention.hpp>
#include <seqmix/mixers/softmax_attention.hpp>

#include "hostile_common.hpp"

using namespace hostile;
using seqmix::kv_cache;
using seqmix::sliding_window_attention;
using seqmix::softmax_attention;

namespace {

constexpr index_t B = 2, T = 5, H = 4, Hkv = 2, K = 8, V = 12, W = 3;

struct inputs {
  tensor<float, 4> q = randn<4>({B, T, H, K}, 1), k = randn<4>({B, T, Hkv, K}, 2),
                   v = randn<4>({B, T, Hkv, V}, 3), o{{B, T, H, V}};
  tensor<float, 4> q1t = randn<4>({B, 1, H, K}, 4), k1t = randn<4>({B, 1, Hkv, K}, 5),
                   v1t = randn<4>({B, 1, Hkv, V}, 6), o1t{{B, 1, H, V}};
  tensor<float, 3> q1 = randn<3>({B, H, K}, 7), k1 = randn<3>({B, Hkv, K}, 8),
                   v1 = randn<3>({B, Hkv, V}, 9), o1{{B, H, V}};
};

/// Sequence entries of either mixer: 0 forward_chunked, 1 forward_recurrent, 2 forward, each
/// without a cache; 3, 4, 5 the same with `cache`.
template <class M>
void call(const M& m, int e, tensor_view<const float, 4> q, tensor_view<const float, 4> k,
          tensor_view<const float, 4> v, tensor_view<float, 4> o, kv_cache<float>& cache) {
  switch (e) {
    case 0:
      m.forward_chunked(q, k, v, o);
      break;
    case 1:
      m.forward_recurrent(q, k, v, o);
      break;
    case 2:
      m.forward(q, k, v, o);
      break;
    case 3:
      m.forward_chunked(q, k, v, o, cache);
      break;
    case 4:
      m.forward_recurrent(q, k, v, o, cache);
      break;
    default:
      m.forward(q, k, v, o, cache);
      break;
  }
}
const char* const entry_names[] = {"forward_chunked", "forward_recurrent", "forward",
                                   "forward_chunked", "forward_recurrent", "forward"};

template <class M>
void sequence_entries(const M& m, const char* mixer) {
  for (int e = 0; e < 6; ++e) {
    for (index_t TT : {T, index_t(1)}) {  // T = 1 with a cache decodes inside forward()
      inputs a;
      const std::string w = std::string("seqmix::") + mixer + "::" + entry_names[e] + ": ";
      INFO(w << " T = " << TT);
      auto cache = kv_cache<float>::full(B, Hkv, K, V, 64);
      tensor_view<const float, 4> q = TT == 1 ? a.q1t : a.q, k = TT == 1 ? a.k1t : a.k,
                                  v = TT == 1 ? a.v1t : a.v;
      tensor_view<float, 4> o = TT == 1 ? a.o1t : a.o;
      REQUIRE_NOTHROW(call(m, e, q, k, v, o, cache));
      tensor<float, 4> k9({B, TT, Hkv, 9}), v11({B, TT, 3, V}), o13({B, TT, H, 13}),
          k3({B, TT, 3, K}), qs({B, TT + 1, H, K});
      REQUIRE_SHAPE_ERROR(call(m, e, q, k9, v, o, cache), w, "argument 'k'",
                          "expected shape [2, " + std::to_string(TT) + ", any, 8]",
                          "got [2, " + std::to_string(TT) + ", 2, 9]");
      REQUIRE_SHAPE_ERROR(call(m, e, q, k3, v, o, cache), w, "argument 'k'",
                          "query heads (4) must be a multiple of key/value heads (3)");
      REQUIRE_SHAPE_ERROR(call(m, e, q, k, v11, o, cache), w, "argument 'v'",
                          "expected shape [2, " + std::to_string(TT) + ", 2, any]");
      REQUIRE_SHAPE_ERROR(call(m, e, q, k, v, o13, cache), w, "argument 'o'",
                          "expected shape [2, " + std::to_string(TT) + ", 4, 12]",
                          "got [2, " + std::to_string(TT) + ", 4, 13]");
      REQUIRE_SHAPE_ERROR(call(m, e, qs, k, v, o, cache), w, "argument 'k'",
                          "expected shape [2, " + std::to_string(TT + 1) + ", any, 8]");
      // o over q, o over v
      REQUIRE_SHAPE_ERROR(
          call(m, e, q, k, v, tensor_view<float, 4>(const_cast<float*>(q.data()), o.shape()),
               cache),
          w, "argument 'o'", "must not share memory with argument 'q'");
      tensor<float, 4> pool({B, TT, H, V});
      tensor_view<const float, 4> v_in_o(pool.data(), v.shape());
      REQUIRE_SHAPE_ERROR(call(m, e, q, k, v_in_o, pool, cache), w, "argument 'o'",
                          "must not share memory with argument 'v'");
      if (e >= 3) {
        // the cache is written: inputs in it and o over it are rejected
        auto other = kv_cache<float>::full(B, Hkv, K, V, 64);
        tensor_view<const float, 4> k_in_cache(other.key_row(0, 0, 0), k.shape());
        REQUIRE_SHAPE_ERROR(call(m, e, q, k_in_cache, v, o, other), w, "argument 'cache'",
                            "must not share memory with argument 'k'");
        tensor_view<float, 4> o_in_cache(other.value_row(1, 0, 0), o.shape());
        REQUIRE_SHAPE_ERROR(call(m, e, q, k, v, o_in_cache, other), w, "argument 'o'",
                            "must not share memory with argument 'cache'");
        auto wrong = kv_cache<float>::full(B, 1, K, V, 64);
        REQUIRE_SHAPE_ERROR(call(m, e, q, k, v, o, wrong), w, "argument 'cache'",
                            "expected [sequences, kv heads, K, V] = [2, 2, 8, 12]",
                            "got [2, 1, 8, 12]");
      }
    }
  }
}

template <class M>
void step_entry(const M& m, const char* mixer, kv_cache<float> cache) {
  inputs a;
  const std::string w = std::string("seqmix::") + mixer + "::step: ";
  REQUIRE_NOTHROW(m.step(a.q1, a.k1, a.v1, a.o1, cache));
  tensor<float, 3> k9({B, Hkv, 9}), v13({B, Hkv, 13}), o13({B, H, 13}), k3({B, 3, K});
  REQUIRE_SHAPE_ERROR(m.step(a.q1, k9, a.v1, a.o1, cache), w, "argument 'k1'",
                      "expected shape [2, any, 8]", "got [2, 2, 9]");
  REQUIRE_SHAPE_ERROR(m.step(a.q1, k3, a.v1, a.o1, cache), w, "argument 'k1'",
                      "query heads (4) must be a multiple of key/value heads (3)");
  REQUIRE_SHAPE_ERROR(m.step(a.q1, a.k1, a.v1, o13, cache), w, "argument 'o1'",
                      "expected shape [2, 4, 12]", "got [2, 4, 13]");
  // o1 = q1 (the reported case) and inputs read from the cache that is written
  REQUIRE_SHAPE_ERROR(
      m.step(a.q1, a.k1, a.v1, tensor_view<float, 3>(a.q1.data(), {B, H, V}), cache), w,
      "argument 'o1'", "must not share memory with argument 'q1'");
  REQUIRE_SHAPE_ERROR(m.step(a.q1, tensor_view<const float, 3>(cache.key_row(0, 1, 0), {B, Hkv, K}),
                             a.v1, a.o1, cache),
                      w, "argument 'cache'", "argument 'k1'");
  REQUIRE_SHAPE_ERROR(
      m.step(a.q1, a.k1, a.v1, tensor_view<float, 3>(cache.value_row(0, 0, 1), {B, H, V}), cache),
      w, "argument 'o1'", "argument 'cache'");
}

}  // namespace

TEST_CASE("hostile softmax_attention: every entry names itself and its arguments",
          "[hostile][softmax_attention]") {
  const softmax_attention<float> m;
  sequence_entries(m, "softmax_attention");
  step_entry(m, "softmax_attention", kv_cache<float>::full(B, Hkv, K, V, 16));
  REQUIRE_SHAPE_ERROR(m.make_cache(B, -1, K, V, 16),
                      "seqmix::softmax_attention::make_cache: ", "argument 'Hkv'",
                      "must be >= 1, got -1");
  REQUIRE_SHAPE_ERROR(m.make_cache(B, Hkv, K, V, 0),
                      "seqmix::softmax_attention::make_cache: ", "argument 'capacity'", "got 0");
  // packed sequences
  inputs a;
  const std::vector<index_t> cu{0, 3, 4};
  tensor_view<const float, 4> q = a.q.view().slice<0>(0, 1), k = a.k.view().slice<0>(0, 1),
                              v = a.v.view().slice<0>(0, 1);
  tensor_view<float, 4> o = a.o.view().slice<0>(0, 1);
  REQUIRE_SHAPE_ERROR(m.forward_chunked(q, k, v, o, cu),
                      "seqmix::softmax_attention::forward_chunked: ", "argument 'cu_seqlens'",
                      "last offset must be T = 5, got 4");
  auto cache = kv_cache<float>::full(2, Hkv, K, V, 8);
  const std::vector<index_t> cu_ok{0, 3, 5};
  REQUIRE_SHAPE_ERROR(
      m.forward_chunked(q, k, v, tensor_view<float, 4>(const_cast<float*>(v.data()), o.shape()),
                        cache, cu_ok),
      "seqmix::softmax_attention::forward_chunked: ", "argument 'o'",
      "must not share memory with argument 'v'");
  REQUIRE_NOTHROW(m.forward_chunked(q, k, v, o, cache, cu_ok));
}

TEST_CASE("hostile softmax_attention: options", "[hostile][softmax_attention]") {
  using O = softmax_attention<float>::options;
  const O w0{.window = 0}, c0{.chunk_size = -1}, sn{.scale = fnan},
      sink{.sink = {0.f, -finf, fnan, 1.f}}, sinkp{.sink = {0.f, finf}};
  REQUIRE_SHAPE_ERROR(softmax_attention<float>(w0),
                      "seqmix::softmax_attention: ", "argument 'options.window'", "got 0");
  REQUIRE_SHAPE_ERROR(softmax_attention<float>(c0), "argument 'options.chunk_size'", "got -1");
  REQUIRE_SHAPE_ERROR(softmax_attention<float>(sn), "argument 'options.scale'", "NaN");
  REQUIRE_SHAPE_ERROR(softmax_attention<float>(sink), "argument 'options.sink'", "got NaN at [2]");
  REQUIRE_SHAPE_ERROR(softmax_attention<float>(sinkp), "argument 'options.sink'",
                      "got +inf at [1]");
  const O sink3{.sink = {0.f, 0.f, 0.f}};
  const softmax_attention<float> m3(sink3);
  inputs a;
  REQUIRE_SHAPE_ERROR(m3.forward(a.q, a.k, a.v, a.o),
                      "seqmix::softmax_attention::forward: ", "argument 'options.sink'",
                      "one logit per query head (4), got 3");
}

TEST_CASE("hostile sliding_window_attention: messages name sliding_window_attention",
          "[hostile][sliding_window_attention]") {
  using O = sliding_window_attention<float>::options;
  const sliding_window_attention<float> m(O{.window = W});
  sequence_entries(m, "sliding_window_attention");
  step_entry(m, "sliding_window_attention", m.make_cache(B, Hkv, K, V));
  step_entry(m, "sliding_window_attention", kv_cache<float>::full(B, Hkv, K, V, 16));
  REQUIRE_SHAPE_ERROR(m.make_cache(0, Hkv, K, V),
                      "seqmix::sliding_window_attention::make_cache: ", "argument 'B'", "got 0");
  const O w0{.window = 0}, sn{.window = 2, .scale = finf}, c0{.window = 2, .chunk_size = 0};
  REQUIRE_SHAPE_ERROR(sliding_window_attention<float>(w0),
                      "seqmix::sliding_window_attention: ", "argument 'options.window'", "got 0");
  REQUIRE_SHAPE_ERROR(sliding_window_attention<float>(sn),
                      "seqmix::sliding_window_attention: ", "argument 'options.scale'", "+inf");
  REQUIRE_SHAPE_ERROR(sliding_window_attention<float>(c0),
                      "seqmix::sliding_window_attention: ", "argument 'options.chunk_size'",
                      "got 0");
  // prefill into a ring with o = v (the reported case)
  inputs a;
  auto ring = m.make_cache(B, Hkv, K, V);
  tensor<float, 4> vo = randn<4>({B, T, H, V}, 30);
  tensor_view<const float, 4> v_in(vo.data(), {B, T, Hkv, V});
  REQUIRE_SHAPE_ERROR(m.forward_chunked(a.q, a.k, v_in, vo, ring),
                      "seqmix::sliding_window_attention::forward_chunked: ", "argument 'o'",
                      "must not share memory with argument 'v'");
  REQUIRE(ring.length(0) == 0);  // nothing was written before the error
  auto small = kv_cache<float>::ring(B, Hkv, K, V, W - 1);
  REQUIRE_SHAPE_ERROR(m.step(a.q1, a.k1, a.v1, a.o1, small),
                      "seqmix::sliding_window_attention::step: ", "argument 'cache'",
                      "a ring cache of 2 rows", "(W = 3)");
}

TEST_CASE("hostile attention: a self-overlapping output is rejected",
          "[hostile][softmax_attention]") {
  inputs a;
  const softmax_attention<float> m;
  tensor<float, 3> one_head({B, T, V});
  tensor_view<float, 4> o_bcast(one_head.data(), {B, T, H, V}, {T * V, V, 0, 1});
  REQUIRE_SHAPE_ERROR(m.forward(a.q, a.k, a.v, o_bcast),
                      "seqmix::softmax_attention::forward: ", "argument 'o'",
                      "got strides [60, 12, 0, 1]");
  auto cache = m.make_cache(B, Hkv, K, V, 8);
  tensor<float, 2> rows({B, V});
  REQUIRE_SHAPE_ERROR(
      m.step(a.q1, a.k1, a.v1, tensor_view<float, 3>(rows.data(), {B, H, V}, {V, 0, 1}), cache),
      "seqmix::softmax_attention::step: ", "argument 'o1'", "got strides [12, 0, 1]");
}
