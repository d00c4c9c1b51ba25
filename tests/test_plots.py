"""minisd.plots: every figure runs headless, has the expected axes and artists, and saves a PNG."""
from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from helpers import dev  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from minisd import functional as F  # noqa: E402
from minisd import models, plots, trace  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000


def labelled(ax):
    return ax.get_xlabel() and ax.get_ylabel()


def one_step_trace(model, rng, keep_arrays=False):
    x = dev(rng.standard_normal((4, 1, 8, 8)).astype("float32"))
    labels = np.arange(4)
    with trace.record(model, keep_arrays=keep_arrays) as t:
        _, cache = F.softmax_cross_entropy_forward(model(x), labels)
        model.zero_grad()
        model.backward(F.softmax_cross_entropy_backward(1.0, cache))
    return t


def test_survival_schedules(tmp_path):
    fig = plots.survival_schedules(num_blocks=54, final_survival=0.5, save=tmp_path / "s.png")
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    left, right = fig.axes
    assert len(left.get_lines()) == 3 and all(labelled(ax) for ax in fig.axes)
    legend = [t.get_text() for t in left.get_legend().get_texts()]
    assert any("E[depth] = 40.3" in t for t in legend)  # 40.25 blocks for ResNet-110, p_L = 0.5
    # The distribution of the number of active blocks sums to one.
    assert np.sum(right.get_lines()[0].get_ydata()) == pytest.approx(1.0)
    assert_png(tmp_path / "s.png")


def test_active_block_distribution_is_exact():
    dist = plots._active_block_distribution([0.5, 0.5])
    np.testing.assert_allclose(dist, [0.25, 0.5, 0.25])


def test_gate_activity(tmp_path):
    model = models.resnet_cifar(depth=20, in_channels=1)
    x = dev(np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype("float32"))
    gates = []
    for _ in range(12):
        model(x)
        gates.append(model.gates())
    fig = plots.gate_activity(gates, model.survival_probs, save=tmp_path / "g.png")
    heat, rate = fig.axes
    assert len(fig.axes) == 2 and len(heat.get_images()) == 1
    assert heat.get_images()[0].get_array().shape == (9, 12)  # blocks x steps
    assert len(rate.get_lines()) == 2 and labelled(heat)
    assert_png(tmp_path / "g.png")


def test_gate_activity_row_mode_fractions():
    gates = [[np.array([True, False]), True, False]] * 3
    fig = plots.gate_activity(gates)
    np.testing.assert_allclose(fig.axes[0].get_images()[0].get_array()[:, 0], [0.5, 1.0, 0.0])


def test_gradient_flow(tmp_path, rng):
    constant = models.resnet_cifar(depth=20, in_channels=1, schedule="none")
    stochastic = models.resnet_cifar(depth=20, in_channels=1)
    stochastic.force_gates([True, False, True, True, False, True, True, True, False])
    runs = {"constant depth": one_step_trace(constant, rng),
            "stochastic depth": [one_step_trace(stochastic, rng), one_step_trace(stochastic, rng)]}
    fig = plots.gradient_flow(runs, save=tmp_path / "f.png")
    flow, stem = fig.axes
    assert len(fig.axes) == 2
    lines = flow.get_lines()
    assert len(lines) == 3  # one line per run, plus the crosses on the 3 dropped blocks
    np.testing.assert_array_equal(lines[2].get_xdata(), [2, 5, 9])
    assert len(stem.patches) == 2 and labelled(flow) and stem.get_ylabel()
    data = plots.gradient_flow_data(runs["constant depth"])
    assert data["stem"] == pytest.approx(runs["constant depth"].find("layer1", "backward").out_norm)
    assert stem.patches[0].get_height() == pytest.approx(data["stem"])
    assert_png(tmp_path / "f.png")


def write_metrics(path, epochs, seconds, active):
    # The fields minisd.train writes, one JSON line per epoch (validation may be missing: null).
    with open(path / "metrics.jsonl", "w", encoding="utf-8") as handle:
        for e in range(1, epochs + 1):
            handle.write(json.dumps({"epoch": e, "lr": 0.1, "train_loss": 2.0 / e, "train_acc": 1 - 0.5 / e,
                                     "val_loss": 2.2 / e if e > 1 else None, "val_acc": 1 - 0.6 / e,
                                     "active_fraction": active, "steps": 10, "time_s": seconds}) + "\n")
        handle.write("not json, ignored\n")


