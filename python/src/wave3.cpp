// SPDX-License-Identifier: MIT
// Bindings of the third wave: the sparse attentions and the models tier.
//  - parallel_nsa: native_sparse_attention<T>::forward / forward_selected (mixers/nsa.hpp), in
//    fla.ops.nsa.parallel_nsa's names and argument order;
//  - moba_attn: moba_attention<T>::forward (mixers/moba.hpp), MoBA's packed varlen layout
//    [N, H, D] with cu_seqlens, or the [B, T, H, D] form;
//  - load_model -> Model: models::hybrid_model plus its model_cache (models/model.hpp), with
//    prefill / decode / generate (models/sampling.hpp) and reset / snapshot / restore.
// One TU for all three keeps the rebuild of the other bindings untouched.
#include <cstdint>
#include <memory>
#include <mutex>

#include <seqmix/mixers/moba.hpp>
#include <seqmix/mixers/nsa.hpp>
#include <seqmix/models/model.hpp>
#include <seqmix/models/sampling.hpp>

#include "common.hpp"

namespace seqmix::python {
namespace {

using namespace pybind11::literals;

// --- integer arrays ------------------------------------------------------------------------
/// An int64 C-contiguous copy of an integer array / tensor / sequence `h` (token ids, block
/// indices); a float or bool dtype is a TypeError naming `name`.
py::array_t<std::int64_t> int_array(const char* fn, const char* name, py::handle h) {
  py::object obj = py::reinterpret_borrow<py::object>(h);
  if (is_torch_tensor(h)) {
    if (h.attr("device").attr("type").cast<std::string>() != "cpu") {
      throw py::type_error(std::string(fn) + ": argument '" + name + "': tensor is on device " +
                           py::str(h.attr("device")).cast<std::string>() +
                           "; seqmix runs on the CPU: pass " + name + ".cpu()");
    }
    obj = obj.attr("detach")().attr("numpy")();
  } else if (py::isinstance<py::int_>(h)) {
    py::list l;
    l.append(obj);
    obj = l;
  }
  py::array a = py::array::ensure(obj);
  if (!a) {
    throw py::type_error(std::string(fn) + ": argument '" + name +
                         "': expected an integer array, tensor or sequence of ints, got " +
                         py::str(py::type::handle_of(h).attr("__name__")).cast<std::string>());
  }
  if (a.size() > 0 && a.dtype().kind() != 'i' && a.dtype().kind() != 'u') {
    throw py::type_error(std::string(fn) + ": argument '" + name +
                         "': expected an integer dtype (int64), got " +
                         py::str(a.dtype()).cast<std::string>());
  }
  return py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
}

template <class T>
py::object wrap_int(const call<T>& c, const py::array& a) {
  return c.wrap(a);
}

// --- NSA ------------------------------------------------------------------------------------
template <class T>
py::object nsa_call(py::object q, py::object k, py::object v, py::object g_cmp, py::object g_slc,
                    py::object g_swa, py::object block_indices, index_t block_counts,
                    index_t block_size, index_t window_size, py::object scale,
                    py::object cu_seqlens, bool return_block_indices, bool return_extras) {
  constexpr const char* fn = "seqmix.parallel_nsa";
  call<T> c(fn, is_torch_tensor(q));
  const auto qv = c.template view<4>("q", q, "[B, T, HQ, K]");
  const auto kv = c.template view<4>("k", k, "[B, T, H, K]");
  const auto vv = c.template view<4>("v", v, "[B, T, H, V]");
  const index_t B = qv.extent(0), T_ = qv.extent(1), HQ = qv.extent(2), K = qv.extent(3);
  c.expect_shape("k", kv, {B, T_, -1, K}, "[B, T, H, K] (B, T, K as q)");
  const index_t H = kv.extent(2);
  c.expect_shape("v", vv, {B, T_, H, -1}, "[B, T, H, V] (B, T, H as k)");
  const index_t V = vv.extent(3);
  typename native_sparse_attention<T>::gates g;
  g.cmp = c.template view<3>("g_cmp", g_cmp, "[B, T, HQ]");
  g.slc = c.template view<3>("g_slc", g_slc, "[B, T, HQ]");
  if (!g_swa.is_none()) {
    if (window_size <= 0) c.fail("g_swa", "given, but window_size is 0 (no sliding-window branch)");
    g.swa = c.template view<3>("g_swa", g_swa, "[B, T, HQ]");
  } else if (window_size > 0) {
    c.fail("g_swa", "required when window_size > 0 (the sliding-window branch's gate)");
  }
  const std::vector<index_t> cu = c.offsets("cu_seqlens", cu_seqlens);
  if (!cu.empty() && B != 1) {
    c.fail("cu_seqlens",
           "packed variable-length input needs batch size B == 1, got B = " + std::to_string(B));
  }
  if (block_size < 1) c.fail("block_size", "must be >= 1, got " + std::to_string(block_size));

  typename native_sparse_attention<T>::options opt;
  opt.block_size = block_size;
  opt.block_count = block_counts;
  opt.window = window_size;
  opt.scale = opt_scale<T>(scale);
  const native_sparse_attention<T> mixer(opt);

  const auto out = c.template output<4>({B, T_, HQ, V});
  const py::array& o = out.first;
  const auto ov = out.second;
  typename native_sparse_attention<T>::extras x;
  py::dict extras;
  py::array bi = null_array();
  const bool given = !block_indices.is_none();
  py::array_t<std::int64_t> given_bi;
  tensor_view<const index_t, 4> given_view;
  if (given) {
    given_bi = int_array(fn, "block_indices", block_indices);
    if (given_bi.ndim() != 4 || given_bi.shape(0) != B || given_bi.shape(1) != T_ ||
        given_bi.shape(2) != H || given_bi.shape(3) < 1) {
      c.fail("block_indices", "expected shape [B, T, H, S] = (" + std::to_string(B) + ", " +
                                  std::to_string(T_) + ", " + std::to_string(H) + ", *), got " +
                                  shape_str(given_bi.shape(), given_bi.ndim()));
    }
    given_view = tensor_view<const index_t, 4>(
        reinterpret_cast<const index_t*>(given_bi.data()),
        shape_t<4>{B, T_, H, static_cast<index_t>(given_bi.shape(3))});
  } else if (return_block_indices || return_extras) {
    const index_t S = block_counts;
    if (S < 1) c.fail("block_counts", "must be >= 1, got " + std::to_string(S));
    py::array_t<std::int64_t> a(std::vector<py::ssize_t>{B, T_, H, S});
    x.block_indices = tensor_view<index_t, 4>(reinterpret_cast<index_t*>(a.mutable_data()),
                                              shape_t<4>{B, T_, H, S});
    bi = a;
  }
  if (return_extras) {
    index_t nblk = 0;  // rows of k_cmp / v_cmp
    if (cu.empty()) {
      nblk = T_ / block_size;
    } else {
      for (std::size_t n = 0; n + 1 < cu.size(); ++n)
        nblk += std::max<index_t>(cu[n + 1] - cu[n], 0) / block_size;
    }
    const index_t Bc = cu.empty() ? B : 1;
    auto [oc, ocv] = c.template output<4>({B, T_, HQ, V});
    auto [os, osv] = c.template output<4>({B, T_, HQ, V});
    auto [lse, lsev] = c.template output<3>({B, T_, HQ});
    auto [kc, kcv] = c.template output<4>({Bc, nblk, H, K});
    auto [vc, vcv] = c.template output<4>({Bc, nblk, H, V});
    x.o_cmp = ocv;
    x.o_slc = osv;
    x.lse_cmp = lsev;
    if (nblk > 0) {
      x.k_cmp = kcv;
      x.v_cmp = vcv;
    }
    extras["o_cmp"] = c.wrap(oc);
    extras["o_slc"] = c.wrap(os);
    extras["lse_cmp"] = c.wrap(lse);
    extras["k_cmp"] = c.wrap(kc);
    extras["v_cmp"] = c.wrap(vc);
    if (window_size > 0) {
      auto [ow, owv] = c.template output<4>({B, T_, HQ, V});
      x.o_swa = owv;
      extras["o_swa"] = c.wrap(ow);
    }
  }
  const std::span<const index_t> cus(cu);
  nogil([&] {
    if (given) {
      if (cu.empty())
        mixer.forward_selected(qv, kv, vv, g, given_view, ov, x);
      else
        mixer.forward_selected(qv, kv, vv, g, given_view, ov, cus, x);
    } else {
      if (cu.empty())
        mixer.forward(qv, kv, vv, g, ov, x);
      else
        mixer.forward(qv, kv, vv, g, ov, cus, x);
    }
  });
  py::object bio = given ? py::reinterpret_borrow<py::object>(block_indices)
                         : (bi ? wrap_int(c, bi) : py::object(py::none()));
  if (return_extras) {
    extras["block_indices"] = bio;
    return py::make_tuple(c.wrap(o), extras);
  }
  if (return_block_indices) return py::make_tuple(c.wrap(o), bio);
  return c.wrap(o);
}

// --- MoBA -----------------------------------------------------------------------------------
template <class T>
py::object moba_call(py::object q, py::object k, py::object v, py::object cu_seqlens,
                     index_t chunk_size, index_t top_k, py::object scale) {
  constexpr const char* fn = "seqmix.moba_attn";
  call<T> c(fn, is_torch_tensor(q));
  typename moba_attention<T>::options opt;
  opt.chunk_size = chunk_size;
  opt.top_k = top_k;
  opt.scale = opt_scale<T>(scale);
  const moba_attention<T> mixer(opt);
  const std::vector<index_t> cu = c.offsets("cu_seqlens", cu_seqlens);
  const int nd = q.attr("ndim").cast<int>();
  if (nd == 3) {
    if (cu.empty()) {
      c.fail("cu_seqlens",
             "required with the packed layout q [N, HQ, K] (MoBA's varlen API); pass "
             "[0, N] for one sequence, or q as [B, T, HQ, K]");
    }
    const auto qv = c.template view<3>("q", q, "[N, HQ, K]");
    const auto kv = c.template view<3>("k", k, "[N, H, K]");
    const auto vv = c.template view<3>("v", v, "[N, H, V]");
    const auto out = c.template output<3>({qv.extent(0), qv.extent(1), vv.extent(2)});
    const py::array& o = out.first;
    const auto ov = out.second;
    const std::span<const index_t> cus(cu);
    nogil([&] { mixer.forward(qv, kv, vv, ov, cus); });
    return c.wrap(o);
  }
  const auto qv = c.template view<4>("q", q, "[B, T, HQ, K] or [N, HQ, K]");
  const auto kv = c.template view<4>("k", k, "[B, T, H, K]");
  const auto vv = c.template view<4>("v", v, "[B, T, H, V]");
  const index_t B = qv.extent(0);
  const auto out = c.template output<4>({B, qv.extent(1), qv.extent(2), vv.extent(3)});
  const py::array& o = out.first;
  const auto ov = out.second;
  if (cu.empty()) {
    nogil([&] { mixer.forward(qv, kv, vv, ov); });
  } else {
    if (B != 1) {
      c.fail("cu_seqlens",
             "packed variable-length input needs batch size B == 1, got B = " + std::to_string(B));
    }
    c.expect_shape("k", kv, {1, qv.extent(1), -1, -1}, "[1, T, H, K]");
    c.expect_shape("v", vv, {1, qv.extent(1), -1, -1}, "[1, T, H, V]");
    const std::span<const index_t> cus(cu);
    nogil([&] {
      mixer.forward(qv.template select<0>(0), kv.template select<0>(0), vv.template select<0>(0),
                    ov.template select<0>(0), cus);
    });
  }
  return c.wrap(o);
}

// --- models ---------------------------------------------------------------------------------
struct model_snapshot {
  models::model_cache cache;
};

/// A loaded model and the decode cache of the sequences it is working on. Calls on one Model
/// from several Python threads are serialised (the C++ model is not shareable), with the GIL
/// released while they wait and run.
class py_model {
 public:
  py_model(const std::string& dir, index_t capacity)
      : m_(models::hybrid_model::load(dir)), capacity_(capacity) {
    if (capacity < 1) {
      throw shape_error("seqmix.load_model: argument 'capacity': must be >= 1, got " +
                        std::to_string(capacity));
    }
    cache_ = m_.make_cache(1, capacity_);
  }

