"""bench/summary.py reads every bench's JSON as the benches write it (the copies in docs/bench/)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import load_bench

ROOT = Path(__file__).resolve().parent.parent


def test_every_bench_json_gives_rows_and_the_table_has_the_matmul_rate():
    summary = load_bench("summary")
    assert set(summary.ROWS) == set(summary.BENCHES)
    entries = []
    for name in summary.BENCHES:
        data = json.loads((ROOT / "docs" / "bench" / f"{name}.json").read_text())
        rows = summary.ROWS[name](data)
        assert rows and all(fig and value for fig, value, _ in rows), name
        entries.append({"bench": name, "matmul_gflops": {"before": {"fp32": 170.4, "bf16": 390.2},
                                                         "after": {"fp32": 181.6, "bf16": 401.7}}, "rows": rows})
    entries.append({"bench": "memory", "matmul_gflops": {"before": {"fp32": 1.0, "bf16": 3.0},
                                                         "after": {"fp32": 2.0, "bf16": 4.0}}, "error": "no such run"})
    table = summary.markdown(entries).splitlines()
    assert len(table) == 2 + sum(len(e.get("rows", [])) or 1 for e in entries)
    assert all(line.endswith("| 170 / 182, 390 / 402 |") for line in table[2:-1])
    assert table[-1] == "| memory | failed: no such run | | 1 / 2, 3 / 4 |"
    targets = {fig: target for e in entries for fig, _, target in e.get("rows", [])}
    assert targets["train MFU, 8.3M, fp32 (vs the fp32 matmul rate)"] == ">= 55%"
    assert targets["train MFU, wt2_default, fp32 (vs the fp32 matmul rate)"] == ">= 45%"
    side = [(fig, target) for fig, target in targets.items() if "ours bf16 / ours fp32" in fig]
    assert {t for _, t in side} == {">= 1.67x", ">= 1.38x", ">= 1.85x", "<= 0.65x", ">= 1.5x"}, side
