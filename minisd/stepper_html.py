"""The stepper as one self-contained HTML page: frames drawn in advance, controls in plain JavaScript.

::

    page = Stepper(t).to_html()                  # the page as a string
    Stepper(t).to_html("step.html")              # ... or written to a file
    IPython.display.HTML(stepper_html.iframe(page))   # in a notebook output that keeps working
                                                       # where no kernel runs (a course site, nbviewer)

The page needs no kernel and no network: every step's text and the pictures are inside it (PNG as
``data:`` URIs), the controls are about a hundred lines of JavaScript with no library, and a
Content-Security-Policy forbids the page any request at all, so it works from ``file://``, from a
static host, or inside a stored notebook. It offers what :meth:`Stepper.widget` offers (previous,
next, a slider over the visible steps, next dropped block, the phase filter, blocks only), with the
same numbering (filters hide steps but never renumber them) and the same rule for where to stand
when a filter hides the current step.

What is pre-rendered, and why: a frame of a ResNet-56 trace is about 110 KB as matplotlib writes it,
and a trace holds hundreds of steps. So the pictures are drawn at ``dpi`` (60 by default, 900 x 384
pixels instead of 1200 x 512), reduced to a palette of ``colors`` colours (the frames are flat
colour maps and text, so 128 colours look the same) and PNG-optimised (about a fifth of the size),
and at most ``max_frames`` steps get a picture: every residual block first (the steps this course is
about, in both phases), then layers evenly spaced over the rest. Every step keeps its text; a step
without a picture says so and names the live widget, which draws every step.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os

__all__ = ["build_page", "choose_pictured", "iframe", "DEFAULT_MAX_FRAMES", "DEFAULT_DPI", "DEFAULT_COLORS"]

DEFAULT_MAX_FRAMES = 80
DEFAULT_DPI = 60
DEFAULT_COLORS = 128


def choose_pictured(walk, max_frames: int | None) -> list[int]:
    """Indices into ``walk`` that get a picture: all if they fit in ``max_frames`` (None: no cap),
    else every residual block (evenly thinned if even they do not fit), then layers evenly spaced."""
    if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 0):
        raise ValueError(f"Stepper.to_html: max_frames must be None or a whole number >= 0, got {max_frames!r}")
    count = len(walk)
    if max_frames is None or count <= max_frames:
        return list(range(count))
    blocks = [i for i, e in enumerate(walk) if e.is_block]
    layers = [i for i, e in enumerate(walk) if not e.is_block]
    chosen = _evenly(blocks, max_frames)
    chosen += _evenly(layers, max_frames - len(chosen))
    return sorted(chosen)


def _evenly(indices: list[int], budget: int) -> list[int]:
    """``budget`` of ``indices`` spread evenly from the first to the last (all if they fit)."""
    if budget >= len(indices):
        return list(indices)
    if budget <= 0:
        return []
    if budget == 1:
        return [indices[0]]
    step = (len(indices) - 1) / (budget - 1)
    return sorted({indices[round(k * step)] for k in range(budget)})


def _frame_data_uri(stepper, number: int, dpi: int, colors: int) -> str:
    """One frame as a palette PNG ``data:`` URI (Pillow comes with matplotlib)."""
    from PIL import Image  # noqa: PLC0415

    from minisd.plots import trace_drawings  # noqa: PLC0415

    png = trace_drawings.figure_png(stepper.figure(number), dpi=dpi)
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def build_page(stepper, max_frames: int | None = DEFAULT_MAX_FRAMES, dpi: int = DEFAULT_DPI,
               colors: int = DEFAULT_COLORS, title: str | None = None) -> str:
    """The HTML page of a :class:`~minisd.stepper.Stepper`'s walk (see the module's docstring).

    It opens at the stepper's current step if there is one, else at the first step of its view, and
    starts with the stepper's view (phase, blocks only).
    """
    if not isinstance(dpi, int) or not 20 <= dpi <= 300:
        raise ValueError(f"Stepper.to_html: dpi must be a whole number in 20..300, got {dpi!r}")
    if not isinstance(colors, int) or not 2 <= colors <= 256:
        raise ValueError(f"Stepper.to_html: colors must be a whole number in 2..256 (a PNG palette), got {colors!r}")
    walk = stepper.walk
    if not walk:
        raise ValueError("Stepper.to_html: the trace has no steps to show")
    pictured = choose_pictured(walk, max_frames) if stepper.draw else []
    frames, frame_of = [], {}
    for i in pictured:
        frame_of[i] = len(frames)
        frames.append(_frame_data_uri(stepper, i + 1, dpi, colors))
    steps = [{"text": stepper.text(i + 1), "name": e.name, "phase": e.phase, "block": bool(e.is_block),
              "dropped": bool(e.dropped), "frame": frame_of.get(i, -1)} for i, e in enumerate(walk)]
    visible = stepper.visible()
    start = stepper.position if stepper.position in visible else (visible[0] if visible else 0)
    state = {"steps": steps, "frames": frames, "start": start, "phase": stepper.phase,
             "blocksOnly": stepper.blocks_only, "pictured": len(frames)}
    width, height = _frame_pixels(dpi)
    title = title or f"minisd stepper: {len(walk)} steps of one training step"
    summary = (f"{len(walk)} steps, {len(frames)} with a picture"
               + ("" if len(frames) == len(walk) else " (every residual block first, then layers evenly spaced)"))
    return _PAGE.format(title=html.escape(title), summary=html.escape(summary), width=width, height=height,
                        state=_json_for_script(state), script=_SCRIPT, style=_STYLE)


def write_page(page: str, path) -> str:
    """Write ``page`` to ``path`` (UTF-8); returns the path as a string."""
    path = os.fspath(path)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(page)
    return path


def iframe(page: str, height: int = 760) -> str:
    """``page`` inside an ``<iframe srcdoc=...>``, for ``IPython.display.HTML``: its scripts run in
    the frame wherever a notebook's HTML outputs are shown, apart from the notebook's own page.
    (Wrapped in a div: IPython warns about HTML that starts with an iframe.)"""
    return (f'<div class="minisd-stepper-static"><iframe srcdoc="{html.escape(page, quote=True)}" '
            f'style="width: 100%; height: {int(height)}px; border: 1px solid #ddd;" '
            f'title="minisd stepper (static)"></iframe></div>')


def _frame_pixels(dpi: int) -> tuple[int, int]:
    from minisd.plots import trace_drawings  # noqa: PLC0415

    width_in, height_in = trace_drawings.FRAME_SIZE
    return round(width_in * dpi), round(height_in * dpi)


def _json_for_script(value) -> str:
    """JSON that is safe inside a <script> element (no "</" can end it early)."""
    return json.dumps(value, separators=(",", ":")).replace("</", "<\\/")


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 8px; color: #222; }
.controls, .filters { display: flex; flex-wrap: wrap; align-items: center; gap: 6px; margin: 4px 0; }
button { padding: 3px 10px; }
#slider { width: 420px; }
#text { height: 9.5em; overflow: auto; margin: 6px 0; padding: 4px; background: #f7f7f7;
        font-size: 12px; line-height: 1.25; white-space: pre; }
#frame { max-width: 100%; height: auto; display: block; }
#missing { display: none; align-items: center; justify-content: center; color: #666; border: 1px dashed #bbb;
           max-width: 100%; box-sizing: border-box; text-align: center; padding: 1em; }
.summary { color: #666; font-size: 12px; }
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<div class="controls">
  <button id="previous" type="button">&#9664; previous</button>
  <button id="next" type="button">next &#9654;</button>
  <button id="dropped" type="button">next dropped block &#187;</button>
  <label>step <input id="slider" type="range" min="0" max="0" value="0"></label>
  <span id="readout"></span>
</div>
<div class="filters">
  phase
  <label><input type="radio" name="phase" value="both"> both</label>
  <label><input type="radio" name="phase" value="forward"> forward</label>
  <label><input type="radio" name="phase" value="backward"> backward</label>
  <label><input id="blocks" type="checkbox"> blocks only</label>
  <span class="summary">{summary}</span>
</div>
<pre id="text"></pre>
<img id="frame" alt="the step's picture" width="{width}" height="{height}">
<div id="missing" style="width: {width}px; height: {height}px;"></div>
<script id="stepper-data" type="application/json">{state}</script>
<script>{script}</script>
</body>
</html>
"""

