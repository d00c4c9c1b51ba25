"""The paper's figures, drawn from minisd's own runs and measurements.

* :func:`gradient_magnitude`          mean |gradient| at the first conv per epoch, over seeds (Figure 8)
* :func:`test_error_curves`           test error and training loss per epoch, mean and spread over seeds
* :func:`step_time_vs_active_blocks`  step time against the number of blocks that ran, with a fit
* :func:`monte_carlo_convergence`     training outputs averaged over gate draws vs the test output
* :func:`branch_gradient_norms`       each block's branch gradient after one step, dropped blocks marked
* :func:`survival_sweep`              test error against p_L for the survival rules (the paper's Figure 6)
* :func:`training_time`               wall-clock time of whole training runs, split into steps and the rest
* :func:`paired_seeds`                one value per seed for two configurations, each seed's pair joined

Runs are given as label -> one run or several (one per seed): run folders, their metrics.jsonl, or
lists of epoch records (:mod:`minisd.plots.runs`). Lines are means over seeds, bands the lowest to
the highest seed.
"""
from __future__ import annotations

import math

import numpy

from minisd import backend
from minisd.plots.figure import (CONSTANT_COLOR, DROPPED_COLOR, KEPT_COLOR, RUN_COLORS, lecture_figure,
                                 save_figure)
from minisd.plots.runs import block_matrix, lr_drops, seed_matrix, seed_note, seed_runs

__all__ = ["gradient_magnitude", "first_conv_gradient", "block_gradient_map", "test_error_curves", "fit_step_time", "step_time_vs_active_blocks",
           "monte_carlo_convergence", "branch_gradient_norms", "survival_sweep",
           "training_time", "paired_seeds"]

SEED_BAND_ALPHA = 0.2


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




PER = {None: ("mean |∂L/∂W| of the first conv layer", "Gradient magnitude at the first convolution"),
       "loss": ("first conv's mean |∂L/∂W| ÷ training loss", "Per unit of training loss"),
       "last_block": ("first conv's mean |∂L/∂W| ÷ last block's", "Relative to the last block's gradient")}


def first_conv_gradient(runs, per: str | None = None):
    """(epochs, values[seed, epoch]) of the first convolution's mean |gradient| per epoch, divided
    seed by seed and epoch by epoch by the epoch's training loss (``per="loss"``) or by the last
    residual block's mean |gradient| (``per="last_block"``: the gradient near the output, over the
    steps where that block ran), or as logged (None)."""
    if per not in PER:
        raise ValueError(f"first_conv_gradient: per must be one of {list(PER)}, got {per!r}")
    epochs, values = seed_matrix(runs, "first_conv_grad")
    if per == "loss":
        values = values / seed_matrix(runs, "train_loss")[1]
    elif per == "last_block":
        values = values / block_matrix(runs)[1][:, :, -1]
    return epochs, values


def gradient_magnitude(runs: dict, reference: str | None = None, log_scale: bool = True, per: str | None = None,
                       save=None):
    """The paper's Figure 8: mean |gradient| at the first convolution over training.

    runs: label -> the runs of one configuration, one per seed (run folders, or their record
    lists); the records need ``first_conv_grad`` (written by ``minisd.training``). Left: the
    epoch's mean absolute gradient of the stem convolution's weight, mean over seeds with the
    spread as a band (``per``: divided by the epoch's training loss, "loss", or by the last
    block's gradient, "last_block", see :func:`first_conv_gradient`). Right: each configuration's
    mean divided by the reference's (default: the first label), so "larger with stochastic depth"
    reads as a line above 1.
    """
    labels = list(runs)
    reference = labels[0] if reference is None else reference
    curves = {label: first_conv_gradient(runs[label], per) for label in labels}
    drops = lr_drops(runs)
    with lecture_figure((14, 5.2), 1, 2, gridspec_kw={"width_ratios": [1.35, 1]}) as (fig, (ax, ax2)):
        means = {}
        for k, label in enumerate(labels):
            epochs, values = curves[label]
            means[label] = (epochs, _mean_and_band(ax, epochs, values, RUN_COLORS[k % len(RUN_COLORS)], label))
        _mark_lr_drops(ax, drops)
        if log_scale:
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel(PER[per][0])
        ax.set_title(PER[per][1])
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
        fig.suptitle(f"Mean gradient magnitude per epoch ({seed_note(runs)})", fontsize=14)
        fig.tight_layout()
    return save_figure(fig, save)


