"""Datasets, the CIFAR-10 readers (both formats, on small files written here), augmentation, batches."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from minisd import backend, data


def fake_cifar_arrays(count, seed):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(count, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, size=count).astype(np.int64)
    return images, labels


def write_fake_cifar(root, fmt="bin", per_batch=4, test_count=None, seed=0, protocol=2):
    """Write CIFAR-10 files in the official layout (5 training batches + test batch) under root,
    each holding ``per_batch`` images (as the official files hold 10,000 each).

    Returns (folder, train_images, train_labels, test_images, test_labels) as uint8/int64 arrays.
    """
    test_count = per_batch if test_count is None else test_count
    folder = os.path.join(root, "cifar-10-batches-bin" if fmt == "bin" else "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    parts = []
    for k, name in enumerate(list(data.CIFAR_TRAIN_FILES) + [data.CIFAR_TEST_FILE]):
        images, labels = fake_cifar_arrays(test_count if name == "test_batch" else per_batch, seed + k)
        parts.append((images, labels))
        if fmt == "bin":
            records = np.concatenate([labels.astype(np.uint8)[:, None], images.reshape(len(labels), -1)], axis=1)
            records.tofile(os.path.join(folder, name + ".bin"))
        else:
            batch = {b"batch_label": f"batch {k}".encode(), b"labels": [int(v) for v in labels],
                     b"data": images.reshape(len(labels), 3072), b"filenames": [b"img.png"] * len(labels)}
            with open(os.path.join(folder, name), "wb") as handle:
                pickle.dump(batch, handle, protocol=protocol)
    train_x = np.concatenate([p[0] for p in parts[:-1]])
    train_y = np.concatenate([p[1] for p in parts[:-1]])
    return folder, train_x, train_y, parts[-1][0], parts[-1][1]


def raw_pixels(split, dataset):
    """Undo the normalisation: the pixel values the split was made from."""
    return np.asarray(backend.to_numpy(split.x), dtype=np.float64) * dataset.std + dataset.mean


# ------------------------------------------------------------------------------------------------
# digits
# ------------------------------------------------------------------------------------------------


def test_digits_shapes_split_and_normalisation():
    ds = data.load_digits()
    assert (len(ds.train), len(ds.val), len(ds.test)) == (1257, 180, 360)
    for split in (ds.train, ds.val, ds.test):
        assert split.x.shape[1:] == (1, 8, 8) and split.x.dtype == np.float32
        assert split.y.dtype == np.int64 and set(np.unique(split.y)) <= set(range(10))
        # Every split is normalised with the training statistics: undoing it gives the 0..16 pixels.
        pixels = raw_pixels(split, ds)
        np.testing.assert_allclose(pixels, np.round(pixels), atol=1e-4)
        assert pixels.min() > -1e-4 and pixels.max() < 16 + 1e-4
    # Per-pixel mean zero and one global std on the training split.
    np.testing.assert_allclose(ds.train.x.mean(axis=0), 0, atol=1e-5)
    assert ds.train.x.std() == pytest.approx(1.0, abs=1e-4)
    assert ds.mean.shape == (1, 8, 8) and np.isscalar(ds.std)
    assert (ds.num_classes, ds.in_channels, ds.image_size) == (10, 1, 8)
    assert ds.flip is False and ds.translate == 1  # a flipped digit is another symbol


def test_packaged_digits_equal_scikit_learns():
    sklearn_datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn not installed (optional)")
    bunch = sklearn_datasets.load_digits()
    images, labels = data.read_digits_file()
    assert images.dtype == np.uint8 and images.shape == (1797, 8, 8) and labels.dtype == np.int64
    np.testing.assert_array_equal(images, bunch.images)
    np.testing.assert_array_equal(labels, bunch.target)


def test_digits_split_is_the_one_scikit_learns_copy_gave():
    """The split and normalisation made from scikit-learn's float64 copy (as load_digits did before
    the digits were packaged): the same images, in the same order, to the bit."""
    sklearn_datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn not installed (optional)")
    bunch = sklearn_datasets.load_digits()
    tr, va, te = data._split_indices(1797, 180, 360, 0)
    images = bunch.data.reshape(-1, 1, 8, 8)
    (xtr, xva, xte), mean, std = data._normalise(images[tr], images[va], images[te])
    ds = data.load_digits()
    for split, x, idx in ((ds.train, xtr, tr), (ds.val, xva, va), (ds.test, xte, te)):
        assert split.x.tobytes() == x.tobytes()
        np.testing.assert_array_equal(split.y, bunch.target[idx])
    assert ds.mean.tobytes() == mean.tobytes() and ds.std == std


def test_digits_load_without_scikit_learn_or_scipy():
    """A fresh interpreter in which importing scikit-learn or SciPy fails still loads the digits."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    code = ("import sys\n"
            "for name in ('sklearn', 'scipy'): sys.modules[name] = None  # any import of them raises\n"
            "from minisd import data\n"
            "ds = data.load_digits()\n"
            "print(len(ds.train), len(ds.val), len(ds.test), int(ds.test.y[:20].sum()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    ds = data.load_digits()
    assert out == [str(v) for v in (1257, 180, 360, int(ds.test.y[:20].sum()))]


