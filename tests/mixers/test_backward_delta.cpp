// SPDX-License-Identifier: MIT
// Backward of the DPLR family (mixers/backward.hpp over kernels/backward/dplr.hpp; the double
// references of reference/backward.hpp): DeltaNet, Gated DeltaNet, KDA, RWKV-7, RWKV-6. Golden
// gradients of tests/golden/v2/grads.safetensors (all but KDA), finite differences in double of
// every input (chunk boundaries inside the sequence, T not a multiple of C, GVA, varlen with an
// empty sequence, gates near -1e4), split sequence == whole, 1 vs 2 threads bitwise, argument
// errors, and a warm call allocating nothing.
#include <cmath>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include <seqmix/core/parallel.hpp>
#include <seqmix/mixers/backward.hpp>
#include <seqmix/mixers/delta_net.hpp>
#include <seqmix/mixers/gated_delta_net.hpp>
#include <seqmix/mixers/rwkv6.hpp>
#include <seqmix/mixers/rwkv7.hpp>
#include <seqmix/reference/backward.hpp>
#include <seqmix/reference/delta_rule.hpp>
#include <seqmix/reference/gated_accumulation.hpp>

#include "../support/alloc_counter.hpp"
#include "../support/golden.hpp"
#include "../support/testing.hpp"

using seqmix::index_t;
using seqmix::tensor;
using seqmix::tensor_view;

