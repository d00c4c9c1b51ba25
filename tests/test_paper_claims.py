"""What the paper's curves need from the trainer (test accuracy and gradient magnitudes per epoch)
and the figures that draw them (minisd.plots, the "paper's claims" section)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from minisd import backend, data, models, optim, plots, training


def tiny(**overrides):
    """ResNet-8 (3 blocks) on 96 digits, batches of 32: 3 steps an epoch, about a second."""
    values = dict(depth=8, epochs=2, batch_size=32, train_subset=96, seed=5)
    values.update(overrides)
    return training.Settings(**values)


def quiet_fit(settings, run_dir):
    return training.fit(settings, run_dir=run_dir, log=lambda line: None, progress=False)


def records_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def watch_steps(monkeypatch):
    """Observe every training step at the point the trainer measures it (after backward): which
    blocks ran, and mean |g| of the first conv's weight and of each block's branch, computed here
    directly in float64 on the host."""
    seen = []
    original = training.GradientMagnitudes.add_step

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

    monkeypatch.setattr(training.GradientMagnitudes, "add_step", add_step)
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
            if kept:  # float32 sums per array (see GradientMagnitudes.add_step): within 1e-7 or so
                assert value == pytest.approx(np.mean(kept), rel=1e-6) and value > 0
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
    resolved = training.Settings.from_dict(json.loads((tmp_path / "run" / "settings.json").read_text()))

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
        training.train_step(model, xb, yb)
        per_step.append(float(np.abs(backend.to_numpy(model.conv1.grads["weight"]).astype(np.float64)).mean()))
        opt.step()
    assert len(per_step) == 3
    assert result.history[0]["first_conv_grad"] == pytest.approx(np.mean(per_step), rel=1e-9)


def test_test_accuracy_is_reported_but_does_not_choose_the_checkpoint(tmp_path):
    result = quiet_fit(tiny(epochs=3), tmp_path / "run")
    last = training.evaluate_checkpoint(tmp_path / "run" / "last.npz", "test")
    assert result.history[-1]["test_acc"] == pytest.approx(last["acc"])
    assert result.history[-1]["test_loss"] == pytest.approx(last["loss"], rel=1e-5)
    vals = [(h["val_acc"], -h["val_loss"]) for h in result.history]
    assert result.best_epoch == 1 + max(range(3), key=lambda i: vals[i])


def test_gradient_magnitudes_state_round_trip_is_exact():
    model = models.resnet_cifar(depth=8, in_channels=1, schedule="linear", final_survival=0.0, seed=0)
    x = backend.to_device(np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32))
    labels = backend.to_device(np.arange(4))
    magnitudes = training.GradientMagnitudes(model.conv1, model.blocks)
    for _ in range(3):
        training.train_step(model, x, labels)
        magnitudes.add_step()
    state = json.loads(json.dumps(magnitudes.state_dict()))
    copy = training.GradientMagnitudes(model.conv1, model.blocks)
    copy.load_state_dict(state)
    assert copy.summary() == magnitudes.summary()
    assert copy.summary()["block_grad"][2] is None               # p = 0: never ran
    copy.load_state_dict(None)                                  # a checkpoint from before: start afresh
    assert copy.summary() == {"first_conv_grad": None, "block_grad": [None, None, None]}
    with pytest.raises(ValueError, match="3"):
        training.GradientMagnitudes(model.conv1, model.blocks[:2]).load_state_dict(state)


# ----------------------------------------------------------------------------------------------
# The figures
# ----------------------------------------------------------------------------------------------

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000


def fake_run(seed, scale, epochs=6, blocks=3):
    """Epoch records as minisd.training writes them: gradients shrinking, test error falling."""
    rng = np.random.default_rng(seed)
    return [{"epoch": e, "lr": 0.1 if e <= 3 else 0.01, "train_loss": 2.0 / e * (1 + 0.1 * rng.random()),
             "test_acc": 1 - 0.5 / e * scale * (1 + 0.1 * rng.random()), "first_conv_grad": scale * 0.04 / e * (1 + 0.1 * rng.random()),
             "block_grad": [0.01] * (blocks - 1) + [None]} for e in range(1, epochs + 1)]


@pytest.fixture
def no_pyplot_figures():
    """The new figures are plain matplotlib.figure.Figure objects: pyplot's list stays empty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.close("all")
    yield
    assert plt.get_fignums() == []


def test_seed_matrix_lines_up_epochs_and_turns_null_into_nan():
    runs = [fake_run(0, 1.0), fake_run(1, 1.0)[:4]]                     # the second seed stopped early
    epochs, values = plots.seed_matrix(runs, "first_conv_grad")
    assert list(epochs) == [1, 2, 3, 4, 5, 6] and values.shape == (2, 6)
    assert np.isnan(values[1, 4:]).all() and np.isfinite(values[0]).all()
    _, blocks = plots.seed_matrix(runs, "block_grad")
    assert np.isnan(blocks).all()                                       # lists are not numbers


