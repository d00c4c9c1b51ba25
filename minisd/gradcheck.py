"""Finite-difference gradient checks: is a hand-written backward right?

Central differences in float64: dL/dθ_i ≈ (L(θ + ε e_i) - L(θ - ε e_i)) / 2ε with ε = 1e-5.
(Why not smaller: the truncation error falls as ε², but the rounding error of the two forward
passes grows as 1/ε. Through a residual block with batch norm, measured: worst relative error
7e-8 at ε = 1e-5, 2e-6 at 1e-6, 2e-5 at 1e-7, and 3e-6 at 1e-4.)

The scalar L is ``sum(y * dy)`` for a *random* upstream gradient ``dy``, never ``sum(y)``: with an
all-ones dy a batch norm whose backward returns dx = 0 would pass (the sum of a normalised channel
does not depend on x), and so would a softmax. The analytic side is ``backward(dy)``.

Each entry passes when ``|analytic - numerical| <= atol + rtol * |numerical|``, as PyTorch's
``gradcheck`` decides. A relative error alone fails correct backwards: where the true gradient is
near zero (a confident softmax, an input feature of 1e-9), the numerical side is rounding noise of
about 1e-11 and its relative error is of order 1. The defaults follow from ε and the dtype's unit
roundoff u (see :func:`default_tolerances`):

    rtol = 1e4 * (ε² + u / ε)                     truncation and step rounding, relative
    atol = 1e4 * u / ε * sum(|y * dy|)            the rounding noise of L itself, carried into the
                                                  difference quotient

(1e4 is the margin: a deep forward pass rounds by a multiple of u, and batch norm divides that by
a standard deviation that may be small. Measured with these defaults: the worst entries of layers,
residual blocks and a ResNet-20 at 3e-6 to 2e-4 of their tolerance, a batch norm of inputs scaled
by 0.01 at 2e-2; the planted bugs in tests/test_gradcheck.py at more than 1e3.)
With ε = 1e-5 in float64 that is rtol = 1.2e-6 and an atol of 2.2e-7 times the size of L's terms.
Reports give each array's worst entry as a fraction of its tolerance (passed: at most 1) and
list the worst entries.

* :func:`check_pair` checks a forward/backward pair from ``functional``, entry by entry.
* :func:`check_module` checks a Module's input and every parameter, entry by entry (optionally a
  random subset of entries per array).
* :func:`directional_check` checks a whole network along one random unit direction over all
  inputs and parameters: two forward passes instead of two per entry, so a 110-layer network with
  dropped blocks is checked in seconds (as Chainer's check_backward does).
* :func:`compare` applies the criterion to any pair of gradients (for experiments and teaching).

Randomness is frozen during a check: the stochastic-depth gates drawn by the first forward are
forced for every later evaluation; buffers (batch-norm running statistics) and the gate
generators are restored afterwards, so a check run in the middle of training leaves the training
exactly where it was.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy

from minisd import backend

__all__ = [
    "rel_error",
    "numerical_gradient",
    "default_tolerances",
    "compare",
    "check_pair",
    "check_module",
    "directional_check",
    "GradcheckResult",
    "GradientCheckError",
    "frozen_randomness",
]

# How far below the tolerance a correct backward is expected to sit (see the module docstring).
TOLERANCE_MARGIN = 1e4


class GradientCheckError(AssertionError):
    """Raised by a failed check; its message is the readable report."""


def rel_error(a, b) -> float:
    """max over entries of |a - b| / max(1e-12, |a| + |b|) (0.0 for empty arrays).

    For looking at, not for deciding: near-zero entries make it large even when both sides agree
    to rounding (the checks decide with :func:`default_tolerances`).
    """
    a = numpy.asarray(backend.to_numpy(a), dtype=numpy.float64)
    b = numpy.asarray(backend.to_numpy(b), dtype=numpy.float64)
    if a.shape != b.shape:
        raise ValueError(f"rel_error: shapes differ: {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0
    return float(numpy.max(numpy.abs(a - b) / numpy.maximum(1e-12, numpy.abs(a) + numpy.abs(b))))


def default_tolerances(eps=1e-5, dtype=numpy.float64, output=None, dy=None) -> tuple[float, float]:
    """(atol, rtol) for central differences with step ``eps`` in ``dtype``, for L = sum(output * dy).

    rtol = 1e4 (eps² + u / eps): the truncation error (eps²) and the rounding of the step itself
    (u / eps), relative to the gradient. atol = 1e4 u / eps * sum(|output * dy|): each evaluation of
    L is rounded by about u times the size of its terms, and the difference quotient divides that
    by eps. Without ``output`` and ``dy`` the scale of L is taken as 1.
    """
    u = float(numpy.finfo(numpy.dtype(dtype)).eps)
    scale = 1.0
    if output is not None and dy is not None:
        y = numpy.asarray(backend.to_numpy(output), dtype=numpy.float64)
        d = numpy.asarray(backend.to_numpy(dy), dtype=numpy.float64)
        scale = max(float(numpy.sum(numpy.abs(y * d))), numpy.finfo(numpy.float64).tiny)
    rtol = TOLERANCE_MARGIN * (eps * eps + u / eps)
    atol = TOLERANCE_MARGIN * u / eps * scale
    return atol, rtol


@dataclass
class Worst:
    """One badly matching entry: |analytic - numeric| against what the tolerance allows there."""

    name: str
    index: tuple
    analytic: float
    numeric: float
    allowed: float

    @property
    def error(self) -> float:
        """|analytic - numeric| as a fraction of the tolerance at this entry (passes at <= 1)."""
        return _ratio(abs(self.analytic - self.numeric), self.allowed)


def _ratio(difference, allowed):
    if difference == 0:
        return 0.0
    return difference / allowed if allowed > 0 else math.inf


@dataclass
class GradcheckResult:
    """Per checked array (name -> its worst entry's error as a fraction of the tolerance
    ``atol + rtol * |numerical|``; the array passes at <= 1) and the worst entries overall."""

    errors: dict = field(default_factory=dict)
    worst: list = field(default_factory=list)
    atol: float = 0.0
    rtol: float = 0.0

    @property
    def max_error(self) -> float:
        """The largest error as a fraction of its tolerance (passed: <= 1)."""
        return max(self.errors.values(), default=0.0)

    @property
    def passed(self) -> bool:
        return self.max_error <= 1.0

    def failed(self) -> list:
        """Names of the arrays with an entry outside its tolerance."""
        return [name for name, err in self.errors.items() if not err <= 1.0]

    def report(self, top: int = 5) -> str:
        lines = [f"gradient check {'passed' if self.passed else 'FAILED'} (worst entry at {self.max_error:.3g} of "
                 f"its tolerance |analytic - numeric| <= atol + rtol * |numeric|, atol {self.atol:.1e}, "
                 f"rtol {self.rtol:.1e})"]
        for name, err in self.errors.items():
            lines.append(f"  {'ok  ' if err <= 1.0 else 'FAIL'} {name:<32} {err:.3g}")
        if not self.passed:
            lines.append("  worst entries (name, index, analytic vs numeric, |difference| / tolerance there):")
            for w in sorted(self.worst, key=lambda w: -w.error)[:top]:
                lines.append(f"    {w.name} {w.index}: {w.analytic:+.6e} vs {w.numeric:+.6e}  "
                             f"({abs(w.analytic - w.numeric):.2e} / {w.allowed:.2e})")
        return "\n".join(lines)

    def raise_if_failed(self) -> "GradcheckResult":
        if not self.passed:
            raise GradientCheckError(self.report())
        return self

    def _flag(self, name) -> None:
        """A failure that is not a number (a backward wrote into the gradient it was given)."""
        self.errors[name] = math.inf

    def _add(self, name, analytic, numeric, index_map=None, keep=3):
        a = numpy.asarray(backend.to_numpy(analytic), dtype=numpy.float64).ravel()
        n = numpy.asarray(backend.to_numpy(numeric), dtype=numpy.float64).ravel()
        if a.size == 0:
            self.errors[name] = 0.0
            return
        allowed = self.atol + self.rtol * numpy.abs(n)
        difference = numpy.abs(a - n)
        with numpy.errstate(divide="ignore", invalid="ignore"):
            errs = numpy.where(difference == 0, 0.0, difference / allowed)
        errs = numpy.where(numpy.isnan(errs), math.inf, errs)  # a NaN on either side fails
        self.errors[name] = float(errs.max())
        for k in numpy.argsort(errs)[::-1][:keep]:
            index = index_map[k] if index_map is not None else (int(k),)
            self.worst.append(Worst(name, tuple(int(i) for i in index), float(a[k]), float(n[k]), float(allowed[k])))


def compare(analytic, numeric, atol, rtol, name="gradient") -> GradcheckResult:
    """Apply the check's criterion |analytic - numeric| <= atol + rtol * |numeric| to two arrays."""
    result = GradcheckResult(atol=float(atol), rtol=float(rtol))
    result._add(name, analytic, numeric)
    return result


