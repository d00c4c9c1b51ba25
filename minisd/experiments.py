"""Stored experiments: the run folders that ``scripts/run_experiments.py`` keeps in the repository
(``experiments/runs/<name>/``), read back for notebook 8 and ``scripts/experiment_summary.py``.

A stored run holds what minisd's trainer wrote, without the checkpoints: ``metrics.jsonl`` (one line
per epoch), ``settings.json``, ``summary.json`` (test accuracy of the best-validation checkpoint and
the run's wall time), and the runner's ``runner.json`` (command, machine, dates, load average).

Two test errors exist for every run, and both are kept apart by name:

* :attr:`Run.best_error`: the test error of the checkpoint with the best validation accuracy, the
  paper's protocol and the one notebook 8 reports;
* :attr:`Run.last_error`: the test error after the last epoch.

Also here: the paired test used on seeds, :func:`sign_flip_test`, exact and without SciPy.
"""
from __future__ import annotations

import itertools
import json
import os
import statistics
from dataclasses import dataclass

from minisd.training.settings import Settings

__all__ = ["STORED_FILES", "RUNNER_FILE", "Run", "read_run", "load_runs", "select", "sign_flip_test",
           "mean_sd", "format_mean_sd"]

STORED_FILES = ("metrics.jsonl", "settings.json", "summary.json")
RUNNER_FILE = "runner.json"


@dataclass
class Run:
    """One stored run: its files, read, and the numbers the tables need."""

    name: str
    settings: dict
    summary: dict
    metrics: list
    runner: dict

    @property
    def seed(self) -> int:
        return self.settings["seed"]

    @property
    def best_error(self) -> float:
        """Test error (%) of the best-validation checkpoint (the paper's protocol)."""
        return 100 * (1 - self.summary["test_acc"])

    @property
    def last_error(self) -> float:
        """Test error (%) after the last epoch."""
        return 100 * (1 - self.metrics[-1]["test_acc"])

    @property
    def best_epoch(self) -> int:
        return self.summary["best_epoch"]

    @property
    def wall_time(self) -> float:
        """Seconds the whole run took: training, evaluation after each epoch, checkpoints."""
        return self.summary["wall_time_s"]

    @property
    def step_time(self) -> float:
        """Seconds spent in training steps (the epochs' time_s; evaluation not included)."""
        return sum(r["time_s"] for r in self.metrics)

    @property
    def active_fraction(self) -> float:
        """Fraction of the blocks that ran, over all training steps."""
        return statistics.fmean(r["active_fraction"] for r in self.metrics)


def _read_json_file(path):
    with open(path, encoding="utf-8") as handle:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in handle if line.strip()]
        return json.load(handle)


def read_run(folder) -> Run:
    """One stored run; ValueError naming the file if one is missing or is not what the runner stores."""
    folder = os.fspath(folder)
    files = {}
    for name in STORED_FILES + (RUNNER_FILE,):
        path = os.path.join(folder, name)
        try:
            files[name] = _read_json_file(path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: cannot read it ({exc})") from None
    if not files["metrics.jsonl"] or "test_acc" not in files["summary.json"]:
        raise ValueError(f"{folder}: metrics.jsonl has no epoch or summary.json no test_acc")
    return Run(os.path.basename(folder), files["settings.json"], files["summary.json"], files["metrics.jsonl"],
               files[RUNNER_FILE])


def load_runs(runs_dir) -> dict[str, Run]:
    """Every stored run under ``runs_dir``, by folder name ({} if the folder does not exist)."""
    runs_dir = os.fspath(runs_dir)
    if not os.path.isdir(runs_dir):
        return {}
    return {name: read_run(os.path.join(runs_dir, name)) for name in sorted(os.listdir(runs_dir))
            if not name.startswith(".") and os.path.isdir(os.path.join(runs_dir, name))}


def select(runs: dict[str, Run], seeds=None, **settings) -> list[Run]:
    """The runs whose settings have the values given (``depth=110, schedule="none"``, ...), sorted
    by seed; ``seeds`` keeps those seeds only. ``final_survival`` is compared to 4 decimals (it is
    stored as computed, 0.7453703..., and named as 0.7454). A setting a run's settings.json does not
    hold (it was stored before the setting existed) has its default value."""
    defaults = Settings().to_dict()

    def matches(run: Run) -> bool:
        for key, wanted in settings.items():
            value = run.settings.get(key, defaults.get(key))
            if key == "final_survival" and wanted is not None and value is not None:
                if round(value, 4) != round(wanted, 4):
                    return False
            elif value != wanted:
                return False
        return seeds is None or run.seed in seeds
    return sorted((r for r in runs.values() if matches(r)), key=lambda r: r.seed)


def sign_flip_test(differences) -> dict:
    """Exact paired permutation test of mean(differences) > 0.

    Under the null hypothesis (no effect) each pair's difference is as likely to have either sign,
    so the 2^n sign patterns are equally likely; p is the share of them whose mean is at least the
    one observed (one-sided), or at least as far from 0 (two-sided). With n pairs the smallest
    possible one-sided p is 2^-n.
    """
    d = [float(x) for x in differences]
    if not d:
        raise ValueError("sign_flip_test: no differences given")
    observed = statistics.fmean(d)
    tolerance = 1e-9 * max(1.0, max(abs(x) for x in d))  # errors are multiples of 1/360: ties are exact
    means = [statistics.fmean(s * x for s, x in zip(signs, d)) for signs in itertools.product((1, -1), repeat=len(d))]
    return {"n": len(d), "mean": observed,
            "p_one_sided": sum(m >= observed - tolerance for m in means) / len(means),
            "p_two_sided": sum(abs(m) >= abs(observed) - tolerance for m in means) / len(means),
            "smallest_p": 1 / len(means)}


def mean_sd(values) -> tuple[float, float]:
    """(mean, sample standard deviation); the deviation is NaN for a single value."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_sd: no values given")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def format_mean_sd(values, digits: int = 2) -> str:
    """'3.43 ± 0.98', '2.10 (1 seed)' or 'pending' (no value)."""
    values = list(values)
    if not values:
        return "pending"
    mean, sd = mean_sd(values)
    return f"{mean:.{digits}f} (1 seed)" if len(values) == 1 else f"{mean:.{digits}f} ± {sd:.{digits}f}"