def test_gradient_magnitude_figure(tmp_path, no_pyplot_figures):
    from matplotlib.collections import PolyCollection
    from matplotlib.figure import Figure



    runs = {"constant depth": [fake_run(s, 1.0) for s in range(3)],
            "stochastic depth": [fake_run(10 + s, 1.5) for s in range(3)]}
    fig = plots.gradient_magnitude(runs, save=tmp_path / "g.png")
    assert isinstance(fig, Figure)
    ax, ratio_ax = fig.axes
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "epoch" and "first conv" in ax.get_ylabel()
    mean_lines = [line for line in ax.get_lines() if line.get_label() in runs]
    assert len(mean_lines) == 2
    expected = np.mean([[r["first_conv_grad"] for r in run] for run in runs["constant depth"]], axis=0)
    np.testing.assert_allclose(mean_lines[0].get_ydata(), expected)
    assert len([c for c in ax.collections if isinstance(c, PolyCollection)]) == 2   # one band per label
    assert [line.get_xdata()[0] for line in ax.get_lines() if line.get_label() == "learning rate ÷ 10"] == [3.5]
    sd_ratio = [line for line in ratio_ax.get_lines() if line.get_label() == "stochastic depth"][0]
    sd_mean = np.mean([[r["first_conv_grad"] for r in run] for run in runs["stochastic depth"]], axis=0)
    np.testing.assert_allclose(sd_ratio.get_ydata(), sd_mean / expected)
    assert ratio_ax.get_legend() is not None and ax.get_legend() is not None
    assert_png(tmp_path / "g.png")


def test_test_error_curves_figure(tmp_path, no_pyplot_figures):


    runs = {"constant depth": [fake_run(s, 1.0) for s in range(3)], "one seed": [fake_run(7, 0.5)]}
    fig = plots.test_error_curves(runs, save=tmp_path / "t.png")
    error_ax, loss_ax = fig.axes
    assert error_ax.get_yscale() == "log" and loss_ax.get_yscale() == "log"
    assert error_ax.get_ylabel() == "test error (%)" and "loss" in loss_ax.get_ylabel()
    labels = error_ax.get_legend_handles_labels()[1]
    last = [100 * (1 - r[-1]["test_acc"]) for r in runs["constant depth"]]
    assert f"constant depth: {np.mean(last):.1f} ± {np.std(last, ddof=1):.1f}% in the last epoch" in labels
    one = 100 * (1 - runs["one seed"][0][-1]["test_acc"])
    assert f"one seed: {one:.1f}% in the last epoch" in labels          # no spread for one seed
    assert len(error_ax.collections) == 1                               # a band only where there are seeds
    assert_png(tmp_path / "t.png")


def test_fit_step_time_recovers_a_line_despite_slow_outliers():


    rng = np.random.default_rng(0)
    k = rng.integers(0, 28, 120)
    seconds = 0.010 + 0.002 * k + rng.normal(0, 1e-4, k.size)
    seconds[::10] += 0.05                                               # other programs stole time
    fit = plots.fit_step_time(k, seconds)
    assert fit["per_block_s"] == pytest.approx(0.002, rel=0.03)
    assert fit["fixed_s"] == pytest.approx(0.010, abs=5e-4)
    least_squares = np.polyfit(k, seconds, 1)
    assert abs(least_squares[1] - 0.010) > 3 * abs(fit["fixed_s"] - 0.010)   # what the robust fit avoids
    with pytest.raises(ValueError, match="same number of blocks"):
        plots.fit_step_time([5, 5, 5], [1.0, 2.0, 3.0])


def test_step_time_figure(tmp_path, no_pyplot_figures):


    k = np.repeat(np.arange(0, 55, 6), 4)
    seconds = 0.01 + 0.0015 * k
    fig = plots.step_time_vs_active_blocks(k, seconds, num_blocks=54, expected_active=40.25, measured_saving=0.214,
                                           save=tmp_path / "s.png")
    (ax,) = fig.axes
    assert ax.get_xlabel() and "ms" in ax.get_ylabel()
    fit_line = [line for line in ax.get_lines() if line.get_label().startswith("fit:")][0]
    np.testing.assert_allclose(fit_line.get_ydata(), [10.0, 10.0 + 1.5 * 54])
    assert fit_line.get_label() == "fit: 10.0 ms + 1.50 ms per block"
    text = ax.texts[0].get_text()
    saving = 1 - (0.01 + 0.0015 * 40.25) / (0.01 + 0.0015 * 54)
    assert f"predicted saving {saving:.0%} (the paper: ~25%)" in text and "measured saving 21%" in text
    assert_png(tmp_path / "s.png")


