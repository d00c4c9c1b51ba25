#!/usr/bin/env python
"""Time one training step of the CIFAR ResNets on the GPU (CuPy), beside PyTorch when it can run.

    python benchmarks/gpu_step.py                        # ResNet-20/56/110, batch 128, 32x32
    python benchmarks/gpu_step.py --depths 20 --repeats 5
    python benchmarks/gpu_step.py --backend numpy --batch 16 --depths 20   # a CPU sanity run

One step = forward, softmax cross-entropy, backward, SGD update (lr 0.1, momentum 0.9, Nesterov,
weight decay 1e-4, as in the paper), on a batch that already lives on the device. Each depth runs
with constant depth (every block, p_l = 1) and with the paper's linear decay to p_L = 0.5, where a
dropped block's branch is neither computed nor differentiated: the paper reports about 25% less
training time for ResNet-110.

Timing: warm-up steps first (CuPy compiles its kernels on first use, and the memory pool fills),
then every step is timed on its own between CUDA events recorded on the current stream, after a
device synchronisation, and the median is reported (the linear-decay steps vary with the gates
drawn, so the median and the quartiles are more telling than the mean).

PyTorch: when ``torch`` is importable and sees a GPU, the same network (post-activation CIFAR
ResNet, subsample-and-zero-pad shortcuts, the same stochastic-depth rule, the same SGD) is timed
the same way, and the ratio minisd / PyTorch is printed. TF32 is switched off in PyTorch, because
CuPy's float32 matrix products do not use it either; cuDNN autotuning is on.

Without a usable GPU (or without CuPy) the script prints one line saying which is missing and
exits with status 2.
"""
from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time

import numpy as np

from minisd import backend, models
from minisd import functional as F


def _parse(argv):
    p = argparse.ArgumentParser(description="Time one training step of CIFAR ResNets on the GPU.")
    p.add_argument("--depths", type=int, nargs="+", default=[20, 56, 110])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=32, help="image height and width")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--backend", default="cupy", choices=["cupy", "numpy"],
                   help="cupy (default); numpy only to check the script on a CPU")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


class _Timer:
    """Milliseconds of one step: CUDA events on the GPU, perf_counter around synchronisations else."""

    def __init__(self, cuda_module=None, synchronize=None):
        self.cuda = cuda_module  # cupy.cuda or torch.cuda, or None
        self.synchronize = synchronize or (lambda: None)

    def time(self, step) -> float:
        self.synchronize()
        if self.cuda is not None:
            start, end = self._event(), self._event()
            start.record()
            step()
            end.record()
            end.synchronize()
            return self._elapsed(start, end)
        t0 = time.perf_counter()
        step()
        self.synchronize()
        return (time.perf_counter() - t0) * 1e3

    def _event(self):
        # PyTorch's CUDA events keep no time unless asked (enable_timing=False by default, and
        # elapsed_time then raises); CuPy's keep it by default and take no such argument.
        if self.cuda.__name__.startswith("torch"):
            return self.cuda.Event(enable_timing=True)
        return self.cuda.Event()

    def _elapsed(self, start, end) -> float:
        if hasattr(start, "elapsed_time"):  # torch.cuda.Event
            return float(start.elapsed_time(end))
        return float(self.cuda.get_elapsed_time(start, end))  # cupy.cuda


def _summary(times) -> dict:
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median": statistics.median(times), "q1": q[0], "q3": q[2]}


# ------------------------------------------------------------------------------------------------
# minisd
# ------------------------------------------------------------------------------------------------


def _sgd(model):
    try:
        from minisd.optim import SGD
    except ImportError:  # the optimizer module has not landed: a plain in-place update
        class SGD:  # noqa: N801
            def __init__(self, model, lr, **_):
                self.model, self.lr = model, lr

            def step(self):
                for _, m, k in self.model.parameter_slots():
                    m.params[k] -= self.lr * m.grads[k]
    return SGD(model, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)


def time_minisd(depth, schedule, args, timer, xp):
    backend.seed(0)
    model = models.resnet_cifar(depth=depth, schedule=schedule, final_survival=0.5, seed=0)
    model.train()
    optimizer = _sgd(model)
    host = np.random.default_rng(0)
    x = xp.asarray(host.standard_normal((args.batch, 3, args.size, args.size)).astype(np.float32))
    labels = xp.asarray(host.integers(0, 10, args.batch))
    active = []

    def step():
        model.zero_grad()
        logits = model(x)
        loss, cache = F.softmax_cross_entropy_forward(logits, labels)
        model.backward(F.softmax_cross_entropy_backward(1.0, cache))
        optimizer.step()
        active.append(sum(not b.branch_skipped for b in model.blocks))

    for _ in range(args.warmup):
        timer.time(step)
    active.clear()
    times = [timer.time(step) for _ in range(args.repeats)]
    result = _summary(times)
    result["active"] = statistics.mean(active)
    result["blocks"] = len(model.blocks)
    return result


