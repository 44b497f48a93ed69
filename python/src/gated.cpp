// SPDX-License-Identifier: MIT
// Bindings of the gated family (kernels/gated_accumulation.hpp): linear attention, simple GLA,
// retention, Lightning, GLA, Mamba2 SSD; fla's names and signatures (chunk_* / fused_recurrent_*,
// layout [B, T, H, D], head_first=False), mamba's mamba_chunk_scan_combined, and one-token step
// functions that update a state in place (decode).
//
// Every sequence op goes through sequence_op(): q, k, v parsed, o and the state allocated
// (initial_state copied: fla never writes it), the kernel run with the GIL released, (o,
// final_state or None) returned. A new mixer of this family is one *_seq function (its extra
// arguments and the mixer call) and one def() line per name.
#include <cmath>
#include <limits>
#include <span>
#include <time.h>

#include <seqmix/mixers/gla.hpp>
#include <seqmix/mixers/linear_attention.hpp>
#include <seqmix/mixers/mamba2_ssd.hpp>
#include <seqmix/mixers/simple_gla.hpp>

#include "common.hpp"

namespace seqmix::python {
namespace {

using namespace pybind11::literals;

// --- linear attention ------------------------------------------------------------------------
template <class T>
py::tuple linear_attn_seq(const char* fn, bool chunked, py::object q, py::object k, py::object v,
                          py::object scale, py::object h0, bool out_final, bool normalize,
                          py::object cu) {
  return sequence_op<T>(
      fn, q, k, v, h0, out_final, cu,
      [&](call<T>& c, const qkv<T>& a, tensor_view<T, 4> o, tensor_view<T, 4> s,
          std::span<const index_t> cu_) {
        const linear_attention<T> mixer({.scale = opt_scale<T>(scale)});
        if (!normalize) {
          nogil([&] {
            if (chunked)
              mixer.forward_chunked(a.q, a.k, a.v, o, s, cu_);
            else
              mixer.forward_recurrent(a.q, a.k, a.v, o, s, cu_);
          });
          return;
        }
        // fla's normalize: z = cumsum of k from zero (the initial state's
        // keys are not counted), o / (s q . z + eps)
        [[maybe_unused]] auto [zarr, z] = c.template output<3>({s.extent(0), a.H, a.K});
        nogil([&, z = z] {
          if (chunked)
            mixer.forward_chunked(a.q, a.k, a.v, o, s, z, cu_);
          else
            mixer.forward_recurrent(a.q, a.k, a.v, o, s, z, cu_);
        });
      });
}

// --- simple GLA / retention / Lightning --------------------------------------------------------
template <class T>
py::tuple simple_gla_seq(const char* fn, bool chunked, py::object q, py::object k, py::object v,
                         py::object g, std::vector<T> g_gamma, py::object scale, py::object h0,
                         bool out_final, py::object cu) {
  return sequence_op<T>(
      fn, q, k, v, h0, out_final, cu,
      [&](call<T>& c, const qkv<T>& a, tensor_view<T, 4> o, tensor_view<T, 4> s,
          std::span<const index_t> cu_) {
        if (g.is_none() == g_gamma.empty()) {
          c.fail("g", "give exactly one of g [B, T, H] and g_gamma [H]");
        }
        const simple_gla<T> mixer({.scale = opt_scale<T>(scale), .g_gamma = std::move(g_gamma)});
        if (!g.is_none()) {
          const auto gv = c.template view<3>("g", g, "[B, T, H]");
          nogil([&] {
            if (chunked)
              mixer.forward_chunked(a.q, a.k, a.v, gv, o, s, cu_);
            else
              mixer.forward_recurrent(a.q, a.k, a.v, gv, o, s, cu_);
          });
        } else {
          nogil([&] {
            if (chunked)
              mixer.forward_chunked(a.q, a.k, a.v, o, s, cu_);
            else
              mixer.forward_recurrent(a.q, a.k, a.v, o, s, cu_);
          });
        }
      });
}

template <class T>
std::vector<T> gamma_from(call<T>& c, py::object g_gamma) {
  std::vector<T> out;
  if (g_gamma.is_none()) return out;
  const auto gg = c.template view<1>("g_gamma", g_gamma, "[H]");
  for (index_t h = 0; h < gg.extent(0); ++h) out.push_back(gg(h));
  return out;
}

// --- GLA ---------------------------------------------------------------------------------------
template <class T>
py::tuple gla_seq(const char* fn, bool chunked, py::object q, py::object k, py::object v,
                  py::object gk, py::object gv, py::object scale, py::object h0, bool out_final,
                  py::object cu) {
  return sequence_op<T>(
      fn, q, k, v, h0, out_final, cu,
      [&](call<T>& c, const qkv<T>& a, tensor_view<T, 4> o, tensor_view<T, 4> s,
          std::span<const index_t> cu_) {
        const char* gk_name = chunked ? "g" : "gk";
        tensor_view<const T, 4> gkv;
        py::array zeros = null_array();
        if (gk.is_none()) {  // fused_recurrent_gla(gk=None): no key gate = log gate 0
          auto [z, zv] = c.template output<4>({a.B, a.T_, a.H, a.K});
          zeros = z;
          gkv = zv;
        } else {
          gkv = c.template view<4>(gk_name, gk, "[B, T, H, K]");
        }
        const auto gvv = c.template optional_view<4>("gv", gv, "[B, T, H, V]");
        const gla<T> mixer({.scale = opt_scale<T>(scale)});
        nogil([&] {
          if (gvv.data()) {
            if (chunked)
              mixer.forward_chunked(a.q, a.k, a.v, gkv, gvv, o, s, cu_);
            else
              mixer.forward_recurrent(a.q, a.k, a.v, gkv, gvv, o, s, cu_);
          } else {
            if (chunked)
              mixer.forward_chunked(a.q, a.k, a.v, gkv, o, s, cu_);
            else
              mixer.forward_recurrent(a.q, a.k, a.v, gkv, o, s, cu_);
          }
        });
      });
}

// --- Mamba2 SSD (mamba's mamba_chunk_scan_combined) --------------------------------------------
template <class T>
py::object mamba_scan(const char* fn, py::object x, py::object dt, py::object A, py::object Bm,
                      py::object Cm, index_t chunk_size, py::object D, py::object z,
                      py::object dt_bias, py::object initial_states, py::object seq_idx,
                      py::object cu_seqlens, bool dt_softplus, py::tuple dt_limit,
                      bool return_final_states, bool return_varlen_states, bool chunked) {
  call<T> c(fn, is_torch_tensor(x));
  if (!seq_idx.is_none()) c.fail("seq_idx", "is not supported: pass cu_seqlens instead");
  const auto xv = c.template view<4>("x", x, "[B, T, H, P]");
  const index_t B = xv.extent(0), TT = xv.extent(1), H = xv.extent(2), P = xv.extent(3);
  const auto dtv = c.template view<3>("dt", dt, "[B, T, H]");
  const auto Av = c.template view<1>("A", A, "[H]");
  c.expect_shape("A", Av, {H}, "[H]");
  const auto Bv = c.template view<4>("B", Bm, "[B, T, G, N]");
  const auto Cv = c.template view<4>("C", Cm, "[B, T, G, N]");
  const index_t Nst = Bv.extent(3);
  const auto Dv = c.template optional_view<1>("D", D, "[H]");
  if (Dv.data()) c.expect_shape("D", Dv, {H}, "[H] (a per-channel D [H, P] is not supported)");
  const auto zv = c.template optional_view<4>("z", z, "[B, T, H, P]");
  if (zv.data()) c.expect_shape("z", zv, {B, TT, H, P}, "[B, T, H, P] (as x)");
  const auto biasv = c.template optional_view<1>("dt_bias", dt_bias, "[H]");
  if (dt_limit.size() != 2) c.fail("dt_limit", "expected a pair (min, max)");
  const std::vector<index_t> cu = c.offsets("cu_seqlens", cu_seqlens);
  const index_t Ns = sequences(c, B, cu);
  if (return_varlen_states && cu.empty()) {
    c.fail("return_varlen_states", "needs cu_seqlens (one state per packed sequence)");
  }
  // A = -exp(A_log): the engine takes A_log; A must be < 0 (a decay)
  auto [alog_arr, alog] = c.template output<1>({H});
  for (index_t h = 0; h < H; ++h) {
    if (!(Av(h) < T(0)) || !std::isfinite(Av(h))) {
      c.fail("A", "must be finite and < 0 (A = -exp(A_log)), got A[" + std::to_string(h) +
                      "] = " + std::to_string(double(Av(h))));
    }
    alog(h) = std::log(-Av(h));
  }
  // state: mamba's [Ns, H, P, N] outside, seqmix's [Ns, H, N, P] inside
  auto [st_arr, st] = c.template output<4>({Ns, H, Nst, P});
  if (!initial_states.is_none()) {
    const auto h0 = c.template view<4>("initial_states", initial_states, "[N, H, P, N]");
    c.expect_shape("initial_states", h0, {Ns, H, P, Nst}, "[batch, H, P, N]");
    for (index_t b = 0; b < Ns; ++b)
      for (index_t h = 0; h < H; ++h)
        for (index_t n = 0; n < Nst; ++n)
          for (index_t p = 0; p < P; ++p) st(b, h, n, p) = h0(b, h, p, n);
  }
  auto [y_arr, y] = c.template empty<4>({B, TT, H, P});  // written whole by the kernel
  typename mamba2_ssd<T>::options opt;
  opt.chunk_size = chunk_size;
  opt.dt_softplus = dt_softplus;
  opt.dt_min = static_cast<T>(dt_limit[0].cast<double>());
  opt.dt_max = static_cast<T>(dt_limit[1].cast<double>());
  const mamba2_ssd<T> mixer(opt);
  const std::span<const index_t> cus(cu);
  nogil([&, y = y, st = st, alog = alog] {
    if (chunked)
      mixer.forward_chunked(xv, dtv, alog, Bv, Cv, Dv, biasv, y, st, cus);
    else
      mixer.forward_recurrent(xv, dtv, alog, Bv, Cv, Dv, biasv, y, st, cus);
    if (zv.data()) {  // y * silu(z), as mamba_chunk_scan_combined's z
      for (index_t b = 0; b < B; ++b)
        for (index_t t = 0; t < TT; ++t)
          for (index_t h = 0; h < H; ++h)
            for (index_t p = 0; p < P; ++p) {
              const T zz = zv(b, t, h, p);
              y(b, t, h, p) *= zz / (T(1) + std::exp(-zz));
            }
    }
  });
  const auto to_pn = [&, st = st](index_t first, index_t count) {
    auto [a, v] = c.template output<4>({count, H, P, Nst});
    for (index_t b = 0; b < count; ++b)
      for (index_t h = 0; h < H; ++h)
        for (index_t n = 0; n < Nst; ++n)
          for (index_t p = 0; p < P; ++p) v(b, h, p, n) = st(first + b, h, n, p);
    return c.wrap(a);
  };
  py::object out = c.wrap(y_arr);
  if (!return_final_states && !return_varlen_states) return out;
  py::list res;
  res.append(out);
  if (return_final_states) res.append(cu.empty() ? to_pn(0, Ns) : to_pn(Ns - 1, 1));
  if (return_varlen_states) res.append(to_pn(0, Ns));
  return py::tuple(res);
}

template <class T>
py::object linear_attn_step(py::object q, py::object k, py::object v, py::object state,
                            py::object scale, py::object out) {
  call<T> c("seqmix.linear_attn_step", is_torch_tensor(q));
  const auto a = parse_step(c, q, k, v, state, out);
  const linear_attention<T> mixer({.scale = opt_scale<T>(scale)});
  nogil([&] { mixer.step(a.q, a.k, a.v, a.ov, a.state); });
  return step_result(c, a, out);
}
template <class T>
py::object simple_gla_step(py::object q, py::object k, py::object v, py::object g, py::object state,
                           py::object scale, py::object g_gamma, py::object out) {
  call<T> c("seqmix.simple_gla_step", is_torch_tensor(q));
  const auto a = parse_step(c, q, k, v, state, out);
  std::vector<T> gg = gamma_from(c, g_gamma);
  if (g.is_none() == gg.empty()) c.fail("g", "give exactly one of g [B, H] and g_gamma [H]");
  const simple_gla<T> mixer({.scale = opt_scale<T>(scale), .g_gamma = std::move(gg)});
  if (!g.is_none()) {
    const auto gv = c.template view<2>("g", g, "[B, H]");
    nogil([&] { mixer.step(a.q, a.k, a.v, gv, a.ov, a.state); });
  } else {
    nogil([&] { mixer.step(a.q, a.k, a.v, a.ov, a.state); });
  }
  return step_result(c, a, out);
}
template <class T>
py::object gla_step(py::object q, py::object k, py::object v, py::object gk, py::object state,
                    py::object scale, py::object gv, py::object out) {
  call<T> c("seqmix.gla_step", is_torch_tensor(q));
  const auto a = parse_step(c, q, k, v, state, out);
  const auto gkv = c.template view<3>("gk", gk, "[B, H, K]");
  const auto gvv = c.template optional_view<3>("gv", gv, "[B, H, V]");
  const gla<T> mixer({.scale = opt_scale<T>(scale)});
  nogil([&] {
    if (gvv.data())
      mixer.step(a.q, a.k, a.v, gkv, gvv, a.ov, a.state);
    else
      mixer.step(a.q, a.k, a.v, gkv, a.ov, a.state);
  });
  return step_result(c, a, out);
}

// --- C++-side timing loops (bench/python_bench.py: the binding's overhead is Python's time per
// call minus the same C++ call's time measured here, in the same process). Process CPU time
// (clock_gettime(CLOCK_PROCESS_CPUTIME_ID), as Python's time.process_time()): on a machine
// loaded by other work, wall time counts the time other processes ran. --------------------------
inline double process_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}
template <class T>
double cpp_simple_gla_step_loop(py::object q, py::object k, py::object v, py::object g,
                                py::object state, index_t iters) {
  call<T> c("seqmix._cpp_simple_gla_step_loop", false);
  const auto a = parse_step(c, q, k, v, state, py::none());
  const auto gv = c.template view<2>("g", g, "[B, H]");
  const simple_gla<T> mixer;
  double seconds = 0;
  nogil([&] {
    const double t0 = process_cpu_seconds();
    for (index_t i = 0; i < iters; ++i) mixer.step(a.q, a.k, a.v, gv, a.ov, a.state);
    seconds = process_cpu_seconds() - t0;
  });
  return seconds / double(iters);
}
template <class T>
double cpp_chunk_simple_gla_loop(py::object q, py::object k, py::object v, py::object g,
                                 index_t iters) {
  call<T> c("seqmix._cpp_chunk_simple_gla_loop", false);
  const qkv<T> a = parse_qkv(c, q, k, v);
  const auto gv = c.template view<3>("g", g, "[B, T, H]");
  auto [o, ov] = c.template output<4>({a.B, a.T_, a.HV, a.V});
  auto [st, sv] = c.template output<4>({a.B, a.HV, a.K, a.V});
  const simple_gla<T> mixer;
  double seconds = 0;
  nogil([&, ov = ov, sv = sv] {
    const double t0 = process_cpu_seconds();
    for (index_t i = 0; i < iters; ++i) mixer.forward_chunked(a.q, a.k, a.v, gv, ov, sv);
    seconds = process_cpu_seconds() - t0;
  });
  return seconds / double(iters);
}

}  // namespace

