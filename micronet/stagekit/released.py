"""Released models: ``release/<name>/`` (safetensors weights + config.json) and ``release/MANIFEST.json``.

    publish("wt2ref_8.3M", "best", "wt2ref_8.3M", n_cache=2000)   # python -m micronet.release name=... publish=...
    require_run("wt2ref_8.3M")   # results/<name>/ rebuilt from release/<name>/ when absent (every stage does this)

A released model is a run's checkpoint without optimizer state. Any stage given its name finds it:
:func:`require_run` writes ``results/<name>/`` (config.yaml, one checkpoint of the dense weights, the
searched cache parameters) from the release the first time, so evaluate, score, cache_search, prune,
quantize, sensitivity and soft_labels read it as a trained run. A quantized release ships its bit-packed
``packed.safetensors`` and becomes a quantized run (:func:`micronet.compress.release.quantized_state`,
checked bit-identical to the export), so evaluate, cache_search and score take it too.

The manifest lists per model: ``name``, ``files`` (path, bytes, sha256), ``params``, ``parent``, ``step``,
``valid_ppl`` / ``test_ppl`` (full split, batch-1 online, with ``n_cache``; ``*_no_cache`` without), ``score_paper`` /
``score_strict``, ``command`` (evaluates it on the test split right after install) with ``eval_json``
(where that command writes), and ``ci_check``: the ppl of the first ``tokens`` test tokens without a
cache, which ``tests/test_release_manifest.py`` recomputes from the released files.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from micronet.compress.checkpoint import load_model
from micronet.compress.release import CONFIG, WEIGHTS, dense_weights, export_model, load_exported, quantized_state
from micronet.data.corpus import DataConfig, load_corpus
from micronet.data.fetch import sha256_file
from micronet.model.evaluation import evaluate_stream
from micronet.model.transformer import count_parameters
from micronet.runs.config import MicronetError, typed
from micronet.runs.paths import release_root
from micronet.runs.results import RunDir, atomic_write_text, write_json

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
CI_TOKENS = 2000  # test tokens of the manifest's ci_check (small enough for CI)


def read_manifest(root: Path | None = None) -> dict:
    """``release/MANIFEST.json`` (``{"models": []}`` when there is none yet)."""
    path = (root or release_root()) / MANIFEST
    if not path.exists():
        return {"models": []}
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise MicronetError(f"{path} is damaged ({e}); restore it from git") from None


def slice_ppl(folder: Path, tokens: int = CI_TOKENS) -> float:
    """Perplexity of the released model in ``folder`` on the first ``tokens`` predictions of its corpus'
    test split: batch-1 online, fp32, no cache (the manifest's ``ci_check``)."""
    cfg = json.loads((folder / CONFIG).read_text())
    corpus = load_corpus(typed(DataConfig, cfg.get("data_config") or {}, "data"), progress=False)
    model = load_exported(folder)
    nll, n = evaluate_stream(model, corpus.test[: tokens + 1], chunk_len=512, device="cpu", desc="ci check")
    return math.exp(nll / n)


def publish(run: str, step: int | str | None, name: str, n_cache: int = 0, root: Path | None = None) -> dict:
    """Release ``run``'s checkpoint ``step`` as ``release/<name>/`` and (re)write its manifest entry."""
    root = root or release_root()
    rd = RunDir(run).require()
    step = rd.resolve_step(step)
    step = int(step if step is not None else rd.latest_step())
    folder = root / name
    if folder.exists():
        shutil.rmtree(folder)  # a release is rewritten whole, never patched
    export_model(rd, step, folder, packed=True)
    files = [json.loads((folder / CONFIG).read_text())["weights"], CONFIG]
    if n_cache:
        src = rd.cache_params_path(step, n_cache)
        if not src.exists():
            raise MicronetError(f"{run} has no {src.name}: run python -m micronet.cache_search name={run} "
                                f"step={step} n_cache={n_cache} first")
        shutil.copyfile(src, folder / src.name)
        files.append(src.name)
    ev = json.loads(rd.eval_path(step, n_cache).read_text()) if rd.eval_path(step, n_cache).exists() else {}
    ev0 = json.loads(rd.eval_path(step).read_text()) if rd.eval_path(step).exists() else {}  # without a cache
    sc = json.loads(rd.score_path(step).read_text()) if rd.score_path(step).exists() else {}
    if sc and (sc.get("settings") or {}).get("n_cache", n_cache) != n_cache:
        sc = {}  # a score of another cache size is not this release's
    model, ckpt = load_model(rd, step)
    eval_json = f"results/{name}/{rd.eval_path(step, n_cache).name}"
    entry = {
        "name": name, "files": [{"path": f"{name}/{f}", "bytes": (folder / f).stat().st_size,
                                 "sha256": sha256_file(folder / f)} for f in files],
        "params": count_parameters(model), "source_run": run, "step": step,
        "parent": (ckpt.get("lineage") or {}).get("parent"), "n_cache": n_cache,
        "valid_ppl": (ev.get("valid") or {}).get("ppl"), "test_ppl": (ev.get("test") or {}).get("ppl"),
        "valid_ppl_no_cache": (ev0.get("valid") or {}).get("ppl"), "test_ppl_no_cache": (ev0.get("test") or {}).get("ppl"),
        "score_paper": ((sc.get("conventions") or {}).get("paper") or {}).get("score"),
        "score_strict": ((sc.get("conventions") or {}).get("strict") or {}).get("score"),
        "command": f"python -m micronet.evaluate name={name} splits=[test]" + (f" n_cache={n_cache}" if n_cache else ""),
        "eval_json": eval_json,
        "ci_check": {"split": "test", "tokens": CI_TOKENS, "n_cache": 0, "ppl": slice_ppl(folder)},
    }
    manifest = read_manifest(root)
    manifest["models"] = [m for m in manifest["models"] if m["name"] != name] + [entry]
    manifest["note"] = ("valid_ppl/test_ppl: full split, batch-1 online, with n_cache; ci_check: first tokens of the "
                        "test split, no cache, fp32; eval_json: where command writes, relative to the checkout")
    write_json(root / MANIFEST, manifest)
    log.info("released %s step %d as %s (%s)", run, step, folder, ", ".join(f["path"] for f in entry["files"]))
    return entry


def materialise(name: str, root: Path | None = None) -> RunDir | None:
    """``results/<name>/`` from ``release/<name>/`` when the run has no checkpoint and the release exists.

    A committed results folder of the released run (config.yaml, eval and score files, no checkpoint)
    gains the checkpoint; files it already has are left as they are.
    """
    rd, folder = RunDir(name), (root or release_root()) / name
    if rd.steps() or not (folder / CONFIG).exists():
        return None
    cfg = json.loads((folder / CONFIG).read_text())
    src = cfg.get("source") or {}
    step = int(src.get("step", 0))
    lineage = {"stage": "release", "parent": src.get("run"), "parent_step": step,
               "parent_lineage": src.get("lineage")}
    ckpt = {"step": step, "model_config": cfg["model_config"], "cache_config": cfg["cache_config"],
            "data_config": cfg.get("data_config") or {}, "lineage": lineage,
            "released": {"name": name, "sha256": sha256_file(folder / cfg.get("weights", WEIGHTS))}}
    if cfg.get("quant"):  # the quantized run's structure (masks, quantizers) rebuilt around the packed codes
        ckpt["model"], ckpt["quant"] = quantized_state(folder)
    else:
        ckpt["model"] = dense_weights(folder)
    with rd.guard("release"):
        rd.save(step, ckpt)
        for f in folder.glob("cache_step*_n*.yaml"):
            if not (rd.path / f.name).exists():
                shutil.copyfile(f, rd.path / f.name)
        if not rd.config_path.exists():
            conf = {"name": name, "released": str(folder), "model": cfg["model_config"], "data": ckpt["data_config"],
                    "lineage": lineage}
            atomic_write_text(rd.config_path, OmegaConf.to_yaml(conf))
    log.info("results/%s rebuilt from the released model %s", name, folder)
    return rd


def require_run(name: str) -> RunDir:
    """:meth:`RunDir.require`, rebuilding the run from ``release/<name>/`` first if it is a released model."""
    materialise(name)
    return RunDir(name).require()


def withdraw(name: str, root: Path | None = None) -> None:
    """Remove ``release/<name>/`` and its manifest entry (a model the budget no longer holds; git keeps it)."""
    root = root or release_root()
    manifest = read_manifest(root)
    if not any(m["name"] == name for m in manifest["models"]):
        raise MicronetError(f"{root / MANIFEST} lists no model {name!r}")
    shutil.rmtree(root / name, ignore_errors=True)
    manifest["models"] = [m for m in manifest["models"] if m["name"] != name]
    write_json(root / MANIFEST, manifest)
    log.info("withdrew the released model %s", name)


def check_release_files(root: Path | None = None) -> list[str]:
    """Problems with the manifest's files (missing, other sha256); empty when all is well."""
    root = root or release_root()
    bad = []
    for m in read_manifest(root)["models"]:
        for f in m["files"]:
            p = root / f["path"]
            if not p.is_file():
                bad.append(f"{p} is missing")
            elif sha256_file(p) != f["sha256"]:
                bad.append(f"{p}: sha256 differs from the manifest's")
    return bad

