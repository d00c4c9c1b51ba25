"""Draw the figures in docs/ (the README's pictures): python scripts/make_figures.py

docs/gradient_flow.png: ResNet-110 at initialisation on 32 digits, constant depth vs stochastic
depth (linear decay to p_L = 0.5), same weights and batch; one traced training step each (three
for stochastic depth, each with its own gates). A few seconds.

docs/gradient_magnitude.png: the paper's Figure 8 on the digits: the mean absolute gradient of the
first convolution's weight per epoch (``first_conv_grad`` in metrics.jsonl), ResNet-110, constant
depth vs linear decay to p_L = 0.5, three seeds of 30 epochs each at lr 0.025 (the paper's 0.1 for
batches of 128, scaled to batches of 32): the stored runs that notebook 8 reads (--runs, default
experiments/runs, made by scripts/run_experiments.py). Nothing is trained.

    python scripts/make_figures.py                          # both
    python scripts/make_figures.py gradient_flow            # only the quick one
"""
from __future__ import annotations

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")

from minisd import backend, data, experiments, models, plots, trace  # noqa: E402
from minisd.training import train_step  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES = ("gradient_flow", "gradient_magnitude")


def traced_step(model, x, labels):
    with trace.record(model) as t:
        train_step(model, x, labels)
    return t


def gradient_flow(path, depth=110, batch=32, seed=0):
    backend.seed(seed)
    digits = data.load_digits()
    x, labels = digits.train.x[:batch], digits.train.y[:batch]
    constant = models.resnet_cifar(depth=depth, in_channels=1, schedule="none", seed=seed)
    stochastic = models.resnet_cifar(depth=depth, in_channels=1, schedule="linear", final_survival=0.5, seed=seed)
    runs = {"constant depth": [traced_step(constant, x, labels)],
            "stochastic depth (linear, p_L = 0.5)": [traced_step(stochastic, x, labels) for _ in range(3)]}
    fig = plots.gradient_flow(runs, save=path)
    fig.suptitle(f"ResNet-{depth} at initialisation, {batch} handwritten digits", fontsize=14, y=1.02)
    fig.savefig(path, dpi=150, bbox_inches="tight", facecolor="white")
    return path


def gradient_magnitude(path, runs_dir, depth=110, epochs=30):
    stored = experiments.load_runs(runs_dir)
    runs = {label: [r.metrics for r in experiments.select(stored, depth=depth, schedule=schedule, final_survival=p,
                                                          epochs=epochs, train_subset=None, warmup_epochs=0)]
            for label, schedule, p in (("constant depth", "none", 1.0),
                                       ("stochastic depth (linear, p_L = 0.5)", "linear", 0.5))}
    if not all(runs.values()):
        raise SystemExit(f"make_figures: no stored ResNet-{depth} runs of {epochs} epochs in {runs_dir}")
    seeds = len(runs["constant depth"])
    fig = plots.gradient_magnitude(runs)
    fig.suptitle(f"ResNet-{depth} trained on the digits ({seeds} seeds, {epochs} epochs): mean |gradient| "
                 "at the first convolution", fontsize=14)
    fig.savefig(path, dpi=150, bbox_inches="tight", facecolor="white")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("figures", nargs="*", help=f"which figures (default: all of {', '.join(FIGURES)})")
    parser.add_argument("--runs", default=os.path.join(ROOT, "experiments", "runs"),
                        help="the stored runs behind docs/gradient_magnitude.png (default experiments/runs)")
    args = parser.parse_args(argv)
    unknown = [f for f in args.figures if f not in FIGURES]
    if unknown:
        parser.error(f"unknown figure {unknown[0]!r}; expected one of {', '.join(FIGURES)}")
    chosen = args.figures or list(FIGURES)
    docs = os.path.join(ROOT, "docs")
    if "gradient_flow" in chosen:
        print("wrote", gradient_flow(os.path.join(docs, "gradient_flow.png")))
    if "gradient_magnitude" in chosen:
        print("wrote", gradient_magnitude(os.path.join(docs, "gradient_magnitude.png"), args.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