namespace {

enum class op { delta, gdn, kda, rwkv7, rwkv6 };
const char* op_name(op o) {
  switch (o) {
    case op::delta:
      return "delta_rule";
    case op::gdn:
      return "gated_delta_rule";
    case op::kda:
      return "kda";
    case op::rwkv7:
      return "rwkv7";
    case op::rwkv6:
      return "rwkv6";
  }
  return "?";
}
bool is_delta(op o) {
  return o == op::delta || o == op::gdn || o == op::kda;
}
bool is_rwkv(op o) {
  return o == op::rwkv7 || o == op::rwkv6;
}

/// Inputs (double; the float runs cast them). q is RWKV's r, gk KDA's g or RWKV's w.
struct inputs {
  op kind = op::delta;
  tensor<double, 4> q, k, v, gk, a, b, h0, do_, dht;
  tensor<double, 3> g, beta;
  tensor<double, 2> u;
  std::vector<index_t> cu;
  std::optional<double> scale;
};

/// Every gradient by input name, plus the forward's o (references only) and final state.
struct grads {
  tensor<double, 4> q, k, v, gk, a, b, h0, ht, o;
  tensor<double, 3> g, beta;
  tensor<double, 2> u;
};

template <class T, std::size_t R>
tensor_view<const T, R> opt(const tensor<T, R>& t) {
  return t.size() ? t.view() : tensor_view<const T, R>{};
}
index_t sequences(const inputs& in) {
  return in.cu.empty() ? in.q.extent(0) : static_cast<index_t>(in.cu.size()) - 1;
}
double scale_of(const inputs& in) {
  if (in.scale) return *in.scale;
  return is_rwkv(in.kind) ? 1.0 : 1.0 / std::sqrt(double(in.q.extent(3)));
}

/// The fast backward in T.
template <class T>
grads run_fast(const inputs& in, index_t chunk) {
  using seqmix::testing::cast;
  const auto q = cast<T>(in.q), k = cast<T>(in.k), v = cast<T>(in.v), d_o = cast<T>(in.do_);
  const auto h0 = cast<T>(in.h0), dht = cast<T>(in.dht);
  const index_t N = sequences(in), H = in.v.extent(2), K = in.q.extent(3), V = in.v.extent(3);
  tensor<T, 4> dq(q.shape()), dk(k.shape()), dv(v.shape()), dh0({N, H, K, V}), ht({N, H, K, V});
  seqmix::backward_options<T> o;
  o.chunk_size = chunk;
  if (in.scale) o.scale = static_cast<T>(*in.scale);
  std::span<const index_t> cu(in.cu);
  grads out;
  if (is_delta(in.kind)) {
    const auto beta = cast<T>(in.beta);
    tensor<T, 3> dbeta(beta.shape());
    if (in.kind == op::delta) {
      seqmix::delta_rule_backward<T>(q, k, v, beta, opt(h0), d_o, opt(dht), dq, dk, dv, dbeta, dh0,
                                     o, cu, ht);
    } else if (in.kind == op::gdn) {
      const auto g = cast<T>(in.g);
      tensor<T, 3> dg(g.shape());
      seqmix::gated_delta_rule_backward<T>(q, k, v, g, beta, opt(h0), d_o, opt(dht), dq, dk, dv, dg,
                                           dbeta, dh0, o, cu, ht);
      out.g = cast<double>(dg);
    } else {
      const auto g = cast<T>(in.gk);
      tensor<T, 4> dg(g.shape());
      seqmix::kda_backward<T>(q, k, v, g, beta, opt(h0), d_o, opt(dht), dq, dk, dv, dg, dbeta, dh0,
                              o, cu, ht);
      out.gk = cast<double>(dg);
    }
    out.beta = cast<double>(dbeta);
  } else if (in.kind == op::rwkv7) {
    const auto w = cast<T>(in.gk), a = cast<T>(in.a), b = cast<T>(in.b);
    tensor<T, 4> dw(w.shape()), da(a.shape()), db(b.shape());
    seqmix::rwkv7_backward<T>(q, k, v, w, a, b, opt(h0), d_o, opt(dht), dq, dk, dv, dw, da, db, dh0,
                              o, cu, ht);
    out.gk = cast<double>(dw), out.a = cast<double>(da), out.b = cast<double>(db);
  } else {
    const auto w = cast<T>(in.gk);
    const auto u = cast<T>(in.u);
    tensor<T, 4> dw(w.shape());
    tensor<T, 2> du(u.shape());
    seqmix::rwkv6_backward<T>(q, k, v, w, u, opt(h0), d_o, opt(dht), dq, dk, dv, dw, du, dh0, o, cu,
                              ht);
    out.gk = cast<double>(dw), out.u = cast<double>(du);
  }
  out.q = cast<double>(dq), out.k = cast<double>(dk), out.v = cast<double>(dv);
  out.h0 = cast<double>(dh0), out.ht = cast<double>(ht);
  return out;
}

/// The reference backward (double, token loop), with the forward's o and S_T.
grads run_reference(const inputs& in) {
  const index_t N = sequences(in), H = in.v.extent(2), K = in.q.extent(3), V = in.v.extent(3);
  grads out;
  out.q = tensor<double, 4>(in.q.shape()), out.k = tensor<double, 4>(in.k.shape());
  out.v = tensor<double, 4>(in.v.shape()), out.o = tensor<double, 4>(in.v.shape());
  out.h0 = tensor<double, 4>({N, H, K, V}), out.ht = tensor<double, 4>({N, H, K, V});
  seqmix::reference::dplr_grads<double> gr;
  gr.dq = out.q, gr.dk = out.k, gr.dv = out.v, gr.dh0 = out.h0;
  const double s = scale_of(in);
  if (is_delta(in.kind)) {
    out.beta = tensor<double, 3>(in.beta.shape());
    gr.dbeta = out.beta;
    if (in.kind == op::gdn) out.g = tensor<double, 3>(in.g.shape()), gr.dg = out.g;
    if (in.kind == op::kda) out.gk = tensor<double, 4>(in.gk.shape()), gr.dgk = out.gk;
    seqmix::reference::delta_rule_backward<double>(in.q, in.k, in.v, opt(in.g), opt(in.gk), in.beta,
                                                   s, opt(in.h0), in.do_, opt(in.dht), gr, in.cu,
                                                   out.o, out.ht);
    return out;
  }
  out.gk = tensor<double, 4>(in.gk.shape()), gr.dgk = out.gk;
  if (in.kind == op::rwkv7) {
    out.a = tensor<double, 4>(in.a.shape()), out.b = tensor<double, 4>(in.b.shape());
    gr.da = out.a, gr.db = out.b;
  } else {
    out.u = tensor<double, 2>(in.u.shape()), gr.du = out.u;
  }
  seqmix::reference::rwkv_backward<double>(in.kind == op::rwkv7, in.q, in.k, in.v, in.gk, opt(in.a),
                                           opt(in.b), opt(in.u), s, opt(in.h0), in.do_, opt(in.dht),
                                           gr, in.cu, out.o, out.ht);
  return out;
}

/// Σ o·do + Σ S_T·dht from the plain forward references (reference/delta_rule.hpp,
/// gated_accumulation.hpp), sequence by sequence: what finite differences perturb.
double loss(const inputs& in) {
  const double s = scale_of(in);
  const index_t N = sequences(in), H = in.v.extent(2), K = in.q.extent(3), V = in.v.extent(3);
  tensor<double, 4> o(in.do_.shape());
  double total = 0;
  for (index_t n = 0; n < N; ++n) {
    const index_t b = in.cu.empty() ? n : 0;
    const index_t t0 = in.cu.empty() ? 0 : in.cu[static_cast<std::size_t>(n)];
    const index_t t1 = in.cu.empty() ? in.q.extent(1) : in.cu[static_cast<std::size_t>(n) + 1];
    auto sl4 = [&](const tensor<double, 4>& x) {
      return x.view().slice<0>(b, b + 1).slice<1>(t0, t1);
    };
    auto sl3 = [&](const tensor<double, 3>& x) {
      return x.view().slice<0>(b, b + 1).slice<1>(t0, t1);
    };
    tensor<double, 4> S({1, H, K, V});
    if (in.h0.size()) S = tensor<double, 4>::copy_of(in.h0.view().slice<0>(n, n + 1));
    auto on = o.view().slice<0>(b, b + 1).slice<1>(t0, t1);
    if (t1 > t0) {
      switch (in.kind) {
        case op::delta:
          seqmix::reference::delta_rule<double>(sl4(in.q), sl4(in.k), sl4(in.v), {}, sl3(in.beta),
                                                on, S, s, false);
          break;
        case op::gdn:
          seqmix::reference::delta_rule<double>(sl4(in.q), sl4(in.k), sl4(in.v), sl3(in.g),
                                                sl3(in.beta), on, S, s, false);
          break;
        case op::kda:
          seqmix::reference::kda<double>(sl4(in.q), sl4(in.k), sl4(in.v), sl4(in.gk), sl3(in.beta),
                                         on, S, s, false);
          break;
        case op::rwkv7:
          seqmix::reference::rwkv7<double>(sl4(in.q), sl4(in.k), sl4(in.v), sl4(in.gk), sl4(in.a),
                                           sl4(in.b), on, S, s);
          break;
        case op::rwkv6:
          seqmix::reference::rwkv6<double>(sl4(in.q), sl4(in.k), sl4(in.v), sl4(in.gk), in.u, s, on,
                                           S);
          break;
      }
    }
    if (in.dht.size()) {
      for (index_t h = 0; h < H; ++h)
        for (index_t i = 0; i < K; ++i)
          for (index_t j = 0; j < V; ++j) total += S(0, h, i, j) * in.dht(n, h, i, j);
    }
  }
  for (index_t i = 0; i < o.size(); ++i) total += o.data()[i] * in.do_.data()[i];
  return total;
}

/// (name, input data, gradient data, size) of every differentiable input.
struct slot {
  std::string name;
  double* x;
  const double* g;
  index_t n;
};
std::vector<slot> slots(inputs& in, const grads& gr) {
  std::vector<slot> out;
  auto add = [&](const char* name, auto& x, const auto& g) {
    if (x.size()) out.push_back({name, x.data(), g.data(), x.size()});
  };
  add("q", in.q, gr.q);
  add("k", in.k, gr.k);
  add("v", in.v, gr.v);
  add("beta", in.beta, gr.beta);
  add("g", in.g, gr.g);
  add("gk", in.gk, gr.gk);
  add("a", in.a, gr.a);
  add("b", in.b, gr.b);
  add("u", in.u, gr.u);
  add("h0", in.h0, gr.h0);
  return out;
}

/// Worst error of central differences against the gradient, per input (max |fd - g| / max(max
/// |g|, 1e-3)); also checks every gradient is finite. Returns the worst over the inputs.
double check_fd(inputs in, const grads& gr, double tol) {
  double worst = 0;
  for (const auto& sl : slots(in, gr)) {
    double err = 0, scale = 1e-3;
    bool finite = true;
    for (index_t i = 0; i < sl.n; ++i) {
      const double x0 = sl.x[i], h = 1e-6 * std::max(1.0, std::abs(x0));
      sl.x[i] = x0 + h;
      const double lp = loss(in);
      sl.x[i] = x0 - h;
      const double lm = loss(in);
      sl.x[i] = x0;
      const double fd = (lp - lm) / (2 * h);
      if (!std::isfinite(sl.g[i])) finite = false;
      err = std::max(err, std::abs(fd - sl.g[i]));
      scale = std::max(scale, std::abs(sl.g[i]));
    }
    INFO(op_name(in.kind) << " d" << sl.name << ": FD error " << err / scale << " (max |g| "
                          << scale << ")");
    CHECK(finite);
    CHECK(err / scale <= tol);
    worst = std::max(worst, err / scale);
  }
  return worst;
}

void check_grads_close(const grads& ref, const grads& out, double tol, op kind) {
  INFO(op_name(kind));
  SEQMIX_CHECK_CLOSE(ref.q, out.q, tol);
  SEQMIX_CHECK_CLOSE(ref.k, out.k, tol);
  SEQMIX_CHECK_CLOSE(ref.v, out.v, tol);
  if (is_delta(kind)) SEQMIX_CHECK_CLOSE(ref.beta, out.beta, tol);
  if (kind == op::gdn) SEQMIX_CHECK_CLOSE(ref.g, out.g, tol);
  if (kind != op::delta && kind != op::gdn) SEQMIX_CHECK_CLOSE(ref.gk, out.gk, tol);
  if (kind == op::rwkv7) {
    SEQMIX_CHECK_CLOSE(ref.a, out.a, tol);
    SEQMIX_CHECK_CLOSE(ref.b, out.b, tol);
  }
  if (kind == op::rwkv6) SEQMIX_CHECK_CLOSE(ref.u, out.u, tol);
  SEQMIX_CHECK_CLOSE(ref.h0, out.h0, tol);
  SEQMIX_CHECK_CLOSE(ref.ht, out.ht, tol);
}

/// log-sigmoid(x)·strength: log gates from ~0 down to about -strength·few.
double log_gate(double x, double strength) {
  return strength * (x < 0 ? x - std::log1p(std::exp(x)) : -std::log1p(std::exp(-x)));
}

/// Random inputs; keys l2-normalised for the delta family (the stable regime: β in (0, 1)),
/// RWKV-7's a = -κ, b = κ ⊙ (0..1) with κ a unit vector (its layer's form), RWKV's w as log
/// gates of the given strength.
inputs make(op kind, std::mt19937_64& rng, index_t B, index_t T, index_t Hk, index_t H, index_t K,
            index_t V, double strength = 1.0, std::vector<index_t> cu = {}) {
  using seqmix::testing::random_normal;
  using seqmix::testing::random_uniform;
  inputs in;
  in.kind = kind;
  in.cu = std::move(cu);
  if (is_rwkv(kind)) Hk = H;
  in.q = random_normal<double, 4>({B, T, Hk, K}, rng);
  in.k = random_normal<double, 4>({B, T, Hk, K}, rng);
  in.v = random_normal<double, 4>({B, T, H, V}, rng);
  in.do_ = random_normal<double, 4>({B, T, H, V}, rng);
  const index_t N = in.cu.empty() ? B : static_cast<index_t>(in.cu.size()) - 1;
  in.h0 = random_normal<double, 4>({N, H, K, V}, rng);
  in.dht = random_normal<double, 4>({N, H, K, V}, rng);
  auto unit_rows = [&](tensor<double, 4>& x) {
    for (index_t r = 0; r < x.size() / K; ++r) {
      double ss = 0;
      for (index_t i = 0; i < K; ++i) ss += x.data()[r * K + i] * x.data()[r * K + i];
      for (index_t i = 0; i < K; ++i) x.data()[r * K + i] /= std::sqrt(ss);
    }
  };
  if (is_delta(kind)) {
    unit_rows(in.k);
    in.beta = random_uniform<double, 3>({B, T, H}, rng, 0.1, 0.9);
  }
  if (kind == op::gdn) {
    in.g = random_normal<double, 3>({B, T, H}, rng);
    for (index_t i = 0; i < in.g.size(); ++i) in.g.data()[i] = log_gate(in.g.data()[i], strength);
  }
  if (kind != op::delta && kind != op::gdn) {
    in.gk = random_normal<double, 4>({B, T, H, K}, rng);
    for (index_t i = 0; i < in.gk.size(); ++i)
      in.gk.data()[i] = log_gate(in.gk.data()[i], strength);
  }
  if (kind == op::rwkv7) {
    in.a = random_normal<double, 4>({B, T, H, K}, rng);
    unit_rows(in.a);
    in.b = random_uniform<double, 4>({B, T, H, K}, rng, 0.0, 1.0);
    for (index_t i = 0; i < in.a.size(); ++i) {
      in.b.data()[i] *= in.a.data()[i];
      in.a.data()[i] = -in.a.data()[i];
    }
  }
  if (kind == op::rwkv6) in.u = random_normal<double, 2>({H, K}, rng);
  return in;
}

constexpr op all_ops[] = {op::delta, op::gdn, op::kda, op::rwkv7, op::rwkv6};
constexpr op golden_ops[] = {op::delta, op::gdn, op::rwkv7, op::rwkv6};

// ---- golden ------------------------------------------------------------------------------

inputs golden_inputs(op kind, int c) {
  const auto& f = seqmix::testing::golden::file("v2/grads");
  const std::string pre = "case" + std::to_string(c) + ".",
                    opp = std::string(op_name(kind)) + "." + pre;
  inputs in;
  in.kind = kind;
  in.q = f.get<double, 4>(pre + "q");
  in.k = f.get<double, 4>(pre + (is_delta(kind) ? "k_l2" : "k"));
  in.v = f.get<double, 4>(pre + "v");
  in.h0 = f.get<double, 4>(pre + "h0");
  in.do_ = f.get<double, 4>(opp + "do");
  in.dht = f.get<double, 4>(opp + "dht");
  if (is_delta(kind)) in.beta = f.get<double, 3>(pre + "beta");
  if (kind == op::gdn) in.g = f.get<double, 3>(pre + "g");
  if (kind == op::rwkv6) {
    in.gk = f.get<double, 4>(pre + "gk");
    in.u = f.get<double, 2>(opp + "u");
  }
  if (kind == op::rwkv7) {
    in.gk = f.get<double, 4>(opp + "w");
    in.a = f.get<double, 4>(opp + "a");
    in.b = f.get<double, 4>(opp + "b");
  }
  return in;
}

/// Compares every stored gradient and ht (and o when `o` is given); returns the worst rel RMS.
double check_golden(op kind, int c, const grads& out, double tol, const tensor<double, 4>* o) {
  const auto& f = seqmix::testing::golden::file("v2/grads");
  const std::string opp = std::string(op_name(kind)) + ".case" + std::to_string(c) + ".";
  INFO(opp);
  double worst = 0;
  auto cmp = [&](const std::string& name, const auto& ref, const auto& got) {
    const auto r = seqmix::testing::compare(ref, got);
    INFO(name << ": " << r.report);
    CHECK(r.rel_rms <= tol);
    worst = std::max(worst, r.rel_rms);
  };
  auto G4 = [&](const std::string& n) { return f.get<double, 4>(opp + "grad." + n); };
  auto G3 = [&](const std::string& n) { return f.get<double, 3>(opp + "grad." + n); };
  cmp("q", G4("q"), out.q);
  cmp("k", G4(is_delta(kind) ? "k_l2" : "k"), out.k);
  cmp("v", G4("v"), out.v);
  cmp("h0", G4("h0"), out.h0);
  cmp("ht", f.get<double, 4>(opp + "ht"), out.ht);
  if (o) cmp("o", f.get<double, 4>(opp + "o"), *o);
  if (is_delta(kind)) cmp("beta", G3("beta"), out.beta);
  if (kind == op::gdn) cmp("g", G3("g"), out.g);
  if (kind == op::rwkv6) {
    cmp("gk", G4("gk"), out.gk);
    cmp("u", f.get<double, 2>(opp + "grad.u"), out.u);
  }
  if (kind == op::rwkv7) {
    cmp("w", G4("w"), out.gk);
    cmp("a", G4("a"), out.a);
    cmp("b", G4("b"), out.b);
  }
  return worst;
}

/// The float chunked forward of the op's mixer (its o, compared with the golden o).
tensor<double, 4> forward_float(const inputs& in) {
  using seqmix::testing::cast;
  const auto q = cast<float>(in.q), k = cast<float>(in.k), v = cast<float>(in.v);
  auto st = cast<float>(in.h0);
  tensor<float, 4> o(v.shape());
  if (in.kind == op::delta) {
    seqmix::delta_net<float>().forward_chunked(q, k, v, cast<float>(in.beta), o, st);
  } else if (in.kind == op::gdn) {
    seqmix::gated_delta_net<float>().forward_chunked(q, k, v, cast<float>(in.g),
                                                     cast<float>(in.beta), o, st);
  } else if (in.kind == op::rwkv7) {
    seqmix::rwkv7<float>().forward_chunked(q, k, v, cast<float>(in.gk), cast<float>(in.a),
                                           cast<float>(in.b), o, st);
  } else {
    seqmix::rwkv6<float>().forward_chunked(q, k, v, cast<float>(in.gk), cast<float>(in.u), o, st);
  }
  return cast<double>(o);
}

constexpr double tol_golden = 1e-5;

}  // namespace

