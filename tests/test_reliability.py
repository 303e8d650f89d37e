"""Reliability (issue 8): exact resume after SIGKILL, clean stops on SIGINT/SIGTERM, non-finite losses.
(A full disk and damaged files: test_disk_and_damage.py.)

The subprocess tests drive the real CLI (``python -m micronet.<stage>``); every chain is compared
with an uninterrupted in-process run of the same configuration, bit for bit.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from conftest import TINY_MODEL, TINY_TRAIN, compose_cfg
from micronet import prune, soft_labels, train
from micronet.model.transformer import TransformerLM
from micronet.runs.config import MicronetError
from micronet.runs.results import RunDir
from micronet.training.soft_labels import read_manifest
from test_soft_labels import tiny_train, write_tiny_corpus

TRAIN = [*TINY_MODEL, *TINY_TRAIN, "model.dropout=0.1"]  # dropout: the torch RNG state must be restored too
PRUNE = ["prune=uniform", "prune.target=0.5", "prune.every=4", "prune.rounds=5", "train.batch_size=2",
         "train.chunk_len=32", "train.eval_every=3", "train.save_every=2", "train.val_tokens=200",
         "train.eval_chunk_len=64", "train.threads=1", "eval_splits=[]"]
TIMING = ("tokens_per_s", "elapsed_s")  # the only train_results.csv columns that may differ between runs
STATE = ("step", "tokens", "model", "optimizer", "scaler", "rng", "bad_steps", "pending_losses",
         "pending_validation")



# ----------------------------------------------------------------------------- helpers


def start(module: str, args: list[str], out: Path, err: Path | None = None,
          env: dict[str, str | None] | None = None) -> subprocess.Popen:
    """``python -m <module> <args>`` writing to files (a pipe nobody reads could block a long run);
    ``env`` changes the environment (None: unset)."""
    full = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    with open(out, "ab") as o, open(err or out, "ab") as e:
        return subprocess.Popen([sys.executable, "-m", module, *args], stdout=o, stderr=e, cwd="/",
                                env={k: v for k, v in full.items() if v is not None})


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def wait_until(cond: Callable[[], bool], proc: subprocess.Popen, what: str, out: Path, timeout: float = 180) -> None:
    """Poll ``cond`` every 2 ms while ``proc`` runs."""
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"{what}: the process ended first (rc {proc.returncode}):\n{tail(out)}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"{what}: timed out:\n{tail(out)}")
        time.sleep(0.002)


def kill_three_times_then_finish(module: str, args: list[str], progress: Callable[[], int], gaps: tuple[int, int],
                                 out: Path, seed: int, max_delay: float = 0.0, env: dict | None = None) -> list[int]:
    """SIGKILL the command at 3 seeded random points (progress advanced by ``gaps``, then a random delay),
    restarting it each time; then let it finish. Returns the progress seen after each kill."""
    rng = random.Random(seed)
    killed = []
    for i in range(3):
        target = progress() + rng.randint(*gaps)
        p = start(module, args, out, env=env)
        wait_until(lambda: progress() >= target, p, f"kill {i + 1} (progress {target})", out)
        time.sleep(rng.uniform(0, max_delay))
        p.send_signal(signal.SIGKILL)
        assert p.wait() == -signal.SIGKILL, f"kill {i + 1}: the run ended before it:\n{tail(out)}"
        killed.append(progress())
    p = start(module, args, out, env=env)
    assert p.wait(timeout=300) == 0, tail(out)
    return killed


def assert_same(a: Any, b: Any, where: str) -> None:
    """Bit-for-bit equality of nested checkpoint contents."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def csv_rows(rd: RunDir) -> list[dict]:
    with open(rd.train_csv, newline="") as f:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]


def assert_same_run(a: RunDir, b: RunDir, step: int) -> None:
    """Same weights, optimizer, RNG, counters at ``step``, and the same validation rows."""
    ca, cb = a.load(step), b.load(step)
    for k in STATE:
        assert_same(ca.get(k), cb.get(k), k)
    assert csv_rows(a) == csv_rows(b)


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*tmp*")]


