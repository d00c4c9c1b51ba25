"""What the paper's curves need from the trainer (test accuracy and gradient magnitudes per epoch)
and the figures that draw them (minisd.plots, the "paper's claims" section)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from minisd import backend, data, models, optim, train
from minisd import functional as F


def tiny(**overrides):
    """ResNet-8 (3 blocks) on 96 digits, batches of 32: 3 steps an epoch, about a second."""
    values = dict(depth=8, epochs=2, batch_size=32, train_subset=96, seed=5)
    values.update(overrides)
    return train.Settings(**values)


def quiet_fit(settings, run_dir):
    return train.fit(settings, run_dir=run_dir, log=lambda line: None, progress=False)


def records_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def watch_steps(monkeypatch):
    """Observe every training step at the point the trainer measures it (after backward): which
    blocks ran, and mean |g| of the first conv's weight and of each block's branch, computed here
    directly in float64 on the host."""
    seen = []
    original = train.GradientMagnitudes.add_step

    def add_step(self):
        ran = [not block.branch_skipped for block in self.blocks]
        first = float(np.abs(backend.to_numpy(self.first_conv.grads["weight"]).astype(np.float64)).mean())
        branches = []
        for block in self.blocks:
            grads = np.concatenate([backend.to_numpy(g).astype(np.float64).ravel()
                                    for _, g in block.branch.named_grads()])
            branches.append(float(np.abs(grads).mean()))
        seen.append({"ran": ran, "first": first, "branches": branches})
        original(self)

    monkeypatch.setattr(train.GradientMagnitudes, "add_step", add_step)
    return seen


# ----------------------------------------------------------------------------------------------
# The metrics
# ----------------------------------------------------------------------------------------------


def test_epoch_records_hold_test_accuracy_and_gradient_magnitudes(tmp_path, monkeypatch):
    seen = watch_steps(monkeypatch)
    result = quiet_fit(tiny(schedule="linear", final_survival=0.2), tmp_path / "run")
    records = records_of(tmp_path / "run")
    assert len(records) == 2 and len(seen) == 2 * 3
    for epoch, record in enumerate(records):
        steps = seen[3 * epoch:3 * epoch + 3]
        assert 0 <= record["test_acc"] <= 1 and math.isfinite(record["test_loss"])
        # The same mean over the epoch's steps as a direct computation on the host.
        assert record["first_conv_grad"] == pytest.approx(np.mean([s["first"] for s in steps]), rel=1e-9)
        assert record["first_conv_grad"] > 0
        assert len(record["block_grad"]) == 3
        for index, value in enumerate(record["block_grad"]):
            kept = [s["branches"][index] for s in steps if s["ran"][index]]
            if kept:
                assert value == pytest.approx(np.mean(kept), rel=1e-9) and value > 0
            else:
                assert value is None, f"block {index} never ran in epoch {epoch + 1} but has {value}"
    assert result.history == records


def test_block_grad_is_null_exactly_for_blocks_that_never_ran(tmp_path, monkeypatch):
    """p_L = 0: the last block never runs; the first (p = 2/3) and second (1/3) run on some steps."""
    seen = watch_steps(monkeypatch)
    quiet_fit(tiny(schedule="linear", final_survival=0.0, epochs=3), tmp_path / "run")
    records = records_of(tmp_path / "run")
    never_ran = []
    for epoch, record in enumerate(records):
        steps = seen[3 * epoch:3 * epoch + 3]
        ran = [any(s["ran"][i] for s in steps) for i in range(3)]
        assert [value is not None for value in record["block_grad"]] == ran
        never_ran.append(ran)
    assert all(not ran[2] for ran in never_ran)          # p = 0
    assert any(ran[0] for ran in never_ran)              # and the test saw both cases
    json.dumps(records)                                  # null, not NaN: valid JSON


def test_no_block_runs_with_uniform_zero_survival_but_the_stem_still_learns(tmp_path):
    quiet_fit(tiny(schedule="uniform", final_survival=0.0, epochs=1), tmp_path / "run")
    (record,) = records_of(tmp_path / "run")
    assert record["block_grad"] == [None, None, None]
    assert record["first_conv_grad"] > 0


def test_first_conv_gradient_matches_an_independent_replay_of_the_first_epoch(tmp_path):
    """Replay epoch 1 by hand (same weights, batches, augmentation and gates) and compare."""
    settings = tiny(schedule="linear", final_survival=0.5, epochs=1)
    result = quiet_fit(settings, tmp_path / "run")
    resolved = train.Settings.from_dict(json.loads((tmp_path / "run" / "settings.json").read_text()))

    backend.seed(resolved.seed)
    digits = data.load_digits()
    train_split = digits.train.subset(resolved.train_subset).to()
    model = models.resnet_cifar(depth=resolved.depth, in_channels=1, schedule=resolved.schedule,
                                final_survival=resolved.final_survival, seed=resolved.seed)
    model.conv1.input_grad = False  # as the trainer does (the images need no gradient)
    lr = optim.make_lr_schedule(resolved.lr_schedule, resolved.lr, resolved.epochs)(0)
    opt = optim.SGD(model, lr=lr, momentum=resolved.momentum, nesterov=resolved.nesterov,
                    weight_decay=resolved.weight_decay)
    order_rng, aug_rng = data.epoch_generators(resolved.seed, 0)
    order = order_rng.permutation(len(train_split))
    per_step = []
    for xb, yb in data.batches(train_split, resolved.batch_size, order=order, aug_rng=aug_rng,
                               translate=resolved.translate, flip=resolved.flip):
        model.zero_grad()
        loss, cache = F.softmax_cross_entropy_forward(model(xb), yb)
        model.backward(F.softmax_cross_entropy_backward(1.0, cache))
        per_step.append(float(np.abs(backend.to_numpy(model.conv1.grads["weight"]).astype(np.float64)).mean()))
        opt.step()
    assert len(per_step) == 3
    assert result.history[0]["first_conv_grad"] == pytest.approx(np.mean(per_step), rel=1e-9)


def test_test_accuracy_is_reported_but_does_not_choose_the_checkpoint(tmp_path):
    result = quiet_fit(tiny(epochs=3), tmp_path / "run")
    last = train.evaluate_checkpoint(tmp_path / "run" / "last.npz", "test")
    assert result.history[-1]["test_acc"] == pytest.approx(last["acc"])
    assert result.history[-1]["test_loss"] == pytest.approx(last["loss"], rel=1e-5)
    vals = [(h["val_acc"], -h["val_loss"]) for h in result.history]
    assert result.best_epoch == 1 + max(range(3), key=lambda i: vals[i])


def test_gradient_magnitudes_state_round_trip_is_exact():
    model = models.resnet_cifar(depth=8, in_channels=1, schedule="linear", final_survival=0.0, seed=0)
    x = np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)
    magnitudes = train.GradientMagnitudes(model.conv1, model.blocks)
    for _ in range(3):
        model.zero_grad()
        loss, cache = F.softmax_cross_entropy_forward(model(x), np.arange(4))
        model.backward(F.softmax_cross_entropy_backward(1.0, cache))
        magnitudes.add_step()
    state = json.loads(json.dumps(magnitudes.state_dict()))
    copy = train.GradientMagnitudes(model.conv1, model.blocks)
    copy.load_state_dict(state)
    assert copy.summary() == magnitudes.summary()
    assert copy.summary()["block_grad"][2] is None               # p = 0: never ran
    copy.load_state_dict(None)                                  # a checkpoint from before: start afresh
    assert copy.summary() == {"first_conv_grad": None, "block_grad": [None, None, None]}
    with pytest.raises(ValueError, match="3"):
        train.GradientMagnitudes(model.conv1, model.blocks[:2]).load_state_dict(state)
