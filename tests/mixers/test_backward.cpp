// SPDX-License-Identifier: MIT
// Backward passes (mixers/backward.hpp, reference/backward.hpp): golden gradients of
// tests/golden/v2/grads.safetensors (fla / mamba / torch SDPA, float64 autograd), finite
// differences in double, chunked vs reference in double, split sequence == whole, varlen,
// strong gates, 1 vs N threads bitwise, argument errors.
#include <cmath>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

#include <seqmix/core/parallel.hpp>
#include <seqmix/mixers/backward.hpp>
#include <seqmix/mixers/gla.hpp>
#include <seqmix/mixers/linear_attention.hpp>
#include <seqmix/mixers/mamba2_ssd.hpp>
#include <seqmix/mixers/simple_gla.hpp>
#include <seqmix/reference/attention.hpp>
#include <seqmix/reference/backward.hpp>
#include <seqmix/reference/gated_accumulation.hpp>

#include "../support/golden.hpp"
#include "../support/testing.hpp"

using seqmix::index_t;
using seqmix::tensor;
using seqmix::tensor_view;

namespace {

enum class op { linear_attn, simple_gla, gla, mamba2, softmax, swa };
const char* op_name(op o) {
  switch (o) {
    case op::linear_attn:
      return "linear_attn";
    case op::simple_gla:
      return "simple_gla";
    case op::gla:
      return "gla";
    case op::mamba2:
      return "mamba2_ssd";
    case op::softmax:
      return "softmax_causal";
    case op::swa:
      return "softmax_swa32";
  }
  return "?";
}
bool is_softmax(op o) {
  return o == op::softmax || o == op::swa;
}

/// Inputs of one backward call (double; the float runs cast them). Mamba2: q = C, k = B, v = x.
struct inputs {
  op kind = op::linear_attn;
  tensor<double, 4> q, k, v, gk, h0, do_, dht;
  tensor<double, 3> g, dt;
  tensor<double, 1> A;
  std::vector<index_t> cu;
  index_t window = 0;
  std::optional<double> scale;  // empty: the op's default
};

/// Every gradient, by the input's name (as the golden file names them).
struct grads {
  tensor<double, 4> q, k, v, gk, h0;
  tensor<double, 3> g, dt;
  tensor<double, 1> A;
  tensor<double, 4> ht;  // forward's final state (gated family), when produced
};

template <class T, std::size_t R>
tensor_view<const T, R> opt(const tensor<T, R>& t) {
  return t.size() ? t.view() : tensor_view<const T, R>{};
}
template <class T, std::size_t R>
tensor_view<T, R> opt_out(tensor<T, R>& t) {
  return t.size() ? t.view() : tensor_view<T, R>{};
}
index_t sequences(const inputs& in) {
  return in.cu.empty() ? in.q.extent(0) : static_cast<index_t>(in.cu.size()) - 1;
}

/// The chunked backward in T.
template <class T>
grads run_chunked(const inputs& in, index_t chunk) {
  using seqmix::testing::cast;
  const auto q = cast<T>(in.q), k = cast<T>(in.k), v = cast<T>(in.v), d_o = cast<T>(in.do_);
  tensor<T, 4> dq(q.shape()), dk(k.shape()), dv(v.shape());
  seqmix::backward_options<T> o;
  o.chunk_size = chunk;
  if (in.scale) o.scale = static_cast<T>(*in.scale);
  grads out;
  std::span<const index_t> cu(in.cu);
  if (is_softmax(in.kind)) {
    o.window = in.window;
    seqmix::softmax_attention_backward<T>(q, k, v, d_o, dq, dk, dv, o);
  } else {
    const auto h0 = cast<T>(in.h0), dht = cast<T>(in.dht);
    const index_t N = sequences(in), H = in.v.extent(2), K = in.q.extent(3), V = in.v.extent(3);
    tensor<T, 4> dh0({N, H, K, V}), ht({N, H, K, V});
    if (in.kind == op::linear_attn) {
      seqmix::linear_attention_backward<T>(q, k, v, opt(h0), d_o, opt(dht), dq, dk, dv, dh0, o, cu,
                                           ht);
    } else if (in.kind == op::simple_gla) {
      const auto g = cast<T>(in.g);
      tensor<T, 3> dg(g.shape());
      seqmix::simple_gla_backward<T>(q, k, v, g, opt(h0), d_o, opt(dht), dq, dk, dv, dg, dh0, o, cu,
                                     ht);
      out.g = cast<double>(dg);
    } else if (in.kind == op::gla) {
      const auto gk = cast<T>(in.gk);
      tensor<T, 4> dgk(gk.shape());
      seqmix::gla_backward<T>(q, k, v, gk, opt(h0), d_o, opt(dht), dq, dk, dv, dgk, dh0, o, cu, ht);
      out.gk = cast<double>(dgk);
    } else {
      const auto dt = cast<T>(in.dt);
      const auto A = cast<T>(in.A);
      tensor<T, 3> ddt(dt.shape());
      tensor<T, 1> dA(A.shape());
      seqmix::mamba2_ssd_grads<T> gr{dv, ddt, dA, dk, dq, {}, dh0};
      seqmix::mamba2_ssd_backward<T>(v, dt, A, k, q, {}, opt(h0), d_o, opt(dht), gr, o, cu, ht);
      out.dt = cast<double>(ddt);
      out.A = cast<double>(dA);
    }
    out.h0 = cast<double>(dh0);
    out.ht = cast<double>(ht);
  }
  out.q = cast<double>(dq);
  out.k = cast<double>(dk);
  out.v = cast<double>(dv);
  return out;
}

/// The reference backward (double, token loop).
grads run_reference(const inputs& in) {
  grads out;
  out.q = tensor<double, 4>(in.q.shape());
  out.k = tensor<double, 4>(in.k.shape());
  out.v = tensor<double, 4>(in.v.shape());
  const double s = in.scale ? *in.scale : 1.0 / std::sqrt(double(in.q.extent(3)));
  if (is_softmax(in.kind)) {
    seqmix::reference::softmax_attention_backward<double>(in.q, in.k, in.v, in.do_, out.q, out.k,
                                                          out.v, s, in.window);
    return out;
  }
  const index_t N = sequences(in), H = in.v.extent(2), K = in.q.extent(3), V = in.v.extent(3);
  out.h0 = tensor<double, 4>({N, H, K, V});
  out.ht = tensor<double, 4>({N, H, K, V});
  if (in.kind == op::mamba2) {
    out.dt = tensor<double, 3>(in.dt.shape());
    out.A = tensor<double, 1>(in.A.shape());
    seqmix::reference::mamba2_grads<double> gr{out.v, out.dt, out.A, out.k, out.q, {}, out.h0};
    seqmix::reference::mamba2_ssd_backward<double>(in.v, in.dt, in.A, in.k, in.q, {}, opt(in.h0),
                                                   in.do_, opt(in.dht), gr, in.cu, out.ht);
    return out;
  }
  seqmix::reference::gated_gates<double> gates;
  seqmix::reference::gated_grads<double> gr;
  gr.dq = out.q, gr.dk = out.k, gr.dv = out.v, gr.dh0 = out.h0;
  if (in.kind == op::simple_gla) {
    gates.g = in.g;
    out.g = tensor<double, 3>(in.g.shape());
    gr.dg = out.g;
  }
  if (in.kind == op::gla) {
    gates.gk = in.gk;
    out.gk = tensor<double, 4>(in.gk.shape());
    gr.dgk = out.gk;
  }
  seqmix::reference::gated_accumulation_backward<double>(
      in.q, in.k, in.v, gates, s, opt(in.h0), in.do_, opt(in.dht), gr, in.cu, {}, out.ht);
  return out;
}

/// The loss Σ o·do + Σ S_T·dht from the plain forward references (reference/gated_accumulation,
/// reference/attention), sequence by sequence for varlen: what finite differences perturb.
double loss(const inputs& in) {
  const double s = in.scale ? *in.scale : 1.0 / std::sqrt(double(in.q.extent(3)));
  tensor<double, 4> o(in.do_.shape());
  double total = 0;
  if (is_softmax(in.kind)) {
    seqmix::reference::softmax_attention<double>(in.q, in.k, in.v, o, s, in.window);
  } else {
    const index_t N = sequences(in), H = in.v.extent(2), K = in.q.extent(3), V = in.v.extent(3);
    tensor<double, 3> gdt;
    if (in.kind == op::mamba2) {
      gdt = tensor<double, 3>(in.dt.shape());
      for (index_t b = 0; b < in.dt.extent(0); ++b)
        for (index_t t = 0; t < in.dt.extent(1); ++t)
          for (index_t h = 0; h < H; ++h) gdt(b, t, h) = in.dt(b, t, h) * in.A(h);
    }
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
      seqmix::reference::gated_gates<double> gates;
      if (in.kind == op::simple_gla) gates.g = sl3(in.g);
      if (in.kind == op::gla) gates.gk = sl4(in.gk);
      if (in.kind == op::mamba2) {
        gates.g = sl3(gdt);
        gates.k_scale = sl3(in.dt);
      }
      seqmix::reference::gated_accumulation<double>(sl4(in.q), sl4(in.k), sl4(in.v), gates,
                                                    in.kind == op::mamba2 ? 1.0 : s, on, S);
      if (in.dht.size()) {
        for (index_t h = 0; h < H; ++h)
          for (index_t i = 0; i < K; ++i)
            for (index_t j = 0; j < V; ++j) total += S(0, h, i, j) * in.dht(n, h, i, j);
      }
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
  if (in.kind == op::simple_gla) add("g", in.g, gr.g);
  if (in.kind == op::gla) add("gk", in.gk, gr.gk);
  if (in.kind == op::mamba2) {
    add("dt", in.dt, gr.dt);
    add("A", in.A, gr.A);
  }
  if (!is_softmax(in.kind)) add("h0", in.h0, gr.h0);
  return out;
}

/// Worst relative error of central differences against the gradient, over every element of
/// every input (max |fd - g| / max(max |g|, 1e-3) per input).
void check_fd(inputs in, const grads& gr, double tol) {
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
  }
}

void check_grads_close(const grads& ref, const grads& out, double tol, op kind) {
  INFO(op_name(kind));
  SEQMIX_CHECK_CLOSE(ref.q, out.q, tol);
  SEQMIX_CHECK_CLOSE(ref.k, out.k, tol);
  SEQMIX_CHECK_CLOSE(ref.v, out.v, tol);
  if (kind == op::simple_gla) SEQMIX_CHECK_CLOSE(ref.g, out.g, tol);
  if (kind == op::gla) SEQMIX_CHECK_CLOSE(ref.gk, out.gk, tol);
  if (kind == op::mamba2) {
    SEQMIX_CHECK_CLOSE(ref.dt, out.dt, tol);
    SEQMIX_CHECK_CLOSE(ref.A, out.A, tol);
  }
  if (!is_softmax(kind)) {
    SEQMIX_CHECK_CLOSE(ref.h0, out.h0, tol);
    SEQMIX_CHECK_CLOSE(ref.ht, out.ht, tol);
  }
}

/// Random inputs; gate strength scales the log gates (log-sigmoid of N(0,1)·strength, i.e.
/// decays from ~1 down to e^{-strength·few}).
inputs make(op kind, std::mt19937_64& rng, index_t B, index_t T, index_t Hk, index_t H, index_t K,
            index_t V, double strength = 1.0, std::vector<index_t> cu = {}) {
  using seqmix::testing::random_normal;
  using seqmix::testing::random_uniform;
  inputs in;
  in.kind = kind;
  in.cu = std::move(cu);
  in.q = random_normal<double, 4>({B, T, is_softmax(kind) ? H : Hk, K}, rng);
  in.k = random_normal<double, 4>({B, T, Hk, K}, rng);
  if (is_softmax(kind)) {
    in.v = random_normal<double, 4>({B, T, Hk, V}, rng);
    in.do_ = random_normal<double, 4>({B, T, H, V}, rng);
    in.window = kind == op::swa ? 5 : 0;
    return in;
  }
  in.v = random_normal<double, 4>({B, T, H, V}, rng);
  in.do_ = random_normal<double, 4>({B, T, H, V}, rng);
  const index_t N = in.cu.empty() ? B : static_cast<index_t>(in.cu.size()) - 1;
  in.h0 = random_normal<double, 4>({N, H, K, V}, rng);
  in.dht = random_normal<double, 4>({N, H, K, V}, rng);
  auto gate = [&](double x) {
    return strength * (x < 0 ? x - std::log1p(std::exp(x)) : -std::log1p(std::exp(-x)));
  };
  if (kind == op::simple_gla) {
    in.g = random_normal<double, 3>({B, T, H}, rng);
    for (index_t i = 0; i < in.g.size(); ++i) in.g.data()[i] = gate(in.g.data()[i]);
  }
  if (kind == op::gla) {
    in.gk = random_normal<double, 4>({B, T, H, K}, rng);
    for (index_t i = 0; i < in.gk.size(); ++i) in.gk.data()[i] = gate(in.gk.data()[i]);
  }
  if (kind == op::mamba2) {
    in.dt = random_uniform<double, 3>({B, T, H}, rng, 0.05, 1.0);
    in.A = random_uniform<double, 1>({H}, rng, -1.5 * strength, -0.2);
  }
  return in;
}

constexpr op gated_ops[] = {op::linear_attn, op::simple_gla, op::gla, op::mamba2};
constexpr op all_ops[] = {op::linear_attn, op::simple_gla, op::gla,
                          op::mamba2,      op::softmax,    op::swa};

// ---- golden ------------------------------------------------------------------------------

tensor<double, 4> transpose_last(const tensor<double, 4>& s) {
  tensor<double, 4> out({s.extent(0), s.extent(1), s.extent(3), s.extent(2)});
  for (index_t a = 0; a < s.extent(0); ++a)
    for (index_t h = 0; h < s.extent(1); ++h)
      for (index_t i = 0; i < s.extent(2); ++i)
        for (index_t j = 0; j < s.extent(3); ++j) out(a, h, j, i) = s(a, h, i, j);
  return out;
}

inputs golden_inputs(op kind, int c) {
  const auto& f = seqmix::testing::golden::file("v2/grads");
  const std::string pre = "case" + std::to_string(c) + ".",
                    opp = std::string(op_name(kind)) + "." + pre;
  inputs in;
  in.kind = kind;
  in.q = f.get<double, 4>(pre + "q");
  in.k = f.get<double, 4>(pre + "k");
  in.v = f.get<double, 4>(pre + "v");
  in.do_ = f.get<double, 4>(opp + "do");
  if (is_softmax(kind)) {
    in.window = kind == op::swa ? 32 : 0;
    return in;
  }
  if (kind == op::mamba2) {
    in.h0 = transpose_last(f.get<double, 4>(opp + "h0_pn"));
    in.dht = transpose_last(f.get<double, 4>(opp + "dht"));
    in.dt = f.get<double, 3>(opp + "dt");
    in.A = f.get<double, 1>(opp + "A");
    in.scale = 1.0;
  } else {
    in.h0 = f.get<double, 4>(pre + "h0");
    in.dht = f.get<double, 4>(opp + "dht");
  }
  if (kind == op::simple_gla) in.g = f.get<double, 3>(pre + "g");
  if (kind == op::gla) in.gk = f.get<double, 4>(pre + "gk");
  return in;
}

void check_golden(op kind, int c, const grads& out, double tol) {
  const auto& f = seqmix::testing::golden::file("v2/grads");
  const std::string opp = std::string(op_name(kind)) + ".case" + std::to_string(c) + ".";
  INFO(opp);
  auto G4 = [&](const std::string& n) { return f.get<double, 4>(opp + "grad." + n); };
  auto G3 = [&](const std::string& n) { return f.get<double, 3>(opp + "grad." + n); };
  auto G1 = [&](const std::string& n) { return f.get<double, 1>(opp + "grad." + n); };
  auto F4 = [&](const std::string& n) { return f.get<double, 4>(opp + n); };
  if (kind == op::mamba2) {
    SEQMIX_CHECK_CLOSE(G4("q"), out.q, tol);
    SEQMIX_CHECK_CLOSE(G4("k"), out.k, tol);
    SEQMIX_CHECK_CLOSE(G4("v"), out.v, tol);
    SEQMIX_CHECK_CLOSE(G3("dt"), out.dt, tol);
    SEQMIX_CHECK_CLOSE(G1("A"), out.A, tol);
    SEQMIX_CHECK_CLOSE(G4("h0_pn"), transpose_last(out.h0), tol);
    SEQMIX_CHECK_CLOSE(F4("ht"), transpose_last(out.ht), tol);
    return;
  }
  SEQMIX_CHECK_CLOSE(G4("q"), out.q, tol);
  SEQMIX_CHECK_CLOSE(G4("k"), out.k, tol);
  SEQMIX_CHECK_CLOSE(G4("v"), out.v, tol);
  if (kind == op::simple_gla) SEQMIX_CHECK_CLOSE(G3("g"), out.g, tol);
  if (kind == op::gla) SEQMIX_CHECK_CLOSE(G4("gk"), out.gk, tol);
  if (!is_softmax(kind)) {
    SEQMIX_CHECK_CLOSE(G4("h0"), out.h0, tol);
    SEQMIX_CHECK_CLOSE(F4("ht"), out.ht, tol);
  }
}

/// Relative RMS gate of the golden checks (the task's 1e-5; float32 lands near 1e-7..1e-6).
constexpr double tol_golden = 1e-5;

}  // namespace

