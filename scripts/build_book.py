"""Build the course site: a static folder that works offline, from ``file://`` or any static host.

    pip install ".[docs]"
    python scripts/build_book.py OUT              # then open OUT/index.html

From the stored notebooks (with their outputs; nothing is executed), the exercises
(``notebooks/exercises/*.ipynb``: the student versions only, never a ``solutions/`` folder), the README
as the home page, and an API reference generated from the docstrings (one page per module of
``minisd``, found by walking the package), with MkDocs, Material for MkDocs, mkdocs-jupyter and
mkdocstrings.

Nothing is loaded from outside the site: Material's web fonts are off (``font: false``: the system's
fonts), its ``offline`` plugin makes search work from ``file://`` (with the iframe-worker shim it
needs vendored in ``scripts/book_assets/``, MIT, from npm's iframe-worker 1.0.4, instead of the copy
the plugin would load from a CDN), the math of the notebooks is
rendered by a MathJax copied into the site from the ``jupyter-server-mathjax`` package, and a
notebook's interactive widget (which would load its JavaScript from a CDN) is replaced by a line
saying it needs a kernel; notebook 4's static step-through (an HTML output) works as it is.

The site is assembled in a temporary folder (the pages and a generated ``mkdocs.yml``), so nothing
is written into the repository.
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import pkgutil
import re
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_NOTE = ("<p><em>Here the notebook shows an interactive widget, which needs a running Jupyter kernel: "
               "open the notebook in Jupyter to use it.</em></p>")
# Every notebook page lies one folder deep (notebooks/, exercises/), so one relative address reaches
# the MathJax copied into the site.
MATHJAX_URL = "../assets/mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full,Safe,local/minisd"
# jupyter-server-mathjax ships the STIX-Web fonts only (as the classic notebook configured MathJax):
# say so, or MathJax asks for its TeX fonts, which are not there.
MATHJAX_LOCAL_CONFIG = """MathJax.Hub.Config({"HTML-CSS": {availableFonts: [], preferredFont: null, webFont: "STIX-Web",
                                 imageFont: null}});
