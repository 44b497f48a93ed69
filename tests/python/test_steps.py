# SPDX-License-Identifier: MIT
"""One-token steps of Mamba2, RWKV-6, RWKV-7 and KDA against their sequence forms: a chunked
prefill of the first P tokens, then T - P steps from its final state, equal one call over all T
tokens (outputs and final state); NumPy and torch inputs, out= and in-place states. Run with
uninitialised outputs poisoned (NaN), so a kernel that reads o before writing it fails here."""
import numpy as np
import pytest

import seqmix
from helpers import assert_close

pytestmark = pytest.mark.skipif(not hasattr(seqmix, "kda_step"),
                                reason="extension built without the wave-2 steps")

B, T, P_ = 2, 23, 9  # batch, tokens, prefill length (the steps run tokens P_ .. T-1)
RTOL = {np.float32: 2e-5, np.float64: 1e-11}
DTYPES = [np.float32, np.float64]


@pytest.fixture(autouse=True)
def poisoned_outputs():
    was = seqmix._set_output_poison(True)
    yield
    seqmix._set_output_poison(was)


def rng(seed):
    return np.random.default_rng(seed)


def logsigmoid(x):
    return -np.logaddexp(0, -x)


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def as_kind(kind, arrays):
    if kind == "numpy":
        return arrays
    torch = pytest.importorskip("torch")
    return {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in arrays.items()}


def steps(step, xs, state, n_tokens, dtype, out_shape, kind):
    """Runs step(t, state, out) for t in P_..n_tokens-1, returns o stacked on axis 1."""
    outs = []
    out = np.empty(out_shape, dtype)
    if kind == "torch":
        import torch
        out = torch.from_numpy(out)
    for t in range(P_, n_tokens):
        r = step(t, state, out if t % 2 else None)  # with and without out=
        if t % 2:
            assert r is out
        outs.append(np.array(r))
    return np.stack(outs, axis=1)


# --- RWKV-6 ------------------------------------------------------------------------------------
def rwkv6_inputs(dtype, H=3, K=16, V=8, seed=0):
    r = rng(seed)
    x = {n: r.standard_normal((B, T, H, K)) for n in ("r", "k")}
    x["v"] = r.standard_normal((B, T, H, V))
    x["w"] = logsigmoid(r.standard_normal((B, T, H, K)) + 2.0)
    x["u"] = r.standard_normal((H, K)) * 0.5
    return {n: a.astype(dtype) for n, a in x.items()}


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_rwkv6_step(dtype, kind):
    x = as_kind(kind, rwkv6_inputs(dtype))
    o_all, s_all = seqmix.chunk_rwkv6(x["r"], x["k"], x["v"], x["w"], x["u"],
                                      output_final_state=True)
    _, s = seqmix.chunk_rwkv6(*(x[n][:, :P_] for n in "rkvw"), x["u"], output_final_state=True)

    def step(t, state, out):
        return seqmix.rwkv6_step(*(x[n][:, t] for n in "rkvw"), x["u"], state, out=out)
    o = steps(step, x, s, T, dtype, tuple(x["v"].shape[:1]) + tuple(x["v"].shape[2:]), kind)
    assert_close(o, np.asarray(o_all)[:, P_:], RTOL[dtype], "rwkv6 steps o")
    assert_close(s, s_all, RTOL[dtype], "rwkv6 steps state")
    # the recurrent form gives the same
    o_rec, _ = seqmix.fused_recurrent_rwkv6(x["r"], x["k"], x["v"], x["w"], x["u"])
    assert_close(o_rec, o_all, RTOL[dtype], "rwkv6 recurrent")


# --- RWKV-7 ------------------------------------------------------------------------------------
def rwkv7_inputs(dtype, H=2, K=16, V=12, seed=1):
    r = rng(seed)
    x = {n: r.standard_normal((B, T, H, K)) for n in ("r", "k")}
    x["v"] = r.standard_normal((B, T, H, V))
    x["w"] = -0.6 / (1 + np.exp(-r.standard_normal((B, T, H, K))))  # fla's rwkv7 gate range
    kk = unit(r.standard_normal((B, T, H, K)))
    x["a"] = -kk
    x["b"] = kk / (1 + np.exp(-r.standard_normal((B, T, H, K))))
    return {n: a.astype(dtype) for n, a in x.items()}


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_rwkv7_step(dtype, kind):
    x = as_kind(kind, rwkv7_inputs(dtype))
    names = ["r", "w", "k", "v", "a", "b"]
    o_all, s_all = seqmix.chunk_rwkv7(*(x[n] for n in names))
    _, s = seqmix.chunk_rwkv7(*(x[n][:, :P_] for n in names))

    def step(t, state, out):
        return seqmix.rwkv7_step(*(x[n][:, t] for n in names), state, out=out)
    o = steps(step, x, s, T, dtype, (B,) + tuple(x["v"].shape[2:]), kind)
    assert_close(o, np.asarray(o_all)[:, P_:], RTOL[dtype], "rwkv7 steps o")
    assert_close(s, s_all, RTOL[dtype], "rwkv7 steps state")


