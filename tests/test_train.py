"""Train and evaluate stages: resume bit-for-bit, the guard, checkpoints, bad input."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
from pathlib import Path

import pytest
import torch

from conftest import TINY_MODEL, TINY_TRAIN, compose_cfg, run_cli
from micronet import evaluate, train
from micronet.data.corpus import DataConfig, load_corpus
from micronet.data.fetch import sha256_file
from micronet.runs.config import ConfigError
from micronet.runs.results import CheckpointError, GuardError, RunDir, load_checkpoint_file


def tiny_cfg(name: str, *extra: str):
    return compose_cfg("train", [f"name={name}", *TINY_MODEL, *TINY_TRAIN, "model.dropout=0.1", *extra])


def test_train_writes_the_results_contract(results_root):
    last = train.run(tiny_cfg("t"))
    rd = RunDir("t")
    assert rd.steps() == [2, 4, 6]
    assert (rd.path / "config.yaml").read_text().count("commit") == 1
    rows = rd.train_csv.read_text().splitlines()
    assert rows[0].startswith("step,tokens,train_loss,val_loss,val_ppl") and len(rows) == 3
    ckpt = rd.load()
    assert ckpt["step"] == 6 and ckpt["tokens"] == 6 * 2 * 32
    assert {"model", "optimizer", "rng", "model_config", "data_config"} <= set(ckpt)
    assert last["step"] == 6 and last["val_ppl"] > 1
    data = ckpt["data_manifest"]  # the exact data the run saw: sha256 of every split's source file
    corpus = load_corpus(DataConfig(**ckpt["data_config"]), progress=False)
    source = Path(corpus.manifest["source_dir"])
    assert data["vocab_size"] == ckpt["model_config"]["vocab_size"] == corpus.vocab_size
    assert data["sha256"] == {s: sha256_file(source / f["file"]) for s, f in corpus.manifest["files"].items()}
    assert set(data["sha256"]) == {"train", "valid", "test"}


def test_resume_continues_bit_for_bit(results_root):
    train.run(tiny_cfg("whole"))
    train.run(tiny_cfg("parts", "train.stop_after=3"))  # stops at 3 (no save on 3: forced save)
    assert RunDir("parts").latest_step() == 3
    train.run(tiny_cfg("parts", "train.stop_after=2"))
    train.run(tiny_cfg("parts"))
    a, b = RunDir("whole").load(6), RunDir("parts").load(6)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert RunDir("whole").train_csv.read_text() .splitlines()[1].split(",")[:5] == \
        RunDir("parts").train_csv.read_text().splitlines()[1].split(",")[:5]


def test_damaged_newest_checkpoint_is_skipped(results_root):
    train.run(tiny_cfg("d"))
    rd = RunDir("d")
    path = rd.checkpoint_path(6)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint_file(path)
    assert rd.load()["step"] == 4


def test_checkpoint_of_another_model_is_refused(results_root):
    train.run(tiny_cfg("m", "train.stop_after=2"))
    before = sorted(p.name for p in RunDir("m").path.rglob("*"))
    with pytest.raises(CheckpointError, match="different model config"):
        train.run(tiny_cfg("m", "model.d_ff=48"))
    assert sorted(p.name for p in RunDir("m").path.rglob("*")) == before


def test_resume_may_change_the_segment_length(results_root):
    """segment_len only changes speed (segmented attention is exact): without dropout a run resumed
    with another segment length, and one trained with it throughout, end where the default run ends
    (to float summation order), so it does not block a resume. With dropout the attention-dropout
    mask is a hash of the index into the (segments, heads, L, window) tensor, so another segment
    length draws other (equally likely) masks: the run resumes, but is not the same run."""
    nodrop = ("model.dropout=0", "train.amp=none")  # exact fp32: bf16 rounding would differ by summation order
    train.run(tiny_cfg("whole", *nodrop))  # segment_len 8
    train.run(tiny_cfg("s", "train.stop_after=2", *nodrop))
    train.run(tiny_cfg("s", "model.segment_len=4", *nodrop))
    train.run(tiny_cfg("three", "model.segment_len=3", *nodrop))
    ref = RunDir("whole").load(6)

    def val_ppl(name: str) -> list[float]:
        return [float(r.split(",")[4]) for r in RunDir(name).train_csv.read_text().splitlines()[1:]]

    for name in ("s", "three"):
        got = RunDir(name).load(6)
        assert got["step"] == 6
        for k, v in ref["model"].items():
            assert torch.allclose(got["model"][k], v, rtol=1e-5, atol=1e-6), (name, k)
        assert val_ppl(name) == pytest.approx(val_ppl("whole"), rel=1e-6)
    train.run(tiny_cfg("drop", "train.stop_after=2"))  # dropout 0.1: a resume is still allowed
    train.run(tiny_cfg("drop", "model.segment_len=4"))
    assert RunDir("drop").latest_step() == 6


def _hold_guard(root: str, q) -> None:
    os.environ["MICRONET_RESULTS"] = root
    with RunDir("g").guard("train"):
        q.put("held")
        signal.pause()


def test_guard_refuses_a_second_process_and_clears_a_dead_ones(results_root, caplog):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_hold_guard, args=(str(results_root), q))
    p.start()
    assert q.get(timeout=30) == "held"
    with pytest.raises(GuardError, match=f"in use by pid {p.pid}"):
        train.run(tiny_cfg("g"))
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    with RunDir("g").guard("evaluate"):
        pass
    assert "cleared a guard left by a dead process" in caplog.text


@pytest.mark.parametrize("override,match", [
    ("train.steps=0", "train.steps must be a positive"),
    ("model.d_model=-4", "model.d_model must be a positive"),
    ("train.batch_size=abc", "train.batch_size"),
    ("train.amp=fp8", "train.amp"),
])
def test_bad_values_are_refused_before_anything_is_written(results_root, override, match):
    with pytest.raises(ConfigError, match=match):
        train.run(tiny_cfg("bad", override))
    assert not RunDir("bad").path.joinpath("models").exists()


def test_evaluate_writes_perplexity_per_split(results_root):
    train.run(tiny_cfg("e"))
    out = evaluate.run(compose_cfg("evaluate", ["name=e", "splits=[valid]", "chunk_len=100"]))
    saved = json.loads(RunDir("e").eval_path(6).read_text())
    assert saved["valid"]["tokens"] == 217_645 and saved["valid"]["ppl"] == pytest.approx(out["valid"]["ppl"])


def test_cli_errors_are_one_clear_line(results_root):
    r = run_cli("micronet.train", "train.no_such_key=1")
    assert r.returncode != 0 and "no_such_key" in r.stderr
    r = run_cli("micronet.evaluate", "name=does_not_exist")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"micronet.evaluate: error: no results directory {results_root / 'does_not_exist'} (is name=does_not_exist right?)"]


def test_cpu_bf16_autocast_trains_and_fp16_needs_cuda(results_root):
    last = train.run(tiny_cfg("amp", "train.amp=bf16"))
    assert last["val_ppl"] == last["val_ppl"] and last["val_ppl"] < 1e6  # finite
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="fp16 needs CUDA"):
            train.run(tiny_cfg("amp16", "train.amp=fp16"))
