// SPDX-License-Identifier: MIT
// MoE backward (issue 15, item 2): central finite differences in double of the plain reference
// backward (every input and weight, each router kind, with and without a shared expert, capacity
// drops, aux + z losses on; the selection bias's FD gradient is exactly 0), the fast engine in
// float against the double reference, 1 vs 2 threads bitwise, bf16 weights == their f32
// widening bitwise, the grouping equal to the forward's, and bad inputs. Inputs are drawn away
// from routing ties: every discrete choice (top-k, groups, aux counts, capacity by score) has a
// margin that is checked before the comparison.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include <seqmix/mixers/moe.hpp>
#include <seqmix/mixers/moe_backward.hpp>
#include <seqmix/reference/moe.hpp>
#include <seqmix/reference/moe_backward.hpp>

#include "alloc_counter.hpp"
#include "testing.hpp"

namespace {

using namespace seqmix;
using seqmix::testing::compare;
namespace km = seqmix::kernels::moe;
using router_kind = km::router_kind;

bool report() {
  return std::getenv("SEQMIX_MOE_BW_REPORT") != nullptr;
}

/// One test configuration: the forward's options plus which optional parts are present.
struct setup {
  std::string name;
  moe_options opt;
  bool shared = false, shared_gate = false, bias = false;
  double aux = 0, z = 0;
};

std::vector<setup> setups() {
  std::vector<setup> v;
  {
    setup s{"softmax_topk, shared + gate, capacity by score",
            moe_options::qwen_moe(false),
            true,
            true,
            false,
            0.3,
            0.2};
    s.opt.capacity_factor = 0.8f;
    v.push_back(s);
  }
  {
    setup s{"softmax_topk renormalised (Mixtral), capacity by position",
            moe_options::mixtral(),
            false,
            false,
            false,
            0.5,
            0.1};
    s.opt.capacity_factor = 0.75f;
    s.opt.drop = km::drop_policy::by_position;
    v.push_back(s);
  }
  {
    setup s{"topk_softmax (Granite), ungated shared, gelu_tanh",
            moe_options::granite(3),
            true,
            false,
            false,
            0.2,
            0.3};
    s.opt.activation = km::expert_activation::gelu_tanh;
    v.push_back(s);
  }
  {
    setup s{"sigmoid_bias (DeepSeek-V3) groups, shared + gate, capacity by score",
            moe_options::deepseek_v3(4, 2, 2.5f, 2),
            true,
            true,
            true,
            0.4,
            0.2};
    s.opt.capacity_factor = 0.8f;
    v.push_back(s);
  }
  {
    setup s{"sigmoid_bias not renormalised, no groups, gelu",
            moe_options::deepseek_v3(1, 1, 1.5f, 2, false),
            false,
            false,
            true,
            0.3,
            0.3};
    s.opt.activation = km::expert_activation::gelu;
    v.push_back(s);
  }
  {
    setup s{"softmax_topk, experts not gated (relu2), shared",
            moe_options::qwen_moe(true),
            true,
            true,
            false,
            0.2,
            0.1};
    s.opt.gated = false;
    s.opt.activation = km::expert_activation::relu2;
    s.opt.capacity_factor = 0.9f;
    v.push_back(s);
  }
  return v;
}

/// Every input and weight of one block, in double, each value exactly a float.
struct params {
  index_t T = 0, D = 0, E = 0, I = 0, S = 0;
  tensor<double, 2> x, dy, router, sgate, sup, sdown, sg;
  tensor<double, 1> bias;
  tensor<double, 3> gate, up, down;
};

template <std::size_t R>
tensor<double, R> draw(const shape_t<R>& shape, std::mt19937_64& rng, double sd, double mean = 0) {
  auto t = seqmix::testing::random_normal<double, R>(shape, rng, sd, mean);
  for (index_t i = 0; i < t.size(); ++i) t[i] = double(static_cast<float>(t[i]));
  return t;
}

params make_params(const setup& s, index_t T, index_t D, index_t E, index_t I, index_t S,
                   std::mt19937_64& rng) {
  params p;
  p.T = T, p.D = D, p.E = E, p.I = I, p.S = s.shared ? S : 0;
  p.x = draw<2>({T, D}, rng, 1.0);
  p.dy = draw<2>({T, D}, rng, 1.0);
  p.router = draw<2>({E, D}, rng, 1.5 / std::sqrt(double(D)));
  if (s.bias) p.bias = draw<1>({E}, rng, 0.1);
  if (s.opt.gated) p.gate = draw<3>({E, I, D}, rng, 1 / std::sqrt(double(D)));
  p.up = draw<3>({E, I, D}, rng, 1 / std::sqrt(double(D)));
  p.down = draw<3>({E, D, I}, rng, 1 / std::sqrt(double(I)));
  if (s.shared) {
    if (s.opt.gated) p.sgate = draw<2>({S, D}, rng, 1 / std::sqrt(double(D)));
    p.sup = draw<2>({S, D}, rng, 1 / std::sqrt(double(D)));
    p.sdown = draw<2>({D, S}, rng, 1 / std::sqrt(double(S)));
    if (s.shared_gate) p.sg = draw<2>({1, D}, rng, 1 / std::sqrt(double(D)));
  }
  return p;
}

reference::moe_weights<double> ref_weights(const params& p) {
  reference::moe_weights<double> w;
  w.router = p.router;
  w.bias = p.bias;
  w.gate = p.gate;
  w.up = p.up;
  w.down = p.down;
  w.shared_gate_proj = p.sgate;
  w.shared_up = p.sup;
  w.shared_down = p.sdown;
  w.shared_gate = p.sg;
  return w;
}

km::router_options route_of(const moe_options& o) {
  km::router_options r;
  r.kind = o.router;
  r.top_k = o.top_k;
  r.renormalize = o.renormalize;
  r.n_group = o.n_group;
  r.topk_group = o.topk_group;
  r.routed_scaling_factor = o.routed_scaling_factor;
  r.masked_choice_score = o.masked_choice_score;
  return r;
}
km::expert_options expert_of(const moe_options& o) {
  return {o.activation, o.gated};
}
km::capacity_options capacity_of(const moe_options& o) {
  return {o.capacity_factor, o.drop};
}

reference::moe_backward_result<double> ref_backward(const params& p, const setup& s) {
  return reference::moe_backward<double>(p.x, ref_weights(p), route_of(s.opt), expert_of(s.opt),
                                         capacity_of(s.opt), p.dy, s.aux, s.z);
}

double ref_loss(const params& p, const setup& s) {
  const auto r = reference::moe<double>(p.x, ref_weights(p), route_of(s.opt), expert_of(s.opt),
                                        capacity_of(s.opt));
  double l = 0;
  for (index_t i = 0; i < r.y.size(); ++i) l += r.y[i] * p.dy[i];
  return l + s.aux * r.aux_loss + s.z * r.z_loss;
}

/// Gap between the k-th and the (k+1)-th largest of v (inf when there is no (k+1)-th).
double gap(std::vector<double> v, index_t k) {
  std::sort(v.begin(), v.end(), std::greater<>());
  if (k >= index_t(v.size())) return std::numeric_limits<double>::infinity();
  return v[std::size_t(k - 1)] - v[std::size_t(k)];
}

/// The smallest margin of every discrete choice of the routing (in double): the top-k of the
/// router's selection score, the group ranking, the aux loss's top-k of the softmax, and the
/// capacity's ranking by weight. Ties (margin 0) make the derivative ill-defined.
double routing_margin(const params& p, const setup& s) {
  const auto f = reference::moe<double>(p.x, ref_weights(p), route_of(s.opt), expert_of(s.opt),
                                        capacity_of(s.opt));
  const index_t T = p.T, E = p.E, k = s.opt.top_k;
  double m = std::numeric_limits<double>::infinity();
  for (index_t t = 0; t < T; ++t) {
    std::vector<double> l(static_cast<std::size_t>(E)), pr(static_cast<std::size_t>(E));
    double mx = -1e300, den = 0;
    for (index_t e = 0; e < E; ++e) mx = std::max(mx, l[std::size_t(e)] = f.logits(t, e));
    for (index_t e = 0; e < E; ++e) den += std::exp(l[std::size_t(e)] - mx);
    for (index_t e = 0; e < E; ++e) pr[std::size_t(e)] = std::exp(l[std::size_t(e)] - mx) / den;
    m = std::min(m, gap(pr, k));
    if (s.opt.router == router_kind::topk_softmax) m = std::min(m, gap(l, k));
    if (s.opt.router == router_kind::sigmoid_bias) {
      std::vector<double> c(static_cast<std::size_t>(E));
      for (index_t e = 0; e < E; ++e)
        c[std::size_t(e)] = 1 / (1 + std::exp(-l[std::size_t(e)])) + (s.bias ? p.bias(e) : 0.0);
      if (s.opt.n_group > 1) {
        const index_t per = E / s.opt.n_group;
        std::vector<double> gs;
        for (index_t g = 0; g < s.opt.n_group; ++g) {
          std::vector<double> in(c.begin() + g * per, c.begin() + (g + 1) * per);
          std::sort(in.begin(), in.end(), std::greater<>());
          gs.push_back(in[0] + in[1]);
        }
        m = std::min(m, gap(gs, s.opt.topk_group));
        std::vector<double> gs_sorted = gs;
        std::sort(gs_sorted.begin(), gs_sorted.end(), std::greater<>());
        const double cut = gs_sorted[std::size_t(s.opt.topk_group - 1)];
        for (index_t e = 0; e < E; ++e)
          if (gs[std::size_t(e / per)] < cut) c[std::size_t(e)] = s.opt.masked_choice_score;
      }
      m = std::min(m, gap(c, k));
    }
  }
  if (s.opt.capacity_factor > 0 && s.opt.drop == km::drop_policy::by_score) {
    const auto C = static_cast<index_t>(
        std::ceil(double(T) * double(k) / double(E) * double(s.opt.capacity_factor)));
    for (index_t e = 0; e < E; ++e) {
      std::vector<double> w;
      for (index_t t = 0; t < T; ++t)
        for (index_t j = 0; j < k; ++j)
          if (f.ids(t, j) == e) w.push_back(f.weights(t, j));
      if (index_t(w.size()) > C) m = std::min(m, gap(w, C));
    }
  }
  return m;
}

/// Draws parameters until every routing choice has at least `margin` and, where the setup has a
/// capacity, some assignment is dropped.
params draw_away_from_ties(const setup& s, index_t T, index_t D, index_t E, index_t I, index_t S,
                           double margin, std::uint64_t salt) {
  for (std::uint64_t attempt = 0; attempt < 200; ++attempt) {
    auto rng = seqmix::testing::make_rng(salt * 1000 + attempt);
    params p = make_params(s, T, D, E, I, S, rng);
    if (routing_margin(p, s) < margin) continue;
    if (s.opt.capacity_factor > 0) {
      const auto f = reference::moe<double>(p.x, ref_weights(p), route_of(s.opt), expert_of(s.opt),
                                            capacity_of(s.opt));
      if (f.dropped == 0) continue;
    }
    return p;
  }
  FAIL("no draw away from routing ties in 200 attempts (" << s.name << ")");
  return {};
}

// ---- the fast engine, on float copies of the parameters --------------------------------------

template <class W>
struct fast_weights {
  tensor<W, 2> router, sgate, sup, sdown, sg;
  tensor<float, 1> bias;
  tensor<W, 3> gate, up, down;
  typename moe<W>::weights w;
};

template <class W, std::size_t R>
tensor<W, R> to_w(const tensor<double, R>& t) {
  tensor<W, R> o(t.shape());
  for (index_t i = 0; i < t.size(); ++i) {
    if constexpr (std::is_same_v<W, bf16>) {
      o[i] = bf16_from_float(static_cast<float>(t[i]));
    } else {
      o[i] = static_cast<W>(t[i]);
    }
  }
  return o;
}

template <class W>
void build(fast_weights<W>& f, const params& p, const setup& s) {
  f.router = to_w<W>(p.router);
  f.bias = to_w<float>(p.bias);
  if (s.opt.gated) f.gate = to_w<W>(p.gate);
  f.up = to_w<W>(p.up);
  f.down = to_w<W>(p.down);
  f.w.router = f.router;
  if (s.bias) f.w.score_bias = f.bias;
  f.w.experts = km::expert_set<W>::stacked(
      s.opt.gated ? tensor_view<const W, 3>(f.gate) : tensor_view<const W, 3>{}, f.up, f.down);
  if (s.shared) {
    if (s.opt.gated) f.sgate = to_w<W>(p.sgate);
    f.sup = to_w<W>(p.sup);
    f.sdown = to_w<W>(p.sdown);
    if (s.opt.gated) f.w.shared.gate = f.sgate;
    f.w.shared.up = f.sup;
    f.w.shared.down = f.sdown;
    if (s.shared_gate) {
      f.sg = to_w<W>(p.sg);
      f.w.shared_gate = f.sg;
    }
  }
}

struct fast_grads {
  tensor<float, 2> dx, drouter, dsgate, dsup, dsdown, dsg;
  tensor<float, 3> dgate, dup, ddown;
  km::result res;
};

template <class W>
fast_grads fast_backward(const params& p, const setup& s, const fast_weights<W>& fw) {
  const index_t T = p.T, D = p.D, E = p.E, I = p.I, S = p.S;
  fast_grads g;
  g.dx = tensor<float, 2>({T, D}, std::numeric_limits<float>::quiet_NaN());
  g.drouter = tensor<float, 2>({E, D}, std::numeric_limits<float>::quiet_NaN());
  if (s.opt.gated) g.dgate = tensor<float, 3>({E, I, D}, std::numeric_limits<float>::quiet_NaN());
  g.dup = tensor<float, 3>({E, I, D}, std::numeric_limits<float>::quiet_NaN());
  g.ddown = tensor<float, 3>({E, D, I}, std::numeric_limits<float>::quiet_NaN());
  moe_grads mg;
  mg.dx = g.dx;
  mg.drouter = g.drouter;
  mg.experts = moe_expert_grads::stacked(
      s.opt.gated ? tensor_view<float, 3>(g.dgate) : tensor_view<float, 3>{}, g.dup, g.ddown);
  if (s.shared) {
    if (s.opt.gated) {
      g.dsgate = tensor<float, 2>({S, D}, std::numeric_limits<float>::quiet_NaN());
      mg.dshared_gate_proj = g.dsgate;
    }
    g.dsup = tensor<float, 2>({S, D}, std::numeric_limits<float>::quiet_NaN());
    g.dsdown = tensor<float, 2>({D, S}, std::numeric_limits<float>::quiet_NaN());
    mg.dshared_up = g.dsup;
    mg.dshared_down = g.dsdown;
    if (s.shared_gate) {
      g.dsg = tensor<float, 2>({1, D}, std::numeric_limits<float>::quiet_NaN());
      mg.dshared_gate = g.dsg;
    }
  }
  const auto x = to_w<float>(p.x);
  const auto dy = to_w<float>(p.dy);
  g.res = moe_backward<W>(s.opt, fw.w, x, dy, mg, {s.aux, s.z});
  return g;
}

template <std::size_t R>
bool bitwise_equal(const tensor<float, R>& a, const tensor<float, R>& b) {
  if (a.shape() != b.shape()) return false;
  return a.size() == 0 ||
         std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.size()) * sizeof(float)) == 0;
}

