#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Prefill a GLA layer's mixer with seqmix and with a PyTorch loop, then decode a few tokens.

Like checking a new kernel next to the one you trust: the same inputs go through
seqmix.chunk_gla (chunked-parallel) and a plain PyTorch token loop of the recurrence
S_t = Diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t (float64); the script prints the
error of each and the speedup, then continues the sequence with seqmix.gla_step from the
returned state and checks it against the loop too.

Run: PYTHONPATH=build/dev/python /usr/bin/python3 examples/python/prefill_compare.py [--T 2048]
"""
import argparse
import time

import torch

import seqmix


def torch_loop(q, k, v, g, scale, S=None):
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = torch.zeros(B, H, K, V, dtype=q.dtype) if S is None else S.clone()
    o = torch.empty(B, T, H, V, dtype=q.dtype)
    for t in range(T):
        S = S * g[:, t].exp()[..., None] + k[:, t, :, :, None] * v[:, t, :, None, :]
        o[:, t] = torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S)
    return o, S


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    seqmix.set_num_threads(a.threads)
    torch.set_num_threads(a.threads)
    B, T, H, K, V = 1, a.T + a.decode, a.H, a.D, a.D
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, d, generator=gen) for d in (K, K, V))
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, K, generator=gen)) / 16  # GLA's gate
    scale = K ** -0.5
    P = a.T  # prompt length

    t0 = time.perf_counter()
    o_ref, S_ref = torch_loop(*(x[:, :P].double() for x in (q, k, v, g)), scale)
    t_torch = time.perf_counter() - t0
    t0 = time.perf_counter()
    o, S = seqmix.chunk_gla(q[:, :P], k[:, :P], v[:, :P], g[:, :P], output_final_state=True)
    t_seqmix = time.perf_counter() - t0
    err_o = ((o.double() - o_ref).abs().max() / o_ref.abs().max()).item()
    err_S = ((S.double() - S_ref).abs().max() / S_ref.abs().max()).item()
    print(f"prefill T={P}, H={H}, K=V={K}, {a.threads} threads")
    print(f"  PyTorch loop (float64): {t_torch * 1e3:9.1f} ms")
    print(f"  seqmix.chunk_gla (f32): {t_seqmix * 1e3:9.1f} ms   speedup {t_torch / t_seqmix:.0f}x")
    print(f"  max relative error: output {err_o:.2e}, final state {err_S:.2e}")

    # decode: continue from the returned state, one token at a time, state updated in place
    o_step = torch.empty(B, H, V)
    worst = 0.0
    S_loop = S_ref
    for t in range(P, T):
        seqmix.gla_step(q[:, t], k[:, t], v[:, t], g[:, t], S, out=o_step)
        o1, S_loop = torch_loop(*(x[:, t:t + 1].double() for x in (q, k, v, g)), scale, S_loop)
        worst = max(worst, ((o_step.double() - o1[:, 0]).abs().max() / o1.abs().max()).item())
    print(f"decode {a.decode} tokens with seqmix.gla_step: max relative error {worst:.2e}")
    return 0 if max(err_o, err_S, worst) < 1e-4 else 1  # float32 vs float64: ~1e-6 expected


if __name__ == "__main__":
    raise SystemExit(main())
