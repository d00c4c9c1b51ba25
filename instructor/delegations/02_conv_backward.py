"""Answers that hand exercise 2 to minisd (the issue's example: conv2d_backward is one attribute away)."""
import numpy as np

from minisd import functional as F


def conv_backward(dy, x, weight, stride, padding):
    _, cache = F.conv2d_forward(x, weight, np.zeros(weight.shape[0]), stride, padding)
    return F.conv2d_backward(dy, cache)
