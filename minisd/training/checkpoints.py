"""Checkpoints: plain ``.npz`` files, written atomically, loaded without pickle, never holding a NaN.

A checkpoint holds ``model.<name>`` (parameters and buffers), ``optim.<name>`` (momentum buffers)
and ``meta``, one JSON string with the settings, the position (epoch and step), the history, the
optimizer's hyperparameters and the generator states. See :mod:`minisd.training` for what resuming
restores from it.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import zipfile

import numpy
from numpy.lib import format as npformat

from minisd import backend, data
from minisd.training.files import open_regular, write_atomically
from minisd.training.metrics import evaluate
from minisd.training.settings import Settings, build_model, settings_from_values

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint_meta", "layout", "model_from_checkpoint",
           "evaluate_checkpoint",
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


MAX_META_BYTES = 256 * 2**20   # the JSON string of a 500-epoch run is a few MB; more is not minisd's
MAX_MEMBERS = 100_000          # ResNet-1202 has under 5,000 arrays (model and optimizer together)
_PREFIXES = ("model.", "optim.")


def _headers(archive: zipfile.ZipFile, path) -> dict:
    """{entry name: (shape, dtype)} from the .npy headers of the archive's members, each checked
    against the member's size in the zip directory: nothing beyond the headers is read."""
    members = archive.infolist()
    if len(members) > MAX_MEMBERS:
        raise CheckpointError(f"{path} is not a minisd checkpoint ({len(members)} entries)")
    headers = {}
    for info in members:
        name = info.filename.removesuffix(".npy")
        if not info.filename.endswith(".npy") or name in headers or not (name == "meta" or name.startswith(_PREFIXES)):
            raise CheckpointError(f"{path} is not a minisd checkpoint (unexpected entry {info.filename!r})")
        try:
            with archive.open(info) as member:
                version = npformat.read_magic(member)
                if version not in ((1, 0), (2, 0)):
                    raise ValueError(f"unsupported .npy version {version}")
                read_header = npformat.read_array_header_1_0 if version == (1, 0) else npformat.read_array_header_2_0
                shape, _, dtype = read_header(member)
                header_size = member.tell()
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, NotImplementedError) as exc:
            raise CheckpointError(f"cannot read checkpoint {path}: entry {name!r}: {exc}") from None
        if dtype.hasobject:
            raise CheckpointError(f"cannot read checkpoint {path}: entry {name!r} holds Python objects "
                                  "(minisd checkpoints hold plain arrays only)")
        if name == "meta":
            if dtype.kind != "U" or shape != () or dtype.itemsize > MAX_META_BYTES:
                raise CheckpointError(f"{path} is not a minisd checkpoint ('meta' is not one JSON string)")
        elif dtype.kind != "f":
            raise CheckpointError(f"{path}: entry {name!r} holds {dtype} values, not floating-point numbers; "
                                  "not a checkpoint minisd wrote")
        size = math.prod(shape) * dtype.itemsize
        if info.file_size != header_size + size:
            raise CheckpointError(f"cannot read checkpoint {path}: entry {name!r} should hold {size} bytes of "
                                  f"data for shape {shape}, the archive says {info.file_size - header_size}")
        headers[name] = (tuple(shape), dtype)
    if "meta" not in headers:
        raise CheckpointError(f"{path} is not a minisd checkpoint (no 'meta' entry)")
    return headers


def _read_entry(archive: zipfile.ZipFile, name):
    with archive.open(name + ".npy") as member:
        return npformat.read_array(member, allow_pickle=False)


@contextlib.contextmanager
def _open_archive(path):
    """The checkpoint at ``path`` as an open zip archive (a regular file only: a FIFO is refused at
    once instead of blocking)."""
    path = checkpoint_path(path)
    try:
        handle = open_regular(path, "checkpoint file")
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    with handle:
        try:
            archive = zipfile.ZipFile(handle)
        except (zipfile.BadZipFile, OSError, ValueError):
            raise CheckpointError(f"cannot read checkpoint {path}: it is not a minisd checkpoint (not an .npz "
                                  "archive)") from None
        with archive:
            yield path, archive


def _read_meta(archive, path) -> dict:
    try:
        text = str(_read_entry(archive, "meta"))
        meta = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: the 'meta' entry is not valid JSON ({exc})") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: entry 'meta': {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path} is not a minisd checkpoint (format {found!r})")
    return meta


def read_checkpoint_meta(path) -> dict:
    """The metadata of a checkpoint (the file or a run folder's last.npz), every entry's header
    checked and no array read. CheckpointError if it is not a minisd checkpoint."""
    with _open_archive(path) as (path, archive):
        _headers(archive, path)
        return _read_meta(archive, path)


