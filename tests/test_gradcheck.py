"""gradcheck.py checks itself: it must FAIL on planted bugs and pass on the real code.

Planted bugs: a batch norm whose backward returns dx = 0, a transposed conv weight gradient, and a
backward that writes into the dy it was given. Correct backwards whose true gradient is near zero
(a confident softmax, an input feature of 1e-9) must pass: the criterion is
|analytic - numeric| <= atol + rtol |numeric|, not a relative error. Plus why the upstream gradient
must be random: with an all-ones dy the numerical gradient of a batch norm is zero, so the dx = 0
bug passes the library's own criterion, and a random dy catches it.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from helpers import assert_check, dev, host
from minisd import backend, functional as F, layers, models, residual
from minisd.gradcheck import (GradientCheckError, check_module, check_pair, compare, default_tolerances,
                              directional_check, frozen_randomness, numerical_gradient, rel_error)

# Finite-difference checks verify the math, which lives in the reference tier (tests/test_kernels.py
# holds the fast tier to it, with a few checks of its own).
pytestmark = pytest.mark.usefixtures("reference_tier")

TOL = 1e-6


# ------------------------------------------------------------------------------------------------
# rel_error and numerical_gradient
# ------------------------------------------------------------------------------------------------


def test_rel_error_definition():
    assert rel_error(dev(np.array([1.0, 2.0])), dev(np.array([1.0, 2.0]))) == 0.0
    assert rel_error(np.array([1.0]), np.array([3.0])) == pytest.approx(0.5)   # 2 / 4
    assert rel_error(np.array([0.0, 1.0]), np.array([0.0, -1.0])) == pytest.approx(1.0)
    assert rel_error(np.zeros(3), np.full(3, 1e-13)) == pytest.approx(0.1)     # floor max(1e-12, .)
    assert rel_error(np.zeros(0), np.zeros(0)) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        rel_error(np.zeros(2), np.zeros(3))


def test_numerical_gradient_of_a_known_function_and_x_is_restored(rng):
    x_host = rng.standard_normal((3, 4))
    x = dev(x_host.copy())
    dy = rng.standard_normal((3, 4))
    xp = backend.array_module(x)
    num = numerical_gradient(lambda: xp.sin(x) * x, x, dev(dy))
    expected = (np.cos(x_host) * x_host + np.sin(x_host)) * dy
    np.testing.assert_allclose(num.reshape(3, 4), expected, rtol=1e-8, atol=1e-10)
    np.testing.assert_array_equal(host(x), x_host)  # restored exactly


def test_numerical_gradient_with_a_subset_of_indices(rng):
    x = dev(rng.standard_normal(10))
    num = numerical_gradient(lambda: x * x, x, dev(np.ones(10)), indices=[2, 7])
    np.testing.assert_allclose(num, 2 * host(x)[[2, 7]], rtol=1e-9)


def test_numerical_gradient_of_an_output_that_aliases_the_input(rng):
    """y = x returns x itself: the + and - evaluations must not share storage."""
    x = dev(rng.standard_normal(5))
    dy = rng.standard_normal(5)
    np.testing.assert_allclose(numerical_gradient(lambda: x, x, dev(dy)), dy, rtol=1e-9)


def test_default_tolerances_follow_from_eps_and_the_dtype():
    u = np.finfo(np.float64).eps
    atol, rtol = default_tolerances(1e-5)
    assert rtol == pytest.approx(1e4 * (1e-10 + u / 1e-5))
    assert atol == pytest.approx(1e4 * u / 1e-5)  # for L's terms of total size 1
    # atol scales with the size of L = sum(y * dy): its rounding is what the quotient divides by eps
    y, dy = np.array([2.0, -3.0]), np.array([0.5, 2.0])
    assert default_tolerances(1e-5, output=y, dy=dy)[0] == pytest.approx(7.0 * atol)
    # a larger step: more truncation error; a smaller one: more rounding; float32: far looser
    assert default_tolerances(1e-3)[1] > rtol and default_tolerances(1e-8)[1] > rtol
    assert default_tolerances(1e-5, np.float32)[1] > 1e3 * rtol


def test_compare_is_atol_plus_rtol_times_numeric():
    ok = compare(np.array([1.0 + 1e-7, 1e-12]), np.array([1.0, 0.0]), atol=1e-10, rtol=1e-6)
    assert ok.passed and ok.errors["gradient"] == pytest.approx(max(1e-7 / (1e-10 + 1e-6), 1e-12 / 1e-10))
    bad = compare(np.array([1.0 + 1e-5]), np.array([1.0]), atol=1e-10, rtol=1e-6)
    assert not bad.passed and bad.errors["gradient"] == pytest.approx(1e-5 / (1e-10 + 1e-6), rel=1e-6)
    assert not compare(np.array([np.nan]), np.array([1.0]), atol=1.0, rtol=1.0).passed


def test_correct_backwards_with_near_zero_gradients_pass(rng):
    """Finite-difference noise of ~1e-11 on an entry whose true gradient is ~0 has a relative error
    of order 1; the checks must still pass (and did not with a pure relative error)."""
    # softmax cross entropy with confident logits: most probabilities (and gradients) are ~1e-10
    logits = dev(rng.standard_normal((6, 10)) * 8)
    labels = dev(np.arange(6) % 10)
    result = assert_check(check_pair(F.softmax_cross_entropy_forward, F.softmax_cross_entropy_backward,
                                     {"logits": logits, "labels": labels}))
    assert rel_error(*_analytic_and_numeric_ce(logits, labels)) > 1e-3  # the old criterion failed here
    assert result.errors["logits"] < 0.1
    # a linear layer whose first input feature is ~1e-9: that weight column's gradient is ~1e-9
    backend.seed(2)
    linear = layers.Linear(3, 2, dtype="float64")
    x = rng.standard_normal((5, 3))
    x[:, 0] *= 1e-9
    assert_check(check_module(linear, dev(x)))


def _analytic_and_numeric_ce(logits, labels):
    dy = np.random.default_rng(0).standard_normal(())
    _, cache = F.softmax_cross_entropy_forward(logits, labels)
    analytic = host(F.softmax_cross_entropy_backward(dev(dy), cache)).ravel()
    x = logits.copy()
    numeric = numerical_gradient(lambda: F.softmax_cross_entropy_forward(x, labels)[0], x, dev(dy))
    return analytic, numeric


def test_checks_require_float64(rng):
    with pytest.raises(ValueError, match="float64"):
        check_module(layers.Linear(2, 2), dev(rng.standard_normal((3, 2)).astype("float32")))
    with pytest.raises(ValueError, match="float64"):
        check_pair(F.relu_forward, F.relu_backward, {"x": dev(np.ones(3, dtype="float32"))})


# ------------------------------------------------------------------------------------------------
# Planted bug 1: batch norm whose backward returns dx = 0
# ------------------------------------------------------------------------------------------------


def _bn_dx_zero_backward(dy, cache):
    dx, dgamma, dbeta = F.batch_norm_backward(dy, cache)
    return backend.array_module(dx).zeros_like(dx), dgamma, dbeta


class BatchNormDxZero(layers.BatchNorm2d):
    def backward(self, dy):
        dx = super().backward(dy)
        return backend.array_module(dx).zeros_like(dx)


def _bn_inputs(rng, shape=(3, 2, 3, 3)):
    return {"x": dev(rng.standard_normal(shape)), "gamma": dev(rng.standard_normal(2)),
            "beta": dev(rng.standard_normal(2)), "running_mean": dev(np.zeros(2)), "running_var": dev(np.ones(2))}


def test_check_pair_fails_on_batchnorm_with_dx_zero(rng):
    inputs = _bn_inputs(rng)
    names = ["x", "gamma", "beta"]
    real = check_pair(F.batch_norm_forward, F.batch_norm_backward, inputs, grad_names=names, tol=TOL)
    assert_check(real)
    bad = check_pair(F.batch_norm_forward, _bn_dx_zero_backward, inputs, grad_names=names, tol=TOL)
    assert not bad.passed
    assert bad.failed() == ["x"]  # gamma and beta are still right
    assert bad.errors["x"] > 1e3  # far outside the tolerance, not at its edge


def test_check_module_fails_on_batchnorm_module_with_dx_zero(rng):
    x = dev(rng.standard_normal((3, 2, 3, 3)))
    assert_check(check_module(layers.BatchNorm2d(2, dtype="float64"), x, tol=TOL))
    bad = check_module(BatchNormDxZero(2, dtype="float64"), x, tol=TOL)
    assert bad.failed() == ["input"]
    with pytest.raises(GradientCheckError) as info:
        check_module(BatchNormDxZero(2, dtype="float64"), x, tol=TOL, raise_on_fail=True)
    report = str(info.value)
    assert "FAILED" in report and "FAIL input" in report and "worst entries" in report
    worst = [line for line in report.splitlines() if line.startswith("    input (")]
    assert len(worst) == 3  # the three worst entries of the input gradient, with where they are


def test_why_the_upstream_gradient_must_be_random(rng):
    """With dy = ones, L = sum(BN(x)) = gamma * sum(x_hat) + M * beta does not depend on x: the
    numerical gradient is zero (rounding noise), so under the checker's own criterion a backward
    returning dx = 0 passes, exactly as the correct one does. With a random dy the numerical
    gradient is O(1) and the same bug fails while the correct backward passes."""
    inputs = _bn_inputs(rng)
    x = inputs["x"].copy()

    def run():
        out, _ = F.batch_norm_forward(x, inputs["gamma"], inputs["beta"], None, None, True)
        return out

    verdicts = {}
    for name, dy in (("ones", dev(np.ones(x.shape))), ("random", dev(np.random.default_rng(7).standard_normal(x.shape)))):
        numeric = numerical_gradient(run, x, dy)
        y, cache = F.batch_norm_forward(x, inputs["gamma"], inputs["beta"], None, None, True)
        atol, rtol = default_tolerances(1e-5, output=y, dy=dy)  # what check_pair would use
        true_dx = host(F.batch_norm_backward(dy, cache)[0]).ravel()
        buggy_dx = host(_bn_dx_zero_backward(dy, cache)[0]).ravel()
        verdicts[name] = (compare(true_dx, numeric, atol, rtol).passed, compare(buggy_dx, numeric, atol, rtol).passed,
                          float(np.max(np.abs(numeric))))
    assert verdicts["ones"][:2] == (True, True)        # blind: the bug passes too
    assert verdicts["ones"][2] < 1e-8                   # because the numerical gradient is ~0
    assert verdicts["random"][:2] == (True, False)     # a random dy catches the bug
    assert verdicts["random"][2] > 0.1


# ------------------------------------------------------------------------------------------------
# Planted bug 2: a transposed conv weight gradient
# ------------------------------------------------------------------------------------------------


def _conv_transposed_dw_backward(dy, cache):
    dx, dw, db = F.conv2d_backward(dy, cache)
    return dx, dw.transpose(1, 0, 2, 3).copy(), db  # (O, C) swapped: same shape when O == C


class ConvTransposedGrad(layers.Conv2d):
    def backward(self, dy):
        dx = super().backward(dy)
        self.grads["weight"][...] = self.grads["weight"].transpose(1, 0, 3, 2).copy()
        return dx


def test_check_pair_fails_on_transposed_conv_weight_gradient(rng):
    inputs = {"x": dev(rng.standard_normal((2, 3, 5, 5))), "weight": dev(rng.standard_normal((3, 3, 3, 3))),
              "bias": dev(rng.standard_normal(3))}
    kw = {"stride": 1, "padding": 1}
    assert_check(check_pair(F.conv2d_forward, F.conv2d_backward, inputs, kwargs=kw, tol=TOL))
    bad = check_pair(F.conv2d_forward, _conv_transposed_dw_backward, inputs, kwargs=kw, tol=TOL)
    assert bad.failed() == ["weight"]


def test_check_module_fails_on_conv_module_with_transposed_weight_gradient(rng):
    x = dev(rng.standard_normal((2, 3, 4, 4)))
    backend.seed(3)
    assert_check(check_module(layers.Conv2d(3, 3, 3, 1, 1, dtype="float64"), x, tol=TOL))
    backend.seed(3)
    bad = check_module(ConvTransposedGrad(3, 3, 3, 1, 1, dtype="float64"), x, tol=TOL)
    assert bad.failed() == ["weight"]


def test_directional_check_catches_planted_bugs_in_a_network(rng):
    def net(bn_cls, conv_cls):
        backend.seed(5)
        return layers.Sequential(conv_cls(2, 2, 3, 1, 1, bias=False, dtype="float64"), bn_cls(2, dtype="float64"),
                                 layers.ReLU(), layers.GlobalAvgPool2d(), layers.Linear(2, 3, dtype="float64"))

    x = dev(rng.standard_normal((4, 2, 4, 4)))
    assert_check(directional_check(net(layers.BatchNorm2d, layers.Conv2d), x, tol=TOL))
    assert not directional_check(net(BatchNormDxZero, layers.Conv2d), x, tol=TOL).passed
    assert not directional_check(net(layers.BatchNorm2d, ConvTransposedGrad), x, tol=TOL).passed


# ------------------------------------------------------------------------------------------------
# Planted bug 3: a backward that writes into the dy it was given
# ------------------------------------------------------------------------------------------------


def _relu_in_place_backward(dy, mask):
    dy *= mask  # the bug: dy belongs to the caller
    return dy


class InPlaceReLU(layers.ReLU):
    def backward(self, dy):
        mask = self._take(dy)
        dy *= mask
        return dy


class InPlaceBatchNorm(layers.BatchNorm2d):
    """Right dx, but it also overwrites the dy it was given with dx."""

    def backward(self, dy):
        dx = super().backward(dy)
        dy[...] = dx
        return dy


def test_check_pair_flags_a_backward_that_writes_into_dout(rng):
    x = dev(rng.standard_normal((3, 4)) + 0.05)
    assert_check(check_pair(F.relu_forward, F.relu_backward, {"x": x}, tol=TOL))
    bad = check_pair(F.relu_forward, _relu_in_place_backward, {"x": x}, tol=TOL)
    assert bad.failed() == ["dout modified by backward"]  # its gradient values are right: only the write gives it away
    assert math.isinf(bad.errors["dout modified by backward"]) and bad.errors["x"] <= 1.0


def test_check_module_flags_a_module_that_writes_into_dy(rng):
    x = dev(rng.standard_normal((3, 4)) + 0.05)
    assert_check(check_module(layers.ReLU(), x, tol=TOL))
    assert "dy modified by backward" in check_module(InPlaceReLU(), x, tol=TOL).failed()


def test_writing_into_dy_corrupts_the_shortcut_gradient_at_a_residual_join(rng):
    """In a block the same dz goes to the shortcut and to the branch; a branch that overwrites it
    corrupts the shortcut's gradient, and the input check fails (not only the write flag)."""
    x = dev(rng.standard_normal((2, 3, 4, 4)))
    backend.seed(1)
    good = residual.BasicBlock(3, 3, dtype="float64")
    assert_check(check_module(good, x, tol=TOL, max_entries=20))
    backend.seed(1)
    bad_block = residual.BasicBlock(3, 3, dtype="float64")
    bad_block.branch = layers.Sequential(*(list(bad_block.branch)[:-1] + [InPlaceBatchNorm(3, dtype="float64")]))
    bad = check_module(bad_block, x, tol=TOL, max_entries=20)
    assert "input" in bad.failed()
    assert "dy modified by backward" not in bad.errors  # the block itself never wrote into its dy


