"""micronet.report: run collection with missing pieces, tables, plots, data set-up and statistics."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from micronet import report
from micronet.runs.config import MicronetError
from micronet.data.corpus import Corpus, DataError
from micronet.model.transformer import ModelConfig
from micronet.runs.paths import PROJECT_ROOT, shared_data_dir
from micronet.scoring.counts import ModelCounts, bin_fractions, score

CFG = ModelConfig(vocab_size=100, d_model=16, n_layer=2, n_head=2, d_head=8, d_ff=32, n_seq=8, segment_len=8,
                  cutoffs=[20, 50], bin_dims=[16, 8, 4])
CSV = "step,tokens,train_loss,val_loss,val_ppl,lr,tokens_per_s,elapsed_s\n"


def score_json(name: str, step: int, test_ppl: float | None, density: float = 1.0, both: bool = True) -> dict:
    """What ``python -m micronet.score`` writes, for a small model (no training needed)."""
    counts = ModelCounts.from_config(CFG, {"layers.0.ffn.0.weight": density})
    res = {c: score(counts, bin_fractions=(0.7, 0.2, 0.1), convention=c) for c in ("paper", "strict")}
    out = {"name": name, "step": step, "test_ppl": test_ppl, **res["paper"].to_json()}
    if both:
        out["conventions"] = {c: {k: v for k, v in s.to_json().items() if k != "components"} for c, s in res.items()}
    return out


def make_run(root: Path, name: str, *, config: str | None = "name: x\n", ckpts=(), csv_rows=(), ev=None,
             sc=None) -> Path:
    run = root / name
    (run / "models").mkdir(parents=True)
    if config is not None:
        (run / "config.yaml").write_text(config)
    for s in ckpts:
        (run / "models" / f"model-{s}.pt").write_bytes(b"")
    if csv_rows:
        (run / "train_results.csv").write_text(CSV + "".join(f"{s},{s * 10},5.0,{np.log(p)},{p},0.001,100,1\n"
                                                             for s, p in csv_rows))
    for step, obj in (ev or {}).items():
        (run / f"eval_step{step}.json").write_text(obj if isinstance(obj, str) else json.dumps(obj))
    for step, obj in (sc or {}).items():
        (run / f"score_step{step}.json").write_text(json.dumps(obj))
    return run


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "results"
    make_run(root, "full", config="name: full\ndata: {name: wikitext-2}\ntrain: {val_tokens: 0}\n", ckpts=(3, 6),
             csv_rows=[(3, 90.0), (6, 80.0)],
             ev={6: {"name": "full", "step": 6, "valid": {"ppl": 70.0, "tokens": 99, "cache": {"n_cache": 0}},
                     "test": {"ppl": 75.0, "tokens": 120, "cache": {"n_cache": 0}}}},
             sc={6: score_json("full", 6, 75.0)})
    make_run(root, "prune0.5_full", config="name: full\ntrain: {val_tokens: 20}\n"
             "lineage: {parent: full, parent_step: 6, stage: prune}\n",
             ckpts=(10,), csv_rows=[(10, 85.0)], sc={10: score_json("prune0.5_full", 10, None, density=0.5)})
    make_run(root, "old_score", config=None, ckpts=(2,), sc={2: {**score_json("old_score", 2, 99.0, both=False),
                                                                 "convention": "strict"}})
    make_run(root, "broken", config="lineage: [unclosed\n", ckpts=(4,), ev={4: "{not json"})
    make_run(root, "bare")
    (root / ".hidden").mkdir()
    (root / "notes.txt").write_text("not a run")
    return root


def by_name(rows):
    return {r["name"]: r for r in rows}


def test_collect_runs_tolerates_missing_pieces(tree):
    rows = report.collect_runs(root=tree)
    assert [r["name"] for r in rows] == ["bare", "broken", "full", "old_score", "prune0.5_full"]
    r = by_name(rows)
    full = r["full"]
    assert (full["step"], full["val_ppl"], full["test_ppl"], full["val_source"]) == (6, 70.0, 75.0, "eval_step6.json")
    assert full["parent"] is None and full["notes"] == [] and full["bits"] == 32 and full["n_cache"] == 0
    assert full["dataset"] == "wikitext-2" and not full["planned"]
    assert (full["log_val_ppl"], full["log_val_condition"]) == (80.0, "full split, no cache")
    sj = json.loads(Path(full["score_file"]).read_text())
    for c in ("paper", "strict"):
        assert full[f"{c}_score"] == sj["conventions"][c]["score"] and full[f"{c}_params"] > 0
    child = r["prune0.5_full"]
    assert (child["parent"], child["parent_step"], child["stage"], child["step"]) == ("full", 6, "prune", 10)
    assert child["dataset"] == "wikitext-2"  # from its parent's config
    # the training log's validation is never passed off as the evaluation's
    assert (child["val_ppl"], child["test_ppl"], child["log_val_ppl"]) == (None, None, 85.0)
    assert child["log_val_condition"] == "first 20 tokens, no cache"
    assert child["notes"] == ["no eval_step10.json (the cache the score counts)"]
    assert child["paper_ops"] < full["paper_ops"]
    old = r["old_score"]  # a score file without "conventions": only its own convention is known
    assert old["strict_score"] is not None and old["paper_score"] is None and old["test_ppl"] is None
    assert "no config.yaml" in old["notes"] and old["dataset"] is None
    broken = r["broken"]
    assert broken["parent"] is None and broken["val_ppl"] is None and broken["paper_score"] is None
    assert broken["notes"] == ["config.yaml unreadable (ParserError)", "eval_step4.json unreadable (JSONDecodeError)",
                               "no score_step4.json"]
    bare = r["bare"]
    assert bare["step"] is None and bare["planned"]
    assert bare["notes"] == ["no checkpoint, train_results.csv, eval or score file yet"]
    assert all(bare[k] is None for k in ("val_ppl", "paper_score"))


def _eval(n: int, val: float | None, test: float) -> dict:
    cache = {"n_cache": n}
    out = {"test": {"ppl": test, "tokens": 120, "cache": cache}}
    if val is not None:
        out["valid"] = {"ppl": val, "tokens": 99, "cache": cache}
    return out


def test_a_row_is_measured_under_one_condition(tmp_path):
    """Val and test ppl of a row come from one evaluation: full split, the cache the score counts."""
    run = make_run(tmp_path, "r", ckpts=(5,), csv_rows=[(5, 60.0)], ev={5: _eval(0, 80.0, 85.0)},
                   sc={5: {**score_json("r", 5, 65.0), "settings": {"bits": 32, "n_cache": 3000}}})
    (run / "eval_step5_n3000.json").write_text(json.dumps(_eval(3000, None, 65.0)))  # valid skipped
    (run / "cache_step5_n3000.yaml").write_text("n_cache: 3000\nval_ppl: 61.5\nval_tokens: 99\n")
    (row,) = report.collect_runs(root=tmp_path)
    assert (row["n_cache"], row["val_ppl"], row["test_ppl"]) == (3000, 61.5, 65.0)
    assert row["val_source"] == "cache_step5_n3000.yaml" and row["log_val_ppl"] == 60.0
    assert [(e["n_cache"], e["val_ppl"], e["test_ppl"]) for e in row["evals"]] == [(0, 80.0, 85.0), (3000, None, 65.0)]
    table = report.runs_table([row])
    assert "| r | - | 5 | unknown dataset | 3000 | 61.50* | 65.00 | 32 |" in table and "cache search" in table
    assert "60.00 (full split, no cache)" in table
    # a cache search over fewer tokens than the full split is not a full-split validation
    (run / "cache_step5_n3000.yaml").write_text("n_cache: 3000\nval_ppl: 61.5\nval_tokens: 50\n")
    (row,) = report.collect_runs(root=tmp_path)
    assert row["val_ppl"] is None and f"| 3000 | {report.MISSING} | 65.00 |" in report.runs_table([row])


def test_a_scored_run_without_its_evaluation_shows_missing_figures(tmp_path):
    make_run(tmp_path, "s", ckpts=(5,), ev={5: _eval(0, 80.0, 85.0)},
             sc={5: {**score_json("s", 5, None), "settings": {"bits": 9, "n_cache": 2000}}})
    (row,) = report.collect_runs(root=tmp_path)
    assert row["test_ppl"] is None and row["n_cache"] == 2000  # the no-cache figures are not this row's
    table = report.runs_table([row])
    assert f"| 2000 | {report.MISSING} | {report.MISSING} | 9 |" in table and "n_cache=<N>" in table
    assert row["notes"] == ["no eval_step5_n2000.json (the cache the score counts)"]


def test_collect_runs_by_name_and_missing_root(tree, tmp_path):
    assert [r["name"] for r in report.collect_runs("full", root=tree)] == ["full"]
    with pytest.raises(MicronetError, match="no results directory"):
        report.collect_runs(["nope"], root=tree)
    assert report.collect_runs(root=tmp_path / "absent") == []


def test_runs_table_pick_run_and_notes_honour_the_convention(tree):
    rows = report.collect_runs(["full", "prune0.5_full", "bare"], root=tree)
    md = report.runs_table(rows)
    head = md.splitlines()[0]
    assert head.startswith("| run | parent | step | dataset | eval cache | val ppl | test ppl | bits | paper params |")
    assert head.endswith("| paper score | strict score | last training validation |")
    full = by_name(rows)["full"]
    assert f"| full | - | 6 | WikiText-2 | none | 70.00 | 75.00 | 32 | {full['paper_params']:,.0f} |" in md
    assert f"| prune0.5_full | full | 10 | WikiText-2 | none | {report.MISSING} | {report.MISSING} |" in md
    assert "85.00 (first 20 tokens, no cache)" in md
    assert "| bare |" not in md and "1 planned run(s) not started are not shown" in md
    assert "| bare | - | - | unknown dataset | - | - | - |" in report.runs_table(rows, planned=True)
    strict = report.runs_table(rows, convention="strict").splitlines()[0]
    assert "| strict params | strict ops | strict score | paper score |" in strict
    text = report.runs_table(rows, fmt="text").split("\n\n")[0].splitlines()
    assert len(text) == 4 and text[0].startswith("run ")
    assert report.pick_run(rows)["name"] == "prune0.5_full"  # lowest paper score
    assert report.pick_run(rows, convention="strict")["name"] == "prune0.5_full"
    mixed = [{**full, "paper_score": 0.5, "strict_score": 0.1}, {**full, "name": "b", "paper_score": 0.2,
                                                                  "strict_score": 0.3}]
    assert report.pick_run(mixed)["name"] == "b" and report.pick_run(mixed, convention="strict")["name"] == "full"
    assert report.pick_run(rows, "full")["name"] == "full"
    assert report.pick_run([by_name(rows)["bare"]]) is None
    with pytest.raises(MicronetError):
        report.pick_run(rows, "nope")
    with pytest.raises(ValueError, match="convention"):
        report.runs_table(rows, convention="exact")
    notes = report.runs_notes(rows).splitlines()
    assert notes == ["prune0.5_full: no eval_step10.json (the cache the score counts)", "not started (1): bare"]
    assert report.runs_notes(rows[:1]) == "nothing missing"


# ----------------------------------------------------------------------------- perplexity vs score


def point_row(name, dataset, score, ppl, n_cache=2000, parent=None, stage=None, bits=32):
    return {"name": name, "dataset": dataset, "paper_score": score, "strict_score": score, "test_ppl": ppl,
            "n_cache": n_cache, "parent": parent, "stage": stage, "bits": bits}


MIXED = [
    point_row("wt2_8.3M", "wikitext-2", 0.093, 107.5, n_cache=3000),
    point_row("prune0.358_wt2_8.3M", "wikitext-2", 0.062, 108.6, parent="wt2_8.3M", stage="prune"),
    *[point_row(f"quantize_prune0.358_wt2_8.3M_step300_cache2000_bits{b}", "wikitext-2", 0.026 + b / 2000,
                108.5 + b / 100, parent="prune0.358_wt2_8.3M", stage="quantize", bits=b) for b in (8, 9, 10)],
    point_row("8.3M_cache2000_hebbian", "wikitext-103", 0.09, 36.0),
    point_row("unevaluated", "wikitext-2", 0.05, None),
    point_row("unscored", "wikitext-2", None, 100.0),
]


def test_ppl_vs_score_data_separates_datasets_and_keeps_references_with_their_own():
    d = report.ppl_score_data(MIXED)
    panels = {p["dataset"]: p for p in d["panels"]}
    assert list(panels) == ["wikitext-103", "wikitext-2"]
    wt2, wt103 = panels["wikitext-2"], panels["wikitext-103"]
    assert wt2["references"] == [] and wt2["target"] is None  # the original's WikiText-103 facts stay out
    assert wt103["target"] == 35.0 and [r["score"] for r in wt103["references"]] == [0.038747, 0.047516]
    sub3 = wt103["references"][1]
    assert sub3["ppl"] is None and sub3["ppl_max"] == 35.0  # an upper bound, not an invented point
    assert {q["name"] for q in wt2["points"]} == {r["name"] for r in MIXED[:5]}
    assert len({(q["name"], q["n_cache"]) for q in wt2["points"]}) == len(wt2["points"])
    assert d["left_out"] == [("unevaluated", "no test ppl with eval cache 2000")]
    assert ("wt2_8.3M", "prune0.358_wt2_8.3M") in wt2["arrows"]
    assert sum(child.startswith("quantize") for _, child in wt2["arrows"]) == 3
    labels = [q["label"] for q in wt2["points"]]
    assert labels == ["wt2_8.3M", "pruned 0.358", "8 bits", "9 bits", "10 bits"]
    ppls = [q["ppl"] for q in wt2["points"]]  # y fitted to the data: no ppl-35 line squashing it
    lo, hi = wt2["ylim"]
    assert lo < min(ppls) and hi > max(ppls) and hi - lo < 1.5 * (max(ppls) - min(ppls))
    assert all("WikiText-103" in p["title"] or "WikiText-2" in p["title"] for p in d["panels"])
    assert report.ppl_score_data(MIXED, reference=False)["panels"][0]["target"] is None
    with pytest.raises(ValueError, match="convention"):
        report.ppl_score_data(MIXED, convention="exact")


def overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def assert_labels_readable(ax, n: int) -> None:
    boxes = report.label_boxes(ax)
    assert len(boxes) == n
    for i, a in enumerate(boxes):
        assert 0 <= a.x0 and a.x1 <= 1 and 0 <= a.y0 and a.y1 <= 1, "label outside its axes"
        assert not any(overlaps(a, b) for b in boxes[i + 1:]), "labels overlap"


def test_plot_ppl_vs_score_draws_its_data():
    fig = report.plot_ppl_vs_score(MIXED)
    data = report.ppl_score_data(MIXED)
    ax103, ax2 = fig.axes
    for ax, p in zip(fig.axes, data["panels"]):
        pts = sorted(tuple(c.get_offsets()[0]) for c in ax.collections if c.get_gid() == "runs")
        assert pts == sorted((q["score"], q["ppl"]) for q in p["points"])
        assert ax.get_ylim() == pytest.approx(p["ylim"]) and ax.get_title() == p["title"]
        assert len([t for t in ax.texts if t.get_gid() == "lineage"]) == len(p["arrows"])
        assert_labels_readable(ax, len(p["points"]))
    assert [ln.get_ydata()[0] for ln in ax103.lines if ln.get_gid() == "ppl-target"] == [35.0]
    assert not [ln for ln in ax2.lines if ln.get_gid() == "ppl-target"] and not ax2.get_legend()
    best = [tuple(c.get_offsets()[0]) for c in ax103.collections if c.get_gid() == "reference"]
    assert best == [(0.038747, 35.0)]  # submission 3 is no point, only a bound
    (bound,) = [t for t in ax103.texts if t.get_gid() == "reference-bound"]  # an arrow down from 35
    assert bound.xyann == (0.047516, 35.0) and bound.xy[1] < 35.0 and ax103.get_ylim()[0] <= bound.xy[1]
    assert all("WikiText-103" in t for t in ax103.get_legend_handles_labels()[1])
    legend = " ".join(t.get_text() for lg in fig.legends for t in lg.get_texts())
    assert "not drawn: unevaluated" in legend and "submission 3: 0.047516, test ppl not published" in legend
    strict = report.plot_ppl_vs_score(MIXED, convention="strict", annotate=False)
    assert "strict" in strict.axes[0].get_xlabel() and not report.label_boxes(strict.axes[0])


def test_plot_components_groups_layers_with_headroom_and_convention(tree):
    rows = report.collect_runs(["full"], root=tree)
    sj = score_json("full", 6, 75.0)
    d = report.component_data(rows[0])
    assert d["ops_xlim"][1] > max(a + b + c for a, b, c in zip(*d["ops"].values()))  # headroom
    assert "paper convention" in d["title"] and "no eval cache" in d["title"]
    fig = report.plot_components(rows[0])
    ax_p, ax_o = fig.axes
    labels = [t.get_text() for t in ax_p.get_yticklabels()]
    assert "layers.*.qkv" in labels and not any(lab.startswith("layers.0") for lab in labels)
    assert len(labels) == len(set(labels))
    params = [b for b in ax_p.patches if b.get_gid() == "params"]
    assert sum(b.get_width() for b in params) == pytest.approx(sj["params"])
    assert sum(b.get_width() for b in ax_o.patches) == pytest.approx(sj["ops"])
    assert ax_o.get_xlim()[1] == pytest.approx(d["ops_xlim"][1])
    assert "multiplies x bits/32" in [t.get_text() for t in fig.legends[0].get_texts()]
    ungrouped = report.plot_components(rows[0]["score_file"], group_layers=False)
    assert len(ungrouped.axes[0].get_yticklabels()) > len(labels)
    strict = report.component_data(rows[0], convention="strict")  # the file has paper components only
    assert "paper convention only" in strict["note"] and "convention=strict" in strict["note"]
    assert "no scored run" in report.plot_components(None).texts[0].get_text()


def test_training_curves_on_tokens_offset_by_the_parent(tree, tmp_path):
    series = {s["name"]: s for s in report.curve_data(None, root=tree)}
    assert series["full"]["tokens"] == [30.0, 60.0] and series["full"]["offset"] == 0
    child = series["prune0.5_full"]  # continues from the parent's step 6 (60 tokens)
    assert child["offset"] == 60.0 and child["tokens"] == [160.0]
    assert child["label"] == "prune0.5_full (val: first 20 tokens, no cache)"
    fig = report.plot_training_curves(None, root=tree)
    lines = {ln.get_gid(): ln for ln in fig.axes[0].lines}
    assert list(lines["curve-prune0.5_full"].get_xdata()) == [160.0 / 1e6]
    assert "tokens" in fig.axes[0].get_xlabel()
    rows = report.collect_runs(["bare"], root=tree)
    assert "no train_results.csv" in report.plot_training_curves(rows).axes[0].texts[0].get_text()
    out = report.save_figure(fig, tmp_path / "sub" / "curves.png")
    assert out.is_file() and out.read_bytes()[:4] == b"\x89PNG"
    assert report.save_figure(fig, None) is None


def test_the_committed_results_behind_the_readme_figures():
    """The README's figures and table read these runs: one dataset, one cache per point, the sweep's
    deltas against the dense parent measured with the same cache."""
    rows = report.collect_runs(root=PROJECT_ROOT / "results")
    if not any(r["score_file"] for r in rows):
        pytest.skip("no scored runs committed")
    picked = [r for r in rows if r["name"] in report.README_RUNS]
    d = report.ppl_score_data(picked)
    (panel,) = d["panels"]
    assert panel["dataset"] == "wikitext-2" and panel["references"] == [] and len(panel["points"]) == 4
    assert_labels_readable(report.plot_ppl_vs_score(picked).axes[0], 4)
    converged = {r["name"] for r in report.descendants(rows, report.REFERENCE_ROOTS)}
    groups = report.sweep_points([r for r in rows if r["name"] not in converged])  # the 1-epoch sweep
    assert groups and all(g["dataset"] == "wikitext-2" and g["parent"] == "wt2_8.3M" for g in groups)
    dense = by_name(rows)["wt2_8.3M"]
    for g in groups:
        base = next(e["test_ppl"] for e in dense["evals"] if e["n_cache"] == g["n_cache"])
        assert all(q["delta"] == pytest.approx(q["ppl"] - base) for q in g["points"])
    assert "planned run(s) not started are not shown" in report.runs_table(rows)


def test_the_committed_reference_lineage_behind_its_readme_figure():
    """The converged lineage's figure: teacher, distilled -> pruned -> quantized, one WikiText-2 panel, each point
    at the cache its score counts, every label legible; the pruned run's curve continues from its parent's tokens."""
    rows = [r for r in report.collect_runs(root=PROJECT_ROOT / "results") if r["name"] in report.REFERENCE_RUNS]
    if len([r for r in rows if r["score_file"]]) < len(report.REFERENCE_RUNS):
        pytest.skip("the reference lineage is not committed yet")
    (panel,) = report.ppl_score_data(rows)["panels"]
    assert panel["dataset"] == "wikitext-2" and len(panel["points"]) == 4
    assert_labels_readable(report.plot_ppl_vs_score(rows).axes[0], 4)
    trained, pruned = report.REFERENCE_RUNS[1:3]
    curves = report.curve_data([trained, pruned], PROJECT_ROOT / "results")
    assert [c["name"] for c in curves] == [trained, pruned]
    assert curves[1]["tokens"][0] > curves[0]["tokens"][-1]  # the fine-tune continues from its parent's tokens


def test_descendants_follow_parents_and_the_sweeps_keep_their_lineages_apart():
    rows = [{"name": "a"}, {"name": "b", "parent": "a"}, {"name": "c", "parent": "b"}, {"name": "x"},
            {"name": "y", "parent": "x"}, {"name": "loop1", "parent": "loop2"}, {"name": "loop2", "parent": "loop1"}]
    assert [r["name"] for r in report.descendants(rows, ["a"])] == ["a", "b", "c"]
    assert [r["name"] for r in report.descendants(rows, ["b", "x"])] == ["b", "c", "x", "y"]
    assert report.descendants(rows, ["nothing"]) == []
    committed = report.collect_runs(root=PROJECT_ROOT / "results")
    converged = {r["name"] for r in report.descendants(committed, report.REFERENCE_ROOTS)}
    assert "prune0.358_wt2ref_8.3M" in converged and "prune0.358_wt2_8.3M" not in converged


def test_the_readme_distillation_table_is_the_two_training_logs():
    """The README's distillation rows (student alone vs distilled, same steps, seed and data order) are the
    committed training logs' validations at each step, and the distilled run is lower at every one."""
    logs = {n: {int(r["step"]): r for r in report.read_training_curve(PROJECT_ROOT / "results" / n / "train_results.csv")}
            for n in ("wt2ref_8.3M", "distill_wt2ref_8.3M")}
    if not logs["distill_wt2ref_8.3M"]:
        pytest.skip("the distillation's training log is not committed yet")
    readme = (PROJECT_ROOT / "README.md").read_text().splitlines()
    head = next(i for i, line in enumerate(readme) if line.startswith("| step | training tokens | student alone"))
    rows = [[c.strip().replace(",", "") for c in line.strip("|").split("|")]
            for line in readme[head + 2: next(j for j in range(head, len(readme)) if not readme[j].startswith("|"))]]
    assert [int(r[0]) for r in rows] == sorted(logs["distill_wt2ref_8.3M"])  # every logged step, no other
    for step, tokens, alone, distilled, gain in rows:
        a, d = logs["wt2ref_8.3M"][int(step)], logs["distill_wt2ref_8.3M"][int(step)]
        assert int(tokens) == a["tokens"] == d["tokens"]  # the same data seen
        assert (float(alone), float(distilled)) == (round(a["val_ppl"], 2), round(d["val_ppl"], 2))
        assert float(gain.rstrip("%")) == round(100 * (d["val_ppl"] / a["val_ppl"] - 1), 1) < 0