def test_digits_split_is_fixed_and_disjoint():
    a, b = data.load_digits(), data.load_digits()
    np.testing.assert_array_equal(a.test.x, b.test.x)
    np.testing.assert_array_equal(a.train.y, b.train.y)
    rows = lambda s: {r.tobytes() + bytes([int(y)]) for r, y in zip(raw_pixels(s, a).round().astype(np.uint8), s.y)}
    # (the digits contain a few exact duplicate images, so compare counts, not only overlap)
    assert len(rows(a.train) & rows(a.test)) < 5
    with pytest.raises(data.DataError):
        data.load_digits(val_size=1000, test_size=900)


# ------------------------------------------------------------------------------------------------
# CIFAR-10 readers
# ------------------------------------------------------------------------------------------------


def test_cifar_binary_reader_round_trip(tmp_path):
    folder, train_x, train_y, test_x, test_y = write_fake_cifar(tmp_path, "bin")
    images, labels = data.read_cifar_binary(os.path.join(folder, "data_batch_1.bin"))
    np.testing.assert_array_equal(images, train_x[:4])
    np.testing.assert_array_equal(labels, train_y[:4])
    assert images.dtype == np.uint8 and labels.dtype == np.int64
    images, labels = data.read_cifar_binary(os.path.join(folder, "test_batch.bin"))
    np.testing.assert_array_equal(images, test_x)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_python_reader_round_trip(tmp_path, protocol):
    folder, train_x, train_y, test_x, test_y = write_fake_cifar(tmp_path, "py", protocol=protocol)
    images, labels = data.read_cifar_python(os.path.join(folder, "data_batch_2"))
    np.testing.assert_array_equal(images, train_x[4:8])
    np.testing.assert_array_equal(labels, train_y[4:8])


