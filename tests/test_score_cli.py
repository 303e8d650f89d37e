"""The score stage on a trained run: JSON contract, both conventions, measured sparsity, bad input."""

from __future__ import annotations

import json

import pytest

from conftest import TINY_MODEL, TINY_TRAIN, compose_cfg, run_cli
from micronet import evaluate, score, train
from micronet.runs.config import ConfigError
from micronet.runs.results import CheckpointError, RunDir


@pytest.fixture
def trained(results_root):
    train.run(compose_cfg("train", ["name=s", *TINY_MODEL, *TINY_TRAIN]))
    return RunDir("s")


def test_score_writes_both_conventions_and_test_ppl(trained):
    evaluate.run(compose_cfg("evaluate", ["name=s", "splits=[test]", "chunk_len=512"]))
    out = score.run(compose_cfg("score", ["name=s"]))
    saved = json.loads(trained.score_path(6).read_text())
    assert saved == json.loads(json.dumps(out))
    for k in ("params", "ops", "muls", "adds", "others", "score", "convention", "test_ppl"):
        assert k in saved
    assert saved["convention"] == "paper" and set(saved["conventions"]) == {"paper", "strict"}
    assert saved["score"] == pytest.approx(saved["params"] / 159e6 + saved["ops"] / 318e6)
    ev = json.loads(trained.eval_path(6).read_text())
    assert saved["test_ppl"] == pytest.approx(ev["test"]["ppl"])


def test_zeroed_weights_lower_the_counted_ops(trained):
    dense = score.run(compose_cfg("score", ["name=s"]))
    ckpt = trained.load(6)
    w = ckpt["model"]["layers.0.ffn.0.weight"]
    w[: w.shape[0] // 2] = 0  # half of fc1's rows pruned
    trained.save(6, {k: v for k, v in ckpt.items() if k not in ("step", "format")})
    sparse = score.run(compose_cfg("score", ["name=s"]))
    assert sparse["muls"] == pytest.approx(dense["muls"] - w.numel() // 2 * 32 / 32)


@pytest.mark.parametrize("override,err,match", [
    ("convention=exact", ConfigError, "convention must be one of"),
    ("bits=0", ConfigError, "bits must be an integer in 1..32"),
    ("bits=33", ConfigError, "bits must be an integer in 1..32"),
    ("step=999", CheckpointError, "no checkpoint for step 999"),
])
def test_bad_requests_are_refused(trained, override, err, match):
    with pytest.raises(err, match=match):
        score.run(compose_cfg("score", ["name=s", override]))


def test_run_without_checkpoint_is_one_clear_line(results_root):
    (results_root / "empty").mkdir(parents=True)
    r = run_cli("micronet.score", "name=empty")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"micronet.score: error: empty has no usable checkpoint in {results_root / 'empty' / 'models'}"]
