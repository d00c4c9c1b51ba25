"""Run the exercise notebooks in notebooks/exercises/: unsolved, solved, or handed to minisd.

    python scripts/run_exercises.py            # execute each unsolved and store it with its outputs
                                               # (what a student opens: every check says what to do)
    python scripts/run_exercises.py --check    # run each three times, write nothing:
                                               #   solved: every check must pass;
                                               #   unsolved: every check fails with its message, no cell raises;
                                               #   delegated: every check of a delegated function fails with
                                               #   "minisd's own ...; write it yourself", the others pass
    python scripts/run_exercises.py --check --only 05   # notebooks whose names start with 05

The instructor key lives in instructor/, apart from the students' files: instructor/solutions/ (one
.py file per notebook, same name, the reference solution of every exercise cell) and
instructor/delegations/ (answers that hand the work to minisd's own code, for CI: a checker that
lets one pass grades nothing). A small preprocessor of our own puts them in: every code cell tagged
``exercise`` is replaced by the source of the functions it defines, taken from the file (a
delegation file may leave a function out: the solution's is used). Why not nbgrader: it brings a
database, a course directory layout, its own cell metadata and a Jupyter extension, to do what
this file does in a few lines; and plain .py solutions can be read, linted and imported by the
tests directly.
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXERCISES = os.path.join(ROOT, "notebooks", "exercises")
INSTRUCTOR = os.path.join(ROOT, "instructor")
SOLUTIONS = os.path.join(INSTRUCTOR, "solutions")
DELEGATIONS = os.path.join(INSTRUCTOR, "delegations")
STATES = ("solved", "unsolved", "delegated")
DELEGATED = "minisd's own"


def notebook_paths() -> list[str]:
    """The exercise notebooks in teaching order (their file names start with a number)."""
    names = sorted(n for n in os.listdir(EXERCISES) if n.endswith(".ipynb") and n[:1].isdigit())
    return [os.path.join(EXERCISES, n) for n in names]


def solution_path(path: str, folder: str = SOLUTIONS) -> str:
    return os.path.join(folder, os.path.splitext(os.path.basename(path))[0] + ".py")


def read(path: str):
    import nbformat  # noqa: PLC0415

    return nbformat.read(path, as_version=4)


def _defined_functions(source: str) -> list[str]:
    return [node.name for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)]


def _definitions(path: str) -> tuple[dict, list]:
    """{name: source} of the top-level functions and assignments of a .py file, and its imports."""
    source = open(path, encoding="utf-8").read()
    tree = ast.parse(source)
    defined = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            defined[node.name] = ast.get_source_segment(source, node)
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            defined[node.targets[0].id] = ast.get_source_segment(source, node)
    imports = [ast.get_source_segment(source, node) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    return defined, imports


def delegated_functions(path: str) -> list[str]:
    """The functions of a notebook that its delegation file hands to minisd (none without a file)."""
    file = solution_path(path, DELEGATIONS)
    return list(_definitions(file)[0]) if os.path.exists(file) else []


def fill_in(nb, path: str, state: str = "solved"):
    """The notebook with each ``exercise`` cell replaced by the reference solution of its functions
    (``state="delegated"``: by the delegation where there is one), plus the file's imports."""
    functions, imports = _definitions(solution_path(path))
    if state == "delegated":
        delegations, delegation_imports = _definitions(solution_path(path, DELEGATIONS))
        functions = {**functions, **delegations}
        imports = imports + delegation_imports
    for cell in nb.cells:
        if cell.cell_type != "code" or "exercise" not in cell.metadata.get("tags", []):
            continue
        names = _defined_functions(cell.source)
        missing = [n for n in names if n not in functions]
        if not names or missing:
            raise ValueError(f"{os.path.basename(path)}: no reference solution for {missing or 'an exercise cell'} "
                             f"in {solution_path(path)}")
        cell.source = "\n".join(dict.fromkeys(imports)) + "\n\n\n" + "\n\n\n".join(functions[n] for n in names)
    return nb


