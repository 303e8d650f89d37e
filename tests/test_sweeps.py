"""Hydra multirun sweeps of the prune and quantize stages, and their one-line CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import TINY_MODEL, TINY_TRAIN, compose_cfg, run_cli
from micronet import train
from micronet.runs.results import RunDir

PRUNE_TINY = ["prune.every=2", "prune.rounds=2", "train.steps=4", "train.batch_size=2", "train.chunk_len=32",
              "train.eval_every=4", "train.save_every=4", "train.val_tokens=200", "train.eval_chunk_len=64",
              "train.threads=1", "eval_splits=[]"]
QUANT_TINY = ["quant.calib_batches=2", "quant.calib_chunk_len=32", "eval_splits=[]"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def test_a_2x2_sweep_produces_4_scored_directories(results_root, tmp_path):
    train.run(compose_cfg("train", ["name=t", *TINY_MODEL, *TINY_TRAIN]))
    r = run_cli("micronet.prune", "-m", "name=t", "prune=0.239,0.358", *PRUNE_TINY,
                f"hydra.sweep.dir={tmp_path / 'sweep_prune'}", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli("micronet.quantize", "-m", "name=prune0.358_t", "bits=8,9", *QUANT_TINY,
                f"hydra.sweep.dir={tmp_path / 'sweep_quantize'}", env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = {"prune0.239_t": 4, "prune0.358_t": 4,
            "quantize_prune0.358_t_step4_cache0_bits8": 1, "quantize_prune0.358_t_step4_cache0_bits9": 1}
    for name, step in runs.items():
        score = json.loads(RunDir(name).score_path(step).read_text())
        assert score["name"] == name and score["score"] > 0, name
    bits = {json.loads(RunDir(n).score_path(1).read_text())["settings"]["bits"] for n in list(runs)[2:]}
    assert bits == {8, 9}


def test_bad_cli_input_is_one_clear_line(results_root):
    (results_root / "empty").mkdir(parents=True)
    cases = [
        (("micronet.quantize", "name=empty", "bits=1"), "micronet.quantize: error: bits must be an integer in 2..32, got 1"),
        (("micronet.quantize", "name=empty"),
         f"micronet.quantize: error: empty has no usable checkpoint in {results_root / 'empty' / 'models'}"),
        (("micronet.prune", "name=nope", "prune=uniform", "prune.target=0.5"),
         f"micronet.prune: error: no results directory {results_root / 'nope'} (is name=nope right?)"),
        (("micronet.prune", "name=empty", "prune=uniform", "prune.target=1.5"),
         "micronet.prune: error: prune.target (sparsity) must be in [0, 1), got 1.5"),
    ]
    procs = [subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd="/") for args, _ in cases]  # concurrently: start-up dominates
    for p, (args, line) in zip(procs, cases):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 2, (args, err[-1000:])
        assert err.strip().splitlines() == [line], args
