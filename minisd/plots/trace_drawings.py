"""Trace and stepper drawings: one recorded event (its arrays as heat maps), the map of a traced
network, and the stepper's frame (the event beside the map).

Built on :func:`~minisd.plots.figure.new_figure`, never on pyplot, with font sizes set on each
text rather than through rcParams: the stepper widget redraws on a kernel thread of its own in
JupyterLab, and neither pyplot's hooks nor another thread's settings may touch a half-built frame.

* :func:`trace_event`    the picture of one event
* :func:`network`        a map of a traced network: blocks, dropped branches, gradient per edge
* :func:`stepper_frame`  what the stepper (minisd.stepper) shows: an event beside the map
"""
from __future__ import annotations

import math

import numpy

from minisd.plots.figure import CONSTANT_COLOR, KEPT_COLOR, bare_axes, figure_png, new_figure, save_figure

__all__ = ["trace_event", "trace_color_limits", "network", "network_data", "stepper_frame", "NetworkRaster",
           "figure_png"]

ACTIVATION_CMAP = "BrBG"   # forward arrays: brown negative, teal positive
GRADIENT_CMAP = "RdBu_r"   # backward arrays: blue negative, red positive
FLOW_CMAP = "viridis"      # norms on the network map's edges (dark small, yellow large)
HIGHLIGHT_COLOR = "#FFE680"
FRAME_SIZE = (15.0, 6.4)   # inches; every stepper frame has this size, so the widget never jumps
FRAME_DPI = 80             # 1200 x 512 pixels: the whole frame fits a 1280-pixel-wide projector
# Text of a frame, in points at FRAME_DPI: 12 pt is 13.3 pixels, 10 pt where the frame is shown at
# its natural size in a browser (96 pixels to the inch), the least a room reads off a projector.
FRAME_TEXT = 12
SCALES = ("layer", "stage", "shared")  # colour scales of the arrays: see trace_color_limits


def _shown_slice(array, max_channels):
    """What the pictures show of an array: the first sample, at most ``max_channels`` channels."""
    a = numpy.asarray(array)
    if a.ndim == 4:
        return a[0, :max_channels]
    if a.ndim >= 2:
        return a[:1]
    return a.reshape(1, -1)


def array_kind(event) -> str:
    """What a frame of ``event`` shows: "activation" (forward) or "gradient" (backward)."""
    return "activation" if event.phase == "forward" else "gradient"


def trace_color_limits(events, max_channels: int = 8, percentile: float = 99.5, group=None) -> dict:
    """Colour scales of the arrays that frames show, one per kind of array (and per group).

    Returns {"activation": limit, "gradient": limit}, or with ``group`` (a function of an event
    giving a name, for example its stage) {(kind, name): limit}: the ``percentile`` of |value| over
    everything the frames show (first sample, first ``max_channels`` channels) of the forward
    events (activations) and of the backward events (gradients) of that group. Pictures then use
    [-limit, limit]. One scale for the whole walk compares magnitudes (a gradient that shrinks from
    one step to the next looks fainter) but leaves the small arrays nearly blank; one per stage
    shows each stage's arrays. (A percentile rather than the maximum: one outlier would otherwise
    wash out every other frame.)
    """
    shown = {}
    for e in events:
        key = array_kind(e) if group is None else (array_kind(e), group(e))
        parts = shown.setdefault(key, [])
        for array in (e.in_array, e.out_array):
            if array is not None and getattr(array, "size", 0):
                parts.append(numpy.abs(_shown_slice(array, max_channels)).ravel().astype(float))
    if group is None:
        shown.setdefault("activation", [])
        shown.setdefault("gradient", [])
    limits = {}
    for key, parts in shown.items():
        values = numpy.concatenate(parts) if parts else numpy.zeros(1)
        values = values[numpy.isfinite(values)]
        limit = float(numpy.percentile(values, percentile)) if values.size else 0.0
        limits[key] = limit if limit > 0 else 1.0
    return limits


def _event_title(event) -> str:
    title = f"{event.phase}: {event.where} ({event.kind})"
    if event.gate is not None and event.gate != "eval":
        gate = event.gate if event.gate != "rows" else f"rows, {event.kept_fraction:.0%} kept"
        title += f"   gate: {gate}" + (", branch skipped" if event.skipped else "")
    return title


