// SPDX-License-Identifier: MIT
// MoBA (mixers/moba.hpp, kernels/moba.hpp, reference/moba.hpp): golden cases from MoBA's own
// moba_attn_varlen_naive, reference vs the tiled prefill and the decode cache over odd sizes,
// prefill + steps == one call, snapshot / restore / truncate, 1 vs 2 threads bitwise, bad input.
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include <seqmix/mixers/moba.hpp>
#include <seqmix/reference/attention.hpp>
#include <seqmix/reference/moba.hpp>

#include "../support/alloc_counter.hpp"
#include "../support/golden.hpp"
#include "../support/testing.hpp"

using seqmix::index_t;
using seqmix::moba_attention;
using seqmix::moba_cache;
using seqmix::shape_error;
using seqmix::tensor;
namespace st = seqmix::testing;

namespace {

struct geo {
  index_t B, T, H, Hkv, K, V, c, k;
};

template <class T>
struct inputs {
  tensor<T, 4> q, k, v;
};

template <class T>
inputs<T> make_inputs(const geo& g, std::uint64_t salt) {
  auto rng = st::make_rng(salt);
  return {st::random_normal<T, 4>({g.B, g.T, g.H, g.K}, rng),
          st::random_normal<T, 4>({g.B, g.T, g.Hkv, g.K}, rng),
          st::random_normal<T, 4>({g.B, g.T, g.Hkv, g.V}, rng)};
}

template <class T>
moba_attention<T> mixer(const geo& g) {
  typename moba_attention<T>::options o;
  o.chunk_size = g.c;
  o.top_k = g.k;
  return moba_attention<T>(o);
}

tensor<double, 4> reference(const inputs<double>& in, const geo& g) {
  tensor<double, 4> o({g.B, g.T, g.H, g.V});
  seqmix::reference::moba_attention<double>(in.q.view(), in.k.view(), in.v.view(), o.view(), g.c,
                                            g.k);
  return o;
}

// T not a multiple of c, GQA groups 1/2/4, K != V, B > 1, a chunk larger than the query tile,
// top-k larger than the number of chunks, top-k 1 (own chunk only)
const geo sweep[] = {{2, 77, 4, 4, 16, 24, 8, 3},   {1, 150, 8, 2, 32, 32, 16, 4},
                     {2, 100, 4, 2, 33, 17, 12, 5}, {1, 300, 2, 1, 16, 16, 100, 2},
                     {1, 90, 4, 1, 8, 8, 7, 20},    {2, 61, 2, 2, 16, 16, 10, 1},
                     {1, 260, 2, 1, 64, 64, 32, 3}};

}  // namespace

TEST_CASE("moba: golden moba.case0/1 (MoBA moba_attn_varlen_naive)", "[moba][golden]") {
  const auto& f = st::golden::file("v2/sparse_attn");
  const index_t chunk[] = {32, 64};
  for (int c = 0; c < 2; ++c) {
    const std::string n = "moba.case" + std::to_string(c) + ".";
    INFO(n);
    const auto q = f.get<float, 3>(n + "q");
    const auto k = f.get<float, 3>(n + "k");
    const auto v = f.get<float, 3>(n + "v");
    const auto o_ref = f.get<float, 3>(n + "o");
    const auto cu_t = f.get<index_t, 1>(n + "cu_seqlens");
    const std::vector<index_t> cu(cu_t.data(), cu_t.data() + cu_t.size());
    moba_attention<float>::options opt;
    opt.chunk_size = chunk[c];
    opt.top_k = 3;
    const moba_attention<float> m(opt);
    tensor<float, 3> o(o_ref.shape());
    m.forward(q.view(), k.view(), v.view(), o.view(), cu);
    SEQMIX_CHECK_CLOSE(o_ref, o, 1e-5);
    // the double reference agrees with MoBA's float32 naive code too
    const auto qd = st::cast<double>(q), kd = st::cast<double>(k), vd = st::cast<double>(v);
    tensor<double, 3> od(o_ref.shape());
    seqmix::reference::moba_attention<double>(qd.view(), kd.view(), vd.view(), od.view(), cu,
                                              chunk[c], 3);
    SEQMIX_CHECK_CLOSE(o_ref, od, 1e-5);
  }
}

