"""Writing a file so that a crash never leaves half of it: a temporary file beside the target,
flushed and synced, then renamed over it."""
from __future__ import annotations

import contextlib
import os
import secrets

__all__ = ["write_atomically", "PARTIAL_PREFIX"]

PARTIAL_PREFIX = ".tmp-"  # temporary files of write_atomically; a run removes those a kill left behind


def write_atomically(path, suffix, write) -> None:
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