def _mosaic(maps):
    """Channel maps side by side in one array, separated by a column of NaN (drawn white).

    maps: (C, H, W) -> (H, C*W + (C-1)*gap). One image instead of C small axes: a frame draws in a
    fraction of the time, which is what keeps the stepper's redraw quick.
    """
    count, h, w = maps.shape
    gap = max(1, w // 6)
    out = numpy.full((h, count * w + (count - 1) * gap), numpy.nan)
    for c in range(count):
        out[:, c * (w + gap): c * (w + gap) + w] = maps[c]
    return out, w, gap


def _value_formatter():
    from matplotlib.ticker import FuncFormatter  # noqa: PLC0415

    return FuncFormatter(lambda v, _: f"{v:.2g}")


def _draw_event(fig, spec, event, max_channels, limit=None, scope=None):
    """Draw one event into the region ``spec`` of ``fig`` (a SubplotSpec).

    Top row: what came in; bottom row: what went out (first sample, first channels side by side).
    Forward shows activations, backward gradients, each on the colour scale [-limit, limit]
    (None: this event's own scale), which the colour bar names by ``scope`` ("one scale per
    stage: layer2", ...). Without kept arrays, the two norms as bars.
    """
    import matplotlib  # noqa: PLC0415

    forward = event.phase == "forward"
    names = ("input x", "output y") if forward else ("incoming dL/dy", "outgoing dL/dx")
    shapes = (event.in_shape, event.out_shape)
    norms = (event.in_norm, event.out_norm)
    if event.in_array is None or event.out_array is None:
        ax = fig.add_subplot(spec)
        ax.barh([1, 0], list(norms), color=[CONSTANT_COLOR, KEPT_COLOR])
        ax.set_yticks([1, 0])
        ax.set_yticklabels([f"{n}\n{s}" for n, s in zip(names, shapes)], fontsize=FRAME_TEXT)
        ax.set_xlabel("L2 norm", fontsize=FRAME_TEXT)
        ax.tick_params(labelsize=FRAME_TEXT)
        ax.set_title("(record with keep_arrays=True to see the arrays)", fontsize=FRAME_TEXT)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        return
    kind = array_kind(event)
    cmap = matplotlib.colormaps[ACTIVATION_CMAP if forward else GRADIENT_CMAP].with_extremes(bad="white")
    rows = [numpy.asarray(_shown_slice(event.in_array, max_channels), dtype=float),
            numpy.asarray(_shown_slice(event.out_array, max_channels), dtype=float)]
    if limit is None:  # the event's own scale: the same percentile as trace_color_limits, over this frame
        limit = trace_color_limits([event], max_channels)[kind]
        scope = "this layer's own scale"
    grid = spec.subgridspec(2, 2, width_ratios=[1, 0.025], wspace=0.04, hspace=0.3)
    image = None
    for r, (maps, name, shape, norm) in enumerate(zip(rows, names, shapes, norms)):
        ax = fig.add_subplot(grid[r, 0])
        bare_axes(ax)
        if maps.ndim == 3:  # (C, H, W): channel maps side by side, each square
            mosaic, w, gap = _mosaic(maps)
            # Pad to the width of max_channels maps, so that every frame has the same geometry.
            full = max_channels * w + (max_channels - 1) * gap
            mosaic = numpy.pad(mosaic, ((0, 0), (0, full - mosaic.shape[1])), constant_values=numpy.nan)
            image = ax.imshow(mosaic, cmap=cmap, vmin=-limit, vmax=limit, interpolation="nearest",
                              aspect="equal")
            for c in range(len(maps)):
                ax.text(c * (w + gap) + w / 2 - 0.5, -0.6, f"ch {c}", ha="center", va="bottom",
                        fontsize=FRAME_TEXT)
        else:  # (1, F): a feature vector, one strip over the row
            image = ax.imshow(maps, cmap=cmap, vmin=-limit, vmax=limit, interpolation="nearest", aspect="auto")
            ax.set_title(f"{maps.shape[1]} values", fontsize=FRAME_TEXT)
        ax.set_ylabel(f"{name}\n{shape}\nnorm {norm:.3g}", fontsize=FRAME_TEXT, rotation=0, ha="right",
                      va="center", labelpad=8)
    cax = fig.add_subplot(grid[:, 1])
    bar = fig.colorbar(image, cax=cax, format=_value_formatter())
    bar.set_label(f"{kind} value ({scope})", fontsize=FRAME_TEXT)
    cax.tick_params(labelsize=FRAME_TEXT)


def trace_event(event, max_channels: int = 8, limits=None, save=None):
    """One trace event as a picture: the first sample's maps going in (top row) and coming out
    (bottom row); forward shows activations, backward gradients.

    limits: {"activation": a, "gradient": g} from :func:`trace_color_limits` to draw on a scale
    shared with other events (None: this event's own scale). Without kept arrays
    (``keep_arrays=False``) it draws the two norms as bars instead.
    """
    has_arrays = event.in_array is not None and event.out_array is not None
    fig = new_figure((max(6.0, 1.2 * max_channels + 2.5), 4.4) if has_arrays else (7.0, 3.2))
    grid = fig.add_gridspec(1, 1, left=0.16 if has_arrays else 0.3, right=0.93, top=0.8, bottom=0.12)
    limit = None if limits is None else limits[array_kind(event)]
    _draw_event(fig, grid[0, 0], event, max_channels, limit, "one scale for all steps")
    fig.suptitle(_event_title(event), fontsize=13)
    return save_figure(fig, save)


def network_data(trace) -> dict:
    """What the network map draws, from one recorded step.

    Returns {"stem": [names], "head": [names], "stages": [(name, [block indices])], "blocks": [...]}
    with one dict per residual block: name, l (1..L), stage, gate, kept_fraction, survival_prob,
    channels, and under "forward" and "backward" the norms that went along its edges in that phase
    (NaN where nothing flowed or nothing was recorded): ``entry`` (x at the block's input in forward,
    dL/dx in backward), ``shortcut`` (out of the shortcut), ``branch`` (out of the branch; NaN when
    it was dropped) and ``exit`` (the block's output y, or the dL/dy that reached it).
    """
    names = trace.block_names
    events = {"forward": {e.name: e for e in trace.forward()}, "backward": {e.name: e for e in trace.backward()}}
    nan = math.nan

    def flow(phase, name):
        found = events[phase]
        block = found.get(name)
        # forward runs entry -> exit (x in, y out); backward runs exit -> entry (dL/dy in, dL/dx out)
        entry, exit_ = ((block.in_norm, block.out_norm) if phase == "forward" else (block.out_norm, block.in_norm)) \
            if block else (nan, nan)
        return {"entry": entry, "exit": exit_,
                "shortcut": found[name + ".shortcut"].out_norm if name + ".shortcut" in found else nan,
                "branch": found[name + ".branch"].out_norm if name + ".branch" in found else nan}

    blocks, stages = [], []
    for k, name in enumerate(names):
        stage = name.rsplit(".", 1)[0] if "." in name else ""
        if not stages or stages[-1][0] != stage:
            stages.append((stage, []))
        stages[-1][1].append(k)
        f, b = events["forward"].get(name), events["backward"].get(name)
        head = f or b
        blocks.append({
            "name": name, "l": k + 1, "stage": stage,
            "gate": head.gate if head else None,
            "kept_fraction": head.kept_fraction if head else None,
            "survival_prob": head.survival_prob if head else None,
            "channels": (f.out_shape[1] if f and len(f.out_shape) > 1 else None),
            "forward": flow("forward", name),
            "backward": flow("backward", name),
        })
    outside = {"stem": [], "head": []}
    for e in trace.forward():
        place = trace.place(e)
        if place.region in outside and e.name not in outside[place.region]:
            outside[place.region].append(e.name)
    return {"stem": outside["stem"], "head": outside["head"], "stages": stages, "blocks": blocks}


def _flow_norm(data, phase="backward"):
    """One logarithmic colour scale for every edge of the map in ``phase`` (None if that phase was
    not recorded)."""
    from matplotlib.colors import LogNorm  # noqa: PLC0415

    values = [b[phase][key] for b in data["blocks"] for key in ("entry", "shortcut", "branch", "exit")]
    values = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    if not values:
        return None
    low, high = min(values), max(values)
    if high <= low * 1.0001:
        low, high = low / 1.5, high * 1.5
    return LogNorm(vmin=low, vmax=high)


def _block_label(block, roomy: bool) -> str:
    """The block's number l as in the paper, with p_l where the map has room (``roomy``), and
    the kept share of the batch in row mode. Kept or dropped is drawn (dropped: grey, hatched)."""
    parts = [f"l={block['l']}"]
    if block["gate"] == "rows":
        parts.append(f"{block['kept_fraction']:.0%}")
    if roomy and block["survival_prob"] is not None:
        parts.append(f"p={block['survival_prob']:.2f}".replace("0.", "."))
    return " ".join(parts)


_COLUMN_WIDTH = 1.15  # map coordinates: one column per stage, one unit per block row
_MAIN_DX = 0.14       # the main line's x inside a column
_STEM_Y = 1.3         # the stem box's centre, above the first row (raised where the stage headers need it)
_ROOMY_ROWS = 9       # up to this many blocks per stage, a block's label also gives p_l


def _map_text_size(data) -> float:
    """One size for every text on the map: FRAME_TEXT, whatever the depth (the labels shorten)."""
    return FRAME_TEXT


def _highlight_box(data, place):
    """Where the map marks ``place``: (x, y, width, height, arrow on the left) in map coordinates,
    "all" for the whole network or a stage, or None."""
    if place is None:
        return None
    if place.region in ("model", "stage"):
        return "all"
    stages = data["stages"] or [("", [])]
    if place.region == "stem":
        stem_y = data.get("stem_y", _STEM_Y)
        return (-0.02, stem_y - 0.38, 1.16, 0.76, False) if data["stem"] else None
    if place.region == "head":
        last_rows = len(stages[-1][1])
        return ((len(stages) - 1) * _COLUMN_WIDTH - 0.02, -last_rows - 0.98, 1.16, 0.76, False) if data["head"] else None
    for column, (_, ks) in enumerate(stages):
        if place.block in ks:
            x0, y0 = column * _COLUMN_WIDTH, -ks.index(place.block)
            if place.part == "branch":
                return (x0 + 0.23, y0 - 0.82, 0.83, 0.64, False)
            if place.part == "shortcut":
                return (x0 + _MAIN_DX - 0.1, y0 - 0.9, 0.2, 0.8, True)
            return (x0 + 0.02, y0 - 0.98, _COLUMN_WIDTH - 0.1, 0.96, False)
    return None


def _mark(ax, box, phase, text_size, to_axes=None):
    """Mark the current place on top of the map: a translucent box with a black frame, and an
    arrow down (forward) or up (backward) beside it. ``to_axes`` maps map coordinates to the
    coordinates of ``ax`` (for a map pasted as pixels); None: ax is the map itself."""
    import matplotlib  # noqa: PLC0415
    from matplotlib.patches import Rectangle  # noqa: PLC0415

    if box is None:
        return
    if box == "all":
        ax.patch.set_facecolor("#FFF8D6")  # the whole network (or a stage) is the current call
        return
    x, y, w, h, arrow_left = box
    to_axes = to_axes or (lambda px, py: (px, py))
    (ax0, ay0), (ax1, ay1) = to_axes(x, y), to_axes(x + w, y + h)
    ax.add_patch(Rectangle((min(ax0, ax1), min(ay0, ay1)), abs(ax1 - ax0), abs(ay1 - ay0),
                           facecolor=matplotlib.colors.to_rgba(HIGHLIGHT_COLOR, 0.45), edgecolor="black", lw=2.0,
                           zorder=5))
    arrow = "\u25bc" if phase == "forward" else "\u25b2"
    tx, ty = to_axes(x - 0.01 if arrow_left else x + w + 0.01, y + h / 2)
    ax.text(tx, ty, arrow, ha="right" if arrow_left else "left", va="center", fontsize=text_size + 3, zorder=6)


def _draw_network(fig, ax, cax, trace, highlight=None, data=None, norm=None, phase="backward"):
    """Draw the network map into ``ax`` (and its colour bar into ``cax``), its edges coloured by
    the norms of ``phase`` (activations in forward, gradients in backward); see :func:`network`.

    Coordinates: one column per stage, 1.15 wide; block rows one unit tall, the first at y = 0 .. -1.
    Inside a row the main line runs down at x = 0.14 (entry, shortcut, exit) and the branch is a
    box to its right, split from the line at the top and joined back at the bottom (the circle).
    All lines go into two LineCollections (solid and dashed), which draw much faster than one
    Line2D per segment.
    """
    import matplotlib  # noqa: PLC0415
    from matplotlib.collections import LineCollection  # noqa: PLC0415
    from matplotlib.patches import FancyBboxPatch  # noqa: PLC0415

    data = data if data is not None else network_data(trace)
    norm = norm if norm is not None else _flow_norm(data, phase)
    cmap = matplotlib.colormaps[FLOW_CMAP]
    grey = "#A8A8A8"

    # Every edge colour in one vectorised call (a colour map called per value is slow).
    keys = ("entry", "shortcut", "branch", "exit")
    values = numpy.array([[b[phase][key] for key in keys] for b in data["blocks"]], dtype=float).reshape(-1, len(keys))
    usable = numpy.isfinite(values) & (values > 0)
    rgba = cmap(norm(numpy.where(usable, values, 1.0))) if norm is not None and values.size else None
    edge_colours = [{key: (tuple(rgba[k, j]) if rgba is not None and usable[k, j] else grey)
                     for j, key in enumerate(keys)} for k in range(len(data["blocks"]))]

    stages = data["stages"] or [("", [])]
    rows = max(len(ks) for _, ks in stages)
    roomy = rows <= _ROOMY_ROWS
    text_size = _map_text_size(data)
    # Room above the first row for the stage headers (one line of text) and the stem box: a line's
    # height in map units depends on how many rows share the axes' height, so it is solved for here.
    line_px = 1.5 * text_size * fig.dpi / 72
    axes_px = ax.get_position().height * fig.get_figheight() * fig.dpi
    px_per_unit = max(1e-6, (axes_px - line_px) / (rows + 1.05 + 0.12 + 0.1 + 0.76 + 0.1))
    stem_y = max(_STEM_Y, 0.12 + line_px / px_per_unit + 0.1 + 0.38)
    data["stem_y"] = stem_y
    x_px_per_unit = ax.get_position().width * fig.get_figwidth() * fig.dpi / (len(stages) * _COLUMN_WIDTH + 0.1)
    main_dx, width = _MAIN_DX, _COLUMN_WIDTH
    solid, solid_colours, solid_widths, dashed = [], [], [], []
    joins_x, joins_y = [], []

    for column, (stage, ks) in enumerate(stages):
        x0 = column * width
        main = x0 + main_dx
        channels = data["blocks"][ks[0]]["channels"] if ks else None
        numbers = f"l={data['blocks'][ks[0]]['l']}-{data['blocks'][ks[-1]]['l']}" if ks else (stage or "blocks")
        ax.text(x0 + 0.5, 0.12, numbers + (f", {channels} ch" if channels else ""), ha="center",
                va="bottom", fontsize=text_size, fontweight="bold")
        for row, k in enumerate(ks):
            b = data["blocks"][k]
            y0 = -row
            dropped = b["gate"] == "dropped" or not math.isfinite(b[phase]["branch"]) and b["gate"] == "rows"
            for (ya, yb), key in (((y0, y0 - 0.15), "entry"), ((y0 - 0.15, y0 - 0.85), "shortcut"),
                                  ((y0 - 0.85, y0 - 1.0), "exit")):
                solid.append([(main, ya), (main, yb)])
                solid_colours.append(edge_colours[k][key])
                solid_widths.append(3.0)
            box_x, box_w = x0 + 0.27, 0.75
            mid = box_x + box_w / 2
            split = [(main, y0 - 0.15), (mid, y0 - 0.15), (mid, y0 - 0.22)]
            join = [(mid, y0 - 0.78), (mid, y0 - 0.85), (main, y0 - 0.85)]
            if dropped:
                dashed += [split, join]
            else:
                solid += [split, join]
                solid_colours += [edge_colours[k]["branch"]] * 2
                solid_widths += [2.0, 2.0]
            ax.add_patch(FancyBboxPatch((box_x, y0 - 0.78), box_w, 0.56, boxstyle="round,pad=0,rounding_size=0.08",
                                        facecolor="#E8E8E8" if dropped else "white",
                                        edgecolor=grey if dropped else edge_colours[k]["branch"],
                                        hatch="///" if dropped else None, lw=1.8, ls="--" if dropped else "-",
                                        zorder=3))
            ax.text(mid, y0 - 0.5, _block_label(b, roomy), ha="center", va="center", fontsize=text_size,
                    color="#333333" if dropped else "black", zorder=4,
                    bbox=dict(facecolor="#E8E8E8", edgecolor="none", pad=0.3) if dropped else None)
            joins_x.append(main)
            joins_y.append(y0 - 0.85)

    def end_box(y, names, what, column):
        if not names:
            return
        x0 = column * width
        ax.add_patch(FancyBboxPatch((x0 + 0.02, y - 0.32), 1.08, 0.64, boxstyle="round,pad=0,rounding_size=0.1",
                                    facecolor="#F2F2F2", edgecolor="black", lw=1.2, zorder=3))
        # The layers' names, where they fit in the box on one line at the map's text size (a
        # character is about 0.55 of the text size wide); else the word alone.
        label = f"{what}: " + ", ".join(names)
        if len(label) * 0.55 * text_size * fig.dpi / 72 > 1.08 * x_px_per_unit:
            label = what
        ax.text(x0 + 0.56, y, label, ha="center", va="center", fontsize=text_size, zorder=4)

    last_rows = len(stages[-1][1])
    end_box(stem_y, data["stem"], "stem", 0)
    end_box(-last_rows - 0.6, data["head"], "head", len(stages) - 1)
    if data["stem"] and stages[0][1]:
        solid.append([(main_dx, stem_y - 0.32), (main_dx, 0.0)])
        solid_colours.append(edge_colours[0]["entry"])
        solid_widths.append(3.0)
    if data["head"] and last_rows:
        main = (len(stages) - 1) * width + main_dx
        solid.append([(main, -last_rows), (main, -last_rows - 0.28)])
        solid_colours.append(edge_colours[-1]["exit"])
        solid_widths.append(3.0)
    ax.add_collection(LineCollection(solid, colors=solid_colours, linewidths=solid_widths, capstyle="butt", zorder=2))
    if dashed:
        ax.add_collection(LineCollection(dashed, colors=grey, linewidths=2.0, linestyles="--", zorder=2))
    ax.plot(joins_x, joins_y, "o", ms=4.5, mfc="white", mec="black", mew=1.0, ls="", zorder=4)
    if highlight is not None:
        _mark(ax, _highlight_box(data, trace.place(highlight)), highlight.phase, text_size)
    ax.set_xlim(-0.1, len(stages) * width)
    ax.set_ylim(-rows - 1.05, stem_y + 0.45)
    bare_axes(ax)
    n_dropped = sum(1 for b in data["blocks"] if b["gate"] == "dropped")
    ax.set_title(f"{len(data['blocks'])} blocks, {n_dropped} dropped (b=0, hatched)\n"
                 "forward runs down each column", fontsize=text_size)
    if cax is not None:
        what = "activation norm on each edge (forward)" if phase == "forward" else \
            "gradient norm on each edge (backward)"
        if norm is None:
            cax.axis("off")
            cax.text(0.5, 0.5, f"no {phase} recorded: edges grey", ha="center", va="center", fontsize=text_size)
        else:
            from matplotlib.cm import ScalarMappable  # noqa: PLC0415
            from matplotlib.ticker import LogLocator, NullFormatter  # noqa: PLC0415

            bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax, orientation="horizontal")
            bar.set_label(what, fontsize=text_size)
            cax.xaxis.set_major_locator(LogLocator(subs=(1.0, 3.0), numticks=5))
            cax.xaxis.set_major_formatter(_value_formatter())
            cax.xaxis.set_minor_formatter(NullFormatter())
            cax.tick_params(labelsize=text_size)


