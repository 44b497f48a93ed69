# SPDX-License-Identifier: MIT
"""Comparison helpers of the Python tests."""
import numpy as np


def to_np(x):
    if isinstance(x, np.ndarray):
        return x
    return x.detach().cpu().numpy()


def assert_close(got, want, rtol, what=""):
    """max |got - want| <= rtol * max(|want|, 1), with the worst index in the message."""
    got = np.asarray(to_np(got), dtype=np.float64)
    want = np.asarray(to_np(want), dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert np.all(np.isfinite(got)), f"{what}: non-finite values"
    err = np.abs(got - want)
    scale = max(float(np.max(np.abs(want))) if want.size else 0.0, 1.0)
    worst = np.unravel_index(int(np.argmax(err)), err.shape) if err.size else ()
    assert float(err.max(initial=0.0)) <= rtol * scale, (
        f"{what}: max abs error {err.max():.3e} at {worst} (got {got[worst]:.6g}, want "
        f"{want[worst]:.6g}) > {rtol:.1e} * {scale:.3g}")