bool all_bitwise_equal(const fast_grads& a, const fast_grads& b) {
  return bitwise_equal(a.dx, b.dx) && bitwise_equal(a.drouter, b.drouter) &&
         bitwise_equal(a.dgate, b.dgate) && bitwise_equal(a.dup, b.dup) &&
         bitwise_equal(a.ddown, b.ddown) && bitwise_equal(a.dsgate, b.dsgate) &&
         bitwise_equal(a.dsup, b.dsup) && bitwise_equal(a.dsdown, b.dsdown) &&
         bitwise_equal(a.dsg, b.dsg);
}

bool sanitized() {
  return seqmix::testing::sanitized_build;
}

}  // namespace

TEST_CASE("moe backward: the double reference against central finite differences",
          "[moe][backward]") {
  const index_t T = sanitized() ? 8 : 12, D = 6, E = 8, I = 5, S = 4;
  const double h = 1e-5;
  std::uint64_t salt = 1;
  for (const setup& s : setups()) {
    SECTION(s.name) {
      params p = draw_away_from_ties(s, T, D, E, I, S, 1e-3, salt);
      const auto g = ref_backward(p, s);
      INFO(s.name << ": dropped " << g.forward.dropped << ", aux " << g.forward.aux_loss << ", z "
                  << g.forward.z_loss);
      double worst = 0;
      // FD of every element of `v` against `an`; error relative to the largest |an| of v
      auto check = [&](const char* what, double* v, index_t n, const double* an) {
        double err = 0, scale = 1e-12;
        for (index_t i = 0; i < n; ++i) {
          const double keep = v[i];
          v[i] = keep + h;
          const double lp = ref_loss(p, s);
          v[i] = keep - h;
          const double lm = ref_loss(p, s);
          v[i] = keep;
          const double fd = (lp - lm) / (2 * h);
          const double a = an ? an[i] : 0.0;
          err = std::max(err, std::abs(fd - a));
          scale = std::max(scale, std::abs(a));
        }
        const double rel = an ? err / scale : err;
        INFO(what << ": max |FD - analytic| " << err << " (relative to max |grad| " << rel << ")");
        if (report()) std::printf("  FD %-52s %-14s %.2e\n", s.name.c_str(), what, rel);
        if (an) {
          CHECK(rel <= 1e-6);
        } else {
          CHECK(err == 0.0);  // the selection bias: FD exactly 0 away from ties
        }
        worst = std::max(worst, rel);
      };
      check("x", p.x.data(), p.x.size(), g.dx.data());
      check("router", p.router.data(), p.router.size(), g.drouter.data());
      if (s.opt.gated) check("experts.gate", p.gate.data(), p.gate.size(), g.dgate.data());
      check("experts.up", p.up.data(), p.up.size(), g.dup.data());
      check("experts.down", p.down.data(), p.down.size(), g.ddown.data());
      if (s.shared) {
        if (s.opt.gated)
          check("shared.gate", p.sgate.data(), p.sgate.size(), g.dshared_gate_proj.data());
        check("shared.up", p.sup.data(), p.sup.size(), g.dshared_up.data());
        check("shared.down", p.sdown.data(), p.sdown.size(), g.dshared_down.data());
        if (s.shared_gate) check("shared_gate", p.sg.data(), p.sg.size(), g.dshared_gate.data());
      }
      if (s.bias) check("score_bias (no gradient)", p.bias.data(), p.bias.size(), nullptr);
      if (s.opt.capacity_factor > 0) CHECK(g.forward.dropped > 0);
    }
    ++salt;
  }
}

