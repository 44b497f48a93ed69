// SPDX-License-Identifier: MIT
// The seqmix Python extension (seqmix._seqmix): module-level settings and the family bindings
// (gated.cpp, delta.cpp, attention.cpp, moe.cpp). Each family file is its own translation unit,
// so a change to one mixer recompiles one file.
#include <seqmix/core/parallel.hpp>
#include <seqmix/core/simd.hpp>
#include <seqmix/version.hpp>

#include "common.hpp"

PYBIND11_MODULE(_seqmix, m) {
  namespace py = pybind11;
  using namespace pybind11::literals;
  m.doc() =
      "seqmix: exact, fast sequence-mixing kernels for CPUs (C++20, header-only), in\n"
      "flash-linear-attention's calling conventions. Activations are [B, T, H, D]\n"
      "(head_first=False), states [B, H, K, V]; NumPy arrays or PyTorch CPU tensors,\n"
      "float32 or float64, used without copying; the GIL is released while kernels run.";
  m.attr("__version__") = seqmix::version_string;
  m.def(
      "set_num_threads", [](int n) { seqmix::set_num_threads(n); }, "n"_a,
      "Threads of seqmix's kernels (0 = OpenMP's default: OMP_NUM_THREADS or all cores).\n"
      "Process-wide; results do not depend on it (bitwise).");
  m.def(
      "get_num_threads", [] { return seqmix::num_threads(); },
      "Threads a kernel started now would use.");
  m.def(
      "simd_arch", [] { return std::string(seqmix::simd::arch_name()); },
      "The SIMD target the extension was compiled for (e.g. 'avx512bw').");
  m.attr("has_openmp") = py::bool_(SEQMIX_HAS_OPENMP != 0);
  m.def(
      "_view_address",
      [](py::object x) {
        // The data pointer and element strides of the view every binding builds from x (the
        // zero-copy test compares them with x's own).
        return seqmix::python::dispatch("seqmix._view_address", "x", x, [&]<class T>() {
          seqmix::python::call<T> c("seqmix._view_address", false);
          const auto info = [](const auto& v) {
            py::list strides;
            for (std::size_t d = 0; d < v.rank; ++d) strides.append(v.stride(d));
            return py::make_tuple(reinterpret_cast<std::uintptr_t>(v.data()), py::tuple(strides));
          };
          switch (x.attr("ndim").cast<int>()) {
            case 1:
              return info(c.template view<1>("x", x, "[D]"));
            case 2:
              return info(c.template view<2>("x", x, "[T, D]"));
            case 3:
              return info(c.template view<3>("x", x, "[B, H, D]"));
            default:
              return info(c.template view<4>("x", x, "[B, T, H, D]"));
          }
        });
      },
      "x"_a, "Test helper: (data address, element strides) of the binding's view of x.");
  m.def(
      "_set_torch_fast_path",
      [](bool on) {
        const bool was = seqmix::python::torch_fast_path_flag();
        seqmix::python::torch_fast_path_flag() = on;
        return was;
      },
      "on"_a,
      "Benchmark helper: read torch tensors through their attributes (True, the default) or\n"
      "through Tensor.numpy() (False, the slower path before). Returns the previous setting.");
  m.def(
      "_set_output_poison",
      [](bool on) {
        const bool was = seqmix::python::output_poison_flag();
        seqmix::python::output_poison_flag() = on;
        return was;
      },
      "on"_a,
      "Test helper: fill the uninitialised outputs (o of the sequence calls, o of the steps)\n"
      "with NaN, so a kernel that reads one before writing it shows. Returns the previous\n"
      "setting.");
  seqmix::python::bind_gated(m);
  seqmix::python::bind_delta(m);
  seqmix::python::bind_attention(m);
  seqmix::python::bind_moe(m);
  seqmix::python::bind_wave2(m);
  seqmix::python::bind_wave3(m);
}
