"""The report's plots: perplexity vs score, score breakdowns, training curves, the README figures.

The notebooks call them through :mod:`micronet.report`, which re-exports this module with
:mod:`.runs` (runs and the table), :mod:`.data_setup`, :mod:`.sweep` and :mod:`.layout`::

    rows = collect_runs()                      # every run under results/
    print(runs_table(rows, fmt="text"))
    fig = plot_ppl_vs_score(rows, convention="paper")
    save_figure(fig, "ppl_vs_score.png")

Every plot is drawn from a ``*_data`` function (points, groups, labels, limits) that tests assert on.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from micronet.report.layout import figure_axes, padded_range, place_labels, save_figure, spread
from micronet.report.runs import (check_convention, collect_runs, dataset_label, read_training_curve, run_names,
                                  token_offset, validation_condition)
from micronet.report.sweep import descendants, plot_sweep
from micronet.runs.paths import PROJECT_ROOT, results_root

PPL_TARGET = 35.0
"""The challenge's WikiText-103 requirement: test perplexity at most 35."""
REFERENCE_DATASET = "wikitext-103"
REFERENCE_POINTS: dict[str, list[dict]] = {
    # Spec section 8 (paper convention) and the spec's summary (best: test ppl 35.0). The spec gives
    # no perplexity for submission 3: as a challenge entry it met the limit, so only "<= 35" is known
    # ("ppl_max"; drawn as an upper bound, never as a point at an invented value).
    "paper": [
        {"label": "original best: 0.038747, test ppl 35.0", "score": 0.038747, "ppl": 35.0},
        {"label": "original submission 3: 0.047516, test ppl not published (<= 35)", "score": 0.047516,
         "ppl": None, "ppl_max": 35.0},
    ],
    # The original's best model counted by our strict rules (README; bench/reproduce_paper_score.py).
    "strict": [{"label": "original best, strict count: 0.044944, test ppl 35.0", "score": 0.044944, "ppl": 35.0}],
}
STAGE_COLORS = {None: "tab:blue", "distill": "tab:purple", "prune": "tab:orange", "quantize": "tab:green"}
STAGE_NAMES = {None: "trained", "distill": "distilled", "prune": "pruned", "quantize": "quantized"}
CACHE_MARKERS = ("o", "D", "^", "s", "v", "P", "X")
README_RUNS = ("wt2_8.3M", "wt2_8.3M_cache2000_hebbian", "prune0.358_wt2_8.3M",
               "quantize_prune0.358_wt2_8.3M_step300_cache2000_bits9")
"""The runs of the README's perplexity-vs-score figure and the table beside it (the WikiText-2 pipeline)."""
REFERENCE_RUNS = ("wt2ref_8.3M", "distill_wt2ref_8.3M", "prune0.358_distill_wt2ref_8.3M",
                  "quantize_prune0.358_distill_wt2ref_8.3M_step300_cache2000_bits8")
"""The converged reference lineage (issue 15): teacher (= student alone), distilled, pruned, quantized (8 bits: released)."""
REFERENCE_ROOTS = ("wt2ref_8.3M", "distill_wt2ref_8.3M")
"""The converged runs' trained roots: their descendants are the reference lineage's, not the 1-epoch sweep's."""
REFERENCE_SWEEP_PARENT = "distill_wt2ref_8.3M"
"""The dense parent of the converged sparsity x bits sweep."""
REFERENCE_CURVES = ("wt2ref_8.3M", "distill_wt2ref_8.3M", "prune0.358_distill_wt2ref_8.3M")
"""The reference lineage's validation curves: wt2ref_8.3M is both the teacher and the student alone of its
born-again distillation (distill_wt2ref_8.3M: same model, steps, seed and data order), so the two curves
measure the distillation gain at every logged step."""


# ----------------------------------------------------------------------------- perplexity vs score


def short_label(row: Mapping) -> str:
    """A point label: a pruned run by its schedule, a quantized one by its bits, others by name
    (the lineage arrows say whose child a point is)."""
    name = row["name"]
    if row.get("stage") == "quantize" and row.get("bits"):
        return f"{row['bits']} bits"
    if row.get("stage") == "prune" and name.startswith("prune"):
        return f"pruned {name[5:].split('_', 1)[0]}"
    return name


