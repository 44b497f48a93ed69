// SPDX-License-Identifier: MIT
// Building blocks of the layer tier (issue 13): short_conv, rms_norm, gated_rms_norm, l2norm,
// rope, linear, swiglu_mlp against the double references (reference/layers.hpp); split prefill
// and steps == one prefill, packed == separate, bf16 weights, argument and weight errors.
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include <seqmix/core/io/checkpoint.hpp>
#include <seqmix/core/safetensors.hpp>
#include <seqmix/layers/l2norm.hpp>
#include <seqmix/layers/linear.hpp>
#include <seqmix/layers/rms_norm.hpp>
#include <seqmix/layers/rope.hpp>
#include <seqmix/layers/short_conv.hpp>
#include <seqmix/layers/swiglu_mlp.hpp>
#include <seqmix/reference/layers.hpp>

#include "alloc_counter.hpp"
#include "testing.hpp"

namespace {

using namespace seqmix;
using seqmix::testing::cast;
using seqmix::testing::compare;
using seqmix::testing::random_normal;

template <class T, std::size_t R>
tensor_view<const T, R> ro(const tensor<T, R>& t) {
  return t.view();
}

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "no error";
}

std::string temp_file(const std::string& stem) {
  return (std::filesystem::temp_directory_path() /
          ("seqmix_layers_" + stem + "_" + std::to_string(::getpid()) + ".safetensors"))
      .string();
}

}  // namespace

TEST_CASE("short_conv == reference, split prefill, steps, packed sequences",
          "[layers][short_conv]") {
  auto rng = testing::make_rng(1);
  const index_t B = 2, T = 13, C = 19;
  for (index_t K : {2, 3, 4, 8})
    for (bool bias : {false, true})
      for (bool silu : {false, true}) {
        CAPTURE(K, bias, silu);
        auto w = random_normal<float, 2>({C, K}, rng, 0.5);
        auto bb = random_normal<float, 1>({C}, rng, 0.2);
        auto x = random_normal<float, 3>({B, T, C}, rng);
        auto s0 = random_normal<float, 3>({B, K - 1, C}, rng);
        layers::short_conv conv(
            ro(w), bias ? ro(bb) : tensor_view<const float, 1>{},
            silu ? layers::conv_activation::silu : layers::conv_activation::none);
        // reference
        auto wd = cast<double>(w);
        auto xd = cast<double>(x);
        auto bd = cast<double>(bb);
        auto sd = cast<double>(s0);
        const auto yr = reference::short_conv<double>(
            ro(xd), ro(wd), bias ? ro(bd) : tensor_view<const double, 1>{}, silu, sd.view());
        // whole prefill
        auto s = s0;
        tensor<float, 3> y({B, T, C});
        conv.forward(ro(x), y.view(), s.view());
        CHECK(compare(yr, y).rel_rms <= 1e-6);
        CHECK(compare(sd, s).rel_rms == 0);
        // split prefill (5 + 8) and token steps give the same bits
        auto s2 = s0;
        tensor<float, 3> y2({B, T, C});
        conv.forward(x.slice<1>(0, 5), y2.slice<1>(0, 5), s2.view());
        conv.forward(x.slice<1>(5, T), y2.slice<1>(5, T), s2.view());
        CHECK(testing::bitwise_equal(y, y2));
        CHECK(testing::bitwise_equal(s, s2));
        auto s3 = s0;
        tensor<float, 3> y3({B, T, C});
        for (index_t t = 0; t < T; ++t)
          conv.step(x.view().select<1>(t), y3.view().select<1>(t), s3.view());
        CHECK(testing::bitwise_equal(y, y3));
        CHECK(testing::bitwise_equal(s, s3));
        // packed: lengths 4, 0, 1, 8 == each alone (zero states)
        const std::vector<index_t> lens{4, 0, 1, 8}, cu{0, 4, 4, 5, 13};
        auto xp = random_normal<float, 3>({1, T, C}, rng);
        auto sp = conv.make_state(4);
        tensor<float, 3> yp({1, T, C});
        conv.forward(ro(xp), yp.view(), sp.view(), cu);
        for (std::size_t n = 0; n < lens.size(); ++n) {
          if (lens[n] == 0) {
            bool zero = true;
            for (index_t r = 0; r < K - 1; ++r)
              for (index_t c = 0; c < C; ++c) zero = zero && sp(index_t(n), r, c) == 0.0f;
            CHECK(zero);
            continue;
          }
          auto s1 = conv.make_state(1);
          tensor<float, 3> y1({1, lens[n], C});
          conv.forward(xp.slice<1>(cu[n], cu[n + 1]), y1.view(), s1.view());
          CHECK(compare(ro(y1), ro(yp).slice<1>(cu[n], cu[n + 1])).max_abs == 0);
          CHECK(compare(ro(s1).select<0>(0), ro(sp).select<0>(index_t(n))).max_abs == 0);
        }
      }
}

