"""Exercises 1 and 2: im2col and col2im (with the adjoint test), then the convolution backward."""
from __future__ import annotations

import numpy

from minisd import functional as F
from minisd import layers
from minisd.exercises._grading import compare, dy_unchanged, graded_call, numeric, tier_functions
from minisd.exercises._report import Report, StudentError, as_array, as_tuple, host

IM2COL_SETTINGS = [
    # (x shape, kernel, stride, padding)
    ((2, 3, 5, 5), (3, 3), 1, 1),
    ((1, 2, 7, 6), (3, 2), 2, 0),
    ((2, 1, 6, 5), (2, 3), 2, 1),
]


def _unfolding_unavailable():
    """What the student must not call in exercise 1: minisd's im2col and col2im, and every convolution
    that would unfold for them (on both tiers, and the layer)."""
    return ({"im2col": tier_functions("im2col"), "col2im": tier_functions("col2im"),
             "conv2d_forward": tier_functions("conv2d_forward"), "conv2d_backward": tier_functions("conv2d_backward")},
            [(layers.Conv2d, "forward", "Conv2d.forward"), (layers.Conv2d, "backward", "Conv2d.backward")])


def _col2im_overwriting(cols, x_shape, kernel, stride, padding):
    """col2im with ``=`` where ``+=`` belongs: a pixel in several windows keeps the last one only."""
    n, c, h, w = x_shape
    kh, kw = kernel
    ho, wo = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    padded = numpy.zeros((n, c, h + 2 * padding, w + 2 * padding))
    blocks = cols.reshape(c, kh, kw, n, ho, wo)
    for i in range(kh):
        for j in range(kw):
            padded[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride] = blocks[:, i, j].transpose(1, 0, 2, 3)
    return padded[:, :, padding:padding + h, padding:padding + w]


