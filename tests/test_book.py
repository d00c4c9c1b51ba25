"""The course site (scripts/build_book.py): built from the stored notebooks, the exercises, the README
and the docstrings, then opened from file:// in headless Chromium: a page per notebook and exercise,
math rendered, notebook 4's static step-through working inside its page, and no request leaving the
site. Skipped in one line without the docs extra or Chromium (fails without Chromium under
MINISD_REQUIRE_BROWSER=1, as .ci/run sets; the docs extra is optional there)."""
from __future__ import annotations

import glob
import importlib.util
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS_MODULES = ("mkdocs", "material", "mkdocs_jupyter", "mkdocstrings", "mkdocstrings_handlers.python",
                "jupyter_server_mathjax")


def load_build_book():
    spec = importlib.util.spec_from_file_location("build_book", os.path.join(ROOT, "scripts", "build_book.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_exercises_are_found_by_glob_and_solutions_stay_out(tmp_path, monkeypatch):
    build_book = load_build_book()
    for name in ("exercises/01_a.ipynb", "exercises/07_new.ipynb", "exercises/solutions/01_a.ipynb", "02_b.ipynb"):
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        (tmp_path / name).write_text("{}")
    monkeypatch.setattr(build_book, "NOTEBOOKS", str(tmp_path))
    assert [os.path.relpath(p, tmp_path) for p in build_book.exercise_notebooks()] == [
        os.path.join("exercises", "01_a.ipynb"), os.path.join("exercises", "07_new.ipynb")]
    assert [os.path.basename(p) for p in build_book.teaching_notebooks()] == ["02_b.ipynb"]


def test_widget_outputs_become_a_note(tmp_path):
    import json

    build_book = load_build_book()
    source = os.path.join(ROOT, "notebooks", "04_stochastic_depth.ipynb")
    build_book.stage_notebook(source, tmp_path / "04.ipynb")
    staged = json.loads((tmp_path / "04.ipynb").read_text())
    outputs = [o for c in staged["cells"] for o in c.get("outputs", [])]
    assert "widgets" not in staged["metadata"]
    assert not [o for o in outputs if build_book.WIDGET_VIEW in o.get("data", {})]
    assert [o for o in outputs if o.get("data", {}).get("text/html") == build_book.WIDGET_NOTE]


missing_docs = [m for m in DOCS_MODULES if importlib.util.find_spec(m.split(".")[0]) is None]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if missing_docs:
        pytest.skip(f"course site test needs the docs extra (missing: {', '.join(missing_docs)}); pip install \".[docs]\"")
    out = tmp_path_factory.mktemp("site")
    started = time.monotonic()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "build_book.py"), str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"\ncourse site built in {time.monotonic() - started:.1f} s")
    return out


def page_for(notebook: str, folder: str, site) -> str:
    return os.path.join(site, folder, os.path.splitext(os.path.basename(notebook))[0] + ".html")


def test_site_has_a_page_per_notebook_exercise_and_module(site):
    notebooks = sorted(glob.glob(os.path.join(ROOT, "notebooks", "[0-9]*.ipynb")))
    exercises = sorted(glob.glob(os.path.join(ROOT, "notebooks", "exercises", "*.ipynb")))
    assert notebooks and exercises
    for path in notebooks:
        assert os.path.isfile(page_for(path, "notebooks", site)), path
    for path in exercises:
        assert os.path.isfile(page_for(path, "exercises", site)), path
    assert not glob.glob(os.path.join(site, "**", "solutions", "*"), recursive=True)
    for module in ("minisd.layers", "minisd.residual", "minisd.stepper"):
        assert os.path.isfile(os.path.join(site, "api", f"{module}.html"))
    api = open(os.path.join(site, "api", "minisd.residual.html"), encoding="utf-8").read()
    assert "linear_decay" in api and "BasicBlock" in api  # generated from the docstrings
    # Nothing to load from elsewhere: no script, style sheet, image or font addressed outside the site.
    import re

    for html_path in glob.glob(os.path.join(site, "**", "*.html"), recursive=True):
        text = open(html_path, encoding="utf-8").read()
        loads = re.findall(r'<(?:script|img|link|iframe|source)\b[^>]*?\b(?:src|href)="((?:https?:)?//[^"]+)"', text)
        assert not loads, (html_path, loads[:3])


