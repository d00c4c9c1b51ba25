"""backend.py: the one place that chooses NumPy or CuPy.

These run on whichever backend the process selected (MINISD_BACKEND); the CuPy-specific paths
(missing CuPy, CuPy without a GPU, the environment variable in subprocesses, moving models
across backends) are covered in test_gpu.py.
"""
from __future__ import annotations

import os
import sys
import types

import numpy as np
import pytest

from helpers import dev, host
from minisd import backend, layers, residual


def test_selected_backend_follows_the_environment():
    expected = os.environ.get("MINISD_BACKEND", "").strip().lower() or "numpy"
    assert backend.name() == expected
    assert backend.name() in backend.BACKENDS


def test_to_device_and_to_numpy_round_trip(rng):
    for dtype in ("float32", "float64", "int64", "bool"):
        a = (rng.standard_normal((2, 3)) > 0).astype(dtype) if dtype == "bool" else \
            rng.standard_normal((2, 3)).astype(dtype)
        d = backend.to_device(a)
        assert d.dtype == a.dtype and d.shape == a.shape
        back = backend.to_numpy(d)
        assert isinstance(back, np.ndarray)
        np.testing.assert_array_equal(back, a)


def test_to_device_casts_when_asked(rng):
    a = rng.standard_normal(4)
    d = backend.to_device(a, dtype="float32")
    assert d.dtype == np.float32
    np.testing.assert_allclose(host(d), a.astype(np.float32))
    with pytest.raises(ValueError, match="floating dtype"):
        backend.to_device(a, dtype="int8")
    with pytest.raises(ValueError, match="unknown backend"):
        backend.to_device(a, "tpu")


def test_array_module_owns_the_arrays():
    x = dev(np.ones(3))
    xp = backend.array_module(x)
    assert xp is backend.xp()
    assert xp.zeros(2).shape == (2,)
    if backend.name() != "cupy":
        assert not backend.is_device_array(x) and backend.backend_of(x) == "numpy"
    else:
        assert backend.is_device_array(x) and backend.backend_of(x) == "cupy"
        assert backend.array_module(np.ones(2)) is not xp  # host arrays are NumPy's


def test_use_rejects_unknown_names_and_keeps_the_current_backend():
    before = backend.name()
    with pytest.raises(ValueError, match="unknown backend 'jax'.*numpy"):
        backend.use("jax")
    assert backend.name() == before


def test_switching_to_numpy_and_back(rng):
    before = backend.name()
    xp = backend.use("numpy")  # the conftest fixture restores the backend after the test
    assert xp is np and backend.name() == "numpy"
    assert isinstance(layers.Linear(2, 3).params["weight"], np.ndarray)
    backend.use(before)
    assert backend.name() == before


def test_default_dtype():
    assert backend.default_dtype() == np.float32
    assert backend.resolve_dtype(None) == np.float32
    assert backend.resolve_dtype("float64") == np.float64
    backend.set_default_dtype("float64")
    assert backend.resolve_dtype(None) == np.float64
    for bad in ("int32", "bool", "complex64"):
        with pytest.raises(ValueError, match="floating dtype"):
            backend.resolve_dtype(bad)


def test_seed_makes_host_and_device_generators_reproducible():
    backend.seed(42)
    a = backend.host_rng().standard_normal(5)
    b = host(backend.device_rng().standard_normal(5))
    backend.seed(42)
    np.testing.assert_array_equal(backend.host_rng().standard_normal(5), a)
    np.testing.assert_array_equal(host(backend.device_rng().standard_normal(5)), b)
    backend.seed(43)
    assert not np.array_equal(backend.host_rng().standard_normal(5), a)


def test_same_seed_same_initial_weights():
    backend.seed(7)
    w1 = host(layers.Conv2d(2, 3, 3).params["weight"]).copy()
    backend.seed(7)
    w2 = host(layers.Conv2d(2, 3, 3).params["weight"])
    np.testing.assert_array_equal(w1, w2)
    w3 = host(layers.Conv2d(2, 3, 3).params["weight"])  # the stream moved on
    assert not np.array_equal(w1, w3)


def test_layers_are_created_on_the_current_backend():
    for module in (layers.Conv2d(1, 2, 3), layers.BatchNorm2d(2), layers.Linear(2, 2)):
        for _, value in module.state_dict().items():
            assert backend.backend_of(value) == ("cupy" if backend.name() == "cupy" else "numpy")


def test_seed_also_restarts_blocks_built_before_it():
    """A block built without its own generator draws its gates from the backend's: seeding again
    must repeat its gates, not leave it on a generator that seed() replaced."""
    block = residual.BasicBlock(2, 2, survival_prob=0.5, dtype="float64")
    x = dev(np.ones((2, 2, 3, 3)))

    def gates():
        return [(block(x), block.gate)[1] for _ in range(12)]

    backend.seed(5)
    first = gates()
    backend.seed(5)
    assert gates() == first
    assert len(set(first)) == 2  # the gates vary: the comparison means something


def test_synchronize_waits_for_the_gpu_and_touches_nothing_elsewhere(monkeypatch):
    if backend.name() == "cupy":
        cupy = backend.xp()
        a = cupy.ones((1024, 1024), dtype=cupy.float32)
        for _ in range(8):
            a = a @ a * cupy.float32(1e-3)
        backend.synchronize()
        assert cupy.cuda.get_current_stream().done  # everything queued has finished
        return
    touched = []

    def record(name):
        touched.append(name)
        raise AttributeError(name)

    loaded = types.ModuleType("cupy")  # as if CuPy were imported but not the backend in use
    loaded.__getattr__ = record
    monkeypatch.setitem(sys.modules, "cupy", loaded)
    assert backend.synchronize() is None
    assert touched == []  # on NumPy it never reaches into CuPy (no device, no CUDA call)


def test_backend_unavailable_is_a_runtime_error():
    assert issubclass(backend.BackendUnavailable, RuntimeError)
