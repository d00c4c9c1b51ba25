"""Checkpoints: plain ``.npz`` files, written atomically, loaded without pickle, never holding a NaN.

A checkpoint holds ``model.<name>`` (parameters and buffers), ``optim.<name>`` (momentum buffers)
and ``meta``, one JSON string with the settings, the position (epoch and step), the history, the
optimizer's hyperparameters and the generator states. See :mod:`minisd.training` for what resuming
restores from it.
"""
from __future__ import annotations

import json
import os

import numpy

from minisd import backend, data
from minisd.training.files import write_atomically
from minisd.training.metrics import evaluate
from minisd.training.settings import Settings, SettingsError, build_model

__all__ = ["save_checkpoint", "load_checkpoint", "model_from_checkpoint", "evaluate_checkpoint",
           "CheckpointError", "NonFiniteCheckpointError"]

CHECKPOINT_FORMAT = "minisd-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit the model."""


class NonFiniteCheckpointError(CheckpointError):
    """A checkpoint would hold (or holds) NaN or infinite values; ``names`` lists those arrays."""

    def __init__(self, message, names=()):
        super().__init__(message)
        self.names = list(names)


def _non_finite(arrays: dict) -> list:
    """Names of the floating arrays in ``arrays`` (host arrays) that hold a NaN or an infinity."""
    return [k for k, v in arrays.items() if v.dtype.kind in "fc" and not numpy.isfinite(v).all()]


def describe_names(names, shown=3) -> str:
    """"2 arrays: a, b" (at most ``shown`` names, then "...")."""
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
        raise NonFiniteCheckpointError(f"not saving {path}: non-finite values in {describe_names(bad)}", bad)
    meta = dict(meta or {}, format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION)
    arrays["meta"] = numpy.array(json.dumps(meta))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomically(path, ".npz", lambda handle: numpy.savez(handle, **arrays))
    return path


def checkpoint_path(path) -> str:
    """The checkpoint file meant by ``path``: the file itself, or a run folder's last.npz."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return os.path.join(path, "last.npz")
    return path


def load_checkpoint(path) -> tuple[dict, dict, dict]:
    """(model arrays, optimizer buffers, meta) from a checkpoint file (or a run folder: its last.npz).

    Loaded with ``allow_pickle=False``. CheckpointError if missing or not a minisd checkpoint.
    """
    path = checkpoint_path(path)
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
        raise NonFiniteCheckpointError(f"{path} holds non-finite values ({describe_names(bad)}); it cannot be "
                                       "evaluated or resumed", bad)
    model_arrays = {k[len("model."):]: v for k, v in contents.items() if k.startswith("model.")}
    optim_arrays = {k[len("optim."):]: v for k, v in contents.items() if k.startswith("optim.")}
    return model_arrays, optim_arrays, meta


def settings_from_meta(meta: dict, path) -> Settings:
    """The validated settings a checkpoint's metadata holds (it may have been edited by hand)."""
    values = meta.get("settings")
    if not isinstance(values, dict):
        raise CheckpointError(f"checkpoint {path}: its metadata holds no settings")
    try:
        return Settings.from_dict(values).validate()
    except (SettingsError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path}: invalid settings in its metadata ({exc})") from None


def meta_int(meta: dict, key, default, low, high, path) -> int:
    """meta[key] (or ``default``), which must be a whole number in [low, high]."""
    value = meta.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise CheckpointError(f"checkpoint {path}: '{key}' in its metadata must be a whole number in "
                              f"[{low}, {high}], got {value!r}")
    return value


def load_into_model(model, arrays: dict, path) -> None:
    """model.load_state_dict(arrays), with a CheckpointError naming ``path`` if they do not fit."""
    try:
        model.load_state_dict(arrays)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} does not fit the model: {exc}") from None


def model_from_checkpoint(path, backend_name: str | None = None):
    """(model, meta): the model a checkpoint was saved from, with its weights, on the current backend."""
    model_arrays, _, meta = load_checkpoint(path)
    path = checkpoint_path(path)
    settings = settings_from_meta(meta, path)
    num_classes = meta_int(meta, "num_classes", 10, 1, 1_000_000, path)
    in_channels = meta_int(meta, "in_channels", 1 if settings.dataset == "digits" else 3, 1, 4096, path)
    if backend_name:
        backend.use(backend_name)
    model = build_model(settings, num_classes=num_classes, in_channels=in_channels)
    load_into_model(model, model_arrays, path)
    model.eval()
    return model, meta


def evaluate_checkpoint(path, split: str = "test", data_dir=None, backend_name: str | None = None) -> dict:
    """Evaluate a checkpoint on a split of the dataset it was trained on: {"loss", "acc", ...}."""
    model, meta = model_from_checkpoint(path, backend_name)
    settings = settings_from_meta(meta, checkpoint_path(path))
    dataset = data.load(settings.dataset, data_dir or settings.data_dir, settings.val_size)
    data.check_labels(dataset)
    part = getattr(dataset, split).to()
    loss, acc = evaluate(model, part, settings.eval_batch_size)
    return {"split": split, "loss": loss, "acc": acc, "images": len(part), "epoch": meta.get("epoch"),
            "dataset": settings.dataset, "depth": settings.depth, "schedule": settings.schedule}