def network(trace, highlight=None, phase: str | None = None, save=None):
    """A map of the traced network: the stem, every residual block as a shortcut beside a branch,
    and the head, one column per stage, each block labelled with its number l = 1..L.

    Dropped branches are grey and hatched. Each edge is coloured by the norm of what went along it
    in ``phase`` (entry, shortcut, branch, exit): activations in forward, gradients in backward, on
    one logarithmic scale for the whole map, so a dropped block shows the flow going around it
    through the shortcut. phase: None takes the highlighted event's phase, else backward when it
    was recorded. ``highlight``: an event of the trace, whose place (stem, a block's branch or
    shortcut, the whole block, the head) is marked, with an arrow down for forward or up for backward.
    """
    if phase is None:
        phase = highlight.phase if highlight is not None else ("backward" if trace.backward() else "forward")
    data = network_data(trace)
    stages = max(1, len(data["stages"]))
    rows = max([len(ks) for _, ks in data["stages"]] or [1])
    fig = new_figure((max(5.0, 2.3 * stages + 0.6), max(4.5, 0.42 * rows + 3.0)))
    grid = fig.add_gridspec(2, 1, height_ratios=[1, 0.035], left=0.02, right=0.98, top=0.9, bottom=0.1,
                            hspace=0.12)
    ax, cax = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
    _draw_network(fig, ax, cax, trace, highlight, data, phase=phase)
    return save_figure(fig, save)


