"""Issue 27: a run folder never harms what is not its own, absurd inputs get one line, SIGTERM saves.

Each test here failed on the code before the issue was fixed (see the issue's list)."""
from __future__ import annotations

import errno
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest

from minisd import backend, cli, models, optim, training
from minisd import functional as F
from minisd.kernels import parallel
from minisd.training import files

from helpers import interrupt_after_steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--depth", "8", "--epochs", "1", "--batch-size", "32", "--train-subset", "64", "--quiet"]


def tiny(**overrides):
    """ResNet-8 on 64 digits, 2 steps an epoch: about a second."""
    values = dict(depth=8, epochs=1, batch_size=32, train_subset=64, seed=5)
    values.update(overrides)
    return training.Settings(**values)


def quiet(lines=None):
    return dict(log=lines.append if lines is not None else (lambda line: None), progress=False)


def one_error_line(capsys, code, expected_code=1):
    err = capsys.readouterr().err
    assert code == expected_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(folder):
    """{name: bytes or link target} of everything in ``folder``."""
    out = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        out[name] = ("link", os.readlink(path)) if os.path.islink(path) else open(path, "rb").read()
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-epoch run folder (copy it before changing it)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    training.fit(tiny(), run_dir=run, **quiet())
    return run


def copy_of(finished, tmp_path, name="run"):
    target = tmp_path / name
    shutil.copytree(finished, target, symlinks=True)
    return target


# ------------------------------------------------------------------------------------------------
# A folder that is not minisd's is neither cleaned nor reused
# ------------------------------------------------------------------------------------------------


def test_a_foreign_folder_is_refused_and_left_as_it_was(tmp_path, capsys):
    project = tmp_path / "proj"
    project.mkdir()
    (project / "settings.json").write_text('{"mine": 1}')
    (project / ".tmp-notes.txt").write_text("notes")
    before = snapshot(project)
    with pytest.raises(training.RunFolderError, match=r"proj is not a minisd run folder \(it holds 2 entries minisd "
                                                      r"did not write: .tmp-notes.txt, settings.json\); nothing there "
                                                      r"was changed"):
        training.fit(tiny(), run_dir=project, **quiet())
    line = one_error_line(capsys, cli.main(["train", *TINY, "--out", str(project)]))
    assert "is not a minisd run folder" in line
    assert snapshot(project) == before
    # `--out .` in a folder holding someone's summary.json: the same refusal, nothing overwritten
    cwd = tmp_path / "work"
    cwd.mkdir()
    (cwd / "summary.json").write_text("my summary")
    with pytest.raises(training.RunFolderError, match="not a minisd run folder"):
        training.fit(tiny(), run_dir=cwd, **quiet())
    assert (cwd / "summary.json").read_text() == "my summary"
    with pytest.raises(training.RunFolderError, match="not a folder"):
        training.fit(tiny(), run_dir=cwd / "summary.json", **quiet())


def test_new_runs_mark_their_folder_and_older_runs_stay_resumable(tmp_path, finished):
    settings = json.loads((finished / "settings.json").read_text())
    assert settings["format"] == "minisd-run"
    # A run made before the mark: settings.json without it, but a minisd checkpoint.
    old = copy_of(finished, tmp_path, "old")
    del settings["format"]
    (old / "settings.json").write_text(json.dumps({**settings, "note": "edited"}))  # not the exact settings either
    result = training.resume(old, **quiet())
    assert result.test_acc == json.loads((finished / "summary.json").read_text())["test_acc"]
    assert json.loads((old / "settings.json").read_text())["format"] == "minisd-run"  # marked now
    # Empty folders and folders holding only a lock are minisd's to use.
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".lock").write_text("")
    assert len(training.fit(tiny(), run_dir=empty, **quiet()).history) == 1


