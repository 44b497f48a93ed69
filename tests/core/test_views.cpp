// SPDX-License-Identifier: MIT
// Views (issue 11 item 4): transpose / permute, split of a strided column block of a fused
// projection into [T, H, D] without a copy, unsqueeze / squeeze, stride-0 broadcast, slices of
// tensors, checked arguments, and const-correctness (static checks here; the compile-fail
// snippets in tests/compile_fail prove the misuse does not compile).
#include <concepts>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>

#include <catch2/catch.hpp>

#include <seqmix/core/tensor.hpp>

using namespace seqmix;
using Catch::Matchers::Contains;

namespace {

template <class T, std::size_t R>
void iota(tensor<T, R>& t) {
  for (index_t i = 0; i < t.size(); ++i) t[i] = static_cast<T>(i);
}

// ---- const misuse, as concepts (requires-expressions must sit in a template) ----------------
template <class V>
concept element_writable = requires(V v) {
  v(0, 0) = typename V::value_type{};
};
template <class V>
concept fillable = requires(V v) {
  v.fill(typename V::value_type{});
};
template <class Tn>
concept slices_temporaries = requires {
  std::declval<Tn>().template slice<0>(0, 1);
};
template <class Tn>
concept views_of_temporaries = requires {
  std::declval<Tn>().permute({1, 0});
};

}  // namespace

TEST_CASE("views: const-correctness holds through every view operation", "[core][views]") {
  using view = tensor_view<float, 2>;
  using cview = tensor_view<const float, 2>;
  // a view of const cannot be written
  STATIC_REQUIRE(element_writable<view>);
  STATIC_REQUIRE_FALSE(element_writable<cview>);
  STATIC_REQUIRE(fillable<view>);
  STATIC_REQUIRE_FALSE(fillable<cview>);
  // a tensor_view<T> does not bind to const data
  STATIC_REQUIRE_FALSE(std::is_constructible_v<view, const tensor<float, 2>&>);
  STATIC_REQUIRE_FALSE(std::is_constructible_v<view, cview>);
  STATIC_REQUIRE_FALSE(std::is_constructible_v<view, const cview&>);
  STATIC_REQUIRE_FALSE(std::is_constructible_v<tensor_view<float, 1>, const float*, shape_t<1>>);
  STATIC_REQUIRE(std::is_constructible_v<tensor_view<const float, 1>, const float*, shape_t<1>>);
  STATIC_REQUIRE(std::is_constructible_v<cview, const tensor<float, 2>&>);
  STATIC_REQUIRE(std::is_constructible_v<cview, view>);
  // no view of another element type
  STATIC_REQUIRE_FALSE(std::is_constructible_v<tensor_view<const double, 2>, tensor<float, 2>&>);
  STATIC_REQUIRE_FALSE(std::is_constructible_v<tensor_view<float, 3>, tensor<float, 2>&>);
  // view operations keep constness
  STATIC_REQUIRE(std::is_same_v<decltype(std::declval<cview>().transpose()), cview>);
  STATIC_REQUIRE(std::is_same_v<decltype(std::declval<cview>().permute({1, 0})), cview>);
  STATIC_REQUIRE(std::is_same_v<decltype(std::declval<cview>().split(1, {2, 2})),
                                tensor_view<const float, 3>>);
  STATIC_REQUIRE(
      std::is_same_v<decltype(std::declval<cview>().unsqueeze(0)), tensor_view<const float, 3>>);
  STATIC_REQUIRE(std::is_same_v<decltype(std::declval<view>().slice(0, 0, 1)), view>);
  // a broadcast (stride-0) view is read-only even from mutable data
  STATIC_REQUIRE(std::is_same_v<decltype(std::declval<view>().broadcast_to({2, 2})), cview>);
  // views of a const tensor are read-only, of a mutable one writable
  using T2 = tensor<float, 2>;
  STATIC_REQUIRE(std::is_same_v<decltype(std::declval<const T2&>().slice<0>(0, 1)), cview>);
  STATIC_REQUIRE(std::is_same_v<decltype(std::declval<T2&>().slice<0>(0, 1)), view>);
  STATIC_REQUIRE(std::is_same_v<decltype(std::declval<const T2&>().transpose()), cview>);
  STATIC_REQUIRE(std::is_same_v<decltype(std::declval<const T2&>().select(0, 0)),
                                tensor_view<const float, 1>>);
  STATIC_REQUIRE(std::is_same_v<decltype(std::declval<const T2&>().split(1, {1, 1})),
                                tensor_view<const float, 3>>);
  STATIC_REQUIRE(element_writable<decltype(std::declval<T2&>().permute({1, 0}))>);
  STATIC_REQUIRE_FALSE(element_writable<decltype(std::declval<const T2&>().permute({1, 0}))>);
  // no view of a temporary tensor (it would dangle)
  STATIC_REQUIRE(slices_temporaries<T2&>);
  STATIC_REQUIRE(slices_temporaries<const T2&>);
  STATIC_REQUIRE_FALSE(slices_temporaries<T2>);
  STATIC_REQUIRE_FALSE(views_of_temporaries<T2>);
  STATIC_REQUIRE(views_of_temporaries<T2&>);
}

