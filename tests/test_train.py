"""The training loop: run folder, determinism, checkpoints, exact resume, Ctrl-C, non-finite loss."""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import sys

import numpy as np
import pytest

from minisd import backend, data, models, optim, training
from minisd import functional as F

from helpers import interrupt_after_steps


def tiny(**overrides):
    """A run that takes about a second: ResNet-8 on 96 digits, batches of 32 (3 steps an epoch)."""
    values = dict(depth=8, epochs=2, batch_size=32, train_subset=96, seed=3)
    values.update(overrides)
    return training.Settings(**values)


def quiet_fit(settings, run_dir, lines=None):
    log = (lines.append if lines is not None else (lambda line: None))
    return training.fit(settings, run_dir=run_dir, log=log, progress=False)


def params_of(path):
    arrays, optim_arrays, meta = training.load_checkpoint(path)
    return arrays, optim_arrays, meta


def assert_same_checkpoint_state(path_a, path_b):
    a, oa, ma = params_of(path_a)
    b, ob, mb = params_of(path_b)
    assert a.keys() == b.keys() and oa.keys() == ob.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    for k in oa:
        np.testing.assert_array_equal(oa[k], ob[k], err_msg=k)
    assert ma["rng"]["gate_rng"] == mb["rng"]["gate_rng"]
    assert without_time(ma["history"]) == without_time(mb["history"])


