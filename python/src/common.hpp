// SPDX-License-Identifier: MIT
// The Python binding's plumbing: NumPy arrays and PyTorch CPU tensors in, seqmix views out,
// without copying where the layout allows; the checks that name the Python argument; outputs
// allocated as NumPy arrays (handed back as torch tensors when q was one); the GIL released
// around every kernel.
//
// Zero copy: a NumPy array is viewed through its buffer (data pointer + strides). A CPU torch
// tensor of the call's dtype is read through its attributes (dtype, is_cpu, shape, stride(),
// data_ptr(): torch_meta); any other tensor goes through Tensor.numpy() (detached first when it
// requires grad), which shares the storage or fails with the cause named. Any strides are accepted
// as long as they are non-negative and the last dimension is contiguous (stride 1): seqmix's
// kernels read rows of D contiguous values, so a q sliced out of a fused qkv projection is used in
// place. Outputs are new, C-contiguous.
//
// Errors: TypeError for a wrong container, dtype or device; ValueError (seqmix::shape_error)
// for shapes, strides and values. Every message starts with the Python function
// ("seqmix.chunk_gla") and names the argument as in its signature.
#pragma once

#include <array>
#include <chrono>
#include <cstddef>
#include <cstring>
#include <limits>
#include <optional>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <span>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include <seqmix/core/error.hpp>
#include <seqmix/core/tensor.hpp>

