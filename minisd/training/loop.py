"""The training loop: :func:`fit` trains from scratch, :func:`resume` continues a run exactly where
it stopped. One epoch is, at its heart::

    for images, labels in batches:
        loss, logits = train_step(model, images, labels)    # forward, loss, backward
        optimizer.step()

and everything else in this module is what makes that safe to leave running: a progress bar, one
line per epoch, checkpoints, Ctrl-C, a stop on a NaN, and the run folder's files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

from minisd import backend, data, kernels, optim
from minisd.training.checkpoints import (CheckpointError, NonFiniteCheckpointError, describe_names, layout,
                                         load_checkpoint, load_into_model, meta_int, read_checkpoint_meta,
                                         save_checkpoint, settings_from_meta)
from minisd.training.files import write_atomically
from minisd.training.interrupts import InterruptFlag, TrainingInterrupted
from minisd.training.metrics import EvaluationStopped, GradientMagnitudes, evaluate
from minisd.training.run_folder import (check_no_run_in, check_not_in_use, check_run_folder,
                                        default_run_dir, quoted, read_settings_json, remove_partial_files,
                                        run_folder_lock, write_settings_json)
from minisd.training.settings import Settings, SettingsError, build_model, check_translate
from minisd.training.step import train_step

__all__ = ["fit", "resume", "RunResult", "NonFiniteLossError"]


class NonFiniteLossError(RuntimeError):
    """The loss or the weights became NaN or infinite; the message names where, and the last finite
    checkpoint (or says there is none)."""


@dataclass
class RunResult:
    """What :func:`fit` returns."""

    run_dir: str
    history: list
    test_acc: float
    test_loss: float
    best_epoch: int
    best_val_acc: float | None
    wall_time_s: float
    model: object = None
    # False when ``stop_after`` stopped the run before its last epoch: test_acc and test_loss are
    # then None (no final evaluation), and the run folder resumes where it stopped.
    finished: bool = True


def _fmt_pct(x) -> str:
    return "  -   " if x is None else f"{100 * x:5.2f}%"


def _print(line):
    print(line, flush=True)


class _Trainer:
    """One run: its settings, data, model and optimizer, its position (epoch and step), and the
    files of its run folder. :meth:`run` trains to the last epoch and evaluates."""

    def __init__(self, settings: Settings, run_dir: str, log, progress, stop_after: int | None = None):
        self.settings = settings.validate()
        self.run_dir = run_dir
        self.log = log
        self.progress = progress
        self.stop_after = _check_stop_after(stop_after, settings.epochs)
        if settings.backend is not None:
            backend.use(settings.backend)  # also replaces a MINISD_BACKEND that could not be used
        settings.backend = backend.name()
        # The tier is part of the run: both give the same results up to rounding, but a resumed
        # run continues bit for bit only on the tier it started on.
        kernels.use(settings.kernels or kernels.active())
        settings.kernels = kernels.active()
        backend.seed(settings.seed)
        if settings.data_dir is not None:
            settings.data_dir = os.path.abspath(os.fspath(settings.data_dir))
        dataset = data.load(settings.dataset, settings.data_dir, settings.val_size)
        # Labels are checked here, once, on the host: the loss does not check them on the GPU,
        # where reading them back would stall every step.
        data.check_labels(dataset)
        if settings.train_subset is not None:
            dataset = dataclasses.replace(dataset, train=dataset.train.subset(settings.train_subset))
        settings.val_size = len(dataset.val)
        check_translate(settings.translate, dataset)
        settings.translate = dataset.translate if settings.translate is None else int(settings.translate)
        settings.flip = dataset.flip if settings.flip is None else bool(settings.flip)
        self.dataset = dataset.to()
        self.model = build_model(settings, dataset.num_classes, dataset.in_channels)
        # The stem reads the images: their gradient is never used, so its backward skips dx.
        self.model.conv1.input_grad = False
        self.optimizer = optim.SGD(self.model, lr=settings.lr, momentum=settings.momentum,
                                   nesterov=settings.nesterov, weight_decay=settings.weight_decay,
                                   skip_unused=settings.skip_unused)
        self.lr_at = optim.make_lr_schedule(settings.lr_schedule, settings.lr, settings.epochs,
                                            settings.warmup_epochs)
        self.steps_per_epoch = data.num_batches(len(self.dataset.train), settings.batch_size)
        # Position: the next epoch to run (0-based) and the batches of it already done.
        self.epoch, self.step = 0, 0
        self.partial = self._empty_partial()
        self.grad_magnitudes = GradientMagnitudes(self.model.conv1, self.model.blocks)
        self.history: list = []
        self.best_val, self.best_val_loss, self.best_epoch = None, None, None
        self.last_good = None  # (path, epoch, step) of the last checkpoint written (all checkpoints are finite)
        self.interrupt = None  # the Ctrl-C flag while run() runs
        self.saved_at = None  # (epoch, step) of the last save of last.npz
        # Wall time of the run: earlier sessions (from the checkpoint) plus this one.
        self.wall_before, self.session_start = 0.0, time.perf_counter()
        self.finished_before = False  # set by restore(): the checkpoint is the end of the last epoch

    @staticmethod
    def _empty_partial():
        """The running sums of an epoch in progress (kept in checkpoints taken mid-epoch)."""
        return {"loss_sum": 0.0, "correct": 0, "seen": 0, "active_sum": 0.0, "steps": 0, "time_s": 0.0}

    # ---- the loop -------------------------------------------------------------------------------

    def run(self) -> RunResult:
        self.session_start = time.perf_counter()
        s = self.settings
        self.log(f"{self.dataset.describe()}")
        self.log(f"ResNet-{s.depth} ({len(self.model.blocks)} residual blocks, {self.model.num_parameters():,} "
                 f"parameters), schedule {s.schedule} p_L={s.final_survival}: "
                 f"{self.model.expected_active_blocks:.2f} blocks active per step on average; "
                 f"backend {backend.name()}, seed {s.seed}")
        self.log(f"run folder: {self.run_dir}")
        with InterruptFlag(announce=self.log) as interrupt:
            self.interrupt = interrupt
            try:
                while self.epoch < s.epochs:
                    if self.stop_after is not None and self.epoch >= self.stop_after:
                        return self.pause()
                    self.train_epoch()
                    self.end_epoch()
                    if interrupt.requested:  # Ctrl-C during the epoch's end (validation done, saved)
                        self._stop_for_interrupt()
                if self.history:
                    with interrupt.saving():
                        self.save_curves()
                return self.finish()
            finally:
                self.interrupt = None

    def train_epoch(self):
        """Train on the rest of the current epoch's batches (all of them, unless resumed mid-epoch)."""
        s, model, optimizer = self.settings, self.model, self.optimizer
        optimizer.lr = self.lr_at(self.epoch)
        model.train()
        batches = self._batches()
        bar = _progress_bar(self.progress, self.steps_per_epoch, self.step, f"epoch {self.epoch + 1}/{s.epochs}")
        started = time.perf_counter() - self.partial["time_s"]
        try:
            for images, labels in batches:
                self._stop_if_interrupted(started)
                loss, logits = train_step(model, images, labels)
                loss_value = float(loss)  # the step's one read from the device
                if not math.isfinite(loss_value):
                    self._stop_for_nonfinite(loss_value)
                self.grad_magnitudes.add_step()
                optimizer.step()
                self._count(loss_value, logits, labels, bar)
            self._stop_if_interrupted(started)  # Ctrl-C during the last step: stop before validating
        finally:
            if bar is not None:
                bar.close()
        self.partial["time_s"] = time.perf_counter() - started  # kept if validation is interrupted

    def _batches(self):
        """The epoch's batches from the current step on: shuffled and augmented from generators
        derived from (seed, epoch), so a resumed epoch draws the very same batches."""
        s = self.settings
        order_rng, aug_rng = data.epoch_generators(s.seed, self.epoch)
        order = order_rng.permutation(len(self.dataset.train))
        augmenting = s.translate > 0 or s.flip
        return data.batches(self.dataset.train, s.batch_size, order=order, aug_rng=aug_rng if augmenting else None,
                            translate=s.translate, flip=s.flip, start=self.step)

    def _count(self, loss_value, logits, labels, bar):
        """Add one step to the epoch's running sums and the progress bar."""
        p = self.partial
        n = int(labels.shape[0])
        p["loss_sum"] += loss_value * n
        p["correct"] += int((logits.argmax(axis=1) == labels).sum())
        p["seen"] += n
        p["active_sum"] += self.model.active_fraction()
        p["steps"] += 1
        self.step += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{p['loss_sum'] / p['seen']:.3f}", acc=f"{p['correct'] / p['seen']:.3f}",
                            refresh=False)

    def end_epoch(self):
        """Validate, record the epoch, and save its checkpoints (best.npz when validation improved)."""
        s, p = self.settings, self.partial
        val_loss, val_acc = self._evaluate_split("val")
        # Reported for the paper's test-error curves; never used to choose the checkpoint (val_acc is).
        test_loss, test_acc = self._evaluate_split("test")
        record = {
            "epoch": self.epoch + 1,
            "lr": self.optimizer.lr,
            "train_loss": p["loss_sum"] / max(1, p["seen"]),
            "train_acc": p["correct"] / max(1, p["seen"]),
            "val_loss": val_loss,
            "val_acc": val_acc,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "active_fraction": p["active_sum"] / max(1, p["steps"]),
            "steps": p["steps"],
            "time_s": p["time_s"],
            **self.grad_magnitudes.summary(),
        }
        self.history.append(record)
        self.append_metrics(record)
        # Best: the highest validation accuracy; ties (frequent on a small validation split) go to
        # the lower validation loss.
        improved = (val_acc is None or self.best_val is None or val_acc > self.best_val
                    or (val_acc == self.best_val and val_loss < self.best_val_loss))
        if improved:
            self.best_val, self.best_val_loss, self.best_epoch = val_acc, val_loss, self.epoch + 1
        self.epoch, self.step, self.partial = self.epoch + 1, 0, self._empty_partial()
        self.grad_magnitudes.reset()
        if improved:
            self.save("best.npz")
        self.save("last.npz")
        self.log(f"epoch {self.epoch:>{len(str(s.epochs))}}/{s.epochs}  lr {record['lr']:<6.4g} "
                 f"train loss {record['train_loss']:.4f} acc {_fmt_pct(record['train_acc'])}  "
                 f"val acc {_fmt_pct(val_acc)}  (test {_fmt_pct(test_acc).strip()})  "
                 f"active {record['active_fraction']:.2f}  time {record['time_s']:5.1f}s{'  *' if improved else ''}")

    def _evaluate_split(self, name):
        """(loss, acc) on the "val" or "test" split, or (None, None) for an empty split; Ctrl-C stops
        it at once (the checkpoint then holds the finished training part of the epoch, and resuming
        evaluates again)."""
        split = getattr(self.dataset, name)
        if not len(split):
            return None, None
        try:
            return evaluate(self.model, split, self.settings.eval_batch_size, stop=lambda: self.interrupt.requested)
        except EvaluationStopped:
            self._stop_for_interrupt()

    def finish(self) -> RunResult:
        """Evaluate the best-validation checkpoint on the test split; write summary.json."""
        best_path = self.path("best.npz")
        model_arrays, _, meta = load_checkpoint(best_path, expected=layout(self.model))
        load_into_model(self.model, model_arrays, best_path)
        interrupt = self.interrupt
        try:
            test_loss, test_acc = evaluate(self.model, self.dataset.test, self.settings.eval_batch_size,
                                           stop=(lambda: interrupt.requested) if interrupt is not None else None)
        except EvaluationStopped:
            raise TrainingInterrupted(
                f"interrupted during the final test evaluation; all {self.settings.epochs} epochs are saved in "
                f"{self.path('last.npz')}\nresume with: minisd train --resume {quoted(self.run_dir)}",
                checkpoint=self.path("last.npz"), run_dir=self.run_dir, signum=interrupt.signum) from None
        wall_time = self._finished_wall_time()
        best_epoch = meta.get("best_epoch")
        summary = {"test_acc": test_acc, "test_loss": test_loss, "best_epoch": best_epoch,
                   "best_val_acc": meta.get("best_val_acc"), "epochs": self.settings.epochs,
                   "wall_time_s": wall_time, "checkpoint": best_path}
        text = json.dumps(summary, indent=2) + "\n"
        write_atomically(self.path("summary.json"), ".json", lambda handle: handle.write(text.encode()))
        val_note = (f", best validation accuracy {_fmt_pct(meta.get('best_val_acc')).strip()}"
                    if meta.get("best_val_acc") is not None else "")
        self.log(f"test accuracy {100 * test_acc:.2f}% (checkpoint of epoch {best_epoch}{val_note}; "
                 f"{len(self.dataset.test)} test images); run time {wall_time:.1f}s")
        self.log(f"run folder {self.run_dir}: metrics.jsonl, curves.png, best.npz, last.npz, summary.json")
        return RunResult(self.run_dir, list(self.history), test_acc, test_loss, best_epoch, meta.get("best_val_acc"),
                         wall_time, self.model)

    def pause(self) -> RunResult:
        """Stop after epoch ``stop_after`` as asked: last.npz is already saved there; no final test."""
        with self.interrupt.saving():
            self.save_curves()
        self.log(f"stopped as asked {self.position()}; resume with: minisd train --resume {quoted(self.run_dir)}")
        return RunResult(self.run_dir, list(self.history), None, None, self.best_epoch, self.best_val,
                         self.wall_time(), self.model, finished=False)

    # ---- stopping: Ctrl-C, NaN ------------------------------------------------------------------

    def _stop_if_interrupted(self, started):
        if self.interrupt.requested:
            self.partial["time_s"] = time.perf_counter() - started
            self._stop_for_interrupt()

    def _stop_for_interrupt(self):
        """Save last.npz at the current position (unless it was just saved there), then stop."""
        path = self.path("last.npz") if self.saved_at == (self.epoch, self.step) else self.save("last.npz")
        with self.interrupt.saving() if self.interrupt is not None else contextlib.nullcontext():
            self.save_curves()
        signum = self.interrupt.signum if self.interrupt is not None else None
        by = f" by {self.interrupt.signal_name}" if self.interrupt is not None else ""
        raise TrainingInterrupted(
            f"interrupted{by} {self.position()}; checkpoint saved to {path}\n"
            f"resume with: minisd train --resume {quoted(self.run_dir)}", checkpoint=path, run_dir=self.run_dir,
            **({"signum": signum} if signum is not None else {}))

    def position(self) -> str:
        """Where the run stands, in words that cannot be misread: "after epoch 3 of 10", or "in
        epoch 4 of 10, after step 40 of its 47 steps"."""
        if self.step == 0 and self.epoch > 0:
            return f"after epoch {self.epoch} of {self.settings.epochs}"
        return (f"in epoch {self.epoch + 1} of {self.settings.epochs}, after step {self.step} of its "
                f"{self.steps_per_epoch} steps")

    def _last_finite_checkpoint(self) -> str:
        """Words for the NaN messages: the last checkpoint written (all are finite), or that there is none."""
        self.save_curves()
        if self.last_good is None:
            return (f"no checkpoint was written, so {self.run_dir} holds nothing to resume: run the same command "
                    "again (it reuses the folder) with a smaller --lr")
        path, ep, st = self.last_good
        where = f"end of epoch {ep}" if st == 0 else f"epoch {ep + 1}, step {st}"
        return (f"the last finite checkpoint is {path} ({where}), left as it was. --resume keeps the run's "
                "learning rate and would diverge again: start a new run (another --out) with a smaller --lr")

    def _stop_for_nonfinite(self, value):
        global_step = self.epoch * self.steps_per_epoch + self.step + 1
        raise NonFiniteLossError(
            f"non-finite loss ({value}) at epoch {self.epoch + 1}, step {self.step + 1} (global step {global_step}); "
            f"training stopped before the update; {self._last_finite_checkpoint()}.")

    def _stop_for_nonfinite_weights(self, names):
        where = (f"at the end of epoch {self.epoch}" if self.step == 0
                 else f"in epoch {self.epoch + 1} after step {self.step}")
        raise NonFiniteLossError(
            f"non-finite weights {where} ({describe_names(names)}) after an update whose loss was finite; training "
            f"stopped without saving them; {self._last_finite_checkpoint()}.")

    # ---- checkpoints ----------------------------------------------------------------------------

    def meta(self) -> dict:
        """Everything a checkpoint holds besides the arrays: enough to resume at this exact step."""
        return {
            "settings": self.settings.to_dict(),
            "num_classes": self.dataset.num_classes,
            "in_channels": self.dataset.in_channels,
            "epoch": self.epoch,
            "step": self.step,
            "partial": dict(self.partial, gradient_magnitudes=self.grad_magnitudes.state_dict()),
            "history": self.history,
            "best_val_acc": self.best_val,
            "best_val_loss": self.best_val_loss,
            "best_epoch": self.best_epoch,
            "wall_time_s": self.wall_time(),
            "rng": {
                "gate_rng": self.model.gate_rng.bit_generator.state,
                "host_rng": backend.host_rng().bit_generator.state,
                "data_rng": {"derived_from": ["seed", "epoch"], "seed": self.settings.seed, "epoch": self.epoch,
                             "batches_drawn": self.step},
            },
        }

    def save(self, name) -> str:
        """Save a checkpoint; a second Ctrl-C waits for it. Non-finite weights stop the run instead."""
        saving = self.interrupt.saving() if self.interrupt is not None else contextlib.nullcontext()
        try:
            with saving:
                path = save_checkpoint(self.path(name), self.model, self.optimizer, self.meta())
        except NonFiniteCheckpointError as exc:
            self._stop_for_nonfinite_weights(exc.names)
        if name == "last.npz":
            self.last_good = (path, self.epoch, self.step)
            self.saved_at = (self.epoch, self.step)
        return path

    def restore(self, path) -> None:
        """Load a checkpoint written by :meth:`save`: weights, momentum, position, history, generators."""
        model_arrays, optim_arrays, meta = load_checkpoint(path, expected=layout(self.model))
        load_into_model(self.model, model_arrays, path)
        try:
            self.optimizer.load_state_dict({"hyper": meta.get("optimizer", {}), "buffers": optim_arrays})
        except (ValueError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"checkpoint {path}: {exc}") from None
        try:
            self.epoch = meta_int(meta, "epoch", None, 0, self.settings.epochs, path)
            self.step = meta_int(meta, "step", None, 0, self.steps_per_epoch, path)
            self.partial = dict(meta["partial"])
            self.grad_magnitudes.load_state_dict(self.partial.pop("gradient_magnitudes", None))
            if set(self.partial) != set(self._empty_partial()):
                raise ValueError(f"'partial' holds {sorted(self.partial)}")
            self.history = list(meta["history"])
            if len(self.history) != self.epoch or not all(isinstance(h, dict) for h in self.history):
                raise ValueError(f"'history' must hold one record per finished epoch ({self.epoch})")
            self.best_val, self.best_val_loss = meta["best_val_acc"], meta["best_val_loss"]
            self.best_epoch = meta["best_epoch"]
            self.wall_before = float(meta.get("wall_time_s", 0.0))
            self.model.gate_rng.bit_generator.state = meta["rng"]["gate_rng"]
            backend.host_rng().bit_generator.state = meta["rng"]["host_rng"]
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise CheckpointError(f"checkpoint {path} lacks the training state needed to resume, or it was "
                                  f"edited ({type(exc).__name__}: {exc})") from None
        self.last_good = (path, self.epoch, self.step)
        self.saved_at = (self.epoch, self.step)
        self.finished_before = self.epoch == self.settings.epochs

    # ---- the run folder's other files -----------------------------------------------------------

    def path(self, name):
        return os.path.join(self.run_dir, name)

    def wall_time(self) -> float:
        return self.wall_before + (time.perf_counter() - self.session_start)

    def _finished_wall_time(self) -> float:
        """The run's wall time for summary.json. Resuming a run that had already finished only
        evaluates again: its summary keeps the time the run took."""
        if self.finished_before:
            with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
                with open(self.path("summary.json"), encoding="utf-8") as handle:
                    return float(json.load(handle)["wall_time_s"])
        return self.wall_time()

    def write_settings(self):
        """settings.json: the settings in force (a resumed run's too: its backend or tier may differ)."""
        write_settings_json(self.run_dir, self.settings)

    def rewrite_metrics(self):
        """metrics.jsonl, one line per finished epoch, written whole and renamed into place: a full
        disk never leaves a torn last line (a few hundred lines: rewriting them costs nothing)."""
        text = "".join(json.dumps(record) + "\n" for record in self.history)
        write_atomically(self.path("metrics.jsonl"), ".jsonl", lambda handle: handle.write(text.encode()))

    def append_metrics(self, record):
        """The epoch's record is already in the history: write the file again with it."""
        self.rewrite_metrics()

    def save_curves(self) -> None:
        """curves.png: loss, accuracy and time per epoch so far (nothing before the first epoch ends)."""
        if not self.history:
            return
        from minisd import plots  # noqa: PLC0415  (matplotlib only when a picture is drawn)

        s = self.settings
        label = {"none": "constant depth", "linear": f"linear decay to p_L = {s.final_survival:g}",
                 "uniform": f"uniform p = {s.final_survival:g}"}.get(s.schedule, s.schedule)
        fig = plots.training_curves({f"ResNet-{s.depth}, {label}": self.history})
        write_atomically(self.path("curves.png"), ".png",
                         lambda handle: fig.savefig(handle, format="png", dpi=plots.figure.SAVE_DPI,
                                                    bbox_inches="tight", facecolor="white"))