def without_time(history):
    return [{k: v for k, v in h.items() if k != "time_s"} for h in history]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted 3-epoch run, shared by the tests below: (result, run folder, log lines)."""
    backend.seed(0)
    lines = []
    run = tmp_path_factory.mktemp("reference") / "run"
    return quiet_fit(tiny(epochs=3), run, lines), run, lines


def test_fit_writes_the_run_folder(reference):
    result, run, lines = reference
    names = set(os.listdir(run))
    assert {"settings.json", "metrics.jsonl", "best.npz", "last.npz", "curves.png", "summary.json"} <= names
    assert not [n for n in names if n.startswith(".tmp-")]  # temporary files were renamed
    settings = json.loads((run / "settings.json").read_text())
    assert settings["depth"] == 8 and settings["translate"] == 1 and settings["flip"] is False
    assert settings["backend"] == backend.name()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    for r in records:
        assert {"lr", "train_loss", "train_acc", "val_loss", "val_acc", "active_fraction", "time_s"} <= r.keys()
        assert 0 < r["active_fraction"] <= 1 and 0 <= r["val_acc"] <= 1
    assert [r["lr"] for r in records] == pytest.approx([0.1, 0.01, 0.001])  # step schedule, 3 epochs
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_acc"] == pytest.approx(result.test_acc)
    epoch_lines = [line for line in lines if line.startswith("epoch ")]
    assert len(epoch_lines) == 3
    for line in epoch_lines:
        for part in ("train loss", "acc", "val acc", "active", "time"):
            assert part in line
    assert any(line.startswith("test accuracy") for line in lines)


def test_reported_test_accuracy_is_the_best_validation_checkpoint(reference):
    result, run, _ = reference
    vals = [(h["val_acc"], -h["val_loss"]) for h in result.history]
    assert result.best_epoch == 1 + max(range(3), key=lambda i: vals[i])
    best = training.evaluate_checkpoint(run / "best.npz", "test")
    assert best["acc"] == pytest.approx(result.test_acc)
    assert best["epoch"] == result.best_epoch  # the checkpoint was saved after that epoch


def test_same_seed_same_metrics(tmp_path, reference):
    again = quiet_fit(tiny(epochs=3), tmp_path / "again")
    assert without_time(again.history) == without_time(reference[0].history)
    assert again.test_acc == reference[0].test_acc
    other = quiet_fit(tiny(epochs=1, seed=4), tmp_path / "other")
    assert other.history[0]["train_loss"] != reference[0].history[0]["train_loss"]


def test_stop_after_trains_the_first_epochs_of_the_schedule_and_resumes_exactly(tmp_path, reference):
    """stop_after=1 of a 3-epoch run: epoch 1 as in the uninterrupted run, resumable to the same end."""
    full, full_dir, _ = reference
    lines = []
    first = training.fit(tiny(epochs=3), run_dir=tmp_path / "part", log=lines.append, progress=False, stop_after=1)
    assert not first.finished and first.test_acc is None and first.best_epoch == 1
    assert without_time(first.history) == without_time(full.history[:1])
    assert "stopped as asked after epoch 1 of 3" in lines[-1] and not (tmp_path / "part" / "summary.json").exists()
    again = training.resume(tmp_path / "part", log=lambda line: None, progress=False, stop_after=1)
    assert not again.finished and len(again.history) == 1          # already there: nothing more trained
    resumed = training.resume(tmp_path / "part", log=lambda line: None, progress=False)
    assert resumed.finished and resumed.test_acc == full.test_acc
    assert without_time(resumed.history) == without_time(full.history)
    assert_same_checkpoint_state(full_dir / "last.npz", tmp_path / "part" / "last.npz")


@pytest.mark.parametrize("bad", [0, 4, 1.5, True, "2"])
def test_stop_after_outside_the_run_is_refused_by_name(tmp_path, bad):
    with pytest.raises(training.SettingsError, match=r"stop_after: expected a whole number of epochs from 1 to 3"):
        training.fit(tiny(epochs=3), run_dir=tmp_path / "run", log=lambda line: None, progress=False, stop_after=bad)


@pytest.mark.parametrize("where", ["after-epoch-1", "last-step-of-epoch-1", "mid-epoch-2"])
def test_interrupt_and_resume_equals_uninterrupted(tmp_path, monkeypatch, where, reference):
    """Ctrl-C after epoch 1, during its last step, or inside epoch 2, then resume: the same weights."""
    full, full_dir, _ = reference
    log = None
    if where == "after-epoch-1":  # Ctrl-C right after the epoch's summary line (checkpoint written)
        def log(line):
            if line.startswith("epoch 1/"):
                os.kill(os.getpid(), signal.SIGINT)
    else:
        interrupt_after_steps(monkeypatch, 3 if where == "last-step-of-epoch-1" else 4)
    with pytest.raises(training.TrainingInterrupted, match="resume with: minisd train --resume") as info:
        training.fit(tiny(epochs=3), run_dir=tmp_path / "cut", log=log or (lambda line: None), progress=False)
    assert info.value.checkpoint == str(tmp_path / "cut" / "last.npz")
    _, _, meta = training.load_checkpoint(tmp_path / "cut")
    expected = {"after-epoch-1": (1, 0), "last-step-of-epoch-1": (0, 3), "mid-epoch-2": (1, 1)}[where]
    assert (meta["epoch"], meta["step"]) == expected
    monkeypatch.undo()
    resumed = training.resume(tmp_path / "cut", log=lambda line: None, progress=False)
    assert_same_checkpoint_state(full_dir / "last.npz", tmp_path / "cut" / "last.npz")
    assert_same_checkpoint_state(full_dir / "best.npz", tmp_path / "cut" / "best.npz")
    assert without_time(resumed.history) == without_time(full.history)
    assert resumed.test_acc == full.test_acc
    metrics = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in metrics] == [1, 2, 3]


def test_checkpoint_round_trip_and_atomic_write(tmp_path):
    model = models.resnet_cifar(depth=8, in_channels=1, seed=1)
    opt = optim.SGD(model, lr=0.1, momentum=0.9)
    opt.buffers["fc.weight"] = backend.xp().ones((10, 64), dtype=np.float32)
    path = training.save_checkpoint(tmp_path / "c.npz", model, opt, {"epoch": 4, "note": "x"})
    assert os.listdir(tmp_path) == ["c.npz"]
    arrays, optim_arrays, meta = training.load_checkpoint(path)
    assert meta["epoch"] == 4 and meta["optimizer"]["momentum"] == 0.9
    assert list(arrays) == list(model.state_dict())
    np.testing.assert_array_equal(optim_arrays["fc.weight"], 1)
    other = models.resnet_cifar(depth=8, in_channels=1, seed=2)
    other.load_state_dict(arrays)
    for (k, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(b), err_msg=k)
    with np.load(path, allow_pickle=False) as archive:  # plain arrays only
        assert "meta" in archive.files


def test_checkpoint_errors_name_the_problem(tmp_path):
    model = models.resnet_cifar(depth=8, in_channels=1)
    path = training.save_checkpoint(tmp_path / "c.npz", model, None, {})
    arrays, _, _ = training.load_checkpoint(path)
    bigger = models.resnet_cifar(depth=14, in_channels=1)
    with pytest.raises(training.CheckpointError, match="missing: .*layer1.1.branch.0.weight"):
        training.checkpoints.load_into_model(bigger, arrays, path)
    arrays["fc.weight"] = np.zeros((3, 64), np.float32)
    with pytest.raises(training.CheckpointError, match=r"fc.weight: expected shape \(10, 64\), got \(3, 64\)"):
        training.checkpoints.load_into_model(model, arrays, path)
    with pytest.raises(training.CheckpointError, match="not found"):
        training.load_checkpoint(tmp_path / "nothing.npz")
    np.savez(tmp_path / "objects.npz", meta=np.array([{"a": 1}], dtype=object))
    with pytest.raises(training.CheckpointError, match="cannot read"):  # refused: allow_pickle=False
        training.load_checkpoint(tmp_path / "objects.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(training.CheckpointError, match="cannot read"):
        training.load_checkpoint(tmp_path / "junk.npz")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    original = F.softmax_cross_entropy_forward
    calls = {"n": 0}
    saved = {}

    def poisoned(logits, labels):
        loss, cache = original(logits, labels)
        if logits.shape[0] == 32:  # training batches only (validation batches are bigger)
            calls["n"] += 1
            if calls["n"] == 5:  # epoch 2, step 2
                saved["last"] = (run / "last.npz").read_bytes()
                return loss * float("nan"), cache
        return loss, cache

    monkeypatch.setattr(F, "softmax_cross_entropy_forward", poisoned)
    with pytest.raises(training.NonFiniteLossError, match=r"non-finite loss \(nan\) at epoch 2, step 2 .*last.npz"):
        quiet_fit(tiny(epochs=3), run)
    assert (run / "last.npz").read_bytes() == saved["last"]
    _, _, meta = training.load_checkpoint(run / "last.npz")
    assert (meta["epoch"], meta["step"]) == (1, 0)


def test_run_folder_is_not_overwritten(reference):
    before = (reference[1] / "last.npz").read_bytes()
    with pytest.raises(training.RunFolderError, match="--resume"):
        quiet_fit(tiny(epochs=1), reference[1])
    assert (reference[1] / "last.npz").read_bytes() == before


def test_evaluate_runs_every_branch_and_restores_the_mode(rng):
    """Even with every gate forced off for training, evaluation runs each branch on each batch
    (scaled by p_l), and gives the loss and accuracy of the eval-mode forward."""
    from helpers import count_calls

    model = models.resnet_cifar(depth=8, in_channels=1, final_survival=0.5, schedule="linear")
    model.force_gates(False)
    calls = [count_calls(block.branch, "forward") for block in model.blocks]
    x = rng.standard_normal((10, 1, 8, 8)).astype(np.float32)
    split = data.Split(x, np.arange(10) % 10).to()
    model.train()
    loss, acc = training.evaluate(model, split, batch_size=4)
    assert [len(c) for c in calls] == [3, 3, 3]  # every branch, on each of the 3 batches
    assert not any(block.branch_skipped for block in model.blocks)
    assert model.training
    model.eval()
    logits = model(backend.to_device(x))
    expected_loss, _ = F.softmax_cross_entropy_forward(logits, split.y)
    expected_acc = float(np.mean(backend.to_numpy(logits).argmax(axis=1) == np.arange(10) % 10))
    assert loss == pytest.approx(float(expected_loss), rel=1e-5) and acc == pytest.approx(expected_acc)
    training.evaluate(model, split)
    assert not model.training


def test_warmup_epochs_run_at_a_tenth_of_the_learning_rate(tmp_path):
    result = quiet_fit(tiny(epochs=3, lr=0.1, warmup_epochs=1), tmp_path / "warm")
    assert [r["lr"] for r in result.history] == pytest.approx([0.01, 0.01, 0.001])   # step schedule: 0.1, 0.01, 0.001
    with pytest.raises(training.SettingsError, match=r"warm-up epochs must be a whole number from 0 to epochs - 1 \(2\), got 3"):
        tiny(epochs=3, warmup_epochs=3).validate()


def test_settings_are_validated():
    with pytest.raises(training.SettingsError, match="6n \\+ 2"):
        training.Settings(depth=10).validate()
    with pytest.raises(training.SettingsError, match="unknown dataset"):
        training.Settings(dataset="mnist").validate()
    with pytest.raises(training.SettingsError, match="batch size"):
        training.Settings(batch_size=1).validate()


def test_cifar10_run_on_generated_files(tmp_path):
    from test_data import write_fake_cifar

    write_fake_cifar(tmp_path / "data", "py", per_batch=4, test_count=4)
    result = quiet_fit(tiny(dataset="cifar10", data_dir=str(tmp_path / "data"), val_size=4, epochs=1,
                            batch_size=8, train_subset=None), tmp_path / "run")
    settings = json.loads((tmp_path / "run" / "settings.json").read_text())
    assert settings["flip"] is True and settings["translate"] == 4
    assert 0 <= result.test_acc <= 1 and len(result.history) == 1


# ------------------------------------------------------------------------------------------------
# No host round trip inside a training step (CPU stand-in for the GPU test in test_gpu.py)
# ------------------------------------------------------------------------------------------------


class _DeviceArray(np.ndarray):
    """A NumPy array posing as a CuPy array: every read of its values into Python (int, float,
    bool, item, tolist, get, formatting), each a device-to-host copy and a stall on a GPU, is
    recorded in ``reads``."""

    reads: list = []

    def _read(self, how, convert):
        _DeviceArray.reads.append(how)
        return convert(self.view(np.ndarray))

    def __int__(self):
        return self._read("int", int)

    def __float__(self):
        return self._read("float", float)

    def __bool__(self):
        return self._read("bool", bool)

    def __index__(self):
        return self._read("index", lambda a: a.__index__())

    def __format__(self, spec):
        return self._read("format", lambda a: format(a, spec))

    def item(self, *args):
        return self._read("item", lambda a: a.item(*args))

    def tolist(self):
        return self._read("tolist", lambda a: a.tolist())

    def get(self):
        return self._read("get", lambda a: a.copy())


def _fake_cupy():
    """A module named cupy whose array class is _DeviceArray; its functions are NumPy's, with array
    results handed out as _DeviceArray (as CuPy's functions return device arrays)."""
    import types  # noqa: PLC0415

    fake = types.ModuleType("cupy")
    fake.ndarray = _DeviceArray

    def wrap(fn):
        def call(*args, **kwargs):
            out = fn(*args, **kwargs)
            return out.view(_DeviceArray) if type(out) is np.ndarray else out
        return call

    def attribute(name):
        value = getattr(np, name)
        if callable(value) and not isinstance(value, (type, np.ufunc)):
            return wrap(value)
        return value

    fake.__getattr__ = attribute
    return fake


def test_a_training_step_reads_nothing_back_from_the_device(monkeypatch):
    """Batch (with augmentation), forward, loss, backward and the SGD update of a stochastic-depth
    ResNet on "device" arrays: not one value is read back to the host. (The trainer then reads
    the loss once, on purpose: the NaN check and the progress bar.)"""
    if backend.name() != "numpy":  # a stand-in for CuPy beside the real one crashed the process on a GPU
        pytest.skip("counts host reads with a stand-in for CuPy: runs on the numpy backend "
                    "(tests/test_gpu.py checks the real device)")
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy())
    model = models.resnet_cifar(depth=8, in_channels=1, final_survival=0.5, schedule="uniform", seed=1)
    for m in model.modules():
        for store in (m.params, m.grads, m.buffers):
            for k in store:
                store[k] = store[k].view(_DeviceArray)
    opt = optim.SGD(model, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    digits = data.load_digits()
    split = data.Split(digits.train.x[:64].view(_DeviceArray), digits.train.y[:64].view(_DeviceArray))
    order_rng, aug_rng = data.epoch_generators(0, 0)
    stream = data.batches(split, 16, order=order_rng.permutation(64), aug_rng=aug_rng, translate=1, flip=True)
    _DeviceArray.reads = []
    for _, (xb, yb) in zip(range(3), stream):
        assert backend.is_device_array(xb) and backend.is_device_array(yb)
        loss, _ = training.train_step(model, xb, yb)
        opt.step()
    assert _DeviceArray.reads == []
    assert True in model.gates() or False in model.gates()
    float(loss)  # the instrument does see a read
    assert _DeviceArray.reads == ["float"]


# ------------------------------------------------------------------------------------------------
# Non-finite weights, reused folders, Ctrl-C, files
# ------------------------------------------------------------------------------------------------


def _poison_after(monkeypatch, step, where="bn1"):
    """After the optimizer's ``step``-th update, make a batch-norm running variance infinite: the
    training loss stays finite (training uses batch statistics), the weights do not."""
    original = optim.SGD.step
    calls = {"n": 0}

    def poisoned(self):
        original(self)
        calls["n"] += 1
        if calls["n"] == step:
            getattr(self.model, where).buffers["running_var"][0] = np.inf

    monkeypatch.setattr(optim.SGD, "step", poisoned)


def _all_finite(path):
    with np.load(path, allow_pickle=False) as archive:
        return all(np.isfinite(archive[k]).all() for k in archive.files if archive[k].dtype.kind == "f")


def test_non_finite_weights_are_never_saved_and_the_message_names_the_last_finite_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _poison_after(monkeypatch, 5)  # epoch 2 of 3 steps each
    with pytest.raises(training.NonFiniteLossError, match=r"non-finite weights at the end of epoch 2 \(1 array: "
                                                        r"model.bn1.running_var\).*the last finite checkpoint is "
                                                        r".*last.npz \(end of epoch 1\)"):
        quiet_fit(tiny(epochs=3), run)
    for name in ("last.npz", "best.npz"):
        assert _all_finite(run / name)
    assert training.load_checkpoint(run / "last.npz")[2]["epoch"] == 1


def test_non_finite_weights_in_the_first_epoch_leave_a_folder_to_reuse(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _poison_after(monkeypatch, 2)
    with pytest.raises(training.NonFiniteLossError, match="no checkpoint was written, so .* holds nothing to resume"):
        quiet_fit(tiny(epochs=1), run)
    assert not (run / "last.npz").exists() and not (run / "best.npz").exists()
    monkeypatch.undo()
    lines = []
    result = quiet_fit(tiny(epochs=1), run, lines)  # the same command again: the folder is reused
    assert len(result.history) == 1 and any(line.startswith(f"reusing {run}") for line in lines)


def test_checkpoints_with_non_finite_values_are_neither_written_nor_loaded(tmp_path):
    model = models.resnet_cifar(depth=8, in_channels=1)
    model.bn1.buffers["running_var"][1] = np.nan
    with pytest.raises(training.NonFiniteCheckpointError, match=r"not saving .*c.npz: non-finite values in 1 array: "
                                                              r"model.bn1.running_var"):
        training.save_checkpoint(tmp_path / "c.npz", model)
    assert os.listdir(tmp_path) == []  # not even a temporary file
    # one written by an older minisd (or by hand) is refused when loaded: no evaluation, no resume
    arrays = {f"model.{k}": backend.to_numpy(v) for k, v in model.state_dict().items()}
    np.savez(tmp_path / "old.npz", meta=np.array(json.dumps({"format": training.checkpoints.CHECKPOINT_FORMAT})), **arrays)
    with pytest.raises(training.NonFiniteCheckpointError, match="holds non-finite values .*cannot be evaluated or resumed"):
        training.load_checkpoint(tmp_path / "old.npz")


def test_a_folder_without_a_checkpoint_is_reused_or_resumed_as_a_fresh_start(tmp_path, reference):
    """What a run killed in its first epoch leaves (settings, an empty metrics log, a partial save)
    can be used again: by the same command, or by --resume, which starts over from settings.json."""
    full, _, _ = reference
    run = tmp_path / "run"
    run.mkdir()
    (run / "settings.json").write_text(json.dumps(tiny(epochs=3).to_dict()))
    (run / "metrics.jsonl").write_text("")
    (run / ".tmp-0123456789ab.npz").write_bytes(b"PK\x03\x04 half a zip")  # a name write_atomically gives
    lines = []
    resumed = training.resume(run, log=lines.append, progress=False)
    assert any("no checkpoint in" in line and "starting it again from the beginning" in line for line in lines)
    assert any(line.startswith("removed 1 partial file") for line in lines)
    assert not [n for n in os.listdir(run) if n.startswith(".tmp-")]
    assert without_time(resumed.history) == without_time(full.history)
    assert resumed.test_acc == full.test_acc
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(training.CheckpointError, match="nothing to resume in .*empty: no checkpoint"):
        training.resume(empty, progress=False)


def test_ctrl_c_is_acknowledged_at_once(tmp_path, monkeypatch):
    events = []
    original = optim.SGD.step

    def step(self):
        original(self)
        events.append("step")
        if len(events) == 1:
            os.kill(os.getpid(), signal.SIGINT)
            events.append("after the signal")

    monkeypatch.setattr(optim.SGD, "step", step)

    def log(line):
        if line.startswith("Ctrl-C"):
            events.append(line)

    with pytest.raises(training.TrainingInterrupted):
        training.fit(tiny(epochs=1), run_dir=tmp_path / "run", log=log, progress=False)
    assert events[0] == "step" and events[1].startswith("Ctrl-C: saving a checkpoint at the next safe point")
    assert events[2:] == ["after the signal"]  # said before anything else ran, and no further step


@pytest.mark.parametrize("which", ["validation-of-the-last-epoch", "final-test-evaluation"])
def test_ctrl_c_during_evaluation_stops_and_resumes_exactly(tmp_path, monkeypatch, reference, which):
    full, full_dir, _ = reference
    original = training.evaluate
    calls = []

    def evaluate(*args, **kwargs):
        calls.append(1)
        # Each epoch evaluates the validation split, then the test split (reported per epoch):
        # call 5 is the last epoch's validation, call 7 the final test evaluation of the best checkpoint.
        if len(calls) == (5 if which.startswith("validation") else 7):
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(training.loop, "evaluate", evaluate)
    run = tmp_path / "run"
    with pytest.raises(training.TrainingInterrupted, match="resume with: minisd train --resume") as info:
        quiet_fit(tiny(epochs=3), run)
    meta = training.load_checkpoint(run / "last.npz")[2]
    if which.startswith("validation"):
        assert (meta["epoch"], meta["step"]) == (2, 3)  # the epoch's steps are done, its validation is not
    else:
        assert "during the final test evaluation" in str(info.value) and (meta["epoch"], meta["step"]) == (3, 0)
        assert not (run / "summary.json").exists()
    monkeypatch.undo()
    resumed = training.resume(run, log=lambda line: None, progress=False)
    assert without_time(resumed.history) == without_time(full.history)
    assert resumed.test_acc == full.test_acc
    assert_same_checkpoint_state(full_dir / "last.npz", run / "last.npz")


def test_a_second_ctrl_c_during_the_save_waits_for_it(tmp_path, monkeypatch):
    interrupt_after_steps(monkeypatch, 1)  # the first press, after step 1
    original = training.save_checkpoint
    lines = []

    def save_checkpoint(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # the second press, as the save starts
        return original(*args, **kwargs)

    monkeypatch.setattr(training.loop, "save_checkpoint", save_checkpoint)
    run = tmp_path / "run"
    with pytest.raises(training.TrainingInterrupted):  # not KeyboardInterrupt: the save finished
        training.fit(tiny(epochs=1), run_dir=run, log=lines.append, progress=False)
    assert any("a checkpoint is being written; stopping as soon as it is complete" in line for line in lines)
    meta = training.load_checkpoint(run / "last.npz")[2]
    assert (meta["epoch"], meta["step"]) == (0, 1)


def test_run_files_share_one_mode_and_the_folder_is_synced(tmp_path, monkeypatch, reference):
    run = reference[1]
    mode = os.stat(run / "settings.json").st_mode & 0o777
    for name in ("last.npz", "best.npz", "curves.png", "summary.json", "metrics.jsonl"):
        assert os.stat(run / name).st_mode & 0o777 == mode, name
    synced = []
    original = os.fsync

    def fsync(fd):
        synced.append("folder" if _is_dir_fd(fd) else "file")
        return original(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    training.save_checkpoint(tmp_path / "c.npz", models.resnet_cifar(depth=8, in_channels=1))
    assert synced == ["file", "folder"]  # the data, then the rename


def _is_dir_fd(fd):
    return stat.S_ISDIR(os.fstat(fd).st_mode)


def test_resuming_a_finished_run_keeps_its_wall_time(tmp_path, reference):
    run = tmp_path / "run"
    shutil.copytree(reference[1], run)
    before = json.loads((run / "summary.json").read_text())["wall_time_s"]
    training.resume(run, log=lambda line: None, progress=False)
    after = json.loads((run / "summary.json").read_text())["wall_time_s"]
    assert after == before  # the time the run took, not the seconds of the evaluation done again


def test_fit_and_resume_give_back_the_callers_tier_and_backend(tmp_path, monkeypatch):
    """A run sets the tier (and backend) it trains on; the caller's come back when it ends, however
    it ends, so a notebook that trained one run on the reference tier is not left on it."""
    from minisd import kernels

    monkeypatch.setitem(kernels._state, "active", "fast")
    seen = []
    original = training.loop.train_step

    def spy(model, x, labels):
        seen.append(kernels.active())
        return original(model, x, labels)

    monkeypatch.setattr(training.loop, "train_step", spy)
    run = tmp_path / "run"
    quiet_fit(tiny(epochs=1, kernels="reference"), run)
    assert set(seen) == {"reference"} and kernels.active() == "fast" and backend.name() == "numpy"
    with pytest.raises(training.SettingsError):
        training.resume(run, log=lambda line: None, progress=False, kernels_name="quick")
    assert kernels.active() == "fast"
    interrupt_after_steps(monkeypatch, 1)
    with pytest.raises(training.TrainingInterrupted):
        quiet_fit(tiny(epochs=1, kernels="reference"), tmp_path / "cut")
    assert kernels.active() == "fast"
