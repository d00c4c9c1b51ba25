"""Figures for teaching stochastic depth (matplotlib).

Every function returns the matplotlib Figure and, given ``save="path.png"``, also writes a PNG.
Fonts are sized for a projector (about 13 pt at the figure's natural size).

* :func:`survival_schedules`  p_l per block for linear decay and uniform, with the expected depth
* :func:`gate_activity`       which blocks ran at each training step (blocks x steps)
* :func:`gradient_flow`       gradient norm at each block's input for one step, dropped blocks marked,
                              and the gradient that reaches the stem, constant vs stochastic depth
* :func:`training_curves`     loss, accuracy and time per epoch of runs side by side (metrics.jsonl)
* :func:`conv_filters`        the kernels of a convolution
* :func:`feature_maps`        what a few layers of a model make of one image
* :func:`network`             a map of a traced network: blocks, dropped branches, gradient per edge
* :func:`stepper_frame`       what the stepper (minisd.stepper) shows: an event beside the map
* :func:`trace_event`         the picture the trace stepper draws for one event

and, for the paper's claims (the last section of this file): :func:`gradient_magnitude` (its
Figure 8), :func:`test_error_curves`, :func:`step_time_vs_active_blocks`,
:func:`monte_carlo_convergence`, :func:`branch_gradient_norms`.
"""
from __future__ import annotations

import contextlib
import json
import math
import os

import numpy

from minisd import backend

__all__ = [
    "survival_schedules",
    "gate_activity",
    "gradient_flow",
    "gradient_flow_data",
    "read_metrics",
    "training_curves",
    "conv_filters",
    "feature_maps",
    "trace_event",
    "trace_color_limits",
    "network",
    "network_data",
    "stepper_frame",
    "figure_png",
    "KEPT_COLOR",
    "DROPPED_COLOR",
]

# Colour-blind safe pair (Okabe-Ito blue and vermillion) plus neutral greys.
KEPT_COLOR = "#0072B2"
DROPPED_COLOR = "#D55E00"
CONSTANT_COLOR = "#555555"
RUN_COLORS = ("#555555", "#0072B2", "#009E73", "#CC79A7", "#E69F00", "#56B4E9")

_STYLE = {
    "font.size": 13,
    "axes.titlesize": 14,
    "axes.labelsize": 13,
    "legend.fontsize": 11,
    "xtick.labelsize": 11,
    "ytick.labelsize": 11,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "figure.dpi": 100,
}


class _PlainFigures:
    """What the figure functions below call for a new figure: ``figures.subplots(...)`` returns
    (fig, axes) like pyplot's, but fig is a plain Figure that pyplot never hears of (see "Trace
    figures" below for why), and that a notebook shows through its ``_repr_png_``."""

    @staticmethod
    def subplots(nrows=1, ncols=1, figsize=None, **kwargs):
        fig = _figure_class()(figsize=figsize)
        return fig, fig.subplots(nrows, ncols, **kwargs)


@contextlib.contextmanager
def _style():
    """The lecture style (large fonts, no top and right spines) for the figures made inside."""
    import matplotlib  # noqa: PLC0415  (import lazily: minisd itself does not need it)

    with matplotlib.rc_context(_STYLE):
        yield _PlainFigures


def _bare(ax):
    """An image axis: no ticks, no frame."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _finish(fig, save):
    if save:
        directory = os.path.dirname(os.fspath(save))
        if directory:
            os.makedirs(directory, exist_ok=True)
        fig.savefig(save, dpi=150, bbox_inches="tight", facecolor="white")
    return fig


# ----------------------------------------------------------------------------------------------
# Survival schedules
# ----------------------------------------------------------------------------------------------


def _active_block_distribution(probs):
    """Exact distribution of the number of active blocks (a sum of independent Bernoullis)."""
    dist = numpy.zeros(len(probs) + 1)
    dist[0] = 1.0
    for p in probs:
        dist[1:] = dist[1:] * (1 - p) + dist[:-1] * p
        dist[0] *= 1 - p
    return dist


def survival_schedules(num_blocks: int = 54, final_survival: float = 0.5, uniform_survival: float | None = None,
                       save=None):
    """Left: p_l per block for linear decay, uniform and constant depth. Right: the distribution of
    the number of blocks that run in one step, with its mean (the expected depth).

    num_blocks: L (54 for ResNet-110). uniform_survival: p of the uniform schedule (default: the
    value giving the same expected depth as linear decay, so the two are compared fairly).
    """
    from minisd.residual import linear_decay, uniform  # noqa: PLC0415

    linear = linear_decay(num_blocks, final_survival)
    if uniform_survival is None:
        uniform_survival = sum(linear) / num_blocks
    flat = uniform(num_blocks, uniform_survival)
    blocks = numpy.arange(1, num_blocks + 1)
    schedules = [
        (f"linear decay to $p_L$ = {final_survival:g}", linear, KEPT_COLOR, "-"),
        (f"uniform $p$ = {uniform_survival:.3g}", flat, "#009E73", "--"),
    ]
    with _style() as figures:
        fig, (ax, ax2) = figures.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1.1, 1]})
        ax.plot(blocks, [1.0] * num_blocks, color=CONSTANT_COLOR, lw=2, ls=":",
                label=f"constant depth (all {num_blocks} blocks)")
        for label, probs, color, ls in schedules:
            ax.plot(blocks, probs, color=color, lw=2.5, ls=ls,
                    label=f"{label}: E[depth] = {sum(probs):.2f}")
        ax.set_xlabel("residual block $l$ (input side → output side)")
        ax.set_ylabel("survival probability $p_l$")
        ax.set_ylim(0, 1.08)
        ax.set_xlim(0.5, num_blocks + 0.5)
        ax.set_title("Survival schedules")
        ax.legend(loc="lower left", frameon=False)

        for label, probs, color, ls in schedules:
            dist = _active_block_distribution(probs)
            counts = numpy.arange(num_blocks + 1)
            ax2.plot(counts, dist, color=color, lw=2.5, ls=ls, label=label.split(":")[0])
            ax2.axvline(sum(probs), color=color, lw=1.2, ls=ls, alpha=0.8)
        ax2.axvline(num_blocks, color=CONSTANT_COLOR, lw=2, ls=":", label="constant depth")
        ax2.set_xlabel("number of blocks that run in one step")
        ax2.set_ylabel("probability")
        ax2.set_title("Depth of one training step (vertical: mean)")
        ax2.set_xlim(0, num_blocks + 1)
        ax2.set_ylim(bottom=0)
        ax2.legend(loc="upper left", frameon=False)
        fig.tight_layout()
    return _finish(fig, save)


# ----------------------------------------------------------------------------------------------
# Gate activity
# ----------------------------------------------------------------------------------------------


def _gate_matrix(gates) -> numpy.ndarray:
    """steps x blocks of kept fractions (1 kept, 0 dropped, in between for row mode)."""
    rows = []
    for step in gates:
        row = []
        for g in step:
            if g is None:
                row.append(1.0)
            elif isinstance(g, (bool, numpy.bool_, int, float)):
                row.append(float(g))
            else:
                row.append(float(numpy.mean(backend.to_numpy(g))))
        rows.append(row)
    return numpy.asarray(rows, dtype=float)


def gate_activity(gates, survival_probs=None, save=None):
    """Which blocks ran at each training step.

    gates: one entry per step, each a list with one gate per block (``model.gates()`` after the
    step: True kept, False dropped, or a bool array per sample in row mode).
    survival_probs: p_l per block (e.g. ``model.survival_probs``), drawn next to the observed rate.
    Left: blocks (rows) x steps (columns), kept dark, dropped light. Right: the fraction of steps
    each block was kept, against p_l.
    """
    matrix = _gate_matrix(gates).T  # blocks x steps
    num_blocks, num_steps = matrix.shape
    with _style() as figures:
        from matplotlib.colors import LinearSegmentedColormap  # noqa: PLC0415
        from matplotlib.patches import Patch  # noqa: PLC0415

        cmap = LinearSegmentedColormap.from_list("gates", ["#F4D8C8", KEPT_COLOR])
        fig, (ax, ax2) = figures.subplots(1, 2, figsize=(12, 0.16 * num_blocks + 3.2), sharey=True,
                                      gridspec_kw={"width_ratios": [4, 1]})
        ax.imshow(matrix, aspect="auto", interpolation="nearest", cmap=cmap, vmin=0, vmax=1,
                  extent=(0.5, num_steps + 0.5, num_blocks + 0.5, 0.5))
        ax.set_xlabel("training step")
        ax.set_ylabel("residual block $l$")
        ax.set_title(f"Gate of each block at each step ({int((matrix == 0).sum())} of {matrix.size} dropped)")
        ax.legend(handles=[Patch(color=KEPT_COLOR, label="kept (branch ran)"),
                           Patch(color="#F4D8C8", label="dropped (branch skipped)")],
                  loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
        blocks = numpy.arange(1, num_blocks + 1)
        ax2.plot(matrix.mean(axis=1), blocks, "o", color=KEPT_COLOR, ms=5, label="observed")
        if survival_probs is not None:
            ax2.plot(list(survival_probs), blocks, "-", color="black", lw=1.5, label="$p_l$")
        ax2.set_xlim(-0.05, 1.05)
        ax2.set_xlabel("fraction kept")
        ax2.set_title("Kept rate")
        ax2.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
        fig.tight_layout()
    return _finish(fig, save)


# ----------------------------------------------------------------------------------------------
# Gradient flow
# ----------------------------------------------------------------------------------------------


def gradient_flow_data(trace) -> dict:
    """From one recorded training step: per-block gradient norms at the block inputs, which blocks
    were dropped, and the norm of the gradient that reached the stem (the first block's input)."""
    events = trace.block_events("backward")
    norms = [e.out_norm for e in events]
    dropped = [bool(e.skipped) for e in events]
    return {"norms": norms, "dropped": dropped, "stem": norms[0] if norms else math.nan}


def _as_data_list(run):
    runs = run if isinstance(run, (list, tuple)) else [run]
    return [r if isinstance(r, dict) else gradient_flow_data(r) for r in runs]


def gradient_flow(runs: dict, log_scale: bool = True, save=None):
    """Gradient norm at each block's input for one step, and the gradient reaching the stem.

    runs: label -> a recorded Trace of one training step (``trace.record`` around forward and
    backward), or a list of Traces of several steps, or the dicts of :func:`gradient_flow_data`.
    Left: the first step of each run, one line per run from the output side (right) to the stem
    (left); blocks dropped in that step are marked with a cross. Right: the norm of the gradient
    at the first block's input (what reaches the stem), one bar per run (mean over the steps given,
    with the individual steps as dots).
    """
    data = {label: _as_data_list(run) for label, run in runs.items()}
    with _style() as figures:
        from matplotlib.lines import Line2D  # noqa: PLC0415

        fig, (ax, ax2) = figures.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [2.6, 1]})
        for k, (label, steps) in enumerate(data.items()):
            color = RUN_COLORS[k % len(RUN_COLORS)]
            first = steps[0]
            blocks = numpy.arange(1, len(first["norms"]) + 1)
            norms = numpy.asarray(first["norms"])
            dropped = numpy.asarray(first["dropped"], dtype=bool)
            n_dropped = int(dropped.sum())
            ax.plot(blocks, norms, "-o", color=color, lw=2, ms=4,
                    label=f"{label}" + (f": {n_dropped} of {len(blocks)} blocks dropped" if n_dropped else ""))
            if n_dropped:
                ax.plot(blocks[dropped], norms[dropped], "x", color=DROPPED_COLOR, ms=11, mew=2.5, zorder=5)
        handles, labels = ax.get_legend_handles_labels()
        if any(numpy.any(s[0]["dropped"]) for s in data.values()):
            handles.append(Line2D([], [], ls="", marker="x", color=DROPPED_COLOR, ms=11, mew=2.5))
            labels.append("block dropped this step (gradient took the shortcut only)")
        ax.legend(handles, labels, frameon=False, loc="best")
        if log_scale:
            ax.set_yscale("log")
        ax.set_xlabel("residual block $l$ (1 = next to the stem)")
        ax.set_ylabel(r"$\|\partial L / \partial x_l\|$ at block input")
        ax.set_title("Gradient flowing back through the blocks (one step)")

        labels = list(data.keys())
        means = [float(numpy.mean([s["stem"] for s in steps])) for steps in data.values()]
        colors = [RUN_COLORS[k % len(RUN_COLORS)] for k in range(len(labels))]
        positions = numpy.arange(len(labels))
        ax2.bar(positions, means, color=colors, alpha=0.75, width=0.6)
        for pos, steps in zip(positions, data.values()):
            values = [s["stem"] for s in steps]
            if len(values) > 1:
                ax2.plot(numpy.full(len(values), pos) + numpy.linspace(-0.15, 0.15, len(values)), values,
                         "o", color="black", ms=4)
        for pos, mean, steps in zip(positions, means, data.values()):
            top = max([mean] + [s["stem"] for s in steps])
            ax2.annotate(f"{mean:.3g}", (pos, top), ha="center", va="bottom", fontsize=12,
                         xytext=(0, 5), textcoords="offset points")
        ax2.set_xticks(positions)
        ax2.set_xticklabels([_wrap_label(label) for label in labels])
        ax2.set_ylabel(r"$\|\partial L / \partial x\|$ at the stem")
        counts = {len(s) for s in data.values()}
        if counts == {1}:
            note = ""
        elif len(counts) == 1:
            note = f"\n(mean of {counts.pop()} steps)"
        else:
            note = "\n(bar: mean; dots: single steps)"
        ax2.set_title("Gradient reaching the stem" + note)
        highest = max([s["stem"] for steps in data.values() for s in steps] + means + [0.0])
        ax2.set_ylim(0, highest * 1.25 if highest > 0 else 1)
        fig.tight_layout()
    return _finish(fig, save)


