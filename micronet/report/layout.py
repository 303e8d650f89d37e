"""Figure helpers shared by the report plots: new figures, axis limits fitted to data, point labels
placed where they overlap nothing, saving.

Figures use matplotlib's object API (``Figure``, never pyplot): they render headless with the Agg
canvas and inline in Jupyter; importing this module changes no global state.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Annotation, Text
from matplotlib.transforms import Bbox

_DIRECTIONS = ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))
_RADII = (5, 12, 22, 34, 48)  # points


def figure_axes(ax: Axes | None, size: tuple[float, float] = (7.5, 5.0)) -> tuple[Figure, Axes]:
    """``ax``'s figure and ``ax``, else a new constrained-layout figure with one axes."""
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.add_subplot()


def spread(values: Sequence[float]) -> bool:
    """True when positive values span more than a decade (log axis)."""
    vals = [v for v in values if v and v > 0]
    return bool(vals) and max(vals) / min(vals) > 10


def padded_range(values: Sequence[float], pad: float = 0.12, log: bool = False) -> tuple[float, float]:
    """(lo, hi) enclosing ``values`` with ``pad`` x their span on each side (in log space when ``log``);
    a single value gets +-2% of itself (or +-1 when 0)."""
    vals = [math.log10(v) if log else v for v in values if v is not None and (v > 0 or not log)]
    if not vals:
        return (0.0, 1.0)
    lo, hi = min(vals), max(vals)
    span = hi - lo or (0.02 * abs(hi) if hi else 1.0) * (0.5 if log else 1.0)
    lo, hi = lo - pad * span, hi + pad * span
    return (10 ** lo, 10 ** hi) if log else (lo, hi)


def _renderer(fig: Figure):
    if not hasattr(fig.canvas, "get_renderer"):
        FigureCanvasAgg(fig)
    fig.draw_without_rendering()  # runs the layout engine: positions are final before measuring
    return fig.canvas.get_renderer()


def _text_box(t: Text, renderer) -> Bbox:
    """Display extent of a text or annotation's text (without its leader line)."""
    if isinstance(t, Annotation):
        t.update_positions(renderer)  # offset-point positions are only resolved here
    return Text.get_window_extent(t, renderer)


def _overlap(a: Bbox, others: Sequence[Bbox]) -> float:
    total = 0.0
    for b in others:
        w = min(a.x1, b.x1) - max(a.x0, b.x0)
        h = min(a.y1, b.y1) - max(a.y0, b.y0)
        total += w * h if w > 0 and h > 0 else 0.0
    return total


def place_labels(ax: Axes, items: Sequence[tuple[float, float, str]], fontsize: float = 8,
                 avoid: Sequence[tuple[float, float]] = (), gid: str = "label") -> list[Annotation]:
    """Label each point ``(x, y, text)`` at the nearest offset where the label lies inside the axes and
    overlaps no other label and no point (``items`` and ``avoid``, data coordinates); far labels get a
    leader line. Set the axis limits first: placement is measured on the final layout."""
    renderer = _renderer(ax.figure)
    scale = ax.figure.dpi / 72
    inside = ax.get_window_extent(renderer)
    marks = [ax.transData.transform((x, y)) for x, y in [*((i[0], i[1]) for i in items), *avoid]]
    r_mark = 4.5 * scale
    taken = [Bbox.from_extents(px - r_mark, py - r_mark, px + r_mark, py + r_mark) for px, py in marks]
    placed: list[Annotation] = []
    for x, y, text in items:
        best = None
        for r in _RADII:
            for dx, dy in _DIRECTIONS:
                ann = ax.annotate(text, (x, y), xytext=(dx * r, dy * r), textcoords="offset points",
                                  fontsize=fontsize, gid=gid, ha={1: "left", -1: "right", 0: "center"}[dx],
                                  va={1: "bottom", -1: "top", 0: "center"}[dy])
                box = _text_box(ann, renderer).padded(1.5 * scale)
                fits = inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1)
                cost = _overlap(box, taken) + (0.0 if fits else 1e9)
                if best is None or cost < best[0]:
                    if best is not None:
                        best[1].remove()
                    best = (cost, ann, box, r)
                else:
                    ann.remove()
                if cost == 0:
                    break
            if best[0] == 0:
                break
        _, ann, box, r = best
        if r >= _RADII[1]:  # away from its point: a thin leader line says whose label it is
            ann.remove()
            ann = ax.annotate(text, (x, y), xytext=ann.xyann, textcoords="offset points", fontsize=fontsize,
                              gid=gid, ha=ann.get_ha(), va=ann.get_va(),
                              arrowprops={"arrowstyle": "-", "color": "0.55", "lw": 0.6, "shrinkA": 0,
                                          "shrinkB": 3})
        taken.append(box)
        placed.append(ann)
    return placed


def label_boxes(ax: Axes, gid: str = "label") -> list[Bbox]:
    """Extents of ``ax``'s point labels (texts with ``gid``) in axes coordinates (0..1 inside the axes)."""
    renderer = _renderer(ax.figure)
    to_axes = ax.transAxes.inverted()
    return [Bbox(to_axes.transform(_text_box(t, renderer).get_points())) for t in ax.texts if t.get_gid() == gid]


def save_figure(fig: Figure, path: str | os.PathLike | None, dpi: int = 150) -> Path | None:
    """Save ``fig`` to ``path`` (format from the suffix, parents created); None path: do nothing."""
    if path is None:
        return None
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path
