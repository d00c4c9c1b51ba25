"""Reference solution of notebooks/exercises/03_block_backward.ipynb."""
import numpy as np


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