TEST_CASE("moe backward: fast engine (float) against the double reference", "[moe][backward]") {
  const index_t T = sanitized() ? 40 : 160, D = 48, E = 8, I = 40, S = 24;
  std::uint64_t salt = 100;
  for (const setup& s : setups()) {
    SECTION(s.name) {
      const params p = draw_away_from_ties(s, T, D, E, I, S, 3e-5, salt);
      const auto r = ref_backward(p, s);
      fast_weights<float> fw;
      build(fw, p, s);
      const auto g = fast_backward(p, s, fw);
      CHECK(g.res.dropped == r.forward.dropped);
      CHECK(std::abs(g.res.aux_loss - r.forward.aux_loss) <= 1e-6 * std::abs(r.forward.aux_loss));
      CHECK(std::abs(g.res.z_loss - r.forward.z_loss) <= 1e-5 * std::abs(r.forward.z_loss) + 1e-6);
      const double tol = 2e-5;  // float GEMMs over D, I, T·k/E against double
      auto cmp = [&](const char* what, const auto& ref, const auto& out) {
        const auto c = compare(ref, out);
        INFO(what << ": " << c.report);
        if (report())
          std::printf("  fast-vs-ref %-52s %-14s rel RMS %.2e\n", s.name.c_str(), what, c.rel_rms);
        CHECK(c.nonfinite == 0);
        CHECK(c.rel_rms <= tol);
      };
      cmp("dx", r.dx, g.dx);
      cmp("drouter", r.drouter, g.drouter);
      if (s.opt.gated) cmp("dgate", r.dgate, g.dgate);
      cmp("dup", r.dup, g.dup);
      cmp("ddown", r.ddown, g.ddown);
      if (s.shared) {
        if (s.opt.gated) cmp("dshared.gate", r.dshared_gate_proj, g.dsgate);
        cmp("dshared.up", r.dshared_up, g.dsup);
        cmp("dshared.down", r.dshared_down, g.dsdown);
        if (s.shared_gate) cmp("dshared_gate", r.dshared_gate, g.dsg);
      }
      // the grouping equals the forward's: same dropped count from the grouped forward
      moe<float> layer(s.opt, fw.w);
      tensor<float, 2> y({T, D});
      const auto fr = layer.forward_grouped(to_w<float>(p.x), y);
      CHECK(fr.dropped == g.res.dropped);
      CHECK(fr.capacity == g.res.capacity);
    }
    ++salt;
  }
}

