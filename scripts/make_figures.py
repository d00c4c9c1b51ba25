"""Draw the figures in docs/ (the README's picture): python scripts/make_figures.py

docs/gradient_flow.png: ResNet-110 at initialisation on 32 digits, constant depth vs stochastic
depth (linear decay to p_L = 0.5), same weights and batch; one traced training step each (three
for stochastic depth, each with its own gates).
"""
from __future__ import annotations

import os
import sys

import matplotlib

matplotlib.use("Agg")

from minisd import backend, data, functional as F, models, plots, trace  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def traced_step(model, x, labels):
    with trace.record(model) as t:
        _, cache = F.softmax_cross_entropy_forward(model(x), labels)
        model.zero_grad()
        model.backward(F.softmax_cross_entropy_backward(1.0, cache))
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


def main() -> int:
    out = os.path.join(ROOT, "docs", "gradient_flow.png")
    print("wrote", gradient_flow(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
