"""Sweep plot: points grouped by pruning level, ordered by bits, unscored and unrelated runs left out."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from micronet.report.sweep import plot_sweep, sweep_points  # noqa: E402


def _row(name, parent=None, stage=None, bits=None, score=None, ppl=None, n_cache=2000):
    return {"name": name, "parent": parent, "stage": stage, "bits": bits, "n_cache": n_cache, "paper_score": score,
            "strict_score": score, "test_ppl": ppl, "val_ppl": None}


ROWS = [
    _row("base"),  # the trained parent: not part of the sweep
    _row("prune0.3_base", "base", "prune", 32, 0.06, 108.0),
    _row("prune0.5_base", "base", "prune", 32, 0.05, 111.0, n_cache=0),  # scored without cache
    *[_row(f"quantize_prune{s}_base_step300_cache2000_bits{b}", f"prune{s}_base", "quantize", b,
           0.02 + b / 1000 - float(s) / 100, 100 + 20 * float(s) + 10 - b) for s in ("0.3", "0.5") for b in (10, 8, 9)],
    _row("quantize_prune0.5_base_step300_cache2000_bits7", "prune0.5_base", "quantize", 7, None, 120.0),  # unscored
]


def test_points_grouped_by_sparsity_and_sorted_by_bits():
    lines = sweep_points(ROWS)
    assert list(lines) == ["0.3", "0.5"]
    assert [p["bits"] for p in lines["0.3"]] == [32, 10, 9, 8]
    assert [p["bits"] for p in lines["0.5"]] == [32, 10, 9, 8]
    assert lines["0.3"][1]["ppl"] == pytest.approx(106.0)
    with pytest.raises(ValueError, match="convention"):
        sweep_points(ROWS, "other")


def test_plot_has_one_line_per_sparsity_and_drops_a_32bit_point_of_another_cache():
    fig = plot_sweep(ROWS)
    ax = fig.axes[0]
    by_gid = {line.get_gid(): line for line in ax.get_lines()}
    assert set(by_gid) == {"sweep-0.3", "sweep-0.5"}
    assert len(by_gid["sweep-0.3"].get_xdata()) == 4
    assert len(by_gid["sweep-0.5"].get_xdata()) == 3  # its 32-bit point was scored without the cache


def test_empty_sweep_says_so():
    fig = plot_sweep([_row("base")])
    assert any("no pruned" in t.get_text() for t in fig.axes[0].texts)
