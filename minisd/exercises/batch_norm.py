"""Exercise 3: the batch-norm backward in training mode."""
from __future__ import annotations

import numpy

from minisd import functional as F
from minisd import layers
from minisd.exercises._grading import compare, dy_unchanged, graded_call, numeric, tier_functions
from minisd.exercises._report import Report, StudentError, as_array, as_tuple, host

BN_SETTINGS = [(4, 3, 5, 5), (2, 5, 3, 4), (8, 2, 1, 1)]

# Hints name the mistake, never the formula (the exercise is to derive it).
EVALUATION_MODE = ("this is dx with the mean and variance held fixed (evaluation mode). In training both are "
                   "computed from this batch's x, so x also reaches y through them: two more paths to differentiate")
NO_VARIANCE_PATH = "the path through the variance is missing: the variance is computed from x too"
NO_MEAN_PATH = "the path through the mean is missing: the mean is computed from x, so it carries gradient too"
NO_GAMMA = "gamma is missing: y = gamma * x_hat + beta, so the gradient reaching x_hat is scaled by gamma"
FIRST_SAMPLE = "yours sums the first sample only: sum over the batch too"
MEAN_NOT_SUM = "yours is a mean: a parameter's gradient adds the shares of every position it touched"


def check_batch_norm_backward(batch_norm_backward) -> Report:
    """Check ``batch_norm_backward(dy, x, gamma, eps) -> (dx, dgamma, dbeta)`` in training mode.

    The forward: per channel c, mean and (biased) variance over (N, H, W), x_hat = (x - mean) /
    sqrt(var + eps), y = gamma[c] * x_hat + beta[c]. x, dy: (N, C, H, W); gamma: (C,). While it
    runs, minisd's batch_norm_backward (both tiers) and BatchNorm2d.backward are unavailable.
    """
    report = Report("batch_norm_backward")
    call = "batch_norm_backward(dy, x, gamma, eps)"
    functions = {"batch_norm_backward": tier_functions("batch_norm_backward")}
    methods = [(layers.BatchNorm2d, "backward", "BatchNorm2d.backward")]
    rng = numpy.random.default_rng(23)
    eps = 1e-5
    try:
        for shape in BN_SETTINGS:
            channels = shape[1]
            x = rng.standard_normal(shape) * 2.0 + 0.5
            gamma = rng.standard_normal(channels) + 1.0
            beta = rng.standard_normal(channels)
            y, cache = F.batch_norm_forward(x, gamma, beta, training=True, eps=eps)
            dy = numpy.ascontiguousarray(rng.standard_normal(y.shape))
            dx, dgamma, dbeta = (host(g) for g in F.batch_norm_backward(dy.copy(), cache))
            dy_given = dy.copy()
            result = graded_call(batch_norm_backward, "batch_norm_backward", call,
                                 (dy_given, x.copy(), gamma.copy(), eps), functions, methods)
            report.note(f"x {shape}:")
            result = as_tuple(result, "batch_norm_backward", ("dx", "dgamma", "dbeta"))
            mine = [as_array(v, n, s.shape) for v, n, s in zip(result, ("dx", "dgamma", "dbeta"), (dx, dgamma, dbeta))]
            dy_unchanged(report, "batch_norm_backward", dy, dy_given)

            def forward():
                return F.batch_norm_forward(x, gamma, beta, training=True, eps=eps)[0]

            axes = (0, 2, 3)
            inv_std = 1.0 / numpy.sqrt(x.var(axis=axes, keepdims=True) + eps)
            x_hat = (x - x.mean(axis=axes, keepdims=True)) * inv_std
            g = gamma.reshape(1, -1, 1, 1)
            dy_mean = dy.mean(axis=axes, keepdims=True)
            proj = (dy * x_hat).mean(axis=axes, keepdims=True)
            dx_hints = [
                (g * inv_std * dy, EVALUATION_MODE),
                (g * inv_std * (dy - dy_mean), NO_VARIANCE_PATH),
                (g * inv_std * (dy - x_hat * proj), NO_MEAN_PATH),
                (inv_std * (dy - dy_mean - x_hat * proj), NO_GAMMA),
            ]
            sum_hints = [(host((dy * x_hat)[0].sum(axis=(1, 2))), FIRST_SAMPLE),
                         (host(dy[0].sum(axis=(1, 2))), FIRST_SAMPLE),
                         (host(dy.mean(axis=axes)), MEAN_NOT_SUM),
                         (host((dy * x_hat).mean(axis=axes)), MEAN_NOT_SUM)]
            compare(report, "dx", mine[0], dx, dx_hints, numeric=numeric(forward, x, dy, rng))
            compare(report, "dgamma", mine[1], dgamma, sum_hints, numeric=numeric(forward, gamma, dy, rng))
            compare(report, "dbeta", mine[2], dbeta, sum_hints, numeric=numeric(forward, beta, dy, rng))
    except StudentError as problem:
        report.stop(str(problem))
    return report
