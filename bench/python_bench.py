#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""The Python binding's costs, measured in one run (issue 16):

1. per-call overhead of a one-token step: seqmix.simple_gla_step from Python (NumPy and torch
   inputs) minus the same C++ simple_gla::step timed in a C++ loop in the same process;
2. chunk_simple_gla on T tokens from Python vs the C++ forward_chunked call (the Python call
   also allocates and zeroes o and the state);
3. speedups over PyTorch on the CPU: the naive linear-attention recurrence (a token loop) and a
   chunked PyTorch linear attention (chunk 64, the same math as fla's naive_chunk), T=8192, H=8,
   K=V=64, float32, torch and seqmix on the same thread count.

Usage: PYTHONPATH=build/dev/python /usr/bin/python3 bench/python_bench.py [--threads 2]
       [--T 8192] [--reps 5] [--json out.json]
"""
import argparse
import json
import os
import statistics
import time

import numpy as np

import seqmix


def best_of(f, reps):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return min(ts), statistics.median(ts)


def step_overhead(reps, iters=20000):
    B, H, K, V = 1, 8, 64, 64
    r = np.random.default_rng(0)
    q, k = (r.standard_normal((B, H, K)).astype(np.float32) for _ in range(2))
    v = r.standard_normal((B, H, V)).astype(np.float32)
    g = -np.abs(r.standard_normal((B, H))).astype(np.float32) * 0.01
    s = np.zeros((B, H, K, V), np.float32)
    out = np.empty((B, H, V), np.float32)
    res = {}
    cpp = min(seqmix._cpp_simple_gla_step_loop(q, k, v, g, s, iters) for _ in range(reps))
    step = seqmix.simple_gla_step

    def py_loop():
        for _ in range(iters):
            step(q, k, v, g, s, out=out)

    def py_loop_alloc():
        for _ in range(iters):
            step(q, k, v, g, s)
    py = best_of(py_loop, reps)[0] / iters
    py_alloc = best_of(py_loop_alloc, reps)[0] / iters
    res.update(cpp_step_us=cpp * 1e6, py_step_out_us=py * 1e6, py_step_alloc_us=py_alloc * 1e6,
               overhead_out_us=(py - cpp) * 1e6, overhead_alloc_us=(py_alloc - cpp) * 1e6)
    try:
        import torch
        tq, tk, tv, tg, ts, to = map(torch.from_numpy, (q, k, v, g, s, out))

        def torch_loop():
            for _ in range(iters // 4):
                step(tq, tk, tv, tg, ts, out=to)
        pt = best_of(torch_loop, reps)[0] / (iters // 4)
        res.update(py_step_torch_us=pt * 1e6, overhead_torch_us=(pt - cpp) * 1e6)
    except ImportError:
        pass
    return res


def chunk_vs_cpp(T, reps):
    B, H, K, V = 1, 8, 64, 64
    r = np.random.default_rng(1)
    q, k = (r.standard_normal((B, T, H, K)).astype(np.float32) for _ in range(2))
    v = r.standard_normal((B, T, H, V)).astype(np.float32)
    g = -np.abs(r.standard_normal((B, T, H))).astype(np.float32) * 0.01
    seqmix.chunk_simple_gla(q, k, v, g, output_final_state=True)  # warm-up
    cpp, py = [], []
    for _ in range(reps):  # interleaved, so load changes hit both alike
        cpp.append(seqmix._cpp_chunk_simple_gla_loop(q, k, v, g, 1))
        py.append(best_of(lambda: seqmix.chunk_simple_gla(q, k, v, g, output_final_state=True),
                          1)[0])
    c, p = min(cpp), min(py)
    return dict(T=T, cpp_chunk_ms=c * 1e3, py_chunk_ms=p * 1e3, py_over_cpp=p / c)


def versus_torch(T, reps, threads):
    import torch
    torch.set_num_threads(threads)
    B, H, K, V, C = 1, 8, 64, 64, 64
    gen = torch.Generator().manual_seed(2)
    q, k = (torch.randn(B, T, H, K, generator=gen) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen)
    scale = K ** -0.5

    def naive():  # S_t = S_{t-1} + k_t^T v_t; o_t = scale q_t S_t (token loop)
        S = torch.zeros(B, H, K, V)
        o = torch.empty(B, T, H, V)
        for t in range(T):
            S += k[:, t, :, :, None] * v[:, t, :, None, :]
            o[:, t] = torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S)
        return o

    def chunked():  # intra-chunk causal products + inter-chunk state, chunk C
        qh, kh, vh = (x.transpose(1, 2).reshape(B, H, T // C, C, -1) for x in (q * scale, k, v))
        mask = torch.tril(torch.ones(C, C, dtype=torch.bool))
        intra = (qh @ kh.transpose(-1, -2)).masked_fill(~mask, 0) @ vh
        kv = kh.transpose(-1, -2) @ vh  # [B, H, N, K, V] per chunk
        S = torch.cumsum(kv, dim=2) - kv  # state before each chunk
        o = intra + qh @ S
        return o.reshape(B, H, T, V).transpose(1, 2)

    o_ref = chunked()
    o_sm, _ = seqmix.chunk_linear_attn(q, k, v, normalize=False)
    err = float((o_sm - o_ref).abs().max() / o_ref.abs().max())
    sm = best_of(lambda: seqmix.chunk_linear_attn(q, k, v, normalize=False), reps)[0]
    sm_rec = best_of(lambda: seqmix.fused_recurrent_linear_attn(q, k, v), reps)[0]
    tc = best_of(chunked, reps)[0]
    tn = best_of(naive, max(1, reps // 2))[0]
    return dict(T=T, seqmix_chunk_ms=sm * 1e3, seqmix_recurrent_ms=sm_rec * 1e3,
                torch_chunked_ms=tc * 1e3, torch_naive_ms=tn * 1e3,
                speedup_vs_torch_chunked=tc / sm, speedup_vs_torch_naive=tn / sm,
                rel_err_vs_torch_chunked=err, torch_version=torch.__version__)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json")
    a = ap.parse_args()
    seqmix.set_num_threads(a.threads)
    res = {"threads": a.threads, "simd": seqmix.simd_arch(), "load": os.getloadavg()}
    print(f"seqmix {seqmix.__version__} ({seqmix.simd_arch()}), {a.threads} threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    seqmix.set_num_threads(1)  # a decode step of one sequence: one thread
    res["step"] = s = step_overhead(a.reps)
    seqmix.set_num_threads(a.threads)
    print(f"step (B=1, H=8, K=V=64, 1 thread): C++ {s['cpp_step_us']:.2f} us, Python "
          f"{s['py_step_out_us']:.2f} us with out= (overhead {s['overhead_out_us']:.2f} us), "
          f"{s['py_step_alloc_us']:.2f} us allocating o (overhead {s['overhead_alloc_us']:.2f} us)")
    if "py_step_torch_us" in s:
        print(f"  torch tensors: {s['py_step_torch_us']:.2f} us (overhead "
              f"{s['overhead_torch_us']:.2f} us)")
    res["chunk"] = c = chunk_vs_cpp(a.T, a.reps)
    print(f"chunk_simple_gla T={a.T}, H=8, K=V=64: C++ {c['cpp_chunk_ms']:.2f} ms, Python "
          f"{c['py_chunk_ms']:.2f} ms ({(c['py_over_cpp'] - 1) * 100:+.1f} %)")
    try:
        res["torch"] = t = versus_torch(a.T, a.reps, a.threads)
        print(f"linear attention T={a.T}, H=8, K=V=64 (torch {t['torch_version']}, "
              f"{a.threads} threads): seqmix chunk {t['seqmix_chunk_ms']:.2f} ms, recurrent "
              f"{t['seqmix_recurrent_ms']:.2f} ms; torch chunked {t['torch_chunked_ms']:.2f} ms "
              f"({t['speedup_vs_torch_chunked']:.1f}x), torch naive loop "
              f"{t['torch_naive_ms']:.1f} ms ({t['speedup_vs_torch_naive']:.0f}x); "
              f"max rel diff {t['rel_err_vs_torch_chunked']:.1e}")
    except ImportError:
        print("torch not installed: no PyTorch comparison")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
