"""Ctrl-C during training: say at once that the run will stop, stop at the next safe point with a
checkpoint, and never in the middle of writing one."""
from __future__ import annotations

import contextlib
import signal
import sys
import threading

__all__ = ["InterruptFlag", "TrainingInterrupted"]


class TrainingInterrupted(RuntimeError):
    """Ctrl-C stopped the run after saving a checkpoint; ``checkpoint`` is its path."""

    def __init__(self, message, checkpoint=None, run_dir=None):
        super().__init__(message)
        self.checkpoint, self.run_dir = checkpoint, run_dir


class InterruptFlag:
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