TEST_CASE("backward: reference (double) vs golden gradients, cases 1 and 3", "[backward][golden]") {
  for (op kind : all_ops) {
    for (int c : {1, 3}) {
      INFO(op_name(kind) << " case " << c);
      const auto in = golden_inputs(kind, c);
      check_golden(kind, c, run_reference(in), tol_golden);
    }
  }
}

TEST_CASE("backward: chunked float and double vs golden gradients, o, ht", "[backward][golden]") {
  const auto& f = seqmix::testing::golden::file("v2/grads");
  for (op kind : all_ops) {
    for (int c : {1, 3}) {
      const auto in = golden_inputs(kind, c);
      for (index_t chunk : {64, 16}) {
        INFO(op_name(kind) << " case " << c << " chunk " << chunk);
        check_golden(kind, c, run_chunked<float>(in, chunk), tol_golden);
        check_golden(kind, c, run_chunked<double>(in, chunk), 1e-7);
      }
      // the forward's o: softmax from the backward's recomputation, gated from the fronts
      const std::string opp = std::string(op_name(kind)) + ".case" + std::to_string(c) + ".";
      const auto o_ref = f.get<float, 4>(opp + "o");
      using seqmix::testing::cast;
      tensor<float, 4> o(o_ref.shape());
      const auto q = cast<float>(in.q), k = cast<float>(in.k), v = cast<float>(in.v);
      if (is_softmax(kind)) {
        tensor<float, 4> dq(q.shape()), dk(k.shape()), dv(v.shape());
        seqmix::backward_options<float> opt;
        opt.window = in.window;
        seqmix::softmax_attention_backward<float>(q, k, v, cast<float>(in.do_), dq, dk, dv, opt, o);
      } else if (kind == op::linear_attn) {
        auto s = cast<float>(in.h0);
        seqmix::linear_attention<float>().forward_chunked(q, k, v, o, s);
      } else if (kind == op::simple_gla) {
        auto s = cast<float>(in.h0);
        seqmix::simple_gla<float>().forward_chunked(q, k, v, cast<float>(in.g), o, s);
      } else if (kind == op::gla) {
        auto s = cast<float>(in.h0);
        seqmix::gla<float>().forward_chunked(q, k, v, cast<float>(in.gk), o, s);
      } else {
        continue;  // mamba2's o: tests/mixers/test_mamba2_ssd.cpp (wave 1); its ht is above
      }
      INFO(opp << "o");
      SEQMIX_CHECK_CLOSE(o_ref, o, tol_golden);
    }
  }
}

