// SPDX-License-Identifier: MIT
// Causality of every chunked form (issue 20): a NaN, +inf or -inf planted in an input at token t
// (v for the gated family, x for Mamba2, v and k for the delta rules and softmax attention) must
// leave the outputs of every token before t bitwise unchanged, in the same chunk or an earlier
// one, at odd and aligned value/key sizes, in packed (varlen) and right-padded batches. The
// chunked kernels multiply masked zeros into their GEMM tiles no more (0 · NaN = NaN): the
// triangular products read only the lower part (core/gemm.hpp's lower_a, the attention P·V
// band). Also here: GLA's factored chunk path against extreme |q| and |k| (it falls back to the
// exact path), scratch sized by min(C, T) / min(W, T) rather than by the option (chunk_size 2^20,
// window 1e15), softmax decode propagating a NaN key as the chunked form does, and
// linalg::gemm's lower-triangular product on its own.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include <catch2/catch.hpp>

#include <seqmix/core/gemm.hpp>
#include <seqmix/mixers/delta_net.hpp>
#include <seqmix/mixers/gated_delta_net.hpp>
#include <seqmix/mixers/gla.hpp>
#include <seqmix/mixers/linear_attention.hpp>
#include <seqmix/mixers/mamba2_ssd.hpp>
#include <seqmix/mixers/simple_gla.hpp>
#include <seqmix/mixers/sliding_window_attention.hpp>
#include <seqmix/mixers/softmax_attention.hpp>
#include <seqmix/reference/gated_accumulation.hpp>

#include "testing.hpp"

namespace {

using seqmix::index_t;
using seqmix::tensor;
using seqmix::testing::make_rng;
using seqmix::testing::random_normal;
using seqmix::testing::random_uniform;
using T4 = tensor<float, 4>;
using T3 = tensor<float, 3>;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();
const float poisons[] = {kNaN, kInf, -kInf};

/// Every input a chunked form takes (unused ones stay empty). Roles: Mamba2 x = v, dt = g,
/// B = k, C = q; attention q, k, v.
struct inputs {
  T4 q, k, v, gk, gv;
  T3 g, beta;
};

/// A form under test: runs on `in` and returns its output [B, T, H, V]. `cu` empty: batch rows.
using form_fn = std::function<T4(const inputs&)>;
enum class target { v, k };

T4& pick(inputs& in, target t) {
  return t == target::v ? in.v : in.k;
}

/// Sets tokens [t0, t1) of batch row b (every head, every channel) to x.
void plant(T4& a, index_t b, index_t t0, index_t t1, float x) {
  for (index_t t = t0; t < t1; ++t)
    for (index_t h = 0; h < a.extent(2); ++h)
      for (index_t c = 0; c < a.extent(3); ++c) a(b, t, h, c) = x;
}

/// Whether rows (b, t) of a and c agree bit for bit.
bool same_row(const T4& a, const T4& c, index_t b, index_t t) {
  for (index_t h = 0; h < a.extent(2); ++h) {
    if (std::memcmp(&a(b, t, h, 0), &c(b, t, h, 0), sizeof(float) * std::size_t(a.extent(3))) != 0)
      return false;
  }
  return true;
}

/// The causality check: for each target, position t, poison and extent (token t alone, or
/// every token from t on: garbage right padding), planted in batch row `b`: every output row
/// of another batch row, and of row b before t, is bitwise the clean one. With `seq_end`
/// (packed sequences), rows from the end of t's sequence on must be unchanged too.
void check_causal(const std::string& what, const inputs& clean, const form_fn& run,
                  const std::vector<target>& targets, const std::vector<index_t>& ts,
                  const std::function<index_t(index_t)>& seq_end = {}) {
  const T4 ref = run(clean);
  REQUIRE(seqmix::testing::all_finite(ref));
  const index_t B = ref.extent(0), TT = ref.extent(1);
  const index_t b = B - 1;
  for (target tg : targets) {
    for (index_t t : ts) {
      for (float x : poisons) {
        for (bool tail : {false, true}) {
          inputs in = clean;
          const index_t t1 = tail ? (seq_end ? seq_end(t) : TT) : t + 1;
          plant(pick(in, tg), b, t, t1, x);
          const T4 out = run(in);
          INFO(what << ": " << (tg == target::v ? "v" : "k") << " = " << x << " at tokens [" << t
                    << ", " << t1 << ") of batch row " << b);
          index_t bad_b = -1, bad_t = -1;
          for (index_t bb = 0; bb < B && bad_t < 0; ++bb) {
            for (index_t tt = 0; tt < TT; ++tt) {
              const bool may_change = bb == b && tt >= t && (!seq_end || tt < seq_end(t));
              if (!may_change && !same_row(ref, out, bb, tt)) {
                bad_b = bb, bad_t = tt;
                break;
              }
            }
          }
          INFO("first changed output row: batch " << bad_b << ", token " << bad_t);
          CHECK(bad_t < 0);
        }
      }
    }
  }
}

struct dims {
  index_t B, T, H, K, V, chunk;
};
std::string label(const dims& d) {
  return "B " + std::to_string(d.B) + " T " + std::to_string(d.T) + " H " + std::to_string(d.H) +
         " K " + std::to_string(d.K) + " V " + std::to_string(d.V) + " C " +
         std::to_string(d.chunk);
}
/// Positions to poison: inside the first chunk, around each chunk boundary, the last token.
std::vector<index_t> positions(const dims& d) {
  std::vector<index_t> ts{1, 5, d.chunk - 1, d.chunk, d.chunk + 13, d.T - 1};
  if (2 * d.chunk < d.T) ts.push_back(2 * d.chunk);
  return ts;
}
// odd key/value sizes (the GEMM tails), aligned ones (the full-vector kernel), a partial last
// chunk, and chunk 16 (many tiles per chunk row)
const dims all_shapes[] = {{2, 70, 2, 16, 40, 16},
                           {2, 100, 2, 24, 7, 32},
                           {2, 150, 2, 20, 24, 64},
                           {2, 150, 2, 32, 32, 64}};
// Under the sanitizers (50x slower) the two smaller shapes: they take the same code paths (odd and
// aligned widths, partial last chunks, many tiles per chunk row) on fewer tokens.
const std::span<const dims> shapes(all_shapes, seqmix::testing::sanitized_build ? 2 : 4);

inputs gated_inputs(const dims& d, std::mt19937_64& rng, double gate_scale) {
  inputs in;
  in.q = random_normal<float, 4>({d.B, d.T, d.H, d.K}, rng);
  in.k = random_normal<float, 4>({d.B, d.T, d.H, d.K}, rng);
  in.v = random_normal<float, 4>({d.B, d.T, d.H, d.V}, rng);
  in.g = random_uniform<float, 3>({d.B, d.T, d.H}, rng, -gate_scale, 0.0);
  in.gk = random_uniform<float, 4>({d.B, d.T, d.H, d.K}, rng, -gate_scale, 0.0);
  in.gv = random_uniform<float, 4>({d.B, d.T, d.H, d.V}, rng, -0.1, 0.0);
  in.beta = random_uniform<float, 3>({d.B, d.T, d.H}, rng, 0.1, 1.0);
  // |k| ~ 1, so the delta rule's recurrence is stable without l2norm as well (SPEC: |1 - beta|k|²|
  // <= 1); the gated mixers do not mind
  for (index_t i = 0; i < in.k.size(); ++i) in.k[i] /= std::sqrt(float(d.K));
  return in;
}

T4 fresh_out(const inputs& in) {
  return T4(in.v.shape());
}

}  // namespace

