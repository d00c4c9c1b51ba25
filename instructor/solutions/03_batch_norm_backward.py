"""Reference solution of notebooks/exercises/03_batch_norm_backward.ipynb."""
import numpy as np


def batch_norm_backward(dy, x, gamma, eps):
    """Gradients of batch_norm_forward in training mode: returns (dx, dgamma, dbeta)."""
    axes = (0, 2, 3)
    mean = x.mean(axis=axes, keepdims=True)
    inv_std = 1.0 / np.sqrt(x.var(axis=axes, keepdims=True) + eps)
    x_hat = (x - mean) * inv_std
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * x_hat).sum(axis=axes)
    dx_hat = dy * gamma.reshape(1, -1, 1, 1)
    dx = inv_std * (dx_hat - dx_hat.mean(axis=axes, keepdims=True)
                    - x_hat * (dx_hat * x_hat).mean(axis=axes, keepdims=True))
    return dx, dgamma, dbeta
