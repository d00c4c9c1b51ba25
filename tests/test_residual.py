"""residual.py: the stochastic-depth block (Huang et al. 2016), shortcuts and schedules.

Finite-difference checks of the block with the gate forced on, off (and per sample), in batch and
row mode, for both scale rules and every shortcut; proof that a dropped branch is skipped; the
Monte Carlo check that training-mode outputs average to the test-mode output; timm / torchvision
drop-path semantics; schedules and guards.
"""
from __future__ import annotations

import numpy as np
import pytest

from helpers import assert_check, count_calls, dev, host, randomise_batch_norm
from minisd import backend, layers, residual
from minisd.gradcheck import check_module
from minisd.residual import BasicBlock, SubsampleZeroPad

# Finite-difference checks verify the math, which lives in the reference tier (tests/test_kernels.py
# holds the fast tier to it, with a few checks of its own).
pytestmark = pytest.mark.usefixtures("reference_tier")

TOL = 1e-6
F64 = "float64"

# name -> (in_channels, out_channels, stride, shortcut option)
SHORTCUTS = {
    "identity": (3, 3, 1, "zero_pad"),
    "zero_pad": (2, 4, 2, "zero_pad"),
    "projection": (2, 4, 2, "projection"),
}


def _block(kind, p=0.5, mode="batch", scale="eval", dtype=F64, seed=0):
    cin, cout, stride, shortcut = SHORTCUTS[kind]
    return BasicBlock(cin, cout, stride, survival_prob=p, mode=mode, scale=scale, shortcut=shortcut,
                      dtype=dtype, rng=np.random.default_rng(seed), gate_rng=np.random.default_rng(seed + 100))


def _x(rng, kind, n=2, hw=5, dtype=F64):
    return dev(rng.standard_normal((n, SHORTCUTS[kind][0], hw, hw)).astype(dtype))


def _relu(a):
    return np.maximum(a, 0)


# ------------------------------------------------------------------------------------------------
# Finite-difference checks of the block, gates frozen
# ------------------------------------------------------------------------------------------------


GATES = {
    ("batch", "on"): True,
    ("batch", "off"): False,
    ("row", "on"): np.array([True, True]),
    ("row", "off"): np.array([False, False]),
    ("row", "mixed"): np.array([True, False]),
}


@pytest.mark.parametrize("kind", list(SHORTCUTS))
@pytest.mark.parametrize("scale", ["eval", "train"])
@pytest.mark.parametrize("mode,gate", list(GATES), ids=[f"{m}-{g}" for m, g in GATES])
def test_block_gradcheck_with_forced_gate(rng, kind, scale, mode, gate):
    block = randomise_batch_norm(_block(kind, p=0.5, mode=mode, scale=scale), rng)
    block.force_gate(GATES[(mode, gate)])
    result = assert_check(check_module(block, _x(rng, kind), tol=TOL))  # every entry
    expected = {"input"} | {n for n, _ in block.named_parameters()}
    assert set(result.errors) == expected
    if gate == "off":
        assert block.branch_skipped
        assert all(np.all(host(g) == 0) for n, g in block.named_grads() if n.startswith("branch."))


@pytest.mark.parametrize("kind", list(SHORTCUTS))
@pytest.mark.parametrize("scale", ["eval", "train"])
@pytest.mark.parametrize("mode", ["batch", "row"])
def test_block_gradcheck_in_eval_mode(rng, kind, scale, mode):
    block = randomise_batch_norm(_block(kind, p=0.7, mode=mode, scale=scale), rng)
    for bn in (m for m in block.modules() if isinstance(m, layers.BatchNorm2d)):
        bn.buffers["running_mean"][...] = dev(rng.standard_normal(bn.num_features) * 0.1)
        bn.buffers["running_var"][...] = dev(rng.uniform(0.5, 2.0, bn.num_features))
    block.eval()
    assert_check(check_module(block, _x(rng, kind), tol=TOL))  # every entry


def test_block_gradcheck_with_unforced_gates_row_mode(rng):
    # (seed 1: with seed 0 a pre-ReLU value lies 3e-5 from the kink, where a central difference of
    # step 1e-5 straddles it and no backward could agree)
    block = randomise_batch_norm(_block("identity", p=0.5, mode="row", scale="train", seed=1), rng)
    assert_check(check_module(block, _x(rng, "identity", n=4), tol=TOL))  # every entry
    assert block.forced_gate is None


