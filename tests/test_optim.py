"""SGD against hand-computed values, skipping unused parameters, optimizer state, LR schedules."""
from __future__ import annotations

import numpy as np
import pytest

from minisd import backend, layers, models, optim
from minisd.training import train_step


def _one_weight(value=1.0):
    """A Linear(1, 1) without bias in float64 with weight ``value``: one scalar parameter."""
    layer = layers.Linear(1, 1, bias=False, dtype="float64")
    layer.params["weight"][...] = value
    return layer


def _run(opt, layer, grads):
    values = []
    for g in grads:
        layer.zero_grad()
        layer._accumulate("weight", backend.to_device(np.array([[g]], dtype=np.float64)))
        opt.step()
        values.append(float(backend.to_numpy(layer.params["weight"])[0, 0]))
    return values


def test_plain_sgd():
    layer = _one_weight(1.0)
    assert _run(optim.SGD(layer, lr=0.1), layer, [0.5, -2.0]) == pytest.approx([0.95, 1.15], abs=1e-15)


def test_momentum_and_weight_decay_by_hand():
    # g1 = 0.5 + 0.01 * 1.0 = 0.51; buf = 0.51; p = 1 - 0.1 * 0.51 = 0.949
    # g2 = 0.5 + 0.01 * 0.949 = 0.50949; buf = 0.9 * 0.51 + 0.50949 = 0.96849; p = 0.949 - 0.096849
    layer = _one_weight(1.0)
    opt = optim.SGD(layer, lr=0.1, momentum=0.9, weight_decay=0.01)
    assert _run(opt, layer, [0.5, 0.5]) == pytest.approx([0.949, 0.852151], abs=1e-12)


