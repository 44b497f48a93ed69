// SPDX-License-Identifier: MIT
// linalg::matmul against a double reference: odd sizes on both paths (decode M <= 8 and the
// blocked GEMM, K across several KC blocks), every epilogue, accumulate vs overwrite, strided
// views, bf16 weights, bitwise thread invariance, argument errors, and Eigen's global state;
// packed_weights: the same bits as the unpacked GEMM for M > 8 and for every row at any M.
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include <Eigen/Core>

#include <seqmix/core/matmul.hpp>
#include <seqmix/core/packed_weights.hpp>

#include "alloc_counter.hpp"
#include "testing.hpp"

using namespace seqmix;
using linalg::activation;
using linalg::matmul_options;
using linalg::matmul_precision;

namespace {

double act_ref(activation act, double x) {
  switch (act) {
    case activation::silu:
      return x / (1.0 + std::exp(-x));
    case activation::gelu:
      return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0)));
    case activation::gelu_tanh:
      return 0.5 * x * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
    case activation::none:
      break;
  }
  return x;
}

const char* act_name(activation act) {
  switch (act) {
    case activation::silu:
      return "silu";
    case activation::gelu:
      return "gelu";
    case activation::gelu_tanh:
      return "gelu_tanh";
    case activation::none:
      break;
  }
  return "none";
}

/// Inputs of one case, stored in over-sized buffers so views can be strided.
struct problem {
  index_t M, N, K;
  std::vector<float> a, b, c, c0, bias, scale, res;
  std::vector<bf16> b16;
  tensor_view<const float, 2> av;
  tensor_view<const float, 2> bv;
  tensor_view<const bf16, 2> b16v;
  tensor_view<float, 2> cv;
  tensor_view<const float, 1> biasv, scalev;
  tensor_view<const float, 2> resv;

  // layout: 0 contiguous; 1 padded rows (A, B, C, residual row strides > extent);
  // 2 A transposed in memory (inner stride M), C with column stride 2 (scalar epilogue path).
  problem(index_t m, index_t n, index_t k, int layout, std::mt19937_64& rng) : M(m), N(n), K(k) {
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    auto fill = [&](std::vector<float>& v, std::size_t size) {
      v.resize(size);
      for (auto& x : v) x = u(rng);
    };
    const index_t pad = layout == 1 ? 5 : 0;
    fill(a, static_cast<std::size_t>(M * (K + pad) + 1));
    fill(b, static_cast<std::size_t>(N * (K + pad) + 1));
    fill(bias, static_cast<std::size_t>(2 * N + 1));
    fill(scale, static_cast<std::size_t>(M));
    const index_t cs = layout == 2 ? 2 : 1;
    fill(c0, static_cast<std::size_t>(M * (N * cs + pad) + 1));
    c = c0;
    fill(res, static_cast<std::size_t>(M * (N + pad) + 1));
    b16.resize(b.size());
    for (std::size_t i = 0; i < b.size(); ++i) {
      b16[i] = bf16_from_float(b[i]);
    }
    if (layout == 2) {
      av = {a.data(), {M, K}, {1, M}};
    } else {
      av = {a.data(), {M, K}, {K + pad, 1}};
    }
    bv = {b.data(), {N, K}, {K + pad, 1}};
    b16v = {b16.data(), {N, K}, {K + pad, 1}};
    cv = {c.data(), {M, N}, {N * cs + pad, cs}};
    biasv = layout == 2 ? tensor_view<const float, 1>{bias.data(), {N}, {2}}
                        : tensor_view<const float, 1>{bias.data(), {N}};
    scalev = {scale.data(), {M}};
    resv = {res.data(), {M, N}, {N + pad, 1}};
  }

  void reset_c() { c = c0; }