namespace seqmix::python {

namespace py = pybind11;

/// "(2, 3, 4)" for a shape.
inline std::string shape_str(const py::ssize_t* s, py::ssize_t n) {
  std::string out = "(";
  for (py::ssize_t i = 0; i < n; ++i) {
    if (i) out += ", ";
    out += std::to_string(s[i]);
  }
  if (n == 1) out += ",";
  return out + ")";
}

/// torch, when the user has imported it (looked up in sys.modules, never imported here).
struct torch_handles {
  py::object tensor_type, float32, float64, from_numpy;
  // interned attribute names of the fast path (torch_meta)
  py::object s_dtype, s_is_cpu, s_shape, s_stride, s_data_ptr;
  bool ready = false;
};
inline torch_handles& torch_state() {
  static torch_handles* h = new torch_handles();  // leaked on purpose: outlives the interpreter
  return *h;
}
inline bool torch_loaded() {
  auto& t = torch_state();
  if (t.ready) return true;
  py::dict modules = py::module_::import("sys").attr("modules");
  if (!modules.contains("torch")) return false;
  py::object torch = modules["torch"];
  t.tensor_type = torch.attr("Tensor");
  t.float32 = torch.attr("float32");
  t.float64 = torch.attr("float64");
  t.from_numpy = torch.attr("from_numpy");
  const auto intern = [](const char* s) {
    return py::reinterpret_steal<py::object>(PyUnicode_InternFromString(s));
  };
  t.s_dtype = intern("dtype");
  t.s_is_cpu = intern("is_cpu");
  t.s_shape = intern("shape");
  t.s_stride = intern("stride");
  t.s_data_ptr = intern("data_ptr");
  t.ready = true;
  return true;
}
inline bool is_torch_tensor(py::handle h) {
  if (py::isinstance<py::array>(h)) return false;
  return torch_loaded() && py::isinstance(h, torch_state().tensor_type);
}

/// What a view is built from: data pointer, shape, byte strides, writeability.
inline constexpr int max_rank = 8;
struct raw_meta {
  void* data = nullptr;
  int ndim = 0;
  std::array<py::ssize_t, max_rank> shape{}, strides{};  // strides in bytes
  bool writeable = true;
};

/// The torch fast path on (default) or off (Tensor.numpy() for every tensor: the path before,
/// kept for bench/python_bench.py's comparison; seqmix._set_torch_fast_path).
inline bool& torch_fast_path_flag() {
  static bool on = true;
  return on;
}
/// Uninitialised outputs filled with NaN (tests only; seqmix._set_output_poison).
inline bool& output_poison_flag() {
  static bool on = false;
  return on;
}
inline bool torch_fast_path_enabled() {
  return torch_fast_path_flag();
}

/// A CPU torch tensor of dtype T read through five cheap attributes (dtype, is_cpu, shape,
/// stride(), data_ptr(): ~0.3 us together, against ~0.9 us for Tensor.numpy() and ~0.55 us for
/// torch._C._to_dlpack plus its capsule). The tensor stays alive for the call: the caller holds
/// it. False (and no Python error set) when the tensor is not a CPU tensor of dtype T or of too
/// high a rank: the caller then takes the Tensor.numpy() path, whose checks name the cause.
/// A tensor with requires_grad=True is read as is (as .detach() would: same storage).
/// Tensors with the conjugate or negative bit exist only for complex dtypes (or torch's private
/// _neg_view), which the dtype check already turns away.
template <class T>
bool torch_meta(py::handle h, raw_meta& m) {
  auto& ts = torch_state();
  PyObject* t = h.ptr();
  const py::object want = std::is_same_v<T, float> ? ts.float32 : ts.float64;
  {
    auto dt = py::reinterpret_steal<py::object>(PyObject_GetAttr(t, ts.s_dtype.ptr()));
    if (!dt || !dt.is(want)) return PyErr_Clear(), false;
  }
  {
    auto cpu = py::reinterpret_steal<py::object>(PyObject_GetAttr(t, ts.s_is_cpu.ptr()));
    if (!cpu || cpu.ptr() != Py_True) return PyErr_Clear(), false;
  }
  auto shape = py::reinterpret_steal<py::object>(PyObject_GetAttr(t, ts.s_shape.ptr()));
  auto stride =
      py::reinterpret_steal<py::object>(PyObject_CallMethodObjArgs(t, ts.s_stride.ptr(), nullptr));
  auto ptr = py::reinterpret_steal<py::object>(
      PyObject_CallMethodObjArgs(t, ts.s_data_ptr.ptr(), nullptr));
  if (!shape || !stride || !ptr || !PyTuple_Check(shape.ptr()) || !PyTuple_Check(stride.ptr()))
    return PyErr_Clear(), false;
  const py::ssize_t nd = PyTuple_GET_SIZE(shape.ptr());
  if (nd > max_rank || PyTuple_GET_SIZE(stride.ptr()) != nd) return false;
  m.ndim = static_cast<int>(nd);
  for (py::ssize_t d = 0; d < nd; ++d) {
    m.shape[static_cast<std::size_t>(d)] = PyLong_AsSsize_t(PyTuple_GET_ITEM(shape.ptr(), d));
    m.strides[static_cast<std::size_t>(d)] =
        PyLong_AsSsize_t(PyTuple_GET_ITEM(stride.ptr(), d)) * static_cast<py::ssize_t>(sizeof(T));
  }
  m.data = PyLong_AsVoidPtr(ptr.ptr());
  if (PyErr_Occurred()) return PyErr_Clear(), false;
  m.writeable = true;
  return true;
}

/// An empty py::array handle (py::array's default constructor allocates a 0-size array: a
/// microsecond per call on the step path).
inline py::array null_array() {
  return py::reinterpret_steal<py::array>(py::handle());
}

enum class dtype { f32, f64 };

/// The floating dtype of `h` (q: the argument every other one must match).
inline dtype dtype_of(const char* fn, const char* name, py::handle h) {
  if (py::isinstance<py::array>(h)) {
    const auto a = py::reinterpret_borrow<py::array>(h);
    if (a.dtype().is(py::dtype::of<float>())) return dtype::f32;
    if (a.dtype().is(py::dtype::of<double>())) return dtype::f64;
    throw py::type_error(std::string(fn) + ": argument '" + name +
                         "': expected float32 or float64, got " +
                         py::str(a.dtype()).cast<std::string>());
  }
  if (is_torch_tensor(h)) {
    const py::object dt = h.attr("dtype");
    if (dt.is(torch_state().float32)) return dtype::f32;
    if (dt.is(torch_state().float64)) return dtype::f64;
    throw py::type_error(std::string(fn) + ": argument '" + name +
                         "': expected torch.float32 or torch.float64, got " +
                         py::str(dt).cast<std::string>());
  }
  throw py::type_error(std::string(fn) + ": argument '" + name +
                       "': expected a numpy.ndarray or a torch.Tensor, got " +
                       py::str(py::type::handle_of(h).attr("__name__")).cast<std::string>());
}

template <class T>
constexpr const char* dtype_name() {
  return std::is_same_v<T, float> ? "float32" : "float64";
}

/// One call's arguments: converts them, keeps what it converted alive, and remembers whether
/// the outputs go back as torch tensors.
template <class T>
class call {
 public:
  call(const char* fn, bool torch_out) : fn_(fn), torch_(torch_out) {}
  const char* fn() const { return fn_; }
  bool torch() const { return torch_; }