# ------------------------------------------------------------------------------------------------
# Forward values: the paper's block and both scale rules
# ------------------------------------------------------------------------------------------------


def _shortcut_values(kind, x, out_channels):
    if kind == "identity":
        return x
    s = np.zeros((x.shape[0], out_channels) + x[:, :, ::2, ::2].shape[2:])
    s[:, : x.shape[1]] = x[:, :, ::2, ::2]
    return s


@pytest.mark.parametrize("kind", ["identity", "zero_pad"])
@pytest.mark.parametrize("scale", ["eval", "train"])
def test_block_forward_values(rng, kind, scale):
    p = 0.6
    block = _block(kind, p=p, scale=scale)
    x = _x(rng, kind)
    s = _shortcut_values(kind, host(x), block.out_channels)
    f_train = host(block.branch(x))  # batch statistics: the same as inside the block
    block.force_gate(True)
    train_multiplier = 1 / p if scale == "train" else 1.0
    np.testing.assert_allclose(host(block(x)), _relu(s + train_multiplier * f_train), rtol=1e-12, atol=1e-14)
    block.force_gate(False)
    np.testing.assert_array_equal(host(block(x)), _relu(s))
    block.eval()
    f_eval = host(block.branch(x))  # running statistics
    eval_multiplier = p if scale == "eval" else 1.0
    np.testing.assert_allclose(host(block(x)), _relu(s + eval_multiplier * f_eval), rtol=1e-12, atol=1e-14)
    assert block.gate is None  # no gate at test time, even though one is forced


