// SPDX-License-Identifier: MIT
// MoE block (issue 19): golden transformers blocks (Mixtral, Qwen3-MoE with and without
// norm_topk_prob, DeepSeek-V3, Qwen3-Next), the double reference vs both forms over random
// shapes, skewed and empty experts, capacity drops, layouts and bf16 weights, 1 vs N threads,
// steady-state allocation of the per-token form, losses pooled over layers, bad inputs.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include <seqmix/mixers/moe.hpp>
#include <seqmix/reference/moe.hpp>

#include "alloc_counter.hpp"
#include "golden.hpp"
#include "testing.hpp"

namespace {

using namespace seqmix;
using seqmix::testing::compare;
using moe_f = seqmix::moe<float>;
namespace km = seqmix::kernels::moe;

/// Weights of one random block, in float (the kernel) and double (the reference).
struct block {
  index_t E, D, I, S;
  tensor<float, 2> router;
  tensor<float, 1> bias;
  tensor<float, 3> gate, up, down;
  tensor<float, 2> sgate, sup, sdown, sg;
  tensor<double, 2> router_d, sgate_d, sup_d, sdown_d, sg_d;
  tensor<double, 1> bias_d;
  tensor<double, 3> gate_d, up_d, down_d;
};

block make_block(index_t E, index_t D, index_t I, index_t S, std::mt19937_64& rng,
                 double router_scale = 1.0) {
  using seqmix::testing::cast;
  using seqmix::testing::random_normal;
  block b{E, D, I, S, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}};
  b.router = random_normal<float, 2>({E, D}, rng, router_scale / std::sqrt(double(D)));
  b.bias = random_normal<float, 1>({E}, rng, 0.1);
  b.gate = random_normal<float, 3>({E, I, D}, rng, 1 / std::sqrt(double(D)));
  b.up = random_normal<float, 3>({E, I, D}, rng, 1 / std::sqrt(double(D)));
  b.down = random_normal<float, 3>({E, D, I}, rng, 1 / std::sqrt(double(I)));
  if (S > 0) {
    b.sgate = random_normal<float, 2>({S, D}, rng, 1 / std::sqrt(double(D)));
    b.sup = random_normal<float, 2>({S, D}, rng, 1 / std::sqrt(double(D)));
    b.sdown = random_normal<float, 2>({D, S}, rng, 1 / std::sqrt(double(S)));
    b.sg = random_normal<float, 2>({1, D}, rng, 1 / std::sqrt(double(D)));
    b.sgate_d = cast<double>(b.sgate);
    b.sup_d = cast<double>(b.sup);
    b.sdown_d = cast<double>(b.sdown);
    b.sg_d = cast<double>(b.sg);
  }
  b.router_d = cast<double>(b.router);
  b.bias_d = cast<double>(b.bias);
  b.gate_d = cast<double>(b.gate);
  b.up_d = cast<double>(b.up);
  b.down_d = cast<double>(b.down);
  return b;
}

moe_f::weights weights_of(const block& b, bool use_bias, bool shared, bool shared_gate,
                          bool gated = true) {
  moe_f::weights w;
  w.router = b.router;
  if (use_bias) w.score_bias = b.bias;
  w.experts = km::expert_set<float>::stacked(
      gated ? tensor_view<const float, 3>(b.gate) : tensor_view<const float, 3>{}, b.up, b.down);
  if (shared) {
    if (gated) w.shared.gate = b.sgate;
    w.shared.up = b.sup;
    w.shared.down = b.sdown;
    if (shared_gate) w.shared_gate = b.sg;
  }
  return w;
}

reference::moe_weights<double> ref_weights_of(const block& b, bool use_bias, bool shared,
                                              bool shared_gate, bool gated = true) {
  reference::moe_weights<double> w;
  w.router = b.router_d;
  if (use_bias) w.bias = b.bias_d;
  if (gated) w.gate = b.gate_d;
  w.up = b.up_d;
  w.down = b.down_d;
  if (shared) {
    if (gated) w.shared_gate_proj = b.sgate_d;
    w.shared_up = b.sup_d;
    w.shared_down = b.sdown_d;
    if (shared_gate) w.shared_gate = b.sg_d;
  }
  return w;
}

km::router_options route_of(const moe_f::options& o) {
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

/// Row t's ids as a sorted set.
std::vector<index_t> id_set(tensor_view<const index_t, 2> ids, index_t t) {
  std::vector<index_t> s;
  for (index_t j = 0; j < ids.extent(1); ++j) s.push_back(ids(t, j));
  std::sort(s.begin(), s.end());
  return s;
}

/// Outputs of one forward, with its router outputs.
struct run_out {
  tensor<float, 2> y, logits, weights;
  tensor<index_t, 2> ids;
  km::result res;
};

run_out run(const moe_f& m, tensor_view<const float, 2> x, bool grouped,
            moe_f::balance_stats* stats = nullptr) {
  const index_t T = x.extent(0), k = m.get_options().top_k;
  run_out r{tensor<float, 2>({T, m.model_dim()}),
            tensor<float, 2>({T, m.num_experts()}),
            tensor<float, 2>({T, k}),
            tensor<index_t, 2>({T, k}),
            {}};
  km::router_outputs out{r.logits, r.ids, r.weights};
  r.res = grouped ? m.forward_grouped(x, r.y, out, stats) : m.forward_per_token(x, r.y, out);
  return r;
}

bool bitwise_equal(const tensor<float, 2>& a, const tensor<float, 2>& b) {
  return a.shape() == b.shape() &&
         std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.size()) * sizeof(float)) == 0;
}