TEST_CASE("backward: golden mamba2 discrete inputs X, A_dt through simple_gla_backward",
          "[backward][golden]") {
  const auto& f = seqmix::testing::golden::file("v2/grads");
  for (int c : {1, 3}) {
    const std::string pre = "case" + std::to_string(c) + ".", opp = "mamba2_ssd." + pre;
    INFO(opp);
    const auto q = f.get<float, 4>(pre + "q"), k = f.get<float, 4>(pre + "k");
    const auto X = f.get<float, 4>(opp + "X");
    const auto g = f.get<float, 3>(opp + "A_dt");
    const auto h0 = seqmix::mamba2_state_from_pn<float>(f.get<float, 4>(opp + "h0_pn"));
    const auto dht = seqmix::mamba2_state_from_pn<float>(f.get<float, 4>(opp + "dht"));
    tensor<float, 4> dq(q.shape()), dk(k.shape()), dX(X.shape()), dh0(h0.shape());
    tensor<float, 3> dg(g.shape());
    seqmix::backward_options<float> opt;
    opt.scale = 1.0f;
    seqmix::simple_gla_backward<float>(q, k, X, g, h0, f.get<float, 4>(opp + "do"), dht, dq, dk, dX,
                                       dg, dh0, opt);
    const auto gX = f.get<float, 4>(opp + "grad.X"), gq = f.get<float, 4>(opp + "grad.q"),
               gk = f.get<float, 4>(opp + "grad.k");
    const auto gA = f.get<float, 3>(opp + "grad.A_dt");
    SEQMIX_CHECK_CLOSE(gX, dX, tol_golden);
    SEQMIX_CHECK_CLOSE(gA, dg, tol_golden);
    SEQMIX_CHECK_CLOSE(gq, dq, tol_golden);
    SEQMIX_CHECK_CLOSE(gk, dk, tol_golden);
  }
}