def guard_is_free(rd: RunDir) -> bool:
    """Released cleanly: an empty guard file whose lock a new process can take at once."""
    if (rd.path / ".guard").read_text() != "":
        return False
    with rd.guard("test"):
        return True


# ----------------------------------------------------------------------------- SIGKILL: exact resume


@pytest.mark.slow
def test_sigkill_at_3_random_points_then_resume_is_bit_identical(results_root, tmp_path, monkeypatch):
    """Train, prune fine-tuning and soft labels, each killed 3 times (the three chains run side by side:
    CLI start-up dominates) and compared with an uninterrupted in-process run of the same settings."""
    data_env = {"MICRONET_DATA": os.environ.get("MICRONET_DATA")}  # train/prune: the WikiText-2 cache
    args = [*TRAIN, "train.steps=40", "train.save_every=2", "train.eval_every=3"]
    train.run(compose_cfg("train", ["name=whole", *args]))
    train.run(compose_cfg("train", ["name=t", *TRAIN]))
    shutil.copytree(RunDir("t").path, RunDir("u").path)  # the same prune parent under another name
    prune_args = [*PRUNE, "train.steps=40"]
    prune.run(compose_cfg("prune", ["name=t", *prune_args]))
    monkeypatch.setenv("MICRONET_DATA", str(tmp_path / "data"))  # soft labels: a small synthetic corpus
    train.run(tiny_train("a", write_tiny_corpus(tmp_path / "raw", n_lines=400)))
    shutil.copytree(RunDir("a").path, RunDir("b").path)
    sl_args = ["topk=4", "chunk_len=32", "block_tokens=64", "threads=1"]
    whole_sl = soft_labels.run(compose_cfg("soft_labels", ["name=a", *sl_args]))

    killed_run, pruned = RunDir("killed"), RunDir("pruneuniform0.5_u")
    sl_out = RunDir("b").path / "soft_labels" / "top4_step4"

    def rows_done() -> int:
        m = read_manifest(sl_out)
        return m["rows_done"] if m else 0

    chains = {
        "train": dict(module="micronet.train", args=["name=killed", *args], gaps=(2, 6), max_delay=0.02,
                      progress=lambda: killed_run.latest_step() or 0, env=data_env),
        "prune": dict(module="micronet.prune", args=["name=u", *prune_args], gaps=(2, 6), max_delay=0.02,
                      progress=lambda: pruned.latest_step() or 0, env=data_env),
        "soft_labels": dict(module="micronet.soft_labels", args=["name=b", *sl_args], gaps=(200, 700),
                            progress=rows_done),
    }
    with ThreadPoolExecutor(len(chains)) as pool:
        futures = {k: pool.submit(kill_three_times_then_finish, out=tmp_path / f"{k}.out", seed=i, **c)
                   for i, (k, c) in enumerate(chains.items())}
        killed = {k: f.result() for k, f in futures.items()}
    assert 0 < killed["train"][0] and killed["train"][-1] < 40, killed
    assert_same_run(RunDir("whole"), killed_run, 40)
    assert_same_run(RunDir("pruneuniform0.5_t"), pruned, 40)
    assert pruned.load(40)["lineage"]["parent"] == "u"
    assert not temp_files(killed_run.path) and not temp_files(pruned.path)  # half-written checkpoints removed
    m = json.loads((sl_out / "manifest.json").read_text())
    assert killed["soft_labels"][-1] < m["tokens"] and m["complete"] and m["rows_done"] == whole_sl["tokens"]
    assert not (sl_out / "state.pt").exists() and not temp_files(RunDir("b").path)
    for f in ("ids.npy", "probs.npy"):
        assert (sl_out / f).read_bytes() == (RunDir("a").path / "soft_labels" / "top4_step4" / f).read_bytes(), f


# ----------------------------------------------------------------------------- SIGINT / SIGTERM


