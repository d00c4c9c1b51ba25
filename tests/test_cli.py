"""The `minisd` command: a tiny end-to-end run, and one-line errors with the right exit codes."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from minisd import backend, bench, cli, optim

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
    (["train", "--bogus"], "unrecognized option '--bogus'"),
    (["train", "--depth", "10"], "depth must be 6n + 2"),
    (["train", "--final-survival", "1.5"], "expected a number in [0, 1]"),
    (["train", "--schedule", "cubic"], "invalid choice: 'cubic'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["train", "--seed", "-1"], "expected a whole number from 0 to 2**63 - 1"),
    (["train", "--epochs", "0"], "expected a whole number from 1 to 1,000,000"),
    (["train", "--warmup-epochs", "-1"], "argument --warmup-epochs: expected a whole number >= 0"),
    # issue 27: absurd values get one line too
    (["train", "--depht", "20"], "unrecognized option '--depht'; did you mean --depth?"),
    (["train", "cifar10", "--epoch", "3"], "unrecognized option '--epoch'; did you mean --epochs?"),
    (["train", "--epochs", "9" * 400], "expected a whole number from 1 to 1,000,000, got '999"),
    (["train", "--batch-size", "1"], "expected a whole number >= 2 (batch norm needs two samples), got 1"),
    (["train", "--batch-size", "0"], "expected a whole number >= 2"),
    (["train", "--resume", ""], "argument --resume: expected a run folder or a checkpoint file, got ''"),
    (["train", "--out", ""], "argument --out: expected a folder name, got ''"),
    (["evaluate", ""], "expected a checkpoint file or a run folder, got ''"),
    (["train", "--seed", "1" + "0" * 30], "expected a whole number from 0 to 2**63 - 1"),
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
    seen = []
    monkeypatch.setattr(bench, "main", lambda argv: seen.append(argv) and 0)
    assert cli.main(["bench", "--depths", "8", "14", "--steps", "1", "--no-torch"]) == 0
    assert seen == [["--depths", "8", "14", "--steps", "1", "--no-torch"]]


def test_console_entry_point_exit_status_and_no_traceback(tmp_path):
    """The real process: one line on stderr, status 1, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "minisd.cli", "train", "cifar10", "--data-dir",
                           str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"minisd: error: data folder not found: {tmp_path / 'missing'}"]


@pytest.mark.parametrize("argv, expected", [
    (["--depths", "21"], "argument --depths: depth must be 6n + 2"),
    (["--depths", "20", "abc"], "argument --depths: invalid int value: 'abc'"),
    (["--steps", "0"], "argument --steps: expected a whole number >= 1, got 0"),
    (["--batch-size", "0"], "argument --batch-size: expected a whole number >= 1, got 0"),
    (["--final-survival", "2"], "argument --final-survival: expected a number in [0, 1], got 2.0"),
    (["--threads", "-1"], "argument --threads: expected a whole number >= 1, got -1"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["steps", "speed"], "argument TABLE: expected one of layers, blocks, steps, phases, memory, gpu, got 'speed'"),
    (["gpu", "--backend", "torch"], "argument --backend: invalid choice: 'torch'"),
])
def test_bad_bench_arguments_give_one_line_before_anything_runs(monkeypatch, capsys, argv, expected):
    ran = []
    monkeypatch.setattr(bench, "main", lambda argv: ran.append(argv) or 0)
    line = one_error_line(capsys, run_main(["bench", *argv]), expected_code=2)
    assert line.startswith("minisd bench: error: ") and expected in line
    assert ran == []


def _environment(monkeypatch, name, value):
    """Set an environment variable as a new process would see it (MINISD_BACKEND is read at import)."""
    monkeypatch.setenv(name, value)
    if name == "MINISD_BACKEND":
        monkeypatch.setitem(backend._state, "environment_error", None)  # restored after the test
        backend._select_from_environment()