def _cache_text(n: int | None) -> str:
    return f"eval cache {n}" if n else "no eval cache"


def ppl_score_data(rows: Sequence[Mapping], convention: str = "paper", reference: bool = True) -> dict:
    """What :func:`plot_ppl_vs_score` draws: one panel per dataset, each with its points (one per
    (run, eval cache): the full test split with the cache the run's score counts), lineage arrows
    (parent -> child, both in the panel), labels, axis limits, and the original's WikiText-103
    references only in a WikiText-103 panel. ``left_out``: scored runs not drawn, with the reason."""
    check_convention(convention)
    key = f"{convention}_score"
    panels: dict[str | None, dict] = {}
    left_out = []
    for r in rows:
        if r.get(key) is None:
            continue
        if r.get("test_ppl") is None or not math.isfinite(r["test_ppl"]):
            left_out.append((r["name"], f"no test ppl with {_cache_text(r.get('n_cache'))}"))
            continue
        p = panels.setdefault(r.get("dataset"), {"dataset": r.get("dataset"), "points": []})
        p["points"].append({"name": r["name"], "label": short_label(r), "score": r[key], "ppl": r["test_ppl"],
                            "n_cache": r.get("n_cache") or 0, "stage": r.get("stage"), "parent": r.get("parent")})
    out = []
    for ds, p in sorted(panels.items(), key=lambda kv: str(kv[0])):
        names = {q["name"] for q in p["points"]}
        p["arrows"] = [(q["parent"], q["name"]) for q in p["points"] if q["parent"] in names]
        refs = [dict(x) for x in REFERENCE_POINTS[convention]] if reference and ds == REFERENCE_DATASET else []
        p["references"], p["target"] = refs, (PPL_TARGET if refs else None)
        # a bound spans from its value down to the tip of its arrow (3% below)
        ys = [q["ppl"] for q in p["points"]] + [v for x in refs for v in
                                                 ([x["ppl"]] if x.get("ppl") else [x["ppl_max"], 0.97 * x["ppl_max"]])]
        xs = [q["score"] for q in p["points"]] + [x["score"] for x in refs]
        p["xlog"], p["ylog"] = spread(xs), spread(ys)
        p["xlim"], p["ylim"] = padded_range(xs, 0.1, p["xlog"]), padded_range(ys, 0.15, p["ylog"])
        n = len(p["points"])
        p["title"] = (f"{dataset_label(ds)}: {n} run{'s' * (n != 1)}, full test split, "
                      "each with the eval cache its score counts")
        if reference and ds != REFERENCE_DATASET:
            p["title"] += "\n(the original's WikiText-103 points are another corpus' figures: not drawn here)"
        out.append(p)
    return {"convention": convention, "panels": out, "left_out": left_out}


