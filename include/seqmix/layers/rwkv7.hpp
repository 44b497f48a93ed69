// SPDX-License-Identifier: MIT
// RWKV-7 time-mix layer (fla's RWKV7Attention, fla/layers/rwkv7.py), on the rwkv7 mixer
// (mixers/rwkv7.hpp, docs/math.md §3).
//
//   x'_t    = x_{t-1} (token shift: the previous token of the sequence; the cache's for t = 0)
//   x_c     = x + (x' - x) ⊙ μ_c               c ∈ {r, w, k, v, a, g}: x_r ... x_g [1, 1, D]
//   r, k, v = r_proj(x_r), k_proj(x_k), v_proj(x_v)          H heads of hd (r, k), dv (v)
//   w       = -e^(-1/2) · sigmoid(w_lora(x_w))  w_lora: B_w tanh(A_w x) + b_w; log decay in
//                                               (-0.61, 0)
//   v       = lerp(v, v_first, sigmoid(v_lora(x_v)))   v_lora: B_v A_v x + b_v (not layer 0;
//                                               layer 0 sets v_first = v)
//   a       = sigmoid(a_lora(x_a))              a_lora: B_a A_a x + b_a        (in-context lr)
//   g       = g_lora(x_g)                       g_lora: B_g sigmoid(A_g x)     (no bias)
//   kk      = l2norm(k ⊙ k_k) per head          x / max(‖x‖, 1e-12) (F.normalize); fuse_norm:
//                                               x / sqrt(Σx² + 1e-6) (fla's l2_norm)
//   k       = k ⊙ (1 + (a - 1) ⊙ k_a)
//   o       = RWKV7(r, w, k, v, -kk, kk ⊙ a)    S = Diag(e^w) S + (kk⊙a)(-kkᵀ S) + k vᵀ,
//                                               o = Sᵀ r (scale 1)
//   o       = GroupNorm_H(o) (per head over dv, eps = hd · norm_eps, weight and bias)
//   y       = o_proj( (o + (Σ_head r ⊙ k ⊙ r_k) · v) ⊙ g )
//
// Weights (fla's names under the prefix; f32 or bf16 matrices, vectors widened to f32): x_r,
// x_w, x_k, x_v, x_a, x_g [1, 1, D]; k_k, k_a [D]; r_k [H, hd]; r_proj.weight, k_proj.weight
// [D, D]; v_proj.weight [Dv, D]; o_proj.weight [D, Dv]; w_lora.lora.{0.weight [rw, D], 2.weight
// [D, rw], 2.bias [D]}; a_lora.lora.{0.weight [ra, D], 2.weight [D, ra], 2.bias [D]};
// v_lora.lora.{0.weight [rv, D], 2.weight [Dv, rv], 2.bias [Dv]} (layer_idx != 0 only);
// g_lora.lora.{0.weight [rg, D], 2.weight [Dv, rg]}; g_norm.{weight, bias} [Dv]
// (elementwise_affine). The low-rank sizes default as fla's (32-multiples of c·sqrt(D)).
// v_proj and v_lora.lora.0 read the same x_v and are fused at load time into one GEMM; the
// other projections each read their own mix, so they stay separate GEMMs.
//
// v_first (value residual): fla's layer returns v_first; here the overloads with a v_first
// argument take it as a [B, T, Dv] view (decode: [B, Dv], row i for token i): layer 0 writes its
// v there, every later layer reads it (the caller passes layer 0's output to the rest of the
// stack). The overloads without it work for layer 0 only (v_first is not kept); a later layer
// called without it is an error naming v_first.
//
// Forms: forward(x [B, T, D]) prefill — the mixer's chosen form (rwkv7::forward) or the one
// config.prefill asks for, chunk `chunk_size`, continuing from the cache; packed
// variable-length forward with cu_seqlens; step(x [B, D]) decode — recurrent, allocation-free
// once the layer has run a step of that batch size; step with cache rows (continuous
// batching). The cache (layers/recurrent_cache.hpp): conv [B, 1, D] holds the token-shift
// state (the last x of each sequence: fla's conv_state [B, D]), state [B, H, hd, dv] the
// mixer's state (fla's recurrent_state is [B, H, hd, dv] too: key-major).
//
// Supported fla options: hidden_size, head_dim / num_heads, value_dim, the four low-rank dims,
// elementwise_affine, norm_eps, fuse_norm (the kk norm's epsilon; the GroupNorm math is the
// same), layer_idx (0 or not); mode changes no math. Not supported: attention_mask (left
// padding: pack with cu_seqlens instead).
//
// Cost per token: 2·D·(2D + Dv + rw + ra + rg + rv) + 2·(rw + ra)·D + 2·(rg + rv)·Dv + 2·Dv·D
// FLOP in projections, the mixer's (9·hd·dv per head recurrent), O(D + Dv) element-wise work
// (6 mixes, sigmoids, tanh over rw). Scratch grow-only; the layer object is not shareable
// between threads calling it at once. Checks: x, y, v_first shapes and the cache's geometry
// (seqmix::shape_error naming the function and argument); weights: name, shape, dtype
// (seqmix::io_error); config: seqmix::shape_error naming the field.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <span>
#include <string>
#include <vector>

