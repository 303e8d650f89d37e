"""Shared fixtures: isolated results root, Hydra compose, a tiny model configuration."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from micronet.runs.paths import CONF_DIR, PROJECT_ROOT

# A model small enough to train a few steps in well under a second on CPU.
TINY_MODEL = [
    "model.d_model=16", "model.n_layer=1", "model.n_head=2", "model.d_head=8", "model.d_ff=32",
    "model.n_seq=8", "model.segment_len=8", "model.cutoffs=[2000,10000]", "model.bin_dims=[16,8,4]",
]
TINY_TRAIN = [
    "train.steps=6", "train.batch_size=2", "train.chunk_len=32", "train.eval_every=3", "train.save_every=2",
    "train.val_tokens=300", "train.eval_chunk_len=64", "optim.warmup_steps=2", "train.threads=1",
]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a 2-core machine: one intra-op thread avoids OpenMP contention; restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def results_root(tmp_path, monkeypatch) -> Path:
    """Every test writes its runs into its own temporary results root."""
    root = tmp_path / "results"
    monkeypatch.setenv("MICRONET_RESULTS", str(root))
    return root


def compose_cfg(config_name: str, overrides: list[str]):
    """The config a stage would receive from the command line."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def load_bench(name: str):
    """Import ``bench/<name>.py`` as a module (the bench folder is not a package; its scripts import
    each other by name, so it goes on sys.path)."""
    import importlib.util

    bench = PROJECT_ROOT / "bench"
    if str(bench) not in sys.path:
        sys.path.insert(0, str(bench))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", bench / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_cli(module: str, *args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m <module> args`` from a neutral working directory."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          cwd="/", env=full_env, timeout=timeout)


@pytest.fixture(scope="session")
def project_root() -> Path:
    return PROJECT_ROOT