// ---- finite differences --------------------------------------------------------------------

TEST_CASE("backward: finite differences (double) of the chunked backward, every input",
          "[backward]") {
  auto rng = seqmix::testing::make_rng(151);
  for (op kind : all_ops) {
    // T = 11 with C = 4: chunk boundaries inside, a partial last chunk; GQA (Hk = 1, H = 2)
    const auto in = make(kind, rng, 2, 11, 1, 2, 4, 3);
    INFO(op_name(kind) << " B 2 T 11 GQA 1:2 K 4 V 3 C 4");
    check_fd(in, run_chunked<double>(in, 4), 1e-7);
  }
  for (op kind : gated_ops) {
    // varlen: three packed sequences (one shorter than a chunk, one empty)
    const auto in = make(kind, rng, 1, 13, 2, 2, 3, 4, 1.0, {0, 3, 3, 13});
    INFO(op_name(kind) << " varlen {0,3,3,13}");
    check_fd(in, run_chunked<double>(in, 4), 1e-7);
  }
}

TEST_CASE("backward: strong gates (-1e4, -inf-like) keep every gradient finite and right",
          "[backward]") {
  auto rng = seqmix::testing::make_rng(152);
  for (op kind : {op::simple_gla, op::gla}) {
    auto in = make(kind, rng, 1, 10, 1, 1, 4, 3, 3.0);
    // a few tokens forget (almost) everything
    double* gd = kind == op::simple_gla ? in.g.data() : in.gk.data();
    const index_t n = kind == op::simple_gla ? in.g.size() : in.gk.size();
    for (index_t i = 0; i < n; i += 7) gd[i] = -1e4 + static_cast<double>(i);
    INFO(op_name(kind));
    const auto ch = run_chunked<double>(in, 4);
    check_fd(in, ch, 1e-7);
    check_grads_close(run_reference(in), ch, 1e-10, kind);
    const auto chf = run_chunked<float>(in, 4);
    check_grads_close(run_reference(in), chf, 1e-5, kind);
  }
}

