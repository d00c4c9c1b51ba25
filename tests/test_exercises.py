"""minisd.exercises and notebooks/exercises/: every checker passes correct answers written
independently of the instructor's solutions, fails answers that hand the work to minisd (with one
sentence), names each planted common mistake with exactly its hint, and turns an exception, a
sys.exit or a wrong type into one line; every exercise notebook runs solved (all pass), unsolved
(each check fails with its message, nothing raises) and delegated (each delegation fails).

The instructor key (solutions, delegations, answers) lives in instructor/, apart from the
students' notebooks; scripts/run_exercises.py puts it in place of the exercise cells.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import numpy as np
import pytest

from minisd import exercises, kernels, layers, residual
from minisd import functional as F
from minisd.exercises import batch_norm as bn_module
from minisd.exercises import block as block_module
from minisd.exercises import optimizer as sgd_module
from minisd.exercises import schedule as schedule_module
from minisd.exercises import rule_at_test_time as test_time_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_exercises = _load(os.path.join(ROOT, "scripts", "run_exercises.py"), "run_exercises")
NOTEBOOKS = run_exercises.notebook_paths()


def instructor(kind, notebook):
    return _load(os.path.join(ROOT, "instructor", kind, notebook + ".py"), f"{kind}_{notebook}")


def failed(report, *phrases):
    """The report failed, says every phrase, and shows no traceback."""
    text = str(report)
    assert not report.passed and "NOT PASSED" in text.splitlines()[0], text
    for phrase in phrases:
        assert phrase in text, f"{phrase!r} not in:\n{text}"
    assert "Traceback" not in text and 'File "' not in text, text
    return text


def one_line(report, *phrases):
    """The report stopped with one line (plus at most the line of the student's code)."""
    text = failed(report, *phrases)
    head = text.splitlines()[0]
    assert ": NOT PASSED: " in head, text
    return head


def hinted(report, hint):
    """The report failed with exactly this hint (and no other)."""
    text = failed(report, "hint: " + hint)
    others = {line.strip() for line in text.splitlines() if line.strip().startswith("hint:")} - {"hint: " + hint}
    assert not others, f"other hints too: {others}\n{text}"
    return text


# ------------------------------------------------------------------------------------------------
# Correct answers written independently of instructor/solutions pass
# ------------------------------------------------------------------------------------------------


def loop_im2col(x, kernel_size, stride, padding):
    n, c, h, w = x.shape
    kh, kw = kernel_size
    padded = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    ho, wo = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    columns = [padded[b, :, r * stride:r * stride + kh, q * stride:q * stride + kw].ravel()
               for b in range(n) for r in range(ho) for q in range(wo)]
    return np.stack(columns, axis=1)


def loop_col2im(cols, x_shape, kernel_size, stride, padding):
    n, c, h, w = x_shape
    kh, kw = kernel_size
    ho, wo = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    padded = np.zeros((n, c, h + 2 * padding, w + 2 * padding))
    k = 0
    for b in range(n):
        for r in range(ho):
            for q in range(wo):
                padded[b, :, r * stride:r * stride + kh, q * stride:q * stride + kw] += cols[:, k].reshape(c, kh, kw)
                k += 1
    return padded[:, :, padding:padding + h, padding:padding + w]


def einsum_conv_backward(dy, x, weight, stride, padding):
    o, c, kh, kw = weight.shape
    n, _, ho, wo = dy.shape
    cols = loop_im2col(x, (kh, kw), stride, padding).reshape(c, kh, kw, n, ho, wo)
    dweight = np.einsum("nohw,cijnhw->ocij", dy, cols)
    dcols = np.einsum("ocij,nohw->cijnhw", weight, dy).reshape(c * kh * kw, -1)
    return loop_col2im(dcols, x.shape, (kh, kw), stride, padding), dweight, dy.sum(axis=(0, 2, 3))


def staged_batch_norm_backward(dy, x, gamma, eps):
    """The chain rule one node at a time (mean, variance, normalise, scale)."""
    axes = (0, 2, 3)
    m = dy.size / dy.shape[1]
    mu = x.mean(axis=axes, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
    std = np.sqrt(var + eps)
    x_hat = (x - mu) / std
    g = gamma[None, :, None, None]
    dx_hat = dy * g
    dvar = np.sum(dx_hat * (x - mu) * -0.5 * std ** -3, axis=axes, keepdims=True)
    dmu = np.sum(-dx_hat / std, axis=axes, keepdims=True) + dvar * np.mean(-2 * (x - mu), axis=axes, keepdims=True)
    dx = dx_hat / std + dvar * 2 * (x - mu) / m + dmu / m
    return dx, np.sum(dy * x_hat, axis=axes), np.sum(dy, axis=axes)


def nditer_numerical_gradient(f, x, dy, eps):
    grad = np.empty_like(x, dtype=float)
    for index in np.ndindex(x.shape):
        saved = x[index]
        x[index] = saved + eps
        up = np.sum(f() * dy)
        x[index] = saved - eps
        down = np.sum(f() * dy)
        x[index] = saved
        grad[index] = (up - down) / (2 * eps)
    return grad


def two_direction_check(forward, backward, x, rng):
    for _ in range(2):
        dy = rng.normal(size=forward(x).shape)
        numeric = nditer_numerical_gradient(lambda: forward(x), x, dy, 1e-6)
        if not np.allclose(backward(dy), numeric, rtol=1e-5, atol=1e-7 * np.abs(numeric).max()):
            return False
    return True


def binomial_gate(p, mode, batch_size, rng):
    if mode == "batch":
        return rng.binomial(1, p) == 1
    return rng.binomial(1, p, size=batch_size).astype(bool)


def where_block_forward(block, x, gate):
    keep = np.broadcast_to(np.asarray(gate, dtype=bool).reshape(-1, 1, 1, 1), (x.shape[0], 1, 1, 1))
    s = block.shortcut(x)
    z = s
    if keep.any():
        m = 1 / block.survival_prob if block.scale == "train" else 1.0
        z = np.where(keep, block.branch(x) * m, 0.0) + s
    y = np.clip(z, 0, None)
    return y, {"relu_mask": z > 0, "gate": gate, "multiplier": m if keep.any() else
               (1 / block.survival_prob if block.scale == "train" else 1.0)}


def per_sample_block_backward(blk, dy, saved):
    dz = np.where(saved["relu_mask"], dy, 0.0)
    gate = np.broadcast_to(np.asarray(saved["gate"], dtype=float), (dy.shape[0],))
    dx = blk.shortcut.backward(dz)
    if gate.any():
        dx = dx + blk.branch.backward(dz * (gate * saved["multiplier"])[:, None, None, None])
    return dx


def polyfit_time_model(active_blocks, seconds):
    slope, intercept = np.polyfit(active_blocks, seconds, 1)
    return intercept, slope


def network_by_stages(model, x, gates=None):
    h = model.relu(model.bn1(model.conv1(x)))
    l = 0
    for stage in (model.layer1, model.layer2, model.layer3):
        for blk in stage:
            weight = blk.survival_prob if gates is None else (1.0 if gates[l] else 0.0)
            s = blk.shortcut(h)
            h = np.maximum(s + weight * blk.branch(h), 0) if weight else np.maximum(s, 0)
            l += 1
    return model.fc(model.avgpool(h))


def dict_sgd_step(params, grads, buffers, received, lr, momentum, nesterov, weight_decay, skip_unused):
    for name in [n for n in params if received[n] or not skip_unused]:
        d = grads[name] + weight_decay * params[name]
        if momentum > 0:
            buffers[name] = d.copy() if name not in buffers else buffers[name] * momentum + d
            d = d + momentum * buffers[name] if nesterov else buffers[name]
        params[name][...] = params[name] - lr * d


def nan_block_grad_means(path):
    with open(path) as handle:
        table = np.array([[np.nan if v is None else v for v in json.loads(line)["block_grad"]] for line in handle])
    return list(np.nanmean(table, axis=0))


@pytest.fixture(scope="module")
def log_runs():
    return exercises.gradient_log_runs()


INDEPENDENT = {
    "im2col": lambda: exercises.check_im2col(loop_im2col, loop_col2im),
    "conv": lambda: exercises.check_conv_backward(einsum_conv_backward),
    "batch_norm": lambda: exercises.check_batch_norm_backward(staged_batch_norm_backward),
    "numerical_gradient": lambda: exercises.check_numerical_gradient(nditer_numerical_gradient),
    "gradient_checker": lambda: exercises.check_gradient_checker(two_direction_check),
    "draw_gate": lambda: exercises.check_draw_gate(binomial_gate),
    "block_forward": lambda: exercises.check_block_forward(where_block_forward),
    "block_backward": lambda: exercises.check_block_backward(per_sample_block_backward),
    "schedule": lambda: exercises.check_schedule(lambda L, p: 1 - np.arange(1, L + 1) * (1 - p) / L),
    "expected_depth": lambda: exercises.check_expected_depth(np.sum),
    "time_model": lambda: exercises.check_time_model(
        polyfit_time_model, lambda t0, tb, probs: tb * (len(probs) - sum(probs)) / (t0 + tb * len(probs))),
    "test_time": lambda: exercises.check_test_time_rule(lambda b, s, p: np.clip(p * b + s, 0, None)),
    "network": lambda: exercises.check_network_test_time(network_by_stages),
    "sgd": lambda: exercises.check_sgd_step(dict_sgd_step),
}


@pytest.mark.parametrize("name", list(INDEPENDENT))
def test_independent_correct_answer_passes(name):
    report = INDEPENDENT[name]()
    assert report.passed and bool(report), str(report)
    assert str(report).startswith(f"{report.title}: PASSED")


def test_gradient_log_answer_passes(log_runs):
    answer = nan_block_grad_means(log_runs["stochastic"])[-1] / nan_block_grad_means(log_runs["constant"])[-1]
    report = exercises.check_gradient_logs(nan_block_grad_means, answer, log_runs)
    assert report.passed, str(report)


@pytest.mark.parametrize("check", ["conv", "batch_norm", "block_backward", "im2col"])
def test_gradients_are_compared_with_finite_differences(check):
    assert "finite differences agree" in str(INDEPENDENT[check]())


@pytest.mark.parametrize("tier", ["reference", "fast"])
def test_checkers_grade_the_same_on_both_kernel_tiers(tier):
    with kernels.use(tier):
        assert exercises.check_block_backward(per_sample_block_backward).passed
        assert exercises.check_block_forward(where_block_forward).passed


# ------------------------------------------------------------------------------------------------
# Handing the work to minisd fails, with one sentence, however it is done
# ------------------------------------------------------------------------------------------------

DELEGATED = [
    ("01_im2col", lambda d, s: exercises.check_im2col(d.im2col, d.col2im), "im2col calls minisd's own im2col"),
    ("02_conv_backward", lambda d, s: exercises.check_conv_backward(d.conv_backward),
     "conv_backward calls minisd's own conv2d_backward"),
    ("03_batch_norm_backward", lambda d, s: exercises.check_batch_norm_backward(d.batch_norm_backward),
     "batch_norm_backward calls minisd's own batch_norm_backward"),
    ("04_gradient_checker", lambda d, s: exercises.check_numerical_gradient(d.numerical_gradient),
     "calls minisd's own gradcheck.numerical_gradient"),
    ("04_gradient_checker", lambda d, s: exercises.check_gradient_checker(d.backward_is_correct),
     "calls minisd's own gradcheck.numerical_gradient"),
    ("05_block", lambda d, s: exercises.check_draw_gate(d.draw_gate), "calls minisd's own BasicBlock._draw_gate"),
    ("05_block", lambda d, s: exercises.check_block_forward(d.block_forward), "calls minisd's own BasicBlock.forward"),
    ("05_block", lambda d, s: exercises.check_block_backward(d.block_backward),
     "calls minisd's own BasicBlock.backward"),
    ("06_schedule_and_time_model", lambda d, s: exercises.check_schedule(d.linear_decay),
     "linear_decay is minisd's own linear_decay"),
    ("06_schedule_and_time_model", lambda d, s: exercises.check_expected_depth(d.expected_depth),
     "calls minisd's own expected_active_blocks"),
    ("06_schedule_and_time_model", lambda d, s: exercises.check_time_model(d.fit_time_model, s.predicted_saving),
     "calls minisd's own fit_step_time"),
    ("06_schedule_and_time_model", lambda d, s: exercises.check_time_model(s.fit_time_model, d.predicted_saving),
     "calls minisd's own expected_active_blocks"),
    ("07_test_time", lambda d, s: exercises.check_network_test_time(d.network_at_test_time),
     "calls minisd's own ResNetCifar.forward"),
    ("08_sgd", lambda d, s: exercises.check_sgd_step(d.sgd_step), "calls minisd's own SGD.step"),
]


@pytest.mark.parametrize("notebook, check, sentence", DELEGATED, ids=[f"{n}-{k}" for k, (n, _, _) in enumerate(DELEGATED)])
def test_delegation_fails_with_one_sentence(notebook, check, sentence):
    head = one_line(check(instructor("delegations", notebook), instructor("solutions", notebook)), sentence)
    assert head.endswith("write it yourself.")


def test_every_delegation_file_is_tested():
    tested = {notebook for notebook, _, _ in DELEGATED}
    files = {name[:-3] for name in os.listdir(os.path.join(ROOT, "instructor", "delegations")) if name.endswith(".py")}
    assert files == tested


def test_the_issue_delegations_fail():
    one_line(exercises.check_conv_backward(lambda dy, x, w, s, p: F.conv2d_backward(dy, F.conv2d_forward(x, w, None, s, p)[1])[:2] + (dy.sum(axis=(0, 2, 3)),)),
             "calls minisd's own conv2d_backward")
    one_line(exercises.check_batch_norm_backward(lambda dy, x, g, e: F.batch_norm_backward(dy, F.batch_norm_forward(x, g, 0 * g, training=True, eps=e)[1])),
             "calls minisd's own batch_norm_backward")
    one_line(exercises.check_block_backward(lambda block, dy, saved: block.backward(dy)),
             "calls minisd's own BasicBlock.backward")
    one_line(exercises.check_schedule(residual.linear_decay), "linear_decay is minisd's own linear_decay")


def test_delegation_through_a_name_imported_into_the_students_globals():
    namespace = {}
    exec("from minisd.kernels.fast import conv2d_backward\n"  # noqa: S102  (a student's notebook cell)
         "from minisd.functional import conv2d_forward\n"
         "def conv_backward(dy, x, weight, stride, padding):\n"
         "    return conv2d_backward(dy, conv2d_forward(x, weight, weight[:, 0, 0, 0], stride, padding)[1])\n",
         namespace)
    one_line(exercises.check_conv_backward(namespace["conv_backward"]), "calls minisd's own conv2d_backward")
    assert namespace["conv2d_backward"] is kernels.tier("fast").conv2d_backward  # restored


def test_delegation_through_the_layer_fails():
    def through_layer(dy, x, weight, stride, padding):
        conv = layers.Conv2d(x.shape[1], weight.shape[0], weight.shape[2:], stride, padding, dtype="float64")
        conv.params["weight"][...] = weight
        conv.forward(x)
        return conv.backward(dy), conv.grads["weight"], conv.grads["bias"]

    one_line(exercises.check_conv_backward(through_layer), "calls minisd's own Conv2d.backward")


def test_a_caught_stand_in_still_fails():
    def sneaky(dy, x, weight, stride, padding):
        try:
            return F.conv2d_backward(dy, F.conv2d_forward(x, weight, None, stride, padding)[1])
        except Exception:  # noqa: BLE001
            return np.zeros_like(x), np.zeros_like(weight), np.zeros(weight.shape[0])

    one_line(exercises.check_conv_backward(sneaky), "calls minisd's own conv2d_backward")


def test_originals_come_back_after_deletion_and_sys_exit():
    originals = {(tier, name): getattr(kernels.tier(tier), name) for tier in kernels.TIERS
                 for name in ("conv2d_backward", "batch_norm_backward")}
    conv_layer_backward = layers.Conv2d.backward

    def vandal(dy, x, weight, stride, padding):
        del F.conv2d_backward
        del layers.Conv2d.backward
        sys.exit(3)

    head = one_line(exercises.check_conv_backward(vandal), "conv_backward called sys.exit(3)")
    assert "return the answer instead" in head
    for (tier, name), function in originals.items():
        assert getattr(kernels.tier(tier), name) is function
    assert layers.Conv2d.backward is conv_layer_backward
    assert exercises.check_conv_backward(einsum_conv_backward).passed  # the checker still works


# ------------------------------------------------------------------------------------------------
# One line for exceptions and wrong types
# ------------------------------------------------------------------------------------------------


def test_not_written_yet_is_a_message_not_an_error():
    def conv_backward(dy, x, weight, stride, padding):
        raise NotImplementedError

    one_line(exercises.check_conv_backward(conv_backward), "conv_backward is not written yet",
             "Replace the `raise NotImplementedError` line")


def test_error_inside_the_library_names_the_students_line():
    def conv_backward(dy, x, weight, stride, padding):
        o, _, kh, kw = weight.shape
        dcols = weight.reshape(o, -1).T @ dy.transpose(1, 0, 2, 3).reshape(o, -1)
        dx = F.col2im(dcols.T, x.shape, (kh, kw), stride, padding)  # transposed columns: wrong shape
        return dx, None, None

    text = failed(exercises.check_conv_backward(conv_backward), "conv_backward raised ValueError",
                  "line 4 of conv_backward: dx = F.col2im(dcols.T")
    assert len(text.splitlines()) <= 3


WRONG_TYPES = [
    (lambda: exercises.check_conv_backward(lambda dy, x, w, s, p: einsum_conv_backward(dy, x, w, s, p)[:2]),
     "returned tuple of length 2"),
    (lambda: exercises.check_conv_backward(lambda dy, x, w: None), "called as conv_backward(dy, x, weight, stride, padding)"),
    (lambda: exercises.check_batch_norm_backward(lambda dy, x, g, e: ("dx", "dgamma", "dbeta")),
     "dx is a str, not an array"),
    (lambda: exercises.check_im2col(lambda x, k, s, p: {"cols": 1}, loop_col2im), "cols is a dict"),
    (lambda: exercises.check_block_backward(lambda b, dy, saved: None), "dx is None"),
    (lambda: exercises.check_gradient_checker(lambda f, b, x, rng: "yes"), "return True or False"),
    (lambda: exercises.check_draw_gate(lambda p, mode, n, rng: rng.random() < p if mode == "row" else 1),
     "returned int; return one bool"),
    (lambda: exercises.check_expected_depth(lambda probs: [sum(probs)] * 2), "expected one number"),
    (lambda: exercises.check_time_model(lambda k, t: 1.0, lambda a, b, c: 0.0, [1, 2, 3], [1.0, 2.0, 3.0]),
     "fit_time_model returned float"),
    (lambda: exercises.check_sgd_step(lambda *args: 3), "sgd_step returned int"),
    (lambda: exercises.check_schedule("linear_decay"), "linear_decay is a str, not a function"),
    (lambda: exercises.check_test_time_rule(lambda b, s, p: 1 / 0), "raised ZeroDivisionError"),
    (lambda: exercises.check_network_test_time(lambda m, x, g=None: KeyboardInterrupt), "logits is a type, not an array"),
]


@pytest.mark.parametrize("run, phrase", WRONG_TYPES, ids=[p[:30] for _, p in WRONG_TYPES])
def test_exception_or_wrong_type_gives_one_line(run, phrase):
    head = one_line(run(), phrase)
    assert len(head) < 300


def test_gradient_log_answer_of_the_wrong_type(log_runs):
    one_line(exercises.check_gradient_logs(nan_block_grad_means, "0.5", log_runs), "answer is '0.5' (str)")


# ------------------------------------------------------------------------------------------------
# Each common mistake gets exactly its hint
# ------------------------------------------------------------------------------------------------


def _with_dweight(transform):
    def conv_backward(dy, x, weight, stride, padding):
        dx, dweight, dbias = einsum_conv_backward(dy, x, weight, stride, padding)
        return dx, transform(dweight, dy, x, weight, stride, padding), dbias
    return conv_backward


def _last_sample_only(dweight, dy, x, weight, stride, padding):
    return einsum_conv_backward(dy[-1:], x[-1:], weight, stride, padding)[1]


CONV_MISTAKES = [
    (_with_dweight(lambda d, *a: d.reshape(d.shape[0], -1).T.reshape(d.shape)), "in the wrong order"),
    (_with_dweight(lambda d, *a: d[:, :, ::-1, ::-1]), "flipped in both kernel axes"),
    (_with_dweight(lambda d, dy, x, *a: d / x.shape[0]), "divided by the batch size"),
    (_with_dweight(_last_sample_only), "alone: sum the shares of every sample"),
]


@pytest.mark.parametrize("answer, hint", CONV_MISTAKES, ids=[h for _, h in CONV_MISTAKES])
def test_conv_mistakes(answer, hint):
    text = failed(exercises.check_conv_backward(answer), hint, "dweight: wrong")
    assert "dx: correct" in text and "dbias: correct" in text


def test_conv_bias_and_border_mistakes():
    def per_sample_bias(dy, x, weight, stride, padding):
        dx, dweight, _ = einsum_conv_backward(dy, x, weight, stride, padding)
        return dx, dweight, dy.sum(axis=(2, 3))

    failed(exercises.check_conv_backward(per_sample_bias), "dbias: wrong shape", "extra batch axis")

    def border(dy, x, weight, stride, padding):
        dx, dweight, dbias = einsum_conv_backward(dy, x, weight, stride, padding)
        dx[:, :, 0, :] = 0.0
        return dx, dweight, dbias

    failed(exercises.check_conv_backward(border), "next to the image border")

    def in_place(dy, x, weight, stride, padding):
        grads = einsum_conv_backward(dy.copy(), x, weight, stride, padding)
        dy *= 0.5
        return grads

    failed(exercises.check_conv_backward(in_place), "conv_backward wrote into dy", "never change the dy")


def _bn_parts(x, gamma, eps):
    axes = (0, 2, 3)
    inv_std = 1.0 / np.sqrt(x.var(axis=axes, keepdims=True) + eps)
    return axes, inv_std, (x - x.mean(axis=axes, keepdims=True)) * inv_std, gamma.reshape(1, -1, 1, 1)


def _bn_dx(make_dx):
    def batch_norm_backward(dy, x, gamma, eps):
        axes, inv_std, x_hat, g = _bn_parts(x, gamma, eps)
        _, dgamma, dbeta = staged_batch_norm_backward(dy, x, gamma, eps)
        return make_dx(dy, axes, inv_std, x_hat, g), dgamma, dbeta
    return batch_norm_backward


BN_MISTAKES = [
    (_bn_dx(lambda dy, axes, s, xh, g: g * s * dy), bn_module.EVALUATION_MODE),
    (_bn_dx(lambda dy, axes, s, xh, g: g * s * (dy - dy.mean(axis=axes, keepdims=True))), bn_module.NO_VARIANCE_PATH),
    (_bn_dx(lambda dy, axes, s, xh, g: g * s * (dy - xh * (dy * xh).mean(axis=axes, keepdims=True))),
     bn_module.NO_MEAN_PATH),
    (_bn_dx(lambda dy, axes, s, xh, g: s * (dy - dy.mean(axis=axes, keepdims=True)
                                            - xh * (dy * xh).mean(axis=axes, keepdims=True))), bn_module.NO_GAMMA),
]


@pytest.mark.parametrize("answer, hint", BN_MISTAKES, ids=["eval", "variance", "mean", "gamma"])
def test_batch_norm_mistakes(answer, hint):
    text = hinted(exercises.check_batch_norm_backward(answer), hint)
    assert "dgamma: correct" in text
    assert "mean(" not in hint and "sqrt" not in hint  # hints name the mistake, not the formula


def test_batch_norm_sum_mistakes():
    def mean_beta(dy, x, gamma, eps):
        dx, dgamma, _ = staged_batch_norm_backward(dy, x, gamma, eps)
        return dx, dgamma, dy.mean(axis=(0, 2, 3))

    hinted(exercises.check_batch_norm_backward(mean_beta), bn_module.MEAN_NOT_SUM)

    def first_sample(dy, x, gamma, eps):
        dx, dgamma, _ = staged_batch_norm_backward(dy, x, gamma, eps)
        return dx, dgamma, dy[0].sum(axis=(1, 2))

    hinted(exercises.check_batch_norm_backward(first_sample), bn_module.FIRST_SAMPLE)


def test_numerical_gradient_mistakes():
    def one_sided(f, x, dy, eps):
        base, grad, flat = np.sum(f() * dy), np.zeros(x.size), x.reshape(-1)
        for i in range(x.size):
            old = flat[i]
            flat[i] = old + eps
            grad[i] = (np.sum(f() * dy) - base) / eps
            flat[i] = old
        return grad.reshape(x.shape)

    failed(exercises.check_numerical_gradient(one_sided), "one-sided difference")
    failed(exercises.check_numerical_gradient(lambda f, x, dy, eps: nditer_numerical_gradient(f, x, np.ones_like(dy), eps)),
           "dy is ignored")

    def not_restored(f, x, dy, eps):
        grad = nditer_numerical_gradient(f, x, dy, eps)
        x += 1e-3
        return grad

    failed(exercises.check_numerical_gradient(not_restored), "x is not restored")


def test_gradient_checker_all_ones_trap():
    def ones_check(forward, backward, x, rng):
        dy = np.ones(forward(x).shape)
        numeric = nditer_numerical_gradient(lambda: forward(x), x, dy, 1e-6)
        return bool(np.allclose(backward(dy), numeric, atol=1e-6))

    text = failed(exercises.check_gradient_checker(ones_check), "batch norm returning dx = 0: accepted (it is wrong)",
                  "all-ones dy")
    assert "linear, transposed weight (dy @ W): rejected" in text
    failed(exercises.check_gradient_checker(lambda f, b, x, rng: True), "it accepts a wrong backward")
    failed(exercises.check_gradient_checker(lambda f, b, x, rng: False), "it rejects a correct backward")


def test_draw_gate_mistakes():
    hinted(exercises.check_draw_gate(lambda p, mode, n, rng: bool(rng.random() < 1 - p) if mode == "batch"
                                     else rng.random(n) < p), "True means KEPT, with probability p (the survival "
                                                              "probability): you keep with probability 1 - p")


def _block_forward_with(mistake):
    def block_forward(block, x, gate):
        y, saved = where_block_forward(block, x, gate)
        s = block.shortcut.forward(x)
        g = np.asarray(gate, dtype=float).reshape(-1, 1, 1, 1)
        if mistake == "no relu":
            return (s + g * block.branch.forward(x) * saved["multiplier"] if np.any(gate) else s), saved
        if mistake == "p in training" and np.any(gate):
            return np.maximum(s + g * block.branch.forward(x) * block.survival_prob, 0), saved
        return y, saved
    return block_forward


def test_block_forward_mistakes():
    hinted(exercises.check_block_forward(_block_forward_with("no relu")), "the output ReLU is missing: the block ends "
                                                                         "with a ReLU after the sum")
    failed(exercises.check_block_forward(_block_forward_with("p in training")), "that is the paper's TEST-time rule")

    def runs_dropped_branch(block, x, gate):
        f = block.branch(x)
        y, saved = where_block_forward(block, x, gate)
        return y + 0 * f, saved

    failed(exercises.check_block_forward(runs_dropped_branch), "the branch ran although its gate is off",
           "running statistics stay as they were")


def test_block_backward_mistakes():
    def in_place(blk, dy, saved):
        dy *= saved["relu_mask"]
        return per_sample_block_backward(blk, dy, {**saved, "relu_mask": np.ones_like(saved["relu_mask"])})

    failed(exercises.check_block_backward(in_place), "block_backward wrote into dy")
    hinted(exercises.check_block_backward(
        lambda b, dy, s: per_sample_block_backward(b, dy, {**s, "relu_mask": np.ones_like(s["relu_mask"])})),
        "the ReLU mask is missing: the block ends with a ReLU, so the gradient passes through its mask before it splits")

    def ignores_gate(blk, dy, saved):
        dz = dy * saved["relu_mask"]
        return blk.shortcut.backward(dz) + blk.branch.backward(dz)

    one_line(exercises.check_block_backward(ignores_gate), block_module.DROPPED_BRANCH_CALLED)

    def unscaled(blk, dy, saved):
        dz = dy * saved["relu_mask"]
        dx = blk.shortcut.backward(dz)
        return dx + blk.branch.backward(dz) if np.any(saved["gate"]) else dx

    text = failed(exercises.check_block_backward(unscaled), "the branch's share is not scaled")
    assert "dropped gate:\n    \u2713 dx: correct" in text

    def no_shortcut(blk, dy, saved):
        dz = dy * saved["relu_mask"]
        return per_sample_block_backward(blk, dy, saved) - blk.shortcut.backward(dz)

    failed(exercises.check_block_backward(no_shortcut), "the shortcut's gradient is missing")


@pytest.mark.parametrize("k", range(len(schedule_module.SCHEDULE_MISTAKES)))
def test_schedule_mistake_gets_the_same_hint_at_every_size(k):
    mistake, hint = schedule_module.SCHEDULE_MISTAKES[k]
    text = hinted(exercises.check_schedule(lambda L, p: list(mistake(np.arange(1, L + 1), L, p))), hint)
    # L = 1 included where the mistake changes it: linspace(1, p, 1) and counting from 0 both give [1.0]
    # there, and each keeps its own hint.
    if not np.allclose(mistake(np.arange(1, 2), 1, 0.8), [0.8]):
        assert "L = 1, p_L = 0.8: wrong (the same problem as above)" in text


def test_schedule_linspace_is_one_mistake():
    text = hinted(exercises.check_schedule(lambda L, p: np.linspace(1, p, L)), schedule_module.SCHEDULE_MISTAKES[0][1])
    assert "count the blocks from 0" not in text and "divide by L - 1" not in text


def test_expected_depth_and_time_model_mistakes():
    failed(exercises.check_expected_depth(lambda probs: sum(probs) / len(probs)), "expected FRACTION")
    k, t = [1, 2, 3, 4, 5], [3.0, 3.5, 4.1, 4.4, 5.0]
    failed(exercises.check_time_model(lambda a, s: polyfit_time_model(a, s)[::-1], lambda *a: 0.0, k, t),
           "you return (per_block_s, fixed_s)")
    failed(exercises.check_time_model(lambda a, s: (0.0, float(np.dot(a, s) / np.dot(a, a))), lambda *a: 0.0, k, t),
           "your line goes through the origin")
    failed(exercises.check_time_model(polyfit_time_model, lambda t0, tb, probs: 1 - sum(probs) / len(probs), k, t),
           "if the fixed part cost nothing")


TEST_TIME_MISTAKES = [
    (lambda b, s, p: np.maximum(b + s, 0), "the branch is not scaled"),
    (lambda b, s, p: p * b + s, "the ReLU after the sum is missing"),
    (lambda b, s, p: np.maximum(p * b, 0) + s, test_time_module.RELU_MISPLACED),
    (lambda b, s, p: p * np.maximum(b, 0) + np.maximum(s, 0), None),  # another misplacement: any hint, no crash
    (lambda b, s, p: p * b + np.maximum(s, 0), test_time_module.RELU_MISPLACED),
    (lambda b, s, p: np.maximum(b / p + s, 0), "inverted rule's training-time scaling"),
]


@pytest.mark.parametrize("answer, hint", TEST_TIME_MISTAKES, ids=range(len(TEST_TIME_MISTAKES)))
def test_test_time_rule_mistakes(answer, hint):
    report = exercises.check_test_time_rule(answer)
    failed(report, hint) if hint else failed(report)


def test_test_time_rule_random_gate():
    rng = np.random.default_rng(0)
    failed(exercises.check_test_time_rule(lambda f, s, p: np.maximum((rng.random() < p) * f + s, 0)),
           "no gate is drawn at test time")


def test_network_mistakes():
    failed(exercises.check_network_test_time(lambda m, x, gates=None: network_by_stages(m, x, None if gates is None
                                                                                       else [True] * len(gates))),
           "the gates are ignored")
    failed(exercises.check_network_test_time(lambda m, x, gates=None: network_by_stages(m, x, [True] * len(m.blocks))),
           "no branch is weighted")


@pytest.mark.parametrize("mistake", list(sgd_module.MISTAKES))
def test_sgd_mistakes(mistake):
    settings = {"decay outside momentum": {}, "no nesterov": {}, "ignores skip": {}, "skip keeps decaying buffer": {}}[mistake]
    del settings

    def planted(params, grads, buffers, received, lr, momentum, nesterov, weight_decay, skip_unused):
        sgd_module._by_hand(params, grads, buffers, received, momentum, nesterov, weight_decay, skip_unused, mistake)

    hinted(exercises.check_sgd_step(planted), sgd_module.MISTAKES[mistake])


def test_gradient_log_mistakes(log_runs):
    def null_as_zero(path):
        with open(path) as handle:
            table = np.array([[0.0 if v is None else v for v in json.loads(line)["block_grad"]] for line in handle])
        return list(table.mean(axis=0))

    failed(exercises.check_gradient_logs(null_as_zero, 1.0, log_runs), "it is not a gradient of 0")
    means = {k: nan_block_grad_means(p) for k, p in log_runs.items()}
    failed(exercises.check_gradient_logs(nan_block_grad_means, means["constant"][-1] / means["stochastic"][-1], log_runs),
           "that is the inverse")
    failed(exercises.check_gradient_logs(nan_block_grad_means, means["stochastic"][0] / means["constant"][0], log_runs),
           "that is block 1")


def test_gradient_log_runs_are_real_minisd_runs(log_runs):
    with open(log_runs["stochastic"]) as handle:
        records = [json.loads(line) for line in handle]
    assert len(records) == exercises.gradient_logs.RUN_SETTINGS["epochs"]
    assert any(v is None for r in records for v in r["block_grad"])  # a block that never ran in an epoch
    with open(os.path.join(os.path.dirname(log_runs["constant"]), "settings.json")) as handle:
        assert json.load(handle)["schedule"] == "none"


# ------------------------------------------------------------------------------------------------
# The notebooks, and the instructor key kept apart from them
# ------------------------------------------------------------------------------------------------


class _Cell(dict):
    """A notebook cell read as plain JSON, with the attributes these tests use."""

    source = property(lambda self: "".join(self["source"]))
    metadata = property(lambda self: self.get("metadata", {}))


def nbformat_free(raw):
    return type("Notebook", (), {"cells": [_Cell(c) for c in raw["cells"]]})


def test_exercise_notebooks_in_teaching_order_with_their_key():
    names = [os.path.basename(p) for p in NOTEBOOKS]
    assert [n[:2] for n in names] == [f"{k:02d}" for k in range(1, len(names) + 1)] and len(names) >= 8
    answers = open(os.path.join(ROOT, "instructor", "answers.md"), encoding="utf-8").read()
    for path in NOTEBOOKS:
        with open(path, encoding="utf-8") as handle:  # plain JSON: nbformat's validation is slow
            nb = nbformat_free(json.load(handle))
        exercise_cells = [c for c in nb.cells if "exercise" in c.metadata.get("tags", [])]
        check_cells = [c for c in nb.cells if "check" in c.metadata.get("tags", [])]
        assert exercise_cells and len(check_cells) >= 1, path
        assert all("raise NotImplementedError" in c.source for c in exercise_cells), path
        assert os.path.exists(run_exercises.solution_path(path)), path
        first = nb.cells[0].source
        assert "**Prerequisites:**" in first and "**Difficulty:**" in first and "**Time:** about" in first, path
        assert "To think about" in nb.cells[-1].source, path
        assert f"## {os.path.splitext(os.path.basename(path))[0]}" in answers, path
        assert not os.path.exists(os.path.join(os.path.dirname(path), "solutions"))


def test_notebook_two_does_not_print_the_exercise_formula():
    with open(os.path.join(ROOT, "notebooks", "02_batch_norm.ipynb"), encoding="utf-8") as handle:
        text = "".join("".join(c["source"]) for c in json.load(handle)["cells"])
    assert "m\\, d\\hat x - \\sum d\\hat x" not in text and "exercises/03_batch_norm_backward.ipynb" in text


@pytest.mark.slow
@pytest.mark.parametrize("state", run_exercises.STATES)
def test_notebooks_solved_unsolved_and_delegated(state, log_runs, monkeypatch):
    """Every notebook in the state, all in one kernel (scripts/run_exercises.py --check runs each alone)."""
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    # The kernel trains the gradient-log runs of exercise 9 once per session: reuse this session's.
    monkeypatch.setenv("MINISD_EXERCISE_RUNS", os.path.dirname(os.path.dirname(log_runs["constant"])))
    paths = [p for p in NOTEBOOKS if state != "delegated" or run_exercises.delegated_functions(p)]
    assert len(paths) >= 8
    executed = run_exercises.execute_together(paths, state)
    problems = {os.path.basename(p): run_exercises.problems_in(nb, p, state) for p, nb in executed.items()}
    assert not any(problems.values()), problems


# ------------------------------------------------------------------------------------------------
# Issue 27: answers that would break the checker itself, and numbers of the wrong kind
# ------------------------------------------------------------------------------------------------


def test_a_block_backward_that_deletes_the_counted_backward_does_not_break_the_cleanup():
    def block_backward(blk, dy, saved):
        dx = per_sample_block_backward(blk, dy, saved)
        del blk.branch.backward  # removes the checker's counting wrapper
        return dx

    report = exercises.check_block_backward(block_backward)
    assert report.passed, str(report)


@pytest.mark.parametrize("answer, phrase", [
    (lambda f, s, p: np.maximum(p * f + s, 0) + 0j, "y holds complex numbers, not numbers"),
    (lambda f, s, p: np.maximum(p * f + s, 0).astype(str), "y holds text, not numbers"),
])
def test_arrays_of_the_wrong_kind_are_refused_in_one_line(answer, phrase):
    one_line(exercises.check_test_time_rule(answer), phrase)


@pytest.mark.parametrize("answer, phrase", [
    (lambda L, p: "05", "linear_decay's result is a str, not a list of 3 probabilities"),
    (lambda L, p: {l: 1 - l / L * (1 - p) for l in range(1, L + 1)}, "linear_decay's result is a dict"),
    (lambda L, p: [True] * L, "linear_decay's result holds true/false values, not numbers"),
])
def test_schedules_of_the_wrong_kind_are_refused(answer, phrase):
    one_line(exercises.check_schedule(answer), phrase)


def test_a_schedule_given_as_a_generator_is_still_an_answer():
    report = exercises.check_schedule(lambda L, p: (1 - l / L * (1 - p) for l in range(1, L + 1)))
    assert report.passed, str(report)
