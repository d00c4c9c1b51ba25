"""minisd.stepper: a walk that keeps its position, filters that keep the numbers, "next dropped block",
one display per step, colour scales shared across frames, pictures that never touch pyplot, and a
widget that survives callbacks arriving on several threads at once."""
from __future__ import annotations

import io
import statistics
import threading
import time

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from helpers import dev  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402

from minisd.training import train_step  # noqa: E402
from minisd import models, plots, stepper, trace  # noqa: E402
from minisd.stepper import Stepper  # noqa: E402

GATES = [True, False, True, True, False, True]  # ResNet-14: blocks 1 and 4 dropped


def traced_step(rng, gates=GATES, keep_arrays=True):
    model = models.resnet_cifar(depth=14, in_channels=1, dtype="float64")
    model.force_gates(gates)
    x = dev(rng.standard_normal((4, 1, 8, 8)))
    with trace.record(model, keep_arrays=keep_arrays) as t:
        train_step(model, x, np.arange(4))
    return t


@pytest.fixture
def t(rng):
    return traced_step(rng)


@pytest.fixture
def shown(monkeypatch):
    """Pretend to be in a notebook and record what the stepper shows: (text, png) per display."""
    calls = []
    monkeypatch.setattr(stepper, "_in_notebook", lambda: True)
    monkeypatch.setattr(stepper, "_show", lambda text, png: calls.append((text, png)))
    return calls


def test_the_stepper_keeps_its_position(t, shown):
    s = Stepper(t)
    s.step()
    s.step()
    assert s.number == 2 and s.current is s.walk[1]
    assert [text.split("   ")[0] for text, _ in shown] == [f"step 1 of {len(s)}", f"step 2 of {len(s)}"]
    s.step(3)
    assert s.number == 5
    s.back()
    assert s.number == 4
    s.step(-100)
    assert s.number == 1
    s.go(len(s))
    s.step()  # at the end it stays at the end
    assert s.number == len(s)
    s.reset()
    s.step()
    assert s.number == 1
    # The walk: layers that compute and the blocks, all forward steps before all backward steps.
    assert all(e.is_leaf or e.is_block for e in s.walk)
    phases = [e.phase for e in s.walk]
    assert phases == sorted(phases, key=lambda p: p != "forward")


def test_each_step_shows_once_and_returns_nothing(t, shown):
    s = Stepper(t)
    assert s.step() is None and s.next_dropped() is None and s.back() is None and s.go(3) is None
    assert len(shown) == 4 and all(png.startswith(b"\x89PNG") for _, png in shown)
    quiet = Stepper(t, draw=False)
    quiet.step()
    assert shown[-1][1] is None  # text only


def test_outside_a_notebook_it_prints_the_text_only(t, capsys, monkeypatch):
    def no_picture(*args, **kwargs):
        raise AssertionError("a picture was built that nobody sees")

    monkeypatch.setattr(plots.trace_drawings, "stepper_frame", no_picture)
    s = Stepper(t)
    s.step()
    out = capsys.readouterr().out
    assert out.startswith(f"step 1 of {len(s)}   forward conv1") and "input x" in out