def _wrap_label(label: str, width: int = 14) -> str:
    words, lines, line = label.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Training curves
# ----------------------------------------------------------------------------------------------

# Accepted spellings of each quantity in metrics.jsonl (first one found wins).
_FIELDS = {
    "epoch": ("epoch", "epochs"),
    "train_loss": ("train_loss", "loss", "train/loss"),
    "val_loss": ("val_loss", "test_loss", "valid_loss", "eval_loss", "val/loss", "test/loss"),
    "train_acc": ("train_acc", "train_accuracy", "accuracy", "acc", "train/acc"),
    "val_acc": ("val_acc", "val_accuracy", "test_acc", "test_accuracy", "valid_acc", "eval_acc", "val/acc"),
    "seconds": ("epoch_time", "epoch_seconds", "time_s", "seconds", "train_time", "train_seconds", "time",
                "duration", "elapsed"),
    "active_fraction": ("active_fraction", "active", "kept_fraction"),
}


def _metrics_path(run) -> str:
    path = os.fspath(run)
    return os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path


def read_metrics(run) -> dict:
    """Read a run's ``metrics.jsonl`` (a run directory or the file) into lists per quantity.

    Returns {"epoch", "train_loss", "val_loss", "train_acc", "val_acc", "seconds", "active_fraction"}
    -> list (NaN
    where a line lacks the value), plus "raw": the parsed lines. Lines that are not JSON objects, or
    that have no epoch-like field, are skipped (a log may hold other records too). Accuracies given
    in percent are converted to fractions.
    """
    path = _metrics_path(run)
    raw = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(item, dict):
                raw.append(item)
    epoch_lines = [r for r in raw if any(k in r for k in _FIELDS["epoch"])] or raw
    out = {key: [] for key in _FIELDS}
    for position, item in enumerate(epoch_lines, start=1):
        for key, names in _FIELDS.items():
            value = next((item[n] for n in names if n in item and _is_number(item[n])), None)
            if value is None and key == "epoch":
                value = position
            out[key].append(float(value) if value is not None else math.nan)
    for key in ("train_acc", "val_acc"):
        values = numpy.asarray(out[key], dtype=float)
        if numpy.nanmax(values, initial=0.0) > 1.0:  # percent
            out[key] = list(values / 100.0)
    out["raw"] = epoch_lines
    return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def training_curves(runs, save=None):
    """Loss, accuracy and time per epoch of several runs, side by side.

    runs: label -> run directory (or metrics.jsonl path, or the dict of :func:`read_metrics`);
    a list of paths uses the directory names as labels. Training values are solid lines,
    validation values dashed.
    """
    if not isinstance(runs, dict):
        runs = {os.path.basename(os.path.normpath(os.fspath(r))): r for r in runs}
    data = {label: (r if isinstance(r, dict) else read_metrics(r)) for label, r in runs.items()}
    with _style() as figures:
        fig, axes = figures.subplots(1, 3, figsize=(15, 4.5))
        ax_loss, ax_acc, ax_time = axes
        bar_width = 0.8 / max(1, len(data))
        for k, (label, m) in enumerate(data.items()):
            color = RUN_COLORS[k % len(RUN_COLORS)]
            epochs = numpy.asarray(m["epoch"])
            for ax, key in ((ax_loss, "loss"), (ax_acc, "acc")):
                for split, ls in (("train", "-"), ("val", "--")):
                    values = numpy.asarray(m[f"{split}_{key}"], dtype=float)
                    if numpy.isfinite(values).any():
                        ax.plot(epochs, values, ls, color=color, lw=2, marker="o", ms=4,
                                label=f"{label}, {'training' if split == 'train' else 'validation'}")
            seconds = numpy.asarray(m["seconds"], dtype=float)
            if numpy.isfinite(seconds).any():
                mean = float(numpy.nanmean(seconds))
                active = numpy.asarray(m.get("active_fraction", []), dtype=float)
                note = (f", {numpy.nanmean(active):.0%} of branches ran" if active.size and numpy.isfinite(active).any()
                        else "")
                ax_time.bar(epochs + (k - (len(data) - 1) / 2) * bar_width, seconds, width=bar_width,
                            color=color, alpha=0.8, label=f"{label}: {mean:.2f} s/epoch{note}")
        ax_loss.set_ylabel("cross-entropy loss")
        ax_loss.set_title("Loss")
        ax_acc.set_ylabel("accuracy")
        ax_acc.set_title("Accuracy")
        ax_time.set_ylabel("seconds per epoch")
        ax_time.set_title("Training time per epoch")
        for ax in axes:
            ax.set_xlabel("epoch")
            ax.xaxis.get_major_locator().set_params(integer=True)
        # One legend for the two line plots, below them; the time legend above its bars.
        handles, labels = ax_loss.get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.35, 0.02), ncol=min(4, len(handles)),
                       frameon=False, fontsize=11)
        if ax_time.get_legend_handles_labels()[0]:
            top = max((p.get_height() for p in ax_time.patches), default=1.0)
            ax_time.set_ylim(0, top * (1.2 + 0.12 * len(data)))
            ax_time.legend(loc="upper left", frameon=False, fontsize=10)
        fig.tight_layout()
    return _finish(fig, save)


