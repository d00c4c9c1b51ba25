"""minisd.exercises and notebooks/exercises/: every checker passes the reference solution and names
each planted mistake in plain words, without a traceback; every exercise notebook runs twice, solved
(every check passes) and unsolved (every check fails with its message, and nothing raises).

The reference solutions live in tests/exercise_solutions/ (one file per notebook), not in the
notebooks: scripts/run_exercises.py puts them in place of the exercise cells (see there for why a
small preprocessor and not nbgrader).
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from minisd import exercises
from minisd import functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOLUTIONS = os.path.join(ROOT, "tests", "exercise_solutions")


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def solution(name):
    return _load(os.path.join(SOLUTIONS, name + ".py"), "solution_" + name)


run_exercises = _load(os.path.join(ROOT, "scripts", "run_exercises.py"), "run_exercises")
conv = solution("01_conv_backward").conv_backward
batch_norm = solution("02_batch_norm_backward").batch_norm_backward
block = solution("03_block_backward").block_backward
schedule = solution("04_schedule_and_test_time")


def failed(report, *phrases):
    """The report failed, says every phrase, and shows no traceback."""
    text = str(report)
    assert not report.passed and text.splitlines()[0].split(":")[1].strip().startswith("NOT PASSED"), text
    for phrase in phrases:
        assert phrase in text, f"{phrase!r} not in:\n{text}"
    assert "Traceback" not in text and 'File "' not in text, text
    return text


# ------------------------------------------------------------------------------------------------
# The reference solutions pass
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("check, answer", [
    (exercises.check_conv_backward, conv),
    (exercises.check_batch_norm_backward, batch_norm),
    (exercises.check_block_backward, block),
    (exercises.check_schedule, schedule.linear_decay),
    (exercises.check_test_time_rule, schedule.block_output_at_test_time),
], ids=["conv", "batch_norm", "block", "schedule", "test_time"])
def test_reference_solution_passes(check, answer):
    report = check(answer)
    assert report.passed and bool(report), str(report)
    assert str(report).startswith(f"{report.title}: PASSED") and "finite differences agree" in str(report) \
        or check in (exercises.check_schedule, exercises.check_test_time_rule)


def test_not_written_yet_is_a_message_not_an_error():
    def conv_backward(dy, x, weight, stride, padding):
        raise NotImplementedError

    failed(exercises.check_conv_backward(conv_backward), "conv_backward is not written yet",
           "Replace the `raise NotImplementedError` line")


# ------------------------------------------------------------------------------------------------
# 1. Convolution: planted mistakes
# ------------------------------------------------------------------------------------------------


def _conv_parts(dy, x, weight, stride, padding):
    o, _, kh, kw = weight.shape
    cols = F.im2col(x, (kh, kw), stride, padding)
    dy_rows = dy.transpose(1, 0, 2, 3).reshape(o, -1)
    return o, kh, kw, cols, dy_rows


def test_conv_transposed_weight_gradient():
    def conv_backward(dy, x, weight, stride, padding):
        o, kh, kw, cols, dy_rows = _conv_parts(dy, x, weight, stride, padding)
        dx, _, dbias = conv(dy, x, weight, stride, padding)
        return dx, (cols @ dy_rows.T).reshape(weight.shape), dbias  # (C*kh*kw, O) read as (O, C, kh, kw)

    text = failed(exercises.check_conv_backward(conv_backward), "dweight: wrong", "transpose of dY @ cols.T",
                  "relative error", "e.g. dweight[")
    assert "dx: correct" in text and "dbias: correct" in text


def test_conv_weight_gradient_left_as_a_matrix():
    def conv_backward(dy, x, weight, stride, padding):
        o, kh, kw, cols, dy_rows = _conv_parts(dy, x, weight, stride, padding)
        dx, _, dbias = conv(dy, x, weight, stride, padding)
        return dx, cols @ dy_rows.T, dbias

    failed(exercises.check_conv_backward(conv_backward), "dweight: wrong shape", "you computed cols @ dY.T")


def test_conv_missing_sum_over_the_batch():
    def bias_per_sample(dy, x, weight, stride, padding):
        dx, dweight, _ = conv(dy, x, weight, stride, padding)
        return dx, dweight, dy.sum(axis=(2, 3))  # (N, O): one row per sample

    failed(exercises.check_conv_backward(bias_per_sample), "dbias: wrong shape", "extra batch axis", "SUM")

    def weight_overwritten_per_sample(dy, x, weight, stride, padding):
        dx, _, dbias = conv(dy, x, weight, stride, padding)
        for n in range(x.shape[0]):  # "=" where "+=" belongs: only the last sample's share survives
            _, dweight, _ = conv(dy[n:n + 1], x[n:n + 1], weight, stride, padding)
        return dx, dweight, dbias

    failed(exercises.check_conv_backward(weight_overwritten_per_sample), "dweight: wrong", "the share of sample",
           "sum the shares of every sample")

    def weight_mean(dy, x, weight, stride, padding):
        dx, dweight, dbias = conv(dy, x, weight, stride, padding)
        return dx, dweight / x.shape[0], dbias

    failed(exercises.check_conv_backward(weight_mean), "divided by the batch size")


def test_conv_write_into_dy():
    def conv_backward(dy, x, weight, stride, padding):
        grads = conv(dy.copy(), x, weight, stride, padding)
        dy *= 0.5  # e.g. a scaling done in place on the caller's array
        return grads

    failed(exercises.check_conv_backward(conv_backward), "conv_backward wrote into dy",
           "never change the dy it is given")


def test_conv_flipped_kernel_and_wrong_padding():
    def flipped(dy, x, weight, stride, padding):
        dx, dweight, dbias = conv(dy, x, weight, stride, padding)
        return dx, dweight[:, :, ::-1, ::-1], dbias

    failed(exercises.check_conv_backward(flipped), "flipped in both kernel axes")

    def border(dy, x, weight, stride, padding):
        dx, dweight, dbias = conv(dy, x, weight, stride, padding)
        dx = dx.copy()
        dx[:, :, 0, :] = 0.0  # the first row lost
        return dx, dweight, dbias

    failed(exercises.check_conv_backward(border), "dx: wrong", "next to the image border")


def test_conv_error_inside_the_library_names_the_students_line():
    def conv_backward(dy, x, weight, stride, padding):
        o, kh, kw, cols, dy_rows = _conv_parts(dy, x, weight, stride, padding)
        dcols = weight.reshape(o, -1).T @ dy_rows
        dx = F.col2im(dcols.T, x.shape, (kh, kw), stride, padding)  # transposed columns: wrong shape
        return dx, None, None

    text = failed(exercises.check_conv_backward(conv_backward), "conv_backward raised ValueError",
                  "line 4 of conv_backward: dx = F.col2im(dcols.T")
    assert len(text.splitlines()) <= 3

    def wrong_return(dy, x, weight, stride, padding):
        return conv(dy, x, weight, stride, padding)[:2]

    failed(exercises.check_conv_backward(wrong_return), "returned tuple of length 2", "(dx, dweight, dbias)")

    def wrong_arguments(dy, x, weight):
        return conv(dy, x, weight, 1, 1)

    failed(exercises.check_conv_backward(wrong_arguments), "raised TypeError",
           "called as conv_backward(dy, x, weight, stride, padding)")


# ------------------------------------------------------------------------------------------------
# 2. Batch norm: planted mistakes
# ------------------------------------------------------------------------------------------------


def _bn_parts(x, gamma, eps):
    axes = (0, 2, 3)
    inv_std = 1.0 / np.sqrt(x.var(axis=axes, keepdims=True) + eps)
    return axes, inv_std, (x - x.mean(axis=axes, keepdims=True)) * inv_std, gamma.reshape(1, -1, 1, 1)


def test_batch_norm_evaluation_mode_formula_and_missing_terms():
    def eval_formula(dy, x, gamma, eps):
        axes, inv_std, _, g = _bn_parts(x, gamma, eps)
        _, dgamma, dbeta = batch_norm(dy, x, gamma, eps)
        return g * inv_std * dy, dgamma, dbeta

    text = failed(exercises.check_batch_norm_backward(eval_formula), "dx: wrong", "evaluation mode",
                  "finite differences agree with the correct values")
    assert "dgamma: correct" in text

    def no_variance_term(dy, x, gamma, eps):
        axes, inv_std, _, g = _bn_parts(x, gamma, eps)
        _, dgamma, dbeta = batch_norm(dy, x, gamma, eps)
        return g * inv_std * (dy - dy.mean(axis=axes, keepdims=True)), dgamma, dbeta

    failed(exercises.check_batch_norm_backward(no_variance_term), "the variance term is missing")


def test_batch_norm_missing_batch_sum_and_mean_for_sum():
    def per_sample(dy, x, gamma, eps):
        axes, _, x_hat, _ = _bn_parts(x, gamma, eps)
        dx, _, dbeta = batch_norm(dy, x, gamma, eps)
        return dx, (dy * x_hat).sum(axis=(2, 3)), dbeta  # (N, C)

    failed(exercises.check_batch_norm_backward(per_sample), "dgamma: wrong shape", "extra batch axis")

    def mean_beta(dy, x, gamma, eps):
        dx, dgamma, _ = batch_norm(dy, x, gamma, eps)
        return dx, dgamma, dy.mean(axis=(0, 2, 3))

    failed(exercises.check_batch_norm_backward(mean_beta), "dbeta: wrong", "dbeta is the sum of dy")


def test_batch_norm_write_into_dy():
    def in_place(dy, x, gamma, eps):
        axes, inv_std, x_hat, g = _bn_parts(x, gamma, eps)
        dbeta = dy.sum(axis=axes)
        dgamma = (dy * x_hat).sum(axis=axes)
        dy -= dy.mean(axis=axes, keepdims=True)           # centres the caller's dy
        dy -= x_hat * (dy * x_hat).mean(axis=axes, keepdims=True)
        return g * inv_std * dy, dgamma, dbeta

    text = failed(exercises.check_batch_norm_backward(in_place), "batch_norm_backward wrote into dy")
    assert "dx: correct" in text  # right numbers, wrong habit: the message is about dy alone


# ------------------------------------------------------------------------------------------------
# 3. BasicBlock: planted mistakes
# ------------------------------------------------------------------------------------------------


def test_block_write_into_dy():
    def in_place(blk, dy, saved):
        dy *= saved["relu_mask"]  # the classic: masks the caller's dy
        return block(blk, dy, {**saved, "relu_mask": np.ones_like(saved["relu_mask"])})

    failed(exercises.check_block_backward(in_place), "block_backward wrote into dy", "dz = dy * mask, not dy *= mask")


def test_block_without_the_relu_mask():
    def no_mask(blk, dy, saved):
        return block(blk, dy, {**saved, "relu_mask": np.ones_like(saved["relu_mask"])})

    failed(exercises.check_block_backward(no_mask), "dx: wrong", "the ReLU mask is missing")


def test_block_dropped_gate_calls_the_branch():
    def ignores_gate(blk, dy, saved):
        dz = dy * saved["relu_mask"]
        return blk.shortcut.backward(dz) + blk.branch.backward(dz)

    text = failed(exercises.check_block_backward(ignores_gate), "called block.branch.backward for a dropped gate",
                  "through the ReLU mask and the shortcut only")
    assert "kept gate" in text  # the kept case was checked (and passed) before the dropped one stopped it


def test_block_row_mode_without_the_per_sample_gate():
    def unscaled(blk, dy, saved):
        dz = dy * saved["relu_mask"]
        dx = blk.shortcut.backward(dz)
        if np.any(saved["gate"]):
            dx = dx + blk.branch.backward(dz)
        return dx

    text = failed(exercises.check_block_backward(unscaled), "row mode", "the branch's share is not scaled")
    assert text.count("\u2717") >= 1 and "dropped gate:\n    \u2713 dx: correct" in text


def test_block_missing_shortcut_or_branch_path():
    def no_shortcut(blk, dy, saved):
        dz = dy * saved["relu_mask"]
        if np.any(saved["gate"]):
            return blk.branch.backward(dz)
        return blk.shortcut.backward(dz)

    failed(exercises.check_block_backward(no_shortcut), "the shortcut's gradient is missing")

    def identity_shortcut(blk, dy, saved):
        dz = dy * saved["relu_mask"]
        dx = dz  # as if the shortcut were always the identity
        if np.any(saved["gate"]):
            blk.shortcut.backward(dz)
            dx = dx + blk.branch.backward(dz)
        return dx

    failed(exercises.check_block_backward(identity_shortcut), "transition block", "block_backward raised ValueError",
           "line 6 of block_backward: dx = dx + blk.branch.backward(dz)")


# ------------------------------------------------------------------------------------------------
# 4. Schedule and test-time rule: planted mistakes
# ------------------------------------------------------------------------------------------------


def test_schedule_mistakes():
    failed(exercises.check_schedule(lambda L, p: [1 - (l / L) * (1 - p) for l in range(L)]),
           "you count the blocks from 0")
    failed(exercises.check_schedule(lambda L, p: [1 - (l / L) * (1 - p) for l in range(L, 0, -1)]), "reversed")
    failed(exercises.check_schedule(lambda L, p: [1 - (l / L) * (1 - p) for l in range(1, L)]),
           "probabilities, expected 3")


def test_test_time_rule_mistakes():
    rng = np.random.default_rng(0)
    failed(exercises.check_test_time_rule(lambda f, s, p: np.maximum(f + s, 0)), "the branch is not scaled")
    failed(exercises.check_test_time_rule(lambda f, s, p: p * f + s), "the ReLU after the sum is missing")
    failed(exercises.check_test_time_rule(lambda f, s, p: np.maximum(f / p + s, 0)), "inverted rule")
    failed(exercises.check_test_time_rule(lambda f, s, p: np.maximum((rng.random() < p) * f + s, 0)),
           "no gate is drawn at test time")


# ------------------------------------------------------------------------------------------------
# The notebooks, solved and unsolved
# ------------------------------------------------------------------------------------------------

NOTEBOOKS = run_exercises.notebook_paths()


def test_exercise_notebooks_exist_in_teaching_order_with_their_solutions():
    names = [os.path.basename(p) for p in NOTEBOOKS]
    assert [n[:2] for n in names] == ["01", "02", "03", "04"]
    for path in NOTEBOOKS:
        nb = run_exercises.read(path)
        exercise_cells = [c for c in nb.cells if "exercise" in c.metadata.get("tags", [])]
        check_cells = [c for c in nb.cells if "check" in c.metadata.get("tags", [])]
        assert exercise_cells and len(check_cells) >= len(exercise_cells), path
        # Solutions stay out of the notebooks: every exercise cell still raises NotImplementedError.
        assert all("raise NotImplementedError" in c.source for c in exercise_cells), path
        assert os.path.exists(run_exercises.solution_path(path)), path


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[os.path.basename(p) for p in NOTEBOOKS])
def test_notebook_solved_passes_and_unsolved_fails_with_messages(path):
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    for solved in (True, False):
        nb = run_exercises.execute(path, solved=solved)
        outcome = run_exercises.check_outcomes(nb)
        assert outcome, f"{path}: no check output"
        errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"{path} (solved={solved}): {errors[0].get('ename')}: {errors[0].get('evalue')}"
        if solved:
            assert all(text.split("\n")[0].endswith("checks)") and ": PASSED" in text.split("\n")[0]
                       for text in outcome), outcome
        else:
            assert all("NOT PASSED" in text.split("\n")[0] and "is not written yet" in text for text in outcome), outcome


# ------------------------------------------------------------------------------------------------
# Issue 27: answers that would break the checker itself
# ------------------------------------------------------------------------------------------------


def test_a_student_function_that_calls_sys_exit_stays_inside_the_checker():
    import sys  # noqa: PLC0415

    def conv_backward(dy, x, weight, stride, padding):
        sys.exit(1)

    failed(exercises.check_conv_backward(conv_backward), "conv_backward called sys.exit(1), which would stop the "
                                                         "checker: return the result instead")
    failed(exercises.check_schedule(lambda L, p: sys.exit()), "linear_decay called sys.exit()")


def test_a_block_backward_that_deletes_the_counted_backward_does_not_break_the_cleanup():
    def block_backward(blk, dy, saved):
        dx = block(blk, dy, saved)
        del blk.branch.backward  # removes the checker's counting wrapper
        return dx

    report = exercises.check_block_backward(block_backward)
    assert report.passed, str(report)


@pytest.mark.parametrize("answer, phrase", [
    (lambda f, s, p: "ReLU(p * f + s)", "y is a str, not an array of shape (2, 3, 4, 4)"),
    (lambda f, s, p: np.maximum(p * f + s, 0) > 0, "y holds true/false values, not numbers"),
    (lambda f, s, p: np.maximum(p * f + s, 0) + 0j, "y holds complex numbers, not numbers"),
    (lambda f, s, p: np.maximum(p * f + s, 0).astype(str), "y holds text, not numbers"),
    (lambda f, s, p: {"y": np.maximum(p * f + s, 0)}, "y is a dict, not an array"),
])
def test_answers_of_the_wrong_kind_are_refused_in_one_line(answer, phrase):
    failed(exercises.check_test_time_rule(answer), phrase)


@pytest.mark.parametrize("answer, phrase", [
    (lambda L, p: "05", "linear_decay's result is a str, not a list of 3 probabilities"),
    (lambda L, p: {l: 1 - l / L * (1 - p) for l in range(1, L + 1)}, "linear_decay's result is a dict"),
    (lambda L, p: [True] * L, "linear_decay's result holds true/false values, not numbers"),
])
def test_schedules_of_the_wrong_kind_are_refused(answer, phrase):
    failed(exercises.check_schedule(answer), phrase)


def test_a_schedule_given_as_a_generator_is_still_an_answer():
    report = exercises.check_schedule(lambda L, p: (1 - l / L * (1 - p) for l in range(1, L + 1)))
    assert report.passed, str(report)
