"""Answers that hand exercise 5 to minisd's BasicBlock."""
from minisd import exercises, residual


def draw_gate(p, mode, batch_size, rng):
    return residual.BasicBlock(1, 1, survival_prob=p, mode=mode, gate_rng=rng)._draw_gate(batch_size)


def block_forward(block, x, gate):
    block.force_gate(gate)
    return exercises.block_forward(block, x)


def block_backward(block, dy, saved):
    return block.backward(dy)
