// SPDX-License-Identifier: MIT
// Training blocks (include/seqmix/train/): every backward against central finite differences in
// double, on small shapes. Loss L = Σ r ⊙ y with a fixed random r (or the block's own loss for
// cross-entropy); each gradient must match the numerical one within a relative L2 error of
// 1e-7 (blocks, h = 1e-5) and 1e-6 (the whole tiny_lm, every mixer, h = 1e-6: its O(h²)
// truncation error at 1e-5 reaches 4e-6 with GLA, 4e-8 at 1e-6). AdamW is checked
// against the update written out by hand; shape errors name the function and the argument.
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <testing.hpp>
#include <tuple>
#include <vector>

#include <catch2/catch.hpp>

#include <seqmix/train/blocks.hpp>
#include <seqmix/train/model.hpp>
#include <seqmix/train/optim.hpp>

using namespace seqmix;
using seqmix::testing::make_rng;
using seqmix::testing::random_normal;

namespace {

constexpr double fd_h = 1e-5;
constexpr double block_tol = 1e-7;

/// Relative L2 error of `analytic` against central differences of loss() in the elements of x
/// (all of them, or `max_elems` picked at random).
template <std::size_t R>
double fd_error(tensor<double, R>& x, const tensor<double, R>& analytic,
                const std::function<double()>& loss, index_t max_elems = -1, std::uint64_t salt = 0,
                double h = fd_h) {
  REQUIRE(x.shape() == analytic.shape());
  std::vector<index_t> idx;
  if (max_elems < 0 || max_elems >= x.size()) {
    for (index_t i = 0; i < x.size(); ++i) idx.push_back(i);
  } else {
    auto rng = make_rng(salt);
    std::uniform_int_distribution<index_t> pick(0, x.size() - 1);
    for (index_t n = 0; n < max_elems; ++n) idx.push_back(pick(rng));
  }
  double num2 = 0, err2 = 0;
  for (index_t i : idx) {
    const double keep = x[i];
    x[i] = keep + h;
    const double lp = loss();
    x[i] = keep - h;
    const double lm = loss();
    x[i] = keep;
    const double num = (lp - lm) / (2 * h);
    num2 += num * num;
    err2 += (num - analytic[i]) * (num - analytic[i]);
  }
  return std::sqrt(err2) / std::max(std::sqrt(num2), 1e-12);
}

template <std::size_t R>
double dot(const tensor<double, R>& a, const tensor<double, R>& b) {
  double s = 0;
  for (index_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

}  // namespace

TEST_CASE("train: pointwise derivatives match finite differences", "[train]") {
  for (double x : {-30.0, -5.0, -1.3, -0.2, 0.0, 0.4, 2.0, 7.5, 25.0}) {
    INFO("x = " << x);
    const auto fd = [&](double (*f)(double)) { return (f(x + fd_h) - f(x - fd_h)) / (2 * fd_h); };
    CHECK(train::silu_grad(x) == Approx(fd(train::silu<double>)).margin(1e-9));
    CHECK(train::sigmoid(-x) == Approx(fd(train::logsigmoid<double>)).margin(1e-9));
    CHECK(train::sigmoid(x) == Approx(fd(train::softplus<double>)).margin(1e-9));
    CHECK(train::sigmoid(x) * (1 - train::sigmoid(x)) ==
          Approx(fd(train::sigmoid<double>)).margin(1e-9));
  }
  CHECK(std::isfinite(train::logsigmoid(-1000.0)));
  CHECK(train::sigmoid(-1000.0) == 0.0);
  CHECK(train::softplus(1000.0) == 1000.0);
}

TEST_CASE("train: embedding scatter-add matches finite differences", "[train]") {
  auto rng = make_rng(1);
  const index_t V = 7, D = 5;
  auto table = random_normal<double, 2>({V, D}, rng);
  const std::vector<std::int32_t> ids{3, 0, 3, 6, 3, 1};  // repeats accumulate
  const index_t M = static_cast<index_t>(ids.size());
  const auto r = random_normal<double, 2>({M, D}, rng);
  auto loss = [&] {
    tensor<double, 2> y({M, D});
    train::embedding_forward<double>(table, ids, y);
    return dot(r, y);
  };
  tensor<double, 2> dtable({V, D});
  train::embedding_backward<double>(ids, r, dtable);
  const double e = fd_error(table, dtable, loss);
  INFO("embedding dtable rel err " << e);
  CHECK(e < block_tol);
  CHECK(dtable(2, 0) == 0.0);  // an unused row keeps a zero gradient
  tensor<double, 2> y({M, D});
  CHECK_THROWS_WITH(train::embedding_forward<double>(table, std::vector<std::int32_t>{0, 7}, y),
                    Catch::Contains("train::embedding_forward") && Catch::Contains("'y'"));
  tensor<double, 2> y2({2, D});
  CHECK_THROWS_WITH(train::embedding_forward<double>(table, std::vector<std::int32_t>{0, 7}, y2),
                    Catch::Contains("'ids'") && Catch::Contains("7"));
  tensor<double, 2> dy2({2, D});
  CHECK_THROWS_WITH(
      train::embedding_backward<double>(std::vector<std::int32_t>{-1, 0}, dy2, dtable),
      Catch::Contains("train::embedding_backward") && Catch::Contains("'ids'") &&
          Catch::Contains("-1"));
}

TEST_CASE("train: linear backward matches finite differences", "[train]") {
  // N = 16 runs gemm's register kernel, 7 Eigen's
  for (auto shape : {std::tuple<index_t, index_t, index_t>{5, 7, 3}, {9, 16, 12}, {1, 3, 1}}) {
    const index_t M = std::get<0>(shape), N = std::get<1>(shape), K = std::get<2>(shape);
    INFO("M " << M << " N " << N << " K " << K);
    auto rng = make_rng(static_cast<std::uint64_t>(2 + N));
    auto x = random_normal<double, 2>({M, K}, rng);
    auto w = random_normal<double, 2>({N, K}, rng);
    auto b = random_normal<double, 1>({N}, rng);
    const auto r = random_normal<double, 2>({M, N}, rng);
    auto loss = [&] {
      tensor<double, 2> y({M, N});
      train::linear_forward<double>(x, w, y, b);
      return dot(r, y);
    };
    tensor<double, 2> dx({M, K}), dw({N, K});
    tensor<double, 1> db({N});
    train::linear_backward<double>(x, w, r, dx, dw, db);
    const double ex = fd_error(x, dx, loss), ew = fd_error(w, dw, loss), eb = fd_error(b, db, loss);
    INFO("dx " << ex << " dw " << ew << " db " << eb);
    CHECK(ex < block_tol);
    CHECK(ew < block_tol);
    CHECK(eb < block_tol);
    // dw accumulates, dx with accumulate_dx adds
    tensor<double, 2> dx2 = dx, dw2 = dw;
    train::linear_backward<double>(x, w, r, dx2, dw2, {}, true);
    for (index_t i = 0; i < dw.size(); ++i) CHECK(dw2[i] == Approx(2 * dw[i]).margin(1e-12));
    for (index_t i = 0; i < dx.size(); ++i) CHECK(dx2[i] == Approx(2 * dx[i]).margin(1e-12));
  }
  tensor<double, 2> x({4, 3}), w({5, 3}), dy({4, 5}), dx({4, 3}), dw_bad({5, 4});
  CHECK_THROWS_WITH(train::linear_backward<double>(x, w, dy, dx, dw_bad),
                    Catch::Contains("train::linear_backward") && Catch::Contains("'dw'") &&
                        Catch::Contains("[5, 3]") && Catch::Contains("[5, 4]"));
  tensor<double, 2> y_bad({4, 4});
  CHECK_THROWS_WITH(train::linear_forward<double>(x, w, y_bad),
                    Catch::Contains("train::linear_forward") && Catch::Contains("'y'"));
}

TEST_CASE("train: float linear (linalg::matmul) agrees with the double path", "[train]") {
  auto rng = make_rng(3);
  const index_t M = 70, N = 48, K = 33;
  const auto x = random_normal<double, 2>({M, K}, rng);
  const auto w = random_normal<double, 2>({N, K}, rng);
  const auto dy = random_normal<double, 2>({M, N}, rng);
  tensor<double, 2> y({M, N}), dx({M, K}), dw({N, K});
  train::linear_forward<double>(x, w, y);
  train::linear_backward<double>(x, w, dy, dx, dw);
  const auto xf = testing::cast<float>(x), wf = testing::cast<float>(w),
             dyf = testing::cast<float>(dy);
  tensor<float, 2> yf({M, N}), dxf({M, K}), dwf({N, K});
  train::linear_forward<float>(xf, wf, yf);
  train::linear_backward<float>(xf, wf, dyf, dxf, dwf);
  const auto cy = testing::compare(y, yf), cx = testing::compare(dx, dxf),
             cw = testing::compare(dw, dwf);
  INFO(cy.report << cx.report << cw.report);
  CHECK(cy.rel_rms < 1e-6);
  CHECK(cx.rel_rms < 1e-6);
  CHECK(cw.rel_rms < 1e-6);
}

TEST_CASE("train: rms_norm and l2norm backward match finite differences", "[train]") {
  auto rng = make_rng(4);
  const index_t M = 6, D = 8;
  auto x = random_normal<double, 2>({M, D}, rng);
  auto w = random_normal<double, 1>({D}, rng, 0.5, 1.0);
  const auto r = random_normal<double, 2>({M, D}, rng);
  auto loss = [&] {
    tensor<double, 2> y({M, D});
    train::rms_norm_forward<double>(x, w, y);
    return dot(r, y);
  };
  tensor<double, 2> dx({M, D});
  tensor<double, 1> dw({D});
  train::rms_norm_backward<double>(x, w, r, dx, dw);
  const double ex = fd_error(x, dx, loss), ew = fd_error(w, dw, loss);
  INFO("rms_norm dx " << ex << " dw " << ew);
  CHECK(ex < block_tol);
  CHECK(ew < block_tol);
  // the stored rstd is the row's (mean x² + eps)^-1/2
  tensor<double, 2> y({M, D});
  tensor<double, 1> rstd({M});
  train::rms_norm_forward<double>(x, w, y, 1e-6, rstd);
  double ss = 0;
  for (index_t d = 0; d < D; ++d) ss += x(2, d) * x(2, d);
  CHECK(rstd(2) == Approx(1 / std::sqrt(ss / D + 1e-6)).epsilon(1e-14));

  for (index_t G : {index_t{4}, index_t{8}}) {
    INFO("l2norm group " << G);
    auto l2loss = [&] {
      tensor<double, 2> yy({M, D});
      train::l2norm_forward<double>(x, yy, G);
      return dot(r, yy);
    };
    tensor<double, 2> dx2({M, D});
    train::l2norm_backward<double>(x, r, dx2, G);
    const double e = fd_error(x, dx2, l2loss);
    INFO("l2norm dx " << e);
    CHECK(e < block_tol);
  }
  tensor<double, 1> w_bad({D + 1});
  CHECK_THROWS_WITH(train::rms_norm_backward<double>(x, w_bad, r, dx, dw),
                    Catch::Contains("train::rms_norm_backward") && Catch::Contains("'w'"));
  CHECK_THROWS_WITH(train::l2norm_forward<double>(x, y, 3),
                    Catch::Contains("train::l2norm_forward") && Catch::Contains("'G'"));
}

TEST_CASE("train: short_conv (+SiLU) backward matches finite differences", "[train]") {
  auto rng = make_rng(5);
  const index_t B = 2, T = 7, C = 3, W = 4;
  auto x = random_normal<double, 3>({B, T, C}, rng);
  auto w = random_normal<double, 2>({C, W}, rng);
  const auto r = random_normal<double, 3>({B, T, C}, rng);
  for (auto act : {train::conv_act::silu, train::conv_act::none}) {
    INFO("silu " << (act == train::conv_act::silu));
    auto loss = [&] {
      tensor<double, 3> y({B, T, C});
      train::short_conv_forward<double>(x, w, y, act);
      double s = 0;
      for (index_t i = 0; i < y.size(); ++i) s += r[i] * y[i];
      return s;
    };
    tensor<double, 3> dx({B, T, C});
    tensor<double, 2> dw({C, W});
    train::short_conv_backward<double>(x, w, r, dx, dw, act);
    const double ex = fd_error(x, dx, loss), ew = fd_error(w, dw, loss);
    INFO("conv dx " << ex << " dw " << ew);
    CHECK(ex < block_tol);
    CHECK(ew < block_tol);
  }
  // causal: the output at t = 0 sees only x[0] through the newest tap
  tensor<double, 3> y({B, T, C});
  train::short_conv_forward<double>(x, w, y, train::conv_act::none);
  CHECK(y(1, 0, 2) == Approx(w(2, W - 1) * x(1, 0, 2)).epsilon(1e-14));
  tensor<double, 2> w_bad({C + 1, W});
  CHECK_THROWS_WITH(train::short_conv_forward<double>(x, w_bad, y),
                    Catch::Contains("train::short_conv_forward") && Catch::Contains("'w'"));
}

TEST_CASE("train: SwiGLU MLP backward matches finite differences", "[train]") {
  auto rng = make_rng(6);
  const index_t M = 5, D = 6, F = 10;
  auto x = random_normal<double, 2>({M, D}, rng);
  auto wg = random_normal<double, 2>({F, D}, rng, 0.5);
  auto wu = random_normal<double, 2>({F, D}, rng, 0.5);
  auto wd = random_normal<double, 2>({D, F}, rng, 0.5);
  const auto r = random_normal<double, 2>({M, D}, rng);
  train::swiglu_mlp_cache<double> cache;
  auto loss = [&] {
    tensor<double, 2> y({M, D});
    train::swiglu_mlp_cache<double> c2;
    train::swiglu_mlp_forward<double>(x, wg, wu, wd, y, c2);
    return dot(r, y);
  };
  tensor<double, 2> y({M, D}), dx({M, D}), dwg({F, D}), dwu({F, D}), dwd({D, F});
  train::swiglu_mlp_forward<double>(x, wg, wu, wd, y, cache);
  train::swiglu_mlp_backward<double>(x, wg, wu, wd, cache, r, dx, dwg, dwu, dwd);
  const double ex = fd_error(x, dx, loss), eg = fd_error(wg, dwg, loss),
               eu = fd_error(wu, dwu, loss), ed = fd_error(wd, dwd, loss);
  INFO("swiglu dx " << ex << " dw_gate " << eg << " dw_up " << eu << " dw_down " << ed);
  CHECK(ex < block_tol);
  CHECK(eg < block_tol);
  CHECK(eu < block_tol);
  CHECK(ed < block_tol);
  tensor<double, 2> wd_bad({D, F + 1});
  CHECK_THROWS_WITH(train::swiglu_mlp_forward<double>(x, wg, wu, wd_bad, y, cache),
                    Catch::Contains("train::swiglu_mlp_forward") && Catch::Contains("'w_down'"));
}

TEST_CASE("train: softmax cross-entropy is stable and matches finite differences", "[train]") {
  auto rng = make_rng(7);
  const index_t M = 5, V = 9;
  auto z = random_normal<double, 2>({M, V}, rng, 3.0);
  const std::vector<std::int32_t> y{2, -1, 8, 0, 2};  // row 1 ignored
  auto loss = [&] { return train::softmax_cross_entropy<double>(z, y).loss; };
  tensor<double, 2> dz({M, V});
  const auto res = train::softmax_cross_entropy<double>(z, y, dz);
  CHECK(res.count == 4);
  // the loss written out: mean of logsumexp - z_target over counted rows
  double ref = 0;
  for (index_t i : {0, 2, 3, 4}) {
    double s = 0;
    for (index_t j = 0; j < V; ++j) s += std::exp(z(i, j));
    ref += std::log(s) - z(i, y[static_cast<std::size_t>(i)]);
  }
  CHECK(res.loss == Approx(ref / 4).epsilon(1e-13));
  const double e = fd_error(z, dz, loss);
  INFO("cross-entropy dlogits rel err " << e);
  CHECK(e < block_tol);
  for (index_t j = 0; j < V; ++j) CHECK(dz(1, j) == 0.0);
  // in place gives the same gradient
  tensor<double, 2> zz = z;
  train::softmax_cross_entropy<double>(zz, y, zz.view());
  for (index_t i = 0; i < z.size(); ++i) CHECK(zz[i] == dz[i]);
  // huge logits: finite loss and gradient, accuracy counts the argmax
  tensor<double, 2> big({2, 3});
  big(0, 0) = 1e4, big(0, 1) = -1e4, big(0, 2) = 9990;
  big(1, 0) = 800, big(1, 1) = 900, big(1, 2) = 1000;
  tensor<double, 2> dbig({2, 3});
  const auto rb = train::softmax_cross_entropy<double>(big, std::vector<std::int32_t>{0, 1}, dbig);
  CHECK(std::isfinite(rb.loss));
  CHECK(rb.loss == Approx((std::log1p(std::exp(-10.0)) + 100 +
                           std::log1p(std::exp(-100.0) + std::exp(-200.0))) /
                          2)
                       .epsilon(1e-12));
  CHECK(rb.correct == 1);
  CHECK(testing::all_finite(dbig));
  // float: the same, from float logits
  tensor<float, 2> bigf = testing::cast<float>(big);
  const auto rf = train::softmax_cross_entropy<float>(bigf, std::vector<std::int32_t>{0, 1});
  CHECK(rf.loss == Approx(rb.loss).epsilon(1e-5));
  CHECK_THROWS_WITH(
      train::softmax_cross_entropy<double>(z, std::vector<std::int32_t>{1, 2}),
      Catch::Contains("train::softmax_cross_entropy") && Catch::Contains("'targets'"));
  CHECK_THROWS_WITH(
      train::softmax_cross_entropy<double>(z, std::vector<std::int32_t>{0, 0, 9, 0, 0}),
      Catch::Contains("'targets'") && Catch::Contains("9"));
}

TEST_CASE("train: AdamW matches the update written out", "[train]") {
  train::adamw_options opt;
  opt.lr = 0.1;
  opt.beta1 = 0.8;
  opt.beta2 = 0.9;
  opt.eps = 1e-3;
  opt.weight_decay = 0.5;
  std::vector<double> p{1.0, -2.0, 0.5}, g(3), q{3.0};
  std::vector<double> gq(1);
  train::adamw<double> adam(opt);
  adam.add(p, g, true);
  adam.add(q, gq, false);  // no decay
  CHECK(adam.size() == 4);
  const std::vector<std::vector<double>> grads{{0.3, -1.0, 0.0}, {-0.2, 0.4, 2.0}};
  const std::vector<double> gqs{1.5, -0.5};
  std::vector<double> ref = p, m(3, 0), v(3, 0);
  double rq = q[0], mq = 0, vq = 0;
  for (int t = 1; t <= 2; ++t) {
    g = grads[static_cast<std::size_t>(t - 1)];
    gq[0] = gqs[static_cast<std::size_t>(t - 1)];
    adam.step();
    const double bc1 = 1 - std::pow(0.8, t), bc2 = 1 - std::pow(0.9, t);
    for (std::size_t i = 0; i < 3; ++i) {
      ref[i] *= 1 - 0.1 * 0.5;
      m[i] = 0.8 * m[i] + 0.2 * g[i];
      v[i] = 0.9 * v[i] + 0.1 * g[i] * g[i];
      ref[i] -= 0.1 * (m[i] / bc1) / (std::sqrt(v[i] / bc2) + 1e-3);
    }
    mq = 0.8 * mq + 0.2 * gq[0];
    vq = 0.9 * vq + 0.1 * gq[0] * gq[0];
    rq -= 0.1 * (mq / bc1) / (std::sqrt(vq / bc2) + 1e-3);
    for (std::size_t i = 0; i < 3; ++i) CHECK(p[i] == Approx(ref[i]).epsilon(1e-14));
    CHECK(q[0] == Approx(rq).epsilon(1e-14));
  }
  CHECK(adam.steps() == 2);
  // clipping scales every gradient by max_norm / ‖g‖
  g = {3.0, 0.0, 0.0};
  gq[0] = 4.0;
  CHECK(adam.clip_grad_norm(1.0) == Approx(5.0));
  CHECK(g[0] == Approx(0.6));
  CHECK(gq[0] == Approx(0.8));
  adam.zero_grad();
  CHECK(g[0] == 0.0);
  CHECK(gq[0] == 0.0);
  std::vector<double> short_grad(2);
  CHECK_THROWS_WITH(adam.add(p, short_grad),
                    Catch::Contains("train::adamw::add") && Catch::Contains("'grad'"));
  train::adamw_options bad;
  bad.beta2 = 1.0;
  CHECK_THROWS_WITH(train::adamw<double>(bad), Catch::Contains("opt.beta2"));
}

TEST_CASE("train: tiny_lm gradients match finite differences for gla, gdn and softmax", "[train]") {
  const bool small = testing::sanitized_build;
  // ~1700 forwards of a tiny model: one thread (parallel regions of a few hundred values cost
  // more than they save, and far more on a loaded machine); threads are the next test's
  const seqmix::scoped_num_threads one_thread(1);
  for (auto kind : {train::mixer_kind::gla, train::mixer_kind::gdn, train::mixer_kind::softmax}) {
    train::model_config cfg;
    cfg.mixer = kind;
    cfg.vocab = 11;
    cfg.dim = 8;
    cfg.layers = 2;
    cfg.heads = 2;
    cfg.head_dim = 4;
    cfg.conv_taps = 3;
    cfg.mlp_hidden = 12;
    cfg.chunk_size = 4;  // several chunks at T = 10
    cfg.init_std = 0.5;  // big enough that every path carries gradient
    cfg.gla_gate_bias = 0.5;
    cfg.seed = 11;
    train::tiny_lm<double> model(cfg);
    const index_t B = 2, T = 10;
    auto rng = make_rng(8);
    std::uniform_int_distribution<int> tok(0, 10);
    std::vector<std::int32_t> ids(B * T), tgt(B * T, -1);
    for (auto& i : ids) i = tok(rng);
    for (index_t i = 3; i < B * T; i += 3) tgt[static_cast<std::size_t>(i)] = tok(rng);
    model.zero_grad();
    const auto res = model.forward_backward(ids, tgt, B, T, true);
    REQUIRE(std::isfinite(res.loss));
    auto loss = [&] { return model.forward_backward(ids, tgt, B, T, false).loss; };
    double worst = 0;
    for (std::size_t p = 0; p < model.params().size(); ++p) {
      auto& prm = *model.params()[p];
      const tensor<double, 2> g = prm.grad;  // the backward's, kept: FD reruns the forward only
      const double e = fd_error(prm.value, g, loss, small ? 4 : 24, p, 1e-6);
      INFO("mixer " << static_cast<int>(kind) << " param " << prm.name << " rel err " << e);
      CHECK(e < 1e-6);
      worst = std::max(worst, e);
    }
    INFO("tiny_lm mixer " << static_cast<int>(kind) << ": worst FD rel err " << worst);
    CHECK(worst < 1e-6);
  }
}

TEST_CASE("train: tiny_lm in float matches double (loss and every gradient)", "[train]") {
  const bool small = testing::sanitized_build;
  const seqmix::scoped_num_threads one_thread(1);
  for (auto kind : {train::mixer_kind::gla, train::mixer_kind::gdn, train::mixer_kind::softmax}) {
    train::model_config cfg;
    cfg.mixer = kind;
    cfg.vocab = 40;
    cfg.dim = 32;
    cfg.heads = 2;
    cfg.head_dim = 16;
    cfg.mlp_hidden = 48;
    cfg.chunk_size = 16;
    cfg.init_std = 0.2;
    cfg.seed = 5;
    const index_t B = 2, T = small ? 24 : 80;
    train::tiny_lm<double> md(cfg);
    train::tiny_lm<float> mf(cfg);
    auto rng = make_rng(9);
    std::uniform_int_distribution<int> tok(0, 39);
    std::vector<std::int32_t> ids(B * T), tgt(B * T, -1);
    for (auto& i : ids) i = tok(rng);
    for (index_t i = 1; i < B * T; i += 2) tgt[static_cast<std::size_t>(i)] = tok(rng);
    md.zero_grad();
    mf.zero_grad();
    const auto rd = md.forward_backward(ids, tgt, B, T);
    const auto rf = mf.forward_backward(ids, tgt, B, T);
    CHECK(rf.loss == Approx(rd.loss).epsilon(1e-5));
    for (std::size_t p = 0; p < md.params().size(); ++p) {
      const auto c = testing::compare(md.params()[p]->grad, mf.params()[p]->grad);
      INFO("mixer " << static_cast<int>(kind) << " grad of " << md.params()[p]->name << ": "
                    << c.report);
      CHECK(c.rel_rms < 2e-4);
    }
  }
}

TEST_CASE("train: blocks give the same bits on 1 and 2 threads", "[train]") {
  auto rng = make_rng(10);
  const index_t B = 3, T = 100, M = B * T, D = 128, F = 160, V = 300, W = 4;
  const auto x = random_normal<float, 2>({M, D}, rng);
  const auto w = random_normal<float, 1>({D}, rng);
  const auto dy = random_normal<float, 2>({M, D}, rng);
  const auto wl = random_normal<float, 2>({F, D}, rng, 0.1);
  const auto dyl = random_normal<float, 2>({M, F}, rng);
  const auto cw = random_normal<float, 2>({D, W}, rng);
  const auto logits = random_normal<float, 2>({M, V}, rng, 2.0);
  std::vector<std::int32_t> tg(static_cast<std::size_t>(M));
  for (index_t i = 0; i < M; ++i)
    tg[static_cast<std::size_t>(i)] = static_cast<std::int32_t>((i * 7) % V);
  struct outs {
    tensor<float, 2> y, dx, dxl, dwl, dl, ld;
    tensor<float, 1> dw, db;
    tensor<float, 3> cy, cdx;
    tensor<float, 2> cdw;
    double loss = 0;
  };
  auto run = [&](int threads) {
    const seqmix::scoped_num_threads nt(threads);
    if (threads > 1) testing::require_team(threads);
    outs o;
    o.y = tensor<float, 2>({M, D});
    o.dx = tensor<float, 2>({M, D});
    o.dw = tensor<float, 1>({D});
    train::rms_norm_forward<float>(x, w, o.y);
    train::rms_norm_backward<float>(x, w, dy, o.dx, o.dw);
    o.dxl = tensor<float, 2>({M, D});
    o.dwl = tensor<float, 2>({F, D});
    o.db = tensor<float, 1>({F});
    train::linear_backward<float>(x, wl, dyl, o.dxl, o.dwl, o.db);
    const auto x3 = x.view().reshape<3>({B, T, D});
    const auto dy3 = dy.view().reshape<3>({B, T, D});
    o.cy = tensor<float, 3>({B, T, D});
    o.cdx = tensor<float, 3>({B, T, D});
    o.cdw = tensor<float, 2>({D, W});
    train::short_conv_forward<float>(x3, cw, o.cy);
    train::short_conv_backward<float>(x3, cw, dy3, o.cdx, o.cdw);
    o.dl = tensor<float, 2>({M, V});
    o.loss = train::softmax_cross_entropy<float>(logits, tg, o.dl).loss;
    return o;
  };
  const outs a = run(1), b = run(2);
  CHECK(testing::bitwise_equal(a.y, b.y));
  CHECK(testing::bitwise_equal(a.dx, b.dx));
  CHECK(testing::bitwise_equal(a.dw, b.dw));
  CHECK(testing::bitwise_equal(a.dxl, b.dxl));
  CHECK(testing::bitwise_equal(a.dwl, b.dwl));
  CHECK(testing::bitwise_equal(a.db, b.db));
  CHECK(testing::bitwise_equal(a.cy, b.cy));
  CHECK(testing::bitwise_equal(a.cdx, b.cdx));
  CHECK(testing::bitwise_equal(a.cdw, b.cdw));
  CHECK(testing::bitwise_equal(a.dl, b.dl));
  CHECK(a.loss == b.loss);
}