def _tolerances(eps, atol, rtol, tol, output, dy):
    """The check's (atol, rtol): given values win; ``tol`` is the older name of ``rtol``."""
    default_atol, default_rtol = default_tolerances(eps, numpy.float64, output, dy)
    if rtol is None:
        rtol = default_rtol if tol is None else tol
    return (default_atol if atol is None else float(atol)), float(rtol)


def _require_float64(*arrays, where="gradcheck"):
    for a in arrays:
        if a is not None and a.dtype != numpy.float64:
            raise ValueError(f"{where}: gradient checks need float64 arrays (central differences in float32 "
                             f"lose most digits), got {a.dtype}; use .astype('float64') or module.to(dtype='float64')")


def numerical_gradient(f, x, dy, eps=1e-5, indices=None):
    """Central-difference gradient of L = sum(f() * dy) with respect to the array ``x``, perturbed in place.

    ``indices``: flat indices to perturb (default: all). Returns the gradient at those indices
    (a float64 NumPy array). ``x`` is restored exactly afterwards.
    """
    if not x.flags.c_contiguous:
        raise ValueError("numerical_gradient: x must be C-contiguous so it can be perturbed in place")
    flat = x.reshape(-1)  # a view of x: writing flat[i] perturbs x
    dy_host = numpy.asarray(backend.to_numpy(dy), dtype=numpy.float64)
    indices = range(x.size) if indices is None else indices
    out = []
    for i in indices:
        original = flat[i].item()
        flat[i] = original + eps
        # numpy.array copies: an output that aliases x (Identity) must not change with the next step.
        plus = numpy.array(backend.to_numpy(f()), dtype=numpy.float64)
        flat[i] = original - eps
        minus = numpy.array(backend.to_numpy(f()), dtype=numpy.float64)
        flat[i] = original
        # Difference the outputs before weighting and summing: subtracting two large sums would
        # cancel most significant digits.
        out.append(float(numpy.sum((plus - minus) * dy_host)) / (2 * eps))
    return numpy.array(out, dtype=numpy.float64)


