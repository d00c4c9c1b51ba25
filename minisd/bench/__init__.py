"""Benchmarks: what a training step costs, against PyTorch, and what stochastic depth saves.

Every benchmark lives in this package and runs from one command, ``minisd bench [TABLE ...]``
(:func:`main`, whose parser holds the one set of defaults). The tables:

* ``blocks`` (:func:`~minisd.bench.parts.block_table`): the dropped-block cost. A residual block,
  told as in a network that its input is a ReLU output, timed forward + backward with its gate
  forced on and forced off, the two interleaved; the dropped time as a fraction of the kept time.
* ``steps`` (:func:`~minisd.bench.steps.step_table`), for each depth: constant depth, stochastic
  depth and PyTorch take turns step by step; minisd / PyTorch; SD / constant against the ratio
  predicted from the block times and the gates actually drawn; and the dropped-block cost again,
  measured inside the whole network (every block's forward + backward timed while it is dropped
  and while it is kept).
* ``layers`` (:func:`~minisd.bench.parts.layer_table`): forward and backward time and GFLOP/s of
  each ResNet-20 convolution shape, batch norm and ReLU, beside PyTorch's convolution.
* ``phases`` (:func:`~minisd.bench.steps.phase_table`): where a step of the first depth goes
  (unfolding, products, batch norm, ReLU, shortcut, the rest).
* ``memory`` (:func:`~minisd.bench.steps.memory_table`): peak memory of a step of the first depth,
  constant against stochastic depth.
* ``gpu`` (:func:`~minisd.bench.gpu.gpu_table`): the step on the GPU (CuPy), beside PyTorch on CUDA.

Modules: :mod:`~minisd.bench.timing` (threads, load, the step closures, interleaved turns),
:mod:`~minisd.bench.torch_resnet` (the PyTorch copy of the network), ``parts``, ``steps``, ``gpu``
(the tables). None of it is a test, and PyTorch is used only if it is importable (it is never a
dependency). Measured numbers are in docs/performance.md, "Benchmarks", with their commands.

How to read the numbers
-----------------------
* The machine may be shared and noisy, so every comparison is measured **in one run, interleaved**
  (the contenders take turns, step by step) and reported as medians and ratios of medians, never
  as absolute times from different runs. The load average is printed with each table.
* A step is :func:`minisd.training.train_step` (forward, loss, backward) and an SGD update
  (momentum 0.9, Nesterov, weight decay 1e-4), batch 128 of 3x32x32 float32 random images, the same
  in minisd and PyTorch (eager, NCHW).
* Threads: minisd's convolution chunks, NumPy's BLAS (through threadpoolctl) and PyTorch's intra-op
  pool get the same count (``--threads``).

The stochastic-depth prediction
-------------------------------
A step costs a fixed part (stem, head, loss, SGD) plus, for each block l, K_l when it is kept and
D_l when it is dropped (forward + backward of the whole block: branch, shortcut, residual sum,
output ReLU). So a stochastic-depth step with gates b_l should take::

    T_sd = T_const - sum_l (1 - b_l) * (K_l - D_l)

K_l is measured in the constant-depth steps of the same run and D_l in the stochastic-depth steps
(a timer around every block's forward and backward), so the prediction charges each stage its own
speed. The prediction is made round by round, with the kept-block times of that round's
constant-depth step and the gates its stochastic-depth step drew. The ``gap`` column is the median
over the rounds of (measured ratio - that round's prediction): the gate noise (which blocks happened
to run) and the load of the moment are in both sides of each difference, and what remains is the
cost model's error. (The SD/const and pred(drawn) columns are each a median over the rounds, of
rounds with different gates, so their difference is not the gap.) The expected ratio, with the
survival probabilities p_l in place of the gates, and ``E[active blocks] / L`` are printed too.
"""
from __future__ import annotations

import argparse

from minisd import backend
from minisd.bench.gpu import gpu_table
from minisd.bench.parts import BLOCK_SHAPES, block_table, layer_table
from minisd.bench.steps import memory_table, phase_table, step_table
from minisd.bench.timing import BATCH, DEPTHS, ROUNDS, minisd_step_fn, set_threads, torch_step_fn
from minisd.bench.torch_resnet import import_torch, torch_resnet

