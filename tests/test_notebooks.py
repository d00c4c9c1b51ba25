"""Every notebook runs headless from top to bottom without an error (as scripts/run_notebooks.py does).

The notebooks are executed in a fresh kernel each and nothing is written back. Each is meant to run
in under two minutes on a two-core laptop.
"""
from __future__ import annotations

import importlib.util
import os

import pytest

pytest.importorskip("nbclient")
pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("run_notebooks", os.path.join(ROOT, "scripts", "run_notebooks.py"))
run_notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_notebooks)

PATHS = run_notebooks.notebook_paths()


def test_notebooks_exist_in_teaching_order():
    names = [os.path.basename(p) for p in PATHS]
    assert [n[:2] for n in names] == ["01", "02", "03", "04", "05", "06"]


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS, ids=[os.path.basename(p) for p in PATHS])
def test_notebook_runs_without_error(path):
    nb, seconds = run_notebooks.execute(path, timeout=600)
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            assert output.get("output_type") != "error", f"{os.path.basename(path)}: {output.get('ename')}"


def test_stored_notebooks_have_outputs_and_no_errors():
    import nbformat

    for path in PATHS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and all(c.get("execution_count") for c in code), f"{path} is not stored executed"
        assert sum(1 for c in code if c.outputs) >= len(code) // 2, f"{path}: most cells should show something"
        has_figure = any("image/png" in o.get("data", {}) for c in code for o in c.outputs)
        if os.path.basename(path)[:2] in ("03", "04", "05"):  # the notebooks with figures
            assert has_figure, f"{path} is stored without its figures"
        assert not [o for c in code for o in c.outputs if o.get("output_type") == "error"], path
