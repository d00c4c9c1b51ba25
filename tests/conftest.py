"""Test configuration shared by every test module.

Each test starts from the same backend state: seed 0, default dtype float32. The backend itself
(numpy, cupy-names or cupy) is whatever the process selected, usually through MINISD_BACKEND, so
one suite runs on every backend.
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # `import helpers` from any working directory

from minisd import backend, kernels  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_backend_state():
    """Reseed the backend and restore its default dtype and kernel tier around every test (tests
    may change all three)."""
    saved_dtype = backend.default_dtype()
    saved_name = backend.name()
    saved_tier = kernels.active()
    backend.seed(0)
    yield
    backend.set_default_dtype(saved_dtype)
    if backend.name() != saved_name:
        backend.use(saved_name)
    kernels.use(saved_tier)
    backend.seed(0)


@pytest.fixture
def reference_tier():
    """Run the test on the reference kernels: the textbook math that gradient checks verify."""
    with kernels.use("reference"):
        yield


@pytest.fixture
def rng():
    """A host generator for test data, the same in every test."""
    import numpy as np

    return np.random.default_rng(1234)