# The same walk as minisd.stepper.Stepper: steps numbered once, filters hide but never renumber.
_SCRIPT = r"""
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("stepper-data").textContent);
  const steps = data.steps;
  const $ = (id) => document.getElementById(id);
  let phase = data.phase, blocksOnly = data.blocksOnly, position = data.start;

  function visible() {
    const out = [];
    steps.forEach((s, i) => {
      if ((phase === "both" || s.phase === phase) && (!blocksOnly || s.block)) out.push(i);
    });
    return out;
  }

  // Where to stand when the view hides the current step (as Stepper._nearest_in_view): the same
  // layer in the other phase, else the block that holds it, else the next visible step, else the last.
  function nearestInView(shown) {
    const here = steps[position];
    const same = shown.filter((i) => steps[i].name === here.name);
    if (same.length) return same[0];
    const holders = shown.filter((i) => steps[i].phase === here.phase && steps[i].block &&
                                        here.name.startsWith(steps[i].name + "."));
    if (holders.length) return holders[holders.length - 1];
    const after = shown.filter((i) => i > position);
    return after.length ? after[0] : shown[shown.length - 1];
  }

  function nextDropped() {
    return visible().find((i) => i > position && steps[i].dropped);
  }

  function render() {
    const shown = visible();
    const step = steps[position];
    const slider = $("slider");
    slider.max = Math.max(shown.length - 1, 0);
    slider.value = Math.max(shown.indexOf(position), 0);
    $("readout").textContent = (position + 1) + " (" + (shown.indexOf(position) + 1) + " of " + shown.length +
                               " in this view)";
    $("text").textContent = step.text;
    const frame = $("frame"), missing = $("missing");
    if (step.frame >= 0) {
      frame.src = data.frames[step.frame];
      frame.style.display = "block";
      missing.style.display = "none";
    } else {
      frame.removeAttribute("src");
      frame.style.display = "none";
      missing.textContent = "No picture was drawn in advance for step " + (position + 1) + " (this page holds " +
        data.pictured + " of " + steps.length + " pictures: every residual block, then layers evenly spaced). " +
        "The live widget, Stepper(t).widget(), draws every step.";
      missing.style.display = "flex";
    }
    $("previous").disabled = !shown.length || position <= shown[0];
    $("next").disabled = !shown.length || position >= shown[shown.length - 1];
    $("dropped").disabled = nextDropped() === undefined;
    document.querySelectorAll("input[name=phase]").forEach((r) => { r.checked = r.value === phase; });
    $("blocks").checked = blocksOnly;
  }

  function move(by) {
    const shown = visible();
    const at = shown.indexOf(position);
    if (at < 0) return;
    position = shown[Math.min(Math.max(at + by, 0), shown.length - 1)];
    render();
  }

  function changeView() {
    const shown = visible();
    if (shown.length && shown.indexOf(position) < 0) position = nearestInView(shown);
    render();
  }

  $("previous").addEventListener("click", () => move(-1));
  $("next").addEventListener("click", () => move(1));
  $("dropped").addEventListener("click", () => {
    const found = nextDropped();
    if (found !== undefined) { position = found; render(); }
  });
  $("slider").addEventListener("input", () => {
    const shown = visible();
    position = shown[Number($("slider").value)];
    render();
  });
  document.querySelectorAll("input[name=phase]").forEach((r) => r.addEventListener("change", () => {
    phase = r.value;
    changeView();
  }));
  $("blocks").addEventListener("change", () => { blocksOnly = $("blocks").checked; changeView(); });
  document.addEventListener("keydown", (event) => {
    if (event.target.tagName === "INPUT" && event.target.type === "range") return;  // the slider's own keys
    if (event.key === "ArrowRight") move(1);
    if (event.key === "ArrowLeft") move(-1);
  });
  render();
})();
"""