def test_split_statistics_on_a_small_corpus():
    vocab = ["the", "<eos>", "<unk>", "a", "b", "c"]
    arr = {"train": np.array([0, 0, 1, 2, 3, 4, 5, 1], np.int32), "valid": np.array([0, 2, 2, 1], np.int32),
           "test": np.array([3, 1], np.int32)}
    corpus = Corpus(vocab=vocab, manifest={}, **arr)
    rows = report.split_statistics(corpus, cutoffs=(2, 4, 100))  # 100 >= vocab: dropped
    train, valid, test = rows
    assert (train["tokens"], train["lines"], train["types"], train["vocab"], train["unk"]) == (8, 2, 6, 6, 1)
    assert valid["unk_share"] == pytest.approx(0.5) and test["types"] == 2
    assert train["cutoffs"] == (2, 4)
    for r in rows:
        assert r["bin_fractions"] == pytest.approx(bin_fractions(arr[r["split"]], (2, 4), 6))
    text = report.format_split_statistics(rows)
    assert "bin [0,2) %" in text and "bin [4,V) %" in text and "50.00" in text
    with pytest.raises(ValueError, match="increasing"):
        report.split_statistics(corpus, cutoffs=(4, 2))


def test_split_statistics_default_to_the_data_sets_own_model():
    assert report.model_cutoffs("wt2_8.3M") == (3500, 15000) and report.model_cutoffs("8.3M") == (3500, 25000)
    big = np.arange(20000, dtype=np.int32)
    corpus = Corpus(vocab=[f"w{i}" for i in range(20000)], manifest={"name": "wikitext-2"}, train=big, valid=big,
                    test=big)
    rows = report.split_statistics(corpus)
    assert rows[0]["model"] == "wt2_8.3M" and rows[0]["cutoffs"] == (3500, 15000)
    assert rows[0]["bin_fractions"] == pytest.approx((3500 / 20000, 11500 / 20000, 5000 / 20000))
    assert report.format_split_statistics(rows).startswith("adaptive-softmax bins of model wt2_8.3M")
    with pytest.raises(DataError, match="no model config"):
        report.model_cutoffs("nope")