  /// Checks cv against the double reference (weights widened from bf16 when `bf16_weights`).
  void check(const matmul_options& o, bool bf16_weights, bool round_a) const {
    index_t bad = 0;
    double worst = 0;
    for (index_t i = 0; i < M; ++i) {
      for (index_t j = 0; j < N; ++j) {
        double s = 0, mag = 0;
        for (index_t k = 0; k < K; ++k) {
          double x = av(i, k);
          if (round_a) x = to_float(bf16_from_float(static_cast<float>(x)));
          const double w = bf16_weights ? double(to_float(b16v(j, k))) : double(bv(j, k));
          s += x * w;
          mag += std::abs(x * w);
        }
        if (o.bias.data()) {
          s += o.bias(j);
          mag += std::abs(o.bias(j));
        }
        double v = act_ref(o.act, s);
        double tol_mag = mag;
        if (o.row_scale.data()) {
          v *= o.row_scale(i);
          tol_mag *= std::abs(o.row_scale(i));
        }
        if (o.residual.data()) {
          // residual may be c itself: read the saved input
          const double r = o.residual.data() == cv.data() ? double(c0at(i, j)) : o.residual(i, j);
          v += r;
          tol_mag += std::abs(r);
        }
        if (o.accumulate) {
          v += c0at(i, j);
          tol_mag += std::abs(c0at(i, j));
        }
        const double err = std::abs(double(cv(i, j)) - v);
        const double tol = 2e-6 * (tol_mag + 1.0) + 1e-6 * double(K) * 1e-3 * tol_mag;
        worst = std::max(worst, err / tol);
        if (!(err <= tol)) ++bad;
      }
    }
    INFO("M=" << M << " N=" << N << " K=" << K << " act=" << act_name(o.act)
              << " worst err/tol=" << worst);
    REQUIRE(bad == 0);
  }

  float c0at(index_t i, index_t j) const {
    return c0[static_cast<std::size_t>(i * cv.stride(0) + j * cv.stride(1))];
  }
};

void run_and_check(problem& p, const matmul_options& o, bool bf16_weights = false) {
  p.reset_c();
  if (bf16_weights) {
    linalg::matmul(p.av, p.b16v, p.cv, o);
  } else {
    linalg::matmul(p.av, p.bv, p.cv, o);
  }
  p.check(o, bf16_weights, o.precision == matmul_precision::bf16_dot);
}

}  // namespace

namespace {

/// call() must throw a shape_error whose message names the function `fn` (if not empty) and
/// the argument `arg`.
template <class F>
void expect_arg_error(F&& call, const std::string& fn, const std::string& arg) {
  try {
    call();
    FAIL("no error for argument " << arg);
  } catch (const shape_error& e) {
    const std::string msg = e.what();
    INFO(msg);
    if (!fn.empty()) REQUIRE(msg.find(fn) != std::string::npos);
    REQUIRE(msg.find("argument '" + arg + "'") != std::string::npos);
  }
}

}  // namespace

TEST_CASE("matmul: odd sizes against a double reference", "[core][matmul]") {
  auto rng = testing::make_rng(1);
  for (index_t M : {1, 2, 3, 5, 8, 9, 13, 17, 65}) {
    for (index_t N : {1, 3, 17, 33, 65}) {
      for (index_t K : {1, 3, 17, 65, 257}) {
        problem p(M, N, K, 0, rng);
        run_and_check(p, {});
      }
    }
  }
  // larger: several MC row blocks, KC depth blocks and NC column slabs
  for (auto [M, N, K] :
       {std::array<index_t, 3>{257, 257, 257}, {200, 100, 600}, {31, 1100, 70}, {300, 40, 513}}) {
    problem p(M, N, K, 0, rng);
    run_and_check(p, {});
  }
}

