"""Exercise 6: the linear-decay survival schedule, the expected depth, and the time model fitted to
measured training steps."""
from __future__ import annotations

import time

import numpy

from minisd import models, residual
from minisd.exercises._grading import compare, graded_call
from minisd.exercises._report import Report, StudentError, as_number, as_numbers, as_tuple

SCHEDULE_SETTINGS = [(3, 0.5), (27, 0.5), (54, 0.2), (1, 0.8)]


def _schedule_functions():
    functions = {"linear_decay": [residual.linear_decay], "make_schedule": [residual.make_schedule],
                 "expected_active_blocks": [residual.expected_active_blocks]}
    # The straight-line fits live with the figures (fit_line only in newer versions): whichever exists.
    try:
        from minisd import plots  # noqa: PLC0415
    except ImportError:  # pragma: no cover
        plots = None
    for name in ("fit_step_time", "fit_line"):
        if hasattr(plots, name):
            functions[name] = [getattr(plots, name)]
    return functions, [(models.ResNetCifar, "expected_active_blocks", "ResNetCifar.expected_active_blocks")]


# Each mistake as a whole function of (L, p_L), so the same mistake gets the same hint at every L
# (at L = 1 several of them give the same single number).
SCHEDULE_MISTAKES = [
    (lambda levels, L, p: numpy.linspace(1.0, p, L),
     "your block 1 has p_1 = 1, and the last block p_L: that spreads L values from 1 to p_L (numpy.linspace). "
     "But p = 1 belongs to the input (l = 0), which is not a residual block: block 1 already decays a little"),
    (lambda levels, L, p: 1 - (levels - 1) / L * (1 - p),
     "you count the blocks from 0: the paper's l runs from 1 to L, so p_1 < 1 and p_L is exactly the final value"),
    (lambda levels, L, p: (1 - levels / L * (1 - p))[::-1],
     "reversed: blocks near the input survive most often (p_1 close to 1), the last block has p_L"),
    (lambda levels, L, p: 1 - levels / L * p,
     "p_L is the survival probability of the last block, not the probability that it is dropped"),
]


def check_schedule(linear_decay) -> Report:
    """Check ``linear_decay(num_blocks, final_survival) -> [p_1, ..., p_L]`` (p_l = 1 - l/L (1 - p_L)).
    While it runs, minisd's own schedules are unavailable."""
    report = Report("linear_decay")
    call = "linear_decay(num_blocks, final_survival)"
    functions, methods = _schedule_functions()
    try:
        answers = []
        for blocks, final in SCHEDULE_SETTINGS:
            result = graded_call(linear_decay, "linear_decay", call, (blocks, final), functions, methods)
            if isinstance(result, (map, filter, zip)) or type(result).__name__ == "generator":
                result = list(result)  # an iterator of numbers is a fine answer
            mine = as_numbers(result, "linear_decay's result", f"a list of {blocks} probabilities, one per block")
            answers.append(mine.reshape(-1) if mine.ndim == 0 else mine)
        # Which mistake explains every answer (decided on all settings at once).
        mistake = next((hint for fn, hint in SCHEDULE_MISTAKES
                        if all(a.shape == (L,) and numpy.allclose(a, fn(numpy.arange(1, L + 1), L, p), atol=1e-9)
                               for a, (L, p) in zip(answers, SCHEDULE_SETTINGS))), None)
        for mine, (blocks, final) in zip(answers, SCHEDULE_SETTINGS):
            correct = numpy.asarray(residual.linear_decay(blocks, final), dtype=float)
            label = f"L = {blocks}, p_L = {final}"
            if mine.shape != correct.shape:
                report.add(False, f"{label}: {mine.size} probabilities, expected {blocks} (one per residual block)",
                           ["hint: l runs from 1 to L (block 1 is next to the stem, block L next to the head)"],
                           key=("count",))
                continue
            compare(report, "p", mine, correct, [(mine, mistake)] if mistake else [], label=label)
    except StudentError as problem:
        report.stop(str(problem))
    return report


def check_expected_depth(expected_depth) -> Report:
    """Check ``expected_depth(probs) -> float``: the expected number of residual blocks that run in
    a training step when block l survives with probability probs[l-1]."""
    report = Report("expected_depth")
    functions, methods = _schedule_functions()
    try:
        for blocks, final in [(54, 0.5), (9, 0.5), (27, 0.2)]:
            probs = residual.linear_decay(blocks, final)
            mine = as_number(graded_call(expected_depth, "expected_depth", "expected_depth(probs)", (list(probs),),
                                         functions, methods), "expected_depth")
            correct = float(sum(probs))
            ok = abs(mine - correct) < 1e-9 * correct
            hint = []
            if not ok and abs(mine - correct / blocks) < 1e-9:
                hint = ["hint: that is the expected FRACTION of blocks; the question asks for their number"]
            elif not ok and abs(mine - final * blocks) < 1e-9:
                hint = ["hint: only the last block survives with p_L; each block l has its own p_l"]
            report.add(ok, f"L = {blocks}, p_L = {final}: yours {mine:.6g}, expected {correct:.6g}", hint)
    except StudentError as problem:
        report.stop(str(problem))
    return report


