# SPDX-License-Identifier: MIT
"""Every binding against small PyTorch float64 implementations of the naive recurrences written
here (odd sizes, GVA / GQA / groups, initial states, packed sequences), with torch tensors in
and out; steps against the recurrent forms."""
import numpy as np
import pytest

import seqmix
from helpers import assert_close

torch = pytest.importorskip("torch")

f64 = torch.float64


def rnd(*shape, gen):
    return torch.randn(*shape, generator=gen, dtype=f64)


def logsig(*shape, gen, strength=1.0):
    return torch.nn.functional.logsigmoid(rnd(*shape, gen=gen)) * strength


# --- naive recurrences (float64): S is [K, V] per (sequence, head), o_t = scale q_t S_t --------
def ref_gated(q, k, v, scale, h0=None, g=None, gk=None, gv=None, normalize=False):
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    S = torch.zeros(B, HV, K, V, dtype=f64) if h0 is None else h0.clone()
    z = torch.zeros(B, HV, K, dtype=f64)
    o = torch.zeros(B, T, HV, V, dtype=f64)
    for t in range(T):
        if g is not None:
            S = S * g[:, t].exp()[..., None, None]
        if gk is not None:
            S = S * gk[:, t].exp()[..., :, None]
        if gv is not None:
            S = S * gv[:, t].exp()[..., None, :]
        S = S + k[:, t, :, :, None] * v[:, t, :, None, :]
        o[:, t] = torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S)
        if normalize:
            z = z + k[:, t]
            o[:, t] /= ((q[:, t] * scale * z).sum(-1) + 1e-10)[..., None]
    return o, S


def l2n(x):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def ref_delta(q, k, v, beta, scale, h0=None, g=None, l2=False):
    if l2:
        q, k = l2n(q), l2n(k)
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    rep = HV // H
    q, k = q.repeat_interleave(rep, 2), k.repeat_interleave(rep, 2)
    S = torch.zeros(B, HV, K, V, dtype=f64) if h0 is None else h0.clone()
    o = torch.zeros(B, T, HV, V, dtype=f64)
    for t in range(T):
        if g is not None:
            S = S * g[:, t].exp()[..., None, None]
        u = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhk,bhkv->bhv", k[:, t], S))
        S = S + k[:, t, :, :, None] * u[:, :, None, :]
        o[:, t] = torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S)
    return o, S