# ----------------------------------------------------------------------------------------------
# Filters and feature maps
# ----------------------------------------------------------------------------------------------


def _module_by_name(model, name):
    for n, m in model.named_modules():
        if n == name:
            return m
    raise KeyError(f"no module named {name!r}; names: {[n for n, _ in model.named_modules()][:12]} ...")


def _grid(n, max_cols=8):
    cols = min(n, max_cols)
    return int(math.ceil(n / cols)), cols


def conv_filters(model, layer: str = "conv1", input_channel: int | None = None, save=None):
    """The kernels of a convolution, one small image per output channel.

    model: a model (with ``layer`` its dotted name) or a Conv2d itself. A filter over three input
    channels (RGB) is shown in colour; otherwise one input channel, ``input_channel`` (default 0),
    is shown with blue negative, red positive and one colour scale shared by all filters.
    """
    conv = model if "weight" in getattr(model, "params", {}) and not model._modules else _module_by_name(model, layer)
    weight = numpy.asarray(backend.to_numpy(conv.params["weight"]), dtype=float)  # (O, C, kh, kw)
    out_ch, in_ch = weight.shape[:2]
    rows, cols = _grid(out_ch)
    colour = in_ch == 3 and input_channel is None
    with _style() as figures:
        fig, axes = figures.subplots(rows, cols, figsize=(1.3 * cols + 1.2, 1.3 * rows + 1.0), squeeze=False)
        if colour:
            lo, hi = weight.min(), weight.max()
            what = "RGB (min-max scaled)"
        else:
            channel = 0 if input_channel is None else int(input_channel)
            limit = numpy.abs(weight[:, channel]).max() or 1.0
            what = f"input channel {channel}" if in_ch > 1 else "one input channel"
        image = None
        for k, ax in enumerate(axes.flat):
            _bare(ax)
            if k >= out_ch:
                ax.axis("off")
                continue
            if colour:
                ax.imshow((weight[k].transpose(1, 2, 0) - lo) / (hi - lo + 1e-12), interpolation="nearest")
            else:
                image = ax.imshow(weight[k, channel], cmap="RdBu_r", vmin=-limit, vmax=limit,
                                  interpolation="nearest")
            ax.set_title(f"{k}", fontsize=10)
        name = layer if conv is not model else "conv"
        fig.suptitle(f"{name}: {out_ch} filters of {weight.shape[2]}x{weight.shape[3]}, {what}", fontsize=14)
        fig.tight_layout()
        if image is not None:
            bar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, pad=0.02)
            bar.set_label("weight")
    return _finish(fig, save)


def default_feature_layers(model) -> list[str]:
    """The stem's ReLU and the last block of each stage (or every block of a small model)."""
    names = [n for n, _ in model.named_modules()]
    chosen = [n for n in ("relu",) if n in names]
    for stage in ("layer1", "layer2", "layer3"):
        blocks = [n for n in names if n.startswith(stage + ".") and n.count(".") == 1]
        if blocks:
            chosen.append(blocks[-1])
    return chosen


def feature_maps(model, image, layers=None, channels: int = 8, save=None):
    """What a few layers make of one image: the input, then ``channels`` maps per layer.

    image: one image (C, H, W) or a batch whose first image is used. layers: dotted module names
    (default: the stem's ReLU and the last block of each stage). The model runs in evaluation mode
    (every block, no gates); its mode is restored afterwards. Each map has its own colour scale.
    """
    from minisd import trace  # noqa: PLC0415

    layers = list(layers) if layers is not None else default_feature_layers(model)
    x = image if image.ndim == 4 else image[None]
    x = x[:1]
    reference = next(iter(model.parameters()), None)
    if reference is not None:
        x = backend.to_device(x, backend.backend_of(reference), reference.dtype)
    was_training = model.training
    model.eval()
    try:
        with trace.record(model, keep_arrays=True) as t:
            model(x)
    finally:
        model.train(was_training)
    maps = {name: t.find(name, "forward").out_array[0] for name in layers}
    picture = numpy.asarray(backend.to_numpy(x[0]), dtype=float)
    with _style() as figures:
        # Columns: the input image, a narrow column for the layer names, then the maps.
        fig, axes = figures.subplots(len(layers), channels + 2, figsize=(1.25 * channels + 2.3, 1.3 * len(layers) + 0.9),
                                 squeeze=False, gridspec_kw={"width_ratios": [1, 0.75] + [1] * channels})
        for row, name in enumerate(layers):
            a = maps[name]
            ax0, label_ax = axes[row, 0], axes[row, 1]
            _bare(ax0)
            if row == 0:
                ax0.imshow(picture.transpose(1, 2, 0) if picture.shape[0] == 3 else picture[0], cmap="gray_r")
                ax0.set_title("input\n(normalised)", fontsize=10)
            else:
                ax0.axis("off")
            label_ax.axis("off")
            label_ax.text(0.95, 0.5, f"{'stem ReLU' if name == 'relu' else name}\n{a.shape[1]}x{a.shape[2]}", transform=label_ax.transAxes,
                          ha="right", va="center", fontsize=11)
            for c in range(channels):
                ax = axes[row, c + 2]
                _bare(ax)
                if c < a.shape[0]:
                    ax.imshow(a[c], cmap="magma", interpolation="nearest")
                    if row == 0:
                        ax.set_title(f"channel {c}", fontsize=10)
                else:
                    ax.axis("off")
        fig.suptitle("Feature maps of one image (evaluation mode; bright = large activation)", fontsize=14)
        fig.subplots_adjust(left=0.03, right=0.99, top=0.86 if len(layers) < 4 else 0.9, bottom=0.02,
                            wspace=0.08, hspace=0.15)
    return _finish(fig, save)


# ----------------------------------------------------------------------------------------------
# Trace figures: one event, the network map, a stepper frame
#
# Built on matplotlib.figure.Figure and never on pyplot: pyplot keeps a global list of open figures,
# and in JupyterLab a widget's redraw runs on another kernel thread while the kernel's execute hooks
# draw every figure on that list, half-built ones included. A Figure made here is on no list; it is
# shown by handing its PNG to the notebook (see minisd.stepper). Font sizes are set on each text,
# not through rcParams, so a notebook's settings (or another thread's) cannot change the picture.
# ----------------------------------------------------------------------------------------------

ACTIVATION_CMAP = "BrBG"   # forward arrays: brown negative, teal positive
GRADIENT_CMAP = "RdBu_r"   # backward arrays: blue negative, red positive
FLOW_CMAP = "viridis"      # gradient norms on the network map (dark small, yellow large)
HIGHLIGHT_COLOR = "#FFE680"
FRAME_SIZE = (15.0, 6.4)   # inches; every stepper frame has this size, so the widget never jumps
FRAME_DPI = 80


def new_figure(figsize, dpi: int = 100):
    """A matplotlib Figure that pyplot does not know about (see the section comment)."""
    from matplotlib.figure import Figure  # noqa: PLC0415

    return Figure(figsize=figsize, dpi=dpi, facecolor="white")


def figure_png(fig, dpi: int | None = None) -> bytes:
    """The PNG bytes of a figure (what a notebook shows)."""
    import io  # noqa: PLC0415

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi or fig.dpi, facecolor="white")
    return buffer.getvalue()


def _shown_slice(array, max_channels):
    """What the pictures show of an array: the first sample, at most ``max_channels`` channels."""
    a = numpy.asarray(array)
    if a.ndim == 4:
        return a[0, :max_channels]
    if a.ndim >= 2:
        return a[:1]
    return a.reshape(1, -1)


