"""torchrun training: 2 gloo CPU processes (DDP) against one process on the same global batches.

The runs are made once per module (``runs``): each ``torchrun`` launch costs a few seconds of
interpreter start-up. The model has a fourth adaptive bin, [28000, 33278), which no target of the
first two steps falls in, only rank 0's rows in steps 3 and 5 and both ranks' in step 4: DDP must
average what it gets from the rank that used it and leave it untouched (grad None, no optimizer
state) when no rank did, exactly as one process does.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import TINY_MODEL, TINY_TRAIN, compose_cfg, run_cli
from micronet import soft_labels, train
from micronet.runs.config import ConfigError
from micronet.runs.results import RunDir
from test_soft_labels import tiny_env, tiny_train  # noqa: F401 (fixture)

ARGS = [
    *TINY_MODEL, *TINY_TRAIN, "model.cutoffs=[2000,10000,28000]", "model.bin_dims=[16,8,4,4]", "model.dropout=0",
    "train.batch_size=4", "train.save_every=1", "hebbian.enabled=true", "cache.n_cache=16",
    "train.amp=none",  # exact fp32: the comparison below is at fp32 tolerance
]
STEPS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(root: Path, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node=N -m micronet.train args`` from cwd=/."""
    return run_cli("torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                   f"--master_port={free_port()}", "-m", "micronet.train", *args,
                   env={"MICRONET_RESULTS": str(root), "OMP_NUM_THREADS": "1"}, timeout=240)


def _rank(cfg, root: Path, rank: int, nproc: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), MICRONET_RESULTS=str(root))
    train.run(cfg)


