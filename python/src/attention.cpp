// SPDX-License-Identifier: MIT
// Bindings of softmax attention (mixers/softmax_attention.hpp, sliding_window_attention.hpp):
// parallel_attn (fla's name: causal, GQA, optional window and per-head sinks, packed input) and
// KVCache, an attention layer's decode state: prefill appends a prompt, step decodes one token
// per sequence, both against the cache (a ring of the last W rows when a window is set).
#include <mutex>
#include <pybind11/stl.h>
#include <variant>

#include <seqmix/mixers/kv_cache.hpp>
#include <seqmix/mixers/softmax_attention.hpp>

#include "common.hpp"

namespace seqmix::python {
namespace {

using namespace pybind11::literals;

template <class T>
typename softmax_attention<T>::options attention_options(const py::object& scale,
                                                         const py::object& window,
                                                         const std::vector<double>& sink) {
  typename softmax_attention<T>::options o;
  o.scale = opt_scale<T>(scale);
  if (!window.is_none()) o.window = window.cast<index_t>();
  for (double s : sink) o.sink.push_back(static_cast<T>(s));
  return o;
}

std::vector<double> sink_values(const py::object& sink) {
  std::vector<double> s;
  if (sink.is_none()) return s;
  py::object obj = sink;
  if (is_torch_tensor(sink)) obj = obj.attr("detach")().attr("cpu")().attr("numpy")();
  auto a = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(obj);
  if (!a || a.ndim() != 1) {
    throw shape_error("seqmix: argument 'sink': expected a 1-d array of per-head logits [H]");
  }
  s.assign(a.data(), a.data() + a.size());
  return s;
}

template <class T>
py::object parallel_attn(py::object q, py::object k, py::object v, py::object scale,
                         py::object window, py::object cu_seqlens, py::object sink) {
  call<T> c("seqmix.parallel_attn", is_torch_tensor(q));
  const auto qv = c.template view<4>("q", q, "[B, T, H, K]");
  const auto kv = c.template view<4>("k", k, "[B, T, Hkv, K]");
  const auto vv = c.template view<4>("v", v, "[B, T, Hkv, V]");
  const std::vector<index_t> cu = c.offsets("cu_seqlens", cu_seqlens);
  sequences(c, qv.extent(0), cu);
  auto [o, ov] = c.template output<4>({qv.extent(0), qv.extent(1), qv.extent(2), vv.extent(3)});
  const softmax_attention<T> mixer(attention_options<T>(scale, window, sink_values(sink)));
  nogil([&, ov = ov] {
    if (cu.empty())
      mixer.forward_chunked(qv, kv, vv, ov);
    else
      mixer.forward_chunked(qv, kv, vv, ov, std::span<const index_t>(cu));
  });
  return c.wrap(o);
}

/// One attention layer's decode state over float or double.
template <class T>
struct cache_impl {
  softmax_attention<T> mixer;
  kv_cache<T> cache;
};

class kv_cache_object {
  // The cache is written: one call at a time per object (the lock is taken without the GIL).
  // Defined before its uses: clang 14 reports a member template of a class in an anonymous
  // namespace that is used (from a generic lambda) above its definition as undefined
  // (-Wundefined-internal).
  template <class F>
  void locked_nogil(F&& f) {
    py::gil_scoped_release release;
    std::lock_guard<std::mutex> lock(mu_);
    f();
  }

  // f.template operator()<T>(the float or double state)
  template <class F>
  decltype(auto) visit(F&& f) {
    if (impl_.index() == 0) return f.template operator()<float>(std::get<0>(impl_));
    return f.template operator()<double>(std::get<1>(impl_));
  }

 public:
  kv_cache_object(index_t batch, index_t kv_heads, index_t head_dim, py::object value_dim,
                  index_t capacity, py::object window, const std::string& dtype, py::object scale,
                  py::object sink) {
    const index_t V = value_dim.is_none() ? head_dim : value_dim.cast<index_t>();
    const auto sinks = sink_values(sink);
    if (dtype == "float32") {
      impl_.emplace<0>(make<float>(batch, kv_heads, head_dim, V, capacity, window, scale, sinks));
    } else if (dtype == "float64") {
      impl_.emplace<1>(make<double>(batch, kv_heads, head_dim, V, capacity, window, scale, sinks));
    } else {
      throw shape_error("seqmix.KVCache: argument 'dtype': expected 'float32' or 'float64', got '" +
                        dtype + "'");
    }
  }

