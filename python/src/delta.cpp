// SPDX-License-Identifier: MIT
// Bindings of the delta-rule family (kernels/delta_rule.hpp): DeltaNet and Gated DeltaNet in
// fla's names and signatures (chunk_delta_rule, fused_recurrent_delta_rule,
// chunk_gated_delta_rule, fused_recurrent_gated_delta_rule; GVA: v, beta, g carry HV >= H heads),
// plus in-place one-token steps.
#include <seqmix/mixers/delta_net.hpp>
#include <seqmix/mixers/gated_delta_net.hpp>

#include "common.hpp"

namespace seqmix::python {
namespace {

using namespace pybind11::literals;

template <class T>
typename delta_net<T>::options delta_options(const py::object& scale, bool l2norm) {
  typename delta_net<T>::options o;
  o.scale = opt_scale<T>(scale);
  o.use_qk_l2norm = l2norm;
  return o;
}

/// beta [B, T, HV] (or [B, HV] for a step), ones when None (fused_recurrent's default).
template <class T, std::size_t R>
tensor_view<const T, R> beta_or(call<T>& c, const char* name, py::handle h,
                                std::array<index_t, R> shape, T fill, py::array& keep,
                                const char* dims) {
  if (!h.is_none()) {
    auto b = c.template view<R>(name, h, dims);
    c.expect_shape(name, b, shape, dims);
    return b;
  }
  auto [a, v] = c.template output<R>(shape);
  T* p = v.data();
  for (py::ssize_t i = 0; i < a.size(); ++i) p[i] = fill;
  keep = a;
  return v;
}

template <class T>
py::tuple delta_seq(const char* fn, bool chunked, bool gated, py::object q, py::object k,
                    py::object v, py::object g, py::object beta, py::object scale, py::object h0,
                    bool out_final, py::object cu, bool l2norm) {
  return sequence_op<T>(fn, q, k, v, h0, out_final, cu,
                        [&](call<T>& c, const qkv<T>& a, tensor_view<T, 4> o, tensor_view<T, 4> s,
                            std::span<const index_t> cu_) {
                          py::array keep_b = null_array(), keep_g = null_array();
                          const std::array<index_t, 3> hv{a.B, a.T_, a.HV};
                          const auto bv =
                              beta_or<T, 3>(c, "beta", beta, hv, T(1), keep_b, "[B, T, HV]");
                          const auto opt = delta_options<T>(scale, l2norm);
                          if (!gated) {
                            const delta_net<T> mixer(opt);
                            nogil([&] {
                              if (chunked)
                                mixer.forward_chunked(a.q, a.k, a.v, bv, o, s, cu_);
                              else
                                mixer.forward_recurrent(a.q, a.k, a.v, bv, o, s, cu_);
                            });
                            return;
                          }
                          const auto gv = beta_or<T, 3>(c, "g", g, hv, T(0), keep_g, "[B, T, HV]");
                          const gated_delta_net<T> mixer(opt);
                          nogil([&] {
                            if (chunked)
                              mixer.forward_chunked(a.q, a.k, a.v, gv, bv, o, s, cu_);
                            else
                              mixer.forward_recurrent(a.q, a.k, a.v, gv, bv, o, s, cu_);
                          });
                        });
}

template <class T>
py::object delta_step(const char* fn, bool gated, py::object q, py::object k, py::object v,
                      py::object g, py::object beta, py::object state, py::object scale,
                      bool l2norm, py::object out) {
  call<T> c(fn, is_torch_tensor(q));
  const auto a = parse_step(c, q, k, v, state, out);
  py::array keep_b = null_array(), keep_g = null_array();
  const std::array<index_t, 2> hv{a.v.extent(0), a.v.extent(1)};
  const auto bv = beta_or<T, 2>(c, "beta", beta, hv, T(1), keep_b, "[B, HV]");
  const auto opt = delta_options<T>(scale, l2norm);
  if (gated) {
    const auto gv = beta_or<T, 2>(c, "g", g, hv, T(0), keep_g, "[B, HV]");
    const gated_delta_net<T> mixer(opt);
    nogil([&] { mixer.step(a.q, a.k, a.v, gv, bv, a.ov, a.state); });
  } else {
    const delta_net<T> mixer(opt);
    nogil([&] { mixer.step(a.q, a.k, a.v, bv, a.ov, a.state); });
  }
  return step_result(c, a, out);
}

}  // namespace

void bind_delta(py::module_& m) {
  const auto none = py::none();
  for (const bool chunked : {true, false}) {
    const char* name = chunked ? "chunk_delta_rule" : "fused_recurrent_delta_rule";
    const char* fn = chunked ? "seqmix.chunk_delta_rule" : "seqmix.fused_recurrent_delta_rule";
    const auto plain = [fn, chunked](py::object q, py::object k, py::object v, py::object beta,
                                     py::object scale, py::object h0, bool out_final, py::object cu,
                                     bool l2norm) {
      return dispatch(fn, "q", q, [&]<class T>() {
        return delta_seq<T>(fn, chunked, false, q, k, v, py::none(), beta, scale, h0, out_final, cu,
                            l2norm);
      });
    };
    const std::string pdoc = doc(
        chunked
            ? "DeltaNet, chunked (WY/UT) form: S_t = S_{t-1} + k_t^T beta_t (v_t - k_t S_{t-1}),\n"
              "o_t = scale q_t S_t.\n"
              "q, k: [B, T, H, K]; v: [B, T, HV, V]; beta: [B, T, HV] (HV a multiple of H).\n"
              "    use_qk_l2norm_in_kernel: q, k -> x / sqrt(sum x^2 + 1e-6) first."
            : "DeltaNet, recurrent form; as chunk_delta_rule, beta defaults to ones.\n"
              "q, k: [B, T, H, K]; v: [B, T, HV, V]; beta: [B, T, HV].");
    if (chunked) {
      m.def(name, plain, "q"_a, "k"_a, "v"_a, "beta"_a, "scale"_a = none, "initial_state"_a = none,
            "output_final_state"_a = false, "cu_seqlens"_a = none,
            "use_qk_l2norm_in_kernel"_a = false, pdoc.c_str());
    } else {
      m.def(name, plain, "q"_a, "k"_a, "v"_a, "beta"_a = none, "scale"_a = none,
            "initial_state"_a = none, "output_final_state"_a = false, "cu_seqlens"_a = none,
            "use_qk_l2norm_in_kernel"_a = false, pdoc.c_str());
    }
    const char* gname = chunked ? "chunk_gated_delta_rule" : "fused_recurrent_gated_delta_rule";
    const char* gfn =
        chunked ? "seqmix.chunk_gated_delta_rule" : "seqmix.fused_recurrent_gated_delta_rule";
    const auto gated = [gfn, chunked](py::object q, py::object k, py::object v, py::object g,
                                      py::object beta, py::object scale, py::object h0,
                                      bool out_final, py::object cu, bool l2norm) {
      return dispatch(gfn, "q", q, [&]<class T>() {
        return delta_seq<T>(gfn, chunked, true, q, k, v, g, beta, scale, h0, out_final, cu, l2norm);
      });
    };
    const std::string gdoc =
        doc("Gated DeltaNet: S' = exp(g_t) S_{t-1}; S_t = S' + k_t^T beta_t (v_t - k_t S'),\n"
            "o_t = scale q_t S_t.\n"
            "q, k: [B, T, H, K]; v: [B, T, HV, V]; g: [B, T, HV] natural-log decays; beta:\n"
            "[B, T, HV] (recurrent form: g defaults to zeros, beta to ones).");
    if (chunked) {
      m.def(gname, gated, "q"_a, "k"_a, "v"_a, "g"_a, "beta"_a, "scale"_a = none,
            "initial_state"_a = none, "output_final_state"_a = false, "cu_seqlens"_a = none,
            "use_qk_l2norm_in_kernel"_a = false, gdoc.c_str());
    } else {
      m.def(gname, gated, "q"_a, "k"_a, "v"_a, "g"_a = none, "beta"_a = none, "scale"_a = none,
            "initial_state"_a = none, "output_final_state"_a = false, "cu_seqlens"_a = none,
            "use_qk_l2norm_in_kernel"_a = false, gdoc.c_str());
    }
  }
  m.def(
      "delta_rule_step",
      [](py::object q, py::object k, py::object v, py::object beta, py::object state,
         py::object scale, bool l2norm, py::object out) {
        const char* fn = "seqmix.delta_rule_step";
        return dispatch(fn, "q", q, [&]<class T>() {
          return delta_step<T>(fn, false, q, k, v, py::none(), beta, state, scale, l2norm, out);
        });
      },
      "q"_a, "k"_a, "v"_a, "beta"_a, "state"_a, "scale"_a = none,
      "use_qk_l2norm_in_kernel"_a = false, "out"_a = none,
      "One decode token of DeltaNet. q, k: [B, H, K]; v: [B, HV, V]; beta: [B, HV];\n"
      "state: [B, HV, K, V] updated in place; out: optional [B, HV, V]. Returns o.");
  m.def(
      "gated_delta_rule_step",
      [](py::object q, py::object k, py::object v, py::object g, py::object beta, py::object state,
         py::object scale, bool l2norm, py::object out) {
        const char* fn = "seqmix.gated_delta_rule_step";
        return dispatch(fn, "q", q, [&]<class T>() {
          return delta_step<T>(fn, true, q, k, v, g, beta, state, scale, l2norm, out);
        });
      },
      "q"_a, "k"_a, "v"_a, "g"_a, "beta"_a, "state"_a, "scale"_a = none,
      "use_qk_l2norm_in_kernel"_a = false, "out"_a = none,
      "One decode token of Gated DeltaNet. q, k: [B, H, K]; v: [B, HV, V]; g, beta: [B, HV];\n"
      "state: [B, HV, K, V] updated in place; out: optional [B, HV, V]. Returns o.");
}

}  // namespace seqmix::python
