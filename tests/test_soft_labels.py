"""Soft labels: alignment with the teacher's distribution, carried memory, exact resume, storage."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_MODEL, compose_cfg
from micronet import soft_labels, train
from micronet.model.transformer import ModelConfig, TransformerLM
from micronet.runs.results import GuardError, RunDir
from micronet.training.distill import SoftLabels
from micronet.training.soft_labels import SoftLabelError, generate_soft_labels

VOCAB = 40
META = {"teacher": "t", "step": 1, "data": {"name": "x", "vocab_size": VOCAB}}

# ---------------------------------------------------------------- helpers shared with test_distill


def write_tiny_corpus(folder: Path, seed: int = 0, n_words: int = 60, n_lines: int = 300) -> Path:
    """A Zipf-ish synthetic corpus (every word occurs in train) in WikiText file layout."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(n_words - 1)]  # + <eos>
    p = 1.0 / np.arange(1, len(words) + 1)
    p /= p.sum()

    def lines(n: int) -> str:
        return "".join(" ".join(rng.choice(words, size=rng.integers(3, 15), p=p)) + "\n" for _ in range(n))

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "wiki.train.tokens").write_text(" ".join(words) + "\n" + lines(n_lines))
    (folder / "wiki.valid.tokens").write_text(lines(20))
    (folder / "wiki.test.tokens").write_text(lines(20))
    return folder


TINY_DATA_MODEL = [m for m in TINY_MODEL if not m.startswith("model.cutoffs")] + ["model.cutoffs=[20,40]"]


def tiny_data(folder: Path, name: str = "tiny") -> list[str]:
    return [f"data.name={name}", f"data.raw_dir={folder}"]


def tiny_train(name: str, folder: Path, *extra: str, data_name: str = "tiny"):
    """Compose a tiny train config on the synthetic corpus."""
    return compose_cfg("train", [
        f"name={name}", *TINY_DATA_MODEL, *tiny_data(folder, data_name), "train.steps=4", "train.batch_size=2",
        "train.chunk_len=32", "train.eval_every=4", "train.save_every=4", "train.val_tokens=100",
        "train.eval_chunk_len=64", "optim.warmup_steps=1", "train.threads=1", *extra])


@pytest.fixture
def tiny_env(tmp_path, results_root, monkeypatch) -> Path:
    """Results and data caches under tmp; returns the raw folder of the synthetic corpus."""
    monkeypatch.setenv("MICRONET_DATA", str(tmp_path / "data"))
    return write_tiny_corpus(tmp_path / "raw")


# ---------------------------------------------------------------- generator unit tests


def tiny_lm(seed: int = 0, n_layer: int = 2, n_seq: int = 4) -> TransformerLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=VOCAB, d_model=16, n_layer=n_layer, n_head=2, d_head=8, d_ff=32, n_seq=n_seq,
                      segment_len=n_seq, cutoffs=[10, 25], bin_dims=[16, 8, 4], init_std=0.3)
    return TransformerLM(cfg).eval()


def tokens(n: int = 200, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=n).astype(np.int32)


def dense(directory: Path) -> np.ndarray:
    """Rebuild (N, V) probabilities from the stored top-k (zeros elsewhere)."""
    ids, probs = np.load(directory / "ids.npy"), np.load(directory / "probs.npy")
    out = np.zeros((len(ids), VOCAB), dtype=np.float64)
    np.put_along_axis(out, ids.astype(np.int64), probs.astype(np.float64), axis=1)
    return out


@torch.no_grad()
def reference_probs(model: TransformerLM, toks: np.ndarray) -> np.ndarray:
    """p(. | tokens < r) for r >= 1, each from a fresh window of n_layer * n_seq tokens: exact, no memory."""
    window = model.cfg.n_layer * model.cfg.n_seq  # the receptive field of the last layer
    out = np.zeros((len(toks), VOCAB))
    x = torch.from_numpy(toks.astype(np.int64))
    for r in range(1, len(toks)):
        lo = max(0, r - 1 - window)
        h, _ = model(x[lo:r][None])
        out[r] = model.log_probs(h[0, -1]).exp().double().numpy()
    return out


def test_rows_hold_the_teacher_distribution_of_their_token(tmp_path):
    model, toks = tiny_lm(), tokens()
    generate_soft_labels(model, toks, tmp_path / "full", VOCAB, META, chunk_len=50, block_tokens=100)
    got, want = dense(tmp_path / "full"), reference_probs(model, toks)
    assert np.all(got[0] == 0)  # row 0: no context, stored as zeros
    np.testing.assert_allclose(got[1:], want[1:], rtol=2e-3, atol=1e-6)  # fp16 storage
    assert want[1:].max() > 0.2  # a peaked teacher, so misalignment by one row would show

    generate_soft_labels(model, toks, tmp_path / "top5", 5, META, chunk_len=50)
    ids, probs = np.load(tmp_path / "top5/ids.npy"), np.load(tmp_path / "top5/probs.npy").astype(np.float64)
    assert ids.shape == (len(toks), 5) and np.all(np.diff(probs[1:], axis=1) <= 0)  # sorted, most probable first
    np.testing.assert_allclose(probs[1:], np.take_along_axis(want, ids.astype(np.int64), 1)[1:], rtol=2e-3,
                               atol=1e-7)  # fp16 subnormals below 6e-5
    fifth = np.sort(want, axis=1)[:, -5]
    np.testing.assert_allclose(probs[1:, -1], fifth[1:], rtol=2e-3, atol=1e-7)  # the k best, not any k


