"""Exercise 5: the stochastic-depth block, gate, forward and backward (kept, dropped, both scale
rules, row mode)."""
from __future__ import annotations

import math

import numpy

from minisd import backend, residual
from minisd.exercises._grading import compare, dy_unchanged, graded_call, matches, numeric, unavailable
from minisd.exercises._report import Report, StudentError, as_array, as_tuple, call_student, host

_BLOCK = residual.BasicBlock
_BLOCK_METHODS = [(_BLOCK, "forward", "BasicBlock.forward"), (_BLOCK, "backward", "BasicBlock.backward"),
                  (_BLOCK, "_draw_gate", "BasicBlock._draw_gate"),
                  (_BLOCK, "_branch_multiplier", "BasicBlock._branch_multiplier")]


def block_forward(block, x):
    """Run minisd's ``block.forward(x)`` and return (y, saved): what a backward of the block needs.

    saved["relu_mask"]: where the output ReLU let the value through (y > 0), shape of y;
    saved["gate"]: True (kept) or False (dropped) in batch mode, one bool per sample in row mode;
    saved["multiplier"]: the number a kept branch was multiplied by (1/p with ``scale="train"``,
    else 1). The branch and the shortcut keep their own caches: call ``block.branch.backward`` and
    ``block.shortcut.backward`` as their forward ran (the branch only if it ran).
    """
    y = block.forward(x)
    gate = block.gate
    multiplier = 1.0 / block.survival_prob if block.scale == "train" else 1.0
    return y, {"relu_mask": host(y) > 0, "gate": gate, "multiplier": multiplier}


_minisd_block_forward = block_forward  # the checkers' parameters may shadow the name


def reference_block_backward(block, dy, saved, relu_mask=True, scale=True, shortcut=True, branch=True):
    """The block's backward written out, with switches that plant the common mistakes."""
    xp = backend.array_module(dy)
    dz = dy * xp.asarray(saved["relu_mask"]) if relu_mask else dy.copy()
    gate = saved["gate"]
    dx = block.shortcut.backward(dz) if shortcut else 0.0
    if branch and bool(numpy.any(gate)):
        df = dz
        if scale:
            factor = numpy.asarray(gate, dtype=float) * saved["multiplier"]
            df = dz * (xp.asarray(factor).reshape(-1, 1, 1, 1) if factor.ndim else factor)
        dx = dx + block.branch.backward(df)
    return dx


# ----------------------------------------------------------------------------------------------
# The gate
# ----------------------------------------------------------------------------------------------


def check_draw_gate(draw_gate) -> Report:
    """Check ``draw_gate(p, mode, batch_size, rng) -> gate``: a Python bool in "batch" mode (True
    with probability p), a bool array of shape (batch_size,) in "row" mode (each True with
    probability p, independently); rng is a NumPy Generator, the only source of randomness."""
    report = Report("draw_gate")
    call = "draw_gate(p, mode, batch_size, rng)"
    draws = 4000
    try:
        with unavailable(draw_gate, "draw_gate", {}, _BLOCK_METHODS):
            for p in (0.8, 0.3):
                rng = numpy.random.default_rng(5)
                gates = [call_student(draw_gate, "draw_gate", call, p, "batch", 8, rng) for _ in range(draws)]
                if not all(isinstance(g, (bool, numpy.bool_)) for g in gates):
                    odd = next(g for g in gates if not isinstance(g, (bool, numpy.bool_)))
                    raise StudentError(f"in batch mode draw_gate returned {type(odd).__name__}; return one bool for the "
                                       "whole batch")
                rate = float(numpy.mean(gates))
                spread = 4 * math.sqrt(p * (1 - p) / draws)  # four standard errors: a correct draw fails ~1 in 16,000
                ok = abs(rate - p) <= spread
                hint = ("hint: True means KEPT, with probability p (the survival probability): you keep with "
                        "probability 1 - p" if abs(rate - (1 - p)) <= spread else
                        "hint: draw one uniform number u from rng and keep when u < p")
                report.add(ok, f"batch mode, p = {p}: kept in {rate:.3f} of {draws} draws "
                               f"(expected {p} \u00b1 {spread:.3f})", [] if ok else [hint], key=("rate", hint))
                rng = numpy.random.default_rng(6)
                rows = call_student(draw_gate, "draw_gate", call, p, "row", 500, rng)
                rows = numpy.asarray(backend.to_numpy(rows)) if rows is not None else None
                if rows is None or rows.shape != (500,) or rows.dtype != bool:
                    report.add(False, f"row mode, p = {p}: expected a bool array of shape (500,), got "
                                      f"{'None' if rows is None else f'{rows.dtype} of shape {rows.shape}'}",
                               ["one independent gate per sample"], key=("rows",))
                    continue
                spread = 4 * math.sqrt(p * (1 - p) / 500)
                ok = abs(rows.mean() - p) <= spread and 0 < rows.sum() < 500
                report.add(ok, f"row mode, p = {p}: {int(rows.sum())} of 500 samples kept (expected {p} \u00b1 {spread:.3f})",
                           [] if ok else ["each sample keeps its branch with probability p, independently of the others"])
            always = [call_student(draw_gate, "draw_gate", call, 1.0, "batch", 4, numpy.random.default_rng(k))
                      for k in range(50)]
            report.add(all(always), "p = 1: never dropped", [] if all(always) else ["u < 1 is always true for u in [0, 1)"])
    except StudentError as problem:
        report.stop(str(problem))
    return report


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------

