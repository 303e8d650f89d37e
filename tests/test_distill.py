"""Distillation: the loss against a direct computation, the schedule, row alignment, refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import compose_cfg
from micronet import soft_labels, train
from micronet.data.batches import sample_batch
from micronet.model import linear_softmax
from micronet.runs.results import RunDir
from micronet.training.distill import (DistillConfig, Distiller, SoftLabels, distill_loss, gather_log_probs,
                                       hard_weight, soft_cross_entropy)
from micronet.training.soft_labels import SoftLabelError
from test_soft_labels import (VOCAB, tiny_env, tiny_lm, tiny_train,  # noqa: F401 (fixtures)
                              write_tiny_corpus)


def test_hard_weight_rises_linearly_from_hard_min_to_hard_max():
    assert hard_weight(0, 100, 0.5, 0.95) == 0.5
    assert hard_weight(100, 100, 0.5, 0.95) == pytest.approx(0.95)
    assert hard_weight(50, 100, 0.5, 0.95) == pytest.approx(0.725)
    assert hard_weight(250, 100, 0.5, 0.95) == pytest.approx(0.95)  # clamped past the end
    d = DistillConfig()
    assert (d.hard_min, d.hard_max, d.topk, d.teacher) == (0.5, 0.95, 30, None)


def test_gather_matches_full_log_probs_with_gradients(monkeypatch):
    monkeypatch.setattr(linear_softmax, "BLOCK_ELEMS", 40)  # blocks of 1-3 rows: every path blocked
    model = tiny_lm()
    model.train()
    h = torch.randn(3, 7, 16, requires_grad=True)
    ids = torch.randint(0, VOCAB, (3, 7, 6))
    ids[0, 0] = torch.tensor([0, 9, 10, 24, 25, 39])  # bin edges of cutoffs [10, 25]
    ids[1] = torch.randint(0, 10, (7, 6))  # rows with head ids only: no tail computed
    ids[2, 0] = torch.tensor([3, 3, 12, 12, 30, 30])  # repeated ids: their gradients add
    w = torch.randn(3, 7, 6)

    got = gather_log_probs(model.softmax, h, ids)
    (got * w).sum().backward()
    g_got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    gh_got = h.grad.clone()
    model.zero_grad()
    h.grad = None
    want = model.log_probs(h).gather(-1, ids)
    (want * w).sum().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gh_got, h.grad)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(g_got[n], p.grad, msg=n)


def test_distill_loss_equals_a_direct_computation():
    torch.manual_seed(0)
    model = tiny_lm()
    h = torch.randn(2, 3, 16)
    y = torch.randint(0, VOCAB, (2, 3))
    ids = torch.tensor([[[0, 12, 30]] * 3, [[5, 6, 39]] * 3])  # head and tail ids alike
    probs = torch.tensor([[[0.5, 0.2, 0.1]] * 3, [[0.3, 0.3, 0.2]] * 3]).half()
    probs[1, 2] = 0  # a row without a teacher distribution (row 0 of a file): skipped
    hard = 0.7
    full = model.log_probs(h).double()  # (2, 3, V)
    nll, soft, n_soft = 0.0, 0.0, 0
    for b in range(2):
        for t in range(3):
            nll -= full[b, t, y[b, t]].item() / 6
            p = probs[b, t].double()
            if p.sum() == 0:
                continue
            n_soft += 1
            soft -= sum(p[j].item() / p.sum().item() * full[b, t, ids[b, t, j]].item() for j in range(3))
    want = hard * nll + (1 - hard) * soft / n_soft
    lp = model.target_log_probs(h, y)
    got = distill_loss(lp, gather_log_probs(model.softmax, h, ids), probs, hard)
    assert got.item() == pytest.approx(want, rel=1e-5)
    ce, valid = soft_cross_entropy(torch.zeros(1, 3), torch.zeros(1, 3))
    assert ce.item() == 0 and not valid.item()


def test_distiller_reads_the_rows_of_the_batch_targets(tmp_path):
    """Row r of the file belongs to train token r; y[b, t] is token starts[b] + 1 + t."""
    from micronet.training.soft_labels import generate_soft_labels

    toks = np.random.default_rng(0).integers(0, VOCAB, size=120).astype(np.int32)
    model = tiny_lm()
    meta = {"teacher": "t", "step": 1, "data": {"vocab_size": VOCAB}}
    generate_soft_labels(model, toks, tmp_path / "sl", 5, meta, chunk_len=1000)
    rng = np.random.default_rng(3)
    x, y, starts = sample_batch(toks, 3, 16, rng)
    labels = SoftLabels(tmp_path / "sl")
    ids, probs = labels.rows(starts, 16)
    with torch.no_grad():
        h, _ = model(torch.from_numpy(toks[None].astype(np.int64)))
        ref = model.log_probs(h[0]).exp()  # ref[i] predicts token i + 1
    for b, s in enumerate(starts):
        for t in range(16):
            assert ids[b, t, 0] == ref[s + t].argmax()  # the distribution of target y[b, t] = token s + 1 + t
            assert probs[b, t, 0] == pytest.approx(ref[s + t].max().item(), rel=2e-3)
    dist = Distiller(DistillConfig(teacher="t", topk=5), labels)
    h_student = torch.randn(3, 16, 16, requires_grad=True)
    lp = model.target_log_probs(h_student, y)
    loss = dist.loss(model, h_student, y, starts, step=0, steps=10, target_lp=lp)
    direct = distill_loss(lp, model.log_probs(h_student).gather(-1, torch.from_numpy(ids).long()),
                          torch.from_numpy(probs), 0.5)
    assert loss.item() == pytest.approx(direct.item(), rel=1e-6)
    # without the trainer's log p(target), the hard term comes from the same softmax pass: the same loss
    # and the same gradients
    g_given = torch.autograd.grad(loss, h_student)[0]
    one_pass = dist.loss(model, h_student, y, starts, step=0, steps=10)
    assert one_pass.item() == pytest.approx(direct.item(), rel=1e-6)
    torch.testing.assert_close(torch.autograd.grad(one_pass, h_student)[0], g_given)


def test_distillation_run_and_refusals(tiny_env, tmp_path):
    train.run(tiny_train("teach", tiny_env))
    sl = ["name=teach", "topk=4", "chunk_len=64", "block_tokens=64", "threads=1"]
    soft_labels.run(compose_cfg("soft_labels", [*sl, "stop_after_blocks=1"]))
    with pytest.raises(SoftLabelError, match=r"incomplete \(65 of"):
        train.run(tiny_train("student", tiny_env, "distill.teacher=teach", "distill.topk=4", "distill.step=4"))
    with pytest.raises(SoftLabelError, match=r"no complete top-4 soft labels \(found: top4_step4 \(65 rows done"):
        train.run(tiny_train("student", tiny_env, "distill.teacher=teach", "distill.topk=4"))
    with pytest.raises(SoftLabelError, match="no complete top-30"):
        train.run(tiny_train("student", tiny_env, "distill.teacher=teach"))
    soft_labels.run(compose_cfg("soft_labels", sl))

    last = train.run(tiny_train("student", tiny_env, "distill.teacher=teach", "distill.topk=4"))
    assert last["step"] == 4 and math.isfinite(last["val_ppl"])
    assert "teacher: teach" in RunDir("student").config_path.read_text()
    train.run(tiny_train("parts", tiny_env, "distill.teacher=teach", "distill.topk=4", "train.stop_after=3"))
    train.run(tiny_train("parts", tiny_env, "distill.teacher=teach", "distill.topk=4"))  # resumes bit for bit
    whole, parts = RunDir("student").load(4)["model"], RunDir("parts").load(4)["model"]
    assert all(torch.equal(v, parts[k]) for k, v in whole.items())
    train.run(tiny_train("plain", tiny_env))  # same seed and batches, no teacher
    a, b = RunDir("student").load(4)["model"], RunDir("plain").load(4)["model"]
    assert not torch.equal(a["layers.0.ffn.0.weight"], b["layers.0.ffn.0.weight"])

    other = write_tiny_corpus(tmp_path / "raw_other", seed=5)  # same vocabulary size, other text
    with pytest.raises(SoftLabelError, match="made from other data") as e:
        train.run(tiny_train("s2", other, "distill.teacher=teach", "distill.topk=4", data_name="other"))
    assert "train_sha256" in str(e.value) and "vocab_size" not in str(e.value)  # same-size vocab is not enough
    small = write_tiny_corpus(tmp_path / "raw_small", n_lines=200)
    with pytest.raises(SoftLabelError, match="train_tokens"):
        train.run(tiny_train("s3", small, "distill.teacher=teach", "distill.topk=4", data_name="small"))
    with pytest.raises(SoftLabelError, match="no results directory"):
        train.run(tiny_train("s4", tiny_env, "distill.teacher=nobody"))