class Forgetful(torch.nn.Module):
    """The original's defect: memory dropped between chunks."""

    def __init__(self, model: TransformerLM):
        super().__init__()
        self.model = model

    def forward(self, x, memory=None):
        return self.model(x, None)

    def log_probs(self, h):
        return self.model.log_probs(h)


def test_memory_is_carried_between_chunks(tmp_path):
    model, toks = tiny_lm(), tokens()
    generate_soft_labels(model, toks, tmp_path / "c1000", VOCAB, META, chunk_len=1000)
    generate_soft_labels(model, toks, tmp_path / "c7", VOCAB, META, chunk_len=7)
    np.testing.assert_allclose(dense(tmp_path / "c7"), dense(tmp_path / "c1000"), rtol=2e-3, atol=1e-6)
    generate_soft_labels(Forgetful(model), toks, tmp_path / "forget", VOCAB, META, chunk_len=7)
    assert not np.allclose(dense(tmp_path / "forget"), dense(tmp_path / "c1000"), rtol=2e-3, atol=1e-6)


class Crashing(Forgetful):
    """A teacher that dies in its ``after``-th forward pass (mid-block, after rows were written)."""

    def __init__(self, model: TransformerLM, after: int):
        super().__init__(model)
        self.calls, self.after = 0, after

    def forward(self, x, memory=None):
        self.calls += 1
        if self.calls == self.after:
            raise RuntimeError("simulated crash")
        return self.model(x, memory)


def test_resume_after_a_crash_gives_identical_files(tmp_path):
    model, toks = tiny_lm(), tokens(300)
    args = dict(chunk_len=20, block_tokens=60)  # blocks of 3 chunks
    whole = generate_soft_labels(model, toks, tmp_path / "whole", 6, META, **args)
    assert whole["complete"] and whole["rows_done"] == 300 and not (tmp_path / "whole/state.pt").exists()

    out = tmp_path / "parts"
    with pytest.raises(RuntimeError, match="simulated crash"):  # dies in chunk 5: block 2 half written
        generate_soft_labels(Crashing(model, 5), toks, out, 6, META, **args)
    m = json.loads((out / "manifest.json").read_text())
    assert m["rows_done"] == 61 and not m["complete"]
    part = generate_soft_labels(model, toks, out, 6, META, stop_after_blocks=1, **args)  # a clean stop
    assert part["rows_done"] == 121 and not part["complete"]
    with pytest.raises(SystemExit):  # SIGTERM: saved at the next chunk boundary, then exit 143
        generate_soft_labels(model, toks, out, 6, META, on_block=lambda rows: os.kill(os.getpid(), signal.SIGTERM),
                             **args)
    assert json.loads((out / "manifest.json").read_text())["rows_done"] == 181
    with pytest.raises(SoftLabelError, match="incomplete"):
        SoftLabels(out)
    generate_soft_labels(model, toks, out, 6, META, **args)
    for f in ("ids.npy", "probs.npy"):
        assert (out / f).read_bytes() == (tmp_path / "whole" / f).read_bytes(), f
    with pytest.raises(SoftLabelError, match="chunk_len=20, not 30"):
        generate_soft_labels(model, toks, out, 6, META, chunk_len=30)


def test_storage_is_int32_ids_and_float16_probs(tmp_path):
    model, toks = tiny_lm(), tokens()
    m = generate_soft_labels(model, toks, tmp_path / "s", 30, META, chunk_len=64)
    ids, probs = np.load(tmp_path / "s/ids.npy", mmap_mode="r"), np.load(tmp_path / "s/probs.npy", mmap_mode="r")
    assert ids.dtype == np.int32 and probs.dtype == np.float16
    assert ids.itemsize + probs.itemsize == m["bytes_per_entry"] == 6
    payload = sum((tmp_path / "s" / f).stat().st_size for f in ("ids.npy", "probs.npy"))
    assert payload <= 6 * len(toks) * 30 + 2 * 128  # plus the two .npy headers
    labels = SoftLabels(tmp_path / "s")
    got_ids, got_probs = labels.rows(np.array([0, 17]), 5)
    assert got_ids.shape == got_probs.shape == (2, 5, 30)
    assert np.array_equal(got_ids[1], ids[18:23]) and np.array_equal(got_probs[0], probs[1:6])
    with pytest.raises(SoftLabelError, match="outside"):
        labels.rows(np.array([len(toks) - 3]), 5)


# ---------------------------------------------------------------- the stage


def test_stage_writes_a_complete_manifest_and_is_guarded(tiny_env):
    train.run(tiny_train("teach", tiny_env))
    cfg = compose_cfg("soft_labels", ["name=teach", "topk=8", "chunk_len=100", "block_tokens=1000", "threads=1"])
    with RunDir("teach").guard("train"), pytest.raises(GuardError):
        soft_labels.run(cfg)
    m = soft_labels.run(cfg)
    d = RunDir("teach").path / "soft_labels" / "top8_step4"
    assert json.loads((d / "manifest.json").read_text()) == m
    assert m["complete"] and m["teacher"] == "teach" and m["step"] == 4 and m["topk"] == 8
    assert m["tokens"] == m["rows_done"] == m["data"]["train_tokens"] == len(np.load(d / "ids.npy"))
    assert len(m["data"]["train_sha256"]) == 64 and m["data"]["vocab_size"] == 60
    assert soft_labels.run(cfg)["complete"]  # idempotent