// Gated forms: v (Mamba2's x) everywhere, and k (Mamba2's B) where the chunk's arithmetic does not
// depend on it: GLA's per-key chunks choose their factored or exact path from the chunk's |k|
// (factorable()), so a NaN or huge k later in the chunk moves its earlier rows to the exact path,
// the same values up to rounding (as every other test of that path checks), not bitwise.
TEST_CASE("causality: gated chunked forms never let a later v reach an earlier output",
          "[causality][gated]") {
  auto rng = make_rng(2001);
  for (const dims& d : shapes) {
    const auto ts = positions(d);
    const inputs in = gated_inputs(d, rng, 0.3);
    {
      seqmix::linear_attention<float> m({.chunk_size = d.chunk});
      check_causal(
          "linear_attention " + label(d), in,
          [&](const inputs& x) {
            T4 o = fresh_out(x), s({d.B, d.H, d.K, d.V});
            m.forward_chunked(x.q, x.k, x.v, o, s);
            return o;
          },
          {target::v, target::k}, ts);
      check_causal(
          "linear_attention normalised " + label(d), in,
          [&](const inputs& x) {
            T4 o = fresh_out(x), s({d.B, d.H, d.K, d.V});
            T3 z({d.B, d.H, d.K});
            m.forward_chunked(x.q, x.k, x.v, o, s, z);
            return o;
          },
          {target::v, target::k}, ts);
    }
    {
      seqmix::simple_gla<float> m({.chunk_size = d.chunk});
      check_causal(
          "simple_gla " + label(d), in,
          [&](const inputs& x) {
            T4 o = fresh_out(x), s({d.B, d.H, d.K, d.V});
            m.forward_chunked(x.q, x.k, x.v, x.g, o, s);
            return o;
          },
          {target::v, target::k}, ts);
      seqmix::simple_gla<float> r(
          {.chunk_size = d.chunk, .g_gamma = std::vector<float>(std::size_t(d.H), -0.05f)});
      check_causal(
          "retention (g_gamma) " + label(d), in,
          [&](const inputs& x) {
            T4 o = fresh_out(x), s({d.B, d.H, d.K, d.V});
            r.forward_chunked(x.q, x.k, x.v, o, s);
            return o;
          },
          {target::v, target::k}, ts);
    }
    {
      seqmix::gla<float> m({.chunk_size = d.chunk});
      // weak gates: the factored per-key path
      check_causal(
          "gla factored " + label(d), in,
          [&](const inputs& x) {
            T4 o = fresh_out(x), s({d.B, d.H, d.K, d.V});
            m.forward_chunked(x.q, x.k, x.v, x.gk, o, s);
            return o;
          },
          {target::v}, ts);
      // strong gates and kills: the exact path
      inputs strong = in;
      for (index_t i = 0; i < strong.gk.size(); ++i) strong.gk[i] *= 20.f;
      for (index_t t = 3; t < d.T; t += 29) strong.gk(0, t, 0, 1) = -kInf;
      check_causal(
          "gla exact " + label(d), strong,
          [&](const inputs& x) {
            T4 o = fresh_out(x), s({d.B, d.H, d.K, d.V});
            m.forward_chunked(x.q, x.k, x.v, x.gk, o, s);
            return o;
          },
          {target::v}, ts);
      check_causal(
          "gla per-value gate " + label(d), in,
          [&](const inputs& x) {
            T4 o = fresh_out(x), s({d.B, d.H, d.K, d.V});
            m.forward_chunked(x.q, x.k, x.v, x.gk, x.gv, o, s);
            return o;
          },
          {target::v}, ts);
    }
    {
      // Mamba2: x = v [B,T,H,P], dt = g raw, B = k, C = q ([B,T,G,N], G = H here), N = K, P = V
      seqmix::mamba2_ssd<float> m({.chunk_size = d.chunk});
      const tensor<float, 1> A_log = random_normal<float, 1>({d.H}, rng, 0.5);
      const tensor<float, 1> D = random_normal<float, 1>({d.H}, rng);
      const tensor<float, 1> bias = random_normal<float, 1>({d.H}, rng, 0.5);
      check_causal(
          "mamba2_ssd " + label(d), in,
          [&](const inputs& x) {
            T4 y = fresh_out(x), s({d.B, d.H, d.K, d.V});
            m.forward_chunked(x.v, x.g, A_log, x.k, x.q, D, bias, y, s);
            return y;
          },
          {target::v, target::k}, ts);
    }
  }
}

