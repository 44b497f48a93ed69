// SPDX-License-Identifier: MIT
// Shared by test_delta_net.cpp and test_gated_delta_net.cpp: random problems, one call helper
// over both mixers and every form, the golden check and the chain-of-trust checks.
#pragma once

#include <algorithm>
#include <random>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include <catch2/catch.hpp>

#include <seqmix/mixers/delta_net.hpp>
#include <seqmix/mixers/gated_delta_net.hpp>
#include <seqmix/reference/delta_rule.hpp>

#include "golden.hpp"
#include "testing.hpp"

namespace delta_test {

using namespace seqmix;
using seqmix::index_t;

struct dims {
  index_t B, T, H, HV, K, V;
};

template <class T>
struct inputs {
  tensor<T, 4> q, k, v;  // [B,T,H,K], [B,T,H,K], [B,T,HV,V]
  tensor<T, 3> g, beta;  // [B,T,HV]
  tensor<T, 4> h0;       // [B,HV,K,V]
};

template <class To, class From>
inputs<To> cast(const inputs<From>& in) {
  return {testing::cast<To>(in.q), testing::cast<To>(in.k),    testing::cast<To>(in.v),
          testing::cast<To>(in.g), testing::cast<To>(in.beta), testing::cast<To>(in.h0)};
}

/// Random inputs: unit-ish q, k rows (k normalised to `key_norm` unless l2norm is used),
/// g = logsigmoid(N(0,1)) scaled by `gate_mult`, beta uniform in [beta_lo, beta_hi].
inline inputs<double> random_inputs(const dims& d, std::uint64_t salt, double key_norm = 1.0,
                                    double gate_mult = 1.0, double beta_lo = 0.0,
                                    double beta_hi = 1.0, bool with_h0 = true) {
  auto rng = testing::make_rng(salt);
  inputs<double> in;
  in.q = testing::random_normal<double, 4>({d.B, d.T, d.H, d.K}, rng);
  in.k = testing::random_normal<double, 4>({d.B, d.T, d.H, d.K}, rng);
  in.v = testing::random_normal<double, 4>({d.B, d.T, d.HV, d.V}, rng);
  in.g = testing::random_normal<double, 3>({d.B, d.T, d.HV}, rng);
  in.g.view().for_each([&](double& x) { x = gate_mult * math::logsigmoid(x); });
  in.beta = testing::random_uniform<double, 3>({d.B, d.T, d.HV}, rng, beta_lo, beta_hi);
  in.h0 = with_h0 ? testing::random_normal<double, 4>({d.B, d.HV, d.K, d.V}, rng, 0.5)
                  : tensor<double, 4>({d.B, d.HV, d.K, d.V});
  if (key_norm > 0) {  // rows of k scaled to norm key_norm
    for (index_t b = 0; b < d.B; ++b)
      for (index_t t = 0; t < d.T; ++t)
        for (index_t h = 0; h < d.H; ++h) {
          double ss = 0;
          for (index_t i = 0; i < d.K; ++i) ss += in.k(b, t, h, i) * in.k(b, t, h, i);
          const double r = key_norm / std::sqrt(ss);
          for (index_t i = 0; i < d.K; ++i) in.k(b, t, h, i) *= r;
        }
  }
  return in;
}

/// Values of the random problems are O(1); a reference whose RMS is far below that (a state
/// decayed to 1e-111, a single element after cancellation) is compared against this floor
/// instead, i.e. the check is rel_rms <= tol with the reference norm floored at 0.1 per element.
inline constexpr double scale_floor = 0.1;

template <class A, class B, std::size_t R>
void check_near(const tensor<A, R>& ref, const tensor<B, R>& out, double tol, const char* what) {
  const auto c = testing::compare(ref, out);
  double ref_ss = 0;
  ref.view().for_each([&](A x) { ref_ss += double(x) * double(x); });
  const double n = double(std::max<index_t>(1, ref.size()));
  const double ref_rms = std::sqrt(ref_ss / n);
  const double err_rms = c.rel_rms * (ref_rms > 0 ? ref_rms : 1.0);
  INFO(what << ": " << c.report << " (reference RMS " << ref_rms << ")");
  CHECK(c.nonfinite == 0);
  CHECK(err_rms <= tol * std::max(ref_rms, scale_floor));
}

enum class form { chunked, recurrent, automatic, reference };

template <bool Gated, class T>
using mixer_t = std::conditional_t<Gated, gated_delta_net<T>, delta_net<T>>;

template <bool Gated, class T>
typename mixer_t<Gated, T>::options make_options(bool l2norm, index_t chunk = 64,
                                                 std::optional<T> scale = {}) {
  typename mixer_t<Gated, T>::options o;
  o.scale = scale;
  o.use_qk_l2norm = l2norm;
  o.chunk_size = chunk;
  return o;
}

/// Runs one form on `in` (state starts from `state`, updated in place); returns o.
template <bool Gated, class T>
tensor<T, 4> run(form f, const mixer_t<Gated, T>& m, const inputs<T>& in, tensor<T, 4>& state,
                 std::span<const index_t> cu = {}) {
  tensor<T, 4> o({in.v.extent(0), in.v.extent(1), in.v.extent(2), in.v.extent(3)});
  if (f == form::reference) {
    REQUIRE(cu.empty());
    reference::delta_rule<T>(
        in.q, in.k, in.v, Gated ? tensor_view<const T, 3>(in.g) : tensor_view<const T, 3>{},
        in.beta, o, state, m.scale_for(in.q.extent(3)), m.config().use_qk_l2norm);
    return o;
  }
  auto call = [&](auto&&... extra) {
    if constexpr (Gated) {
      if (f == form::chunked)
        m.forward_chunked(in.q, in.k, in.v, in.g, in.beta, o, state, extra...);
      if (f == form::recurrent)
        m.forward_recurrent(in.q, in.k, in.v, in.g, in.beta, o, state, extra...);
      if (f == form::automatic) m.forward(in.q, in.k, in.v, in.g, in.beta, o, state, extra...);
    } else {
      if (f == form::chunked) m.forward_chunked(in.q, in.k, in.v, in.beta, o, state, extra...);
      if (f == form::recurrent) m.forward_recurrent(in.q, in.k, in.v, in.beta, o, state, extra...);
      if (f == form::automatic) m.forward(in.q, in.k, in.v, in.beta, o, state, extra...);
    }
  };
  if (cu.empty()) {
    call();
  } else {
    call(cu);
  }
  return o;
}

/// Tokens [t0, t1) of every input (copies).
template <class T>
inputs<T> slice_time(const inputs<T>& in, index_t t0, index_t t1) {
  auto s4 = [&](const tensor<T, 4>& x) {
    return tensor<T, 4>::copy_of(tensor_view<const T, 4>(x).template slice<1>(t0, t1));
  };
  auto s3 = [&](const tensor<T, 3>& x) {
    return tensor<T, 3>::copy_of(tensor_view<const T, 3>(x).template slice<1>(t0, t1));
  };
  return {s4(in.q), s4(in.k), s4(in.v), s3(in.g), s3(in.beta), in.h0};
}

/// Batch row b of every input, as a B = 1 problem (h0 too).
template <class T>
inputs<T> batch_row(const inputs<T>& in, index_t b) {
  auto s4 = [&](const tensor<T, 4>& x) {
    return tensor<T, 4>::copy_of(tensor_view<const T, 4>(x).template slice<0>(b, b + 1));
  };
  auto s3 = [&](const tensor<T, 3>& x) {
    return tensor<T, 3>::copy_of(tensor_view<const T, 3>(x).template slice<0>(b, b + 1));
  };
  return {s4(in.q), s4(in.k), s4(in.v), s3(in.g), s3(in.beta), s4(in.h0)};
}

/// Golden check of one fla op against *_naive, for all stored cases, both variants:
/// reference (double), chunked and recurrent (float) within `tol` relative RMS.
template <bool Gated>
void check_golden(const std::string& op, bool l2norm, double tol) {
  const auto& inp = testing::golden::file("inputs");
  const auto& ref = testing::golden::file("fla_delta");
  double worst[3] = {0, 0, 0};  // max rel RMS (o and ht) of reference, chunked, recurrent
  for (int s = 0; s < testing::golden::case_count; ++s) {
    const std::string cs = "case" + std::to_string(s);
    inputs<double> in;
    in.q = inp.get<double, 4>(cs + ".q");
    in.k = inp.get<double, 4>(cs + (l2norm ? ".k" : ".k_l2"));
    in.v = inp.get<double, 4>(cs + ".v");
    in.g = inp.get<double, 3>(cs + ".g");
    in.beta = inp.get<double, 3>(cs + ".beta");
    const auto h0 = inp.get<double, 4>(cs + ".h0");
    const auto inf = cast<float>(in);
    for (const std::string variant : {"noh0", "h0"}) {
      const std::string key = op + "." + cs + "." + variant;
      const auto o_ref = ref.get<float, 4>(key + ".o_naive");
      const auto ht_ref = ref.get<float, 4>(key + ".ht_naive");
      const bool with_h0 = variant == "h0";
      for (form f : {form::reference, form::chunked, form::recurrent}) {
        INFO(key << " form " << int(f));
        if (f == form::reference) {
          tensor<double, 4> st = with_h0 ? h0 : tensor<double, 4>(h0.shape());
          const auto o = run<Gated, double>(
              f, mixer_t<Gated, double>(make_options<Gated, double>(l2norm)), in, st);
          SEQMIX_CHECK_CLOSE(o_ref, o, tol);
          SEQMIX_CHECK_CLOSE(ht_ref, st, tol);
          worst[0] = std::max(
              {worst[0], testing::compare(o_ref, o).rel_rms, testing::compare(ht_ref, st).rel_rms});
        } else {
          tensor<float, 4> st = with_h0 ? testing::cast<float>(h0) : tensor<float, 4>(h0.shape());
          const auto o = run<Gated, float>(
              f, mixer_t<Gated, float>(make_options<Gated, float>(l2norm)), inf, st);
          SEQMIX_CHECK_CLOSE(o_ref, o, tol);
          SEQMIX_CHECK_CLOSE(ht_ref, st, tol);
          const std::size_t w = f == form::chunked ? 1 : 2;
          worst[w] = std::max(
              {worst[w], testing::compare(o_ref, o).rel_rms, testing::compare(ht_ref, st).rel_rms});
        }
      }
    }
  }
  WARN(op << " vs *_naive, max rel RMS over cases 0-3 x {noh0, h0}, o and ht: reference(double) "
          << worst[0] << ", chunked(float) " << worst[1] << ", recurrent(float) " << worst[2]);
}

}  // namespace delta_test