def _contiguous_copy(x):
    # x.copy(order="C"), not ascontiguousarray: that one turns a 0-d array (a loss) into shape (1,).
    return x.copy(order="C")


def _upstream_rng(seed):
    """The generator for the random upstream gradient dy: a stream of its own, so dy can never
    equal an input the caller drew from the same seed (BN's dx is exactly 0 when dy is a linear
    function of x per channel, and the check would then test nothing)."""
    return numpy.random.default_rng([int(seed), 0x5EED])


def _random_like(rng, shape, like):
    xp = backend.array_module(like)
    return xp.asarray(rng.standard_normal(shape)).astype(like.dtype)


def _pick(rng, size, max_entries):
    if max_entries is None or size <= max_entries:
        return numpy.arange(size)
    return numpy.sort(rng.choice(size, max_entries, replace=False))


def check_pair(forward, backward, inputs: dict, grad_names=None, kwargs=None, eps=1e-5, tol=None, seed=0,
               max_entries=None, raise_on_fail=False, atol=None, rtol=None) -> GradcheckResult:
    """Check a functional pair: ``out, cache = forward(*inputs.values(), **kwargs)`` and
    ``grads = backward(dout, cache)`` (a tuple in the order of ``inputs``, or a single array).

    inputs: name -> float64 array (None entries are passed through and not checked).
    grad_names: which inputs to check (default: all non-None floating inputs).
    atol, rtol: the tolerance |analytic - numeric| <= atol + rtol |numeric| (None: from eps and
    float64, see :func:`default_tolerances`); ``tol`` is the older name of ``rtol``.
    """
    kwargs = kwargs or {}
    rng = _upstream_rng(seed)
    arrays = {k: (_contiguous_copy(v) if v is not None and hasattr(v, "dtype") and v.dtype.kind == "f" else v)
              for k, v in inputs.items()}
    names = grad_names or [k for k, v in arrays.items() if v is not None and hasattr(v, "dtype") and v.dtype.kind == "f"]
    _require_float64(*(arrays[k] for k in names), where="check_pair")

    def run():
        out, _ = forward(*arrays.values(), **kwargs)
        return out

    out, cache = forward(*arrays.values(), **kwargs)
    dout = _random_like(rng, out.shape, out)
    dout_before = _contiguous_copy(dout)
    grads = backward(dout, cache)
    if not isinstance(grads, tuple):
        grads = (grads,)
    atol, rtol = _tolerances(eps, atol, rtol, tol, out, dout)
    result = GradcheckResult(atol=atol, rtol=rtol)
    if rel_error(dout, dout_before) != 0.0:
        result._flag("dout modified by backward")
    by_name = dict(zip(arrays.keys(), grads))
    for name in names:
        picked = _pick(rng, arrays[name].size, max_entries)
        numeric = numerical_gradient(run, arrays[name], dout, eps, picked)
        analytic = backend.to_numpy(by_name[name]).reshape(-1)[picked]
        result._add(name, analytic, numeric, [numpy.unravel_index(i, arrays[name].shape) for i in picked])
    return result.raise_if_failed() if raise_on_fail else result