TEST_CASE("backward: reference backward vs finite differences", "[backward]") {
  auto rng = seqmix::testing::make_rng(153);
  for (op kind : all_ops) {
    const auto in = make(kind, rng, 1, 7, 1, 2, 3, 2);
    INFO(op_name(kind));
    check_fd(in, run_reference(in), 1e-7);
  }
}

// ---- chunked vs reference ------------------------------------------------------------------

TEST_CASE("backward: chunked (double) vs reference over odd sizes, GQA, varlen", "[backward]") {
  auto rng = seqmix::testing::make_rng(154);
  struct shape {
    index_t T, K, V, C;
  };
  for (op kind : all_ops) {
    for (const shape& s :
         {shape{1, 8, 8, 64}, shape{37, 16, 24, 16}, shape{70, 32, 17, 32}, shape{64, 8, 16, 64}}) {
      if (s.T == 1 && is_softmax(kind)) continue;  // dq = dk = 0 exactly: no relative measure
      const auto in = make(kind, rng, 2, s.T, 1, 2, s.K, s.V, 1.0);
      INFO(op_name(kind) << " T " << s.T << " K " << s.K << " V " << s.V << " C " << s.C);
      check_grads_close(run_reference(in), run_chunked<double>(in, s.C), 1e-11, kind);
    }
  }
  for (op kind : gated_ops) {
    const auto in = make(kind, rng, 1, 50, 2, 4, 8, 8, 1.0, {0, 17, 17, 40, 50});
    INFO(op_name(kind) << " varlen");
    check_grads_close(run_reference(in), run_chunked<double>(in, 16), 1e-11, kind);
  }
}