TEST_CASE("moba: tiled prefill and selection == reference over odd sizes", "[moba]") {
  std::uint64_t salt = 1;
  for (const geo& g : sweep) {
    INFO("B " << g.B << " T " << g.T << " H " << g.H << " Hkv " << g.Hkv << " K " << g.K << " V "
              << g.V << " c " << g.c << " k " << g.k);
    auto in = make_inputs<double>(g, salt++);
    // every fifth query is zero: all its gates tie at 0 (the lowest chunk indices win)
    for (index_t b = 0; b < g.B; ++b)
      for (index_t t = 0; t < g.T; t += 5)
        for (index_t h = 0; h < g.H; ++h)
          for (index_t d = 0; d < g.K; ++d) in.q(b, t, h, d) = 0.0;
    const auto ref = reference(in, g);
    // double: the same selection exactly, outputs to rounding
    const auto md = mixer<double>(g);
    tensor<double, 4> od({g.B, g.T, g.H, g.V});
    md.forward(in.q.view(), in.k.view(), in.v.view(), od.view());
    SEQMIX_CHECK_CLOSE(ref, od, 1e-12);
    tensor<std::int32_t, 4> sel_ref({g.B, g.T, g.H, g.k - 1});
    seqmix::reference::moba_attention<double>(in.q.view(), in.k.view(), in.v.view(),
                                              seqmix::tensor_view<double, 4>{}, g.c, g.k,
                                              std::nullopt, sel_ref.view());
    const auto sel = md.selected_chunks(in.q.view(), in.k.view());
    CHECK(st::bitwise_equal(sel_ref, sel));
    // float
    const auto mf = mixer<float>(g);
    const auto qf = st::cast<float>(in.q), kf = st::cast<float>(in.k), vf = st::cast<float>(in.v);
    tensor<float, 4> of({g.B, g.T, g.H, g.V});
    mf.forward(qf.view(), kf.view(), vf.view(), of.view());
    SEQMIX_CHECK_CLOSE(ref, of, 2e-5);
    if ((g.T - 1) / g.c >= g.k) {  // some query drops chunks: the output is not dense attention
      tensor<double, 4> dense({g.B, g.T, g.H, g.V});
      seqmix::reference::softmax_attention<double>(in.q.view(), in.k.view(), in.v.view(),
                                                   dense.view());
      CHECK(st::compare(dense, od).rel_rms > 1e-2);
    }
  }
}

TEST_CASE("moba: packed varlen == reference (sequences shorter than a chunk, empty ones)",
          "[moba]") {
  const std::vector<index_t> cu{0, 5, 5, 75, 78, 208, 209};
  const index_t N = cu.back(), H = 4, Hkv = 2, K = 16, V = 20, c = 16, k = 3;
  auto rng = st::make_rng(77);
  const auto q = st::random_normal<double, 3>({N, H, K}, rng);
  const auto kk = st::random_normal<double, 3>({N, Hkv, K}, rng);
  const auto v = st::random_normal<double, 3>({N, Hkv, V}, rng);
  tensor<double, 3> ref({N, H, V}), od({N, H, V});
  seqmix::reference::moba_attention<double>(q.view(), kk.view(), v.view(), ref.view(), cu, c, k);
  const auto m = mixer<double>({1, N, H, Hkv, K, V, c, k});
  m.forward(q.view(), kk.view(), v.view(), od.view(), cu);
  SEQMIX_CHECK_CLOSE(ref, od, 1e-12);
  const auto mf = mixer<float>({1, N, H, Hkv, K, V, c, k});
  const auto qf = st::cast<float>(q), kf = st::cast<float>(kk), vf = st::cast<float>(v);
  tensor<float, 3> of({N, H, V});
  mf.forward(qf.view(), kf.view(), vf.view(), of.view(), cu);
  SEQMIX_CHECK_CLOSE(ref, of, 2e-5);
}

