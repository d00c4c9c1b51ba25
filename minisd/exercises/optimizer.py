"""Exercise 8: SGD with momentum, Nesterov and weight decay, and what it does to dropped branches."""
from __future__ import annotations

import numpy

from minisd import layers, optim
from minisd.exercises._grading import compare, graded_call
from minisd.exercises._report import Report, StudentError

SGD_SETTINGS = [
    # (what, momentum, nesterov, weight_decay, skip_unused)
    ("momentum 0.9", 0.9, False, 0.0, False),
    ("momentum 0.9, Nesterov, weight decay 0.01", 0.9, True, 0.01, False),
    ("the same, skip_unused=True", 0.9, True, 0.01, True),
    ("no momentum, weight decay 0.01", 0.0, False, 0.01, False),
]
LR = 0.1
STEPS = 3            # the second layer is "dropped" (zero gradient, none received) in step 2


def _model(seed):
    return layers.Sequential(layers.Linear(3, 4, dtype="float64", rng=numpy.random.default_rng(seed)),
                             layers.Linear(4, 2, dtype="float64", rng=numpy.random.default_rng(seed + 1)))


def _step_gradients(model, rng, step):
    """Set this step's gradients and grad_received flags; the second layer is dropped in step 2."""
    model.zero_grad()
    for name, module, key in model.parameter_slots():
        if step == 1 and name.startswith("1."):
            continue  # a dropped branch: zero gradient, grad_received stays False
        module.grads[key][...] = rng.standard_normal(module.grads[key].shape)
        module.grad_received = True


def _by_hand(params, grads, buffers, received, momentum, nesterov, weight_decay, skip_unused, mistake=None):
    """The update written out, with a planted mistake (for hints)."""
    for name, p in params.items():
        if skip_unused and not received[name] and mistake not in ("ignores skip",):
            if mistake == "skip keeps decaying buffer" and name in buffers:
                buffers[name] *= momentum
            continue
        g = grads[name]
        decay = weight_decay * p
        if mistake != "decay outside momentum":
            g = g + decay
        if momentum:
            if name not in buffers:
                buffers[name] = g.copy()
            else:
                buffers[name] = momentum * buffers[name] + g
            g = g + momentum * buffers[name] if nesterov and mistake != "no nesterov" else buffers[name]
        if mistake == "decay outside momentum":
            g = g + decay
        p -= LR * g


MISTAKES = {
    "decay outside momentum": "the weight decay is added after the momentum: it belongs in the gradient (g + wd * p) "
                              "before the gradient enters the momentum buffer, as PyTorch does",
    "no nesterov": "this is classical momentum: with nesterov=True the step looks ahead along the buffer once more",
    "ignores skip": "skip_unused is ignored: a parameter whose module received no gradient this step (a dropped "
                    "branch) must not move at all, neither by weight decay nor by momentum",
    "skip keeps decaying buffer": "a skipped parameter must not move, and its momentum buffer must not change either "
                                  "(as if the step had not happened for it)",
}


def check_sgd_step(sgd_step) -> Report:
    """Check ``sgd_step(params, grads, buffers, received, lr, momentum, nesterov, weight_decay,
    skip_unused)``: one SGD update, in place, of every array in the dict ``params`` (name -> array)
    with ``grads`` (same names); ``buffers`` (name -> momentum buffer, created at a parameter's first
    update) persists between calls; ``received`` (name -> bool) says whether the parameter's module got
    a gradient this step. The reference is minisd's ``optim.SGD`` (unavailable while it runs)."""
    report = Report("sgd_step")
    call = "sgd_step(params, grads, buffers, received, lr, momentum, nesterov, weight_decay, skip_unused)"
    methods = [(optim.SGD, "step", "SGD.step")]
    try:
        for k, (what, momentum, nesterov, weight_decay, skip_unused) in enumerate(SGD_SETTINGS):
            report.note(f"{what}, {STEPS} steps (the second layer dropped in step 2):")
            reference = _model(k)
            student = {n: p.copy() for n, p in reference.named_parameters()}
            planted = {m: ({n: p.copy() for n, p in reference.named_parameters()}, {}) for m in MISTAKES}
            sgd = optim.SGD(reference, lr=LR, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                            skip_unused=skip_unused)
            buffers: dict = {}
            rng = numpy.random.default_rng(100 + k)
            for step in range(STEPS):
                _step_gradients(reference, rng, step)
                grads = {n: g.copy() for n, g in reference.named_grads()}
                received = {n: m.grad_received for n, m, _ in reference.parameter_slots()}
                before = {n: p.copy() for n, p in student.items()}
                for mistake, (params, bufs) in planted.items():
                    _by_hand(params, grads, bufs, received, momentum, nesterov, weight_decay, skip_unused, mistake)
                correct_before = {n: p.copy() for n, p in reference.named_parameters()}
                sgd.step()
                result = graded_call(sgd_step, "sgd_step", call,
                                     (student, {n: g.copy() for n, g in grads.items()}, buffers, dict(received), LR,
                                      momentum, nesterov, weight_decay, skip_unused), {}, methods)
                if result is not None and not isinstance(result, dict):
                    raise StudentError(f"sgd_step returned {type(result).__name__}: update params in place "
                                       "(p -= ...) and return nothing")
                if any(not isinstance(v, numpy.ndarray) for v in student.values()):
                    raise StudentError("sgd_step replaced an entry of params by something that is not an array")
                mine = numpy.concatenate([(student[n] - before[n]).ravel() for n in student])
                correct = numpy.concatenate([(p - correct_before[n]).ravel() for n, p in reference.named_parameters()])
                hints = [(numpy.concatenate([(planted[m][0][n] - before[n]).ravel() for n in student])
                          if not all(numpy.allclose(planted[m][0][n], p) for n, p in reference.named_parameters())
                          else None, MISTAKES[m]) for m in MISTAKES]
                # Each planted run keeps its mistake from the first step on, as a student's function would.
                if not compare(report, "update", mine, correct, hints, label=f"step {step + 1}: every parameter's change"):
                    break
    except StudentError as problem:
        report.stop(str(problem))
    return report