def trace_color_limits(events, max_channels: int = 8, percentile: float = 99.5) -> dict:
    """One colour scale per kind of array, shared by every frame of a walk.

    Returns {"activation": limit, "gradient": limit}: the ``percentile`` of |value| over everything
    the frames show (first sample, first ``max_channels`` channels) of the forward events
    (activations) and of the backward events (gradients). Pictures then use [-limit, limit], so a
    gradient that shrinks from one step to the next looks fainter. (A percentile rather than the
    maximum: one outlier would otherwise wash out every other frame.)
    """
    shown = {"activation": [], "gradient": []}
    for e in events:
        kind = "activation" if e.phase == "forward" else "gradient"
        for array in (e.in_array, e.out_array):
            if array is not None and getattr(array, "size", 0):
                shown[kind].append(numpy.abs(_shown_slice(array, max_channels)).ravel().astype(float))
    limits = {}
    for kind, parts in shown.items():
        values = numpy.concatenate(parts) if parts else numpy.zeros(1)
        values = values[numpy.isfinite(values)]
        limit = float(numpy.percentile(values, percentile)) if values.size else 0.0
        limits[kind] = limit if limit > 0 else 1.0
    return limits


def _event_title(event) -> str:
    title = f"{event.phase}: {event.label} ({event.kind})"
    if event.gate is not None and event.gate != "eval":
        gate = event.gate if event.gate != "rows" else f"rows, {event.kept_fraction:.0%} kept"
        title += f"   gate: {gate}" + (", branch skipped" if event.skipped else "")
    return title