MathJax.Ajax.loadComplete("[MathJax]/config/local/minisd.js");
"""
# Material's offline plugin adds this shim from a CDN unless a polyfill named iframe-worker is given.
WORKER_SHIM = "assets/vendor/iframe-worker-shim.js"


def teaching_notebooks() -> list[str]:
    return sorted(glob.glob(os.path.join(NOTEBOOKS, "[0-9]*.ipynb")))


def exercise_notebooks() -> list[str]:
    """The student versions: notebooks/exercises/*.ipynb (a solutions/ folder below is never read)."""
    return sorted(glob.glob(os.path.join(NOTEBOOKS, "exercises", "*.ipynb")))


def api_modules() -> list[str]:
    """The public modules of minisd, packages included (names starting with "_" left out)."""
    sys.path.insert(0, ROOT)
    import minisd  # noqa: PLC0415

    names = ["minisd"]
    for info in pkgutil.walk_packages(minisd.__path__, "minisd."):
        if not any(part.startswith("_") for part in info.name.split(".")) and info.name != "minisd.datasets":
            names.append(info.name)
    return sorted(names)


def notebook_title(path: str) -> str:
    """The notebook's first markdown heading, else its file name."""
    with open(path, encoding="utf-8") as handle:
        cells = json.load(handle)["cells"]
    for cell in cells:
        if cell["cell_type"] == "markdown":
            for line in "".join(cell["source"]).splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return os.path.splitext(os.path.basename(path))[0]


def stage_notebook(source: str, target: str) -> None:
    """Copy a stored notebook, with each widget output replaced by a line saying it needs a kernel
    and the saved widget state dropped (nbconvert would load the widgets' JavaScript from a CDN)."""
    with open(source, encoding="utf-8") as handle:
        notebook = json.load(handle)
    notebook.get("metadata", {}).pop("widgets", None)
    for cell in notebook["cells"]:
        for i, output in enumerate(cell.get("outputs", [])):
            if WIDGET_VIEW in output.get("data", {}):
                cell["outputs"][i] = {"output_type": "display_data", "metadata": {},
                                      "data": {"text/html": WIDGET_NOTE, "text/plain": "(interactive widget)"}}
    with open(target, "w", encoding="utf-8") as handle:
        json.dump(notebook, handle)


def home_page(readme: str) -> str:
    """The README as the home page, its links pointed at the site's pages."""
    text = readme.replace("](notebooks/exercises/)", "](exercises/index.md)")
    text = text.replace("](notebooks/exercises/", "](exercises/")
    return text


def mkdocs_config(site_dir: str, nav: list) -> dict:
    return {
        "site_name": "minisd: stochastic depth from scratch",
        "site_description": "A course: deep residual networks trained with stochastic depth, backprop by hand in NumPy",
        "site_dir": site_dir,
        "docs_dir": "pages",
        "use_directory_urls": False,      # page.html, not page/ (so the site opens from file://)
        "theme": {"name": "material", "font": False, "features": ["navigation.sections", "navigation.top", "toc.integrate"],
                  "palette": {"primary": "indigo"}},
        "plugins": [
            "search",
            "offline",                        # search from file://, no external requests
            {"mkdocs-jupyter": {"execute": False, "include_source": True, "ignore_h1_titles": True,
                                "custom_mathjax_url": MATHJAX_URL, "include_requirejs": False}},
            {"mkdocstrings": {"handlers": {"python": {"paths": [ROOT], "options": {
                "show_source": True, "show_root_heading": True, "members_order": "source",
                "docstring_style": None, "show_submodules": False}}}}},
        ],
        "extra": {"polyfills": [WORKER_SHIM]},
        "markdown_extensions": ["admonition", "tables", "toc"],
        "nav": nav,
    }


def stage(pages: str) -> list:
    """Write every page under ``pages`` and return the navigation."""
    import jupyter_server_mathjax  # noqa: PLC0415

    os.makedirs(os.path.join(pages, "notebooks"))
    os.makedirs(os.path.join(pages, "exercises"))
    os.makedirs(os.path.join(pages, "api"))
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    with open(os.path.join(pages, "index.md"), "w", encoding="utf-8") as handle:
        handle.write(home_page(readme))
    # What the README links to besides the notebooks: its figures, the digits' license.
    for png in glob.glob(os.path.join(ROOT, "docs", "*.png")):
        os.makedirs(os.path.join(pages, "docs"), exist_ok=True)
        shutil.copy(png, os.path.join(pages, "docs"))
    for relative in re.findall(r"\]\((minisd/[^)#]+\.md)\)", readme):
        os.makedirs(os.path.join(pages, os.path.dirname(relative)), exist_ok=True)
        shutil.copy(os.path.join(ROOT, relative), os.path.join(pages, relative))

    notebook_nav, exercise_nav, api_nav = [], [], []
    for path in teaching_notebooks():
        name = os.path.basename(path)
        stage_notebook(path, os.path.join(pages, "notebooks", name))
        notebook_nav.append({notebook_title(path): f"notebooks/{name}"})
    listing = ["# Exercises", "", "Each exercise leaves a function for you to write; run it in Jupyter, where "
               "`minisd.exercises` checks your answer.", ""]
    for path in exercise_notebooks():
        name = os.path.basename(path)
        stage_notebook(path, os.path.join(pages, "exercises", name))
        title = notebook_title(path)
        exercise_nav.append({title: f"exercises/{name}"})
        listing.append(f"1. [{title}]({name})")
    with open(os.path.join(pages, "exercises", "index.md"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(listing) + "\n")
    for module in api_modules():
        page = f"api/{module}.md"
        with open(os.path.join(pages, page), "w", encoding="utf-8") as handle:
            handle.write(f"# {module}\n\n::: {module}\n")
        api_nav.append({module: page})

    os.makedirs(os.path.dirname(os.path.join(pages, WORKER_SHIM)))
    shutil.copy(os.path.join(ROOT, "scripts", "book_assets", "iframe-worker-shim.js"), os.path.join(pages, WORKER_SHIM))
    mathjax = os.path.join(os.path.dirname(jupyter_server_mathjax.__file__), "static")
    shutil.copytree(mathjax, os.path.join(pages, "assets", "mathjax"),
                    ignore=shutil.ignore_patterns("localization"))  # English only
    os.makedirs(os.path.join(pages, "assets", "mathjax", "config", "local"))
    with open(os.path.join(pages, "assets", "mathjax", "config", "local", "minisd.js"), "w", encoding="utf-8") as handle:
        handle.write(MATHJAX_LOCAL_CONFIG)
    return [{"Home": "index.md"}, {"Notebooks": notebook_nav},
            {"Exercises": [{"All exercises": "exercises/index.md"}] + exercise_nav}, {"API reference": api_nav}]


def build(out: str, quiet: bool = False) -> float:
    """Build the site into ``out`` (replaced if it exists); returns the seconds it took."""
    from mkdocs.commands.build import build as mkdocs_build  # noqa: PLC0415
    from mkdocs.config import load_config  # noqa: PLC0415

    started = time.perf_counter()
    out = os.path.abspath(out)
    with tempfile.TemporaryDirectory(prefix="minisd-book-") as work:
        pages = os.path.join(work, "pages")
        nav = stage(pages)
        config_path = os.path.join(work, "mkdocs.yml")
        with open(config_path, "w", encoding="utf-8") as handle:
            json.dump(mkdocs_config(out, nav), handle, indent=1)  # JSON is YAML
        config = load_config(config_path)
        here = os.getcwd()
        os.chdir(work)  # mkdocs-jupyter keeps a cache in ./.cache: in the temporary folder, not the repository
        try:
            mkdocs_build(config)
        finally:
            os.chdir(here)
    seconds = time.perf_counter() - started
    if not quiet:
        print(f"course site built in {seconds:.0f} s: open {os.path.join(out, 'index.html')}")
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to write the site into (replaced)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        import jupyter_server_mathjax  # noqa: F401, PLC0415
        import mkdocs_jupyter  # noqa: F401, PLC0415
        import mkdocstrings  # noqa: F401, PLC0415
        import material  # noqa: F401, PLC0415
    except ImportError as exc:
        print(f"build_book: {exc.name} is missing; install the docs extra: pip install \".[docs]\"", file=sys.stderr)
        return 1
    build(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
