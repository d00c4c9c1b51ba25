"""Import rules that keep the backend promise (design notes, "Backend"):

* only ``minisd/backend.py`` imports CuPy (``cupy`` or ``cupyx``), anywhere in the file;
* ``functional.py``, ``kernels/`` and ``layers.py`` never import NumPy at all: every array module they use comes
  from the backend (``array_module(x)``), so the same lines run on the GPU;
* any other module may import NumPy only for host-side work, and only if it is on the allow-list
  below with the reason next to it. A new module that imports NumPy fails this test until someone
  decides, in writing, that its use is host-side.

The checker reads the source with ``ast`` (so comments and strings do not count, and imports
inside functions do), and also catches ``__import__("numpy")`` / ``importlib.import_module(...)``
with a literal name. Its own tests plant bad source and require it to complain.
"""
from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "minisd"

CUPY_ALLOWED = {"backend.py"}
NUMPY_FORBIDDEN = {"functional.py", "layers.py", "kernels/__init__.py", "kernels/fast.py", "kernels/parallel.py"}
NUMPY_ALLOWED = {
    "backend.py": "it is the backend: the NumPy side of use(), to_numpy, the seeded host generators",
    "_cupy_namespace.py": "part of the backend: NumPy behind CuPy's names for the cupy-names test mode",
    "gradcheck.py": "host-side float64 comparison of backend.to_numpy results; the host generator for dy",
    "residual.py": "stochastic-depth gates are drawn on the host from a seeded NumPy generator (no device "
                   "round trip decides a branch); force_gate reads masks with to_numpy",
    "models.py": "seeded host generators for initial weights and the gate stream; host means of gates",
    "data.py": "datasets are loaded, decoded and shuffled on the host before backend.to_device",
    "training/": "metrics from to_numpy values and .npz checkpoints are host-side",
    "ensemble.py": "compares softmax outputs on the host in float64; gates of the sampled sub-networks come "
                   "from a seeded host generator, as in training",
    "trace.py": "records to_numpy summaries of what each layer did, for teaching",
    "plots/": "matplotlib takes host arrays",
    "exercises/": "checks students' answers on small host float64 problems against the reference and finite "
                  "differences",
    "cli.py": "prints and saves host-side results",
    "bench/timing.py": "benchmarks time the NumPy (CPU) path against PyTorch CPU: host random images, "
                       "made once for both",
    "bench/parts.py": "times single CPU layers and blocks on host arrays laid out as the fast tier keeps them",
    "bench/torch_resnet.py": "PyTorch's gates are drawn from a seeded host generator, as minisd's are",
    "interop.py": "tensors cross to PyTorch as host NumPy arrays; the twin draws its gates from a NumPy "
                  "generator, as residual.py does",
}
ARRAY_TOP_LEVEL = {"numpy", "cupy", "cupyx"}