def _mosaic(maps):
    """Channel maps side by side in one array, separated by a column of NaN (drawn white).

    maps: (C, H, W) -> (H, C*W + (C-1)*gap). One image instead of C small axes: a frame draws in a
    fraction of the time, which is what keeps the stepper's redraw quick.
    """
    count, h, w = maps.shape
    gap = max(1, w // 6)
    out = numpy.full((h, count * w + (count - 1) * gap), numpy.nan)
    for c in range(count):
        out[:, c * (w + gap): c * (w + gap) + w] = maps[c]
    return out, w, gap


def _value_formatter():
    from matplotlib.ticker import FuncFormatter  # noqa: PLC0415

    return FuncFormatter(lambda v, _: f"{v:.2g}")


def _draw_event(fig, spec, event, max_channels, limits=None):
    """Draw one event into the region ``spec`` of ``fig`` (a SubplotSpec).

    Top row: what came in; bottom row: what went out (first sample, first channels side by side).
    Forward shows activations, backward gradients, each kind on its own colour scale (``limits``
    from :func:`trace_color_limits`, shared across frames; None: this event's own scale). Without
    kept arrays, the two norms as bars.
    """
    import matplotlib  # noqa: PLC0415

    forward = event.phase == "forward"
    names = ("input x", "output y") if forward else ("incoming dL/dy", "outgoing dL/dx")
    shapes = (event.in_shape, event.out_shape)
    norms = (event.in_norm, event.out_norm)
    if event.in_array is None or event.out_array is None:
        ax = fig.add_subplot(spec)
        ax.barh([1, 0], list(norms), color=[CONSTANT_COLOR, KEPT_COLOR])
        ax.set_yticks([1, 0])
        ax.set_yticklabels([f"{n}\n{s}" for n, s in zip(names, shapes)], fontsize=11)
        ax.set_xlabel("L2 norm", fontsize=12)
        ax.tick_params(labelsize=10)
        ax.set_title("(record with keep_arrays=True to see the arrays)", fontsize=10)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        return
    kind = "activation" if forward else "gradient"
    cmap = matplotlib.colormaps[ACTIVATION_CMAP if forward else GRADIENT_CMAP].with_extremes(bad="white")
    rows = [numpy.asarray(_shown_slice(event.in_array, max_channels), dtype=float),
            numpy.asarray(_shown_slice(event.out_array, max_channels), dtype=float)]
    if limits is not None:
        limit, scope = limits[kind], "one scale for all steps"
    else:
        limit = max(float(numpy.abs(r).max()) if r.size else 0.0 for r in rows) or 1.0
        scope = "this step's scale"
    grid = spec.subgridspec(2, 2, width_ratios=[1, 0.025], wspace=0.04, hspace=0.3)
    image = None
    for r, (maps, name, shape, norm) in enumerate(zip(rows, names, shapes, norms)):
        ax = fig.add_subplot(grid[r, 0])
        _bare(ax)
        if maps.ndim == 3:  # (C, H, W): channel maps side by side, each square
            mosaic, w, gap = _mosaic(maps)
            # Pad to the width of max_channels maps, so that every frame has the same geometry.
            full = max_channels * w + (max_channels - 1) * gap
            mosaic = numpy.pad(mosaic, ((0, 0), (0, full - mosaic.shape[1])), constant_values=numpy.nan)
            image = ax.imshow(mosaic, cmap=cmap, vmin=-limit, vmax=limit, interpolation="nearest",
                              aspect="equal")
            for c in range(len(maps)):
                ax.text(c * (w + gap) + w / 2 - 0.5, -0.6, f"channel {c}", ha="center", va="bottom", fontsize=10)
        else:  # (1, F): a feature vector, one strip over the row
            image = ax.imshow(maps, cmap=cmap, vmin=-limit, vmax=limit, interpolation="nearest", aspect="auto")
            ax.set_title(f"{maps.shape[1]} values", fontsize=10)
        ax.set_ylabel(f"{name}\n{shape}\nnorm {norm:.3g}", fontsize=11, rotation=0, ha="right", va="center",
                      labelpad=8)
    cax = fig.add_subplot(grid[:, 1])
    bar = fig.colorbar(image, cax=cax, format=_value_formatter())
    bar.set_label(f"{kind} value ({scope})", fontsize=11)
    cax.tick_params(labelsize=10)


def trace_event(event, max_channels: int = 8, limits=None, save=None):
    """One trace event as a picture: the first sample's maps going in (top row) and coming out
    (bottom row); forward shows activations, backward gradients.

    limits: {"activation": a, "gradient": g} from :func:`trace_color_limits` to draw on a scale
    shared with other events (None: this event's own scale). Without kept arrays
    (``keep_arrays=False``) it draws the two norms as bars instead.
    """
    has_arrays = event.in_array is not None and event.out_array is not None
    fig = new_figure((max(6.0, 1.2 * max_channels + 2.5), 4.4) if has_arrays else (7.0, 3.2))
    grid = fig.add_gridspec(1, 1, left=0.16 if has_arrays else 0.3, right=0.93, top=0.8, bottom=0.12)
    _draw_event(fig, grid[0, 0], event, max_channels, limits)
    fig.suptitle(_event_title(event), fontsize=13)
    return _finish(fig, save)


def network_data(trace) -> dict:
    """What the network map draws, from one recorded step.

    Returns {"stem": [names], "head": [names], "stages": [(name, [block indices])], "blocks": [...]}
    with one dict per residual block: name, stage, gate, kept_fraction, survival_prob, channels,
    and the gradient norms of its edges in backward (NaN where nothing flowed or nothing was
    recorded): ``entry`` (dL/dx at the block's input), ``shortcut`` (through the shortcut),
    ``branch`` (through the branch; NaN when it was dropped) and ``exit`` (dL/dy at its output).
    """
    names = trace.block_names
    forward = {e.name: e for e in trace.forward()}
    backward = {e.name: e for e in trace.backward()}
    blocks, stages = [], []
    for k, name in enumerate(names):
        stage = name.rsplit(".", 1)[0] if "." in name else ""
        if not stages or stages[-1][0] != stage:
            stages.append((stage, []))
        stages[-1][1].append(k)
        f, b = forward.get(name), backward.get(name)
        head = f or b
        nan = math.nan
        blocks.append({
            "name": name, "stage": stage,
            "gate": head.gate if head else None,
            "kept_fraction": head.kept_fraction if head else None,
            "survival_prob": head.survival_prob if head else None,
            "channels": (f.out_shape[1] if f and len(f.out_shape) > 1 else None),
            "entry": b.out_norm if b else nan,
            "exit": b.in_norm if b else nan,
            "shortcut": backward[name + ".shortcut"].out_norm if name + ".shortcut" in backward else nan,
            "branch": backward[name + ".branch"].out_norm if name + ".branch" in backward else nan,
        })
    outside = {"stem": [], "head": []}
    for e in trace.forward():
        place = trace.place(e)
        if place.region in outside and e.name not in outside[place.region]:
            outside[place.region].append(e.name)
    return {"stem": outside["stem"], "head": outside["head"], "stages": stages, "blocks": blocks}


def _flow_norm(data):
    """One logarithmic colour scale for every edge of the map (None if no backward was recorded)."""
    from matplotlib.colors import LogNorm  # noqa: PLC0415

    values = [b[key] for b in data["blocks"] for key in ("entry", "shortcut", "branch", "exit")]
    values = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    if not values:
        return None
    low, high = min(values), max(values)
    if high <= low * 1.0001:
        low, high = low / 1.5, high * 1.5
    return LogNorm(vmin=low, vmax=high)


def _short_block_label(name: str) -> str:
    """"layer2.3" -> "2.3" (the stage number and the block's index in it); other names unchanged."""
    return name[len("layer"):] if name.startswith("layer") else (name or "block")


def _gate_label(block) -> str:
    """b = 1 / b = 0 (the paper's gate), or the kept share in row mode, and p_l."""
    gate = block["gate"]
    if gate == "rows":
        b = f"b {block['kept_fraction']:.0%}"
    elif gate in ("kept", "dropped"):
        b = "b=1" if gate == "kept" else "b=0"
    else:
        b = ""
    p = f"p={block['survival_prob']:.2f}".replace("0.", ".") if block["survival_prob"] is not None else ""
    return " ".join(part for part in (_short_block_label(block["name"]), b, p) if part)


_COLUMN_WIDTH = 1.15  # map coordinates: one column per stage, one unit per block row
_MAIN_DX = 0.14       # the main line's x inside a column
_STEM_Y = 1.3         # the stem box's centre, above the first row


def _map_text_size(data) -> float:
    rows = max([len(ks) for _, ks in data["stages"]] or [1])
    return 10 if rows <= 9 else 8 if rows <= 14 else 6.5


def _highlight_box(data, place):
    """Where the map marks ``place``: (x, y, width, height, arrow on the left) in map coordinates,
    "all" for the whole network or a stage, or None."""
    if place is None:
        return None
    if place.region in ("model", "stage"):
        return "all"
    stages = data["stages"] or [("", [])]
    if place.region == "stem":
        return (-0.02, _STEM_Y - 0.38, 1.16, 0.76, False) if data["stem"] else None
    if place.region == "head":
        last_rows = len(stages[-1][1])
        return ((len(stages) - 1) * _COLUMN_WIDTH - 0.02, -last_rows - 0.98, 1.16, 0.76, False) if data["head"] else None
    for column, (_, ks) in enumerate(stages):
        if place.block in ks:
            x0, y0 = column * _COLUMN_WIDTH, -ks.index(place.block)
            if place.part == "branch":
                return (x0 + 0.23, y0 - 0.82, 0.83, 0.64, False)
            if place.part == "shortcut":
                return (x0 + _MAIN_DX - 0.1, y0 - 0.9, 0.2, 0.8, True)
            return (x0 + 0.02, y0 - 0.98, _COLUMN_WIDTH - 0.1, 0.96, False)
    return None


def _mark(ax, box, phase, text_size, to_axes=None):
    """Mark the current place on top of the map: a translucent box with a black frame, and an
    arrow down (forward) or up (backward) beside it. ``to_axes`` maps map coordinates to the
    coordinates of ``ax`` (for a map pasted as pixels); None: ax is the map itself."""
    import matplotlib  # noqa: PLC0415
    from matplotlib.patches import Rectangle  # noqa: PLC0415

    if box is None:
        return
    if box == "all":
        ax.patch.set_facecolor("#FFF8D6")  # the whole network (or a stage) is the current call
        return
    x, y, w, h, arrow_left = box
    to_axes = to_axes or (lambda px, py: (px, py))
    (ax0, ay0), (ax1, ay1) = to_axes(x, y), to_axes(x + w, y + h)
    ax.add_patch(Rectangle((min(ax0, ax1), min(ay0, ay1)), abs(ax1 - ax0), abs(ay1 - ay0),
                           facecolor=matplotlib.colors.to_rgba(HIGHLIGHT_COLOR, 0.45), edgecolor="black", lw=2.0,
                           zorder=5))
    arrow = "\u25bc" if phase == "forward" else "\u25b2"
    tx, ty = to_axes(x - 0.01 if arrow_left else x + w + 0.01, y + h / 2)
    ax.text(tx, ty, arrow, ha="right" if arrow_left else "left", va="center", fontsize=text_size + 3, zorder=6)


def _draw_network(fig, ax, cax, trace, highlight=None, data=None, norm=None):
    """Draw the network map into ``ax`` (and its colour bar into ``cax``); see :func:`network`.

    Coordinates: one column per stage, 1.15 wide; block rows one unit tall, the first at y = 0 .. -1.
    Inside a row the main line runs down at x = 0.14 (entry, shortcut, exit) and the branch is a
    box to its right, split from the line at the top and joined back at the bottom (the circle).
    All lines go into two LineCollections (solid and dashed), which draw much faster than one
    Line2D per segment.
    """
    import matplotlib  # noqa: PLC0415
    from matplotlib.collections import LineCollection  # noqa: PLC0415
    from matplotlib.patches import FancyBboxPatch  # noqa: PLC0415

    data = data if data is not None else network_data(trace)
    norm = norm if norm is not None else _flow_norm(data)
    cmap = matplotlib.colormaps[FLOW_CMAP]
    grey = "#A8A8A8"

    # Every edge colour in one vectorised call (a colour map called per value is slow).
    keys = ("entry", "shortcut", "branch", "exit")
    values = numpy.array([[b[key] for key in keys] for b in data["blocks"]], dtype=float).reshape(-1, len(keys))
    usable = numpy.isfinite(values) & (values > 0)
    rgba = cmap(norm(numpy.where(usable, values, 1.0))) if norm is not None and values.size else None
    edge_colours = [{key: (tuple(rgba[k, j]) if rgba is not None and usable[k, j] else grey)
                     for j, key in enumerate(keys)} for k in range(len(data["blocks"]))]

    stages = data["stages"] or [("", [])]
    rows = max(len(ks) for _, ks in stages)
    text_size = _map_text_size(data)
    main_dx, width = _MAIN_DX, _COLUMN_WIDTH
    solid, solid_colours, solid_widths, dashed = [], [], [], []
    joins_x, joins_y = [], []

    for column, (stage, ks) in enumerate(stages):
        x0 = column * width
        main = x0 + main_dx
        channels = data["blocks"][ks[0]]["channels"] if ks else None
        ax.text(x0 + 0.5, 0.12, (stage or "blocks") + (f" ({channels} ch)" if channels else ""), ha="center",
                va="bottom", fontsize=text_size + 1, fontweight="bold")
        for row, k in enumerate(ks):
            b = data["blocks"][k]
            y0 = -row
            dropped = b["gate"] == "dropped" or not math.isfinite(b["branch"]) and b["gate"] == "rows"
            for (ya, yb), key in (((y0, y0 - 0.15), "entry"), ((y0 - 0.15, y0 - 0.85), "shortcut"),
                                  ((y0 - 0.85, y0 - 1.0), "exit")):
                solid.append([(main, ya), (main, yb)])
                solid_colours.append(edge_colours[k][key])
                solid_widths.append(3.0)
            box_x, box_w = x0 + 0.27, 0.75
            mid = box_x + box_w / 2
            split = [(main, y0 - 0.15), (mid, y0 - 0.15), (mid, y0 - 0.22)]
            join = [(mid, y0 - 0.78), (mid, y0 - 0.85), (main, y0 - 0.85)]
            if dropped:
                dashed += [split, join]
            else:
                solid += [split, join]
                solid_colours += [edge_colours[k]["branch"]] * 2
                solid_widths += [2.0, 2.0]
            ax.add_patch(FancyBboxPatch((box_x, y0 - 0.78), box_w, 0.56, boxstyle="round,pad=0,rounding_size=0.08",
                                        facecolor="#E8E8E8" if dropped else "white",
                                        edgecolor=grey if dropped else edge_colours[k]["branch"],
                                        hatch="///" if dropped else None, lw=1.8, ls="--" if dropped else "-",
                                        zorder=3))
            ax.text(mid, y0 - 0.5, _gate_label(b), ha="center", va="center", fontsize=text_size,
                    color="#333333" if dropped else "black", zorder=4,
                    bbox=dict(facecolor="#E8E8E8", edgecolor="none", pad=0.3) if dropped else None)
            joins_x.append(main)
            joins_y.append(y0 - 0.85)

    def end_box(y, names, what, column):
        if not names:
            return
        x0 = column * width
        ax.add_patch(FancyBboxPatch((x0 + 0.02, y - 0.32), 1.08, 0.64, boxstyle="round,pad=0,rounding_size=0.1",
                                    facecolor="#F2F2F2", edgecolor="black", lw=1.2, zorder=3))
        ax.text(x0 + 0.56, y, f"{what}: " + ", ".join(names), ha="center", va="center", fontsize=text_size - 1,
                zorder=4)

    last_rows = len(stages[-1][1])
    end_box(_STEM_Y, data["stem"], "stem", 0)
    end_box(-last_rows - 0.6, data["head"], "head", len(stages) - 1)
    if data["stem"] and stages[0][1]:
        solid.append([(main_dx, 0.98), (main_dx, 0.0)])
        solid_colours.append(edge_colours[0]["entry"])
        solid_widths.append(3.0)
    if data["head"] and last_rows:
        main = (len(stages) - 1) * width + main_dx
        solid.append([(main, -last_rows), (main, -last_rows - 0.28)])
        solid_colours.append(edge_colours[-1]["exit"])
        solid_widths.append(3.0)
    ax.add_collection(LineCollection(solid, colors=solid_colours, linewidths=solid_widths, capstyle="butt", zorder=2))
    if dashed:
        ax.add_collection(LineCollection(dashed, colors=grey, linewidths=2.0, linestyles="--", zorder=2))
    ax.plot(joins_x, joins_y, "o", ms=4.5, mfc="white", mec="black", mew=1.0, ls="", zorder=4)
    if highlight is not None:
        _mark(ax, _highlight_box(data, trace.place(highlight)), highlight.phase, text_size)
    ax.set_xlim(-0.1, len(stages) * width)
    ax.set_ylim(-rows - 1.05, 1.75)
    _bare(ax)
    n_dropped = sum(1 for b in data["blocks"] if b["gate"] == "dropped")
    ax.set_title(f"The network: {len(data['blocks'])} residual blocks, {n_dropped} dropped (b=0, hatched)\n"
                 "forward: top to bottom, one column per stage", fontsize=text_size + 1)
    if cax is not None:
        if norm is None:
            cax.axis("off")
            cax.text(0.5, 0.5, "no backward recorded: edges grey", ha="center", va="center", fontsize=10)
        else:
            from matplotlib.cm import ScalarMappable  # noqa: PLC0415
            from matplotlib.ticker import LogLocator, NullFormatter  # noqa: PLC0415

            bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax, orientation="horizontal")
            bar.set_label("gradient norm through each edge in backward", fontsize=10)
            cax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0), numticks=6))
            cax.xaxis.set_major_formatter(_value_formatter())
            cax.xaxis.set_minor_formatter(NullFormatter())
            cax.tick_params(labelsize=9)