  [[noreturn]] void fail(const char* name, const std::string& what) const {
    throw shape_error(std::string(fn_) + ": argument '" + name + "': " + what);
  }
  [[noreturn]] void type_fail(const char* name, const std::string& what) const {
    throw py::type_error(std::string(fn_) + ": argument '" + name + "': " + what);
  }

  /// The NumPy array behind `h` (a torch tensor's shared-storage view), dtype T, checked.
  py::array array(const char* name, py::handle h) {
    py::array a = null_array();
    if (py::isinstance<py::array>(h)) {
      a = py::reinterpret_borrow<py::array>(h);
      if (!a.dtype().is(py::dtype::of<T>())) {
        type_fail(name, std::string("expected ") + dtype_name<T>() + ", got " +
                            py::str(a.dtype()).cast<std::string>() +
                            " (the float arguments of one call share one dtype)");
      }
    } else if (is_torch_tensor(h)) {
      // Fast path: one call (Tensor.numpy() shares the storage of a CPU tensor without grad);
      // the checks below run only when it fails or the dtype differs, to name the cause.
      PyObject* arr = PyObject_CallMethod(h.ptr(), "numpy", nullptr);
      if (arr != nullptr) {
        a = py::reinterpret_steal<py::array>(arr);
      } else {
        PyErr_Clear();
        a = torch_fallback(name, h);
      }
      if (!a.dtype().is(py::dtype::of<T>())) torch_dtype_fail(name, h);
    } else {
      type_fail(name, "expected a numpy.ndarray or a torch.Tensor, got " +
                          py::str(py::type::handle_of(h).attr("__name__")).cast<std::string>());
    }
    keep_.push_back(a);
    return a;
  }

  /// Why Tensor.numpy() failed (device, dtype), or the detached tensor's array (grad).
  py::array torch_fallback(const char* name, py::handle h) const {
    const py::object dev = h.attr("device");
    if (dev.attr("type").cast<std::string>() != "cpu") {
      type_fail(name, "tensor is on device " + py::str(dev).cast<std::string>() +
                          "; seqmix runs on the CPU: pass " + name + ".cpu()");
    }
    torch_dtype_fail(name, h);
    if (h.attr("requires_grad").cast<bool>()) return h.attr("detach")().attr("numpy")();
    return h.attr("resolve_conj")().attr("resolve_neg")().attr("numpy")();
  }
  /// Throws when the tensor's dtype is not T's.
  void torch_dtype_fail(const char* name, py::handle h) const {
    const py::object dt = h.attr("dtype");
    const py::object& want =
        std::is_same_v<T, float> ? torch_state().float32 : torch_state().float64;
    if (!dt.is(want)) {
      type_fail(name, std::string("expected torch.") + dtype_name<T>() + ", got " +
                          py::str(dt).cast<std::string>() +
                          " (the float arguments of one call share one dtype)");
    }
  }

  /// Data pointer, shape, byte strides of `h` (dtype T, checked), without copying.
  raw_meta meta(const char* name, py::handle h) {
    raw_meta m;
    if (torch_fast_path_enabled() && is_torch_tensor(h) && torch_meta<T>(h, m)) return m;
    // NumPy arrays, and torch tensors the fast path does not take (wrong dtype or device: the
    // checks of array() name the cause; or the fast path switched off for measuring)
    py::array a = array(name, h);
    m.data = const_cast<void*>(a.data());
    m.ndim = static_cast<int>(a.ndim());
    m.writeable = a.writeable();
    if (m.ndim > max_rank) {
      fail(name, "expected at most " + std::to_string(max_rank) + " dimensions, got shape " +
                     shape_str(a.shape(), a.ndim()));
    }
    for (std::size_t d = 0; d < static_cast<std::size_t>(m.ndim); ++d) {
      m.shape[d] = a.shape(static_cast<py::ssize_t>(d));
      m.strides[d] = a.strides(static_cast<py::ssize_t>(d));
    }
    return m;
  }