TEST_CASE("moe backward: 1 vs 2 threads bitwise and bf16 weights equal their f32 widening",
          "[moe][backward][threads]") {
  const index_t T = sanitized() ? 80 : 300, D = 64, E = 8, I = 48, S = 32;
  auto all = setups();
  for (std::size_t i : {std::size_t(0), std::size_t(3), std::size_t(5)}) {
    const setup& s = all[i];
    SECTION(s.name) {
      auto rng = seqmix::testing::make_rng(500 + i);
      const params p = make_params(s, T, D, E, I, S, rng);
      fast_weights<float> fw;
      build(fw, p, s);
      fast_grads one, two;
      {
        scoped_num_threads n(1);
        one = fast_backward(p, s, fw);
      }
      {
        scoped_num_threads n(2);
        seqmix::testing::require_team(2);
        two = fast_backward(p, s, fw);
        CHECK(all_bitwise_equal(one, two));
        // a second call of the same shape: same bits (scratch reuse changes nothing)
        const auto again = fast_backward(p, s, fw);
        CHECK(all_bitwise_equal(two, again));
      }
      CHECK(one.res.dropped == two.res.dropped);
      // bf16 weights: the parameters rounded to bf16, against f32 weights holding those values
      params pb = p;
      auto round_bf16 = [](auto& t) {
        for (index_t j = 0; j < t.size(); ++j)
          t[j] = double(static_cast<float>(bf16_from_float(static_cast<float>(t[j]))));
      };
      round_bf16(pb.router);
      round_bf16(pb.gate);
      round_bf16(pb.up);
      round_bf16(pb.down);
      round_bf16(pb.sgate);
      round_bf16(pb.sup);
      round_bf16(pb.sdown);
      round_bf16(pb.sg);
      fast_weights<float> wf;
      build(wf, pb, s);
      fast_weights<bf16> wb;
      build(wb, pb, s);
      const auto gf = fast_backward(pb, s, wf);
      const auto gb = fast_backward(pb, s, wb);
      CHECK(all_bitwise_equal(gf, gb));
    }
  }
}

