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

from minisd.training import train_step  # noqa: E402
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
        train_step(model, x, labels)
    return t


def test_survival_schedules(tmp_path):
    fig = plots.survival_schedules(num_blocks=54, final_survival=0.5, save=tmp_path / "s.png")
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    left, right = fig.axes
    assert len(left.get_lines()) == 3 and all(labelled(ax) for ax in fig.axes)
    legend = [t.get_text() for t in left.get_legend().get_texts()]
    assert any("E[depth] = 40.25" in t for t in legend)  # ResNet-110, p_L = 0.5: exactly 40.25 (.1f rounds this tie by its last bit)
    # The distribution of the number of active blocks sums to one.
    assert np.sum(right.get_lines()[0].get_ydata()) == pytest.approx(1.0)
    assert_png(tmp_path / "s.png")


def test_active_block_distribution_is_exact():
    dist = plots.lecture._active_block_distribution([0.5, 0.5])
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
    # The fields minisd.training writes, one JSON line per epoch (validation may be missing: null).
    with open(path / "metrics.jsonl", "w", encoding="utf-8") as handle:
        for e in range(1, epochs + 1):
            handle.write(json.dumps({"epoch": e, "lr": 0.1, "train_loss": 2.0 / e, "train_acc": 1 - 0.5 / e,
                                     "val_loss": 2.2 / e if e > 1 else None, "val_acc": 1 - 0.6 / e,
                                     "active_fraction": active, "steps": 10, "time_s": seconds}) + "\n")


def test_read_metrics_reads_the_records_minisd_writes(tmp_path):
    write_metrics(tmp_path, 3, 1.5, 0.75)
    records = plots.read_metrics(tmp_path)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert list(plots.column(records, "time_s")) == [1.5] * 3
    assert np.isnan(plots.column(records, "val_loss")[0]) and np.isnan(plots.column(records, "no_such_key")).all()
    assert records == plots.read_metrics(tmp_path / "metrics.jsonl")


