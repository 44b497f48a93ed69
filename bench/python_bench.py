#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""The Python binding's costs, measured in one run (issue 16):

1. per-call overhead of a one-token step: seqmix.simple_gla_step from Python (NumPy and torch
   inputs) minus the same C++ simple_gla::step timed in a C++ loop in the same process;
2. chunk_simple_gla on T tokens from Python vs the C++ forward_chunked call (the Python call
   also allocates o, uninitialised, and the zero state);
3. speedups over PyTorch on the CPU: the naive linear-attention recurrence (a token loop) and a
   chunked PyTorch linear attention (chunk 64, the same math as fla's naive_chunk), T=8192, H=8,
   K=V=64, float32, torch and seqmix on the same thread count.

Times are process CPU time (time.process_time, and CLOCK_PROCESS_CPUTIME_ID in the C++ loops),
the variants interleaved, medians over the repetitions.

Usage: PYTHONPATH=build/dev/python /usr/bin/python3 bench/python_bench.py [--threads 2]
       [--chunk-threads 1] [--T 8192] [--reps 5] [--json out.json]
"""
import argparse
import json
import os
import statistics
import time

import numpy as np

import seqmix


def best_of(f, reps, clock=time.process_time):
    """(min, median) of `reps` timings of f(), by default in process CPU seconds
    (time.process_time: on a machine loaded by other work, wall time counts the time other
    processes ran); the PyTorch comparison passes time.perf_counter (wall: both sides use
    `threads` threads, whose CPU times would add up)."""
    ts = []
    for _ in range(reps):
        t0 = clock()
        f()
        ts.append(clock() - t0)
    return min(ts), statistics.median(ts)


def step_overhead(reps, iters=20000):
    """Python seconds per seqmix.simple_gla_step minus the C++ step's (timed in C++ in the same
    process), interleaved: each repetition times every variant once; medians over repetitions."""
    B, H, K, V = 1, 8, 64, 64
    r = np.random.default_rng(0)
    q, k = (r.standard_normal((B, H, K)).astype(np.float32) for _ in range(2))
    v = r.standard_normal((B, H, V)).astype(np.float32)
    g = -np.abs(r.standard_normal((B, H))).astype(np.float32) * 0.01
    s = np.zeros((B, H, K, V), np.float32)
    out = np.empty((B, H, V), np.float32)
    step = seqmix.simple_gla_step

    def py_loop():
        for _ in range(iters):
            step(q, k, v, g, s, out=out)

    def py_loop_alloc():
        for _ in range(iters):
            step(q, k, v, g, s)
    variants = {"cpp": lambda: seqmix._cpp_simple_gla_step_loop(q, k, v, g, s, iters) * iters,
                "numpy_out": py_loop, "numpy_alloc": py_loop_alloc}
    try:
        import torch
        tq, tk, tv, tg, ts, to = map(torch.from_numpy, (q, k, v, g, s, out))

        def torch_loop():
            for _ in range(iters):
                step(tq, tk, tv, tg, ts, out=to)

        def torch_loop_alloc():
            for _ in range(iters):
                step(tq, tk, tv, tg, ts)

        def torch_loop_numpy_path():  # the Tensor.numpy() path (before the attribute reader)
            was = seqmix._set_torch_fast_path(False)
            try:
                torch_loop()
            finally:
                seqmix._set_torch_fast_path(was)
        variants.update(torch_out=torch_loop, torch_alloc=torch_loop_alloc,
                        torch_out_numpy_path=torch_loop_numpy_path)
    except ImportError:
        pass
    times = {n: [] for n in variants}
    for _ in range(reps):
        for n, f in variants.items():
            if n == "cpp":
                inner = f()  # C++-timed CPU seconds of the loop alone
                times[n].append(inner / iters)
            else:
                times[n].append(best_of(f, 1)[0] / iters)
    med = {n: statistics.median(t) for n, t in times.items()}
    res = {f"{n}_us": m * 1e6 for n, m in med.items()}
    res.update({f"overhead_{n}_us": (m - med["cpp"]) * 1e6 for n, m in med.items() if n != "cpp"})
    return res


def chunk_vs_cpp(T, reps):
    """chunk_simple_gla from Python (allocating o and the state) vs the same forward_chunked
    call timed in C++ in the same process (outputs allocated once, outside the timing);
    interleaved, process CPU time, medians."""
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
    c, p = statistics.median(cpp), statistics.median(py)
    return dict(T=T, cpp_chunk_ms=c * 1e3, py_chunk_ms=p * 1e3, py_over_cpp=p / c,
                cpp_min_ms=min(cpp) * 1e3, py_min_ms=min(py) * 1e3,
                py_over_cpp_min=min(py) / min(cpp))


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
    wall = time.perf_counter
    sm = best_of(lambda: seqmix.chunk_linear_attn(q, k, v, normalize=False), reps, wall)[0]
    sm_rec = best_of(lambda: seqmix.fused_recurrent_linear_attn(q, k, v), reps, wall)[0]
    tc = best_of(chunked, reps, time.perf_counter)[0]
    tn = best_of(naive, max(1, reps // 2), time.perf_counter)[0]
    return dict(T=T, seqmix_chunk_ms=sm * 1e3, seqmix_recurrent_ms=sm_rec * 1e3,
                torch_chunked_ms=tc * 1e3, torch_naive_ms=tn * 1e3,
                speedup_vs_torch_chunked=tc / sm, speedup_vs_torch_naive=tn / sm,
                rel_err_vs_torch_chunked=err, torch_version=torch.__version__)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--T", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--chunk-threads", type=int, default=1,
                    help="threads of the chunk comparison (1: CPU time is the call's alone)")
    ap.add_argument("--json")
    a = ap.parse_args()
    seqmix.set_num_threads(a.threads)
    res = {"threads": a.threads, "simd": seqmix.simd_arch(), "load": os.getloadavg()}
    print(f"seqmix {seqmix.__version__} ({seqmix.simd_arch()}), {a.threads} threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    seqmix.set_num_threads(1)  # a decode step of one sequence: one thread
    res["step"] = s = step_overhead(a.reps)
    print(f"step (B=1, H=8, K=V=64, 1 thread; process CPU time, medians of {a.reps} interleaved "
          f"repetitions): C++ {s['cpp_us']:.2f} us")
    for n, what in [("numpy_out", "NumPy, out="), ("numpy_alloc", "NumPy, o allocated"),
                    ("torch_out", "torch, out="), ("torch_alloc", "torch, o allocated"),
                    ("torch_out_numpy_path", "torch, out=, via Tensor.numpy()")]:
        if f"{n}_us" in s:
            print(f"  {what:32s} {s[n + '_us']:6.2f} us "
                  f"(overhead {s['overhead_' + n + '_us']:5.2f} us)")
    seqmix.set_num_threads(a.chunk_threads)
    res["chunk"] = c = chunk_vs_cpp(a.T, a.reps)
    print(f"chunk_simple_gla T={a.T}, H=8, K=V=64, {a.chunk_threads} thread(s): C++ "
          f"{c['cpp_chunk_ms']:.2f} ms, Python {c['py_chunk_ms']:.2f} ms "
          f"({(c['py_over_cpp'] - 1) * 100:+.1f} % median, {(c['py_over_cpp_min'] - 1) * 100:+.1f} "
          f"% min)")
    seqmix.set_num_threads(a.threads)
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