TEST_CASE("backward dplr: golden gradients, o, ht (float fast path, double reference)",
          "[backward][dplr][golden]") {
  for (op kind : golden_ops) {
    for (int c : {1, 3}) {
      INFO(op_name(kind) << " case " << c);
      const auto in = golden_inputs(kind, c);
      const auto ref = run_reference(in);
      const double wr = check_golden(kind, c, ref, tol_golden, &ref.o);
      const auto o = forward_float(in);
      for (index_t chunk : {16, 64}) {
        INFO("chunk " << chunk);
        const double wf = check_golden(kind, c, run_fast<float>(in, chunk), tol_golden, &o);
        const double wd = check_golden(kind, c, run_fast<double>(in, chunk), 1e-7, nullptr);
        WARN(op_name(kind) << " case " << c << " chunk " << chunk << ": worst rel RMS float " << wf
                           << ", double " << wd << ", reference " << wr);
      }
    }
  }
}

TEST_CASE("backward dplr: finite differences (double), every input, odd sizes, GVA",
          "[backward][dplr]") {
  auto rng = seqmix::testing::make_rng(1501);
  for (op kind : all_ops) {
    // T = 13 with checkpoints every 4 tokens: boundaries inside, a short last chunk; GVA 1 -> 2
    auto in = make(kind, rng, 1, 13, 1, 2, 5, 3);
    const auto fast = run_fast<double>(in, 4);
    const double w = check_fd(in, fast, 1e-6);
    check_grads_close(run_reference(in), fast, 1e-12, kind);
    WARN(op_name(kind) << ": worst FD error (fast, double) " << w);
  }
}