def test_only_minisd_partial_files_are_removed(tmp_path, finished):
    run = copy_of(finished, tmp_path)
    (run / ".tmp-0123456789ab.npz").write_bytes(b"half")      # what write_atomically leaves
    (run / ".tmp-notes.txt").write_text("mine")                # not
    (run / ".tmp-0123456789ab.npz.bak").write_text("mine")     # not
    os.mkdir(run / ".tmp-abcdefabcdef.png")                    # not a file
    lines = []
    training.resume(run, **quiet(lines))
    assert "removed 1 partial file an interrupted save left in" in "\n".join(lines)
    assert sorted(n for n in os.listdir(run) if n.startswith(".tmp-")) == [
        ".tmp-0123456789ab.npz.bak", ".tmp-abcdefabcdef.png", ".tmp-notes.txt"]


# ------------------------------------------------------------------------------------------------
# Links and entries that are not regular files
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["metrics.jsonl", "summary.json", "settings.json"])
def test_links_in_a_run_folder_are_replaced_never_written_through(tmp_path, finished, name):
    run = copy_of(finished, tmp_path)
    outside = tmp_path / "precious.txt"
    outside.write_text("do not touch")
    os.remove(run / name)
    os.symlink(outside, run / name)
    training.resume(run, **quiet())
    assert outside.read_text() == "do not touch"
    assert not os.path.islink(run / name) and (run / name).stat().st_size > 0


def test_a_linked_lock_file_is_refused(tmp_path, finished, capsys):
    run = copy_of(finished, tmp_path)
    outside = tmp_path / "precious.txt"
    outside.write_text("do not touch")
    os.remove(run / ".lock")
    os.symlink(outside, run / ".lock")
    with pytest.raises(training.RunFolderError, match=r"\.lock is a symbolic link; minisd locks only a regular "
                                                      r"\.lock file it created"):
        training.resume(run, **quiet())
    line = one_error_line(capsys, cli.main(["train", "--resume", str(run), "--quiet"]))
    assert "symbolic link" in line
    assert outside.read_text() == "do not touch"