TEST_CASE("views: a fused [T, 3·H·D] projection splits into [T, H, D] blocks without a copy",
          "[core][views]") {
  const index_t T = 5, H = 3, D = 4, HD = H * D;
  tensor<float, 2> fused({T, 3 * HD});  // q | k | v per row
  iota(fused);
  tensor_view<const float, 2> x = fused;

  auto kblock = x.slice(1, HD, 2 * HD);  // [T, H·D] column block, row stride 3·H·D
  CHECK(kblock.shape() == shape_t<2>{T, HD});
  CHECK(kblock.strides() == shape_t<2>{3 * HD, 1});
  CHECK_FALSE(kblock.is_contiguous());

  auto k = kblock.split(1, {H, D});  // [T, H, D]
  CHECK(k.shape() == shape_t<3>{T, H, D});
  CHECK(k.strides() == shape_t<3>{3 * HD, D, 1});
  CHECK(k.data() == fused.data() + HD);  // no copy: points into the fused buffer
  for (index_t t = 0; t < T; ++t) {
    for (index_t h = 0; h < H; ++h) {
      for (index_t d = 0; d < D; ++d) CHECK(k(t, h, d) == fused(t, HD + h * D + d));
    }
  }
  // The same through the tensor itself (mutable) and with an inferred part.
  auto v = fused.slice<1>(2 * HD, 3 * HD).split(1, {-1, D});
  CHECK(v.shape() == shape_t<3>{T, H, D});
  v(4, 2, 3) = -7.0f;
  CHECK(fused(4, 3 * HD - 1) == -7.0f);
  // Heads-major [H, T, D] for a per-head kernel, and the [T, D] of one head.
  auto kh = k.permute({1, 0, 2});
  CHECK(kh.shape() == shape_t<3>{H, T, D});
  CHECK(kh.strides() == shape_t<3>{D, 3 * HD, 1});
  CHECK(kh(2, 3, 1) == k(3, 2, 1));
  auto k_h1 = kh.select<0>(1);  // [T, D] of head 1
  CHECK(k_h1(4, 0) == fused(4, HD + D));
  // A split into three parts (rank 2 -> 4) and the inner product of the parts.
  auto q4 = x.slice(1, 0, HD).split(1, {H, 2, 2});
  CHECK(q4.shape() == shape_t<4>{T, H, 2, 2});
  CHECK(q4.strides() == shape_t<4>{3 * HD, D, 2, 1});
  CHECK(q4(1, 2, 1, 0) == fused(1, 2 * D + 2));
  // as_matrix of a split head keeps the strides.
  auto m = as_matrix(k.select<1>(2));  // [T, D] of head 2 of k
  CHECK(m(3, 1) == fused(3, HD + 2 * D + 1));
}

