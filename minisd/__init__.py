"""minisd: a from-scratch NumPy framework that teaches gradient flow through stochastic depth.

    from minisd import backend, functional as F, layers, residual, models, gradcheck
    from minisd import kernels        # kernels.use("reference" | "fast"): which tier the layers run
"""
from minisd import backend, functional, kernels, layers, models, residual  # noqa: F401

__version__ = "0.1.0"