TEST_CASE("backward dplr: reference backward vs finite differences", "[backward][dplr]") {
  auto rng = seqmix::testing::make_rng(1502);
  for (op kind : all_ops) {
    auto in = make(kind, rng, 1, 9, 1, 2, 4, 3);
    check_fd(in, run_reference(in), 1e-6);
  }
}

TEST_CASE("backward dplr: varlen with an empty sequence", "[backward][dplr]") {
  auto rng = seqmix::testing::make_rng(1503);
  for (op kind : all_ops) {
    auto in = make(kind, rng, 1, 14, 1, 2, 4, 3, 1.0, {0, 5, 5, 14});
    const auto fast = run_fast<double>(in, 4);
    check_fd(in, fast, 1e-6);
    check_grads_close(run_reference(in), fast, 1e-12, kind);
    // float, wider shapes, against the double reference
    auto wide = make(kind, rng, 1, 50, 2, 4, 16, 12, 1.0, {0, 23, 23, 50});
    check_grads_close(run_reference(wide), run_fast<float>(wide, 16), 1e-5, kind);
  }
}

TEST_CASE("backward dplr: strong gates near -1e4 keep every gradient finite and right",
          "[backward][dplr]") {
  auto rng = seqmix::testing::make_rng(1504);
  for (op kind : {op::gdn, op::kda, op::rwkv7, op::rwkv6}) {
    auto in = make(kind, rng, 1, 11, 1, 1, 4, 3, 3.0);
    // a few kills at -1e4 and near-kills
    double* gp = kind == op::gdn ? in.g.data() : in.gk.data();
    const index_t ng = kind == op::gdn ? in.g.size() : in.gk.size();
    for (index_t i = 0; i < ng; i += 3) gp[i] = (i % 2) ? -1e4 : -60.0;
    const auto fast = run_fast<double>(in, 4);
    check_fd(in, fast, 1e-6);
    check_grads_close(run_reference(in), fast, 1e-11, kind);
    const auto f32 = run_fast<float>(in, 4);
    for (const auto* t : {&f32.q, &f32.k, &f32.v, &f32.h0}) {
      bool fin = true;
      for (index_t i = 0; i < t->size(); ++i) fin = fin && std::isfinite(t->data()[i]);
      CHECK(fin);
    }
    check_grads_close(run_reference(in), f32, 1e-5, kind);
  }
}