TEST_CASE("views: merge is split's inverse and needs adjacent dimensions", "[core][views]") {
  const index_t T = 3, H = 2, D = 4;
  tensor<float, 2> fused({T, 3 * H * D});
  iota(fused);
  auto k = fused.slice(1, H * D, 2 * H * D).split(1, {H, D});  // [T, H, D], strided rows
  auto k2 = k.merge(1);                                        // back to the [T, H·D] block
  CHECK(k2.shape() == shape_t<2>{T, H * D});
  CHECK(k2.strides() == shape_t<2>{3 * H * D, 1});
  CHECK(k2(2, 5) == fused(2, H * D + 5));
  // merging the strided rows with the heads is impossible without a copy
  CHECK_THROWS_WITH(k.merge(0), Contains("seqmix::tensor_view::merge: argument 'dim'") &&
                                    Contains("not adjacent") && Contains("strides [24, 4, 1]"));
  CHECK_THROWS_WITH(k.merge(2), Contains("argument 'dim'") && Contains("[0, 2)"));
  // extent-1 dimensions merge whatever their stride
  auto u = fused.unsqueeze(1);  // [T, 1, 3·H·D], stride 0 in the middle
  CHECK(u.merge(0).shape() == shape_t<2>{T, 3 * H * D});
  CHECK(u.merge(0).strides() == fused.strides());
  CHECK(u.merge(1).strides() == shape_t<2>{3 * H * D, 1});
  // a contiguous tensor merges fully
  tensor<int, 3> c({2, 3, 4});
  CHECK(c.merge(0).merge(0).is_contiguous());
  CHECK_THROWS_WITH((c.transpose<0, 1>().merge(0)), Contains("seqmix::tensor_view::merge"));
}

TEST_CASE("views: split checks its arguments", "[core][views][hostile]") {
  tensor<float, 2> t({4, 12});
  auto v = t.view();
  CHECK_THROWS_WITH(v.split(1, {5, 2}), Contains("seqmix::tensor_view::split: argument 'parts'") &&
                                            Contains("extent 12") && Contains("[5, 2]") &&
                                            Contains("product 10"));
  CHECK_THROWS_WITH(v.split(1, {-1, 5}),
                    Contains("argument 'parts'") && Contains("not a multiple of 5"));
  CHECK_THROWS_WITH(v.split(1, {-1, -1}), Contains("argument 'parts'"));
  CHECK_THROWS_WITH(v.split(1, {-3, -4}), Contains("argument 'parts'") && Contains("[-3, -4]"));
  CHECK_THROWS_WITH(v.split(2, {3, 4}), Contains("tensor_view::split: argument 'dim'") &&
                                            Contains("[0, 2)") && Contains("got 2"));
  const index_t big = index_t(1) << 40;
  CHECK_THROWS_WITH(v.split(0, {big, big, 0}), Contains("argument 'parts'"));
  CHECK_THROWS_WITH(t.split(0, {3, -1}), Contains("seqmix::tensor::split: argument 'parts'"));
  // a split into one part is the identity; 0-extent dimensions split into zeros
  CHECK(v.split(0, {4}).shape() == v.shape());
  tensor<float, 2> e({0, 6});
  CHECK(e.split(0, {0, 3}).shape() == shape_t<3>{0, 3, 6});
  CHECK_THROWS_WITH(e.split(0, {0, -1}), Contains("cannot infer"));
}

TEST_CASE("views: transpose and permute", "[core][views]") {
  tensor<int, 3> t({2, 3, 4});
  iota(t);
  auto tr = t.transpose<0, 2>();
  CHECK(tr.shape() == shape_t<3>{4, 3, 2});
  CHECK(tr(3, 1, 1) == t(1, 1, 3));
  CHECK(t.view().transpose(0, 2).strides() == tr.strides());
  auto p = t.permute({2, 0, 1});  // result dim d = source dim order[d]
  CHECK(p.shape() == shape_t<3>{4, 2, 3});
  CHECK(p.strides() == shape_t<3>{1, 12, 4});
  for (index_t a = 0; a < 4; ++a) {
    for (index_t b = 0; b < 2; ++b) {
      for (index_t c = 0; c < 3; ++c) CHECK(p(a, b, c) == t(b, c, a));
    }
  }
  // permute twice with the inverse order is the identity
  auto back = p.permute({1, 2, 0});
  CHECK(back.shape() == t.shape());
  CHECK(back.strides() == t.strides());
  CHECK(back.is_contiguous());
  CHECK_FALSE(p.is_contiguous());
  // a matrix transpose, through Eigen
  tensor<float, 2> m({2, 3});
  iota(m);
  auto mt = m.transpose();
  CHECK(mt.shape() == shape_t<2>{3, 2});
  CHECK(as_matrix(mt)(2, 1) == m(1, 2));
  CHECK(as_matrix(mt).isApprox(as_matrix(m.view()).transpose()));

  CHECK_THROWS_WITH(t.view().permute({0, 0, 1}),
                    Contains("seqmix::tensor_view::permute: argument 'order'") &&
                        Contains("permutation of 0 .. 2") && Contains("[0, 0, 1]"));
  CHECK_THROWS_WITH(t.permute({0, 1, 3}),
                    Contains("seqmix::tensor::permute: argument 'order'") && Contains("[0, 1, 3]"));
  CHECK_THROWS_WITH(t.view().transpose(0, 3),
                    Contains("tensor_view::transpose: argument 'd1'") && Contains("got 3"));
  CHECK_THROWS_WITH(t.transpose(5, 0), Contains("seqmix::tensor::transpose: argument 'd0'"));
}