@pytest.mark.parametrize("fmt", ["bin", "py"])
def test_load_cifar10_split_and_normalisation(tmp_path, fmt):
    _, train_x, train_y, test_x, test_y = write_fake_cifar(tmp_path, fmt, per_batch=4)
    ds = data.load_cifar10(tmp_path, val_size=5)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (15, 5, 4)
    assert ds.train.x.shape == (15, 3, 32, 32) and ds.train.x.dtype == np.float32
    assert (ds.in_channels, ds.image_size, ds.flip, ds.translate) == (3, 32, True, 4)
    np.testing.assert_allclose(ds.train.x.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(raw_pixels(ds.test, ds), test_x, atol=1e-3)
    np.testing.assert_array_equal(ds.test.y, test_y)
    # train + val are the 20 training images, each once
    together = np.concatenate([raw_pixels(ds.train, ds), raw_pixels(ds.val, ds)]).round().astype(np.uint8)
    assert sorted(map(bytes, together.reshape(20, -1))) == sorted(map(bytes, train_x.reshape(20, -1)))
    # the folder itself works as --data-dir too
    inner = data.load_cifar10(os.path.join(tmp_path, f"cifar-10-batches-{fmt}"), val_size=5)
    np.testing.assert_array_equal(inner.val.x, ds.val.x)


def test_both_cifar_formats_give_the_same_dataset(tmp_path):
    write_fake_cifar(tmp_path / "a", "bin", seed=3)
    write_fake_cifar(tmp_path / "b", "py", seed=3)
    a, b = data.load_cifar10(tmp_path / "a", val_size=4), data.load_cifar10(tmp_path / "b", val_size=4)
    np.testing.assert_array_equal(a.train.x, b.train.x)
    np.testing.assert_array_equal(a.val.y, b.val.y)


def test_cifar_default_split_is_the_papers_45k_5k(tmp_path):
    write_fake_cifar(tmp_path, "bin", per_batch=2)
    with pytest.raises(data.DataError, match="5000 validation"):
        data.load_cifar10(tmp_path)  # 10 images cannot give 5,000 for validation


def test_truncated_and_corrupted_binary_files(tmp_path):
    folder, *_ = write_fake_cifar(tmp_path, "bin")
    path = os.path.join(folder, "data_batch_3.bin")
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[:-100])
    with pytest.raises(data.DataError, match="truncated or corrupted.*data_batch_3|data_batch_3.*truncated"):
        data.load_cifar10(tmp_path, val_size=2)
    bad = bytearray(blob)
    bad[0] = 42  # a label byte out of 0..9
    open(path, "wb").write(bytes(bad))
    with pytest.raises(data.DataError, match="label 42"):
        data.load_cifar10(tmp_path, val_size=2)


def test_truncated_and_corrupted_python_files(tmp_path):
    folder, *_ = write_fake_cifar(tmp_path, "py")
    path = os.path.join(folder, "test_batch")
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[: len(blob) // 2])
    with pytest.raises(data.DataError, match="truncated or corrupted"):
        data.load_cifar10(tmp_path, val_size=2)
    with open(path, "wb") as handle:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, handle)
    with pytest.raises(data.DataError, match=r"shape \(N, 3072\)"):
        data.load_cifar10(tmp_path, val_size=2)


def test_binary_file_cut_on_a_record_boundary_is_reported(tmp_path):
    """Whole records but fewer of them: no byte count gives it away, the other files' counts do."""
    folder, *_ = write_fake_cifar(tmp_path, "bin", per_batch=3)
    path = os.path.join(folder, "data_batch_3.bin")
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[: 2 * data.CIFAR_RECORD])
    with pytest.raises(data.DataError, match=r"truncated.*data_batch_3.bin holds 2 images, the others 3 each"):
        data.load_cifar10(tmp_path, val_size=2)


@pytest.mark.parametrize("label, problem", [
    (2 ** 70, "label 1180591620717411303424 is not in 0..9"),
    (3.0, "got a float"),
    ("3", "got a str"),
    (True, "got a bool"),
    (-1, "label -1 is not in 0..9"),
])
def test_python_reader_refuses_labels_that_are_not_small_whole_numbers(tmp_path, label, problem):
    """Floats and strings are refused, not converted; a huge int is a one-line DataError, not an OverflowError."""
    path = tmp_path / "data_batch_1"
    with open(path, "wb") as handle:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, label]}, handle, protocol=2)
    with pytest.raises(data.DataError, match=f"data_batch_1 is corrupted.*{problem}"):
        data.read_cifar_python(path)


