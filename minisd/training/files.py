"""The only ways minisd touches a file in a run folder.

* :func:`write_atomically`: a temporary file beside the target (created with O_EXCL, so never
  through a link an attacker or a mistake left there), flushed and synced, then renamed over the
  target. A rename replaces a link itself, never the file it points to.
* :func:`open_regular`: open a file for reading only if it is a regular file (a FIFO would block
  the run forever, a folder or a device is not a file minisd wrote).
* :func:`is_partial_file`: the names :func:`write_atomically` gives its temporary files, so a run
  removes only what its own killed saves left behind.

Errors that the operating system reports without a file name (a full disk: "[Errno 28] No space
left on device") are raised again naming the file being written.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat

__all__ = ["write_atomically", "open_regular", "is_partial_file", "PARTIAL_PREFIX"]

PARTIAL_PREFIX = ".tmp-"  # temporary files of write_atomically; a run removes those a kill left behind
# ".tmp-" + 12 hex digits + the suffix of a file minisd writes: nothing else is taken for a partial file.
_PARTIAL_NAME = re.compile(r"\.tmp-[0-9a-f]{12}\.(npz|png|json|jsonl)\Z")


def is_partial_file(name: str) -> bool:
    """True for the temporary-file names :func:`write_atomically` makes (".tmp-1a2b3c4d5e6f.npz")."""
    return _PARTIAL_NAME.match(name) is not None


def _naming(exc: OSError, path, tmp=None) -> OSError:
    """``exc`` naming ``path`` where it names no file (ENOSPC, EIO and EDQUOT do not) or names the
    temporary file (a random name tells the user nothing)."""
    if exc.filename is None or exc.filename == tmp:
        return type(exc)(exc.errno, exc.strerror or str(exc), os.fspath(path))
    return exc


def write_atomically(path, suffix, write) -> None:
    """write(handle) into a temporary file beside ``path``, then rename it over ``path``.

    A crash or Ctrl-C mid-write leaves the old file intact (a rename is atomic), never half a file.
    The file gets the permissions the umask gives any new file (as settings.json has), and the
    folder is synced after the rename so the new name survives a power cut. An OSError names
    ``path`` (not the temporary file).
    """
    folder = os.path.dirname(os.path.abspath(path))
    while True:
        tmp = os.path.join(folder, f"{PARTIAL_PREFIX}{secrets.token_hex(6)}{suffix}")
        try:
            # O_EXCL: a new file or nothing (never an existing file, never through a link).
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode 0666 minus the umask
            break
        except FileExistsError:
            continue
        except OSError as exc:  # a read-only folder, a full disk: say which file could not be written
            raise _naming(exc, path, tmp) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(exc, OSError):
            raise _naming(exc, path, tmp) from None
        raise
    _sync_folder(folder)


def open_regular(path, what="file"):
    """A binary read handle on ``path`` if it is a regular file (links are followed: a checkpoint
    the user names may be one); OSError naming ``path`` otherwise. O_NONBLOCK: opening a FIFO
    returns at once instead of waiting for a writer, and is then refused."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"not a regular {what}", os.fspath(path))
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


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
