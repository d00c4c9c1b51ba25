"""The CPU guard for the GPU promise: the "cupy-names" backend offers exactly CuPy's names.

* the guard forwards CuPy's names to NumPy and refuses every other one with a clear error;
* it catches planted NumPy-only calls: in a function, inside a real layer's forward, in a device
  generator, and in a whole pytest run under MINISD_BACKEND=cupy-names (which must fail);
* the layer, block, model and gradient-check test files pass under MINISD_BACKEND=cupy-names
  (one subprocess pytest run, so CI exercises the guard on every push);
* a static scan of minisd's source for ndarray attributes NumPy has and CuPy lacks (the guard hands
  out NumPy arrays, so it cannot intercept methods called on them);
* the recorded names match the installed CuPy, when one is installed.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from minisd import _cupy_namespace as names
from minisd import backend, layers, residual

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "minisd"

# The test files that must pass under the guard (issue 7: layers, blocks, models, gradient checks),
# plus the optimizer, data and trace tests, whose code also runs on the device arrays.
GUARDED_TEST_FILES = (
    "test_functional.py",
    "test_layers.py",
    "test_residual.py",
    "test_models.py",
    "test_gradcheck.py",
    "test_optim.py",
    "test_data.py",
    "test_trace.py",
)


@pytest.fixture
def guard():
    """Switch this process to the cupy-names backend for one test (conftest restores the backend)."""
    return backend.use("cupy-names")


def _env(backend_name):
    env = dict(os.environ)
    env["MINISD_BACKEND"] = backend_name
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


# ------------------------------------------------------------------------------------------------
# The guard itself
# ------------------------------------------------------------------------------------------------


def test_recorded_names_are_plausible():
    assert names.CUPY_VERSION
    for name in ("zeros", "empty", "maximum", "exp", "log", "arange", "ascontiguousarray", "float32", "ndarray"):
        assert name in names.TOPLEVEL, name
    for name in ("errstate", "geomspace", "nditer", "matrix", "insert"):
        assert name not in names.TOPLEVEL, name
    assert {"standard_normal", "random", "integers", "uniform"} <= names.GENERATOR_METHODS
    assert not {"choice", "permutation", "shuffle", "normal"} & names.GENERATOR_METHODS
    assert {"c_contiguous", "f_contiguous"} <= names.FLAGS_ATTRIBUTES


def test_guard_is_the_array_module_for_host_arrays(guard):
    assert backend.name() == "cupy-names"
    assert backend.xp() is guard
    assert backend.array_module(np.zeros(3)) is guard
    assert names.cupy_names_module() is guard  # one shared instance


def test_guard_forwards_cupy_names_to_numpy(guard):
    assert guard.zeros is np.zeros
    assert guard.float32 is np.float32
    assert guard.random.randn is np.random.randn
    assert guard.linalg.norm is np.linalg.norm
    assert guard.lib.stride_tricks.as_strided is np.lib.stride_tricks.as_strided
    assert "zeros" in dir(guard) and "errstate" not in dir(guard)
    x = guard.maximum(guard.arange(-2, 3), 0)
    assert isinstance(x, np.ndarray) and x.tolist() == [0, 0, 0, 1, 2]


@pytest.mark.parametrize("path, expected", [
    ("errstate", "numpy.errstate"),
    ("geomspace", "numpy.geomspace"),
    ("linalg.multi_dot", "numpy.linalg.multi_dot"),
    ("random.SeedSequence", "numpy.random.SeedSequence"),
    ("lib.format", "numpy.lib.format"),
])
def test_guard_refuses_names_cupy_lacks(guard, path, expected):
    obj = guard
    *parents, last = path.split(".")
    for part in parents:
        obj = getattr(obj, part)
    with pytest.raises(AttributeError) as info:
        getattr(obj, last)
    assert isinstance(info.value, names.NotInCupy)
    message = str(info.value)
    assert expected in message and "CuPy lacks it" in message and names.CUPY_VERSION in message
    assert "\n" not in message
    assert not hasattr(obj, last)  # hasattr-based feature tests see CuPy's answer


def test_guard_refuses_cupy_only_names(guard):
    with pytest.raises(names.NotInNumpy, match=r"cupy\.asnumpy exists in CuPy but not in NumPy"):
        guard.asnumpy  # noqa: B018


def test_guard_generator_offers_only_cupys_methods(guard):
    gen = guard.random.default_rng(0)
    assert gen.standard_normal((2, 3)).shape == (2, 3)
    assert gen.integers(0, 10, size=4).shape == (4,)
    for missing in ("permutation", "choice", "shuffle", "normal", "bit_generator"):
        with pytest.raises(names.NotInCupy, match=rf"numpy\.random\.Generator\.{missing} .*CuPy lacks it"):
            getattr(gen, missing)
    # The backend's device generator is the guarded one under cupy-names.
    with pytest.raises(names.NotInCupy):
        backend.device_rng().permutation(5)


# ------------------------------------------------------------------------------------------------
# Planted NumPy-only calls are caught
# ------------------------------------------------------------------------------------------------


def _clipped_log(x):
    """A planted NumPy-only call: numpy.errstate does not exist in CuPy."""
    xp = backend.array_module(x)
    with xp.errstate(divide="ignore"):
        return xp.log(x)


def test_planted_numpy_only_function_runs_on_numpy_and_fails_under_the_guard():
    x = np.array([0.0, 1.0, 2.0])
    backend.use("numpy")
    assert np.isneginf(_clipped_log(x)[0])  # fine on NumPy ...
    backend.use("cupy-names")
    with pytest.raises(names.NotInCupy, match=r"numpy\.errstate is not offered by CuPy"):
        _clipped_log(x)  # ... and caught on the CPU, as the GPU would


def test_planted_numpy_only_call_inside_a_real_block_is_caught(guard, monkeypatch):
    """A NumPy-only name slipped into relu_forward fails the residual block's forward under the guard."""
    from minisd import kernels

    def relu_forward_numpy_only(x):
        xp = backend.array_module(x)
        mask = x > 0
        return xp.where(mask, x, xp.zeros_like(x)) + xp.spacing(0) * 0, mask  # numpy.spacing: not in CuPy

    monkeypatch.setattr(kernels.current(), "relu_forward", relu_forward_numpy_only)
    block = residual.BasicBlock(4, 4)
    x = backend.to_device(np.random.default_rng(0).standard_normal((2, 4, 5, 5)).astype(np.float32))
    with pytest.raises(names.NotInCupy, match=r"numpy\.spacing"):
        block(x)


