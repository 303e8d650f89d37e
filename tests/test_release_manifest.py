"""Released models: the shipped release/MANIFEST.json holds what its files give, and a released model
is a parent every stage accepts."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import TINY_MODEL, TINY_TRAIN, compose_cfg
from test_prune import PRUNE_TINY
from micronet import cache_search, evaluate, prune, quantize, release, score, train
from micronet.compress.checkpoint import load_model
from micronet.compress.export import same_weights
from micronet.runs.config import MicronetError
from micronet.runs.paths import PROJECT_ROOT, release_root
from micronet.runs.results import RunDir
from micronet.stagekit.released import check_release_files, read_manifest, slice_ppl

SHIPPED = read_manifest(PROJECT_ROOT / "release")["models"]


@pytest.mark.skipif(not SHIPPED, reason="release/MANIFEST.json lists no model yet")
@pytest.mark.parametrize("entry", SHIPPED, ids=[m["name"] for m in SHIPPED])
def test_shipped_release_matches_its_manifest(entry):
    root = PROJECT_ROOT / "release"
    assert check_release_files(root) == []
    assert slice_ppl(root / entry["name"], entry["ci_check"]["tokens"]) == pytest.approx(entry["ci_check"]["ppl"],
                                                                                          rel=1e-4)
    assert sum(f["bytes"] for m in SHIPPED for f in m["files"]) <= 40 * 2**20  # the repository's budget


@pytest.mark.skipif(not SHIPPED, reason="release/MANIFEST.json lists no model yet")
def test_readme_release_figures_are_the_manifests():
    readme = (PROJECT_ROOT / "README.md").read_text()
    for m in SHIPPED:
        row = next((line for line in readme.splitlines() if line.startswith(f"| {m['name']} |")), None)
        assert row is not None, f"README has no release row for {m['name']}"
        for key in ("valid_ppl", "test_ppl"):
            if m[key] is not None:
                assert f"{m[key]:.2f}" in row, (key, row)
        assert m["command"] in readme


def test_publish_then_every_stage_takes_the_released_model(results_root, tmp_path, monkeypatch):
    monkeypatch.setenv("MICRONET_RELEASE", str(tmp_path / "release"))
    train.run(compose_cfg("train", ["name=t", *TINY_MODEL, *TINY_TRAIN]))
    cache_search.run(compose_cfg("cache_search", ["name=t", "n_cache=20", "val_tokens=200", "chunk_len=64"]))
    ev = evaluate.run(compose_cfg("evaluate", ["name=t", "chunk_len=64", "n_cache=20"]))
    score.run(compose_cfg("score", ["name=t", "n_cache=20"]))
    release.run(compose_cfg("release", ["name=t", "step=best", "publish=tiny", "n_cache=20"]))

    (entry,) = read_manifest()["models"]
    assert entry["name"] == "tiny" and entry["step"] == 6 and entry["source_run"] == "t"
    assert entry["valid_ppl"] == ev["valid"]["ppl"] and entry["test_ppl"] == ev["test"]["ppl"]
    assert entry["score_paper"] is not None and entry["score_strict"] is not None and entry["params"] > 0
    assert {f["path"] for f in entry["files"]} == {"tiny/model.safetensors", "tiny/config.json",
                                                  "tiny/cache_step6_n20.yaml"} and entry["n_cache"] == 20
    assert check_release_files() == []
    (release_root() / "tiny" / "config.json").write_text((release_root() / "tiny" / "config.json").read_text() + " ")
    assert check_release_files() == [f"{release_root() / 'tiny' / 'config.json'}: sha256 differs from the manifest's"]
    (release_root() / "tiny" / "config.json").write_text((release_root() / "tiny" / "config.json").read_text()[:-1])

    # A fresh clone: the run's checkpoints are gone (a committed results folder holds its small files only);
    # the manifest's command evaluates the released model.
    shutil.rmtree(RunDir("t").path)
    RunDir("tiny").path.mkdir()
    (RunDir("tiny").path / "config.yaml").write_text("committed: true\n")
    cmd = entry["command"].split()
    assert cmd[:3] == ["python", "-m", "micronet.evaluate"]
    out = evaluate.run(compose_cfg("evaluate", [*cmd[3:], "chunk_len=64"]))
    assert out["test"]["ppl"] == pytest.approx(ev["test"]["ppl"], rel=1e-6)
    assert (PROJECT_ROOT / entry["eval_json"]).name == RunDir("tiny").eval_path(6, 20).name
    assert RunDir("tiny").eval_path(6, 20).exists()  # with the released lambda/theta of cache 20
    assert (RunDir("tiny").path / "config.yaml").read_text() == "committed: true\n"  # left as it was
    assert RunDir("tiny").best_step() == 6  # released at its best step; its training log did not ship
    sc = score.run(compose_cfg("score", ["name=tiny", "step=best", "n_cache=20"]))
    assert sc["test_ppl"] == out["test"]["ppl"]
    # ... and is a parent: prune it.
    prune.run(compose_cfg("prune", ["name=tiny", "prune='0.358'", *PRUNE_TINY]))
    assert RunDir("prune0.358_tiny").steps() == [3, 6]


def test_a_quantized_release_ships_packed_and_is_a_run_again(results_root, tmp_path, monkeypatch):
    """prune -> quantize (9 bits) -> publish: the release holds packed.safetensors (no dense int16 codes);
    after the runs are gone, the manifest's command evaluates it to the quantize run's ppl, the score is the
    same, and the rebuilt run's effective weights are the quantize run's, bit for bit."""
    monkeypatch.setenv("MICRONET_RELEASE", str(tmp_path / "release"))
    train.run(compose_cfg("train", ["name=t", *TINY_MODEL, *TINY_TRAIN]))
    prune.run(compose_cfg("prune", ["name=t", "prune='0.358'", *PRUNE_TINY]))
    q = "quantize_prune0.358_t_step6_cache0_bits9"
    quantize.run(compose_cfg("quantize", ["name=prune0.358_t", "bits=9", "quant.calib_batches=2",
                                          "quant.calib_chunk_len=32", "eval_splits=[test]", "eval_chunk_len=64"]))
    ev = json.loads(RunDir(q).eval_path(1).read_text())
    sc = json.loads(RunDir(q).score_path(1).read_text())
    original, _ = load_model(RunDir(q), 1)
    release.run(compose_cfg("release", ["name=" + q, "publish=tq"]))
    (entry,) = read_manifest()["models"]
    assert {f["path"] for f in entry["files"]} == {"tq/packed.safetensors", "tq/config.json"}
    assert entry["test_ppl"] == ev["test"]["ppl"] and entry["parent"] == "prune0.358_t"
    assert entry["score_paper"] == sc["conventions"]["paper"]["score"]
    assert entry["ci_check"]["ppl"] == pytest.approx(slice_ppl(release_root() / "tq"), rel=1e-6)

    for name in ("t", "prune0.358_t", q):
        shutil.rmtree(RunDir(name).path)
    cmd = entry["command"].split()
    out = evaluate.run(compose_cfg("evaluate", [*cmd[3:], "chunk_len=64"]))
    assert out["test"]["ppl"] == pytest.approx(ev["test"]["ppl"], rel=1e-6)
    rebuilt, ckpt = load_model(RunDir("tq"), None)
    assert ckpt["quant"]["bits"] == 9 and same_weights(rebuilt, original)
    rescored = score.run(compose_cfg("score", ["name=tq"]))
    assert rescored["conventions"]["paper"]["score"] == pytest.approx(sc["conventions"]["paper"]["score"], rel=1e-12)

    release.run(compose_cfg("release", ["name=tq", "withdraw=true"]))
    assert read_manifest()["models"] == [] and not (release_root() / "tq").exists()
    with pytest.raises(MicronetError, match="lists no model 'tq'"):
        release.run(compose_cfg("release", ["name=tq", "withdraw=true"]))