def test_a_fifo_in_a_run_folder_is_refused_without_blocking(tmp_path, finished):
    """Opening a FIFO for reading waits for a writer: before, `--resume` hung forever."""
    for name in ("last.npz", "settings.json"):
        run = copy_of(finished, tmp_path, f"run-{name}")
        for checkpoint in ("last.npz", "best.npz"):
            os.remove(run / checkpoint)
        if name == "last.npz":
            os.remove(run / "settings.json")
            shutil.copy(finished / "settings.json", run / "settings.json")
        if (run / name).exists():
            os.remove(run / name)
        os.mkfifo(run / name)
        code = (f"import sys; from minisd import cli; sys.exit(cli.main(['train', '--resume', {str(run)!r}, "
                "'--quiet']))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, PYTHONPATH=REPO))
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert "not a regular file" in proc.stderr


# ------------------------------------------------------------------------------------------------
# Checkpoints: headers first, plain floats only
# ------------------------------------------------------------------------------------------------


def _write_checkpoint(path, arrays, meta):
    np.savez(path, meta=np.array(json.dumps(dict(meta, format="minisd-checkpoint"))), **arrays)


def test_checkpoint_arrays_must_be_floats_in_range(tmp_path, finished, capsys):
    arrays, _, meta = training.load_checkpoint(finished / "best.npz")
    base = {f"model.{k}": v for k, v in arrays.items()}
    strings = dict(base, **{"model.fc.bias": np.array(["nan"] * 10)})
    _write_checkpoint(tmp_path / "strings.npz", strings, meta)
    with pytest.raises(training.CheckpointError, match=r"entry 'model.fc.bias' holds <U3 values, not floating-point "
                                                       r"numbers"):
        training.load_checkpoint(tmp_path / "strings.npz")
    huge = dict(base, **{"model.fc.bias": np.full(10, 1e300)})  # float64, far beyond float32
    _write_checkpoint(tmp_path / "huge.npz", huge, meta)
    line = one_error_line(capsys, cli.main(["evaluate", str(tmp_path / "huge.npz")]))
    assert "holds values out of range for the model's number type (1 array: model.fc.bias)" in line
    assert "weights are finite" not in line


def test_a_checkpoint_that_unpacks_to_gigabytes_is_refused_before_any_array_is_read(tmp_path, finished, monkeypatch,
                                                                                     capsys):
    _, _, meta = training.load_checkpoint(finished / "best.npz")
    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("meta.npy", _npy_bytes(np.array(json.dumps(dict(meta, format="minisd-checkpoint")))))
        big = np.zeros(16 * 2**20, np.float32)  # 64 MB of zeros, a few tens of kB deflated
        archive.writestr("model.conv1.weight.npy", _npy_bytes(big))
    assert bomb.stat().st_size < 2**20
    read = []
    original = np.lib.format.read_array

    def recording(*args, **kwargs):
        array = original(*args, **kwargs)
        read.append(array.nbytes)
        return array

    monkeypatch.setattr(np.lib.format, "read_array", recording)
    line = one_error_line(capsys, cli.main(["evaluate", str(bomb)]))
    assert "does not fit the model" in line and "model.conv1.weight: expected shape (16, 1, 3, 3)" in line
    assert max(read, default=0) < 2**20  # the metadata only


def _npy_bytes(array):
    import io  # noqa: PLC0415

    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def test_a_text_file_named_npz_gets_a_minisd_message(tmp_path, capsys):
    fake = tmp_path / "notes.npz"
    fake.write_text("these are my notes\n")
    line = one_error_line(capsys, cli.main(["evaluate", str(fake)]))
    assert "notes.npz: it is not a minisd checkpoint (not an .npz archive)" in line
    assert "allow_pickle" not in line and "pickle" not in line


# ------------------------------------------------------------------------------------------------
# Resume: the settings file, the folder, the words
# ------------------------------------------------------------------------------------------------


def test_resume_rewrites_settings_json_with_the_settings_in_force(tmp_path, finished):
    run = copy_of(finished, tmp_path)
    assert json.loads((run / "settings.json").read_text())["kernels"] == "fast"
    training.resume(run, kernels_name="reference", **quiet())
    assert json.loads((run / "settings.json").read_text())["kernels"] == "reference"
    (run / "settings.json").write_text('{"depth": 8, "epo')  # truncated by hand
    training.resume(run, **quiet())
    restored = json.loads((run / "settings.json").read_text())
    assert restored["format"] == "minisd-run" and restored["depth"] == 8 and restored["epochs"] == 1


def test_resuming_into_a_read_only_folder_is_refused_before_training(tmp_path, monkeypatch):
    cut = tmp_path / "cut"
    with pytest.raises(training.TrainingInterrupted):
        training.fit(tiny(epochs=2), run_dir=cut, log=_sigint_after_first_epoch_line, progress=False)
    steps = []
    monkeypatch.setattr(optim.SGD, "step", lambda self: steps.append(1))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if os.fspath(path) == str(cut)
                        else real_access(path, mode, **kw))  # as a read-only folder answers (even to root)
    with pytest.raises(training.RunFolderError, match=r"cannot resume in .*cut: the folder is read-only; copy the run "
                                                      r"to a writable folder and resume it there"):
        training.resume(cut, **quiet())
    assert steps == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_really_read_only_folder_is_refused(tmp_path, finished):
    run = copy_of(finished, tmp_path)
    os.chmod(run, 0o555)
    try:
        with pytest.raises(training.RunFolderError, match="the folder is read-only"):
            training.resume(run, **quiet())
    finally:
        os.chmod(run, 0o755)


def _sigint_after_first_epoch_line(line):
    if line.startswith("epoch 1/"):
        os.kill(os.getpid(), signal.SIGINT)


