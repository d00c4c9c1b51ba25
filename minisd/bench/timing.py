"""How the benchmark tables time things: threads, the machine's load, one training step as a
closure (minisd's and PyTorch's), and the interleaved turns that make two timings comparable."""
from __future__ import annotations

import os
import statistics
import time

import numpy
from threadpoolctl import threadpool_info, threadpool_limits

from minisd import backend, kernels, optim
from minisd.bench.torch_resnet import import_torch, torch_resnet
from minisd.training import train_step

__all__ = ["BATCH", "DEPTHS", "ROUNDS", "load", "set_threads", "random_batch", "minisd_step_fn", "torch_step_fn", "interleaved",
           "median_time"]

# The defaults of every table, and of `minisd bench` (its --help shows them).
BATCH = 128
DEPTHS = (20, 56, 110)
ROUNDS = 8

_THREAD_LIMITS = []  # keeps threadpoolctl's limiter alive for the rest of the process


def load() -> str:
    """The machine's load averages (1, 5, 15 min), for the record beside each table."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:  # not available on this platform
        return "load: unknown"
    return f"load {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def set_threads(threads: int) -> str:
    """Use ``threads`` threads in minisd's convolution chunks, NumPy's BLAS and PyTorch (if importable);
    returns one line saying what each got."""
    kernels.set_num_threads(threads)
    _THREAD_LIMITS.append(threadpool_limits(limits=threads, user_api="blas"))
    blas = [f"{i.get('internal_api')} {i.get('num_threads')}" for i in threadpool_info() if i.get("user_api") == "blas"]
    notes = [f"minisd chunk threads: {kernels.get_num_threads()}", "BLAS threads: " + ", ".join(blas)]
    torch = import_torch()
    if torch is not None:
        torch.set_num_threads(threads)
        notes.append(f"torch {torch.__version__} threads: {torch.get_num_threads()}")
    return "; ".join(notes)


def random_batch(batch, seed=0, size=32):
    """(x, labels): ``batch`` random float32 images (batch, 3, size, size) and labels in 0..9, on the host."""
    rng = numpy.random.default_rng(seed)
    x = rng.standard_normal((batch, 3, size, size)).astype(numpy.float32)
    return x, rng.integers(0, 10, batch)


def minisd_step_fn(model, batch=BATCH):
    """A closure running one training step (forward, loss, backward, SGD) of a minisd model, on a
    batch of random images on the model's backend (moved there once, before any step).

    Sets ``model.conv1.input_grad = False``, as the trainer does: the images need no gradient.
    """
    x, labels = (backend.to_device(a) for a in random_batch(batch))
    opt = optim.SGD(model, lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    model.conv1.input_grad = False

    def step():
        train_step(model, x, labels)
        opt.step()

    return step


def torch_step_fn(depth, survival_probs, batch=BATCH, device="cpu"):
    """The same step in PyTorch (:func:`~minisd.bench.torch_resnet.torch_resnet`), on the same images."""
    torch = import_torch()
    model, opt = torch_resnet(depth, survival_probs, device=device)
    x, labels = (torch.from_numpy(a).to(device) for a in random_batch(batch))

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), labels).backward()
        opt.step()

    return step


def interleaved(steps: dict, rounds: int, warmup: int = 1, settle: float = 0.05) -> dict:
    """Run the step functions in turn, ``rounds`` times (after ``warmup`` untimed rounds); returns
    {name: [seconds of each timed round]}.

    The order rotates from round to round (round r starts with the r-th contender), and every
    step starts after a ``settle`` pause. Why: after a step, its thread pools keep their cores busy
    for a while (OpenMP and OpenBLAS workers spin-wait before they sleep), which slows whatever
    runs next; in a fixed order that cost always lands on the same contender (docs/performance.md,
    "Benchmarks", has the measured case).
    """
    times = {name: [] for name in steps}
    names = list(steps)
    for r in range(warmup + rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            time.sleep(settle)
            t0 = time.perf_counter()
            steps[name]()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def median_time(fn, reps):
    """Median seconds of ``reps`` calls of ``fn``, after one untimed call."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)