@pytest.mark.slow
def test_signals_save_release_the_guard_and_exit_130_143(results_root, tmp_path):
    """Four stages at once (start-up dominates): each is signalled after its first checkpoint."""
    train.run(compose_cfg("train", ["name=t", *TRAIN]))
    sl_dir = RunDir("t").path / "soft_labels" / "top4_step6"

    def has(name: str, step: int) -> Callable[[], bool]:
        return RunDir(name).checkpoint_path(step).exists

    def soft_labels_started() -> bool:
        m = read_manifest(sl_dir)
        return bool(m and m["rows_done"] > 1)

    jobs = {  # name: module, args, signal, expected exit code, "first checkpoint written"
        "sigint": ("micronet.train", ["name=sigint", *TRAIN, "train.steps=100000", "train.save_every=5"],
                   signal.SIGINT, 130, has("sigint", 5)),
        # a whole-split validation (~10 s here) right after step 2: the signal must cut it short
        "sigterm_val": ("micronet.train", ["name=sigterm_val", *TRAIN, "train.steps=4", "train.save_every=1",
                                           "train.eval_every=2", "train.val_tokens=0", "train.eval_chunk_len=512"],
                        signal.SIGTERM, 143, has("sigterm_val", 1)),
        "prune": ("micronet.prune", ["name=t", *PRUNE, "prune.every=1", "prune.rounds=1", "train.steps=100000",
                                     "train.save_every=5"], signal.SIGTERM, 143, has("pruneuniform0.5_t", 5)),
        "soft_labels": ("micronet.soft_labels", ["name=t", "topk=4", "chunk_len=256", "block_tokens=512",
                                                 "threads=1"], signal.SIGTERM, 143, soft_labels_started),
    }
    procs = {k: start(m, a, tmp_path / f"{k}.out", tmp_path / f"{k}.err") for k, (m, a, *_) in jobs.items()}
    sent: dict[str, float] = {}
    ended: dict[str, float] = {}
    deadline = time.monotonic() + 180
    while len(ended) < len(procs) and time.monotonic() < deadline:
        for k, p in procs.items():
            if k in ended:
                continue
            if p.poll() is not None:
                ended[k] = time.monotonic()
            elif k not in sent and jobs[k][4]():
                if k == "sigterm_val":
                    time.sleep(0.3)  # step 2 is done: well inside its validation
                p.send_signal(jobs[k][2])
                sent[k] = time.monotonic()
        time.sleep(0.002)
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()
    for k, p in procs.items():
        err = tail(tmp_path / f"{k}.err")
        assert k in sent and k in ended, (k, "never signalled or never ended", err)
        assert p.returncode == jobs[k][3], (k, p.returncode, err)
        # seconds, not the minutes a pass would take; loose because four stages share two cores under CI load
        assert ended[k] - sent[k] < 30, (k, ended[k] - sent[k])
        assert "Traceback" not in err, (k, err)
    for name, stage in (("sigint", "train"), ("sigterm_val", "train"), ("pruneuniform0.5_t", "prune")):
        rd = RunDir(name)
        step = rd.latest_step()
        last_line = rd.log_path(stage).read_text().splitlines()[-1]
        assert last_line.endswith(f"saved {rd.checkpoint_path(step)}"), (name, last_line)
        assert rd.load()["step"] == step and guard_is_free(rd), name
    val = RunDir("sigterm_val").load()
    assert val["step"] == 2 and val["pending_validation"] and len(val["pending_losses"]) == 2
    assert "validation of step 2 interrupted by a signal" in RunDir("sigterm_val").log_path("train").read_text()
    assert "micronet.train: interrupted" in tail(tmp_path / "sigint.err")
    m = read_manifest(sl_dir)
    assert 1 < m["rows_done"] < m["tokens"] and not m["complete"] and (sl_dir / "state.pt").exists()
    assert guard_is_free(RunDir("t"))


