"""The training loop: fit, evaluate, checkpoints, metrics log, progress bar.

    from minisd.train import Settings, fit
    result = fit(Settings(dataset="digits", depth=20, epochs=30))
    result.test_acc                      # test accuracy of the best-validation checkpoint

A run folder holds::

    settings.json      the settings, with dataset defaults resolved (backend, augmentation)
    metrics.jsonl      one JSON line per epoch: lr, train loss/acc, val loss/acc, test loss/acc, active
                       fraction, time, gradient magnitudes (first_conv_grad, block_grad)
    last.npz           checkpoint after the last finished epoch (or where Ctrl-C stopped the run)
    best.npz           checkpoint of the epoch with the best validation accuracy
    curves.png         training curves
    summary.json       test accuracy of the best checkpoint, written at the end
    .lock              held (flock) by the run that uses the folder; the kernel releases it when
                       that process ends, however it ends, so a crashed run never blocks the folder

Checkpoints are ``.npz`` files written to a temporary file and renamed (a crash while saving
leaves the previous checkpoint intact; the next run in the folder removes the partial file). They
hold plain, finite arrays only, loaded with ``allow_pickle=False``: ``model.<name>`` (parameters
and buffers), ``optim.<name>`` (momentum buffers) and ``meta``, one JSON string with the settings,
the position (epoch and step), the history, the optimizer's hyperparameters and the generator
states (the model's gate generator and the backend's host generator; the shuffle and augmentation
generators are derived from (seed, epoch), see :func:`minisd.data.epoch_generators`, so the
position is their state). A checkpoint is never written with a NaN or infinite value: weights that
stop being finite end the run, and the last finite checkpoint stays as it was.

Resuming restores all of that, so a run interrupted at any step and resumed ends with the same
weights as an uninterrupted run with the same seed (bit for bit on NumPy).

A folder that holds no checkpoint (a run that died in its first epoch) holds nothing to lose: a
new run may use it, and resuming it starts the run again from its settings.json.

Two kinds of numbers in each epoch record serve the paper's curves rather than the run itself:

* ``test_loss`` / ``test_acc``: the model after this epoch on the test split, as the paper plots
  test error per epoch. They are only reported: the checkpoint is chosen by ``val_acc`` alone.
* ``first_conv_grad``: the mean absolute gradient of the stem convolution's weight, averaged over
  the epoch's steps (the paper's Figure 8); ``block_grad``: the same for each residual block's
  branch parameters, averaged over the steps where that block ran (null for a block that never
  ran in the epoch). See :class:`GradientMagnitudes`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import secrets
import signal
import sys
import threading
import time
from dataclasses import dataclass

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: run folders are not locked there
    fcntl = None

import numpy

from minisd import backend, data, kernels, models, optim
from minisd import functional as F
from minisd.residual import MODES, SCALES, SCHEDULES

__all__ = [
    "Settings",
    "RunResult",
    "GradientMagnitudes",
    "fit",
    "resume",
    "evaluate",
    "evaluate_checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "model_from_checkpoint",
    "CheckpointError",
    "NonFiniteLossError",
    "NonFiniteCheckpointError",
    "TrainingInterrupted",
    "RunFolderError",
    "SettingsError",
]

CHECKPOINT_FORMAT = "minisd-checkpoint"
CHECKPOINT_VERSION = 1


class SettingsError(ValueError):
    """An invalid combination of training settings."""


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit the model."""


class RunFolderError(ValueError):
    """The run folder already holds a run (and --resume was not asked for)."""


class NonFiniteLossError(RuntimeError):
    """The loss or the weights became NaN or infinite; the message names where, and the last finite
    checkpoint (or says there is none)."""


class NonFiniteCheckpointError(CheckpointError):
    """A checkpoint would hold (or holds) NaN or infinite values; ``names`` lists those arrays."""

    def __init__(self, message, names=()):
        super().__init__(message)
        self.names = list(names)


class TrainingInterrupted(RuntimeError):
    """Ctrl-C stopped the run after saving a checkpoint; ``checkpoint`` is its path."""

    def __init__(self, message, checkpoint=None, run_dir=None):
        super().__init__(message)
        self.checkpoint, self.run_dir = checkpoint, run_dir


