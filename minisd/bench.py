"""Benchmarks: where the time of a training step goes, and what stochastic depth saves.

``minisd bench`` (this module's :func:`main`) runs a short version; ``benchmarks/layers.py`` and
``benchmarks/training_step.py`` run the full ones. Everything here prints tables; none of it is a
test. PyTorch is used as a yardstick *only if it is importable* (it is never a dependency).

How to read the numbers
-----------------------
* The machine may be shared and noisy, so every comparison is measured **in one run, interleaved**
  (constant depth, stochastic depth and PyTorch take turns, step by step) and reported as medians
  and ratios of medians, never as absolute times from different runs.
* A step is forward, loss, backward and an SGD update (momentum 0.9, weight decay 1e-4), batch 128
  of 3x32x32 float32 random images, the same in minisd and PyTorch (eager, NCHW).
* Threads: the BLAS behind NumPy and PyTorch's intra-op pool get the same count (``--threads``).
  NumPy's BLAS is limited with threadpoolctl when it is installed; otherwise set
  ``OPENBLAS_NUM_THREADS`` (or ``OMP_NUM_THREADS``) before starting Python.

The stochastic-depth prediction
-------------------------------
A step costs a fixed part (stem, head, loss, SGD, and in every block the shortcut, the residual
sum and the output ReLU) plus, for each block l, its branch f_l (two conv-BN pairs, forward and
backward) when the gate is on. So with survival probabilities p_l::

    E[T_sd] = T_const - sum_l (1 - p_l) * B_l

where B_l is block l's branch time. B_l is measured during the constant-depth steps of the same
run (a timer around each branch's forward and backward), so the prediction charges each stage its
own speed: stage-3 branches, which linear decay drops most, run their products at a different
rate than stage-1 branches. The ratio ``E[active blocks] / L`` (which ignores the fixed part and
the per-stage speeds) is printed too, for comparison.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time
import tracemalloc

import numpy

from minisd import kernels, models, optim
from minisd.kernels import fast as F  # the tier training runs; the phase table patches it

__all__ = ["main", "set_threads", "layer_table", "step_table", "phase_table", "memory_table"]

BATCH = 128
IMAGE = (3, 32, 32)


# ----------------------------------------------------------------------------------------------
# Threads and PyTorch (both optional)
# ----------------------------------------------------------------------------------------------

_THREAD_LIMITS = []  # keep threadpoolctl's limiter alive


def set_threads(threads: int) -> str:
    """Limit NumPy's BLAS (via threadpoolctl, if installed) and PyTorch (if importable) to ``threads``."""
    notes = []
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


def _torch_resnet(depth, survival_probs, seed=0):
    """The same CIFAR ResNet in PyTorch (post-activation blocks, zero-pad shortcut, batch-mode gates)."""
    torch = _torch()
    nn, fn = torch.nn, torch.nn.functional

    class Block(nn.Module):
        def __init__(self, cin, cout, stride, p, gen):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.stride, self.extra, self.p, self.gen = stride, cout - cin, p, gen

        def forward(self, x):
            s = x
            if self.stride != 1 or self.extra:
                s = fn.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, 0, self.extra))
            if self.training and self.p < 1.0 and self.gen.random() >= self.p:
                return torch.relu(s)  # dropped: the branch is never called
            return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + s)

    n = models.blocks_per_stage(depth)
    gen = numpy.random.default_rng([seed, 1])
    torch.manual_seed(seed)
    layers, cin, probs = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()], 16, iter(survival_probs)
    for stage, width in enumerate((16, 32, 64)):
        for index in range(n):
            layers.append(Block(cin, width, 2 if stage and not index else 1, next(probs), gen))
            cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
    model = nn.Sequential(*layers).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    return model, opt


# ----------------------------------------------------------------------------------------------
# Training steps
# ----------------------------------------------------------------------------------------------


def _data(batch, seed=0):
    rng = numpy.random.default_rng(seed)
    x = rng.standard_normal((batch,) + IMAGE).astype(numpy.float32)
    y = rng.integers(0, 10, batch)
    return x, y


def minisd_step_fn(model, batch=BATCH):
    """A closure running one training step (forward, loss, backward, SGD) of a minisd model.

    Sets ``model.conv1.input_grad = False``, as the trainer does: the images need no gradient.
    """
    x, y = _data(batch)
    opt = optim.SGD(model, lr=0.01, momentum=0.9, weight_decay=1e-4)
    model.conv1.input_grad = False

    def step():
        opt.zero_grad()
        loss, cache = F.softmax_cross_entropy_forward(model(x), y)
        model.backward(F.softmax_cross_entropy_backward(1.0, cache))
        opt.step()

    return step