# ----------------------------------------------------------------------------- setup_data

LINES = {"train": "the cat sat on the mat\n\nthe dog sat\n" * 20, "valid": "the cat\n\nthe dog sat\n",
         "test": "on the mat\n"}


def fake_folder(path: Path, splits=("train", "valid", "test"), sums: bool = True) -> Path:
    path.mkdir(parents=True)
    for s in splits:
        (path / f"wiki.{s}.tokens").write_text(LINES[s])
    if sums:
        import hashlib

        digests = {s: hashlib.sha256((path / f"wiki.{s}.tokens").read_bytes()).hexdigest() for s in splits}
        (path / "SHA256SUMS").write_text("".join(f"{d}  wiki.{s}.tokens\n" for s, d in digests.items()))
    return path


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MICRONET_DATA", str(tmp_path / "data"))
    return tmp_path / "data"


def test_setup_data_copies_a_local_folder_where_training_reads(data_dir, tmp_path):
    src = fake_folder(tmp_path / "local")
    corpus = report.setup_data("wikitext-103", src, verify=False)
    assert corpus.manifest["source_dir"] == str(data_dir / "raw" / "wikitext-103")
    assert (data_dir / "raw/wikitext-103/wiki.valid.tokens").read_text() == LINES["valid"]
    assert len(corpus.train) == 20 * 12 and corpus.vocab[:2] == ["the", "<eos>"]
    status = {r["split"]: r["status"] for r in report.checksum_rows(corpus)}
    assert status == {"train": "not listed", "valid": "DIFFERENT", "test": "DIFFERENT"}
    with pytest.raises(DataError, match="does not match the official"):  # verify=True: micronet.data checks
        report.setup_data("wikitext-103", src)


