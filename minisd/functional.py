"""The reference tier: every layer's math as a pair of hand-written functions.

Each operation is a pair::

    out, cache = op_forward(inputs..., options...)
    grads      = op_backward(dout, cache)

``forward`` keeps in ``cache`` what ``backward`` needs; ``backward`` returns the gradient with
respect to each input, in the order the forward took them, and never writes into ``dout``. Each
cache is a named record defined beside its pair (``ConvCache``, ``BatchNormCache``, ...): read a
field by name (``cache.inv_std``) or unpack it as the tuple it is. The fast tier builds the same
records and uses the same geometry helpers (:func:`conv_geometry`), imported from here, so a
forward run on one tier can be differentiated on the other.

Shapes follow PyTorch: activations are NCHW, a conv weight is (out_channels, in_channels, kh, kw),
a linear weight is (out_features, in_features).

This file is written to be read: each pair is the textbook algorithm, one screen long. Training
runs the *fast tier* by default (``minisd/kernels/fast.py``): the same pairs with the same caches
and results, computed in a faster order. ``minisd.kernels.use("reference")`` makes every layer
call the functions below instead, so a whole network can run on this file.

One detail of layout: a convolution computes ``W @ cols``, an (O, N*Ho*Wo) matrix whose rows are
the output channels. Its NCHW result is that matrix reshaped to (O, N, Ho, Wo) and transposed, a
*view*: the values are right, only their order in memory is channel-major. Nothing here depends
on it; the fast tier does (see its docstring).
"""
from __future__ import annotations

from typing import Any, NamedTuple

from minisd.backend import array_module, is_device_array

__all__ = [
    "ConvCache",
    "BatchNormCache",
    "LinearCache",
    "ShortcutCache",
    "SoftmaxCrossEntropyCache",
    "as_pair",
    "conv_output_size",
    "conv_geometry",
    "im2col",
    "col2im",
    "conv2d_forward",
    "conv2d_backward",
    "batch_norm_forward",
    "batch_norm_backward",
    "update_running_stats",
    "relu_forward",
    "relu_backward",
    "linear_forward",
    "linear_backward",
    "global_avg_pool_forward",
    "global_avg_pool_backward",
    "shortcut_forward",
    "shortcut_backward",
    "softmax_cross_entropy_forward",
    "softmax_cross_entropy_backward",
]


def as_pair(v) -> tuple[int, int]:
    """An int or a pair of ints as a pair (height, width): 3 -> (3, 3), (3, 1) -> (3, 1)."""
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv_output_size(size: int, kernel: int, stride: int, padding: int, where: str = "conv2d") -> int:
    """Output length of a convolution along one axis: floor((size + 2p - k) / s) + 1.

    Raises ValueError (naming ``where``) when the kernel is larger than the padded input, instead of
    silently producing an empty array.
    """
    padded = size + 2 * padding
    if kernel > padded:
        raise ValueError(
            f"{where}: kernel size {kernel} is larger than the padded input "
            f"({size} + 2*padding {padding} = {padded}); expected kernel <= {padded}"
        )
    if stride < 1:
        raise ValueError(f"{where}: stride must be >= 1, got {stride}")
    return (padded - kernel) // stride + 1


def conv_geometry(x_shape, kernel_size, stride, padding, where: str = "conv2d"):
    """(kh, kw, sh, sw, ph, pw, ho, wo) of a convolution over an (N, C, H, W) input.

    Kernel size, stride and padding may each be an int or a pair; ``where`` names the caller in
    the error of :func:`conv_output_size`.
    """
    (kh, kw), (sh, sw), (ph, pw) = as_pair(kernel_size), as_pair(stride), as_pair(padding)
    ho = conv_output_size(x_shape[2], kh, sh, ph, where)
    wo = conv_output_size(x_shape[3], kw, sw, pw, where)
    return kh, kw, sh, sw, ph, pw, ho, wo


# ----------------------------------------------------------------------------------------------
# Convolution: im2col, one matrix product, col2im
# ----------------------------------------------------------------------------------------------


