#!/usr/bin/env python
"""Time one training step of the CIFAR ResNets on the GPU (CuPy), beside PyTorch when it can run.

    python benchmarks/gpu_step.py                        # ResNet-20/56/110, batch 128, 32x32
    python benchmarks/gpu_step.py --depths 20 --repeats 5
    python benchmarks/gpu_step.py --backend numpy --batch 16 --depths 20   # a CPU sanity run

The logic lives in minisd/bench.py (:func:`minisd.bench.gpu_main`, whose docstring says how it
times); this is its entry point. Without a usable GPU (or without CuPy) it prints one line saying
which is missing and exits with status 2.
"""
import sys

from minisd.bench import gpu_main

if __name__ == "__main__":
    sys.exit(gpu_main())