#include <seqmix/core/error.hpp>
#include <seqmix/core/io/checkpoint.hpp>
#include <seqmix/core/matmul.hpp>
#include <seqmix/core/simd.hpp>
#include <seqmix/core/tensor.hpp>
#include <seqmix/layers/recurrent_cache.hpp>
#include <seqmix/layers/recurrent_layer.hpp>
#include <seqmix/layers/weights.hpp>
#include <seqmix/mixers/rwkv7.hpp>

namespace seqmix::layers {

/// Which form the prefill runs.
enum class prefill_form { automatic, chunked, recurrent };

struct rwkv7_layer_config {
  index_t hidden = 0;              ///< D (hidden_size) = key_dim
  index_t head_dim = 64;           ///< hd; 0: D / heads (fla: head_dim wins when given)
  index_t heads = 0;               ///< H (num_heads), used when head_dim is 0
  index_t value_dim = 0;           ///< Dv; 0: D
  index_t layer_idx = 0;           ///< 0: the first layer (sets v_first, no v_lora)
  index_t decay_low_rank_dim = 0;  ///< rw; 0: fla's default
  index_t gate_low_rank_dim = 0;   ///< rg; 0: fla's default
  index_t a_low_rank_dim = 0;      ///< ra; 0: fla's default
  index_t v_low_rank_dim = 0;      ///< rv; 0: fla's default
  bool elementwise_affine = true;  ///< g_norm has weight and bias
  float norm_eps = 1e-5f;          ///< GroupNorm eps = head_dim · norm_eps
  bool fuse_norm = false;          ///< kk: fla's l2_norm (eps 1e-6) instead of F.normalize
  index_t chunk_size = 64;         ///< chunk of the mixer's chunked form
  prefill_form prefill = prefill_form::automatic;
};

class rwkv7_layer : public recurrent_layer<rwkv7_layer> {
  using base = recurrent_layer<rwkv7_layer>;

 public:
  using config_type = rwkv7_layer_config;
  using cache_type = recurrent_cache;
  static constexpr layer_names names{"rwkv7_layer::make_cache", "rwkv7_layer::forward",
                                     "rwkv7_layer::step"};
  /// exp(-1/2), fla's bound of the log decay
  static constexpr float decay_bound = 0.6065306597126334f;

  rwkv7_layer() = default;