TEST_CASE("backward: split sequence with the state passed == whole sequence", "[backward]") {
  auto rng = seqmix::testing::make_rng(155);
  for (op kind : gated_ops) {
    const index_t T = 45, cut = 19;
    const auto in = make(kind, rng, 2, T, 2, 2, 8, 8);
    const auto whole = run_chunked<double>(in, 16);
    auto part = [&](index_t t0, index_t t1) {
      inputs p = in;
      auto s4 = [&](const tensor<double, 4>& x) {
        return tensor<double, 4>::copy_of(x.view().slice<1>(t0, t1));
      };
      auto s3 = [&](const tensor<double, 3>& x) {
        return tensor<double, 3>::copy_of(x.view().slice<1>(t0, t1));
      };
      p.q = s4(in.q), p.k = s4(in.k), p.v = s4(in.v), p.do_ = s4(in.do_);
      if (in.gk.size()) p.gk = s4(in.gk);
      if (in.g.size()) p.g = s3(in.g);
      if (in.dt.size()) p.dt = s3(in.dt);
      return p;
    };
    // second half: starts from the first half's final state, ends with dht
    inputs first = part(0, cut), second = part(cut, T);
    const auto fwd1 = run_chunked<double>(first, 16);  // its ht is the state at `cut`
    second.h0 = fwd1.ht;
    const auto g2 = run_chunked<double>(second, 16);
    first.dht = g2.h0;  // the gradient reaching the cut
    const auto g1 = run_chunked<double>(first, 16);
    INFO(op_name(kind));
    auto joined4 = [&](const tensor<double, 4>& a, const tensor<double, 4>& b) {
      tensor<double, 4> out({a.extent(0), T, a.extent(2), a.extent(3)});
      for (index_t x = 0; x < a.extent(0); ++x)
        for (index_t t = 0; t < T; ++t)
          for (index_t h = 0; h < a.extent(2); ++h)
            for (index_t d = 0; d < a.extent(3); ++d)
              out(x, t, h, d) = t < cut ? a(x, t, h, d) : b(x, t - cut, h, d);
      return out;
    };
    auto joined3 = [&](const tensor<double, 3>& a, const tensor<double, 3>& b) {
      tensor<double, 3> out({a.extent(0), T, a.extent(2)});
      for (index_t x = 0; x < a.extent(0); ++x)
        for (index_t t = 0; t < T; ++t)
          for (index_t h = 0; h < a.extent(2); ++h)
            out(x, t, h) = t < cut ? a(x, t, h) : b(x, t - cut, h);
      return out;
    };
    grads j;
    j.q = joined4(g1.q, g2.q), j.k = joined4(g1.k, g2.k), j.v = joined4(g1.v, g2.v);
    j.h0 = g1.h0, j.ht = g2.ht;
    if (kind == op::gla) j.gk = joined4(g1.gk, g2.gk);
    if (kind == op::simple_gla) j.g = joined3(g1.g, g2.g);
    if (kind == op::mamba2) {
      j.dt = joined3(g1.dt, g2.dt);
      j.A = g1.A;
      for (index_t h = 0; h < j.A.size(); ++h) j.A.data()[h] += g2.A.data()[h];
    }
    check_grads_close(whole, j, 1e-12, kind);
  }
}

