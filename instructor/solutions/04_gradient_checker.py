"""Reference solution of notebooks/exercises/04_gradient_checker.ipynb."""
import numpy as np


def numerical_gradient(f, x, dy, eps):
    """Central differences of L = sum(f() * dy) with respect to x (perturbed in place, restored)."""
    grad = np.zeros(x.shape)
    flat, flat_grad = x.reshape(-1), grad.reshape(-1)   # views: writing flat[i] moves x
    for i in range(x.size):
        old = flat[i]
        flat[i] = old + eps
        plus = f().copy()
        flat[i] = old - eps
        minus = f().copy()
        flat[i] = old                                   # exactly the old value, not old + eps - eps
        flat_grad[i] = np.sum((plus - minus) * dy) / (2 * eps)
    return grad


def backward_is_correct(forward, backward, x, rng):
    """True when backward(dy) matches finite differences of forward at x for a random dy."""
    dy = rng.standard_normal(forward(x).shape)          # random: an all-ones dy hides some wrong backwards
    analytic = backward(dy)
    numeric = numerical_gradient(lambda: forward(x), x, dy, 1e-6)
    return bool(np.all(np.abs(analytic - numeric) <= 1e-6 * np.abs(numeric).max() + 1e-8))