  static rwkv7_layer load(const checkpoint& ck, const std::string& prefix, const config_type& cfg) {
    return load(ck.scope(prefix), cfg);
  }
  static rwkv7_layer load(const checkpoint_scope& scope, const config_type& cfg) {
    constexpr std::string_view who = "rwkv7_layer::load";
    const checker check{who};
    rwkv7_layer l;
    l.cfg_ = cfg;
    l.geometry(check);
    const index_t D = cfg.hidden, Dv = l.Dv_, H = l.H_, hd = l.hd_;
    for (std::size_t c = 0; c < 6; ++c) {
      const auto v = load_vector(who, scope, mix_names()[c], {1, 1, D});
      l.mu_[c] = tensor<float, 1>({D});
      std::copy(v.begin(), v.end(), l.mu_[c].data());
    }
    l.k_k_ = load_vector_tensor(who, scope, "k_k", D);
    l.k_a_ = load_vector_tensor(who, scope, "k_a", D);
    {
      const auto v = load_vector(who, scope, "r_k", {H, hd});
      l.r_k_ = tensor<float, 1>({D});
      std::copy(v.begin(), v.end(), l.r_k_.data());
    }
    l.r_proj_ = weight_matrix::load(who, scope, {"r_proj.weight"}, {D}, D);
    l.k_proj_ = weight_matrix::load(who, scope, {"k_proj.weight"}, {D}, D);
    if (l.first()) {
      l.v_in_ = weight_matrix::load(who, scope, {"v_proj.weight"}, {Dv}, D);
    } else {
      l.v_in_ = weight_matrix::load(who, scope, {"v_proj.weight", "v_lora.lora.0.weight"},
                                    {Dv, l.rv_}, D);
      l.v_b_ = weight_matrix::load(who, scope, {"v_lora.lora.2.weight"}, {Dv}, l.rv_);
      l.v_bias_ = load_vector_tensor(who, scope, "v_lora.lora.2.bias", Dv);
    }
    l.w_a_ = weight_matrix::load(who, scope, {"w_lora.lora.0.weight"}, {l.rw_}, D);
    l.w_b_ = weight_matrix::load(who, scope, {"w_lora.lora.2.weight"}, {D}, l.rw_);
    l.w_bias_ = load_vector_tensor(who, scope, "w_lora.lora.2.bias", D);
    l.a_a_ = weight_matrix::load(who, scope, {"a_lora.lora.0.weight"}, {l.ra_}, D);
    l.a_b_ = weight_matrix::load(who, scope, {"a_lora.lora.2.weight"}, {D}, l.ra_);
    l.a_bias_ = load_vector_tensor(who, scope, "a_lora.lora.2.bias", D);
    l.g_a_ = weight_matrix::load(who, scope, {"g_lora.lora.0.weight"}, {l.rg_}, D);
    l.g_b_ = weight_matrix::load(who, scope, {"g_lora.lora.2.weight"}, {Dv}, l.rg_);
    if (cfg.elementwise_affine) {
      l.gn_w_ = load_vector_tensor(who, scope, "g_norm.weight", Dv);
      l.gn_b_ = load_vector_tensor(who, scope, "g_norm.bias", Dv);
    } else {
      l.gn_w_ = tensor<float, 1>({Dv});
      l.gn_w_.fill(1.0f);
      l.gn_b_ = tensor<float, 1>({Dv});
    }
    l.out_ = weight_matrix::load(who, scope, {"o_proj.weight"}, {D}, Dv);
    typename rwkv7<float>::options opt;
    opt.chunk_size = cfg.chunk_size;
    l.mixer_ = rwkv7<float>(opt);
    return l;
  }

  /// Every tensor the layer reads for `cfg` (names under its prefix).
  static std::vector<std::string> tensor_names(const config_type& cfg) {
    std::vector<std::string> n;
    for (const char* m : mix_names()) n.emplace_back(m);
    for (const char* s : {"k_k", "k_a", "r_k", "r_proj.weight", "k_proj.weight", "v_proj.weight",
                          "o_proj.weight", "w_lora.lora.0.weight", "w_lora.lora.2.weight",
                          "w_lora.lora.2.bias", "a_lora.lora.0.weight", "a_lora.lora.2.weight",
                          "a_lora.lora.2.bias", "g_lora.lora.0.weight", "g_lora.lora.2.weight"})
      n.emplace_back(s);
    if (cfg.layer_idx != 0)
      for (const char* s : {"v_lora.lora.0.weight", "v_lora.lora.2.weight", "v_lora.lora.2.bias"})
        n.emplace_back(s);
    if (cfg.elementwise_affine)
      for (const char* s : {"g_norm.weight", "g_norm.bias"}) n.emplace_back(s);
    return n;
  }
  /// fla's default low-rank size: max(32, round(c · sqrt(D) · factor / 32) · 32), Python's
  /// round (half to even).
  static index_t default_low_rank(double c, index_t D, double factor) {
    const double x = c * std::sqrt(static_cast<double>(D)) * factor / 32.0;
    return std::max<index_t>(32, static_cast<index_t>(std::nearbyint(x)) * 32);
  }

