"""Sweep plot: cost against the fp32 dense parent at the same cache, grouped by parent and pruned run
(every method), never mixing datasets; the drawing shows exactly that data."""

from __future__ import annotations

import json

import pytest

from micronet.report.layout import label_boxes
from micronet.report.sweep import measured_sparsity, plot_sweep, sweep_panels, sweep_points


def _row(name, parent=None, stage=None, bits=None, score=None, ppl=None, n_cache=2000, dataset="wikitext-2",
         evals=(), path=None, score_file=None):
    return {"name": name, "parent": parent, "stage": stage, "bits": bits, "n_cache": n_cache, "paper_score": score,
            "strict_score": score, "test_ppl": ppl, "val_ppl": None if ppl is None else ppl + 8, "dataset": dataset,
            "evals": [{"n_cache": n, "test_ppl": t, "val_ppl": t + 8} for n, t in evals], "path": path,
            "score_file": score_file}


@pytest.fixture
def rows(tmp_path):
    uniform = tmp_path / "prune_uniform_base"
    uniform.mkdir()
    (uniform / "config.yaml").write_text("prune: {name: uniform, kind: uniform, target: 0.4}\n")
    table = tmp_path / "prune0.3_base"
    table.mkdir()
    (table / "config.yaml").write_text("prune: {name: '0.3', kind: table}\n")
    return [
        _row("base", score=0.09, ppl=100.0, n_cache=3000, evals=[(0, 150.0), (2000, 101.0), (3000, 100.0)]),
        _row("prune0.3_base", "base", "prune", 32, 0.06, 102.0, path=str(table)),
        _row("prune_uniform_base", "base", "prune", 32, 0.05, 104.0, path=str(uniform)),
        *[_row(f"quantize_prune0.3_base_step300_cache2000_bits{b}", "prune0.3_base", "quantize", b,
               0.02 + b / 1000, 102.0 + (10 - b) / 10) for b in (10, 8, 9)],
        _row("quantize_prune0.3_base_step300_cache2000_bits7", "prune0.3_base", "quantize", 7, None, 120.0),  # unscored
        # the same recipe on another corpus: its own group, never merged with base's
        _row("wt103", score=0.09, ppl=30.0, dataset="wikitext-103", evals=[(2000, 30.0)]),
        _row("prune0.3_wt103", "wt103", "prune", 32, 0.06, 31.5, dataset="wikitext-103"),
        _row("prune0.3_orphan", "gone", "prune", 32, 0.06, 99.0),  # no dense parent among the rows
    ]


def test_groups_by_parent_and_pruned_run_with_the_parents_ppl_at_the_same_cache(rows):
    groups = sweep_points(rows)
    key = {(g["parent"], g["pruned"]): g for g in groups}
    assert set(key) == {("base", "prune0.3_base"), ("base", "prune_uniform_base"), ("wt103", "prune0.3_wt103")}
    for g in groups:
        names = {q["name"] for q in g["points"]}
        assert len({r["dataset"] for r in rows if r["name"] in names} | {g["dataset"]}) == 1  # one dataset per group
    table = key[("base", "prune0.3_base")]
    assert table["parent_ppl"] == 101.0  # the parent's eval with cache 2000, not its scored 3000 figure
    assert [q["bits"] for q in table["points"]] == [32, 10, 9, 8]
    assert [q["delta"] for q in table["points"]] == pytest.approx([1.0, 1.0, 1.1, 1.2])
    assert table["label"] == "AGP schedule 0.3" and table["sparsity"] is None  # no score files: not measured
    assert key[("base", "prune_uniform_base")]["label"] == "uniform 0.4"
    assert key[("wt103", "prune0.3_wt103")]["points"][0]["delta"] == pytest.approx(1.5)
    val = {g["pruned"]: g for g in sweep_points(rows, split="val")}["prune0.3_base"]
    assert val["parent_ppl"] == 109.0 and val["points"][0]["delta"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="convention"):
        sweep_points(rows, "other")
    with pytest.raises(ValueError, match="split"):
        sweep_points(rows, split="train")


def test_panels_name_split_and_cache_and_fit_the_deltas(rows):
    panels = sweep_panels(sweep_points(rows))
    assert [(p["dataset"], p["parent"], p["n_cache"]) for p in panels] == [("wikitext-103", "wt103", 2000),
                                                                             ("wikitext-2", "base", 2000)]
    wt2 = panels[1]
    assert wt2["title"] == "WikiText-2: pruning x quantization of base (full test split, eval cache 2000)"
    assert wt2["bits"] == [32, 10, 9, 8] and wt2["ylabel"] == "test ppl minus the dense parent's"
    deltas = [0.0] + [q["delta"] for g in wt2["groups"] for q in g["points"]]
    lo, hi = wt2["ylim"]
    assert lo < min(deltas) and hi > max(deltas) and hi - lo < 1.5 * (max(deltas) - min(deltas))


def test_plot_draws_the_groups_on_evenly_spaced_bits_with_readable_labels(rows):
    fig = plot_sweep(rows)
    panels = sweep_panels(sweep_points(rows))
    axes = fig.axes
    assert len(axes) == 4  # two panels (datasets) x (bits, score)
    ax_b, ax_s = axes[2], axes[3]  # WikiText-2
    lines = {ln.get_gid(): ln for ln in ax_b.get_lines()}
    assert list(lines["sweep-prune0.3_base"].get_xdata()) == [0, 1, 2, 3]  # fp32, 10, 9, 8 evenly spaced
    assert [t.get_text() for t in ax_b.get_xticklabels()] == ["fp32", "10 bits", "9 bits", "8 bits"]
    assert list(lines["sweep-prune_uniform_base"].get_xdata()) == [0]
    assert "dense-parent" in lines and list(lines["dense-parent"].get_ydata()) == [0.0, 0.0]
    assert ax_b.get_ylim() == pytest.approx(panels[1]["ylim"])
    assert ax_b.get_title() == panels[1]["title"]
    boxes = label_boxes(ax_s)
    assert sorted(t.get_text() for t in ax_s.texts if t.get_gid() == "label") == ["10b", "8b", "9b", "fp32", "fp32"]
    for i, a in enumerate(boxes):
        assert 0 <= a.x0 and a.x1 <= 1 and 0 <= a.y0 and a.y1 <= 1
        assert not any(a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1 for b in boxes[i + 1:])


def test_measured_sparsity_from_the_score_files(tmp_path):
    def score_file(name, muls):
        path = tmp_path / f"{name}.json"
        comps = [{"component": "fc", "params": 100.0, "muls": muls}, {"component": "ln", "params": 0.0, "muls": 0.0},
                 {"component": "head", "params": 300.0, "muls": 600.0 if name == "dense" else 300.0}]
        path.write_text(json.dumps({"components": comps}))
        return str(path)

    dense, pruned = {"score_file": score_file("dense", 100.0)}, {"score_file": score_file("pruned", 40.0)}
    assert measured_sparsity(pruned, dense) == pytest.approx(1 - (40 + 150) / 400)
    assert measured_sparsity({"score_file": None}, dense) is None


def test_empty_sweep_says_so():
    fig = plot_sweep([_row("base")])
    assert any("no pruned" in t.get_text() for t in fig.axes[0].texts)