def network(trace, highlight=None, save=None):
    """A map of the traced network: the stem, every residual block as a shortcut beside a branch,
    and the head, one column per stage.

    Dropped branches are grey and hatched, labelled with their gate and p_l. Each edge is
    coloured by the norm of the gradient that flowed through it in backward (entry, shortcut,
    branch, exit), on one logarithmic scale for the whole map, so a dropped block shows the
    gradient going around it through the shortcut. ``highlight``: an event of the trace, whose
    place (stem, a block's branch or shortcut, the whole block, the head) is marked, with an arrow
    down for forward or up for backward.
    """
    data = network_data(trace)
    stages = max(1, len(data["stages"]))
    rows = max([len(ks) for _, ks in data["stages"]] or [1])
    fig = new_figure((max(5.0, 2.3 * stages + 0.6), max(4.5, 0.42 * rows + 3.0)))
    grid = fig.add_gridspec(2, 1, height_ratios=[1, 0.035], left=0.02, right=0.98, top=0.9, bottom=0.1,
                            hspace=0.12)
    ax, cax = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
    _draw_network(fig, ax, cax, trace, highlight, data)
    return _finish(fig, save)


def _frame_grid(fig):
    """The stepper frame's two regions: the event (left) and the map with its colour bar (right)."""
    outer = fig.add_gridspec(1, 2, width_ratios=[1.5, 1], left=0.105, right=0.995, top=0.88, bottom=0.08,
                             wspace=0.16)
    return outer[0, 0], outer[0, 1], outer[0, 1].subgridspec(2, 1, height_ratios=[1, 0.03], hspace=0.12)


class NetworkRaster:
    """The network map of a walk drawn once, as pixels, in the place it takes in a stepper frame.

    The map is the same in every frame but for the mark on the current place, and drawing its
    hundreds of lines, boxes and labels is most of a frame's cost; a frame pastes these pixels and
    draws only the mark (see :func:`stepper_frame`), about twice as fast.
    """

    def __init__(self, trace, data=None, norm=None):
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415

        self.data = data if data is not None else network_data(trace)
        self.norm = norm if norm is not None else _flow_norm(self.data)
        fig = new_figure(FRAME_SIZE, dpi=FRAME_DPI)
        _, cell, right = _frame_grid(fig)
        ax = fig.add_subplot(right[0])
        _draw_network(fig, ax, fig.add_subplot(right[1]), trace, None, self.data, self.norm)
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        pixels = numpy.asarray(canvas.buffer_rgba())
        self.height, width = pixels.shape[:2]
        self.left = int(math.floor(cell.get_position(fig).x0 * width))  # the map's region starts here
        self.pixels = pixels[:, self.left:].copy()
        self.box = (self.left / width, 0.0, 1.0 - self.left / width, 1.0)  # in figure fractions
        self.to_display = ax.transData.frozen()
        self.text_size = _map_text_size(self.data)

    def to_pixels(self, x, y):
        """Map coordinates -> (column, row) in ``pixels`` (rows count from the top)."""
        px, py = self.to_display.transform((x, y))
        return px - self.left, self.height - py

    def paste(self, fig, trace, event):
        """Put the map into ``fig`` (a frame) and mark the place of ``event`` on it."""
        ax = fig.add_axes(self.box)
        ax.imshow(self.pixels, interpolation="none", extent=(0, self.pixels.shape[1], self.height, 0), aspect="auto")
        ax.set_xlim(0, self.pixels.shape[1])
        ax.set_ylim(self.height, 0)
        ax.set_axis_off()
        _mark(ax, _highlight_box(self.data, trace.place(event)), event.phase, self.text_size, self.to_pixels)
        return ax


def stepper_frame(trace, event, title: str = "", limits=None, max_channels: int = 8, data=None, norm=None,
                  raster: NetworkRaster | None = None):
    """One frame of the stepper: the event's picture (left) beside the network map with the event's
    place marked (right). Always :data:`FRAME_SIZE`, so frames replace each other without moving.

    limits, data, norm: the shared colour limits (:func:`trace_color_limits`), the map's data
    (:func:`network_data`) and its colour scale, computed once per walk by the caller (computed
    here when None). raster: the map drawn once (:class:`NetworkRaster`); None draws it here.
    """
    fig = new_figure(FRAME_SIZE, dpi=FRAME_DPI)
    left, _, right = _frame_grid(fig)
    _draw_event(fig, left, event, max_channels, limits)
    if raster is not None:
        raster.paste(fig, trace, event)
    else:
        _draw_network(fig, fig.add_subplot(right[0]), fig.add_subplot(right[1]), trace, event, data, norm)
    fig.suptitle((title + "   " if title else "") + _event_title(event), fontsize=14, x=0.01, ha="left")
    return fig


# ----------------------------------------------------------------------------------------------
# The paper's claims: gradient magnitude over training, test error with seeds, time per step,
# the two scale rules, the gradient of dropped branches
#
# These figures are built on matplotlib.figure.Figure directly (not pyplot's list of figures), so
# they are safe from any thread and never shown twice. In a notebook, end the cell with the figure
# (or call display(fig)) to show it.
#
# * gradient_magnitude          mean |gradient| at the first conv per epoch, over seeds (Figure 8)
# * test_error_curves           test error and training loss per epoch, mean and spread over seeds
# * step_time_vs_active_blocks  step time against the number of blocks that ran, with a fit
# * monte_carlo_convergence     training outputs averaged over gate draws vs the test output
# * branch_gradient_norms       each block's branch gradient after one step, dropped blocks marked
# * survival_sweep              test error against p_L for the survival rules (the paper's Figure 6)
# ----------------------------------------------------------------------------------------------

__all__ += [
    "gradient_magnitude",
    "test_error_curves",
    "seed_matrix",
    "fit_step_time",
    "step_time_vs_active_blocks",
    "monte_carlo_convergence",
    "branch_gradient_norms",
    "survival_sweep",
]

SEED_BAND_ALPHA = 0.2


def _figure_class():
    from matplotlib.figure import Figure  # noqa: PLC0415

    class NotebookFigure(Figure):
        """A plain Figure that shows itself in a notebook (IPython calls _repr_png_), with no
        pyplot import and no inline-backend set-up needed."""

        def _repr_png_(self):
            import io  # noqa: PLC0415

            buffer = io.BytesIO()
            self.savefig(buffer, format="png", dpi=100, bbox_inches="tight", facecolor="white")
            return buffer.getvalue()

    return NotebookFigure


@contextlib.contextmanager
def _figure(figsize, nrows=1, ncols=1, **subplot_kw):
    """(fig, axes) of a new matplotlib.figure.Figure in the lecture style (no pyplot involved)."""
    import matplotlib  # noqa: PLC0415

    with matplotlib.rc_context(_STYLE):
        fig = _figure_class()(figsize=figsize)
        axes = fig.subplots(nrows, ncols, **subplot_kw)
        yield fig, axes


def _records(run) -> list[dict]:
    """The epoch records of one run: a run folder, its metrics.jsonl, or the list of records."""
    if isinstance(run, (list, tuple)) and (not run or isinstance(run[0], dict)):
        return list(run)
    return read_metrics(run)["raw"]


def _seed_runs(value) -> list[list[dict]]:
    """One label's runs (one per seed): a run folder, a list of run folders, or lists of records."""
    if isinstance(value, (str, os.PathLike)) or (isinstance(value, (list, tuple)) and value
                                                 and isinstance(value[0], dict)):
        value = [value]
    return [_records(run) for run in value]