@pytest.mark.parametrize("name, value, expected", [
    ("MINISD_BACKEND", "garbage", "MINISD_BACKEND=garbage: backend.use: unknown backend 'garbage'"),
    ("MINISD_NUM_THREADS", "abc", "MINISD_NUM_THREADS must be a whole number from 1 to 1024"),
    ("MINISD_NUM_THREADS", "0", "MINISD_NUM_THREADS must be a whole number from 1 to 1024 (threads for CPU "
                                "convolutions), got '0'"),
    # issue 27: str.isdigit() accepts "²" (and int() then fails); 400 digits would be a traceback too
    ("MINISD_NUM_THREADS", "\u00b2", "MINISD_NUM_THREADS must be a whole number from 1 to 1024 (threads for CPU "
                                     "convolutions), got '\u00b2'"),
    ("MINISD_NUM_THREADS", "9" * 400, "MINISD_NUM_THREADS must be a whole number from 1 to 1024"),
])
@pytest.mark.parametrize("command", [["gradcheck", "--depth", "8"], ["bench", "--steps", "1"], ["evaluate", "x"]])
def test_bad_environment_variables_give_one_line(monkeypatch, capsys, name, value, expected, command):
    monkeypatch.setattr(bench, "main", lambda argv: 0)
    _environment(monkeypatch, name, value)
    line = one_error_line(capsys, run_main(command))
    assert line.startswith("minisd: error: ") and expected in line


def test_backend_option_overrides_a_bad_minisd_backend(monkeypatch, tmp_path, capsys):
    _environment(monkeypatch, "MINISD_BACKEND", "garbage")
    assert cli.main(["train", *TINY, "--backend", "numpy", "--out", str(tmp_path / "run")]) == 0
    assert "test accuracy" in capsys.readouterr().out