def forked(root: Path, cfg, nproc: int = 2) -> None:
    """``train.run(cfg)`` in ``nproc`` forked processes with the environment torchrun gives its workers
    (no interpreter start-up: seconds instead of ~15 s per launch on a busy 2-core machine)."""
    port, ctx = free_port(), mp.get_context("fork")
    procs = [ctx.Process(target=_rank, args=(cfg, root, r, nproc, port)) for r in range(nproc)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.exitcode is None:
            p.kill()
    assert [p.exitcode for p in procs] == [0] * nproc


def one_process(root: Path, *args: str) -> None:
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setenv("MICRONET_RESULTS", str(root))
        train.run(compose_cfg("train", list(args)))


def files(rd: RunDir) -> list[str]:
    return sorted(str(p.relative_to(rd.path)) for p in rd.path.rglob("*"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """two: 2 processes by torchrun, whole; one: 1 process, whole; parts: 2 (forked) processes stopped
    at step 3 and resumed; at3_two: a copy of parts at step 3 (resumed by one process in a test)."""
    root = tmp_path_factory.mktemp("results")
    two = torchrun(root, "name=two", *ARGS)
    assert two.returncode == 0, two.stderr[-3000:]
    forked(root, compose_cfg("train", ["name=parts", *ARGS, "train.stop_after=3"]))
    shutil.copytree(root / "parts", root / "at3_two")
    forked(root, compose_cfg("train", ["name=parts", *ARGS]))
    one_process(root, "name=one", *ARGS)
    return {"root": root, "two": two}


def load(runs: dict, name: str, step: int) -> dict:
    return RunDir(name, runs["root"]).load(step)


def assert_close_weights(a: torch.Tensor, b: torch.Tensor, what: str, lr: float = 1e-3) -> None:
    """Equal to fp32 tolerance, but for Adam's amplification of summation-order noise: Adam divides each
    gradient by its own magnitude, so an element whose gradient nearly cancels keeps that noise at a
    relative size in its update (seen: 1 of 512 elements 8.5e-7 apart after step 1). Allowed on at most
    1% of a tensor's elements, and never more than 1% of the peak learning rate."""
    diff = (a - b).abs()
    off = diff > 2e-7 + 1e-5 * b.abs()
    assert off.float().mean().item() <= 0.01, (what, f"{int(off.sum())} of {off.numel()} elements differ")
    assert (diff[off] <= 0.01 * lr).all(), (what, f"max difference {diff.max().item():.3g} > 1% of lr {lr}")


def assert_close_states(a: dict, b: dict, what: str) -> None:
    """Model, optimizer state (including which parameters have any) and Hebbian counts agree."""
    assert a["model"].keys() == b["model"].keys(), what
    for k, v in a["model"].items():
        assert_close_weights(v, b["model"][k], f"{what} {k}")
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys(), f"{what}: parameters with optimizer state differ"
    for i in sa:
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sa[i][k], sb[i][k], rtol=1e-4, atol=1e-9, msg=lambda m: f"{what} {i} {k}: {m}")
    assert torch.equal(a["hebbian"]["counts"], b["hebbian"]["counts"]), what
    assert a["tokens"] == b["tokens"] and a["rng"]["numpy"] == b["rng"]["numpy"], what


def test_two_processes_step_as_one_process_on_the_whole_batch(runs):
    last_bin = None
    for step in range(1, STEPS + 1):
        two, one = load(runs, "two", step), load(runs, "one", step)
        assert_close_states(two, one, f"step {step}")
        n_state = len(one["optimizer"]["state"])
        last_bin = [*(last_bin or []), n_state]
    # the 4th bin's tail (projection, bias) has no optimizer state until a target falls in it (step 3)
    assert last_bin[0] == last_bin[1] < last_bin[2] == last_bin[-1], last_bin
    rows = [RunDir(n, runs["root"]).train_csv.read_text().splitlines() for n in ("two", "one")]
    for a, b in zip(*rows[:2]):
        if a[0].isdigit():  # train and validation loss of the global batch, as one process logs them
            torch.testing.assert_close([float(v) for v in a.split(",")[:4]], [float(v) for v in b.split(",")[:4]],
                                       rtol=1e-6, atol=0)
    assert len(rows[0]) == len(rows[1]) == 3


def test_hebbian_statistics_are_all_reduced_in_the_trainer(runs):
    """Each rank sees half the targets: its counts, and the tied rows they move (a first-seen word's row
    becomes its activation), equal one process's only if the other rank's statistics are added."""
    for step in (1, STEPS):
        one, two = load(runs, "one", step), load(runs, "two", step)
        assert int(two["hebbian"]["counts"].sum()) == step * 4 * 32
        assert torch.equal(two["hebbian"]["counts"], one["hebbian"]["counts"])
        for i in range(4):
            k = f"embed.tables.{i}.weight"
            torch.testing.assert_close(two["model"][k], one["model"][k], rtol=1e-5, atol=2e-7)


def test_only_rank_0_writes_the_results(runs):
    one, two = RunDir("one", runs["root"]), RunDir("two", runs["root"])
    assert files(two) == files(one) and two.steps() == list(range(1, STEPS + 1))
    assert sorted(p.name for p in runs["root"].iterdir()) == ["at3_two", "one", "parts", "two"]
    assert [r.split(",")[0] for r in two.train_csv.read_text().splitlines()] == ["step", "3", "6"]
    log = two.log_path("train").read_text()
    assert log.count(f"training {two.path}:") == 1 and log.count(f"saved {two.checkpoint_path(STEPS)}") == 1
    assert "[rank1]" not in runs["two"].stdout and runs["two"].stdout.count("validation perplexity") == 1
    assert two.config_path.read_text().count("commit") == 1


def test_a_stopped_two_process_run_resumes_bit_for_bit(runs):
    assert RunDir("at3_two", runs["root"]).steps() == [1, 2, 3]
    whole, parts = load(runs, "two", STEPS), load(runs, "parts", STEPS)
    for k, v in whole["model"].items():
        assert torch.equal(v, parts["model"][k]), k
    for i, s in whole["optimizer"]["state"].items():
        assert all(torch.equal(t, parts["optimizer"]["state"][i][n]) for n, t in s.items()), i
    assert torch.equal(whole["hebbian"]["counts"], parts["hebbian"]["counts"])
    assert len(whole["rng"]["ranks"]) == 2 and all(
        torch.equal(a["torch"], b["torch"]) for a, b in zip(whole["rng"]["ranks"], parts["rng"]["ranks"]))
    rows = [RunDir(n, runs["root"]).train_csv.read_text().splitlines() for n in ("two", "parts")]
    assert [r.split(",")[:5] for r in rows[0]] == [r.split(",")[:5] for r in rows[1]]


def test_a_two_process_checkpoint_resumes_in_one_process(runs):
    """Same state_dict keys (no ``module.`` prefix): one process continues the 2-process run."""
    assert not any(k.startswith("module.") for k in load(runs, "two", 1)["model"])
    one_process(runs["root"], "name=at3_two", *ARGS)
    assert_close_states(load(runs, "at3_two", STEPS), load(runs, "one", STEPS), "2 -> 1 processes")


def test_a_batch_not_divisible_by_the_process_count_is_refused(results_root, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc_per_node=2 sets it: refused before joining
    with pytest.raises(ConfigError, match=r"^train.batch_size=3 is the global batch and must be divisible by "
                                          r"the number of processes \(2\)$"):
        train.run(compose_cfg("train", ["name=odd", *ARGS, "train.batch_size=3"]))
    assert not results_root.exists()


def test_distillation_reads_each_ranks_rows(tiny_env, results_root):
    """The soft labels of a rank's own rows (``starts`` sliced like the batch): 2 processes = 1 process."""
    train.run(tiny_train("teach", tiny_env))
    soft_labels.run(compose_cfg("soft_labels", ["name=teach", "topk=4", "chunk_len=64", "block_tokens=64",
                                                "threads=1"]))
    student = ["distill.teacher=teach", "distill.topk=4", "train.batch_size=4", "model.dropout=0",
               "train.amp=none"]  # exact fp32: compared at fp32 tolerance
    train.run(tiny_train("one", tiny_env, *student))
    forked(results_root, tiny_train("two", tiny_env, *student))
    a, b = RunDir("one").load(4), RunDir("two").load(4)
    assert a["model"].keys() == b["model"].keys()
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-5, atol=2e-7, msg=lambda m: f"{k}: {m}")