TEST_CASE("backward dplr: split sequence with the state passed == whole sequence",
          "[backward][dplr]") {
  auto rng = seqmix::testing::make_rng(1505);
  for (op kind : all_ops) {
    const index_t T = 29, cut = 11;
    const auto in = make(kind, rng, 2, T, 1, 2, 6, 5);
    const auto whole = run_fast<double>(in, 8);
    auto part = [&](index_t t0, index_t t1) {
      inputs p = in;
      auto s4 = [&](const tensor<double, 4>& x) {
        return x.size() ? tensor<double, 4>::copy_of(x.view().slice<1>(t0, t1)) : x;
      };
      auto s3 = [&](const tensor<double, 3>& x) {
        return x.size() ? tensor<double, 3>::copy_of(x.view().slice<1>(t0, t1)) : x;
      };
      p.q = s4(in.q), p.k = s4(in.k), p.v = s4(in.v), p.do_ = s4(in.do_), p.gk = s4(in.gk);
      p.a = s4(in.a), p.b = s4(in.b), p.g = s3(in.g), p.beta = s3(in.beta);
      return p;
    };
    inputs first = part(0, cut), second = part(cut, T);
    second.h0 = run_fast<double>(first, 8).ht;
    const auto g2 = run_fast<double>(second, 8);
    first.dht = g2.h0;
    const auto g1 = run_fast<double>(first, 8);
    auto j4 = [&](const tensor<double, 4>& a, const tensor<double, 4>& b) {
      if (!a.size()) return a;
      tensor<double, 4> out({a.extent(0), T, a.extent(2), a.extent(3)});
      for (index_t x = 0; x < a.extent(0); ++x)
        for (index_t t = 0; t < T; ++t)
          for (index_t h = 0; h < a.extent(2); ++h)
            for (index_t d = 0; d < a.extent(3); ++d)
              out(x, t, h, d) = t < cut ? a(x, t, h, d) : b(x, t - cut, h, d);
      return out;
    };
    auto j3 = [&](const tensor<double, 3>& a, const tensor<double, 3>& b) {
      if (!a.size()) return a;
      tensor<double, 3> out({a.extent(0), T, a.extent(2)});
      for (index_t x = 0; x < a.extent(0); ++x)
        for (index_t t = 0; t < T; ++t)
          for (index_t h = 0; h < a.extent(2); ++h)
            out(x, t, h) = t < cut ? a(x, t, h) : b(x, t - cut, h);
      return out;
    };
    grads j;
    j.q = j4(g1.q, g2.q), j.k = j4(g1.k, g2.k), j.v = j4(g1.v, g2.v), j.gk = j4(g1.gk, g2.gk);
    j.a = j4(g1.a, g2.a), j.b = j4(g1.b, g2.b), j.g = j3(g1.g, g2.g);
    j.beta = j3(g1.beta, g2.beta);
    j.h0 = g1.h0, j.ht = g2.ht;
    if (g1.u.size()) {
      j.u = g1.u;
      for (index_t i = 0; i < j.u.size(); ++i) j.u.data()[i] += g2.u.data()[i];
    }
    check_grads_close(whole, j, 1e-12, kind);
  }
}