  py::object prefill(py::handle ids, py::handle cu_seqlens, const std::string& logits) {
    constexpr const char* fn = "seqmix.Model.prefill";
    models::logits_mode mode = models::logits_mode::all;
    if (logits == "last") {
      mode = models::logits_mode::last;
    } else if (logits != "all") {
      throw shape_error(std::string(fn) + ": argument 'logits': expected 'all' or 'last', got '" +
                        logits + "'");
    }
    const auto a = ids_of(fn, ids);
    std::vector<index_t> cu;
    if (!cu_seqlens.is_none()) {
      const call<float> c(fn, false);
      cu = c.offsets("cu_seqlens", cu_seqlens);
    }
    const index_t N = cu.empty() ? 1 : static_cast<index_t>(cu.size()) - 1;
    const std::span<const std::int64_t> s(a.data(), static_cast<std::size_t>(a.size()));
    tensor<float, 2> out;
    {
      py::gil_scoped_release release;
      const std::lock_guard<std::mutex> lock(*mu_);
      fit_cache(fn, "cu_seqlens", N);
      out = m_.prefill(s, cu, cache_, mode);
    }
    return to_array(out, is_torch_tensor(ids));
  }

  py::object decode(py::handle ids) {
    constexpr const char* fn = "seqmix.Model.decode";
    const auto a = ids_of(fn, ids);
    const auto B = static_cast<index_t>(a.size());
    py::array_t<float> out(std::vector<py::ssize_t>{B, m_.vocab()});
    float* p = out.mutable_data();
    const std::span<const std::int64_t> s(a.data(), static_cast<std::size_t>(a.size()));
    {
      py::gil_scoped_release release;
      const std::lock_guard<std::mutex> lock(*mu_);
      if (B >= 1) fit_cache(fn, "ids", B);
      m_.decode_into(s, cache_, tensor_view<float, 2>(p, shape_t<2>{B, m_.vocab()}));
    }
    if (is_torch_tensor(ids)) return torch_state().from_numpy(out);
    return out;
  }