TEST_CASE("matmul: edge sizes 1, 7, 15, 17, 33, 65 with epilogues, f32 and bf16 weights",
          "[core][matmul]") {
  // every M, N, K of {1, 7, 15, 17, 33, 65}: partial register tiles in both directions (MR = 12,
  // NR = 32 on AVX-512), both paths (M <= 8 decode, M > 8 blocked), the prefetch running past
  // the last panel; one epilogue combination per case, cycled, and bf16 weights on every
  // other case
  auto rng = testing::make_rng(11);
  const std::array<index_t, 6> sizes{1, 7, 15, 17, 33, 65};
  const std::array<activation, 4> acts{activation::none, activation::silu, activation::gelu,
                                       activation::gelu_tanh};
  int n = 0;
  for (index_t M : sizes) {
    for (index_t N : sizes) {
      for (index_t K : sizes) {
        problem p(M, N, K, n % 3, rng);
        matmul_options o;
        o.act = acts[static_cast<std::size_t>(n % 4)];
        const int mask = (n * 7) % 16;
        if (mask & 1) o.bias = p.biasv;
        if (mask & 2) o.row_scale = p.scalev;
        if (mask & 4) o.residual = p.resv;
        o.accumulate = (mask & 8) != 0;
        INFO("M " << M << " N " << N << " K " << K << " layout " << n % 3 << " mask " << mask
                  << " act " << act_name(o.act));
        run_and_check(p, o, n % 2 == 1);
        ++n;
      }
    }
  }
  // K across several KC blocks (256) with the epilogue applied after the last one
  for (auto [M, N, K] : {std::array<index_t, 3>{65, 33, 1025}, {17, 65, 513}}) {
    problem p(M, N, K, 0, rng);
    matmul_options o;
    o.act = activation::gelu;
    o.bias = p.biasv;
    o.residual = p.resv;
    o.accumulate = true;
    run_and_check(p, o);
    run_and_check(p, o, true);
  }
}

TEST_CASE("matmul: every epilogue, accumulate and overwrite", "[core][matmul]") {
  auto rng = testing::make_rng(2);
  for (auto [M, N, K] : {std::array<index_t, 3>{3, 37, 70}, {37, 70, 300}}) {
    for (int layout : {0, 1, 2}) {
      problem p(M, N, K, layout, rng);
      for (activation act :
           {activation::none, activation::silu, activation::gelu, activation::gelu_tanh}) {
        for (int mask = 0; mask < 16; ++mask) {
          matmul_options o;
          o.act = act;
          if (mask & 1) o.bias = p.biasv;
          if (mask & 2) o.row_scale = p.scalev;
          if (mask & 4) o.residual = p.resv;
          o.accumulate = (mask & 8) != 0;
          INFO("layout " << layout << " mask " << mask);
          run_and_check(p, o);
        }
      }
      // in-place residual: residual is c itself
      matmul_options o;
      o.residual = p.cv;
      o.act = activation::silu;
      run_and_check(p, o);
    }
  }
}

TEST_CASE("matmul: activations over a wide input range", "[core][matmul]") {
  // One column of ones in B and K = 1 makes the product equal A, so the epilogue sees A's values.
  const index_t M = 9, N = 1000;
  std::vector<float> a(static_cast<std::size_t>(M)), b(static_cast<std::size_t>(N), 1.0f);
  std::vector<float> bias(static_cast<std::size_t>(N)), c(static_cast<std::size_t>(M * N));
  for (index_t j = 0; j < N; ++j) bias[static_cast<std::size_t>(j)] = -30.0f + 0.06f * float(j);
  for (index_t i = 0; i < M; ++i) a[static_cast<std::size_t>(i)] = 0.01f * float(i);
  for (activation act : {activation::silu, activation::gelu, activation::gelu_tanh}) {
    matmul_options o;
    o.act = act;
    o.bias = {bias.data(), {N}};
    linalg::matmul({a.data(), {M, 1}}, {b.data(), {N, 1}}, {c.data(), {M, N}}, o);
    for (index_t i = 0; i < M; ++i) {
      for (index_t j = 0; j < N; ++j) {
        const double x = double(a[static_cast<std::size_t>(i)] + bias[static_cast<std::size_t>(j)]);
        const double ref = act_ref(act, x);
        const double got = c[static_cast<std::size_t>(i * N + j)];
        INFO(act_name(act) << " x=" << x << " got " << got << " ref " << ref);
        REQUIRE(std::abs(got - ref) <= 4e-7 * std::max(1.0, std::abs(x)));
      }
    }
  }
}