/// Reference vs a form: ids as sets per token (a near-tie in float vs double may flip a choice:
/// such tokens are counted and excluded, and at most `max_flips` are allowed), y, logits and
/// the weights of the matching tokens.
void check_against_reference(const reference::moe_result<double>& ref, const run_out& out,
                             index_t max_flips, double tol = 1e-5) {
  const index_t T = ref.y.extent(0), D = ref.y.extent(1), k = ref.ids.extent(1);
  index_t flips = 0;
  tensor<double, 2> ry({T, D});
  tensor<float, 2> oy({T, D});
  std::vector<index_t> rows;
  for (index_t t = 0; t < T; ++t) {
    if (id_set(ref.ids, t) != id_set(out.ids, t)) {
      ++flips;
      continue;
    }
    rows.push_back(t);
  }
  INFO("tokens whose chosen experts differ from the double reference (near-ties): " << flips);
  REQUIRE(flips <= max_flips);
  tensor<double, 2> ryk({index_t(rows.size()), D});
  tensor<float, 2> oyk({index_t(rows.size()), D});
  tensor<double, 2> rw({index_t(rows.size()), k});
  tensor<float, 2> ow({index_t(rows.size()), k});
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const index_t t = rows[i];
    for (index_t d = 0; d < D; ++d) {
      ryk(index_t(i), d) = ref.y(t, d);
      oyk(index_t(i), d) = out.y(t, d);
    }
    // weights matched by expert id
    for (index_t j = 0; j < k; ++j) {
      for (index_t jj = 0; jj < k; ++jj) {
        if (out.ids(t, jj) == ref.ids(t, j)) {
          rw(index_t(i), j) = ref.weights(t, j);
          ow(index_t(i), j) = out.weights(t, jj);
        }
      }
    }
  }
  const auto cy = compare(ryk, oyk);
  INFO("y: " << cy.report);
  CHECK(cy.rel_rms <= tol);
  const auto cw = compare(rw, ow);
  INFO("weights: " << cw.report);
  CHECK(cw.rel_rms <= tol);
  const auto cl = compare(ref.logits, out.logits);
  INFO("logits: " << cl.report);
  CHECK(cl.rel_rms <= tol);
  if (flips == 0) {
    CHECK(std::abs(out.res.aux_loss - ref.aux_loss) <= 1e-6 * std::abs(ref.aux_loss));
    // z = mean(lse²): an f32 error δ of the logits moves it by ~2·sqrt(z)·δ, which dominates
    // 1e-5·z when lse is near 0 (δ ~ 4e-7 for these logits)
    CHECK(std::abs(out.res.z_loss - ref.z_loss) <=
          1e-5 * std::abs(ref.z_loss) + 2e-6 * std::sqrt(std::abs(ref.z_loss)));
    CHECK(out.res.dropped == ref.dropped);
  }
}

// ---- golden ------------------------------------------------------------------------------

struct golden_block {
  const char* name;
  const char* weights;  // prefix of the w.* tensors
  moe_f::options opt;
  bool bias, shared, shared_gate;
  const char* shared_prefix;
};

}  // namespace

