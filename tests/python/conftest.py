# SPDX-License-Identifier: MIT
# pytest setup for seqmix's Python binding: where the golden files are, and the imports.
# Run by CTest (label `python`) with PYTHONPATH=<build>/python; by hand:
#   PYTHONPATH=build/dev/python /usr/bin/python3 -m pytest tests/python
import os
import pathlib

import pytest

GOLDEN = pathlib.Path(
    os.environ.get("SEQMIX_GOLDEN_DIR", pathlib.Path(__file__).resolve().parents[1] / "golden"))


@pytest.fixture(scope="session")
def golden():
    """golden(name) -> {tensor name: np.ndarray} of tests/golden/<name>.safetensors; a missing
    file FAILS (never skips)."""
    import seqmix
    cache = {}

    def load(name):
        if name not in cache:
            path = GOLDEN / f"{name}.safetensors"
            assert path.exists(), f"golden file missing: {path} (vendored in tests/golden)"
            cache[name] = seqmix.load_safetensors(str(path))
        return cache[name]

    return load


def pytest_sessionstart(session):
    """SEQMIX_POISON_OUTPUTS=1: every uninitialised output is NaN-filled before the kernel runs
    (seqmix._set_output_poison), so a kernel that reads o before writing it fails its test."""
    if os.environ.get("SEQMIX_POISON_OUTPUTS") == "1":
        import seqmix
        seqmix._set_output_poison(True)
