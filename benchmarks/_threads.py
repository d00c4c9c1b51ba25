"""Set the BLAS thread count before NumPy is imported (read from --threads, default 2)."""
import os
import sys


def threads_from_argv(default: int = 2) -> int:
    argv = sys.argv[1:]
    threads = default
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            threads = int(argv[i + 1])
        elif arg.startswith("--threads="):
            threads = int(arg.split("=", 1)[1])
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(threads))
    return threads
