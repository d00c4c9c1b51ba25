"""Ctrl-C (SIGINT) and SIGTERM during training: say at once that the run will stop, stop at the
next safe point with a checkpoint, and never in the middle of writing one.

SIGTERM is how schedulers (Slurm, Kubernetes, ``docker stop``, ``timeout``) ask a job to end, a
little before they kill it: it is handled like a first Ctrl-C.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading

__all__ = ["InterruptFlag", "TrainingInterrupted", "HANDLED_SIGNALS"]

HANDLED_SIGNALS = tuple(s for s in (signal.SIGINT, getattr(signal, "SIGTERM", None)) if s is not None)
_NAMES = {signal.SIGINT: "Ctrl-C", getattr(signal, "SIGTERM", None): "SIGTERM"}


class TrainingInterrupted(RuntimeError):
    """Ctrl-C or SIGTERM stopped the run after saving a checkpoint; ``checkpoint`` is its path and
    ``signum`` the signal (the command exits with 128 + signum, as a shell reports a signal)."""

    def __init__(self, message, checkpoint=None, run_dir=None, signum=signal.SIGINT):
        super().__init__(message)
        self.checkpoint, self.run_dir, self.signum = checkpoint, run_dir, int(signum)


class InterruptFlag:
    """While active, the first Ctrl-C (or SIGTERM) sets a flag and says so at once; the loop then
    saves and stops at the next safe point (after the current training step, or before the next
    evaluation batch), so a checkpoint never holds a half-applied update. A second one stops at
    once, except while a checkpoint is being written: that write finishes first (see :meth:`saving`)."""

    def __init__(self, announce=None):
        self.requested = False
        self.signum = signal.SIGINT   # the signal that asked the run to stop
        self._announce = announce or (lambda line: print(line, file=sys.stderr, flush=True))
        self._saving = False
        self._previous = {}

    @property
    def signal_name(self) -> str:
        return _NAMES.get(self.signum, f"signal {self.signum}")

    def _handler(self, signum, frame):
        if not self.requested:
            self.requested, self.signum = True, signum
            again = "press Ctrl-C again" if signum == signal.SIGINT else "a second signal or Ctrl-C"
            self._announce(f"{_NAMES.get(signum, signum)}: saving a checkpoint at the next safe point, then stopping "
                           f"({again} to quit at once without saving)")
        elif self._saving:
            self._announce(f"{_NAMES.get(signum, signum)}: a checkpoint is being written; stopping as soon as it "
                           "is complete")
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
            for signum in HANDLED_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            if previous is not None:  # None: a handler installed from C, which cannot be put back
                signal.signal(signum, previous)
        self._previous = {}
        return False
