"""Two kernel tiers, one switch: the math a student reads, and the same math made fast.

* ``"reference"``: :mod:`minisd.functional`, every pair as a textbook writes it (im2col and one
  matrix product for a convolution, batch norm from its formula).
* ``"fast"``: :mod:`minisd.kernels.fast`, the same pairs with the same signatures, caches and
  results, computed in a faster order (width-only unfolding, row slides, chunks on threads). The
  default.

Every layer asks :func:`current` for the module of the tier that runs its array, at each call,
so the switch applies to everything the layers run::

    from minisd import kernels
    kernels.use("reference")              # for the rest of the process
    with kernels.use("reference"):        # for a block; the tier in force before comes back after
        loss = step(model, x, labels)
    kernels.active()                      # -> "fast" or "reference": the tier chosen
    kernels.running(x)                    # -> the tier that runs for x (on a GPU: the reference)

The fast tier's tricks are CPU tricks, so arrays on a GPU run the reference pairs whatever the
choice: :func:`running` decides that, here and nowhere else, and the layers and the trace both ask
it (a trace records the tier that ran, not the one chosen).

``MINISD_KERNELS=reference`` chooses the reference for a whole process (tests included). Both
tiers build the same cache records (defined in :mod:`minisd.functional`), so a forward run on one
tier can be differentiated on the other.
"""
from __future__ import annotations

import importlib
import os

from minisd.backend import is_device_array
from minisd.kernels.parallel import clear_workspace, get_num_threads, set_num_threads

__all__ = ["TIERS", "PAIRS", "use", "active", "running", "current", "tier", "set_num_threads", "get_num_threads",
           "clear_workspace"]

#: The tiers by name, with the module that implements each.
TIERS = {"reference": "minisd.functional", "fast": "minisd.kernels.fast"}

#: The functions every tier provides (what the layers call).
PAIRS = (
    "conv2d_forward", "conv2d_backward",
    "batch_norm_forward", "batch_norm_backward", "update_running_stats",
    "relu_forward", "relu_backward",
    "linear_forward", "linear_backward",
    "global_avg_pool_forward", "global_avg_pool_backward",
    "shortcut_forward", "shortcut_backward",
    "softmax_cross_entropy_forward", "softmax_cross_entropy_backward",
)

_DEFAULT = "fast"


def _checked(name) -> str:
    if name not in TIERS:
        raise ValueError(f"kernels: unknown tier {name!r}; expected one of {', '.join(TIERS)}")
    return name


def _from_environment() -> str:
    value = os.environ.get("MINISD_KERNELS", "").strip()
    if not value:
        return _DEFAULT
    if value not in TIERS:
        raise ValueError(f"MINISD_KERNELS: unknown tier {value!r}; expected one of {', '.join(TIERS)}")
    return value


_state = {"active": None}  # None: not chosen yet (MINISD_KERNELS or the default, at first use)


def active() -> str:
    """The name of the tier in force: ``"fast"`` (the default) or ``"reference"``."""
    if _state["active"] is None:
        _state["active"] = _from_environment()
    return _state["active"]


_modules: dict = {}


def tier(name: str):
    """The module that implements tier ``name``."""
    module = _modules.get(name)
    if module is None:
        module = _modules[name] = importlib.import_module(TIERS[_checked(name)])
    return module


def running(x) -> str:
    """The tier that runs for array ``x``: the one in force, except that device arrays run the reference.

    Why: every trick of the fast tier is for a CPU (cache-sized chunks, threads, long contiguous
    copies). On a GPU a step costs its kernel launches, and the tricks launch more, smaller kernels
    than the reference's im2col and one large product: measured slower there
    (docs/performance.md#the-fast-tier-on-a-gpu). The caches are the same, so nothing else changes.
    """
    name = active()
    return "reference" if name == "fast" and is_device_array(x) else name


def current(x=None):
    """The module of the tier that runs for array ``x`` (see :func:`running`): what layers call,
    e.g. ``current(x).conv2d_forward(x, ...)``. Without ``x``, the module of the tier in force."""
    return tier(active() if x is None else running(x))


class use:
    """Choose the tier for the process, or, used as ``with kernels.use(name):``, for one block.

    The tier changes as soon as ``use(name)`` is called; leaving the ``with`` block restores the
    tier that was in force when ``use`` was called (also when the block raises).
    """

    def __init__(self, name: str):
        self.name = _checked(name)
        # What was in force, without reading MINISD_KERNELS: an explicit choice overrides a bad
        # variable (None comes back as "not chosen yet").
        self.previous = _state["active"]
        tier(self.name)  # import now, so a broken tier fails here and not inside a training step
        _state["active"] = self.name

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _state["active"] = self.previous
        return False

    def __repr__(self):
        return f"kernels.use({self.name!r})"