TEST_CASE("moba: prefill, prefill again, steps == one forward", "[moba]") {
  for (const geo& g : {geo{2, 181, 8, 2, 32, 24, 16, 4}, geo{1, 130, 4, 4, 16, 16, 64, 2}}) {
    const auto in = make_inputs<float>(g, 5);
    const auto m = mixer<float>(g);
    tensor<float, 4> full({g.B, g.T, g.H, g.V}), o({g.B, g.T, g.H, g.V});
    m.forward(in.q.view(), in.k.view(), in.v.view(), full.view());
    auto cache = m.make_cache(g.B, g.Hkv, g.K, g.V, 200);
    const auto part = [&](index_t a, index_t b) {
      return std::array{in.q.view().template slice<1>(a, b), in.k.view().template slice<1>(a, b),
                        in.v.view().template slice<1>(a, b)};
    };
    // prefill 45 (not a chunk multiple), 10 steps, prefill 30 more, steps to the end
    const index_t cuts[] = {45, 55, 85};
    {
      auto p = part(0, cuts[0]);
      m.forward(p[0], p[1], p[2], o.view().template slice<1>(0, cuts[0]), cache);
    }
    for (index_t t = cuts[0]; t < cuts[1]; ++t)
      m.step(in.q.view().template select<1>(t), in.k.view().template select<1>(t),
             in.v.view().template select<1>(t), o.view().template select<1>(t), cache);
    {
      auto p = part(cuts[1], cuts[2]);
      m.forward(p[0], p[1], p[2], o.view().template slice<1>(cuts[1], cuts[2]), cache);
    }
    auto p = part(cuts[2], g.T);
    m.forward_recurrent(p[0], p[1], p[2], o.view().template slice<1>(cuts[2], g.T), cache);
    CHECK(cache.length(0) == g.T);
    SEQMIX_CHECK_CLOSE(full, o, 1e-5);
    // the decode form selects bitwise the same chunks as the tiles: compare with the reference
    const auto ref =
        reference({st::cast<double>(in.q), st::cast<double>(in.k), st::cast<double>(in.v)}, g);
    SEQMIX_CHECK_CLOSE(ref, o, 2e-5);
  }
}

TEST_CASE("moba: snapshot, restore and truncate", "[moba]") {
  const geo g{2, 140, 4, 2, 16, 16, 16, 3};
  const auto in = make_inputs<float>(g, 9);
  const auto m = mixer<float>(g);
  tensor<float, 4> full({g.B, g.T, g.H, g.V});
  m.forward(in.q.view(), in.k.view(), in.v.view(), full.view());
  auto cache = m.make_cache(g.B, g.Hkv, g.K, g.V, g.T);
  tensor<float, 4> o({g.B, g.T, g.H, g.V}), o2({g.B, g.T, g.H, g.V});
  const auto sl = [&](const auto& t, index_t a, index_t b) {
    return t.view().template slice<1>(a, b);
  };
  m.forward(sl(in.q, 0, 50), sl(in.k, 0, 50), sl(in.v, 0, 50), o.view().template slice<1>(0, 50),
            cache);
  const auto snap = cache.snapshot();
  m.forward_recurrent(sl(in.q, 50, 90), sl(in.k, 50, 90), sl(in.v, 50, 90),
                      o.view().template slice<1>(50, 90), cache);
  cache.restore(snap);
  CHECK(cache.length(1) == 50);
  m.forward_recurrent(sl(in.q, 50, 90), sl(in.k, 50, 90), sl(in.v, 50, 90),
                      o2.view().template slice<1>(50, 90), cache);
  CHECK(st::bitwise_equal(tensor<float, 4>::copy_of(sl(o, 50, 90)),
                          tensor<float, 4>::copy_of(sl(o2, 50, 90))));
  // roll back to 37 (inside a chunk) and decode the rest: the one-call outputs
  cache.truncate(0, 37);
  cache.truncate(1, 37);
  m.forward_recurrent(sl(in.q, 37, g.T), sl(in.k, 37, g.T), sl(in.v, 37, g.T),
                      o.view().template slice<1>(37, g.T), cache);
  const auto tail_ref = tensor<float, 4>::copy_of(sl(full, 37, g.T));
  const auto tail = tensor<float, 4>::copy_of(sl(o, 37, g.T));
  SEQMIX_CHECK_CLOSE(tail_ref, tail, 1e-5);
  CHECK_THROWS_AS(cache.truncate(0, g.T + 1), shape_error);
  auto other = moba_attention<float>({8, 3, {}}).make_cache(g.B, g.Hkv, g.K, g.V, g.T);
  CHECK_THROWS_WITH(other.restore(snap),
                    Catch::Contains("moba_cache::restore") && Catch::Contains("s.chunk_size"));
}