# ------------------------------------------------------------------------------------------------
# PyTorch, the same network
# ------------------------------------------------------------------------------------------------


def _torch_or_reason():
    try:
        import torch
    except ImportError:
        return None, "PyTorch is not installed"
    if not torch.cuda.is_available():
        return None, "PyTorch sees no GPU"
    return torch, None


def _build_torch_resnet(torch, depth, survival_probs):
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride, p):
            super().__init__()
            self.p, self.stride, self.extra = p, stride, cout - cin
            self.branch = nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))

        def shortcut(self, x):
            if self.stride == 1 and self.extra == 0:
                return x
            x = x[:, :, ::self.stride, ::self.stride]
            return nn.functional.pad(x, (0, 0, 0, 0, 0, self.extra))

        def forward(self, x):
            s = self.shortcut(x)
            if self.training:
                # The gate is drawn on the host, as in minisd: a dropped branch is not computed.
                if self.p < 1.0 and random.random() >= self.p:
                    return torch.relu(s)
                return torch.relu(s + self.branch(x))
            return torch.relu(s + self.p * self.branch(x))

    n = (depth - 2) // 6
    probs = iter(survival_probs)
    layers, cin = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True)], 16
    for stage, width in enumerate((16, 32, 64)):
        for index in range(n):
            layers.append(Block(cin, width, 2 if stage > 0 and index == 0 else 1, next(probs)))
            cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
    return nn.Sequential(*layers)


def time_torch(torch, depth, survival_probs, args):
    random.seed(0)
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = _build_torch_resnet(torch, depth, survival_probs).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    labels = torch.randint(0, 10, (args.batch,), device=device)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), labels).backward()
        optimizer.step()

    timer = _Timer(torch.cuda, torch.cuda.synchronize)
    for _ in range(args.warmup):
        timer.time(step)
    return _summary([timer.time(step) for _ in range(args.repeats)])


# ------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = _parse(argv)
    for depth in args.depths:
        models.blocks_per_stage(depth)  # ValueError early for a depth that is not 6n + 2
    try:
        xp = backend.use(args.backend)
    except backend.BackendUnavailable as exc:
        print(f"gpu_step: cannot run on the GPU: {exc}")
        return 2
    if args.backend == "cupy":
        props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
        device = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        timer = _Timer(xp.cuda, backend.synchronize)
    else:
        device = "CPU (NumPy)"
        timer = _Timer(None, backend.synchronize)

    torch, torch_reason = (None, "skipped (--no-torch)") if args.no_torch else _torch_or_reason()
    if torch is not None:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    print(f"minisd {args.backend} on {device}; one SGD step, batch {args.batch}, {args.size}x{args.size}, "
          f"float32; median of {args.repeats} after {args.warmup} warm-up steps (ms, [q1, q3])")
    if torch is None:
        print(f"PyTorch comparison: {torch_reason}")
    header = f"{'network':<11} {'schedule':<17} {'active':>9} {'minisd ms':>22}"
    if torch is not None:
        header += f" {'PyTorch ms':>22} {'ratio':>7}"
    print(header)
    for depth in args.depths:
        constant_ms = None
        for schedule, label in (("none", "constant depth"), ("linear", "linear to 0.5")):
            r = time_minisd(depth, schedule, args, timer, xp)
            cell = f"{r['median']:9.2f} [{r['q1']:.1f}, {r['q3']:.1f}]"
            line = f"ResNet-{depth:<4} {label:<17} {r['active']:5.1f}/{r['blocks']:<3} {cell:>22}"
            if torch is not None:
                probs = models.resnet_cifar(depth=depth, schedule=schedule, final_survival=0.5).survival_probs
                t = time_torch(torch, depth, probs, args)
                tcell = f"{t['median']:9.2f} [{t['q1']:.1f}, {t['q3']:.1f}]"
                line += f" {tcell:>22} {r['median'] / t['median']:7.2f}"
            if constant_ms is None:
                constant_ms = r["median"]
            else:
                line += f"   ({r['median'] / constant_ms:.2f}x the constant-depth time)"
            print(line, flush=True)
    if not math.isfinite(constant_ms or 0.0):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
