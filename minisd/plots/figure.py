"""The one figure factory of minisd's pictures, their colours, and how a figure is saved or shown.

Every figure is a :class:`NotebookFigure`: a ``matplotlib.figure.Figure`` that pyplot never hears
of. pyplot keeps a global list of open figures, and in JupyterLab a widget's redraw runs on another
kernel thread while the kernel's execute hooks draw every figure on that list, half-built ones
included; a Figure made here is on no list, and a notebook shows it through its ``_repr_png_``.

* :func:`lecture_figure`: (fig, axes) in the lecture style (fonts for a projector, no top and right
  spines), for the figures of :mod:`~minisd.plots.lecture` and :mod:`~minisd.plots.paper`.
* :func:`new_figure`: a bare figure, for the stepper's frames. Those set their font sizes on each
  text rather than through rcParams, so a notebook's settings (or another thread's) cannot change
  the picture while a widget redraws it.
"""
from __future__ import annotations

import contextlib
import io
import os

__all__ = ["lecture_figure", "new_figure", "save_figure", "figure_png", "bare_axes",
           "KEPT_COLOR", "DROPPED_COLOR", "CONSTANT_COLOR", "RUN_COLORS", "SAVE_DPI"]

# Colour-blind safe pair (Okabe-Ito blue and vermillion) plus neutral greys.
KEPT_COLOR = "#0072B2"
DROPPED_COLOR = "#D55E00"
CONSTANT_COLOR = "#555555"
RUN_COLORS = ("#555555", "#0072B2", "#009E73", "#CC79A7", "#E69F00", "#56B4E9")
SAVE_DPI = 150  # saved figures: sharp on a projector and in print

LECTURE_STYLE = {
    "font.size": 13,
    "axes.titlesize": 14,
    "axes.labelsize": 13,
    "legend.fontsize": 11,
    "xtick.labelsize": 11,
    "ytick.labelsize": 11,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "figure.dpi": 100,
}

_notebook_figure_class = None


def _figure_class():
    """NotebookFigure, defined on first use so that importing minisd does not import matplotlib."""
    global _notebook_figure_class
    if _notebook_figure_class is None:
        from matplotlib.figure import Figure  # noqa: PLC0415

        class NotebookFigure(Figure):
            """A plain Figure that shows itself in a notebook (IPython calls _repr_png_), with no
            pyplot import and no inline-backend set-up needed."""

            def _repr_png_(self):
                return figure_png(self, dpi=100, tight=True)

        _notebook_figure_class = NotebookFigure
    return _notebook_figure_class


def new_figure(figsize, dpi: int = 100):
    """A bare figure of ``figsize`` inches (no axes, no style)."""
    return _figure_class()(figsize=figsize, dpi=dpi, facecolor="white")


@contextlib.contextmanager
def lecture_figure(figsize, nrows: int = 1, ncols: int = 1, **subplot_kw):
    """``with lecture_figure((12, 4.5), 1, 2) as (fig, (left, right)):`` a figure and its axes
    (``Figure.subplots``' arguments), drawn in the lecture style inside the block."""
    import matplotlib  # noqa: PLC0415  (lazily: minisd's core does not need it)

    with matplotlib.rc_context(LECTURE_STYLE):
        fig = _figure_class()(figsize=figsize)
        yield fig, fig.subplots(nrows, ncols, **subplot_kw)


def bare_axes(ax):
    """An image axis: no ticks, no frame."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def save_figure(fig, save):
    """Write ``fig`` to the path ``save`` (a PNG at SAVE_DPI, folders made as needed) when it is
    given; return the figure either way, so every figure function ends ``return save_figure(fig, save)``."""
    if save:
        directory = os.path.dirname(os.fspath(save))
        if directory:
            os.makedirs(directory, exist_ok=True)
        fig.savefig(save, dpi=SAVE_DPI, bbox_inches="tight", facecolor="white")
    return fig


def figure_png(fig, dpi: int | None = None, tight: bool = False) -> bytes:
    """The PNG bytes of a figure (what a notebook or the stepper shows)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi or fig.dpi, facecolor="white",
                bbox_inches="tight" if tight else None)
    return buffer.getvalue()
