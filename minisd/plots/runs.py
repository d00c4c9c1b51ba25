"""Reading run folders for figures: the epoch records of ``metrics.jsonl`` as minisd's trainer
writes them (one JSON object per line and epoch: ``epoch``, ``lr``, ``train_loss``, ``train_acc``,
``val_loss``, ``val_acc``, ``test_loss``, ``test_acc``, ``active_fraction``, ``steps``, ``time_s``,
``first_conv_grad``, ``block_grad``; null where a value does not exist), and the matrices of one
quantity over seeds and epochs that the paper's figures draw."""
from __future__ import annotations

import json
import math
import os

import numpy

__all__ = ["read_metrics", "column", "seed_matrix", "block_matrix"]


def _metrics_path(run) -> str:
    path = os.fspath(run)
    return os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path


def read_metrics(run) -> list[dict]:
    """The epoch records of a run: a run folder (its ``metrics.jsonl``) or the file itself.

    ValueError, naming the file and line, for a line that is not one JSON object with an epoch.
    """
    path = _metrics_path(run)
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
                raise ValueError(f"{path}, line {number}: expected one JSON object per epoch as minisd writes "
                                 f"them (with an 'epoch' number), got {line.strip()[:60]!r}")
            records.append(record)
    return records


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def column(records, key: str) -> numpy.ndarray:
    """``key`` of each record as a float array, NaN where it is null or absent."""
    return numpy.array([float(r[key]) if _is_number(r.get(key)) else math.nan for r in records])


def records_of(run) -> list[dict]:
    """The epoch records of one run: a run folder, its metrics.jsonl, or the list of records."""
    if isinstance(run, (list, tuple)) and (not run or isinstance(run[0], dict)):
        return list(run)
    return read_metrics(run)


def seed_runs(value) -> list[list[dict]]:
    """One label's runs (one per seed): a run folder, a list of run folders, or lists of records."""
    if isinstance(value, (str, os.PathLike)) or (isinstance(value, (list, tuple)) and value
                                                 and isinstance(value[0], dict)):
        value = [value]
    return [records_of(run) for run in value]


def seed_matrix(runs, key: str):
    """(epochs, values): ``values[s, e]`` is ``key`` of seed s at epoch e (NaN where missing or null).

    runs: one label's runs (a run folder, a list of them, or lists of records). Epochs are the
    union over the seeds, in order.
    """
    per_seed = seed_runs(runs)
    epochs = sorted({int(r["epoch"]) for records in per_seed for r in records})
    where = {e: k for k, e in enumerate(epochs)}
    values = numpy.full((len(per_seed), len(epochs)), numpy.nan)
    for s, records in enumerate(per_seed):
        for r in records:
            if _is_number(r.get(key)):
                values[s, where[int(r["epoch"])]] = r[key]
    return numpy.asarray(epochs), values


def block_matrix(runs, key: str = "block_grad"):
    """(epochs, values): ``values[s, e, l - 1]`` is entry l of the per-block list ``key`` of seed s
    at epoch e (NaN where missing or null: a block that never ran in that epoch).

    runs: one label's runs, as :func:`seed_matrix` takes them.
    """
    per_seed = seed_runs(runs)
    epochs = sorted({int(r["epoch"]) for records in per_seed for r in records})
    where = {e: k for k, e in enumerate(epochs)}
    blocks = max((len(r.get(key) or []) for records in per_seed for r in records), default=0)
    values = numpy.full((len(per_seed), len(epochs), blocks), numpy.nan)
    for s, records in enumerate(per_seed):
        for r in records:
            for l, value in enumerate(r.get(key) or []):
                if _is_number(value):
                    values[s, where[int(r["epoch"])], l] = value
    return numpy.asarray(epochs), values


def lr_drops(runs: dict) -> list[float]:
    """Epochs after which the learning rate changed (from the first run of the first label)."""
    first = seed_runs(next(iter(runs.values())))[0]
    rates = [(int(r["epoch"]), r.get("lr")) for r in first if _is_number(r.get("lr"))]
    return [e0 + 0.5 for (e0, a), (_, b) in zip(rates, rates[1:]) if not math.isclose(a, b)]


def seed_note(runs: dict) -> str:
    """Words for a figure's title: how many seeds each line averages."""
    counts = sorted({len(seed_runs(v)) for v in runs.values()})
    if counts == [1]:
        return "one seed"
    what = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"line: mean of {what} seeds; band: lowest to highest seed"
