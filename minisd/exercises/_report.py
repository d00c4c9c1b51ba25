"""What a student sees: a :class:`Report` of plain lines, and one line for an answer that cannot be
graded (not written yet, an exception, sys.exit, a value of the wrong type, minisd's own code)."""
from __future__ import annotations

import traceback

import numpy

from minisd import backend


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
        if key is not None and not ok:
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


class StudentError(Exception):
    """The student's function did not give a usable answer; the message says why, in one line."""


class Delegated(Exception):
    """Raised by a stand-in: the student's function called minisd's own version of the answer."""


def explain_exception(fn, name, call, exc) -> str:
    """"your function raised X: msg" plus the line of the student's code where it happened."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    message = f"{name} raised {type(exc).__name__}" + (f": {text}" if text else "")
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


def call_student(fn, name: str, call: str, *args, **kwargs):
    """Call the student's function; turn any failure into a StudentError with one plain line.

    Everything but Ctrl-C is caught: sys.exit() in a notebook cell would otherwise end the check
    with no report at all.
    """
    if not callable(fn):
        raise StudentError(f"{name} is a {type(fn).__name__}, not a function: pass the function itself, "
                           f"called as {call}")
    try:
        return fn(*args, **kwargs)
    except KeyboardInterrupt:
        raise
    except NotImplementedError:
        raise StudentError(f"{name} is not written yet (it raises NotImplementedError). Replace the "
                           "`raise NotImplementedError` line with your code, run that cell, then this one again.") from None
    except Delegated as exc:
        raise StudentError(str(exc)) from None
    except SystemExit as exc:
        raise StudentError(f"{name} called sys.exit({'' if exc.code is None else exc.code!r}): "
                           "return the answer instead of ending the program") from None
    except BaseException as exc:  # noqa: BLE001  (every mistake becomes a message, never a traceback)
        raise StudentError(explain_exception(fn, name, call, exc)) from None


def host(a):
    return numpy.asarray(backend.to_numpy(a), dtype=numpy.float64)


_NOT_NUMBERS = {"b": "true/false values", "c": "complex numbers", "U": "text", "S": "bytes", "O": "Python objects",
                "V": "records", "M": "dates", "m": "time spans"}


def as_numbers(value, name, expected: str, kinds="iuf"):
    """The student's value as a float64 host array if it holds real numbers; else a StudentError
    saying what it is instead (None, text, a dict, true/false values, complex numbers, objects:
    a float64 cast would turn "1.5" and True into numbers and drop an imaginary part with a warning).
    ``expected`` completes "return ...", e.g. "an array of shape (2, 3)"; ``kinds``: the NumPy dtype
    kinds accepted (as_array adds "b": a ReLU mask may be true/false values)."""
    if value is None:
        raise StudentError(f"{name} is None: return {expected}")
    if isinstance(value, (str, bytes, dict, set)) or callable(value):
        raise StudentError(f"{name} is a {type(value).__name__}, not {expected}")
    try:
        array = numpy.asarray(backend.to_numpy(value))
    except Exception:  # noqa: BLE001  (a ragged list, an object NumPy cannot read)
        raise StudentError(f"{name} is a {type(value).__name__} that is not an array of numbers; return "
                           f"{expected}") from None
    if array.dtype.kind not in kinds:
        raise StudentError(f"{name} holds {_NOT_NUMBERS.get(array.dtype.kind, str(array.dtype))}, not numbers: "
                           f"return {expected}")
    return array.astype(numpy.float64)


def as_array(value, name, expected_shape):
    """The student's value as a float64 host array, or a StudentError saying what it was instead."""
    return as_numbers(value, name, f"an array of shape {tuple(expected_shape)}", kinds="biuf")


def as_tuple(result, name, names):
    """A returned tuple of ``len(names)`` values, or one line saying what came back instead."""
    if not isinstance(result, (tuple, list)) or len(result) != len(names):
        got = type(result).__name__ + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else "")
        raise StudentError(f"{name} returned {got}; it must return {len(names)} values: ({', '.join(names)})")
    return result


def as_number(value, name):
    """A float from the student's value (a Python or NumPy number, or a size-1 array)."""
    if isinstance(value, (bool, numpy.bool_)) or value is None or isinstance(value, (str, bytes)):
        raise StudentError(f"{name} is {value!r} ({type(value).__name__}); expected a number")
    try:
        number = float(numpy.asarray(backend.to_numpy(value)).reshape(()))
    except Exception:  # noqa: BLE001
        raise StudentError(f"{name} is a {type(value).__name__}; expected one number") from None
    return number