def block_gradient_map(runs: dict, save=None):
    """Each residual block's branch gradient over training: one picture per configuration, blocks
    l = 1..L (rows, l = 1 next to the stem) by epochs (columns), the mean over seeds of the logged
    ``block_grad`` (mean |gradient| of the block's branch parameters over the steps where it ran),
    all on one logarithmic colour scale so the configurations compare square by square.

    runs: label -> the runs of one configuration, one per seed (as :func:`gradient_magnitude`).
    """
    import warnings  # noqa: PLC0415
    from matplotlib.colors import LogNorm  # noqa: PLC0415

    maps = {}
    for label, value in runs.items():
        epochs, values = block_matrix(value)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a block no seed ran in an epoch stays NaN
            maps[label] = (epochs, numpy.nanmean(values, axis=0).T)   # (blocks, epochs)
    finite = numpy.concatenate([m[numpy.isfinite(m) & (m > 0)] for _, m in maps.values()])
    if not finite.size:
        raise ValueError("block_gradient_map: the runs hold no block_grad values")
    norm = LogNorm(vmin=float(finite.min()), vmax=float(finite.max()))
    n = len(maps)
    blocks = max(m.shape[0] for _, m in maps.values())
    with lecture_figure((6.0 * n + 1.6, max(4.8, 0.09 * blocks + 3.0)), 1, n, squeeze=False, sharey=True) as (fig, axes):
        image = None
        for ax, (label, (epochs, matrix)) in zip(axes[0], maps.items()):
            image = ax.imshow(matrix, aspect="auto", origin="lower", norm=norm, cmap="viridis", interpolation="nearest",
                              extent=(epochs[0] - 0.5, epochs[-1] + 0.5, 0.5, matrix.shape[0] + 0.5))
            ax.set_title(label)
            ax.set_xlabel("epoch")
            ax.xaxis.get_major_locator().set_params(integer=True)
        axes[0][0].set_ylabel("residual block $l$ (1 = next to the stem)")
        bar = fig.colorbar(image, ax=list(axes[0]), fraction=0.03, pad=0.02)
        bar.set_label("mean |∂L/∂θ| of the block's branch (log scale)")
        counts = sorted({len(seed_runs(value)) for value in runs.values()})
        seeds = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        fig.suptitle(f"Gradient of each block's branch over training (mean over {seeds} seeds)", fontsize=14)
    return save_figure(fig, save)


def test_error_curves(runs: dict, log_scale: bool = True, save=None):
    """Test error and training loss per epoch of several configurations, each over seeds.

    runs: label -> the runs of one configuration, one per seed (run folders or record lists; the
    records need ``test_acc`` and ``train_loss``). Left: test error in percent (the model after
    each epoch, as the paper plots it); the legend gives the last epoch's mean and standard
    deviation over seeds. Right: training loss. Both on log scales by default, so the first
    epochs (or one spike) do not flatten the differences of a few tenths of a percent at the end.
    """
    labels = list(runs)
    drops = lr_drops(runs)
    with lecture_figure((14, 5.2), 1, 2) as (fig, (ax, ax2)):
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
        ax.legend(frameon=False, loc="best", fontsize=10)
        if log_scale:
            ax2.set_yscale("log")
        ax2.set_ylabel("training loss (cross-entropy)")
        ax2.set_title("Training loss" + (" (log scale)" if log_scale else ""))
        ax2.legend(frameon=False, loc="best", fontsize=10)
        fig.suptitle(f"Test error and training loss ({seed_note(runs)})", fontsize=14)
        fig.tight_layout()
    return save_figure(fig, save)


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
    with lecture_figure((11, 5.6)) as (fig, ax):
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
    return save_figure(fig, save)


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
    with lecture_figure((6.2 * len(labels) + 0.6, 4.8), 1, len(labels), squeeze=False) as (fig, axes):
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
            ax.legend(frameon=False, loc="best", fontsize=10)
        fig.tight_layout()
    return save_figure(fig, save)


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
    blocks = numpy.arange(1, len(norms) + 1)  # l = 1..L, as in the paper
    with lecture_figure((max(9.0, 0.32 * len(norms) + 3), 4.8)) as (fig, ax):
        ax.bar(blocks[~dropped], norms[~dropped], color=KEPT_COLOR, width=0.75, label="kept: branch ran")
        top = float(norms.max()) if norms.size else 1.0
        if dropped.any():
            ax.plot(blocks[dropped], numpy.zeros(int(dropped.sum())), "x", color=DROPPED_COLOR, ms=13, mew=3,
                    clip_on=False, zorder=5, label="dropped: gradient exactly 0")
            for b in blocks[dropped]:
                ax.axvspan(b - 0.4, b + 0.4, color=DROPPED_COLOR, alpha=0.12, lw=0)
        ax.set_xlabel("residual block $l$ (1 = next to the stem)")
        ax.set_ylabel("‖∂L/∂θ‖ of the branch's parameters")
        ax.set_title(f"Gradient of each block's branch after one step ({int(dropped.sum())} of {len(norms)} dropped)")
        ax.set_xlim(0.3, len(norms) + 0.7)
        ax.set_ylim(0, top * 1.3 if top > 0 else 1)
        ax.legend(frameon=False, loc="upper right", ncol=2)
        fig.tight_layout()
    return save_figure(fig, save)