TEST_CASE("moe: golden transformers MoE blocks, both forms and the reference", "[moe][golden]") {
  const auto& f = seqmix::testing::golden::file("v2/moe_blocks");
  const golden_block blocks[] = {
      {"mixtral", "mixtral", moe_f::options::mixtral(2), false, false, false, ""},
      {"qwen3_moe_norm", "qwen3_moe_norm", moe_f::options::qwen_moe(true, 2), false, false, false,
       ""},
      {"qwen3_moe_nonorm", "qwen3_moe_norm", moe_f::options::qwen_moe(false, 2), false, false,
       false, ""},
      {"deepseek_v3", "deepseek_v3", moe_f::options::deepseek_v3(4, 2, 2.5f, 2), true, true, false,
       "shared_experts"},
      {"qwen3_next", "qwen3_next", moe_f::options::qwen_moe(true, 2), false, true, true,
       "shared_expert"},
  };
  for (const auto& b : blocks) {
    DYNAMIC_SECTION(b.name) {
      const std::string n = b.name, w = std::string(b.weights) + ".w.";
      const auto x = f.get<float, 2>(n + ".x");
      const auto y_ref = f.get<float, 2>(n + ".y");
      const auto logits_ref = f.get<float, 2>(n + ".router_logits");
      const auto ids_ref = f.get<index_t, 2>(n + ".topk_ids_sorted");
      const auto wts_ref = f.get<float, 2>(n + ".topk_weights_sorted");
      const double aux_ref = f.get_flat<double>(n + ".load_balancing_loss")[0];
      const double z_ref = f.get_flat<double>(n + ".router_z_loss")[0];
      const auto router = f.get<float, 2>(w + "gate.weight");
      const auto gate_up = f.get<float, 3>(w + "experts.gate_up_proj");
      const auto down = f.get<float, 3>(w + "experts.down_proj");
      tensor<float, 1> bias;
      tensor<float, 2> sgate, sup, sdown, sg;
      moe_f::weights wt;
      wt.router = router;
      wt.experts = km::expert_set<float>::fused(gate_up, down);
      if (b.bias) {
        bias = f.get<float, 1>(w + "gate.e_score_correction_bias");
        wt.score_bias = bias;
      }
      if (b.shared) {
        const std::string sp = w + b.shared_prefix;
        sgate = f.get<float, 2>(sp + ".gate_proj.weight");
        sup = f.get<float, 2>(sp + ".up_proj.weight");
        sdown = f.get<float, 2>(sp + ".down_proj.weight");
        wt.shared.gate = sgate;
        wt.shared.up = sup;
        wt.shared.down = sdown;
        if (b.shared_gate) {
          sg = f.get<float, 2>(w + "shared_expert_gate.weight");
          wt.shared_gate = sg;
        }
      }
      const moe_f m(b.opt, wt);
      const index_t T = x.extent(0), k = 2;
      for (const bool grouped : {true, false}) {
        INFO((grouped ? "forward_grouped" : "forward_per_token"));
        const auto r = run(m, x, grouped);
        const auto cy = compare(y_ref, r.y);
        INFO("y: " << cy.report);
        CHECK(cy.rel_rms <= 1e-5);
        const auto cl = compare(logits_ref, r.logits);
        INFO("router_logits: " << cl.report);
        CHECK(cl.rel_rms <= 1e-5);
        // ids as sets; weights sorted by expert id
        tensor<float, 2> wsorted({T, k});
        index_t mismatched = 0;
        for (index_t t = 0; t < T; ++t) {
          const auto s = id_set(r.ids, t);
          for (index_t j = 0; j < k; ++j) {
            if (s[std::size_t(j)] != ids_ref(t, j)) ++mismatched;
            for (index_t jj = 0; jj < k; ++jj) {
              if (r.ids(t, jj) == s[std::size_t(j)]) wsorted(t, j) = r.weights(t, jj);
            }
          }
        }
        CHECK(mismatched == 0);
        const auto cw = compare(wts_ref, wsorted);
        INFO("topk_weights: " << cw.report);
        CHECK(cw.rel_rms <= 1e-5);
        CHECK(std::abs(r.res.aux_loss - aux_ref) <= 1e-5 * aux_ref);
        CHECK(std::abs(r.res.z_loss - z_ref) <= 1e-5 * z_ref);
        CHECK(r.res.dropped == 0);
        WARN(n << (grouped ? " grouped" : " per-token") << ": y rel-RMS " << cy.rel_rms
               << ", logits " << cl.rel_rms << ", weights " << cw.rel_rms << ", aux "
               << r.res.aux_loss << " vs " << aux_ref << ", z " << r.res.z_loss << " vs " << z_ref);
      }
      // the plain reference on the same data
      tensor<double, 2> xd = seqmix::testing::cast<double>(x);
      tensor<double, 2> rd = seqmix::testing::cast<double>(router);
      tensor<double, 3> gu = seqmix::testing::cast<double>(gate_up);
      tensor<double, 3> dd = seqmix::testing::cast<double>(down);
      const index_t I = gu.extent(1) / 2;
      tensor_view<const double, 3> guv = gu;
      reference::moe_weights<double> rw;
      rw.router = rd;
      rw.gate = guv.slice<1>(0, I);
      rw.up = guv.slice<1>(I, 2 * I);
      rw.down = dd;
      tensor<double, 1> bd;
      tensor<double, 2> sgd, sud, sdd, sggd;
      if (b.bias) {
        bd = seqmix::testing::cast<double>(bias);
        rw.bias = bd;
      }
      if (b.shared) {
        sgd = seqmix::testing::cast<double>(sgate);
        sud = seqmix::testing::cast<double>(sup);
        sdd = seqmix::testing::cast<double>(sdown);
        rw.shared_gate_proj = sgd;
        rw.shared_up = sud;
        rw.shared_down = sdd;
        if (b.shared_gate) {
          sggd = seqmix::testing::cast<double>(sg);
          rw.shared_gate = sggd;
        }
      }
      const auto ref = reference::moe<double>(xd, rw, route_of(b.opt), {});
      const auto cr = compare(y_ref, ref.y);
      INFO("reference y: " << cr.report);
      CHECK(cr.rel_rms <= 1e-5);
      CHECK(std::abs(ref.aux_loss - aux_ref) <= 1e-5 * aux_ref);
      CHECK(std::abs(ref.z_loss - z_ref) <= 1e-5 * z_ref);
      // the pooled-loss free functions on the stored logits
      const tensor_view<const float, 2> lv = logits_ref;
      CHECK(std::abs(km::load_balancing_loss({&lv, 1}, 2) - aux_ref) <= 1e-5 * aux_ref);
      CHECK(std::abs(km::router_z_loss(lv) - z_ref) <= 1e-5 * z_ref);
    }
  }
}