def test_a_signal_during_validation_is_redone_exactly_on_resume(results_root, monkeypatch):
    args = [*TRAIN, "train.save_every=5"]  # validations at 3 and 6, checkpoints at 5 and 6
    train.run(compose_cfg("train", ["name=whole", *args]))
    real_validate, real_step = train.Trainer.validate, train.Trainer.train_step

    def signalled(self):
        os.kill(os.getpid(), signal.SIGTERM)  # delivered mid-validation, as from `kill`
        return real_validate(self)

    monkeypatch.setattr(train.Trainer, "validate", signalled)
    with pytest.raises(SystemExit) as e:
        train.run(compose_cfg("train", ["name=parts", *args]))
    assert e.value.code == 143
    ckpt = RunDir("parts").load()
    assert ckpt["step"] == 3 and ckpt["pending_validation"] and len(ckpt["pending_losses"]) == 3
    assert not RunDir("parts").train_csv.exists()

    def crash(self):
        raise RuntimeError("simulated crash after the redone validation")

    monkeypatch.setattr(train.Trainer, "validate", real_validate)
    monkeypatch.setattr(train.Trainer, "train_step", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):  # row 3 written, checkpoint 3 still pending
        train.run(compose_cfg("train", ["name=parts", *args]))
    assert [r["step"] for r in csv_rows(RunDir("parts"))] == ["3"]
    monkeypatch.setattr(train.Trainer, "train_step", real_step)
    train.run(compose_cfg("train", ["name=parts", *args]))  # row 3 is redone once, not duplicated
    assert_same_run(RunDir("whole"), RunDir("parts"), 6)


# ----------------------------------------------------------------------------- non-finite losses


def nan_loss_at(monkeypatch, *calls: int) -> None:
    """Make the ``calls``-th training forward passes (1-based; validation not counted) return NaN."""
    real, seen = TransformerLM.target_log_probs, [0]

    def patched(self, h, target):
        lp = real(self, h, target)
        if self.training:
            seen[0] += 1
            if seen[0] in calls:
                return lp * float("nan")
        return lp

    monkeypatch.setattr(TransformerLM, "target_log_probs", patched)


def test_a_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(results_root, monkeypatch):
    nan_loss_at(monkeypatch, 3)
    with pytest.raises(MicronetError) as e:
        train.run(compose_cfg("train", ["name=n", *TRAIN]))
    assert str(e.value) == ("non-finite training loss at step 3; the last checkpoint (step 2) is kept; lower "
                            "optim.lr, check the data, or let train.max_bad_steps=N skip up to N such steps")
    assert RunDir("n").steps() == [2] and RunDir("n").load()["step"] == 2


def test_max_bad_steps_skips_deterministically_and_is_bounded(results_root, monkeypatch, caplog):
    args = [*TRAIN, "train.save_every=1", "train.max_bad_steps=1"]
    nan_loss_at(monkeypatch, 3)
    train.run(compose_cfg("train", ["name=skip", *args]))
    assert "non-finite training loss at step 3: skipped without an update (1 of train.max_bad_steps=1)" in caplog.text
    rd = RunDir("skip")
    c2, c3, c4 = rd.load(2), rd.load(3), rd.load(4)
    assert_same(c2["model"], c3["model"], "model")  # no update ...
    assert_same(c2["optimizer"], c3["optimizer"], "optimizer")
    assert c3["rng"]["numpy"] != c2["rng"]["numpy"] and c3["tokens"] == c2["tokens"] + 64  # ... but the batch is used
    assert c3["bad_steps"] == 1 and not torch.equal(c3["model"]["layers.0.ffn.0.weight"],
                                                     c4["model"]["layers.0.ffn.0.weight"])
    nan_loss_at(monkeypatch, 3)  # the same injection, a stop and a resume: the same run
    train.run(compose_cfg("train", ["name=again", *args, "train.stop_after=4"]))
    train.run(compose_cfg("train", ["name=again", *args]))
    assert_same_run(rd, RunDir("again"), 6)
    nan_loss_at(monkeypatch, 3, 5)
    with pytest.raises(MicronetError, match=r"^non-finite training loss at step 5 after skipping 1 "
                                            r"\(train.max_bad_steps=1\); the last checkpoint \(step 4\) is kept"):
        train.run(compose_cfg("train", ["name=twice", *args]))


def test_a_non_finite_gradient_is_caught_too(results_root, monkeypatch):
    real, seen = torch.nn.utils.clip_grad_norm_, [0]

    def clip(params, max_norm):
        seen[0] += 1
        norm = real(params, max_norm)
        return norm * float("inf") if seen[0] == 2 else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    with pytest.raises(MicronetError, match="^non-finite training gradient at step 2; no checkpoint was saved"):
        train.run(compose_cfg("train", ["name=g", *TRAIN]))