def _progress_bar(progress, total, initial, desc):
    if progress is False:
        return None
    from tqdm.auto import tqdm  # noqa: PLC0415

    # progress=None: tqdm decides (shown on a terminal, hidden when stderr is a file or pipe).
    return tqdm(total=total, initial=initial, desc=desc, unit="step", leave=False, dynamic_ncols=True,
                disable=None if progress is None else not progress, file=sys.stderr)


@contextlib.contextmanager
def _restoring_backend_and_tier():
    """A run sets the backend and the kernel tier it trains on; afterwards (however it ends) the
    caller's come back, so a notebook that trained one run on the reference tier is not left there."""
    backend_before, tier_before = backend.name(), kernels.active()
    try:
        yield
    finally:
        backend.use(backend_before)
        kernels.use(tier_before)


def _check_stop_after(stop_after, epochs):
    if stop_after is None:
        return None
    if isinstance(stop_after, bool) or not isinstance(stop_after, int) or not 1 <= stop_after <= epochs:
        raise SettingsError(f"stop_after: expected a whole number of epochs from 1 to {epochs} "
                            f"(the run's epochs), got {stop_after!r}")
    return stop_after


def _start_in(trainer: _Trainer, log, note_reuse=True) -> RunResult:
    """Claim the run folder (lock), tidy it, write the settings and run. Nothing is written before
    the lock is held, and a folder without a checkpoint is reused (it holds nothing to lose)."""
    run_dir = trainer.run_dir
    check_run_folder(run_dir)  # again: the folder may have changed while the data loaded
    with run_folder_lock(run_dir):
        check_no_run_in(run_dir)  # again: a run may have started while the data loaded
        remove_partial_files(run_dir, log)
        if note_reuse and os.path.exists(trainer.path("settings.json")):
            log(f"reusing {run_dir}: it holds no checkpoint (the run there stopped before its first epoch ended)")
        trainer.write_settings()
        trainer.rewrite_metrics()
        return trainer.run()