TEST_CASE("moe backward: bad inputs name moe_backward and the argument",
          "[moe][backward][errors]") {
  const setup s = setups()[0];
  auto rng = seqmix::testing::make_rng(900);
  const index_t T = 10, D = 8, E = 4, I = 6, S = 5;
  const params p = make_params(s, T, D, E, I, S, rng);
  fast_weights<float> fw;
  build(fw, p, s);
  const auto x = to_w<float>(p.x);
  const auto dy = to_w<float>(p.dy);
  tensor<float, 2> dx({T, D}), dr({E, D}), dsg({S, D}), dsu({S, D}), dsd({D, S}), dg1({1, D});
  tensor<float, 3> dg({E, I, D}), du({E, I, D}), dd({E, D, I});
  moe_grads g;
  g.dx = dx;
  g.drouter = dr;
  g.experts = moe_expert_grads::stacked(dg, du, dd);
  g.dshared_gate_proj = dsg;
  g.dshared_up = dsu;
  g.dshared_down = dsd;
  g.dshared_gate = dg1;
  // the good call works
  CHECK_NOTHROW(moe_backward<float>(s.opt, fw.w, x, dy, g));
  auto expect = [&](const std::function<void()>& f, const std::string& arg) {
    try {
      f();
      FAIL("no error for " << arg);
    } catch (const shape_error& e) {
      const std::string m = e.what();
      INFO(m);
      CHECK(m.find("seqmix::moe_backward") == 0);
      CHECK(m.find("'" + arg + "'") != std::string::npos);
    }
  };
  tensor<float, 2> dy_bad({T, D + 1});
  expect([&] { moe_backward<float>(s.opt, fw.w, x, dy_bad, g); }, "dy");
  tensor<float, 2> dx_bad({T + 1, D});
  {
    moe_grads b = g;
    b.dx = dx_bad;
    expect([&] { moe_backward<float>(s.opt, fw.w, x, dy, b); }, "grads.dx");
  }
  {
    moe_grads b = g;
    b.experts.up.pop_back();
    expect([&] { moe_backward<float>(s.opt, fw.w, x, dy, b); }, "grads.experts.up");
  }
  {
    moe_grads b = g;
    b.dshared_down = {};
    expect([&] { moe_backward<float>(s.opt, fw.w, x, dy, b); }, "grads.dshared_down");
  }
  {
    moe_grads b = g;
    b.dx = tensor_view<float, 2>(const_cast<float*>(x.data()), {T, D});
    expect([&] { moe_backward<float>(s.opt, fw.w, x, dy, b); }, "grads.dx");
  }
  {
    moe_options o = s.opt;
    o.top_k = E + 1;  // the forward's own option check, under this function's name
    expect([&] { moe_backward<float>(o, fw.w, x, dy, g); }, "options.top_k");
  }
  expect([&] { moe_backward<float>(s.opt, fw.w, x, dy, g, {std::nan(""), 0.0}); }, "losses.aux");
  {
    tensor<float, 2> xn = x;
    xn(3, 2) = std::numeric_limits<float>::infinity();
    expect([&] { moe_backward<float>(s.opt, fw.w, xn, dy, g); }, "x");
  }
}