def test_bad_minisd_backend_in_a_real_process(tmp_path):
    env = dict(os.environ, MINISD_BACKEND="garbage")
    proc = subprocess.run([sys.executable, "-m", "minisd.cli", "gradcheck", "--depth", "8"], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "MINISD_BACKEND=garbage" in proc.stderr


def test_translate_of_a_whole_image_is_one_line_and_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    line = one_error_line(capsys, cli.main(["train", *TINY, "--translate", "100000", "--out", str(run)]))
    assert "--translate must be less than the image size: digits images are 8x8 pixels, got 100000" in line
    assert not run.exists()
    line = one_error_line(capsys, run_main(["train", "--translate", "-1"]), expected_code=2)
    assert "expected a whole number >= 0" in line


def test_validation_size_option(tmp_path, capsys):
    from test_data import write_fake_cifar

    write_fake_cifar(tmp_path / "data", "bin", per_batch=4)  # 20 training images
    base = ["train", "cifar10", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run")]
    line = one_error_line(capsys, cli.main(base))
    assert "cannot hold out 5000 validation images from 20" in line and "--val-size" in line
    line = one_error_line(capsys, cli.main(base + ["--val-size", "30"]))
    assert "cannot hold out 30 validation images from 20" in line


def test_lr_help_describes_each_schedule():
    train_parser = cli.build_parser()._subparsers._group_actions[0].choices["train"]
    helps = {a.dest: a.help for a in train_parser._actions}
    assert "divided by 10" not in helps["lr"] and "--lr-schedule" in helps["lr"]
    for words in ("step: divide the learning rate by 10 at 50% and 75%", "cosine", "constant"):
        assert words in helps["lr_schedule"] % {}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(["train", *TINY, "--out", str(run)]) == 0
    return run


def _edit_meta(path, edit):
    with np.load(path, allow_pickle=False) as archive:
        arrays = {k: archive[k] for k in archive.files}
    meta = json.loads(str(arrays["meta"]))
    edited = edit(meta)
    arrays["meta"] = np.array(edited if isinstance(edited, str) else json.dumps(edited))
    np.savez(path, **arrays)


def _set(*keys, value):
    def edit(meta):
        target = meta
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
        return meta
    return edit


EDITS = {
    "meta-not-json": (lambda meta: "{", 1, 1),
    "meta-a-list": (lambda meta: [1, 2], 1, 1),
    "settings-null": (_set("settings", value=None), 1, 1),
    "depth-a-string": (_set("settings", "depth", value="abc"), 1, 1),
    "depth-not-6n+2": (_set("settings", "depth", value=10), 1, 1),
    "in-channels-negative": (_set("in_channels", value=-3), 1, 0),  # resume takes them from the data
    "epoch-a-string": (_set("epoch", value="x"), 0, 1),             # evaluate does not need the position
    "step-huge": (_set("step", value=10 ** 30), 0, 1),
    "gate-rng-garbage": (_set("rng", "gate_rng", value={"bad": 1}), 0, 1),
    "optimizer-lr-a-word": (_set("optimizer", "lr", value="fast"), 0, 1),
    "history-a-number": (_set("history", value=5), 0, 1),
}


@pytest.mark.parametrize("name", list(EDITS))
def test_hand_edited_checkpoint_metadata_gives_one_line(tmp_path, capsys, finished_run, name):
    edit, evaluate_code, resume_code = EDITS[name]
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    for checkpoint in ("best.npz", "last.npz"):
        _edit_meta(run / checkpoint, edit)
    for argv, expected in ((["evaluate", str(run)], evaluate_code), (["train", "--resume", str(run), "--quiet"],
                                                                     resume_code)):
        code = cli.main(argv)
        if expected == 0:
            assert code == 0, capsys.readouterr().err
            capsys.readouterr()
        else:
            line = one_error_line(capsys, code)
            assert line.startswith("minisd: error: ") and "checkpoint" in line, line


def test_a_second_run_in_a_busy_folder_refuses_in_one_line_and_a_dead_run_frees_it(tmp_path, capsys):
    """The folder's lock belongs to a live process: a second run (or resume) is refused before it
    writes anything; once that process dies, even by kill -9, the folder is free."""
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from minisd import training\n"
         "with training.run_folder.run_folder_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(120)", str(run)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = one_error_line(capsys, cli.main(["train", *TINY, "--out", str(run)]))
        assert line == (f"minisd: error: {run} is in use by another minisd run (process {holder.pid}); "
                        "wait for it to finish or choose another --out")
        line = one_error_line(capsys, cli.main(["train", "--resume", str(run)]))
        assert f"{run} is in use by another minisd run (process {holder.pid})" in line
        assert os.listdir(run) == [".lock"]  # nothing was written
    finally:
        holder.kill()  # SIGKILL: no clean-up runs in the holder
        holder.wait(timeout=60)
    assert cli.main(["train", *TINY, "--out", str(run)]) == 0
    assert "test accuracy" in capsys.readouterr().out


def test_train_on_the_reference_kernels_records_the_tier_and_resumes_on_it(tmp_path, capsys, monkeypatch):
    """--kernels reference runs the textbook code (no fast kernel is called) and the run folder
    says so; a resume continues on the recorded tier."""
    from minisd import kernels
    from minisd.kernels import fast

    def refuse(*args, **kwargs):
        raise AssertionError("a fast kernel ran in a --kernels reference run")

    for name in kernels.PAIRS:
        monkeypatch.setattr(fast, name, refuse)
    run = str(tmp_path / "ref")
    assert cli.main(["train", *TINY, "--kernels", "reference", "--out", run]) == 0
    with open(os.path.join(run, "settings.json")) as handle:
        assert json.load(handle)["kernels"] == "reference"
    kernels.use("fast")
    # Finished: the resume only evaluates again, on the recorded tier (the fast kernels still refuse).
    assert cli.main(["train", "--resume", run, "--quiet"]) == 0
    assert kernels.active() == "fast"  # and the caller's tier is back afterwards


def test_a_bad_minisd_kernels_gives_one_line_and_kernels_option_overrides_it(monkeypatch, capsys):
    from minisd import kernels

    monkeypatch.setenv("MINISD_KERNELS", "quick")
    monkeypatch.setitem(kernels._state, "active", None)  # as in a new process: the variable is read again
    line = one_error_line(capsys, cli.main(["gradcheck", "--depth", "8"]))
    assert "MINISD_KERNELS: unknown tier 'quick'; expected one of reference, fast" in line
    assert cli.main(["gradcheck", "--depth", "8", "--kernels", "reference"]) == 0
    assert "reference kernels" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# Entry points: python -m minisd, --version
# ------------------------------------------------------------------------------------------------


def test_version_prints_the_package_version(capsys):
    import importlib.metadata  # noqa: PLC0415

    import minisd  # noqa: PLC0415

    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"minisd {minisd.__version__}"
    assert minisd.__version__ == importlib.metadata.version("minisd")  # the installed distribution's


def test_python_dash_m_minisd_is_the_minisd_command(tmp_path):
    """``python -m minisd`` parses, answers and fails as ``minisd`` does (exit codes included)."""
    import minisd  # noqa: PLC0415

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(
        os.path.abspath(minisd.__file__))), os.environ.get("PYTHONPATH")])))

    def module_run(*args):
        return subprocess.run([sys.executable, "-m", "minisd", *args], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=120)

    version = module_run("--version")
    assert (version.returncode, version.stdout.strip()) == (0, f"minisd {minisd.__version__}")
    usage = module_run("--help")
    assert usage.returncode == 0 and usage.stdout == cli.build_parser().format_help()
    wrong = module_run("train", "--depth", "7")
    assert wrong.returncode == 2 and len(wrong.stderr.strip().splitlines()) == 1
    assert "Traceback" not in wrong.stderr and "--depth" in wrong.stderr