  const config_type& config() const noexcept { return cfg_; }
  /// Bytes of weights (what a decode step streams).
  std::size_t weight_bytes() const noexcept {
    return r_proj_.bytes() + k_proj_.bytes() + v_in_.bytes() + v_b_.bytes() + w_a_.bytes() +
           w_b_.bytes() + a_a_.bytes() + a_b_.bytes() + g_a_.bytes() + g_b_.bytes() + out_.bytes();
  }
  index_t heads() const noexcept { return H_; }
  index_t head_dim() const noexcept { return hd_; }
  index_t value_dim() const noexcept { return Dv_; }
  /// The low-rank sizes {rw, ra, rv, rg} (rv 0 for layer 0).
  std::array<index_t, 4> low_ranks() const noexcept { return {rw_, ra_, rv_, rg_}; }

  index_t hidden_size() const noexcept { return cfg_.hidden; }
  index_t conv_rows() const noexcept { return 1; }
  index_t conv_channels() const noexcept { return cfg_.hidden; }
  shape_t<3> state_dims() const noexcept { return {H_, hd_, Dv_ / H_}; }

  using base::forward;
  using base::step;
  /// Prefill with the value residual: v_first [B, T, Dv], written by layer 0, read by the rest.
  void forward(tensor_view<const float, 3> x, tensor_view<float, 3> y, cache_type& cache,
               tensor_view<float, 3> v_first) {
    const vfirst_scope s(*this, check_vfirst3(names.forward, x, y, v_first));
    base::forward(x, y, cache);
  }
  /// Packed prefill with the value residual: v_first [1, T, Dv].
  void forward(tensor_view<const float, 3> x, tensor_view<float, 3> y, cache_type& cache,
               std::span<const index_t> cu_seqlens, tensor_view<float, 3> v_first) {
    const vfirst_scope s(*this, check_vfirst3(names.forward, x, y, v_first));
    base::forward(x, y, cache, cu_seqlens);
  }
  /// Decode with the value residual: v_first [B, Dv] (row i for token i).
  void step(tensor_view<const float, 2> x, tensor_view<float, 2> y, cache_type& cache,
            tensor_view<float, 2> v_first) {
    const vfirst_scope s(*this, check_vfirst2(x, y, v_first));
    base::step(x, y, cache);
  }
  /// Continuous batching with the value residual: v_first [B, Dv] (row i for token i).
  void step(tensor_view<const float, 2> x, tensor_view<float, 2> y, cache_type& cache,
            std::span<const index_t> rows, tensor_view<float, 2> v_first) {
    const vfirst_scope s(*this, check_vfirst2(x, y, v_first));
    base::step(x, y, cache, rows);
  }

 private:
  friend class recurrent_layer<rwkv7_layer>;

  static const std::array<const char*, 6>& mix_names() {
    static const std::array<const char*, 6> n{"x_r", "x_w", "x_k", "x_v", "x_a", "x_g"};
    return n;
  }
  bool first() const noexcept { return cfg_.layer_idx == 0; }

