"""One training step's gradient computation: forward, loss, backward. Everything that trains or
times a step calls this function, so the three lines a student came to see are written once.

::

    loss, logits = train_step(model, x, labels)   # model.grads now hold d(loss)/d(parameters)
    optimizer.step()
"""
from __future__ import annotations

from minisd import functional as F

__all__ = ["train_step"]


def train_step(model, x, labels):
    """Clear the gradients, run ``model`` on ``x``, and backpropagate the mean cross-entropy.

    x: (N, C, H, W) images, labels: (N,) integers -> (loss, logits): loss a 0-d array (on the
    model's backend: reading it with ``float(loss)`` is the caller's choice, since on a GPU it waits
    for the step), logits (N, K). In training mode the residual blocks draw their gates here.
    """
    model.zero_grad()
    logits = model(x)
    loss, cache = F.softmax_cross_entropy_forward(logits, labels)
    model.backward(F.softmax_cross_entropy_backward(1.0, cache))
    return loss, logits