TEST_CASE("short_conv checks its arguments and weights", "[layers][short_conv]") {
  tensor<float, 2> w({8, 4});
  layers::short_conv conv(ro(w), {}, layers::conv_activation::silu);
  tensor<float, 3> x({1, 5, 8}), y({1, 5, 8}), bad_state({1, 4, 8});
  auto msg = error_of([&] { conv.forward(ro(x), y.view(), bad_state.view()); });
  CHECK_THAT(msg, Catch::Contains("short_conv::forward") && Catch::Contains("'state'") &&
                      Catch::Contains("[1, 3, 8]") && Catch::Contains("[1, 4, 8]"));
  tensor<float, 2> w9({8, 9});
  CHECK_THAT(error_of([&] { layers::short_conv(ro(w9), {}, layers::conv_activation::none); }),
             Catch::Contains("2..8"));
  auto s = conv.make_state(1);
  CHECK_THAT(error_of([&] { conv.forward(ro(x), x.view(), s.view()); }),
             Catch::Contains("'y'") && Catch::Contains("share memory"));
  // step allocates nothing
  tensor<float, 2> x1({1, 8}), y1({1, 8});
  conv.step(ro(x1), y1.view(), s.view());
  testing::allocation_scope scope;
  for (int i = 0; i < 10; ++i) conv.step(ro(x1), y1.view(), s.view());
  CHECK(scope.stats().count == 0);
}

TEST_CASE("rms_norm and gated_rms_norm == reference in every mode", "[layers][norm]") {
  auto rng = testing::make_rng(2);
  const index_t M = 7, W = 48;
  auto x = random_normal<float, 2>({M, W}, rng, 2.0);
  auto z = random_normal<float, 2>({M, W}, rng, 2.0);
  auto xd = cast<double>(x), zd = cast<double>(z);
  for (index_t G : {W, index_t(16)})
    for (bool shared : {false, true})
      for (bool one_plus : {false, true}) {
        if (shared && G == W) continue;
        CAPTURE(G, shared, one_plus);
        const index_t ws = shared ? G : W;
        auto w = random_normal<float, 1>({ws}, rng, 0.3, one_plus ? 0.0 : 1.0);
        auto wd = cast<double>(w);
        const auto mode = one_plus ? layers::norm_weight::one_plus : layers::norm_weight::plain;
        layers::rms_norm n(w, 1e-5f, mode, G);
        tensor<float, 2> y({M, W});
        n.forward(ro(x), y.view());
        const auto yr = reference::rms_norm<double>(ro(xd), ro(wd), 1e-5, one_plus, G);
        CHECK(compare(yr, y).rel_rms <= 1e-6);
        auto yi = x;  // in place
        n.forward(ro(yi), yi.view());
        CHECK(testing::bitwise_equal(y, yi));
        for (auto kind : {layers::norm_gate::silu_before, layers::norm_gate::silu_after,
                          layers::norm_gate::sigmoid_after}) {
          const auto rk = kind == layers::norm_gate::silu_before ? reference::gate_kind::silu_before
                          : kind == layers::norm_gate::silu_after
                              ? reference::gate_kind::silu_after
                              : reference::gate_kind::sigmoid_after;
          layers::gated_rms_norm gn(w, 1e-6f, kind, G, mode);
          tensor<float, 2> yg({M, W});
          gn.forward(ro(x), ro(z), yg.view());
          const auto ygr =
              reference::rms_norm<double>(ro(xd), ro(wd), 1e-6, one_plus, G, rk, ro(zd));
          CHECK(compare(ygr, yg).rel_rms <= 1e-6);
        }
      }
  layers::rms_norm n(tensor<float, 1>({16}, 1.0f), 1e-6f, layers::norm_weight::plain, 16);
  tensor<float, 2> x20({2, 20}), y20({2, 20});
  CHECK_THAT(error_of([&] { n.forward(ro(x20), y20.view()); }),
             Catch::Contains("rms_norm::forward") && Catch::Contains("multiple of the group"));
}

