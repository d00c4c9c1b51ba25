"""Record what every layer did in forward and backward, for teaching.

::

    from minisd import trace
    with trace.record(model) as t:           # keep_arrays=True also keeps copies of the arrays
        loss, logits = train_step(model, x, labels)   # minisd.training.train_step
    print(t.table())                          # one line per layer call, forward then backward
    t.events                                  # the same as a list of Event objects

To walk a trace one event at a time, with pictures, use :class:`minisd.stepper.Stepper`
(``Stepper(t).step()``); the figures live in :mod:`minisd.plots`. This module knows nothing of either
(they import it, never the other way round), so recording needs no matplotlib.

How it works: on entry, every module of the tree (``model.named_modules()``) gets its ``forward``
and ``backward`` replaced *on the instance* by a small wrapper that calls the original and measures
what went in and what came out. On exit the instance attributes are deleted again, so the class
methods are used as before: with no trace active nothing is wrapped, and recording costs nothing.

What one :class:`Event` holds (``in`` and ``out`` are what came into and what went out of the call):

* forward:  ``in`` = the input activation x, ``out`` = the output activation y;
* backward: ``in`` = the incoming gradient dL/dy, ``out`` = the outgoing gradient dL/dx.

For each: shape, L2 norm, mean and standard deviation (computed in float64). Also the time the
call took (children included, the trace's own bookkeeping excluded), and for residual blocks the
gate (``"kept"``, ``"dropped"``, or in row mode ``"rows"`` with the fraction of kept samples) and
whether the branch was skipped. Events are listed in the order the calls *started*, so a block
comes before the layers inside it.

The numbers are read back to the host here (``float(...)``), one small transfer per statistic:
the trace is the place where the user asked for numbers. Copies of arrays (``keep_arrays=True``)
are NumPy arrays.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy

from minisd import backend, kernels
from minisd.residual import BasicBlock

__all__ = ["Event", "Place", "Trace", "record", "array_stats", "filter_events"]

PHASES = ("forward", "backward")


@dataclass
class Event:
    """One call of one module's forward or backward."""

    index: int                    # position in the trace (order in which calls started)
    name: str                     # dotted name from model.named_modules(); "" is the traced module itself
    kind: str                     # class name: Conv2d, BatchNorm2d, BasicBlock, ...
    phase: str                    # "forward" or "backward"
    depth: int                    # nesting level (0: the model, 1: its children, ...)
    is_leaf: bool                 # a module without sub-modules
    block: int | None = None      # l = 1..L of the residual block the call belongs to (None outside
                                  # blocks): the paper's numbering, p_l = 1 - l/L (1 - p_L)
    in_shape: tuple = ()
    out_shape: tuple = ()
    in_norm: float = math.nan
    in_mean: float = math.nan
    in_std: float = math.nan
    out_norm: float = math.nan
    out_mean: float = math.nan
    out_std: float = math.nan
    seconds: float = math.nan     # wall time of the call, children included, bookkeeping excluded
    gate: str | None = None       # blocks: "kept", "dropped", "rows" (row mode), "eval" (no gate)
    kept_fraction: float | None = None  # blocks: 1.0 kept, 0.0 dropped, row mode: share of kept samples
    skipped: bool | None = None   # blocks: True if the branch did not run (and is not differentiated)
    relu_skipped: bool | None = None  # blocks: True if the output ReLU was skipped too (x >= 0 known)
    survival_prob: float | None = None
    grad_norm: float | None = None  # backward of a module with parameters: norm of its own grads after
    kernels: str = ""             # the kernel tier that ran this call: "fast" or "reference" (kernels.running)
    in_array: numpy.ndarray | None = field(default=None, repr=False)   # keep_arrays=True only
    out_array: numpy.ndarray | None = field(default=None, repr=False)  # keep_arrays=True only

    @property
    def label(self) -> str:
        """The dotted name, or the class name in brackets for the traced module itself, e.g. "(ResNetCifar)"."""
        return self.name or f"({self.kind})"

    @property
    def is_block(self) -> bool:
        return self.kind == "BasicBlock"

    @property
    def dropped(self) -> bool:
        """A residual block whose branch was dropped: for the whole batch, or (row mode) for some samples."""
        return self.gate == "dropped" or (self.gate == "rows" and (self.kept_fraction or 0.0) < 1.0)

    def as_dict(self, arrays: bool = False) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if arrays or not k.endswith("_array")}
        d["label"] = self.label
        return d

    @property
    def where(self) -> str:
        """The module and, inside a residual block, the block's number: "block l = 26: layer3.7.branch.0"."""
        return f"block l = {self.block}: {self.label}" if self.block is not None else self.label

    def describe(self) -> str:
        """A few lines in words: what went in and out, and for a residual block what its gate did."""
        what_in, what_out = (("input x", "output y") if self.phase == "forward"
                             else ("incoming grad dL/dy", "outgoing grad dL/dx"))
        lines = [f"{self.phase} {self.where}  ({self.kind})"]
        if self.gate is not None:
            lines.append("    " + _gate_sentence(self))
        lines.append(f"    {what_in:<20} shape {str(self.in_shape):<18} norm {self.in_norm:10.4g}  "
                     f"mean {self.in_mean:+.3e}  std {self.in_std:.3e}")
        lines.append(f"    {what_out:<20} shape {str(self.out_shape):<18} norm {self.out_norm:10.4g}  "
                     f"mean {self.out_mean:+.3e}  std {self.out_std:.3e}")
        extra = f"    time {self.seconds * 1e3:.3f} ms"
        if self.grad_norm is not None:
            extra += f"; norm of this layer's parameter gradients {self.grad_norm:.4g}"
        lines.append(extra)
        return "\n".join(lines)


