"""Exported models (micronet.release): safetensors + config.json, readable with safetensors alone (the
README's three lines), identical effective weights, the same evaluation; the release stage CLI."""

from __future__ import annotations

import json
import re
import textwrap

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import TINY_MODEL, TINY_TRAIN, compose_cfg, run_cli
from micronet import quantize, train
from micronet.compress.checkpoint import load_model
from micronet.model.evaluation import evaluate_stream
from micronet.compress.export import effective, plain_names, same_weights
from micronet.runs.paths import PROJECT_ROOT
from micronet.compress.release import FORMAT, export_model, load_exported
from micronet.runs.results import RunDir

QUANT_TINY = ["quant.calib_batches=2", "quant.calib_chunk_len=32", "eval_splits=[]"]


def readme_lines() -> str:
    """The README's plain-Python loader: the code block right after its 'safetensors alone' sentence."""
    text = (PROJECT_ROOT / "README.md").read_text()
    block = re.search(r"safetensors\s+alone.*?```python\n(.*?)\n\s*```", text, re.S)
    assert block, "README: no python block after 'safetensors alone'"
    code = textwrap.dedent(block.group(1))
    assert len(code.strip().splitlines()) == 3 and "import micronet" not in code and "from micronet" not in code
    return code


@pytest.fixture
def runs(results_root):
    """A trained run with pruned zeros in one weight, and its 9-bit quantized child."""
    train.run(compose_cfg("train", ["name=t", *TINY_MODEL, *TINY_TRAIN]))
    rd = RunDir("t")
    ckpt = rd.load()
    ckpt["model"]["layers.0.ffn.0.weight"][:, ::2] = 0
    rd.save(6, {k: v for k, v in ckpt.items() if k not in ("step", "format")})
    quantize.run(compose_cfg("quantize", ["name=t", "bits=9", *QUANT_TINY]))
    return rd, RunDir("quantize_t_step6_cache0_bits9")


def test_export_then_safetensors_alone_gives_the_identical_effective_weights(runs, tmp_path, monkeypatch):
    code = readme_lines()
    tokens = np.random.default_rng(0).integers(0, 100, 300)
    for rd in runs:
        model, ckpt = load_model(rd, None)
        out = export_model(rd, None, tmp_path / "exports" / "my_model")
        monkeypatch.chdir(tmp_path)  # the README's path, relative
        ns: dict = {}
        exec(code, ns)  # the README's three lines, verbatim
        dense = ns["w"]
        assert sorted(dense) == plain_names(model)
        for name in plain_names(model):
            assert dense[name].dtype == np.float32 and np.array_equal(dense[name], effective(model, name).numpy()), name
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["format"] == FORMAT and cfg["source"] == {**cfg["source"], "run": rd.name, "step": ckpt["step"]}
        loaded = load_exported(out)
        assert same_weights(model, loaded)
        assert evaluate_stream(loaded, tokens, 64) == evaluate_stream(model.eval(), tokens, 64)
    raw = load_file(str(out / "model.safetensors"))  # the quantized run: codes + scales, not fp32 copies
    assert raw["layers.0.attn.qkv.weight.codes"].dtype == np.int16
    assert raw["layers.0.attn.qkv.weight.scale"].shape == (raw["layers.0.attn.qkv.weight.codes"].shape[0], 1)
    assert cfg["quant"]["bits"] == 9 and len(cfg["quant"]["act_quantizers"]) == 8
    assert cfg["source"]["lineage"]["parent"] == "t"


def test_the_release_stage_writes_the_export(runs, tmp_path):
    out = tmp_path / "rel"
    r = run_cli("micronet.release", "name=t", f"out={out}")
    assert r.returncode == 0, r.stderr
    assert same_weights(load_model(runs[0], None)[0], load_exported(out))
    r = run_cli("micronet.release", "name=nope")
    assert r.returncode == 2 and "no results directory" in r.stderr.strip().splitlines()[-1]
