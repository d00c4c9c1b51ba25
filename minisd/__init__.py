"""minisd: a from-scratch NumPy framework that teaches gradient flow through stochastic depth.

    from minisd import backend, functional as F, layers, residual, models, gradcheck
    from minisd import kernels        # kernels.use("reference" | "fast"): which tier the layers run
"""
import importlib

__version__ = "0.1.0"

# Imported on first use (``minisd.layers`` after ``import minisd`` works as before): the `minisd`
# command starts without NumPy, so a Ctrl-C while NumPy loads is caught by its main (see cli.py).
_SUBMODULES = ("backend", "functional", "kernels", "layers", "models", "residual")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"minisd.{name}")
    raise AttributeError(f"module 'minisd' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