TEST_CASE("l2norm: both epsilon conventions == reference", "[layers][norm]") {
  auto rng = testing::make_rng(3);
  auto x = random_normal<float, 2>({9, 64}, rng);
  x(0, 3) = 0;
  auto xd = cast<double>(x);
  const auto yr = reference::l2norm<double>(ro(xd), 32, 1e-6);
  tensor<float, 2> a({9, 64}), b({9, 64});
  layers::l2norm(ro(x), a.view(), 32, 1e-6f, layers::l2_eps::rsqrt_sum);
  layers::l2norm(ro(x), b.view(), 32, 1e-6f, layers::l2_eps::div_sqrt);
  CHECK(compare(yr, a).rel_rms <= 1e-6);
  CHECK(compare(yr, b).rel_rms <= 1e-6);
  // an all-zero row stays finite (ε)
  tensor<float, 2> zero({1, 32}), zo({1, 32});
  layers::l2norm(ro(zero), zo.view(), 32);
  CHECK(testing::all_finite(zo));
  CHECK_THAT(error_of([&] { layers::l2norm(ro(x), a.view(), 30); }),
             Catch::Contains("l2norm") && Catch::Contains("'group'"));
}

TEST_CASE("rope == reference: rotate-half, interleaved, partial, positions, packed",
          "[layers][rope]") {
  auto rng = testing::make_rng(4);
  const index_t B = 2, T = 11, H = 3, hd = 32;
  for (auto style : {layers::rope_style::rotate_half, layers::rope_style::interleaved})
    for (double frac : {1.0, 0.25, 0.5}) {
      CAPTURE(int(style), frac);
      const auto r = layers::rope::partial(hd, frac, 1e4, style);
      CHECK(r.rotary_dim() == index_t(hd * frac));
      auto x = random_normal<float, 4>({B, T, H, hd}, rng);
      auto xd = cast<double>(x);
      const std::vector<index_t> start{0, 1000};
      const auto yr = reference::rope<double>(ro(xd), r.rotary_dim(), 1e4,
                                              style == layers::rope_style::interleaved, start);
      auto y = x;
      r.apply(y.view(), start);
      // transformers' numerics: the angle p·inv_freq is rounded to float (as torch computes it),
      // an error of up to p·2^-24 rad at position p = 1000 against the double reference
      CHECK(compare(yr, y).rel_rms <= 1e-5);
      // pass-through dims untouched
      for (index_t e = r.rotary_dim(); e < hd; ++e) CHECK(y(1, 3, 2, e) == x(1, 3, 2, e));
      // prefill of 4 then steps continue the positions
      auto y2 = x;
      r.apply(y2.slice<1>(0, 4), start);
      for (index_t t = 4; t < T; ++t) {
        const std::vector<index_t> pos{start[0] + t, start[1] + t};
        r.apply_step(y2.view().select<1>(t), pos);
      }
      CHECK(testing::bitwise_equal(y, y2));
      // packed sequences with their own offsets == separate
      const std::vector<index_t> cu{0, 5, 11}, st{7, 0};
      auto xp = random_normal<float, 4>({1, T, H, hd}, rng);
      auto yp = xp;
      r.apply(yp.view(), st, cu);
      for (std::size_t n = 0; n < 2; ++n) {
        tensor<float, 4> one = tensor<float, 4>::copy_of(ro(xp).slice<1>(cu[n], cu[n + 1]));
        r.apply(one.view(), std::vector<index_t>{st[n]});
        CHECK(compare(ro(one), ro(yp).slice<1>(cu[n], cu[n + 1])).max_abs == 0);
      }
    }
  CHECK_THAT(error_of([] { layers::rope(32, 7, 1e4); }), Catch::Contains("rotary_dim"));
  layers::rope r(32, 8, 1e4);
  tensor<float, 4> x({1, 2, 1, 32});
  CHECK_THAT(error_of([&] { r.apply(x.view(), std::vector<index_t>{-1}); }),
             Catch::Contains("positions must be >= 0"));
}

