"""Datasets, augmentation and batching.

Two datasets, both normalised as the paper normalises CIFAR (per-pixel mean subtraction, then
division by one global standard deviation), with statistics computed on the training split only:

* ``digits``: the 1797 handwritten 8x8 grey digits of UCI's "Optical Recognition of Handwritten
  Digits" (the copy scikit-learn ships), stored in this package as ``datasets/digits.npz`` (45 KB;
  citation and CC BY 4.0 license in ``datasets/DIGITS_LICENSE.md``), so nothing is downloaded and
  scikit-learn is not needed. A fixed, seeded split (the same for every training seed): 1257 train,
  180 validation, 360 test.
* ``cifar10``: the official CIFAR-10 archives, read from a local folder (nothing is downloaded), in
  the binary format (``cifar-10-batches-bin``) or the Python format (``cifar-10-batches-py``).
  The paper's split: 45,000 training and 5,000 validation images from the 50,000, plus the
  10,000 test images.

The Python format is a pickle. ``pickle.load`` would run whatever a crafted file asks it to, so
:class:`RestrictedUnpickler` admits only what those files contain (a dict of bytes, ints, lists and
one uint8 NumPy array) and refuses any other global with a :class:`DataError`.

Augmentation (the paper's): random translation by up to ``translate`` pixels with zero fill, and
horizontal flips, drawn per sample and done with the backend's arrays (one gather on the device).
Each dataset carries its own default: digits are translated by 1 pixel of 8 and never flipped (a
flipped digit is another symbol); CIFAR images by 4 pixels of 32, and flipped.

Batches come from :func:`batches`, which yields ``(images, labels)`` on the current backend.
"""
from __future__ import annotations

import io
import os
import pickle
from importlib import resources
from dataclasses import dataclass, field, replace

import numpy

from minisd import backend

__all__ = [
    "DataError",
    "Split",
    "Dataset",
    "DATASETS",
    "load",
    "load_digits",
    "read_digits_file",
    "load_cifar10",
    "read_cifar_binary",
    "read_cifar_python",
    "RestrictedUnpickler",
    "check_labels",
    "augment",
    "epoch_generators",
    "batches",
    "num_batches",
]

DATASETS = ("digits", "cifar10")
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch"
CIFAR_RECORD = 1 + 3 * 32 * 32  # binary format: one label byte, then 1024 R, 1024 G, 1024 B bytes
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
DIGITS_FILE = "digits.npz"  # minisd/datasets/: UCI optdigits test partition, CC BY 4.0


class DataError(ValueError):
    """A dataset cannot be read: missing folder or file, truncated or corrupted content."""


@dataclass
class Split:
    """Images ``x`` (N, C, H, W) float32 and integer labels ``y`` (N,), on one backend."""

    x: object
    y: object

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def to(self, backend_name: str | None = None) -> "Split":
        """The same split on ``backend_name`` (default: the current backend)."""
        return Split(backend.to_device(self.x, backend_name), backend.to_device(self.y, backend_name))

    def subset(self, count: int | None) -> "Split":
        """The first ``count`` samples (all if None)."""
        return self if count is None else Split(self.x[:count], self.y[:count])


@dataclass
class Dataset:
    """Train/validation/test splits plus what a model and the augmentation need to know."""

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    in_channels: int
    image_size: int
    translate: int          # default augmentation: random shift up to this many pixels
    flip: bool              # default augmentation: random horizontal flips
    mean: numpy.ndarray = field(repr=False, default=None)  # per-pixel mean (C, H, W), training split
    std: float = 1.0                                        # global std, training split

    def to(self, backend_name: str | None = None) -> "Dataset":
        return replace(self, train=self.train.to(backend_name), val=self.val.to(backend_name),
                       test=self.test.to(backend_name))

    def describe(self) -> str:
        return (f"{self.name}: {len(self.train)} train, {len(self.val)} validation, {len(self.test)} test images "
                f"of {self.in_channels}x{self.image_size}x{self.image_size}, {self.num_classes} classes")


# ----------------------------------------------------------------------------------------------
# Normalisation and splitting
# ----------------------------------------------------------------------------------------------


def _normalise(train_x, *others):
    """Per-pixel mean and one global std from ``train_x`` (uint8 or float, N x C x H x W), applied to all."""
    train_x = train_x.astype(numpy.float64)
    mean = train_x.mean(axis=0)
    std = float((train_x - mean).std())
    std = std if std > 0 else 1.0
    out = [((a.astype(numpy.float64) - mean) / std).astype(numpy.float32) for a in (train_x, *others)]
    return out, mean.astype(numpy.float32), std


