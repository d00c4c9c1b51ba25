"""The stepper in a real browser: JupyterLab in headless Chromium, driven by Selenium.

Headless notebook execution cannot see what broke the stepper in JupyterLab (widget callbacks on
kernel threads of their own, pyplot's hooks drawing half-built figures): only a browser does. This
test starts its own Jupyter server on 127.0.0.1 with a temporary token and a copy of notebook 4,
opens it in Chromium, runs all cells, then clicks next (10 times), previous, "next dropped block",
moves the slider and switches the phase filter. After each action it checks the step text, and that
the picture is complete: the browser's image has the size of the same frame rendered headless in
this process (the same Stepper widget built here and given the same clicks), and about the same
share of non-white pixels in a screenshot (a blank, half-drawn or overlapped picture would not).

Needs Debian's ``chromium`` and ``chromium-driver`` (nothing is downloaded at run time) and the
``browser`` extra (selenium, jupyterlab, ipywidgets). Without them it is skipped with one line;
with MINISD_REQUIRE_BROWSER=1 (as .ci/run sets) it fails instead. Screenshots and the timings go
to $MINISD_BROWSER_SCREENSHOTS (default: <tmp>/minisd-browser-test).
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "04_stochastic_depth.ipynb")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _missing() -> list[str]:
    missing = [name for name, found in (("chromium", CHROMIUM), ("chromium-driver", CHROMEDRIVER)) if not found]
    missing += [m for m in ("selenium", "jupyterlab", "ipywidgets", "nbformat", "PIL")
                if importlib.util.find_spec(m) is None]
    return missing


if _missing():
    _reason = (f"browser test needs chromium, chromium-driver and the 'browser' extra "
               f"(missing: {', '.join(_missing())}); see README, 'Run the tests'")
    if os.environ.get("MINISD_REQUIRE_BROWSER") == "1":
        pytest.fail(_reason, pytrace=False)
    pytest.skip(_reason, allow_module_level=True)

import nbformat  # noqa: E402
from helpers import chromium, non_white_share  # noqa: E402
from PIL import Image  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

SCREENSHOTS = os.environ.get("MINISD_BROWSER_SCREENSHOTS", os.path.join(tempfile.gettempdir(), "minisd-browser-test"))
RUN_ALL_TIMEOUT = 240  # seconds for notebook 4 (about a minute on two busy cores)
CLICK_TIMEOUT = 20


# ------------------------------------------------------------------------------------------------
# The server and the browser
# ------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def jupyter_lab(root: str):
    """A JupyterLab server of our own on 127.0.0.1 with a temporary token, serving ``root``."""
    port, token = _free_port(), secrets.token_hex(16)
    settings = os.path.join(root, ".lab-settings")
    # No news or update checks (no network, and no pop-up over the page).
    notifications = os.path.join(settings, "@jupyterlab", "apputils-extension")
    os.makedirs(notifications)
    with open(os.path.join(notifications, "notification.jupyterlab-settings"), "w") as handle:
        json.dump({"fetchNews": "false", "checkForUpdates": False}, handle)
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=settings, JUPYTERLAB_WORKSPACES_DIR=os.path.join(root, ".ws"),
               MINISD_NOTEBOOK_QUICK="1")  # the widget is the subject here, not the full setting's numbers
    env.pop("MPLBACKEND", None)  # the kernel uses the inline backend, as for a student
    log = open(os.path.join(root, "server.log"), "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.allow_root=True",
         "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("jupyter lab did not start: " + open(log.name).read()[-2000:]) from None
                time.sleep(0.3)
        yield f"http://127.0.0.1:{port}", token
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        log.close()


KERNEL_STATUS = """
const app = window.jupyterapp;
if (!app || !app.shell) return null;
const panel = app.shell.currentWidget;
if (!panel || !panel.sessionContext || !panel.sessionContext.session) return null;
const kernel = panel.sessionContext.session.kernel;
return kernel ? kernel.status : null;"""

CELLS = """
const panel = window.jupyterapp.shell.currentWidget;
const cells = panel.content.widgets.filter(c => c.model.type === 'code');
return cells.map(c => {
  const outputs = c.model.outputs.toJSON();
  return [c.model.executionCount, outputs.filter(o => o.output_type === 'error').map(o => o.ename + ': ' + o.evalue)];
});"""

STATE = """
const text = document.querySelector('.minisd-stepper-text');
const img = document.querySelector('.minisd-stepper-image');
const readout = document.querySelector('.minisd-stepper-slider .widget-readout');
if (!text || !img) return null;
return {text: text.innerText, src: img.src, complete: img.complete, natural: [img.naturalWidth, img.naturalHeight],
        shown: [img.clientWidth, img.clientHeight], readout: readout ? readout.innerText : null};"""


def wait_for(driver, condition, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


# ------------------------------------------------------------------------------------------------
# The same frames, headless
# ------------------------------------------------------------------------------------------------


def headless_stepper_widget(notebook):
    """Run notebook 4's code up to its widget cell here, and build the same Stepper widget
    (headless: no kernel, no browser). Its image holds each frame as rendered outside the browser."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    namespace = {"__name__": "notebook4"}
    cwd = os.getcwd()
    os.chdir(os.path.dirname(NOTEBOOK))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            for cell in notebook.cells:
                if cell.cell_type != "code":
                    continue
                if ".widget()" in cell.source:
                    lines = cell.source.rstrip().splitlines()
                    exec("\n".join(lines[:-1]), namespace)  # noqa: S102  (the cell's set-up lines)
                    return eval(lines[-1], namespace)  # noqa: S307  (the widget itself)
                exec(cell.source, namespace)  # noqa: S102
    finally:
        os.chdir(cwd)
        plt.close("all")
    raise AssertionError("notebook 4 has no stepper widget cell (a cell ending in .widget())")