TEST_CASE("moe: reference vs both forms over random shapes and routers", "[moe]") {
  const index_t Es[] = {1, 2, 8, 64}, ks[] = {1, 2, 8}, Ts[] = {1, 7, 512};
  int combo = 0;
  for (index_t E : Es) {
    for (index_t k : ks) {
      if (k > E) continue;
      for (index_t T : Ts) {
        ++combo;
        const int kind = combo % 4;  // 0 softmax_topk, 1 +renorm, 2 topk_softmax, 3 sigmoid_bias
        const index_t D = 37, I = 23, S = combo % 2 ? 19 : 0;
        moe_f::options o;
        o.top_k = k;
        if (kind == 1) o.renormalize = true;
        if (kind == 2) o.router = km::router_kind::topk_softmax;
        if (kind == 3) {
          o.router = km::router_kind::sigmoid_bias;
          o.renormalize = true;
          o.routed_scaling_factor = 1.7f;
          if (E >= 8) {
            o.n_group = 4;
            o.topk_group = 2;
          }
        }
        const bool bias = kind == 3, shared = S > 0, sgate = combo % 4 == 1;
        // Catch2 runs the test case once per section and replays everything outside the
        // sections each time: every combination draws its inputs inside its own section from a
        // generator seeded by the combination (the same inputs on every replay, none drawn for
        // the sections that are skipped).
        DYNAMIC_SECTION("E " << E << " k " << k << " T " << T << " router kind " << kind
                             << " shared " << S) {
          auto rng = seqmix::testing::make_rng(1900 + std::uint64_t(combo));
          auto b = make_block(E, D, I, S, rng, 3.0);
          const auto x = seqmix::testing::random_normal<float, 2>({T, D}, rng);
          const moe_f m(o, weights_of(b, bias, shared, sgate));
          const auto xd = seqmix::testing::cast<double>(x);
          const auto ref =
              reference::moe<double>(xd, ref_weights_of(b, bias, shared, sgate), route_of(o), {});
          const auto g = run(m, x, true);
          const auto p = run(m, x, false);
          check_against_reference(ref, g, std::max<index_t>(1, T / 128));
          check_against_reference(ref, p, std::max<index_t>(1, T / 128));
          // the two forms: same routing bit for bit, outputs equal to rounding
          CHECK(std::memcmp(g.ids.data(), p.ids.data(), std::size_t(T * k) * sizeof(index_t)) == 0);
          CHECK(bitwise_equal(g.weights, p.weights));
          CHECK(bitwise_equal(g.logits, p.logits));
          const auto c = compare(g.y, p.y);
          INFO("grouped vs per-token: " << c.report);
          CHECK(c.rel_rms <= 1e-6);
          CHECK(g.res.aux_loss == Approx(p.res.aux_loss).epsilon(1e-12));
          CHECK(g.res.z_loss == Approx(p.res.z_loss).epsilon(1e-12));
        }
      }
    }
  }
}

TEST_CASE("moe: all tokens to one expert, experts without tokens", "[moe]") {
  auto rng = seqmix::testing::make_rng(23);
  const index_t E = 8, D = 41, I = 29, T = 300;
  auto b = make_block(E, D, I, 0, rng);
  // x > 0 everywhere; router row 3 = +1 (logit ~ D), row 5 = -1: expert 3 takes every token's
  // first choice, expert 5 never gets one.
  auto x = seqmix::testing::random_uniform<float, 2>({T, D}, rng, 0.5, 1.5);
  for (index_t d = 0; d < D; ++d) {
    b.router(3, d) = 1.0f;
    b.router(5, d) = -1.0f;
    b.router_d(3, d) = 1.0;
    b.router_d(5, d) = -1.0;
  }
  const auto xd = seqmix::testing::cast<double>(x);
  for (const index_t k : {index_t(1), index_t(2)}) {
    DYNAMIC_SECTION("k " << k) {
      auto o = moe_f::options::mixtral(k);
      const moe_f m(o, weights_of(b, false, false, false));
      const auto ref =
          reference::moe<double>(xd, ref_weights_of(b, false, false, false), route_of(o), {});
      for (const bool grouped : {true, false}) {
        const auto r = run(m, x, grouped);
        for (index_t t = 0; t < T; ++t) {
          REQUIRE(r.ids(t, 0) == 3);
          for (index_t j = 0; j < k; ++j) REQUIRE(r.ids(t, j) != 5);
        }
        check_against_reference(ref, r, 2);
      }
    }
  }
}