def imported_modules(source: str) -> list[tuple[str, int]]:
    """(top-level module name, line) for every import in ``source``, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                found.append((node.module.split(".")[0], node.lineno))
            # `from minisd.backend import numpy` would smuggle the module in under another path
            found += [(alias.name, node.lineno) for alias in node.names if alias.name in ARRAY_TOP_LEVEL]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if name in ("__import__", "import_module"):
                found.append((node.args[0].value.split(".")[0], node.lineno))
    return found


def _on_numpy_allow_list(filename: str) -> bool:
    """A file named on the list, or a file inside a folder named on it ("plots/")."""
    return any(filename == entry or entry.endswith("/") and filename.startswith(entry) for entry in NUMPY_ALLOWED)


def violations(filename: str, source: str) -> list[str]:
    """Broken import rules in one module of the package (``filename`` like "layers.py")."""
    problems = []
    for module, line in imported_modules(source):
        if module in ("cupy", "cupyx") and filename not in CUPY_ALLOWED:
            problems.append(f"{filename}:{line} imports {module}; only backend.py may import CuPy")
        if module == "numpy":
            if filename in NUMPY_FORBIDDEN:
                problems.append(f"{filename}:{line} imports numpy; get the array module from the backend "
                                "(array_module(x)) instead")
            elif not _on_numpy_allow_list(filename):
                problems.append(f"{filename}:{line} imports numpy but is not on the host-side allow-list "
                                "in tests/test_imports.py")
    return problems


def _package_sources():
    files = sorted(PACKAGE.rglob("*.py"))
    assert any(f.name == "functional.py" for f in files) and any(f.name == "layers.py" for f in files)
    return [(str(f.relative_to(PACKAGE)), f.read_text()) for f in files]


# ------------------------------------------------------------------------------------------------
# The rules, applied to the package
# ------------------------------------------------------------------------------------------------


def test_package_follows_the_import_rules():
    problems = [p for name, source in _package_sources() for p in violations(name, source)]
    assert not problems, "\n".join(problems)


def test_backend_really_is_where_cupy_is_imported():
    """The rule above is not vacuous: backend.py does import cupy, and functional.py does get its
    array module from the backend."""
    sources = dict(_package_sources())
    assert "cupy" in [m for m, _ in imported_modules(sources["backend.py"])]
    assert "minisd" in [m for m, _ in imported_modules(sources["functional.py"])]
    assert "array_module" in sources["functional.py"]


def test_allow_list_entries_have_reasons():
    assert all(len(reason) > 20 for reason in NUMPY_ALLOWED.values())
    assert not (NUMPY_FORBIDDEN & set(NUMPY_ALLOWED))


# ------------------------------------------------------------------------------------------------
# The checker fails on planted source
# ------------------------------------------------------------------------------------------------


PLANTED = [
    ("functional.py", "import numpy as np\n", "functional.py:1 imports numpy"),
    ("layers.py", "from numpy import zeros\n", "layers.py:1 imports numpy"),
    ("layers.py", "import numpy.linalg\n", "layers.py:1 imports numpy"),
    ("layers.py", "def f(x):\n    import numpy\n    return numpy.sum(x)\n", "layers.py:2 imports numpy"),
    ("functional.py", "from minisd.backend import numpy\n", "functional.py:1 imports numpy"),
    ("functional.py", "np = __import__('numpy')\n", "functional.py:1 imports numpy"),
    ("residual.py", "import cupy\n", "residual.py:1 imports cupy"),
    ("gradcheck.py", "import cupyx.scipy.ndimage\n", "gradcheck.py:1 imports cupyx"),
    ("models.py", "import importlib\ncp = importlib.import_module('cupy')\n", "models.py:2 imports cupy"),
    ("optim.py", "import numpy as np\n", "not on the host-side allow-list"),
    ("new_module.py", "if True:\n    from numpy.random import default_rng\n", "not on the host-side allow-list"),
]


@pytest.mark.parametrize("filename,source,message", PLANTED, ids=[f"{f}:{s.splitlines()[-1].strip()}" for f, s, _ in PLANTED])
def test_checker_catches_planted_imports(filename, source, message):
    problems = violations(filename, textwrap.dedent(source))
    assert any(message in p for p in problems), problems


@pytest.mark.parametrize("filename,source", [
    ("backend.py", "import numpy\nimport cupy\n"),
    ("residual.py", "import numpy\n"),
    ("layers.py", "from minisd import backend\nfrom minisd import functional as F\nimport math\n"),
    ("functional.py", "# import numpy  (a comment)\ns = 'import cupy'\nimport numpyro\n"),
])
def test_checker_accepts_allowed_source(filename, source):
    assert violations(filename, source) == []


def test_every_subpackage_is_installed():
    """pyproject.toml lists every package folder: a non-editable install (as CI's) leaves out any
    subpackage it does not name, and `import minisd` then fails outside the source tree."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    root = PACKAGE.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {str(p.parent.relative_to(root)).replace("/", ".") for p in PACKAGE.rglob("__init__.py")}
    assert found == listed


# ------------------------------------------------------------------------------------------------
# PyTorch stays optional
# ------------------------------------------------------------------------------------------------

# Imports every module of the package but the PyTorch bridge, then names the torch modules loaded.
_IMPORT_ALL = """
import importlib, pkgutil, sys
import minisd
names = [m.name for m in pkgutil.walk_packages(minisd.__path__, "minisd.") if m.name != "minisd.interop"]
for name in names:
    importlib.import_module(name)
assert len(names) >= 15, names
print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
"""


def test_importing_minisd_never_imports_torch():
    """PyTorch is an optional extra (minisd.interop needs it): no other module may load it, even
    where it is installed, so `import minisd` stays fast and works without it."""
    env = dict(os.environ, PYTHONPATH=str(PACKAGE.parent))
    done = subprocess.run([sys.executable, "-c", _IMPORT_ALL], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"modules of minisd imported PyTorch: {done.stdout.strip()}"


def test_the_torch_import_check_sees_torch_when_a_module_imports_it():
    """The check above can fail: with the bridge imported too, torch shows up."""
    pytest.importorskip("torch")
    env = dict(os.environ, PYTHONPATH=str(PACKAGE.parent))
    code = _IMPORT_ALL.replace('if m.name != "minisd.interop"', "")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "'torch'" in done.stdout