def test_filters_visit_a_phase_or_the_blocks_and_keep_the_numbers(t, shown):
    s = Stepper(t, draw=False)
    numbers = {id(e): i + 1 for i, e in enumerate(s.walk)}
    s.view(phase="backward", show=False)
    s.step()
    assert s.current.phase == "backward" and s.current is s.walk[s.position]
    first_backward = next(i for i, e in enumerate(s.walk) if e.phase == "backward")
    assert s.number == first_backward + 1 == numbers[id(s.current)]
    visited = [s.current]
    for _ in range(len(s)):
        s.step()
        visited.append(s.current)
    assert all(e.phase == "backward" for e in visited)
    # blocks only, backward: the blocks from the output side to the input side
    s.view(blocks_only=True, show=False)
    s.reset()
    names = []
    for _ in range(8):
        s.step()
        names.append(s.current.name)
    assert names[:6] == list(reversed(t.block_names)) and names[6:] == [names[5]] * 2
    assert all(line.startswith(f"step {s.number} of {len(s)}") for line in [s.text()])
    # Switching phase keeps the same layer: the backward of layer2.0 becomes its forward.
    s.go(numbers[id(t.find("layer2.0", "backward"))])
    s.view(phase="forward", blocks_only=False, show=False)
    assert s.current is t.find("layer2.0", "forward")
    # Blocks only from inside a branch: the block that holds it.
    s.view(phase="both", show=False)
    s.go(numbers[id(t.find("layer3.1.branch.1", "forward"))])
    s.view(blocks_only=True, show=False)
    assert s.current is t.find("layer3.1", "forward")
    with pytest.raises(ValueError, match="phase must be one of"):
        s.view(phase="sideways")


def test_next_dropped_block_visits_exactly_the_dropped_blocks(t, shown, capsys):
    s = Stepper(t, draw=False)
    seen = []
    while s.next_dropped_index() is not None:
        s.next_dropped()
        seen.append((s.current.phase, s.current.name))
    dropped = [t.block_names[k] for k, kept in enumerate(GATES) if not kept]
    assert seen == [("forward", n) for n in dropped] + [("backward", n) for n in reversed(dropped)]
    before = s.number
    s.next_dropped()  # none left: stays, and says so
    assert s.number == before and f"no dropped block after step {before}" in capsys.readouterr().out
    s.view(phase="backward", show=False)
    s.reset()
    s.next_dropped()
    assert (s.current.phase, s.current.name) == ("backward", dropped[-1])


def test_shared_colour_scales_span_every_frame_of_one_kind(t):
    s = Stepper(t, scale="shared")
    limits = s.color_limits()
    # The limit is the 99.5th percentile of |value| over what the frames show, per kind.
    shown = [np.abs(a[0, :8] if a.ndim == 4 else a[:1]).ravel() for e in s.walk if e.phase == "backward"
             for a in (e.in_array, e.out_array)]
    assert limits["gradient"] == pytest.approx(np.percentile(np.concatenate(shown), 99.5))
    assert limits["activation"] != pytest.approx(limits["gradient"])

    def event_images(number):
        fig = s.figure(number)
        # The value images (2-D arrays drawn through a colour map), not the pasted map (RGBA pixels).
        images = [im for ax in fig.axes for im in ax.get_images()
                  if isinstance(im, AxesImage) and im.get_array().ndim == 2]
        return fig, images

    small = max(range(1, len(s) + 1), key=lambda n: -s.walk[n - 1].out_norm if s.walk[n - 1].phase == "backward"
                else -np.inf)
    large = max(range(1, len(s) + 1), key=lambda n: s.walk[n - 1].out_norm if s.walk[n - 1].phase == "backward"
                else -np.inf)
    for number in (small, large):
        fig, images = event_images(number)
        assert images and all(im.get_clim() == (-limits["gradient"], limits["gradient"]) for im in images)
        labels = [ax.get_ylabel() for ax in fig.axes]
        assert "gradient value (one scale for all steps)" in labels
    fig, images = event_images(1)
    assert all(im.get_clim() == (-limits["activation"], limits["activation"]) for im in images)
    assert "activation value (one scale for all steps)" in [ax.get_ylabel() for ax in fig.axes]