TEST_CASE("moe: capacity drops exactly as specified", "[moe]") {
  auto rng = seqmix::testing::make_rng(29);
  const index_t E = 4, D = 19, I = 13, S = 11, T = 40, k = 2;
  auto b = make_block(E, D, I, S, rng);
  // skew: expert 0 is everybody's favourite
  auto x = seqmix::testing::random_uniform<float, 2>({T, D}, rng, 0.2, 1.0);
  for (index_t d = 0; d < D; ++d) {
    b.router(0, d) = 0.3f;
    b.router_d(0, d) = 0.3;
  }
  const auto xd = seqmix::testing::cast<double>(x);
  for (const auto policy : {km::drop_policy::by_position, km::drop_policy::by_score}) {
    for (const float factor : {0.5f, 1.0f, 1.25f}) {
      DYNAMIC_SECTION("policy " << int(policy) << " factor " << factor) {
        auto o = moe_f::options::qwen_moe(false, k);
        o.capacity_factor = factor;
        o.drop = policy;
        const moe_f m(o, weights_of(b, false, true, false));
        km::capacity_options co{factor, policy};
        const auto ref =
            reference::moe<double>(xd, ref_weights_of(b, false, true, false), route_of(o), {}, co);
        const index_t C = index_t(std::ceil(double(T * k) / double(E) * double(factor)));
        for (const bool grouped : {true, false}) {
          const auto r = run(m, x, grouped);
          CHECK(r.res.capacity == C);
          // dropped = Σ_e max(0, n_e - C) from the returned ids
          std::vector<index_t> n(std::size_t(E), 0);
          for (index_t t = 0; t < T; ++t)
            for (index_t j = 0; j < k; ++j) ++n[std::size_t(r.ids(t, j))];
          index_t expect = 0;
          for (index_t c : n) expect += std::max<index_t>(0, c - C);
          CHECK(r.res.dropped == expect);
          CHECK(r.res.dropped == ref.dropped);
          if (factor == 0.5f) CHECK(r.res.dropped > 0);
          check_against_reference(ref, r, 0);
          // by position: the dropped assignments of expert 0 are exactly its latest tokens
          if (policy == km::drop_policy::by_position) {
            index_t seen = 0;
            for (index_t t = 0; t < T; ++t) {
              for (index_t j = 0; j < k; ++j) {
                if (r.ids(t, j) != 0) continue;
                CHECK(bool(ref.kept(t, j)) == (seen < C));
                ++seen;
              }
            }
          }
        }
      }
    }
  }
}

TEST_CASE("moe: layouts, bf16 weights, activations", "[moe]") {
  auto rng = seqmix::testing::make_rng(31);
  const index_t E = 8, D = 45, I = 27, T = 77;
  auto b = make_block(E, D, I, 0, rng, 2.0);
  const auto x = seqmix::testing::random_normal<float, 2>({T, D}, rng);
  const auto xd = seqmix::testing::cast<double>(x);
  const auto o = moe_f::options::mixtral(2);

  SECTION("fused [E, 2I, D] and per-expert matrices give the stacked result bit for bit") {
    const moe_f stacked(o, weights_of(b, false, false, false));
    tensor<float, 3> gu({E, 2 * I, D});
    for (index_t e = 0; e < E; ++e)
      for (index_t i = 0; i < I; ++i)
        for (index_t d = 0; d < D; ++d) {
          gu(e, i, d) = b.gate(e, i, d);
          gu(e, I + i, d) = b.up(e, i, d);
        }
    moe_f::weights wf;
    wf.router = b.router;
    wf.experts = km::expert_set<float>::fused(gu, b.down);
    const moe_f fused(o, wf);
    moe_f::weights wp;
    wp.router = b.router;
    const tensor_view<const float, 3> gv = b.gate, uv = b.up, dv = b.down;
    for (index_t e = 0; e < E; ++e)
      wp.experts.add(gv.select<0>(e), uv.select<0>(e), dv.select<0>(e));
    const moe_f per(o, wp);
    for (const bool grouped : {true, false}) {
      const auto a = run(stacked, x, grouped), f1 = run(fused, x, grouped),
                 p1 = run(per, x, grouped);
      CHECK(bitwise_equal(a.y, f1.y));
      CHECK(bitwise_equal(a.y, p1.y));
    }
  }
  SECTION("bf16 weights equal f32 weights holding the same (widened) values, bit for bit") {
    auto to_bf = [](const auto& t) {
      using V = std::remove_cvref_t<decltype(t)>;
      constexpr std::size_t R = V::rank;
      tensor<bf16, R> r(t.shape());
      for (index_t i = 0; i < t.size(); ++i) r[i] = bf16_from_float(t[i]);
      return r;
    };
    auto widen = [](const auto& t) {
      using V = std::remove_cvref_t<decltype(t)>;
      constexpr std::size_t R = V::rank;
      tensor<float, R> r(t.shape());
      for (index_t i = 0; i < t.size(); ++i) r[i] = to_float(t[i]);
      return r;
    };
    const auto rb = to_bf(b.router);
    const auto gb = to_bf(b.gate), ub = to_bf(b.up), db = to_bf(b.down);
    const auto rf = widen(rb);
    const auto gf = widen(gb), uf = widen(ub), df = widen(db);
    seqmix::moe<bf16>::weights wb;
    wb.router = rb;
    wb.experts = km::expert_set<bf16>::stacked(gb, ub, db);
    const seqmix::moe<bf16> mb(o, wb);
    moe_f::weights wf;
    wf.router = rf;
    wf.experts = km::expert_set<float>::stacked(gf, uf, df);
    const moe_f mf(o, wf);
    for (const bool grouped : {true, false}) {
      tensor<float, 2> yb({T, D});
      const auto r = run(mf, x, grouped);
      if (grouped) {
        mb.forward_grouped(x, yb);
      } else {
        mb.forward_per_token(x, yb);
      }
      CHECK(bitwise_equal(yb, r.y));
    }
  }
  SECTION("GELU, GELU-tanh, ReLU² and non-gated experts vs the reference") {
    for (const auto act : {km::expert_activation::gelu, km::expert_activation::gelu_tanh,
                           km::expert_activation::relu2}) {
      for (const bool gated : {true, false}) {
        auto oo = o;
        oo.activation = act;
        oo.gated = gated;
        const moe_f m(oo, weights_of(b, false, false, false, gated));
        km::expert_options eo{act, gated};
        const auto ref = reference::moe<double>(xd, ref_weights_of(b, false, false, false, gated),
                                                route_of(oo), eo);
        INFO("activation " << int(act) << " gated " << gated);
        check_against_reference(ref, run(m, x, true), 1,
                                act == km::expert_activation::gelu ? 3e-5 : 1e-5);
        check_against_reference(ref, run(m, x, false), 1,
                                act == km::expert_activation::gelu ? 3e-5 : 1e-5);
      }
    }
  }
}