def im2col(x, kernel_size, stride=1, padding=0):
    """Unfold every receptive field of ``x`` into a column.

    x: (N, C, H, W) -> cols: (C*kh*kw, N*Ho*Wo). Row (c, i, j) holds pixel (i, j) of the kernel
    window over channel c, so the rows match ``weight.reshape(O, C*kh*kw)``; column (n, ho, wo) is
    the window of output pixel (ho, wo) of image n.

    Row block (c, i, j) is the zero-padded input shifted by (i, j) and read every ``stride``
    pixels: one slab copy per kernel offset, no per-pixel loop.
    """
    xp = array_module(x)
    n, c = x.shape[0], x.shape[1]
    kh, kw, sh, sw, ph, pw, ho, wo = conv_geometry(x.shape, kernel_size, stride, padding, "im2col")
    padded = xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    cols = xp.empty((c, kh, kw, n, ho, wo), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            window = padded[:, :, i : i + sh * ho : sh, j : j + sw * wo : sw]  # (N, C, Ho, Wo)
            cols[:, i, j] = window.transpose(1, 0, 2, 3)
    return cols.reshape(c * kh * kw, n * ho * wo)


def col2im(cols, x_shape, kernel_size, stride=1, padding=0):
    """The adjoint of :func:`im2col`: add every column back onto the pixels it came from.

    cols: (C*kh*kw, N*Ho*Wo) -> dx: (N, C, H, W). A pixel that sat in several windows receives
    the sum of their gradients; what landed on the zero padding is cut off at the end (the
    padding is not an input, it has no gradient).
    """
    n, c, h, w = x_shape
    kh, kw, sh, sw, ph, pw, ho, wo = conv_geometry(x_shape, kernel_size, stride, padding, "col2im")
    if cols.shape != (c * kh * kw, n * ho * wo):
        raise ValueError(f"col2im: expected cols of shape {(c * kh * kw, n * ho * wo)}, got {cols.shape}")
    xp = array_module(cols)
    padded = xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=cols.dtype)
    cols = cols.reshape(c, kh, kw, n, ho, wo)
    for i in range(kh):
        for j in range(kw):
            padded[:, :, i : i + sh * ho : sh, j : j + sw * wo : sw] += cols[:, i, j].transpose(1, 0, 2, 3)
    return padded[:, :, ph : ph + h, pw : pw + w].copy()


class ConvCache(NamedTuple):
    """What :func:`conv2d_backward` needs (x, not its columns: see :func:`conv2d_forward`)."""

    x: Any              # (N, C, H, W)
    weight: Any         # (O, C, kh, kw)
    has_bias: bool      # whether backward returns a bias gradient
    stride: Any         # an int or a pair, as the forward got it
    padding: Any        # an int or a pair, as the forward got it


def conv2d_forward(x, weight, bias=None, stride=1, padding=0):
    """2-D cross-correlation, as torch.nn.functional.conv2d.

    x: (N, C, H, W), weight: (O, C, kh, kw), bias: (O,) or None -> y: (N, O, Ho, Wo).

        Y (O, N*Ho*Wo) = W (O, C*kh*kw) @ im2col(x) (C*kh*kw, N*Ho*Wo)  + bias per row

    The cache keeps x, not its columns (kh*kw times larger): backward unfolds x again.
    """
    out_channels, _, kh, kw = weight.shape
    _, _, _, _, _, _, ho, wo = conv_geometry(x.shape, (kh, kw), stride, padding, "conv2d")
    cols = im2col(x, (kh, kw), stride, padding)
    y = weight.reshape(out_channels, -1) @ cols
    if bias is not None:
        y += bias[:, None]
    y = y.reshape(out_channels, x.shape[0], ho, wo).transpose(1, 0, 2, 3)  # (N, O, Ho, Wo), a view
    return y, ConvCache(x, weight, bias is not None, stride, padding)


def conv2d_backward(dy, cache, input_grad=True):
    """Gradients of :func:`conv2d_forward`: returns (dx, dweight, dbias or None).

    With dY the upstream gradient as an (O, N*Ho*Wo) matrix and cols = im2col(x):

        dW    = dY @ cols^T          (O, C*kh*kw), reshaped to the weight's shape
        db    = row sums of dY       (O,)
        dcols = W^T @ dY             (C*kh*kw, N*Ho*Wo),  dx = col2im(dcols)

    ``input_grad=False`` skips dx (returned as None), as PyTorch does for an input that does not
    require grad: a network's first convolution, whose input is the images, needs only dW.
    """
    x, weight, has_bias, stride, padding = cache
    out_channels = weight.shape[0]
    dy_rows = dy.transpose(1, 0, 2, 3).reshape(out_channels, -1)  # (O, N*Ho*Wo)
    cols = im2col(x, weight.shape[2:], stride, padding)
    dweight = (dy_rows @ cols.T).reshape(weight.shape)
    dbias = dy_rows.sum(axis=1) if has_bias else None
    dx = None
    if input_grad:
        dx = col2im(weight.reshape(out_channels, -1).T @ dy_rows, x.shape, weight.shape[2:], stride, padding)
    return dx, dweight, dbias


# ----------------------------------------------------------------------------------------------
# Batch normalisation
# ----------------------------------------------------------------------------------------------


def _per_channel(x):
    """The axes batch norm reduces over, and the shape that broadcasts a (C,) vector against x."""
    if x.ndim == 4:
        return (0, 2, 3), (1, -1, 1, 1)
    return (0,), (1, -1)