def layout(model) -> dict:
    """{entry name: (shape, dtype)} that a checkpoint of ``model`` may hold: every model array, and
    a momentum buffer per parameter."""
    expected = {f"model.{k}": (tuple(v.shape), numpy.dtype(str(v.dtype))) for k, v in model.state_dict().items()}
    expected.update({f"optim.{k}": (tuple(v.shape), numpy.dtype(str(v.dtype))) for k, v in model.named_parameters()})
    return expected


def _check_layout(headers: dict, expected: dict, path) -> None:
    """Names and shapes of the archive's arrays against ``expected`` (momentum buffers may be absent:
    a parameter that has not been stepped has none)."""
    problems = []
    for name, (shape, _) in expected.items():
        if name not in headers and name.startswith("model."):
            problems.append(f"missing {name}")
        elif name in headers and headers[name][0] != shape:
            problems.append(f"{name}: expected shape {shape}, got {headers[name][0]}")
    problems += [f"unexpected {name}" for name in headers if name != "meta" and name not in expected]
    if problems:
        shown = "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else "")
        raise CheckpointError(f"checkpoint {path} does not fit the model ({len(problems)} problem"
                              f"{'s' if len(problems) > 1 else ''}: {shown})")


def load_checkpoint(path, expected: dict | None = None) -> tuple[dict, dict, dict]:
    """(model arrays, optimizer buffers, meta) from a checkpoint file (or a run folder: its last.npz).

    Every entry's .npy header is checked before any array is read: names, shapes, dtypes
    (floating-point arrays and one JSON string only, never pickled objects) and sizes (which must
    agree with the zip directory, so a small archive that unpacks to gigabytes is refused unread).
    ``expected`` ({entry name: (shape, dtype)}, see :func:`layout`): the archive must hold exactly
    these model arrays, with these shapes; values must then fit the dtype (a float64 1e300 does not
    fit float32). CheckpointError if missing or not a minisd checkpoint, NonFiniteCheckpointError if
    it holds a NaN or an infinity.
    """
    with _open_archive(path) as (path, archive):
        headers = _headers(archive, path)
        meta = _read_meta(archive, path)
        if expected is not None:
            _check_layout(headers, expected, path)
        try:
            contents = {name: _read_entry(archive, name) for name in headers if name != "meta"}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None
    bad = _non_finite(contents)
    if bad:
        raise NonFiniteCheckpointError(f"{path} holds non-finite values ({describe_names(bad)}); it cannot be "
                                       "evaluated or resumed", bad)
    if expected is not None:
        with numpy.errstate(over="ignore"):
            contents = {name: value.astype(expected[name][1], copy=False) for name, value in contents.items()}
        bad = _non_finite(contents)
        if bad:
            raise NonFiniteCheckpointError(f"{path} holds values out of range for the model's number type "
                                           f"({describe_names(bad)}); it cannot be evaluated or resumed", bad)
    model_arrays = {k[len("model."):]: v for k, v in contents.items() if k.startswith("model.")}
    optim_arrays = {k[len("optim."):]: v for k, v in contents.items() if k.startswith("optim.")}
    return model_arrays, optim_arrays, meta


def settings_from_meta(meta: dict, path) -> Settings:
    """The validated settings a checkpoint's metadata holds (it may have been edited by hand)."""
    return settings_from_values(meta.get("settings"), CheckpointError, f"checkpoint {path}: its metadata holds no settings",
                                f"checkpoint {path}: invalid settings in its metadata: ")


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
    """(model, meta): the model a checkpoint was saved from, with its weights, on the current backend.

    The model is built from the metadata first, and the archive's arrays are checked against it
    (names, shapes) before any is read."""
    meta = read_checkpoint_meta(path)
    path = checkpoint_path(path)
    settings = settings_from_meta(meta, path)
    num_classes = meta_int(meta, "num_classes", 10, 1, 1_000_000, path)
    in_channels = meta_int(meta, "in_channels", 1 if settings.dataset == "digits" else 3, 1, 4096, path)
    if backend_name:
        backend.use(backend_name)
    model = build_model(settings, num_classes=num_classes, in_channels=in_channels)
    model_arrays, _, meta = load_checkpoint(path, expected=layout(model))
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
    if not len(part):
        raise CheckpointError(f"{path}: the run has no {split} split (it was trained with "
                              f"--val-size 0); evaluate it with --split test")
    loss, acc = evaluate(model, part, settings.eval_batch_size)
    return {"split": split, "loss": loss, "acc": acc, "images": len(part), "epoch": meta.get("epoch"),
            "dataset": settings.dataset, "depth": settings.depth, "schedule": settings.schedule}
