"""minisd.bench: every table runs on tiny settings and prints its columns (timings are not tested).

The benchmarks themselves are never tests; these check that `minisd bench` reaches every table and
the bookkeeping behind the printed ratios: the dropped-block table times a dropped block that really
skips its branch, and the step table's prediction is built from the gates each stochastic-depth
step drew.
"""
from __future__ import annotations

import math

import pytest

from minisd import backend, bench, cli, kernels
from minisd.bench import timing

on_numpy = pytest.mark.skipif(backend.name() != "numpy", reason="the CPU benchmark tables run on NumPy")
TINY = ["--depths", "8", "--steps", "1", "--batch-size", "2", "--threads", "1"]


@pytest.fixture(autouse=True)
def _restore_threads():
    """bench.main sets the threads of the process (minisd's, the BLAS's, PyTorch's): undo it."""
    yield
    kernels.set_num_threads(None)
    while timing._THREAD_LIMITS:
        timing._THREAD_LIMITS.pop().restore_original_limits()


def _gpu_usable() -> bool:
    previous = backend.name()
    try:
        backend.use("cupy")
    except backend.BackendUnavailable:
        return False
    backend.use(previous)
    return True


@on_numpy
def test_block_table_times_kept_and_dropped_blocks():
    lines = []
    rows = bench.block_table(rounds=2, batch=2, out=lines.append)
    assert [r[0] for r in rows] == [shape[0] for shape in bench.BLOCK_SHAPES]
    for label, kept, dropped in rows:
        assert 0 < dropped < kept, label  # a dropped block skips the two convolutions
    assert "dropped/kept" in lines[1] and "load" in lines[0]


@on_numpy
def test_step_table_predicts_from_the_gates_drawn():
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


# What each table prints: its column heads, and the first cell of a row of its own.
COLUMNS = {
    "layers": (["layer", "fwd ms", "bwd ms", "fwd GF/s", "bwd GF/s"], "stage3 64->64"),
    "blocks": (["block", "kept ms", "dropped ms", "dropped/kept"], "transition 32->64 s2"),
    "steps": (["depth", "const ms", "SD ms", "SD/const", "pred(drawn)", "gap", "E[act]/L"], "    8 "),
    "phases": (["phase", "ms", "share"], "batch norm"),
    "memory": (["MiB"], "SD / constant"),
    "gpu": (["network", "schedule", "active", "minisd ms"], "ResNet-8    linear to 0.5"),
}


def _rows_of(out, table):
    """The lines of ``out`` from ``table``'s column heads on (each table prints one head line)."""
    heads, _ = COLUMNS[table]
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == heads[:1] and all(h in line for h in heads))
    return lines[start:]


@on_numpy
@pytest.mark.parametrize("table", sorted(COLUMNS))
def test_each_table_runs_from_one_command_and_prints_its_columns(table, capsys):
    extra = ["--backend", "numpy"] if table == "gpu" else []  # the gpu table's code, on a CPU
    assert cli.main(["bench", table, *TINY, "--no-torch", *extra]) == 0
    out = capsys.readouterr().out
    _, first_cell = COLUMNS[table]
    assert any(line.startswith(first_cell) for line in _rows_of(out, table)), out
    for other in set(COLUMNS) - {table}:  # only the table asked for ran
        with pytest.raises(StopIteration):
            _rows_of(out, other)
    assert backend.name() == "numpy"  # the gpu table gives the backend back


@on_numpy
def test_default_tables_are_blocks_and_steps_and_torch_columns_join_when_importable(capsys):
    torch = pytest.importorskip("torch")
    assert bench.main(TINY) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__} threads: 1" in out.splitlines()[0]
    assert "dropped/kept" in _rows_of(out, "blocks")[0]
    steps_head = _rows_of(out, "steps")[0]
    assert "minisd/torch" in steps_head and "torch SD/const" in steps_head
    assert "Layers of ResNet-20" not in out and "Where a ResNet" not in out


def test_gpu_table_runs_on_a_gpu_or_says_in_one_line_why_not(capsys):
    code = cli.main(["bench", "gpu", *TINY, "--no-torch"])
    captured = capsys.readouterr()
    if not _gpu_usable():
        assert code == 1 and captured.out == ""  # nothing was timed
        (line,) = captured.err.strip().splitlines()
        assert line.startswith("minisd: error: CuPy"), line
        return
    assert code == 0, captured.err
    assert "minisd cupy on " in captured.out
    assert any(line.startswith("ResNet-8    constant depth") for line in captured.out.splitlines())