BLOCK_SETTINGS = [
    # (what, in channels, out channels, stride, mode, scale, gate)
    ("kept gate", 3, 3, 1, "batch", "eval", True),
    ("dropped gate", 3, 3, 1, "batch", "eval", False),
    ("kept gate, inverted scaling (scale='train')", 3, 3, 1, "batch", "train", True),
    ("row mode (samples 2 and 4 dropped), inverted scaling", 3, 3, 1, "row", "train",
     numpy.array([True, False, True, False])),
    ("row mode (sample 1 dropped), the paper's scaling", 3, 3, 1, "row", "eval",
     numpy.array([False, True, True, True])),
    ("transition block (stride 2, 3 -> 6 channels), kept", 3, 6, 2, "batch", "eval", True),
]


def make_block(in_ch, out_ch, stride, mode, scale, gate, seed):
    block = residual.BasicBlock(in_ch, out_ch, stride=stride, survival_prob=0.7, mode=mode, scale=scale,
                                dtype="float64", rng=numpy.random.default_rng(seed),
                                gate_rng=numpy.random.default_rng(seed))
    block.force_gate(gate)
    return block


def _counting(module, attribute="backward"):
    """Count calls of module.<attribute> (on the instance; removed with ``delattr``)."""
    calls = []
    original = getattr(module, attribute)

    def counted(*args):
        calls.append(1)
        return original(*args)

    setattr(module, attribute, counted)
    return calls


def _stop_counting(module, attribute="backward") -> None:
    """Undo :func:`_counting`; quietly if the student's code already removed the wrapper
    (``del block.branch.backward``), so the checker's own cleanup never raises."""
    vars(module).pop(attribute, None)


def _block_forward_by_hand(block, x, gate, relu=True, multiplier=None):
    """What a forward with a planted mistake gives (used for hints)."""
    s = host(block.shortcut.forward(x))
    g = numpy.asarray(gate, dtype=float)
    z = s
    if g.any():
        m = (1.0 / block.survival_prob if block.scale == "train" else 1.0) if multiplier is None else multiplier
        z = s + host(block.branch.forward(x)) * (g.reshape(-1, 1, 1, 1) if g.ndim else g) * m
    return numpy.maximum(z, 0.0) if relu else z


