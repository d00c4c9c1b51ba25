"""Every notebook runs headless from top to bottom without an error (as scripts/run_notebooks.py does),
and asserts what its text claims.

The notebooks are executed in a fresh kernel each, in the quick setting (MINISD_NOTEBOOK_QUICK=1:
fewer epochs, seeds and timed steps), and nothing is written back. Each is meant to run in under
two minutes on a two-core laptop in that setting. The stored outputs come from the full setting.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import re

import pytest

pytest.importorskip("nbclient")
pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("run_notebooks", os.path.join(ROOT, "scripts", "run_notebooks.py"))
run_notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_notebooks)

PATHS = run_notebooks.notebook_paths()


def _cells(path):
    import nbformat

    return nbformat.read(path, as_version=4).cells


def _assertions(source: str) -> int:
    """Number of assert statements in a code cell (IPython magics and shell lines skipped)."""
    code = "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())
    return sum(isinstance(node, ast.Assert) for node in ast.walk(ast.parse(code)))


def _sections(path):
    """(heading, code cells) for each '## ' section; cells before the first heading are the set-up."""
    sections, heading, code = [], None, []
    for cell in _cells(path):
        if cell.cell_type == "markdown":
            found = re.search(r"^## (.+)$", cell.source, flags=re.MULTILINE)
            if found:
                if heading is not None:
                    sections.append((heading, code))
                heading, code = found.group(1).strip(), []
        elif heading is not None:
            code.append(cell.source)
    if heading is not None:
        sections.append((heading, code))
    return sections


def test_notebooks_exist_in_teaching_order():
    names = [os.path.basename(p) for p in PATHS]
    assert len(names) >= 7 and [n[:2] for n in names] == [f"{k:02d}" for k in range(1, len(names) + 1)]
    assert "08_paper_claims.ipynb" in names


@pytest.mark.parametrize("path", PATHS, ids=[os.path.basename(p) for p in PATHS])
def test_every_section_that_runs_code_asserts_something(path):
    """A claim printed but not asserted drifts silently: each section with code checks what it shows."""
    name = os.path.basename(path)
    sections = _sections(path)
    assert sections, f"{name} has no '## ' sections"
    total = 0
    for heading, code in sections:
        count = sum(_assertions(source) for source in code)
        total += count
        assert not code or count, f"{name}: section '{heading}' runs code but asserts nothing"
    assert total >= 3, f"{name}: only {total} assertions"


def test_the_assertion_counter_sees_asserts_and_ignores_magics():
    assert _assertions("%matplotlib inline\nx = 1\nassert x == 1\nif x:\n    assert x > 0") == 2
    assert _assertions("print('assert nothing')  # assert") == 0


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS, ids=[os.path.basename(p) for p in PATHS])
def test_notebook_runs_without_error(path):
    nb, seconds = run_notebooks.execute(path, timeout=600, quick=True)
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            assert output.get("output_type") != "error", f"{os.path.basename(path)}: {output.get('ename')}"
    print(f"{os.path.basename(path)}: {seconds:.0f} s in the quick setting")


def test_stored_notebooks_have_outputs_and_no_errors():
    import nbformat

    for path in PATHS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and all(c.get("execution_count") for c in code), f"{path} is not stored executed"
        assert sum(1 for c in code if c.outputs) >= len(code) // 2, f"{path}: most cells should show something"
        has_figure = any("image/png" in o.get("data", {}) for c in code for o in c.outputs)
        if os.path.basename(path)[:2] in ("03", "04", "05", "07", "08"):  # the notebooks with figures
            assert has_figure, f"{path} is stored without its figures"
        assert not [o for c in code for o in c.outputs if o.get("output_type") == "error"], path


def test_the_paper_claims_notebook_is_stored_from_the_full_setting():
    """Its assertions about training results run only in the full setting: the stored run must be one."""
    import nbformat

    (path,) = [p for p in PATHS if os.path.basename(p).endswith("_paper_claims.ipynb")]
    nb = nbformat.read(path, as_version=4)
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "setting: full" in printed and "setting: quick" not in printed


@pytest.mark.parametrize("path", PATHS, ids=os.path.basename)
def test_a_notebooks_title_carries_its_file_number(path):
    """Notebook NN_name.ipynb opens with "# N. ...", so the number a reader sees is the one the
    README, the syllabus and the other notebooks use."""
    number = int(os.path.basename(path).split("_")[0])
    first = _cells(path)[0]
    assert first.cell_type == "markdown" and first.source.startswith(f"# {number}. "), first.source[:60]