void bind_gated(py::module_& m) {
  const auto none = py::none();
  // linear attention
  for (const bool chunked : {true, false}) {
    const char* name = chunked ? "chunk_linear_attn" : "fused_recurrent_linear_attn";
    const char* fn = chunked ? "seqmix.chunk_linear_attn" : "seqmix.fused_recurrent_linear_attn";
    m.def(
        name,
        [fn, chunked](py::object q, py::object k, py::object v, py::object scale, py::object h0,
                      bool out_final, bool normalize, py::object cu) {
          return dispatch(fn, "q", q, [&]<class T>() {
            return linear_attn_seq<T>(fn, chunked, q, k, v, scale, h0, out_final, normalize, cu);
          });
        },
        "q"_a, "k"_a, "v"_a, "scale"_a = none, "initial_state"_a = none,
        "output_final_state"_a = false, "normalize"_a = chunked, "cu_seqlens"_a = none,
        doc(chunked
                ? "Linear attention, chunked form: S_t = S_{t-1} + k_t^T v_t, o_t = scale q_t "
                  "S_t.\n"
                  "q, k: [B, T, H, K]; v: [B, T, H, V].\n"
                  "    normalize: divide o_t by scale q_t . sum_{j<=t} k_j + 1e-10 (fla's default\n"
                  "      True here; the initial state's keys are not counted, as in fla)."
                : "Linear attention, recurrent form (token loop); as chunk_linear_attn,\n"
                  "normalize defaults to False (fla's default here).\n"
                  "q, k: [B, T, H, K]; v: [B, T, H, V].")
            .c_str());
  }
  // simple GLA (g or g_gamma), retention, lightning
  for (const bool chunked : {true, false}) {
    const char* name = chunked ? "chunk_simple_gla" : "fused_recurrent_simple_gla";
    const char* fn = chunked ? "seqmix.chunk_simple_gla" : "seqmix.fused_recurrent_simple_gla";
    m.def(
        name,
        [fn, chunked](py::object q, py::object k, py::object v, py::object g, py::object g_gamma,
                      py::object scale, py::object h0, bool out_final, py::object cu) {
          return dispatch(fn, "q", q, [&]<class T>() {
            call<T> c(fn, false);
            return simple_gla_seq<T>(fn, chunked, q, k, v, g, gamma_from(c, g_gamma), scale, h0,
                                     out_final, cu);
          });
        },
        "q"_a, "k"_a, "v"_a, "g"_a = none, "g_gamma"_a = none, "scale"_a = none,
        "initial_state"_a = none, "output_final_state"_a = false, "cu_seqlens"_a = none,
        doc("Simple GLA (scalar decay per head): S_t = exp(g_t) S_{t-1} + k_t^T v_t,\n"
            "o_t = scale q_t S_t.\n"
            "q, k: [B, T, H, K]; v: [B, T, H, V]; g: [B, T, H] natural-log decays (<= 0), or\n"
            "g_gamma: [H] constant log decays (exactly one of the two).")
            .c_str());
    const char* rname = chunked ? "chunk_retention" : "fused_recurrent_retention";
    const char* rfn = chunked ? "seqmix.chunk_retention" : "seqmix.fused_recurrent_retention";
    m.def(
        rname,
        [rfn, chunked](py::object q, py::object k, py::object v, py::object scale, py::object h0,
                       bool out_final, py::object cu) {
          return dispatch(rfn, "q", q, [&]<class T>() {
            const index_t H = q.attr("shape")[py::int_(2)].cast<index_t>();
            return simple_gla_seq<T>(rfn, chunked, q, k, v, py::none(), retention_g_gamma<T>(H),
                                     scale, h0, out_final, cu);
          });
        },
        "q"_a, "k"_a, "v"_a, "scale"_a = none, "initial_state"_a = none,
        "output_final_state"_a = false, "cu_seqlens"_a = none,
        doc("Retention: simple GLA with g_gamma[h] = log(1 - 2**(-5 - h)).\n"
            "q, k: [B, T, H, K]; v: [B, T, H, V].")
            .c_str());
    const char* lname = chunked ? "chunk_lightning_attn" : "fused_recurrent_lightning_attn";
    const char* lfn =
        chunked ? "seqmix.chunk_lightning_attn" : "seqmix.fused_recurrent_lightning_attn";
    m.def(
        lname,
        [lfn, chunked](py::object q, py::object k, py::object v, index_t layer_idx,
                       index_t num_layers, py::object scale, py::object h0, bool out_final,
                       py::object cu) {
          return dispatch(lfn, "q", q, [&]<class T>() {
            const index_t H = q.attr("shape")[py::int_(2)].cast<index_t>();
            return simple_gla_seq<T>(lfn, chunked, q, k, v, py::none(),
                                     lightning_g_gamma_transnormer<T>(H, layer_idx, num_layers),
                                     scale, h0, out_final, cu);
          });
        },
        "q"_a, "k"_a, "v"_a, "layer_idx"_a, "num_layers"_a, "scale"_a = none,
        "initial_state"_a = none, "output_final_state"_a = false, "cu_seqlens"_a = none,
        doc("Lightning attention: simple GLA with fla's g_gamma[h] =\n"
            "-(8 / H) * (1 - layer_idx / num_layers) * h.\n"
            "q, k: [B, T, H, K]; v: [B, T, H, V].")
            .c_str());
  }
  // GLA
  m.def(
      "chunk_gla",
      [](py::object q, py::object k, py::object v, py::object g, py::object scale, py::object h0,
         bool out_final, py::object cu) {
        const char* fn = "seqmix.chunk_gla";
        return dispatch(fn, "q", q, [&]<class T>() {
          return gla_seq<T>(fn, true, q, k, v, g, py::none(), scale, h0, out_final, cu);
        });
      },
      "q"_a, "k"_a, "v"_a, "g"_a, "scale"_a = none, "initial_state"_a = none,
      "output_final_state"_a = false, "cu_seqlens"_a = none,
      doc("GLA, chunked form: S_t = Diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t.\n"
          "q, k, g: [B, T, H, K] (g natural-log decays <= 0); v: [B, T, H, V].")
          .c_str());
  m.def(
      "fused_recurrent_gla",
      [](py::object q, py::object k, py::object v, py::object gk, py::object gv, py::object scale,
         py::object h0, bool out_final, py::object cu) {
        const char* fn = "seqmix.fused_recurrent_gla";
        return dispatch(fn, "q", q, [&]<class T>() {
          return gla_seq<T>(fn, false, q, k, v, gk, gv, scale, h0, out_final, cu);
        });
      },
      "q"_a, "k"_a, "v"_a, "gk"_a = none, "gv"_a = none, "scale"_a = none, "initial_state"_a = none,
      "output_final_state"_a = false, "cu_seqlens"_a = none,
      doc("GLA, recurrent form: S_t = Diag(exp(gk_t)) S_{t-1} Diag(exp(gv_t)) + k_t^T v_t.\n"
          "q, k, gk: [B, T, H, K]; v, gv: [B, T, H, V] (gk, gv optional log decays).")
          .c_str());
  // Mamba2
  for (const bool chunked : {true, false}) {
    const char* name = chunked ? "mamba_chunk_scan_combined" : "mamba_recurrent_scan";
    const char* fn = chunked ? "seqmix.mamba_chunk_scan_combined" : "seqmix.mamba_recurrent_scan";
    m.def(
        name,
        [fn, chunked](py::object x, py::object dt, py::object A, py::object B, py::object C,
                      index_t chunk_size, py::object D, py::object z, py::object dt_bias,
                      py::object initial_states, py::object seq_idx, py::object cu_seqlens,
                      bool dt_softplus, py::tuple dt_limit, bool return_final_states,
                      bool return_varlen_states) {
          return dispatch(fn, "x", x, [&]<class T>() {
            return mamba_scan<T>(fn, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states,
                                 seq_idx, cu_seqlens, dt_softplus, dt_limit, return_final_states,
                                 return_varlen_states, chunked);
          });
        },
        "x"_a, "dt"_a, "A"_a, "B"_a, "C"_a, "chunk_size"_a = 64, "D"_a = none, "z"_a = none,
        "dt_bias"_a = none, "initial_states"_a = none, "seq_idx"_a = none, "cu_seqlens"_a = none,
        "dt_softplus"_a = false,
        "dt_limit"_a = py::make_tuple(0.0, std::numeric_limits<double>::infinity()),
        "return_final_states"_a = false, "return_varlen_states"_a = false,
        chunked
            ? "Mamba2 SSD scan, chunked (mamba's mamba_chunk_scan_combined signature).\n"
              "x: [B, T, H, P]; dt: [B, T, H]; A: [H] (< 0); B, C: [B, T, G, N] (G divides H);\n"
              "D: [H] skip; z: [B, T, H, P] gate (y * silu(z)); dt_bias: [H];\n"
              "dt = clamp(softplus?(dt + dt_bias), *dt_limit);\n"
              "S_t = exp(dt_t A) S_{t-1} + dt_t x_t^T B_t (S: [P, N]); y_t = S_t C_t + D x_t.\n"
              "initial_states: [batch, H, P, N] (mamba's layout); seq_idx is not supported.\n"
              "Returns y [B, T, H, P], or a tuple (y, final_states [batch, H, P, N],\n"
              "varlen_states [N, H, P, N]) with the requested states."
            : "Mamba2 SSD scan, recurrent form (token loop); arguments as\n"
              "mamba_chunk_scan_combined (chunk_size unused).");
  }
  // steps
  m.def(
      "linear_attn_step",
      [](py::object q, py::object k, py::object v, py::object state, py::object scale,
         py::object out) {
        return dispatch("seqmix.linear_attn_step", "q", q,
                        [&]<class T>() { return linear_attn_step<T>(q, k, v, state, scale, out); });
      },
      "q"_a, "k"_a, "v"_a, "state"_a, "scale"_a = none, "out"_a = none,
      "One decode token of linear attention. q, k: [B, H, K]; v: [B, H, V]; state: [B, H, K, V]\n"
      "updated in place (writable, same dtype); out: optional [B, H, V] written and returned.\n"
      "Returns o [B, H, V].");
  m.def(
      "simple_gla_step",
      [](py::object q, py::object k, py::object v, py::object g, py::object state, py::object scale,
         py::object g_gamma, py::object out) {
        return dispatch("seqmix.simple_gla_step", "q", q, [&]<class T>() {
          return simple_gla_step<T>(q, k, v, g, state, scale, g_gamma, out);
        });
      },
      "q"_a, "k"_a, "v"_a, "g"_a, "state"_a, "scale"_a = none, "g_gamma"_a = none, "out"_a = none,
      "One decode token of simple GLA. q, k: [B, H, K]; v: [B, H, V]; g: [B, H] log decays\n"
      "(or None with g_gamma [H]); state: [B, H, K, V] updated in place; out: optional\n"
      "[B, H, V]. Returns o [B, H, V].");
  m.def(
      "gla_step",
      [](py::object q, py::object k, py::object v, py::object gk, py::object state,
         py::object scale, py::object gv, py::object out) {
        return dispatch("seqmix.gla_step", "q", q,
                        [&]<class T>() { return gla_step<T>(q, k, v, gk, state, scale, gv, out); });
      },
      "q"_a, "k"_a, "v"_a, "gk"_a, "state"_a, "scale"_a = none, "gv"_a = none, "out"_a = none,
      "One decode token of GLA. q, k, gk: [B, H, K]; v, gv: [B, H, V]; state: [B, H, K, V]\n"
      "updated in place; out: optional [B, H, V]. Returns o [B, H, V].");
  m.def(
      "_cpp_simple_gla_step_loop",
      [](py::object q, py::object k, py::object v, py::object g, py::object state, index_t iters) {
        return dispatch("seqmix._cpp_simple_gla_step_loop", "q", q, [&]<class T>() {
          return cpp_simple_gla_step_loop<T>(q, k, v, g, state, iters);
        });
      },
      "q"_a, "k"_a, "v"_a, "g"_a, "state"_a, "iters"_a,
      "Benchmark helper: seconds per simple_gla::step, timed in C++ over `iters` calls.");
  m.def(
      "_cpp_chunk_simple_gla_loop",
      [](py::object q, py::object k, py::object v, py::object g, index_t iters) {
        return dispatch("seqmix._cpp_chunk_simple_gla_loop", "q", q,
                        [&]<class T>() { return cpp_chunk_simple_gla_loop<T>(q, k, v, g, iters); });
      },
      "q"_a, "k"_a, "v"_a, "g"_a, "iters"_a,
      "Benchmark helper: seconds per simple_gla::forward_chunked, timed in C++.");
}

}  // namespace seqmix::python
