"""Per-layer forward and backward time and GFLOP/s for the ResNet-20 shapes (PyTorch beside, if installed).

    python benchmarks/layers.py [--batch-size 128] [--reps 9] [--threads 2] [--no-torch]
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
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()
    print(bench.set_threads(args.threads))
    bench.layer_table(args.batch_size, args.reps, use_torch=not args.no_torch)


if __name__ == "__main__":
    main()
