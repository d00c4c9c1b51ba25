"""Answers that hand exercise 4 to minisd's gradcheck."""
import numpy as np

from minisd import gradcheck


def numerical_gradient(f, x, dy, eps):
    return gradcheck.numerical_gradient(f, x, dy, eps).reshape(x.shape)


def backward_is_correct(forward, backward, x, rng):
    dy = rng.standard_normal(forward(x).shape)
    numeric = gradcheck.numerical_gradient(lambda: forward(x), x, dy).reshape(x.shape)
    return bool(np.allclose(backward(dy), numeric, atol=1e-6))
