"""Answers that hand exercise 7 to minisd's own forward (the one-block rule has no minisd function of arrays to hand over)."""


def network_at_test_time(model, x, gates=None):
    if gates is not None:
        for block, gate in zip(model.blocks, gates):
            block.survival_prob = 1.0 if gate else 0.0
    return model.forward(x)
