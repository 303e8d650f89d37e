"""Hebbian softmax: the update really changes the tied weights, exactly the seen rows by the rule;
two DDP ranks with half a batch each apply the same update as one process with all of it; counts
and the learned cache survive resume bit for bit."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch
import torch.distributed as dist

from conftest import TINY_MODEL, TINY_TRAIN, compose_cfg
from micronet import train
from micronet.model.cache import CacheConfig, TrainCache
from micronet.model.hebbian import HebbianConfig, HebbianSoftmax
from micronet.model.transformer import ModelConfig, TransformerLM
from micronet.runs.results import CheckpointError, RunDir

TARGETS = [3, 3, 12, 35, 7, 5]  # word 3 twice; 12 in tail bin 1, 35 in tail bin 2
PRIOR = {7: 499, 5: 150, 35: 9}  # counts before the step (all others 0)


def tiny_model() -> TransformerLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, d_model=16, n_layer=1, n_head=2, d_head=8, d_ff=32, n_seq=8, segment_len=8,
                      cutoffs=[10, 20], bin_dims=[16, 8, 4])
    return TransformerLM(cfg).double()


def setup(model: TransformerLM) -> HebbianSoftmax:
    heb = HebbianSoftmax(model.softmax, HebbianConfig(enabled=True, T=500, gamma=0.01))
    for w, c in PRIOR.items():
        heb.counts[w] = c
    return heb


def rows(model: TransformerLM) -> torch.Tensor:
    """All output rows, zero-padded to d_model, from the model's *state_dict* (the real weights)."""
    sd = model.state_dict()
    tabs = [sd[f"embed.tables.{i}.weight"] for i in range(3)]
    return torch.cat([torch.nn.functional.pad(t, (0, 16 - t.shape[1])) for t in tabs])


def rescaled(v: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    return v * row.norm() / v.norm()


def test_update_changes_exactly_the_seen_rows_by_the_rule():
    model = tiny_model()
    heb = setup(model)
    torch.manual_seed(1)
    h = torch.randn(1, len(TARGETS), 16, dtype=torch.float64)
    W0, W1, W2 = (model.softmax.table(i).detach().clone() for i in range(3))
    P1, P2 = model.softmax.projs[1].weight.detach(), model.softmax.projs[2].weight.detach()
    before = rows(model)

    heb.update(h, torch.tensor([TARGETS]))

    x = h[0]
    want = {
        # new word seen twice: c = 2 -> lambda 1/2; mean of both vectors, each rescaled to |W_3|
        3: 0.5 * W0[3] + 0.5 * (rescaled(x[0], W0[3]) + rescaled(x[1], W0[3])) / 2,
        # first sight of a tail word: c = 1 -> lambda 1, the row becomes its projected vector
        12: rescaled(P1 @ x[2], W1[12 - 10]),
        # c = 10 -> lambda 0.1, bin 2's projection
        35: 0.9 * W2[35 - 20] + 0.1 * rescaled(P2 @ x[3], W2[35 - 20]),
        # c = 151 -> 1/151 < gamma: lambda 0.01
        5: 0.99 * W0[5] + 0.01 * rescaled(x[5], W0[5]),
    }
    after = rows(model)
    changed = (after != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == sorted(want)  # word 7 reached c = T = 500: lambda 0, row untouched
    for w, row in want.items():
        torch.testing.assert_close(after[w, : row.numel()], row, rtol=1e-12, atol=1e-12)
    assert heb.counts[[3, 12, 35, 7, 5]].tolist() == [2, 1, 10, 500, 151]
    assert int(heb.counts.sum()) == len(TARGETS) + sum(PRIOR.values())
    # the tied input embedding is the same tensor, so it changed too
    assert torch.equal(model.embed.tables[0].weight[3], after[3])


def test_state_dict_round_trip():
    heb = setup(tiny_model())
    other = HebbianSoftmax(tiny_model().softmax, HebbianConfig(enabled=True))
    other.load_state_dict(heb.state_dict())
    assert torch.equal(other.counts, heb.counts)
    with pytest.raises(ValueError, match="counts for 3 words"):
        other.load_state_dict({"counts": torch.zeros(3, dtype=torch.int64)})


def _rank(rank: int, init_file: str, h: torch.Tensor, targets: torch.Tensor, q) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = tiny_model()
        heb = setup(model)
        half = targets.shape[1] // 2
        sl = slice(rank * half, (rank + 1) * half)
        heb.update(h[:, sl], targets[:, sl])
        q.put((rank, rows(model).numpy(), heb.counts.numpy()))  # numpy: no shared-memory handles
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_apply_the_update_of_the_whole_batch(tmp_path):
    torch.manual_seed(2)
    targets = torch.tensor([[3, 12, 3, 35, 5, 3, 12, 7]])  # rank 0 sees 3, 12, 3, 35; rank 1 sees 5, 3, 12, 7
    h = torch.randn(1, targets.shape[1], 16, dtype=torch.float64)
    single = tiny_model()
    heb = setup(single)
    heb.update(h, targets)

    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, str(tmp_path / "init"), h, targets, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for _, w, counts in results:
        torch.testing.assert_close(torch.from_numpy(w), rows(single), rtol=1e-12, atol=1e-12)
        assert torch.equal(torch.from_numpy(counts), heb.counts)


def test_resume_with_hebbian_and_learned_cache_is_bit_identical(results_root):
    def cfg(name, *extra):
        return compose_cfg("train", [f"name={name}", *TINY_MODEL, *TINY_TRAIN, "cache=train2000", "cache.n_cache=20",
                                     "hebbian.enabled=true", *extra])

    train.run(cfg("whole"))
    train.run(cfg("parts", "train.stop_after=3"))
    train.run(cfg("parts"))
    a, b = RunDir("whole").load(6), RunDir("parts").load(6)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert torch.equal(a["hebbian"]["counts"], b["hebbian"]["counts"])
    assert int(a["hebbian"]["counts"].sum()) == 6 * 2 * 32  # every target of every step counted
    assert a["cache_config"]["n_cache"] == 20
    # lambda/theta were trained: they moved from their initial values
    init = TrainCache(CacheConfig(n_cache=20))
    assert a["model"]["cache.theta_param"] != init.theta_param and a["model"]["cache.lambda_param"] != init.lambda_param
    with pytest.raises(CheckpointError, match="cache settings"):
        train.run(compose_cfg("train", ["name=whole", *TINY_MODEL, *TINY_TRAIN, "train.steps=8"]))