TEST_CASE("matmul: bf16 weights equal f32 on the widened weights", "[core][matmul]") {
  auto rng = testing::make_rng(3);
  for (auto [M, N, K] :
       {std::array<index_t, 3>{1, 65, 257}, {4, 17, 33}, {8, 3, 1}, {17, 65, 300}, {65, 257, 65}}) {
    for (int layout : {0, 1}) {
      problem p(M, N, K, layout, rng);
      matmul_options o;
      o.bias = p.biasv;
      o.act = activation::gelu;
      run_and_check(p, o, true);
      const std::vector<float> got16 = p.c;
      // the f32 path on the widened weights: bitwise the same
      std::vector<float> wide(p.b16.size());
      for (std::size_t i = 0; i < wide.size(); ++i) wide[i] = to_float(p.b16[i]);
      p.reset_c();
      linalg::matmul(p.av, tensor_view<const float, 2>{wide.data(), {N, K}, p.bv.strides()}, p.cv,
                     o);
      REQUIRE(std::memcmp(got16.data(), p.c.data(), got16.size() * sizeof(float)) == 0);
    }
  }
}

TEST_CASE("matmul: bf16_dot precision rounds A to bf16", "[core][matmul]") {
  auto rng = testing::make_rng(4);
  for (auto [M, N, K] :
       {std::array<index_t, 3>{1, 65, 257}, {5, 17, 33}, {17, 65, 300}, {65, 100, 513}}) {
    problem p(M, N, K, 0, rng);
    matmul_options o;
    o.precision = matmul_precision::bf16_dot;
    o.bias = p.biasv;
    run_and_check(p, o, true);
  }
}

TEST_CASE("matmul: bitwise identical for 1, 2, 3 and 7 threads", "[core][matmul][threads]") {
  auto rng = testing::make_rng(5);
  for (auto [M, N, K] : {std::array<index_t, 3>{1, 300, 100},
                         {7, 129, 65},
                         {9, 31, 300},
                         {100, 200, 300},
                         {257, 40, 70},
                         {70, 1100, 40}}) {
    problem p(M, N, K, 1, rng);
    for (int mode : {0, 1, 2}) {  // f32 weights, bf16 weights, bf16 weights with bf16_dot
      const bool use16 = mode > 0;
      matmul_options o;
      o.bias = p.biasv;
      o.act = activation::silu;
      o.residual = p.resv;
      if (mode == 2) o.precision = matmul_precision::bf16_dot;
      std::vector<float> one;
      for (int threads : {1, 2, 3, 7}) {
        scoped_num_threads scope(threads);
        if (threads > 1) testing::require_team(threads);
        p.reset_c();
        if (use16) {
          linalg::matmul(p.av, p.b16v, p.cv, o);
        } else {
          linalg::matmul(p.av, p.bv, p.cv, o);
        }
        if (threads == 1) {
          one = p.c;
        } else {
          INFO("M=" << M << " N=" << N << " K=" << K << " mode " << mode << " threads=" << threads);
          REQUIRE(std::memcmp(one.data(), p.c.data(), one.size() * sizeof(float)) == 0);
        }
      }
    }
  }
}

TEST_CASE("matmul: steady-state calls allocate nothing", "[core][matmul]") {
  auto rng = testing::make_rng(6);
  for (auto [M, N, K] : {std::array<index_t, 3>{1, 300, 100}, {100, 200, 300}}) {
    problem p(M, N, K, 2, rng);  // strided A: also exercises the A copy
    matmul_options o;
    o.bias = p.biasv;
    matmul_options dot = o;
    dot.precision = matmul_precision::bf16_dot;
    linalg::matmul(p.av, p.bv, p.cv, o);
    linalg::matmul(p.av, p.b16v, p.cv, dot);
    testing::allocation_scope scope;
    linalg::matmul(p.av, p.bv, p.cv, o);
    linalg::matmul(p.av, p.b16v, p.cv, o);
    linalg::matmul(p.av, p.b16v, p.cv, dot);
    REQUIRE(scope.stats().count == 0);
  }
}