@dataclass
class Settings:
    """Everything that decides a run. ``None`` means: the dataset's (or the backend's) default.

    The defaults train a stochastic-depth ResNet-20 on the digits in about a minute on two cores
    (>= 97% test accuracy) with the paper's optimizer: lr 0.1, momentum 0.9, Nesterov, weight decay
    1e-4, lr divided by 10 at 50% and 75% of the epochs.
    """

    dataset: str = "digits"
    data_dir: str | None = None
    depth: int = 20
    schedule: str = "linear"        # survival probabilities: linear decay, uniform, none (constant depth)
    final_survival: float = 0.5     # p_L
    mode: str = "batch"
    scale: str = "eval"
    shortcut: str = "zero_pad"
    epochs: int = 30
    batch_size: int = 32
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    lr_schedule: str = "step"
    skip_unused: bool = False       # leave parameters of dropped branches untouched (see optim.SGD)
    translate: int | None = None    # augmentation: max shift in pixels (digits 1, cifar10 4)
    flip: bool | None = None        # augmentation: horizontal flips (digits no, cifar10 yes)
    val_size: int | None = None     # digits 180, cifar10 5000 (the paper's 45k/5k split)
    train_subset: int | None = None  # train on the first N training images only (quick tries, tests)
    eval_batch_size: int = 500
    backend: str | None = None      # None: the current backend (MINISD_BACKEND or numpy)
    kernels: str | None = None      # None: the tier in force (MINISD_KERNELS or fast); "reference" is slow
    seed: int = 0

    def validate(self) -> "Settings":
        def bad(message):
            raise SettingsError(message)

        self._check_types()
        if self.dataset not in data.DATASETS:
            bad(f"unknown dataset {self.dataset!r}; expected one of {', '.join(data.DATASETS)}")
        try:
            models.blocks_per_stage(self.depth)
        except ValueError:
            bad(f"depth must be 6n + 2 (8, 14, 20, 32, 44, 56, 110, ...), got {self.depth}")
        if self.schedule not in SCHEDULES:
            bad(f"unknown schedule {self.schedule!r}; expected one of {', '.join(SCHEDULES)}")
        if not 0.0 <= self.final_survival <= 1.0:
            bad(f"final survival probability p_L must be in [0, 1], got {self.final_survival}")
        if self.final_survival == 0.0 and self.scale == "train" and self.schedule != "none":
            bad("p_L = 0 with --scale train divides by zero; use --scale eval or p_L > 0")
        if self.mode not in MODES:
            bad(f"unknown mode {self.mode!r}; expected one of {', '.join(MODES)}")
        if self.scale not in SCALES:
            bad(f"unknown scale rule {self.scale!r}; expected one of {', '.join(SCALES)}")
        if self.epochs < 1:
            bad(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 2:
            bad(f"batch size must be >= 2 (batch norm needs two samples), got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            bad(f"learning rate must be a positive number, got {self.lr}")
        if self.lr_schedule not in optim.LR_SCHEDULES:
            bad(f"unknown learning-rate schedule {self.lr_schedule!r}; expected one of {', '.join(optim.LR_SCHEDULES)}")
        if self.backend is not None and self.backend not in backend.BACKENDS:
            bad(f"unknown backend {self.backend!r}; expected one of {', '.join(backend.BACKENDS)}")
        if self.kernels is not None and self.kernels not in kernels.TIERS:
            bad(f"unknown kernel tier {self.kernels!r}; expected one of {', '.join(kernels.TIERS)}")
        if self.translate is not None and self.translate < 0:
            bad(f"translate must be >= 0 pixels, got {self.translate}")
        if not isinstance(self.seed, int) or self.seed < 0:
            bad(f"seed must be a whole number >= 0, got {self.seed!r}")
        if self.train_subset is not None and self.train_subset < 2:
            bad(f"train subset must hold at least 2 images, got {self.train_subset}")
        if self.val_size is not None and self.val_size < 0:
            bad(f"validation size must be >= 0 images, got {self.val_size}")
        if self.eval_batch_size < 1:
            bad(f"evaluation batch size must be >= 1, got {self.eval_batch_size}")
        if self.shortcut not in ("zero_pad", "projection"):
            bad(f"unknown shortcut {self.shortcut!r}; expected 'zero_pad' or 'projection'")
        if not (self.momentum >= 0 and math.isfinite(self.momentum)):
            bad(f"momentum must be a number >= 0, got {self.momentum}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            bad(f"weight decay must be a number >= 0, got {self.weight_decay}")
        if self.nesterov and self.momentum == 0:
            bad("Nesterov momentum needs momentum > 0")
        return self

    def _check_types(self) -> None:
        """Each setting has its declared type (settings.json or a checkpoint may be edited by hand)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kinds = [k.strip() for k in str(f.type).split("|")]
            if value is None and "None" in kinds:
                continue
            accepted = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}
            allowed = tuple(t for k in kinds for t in accepted.get(k, ()))
            if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
                words = {"int": "a whole number", "float": "a number", "str": "a string", "bool": "true or false",
                         "None": "null"}
                expected = " or ".join(words.get(k, k) for k in kinds)
                raise SettingsError(f"setting {f.name!r} must be {expected}, got {value!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Settings":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


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


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


class EvaluationStopped(Exception):
    """Raised by :func:`evaluate` when its ``stop`` callable asked it to stop (Ctrl-C)."""


def evaluate(model, split: data.Split, batch_size: int = 500, stop=None) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model`` on ``split`` in eval mode: every branch runs, scaled by
    its rule. The model's training flag is restored afterwards.

    stop: a callable asked before each batch; when it returns True the evaluation ends at once with
    :class:`EvaluationStopped` (the trainer passes "was Ctrl-C pressed?").
    """
    was_training = model.training
    model.eval()
    loss_sum, correct, n = 0.0, 0, len(split)
    try:
        for xb, yb in data.batches(split, batch_size):
            if stop is not None and stop():
                raise EvaluationStopped
            logits = model(xb)
            loss, _ = F.softmax_cross_entropy_forward(logits, yb)
            loss_sum += float(loss) * int(yb.shape[0])
            correct += int((logits.argmax(axis=1) == yb).sum())
    finally:
        model.train(was_training)
    return (loss_sum / n, correct / n) if n else (math.nan, math.nan)


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def _rng_state(rng) -> dict:
    return rng.bit_generator.state


def _set_rng_state(rng, state: dict) -> None:
    rng.bit_generator.state = state


def _non_finite(arrays: dict) -> list:
    """Names of the floating arrays in ``arrays`` (host arrays) that hold a NaN or an infinity."""
    return [k for k, v in arrays.items() if v.dtype.kind in "fc" and not numpy.isfinite(v).all()]


def _describe_names(names, shown=3) -> str:
    listed = ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")
    return f"{len(names)} array{'s' if len(names) != 1 else ''}: {listed}"


def save_checkpoint(path, model, optimizer=None, meta: dict | None = None) -> str:
    """Write ``model`` (parameters and buffers), the optimizer's momentum buffers and ``meta`` (a
    JSON-able dict) to ``path`` atomically: a temporary file in the same folder, then os.replace.

    Refuses (NonFiniteCheckpointError, nothing written) when any array holds a NaN or an infinity:
    a checkpoint is something to resume or evaluate, and such weights are neither.
    """
    path = os.fspath(path)
    arrays = {f"model.{k}": backend.to_numpy(v) for k, v in model.state_dict().items()}
    if optimizer is not None:
        opt_state = optimizer.state_dict()
        arrays.update({f"optim.{k}": backend.to_numpy(v) for k, v in opt_state["buffers"].items()})
        meta = dict(meta or {}, optimizer=opt_state["hyper"])
    bad = _non_finite(arrays)
    if bad:
        raise NonFiniteCheckpointError(f"not saving {path}: non-finite values in {_describe_names(bad)}", bad)
    meta = dict(meta or {}, format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION)
    arrays["meta"] = numpy.array(json.dumps(meta))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _write_atomically(path, ".npz", lambda handle: numpy.savez(handle, **arrays))
    return path


PARTIAL_PREFIX = ".tmp-"  # temporary files of _write_atomically; a run removes those a kill left behind


def _write_atomically(path, suffix, write):
    """write(handle) into a temporary file beside ``path``, then rename it over ``path``.

    A crash or Ctrl-C mid-write leaves the old file intact (a rename is atomic), never half a file.
    The file gets the permissions the umask gives any new file (as settings.json has), and the
    folder is synced after the rename so the new name survives a power cut.
    """
    folder = os.path.dirname(os.path.abspath(path))
    while True:
        tmp = os.path.join(folder, f"{PARTIAL_PREFIX}{secrets.token_hex(6)}{suffix}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode 0666 minus the umask
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _sync_folder(folder)


def _sync_folder(folder) -> None:
    """fsync a folder (where the renamed entry lives); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def _checkpoint_path(path) -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        return os.path.join(path, "last.npz")
    return path


def load_checkpoint(path) -> tuple[dict, dict, dict]:
    """(model arrays, optimizer buffers, meta) from a checkpoint file (or a run folder: its last.npz).

    Loaded with ``allow_pickle=False``. CheckpointError if missing or not a minisd checkpoint.
    """
    path = _checkpoint_path(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with numpy.load(path, allow_pickle=False) as archive:
            contents = {k: archive[k] for k in archive.files}
    except Exception as exc:  # BadZipFile, ValueError (pickled objects), OSError, ...
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from None
    if "meta" not in contents:
        raise CheckpointError(f"{path} is not a minisd checkpoint (no 'meta' entry)")
    try:
        meta = json.loads(str(contents.pop("meta")))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: the 'meta' entry is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path} is not a minisd checkpoint (format {found!r})")
    bad = _non_finite(contents)
    if bad:
        raise NonFiniteCheckpointError(f"{path} holds non-finite values ({_describe_names(bad)}); it cannot be "
                                       "evaluated or resumed", bad)
    model_arrays = {k[len("model."):]: v for k, v in contents.items() if k.startswith("model.")}
    optim_arrays = {k[len("optim."):]: v for k, v in contents.items() if k.startswith("optim.")}
    return model_arrays, optim_arrays, meta


def _settings_from_meta(meta: dict, path) -> Settings:
    """The validated settings a checkpoint's metadata holds (it may have been edited by hand)."""
    values = meta.get("settings")
    if not isinstance(values, dict):
        raise CheckpointError(f"checkpoint {path}: its metadata holds no settings")
    try:
        return Settings.from_dict(values).validate()
    except (SettingsError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path}: invalid settings in its metadata ({exc})") from None


def _meta_int(meta: dict, key, default, low, high, path) -> int:
    value = meta.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise CheckpointError(f"checkpoint {path}: '{key}' in its metadata must be a whole number in "
                              f"[{low}, {high}], got {value!r}")
    return value


def _load_into_model(model, arrays: dict, path) -> None:
    try:
        model.load_state_dict(arrays)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} does not fit the model: {exc}") from None


def _build_model(settings: Settings, dataset: data.Dataset | None = None, num_classes=10, in_channels=None):
    if dataset is not None:
        num_classes, in_channels = dataset.num_classes, dataset.in_channels
    if in_channels is None:
        in_channels = 1 if settings.dataset == "digits" else 3
    return models.resnet_cifar(depth=settings.depth, num_classes=num_classes, in_channels=in_channels,
                               schedule=settings.schedule, final_survival=settings.final_survival,
                               mode=settings.mode, scale=settings.scale, shortcut=settings.shortcut,
                               seed=settings.seed)


def model_from_checkpoint(path, backend_name: str | None = None):
    """(model, meta): the model a checkpoint was saved from, with its weights, on the current backend."""
    model_arrays, _, meta = load_checkpoint(path)
    settings = _settings_from_meta(meta, _checkpoint_path(path))
    num_classes = _meta_int(meta, "num_classes", 10, 1, 1_000_000, _checkpoint_path(path))
    in_channels = _meta_int(meta, "in_channels", 1 if settings.dataset == "digits" else 3, 1, 4096,
                            _checkpoint_path(path))
    if backend_name:
        backend.use(backend_name)
    model = _build_model(settings, in_channels=in_channels, num_classes=num_classes)
    _load_into_model(model, model_arrays, _checkpoint_path(path))
    model.eval()
    return model, meta


def evaluate_checkpoint(path, split: str = "test", data_dir=None, backend_name: str | None = None) -> dict:
    """Evaluate a checkpoint on a split of the dataset it was trained on: {"loss", "acc", ...}."""
    model, meta = model_from_checkpoint(path, backend_name)
    settings = _settings_from_meta(meta, _checkpoint_path(path))
    dataset = data.load(settings.dataset, data_dir or settings.data_dir, settings.val_size)
    data.check_labels(dataset)
    part = getattr(dataset, split).to()
    loss, acc = evaluate(model, part, settings.eval_batch_size)
    return {"split": split, "loss": loss, "acc": acc, "images": len(part), "epoch": meta.get("epoch"),
            "dataset": settings.dataset, "depth": settings.depth, "schedule": settings.schedule}


# ----------------------------------------------------------------------------------------------
# Curves
# ----------------------------------------------------------------------------------------------


def _save_curves(history: list, path) -> None:
    """Loss and accuracy per epoch (training solid, validation dashed) as a PNG, written atomically."""
    if not history:
        return
    from matplotlib.figure import Figure  # noqa: PLC0415 (no pyplot: no GUI backend, no global state)

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(9, 3.5))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax, key, title in ((ax_loss, "loss", "cross-entropy loss"), (ax_acc, "acc", "accuracy")):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], "o-", label="training")
        val = [h.get(f"val_{key}") for h in history]
        if any(v is not None for v in val):
            ax.plot(epochs, [math.nan if v is None else v for v in val], "o--", label="validation")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend(frameon=False)
    fig.tight_layout()
    _write_atomically(path, ".png", lambda handle: fig.savefig(handle, format="png", dpi=100))