  py::object generate(py::handle prompt_ids, index_t max_new_tokens, float temperature, float top_p,
                      std::uint64_t seed, py::object eos_token_id) {
    constexpr const char* fn = "seqmix.Model.generate";
    const auto a = ids_of(fn, prompt_ids, "prompt_ids");
    if (max_new_tokens < 0) {
      throw shape_error(std::string(fn) + ": argument 'max_new_tokens': must be >= 0, got " +
                        std::to_string(max_new_tokens));
    }
    const std::optional<std::int64_t> eos =
        eos_token_id.is_none() ? std::nullopt
                               : std::optional<std::int64_t>(eos_token_id.cast<std::int64_t>());
    models::sampler smp(models::sampling_options{temperature, top_p, seed});  // checks options
    std::vector<std::int64_t> gen;
    gen.reserve(static_cast<std::size_t>(max_new_tokens));
    const std::span<const std::int64_t> s(a.data(), static_cast<std::size_t>(a.size()));
    {
      py::gil_scoped_release release;
      const std::lock_guard<std::mutex> lock(*mu_);
      cache_ = m_.make_cache(1, capacity_);
      if (max_new_tokens > 0) {
        tensor<float, 2> lg = m_.prefill(s, {}, cache_, models::logits_mode::last);
        std::int64_t id = 0;
        for (index_t i = 0;; ++i) {
          const std::span<const float> row(lg.data(), static_cast<std::size_t>(m_.vocab()));
          id = smp.sample(row);
          gen.push_back(id);
          if (i + 1 == max_new_tokens || (eos && id == *eos)) break;
          const std::int64_t one[1] = {id};
          m_.decode_into(one, cache_, lg.view());
        }
      }
    }
    py::array_t<std::int64_t> out(static_cast<py::ssize_t>(gen.size()));
    std::copy(gen.begin(), gen.end(), out.mutable_data());
    if (is_torch_tensor(prompt_ids)) return torch_state().from_numpy(out);
    return out;
  }

