# SPDX-License-Identifier: MIT
"""Zero copy (data pointers), error messages naming the argument, and calls from several
Python threads."""
import threading

import numpy as np
import pytest

import seqmix


def data(*shape, dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# --- zero copy ---------------------------------------------------------------------------------
def test_numpy_views_are_not_copied():
    qkv = data(1, 20, 3, 3, 16)  # a fused projection [B, T, 3, H, D]
    q = qkv[:, :, 0]  # strided: [B, T, H, D] with T stride 3*H*D
    addr, strides = seqmix._view_address(q)
    assert addr == q.ctypes.data
    assert strides == tuple(s // q.itemsize for s in q.strides)
    # and a kernel reading it gives the result of a contiguous copy
    k, v = qkv[:, :, 1], qkv[:, :, 2]
    o1, _ = seqmix.chunk_linear_attn(q, k, v, normalize=False)
    o2, _ = seqmix.chunk_linear_attn(*(np.ascontiguousarray(x) for x in (q, k, v)),
                                     normalize=False)
    np.testing.assert_array_equal(o1, o2)


def test_torch_tensors_are_not_copied():
    torch = pytest.importorskip("torch")
    x = torch.randn(2, 5, 4, 8)
    assert seqmix._view_address(x)[0] == x.data_ptr()
    xt = torch.randn(2, 4, 5, 8).transpose(1, 2)  # non-contiguous, last dim still contiguous
    addr, strides = seqmix._view_address(xt)
    assert addr == xt.data_ptr() and strides == xt.stride()
    xg = torch.randn(2, 5, 4, 8, requires_grad=True)  # detached, same storage
    assert seqmix._view_address(xg)[0] == xg.data_ptr()
    # outputs come back as tensors sharing the array the kernel wrote
    q = torch.randn(1, 9, 2, 8)
    o, s = seqmix.chunk_simple_gla(q, q, q, g=-torch.rand(1, 9, 2), output_final_state=True)
    assert isinstance(o, torch.Tensor) and isinstance(s, torch.Tensor)
    # a step updates a torch state in place
    st = torch.zeros(1, 2, 8, 8)
    ptr = st.data_ptr()
    seqmix.linear_attn_step(q[:, 0], q[:, 0], q[:, 0], st)
    assert st.data_ptr() == ptr and st.abs().sum() > 0


def test_step_out_and_state_in_place():
    q = data(2, 3, 8)
    s = np.zeros((2, 3, 8, 8), np.float32)
    out = np.empty((2, 3, 8), np.float32)
    r = seqmix.simple_gla_step(q, q, q, -np.ones((2, 3), np.float32), s, out=out)
    assert r is out
    assert s.any()
    np.testing.assert_allclose(out, np.einsum("bhk,bhkv->bhv", q * 8 ** -0.5, s), rtol=1e-5)


# --- errors ------------------------------------------------------------------------------------
def err(exc, match, f, *a, **kw):
    with pytest.raises(exc, match=match):
        f(*a, **kw)


def test_errors_name_the_argument():
    q = data(1, 10, 2, 8)
    g = -np.ones((1, 10, 2), np.float32)
    f = seqmix.chunk_simple_gla
    err(TypeError, r"chunk_simple_gla: argument 'v': expected float32, got float64", f, q, q,
        q.astype(np.float64), g)
    err(TypeError, r"argument 'q': expected float32 or float64, got int64", f,
        q.astype(np.int64), q, q, g)
    err(TypeError, r"argument 'k': expected a numpy.ndarray or a torch.Tensor, got list", f, q,
        q.tolist(), q, g)
    err(ValueError, r"argument 'k': expected 4 dimensions \[B, T, H, K\], got shape \(10, 2, 8\)",
        f, q, q[0], q, g)
    err(ValueError, r"argument 'k': expected shape \[B, T, H, K\] \(as q\) = \(1, 10, 2, 8\), "
        r"got \(1, 10, 2, 4\)", f, q, q[..., :4], q, g)
    err(ValueError, r"argument 'v': the last dimension must be contiguous", f, q, q,
        np.asfortranarray(q), g)
    err(ValueError, r"argument 'k': strides must be non-negative", f, q, q[:, ::-1], q, g)
    err(ValueError, r"argument 'initial_state': expected shape \[N, H, K, V\] = \(1, 2, 8, 8\)",
        f, q, q, q, g, initial_state=np.zeros((1, 2, 8, 4), np.float32))
    err(ValueError, r"argument 'cu_seqlens': packed variable-length input needs batch size B == 1",
        f, np.stack([q[0]] * 2), np.stack([q[0]] * 2), np.stack([q[0]] * 2),
        np.stack([g[0]] * 2), cu_seqlens=np.array([0, 10]))
    err(ValueError, r"give exactly one of g", f, q, q, q)
    err(ValueError, r"'g'.*(> 0|positive|log)", f, q, q, q, -g)  # alpha instead of log alpha
    ro = np.zeros((1, 2, 8, 8), np.float32)
    ro.setflags(write=False)
    err(ValueError, r"argument 'state': is written in place but the array is read-only",
        seqmix.linear_attn_step, q[:, 0], q[:, 0], q[:, 0], ro)
    err(ValueError, r"argument 'A': must be finite and < 0", seqmix.mamba_chunk_scan_combined,
        q, g, np.ones(2, np.float32), q, q)
    err(ValueError, r"argument 'dtype': expected 'float32' or 'float64'", seqmix.KVCache, 1, 2, 8,
        capacity=4, dtype="float16")


def test_torch_errors():
    torch = pytest.importorskip("torch")
    q = torch.randn(1, 6, 2, 8)
    g = -torch.ones(1, 6, 2)
    err(TypeError, r"argument 'q': expected torch.float32 or torch.float64, got torch.bfloat16",
        seqmix.chunk_simple_gla, q.bfloat16(), q, q, g)
    err(TypeError, r"argument 'k': tensor is on device meta; seqmix runs on the CPU", 
        seqmix.chunk_simple_gla, q, q.to("meta"), q, g)
    err(TypeError, r"argument 'g': expected torch.float32, got torch.float64",
        seqmix.chunk_simple_gla, q, q, q, g.double())


# --- threads -----------------------------------------------------------------------------------
def test_threads_give_the_serial_results():
    r = np.random.default_rng(3)
    jobs = []
    for i in range(6):
        q, k = r.standard_normal((2, 1, 300 + 17 * i, 4, 32)).astype(np.float32)
        v = r.standard_normal((1, 300 + 17 * i, 4, 32)).astype(np.float32)
        gk = -np.abs(r.standard_normal(q.shape)).astype(np.float32) * 0.1
        jobs.append((q, k, v, gk))
    want = [seqmix.chunk_gla(*j, output_final_state=True) for j in jobs]
    got = [None] * len(jobs)
    errors = []

    def work(i):
        try:
            for _ in range(5):
                got[i] = seqmix.chunk_gla(*jobs[i], output_final_state=True)
                a = seqmix.parallel_attn(jobs[i][0], jobs[i][1], jobs[i][2])
                assert np.array_equal(a, seqmix.parallel_attn(*jobs[i][:3]))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (o, s), (wo, ws) in zip(got, want):
        np.testing.assert_array_equal(o, wo)  # bitwise: results never depend on threads
        np.testing.assert_array_equal(s, ws)


def test_kernels_release_the_gil():
    # While one thread runs a long kernel, this thread keeps executing Python code: with the GIL
    # held for the call it could not run at all until the call returned.
    q = data(1, 6144, 4, 64, seed=5)
    done = threading.Event()
    ticks = 0

    def run():
        seqmix.parallel_attn(q, q, q)
        done.set()

    t = threading.Thread(target=run)
    t.start()
    while not done.is_set():
        ticks += 1
    t.join()
    assert ticks > 1000, ticks


def test_num_threads_setting_and_bitwise_results():
    q = data(1, 256, 4, 32, seed=9)
    g = -np.abs(data(1, 256, 4, seed=10))
    before = seqmix.get_num_threads()
    try:
        seqmix.set_num_threads(1)
        assert seqmix.get_num_threads() == 1
        one = seqmix.chunk_simple_gla(q, q, q, g, output_final_state=True)
        seqmix.set_num_threads(2)
        assert seqmix.get_num_threads() == (2 if seqmix.has_openmp else 1)
        two = seqmix.chunk_simple_gla(q, q, q, g, output_final_state=True)
        np.testing.assert_array_equal(one[0], two[0])
        np.testing.assert_array_equal(one[1], two[1])
        with pytest.raises(ValueError, match="set_num_threads"):
            seqmix.set_num_threads(-1)
    finally:
        seqmix.set_num_threads(0)
    assert seqmix.get_num_threads() == before