TEST_CASE(
    "moe backward: the engine allocates nothing in steady state and T = 0 zeroes the weight "
    "gradients",
    "[moe][backward][alloc]") {
  const setup s = setups()[3];  // sigmoid router, groups, shared expert + gate, capacity
  auto rng = seqmix::testing::make_rng(950);
  const index_t T = 96, D = 32, E = 8, I = 24, S = 16;
  const params p = make_params(s, T, D, E, I, S, rng);
  fast_weights<float> fw;
  build(fw, p, s);
  const auto x = to_w<float>(p.x);
  const auto dy = to_w<float>(p.dy);
  tensor<float, 2> dx({T, D}), dr({E, D}), dsg({S, D}), dsu({S, D}), dsd({D, S}), dg1({1, D});
  tensor<float, 3> dg({E, I, D}), du({E, I, D}), dd({E, D, I});
  namespace bw = seqmix::kernels::backward::moe;
  bw::grad_problem<float> bp;
  bp.fwd.x = x;
  bp.fwd.router = fw.w.router;
  bp.fwd.bias = fw.w.score_bias;
  bp.fwd.experts = &fw.w.experts;
  bp.fwd.shared = &fw.w.shared;
  bp.fwd.shared_gate = fw.w.shared_gate;
  bp.fwd.route = route_of(s.opt);
  bp.fwd.expert = expert_of(s.opt);
  bp.fwd.capacity = capacity_of(s.opt);
  bp.dy = dy;
  bp.g.dx = dx;
  bp.g.drouter = dr;
  bp.g.experts = moe_expert_grads::stacked(dg, du, dd);
  bp.g.dshared_gate_proj = dsg;
  bp.g.dshared_up = dsu;
  bp.g.dshared_down = dsd;
  bp.g.dshared_gate = dg1;
  bp.losses = {0.1, 0.1};
  const checker check{"test"};
  const auto first = bw::run<float>(check, bp);
  {
    const seqmix::testing::allocation_scope scope;
    const auto again = bw::run<float>(check, bp);
    CHECK(scope.stats().count == 0);
    CHECK(again.dropped == first.dropped);
  }
  // the front gives the same bits as the engine
  {
    tensor<float, 2> dx2({T, D});
    moe_grads g2 = bp.g;
    g2.dx = dx2;
    const tensor<float, 2> dx1 = dx;
    moe_backward<float>(s.opt, fw.w, x, dy, g2, {0.1, 0.1});
    CHECK(std::memcmp(dx1.data(), dx2.data(), sizeof(float) * std::size_t(dx1.size())) == 0);
  }
  // row-strided x, dy and dx (column slices of wider buffers): the same bits
  {
    tensor<float, 2> xw({T, D + 5}), dyw({T, D + 3}), dxw({T, D + 7});
    for (index_t t = 0; t < T; ++t) {
      for (index_t d = 0; d < D; ++d) {
        xw(t, d + 2) = x(t, d);
        dyw(t, d + 1) = dy(t, d);
      }
    }
    const tensor<float, 2> dx1 = dx;
    moe_grads g3 = bp.g;
    g3.dx = dxw.view().slice<1>(4, 4 + D);
    moe_backward<float>(s.opt, fw.w, tensor_view<const float, 2>(xw).slice<1>(2, 2 + D),
                        tensor_view<const float, 2>(dyw).slice<1>(1, 1 + D), g3, {0.1, 0.1});
    bool same = true;
    for (index_t t = 0; t < T; ++t)
      for (index_t d = 0; d < D; ++d) same = same && dxw(t, 4 + d) == dx1(t, d);
    CHECK(same);
  }
  // T = 0: nothing routed, every weight gradient 0
  tensor<float, 2> x0({0, D}), dy0({0, D}), dx0({0, D});
  for (index_t i = 0; i < dg.size(); ++i) dg[i] = 1.0f;
  dr(0, 0) = 1.0f;
  moe_grads g0 = bp.g;
  g0.dx = dx0;
  const auto r0 = moe_backward<float>(s.opt, fw.w, x0, dy0, g0, {0.1, 0.1});
  CHECK(r0.dropped == 0);
  double sum = 0;
  for (index_t i = 0; i < dg.size(); ++i) sum += std::abs(dg[i]);
  for (index_t i = 0; i < dr.size(); ++i) sum += std::abs(dr[i]);
  CHECK(sum == 0.0);
}