def plot_ppl_vs_score(rows: Sequence[Mapping], convention: str = "paper", reference: bool = True,
                      annotate: bool = True) -> Figure:
    """Test perplexity against MicroNet score, one panel per dataset (:func:`ppl_score_data`).

    Colour: how the run was made (trained, distilled, pruned, quantized); marker: its eval cache;
    grey arrows: parent -> child. The original's points and the ppl-35 limit are WikiText-103 facts,
    drawn only beside WikiText-103 runs.
    """
    data = ppl_score_data(rows, convention, reference)
    panels = data["panels"]
    fig = Figure(figsize=(7.5, 4.8 * max(1, len(panels))), layout="constrained")
    axes = fig.subplots(max(1, len(panels)), 1, squeeze=False)[:, 0]
    caches = sorted({q["n_cache"] for p in panels for q in p["points"]})
    marker = {n: CACHE_MARKERS[i % len(CACHE_MARKERS)] for i, n in enumerate(caches)}
    for ax, p in zip(axes, panels):
        at = {q["name"]: (q["score"], q["ppl"]) for q in p["points"]}
        for q in p["points"]:
            ax.scatter([q["score"]], [q["ppl"]], s=45, zorder=3, marker=marker[q["n_cache"]], gid="runs",
                       color=STAGE_COLORS.get(q["stage"], "tab:gray"), edgecolors="black", linewidths=0.4)
        for parent, child in p["arrows"]:
            ax.annotate("", at[child], xytext=at[parent], gid="lineage", zorder=2,
                        arrowprops={"arrowstyle": "->", "color": "0.6", "lw": 0.9, "shrinkA": 5, "shrinkB": 5})
        if p["target"] is not None:
            ax.axhline(p["target"], color="tab:red", ls="--", lw=1, gid="ppl-target",
                       label=f"challenge limit: test ppl {p['target']:g} (WikiText-103)")
        for ref in p["references"]:
            if ref.get("ppl") is not None:
                ax.scatter([ref["score"]], [ref["ppl"]], marker="*", s=140, color="tab:red", zorder=4,
                           gid="reference", label=f"WikiText-103, {ref['label']}")
            else:  # an upper bound: a bar at the bound and an arrow down from it, no point
                ax.annotate("", (ref["score"], 0.97 * ref["ppl_max"]), xytext=(ref["score"], ref["ppl_max"]),
                            gid="reference-bound", arrowprops={"arrowstyle": "-|>", "color": "tab:red", "lw": 1.2})
                ax.plot([ref["score"]], [ref["ppl_max"]], ls="", marker="_", ms=14, mew=2, color="tab:red",
                        gid="reference-bound", label=f"WikiText-103, {ref['label']}")
        ax.set_xscale("log" if p["xlog"] else "linear")
        ax.set_yscale("log" if p["ylog"] else "linear")
        ax.set_xlim(*p["xlim"])
        ax.set_ylim(*p["ylim"])
        ax.set_xlabel(f"MicroNet score ({convention} convention; lower is better)")
        ax.set_ylabel("test perplexity (full split)")
        ax.set_title(p["title"], fontsize=10)
    if not panels:
        axes[0].text(0.5, 0.5, "no scored run with a test ppl: python -m micronet.score name=<run>",
                     ha="center", transform=axes[0].transAxes)
        return fig
    handles = [Line2D([], [], ls="", marker="o", color=STAGE_COLORS[s], label=STAGE_NAMES[s])
               for s in STAGE_COLORS if any(q["stage"] == s for p in panels for q in p["points"])]
    handles += [Line2D([], [], ls="", marker=marker[n], color="0.4", label=_cache_text(n)) for n in caches]
    handles.append(Line2D([], [], color="0.6", label="parent -> child"))
    refs: list = []
    for ax in axes:
        refs += [h for h in ax.get_legend_handles_labels()[0]]
    ncols = min(len(handles), 4)
    extra = [Line2D([], [], ls="", label=textwrap.fill("not drawn: " + "; ".join(f"{n} ({why})" for n, why in
                                                                                 data["left_out"]), 110))]
    fig.legend(handles=handles, loc="outside lower center", ncols=ncols, fontsize=8)
    if refs or data["left_out"]:  # the original's points (WikiText-103 panel) and what is not drawn, on top
        fig.legend(handles=refs + (extra if data["left_out"] else []), loc="outside upper center", fontsize=8)
    if annotate:
        for ax, p in zip(axes, panels):
            refs = [(x["score"], x.get("ppl") or x["ppl_max"]) for x in p["references"]]
            place_labels(ax, [(q["score"], q["ppl"], q["label"]) for q in p["points"]], avoid=refs)
    return fig


# ----------------------------------------------------------------------------- components


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


def _group_layers(comps: Sequence[Mapping]) -> list[dict]:
    """Merge ``layers.<L>.<x>`` components into ``layers.*.<x>`` (sums over layers)."""
    out: dict[str, dict] = {}
    for c in comps:
        parts = c["component"].split(".")
        key = ".".join(["layers", "*", *parts[2:]]) if parts[0] == "layers" and parts[1].isdigit() else c["component"]
        g = out.setdefault(key, {"component": key, **{f: 0.0 for f in ("params", "mul_ops", "adds", "others")}})
        for f in ("params", "mul_ops", "adds", "others"):
            g[f] += float(c.get(f) or 0.0)
    return list(out.values())