TEST_CASE("backward dplr: 1 vs 2 threads, bitwise", "[backward][dplr][threads]") {
  auto rng = seqmix::testing::make_rng(1506);
  for (op kind : all_ops) {
    const auto in = make(kind, rng, 1, 70, 2, 4, 32, 24);
    grads a, b;
    {
      seqmix::scoped_num_threads one(1);
      a = run_fast<float>(in, 32);
    }
    {
      seqmix::scoped_num_threads two(2);
      seqmix::testing::require_team(2);
      b = run_fast<float>(in, 32);
    }
    INFO(op_name(kind));
    for (auto [x, y] : {std::pair{&a.q, &b.q},
                        {&a.k, &b.k},
                        {&a.v, &b.v},
                        {&a.gk, &b.gk},
                        {&a.a, &b.a},
                        {&a.b, &b.b},
                        {&a.h0, &b.h0},
                        {&a.ht, &b.ht}})
      CHECK(seqmix::testing::bitwise_equal(*x, *y));
    CHECK(seqmix::testing::bitwise_equal(a.g, b.g));
    CHECK(seqmix::testing::bitwise_equal(a.beta, b.beta));
    CHECK(seqmix::testing::bitwise_equal(a.u, b.u));
  }
}

TEST_CASE("backward dplr: a warm call allocates nothing", "[backward][dplr][alloc]") {
  auto rng = seqmix::testing::make_rng(1507);
  for (op kind : all_ops) {
    const auto in = make(kind, rng, 2, 40, 2, 2, 16, 16);
    using seqmix::testing::cast;
    const auto q = cast<float>(in.q), k = cast<float>(in.k), v = cast<float>(in.v);
    const auto d_o = cast<float>(in.do_), h0 = cast<float>(in.h0), dht = cast<float>(in.dht);
    tensor<float, 4> dq(q.shape()), dk(k.shape()), dv(v.shape()), dh0(h0.shape()), ht(h0.shape());
    const auto beta = is_delta(kind) ? cast<float>(in.beta) : tensor<float, 3>();
    tensor<float, 3> dbeta(beta.shape());
    const auto g = kind == op::gdn ? cast<float>(in.g) : tensor<float, 3>();
    tensor<float, 3> dg(g.shape());
    const auto gk = in.gk.size() ? cast<float>(in.gk) : tensor<float, 4>();
    const auto a = in.a.size() ? cast<float>(in.a) : tensor<float, 4>();
    const auto b = in.b.size() ? cast<float>(in.b) : tensor<float, 4>();
    const auto u = in.u.size() ? cast<float>(in.u) : tensor<float, 2>();
    tensor<float, 4> dgk(gk.shape()), da(a.shape()), db(b.shape());
    tensor<float, 2> du(u.shape());
    seqmix::backward_options<float> o;
    o.chunk_size = 16;
    std::function<void()> call = [&] {
      switch (kind) {
        case op::delta:
          seqmix::delta_rule_backward<float>(q, k, v, beta, h0, d_o, dht, dq, dk, dv, dbeta, dh0, o,
                                             {}, ht);
          break;
        case op::gdn:
          seqmix::gated_delta_rule_backward<float>(q, k, v, g, beta, h0, d_o, dht, dq, dk, dv, dg,
                                                   dbeta, dh0, o, {}, ht);
          break;
        case op::kda:
          seqmix::kda_backward<float>(q, k, v, gk, beta, h0, d_o, dht, dq, dk, dv, dgk, dbeta, dh0,
                                      o, {}, ht);
          break;
        case op::rwkv7:
          seqmix::rwkv7_backward<float>(q, k, v, gk, a, b, h0, d_o, dht, dq, dk, dv, dgk, da, db,
                                        dh0, o, {}, ht);
          break;
        case op::rwkv6:
          seqmix::rwkv6_backward<float>(q, k, v, gk, u, h0, d_o, dht, dq, dk, dv, dgk, du, dh0, o,
                                        {}, ht);
          break;
      }
    };
    for (int threads : {1, 2}) {
      seqmix::scoped_num_threads n(threads);
      INFO(op_name(kind) << " threads " << threads);
      call();
      seqmix::testing::allocation_scope scope;
      call();
      CHECK(scope.stats().count == 0);
    }
  }
}

