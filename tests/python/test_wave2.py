# SPDX-License-Identifier: MIT
"""RWKV-6, RWKV-7 and KDA bindings against the golden vectors (fla's naive references) and a
PyTorch float64 recurrence of KDA."""
import numpy as np
import pytest

import seqmix
from helpers import assert_close
from test_golden import CASES, DTYPES, RTOL, VARIANTS, inputs

pytestmark = pytest.mark.skipif(not hasattr(seqmix, "chunk_kda"),
                                reason="extension built without the wave-2 mixers")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("form", ["chunk", "fused_recurrent"])
def test_rwkv6(golden, form, dtype):
    f = golden("fla_vector_decay")
    fn = seqmix.chunk_rwkv6 if form == "chunk" else seqmix.fused_recurrent_rwkv6
    for s in CASES:
        x = inputs(golden, s, dtype)
        u = f[f"rwkv6.case{s}.u"].astype(dtype)
        for var in VARIANTS:
            h0 = x["h0"] if var == "h0" else None
            o, ht = fn(x["q"], x["k"], x["v"], x["gk"], u, scale=1.0, initial_state=h0,
                       output_final_state=True)
            name = f"rwkv6.case{s}.{var}"
            assert_close(o, f[name + ".o_naive"], RTOL[dtype], name + ".o")
            assert_close(ht, f[name + ".ht_naive"], RTOL[dtype], name + ".ht")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("form", ["chunk", "fused_recurrent"])
def test_rwkv7(golden, form, dtype):
    f = golden("fla_delta")
    fn = seqmix.chunk_rwkv7 if form == "chunk" else seqmix.fused_recurrent_rwkv7
    for s in CASES:
        x = inputs(golden, s, dtype)
        w, a, b = (f[f"rwkv7.case{s}.{n}"].astype(dtype) for n in "wab")
        for var in VARIANTS:
            h0 = x["h0"] if var == "h0" else None
            o, ht = fn(x["q"], w, x["k"], x["v"], a, b, initial_state=h0)  # fla: scale 1
            name = f"rwkv7.case{s}.{var}"
            assert_close(o, f[name + ".o_naive"], RTOL[dtype], name + ".o")
            assert_close(ht, f[name + ".ht_naive"], RTOL[dtype], name + ".ht")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("form", ["chunk", "fused_recurrent"])
def test_kda(golden, form, dtype):
    f = golden("v2/kda")
    fn = seqmix.chunk_kda if form == "chunk" else seqmix.fused_recurrent_kda
    for s in CASES:
        c = f"kda.case{s}"
        q, k, v, g, beta, h0 = (f[f"{c}.{n}"].astype(dtype) for n in
                                ["q", "k", "v", "g", "beta", "h0"])
        for var in VARIANTS:
            o, ht = fn(q, k, v, g, beta, initial_state=h0 if var == "h0" else None,
                       output_final_state=True)
            assert_close(o, f[f"{c}.{var}.o_naive"], RTOL[dtype], f"{c}.{var}.o")
            assert_close(ht, f[f"{c}.{var}.ht_naive"], RTOL[dtype], f"{c}.{var}.ht")


def test_kda_against_torch():
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(11)
    B, T, H, HV, K, V = 1, 40, 2, 4, 16, 8
    q, k = (torch.randn(B, T, H, K, generator=gen, dtype=torch.float64) for _ in range(2))
    k = k / k.norm(dim=-1, keepdim=True)
    v = torch.randn(B, T, HV, V, generator=gen, dtype=torch.float64)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, HV, K, generator=gen,
                                                   dtype=torch.float64))
    beta = torch.sigmoid(torch.randn(B, T, HV, generator=gen, dtype=torch.float64))
    qr, kr = q.repeat_interleave(HV // H, 2), k.repeat_interleave(HV // H, 2)
    S = torch.zeros(B, HV, K, V, dtype=torch.float64)
    o = torch.empty(B, T, HV, V, dtype=torch.float64)
    for t in range(T):
        S = S * g[:, t].exp()[..., None]
        u = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhk,bhkv->bhv", kr[:, t], S))
        S = S + kr[:, t, :, :, None] * u[:, :, None, :]
        o[:, t] = torch.einsum("bhk,bhkv->bhv", qr[:, t] * K ** -0.5, S)
    for fn in (seqmix.chunk_kda, seqmix.fused_recurrent_kda):
        got, st = fn(q, k, v, g, beta, output_final_state=True)
        assert_close(got, o, 1e-10, fn.__name__)
        assert_close(st, S, 1e-10, fn.__name__ + " state")