TEST_CASE("moe: 1 vs N threads bitwise, skewed routing", "[moe]") {
  auto rng = seqmix::testing::make_rng(37);
  const index_t E = 8, D = 64, I = 48, S = 40, T = 512;
  auto b = make_block(E, D, I, S, rng);
  auto x = seqmix::testing::random_uniform<float, 2>({T, D}, rng, -0.2, 1.0);
  for (index_t d = 0; d < D; ++d) b.router(2, d) = 0.4f;  // skew: expert 2 takes most tokens
  for (const bool capacity : {false, true}) {
    auto o = moe_f::options::qwen_moe(true, 2);
    if (capacity) o.capacity_factor = 1.5f;
    const moe_f m(o, weights_of(b, false, true, true));
    run_out one_g, one_p;
    {
      const seqmix::scoped_num_threads st(1);
      one_g = run(m, x, true);
      one_p = run(m, x.view().slice<0>(0, 5), false);
    }
    for (const int n : {2, 3}) {
      const seqmix::scoped_num_threads st(n);
      seqmix::testing::require_team(n);
      moe_f::balance_stats stats;
      const auto g = run(m, x, true, &stats);
      const auto p = run(m, x.view().slice<0>(0, 5), false);
      CHECK(bitwise_equal(one_g.y, g.y));
      CHECK(bitwise_equal(one_p.y, p.y));
      CHECK(one_g.res.aux_loss == g.res.aux_loss);
      CHECK(one_g.res.z_loss == g.res.z_loss);
      CHECK(one_g.res.dropped == g.res.dropped);
      CHECK(stats.busy_seconds.size() == std::size_t(n));
      CHECK(stats.items >= 2);
    }
  }
}

TEST_CASE("moe: pack_experts: both forms on packed experts", "[moe][packed]") {
  // grouped: groups of > 8 rows take the same GEMM chains packed or not (bitwise); smaller
  // groups the panels' GEMV (rounding). Per token: every GEMV on the panels (rounding against
  // the checkpoint layout). Every case against the double reference; 1 vs N threads bitwise.
  auto rng = seqmix::testing::make_rng(39);
  for (const auto [E, D, I, S, T] :
       {std::array<index_t, 5>{4, 64, 48, 40, 200}, {8, 37, 70, 0, 61}, {16, 50, 33, 21, 7}}) {
    for (const bool is_gated : {true, false}) {
      const auto b = make_block(E, D, I, S, rng);
      const auto x = seqmix::testing::random_normal<float, 2>({T, D}, rng, 1.0);
      auto o = moe_f::options::qwen_moe(true, 2);
      o.gated = is_gated;
      o.pack_experts = false;
      const moe_f plain(o, weights_of(b, false, S > 0, S > 0, is_gated));
      o.pack_experts = true;
      const moe_f packed(o, weights_of(b, false, S > 0, S > 0, is_gated));
      const auto want = run(plain, x, true);
      const auto got = run(packed, x, true);
      INFO("E=" << E << " D=" << D << " I=" << I << " S=" << S << " T=" << T << " gated "
                << is_gated);
      if (T == 200) CHECK(bitwise_equal(want.y, got.y));  // ~100 rows per expert
      const auto c = compare(want.y, got.y);
      INFO(c.report);
      CHECK(c.rel_rms <= 1e-6);
      const auto xd = seqmix::testing::cast<double>(x);
      const auto ref = reference::moe<double>(xd, ref_weights_of(b, false, S > 0, S > 0, is_gated),
                                              route_of(o), {o.activation, o.gated});
      check_against_reference(ref, got, 2);
      const auto want_p = run(plain, x, false);
      const auto got_p = run(packed, x, false);
      const auto cp = compare(want_p.y, got_p.y);
      INFO("per token: " << cp.report);
      CHECK(cp.rel_rms <= 1e-6);
      check_against_reference(ref, got_p, 2);
      for (const int n : {2, 3}) {
        const seqmix::scoped_num_threads st(n);
        seqmix::testing::require_team(n);
        CHECK(bitwise_equal(got.y, run(packed, x, true).y));
        CHECK(bitwise_equal(got_p.y, run(packed, x, false).y));
      }
    }
  }
}

