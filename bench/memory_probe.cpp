// SPDX-License-Identifier: MIT
// Measured peak working memory of every form as T grows: the bytes allocated (through global
// operator new, tensor storage included; tests/support/alloc_counter.cpp) while creating the
// form's state or cache and running it once over a sequence of T tokens whose inputs and outputs
// already exist. B = 1, H = 8, K = V = 64, fp32, 1 thread (per-thread scratch grows with threads).
//   memory_probe --sweep=quick|full   > memory.json
// Rows: recurrent forms hold a [B,H,K,V] state (flat in T); chunked forms add their scratch;
// softmax's recurrent form holds a KV cache of T tokens (linear); sliding window a ring of W
// (flat); "naive" softmax attention materialises the T×T score matrix of one head (quadratic),
// shown for contrast; "activations" is q, k, v, o themselves.
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include <seqmix/seqmix.hpp>

#include "alloc_counter.hpp"

namespace {

using seqmix::index_t;
using seqmix::tensor;
constexpr index_t B = 1, H = 8, K = 64, V = 64, W = 512;

struct inputs {
  explicit inputs(index_t T)
      : q({B, T, H, K}, 0.01f),
        k({B, T, H, K}, 0.01f),
        v({B, T, H, V}, 1.0f),
        o({B, T, H, V}),
        g({B, T, H}, -0.01f),
        gk({B, T, H, K}, -0.01f),
        beta({B, T, H}, 0.5f) {}
  tensor<float, 4> q, k, v, o;
  tensor<float, 3> g;
  tensor<float, 4> gk;
  tensor<float, 3> beta;
};

// Naive softmax attention, the way it is usually first written: scores = s·QKᵀ as a T×T matrix
// per head, masked, softmaxed, times V. Exists only to show what O(T²) memory looks like.
void naive_softmax(const inputs& in, tensor<float, 4>& o, index_t T) {
  const float scale = 1.0f / std::sqrt(float(K));
  for (index_t h = 0; h < H; ++h) {
    std::vector<float> scores(static_cast<std::size_t>(T * T));  // [T, T]
    for (index_t i = 0; i < T; ++i) {
      float mx = -1e30f;
      for (index_t j = 0; j <= i; ++j) {
        float s = scale * seqmix::simd::dot(&in.q(0, i, h, 0), &in.k(0, j, h, 0), K);
        scores[std::size_t(i * T + j)] = s;
        mx = std::max(mx, s);
      }
      float sum = 0;
      for (index_t j = 0; j <= i; ++j) {
        float& p = scores[std::size_t(i * T + j)];
        p = std::exp(p - mx);
        sum += p;
      }
      for (index_t d = 0; d < V; ++d) o(0, i, h, d) = 0;
      for (index_t j = 0; j <= i; ++j) {
        seqmix::simd::axpy(&o(0, i, h, 0), scores[std::size_t(i * T + j)] / sum, &in.v(0, j, h, 0),
                           V);
      }
    }
  }
}

struct probe {
  std::string mixer, form;
  std::function<void(inputs&, index_t)> run;  // allocates its state/cache, runs once
  index_t max_T = 1 << 30;
};

std::vector<probe> probes() {
  std::vector<probe> p;
  auto state = [] { return tensor<float, 4>({B, H, K, V}); };
  p.push_back({"activations", "q,k,v,o", [](inputs&, index_t T) { inputs again(T); }});
  p.push_back({"linear_attention", "chunked", [=](inputs& in, index_t) {
                 auto S = state();
                 seqmix::linear_attention<float>().forward_chunked(in.q, in.k, in.v, in.o, S);
               }});
  p.push_back({"linear_attention", "recurrent", [=](inputs& in, index_t) {
                 auto S = state();
                 seqmix::linear_attention<float>().forward_recurrent(in.q, in.k, in.v, in.o, S);
               }});
  p.push_back({"simple_gla", "chunked", [=](inputs& in, index_t) {
                 auto S = state();
                 seqmix::simple_gla<float>().forward_chunked(in.q, in.k, in.v, in.g, in.o, S);
               }});
  p.push_back({"simple_gla", "recurrent", [=](inputs& in, index_t) {
                 auto S = state();
                 seqmix::simple_gla<float>().forward_recurrent(in.q, in.k, in.v, in.g, in.o, S);
               }});
  p.push_back({"gla", "chunked", [=](inputs& in, index_t) {
                 auto S = state();
                 seqmix::gla<float>().forward_chunked(in.q, in.k, in.v, in.gk, in.o, S);
               }});
  p.push_back({"gla", "recurrent", [=](inputs& in, index_t) {
                 auto S = state();
                 seqmix::gla<float>().forward_recurrent(in.q, in.k, in.v, in.gk, in.o, S);
               }});
  p.push_back({"delta_net", "chunked", [=](inputs& in, index_t) {
                 auto S = state();
                 seqmix::delta_net<float>().forward_chunked(in.q, in.k, in.v, in.beta, in.o, S);
               }});
  p.push_back({"delta_net", "recurrent", [=](inputs& in, index_t) {
                 auto S = state();
                 seqmix::delta_net<float>().forward_recurrent(in.q, in.k, in.v, in.beta, in.o, S);
               }});
  p.push_back({"gated_delta_net", "chunked", [=](inputs& in, index_t) {
                 auto S = state();
                 seqmix::gated_delta_net<float>().forward_chunked(in.q, in.k, in.v, in.g, in.beta,
                                                                  in.o, S);
               }});
  p.push_back({"gated_delta_net", "recurrent", [=](inputs& in, index_t) {
                 auto S = state();
                 seqmix::gated_delta_net<float>().forward_recurrent(in.q, in.k, in.v, in.g, in.beta,
                                                                    in.o, S);
               }});
  p.push_back({"softmax", "chunked", [](inputs& in, index_t) {
                 seqmix::softmax_attention<float>().forward_chunked(in.q, in.k, in.v, in.o);
               }});
  p.push_back({"softmax", "recurrent (KV cache)", [](inputs& in, index_t T) {
                 seqmix::softmax_attention<float> m;
                 auto cache = m.make_cache(B, H, K, V, T);
                 m.forward_recurrent(in.q, in.k, in.v, in.o, cache);
               }});
  p.push_back({"sliding_window", "chunked", [](inputs& in, index_t) {
                 seqmix::sliding_window_attention<float>({.window = W})
                     .forward_chunked(in.q, in.k, in.v, in.o);
               }});
  p.push_back({"sliding_window", "recurrent (ring)", [](inputs& in, index_t) {
                 seqmix::sliding_window_attention<float> m({.window = W});
                 auto cache = m.make_cache(B, H, K, V);
                 m.forward_recurrent(in.q, in.k, in.v, in.o, cache);
               }});
  p.push_back({"naive_softmax", "T×T scores",
               [](inputs& in, index_t T) { naive_softmax(in, in.o, T); }, 8192});
  return p;
}

}  // namespace

