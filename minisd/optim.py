"""SGD with momentum, Nesterov and weight decay, and learning-rate schedules.

The update is PyTorch's ``torch.optim.SGD`` (dampening 0), written out for one parameter p with
gradient g::

    g   = g + weight_decay * p          # L2 weight decay, added to the gradient
    buf = g                             # first step
    buf = momentum * buf + g            # later steps
    g   = g + momentum * buf            # Nesterov
    g   = buf                           # classical momentum
    p   = p - lr * g                    # in place: the model keeps its arrays

The paper trains with lr 0.1, momentum 0.9, Nesterov, weight decay 1e-4, and divides the learning
rate by 10 after 50% and 75% of the epochs (:func:`step_lr`).

Dropped branches and the optimizer. A block whose branch was dropped this step gives its
parameters an exactly zero gradient. Plain SGD still moves them: weight decay shrinks them and the
momentum buffer keeps pushing them along the old direction (the original Torch implementation did
this too). ``SGD(..., skip_unused=True)`` instead leaves every parameter whose module received no
gradient this step (``module.grad_received`` is False) untouched, momentum buffer included, as
PyTorch does for a parameter whose ``.grad`` is None.
"""
from __future__ import annotations

import math

from minisd import backend

__all__ = ["SGD", "step_lr", "cosine_lr", "constant_lr", "make_lr_schedule", "LR_SCHEDULES"]

LR_SCHEDULES = ("step", "cosine", "constant")


class SGD:
    """Stochastic gradient descent on ``model``'s parameters, updated in place.

    model: a Module; its parameters are found through ``model.parameter_slots()`` and updated as
    ``module.params[key] -= ...`` in place, so arrays held elsewhere (a trace, a notebook) see the
    new values. ``lr`` may be changed between steps (schedules do).
    """

    def __init__(self, model, lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0, skip_unused=False):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"SGD: lr, momentum and weight_decay must be >= 0, got {lr}, {momentum}, {weight_decay}")
        if nesterov and momentum <= 0:
            raise ValueError("SGD: Nesterov momentum needs momentum > 0")
        self.model = model
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.nesterov, self.skip_unused = bool(nesterov), bool(skip_unused)
        self.buffers: dict = {}  # parameter name -> momentum buffer (created at its first update)
        self.steps = 0

    def zero_grad(self) -> None:
        self.model.zero_grad()

    def step(self) -> None:
        """One update of every parameter (or, with skip_unused, of every parameter that got a gradient)."""
        lr, mu, wd = self.lr, self.momentum, self.weight_decay
        for name, module, key in self.model.parameter_slots():
            if self.skip_unused and not module.grad_received:
                continue
            p, g = module.params[key], module.grads[key]
            if wd:
                g = g + p * p.dtype.type(wd)  # a new array: the model's gradient is not changed
            if mu:
                buf = self.buffers.get(name)
                if buf is not None and (buf.dtype != p.dtype or backend.backend_of(buf) != backend.backend_of(p)):
                    # The model was moved (model.to) after this buffer was made: follow it.
                    buf = self.buffers[name] = backend.to_device(buf, backend.backend_of(p), p.dtype)
                if buf is None:
                    buf = self.buffers[name] = g.copy()
                else:
                    buf *= buf.dtype.type(mu)
                    buf += g
                g = g + buf * buf.dtype.type(mu) if self.nesterov else buf
            p -= g * p.dtype.type(lr)
        self.steps += 1

    # ---- checkpoints ----------------------------------------------------------------------------

    def hyperparameters(self) -> dict:
        return {"lr": self.lr, "momentum": self.momentum, "nesterov": self.nesterov,
                "weight_decay": self.weight_decay, "skip_unused": self.skip_unused, "steps": self.steps}

    def state_dict(self) -> dict:
        """{"hyper": hyperparameters, "buffers": {parameter name: momentum buffer}} (arrays not copied)."""
        return {"hyper": self.hyperparameters(), "buffers": dict(self.buffers)}

    def load_state_dict(self, state: dict) -> None:
        """Restore hyperparameters and momentum buffers; ValueError naming an unknown or misshapen buffer."""
        params = dict(self.model.named_parameters())
        problems = []
        for name, value in state.get("buffers", {}).items():
            if name not in params:
                problems.append(f"unexpected momentum buffer {name}")
            elif tuple(value.shape) != tuple(params[name].shape):
                problems.append(f"momentum buffer {name}: expected shape {tuple(params[name].shape)}, "
                                f"got {tuple(value.shape)}")
        if problems:
            raise ValueError("SGD.load_state_dict: " + "; ".join(problems))
        hyper = state.get("hyper", {})
        self.lr = float(hyper.get("lr", self.lr))
        self.momentum = float(hyper.get("momentum", self.momentum))
        self.nesterov = bool(hyper.get("nesterov", self.nesterov))
        self.weight_decay = float(hyper.get("weight_decay", self.weight_decay))
        self.skip_unused = bool(hyper.get("skip_unused", self.skip_unused))
        self.steps = int(hyper.get("steps", self.steps))
        self.buffers = {}
        for name, value in state.get("buffers", {}).items():
            target = params[name]
            self.buffers[name] = backend.to_device(value, backend.backend_of(target)).astype(target.dtype, copy=True)


# ----------------------------------------------------------------------------------------------
# Learning-rate schedules: lr for epoch e (0-based) of E
# ----------------------------------------------------------------------------------------------


def step_lr(base_lr: float, epoch: int, total_epochs: int, milestones=(0.5, 0.75), gamma: float = 0.1) -> float:
    """The paper's schedule: base_lr, divided by 10 from epoch floor(0.5 E) and again from floor(0.75 E).

    The k-th drop (k = 1, 2) starts no earlier than epoch k, so the first epoch always runs at
    base_lr and short runs do not skip a rate: 1 epoch [lr], 2 epochs [lr, lr/10], 3 epochs
    [lr, lr/10, lr/100]; from 4 epochs on the floors are already far enough apart (500: 250, 375).
    """
    starts = [max(int(m * total_epochs), k) for k, m in enumerate(sorted(milestones), start=1)]
    drops = sum(1 for start in starts if epoch >= start)
    return float(base_lr) * gamma ** drops


def cosine_lr(base_lr: float, epoch: float, total_epochs: int, min_lr: float = 0.0) -> float:
    """Cosine annealing from base_lr (epoch 0) towards min_lr (reached at epoch E)."""
    t = min(max(float(epoch) / max(1, total_epochs), 0.0), 1.0)
    return float(min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t)))


def constant_lr(base_lr: float, epoch: float, total_epochs: int) -> float:
    return float(base_lr)


WARMUP_FACTOR = 0.1  # He et al. (2016) trained their 110-layer CIFAR net at lr / 10 until it started to learn


def make_lr_schedule(name: str, base_lr: float, total_epochs: int, warmup_epochs: int = 0):
    """A function epoch -> lr for ``"step"`` (the paper), ``"cosine"`` or ``"constant"``; the first
    ``warmup_epochs`` epochs run at ``WARMUP_FACTOR * base_lr`` whatever the schedule says there."""
    table = {"step": step_lr, "cosine": cosine_lr, "constant": constant_lr}
    if name not in table:
        raise ValueError(f"unknown learning-rate schedule {name!r}; expected one of {LR_SCHEDULES}")
    fn = table[name]
    return lambda epoch: fn(base_lr, epoch, total_epochs) * (WARMUP_FACTOR if epoch < warmup_epochs else 1.0)
