"""One training step of the CIFAR ResNets on the GPU (CuPy), beside PyTorch on CUDA when it can run.

One step = forward, softmax cross-entropy, backward, SGD update, on a batch that already lives on
the device. Each depth runs with constant depth and with the paper's linear decay (to p_L = 0.5 by default).
Timing: :data:`WARMUP` untimed steps first (CuPy compiles its kernels on first use, and the memory
pool fills), then every step is timed on its own between CUDA events recorded on the current
stream, after a device synchronisation; the median and quartiles are reported. PyTorch: the same
network (:func:`~minisd.bench.torch_resnet.torch_resnet`), TF32 off (CuPy's float32 products do not
use it either), cuDNN autotuning on.
"""
from __future__ import annotations

import statistics
import time

from minisd import backend, models
from minisd.bench.timing import BATCH, DEPTHS, ROUNDS, minisd_step_fn, torch_step_fn
from minisd.bench.torch_resnet import import_torch

__all__ = ["WARMUP", "gpu_table"]

WARMUP = 3  # untimed steps before the timed ones


class _Timer:
    """Milliseconds of one step: CUDA events on the GPU, perf_counter around synchronisations else."""

    def __init__(self, cuda_module=None, synchronize=None):
        self.cuda = cuda_module  # cupy.cuda or torch.cuda, or None
        self.synchronize = synchronize or (lambda: None)

    def time(self, step) -> float:
        self.synchronize()
        if self.cuda is not None:
            start, end = self._event(), self._event()
            start.record()
            step()
            end.record()
            end.synchronize()
            return self._elapsed(start, end)
        t0 = time.perf_counter()
        step()
        self.synchronize()
        return (time.perf_counter() - t0) * 1e3

    def _event(self):
        # PyTorch's CUDA events keep no time unless asked (enable_timing=False by default, and
        # elapsed_time then raises); CuPy's keep it by default and take no such argument.
        if self.cuda.__name__.startswith("torch"):
            return self.cuda.Event(enable_timing=True)
        return self.cuda.Event()

    def _elapsed(self, start, end) -> float:
        if hasattr(start, "elapsed_time"):  # torch.cuda.Event
            return float(start.elapsed_time(end))
        return float(self.cuda.get_elapsed_time(start, end))  # cupy.cuda


def _summary(times) -> dict:
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median": statistics.median(times), "q1": q[0], "q3": q[2]}


def _time_steps(step, timer, rounds) -> dict:
    for _ in range(WARMUP):
        timer.time(step)
    return _summary([timer.time(step) for _ in range(rounds)])


def _time_minisd(depth, schedule, final_survival, rounds, batch, timer) -> dict:
    backend.seed(0)
    model = models.resnet_cifar(depth=depth, schedule=schedule, final_survival=final_survival, seed=0)
    model.train()
    step = minisd_step_fn(model, batch)
    active = []

    def counted():
        step()
        active.append(sum(not b.branch_skipped for b in model.blocks))

    result = _time_steps(counted, timer, rounds)
    result["active"] = statistics.mean(active[WARMUP:])
    result["blocks"] = len(model.blocks)
    return result


def _torch_on_cuda(use_torch):
    """(torch, None) ready to time on CUDA, or (None, why not)."""
    if not use_torch:
        return None, "skipped (--no-torch)"
    torch = import_torch()
    if torch is None:
        return None, "PyTorch is not installed"
    if not torch.cuda.is_available():
        return None, "PyTorch sees no GPU"
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch, None


def gpu_table(depths=DEPTHS, rounds=ROUNDS, batch=BATCH, backend_name="cupy", use_torch=True, final_survival=0.5,
              out=print):
    """Median step times (ms, with quartiles) of each depth, constant and stochastic depth, on
    ``backend_name`` ("numpy" only to try the table on a CPU); returns the rows.

    Raises :class:`minisd.backend.BackendUnavailable` (before timing anything) without CuPy or a
    usable GPU. The backend in force before comes back afterwards.
    """
    previous = backend.name()
    xp = backend.use(backend_name)
    try:
        if backend_name == "cupy":
            props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
            device = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
            timer = _Timer(xp.cuda, backend.synchronize)
        else:
            device, timer = "CPU (NumPy)", _Timer(None, backend.synchronize)
        torch, torch_reason = _torch_on_cuda(use_torch)
        out(f"\nminisd {backend_name} on {device}; one SGD step, batch {batch}, 3x32x32, float32; median of "
            f"{rounds} after {WARMUP} warm-up steps (ms, [q1, q3])")
        if torch is None:
            out(f"PyTorch comparison: {torch_reason}")
        header = f"{'network':<11} {'schedule':<17} {'active':>9} {'minisd ms':>22}"
        if torch is not None:
            header += f" {'PyTorch ms':>22} {'ratio':>7}"
        out(header)
        rows = []
        for depth in depths:
            constant_ms = None
            for schedule, label in (("none", "constant depth"), ("linear", f"linear to {final_survival}")):
                r = _time_minisd(depth, schedule, final_survival, rounds, batch, timer)
                r.update(depth=depth, schedule=schedule)
                cell = f"{r['median']:9.2f} [{r['q1']:.1f}, {r['q3']:.1f}]"
                line = f"ResNet-{depth:<4} {label:<17} {r['active']:5.1f}/{r['blocks']:<3} {cell:>22}"
                if torch is not None:
                    probs = models.resnet_cifar(depth=depth, schedule=schedule, final_survival=final_survival).survival_probs
                    step = torch_step_fn(depth, probs, batch, device="cuda")
                    t = _time_steps(step, _Timer(torch.cuda, torch.cuda.synchronize), rounds)
                    r["torch"] = t
                    tcell = f"{t['median']:9.2f} [{t['q1']:.1f}, {t['q3']:.1f}]"
                    line += f" {tcell:>22} {r['median'] / t['median']:7.2f}"
                if constant_ms is None:
                    constant_ms = r["median"]
                else:
                    line += f"   ({r['median'] / constant_ms:.2f}x the constant-depth time)"
                out(line)
                rows.append(r)
        return rows
    finally:
        backend.use(previous)
