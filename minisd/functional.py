"""Pure forward/backward pairs: the math of every layer, written out by hand.

Each operation is a pair::

    out, cache = op_forward(inputs..., options...)
    grads      = op_backward(dout, cache)

``forward`` keeps in ``cache`` exactly what ``backward`` needs; ``backward`` returns the gradient
with respect to each input, in the order the forward took them, and never writes into ``dout``.

Shapes follow PyTorch: activations are NCHW, a conv weight is (out_channels, in_channels, kh, kw),
a linear weight is (out_features, in_features).

Memory layout (the one speed trick that shapes this file)
---------------------------------------------------------
Every array here *is* NCHW: ``y.shape == (N, C, H, W)`` and ``y[n, c, h, w]`` is what you expect.
But the arrays that convolutions and batch norm create are stored **channel-major** in memory,
as if they were (C, N, H, W), and handed out as the transposed view. Why: a convolution is the
matrix product ``W (O, C*kh*kw) @ cols (C*kh*kw, N*H*W)``; its result (O, N*H*W) *is* channel-major,
and so is the column matrix built from a channel-major input, one contiguous slab per kernel
offset. Returning the view instead of transposing back to NCHW saves two full copies per layer
in forward and two in backward. Element-wise NumPy operations keep the memory order of their
inputs (``order="K"``), so ReLU, residual sums and batch norm stay channel-major too, and the
next convolution reads its input without a copy. :func:`channel_rows` is where the layout is used.
"""
from __future__ import annotations

from minisd.backend import array_module