  /// A view of `h` with rank R; `dims` names the expected dimensions ("[B, T, H, K]").
  template <std::size_t R, class U = const T>
  tensor_view<U, R> view(const char* name, py::handle h, const char* dims) {
    const raw_meta m = meta(name, h);
    const py::ssize_t nd = m.ndim;
    if (nd != static_cast<py::ssize_t>(R)) {
      fail(name, "expected " + std::to_string(R) + " dimensions " + dims + ", got shape " +
                     shape_str(m.shape.data(), nd));
    }
    if constexpr (!std::is_const_v<U>) {
      if (!m.writeable) fail(name, "is written in place but the array is read-only");
    }
    shape_t<R> shape{}, strides{};
    for (std::size_t d = 0; d < R; ++d) {
      shape[d] = m.shape[d];
      const py::ssize_t sb = m.strides[d];
      if (sb < 0 || sb % static_cast<py::ssize_t>(sizeof(T)) != 0) {
        fail(name, "strides must be non-negative multiples of the item size, got strides " +
                       shape_str(m.strides.data(), nd) +
                       " bytes; pass a contiguous copy (np.ascontiguousarray / .contiguous())");
      }
      strides[d] = sb / static_cast<py::ssize_t>(sizeof(T));
    }
    if (shape[R - 1] > 1 && strides[R - 1] != 1) {
      fail(name, "the last dimension must be contiguous (stride 1), got strides " +
                     shape_str(m.strides.data(), nd) +
                     " bytes; pass a contiguous copy (np.ascontiguousarray / .contiguous())");
    }
    if (shape[R - 1] <= 1) strides[R - 1] = 1;
    return tensor_view<U, R>(static_cast<U*>(m.data), shape, strides);
  }
  /// An optional view: empty for None.
  template <std::size_t R, class U = const T>
  tensor_view<U, R> optional_view(const char* name, py::handle h, const char* dims) {
    if (h.is_none()) return {};
    return view<R, U>(name, h, dims);
  }

  /// Checks the shape of a view against `want` (-1: any), naming the dims.
  template <std::size_t R, class U>
  void expect_shape(const char* name, const tensor_view<U, R>& v, std::array<index_t, R> want,
                    const char* dims) const {
    bool ok = true;
    for (std::size_t d = 0; d < R; ++d) ok = ok && (want[d] < 0 || v.extent(d) == want[d]);
    if (ok) return;
    std::string w = "(", g = "(";
    for (std::size_t d = 0; d < R; ++d) {
      if (d) w += ", ", g += ", ";
      w += want[d] < 0 ? "*" : std::to_string(want[d]);
      g += std::to_string(v.extent(d));
    }
    fail(name, std::string("expected shape ") + dims + " = " + w + (R == 1 ? ",)" : ")") +
                   ", got " + g + (R == 1 ? ",)" : ")"));
  }

  /// A new C-contiguous output array (zeros) and its view.
  template <std::size_t R>
  std::pair<py::array, tensor_view<T, R>> output(std::array<index_t, R> shape) {
    std::vector<py::ssize_t> s(shape.begin(), shape.end());
    py::array_t<T> a(s);
    std::memset(a.mutable_data(), 0, static_cast<std::size_t>(a.size()) * sizeof(T));
    shape_t<R> sh{};
    for (std::size_t d = 0; d < R; ++d) sh[d] = shape[d];
    return {a, tensor_view<T, R>(a.mutable_data(), sh)};
  }
  /// A new C-contiguous output array left uninitialised (for outputs the kernel writes whole:
  /// the o of a sequence call; zeroing 16 MB of o at T = 8192 cost ~3 % of the call) and its
  /// view. Filled with NaN instead when seqmix._set_output_poison(True) (the tests check that
  /// no kernel reads such an output before writing it).
  template <std::size_t R>
  std::pair<py::array, tensor_view<T, R>> empty(std::array<index_t, R> shape) {
    std::array<py::ssize_t, R> s{};
    for (std::size_t d = 0; d < R; ++d) s[d] = shape[d];
    py::array_t<T> a(s);
    if (output_poison_flag()) {
      T* p = a.mutable_data();
      for (py::ssize_t i = 0; i < a.size(); ++i) p[i] = std::numeric_limits<T>::quiet_NaN();
    }
    shape_t<R> sh{};
    for (std::size_t d = 0; d < R; ++d) sh[d] = shape[d];
    return {a, tensor_view<T, R>(a.mutable_data(), sh)};
  }
  /// A C-contiguous copy of `src` (used for initial states, which fla never writes to).
  template <std::size_t R>
  std::pair<py::array, tensor_view<T, R>> copy_of(const tensor_view<const T, R>& src) {
    std::array<index_t, R> shape{};
    for (std::size_t d = 0; d < R; ++d) shape[d] = src.extent(d);
    auto [a, v] = output<R>(shape);
    copy_into(src, v);
    return {a, v};
  }