TEST_CASE("views: unsqueeze, squeeze and stride-0 broadcast", "[core][views]") {
  tensor<float, 1> bias({4});
  iota(bias);
  auto row = bias.unsqueeze(0);  // [1, 4]
  CHECK(row.shape() == shape_t<2>{1, 4});
  CHECK(row.strides()[0] == 0);
  CHECK(row.is_contiguous());
  auto col = bias.view().unsqueeze(1);  // [4, 1]
  CHECK(col.shape() == shape_t<2>{4, 1});
  CHECK(col(3, 0) == 3.0f);
  auto b = row.broadcast_to({6, 4});  // [6, 4], row stride 0
  CHECK(b.shape() == shape_t<2>{6, 4});
  CHECK(b.strides() == shape_t<2>{0, 1});
  for (index_t t = 0; t < 6; ++t) {
    for (index_t n = 0; n < 4; ++n) CHECK(b(t, n) == float(n));
  }
  // Eigen sees the stride 0 too: a broadcast bias added to a matrix.
  tensor<float, 2> x({6, 4}, 1.0f);
  Eigen::MatrixXf sum = as_matrix(x.view()) + as_matrix(b);
  CHECK(sum(5, 3) == 4.0f);
  auto bc = col.broadcast_to({4, 3});
  CHECK(bc(2, 1) == 2.0f);
  CHECK(bc.strides()[1] == 0);
  // broadcast to extent 0, and keeping the extents, are fine
  CHECK(row.broadcast_to({0, 4}).empty());
  CHECK(bias.broadcast_to({4}).strides()[0] == 1);
  // squeeze is unsqueeze's inverse
  auto sq = row.squeeze(0);
  CHECK(sq.shape() == bias.shape());
  CHECK(sq.data() == bias.data());

  CHECK_THROWS_WITH(row.broadcast_to({6, 5}),
                    Contains("seqmix::tensor_view::broadcast_to: argument 'shape'") &&
                        Contains("[1, 4]") && Contains("[6, 5]"));
  CHECK_THROWS_WITH(row.broadcast_to({-2, 4}), Contains("argument 'shape'") && Contains("-2"));
  const index_t big = std::numeric_limits<index_t>::max() / 2;
  CHECK_THROWS_WITH(row.broadcast_to({big, 4}),
                    Contains("argument 'shape'") && Contains("overflows"));
  CHECK_THROWS_WITH(bias.unsqueeze(2), Contains("seqmix::tensor::unsqueeze: argument 'dim'") &&
                                           Contains("[0, 2)") && Contains("got 2"));
  CHECK_THROWS_WITH(col.squeeze(0), Contains("seqmix::tensor_view::squeeze: argument 'dim'") &&
                                        Contains("extent 1, got 4"));
  CHECK_THROWS_WITH(x.squeeze(2), Contains("seqmix::tensor::squeeze: argument 'dim'"));
}