  void geometry(const checker& check) {
    const config_type& c = cfg_;
    detail::check_config_positive(check, {"hidden", "chunk_size"}, {c.hidden, c.chunk_size});
    if (c.head_dim < 0 || c.heads < 0 || c.layer_idx < 0 || c.value_dim < 0)
      check.fail("config", "head_dim, heads, layer_idx and value_dim must be >= 0");
    if (c.head_dim > 0) {
      hd_ = c.head_dim;
      if (c.hidden % hd_ != 0)
        check.fail("config.head_dim", "must divide hidden = " + std::to_string(c.hidden) +
                                          ", got " + std::to_string(hd_));
      H_ = c.hidden / hd_;
    } else {
      if (!(c.heads > 0 && c.hidden % c.heads == 0))
        check.fail("config.heads",
                   "with head_dim 0, heads must divide hidden = " + std::to_string(c.hidden) +
                       ", got " + std::to_string(c.heads));
      H_ = c.heads;
      hd_ = c.hidden / H_;
    }
    Dv_ = c.value_dim ? c.value_dim : c.hidden;
    if (Dv_ % H_ != 0)
      check.fail("config.value_dim", "must be a multiple of the " + std::to_string(H_) +
                                         " heads, got " + std::to_string(Dv_));
    if (!(std::isfinite(c.norm_eps) && c.norm_eps >= 0))
      check.fail("config.norm_eps", "must be finite and >= 0");
    const double factor = static_cast<double>(hd_) / 64.0;
    rw_ = c.decay_low_rank_dim ? c.decay_low_rank_dim : default_low_rank(2.5, c.hidden, factor);
    rg_ = c.gate_low_rank_dim ? c.gate_low_rank_dim : default_low_rank(5.0, c.hidden, 1.0);
    ra_ = c.a_low_rank_dim ? c.a_low_rank_dim : default_low_rank(2.5, c.hidden, factor);
    rv_ = first() ? 0
                  : (c.v_low_rank_dim ? c.v_low_rank_dim : default_low_rank(1.7, c.hidden, factor));
    if (rw_ < 0 || rg_ < 0 || ra_ < 0 || rv_ < 0)
      check.fail("config", "low-rank sizes must be >= 0");
  }

  // v_first for the current call (the public overloads set it for the duration of the call)
  struct vfirst_view {
    tensor_view<float, 3> v3{};
    tensor_view<float, 2> v2{};
  };
  struct vfirst_scope {
    vfirst_scope(rwkv7_layer& l, const vfirst_view& v) : l_(l) { l_.vf_ = v; }
    ~vfirst_scope() { l_.vf_ = {}; }
    vfirst_scope(const vfirst_scope&) = delete;
    vfirst_scope& operator=(const vfirst_scope&) = delete;
    rwkv7_layer& l_;
  };
  vfirst_view check_vfirst3(std::string_view who, const tensor_view<const float, 3>& x,
                            const tensor_view<float, 3>& y, const tensor_view<float, 3>& v) const {
    const checker check{who};
    check.shape("v_first", v, {x.extent(0), x.extent(1), Dv_});
    check.inner_contiguous("v_first", v);
    check.no_overlap({range_of("v_first", v)}, {range_of("x", x), range_of("y", y)});
    return {v, {}};
  }
  vfirst_view check_vfirst2(const tensor_view<const float, 2>& x, const tensor_view<float, 2>& y,
                            const tensor_view<float, 2>& v) const {
    const checker check{names.step};
    check.shape("v_first", v, {x.extent(0), Dv_});
    check.inner_contiguous("v_first", v);
    check.no_overlap({range_of("v_first", v)}, {range_of("x", x), range_of("y", y)});
    return {{}, v};
  }
  // v_first's row for token (b, t) of a prefill / token i of a step; nullptr when none given
  float* vfirst_row(index_t b, index_t t) const {
    if (vf_.v3.data()) return vf_.v3.ptr({b, t, 0});
    if (vf_.v2.data()) return vf_.v2.ptr({b, 0});
    return nullptr;
  }
  void require_vfirst(std::string_view who) const {
    if (!first() && !vf_.v3.data() && !vf_.v2.data())
      checker{who}.fail("v_first", "layer_idx " + std::to_string(cfg_.layer_idx) +
                                       " (not the first layer) needs v_first, the first "
                                       "layer's v: call the overload that takes it");
  }