  void reset() {
    py::gil_scoped_release release;
    const std::lock_guard<std::mutex> lock(*mu_);
    cache_.reset();
  }
  model_snapshot snapshot() {
    py::gil_scoped_release release;
    const std::lock_guard<std::mutex> lock(*mu_);
    return model_snapshot{cache_.snapshot()};
  }
  void restore(const model_snapshot& s) {
    py::gil_scoped_release release;
    const std::lock_guard<std::mutex> lock(*mu_);
    if (s.cache.batch() != cache_.batch() && empty())
      cache_ = m_.make_cache(s.cache.batch(), capacity_);
    if (s.cache.capacity() != cache_.capacity()) {
      throw shape_error("seqmix.Model.restore: argument 'snapshot': taken with capacity " +
                        std::to_string(s.cache.capacity()) + ", this model's is " +
                        std::to_string(cache_.capacity()));
    }
    cache_.restore(s.cache);
  }

  const models::hybrid_model& model() const { return m_; }
  index_t capacity() const { return capacity_; }
  py::list lengths() const {
    py::list l;
    for (index_t b = 0; b < cache_.batch(); ++b) l.append(cache_.length(b));
    return l;
  }

 private:
  static py::array_t<std::int64_t> ids_of(const char* fn, py::handle ids,
                                          const char* name = "ids") {
    auto a = int_array(fn, name, ids);
    if (a.ndim() != 1) {
      throw shape_error(std::string(fn) + ": argument '" + name + "': expected shape [T], got " +
                        shape_str(a.shape(), a.ndim()));
    }
    return a;
  }
  bool empty() const {
    for (index_t b = 0; b < cache_.batch(); ++b)
      if (cache_.length(b) != 0) return false;
    return true;
  }
  /// A cache of `rows` sequences: the current one, or a new one when the current is empty.
  void fit_cache(const char* fn, const char* arg, index_t rows) {
    if (cache_.batch() == rows) return;
    if (!empty()) {
      throw shape_error(std::string(fn) + ": argument '" + arg + "': gives " +
                        std::to_string(rows) + " sequences, but the model's cache holds " +
                        std::to_string(cache_.batch()) +
                        " sequences in progress; call reset() to start new ones");
    }
    cache_ = m_.make_cache(rows, capacity_);
  }
  static py::object to_array(const tensor<float, 2>& t, bool torch) {
    py::array_t<float> a(std::vector<py::ssize_t>{t.extent(0), t.extent(1)});
    std::copy_n(t.data(), t.size(), a.mutable_data());
    if (torch) return torch_state().from_numpy(a);
    return a;
  }