TEST_CASE("matmul: bad arguments throw shape_error naming them", "[core][matmul][errors]") {
  std::vector<float> buf(4096, 0.5f);
  std::vector<bf16> buf16(4096);
  float* d = buf.data();
  const tensor_view<const float, 2> a(d, {4, 8});
  const tensor_view<const float, 2> b(d + 100, {6, 8});
  const tensor_view<float, 2> c(d + 1000, {4, 6});
  auto expect = [](auto&& call, const std::string& arg) {
    expect_arg_error(call, "seqmix::linalg::matmul", arg);
  };
  expect([&] { linalg::matmul(a, tensor_view<const float, 2>(d + 100, {6, 7}), c); }, "b");
  expect([&] { linalg::matmul(a, b, tensor_view<float, 2>(d + 1000, {4, 5})); }, "c");
  expect([&] { linalg::matmul(a, b, tensor_view<float, 2>(d + 1000, {3, 6})); }, "c");
  expect(
      [&] {
        linalg::matmul(a, tensor_view<const float, 2>(d + 100, {6, 8}, {1, 6}), c);
      },
      "b");  // weights must have inner-contiguous rows
  expect([&] { linalg::matmul(a, b, c, {.bias = {d + 200, {5}}}); }, "bias");
  expect([&] { linalg::matmul(a, b, c, {.row_scale = {d + 200, {6}}}); }, "row_scale");
  expect([&] { linalg::matmul(a, b, c, {.residual = {d + 200, {6, 4}}}); }, "residual");
  expect([&] { linalg::matmul(a, b, c, {.residual = {d + 1001, {4, 6}}}); }, "residual");
  expect([&] { linalg::matmul(a, b, tensor_view<float, 2>(d + 10, {4, 6})); }, "c");   // aliases a
  expect([&] { linalg::matmul(a, b, tensor_view<float, 2>(d + 120, {4, 6})); }, "c");  // aliases b
  expect([&] { linalg::matmul(a, b, tensor_view<float, 2>(d + 1000, {4, 6}, {6, 0})); }, "c");
  expect([&] { linalg::matmul(a, b, c, {.precision = matmul_precision::bf16_dot}); }, "options");
  expect([&] { linalg::matmul(a, tensor_view<const bf16, 2>(buf16.data(), {6, 9}), c); }, "b");
  // the message gives expected and actual shapes
  try {
    linalg::matmul(a, tensor_view<const float, 2>(d + 100, {6, 7}), c);
  } catch (const shape_error& e) {
    const std::string msg = e.what();
    REQUIRE(msg.find("expected shape [") != std::string::npos);
    REQUIRE(msg.find(", 8], got [6, 7]") != std::string::npos);
  }
}

TEST_CASE("matmul: empty extents", "[core][matmul]") {
  std::vector<float> buf(64, 1.0f), c(64, 7.0f), bias(8, 0.25f);
  // K = 0: the product is zero and the epilogue still applies
  linalg::matmul(tensor_view<const float, 2>(buf.data(), {3, 0}),
                 tensor_view<const float, 2>(buf.data() + 10, {4, 0}),
                 tensor_view<float, 2>(c.data(), {3, 4}), {.bias = {bias.data(), {4}}});
  for (index_t i = 0; i < 12; ++i) REQUIRE(c[static_cast<std::size_t>(i)] == 0.25f);
  // M = 0 or N = 0: nothing is written
  linalg::matmul(tensor_view<const float, 2>(buf.data(), {0, 5}),
                 tensor_view<const float, 2>(buf.data() + 10, {4, 5}),
                 tensor_view<float, 2>(c.data() + 20, {0, 4}));
  REQUIRE(c[20] == 7.0f);
}

TEST_CASE("Eigen's thread setting is never touched by seqmix", "[core][matmul][eigen]") {
  // seqmix's own targets compile with EIGEN_DONT_PARALLELIZE (root CMakeLists.txt,
  // seqmix_target_defaults): Eigen then never starts an OpenMP team of its own. Without the
  // definition, Eigen::nbThreads() follows OpenMP, and this test would catch any seqmix call
  // that wrote it (Eigen::setNbThreads is process-wide).
#if !defined(EIGEN_DONT_PARALLELIZE)
  FAIL("seqmix's targets must compile with EIGEN_DONT_PARALLELIZE");
#endif
  const int eigen_before = Eigen::nbThreads();
#if SEQMIX_HAS_OPENMP
  const int omp_before = omp_get_max_threads();
#endif
  auto rng = testing::make_rng(7);
  {
    scoped_num_threads scope(2);
    problem p(70, 90, 300, 0, rng);
    linalg::matmul(p.av, p.bv, p.cv, {.act = activation::gelu});
    problem q(3, 90, 300, 0, rng);
    linalg::matmul(q.av, q.b16v, q.cv);
  }
  REQUIRE(Eigen::nbThreads() == eigen_before);
#if SEQMIX_HAS_OPENMP
  REQUIRE(omp_get_max_threads() == omp_before);
#endif
}

