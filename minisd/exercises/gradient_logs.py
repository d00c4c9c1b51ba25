"""Exercise 9: reading the gradient logs of real runs (``block_grad`` in metrics.jsonl, the paper's
Figure 8), with a numeric answer the checker verifies."""
from __future__ import annotations

import atexit
import json
import math
import os
import shutil
import tempfile

from minisd.exercises._grading import graded_call
from minisd.exercises._report import Report, StudentError, as_number

# Two short runs on the bundled digits (about 3 s on two cores): ResNet-8 (3 blocks), 4 epochs of
# 96 images, stochastic depth (linear decay to p_L = 0.2) against constant depth, the same seed.
RUN_SETTINGS = dict(dataset="digits", depth=8, epochs=4, train_subset=96, batch_size=32, final_survival=0.2,
                    val_size=60, seed=0)
_runs: dict = {}


def gradient_log_runs(folder=None) -> dict:
    """{"stochastic": metrics.jsonl path, "constant": metrics.jsonl path} of two real minisd runs,
    trained once per process in ``folder`` (default: the folder named by the environment variable
    MINISD_EXERCISE_RUNS, where runs already there are reused, as CI does for its three executions
    of the notebook; else a new temporary folder)."""
    if folder is None and _runs:
        return dict(_runs)
    folder = folder or os.environ.get("MINISD_EXERCISE_RUNS") or None
    from minisd.training import Settings, fit  # noqa: PLC0415  (training is needed only here)

    if folder is None:
        folder = tempfile.mkdtemp(prefix="minisd_gradient_logs_")
        atexit.register(shutil.rmtree, folder, True)  # made for this process only
    paths = {}
    for name, schedule in (("stochastic", "linear"), ("constant", "none")):
        run_dir = os.path.join(folder, name)
        if not os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
            fit(Settings(schedule=schedule, **RUN_SETTINGS), run_dir=run_dir, log=lambda line: None, progress=False)
        paths[name] = os.path.join(run_dir, "metrics.jsonl")
    _runs.update(paths)
    return paths


def _records(path):
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _means(path, null_as_zero=False):
    columns = list(zip(*[r["block_grad"] for r in _records(path)]))
    out = []
    for column in columns:
        values = [0.0 if v is None else v for v in column] if null_as_zero else [v for v in column if v is not None]
        out.append(sum(values) / len(values) if values else math.nan)
    return out


def check_gradient_logs(block_grad_means, answer, runs=None) -> Report:
    """Check ``block_grad_means(metrics_path) -> [mean for block 1, ..., block L]`` (each block's
    ``block_grad`` averaged over the epochs in which it ran; null means it never ran in that epoch)
    on both runs of :func:`gradient_log_runs`, and ``answer``: block L's mean in the stochastic-depth
    run divided by block L's mean in the constant-depth run."""
    report = Report("gradient logs")
    call = "block_grad_means(metrics_path)"
    runs = runs or gradient_log_runs()
    try:
        for name in ("stochastic", "constant"):
            path = runs[name]
            correct = _means(path)
            result = graded_call(block_grad_means, "block_grad_means", call, (path,))
            try:
                mine = [float(v) for v in result]
            except Exception:  # noqa: BLE001
                raise StudentError(f"block_grad_means returned {type(result).__name__}; return a list of numbers, "
                                   "one per block") from None
            nulls = sum(v is None for r in _records(path) for v in r["block_grad"])
            label = f"{name} run ({len(correct)} blocks, {nulls} null entries)"
            if len(mine) != len(correct):
                report.add(False, f"{label}: {len(mine)} values, expected {len(correct)} (one per block)",
                           ["hint: average over the epochs (the lines of the file), one value per block"])
                continue
            ok = all(abs(a - b) <= 1e-12 * abs(b) for a, b in zip(mine, correct))
            details = [f"yours {', '.join(f'{v:.4g}' for v in mine)}; expected {', '.join(f'{v:.4g}' for v in correct)}"]
            if not ok and all(abs(a - b) <= 1e-12 * abs(b) for a, b in zip(mine, _means(path, null_as_zero=True))):
                details.append("hint: null means the block never ran in that epoch: it is not a gradient of 0, leave "
                               "that epoch out of the block's mean")
            elif not ok and all(abs(a - b) <= 1e-12 * abs(b) for a, b in zip(mine, _records(path)[-1]["block_grad"]
                                                                             if None not in _records(path)[-1]["block_grad"]
                                                                             else [math.nan])):
                details.append("hint: that is the last epoch only: average over every epoch")
            report.add(ok, label, [] if ok else details, key=("means",))
        value = as_number(answer, "answer")
        sd, const = _means(runs["stochastic"]), _means(runs["constant"])
        correct = sd[-1] / const[-1]
        ok = abs(value - correct) <= 1e-6 * abs(correct)
        details = []
        if not ok and abs(value - const[-1] / sd[-1]) <= 1e-6 * abs(correct):
            details = ["hint: that is the inverse: stochastic depth over constant depth"]
        elif not ok and abs(value - sd[0] / const[0]) <= 1e-6 * abs(correct):
            details = ["hint: that is block 1: the question is about block L, the last one (blocks count from 1)"]
        elif not ok and abs(value - _means(runs["stochastic"], True)[-1] / const[-1]) <= 1e-6 * abs(correct):
            details = ["hint: the epochs in which block L never ran are counted as zero gradient in your answer"]
        report.add(ok, f"answer: block L's mean gradient, stochastic over constant depth: yours {value:.6g}"
                   + ("" if not ok else " (correct)"), details)
    except StudentError as problem:
        report.stop(str(problem))
    return report
