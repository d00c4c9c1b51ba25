"""Checkers for the exercises in ``notebooks/exercises/``: write a backward, be told what is wrong.

::

    from minisd import exercises
    exercises.check_conv_backward(conv_backward)        # 1. convolution backward via im2col
    exercises.check_batch_norm_backward(batch_norm_backward)   # 2. batch norm backward (training)
    exercises.check_block_backward(block_backward)      # 3. BasicBlock backward: kept, dropped, row mode
    exercises.check_schedule(linear_decay)              # 4. the linear-decay survival schedule
    exercises.check_test_time_rule(block_output_at_test_time)  #    and the test-time rule

Each checker calls the student's function on a few small float64 problems, compares every result
with minisd's own pair (the reference) and with central finite differences (the truth, computed
from the forward alone), and returns a :class:`Report`: a notebook shows it as plain text, ``bool``
of it says whether everything passed. It says which gradient is wrong, in which entries, by how
much (the relative error: the largest entry difference over the largest correct entry), and gives a
hint where the mistake is a common one: a transposed weight gradient, a missing sum over the batch,
the evaluation-mode batch norm, a forgotten ReLU mask, a write into dy. It recognises a mistake by
computing what that mistake would give and comparing.

It never shows a traceback: an exception inside the student's function becomes one line with the
exception and the line of the student's code that raised it (or that called the library function
that raised it).
"""
from __future__ import annotations

import traceback

import numpy

from minisd import backend
from minisd import functional as F
from minisd import residual
from minisd.gradcheck import numerical_gradient

__all__ = [
    "Report",
    "check_conv_backward",
    "check_batch_norm_backward",
    "check_block_backward",
    "block_forward",
    "check_schedule",
    "check_test_time_rule",
]

TOLERANCE = 1e-7          # float64 results against the reference, relative to the largest entry
FD_ENTRIES = 12           # entries per array checked by finite differences (each costs two forwards)


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------


class Report:
    """The outcome of one checker: a title, passed or not, and lines in plain words.

    In a notebook the report shows itself as text (it is what the check cell displays); ``bool``
    of it is ``passed``; ``str`` of it is the text.
    """

    def __init__(self, title: str):
        self.title = title
        self.lines: list[str] = []
        self.failures = 0
        self.checks = 0
        self.summary = ""
        self._seen = set()

    def add(self, ok: bool, line: str, details=(), key=None):
        """One check. key: failures with a key seen before keep only their first detail line (the
        same mistake in a second setting needs no second explanation)."""
        self.checks += 1
        self.failures += 0 if ok else 1
        if key is not None:
            if key in self._seen:
                line, details = line + " (the same problem as above)", list(details)[:1]
            self._seen.add(key)
        self.lines.append(("    \u2713 " if ok else "    \u2717 ") + line)
        self.lines += ["        " + d for d in details]

    def note(self, line: str):
        self.lines.append("  " + line)

    def stop(self, why: str):
        """A problem that ends the check (not written yet, an exception, a wrong return value)."""
        self.failures += 1
        self.summary = why
        if len(self.lines) == 1 and not self.lines[0].startswith("    "):
            self.lines = []  # only the first setting's heading, with nothing under it: say nothing
        elif self.lines and not self.lines[-1].startswith("    "):
            self.lines.append("    \u2717 stopped here (see the first line)")

    @property
    def passed(self) -> bool:
        return self.checks > 0 and self.failures == 0

    def __bool__(self):
        return self.passed

    def __str__(self):
        if self.passed:
            head = f"{self.title}: PASSED ({self.checks} checks)"
        elif self.summary:
            head = f"{self.title}: NOT PASSED: {self.summary}"
        else:
            head = f"{self.title}: NOT PASSED ({self.failures} of {self.checks} checks failed)"
        return "\n".join([head] + self.lines)

    __repr__ = __str__

    def _repr_pretty_(self, printer, cycle):  # IPython's plain-text display
        printer.text(str(self))


class _StudentError(Exception):
    """The student's function did not give a usable answer; the message says why, in words."""


