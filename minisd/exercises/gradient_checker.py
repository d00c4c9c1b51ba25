"""Exercise 4: a finite-difference gradient checker, graded on known-correct and known-wrong backwards."""
from __future__ import annotations

import numpy

from minisd import gradcheck
from minisd.exercises._grading import compare, graded_call
from minisd.exercises._report import Report, StudentError, as_array

_UNAVAILABLE = {f"gradcheck.{name}": [getattr(gradcheck, name)]
                for name in ("numerical_gradient", "check_pair", "check_module", "directional_check", "compare")}


def _functions(rng):
    """(name, forward(x) -> y, its exact gradient map dy -> dx, x) for the numerical_gradient check."""
    w = rng.standard_normal((4, 3))
    return [
        ("y = x ** 3 (element-wise)", lambda x: x ** 3, lambda x, dy: 3 * x ** 2 * dy, rng.standard_normal((3, 4))),
        ("y = x @ W", lambda x: x @ w, lambda x, dy: dy @ w.T, rng.standard_normal((2, 4))),
        ("y = tanh(x) * x.sum()", lambda x: numpy.tanh(x) * x.sum(),
         lambda x, dy: (1 - numpy.tanh(x) ** 2) * x.sum() * dy + numpy.sum(numpy.tanh(x) * dy),
         rng.standard_normal((5,))),
    ]


def _one_sided(f, x, dy, eps):
    base = float(numpy.sum(f() * dy))
    out = numpy.zeros(x.size)
    flat = x.reshape(-1)
    for i in range(x.size):
        keep = flat[i]
        flat[i] = keep + eps
        out[i] = (float(numpy.sum(f() * dy)) - base) / eps
        flat[i] = keep
    return out.reshape(x.shape)


def check_numerical_gradient(numerical_gradient) -> Report:
    """Check ``numerical_gradient(f, x, dy, eps) -> g``: the central-difference gradient of
    L = sum(f() * dy) with respect to the array x (f takes no arguments and reads x, which the
    function perturbs in place and must restore exactly). g has the shape of x. While it runs,
    minisd's gradcheck functions are unavailable."""
    report = Report("numerical_gradient")
    call = "numerical_gradient(f, x, dy, eps)"
    rng = numpy.random.default_rng(53)
    eps = 1e-4  # large enough that a one-sided difference (error ~ eps) shows, central (~ eps**2) does not
    try:
        for what, forward, exact, x in _functions(rng):
            dy = rng.standard_normal(forward(x).shape)
            correct = exact(x, dy)
            before = x.copy()
            result = graded_call(numerical_gradient, "numerical_gradient", call, (lambda: forward(x), x, dy, eps),
                                 _UNAVAILABLE)
            mine = as_array(result, "g", x.shape)
            if not numpy.array_equal(x, before):
                report.add(False, f"{what}: x is not restored after the check ({int((x != before).sum())} entries "
                                  "changed)", ["put each entry back to its value before moving to the next one "
                                               "(x - eps + eps is not always x in floating point: store the old value)"])
                x[...] = before
            diff = numpy.abs(mine - correct) if mine.shape == correct.shape else None
            close = diff is not None and bool(numpy.all(diff <= 1e-6 * numpy.abs(correct).max()))
            if close:
                report.add(True, f"{what}: agrees with the exact gradient (largest difference {diff.max():.1e})")
                continue
            hints = [(_one_sided(lambda: forward(x), x, dy, eps),
                      "this is a one-sided difference (f(x + eps) - f(x)) / eps: its error falls only as eps; "
                      "use both sides"),
                     (exact(x, numpy.ones_like(dy)), "dy is ignored (this is the gradient of sum(f())): weight the "
                                                     "outputs by dy before summing"),
                     ]
            compare(report, "g", mine, correct, hints, label=what)
    except StudentError as problem:
        report.stop(str(problem))
    return report


# ----------------------------------------------------------------------------------------------
# The checker itself, on known-correct and known-wrong backwards
# ----------------------------------------------------------------------------------------------