  py::object prefill(py::object q, py::object k, py::object v, py::object cu_seqlens) {
    return visit([&]<class T>(cache_impl<T>& s) -> py::object {
      call<T> c("seqmix.KVCache.prefill", is_torch_tensor(q));
      const auto qv = c.template view<4>("q", q, "[B, T, H, K]");
      const auto kv = c.template view<4>("k", k, "[B, T, Hkv, K]");
      const auto vv = c.template view<4>("v", v, "[B, T, Hkv, V]");
      const std::vector<index_t> cu = c.offsets("cu_seqlens", cu_seqlens);
      auto [o, ov] = c.template output<4>({qv.extent(0), qv.extent(1), qv.extent(2), vv.extent(3)});
      locked_nogil([&, ov = ov] {
        if (cu.empty())
          s.mixer.forward_chunked(qv, kv, vv, ov, s.cache);
        else
          s.mixer.forward_chunked(qv, kv, vv, ov, s.cache, std::span<const index_t>(cu));
      });
      return c.wrap(o);
    });
  }

  py::object step(py::object q, py::object k, py::object v, py::object out) {
    return visit([&]<class T>(cache_impl<T>& s) -> py::object {
      call<T> c("seqmix.KVCache.step", is_torch_tensor(q));
      const auto qv = c.template view<3>("q", q, "[B, H, K]");
      const auto kv = c.template view<3>("k", k, "[B, Hkv, K]");
      const auto vv = c.template view<3>("v", v, "[B, Hkv, V]");
      const std::array<index_t, 3> oshape{qv.extent(0), qv.extent(1), vv.extent(2)};
      py::array o = null_array();
      tensor_view<T, 3> ov;
      if (out.is_none()) {
        std::tie(o, ov) = c.template output<3>(oshape);
      } else {
        ov = c.template view<3, T>("out", out, "[B, H, V]");
        c.expect_shape("out", ov, oshape, "[B, H, V]");
      }
      locked_nogil([&] { s.mixer.step(qv, kv, vv, ov, s.cache); });
      if (!out.is_none()) return out;
      return c.wrap(o);
    });
  }

  std::vector<index_t> lengths() {
    return visit([&]<class T>(cache_impl<T>& s) {
      std::lock_guard<std::mutex> lock(mu_);
      std::vector<index_t> n;
      for (index_t b = 0; b < s.cache.batch(); ++b) n.push_back(s.cache.length(b));
      return n;
    });
  }
  void reset(py::object b) {
    visit([&]<class T>(cache_impl<T>& s) {
      std::lock_guard<std::mutex> lock(mu_);
      if (b.is_none())
        s.cache.reset();
      else
        s.cache.reset(b.cast<index_t>());
      return 0;
    });
  }
  void truncate(index_t b, index_t n) {
    visit([&]<class T>(cache_impl<T>& s) {
      std::lock_guard<std::mutex> lock(mu_);
      s.cache.truncate(b, n);
      return 0;
    });
  }
  index_t capacity() {
    return visit([&]<class T>(cache_impl<T>& s) { return s.cache.capacity(); });
  }
  bool is_ring() {
    return visit([&]<class T>(cache_impl<T>& s) { return s.cache.is_ring(); });
  }
  std::size_t nbytes() {
    return visit([&]<class T>(cache_impl<T>& s) { return s.cache.storage_bytes(); });
  }
  std::string dtype() const { return impl_.index() == 0 ? "float32" : "float64"; }

 private:
  template <class T>
  static cache_impl<T> make(index_t B, index_t Hkv, index_t K, index_t V, index_t capacity,
                            const py::object& window, const py::object& scale,
                            const std::vector<double>& sink) {
    softmax_attention<T> mixer(attention_options<T>(scale, window, sink));
    auto cache = mixer.make_cache(B, Hkv, K, V, capacity);
    return {std::move(mixer), std::move(cache)};
  }