@pytest.mark.parametrize("line", ["not json", '{"loss": 1.0}', "[1, 2]", '{"epoch": "1"}'])
def test_read_metrics_names_the_file_and_line_it_cannot_read(tmp_path, line):
    write_metrics(tmp_path, 2, 1.5, 0.75)
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write(line + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 3: expected one JSON object per epoch"):
        plots.read_metrics(tmp_path)


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
    assert loss.get_yscale() == "log" and "log" in loss.get_ylabel()
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
    event = with_arrays.find("layer2.0", "backward")
    fig = plots.trace_event(event, max_channels=4, save=tmp_path / "e.png")
    images = [im for ax in fig.axes for im in ax.get_images()]
    assert len(images) == 2 and len(fig.axes) == 3  # input row, output row (4 channels each), colour bar
    # The output row shows the first sample's first 4 channels, separated by white (NaN) columns.
    out_row = np.asarray(images[1].get_array().filled(np.nan))
    w = event.out_shape[3]
    np.testing.assert_allclose(out_row[:, :w], event.out_array[0, 0])
    assert np.isnan(out_row[:, w]).all()
    assert_png(tmp_path / "e.png")
    fc = plots.trace_event(with_arrays.find("fc", "forward"))
    strips = [im.get_array() for ax in fc.axes for im in ax.get_images()][:2]
    assert [a.shape for a in strips] == [(1, 64), (1, 10)]
    bars = plots.trace_event(one_step_trace(model, rng).find("conv1", "forward"))
    assert len(bars.axes) == 1 and len(bars.axes[0].patches) == 2
    limits = {"activation": 2.0, "gradient": 0.125}
    shared = plots.trace_event(event, limits=limits)
    assert shared.axes[0].get_images()[0].get_clim() == (-0.125, 0.125)


def _forced_step(rng, gates, depth=20, keep_arrays=False):
    model = models.resnet_cifar(depth=depth, in_channels=1)
    model.force_gates(gates)
    return one_step_trace(model, rng, keep_arrays=keep_arrays)


def _block_boxes(ax):
    """{block label: its box} on a network map (the boxes are the patches with a label inside)."""
    from matplotlib.patches import FancyBboxPatch

    boxes = [p for p in ax.patches if isinstance(p, FancyBboxPatch)]
    texts = [t for t in ax.texts if t.get_text().startswith("l=") and "-" not in t.get_text()]
    found = {}
    for text in texts:
        x, y = text.get_position()
        box = next(b for b in boxes if b.get_x() <= x <= b.get_x() + b.get_width()
                   and b.get_y() <= y <= b.get_y() + b.get_height())
        found[text.get_text().split()[0]] = (box, text.get_text())
    return found


def test_network_numbers_blocks_1_to_L_and_greys_dropped_branches(tmp_path, rng):
    gates = [True, False, True, True, False, True, True, True, False]
    t = _forced_step(rng, gates)
    fig = plots.network(t, save=tmp_path / "n.png")
    ax = fig.axes[0]
    boxes = _block_boxes(ax)
    assert sorted(boxes, key=lambda k: int(k[2:])) == [f"l={l}" for l in range(1, 10)]
    probs = [e.survival_prob for e in t.block_events("forward")]
    for l, (kept, p) in enumerate(zip(gates, probs), start=1):
        box, label = boxes[f"l={l}"]
        assert (box.get_hatch() is not None) is (not kept), l
        assert (matplotlib.colors.to_hex(box.get_edgecolor()) == "#a8a8a8") is (not kept), l
        assert f"p={p:.2f}".replace("0.", ".") in label  # room for p_l at 3 blocks per stage
    headers = sorted(x.get_text() for x in ax.texts if x.get_fontweight() == "bold")
    assert headers == ["l=1-3, 16 ch", "l=4-6, 32 ch", "l=7-9, 64 ch"]
    assert "3 dropped" in ax.get_title()
    assert [c.get_text() for c in ax.texts if c.get_text().startswith(("stem", "head"))] == [
        "stem: conv1, bn1, relu", "head: avgpool, fc"]
    assert_png(tmp_path / "n.png")


def test_network_edges_are_coloured_by_the_traced_gradient_norms(rng):
    from matplotlib.collections import LineCollection

    t = _forced_step(rng, [True, False, True, True, True, True, True, True, True])
    fig = plots.network(t)
    ax, cax = fig.axes[0], fig.axes[1]
    data = plots.network_data(t)
    norm = plots.trace_drawings._flow_norm(data)
    # One shared logarithmic scale: from the smallest to the largest norm on the map.
    traced = [e.out_norm for e in t.block_events("backward")] + [e.in_norm for e in t.block_events("backward")]
    traced += [t.find(n + ".shortcut", "backward").out_norm for n in t.block_names]
    traced += [t.find(n + ".branch", "backward").out_norm for n, kept in zip(t.block_names, [1, 0] + [1] * 7) if kept]
    assert norm.vmin == pytest.approx(min(traced)) and norm.vmax == pytest.approx(max(traced))
    assert "gradient norm" in cax.get_xlabel()
    cmap = matplotlib.colormaps[plots.trace_drawings.FLOW_CMAP]
    lines = next(c for c in ax.collections if isinstance(c, LineCollection))
    segments, colours = lines.get_segments(), lines.get_colors()

    def colour_of_segment(x, y_top, y_bottom):
        for seg, col in zip(segments, colours):
            if len(seg) == 2 and np.allclose(seg, [[x, y_top], [x, y_bottom]]):
                return col
        raise AssertionError(f"no segment at x={x}, y={y_top}..{y_bottom}")

    # Block 1 (layer1.1, second row of the first column) was dropped: its shortcut carried the
    # gradient, and its colour is the shortcut's traced norm on the map's scale.
    shortcut = t.find("layer1.1.shortcut", "backward").out_norm
    np.testing.assert_allclose(colour_of_segment(0.14, -1.15, -1.85), cmap(norm(shortcut)))
    entry = t.find("layer1.1", "backward").out_norm
    np.testing.assert_allclose(colour_of_segment(0.14, -1.0, -1.15), cmap(norm(entry)))
    # Its branch got nothing: dashed grey, no coloured branch connector.
    dashed = [c for c in ax.collections if isinstance(c, LineCollection) and c is not lines]
    assert dashed and len(dashed[0].get_segments()) == 2


def test_network_marks_the_current_event(rng):
    from matplotlib.patches import Rectangle

    t = _forced_step(rng, [True] * 9)

    def marked(event):
        fig = plots.network(t, highlight=event)
        ax = fig.axes[0]
        spots = [p for p in ax.patches if isinstance(p, Rectangle) and
                 matplotlib.colors.to_hex(p.get_facecolor()) == plots.trace_drawings.HIGHLIGHT_COLOR.lower()]
        arrows = [x.get_text() for x in ax.texts if x.get_text() in ("\u25bc", "\u25b2")]
        return spots, arrows

    spots, arrows = marked(t.find("layer2.1.branch.3", "backward"))
    assert len(spots) == 1 and arrows == ["\u25b2"]  # up: backward
    box, _ = _block_boxes(plots.network(t).axes[0])["l=5"]  # layer2.1: the 5th block
    spot = spots[0]
    assert spot.get_x() < box.get_x() and spot.get_x() + spot.get_width() > box.get_x() + box.get_width()
    assert spot.get_y() < box.get_y() < spot.get_y() + spot.get_height()
    spots, arrows = marked(t.find("conv1", "forward"))
    assert len(spots) == 1 and arrows == ["\u25bc"] and spots[0].get_y() > 0  # the stem, above the blocks
    assert marked(None) == ([], [])


def test_stepper_frame_with_the_map_drawn_once_looks_the_same(rng):
    """The stepper pastes the map as pixels and draws only the mark: the frame must not change."""
    import io

    from PIL import Image

    t = _forced_step(rng, [True, False, True, True, True, True, True, True, False], keep_arrays=True)
    rasters = {phase: plots.NetworkRaster(t, phase=phase) for phase in ("forward", "backward")}
    for event in (t.find("conv1"), t.find("layer1.1", "backward"), t.find("layer2.2.shortcut", "backward"),
                  t.find("layer3.0.branch.3"), t.find("fc", "backward")):
        drawn = plots.figure_png(plots.stepper_frame(t, event, "step", raster=None))
        pasted = plots.figure_png(plots.stepper_frame(t, event, "step", raster=rasters[event.phase]))
        a, b = (np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int) for png in (drawn, pasted))
        assert a.shape == b.shape
        differing = (np.abs(a - b).max(axis=2) > 8).mean()
        assert differing < 2e-4, (event.label, differing)