def fit(settings: Settings | None = None, run_dir=None, log=_print, progress=None,
        stop_after: int | None = None) -> RunResult:
    """Train from scratch as ``settings`` say; the run folder (default ``runs/<name>``) must not hold
    a checkpoint, and no other run may be using it. The backend and kernel tier in force before the
    call are in force again after it.

    ``stop_after=k`` trains only the first k epochs of the run's schedule (its learning-rate drops
    stay where ``settings.epochs`` puts them) and stops there, resumable: a check that a long run's
    first epochs come out as stored, or a long run split over sittings.

    Returns a :class:`RunResult` (test accuracy of the best-validation checkpoint). Raises
    NonFiniteLossError, TrainingInterrupted (Ctrl-C; a checkpoint was saved), DataError,
    SettingsError, RunFolderError, backend.BackendUnavailable.
    """
    settings = dataclasses.replace(settings or Settings())
    settings.validate()
    run_dir = os.fspath(run_dir) if run_dir is not None else default_run_dir(settings)
    # Fail before the data load where that is already clear; the binding checks come with the lock.
    check_run_folder(run_dir)
    check_no_run_in(run_dir)
    check_not_in_use(run_dir)
    with _restoring_backend_and_tier():
        trainer = _Trainer(settings, run_dir, log, progress, stop_after)
        return _start_in(trainer, log)