// ---- packed_weights ---------------------------------------------------------------------------

namespace {

/// matmul on packed weights of p's B (f32 or bf16) into p.cv.
void run_packed(problem& p, const linalg::packed_weights& pw, const matmul_options& o) {
  p.reset_c();
  linalg::matmul(p.av, pw, p.cv, o);
}

std::vector<float> rows_of(const problem& p, index_t m) {
  std::vector<float> out;
  for (index_t i = 0; i < m; ++i) {
    for (index_t j = 0; j < p.N; ++j) out.push_back(p.cv(i, j));
  }
  return out;
}

}  // namespace

TEST_CASE("packed_weights: against the double reference, every epilogue, both dtypes",
          "[core][matmul][packed]") {
  auto rng = testing::make_rng(11);
  for (auto [M, N, K] : {std::array<index_t, 3>{1, 65, 257},
                         {2, 33, 31},
                         {3, 17, 1},
                         {5, 100, 64},
                         {8, 31, 300},
                         {9, 65, 513},
                         {40, 257, 33},
                         {100, 45, 270}}) {
    for (int layout : {0, 1, 2}) {
      problem p(M, N, K, layout, rng);
      for (bool use16 : {false, true}) {
        const linalg::packed_weights pw =
            use16 ? linalg::packed_weights(p.b16v) : linalg::packed_weights(p.bv);
        REQUIRE(pw.rows() == N);
        REQUIRE(pw.cols() == K);
        REQUIRE(pw.is_bf16() == use16);
        for (int variant = 0; variant < 3; ++variant) {
          matmul_options o;
          if (variant == 0) {
            o.bias = p.biasv;
            o.act = activation::silu;
          } else if (variant == 1) {
            o.row_scale = p.scalev;
            o.residual = p.resv;
            o.act = activation::gelu_tanh;
          } else {
            o.accumulate = true;
            o.act = activation::gelu;
            if (use16) o.precision = matmul_precision::bf16_dot;
          }
          INFO("layout " << layout << " bf16 " << use16 << " variant " << variant);
          run_packed(p, pw, o);
          p.check(o, use16, o.precision == matmul_precision::bf16_dot);
        }
      }
    }
  }
}

TEST_CASE("packed_weights: M > 8 bitwise equal to the unpacked GEMM, each row the same for any M",
          "[core][matmul][packed]") {
  auto rng = testing::make_rng(12);
  for (auto [N, K] : {std::array<index_t, 2>{65, 257}, {31, 2}, {300, 1025}, {40, 7}}) {
    for (bool use16 : {false, true}) {
      problem p(21, N, K, 1, rng);
      const linalg::packed_weights pw =
          use16 ? linalg::packed_weights(p.b16v) : linalg::packed_weights(p.bv);
      matmul_options o;
      o.bias = p.biasv;
      o.act = activation::silu;
      // unpacked GEMM (M = 21 > 8)
      p.reset_c();
      if (use16) {
        linalg::matmul(p.av, p.b16v, p.cv, o);
      } else {
        linalg::matmul(p.av, p.bv, p.cv, o);
      }
      const std::vector<float> gemm = rows_of(p, 21);
      run_packed(p, pw, o);
      INFO("N=" << N << " K=" << K << " bf16 " << use16);
      REQUIRE(rows_of(p, 21) == gemm);
      // the decode path on the first m rows: the same bits as those rows of the GEMM
      for (index_t m = 1; m <= 9; ++m) {
        problem q = p;
        q.av = tensor_view<const float, 2>(p.a.data(), {m, K}, p.av.strides());
        q.cv = tensor_view<float, 2>(q.c.data(), {m, N}, p.cv.strides());
        q.reset_c();
        q.cv = tensor_view<float, 2>(q.c.data(), {m, N}, p.cv.strides());
        linalg::matmul(q.av, pw, q.cv, o);
        const std::vector<float> head(gemm.begin(), gemm.begin() + m * N);
        INFO("m=" << m);
        REQUIRE(rows_of(q, m) == head);
      }
    }
  }
#if defined(__AVX512BF16__)
  // bf16_dot, M > 8: the pair kernel on the stored pairs, as on pairs packed per call
  problem p(30, 77, 301, 0, rng);
  const linalg::packed_weights pw(p.b16v);
  matmul_options o;
  o.precision = matmul_precision::bf16_dot;
  p.reset_c();
  linalg::matmul(p.av, p.b16v, p.cv, o);
  const std::vector<float> raw = rows_of(p, 30);
  run_packed(p, pw, o);
  REQUIRE(rows_of(p, 30) == raw);
#endif
}