  models::hybrid_model m_;
  models::model_cache cache_;
  index_t capacity_ = 0;
  std::unique_ptr<std::mutex> mu_ = std::make_unique<std::mutex>();
};

}  // namespace

void bind_wave3(py::module_& m) {
  const auto none = py::none();
  // seqmix::io_error (a file that is missing, unreadable or malformed) is an OSError in Python
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const io_error& e) {
      PyErr_SetString(PyExc_OSError, e.what());
    }
  });
  m.def(
      "parallel_nsa",
      [](py::object q, py::object k, py::object v, py::object g_cmp, py::object g_slc,
         py::object g_swa, py::object block_indices, index_t block_counts, index_t block_size,
         index_t window_size, py::object scale, py::object cu_seqlens, bool return_block_indices,
         bool return_extras) {
        return dispatch("seqmix.parallel_nsa", "q", q, [&]<class T>() {
          return nsa_call<T>(q, k, v, g_cmp, g_slc, g_swa, block_indices, block_counts, block_size,
                             window_size, scale, cu_seqlens, return_block_indices, return_extras);
        });
      },
      "q"_a, "k"_a, "v"_a, "g_cmp"_a, "g_slc"_a, "g_swa"_a = none, "block_indices"_a = none,
      "block_counts"_a = 16, "block_size"_a = 64, "window_size"_a = 0, "scale"_a = none,
      "cu_seqlens"_a = none, "return_block_indices"_a = false, "return_extras"_a = false,
      R"(Native sparse attention (NSA), fla.ops.nsa.parallel_nsa's names and argument order.

    o = g_cmp * o_cmp + g_slc * o_slc (+ g_swa * o_swa)
    o_cmp: softmax over the mean keys/values of the complete blocks ending at or before t;
    o_slc: causal softmax over the keys of the S = block_counts blocks selected per
           (token, kv head) by the compressed probabilities averaged over the query group
           (blocks 0, t // block_size and the previous one forced; ties: lower index);
    o_swa: sliding-window attention over the last window_size keys (window_size > 0).

    q: [B, T, HQ, K]; k: [B, T, H, K]; v: [B, T, H, V] (HQ a multiple of H);
    g_cmp, g_slc, g_swa: [B, T, HQ] gates (g_swa only, and required, with window_size > 0);
    block_indices: int64 [B, T, H, S'] given selection (-1: empty slot); None: computed;
    block_counts: S, an int; block_size: compression and selection block;
    scale: default K**-0.5; cu_seqlens: int64 [N+1] packed sequences (B == 1).
    return_block_indices: also return the selection, int64 [B, T, H, S] (ascending, -1 pad);
    return_extras: return (o, dict) with o_cmp, o_slc, (o_swa), lse_cmp [B, T, HQ],
    k_cmp, v_cmp [B, T // block_size, H, *] (packed: [1, sum of len_n // block_size, H, *])
    and block_indices.

Returns o [B, T, HQ, V] (a torch tensor when q is one), or a tuple as above.

Differences from fla: block_counts is an int (fla also takes a per-token tensor); the selected
set is exact top-S (fla's Triton top-k rounds S up to a power of two); the selection within a
row is ascending (fla: topk order; compare as sets); fla's g_swa is positional and ignored when
window_size is 0, here it defaults to None and is an error without a window; float32 and
float64, no head_first. The GIL is released while the kernel runs.)");

  m.def(
      "moba_attn",
      [](py::object q, py::object k, py::object v, py::object cu_seqlens, index_t chunk_size,
         index_t top_k, py::object scale) {
        return dispatch("seqmix.moba_attn", "q", q, [&]<class T>() {
          return moba_call<T>(q, k, v, cu_seqlens, chunk_size, top_k, scale);
        });
      },
      "q"_a, "k"_a, "v"_a, "cu_seqlens"_a = none, "chunk_size"_a = 64, "top_k"_a = 8,
      "scale"_a = none,
      R"(MoBA, mixture of block attention (MoBA's moba_attn_varlen semantics, causal).

    Per sequence, chunks of chunk_size tokens; gate s_c = q_t . mean key of chunk c (no scale);
    token t attends its own chunk (keys j <= t) and the top_k - 1 strictly earlier chunks by
    gate (all of them if fewer; ties: lower chunk); softmax with scale (default K**-0.5).

    Packed (MoBA's layout): q [N, HQ, K], k [N, H, K], v [N, H, V], cu_seqlens int64 [n+1]
    (required) -> o [N, HQ, V]. Batched: q [B, T, HQ, K], k [B, T, H, K], v [B, T, H, V] ->
    o [B, T, HQ, V] (cu_seqlens: packed sequences along T, then B == 1). Query head h reads
    kv head h // (HQ // H) (MoBA's repeat_interleave).

Differences from MoBA: no max_seqlen argument (taken from cu_seqlens); moba_chunk_size /
moba_topk are named chunk_size / top_k; float32 and float64. The GIL is released while the
kernel runs.)");

  py::class_<model_snapshot>(m, "ModelSnapshot",
                             "A deep copy of a Model's cache (Model.snapshot / Model.restore).");
  py::class_<py_model>(m, "Model",
                       "A hybrid Linear-MoE decoder from a Hugging Face checkpoint folder "
                       "(seqmix.load_model) plus the decode cache of its sequences.")
      .def("prefill", &py_model::prefill, "ids"_a, "cu_seqlens"_a = none, "logits"_a = "all",
           R"(Runs the prompt tokens through the model, appending them to the cache.

    ids: int64 [T] token ids; cu_seqlens: int64 [N+1] packed sequences (None: one).
    Each sequence n continues row n of the cache (a fresh cache takes N rows; a cache with
    tokens must hold N sequences, else reset() first).
    logits: 'all' -> float32 [T, vocab]; 'last' -> [N, vocab] (each sequence's last token).)")
      .def("decode", &py_model::decode, "ids"_a,
           "One token per sequence: ids int64 [B] (B = the cache's sequences) -> float32 logits\n"
           "[B, vocab]; the tokens are appended to the cache.")
      .def("generate", &py_model::generate, "prompt_ids"_a, "max_new_tokens"_a,
           "temperature"_a = 0.0f, "top_p"_a = 1.0f, "seed"_a = 0, "eos_token_id"_a = none,
           R"(Starts a new sequence (the cache is reset), prefills prompt_ids (int64 [T]) and
samples max_new_tokens tokens: greedy for temperature <= 0 (lowest id on ties), else
softmax(logits / temperature) restricted to the top_p nucleus, drawn from a mt19937_64
seeded with seed (the same tokens on every platform). Stops early after eos_token_id.
Returns the new tokens only, int64 [n]; the cache then holds the prompt and all new tokens
but the last.)")
      .def("reset", &py_model::reset, "Empties the cache (every sequence back to 0 tokens).")
      .def("snapshot", &py_model::snapshot, "A deep copy of the cache (a ModelSnapshot).")
      .def("restore", &py_model::restore, "snapshot"_a,
           "Restores a snapshot taken from this model (its states and KV rows).")
      .def_property_readonly("vocab", [](const py_model& p) { return p.model().vocab(); })
      .def_property_readonly("hidden", [](const py_model& p) { return p.model().hidden(); })
      .def_property_readonly("capacity", &py_model::capacity,
                             "Tokens of KV per sequence of the attention layers.")
      .def_property_readonly("lengths", &py_model::lengths, "Tokens cached per sequence.")
      .def_property_readonly(
          "unused_tensors",
          [](const py_model& p) {
            py::list l;
            for (const auto& n : p.model().unused_tensors()) l.append(n);
            return l;
          },
          "Checkpoint tensors not loaded (e.g. Qwen3-Next's mtp.*).");
  m.def(
      "load_model",
      [](const std::string& dir, index_t capacity) {
        py::gil_scoped_release release;
        return std::make_unique<py_model>(dir, capacity);
      },
      "dir"_a, "capacity"_a = 4096,
      "Loads a checkpoint folder (config.json + model.safetensors, Hub format; qwen3_next or\n"
      "granitemoehybrid) as a Model whose cache holds `capacity` tokens of KV per sequence.\n"
      "A missing or malformed folder raises OSError naming the file.");
}

}  // namespace seqmix::python
