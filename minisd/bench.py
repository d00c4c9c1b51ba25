"""Benchmarks: what a training step costs, against PyTorch, and what stochastic depth saves.

This module is the one home of the benchmark code. ``minisd bench`` (:func:`main`) runs it; the
scripts in ``benchmarks/`` are thin entry points into it (``training_step.py``, ``layers.py``, and
``gpu_step.py``, which runs :func:`gpu_main` on CuPy). Everything here prints tables; none of it is
a test. PyTorch is used as a yardstick *only if it is importable* (it is never a dependency).

What ``minisd bench`` prints, in one run:

* **the dropped-block cost** (:func:`block_table`): a residual block, told as in a network that its
  input is a ReLU output, timed forward + backward with its gate forced on and forced off, the two
  interleaved; the dropped time as a fraction of the kept time;
* **the training steps** (:func:`step_table`), for ResNet-20, 56 and 110: constant depth, stochastic
  depth and PyTorch take turns step by step; minisd / PyTorch; SD / constant against the ratio
  predicted from the block times and the gates actually drawn; and the dropped-block cost again,
  measured inside the whole network (every block's forward + backward timed while it is dropped
  and while it is kept).

How to read the numbers
-----------------------
* The machine may be shared and noisy, so every comparison is measured **in one run, interleaved**
  (the contenders take turns, step by step) and reported as medians and ratios of medians, never
  as absolute times from different runs. The load average is printed with each table.
* A step is forward, loss, backward and an SGD update (momentum 0.9, Nesterov, weight decay 1e-4),
  batch 128 of 3x32x32 float32 random images, the same in minisd and PyTorch (eager, NCHW).
* Threads: the BLAS behind NumPy and PyTorch's intra-op pool get the same count (``--threads``).
  NumPy's BLAS is limited with threadpoolctl when it is installed; otherwise set
  ``OPENBLAS_NUM_THREADS`` (or ``OMP_NUM_THREADS``) before starting Python.

The stochastic-depth prediction
-------------------------------
A step costs a fixed part (stem, head, loss, SGD) plus, for each block l, K_l when it is kept and
D_l when it is dropped (forward + backward of the whole block: branch, shortcut, residual sum,
output ReLU). So a stochastic-depth step with gates b_l should take::

    T_sd = T_const - sum_l (1 - b_l) * (K_l - D_l)

K_l is measured in the constant-depth steps of the same run and D_l in the stochastic-depth steps
(a timer around every block's forward and backward), so the prediction charges each stage its own
speed. The prediction is made round by round, with the kept-block times of that round's
constant-depth step and the gates its stochastic-depth step drew. The ``gap`` column is the median
over the rounds of (measured ratio - that round's prediction): the gate noise (which blocks happened
to run) and the load of the moment are in both sides of each difference, and what remains is the
cost model's error. (The SD/const and pred(drawn) columns are each a median over the rounds, of
rounds with different gates, so their difference is not the gap.) The expected ratio, with the
survival probabilities p_l in place of the gates, and ``E[active blocks] / L`` are printed too.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import time
import tracemalloc

import numpy

from minisd import backend, kernels, models, optim, residual
from minisd.kernels import fast as F  # the tier training runs; the phase and layer tables call it

__all__ = ["main", "build_parser", "set_threads", "load", "block_table", "step_table", "phase_table",
           "memory_table", "layer_table", "minisd_step_fn", "torch_step_fn", "torch_resnet", "gpu_main"]

BATCH = 128
IMAGE = (3, 32, 32)


def load() -> str:
    """The machine's load averages (1, 5, 15 min), for the record beside each table."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:  # not available on this platform
        return "load: unknown"
    return f"load {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


# ----------------------------------------------------------------------------------------------
# Threads and PyTorch (both optional)
# ----------------------------------------------------------------------------------------------

_THREAD_LIMITS = []  # keep threadpoolctl's limiter alive