def test_read_metrics_is_tolerant(tmp_path):
    write_metrics(tmp_path, 3, 1.5, 0.75)
    m = plots.read_metrics(tmp_path)
    assert m["epoch"] == [1, 2, 3] and m["seconds"] == [1.5] * 3 and np.isnan(m["val_loss"][0])
    (tmp_path / "other.jsonl").write_text('{"loss": 1.0, "accuracy": 50, "seconds": 2}\n{"loss": 0.5}\n')
    other = plots.read_metrics(tmp_path / "other.jsonl")
    assert other["epoch"] == [1, 2] and other["train_acc"][0] == 0.5 and np.isnan(other["seconds"][1])


def test_training_curves(tmp_path):
    (tmp_path / "constant").mkdir()
    (tmp_path / "stochastic").mkdir()
    write_metrics(tmp_path / "constant", 4, 2.0, 1.0)
    write_metrics(tmp_path / "stochastic", 4, 1.5, 0.75)
    fig = plots.training_curves({"constant depth": tmp_path / "constant", "stochastic depth": tmp_path / "stochastic"},
                                save=tmp_path / "c.png")
    loss, acc, seconds = fig.axes
    assert len(fig.axes) == 3
    assert len(loss.get_lines()) == 4 and len(acc.get_lines()) == 4  # 2 runs x (training, validation)
    assert len(seconds.patches) == 8  # 2 runs x 4 epochs
    assert all(labelled(ax) for ax in fig.axes)
    assert any("75% of branches ran" in t.get_text() for t in seconds.get_legend().get_texts())
    assert_png(tmp_path / "c.png")
    # A list of run folders is labelled by folder name.
    fig = plots.training_curves([tmp_path / "constant", tmp_path / "stochastic"])
    assert "constant" in fig.legends[0].get_texts()[0].get_text()


def test_conv_filters(tmp_path):
    model = models.resnet_cifar(depth=20, in_channels=1)
    fig = plots.conv_filters(model, "conv1", save=tmp_path / "w.png")
    images = [ax for ax in fig.axes if ax.get_images()]
    assert len(images) == 16  # one per output channel
    assert_png(tmp_path / "w.png")
    rgb = plots.conv_filters(models.resnet_cifar(depth=20, in_channels=3).conv1)
    assert rgb.axes[0].get_images()[0].get_array().shape == (3, 3, 3)


def test_feature_maps(tmp_path, rng):
    model = models.resnet_cifar(depth=20, in_channels=1)
    image = rng.standard_normal((1, 8, 8)).astype("float32")
    fig = plots.feature_maps(model, image, channels=6, save=tmp_path / "m.png")
    layers = plots.default_feature_layers(model)
    assert layers == ["relu", "layer1.2", "layer2.2", "layer3.2"]
    assert sum(1 for ax in fig.axes if ax.get_images()) == 1 + 6 * len(layers)
    assert model.training  # the mode is restored
    assert_png(tmp_path / "m.png")


def test_trace_event_with_and_without_arrays(tmp_path, rng):
    model = models.resnet_cifar(depth=20, in_channels=1)
    with_arrays = one_step_trace(model, rng, keep_arrays=True)
    fig = plots.trace_event(with_arrays.find("layer2.0", "backward"), max_channels=4, save=tmp_path / "e.png")
    assert sum(1 for ax in fig.axes if ax.get_images()) == 8  # 2 rows x 4 channels (+ 2 colour bars)
    assert_png(tmp_path / "e.png")
    fc = plots.trace_event(with_arrays.find("fc", "forward"))
    assert sum(1 for ax in fc.axes if ax.get_images()) == 2
    bars = plots.trace_event(one_step_trace(model, rng).find("conv1", "forward"))
    assert len(bars.axes) == 1 and len(bars.axes[0].patches) == 2
