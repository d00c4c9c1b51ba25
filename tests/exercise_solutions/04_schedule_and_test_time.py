"""Reference solution of notebooks/exercises/04_schedule_and_test_time.ipynb."""
import numpy as np


def linear_decay(num_blocks, final_survival):
    """p_l = 1 - (l / L) (1 - p_L) for l = 1 .. L."""
    return [1 - (l / num_blocks) * (1 - final_survival) for l in range(1, num_blocks + 1)]


def block_output_at_test_time(branch_out, shortcut_out, p):
    """The paper's test-time rule: every branch runs, scaled by its survival probability."""
    return np.maximum(p * branch_out + shortcut_out, 0.0)