def set_threads(threads: int) -> str:
    """Use ``threads`` threads in minisd's convolution chunks, NumPy's BLAS (via threadpoolctl, if
    installed) and PyTorch (if importable)."""
    kernels.set_num_threads(threads)
    notes = [f"minisd chunk threads: {kernels.get_num_threads()}"]
    try:
        from threadpoolctl import threadpool_info, threadpool_limits  # noqa: PLC0415
    except ImportError:
        notes.append("threadpoolctl not installed: BLAS threads as set by OPENBLAS_NUM_THREADS")
    else:
        _THREAD_LIMITS.append(threadpool_limits(limits=threads, user_api="blas"))
        blas = [f"{i.get('internal_api')} {i.get('num_threads')}" for i in threadpool_info() if i.get("user_api") == "blas"]
        notes.append("BLAS threads: " + ", ".join(blas))
    torch = _torch()
    if torch is not None:
        torch.set_num_threads(threads)
        notes.append(f"torch {torch.__version__} threads: {torch.get_num_threads()}")
    return "; ".join(notes)


def _torch():
    try:
        import torch  # noqa: PLC0415  (optional yardstick, never a dependency)
    except ImportError:
        return None
    return torch


def torch_resnet(depth, survival_probs, seed=0, device="cpu"):
    """The same CIFAR ResNet in PyTorch, and its SGD: post-activation blocks, zero-pad shortcuts,
    batch-mode gates drawn on the host (a dropped branch is never called), p_l * branch at test time.
    """
    torch = _torch()
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


# ----------------------------------------------------------------------------------------------
# Training steps
# ----------------------------------------------------------------------------------------------


def _data(batch, seed=0, size=32):
    rng = numpy.random.default_rng(seed)
    x = rng.standard_normal((batch, IMAGE[0], size, size)).astype(numpy.float32)
    y = rng.integers(0, 10, batch)
    return x, y