def test_pictures_never_touch_pyplot(t):
    plt.close("all")
    s = Stepper(t)
    for number in (1, len(s) // 2, len(s)):
        assert s.png(number).startswith(b"\x89PNG")
    plots.network(t)
    plots.trace_event(t.find("conv1"))
    assert plt.get_fignums() == []  # pyplot's list of figures stayed empty


def test_every_frame_has_the_same_size(t):
    from PIL import Image

    s = Stepper(t)
    sizes = {Image.open(io.BytesIO(s.png(n))).size for n in (1, 5, len(s) // 2, len(s) - 1)}
    fc = next(i + 1 for i, e in enumerate(s.walk) if e.name == "fc")  # a vector, not maps
    sizes.add(Image.open(io.BytesIO(s.png(fc))).size)
    assert len(sizes) == 1


def test_widget_moves_and_swaps_text_and_picture(t):
    pytest.importorskip("ipywidgets")
    s = Stepper(t)
    ui = s.widget()
    (previous, following, dropped, slider), (phase, blocks) = ui.children[0].children, ui.children[1].children
    text, image = ui.children[2], ui.children[3]
    assert s.number == 1 and f"step 1 of {len(s)}" in text.value and bytes(image.value).startswith(b"\x89PNG")
    assert previous.disabled and not following.disabled
    pictures = {bytes(image.value)}
    for expected in range(2, 6):
        following.click()
        assert s.number == expected and f"step {expected} of {len(s)}" in text.value and slider.value == expected - 1
        pictures.add(bytes(image.value))
    assert len(pictures) == 5
    previous.click()
    assert s.number == 4 and f"step 4 of {len(s)}" in text.value
    dropped.click()
    assert s.current.dropped and s.current.name == "layer1.1"
    slider.value = 20
    assert s.number == 21 and "step 21 of" in text.value
    phase.value = "backward"
    assert s.current.phase == "backward" and all(s.walk[i].phase == "backward" for _, i in slider.options)
    blocks.value = True
    assert s.current.is_block and len(slider.options) == len(t.block_names)
    assert [label for label, _ in slider.options] == [str(i + 1) for i in s.visible()]  # one numbering


def test_widget_callbacks_from_two_threads_at_once(t):
    """JupyterLab may run two widget callbacks at the same time on different threads."""
    pytest.importorskip("ipywidgets")
    s = Stepper(t)
    ui = s.widget()
    following, text, image = ui.children[0].children[1], ui.children[2], ui.children[3]
    errors = []

    def click_many():
        try:
            for _ in range(5):
                following.click()
        except Exception as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=click_many) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert s.number == 11 and f"step 11 of {len(s)}" in text.value
    assert bytes(image.value) == s.png(11)  # the picture matches the text


@pytest.mark.slow
def test_redraw_of_resnet56_on_digits_is_quick():
    """The issue's budget: a redraw under 0.5 s for ResNet-56 on digits (CPU time, so that other
    load on a shared machine does not count)."""
    from minisd import backend, data

    backend.seed(0)
    digits = data.load_digits()
    x, labels = dev(digits.train.x[:32]), dev(digits.train.y[:32])
    model = models.resnet_cifar(depth=56, in_channels=1, seed=0)
    with trace.record(model, keep_arrays=True) as t56:
        train_step(model, x, labels)
    s = Stepper(t56)
    s.png(1)  # the shared scales and the map's data are computed once, at the first picture
    seconds = []
    for number in range(2, len(s), 41):
        start = time.process_time()
        s.png(number)
        seconds.append(time.process_time() - start)
    assert statistics.median(seconds) < 0.5, seconds


@pytest.mark.slow
def test_in_a_notebook_each_step_displays_one_picture(tmp_path):
    """What a student sees: a real kernel, `s = Stepper(t); s.step(); s.step()` shows two pictures
    (steps 1 and 2), and `s.step()` as a cell's last line shows one (no second copy as the result)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    setup = """
import numpy as np
from minisd import models, trace
from minisd.stepper import Stepper
from minisd.training import train_step
model = models.resnet_cifar(depth=8, in_channels=1)
x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype("float32")
with trace.record(model, keep_arrays=True) as t:
    train_step(model, x, np.arange(2))
import matplotlib.pyplot as plt   # pyplot loaded, as in notebook 4: its hooks must draw nothing of ours
"""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(setup),
                                         nbformat.v4.new_code_cell("s = Stepper(t); s.step(); s.step()"),
                                         nbformat.v4.new_code_cell("s.step()"),
                                         nbformat.v4.new_code_cell("print(plt.get_fignums())")])
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3").execute()

    def pictures(cell):
        return [o for o in cell.outputs if "image/png" in o.get("data", {})]

    def texts(cell):
        return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")

    two, one, fignums = nb.cells[1], nb.cells[2], nb.cells[3]
    assert len(pictures(two)) == 2 and "step 1 of" in texts(two) and "step 2 of" in texts(two)
    assert len(pictures(one)) == 1 and "step 3 of" in texts(one)
    assert not [o for c in nb.cells for o in c.outputs if o.output_type in ("execute_result", "error")]
    assert texts(fignums).strip() == "[]"


def event_images(fig):
    """The value images of a frame (2-D arrays drawn through a colour map), not the pasted map."""
    return [im for ax in fig.axes for im in ax.get_images() if isinstance(im, AxesImage) and im.get_array().ndim == 2]


def test_by_default_each_picture_has_its_own_scale_and_says_so(t):
    """The default shows every array's pattern: each frame spans its own values (the same
    percentile as the shared scales, over this frame alone), and the text and colour bar say so."""
    s = Stepper(t)
    assert s.scale == "layer"
    for number in (1, len(s) // 2, len(s)):
        event = s.walk[number - 1]
        shown = [np.abs(a[0, :8] if a.ndim == 4 else a[:1]).ravel() for a in (event.in_array, event.out_array)]
        limit = np.percentile(np.concatenate(shown), 99.5)
        fig = s.figure(number)
        assert all(im.get_clim() == pytest.approx((-limit, limit)) for im in event_images(fig))
        assert any("this layer's own scale" in ax.get_ylabel() for ax in fig.axes)
        assert "colours: this layer's own scale" in s.text(number)


def test_stage_scales_group_the_steps_of_one_stage(t):
    s = Stepper(t, scale="stage")
    limits = s.color_limits()
    stages = {s.stage_of(e) for e in s.walk}
    assert stages == {"stem", "head", "blocks l = 1-2", "blocks l = 3-4", "blocks l = 5-6"}
    inside = next(n for n, e in enumerate(s.walk, 1) if e.phase == "backward" and e.block == 2)
    limit, scope = s.color_scale(inside)
    assert limit == limits["gradient", "blocks l = 1-2"] and scope == "one scale per stage: blocks l = 1-2"
    fig = s.figure(inside)
    assert all(im.get_clim() == (-limit, limit) for im in event_images(fig))
    assert "one scale per stage: blocks l = 1-2" in s.text(inside)
    with pytest.raises(ValueError, match="scale must be one of layer, stage, shared"):
        Stepper(t, scale="global")


def test_forward_frames_colour_the_map_by_activations_and_backward_by_gradients(t):
    from minisd import plots

    s = Stepper(t)
    first_backward = next(n for n, e in enumerate(s.walk, 1) if e.phase == "backward")
    for number in (1, first_backward):
        s.figure(number)
    assert {phase: raster.phase for phase, raster in s._maps.items()} == {"forward": "forward", "backward": "backward"}
    forward, backward = s._maps["forward"].data["blocks"][0], s._maps["backward"].data["blocks"][0]
    assert forward["forward"]["entry"] == pytest.approx(t.block_events("forward")[0].in_norm)
    assert backward["backward"]["entry"] == pytest.approx(t.block_events("backward")[0].out_norm)
    norm = s._maps["forward"].norm
    assert norm.vmin <= forward["forward"]["entry"] <= norm.vmax
    assert "activation norm" in plots.network(t, phase="forward").axes[1].get_xlabel()
    assert "gradient norm" in plots.network(t, phase="backward").axes[1].get_xlabel()
    assert "activation norm" in plots.network(t, highlight=t.find("conv1", "forward")).axes[1].get_xlabel()
