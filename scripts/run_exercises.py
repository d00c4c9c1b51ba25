"""Run the exercise notebooks in notebooks/exercises/, unsolved or with the reference solutions.

    python scripts/run_exercises.py            # execute each unsolved and store it with its outputs
                                               # (what a student opens: every check says what to do)
    python scripts/run_exercises.py --check    # run each twice, write nothing: solved, every check
                                               # must pass; unsolved, every check must fail with its
                                               # message and no cell may raise

Solutions are kept out of the notebooks, in tests/exercise_solutions/ (one .py file per notebook,
same name). A small preprocessor of our own puts them in: every code cell tagged ``exercise`` is
replaced by the source of the functions it defines, taken from the solution file. Why not nbgrader:
it brings a database, a course directory layout, its own cell metadata and a Jupyter extension, to
do what this file does in a few lines; and plain .py solutions can be read, linted and imported by
the tests directly.
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXERCISES = os.path.join(ROOT, "notebooks", "exercises")
SOLUTIONS = os.path.join(ROOT, "tests", "exercise_solutions")


def notebook_paths() -> list[str]:
    """The exercise notebooks in teaching order (their file names start with a number)."""
    names = sorted(n for n in os.listdir(EXERCISES) if n.endswith(".ipynb") and n[:1].isdigit())
    return [os.path.join(EXERCISES, n) for n in names]


def solution_path(path: str) -> str:
    return os.path.join(SOLUTIONS, os.path.splitext(os.path.basename(path))[0] + ".py")


def read(path: str):
    import nbformat  # noqa: PLC0415

    return nbformat.read(path, as_version=4)


def _defined_functions(source: str) -> list[str]:
    return [node.name for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)]


def fill_in(nb, path: str):
    """The notebook with each ``exercise`` cell replaced by the reference solution of its functions
    (plus the solution file's imports, so the cell runs on its own)."""
    source = open(solution_path(path), encoding="utf-8").read()
    tree = ast.parse(source)
    functions = {node.name: ast.get_source_segment(source, node) for node in tree.body
                 if isinstance(node, ast.FunctionDef)}
    imports = [ast.get_source_segment(source, node) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    for cell in nb.cells:
        if cell.cell_type != "code" or "exercise" not in cell.metadata.get("tags", []):
            continue
        names = _defined_functions(cell.source)
        missing = [n for n in names if n not in functions]
        if not names or missing:
            raise ValueError(f"{os.path.basename(path)}: no reference solution for {missing or 'an exercise cell'} "
                             f"in {solution_path(path)}")
        cell.source = "\n".join(imports) + "\n\n\n" + "\n\n\n".join(functions[n] for n in names)
    return nb


def execute(path: str, solved: bool = False, timeout: int = 300):
    """Run one exercise notebook in a fresh kernel (with the solutions filled in if ``solved``);
    returns the executed notebook. Errors in cells are kept as outputs, not raised."""
    from nbclient import NotebookClient  # noqa: PLC0415

    nb = read(path)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)  # no timestamps: a re-run changes only what changed
    if solved:
        nb = fill_in(nb, path)
    env_backend = os.environ.pop("MPLBACKEND", None)
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=True, record_timing=False,
                       resources={"metadata": {"path": os.path.dirname(path)}}).execute()
    finally:
        if env_backend is not None:
            os.environ["MPLBACKEND"] = env_backend
    return nb


def check_outcomes(nb) -> list[str]:
    """The text each ``check`` cell showed (a checker's report)."""
    texts = []
    for cell in nb.cells:
        if "check" not in cell.metadata.get("tags", []):
            continue
        parts = []
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                parts.append(output.get("text", ""))
            elif "text/plain" in output.get("data", {}):
                parts.append(output["data"]["text/plain"])
        texts.append("".join(parts))
    return texts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="run solved and unsolved; write nothing")
    args = parser.parse_args(argv)

    import nbformat  # noqa: PLC0415

    problems = []
    for path in notebook_paths():
        name = os.path.basename(path)
        for solved in ((True, False) if args.check else (False,)):
            t0 = time.perf_counter()
            nb = execute(path, solved=solved)
            outcomes = check_outcomes(nb)
            errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
            want = ": PASSED" if solved else "NOT PASSED"
            bad = [t.splitlines()[0] if t else "(no output)" for t in outcomes if want not in (t.splitlines() or [""])[0]]
            state = "solved" if solved else "unsolved"
            if errors or bad or not outcomes:
                problems.append(f"{name} ({state}): " + "; ".join(
                    [f"{e.get('ename')}: {e.get('evalue')}" for e in errors] + bad or ["no check output"]))
            if not args.check:
                nbformat.write(nb, path)
            print(f"{name:<40} {state:<9} {time.perf_counter() - t0:5.1f} s  "
                  f"{len(outcomes)} checks{'' if args.check else ' (written with outputs)'}", flush=True)
    for problem in problems:
        print("FAILED", problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