def survival_sweep(results: dict, reference=None, ylabel: str = "test error (%)", title=None, save=None):
    """A value (test error, say) against p_L, one line per survival rule (the paper's Figure 6).

    results: rule label -> {p_L: list of values, one per seed}. The line joins the means, the error
    bars are one sample standard deviation over the seeds (where there are two or more), and the
    dots are the single seeds. reference: constant depth, optional: one number (a dashed line) or
    its values per seed (a dashed line at their mean and a grey band of one standard deviation).
    """
    with lecture_figure((11.5, 5.5)) as (fig, ax):
        p_all = sorted({p for points in results.values() for p in points})
        step = min(numpy.diff(p_all)) if len(p_all) > 1 else 0.1
        for k, (label, points) in enumerate(results.items()):
            color = RUN_COLORS[(k + 1) % len(RUN_COLORS)]
            shift = (k - (len(results) - 1) / 2) * 0.08 * step          # side by side, not on top
            p_values = sorted(points)
            values = [numpy.asarray(points[p], dtype=float) for p in p_values]
            means = [float(v.mean()) for v in values]
            ax.plot(p_values, means, "-o", color=color, lw=2.2, ms=7, label=f"{label}: mean of the seeds")
            spread = [(float(v.std(ddof=1)) if v.size > 1 else 0.0) for v in values]
            ax.errorbar(numpy.add(p_values, shift), means, yerr=spread, fmt="none", ecolor=color, elinewidth=1.6,
                        capsize=5, label=f"{label}: ± 1 sd over seeds")
            for p, v in zip(p_values, values):
                ax.plot(numpy.full(v.size, p + shift), v, ".", color=color, ms=10, alpha=0.5)
        if reference is not None:
            seeds = numpy.atleast_1d(numpy.asarray(reference, dtype=float))
            centre = float(seeds.mean())
            ax.axhline(centre, color=CONSTANT_COLOR, lw=1.5, ls="--", label=f"constant depth: {centre:.2f}"
                       + (f" ± {seeds.std(ddof=1):.2f} ({seeds.size} seeds)" if seeds.size > 1 else ""))
            if seeds.size > 1:
                ax.axhspan(centre - seeds.std(ddof=1), centre + seeds.std(ddof=1), color=CONSTANT_COLOR,
                           alpha=SEED_BAND_ALPHA, lw=0)
        ax.set_xlabel("$p_L$, survival probability of the last block (1 = constant depth)")
        ax.set_ylabel(ylabel)
        ax.set_title(title or f"{ylabel[0].upper() + ylabel[1:]} against $p_L$ (dots: single seeds)")
        ax.set_ylim(bottom=0)
        ax.legend(frameon=False, loc="best")
        fig.tight_layout()
    return save_figure(fig, save)