def test_planted_numpy_only_generator_method_is_caught(guard):
    """Shuffling a batch with Generator.permutation works on NumPy, not on CuPy's generator."""
    def shuffled(batch):
        order = backend.device_rng().permutation(batch.shape[0])
        return batch[order]

    with pytest.raises(names.NotInCupy, match=r"Generator\.permutation"):
        shuffled(np.arange(6))


PLANTED_TEST = '''
import numpy as np
from minisd import backend

def test_uses_a_numpy_only_name():
    xp = backend.array_module(np.ones(3))
    assert xp.nanquantile(np.ones(3), 0.5) == 1.0
'''


def test_pytest_run_under_the_guard_fails_on_a_planted_call(tmp_path):
    """End to end, as CI runs it: the same test file passes on numpy and fails under cupy-names."""
    path = tmp_path / "test_planted.py"
    path.write_text(textwrap.dedent(PLANTED_TEST))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path)]
    ok = subprocess.run(cmd, env=_env("numpy"), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    caught = subprocess.run(cmd, env=_env("cupy-names"), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert caught.returncode == 1, caught.stdout + caught.stderr
    assert "NotInCupy" in caught.stdout and "numpy.nanquantile is not offered by CuPy" in caught.stdout


# ------------------------------------------------------------------------------------------------
# The real test files under the guard
# ------------------------------------------------------------------------------------------------


def test_layer_block_model_and_gradcheck_tests_pass_under_the_guard():
    """Runs the portable test files with MINISD_BACKEND=cupy-names in a subprocess (CI has no GPU)."""
    if backend.name() != "numpy":
        pytest.skip(f"this process already runs on {backend.name()}: the suite itself is the check")
    files = [str(ROOT / "tests" / f) for f in GUARDED_TEST_FILES if (ROOT / "tests" / f).exists()]
    if not files:
        pytest.skip("none of the guarded test files exist yet")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not gpu", *files]
    run = subprocess.run(cmd, env=_env("cupy-names"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    tail = (run.stdout + run.stderr)[-6000:]
    assert run.returncode == 0, f"tests failed under MINISD_BACKEND=cupy-names:\n{tail}"
    assert " passed" in run.stdout, tail


# ------------------------------------------------------------------------------------------------
# What the guard cannot see: ndarray attributes, scanned in the source
# ------------------------------------------------------------------------------------------------


def _numpy_only_uses(source: str, filename: str) -> list[str]:
    """Lines of ``source`` that use an ndarray attribute or flag NumPy has and CuPy lacks, or ``@=``."""
    method_names = {n for n in names.numpy_only_ndarray_attributes() if not n.startswith("__")}
    flag_names = names.numpy_only_flags_attributes()
    found = []
    tree = ast.parse(source, filename)
    # Attributes of imported modules (backend.to_device) are not array attributes.
    modules = {alias.asname or alias.name.split(".")[0]
               for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
               for alias in node.names}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id in modules:
                continue
            if node.attr in method_names:
                found.append(f"{filename}:{node.lineno}: .{node.attr}")
            elif (node.attr in flag_names and isinstance(node.value, ast.Attribute)
                  and node.value.attr == "flags"):
                found.append(f"{filename}:{node.lineno}: .flags.{node.attr}")
        elif isinstance(node, ast.AugAssign) and isinstance(node.op, ast.MatMult):
            found.append(f"{filename}:{node.lineno}: @= (cupy.ndarray has no in-place matmul)")
    return found


def test_scan_catches_planted_ndarray_attributes():
    planted = "from minisd import backend\nbackend.to_device(1)\ndef f(x, w):\n    x.resize(3)\n    x.flags.writeable = False\n    x @= w\n    return x.ctypes\n"
    found = _numpy_only_uses(planted, "planted.py")
    assert len(found) == 4, found


def test_minisd_source_uses_no_numpy_only_ndarray_attributes():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "_cupy_namespace.py":
            continue
        found += _numpy_only_uses(path.read_text(), str(path.relative_to(ROOT)))
    assert not found, "ndarray attributes CuPy lacks:\n" + "\n".join(found)


# ------------------------------------------------------------------------------------------------
# The recorded names match the installed CuPy
# ------------------------------------------------------------------------------------------------


def test_recorded_names_match_installed_cupy():
    if importlib.util.find_spec("cupy") is None:
        pytest.skip('CuPy is not installed (pip install "minisd[gpu]"); the recorded names are used as they are')
    from importlib.metadata import PackageNotFoundError, version

    installed = None
    for dist in ("cupy-cuda12x", "cupy-cuda13x", "cupy-cuda11x", "cupy"):
        try:
            installed = version(dist)
            break
        except PackageNotFoundError:
            continue
    if installed != names.CUPY_VERSION:
        pytest.skip(f"names recorded from CuPy {names.CUPY_VERSION}, installed {installed}: "
                    "run python scripts/generate_cupy_names.py to record the new ones")
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate_cupy_names.py"), "--check"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