SCROLL_TO_WIDGET = """
const notebook = window.jupyterapp.shell.currentWidget.content;
const index = notebook.widgets.findIndex(cell => cell.node.querySelector('.minisd-stepper-image'));
notebook.activeCellIndex = index;  // as a student's click on the widget's cell would
notebook.scrollToItem(index, 'start');
const widget = notebook.widgets[index].node.querySelector('.jp-OutputArea-output');
widget.scrollIntoView({block: 'center'});
const box = widget.getBoundingClientRect();
return box.height > 100 && box.top >= 0 && box.bottom <= window.innerHeight;"""


def bring_into_view(driver):
    """Scroll the stepper widget into the window, and wait until it is laid out there.

    One ``scrollIntoView`` is not enough: JupyterLab 4 renders the cells outside the window lazily
    (``content-visibility: auto``), so the positions it scrolls by are estimates until the cells on
    the way have been drawn, and a cell that is not drawn has an empty box. While the widget is
    outside the window the browser does not render it at all (its text reads as ""). After Run All
    the window is at the notebook's end, several screens below the widget."""
    in_view = []  # the last answers: in view twice in a row, 0.2 s apart, is where it stays

    def settled():
        in_view.append(bool(driver.execute_script(SCROLL_TO_WIDGET)))
        time.sleep(0.2)
        return in_view[-2:] == [True, True]

    wait_for(driver, settled, 30, "the stepper widget to scroll into view")


def heading(text: str) -> str:
    """The first line of a step's text ("" while the widget has not drawn its text yet)."""
    lines = text.strip().splitlines()
    return lines[0].strip() if lines else ""


