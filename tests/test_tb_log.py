"""train.tensorboard=true: event files under results/<name>/tb/ with the logged scalars (read back with
tensorboard's own event reader), resumed runs appending to the same curves; off by default."""

from __future__ import annotations

import csv

import pytest

from conftest import TINY_MODEL, TINY_TRAIN, compose_cfg
from micronet import train
from micronet.runs.results import RunDir

pytest.importorskip("tensorboard", reason="TensorBoard is optional: pip install -e '.[tb]'")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

TRAIN_TAGS = {"train/loss", "train/lr", "train/tokens_per_s", "train/grad_norm", "cache/lambda", "cache/theta"}
VAL_TAGS = {"val/loss", "val/ppl", "train/mean_loss", "train/ppl"}


def cfg(name: str, *extra: str):
    return compose_cfg("train", [f"name={name}", *TINY_MODEL, *TINY_TRAIN, "cache=train2000", "cache.n_cache=16",
                                 "train.tensorboard=true", *extra])


def curves(rd: RunDir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(rd.tb_dir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_a_short_run_writes_every_scalar_and_resumed_runs_append(results_root):
    train.run(cfg("whole"))
    whole = curves(RunDir("whole"))
    assert TRAIN_TAGS | VAL_TAGS <= set(whole)
    assert [s for s, _ in whole["train/loss"]] == [1, 2, 3, 4, 5, 6]
    rows = list(csv.DictReader(RunDir("whole").train_csv.open()))
    assert [(s, pytest.approx(v)) for s, v in whole["val/loss"]] == [(int(r["step"]), float(r["val_loss"])) for r in rows]
    assert all(v > 0 for _, v in whole["train/grad_norm"]) and 0 < whole["cache/lambda"][0][1] < 1

    train.run(cfg("parts", "train.stop_after=3"))  # stops with a checkpoint at step 3
    rd = RunDir("parts")
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(rd.tb_dir)) as w:  # points an interrupted invocation wrote after its checkpoint
        for step in (4, 5):
            w.add_scalar("train/loss", 99.0, step)
    train.run(cfg("parts"))  # resumes at 3: its writer purges steps >= 4 and appends
    parts = curves(rd)
    assert len(list(rd.tb_dir.glob("events.out.tfevents.*"))) == 3  # one file per invocation, one folder
    for tag in ("train/loss", "val/loss", "cache/theta", "train/lr"):  # the same curves as one whole run
        assert [s for s, _ in parts[tag]] == [s for s, _ in whole[tag]], tag
        assert [v for _, v in parts[tag]] == pytest.approx([v for _, v in whole[tag]]), tag


def test_tensorboard_is_off_by_default(results_root):
    train.run(compose_cfg("train", ["name=t", *TINY_MODEL, *TINY_TRAIN, "train.steps=2"]))
    assert not RunDir("t").tb_dir.exists()