# --- KDA ---------------------------------------------------------------------------------------
def kda_inputs(dtype, H=2, HV=4, K=16, V=8, seed=2):
    r = rng(seed)
    x = {"q": r.standard_normal((B, T, H, K)), "k": unit(r.standard_normal((B, T, H, K)))}
    x["v"] = r.standard_normal((B, T, HV, V))
    x["g"] = logsigmoid(r.standard_normal((B, T, HV, K)) + 1.0)
    x["beta"] = 1 / (1 + np.exp(-r.standard_normal((B, T, HV))))
    return {n: a.astype(dtype) for n, a in x.items()}


@pytest.mark.parametrize("l2norm", [False, True], ids=["plain", "l2norm"])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_kda_step(dtype, kind, l2norm):
    x = as_kind(kind, kda_inputs(dtype))
    names = ["q", "k", "v", "g", "beta"]
    kw = dict(use_qk_l2norm_in_kernel=l2norm)
    o_all, s_all = seqmix.chunk_kda(*(x[n] for n in names), output_final_state=True, **kw)
    _, s = seqmix.chunk_kda(*(x[n][:, :P_] for n in names), output_final_state=True, **kw)

    def step(t, state, out):
        return seqmix.kda_step(*(x[n][:, t] for n in names), state, out=out, **kw)
    o = steps(step, x, s, T, dtype, (B,) + tuple(x["v"].shape[2:]), kind)
    assert_close(o, np.asarray(o_all)[:, P_:], RTOL[dtype], "kda steps o")
    assert_close(s, s_all, RTOL[dtype], "kda steps state")


# --- Mamba2 ------------------------------------------------------------------------------------
def mamba_inputs(dtype, H=4, G=2, Pd=8, N=16, seed=3):
    r = rng(seed)
    x = {"x": r.standard_normal((B, T, H, Pd)), "dt": r.standard_normal((B, T, H)) - 1.0,
         "A": -np.exp(r.standard_normal(H) * 0.5), "B": r.standard_normal((B, T, G, N)),
         "C": r.standard_normal((B, T, G, N)), "D": r.standard_normal(H),
         "z": r.standard_normal((B, T, H, Pd)), "dt_bias": r.standard_normal(H) * 0.1}
    return {n: a.astype(dtype) for n, a in x.items()}


@pytest.mark.parametrize("layout", ["contiguous", "in_place"])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_mamba2_step(dtype, kind, layout):
    x = as_kind(kind, mamba_inputs(dtype))
    kw = dict(D=x["D"], dt_bias=x["dt_bias"], dt_softplus=True, dt_limit=(0.001, 3.0))
    seq = lambda t0, t1, **k: seqmix.mamba_chunk_scan_combined(  # noqa: E731
        *(x[n][:, t0:t1] for n in ("x", "dt")), x["A"], x["B"][:, t0:t1], x["C"][:, t0:t1],
        chunk_size=8, z=x["z"][:, t0:t1], return_final_states=True, **kw, **k)
    y_all, s_all = seq(0, T)
    _, s = seq(0, P_)  # [B, H, P, N], C-contiguous: the step's transposing path
    if layout == "in_place":  # P axis contiguous: the step works on it in place
        sn = np.ascontiguousarray(np.swapaxes(np.asarray(s), -1, -2))
        s = np.swapaxes(sn, -1, -2)
        if kind == "torch":
            import torch
            s = torch.from_numpy(sn).transpose(-1, -2)
        addr = seqmix._view_address(sn)[0]

    def step(t, state, out):
        return seqmix.mamba2_step(x["x"][:, t], x["dt"][:, t], x["A"], x["B"][:, t],
                                  x["C"][:, t], state, z=x["z"][:, t], out=out, **kw)
    y = steps(step, x, s, T, dtype, (B,) + tuple(x["x"].shape[2:]), kind)
    assert_close(y, np.asarray(y_all)[:, P_:], RTOL[dtype], "mamba2 steps y")
    assert_close(s, s_all, RTOL[dtype], "mamba2 steps state")
    if layout == "in_place":
        assert seqmix._view_address(sn)[0] == addr
        assert_close(np.swapaxes(sn, -1, -2), s_all, RTOL[dtype], "mamba2 in-place state")
    # and the recurrent form over all tokens
    y_rec, s_rec = seqmix.mamba_recurrent_scan(x["x"], x["dt"], x["A"], x["B"], x["C"],
                                               z=x["z"], return_final_states=True, **kw)
    assert_close(y_rec, y_all, RTOL[dtype], "mamba2 recurrent")