TEST_CASE("moe: per-token form allocates nothing in steady state", "[moe]") {
  auto rng = seqmix::testing::make_rng(41);
  const index_t E = 16, D = 50, I = 33, S = 21;
  auto b = make_block(E, D, I, S, rng);
  const auto x = seqmix::testing::random_normal<float, 2>({3, D}, rng);
  auto o = moe_f::options::deepseek_v3(4, 2, 2.0f, 4);
  o.pack_experts = false;
  const moe_f m(o, weights_of(b, true, true, false));
  o.pack_experts = true;
  const moe_f mp(o, weights_of(b, true, true, false));
  tensor<float, 2> y({3, D});
  tensor<float, 1> y1({D});
  tensor<float, 2> logits({3, E}), w({3, 4});
  tensor<index_t, 2> ids({3, 4});
  for (const moe_f* mm : {&m, &mp}) {
    for (const int n : {1, 2}) {
      const seqmix::scoped_num_threads st(n);
      mm->forward_per_token(x, y, {logits, ids, w});  // warm-up: scratch grows
      mm->step(x.view().select<0>(0), y1);
      INFO("packed " << (mm == &mp) << ", threads " << n);  // (its string outside the scope)
      const seqmix::testing::allocation_scope scope;
      for (int rep = 0; rep < 3; ++rep) {
        mm->forward_per_token(x, y, {logits, ids, w});
        mm->step(x.view().select<0>(1), y1);
      }
      CHECK(scope.stats().count == 0);
    }
  }
  // the grouped form allocates nothing in steady state either (thread_local scratch)
  {
    const auto xg = seqmix::testing::random_normal<float, 2>({40, D}, rng);
    tensor<float, 2> yg({40, D});
    m.forward_grouped(xg, yg);
    const seqmix::testing::allocation_scope scope;
    m.forward_grouped(xg, yg);
    CHECK(scope.stats().count == 0);
  }
  // forward(): one token per token form, from 2 tokens the grouped form (bit for bit)
  {
    tensor<float, 2> y_f({1, D}), y_p({1, D}), y3({3, D}), y3g({3, D});
    m.forward(x.view().slice<0>(0, 1), y_f);
    m.forward_per_token(x.view().slice<0>(0, 1), y_p);
    CHECK(std::memcmp(y_f.data(), y_p.data(), sizeof(float) * std::size_t(D)) == 0);
    m.forward(x, y3);
    m.forward_grouped(x, y3g);
    CHECK(std::memcmp(y3.data(), y3g.data(), sizeof(float) * std::size_t(3 * D)) == 0);
  }
  // step == row of forward_per_token
  tensor<float, 2> yy({3, D});
  m.forward_per_token(x, yy);
  m.step(x.view().select<0>(2), y1);
  for (index_t d = 0; d < D; ++d) CHECK(y1(d) == yy(2, d));
}

TEST_CASE("moe: losses pool over layers like transformers' concatenation", "[moe]") {
  auto rng = seqmix::testing::make_rng(43);
  const auto a = seqmix::testing::random_normal<float, 2>({13, 6}, rng, 2.0);
  const auto c = seqmix::testing::random_normal<float, 2>({20, 6}, rng, 2.0);
  tensor<float, 2> cat({33, 6});
  for (index_t t = 0; t < 33; ++t)
    for (index_t e = 0; e < 6; ++e) cat(t, e) = t < 13 ? a(t, e) : c(t - 13, e);
  const tensor_view<const float, 2> layers[] = {a, c};
  const tensor_view<const float, 2> whole[] = {cat};
  CHECK(km::load_balancing_loss(layers, 2) ==
        Approx(km::load_balancing_loss(whole, 2)).epsilon(1e-14));
  // uniform logits: every expert equally likely, the minimum k is reached when ties spread...
  // here ties go to the lower experts, so f is concentrated: loss = E · Σ_{e<k} (1)·(1/E) = k
  const tensor<float, 2> uniform({10, 6});
  const tensor_view<const float, 2> u[] = {uniform};
  CHECK(km::load_balancing_loss(u, 2) == Approx(2.0).epsilon(1e-12));
  CHECK(km::router_z_loss(uniform) == Approx(std::log(6.0) * std::log(6.0)).epsilon(1e-12));
}