def seed_matrix(runs, key: str):
    """(epochs, values): ``values[s, e]`` is ``key`` of seed s at epoch e (NaN where missing or null).

    runs: one label's runs, as :func:`gradient_magnitude` takes them. Epochs are the union over the
    seeds, in order.
    """
    per_seed = _seed_runs(runs)
    epochs = sorted({int(r["epoch"]) for records in per_seed for r in records if "epoch" in r})
    column = {e: k for k, e in enumerate(epochs)}
    values = numpy.full((len(per_seed), len(epochs)), numpy.nan)
    for s, records in enumerate(per_seed):
        for r in records:
            value = r.get(key)
            if "epoch" in r and _is_number(value):
                values[s, column[int(r["epoch"])]] = value
    return numpy.asarray(epochs), values


def _lr_drops(runs) -> list[float]:
    """Epochs after which the learning rate changed (from the first run of the first label)."""
    first = _seed_runs(next(iter(runs.values())))[0]
    rates = [(int(r["epoch"]), r.get("lr")) for r in first if _is_number(r.get("lr"))]
    return [e0 + 0.5 for (e0, a), (_, b) in zip(rates, rates[1:]) if not math.isclose(a, b)]


def _mean_and_band(ax, epochs, values, color, label, ls="-", marker="o"):
    """Mean over seeds as a line, lowest to highest seed as a band; returns the mean."""
    import warnings  # noqa: PLC0415

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an epoch no seed reached stays NaN, silently
        mean = numpy.nanmean(values, axis=0)
        low, high = numpy.nanmin(values, axis=0), numpy.nanmax(values, axis=0)
    ax.plot(epochs, mean, ls, color=color, lw=2.2, marker=marker, ms=3.5, label=label)
    if values.shape[0] > 1:
        ax.fill_between(epochs, low, high, color=color, alpha=SEED_BAND_ALPHA, lw=0)
    return mean


def _mark_lr_drops(ax, drops, legend=True):
    """Dotted lines at the learning-rate drops; ``legend``: name them once in the axes' legend."""
    for k, epoch in enumerate(drops):
        ax.axvline(epoch, color="#999999", lw=1, ls=":", zorder=0,
                   label="learning rate ÷ 10" if legend and k == 0 else None)


def _seed_note(runs) -> str:
    counts = sorted({len(_seed_runs(v)) for v in runs.values()})
    if counts == [1]:
        return "one seed"
    what = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"line: mean of {what} seeds; band: lowest to highest seed"


def gradient_magnitude(runs: dict, reference: str | None = None, log_scale: bool = True, save=None):
    """The paper's Figure 8: mean |gradient| at the first convolution over training.

    runs: label -> the runs of one configuration, one per seed (run folders, or their record
    lists); the records need ``first_conv_grad`` (written by ``minisd.train``). Left: the
    epoch's mean absolute gradient of the stem convolution's weight, mean over seeds with the
    spread as a band. Right: each configuration's mean divided by the reference's (default: the
    first label), so "larger with stochastic depth" reads as a line above 1.
    """
    labels = list(runs)
    reference = labels[0] if reference is None else reference
    curves = {label: seed_matrix(runs[label], "first_conv_grad") for label in labels}
    drops = _lr_drops(runs)
    with _figure((14, 5.2), 1, 2, gridspec_kw={"width_ratios": [1.35, 1]}) as (fig, (ax, ax2)):
        means = {}
        for k, label in enumerate(labels):
            epochs, values = curves[label]
            means[label] = (epochs, _mean_and_band(ax, epochs, values, RUN_COLORS[k % len(RUN_COLORS)], label))
        _mark_lr_drops(ax, drops)
        if log_scale:
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean |∂L/∂W| of the first conv layer")
        ax.set_title("Gradient magnitude at the first convolution")
        ax.legend(frameon=False, loc="best")
        ref_epochs, ref_mean = means[reference]
        ax2.axhline(1.0, color=RUN_COLORS[labels.index(reference) % len(RUN_COLORS)], lw=2, ls="--",
                    label=f"{reference} (= 1)")
        for k, label in enumerate(labels):
            if label == reference:
                continue
            epochs, mean = means[label]
            common = numpy.intersect1d(epochs, ref_epochs)
            ratio = mean[numpy.searchsorted(epochs, common)] / ref_mean[numpy.searchsorted(ref_epochs, common)]
            ax2.plot(common, ratio, "-o", color=RUN_COLORS[k % len(RUN_COLORS)], lw=2.2, ms=3.5, label=label)
        _mark_lr_drops(ax2, drops, legend=False)  # the left panel names these lines
        ax2.set_xlabel("epoch")
        ax2.set_ylabel(f"ratio to {reference}")
        ax2.set_title("Relative to " + reference)
        # From 0, so the reference line sits well above the legend in the lower right corner.
        top = max([1.0] + [float(numpy.nanmax(line.get_ydata())) for line in ax2.get_lines()
                           if len(line.get_ydata()) and numpy.isfinite(line.get_ydata()).any()])
        ax2.set_ylim(0, 1.15 * top)
        ax2.legend(frameon=False, loc="lower right")
        for a in (ax, ax2):
            a.xaxis.get_major_locator().set_params(integer=True)
        fig.suptitle(f"Mean gradient magnitude per epoch ({_seed_note(runs)})", fontsize=14)
        fig.tight_layout()
    return _finish(fig, save)


def test_error_curves(runs: dict, log_scale: bool = True, save=None):
    """Test error and training loss per epoch of several configurations, each over seeds.

    runs: label -> the runs of one configuration, one per seed (run folders or record lists; the
    records need ``test_acc`` and ``train_loss``). Left: test error in percent (the model after
    each epoch, as the paper plots it); the legend gives the last epoch's mean and standard
    deviation over seeds. Right: training loss. Both on log scales by default, so the first
    epochs (or one spike) do not flatten the differences of a few tenths of a percent at the end.
    """
    labels = list(runs)
    drops = _lr_drops(runs)
    with _figure((14, 5.2), 1, 2) as (fig, (ax, ax2)):
        for k, label in enumerate(labels):
            color = RUN_COLORS[k % len(RUN_COLORS)]
            epochs, acc = seed_matrix(runs[label], "test_acc")
            error = 100.0 * (1.0 - acc)
            last = error[:, -1][numpy.isfinite(error[:, -1])]
            spread = f" ± {numpy.std(last, ddof=1):.1f}" if last.size > 1 else ""
            _mean_and_band(ax, epochs, error, color, f"{label}: {numpy.mean(last):.1f}{spread}% in the last epoch")
            epochs, loss = seed_matrix(runs[label], "train_loss")
            _mean_and_band(ax2, epochs, loss, color, label)
        for a in (ax, ax2):
            _mark_lr_drops(a, drops)
            a.set_xlabel("epoch")
            a.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("test error (%)")
        ax.set_title("Test error after each epoch" + (" (log scale)" if log_scale else ""))
        if log_scale:
            from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: PLC0415

            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        else:
            ax.set_ylim(bottom=0)
        ax.legend(frameon=False, loc="upper right", fontsize=10)
        if log_scale:
            ax2.set_yscale("log")
        ax2.set_ylabel("training loss (cross-entropy)")
        ax2.set_title("Training loss" + (" (log scale)" if log_scale else ""))
        ax2.legend(frameon=False, loc="upper right", fontsize=10)
        fig.suptitle(f"Test error and training loss ({_seed_note(runs)})", fontsize=14)
        fig.tight_layout()
    return _finish(fig, save)


def fit_step_time(active_blocks, seconds) -> dict:
    """seconds ≈ fixed + per_block * active_blocks, fitted robustly (Theil-Sen: the median of the
    slopes between all pairs of points, then the median intercept), so steps slowed down by other
    programs on the machine do not pull the line. Returns {"fixed_s", "per_block_s", "points"}."""
    k = numpy.asarray(active_blocks, dtype=float)
    t = numpy.asarray(seconds, dtype=float)
    if k.shape != t.shape or k.size < 2:
        raise ValueError(f"fit_step_time: expected two equal-length sequences of >= 2 numbers, got {k.shape}, {t.shape}")
    i, j = numpy.triu_indices(k.size, 1)
    apart = k[i] != k[j]
    if not apart.any():
        raise ValueError("fit_step_time: every step ran the same number of blocks; a slope needs two")
    slope = float(numpy.median((t[j] - t[i])[apart] / (k[j] - k[i])[apart]))
    fixed = float(numpy.median(t - slope * k))
    return {"fixed_s": fixed, "per_block_s": slope, "points": int(k.size)}


