"""The same CIFAR ResNet in PyTorch, the yardstick of the benchmark tables (PyTorch is optional).

Self-contained on purpose: the benchmarks compare speed, not weights, so this copy only has to do
the same work as ``minisd.models.resnet_cifar`` (post-activation blocks, zero-pad shortcuts,
batch-mode gates, p_l * branch at test time), not to hold the same numbers.
"""
from __future__ import annotations

import numpy

from minisd import models

__all__ = ["import_torch", "torch_resnet"]


def import_torch():
    """The torch module, or None when PyTorch is not importable (it is never a dependency)."""
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        return None
    return torch


def torch_resnet(depth, survival_probs, seed=0, device="cpu"):
    """(model, optimizer): ResNet-``depth`` in PyTorch and its SGD (momentum 0.9, Nesterov, weight
    decay 1e-4, as the minisd step uses). Gates are drawn on the host, once per forward for the
    whole batch; a dropped branch is never called. Input (N, 3, H, W) -> logits (N, 10).
    """
    torch = import_torch()
    nn, fn = torch.nn, torch.nn.functional

    class Block(nn.Module):
        def __init__(self, cin, cout, stride, p, gen):
            super().__init__()
            self.branch = nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
            self.stride, self.extra, self.p, self.gen = stride, cout - cin, p, gen

        def forward(self, x):
            s = x
            if self.stride != 1 or self.extra:
                s = fn.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, 0, self.extra))
            if not self.training:
                return torch.relu(s + self.p * self.branch(x))
            if self.p < 1.0 and self.gen.random() >= self.p:
                return torch.relu(s)  # dropped: the branch is never called
            return torch.relu(self.branch(x) + s)

    n = models.blocks_per_stage(depth)
    gen = numpy.random.default_rng([seed, 1])
    torch.manual_seed(seed)
    layers, cin, probs = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()], 16, iter(survival_probs)
    for stage, width in enumerate((16, 32, 64)):
        for index in range(n):
            layers.append(Block(cin, width, 2 if stage and not index else 1, next(probs), gen))
            cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
    model = nn.Sequential(*layers).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    return model, opt
