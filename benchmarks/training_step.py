"""One training step of ResNet-20/56/110: the dropped-block cost, constant depth vs stochastic depth
(measured and predicted ratio), minisd vs PyTorch (if installed), where the time goes, and peak memory.

    python benchmarks/training_step.py [--depths 20 56 110] [--steps 25] [--threads 2] [--no-torch]

All models of one depth take turns step by step (interleaved), so the ratios are measured under
the same machine load; the table reports medians. The logic lives in minisd/bench.py (which also
says how the prediction is made); this script is its long-run entry point.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _threads import threads_from_argv  # noqa: E402

THREADS = threads_from_argv()

from minisd import bench  # noqa: E402  (after the thread count is set)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[20, 56, 110])
    parser.add_argument("--steps", type=int, default=25, help="interleaved rounds per depth")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--final-survival", type=float, default=0.5)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--phase-depth", type=int, default=20)
    parser.add_argument("--memory-depth", type=int, default=110)
    args = parser.parse_args()
    print(bench.set_threads(args.threads))
    bench.block_table(batch=args.batch_size)
    bench.step_table(args.depths, args.steps, args.final_survival, args.batch_size, use_torch=not args.no_torch)
    bench.phase_table(args.phase_depth, 7, args.batch_size)
    bench.memory_table(args.memory_depth, 5, args.final_survival, args.batch_size)


if __name__ == "__main__":
    main()