  /// Back to the caller's kind of container (zero-copy torch.from_numpy when q was a tensor).
  py::object wrap(const py::array& a) const {
    if (torch_) return torch_state().from_numpy(a);
    return a;
  }

  /// cu_seqlens [N+1] (int64/int32 array or tensor, or a sequence of ints) as index_t.
  std::vector<index_t> offsets(const char* name, py::handle h) const {
    std::vector<index_t> cu;
    if (h.is_none()) return cu;
    py::object obj = py::reinterpret_borrow<py::object>(h);
    if (is_torch_tensor(h)) {
      if (h.attr("device").attr("type").cast<std::string>() != "cpu") obj = obj.attr("cpu")();
      obj = obj.attr("numpy")();
    }
    py::array a = py::array::ensure(obj);
    if (!a) type_fail(name, "expected an integer array of offsets [N+1]");
    if (a.dtype().kind() != 'i' && a.dtype().kind() != 'u') {
      type_fail(name, "expected an integer dtype (int64 like fla's LongTensor), got " +
                          py::str(a.dtype()).cast<std::string>());
    }
    if (a.ndim() != 1 || a.shape(0) < 2) {
      fail(name, "expected shape [N+1] with N >= 1, got " + shape_str(a.shape(), a.ndim()));
    }
    auto i64 = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
    cu.assign(i64.data(), i64.data() + i64.size());
    return cu;
  }

 private:
  template <std::size_t R>
  static void copy_into(const tensor_view<const T, R>& src, const tensor_view<T, R>& dst) {
    if constexpr (R == 1) {
      for (index_t i = 0; i < src.extent(0); ++i) dst(i) = src(i);
    } else {
      for (index_t i = 0; i < src.extent(0); ++i) {
        copy_into<R - 1>(src.template select<0>(i), dst.template select<0>(i));
      }
    }
  }

