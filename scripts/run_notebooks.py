"""Execute every notebook in notebooks/ and store it with its outputs, in place.

    python scripts/run_notebooks.py                 # all notebooks, written back with outputs
    python scripts/run_notebooks.py 04 05           # only those whose file name starts with 04 or 05
    python scripts/run_notebooks.py --check         # execute, fail on any error, write nothing
    python scripts/run_notebooks.py --quick         # the small setting the test suite uses; writes nothing

Each notebook runs in a fresh kernel (the default ``python3`` kernel of this environment), with
notebooks/ as its working directory and matplotlib's inline backend. Prints the run time of each;
exits with status 1 if a notebook raises (a failed assertion included: the notebooks assert what
their text claims).

The setting: a notebook that trains reads ``MINISD_NOTEBOOK_QUICK``; "1" asks for the small setting
(fewer epochs, seeds and timed steps) that keeps each notebook under two minutes in CI. Stored
outputs always come from the full setting: this script sets the variable for the kernel itself
(unset, unless --quick). Notebook 8's full setting trains for about half an hour, hence the long
default timeout per cell.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")


def notebook_paths(prefixes=()) -> list[str]:
    """The notebooks in teaching order (their file names start with a number)."""
    names = sorted(n for n in os.listdir(NOTEBOOKS) if n.endswith(".ipynb") and n[:1].isdigit())
    if prefixes:
        names = [n for n in names if n.startswith(tuple(prefixes))]
    return [os.path.join(NOTEBOOKS, n) for n in names]


QUICK_VARIABLE = "MINISD_NOTEBOOK_QUICK"


def execute(path: str, timeout: int = 3600, quick: bool = False):
    """Run one notebook in a fresh kernel; returns (the executed notebook, seconds).

    quick: run in the small setting (the kernel sees MINISD_NOTEBOOK_QUICK=1), as the tests do.
    """
    import nbformat  # noqa: PLC0415
    from nbclient import NotebookClient  # noqa: PLC0415

    nb = nbformat.read(path, as_version=4)
    env_backend = os.environ.pop("MPLBACKEND", None)  # let the kernel use the inline backend
    env_quick = os.environ.pop(QUICK_VARIABLE, None)  # the kernel inherits this process's environment
    if quick:
        os.environ[QUICK_VARIABLE] = "1"
    try:
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": os.path.dirname(path)}})
        t0 = time.perf_counter()
        client.execute()
        seconds = time.perf_counter() - t0
    finally:
        if env_backend is not None:
            os.environ["MPLBACKEND"] = env_backend
        os.environ.pop(QUICK_VARIABLE, None)
        if env_quick is not None:
            os.environ[QUICK_VARIABLE] = env_quick
    return nb, seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prefixes", nargs="*", help="run only notebooks whose name starts with one of these")
    parser.add_argument("--check", action="store_true", help="execute only; do not write the outputs back")
    parser.add_argument("--quick", action="store_true",
                        help=f"the small setting the tests use ({QUICK_VARIABLE}=1); implies --check")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds allowed per cell (default 3600)")
    args = parser.parse_args(argv)
    args.check = args.check or args.quick

    import nbformat  # noqa: PLC0415
    from nbclient.exceptions import CellExecutionError  # noqa: PLC0415

    failed = []
    for path in notebook_paths(args.prefixes):
        name = os.path.basename(path)
        try:
            nb, seconds = execute(path, args.timeout, quick=args.quick)
        except CellExecutionError as exc:
            failed.append(name)
            print(f"FAILED {name}\n{exc}", file=sys.stderr)
            continue
        if not args.check:
            nbformat.write(nb, path)
        print(f"{name:<40} {seconds:6.1f} s{'' if args.check else '  (written with outputs)'}", flush=True)
    if failed:
        print(f"{len(failed)} notebook(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