class BatchNormCache(NamedTuple):
    """What :func:`batch_norm_backward` and :func:`update_running_stats` need.

    The centred input rather than x_hat (one multiplication away: x_hat = centered * inv_std), and
    the statistics the forward normalised with: the batch's in training (the biased variance),
    the running estimates in evaluation.
    """

    centered: Any       # x - mean, shaped as x: (N, C, H, W) or (N, C)
    gamma: Any          # (C,)
    inv_std: Any        # 1 / sqrt(var + eps), (C,)
    training: bool      # batch statistics (they depend on x) or fixed running ones
    x_shape: tuple
    mean: Any           # (C,)
    var: Any            # (C,)


def batch_norm_forward(x, gamma, beta, running_mean=None, running_var=None, training=True, eps=1e-5):
    """Batch normalisation over (N, H, W) per channel (over N for 2-D input).

    x: (N, C, H, W) or (N, C); gamma, beta, running_mean, running_var: (C,).

        x_hat = (x - mean) / sqrt(var + eps),    y = gamma * x_hat + beta

    Training: mean and the *biased* variance of this batch (the cache keeps them, so the caller
    can update its running estimates with :func:`update_running_stats`). Evaluation: the running
    estimates. The cache: a :class:`BatchNormCache`.
    """
    axes, col = _per_channel(x)
    if training:
        mean = x.mean(axis=axes)
        var = ((x - mean.reshape(col)) ** 2).mean(axis=axes)
    else:
        mean, var = running_mean, running_var
    inv_std = 1.0 / (var + eps) ** 0.5
    centered = x - mean.reshape(col)
    x_hat = centered * inv_std.reshape(col)
    y = gamma.reshape(col) * x_hat + beta.reshape(col)
    return y, BatchNormCache(centered, gamma, inv_std, training, x.shape, mean, var)


def batch_norm_backward(dy, cache):
    """Gradients of :func:`batch_norm_forward`: returns (dx, dgamma, dbeta).

    With M = N*H*W values per channel and sums over them:

        dbeta  = sum(dy),    dgamma = sum(dy * x_hat)

    Training: mean and variance depend on x, which adds two terms (the derivation is notebook 2):

        dx = gamma / sqrt(var + eps) * (dy - dbeta / M - x_hat * dgamma / M)

    Evaluation (fixed statistics): dx = gamma / sqrt(var + eps) * dy.
    """
    centered, gamma, inv_std, training = cache.centered, cache.gamma, cache.inv_std, cache.training
    axes, col = _per_channel(dy)
    x_hat = centered * inv_std.reshape(col)
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * x_hat).sum(axis=axes)
    scale = (gamma * inv_std).reshape(col)
    if not training:
        return scale * dy, dgamma, dbeta
    m = dy.size // dy.shape[1]
    dx = scale * (dy - dbeta.reshape(col) / m - x_hat * (dgamma.reshape(col) / m))
    return dx, dgamma, dbeta


def update_running_stats(running_mean, running_var, cache, momentum=0.1):
    """Update running estimates in place, as PyTorch does.

    running = (1 - momentum) * running + momentum * batch_stat, with the *unbiased* batch variance
    (times M / (M - 1)) in the running variance. An evaluation cache changes nothing.
    """
    if not cache.training:
        return
    x_shape = cache.x_shape
    count = x_shape[0] * (x_shape[2] * x_shape[3] if len(x_shape) == 4 else 1)
    unbiased = cache.var * (count / max(count - 1, 1))
    running_mean *= 1.0 - momentum
    running_mean += momentum * cache.mean
    running_var *= 1.0 - momentum
    running_var += momentum * unbiased


# ----------------------------------------------------------------------------------------------
# ReLU, linear, pooling
# ----------------------------------------------------------------------------------------------


def relu_forward(x):
    """y = max(x, 0), any shape. The cache is the boolean mask x > 0."""
    xp = array_module(x)
    return xp.maximum(x, 0), x > 0


def relu_backward(dy, cache):
    """dx = dy where x > 0, else 0 (a new array: dy is left untouched)."""
    return dy * cache


class LinearCache(NamedTuple):
    """What :func:`linear_backward` needs."""

    x: Any              # (N, in_features)
    weight: Any         # (out_features, in_features)
    has_bias: bool


def linear_forward(x, weight, bias=None):
    """y = x @ W^T + b.  x: (N, in), weight: (out, in), bias: (out,) -> y: (N, out)."""
    y = x @ weight.T
    if bias is not None:
        y += bias
    return y, LinearCache(x, weight, bias is not None)