def test_protocol_2_pickle_with_empty_bytes_loads(tmp_path):
    """Protocol 2 writes b"" as a call of bytes(): an ordinary value, admitted (bytes with an argument is not)."""
    path = tmp_path / "data_batch_1"
    with open(path, "wb") as handle:
        pickle.dump({b"batch_label": b"", b"data": np.zeros((1, 3072), np.uint8), b"labels": [7]}, handle, protocol=2)
    images, labels = data.read_cifar_python(path)
    assert images.shape == (1, 3, 32, 32) and labels.tolist() == [7]
    crafted = (b"\x80\x02c__builtin__\nbytes\nJ\x00\x00\x00\x40\x85R.")  # bytes(2**30): a memory bomb
    path.write_bytes(crafted)
    with pytest.raises(data.DataError, match=r"refusing bytes\(\.\.\.\) with arguments"):
        data.read_cifar_python(path)


def test_check_labels_refuses_labels_outside_the_classes():
    ds = data.load_digits()
    data.check_labels(ds)
    y = ds.test.y.copy()
    y[3] = 10
    with pytest.raises(data.DataError, match=r"digits test labels must lie in \[0, 10\), got values from 0 to 10"):
        data.check_labels(data.replace(ds, test=data.Split(ds.test.x, y)))


class _CallsSomething:
    """Unpickling this calls open(marker, "w"): a stand-in for os.system or eval."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_restricted_unpickler_refuses_a_pickle_that_calls_something(tmp_path):
    folder, *_ = write_fake_cifar(tmp_path, "py")
    marker = tmp_path / "pwned"
    path = os.path.join(folder, "data_batch_1")
    with open(path, "wb") as handle:
        pickle.dump({b"data": _CallsSomething(str(marker)), b"labels": [0]}, handle, protocol=2)
    with pytest.raises(data.DataError, match=r"refusing to load (builtins?|_?io)\.open"):
        data.read_cifar_python(path)
    assert not marker.exists()
    with pytest.raises(data.DataError, match="refusing"):
        data.load_cifar10(tmp_path, val_size=2)
    assert not marker.exists()
    # the same trick through os.system, and an object array (it could hold anything)
    with open(path, "wb") as handle:
        pickle.dump({b"data": _Evil(), b"labels": [0]}, handle)
    with pytest.raises(data.DataError, match="refusing to load (posix|os|nt).system"):
        data.read_cifar_python(path)
    with open(path, "wb") as handle:
        pickle.dump({b"data": np.array([1, "x"], dtype=object), b"labels": [0, 1]}, handle, protocol=2)
    with pytest.raises(data.DataError, match="refusing dtype"):
        data.read_cifar_python(path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_missing_folder_and_missing_files(tmp_path):
    with pytest.raises(data.DataError, match="data folder not found"):
        data.load_cifar10(tmp_path / "nowhere")
    with pytest.raises(data.DataError, match="no CIFAR-10 files"):
        data.load_cifar10(tmp_path)
    with pytest.raises(data.DataError, match="--data-dir"):
        data.load("cifar10", None)
    folder, *_ = write_fake_cifar(tmp_path, "bin")
    os.remove(os.path.join(folder, "test_batch.bin"))
    with pytest.raises(data.DataError, match="missing: .*test_batch.bin"):
        data.load_cifar10(tmp_path, val_size=2)
    with pytest.raises(data.DataError, match="unknown dataset 'mnist'"):
        data.load("mnist")


# ------------------------------------------------------------------------------------------------
# Augmentation and batches
# ------------------------------------------------------------------------------------------------


def _images(rng, n=6, c=2, h=5, w=7):
    return backend.to_device(rng.standard_normal((n, c, h, w)).astype(np.float32))


def test_augment_shapes_dtype_backend_and_determinism(rng):
    x = _images(rng)
    _, aug_a = data.epoch_generators(0, 3)
    _, aug_b = data.epoch_generators(0, 3)
    _, aug_c = data.epoch_generators(0, 4)
    a, b, c = (data.augment(x, g, translate=2, flip=True) for g in (aug_a, aug_b, aug_c))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert backend.backend_of(a) == backend.backend_of(x)
    np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(b))
    assert not np.array_equal(backend.to_numpy(a), backend.to_numpy(c))


def _draws(u):
    return backend.to_device(np.asarray(u, dtype=np.float64))


def test_augment_translation_zero_fill_and_flip_exactly(rng):
    x = _images(rng, n=3)
    xh = backend.to_numpy(x)
    t = 2
    # u = 0 -> offset 0 -> content moves down/right by t; u near 1 -> offset 2t -> up/left by t;
    # u in the middle -> no shift. Third column: flip if < 0.5.
    draws = _draws([[0.0, 0.0, 0.9], [0.999, 0.5, 0.9], [0.5, 0.5, 0.1]])
    out = backend.to_numpy(data.augment(x, None, translate=t, flip=True, draws=draws))
    expected0 = np.zeros_like(xh[0])
    expected0[:, t:, t:] = xh[0][:, :-t, :-t]
    np.testing.assert_array_equal(out[0], expected0)
    expected1 = np.zeros_like(xh[1])
    expected1[:, :-t, :] = xh[1][:, t:, :]
    np.testing.assert_array_equal(out[1], expected1)
    np.testing.assert_array_equal(out[2], xh[2][:, :, ::-1])  # no shift, flipped


def test_augment_refuses_a_shift_of_a_whole_image(rng):
    x = _images(rng)
    with pytest.raises(ValueError, match=r"augment: translate must be in \[0, 5\) pixels for 5x7 images, got 100000"):
        data.augment(x, np.random.default_rng(0), translate=100000)


def test_augment_identity_without_translation_or_flip(rng):
    x = _images(rng)
    _, g = data.epoch_generators(1, 0)
    np.testing.assert_array_equal(backend.to_numpy(data.augment(x, g, translate=0, flip=False)), backend.to_numpy(x))
    # flip off: no image is ever mirrored, whatever the draws
    x1 = _images(rng, n=200, c=1, h=3, w=4)
    out = backend.to_numpy(data.augment(x1, g, translate=0, flip=False))
    np.testing.assert_array_equal(out, backend.to_numpy(x1))


def test_batches_cover_every_sample_once_on_the_backend(rng):
    n = 23
    x = rng.standard_normal((n, 1, 4, 4)).astype(np.float32)
    split = data.Split(x, np.arange(n, dtype=np.int64)).to()
    order = np.random.default_rng(0).permutation(n)
    got = list(data.batches(split, 5, order=order))
    assert [int(b[1].shape[0]) for b in got] == [5, 5, 5, 5, 3]
    assert data.num_batches(n, 5) == 5
    labels = np.concatenate([backend.to_numpy(b[1]) for b in got])
    np.testing.assert_array_equal(labels, order)
    for xb, yb in got:
        assert backend.backend_of(xb) == backend.backend_of(split.x)
        np.testing.assert_array_equal(backend.to_numpy(xb), x[backend.to_numpy(yb)])


def test_batches_started_late_continue_the_same_augmentation(rng):
    """Resume support: skipping k batches still draws their random numbers."""
    n = 20
    split = data.Split(rng.standard_normal((n, 1, 6, 6)).astype(np.float32), np.arange(n)).to()
    order = np.arange(n)[::-1].copy()
    full = list(data.batches(split, 6, order=order, aug_rng=data.epoch_generators(5, 2)[1], translate=1, flip=True))
    late = list(data.batches(split, 6, order=order, aug_rng=data.epoch_generators(5, 2)[1], translate=1, flip=True,
                             start=2))
    assert len(late) == 2
    for (xa, ya), (xb, yb) in zip(full[2:], late):
        np.testing.assert_array_equal(backend.to_numpy(xa), backend.to_numpy(xb))
        np.testing.assert_array_equal(backend.to_numpy(ya), backend.to_numpy(yb))


def test_epoch_generators_depend_on_seed_and_epoch_only():
    a, _ = data.epoch_generators(7, 1)
    b, _ = data.epoch_generators(7, 1)
    c, _ = data.epoch_generators(7, 2)
    pa, pb, pc = a.permutation(50), b.permutation(50), c.permutation(50)
    np.testing.assert_array_equal(pa, pb)
    assert not np.array_equal(pa, pc)