@pytest.mark.parametrize("hw", [4, 5, 7])
def test_transition_block_shapes_for_even_and_odd_sizes(rng, hw):
    for kind in ("zero_pad", "projection"):
        block = _block(kind)
        block.force_gate(True)
        y = block(_x(rng, kind, hw=hw))
        assert y.shape == (2, 4, (hw + 1) // 2, (hw + 1) // 2)
        assert block.backward(dev(np.ones(y.shape))).shape == (2, 2, hw, hw)


def test_shortcut_modules():
    assert isinstance(_block("identity").shortcut, layers.Identity)
    assert isinstance(_block("zero_pad").shortcut, SubsampleZeroPad)
    assert list(n for n, _ in _block("zero_pad").named_parameters() if n.startswith("shortcut")) == []
    names = [n for n, _ in _block("projection").named_parameters()]
    assert names == ["branch.0.weight", "branch.1.weight", "branch.1.bias", "branch.3.weight", "branch.4.weight",
                     "branch.4.bias", "shortcut.0.weight", "shortcut.1.weight", "shortcut.1.bias"]
    conv = _block("projection").shortcut[0]
    assert conv.kernel_size == (1, 1) and conv.stride == (2, 2) and "bias" not in conv.params
    branch = _block("zero_pad").branch
    assert [type(m).__name__ for m in branch] == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d"]
    assert branch[0].stride == (2, 2) and branch[3].stride == (1, 1)
    assert branch[0].kernel_size == (3, 3) and branch[0].padding == (1, 1) and "bias" not in branch[0].params


def test_subsample_zero_pad_module_gradcheck(rng):
    assert_check(check_module(SubsampleZeroPad(2, 5, 2), dev(rng.standard_normal((2, 2, 5, 4))), tol=TOL))
    with pytest.raises(ValueError, match="SubsampleZeroPad"):
        SubsampleZeroPad(4, 2)


# ------------------------------------------------------------------------------------------------
# A dropped branch costs nothing: not called, zero gradient, running statistics untouched
# ------------------------------------------------------------------------------------------------


def _count_branch(block):
    counters = {"branch.forward": count_calls(block.branch, "forward"),
                "branch.backward": count_calls(block.branch, "backward")}
    for i, m in enumerate(block.branch):
        counters[f"branch.{i}.forward"] = count_calls(m, "forward")
        counters[f"branch.{i}.backward"] = count_calls(m, "backward")
    return counters


@pytest.mark.parametrize("kind", list(SHORTCUTS))
@pytest.mark.parametrize("mode", ["batch", "row"])
def test_dropped_branch_is_skipped(rng, kind, mode):
    block = _block(kind, p=0.5, mode=mode)
    x = _x(rng, kind)
    dy = dev(rng.standard_normal(block(x).shape))
    # a kept step first, so that "zero gradient" below is not just the initial state
    block.force_gate(True)
    block(x)
    block.backward(dy)
    assert all(np.any(host(g) != 0) for n, g in block.named_grads() if n.startswith("branch."))
    block.zero_grad()
    stats = {n: host(b).copy() for n, b in block.named_buffers()}

    counters = _count_branch(block)
    block.force_gate(False)
    y = block(x)
    dx = block.backward(dy)
    assert {k: len(v) for k, v in counters.items()} == {k: 0 for k in counters}
    assert block.branch_skipped and not np.any(block.gate)
    for n, g in block.named_grads():
        if n.startswith("branch."):
            assert np.all(host(g) == 0), n
    # and they are marked as having received no gradient this step (an optimizer may skip them)
    assert not any(m.grad_received for m in block.branch.modules())
    for n, b in block.named_buffers():
        if n.startswith("branch."):
            np.testing.assert_array_equal(host(b), stats[n], err_msg=n)

    if kind != "projection":  # parameter-free shortcut: dx by hand, exactly
        xh, dyh = host(x), host(dy)
        s = _shortcut_values(kind, xh, block.out_channels)
        np.testing.assert_array_equal(host(y), _relu(s))
        dz = dyh * (s > 0)
        if kind == "identity":
            expected = dz
        else:
            expected = np.zeros_like(xh)
            expected[:, :, ::2, ::2] = dz[:, : xh.shape[1]]
        np.testing.assert_array_equal(host(dx), expected)

    block.force_gate(True)  # and a kept step calls each exactly once
    block(x)
    block.backward(dy)
    assert {k: len(v) for k, v in counters.items()} == {k: 1 for k in counters}


def test_dropped_branch_dx_through_projection_shortcut_only(rng):
    block = _block("projection")
    x = _x(rng, "projection")
    block.force_gate(False)
    y = block(x)
    dy = rng.standard_normal(y.shape)
    dx = block.backward(dev(dy))
    s = host(block.shortcut(x))  # training BN: same batch statistics as inside the block
    np.testing.assert_array_equal(host(y), _relu(s))
    expected = block.shortcut.backward(dev(dy * (s > 0)))
    np.testing.assert_array_equal(host(dx), host(expected))


# ------------------------------------------------------------------------------------------------
# Row mode: per-sample gates, timm / torchvision semantics
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", ["eval", "train"])
def test_row_mode_dropped_samples_get_exactly_zero_gradient_at_the_branch_output(rng, scale):
    p = 0.5
    block = _block("identity", p=p, mode="row", scale=scale)
    mask = np.array([True, False, True, False])
    block.force_gate(mask)
    x = _x(rng, "identity", n=4)
    y = block(x)
    seen = []
    original = block.branch.backward
    block.branch.backward = lambda d: (seen.append(host(d).copy()), original(d))[1]
    dy = rng.standard_normal(y.shape)
    block.backward(dev(dy))
    (df,) = seen
    dz = dy * (host(y) > 0)
    assert np.all(df[~mask] == 0)  # exactly zero, not small
    multiplier = 1 / p if scale == "train" else 1.0
    np.testing.assert_allclose(df[mask], dz[mask] * multiplier, rtol=1e-15)
    np.testing.assert_array_equal(block.gate, mask)
    assert block.gate.dtype == bool


def test_row_mode_with_inverted_scaling_is_timm_drop_path_on_a_fixed_mask(rng):
    """timm: drop_path(f, p_drop) = f / keep_prob * mask, mask ~ Bernoulli(keep_prob) per sample;
    torchvision stochastic_depth(f, p_drop, mode="row") is the same. With keep_prob = p and the
    post-activation block: x_out = ReLU(shortcut(x) + f(x) * mask / p) in training, ReLU(shortcut(x)
    + f(x)) at test time. Expected values written from that definition (no torch)."""
    p = 0.8
    block = _block("identity", p=p, mode="row", scale="train")
    mask = np.array([True, False, False, True, True])
    x = _x(rng, "identity", n=5)
    xh = host(x)
    f = host(block.branch(x))  # branch on the whole batch, batch statistics over all 5 samples
    block.force_gate(mask)
    expected = _relu(xh + f * mask[:, None, None, None] / p)
    np.testing.assert_allclose(host(block(x)), expected, rtol=1e-13, atol=1e-15)
    # dropped samples: output is exactly the shortcut through the ReLU
    np.testing.assert_array_equal(host(block(x))[~mask], _relu(xh[~mask]))
    block.eval()
    f_eval = host(block.branch(x))
    np.testing.assert_allclose(host(block(x)), _relu(xh + f_eval), rtol=1e-13, atol=1e-15)


def test_row_mode_all_kept_equals_batch_mode_kept(rng):
    for scale in ("eval", "train"):
        row, batch = _block("zero_pad", mode="row", scale=scale), _block("zero_pad", mode="batch", scale=scale)
        row.force_gate(np.ones(2, dtype=bool))
        batch.force_gate(True)
        x = _x(rng, "zero_pad")
        np.testing.assert_allclose(host(row(x)), host(batch(x)), rtol=1e-14)
        dy = dev(rng.standard_normal((2, 4, 3, 3)))
        np.testing.assert_allclose(host(row.backward(dy)), host(batch.backward(dy)), rtol=1e-13, atol=1e-15)


def test_row_mode_all_dropped_skips_the_branch(rng):
    block = _block("identity", mode="row")
    counters = _count_branch(block)
    block.force_gate(np.zeros(2, dtype=bool))
    y = block(_x(rng, "identity"))
    block.backward(dev(np.ones(y.shape)))
    assert block.branch_skipped and all(len(c) == 0 for c in counters.values())


# ------------------------------------------------------------------------------------------------
# Monte Carlo: training outputs average to the test-time output
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["batch", "row"])
@pytest.mark.parametrize("scale", ["eval", "train"])
def test_monte_carlo_training_average_matches_eval_output(rng, mode, scale):
    """E over gates of the training output equals the test-time output, for both scale rules.

    Two choices make this comparison meaningful:
    * The branch's batch norms are put in eval mode (the block itself stays in training mode, so
      gates are drawn and training scaling applies). With batch statistics the branch would compute
      a different function in training than at test time, and no number of draws would close that
      gap; with running statistics f(x) is one fixed function and only the gate is random.
    * The expectation argument holds for the pre-activation s + b f / (1 or p), not through the
      output ReLU (E[ReLU(z)] != ReLU(E[z])). So x is positive with a large margin and the last
      BN's gamma is small: s + m f > 0 for every gate outcome (asserted below), the ReLU is the
      identity, and the block output is linear in the gate.

    Tolerance: each draw gives s + b m f with b ~ Bernoulli(p); the mean of K draws has standard
    error |m f| sqrt(p (1 - p) / K) per entry (entries share the gate in batch mode; per sample in
    row mode). We allow 4 standard errors (a false failure about once in 16 000 for a given seed; the
    seed is fixed, so the test is deterministic), and check the tolerance is tight enough to reject
    the other scale rule.
    """
    p, draws = 0.6, 1500
    block = _block("identity", p=p, mode=mode, scale=scale, seed=3)
    block.branch[4].params["weight"][...] = 0.05
    for bn in (block.branch[1], block.branch[4]):
        bn.buffers["running_mean"][...] = dev(rng.standard_normal(3) * 0.1)
    block.train()
    block.branch.eval()
    xh = rng.uniform(1.0, 2.0, (4, 3, 3, 3))
    x = dev(xh)
    f = host(block.branch(x))
    m_train = 1 / p if scale == "train" else 1.0
    assert xh.min() > 0 and (xh + m_train * f).min() > 0.1, "precondition: the output ReLU is linear here"

    total = np.zeros_like(xh)
    kept = 0.0
    for _ in range(draws):
        total += host(block(x))
        kept += float(np.mean(block.gate))
    mean = total / draws
    assert abs(kept / draws - p) < 4 * np.sqrt(p * (1 - p) / (draws * (1 if mode == "batch" else 4)))

    block.eval()
    y_eval = host(block(x))
    tol = 4 * np.abs(m_train * f) * np.sqrt(p * (1 - p) / draws) + 1e-12
    np.testing.assert_array_less(np.abs(mean - y_eval), tol)

    # power: the other scale rule's test output differs by (1 - p)|f|, far outside the tolerance
    wrong = xh + (f if scale == "eval" else p * f)
    big = np.abs(f) > 0.5 * np.abs(f).max()
    assert np.all(np.abs(wrong - y_eval)[big] > 2 * tol[big])


