"""Reference solution of notebooks/exercises/02_conv_backward.ipynb."""
from minisd import functional as F


def conv_backward(dy, x, weight, stride, padding):
    """Gradients of conv_forward: returns (dx, dweight, dbias)."""
    out_channels, _, kh, kw = weight.shape
    cols = F.im2col(x, (kh, kw), stride, padding)                          # (C*kh*kw, N*Ho*Wo)
    dy_rows = dy.transpose(1, 0, 2, 3).reshape(out_channels, -1)           # (O, N*Ho*Wo), columns like cols
    dweight = (dy_rows @ cols.T).reshape(weight.shape)                     # every column adds its share
    dbias = dy_rows.sum(axis=1)                                            # summed over batch and positions
    dcols = weight.reshape(out_channels, -1).T @ dy_rows                   # (C*kh*kw, N*Ho*Wo)
    dx = F.col2im(dcols, x.shape, (kh, kw), stride, padding)               # back to the pixels, overlaps added
    return dx, dweight, dbias
