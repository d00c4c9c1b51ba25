"""Whole training steps: the step table (constant depth, stochastic depth, PyTorch), where a step's
time goes (phases), and a step's peak memory. The package docstring says how to read them."""
from __future__ import annotations

import gc
import statistics
import time
import tracemalloc

from minisd import kernels, models
from minisd.bench.timing import BATCH, DEPTHS, ROUNDS, interleaved, load, minisd_step_fn, torch_step_fn
from minisd.bench.torch_resnet import import_torch
from minisd.kernels import fast

__all__ = ["BlockTimer", "stage_labels", "step_table", "phase_table", "memory_table"]


class BlockTimer:
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


def stage_labels(model):
    """Each block's stage label: "stage1".."stage3", "+t" for the stage's strided transition block."""
    labels = []
    for stage_index, stage in enumerate((model.layer1, model.layer2, model.layer3), 1):
        for block in stage:
            labels.append(f"stage{stage_index}" + ("+t" if block.stride != 1 else ""))
    return labels


def step_table(depths=DEPTHS, rounds=ROUNDS, final_survival=0.5, batch=BATCH, use_torch=True, out=print):
    """Median step times (constant depth, linear decay, PyTorch), SD/constant against the prediction
    from the gates drawn, and a dropped block's cost measured inside the network."""
    has_torch = use_torch and import_torch() is not None
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
        const_timer, sd_timer = BlockTimer(const), BlockTimer(sd)
        steps = {"const": const_timer.wrap_step(minisd_step_fn(const, batch)),
                 "sd": sd_timer.wrap_step(minisd_step_fn(sd, batch))}
        if has_torch:
            steps["torch"] = torch_step_fn(depth, [1.0] * len(const.blocks), batch)
            steps["torch_sd"] = torch_step_fn(depth, sd.survival_probs, batch)
        times = interleaved(steps, rounds)
        med = {k: statistics.median(v) for k, v in times.items()}
        kept = const_timer.medians(kept=True)
        dropped = sd_timer.medians(kept=False)
        labels = stage_labels(sd)
        # A block never dropped in this run: charge it its stage's median dropped time.
        by_stage = {s: statistics.median([d for d, t in zip(dropped, labels) if t == s and d is not None] or [0.0])
                    for s in set(labels)}
        dropped_filled = [d if d is not None else by_stage[s] for d, s in zip(dropped, labels)]
        saving = [k - d for k, d in zip(kept, dropped_filled)]
        # Round by round: the SD step against the constant-depth step of the same round, and its
        # prediction from that round's kept-block times and the gates this SD step drew. Pairing
        # by round cancels the load drifting between rounds (docs/performance.md, "Benchmarks").
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
            # not the typical gap (docs/performance.md, "Benchmarks", has a run where they disagree).
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


_PHASES = {
    "im2col (full, width-only, height-only)": ["_im2col_into", "_width_columns", "_height_columns"],
    "col2im, row-slide adds": ["_col2im_into", "_add_row_shifts"],
    "conv (products + glue)": ["conv2d_forward", "conv2d_backward"],
    "batch norm": ["batch_norm_forward", "batch_norm_backward", "update_running_stats"],
    "relu": ["relu_forward", "relu_backward"],
    "shortcut": ["shortcut_forward", "shortcut_backward"],
}


def phase_table(depth=DEPTHS[0], rounds=ROUNDS, batch=BATCH, out=print):
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
            originals[name] = getattr(fast, name)
            setattr(fast, name, wrap(name, originals[name]))
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
            setattr(fast, name, fn)
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


def memory_table(depth=DEPTHS[0], rounds=ROUNDS, final_survival=0.5, batch=BATCH, out=print):
    """Peak traced memory of one training step (tracemalloc: NumPy reports its allocations): one
    constant-depth step, and the mean of ``rounds`` stochastic-depth steps (their gates differ)."""
    results = {}
    for name, schedule in (("constant", "none"), ("stochastic depth", "linear")):
        model = models.resnet_cifar(depth, schedule=schedule, final_survival=final_survival, seed=0)
        step = minisd_step_fn(model, batch)
        step()  # momentum buffers exist from here on: they are not part of the step's peak
        peaks = []
        for _ in range(1 if schedule == "none" else rounds):
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
    out(f"{'stochastic depth':<18} {sd / 2**20:>8.1f}   (mean of {rounds} steps; "
        f"min {min(results['stochastic depth']) / 2**20:.1f}, max {max(results['stochastic depth']) / 2**20:.1f})")
    out(f"{'SD / constant':<18} {sd / const:>8.3f}")
    return const, sd