TEST_CASE("causality: gated packed sequences and right-padded batches", "[causality][gated]") {
  auto rng = make_rng(2002);
  const dims d{1, 170, 2, 20, 24, 64};
  const inputs in = gated_inputs(d, rng, 0.3);
  const std::vector<index_t> cu{0, 50, 130, 170};
  auto seq_end = [&](index_t t) {
    for (std::size_t n = 1; n < cu.size(); ++n)
      if (t < cu[n]) return cu[n];
    return cu.back();
  };
  const std::vector<index_t> ts{1, 49, 50, 51, 77, 129, 130, 169};
  const index_t N = index_t(cu.size()) - 1;
  seqmix::simple_gla<float> sg({.chunk_size = d.chunk});
  check_causal(
      "simple_gla varlen", in,
      [&](const inputs& x) {
        T4 o = fresh_out(x), s({N, d.H, d.K, d.V});
        sg.forward_chunked(x.q, x.k, x.v, x.g, o, s, cu);
        return o;
      },
      {target::v}, ts, seq_end);
  seqmix::gla<float> gl({.chunk_size = d.chunk});
  check_causal(
      "gla varlen", in,
      [&](const inputs& x) {
        T4 o = fresh_out(x), s({N, d.H, d.K, d.V});
        gl.forward_chunked(x.q, x.k, x.v, x.gk, o, s, cu);
        return o;
      },
      {target::v}, ts, seq_end);

  // right padding: row 1 holds 90 real tokens, then garbage (NaN, inf) up to T = 150; its first
  // 90 outputs equal those of the same 90 tokens run alone
  const dims p{2, 150, 2, 20, 24, 64};
  inputs pad = gated_inputs(p, rng, 0.3);
  for (index_t t = 90; t < p.T; ++t) {
    for (index_t h = 0; h < p.H; ++h)
      for (index_t c = 0; c < p.V; ++c) pad.v(1, t, h, c) = (t + c) % 2 ? kNaN : kInf;
  }
  inputs zero_pad = pad;
  plant(zero_pad.v, 1, 90, p.T, 0.f);
  auto row1 = [&](const T4& a, index_t t1) {
    return T4::copy_of(a.view().template slice<0>(1, 2).template slice<1>(0, t1));
  };
  auto padded = [&](auto run) {
    // garbage padding vs zero padding: bitwise the same real outputs; vs the 90 tokens alone:
    // the same up to rounding (the last chunk has another length, so other GEMM shapes)
    T4 og = fresh_out(pad), oz = fresh_out(pad), o1({1, 90, p.H, p.V});
    run(pad, og);
    run(zero_pad, oz);
    inputs alone;
    alone.q = row1(pad.q, 90), alone.k = row1(pad.k, 90), alone.v = row1(pad.v, 90);
    alone.g = T3::copy_of(pad.g.view().template slice<0>(1, 2).template slice<1>(0, 90));
    alone.gk = row1(pad.gk, 90);
    run(alone, o1);
    CHECK(seqmix::testing::bitwise_equal(row1(og, 90), row1(oz, 90)));
    SEQMIX_CHECK_CLOSE(o1, row1(og, 90), 1e-6);
  };
  seqmix::linear_attention<float> la({.chunk_size = p.chunk});
  padded([&](const inputs& x, T4& o) {
    T4 s({x.q.extent(0), p.H, p.K, p.V});
    la.forward_chunked(x.q, x.k, x.v, o, s);
  });
  seqmix::simple_gla<float> sg2({.chunk_size = p.chunk});
  padded([&](const inputs& x, T4& o) {
    T4 s({x.q.extent(0), p.H, p.K, p.V});
    sg2.forward_chunked(x.q, x.k, x.v, x.g, o, s);
  });
  seqmix::gla<float> gl2({.chunk_size = p.chunk});
  padded([&](const inputs& x, T4& o) {
    T4 s({x.q.extent(0), p.H, p.K, p.V});
    gl2.forward_chunked(x.q, x.k, x.v, x.gk, o, s);
  });
}