def _frame_grid(fig):
    """The stepper frame's two regions: the event (left) and the map with its colour bar (right)."""
    outer = fig.add_gridspec(1, 2, width_ratios=[1.5, 1], left=0.105, right=0.995, top=0.88, bottom=0.08,
                             wspace=0.16)
    return outer[0, 0], outer[0, 1], outer[0, 1].subgridspec(2, 1, height_ratios=[1, 0.03], hspace=0.12)


class NetworkRaster:
    """The network map of a walk in one phase drawn once, as pixels, in the place it takes in a
    stepper frame (forward frames colour its edges by activation norms, backward frames by
    gradient norms: one raster each).

    The map is the same in every frame of a phase but for the mark on the current place, and
    drawing its hundreds of lines, boxes and labels is most of a frame's cost; a frame pastes these
    pixels and draws only the mark (see :func:`stepper_frame`).
    """

    def __init__(self, trace, data=None, norm=None, phase: str = "backward"):
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415

        self.phase = phase
        self.data = data if data is not None else network_data(trace)
        self.norm = norm if norm is not None else _flow_norm(self.data, phase)
        fig = new_figure(FRAME_SIZE, dpi=FRAME_DPI)
        _, cell, right = _frame_grid(fig)
        ax = fig.add_subplot(right[0])
        _draw_network(fig, ax, fig.add_subplot(right[1]), trace, None, self.data, self.norm, phase)
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        pixels = numpy.asarray(canvas.buffer_rgba())
        self.height, width = pixels.shape[:2]
        self.left = int(math.floor(cell.get_position(fig).x0 * width))  # the map's region starts here
        self.pixels = pixels[:, self.left:].copy()
        self.box = (self.left / width, 0.0, 1.0 - self.left / width, 1.0)  # in figure fractions
        self.to_display = ax.transData.frozen()
        self.text_size = _map_text_size(self.data)

    def to_pixels(self, x, y):
        """Map coordinates -> (column, row) in ``pixels`` (rows count from the top)."""
        px, py = self.to_display.transform((x, y))
        return px - self.left, self.height - py

    def paste(self, fig, trace, event):
        """Put the map into ``fig`` (a frame) and mark the place of ``event`` on it."""
        ax = fig.add_axes(self.box)
        ax.imshow(self.pixels, interpolation="none", extent=(0, self.pixels.shape[1], self.height, 0), aspect="auto")
        ax.set_xlim(0, self.pixels.shape[1])
        ax.set_ylim(self.height, 0)
        ax.set_axis_off()
        _mark(ax, _highlight_box(self.data, trace.place(event)), event.phase, self.text_size, self.to_pixels)
        return ax


