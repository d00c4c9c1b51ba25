"""Scratch buffers, chunks and threads: the machinery the fast kernels run on.

Nothing here is mathematics. The fast convolutions (:mod:`minisd.kernels.fast`) cut a batch into
chunks of a few images, unfold each chunk into a small reused buffer, and run the chunks on a few
Python threads. This module holds the three pieces they share:

* :func:`scratch`: reused buffers, so a column matrix is not fresh memory at every step;
* :func:`images_per_chunk`: how many images go in one chunk;
* :func:`map_chunks` / :func:`map_channel_groups`: run chunks or groups of channels on threads,
  with :func:`set_num_threads` / :func:`get_num_threads` to choose how many.

Results never depend on the thread count: the chunks are cut by size alone, every chunk writes its
own slice of the output, and anything summed over chunks (a weight gradient) is added in chunk
order. So a run resumed with another ``MINISD_NUM_THREADS`` continues bit for bit.
"""
from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from threadpoolctl import ThreadpoolController

from minisd.backend import is_device_array

__all__ = [
    "CHUNK_BYTES",
    "scratch",
    "clear_workspace",
    "images_per_chunk",
    "set_num_threads",
    "get_num_threads",
    "threads_from_environment",
    "map_chunks",
    "map_channel_groups",
]


# ----------------------------------------------------------------------------------------------
# Scratch buffers
# ----------------------------------------------------------------------------------------------

# Why: a column matrix is 9x the size of the activation it comes from (75 MiB for a 16-channel
# 32x32 batch of 128). Two things make a whole-batch column matrix slow on a CPU:
# * memory bandwidth: im2col writes it out to main memory and the product reads it back, and at
#   these sizes moving the bytes costs as much as the arithmetic;
# * first touch: fresh memory is slow the first time it is written (the kernel maps and zeroes
#   every page; measured: docs/performance.md#first-touch-of-fresh-memory), and arrays that large
#   go back to the OS when freed, so a fresh column matrix per layer pays that again at every step.
# So the convolutions below unfold a few images at a time (about CHUNK_BYTES of scratch, small
# enough to stay in a core's caches) into reused buffers, and run the product on them while they
# are still in cache. The buffers never leave the function that filled them: the forward keeps
# only its input x (an array the previous layer made anyway) and the backward unfolds what it
# needs again (for a stride-1 "same" conv, dy's width columns and x's height columns, see
# :func:`_conv_grads_from_dy_columns`; x's full columns otherwise). That costs an unfolding per
# layer in backward and saves the memory of every column matrix. Smaller chunks mean more,
# smaller products (and with several BLAS threads, one thread hand-off per product); larger ones
# leave the caches. 3 MiB measured best on a 2-core machine
# (docs/performance.md#chunk-size-of-the-scratch-buffers).
# On a GPU (CuPy arrays) the whole batch is one chunk: there, one large product is what is fast.
CHUNK_BYTES = 3 << 20
_WORKSPACE: dict = {}


def scratch(xp, shape, dtype, purpose="columns"):
    """A reused, uninitialised C-contiguous array of ``shape``: a view of one growing flat buffer.

    Only for values that die inside the function that asked: the next call overwrites them.
    One buffer per (array module, dtype, thread, purpose): arrays alive at the same time need
    different purposes.
    """
    size = 1
    for s in shape:
        size *= int(s)
    key = (xp.__name__, xp.dtype(dtype).str, threading.get_ident(), purpose)
    buf = _WORKSPACE.get(key)
    if buf is None or buf.size < size:
        _WORKSPACE.pop(key, None)  # free the old buffer before allocating the larger one
        buf = _WORKSPACE[key] = xp.empty(size, dtype=dtype)
    return buf[:size].reshape(shape)


def clear_workspace() -> None:
    """Free the scratch buffers that convolutions reuse (they are re-created on demand)."""
    _WORKSPACE.clear()
    for clear in _ON_CLEAR:
        clear()


_ON_CLEAR: list = []  # other caches of reused arrays (the fast tier's kept rows) register here