def execute(path: str, solved: bool = False, timeout: int = 300, state: str | None = None):
    """Run one exercise notebook in a fresh kernel; returns the executed notebook. state: "unsolved"
    (as stored), "solved" or "delegated" (default: from ``solved``). Errors in cells are kept as
    outputs, not raised."""
    from nbclient import NotebookClient  # noqa: PLC0415

    state = state or ("solved" if solved else "unsolved")
    nb = read(path)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)  # no timestamps: a re-run changes only what changed
    if state != "unsolved":
        nb = fill_in(nb, path, state)
    env_backend = os.environ.pop("MPLBACKEND", None)
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=True, record_timing=False,
                       resources={"metadata": {"path": os.path.dirname(path)}}).execute()
    finally:
        if env_backend is not None:
            os.environ["MPLBACKEND"] = env_backend
    return nb


def execute_together(paths, state: str, timeout: int = 600) -> dict:
    """Run several exercise notebooks one after another in ONE fresh kernel (each notebook's cells
    define their functions before their checks use them, so a later notebook never sees an earlier
    one's answers); returns {path: that notebook with its outputs}. One kernel start instead of one
    per notebook: what keeps the tests' three runs of every notebook quick."""
    import nbformat  # noqa: PLC0415
    from nbclient import NotebookClient  # noqa: PLC0415

    parts = {path: fill_in(read(path), path, state) if state != "unsolved" else read(path) for path in paths}
    combined = nbformat.v4.new_notebook(cells=[cell for nb in parts.values() for cell in nb.cells])
    combined.metadata = next(iter(parts.values())).metadata
    env_backend = os.environ.pop("MPLBACKEND", None)
    try:
        NotebookClient(combined, timeout=timeout, kernel_name="python3", allow_errors=True, record_timing=False,
                       resources={"metadata": {"path": EXERCISES}}).execute()
    finally:
        if env_backend is not None:
            os.environ["MPLBACKEND"] = env_backend
    executed, start = {}, 0
    for path, nb in parts.items():
        nb.cells = combined.cells[start:start + len(nb.cells)]
        start += len(nb.cells)
        executed[path] = nb
    return executed


def check_cells(nb) -> list[tuple[list[str], str]]:
    """(names of the functions a ``check`` cell passes to its checker, the text it showed)."""
    found = []
    for cell in nb.cells:
        if "check" not in cell.metadata.get("tags", []):
            continue
        names = [n.id for node in ast.walk(ast.parse(cell.source)) if isinstance(node, ast.Call)
                 for n in node.args if isinstance(n, ast.Name)]
        parts = []
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                parts.append(output.get("text", ""))
            elif "text/plain" in output.get("data", {}):
                parts.append(output["data"]["text/plain"])
        found.append((names, "".join(parts)))
    return found


def check_outcomes(nb) -> list[str]:
    """The text each ``check`` cell showed (a checker's report)."""
    return [text for _, text in check_cells(nb)]


def problems_in(nb, path: str, state: str) -> list[str]:
    """What is wrong with an executed notebook in that state (empty: as it should be)."""
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    found = [f"{e.get('ename')}: {e.get('evalue')}" for e in errors]
    cells = check_cells(nb)
    if not cells:
        return found + ["no check output"]
    delegated = set(delegated_functions(path))
    for names, text in cells:
        first = (text.splitlines() or ["(no output)"])[0]
        if state == "solved" or (state == "delegated" and not delegated & set(names)):
            ok = ": PASSED" in first
        elif state == "unsolved":
            ok = "NOT PASSED" in first and "is not written yet" in text
        else:
            ok = "NOT PASSED" in first and DELEGATED in first and "write it yourself" in first
        if not ok:
            found.append(first)
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="run solved, unsolved and delegated; write nothing")
    parser.add_argument("--only", default="", help="only the notebooks whose file names start with this")
    args = parser.parse_args(argv)

    import nbformat  # noqa: PLC0415

    problems = []
    for path in notebook_paths():
        name = os.path.basename(path)
        if not name.startswith(args.only):
            continue
        states = [s for s in STATES if s != "delegated" or delegated_functions(path)] if args.check else ["unsolved"]
        for state in states:
            t0 = time.perf_counter()
            nb = execute(path, state=state)
            found = problems_in(nb, path, state)
            if found:
                problems.append(f"{name} ({state}): " + "; ".join(found))
            if not args.check:
                nbformat.write(nb, path)
            print(f"{name:<40} {state:<9} {time.perf_counter() - t0:5.1f} s  "
                  f"{len(check_cells(nb))} checks{'' if args.check else ' (written with outputs)'}", flush=True)
    for problem in problems:
        print("FAILED", problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