def test_setup_data_refuses_a_corrupt_local_copy(data_dir, tmp_path):
    src = fake_folder(tmp_path / "local")
    (src / "wiki.test.tokens").write_text("on the mat mat\n")
    with pytest.raises(DataError, match="does not match .*SHA256SUMS"):
        report.setup_data("wikitext-103", src, verify=False)


def test_setup_data_without_train_says_it_must_be_downloaded(data_dir, tmp_path):
    src = fake_folder(tmp_path / "local", splits=("valid", "test"))
    with pytest.raises(DataError, match="train split must be downloaded from https://.*DOWNLOAD = True"):
        report.setup_data("wikitext-103", src, download=False, verify=False)
    with pytest.raises(DataError, match="missing wiki.valid.tokens"):
        report.setup_data("wikitext-103", fake_folder(tmp_path / "only_train", splits=("train",)), verify=False)


def test_setup_data_downloads_a_missing_train_split(data_dir, tmp_path):
    src = fake_folder(tmp_path / "local", splits=("valid", "test"))
    zpath = tmp_path / "wikitext-103-v1.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for s in ("train", "valid", "test"):
            zf.writestr(f"wikitext-103/wiki.{s}.tokens", LINES[s] + ("extra\n" if s == "test" else ""))
    corpus = report.setup_data("wikitext-103", src, url=zpath.as_uri(), verify=False)
    assert len(corpus.train) == 20 * 12
    assert (data_dir / "raw/wikitext-103/wiki.test.tokens").read_text() == LINES["test"]  # the local copy kept
    assert sorted(p.name for p in (data_dir / "raw/wikitext-103").iterdir()) == [
        "wiki.test.tokens", "wiki.train.tokens", "wiki.valid.tokens"]