  struct views {
    tensor_view<float, 2> mix[6];  // x_r, x_w, x_k, x_v, x_a, x_g
    tensor_view<float, 2> r, k, vin, wl, w, al, a, gl, g, vl, kk, an, bn, o, z;
  };
  views make_views(index_t M) {
    const index_t D = cfg_.hidden, Dv = Dv_;
    views w{};
    for (std::size_t c = 0; c < 6; ++c) w.mix[c] = ws_.view<2>(c, {M, D});
    w.r = ws_.view<2>(6, {M, D});
    w.k = ws_.view<2>(7, {M, D});
    w.vin = ws_.view<2>(8, {M, Dv + rv_});
    w.wl = ws_.view<2>(9, {M, rw_});
    w.w = ws_.view<2>(10, {M, D});
    w.al = ws_.view<2>(11, {M, ra_});
    w.a = ws_.view<2>(12, {M, D});
    w.gl = ws_.view<2>(13, {M, rg_});
    w.g = ws_.view<2>(14, {M, Dv});
    if (!first()) w.vl = ws_.view<2>(15, {M, Dv});
    w.kk = ws_.view<2>(16, {M, D});
    w.an = ws_.view<2>(17, {M, D});
    w.bn = ws_.view<2>(18, {M, D});
    w.o = ws_.view<2>(19, {M, Dv});
    w.z = ws_.view<2>(20, {M, Dv});
    return w;
  }

  // token m of the mixes from x row xr and the previous token's row pr
  void mix_row(const views& w, index_t m, const float* xr, const float* pr) const {
    const index_t D = cfg_.hidden;
    for (std::size_t c = 0; c < 6; ++c) {
      const float* mu = mu_[c].data();
      float* out = w.mix[c].ptr({m, 0});
      for (index_t i = 0; i < D; ++i) out[i] = xr[i] + (pr[i] - xr[i]) * mu[i];
    }
  }

  // everything from the mixes to the mixer inputs (on M rows); `vrow(m)` is v_first's row for
  // token m (nullptr: none given, layer 0 only)
  template <class VRow>
  void inputs(const views& w, VRow&& vrow) const {
    const index_t M = w.r.extent(0), D = cfg_.hidden, Dv = Dv_, hd = hd_;
    r_proj_.apply(w.mix[0], w.r);
    k_proj_.apply(w.mix[2], w.k);
    v_in_.apply(w.mix[3], w.vin);
    // decay: w = -e^(-1/2) sigmoid(B_w tanh(A_w x_w) + b_w)
    w_a_.apply(w.mix[1], w.wl);
    for (index_t m = 0; m < M; ++m) {
      float* p = w.wl.ptr({m, 0});
      for (index_t i = 0; i < rw_; ++i) p[i] = std::tanh(p[i]);
    }
    linalg::matmul_options wb;
    wb.bias = w_bias_.view();
    w_b_.apply(w.wl, w.w, wb);
    // in-context rate a = sigmoid(B_a A_a x_a + b_a)
    a_a_.apply(w.mix[4], w.al);
    linalg::matmul_options ab;
    ab.bias = a_bias_.view();
    a_b_.apply(w.al, w.a, ab);
    // output gate g = B_g sigmoid(A_g x_g)
    g_a_.apply(w.mix[5], w.gl);
    for (index_t m = 0; m < M; ++m) simd::sigmoid(w.gl.ptr({m, 0}), w.gl.ptr({m, 0}), rg_);
    g_b_.apply(w.gl, w.g);
    // value residual
    if (!first()) {
      linalg::matmul_options vb;
      vb.bias = v_bias_.view();
      v_b_.apply(w.vin.slice(1, Dv, Dv + rv_), w.vl, vb);
    }
    const float kk_eps = cfg_.fuse_norm ? 1e-6f : 1e-12f;
    for (index_t m = 0; m < M; ++m) {
      float* wr = w.w.ptr({m, 0});
      simd::sigmoid(wr, wr, D);
      for (index_t i = 0; i < D; ++i) wr[i] *= -decay_bound;
      float* ar = w.a.ptr({m, 0});
      simd::sigmoid(ar, ar, D);
      float* v = w.vin.ptr({m, 0});
      float* vf = vrow(m);
      if (first()) {
        if (vf) std::copy_n(v, Dv, vf);
      } else {
        float* s = w.vl.ptr({m, 0});
        simd::sigmoid(s, s, Dv);
        for (index_t j = 0; j < Dv; ++j) v[j] += s[j] * (vf[j] - v[j]);  // torch.lerp
      }
      // kk = l2norm(k ⊙ k_k) per head; then k ⊙ (1 + (a - 1) ⊙ k_a)
      float* kr = w.k.ptr({m, 0});
      float* kk = w.kk.ptr({m, 0});
      float* an = w.an.ptr({m, 0});
      float* bn = w.bn.ptr({m, 0});
      for (index_t h0 = 0; h0 < D; h0 += hd) {
        float ss = 0.0f;
        for (index_t i = h0; i < h0 + hd; ++i) {
          kk[i] = kr[i] * k_k_(i);
          ss += kk[i] * kk[i];
        }
        const float inv =
            cfg_.fuse_norm ? 1.0f / std::sqrt(ss + kk_eps) : 1.0f / std::max(std::sqrt(ss), kk_eps);
        for (index_t i = h0; i < h0 + hd; ++i) {
          kk[i] *= inv;
          an[i] = -kk[i];
          bn[i] = kk[i] * ar[i];
        }
      }
      for (index_t i = 0; i < D; ++i) kr[i] += kr[i] * (ar[i] - 1.0f) * k_a_(i);
    }
  }