def test_positions_name_epochs_and_steps_unambiguously(tmp_path, monkeypatch):
    interrupt_after_steps(monkeypatch, 3)  # epoch 2, step 1 (2 steps an epoch)
    run = tmp_path / "my run"
    with pytest.raises(training.TrainingInterrupted) as info:
        training.fit(tiny(epochs=3), run_dir=run, **quiet())
    message = str(info.value)
    assert "interrupted by Ctrl-C in epoch 2 of 3, after step 1 of its 2 steps" in message
    # The printed command survives a paste: the folder name is quoted for the shell.
    command = message.splitlines()[-1].removeprefix("resume with: ")
    assert shlex.split(command) == ["minisd", "train", "--resume", str(run)]
    monkeypatch.undo()
    lines = []
    training.resume(run, **quiet(lines))
    assert f"resuming {run / 'last.npz'} in epoch 2 of 3, after step 1 of its 2 steps" in lines


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names open files through /proc (Linux)")
def test_a_full_disk_names_the_file_and_leaves_whole_metrics_lines(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real_fsync = os.fsync
    writes = {"metrics": 0}

    def full_disk(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".jsonl"):
            writes["metrics"] += 1
            if writes["metrics"] == 3:  # settings written, epoch 1's line, then epoch 2's line fails
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", full_disk)
    line = one_error_line(capsys, cli.main(["train", *TINY, "--epochs", "2", "--out", str(run)]))
    assert line == f"minisd: error: No space left on device: {run / 'metrics.jsonl'}"
    records = [json.loads(text) for text in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1]
    assert not [n for n in os.listdir(run) if n.startswith(".tmp-")]


def test_evaluating_a_missing_validation_split_says_so(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", *TINY, "--val-size", "0", "--out", str(run)]) == 0
    capsys.readouterr()
    line = one_error_line(capsys, cli.main(["evaluate", str(run), "--split", "val"]))
    assert "the run has no val split (it was trained with --val-size 0); evaluate it with --split test" in line
    assert "diverged" not in line


def test_empty_paths_are_refused():
    with pytest.raises(training.CheckpointError, match="the run folder name is empty"):
        training.resume("", **quiet())
    with pytest.raises(training.RunFolderError, match="the run folder name is empty"):
        training.fit(tiny(), run_dir="", **quiet())


def test_a_nan_stop_gives_advice_resume_can_follow(tmp_path, monkeypatch):
    original = F.softmax_cross_entropy_forward
    calls = {"n": 0}

    def poisoned(logits, labels):
        loss, cache = original(logits, labels)
        if logits.shape[0] == 32:
            calls["n"] += 1
            if calls["n"] == 3:  # epoch 2, after epoch 1's checkpoint
                return loss * float("nan"), cache
        return loss, cache

    monkeypatch.setattr(F, "softmax_cross_entropy_forward", poisoned)
    with pytest.raises(training.NonFiniteLossError) as info:
        training.fit(tiny(epochs=2), run_dir=tmp_path / "run", **quiet())
    message = str(info.value)
    assert "--resume keeps the run's learning rate and would diverge again: start a new run (another --out) " \
           "with a smaller --lr" in message


# ------------------------------------------------------------------------------------------------
# Numbers and environment values, checked where they enter
# ------------------------------------------------------------------------------------------------


def test_settings_bound_epochs_and_seed():
    with pytest.raises(training.SettingsError, match=r"epochs must be a whole number in \[1, 1000000\], got a "
                                                     r"number with 401 digits"):
        tiny(epochs=10**400).validate()
    with pytest.raises(training.SettingsError, match="seed must be a whole number in"):
        tiny(seed=2**64).validate()


@pytest.mark.parametrize("value", ["\u00b2", "\u0663", "9" * 400, "0", "2000"])
def test_minisd_num_threads_accepts_ascii_digits_only(monkeypatch, value):
    monkeypatch.setenv("MINISD_NUM_THREADS", value)
    monkeypatch.setattr(parallel, "_NUM_THREADS", None)
    with pytest.raises(ValueError, match=r"MINISD_NUM_THREADS must be a whole number from 1 to 1024 \(threads"):
        parallel.get_num_threads()
    monkeypatch.setenv("MINISD_NUM_THREADS", " 3 ")
    assert parallel.get_num_threads() == 3


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(depth=20.0), TypeError, r"resnet_cifar: depth must be a whole number 6n \+ 2 .*got 20.0 \(float\)"),
    (dict(depth="20"), TypeError, r"resnet_cifar: depth must be a whole number 6n \+ 2 .*got '20' \(str\)"),
    (dict(in_channels=0), ValueError, r"resnet_cifar: in_channels must be >= 1, got 0"),
    (dict(num_classes=0), ValueError, r"resnet_cifar: num_classes must be >= 1, got 0"),
    (dict(num_classes=10.5), TypeError, r"resnet_cifar: num_classes must be a whole number, got 10.5 \(float\)"),
])
def test_resnet_cifar_names_the_bad_argument(kwargs, error, message):
    with pytest.raises(error, match=message):
        models.resnet_cifar(**kwargs)


