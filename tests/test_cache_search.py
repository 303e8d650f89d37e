"""Cache local search: converges on a known optimum, its objective equals a real cached
evaluation, and the stage's yaml is what evaluation then uses (else learned, else default)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY_MODEL, TINY_TRAIN, compose_cfg, run_cli
from micronet import evaluate, train
from micronet.compress.checkpoint import load_model
from micronet.model.cache import EvalCache, eval_cache_for, write_cache_params
from micronet.model.cache_search import CacheObjective, coordinate_search, hidden_states
from micronet.model.evaluation import evaluate_stream
from micronet.model.transformer import ModelConfig, TransformerLM
from micronet.runs.results import RunDir


@pytest.mark.parametrize("start", [(0.1, 0.016), (0.5, 0.2)])
def test_search_converges_to_a_known_optimum(start):
    seen = []

    def objective(lam, theta):  # smooth, minimum 1.0 at (0.3, 0.05)
        seen.append((lam, theta))
        return 1.0 + (lam - 0.3) ** 2 + 40 * (theta - 0.05) ** 2 + 2 * (lam - 0.3) * (theta - 0.05)

    res = coordinate_search(objective, *start)
    assert res.lam == pytest.approx(0.3, rel=0.02) and res.theta == pytest.approx(0.05, rel=0.02)
    assert res.value == pytest.approx(1.0, abs=1e-4) and res.evals == len(seen) < 400


def test_search_stays_in_the_valid_domain():
    def objective(lam, theta):  # wants lambda -> 0, which the domain forbids
        return math.inf if not (0 < lam < 1 and theta > 0) else lam + (theta - 0.02) ** 2

    res = coordinate_search(objective, 0.1, 0.016)
    assert 0 < res.lam < 0.01 and res.theta == pytest.approx(0.02, rel=0.05)


def test_objective_equals_cached_evaluation():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, d_model=16, n_layer=1, n_head=2, d_head=8, d_ff=32, n_seq=8, segment_len=8,
                      cutoffs=[10, 20], bin_dims=[16, 8, 4])
    model = TransformerLM(cfg).double()
    tokens = np.random.default_rng(0).integers(0, 40, size=300)
    h, lp, y = hidden_states(model, tokens, chunk_len=64)
    assert h.dtype == torch.float64
    kept = CacheObjective(h, y, lp, n_cache=50, query_block=37)  # blocks cross the window's start
    recomputed = CacheObjective(h, y, lp, n_cache=50, query_block=37, max_band_gb=0)
    assert kept.band is not None and recomputed.band is None
    for lam, theta in [(0.2, 0.1), (0.05, 0.4), (0.3, 0.1)]:
        nll, n = evaluate_stream(model, tokens, 64, cache=EvalCache(50, lam, theta))
        assert kept(lam, theta) == pytest.approx(math.exp(nll / n), rel=1e-10)
        assert recomputed(lam, theta) == pytest.approx(math.exp(nll / n), rel=1e-10)
    assert kept(0.0, 0.1) == math.inf and kept.evals == 3


def test_cli_writes_the_yaml_and_evaluate_uses_it(results_root):
    train.run(compose_cfg("train", ["name=s", *TINY_MODEL, *TINY_TRAIN]))
    r = run_cli("micronet.cache_search", "name=s", "n_cache=30", "val_tokens=3000", "tol=0.02",
                env={"OMP_NUM_THREADS": "1"})  # tiny tensors: extra threads only contend
    assert r.returncode == 0, r.stderr
    path = RunDir("s").cache_params_path(6, 30)
    saved = OmegaConf.to_container(OmegaConf.load(path))
    assert saved["n_cache"] == 30 and f"lambda {saved['lambda']:.6f}" in r.stdout
    assert saved["evaluations"] > 3 and saved["val_ppl"] <= saved["val_ppl_no_cache"]
    assert saved["start"] == {"lambda": 0.1, "theta": 0.016}  # no training cache: the default start

    evaluate.run(compose_cfg("evaluate", ["name=s", "splits=[valid]", "n_cache=30", "chunk_len=4000"]))
    used = json.loads(RunDir("s").eval_path(6, 30).read_text())["valid"]["cache"]
    assert used == {"n_cache": 30, "lambda": saved["lambda"], "theta": saved["theta"], "source": path.name}
    # other sizes: no search result, no training cache -> the defaults; size 0 -> no cache
    model, _ = load_model(RunDir("s"), 6)
    assert eval_cache_for(RunDir("s"), 6, 31, model)[1] == {"n_cache": 31, "lambda": 0.1, "theta": 0.016,
                                                            "source": "default"}
    assert eval_cache_for(RunDir("s"), 6, 0, model) == (None, {"n_cache": 0})


def test_evaluation_falls_back_to_the_learned_values(results_root):
    train.run(compose_cfg("train", ["name=c", *TINY_MODEL, *TINY_TRAIN, "train.steps=2", "cache=train2000",
                                    "cache.n_cache=16"]))
    model, ckpt = load_model(RunDir("c"), 2)
    learned = model.cache.values()
    assert learned != pytest.approx((0.07, 0.016), rel=1e-6)  # trained, and loaded from the checkpoint
    cache, info = eval_cache_for(RunDir("c"), 2, 100, model)
    assert (cache.lam, cache.theta) == learned and info["source"] == "checkpoint" and info["n_cache"] == 100
    write_cache_params(RunDir("c").cache_params_path(2, 100), 100, 0.2, 0.03)
    assert eval_cache_for(RunDir("c"), 2, 100, model)[1]["source"] == "cache_step2_n100.yaml"
    assert eval_cache_for(RunDir("c"), 2, 101, model)[1]["source"] == "checkpoint"