TEST_CASE("moba: 1 vs 2 threads bitwise (forward, packed, step)", "[moba]") {
  const geo g{2, 203, 8, 2, 32, 32, 16, 4};
  const auto in = make_inputs<float>(g, 11);
  const auto m = mixer<float>(g);
  const auto run = [&](int threads) {
    const seqmix::scoped_num_threads nt(threads);
    if (threads > 1) st::require_team(threads);
    tensor<float, 4> o({g.B, g.T, g.H, g.V});
    m.forward(in.q.view(), in.k.view(), in.v.view(), o.view());
    tensor<float, 3> op({g.T, g.H, g.V});
    const std::vector<index_t> cu{0, 70, 71, g.T};
    m.forward(in.q.view().template select<0>(0), in.k.view().template select<0>(0),
              in.v.view().template select<0>(0), op.view(), cu);
    auto cache = m.make_cache(g.B, g.Hkv, g.K, g.V, g.T);
    tensor<float, 4> os({g.B, g.T, g.H, g.V});
    m.forward_recurrent(in.q.view(), in.k.view(), in.v.view(), os.view(), cache);
    return std::make_tuple(std::move(o), std::move(op), std::move(os));
  };
  const auto [a1, b1, c1] = run(1);
  const auto [a2, b2, c2] = run(2);
  CHECK(st::bitwise_equal(a1, a2));
  CHECK(st::bitwise_equal(b1, b2));
  CHECK(st::bitwise_equal(c1, c2));
}

