// SPDX-License-Identifier: MIT
// Shared by test_kda.cpp and test_rwkv7.cpp: random problems, one call helper over both mixers
// and every form (reference in double included), and the equivalence checks of the family.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include <catch2/catch.hpp>

#include <seqmix/mixers/kda.hpp>
#include <seqmix/mixers/rwkv7.hpp>
#include <seqmix/reference/delta_rule.hpp>

#include "alloc_counter.hpp"
#include "golden.hpp"
#include "testing.hpp"

namespace dplr_test {

using namespace seqmix;
using kernels::delta_rule::dplr::kind;
using seqmix::index_t;

struct dims {
  index_t B, T, H, HV, K, V;
};

/// Inputs of both mixers: q is r for rwkv7, g is w; beta (kda) or a, b (rwkv7) unused by the other.
template <class T>
struct inputs {
  tensor<T, 4> q, k, v, g, a, b;
  tensor<T, 3> beta;
  tensor<T, 4> h0;
};

template <class To, class From>
inputs<To> cast(const inputs<From>& in) {
  using testing::cast;
  return {cast<To>(in.q), cast<To>(in.k), cast<To>(in.v),    cast<To>(in.g),
          cast<To>(in.a), cast<To>(in.b), cast<To>(in.beta), cast<To>(in.h0)};
}

inline void normalise_rows(tensor<double, 4>& x, double norm) {
  const index_t K = x.extent(3);
  for (index_t b = 0; b < x.extent(0); ++b)
    for (index_t t = 0; t < x.extent(1); ++t)
      for (index_t h = 0; h < x.extent(2); ++h) {
        double ss = 0;
        for (index_t i = 0; i < K; ++i) ss += x(b, t, h, i) * x(b, t, h, i);
        const double r = norm / std::sqrt(std::max(ss, 1e-300));
        for (index_t i = 0; i < K; ++i) x(b, t, h, i) *= r;
      }
}

/// Random inputs. kda: unit keys (unless raw for l2norm), g = mult · logsigmoid(N(0,1)) per key,
/// beta in [0, 1]. rwkv7 (H == HV): as the golden data, w = mult · (-e^-1/2 sigmoid(N)),
/// a = -kk, b = kk ⊙ sigmoid(N) with kk unit rows, k scaled by 1/2 to keep the state O(1).
template <kind Kd>
inputs<double> random_inputs(const dims& d, std::uint64_t salt, double gate_mult = 1.0,
                             bool raw_keys = false) {
  auto rng = testing::make_rng(salt);
  inputs<double> in;
  in.q = testing::random_normal<double, 4>({d.B, d.T, d.H, d.K}, rng);
  in.k = testing::random_normal<double, 4>({d.B, d.T, d.H, d.K}, rng);
  in.v = testing::random_normal<double, 4>({d.B, d.T, d.HV, d.V}, rng);
  in.g = testing::random_normal<double, 4>({d.B, d.T, d.HV, d.K}, rng);
  in.h0 = testing::random_normal<double, 4>({d.B, d.HV, d.K, d.V}, rng, 0.5);
  if constexpr (Kd == kind::kda) {
    in.g.view().for_each([&](double& x) { x = gate_mult * math::logsigmoid(x); });
    in.beta = testing::random_uniform<double, 3>({d.B, d.T, d.HV}, rng, 0.0, 1.0);
    if (!raw_keys) normalise_rows(in.k, 1.0);
  } else {
    in.g.view().for_each([&](double& x) { x = gate_mult * reference::rwkv7_gate(x); });
    auto kk = testing::random_normal<double, 4>({d.B, d.T, d.H, d.K}, rng);
    normalise_rows(kk, 1.0);
    auto iclr = testing::random_normal<double, 4>({d.B, d.T, d.H, d.K}, rng);
    in.a = tensor<double, 4>(kk.shape());
    in.b = tensor<double, 4>(kk.shape());
    for (index_t i = 0; i < kk.size(); ++i) {
      in.a.data()[i] = -kk.data()[i];
      in.b.data()[i] = kk.data()[i] * math::sigmoid(iclr.data()[i]);
    }
    in.k.view().for_each([](double& x) { x *= 0.5; });
  }
  return in;
}

/// Values of the random problems are O(1); references far below that are compared against a
/// floor of 0.1 per element (as the delta tests do).
inline constexpr double scale_floor = 0.1;

template <class A, class B, std::size_t R>
void check_near(const tensor<A, R>& ref, const tensor<B, R>& out, double tol, const char* what) {
  const auto c = testing::compare(ref, out);
  double ref_ss = 0;
  ref.view().for_each([&](A x) { ref_ss += double(x) * double(x); });
  const double ref_rms = std::sqrt(ref_ss / double(std::max<index_t>(1, ref.size())));
  const double err_rms = c.rel_rms * (ref_rms > 0 ? ref_rms : 1.0);
  INFO(what << ": " << c.report << " (reference RMS " << ref_rms << ")");
  CHECK(c.nonfinite == 0);
  CHECK(err_rms <= tol * std::max(ref_rms, scale_floor));
}

enum class form { chunked, recurrent, automatic, reference };

template <kind Kd, class T>
using mixer_t = std::conditional_t<Kd == kind::kda, seqmix::kda<T>, seqmix::rwkv7<T>>;

template <kind Kd, class T>
typename mixer_t<Kd, T>::options make_options(bool l2norm = false, index_t chunk = 64) {
  typename mixer_t<Kd, T>::options o;
  if constexpr (Kd == kind::kda) o.use_qk_l2norm = l2norm;
  o.chunk_size = chunk;
  return o;
}

template <kind Kd, class T>
mixer_t<Kd, T> make_mixer(bool l2norm = false, index_t chunk = 64) {
  return mixer_t<Kd, T>(make_options<Kd, T>(l2norm, chunk));
}

/// Runs one form on `in` (state from `state`, updated in place); returns o.
template <kind Kd, class T>
tensor<T, 4> run(form f, const mixer_t<Kd, T>& m, const inputs<T>& in, tensor<T, 4>& state,
                 std::span<const index_t> cu = {}) {
  tensor<T, 4> o({in.v.extent(0), in.v.extent(1), in.v.extent(2), in.v.extent(3)});
  if (f == form::reference) {
    REQUIRE(cu.empty());
    if constexpr (Kd == kind::kda) {
      reference::kda<T>(in.q, in.k, in.v, in.g, in.beta, o, state, m.scale_for(in.q.extent(3)),
                        m.config().use_qk_l2norm);
    } else {
      reference::rwkv7<T>(in.q, in.k, in.v, in.g, in.a, in.b, o, state,
                          m.scale_for(in.q.extent(3)));
    }
    return o;
  }
  if constexpr (Kd == kind::kda) {
    if (f == form::chunked) m.forward_chunked(in.q, in.k, in.v, in.g, in.beta, o, state, cu);
    if (f == form::recurrent) m.forward_recurrent(in.q, in.k, in.v, in.g, in.beta, o, state, cu);
    if (f == form::automatic) m.forward(in.q, in.k, in.v, in.g, in.beta, o, state, cu);
  } else {
    if (f == form::chunked) m.forward_chunked(in.q, in.k, in.v, in.g, in.a, in.b, o, state, cu);
    if (f == form::recurrent) m.forward_recurrent(in.q, in.k, in.v, in.g, in.a, in.b, o, state, cu);
    if (f == form::automatic) m.forward(in.q, in.k, in.v, in.g, in.a, in.b, o, state, cu);
  }
  return o;
}

/// One step (token t of every sequence).
template <kind Kd, class T>
void step(const mixer_t<Kd, T>& m, const inputs<T>& in, index_t t, tensor_view<T, 3> o,
          tensor<T, 4>& state) {
  tensor_view<const T, 4> q = in.q, k = in.k, v = in.v, g = in.g;
  if constexpr (Kd == kind::kda) {
    tensor_view<const T, 3> beta = in.beta;
    m.step(q.template select<1>(t), k.template select<1>(t), v.template select<1>(t),
           g.template select<1>(t), beta.template select<1>(t), o, state);
  } else {
    tensor_view<const T, 4> a = in.a, b = in.b;
    m.step(q.template select<1>(t), k.template select<1>(t), v.template select<1>(t),
           g.template select<1>(t), a.template select<1>(t), b.template select<1>(t), o, state);
  }
}

template <class T, std::size_t R>
tensor<T, R> slice_of(const tensor<T, R>& x, std::size_t dim, index_t b, index_t e) {
  if (x.empty()) return x;
  return tensor<T, R>::copy_of(tensor_view<const T, R>(x).slice(dim, b, e));
}

/// Tokens [t0, t1) of every input (h0 kept).
template <class T>
inputs<T> slice_time(const inputs<T>& in, index_t t0, index_t t1) {
  return {slice_of(in.q, 1, t0, t1),    slice_of(in.k, 1, t0, t1),
          slice_of(in.v, 1, t0, t1),    slice_of(in.g, 1, t0, t1),
          slice_of(in.a, 1, t0, t1),    slice_of(in.b, 1, t0, t1),
          slice_of(in.beta, 1, t0, t1), in.h0};
}

/// Reference (double) vs recurrent and chunked (float, every chunk size), o and final state.
template <kind Kd>
void check_forms(const dims& d, std::initializer_list<index_t> chunks, double tol,
                 std::uint64_t salt, double gate_mult = 1.0, bool l2norm = false) {
  const auto in = random_inputs<Kd>(d, salt, gate_mult, l2norm);
  tensor<double, 4> st_ref = in.h0;
  const auto o_ref = run<Kd, double>(form::reference, make_mixer<Kd, double>(l2norm), in, st_ref);
  const auto inf = cast<float>(in);
  INFO("B " << d.B << " T " << d.T << " H " << d.H << " HV " << d.HV << " K " << d.K << " V " << d.V
            << " gate x" << gate_mult << " l2norm " << l2norm);
  {
    tensor<float, 4> st = inf.h0;
    const auto o = run<Kd, float>(form::recurrent, make_mixer<Kd, float>(l2norm), inf, st);
    INFO("recurrent");
    check_near(o_ref, o, tol, "o");
    check_near(st_ref, st, tol, "state");
  }
  for (index_t c : chunks) {
    tensor<float, 4> st = inf.h0;
    const auto o = run<Kd, float>(form::chunked, make_mixer<Kd, float>(l2norm, c), inf, st);
    INFO("chunked, chunk " << c);
    check_near(o_ref, o, tol, "o");
    check_near(st_ref, st, tol, "state");
  }
}

/// -1e4 or -inf gates at chosen (token, head, key) places: no inf/NaN, forms agree.
template <kind Kd>
void check_strong_gates(double strong, double tol, std::uint64_t salt) {
  const dims d{1, 150, 2, 2, 24, 20};
  auto in = random_inputs<Kd>(d, salt);
  for (index_t t : {0, 5, 15, 16, 63, 64, 100, 149})
    for (index_t i = 0; i < d.K; i += (t % 3) + 1) in.g(0, t, 0, i) = strong;
  for (index_t i = 0; i < d.K; ++i) in.g(0, 40, 1, i) = strong;  // a full reset of head 1
  tensor<double, 4> st_ref = in.h0;
  const auto o_ref = run<Kd, double>(form::reference, make_mixer<Kd, double>(), in, st_ref);
  const auto inf = cast<float>(in);
  for (index_t c : {16, 64}) {
    for (form f : {form::chunked, form::recurrent}) {
      INFO("gate " << strong << " chunk " << c << " form " << int(f));
      tensor<float, 4> st = inf.h0;
      const auto o = run<Kd, float>(f, make_mixer<Kd, float>(false, c), inf, st);
      CHECK(testing::all_finite(o));
      CHECK(testing::all_finite(st));
      check_near(o_ref, o, tol, "o");
      check_near(st_ref, st, tol, "state");
    }
  }
}

/// The sequence cut at random points, the state carried between calls == one call.
template <kind Kd>
void check_state_carry(const dims& d, form f, index_t chunk, double tol, std::uint64_t salt) {
  const auto in = cast<float>(random_inputs<Kd>(d, salt));
  const auto m = make_mixer<Kd, float>(false, chunk);
  tensor<float, 4> st_one = in.h0;
  const auto o_one = run<Kd, float>(f, m, in, st_one);
  auto rng = testing::make_rng(salt + 7);
  std::uniform_int_distribution<index_t> cut(1, d.T - 1);
  std::vector<index_t> cuts{0, d.T};
  for (int i = 0; i < 4; ++i) cuts.push_back(cut(rng));
  std::sort(cuts.begin(), cuts.end());
  tensor<float, 4> st = in.h0;
  tensor<float, 4> o({d.B, d.T, d.HV, d.V});
  for (std::size_t i = 0; i + 1 < cuts.size(); ++i) {
    if (cuts[i] == cuts[i + 1]) continue;
    const auto op = run<Kd, float>(f, m, slice_time(in, cuts[i], cuts[i + 1]), st);
    copy(tensor_view<const float, 4>(op),
         tensor_view<float, 4>(o).template slice<1>(cuts[i], cuts[i + 1]));
  }
  SEQMIX_CHECK_CLOSE(o_one, o, tol);
  SEQMIX_CHECK_CLOSE(st_one, st, tol);
}

/// step() T times == forward_recurrent, bitwise.
template <kind Kd>
void check_step(const dims& d, bool l2norm, std::uint64_t salt) {
  const auto in = cast<float>(random_inputs<Kd>(d, salt, 1.0, l2norm));
  const auto m = make_mixer<Kd, float>(l2norm);
  tensor<float, 4> st_rec = in.h0;
  const auto o_rec = run<Kd, float>(form::recurrent, m, in, st_rec);
  tensor<float, 4> st = in.h0;
  tensor<float, 4> o({d.B, d.T, d.HV, d.V});
  for (index_t t = 0; t < d.T; ++t)
    step<Kd, float>(m, in, t, tensor_view<float, 4>(o).template select<1>(t), st);
  CHECK(testing::bitwise_equal(o_rec, o));
  CHECK(testing::bitwise_equal(st_rec, st));
}

/// Packed sequences (cu_seqlens, some empty) == separate calls.
template <kind Kd>
void check_varlen(const dims& d, form f, std::vector<index_t> lens, double tol,
                  std::uint64_t salt) {
  index_t total = 0;
  std::vector<index_t> cu{0};
  for (index_t l : lens) cu.push_back(total += l);
  const index_t N = static_cast<index_t>(lens.size());
  dims dp = d;
  dp.B = 1;
  dp.T = total;
  auto in = cast<float>(random_inputs<Kd>(dp, salt));
  auto rng = testing::make_rng(salt + 3);
  in.h0 = testing::random_normal<float, 4>({N, d.HV, d.K, d.V}, rng, 0.5);
  const auto m = make_mixer<Kd, float>(false, 16);
  tensor<float, 4> st = in.h0;
  const auto o = run<Kd, float>(f, m, in, st, cu);
  for (index_t n = 0; n < N; ++n) {
    const auto un = static_cast<std::size_t>(n);
    INFO("sequence " << n << " of length " << lens[un]);
    tensor<float, 4> st_n = slice_of(in.h0, 0, n, n + 1);
    if (lens[un] == 0) {
      CHECK(testing::bitwise_equal(st_n, slice_of(st, 0, n, n + 1)));
      continue;
    }
    const auto o_n = run<Kd, float>(f, m, slice_time(in, cu[un], cu[un + 1]), st_n);
    SEQMIX_CHECK_CLOSE(o_n, slice_of(o, 1, cu[un], cu[un + 1]), tol);
    SEQMIX_CHECK_CLOSE(st_n, slice_of(st, 0, n, n + 1), tol);
  }
}

/// 1 vs 2 vs 3 threads: bitwise identical outputs and states.
template <kind Kd>
void check_threads(const dims& d, form f, std::uint64_t salt) {
  const auto in = cast<float>(random_inputs<Kd>(d, salt, 1.0, true));
  const auto m = make_mixer<Kd, float>(true, 32);
  tensor<float, 4> s1 = in.h0;
  tensor<float, 4> o1;
  {
    scoped_num_threads one(1);
    o1 = run<Kd, float>(f, m, in, s1);
  }
  for (int n : {2, 3}) {
    INFO(n << " threads");
    tensor<float, 4> s2 = in.h0;
    scoped_num_threads many(n);
    testing::require_team(n);
    const auto o2 = run<Kd, float>(f, m, in, s2);
    CHECK(testing::bitwise_equal(o1, o2));
    CHECK(testing::bitwise_equal(s1, s2));
  }
}

/// The recurrent form and step allocate nothing; the chunked form's allocations do not grow
/// with T.
template <kind Kd>
void check_allocations() {
  const dims d{1, 300, 2, 2, 32, 32};
  const auto in = cast<float>(random_inputs<Kd>(d, 950, 1.0, true));
  const auto m = make_mixer<Kd, float>(true, 32);
  tensor<float, 4> st = in.h0;
  (void)run<Kd, float>(form::recurrent, m, in, st);  // warm-up (thread pool)
  tensor<float, 4> o({d.B, d.T, d.HV, d.V});
  auto direct = [&](form f, const inputs<float>& x) {
    if constexpr (Kd == kind::kda) {
      if (f == form::recurrent) m.forward_recurrent(x.q, x.k, x.v, x.g, x.beta, o, st);
      if (f == form::chunked) m.forward_chunked(x.q, x.k, x.v, x.g, x.beta, o, st);
    } else {
      if (f == form::recurrent) m.forward_recurrent(x.q, x.k, x.v, x.g, x.a, x.b, o, st);
      if (f == form::chunked) m.forward_chunked(x.q, x.k, x.v, x.g, x.a, x.b, o, st);
    }
  };
  {
    testing::allocation_scope scope;
    direct(form::recurrent, in);
    CHECK(scope.stats().count == 0);
  }
  {
    auto o1 = tensor_view<float, 4>(o).template select<1>(0);
    testing::allocation_scope scope;
    for (index_t t = 0; t < 50; ++t) step<Kd, float>(m, in, t, o1, st);
    CHECK(scope.stats().count == 0);
  }
  std::size_t n_short = 0, n_long = 0;
  {
    const auto part = slice_time(in, 0, 40);
    tensor<float, 4> o_part({1, 40, d.HV, d.V});
    auto chunked_part = [&] {
      if constexpr (Kd == kind::kda) {
        m.forward_chunked(part.q, part.k, part.v, part.g, part.beta, o_part, st);
      } else {
        m.forward_chunked(part.q, part.k, part.v, part.g, part.a, part.b, o_part, st);
      }
    };
    // the first chunked call on this thread sizes its workspace (run alone, as CTest runs this
    // test, nothing before it has); the counts compared are those of later calls
    chunked_part();
    testing::allocation_scope scope;
    chunked_part();
    n_short = scope.stats().count;
  }
  {
    testing::allocation_scope scope;
    direct(form::chunked, in);
    n_long = scope.stats().count;
  }
  CHECK(n_long == n_short);
}

}  // namespace dplr_test