def stepper_frame(trace, event, title: str = "", limit=None, scope=None, max_channels: int = 8, data=None,
                  norm=None, raster: NetworkRaster | None = None):
    """One frame of the stepper: the event's picture (left) beside the network map with the event's
    place marked (right), its edges coloured by the norms of the event's phase. Always
    :data:`FRAME_SIZE`, so frames replace each other without moving.

    limit, scope: the colour scale of the event's arrays and its name for the colour bar (None:
    the event's own scale). data, norm: the map's data (:func:`network_data`) and its colour scale
    for this phase, computed once per walk by the caller (computed here when None). raster: the
    map of this phase drawn once (:class:`NetworkRaster`); None draws it here.
    """
    if raster is not None and raster.phase != event.phase:
        raise ValueError(f"stepper_frame: a {event.phase} event needs the {event.phase} map, got the {raster.phase} one")
    fig = new_figure(FRAME_SIZE, dpi=FRAME_DPI)
    left, _, right = _frame_grid(fig)
    _draw_event(fig, left, event, max_channels, limit, scope)
    if raster is not None:
        raster.paste(fig, trace, event)
    else:
        _draw_network(fig, fig.add_subplot(right[0]), fig.add_subplot(right[1]), trace, event, data, norm,
                      event.phase)
    fig.suptitle((title + "   " if title else "") + _event_title(event), fontsize=14, x=0.01, ha="left")
    return fig
