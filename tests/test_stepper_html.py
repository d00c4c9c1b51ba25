"""The static step-through (minisd.stepper_html, Stepper.to_html): one self-contained page whose
plain-JavaScript controls walk the steps as the Stepper does, from file:// with no kernel and no
network. The browser tests open it in headless Chromium and give the page and a Stepper the same
moves; they skip in one line without Chromium (fail under MINISD_REQUIRE_BROWSER=1)."""
from __future__ import annotations

import base64
import io
import json
import re

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from helpers import chromium, non_white_share, requested_urls, skip_without_browser  # noqa: E402
from test_stepper import traced_step  # noqa: E402

from minisd import plots, stepper_html  # noqa: E402
from minisd.stepper import Stepper  # noqa: E402


@pytest.fixture
def t(rng):
    return traced_step(rng)


def page_state(page: str) -> dict:
    """The data the page carries (its JSON script element)."""
    found = re.search(r'<script id="stepper-data" type="application/json">(.*?)</script>', page, re.S)
    return json.loads(found.group(1))


def test_page_holds_every_step_and_its_picture(t, tmp_path):
    s = Stepper(t)
    page = s.to_html(max_frames=None)
    state = page_state(page)
    assert len(state["steps"]) == len(s) and state["pictured"] == len(s)
    for number in (1, len(s) // 2, len(s)):
        step = state["steps"][number - 1]
        assert step["text"] == s.text(number)
        uri = state["frames"][step["frame"]]
        assert uri.startswith("data:image/png;base64,")
        from PIL import Image

        picture = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
        assert picture.size == (round(plots.trace_drawings.FRAME_SIZE[0] * 60), round(plots.trace_drawings.FRAME_SIZE[1] * 60))
        # the same drawing as the stepper's own frame, at the page's size and palette
        reference = Image.open(io.BytesIO(plots.figure_png(s.figure(number), dpi=60)))
        difference = np.abs(np.asarray(picture.convert("RGB"), float) - np.asarray(reference.convert("RGB"), float))
        assert difference.mean() < 3, number
    assert [st["dropped"] for st in state["steps"]] == [e.dropped for e in s.walk]
    # Self-contained: nothing is fetched (no src/href to anywhere, and a policy that forbids it).
    assert not re.search(r'(src|href)=["\'](https?:)?//', page)
    assert "default-src 'none'" in page
    written = s.to_html(tmp_path / "step.html", max_frames=None)
    assert open(written, encoding="utf-8").read() == page


def test_capped_pages_picture_every_block_first(t):
    s = Stepper(t)
    blocks = [i for i, e in enumerate(s.walk) if e.is_block]
    cap = len(blocks) + 5
    state = page_state(s.to_html(max_frames=cap))
    pictured = [i for i, step in enumerate(state["steps"]) if step["frame"] >= 0]
    assert len(pictured) == cap == state["pictured"] == len(state["frames"])
    assert set(blocks) <= set(pictured)
    assert stepper_html.choose_pictured(s.walk, 2) == [blocks[0], blocks[-1]]
    assert stepper_html.choose_pictured(s.walk, 0) == []


def test_page_opens_at_the_steppers_step_and_view(t):
    s = Stepper(t)
    s.view(phase="backward", show=False)
    s.position = s.next_dropped_index()
    state = page_state(s.to_html(max_frames=0))
    assert (state["start"], state["phase"], state["blocksOnly"]) == (s.position, "backward", False)


@pytest.mark.parametrize("options, message", [
    ({"max_frames": -1}, "max_frames must be None or a whole number >= 0"),
    ({"dpi": 5}, "dpi must be a whole number in 20..300"),
    ({"colors": 1000}, "colors must be a whole number in 2..256"),
])
def test_bad_options_name_the_option(t, options, message):
    with pytest.raises(ValueError, match=message):
        Stepper(t).to_html(**options)


def test_iframe_carries_the_whole_page(t):
    import html

    page = Stepper(t).to_html(max_frames=3)
    frame = stepper_html.iframe(page)
    inside = re.search(r'srcdoc="([^"]*)"', frame).group(1)
    assert html.unescape(inside) == page


# ------------------------------------------------------------------------------------------------
# In headless Chromium, from file://
# ------------------------------------------------------------------------------------------------

STATE = """
const text = document.getElementById('text'), img = document.getElementById('frame');
const missing = document.getElementById('missing');
return {text: text.textContent, src: img.getAttribute('src') || '', complete: img.complete,
        natural: [img.naturalWidth, img.naturalHeight], shown: img.style.display !== 'none',
        missing: getComputedStyle(missing).display !== 'none' ? missing.textContent : null,
        slider: [Number(document.getElementById('slider').value), Number(document.getElementById('slider').max)],
        resources: performance.getEntriesByType('resource').map(e => e.name)};"""


def browser_or_skip():
    skip_without_browser(("selenium", "PIL"), what="the static stepper's browser test")


def check_frame(driver, state, s):
    """The browser shows the stepper's current step: its text, and its picture complete."""
    from PIL import Image
    from selenium.webdriver.common.by import By

    assert state["text"] == s.text(), (state["text"][:60], s.text()[:60])
    assert state["complete"] and state["shown"] and state["missing"] is None
    page_picture = Image.open(io.BytesIO(base64.b64decode(state["src"].split(",", 1)[1])))
    assert tuple(state["natural"]) == page_picture.size
    shot = Image.open(io.BytesIO(driver.find_element(By.ID, "frame").screenshot_as_png))
    assert shot.size[0] > 300
    mine, reference = non_white_share(shot), non_white_share(page_picture.resize(shot.size))
    assert abs(mine - reference) <= 0.02 + 0.1 * reference, (mine, reference)


def test_static_page_steps_in_chromium_from_file_without_requests(t, tmp_path):
    browser_or_skip()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    s = Stepper(t)
    path = s.to_html(tmp_path / "step.html", max_frames=None)
    mirror = Stepper(t)  # given the same moves as the page
    mirror.position = mirror._after(1)
    with chromium(str(tmp_path), network_log=True) as driver:
        driver.get(f"file://{path}")
        read = lambda: driver.execute_script(STATE)  # noqa: E731
        click = lambda element_id: driver.find_element(By.ID, element_id).click()  # noqa: E731
        before = read()
        check_frame(driver, before, mirror)
        for _ in range(3):
            click("next")
            mirror.position = mirror._after(1)
            now = read()
            assert now["text"] != before["text"]
            check_frame(driver, now, mirror)
            before = now
        click("previous")
        mirror.position = mirror._after(-1)
        check_frame(driver, read(), mirror)
        click("dropped")
        mirror.position = mirror.next_dropped_index()
        now = read()
        assert "DROPPED" in now["text"]
        check_frame(driver, now, mirror)
        slider = driver.find_element(By.ID, "slider")
        slider.send_keys(Keys.ARROW_RIGHT)  # the slider moves one visible step
        mirror.position = mirror._after(1)
        check_frame(driver, read(), mirror)
        driver.find_element(By.CSS_SELECTOR, "input[name=phase][value=backward]").click()
        mirror.view(phase="backward", show=False)
        now = read()
        assert " backward " in now["text"].splitlines()[0]
        check_frame(driver, now, mirror)
        click("blocks")
        mirror.view(blocks_only=True, show=False)
        now = read()
        assert now["slider"][1] == len(mirror.visible()) - 1
        check_frame(driver, now, mirror)
        click("next")
        mirror.position = mirror._after(1)
        check_frame(driver, read(), mirror)
        driver.find_element(By.CSS_SELECTOR, "input[name=phase][value=both]").click()
        click("blocks")
        mirror.view(phase="both", blocks_only=False, show=False)
        check_frame(driver, read(), mirror)
        # No request left the page: the only URLs asked for are the file and its data: pictures.
        urls = requested_urls(driver)
        assert urls and all(u.startswith(("file://", "data:")) for u in urls), [u[:80] for u in urls]
        assert not [u for u in read()["resources"] if not u.startswith(("file://", "data:"))]
        problems = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not problems, problems


def test_capped_page_says_where_no_picture_was_drawn(t, tmp_path):
    browser_or_skip()
    from selenium.webdriver.common.by import By

    s = Stepper(t)
    path = s.to_html(tmp_path / "capped.html", max_frames=1)  # the first block only
    state = page_state(open(path, encoding="utf-8").read())
    without = next(i for i, st in enumerate(state["steps"]) if st["frame"] < 0)
    with chromium(str(tmp_path)) as driver:
        driver.get(f"file://{path}")
        assert driver.execute_script(STATE)["text"] == s.text(1)
        for _ in range(without):
            driver.find_element(By.ID, "next").click()
        now = driver.execute_script(STATE)
        assert now["text"] == s.text(without + 1)
        assert not now["shown"] and "No picture was drawn in advance" in now["missing"]
