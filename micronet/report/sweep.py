"""Sparsity x bits sweeps: what pruning and quantization cost in perplexity against their fp32 dense parent.

Rows come from :func:`micronet.report.runs.collect_runs`. A group is one pruned run (any method:
an AGP table schedule, ``uniform``, ``sensitivity``) with its quantized children, under the dense
run it was pruned from; a point is its test ppl minus the dense parent's, both on the full test
split with the same evaluation cache. Groups never mix parents, datasets or caches.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure

from micronet.report.layout import padded_range, place_labels
from micronet.report.runs import check_convention, dataset_label, read_config

_FP32 = 32


def _components(row: Mapping) -> dict[str, dict]:
    try:
        return {c["component"]: c for c in json.loads(Path(row.get("score_file") or "").read_text())["components"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def measured_sparsity(pruned: Mapping, dense: Mapping) -> float | None:
    """Share of zero weights in ``pruned`` over its dense parent's counted parameters, measured from the
    two score files: each component's weight density is its multiply count over the dense one's
    (multiplies scale with the nonzero weights), weighted by the component's dense parameters."""
    a, b = _components(pruned), _components(dense)
    total = nonzero = 0.0
    for name, d in b.items():
        if name in a and d.get("params") and d.get("muls"):
            total += d["params"]
            nonzero += d["params"] * min(1.0, a[name]["muls"] / d["muls"])
    return 1.0 - nonzero / total if total else None


def _method(row: Mapping) -> str:
    p = (read_config(row["path"]).get("prune") if row.get("path") else None) or {}
    kind, name = p.get("kind"), p.get("name")
    if kind in ("uniform", "sensitivity"):
        return f"{kind} {p.get('target')}"
    return f"AGP schedule {name}" if name else row["name"]


def _ppl_at(row: Mapping, n_cache: int, split: str) -> float | None:
    return next((e.get(f"{split}_ppl") for e in row.get("evals", []) if e["n_cache"] == n_cache), None)


def descendants(rows: Sequence[Mapping], roots: Sequence[str]) -> list[Mapping]:
    """The rows named in ``roots`` and every row whose lineage parents (``parent``, recursively) reach one."""
    parent = {r["name"]: r.get("parent") for r in rows}
    keep = set(roots)

    def reaches(name: str | None, seen: frozenset = frozenset()) -> bool:
        if name is None or name in seen:
            return False
        return name in keep or reaches(parent.get(name), seen | {name})

    return [r for r in rows if reaches(r["name"])]


def sweep_points(rows: Sequence[Mapping], convention: str = "paper", split: str = "test") -> list[dict]:
    """Groups, one per (dense parent, pruned run, eval cache): ``dataset``, ``parent``, ``parent_ppl``,
    ``pruned``, ``method``, ``sparsity`` (measured), ``n_cache``, ``label`` and ``points``
    ``{name, bits, score, ppl, delta}`` from fp32 down to the fewest bits (``delta``: ppl minus the
    parent's). Runs without a score or a ppl at the group's cache are left out."""
    check_convention(convention)
    if split not in ("test", "val"):
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    by_name = {r["name"]: r for r in rows}
    groups: dict[tuple, dict] = {}
    for r in rows:
        if r.get("stage") == "prune":
            pruned = r
        elif r.get("stage") == "quantize" and (by_name.get(r.get("parent")) or {}).get("stage") == "prune":
            pruned = by_name[r["parent"]]
        else:
            continue
        dense = by_name.get(pruned.get("parent"))
        ppl, score, n = r.get(f"{split}_ppl"), r.get(f"{convention}_score"), r.get("n_cache")
        if dense is None or ppl is None or score is None or n is None:
            continue
        base = _ppl_at(dense, n, split)
        if base is None:
            continue
        g = groups.setdefault((dense["name"], pruned["name"], n), {
            "dataset": pruned.get("dataset"), "parent": dense["name"], "parent_ppl": base, "pruned": pruned["name"],
            "method": _method(pruned), "sparsity": measured_sparsity(pruned, dense), "n_cache": n, "points": []})
        g["points"].append({"name": r["name"], "bits": int(r.get("bits") or _FP32), "score": score, "ppl": ppl,
                            "delta": ppl - base})
    out = []
    order = sorted(groups.values(), key=lambda g: (str(g["dataset"]), g["parent"], -(g["sparsity"] or 0), g["pruned"]))
    for g in order:
        g["points"].sort(key=lambda p: -p["bits"])
        sp = f", measured sparsity {g['sparsity']:.3f}" if g["sparsity"] is not None else ""
        g["label"] = f"{g['method']}{sp}"
        out.append(g)
    return out