TEST_CASE("views: slices and selects of tensors and views are checked", "[core][views][hostile]") {
  tensor<int, 3> t({2, 3, 4});
  iota(t);
  auto s = t.slice<2>(1, 3);  // [2, 3, 2] of a mutable tensor
  CHECK(s.shape() == shape_t<3>{2, 3, 2});
  s(1, 2, 1) = -1;
  CHECK(t(1, 2, 2) == -1);
  const tensor<int, 3>& ct = t;
  auto cs = ct.slice(1, 1, 2);
  CHECK(cs.shape() == shape_t<3>{2, 1, 4});
  CHECK(cs(1, 0, 3) == t(1, 1, 3));
  CHECK(ct.select(2, 3)(1, 1) == t(1, 1, 3));
  CHECK(t.select<0>(1)(2, 2) == -1);
  // empty slices at either end are views of nothing, pointing inside (or at the end)
  CHECK(t.slice<1>(3, 3).empty());
  CHECK(t.view().slice(0, 0, 0).empty());

  using Catch::Matchers::StartsWith;
  CHECK_THROWS_WITH(t.slice<1>(2, 4), StartsWith("seqmix::tensor::slice: argument 'end'") &&
                                          Contains("[2, 3]") && Contains("got 4"));
  CHECK_THROWS_WITH(t.slice<1>(-1, 2),
                    StartsWith("seqmix::tensor::slice: argument 'begin'") && Contains("got -1"));
  CHECK_THROWS_WITH(t.view().slice<2>(3, 2),
                    StartsWith("seqmix::tensor_view::slice: argument 'end'") && Contains("got 2"));
  CHECK_THROWS_WITH(t.view().slice(3, 0, 1),
                    StartsWith("seqmix::tensor_view::slice: argument 'dim'"));
  CHECK_THROWS_WITH(t.select<0>(2), StartsWith("seqmix::tensor::select: argument 'i'") &&
                                        Contains("[0, 2)") && Contains("got 2"));
  CHECK_THROWS_WITH(t.view().select<2>(-1),
                    StartsWith("seqmix::tensor_view::select: argument 'i'"));
  CHECK_THROWS_WITH(ct.select(4, 0), StartsWith("seqmix::tensor::select: argument 'dim'"));
  // checked element access
  CHECK(t.at(1, 2, 3) == t(1, 2, 3));
  CHECK(t.view().at(0, 0, 1) == 1);
  CHECK_THROWS_WITH(t.at(0, 3, 0), StartsWith("seqmix::tensor::at: argument 'idx'") &&
                                       Contains("dimension 1") && Contains("got 3"));
  CHECK_THROWS_WITH(t.view().at(0, 0, -1), StartsWith("seqmix::tensor_view::at: argument 'idx'"));
}

TEST_CASE("views: reshape and external views name their shapes", "[core][views][hostile]") {
  tensor<float, 3> t({2, 3, 4});
  CHECK(t.reshape<2>({6, 4}).shape() == shape_t<2>{6, 4});
  CHECK_THROWS_WITH(t.reshape<2>({5, 4}),
                    Contains("seqmix::tensor::reshape: argument 'new_shape'") &&
                        Contains("24 elements of [2, 3, 4]") && Contains("[5, 4]"));
  CHECK_THROWS_WITH(t.view().select<1>(0).reshape<1>({8}),
                    Contains("seqmix::tensor_view::reshape: argument 'this'") &&
                        Contains("[2, 4]") && Contains("strides [12, 1]"));
  CHECK_THROWS_WITH(t.view().reshape<2>({-4, -6}), Contains("argument 'new_shape'"));

  float buf[8] = {};
  CHECK(tensor_view<float, 2>(buf, {2, 4})(1, 3) == 0.0f);
  CHECK_THROWS_WITH((tensor_view<float, 2>(buf, {2, -4})),
                    Contains("seqmix::tensor_view: argument 'shape'") && Contains("[2, -4]"));
  CHECK_THROWS_WITH((tensor_view<float, 1>(nullptr, {3})),
                    Contains("seqmix::tensor_view: argument 'data'"));
  const index_t e32 = index_t(1) << 32;
  CHECK_THROWS_WITH((tensor_view<const float, 2>(buf, {e32, e32}, {0, 0})),
                    Contains("argument 'shape'") && Contains("fits in index_t"));
  // contiguous strides of an overflowing shape are never computed (UBSan would flag them)
  CHECK_THROWS_WITH((tensor_view<const float, 3>(buf, {2, e32, e32})),
                    Contains("argument 'shape'") && Contains("[2, 4294967296, 4294967296]"));
  CHECK_NOTHROW(tensor_view<float, 1>(nullptr, {0}));
}