  const char* fn_;
  bool torch_;
  std::vector<py::array> keep_;
};

/// Calls f.template operator()<float>() or <double>() by the dtype of the first tensor `first`.
template <class F>
decltype(auto) dispatch(const char* fn, const char* first_name, py::handle first, F&& f) {
  if (dtype_of(fn, first_name, first) == dtype::f32) return f.template operator()<float>();
  return f.template operator()<double>();
}

/// The sequences N and the state rows of a call: B without cu_seqlens, len(cu_seqlens) - 1
/// with them (then B must be 1).
template <class T>
index_t sequences(const call<T>& c, index_t B, const std::vector<index_t>& cu) {
  if (cu.empty()) return B;
  if (B != 1) {
    c.fail("cu_seqlens",
           "packed variable-length input needs batch size B == 1, got B = " + std::to_string(B));
  }
  return static_cast<index_t>(cu.size()) - 1;
}

/// The state buffer of a stateful call: a copy of initial_state (checked against `shape`) or
/// zeros.
template <class T>
std::pair<py::array, tensor_view<T, 4>> state_buffer(call<T>& c, py::handle initial_state,
                                                     std::array<index_t, 4> shape,
                                                     const char* dims) {
  if (initial_state.is_none()) return c.template output<4>(shape);
  const auto h0 = c.template view<4>("initial_state", initial_state, dims);
  c.expect_shape("initial_state", h0, shape, dims);
  return c.copy_of(h0);
}

/// Runs `kernel` with the GIL released.
template <class F>
void nogil(F&& kernel) {
  py::gil_scoped_release release;
  kernel();
}

// --- the frame shared by the stateful sequence ops and the steps ------------------------------
template <class T>
std::optional<T> opt_scale(const py::object& s) {
  if (s.is_none()) return std::nullopt;
  return static_cast<T>(s.cast<double>());
}

/// q, k [B, T, H, K] and v [B, T, HV, V] of a sequence call.
template <class T>
struct qkv {
  tensor_view<const T, 4> q, k, v;
  index_t B = 0, T_ = 0, H = 0, K = 0, HV = 0, V = 0;
};
template <class T>
qkv<T> parse_qkv(call<T>& c, py::handle q, py::handle k, py::handle v, const char* qname = "q") {
  qkv<T> a;
  a.q = c.template view<4>(qname, q, "[B, T, H, K]");
  a.k = c.template view<4>("k", k, "[B, T, H, K]");
  a.v = c.template view<4>("v", v, "[B, T, H, V]");
  a.B = a.q.extent(0), a.T_ = a.q.extent(1), a.H = a.q.extent(2), a.K = a.q.extent(3);
  c.expect_shape("k", a.k, {a.B, a.T_, a.H, a.K}, "[B, T, H, K] (as q)");
  c.expect_shape("v", a.v, {a.B, a.T_, -1, -1}, "[B, T, HV, V]");
  a.HV = a.v.extent(2), a.V = a.v.extent(3);
  return a;
}

/// The common frame of a stateful sequence call; body(c, a, o, state, cu) parses its extra
/// arguments (GIL held) and runs the kernel inside nogil().
template <class T, class Body>
py::tuple sequence_op(const char* fn, py::handle q, py::handle k, py::handle v,
                      py::handle initial_state, bool output_final_state, py::handle cu_seqlens,
                      Body&& body, const char* qname = "q") {
  call<T> c(fn, is_torch_tensor(q));
  const qkv<T> a = parse_qkv(c, q, k, v, qname);
  const std::vector<index_t> cu = c.offsets("cu_seqlens", cu_seqlens);
  const index_t N = sequences(c, a.B, cu);
  auto [o, ov] = c.template empty<4>({a.B, a.T_, a.HV, a.V});
  auto [st, sv] = state_buffer(c, initial_state, {N, a.HV, a.K, a.V}, "[N, H, K, V]");
  body(c, a, ov, sv, std::span<const index_t>(cu));
  return py::make_tuple(c.wrap(o), output_final_state ? c.wrap(st) : py::object(py::none()));
}

// --- one-token steps (decode): state [B, H, K, V] updated in place ------------------------------
template <class T>
struct step_args {
  tensor_view<const T, 3> q, k, v;
  tensor_view<T, 4> state;
  py::array o = null_array();
  tensor_view<T, 3> ov;
};
template <class T>
step_args<T> parse_step(call<T>& c, py::handle q, py::handle k, py::handle v, py::handle state,
                        py::handle out, const char* qname = "q") {
  step_args<T> a;
  a.q = c.template view<3>(qname, q, "[B, H, K]");
  a.k = c.template view<3>("k", k, "[B, H, K]");
  a.v = c.template view<3>("v", v, "[B, H, V]");
  a.state = c.template view<4, T>("state", state, "[B, H, K, V]");
  const std::array<index_t, 3> oshape{a.v.extent(0), a.v.extent(1), a.v.extent(2)};
  if (out.is_none()) {
    std::tie(a.o, a.ov) = c.template empty<3>(oshape);
  } else {  // a.o stays empty: step_result hands `out` back
    a.ov = c.template view<3, T>("out", out, "[B, H, V]");
    c.expect_shape("out", a.ov, oshape, "[B, H, V] (as v)");
  }
  return a;
}
template <class T>
py::object step_result(const call<T>& c, const step_args<T>& a, py::handle out) {
  if (!out.is_none()) return py::reinterpret_borrow<py::object>(out);
  return c.wrap(a.o);
}

inline constexpr const char* seq_args_doc = R"(
    scale: multiplies q; default K**-0.5.
    initial_state: [N, H, K, V] state S_0 (N = B, or len(cu_seqlens) - 1); not modified.
    output_final_state: return S_T as [N, H, K, V] (else None).
    cu_seqlens: int64 [N+1] offsets of packed sequences (then B must be 1).

Returns (o [B, T, H, V], final_state or None); torch tensors when q is one.
Arrays: NumPy or PyTorch CPU, float32 or float64 (all alike), last dimension contiguous;
used without copying. The GIL is released while the kernel runs.)";

inline std::string doc(const char* head) {
  return std::string(head) + seq_args_doc;
}

void bind_gated(py::module_& m);
void bind_delta(py::module_& m);
void bind_attention(py::module_& m);
void bind_moe(py::module_& m);
void bind_wave2(py::module_& m);
void bind_wave3(py::module_& m);

}  // namespace seqmix::python