def minisd_step_fn(model, batch=BATCH, size=32):
    """A closure running one training step (forward, loss, backward, SGD) of a minisd model, on a
    batch of random images on the model's backend (moved there once, before any step).

    Sets ``model.conv1.input_grad = False``, as the trainer does: the images need no gradient.
    """
    x, y = (backend.to_device(a) for a in _data(batch, size=size))
    opt = optim.SGD(model, lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    model.conv1.input_grad = False

    def step():
        opt.zero_grad()
        pairs = kernels.current()
        loss, cache = pairs.softmax_cross_entropy_forward(model(x), y)
        model.backward(pairs.softmax_cross_entropy_backward(1.0, cache))
        opt.step()

    return step


def torch_step_fn(depth, survival_probs, batch=BATCH, device="cpu", size=32):
    torch = _torch()
    model, opt = torch_resnet(depth, survival_probs, device=device)
    x, y = (torch.from_numpy(a).to(device) for a in _data(batch, size=size))

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _interleaved(steps: dict, rounds: int, warmup: int = 1, settle: float = 0.05) -> dict:
    """Run the step functions in turn, ``rounds`` times (after ``warmup`` untimed rounds).

    The order rotates from round to round (round r starts with the r-th contender), and every
    step starts after a ``settle`` pause. Why: after a step, its thread pools keep their cores busy
    for a while (OpenMP and OpenBLAS workers spin-wait before they sleep), which slows whatever
    runs next. In a fixed order that cost always lands on the same contender: measured on this
    2-core machine, minisd's constant-depth step, always run right after PyTorch's, came out
    slower than its stochastic-depth step by 0.53x instead of the 0.75x predicted.
    """
    times = {name: [] for name in steps}
    names = list(steps)
    for r in range(warmup + rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            time.sleep(settle)
            t0 = time.perf_counter()
            steps[name]()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


class _BlockTimer:
    """Times every residual block's forward + backward, step by step, through instance wrappers.

    ``per_step[i][l]`` is block l's time in step i, ``ran[i][l]`` whether its branch ran.
    """

    def __init__(self, model):
        self.model = model
        self.per_step, self.ran = [], []
        self._current = [0.0] * len(model.blocks)
        for index, block in enumerate(model.blocks):
            block.forward = self._wrap(block.forward, index)
            block.backward = self._wrap(block.backward, index)

    def _wrap(self, fn, index):
        def timed(x):
            t0 = time.perf_counter()
            out = fn(x)
            self._current[index] += time.perf_counter() - t0
            return out
        return timed

    def wrap_step(self, step):
        def timed_step():
            self._current = [0.0] * len(self.model.blocks)
            step()
            self.per_step.append(self._current)
            self.ran.append([not b.branch_skipped for b in self.model.blocks])
        return timed_step

    def medians(self, kept: bool, skip: int = 1):
        """Block l's median time over the steps (after ``skip`` warm-up steps) in which it was
        kept (or dropped); None for a block never seen that way."""
        out = []
        for l in range(len(self.model.blocks)):
            ts = [t[l] for t, r in zip(self.per_step[skip:], self.ran[skip:]) if r[l] == kept]
            out.append(statistics.median(ts) if ts else None)
        return out


def _stage_of(model):
    """Each block's stage label: "stage1".."stage3", "+t" for the stage's strided transition block."""
    labels = []
    for stage_index, stage in enumerate((model.layer1, model.layer2, model.layer3), 1):
        for block in stage:
            labels.append(f"stage{stage_index}" + ("+t" if block.stride != 1 else ""))
    return labels


def step_table(depths=(20, 56, 110), rounds=8, final_survival=0.5, batch=BATCH, use_torch=True, out=print):
    """Median step times (constant depth, linear decay, PyTorch), SD/constant against the prediction
    from the gates drawn, and a dropped block's cost measured inside the network."""
    has_torch = use_torch and _torch() is not None
    out(f"\nTraining step (batch {batch}, 3x32x32, float32), median of {rounds} interleaved rounds; "
        f"SD = linear decay to p_L = {final_survival}; {load()} at the start")
    head = (f"{'depth':>5} {'const ms':>9} {'SD ms':>8} {'SD/const':>8} {'pred(drawn)':>11} {'gap':>7} {'pred(p)':>8} "
            f"{'E[act]/L':>8} {'drawn':>6}")
    if has_torch:
        head += f" {'torch ms':>9} {'minisd/torch':>12} {'torch SD/const':>14}"
    head += "   dropped/kept block in the network"
    out(head)
    rows = []
    for depth in depths:
        const = models.resnet_cifar(depth, schedule="none", seed=0)
        sd = models.resnet_cifar(depth, schedule="linear", final_survival=final_survival, seed=0)
        const_timer, sd_timer = _BlockTimer(const), _BlockTimer(sd)
        steps = {"const": const_timer.wrap_step(minisd_step_fn(const, batch)),
                 "sd": sd_timer.wrap_step(minisd_step_fn(sd, batch))}
        if has_torch:
            steps["torch"] = torch_step_fn(depth, [1.0] * len(const.blocks), batch)
            steps["torch_sd"] = torch_step_fn(depth, sd.survival_probs, batch)
        times = _interleaved(steps, rounds)
        med = {k: statistics.median(v) for k, v in times.items()}
        kept = const_timer.medians(kept=True)
        dropped = sd_timer.medians(kept=False)
        labels = _stage_of(sd)
        # A block never dropped in this run: charge it its stage's median dropped time.
        by_stage = {s: statistics.median([d for d, t in zip(dropped, labels) if t == s and d is not None] or [0.0])
                    for s in set(labels)}
        dropped_filled = [d if d is not None else by_stage[s] for d, s in zip(dropped, labels)]
        saving = [k - d for k, d in zip(kept, dropped_filled)]
        # Round by round: the SD step against the constant-depth step of the same round, and its
        # prediction from that round's kept-block times and the gates this SD step drew. Pairing
        # by round cancels the load drifting between rounds (on a shared machine the medians of
        # whole columns, taken over different moments, differed by up to 0.06 from each other).
        measured, predicted = [], []
        for const_s, sd_s, const_blocks, ran in zip(times["const"], times["sd"], const_timer.per_step[1:],
                                                    sd_timer.ran[1:]):
            measured.append(sd_s / const_s)
            predicted.append(1.0 - sum(k - d for k, d, r in zip(const_blocks, dropped_filled, ran) if not r) / const_s)
        probs = sd.survival_probs
        drawn = statistics.mean(statistics.mean(r) for r in sd_timer.ran[1:])
        fractions = {}
        for d, k, s in zip(dropped, kept, labels):
            if d is not None:
                fractions.setdefault("transition" if s.endswith("+t") else s, []).append(d / k)
        row = {
            "depth": depth,
            "const_ms": med["const"] * 1e3,
            "sd_ms": med["sd"] * 1e3,
            "ratio": statistics.median(measured),
            "predicted_drawn": statistics.median(predicted),
            # The gap that says whether the prediction holds: paired, round by round. The two medians
            # above are of different rounds (each round draws other gates), so their difference is
            # not the typical gap: in one ResNet-110 run of 10 rounds they differed by +0.018 while
            # the median round-by-round gap was -0.016.
            "gap": statistics.median(m - p for m, p in zip(measured, predicted)),
            "per_round": list(zip(measured, predicted)),
            "predicted": (med["const"] - sum((1.0 - p) * s for p, s in zip(probs, saving))) / med["const"],
            "naive": sum(probs) / len(probs),
            "realised_active": drawn,
            "dropped_fraction": {s: statistics.median(v) for s, v in sorted(fractions.items())},
        }
        if has_torch:
            row.update(torch_ms=med["torch"] * 1e3, torch_sd_ms=med["torch_sd"] * 1e3,
                       vs_torch=med["const"] / med["torch"], torch_ratio=med["torch_sd"] / med["torch"])
        rows.append(row)
        line = (f"{row['depth']:>5} {row['const_ms']:>9.0f} {row['sd_ms']:>8.0f} {row['ratio']:>8.3f} "
                f"{row['predicted_drawn']:>11.3f} {row['gap']:>+7.3f} {row['predicted']:>8.3f} {row['naive']:>8.3f} {drawn:>6.3f}")
        if has_torch:
            line += f" {row['torch_ms']:>9.0f} {row['vs_torch']:>12.2f} {row['torch_ratio']:>14.3f}"
        line += "   " + ", ".join(f"{s} {f:.2%}" for s, f in row["dropped_fraction"].items())
        out(line)
        del const, sd, steps, const_timer, sd_timer
        gc.collect()
    out(f"({load()} at the end)")
    out("SD/const = median over the rounds of T_sd / T_const (the two steps of one round); pred(drawn) = "
        "median over the rounds of 1 - sum over the blocks dropped in that round's SD step of (K_l - D_l) / T_const, "
        "with K_l block l's time (forward + backward) in that round's constant-depth step, and D_l its median "
        "time dropped, in the SD steps; gap = median over the rounds of (T_sd / T_const - that round's prediction); pred(p) = the same from median times, with (1 - p_l) in place of the gates; "
        "E[act]/L = expected active fraction; drawn = active fraction actually drawn; dropped/kept = median "
        "of D_l / K_l over the blocks of a stage (transition: the strided first blocks of stages 2 and 3)")
    return rows


# ----------------------------------------------------------------------------------------------
# The dropped block, on its own
# ----------------------------------------------------------------------------------------------

# (label, in channels, out channels, input size, stride): the blocks of the CIFAR ResNets
BLOCK_SHAPES = [
    ("stage1 16x32x32", 16, 16, 32, 1),
    ("stage2 32x16x16", 32, 32, 16, 1),
    ("stage3 64x8x8", 64, 64, 8, 1),
    ("transition 16->32 s2", 16, 32, 32, 2),
    ("transition 32->64 s2", 32, 64, 16, 2),
]


def block_table(rounds=15, batch=BATCH, out=print):
    """A block's forward + backward with its gate forced on and off, interleaved: the dropped cost.

    The block is told that its input is a ReLU output (``input_is_relu_output``), as every block of
    a ResNetCifar is, and gets a non-negative input.
    """
    rng = numpy.random.default_rng(0)
    out(f"\nA dropped block vs the same block kept (batch {batch}, float32, forward + backward, gate forced "
        f"off / on, median of {rounds} interleaved rounds; {load()})")
    out(f"{'block':<22} {'kept ms':>8} {'dropped ms':>10} {'dropped/kept':>12}")
    rows = []
    for label, cin, cout, size, stride in BLOCK_SHAPES:
        block = residual.BasicBlock(cin, cout, stride, survival_prob=0.5, rng=rng)
        block.input_is_relu_output = True
        x = F.empty_channel_major(numpy, (batch, cin, size, size), numpy.float32)
        x[...] = numpy.maximum(rng.standard_normal(x.shape), 0)  # a ReLU output
        out_size = -(-size // stride)
        dy = F.empty_channel_major(numpy, (batch, cout, out_size, out_size), numpy.float32)
        dy[...] = rng.standard_normal(dy.shape)

        def run(gate, block=block, x=x, dy=dy):
            block.force_gate(gate)
            block(x)
            block.backward(dy)

        times = _interleaved({"kept": lambda: run(True), "dropped": lambda: run(False)}, rounds, warmup=2)
        kept, dropped = statistics.median(times["kept"]), statistics.median(times["dropped"])
        rows.append((label, kept, dropped))
        out(f"{label:<22} {kept * 1e3:>8.2f} {dropped * 1e3:>10.3f} {dropped / kept:>12.2%}")
    return rows


# ----------------------------------------------------------------------------------------------
# Where the time goes
# ----------------------------------------------------------------------------------------------

_PHASES = {
    "im2col (full, width-only, height-only)": ["_im2col_into", "_width_columns", "_height_columns"],
    "col2im, row-slide adds": ["_col2im_into", "_add_row_shifts"],
    "conv (products + glue)": ["conv2d_forward", "conv2d_backward"],
    "batch norm": ["batch_norm_forward", "batch_norm_backward", "update_running_stats"],
    "relu": ["relu_forward", "relu_backward"],
    "shortcut": ["shortcut_forward", "shortcut_backward"],
}


def phase_table(depth=20, rounds=5, batch=BATCH, out=print):
    """Split a constant-depth step into phases by timing the fast kernels (patched in place)."""
    model = models.resnet_cifar(depth, schedule="none", seed=0)
    step = minisd_step_fn(model, batch)
    spent = {}
    originals = {}

    def wrap(name, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0
        return timed

    for names in _PHASES.values():
        for name in names:
            originals[name] = getattr(F, name)
            setattr(F, name, wrap(name, originals[name]))
    totals = []
    per_phase = {phase: [] for phase in _PHASES}
    try:
        step()
        for _ in range(rounds):
            spent.clear()
            t0 = time.perf_counter()
            step()
            totals.append(time.perf_counter() - t0)
            for phase, names in _PHASES.items():
                per_phase[phase].append(sum(spent.get(n, 0.0) for n in names))
    finally:
        for name, fn in originals.items():
            setattr(F, name, fn)
    # im2col and col2im run inside the conv functions: the conv row keeps only the rest (the
    # matrix products and a little glue).
    for i in range(rounds):
        per_phase["conv (products + glue)"][i] -= sum(per_phase[p][i] for p in list(_PHASES)[:2])
    total = statistics.median(totals)
    med = {phase: statistics.median(v) for phase, v in per_phase.items()}
    med["other (python, loss, pool, linear, SGD, residual sums)"] = total - sum(med.values())
    out(f"\nWhere a ResNet-{depth} step goes (median of {rounds} steps, {total * 1e3:.0f} ms per step)")
    out(f"{'phase':<55} {'ms':>7} {'share':>6}")
    for phase, sec in med.items():
        out(f"{phase:<55} {sec * 1e3:>7.1f} {sec / total:>6.1%}")
    threads = kernels.get_num_threads()
    if threads > 1:
        out(f"(convolutions run their chunks on {threads} threads: the first two rows add up the threads' "
            "time, so the conv row, the wall time of the conv calls minus them, is an underestimate; "
            "minisd.kernels.set_num_threads(1) or MINISD_NUM_THREADS=1 gives the one-thread split)")
    return med, total


def memory_table(depth=56, sd_steps=5, final_survival=0.5, batch=BATCH, out=print):
    """Peak traced memory of one training step (tracemalloc: NumPy reports its allocations)."""
    results = {}
    for name, schedule in (("constant", "none"), ("stochastic depth", "linear")):
        model = models.resnet_cifar(depth, schedule=schedule, final_survival=final_survival, seed=0)
        step = minisd_step_fn(model, batch)
        step()  # momentum buffers exist from here on: they are not part of the step's peak
        peaks = []
        for _ in range(1 if schedule == "none" else sd_steps):
            kernels.clear_workspace()  # the chunk buffer is re-created inside the measured step
            gc.collect()
            tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0]
            step()
            peaks.append(tracemalloc.get_traced_memory()[1] - base)
            tracemalloc.stop()
        results[name] = peaks
        del model, step
        gc.collect()
    const = statistics.mean(results["constant"])
    sd = statistics.mean(results["stochastic depth"])
    out(f"\nPeak memory of a ResNet-{depth} training step (tracemalloc, above the model and optimizer state)")
    out(f"{'':<18} {'MiB':>8}")
    out(f"{'constant depth':<18} {const / 2**20:>8.1f}")
    out(f"{'stochastic depth':<18} {sd / 2**20:>8.1f}   (mean of {sd_steps} steps; "
        f"min {min(results['stochastic depth']) / 2**20:.1f}, max {max(results['stochastic depth']) / 2**20:.1f})")
    out(f"{'SD / constant':<18} {sd / const:>8.3f}")
    return const, sd


# ----------------------------------------------------------------------------------------------
# Single layers
# ----------------------------------------------------------------------------------------------

# (name, in channels, out channels, input size, stride) of the ResNet-20 convolutions
RESNET20_CONVS = [
    ("stem 3->16", 3, 16, 32, 1),
    ("stage1 16->16", 16, 16, 32, 1),
    ("stage2 16->32 s2", 16, 32, 32, 2),
    ("stage2 32->32", 32, 32, 16, 1),
    ("stage3 32->64 s2", 32, 64, 16, 2),
    ("stage3 64->64", 64, 64, 8, 1),
]


def _median_time(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def layer_table(batch=BATCH, reps=7, use_torch=True, out=print):
    """Forward and backward time and GFLOP/s of each ResNet-20 conv shape, plus BN and ReLU."""
    torch = _torch() if use_torch else None
    rng = numpy.random.default_rng(0)
    out(f"\nLayers of ResNet-20 (batch {batch}, float32), median of {reps}")
    head = f"{'layer':<22} {'fwd ms':>7} {'bwd ms':>7} {'fwd GF/s':>8} {'bwd GF/s':>8}"
    if torch is not None:
        head += f" {'torch f+b ms':>12} {'ratio':>6}"
    out(head)
    rows = []
    for name, cin, cout, size, stride in RESNET20_CONVS:
        x = F.empty_channel_major(numpy, (batch, cin, size, size), numpy.float32)
        x[...] = rng.standard_normal(x.shape)
        w = (rng.standard_normal((cout, cin, 3, 3)) * 0.1).astype(numpy.float32)
        y, cache = F.conv2d_forward(x, w, None, stride, 1)
        dy = F.empty_channel_major(numpy, y.shape, numpy.float32)
        dy[...] = rng.standard_normal(y.shape)
        flop = 2.0 * y.size * cin * 9
        tf = _median_time(lambda: F.conv2d_forward(x, w, None, stride, 1), reps)
        tb = _median_time(lambda: F.conv2d_backward(dy, cache), reps)
        line = f"{name:<22} {tf * 1e3:>7.1f} {tb * 1e3:>7.1f} {flop / tf / 1e9:>8.1f} {2 * flop / tb / 1e9:>8.1f}"
        if torch is not None:
            tx = torch.from_numpy(numpy.ascontiguousarray(x)).requires_grad_()
            conv = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            tdy = torch.from_numpy(numpy.ascontiguousarray(dy))

            def torch_fb():
                tx.grad = None
                conv.zero_grad()
                conv(tx).backward(tdy)

            tt = _median_time(torch_fb, reps)
            line += f" {tt * 1e3:>12.1f} {(tf + tb) / tt:>6.2f}"
        out(line)
        rows.append((name, tf, tb))
    for cout, size in ((16, 32), (32, 16), (64, 8)):
        x = F.empty_channel_major(numpy, (batch, cout, size, size), numpy.float32)
        x[...] = rng.standard_normal(x.shape)
        g, b = numpy.ones(cout, numpy.float32), numpy.zeros(cout, numpy.float32)
        rm, rv = numpy.zeros(cout, numpy.float32), numpy.ones(cout, numpy.float32)
        y, cache = F.batch_norm_forward(x, g, b, rm, rv, True)
        tf = _median_time(lambda: F.batch_norm_forward(x, g, b, rm, rv, True), reps)
        tb = _median_time(lambda: F.batch_norm_backward(y, cache), reps)
        out(f"{'batch norm ' + str(cout) + 'x' + str(size) + 'x' + str(size):<22} {tf * 1e3:>7.1f} {tb * 1e3:>7.1f}")
        y, mask = F.relu_forward(x)
        tf = _median_time(lambda: F.relu_forward(x), reps)
        tb = _median_time(lambda: F.relu_backward(y, mask), reps)
        out(f"{'relu ' + str(cout) + 'x' + str(size) + 'x' + str(size):<22} {tf * 1e3:>7.1f} {tb * 1e3:>7.1f}")
    return rows


# ----------------------------------------------------------------------------------------------
# On the GPU (CuPy), beside PyTorch on CUDA: benchmarks/gpu_step.py
# ----------------------------------------------------------------------------------------------


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


def _gpu_parser():
    p = argparse.ArgumentParser(prog="gpu_step.py", description="Time one training step of CIFAR ResNets on the GPU.")
    p.add_argument("--depths", type=int, nargs="+", default=[20, 56, 110])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=32, help="image height and width")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--backend", default="cupy", choices=["cupy", "numpy"],
                   help="cupy (default); numpy only to check the script on a CPU")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    return p


def _time_minisd_on_device(depth, schedule, args, timer):
    backend.seed(0)
    model = models.resnet_cifar(depth=depth, schedule=schedule, final_survival=0.5, seed=0)
    model.train()
    step = minisd_step_fn(model, args.batch, args.size)
    active = []

    def counted():
        step()
        active.append(sum(not b.branch_skipped for b in model.blocks))

    for _ in range(args.warmup):
        timer.time(counted)
    active.clear()
    result = _summary([timer.time(counted) for _ in range(args.repeats)])
    result["active"] = statistics.mean(active)
    result["blocks"] = len(model.blocks)
    return result


def _time_torch_on_device(torch, depth, survival_probs, args):
    step = torch_step_fn(depth, survival_probs, args.batch, device="cuda", size=args.size)
    timer = _Timer(torch.cuda, torch.cuda.synchronize)
    for _ in range(args.warmup):
        timer.time(step)
    return _summary([timer.time(step) for _ in range(args.repeats)])


def gpu_main(argv=None) -> int:
    """One training step of the CIFAR ResNets on the GPU (CuPy), beside PyTorch on CUDA when it can run.

    One step = forward, softmax cross-entropy, backward, SGD update, on a batch that already lives
    on the device. Each depth runs with constant depth and with the paper's linear decay to
    p_L = 0.5. Timing: warm-up steps first (CuPy compiles its kernels on first use, and the memory
    pool fills), then every step is timed on its own between CUDA events recorded on the current
    stream, after a device synchronisation; the median and quartiles are reported. PyTorch: the
    same network (:func:`torch_resnet`), TF32 off (CuPy's float32 products do not use it either),
    cuDNN autotuning on. Without a usable GPU (or without CuPy) one line says which is missing and
    the status is 2.
    """
    args = _gpu_parser().parse_args(argv)
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

    torch, torch_reason = (None, "skipped (--no-torch)") if args.no_torch else (_torch(), None)
    if torch is None and torch_reason is None:
        torch_reason = "PyTorch is not installed"
    elif torch is not None and not torch.cuda.is_available():
        torch, torch_reason = None, "PyTorch sees no GPU"
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
    constant_ms = None
    for depth in args.depths:
        constant_ms = None
        for schedule, label in (("none", "constant depth"), ("linear", "linear to 0.5")):
            r = _time_minisd_on_device(depth, schedule, args, timer)
            cell = f"{r['median']:9.2f} [{r['q1']:.1f}, {r['q3']:.1f}]"
            line = f"ResNet-{depth:<4} {label:<17} {r['active']:5.1f}/{r['blocks']:<3} {cell:>22}"
            if torch is not None:
                probs = models.resnet_cifar(depth=depth, schedule=schedule, final_survival=0.5).survival_probs
                t = _time_torch_on_device(torch, depth, probs, args)
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


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def build_parser(prog="minisd bench"):
    parser = argparse.ArgumentParser(prog=prog, description="Time minisd training steps (and PyTorch's, if installed).")
    parser.add_argument("--depths", type=int, nargs="+", default=[20, 56, 110], help="ResNet depths (6n+2) to time")
    parser.add_argument("--steps", type=int, default=8, help="timed rounds per depth (each round: every model once)")
    parser.add_argument("--batch-size", type=int, default=BATCH)
    parser.add_argument("--threads", type=int, default=2, help="BLAS / PyTorch threads")
    parser.add_argument("--final-survival", type=float, default=0.5, help="p_L of the linear decay")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    parser.add_argument("--blocks", action=argparse.BooleanOptionalAction, default=True,
                        help="time single blocks with the gate forced on and off (the dropped-block cost)")
    parser.add_argument("--layers", action="store_true", help="also time single layers")
    parser.add_argument("--phases", action=argparse.BooleanOptionalAction, default=False,
                        help="split a step of the first depth into phases")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=False,
                        help="peak memory, constant vs stochastic depth, for the first depth")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    print(set_threads(args.threads))
    use_torch = not args.no_torch
    if use_torch and _torch() is None:
        print("PyTorch not importable: no PyTorch comparison")
    if args.layers:
        layer_table(args.batch_size, use_torch=use_torch)
    if args.blocks:
        block_table(batch=args.batch_size)
    step_table(args.depths, args.steps, args.final_survival, args.batch_size, use_torch)
    if args.phases:
        phase_table(args.depths[0], max(3, args.steps), args.batch_size)
    if args.memory:
        memory_table(args.depths[0], 3, args.final_survival, args.batch_size)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