# ------------------------------------------------------------------------------------------------
# The test
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_stepper_in_jupyterlab(tmp_path):
    os.makedirs(SCREENSHOTS, exist_ok=True)
    shutil.copy(NOTEBOOK, tmp_path / "04_stochastic_depth.ipynb")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    timings, log = [], []
    started = time.monotonic()
    with jupyter_lab(str(tmp_path)) as (url, token), chromium(str(tmp_path)) as driver:
        driver.get(f"{url}/lab/tree/04_stochastic_depth.ipynb?token={token}")
        wait_for(driver, lambda: driver.execute_script(KERNEL_STATUS) == "idle", 90, "the kernel to start")
        driver.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells')")
        # While the kernel runs the notebook, build the same widget here (headless).
        mirror = headless_stepper_widget(notebook)
        (m_previous, m_next, m_dropped, m_slider), (m_phase, _m_blocks) = (mirror.children[0].children,
                                                                           mirror.children[1].children)
        m_text, m_image = mirror.children[2], mirror.children[3]

        def all_ran():
            cells = driver.execute_script(CELLS)
            return driver.execute_script(KERNEL_STATUS) == "idle" and all(count for count, _ in cells) and cells

        cells = wait_for(driver, all_ran, RUN_ALL_TIMEOUT, "Run All to finish")
        errors = [e for _, errs in cells for e in errs]
        assert not errors, f"notebook 4 raised in the browser: {errors}"
        ran_all = time.monotonic() - started
        bring_into_view(driver)
        controls = {name: driver.find_element(By.CSS_SELECTOR, f".minisd-stepper-{name}")
                    for name in ("previous", "next", "dropped", "slider", "phase")}

        def check(what, before=None):
            """Wait for the browser to show the mirror's step, then compare the pictures."""
            expected = heading(m_text.value.split(">", 1)[1])  # the text inside <pre ...>

            def arrived():
                state = driver.execute_script(STATE)
                if (state and heading(state["text"]) == expected and state["complete"] and state["natural"][0] > 0
                        and (before is None or state["src"] != before["src"])):
                    return state
                return None

            try:
                state = wait_for(driver, arrived, CLICK_TIMEOUT, f"'{expected}' after {what}")
            except AssertionError as exc:
                shown = driver.execute_script(STATE)
                raise AssertionError(f"{exc}; the browser shows {heading(shown['text']) if shown else 'no widget'}"
                                     f" (picture {'changed' if shown and before and shown['src'] != before['src'] else 'unchanged'})") from None
            seconds = time.monotonic() - clicked[0]
            headless = Image.open(io.BytesIO(bytes(m_image.value)))
            shot = Image.open(io.BytesIO(driver.find_element(By.CSS_SELECTOR, ".minisd-stepper-image").screenshot_as_png))
            # Complete: the full frame arrived (its natural size is the headless frame's) and is shown
            # whole (the element keeps the frame's aspect ratio)...
            assert tuple(state["natural"]) == headless.size, (what, state["natural"], headless.size)
            width, height = state["shown"]
            assert abs(width / height - headless.size[0] / headless.size[1]) < 0.02, (what, state["shown"])
            # ...and looks like it: about the same share of drawn (non-white) pixels at the shown size.
            mine, reference = non_white_share(shot), non_white_share(headless.resize(shot.size))
            assert abs(mine - reference) <= 0.02 + 0.1 * reference, (what, mine, reference)
            log.append({"action": what, "step": expected, "seconds": round(seconds, 3),
                        "non_white": [round(mine, 4), round(reference, 4)], "shown": state["shown"]})
            if what != "start":
                timings.append(seconds)
            return state

        clicked = [time.monotonic()]
        state = check("start")
        driver.save_screenshot(os.path.join(SCREENSHOTS, "01_after_run_all.png"))

        def act(what, browser_action, mirror_action):
            nonlocal state
            mirror_action()
            clicked[0] = time.monotonic()
            browser_action()
            state = check(what, state)

        for k in range(10):
            act(f"next #{k + 1}", controls["next"].click, m_next.click)
        driver.save_screenshot(os.path.join(SCREENSHOTS, "02_after_10_next.png"))
        act("previous", controls["previous"].click, m_previous.click)
        act("next dropped block", controls["dropped"].click, m_dropped.click)
        assert "DROPPED" in state["text"] and "branch SKIPPED" in state["text"]
        driver.save_screenshot(os.path.join(SCREENSHOTS, "03_next_dropped_block.png"))

        # The slider: drag its handle with the mouse; the mirror follows to the step the readout shows.
        handle = controls["slider"].find_element(By.CSS_SELECTOR, ".noUi-handle")
        before = state
        clicked[0] = time.monotonic()
        ActionChains(driver).click_and_hold(handle).move_by_offset(60, 0).release().perform()
        moved = wait_for(driver, lambda: (lambda s: s if s and s["readout"] != before["readout"] else None)(
            driver.execute_script(STATE)), CLICK_TIMEOUT, "the slider to move")
        m_slider.value = next(index for label, index in m_slider.options if label == moved["readout"])
        state = check("slider", before)
        assert heading(state["text"]).startswith(f"step {state['readout']} of ")
        driver.save_screenshot(os.path.join(SCREENSHOTS, "04_slider.png"))

        # The phase filter: the other phase only (the same layer, its step in that phase).
        other = "forward" if " backward " in heading(state["text"]) else "backward"
        button = [b for b in controls["phase"].find_elements(By.CSS_SELECTOR, "button") if b.text == other][0]
        layer = heading(state["text"]).split()[5]
        act(f"phase: {other}", button.click, lambda: setattr(m_phase, "value", other))
        assert heading(state["text"]).split()[4:6] == [other, layer]
        driver.save_screenshot(os.path.join(SCREENSHOTS, "05_other_phase.png"))
        driver.find_element(By.CSS_SELECTOR, ".minisd-stepper-image").screenshot(
            os.path.join(SCREENSHOTS, "06_frame_in_browser.png"))
        with open(os.path.join(SCREENSHOTS, "06_frame_headless.png"), "wb") as handle_png:
            handle_png.write(bytes(m_image.value))

    summary = {"run_all_seconds": round(ran_all, 1), "total_seconds": round(time.monotonic() - started, 1),
               "click_to_complete_picture": {"median": round(statistics.median(timings), 3),
                                             "worst": round(max(timings), 3), "count": len(timings)},
               "actions": log}
    with open(os.path.join(SCREENSHOTS, "timings.json"), "w") as handle_json:
        json.dump(summary, handle_json, indent=1)
    print(f"\nbrowser: click to complete picture median {summary['click_to_complete_picture']['median']} s, "
          f"worst {summary['click_to_complete_picture']['worst']} s over {len(timings)} actions; "
          f"Run All {ran_all:.0f} s; screenshots in {SCREENSHOTS}")
    assert len(timings) >= 14