def _call(fn, name: str, call: str, *args):
    """Call the student's function; turn any failure into a _StudentError with one plain line."""
    try:
        return fn(*args)
    except NotImplementedError:
        raise _StudentError(f"{name} is not written yet (it raises NotImplementedError). Replace the "
                            "`raise NotImplementedError` line with your code, run that cell, then this one again.") from None
    except SystemExit as exc:  # not an Exception: sys.exit() would end the checker and escape it
        raise _StudentError(_exit_message(name, exc)) from None
    except Exception as exc:  # noqa: BLE001  (every mistake becomes a message, never a traceback)
        raise _StudentError(_explain_exception(fn, name, call, exc)) from None


def _exit_message(name, exc: SystemExit) -> str:
    """One line for a student function that called sys.exit() (or exit(), or raised SystemExit)."""
    return (f"{name} called sys.exit({'' if exc.code is None else repr(exc.code)}), which would stop the checker: "
            "return the result instead")


def _explain_exception(fn, name, call, exc) -> str:
    """"your function raised X: msg" plus the line of the student's code where it happened."""
    message = f"{name} raised {type(exc).__name__}: {exc}"
    code = getattr(fn, "__code__", None)
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [f for f in frames if code is not None and f.filename == code.co_filename]
    if isinstance(exc, TypeError) and not mine:
        return f"{message}. It is called as {call}: check its arguments and what it returns."
    if mine:
        last = mine[-1]
        inside = frames[-1] is not last
        where = (f"in a function it called ({frames[-1].name}), from" if inside else "at")
        line = (last.line or "").strip()
        message += f"\n    {where} line {last.lineno - code.co_firstlineno + 1} of {name}" + (f": {line}" if line else "")
    return message


def _host(a):
    return numpy.asarray(backend.to_numpy(a), dtype=numpy.float64)


def _rel_error(mine, correct) -> float:
    """Largest entry difference over the largest correct entry (0 when both are zero)."""
    scale = float(numpy.max(numpy.abs(correct))) if correct.size else 0.0
    diff = float(numpy.max(numpy.abs(mine - correct))) if correct.size else 0.0
    return diff / scale if scale > 0 else diff


def _matches(mine, correct, tol=TOLERANCE) -> bool:
    return mine.shape == correct.shape and bool(numpy.all(numpy.isfinite(mine))) and _rel_error(mine, correct) < tol


def _entry_text(name, index, mine, correct) -> str:
    where = ", ".join(str(int(i)) for i in index)
    return f"e.g. {name}[{where}]: yours {mine[index]:+.5g}, correct {correct[index]:+.5g}"


_NOT_NUMBERS = {"b": "true/false values", "c": "complex numbers", "U": "text", "S": "bytes", "O": "Python objects",
                "V": "records", "M": "dates", "m": "time spans"}


def _as_numbers(value, name, expected: str):
    """The student's value as a float64 host array if it holds real numbers; else a _StudentError
    saying what it is instead (None, text, a dict, true/false values, complex numbers, objects).
    ``expected`` completes "return ...", e.g. "an array of shape (2, 3)"."""
    if value is None:
        raise _StudentError(f"{name} is None: return {expected}")
    if isinstance(value, (str, bytes, dict, set)):
        raise _StudentError(f"{name} is a {type(value).__name__}, not {expected}")
    try:
        array = numpy.asarray(backend.to_numpy(value))
    except Exception:  # noqa: BLE001  (a ragged list, an object NumPy cannot read)
        raise _StudentError(f"{name} is a {type(value).__name__}, not {expected}") from None
    if array.dtype.kind not in "iuf":
        what = _NOT_NUMBERS.get(array.dtype.kind, str(array.dtype))
        raise _StudentError(f"{name} holds {what}, not numbers: return {expected}")
    return array.astype(numpy.float64)


def _as_array(value, name, expected_shape):
    """The student's value as a float64 host array, or a _StudentError saying what it was instead."""
    return _as_numbers(value, name, f"an array of shape {expected_shape}")


def _stop_counting(module) -> None:
    """Undo :func:`_counting`; quietly, if the student's code already removed the wrapper
    (``del module.backward``), so the checker's own cleanup never raises."""
    vars(module).pop("backward", None)