def test_the_digits_val_size_error_names_the_option(capsys):
    line = one_error_line(capsys, cli.main(["train", *TINY, "--val-size", "5000"]))
    assert "cannot hold out 5000 validation images" in line and "--val-size" in line


# ------------------------------------------------------------------------------------------------
# Signals
# ------------------------------------------------------------------------------------------------

_SLOW_STEPS = textwrap.dedent("""
    import sys, time
    from minisd import cli, optim
    original = optim.SGD.step
    def step(self):
        original(self)
        print("step", flush=True)
        time.sleep(0.2)
    optim.SGD.step = step
    sys.exit(cli.main(sys.argv[1:]))
""")


def test_sigterm_saves_and_says_how_to_resume(tmp_path):
    run = tmp_path / "run"
    argv = ["train", "--depth", "8", "--epochs", "3", "--batch-size", "32", "--train-subset", "96", "--quiet",
            "--out", str(run)]
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_STEPS, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=REPO))
    steps = 0
    while steps < 4:  # epoch 2, step 1 (3 steps an epoch); the log's lines come between
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        steps += line.strip() == "step"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert "SIGTERM: saving a checkpoint at the next safe point" in out  # the log, at once
    assert re.search(r"interrupted by SIGTERM (in epoch \d of 3, after step \d of its 3 steps|after epoch \d of 3)", err)
    assert f"resume with: minisd train --resume {run}" in err
    _, _, meta = training.load_checkpoint(run / "last.npz")
    assert meta["epoch"] * 3 + meta["step"] >= 4  # the partial epoch is kept
    result = training.resume(run, **quiet())
    assert len(result.history) == 3


def test_ctrl_c_while_numpy_is_imported_is_one_line():
    """A Ctrl-C in the first tenth of a second lands in `import numpy`: made deterministic here by an
    import hook that raises KeyboardInterrupt there."""
    code = textwrap.dedent("""
        import sys
        class CtrlC:
            def find_spec(self, name, path=None, target=None):
                if name == "numpy":
                    raise KeyboardInterrupt
        sys.meta_path.insert(0, CtrlC())
        from minisd.cli import main
        sys.exit(main(["train", "--quiet"]))
    """)
    env = {k: v for k, v in os.environ.items() if k != "MINISD_BACKEND"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(env, PYTHONPATH=REPO))
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip() == "minisd: interrupted"


def test_a_checkpoint_resumed_from_someone_elses_folder_writes_nothing_there(tmp_path, finished):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "report.txt").write_text("mine")
    shutil.copy(finished / "last.npz", downloads / "checkpoint.npz")
    before = snapshot(downloads)
    with pytest.raises(training.RunFolderError, match="downloads is not a minisd run folder .* copy the checkpoint "
                                                      "into a new folder and resume it there"):
        training.resume(downloads / "checkpoint.npz", **quiet())
    assert snapshot(downloads) == before
