"""Reference solution of notebooks/exercises/05_block.ipynb."""
import numpy as np


def draw_gate(p, mode, batch_size, rng):
    """Batch mode: one bool, True with probability p. Row mode: one such bool per sample."""
    if mode == "batch":
        return bool(rng.random() < p)
    return rng.random(batch_size) < p


def block_forward(block, x, gate):
    """Training forward of a BasicBlock with the given gate: returns (y, saved)."""
    s = block.shortcut.forward(x)
    multiplier = 1.0 / block.survival_prob if block.scale == "train" else 1.0
    gate_array = np.asarray(gate)
    z = s
    if gate_array.any():                               # a dropped branch (every sample dropped) is not run
        factor = gate_array.astype(x.dtype) * multiplier
        if factor.ndim == 1:                           # row mode: one factor per sample
            factor = factor.reshape(-1, 1, 1, 1)
        z = block.branch.forward(x) * factor + s
    y = np.maximum(z, 0.0)
    return y, {"relu_mask": y > 0, "gate": gate, "multiplier": multiplier}


def block_backward(block, dy, saved):
    """Backward of a BasicBlock: returns dL/dx."""
    dz = dy * saved["relu_mask"]                       # through the output ReLU (a new array)
    dx = block.shortcut.backward(dz)                   # the shortcut always ran
    gate = np.asarray(saved["gate"])
    if gate.any():                                     # the branch ran (for some samples in row mode)
        scale = gate.astype(dz.dtype) * saved["multiplier"]
        if scale.ndim == 1:                            # row mode: one factor per sample
            scale = scale.reshape(-1, 1, 1, 1)
        dx = dx + block.branch.backward(dz * scale)    # paths merge at the input: gradients add
    return dx
