"""Shared grading: compare with the reference, name the mistake, compare with finite differences,
and take minisd's own answer away while the student's function runs."""
from __future__ import annotations

import contextlib
import sys

import numpy

from minisd import kernels
from minisd.exercises._report import Delegated, StudentError, host
from minisd.gradcheck import numerical_gradient

TOLERANCE = 1e-7          # float64 results against the reference, relative to the largest entry
FD_ENTRIES = 12           # entries per array checked by finite differences (each costs two forwards)


# ----------------------------------------------------------------------------------------------
# Stand-ins: minisd's own answer is unavailable while the student's function runs
# ----------------------------------------------------------------------------------------------


def tier_functions(*names) -> list:
    """The functions called ``names`` in both kernel tiers (the reference and the fast one)."""
    found = []
    for tier in kernels.TIERS:
        module = kernels.tier(tier)
        found += [getattr(module, name) for name in names if hasattr(module, name)]
    return found


def _stand_in(what: str, name: str, record: list):
    message = f"{name} calls minisd's own {what}; write it yourself."

    def stand_in(*args, **kwargs):
        record.append(message)
        raise Delegated(message)

    stand_in.__name__ = f"unavailable_{what.split('(')[0].replace('.', '_')}"
    return stand_in


@contextlib.contextmanager
def unavailable(student_fn, name: str, functions: dict, methods=()):
    """While the block runs, every reference to minisd's own answer raises (and is recorded).

    functions: {words for the message: [function objects]}; each is replaced wherever a loaded
    minisd module or the student's globals hold it (so ``F.x``, ``from minisd.functional import x``
    and the fast tier's ``x`` are all caught). methods: [(class, attribute, words)].

    A student's function that *is* minisd's (``check(residual.linear_decay)``) is refused at once.
    On leaving, even after sys.exit or a deleted attribute, every original is put back, and if any
    stand-in was called the answer fails with one sentence (also when the student caught the error).
    """
    record: list = []
    by_id = {id(f): what for what, fs in functions.items() for f in fs}
    originals = {id(f): f for fs in functions.values() for f in fs}
    if id(student_fn) in by_id or id(getattr(student_fn, "__func__", None)) in by_id:
        raise StudentError(f"{name} is minisd's own {by_id.get(id(student_fn)) or by_id[id(student_fn.__func__)]}; "
                           "write it yourself.")
    patches = []  # (setter target, key, original, is_dict)
    namespaces = [(m, False) for n, m in list(sys.modules.items()) if n == "minisd" or n.startswith("minisd.")]
    student_globals = getattr(student_fn, "__globals__", None)
    if isinstance(student_globals, dict):
        namespaces.append((student_globals, True))
    for space, is_dict in namespaces:
        items = space.items() if is_dict else vars(space).items()
        for key, value in list(items):
            if id(value) in by_id and value is originals[id(value)]:
                patches.append((space, key, value, is_dict))
    for cls, attribute, what in methods:
        patches.append((cls, attribute, cls.__dict__[attribute], False))
        by_id[id(cls.__dict__[attribute])] = what
    try:
        for space, key, value, is_dict in patches:
            replacement = _stand_in(by_id[id(value)], name, record)
            if is_dict:
                space[key] = replacement
            else:
                setattr(space, key, replacement)
        try:
            yield record
        except StudentError:
            if record:  # the student's function caught the stand-in's error and failed later
                raise StudentError(record[0]) from None
            raise
    finally:
        for space, key, value, is_dict in patches:
            if is_dict:
                space[key] = value
            else:
                setattr(space, key, value)
    if record:
        raise StudentError(record[0])


def graded_call(student_fn, name, call, args, functions=None, methods=()):
    """Call the student's function with minisd's answer unavailable; returns what it returned."""
    from minisd.exercises._report import call_student  # noqa: PLC0415

    with unavailable(student_fn, name, functions or {}, methods):
        result = call_student(student_fn, name, call, *args)
    return result


# ----------------------------------------------------------------------------------------------
# Comparisons and hints
# ----------------------------------------------------------------------------------------------


def rel_error(mine, correct) -> float:
    """Largest entry difference over the largest correct entry (0 when both are zero)."""
    scale = float(numpy.max(numpy.abs(correct))) if correct.size else 0.0
    diff = float(numpy.max(numpy.abs(mine - correct))) if correct.size else 0.0
    return diff / scale if scale > 0 else diff


def matches(mine, correct, tol=TOLERANCE) -> bool:
    return mine.shape == correct.shape and bool(numpy.all(numpy.isfinite(mine))) and rel_error(mine, correct) < tol


def _entry_text(name, index, mine, correct) -> str:
    where = ", ".join(str(int(i)) for i in index)
    return f"e.g. {name}[{where}]: yours {mine[index]:+.5g}, correct {correct[index]:+.5g}"