namespace delta_test {

/// Reference (double) vs chunked (each chunk size) and recurrent (float), outputs and final
/// states, with a random initial state.
template <bool Gated>
void check_forms(const dims& d, std::initializer_list<index_t> chunks, bool l2norm, double tol,
                 std::uint64_t salt, double key_norm = 1.0, double gate_mult = 1.0,
                 double beta_lo = 0.0, double beta_hi = 1.0) {
  const auto in = random_inputs(d, salt, l2norm ? 0.0 : key_norm, gate_mult, beta_lo, beta_hi);
  tensor<double, 4> st_ref = in.h0;
  const auto o_ref = run<Gated, double>(
      form::reference, mixer_t<Gated, double>(make_options<Gated, double>(l2norm)), in, st_ref);
  const auto inf = cast<float>(in);
  INFO("B " << d.B << " T " << d.T << " H " << d.H << " HV " << d.HV << " K " << d.K << " V " << d.V
            << " l2norm " << l2norm);
  {
    tensor<float, 4> st = inf.h0;
    const auto o = run<Gated, float>(
        form::recurrent, mixer_t<Gated, float>(make_options<Gated, float>(l2norm)), inf, st);
    INFO("recurrent");
    check_near(o_ref, o, tol, "o");
    check_near(st_ref, st, tol, "state");
  }
  for (index_t c : chunks) {
    tensor<float, 4> st = inf.h0;
    const auto o = run<Gated, float>(
        form::chunked, mixer_t<Gated, float>(make_options<Gated, float>(l2norm, c)), inf, st);
    INFO("chunked, chunk " << c);
    check_near(o_ref, o, tol, "o");
    check_near(st_ref, st, tol, "state");
  }
}

/// The sequence cut at random points, the state carried between calls == one call.
template <bool Gated>
void check_state_carry(const dims& d, form f, index_t chunk, double tol, std::uint64_t salt) {
  const auto in = cast<float>(random_inputs(d, salt));
  const mixer_t<Gated, float> m(make_options<Gated, float>(false, chunk));
  tensor<float, 4> st_one = in.h0;
  const auto o_one = run<Gated, float>(f, m, in, st_one);
  auto rng = testing::make_rng(salt + 7);
  std::uniform_int_distribution<index_t> cut(1, d.T - 1);
  std::vector<index_t> cuts{0, d.T};
  for (int i = 0; i < 4; ++i) cuts.push_back(cut(rng));
  std::sort(cuts.begin(), cuts.end());
  tensor<float, 4> st = in.h0;
  tensor<float, 4> o({d.B, d.T, d.HV, d.V});
  for (std::size_t i = 0; i + 1 < cuts.size(); ++i) {
    if (cuts[i] == cuts[i + 1]) continue;
    const auto part = slice_time(in, cuts[i], cuts[i + 1]);
    const auto op = run<Gated, float>(f, m, part, st);
    copy(tensor_view<const float, 4>(op),
         tensor_view<float, 4>(o).template slice<1>(cuts[i], cuts[i + 1]));
  }
  SEQMIX_CHECK_CLOSE(o_one, o, tol);
  SEQMIX_CHECK_CLOSE(st_one, st, tol);
}

/// step() T times == forward_recurrent (bitwise: the same kernel, the same operation order).
template <bool Gated>
void check_step(const dims& d, bool l2norm, std::uint64_t salt) {
  const auto in = cast<float>(random_inputs(d, salt, l2norm ? 0.0 : 1.0));
  const mixer_t<Gated, float> m(make_options<Gated, float>(l2norm));
  tensor<float, 4> st_rec = in.h0;
  const auto o_rec = run<Gated, float>(form::recurrent, m, in, st_rec);
  tensor<float, 4> st = in.h0;
  tensor<float, 4> o({d.B, d.T, d.HV, d.V});
  tensor_view<const float, 4> q = in.q, k = in.k, v = in.v;
  tensor_view<const float, 3> g = in.g, beta = in.beta;
  for (index_t t = 0; t < d.T; ++t) {
    auto ot = tensor_view<float, 4>(o).template select<1>(t);
    if constexpr (Gated) {
      m.step(q.select<1>(t), k.select<1>(t), v.select<1>(t), g.select<1>(t), beta.select<1>(t), ot,
             st);
    } else {
      m.step(q.select<1>(t), k.select<1>(t), v.select<1>(t), beta.select<1>(t), ot, st);
    }
  }
  CHECK(testing::bitwise_equal(o_rec, o));
  CHECK(testing::bitwise_equal(st_rec, st));
}

/// Packed sequences (cu_seqlens, some empty) == separate calls, for one form.
template <bool Gated>
void check_varlen(const dims& d, form f, std::vector<index_t> lens, double tol,
                  std::uint64_t salt) {
  index_t total = 0;
  std::vector<index_t> cu{0};
  for (index_t l : lens) cu.push_back(total += l);
  const index_t N = static_cast<index_t>(lens.size());
  dims dp = d;
  dp.B = 1;
  dp.T = total;
  auto in = cast<float>(random_inputs(dp, salt));
  auto rng = testing::make_rng(salt + 3);
  in.h0 = testing::random_normal<float, 4>({N, d.HV, d.K, d.V}, rng, 0.5);
  const mixer_t<Gated, float> m(make_options<Gated, float>(false, 16));
  tensor<float, 4> st = in.h0;
  const auto o = run<Gated, float>(f, m, in, st, cu);
  for (index_t n = 0; n < N; ++n) {
    const auto un = static_cast<std::size_t>(n);
    INFO("sequence " << n << " of length " << lens[un]);
    tensor<float, 4> st_n =
        tensor<float, 4>::copy_of(tensor_view<const float, 4>(in.h0).template slice<0>(n, n + 1));
    if (lens[un] == 0) {
      CHECK(testing::bitwise_equal(
          st_n,
          tensor<float, 4>::copy_of(tensor_view<const float, 4>(st).template slice<0>(n, n + 1))));
      continue;
    }
    auto part = slice_time(in, cu[un], cu[un + 1]);
    part.h0 = st_n;
    const auto o_n = run<Gated, float>(f, m, part, st_n);
    const auto o_slice = tensor<float, 4>::copy_of(
        tensor_view<const float, 4>(o).template slice<1>(cu[un], cu[un + 1]));
    SEQMIX_CHECK_CLOSE(o_n, o_slice, tol);
    const auto st_slice =
        tensor<float, 4>::copy_of(tensor_view<const float, 4>(st).template slice<0>(n, n + 1));
    SEQMIX_CHECK_CLOSE(st_n, st_slice, tol);
  }
}

/// 1 vs 2 threads: bitwise identical outputs and states.
template <bool Gated>
void check_threads(const dims& d, form f, std::uint64_t salt) {
  const auto in = cast<float>(random_inputs(d, salt));
  const mixer_t<Gated, float> m(make_options<Gated, float>(true, 32));
  tensor<float, 4> s1 = in.h0, s2 = in.h0;
  tensor<float, 4> o1, o2;
  {
    scoped_num_threads one(1);
    o1 = run<Gated, float>(f, m, in, s1);
  }
  {
    scoped_num_threads two(2);
    testing::require_team(2);
    o2 = run<Gated, float>(f, m, in, s2);
  }
  CHECK(testing::bitwise_equal(o1, o2));
  CHECK(testing::bitwise_equal(s1, s2));
}

}  // namespace delta_test

