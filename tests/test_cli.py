"""The `minisd` command: a tiny end-to-end run, and one-line errors with the right exit codes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import types

import pytest

from minisd import backend, cli, optim

TINY = ["--depth", "8", "--epochs", "1", "--batch-size", "32", "--train-subset", "64", "--quiet"]


def one_error_line(capsys, code, expected_code=1):
    """The command failed with ``expected_code`` and printed exactly one line to stderr."""
    err = capsys.readouterr().err
    assert code == expected_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def run_main(argv):
    try:
        return cli.main(argv)
    except SystemExit as exc:  # argparse exits
        return exc.code


def test_train_evaluate_and_resume_a_finished_run(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert cli.main(["train", *TINY, "--out", run]) == 0
    out = capsys.readouterr().out
    assert "epoch 1/1" in out and "val acc" in out and "test accuracy " in out
    assert cli.main(["evaluate", run]) == 0
    out = capsys.readouterr().out
    assert "digits test: accuracy" in out and "best.npz" in out
    assert cli.main(["evaluate", os.path.join(run, "last.npz"), "--split", "val"]) == 0
    assert "digits val: accuracy" in capsys.readouterr().out
    # a finished run resumes straight to the final evaluation
    assert cli.main(["train", "--resume", run, "--quiet"]) == 0
    assert "test accuracy " in capsys.readouterr().out
    # resuming takes the checkpoint's settings: other options are an error
    line = one_error_line(capsys, cli.main(["train", "--resume", run, "--depth", "14"]))
    assert "drop --depth" in line
    # an existing run folder is never overwritten
    line = one_error_line(capsys, cli.main(["train", *TINY, "--out", run]))
    assert "already holds a run" in line


def test_ctrl_c_saves_and_says_how_to_resume(tmp_path, capsys, monkeypatch):
    original = optim.SGD.step

    def step(self):
        original(self)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(optim.SGD, "step", step)
    run = str(tmp_path / "run")
    code = cli.main(["train", *TINY, "--out", run])
    err = capsys.readouterr().err
    assert code == 130
    assert f"resume with: minisd train --resume {run}" in err and "Traceback" not in err
    assert os.path.exists(os.path.join(run, "last.npz"))


@pytest.mark.parametrize("argv, expected", [
    (["train", "mnist"], "invalid choice: 'mnist'"),
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    (["train", "--depth", "10"], "depth must be 6n + 2"),
    (["train", "--final-survival", "1.5"], "expected a number in [0, 1]"),
    (["train", "--schedule", "cubic"], "invalid choice: 'cubic'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["train", "--seed", "-1"], "expected a whole number >= 0"),
    (["train", "--epochs", "0"], "expected a whole number >= 1"),
])
def test_bad_command_lines_give_one_line_and_exit_2(capsys, argv, expected):
    line = one_error_line(capsys, run_main(argv), expected_code=2)
    assert expected in line


def test_missing_data_folder(tmp_path, capsys):
    line = one_error_line(capsys, cli.main(["train", "cifar10", "--data-dir", str(tmp_path / "nowhere")]))
    assert line.startswith("minisd: error: data folder not found")
    line = one_error_line(capsys, cli.main(["train", "cifar10"]))
    assert "needs --data-dir" in line


def test_corrupted_cifar_file(tmp_path, capsys):
    from test_data import write_fake_cifar

    folder, *_ = write_fake_cifar(tmp_path, "bin", per_batch=2)
    path = os.path.join(folder, "data_batch_4.bin")
    with open(path, "r+b") as handle:
        handle.truncate(1000)
    line = one_error_line(capsys, cli.main(["train", "cifar10", "--data-dir", str(tmp_path), *TINY]))
    assert "data_batch_4.bin is truncated or corrupted" in line


def test_missing_checkpoint(tmp_path, capsys):
    line = one_error_line(capsys, cli.main(["evaluate", str(tmp_path / "none.npz")]))
    assert "checkpoint not found" in line


def test_cupy_without_cupy_names_the_gpu_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` now fails as if not installed
    line = one_error_line(capsys, cli.main(["train", "--backend", "cupy", *TINY, "--out", str(tmp_path / "r")]))
    assert 'pip install "minisd[gpu]"' in line


def test_cupy_without_a_gpu(tmp_path, capsys):
    try:
        backend.use("cupy")
    except backend.BackendUnavailable:
        pass
    else:
        pytest.skip("a GPU is available here")
    line = one_error_line(capsys, cli.main(["train", "--backend", "cupy", *TINY, "--out", str(tmp_path / "r")]))
    assert line.startswith("minisd: error: CuPy")


def test_gradcheck_command(capsys):
    assert cli.main(["gradcheck", "--depth", "8"]) == 0
    out = capsys.readouterr().out
    assert "gradient check passed" in out and "d" in out.splitlines()[0]


def test_bench_is_delegated(monkeypatch, capsys):
    seen = {}
    fake = types.ModuleType("minisd.bench")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "minisd.bench", fake)
    assert cli.main(["bench", "--quick", "x"]) == 0
    assert seen["argv"] == ["--quick", "x"]
    monkeypatch.setitem(sys.modules, "minisd.bench", None)  # as if minisd/bench.py were missing
    line = one_error_line(capsys, cli.main(["bench"]))
    assert "minisd/bench.py" in line


def test_console_entry_point_exit_status_and_no_traceback(tmp_path):
    """The real process: one line on stderr, status 1, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "minisd.cli", "train", "cifar10", "--data-dir",
                           str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"minisd: error: data folder not found: {tmp_path / 'missing'}"]
