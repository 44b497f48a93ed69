// SPDX-License-Identifier: MIT
// Bindings of the mixers of the second wave: RWKV-6 (gated family, exclusive readout plus the
// bonus u), RWKV-7 and KDA (diagonal-plus-low-rank delta family), in fla's names and argument
// orders: chunk_rwkv6 / fused_recurrent_rwkv6 (r, k, v, w, u), chunk_rwkv7 /
// fused_recurrent_rwkv7 (r, w, k, v, a, b; scale 1 and output_final_state True by default, as
// fla), chunk_kda / fused_recurrent_kda (q, k, v, g, beta). Each is one *_seq function over
// sequence_op() and one def() per name (see gated.cpp).
#include <seqmix/mixers/kda.hpp>
#include <seqmix/mixers/rwkv6.hpp>
#include <seqmix/mixers/rwkv7.hpp>

#include "common.hpp"

namespace seqmix::python {
namespace {

using namespace pybind11::literals;

template <class T>
py::tuple rwkv6_seq(const char* fn, bool chunked, py::object r, py::object k, py::object v,
                    py::object w, py::object u, py::object scale, py::object h0, bool out_final,
                    py::object cu) {
  return sequence_op<T>(
      fn, r, k, v, h0, out_final, cu,
      [&](call<T>& c, const qkv<T>& a, tensor_view<T, 4> o, tensor_view<T, 4> s,
          std::span<const index_t> cu_) {
        const auto wv = c.template view<4>("w", w, "[B, T, H, K]");
        const auto uv = c.template view<2>("u", u, "[H, K]");
        // fla's chunk_rwkv6 / fused_recurrent_rwkv6 default to K^-1/2 (seqmix's C++ to 1)
        typename rwkv6<T>::options opt;
        opt.scale = scale.is_none() ? T(1) / std::sqrt(T(a.K)) : scale.cast<T>();
        const rwkv6<T> mixer(opt);
        nogil([&] {
          if (chunked)
            mixer.forward_chunked(a.q, a.k, a.v, wv, uv, o, s, cu_);
          else
            mixer.forward_recurrent(a.q, a.k, a.v, wv, uv, o, s, cu_);
        });
      },
      "r");
}

template <class T>
py::tuple rwkv7_seq(const char* fn, bool chunked, py::object r, py::object w, py::object k,
                    py::object v, py::object a_, py::object b_, double scale, py::object h0,
                    bool out_final, py::object cu) {
  return sequence_op<T>(
      fn, r, k, v, h0, out_final, cu,
      [&](call<T>& c, const qkv<T>& a, tensor_view<T, 4> o, tensor_view<T, 4> s,
          std::span<const index_t> cu_) {
        const auto wv = c.template view<4>("w", w, "[B, T, H, K]");
        const auto av = c.template view<4>("a", a_, "[B, T, H, K]");
        const auto bv = c.template view<4>("b", b_, "[B, T, H, K]");
        typename rwkv7<T>::options opt;
        opt.scale = static_cast<T>(scale);
        const rwkv7<T> mixer(opt);
        nogil([&] {
          if (chunked)
            mixer.forward_chunked(a.q, a.k, a.v, wv, av, bv, o, s, cu_);
          else
            mixer.forward_recurrent(a.q, a.k, a.v, wv, av, bv, o, s, cu_);
        });
      },
      "r");
}

template <class T>
py::tuple kda_seq(const char* fn, bool chunked, py::object q, py::object k, py::object v,
                  py::object g, py::object beta, py::object scale, py::object h0, bool out_final,
                  bool l2norm, py::object cu) {
  return sequence_op<T>(fn, q, k, v, h0, out_final, cu,
                        [&](call<T>& c, const qkv<T>& a, tensor_view<T, 4> o, tensor_view<T, 4> s,
                            std::span<const index_t> cu_) {
                          const auto gv = c.template view<4>("g", g, "[B, T, HV, K]");
                          const auto bv = c.template view<3>("beta", beta, "[B, T, HV]");
                          typename kda<T>::options opt;
                          opt.scale = opt_scale<T>(scale);
                          opt.use_qk_l2norm = l2norm;
                          const kda<T> mixer(opt);
                          nogil([&] {
                            if (chunked)
                              mixer.forward_chunked(a.q, a.k, a.v, gv, bv, o, s, cu_);
                            else
                              mixer.forward_recurrent(a.q, a.k, a.v, gv, bv, o, s, cu_);
                          });
                        });
}

}  // namespace

void bind_wave2(py::module_& m) {
  const auto none = py::none();
  for (const bool chunked : {true, false}) {
    const char* name = chunked ? "chunk_rwkv6" : "fused_recurrent_rwkv6";
    const char* fn = chunked ? "seqmix.chunk_rwkv6" : "seqmix.fused_recurrent_rwkv6";
    m.def(
        name,
        [fn, chunked](py::object r, py::object k, py::object v, py::object w, py::object u,
                      py::object scale, py::object h0, bool out_final, py::object cu) {
          return dispatch(fn, "r", r, [&]<class T>() {
            return rwkv6_seq<T>(fn, chunked, r, k, v, w, u, scale, h0, out_final, cu);
          });
        },
        "r"_a, "k"_a, "v"_a, "w"_a, "u"_a, "scale"_a = none, "initial_state"_a = none,
        "output_final_state"_a = false, "cu_seqlens"_a = none,
        doc("RWKV-6: o_t = scale r_t (S_{t-1} + Diag(u) k_t^T v_t); S_t = Diag(exp(w_t)) S_{t-1}\n"
            "+ k_t^T v_t (read before write). r, k, w: [B, T, H, K] (w natural-log decays);\n"
            "v: [B, T, H, V]; u: [H, K] bonus. scale defaults to K**-0.5 (fla's default; RWKV\n"
            "layers pass 1).")
            .c_str());
    const char* name7 = chunked ? "chunk_rwkv7" : "fused_recurrent_rwkv7";
    const char* fn7 = chunked ? "seqmix.chunk_rwkv7" : "seqmix.fused_recurrent_rwkv7";
    m.def(
        name7,
        [fn7, chunked](py::object r, py::object w, py::object k, py::object v, py::object a,
                       py::object b, double scale, py::object h0, bool out_final, py::object cu) {
          return dispatch(fn7, "r", r, [&]<class T>() {
            return rwkv7_seq<T>(fn7, chunked, r, w, k, v, a, b, scale, h0, out_final, cu);
          });
        },
        "r"_a, "w"_a, "k"_a, "v"_a, "a"_a, "b"_a, "scale"_a = 1.0, "initial_state"_a = none,
        "output_final_state"_a = true, "cu_seqlens"_a = none,
        doc("RWKV-7: S_t = Diag(exp(w_t)) S_{t-1} + b_t^T (a_t S_{t-1}) + k_t^T v_t,\n"
            "o_t = scale r_t S_t. r, w, k, a, b: [B, T, H, K] (w natural-log decays); v:\n"
            "[B, T, H, V]. fla's argument order and defaults (scale 1, output_final_state True).")
            .c_str());
    const char* namek = chunked ? "chunk_kda" : "fused_recurrent_kda";
    const char* fnk = chunked ? "seqmix.chunk_kda" : "seqmix.fused_recurrent_kda";
    m.def(
        namek,
        [fnk, chunked](py::object q, py::object k, py::object v, py::object g, py::object beta,
                       py::object scale, py::object h0, bool out_final, bool l2norm,
                       py::object cu) {
          return dispatch(fnk, "q", q, [&]<class T>() {
            return kda_seq<T>(fnk, chunked, q, k, v, g, beta, scale, h0, out_final, l2norm, cu);
          });
        },
        "q"_a, "k"_a, "v"_a, "g"_a, "beta"_a, "scale"_a = none, "initial_state"_a = none,
        "output_final_state"_a = false, "use_qk_l2norm_in_kernel"_a = false, "cu_seqlens"_a = none,
        doc("KDA (Kimi Delta Attention): S' = Diag(exp(g_t)) S_{t-1}; S_t = S' + k_t^T beta_t\n"
            "(v_t - k_t S'), o_t = scale q_t S_t. q, k: [B, T, H, K]; v: [B, T, HV, V];\n"
            "g: [B, T, HV, K] natural-log per-key decays; beta: [B, T, HV].")
            .c_str());
  }
}

}  // namespace seqmix::python