def _compare(report, name, mine, correct, hints=(), numeric=None, label=None):
    """Check one result against the reference; on a mismatch say where and why (hints: a list of
    (what the mistake would give, the hint), tried in order)."""
    label = label or name
    if mine.shape != correct.shape:
        details = [f"your {name} has shape {mine.shape}; it must have the shape of what it is the gradient "
                   f"of: {correct.shape}"]
        if mine.ndim == correct.ndim + 1 and mine.shape[1:] == correct.shape:
            details.append(f"hint: it has an extra batch axis in front: the gradient of a parameter shared by all "
                           f"samples is the SUM of the samples' shares (sum over axis 0)")
        elif mine.ndim == 2 and correct.ndim == 1 and mine.shape[1] == correct.shape[0]:
            details.append("hint: one row per sample: sum over the batch axis as well")
        elif mine.size == correct.size and mine.ndim == 2 and mine.shape[::-1] == (correct.shape[0],
                                                                                  mine.size // correct.shape[0]):
            details.append("hint: this is the transpose of the (out, in*kh*kw) matrix dY @ cols.T: you computed "
                           "cols @ dY.T; use dY @ cols.T and reshape it to the weight's shape")
        report.add(False, f"{label}: wrong shape", details, key=(name, "shape"))
        return False
    if not numpy.all(numpy.isfinite(mine)):
        report.add(False, f"{label}: has {int((~numpy.isfinite(mine)).sum())} entries that are NaN or infinite")
        return False
    error = _rel_error(mine, correct)
    if error < TOLERANCE:
        fd = ""
        if numeric is not None:
            picked, values = numeric
            fd = f"; finite differences agree to {_rel_error(mine.reshape(-1)[picked], values):.1e}"
        report.add(True, f"{label}: correct (relative error {error:.1e}{fd})")
        return True
    wrong = numpy.abs(mine - correct) > TOLERANCE * max(float(numpy.max(numpy.abs(correct))), 1e-300)
    worst = numpy.unravel_index(int(numpy.argmax(numpy.abs(mine - correct))), mine.shape)
    details = [f"wrong in {int(wrong.sum())} of {wrong.size} entries; relative error {error:.2g} "
               f"(should be below {TOLERANCE:.0e})", _entry_text(name, worst, mine, correct)]
    if numeric is not None:
        picked, values = numeric
        details.append(f"finite differences agree with the correct values to {_rel_error(correct.reshape(-1)[picked], values):.1e}, "
                       f"with yours to {_rel_error(mine.reshape(-1)[picked], values):.1e}")
    hint = next((h for alternative, h in hints if alternative is not None and _matches(mine, alternative, 1e-6)), None)
    if hint is None:
        hint = _factor_hint(mine, correct)
    if hint is None and name == "dx" and wrong.ndim == 4 and wrong.any():
        hint = _border_hint(wrong)
    if hint:
        details.append("hint: " + hint)
    report.add(False, f"{label}: wrong", details, key=(name, hint))
    return False


def _factor_hint(mine, correct):
    """A constant factor between yours and the correct values (e.g. a mean where a sum belongs)."""
    denominator = float(numpy.sum(correct * correct))
    if denominator == 0:
        return None
    factor = float(numpy.sum(mine * correct)) / denominator
    if not _matches(mine, factor * correct, 1e-6) or abs(factor) < 1e-12:
        return None
    if abs(factor + 1) < 1e-6:
        return "yours is exactly minus the correct value: a sign is flipped"
    if factor < 1:
        return (f"yours is {factor:.4g} times the correct value (1/{1 / factor:.4g}): did you divide by a count, "
                "a mean where a sum belongs?")
    return f"yours is {factor:.4g} times the correct value: something is counted {factor:.4g} times"


def _border_hint(wrong):
    """All wrong entries of an image gradient within a pixel or two of the border: padding."""
    h, w = wrong.shape[2:]
    rows, cols = numpy.nonzero(wrong.any(axis=(0, 1)))
    near = numpy.minimum.reduce([rows, cols, h - 1 - rows, w - 1 - cols])
    if near.size and near.max() <= 1:
        return ("only entries next to the image border are wrong: check the padding (col2im must drop the "
                "columns that read the zero padding, which has no gradient)")
    return None


def _dy_unchanged(report, name, dy_before, dy_after) -> bool:
    changed = numpy.abs(_host(dy_after) - dy_before) > 0
    if changed.any():
        report.add(False, f"{name} wrote into dy ({int(changed.sum())} of {changed.size} entries changed)",
                   ["a backward must never change the dy it is given: at a residual join the same dy also flows "
                    "into the shortcut, which would then get the wrong gradient. Work on a new array "
                    "(dz = dy * mask, not dy *= mask)"], key=("dy",))
        return False
    return True


def _numeric(forward, array, dy, rng, entries=FD_ENTRIES):
    """(picked flat indices, central-difference gradient there) of sum(forward() * dy) w.r.t. ``array``."""
    picked = numpy.sort(rng.choice(array.size, min(entries, array.size), replace=False))
    return picked, numerical_gradient(forward, array, dy, indices=picked)


# ----------------------------------------------------------------------------------------------
# 1. Convolution backward
# ----------------------------------------------------------------------------------------------

CONV_SETTINGS = [
    # (x shape, weight shape, stride, padding)
    ((2, 3, 5, 5), (4, 3, 3, 3), 1, 1),
    ((3, 2, 7, 6), (5, 2, 3, 2), 2, 0),
    ((2, 4, 6, 6), (4, 4, 3, 3), 1, 1),   # as many outputs as inputs: a swapped weight transpose fits
]


def check_conv_backward(conv_backward) -> Report:
    """Check ``conv_backward(dy, x, weight, stride, padding) -> (dx, dweight, dbias)``.

    The forward is minisd's ``F.conv2d_forward(x, weight, bias, stride, padding)`` (a
    cross-correlation with a bias per output channel). x: (N, C, H, W), weight: (O, C, kh, kw),
    dy: (N, O, Ho, Wo); dbias: (O,).
    """
    report = Report("conv_backward")
    call = "conv_backward(dy, x, weight, stride, padding)"
    rng = numpy.random.default_rng(13)
    try:
        for x_shape, w_shape, stride, padding in CONV_SETTINGS:
            x = rng.standard_normal(x_shape)
            weight = rng.standard_normal(w_shape)
            bias = rng.standard_normal(w_shape[0])
            y, cache = F.conv2d_forward(x, weight, bias, stride, padding)
            dy = numpy.ascontiguousarray(rng.standard_normal(y.shape))
            dx, dweight, dbias = (_host(g) for g in F.conv2d_backward(dy.copy(), cache))
            dy_given = dy.copy()
            result = _call(conv_backward, "conv_backward", call, dy_given, x.copy(), weight.copy(), stride, padding)
            report.note(f"x {x_shape}, weight {w_shape}, stride {stride}, padding {padding}:")
            if not isinstance(result, (tuple, list)) or len(result) != 3:
                raise _StudentError(f"conv_backward returned {type(result).__name__}"
                                    f"{'' if not isinstance(result, (tuple, list)) else ' of length ' + str(len(result))}"
                                    "; it must return three arrays: (dx, dweight, dbias)")
            mine = [_as_array(v, n, s.shape) for v, n, s in zip(result, ("dx", "dweight", "dbias"), (dx, dweight, dbias))]
            _dy_unchanged(report, "conv_backward", dy, dy_given)

            def forward():
                return F.conv2d_forward(x, weight, bias, stride, padding)[0]

            o, c, kh, kw = w_shape
            n = x_shape[0]
            # What common mistakes give, computed from the correct per-sample shares.
            shares = [_host(F.conv2d_backward(numpy.where(numpy.arange(n)[:, None, None, None] == k, dy, 0.0),
                                              F.conv2d_forward(x, weight, bias, stride, padding)[1])[1])
                      for k in range(n)]
            weight_hints = [
                (dweight.reshape(o, -1).T.reshape(-1).reshape(w_shape),
                 "your dweight holds the right numbers in the wrong order: it is the transpose of dY @ cols.T "
                 "read as (O, C, kh, kw). Compute dY (O, N*Ho*Wo) @ cols.T (N*Ho*Wo, C*kh*kw) and reshape that"),
                (dweight.transpose(1, 0, 2, 3) if o == c else None,
                 "your dweight has the input and output channels swapped (a transposed weight gradient): "
                 "dweight[o, c] is the gradient of weight[o, c]"),
                (dweight[:, :, ::-1, ::-1],
                 "your dweight is flipped in both kernel axes: the forward is a cross-correlation "
                 "(no kernel flip), so its weight gradient is not flipped either"),
                (dweight / n, "yours is the correct value divided by the batch size: the weight is shared by all "
                              "samples, its gradient is the SUM of their shares (the loss already took the mean)"),
            ] + [(share, f"yours is the share of sample {k} alone: sum the shares of every sample in the batch "
                         "(a loop that overwrites instead of adding, or a missing sum over the batch)")
                 for k, share in enumerate(shares)]
            bias_hints = [(_host(dy[0].sum(axis=(1, 2))), "yours sums the first sample only: sum over the batch too"),
                          (_host(dy.mean(axis=(0, 2, 3))), "yours is a mean: the bias gradient is the sum of dy over "
                                                           "the batch and every output position")]
            _compare(report, "dx", mine[0], dx, numeric=_numeric(forward, x, dy, rng))
            _compare(report, "dweight", mine[1], dweight, weight_hints, numeric=_numeric(forward, weight, dy, rng))
            _compare(report, "dbias", mine[2], dbias, bias_hints, numeric=_numeric(forward, bias, dy, rng))
    except _StudentError as problem:
        report.stop(str(problem))
    return report


# ----------------------------------------------------------------------------------------------
# 2. Batch norm backward
# ----------------------------------------------------------------------------------------------

BN_SETTINGS = [(4, 3, 5, 5), (2, 5, 3, 4), (8, 2, 1, 1)]


def check_batch_norm_backward(batch_norm_backward) -> Report:
    """Check ``batch_norm_backward(dy, x, gamma, eps) -> (dx, dgamma, dbeta)`` in training mode.

    The forward: per channel c, mean and (biased) variance over (N, H, W), x_hat = (x - mean) /
    sqrt(var + eps), y = gamma[c] * x_hat + beta[c]. x, dy: (N, C, H, W); gamma: (C,).
    """
    report = Report("batch_norm_backward")
    call = "batch_norm_backward(dy, x, gamma, eps)"
    rng = numpy.random.default_rng(23)
    eps = 1e-5
    try:
        for shape in BN_SETTINGS:
            channels = shape[1]
            x = rng.standard_normal(shape) * 2.0 + 0.5
            gamma = rng.standard_normal(channels) + 1.0
            beta = rng.standard_normal(channels)
            y, cache = F.batch_norm_forward(x, gamma, beta, training=True, eps=eps)
            dy = numpy.ascontiguousarray(rng.standard_normal(y.shape))
            dx, dgamma, dbeta = (_host(g) for g in F.batch_norm_backward(dy.copy(), cache))
            dy_given = dy.copy()
            result = _call(batch_norm_backward, "batch_norm_backward", call, dy_given, x.copy(), gamma.copy(), eps)
            report.note(f"x {shape}:")
            if not isinstance(result, (tuple, list)) or len(result) != 3:
                raise _StudentError("batch_norm_backward must return three arrays: (dx, dgamma, dbeta)")
            mine = [_as_array(v, n, s.shape) for v, n, s in zip(result, ("dx", "dgamma", "dbeta"), (dx, dgamma, dbeta))]
            _dy_unchanged(report, "batch_norm_backward", dy, dy_given)

            def forward():
                return F.batch_norm_forward(x, gamma, beta, training=True, eps=eps)[0]

            axes = (0, 2, 3)
            mean = x.mean(axis=axes, keepdims=True)
            inv_std = 1.0 / numpy.sqrt(x.var(axis=axes, keepdims=True) + eps)
            x_hat = (x - mean) * inv_std
            g = gamma.reshape(1, -1, 1, 1)
            dy_mean = dy.mean(axis=axes, keepdims=True)
            proj = (dy * x_hat).mean(axis=axes, keepdims=True)
            dx_hints = [
                (g * inv_std * dy, "this is dx with the mean and variance held fixed (evaluation mode). In training "
                                   "they are computed from x, so dx has two more terms: "
                                   "dx = gamma * inv_std * (dy - mean(dy) - x_hat * mean(dy * x_hat))"),
                (g * inv_std * (dy - dy_mean), "the variance term is missing: subtract x_hat * mean(dy * x_hat) too"),
                (g * inv_std * (dy - x_hat * proj), "the mean term is missing: subtract mean(dy) too (the mean is "
                                                    "computed from x, so it carries gradient)"),
                (inv_std * (dy - dy_mean - x_hat * proj), "gamma is missing: y = gamma * x_hat + beta, so dx_hat = gamma * dy"),
            ]
            sum_hints = [(_host((dy * x_hat)[0].sum(axis=(1, 2))), "yours sums the first sample only: sum over the batch too"),
                         (_host(dy[0].sum(axis=(1, 2))), "yours sums the first sample only: sum over the batch too"),
                         (_host(dy.mean(axis=axes)), "yours is a mean: dbeta is the sum of dy over (N, H, W)"),
                         (_host((dy * x_hat).mean(axis=axes)), "yours is a mean: dgamma is the sum of dy * x_hat over (N, H, W)")]
            _compare(report, "dx", mine[0], dx, dx_hints, numeric=_numeric(forward, x, dy, rng))
            _compare(report, "dgamma", mine[1], dgamma, sum_hints, numeric=_numeric(forward, gamma, dy, rng))
            _compare(report, "dbeta", mine[2], dbeta, sum_hints, numeric=_numeric(forward, beta, dy, rng))
    except _StudentError as problem:
        report.stop(str(problem))
    return report


# ----------------------------------------------------------------------------------------------
# 3. BasicBlock backward
# ----------------------------------------------------------------------------------------------


def block_forward(block, x):
    """Run ``block.forward(x)`` and return (y, saved): what a backward of the block needs.

    saved["relu_mask"]: where the output ReLU let the value through (y > 0), shape of y;
    saved["gate"]: True (kept) or False (dropped) in batch mode, one bool per sample in row mode;
    saved["multiplier"]: the number a kept branch was multiplied by (1/p with ``scale="train"``,
    else 1). The branch and the shortcut keep their own caches: call ``block.branch.backward`` and
    ``block.shortcut.backward`` as their forward ran (the branch only if it ran).
    """
    y = block.forward(x)
    gate = block.gate
    multiplier = 1.0 / block.survival_prob if block.scale == "train" else 1.0
    return y, {"relu_mask": _host(y) > 0, "gate": gate, "multiplier": multiplier}


def _reference_block_backward(block, dy, saved, relu_mask=True, scale=True, shortcut=True, branch=True):
    """The block's backward written out, with switches that plant the common mistakes.

    dz = dy * mask (ReLU); dx = shortcut.backward(dz) + branch.backward(gate * multiplier * dz), the
    branch only when it ran.
    """
    xp = backend.array_module(dy)
    dz = dy * xp.asarray(saved["relu_mask"]) if relu_mask else dy.copy()
    gate = saved["gate"]
    dx = block.shortcut.backward(dz) if shortcut else 0.0
    ran = bool(numpy.any(gate))
    if branch and ran:
        df = dz
        if scale:
            factor = numpy.asarray(gate, dtype=float) * saved["multiplier"]
            df = dz * (xp.asarray(factor).reshape(-1, 1, 1, 1) if factor.ndim else factor)
        dx = dx + block.branch.backward(df)
    return dx


BLOCK_SETTINGS = [
    # (what, in channels, out channels, stride, mode, scale, gate)
    ("kept gate", 3, 3, 1, "batch", "eval", True),
    ("dropped gate", 3, 3, 1, "batch", "eval", False),
    ("row mode (samples 1 and 3 dropped), inverted scaling", 3, 3, 1, "row", "train",
     numpy.array([True, False, True, False])),
    ("transition block (stride 2, 3 -> 6 channels), kept", 3, 6, 2, "batch", "eval", True),
]


def _make_block(in_ch, out_ch, stride, mode, scale, gate, seed):
    block = residual.BasicBlock(in_ch, out_ch, stride=stride, survival_prob=0.7, mode=mode, scale=scale,
                                dtype="float64", rng=numpy.random.default_rng(seed),
                                gate_rng=numpy.random.default_rng(seed))
    block.force_gate(gate)
    return block


def _counting(module):
    """Count calls of module.backward (on the instance; removed with ``del module.backward``)."""
    calls = []
    original = module.backward

    def backward(dy):
        calls.append(1)
        return original(dy)

    module.backward = backward
    return calls


def check_block_backward(block_backward) -> Report:
    """Check ``block_backward(block, dy, saved) -> dx`` for a BasicBlock whose forward was
    ``y, saved = exercises.block_forward(block, x)``.

    It must add the branch's parameter gradients (by calling ``block.branch.backward``) only when
    the branch ran, never call it for a dropped gate, and return dL/dx, shape of x.
    """
    report = Report("block_backward")
    call = "block_backward(block, dy, saved)"
    rng = numpy.random.default_rng(31)
    try:
        for k, (what, in_ch, out_ch, stride, mode, scale, gate) in enumerate(BLOCK_SETTINGS):
            report.note(f"{what}:")
            x = backend.to_device(rng.standard_normal((4, in_ch, 6, 6)), dtype="float64")
            block = _make_block(in_ch, out_ch, stride, mode, scale, gate, seed=k)
            y, saved = block_forward(block, x)
            dy = backend.to_device(rng.standard_normal(y.shape), dtype="float64")

            def reference(**mistake):
                twin = _make_block(in_ch, out_ch, stride, mode, scale, gate, seed=k)
                _, twin_saved = block_forward(twin, x)
                dx = _reference_block_backward(twin, dy.copy(), twin_saved, **mistake)
                return _host(dx), {n: _host(g) for n, g in twin.named_grads()}

            dx, grads = reference()
            branch_calls = _counting(block.branch)
            dy_given = dy.copy()
            try:
                result = _call(block_backward, "block_backward", call, block, dy_given, saved)
            except _StudentError as problem:
                if not numpy.any(gate) and "backward called before forward" in str(problem):
                    raise _StudentError("block_backward called block.branch.backward for a dropped gate. The branch "
                                        "did not run in forward (b = 0), so there is nothing to differentiate: the "
                                        "gradient reaches x through the ReLU mask and the shortcut only") from None
                raise
            finally:
                _stop_counting(block.branch)
            mine = _as_array(result, "dx", dx.shape)
            _dy_unchanged(report, "block_backward", _host(dy), dy_given)
            if numpy.any(gate) and not branch_calls:
                report.add(False, "block.branch.backward was never called, but the branch ran",
                           ["its parameters got no gradient: call block.branch.backward(the branch's share of dz)"])
            elif numpy.any(gate) and len(branch_calls) > 1:
                report.add(False, f"block.branch.backward was called {len(branch_calls)} times",
                           ["call it once per backward: each call adds into the parameter gradients again"])
            hints = [(reference(relu_mask=False)[0], "the ReLU mask is missing: the block ends with a ReLU, so first "
                                                      "dz = dy * saved['relu_mask'], then the shortcut and the branch"),
                     (reference(scale=False)[0] if mode == "row" or scale == "train" else None,
                      "the branch's share is not scaled: in row mode multiply dz by the gate of each sample (dropped "
                      "samples get nothing through the branch), and by saved['multiplier']"),
                     (reference(shortcut=False)[0] if numpy.any(gate) else None,
                      "the shortcut's gradient is missing: paths that merge in forward add up in backward, "
                      "dx = shortcut.backward(dz) + branch.backward(...)"),
                     (reference(branch=False)[0] if numpy.any(gate) else None,
                      "the branch's gradient is missing from dx: add what block.branch.backward returns")]
            fd_block = _make_block(in_ch, out_ch, stride, mode, scale, gate, seed=k)
            x_fd = _host(x).copy()
            numeric = _numeric(lambda: _host(fd_block.forward(backend.to_device(x_fd, dtype="float64"))), x_fd,
                               _host(dy), rng)
            _compare(report, "dx", mine, dx, hints, numeric=numeric)
            for name, _ in block.named_grads():
                if not name.startswith("branch."):
                    continue
                got = _host(dict(block.named_grads())[name])
                if not numpy.any(gate) and got.any():
                    report.add(False, f"{name} got gradient although the branch was dropped",
                               ["a dropped branch is not differentiated: its parameters end the step with zero gradient"])
                    break
                if not _matches(got, grads[name]):
                    _compare(report, f"grad {name}", got, grads[name])
                    break
            else:
                report.add(True, "branch parameter gradients " + ("stay zero (dropped)" if not numpy.any(gate)
                                                                   else "are correct"))
    except _StudentError as problem:
        report.stop(str(problem))
    return report


# ----------------------------------------------------------------------------------------------
# 4. The linear-decay schedule and the test-time rule
# ----------------------------------------------------------------------------------------------

SCHEDULE_SETTINGS = [(3, 0.5), (27, 0.5), (54, 0.2), (1, 0.8)]


def check_schedule(linear_decay) -> Report:
    """Check ``linear_decay(num_blocks, final_survival) -> [p_1, ..., p_L]`` (p_l = 1 - l/L (1 - p_L))."""
    report = Report("linear_decay")
    call = "linear_decay(num_blocks, final_survival)"
    try:
        for blocks, final in SCHEDULE_SETTINGS:
            correct = numpy.asarray(residual.linear_decay(blocks, final), dtype=float)
            result = _call(linear_decay, "linear_decay", call, blocks, final)
            if isinstance(result, (map, filter, zip)) or type(result).__name__ == "generator":
                result = list(result)  # an iterator of numbers is a fine answer
            mine = _as_numbers(result, "linear_decay's result", f"a list of {blocks} probabilities, one per block")
            mine = mine.reshape(-1) if mine.ndim <= 1 else mine
            label = f"L = {blocks}, p_L = {final}"
            if mine.shape != correct.shape:
                report.add(False, f"{label}: {mine.size} probabilities, expected {blocks} (one per residual block)",
                           ["hint: l runs from 1 to L (block 1 is next to the stem, block L next to the head)"])
                continue
            levels = numpy.arange(1, blocks + 1)
            hints = [(1 - (levels - 1) / blocks * (1 - final), "you count the blocks from 0: the paper's l runs from "
                                                               "1 to L, so p_1 < 1 and p_L is exactly the final value"),
                     (correct[::-1], "reversed: blocks near the input survive most often (p_1 close to 1), the last "
                                     "block has p_L"),
                     (1 - levels / blocks * final, "p_L is the survival probability of the last block: "
                                                   "p_l = 1 - (l / L) (1 - p_L)")]
            if blocks > 1:
                hints.append((1 - (levels - 1) / (blocks - 1) * (1 - final),
                              "you divide by L - 1: the paper divides by L (p_1 is a little below 1)"))
            _compare(report, "p", mine, correct, hints, label=label)
    except _StudentError as problem:
        report.stop(str(problem))
    return report


def check_test_time_rule(block_output_at_test_time) -> Report:
    """Check ``block_output_at_test_time(branch_out, shortcut_out, p) -> y``: the paper's test-time
    rule for a block, y = ReLU(p * branch_out + shortcut_out)."""
    report = Report("block_output_at_test_time")
    call = "block_output_at_test_time(branch_out, shortcut_out, p)"
    rng = numpy.random.default_rng(41)
    try:
        for p in (0.5, 0.8, 1.0):
            branch = rng.standard_normal((2, 3, 4, 4))
            shortcut = rng.standard_normal((2, 3, 4, 4))
            given = (branch.copy(), shortcut.copy())
            first = _call(block_output_at_test_time, "block_output_at_test_time", call, given[0], given[1], p)
            mine = _as_array(first, "y", branch.shape)
            if not (numpy.array_equal(given[0], branch) and numpy.array_equal(given[1], shortcut)):
                report.add(False, "block_output_at_test_time changed its inputs",
                           ["compute y in a new array; the branch and shortcut outputs may be used elsewhere"])
            again = _as_array(_call(block_output_at_test_time, "block_output_at_test_time", call, branch.copy(),
                                    shortcut.copy(), p), "y", branch.shape)
            correct = numpy.maximum(p * branch + shortcut, 0.0)
            if not numpy.array_equal(again, mine):
                report.add(False, f"p = {p}: two calls with the same inputs gave different outputs",
                           ["no gate is drawn at test time: every branch runs, scaled by p (the expectation of "
                            "the training-time gate)"])
                continue
            hints = [(numpy.maximum(branch + shortcut, 0.0), "the branch is not scaled: at test time it is "
                                                              "multiplied by p, its expected gate"),
                     (p * branch + shortcut, "the ReLU after the sum is missing: y = ReLU(p * f(x) + shortcut(x))"),
                     (numpy.maximum(branch / p + shortcut, 0.0), "dividing by p is the inverted rule's training-time "
                                                                 "scaling; the paper multiplies by p at test time"),
                     (numpy.maximum((1 - p) * branch + shortcut, 0.0), "p is the survival probability: scale by p, "
                                                                       "not by 1 - p")]
            _compare(report, "y", mine, correct, hints, label=f"p = {p}")
    except _StudentError as problem:
        report.stop(str(problem))
    return report