# ----------------------------------------------------------------------------------------------
# Ctrl-C
# ----------------------------------------------------------------------------------------------


class _InterruptFlag:
    """While active, the first Ctrl-C sets a flag and says so at once; the loop then saves and stops
    at the next safe point (after the current training step, or before the next evaluation batch),
    so a checkpoint never holds a half-applied update. A second Ctrl-C stops at once, except while
    a checkpoint is being written: that write finishes first (see :meth:`saving`)."""

    def __init__(self, announce=None):
        self.requested = False
        self._announce = announce or (lambda line: print(line, file=sys.stderr, flush=True))
        self._saving = False
        self._previous = None

    def _handler(self, signum, frame):
        if not self.requested:
            self.requested = True
            self._announce("Ctrl-C: saving a checkpoint at the next safe point, then stopping "
                           "(press Ctrl-C again to quit at once without saving)")
        elif self._saving:
            self._announce("Ctrl-C: a checkpoint is being written; stopping as soon as it is complete")
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def saving(self):
        """Inside: further Ctrl-C presses wait (the flag is already set, so the loop stops next)."""
        self._saving = True
        try:
            yield
        finally:
            self._saving = False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


# ----------------------------------------------------------------------------------------------
# The run folder: one run at a time, partial files, reuse
# ----------------------------------------------------------------------------------------------

