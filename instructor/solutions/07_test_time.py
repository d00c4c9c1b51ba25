"""Reference solution of notebooks/exercises/07_test_time.ipynb."""
import numpy as np


def block_output_at_test_time(branch_out, shortcut_out, p):
    """The paper's test-time rule: every branch runs, scaled by its survival probability."""
    return np.maximum(p * branch_out + shortcut_out, 0.0)


def network_at_test_time(model, x, gates=None):
    """Logits of a ResNetCifar in evaluation: branches weighted by p_l (gates None) or by the given gates."""
    h = model.relu(model.bn1(model.conv1(x)))
    for l, block in enumerate(model.blocks):
        weight = block.survival_prob if gates is None else float(gates[l])
        shortcut = block.shortcut(h)
        branch = block.branch(h) if weight else 0.0    # a dropped branch is not run
        h = block_output_at_test_time(branch, shortcut, weight)
    return model.fc(model.avgpool(h))