# ------------------------------------------------------------------------------------------------
# Gates: readable, forceable, reproducible
# ------------------------------------------------------------------------------------------------


def test_gate_is_readable(rng):
    block = _block("identity", p=0.5)
    assert block.gate is None
    x = _x(rng, "identity")
    block(x)
    assert isinstance(block.gate, bool)
    block.eval()
    block(x)
    assert block.gate is None
    row = _block("identity", p=0.5, mode="row")
    row(_x(rng, "identity", n=6))
    assert isinstance(row.gate, np.ndarray) and row.gate.shape == (6,) and row.gate.dtype == bool


def test_force_gate_validation(rng):
    with pytest.raises(ValueError, match="BasicBlock"):
        _block("identity").force_gate(np.array([True, False]))  # arrays only in row mode
    row = _block("identity", mode="row")
    with pytest.raises(ValueError, match="BasicBlock"):
        row.force_gate(np.array([1, 0]))  # not bool
    row.force_gate(np.array([True, False, True]))
    with pytest.raises(ValueError, match="forced row gate has shape"):
        row(_x(rng, "identity", n=2))
    row.force_gate(None)
    assert row.forced_gate is None


def test_same_seed_same_gates(rng):
    def gates(seed, mode):
        block = BasicBlock(2, 2, survival_prob=0.5, mode=mode, dtype=F64, gate_rng=np.random.default_rng(seed))
        x = dev(np.random.default_rng(0).standard_normal((3, 2, 3, 3)))
        out = []
        for _ in range(30):
            block(x)
            out.append(np.array(block.gate).copy())
        return np.array(out)

    for mode in ("batch", "row"):
        assert np.array_equal(gates(11, mode), gates(11, mode))
        assert not np.array_equal(gates(11, mode), gates(12, mode))
    # the default gate stream is the backend's seeded host generator
    backend.seed(5)
    a = BasicBlock(2, 2, survival_prob=0.5)
    x = dev(np.ones((2, 2, 3, 3), dtype="float32"))
    first = [(a(x), a.gate)[1] for _ in range(20)]
    backend.seed(5)
    b = BasicBlock(2, 2, survival_prob=0.5)
    assert [(b(x), b.gate)[1] for _ in range(20)] == first


