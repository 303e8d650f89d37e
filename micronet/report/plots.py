"""Plots of runs: perplexity vs score, score breakdowns, training curves.

Figures are built with matplotlib's object API (``Figure``, never pyplot): they render headless
with the Agg canvas and inline in Jupyter after ``%matplotlib inline``; importing this module
changes no global state. ::

    fig = plot_ppl_vs_score(collect_runs(), convention="paper")
    save_figure(fig, "ppl_vs_score.png")
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from micronet.report.runs import CONVENTIONS, PPL_TARGET, REFERENCE_POINTS, read_training_curve, run_names
from micronet.runs.paths import results_root
from micronet.scoring.rules import Row, group_rows


def figure_axes(ax: Axes | None, size: tuple[float, float] = (7.5, 5.0)) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.add_subplot()


def _spread(values: Sequence[float]) -> bool:
    """True when positive values span more than a decade (log axis)."""
    vals = [v for v in values if v and v > 0]
    return bool(vals) and max(vals) / min(vals) > 10


def load_score(score_json: Mapping | str | os.PathLike | None) -> dict | None:
    """A ``score_step<S>.json``: a path, an already-loaded dict, or a :func:`collect_runs` row (its
    ``score_file``); None (or a row without a score file) gives None."""
    if score_json is None:
        return None
    if isinstance(score_json, Mapping):
        if "components" in score_json:
            return dict(score_json)
        return load_score(score_json.get("score_file"))
    return json.loads(Path(score_json).read_text(encoding="utf-8"))


def plot_components(score_json: Mapping | str | os.PathLike | None, ax: Sequence[Axes] | None = None,
                    group_layers: bool = True) -> Figure:
    """Per-component params and ops (muls x width/32, adds, others stacked) of a scored run.

    ``score_json``: a ``score_step<S>.json`` path or dict, or a :func:`collect_runs` row (the file's
    main convention's components); None, or a row without a score, draws a note instead. ``ax``: a
    pair of axes (params, ops), else a new figure. Layers are summed into ``layers.*.<x>`` like
    ``micronet.scoring.counts.render_table(group_layers=True)``.
    """
    if ax is None:
        fig = Figure(figsize=(11, 6), layout="constrained")
        ax = fig.subplots(1, 2, sharey=True)
    ax_p, ax_o = ax
    fig = ax_p.figure
    s = load_score(score_json)
    if s is None:
        ax_p.text(0.5, 0.5, "no scored run: python -m micronet.score name=<run>", ha="center",
                  transform=ax_p.transAxes)
        return fig
    rows = [Row(**{k: c[k] for k in ("component", "params", "muls", "mul_ops", "adds", "others")})
            for c in s.get("components", [])]
    rows = group_rows(rows) if group_layers else rows
    names = [r.component for r in rows][::-1]
    pos = range(len(names))
    ax_p.barh(pos, [r.params for r in rows][::-1], color="tab:blue", gid="params")
    ax_p.set_yticks(list(pos), names)
    ax_p.set_xlabel("params (32-bit equivalents)")
    left = [0.0] * len(rows)
    for key, color in (("mul_ops", "tab:orange"), ("adds", "tab:green"), ("others", "tab:gray")):
        vals = [getattr(r, key) for r in rows][::-1]
        ax_o.barh(pos, vals, left=left, color=color, label=key.replace("_", " "), gid=f"ops-{key}")
        left = [a + b for a, b in zip(left, vals)]
    ax_o.set_xlabel("ops per token (32-bit equivalents)")
    ax_o.legend(loc="lower right")
    fig.suptitle(f"{s.get('name', '?')} step {s.get('step', '?')} ({s.get('convention', '?')} convention): "
                 f"params {s.get('params', 0):,.0f}, ops {s.get('ops', 0):,.0f}, score {s.get('score', 0):.6f}")
    return fig


def plot_ppl_vs_score(rows: Sequence[Mapping], ax: Axes | None = None, convention: str = "paper",
                      reference: bool = True, annotate: bool = True) -> Figure:
    """Perplexity against MicroNet score of every scored run, with the ppl-35 line and the original's
    published points (``REFERENCE_POINTS``) for reference.

    Runs with a test ppl are filled points (gid ``runs``); runs with only a validation ppl are hollow
    (gid ``runs-val``); runs without a score are left out. Axes turn logarithmic when the values
    span more than a decade.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    fig, ax = figure_axes(ax)
    key = f"{convention}_score"
    pts = [(r[key], r.get("test_ppl") if r.get("test_ppl") is not None else r.get("val_ppl"),
            r["name"], r.get("test_ppl") is not None) for r in rows]
    pts = [p for p in pts if p[0] is not None and p[1] is not None and math.isfinite(p[1])]
    for is_test, gid, label in ((True, "runs", "runs (test ppl)"), (False, "runs-val", "runs (validation ppl only)")):
        sel = [p for p in pts if p[3] == is_test]
        if sel:
            ax.scatter([p[0] for p in sel], [p[1] for p in sel], s=40, zorder=3, gid=gid, label=label,
                       edgecolors="tab:blue", facecolors="tab:blue" if is_test else "none")
    if annotate:
        for x, y, name, _ in pts:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    refs = REFERENCE_POINTS.get(convention, []) if reference else []
    for ref in refs:
        ax.scatter([ref["score"]], [ref["ppl"]], marker=ref["marker"], s=120, color="tab:red", zorder=4,
                   gid="reference", label=ref["label"])
    ax.axhline(PPL_TARGET, color="tab:red", ls="--", lw=1, gid="ppl-target",
               label=f"challenge limit: test ppl {PPL_TARGET:g}")
    xs = [p[0] for p in pts] + [r["score"] for r in refs]
    ys = [p[1] for p in pts] + [PPL_TARGET]
    if _spread(xs):
        ax.set_xscale("log")
    if _spread(ys):
        ax.set_yscale("log")
    ax.set_xlabel(f"MicroNet score ({convention} convention; lower is better)")
    ax.set_ylabel("perplexity (test; hollow: validation)")
    ax.set_title(f"perplexity vs score, {len(pts)} run(s)")
    ax.legend(fontsize=8, loc="best")
    return fig


def plot_training_curves(names: Sequence[str | Mapping] | None = None, root: str | os.PathLike | None = None,
                         ax: Axes | None = None) -> Figure:
    """Validation perplexity against step from each run's ``train_results.csv`` (one line per run).

    ``names``: run names under ``root`` or rows from :func:`collect_runs`; None: every run.
    Runs without a training log are skipped.
    """
    fig, ax = figure_axes(ax)
    base = Path(root) if root is not None else results_root()
    items = run_names(base) if names is None else ([names] if isinstance(names, str) else names)
    ppls: list[float] = []
    for item in items:
        path = Path(item["path"]) if isinstance(item, Mapping) else base / item
        curve = [r for r in read_training_curve(path / "train_results.csv") if "val_ppl" in r]
        if curve:
            ax.plot([r["step"] for r in curve], [r["val_ppl"] for r in curve], marker=".", label=path.name)
            ppls += [r["val_ppl"] for r in curve]
    if not ppls:
        ax.text(0.5, 0.5, "no train_results.csv found", ha="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize=8)
    if _spread(ppls):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("validation perplexity")
    ax.set_title("training curves")
    return fig


def save_figure(fig: Figure, path: str | os.PathLike | None, dpi: int = 150) -> Path | None:
    """Save ``fig`` to ``path`` (format from the suffix, parents created); None path: do nothing."""
    if path is None:
        return None
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path
