"""Bad input at the command line (issue 8): one clear error line, exit 2, nothing existing touched.

The table holds the cases not already covered at the CLI level elsewhere (test_train, test_sweeps,
test_cache_search); in-process checks of the same errors live next to their stages. All cases run
as parallel subprocesses: CLI start-up (~3 s) dominates.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import compose_cfg
from micronet import prune, soft_labels, train
from micronet.data.corpus import DataConfig, load_corpus
from micronet.runs.results import RunDir
from test_soft_labels import TINY_DATA_MODEL, tiny_data, tiny_train, write_tiny_corpus

NEW_FILES_ALLOWED = re.compile(r"\.guard|\.lock|.*\.log")  # a failed stage may leave its guard, lock and log
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (INFO|WARNING) ")



@pytest.fixture
def tiny_env(tmp_path, results_root, monkeypatch) -> Path:
    """Results and data caches under tmp (inherited by the subprocesses); returns the raw corpus folder."""
    monkeypatch.setenv("MICRONET_DATA", str(tmp_path / "data"))
    return write_tiny_corpus(tmp_path / "raw")


def snapshot(*roots: Path) -> dict[Path, tuple[int, str]]:
    """Every file under ``roots``: (mtime_ns, sha256)."""
    return {p: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for root in roots if root.exists() for p in sorted(root.rglob("*")) if p.is_file()}


def train_args(name: str, folder: Path, data_name: str) -> list[str]:
    """The command line of ``test_soft_labels.tiny_train``."""
    return [f"name={name}", *TINY_DATA_MODEL, *tiny_data(folder, data_name), "train.steps=4", "train.batch_size=2",
            "train.chunk_len=32", "train.eval_every=4", "train.save_every=4", "train.val_tokens=100",
            "train.eval_chunk_len=64", "optim.warmup_steps=1", "train.threads=1"]


@pytest.mark.slow
def test_bad_cli_input_is_one_clear_line_and_changes_nothing(tiny_env, tmp_path, results_root):
    train.run(tiny_train("t", tiny_env))  # a good run with complete soft labels
    soft_labels.run(compose_cfg("soft_labels", ["name=t", "topk=4", "chunk_len=1000", "threads=1"]))
    other = write_tiny_corpus(tmp_path / "raw_other", seed=5)  # same vocabulary size, other text
    load_corpus(DataConfig(name="other", raw_dir=str(other)), progress=False)
    for name in ("dmg", "cfg"):
        shutil.copytree(RunDir("t").path, RunDir(name).path)
    ckpt = RunDir("dmg").checkpoint_path(4)
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    RunDir("cfg").config_path.write_text("name: cfg\ntrain: {steps: 4\n")  # an unclosed flow mapping
    bad_utf8 = shutil.copytree(tiny_env, tmp_path / "raw_utf8")
    (bad_utf8 / "wiki.train.tokens").write_bytes(b"w1 w2\nw3 \xff\xfe w4\n")
    no_test = shutil.copytree(tiny_env, tmp_path / "raw_notest")
    (no_test / "wiki.test.tokens").unlink()

    root, d = results_root, tmp_path / "data" / "cache"
    cases = [  # (module, args, the one expected line after "micronet.<stage>: error: ")
        ("train", ["name=x", "train.no_such_key=1"],
         re.escape("unknown configuration key 'train.no_such_key' (to add a new key, use +train.no_such_key=1)")),
        ("train", ["name=x", "model=no_such_model"],
         "In 'train': Could not find 'model/no_such_model'; Available options in 'model': 8.3M, .*"),
        ("train", ["name=x", "train.batch_size=abc"],
         re.escape("train.batch_size: Value 'abc' of type 'str' could not be converted to Integer")),
        ("train", ["name=x", "train.steps=${nope}"], "Interpolation key 'nope' not found"),
        ("cache_search", ["name=t", "n_cache=0"], "n_cache and chunk_len must be positive, val_tokens >= 0"),
        ("evaluate", ["name=t", "n_cache=-1"], re.escape("chunk_len must be positive and n_cache >= 0, got 4032, -1")),
        ("evaluate", ["name=dmg", "step=4"], re.escape(f"{ckpt} is corrupt or truncated (checksum mismatch)")),
        ("train", [*train_args("s", other, "other"), "distill.teacher=t", "distill.topk=4"],
         r"soft labels \S+/t/soft_labels/top4_step4 were made from other data \(data 'tiny', this run: 'other'\): "
         r"train_sha256 .*"),
        ("prune", ["name=cfg", "prune=uniform", "prune.target=0.5", "prune.every=1", "prune.rounds=1",
                   "train.steps=2", "eval_splits=[]"],
         re.escape(f"{RunDir('cfg').config_path} is damaged (") + ".* at line 3" + re.escape("); restore or remove it")),
        ("train", train_args("u", bad_utf8, "badutf"), r".*wiki\.train\.tokens: not valid UTF-8 at byte offset 9 .*"),
        ("train", train_args("v", no_test, "notest"), r".*wiki\.test\.tokens: split file not found.*"),
    ]
    before = snapshot(root, d)
    procs = [subprocess.Popen([sys.executable, "-m", f"micronet.{m}", *a], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd="/") for m, a, _ in cases]
    wrong = []
    for p, (module, args, pattern) in zip(procs, cases):
        _, err = p.communicate(timeout=300)
        lines = [line for line in err.splitlines() if not LOG_LINE.match(line)]  # stage logs on stderr are fine
        if p.returncode != 2 or len(lines) != 1 or not re.fullmatch(f"micronet\\.{module}: error: {pattern}", lines[0]):
            wrong.append((module, args, p.returncode, err[-1500:]))
    assert not wrong, "\n\n".join(map(str, wrong))
    after = snapshot(root, d)
    assert {p: after.get(p) for p in before} == before  # nothing that existed was touched
    new = sorted(p.relative_to(tmp_path) for p in set(after) - set(before))
    assert all(NEW_FILES_ALLOWED.fullmatch(p.name) for p in new), new


def test_a_damaged_config_yaml_of_a_resumed_run_is_rewritten(tiny_env, caplog):
    """config.yaml of the run being resumed is not an input (the command line is): it is repaired.
    A derived run takes its parent step from its newest checkpoint instead, with a warning."""
    train.run(tiny_train("t", tiny_env, "train.stop_after=2", "train.save_every=2"))
    RunDir("t").config_path.write_bytes(b"\xff\x00 not yaml: [")
    train.run(tiny_train("t", tiny_env, "train.save_every=2"))
    assert OmegaConf.load(RunDir("t").config_path).train.steps == 4 and RunDir("t").latest_step() == 4

    args = ["name=t", "prune=uniform", "prune.target=0.5", "prune.every=1", "prune.rounds=2", "train.steps=4",
            "train.batch_size=2", "train.chunk_len=32", "train.eval_every=2", "train.save_every=2",
            "train.val_tokens=100", "train.eval_chunk_len=64", "train.threads=1", "eval_splits=[]"]
    prune.run(compose_cfg("prune", [*args, "step=2", "train.stop_after=2"]))  # from parent step 2, not the newest
    rd = RunDir("pruneuniform0.5_t")
    rd.config_path.write_text("lineage: {parent: t, parent_step: 2\n")  # damaged
    prune.run(compose_cfg("prune", args))
    assert f"{rd.config_path} is damaged" in caplog.text and "using the lineage in the newest checkpoint" in caplog.text
    assert rd.load(4)["lineage"]["parent_step"] == 2 and OmegaConf.load(rd.config_path).lineage.parent_step == 2