  // GroupNorm, the r·k·r_k bonus, the gate (into w.z)
  void outputs(const views& w) const {
    const index_t M = w.o.extent(0), H = H_, hd = hd_, dv = Dv_ / H_;
    const float eps = static_cast<float>(hd) * cfg_.norm_eps;
    for (index_t m = 0; m < M; ++m) {
      const float* o = w.o.ptr({m, 0});
      const float* r = w.r.ptr({m, 0});
      const float* k = w.k.ptr({m, 0});
      const float* v = w.vin.ptr({m, 0});
      const float* g = w.g.ptr({m, 0});
      float* z = w.z.ptr({m, 0});
      for (index_t h = 0; h < H; ++h) {
        const index_t o0 = h * dv, k0 = h * hd;
        float mean = 0.0f;
        for (index_t j = 0; j < dv; ++j) mean += o[o0 + j];
        mean /= static_cast<float>(dv);
        float var = 0.0f;
        for (index_t j = 0; j < dv; ++j) var += (o[o0 + j] - mean) * (o[o0 + j] - mean);
        var /= static_cast<float>(dv);
        const float rs = 1.0f / std::sqrt(var + eps);
        float bonus = 0.0f;
        for (index_t i = 0; i < hd; ++i) bonus += r[k0 + i] * k[k0 + i] * r_k_(k0 + i);
        for (index_t j = 0; j < dv; ++j) {
          const float n = (o[o0 + j] - mean) * rs * gn_w_(o0 + j) + gn_b_(o0 + j);
          z[o0 + j] = (n + bonus * v[o0 + j]) * g[o0 + j];
        }
      }
    }
  }

  void step_rows(const tensor_view<const float, 2>& x, const tensor_view<float, 2>& y,
                 cache_type& cache, std::span<const index_t> rows) {
    require_vfirst(names.step);
    const index_t B = x.extent(0), H = H_, hd = hd_, dv = Dv_ / H_, D = cfg_.hidden;
    const views w = make_views(B);
    for (index_t i = 0; i < B; ++i) {
      const index_t r = rows.empty() ? i : rows[static_cast<std::size_t>(i)];
      float* shift = cache.conv().view().ptr({r, 0, 0});
      mix_row(w, i, x.ptr({i, 0}), shift);
      std::copy_n(x.ptr({i, 0}), D, shift);
    }
    inputs(w, [&](index_t m) { return vfirst_row(m, 0); });
    auto r3 = w.r.split(1, {H, hd});
    auto k3 = w.k.split(1, {H, hd});
    auto v3 = w.vin.slice(1, 0, Dv_).split(1, {H, dv});
    auto w3 = w.w.split(1, {H, hd});
    auto a3 = w.an.split(1, {H, hd});
    auto b3 = w.bn.split(1, {H, hd});
    auto o3 = w.o.split(1, {H, dv});
    if (rows.empty()) {
      mixer_.step(r3, k3, v3, w3, a3, b3, o3, cache.state().view());
      for (index_t b = 0; b < B; ++b) cache.advance(b, 1);
    } else {
      for (index_t i = 0; i < B; ++i) {
        const index_t r = rows[static_cast<std::size_t>(i)];
        mixer_.step(r3.slice(0, i, i + 1), k3.slice(0, i, i + 1), v3.slice(0, i, i + 1),
                    w3.slice(0, i, i + 1), a3.slice(0, i, i + 1), b3.slice(0, i, i + 1),
                    o3.slice(0, i, i + 1), cache.state().slice(0, r, r + 1));
        cache.advance(r, 1);
      }
    }
    outputs(w);
    out_.apply(w.z, y);
  }