def test_setup_data_on_the_shared_wikitext103_copy(data_dir, tmp_path):
    shared = shared_data_dir() / "wikitext-103"
    if not (shared / "wiki.valid.tokens").is_file():
        pytest.skip(f"no shared WikiText-103 copy at {shared}")
    with pytest.raises(DataError, match="must be downloaded"):
        report.setup_data("wikitext-103", shared, download=False)
    # The shared copy with a stand-in train split (valid + test): official checksums verified.
    local = tmp_path / "wt103"
    local.mkdir()
    for s in ("valid", "test"):
        (local / f"wiki.{s}.tokens").write_bytes((shared / f"wiki.{s}.tokens").read_bytes())
    (local / "wiki.train.tokens").write_bytes((local / "wiki.valid.tokens").read_bytes()
                                              + (local / "wiki.test.tokens").read_bytes())
    corpus = report.setup_data("wikitext-103", local)
    assert (len(corpus.valid), len(corpus.test)) == (217646, 245569)
    status = {r["split"]: r["status"] for r in report.checksum_rows(corpus)}
    assert status == {"train": "not listed", "valid": "official", "test": "official"}


def test_data_config_follows_the_hydra_group():
    cfg = report.data_config("wikitext-103")
    assert cfg.url.endswith("wikitext-103-v1.zip") and cfg.raw_dir is None and cfg.verify_sha256
    assert report.data_config("wikitext-2", url="file:///x.zip", verify=False).url == "file:///x.zip"
    assert report.data_config("ptb").name == "ptb"
    with pytest.raises(DataError, match="invalid data set name"):
        report.data_config("../etc")