def _split_indices(n: int, val_size: int, test_size: int, seed: int):
    if val_size < 0 or test_size < 0 or val_size + test_size >= n:
        raise DataError(f"cannot split {n} samples into {val_size} validation and {test_size} test samples "
                        "and keep some for training")
    order = numpy.random.default_rng(seed).permutation(n)
    return order[val_size + test_size:], order[:val_size], order[val_size:val_size + test_size]


# ----------------------------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------------------------


def read_digits_file() -> tuple[numpy.ndarray, numpy.ndarray]:
    """The packaged digits: images (1797, 8, 8) uint8 with values 0..16 and labels (1797,) int64,
    in ``sklearn.datasets.load_digits()``'s order."""
    with resources.files("minisd.datasets").joinpath(DIGITS_FILE).open("rb") as f:
        with numpy.load(f, allow_pickle=False) as arrays:
            return arrays["images"], arrays["targets"].astype(numpy.int64)


def load_digits(val_size: int = 180, test_size: int = 360, split_seed: int = 0) -> Dataset:
    """The 8x8 digits, split train/val/test with a fixed seed, normalised on train.

    The split does not depend on the training seed, so every run is tested on the same images.
    """
    images, labels = read_digits_file()
    images = images.reshape(-1, 1, 8, 8)  # values 0..16
    available = len(labels) - test_size  # the images outside the test split
    if test_size >= 0 and not 0 <= val_size < available:
        raise DataError(f"cannot hold out {val_size} validation images from the {available} digits outside the "
                        f"test split and keep some for training (choose a smaller --val-size)")
    tr, va, te = _split_indices(len(labels), val_size, test_size, split_seed)
    (xtr, xva, xte), mean, std = _normalise(images[tr], images[va], images[te])
    return Dataset("digits", Split(xtr, labels[tr]), Split(xva, labels[va]), Split(xte, labels[te]),
                   num_classes=10, in_channels=1, image_size=8, translate=1, flip=False, mean=mean, std=std)


# ----------------------------------------------------------------------------------------------
# CIFAR-10 readers
# ----------------------------------------------------------------------------------------------


def read_cifar_binary(path) -> tuple[numpy.ndarray, numpy.ndarray]:
    """One file of ``cifar-10-batches-bin``: records of 1 label byte + 3072 pixel bytes.

    Returns images (N, 3, 32, 32) uint8 and labels (N,) int64. DataError if truncated or corrupted.
    """
    try:
        raw = numpy.fromfile(path, dtype=numpy.uint8)
    except OSError as exc:
        raise DataError(f"cannot read CIFAR-10 file {path}: {exc}") from None
    if raw.size == 0 or raw.size % CIFAR_RECORD:
        raise DataError(f"CIFAR-10 file {path} is truncated or corrupted: {raw.size} bytes is not a whole number "
                        f"of {CIFAR_RECORD}-byte records")
    records = raw.reshape(-1, CIFAR_RECORD)
    labels = records[:, 0].astype(numpy.int64)
    if labels.max() > 9:
        raise DataError(f"CIFAR-10 file {path} is corrupted: label {int(labels.max())} is not in 0..9")
    return records[:, 1:].reshape(-1, 3, 32, 32).copy(), labels


class RefusedPickle(pickle.UnpicklingError):
    """The pickle asked for something a CIFAR-10 file never contains."""


_NUMPY_RECONSTRUCT = numpy.zeros(1).__reduce__()[0]  # numpy's own _reconstruct, wherever it lives


def _safe_reconstruct(cls, shape, dtype_code):
    """numpy's ``_reconstruct`` (how a pickled ndarray is rebuilt), for plain ndarrays only."""
    if cls is not numpy.ndarray:
        raise RefusedPickle(f"refusing to rebuild an array of class {cls!r}")
    return _NUMPY_RECONSTRUCT(cls, shape, dtype_code)


def _safe_dtype(spec, align=False, copy=False):
    """``numpy.dtype(spec)`` for plain numeric dtypes (no object dtype: it would hold arbitrary objects)."""
    dtype = numpy.dtype(spec)
    if dtype.kind not in "biuf":
        raise RefusedPickle(f"refusing dtype {dtype!r} in a CIFAR-10 pickle")
    return dtype


