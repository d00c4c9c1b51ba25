"""Walk a recorded training step one event at a time: text, a picture, and a map of the network.

::

    from minisd import trace
    from minisd.stepper import Stepper
    with trace.record(model, keep_arrays=True) as t:     # one training step
        ...
    s = Stepper(t)              # keeps its position
    s.step(); s.step()          # step 1, then step 2 (each shows its text and picture once)
    s.next_dropped()            # on to the next residual block whose branch was dropped
    s.view(phase="backward")    # visit backward events only ("forward", "both"); blocks_only=True
    s.widget()                  # in Jupyter: buttons, a slider, the phase filter, blocks only
    s.to_html("step.html")      # the same controls in one static page (minisd.stepper_html)

One numbering scheme: the walk (by default the layers that compute and the residual blocks, in the
order they ran: forward, then backward) is numbered 1..M once, as ``t.table()`` numbers its rows.
Filters hide steps but never renumber them, so "step 170 of 328" names the same event in every
view, in the text, on the slider, in the picture's title and in row 170 of the table. Residual
blocks are numbered l = 1..L as in the paper's p_l = 1 - l/L (1 - p_L), in the text and on the map.

Colours: by default each step's picture has its own colour scale (``scale="layer"``), so every
array shows its pattern, whatever its size; the colour bar gives the values. ``scale="stage"``
shares one scale per stage and kind (activations, gradients), and ``scale="shared"`` one per kind
for the whole walk, to compare magnitudes (small arrays then look faint). The text and the colour
bar say which scale a picture uses.

Where things live: :mod:`minisd.trace` records (and knows nothing of pictures),
:mod:`minisd.plots.trace_drawings` draws (:func:`~minisd.plots.stepper_frame`: the event beside
:func:`~minisd.plots.network`), and this module walks and shows. Pictures are built with
``matplotlib.figure.Figure`` and shown as PNG bytes, never through pyplot (see
:mod:`minisd.plots.figure`), so a redraw in JupyterLab, where widget callbacks run on a kernel
thread of their own, cannot be drawn half-built by pyplot's hooks.
"""
from __future__ import annotations

import html
import threading
from collections import OrderedDict

from minisd.plots import trace_drawings
from minisd.trace import PHASES, Trace

__all__ = ["Stepper"]

VIEW_PHASES = ("both",) + PHASES


def _in_notebook() -> bool:
    """True inside a Jupyter kernel (where IPython's display shows images)."""
    try:
        from IPython import get_ipython  # noqa: PLC0415
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def _show(text: str, png: bytes | None) -> None:
    """Show one frame: its text, then its picture (the picture was built before anything is shown)."""
    print(text)
    if png is not None and _in_notebook():
        from IPython.display import Image, display  # noqa: PLC0415

        display(Image(data=png, format="png"))