def _snapshot_buffers(module):
    return [(m, k, v.copy()) for m in module.modules() for k, v in m.buffers.items()]


def _snapshot_gate_streams(module):
    """(generator, state) for every distinct gate generator in ``module`` (blocks of a model share one)."""
    streams = {}
    for m in module.modules():
        rng = getattr(m, "gate_rng", None)
        if rng is not None and id(rng) not in streams:
            streams[id(rng)] = (rng, rng.bit_generator.state)
    return list(streams.values())


@contextlib.contextmanager
def frozen_randomness(module, saved_buffers=None, saved_streams=None):
    """Inside: every stochastic block reuses the gate its last forward drew. After: the buffers
    and the gate generators are as they were (the blocks' ``gate`` shows the gate the check used).

    ``saved_buffers`` / ``saved_streams``: snapshots taken earlier (before the forward that drew
    the gates), so that forward's running-statistics update and its draws are undone too; by
    default, snapshots taken on entry.
    """
    saved_buffers = _snapshot_buffers(module) if saved_buffers is None else saved_buffers
    saved_streams = _snapshot_gate_streams(module) if saved_streams is None else saved_streams
    gated = [m for m in module.modules() if hasattr(m, "force_gate")]
    previous = [m.forced_gate for m in gated]
    try:
        for m in gated:
            if m.training and m.gate is not None:
                m.force_gate(m.gate)
        yield module
    finally:
        for m, forced in zip(gated, previous):
            m.force_gate(forced)
        for m, k, v in saved_buffers:
            m.buffers[k][...] = v
        for rng, state in saved_streams:
            rng.bit_generator.state = state


def _first_pass(module, x, seed, where):
    """Shared start of the module checks: float64 guard, a private copy of x, snapshots of the
    buffers and gate generators (restored when the check ends), one forward (which draws the gates
    that the check then freezes) and the random upstream gradient dy."""
    _require_float64(x, *module.parameters(), where=f"{where}({type(module).__name__})")
    rng = _upstream_rng(seed)
    x = _contiguous_copy(x)
    saved = _snapshot_buffers(module), _snapshot_gate_streams(module)
    module.zero_grad()
    y = module(x)
    dy = _random_like(rng, y.shape, y)
    # L's scale for the default atol, taken now: a later forward may reuse y's buffer.
    scale = numpy.array(backend.to_numpy(y), dtype=numpy.float64)
    return rng, x, scale, dy, saved


def _release_caches(module):
    """Drop what the last forward kept (a check's extra forwards leave caches behind)."""
    for m in module.modules():
        m._cache = None


