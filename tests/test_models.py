"""models.py: the paper's CIFAR ResNet (depth 6n + 2) with stochastic depth on every block."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import assert_check, count_calls, dev, host, randomise_batch_norm
from minisd import functional as F, layers, models
from minisd.gradcheck import check_module, directional_check
from minisd.residual import BasicBlock, SubsampleZeroPad

# Finite-difference checks verify the math, which lives in the reference tier (tests/test_kernels.py
# holds the fast tier to it, with a few checks of its own).
pytestmark = pytest.mark.usefixtures("reference_tier")

TOL = 1e-6
# A fixed mix for ResNet-20's 9 blocks: transitions (blocks 4 and 7) dropped and kept.
MIX = [True, False, True, False, True, True, False, False, True]


def _digits_model(**kwargs):
    kwargs.setdefault("dtype", "float64")
    return models.resnet_cifar(20, num_classes=4, in_channels=1, **kwargs)


def _checked_model(rng, **kwargs):
    """A float64 ResNet-20 for gradient checks, batch norm away from gamma = 1, beta = 0."""
    return randomise_batch_norm(_digits_model(**kwargs), rng)


# ------------------------------------------------------------------------------------------------
# Structure
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth,n", [(20, 3), (32, 5), (44, 7), (56, 9), (110, 18)])
def test_depths_construct(depth, n):
    model = models.resnet_cifar(depth)
    assert models.blocks_per_stage(depth) == n
    assert len(model.blocks) == 3 * n == len(model.survival_probs)
    assert all(isinstance(b, BasicBlock) for b in model.blocks)
    widths = [b.out_channels for b in model.blocks]
    assert widths == [16] * n + [32] * n + [64] * n
    strides = [b.stride for b in model.blocks]
    assert strides == [1] * n + [2] + [1] * (n - 1) + [2] + [1] * (n - 1)
    transitions = [i for i, b in enumerate(model.blocks) if isinstance(b.shortcut, SubsampleZeroPad)]
    assert transitions == [n, 2 * n]  # the paper's parameter-free shortcut, no 1x1 convs
    assert model.blocks[-1].survival_prob == pytest.approx(0.5)  # linear decay to p_L by default


@pytest.mark.parametrize("depth", [0, 8 - 6, 19, 21, 100, -4])
def test_bad_depth_is_an_error(depth):
    with pytest.raises(ValueError, match="6n"):
        models.resnet_cifar(depth)


def test_resnet20_parameter_count_and_names():
    model = models.resnet_cifar(20)
    assert model.num_parameters() == 269_722  # the CIFAR ResNet-20 (option A shortcut) count
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len(set(names))
    assert names[:3] == ["conv1.weight", "bn1.weight", "bn1.bias"]
    assert names[3:9] == ["layer1.0.branch.0.weight", "layer1.0.branch.1.weight", "layer1.0.branch.1.bias",
                          "layer1.0.branch.3.weight", "layer1.0.branch.4.weight", "layer1.0.branch.4.bias"]
    assert names[-2:] == ["fc.weight", "fc.bias"]
    assert [n for n, _ in model.named_grads()] == names
    assert "layer3.2.branch.4.running_var" in model.state_dict()
    assert model.conv1.kernel_size == (3, 3) and model.conv1.out_channels == 16 and "bias" not in model.conv1.params
    assert model.fc.params["weight"].shape == (10, 64)


def test_projection_shortcut_option():
    model = models.resnet_cifar(20, shortcut="projection")
    names = [n for n, _ in model.named_parameters()]
    assert "layer2.0.shortcut.0.weight" in names and "layer3.0.shortcut.1.bias" in names
    assert not any(".shortcut." in n for n in names if n.startswith("layer1"))


def test_kaiming_normal_fan_out_initialisation():
    model = models.resnet_cifar(56, seed=2)
    # all 3x3 convs of the 64-channel stage: fan_out = 64 * 3 * 3
    weights = np.concatenate([host(b.branch[i].params["weight"]).ravel()
                              for b in model.blocks[-9:] for i in (0, 3)])
    assert weights.size > 600_000
    assert abs(weights.std() / np.sqrt(2 / (64 * 9)) - 1) < 0.01
    assert abs(weights.mean()) < 0.01 * weights.std()
    stem = host(model.conv1.params["weight"])  # fan_out = 16 * 9 (not fan_in = 3 * 9)
    assert abs(stem.std() / np.sqrt(2 / (16 * 9)) - 1) < 0.15


def test_schedules_pass_through():
    assert models.resnet_cifar(110).expected_active_blocks == pytest.approx(40.25)
    model = models.resnet_cifar(20, schedule="uniform", final_survival=0.3, mode="row", scale="train")
    assert model.survival_probs == [0.3] * 9
    assert all(b.survival_prob == 0.3 and b.mode == "row" and b.scale == "train" for b in model.blocks)
    baseline = models.resnet_cifar(20, final_survival=1.0)  # p_L = 1: constant depth
    assert baseline.survival_probs == [1.0] * 9
    assert models.resnet_cifar(20, schedule="none").expected_active_blocks == 9.0
    linear = models.resnet_cifar(20, final_survival=0.5).survival_probs
    assert linear == pytest.approx([1 - (l / 9) * 0.5 for l in range(1, 10)])


# ------------------------------------------------------------------------------------------------
# Forward / backward on digits (8x8) and CIFAR (32x32) inputs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size,in_channels", [(8, 1), (32, 3)])
def test_input_sizes(rng, size, in_channels):
    model = models.resnet_cifar(20, in_channels=in_channels)
    x = dev(rng.standard_normal((2, in_channels, size, size)).astype("float32"))
    logits = model(x)
    assert logits.shape == (2, 10) and logits.dtype == np.float32
    loss, cache = F.softmax_cross_entropy_forward(logits, dev(np.array([1, 7])))
    dx = model.backward(F.softmax_cross_entropy_backward(1.0, cache))
    assert dx.shape == x.shape and dx.dtype == np.float32
    assert np.isfinite(float(host(loss)))
    assert all(g.dtype == np.float32 for _, g in model.named_grads())
    model.eval()
    assert model(x).shape == (2, 10)
    assert model.gates() == [None] * 9


def test_input_errors_name_the_model(rng):
    model = models.resnet_cifar(20)
    with pytest.raises(ValueError, match=r"ResNetCifar.*expected 3 channels"):
        model(dev(np.zeros((2, 1, 8, 8), dtype="float32")))
    with pytest.raises(ValueError, match=r"ResNetCifar.*4-D input"):
        model(dev(np.zeros((2, 8, 8), dtype="float32")))
    with pytest.raises(ValueError, match=r"Conv2d.*float32.*float64"):
        model(dev(np.zeros((2, 3, 8, 8), dtype="float64")))


# ------------------------------------------------------------------------------------------------
# Gradient checks of the whole network with a fixed mix of dropped and kept blocks
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["batch", "row"])
def test_resnet20_directional_check_with_fixed_gate_mix(rng, mode):
    model = _checked_model(rng, mode=mode, scale="train")
    if mode == "batch":
        gates = MIX
    else:
        gates = [np.array([g, not g, True]) for g in MIX]  # per-sample masks
    model.force_gates(gates)
    x = dev(rng.standard_normal((3, 1, 8, 8)))
    result = assert_check(directional_check(model, x, tol=TOL))
    assert list(result.errors) == ["direction"]
    if mode == "batch":
        assert [b.branch_skipped for b in model.blocks] == [not g for g in MIX]


def test_resnet20_directional_check_with_unforced_gates(rng):
    model = _checked_model(rng, schedule="uniform", final_survival=0.5, seed=4)
    x = dev(rng.standard_normal((2, 1, 8, 8)))
    assert_check(directional_check(model, x, tol=TOL))
    gates = model.gates()
    assert True in gates and False in gates
    assert all(b.forced_gate is None for b in model.blocks)


def test_resnet20_elementwise_check_on_a_few_entries(rng):
    model = _checked_model(rng, scale="eval")
    model.force_gates(MIX)
    x = dev(rng.standard_normal((2, 1, 8, 8)))
    result = assert_check(check_module(model, x, tol=TOL, max_entries=6))
    assert set(result.errors) == {"input"} | {n for n, _ in model.named_parameters()}
    # parameters of dropped blocks: analytic and numeric gradients are both exactly zero
    for block, kept in zip(model.blocks, MIX):
        for _, g in block.branch.named_grads():
            assert np.any(host(g) != 0) == kept


def test_resnet20_eval_mode_directional_check(rng):
    model = _checked_model(rng)
    model(dev(rng.standard_normal((4, 1, 8, 8))))  # non-trivial running statistics
    model.eval()
    assert_check(directional_check(model, dev(rng.standard_normal((2, 1, 8, 8))), tol=TOL))


def test_directional_check_catches_a_wrong_block_backward(rng):
    class DoubleShortcutGrad(BasicBlock):
        def backward(self, dy):
            return 2 * super().backward(dy)

    model = _digits_model()
    model.force_gates(MIX)
    bad = DoubleShortcutGrad(32, 32, 1, 0.8, dtype="float64")
    bad.force_gate(False)
    model.layer2 = layers.Sequential(model.blocks[3], bad, model.blocks[5])
    assert not directional_check(model, dev(rng.standard_normal((2, 1, 8, 8))), tol=TOL).passed


# ------------------------------------------------------------------------------------------------
# Gates across the model
# ------------------------------------------------------------------------------------------------


def test_all_dropped_model_never_calls_a_branch(rng):
    model = models.resnet_cifar(20, in_channels=1)
    counters = []
    for b in model.blocks:
        counters += [count_calls(b.branch, "forward"), count_calls(b.branch, "backward")]
    model.force_gates(False)
    stats = {n: host(v).copy() for n, v in model.named_buffers() if ".branch." in n}
    y = model(dev(rng.standard_normal((2, 1, 8, 8)).astype("float32")))
    model.backward(dev(np.ones(y.shape, dtype="float32")))
    assert all(len(c) == 0 for c in counters)
    assert model.active_fraction() == 0.0
    for n, g in model.named_grads():
        if ".branch." in n:
            assert np.all(host(g) == 0), n
        elif n in ("conv1.weight", "fc.weight"):
            assert np.any(host(g) != 0), n
    for n, v in model.named_buffers():
        if ".branch." in n:
            np.testing.assert_array_equal(host(v), stats[n], err_msg=n)


def test_force_gates_and_gates(rng):
    model = models.resnet_cifar(20, in_channels=1)
    model.force_gates(MIX)
    model(dev(rng.standard_normal((2, 1, 8, 8)).astype("float32")))
    assert model.gates() == MIX
    assert model.active_fraction() == pytest.approx(sum(MIX) / 9)
    with pytest.raises(ValueError, match="one per block"):
        model.force_gates([True] * 8)
    model.force_gates(None)
    assert all(b.forced_gate is None for b in model.blocks)


def test_same_seed_same_weights_and_gates(rng):
    x = dev(rng.standard_normal((2, 1, 8, 8)).astype("float32"))

    def run(seed, schedule="linear"):
        model = models.resnet_cifar(20, in_channels=1, seed=seed, schedule=schedule)
        gates = []
        for _ in range(8):
            model(x)
            gates.append(model.gates())
        return host(model.conv1.params["weight"]).copy(), gates

    w1, g1 = run(0)
    w2, g2 = run(0)
    np.testing.assert_array_equal(w1, w2)
    assert g1 == g2
    w3, g3 = run(1)
    assert not np.array_equal(w1, w3) and g1 != g3
    # the schedule does not change the initial weights (gates have their own stream)
    np.testing.assert_array_equal(run(0, "uniform")[0], w1)


def test_seed_gates_restarts_the_gate_stream(rng):
    model = models.resnet_cifar(20, in_channels=1, schedule="uniform", final_survival=0.5)
    x = dev(rng.standard_normal((2, 1, 8, 8)).astype("float32"))
    model.seed_gates(9)
    first = [(model(x), model.gates())[1] for _ in range(5)]
    model.seed_gates(9)
    assert [(model(x), model.gates())[1] for _ in range(5)] == first


def test_constant_depth_baseline_never_draws(rng):
    model = models.resnet_cifar(20, in_channels=1, final_survival=1.0)
    state = model.gate_rng.bit_generator.state
    for _ in range(3):
        model(dev(rng.standard_normal((2, 1, 8, 8)).astype("float32")))
        assert model.gates() == [True] * 9
    assert model.gate_rng.bit_generator.state == state


# ------------------------------------------------------------------------------------------------
# State and dtype
# ------------------------------------------------------------------------------------------------


def test_state_dict_round_trip_and_to_float64(rng):
    a = models.resnet_cifar(20, in_channels=1, seed=1)
    b = models.resnet_cifar(20, in_channels=1, seed=2)
    x = dev(rng.standard_normal((2, 1, 8, 8)).astype("float32"))
    a(x)  # update running statistics
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    np.testing.assert_array_equal(host(a(x)), host(b(x)))
    a.to(dtype="float64")
    assert all(p.dtype == np.float64 for p in a.parameters())
    y64 = host(a(dev(host(x).astype("float64"))))
    np.testing.assert_allclose(y64, host(b(x)), rtol=1e-4, atol=1e-5)
    state = {k: host(v) for k, v in b.state_dict().items()}
    del state["layer2.0.branch.1.running_mean"]
    with pytest.raises(ValueError, match=r"missing: layer2\.0\.branch\.1\.running_mean"):
        a.load_state_dict(state)