def test_monte_carlo_convergence_figure(tmp_path, no_pyplot_figures):
    from matplotlib.collections import PolyCollection



    rng = np.random.default_rng(0)
    gates = rng.random(400) < 0.5
    test_output = np.array([[1.0, 2.0], [3.0, 4.0]])
    branch = np.array([[0.0, 0.0], [0.0, 2.0]])                          # only unit (1, 1) varies
    eval_rule = (test_output - 0.5 * branch) + gates[:, None, None] * branch
    fig = plots.monte_carlo_convergence({"eval": (eval_rule, test_output)}, save=tmp_path / "m.png")
    (ax,) = fig.axes
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "gate draws n"
    running = [line for line in ax.get_lines() if line.get_label().startswith("running mean")][0]
    np.testing.assert_allclose(running.get_ydata()[-1], eval_rule[:, 1, 1].mean())   # the unit that varies
    sigma = eval_rule[:, 1, 1].std(ddof=1)
    z = (eval_rule[:, 1, 1].mean() - 4.0) / (sigma / np.sqrt(400))
    assert f"{z:+.1f} σ/√n" in ax.get_title()
    band = [c for c in ax.collections if isinstance(c, PolyCollection)][0]
    top = band.get_paths()[0].vertices[:, 1].max()
    assert top == pytest.approx(4.0 + 2 * sigma)                        # at n = 1
    assert_png(tmp_path / "m.png")


def test_branch_gradient_norms_figure(tmp_path, no_pyplot_figures):


    model = models.resnet_cifar(depth=14, in_channels=1, seed=0)
    model.force_gates([True, False, True, True, False, True])
    x = np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)
    x = backend.to_device(x, backend.backend_of(model.conv1.params["weight"]))
    training.train_step(model, x, np.arange(4))
    fig = plots.branch_gradient_norms(model, save=tmp_path / "b.png")
    (ax,) = fig.axes
    (bars,) = ax.containers
    assert [round(p.get_x() + p.get_width() / 2) for p in bars] == [1, 3, 4, 6]   # bars: the kept blocks l
    assert all(p.get_height() > 0 for p in bars)
    crosses = [line for line in ax.get_lines() if line.get_label().startswith("dropped")][0]
    assert list(crosses.get_xdata()) == [2, 5] and list(crosses.get_ydata()) == [0, 0]
    assert "2 of 6 dropped" in ax.get_title()
    assert_png(tmp_path / "b.png")


def test_survival_sweep_figure(tmp_path, no_pyplot_figures):
    results = {"linear": {0.2: [3.0], 0.5: [2.0, 2.5, 1.5], 1.0: [2.8, 3.2]}, "uniform": {0.2: [9.0], 0.5: [4.0]}}
    fig = plots.survival_sweep(results, reference=3.0, save=tmp_path / "p.png")
    (ax,) = fig.axes
    means = [line for line in ax.get_lines() if line.get_label().startswith("linear")][0]
    assert list(means.get_xdata()) == [0.2, 0.5, 1.0] and list(means.get_ydata()) == [3.0, 2.0, 3.0]
    dots = [line for line in ax.get_lines() if line.get_marker() == "." and len(line.get_xdata()) == 3]
    assert len(dots) == 1 and list(dots[0].get_ydata()) == [2.0, 2.5, 1.5]   # the three seeds at p_L = 0.5
    assert any(line.get_label() == "constant depth: 3.00" for line in ax.get_lines())
    assert ax.get_xlabel().startswith("$p_L$") and ax.get_ylabel() == "test error (%)"
    assert_png(tmp_path / "p.png")


def test_survival_sweep_draws_error_bars_and_the_constant_depth_band(no_pyplot_figures):
    results = {"linear": {0.2: [3.0], 0.5: [2.0, 2.5, 1.5]}}
    fig = plots.survival_sweep(results, reference=[2.0, 4.0])
    (ax,) = fig.axes
    (bars,) = [c for c in ax.containers if c.get_label().startswith("linear")]
    segments = bars.lines[2][0].get_segments()                  # one vertical bar per p_L: mean ± sd
    assert [tuple(np.round(seg[:, 1], 3)) for seg in segments] == [(3.0, 3.0), (1.5, 2.5)]
    band = [p for p in ax.patches if p.get_alpha()]
    ys = band[0].get_patch_transform().transform(band[0].get_path().vertices)[:, 1]   # in data units
    assert len(band) == 1 and np.allclose([ys.min(), ys.max()], [3 - 2 ** 0.5, 3 + 2 ** 0.5])
    assert any(line.get_label() == "constant depth: 3.00 ± 1.41 (2 seeds)" for line in ax.get_lines())