# ------------------------------------------------------------------------------------------------
# Results, reports, frozen randomness
# ------------------------------------------------------------------------------------------------


def test_result_report_and_raise(rng):
    x = dev(rng.standard_normal((3, 2, 3, 3)))
    ok = check_module(layers.BatchNorm2d(2, dtype="float64"), x, tol=TOL)
    assert ok.passed and ok.max_error <= 1.0 and ok.failed() == [] and ok.rtol == TOL
    assert ok.report().startswith("gradient check passed (worst entry at")
    assert ok.raise_if_failed() is ok
    assert set(ok.errors) == {"input", "weight", "bias"}


def test_max_entries_checks_a_subset_of_every_array(rng):
    conv = layers.Conv2d(3, 4, 3, 1, 1, dtype="float64")
    result = assert_check(check_module(conv, dev(rng.standard_normal((2, 3, 5, 5))), max_entries=5, tol=TOL))
    assert set(result.errors) == {"input", "weight", "bias"}
    bad = check_module(ConvTransposedGrad(3, 3, 3, 1, 1, dtype="float64"), dev(rng.standard_normal((2, 3, 4, 4))),
                       max_entries=10, tol=TOL)
    assert bad.failed() == ["weight"]


def test_module_checks_leave_parameters_and_buffers_as_they_were(rng):
    bn = layers.BatchNorm2d(3, dtype="float64")
    x = dev(rng.standard_normal((4, 3, 2, 2)) + 5.0)
    for check in (check_module, directional_check):
        check(bn, x).raise_if_failed()
        np.testing.assert_array_equal(host(bn.buffers["running_mean"]), np.zeros(3))
        np.testing.assert_array_equal(host(bn.buffers["running_var"]), np.ones(3))
        np.testing.assert_array_equal(host(bn.params["weight"]), np.ones(3))


