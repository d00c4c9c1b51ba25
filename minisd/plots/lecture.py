"""Lecture figures: the survival schedules, which blocks ran, how the gradient flows, training
curves, and what the convolutions learned. Each returns the Figure and, given ``save="path.png"``,
also writes a PNG (150 dpi); fonts are sized for a projector.

* :func:`survival_schedules`  p_l per block for linear decay and uniform, with the expected depth
* :func:`gate_activity`       which blocks ran at each training step (blocks x steps)
* :func:`gradient_flow`       gradient norm at each block's input for one step, dropped blocks marked,
                              and the gradient that reaches the stem, constant vs stochastic depth
* :func:`stem_gradient_vs_active_blocks`  the gradient at the stem against the number of blocks
                              that ran, over many sampled gate patterns, with a fitted line
* :func:`training_curves`     loss, accuracy and time per epoch of runs side by side (metrics.jsonl)
* :func:`conv_filters`        the kernels of a convolution
* :func:`feature_maps`        what a few layers of a model make of one image
"""
from __future__ import annotations

import math
import os

import numpy

from minisd import backend
from minisd.plots.figure import (CONSTANT_COLOR, DROPPED_COLOR, KEPT_COLOR, RUN_COLORS, bare_axes,
                                 lecture_figure, save_figure)
from minisd.plots.runs import column, records_of

__all__ = ["survival_schedules", "gate_activity", "gradient_flow", "gradient_flow_data", "fit_line",
           "stem_gradient_vs_active_blocks", "training_curves",
           "conv_filters", "feature_maps", "default_feature_layers"]

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
    with lecture_figure((12, 4.5), 1, 2, gridspec_kw={"width_ratios": [1.1, 1]}) as (fig, (ax, ax2)):
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
    return save_figure(fig, save)


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
    with lecture_figure((12, 0.16 * num_blocks + 3.2), 1, 2, sharey=True,
                        gridspec_kw={"width_ratios": [4, 1]}) as (fig, (ax, ax2)):
        from matplotlib.colors import LinearSegmentedColormap  # noqa: PLC0415
        from matplotlib.patches import Patch  # noqa: PLC0415

        cmap = LinearSegmentedColormap.from_list("gates", ["#F4D8C8", KEPT_COLOR])
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
    return save_figure(fig, save)


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
    with lecture_figure((13, 4.8), 1, 2, gridspec_kw={"width_ratios": [2.6, 1]}) as (fig, (ax, ax2)):
        from matplotlib.lines import Line2D  # noqa: PLC0415

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
    return save_figure(fig, save)


def fit_line(x, y) -> dict:
    """Least-squares line y ≈ intercept + slope * x: {"slope", "intercept", "r2", "points"}
    (r2: the share of y's variance the line accounts for)."""
    x = numpy.asarray(x, dtype=float)
    y = numpy.asarray(y, dtype=float)
    if x.shape != y.shape or x.size < 2 or numpy.ptp(x) == 0:
        raise ValueError(f"fit_line: expected two equal-length sequences of >= 2 numbers with x not all equal, "
                         f"got shapes {x.shape} and {y.shape}")
    slope, intercept = numpy.polyfit(x, y, 1)
    residual = y - (intercept + slope * x)
    total = ((y - y.mean()) ** 2).sum()
    r2 = 1.0 - (residual ** 2).sum() / total if total > 0 else 1.0
    return {"slope": float(slope), "intercept": float(intercept), "r2": float(r2), "points": int(x.size)}


def stem_gradient_vs_active_blocks(active_blocks, stem_norms, num_blocks: int, expected_active: float | None = None,
                                   title: str | None = None, save=None):
    """The gradient that reaches the stem in one training step, against the number of residual
    blocks that ran in it (one point per sampled gate pattern), with a least-squares line.

    active_blocks, stem_norms: one entry per step (the L2 norm of the gradient at the first block's
    input, as :func:`gradient_flow_data` gives it). Points at 0 blocks (every branch dropped: the
    shortcuts only) and at ``num_blocks`` (constant depth) are marked; with ``expected_active`` (the
    schedule's sum of p_l) the line's value there is marked too.
    """
    k = numpy.asarray(active_blocks, dtype=float)
    g = numpy.asarray(stem_norms, dtype=float)
    fit = fit_line(k, g)
    jitter = numpy.random.default_rng(0).uniform(-0.2, 0.2, k.size)  # see overlapping points
    with lecture_figure((10, 5.6)) as (fig, ax):
        ax.plot(k + jitter, g, "o", color=KEPT_COLOR, alpha=0.55, ms=6, mew=0,
                label=f"{k.size} steps, each with its own gates")
        line = numpy.array([0.0, float(num_blocks)])
        ax.plot(line, fit["intercept"] + fit["slope"] * line, "-", color="black", lw=2.2,
                label=f"fit: {fit['intercept']:.3f} + {fit['slope']:.4f} per block ($R^2$ = {fit['r2']:.3f})")
        for count, marker, color, what in ((0, "v", DROPPED_COLOR, "every branch dropped (shortcuts only)"),
                                           (num_blocks, "s", CONSTANT_COLOR, "every block runs (constant depth)")):
            at = k == count
            if at.any():
                ax.plot([count], [float(g[at].mean())], marker, color=color, ms=11, zorder=5, label=what)
        if expected_active is not None:
            ax.plot([expected_active], [fit["intercept"] + fit["slope"] * expected_active], "D", color=RUN_COLORS[2],
                    ms=11, zorder=5, label=f"the line at the schedule's E[blocks] = {expected_active:.1f}")
        ax.set_xlim(-1, num_blocks + 1)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("residual blocks that ran in the step")
        ax.set_ylabel("‖gradient‖ at the stem (L2 norm)")
        ax.set_title(title or "Every block that runs adds to the gradient that reaches the stem")
        ax.legend(frameon=False, loc="upper left", fontsize=11)
        fig.tight_layout()
    return save_figure(fig, save)


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



