"""Answers that hand exercise 6 to minisd (linear_decay passed itself, the issue's example)."""
from minisd import residual
from minisd.plots import fit_step_time

linear_decay = residual.linear_decay


def expected_depth(probs):
    return residual.expected_active_blocks(probs)


def fit_time_model(active_blocks, seconds):
    fit = fit_step_time(active_blocks, seconds)
    return fit["fixed_s"], fit["per_block_s"]


def predicted_saving(fixed_s, per_block_s, probs):
    expected = residual.expected_active_blocks(probs)
    return 1 - (fixed_s + per_block_s * expected) / (fixed_s + per_block_s * len(probs))
