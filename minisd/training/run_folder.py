"""The run folder: whose it is, one run at a time (a lock the system releases however the process
ends), the partial files a killed save leaves behind, and the rules for reusing a folder.

A folder is minisd's own when its settings.json says so (``"format": "minisd-run"``, written
first thing when a run claims a folder), or, for runs made before that marker, when it holds a
minisd checkpoint or a settings.json with exactly the settings minisd writes. Nothing in a folder
that is not minisd's own is removed or rewritten: a non-empty foreign folder is refused in one line.
minisd writes only regular files it created (see :mod:`~minisd.training.files`) and locks only a
regular ``.lock`` file, never through a link.

A folder that holds no checkpoint (a run that died in its first epoch) holds nothing to lose: a new
run may use it, and resuming it starts the run again from its settings.json.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shlex
import stat

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: run folders are not locked there
    fcntl = None

from minisd.training.files import is_partial_file, open_regular, write_atomically
from minisd.training.settings import Settings, SettingsError, settings_from_values

__all__ = ["RunFolderError", "run_folder_lock", "check_not_in_use", "check_no_run_in", "has_checkpoint",
           "remove_partial_files", "default_run_dir", "read_settings_json", "write_settings_json",
           "check_run_folder", "RUN_FORMAT"]


class RunFolderError(ValueError):
    """The run folder is not minisd's, already holds a run (and --resume was not asked for), cannot
    be written, or another run uses it."""


LOCK_NAME = ".lock"
RUN_FORMAT = "minisd-run"   # settings.json's "format": the mark of a folder minisd created
RUN_FILES = ("settings.json", "metrics.jsonl", "last.npz", "best.npz", "curves.png", "summary.json", LOCK_NAME)
_NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


def quoted(path) -> str:
    """``path`` as a shell word, for commands printed to be pasted (``--out "my run"``)."""
    return shlex.quote(os.fspath(path))


def _open_lock(run_dir, flags):
    """The folder's .lock opened with ``flags``, never through a link and only if a regular file."""
    path = os.path.join(run_dir, LOCK_NAME)
    try:
        fd = os.open(path, flags | _NO_FOLLOW, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RunFolderError(f"{path} is a symbolic link; minisd locks only a regular .lock file it created: "
                                 "remove the link") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RunFolderError(f"{path} is not a regular file; minisd locks only a .lock file it created: move it away")
    return fd


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
        fd = _open_lock(run_dir, os.O_RDONLY)
    except FileNotFoundError:
        return  # no lock file: no run has ever held this folder
    except NotADirectoryError:
        return  # run_dir is a file: check_run_folder says so
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
    fd = _open_lock(run_dir, os.O_RDWR | os.O_CREAT)
    try:
        _try_lock(fd, run_dir)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # for the message the next comer reads
        yield
    finally:
        os.close(fd)


def has_checkpoint(folder) -> bool:
    return any(os.path.lexists(os.path.join(folder, f)) for f in ("last.npz", "best.npz"))


def _settings_json_mark(run_dir) -> str | None:
    """"marked" (settings.json carries minisd's format), "legacy" (exactly the settings an older
    minisd wrote, and valid), or None (absent, unreadable or someone else's)."""
    try:
        values = _read_json(os.path.join(run_dir, "settings.json"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(values, dict):
        return None
    if values.get("format") == RUN_FORMAT:
        return "marked"
    if set(values) == {f.name for f in dataclasses.fields(Settings)}:
        with contextlib.suppress(SettingsError, TypeError):
            Settings.from_dict(values).validate()
            return "legacy"
    return None


def _holds_minisd_checkpoint(run_dir) -> bool:
    from minisd.training.checkpoints import CheckpointError, read_checkpoint_meta  # noqa: PLC0415

    for name in ("last.npz", "best.npz"):
        with contextlib.suppress(CheckpointError, OSError):
            read_checkpoint_meta(os.path.join(run_dir, name))
            return True
    return False


def is_own_folder(run_dir) -> bool:
    """True if ``run_dir`` is empty, holds only minisd's lock, or is a minisd run (see the module's notes)."""
    entries = [n for n in os.listdir(run_dir) if not is_partial_file(n)]
    if not entries or entries == [LOCK_NAME]:
        return True
    return _settings_json_mark(run_dir) is not None or _holds_minisd_checkpoint(run_dir)


def check_run_folder(run_dir, resuming=False) -> None:
    """RunFolderError (one line) unless ``run_dir`` is new, or a folder minisd may write in: its
    own (or empty), its files regular files (or links, which a rename replaces), and writable."""
    run_dir = os.fspath(run_dir)
    if not run_dir:
        raise RunFolderError("the run folder name is empty; give --out a folder name")
    if not os.path.lexists(run_dir):
        return
    if not os.path.isdir(run_dir):
        raise RunFolderError(f"{run_dir} is not a folder; give --out a new or empty folder, or a minisd run folder")
    for name in RUN_FILES:  # a FIFO would block a read, a folder cannot be replaced by a file
        path = os.path.join(run_dir, name)
        with contextlib.suppress(FileNotFoundError):
            mode = os.lstat(path).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
                raise RunFolderError(f"{path} is not a regular file; minisd writes only regular files it "
                                     "created: move it away or choose another --out")
    if not is_own_folder(run_dir):
        foreign = sorted(os.listdir(run_dir))
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise RunFolderError(f"{run_dir} is not a minisd run folder (it holds {len(foreign)} "
                             f"entr{'ies' if len(foreign) != 1 else 'y'} minisd did not write: {shown}); "
                             "nothing there was changed: " + ("copy the checkpoint into a new folder and resume "
                                                              "it there" if resuming else
                                                              "choose a new or empty folder with --out"))
    if not os.access(run_dir, os.W_OK | os.X_OK):
        what = "cannot resume in" if resuming else "cannot write to"
        raise RunFolderError(f"{what} {run_dir}: the folder is read-only"
                             + ("; copy the run to a writable folder and resume it there" if resuming
                                else "; choose another --out"))


def remove_partial_files(run_dir, log) -> None:
    """Remove temporary files that a kill during a save left behind: regular files with the names
    write_atomically gives (only a run holding the lock of its own folder calls this, so no save is
    in progress and nothing else is taken for one)."""
    with contextlib.suppress(FileNotFoundError):
        partial = []
        for name in sorted(os.listdir(run_dir)):
            path = os.path.join(run_dir, name)
            with contextlib.suppress(OSError):
                if is_partial_file(name) and stat.S_ISREG(os.lstat(path).st_mode):
                    os.remove(path)
                    partial.append(name)
        if partial:
            log(f"removed {len(partial)} partial file{'s' if len(partial) > 1 else ''} an interrupted save left in "
                f"{run_dir}: {', '.join(partial)}")


def default_run_dir(settings: Settings, root="runs") -> str:
    """runs/<name>, or runs/<name>-2, -3, ...: the first that is new, or is a minisd folder that
    holds no checkpoint and is not in use (a run that died in its first epoch left nothing to keep)."""
    base = os.path.join(root, f"{settings.dataset}-resnet{settings.depth}-{settings.schedule}-seed{settings.seed}")
    candidate, k = base, 1
    while os.path.lexists(candidate):
        if os.path.isdir(candidate) and not has_checkpoint(candidate):
            try:
                check_run_folder(candidate)
                check_not_in_use(candidate)
                return candidate
            except (RunFolderError, OSError):
                pass
        k += 1
        candidate = f"{base}-{k}"
    return candidate


def check_no_run_in(run_dir) -> None:
    if has_checkpoint(run_dir):
        raise RunFolderError(f"{run_dir} already holds a run; continue it with --resume {quoted(run_dir)} "
                             "or choose another --out")


def _read_json(path):
    with open_regular(path) as handle:
        return json.loads(handle.read().decode("utf-8"))


def read_settings_json(run_dir) -> Settings:
    """The validated Settings a run folder's settings.json holds (a stored run's, to train it again);
    RunFolderError naming the file if it cannot be read or holds no valid settings."""
    path = os.path.join(run_dir, "settings.json")
    try:
        values = _read_json(path)
    except (OSError, ValueError, RecursionError) as exc:
        raise RunFolderError(f"cannot read {path} ({type(exc).__name__}: {exc})") from None
    return settings_from_values(values, RunFolderError, f"{path} does not hold a JSON object of settings", f"{path}: ")


def write_settings_json(run_dir, settings: Settings) -> None:
    """settings.json (atomically): the settings, and the mark that makes the folder minisd's own."""
    values = {"format": RUN_FORMAT, **settings.to_dict()}
    text = json.dumps(values, indent=2) + "\n"
    write_atomically(os.path.join(run_dir, "settings.json"), ".json", lambda handle: handle.write(text.encode()))