def test_nesterov_by_hand():
    # step 1: g = 0.51, buf = 0.51, step = g + 0.9 buf = 0.969          -> p = 0.9031
    # step 2: g = 0.5 + 0.01 * 0.9031 = 0.509031, buf = 0.9 * 0.51 + g = 0.968031,
    #         step = g + 0.9 buf = 1.3802589                            -> p = 0.76507411
    layer = _one_weight(1.0)
    opt = optim.SGD(layer, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    assert _run(opt, layer, [0.5, 0.5]) == pytest.approx([0.9031, 0.76507411], abs=1e-12)


def _reference_sgd(p, grads, lr, mu, wd, nesterov):
    """Straight from PyTorch's documentation, one array."""
    buf = None
    for g in grads:
        g = g + wd * p
        buf = g.copy() if buf is None else mu * buf + g
        p = p - lr * (g + mu * buf if nesterov else buf)
    return p


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_reference_on_arrays(rng, nesterov):
    layer = layers.Linear(3, 2, dtype="float64")
    p0 = {k: backend.to_numpy(v).copy() for k, v in layer.params.items()}
    grads = [{k: rng.standard_normal(v.shape) for k, v in p0.items()} for _ in range(4)]
    opt = optim.SGD(layer, lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=1e-3)
    weight_array = layer.params["weight"]
    for step in grads:
        layer.zero_grad()
        for k, g in step.items():
            layer._accumulate(k, backend.to_device(g))
        before = {k: backend.to_numpy(v).copy() for k, v in layer.grads.items()}
        opt.step()
        for k in before:  # the optimizer never changes the gradients it reads
            np.testing.assert_array_equal(backend.to_numpy(layer.grads[k]), before[k])
    assert layer.params["weight"] is weight_array  # updated in place
    for k in p0:
        expected = _reference_sgd(p0[k], [g[k] for g in grads], 0.05, 0.9, 1e-3, nesterov)
        np.testing.assert_allclose(backend.to_numpy(layer.params[k]), expected, rtol=1e-12, atol=1e-14)


def _step_with_one_block_dropped(skip_unused):
    model = models.resnet_cifar(depth=8, in_channels=1, seed=0, dtype="float64")
    model.force_gates([True, False, True])
    opt = optim.SGD(model, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2, skip_unused=skip_unused)
    before = {k: backend.to_numpy(v).copy() for k, v in model.named_parameters()}
    x = backend.to_device(np.random.default_rng(0).standard_normal((4, 1, 8, 8)))
    labels = backend.to_device(np.arange(4))
    train_step(model, x, labels)
    opt.step()
    after = {k: backend.to_numpy(v) for k, v in model.named_parameters()}
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    return changed, opt


def test_skip_unused_leaves_dropped_branches_untouched():
    dropped = "layer2.0.branch."
    changed, opt = _step_with_one_block_dropped(skip_unused=True)
    assert not any(k.startswith(dropped) for k in changed)
    assert not any(k.startswith(dropped) for k in opt.buffers)  # no momentum buffer either
    assert any(k.startswith("layer1.0.branch.") for k in changed) and "fc.weight" in changed
    # Without the option, weight decay moves the dropped branch even though its gradient is zero.
    changed, _ = _step_with_one_block_dropped(skip_unused=False)
    assert any(k.startswith(dropped) for k in changed)


def test_state_dict_round_trip_continues_identically(rng):
    def make():
        layer = layers.Linear(3, 2, dtype="float64", rng=np.random.default_rng(0))
        return layer, optim.SGD(layer, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)

    grads = [rng.standard_normal((2, 3)) for _ in range(4)]

    def step(layer, opt, g):
        layer.zero_grad()
        layer._accumulate("weight", backend.to_device(g))
        opt.step()

    a, opt_a = make()
    for g in grads:
        step(a, opt_a, g)
    b, opt_b = make()
    for g in grads[:2]:
        step(b, opt_b, g)
    saved_params = {k: backend.to_numpy(v).copy() for k, v in b.state_dict().items()}
    saved_opt = {"hyper": opt_b.hyperparameters(),
                 "buffers": {k: backend.to_numpy(v).copy() for k, v in opt_b.state_dict()["buffers"].items()}}
    c, opt_c = make()
    c.load_state_dict(saved_params)
    opt_c.load_state_dict(saved_opt)
    assert opt_c.steps == 2
    for g in grads[2:]:
        step(c, opt_c, g)
    np.testing.assert_array_equal(backend.to_numpy(c.params["weight"]), backend.to_numpy(a.params["weight"]))


def test_load_state_dict_names_bad_buffers():
    layer = layers.Linear(3, 2)
    opt = optim.SGD(layer, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"momentum buffer weight: expected shape \(2, 3\), got \(3, 2\)"):
        opt.load_state_dict({"buffers": {"weight": np.zeros((3, 2), np.float32)}})
    with pytest.raises(ValueError, match="unexpected momentum buffer nope"):
        opt.load_state_dict({"buffers": {"nope": np.zeros(1)}})


def test_invalid_hyperparameters():
    layer = layers.Linear(2, 2)
    with pytest.raises(ValueError, match="Nesterov"):
        optim.SGD(layer, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match=">= 0"):
        optim.SGD(layer, lr=-1)


def test_step_schedule_is_the_papers():
    assert [optim.step_lr(0.1, e, 10) for e in range(10)] == pytest.approx([0.1] * 5 + [0.01] * 2 + [0.001] * 3)
    # 500 epochs: divided by 10 at epochs 250 and 375 (the paper)
    assert optim.step_lr(0.1, 249, 500) == pytest.approx(0.1)
    assert optim.step_lr(0.1, 250, 500) == pytest.approx(0.01)
    assert optim.step_lr(0.1, 374, 500) == pytest.approx(0.01)
    assert optim.step_lr(0.1, 375, 500) == pytest.approx(0.001)


@pytest.mark.parametrize("epochs, expected", [
    (1, [0.1]),                       # the requested rate, not 0.001
    (2, [0.1, 0.01]),                 # no skipped 0.01
    (3, [0.1, 0.01, 0.001]),
    (4, [0.1, 0.1, 0.01, 0.001]),
    (5, [0.1, 0.1, 0.01, 0.001, 0.001]),
])
def test_step_schedule_for_short_runs(epochs, expected):
    assert [optim.step_lr(0.1, e, epochs) for e in range(epochs)] == pytest.approx(expected)
    assert [optim.make_lr_schedule("step", 0.1, epochs)(e) for e in range(epochs)] == pytest.approx(expected)


def test_cosine_and_constant_schedules():
    assert optim.cosine_lr(0.1, 0, 10) == pytest.approx(0.1)
    assert optim.cosine_lr(0.1, 5, 10) == pytest.approx(0.05)
    assert optim.cosine_lr(0.1, 10, 10) == pytest.approx(0.0, abs=1e-15)
    values = [optim.cosine_lr(0.1, e, 10) for e in range(11)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert optim.make_lr_schedule("constant", 0.3, 5)(4) == 0.3
    # Warm-up: the first epochs at a tenth, whatever the schedule, then the schedule as it was.
    assert [optim.make_lr_schedule("step", 0.1, 4, warmup_epochs=1)(e) for e in range(4)] == pytest.approx(
        [0.01, 0.1, 0.01, 0.001])
    assert [optim.make_lr_schedule("constant", 0.3, 4, warmup_epochs=2)(e) for e in range(4)] == pytest.approx(
        [0.03, 0.03, 0.3, 0.3])
    assert optim.make_lr_schedule("step", 0.1, 4)(3) == pytest.approx(0.001)
    with pytest.raises(ValueError, match="unknown learning-rate schedule"):
        optim.make_lr_schedule("exp", 0.1, 4)


def test_momentum_buffers_follow_the_model_when_it_is_moved():
    layer = _one_weight(1.0).to(dtype="float32")
    opt = optim.SGD(layer, lr=0.1, momentum=0.9)
    layer.zero_grad()
    layer._accumulate("weight", backend.to_device(np.array([[0.5]], dtype=np.float32)))
    opt.step()
    assert opt.buffers["weight"].dtype == np.float32
    layer.to(dtype="float64")
    # buf = 0.9 * 0.5 + 0.5 = 0.95; p = 0.95 - 0.1 * 0.95 = 0.855, now accumulated in float64
    assert _run(opt, layer, [0.5]) == pytest.approx([0.855], abs=1e-7)
    assert opt.buffers["weight"].dtype == np.float64