def ref_mamba2(x, dt, A, Bm, Cm, D=None, dt_bias=None, softplus=False, h0=None):
    B, T, H, P = x.shape
    G, N = Bm.shape[2], Bm.shape[3]
    Bm, Cm = Bm.repeat_interleave(H // G, 2), Cm.repeat_interleave(H // G, 2)
    d = dt + (0 if dt_bias is None else dt_bias)
    if softplus:
        d = torch.nn.functional.softplus(d)
    S = torch.zeros(B, H, P, N, dtype=f64) if h0 is None else h0.clone()  # mamba's [P, N]
    y = torch.zeros(B, T, H, P, dtype=f64)
    for t in range(T):
        S = S * (d[:, t] * A).exp()[..., None, None] + \
            (d[:, t, :, None] * x[:, t])[..., :, None] * Bm[:, t, :, None, :]
        y[:, t] = torch.einsum("bhpn,bhn->bhp", S, Cm[:, t])
        if D is not None:
            y[:, t] += D[:, None] * x[:, t]
    return y, S


def ref_attention(q, k, v, scale, window=None, sink=None):
    B, T, H, K = q.shape
    rep = H // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    s = torch.einsum("bthk,bshk->bhts", q, k) * scale
    i = torch.arange(T)
    mask = i[None, :] <= i[:, None]
    if window is not None:
        mask &= (i[:, None] - i[None, :]) < window
    s = s.masked_fill(~mask, float("-inf"))
    if sink is not None:
        s = torch.cat([s, sink[None, :, None, None].expand(B, H, T, 1)], dim=-1)
    p = torch.softmax(s, dim=-1)[..., :T]
    return torch.einsum("bhts,bshv->bthv", p, v)


FORMS = ["chunk", "fused_recurrent"]
DT = [torch.float32, torch.float64]
TOL = {torch.float32: 3e-5, torch.float64: 1e-10}


def cast(dtype, *xs):
    return [None if x is None else x.to(dtype) for x in xs]


@pytest.mark.parametrize("dtype", DT, ids=["f32", "f64"])
@pytest.mark.parametrize("form", FORMS)
def test_linear_simple_gla_gla(form, dtype):
    gen = torch.Generator().manual_seed(1)
    B, T, H, K, V = 2, 77, 3, 24, 40
    q, k, v = rnd(B, T, H, K, gen=gen), rnd(B, T, H, K, gen=gen), rnd(B, T, H, V, gen=gen)
    h0 = rnd(B, H, K, V, gen=gen)
    g, gk, gv = logsig(B, T, H, gen=gen), logsig(B, T, H, K, gen=gen), logsig(B, T, H, V, gen=gen)
    sc = 0.3
    ch = form == "chunk"
    qc, kc, vc, h0c, gc, gkc, gvc = cast(dtype, q, k, v, h0, g, gk, gv)
    tol = TOL[dtype]
    # linear attention, with and without fla's normaliser
    fn = seqmix.chunk_linear_attn if ch else seqmix.fused_recurrent_linear_attn
    o, s = fn(qc, kc, vc, scale=sc, initial_state=h0c, output_final_state=True, normalize=False)
    assert isinstance(o, torch.Tensor) and o.dtype == dtype
    ro, rs = ref_gated(q, k, v, sc, h0)
    assert_close(o, ro, tol, "linear_attn.o")
    assert_close(s, rs, tol, "linear_attn.ht")
    o, _ = fn(qc, kc, vc, scale=sc, normalize=True)
    assert_close(o, ref_gated(q, k, v, sc, normalize=True)[0], max(tol, 1e-4), "normalized")
    # simple GLA: data-dependent g and a constant g_gamma
    fn = seqmix.chunk_simple_gla if ch else seqmix.fused_recurrent_simple_gla
    o, s = fn(qc, kc, vc, g=gc, initial_state=h0c, output_final_state=True)
    ro, rs = ref_gated(q, k, v, K ** -0.5, h0, g=g)
    assert_close(o, ro, tol, "simple_gla.o")
    assert_close(s, rs, tol, "simple_gla.ht")
    gamma = -torch.linspace(0.01, 1.5, H, dtype=f64)
    o, s = fn(qc, kc, vc, g_gamma=gamma.to(dtype), output_final_state=True)
    ro, rs = ref_gated(q, k, v, K ** -0.5, g=gamma.expand(B, T, H))
    assert_close(o, ro, tol, "simple_gla(g_gamma).o")
    # retention and lightning are g_gamma schedules
    fn = seqmix.chunk_retention if ch else seqmix.fused_recurrent_retention
    ret = torch.log1p(-torch.pow(2.0, -5.0 - torch.arange(H, dtype=f64)))
    assert_close(fn(qc, kc, vc)[0], ref_gated(q, k, v, K ** -0.5, g=ret.expand(B, T, H))[0], tol,
                 "retention")
    fn = seqmix.chunk_lightning_attn if ch else seqmix.fused_recurrent_lightning_attn
    lg = -(8.0 / H) * (1 - 1 / 3) * torch.arange(H, dtype=f64)
    assert_close(fn(qc, kc, vc, layer_idx=1, num_layers=3)[0],
                 ref_gated(q, k, v, K ** -0.5, g=lg.expand(B, T, H))[0], tol, "lightning")
    # GLA with per-key gates (and per-value gates in the recurrent form)
    if ch:
        o, s = seqmix.chunk_gla(qc, kc, vc, gkc, initial_state=h0c, output_final_state=True)
        ro, rs = ref_gated(q, k, v, K ** -0.5, h0, gk=gk)
    else:
        o, s = seqmix.fused_recurrent_gla(qc, kc, vc, gk=gkc, gv=gvc, initial_state=h0c,
                                          output_final_state=True)
        ro, rs = ref_gated(q, k, v, K ** -0.5, h0, gk=gk, gv=gv)
    assert_close(o, ro, tol, "gla.o")
    assert_close(s, rs, tol, "gla.ht")


@pytest.mark.parametrize("dtype", DT, ids=["f32", "f64"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("l2", [False, True])
def test_delta_rules(form, dtype, l2):
    gen = torch.Generator().manual_seed(2)
    B, T, H, HV, K, V = 2, 70, 2, 4, 16, 24  # GVA: 2 value heads per q/k head
    q, k, v = rnd(B, T, H, K, gen=gen), rnd(B, T, H, K, gen=gen), rnd(B, T, HV, V, gen=gen)
    if not l2:
        k = l2n(k)
    beta = torch.sigmoid(rnd(B, T, HV, gen=gen))
    g = logsig(B, T, HV, gen=gen)
    h0 = rnd(B, HV, K, V, gen=gen)
    qc, kc, vc, bc, gc, h0c = cast(dtype, q, k, v, beta, g, h0)
    tol = max(TOL[dtype], 1e-9)
    ch = form == "chunk"
    fn = seqmix.chunk_delta_rule if ch else seqmix.fused_recurrent_delta_rule
    o, s = fn(qc, kc, vc, bc, initial_state=h0c, output_final_state=True,
              use_qk_l2norm_in_kernel=l2)
    ro, rs = ref_delta(q, k, v, beta, K ** -0.5, h0, l2=l2)
    assert_close(o, ro, tol, "delta.o")
    assert_close(s, rs, tol, "delta.ht")
    fn = seqmix.chunk_gated_delta_rule if ch else seqmix.fused_recurrent_gated_delta_rule
    o, s = fn(qc, kc, vc, gc, bc, scale=0.7, initial_state=h0c, output_final_state=True,
              use_qk_l2norm_in_kernel=l2)
    ro, rs = ref_delta(q, k, v, beta, 0.7, h0, g=g, l2=l2)
    assert_close(o, ro, tol, "gated_delta.o")
    assert_close(s, rs, tol, "gated_delta.ht")


@pytest.mark.parametrize("dtype", DT, ids=["f32", "f64"])
@pytest.mark.parametrize("fn", [seqmix.mamba_chunk_scan_combined, seqmix.mamba_recurrent_scan],
                         ids=["chunk", "recurrent"])
def test_mamba2(fn, dtype):
    gen = torch.Generator().manual_seed(3)
    B, T, H, P, G, N = 2, 45, 4, 12, 2, 8
    x = rnd(B, T, H, P, gen=gen)
    dt = rnd(B, T, H, gen=gen) - 1
    A = -torch.exp(rnd(H, gen=gen) * 0.5)
    Bm, Cm = rnd(B, T, G, N, gen=gen), rnd(B, T, G, N, gen=gen)
    D, bias = rnd(H, gen=gen), rnd(H, gen=gen) * 0.1
    h0 = rnd(B, H, P, N, gen=gen)
    z = rnd(B, T, H, P, gen=gen)
    c = cast(dtype, x, dt, A, Bm, Cm, D, bias, h0, z)
    y, s = fn(*c[:5], chunk_size=16, D=c[5], dt_bias=c[6], initial_states=c[7], dt_softplus=True,
              return_final_states=True)
    ry, rs = ref_mamba2(x, dt, A, Bm, Cm, D, bias, True, h0)
    assert_close(y, ry, TOL[dtype], "mamba2.y")
    assert_close(s, rs, TOL[dtype], "mamba2.final_states")
    y = fn(*c[:5], chunk_size=16, D=c[5], z=c[8], dt_bias=c[6], dt_softplus=True)
    ry, _ = ref_mamba2(x, dt, A, Bm, Cm, D, bias, True)
    assert_close(y, ry * torch.nn.functional.silu(z), TOL[dtype], "mamba2.y*silu(z)")


@pytest.mark.parametrize("dtype", DT, ids=["f32", "f64"])
def test_attention(dtype):
    gen = torch.Generator().manual_seed(4)
    B, T, H, Hkv, K, V = 2, 90, 4, 2, 16, 20
    q, k, v = rnd(B, T, H, K, gen=gen), rnd(B, T, Hkv, K, gen=gen), rnd(B, T, Hkv, V, gen=gen)
    sink = rnd(H, gen=gen)
    qc, kc, vc = cast(dtype, q, k, v)
    for window in [None, 1, 7, 200]:
        o = seqmix.parallel_attn(qc, kc, vc, window_size=window)
        assert_close(o, ref_attention(q, k, v, K ** -0.5, window), TOL[dtype], f"W={window}")
    o = seqmix.parallel_attn(qc, kc, vc, scale=0.2, window_size=9, sink=sink)
    assert_close(o, ref_attention(q, k, v, 0.2, 9, sink), TOL[dtype], "sink")
    # decode through a ring cache (window 9 < capacity): prefill 50, then steps
    cache = seqmix.KVCache(B, Hkv, K, V, capacity=T, window_size=9, sink=sink, scale=0.2,
                           dtype=str(dtype).split(".")[1])
    assert cache.is_ring
    outs = [cache.prefill(qc[:, :50], kc[:, :50], vc[:, :50])]
    buf = torch.empty(B, H, V, dtype=dtype)
    for t in range(50, T):
        r = cache.step(qc[:, t], kc[:, t], vc[:, t], out=buf)
        assert r is buf
        outs.append(buf.clone()[:, None])
    assert_close(torch.cat(outs, 1), ref_attention(q, k, v, 0.2, 9, sink), TOL[dtype], "ring")
    assert cache.lengths == [T, T]


@pytest.mark.parametrize("dtype", DT, ids=["f32", "f64"])
def test_varlen_equals_separate_calls(dtype):
    gen = torch.Generator().manual_seed(5)
    lens = [5, 64, 1, 33]
    T, H, K, V = sum(lens), 2, 16, 16
    cu = torch.tensor([0] + list(np.cumsum(lens)), dtype=torch.long)
    q, k, v = (rnd(1, T, H, D, gen=gen).to(dtype) for D in (K, K, V))
    g = logsig(1, T, H, gen=gen).to(dtype)
    h0 = rnd(len(lens), H, K, V, gen=gen).to(dtype)
    beta = torch.sigmoid(rnd(1, T, H, gen=gen)).to(dtype)
    kn = l2n(k.double()).to(dtype)
    calls = {
        "chunk_simple_gla": lambda sl, h, c: seqmix.chunk_simple_gla(
            q[:, sl], k[:, sl], v[:, sl], g[:, sl], initial_state=h, output_final_state=True,
            cu_seqlens=c),
        "chunk_gated_delta_rule": lambda sl, h, c: seqmix.chunk_gated_delta_rule(
            q[:, sl], kn[:, sl], v[:, sl], g[:, sl], beta[:, sl], initial_state=h,
            output_final_state=True, cu_seqlens=c),
    }
    for name, f in calls.items():
        o, s = f(slice(None), h0, cu)
        for n in range(len(lens)):
            sl = slice(int(cu[n]), int(cu[n + 1]))
            on, sn = f(sl, h0[n:n + 1], None)
            assert_close(o[:, sl], on, TOL[dtype], f"{name} seq {n} o")
            assert_close(s[n:n + 1], sn, TOL[dtype], f"{name} seq {n} state")
    o = seqmix.parallel_attn(q, k, v, cu_seqlens=cu)
    for n in range(len(lens)):
        sl = slice(int(cu[n]), int(cu[n + 1]))
        assert_close(o[:, sl], seqmix.parallel_attn(q[:, sl], k[:, sl], v[:, sl]), TOL[dtype],
                     f"attn seq {n}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_steps_equal_recurrent_form(dtype):
    r = np.random.default_rng(6)
    B, T, H, HV, K, V = 2, 12, 2, 2, 16, 8
    q, k = r.standard_normal((2, B, T, H, K)).astype(dtype)
    v = r.standard_normal((B, T, HV, V)).astype(dtype)
    g = -np.abs(r.standard_normal((B, T, H))).astype(dtype)
    gk = -np.abs(r.standard_normal((B, T, H, K))).astype(dtype)
    beta = (1 / (1 + np.exp(-r.standard_normal((B, T, HV))))).astype(dtype)
    kn = k / np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
    cases = {
        "linear_attn": (lambda: seqmix.fused_recurrent_linear_attn(q, k, v, output_final_state=True),
                        lambda t, s: seqmix.linear_attn_step(q[:, t], k[:, t], v[:, t], s)),
        "simple_gla": (lambda: seqmix.fused_recurrent_simple_gla(q, k, v, g, output_final_state=True),
                       lambda t, s: seqmix.simple_gla_step(q[:, t], k[:, t], v[:, t], g[:, t], s)),
        "gla": (lambda: seqmix.fused_recurrent_gla(q, k, v, gk, output_final_state=True),
                lambda t, s: seqmix.gla_step(q[:, t], k[:, t], v[:, t], gk[:, t], s)),
        "delta_rule": (lambda: seqmix.fused_recurrent_delta_rule(q, kn, v, beta,
                                                                 output_final_state=True),
                       lambda t, s: seqmix.delta_rule_step(q[:, t], kn[:, t], v[:, t],
                                                           beta[:, t], s)),
        "gated_delta_rule": (
            lambda: seqmix.fused_recurrent_gated_delta_rule(q, kn, v, g, beta,
                                                            output_final_state=True),
            lambda t, s: seqmix.gated_delta_rule_step(q[:, t], kn[:, t], v[:, t], g[:, t],
                                                      beta[:, t], s)),
    }
    for name, (full, step) in cases.items():
        o, s_ref = full()
        s = np.zeros((B, HV, K, V), dtype)
        addr = s.ctypes.data
        outs = np.stack([step(t, s) for t in range(T)], axis=1)
        assert s.ctypes.data == addr  # updated in place
        np.testing.assert_allclose(outs, o, rtol=0, atol=1e-5 if dtype == np.float32 else 1e-12,
                                   err_msg=name)
        np.testing.assert_allclose(s, s_ref, rtol=0, atol=1e-5 if dtype == np.float32 else 1e-12,
                                   err_msg=name)


def test_moe_against_torch():
    gen = torch.Generator().manual_seed(7)
    T, D, E, I, k = 19, 32, 6, 16, 2
    x = rnd(T, D, gen=gen).float()
    router = rnd(E, D, gen=gen).float() * 0.3
    gate_up = rnd(E, 2 * I, D, gen=gen).float() * 0.2
    down = rnd(E, D, I, gen=gen).float() * 0.2
    m = seqmix.MoE(router, gate_up, down, top_k=k, norm_topk_prob=True)
    in_place = seqmix.MoE(router, gate_up, down, top_k=k, norm_topk_prob=True,
                          pack_experts=False)
    xd = x.double()
    p = torch.softmax(xd @ router.double().T, -1)
    w, ids = p.topk(k, -1)
    w = w / w.sum(-1, keepdim=True)
    y = torch.zeros(T, D, dtype=f64)
    for t in range(T):
        for j in range(k):
            e = int(ids[t, j])
            gu = gate_up[e].double() @ xd[t]
            h = torch.nn.functional.silu(gu[:I]) * gu[I:]
            y[t] += w[t, j] * (down[e].double() @ h)
    for form in ["grouped", "per_token"]:
        out = m.forward(x, form=form)
        assert isinstance(out, torch.Tensor)
        assert_close(out, y, 2e-5, form)
        assert_close(in_place.forward(x, form=form), y, 2e-5, form + ", pack_experts=False")
    assert_close(m(x.reshape(1, T, D)).reshape(T, D), y, 2e-5, "[B, T, D] input")
    # pack_experts=False reads the arrays in place: a change of the weights is seen
    down.mul_(2.0)
    assert_close(in_place.forward(x, form="per_token"), 2.0 * y, 4e-5, "in place after a change")
    assert_close(m.forward(x, form="per_token"), y, 2e-5, "packed copy keeps its weights")