TEST_CASE("moba: bad input gives clear errors", "[moba]") {
  using opts = moba_attention<float>::options;
  CHECK_THROWS_WITH(moba_attention<float>(opts{0, 3, {}}),
                    Catch::Contains("moba_attention") && Catch::Contains("options.chunk_size") &&
                        Catch::Contains("got 0"));
  CHECK_THROWS_WITH(moba_attention<float>(opts{16, 0, {}}),
                    Catch::Contains("options.top_k") && Catch::Contains("got 0"));
  CHECK_THROWS_AS(moba_attention<float>(opts{16, 2, std::numeric_limits<float>::quiet_NaN()}),
                  shape_error);
  const geo g{1, 40, 4, 2, 16, 16, 16, 3};
  const auto in = make_inputs<float>(g, 3);
  const auto m = mixer<float>(g);
  tensor<float, 4> o({g.B, g.T, g.H, g.V});
  tensor<float, 4> kbad({g.B, g.T, g.Hkv, g.K + 1}), k3({g.B, g.T, 3, g.K});
  CHECK_THROWS_WITH(m.forward(in.q.view(), kbad.view(), in.v.view(), o.view()),
                    Catch::Contains("moba_attention::forward") && Catch::Contains("'k'") &&
                        Catch::Contains("[1, 40, any, 16]") && Catch::Contains("[1, 40, 2, 17]"));
  CHECK_THROWS_WITH(m.forward(in.q.view(), k3.view(), in.v.view(), o.view()),
                    Catch::Contains("multiple of key/value heads"));
  tensor<float, 4> obad({g.B, g.T, g.H, g.V + 1});
  CHECK_THROWS_WITH(m.forward(in.q.view(), in.k.view(), in.v.view(), obad.view()),
                    Catch::Contains("'o'"));
  // packed: bad cu_seqlens
  const auto q3 = in.q.view().template select<0>(0), k3v = in.k.view().template select<0>(0),
             v3 = in.v.view().template select<0>(0);
  tensor<float, 3> o3({g.T, g.H, g.V});
  CHECK_THROWS_WITH(m.forward(q3, k3v, v3, o3.view(), std::vector<index_t>{0, 30, 20, 40}),
                    Catch::Contains("moba_attention::forward") && Catch::Contains("cu_seqlens") &&
                        Catch::Contains("non-decreasing"));
  CHECK_THROWS_WITH(m.forward(q3, k3v, v3, o3.view(), std::vector<index_t>{0, 30, 39}),
                    Catch::Contains("last offset must be T = 40, got 39"));
  CHECK_THROWS_WITH(m.forward(q3, k3v, v3, o3.view(), std::vector<index_t>{1, 40}),
                    Catch::Contains("first offset must be 0"));
  // in place
  CHECK_THROWS_WITH(m.forward(in.q.view(), in.k.view(), in.v.view(),
                              seqmix::tensor_view<float, 4>(const_cast<float*>(in.q.data()),
                                                            {g.B, g.T, g.H, g.V})),
                    Catch::Contains("must not share memory"));
  // caches: geometry, chunk size, capacity
  auto cache = m.make_cache(g.B, g.Hkv, g.K, g.V, 41);
  auto wrong_chunk = mixer<float>({1, 40, 4, 2, 16, 16, 8, 3}).make_cache(g.B, g.Hkv, g.K, g.V, 64);
  CHECK_THROWS_WITH(
      m.forward(in.q.view(), in.k.view(), in.v.view(), o.view(), wrong_chunk),
      Catch::Contains("'cache'") && Catch::Contains("chunk size 16") && Catch::Contains("got 8"));
  auto wrong_heads = m.make_cache(g.B, 1, g.K, g.V, 64);
  CHECK_THROWS_WITH(m.forward(in.q.view(), in.k.view(), in.v.view(), o.view(), wrong_heads),
                    Catch::Contains("'cache'") && Catch::Contains("[1, 2, 16, 16]"));
  m.forward(in.q.view(), in.k.view(), in.v.view(), o.view(), cache);
  tensor<float, 3> o1({g.B, g.H, g.V});
  m.step(in.q.view().template select<1>(0), in.k.view().template select<1>(0),
         in.v.view().template select<1>(0), o1.view(), cache);
  CHECK_THROWS_WITH(m.step(in.q.view().template select<1>(0), in.k.view().template select<1>(0),
                           in.v.view().template select<1>(0), o1.view(), cache),
                    Catch::Contains("moba_attention::step") && Catch::Contains("capacity 41"));
  tensor<float, 3> o1bad({g.B, g.H + 1, g.V});
  CHECK_THROWS_WITH(m.step(in.q.view().template select<1>(0), in.k.view().template select<1>(0),
                           in.v.view().template select<1>(0), o1bad.view(), cache),
                    Catch::Contains("'o1'"));
  CHECK_THROWS_WITH(moba_cache<float>(1, 1, 4, 4, 8, 0),
                    Catch::Contains("moba_cache") && Catch::Contains("chunk_size"));
  CHECK_THROWS_WITH(m.make_cache(1, 0, 4, 4, 8),
                    Catch::Contains("moba_attention::make_cache") && Catch::Contains("'Hkv'"));
}

TEST_CASE("moba: step allocates nothing after its first call", "[moba]") {
  const geo g{2, 150, 8, 2, 16, 16, 16, 3};
  const auto in = make_inputs<float>(g, 13);
  const auto m = mixer<float>(g);
  auto cache = m.make_cache(g.B, g.Hkv, g.K, g.V, g.T);
  tensor<float, 4> o({g.B, g.T, g.H, g.V});
  std::size_t count = 0;
  for (index_t t = 0; t < g.T; ++t) {
    seqmix::testing::allocation_scope scope;
    m.step(in.q.view().template select<1>(t), in.k.view().template select<1>(t),
           in.v.view().template select<1>(t), o.view().template select<1>(t), cache);
    if (t > 0) count += scope.stats().count;
  }
  CHECK(count == 0);
  CHECK(cache.storage_bytes() > cache.kv().storage_bytes());
}