def component_data(score_json: Mapping | str | os.PathLike | None, convention: str = "paper",
                   group_layers: bool = True) -> dict:
    """What :func:`plot_components` draws: components, their params and ops (mul ops, adds, others),
    axis limits with headroom, the title; or ``note`` when there is nothing to draw."""
    check_convention(convention)
    s = load_score(score_json)
    if s is None:
        return {"note": "no scored run: python -m micronet.score name=<run>"}
    conv = (s.get("conventions") or {}).get(convention) or {}
    comps = conv.get("components") or (s.get("components") if s.get("convention", "paper") == convention else None)
    if not comps:
        total = conv.get("score", float("nan"))
        return {"note": f"{s.get('name', '?')}: the score file holds the per-component counts of the "
                        f"{s.get('convention')} convention only ({convention} score {total:.6f}); "
                        f"python -m micronet.score name={s.get('name', '<run>')} convention={convention} "
                        "writes them (as the file's main convention)"}
    comps = _group_layers(comps) if group_layers else [dict(c) for c in comps]
    totals = conv or s
    ops = [c["mul_ops"] + c["adds"] + c["others"] for c in comps]
    st = totals.get("settings") or s.get("settings") or {}
    return {
        "components": [c["component"] for c in comps], "params": [c["params"] for c in comps],
        "ops": {k: [c[k] for c in comps] for k in ("mul_ops", "adds", "others")},
        "params_xlim": (0.0, 1.15 * max([c["params"] for c in comps] + [1.0])),
        "ops_xlim": (0.0, 1.15 * max(ops + [1.0])),
        "title": (f"{s.get('name', '?')} step {s.get('step', '?')}, {convention} convention, "
                  f"{st.get('bits', '?')} bits, {_cache_text(st.get('n_cache'))}: "
                  f"params {totals.get('params', 0):,.0f}, ops {totals.get('ops', 0):,.0f}, "
                  f"score {totals.get('score', 0):.6f}"),
    }


def plot_components(score_json: Mapping | str | os.PathLike | None, ax: Sequence[Axes] | None = None,
                    group_layers: bool = True, convention: str = "paper") -> Figure:
    """Per-component params and ops per token of a scored run (:func:`component_data`): ops stacked as
    multiplies weighted by their bit width / 32 ("mul ops"), adds and other ops (exp, div, ...; 32-bit).

    ``score_json``: a ``score_step<S>.json`` path or dict, or a :func:`collect_runs` row. ``ax``: a
    pair of axes (params, ops), else a new figure.
    """
    if ax is None:
        fig = Figure(figsize=(11, 6), layout="constrained")
        ax = fig.subplots(1, 2, sharey=True)
    ax_p, ax_o = ax
    fig = ax_p.figure
    d = component_data(score_json, convention, group_layers)
    if "note" in d:
        for a in ax:
            a.set_axis_off()
        fig.text(0.5, 0.5, textwrap.fill(d["note"], 100), ha="center", va="center", fontsize=9, gid="note")
        return fig
    names = d["components"][::-1]
    pos = list(range(len(names)))
    ax_p.barh(pos, d["params"][::-1], color="tab:blue", gid="params")
    ax_p.set_yticks(pos, names)
    ax_p.set_xlim(*d["params_xlim"])
    ax_p.set_xlabel("params (32-bit equivalents)")
    left = [0.0] * len(names)
    legend = {"mul_ops": "multiplies x bits/32", "adds": "adds (32-bit)", "others": "others: exp, div, ... (32-bit)"}
    for key, color in (("mul_ops", "tab:orange"), ("adds", "tab:green"), ("others", "tab:gray")):
        vals = d["ops"][key][::-1]
        ax_o.barh(pos, vals, left=left, color=color, label=legend[key], gid=f"ops-{key}")
        left = [a + b for a, b in zip(left, vals)]
    ax_o.set_xlim(*d["ops_xlim"])
    ax_o.set_xlabel("ops per test token (32-bit equivalents)")
    fig.legend(*ax_o.get_legend_handles_labels(), loc="outside lower right", ncols=3, fontsize=8,
               title="ops per token, stacked", title_fontsize=8)
    fig.suptitle(d["title"], fontsize=10)
    return fig


# ----------------------------------------------------------------------------- training curves


def curve_data(names: Sequence[str | Mapping] | str | None = None, root: str | os.PathLike | None = None) -> list[dict]:
    """What :func:`plot_training_curves` draws: per run with a training log, ``tokens`` (counted from
    the root of its lineage: a pruned run starts at its parent's tokens), ``val_ppl``, ``offset`` and
    ``label`` (name and the validation's condition: full split or first N tokens, cache or not)."""
    base = Path(root) if root is not None else results_root()
    items = run_names(base) if names is None else ([names] if isinstance(names, str) else names)
    out = []
    for item in items:
        path = Path(item["path"]) if isinstance(item, Mapping) else base / item
        curve = [r for r in read_training_curve(path / "train_results.csv") if "val_ppl" in r and "tokens" in r]
        if curve:
            off = token_offset(path)
            out.append({"name": path.name, "offset": off, "tokens": [off + r["tokens"] for r in curve],
                        "val_ppl": [r["val_ppl"] for r in curve],
                        "label": f"{path.name} (val: {validation_condition(path)})"})
    return out