  void run(const tensor_view<const float, 3>& x, const tensor_view<float, 3>& y, cache_type& cache,
           std::span<const index_t> cu) {
    require_vfirst(names.forward);
    const index_t B = x.extent(0), T = x.extent(1), M = B * T, D = cfg_.hidden;
    const index_t H = H_, hd = hd_, dv = Dv_ / H_;
    const views w = make_views(M);
    // token shift: sequence n is rows [s0, s1) of row b (whole rows, or the packed segments)
    auto shift_segment = [&](index_t b, index_t s0, index_t s1, index_t row) {
      float* shift = cache.conv().view().ptr({row, 0, 0});
      for (index_t t = s0; t < s1; ++t)
        mix_row(w, b * T + t, x.ptr({b, t, 0}), t == s0 ? shift : x.ptr({b, t - 1, 0}));
      if (s1 > s0) std::copy_n(x.ptr({b, s1 - 1, 0}), D, shift);
    };
    if (cu.empty()) {
      for (index_t b = 0; b < B; ++b) shift_segment(b, 0, T, b);
    } else {
      for (std::size_t n = 0; n + 1 < cu.size(); ++n)
        shift_segment(0, cu[n], cu[n + 1], static_cast<index_t>(n));
    }
    inputs(w, [&](index_t m) { return vfirst_row(m / T, m % T); });
    auto r4 = w.r.split(0, {B, T}).split(2, {H, hd});
    auto k4 = w.k.split(0, {B, T}).split(2, {H, hd});
    auto v4 = w.vin.slice(1, 0, Dv_).split(0, {B, T}).split(2, {H, dv});
    auto w4 = w.w.split(0, {B, T}).split(2, {H, hd});
    auto a4 = w.an.split(0, {B, T}).split(2, {H, hd});
    auto b4 = w.bn.split(0, {B, T}).split(2, {H, hd});
    auto o4 = w.o.split(0, {B, T}).split(2, {H, dv});
    switch (cfg_.prefill) {
      case prefill_form::chunked:
        mixer_.forward_chunked(r4, k4, v4, w4, a4, b4, o4, cache.state().view(), cu);
        break;
      case prefill_form::recurrent:
        mixer_.forward_recurrent(r4, k4, v4, w4, a4, b4, o4, cache.state().view(), cu);
        break;
      default:
        mixer_.forward(r4, k4, v4, w4, a4, b4, o4, cache.state().view(), cu);
    }
    outputs(w);
    detail::project_out(out_, w.z, y);
    if (cu.empty()) {
      for (index_t b = 0; b < B; ++b) cache.advance(b, T);
    } else {
      for (std::size_t n = 0; n + 1 < cu.size(); ++n)
        cache.advance(static_cast<index_t>(n), cu[n + 1] - cu[n]);
    }
  }

  config_type cfg_{};
  index_t H_ = 0, hd_ = 0, Dv_ = 0, rw_ = 0, ra_ = 0, rv_ = 0, rg_ = 0;
  std::array<tensor<float, 1>, 6> mu_;
  tensor<float, 1> k_k_, k_a_, r_k_, w_bias_, a_bias_, v_bias_, gn_w_, gn_b_;
  weight_matrix r_proj_, k_proj_, v_in_, v_b_, w_a_, w_b_, a_a_, a_b_, g_a_, g_b_, out_;
  rwkv7<float> mixer_;
  vfirst_view vf_{};
  scratch ws_;
};

}  // namespace seqmix::layers
