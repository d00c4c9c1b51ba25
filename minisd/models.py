"""The paper's CIFAR ResNet (He et al. 2016, as used by Huang et al. 2016), depth = 6n + 2.

    conv3x3(16) - BN - ReLU                      stem
    n blocks, 16 channels                        layer1
    n blocks, 32 channels (first: stride 2)      layer2
    n blocks, 64 channels (first: stride 2)      layer3
    global average pool - linear(num_classes)    head

ResNet-20, 32, 44, 56, 110 and 1202 have n = 3, 5, 7, 9, 18 and 200. The input size is free:
8x8 digits give 8 -> 4 -> 2 pixels per stage, 32x32 CIFAR images 32 -> 16 -> 8.
"""
from __future__ import annotations

import numpy

from minisd.layers import BatchNorm2d, Conv2d, GlobalAvgPool2d, Linear, Module, ReLU, Sequential
from minisd.residual import BasicBlock, expected_active_blocks, make_schedule

__all__ = ["ResNetCifar", "resnet_cifar", "blocks_per_stage"]


def _whole_number(name, value, low) -> int:
    """``value`` if it is a whole number >= ``low`` (TypeError for 20.0, "20" or True; ValueError below ``low``)."""
    if isinstance(value, bool) or not isinstance(value, (int, numpy.integer)):
        raise TypeError(f"resnet_cifar: {name} must be a whole number, got {value!r} ({type(value).__name__})")
    if value < low:
        raise ValueError(f"resnet_cifar: {name} must be >= {low}, got {value}")
    return int(value)


def blocks_per_stage(depth: int) -> int:
    """n for depth = 6n + 2; TypeError for a depth that is not a whole number, ValueError for any other depth."""
    if isinstance(depth, bool) or not isinstance(depth, (int, numpy.integer)):
        raise TypeError(f"resnet_cifar: depth must be a whole number 6n + 2 (20, 32, 44, 56, 110, 1202, ...), "
                        f"got {depth!r} ({type(depth).__name__})")
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"resnet_cifar: depth must be 6n + 2 (20, 32, 44, 56, 110, 1202, ...), got {depth}")
    return (depth - 2) // 6


class ResNetCifar(Module):
    """The CIFAR ResNet with stochastic depth on every residual block; see :func:`resnet_cifar`.

    ``blocks`` lists the residual blocks in order; ``survival_probs`` their p_l.
    Forward: (N, in_channels, H, W) images -> (N, num_classes) logits.
    """

    def __init__(self, depth=20, num_classes=10, in_channels=3, schedule="linear", final_survival=0.5,
                 mode="batch", scale="eval", shortcut="zero_pad", seed=0, dtype=None):
        super().__init__()
        n = blocks_per_stage(depth)
        num_classes = _whole_number("num_classes", num_classes, 1)
        in_channels = _whole_number("in_channels", in_channels, 1)
        self.depth, self.num_classes, self.in_channels = int(depth), num_classes, in_channels
        self.schedule, self.final_survival = schedule, float(final_survival)
        init_rng = numpy.random.default_rng(seed)
        # Gates have their own stream, so changing the schedule never changes the initial weights.
        self.gate_rng = numpy.random.default_rng([int(seed), 1])
        self.survival_probs = make_schedule(schedule, 3 * n, final_survival)
        self.conv1 = Conv2d(in_channels, 16, 3, 1, 1, bias=False, dtype=dtype, rng=init_rng)
        self.bn1 = BatchNorm2d(16, dtype=dtype)
        self.relu = ReLU()
        blocks, probs = [], iter(self.survival_probs)
        in_ch = 16
        stages = []
        for stage, width in enumerate((16, 32, 64)):
            stage_blocks = []
            for index in range(n):
                stride = 2 if (stage > 0 and index == 0) else 1
                block = BasicBlock(in_ch, width, stride, next(probs), mode=mode, scale=scale, shortcut=shortcut,
                                   dtype=dtype, rng=init_rng, gate_rng=self.gate_rng)
                stage_blocks.append(block)
                in_ch = width
            blocks.extend(stage_blocks)
            stages.append(Sequential(*stage_blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = GlobalAvgPool2d()
        self.fc = Linear(64, num_classes, dtype=dtype, rng=init_rng)
        self.blocks: list[BasicBlock] = blocks
        for block in blocks:
            # Every block's input is the stem's ReLU output or a block's output (a ReLU output,
            # or a dropped block's shortcut of one): never negative. A dropped block may then
            # skip its output ReLU (see BasicBlock.forward).
            block.input_is_relu_output = True

    def extra_repr(self):
        return f"depth={self.depth}, schedule={self.schedule!r}, final_survival={self.final_survival}"

    @property
    def expected_active_blocks(self) -> float:
        """E[active blocks] = sum of p_l."""
        return expected_active_blocks(self.survival_probs)

    # ---- gates for the whole model ---------------------------------------------------------------

    def force_gates(self, gates) -> None:
        """Force every block's gate: one value for all (True / False / None) or a sequence, one per block."""
        if gates is None or isinstance(gates, (bool, numpy.bool_)):
            gates = [gates] * len(self.blocks)
        gates = list(gates)
        if len(gates) != len(self.blocks):
            raise ValueError(f"force_gates: expected {len(self.blocks)} gates (one per block), got {len(gates)}")
        for block, gate in zip(self.blocks, gates):
            block.force_gate(gate)

    def gates(self) -> list:
        """The last gate of each block (None before any training forward, or after evaluation)."""
        return [block.gate for block in self.blocks]

    def active_fraction(self) -> float:
        """Fraction of branches that ran in the last forward (row mode: fraction of kept samples)."""
        ran = [(float(numpy.mean(b.gate)) if b.gate is not None else float(not b.branch_skipped))
               for b in self.blocks]
        return float(numpy.mean(ran)) if ran else 1.0

    def seed_gates(self, seed: int) -> None:
        """Restart the gate stream (the blocks share one generator)."""
        self.gate_rng.bit_generator.state = numpy.random.default_rng([int(seed), 1]).bit_generator.state

    # ---- forward / backward ---------------------------------------------------------------------

    def forward(self, x):
        self._check_input(x, 4, self.in_channels)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x))

    def backward(self, dlogits):
        d = self.avgpool.backward(self.fc.backward(dlogits))
        d = self.layer1.backward(self.layer2.backward(self.layer3.backward(d)))
        return self.conv1.backward(self.bn1.backward(self.relu.backward(d)))


def resnet_cifar(depth=20, num_classes=10, in_channels=3, schedule="linear", final_survival=0.5, mode="batch",
                 scale="eval", shortcut="zero_pad", seed=0, dtype=None) -> ResNetCifar:
    """The paper's CIFAR ResNet with stochastic depth.

    depth: 6n + 2 (20, 32, 44, 56, 110, 1202). schedule: "linear" (p_l = 1 - l/L (1 - p_L)),
    "uniform" (p_l = p_L) or "none" (constant depth). mode: "batch" (one gate per block per step,
    the paper) or "row" (one per sample). scale: "eval" (branch times p_l at test time, the paper)
    or "train" (kept branches divided by p_l during training). seed fixes the initial weights and
    the gate stream. dtype: None (the backend's default, float32) or "float64".
    Parameters are created on the current backend.
    """
    return ResNetCifar(depth, num_classes, in_channels, schedule, final_survival, mode, scale, shortcut, seed, dtype)