def training_time(times: dict, title=None, save=None):
    """Wall-clock time of whole training runs, one bar per configuration (the paper's time claim).

    times: label -> {"wall": seconds per seed, "steps": seconds in training steps per seed}. A bar is
    the mean wall time over seeds, split into the training steps (dark) and the rest (light: the
    evaluation after every epoch, checkpoints); the error bar is one sample standard deviation of
    the wall time, the dots the seeds. Each bar after the first is labelled with its saving against
    the first.
    """
    labels = list(times)
    with lecture_figure((11.5, 5.5)) as (fig, ax):
        first = float(numpy.mean(times[labels[0]]["wall"]))
        for k, label in enumerate(labels):
            color = RUN_COLORS[k % len(RUN_COLORS)]
            wall, steps = (numpy.asarray(times[label][key], dtype=float) for key in ("wall", "steps"))
            ax.bar(k, steps.mean(), color=color, width=0.6, label="training steps" if k == 0 else None)
            ax.bar(k, wall.mean() - steps.mean(), bottom=steps.mean(), color=color, alpha=0.35, width=0.6,
                   label="evaluation after each epoch, checkpoints" if k == 0 else None)
            if wall.size > 1:
                ax.errorbar(k, wall.mean(), yerr=wall.std(ddof=1), fmt="none", ecolor="black", capsize=6, lw=1.5)
            ax.plot(numpy.full(wall.size, k + 0.2), wall, "o", color="black", ms=5, alpha=0.6,
                    label="single seeds" if k == 0 else None)
            text = f"{wall.mean():.0f} s" + ("" if k == 0 else f"\n{wall.mean() / first - 1:+.1%}")
            ax.text(k, wall.mean() + (wall.std(ddof=1) if wall.size > 1 else 0) + 0.02 * first, text,
                    ha="center", va="bottom", fontsize=12)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_ylabel("wall-clock time of the run (s)")
        ax.set_ylim(0, 1.25 * max(float(numpy.max(times[label]["wall"])) for label in labels))
        ax.set_title(title or "Time to train, mean over seeds (error bar: ± 1 sd)")
        ax.legend(frameon=False, loc="upper right")
        fig.tight_layout()
    return save_figure(fig, save)


def paired_seeds(values: dict, seeds, ylabel: str = "test error (%)", title=None, save=None):
    """One value per seed for exactly two configurations, each seed's two values joined by a line.

    values: label -> one value per seed, in the order of ``seeds``. A line falling from left to
    right is a seed where the second configuration is lower. The means are drawn as bars.
    """
    (left, right) = list(values)
    a, b = (numpy.asarray(values[label], dtype=float) for label in (left, right))
    if a.shape != b.shape or a.size != len(seeds):
        raise ValueError(f"paired_seeds: expected one value per seed for both labels ({len(seeds)} seeds), "
                         f"got {a.size} and {b.size}")
    with lecture_figure((11, 6)) as (fig, ax):
        for k, label in enumerate((left, right)):
            v = (a, b)[k]
            ax.plot([k - 0.25, k + 0.25], [v.mean(), v.mean()], color=RUN_COLORS[k], lw=4,
                    label=f"{label}: mean {v.mean():.2f}")
        for y0, y1 in zip(a, b):
            color = KEPT_COLOR if y1 < y0 else DROPPED_COLOR
            ax.plot([0, 1], [y0, y1], "-o", color=color, ms=6, lw=1.5, alpha=0.8)
        # Seeds whose right-hand values nearly coincide share one label, so that no two labels overlap.
        close = 0.03 * max(float(numpy.max(a)), float(numpy.max(b)))
        groups = []
        for seed, y1 in sorted(zip(seeds, b), key=lambda pair: pair[1]):
            if groups and y1 - groups[-1][-1][1] < close:
                groups[-1].append((seed, y1))
            else:
                groups.append([(seed, y1)])
        for group in groups:
            names = ", ".join(str(seed) for seed in sorted(seed for seed, _ in group))
            ax.annotate(f"seed{'s' if len(group) > 1 else ''} {names}", (1, numpy.mean([y for _, y in group])),
                        xytext=(8, 0), textcoords="offset points", va="center", fontsize=10)
        ax.plot([], [], "-", color=KEPT_COLOR, label=f"{right} lower for this seed")
        ax.plot([], [], "-", color=DROPPED_COLOR, label=f"{left} lower or equal")
        ax.set_xticks([0, 1], [left, right])
        ax.set_xlim(-0.5, 1.6)
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.set_title(title or f"{len(seeds)} seeds, paired")
        ax.legend(frameon=False, loc="upper left", fontsize=10)
        fig.tight_layout()
    return save_figure(fig, save)