def images_per_chunk(x, scratch_bytes_per_image):
    """How many images of x to unfold at once: about CHUNK_BYTES of scratch (all on a GPU).

    Decided by sizes alone, never by the thread count: the chunks are the units in which a weight
    gradient is summed, so the same chunks on 1 or 4 threads give the same bits. (An earlier
    version rounded the chunk count up to a multiple of the threads, so that no thread waited for
    the last chunk; with threads that take the next free chunk, that wait is one chunk at most.)
    """
    n = x.shape[0]
    if is_device_array(x) or n * scratch_bytes_per_image <= CHUNK_BYTES:
        # The whole batch fits in one chunk (8x8 digits, say): one product, no thread hand-off,
        # which would cost more than it saves (measured: docs/performance.md#one-chunk-for-a-small-batch).
        return max(n, 1)
    return max(1, min(n, CHUNK_BYTES // max(1, scratch_bytes_per_image)))


# ----------------------------------------------------------------------------------------------
# Threads
# ----------------------------------------------------------------------------------------------

# Why: only the matrix products use more than one core by themselves (through the BLAS), and on
# the thin products of one chunk OpenBLAS gains little from its second thread. im2col, col2im and
# the rest are NumPy copies that run on one core. NumPy releases the GIL in copies and in BLAS
# calls, so plain Python threads can run whole chunks (im2col, product, col2im) side by side: each
# thread with its own scratch buffers (see :func:`scratch`) and a one-thread BLAS, so the cores
# are not oversubscribed. Results stay deterministic: every chunk writes its own slice of the
# output, and per-chunk weight gradients are added in chunk order, not in the order threads finish.
_MAX_DEFAULT_THREADS = 4
_NUM_THREADS = None  # None: read MINISD_NUM_THREADS or the CPU count at first use
_POOL = None
_BLAS = None  # a threadpoolctl controller, made at first use (see _one_blas_thread)


def set_num_threads(n: int | None) -> None:
    """Use ``n`` Python threads for the chunks of a CPU convolution (1: no threads).

    ``None`` restores the default: the environment variable ``MINISD_NUM_THREADS``, else
    ``os.cpu_count()`` capped at 4. While a convolution runs its chunks on several threads it
    limits the BLAS to one thread each (with threadpoolctl) and restores your setting afterwards.
    Results are bit-identical for every thread count (the chunks are cut by size alone).
    """
    global _NUM_THREADS, _POOL
    if n is not None and int(n) < 1:
        raise ValueError(f"set_num_threads: expected n >= 1 or None, got {n}")
    _NUM_THREADS = None if n is None else int(n)
    if _POOL is not None:
        _POOL.shutdown(wait=True)
        _POOL = None
        _WORKSPACE.clear()  # the old threads' scratch buffers (keyed by their ids) would linger


def get_num_threads() -> int:
    """The number of threads CPU convolutions use (see :func:`set_num_threads`)."""
    if _NUM_THREADS is not None:
        return _NUM_THREADS
    env = os.environ.get("MINISD_NUM_THREADS", "").strip()
    if env:
        return threads_from_environment(env)
    return max(1, min(os.cpu_count() or 1, _MAX_DEFAULT_THREADS))


MAX_THREADS = 1024  # more threads than any machine has cores; a typo's 10**9 would exhaust memory


def threads_from_environment(text: str) -> int:
    """MINISD_NUM_THREADS as a number of threads: ASCII digits only ("²" and "٣" are digits to
    ``str.isdigit`` but not numbers a user meant), 1 to MAX_THREADS; ValueError in one line otherwise."""
    text = text.strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 7) or not 1 <= int(text) <= MAX_THREADS:
        shown = text if len(text) <= 20 else text[:20] + "..."
        raise ValueError(f"MINISD_NUM_THREADS must be a whole number from 1 to {MAX_THREADS} (threads for CPU "
                         f"convolutions), got {shown!r}")
    return int(text)


def _one_blas_thread():
    """A context that limits the BLAS to one thread, and restores its setting on exit."""
    global _BLAS
    if _BLAS is None:
        _BLAS = ThreadpoolController()  # made at first use, after NumPy has loaded its BLAS, so it sees it
    return _BLAS.limit(limits=1, user_api="blas")


def map_chunks(fn, starts, threads):
    """[fn(n0) for n0 in starts], on ``threads`` threads; results in the order of ``starts``.

    Each thread (the calling one included) takes the next chunk not yet taken until none is left,
    so a thread that started late or ran slower takes fewer. Every result is stored at its chunk's
    place, so the list does not depend on which thread ran which chunk.
    """
    global _POOL
    if threads <= 1 or len(starts) <= 1:
        return [fn(n0) for n0 in starts]
    threads = min(threads, len(starts))
    if _POOL is None or _POOL._max_workers < threads - 1:
        if _POOL is not None:
            _POOL.shutdown(wait=True)
        _POOL = ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix="minisd-conv")
    results = [None] * len(starts)
    taken = itertools.count()  # next() on it is atomic under the GIL: each index is taken once

    def run():
        for i in iter(taken.__next__, None):
            if i >= len(starts):
                return
            results[i] = fn(starts[i])

    with _one_blas_thread():
        futures = [_POOL.submit(run) for _ in range(threads - 1)]
        try:
            run()
        finally:
            for f in futures:
                f.result()  # waits for every thread (and re-raises its error)
    return results


# Below this many elements a thread hand-off costs more than the pass it would split.
_SPLIT_MIN_SIZE = 1 << 18


def map_channel_groups(fn, x):
    """fn(channel slice) over the channels of ``x`` (axis 1), split into one group per thread.

    For the element-wise and per-channel passes (batch norm, ReLU), which NumPy runs on one core:
    the groups of channels run side by side, as the chunks of a convolution do. Small or device
    arrays get a single call with ``slice(None)`` (every channel).
    """
    channels = x.shape[1] if x.ndim >= 2 else 1
    threads = 1 if is_device_array(x) or x.size < _SPLIT_MIN_SIZE else min(get_num_threads(), channels)
    if threads <= 1:
        fn(slice(None))
        return
    step = -(-channels // threads)
    map_chunks(lambda c0: fn(slice(c0, c0 + step)), range(0, channels, step), threads)