TEST_CASE("moe: bad inputs raise shape_error naming function, argument and values", "[moe]") {
  auto rng = seqmix::testing::make_rng(47);
  const index_t E = 8, D = 16, I = 8, T = 5;
  auto b = make_block(E, D, I, 6, rng);
  auto x = seqmix::testing::random_normal<float, 2>({T, D}, rng);
  tensor<float, 2> y({T, D});
  using Catch::Matchers::Contains;
  auto msg = [](auto&& f) -> std::string {
    try {
      f();
    } catch (const seqmix::shape_error& e) {
      return e.what();
    }
    return "no shape_error";
  };
  SECTION("k > E") {
    const auto s =
        msg([&] { moe_f m(moe_f::options::mixtral(9), weights_of(b, false, false, false)); });
    CHECK_THAT(s, Contains("seqmix::moe: argument 'options.top_k'") && Contains("<= E = 8") &&
                      Contains("got 9"));
  }
  SECTION("k = 0") {
    const auto s =
        msg([&] { moe_f m(moe_f::options::mixtral(0), weights_of(b, false, false, false)); });
    CHECK_THAT(s, Contains("'options.top_k'") && Contains("got 0"));
  }
  SECTION("NaN in the router logits") {
    const moe_f m(moe_f::options::mixtral(2), weights_of(b, false, false, false));
    x(3, 7) = std::numeric_limits<float>::quiet_NaN();
    const auto s1 = msg([&] { m.forward_grouped(x, y); });
    CHECK_THAT(s1, Contains("seqmix::moe::forward_grouped: argument 'x'") && Contains("NaN") &&
                       Contains("token 3"));
    const auto s2 = msg([&] { m.forward_per_token(x, y); });
    CHECK_THAT(s2, Contains("seqmix::moe::forward_per_token: argument 'x'") && Contains("NaN"));
  }
  SECTION("bad shapes") {
    const moe_f m(moe_f::options::mixtral(2), weights_of(b, false, false, false));
    tensor<float, 2> x2({T, D + 1}), y2({T + 1, D});
    CHECK_THAT(msg([&] { m.forward_grouped(x2, y); }),
               Contains("argument 'x'") && Contains("expected shape [any, 16], got [5, 17]"));
    CHECK_THAT(msg([&] { m.forward(x, y2); }),
               Contains("seqmix::moe::forward: argument 'y'") && Contains("[5, 16], got [6, 16]"));
    tensor<index_t, 2> ids({T, 3});
    CHECK_THAT(msg([&] {
                 m.forward_grouped(x, y, {{}, ids, {}});
               }),
               Contains("'out.ids'") && Contains("expected shape [5, 2], got [5, 3]"));
    CHECK_THAT(msg([&] { m.forward_grouped(x, x.view()); }),
               Contains("argument 'y'") && Contains("must not share memory"));
    auto w = weights_of(b, false, false, false);
    w.experts.up.pop_back();
    w.experts.gate.pop_back();
    w.experts.down.pop_back();
    CHECK_THAT(
        msg([&] { moe_f mm(moe_f::options::mixtral(2), w); }),
        Contains("'weights.experts'") && Contains("expected E = 8 experts") && Contains("got 7"));
    auto w2 = weights_of(b, false, false, false);
    const tensor_view<const float, 3> dv = b.down;
    w2.experts.down[3] = dv.select<0>(3).slice<1>(0, I - 1);
    CHECK_THAT(
        msg([&] { moe_f mm(moe_f::options::mixtral(2), w2); }),
        Contains("'weights.experts.down[3]'") && Contains("expected shape [16, 8], got [16, 7]"));
  }
  SECTION("bad options") {
    auto o = moe_f::options::deepseek_v3(3, 1, 2.5f, 2);
    CHECK_THAT(msg([&] { moe_f m(o, weights_of(b, true, false, false)); }),
               Contains("'options.n_group'") && Contains("divide E = 8") && Contains("got 3"));
    o = moe_f::options::deepseek_v3(4, 5, 2.5f, 2);
    CHECK_THAT(msg([&] { moe_f m(o, weights_of(b, true, false, false)); }),
               Contains("'options.topk_group'") && Contains("got 5"));
    o = moe_f::options::deepseek_v3(8, 1, 2.5f, 2);
    CHECK_THAT(msg([&] { moe_f m(o, weights_of(b, true, false, false)); }),
               Contains("'options.n_group'") && Contains("E / n_group must be >= 2"));
    auto q = moe_f::options::mixtral(2);
    q.capacity_factor = -1;
    CHECK_THAT(msg([&] { moe_f m(q, weights_of(b, false, false, false)); }),
               Contains("'options.capacity_factor'") && Contains("got -1"));
    q = moe_f::options::mixtral(2);
    q.routed_scaling_factor = std::numeric_limits<float>::infinity();
    CHECK_THAT(msg([&] { moe_f m(q, weights_of(b, false, false, false)); }),
               Contains("'options.routed_scaling_factor'") && Contains("+inf"));
    CHECK_THAT(msg([&] { moe_f m(moe_f::options::mixtral(2), weights_of(b, true, false, false)); }),
               Contains("'weights.score_bias'") && Contains("sigmoid_bias"));
    auto w = weights_of(b, false, false, false);
    w.shared_gate = b.sg;
    CHECK_THAT(msg([&] { moe_f m(moe_f::options::mixtral(2), w); }),
               Contains("'weights.shared_gate'"));
    const tensor<float, 2> bad({4, 7});
    const tensor_view<const float, 2> lv[] = {bad};
    CHECK_THAT(msg([&] { (void)km::load_balancing_loss(lv, 8); }),
               Contains("seqmix::moe::load_balancing_loss: argument 'top_k'") && Contains("got 8"));
  }
}