  std::variant<cache_impl<float>, cache_impl<double>> impl_;
  std::mutex mu_;
};

}  // namespace

void bind_attention(py::module_& m) {
  const auto none = py::none();
  m.def(
      "parallel_attn",
      [](py::object q, py::object k, py::object v, py::object scale, py::object window_size,
         py::object cu_seqlens, py::object sink) {
        return dispatch("seqmix.parallel_attn", "q", q, [&]<class T>() {
          return parallel_attn<T>(q, k, v, scale, window_size, cu_seqlens, sink);
        });
      },
      "q"_a, "k"_a, "v"_a, "scale"_a = none, "window_size"_a = none, "cu_seqlens"_a = none,
      "sink"_a = none,
      "Causal softmax attention (flash-style tiles, never a T x T matrix).\n"
      "q: [B, T, H, K]; k: [B, T, Hkv, K]; v: [B, T, Hkv, V] (GQA: H a multiple of Hkv).\n"
      "    scale: default K**-0.5.\n"
      "    window_size: W, token t sees keys t-W+1 .. t (sliding-window attention); None: all.\n"
      "    cu_seqlens: int64 [N+1] offsets of packed sequences (B == 1).\n"
      "    sink: [H] per-head sink logits (an extra softmax term with no value).\n"
      "Returns o [B, T, H, V]; the GIL is released while it runs.");
  py::class_<kv_cache_object>(
      m, "KVCache",
      "Decode state of one softmax-attention layer: the keys and values of\n"
      "every token so far ([batch, kv_heads, capacity, head_dim] each), or a\n"
      "ring of the last window_size tokens. Calls on one object are\n"
      "serialised; different objects run in parallel (GIL released).")
      .def(py::init<index_t, index_t, index_t, py::object, index_t, py::object, const std::string&,
                    py::object, py::object>(),
           "batch"_a, "kv_heads"_a, "head_dim"_a, "value_dim"_a = none, "capacity"_a,
           "window_size"_a = none, "dtype"_a = "float32", "scale"_a = none, "sink"_a = none,
           "KVCache(batch, kv_heads, head_dim, value_dim=None, *, capacity, window_size=None,\n"
           "dtype='float32', scale=None, sink=None): room for `capacity` tokens per sequence\n"
           "(a ring of window_size rows when window_size < capacity).")
      .def("prefill", &kv_cache_object::prefill, "q"_a, "k"_a, "v"_a, "cu_seqlens"_a = none,
           "Attend T new tokens per sequence over the cached ones and themselves, and append\n"
           "them. q: [B, T, H, K]; k: [B, T, Hkv, K]; v: [B, T, Hkv, V]; with cu_seqlens\n"
           "(B == 1) sequence n appends to cache row n. Returns o [B, T, H, V].")
      .def("step", &kv_cache_object::step, "q"_a, "k"_a, "v"_a, "out"_a = none,
           "Decode one token per sequence: append k, v, attend. q: [B, H, K]; k: [B, Hkv, K];\n"
           "v: [B, Hkv, V]; out: optional [B, H, V] written and returned. Returns o [B, H, V].")
      .def_property_readonly("lengths", &kv_cache_object::lengths,
                             "Tokens seen per sequence (list of int).")
      .def_property_readonly("capacity", &kv_cache_object::capacity, "Rows per sequence.")
      .def_property_readonly("is_ring", &kv_cache_object::is_ring,
                             "True for a sliding-window ring buffer.")
      .def_property_readonly("nbytes", &kv_cache_object::nbytes, "Bytes of key/value storage.")
      .def_property_readonly("dtype", &kv_cache_object::dtype, "'float32' or 'float64'.")
      .def("reset", &kv_cache_object::reset, "b"_a = none,
           "Forget every sequence's tokens, or those of sequence b.")
      .def("truncate", &kv_cache_object::truncate, "b"_a, "n"_a,
           "Keep the first n tokens of sequence b (full caches).");
}

}  // namespace seqmix::python
