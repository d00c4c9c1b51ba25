"""The one place that decides between NumPy and CuPy.

Every other module asks this one for an array module, either the current one (:func:`xp`) or the one
that owns the arrays it was given (:func:`array_module`, like ``cupy.get_array_module``). So a model
moved with ``model.to("cupy")`` runs exactly the same lines on the GPU.

Selecting a backend::

    from minisd import backend
    backend.use("cupy")            # or set MINISD_BACKEND=cupy for the whole process
    backend.xp()                   # -> the cupy module
    backend.array_module(x)        # -> numpy or cupy, whichever owns x

Random numbers: :func:`seed` seeds a host generator (NumPy's PCG64) that layers and blocks built
without a generator of their own use for weight initialisation and stochastic-depth gates, so the
same seed gives the same weights and the same gates on both backends, and a device generator
(:func:`device_rng`) for user code that wants random numbers on the device. (``resnet_cifar`` takes
its own ``seed``, which fixes the whole model.) (Data augmentation derives its own generators per epoch from the run's
seed, so that a resumed run draws exactly what an uninterrupted one drew: see ``minisd.data``.)
"""
from __future__ import annotations

import os
import sys
import types

import numpy

__all__ = [
    "BackendUnavailable",
    "use",
    "name",
    "xp",
    "array_module",
    "is_device_array",
    "to_device",
    "to_numpy",
    "default_dtype",
    "set_default_dtype",
    "resolve_dtype",
    "seed",
    "host_rng",
    "device_rng",
    "synchronize",
    "BACKENDS",
]

#: Names accepted by :func:`use`. ``"cupy-names"`` runs on NumPy arrays but hands out an array
#: module that offers exactly the names CuPy offers; the test suite uses it to catch NumPy-only
#: calls on machines without a GPU (see ``minisd/_cupy_namespace.py``).
BACKENDS = ("numpy", "cupy", "cupy-names")