def training_curves(runs, save=None):
    """Loss, accuracy and time per epoch of several runs, side by side.

    runs: label -> run directory (or its metrics.jsonl, or the list of its epoch records); a list of
    paths uses the directory names as labels. Training values are solid lines, validation values
    dashed; the loss on a logarithmic axis.
    """
    if not isinstance(runs, dict):
        runs = {os.path.basename(os.path.normpath(os.fspath(r))): r for r in runs}
    data = {label: records_of(r) for label, r in runs.items()}
    with lecture_figure((15, 4.5), 1, 3) as (fig, axes):
        ax_loss, ax_acc, ax_time = axes
        bar_width = 0.8 / max(1, len(data))
        for k, (label, m) in enumerate(data.items()):
            color = RUN_COLORS[k % len(RUN_COLORS)]
            epochs = column(m, "epoch")
            for ax, key in ((ax_loss, "loss"), (ax_acc, "acc")):
                for split, ls in (("train", "-"), ("val", "--")):
                    values = column(m, f"{split}_{key}")
                    if numpy.isfinite(values).any():
                        ax.plot(epochs, values, ls, color=color, lw=2, marker="o", ms=4,
                                label=f"{label}, {'training' if split == 'train' else 'validation'}")
            seconds = column(m, "time_s")
            if numpy.isfinite(seconds).any():
                mean = float(numpy.nanmean(seconds))
                active = column(m, "active_fraction")
                note = (f", {numpy.nanmean(active):.0%} of branches ran" if active.size and numpy.isfinite(active).any()
                        else "")
                ax_time.bar(epochs + (k - (len(data) - 1) / 2) * bar_width, seconds, width=bar_width,
                            color=color, alpha=0.8, label=f"{label}: {mean:.2f} s/epoch{note}")
        ax_loss.set_ylabel("cross-entropy loss (log scale)")
        ax_loss.set_yscale("log")  # a loss falls over decades; one early spike must not flatten the rest
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
    return save_figure(fig, save)



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
    with lecture_figure((1.3 * cols + 1.2, 1.3 * rows + 1.0), rows, cols, squeeze=False) as (fig, axes):
        if colour:
            lo, hi = weight.min(), weight.max()
            what = "RGB (min-max scaled)"
        else:
            channel = 0 if input_channel is None else int(input_channel)
            limit = numpy.abs(weight[:, channel]).max() or 1.0
            what = f"input channel {channel}" if in_ch > 1 else "one input channel"
        image = None
        for k, ax in enumerate(axes.flat):
            bare_axes(ax)
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
    return save_figure(fig, save)


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
    # Columns: the input image, a narrow column for the layer names, then the maps.
    with lecture_figure((1.25 * channels + 2.3, 1.3 * len(layers) + 0.9), len(layers), channels + 2,
                        squeeze=False, gridspec_kw={"width_ratios": [1, 0.75] + [1] * channels}) as (fig, axes):
        for row, name in enumerate(layers):
            a = maps[name]
            ax0, label_ax = axes[row, 0], axes[row, 1]
            bare_axes(ax0)
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
                bare_axes(ax)
                if c < a.shape[0]:
                    ax.imshow(a[c], cmap="magma", interpolation="nearest")
                    if row == 0:
                        ax.set_title(f"channel {c}", fontsize=10)
                else:
                    ax.axis("off")
        fig.suptitle("Feature maps of one image (evaluation mode; bright = large activation)", fontsize=14)
        fig.subplots_adjust(left=0.03, right=0.99, top=0.86 if len(layers) < 4 else 0.9, bottom=0.02,
                            wspace=0.08, hspace=0.15)
    return save_figure(fig, save)
