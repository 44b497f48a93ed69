// SPDX-License-Identifier: MIT
// Bindings of the mixers of the second wave: RWKV-6 (gated family, exclusive readout plus the
// bonus u), RWKV-7 and KDA (diagonal-plus-low-rank delta family), in fla's names and argument
// orders: chunk_rwkv6 / fused_recurrent_rwkv6 (r, k, v, w, u), chunk_rwkv7 /
// fused_recurrent_rwkv7 (r, w, k, v, a, b; scale 1 and output_final_state True by default, as
// fla), chunk_kda / fused_recurrent_kda (q, k, v, g, beta). Each is one *_seq function over
// sequence_op() and one def() per name (see gated.cpp). Also the one-token steps (decode, state
// updated in place, allocation-free with out=) of these three and of Mamba2: rwkv6_step,
// rwkv7_step, kda_step, mamba2_step.
#include <cmath>
#include <limits>
#include <vector>

#include <seqmix/mixers/kda.hpp>
#include <seqmix/mixers/mamba2_ssd.hpp>
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

// --- one-token steps -----------------------------------------------------------------------------
template <class T>
py::object rwkv6_step(py::object r, py::object k, py::object v, py::object w, py::object u,
                      py::object state, py::object scale, py::object out) {
  call<T> c("seqmix.rwkv6_step", is_torch_tensor(r));
  const auto a = parse_step(c, r, k, v, state, out, "r");
  const auto wv = c.template view<3>("w", w, "[B, H, K]");
  c.expect_shape("w", wv, {a.q.extent(0), a.q.extent(1), a.q.extent(2)}, "[B, H, K] (as r)");
  const auto uv = c.template view<2>("u", u, "[H, K]");
  typename rwkv6<T>::options opt;  // as chunk_rwkv6: K^-1/2 by default
  opt.scale = scale.is_none() ? T(1) / std::sqrt(T(a.q.extent(2))) : scale.cast<T>();
  const rwkv6<T> mixer(opt);
  nogil([&] { mixer.step(a.q, a.k, a.v, wv, uv, a.ov, a.state); });
  return step_result(c, a, out);
}

template <class T>
py::object rwkv7_step(py::object r, py::object w, py::object k, py::object v, py::object a_,
                      py::object b_, py::object state, double scale, py::object out) {
  call<T> c("seqmix.rwkv7_step", is_torch_tensor(r));
  const auto a = parse_step(c, r, k, v, state, out, "r");
  const auto wv = c.template view<3>("w", w, "[B, H, K]");
  const auto av = c.template view<3>("a", a_, "[B, H, K]");
  const auto bv = c.template view<3>("b", b_, "[B, H, K]");
  typename rwkv7<T>::options opt;
  opt.scale = static_cast<T>(scale);
  const rwkv7<T> mixer(opt);
  nogil([&] { mixer.step(a.q, a.k, a.v, wv, av, bv, a.ov, a.state); });
  return step_result(c, a, out);
}

template <class T>
py::object kda_step(py::object q, py::object k, py::object v, py::object g, py::object beta,
                    py::object state, py::object scale, bool l2norm, py::object out) {
  call<T> c("seqmix.kda_step", is_torch_tensor(q));
  const auto a = parse_step(c, q, k, v, state, out);
  const auto gv = c.template view<3>("g", g, "[B, HV, K]");
  const auto bv = c.template view<2>("beta", beta, "[B, HV]");
  typename kda<T>::options opt;
  opt.scale = opt_scale<T>(scale);
  opt.use_qk_l2norm = l2norm;
  const kda<T> mixer(opt);
  nogil([&] { mixer.step(a.q, a.k, a.v, gv, bv, a.ov, a.state); });
  return step_result(c, a, out);
}