def plot_training_curves(names: Sequence[str | Mapping] | None = None, root: str | os.PathLike | None = None,
                         ax: Axes | None = None, title: str | None = None) -> Figure:
    """Validation perplexity of each run's training log against training tokens (:func:`curve_data`);
    ``title`` goes above the default one (say the dataset and what the curves compare)."""
    fig, ax = figure_axes(ax, (8.5, 5.5))
    series = curve_data(names, root)
    for s in series:
        ax.plot([t / 1e6 for t in s["tokens"]], s["val_ppl"], marker=".", label=s["label"], gid=f"curve-{s['name']}")
    ppls = [v for s in series for v in s["val_ppl"]]
    if not series:
        ax.text(0.5, 0.5, "no train_results.csv found", ha="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize=7, loc="upper right")
    if spread(ppls):
        ax.set_yscale("log")
    ax.set_xlabel("training tokens (millions; a pruned run continues from its parent's)")
    ax.set_ylabel("validation perplexity (training log)")
    ax.set_title((f"{title}\n" if title else "") + "training curves: the condition of each validation in the legend",
                 fontsize=10)
    return fig


# ----------------------------------------------------------------------------- the README's figures


def readme_figures(root: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None,
                   names: Sequence[str] = README_RUNS, convention: str = "paper") -> dict[str, Path]:
    """Regenerate the README's figures from the runs under ``root`` into ``out_dir`` (default
    ``docs/``): perplexity vs score of ``names`` and the sparsity x bits sweep of the 1-epoch runs, and, once
    its runs exist, the converged reference lineage's: perplexity vs score (:data:`REFERENCE_RUNS`), validation
    curves (:data:`REFERENCE_CURVES`, each run once it has a training log) and the sweep under
    :data:`REFERENCE_SWEEP_PARENT`."""
    out = Path(out_dir) if out_dir is not None else PROJECT_ROOT / "docs"
    rows = collect_runs(root=root)
    picked = [r for r in rows if r["name"] in set(names)]
    ref = [r for r in rows if r["name"] in set(REFERENCE_RUNS)]
    converged = {r["name"] for r in descendants(rows, REFERENCE_ROOTS)}
    figures = {"ppl_vs_score": save_figure(plot_ppl_vs_score(picked, convention), out / "wt2_ppl_vs_score.png"),
               "sweep": save_figure(plot_sweep([r for r in rows if r["name"] not in converged], convention),
                                    out / "wt2_sweep.png")}  # the 1-epoch sweep; the reference lineage has its own
    if ref:
        figures["ref_ppl_vs_score"] = save_figure(plot_ppl_vs_score(ref, convention), out / "wt2ref_ppl_vs_score.png")
        figures["ref_curves"] = save_figure(plot_training_curves(list(REFERENCE_CURVES), root, title=(
            "WikiText-2 (valid split): wt2ref_8.3M is the teacher and the student alone of distill_wt2ref_8.3M")),
                                            out / "wt2ref_curves.png")  # runs without a training log are skipped
    ref_sweep = descendants(rows, (REFERENCE_SWEEP_PARENT,))
    if any(r.get("stage") == "prune" for r in ref_sweep):
        figures["ref_sweep"] = save_figure(plot_sweep(ref_sweep, convention), out / "wt2ref_sweep.png")
    return figures


__all__ = ["CACHE_MARKERS", "PPL_TARGET", "README_RUNS", "REFERENCE_CURVES", "REFERENCE_ROOTS", "REFERENCE_RUNS", "REFERENCE_SWEEP_PARENT", "REFERENCE_DATASET", "STAGE_COLORS", "STAGE_NAMES", "component_data", "curve_data", "load_score", "plot_components", "plot_ppl_vs_score", "plot_training_curves", "ppl_score_data", "readme_figures", "short_label"]