def torch_step_fn(depth, survival_probs, batch=BATCH):
    torch = _torch()
    model, opt = _torch_resnet(depth, survival_probs)
    x, y = (torch.from_numpy(a) for a in _data(batch))

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _interleaved(steps: dict, rounds: int, warmup: int = 1) -> dict:
    """Run the step functions in turn, ``rounds`` times (after ``warmup`` untimed rounds)."""
    times = {name: [] for name in steps}
    for r in range(warmup + rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


class _BranchTimer:
    """Times each block's branch (forward + backward) through instance-level wrappers."""

    def __init__(self, model):
        self.model = model
        self.per_step = []  # one list of branch times (s) per step
        self._current = [0.0] * len(model.blocks)
        for index, block in enumerate(model.blocks):
            branch = block.branch
            branch.forward = self._wrap(branch.forward, index)
            branch.backward = self._wrap(branch.backward, index)

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
        return timed_step

    def medians(self):
        return [statistics.median(col) for col in zip(*self.per_step)]


def step_table(depths=(20, 56, 110), rounds=20, final_survival=0.5, batch=BATCH, use_torch=True, out=print):
    """Median step times (constant depth, linear decay, PyTorch) and the SD/constant ratio vs predicted."""
    has_torch = use_torch and _torch() is not None
    out(f"\nTraining step (batch {batch}, 3x32x32, float32), median of {rounds} interleaved rounds; "
        f"SD = linear decay to p_L = {final_survival}")
    head = f"{'depth':>5} {'const ms':>9} {'SD ms':>8} {'SD/const':>8} {'predicted':>9} {'E[act]/L':>8} {'drawn':>6} {'pred(drawn)':>11}"
    if has_torch:
        head += f" {'torch ms':>9} {'minisd/torch':>12} {'torch SD/const':>14}"
    out(head)
    rows = []
    for depth in depths:
        const = models.resnet_cifar(depth, schedule="none", seed=0)
        sd = models.resnet_cifar(depth, schedule="linear", final_survival=final_survival, seed=0)
        timer = _BranchTimer(const)
        steps = {"const": timer.wrap_step(minisd_step_fn(const, batch)), "sd": minisd_step_fn(sd, batch)}
        active = []
        sd_step = steps["sd"]

        def sd_counted(sd_step=sd_step, sd=sd):
            sd_step()
            active.append([not b.branch_skipped for b in sd.blocks])

        steps["sd"] = sd_counted
        if has_torch:
            steps["torch"] = torch_step_fn(depth, [1.0] * len(const.blocks), batch)
            steps["torch_sd"] = torch_step_fn(depth, sd.survival_probs, batch)
        times = _interleaved(steps, rounds)
        med = {k: statistics.median(v) for k, v in times.items()}
        probs = sd.survival_probs
        branch = timer.medians()
        saved = sum((1.0 - p) * b for p, b in zip(probs, branch))
        kept = [statistics.mean(col) for col in zip(*active)]  # how often each branch actually ran
        saved_drawn = sum((1.0 - k) * b for k, b in zip(kept, branch))
        row = {
            "depth": depth,
            "const_ms": med["const"] * 1e3,
            "sd_ms": med["sd"] * 1e3,
            "ratio": med["sd"] / med["const"],
            "predicted": (med["const"] - saved) / med["const"],
            "naive": sum(probs) / len(probs),
            "realised_active": statistics.mean(kept),
            "predicted_drawn": (med["const"] - saved_drawn) / med["const"],
            "branch_share": sum(branch) / med["const"],
        }
        if has_torch:
            row.update(torch_ms=med["torch"] * 1e3, torch_sd_ms=med["torch_sd"] * 1e3,
                       vs_torch=med["const"] / med["torch"], torch_ratio=med["torch_sd"] / med["torch"])
        rows.append(row)
        line = (f"{row['depth']:>5} {row['const_ms']:>9.0f} {row['sd_ms']:>8.0f} {row['ratio']:>8.3f} "
                f"{row['predicted']:>9.3f} {row['naive']:>8.3f} {row['realised_active']:>6.3f} {row['predicted_drawn']:>11.3f}")
        if has_torch:
            line += f" {row['torch_ms']:>9.0f} {row['vs_torch']:>12.2f} {row['torch_ratio']:>14.3f}"
        out(line)
        del const, sd, steps
        gc.collect()
    out("predicted = (T_const - sum_l (1 - p_l) B_l) / T_const, B_l = block l's branch time measured in the "
        "constant-depth steps; E[act]/L = expected active fraction; drawn = active fraction actually drawn; "
        "pred(drawn) = the same prediction with the gates actually drawn (the cost model without the sampling noise)")
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
# Command line
# ----------------------------------------------------------------------------------------------


def build_parser(prog="minisd bench"):
    parser = argparse.ArgumentParser(prog=prog, description="Time minisd training steps (and PyTorch's, if installed).")
    parser.add_argument("--depths", type=int, nargs="+", default=[20], help="ResNet depths (6n+2) to time")
    parser.add_argument("--steps", type=int, default=5, help="timed rounds per depth (each round: every model once)")
    parser.add_argument("--batch-size", type=int, default=BATCH)
    parser.add_argument("--threads", type=int, default=2, help="BLAS / PyTorch threads")
    parser.add_argument("--final-survival", type=float, default=0.5, help="p_L of the linear decay")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    parser.add_argument("--layers", action="store_true", help="also time single layers")
    parser.add_argument("--phases", action=argparse.BooleanOptionalAction, default=True,
                        help="split a step of the first depth into phases")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
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
    step_table(args.depths, args.steps, args.final_survival, args.batch_size, use_torch)
    if args.phases:
        phase_table(args.depths[0], max(3, args.steps), args.batch_size)
    if args.memory:
        memory_table(args.depths[0], 3, args.final_survival, args.batch_size)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