def _require_input_grad(dx, module, where, hint=""):
    """A clear error when a backward returned no input gradient (a Conv2d with input_grad=False)."""
    if dx is None:
        raise ValueError(f"{where}: {module.describe()} returned no input gradient (a first Conv2d with "
                         f"input_grad=False, as the trainer sets on the stem?); set input_grad = True {hint}".rstrip())


def check_module(module, x, eps=1e-5, tol=None, seed=0, max_entries=None, check_input=True,
                 raise_on_fail=False, atol=None, rtol=None) -> GradcheckResult:
    """Element-wise check of a Module: its input gradient and every parameter gradient.

    The module and x must be float64. max_entries: check at most this many random entries per
    array (None: all). The module's mode is used as it is (train or eval). atol, rtol, tol: as
    for :func:`check_pair`.
    """
    rng, x, y, dy, (saved_buffers, saved_streams) = _first_pass(module, x, seed, "check_module")
    dy_before = _contiguous_copy(dy)
    with frozen_randomness(module, saved_buffers, saved_streams):
        dx = module.backward(dy)
        if check_input:
            _require_input_grad(dx, module, "check_module", "or pass check_input=False")
        atol, rtol = _tolerances(eps, atol, rtol, tol, y, dy)
        result = GradcheckResult(atol=atol, rtol=rtol)
        if rel_error(dy, dy_before) != 0.0:
            result._flag("dy modified by backward")
        run = lambda: module(x)  # noqa: E731
        targets = [("input", x, dx)] if check_input else []
        for name, module_of, key in module.parameter_slots():
            targets.append((name, module_of.params[key], module_of.grads[key]))
        for name, array, grad in targets:
            if not array.flags.c_contiguous:
                raise ValueError(f"check_module: {name} is not contiguous")
            picked = _pick(rng, array.size, max_entries)
            numeric = numerical_gradient(run, array, dy, eps, picked)
            analytic = backend.to_numpy(grad).reshape(-1)[picked]
            result._add(name, analytic, numeric, [numpy.unravel_index(i, array.shape) for i in picked])
        _release_caches(module)
    return result.raise_if_failed() if raise_on_fail else result


def directional_check(module, x, eps=1e-5, tol=None, seed=0, raise_on_fail=False, atol=None,
                      rtol=None) -> GradcheckResult:
    """Check a whole network along one random unit direction v over the input and all parameters.

    numeric  = (L(θ + εv) - L(θ - εv)) / 2ε   (two forward passes)
    analytic = Σ grad · v                      (one backward pass)
    with L = sum(module(x) * dy) for a random dy. Returns a result with one entry, "direction".
    """
    rng, x, y, dy, (saved_buffers, saved_streams) = _first_pass(module, x, seed, "directional_check")
    with frozen_randomness(module, saved_buffers, saved_streams):
        dx = module.backward(dy)
        _require_input_grad(dx, module, "directional_check")
        arrays = [x] + [m.params[k] for _, m, k in module.parameter_slots()]
        grads = [dx] + [m.grads[k] for _, m, k in module.parameter_slots()]
        directions = [_random_like(rng, a.shape, a) for a in arrays]
        norm = float(numpy.sqrt(sum(float((d * d).sum()) for d in directions)))
        directions = [d / norm for d in directions]
        analytic = sum(float((g * d).sum()) for g, d in zip(grads, directions))
        dy_host = numpy.asarray(backend.to_numpy(dy), dtype=numpy.float64)

        originals = [a.copy() for a in arrays]

        def output_at(step):
            for a, a0, d in zip(arrays, originals, directions):
                a[...] = a0 + step * d
            value = numpy.array(backend.to_numpy(module(x)), dtype=numpy.float64)  # a copy: see above
            for a, a0 in zip(arrays, originals):
                a[...] = a0  # restore exactly, not by subtracting (rounding would drift)
            return value

        numeric = float(numpy.sum((output_at(eps) - output_at(-eps)) * dy_host)) / (2 * eps)
        _release_caches(module)
    atol, rtol = _tolerances(eps, atol, rtol, tol, y, dy)
    result = GradcheckResult(atol=atol, rtol=rtol)
    result._add("direction", numpy.array([analytic]), numpy.array([numeric]))
    return result.raise_if_failed() if raise_on_fail else result
