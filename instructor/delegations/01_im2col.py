"""Answers that hand exercise 1 to minisd: each check must fail with "calls minisd's own ...; write it yourself"."""
from minisd import functional as F


def im2col(x, kernel_size, stride, padding):
    return F.im2col(x, kernel_size, stride, padding)


def col2im(cols, x_shape, kernel_size, stride, padding):
    return F.col2im(cols, x_shape, kernel_size, stride, padding)
