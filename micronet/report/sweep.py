"""Sparsity x bits sweeps: perplexity against MicroNet score, one line per pruning level.

Rows come from :func:`micronet.report.collect_runs`. A run belongs to the sweep when it is a pruned
run (``prune<s>_<parent>``) or a quantized child of one (its lineage parent is the pruned run and its
score records ``bits``); the fp32 pruned run is drawn at 32 bits when it was scored with the same
evaluation cache as its quantized children.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from micronet.report.plots import figure_axes
from micronet.report.runs import CONVENTIONS

_PRUNED = re.compile(r"^prune(?P<s>[0-9.]+)_")


def sweep_points(rows: Sequence[Mapping], convention: str = "paper") -> dict[str, list[dict]]:
    """Pruning label (e.g. ``"0.358"``) -> points ``{name, bits, score, ppl}`` sorted by bits.

    ppl is the test perplexity (validation when there is no test figure); unscored runs are skipped.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    by_name = {r["name"]: r for r in rows}
    lines: dict[str, list[dict]] = {}
    for r in rows:
        own = _PRUNED.match(r["name"])
        parent = by_name.get(r.get("parent") or "")
        if own and r.get("stage") == "prune":
            label, bits = own["s"], 32
        elif parent is not None and _PRUNED.match(parent["name"]) and r.get("bits"):
            label, bits = _PRUNED.match(parent["name"])["s"], int(r["bits"])
        else:
            continue
        ppl = r.get("test_ppl") if r.get("test_ppl") is not None else r.get("val_ppl")
        score = r.get(f"{convention}_score")
        if ppl is None or score is None:
            continue
        lines.setdefault(label, []).append({"name": r["name"], "bits": bits, "score": score, "ppl": ppl,
                                            "n_cache": r.get("n_cache")})
    for pts in lines.values():
        pts.sort(key=lambda p: -p["bits"])
    return dict(sorted(lines.items()))


def plot_sweep(rows: Sequence[Mapping], ax: Axes | None = None, convention: str = "paper",
               title: str | None = None) -> Figure:
    """Perplexity vs score of a sparsity x bits sweep: one line per pruning level, points labelled by bits.

    A 32-bit point is kept only when its evaluation cache matches its quantized siblings', so a line
    compares like with like.
    """
    fig, ax = figure_axes(ax)
    lines = sweep_points(rows, convention)
    for label, pts in lines.items():
        caches = {p["n_cache"] for p in pts if p["bits"] < 32}
        pts = [p for p in pts if p["bits"] < 32 or not caches or p["n_cache"] in caches]
        ax.plot([p["score"] for p in pts], [p["ppl"] for p in pts], marker="o", gid=f"sweep-{label}",
                label=f"pruned {label}")
        for p in pts:
            ax.annotate(f"{p['bits']}b", (p["score"], p["ppl"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
    ax.set_xlabel(f"MicroNet score ({convention} convention; lower is better)")
    ax.set_ylabel("perplexity (test)")
    ax.set_title(title or f"sparsity x bits sweep, {sum(len(p) for p in lines.values())} run(s)")
    if lines:
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no pruned or quantized runs", ha="center", va="center", transform=ax.transAxes)
    return fig