def check_im2col(im2col, col2im) -> Report:
    """Check ``im2col(x, kernel_size, stride, padding) -> cols`` and ``col2im(cols, x_shape,
    kernel_size, stride, padding) -> dx``.

    x: (N, C, H, W), kernel_size (kh, kw) -> cols: (C*kh*kw, N*Ho*Wo), row (c, i, j), column (n, ho, wo),
    as minisd's ``F.im2col``. col2im is its adjoint: <im2col(x), c> = <x, col2im(c)> for every x and c,
    so col2im(c) is the gradient of sum(im2col(x) * c) with respect to x (checked with finite differences).
    """
    report = Report("im2col and col2im")
    functions, methods = _unfolding_unavailable()
    rng = numpy.random.default_rng(7)
    try:
        for x_shape, kernel, stride, padding in IM2COL_SETTINGS:
            report.note(f"x {x_shape}, kernel {kernel}, stride {stride}, padding {padding}:")
            x = rng.standard_normal(x_shape)
            cols = F.im2col(x, kernel, stride, padding)
            c = rng.standard_normal(cols.shape)
            dx = F.col2im(c, x_shape, kernel, stride, padding)
            given = x.copy()
            mine_cols = as_array(graded_call(im2col, "im2col", "im2col(x, kernel_size, stride, padding)",
                                             (given, kernel, stride, padding), functions, methods), "cols", cols.shape)
            transposed = cols.T if mine_cols.shape == cols.T.shape else None
            window_major = (cols.reshape(-1, x_shape[0], cols.shape[1] // x_shape[0]).transpose(0, 2, 1)
                            .reshape(cols.shape))
            compare(report, "cols", mine_cols, cols, [
                (transposed, "one ROW per window: im2col gives one COLUMN per window (shape (C*kh*kw, N*Ho*Wo))"),
                (window_major if x_shape[0] > 1 else None,
                 "the columns are in (ho, wo, n) order: they must be in (n, ho, wo) order, image by image"),
            ], label="im2col")
            mine_dx = as_array(graded_call(col2im, "col2im", "col2im(cols, x_shape, kernel_size, stride, padding)",
                                           (c.copy(), x_shape, kernel, stride, padding), functions, methods),
                               "dx", x_shape)
            x_fd = x.copy()
            fd = numeric(lambda: F.im2col(x_fd, kernel, stride, padding), x_fd, c, rng)
            compare(report, "dx", mine_dx, dx, [
                (_col2im_overwriting(c, x_shape, kernel, stride, padding),
                 "a pixel that sits in several windows must receive the SUM of their values: yours keeps only "
                 "the last window's (= where += belongs)"),
            ], numeric=fd, label="col2im")
            if mine_cols.shape == cols.shape and mine_dx.shape == dx.shape:
                left, right = float(numpy.sum(mine_cols * c)), float(numpy.sum(x * mine_dx))
                ok = abs(left - right) <= 1e-9 * max(abs(left), abs(right), 1.0)
                report.add(ok, f"adjoint test: <im2col(x), c> = {left:.6g}, <x, col2im(c)> = {right:.6g}",
                           [] if ok else ["col2im must undo the bookkeeping of im2col exactly (the same windows, "
                                          "the same order): the two numbers must agree"])
    except StudentError as problem:
        report.stop(str(problem))
    return report


CONV_SETTINGS = [
    # (x shape, weight shape, stride, padding)
    ((2, 3, 5, 5), (4, 3, 3, 3), 1, 1),
    ((3, 2, 7, 6), (5, 2, 3, 2), 2, 0),
    ((2, 4, 6, 6), (4, 4, 3, 3), 1, 1),   # as many outputs as inputs: a swapped weight transpose fits
]


def check_conv_backward(conv_backward) -> Report:
    """Check ``conv_backward(dy, x, weight, stride, padding) -> (dx, dweight, dbias)``.

    The forward is minisd's ``F.conv2d_forward(x, weight, bias, stride, padding)`` (a
    cross-correlation with a bias per output channel). x: (N, C, H, W), weight: (O, C, kh, kw),
    dy: (N, O, Ho, Wo); dbias: (O,). While it runs, minisd's conv2d_backward (both tiers) and
    Conv2d.backward are unavailable; im2col and col2im are the building blocks to use.
    """
    report = Report("conv_backward")
    call = "conv_backward(dy, x, weight, stride, padding)"
    functions = {"conv2d_backward": tier_functions("conv2d_backward")}
    methods = [(layers.Conv2d, "backward", "Conv2d.backward")]
    rng = numpy.random.default_rng(13)
    try:
        for x_shape, w_shape, stride, padding in CONV_SETTINGS:
            x = rng.standard_normal(x_shape)
            weight = rng.standard_normal(w_shape)
            bias = rng.standard_normal(w_shape[0])
            y, cache = F.conv2d_forward(x, weight, bias, stride, padding)
            dy = numpy.ascontiguousarray(rng.standard_normal(y.shape))
            dx, dweight, dbias = (host(g) for g in F.conv2d_backward(dy.copy(), cache))
            o, c, kh, kw = w_shape
            n = x_shape[0]
            # What common mistakes give, computed from the correct per-sample shares (before the call:
            # minisd's own backward is unavailable while the student's function runs).
            shares = [host(F.conv2d_backward(numpy.where(numpy.arange(n)[:, None, None, None] == k, dy, 0.0),
                                             F.conv2d_forward(x, weight, bias, stride, padding)[1])[1])
                      for k in range(n)]
            dy_given = dy.copy()
            result = graded_call(conv_backward, "conv_backward", call, (dy_given, x.copy(), weight.copy(), stride,
                                                                        padding), functions, methods)
            report.note(f"x {x_shape}, weight {w_shape}, stride {stride}, padding {padding}:")
            result = as_tuple(result, "conv_backward", ("dx", "dweight", "dbias"))
            mine = [as_array(v, nm, s.shape) for v, nm, s in zip(result, ("dx", "dweight", "dbias"), (dx, dweight, dbias))]
            dy_unchanged(report, "conv_backward", dy, dy_given)

            def forward():
                return F.conv2d_forward(x, weight, bias, stride, padding)[0]

            weight_hints = [
                (dweight.reshape(o, -1).T.reshape(-1).reshape(w_shape),
                 "your dweight holds the right numbers in the wrong order: it is the transposed (out, in*kh*kw) "
                 "matrix read as (O, C, kh, kw). Let the shapes decide the order of the factors of the product"),
                (dweight.transpose(1, 0, 2, 3) if o == c else None,
                 "your dweight has the input and output channels swapped (a transposed weight gradient): "
                 "dweight[o, c] is the gradient of weight[o, c]"),
                (dweight[:, :, ::-1, ::-1],
                 "your dweight is flipped in both kernel axes: the forward is a cross-correlation "
                 "(no kernel flip), so its weight gradient is not flipped either"),
                (dweight / n, "yours is the correct value divided by the batch size: the weight is shared by all "
                              "samples, its gradient is the SUM of their shares (the loss already took the mean)"),
            ] + [(share, f"yours is the share of sample {k} alone: sum the shares of every sample in the batch "
                         "(a loop that overwrites instead of adding, or a missing sum over the batch)")
                 for k, share in enumerate(shares)]
            bias_hints = [(host(dy[0].sum(axis=(1, 2))), "yours sums the first sample only: sum over the batch too"),
                          (host(dy.mean(axis=(0, 2, 3))), "yours is a mean: the bias gradient is the sum over "
                                                          "the batch and every output position")]
            compare(report, "dx", mine[0], dx, numeric=numeric(forward, x, dy, rng))
            compare(report, "dweight", mine[1], dweight, weight_hints, numeric=numeric(forward, weight, dy, rng))
            compare(report, "dbias", mine[2], dbias, bias_hints, numeric=numeric(forward, bias, dy, rng))
    except StudentError as problem:
        report.stop(str(problem))
    return report