TEST_CASE("moba: repeated prefills allocate nothing after the first", "[moba]") {
  const geo g{2, 150, 8, 2, 16, 16, 16, 3};
  const auto in = make_inputs<float>(g, 17);
  const auto m = mixer<float>(g);
  tensor<float, 4> o({g.B, g.T, g.H, g.V}), o2({g.B, g.T, g.H, g.V});
  tensor<float, 3> op({g.T, g.H, g.V});
  const std::vector<index_t> cu{0, 40, 41, g.T};
  for (int threads : {1, 2}) {
    INFO("threads " << threads);
    const seqmix::scoped_num_threads nt(threads);
    const auto packed = [&] {
      m.forward(in.q.view().template select<0>(0), in.k.view().template select<0>(0),
                in.v.view().template select<0>(0), op.view(), cu);
    };
    m.forward(in.q.view(), in.k.view(), in.v.view(), o.view());  // sizes the arenas
    packed();
    auto cache = m.make_cache(g.B, g.Hkv, g.K, g.V, g.T);
    m.forward(in.q.view(), in.k.view(), in.v.view(), o2.view(), cache);
    cache.reset();
    {
      seqmix::testing::allocation_scope scope;
      m.forward(in.q.view(), in.k.view(), in.v.view(), o2.view());
      packed();
      m.forward(in.q.view(), in.k.view(), in.v.view(), o2.view(), cache);
      CHECK(scope.stats().count == 0);
    }
    CHECK(st::bitwise_equal(o, o2));
  }
}

TEST_CASE("moba: a NaN key and an inf value at t0 never reach an output before t0", "[moba]") {
  const geo g{2, 150, 8, 2, 16, 16, 16, 3};
  const auto clean = make_inputs<float>(g, 17);
  auto bad = make_inputs<float>(g, 17);
  const index_t t0 = 70;  // inside chunk 4
  for (index_t b = 0; b < g.B; ++b)
    for (index_t h = 0; h < g.Hkv; ++h)
      for (index_t d = 0; d < g.K; ++d) {
        bad.k(b, t0, h, d) = std::numeric_limits<float>::quiet_NaN();
        bad.v(b, t0, h, d) = std::numeric_limits<float>::infinity();
      }
  const auto m = mixer<float>(g);
  const auto before = [&](const tensor<float, 4>& o) {
    return tensor<float, 4>::copy_of(o.view().template slice<1>(0, t0));
  };
  tensor<float, 4> o1({g.B, g.T, g.H, g.V}), o2({g.B, g.T, g.H, g.V});
  m.forward(clean.q.view(), clean.k.view(), clean.v.view(), o1.view());
  m.forward(bad.q.view(), bad.k.view(), bad.v.view(), o2.view());
  CHECK(st::all_finite(before(o2)));
  CHECK(st::bitwise_equal(before(o1), before(o2)));
  CHECK(!st::all_finite(o2));  // the token itself sees them
  auto c1 = m.make_cache(g.B, g.Hkv, g.K, g.V, g.T), c2 = m.make_cache(g.B, g.Hkv, g.K, g.V, g.T);
  m.forward_recurrent(clean.q.view(), clean.k.view(), clean.v.view(), o1.view(), c1);
  m.forward_recurrent(bad.q.view(), bad.k.view(), bad.v.view(), o2.view(), c2);
  CHECK(st::all_finite(before(o2)));
  CHECK(st::bitwise_equal(before(o1), before(o2)));
}