GPU_INSTALL_HINT = 'install the GPU extra with: pip install "minisd[gpu]"'


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (CuPy missing, or no usable GPU)."""


_state: dict = {
    "name": "numpy",
    "xp": numpy,
    # Module handed out for NumPy arrays: plain numpy, or the CuPy-names guard.
    "host_namespace": numpy,
    "dtype": numpy.dtype(numpy.float32),
    "seed": 0,
    "host_rng": numpy.random.default_rng(0),
    "device_rng": None,
    # A MINISD_BACKEND request that failed at import: raised at first use, not at import, so
    # `import minisd` (and `minisd --help`) still work and the CLI can print it as one line.
    "environment_error": None,
}


def _import_cupy():
    """Import CuPy and prove that a GPU is usable, or raise one clear BackendUnavailable."""
    try:
        import cupy  # noqa: PLC0415  (the only import of cupy in minisd)
    except ImportError as exc:
        raise BackendUnavailable(f"CuPy is not installed ({exc}); {GPU_INSTALL_HINT}") from None
    try:
        # CuPy imports fine without a GPU; the first allocation is what fails, deep inside CUDA.
        cupy.zeros(1, dtype=cupy.float32) + 1
        cupy.cuda.Device().synchronize()
    except Exception as exc:  # cupy raises CUDARuntimeError, CUDADriverError, RuntimeError, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackendUnavailable(
            f"CuPy is installed but no usable GPU was found ({type(exc).__name__}: {reason}); "
            "run on a machine with an NVIDIA GPU and driver, or use the numpy backend"
        ) from None
    return cupy


def _cupy_if_loaded():
    """The cupy module if it was already imported, else None (never imports it: that is slow)."""
    return sys.modules.get("cupy")


def use(backend_name: str) -> types.ModuleType:
    """Select the backend for new arrays: ``"numpy"``, ``"cupy"`` or ``"cupy-names"``.

    Returns the array module. Raises :class:`BackendUnavailable` if CuPy or a GPU is missing, and
    ValueError for an unknown name.
    """
    key = str(backend_name).lower()
    if key not in BACKENDS:
        raise ValueError(f"backend.use: unknown backend {backend_name!r}; expected one of {BACKENDS}")
    if key == "cupy":
        module = _import_cupy()
        _state.update(name="cupy", xp=module, host_namespace=numpy)
    elif key == "cupy-names":
        from minisd._cupy_namespace import cupy_names_module  # noqa: PLC0415

        guard = cupy_names_module()
        _state.update(name="cupy-names", xp=guard, host_namespace=guard)
    else:
        _state.update(name="numpy", xp=numpy, host_namespace=numpy)
    _state["environment_error"] = None  # an explicit choice replaces a failed MINISD_BACKEND
    _state["device_rng"] = None  # re-created on the new backend from the current seed
    return _state["xp"]


def name() -> str:
    """Name of the current backend: ``"numpy"``, ``"cupy"`` or ``"cupy-names"``."""
    _raise_environment_error()
    return _state["name"]


def xp() -> types.ModuleType:
    """The current array module (numpy, cupy, or the CuPy-names guard)."""
    _raise_environment_error()
    return _state["xp"]


def is_device_array(x) -> bool:
    """True if ``x`` is a CuPy array (lives on the GPU)."""
    cupy = _cupy_if_loaded()
    return cupy is not None and isinstance(x, cupy.ndarray)


def array_module(*arrays) -> types.ModuleType:
    """The array module that owns ``arrays`` (cupy if any is a CuPy array), like cupy.get_array_module."""
    cupy = _cupy_if_loaded()
    if cupy is not None:
        for a in arrays:
            if isinstance(a, cupy.ndarray):
                return cupy
    return _state["host_namespace"]


def backend_of(x) -> str:
    """``"cupy"`` for a CuPy array, else ``"numpy"``: where an array lives, in words."""
    return "cupy" if is_device_array(x) else "numpy"


def to_device(x, backend: str | None = None, dtype=None):
    """Move (or copy) ``x`` to ``backend`` (default: the current one), optionally casting ``dtype``.

    This is an explicit host/device transfer: layers never call it on their own account.
    """
    target = (backend or name()).lower()
    if target not in BACKENDS:
        raise ValueError(f"to_device: unknown backend {backend!r}; expected one of {BACKENDS}")
    if target == "cupy":
        cupy = _cupy_if_loaded() or _import_cupy()
        out = cupy.asarray(x)
    else:
        out = to_numpy(x)
    return out if dtype is None else out.astype(resolve_dtype(dtype), copy=False)


def to_numpy(x):
    """A NumPy array holding the values of ``x`` (copies from the GPU if ``x`` is a CuPy array)."""
    if is_device_array(x):
        return x.get()
    return numpy.asarray(x)


def default_dtype() -> numpy.dtype:
    """The dtype new parameters and data get when none is given (float32 unless changed)."""
    return _state["dtype"]


def set_default_dtype(dtype) -> None:
    """Change the default floating dtype (``"float32"`` or ``"float64"``)."""
    _state["dtype"] = resolve_dtype(dtype)


def resolve_dtype(dtype) -> numpy.dtype:
    """``None`` -> the default dtype; else a floating numpy dtype (float16/32/64), or ValueError."""
    if dtype is None:
        return _state["dtype"]
    resolved = numpy.dtype(dtype)
    if resolved.kind != "f":
        raise ValueError(f"expected a floating dtype such as 'float32' or 'float64', got {dtype!r}")
    return resolved


def seed(value: int) -> None:
    """Seed the host generator and (lazily) the device generator, for reproducible runs.

    The host generator is reseeded in place, so everything that draws from it follows, including
    layers and blocks built before this call (a BasicBlock built without ``gate_rng`` keeps a
    reference to it for its gates). ``models.resnet_cifar`` does not use it: its ``seed`` argument
    fixes its weights and its gate stream.
    """
    _state["seed"] = int(value)
    _state["host_rng"].bit_generator.state = numpy.random.default_rng(int(value)).bit_generator.state
    _state["device_rng"] = None


def host_rng() -> numpy.random.Generator:
    """The seeded host generator (weight initialisation and gates draw from it by default)."""
    return _state["host_rng"]


def device_rng():
    """A generator on the current backend (``cupy.random.default_rng`` on the GPU), seeded by :func:`seed`."""
    if _state["device_rng"] is None:
        module = xp()
        if name() in ("cupy", "cupy-names"):
            # cupy-names: the guard's default_rng, which offers only cupy.random.Generator's methods.
            _state["device_rng"] = module.random.default_rng(_state["seed"])
        else:
            _state["device_rng"] = numpy.random.default_rng(_state["seed"])
    return _state["device_rng"]


def synchronize() -> None:
    """Wait for queued GPU work to finish (for honest timings); a no-op on NumPy."""
    cupy = _cupy_if_loaded()
    if cupy is not None and name() == "cupy":
        cupy.cuda.Device().synchronize()


def _select_from_environment() -> None:
    """Honour MINISD_BACKEND at import, so a whole process (tests included) can run on CuPy."""
    requested = os.environ.get("MINISD_BACKEND", "").strip()
    if requested:
        try:
            use(requested)
        except (BackendUnavailable, ValueError) as exc:
            _state["environment_error"] = type(exc)(f"MINISD_BACKEND={requested}: {exc}")


def _raise_environment_error() -> None:
    if _state["environment_error"] is not None:
        raise _state["environment_error"]


_select_from_environment()
