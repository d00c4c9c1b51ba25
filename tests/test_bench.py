"""minisd.bench: the tables run on a tiny batch and report what they claim (timings are not tested).

The benchmarks themselves are never tests; these check the bookkeeping behind the printed ratios:
the dropped-block table times a dropped block that really skips its branch, and the step table's
prediction is built from the gates each stochastic-depth step drew.
"""
from __future__ import annotations

import math

import pytest

from minisd import backend, bench

pytestmark = pytest.mark.skipif(backend.name() != "numpy", reason="the CPU benchmark tables run on NumPy")


def test_block_table_times_kept_and_dropped_blocks():
    lines = []
    rows = bench.block_table(rounds=2, batch=2, out=lines.append)
    assert [r[0] for r in rows] == [shape[0] for shape in bench.BLOCK_SHAPES]
    for label, kept, dropped in rows:
        assert 0 < dropped < kept, label  # a dropped block skips the two convolutions
    assert "dropped/kept" in lines[1] and "load" in lines[0]


def test_step_table_predicts_from_the_gates_drawn(monkeypatch):
    lines = []
    rows = bench.step_table(depths=(20,), rounds=3, batch=2, use_torch=False, out=lines.append)
    (row,) = rows
    assert row["depth"] == 20 and 0 < row["realised_active"] <= 1
    for key in ("ratio", "predicted_drawn", "predicted"):
        assert math.isfinite(row[key]) and 0 < row[key] < 1.5, key
    # pred(p) charges every block (1 - p_l) of its saving: below 1 whenever some p_l < 1
    assert row["predicted"] < 1
    assert set(row["dropped_fraction"]) <= {"stage1", "stage2", "stage3", "transition"}
    assert any(line.startswith("   20 ") for line in lines)
    # The gap is paired: the median of each round's measured ratio minus that round's prediction,
    # not the difference of the two columns' medians (which come from different rounds).
    assert len(row["per_round"]) == 3
    assert row["gap"] == pytest.approx(sorted(m - p for m, p in row["per_round"])[1])
    assert row["ratio"] == pytest.approx(sorted(m for m, _ in row["per_round"])[1])
    assert row["predicted_drawn"] == pytest.approx(sorted(p for _, p in row["per_round"])[1])