@pytest.mark.parametrize("mode", ["batch", "row"])
@pytest.mark.parametrize("scale", ["eval", "train"])
def test_survival_one_never_drops_and_draws_no_random_numbers(rng, mode, scale):
    block = _block("identity", p=1.0, mode=mode, scale=scale)
    state = block.gate_rng.bit_generator.state
    x = _x(rng, "identity")
    for _ in range(10):
        block(x)
        assert np.all(block.gate) and not block.branch_skipped
    assert block.gate_rng.bit_generator.state == state
    f = host(block.branch(x))
    np.testing.assert_allclose(host(block(x)), _relu(host(x) + f), rtol=1e-13)  # no scaling at p = 1
    block.eval()
    f = host(block.branch(x))
    np.testing.assert_allclose(host(block(x)), _relu(host(x) + f), rtol=1e-13)


@pytest.mark.parametrize("mode", ["batch", "row"])
def test_survival_zero_always_drops_and_skips_at_test_time(rng, mode):
    block = _block("identity", p=0.0, mode=mode, scale="eval")
    counters = _count_branch(block)
    x = _x(rng, "identity")
    for training in (True, False):
        block.train(training)
        y = block(x)
        np.testing.assert_array_equal(host(y), _relu(host(x)))  # ReLU(0 * f + x)
        block.backward(dev(np.ones(y.shape)))
    assert all(len(c) == 0 for c in counters.values())
    with pytest.raises(ValueError, match="divide by zero"):
        BasicBlock(2, 2, survival_prob=0.0, scale="train")