TEST_CASE("causality: delta-rule chunked forms never let a later k or v reach an earlier output",
          "[causality][delta]") {
  auto rng = make_rng(2003);
  for (const dims& d : shapes) {
    const auto ts = positions(d);
    inputs in = gated_inputs(d, rng, 0.3);
    for (bool l2 : {false, true}) {
      const std::string tag = std::string(l2 ? " l2norm " : " ") + label(d);
      seqmix::delta_net<float> dn({.use_qk_l2norm = l2, .chunk_size = d.chunk});
      check_causal(
          "delta_net" + tag, in,
          [&](const inputs& x) {
            T4 o = fresh_out(x), s({d.B, d.H, d.K, d.V});
            dn.forward_chunked(x.q, x.k, x.v, x.beta, o, s);
            return o;
          },
          {target::v, target::k}, ts);
      seqmix::gated_delta_net<float> gd({.use_qk_l2norm = l2, .chunk_size = d.chunk});
      check_causal(
          "gated_delta_net" + tag, in,
          [&](const inputs& x) {
            T4 o = fresh_out(x), s({d.B, d.H, d.K, d.V});
            gd.forward_chunked(x.q, x.k, x.v, x.g, x.beta, o, s);
            return o;
          },
          {target::v, target::k}, ts);
    }
  }
  // packed sequences
  const dims d{1, 170, 2, 20, 24, 64};
  const inputs in = gated_inputs(d, rng, 0.3);
  const std::vector<index_t> cu{0, 50, 130, 170};
  auto seq_end = [&](index_t t) {
    for (std::size_t n = 1; n < cu.size(); ++n)
      if (t < cu[n]) return cu[n];
    return cu.back();
  };
  seqmix::gated_delta_net<float> gd({.use_qk_l2norm = true, .chunk_size = d.chunk});
  check_causal(
      "gated_delta_net varlen", in,
      [&](const inputs& x) {
        T4 o = fresh_out(x), s({3, d.H, d.K, d.V});
        gd.forward_chunked(x.q, x.k, x.v, x.g, x.beta, o, s, cu);
        return o;
      },
      {target::v, target::k}, {1, 49, 50, 77, 129, 130, 169}, seq_end);
}

namespace {
inputs attention_inputs(const dims& d, std::mt19937_64& rng) {
  inputs in;
  in.q = random_normal<float, 4>({d.B, d.T, d.H, d.K}, rng);
  in.k = random_normal<float, 4>({d.B, d.T, d.H, d.K}, rng);
  in.v = random_normal<float, 4>({d.B, d.T, d.H, d.V}, rng);
  return in;
}
}  // namespace