def resume(path, log=_print, progress=None, backend_name: str | None = None, data_dir=None,
           kernels_name: str | None = None, stop_after: int | None = None) -> RunResult:
    """Continue a run from a run folder (its last.npz) or a checkpoint file, exactly where it stopped.

    The settings come from the checkpoint; ``backend_name``, ``kernels_name`` and ``data_dir`` may
    differ (a run moved to a GPU or to the other kernel tier, or data moved to another folder);
    ``stop_after`` stops it again after that epoch, as in :func:`fit`.
    Files are written to the checkpoint's folder. A run folder without a checkpoint but with its
    settings.json (the run died in its first epoch) starts again from the beginning with those
    settings. The backend and kernel tier in force before the call are in force again after it.
    """
    path = os.fspath(path)
    if not path:
        raise CheckpointError("nothing to resume: the run folder name is empty (is the shell variable set?)")
    fresh, meta = False, None
    if os.path.isdir(path):
        run_dir = path
        check_run_folder(run_dir, resuming=True)
        check_not_in_use(run_dir)
        # last.npz is written right after best.npz at every epoch end, so a folder holding only
        # best.npz was stopped between the two, and best.npz holds that same position.
        candidates = [os.path.join(path, n) for n in ("last.npz", "best.npz")]
        checkpoint = next((c for c in candidates if os.path.exists(c)), None)
        if checkpoint is None:
            if not os.path.exists(os.path.join(path, "settings.json")):
                raise CheckpointError(f"nothing to resume in {path}: no checkpoint (last.npz) and no settings.json")
            fresh = True
    else:
        checkpoint = path
        run_dir = os.path.dirname(os.path.abspath(checkpoint))
        meta = read_checkpoint_meta(checkpoint)  # before anything in its folder is looked at
        check_run_folder(run_dir, resuming=True)
        check_not_in_use(run_dir)
    if fresh:
        settings = read_settings_json(run_dir)
    else:
        meta = meta if meta is not None else read_checkpoint_meta(checkpoint)
        settings = settings_from_meta(meta, checkpoint)
    if backend_name is not None:
        settings.backend = backend_name
    if kernels_name is not None:
        settings.kernels = kernels_name
    if data_dir is not None:
        settings.data_dir = os.fspath(data_dir)
    with _restoring_backend_and_tier():
        trainer = _Trainer(settings, run_dir, log, progress, stop_after)
        if fresh:
            log(f"no checkpoint in {run_dir} (the run stopped before its first epoch ended): starting it again "
                "from the beginning with its settings.json")
            return _start_in(trainer, log, note_reuse=False)
        check_run_folder(run_dir, resuming=True)
        with run_folder_lock(run_dir):
            trainer.restore(checkpoint)  # read under the lock: the latest checkpoint, not one being replaced
            remove_partial_files(run_dir, log)
            trainer.write_settings()  # the settings in force now (--backend, --kernels, --data-dir may differ)
            trainer.rewrite_metrics()  # drop lines of epochs after the checkpoint
            log(f"resuming {checkpoint} {trainer.position()}")
            return trainer.run()