def _gate_sentence(e: Event) -> str:
    """The gate of a block event, and what it meant for this phase, in one line."""
    p = f" (p = {e.survival_prob:.3f})" if e.survival_prob is not None else ""
    if e.gate == "eval":
        return f"evaluation mode{p}: no gate; the branch ran, scaled by its survival probability"
    if e.gate == "kept":
        return f"gate: kept{p}; the branch ran" + (" and is differentiated" if e.phase == "backward" else "")
    if e.gate == "dropped":
        if e.relu_skipped:  # x is a ReLU output (x >= 0), so ReLU(shortcut(x)) = shortcut(x)
            if e.phase == "forward":
                return f"gate: DROPPED{p}; branch SKIPPED: y = shortcut(x) (x >= 0, so the output ReLU is a no-op)"
            return f"gate: DROPPED{p}; branch SKIPPED: the gradient reaches x through the shortcut only"
        if e.phase == "forward":
            return f"gate: DROPPED{p}; branch SKIPPED: y = ReLU(shortcut(x))"
        return (f"gate: DROPPED{p}; branch SKIPPED: the gradient reaches x through the ReLU mask "
                "and the shortcut only")
    fraction = f"{e.kept_fraction:.0%}" if e.kept_fraction is not None else "?"
    skipped = "; branch SKIPPED (every sample dropped)" if e.skipped else ""
    return f"gate: one per sample, {fraction} of the samples kept{p}{skipped}"


def array_stats(a) -> tuple[float, float, float]:
    """(L2 norm, mean, std) of an array, in float64, read back to Python floats."""
    if a is None or not hasattr(a, "dtype") or a.size == 0:
        return math.nan, math.nan, math.nan
    xp = backend.array_module(a)
    v = a.astype(xp.float64)  # keeps the memory order (no copy into NCHW order needed)
    # Element-wise square and sum rather than a dot product: no BLAS call, no flattening copy.
    return math.sqrt(float((v * v).sum())), float(v.mean()), float(v.std())


def _sync(a) -> None:
    """Wait for the GPU, so that a timing covers the work and not only its launch."""
    if backend.is_device_array(a):
        backend.array_module(a).cuda.get_current_stream().synchronize()


def _block_gate(module) -> dict:
    """Gate, kept fraction, skipped flag and p of a residual block after its forward."""
    gate = module.gate
    if gate is None:
        label, fraction = "eval", None
    elif isinstance(gate, (bool, numpy.bool_)):
        label, fraction = ("kept" if gate else "dropped"), float(bool(gate))
    else:
        fraction = float(numpy.mean(gate))
        label = "rows"
    return dict(gate=label, kept_fraction=fraction, skipped=bool(module.branch_skipped),
                relu_skipped=bool(module.output_relu_skipped),
                survival_prob=float(module.survival_prob))


def filter_events(events, which: str) -> list[Event]:
    """The events of a view: "all", "layers" (leaf modules, which compute, and the residual blocks,
    where the gate is) or "blocks" (residual blocks only)."""
    if which == "all":
        return list(events)
    if which == "layers":
        return [e for e in events if e.is_leaf or e.is_block]
    if which == "blocks":
        return [e for e in events if e.is_block]
    raise ValueError(f"trace: which must be 'all', 'layers' or 'blocks', got {which!r}")


class Place(NamedTuple):
    """Where an event happened in a residual network, for pictures of the network.

    region: "stem" (layers before the first residual block), "block", "head" (layers after the
    last block), "stage" (a container of blocks, e.g. "layer2") or "model" (the traced module). block: index into ``model.blocks`` (None
    outside blocks). part: inside a block, "block" (the block's own call), "branch" or "shortcut".
    """

    region: str
    block: int | None = None
    part: str | None = None