TEST_CASE("moba: packed prefill into a cache, then batched steps == reference", "[moba]") {
  const std::vector<index_t> lens{40, 5, 55};
  const index_t n = 3, steps = 20, Tmax = 75;
  const geo g{n, Tmax, 4, 2, 16, 16, 16, 3};
  const auto in = make_inputs<float>(g, 21);  // sequence s: rows 0 .. lens[s] + steps - 1
  std::vector<index_t> cu{0};
  for (index_t len : lens) cu.push_back(cu.back() + len);
  const index_t N = cu.back();
  tensor<float, 3> q({N, g.H, g.K}), k({N, g.Hkv, g.K}), v({N, g.Hkv, g.V}), o({N, g.H, g.V});
  for (index_t s = 0; s < n; ++s)
    for (index_t t = 0; t < lens[static_cast<std::size_t>(s)]; ++t) {
      const index_t r = cu[static_cast<std::size_t>(s)] + t;
      for (index_t h = 0; h < g.H; ++h)
        for (index_t d = 0; d < g.K; ++d) q(r, h, d) = in.q(s, t, h, d);
      for (index_t h = 0; h < g.Hkv; ++h)
        for (index_t d = 0; d < g.K; ++d) {
          k(r, h, d) = in.k(s, t, h, d);
          v(r, h, d) = in.v(s, t, h, d);
        }
    }
  const auto m = mixer<float>(g);
  auto cache = m.make_cache(n, g.Hkv, g.K, g.V, Tmax);
  m.forward(q.view(), k.view(), v.view(), o.view(), cache, cu);
  tensor<float, 4> out({n, Tmax, g.H, g.V});
  for (index_t s = 0; s < n; ++s)
    for (index_t t = 0; t < lens[static_cast<std::size_t>(s)]; ++t)
      for (index_t h = 0; h < g.H; ++h)
        for (index_t d = 0; d < g.V; ++d)
          out(s, t, h, d) = o(cu[static_cast<std::size_t>(s)] + t, h, d);
  tensor<float, 3> q1({n, g.H, g.K}), k1({n, g.Hkv, g.K}), v1({n, g.Hkv, g.V}), o1({n, g.H, g.V});
  for (index_t j = 0; j < steps; ++j) {
    for (index_t s = 0; s < n; ++s) {
      const index_t t = lens[static_cast<std::size_t>(s)] + j;
      for (index_t h = 0; h < g.H; ++h)
        for (index_t d = 0; d < g.K; ++d) q1(s, h, d) = in.q(s, t, h, d);
      for (index_t h = 0; h < g.Hkv; ++h)
        for (index_t d = 0; d < g.K; ++d) {
          k1(s, h, d) = in.k(s, t, h, d);
          v1(s, h, d) = in.v(s, t, h, d);
        }
    }
    m.step(q1.view(), k1.view(), v1.view(), o1.view(), cache);
    for (index_t s = 0; s < n; ++s)
      for (index_t h = 0; h < g.H; ++h)
        for (index_t d = 0; d < g.V; ++d)
          out(s, lens[static_cast<std::size_t>(s)] + j, h, d) = o1(s, h, d);
  }
  for (index_t s = 0; s < n; ++s) {
    const index_t len = lens[static_cast<std::size_t>(s)] + steps;
    CHECK(cache.length(s) == len);
    const auto qs = st::cast<double>(tensor<float, 4>::copy_of(
        in.q.view().template slice<0>(s, s + 1).template slice<1>(0, len)));
    const auto ks = st::cast<double>(tensor<float, 4>::copy_of(
        in.k.view().template slice<0>(s, s + 1).template slice<1>(0, len)));
    const auto vs = st::cast<double>(tensor<float, 4>::copy_of(
        in.v.view().template slice<0>(s, s + 1).template slice<1>(0, len)));
    const auto ref = reference({qs, ks, vs}, {1, len, g.H, g.Hkv, g.K, g.V, g.c, g.k});
    const auto got =
        tensor<float, 4>::copy_of(out.view().template slice<0>(s, s + 1).template slice<1>(0, len));
    SEQMIX_CHECK_CLOSE(ref, got, 2e-5);
  }
  // a sequence without room is rejected before anything is written
  CHECK_THROWS_WITH(m.forward(q.view(), k.view(), v.view(), o.view(), cache, cu),
                    Catch::Contains("moba_attention::forward") && Catch::Contains("capacity 75"));
}