TEST_CASE("causality: softmax and sliding-window chunked forms and prefill",
          "[causality][attention]") {
  auto rng = make_rng(2004);
  for (const dims& d : shapes) {
    const inputs in = attention_inputs(d, rng);
    const auto ts = positions(d);
    for (index_t W : {index_t(0), index_t(40), index_t(5)}) {
      typename seqmix::softmax_attention<float>::options opt;
      opt.chunk_size = d.chunk;
      if (W > 0) opt.window = W;
      const seqmix::softmax_attention<float> m(opt);
      const std::string tag = " W " + std::to_string(W) + " " + label(d);
      check_causal(
          "softmax_attention" + tag, in,
          [&](const inputs& x) {
            T4 o = fresh_out(x);
            m.forward_chunked(x.q, x.k, x.v, o);
            return o;
          },
          {target::v, target::k}, ts);
      // prefill after 30 cached tokens (full cache; a ring when windowed): the query tiles then
      // start mid key tile
      const inputs pre = attention_inputs({d.B, 30, d.H, d.K, d.V, d.chunk}, rng);
      check_causal(
          "softmax_attention prefill" + tag, in,
          [&](const inputs& x) {
            auto cache = m.make_cache(d.B, d.H, d.K, d.V, 30 + d.T);
            T4 o0 = fresh_out(pre);
            m.forward_chunked(pre.q, pre.k, pre.v, o0, cache);
            T4 o = fresh_out(x);
            m.forward_chunked(x.q, x.k, x.v, o, cache);
            return o;
          },
          {target::v, target::k}, ts);
    }
    const seqmix::sliding_window_attention<float> sw({.window = 33, .chunk_size = d.chunk});
    check_causal(
        "sliding_window_attention " + label(d), in,
        [&](const inputs& x) {
          T4 o = fresh_out(x);
          sw.forward_chunked(x.q, x.k, x.v, o);
          return o;
        },
        {target::v, target::k}, ts);
  }
  // packed sequences
  const dims d{1, 170, 2, 20, 24, 64};
  const inputs in = attention_inputs(d, rng);
  const std::vector<index_t> cu{0, 50, 130, 170};
  auto seq_end = [&](index_t t) {
    for (std::size_t n = 1; n < cu.size(); ++n)
      if (t < cu[n]) return cu[n];
    return cu.back();
  };
  const seqmix::softmax_attention<float> m;
  check_causal(
      "softmax_attention varlen", in,
      [&](const inputs& x) {
        T4 o = fresh_out(x);
        m.forward_chunked(x.q, x.k, x.v, o, cu);
        return o;
      },
      {target::v, target::k}, {1, 49, 50, 77, 129, 130, 169}, seq_end);
}

TEST_CASE("sliding window: a value outside every window reaches no output",
          "[causality][attention]") {
  // Stronger than causality: with W = 8, a NaN value at token 20 may reach tokens 20..27 only;
  // the tile form skips out-of-window values as it skips future ones (no 0 · NaN), as decode does.
  auto rng = make_rng(2005);
  for (index_t V : {index_t(24), index_t(32), index_t(7)}) {
    const dims d{1, 150, 2, 16, V, 64};
    inputs in = attention_inputs(d, rng);
    for (index_t W : {index_t(3), index_t(8), index_t(40)}) {
      const seqmix::sliding_window_attention<float> sw({.window = W, .chunk_size = 32});
      T4 ref = fresh_out(in);
      sw.forward_chunked(in.q, in.k, in.v, ref);
      for (index_t t : {index_t(20), index_t(63), index_t(64), index_t(100)}) {
        inputs x = in;
        plant(x.v, 0, t, t + 1, kNaN);
        T4 o = fresh_out(x), orec = fresh_out(x);
        sw.forward_chunked(x.q, x.k, x.v, o);
        sw.forward_recurrent(x.q, x.k, x.v, orec);
        INFO("V " << V << " W " << W << " NaN value at " << t);
        for (index_t tt = 0; tt < d.T; ++tt) {
          const bool sees = tt >= t && tt < t + W;
          INFO("token " << tt);
          if (sees) {
            CHECK(std::isnan(o(0, tt, 0, 0)));
            CHECK(std::isnan(orec(0, tt, 0, 0)));
          } else {
            CHECK(same_row(ref, o, 0, tt));
            CHECK(std::isfinite(orec(0, tt, 0, 0)));
          }
        }
      }
    }
  }
}