def test_step_errors_name_the_argument():
    x = rwkv6_inputs(np.float32)
    s = np.zeros((B, 3, 16, 8), np.float32)
    args = [x[n][:, 0] for n in "rkvw"]
    with pytest.raises(ValueError, match=r"seqmix.rwkv6_step: argument 'w': expected shape"):
        seqmix.rwkv6_step(*args[:3], args[3][..., :8], x["u"], s)
    with pytest.raises(TypeError, match=r"rwkv6_step: argument 'u': expected float32"):
        seqmix.rwkv6_step(*args, x["u"].astype(np.float64), s)
    m = mamba_inputs(np.float32)
    st = np.zeros((B, 4, 8, 16), np.float32)
    margs = (m["x"][:, 0], m["dt"][:, 0], m["A"], m["B"][:, 0], m["C"][:, 0])
    with pytest.raises(ValueError, match=r"mamba2_step: argument 'state': expected shape "
                                         r"\[B, H, P, N\] = \(2, 4, 8, 16\), got \(2, 4, 16, 8\)"):
        seqmix.mamba2_step(*margs, np.zeros((B, 4, 16, 8), np.float32))
    with pytest.raises(ValueError, match=r"mamba2_step: argument 'A': must be finite and < 0"):
        seqmix.mamba2_step(margs[0], margs[1], -m["A"], *margs[3:], st)
    ro = st.copy()
    ro.setflags(write=False)
    with pytest.raises(ValueError, match=r"argument 'state': is written in place"):
        seqmix.mamba2_step(*margs, ro)
    k = kda_inputs(np.float32)
    with pytest.raises(TypeError, match=r"kda_step: argument 'beta': expected a numpy.ndarray"):
        seqmix.kda_step(*(k[n][:, 0] for n in "qkvg"), [1.0], np.zeros((B, 4, 16, 8), np.float32))


def test_torch_fast_path_same_results_and_errors():
    torch = pytest.importorskip("torch")
    x = {n: torch.from_numpy(a) for n, a in rwkv6_inputs(np.float32).items()}
    args = [x[n][:, 0] for n in "rkvw"]
    res = []
    for fast in (True, False):
        was = seqmix._set_torch_fast_path(fast)
        try:
            s = torch.zeros(B, 3, 16, 8)
            res.append((seqmix.rwkv6_step(*args, x["u"], s).clone(), s))
            # the errors name the argument on both paths
            with pytest.raises(TypeError, match=r"argument 'k': expected torch.float32, got "
                                                r"torch.float64"):
                seqmix.rwkv6_step(args[0], args[1].double(), *args[2:], x["u"], s)
            with pytest.raises(TypeError, match=r"argument 'v': tensor is on device meta"):
                seqmix.rwkv6_step(*args[:2], args[2].to("meta"), args[3], x["u"], s)
            with pytest.raises(ValueError, match=r"argument 'state': the last dimension must be "
                                                 r"contiguous"):
                seqmix.rwkv6_step(*args, x["u"], s.transpose(-1, -2))
            with pytest.raises(ValueError, match=r"argument 'q'|argument 'r': expected 3 "
                                                 r"dimensions"):
                seqmix.rwkv6_step(x["r"], *args[1:], x["u"], s)
        finally:
            seqmix._set_torch_fast_path(was)
    assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])
    # zero copy on the fast path, with grad and through non-contiguous views
    xg = torch.randn(2, 5, 4, 8, requires_grad=True)
    assert seqmix._view_address(xg)[0] == xg.data_ptr()
    xt = torch.randn(2, 4, 5, 8).transpose(1, 2)
    assert seqmix._view_address(xt) == (xt.data_ptr(), xt.stride())
    xs = torch.randn(3, 40)[1:, 8:24].reshape(2, 1, 1, 16)  # storage offset
    assert seqmix._view_address(xs)[0] == xs.data_ptr()
