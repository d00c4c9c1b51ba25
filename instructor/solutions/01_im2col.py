"""Reference solution of notebooks/exercises/01_im2col.ipynb."""
import numpy as np


def im2col(x, kernel_size, stride, padding):
    """x (N, C, H, W) -> cols (C*kh*kw, N*Ho*Wo): row (c, i, j), column (n, ho, wo)."""
    n, c, h, w = x.shape
    kh, kw = kernel_size
    ho, wo = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    padded = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    cols = np.empty((c, kh, kw, n, ho, wo), dtype=x.dtype)
    for i in range(kh):                                # one slab per kernel offset (i, j)
        for j in range(kw):
            window = padded[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride]   # (N, C, Ho, Wo)
            cols[:, i, j] = window.transpose(1, 0, 2, 3)
    return cols.reshape(c * kh * kw, n * ho * wo)


def col2im(cols, x_shape, kernel_size, stride, padding):
    """The adjoint of im2col: every column is added back onto the pixels it was read from."""
    n, c, h, w = x_shape
    kh, kw = kernel_size
    ho, wo = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    padded = np.zeros((n, c, h + 2 * padding, w + 2 * padding), dtype=cols.dtype)
    blocks = cols.reshape(c, kh, kw, n, ho, wo)
    for i in range(kh):
        for j in range(kw):
            padded[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride] += blocks[:, i, j].transpose(1, 0, 2, 3)
    return padded[:, :, padding:padding + h, padding:padding + w]    # the padding is not an input