TEST_CASE("softmax decode and prefill agree on NaN and inf keys and values (both propagate)",
          "[causality][attention]") {
  auto rng = make_rng(2006);
  const dims d{2, 40, 2, 16, 24, 16};
  const inputs clean = attention_inputs(d, rng);
  for (index_t W : {index_t(0), index_t(12)}) {
    typename seqmix::softmax_attention<float>::options opt;
    opt.chunk_size = d.chunk;
    if (W > 0) opt.window = W;
    const seqmix::softmax_attention<float> m(opt);
    for (target tg : {target::k, target::v}) {
      for (float x : poisons) {
        for (bool whole_row : {true, false}) {
          inputs in = clean;
          const index_t p = 10;
          if (whole_row) {
            plant(pick(in, tg), 1, p, p + 1, x);
          } else {
            pick(in, tg)(1, p, 0, 3) = x;  // one element: a score of ±inf (or NaN), or v of one
          }
          T4 oc = fresh_out(in), orec = fresh_out(in), ostep = fresh_out(in);
          m.forward_chunked(in.q, in.k, in.v, oc);
          m.forward_recurrent(in.q, in.k, in.v, orec);
          auto cache = m.make_cache(d.B, d.H, d.K, d.V, d.T);
          for (index_t t = 0; t < d.T; ++t) {
            m.step(in.q.view().template select<1>(t), in.k.view().template select<1>(t),
                   in.v.view().template select<1>(t), ostep.view().template select<1>(t), cache);
          }
          INFO("W " << W << (tg == target::k ? " k" : " v") << " = " << x
                    << (whole_row ? " (row)" : " (one element)") << " at token " << p);
          index_t nonfinite = 0;
          for (index_t i = 0; i < oc.size(); ++i) {
            const bool nc = std::isnan(oc[i]), nr = std::isnan(orec[i]), ns = std::isnan(ostep[i]);
            if (nc != nr || nc != ns) {
              INFO("element " << i << ": chunked " << oc[i] << ", recurrent " << orec[i]
                              << ", step " << ostep[i]);
              CHECK(false);
              break;
            }
            nonfinite += std::isfinite(oc[i]) ? 0 : 1;
            if (!nc && oc[i] != orec[i]) {
              CHECK(std::abs(oc[i] - orec[i]) <= 1e-4f * (1.f + std::abs(oc[i])));
            }
          }
          // a NaN key (or a key row of inf: its scores are inf - inf), and a NaN or inf value,
          // reaches every output that sees it; a single -inf key element may drop the key
          if (std::isnan(x) || tg == target::v || whole_row) CHECK(nonfinite > 0);
          // nothing before token p changed (batch row 1) and row 0 is untouched
          for (index_t t = 0; t < d.T; ++t) {
            for (index_t h = 0; h < d.H; ++h) {
              for (index_t c = 0; c < d.V; ++c) {
                if (t < p) REQUIRE(std::isfinite(oc(1, t, h, c)));
                REQUIRE(std::isfinite(oc(0, t, h, c)));
              }
            }
          }
        }
      }
    }
  }
}

TEST_CASE("gla factored path: extreme |k| and |q| take the exact path, finite and accurate",
          "[causality][gla]") {
  // gk = -1.8 per token: a 16-row sub-chunk spans 27 < factor_bound (30), so the gates alone
  // pick the factored path, whose k side carries e^{27} (|k| ~ 1e30 would overflow) and whose
  // q side e^{-27} (|q| ~ 1e-30 would be subnormal); factorable() sends such chunks exact.
  auto rng = make_rng(2007);
  const index_t B = 1, TT = 256, H = 2, K = 32, V = 32;
  for (int which = 0; which < 3; ++which) {
    const double kscale = which == 0 ? 1e30 : 1.0, qscale = which == 1 ? 1e-30 : 1.0;
    auto q = random_normal<double, 4>({B, TT, H, K}, rng);
    auto k = random_normal<double, 4>({B, TT, H, K}, rng);
    auto v = random_normal<double, 4>({B, TT, H, V}, rng);
    for (index_t i = 0; i < q.size(); ++i) q[i] *= qscale;
    for (index_t i = 0; i < k.size(); ++i) k[i] *= kscale;
    if (which == 2) {  // both, in different chunks
      for (index_t t = 0; t < 64; ++t)
        for (index_t c = 0; c < K; ++c) k(0, t, 0, c) *= 1e30, q(0, t + 128, 1, c) *= 1e-30;
    }
    tensor<double, 4> gk({B, TT, H, K}, -1.8);
    // the recurrent form scales the state by 1e30: keep it finite in float (|S| ~ |k|·|v|)
    const double scale = 1.0 / std::sqrt(double(K));
    tensor<double, 4> o_ref({B, TT, H, V}), s_ref({B, H, K, V});
    seqmix::reference::gla<double>(q, k, v, gk, {}, scale, o_ref, s_ref);
    seqmix::gla<float> m({.chunk_size = 64});
    const auto qf = seqmix::testing::cast<float>(q), kf = seqmix::testing::cast<float>(k),
               vf = seqmix::testing::cast<float>(v), gf = seqmix::testing::cast<float>(gk);
    T4 oc({B, TT, H, V}), sc({B, H, K, V}), orc({B, TT, H, V}), src({B, H, K, V});
    m.forward_chunked(qf, kf, vf, gf, oc, sc);
    m.forward_recurrent(qf, kf, vf, gf, orc, src);
    INFO("case " << which << " (|k| " << kscale << ", |q| " << qscale << ")");
    CHECK(seqmix::testing::all_finite(oc));
    CHECK(seqmix::testing::all_finite(orc));
    SEQMIX_CHECK_CLOSE(o_ref, oc, 1e-6);
    SEQMIX_CHECK_CLOSE(o_ref, orc, 1e-6);
    SEQMIX_CHECK_CLOSE(s_ref, sc, 1e-6);
    // per token, too: the tiny-q rows must be as accurate as the others (a global RMS would
    // hide them behind the large ones)
    double worst = 0;
    for (index_t t = 0; t < TT; ++t) {
      for (index_t h = 0; h < H; ++h) {
        double num = 0, den = 0;
        for (index_t c = 0; c < V; ++c) {
          const double e = double(oc(0, t, h, c)) - o_ref(0, t, h, c);
          num += e * e;
          den += o_ref(0, t, h, c) * o_ref(0, t, h, c);
        }
        if (den > 0) worst = std::max(worst, std::sqrt(num / den));
      }
    }
    INFO("worst per-row relative RMS " << worst);
    CHECK(worst < 1e-5);
  }
}