def check_block_forward(block_forward) -> Report:
    """Check ``block_forward(block, x, gate) -> (y, saved)`` for a BasicBlock in training.

    gate: True / False (batch mode) or a bool array, one per sample (row mode). y = ReLU(gate * m *
    branch(x) + shortcut(x)) with m = 1/p for ``block.scale == "train"``, else 1; a dropped branch is
    not called. saved: {"relu_mask", "gate", "multiplier"} as :func:`block_forward` gives, and good
    enough for minisd's backward of the block (checked against finite differences). While it runs,
    BasicBlock's own forward, backward, gate draw and multiplier are unavailable; block.branch and
    block.shortcut are the building blocks.
    """
    report = Report("block_forward")
    call = "block_forward(block, x, gate)"
    rng = numpy.random.default_rng(37)
    try:
        for k, (what, in_ch, out_ch, stride, mode, scale, gate) in enumerate(BLOCK_SETTINGS):
            x = rng.standard_normal((4, in_ch, 6, 6))
            reference = make_block(in_ch, out_ch, stride, mode, scale, gate, seed=k)
            y, saved = _minisd_block_forward(reference, x)
            twin = make_block(in_ch, out_ch, stride, mode, scale, gate, seed=k)
            hint_values = [
                (_block_forward_by_hand(twin, x, gate, relu=False),
                 "the output ReLU is missing: the block ends with a ReLU after the sum"),
                (_block_forward_by_hand(twin, x, gate, multiplier=0.7) if numpy.any(gate) else None,
                 "the branch is multiplied by p during training: that is the paper's TEST-time rule; in training "
                 "a kept branch is multiplied by 1 (scale='eval') or by 1/p (scale='train')"),
                (_block_forward_by_hand(twin, x, gate, multiplier=1.0) if scale == "train" else None,
                 "inverted scaling (scale='train') divides a kept branch by p during training"),
                (_block_forward_by_hand(twin, x, numpy.ones_like(gate) if mode == "row" else None)
                 if mode == "row" else None,
                 "in row mode each sample has its own gate: dropped samples get shortcut(x) only"),
            ]
            block = make_block(in_ch, out_ch, stride, mode, scale, gate, seed=k)
            block.force_gate(None)
            stats_before = {n: host(v) for n, v in block.branch.named_buffers()}
            branch_calls = _counting(block.branch, "forward")
            try:
                result = graded_call(block_forward, "block_forward", call, (block, x.copy(), gate), {}, _BLOCK_METHODS)
            finally:
                _stop_counting(block.branch, "forward")
            report.note(f"{what}:")
            mine_y, mine_saved = as_tuple(result, "block_forward", ("y", "saved"))
            mine_y = as_array(mine_y, "y", y.shape)
            if not isinstance(mine_saved, dict) or not {"relu_mask", "gate", "multiplier"} <= set(mine_saved):
                raise StudentError("saved must be a dict with the keys 'relu_mask', 'gate' and 'multiplier'")
            compare(report, "y", mine_y, host(y), hint_values)
            if not numpy.any(gate):
                moved = any(not numpy.array_equal(host(v), stats_before[n]) for n, v in block.branch.named_buffers())
                ok = not branch_calls and not moved
                report.add(ok, "the dropped branch was not run" if ok else
                           f"the branch ran although its gate is off ({len(branch_calls)} call(s))",
                           [] if ok else ["b = 0: do not call the branch at all (that is the saving), and its "
                                          "batch-norm running statistics stay as they were"])
            mask = as_array(mine_saved["relu_mask"], "saved['relu_mask']", y.shape)
            ok = matches(mask, host(saved["relu_mask"]), 0.5)
            m = float(mine_saved["multiplier"]) if isinstance(mine_saved["multiplier"], (int, float)) else None
            ok_m = m is not None and abs(m - saved["multiplier"]) < 1e-12
            ok_g = numpy.array_equal(numpy.asarray(mine_saved["gate"], dtype=bool), numpy.asarray(gate, dtype=bool))
            report.add(ok and ok_m and ok_g, "saved holds the mask, the gate and the multiplier" if ok and ok_m and ok_g
                       else "saved is not right: " + ", ".join(
                           w for w, good in (("relu_mask (y > 0)", ok), (f"multiplier (expected {saved['multiplier']:.4g})",
                                                                           ok_m), ("gate", ok_g)) if not good))
            # What the student's forward saved must let the block be differentiated: minisd's backward
            # on it against finite differences of minisd's forward.
            if ok and ok_m and ok_g and mine_y.shape == y.shape:
                dy = rng.standard_normal(y.shape)
                dx = host(reference_block_backward(block, dy.copy(), mine_saved))
                fd_block = make_block(in_ch, out_ch, stride, mode, scale, gate, seed=k)
                x_fd = x.copy()
                picked, values = numeric(lambda: host(fd_block.forward(x_fd)), x_fd, dy, rng)
                error = float(numpy.max(numpy.abs(dx.reshape(-1)[picked] - values)) /
                              max(float(numpy.max(numpy.abs(values))), 1e-300))
                report.add(error < 1e-6, f"backward through your forward's caches agrees with finite differences "
                                         f"({error:.1e})")
    except StudentError as problem:
        report.stop(str(problem))
    return report


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------