__all__ = ["TABLES", "DEFAULT_TABLES", "main", "build_parser", "set_threads", "block_table", "step_table",
           "layer_table", "phase_table", "memory_table", "gpu_table", "minisd_step_fn", "torch_step_fn",
           "torch_resnet", "BLOCK_SHAPES"]

#: Every table, in the order they run.
TABLES = ("layers", "blocks", "steps", "phases", "memory", "gpu")
DEFAULT_TABLES = ("blocks", "steps")
THREADS = 2


def _table(text):
    if text not in TABLES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(TABLES)}, got {text!r}")
    return text


def build_parser(prog="minisd bench"):
    parser = argparse.ArgumentParser(
        prog=prog, description="Time minisd's training steps, blocks and layers (and PyTorch's, if installed), "
                               "on the CPU or the GPU. Every comparison is interleaved in one run; the "
                               "package docstring (minisd/bench/__init__.py) says how to read the tables.")
    parser.add_argument("tables", nargs="*", type=_table, metavar="TABLE",
                        help=f"what to time, any of: layers (single layers of ResNet-20), blocks (a block kept "
                             f"and dropped), steps (a training step per depth), phases (where a step of the first "
                             f"depth goes), memory (its peak memory), gpu (a step per depth on CuPy); they run in "
                             f"that order (default: {' '.join(DEFAULT_TABLES)})")
    parser.add_argument("--depths", type=int, nargs="+", default=list(DEPTHS),
                        help=f"ResNet depths (6n+2) of the steps and gpu tables; phases and memory use the first "
                             f"(default: {' '.join(map(str, DEPTHS))})")
    parser.add_argument("--steps", type=int, default=ROUNDS,
                        help=f"timed rounds of every table, of which the median is reported: turns of every "
                             f"model per depth, of a block kept and dropped, calls of a layer; stochastic-depth "
                             f"steps averaged for memory (default: {ROUNDS})")
    parser.add_argument("--batch-size", type=int, default=BATCH, help=f"images per step (default: {BATCH})")
    parser.add_argument("--threads", type=int, default=THREADS,
                        help=f"threads of minisd's convolutions, NumPy's BLAS and PyTorch (default: {THREADS})")
    parser.add_argument("--final-survival", type=float, default=0.5,
                        help="p_L of the linear decay, for the stochastic-depth models (default: 0.5)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    parser.add_argument("--backend", choices=("cupy", "numpy"), default="cupy",
                        help="arrays of the gpu table: cupy (default), or numpy to try the table on a CPU")
    return parser


def main(argv=None) -> int:
    """Run the tables asked for. Raises :class:`minisd.backend.BackendUnavailable` before timing
    anything when the gpu table is asked for on a machine without CuPy or a usable GPU."""
    args = build_parser().parse_args(argv)
    tables = [t for t in TABLES if t in (args.tables or DEFAULT_TABLES)]
    if "gpu" in tables:
        previous = backend.name()
        backend.use(args.backend)  # fails here, in one line, rather than after the CPU tables
        backend.use(previous)
    print(set_threads(args.threads))
    use_torch = not args.no_torch
    if use_torch and import_torch() is None:
        print("PyTorch not importable: no PyTorch comparison")
    first = args.depths[0]
    if "layers" in tables:
        layer_table(args.steps, args.batch_size, use_torch)
    if "blocks" in tables:
        block_table(args.steps, args.batch_size)
    if "steps" in tables:
        step_table(args.depths, args.steps, args.final_survival, args.batch_size, use_torch)
    if "phases" in tables:
        phase_table(first, args.steps, args.batch_size)
    if "memory" in tables:
        memory_table(first, args.steps, args.final_survival, args.batch_size)
    if "gpu" in tables:
        gpu_table(args.depths, args.steps, args.batch_size, args.backend, use_torch, args.final_survival)
    return 0