def test_frozen_randomness_freezes_gates_and_restores(rng):
    block = residual.BasicBlock(2, 2, survival_prob=0.5, dtype="float64",
                                gate_rng=np.random.default_rng(0))
    x = dev(rng.standard_normal((2, 2, 3, 3)))
    block(x)
    first = block.gate
    mean_before = host(block.branch[1].buffers["running_mean"]).copy()
    with frozen_randomness(block):
        assert block.forced_gate == first
        for _ in range(20):
            block(x)
            assert block.gate == first
    assert block.forced_gate is None  # sampling again afterwards
    np.testing.assert_array_equal(host(block.branch[1].buffers["running_mean"]), mean_before)
    gates = set()
    for _ in range(20):
        block(x)
        gates.add(block.gate)
    assert gates == {True, False}


def test_check_module_on_an_unforced_stochastic_block_freezes_its_gate(rng):
    """p = 0.5 and nothing forced: without frozen gates the +eps / -eps evaluations would see
    different branches and the check would fail; with them it passes for every seed."""
    x = dev(rng.standard_normal((2, 2, 4, 4)))
    seen = set()
    for seed in range(4):
        block = residual.BasicBlock(2, 2, survival_prob=0.5, dtype="float64",
                                    gate_rng=np.random.default_rng(seed))
        assert_check(check_module(block, x, tol=TOL, max_entries=8))
        seen.add(block.gate)
        assert block.forced_gate is None
    assert seen == {True, False}