int main(int argc, char** argv) {
  std::string sweep = "quick";
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--sweep=", 0) == 0) sweep = a.substr(8);
  }
  std::vector<index_t> Ts;
  const index_t max_T = sweep == "full" ? 65536 : 16384;
  for (index_t t = 256; t <= max_T; t *= (sweep == "full" ? 2 : 4)) Ts.push_back(t);
  seqmix::set_num_threads(1);

  std::printf(
      "{\n  \"note\": \"Peak bytes allocated during one call (state/cache creation "
      "included, inputs excluded), B=1, H=8, K=V=64, fp32, 1 thread; sliding window "
      "W=%ld; naive softmax stops at T=8192.\",\n  \"results\": [\n",
      static_cast<long>(W));
  bool first = true;
  for (const probe& pr : probes()) {
    for (index_t T : Ts) {
      if (T > pr.max_T) continue;
      inputs in(T);
      seqmix::testing::reset_allocation_stats();
      pr.run(in, T);
      const auto stats = seqmix::testing::current_allocation_stats();
      std::printf("%s    {\"mixer\": \"%s\", \"form\": \"%s\", \"T\": %ld, \"peak_bytes\": %zu}",
                  first ? "" : ",\n", pr.mixer.c_str(), pr.form.c_str(), static_cast<long>(T),
                  stats.peak_bytes);
      first = false;
      std::fflush(stdout);
    }
  }
  std::printf("\n  ]\n}\n");
  return 0;
}