@pytest.mark.parametrize("kwargs,match", [
    ({"survival_prob": 1.5}, "survival probability"),
    ({"survival_prob": -0.1}, "survival probability"),
    ({"mode": "sample"}, "mode"),
    ({"scale": "test"}, "scale"),
    ({"shortcut": "conv"}, "shortcut"),
])
def test_block_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BasicBlock(2, 4, 2, **kwargs)


def test_block_input_errors_name_the_block(rng):
    block = _block("zero_pad", dtype=None)
    with pytest.raises(ValueError, match=r"^BasicBlock\(.*expected 2 channels"):
        block(dev(np.zeros((2, 3, 4, 4), dtype="float32")))
    with pytest.raises(ValueError, match=r"^BasicBlock\(.*4-D input"):
        block(dev(np.zeros((2, 4, 4), dtype="float32")))
    with pytest.raises(ValueError, match=r"^BasicBlock\(.*backward called before forward"):
        block.backward(dev(np.zeros((2, 4, 2, 2), dtype="float32")))
    y = block(dev(np.zeros((2, 2, 4, 4), dtype="float32")))
    with pytest.raises(ValueError, match=r"^BasicBlock\(.*expected a gradient of shape"):
        block.backward(dev(np.zeros((2, 4, 4, 4), dtype="float32")))
    assert y.shape == (2, 4, 2, 2)


@pytest.mark.parametrize("mode", ["batch", "row"])
@pytest.mark.parametrize("scale", ["eval", "train"])
def test_block_float32_in_float32_out(rng, mode, scale):
    for kind in SHORTCUTS:
        block = _block(kind, p=0.7, mode=mode, scale=scale, dtype=None)
        block.force_gate(True if mode == "batch" else np.array([True, False]))
        y = block(_x(rng, kind, dtype="float32"))
        assert y.dtype == np.float32
        dx = block.backward(dev(np.ones(y.shape, dtype="float32")))
        assert dx.dtype == np.float32
        assert all(g.dtype == np.float32 for _, g in block.named_grads())
        block.eval()
        assert block(_x(rng, kind, dtype="float32")).dtype == np.float32


# ------------------------------------------------------------------------------------------------
# Schedules
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("L,pL", [(1, 0.5), (9, 0.5), (54, 0.5), (27, 0.2), (6, 1.0), (5, 0.0)])
def test_linear_decay_formula(L, pL):
    probs = residual.linear_decay(L, pL)
    assert len(probs) == L
    for l, p in enumerate(probs, start=1):
        assert p == pytest.approx(1 - (l / L) * (1 - pL), abs=1e-15)
    assert probs[-1] == pytest.approx(pL)  # the last block (a transition-counted L) gets p_L
    assert all(a >= b for a, b in zip(probs, probs[1:]))


def test_expected_active_blocks_resnet110():
    """ResNet-110: L = 54 blocks, p_L = 0.5: sum p_l = 54 - 0.5 * 55 / 2 = 40.25 (the paper: ~40)."""
    probs = residual.linear_decay(54, 0.5)
    assert residual.expected_active_blocks(probs) == pytest.approx(40.25, abs=1e-12)
    assert residual.expected_active_blocks(residual.uniform(54, 0.5)) == pytest.approx(27.0)
    assert residual.expected_active_blocks(residual.constant(54)) == 54.0


def test_uniform_constant_and_make_schedule():
    assert residual.uniform(4, 0.3) == [0.3] * 4
    assert residual.constant(3) == [1.0, 1.0, 1.0]
    assert residual.make_schedule("linear", 4, 0.6) == residual.linear_decay(4, 0.6)
    assert residual.make_schedule("uniform", 4, 0.6) == [0.6] * 4
    assert residual.make_schedule("none", 4, 0.6) == [1.0] * 4
    with pytest.raises(ValueError, match="schedule"):
        residual.make_schedule("cosine", 4)


@pytest.mark.parametrize("call", [
    lambda: residual.linear_decay(10, 1.5),
    lambda: residual.linear_decay(10, -0.5),
    lambda: residual.linear_decay(0, 0.5),
    lambda: residual.uniform(10, 2.0),
])
def test_schedule_errors(call):
    with pytest.raises(ValueError):
        call()