def _safe_frombuffer(buffer, dtype, shape, order):
    """numpy's ``_frombuffer`` (pickle protocol 5 arrays), numeric dtypes only."""
    dtype = _safe_dtype(dtype)
    return numpy.frombuffer(buffer, dtype=dtype).reshape(shape, order=order).copy()


def _safe_empty_bytes(*args):
    """``bytes()``: how a protocol-2 pickle writes an empty bytes object (b""), and only that."""
    if args:
        raise RefusedPickle("refusing bytes(...) with arguments in a CIFAR-10 pickle (only b'' is written that way)")
    return b""


def _safe_codecs_encode(text, encoding="utf-8"):
    """``_codecs.encode``: Python 3 writes bytes this way in protocol-2 pickles."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise RefusedPickle("refusing _codecs.encode on anything but latin1 text")
    return text.encode("latin1")


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that admits only what CIFAR-10's Python files contain.

    Plain containers (dict, list, bytes, str, int) need no globals at all. The only globals
    admitted are the few NumPy uses to rebuild a numeric array, each replaced by a checked version;
    anything else (``os.system``, ``builtins.eval``, ``subprocess.Popen``...) raises
    ``pickle.UnpicklingError`` before it could be called.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct,
        ("numpy", "ndarray"): numpy.ndarray,
        ("numpy", "dtype"): _safe_dtype,
        ("numpy.core.numeric", "_frombuffer"): _safe_frombuffer,
        ("numpy._core.numeric", "_frombuffer"): _safe_frombuffer,
        ("_codecs", "encode"): _safe_codecs_encode,
        ("__builtin__", "bytes"): _safe_empty_bytes,  # protocol 2 writes b"" as bytes()
        ("builtins", "bytes"): _safe_empty_bytes,
    }

    def find_class(self, module, name):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise RefusedPickle(
                f"refusing to load {module}.{name}: a CIFAR-10 pickle holds only a dict of arrays, "
                "lists and bytes") from None


def read_cifar_python(path) -> tuple[numpy.ndarray, numpy.ndarray]:
    """One file of ``cifar-10-batches-py`` (a pickled dict with b"data" and b"labels"), read safely.

    Returns images (N, 3, 32, 32) uint8 and labels (N,) int64. DataError for a truncated,
    corrupted or malicious file.
    """
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as exc:
        raise DataError(f"cannot read CIFAR-10 file {path}: {exc}") from None
    try:
        batch = RestrictedUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except RefusedPickle as exc:
        raise DataError(f"CIFAR-10 file {path} was not loaded: {exc}") from None
    except Exception as exc:  # EOFError, ValueError, TypeError... from a damaged stream
        raise DataError(f"CIFAR-10 file {path} is truncated or corrupted ({type(exc).__name__}: {exc})") from None
    if not isinstance(batch, dict):
        raise DataError(f"CIFAR-10 file {path} is corrupted: expected a dict, got {type(batch).__name__}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if not isinstance(data, numpy.ndarray) or data.dtype != numpy.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"CIFAR-10 file {path} is corrupted: expected 'data' as a uint8 array of shape (N, 3072)")
    return data.reshape(-1, 3, 32, 32).copy(), _pickled_labels(labels, data.shape[0], path)


def _pickled_labels(labels, count: int, path) -> numpy.ndarray:
    """The 'labels' entry as int64, if it is ``count`` whole numbers in 0..9 (a list of ints, as the
    official files hold, or an integer array). Floats, strings and huge ints are refused, not converted."""
    problem = f"CIFAR-10 file {path} is corrupted: expected 'labels' to be {count} whole numbers in 0..9"
    if isinstance(labels, numpy.ndarray):
        if labels.dtype.kind not in "iu" or labels.shape != (count,):
            raise DataError(f"{problem}, got an array of {labels.dtype} with shape {labels.shape}")
        values = labels
    elif isinstance(labels, (list, tuple)):
        odd = next((v for v in labels if type(v) is not int), None)  # bool is no label either
        if odd is not None:
            raise DataError(f"{problem}, got a {type(odd).__name__} ({odd!r:.40})")
        if len(labels) != count:
            raise DataError(f"{problem}, got {len(labels)}")
        values = labels
    else:
        raise DataError(f"{problem}, got {type(labels).__name__}")
    bad = next((int(v) for v in values if not 0 <= v <= 9), None)
    if bad is not None:
        raise DataError(f"CIFAR-10 file {path} is corrupted: label {bad} is not in 0..9")
    return numpy.asarray(values, dtype=numpy.int64)


def _find_cifar_folder(data_dir) -> tuple[str, str]:
    """(folder, "bin" | "py") for ``data_dir`` or its cifar-10-batches-* subfolder."""
    if data_dir is None:
        raise DataError(f"cifar10 needs --data-dir: a folder holding cifar-10-batches-bin/ or cifar-10-batches-py/ "
                        f"(from {CIFAR_URL}; minisd downloads nothing)")
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise DataError(f"data folder not found: {data_dir}")
    candidates = [data_dir, os.path.join(data_dir, "cifar-10-batches-bin"), os.path.join(data_dir, "cifar-10-batches-py")]
    for folder in candidates:
        if os.path.exists(os.path.join(folder, "data_batch_1.bin")):
            return folder, "bin"
        if os.path.exists(os.path.join(folder, "data_batch_1")):
            return folder, "py"
    raise DataError(f"no CIFAR-10 files in {data_dir}: expected cifar-10-batches-bin/ or cifar-10-batches-py/ "
                    f"(the official archives from {CIFAR_URL}, unpacked)")


def _read_cifar_files(folder: str, fmt: str):
    reader, suffix = (read_cifar_binary, ".bin") if fmt == "bin" else (read_cifar_python, "")
    parts = []
    for name in CIFAR_TRAIN_FILES + (CIFAR_TEST_FILE,):
        path = os.path.join(folder, name + suffix)
        if not os.path.exists(path):
            raise DataError(f"CIFAR-10 file missing: {path}")
        parts.append(reader(path))
    _check_same_counts(folder, [name + suffix for name in CIFAR_TRAIN_FILES + (CIFAR_TEST_FILE,)],
                       [len(p[1]) for p in parts])
    train_x = numpy.concatenate([p[0] for p in parts[:-1]])
    train_y = numpy.concatenate([p[1] for p in parts[:-1]])
    return train_x, train_y, parts[-1][0], parts[-1][1]


def _check_same_counts(folder, names, counts) -> None:
    """Every CIFAR-10 file holds the same number of images (10,000 in the official archives): a
    file with fewer was cut, even where the cut fell on a record boundary."""
    if len(set(counts)) <= 1:
        return
    usual = max(set(counts), key=counts.count)
    odd = [(n, c) for n, c in zip(names, counts) if c != usual]
    listed = ", ".join(f"{n} holds {c}" for n, c in odd)
    raise DataError(f"CIFAR-10 files in {folder} are truncated or mixed: {listed} images, the others {usual} each "
                    "(the official files hold 10,000 each)")


def load_cifar10(data_dir, val_size: int = 5000, split_seed: int = 0) -> Dataset:
    """CIFAR-10 from a local folder: ``val_size`` of the 50,000 training images (seeded) become the
    validation split (the paper's 45k/5k with the default), normalised on the rest."""
    folder, fmt = _find_cifar_folder(data_dir)
    train_x, train_y, test_x, test_y = _read_cifar_files(folder, fmt)
    n = len(train_y)
    if not 0 <= val_size < n:
        raise DataError(f"cannot hold out {val_size} validation images from {n} CIFAR-10 training images "
                        "(choose a smaller --val-size)")
    order = numpy.random.default_rng(split_seed).permutation(n)
    tr, va = order[val_size:], order[:val_size]
    (xtr, xva, xte), mean, std = _normalise(train_x[tr], train_x[va], test_x)
    return Dataset("cifar10", Split(xtr, train_y[tr]), Split(xva, train_y[va]), Split(xte, test_y),
                   num_classes=10, in_channels=3, image_size=32, translate=4, flip=True, mean=mean, std=std)


def check_labels(dataset: Dataset) -> None:
    """DataError unless every split's labels are integers in [0, num_classes).

    Done once per dataset, on the host, before training: the loss checks labels only on the host,
    because on the GPU reading them back would stall every step.
    """
    for name in ("train", "val", "test"):
        labels = numpy.asarray(backend.to_numpy(getattr(dataset, name).y))
        if labels.dtype.kind not in "iu":
            raise DataError(f"{dataset.name} {name} labels must be integers, got dtype {labels.dtype}")
        if labels.size and (labels.min() < 0 or labels.max() >= dataset.num_classes):
            raise DataError(f"{dataset.name} {name} labels must lie in [0, {dataset.num_classes}), got values from "
                            f"{int(labels.min())} to {int(labels.max())}")


def load(name: str, data_dir=None, val_size: int | None = None) -> Dataset:
    """Load ``"digits"`` or ``"cifar10"`` (host arrays; move them with ``Dataset.to``)."""
    if name == "digits":
        return load_digits() if val_size is None else load_digits(val_size=val_size)
    if name == "cifar10":
        return load_cifar10(data_dir) if val_size is None else load_cifar10(data_dir, val_size=val_size)
    raise DataError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")


# ----------------------------------------------------------------------------------------------
# Augmentation and batching
# ----------------------------------------------------------------------------------------------


def epoch_generators(seed: int, epoch: int):
    """(host generator for the shuffle order, backend generator for augmentation) of one epoch.

    Both are derived from (seed, epoch) alone, so a run resumed at any epoch or step draws exactly
    what the uninterrupted run drew, on NumPy and on CuPy, without serialising a device generator.
    """
    order_rng = numpy.random.default_rng([int(seed), 2, int(epoch)])
    aug_seed = int(numpy.random.SeedSequence([int(seed), 3, int(epoch)]).generate_state(1)[0])
    if backend.name() in ("cupy", "cupy-names"):
        # cupy-names: the guard's generator (NumPy's numbers, only cupy.random.Generator's methods).
        aug_rng = backend.xp().random.default_rng(aug_seed)
    else:
        aug_rng = numpy.random.default_rng(aug_seed)
    return order_rng, aug_rng


def _draw_augmentation(rng, n: int):
    """Uniform numbers for n samples: two shifts and one flip coin each (float64, on rng's device)."""
    return rng.random((n, 3))


def augment(x, rng, translate: int = 4, flip: bool = True, draws=None):
    """Randomly shift each image by up to ``translate`` pixels (zero fill) and flip half of them.

    x: (N, C, H, W) on any backend; rng: a generator on the same backend (see
    :func:`epoch_generators`). One gather builds the whole batch: output pixel (i, j) of sample n
    reads padded pixel (i + dy_n, j + dx_n), with the column order reversed for flipped samples.
    """
    xp = backend.array_module(x)
    n, c, h, w = x.shape
    t = int(translate)
    if not 0 <= t < min(h, w):
        raise ValueError(f"augment: translate must be in [0, {min(h, w)}) pixels for {h}x{w} images, got {translate}")
    u = _draw_augmentation(rng, n) if draws is None else draws
    if translate == 0 and not flip:
        return x
    shifts = xp.floor(u[:, :2] * (2 * t + 1)).astype(xp.int64)  # 0..2t: offset into the padded image
    padded = xp.zeros((n, c, h + 2 * t, w + 2 * t), dtype=x.dtype)
    padded[:, :, t:t + h, t:t + w] = x
    rows = shifts[:, 0:1] + xp.arange(h)[None, :]           # (N, H)
    cols = xp.arange(w)[None, :]
    if flip:
        flipped = (u[:, 2:3] < 0.5)
        cols = xp.where(flipped, w - 1 - cols, cols)
    cols = shifts[:, 1:2] + cols                             # (N, W)
    samples = xp.arange(n)[:, None, None, None]
    channels = xp.arange(c)[None, :, None, None]
    return padded[samples, channels, rows[:, None, :, None], cols[:, None, None, :]]


def num_batches(n: int, batch_size: int) -> int:
    return -(-int(n) // int(batch_size))


def batches(split: Split, batch_size: int, order=None, aug_rng=None, translate: int = 0, flip: bool = False,
            start: int = 0):
    """Yield ``(images, labels)`` mini-batches on the split's backend.

    order: a permutation of the samples (None: in order). aug_rng: augment each batch with it
    (None: no augmentation). start: skip the first ``start`` batches, still drawing their random
    numbers, so that a resumed epoch continues with the same augmentation as an uninterrupted one.
    The last batch may be smaller.
    """
    xp = backend.array_module(split.x)
    n = len(split)
    order_dev = None if order is None else xp.asarray(order)
    for b in range(num_batches(n, batch_size)):
        lo, hi = b * batch_size, min(n, (b + 1) * batch_size)
        draws = None if aug_rng is None else _draw_augmentation(aug_rng, hi - lo)
        if b < start:
            continue
        if order_dev is None:
            xb, yb = split.x[lo:hi], split.y[lo:hi]
        else:
            idx = order_dev[lo:hi]
            xb, yb = split.x[idx], split.y[idx]
        if aug_rng is not None:
            xb = augment(xb, aug_rng, translate, flip, draws=draws)
        yield xb, yb