def step_time_vs_active_blocks(active_blocks, seconds, num_blocks: int, expected_active: float | None = None,
                               paper_saving: float = 0.25, measured_saving: float | None = None,
                               title: str | None = None, save=None):
    """Time of one training step against the number of residual blocks that ran in it.

    active_blocks, seconds: one entry per timed step. A robust straight line (:func:`fit_step_time`)
    gives the fixed cost (stem, head, loss, optimizer) and the cost per block. With
    ``expected_active`` (sum of p_l of a schedule) the figure marks the predicted stochastic-depth
    step against the all-blocks step, and prints the predicted saving beside the paper's (~25%
    for ResNet-110, p_L = 0.5). measured_saving: a saving timed separately (e.g. from interleaved
    steps with the schedule's gates), printed beside the prediction.
    """
    fit = fit_step_time(active_blocks, seconds)
    k = numpy.asarray(active_blocks, dtype=float)
    t_ms = 1e3 * numpy.asarray(seconds, dtype=float)
    jitter = numpy.random.default_rng(0).uniform(-0.25, 0.25, k.size)  # see overlapping points
    with _figure((10, 5.6)) as (fig, ax):
        ax.plot(k + jitter, t_ms, "o", color=KEPT_COLOR, alpha=0.5, ms=6, mew=0, label=f"{k.size} timed steps")
        line_k = numpy.array([0.0, float(num_blocks)])
        ax.plot(line_k, 1e3 * (fit["fixed_s"] + fit["per_block_s"] * line_k), "-", color="black", lw=2.2,
                label=f"fit: {1e3 * fit['fixed_s']:.1f} ms + {1e3 * fit['per_block_s']:.2f} ms per block")
        full = fit["fixed_s"] + fit["per_block_s"] * num_blocks
        lines = [f"all {num_blocks} blocks: {1e3 * full:.0f} ms"]
        if expected_active is not None:
            expected = fit["fixed_s"] + fit["per_block_s"] * expected_active
            saving = 1.0 - expected / full
            ax.plot([expected_active], [1e3 * expected], "D", color=DROPPED_COLOR, ms=11, zorder=5,
                    label=f"stochastic depth, E[blocks] = {expected_active:.1f}")
            ax.plot([num_blocks], [1e3 * full], "s", color=CONSTANT_COLOR, ms=10, zorder=5, label="constant depth")
            lines += [f"E[blocks] = {expected_active:.1f}: {1e3 * expected:.0f} ms",
                      f"predicted saving {saving:.0%} (the paper: ~{paper_saving:.0%})"]
        if measured_saving is not None:
            lines.append(f"measured saving {measured_saving:.0%}")
        ax.text(0.02, 0.97, "\n".join(lines), transform=ax.transAxes, va="top", ha="left", fontsize=12,
                bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "#BBBBBB"})
        ax.set_xlim(-1, num_blocks + 1)
        ax.set_ylim(0, max(float(numpy.percentile(t_ms, 99)), 1e3 * full) * 1.15)
        ax.set_xlabel("residual blocks that ran in the step")
        ax.set_ylabel("time of one training step (ms)")
        ax.set_title(title or "Each dropped block saves its forward and backward")
        ax.legend(frameon=False, loc="lower right")
        fig.tight_layout()
    return _finish(fig, save)


def _running_mean(samples):
    return numpy.cumsum(samples, axis=0) / numpy.arange(1, samples.shape[0] + 1).reshape(-1, *[1] * (samples.ndim - 1))


def monte_carlo_convergence(runs: dict, unit=None, save=None):
    """Running mean of a block's training-mode output over many gate draws, against its test output.

    runs: label (e.g. the scale rule) -> (draws, test_output): ``draws`` of shape (n, ...) holds n
    training-mode outputs (each with its own gate), ``test_output`` the evaluation-mode output.
    unit: the index (a tuple into one output) to follow; default: per label, the unit whose draws
    vary most. One panel per label: the running mean after n draws, the test output, and the band
    test output ± 2 sigma / sqrt(n) (sigma: the standard deviation of the single draws), inside
    which the running mean stays about 95% of the time if the test output is its expectation.
    """
    labels = list(runs)
    with _figure((6.2 * len(labels) + 0.6, 4.8), 1, len(labels), squeeze=False) as (fig, axes):
        for k, label in enumerate(labels):
            ax = axes[0, k]
            draws, test_output = runs[label]
            draws = numpy.asarray(backend.to_numpy(draws), dtype=float)
            test_output = numpy.asarray(backend.to_numpy(test_output), dtype=float)
            flat = draws.reshape(draws.shape[0], -1)
            index = (int(numpy.argmax(flat.std(axis=0))) if unit is None
                     else int(numpy.ravel_multi_index(unit, test_output.shape)))
            series, target = flat[:, index], float(test_output.reshape(-1)[index])
            sigma = float(series.std(ddof=1))
            n = numpy.arange(1, series.size + 1)
            mean = _running_mean(series)
            ax.fill_between(n, target - 2 * sigma / numpy.sqrt(n), target + 2 * sigma / numpy.sqrt(n),
                            color=KEPT_COLOR, alpha=SEED_BAND_ALPHA, lw=0, label="test output ± 2σ/√n")
            ax.axhline(target, color="black", lw=1.8, ls="--", label=f"test output {target:.3f}")
            ax.plot(n, mean, color=DROPPED_COLOR, lw=2, label="running mean of training outputs")
            z = (mean[-1] - target) / (sigma / math.sqrt(series.size))
            ax.set_xscale("log")
            ax.set_xlabel("gate draws n")
            ax.set_ylabel("output of one unit")
            ax.set_title(f"{label}\nafter {series.size} draws: {z:+.1f} σ/√n from the test output", fontsize=13)
            spread = 4 * sigma / math.sqrt(10)
            ax.set_ylim(target - spread, target + spread)
            ax.legend(frameon=False, loc="upper right", fontsize=10)
        fig.tight_layout()
    return _finish(fig, save)


def branch_gradient_norms(model, save=None):
    """After one training backward: the norm of each block's branch-parameter gradient, one bar
    per block; blocks dropped in that step are marked (their bars are exactly zero)."""
    norms, dropped = [], []
    for block in model.blocks:
        total = 0.0
        for _, g in block.branch.named_grads():
            g64 = numpy.asarray(backend.to_numpy(g), dtype=numpy.float64)
            total += float((g64 * g64).sum())
        norms.append(math.sqrt(total))
        dropped.append(block.gate is not None and not numpy.any(block.gate))
    norms, dropped = numpy.asarray(norms), numpy.asarray(dropped, dtype=bool)
    blocks = numpy.arange(len(norms))
    with _figure((max(9.0, 0.32 * len(norms) + 3), 4.8)) as (fig, ax):
        ax.bar(blocks[~dropped], norms[~dropped], color=KEPT_COLOR, width=0.75, label="kept: branch ran")
        top = float(norms.max()) if norms.size else 1.0
        if dropped.any():
            ax.plot(blocks[dropped], numpy.zeros(int(dropped.sum())), "x", color=DROPPED_COLOR, ms=13, mew=3,
                    clip_on=False, zorder=5, label="dropped: gradient exactly 0")
            for b in blocks[dropped]:
                ax.axvspan(b - 0.4, b + 0.4, color=DROPPED_COLOR, alpha=0.12, lw=0)
        ax.set_xlabel("residual block (0 = next to the stem)")
        ax.set_ylabel("‖∂L/∂θ‖ of the branch's parameters")
        ax.set_title(f"Gradient of each block's branch after one step ({int(dropped.sum())} of {len(norms)} dropped)")
        ax.set_xlim(-0.7, len(norms) - 0.3)
        ax.set_ylim(0, top * 1.3 if top > 0 else 1)
        ax.legend(frameon=False, loc="upper right", ncol=2)
        fig.tight_layout()
    return _finish(fig, save)


def survival_sweep(results: dict, reference: float | None = None, ylabel: str = "test error (%)", title=None,
                   save=None):
    """A value (test error, say) against p_L, one line per survival rule (the paper's Figure 6).

    results: rule label -> {p_L: list of values, one per seed}. The line joins the means; single
    seeds are dots. reference: a horizontal dashed line (e.g. constant depth's mean), optional.
    """
    with _figure((9, 5)) as (fig, ax):
        for k, (label, points) in enumerate(results.items()):
            color = RUN_COLORS[(k + 1) % len(RUN_COLORS)]
            p_values = sorted(points)
            means = [float(numpy.mean(points[p])) for p in p_values]
            ax.plot(p_values, means, "-o", color=color, lw=2.2, ms=7, label=f"{label} (mean of the seeds run)")
            for p in p_values:
                values = numpy.asarray(points[p], dtype=float)
                ax.plot(numpy.full(values.size, p), values, ".", color=color, ms=10, alpha=0.45)
        if reference is not None:
            ax.axhline(reference, color=CONSTANT_COLOR, lw=1.5, ls="--", label=f"constant depth: {reference:.2f}")
        ax.set_xlabel("$p_L$, survival probability of the last block (1 = constant depth)")
        ax.set_ylabel(ylabel)
        ax.set_title(title or f"{ylabel[0].upper() + ylabel[1:]} against $p_L$ (dots: single seeds)")
        ax.set_ylim(bottom=0)
        ax.legend(frameon=False, loc="best")
        fig.tight_layout()
    return _finish(fig, save)