def test_a_check_in_the_middle_of_training_leaves_the_gate_stream_alone(rng):
    """A check draws gates with its first forward; afterwards the gate generator is restored as the
    buffers are, so training goes on with the gates it would have drawn without the check."""
    def model():
        return models.resnet_cifar(depth=8, in_channels=1, schedule="uniform", final_survival=0.5, seed=3,
                                   dtype="float64")

    x = dev(rng.standard_normal((2, 1, 8, 8)))
    plain, checked = model(), model()
    plain(x)
    checked(x)
    for check in (directional_check, check_module):
        kwargs = {"max_entries": 1} if check is check_module else {}
        assert_check(check(checked, x, **kwargs))
    gates_plain = [(plain(x), plain.gates())[1] for _ in range(8)]
    gates_checked = [(checked(x), checked.gates())[1] for _ in range(8)]
    assert gates_checked == gates_plain
    assert len({tuple(g) for g in gates_plain}) > 1  # the gates do vary from step to step


def test_checks_name_a_layer_that_returns_no_input_gradient(rng):
    """A stem conv with input_grad=False (as the trainer sets it): a clear error, not a TypeError."""
    conv = layers.Conv2d(2, 3, 3, padding=1, dtype="float64", input_grad=False)
    x = dev(rng.standard_normal((2, 2, 4, 4)))
    with pytest.raises(ValueError, match=r"check_module: Conv2d.*returned no input gradient"):
        check_module(conv, x)
    with pytest.raises(ValueError, match=r"directional_check: Conv2d.*returned no input gradient"):
        directional_check(conv, x)
    weights_only = assert_check(check_module(conv, x, check_input=False))
    assert set(weights_only.errors) == {"weight", "bias"}
    assert "input_grad=False" in repr(conv)