TEST_CASE("backward dplr: argument errors name the function and the argument", "[backward][dplr]") {
  tensor<float, 4> q({1, 5, 2, 4}), k({1, 5, 2, 4}), v({1, 5, 2, 3}), d_o({1, 5, 2, 3});
  tensor<float, 4> dq(q.shape()), dk(k.shape()), dv(v.shape()), dh0({1, 2, 4, 3});
  tensor<float, 3> beta({1, 5, 2}), dbeta({1, 5, 2}), bad3({1, 4, 2});
  tensor<float, 4> bad({1, 5, 2, 5});
  CHECK_THROWS_WITH(
      seqmix::delta_rule_backward<float>(q, k, v, beta, {}, bad, {}, dq, dk, dv, dbeta, dh0),
      Catch::Contains("delta_rule_backward") && Catch::Contains("do_"));
  CHECK_THROWS_WITH(
      seqmix::delta_rule_backward<float>(q, k, v, bad3, {}, d_o, {}, dq, dk, dv, dbeta, dh0),
      Catch::Contains("delta_rule_backward") && Catch::Contains("beta"));
  CHECK_THROWS_WITH(seqmix::gated_delta_rule_backward<float>(q, k, v, beta, beta, {}, d_o, {}, dq,
                                                             dk, dv, bad3, dbeta, dh0),
                    Catch::Contains("gated_delta_rule_backward") && Catch::Contains("dg"));
  tensor<float, 4> gk({1, 5, 2, 4}), dgk({1, 5, 2, 4});
  CHECK_THROWS_WITH(
      seqmix::kda_backward<float>(q, k, v, bad, beta, {}, d_o, {}, dq, dk, dv, dgk, dbeta, dh0),
      Catch::Contains("kda_backward") && Catch::Contains("g"));
  tensor<float, 4> v3({1, 5, 3, 3});
  CHECK_THROWS_WITH(
      seqmix::kda_backward<float>(q, k, v3, gk, beta, {}, d_o, {}, dq, dk, dv, dgk, dbeta, dh0),
      Catch::Contains("kda_backward") && Catch::Contains("v"));
  tensor<float, 4> da(gk.shape()), db(gk.shape());
  CHECK_THROWS_WITH(seqmix::rwkv7_backward<float>(q, k, v, gk, gk, gk, {}, d_o, {}, dq, dk, dv, dgk,
                                                  bad, db, dh0),
                    Catch::Contains("rwkv7_backward") && Catch::Contains("da"));
  tensor<float, 2> u({2, 4}), du({2, 3});
  CHECK_THROWS_WITH(
      seqmix::rwkv6_backward<float>(q, k, v, gk, u, {}, d_o, {}, dq, dk, dv, dgk, du, dh0),
      Catch::Contains("rwkv6_backward") && Catch::Contains("du"));
  seqmix::backward_options<float> o;
  o.chunk_size = 0;
  CHECK_THROWS_WITH(
      seqmix::delta_rule_backward<float>(q, k, v, beta, {}, d_o, {}, dq, dk, dv, dbeta, dh0, o),
      Catch::Contains("chunk_size"));
  tensor<float, 4> h0bad({2, 2, 4, 3});
  tensor<float, 2> du_ok({2, 4});
  CHECK_THROWS_WITH(
      seqmix::rwkv6_backward<float>(q, k, v, gk, u, h0bad, d_o, {}, dq, dk, dv, dgk, du_ok, dh0),
      Catch::Contains("rwkv6_backward") && Catch::Contains("h0"));
}
