"""Reference solution of notebooks/exercises/06_schedule_and_time_model.ipynb."""
import numpy as np


def linear_decay(num_blocks, final_survival):
    """p_l = 1 - (l / L) (1 - p_L) for l = 1 .. L."""
    return [1 - (l / num_blocks) * (1 - final_survival) for l in range(1, num_blocks + 1)]


def expected_depth(probs):
    """E[number of blocks that run] = sum of E[b_l] = sum of p_l (linearity of expectation)."""
    return float(sum(probs))


def fit_time_model(active_blocks, seconds):
    """Least-squares line seconds = fixed + per_block * active_blocks: returns (fixed, per_block)."""
    k = np.asarray(active_blocks, dtype=float)
    t = np.asarray(seconds, dtype=float)
    design = np.stack([np.ones_like(k), k], axis=1)
    (fixed, per_block), *_ = np.linalg.lstsq(design, t, rcond=None)
    return float(fixed), float(per_block)


def predicted_saving(fixed_s, per_block_s, probs):
    """1 - E[step time] / (step time with every block)."""
    return 1 - (fixed_s + per_block_s * sum(probs)) / (fixed_s + per_block_s * len(probs))
