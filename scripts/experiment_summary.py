"""Print the tables of issue 21 from the stored runs of ``scripts/run_experiments.py``.

    python scripts/experiment_summary.py                    # reads experiments/runs/
    python scripts/experiment_summary.py --runs DIR

Test error is in percent. Two metrics, both printed: the test error of the best-validation checkpoint
(``summary.json``, the paper's protocol and the one the hypotheses name) and the test error after the
last epoch (the last line of ``metrics.jsonl``). Spreads are sample standard deviations over seeds.
A configuration with no stored run prints as pending. The small-data comparison is paired by seed
and tested with an exact sign-flip permutation test (``minisd.experiments.sign_flip_test``), which
needs nothing beyond the standard library.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run_experiments as plan_module  # noqa: E402

from minisd.experiments import format_mean_sd as mean_sd  # noqa: E402
from minisd.experiments import load_runs, select, sign_flip_test  # noqa: E402

DEFAULT_RUNS = os.path.join(plan_module.DEFAULT_OUT, "runs")


def find(runs, depth, schedule, p=0.5, seeds=plan_module.SEEDS, epochs=plan_module.EPOCHS, train_subset=None,
         warmup_epochs=0, lr=None):
    """The stored runs of one configuration, one per seed found (lr: the plan's rule for the depth
    unless given)."""
    return select(runs, seeds=seeds, depth=depth, schedule=schedule, final_survival=1.0 if schedule == "none" else p,
                  epochs=epochs, train_subset=train_subset, warmup_epochs=warmup_epochs,
                  lr=plan_module.learning_rate(depth) if lr is None else lr)


def blocks_run(depth, schedule, p) -> float:
    """Expected fraction of blocks run per training step, sum(p_l) / L."""
    num_blocks = plan_module.blocks(depth)
    return sum(plan_module.residual.make_schedule(schedule, num_blocks, 1.0 if schedule == "none" else p)) / num_blocks


def error_columns(found) -> str:
    return (f"{mean_sd(r.best_error for r in found):>16} {mean_sd(r.last_error for r in found):>16} "
            f"{len(found):>3}")


ERROR_HEADER = f"{'best-val ckpt':>16} {'last epoch':>16} {'n':>3}"


def wallclock_table(runs) -> list[str]:
    matched = plan_module.matched_uniform_p()
    rows = [("constant depth", "none", 1.0), ("linear decay, p_L = 0.5", "linear", 0.5),
            (f"uniform, p = {plan_module.format_p(matched)} (matched)", "uniform", matched)]
    lines = ["Wall-clock time to train ResNet-110 for 30 epochs (summary.json wall_time_s; 'steps': the "
             "epochs' time_s, evaluation left out), seconds, mean ± sd over seeds",
             f"  {'schedule':<32} {'blocks run':>10} {'measured':>9} {'wall time s':>16} {'steps s':>16} "
             f"{'vs constant':>11} {'n':>3}"]
    constant = find(runs, 110, "none", 1.0)
    for label, schedule, p in rows:
        found = find(runs, 110, schedule, p)
        ratio = (f"{statistics.fmean(r.wall_time for r in found) / statistics.fmean(r.wall_time for r in constant):.3f}"
                 if found and constant else "-")
        measured = f"{statistics.fmean(r.active_fraction for r in found):.3f}" if found else "-"
        lines.append(f"  {label:<32} {blocks_run(110, schedule, p):>10.3f} {measured:>9} "
                     f"{mean_sd(r.wall_time for r in found):>16} {mean_sd(r.step_time for r in found):>16} "
                     f"{ratio:>11} {len(found):>3}")
    everything = [r for _, s, p in rows for r in find(runs, 110, s, p)]
    if everything:
        loads = [x for r in everything for s in r.runner.get("sessions", []) for x in (s.get("load_average_start") or [])[:1]]
        jobs = sorted({r.runner.get("jobs") for r in everything})
        lines.append(f"  made with --jobs {'/'.join(map(str, jobs))}; 1-minute load average at the start of a "
                     f"session: {min(loads):.2f} ... {max(loads):.2f}" if loads else "")
    return lines


def matched_depth_table(runs) -> list[str]:
    matched = plan_module.matched_uniform_p()
    rows = [("constant depth", "none", 1.0), ("linear decay, p_L = 0.5", "linear", 0.5),
            ("uniform, p = 0.5 (equal p_L)", "uniform", 0.5),
            (f"uniform, p = {plan_module.format_p(matched)} (matched depth)", "uniform", matched)]
    lines = ["ResNet-110 test error (%): uniform against linear decay at equal p_L and at matched expected depth",
             f"  {'schedule':<36} {'blocks run':>10} {ERROR_HEADER}"]
    for label, schedule, p in rows:
        lines.append(f"  {label:<36} {blocks_run(110, schedule, p):>10.3f} {error_columns(find(runs, 110, schedule, p))}")
    return lines


def sweep_table(runs) -> list[str]:
    lines = ["ResNet-110 test error (%) over p_L, mean ± sd over seeds (p_L = 1: constant depth, the reference)",
             f"  {'p_L':>5}  {'linear ' + ERROR_HEADER:>45}   {'uniform ' + ERROR_HEADER:>45}"]
    for p in plan_module.SWEEP_P:
        lines.append(f"  {p:>5}  {error_columns(find(runs, 110, 'linear', p)):>45}   "
                     f"{error_columns(find(runs, 110, 'uniform', p)):>45}")
    constant = error_columns(find(runs, 110, "none", 1.0))
    lines.append(f"  {1.0:>5}  {constant:>45}   {constant:>45}")
    return lines


def deep_table(runs) -> list[str]:
    lines = ["ResNet-1202 against ResNet-110 on the digits: test error (%) and wall time",
             f"  {'network':<58} {ERROR_HEADER} {'wall time s':>16}  per seed (best-val / last)"]
    deep = dict(epochs=plan_module.DEEP_EPOCHS, seeds=plan_module.DEEP_SEEDS)
    rows = [("ResNet-110 {}, lr 0.025", 110, {}), ("ResNet-1202 {}, lr 0.025", 1202, deep),
            (f"ResNet-1202 {{}}, lr 0.025, {plan_module.DEEP_WARMUP_EPOCHS} warm-up epoch(s)", 1202,
             dict(deep, warmup_epochs=plan_module.DEEP_WARMUP_EPOCHS)),
            (f"ResNet-1202 {{}}, lr {plan_module.DEEP_LOW_LR}", 1202, dict(deep, lr=plan_module.DEEP_LOW_LR))]
    for text, depth, options in rows:
        for schedule, name in (("none", "constant depth"), ("linear", "linear decay 0.5")):
            found = find(runs, depth, schedule, 0.5, **options)
            seeds_text = ", ".join(f"{r.best_error:.2f}/{r.last_error:.2f}" for r in found)
            lines.append(f"  {text.format(name):<58} {error_columns(found)} {mean_sd(r.wall_time for r in found):>16}  "
                         f"{seeds_text}")
    return lines


def smalldata_table(runs) -> list[str]:
    subset, epochs = plan_module.DIGITS_TRAIN_IMAGES // 4, plan_module.SMALLDATA_EPOCHS
    pairs = []
    for seed in plan_module.SMALLDATA_SEEDS:
        constant = find(runs, 110, "none", 1.0, seeds=(seed,), epochs=epochs, train_subset=subset)
        linear = find(runs, 110, "linear", 0.5, seeds=(seed,), epochs=epochs, train_subset=subset)
        if constant and linear:
            pairs.append((seed, constant[0], linear[0]))
    lines = [f"Small data: ResNet-110 on {subset} training images, {epochs} epochs; test error (%) paired by seed",
             f"  {'seed':>4} {'constant':>9} {'linear':>9} {'c - l':>7}   {'constant':>9} {'linear':>9} {'c - l':>7}",
             f"  {'':>4} {'best-validation checkpoint':^27}   {'last epoch':^27}"]
    for seed, c, l in pairs:
        lines.append(f"  {seed:>4} {c.best_error:9.2f} {l.best_error:9.2f} {c.best_error - l.best_error:+7.2f}   "
                     f"{c.last_error:9.2f} {l.last_error:9.2f} {c.last_error - l.last_error:+7.2f}")
    if not pairs:
        return lines + ["  pending: no seed has both runs stored"]
    for metric, label in (("best_error", "best-validation checkpoint (primary)"), ("last_error", "last epoch")):
        constant = [getattr(c, metric) for _, c, _ in pairs]
        linear = [getattr(l, metric) for _, _, l in pairs]
        test = sign_flip_test([a - b for a, b in zip(constant, linear)])
        lines.append(f"  {label}: constant {mean_sd(constant)}, linear {mean_sd(linear)}; mean difference "
                     f"(constant - linear) {test['mean']:+.2f} over {test['n']} of {len(plan_module.SMALLDATA_SEEDS)} planned seeds; exact sign-flip test "
                     f"p = {test['p_one_sided']:.4f} one-sided (linear lower), {test['p_two_sided']:.4f} two-sided "
                     f"(smallest possible {test['smallest_p']:.4f})")
    return lines


def report(runs) -> str:
    sections = [wallclock_table, matched_depth_table, sweep_table, deep_table, smalldata_table]
    return "\n\n".join("\n".join(line for line in section(runs) if line) for section in sections)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=DEFAULT_RUNS, help="folder of stored runs (experiments/runs)")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.runs)
    except ValueError as exc:
        print(f"experiment_summary: {exc}", file=sys.stderr)
        return 2
    print(f"{len(runs)} stored runs in {args.runs}\n")
    print(report(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