TEST_CASE("backward: constant gate (retention, Lightning) vs reference, finite differences",
          "[backward]") {
  auto rng = seqmix::testing::make_rng(157);
  const index_t B = 2, T = 23, H = 3, K = 5, V = 4;
  auto in = make(op::linear_attn, rng, B, T, H, H, K, V);
  tensor<double, 1> gamma({H});
  for (index_t h = 0; h < H; ++h) gamma(h) = std::log(1.0 - std::pow(2.0, -1.0 - double(h)));
  tensor<double, 4> dq(in.q.shape()), dk(in.k.shape()), dv(in.v.shape()), dh0(in.h0.shape());
  tensor<double, 1> dgam({H});
  seqmix::backward_options<double> opt;
  opt.chunk_size = 8;
  seqmix::simple_gla_constant_backward<double>(in.q, in.k, in.v, gamma, in.h0, in.do_, in.dht, dq,
                                               dk, dv, dgam, dh0, opt);
  grads ref;
  ref.q = tensor<double, 4>(in.q.shape()), ref.k = tensor<double, 4>(in.k.shape());
  ref.v = tensor<double, 4>(in.v.shape()), ref.h0 = tensor<double, 4>(in.h0.shape());
  tensor<double, 1> rgam({H});
  seqmix::reference::gated_gates<double> gates;
  gates.g_gamma = gamma;
  seqmix::reference::gated_grads<double> gr;
  gr.dq = ref.q, gr.dk = ref.k, gr.dv = ref.v, gr.dh0 = ref.h0, gr.dg_gamma = rgam;
  seqmix::reference::gated_accumulation_backward<double>(
      in.q, in.k, in.v, gates, 1.0 / std::sqrt(double(K)), in.h0, in.do_, in.dht, gr);
  SEQMIX_CHECK_CLOSE(ref.q, dq, 1e-11);
  SEQMIX_CHECK_CLOSE(ref.k, dk, 1e-11);
  SEQMIX_CHECK_CLOSE(ref.v, dv, 1e-11);
  SEQMIX_CHECK_CLOSE(ref.h0, dh0, 1e-11);
  SEQMIX_CHECK_CLOSE(rgam, dgam, 1e-11);
  // d/dg_gamma by central differences: the same loss with g = g_gamma broadcast
  for (index_t h = 0; h < H; ++h) {
    auto loss_at = [&](double x) {
      inputs p = in;
      p.kind = op::simple_gla;
      p.g = tensor<double, 3>({B, T, H});
      for (index_t b = 0; b < B; ++b)
        for (index_t t = 0; t < T; ++t)
          for (index_t u = 0; u < H; ++u) p.g(b, t, u) = u == h ? x : gamma(u);
      return loss(p);
    };
    const double e = 1e-6, fd = (loss_at(gamma(h) + e) - loss_at(gamma(h) - e)) / (2 * e);
    INFO("h " << h << " fd " << fd << " grad " << dgam(h));
    CHECK(std::abs(fd - dgam(h)) <= 1e-6 * std::max(1.0, std::abs(fd)));
  }
}

