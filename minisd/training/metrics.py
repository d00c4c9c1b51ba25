"""What a run measures besides its loss: accuracy on a split (:func:`evaluate`), and the mean
absolute gradients per epoch that the paper's Figure 8 plots (:class:`GradientMagnitudes`)."""
from __future__ import annotations

import math

from minisd import backend, data
from minisd import functional as F

__all__ = ["evaluate", "EvaluationStopped", "GradientMagnitudes"]


class EvaluationStopped(Exception):
    """Raised by :func:`evaluate` when its ``stop`` callable asked it to stop (Ctrl-C)."""


def evaluate(model, split: data.Split, batch_size: int = 500, stop=None) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model`` on ``split`` in eval mode: every branch runs, scaled by
    its rule. The model's training flag is restored afterwards.

    stop: a callable asked before each batch; when it returns True the evaluation ends at once with
    :class:`EvaluationStopped` (the trainer passes "was Ctrl-C pressed?").
    """
    was_training = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0, len(split)
    try:
        for xb, yb in data.batches(split, batch_size):
            if stop is not None and stop():
                raise EvaluationStopped
            logits = model(xb)
            loss, _ = F.softmax_cross_entropy_forward(logits, yb)
            loss_sum += float(loss) * int(yb.shape[0])
            correct += int((logits.argmax(axis=1) == yb).sum())
    finally:
        model.train(was_training)
    return (loss_sum / n, correct / n) if n else (math.nan, math.nan)


class GradientMagnitudes:
    """Mean absolute gradient over an epoch's steps: of the stem convolution's weight, and of each
    residual block's branch parameters over the steps where the block ran.

    Call :meth:`add_step` once per step, after backward (the gradients of this step are in the
    modules' ``grads``). Per step it takes mean |g| over the elements of the first conv's weight,
    and for every block whose branch ran, mean |g| over all elements of the branch's parameters;
    :meth:`summary` averages these over the steps. The sums stay on the arrays' device in float64
    (no host round trip per step); they are read back only by :meth:`summary` and
    :meth:`state_dict`, which is exact (float64 to a Python float and back), so a resumed epoch
    reports exactly what an uninterrupted one does.

    first_conv: the stem Conv2d (``model.conv1``). blocks: the residual blocks (``model.blocks``).
    """

    def __init__(self, first_conv, blocks):
        self.first_conv = first_conv
        self.blocks = list(blocks)
        # The modules that own the branch's parameters (their grads dicts are read at each step:
        # model.to() may replace the arrays).
        self.branch_modules = [[m for m in block.branch.modules() if m.params] for block in self.blocks]
        self.branch_sizes = [sum(int(p.size) for p in block.branch.parameters()) for block in self.blocks]
        self._sizes = None             # branch_sizes on the gradients' device, made at the first step
        self.reset()

    def reset(self) -> None:
        """Start a new epoch."""
        self.first_conv_sum = None     # float64 0-d array on the weight's device, or None before a step
        self.steps = 0
        self.block_sums = None         # float64 (blocks,) array on the device, or None before a block ran
        self.block_steps = [0] * len(self.blocks)

    def add_step(self) -> None:
        weight_grad = self.first_conv.grads["weight"]
        xp = backend.array_module(weight_grad)
        value = xp.abs(weight_grad).mean(dtype=xp.float64)
        self.first_conv_sum = value if self.first_conv_sum is None else self.first_conv_sum + value
        self.steps += 1
        # A dropped block's gradient is zero by construction, not a sample: only the blocks that ran.
        ran = [i for i, block in enumerate(self.blocks) if not block.branch_skipped]
        if not ran:
            return
        # One float32 |g| sum per parameter array, added up per block, then the blocks' totals
        # gathered into one float64 vector: fewer small array operations per step than a running
        # float64 sum per array and block (NumPy's pairwise float32 sums stay within about 1e-7 of
        # float64 at these sizes). Measured: docs/performance.md#gradient-logging
        totals = xp.stack([sum(xp.abs(g).sum() for m in self.branch_modules[i] for g in m.grads.values())
                           for i in ran]).astype(xp.float64)
        if self._sizes is None or backend.array_module(self._sizes) is not xp:  # once (and after model.to())
            self._sizes = xp.asarray(self.branch_sizes, dtype=xp.float64)
        if self.block_sums is None:
            self.block_sums = xp.zeros(len(self.blocks), dtype=xp.float64)
        self.block_sums[ran] += totals / self._sizes[ran]
        for i in ran:
            self.block_steps[i] += 1

    def _block_sums_on_host(self) -> list:
        """The running sums as Python floats, None for a block that has not run this epoch."""
        if self.block_sums is None:
            return [None] * len(self.blocks)
        values = backend.to_numpy(self.block_sums).tolist()
        return [value if count else None for value, count in zip(values, self.block_steps)]

    def summary(self) -> dict:
        """{"first_conv_grad": float or None, "block_grad": [float or None per block]} for the epoch."""
        first = float(self.first_conv_sum) / self.steps if self.steps else None
        blocks = [None if total is None else total / count
                  for total, count in zip(self._block_sums_on_host(), self.block_steps)]
        return {"first_conv_grad": first, "block_grad": blocks}

    def state_dict(self) -> dict:
        """The running sums as plain numbers (JSON), for a checkpoint taken in the middle of an epoch."""
        return {"first_conv_sum": None if self.first_conv_sum is None else float(self.first_conv_sum),
                "steps": self.steps,
                "block_sums": self._block_sums_on_host(),
                "block_steps": list(self.block_steps)}

    def load_state_dict(self, state: dict | None) -> None:
        """Restore :meth:`state_dict`; None (a checkpoint from before these numbers existed) starts afresh."""
        self.reset()
        if not state:
            return
        xp = backend.array_module(self.first_conv.grads["weight"])
        if len(state["block_sums"]) != len(self.blocks):
            raise ValueError(f"gradient magnitudes for {len(state['block_sums'])} blocks, the model has {len(self.blocks)}")
        if state["first_conv_sum"] is not None:
            self.first_conv_sum = xp.asarray(state["first_conv_sum"], dtype=xp.float64)
        self.steps = int(state["steps"])
        self.block_steps = [int(v) for v in state["block_steps"]]
        if any(v is not None for v in state["block_sums"]):
            self.block_sums = xp.asarray([0.0 if v is None else float(v) for v in state["block_sums"]],
                                         dtype=xp.float64)