def sweep_panels(groups: Sequence[Mapping], split: str = "test") -> list[dict]:
    """One panel per (dataset, dense parent, eval cache): its groups, the bits on the x axis (fp32
    first), y limits fitted to the deltas and 0 (the parent), and a title naming split and cache."""
    panels: dict[tuple, dict] = {}
    for g in groups:
        p = panels.setdefault((str(g["dataset"]), g["parent"], g["n_cache"]), {
            "dataset": g["dataset"], "parent": g["parent"], "parent_ppl": g["parent_ppl"], "n_cache": g["n_cache"],
            "groups": []})
        p["groups"].append(g)
    out = []
    what = "test" if split == "test" else "validation"
    for p in panels.values():
        p["bits"] = sorted({q["bits"] for g in p["groups"] for q in g["points"]}, reverse=True)
        p["ylim"] = padded_range([0.0] + [q["delta"] for g in p["groups"] for q in g["points"]], 0.15)
        cache = f"eval cache {p['n_cache']}" if p["n_cache"] else "no eval cache"
        p["title"] = (f"{dataset_label(p['dataset'])}: pruning x quantization of {p['parent']} "
                      f"(full {what} split, {cache})")
        p["ylabel"] = f"{what} ppl minus the dense parent's"
        p["reference"] = (f"dense fp32 parent {p['parent']}: {what} ppl {p['parent_ppl']:.2f}")
        out.append(p)
    return out


def plot_sweep(rows: Sequence[Mapping], convention: str = "paper", split: str = "test") -> Figure:
    """Perplexity cost of pruning x quantization (:func:`sweep_points`, :func:`sweep_panels`): per
    panel, left the cost against bits (fp32 first, evenly spaced), right against the score (points
    labelled by bits); one line per pruned run, the dense parent as the 0 line."""
    panels = sweep_panels(sweep_points(rows, convention, split), split)
    fig = Figure(figsize=(10, 4.6 * max(1, len(panels)) + 0.6), layout="constrained")
    axes = fig.subplots(max(1, len(panels)), 2, squeeze=False, sharey="row")
    if not panels:
        axes[0, 0].text(0.5, 0.5, "no pruned or quantized runs with a dense parent evaluated at their cache",
                        ha="center", va="center", transform=axes[0, 0].transAxes)
        return fig
    for (ax_b, ax_s), p in zip(axes, panels):
        pos = {b: i for i, b in enumerate(p["bits"])}
        for ax in (ax_b, ax_s):
            ax.axhline(0.0, color="black", lw=1, ls="--", gid="dense-parent", label=p["reference"])
            ax.set_ylim(*p["ylim"])
            ax.grid(alpha=0.3)
        for g in p["groups"]:
            xs = [pos[q["bits"]] for q in g["points"]]
            (line,) = ax_b.plot(xs, [q["delta"] for q in g["points"]], marker="o", gid=f"sweep-{g['pruned']}",
                                label=g["label"])
            ax_s.plot([q["score"] for q in g["points"]], [q["delta"] for q in g["points"]], marker="o",
                      color=line.get_color(), gid=f"sweep-score-{g['pruned']}")
        ax_b.set_xticks(list(pos.values()), ["fp32" if b == _FP32 else f"{b} bits" for b in pos])
        ax_b.set_xlim(-0.3, len(pos) - 0.7)
        ax_b.set_xlabel("weight and activation bits")
        ax_b.set_ylabel(p["ylabel"])
        if len(panels) > 1:
            ax_b.legend(fontsize=8, loc="best")
        lo, hi = padded_range([q["score"] for g in p["groups"] for q in g["points"]], 0.08)
        ax_s.set_xlim(lo, hi)
        ax_s.set_xlabel(f"MicroNet score ({convention} convention; lower is better)")
        ax_s.set_title("the same runs against their score", fontsize=9)
        ax_b.set_title("cost against bits" if len(panels) == 1 else p["title"], fontsize=9)
    if len(panels) == 1:
        fig.suptitle(panels[0]["title"], fontsize=11)
        fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=9)
    for (ax_b, ax_s), p in zip(axes, panels):
        pts = [q for g in p["groups"] for q in g["points"]]
        place_labels(ax_s, [(q["score"], q["delta"], "fp32" if q["bits"] == _FP32 else f"{q['bits']}b") for q in pts],
                     fontsize=9)
    return fig
