"""``step=best``: the checkpoint with the lowest validation ppl of the run's own train_results.csv."""

from __future__ import annotations

import csv
import io

import pytest

from conftest import TINY_MODEL, TINY_TRAIN, compose_cfg
from micronet import evaluate, release, train
from micronet.runs.results import CSV_FIELDS, CheckpointError, RunDir, append_csv_row
from micronet.training.distill import find_soft_labels


def fake_run(name: str, ppl_by_step: dict[int, float], kept: list[int]) -> RunDir:
    rd = RunDir(name)
    rd.models_dir.mkdir(parents=True)
    for s in kept:
        rd.checkpoint_path(s).write_bytes(b"x")
    for s, ppl in ppl_by_step.items():
        append_csv_row(rd, {**dict.fromkeys(CSV_FIELDS, 0), "step": s, "val_ppl": ppl})
    return rd


def test_best_is_the_lowest_validation_among_kept_checkpoints(results_root):
    rd = fake_run("r", {1: 90.0, 2: 70.0, 3: 80.0, 4: 60.0}, kept=[1, 2, 3])  # step 4's checkpoint is gone
    assert rd.best_step() == 2
    assert rd.resolve_step("best") == 2 and rd.resolve_step(3) == 3 and rd.resolve_step("3") == 3
    assert rd.resolve_step(None) is None and rd.resolve_step("latest") is None


def test_best_without_validations_or_with_a_bad_name_is_one_clear_error(results_root):
    rd = fake_run("r", {}, kept=[5])
    with pytest.raises(CheckpointError, match="step=best: r has no validation row for a kept checkpoint"):
        rd.best_step()
    with pytest.raises(CheckpointError, match="step must be a step number, best or latest, got 'newest'"):
        rd.resolve_step("newest")


def test_stages_take_step_best(results_root, tmp_path):
    """evaluate and release load the best checkpoint; a distilled student finds the best step's labels."""
    train.run(compose_cfg("train", ["name=t", *TINY_MODEL, *TINY_TRAIN, "train.eval_every=2"]))
    rd = RunDir("t")
    assert rd.steps() == [2, 4, 6]
    # Make step 4 the best validation (training alone may improve every time, then best == latest).
    rows = list(csv.DictReader(io.StringIO(rd.train_csv.read_text())))
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    for r in rows:
        r["val_ppl"] = {"2": "300", "4": "100", "6": "200"}[r["step"]]
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    rd.train_csv.write_text(out.getvalue())

    got = evaluate.run(compose_cfg("evaluate", ["name=t", "step=best", "splits=[valid]", "chunk_len=64"]))
    assert got["step"] == 4 and rd.eval_path(4).exists() and not rd.eval_path(6).exists()
    folder = release.run(compose_cfg("release", ["name=t", "step=best", f"out={tmp_path / 'rel'}"]))
    assert '"step": 4' in (folder / "config.json").read_text()
    (rd.path / "soft_labels" / "top30_step4").mkdir(parents=True)
    assert find_soft_labels("t", 30, "best").name == "top30_step4"