TEST_CASE("oversized chunk_size and window are clamped to the sequence, results unchanged",
          "[causality][sizes]") {
  auto rng = make_rng(2008);
  const dims d{2, 75, 2, 16, 24, 64};
  const inputs in = gated_inputs(d, rng, 0.3);
  {  // delta rule: chunk_size 2^20 at T = 75 is one chunk of 75, as chunk_size 75 (or 128)
    seqmix::gated_delta_net<float> big({.chunk_size = index_t(1) << 20});
    seqmix::gated_delta_net<float> fit({.chunk_size = 128});
    T4 o1 = fresh_out(in), o2 = fresh_out(in), s1({d.B, d.H, d.K, d.V}), s2({d.B, d.H, d.K, d.V});
    REQUIRE_NOTHROW(big.forward_chunked(in.q, in.k, in.v, in.g, in.beta, o1, s1));
    fit.forward_chunked(in.q, in.k, in.v, in.g, in.beta, o2, s2);
    CHECK(seqmix::testing::bitwise_equal(o1, o2));
    CHECK(seqmix::testing::bitwise_equal(s1, s2));
    seqmix::delta_net<float> dbig({.chunk_size = index_t(1) << 40});
    seqmix::delta_net<float> dfit({.chunk_size = 75});
    REQUIRE_NOTHROW(dbig.forward_chunked(in.q, in.k, in.v, in.beta, o1, s1));
    dfit.forward_chunked(in.q, in.k, in.v, in.beta, o2, s2);
    CHECK(seqmix::testing::bitwise_equal(o1, o2));
    CHECK(seqmix::testing::bitwise_equal(s1, s2));
  }
  {  // softmax / sliding window: window 1e15 and key tile 2^40 at T = 75
    const inputs a = attention_inputs(d, rng);
    // one key tile either way (chunk_size 128 and 2^40 are both clamped to the 75 keys)
    const seqmix::softmax_attention<float> plain({.chunk_size = 128});
    const seqmix::softmax_attention<float> plain64;
    typename seqmix::softmax_attention<float>::options wide;
    wide.window = index_t(1000000000000000);
    wide.chunk_size = index_t(1) << 40;
    const seqmix::softmax_attention<float> m(wide);
    const seqmix::sliding_window_attention<float> sw(
        {.window = index_t(1000000000000000), .chunk_size = index_t(1) << 40});
    const seqmix::sliding_window_attention<float> huge(
        {.window = std::numeric_limits<index_t>::max()});
    T4 ref = fresh_out(a), o = fresh_out(a);
    plain.forward_chunked(a.q, a.k, a.v, ref);
    REQUIRE_NOTHROW(m.forward_chunked(a.q, a.k, a.v, o));
    CHECK(seqmix::testing::bitwise_equal(ref, o));
    REQUIRE_NOTHROW(sw.forward_chunked(a.q, a.k, a.v, o));
    CHECK(seqmix::testing::bitwise_equal(ref, o));
    T4 ref64 = fresh_out(a);
    plain64.forward_chunked(a.q, a.k, a.v, ref64);
    REQUIRE_NOTHROW(huge.forward_chunked(a.q, a.k, a.v, o));
    CHECK(seqmix::testing::bitwise_equal(ref64, o));
    T4 rrec = fresh_out(a), orec = fresh_out(a);
    plain.forward_recurrent(a.q, a.k, a.v, rrec);
    REQUIRE_NOTHROW(m.forward_recurrent(a.q, a.k, a.v, orec));
    CHECK(seqmix::testing::bitwise_equal(rrec, orec));
    REQUIRE_NOTHROW(sw.forward_recurrent(a.q, a.k, a.v, orec));
    CHECK(seqmix::testing::bitwise_equal(rrec, orec));
    // a window shorter than T still runs on a ring and still matches the chunked form
    const seqmix::sliding_window_attention<float> w20({.window = 20});
    T4 c20 = fresh_out(a), r20 = fresh_out(a);
    w20.forward_chunked(a.q, a.k, a.v, c20);
    w20.forward_recurrent(a.q, a.k, a.v, r20);
    SEQMIX_CHECK_CLOSE(c20, r20, 1e-6);
  }
}