def _shape_hints(name, mine, correct, details):
    if mine.ndim == correct.ndim + 1 and mine.shape[1:] == correct.shape:
        details.append("hint: it has an extra batch axis in front: the gradient of a parameter shared by all "
                       "samples is the SUM of the samples' shares")
    elif mine.ndim == 2 and correct.ndim == 1 and mine.shape[1] == correct.shape[0]:
        details.append("hint: one row per sample: sum over the batch axis as well")
    elif mine.size == correct.size and mine.ndim == 2 and correct.ndim == 4 and \
            mine.shape[::-1] == (correct.shape[0], mine.size // correct.shape[0]):
        details.append("hint: this is the transpose of the (out, in*kh*kw) matrix the weight gradient should be: "
                       "the two factors of your product are in the wrong order")
    elif mine.ndim == 2 and correct.ndim == 2 and mine.shape == correct.shape[::-1]:
        details.append("hint: rows and columns are swapped (a transposed matrix)")


def compare(report, name, mine, correct, hints=(), numeric=None, label=None):
    """Check one result against the reference; on a mismatch say where and why (hints: a list of
    (what the mistake would give, the hint), tried in order)."""
    label = label or name
    if mine.shape != correct.shape:
        details = [f"your {name} has shape {mine.shape}; expected {correct.shape}"]
        _shape_hints(name, mine, correct, details)
        report.add(False, f"{label}: wrong shape", details, key=(name, "shape"))
        return False
    if not numpy.all(numpy.isfinite(mine)):
        report.add(False, f"{label}: has {int((~numpy.isfinite(mine)).sum())} entries that are NaN or infinite")
        return False
    error = rel_error(mine, correct)
    if error < TOLERANCE:
        fd = ""
        if numeric is not None:
            picked, values = numeric
            fd = f"; finite differences agree to {rel_error(mine.reshape(-1)[picked], values):.1e}"
        report.add(True, f"{label}: correct (relative error {error:.1e}{fd})")
        return True
    wrong = numpy.abs(mine - correct) > TOLERANCE * max(float(numpy.max(numpy.abs(correct))), 1e-300)
    worst = numpy.unravel_index(int(numpy.argmax(numpy.abs(mine - correct))), mine.shape)
    details = [f"wrong in {int(wrong.sum())} of {wrong.size} entries; relative error {error:.2g} "
               f"(should be below {TOLERANCE:.0e})", _entry_text(name, worst, mine, correct)]
    if numeric is not None:
        picked, values = numeric
        details.append(f"finite differences agree with the correct values to "
                       f"{rel_error(correct.reshape(-1)[picked], values):.1e}, with yours to "
                       f"{rel_error(mine.reshape(-1)[picked], values):.1e}")
    hint = next((h for alternative, h in hints if alternative is not None and matches(mine, alternative, 1e-6)), None)
    if hint is None:
        hint = factor_hint(mine, correct)
    if hint is None and name == "dx" and wrong.ndim == 4 and wrong.any():
        hint = border_hint(wrong)
    if hint:
        details.append("hint: " + hint)
    report.add(False, f"{label}: wrong", details, key=(name, hint))
    return False


def factor_hint(mine, correct):
    """A constant factor between yours and the correct values (e.g. a mean where a sum belongs)."""
    denominator = float(numpy.sum(correct * correct))
    if denominator == 0:
        return None
    factor = float(numpy.sum(mine * correct)) / denominator
    if not matches(mine, factor * correct, 1e-6) or abs(factor) < 1e-12:
        return None
    if abs(factor + 1) < 1e-6:
        return "yours is exactly minus the correct value: a sign is flipped"
    if factor < 1:
        return (f"yours is {factor:.4g} times the correct value (1/{1 / factor:.4g}): did you divide by a count, "
                "a mean where a sum belongs?")
    return f"yours is {factor:.4g} times the correct value: something is counted {factor:.4g} times"


def border_hint(wrong):
    """All wrong entries of an image gradient within a pixel or two of the border: padding."""
    h, w = wrong.shape[2:]
    rows, cols = numpy.nonzero(wrong.any(axis=(0, 1)))
    near = numpy.minimum.reduce([rows, cols, h - 1 - rows, w - 1 - cols])
    if near.size and near.max() <= 1:
        return ("only entries next to the image border are wrong: check the padding (the zero padding is not "
                "an input: it has no gradient)")
    return None


def dy_unchanged(report, name, dy_before, dy_after) -> bool:
    changed = numpy.abs(host(dy_after) - dy_before) > 0
    if changed.any():
        report.add(False, f"{name} wrote into dy ({int(changed.sum())} of {changed.size} entries changed)",
                   ["a backward must never change the dy it is given: at a residual join the same dy also flows "
                    "into the shortcut, which would then get the wrong gradient. Work on a new array "
                    "(dz = dy * mask, not dy *= mask)"], key=("dy",))
        return False
    return True


def numeric(forward, array, dy, rng, entries=FD_ENTRIES):
    """(picked flat indices, central-difference gradient there) of sum(forward() * dy) w.r.t. ``array``."""
    picked = numpy.sort(rng.choice(array.size, min(entries, array.size), replace=False))
    return picked, numerical_gradient(forward, array, dy, indices=picked)