def time_steps(depth=14, steps=24, batch=16, seed=0):
    """Measure training steps of a small stochastic-depth ResNet with forced gates (each step drops a
    different number of blocks): returns (active_blocks, seconds), one entry per step, host-timed.

    A steady timing needs a quiet machine; the fit in exercise 6 is robust to a few slow steps.
    """
    from minisd import functional as F  # noqa: PLC0415

    model = models.resnet_cifar(depth=depth, num_classes=10, in_channels=1, seed=seed)
    rng = numpy.random.default_rng(seed)
    x = rng.standard_normal((batch, 1, 8, 8)).astype("float32")
    labels = rng.integers(0, 10, batch)
    blocks = len(model.blocks)
    active, seconds = [], []
    for step in range(steps + 2):
        k = step % (blocks + 1)
        gates = [bool(g) for g in rng.permutation([True] * k + [False] * (blocks - k))]
        model.force_gates(gates)
        model.zero_grad()
        start = time.perf_counter()
        loss, cache = F.softmax_cross_entropy_forward(model.forward(x), labels)
        model.backward(F.softmax_cross_entropy_backward(1.0, cache))
        if step >= 2:  # the first steps warm caches and buffers
            active.append(k)
            seconds.append(time.perf_counter() - start)
    return active, seconds


def _least_squares(k, t):
    design = numpy.stack([numpy.ones_like(k), k], axis=1)
    (fixed, per_block), *_ = numpy.linalg.lstsq(design, t, rcond=None)
    return float(fixed), float(per_block)


def check_time_model(fit_time_model, predicted_saving, active_blocks=None, seconds=None) -> Report:
    """Check ``fit_time_model(active_blocks, seconds) -> (fixed_s, per_block_s)`` (a least-squares line
    t = fixed + per_block * k through the measured steps) and ``predicted_saving(fixed_s, per_block_s,
    probs) -> fraction`` (1 - expected step time with survival probabilities probs / the time with
    every block). Without data, it measures :func:`time_steps` itself."""
    report = Report("time model")
    functions, methods = _schedule_functions()
    if active_blocks is None:
        active_blocks, seconds = time_steps()
    k = numpy.asarray(active_blocks, dtype=float)
    t = numpy.asarray(seconds, dtype=float)
    try:
        report.note(f"{k.size} measured steps, {int(k.min())} to {int(k.max())} blocks:")
        fixed, per_block = _least_squares(k, t)
        mine = as_tuple(graded_call(fit_time_model, "fit_time_model", "fit_time_model(active_blocks, seconds)",
                                    (list(active_blocks), list(seconds)), functions, methods),
                        "fit_time_model", ("fixed_s", "per_block_s"))
        mine_fixed, mine_per = as_number(mine[0], "fixed_s"), as_number(mine[1], "per_block_s")
        ok = abs(mine_fixed - fixed) <= 1e-6 * abs(t).max() and abs(mine_per - per_block) <= 1e-6 * abs(t).max()
        details = []
        if not ok:
            through_origin = float(numpy.dot(k, t) / numpy.dot(k, k))
            if abs(mine_fixed - per_block) < 1e-9 * abs(t).max() and abs(mine_per - fixed) < 1e-9 * abs(t).max():
                details = ["hint: you return (per_block_s, fixed_s): the order is (fixed_s, per_block_s)"]
            elif abs(mine_fixed) < 1e-15 and abs(mine_per - through_origin) < 1e-9 * abs(t).max():
                details = ["hint: your line goes through the origin: a step with no block still costs the stem, "
                           "the head, the loss (the fixed part)"]
        report.add(ok, f"fit: yours {1e3 * mine_fixed:.3f} ms + {1e3 * mine_per:.3f} ms per block, least squares "
                       f"{1e3 * fixed:.3f} ms + {1e3 * per_block:.3f} ms per block", details)
        for blocks, final in [(54, 0.5), (9, 0.5)]:
            probs = residual.linear_decay(blocks, final)
            correct = 1 - (fixed + per_block * sum(probs)) / (fixed + per_block * blocks)
            saving = as_number(graded_call(predicted_saving, "predicted_saving",
                                           "predicted_saving(fixed_s, per_block_s, probs)",
                                           (fixed, per_block, list(probs)), functions, methods), "predicted_saving")
            ok = abs(saving - correct) < 1e-9
            hint = []
            if not ok and abs(saving - (1 - sum(probs) / blocks)) < 1e-9:
                hint = ["hint: that is the saving if the fixed part cost nothing: it runs in every step"]
            elif not ok and abs(saving - (1 - correct)) < 1e-9:
                hint = ["hint: that is the fraction of the time that remains, not the fraction saved"]
            report.add(ok, f"L = {blocks}, p_L = {final}: predicted saving yours {saving:.4f}, expected {correct:.4f}",
                       hint)
    except StudentError as problem:
        report.stop(str(problem))
    return report