def test_no_figure_goes_through_pyplot():
    """Every figure is a plain matplotlib Figure: pyplot is never imported, so its global list of
    figures (drawn by notebook hooks, possibly half-built, from another thread) never holds one."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from minisd import models, plots\n"
        "plots.survival_schedules(num_blocks=9, final_survival=0.5)\n"
        "plots.gate_activity([[True, False, True]] * 4, [1.0, 0.75, 0.5])\n"
        "model = models.resnet_cifar(depth=8, in_channels=1, seed=0)\n"
        "plots.conv_filters(model)\n"
        "plots.feature_maps(model, np.zeros((1, 1, 8, 8), dtype=np.float32))\n"
        "print('matplotlib.pyplot' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_fit_line_recovers_a_line_and_says_how_well_it_fits():
    x = np.arange(10.0)
    fit = plots.fit_line(x, 0.5 + 0.25 * x)
    assert fit["slope"] == pytest.approx(0.25) and fit["intercept"] == pytest.approx(0.5) and fit["r2"] == pytest.approx(1.0)
    noisy = plots.fit_line(x, 0.25 * x + np.random.default_rng(0).normal(0, 1, 10))
    assert 0 < noisy["r2"] < 1
    with pytest.raises(ValueError, match="fit_line: expected two equal-length sequences"):
        plots.fit_line([1, 1], [2, 3])


def test_stem_gradient_vs_active_blocks_marks_both_ends_and_the_expected_depth(tmp_path):
    rng = np.random.default_rng(0)
    k = np.concatenate([[0, 12], rng.integers(1, 12, 20)])
    g = 0.04 * k + rng.normal(0, 0.01, k.size)
    fig = plots.stem_gradient_vs_active_blocks(k, g, 12, expected_active=9.0, save=tmp_path / "s.png")
    (ax,) = fig.axes
    assert labelled(ax) and "block" in ax.get_xlabel() and "norm" in ax.get_ylabel()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(label.startswith("fit:") and "R^2" in label for label in labels)
    assert any("shortcuts only" in label for label in labels) and any("constant depth" in label for label in labels)
    diamond = next(line for line in ax.get_lines() if line.get_marker() == "D")
    fit = plots.fit_line(k, g)
    assert diamond.get_ydata()[0] == pytest.approx(fit["intercept"] + 9.0 * fit["slope"])
    assert_png(tmp_path / "s.png")
