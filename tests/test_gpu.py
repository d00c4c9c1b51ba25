"""The backends end to end: selecting them, failing clearly, moving models, checkpoints across them.

Tests are parametrised over backends: ``numpy`` always, ``cupy-names`` (the CPU guard: NumPy arrays
behind CuPy's namespace) always, and ``cupy`` where a GPU is usable; the ``cupy`` cases carry the
``gpu`` marker and skip cleanly (with the backend's own one-line reason) everywhere else. The GPU
cases include float64 finite-difference checks on the device and a check that a training step
never synchronises with the host.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys
import types
import warnings

import numpy as np
import pytest

from minisd import backend, gradcheck, layers, models, residual
from minisd.training import train_step
from minisd.backend import BackendUnavailable

ROOT = pathlib.Path(__file__).resolve().parent.parent

BACKENDS = ["numpy", "cupy-names", pytest.param("cupy", marks=pytest.mark.gpu)]
GPU_ONLY = [pytest.param("cupy", marks=pytest.mark.gpu)]
NUMPY_AND_GPU = ["numpy", pytest.param("cupy", marks=pytest.mark.gpu)]

_cupy_unavailable: list = []  # the reason, once trying cupy failed (trying again costs an import)


def switch_to(name: str):
    """Select a backend for this test (conftest restores the process's own afterwards); skip with
    the backend's one-line reason when it cannot run here."""
    if name == "cupy" and _cupy_unavailable:
        pytest.skip(_cupy_unavailable[0])
    try:
        return backend.use(name)
    except BackendUnavailable as exc:
        _cupy_unavailable.append(str(exc))
        pytest.skip(str(exc))


def _env(**extra):
    env = dict(os.environ)
    env.pop("MINISD_BACKEND", None)
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _host_state(model):
    return {k: np.array(backend.to_numpy(v)) for k, v in model.state_dict().items()}


def _batch(rng, n=4, size=8, dtype="float32"):
    x = rng.standard_normal((n, 3, size, size)).astype(dtype)
    labels = (np.arange(n) % 10).astype(np.int64)
    return x, labels


def _train_step(model, x, labels):
    """Forward, loss, backward; returns the loss as a Python float (the one host copy)."""
    model.train()
    loss, _ = train_step(model, _on_model(model, x), _on_model(model, labels))
    return float(backend.to_numpy(loss))


def _device_of(model) -> str:
    return backend.backend_of(next(iter(model.state_dict().values())))


def _on_model(model, array):
    """``array`` moved to where ``model`` lives (the user's job: batches arrive on the model's device)."""
    return backend.to_device(array, _device_of(model))


# ------------------------------------------------------------------------------------------------
# Asking for CuPy where it cannot run: one clear line
# ------------------------------------------------------------------------------------------------


def test_cupy_not_installed_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` now raises ImportError
    before = backend.name()
    with pytest.raises(BackendUnavailable) as info:
        backend.use("cupy")
    message = str(info.value)
    assert "CuPy is not installed" in message
    assert 'pip install "minisd[gpu]"' in message
    assert "\n" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained traceback
    assert backend.name() == before  # a failed switch changes nothing
    with pytest.raises(BackendUnavailable, match=r'pip install "minisd\[gpu\]"'):
        backend.to_device(np.zeros(2), "cupy")


class _FakeCUDARuntimeError(RuntimeError):
    pass


def _fake_cupy_without_gpu():
    """A module that imports like CuPy on a machine without a GPU: the first allocation fails."""
    fake = types.ModuleType("cupy")
    fake.float32 = np.float32

    class ndarray:  # noqa: N801  (CuPy's class name)
        pass

    def zeros(*args, **kwargs):
        raise _FakeCUDARuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")

    fake.ndarray, fake.zeros = ndarray, zeros
    return fake


def test_cupy_installed_without_gpu_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy_without_gpu())
    before = backend.name()
    with pytest.raises(BackendUnavailable) as info:
        backend.use("cupy")
    message = str(info.value)
    assert message.startswith("CuPy is installed but no usable GPU was found")
    assert "cudaErrorNoDevice" in message
    assert "\n" not in message
    assert backend.name() == before  # a failed switch changes nothing


def test_real_cupy_here_is_usable_or_says_why():
    """With the CuPy this machine has: either it runs, or one line says why not."""
    if importlib.util.find_spec("cupy") is None:
        pytest.skip("CuPy is not installed here")
    try:
        module = backend.use("cupy")
    except BackendUnavailable as exc:
        assert str(exc).startswith("CuPy is installed but no usable GPU was found"), str(exc)
        assert "\n" not in str(exc)
        return
    assert backend.name() == "cupy" and module.__name__ == "cupy"


@pytest.mark.parametrize("name", ["numpy", "cupy-names"])
def test_minisd_backend_environment_variable_selects_the_backend(name):
    code = ("import numpy as np; from minisd import backend; "
            "print(backend.name(), type(backend.array_module(np.zeros(1))).__name__, "
            "backend.xp().zeros(2).shape)")
    run = subprocess.run([sys.executable, "-c", code], env=_env(MINISD_BACKEND=name),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[0] == name


def test_minisd_backend_unknown_name_fails_clearly_at_first_use():
    run = subprocess.run([sys.executable, "-c", "import minisd; minisd.backend.xp()"],
                         env=_env(MINISD_BACKEND="tpu"), capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "MINISD_BACKEND=tpu: backend.use: unknown backend 'tpu'" in run.stderr.strip().splitlines()[-1]


def test_minisd_backend_cupy_without_cupy_ends_with_the_install_hint():
    code = "import sys; sys.modules['cupy'] = None; import minisd; minisd.backend.name()"
    run = subprocess.run([sys.executable, "-c", code], env=_env(MINISD_BACKEND="cupy"),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("minisd.backend.BackendUnavailable: MINISD_BACKEND=cupy: CuPy is not installed")
    assert 'pip install "minisd[gpu]"' in last


def test_a_failed_minisd_backend_still_lets_minisd_import_and_an_explicit_choice_win():
    code = ("import sys; sys.modules['cupy'] = None; import minisd; from minisd import backend; "
            "backend.use('numpy'); print(backend.name())")
    run = subprocess.run([sys.executable, "-c", code], env=_env(MINISD_BACKEND="cupy"),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "numpy"


def test_cli_reports_a_failed_minisd_backend_in_one_line():
    code = "import sys; sys.modules['cupy'] = None; from minisd.cli import main; sys.exit(main(['train']))"
    run = subprocess.run([sys.executable, "-c", code], env=_env(MINISD_BACKEND="cupy"),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert "MINISD_BACKEND=cupy" in lines[0] and 'pip install "minisd[gpu]"' in lines[0]


def test_minisd_backend_cupy_with_the_cupy_here():
    if importlib.util.find_spec("cupy") is None:
        pytest.skip("CuPy is not installed here")
    code = "from minisd import backend; print(backend.name())"
    run = subprocess.run([sys.executable, "-c", code], env=_env(MINISD_BACKEND="cupy"),
                         capture_output=True, text=True, timeout=120)
    if run.returncode == 0:
        assert run.stdout.strip() == "cupy"
    else:
        assert "CuPy is installed but no usable GPU was found" in run.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------------
# Moving models between backends
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", BACKENDS)
def test_model_to_backend_and_back_round_trips(target):
    backend.use("numpy")
    model = models.resnet_cifar(depth=8, seed=3)
    x, labels = _batch(np.random.default_rng(0))
    _train_step(model, x, labels)  # non-trivial buffers and gradients
    state = _host_state(model)
    grads = {k: np.array(g) for k, g in model.named_grads()}
    model.eval()
    expected = np.array(model(x))

    switch_to(target)
    assert model.to(target) is model
    where = "cupy" if target == "cupy" else "numpy"
    for m in model.modules():
        for store in (m.params, m.grads, m.buffers):
            for value in store.values():
                assert backend.backend_of(value) == where
                assert value.dtype == np.float32
    got = backend.to_numpy(model(_on_model(model, x)))
    if target == "cupy":
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    else:
        np.testing.assert_array_equal(got, expected)

    model.to("numpy")
    for key, value in model.state_dict().items():
        assert isinstance(value, np.ndarray)
        np.testing.assert_array_equal(value, state[key])  # bit for bit
    for key, g in model.named_grads():
        np.testing.assert_array_equal(g, grads[key])


@pytest.mark.parametrize("target", BACKENDS)
def test_model_to_backend_and_dtype_together(target):
    backend.use("numpy")
    block = residual.BasicBlock(4, 8, stride=2)
    switch_to(target)
    block.to(target, dtype="float64")
    assert all(v.dtype == np.float64 for v in block.state_dict().values())
    block.to("numpy", dtype="float32")
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in block.state_dict().values())


# ------------------------------------------------------------------------------------------------
# Checkpoints saved on one backend load on another
# ------------------------------------------------------------------------------------------------


def _save_npz(model, path):
    """The checkpoint format: host arrays under dotted names in an .npz (no pickles)."""
    np.savez(path, **_host_state(model))


def _load_npz(model, path):
    with np.load(path, allow_pickle=False) as data:
        model.load_state_dict({k: data[k] for k in data.files})


@pytest.mark.parametrize("source, target", [
    ("numpy", "cupy-names"),
    ("cupy-names", "numpy"),
    pytest.param("numpy", "cupy", marks=pytest.mark.gpu),
    pytest.param("cupy", "numpy", marks=pytest.mark.gpu),
])
def test_checkpoint_saved_on_one_backend_loads_on_the_other(tmp_path, source, target):
    x, labels = _batch(np.random.default_rng(1))
    switch_to(source)
    trained = models.resnet_cifar(depth=8, seed=5)
    _train_step(trained, _on_model(trained, x), labels)
    trained.eval()
    expected = backend.to_numpy(trained(_on_model(trained, x)))
    path = tmp_path / "ckpt.npz"
    _save_npz(trained, path)

    switch_to(target)
    fresh = models.resnet_cifar(depth=8, seed=99)  # other weights, created on the target backend
    assert _device_of(fresh) == ("cupy" if target == "cupy" else "numpy")
    _load_npz(fresh, path)
    assert _device_of(fresh) == ("cupy" if target == "cupy" else "numpy")  # loading keeps the device
    fresh.eval()
    got = backend.to_numpy(fresh(_on_model(fresh, x)))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("source, target", [("numpy", "cupy-names"), pytest.param("cupy", "numpy", marks=pytest.mark.gpu),
                                            pytest.param("numpy", "cupy", marks=pytest.mark.gpu)])
def test_state_dict_arrays_load_directly_across_backends(source, target):
    """load_state_dict accepts arrays from either library and copies them to where the module lives."""
    switch_to(source)
    a = models.resnet_cifar(depth=8, seed=1)
    switch_to(target)
    b = models.resnet_cifar(depth=8, seed=2)
    b.load_state_dict(a.state_dict())
    for key, value in b.state_dict().items():
        assert backend.backend_of(value) == ("cupy" if target == "cupy" else "numpy")
        np.testing.assert_array_equal(backend.to_numpy(value), backend.to_numpy(a.state_dict()[key]))


# ------------------------------------------------------------------------------------------------
# The same numbers on every backend
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", BACKENDS)
def test_same_seed_same_gates_and_weights_on_every_backend(target):
    def run():
        model = models.resnet_cifar(depth=20, seed=7, final_survival=0.5)
        x, labels = _batch(np.random.default_rng(2))
        gates = []
        for _ in range(4):
            _train_step(model, _on_model(model, x), labels)
            gates.append(model.gates())
        return gates, backend.to_numpy(model.conv1.params["weight"])

    backend.use("numpy")
    reference_gates, reference_weight = run()
    switch_to(target)
    gates, weight = run()
    assert gates == reference_gates
    np.testing.assert_array_equal(weight, reference_weight)
    assert any(not g for step in gates for g in step)  # some blocks were really dropped


@pytest.mark.parametrize("target", GPU_ONLY)
def test_float64_forward_and_gradients_match_numpy(target):
    x, labels = _batch(np.random.default_rng(3), dtype="float64")
    gates = [True, False, True, True, False, True, True, True, False]

    def grads_on(name):
        switch_to(name)
        model = models.resnet_cifar(depth=20, seed=11, dtype="float64")
        model.force_gates(gates)
        loss = _train_step(model, _on_model(model, x), labels)
        return loss, {k: backend.to_numpy(g) for k, g in model.named_grads()}

    loss_ref, grads_ref = grads_on("numpy")
    loss, grads = grads_on(target)
    assert abs(loss - loss_ref) < 1e-10
    for key in grads_ref:
        np.testing.assert_allclose(grads[key], grads_ref[key], rtol=1e-8, atol=1e-11, err_msg=key)


# ------------------------------------------------------------------------------------------------
# Finite differences in float64 on each backend (on the GPU where one is usable)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", NUMPY_AND_GPU)
@pytest.mark.parametrize("make", [
    lambda: layers.Conv2d(3, 4, 3, stride=2, padding=1, dtype="float64"),
    lambda: layers.Conv2d(3, 2, (1, 3), stride=(1, 2), padding=(0, 1), dtype="float64"),
    lambda: layers.BatchNorm2d(3, dtype="float64"),
    lambda: residual.BasicBlock(3, 6, stride=2, dtype="float64"),
], ids=["conv3x3s2", "conv1x3", "batchnorm", "transition-block"])
def test_float64_finite_differences(target, make):
    switch_to(target)
    module = make()
    x = backend.to_device(np.random.default_rng(4).standard_normal((3, 3, 6, 6)), dtype="float64")
    result = gradcheck.check_module(module, x, max_entries=25)
    assert result.passed, result.report()


@pytest.mark.parametrize("target", NUMPY_AND_GPU)
@pytest.mark.parametrize("gate", [True, False])
def test_float64_directional_check_of_a_network_with_dropped_blocks(target, gate):
    switch_to(target)
    model = models.resnet_cifar(depth=20, seed=0, dtype="float64")
    model.force_gates([gate, not gate, True] * 3)
    x = backend.to_device(np.random.default_rng(5).standard_normal((4, 3, 8, 8)), dtype="float64")
    result = gradcheck.directional_check(model, x)
    assert result.passed, result.report()


# ------------------------------------------------------------------------------------------------
# No silent host round trips inside the layers (GPU only: CuPy can detect synchronisation)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", GPU_ONLY)
def test_training_step_never_synchronises_with_the_host(target):
    switch_to(target)
    cupyx = pytest.importorskip("cupyx")
    if not hasattr(cupyx, "allow_synchronize"):
        pytest.skip("this CuPy has no cupyx.allow_synchronize")
    model = models.resnet_cifar(depth=20, seed=0, final_survival=0.5)
    x, labels = _batch(np.random.default_rng(6), n=8, size=16)
    x, labels = _on_model(model, x), _on_model(model, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # allow_synchronize is deprecated (it may miss some syncs)
        with cupyx.allow_synchronize(False):
            for _ in range(2):  # gates are drawn on the host: no device round trip decides a branch
                loss, _ = train_step(model, x, labels)
    assert np.isfinite(float(backend.to_numpy(loss)))  # the one host copy, outside the layers
