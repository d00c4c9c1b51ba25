"""The run folder: one run at a time (a lock the system releases however the process ends), the
partial files a killed save leaves behind, and the rules for reusing a folder.

A folder that holds no checkpoint (a run that died in its first epoch) holds nothing to lose: a new
run may use it, and resuming it starts the run again from its settings.json.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: run folders are not locked there
    fcntl = None

from minisd.training.files import PARTIAL_PREFIX
from minisd.training.settings import Settings, SettingsError

__all__ = ["RunFolderError", "run_folder_lock", "check_not_in_use", "check_no_run_in", "has_checkpoint",
           "remove_partial_files", "default_run_dir", "read_settings_json"]


class RunFolderError(ValueError):
    """The run folder already holds a run (and --resume was not asked for), or another run uses it."""


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


def check_not_in_use(run_dir) -> None:
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
def run_folder_lock(run_dir):
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


def has_checkpoint(folder) -> bool:
    return any(os.path.exists(os.path.join(folder, f)) for f in ("last.npz", "best.npz"))


def remove_partial_files(run_dir, log) -> None:
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


def default_run_dir(settings: Settings, root="runs") -> str:
    """runs/<name>, or runs/<name>-2, -3, ...: the first that is new, or holds no checkpoint and is
    not in use (a run that died in its first epoch left nothing to keep there)."""
    base = os.path.join(root, f"{settings.dataset}-resnet{settings.depth}-{settings.schedule}-seed{settings.seed}")
    candidate, k = base, 1
    while os.path.exists(candidate):
        if os.path.isdir(candidate) and not has_checkpoint(candidate):
            try:
                check_not_in_use(candidate)
                return candidate
            except RunFolderError:
                pass
        k += 1
        candidate = f"{base}-{k}"
    return candidate


def check_no_run_in(run_dir) -> None:
    if has_checkpoint(run_dir):
        raise RunFolderError(f"{run_dir} already holds a run; continue it with --resume {run_dir} "
                             "or choose another --out")


def read_settings_json(run_dir) -> Settings:
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