TEST_CASE("packed_weights: bitwise identical for 1, 2, 3 and 7 threads, no steady-state allocation",
          "[core][matmul][packed][threads]") {
  auto rng = testing::make_rng(13);
  for (auto [M, N, K] : {std::array<index_t, 3>{1, 300, 100},
                         {3, 129, 65},
                         {8, 1100, 40},
                         {100, 200, 300},
                         {257, 40, 70}}) {
    problem p(M, N, K, 1, rng);
    for (int mode : {0, 1, 2}) {
      const bool use16 = mode > 0;
      linalg::packed_weights pw;
      {
        scoped_num_threads scope(3);  // packing threaded too: the panels do not depend on it
        pw = use16 ? linalg::packed_weights(p.b16v) : linalg::packed_weights(p.bv);
      }
      matmul_options o;
      o.bias = p.biasv;
      o.residual = p.resv;
      if (mode == 2) o.precision = matmul_precision::bf16_dot;
      std::vector<float> one;
      for (int threads : {1, 2, 3, 7}) {
        scoped_num_threads scope(threads);
        if (threads > 1) testing::require_team(threads);
        run_packed(p, pw, o);
        if (threads == 1) {
          one = p.c;
          testing::allocation_scope alloc;
          run_packed(p, pw, o);
          REQUIRE(alloc.stats().count == 0);
        } else {
          INFO("M=" << M << " N=" << N << " K=" << K << " mode " << mode << " threads=" << threads);
          REQUIRE(std::memcmp(one.data(), p.c.data(), one.size() * sizeof(float)) == 0);
        }
      }
    }
  }
}

TEST_CASE("packed_weights: copies, empty weights and bad arguments",
          "[core][matmul][packed][errors]") {
  auto rng = testing::make_rng(14);
  problem p(12, 40, 33, 0, rng);
  const linalg::packed_weights pw(p.bv);
  const linalg::packed_weights copy = pw;  // deep copy, same panels
  REQUIRE(copy.bytes() == pw.bytes());
  // whole panels of NR columns (32 with AVX-512, 16 with AVX2), zero past N = 40
  constexpr index_t NR = linalg::matmul_detail::NR;
  const auto cols = static_cast<std::size_t>((40 + NR - 1) / NR * NR);
  REQUIRE(pw.bytes() == cols * 33 * 4);
  run_packed(p, pw, {});
  const std::vector<float> first = p.c;
  run_packed(p, copy, {});
  REQUIRE(first == p.c);
  REQUIRE(linalg::packed_weights(p.b16v).bytes() == cols * 17 * 4);  // 17 k-pairs

  const linalg::packed_weights none;
  REQUIRE(none.empty());
  std::vector<float> c(8, 3.0f);
  linalg::matmul(tensor_view<const float, 2>(c.data(), {2, 0}), none,
                 tensor_view<float, 2>(c.data() + 4, {2, 0}));
  REQUIRE(c[4] == 3.0f);

  auto expect = [](auto&& call, const std::string& arg) { expect_arg_error(call, "", arg); };
  std::vector<float> buf(4096, 0.5f);
  const tensor_view<const float, 2> a(buf.data(), {4, 8});
  const tensor_view<float, 2> cv(buf.data() + 1000, {4, 40});
  expect([&] { linalg::matmul(a, pw, cv); }, "b");  // K = 33 packed, a has 8
  const tensor_view<const float, 2> a33(buf.data(), {4, 33});
  expect([&] { linalg::matmul(a33, pw, tensor_view<float, 2>(buf.data() + 1000, {4, 39})); }, "c");
  expect([&] { linalg::matmul(a33, pw, cv, {.precision = matmul_precision::bf16_dot}); },
         "options");
  expect(
      [&] {
        linalg::packed_weights(tensor_view<const float, 2>(buf.data(), {6, 8}, {1, 6}));
      },
      "w");  // rows must be inner-contiguous
}