__all__ = [
    "conv_output_size",
    "channel_rows",
    "empty_channel_major",
    "im2col",
    "col2im",
    "conv2d_forward",
    "conv2d_backward",
    "batch_norm_forward",
    "batch_norm_backward",
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


# ----------------------------------------------------------------------------------------------
# Layout helpers
# ----------------------------------------------------------------------------------------------


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


def channel_rows(x):
    """View an NCHW array as a (C, N*H*W) matrix: one row per channel.

    Free (a view) when ``x`` is stored channel-major, as the outputs of this module are; a copy
    otherwise (for example the network's input batch).
    """
    n, c = x.shape[0], x.shape[1]
    return x.transpose(1, 0, 2, 3).reshape(c, -1) if x.ndim == 4 else x.reshape(n, c).T


def empty_channel_major(xp, shape, dtype, zero: bool = False):
    """An uninitialised (or zeroed) NCHW array stored channel-major, as (C, N, H, W) in memory."""
    n, c, h, w = shape
    make = xp.zeros if zero else xp.empty
    return make((c, n, h, w), dtype=dtype).transpose(1, 0, 2, 3)


def _pair(v):
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


# ----------------------------------------------------------------------------------------------
# im2col / col2im
# ----------------------------------------------------------------------------------------------


def im2col(x, kernel_size, stride=1, padding=0):
    """Unfold every receptive field of ``x`` into a column.

    x: (N, C, H, W) -> cols: (C*kh*kw, N*Ho*Wo), rows ordered (c, i, j) to match
    ``weight.reshape(O, C*kh*kw)``, columns ordered (n, ho, wo).

    Built with one strided slab copy per kernel offset (i, j): row block (c, i, j) of the column
    matrix is the input shifted by (i, j) and subsampled by the stride. kh*kw copies of a whole
    slab, no per-element Python loop.
    """
    xp = array_module(x)
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    n, c, h, w = x.shape
    ho = conv_output_size(h, kh, sh, ph, "im2col")
    wo = conv_output_size(w, kw, sw, pw, "im2col")
    x_cm = x.transpose(1, 0, 2, 3)  # (C, N, H, W): a free view when x is channel-major
    if ph or pw:
        padded = xp.zeros((c, n, h + 2 * ph, w + 2 * pw), dtype=x.dtype)
        padded[:, :, ph : ph + h, pw : pw + w] = x_cm
    else:
        padded = x_cm
    cols = xp.empty((c, kh, kw, n, ho, wo), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, i, j] = padded[:, :, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw]
    return cols.reshape(c * kh * kw, n * ho * wo)


def col2im(cols, x_shape, kernel_size, stride=1, padding=0):
    """The adjoint of :func:`im2col`: scatter-add every column back to the pixels it came from.

    cols: (C*kh*kw, N*Ho*Wo) -> dx: (N, C, H, W) (channel-major in memory). A pixel that sat in
    several receptive fields receives the sum of their gradients: one slab add per kernel offset.
    """
    xp = array_module(cols)
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    n, c, h, w = x_shape
    ho = conv_output_size(h, kh, sh, ph, "col2im")
    wo = conv_output_size(w, kw, sw, pw, "col2im")
    if cols.shape != (c * kh * kw, n * ho * wo):
        raise ValueError(f"col2im: expected cols of shape {(c * kh * kw, n * ho * wo)}, got {cols.shape}")
    cols6 = cols.reshape(c, kh, kw, n, ho, wo)
    padded = xp.zeros((c, n, h + 2 * ph, w + 2 * pw), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            padded[:, :, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw] += cols6[:, i, j]
    return padded[:, :, ph : ph + h, pw : pw + w].transpose(1, 0, 2, 3)


# ----------------------------------------------------------------------------------------------
# Convolution
# ----------------------------------------------------------------------------------------------


def conv2d_forward(x, weight, bias=None, stride=1, padding=0):
    """2-D cross-correlation, as torch.nn.functional.conv2d.

    x: (N, C, H, W), weight: (O, C, kh, kw), bias: (O,) or None -> y: (N, O, Ho, Wo).
    y = W (O, C*kh*kw) @ im2col(x) (C*kh*kw, N*Ho*Wo), plus bias per output channel.
    """
    n = x.shape[0]
    out_channels, _, kh, kw = weight.shape
    cols = im2col(x, (kh, kw), stride, padding)
    w_rows = weight.reshape(out_channels, -1)
    out = w_rows @ cols  # (O, N*Ho*Wo): already channel-major, so no transpose is needed
    if bias is not None:
        out += bias[:, None]
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    ho = conv_output_size(x.shape[2], kh, sh, ph)
    wo = conv_output_size(x.shape[3], kw, sw, pw)
    y = out.reshape(out_channels, n, ho, wo).transpose(1, 0, 2, 3)
    cache = (cols, weight, x.shape, bias is not None, stride, padding)
    return y, cache


def conv2d_backward(dy, cache):
    """Gradients of :func:`conv2d_forward`: returns (dx, dweight, dbias or None).

    With dY as a (O, N*Ho*Wo) matrix: dW = dY @ cols^T, db = row sums of dY,
    dcols = W^T @ dY, and dx = col2im(dcols).
    """
    cols, weight, x_shape, has_bias, stride, padding = cache
    out_channels = weight.shape[0]
    dy_rows = channel_rows(dy)  # (O, N*Ho*Wo); a view when dy is channel-major
    w_rows = weight.reshape(out_channels, -1)
    dweight = (dy_rows @ cols.T).reshape(weight.shape)
    dbias = dy_rows.sum(axis=1) if has_bias else None
    dcols = w_rows.T @ dy_rows
    dx = col2im(dcols, x_shape, weight.shape[2:], stride, padding)
    return dx, dweight, dbias


# ----------------------------------------------------------------------------------------------
# Batch normalisation
# ----------------------------------------------------------------------------------------------


def batch_norm_forward(x, gamma, beta, running_mean=None, running_var=None, training=True, eps=1e-5):
    """Batch normalisation over (N, H, W) per channel (or over N for 2-D input).

    x: (N, C, H, W) or (N, C); gamma, beta, running_mean, running_var: (C,).
    Training: normalise with the batch mean and the *biased* batch variance; the cache also holds
    them, so the caller can update its running estimates (see :func:`update_running_stats`).
    Evaluation: normalise with ``running_mean`` and ``running_var``.
    y = gamma * (x - mean) / sqrt(var + eps) + beta.
    """
    rows = channel_rows(x)  # (C, M)
    if training:
        mean = rows.mean(axis=1)
        centered = rows - mean[:, None]
        var = (centered * centered).mean(axis=1)
    else:
        mean, var = running_mean, running_var
        centered = rows - mean[:, None]
    inv_std = 1.0 / (var + eps) ** 0.5
    x_hat = centered * inv_std[:, None]
    y_rows = x_hat * gamma[:, None] + beta[:, None]
    y = _rows_to_shape(y_rows, x.shape)
    cache = (x_hat, gamma, inv_std, training, x.shape, mean, var)
    return y, cache


def batch_norm_backward(dy, cache):
    """Gradients of :func:`batch_norm_forward`: returns (dx, dgamma, dbeta).

    Training (batch statistics depend on x, M = N*H*W values per channel):
        dx = gamma * inv_std * (dy - mean(dy) - x_hat * mean(dy * x_hat))
    Evaluation (fixed statistics): dx = gamma * inv_std * dy.
    """
    x_hat, gamma, inv_std, training, x_shape, _, _ = cache
    dy_rows = channel_rows(dy)
    count = dy_rows.shape[1]
    dbeta = dy_rows.sum(axis=1)
    dgamma = (dy_rows * x_hat).sum(axis=1)
    scale = (gamma * inv_std)[:, None]
    if training:
        dx_rows = scale * (dy_rows - (dbeta / count)[:, None] - x_hat * (dgamma / count)[:, None])
    else:
        dx_rows = scale * dy_rows
    return _rows_to_shape(dx_rows, x_shape), dgamma, dbeta


def update_running_stats(running_mean, running_var, cache, momentum=0.1):
    """Update running estimates in place, as PyTorch does.

    running = (1 - momentum) * running + momentum * batch_stat, with the *unbiased* batch variance
    (times M / (M - 1)) in the running variance.
    """
    _, _, _, training, x_shape, mean, var = cache
    if not training:
        return
    count = x_shape[0] * (x_shape[2] * x_shape[3] if len(x_shape) == 4 else 1)
    unbiased = var * (count / max(count - 1, 1))
    running_mean *= 1.0 - momentum
    running_mean += momentum * mean
    running_var *= 1.0 - momentum
    running_var += momentum * unbiased


def _rows_to_shape(rows, shape):
    """Inverse of :func:`channel_rows`: a (C, M) matrix back to an NCHW (or NC) view."""
    if len(shape) == 4:
        n, c, h, w = shape
        return rows.reshape(c, n, h, w).transpose(1, 0, 2, 3)
    return rows.T


# ----------------------------------------------------------------------------------------------
# Element-wise, linear, pooling
# ----------------------------------------------------------------------------------------------


def relu_forward(x):
    """y = max(x, 0), any shape. The cache is the boolean mask x > 0 (a quarter of the memory)."""
    xp = array_module(x)
    mask = x > 0
    return xp.maximum(x, 0), mask


def relu_backward(dy, cache):
    """dx = dy where x > 0, else 0. Returns a new array (dy is left untouched)."""
    mask = cache
    return dy * mask


def linear_forward(x, weight, bias=None):
    """y = x @ W^T + b.  x: (N, in), weight: (out, in), bias: (out,) -> y: (N, out)."""
    y = x @ weight.T
    if bias is not None:
        y += bias
    return y, (x, weight, bias is not None)


def linear_backward(dy, cache):
    """Returns (dx, dweight, dbias or None): dx = dy @ W, dW = dy^T @ x, db = sum of dy over N."""
    x, weight, has_bias = cache
    return dy @ weight, dy.T @ x, (dy.sum(axis=0) if has_bias else None)


def global_avg_pool_forward(x):
    """Mean over H and W.  x: (N, C, H, W) -> y: (N, C)."""
    return x.mean(axis=(2, 3)), x.shape


def global_avg_pool_backward(dy, cache):
    """Each of the H*W pixels of a channel receives dy / (H*W).  dy: (N, C) -> dx: (N, C, H, W)."""
    xp = array_module(dy)
    n, c, h, w = cache
    dx = empty_channel_major(xp, (n, c, h, w), dy.dtype)
    dx[...] = (dy / (h * w))[:, :, None, None]
    return dx


# ----------------------------------------------------------------------------------------------
# The paper's parameter-free transition shortcut
# ----------------------------------------------------------------------------------------------


def shortcut_forward(x, out_channels, stride=2):
    """Subsample by ``stride`` and zero-pad the new channels (the paper's CIFAR shortcut, option A).

    x: (N, C, H, W) -> y: (N, out_channels, ceil(H/s), ceil(W/s)); y[:, :C] = x[:, :, ::s, ::s],
    the remaining out_channels - C channels are zero. No parameters.
    """
    xp = array_module(x)
    n, c, h, w = x.shape
    if out_channels < c:
        raise ValueError(f"shortcut: out_channels ({out_channels}) must be >= in_channels ({c})")
    sub = x[:, :, ::stride, ::stride]
    y = empty_channel_major(xp, (n, out_channels, sub.shape[2], sub.shape[3]), x.dtype)
    y[:, :c] = sub
    y[:, c:] = 0
    return y, (x.shape, stride)


def shortcut_backward(dy, cache):
    """dx picks the gradient of the kept channels back onto the subsampled pixels; zero elsewhere."""
    xp = array_module(dy)
    x_shape, stride = cache
    c = x_shape[1]
    dx = empty_channel_major(xp, x_shape, dy.dtype, zero=True)
    dx[:, :, ::stride, ::stride] = dy[:, :c]
    return dx


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------


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
    n = logits.shape[0]
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_sum = xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
    log_probs = shifted - log_sum
    rows = xp.arange(n)
    loss = -log_probs[rows, labels].mean()
    return loss, (xp.exp(log_probs), labels)


def softmax_cross_entropy_backward(dloss, cache):
    """dlogits = dloss * (softmax(logits) - onehot(labels)) / N."""
    xp = array_module(cache[0])
    probs, labels = cache
    n = probs.shape[0]
    dlogits = probs.copy()
    dlogits[xp.arange(n), labels] -= 1
    dlogits *= dloss / n
    return dlogits