class Stepper:
    """Walk a :class:`~minisd.trace.Trace` one event at a time.

    trace: a recording (``keep_arrays=True`` for pictures of the arrays; without it the pictures
    show the norms). which: "layers" (leaf layers and residual blocks, the default) or "all"
    (containers too). phase: "both", "forward" or "backward"; blocks_only: visit the residual
    blocks only. draw: build pictures (False: text only). max_channels: channels per picture.
    scale: the arrays' colour scale, "layer" (each step its own, the default), "stage" (one per
    stage and kind) or "shared" (one per kind for the whole walk).

    ``step()``, ``back()``, ``go(n)`` and ``next_dropped()`` move and show the new position once
    (print the text; in a notebook also the picture) and return None, so a call as a cell's last
    line shows nothing twice. ``text()``, ``figure()`` and ``png()`` give the parts of any step.
    """

    def __init__(self, trace: Trace, which: str = "layers", phase: str = "both", blocks_only: bool = False,
                 draw: bool = True, max_channels: int = 8, scale: str = "layer"):
        if which not in ("layers", "all"):
            raise ValueError(f"Stepper: which must be 'layers' or 'all', got {which!r}")
        if scale not in trace_drawings.SCALES:
            raise ValueError(f"Stepper: scale must be one of {', '.join(trace_drawings.SCALES)}, got {scale!r}")
        self.trace = trace
        self.which = which
        self.scale = scale
        self.walk = trace.steps(which)
        self.draw = bool(draw)
        self.max_channels = int(max_channels)
        self.position = -1  # index into self.walk; -1 before the first step
        self.phase, self.blocks_only = "both", False
        self.view(phase=phase, blocks_only=blocks_only, show=False)
        self._limits = None  # the colour scales: at the first picture
        self._stages = None  # block l -> its stage's name, for the stage colour scales: when first asked
        self._maps = {}      # the network map of each phase, drawn once: at the first picture of that phase
        self._pngs: OrderedDict[int, bytes] = OrderedDict()   # recent frames, for quick back-and-forth
        self._lock = threading.RLock()  # widget callbacks may arrive on several threads at once
        self._prefetching = False

    # ---- where we are ------------------------------------------------------------------------

    def __len__(self):
        return len(self.walk)

    @property
    def number(self) -> int:
        """The current step's number, 1..len(self) (0 before the first step)."""
        return self.position + 1

    @property
    def current(self):
        """The current event (None before the first step)."""
        return self.walk[self.position] if self.position >= 0 else None

    def visible(self) -> list[int]:
        """Indices into ``walk`` of the steps the current view visits."""
        return [i for i, e in enumerate(self.walk)
                if (self.phase == "both" or e.phase == self.phase) and (not self.blocks_only or e.is_block)]

    def view(self, phase: str | None = None, blocks_only: bool | None = None, show: bool = True) -> None:
        """Choose which steps are visited: phase "both", "forward" or "backward", and blocks only or not.

        If the new view hides the current step, moves to the same layer in the other phase, else to
        the residual block that holds it, else to the next visible step.
        """
        if phase is not None:
            if phase not in VIEW_PHASES:
                raise ValueError(f"Stepper: phase must be one of {VIEW_PHASES}, got {phase!r}")
            self.phase = phase
        if blocks_only is not None:
            self.blocks_only = bool(blocks_only)
        visible = self.visible()
        if self.position >= 0 and visible and self.position not in visible:
            self.position = self._nearest_in_view(visible)
        if show and self.position >= 0:
            self.show()

    def _nearest_in_view(self, visible: list[int]) -> int:
        """Where to stand when the view hides the current step: the same layer in the other phase
        (forward <-> backward), else the block that holds the current layer, else the next visible
        step, else the last one."""
        here = self.walk[self.position]
        same = [i for i in visible if self.walk[i].name == here.name]
        if same:
            return same[0]
        holders = [i for i in visible if self.walk[i].phase == here.phase and self.walk[i].is_block
                   and here.name.startswith(self.walk[i].name + ".")]
        if holders:
            return holders[-1]
        after = [i for i in visible if i > self.position]
        return after[0] if after else visible[-1]

    def _after(self, n: int) -> int:
        """The index n visible steps away from the current one (clamped to the view's ends)."""
        visible = self.visible()
        if not visible:
            raise ValueError(f"Stepper: nothing to visit (phase={self.phase!r}, blocks_only={self.blocks_only}; "
                             f"the trace has {len(self.trace.events)} events)")
        if self.position < 0:
            return visible[min(max(n, 1), len(visible)) - 1]
        if self.position not in visible and n == 0:
            return self._nearest_in_view(visible)
        if n > 0:
            ahead = [i for i in visible if i > self.position]
            return ahead[min(n, len(ahead)) - 1] if ahead else max(i for i in visible if i <= self.position)
        if n < 0:
            behind = [i for i in visible if i < self.position]
            return behind[max(n, -len(behind))] if behind else visible[0]
        return self.position

    def next_dropped_index(self) -> int | None:
        """Index of the next visible residual block whose branch was dropped, after the current step."""
        return next((i for i in self.visible() if i > self.position and self.walk[i].dropped), None)

    # ---- moving (each move shows the new step once) ------------------------------------------

    def step(self, n: int = 1) -> None:
        """Move n visible steps on (back for a negative n) and show that step."""
        self.position = self._after(n)
        self.show()

    def back(self, n: int = 1) -> None:
        """Move n visible steps back and show that step."""
        self.step(-n)

    def go(self, number: int) -> None:
        """Go to step ``number`` (1..len(self), as the text numbers it) and show it."""
        if not 1 <= int(number) <= len(self.walk):
            raise ValueError(f"Stepper: step number must be 1..{len(self.walk)}, got {number}")
        self.position = int(number) - 1
        self.show()

    def next_dropped(self) -> None:
        """Move to the next residual block whose branch was dropped (in the current view) and show it."""
        found = self.next_dropped_index()
        if found is None:
            print(f"no dropped block after step {self.number} in this view")
            return
        self.position = found
        self.show()

    def reset(self) -> None:
        """Back to before the first step (the next ``step()`` shows step 1 of the view)."""
        self.position = -1

    # ---- what a step looks like --------------------------------------------------------------

    def _index(self, number: int | None) -> int:
        if number is None:
            if self.position < 0:
                raise ValueError("Stepper: no current step yet; call step() first or pass a step number")
            return self.position
        if not 1 <= int(number) <= len(self.walk):
            raise ValueError(f"Stepper: step number must be 1..{len(self.walk)}, got {number}")
        return int(number) - 1

    def heading(self, number: int | None = None) -> str:
        i = self._index(number)
        return f"step {i + 1} of {len(self.walk)}"

    def text(self, number: int | None = None) -> str:
        """The words for a step (default: the current one): its number, what the event did, and
        which colour scale its picture uses."""
        i = self._index(number)
        other = ("scale='shared' compares magnitudes across the walk" if self.scale != "shared"
                 else "scale='layer' gives each picture its own scale")
        return (self.heading(i + 1) + "   " + self.walk[i].describe()
                + f"\n    colours: {self.color_scale(i + 1)[1]} (Stepper(t, {other}))")

    def stage_of(self, event) -> str:
        """The colour-scale group of an event: "stem", "head", or the stage of its residual block
        named by its blocks' numbers ("blocks l = 19-36")."""
        if event.block is None:
            region = self.trace.place(event).region
            return region if region in ("stem", "head") else "the whole network"
        if self._stages is None:
            self._stages = {}
            for stage, ks in trace_drawings.network_data(self.trace)["stages"]:
                for k in ks:
                    self._stages[k + 1] = f"blocks l = {ks[0] + 1}-{ks[-1] + 1}"
        return self._stages[event.block]


    def color_limits(self) -> dict:
        """The colour scales of the walk: {kind: limit} with ``scale="shared"``, {(kind, stage):
        limit} with ``scale="stage"`` (see :func:`minisd.plots.trace_color_limits`), {} with "layer"."""
        if self._limits is None:
            if self.scale == "layer":
                self._limits = {}
            else:
                group = self.stage_of if self.scale == "stage" else None
                self._limits = trace_drawings.trace_color_limits(self.walk, self.max_channels, group=group)
        return self._limits

    def color_scale(self, number: int | None = None) -> tuple:
        """(limit, scope) of a step's picture: the values drawn span [-limit, limit] (None: the
        step's own largest value), and ``scope`` names that scale for the colour bar."""
        event = self.walk[self._index(number)]
        kind = trace_drawings.array_kind(event)
        if self.scale == "layer":
            return None, "this layer's own scale"
        if self.scale == "shared":
            return self.color_limits()[kind], "one scale for all steps"
        stage = self.stage_of(event)
        return self.color_limits()[kind, stage], f"one scale per stage: {stage}"

    def figure(self, number: int | None = None):
        """The picture of a step (default: the current one) as a matplotlib Figure."""
        i = self._index(number)
        event = self.walk[i]
        with self._lock:
            limit, scope = self.color_scale(i + 1)
            if event.phase not in self._maps:  # the map drawn once per phase; each frame marks its place
                self._maps[event.phase] = trace_drawings.NetworkRaster(self.trace, phase=event.phase)
            return trace_drawings.stepper_frame(self.trace, event, self.heading(i + 1), limit, scope,
                                                self.max_channels, raster=self._maps[event.phase])

    def png(self, number: int | None = None) -> bytes:
        """The picture of a step as PNG bytes (the last few are kept, so going back is instant)."""
        i = self._index(number)
        with self._lock:
            if i in self._pngs:
                self._pngs.move_to_end(i)
                return self._pngs[i]
            data = trace_drawings.figure_png(self.figure(i + 1))
            self._pngs[i] = data
            while len(self._pngs) > 32:
                self._pngs.popitem(last=False)
            return data

    def _prefetch(self, indices) -> None:
        """Draw the likely next steps (``indices``: next, next dropped block) on a background thread
        while the student looks at this one, so the usual click finds its picture ready. One
        thread at a time; the lock in png() keeps it from drawing beside a click's own drawing."""
        todo = [i for i in dict.fromkeys(indices) if i is not None and i != self.position and i not in self._pngs]
        if not todo or self._prefetching:
            return

        def draw():
            try:
                for index in todo:
                    self.png(index + 1)
            except Exception:  # noqa: BLE001  (a guess that failed; the click that needs it draws and reports)
                pass
            finally:
                self._prefetching = False

        self._prefetching = True
        threading.Thread(target=draw, name="minisd-stepper-prefetch", daemon=True).start()

    def show(self) -> None:
        """Show the current step: build its picture first, then print the text and show the picture."""
        png = self.png() if self.draw and _in_notebook() else None
        _show(self.text(), png)

    def __repr__(self):
        where = f"step {self.number} of {len(self.walk)}" if self.position >= 0 else f"{len(self.walk)} steps, not started"
        view = ("both phases" if self.phase == "both" else f"{self.phase} only") + (", blocks only" if self.blocks_only else "")
        return f"<Stepper: {where}; view: {view}; step(), back(), go(n), next_dropped(), view(...), widget()>"

    def to_html(self, path=None, max_frames: int | None = 80, dpi: int = 60, colors: int = 128,
                title: str | None = None):
        """The walk as one self-contained HTML page: no kernel, no network (see :mod:`minisd.stepper_html`
        for what is pre-rendered). Returns the page as a string, or writes it to ``path`` and returns the path."""
        from minisd import stepper_html  # noqa: PLC0415

        page = stepper_html.build_page(self, max_frames=max_frames, dpi=dpi, colors=colors, title=title)
        return page if path is None else stepper_html.write_page(page, path)

    # ---- the widget --------------------------------------------------------------------------

    def widget(self):
        """Buttons (previous, next, next dropped block), a slider over the visible steps, a phase
        filter and a blocks-only switch, above the step's text and picture.

        Each move builds the new picture first, then swaps the image and the text in place: the
        widget keeps its size (every frame has the same size), so the page does not jump.
        """
        import ipywidgets as widgets  # noqa: PLC0415

        if self.position < 0:
            self.position = self._after(1)
        previous = widgets.Button(description="\u25c0 previous", layout=widgets.Layout(width="110px"))
        following = widgets.Button(description="next \u25b6", layout=widgets.Layout(width="110px"))
        dropped = widgets.Button(description="next dropped block \u00bb", layout=widgets.Layout(width="190px"))
        slider = widgets.SelectionSlider(options=[("1", 0)], description="step", continuous_update=False,
                                         layout=widgets.Layout(width="420px"))
        phase = widgets.ToggleButtons(options=[("both", "both"), ("forward", "forward"), ("backward", "backward")],
                                      value=self.phase, description="phase",
                                      style={"button_width": "90px"})
        blocks = widgets.Checkbox(value=self.blocks_only, description="blocks only", indent=False,
                                  layout=widgets.Layout(width="120px"))
        text = widgets.HTML(layout=widgets.Layout(height="9.5em", overflow="auto"))
        image = widgets.Image(format="png", layout=widgets.Layout(max_width="100%", height="auto"))
        for w, name in ((previous, "previous"), (following, "next"), (dropped, "dropped"), (slider, "slider"),
                        (phase, "phase"), (blocks, "blocks"), (text, "text"), (image, "image")):
            w.add_class(f"minisd-stepper-{name}")  # stable handles for the browser test
        quiet = {"slider": False}  # True while the code itself moves the slider

        def refresh_slider():
            quiet["slider"] = True
            try:
                slider.options = [(str(i + 1), i) for i in self.visible()] or [("-", -1)]
                if self.position in self.visible():
                    slider.value = self.position
            finally:
                quiet["slider"] = False

        def render():
            # The picture first (the slow part), then text and image are swapped together.
            png = self.png() if self.draw else b""
            words = self.text()
            image.value = png
            text.value = f"<pre style='margin:0; line-height:1.25'>{html.escape(words)}</pre>"
            visible = self.visible()
            previous.disabled = not visible or self.position <= visible[0]
            following.disabled = not visible or self.position >= visible[-1]
            dropped.disabled = self.next_dropped_index() is None
            if self.draw:
                self._prefetch([self._after(1), self.next_dropped_index()])

        def move_to(target):
            """target: a function of the current position giving the new one; called under the lock,
            so two clicks handled at once on two threads move two steps, not one."""
            with self._lock:
                index = target()
                if index is None or index == self.position and image.value:
                    return
                self.position = index
                if slider.value != index and index in self.visible():
                    quiet["slider"] = True
                    try:
                        slider.value = index
                    finally:
                        quiet["slider"] = False
                render()

        def on_slider(change):
            if not quiet["slider"] and change["new"] is not None and change["new"] >= 0:
                move_to(lambda: change["new"])

        def on_view(_change):
            with self._lock:
                self.view(phase=phase.value, blocks_only=blocks.value, show=False)
                refresh_slider()
                render()

        previous.on_click(lambda _: move_to(lambda: self._after(-1)))
        following.on_click(lambda _: move_to(lambda: self._after(1)))
        dropped.on_click(lambda _: move_to(self.next_dropped_index))
        slider.observe(on_slider, names="value")
        phase.observe(on_view, names="value")
        blocks.observe(on_view, names="value")
        with self._lock:
            refresh_slider()
            render()
        controls = widgets.HBox([previous, following, dropped, slider])
        filters = widgets.HBox([phase, blocks])
        return widgets.VBox([controls, filters, text, image])