LOCK_NAME = ".lock"


def _lock_holder(fd) -> str:
    with contextlib.suppress(OSError, ValueError):
        pid = int(os.pread(fd, 32, 0).decode().strip() or 0)
        if pid > 0:
            return f" (process {pid})"
    return ""


def _try_lock(fd, run_dir) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunFolderError(f"{run_dir} is in use by another minisd run{_lock_holder(fd)}; wait for it to "
                                 "finish or choose another --out") from None
        raise


def _check_not_in_use(run_dir) -> None:
    """RunFolderError if another process holds the folder's lock (a quick look: locks nothing, creates nothing)."""
    if fcntl is None:
        return
    try:
        fd = os.open(os.path.join(run_dir, LOCK_NAME), os.O_RDONLY)
    except OSError:
        return  # no lock file: no run has ever held this folder
    try:
        _try_lock(fd, run_dir)
    finally:
        os.close(fd)  # releases the lock just taken


@contextlib.contextmanager
def _run_folder_lock(run_dir):
    """Create ``run_dir`` if needed and hold an exclusive lock on its .lock file while inside.

    flock: the kernel drops the lock when the process ends, however it ends (kill -9 included), so
    a crashed run never blocks the folder. RunFolderError (one line) if another run holds it.
    """
    os.makedirs(run_dir, exist_ok=True)
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(os.path.join(run_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        _try_lock(fd, run_dir)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # for the message the next comer reads
        yield
    finally:
        os.close(fd)


def _has_checkpoint(folder) -> bool:
    return any(os.path.exists(os.path.join(folder, f)) for f in ("last.npz", "best.npz"))


def _remove_partial_files(run_dir, log) -> None:
    """Remove temporary files that a kill during a save left behind (only a run holding the lock
    calls this, so no save is in progress)."""
    with contextlib.suppress(FileNotFoundError):
        partial = sorted(n for n in os.listdir(run_dir) if n.startswith(PARTIAL_PREFIX))
        for name in partial:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(run_dir, name))
        if partial:
            log(f"removed {len(partial)} partial file{'s' if len(partial) > 1 else ''} an interrupted save left in "
                f"{run_dir}: {', '.join(partial)}")

# ----------------------------------------------------------------------------------------------
# Gradient magnitudes per epoch (the paper's Figure 8)
# ----------------------------------------------------------------------------------------------


class GradientMagnitudes:
    """Mean absolute gradient over an epoch's steps: of the stem convolution's weight, and of each
    residual block's branch parameters over the steps where the block ran.

    Call :meth:`add_step` once per step, after backward (the gradients of this step are in the
    modules' ``grads``). Per step it takes mean |g| over the elements of the first conv's weight,
    and for every block whose branch ran, mean |g| over all elements of the branch's parameters;
    :meth:`summary` averages these over the steps. The sums stay on the arrays' device in float64
    (no host round trip per step); they are read back only by :meth:`summary` and
    :meth:`state_dict`, which is exact (float64 to a Python float and back), so a resumed epoch
    reports exactly what an uninterrupted one does.

    first_conv: the stem Conv2d (``model.conv1``). blocks: the residual blocks (``model.blocks``).
    """

    def __init__(self, first_conv, blocks):
        self.first_conv = first_conv
        self.blocks = list(blocks)
        # The modules that own the branch's parameters (their grads dicts are read at each step:
        # model.to() may replace the arrays).
        self.branch_modules = [[m for m in block.branch.modules() if m.params] for block in self.blocks]
        self.branch_sizes = [sum(int(p.size) for p in block.branch.parameters()) for block in self.blocks]
        self._sizes = None             # branch_sizes on the gradients' device, made at the first step
        self.reset()

    def reset(self) -> None:
        """Start a new epoch."""
        self.first_conv_sum = None     # float64 0-d array on the weight's device, or None before a step
        self.steps = 0
        self.block_sums = None         # float64 (blocks,) array on the device, or None before a block ran
        self.block_steps = [0] * len(self.blocks)

    def add_step(self) -> None:
        weight_grad = self.first_conv.grads["weight"]
        xp = backend.array_module(weight_grad)
        value = xp.abs(weight_grad).mean(dtype=xp.float64)
        self.first_conv_sum = value if self.first_conv_sum is None else self.first_conv_sum + value
        self.steps += 1
        # A dropped block's gradient is zero by construction, not a sample: only the blocks that ran.
        ran = [i for i, block in enumerate(self.blocks) if not block.branch_skipped]
        if not ran:
            return
        # One float32 |g| sum per parameter array, added up per block, then the blocks' totals
        # gathered into one float64 vector. Why: ResNet-110 has 324 branch arrays, and a running
        # float64 sum per array and block took about 1,100 small array operations per step; float32
        # sums (NumPy's pairwise summation: within about 1e-7 of float64 at these sizes) with one
        # gather take about 750. Measured (ResNet-110 on 32 digits, this against the running sums,
        # each called right after the same forward and backward, medians of 60 steps, two runs):
        # 1.30-1.40 -> 1.03-1.06 ms, 2.0% -> 1.5-1.7% of that forward and backward.
        totals = xp.stack([sum(xp.abs(g).sum() for m in self.branch_modules[i] for g in m.grads.values())
                           for i in ran]).astype(xp.float64)
        if self._sizes is None or backend.array_module(self._sizes) is not xp:  # once (and after model.to())
            self._sizes = xp.asarray(self.branch_sizes, dtype=xp.float64)
        if self.block_sums is None:
            self.block_sums = xp.zeros(len(self.blocks), dtype=xp.float64)
        self.block_sums[ran] += totals / self._sizes[ran]
        for i in ran:
            self.block_steps[i] += 1

    def _block_sums_on_host(self) -> list:
        """The running sums as Python floats, None for a block that has not run this epoch."""
        if self.block_sums is None:
            return [None] * len(self.blocks)
        values = backend.to_numpy(self.block_sums).tolist()
        return [value if count else None for value, count in zip(values, self.block_steps)]

    def summary(self) -> dict:
        """{"first_conv_grad": float or None, "block_grad": [float or None per block]} for the epoch."""
        first = float(self.first_conv_sum) / self.steps if self.steps else None
        blocks = [None if total is None else total / count
                  for total, count in zip(self._block_sums_on_host(), self.block_steps)]
        return {"first_conv_grad": first, "block_grad": blocks}

    def state_dict(self) -> dict:
        """The running sums as plain numbers (JSON), for a checkpoint taken in the middle of an epoch."""
        return {"first_conv_sum": None if self.first_conv_sum is None else float(self.first_conv_sum),
                "steps": self.steps,
                "block_sums": self._block_sums_on_host(),
                "block_steps": list(self.block_steps)}

    def load_state_dict(self, state: dict | None) -> None:
        """Restore :meth:`state_dict`; None (a checkpoint from before these numbers existed) starts afresh."""
        self.reset()
        if not state:
            return
        xp = backend.array_module(self.first_conv.grads["weight"])
        if len(state["block_sums"]) != len(self.blocks):
            raise ValueError(f"gradient magnitudes for {len(state['block_sums'])} blocks, the model has {len(self.blocks)}")
        if state["first_conv_sum"] is not None:
            self.first_conv_sum = xp.asarray(state["first_conv_sum"], dtype=xp.float64)
        self.steps = int(state["steps"])
        self.block_steps = [int(v) for v in state["block_steps"]]
        if any(v is not None for v in state["block_sums"]):
            self.block_sums = xp.asarray([0.0 if v is None else float(v) for v in state["block_sums"]],
                                         dtype=xp.float64)


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------


def _default_run_dir(settings: Settings, root="runs") -> str:
    """runs/<name>, or runs/<name>-2, -3, ...: the first that is new, or holds no checkpoint and is
    not in use (a run that died in its first epoch left nothing to keep there)."""
    base = os.path.join(root, f"{settings.dataset}-resnet{settings.depth}-{settings.schedule}-seed{settings.seed}")
    candidate, k = base, 1
    while os.path.exists(candidate):
        if os.path.isdir(candidate) and not _has_checkpoint(candidate):
            try:
                _check_not_in_use(candidate)
                return candidate
            except RunFolderError:
                pass
        k += 1
        candidate = f"{base}-{k}"
    return candidate


def _fmt_pct(x) -> str:
    return "  -   " if x is None else f"{100 * x:5.2f}%"


class _Trainer:
    def __init__(self, settings: Settings, run_dir: str, log, progress):
        self.settings = settings.validate()
        self.run_dir = run_dir
        self.log = log
        self.progress = progress
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
        _check_translate(settings.translate, dataset)
        settings.translate = dataset.translate if settings.translate is None else int(settings.translate)
        settings.flip = dataset.flip if settings.flip is None else bool(settings.flip)
        self.dataset = dataset.to()
        self.model = _build_model(settings, self.dataset)
        # The stem reads the images: their gradient is never used, so its backward skips dx.
        self.model.conv1.input_grad = False
        self.optimizer = optim.SGD(self.model, lr=settings.lr, momentum=settings.momentum,
                                   nesterov=settings.nesterov, weight_decay=settings.weight_decay,
                                   skip_unused=settings.skip_unused)
        self.lr_at = optim.make_lr_schedule(settings.lr_schedule, settings.lr, settings.epochs)
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
        return {"loss_sum": 0.0, "correct": 0, "seen": 0, "active_sum": 0.0, "steps": 0, "time_s": 0.0}

    # ---- paths and checkpoints ------------------------------------------------------------------

    def path(self, name):
        return os.path.join(self.run_dir, name)

    def meta(self) -> dict:
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
                "gate_rng": _rng_state(self.model.gate_rng),
                "host_rng": _rng_state(backend.host_rng()),
                "data_rng": {"derived_from": ["seed", "epoch"], "seed": self.settings.seed, "epoch": self.epoch,
                             "batches_drawn": self.step},
            },
        }

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
        model_arrays, optim_arrays, meta = load_checkpoint(path)
        _load_into_model(self.model, model_arrays, path)
        try:
            self.optimizer.load_state_dict({"hyper": meta.get("optimizer", {}), "buffers": optim_arrays})
        except (ValueError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"checkpoint {path}: {exc}") from None
        try:
            self.epoch = _meta_int(meta, "epoch", None, 0, self.settings.epochs, path)
            self.step = _meta_int(meta, "step", None, 0, self.steps_per_epoch, path)
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
            _set_rng_state(self.model.gate_rng, meta["rng"]["gate_rng"])
            _set_rng_state(backend.host_rng(), meta["rng"]["host_rng"])
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise CheckpointError(f"checkpoint {path} lacks the training state needed to resume, or it was "
                                  f"edited ({type(exc).__name__}: {exc})") from None
        self.last_good = (path, self.epoch, self.step)
        self.saved_at = (self.epoch, self.step)
        self.finished_before = self.epoch == self.settings.epochs

    # ---- files ----------------------------------------------------------------------------------

    def write_settings(self):
        with open(self.path("settings.json"), "w", encoding="utf-8") as handle:
            json.dump(self.settings.to_dict(), handle, indent=2)
            handle.write("\n")

    def rewrite_metrics(self):
        with open(self.path("metrics.jsonl"), "w", encoding="utf-8") as handle:
            for record in self.history:
                handle.write(json.dumps(record) + "\n")

    def append_metrics(self, record):
        with open(self.path("metrics.jsonl"), "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

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
        with _InterruptFlag(announce=self.log) as interrupt:
            self.interrupt = interrupt
            try:
                while self.epoch < s.epochs:
                    self.train_epoch(interrupt)
                    if interrupt.requested:  # Ctrl-C during the epoch's end (validation done, saved)
                        self._stop_for_interrupt()
                if self.history:
                    with interrupt.saving():
                        _save_curves(self.history, self.path("curves.png"))
                return self.finish()
            finally:
                self.interrupt = None

    def _stop_for_interrupt(self):
        """Save last.npz at the current position (unless it was just saved there), then stop."""
        path = self.path("last.npz") if self.saved_at == (self.epoch, self.step) else self.save("last.npz")
        with self.interrupt.saving() if self.interrupt is not None else contextlib.nullcontext():
            _save_curves(self.history, self.path("curves.png"))
        where = (f"after epoch {self.epoch}" if self.step == 0 and self.epoch > 0
                 else f"in epoch {self.epoch + 1}, after step {self.step} of {self.steps_per_epoch}")
        raise TrainingInterrupted(
            f"interrupted {where}; checkpoint saved to {path}\n"
            f"resume with: minisd train --resume {self.run_dir}", checkpoint=path, run_dir=self.run_dir)

    def _evaluate_split(self, name, interrupt):
        """(loss, acc) on the "val" or "test" split, or (None, None) for an empty split; Ctrl-C stops
        it at once (the checkpoint then holds the finished training part of the epoch, and resuming
        evaluates again)."""
        split = getattr(self.dataset, name)
        if not len(split):
            return None, None
        try:
            return evaluate(self.model, split, self.settings.eval_batch_size, stop=lambda: interrupt.requested)
        except EvaluationStopped:
            self._stop_for_interrupt()

    def _validate(self, interrupt):
        """(val loss, val acc), or (None, None) without a validation split (see _evaluate_split)."""
        return self._evaluate_split("val", interrupt)

    def train_epoch(self, interrupt):
        s, model, opt = self.settings, self.model, self.optimizer
        epoch = self.epoch
        opt.lr = self.lr_at(epoch)
        order_rng, aug_rng = data.epoch_generators(s.seed, epoch)
        order = order_rng.permutation(len(self.dataset.train))
        augmenting = s.translate > 0 or s.flip
        stream = data.batches(self.dataset.train, s.batch_size, order=order,
                              aug_rng=aug_rng if augmenting else None, translate=s.translate, flip=s.flip,
                              start=self.step)
        p = self.partial
        model.train()
        bar = _progress_bar(self.progress, self.steps_per_epoch, self.step, f"epoch {epoch + 1}/{s.epochs}")
        t0 = time.perf_counter() - p["time_s"]
        try:
            for xb, yb in stream:
                if interrupt.requested:
                    p["time_s"] = time.perf_counter() - t0
                    self._stop_for_interrupt()
                model.zero_grad()
                logits = model(xb)
                loss, cache = F.softmax_cross_entropy_forward(logits, yb)
                loss_value = float(loss)
                if not math.isfinite(loss_value):
                    self._stop_for_nonfinite(loss_value)
                model.backward(F.softmax_cross_entropy_backward(1.0, cache))
                self.grad_magnitudes.add_step()
                opt.step()
                n = int(yb.shape[0])
                p["loss_sum"] += loss_value * n
                p["correct"] += int((logits.argmax(axis=1) == yb).sum())
                p["seen"] += n
                p["active_sum"] += model.active_fraction()
                p["steps"] += 1
                self.step += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{p['loss_sum'] / p['seen']:.3f}",
                                    acc=f"{p['correct'] / p['seen']:.3f}", refresh=False)
            if interrupt.requested:  # Ctrl-C during the last step: stop before validating
                p["time_s"] = time.perf_counter() - t0
                self._stop_for_interrupt()
        finally:
            if bar is not None:
                bar.close()
        train_time = time.perf_counter() - t0
        p["time_s"] = train_time  # kept if validation is interrupted
        val_loss, val_acc = self._validate(interrupt)
        # Reported for the paper's test-error curves; never used to choose the checkpoint (val_acc is).
        test_loss, test_acc = self._evaluate_split("test", interrupt)
        record = {
            "epoch": epoch + 1,
            "lr": opt.lr,
            "train_loss": p["loss_sum"] / max(1, p["seen"]),
            "train_acc": p["correct"] / max(1, p["seen"]),
            "val_loss": val_loss,
            "val_acc": val_acc,
            "test_loss": test_loss,
            "test_acc": test_acc,
            "active_fraction": p["active_sum"] / max(1, p["steps"]),
            "steps": p["steps"],
            "time_s": train_time,
            **self.grad_magnitudes.summary(),
        }
        self.history.append(record)
        self.append_metrics(record)
        # Best: the highest validation accuracy; ties (frequent on a small validation split) go to
        # the lower validation loss.
        improved = (val_acc is None or self.best_val is None or val_acc > self.best_val
                    or (val_acc == self.best_val and val_loss < self.best_val_loss))
        if improved:
            self.best_val, self.best_val_loss, self.best_epoch = val_acc, val_loss, epoch + 1
        self.epoch, self.step, self.partial = epoch + 1, 0, self._empty_partial()
        self.grad_magnitudes.reset()
        if improved:
            self.save("best.npz")
        self.save("last.npz")
        self.log(f"epoch {epoch + 1:>{len(str(s.epochs))}}/{s.epochs}  lr {opt.lr:<6.4g} "
                 f"train loss {record['train_loss']:.4f} acc {_fmt_pct(record['train_acc'])}  "
                 f"val acc {_fmt_pct(val_acc)}  (test {_fmt_pct(test_acc).strip()})  active {record['active_fraction']:.2f}  "
                 f"time {train_time:5.1f}s{'  *' if improved else ''}")

    def _last_finite_checkpoint(self) -> str:
        """Words for the NaN messages: the last checkpoint written (all are finite), or that there is none."""
        if self.history:
            _save_curves(self.history, self.path("curves.png"))
        if self.last_good is None:
            return (f"no checkpoint was written, so {self.run_dir} holds nothing to resume: run the same command "
                    "again (it reuses the folder) with a smaller --lr")
        path, ep, st = self.last_good
        where = f"end of epoch {ep}" if st == 0 else f"epoch {ep + 1}, step {st}"
        return f"the last finite checkpoint is {path} ({where}), left as it was. Try a smaller --lr"

    def _stop_for_nonfinite(self, value):
        global_step = self.epoch * self.steps_per_epoch + self.step + 1
        raise NonFiniteLossError(
            f"non-finite loss ({value}) at epoch {self.epoch + 1}, step {self.step + 1} (global step {global_step}); "
            f"training stopped before the update; {self._last_finite_checkpoint()}.")

    def _stop_for_nonfinite_weights(self, names):
        where = (f"at the end of epoch {self.epoch}" if self.step == 0
                 else f"in epoch {self.epoch + 1} after step {self.step}")
        raise NonFiniteLossError(
            f"non-finite weights {where} ({_describe_names(names)}) after an update whose loss was finite; training "
            f"stopped without saving them; {self._last_finite_checkpoint()}.")

    def finish(self) -> RunResult:
        """Evaluate the best-validation checkpoint on the test split; write summary.json."""
        best_path = self.path("best.npz")
        model_arrays, _, meta = load_checkpoint(best_path)
        _load_into_model(self.model, model_arrays, best_path)
        interrupt = self.interrupt
        try:
            test_loss, test_acc = evaluate(self.model, self.dataset.test, self.settings.eval_batch_size,
                                           stop=(lambda: interrupt.requested) if interrupt is not None else None)
        except EvaluationStopped:
            raise TrainingInterrupted(
                f"interrupted during the final test evaluation; all {self.settings.epochs} epochs are saved in "
                f"{self.path('last.npz')}\nresume with: minisd train --resume {self.run_dir}",
                checkpoint=self.path("last.npz"), run_dir=self.run_dir) from None
        wall_time = self._finished_wall_time()
        best_epoch = meta.get("best_epoch")
        summary = {"test_acc": test_acc, "test_loss": test_loss, "best_epoch": best_epoch,
                   "best_val_acc": meta.get("best_val_acc"), "epochs": self.settings.epochs,
                   "wall_time_s": wall_time, "checkpoint": best_path}
        with open(self.path("summary.json"), "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2)
            handle.write("\n")
        val_note = (f", best validation accuracy {_fmt_pct(meta.get('best_val_acc')).strip()}"
                    if meta.get("best_val_acc") is not None else "")
        self.log(f"test accuracy {100 * test_acc:.2f}% (checkpoint of epoch {best_epoch}{val_note}; "
                 f"{len(self.dataset.test)} test images); run time {wall_time:.1f}s")
        self.log(f"run folder {self.run_dir}: metrics.jsonl, curves.png, best.npz, last.npz, summary.json")
        return RunResult(self.run_dir, list(self.history), test_acc, test_loss, best_epoch, meta.get("best_val_acc"),
                         wall_time, self.model)


def _progress_bar(progress, total, initial, desc):
    if progress is False:
        return None
    from tqdm.auto import tqdm  # noqa: PLC0415

    # progress=None: tqdm decides (shown on a terminal, hidden when stderr is a file or pipe).
    return tqdm(total=total, initial=initial, desc=desc, unit="step", leave=False, dynamic_ncols=True,
                disable=None if progress is None else not progress, file=sys.stderr)


def _print(line):
    print(line, flush=True)


def _check_translate(translate, dataset) -> None:
    """A shift of a whole image or more leaves nothing of it (and pads a huge array)."""
    if translate is not None and translate >= dataset.image_size:
        raise SettingsError(f"--translate must be less than the image size: {dataset.name} images are "
                            f"{dataset.image_size}x{dataset.image_size} pixels, got {translate}")


def _check_no_run_in(run_dir) -> None:
    if _has_checkpoint(run_dir):
        raise RunFolderError(f"{run_dir} already holds a run; continue it with --resume {run_dir} "
                             "or choose another --out")


def _start_in(trainer: "_Trainer", log, note_reuse=True) -> RunResult:
    """Claim the run folder (lock), tidy it, write the settings and run. Nothing is written before
    the lock is held, and a folder without a checkpoint is reused (it holds nothing to lose)."""
    run_dir = trainer.run_dir
    with _run_folder_lock(run_dir):
        _check_no_run_in(run_dir)  # again: a run may have started while the data loaded
        _remove_partial_files(run_dir, log)
        if note_reuse and os.path.exists(trainer.path("settings.json")):
            log(f"reusing {run_dir}: it holds no checkpoint (the run there stopped before its first epoch ended)")
        trainer.write_settings()
        trainer.rewrite_metrics()
        return trainer.run()


def fit(settings: Settings | None = None, run_dir=None, log=_print, progress=None) -> RunResult:
    """Train from scratch as ``settings`` say; the run folder (default ``runs/<name>``) must not hold
    a checkpoint, and no other run may be using it.

    Returns a :class:`RunResult` (test accuracy of the best-validation checkpoint). Raises
    NonFiniteLossError, TrainingInterrupted (Ctrl-C; a checkpoint was saved), DataError,
    SettingsError, RunFolderError, backend.BackendUnavailable.
    """
    settings = dataclasses.replace(settings or Settings())
    settings.validate()
    run_dir = os.fspath(run_dir) if run_dir is not None else _default_run_dir(settings)
    # Fail before the data load where that is already clear; the binding checks come with the lock.
    _check_no_run_in(run_dir)
    _check_not_in_use(run_dir)
    trainer = _Trainer(settings, run_dir, log, progress)
    return _start_in(trainer, log)


def _read_settings_json(run_dir) -> Settings:
    path = os.path.join(run_dir, "settings.json")
    try:
        with open(path, encoding="utf-8") as handle:
            values = json.load(handle)
    except (OSError, ValueError, RecursionError) as exc:
        raise RunFolderError(f"cannot read {path} ({type(exc).__name__}: {exc})") from None
    if not isinstance(values, dict):
        raise RunFolderError(f"{path} does not hold a JSON object of settings")
    try:
        return Settings.from_dict(values).validate()
    except SettingsError as exc:
        raise RunFolderError(f"{path}: {exc}") from None


def resume(path, log=_print, progress=None, backend_name: str | None = None, data_dir=None,
           kernels_name: str | None = None) -> RunResult:
    """Continue a run from a run folder (its last.npz) or a checkpoint file, exactly where it stopped.

    The settings come from the checkpoint; ``backend_name``, ``kernels_name`` and ``data_dir`` may
    differ (a run moved to a GPU or to the other kernel tier, or data moved to another folder). Files are written to the checkpoint's folder.
    A run folder without a checkpoint but with its settings.json (the run died in its first epoch)
    starts again from the beginning with those settings.
    """
    path = os.fspath(path)
    fresh = False
    if os.path.isdir(path):
        run_dir = path
        _check_not_in_use(run_dir)
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
        _check_not_in_use(run_dir)
    if fresh:
        settings = _read_settings_json(run_dir)
    else:
        _, _, meta = load_checkpoint(checkpoint)
        settings = _settings_from_meta(meta, checkpoint)
    if backend_name is not None:
        settings.backend = backend_name
    if kernels_name is not None:
        settings.kernels = kernels_name
    if data_dir is not None:
        settings.data_dir = os.fspath(data_dir)
    trainer = _Trainer(settings, run_dir, log, progress)
    if fresh:
        log(f"no checkpoint in {run_dir} (the run stopped before its first epoch ended): starting it again "
            "from the beginning with its settings.json")
        return _start_in(trainer, log, note_reuse=False)
    with _run_folder_lock(run_dir):
        trainer.restore(checkpoint)  # read under the lock: the latest checkpoint, not one being replaced
        _remove_partial_files(run_dir, log)
        trainer.rewrite_metrics()  # drop lines of epochs after the checkpoint
        where = (f"after epoch {trainer.epoch}" if trainer.step == 0
                 else f"in epoch {trainer.epoch + 1} after step {trainer.step}")
        log(f"resuming {checkpoint} {where} of {settings.epochs}")
        return trainer.run()
