"""AGP pruning: schedule, masks through Adam, the prune stage (targets, resume, lineage), sensitivity."""

from __future__ import annotations

import shutil

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY_MODEL, TINY_TRAIN, compose_cfg
from micronet import prune, sensitivity, train
from micronet.compress.prune import (AGPPruner, PruneConfig, agp_sparsity, locate, mask_of, n_pruned, original,
                                     prunable_names)
from micronet.compress.schedules import PRUNE_TARGETS_0477, prune_targets
from micronet.model.transformer import ModelConfig, TransformerLM
from micronet.runs.cli import normalize_argv
from micronet.runs.config import ConfigError, MicronetError
from micronet.runs.results import RunDir

# Fine-tuning small enough for a test: masks at steps 0, 2, 4 (rounds 0..2), then fixed to step 6.
PRUNE_TINY = ["prune.every=2", "prune.rounds=2", "train.steps=6", "train.batch_size=2", "train.chunk_len=32",
              "train.eval_every=3", "train.save_every=3", "train.val_tokens=200", "train.eval_chunk_len=64",
              "train.threads=1", "eval_splits=[]"]



@pytest.fixture
def parent(results_root):
    train.run(compose_cfg("train", ["name=t", *TINY_MODEL, *TINY_TRAIN]))
    return RunDir("t")


def tiny_model() -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(ModelConfig(vocab_size=60, d_model=16, n_layer=2, n_head=2, d_head=8, d_ff=32, n_seq=8,
                                     segment_len=8, cutoffs=[20, 40], bin_dims=[16, 8, 4]))


def test_agp_schedule_endpoints_and_cubic_shape():
    assert agp_sparsity(0.1, 0.6, 0, 10) == pytest.approx(0.1)
    assert agp_sparsity(0.1, 0.6, 10, 10) == pytest.approx(0.6)
    assert agp_sparsity(0.1, 0.6, 25, 10) == pytest.approx(0.6)  # fixed after the last round
    assert agp_sparsity(0.1, 0.6, 5, 10) == pytest.approx(0.6 - 0.5 / 8)  # (1 - 1/2)^3
    steps = [agp_sparsity(0.0, 0.8, e + 1, 10) - agp_sparsity(0.0, 0.8, e, 10) for e in range(10)]
    assert all(a > b > 0 for a, b in zip(steps, steps[1:]))  # big moves first, then ever smaller


def test_prunable_tensors_are_the_section_9_table_for_the_8_3M():
    assert set(prunable_names(ModelConfig(vocab_size=267735))) == set(PRUNE_TARGETS_0477)


def test_masks_hold_through_adam_with_momentum():
    model = tiny_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randint(0, 60, (2, 16))

    def step():
        h, _ = model(x)
        loss = -model.target_log_probs(h, x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):  # dense steps: Adam's moments are nonzero everywhere
        step()
    targets = {n: (0.5, 0.5) for n in prunable_names(model.cfg)}
    pruner = AGPPruner(model, targets, every=1000, rounds=1, optimizer=opt)
    pruner.start(0)
    masks = {n: mask_of(model, n).mask.clone() for n in targets}

    class T:  # what the hook sees of the Trainer
        step = 1

    for _ in range(30):
        step()
        pruner(T)
    for name, keep in masks.items():
        orig = original(model, name)
        module, attr = locate(model, name)
        assert torch.equal(orig[~keep], torch.zeros_like(orig[~keep])), name
        assert torch.equal(getattr(module, attr) != 0, keep), name
        assert int((~keep).sum()) == n_pruned(keep.numel(), 0.5)
        assert not opt.state[orig]["exp_avg"][~keep].any()
    assert torch.equal(model.softmax.table(1) != 0, masks["embed.tables.1.weight"])  # the tied output too
    assert "layers.0.attn.qkv.weight" in model.state_dict()  # plain keys: a normal checkpoint


def test_prune_stage_hits_every_target_records_lineage_and_scores(parent):
    out = prune.run(compose_cfg("prune", ["name=t", "prune='0.358'", *PRUNE_TINY]))
    rd = RunDir("prune0.358_t")
    ckpt = rd.load()
    assert ckpt["step"] == 6 and ckpt["lineage"] == {"stage": "prune", "parent": "t", "parent_step": 6,
                                                      "parent_lineage": None}
    assert OmegaConf.load(rd.config_path).lineage.parent == "t"
    targets = prune_targets("0.358")
    for name in prunable_names(ModelConfig(**ckpt["model_config"])):
        w = ckpt["model"][name]
        assert abs(int((w == 0).sum()) - n_pruned(w.numel(), targets[name][1])) <= 1, name
    assert rd.score_path(6).exists() and out["step"] == 6 and out["score"] > 0


def test_prune_resumes_bit_for_bit(parent):
    shutil.copytree(parent.path, parent.path.with_name("u"))  # the same weights under another name
    prune.run(compose_cfg("prune", ["name=t", "prune=uniform", "prune.target=0.6", *PRUNE_TINY]))
    prune.run(compose_cfg("prune", ["name=u", "prune=uniform", "prune.target=0.6", *PRUNE_TINY, "train.stop_after=3"]))
    assert RunDir("pruneuniform0.6_u").latest_step() == 3
    prune.run(compose_cfg("prune", ["name=u", "prune=uniform", "prune.target=0.6", *PRUNE_TINY]))
    a, b = RunDir("pruneuniform0.6_t").load(6)["model"], RunDir("pruneuniform0.6_u").load(6)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sensitivity_schedule_hits_the_total_and_feeds_prune(parent):
    out = sensitivity.run(compose_cfg("sensitivity", ["name=t", "target=0.4", "val_tokens=150",
                                                      "sparsities=[0.5,1.0]", "chunk_len=150"]))
    assert parent.sensitivity_path(0.4).exists() and parent.sensitivity_path(0.4, "png").stat().st_size > 1000
    assert out["achieved"] == pytest.approx(0.4, abs=1e-3)
    cfg = ModelConfig(**parent.load()["model_config"])
    targets = prune.schedule_targets(PruneConfig(name="sens0.4", kind="sensitivity", target=0.4), cfg, parent)
    assert set(targets) == set(prunable_names(cfg))
    assert all(0 <= a <= b <= 1 for a, b in targets.values())


@pytest.mark.parametrize("overrides,match", [
    (["prune=uniform", "prune.target=1.0"], r"must be in \[0, 1\)"),
    (["prune=uniform", "prune.target=-0.1"], r"must be in \[0, 1\)"),
    (["prune.every=50"], "final sparsity would never be reached"),
])
def test_bad_prune_settings_are_refused(parent, overrides, match):
    with pytest.raises(ConfigError, match=match):
        prune.run(compose_cfg("prune", ["name=t", *PRUNE_TINY, *overrides]))


def test_bad_sensitivity_target_and_missing_run_are_refused(results_root):
    with pytest.raises(ConfigError, match=r"must be in \[0, 1\)"):
        sensitivity.run(compose_cfg("sensitivity", ["name=t", "target=1.5"]))
    with pytest.raises(MicronetError, match="no results directory"):
        prune.run(compose_cfg("prune", ["name=nope", *PRUNE_TINY]))


def test_numeric_schedule_names_are_quoted_for_hydra():
    assert normalize_argv(["prune=0.239,0.358", "prune.target=0.5", "name=x"]) == \
        ["prune='0.239','0.358'", "prune.target=0.5", "name=x"]
    assert normalize_argv(["prune=uniform,0.477"]) == ["prune='uniform','0.477'"]
    assert compose_cfg("prune", ["name=x", *normalize_argv(["prune=0.477"])]).prune.name == "0.477"