TEST_CASE("linalg::gemm lower_a reads neither A's upper part nor B's later rows",
          "[causality][gemm]") {
  // C = A·B (+ C) with A lower triangular: NaN above A's diagonal must not be read, and row i
  // of C must not depend on rows > i of B (NaN there). Every row-tile height, full-vector and
  // tail columns, B plain and transposed, accumulate or not, float and double.
  auto rng = make_rng(2009);
  auto run = [&]<class T>(T) {
    std::normal_distribution<double> nd;
    const T nan = std::numeric_limits<T>::quiet_NaN();
    std::vector<T> pack;
    for (index_t m : {1, 2, 5, 6, 7, 13, 33, 64}) {
      for (index_t n : {1, 7, 8, 16, 24, 40, 64, 70}) {
        for (int trans_b = 0; trans_b < 2; ++trans_b) {
          for (int accumulate = 0; accumulate < 2; ++accumulate) {
            for (index_t t : {index_t(0), m / 2, m - 1}) {  // B rows >= t hold NaN (t = 0: none)
              const index_t lda = m + 3, ldb = (trans_b ? m : n) + 2, ldc = n + 5;
              std::vector<T> a(std::size_t(m * lda), nan), b(std::size_t((trans_b ? n : m) * ldb));
              std::vector<T> c(std::size_t(m * ldc));
              for (index_t i = 0; i < m; ++i)
                for (index_t p = 0; p <= i; ++p) a[std::size_t(i * lda + p)] = T(nd(rng));
              for (auto& x : b) x = T(nd(rng));
              for (auto& x : c) x = T(nd(rng));
              auto bel = [&](index_t p, index_t j) -> T& {
                return trans_b ? b[std::size_t(j * ldb + p)] : b[std::size_t(p * ldb + j)];
              };
              if (t > 0) {
                for (index_t p = t; p < m; ++p)
                  for (index_t j = 0; j < n; ++j) bel(p, j) = nan;
              }
              std::vector<T> c0 = c;
              if (trans_b) {
                seqmix::linalg::gemm<T, false, true>(m, n, m, a.data(), lda, b.data(), ldb,
                                                     c.data(), ldc, accumulate != 0, pack, true);
              } else {
                seqmix::linalg::gemm<T, false, false>(m, n, m, a.data(), lda, b.data(), ldb,
                                                      c.data(), ldc, accumulate != 0, pack, true);
              }
              INFO("m " << m << " n " << n << " transB " << trans_b << " accumulate " << accumulate
                        << " NaN rows of B from " << t);
              double worst = 0;
              bool finite = true;
              const index_t rows = t > 0 ? t : m;  // rows that must not see a NaN
              for (index_t i = 0; i < rows; ++i) {
                for (index_t j = 0; j < n; ++j) {
                  double ref = accumulate ? double(c0[std::size_t(i * ldc + j)]) : 0.0;
                  for (index_t p = 0; p <= i; ++p)
                    ref += double(a[std::size_t(i * lda + p)]) * double(bel(p, j));
                  const double got = double(c[std::size_t(i * ldc + j)]);
                  finite = finite && std::isfinite(got);
                  worst = std::max(worst, std::abs(got - ref) / (1.0 + std::abs(ref)));
                }
                // the padding columns past n are the caller's: untouched
                for (index_t j = n; j < ldc; ++j)
                  finite = finite && c[std::size_t(i * ldc + j)] == c0[std::size_t(i * ldc + j)];
              }
              CHECK(finite);
              CHECK(worst < (std::is_same_v<T, float> ? 1e-5 : 1e-13));
            }
          }
        }
      }
    }
  };
  run(0.f);
  run(0.0);
}