TEST_CASE("linear and swiglu_mlp == reference, f32 and bf16 weights, load errors",
          "[layers][linear]") {
  auto rng = testing::make_rng(5);
  const index_t M = 13, D = 40, I = 24;
  auto x = random_normal<float, 2>({M, D}, rng);
  auto wg = random_normal<float, 2>({I, D}, rng, 0.2),
       wu = random_normal<float, 2>({I, D}, rng, 0.2);
  auto wd = random_normal<float, 2>({D, I}, rng, 0.2);
  auto bias = random_normal<float, 1>({I}, rng, 0.2);
  const std::string path = temp_file("mlp");
  {
    safetensors_writer wr;
    wr.add("f.gate_proj.weight", wg);
    wr.add("f.gate_proj.bias", bias);
    wr.add("f.up_proj.weight", wu);
    wr.add("f.down_proj.weight", wd);
    wr.add_as("b.gate_proj.weight", wg, dtype::bf16);
    wr.add_as("b.up_proj.weight", wu, dtype::bf16);
    wr.add_as("b.down_proj.weight", wd, dtype::bf16);
    wr.add_as("bad.gate_proj.weight", wg, dtype::f64);
    wr.add("bad.up_proj.weight", wd);  // transposed shape
    wr.save(path);
  }
  auto ck = checkpoint::open(path);
  auto xd = cast<double>(x);
  for (std::string pre : {"f.", "b."}) {
    CAPTURE(pre);
    auto scope = ck.scope(pre);
    // the reference on the weights as stored (bf16-rounded for "b.")
    auto gq = scope.get<float, 2>("gate_proj.weight"), uq = scope.get<float, 2>("up_proj.weight"),
         dq = scope.get<float, 2>("down_proj.weight");
    auto lin = layers::linear::load("test", scope, "gate_proj", I, D);
    CHECK(lin.weight().is_bf16() == (pre == "b."));
    tensor<float, 2> y({M, I});
    lin.forward(ro(x), y.view());
    auto gd = cast<double>(gq), ud = cast<double>(uq), ddn = cast<double>(dq);
    CHECK(compare(reference::linear<double>(ro(xd), ro(gd)), y).rel_rms <= 1e-6);
    auto mlp = layers::swiglu_mlp::load("test", scope, D, I);
    tensor<float, 2> ym({M, D});
    mlp.forward(ro(x), ym.view());
    CHECK(compare(reference::swiglu<double>(ro(xd), ro(gd), ro(ud), ro(ddn)), ym).rel_rms <= 1e-6);
    // bf16 vs f32 weights: within bf16 rounding (2^-8 relative per weight)
    if (pre == "b.") {
      auto gf = cast<double>(wg), uf = cast<double>(wu), df = cast<double>(wd);
      const auto c = compare(reference::swiglu<double>(ro(xd), ro(gf), ro(uf), ro(df)), ym);
      CHECK(c.rel_rms <= 1e-2);
      CHECK(c.rel_rms > 1e-6);  // the weights really were rounded
    }
  }
  // bias
  auto lb = layers::linear::load("test", ck.scope("f."), "gate_proj", I, D, true);
  tensor<float, 2> yb({M, I});
  lb.forward(ro(x), yb.view());
  auto gd = cast<double>(wg);
  auto bd = cast<double>(bias);
  CHECK(compare(reference::linear<double>(ro(xd), ro(gd), ro(bd)), yb).rel_rms <= 1e-6);
  // errors name the tensor, the expected shape and what the file holds
  CHECK_THAT(
      error_of([&] { layers::linear::load("my_layer::load", ck.scope("f."), "q_proj", I, D); }),
      Catch::Contains("my_layer::load") && Catch::Contains("'f.q_proj.weight'") &&
          Catch::Contains("missing") && Catch::Contains("[24, 40]"));
  CHECK_THAT(error_of([&] { layers::swiglu_mlp::load("my_layer::load", ck.scope("bad."), D, I); }),
             Catch::Contains("'bad.gate_proj.weight'") && Catch::Contains("F64"));
  CHECK_THAT(
      error_of([&] { layers::linear::load("my_layer::load", ck.scope("bad."), "up_proj", I, D); }),
      Catch::Contains("'bad.up_proj.weight'") && Catch::Contains("expected shape [24, 40]") &&
          Catch::Contains("got shape [40, 24]"));
  tensor<float, 2> xbad({M, D + 1});
  CHECK_THAT(error_of([&] { lb.forward(ro(xbad), yb.view()); }),
             Catch::Contains("linear::forward") && Catch::Contains("'x'"));
  std::filesystem::remove(path);
}