def test_first_conv_gradient_per_unit_of_loss_and_relative_to_the_last_block():
    runs = [fake_run(seed, 1.0) for seed in range(3)]
    for record in runs[1]:
        record["block_grad"][-1] = 0.02          # the last block ran in seed 1's epochs
    epochs, raw = plots.first_conv_gradient(runs)
    _, per_loss = plots.first_conv_gradient(runs, per="loss")
    _, per_block = plots.first_conv_gradient(runs, per="last_block")
    loss = np.array([[r["train_loss"] for r in seed] for seed in runs])
    np.testing.assert_allclose(per_loss, raw / loss)
    assert np.isnan(per_block[0]).all() and np.isnan(per_block[2]).all()   # last block never ran: no ratio
    np.testing.assert_allclose(per_block[1], raw[1] / 0.02)
    fig = plots.gradient_magnitude({"a": runs, "b": runs[:2]}, per="loss")
    assert "training loss" in fig.axes[0].get_ylabel() and fig.axes[0].get_title() == "Per unit of training loss"
    with pytest.raises(ValueError, match="per must be one of"):
        plots.first_conv_gradient(runs, per="output")


def test_block_gradient_map_puts_every_configuration_on_one_scale(tmp_path):
    constant = [fake_run(seed, 1.0, blocks=6) for seed in range(2)]
    stochastic = [fake_run(seed, 1.0, blocks=6) for seed in range(2)]
    for records in stochastic:
        for r in records:
            r["block_grad"] = [0.05 * (l + 1) for l in range(5)] + [None if r["epoch"] % 2 else 0.3]
    fig = plots.block_gradient_map({"constant depth": constant, "linear decay": stochastic}, save=tmp_path / "m.png")
    images = [im for ax in fig.axes for im in ax.get_images()]
    assert len(images) == 2 and images[0].norm is images[1].norm                         # one colour scale
    assert images[0].norm.vmin == pytest.approx(0.01) and images[0].norm.vmax == pytest.approx(0.3)
    matrix = images[1].get_array()
    assert matrix.shape == (6, 6)                                                        # blocks x epochs
    assert matrix[0, 0] == pytest.approx(0.05)
    assert not np.isfinite(np.ma.filled(matrix, np.nan)[5, 0])                          # never ran: no value
    assert fig.axes[0].get_ylabel().startswith("residual block $l$") and images[0].get_extent()[2:] == [0.5, 6.5]
    assert "block's branch" in fig.axes[-1].get_ylabel()
    assert (tmp_path / "m.png").stat().st_size > 5000


def test_training_time_bars_split_steps_from_the_rest(tmp_path, no_pyplot_figures):
    times = {"constant depth": {"wall": [140.0, 150.0], "steps": [120.0, 130.0]},
             "linear decay": {"wall": [105.0, 115.0], "steps": [90.0, 100.0]}}
    fig = plots.training_time(times, save=tmp_path / "t.png")
    (ax,) = fig.axes
    bars = ax.patches
    assert [round(b.get_height(), 6) for b in bars] == [125.0, 20.0, 95.0, 15.0]   # steps, then the rest, per bar
    assert [t.get_text() for t in ax.texts] == ["145 s", "110 s\n-24.1%"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["constant depth", "linear decay"]
    assert ax.get_ylabel() == "wall-clock time of the run (s)"
    assert_png(tmp_path / "t.png")


def test_paired_seeds_joins_each_seed_and_colours_by_which_is_lower(no_pyplot_figures):
    fig = plots.paired_seeds({"constant": [5.0, 3.0], "linear": [4.0, 6.0]}, seeds=[0, 1])
    (ax,) = fig.axes
    pairs = [line for line in ax.get_lines() if len(line.get_xdata()) == 2 and line.get_marker() == "o"]
    assert [list(line.get_ydata()) for line in pairs] == [[5.0, 4.0], [3.0, 6.0]]
    assert pairs[0].get_color() != pairs[1].get_color()                 # linear lower for seed 0 only
    assert [t.get_text() for t in ax.texts] == ["seed 0", "seed 1"]
    fig = plots.paired_seeds({"constant": [5.0, 3.0, 4.0], "linear": [4.0, 4.05, 6.0]}, seeds=[0, 1, 2])
    assert [t.get_text() for t in fig.axes[0].texts] == ["seeds 0, 1", "seed 2"]      # nearly equal: one label
    with pytest.raises(ValueError, match="one value per seed"):
        plots.paired_seeds({"a": [1.0], "b": [1.0, 2.0]}, seeds=[0, 1])