def _batch_norm(x, gamma):
    """Per-feature batch norm of (N, C) in training mode: y, and its exact backward."""
    mean, var = x.mean(axis=0), x.var(axis=0)
    inv_std = 1 / numpy.sqrt(var + 1e-5)
    x_hat = (x - mean) * inv_std
    return gamma * x_hat, lambda dy: gamma * inv_std * (dy - dy.mean(axis=0) - x_hat * (dy * x_hat).mean(axis=0))


def _cases(rng):
    """(what, forward(x) -> y, backward(dy) -> dx built on the same x, x, correct?, hint if the verdict is wrong)."""
    w = rng.standard_normal((4, 4))
    gamma = rng.standard_normal(4) + 1.5
    x_lin, x_bn, x_tanh = rng.standard_normal((3, 4)), rng.standard_normal((6, 4)) * 2 + 1, rng.standard_normal((3, 5))
    bn_backward = _batch_norm(x_bn, gamma)[1]
    ones = ("it accepts a batch-norm backward that returns dx = 0. The sum of a normalised feature does not depend "
            "on x, so with an all-ones dy (the plain sum of the outputs) every dx looks right: weight the outputs "
            "by a random dy")
    rejects = ("it rejects a correct backward: check the tolerance (finite differences in float64 agree to "
               "about 1e-7 of the largest entry, not exactly) and that forward and backward see the same x")
    accepts = "it accepts a wrong backward: compare every entry, with a tolerance near 1e-6 of the largest"
    return [
        ("linear, correct", lambda x: x @ w, lambda x, dy: dy @ w.T, x_lin, True, rejects),
        ("linear, transposed weight (dy @ W)", lambda x: x @ w, lambda x, dy: dy @ w, x_lin, False, accepts),
        ("batch norm, correct", lambda x: _batch_norm(x, gamma)[0], lambda x, dy: bn_backward(dy), x_bn, True, rejects),
        ("batch norm returning dx = 0", lambda x: _batch_norm(x, gamma)[0], lambda x, dy: numpy.zeros_like(x),
         x_bn, False, ones),
        ("batch norm, evaluation-mode dx", lambda x: _batch_norm(x, gamma)[0],
         lambda x, dy: gamma / numpy.sqrt(x.var(axis=0) + 1e-5) * dy, x_bn, False, accepts),
        ("tanh, correct", numpy.tanh, lambda x, dy: (1 - numpy.tanh(x) ** 2) * dy, x_tanh, True, rejects),
        ("tanh, sign flipped", numpy.tanh, lambda x, dy: (numpy.tanh(x) ** 2 - 1) * dy, x_tanh, False, accepts),
        ("tanh, one entry off by 1%", numpy.tanh,
         lambda x, dy: (1 - numpy.tanh(x) ** 2) * dy * numpy.where(numpy.arange(x.size).reshape(x.shape) == 7, 1.01, 1),
         x_tanh, False, accepts),
    ]


def check_gradient_checker(backward_is_correct) -> Report:
    """Check ``backward_is_correct(forward, backward, x, rng) -> bool``: True when
    ``backward(dy)`` is the gradient of sum(forward(x) * dy) for the given x (float64), judged with
    finite differences, False otherwise. rng: a NumPy Generator for any random numbers it needs.

    Graded on eight backwards, some correct, some wrong (one wrong only where an all-ones upstream
    gradient cannot see it). While it runs, minisd's gradcheck functions are unavailable.
    """
    report = Report("backward_is_correct")
    call = "backward_is_correct(forward, backward, x, rng)"
    rng = numpy.random.default_rng(59)
    try:
        for what, forward, backward, x, correct, hint in _cases(rng):
            given = x.copy()
            verdict = graded_call(backward_is_correct, "backward_is_correct", call,
                                  (forward, lambda dy, b=backward, g=given: b(g, dy), given,
                                   numpy.random.default_rng(rng.integers(1 << 31))), _UNAVAILABLE)
            if not isinstance(verdict, (bool, numpy.bool_)):
                raise StudentError(f"backward_is_correct returned {type(verdict).__name__}; return True or False")
            ok = bool(verdict) == correct
            report.add(ok, f"{what}: {'accepted' if verdict else 'rejected'}" + ("" if ok else
                       f" (it is {'correct' if correct else 'wrong'})"), [] if ok else ["hint: " + hint],
                       key=("verdict", hint))
    except StudentError as problem:
        report.stop(str(problem))
    return report