TEST_CASE("matmul_panels: a panel range gives those columns of matmul, bit for bit",
          "[core][matmul][packed]") {
  // ranges that split the panels as a caller's threads would, every epilogue option, both
  // dtypes, strided A and C; columns outside the range keep their values
  auto rng = testing::make_rng(15);
  constexpr index_t NR = linalg::packed_weights::panel_width();
  for (auto [M, N, K] : {std::array<index_t, 3>{1, 100, 65}, {3, 33, 7}, {8, 200, 130}}) {
    for (const int layout : {0, 2}) {
      problem p(M, N, K, layout, rng);
      for (const bool use_bf16 : {false, true}) {
        const linalg::packed_weights pw =
            use_bf16 ? linalg::packed_weights(p.b16v) : linalg::packed_weights(p.bv);
        for (const matmul_options& o :
             {matmul_options{}, matmul_options{.bias = p.biasv, .act = activation::silu},
              matmul_options{.row_scale = p.scalev, .accumulate = true},
              matmul_options{.act = activation::gelu, .residual = p.resv}}) {
          INFO("M=" << M << " N=" << N << " K=" << K << " layout " << layout << " bf16 "
                    << use_bf16);
          run_packed(p, pw, o);
          const std::vector<float> want = p.c;
          const index_t P = pw.panels();
          for (const index_t parts : {index_t(1), index_t(2), index_t(3)}) {
            p.reset_c();
            for (index_t t = 0; t < parts; ++t) {
              linalg::matmul_panels(p.av, pw, P * t / parts, P * (t + 1) / parts, p.cv, o);
            }
            REQUIRE(p.c == want);
          }
          // one range alone: the columns past it untouched
          p.reset_c();
          const index_t q1 = std::min<index_t>(P, 1);
          linalg::matmul_panels(p.av, pw, 0, q1, p.cv, o);
          for (index_t i = 0; i < M; ++i) {
            for (index_t j = 0; j < N; ++j) {
              const bool inside = j < q1 * NR;
              const auto at = static_cast<std::size_t>(i * p.cv.stride(0) + j * p.cv.stride(1));
              REQUIRE(p.cv(i, j) == (inside ? want[at] : p.c0at(i, j)));
            }
          }
        }
      }
    }
  }
  // bad arguments name the argument
  problem p(9, 40, 16, 0, rng);
  const linalg::packed_weights pw(p.bv);
  auto expect = [](auto&& call, const std::string& arg) {
    expect_arg_error(call, "seqmix::linalg::matmul_panels", arg);
  };
  expect([&] { linalg::matmul_panels(p.av, pw, 0, 1, p.cv); }, "a");  // M = 9 > 8
  const auto a8 = p.av.slice<0>(0, 8);
  const auto c8 = p.cv.slice<0>(0, 8);
  expect([&] { linalg::matmul_panels(a8, pw, 0, pw.panels() + 1, c8); }, "q0, q1");
  expect([&] { linalg::matmul_panels(a8, pw, 1, 0, c8); }, "q0, q1");
  expect([&] { linalg::matmul_panels(a8, pw, -1, 1, c8); }, "q0, q1");
}