DROPPED_BRANCH_CALLED = ("block_backward called block.branch.backward for a dropped gate. The branch did not run in "
                         "forward (b = 0), so there is nothing to differentiate: the gradient reaches x through "
                         "the ReLU and the shortcut only")


def check_block_backward(block_backward) -> Report:
    """Check ``block_backward(block, dy, saved) -> dx`` for a BasicBlock whose forward was
    ``y, saved = exercises.block_forward(block, x)``.

    It must add the branch's parameter gradients (by calling ``block.branch.backward``) only when
    the branch ran, never call it for a dropped gate, and return dL/dx, shape of x. While it runs,
    BasicBlock.backward is unavailable; the branch's and the shortcut's own backwards are the
    building blocks.
    """
    report = Report("block_backward")
    call = "block_backward(block, dy, saved)"
    rng = numpy.random.default_rng(31)
    try:
        for k, (what, in_ch, out_ch, stride, mode, scale, gate) in enumerate(BLOCK_SETTINGS):
            x = backend.to_device(rng.standard_normal((4, in_ch, 6, 6)), dtype="float64")
            block = make_block(in_ch, out_ch, stride, mode, scale, gate, seed=k)
            y, saved = block_forward(block, x)
            dy = backend.to_device(rng.standard_normal(y.shape), dtype="float64")

            def reference(**mistake):
                twin = make_block(in_ch, out_ch, stride, mode, scale, gate, seed=k)
                _, twin_saved = block_forward(twin, x)
                dx = reference_block_backward(twin, dy.copy(), twin_saved, **mistake)
                return host(dx), {n: host(g) for n, g in twin.named_grads()}

            dx, grads = reference()
            kept = bool(numpy.any(gate))
            hints = [(reference(relu_mask=False)[0], "the ReLU mask is missing: the block ends with a ReLU, so the "
                                                     "gradient passes through its mask before it splits"),
                     (reference(scale=False)[0] if mode == "row" or scale == "train" else None,
                      "the branch's share is not scaled: what flows into the branch is scaled as the branch's output "
                      "was in forward (the gate of each sample in row mode, and the multiplier)"),
                     (reference(shortcut=False)[0] if kept else None,
                      "the shortcut's gradient is missing: paths that merge in forward add up in backward"),
                     (reference(branch=False)[0] if kept else None,
                      "the branch's gradient is missing from dx: add what block.branch.backward returns")]
            branch_calls = _counting(block.branch)
            dy_given = dy.copy()
            try:
                result = graded_call(block_backward, "block_backward", call, (block, dy_given, saved), {},
                                     [(_BLOCK, "backward", "BasicBlock.backward")])
            except StudentError as problem:
                if not kept and "backward called before forward" in str(problem):
                    raise StudentError(DROPPED_BRANCH_CALLED) from None
                raise
            finally:
                _stop_counting(block.branch, "backward")
            report.note(f"{what}:")
            mine = as_array(result, "dx", dx.shape)
            dy_unchanged(report, "block_backward", host(dy), dy_given)
            if kept and not branch_calls:
                report.add(False, "block.branch.backward was never called, but the branch ran",
                           ["its parameters got no gradient: call block.branch.backward with the branch's share"])
            elif kept and len(branch_calls) > 1:
                report.add(False, f"block.branch.backward was called {len(branch_calls)} times",
                           ["call it once per backward: each call adds into the parameter gradients again"])
            fd_block = make_block(in_ch, out_ch, stride, mode, scale, gate, seed=k)
            x_fd = host(x).copy()
            fd = numeric(lambda: host(fd_block.forward(backend.to_device(x_fd, dtype="float64"))), x_fd, host(dy), rng)
            compare(report, "dx", mine, dx, hints, numeric=fd)
            for name, _ in block.named_grads():
                if not name.startswith("branch."):
                    continue
                got = host(dict(block.named_grads())[name])
                if not kept and got.any():
                    report.add(False, f"{name} got gradient although the branch was dropped",
                               ["a dropped branch is not differentiated: its parameters end the step with zero gradient"])
                    break
                if not matches(got, grads[name]):
                    compare(report, f"grad {name}", got, grads[name])
                    break
            else:
                report.add(True, "branch parameter gradients " + ("stay zero (dropped)" if not kept else "are correct"))
    except StudentError as problem:
        report.stop(str(problem))
    return report