namespace delta_test {

/// Every class of bad input raises shape_error, for forward_chunked/_recurrent/forward and step.
template <bool Gated>
void check_bad_inputs() {
  using M = mixer_t<Gated, float>;
  const dims d{2, 8, 2, 4, 8, 6};
  const auto good = cast<float>(random_inputs(d, 900));
  const M m(make_options<Gated, float>(false));
  auto expect_error = [&](const inputs<float>& in, tensor<float, 4> st, form f,
                          std::span<const index_t> cu = {}) {
    CHECK_THROWS_AS((run<Gated, float>(f, m, in, st, cu)), shape_error);
  };
  for (form f : {form::chunked, form::recurrent, form::automatic}) {
    INFO("form " << int(f));
    {  // sanity: the good inputs pass
      tensor<float, 4> st = good.h0;
      CHECK_NOTHROW((run<Gated, float>(f, m, good, st)));
    }
    auto bad = good;
    bad.k = tensor<float, 4>({2, 8, 2, 7});
    expect_error(bad, good.h0, f);  // k shape
    bad = good;
    bad.v = tensor<float, 4>({2, 8, 3, 6});
    bad.beta = tensor<float, 3>({2, 8, 3});
    bad.g = tensor<float, 3>({2, 8, 3});
    expect_error(bad, tensor<float, 4>({2, 3, 8, 6}), f);  // HV % H != 0
    bad = good;
    bad.beta = tensor<float, 3>({2, 8, 3});
    expect_error(bad, good.h0, f);  // beta shape
    bad = good;
    bad.beta[3] = std::numeric_limits<float>::quiet_NaN();
    expect_error(bad, good.h0, f);                          // NaN beta
    expect_error(good, tensor<float, 4>({2, 4, 6, 8}), f);  // transposed state
    bad = good;
    bad.q = tensor<float, 4>({2, 8, 2, 0});
    bad.k = tensor<float, 4>({2, 8, 2, 0});
    expect_error(bad, tensor<float, 4>({2, 4, 0, 6}), f);  // empty
    if constexpr (Gated) {
      bad = good;
      bad.g[5] = std::numeric_limits<float>::quiet_NaN();
      expect_error(bad, good.h0, f);  // NaN gate
      bad.g[5] = std::numeric_limits<float>::infinity();
      expect_error(bad, good.h0, f);  // +inf gate
      bad = good;
      bad.g = tensor<float, 3>({2, 8, 2});
      expect_error(bad, good.h0, f);  // g shape
      bad = good;
      bad.g[5] = -std::numeric_limits<float>::infinity();  // -inf is allowed
      tensor<float, 4> st = good.h0;
      CHECK_NOTHROW((run<Gated, float>(f, m, bad, st)));
    }
    // packed input: B must be 1, offsets well formed, state has N rows
    const auto one = batch_row(good, 0);
    const std::vector<index_t> ok{0, 3, 8}, not_zero{1, 3, 8}, not_last{0, 3, 7},
        decreasing{0, 5, 3, 8}, too_short{0};
    {
      tensor<float, 4> st({2, 4, 8, 6});
      CHECK_NOTHROW((run<Gated, float>(f, m, one, st, ok)));
    }
    expect_error(good, tensor<float, 4>({2, 4, 8, 6}), f, ok);  // B = 2
    expect_error(one, tensor<float, 4>({2, 4, 8, 6}), f, not_zero);
    expect_error(one, tensor<float, 4>({2, 4, 8, 6}), f, not_last);
    expect_error(one, tensor<float, 4>({3, 4, 8, 6}), f, decreasing);
    expect_error(one, tensor<float, 4>({0, 4, 8, 6}), f, too_short);
    expect_error(one, tensor<float, 4>({3, 4, 8, 6}), f, ok);  // state rows != N
  }
  {  // chunk_size must be > 0
    const M m0(make_options<Gated, float>(false, 0));
    tensor<float, 4> st = good.h0;
    CHECK_THROWS_AS((run<Gated, float>(form::chunked, m0, good, st)), shape_error);
  }
  {  // strided inner dimension of o is rejected; the message names the argument
    tensor<float, 4> st = good.h0;
    tensor<float, 4> wide({2, 8, 4, 12});
    tensor_view<float, 4> o_strided(wide.data(), {2, 8, 4, 6}, {8 * 4 * 12, 4 * 12, 12, 2});
    try {
      if constexpr (Gated) {
        m.forward_chunked(good.q, good.k, good.v, good.g, good.beta, o_strided, st);
      } else {
        m.forward_chunked(good.q, good.k, good.v, good.beta, o_strided, st);
      }
      FAIL("no exception");
    } catch (const shape_error& e) {
      CHECK_THAT(e.what(), Catch::Matchers::Contains("'o'"));
    }
  }
  {  // step: shapes checked with names
    tensor<float, 4> st = good.h0;
    tensor<float, 3> q({2, 2, 8}), k({2, 2, 7}), v({2, 4, 6}), o({2, 4, 6});
    tensor<float, 2> g({2, 4}), beta({2, 4});
    try {
      if constexpr (Gated) {
        m.step(q, k, v, g, beta, o, st);
      } else {
        m.step(q, k, v, beta, o, st);
      }
      FAIL("no exception");
    } catch (const shape_error& e) {
      CHECK_THAT(e.what(), Catch::Matchers::Contains("'k'") &&
                               Catch::Matchers::Contains("expected shape [2, 2, 8]"));
    }
    tensor<float, 4> st_bad({2, 4, 6, 8});
    tensor<float, 3> k_ok({2, 2, 8});
    if constexpr (Gated) {
      CHECK_THROWS_AS(m.step(q, k_ok, v, g, beta, o, st_bad), shape_error);
      g[1] = std::numeric_limits<float>::quiet_NaN();
      CHECK_THROWS_AS(m.step(q, k_ok, v, g, beta, o, st), shape_error);
    } else {
      CHECK_THROWS_AS(m.step(q, k_ok, v, beta, o, st_bad), shape_error);
    }
  }
}

/// The recurrent form and step allocate nothing at all (so nothing per token); the chunked
/// form's allocations do not grow with T (one workspace per thread).
template <bool Gated>
void check_allocations() {
  const dims d{1, 300, 2, 2, 32, 32};
  const auto in = cast<float>(random_inputs(d, 950));
  const mixer_t<Gated, float> m(make_options<Gated, float>(true, 32));
  tensor<float, 4> st = in.h0;
  tensor<float, 4> o({d.B, d.T, d.HV, d.V});
  auto call = [&](form f, const inputs<float>& x, tensor_view<float, 4> out) {
    if constexpr (Gated) {
      if (f == form::recurrent) m.forward_recurrent(x.q, x.k, x.v, x.g, x.beta, out, st);
      if (f == form::chunked) m.forward_chunked(x.q, x.k, x.v, x.g, x.beta, out, st);
    } else {
      if (f == form::recurrent) m.forward_recurrent(x.q, x.k, x.v, x.beta, out, st);
      if (f == form::chunked) m.forward_chunked(x.q, x.k, x.v, x.beta, out, st);
    }
  };
  call(form::recurrent, in, o);  // warm-up (OpenMP thread pool)
  {
    testing::allocation_scope scope;
    call(form::recurrent, in, o);
    CHECK(scope.stats().count == 0);
  }
  {
    tensor_view<const float, 4> q = in.q, k = in.k, v = in.v;
    tensor_view<const float, 3> g = in.g, beta = in.beta;
    auto o1 = tensor_view<float, 4>(o).template select<1>(0);
    testing::allocation_scope scope;
    for (index_t t = 0; t < 50; ++t) {
      if constexpr (Gated) {
        m.step(q.select<1>(t), k.select<1>(t), v.select<1>(t), g.select<1>(t), beta.select<1>(t),
               o1, st);
      } else {
        m.step(q.select<1>(t), k.select<1>(t), v.select<1>(t), beta.select<1>(t), o1, st);
      }
    }
    CHECK(scope.stats().count == 0);
  }
  std::size_t peak_short = 0, peak_long = 0;
  {
    const auto part = slice_time(in, 0, 40);
    tensor<float, 4> o_short({1, 40, d.HV, d.V});
    testing::allocation_scope scope;
    call(form::chunked, part, o_short);
    peak_short = scope.stats().peak_bytes;
  }
  {
    testing::allocation_scope scope;
    call(form::chunked, in, o);
    peak_long = scope.stats().peak_bytes;
  }
  // the chunked scratch comes from the workspace arena (core/workspace.hpp): the short call sized
  // it, so the long one (same chunk, 7.5x the tokens) needs no more (in fact nothing)
  CHECK(peak_long <= peak_short);
}

}  // namespace delta_test