/// mamba's selective_state_update for Mamba2 (scalar A and dt per head). The state is in
/// mamba's shape [B, H, P, N]; the kernel keeps it as [B, H, N, P] with P contiguous, so a state
/// whose P axis has stride 1 (e.g. np.zeros((B, H, N, P)).swapaxes(-1, -2)) is used in place, and
/// any other (a C-contiguous [B, H, P, N], as mamba_chunk_scan_combined returns) is transposed
/// into a scratch copy and back around the step (correct, but a copy of the state each call).
template <class T>
py::object mamba2_step(py::object x, py::object dt, py::object A, py::object Bm, py::object Cm,
                       py::object state, py::object D, py::object z, py::object dt_bias,
                       bool dt_softplus, py::tuple dt_limit, py::object out) {
  call<T> c("seqmix.mamba2_step", is_torch_tensor(x));
  const auto xv = c.template view<3>("x", x, "[B, H, P]");
  const index_t B = xv.extent(0), H = xv.extent(1), P = xv.extent(2);
  const auto dtv = c.template view<2>("dt", dt, "[B, H]");
  const auto Av = c.template view<1>("A", A, "[H]");
  c.expect_shape("A", Av, {H}, "[H]");
  const auto Bv = c.template view<3>("B", Bm, "[B, G, N]");
  const auto Cv = c.template view<3>("C", Cm, "[B, G, N]");
  const index_t N = Bv.extent(2);
  const auto Dv = c.template optional_view<1>("D", D, "[H]");
  if (Dv.data()) c.expect_shape("D", Dv, {H}, "[H] (a per-channel D [H, P] is not supported)");
  const auto zv = c.template optional_view<3>("z", z, "[B, H, P]");
  if (zv.data()) c.expect_shape("z", zv, {B, H, P}, "[B, H, P] (as x)");
  const auto biasv = c.template optional_view<1>("dt_bias", dt_bias, "[H]");
  if (dt_limit.size() != 2) c.fail("dt_limit", "expected a pair (min, max)");
  // state [B, H, P, N] as [B, H, N, P]: strides of the last two swapped
  tensor_view<T, 4> sv;
  py::array scratch = null_array();
  {
    raw_meta m = c.meta("state", state);
    if (m.ndim != 4) {
      c.fail("state",
             "expected 4 dimensions [B, H, P, N], got shape " + shape_str(m.shape.data(), m.ndim));
    }
    if (!m.writeable) c.fail("state", "is written in place but the array is read-only");
    if (m.shape[0] != B || m.shape[1] != H || m.shape[2] != P || m.shape[3] != N) {
      c.fail("state", "expected shape [B, H, P, N] = (" + std::to_string(B) + ", " +
                          std::to_string(H) + ", " + std::to_string(P) + ", " + std::to_string(N) +
                          "), got " + shape_str(m.shape.data(), m.ndim));
    }
    const auto es = static_cast<py::ssize_t>(sizeof(T));
    bool in_place = (m.strides[2] == es || P == 1);
    for (std::size_t d = 0; d < 4; ++d)
      in_place = in_place && m.strides[d] >= 0 && m.strides[d] % es == 0;
    if (in_place) {
      sv = tensor_view<T, 4>(static_cast<T*>(m.data), {B, H, N, P},
                             {m.strides[0] / es, m.strides[1] / es, m.strides[3] / es, 1});
    } else {
      auto [arr, view] = c.template empty<4>({B, H, N, P});
      scratch = arr;
      sv = view;
    }
  }
  const auto st_pn =
      scratch ? c.template view<4, T>("state", state, "[B, H, P, N]") : tensor_view<T, 4>{};
  std::vector<T> alog(static_cast<std::size_t>(H));
  for (index_t h = 0; h < H; ++h) {
    if (!(Av(h) < T(0)) || !std::isfinite(Av(h))) {
      c.fail("A", "must be finite and < 0 (A = -exp(A_log)), got A[" + std::to_string(h) +
                      "] = " + std::to_string(double(Av(h))));
    }
    alog[static_cast<std::size_t>(h)] = std::log(-Av(h));
  }
  const tensor_view<const T, 1> alogv(alog.data(), {H});
  tensor_view<T, 3> yv;
  py::array y = null_array();
  if (out.is_none()) {
    std::tie(y, yv) = c.template empty<3>({B, H, P});
  } else {
    yv = c.template view<3, T>("out", out, "[B, H, P]");
    c.expect_shape("out", yv, {B, H, P}, "[B, H, P] (as x)");
  }
  typename mamba2_ssd<T>::options opt;
  opt.dt_softplus = dt_softplus;
  opt.dt_min = static_cast<T>(dt_limit[0].cast<double>());
  opt.dt_max = static_cast<T>(dt_limit[1].cast<double>());
  const mamba2_ssd<T> mixer(opt);
  nogil([&] {
    const auto transpose = [&](bool in) {
      for (index_t b = 0; b < B; ++b)
        for (index_t h = 0; h < H; ++h)
          for (index_t n = 0; n < N; ++n)
            for (index_t p = 0; p < P; ++p) {
              if (in)
                sv(b, h, n, p) = st_pn(b, h, p, n);
              else
                st_pn(b, h, p, n) = sv(b, h, n, p);
            }
    };
    if (st_pn.data()) transpose(true);
    mixer.step(xv, dtv, alogv, Bv, Cv, Dv, biasv, yv, sv);
    if (st_pn.data()) transpose(false);
    if (zv.data()) {  // y * silu(z)
      for (index_t b = 0; b < B; ++b)
        for (index_t h = 0; h < H; ++h)
          for (index_t p = 0; p < P; ++p) {
            const T zz = zv(b, h, p);
            yv(b, h, p) *= zz / (T(1) + std::exp(-zz));
          }
    }
  });
  if (!out.is_none()) return out;
  return c.wrap(y);
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
  m.def(
      "rwkv6_step",
      [](py::object r, py::object k, py::object v, py::object w, py::object u, py::object state,
         py::object scale, py::object out) {
        return dispatch("seqmix.rwkv6_step", "r", r,
                        [&]<class T>() { return rwkv6_step<T>(r, k, v, w, u, state, scale, out); });
      },
      "r"_a, "k"_a, "v"_a, "w"_a, "u"_a, "state"_a, "scale"_a = none, "out"_a = none,
      "One decode token of RWKV-6 (as chunk_rwkv6). r, k, w: [B, H, K]; v: [B, H, V]; u: [H, K];\n"
      "state: [B, H, K, V] updated in place; scale defaults to K**-0.5; out: optional\n"
      "[B, H, V]. Returns o.");
  m.def(
      "rwkv7_step",
      [](py::object r, py::object w, py::object k, py::object v, py::object a, py::object b,
         py::object state, double scale, py::object out) {
        return dispatch("seqmix.rwkv7_step", "r", r, [&]<class T>() {
          return rwkv7_step<T>(r, w, k, v, a, b, state, scale, out);
        });
      },
      "r"_a, "w"_a, "k"_a, "v"_a, "a"_a, "b"_a, "state"_a, "scale"_a = 1.0, "out"_a = none,
      "One decode token of RWKV-7 (as chunk_rwkv7, fla's argument order). r, w, k, a, b:\n"
      "[B, H, K]; v: [B, H, V]; state: [B, H, K, V] updated in place; out: optional [B, H, V].\n"
      "Returns o.");
  m.def(
      "kda_step",
      [](py::object q, py::object k, py::object v, py::object g, py::object beta, py::object state,
         py::object scale, bool l2norm, py::object out) {
        return dispatch("seqmix.kda_step", "q", q, [&]<class T>() {
          return kda_step<T>(q, k, v, g, beta, state, scale, l2norm, out);
        });
      },
      "q"_a, "k"_a, "v"_a, "g"_a, "beta"_a, "state"_a, "scale"_a = none,
      "use_qk_l2norm_in_kernel"_a = false, "out"_a = none,
      "One decode token of KDA (as chunk_kda). q, k: [B, H, K]; v: [B, HV, V]; g: [B, HV, K];\n"
      "beta: [B, HV]; state: [B, HV, K, V] updated in place; out: optional [B, HV, V].\n"
      "Returns o.");
  m.def(
      "mamba2_step",
      [](py::object x, py::object dt, py::object A, py::object B, py::object C, py::object state,
         py::object D, py::object z, py::object dt_bias, bool dt_softplus, py::tuple dt_limit,
         py::object out) {
        return dispatch("seqmix.mamba2_step", "x", x, [&]<class T>() {
          return mamba2_step<T>(x, dt, A, B, C, state, D, z, dt_bias, dt_softplus, dt_limit, out);
        });
      },
      "x"_a, "dt"_a, "A"_a, "B"_a, "C"_a, "state"_a, "D"_a = none, "z"_a = none, "dt_bias"_a = none,
      "dt_softplus"_a = false,
      "dt_limit"_a = py::make_tuple(0.0, std::numeric_limits<double>::infinity()), "out"_a = none,
      "One decode token of Mamba2 (mamba's selective_state_update with a scalar A and dt per\n"
      "head; arguments as mamba_chunk_scan_combined). x: [B, H, P]; dt: [B, H]; A: [H] (< 0);\n"
      "B, C: [B, G, N]; D: [H]; z: [B, H, P]; dt_bias: [H]; out: optional [B, H, P].\n"
      "state: [B, H, P, N] (mamba's layout, as final_states) updated in place: used as is when\n"
      "its P axis is contiguous (np.zeros((B, H, N, P)).swapaxes(-1, -2)), else transposed\n"
      "into a scratch copy and back (a C-contiguous [B, H, P, N] works, one state copy slower).\n"
      "Returns y.");
}

}  // namespace seqmix::python