class Trace:
    """The events of one recording. Build it with :func:`record`."""

    def __init__(self, model, keep_arrays: bool = False):
        self.model = model
        self.keep_arrays = bool(keep_arrays)
        self.events: list[Event] = []
        self.names = {id(m): n for n, m in model.named_modules()}
        # l = 1..L for every module inside a residual block (the block itself included), from the
        # order of model.blocks: a name belongs to the block whose name is its longest prefix.
        number = {name: l for l, name in enumerate(self.block_names, start=1)}
        self.block_of = {}
        for n in self.names.values():
            parts = n.split(".") if n else []
            prefixes = (".".join(parts[:k]) for k in range(len(parts), -1, -1))
            self.block_of[n] = next((number[p] for p in prefixes if p in number), None)
        self._depth = 0
        self._overhead = 0.0  # seconds spent in bookkeeping, subtracted from the parents' times
        self._installed: list = []
        self.active = False

    # ---- recording ----------------------------------------------------------------------------

    def _wrap(self, module, name: str, phase: str):
        original = getattr(module, phase)  # the bound method (or a wrapper already there)
        trace = self
        depth_of = name.count(".") + 1 if name else 0
        leaf = not module._modules

        def wrapped(arg):
            if not trace.active:
                return original(arg)
            start_bookkeeping = time.perf_counter()
            event = Event(index=len(trace.events), name=name, kind=type(module).__name__, phase=phase,
                          depth=depth_of, is_leaf=leaf, block=trace.block_of.get(name),
                          kernels=kernels.running(arg))
            trace.events.append(event)
            event.in_shape = tuple(getattr(arg, "shape", ()))
            event.in_norm, event.in_mean, event.in_std = array_stats(arg)
            if trace.keep_arrays:
                event.in_array = numpy.array(backend.to_numpy(arg), copy=True)
            _sync(arg)
            overhead_before = trace._overhead = trace._overhead + (time.perf_counter() - start_bookkeeping)
            t0 = time.perf_counter()
            out = original(arg)
            _sync(out)
            t1 = time.perf_counter()
            event.seconds = max(0.0, (t1 - t0) - (trace._overhead - overhead_before))
            event.out_shape = tuple(getattr(out, "shape", ()))
            event.out_norm, event.out_mean, event.out_std = array_stats(out)
            if trace.keep_arrays:
                event.out_array = numpy.array(backend.to_numpy(out), copy=True)
            if isinstance(module, BasicBlock):
                for key, value in _block_gate(module).items():
                    setattr(event, key, value)
            if phase == "backward" and module.grads:
                total = sum(array_stats(g)[0] ** 2 for g in module.grads.values())
                event.grad_norm = math.sqrt(total)
            trace._overhead += time.perf_counter() - t1
            return out

        wrapped.__wrapped__ = original
        return wrapped

    def _install(self):
        for name, module in self.model.named_modules():
            for phase in PHASES:
                had = phase in module.__dict__
                previous = module.__dict__.get(phase)
                object.__setattr__(module, phase, self._wrap(module, name, phase))
                self._installed.append((module, phase, had, previous))
        self.active = True

    def _uninstall(self):
        self.active = False
        for module, phase, had, previous in reversed(self._installed):
            if had:
                object.__setattr__(module, phase, previous)
            else:
                module.__dict__.pop(phase, None)
        self._installed = []

    # ---- reading ------------------------------------------------------------------------------

    def __len__(self):
        return len(self.events)

    def __iter__(self):
        return iter(self.events)

    def __getitem__(self, index):
        return self.events[index]

    def select(self, phase: str | None = None, name: str | None = None, kind: str | None = None,
               leaves: bool | None = None, blocks: bool | None = None) -> list[Event]:
        """Events filtered by phase, exact dotted name, class name, leaf-ness or block-ness."""
        out = []
        for e in self.events:
            if phase is not None and e.phase != phase:
                continue
            if name is not None and e.name != name:
                continue
            if kind is not None and e.kind != kind:
                continue
            if leaves is not None and e.is_leaf != leaves:
                continue
            if blocks is not None and e.is_block != blocks:
                continue
            out.append(e)
        return out

    def forward(self) -> list[Event]:
        return self.select(phase="forward")

    def backward(self) -> list[Event]:
        return self.select(phase="backward")

    def find(self, name: str, phase: str = "forward") -> Event:
        """The (last) event of the module called ``name`` in ``phase``; KeyError if there is none."""
        found = self.select(phase=phase, name=name)
        if not found:
            raise KeyError(f"trace: no {phase} event for {name!r}")
        return found[-1]

    def block_events(self, phase: str = "backward") -> list[Event]:
        """One event per residual block, in the order of ``model.blocks`` (the last call of each)."""
        by_name = {e.name: e for e in self.select(phase=phase, blocks=True)}
        return [by_name[name] for name in self.block_names if name in by_name]

    @property
    def block_names(self) -> list[str]:
        """Dotted names of the residual blocks, in the order of ``model.blocks``."""
        blocks = getattr(self.model, "blocks", None)
        if blocks is None:
            blocks = [m for m in self.model.modules() if isinstance(m, BasicBlock)]
        return [self.names[id(b)] for b in blocks]

    def place(self, event: Event) -> Place:
        """Where ``event`` happened: the stem, a residual block (and which part of it), or the head."""
        names = self.block_names
        for k, block in enumerate(names):
            prefix = block + "." if block else ""
            if event.name == block:
                return Place("block", k, "block")
            if event.name.startswith(prefix):
                part = event.name[len(prefix):].split(".")[0]
                return Place("block", k, part if part in ("branch", "shortcut") else "block")
        if event.name == "" or not names:
            return Place("model")
        if any(block.startswith(event.name + ".") for block in names):
            return Place("stage")  # a container of blocks (e.g. "layer2")
        # Outside every block: before the first block in the forward order is the stem, after it the head.
        first_forward = {}
        for e in self.forward():
            first_forward.setdefault(e.name, e.index)
        first, mine = first_forward.get(names[0]), first_forward.get(event.name)
        if first is None or mine is None:
            return Place("model")
        return Place("stem" if mine < first else "head")

    @property
    def kernels(self) -> str:
        """The kernel tier that ran the recorded calls: "fast", "reference", or "mixed"."""
        tiers = {e.kernels for e in self.events}
        return tiers.pop() if len(tiers) == 1 else ("mixed" if tiers else "")

    def steps(self, which: str = "layers") -> list[Event]:
        """The events a :class:`~minisd.stepper.Stepper` with the same ``which`` walks, in order:
        step n is ``steps(which)[n - 1]``, in the stepper's text and in :meth:`table` alike."""
        return filter_events(self.events, which)

    def table(self, phase: str | None = None, which: str = "layers", max_rows: int | None = None) -> str:
        """A plain-text table, one row per event (nested names indented), under a line that names
        the kernel tier that ran them.

        which: "layers" (the layers that compute: leaf modules, plus the residual blocks where the
        gate is; the stepper's default), "all" events (containers too) or "blocks" (residual blocks
        only). The first column is the step number, as ``Stepper(t, which=...)`` numbers the same
        event (a phase filter hides rows, never renumbers them); the column ``l`` is the residual
        block (1..L, the paper's numbering) an event belongs to.
        """
        walk = self.steps("layers" if which == "blocks" else which)
        number = {id(e): n for n, e in enumerate(walk, start=1)}
        rows = [e for e in filter_events(walk, which) if phase is None or e.phase == phase]
        header = (f"{'step':>4} {'phase':<8} {'l':>3} {'layer':<28} {'kind':<16} {'in shape':<16} {'out shape':<16} "
                  f"{'|in|':>10} {'|out|':>10} {'ms':>8}  gate")
        lines = [f"kernels: {self.kernels} tier", header, "-" * len(header)]
        shown = rows if max_rows is None else rows[:max_rows]
        for e in shown:
            gate = ""
            if e.gate is not None:
                gate = e.gate if e.gate != "rows" else f"rows {e.kept_fraction:.0%}"
                gate += " (skipped)" if e.skipped else ""
            label = ("  " * max(0, e.depth - 1) + e.label)[:28]
            l = "" if e.block is None else e.block
            lines.append(f"{number[id(e)]:>4} {e.phase:<8} {l:>3} {label:<28} {e.kind[:16]:<16} {str(e.in_shape)[:16]:<16} "
                         f"{str(e.out_shape)[:16]:<16} {e.in_norm:>10.4g} {e.out_norm:>10.4g} "
                         f"{e.seconds * 1e3:>8.3f}  {gate}")
        if max_rows is not None and len(rows) > max_rows:
            lines.append(f"... {len(rows) - max_rows} more rows")
        return "\n".join(lines)

    def __str__(self):
        return self.table()

    def to_records(self) -> list[dict]:
        """The events as dicts (arrays left out)."""
        return [e.as_dict() for e in self.events]

    def to_frame(self):
        """A pandas DataFrame of the events (pandas is optional: ImportError with advice if missing)."""
        try:
            import pandas  # noqa: PLC0415
        except ImportError:
            raise ImportError("Trace.to_frame needs pandas (pip install pandas); "
                              "Trace.table() gives the same as text") from None
        return pandas.DataFrame(self.to_records())


@contextlib.contextmanager
def record(model, keep_arrays: bool = False):
    """Record every forward and backward call of ``model`` and its sub-modules inside the block.

    keep_arrays: also keep NumPy copies of each call's input and output (for the stepper's pictures;
    off by default, since it copies every activation and gradient to the host).
    """
    t = Trace(model, keep_arrays=keep_arrays)
    t._install()
    try:
        yield t
    finally:
        t._uninstall()