TEST_CASE("moe backward: aux loss pooled over layers against finite differences and the fast form",
          "[moe][backward][aux]") {
  auto all = setups();
  for (std::size_t i : {std::size_t(0), std::size_t(3)}) {
    const setup s = all[i];
    SECTION(s.name) {
      const index_t E = 8, k = s.opt.top_k;
      // the other layers of the pool: their top-k counts, probability sums and tokens (constants)
      auto rng = seqmix::testing::make_rng(700 + i);
      const index_t T_other = 37;
      std::vector<double> c_other(std::size_t(E), 0.0), p_other(std::size_t(E), 0.0);
      for (index_t a = 0; a < T_other * k; ++a) c_other[std::size_t(rng() % std::uint64_t(E))] += 1;
      for (index_t t = 0; t < T_other; ++t) p_other[std::size_t(rng() % std::uint64_t(E))] += 1;
      // this layer's own counts (top-k of each token's softmax), the pooled totals
      auto own_counts = [&](const params& p) {
        const auto f = reference::moe<double>(p.x, ref_weights(p), route_of(s.opt),
                                              expert_of(s.opt), capacity_of(s.opt));
        std::vector<double> c(std::size_t(E), 0.0), psum(std::size_t(E), 0.0);
        for (index_t t = 0; t < p.T; ++t) {
          std::vector<double> pr(static_cast<std::size_t>(E));
          double mx = -1e300, den = 0;
          for (index_t e = 0; e < E; ++e) mx = std::max(mx, f.logits(t, e));
          for (index_t e = 0; e < E; ++e) den += std::exp(f.logits(t, e) - mx);
          for (index_t e = 0; e < E; ++e)
            psum[std::size_t(e)] += pr[std::size_t(e)] = std::exp(f.logits(t, e) - mx) / den;
          for (index_t e : reference::moe_detail::top(pr, k)) c[std::size_t(e)] += 1;
        }
        return std::make_pair(c, psum);
      };
      auto pooled_loss = [&](const params& p, const std::vector<double>& c_tot, index_t T_tot) {
        const auto f = reference::moe<double>(p.x, ref_weights(p), route_of(s.opt),
                                              expert_of(s.opt), capacity_of(s.opt));
        const auto psum = own_counts(p).second;
        double l = 0, aux = 0;
        for (index_t j = 0; j < f.y.size(); ++j) l += f.y[j] * p.dy[j];
        for (index_t e = 0; e < E; ++e) {
          aux += c_tot[std::size_t(e)] / double(T_tot) *
                 (p_other[std::size_t(e)] + psum[std::size_t(e)]) / double(T_tot);
        }
        return l + s.aux * double(E) * aux + s.z * f.z_loss;
      };
      {  // finite differences of the reference
        params p = draw_away_from_ties(s, 12, 6, E, 5, 4, 1e-3, 800 + i);
        auto c_tot = own_counts(p).first;
        for (index_t e = 0; e < E; ++e) c_tot[std::size_t(e)] += c_other[std::size_t(e)];
        const index_t T_tot = p.T + T_other;
        const auto g =
            reference::moe_backward<double>(p.x, ref_weights(p), route_of(s.opt), expert_of(s.opt),
                                            capacity_of(s.opt), p.dy, s.aux, s.z, c_tot, T_tot);
        const double h = 1e-5;
        auto fd_check = [&](const char* what, double* v, index_t n, const double* an) {
          double err = 0, scale = 1e-12;
          for (index_t j = 0; j < n; ++j) {
            const double keep = v[j];
            v[j] = keep + h;
            const double lp = pooled_loss(p, c_tot, T_tot);
            v[j] = keep - h;
            const double lm = pooled_loss(p, c_tot, T_tot);
            v[j] = keep;
            err = std::max(err, std::abs((lp - lm) / (2 * h) - an[j]));
            scale = std::max(scale, std::abs(an[j]));
          }
          INFO(what << ": max |FD - analytic| / max |grad| " << err / scale);
          if (report())
            std::printf("  FD pooled aux %-40s %-8s %.2e\n", s.name.c_str(), what, err / scale);
          CHECK(err / scale <= 1e-6);
        };
        fd_check("x", p.x.data(), p.x.size(), g.dx.data());
        fd_check("router", p.router.data(), p.router.size(), g.drouter.data());
      }
      {  // the fast form against the reference, pooled
        const params p = draw_away_from_ties(s, 120, 32, E, 24, 16, 3e-5, 900 + i);
        auto c_tot = own_counts(p).first;
        for (index_t e = 0; e < E; ++e) c_tot[std::size_t(e)] += c_other[std::size_t(e)];
        const index_t T_tot = p.T + T_other;
        const auto r =
            reference::moe_backward<double>(p.x, ref_weights(p), route_of(s.opt), expert_of(s.opt),
                                            capacity_of(s.opt), p.dy, s.aux, s.z, c_tot, T_tot);
        fast_weights<float> fw;
        build(fw, p, s);
        const index_t T = p.T, D = p.D, I = p.I, S = p.S;
        tensor<float, 2> dx({T, D}), dr({E, D}), dsg({S, D}), dsu({S, D}), dsd({D, S}), dg1({1, D});
        tensor<float, 3> dg({E, I, D}), du({E, I, D}), dd({E, D, I});
        moe_grads g;
        g.dx = dx;
        g.drouter = dr;
        g.experts = moe_expert_grads::stacked(dg, du, dd);
        g.dshared_gate_proj = dsg;
        g.dshared_up = dsu;
        g.dshared_down = dsd;
        if (s.shared_gate) g.dshared_gate = dg1;
        moe_loss_weights lw{s.aux, s.z, c_tot, T_tot};
        moe_backward<float>(s.opt, fw.w, to_w<float>(p.x), to_w<float>(p.dy), g, lw);
        const auto cx = compare(r.dx, dx), cr = compare(r.drouter, dr);
        INFO("dx: " << cx.report << "\ndrouter: " << cr.report);
        CHECK(cx.rel_rms <= 2e-5);
        CHECK(cr.rel_rms <= 2e-5);
        // a wrong count length is named
        lw.pooled_counts = std::span<const double>(c_tot.data(), std::size_t(E - 1));
        CHECK_THROWS_WITH(
            moe_backward<float>(s.opt, fw.w, to_w<float>(p.x), to_w<float>(p.dy), g, lw),
            Catch::Contains("seqmix::moe_backward: argument 'losses.pooled_counts'"));
      }
    }
  }
}