TEST_CASE("backward: 1 vs 2 threads, bitwise", "[backward][threads]") {
  auto rng = seqmix::testing::make_rng(156);
  for (op kind : all_ops) {
    const auto in = make(kind, rng, 1, 150, 2, 4, 32, 32);
    grads a, b;
    {
      seqmix::scoped_num_threads one(1);
      a = run_chunked<float>(in, 64);
    }
    {
      seqmix::scoped_num_threads two(2);
      seqmix::testing::require_team(2);
      b = run_chunked<float>(in, 64);
    }
    INFO(op_name(kind));
    CHECK(seqmix::testing::bitwise_equal(a.q, b.q));
    CHECK(seqmix::testing::bitwise_equal(a.k, b.k));
    CHECK(seqmix::testing::bitwise_equal(a.v, b.v));
    CHECK(seqmix::testing::bitwise_equal(a.g, b.g));
    CHECK(seqmix::testing::bitwise_equal(a.gk, b.gk));
    CHECK(seqmix::testing::bitwise_equal(a.dt, b.dt));
    CHECK(seqmix::testing::bitwise_equal(a.A, b.A));
    CHECK(seqmix::testing::bitwise_equal(a.h0, b.h0));
  }
}

TEST_CASE("backward: argument errors name the function and the argument", "[backward]") {
  tensor<float, 4> q({1, 5, 2, 4}), k({1, 5, 2, 4}), v({1, 5, 2, 3}), d_o({1, 5, 2, 3});
  tensor<float, 4> dq(q.shape()), dk(k.shape()), dv(v.shape()), dh0({1, 2, 4, 3});
  tensor<float, 4> bad({1, 5, 2, 5});
  CHECK_THROWS_WITH(seqmix::linear_attention_backward<float>(q, k, v, {}, bad, {}, dq, dk, dv, dh0),
                    Catch::Contains("linear_attention_backward") && Catch::Contains("do_"));
  tensor<float, 3> g({1, 5, 2}), dg({1, 4, 2});
  CHECK_THROWS_WITH(
      seqmix::simple_gla_backward<float>(q, k, v, g, {}, d_o, {}, dq, dk, dv, dg, dh0),
      Catch::Contains("simple_gla_backward") && Catch::Contains("dg"));
  seqmix::backward_options<float> o;
  o.chunk_size = 0;
  CHECK_THROWS_WITH(
      seqmix::linear_attention_backward<float>(q, k, v, {}, d_o, {}, dq, dk, dv, dh0, o),
      Catch::Contains("chunk_size"));
  tensor<float, 4> dk_bad({1, 5, 1, 4});
  CHECK_THROWS_WITH(seqmix::softmax_attention_backward<float>(q, k, v, d_o, dq, dk_bad, dv),
                    Catch::Contains("softmax_attention_backward") && Catch::Contains("dk"));
}