def test_site_in_chromium_from_file(site, tmp_path):
    from helpers import chromium, requested_urls, skip_without_browser

    skip_without_browser(("selenium",), what="the course site's browser test")
    from selenium.webdriver.common.by import By

    notebooks = sorted(glob.glob(os.path.join(ROOT, "notebooks", "[0-9]*.ipynb")))
    exercises = sorted(glob.glob(os.path.join(ROOT, "notebooks", "exercises", "*.ipynb")))
    with chromium(str(tmp_path), network_log=True) as driver:
        driver.get(f"file://{site}/index.html")
        assert "minisd" in driver.title
        links = {a.get_attribute("href") for a in driver.find_elements(By.CSS_SELECTOR, "nav a[href]")}
        for path in notebooks:
            assert f"file://{page_for(path, 'notebooks', site)}" in links, path
        for path in exercises:
            assert f"file://{page_for(path, 'exercises', site)}" in links, path
        for path in notebooks + exercises:
            folder = "exercises" if os.path.dirname(path).endswith("exercises") else "notebooks"
            driver.get(f"file://{page_for(path, folder, site)}")
            assert driver.find_elements(By.CSS_SELECTOR, ".jp-Cell"), path  # the notebook's cells are there
        # Math is typeset by the MathJax inside the site (notebook 4 has display math).
        driver.get(f"file://{site}/notebooks/04_stochastic_depth.html")
        deadline = time.monotonic() + 30
        while not driver.execute_script("return document.querySelectorAll('.MathJax_CHTML, .MathJax').length"):
            assert time.monotonic() < deadline, "MathJax typeset nothing on notebook 4's page"
            time.sleep(0.2)
        # The static step-through on notebook 4's page: inside its frame, a click moves it.
        frame = driver.find_element(By.CSS_SELECTOR, ".minisd-stepper-static iframe")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", frame)
        driver.switch_to.frame(frame)
        state = "return [document.getElementById('text').textContent, document.getElementById('frame').complete, " \
                "document.getElementById('frame').naturalWidth]"
        text, complete, width = driver.execute_script(state)
        assert text.startswith("step 1 of") and complete and width > 0
        driver.find_element(By.ID, "next").click()
        assert driver.execute_script(state)[0].startswith("step 2 of")
        driver.find_element(By.ID, "dropped").click()  # residual blocks always have their picture
        text, complete, width = driver.execute_script(state)
        assert "DROPPED" in text and complete and width > 0
        driver.switch_to.default_content()
        # Search works offline (Material's offline plugin, with the vendored worker shim).
        driver.get(f"file://{site}/index.html")
        driver.find_element(By.CSS_SELECTOR, "label.md-search__icon, .md-search__input").click()
        driver.find_element(By.CSS_SELECTOR, ".md-search__input").send_keys("linear_decay")
        deadline = time.monotonic() + 20
        while not driver.find_elements(By.CSS_SELECTOR, ".md-search-result__item"):
            assert time.monotonic() < deadline, "offline search found nothing for linear_decay"
            time.sleep(0.2)
        urls = requested_urls(driver)
        leaving = [u for u in urls if not u.startswith(("file://", "data:", "blob:", "about:"))]
        assert urls and not leaving, leaving[:5]
        # MathJax 2's HTML-CSS output probes for web-font support with a blank font at about:blank,
        # which a file:// page may not load: the browser's own address, not a request out of the site.
        problems = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"
                    and "about:blank" not in e["message"]]
        assert not problems, problems[:5]
