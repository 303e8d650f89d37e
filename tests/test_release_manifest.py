"""Released models: the shipped release/MANIFEST.json holds what its files give, and a released model
is a parent every stage accepts."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from conftest import TINY_MODEL, TINY_TRAIN, compose_cfg
from test_prune import PRUNE_TINY
from micronet import cache_search, evaluate, prune, release, score, train
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
    sc = score.run(compose_cfg("score", ["name=tiny", "n_cache=20"]))
    assert sc["test_ppl"] == out["test"]["ppl"]
    # ... and is a parent: prune it.
    prune.run(compose_cfg("prune", ["name=tiny", "prune='0.358'", *PRUNE_TINY]))
    assert RunDir("prune0.358_tiny").steps() == [3, 6]


def test_a_quantized_release_is_refused_as_a_run_in_one_line(results_root, tmp_path, monkeypatch):
    monkeypatch.setenv("MICRONET_RELEASE", str(tmp_path / "release"))
    folder = tmp_path / "release" / "q"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"format": "micronet-model-1", "quant": {"bits": 9}}))
    with pytest.raises(MicronetError, match=re.escape("release/q is a quantized model")):
        evaluate.run(compose_cfg("evaluate", ["name=q"]))
    assert not RunDir("q").exists()