def linear_backward(dy, cache):
    """Returns (dx, dweight, dbias or None): dx = dy @ W, dW = dy^T @ x, db = sum of dy over N."""
    x, weight, has_bias = cache
    return dy @ weight, dy.T @ x, (dy.sum(axis=0) if has_bias else None)


def global_avg_pool_forward(x):
    """Mean over H and W.  x: (N, C, H, W) -> y: (N, C). The cache is x's shape."""
    return x.mean(axis=(2, 3)), x.shape


def global_avg_pool_backward(dy, cache):
    """Each of the H*W pixels of a channel receives dy / (H*W).  dy: (N, C) -> dx: (N, C, H, W)."""
    xp = array_module(dy)
    n, c, h, w = cache
    return xp.broadcast_to((dy / (h * w))[:, :, None, None], (n, c, h, w)).copy()


# ----------------------------------------------------------------------------------------------
# The paper's parameter-free transition shortcut
# ----------------------------------------------------------------------------------------------


class ShortcutCache(NamedTuple):
    """What :func:`shortcut_backward` needs: where the kept pixels and channels came from."""

    x_shape: tuple      # (N, C, H, W)
    stride: int


def shortcut_forward(x, out_channels, stride=2):
    """Subsample by ``stride`` and zero-pad the new channels (the paper's CIFAR shortcut, option A).

    x: (N, C, H, W) -> y: (N, out_channels, ceil(H/s), ceil(W/s)); y[:, :C] = x[:, :, ::s, ::s],
    the remaining out_channels - C channels are zero. No parameters. The cache: x's shape and the stride.
    """
    xp = array_module(x)
    n, c = x.shape[0], x.shape[1]
    if out_channels < c:
        raise ValueError(f"shortcut: out_channels ({out_channels}) must be >= in_channels ({c})")
    sub = x[:, :, ::stride, ::stride]
    y = xp.zeros((n, out_channels) + sub.shape[2:], dtype=x.dtype)
    y[:, :c] = sub
    return y, ShortcutCache(x.shape, stride)


def shortcut_backward(dy, cache):
    """dx picks the gradient of the kept channels back onto the subsampled pixels; zero elsewhere."""
    xp = array_module(dy)
    x_shape, stride = cache
    dx = xp.zeros(x_shape, dtype=dy.dtype)
    dx[:, :, ::stride, ::stride] = dy[:, : x_shape[1]]
    return dx


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------


class SoftmaxCrossEntropyCache(NamedTuple):
    """What :func:`softmax_cross_entropy_backward` needs."""

    probs: Any          # softmax(logits), (N, K)
    labels: Any         # (N,) integers in [0, K)


def softmax_cross_entropy_forward(logits, labels):
    """Mean cross-entropy of softmax(logits) against integer ``labels``, numerically stable.

    logits: (N, K) floating, labels: (N,) integers in [0, K) -> loss: 0-d array (mean over N).
    Uses log-softmax with the row maximum subtracted, so large logits cannot overflow.
    """
    xp = array_module(logits, labels)
    if logits.ndim != 2:
        raise ValueError(f"softmax_cross_entropy: expected logits of shape (N, K), got {logits.shape}")
    if labels.shape != (logits.shape[0],):
        raise ValueError(
            f"softmax_cross_entropy: expected labels of shape ({logits.shape[0]},), got {labels.shape}"
        )
    if labels.dtype.kind not in "iu":
        raise ValueError(f"softmax_cross_entropy: expected integer labels, got dtype {labels.dtype}")
    num_classes = logits.shape[1]
    # A label of -1 would silently index the last class. Host labels are checked here (free); on
    # the GPU a check that raises must read the labels back, a stall in every step, so there an
    # out-of-range label makes the loss NaN instead (the trainer stops on it, and it checks a
    # dataset's labels once, on the host, before training).
    on_device = is_device_array(labels)
    if not on_device and labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"softmax_cross_entropy: expected labels in [0, {num_classes}), got values from "
                         f"{labels.min()} to {labels.max()}")
    n = logits.shape[0]
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_sum = xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
    log_probs = shifted - log_sum
    rows = xp.arange(n)
    loss = -log_probs[rows, labels].mean()
    if on_device:
        outside = ((labels < 0) | (labels >= num_classes)).any()
        loss = xp.where(outside, xp.asarray(xp.nan, dtype=loss.dtype), loss)
    return loss, SoftmaxCrossEntropyCache(xp.exp(log_probs), labels)


def softmax_cross_entropy_backward(dloss, cache):
    """dlogits = dloss * (softmax(logits) - onehot(labels)) / N."""
    probs, labels = cache
    xp = array_module(probs)
    n = probs.shape[0]
    dlogits = probs.copy()
    dlogits[xp.arange(n), labels] -= 1
    dlogits *= dloss / n
    return dlogits
