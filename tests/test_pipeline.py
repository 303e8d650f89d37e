"""The pipeline end to end: every stage of ``lineage=tiny`` through ``python -m micronet.pipeline`` on a
tiny model and corpus, both notebooks, lineage records, skipping finished stages and resuming; plans of
the shipped lineages; refusals."""

from __future__ import annotations

import json
import math
import re
import time

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import compose_cfg, run_cli
from micronet import pipeline
from micronet.runs.config import ConfigError, MicronetError
from micronet.runs.paths import PROJECT_ROOT
from micronet.runs.results import RunDir
from test_notebooks import kernel, outputs, run_notebook, write_tiny_corpus  # noqa: F401 (kernel: a fixture)

TEACHER, STUDENT, PRUNED = "tiny_teacher", "tiny_student", "prune0.358_tiny_student"
QUANT = "quantize_prune0.358_tiny_student_step6_cache50_bits9"


def actions(stdout: str) -> dict[int, str]:
    """Stage number -> ``skipped`` / ``running``, from the pipeline's progress lines."""
    return {int(m[1]): m[2] for m in re.finditer(r"^\[(\d+)/7\] \S+ \S+: (skipped|running)", stdout, re.M)}


def config(name: str) -> dict:
    return yaml.safe_load(RunDir(name).config_path.read_text())


def mtime(path) -> int:
    return path.stat().st_mtime_ns


def rerun(args: list[str], label: str) -> list[str]:
    """The pipeline again, in this process (the command line was tested by the first run): actions by stage."""
    t0 = time.perf_counter()
    rows = pipeline.run(compose_cfg("pipeline", args))
    print(f"{label}: {time.perf_counter() - t0:.1f} s")
    return [r["action"] for r in rows]


def test_tiny_lineage_end_to_end_then_skips_and_resumes(kernel, results_root, tmp_path, monkeypatch):
    monkeypatch.setenv("MICRONET_DATA", str(tmp_path / "data"))
    corpus = tmp_path / "corpus"
    write_tiny_corpus(corpus)
    nb = run_notebook("setup_data.ipynb", {"DATASET": "tiny", "LOCAL_DIR": str(corpus), "VERIFY": False,
                                           "DOWNLOAD": False, "CUTOFFS": (20, 50)}, tmp_path, kernel)
    assert "not listed" in outputs(nb)  # the stages below find this token cache current
    args = ["lineage=tiny", f"lineage.vars.corpus={corpus}"]

    # The dry run writes the configs the stages will write, and runs nothing.
    rows = pipeline.run(compose_cfg("pipeline", [*args, "dry_run=true"]))
    assert [(r["out"], r["action"]) for r in rows] == [
        (TEACHER, "planned"), (TEACHER, "planned"), (STUDENT, "planned"), (PRUNED, "planned"),
        (PRUNED, "planned"), (QUANT, "planned"), (QUANT, "planned")]
    planned = {n: config(n) for n in (TEACHER, STUDENT, PRUNED, QUANT)}
    assert not any(RunDir(n).steps() for n in planned)

    t0 = time.perf_counter()
    r = run_cli("micronet.pipeline", *args)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    out = r.stdout
    print(f"first run: {time.perf_counter() - t0:.1f} s")
    # score_step1.json is written by quantize (after it started), so the score stage finds it done.
    assert actions(out) == {**{i: "running" for i in range(1, 7)}, 7: "skipped"}
    for name in (TEACHER, STUDENT, PRUNED, QUANT):
        assert RunDir(name).exists() and f"\n{name} " in out  # and a line of the runs table
        got = config(name)
        assert "commit" in got.pop("code")
        assert got.pop("corpus", {"raw_dir": str(corpus)})["raw_dir"] == str(corpus)  # train: the corpus used
        assert got == planned[name], name  # the dry run wrote exactly what the stage wrote (minus code)
    assert RunDir(TEACHER).latest_step() == 6 and "lineage" not in planned[TEACHER]
    manifest = RunDir(TEACHER).path / "soft_labels/top4_step6/manifest.json"
    assert json.loads(manifest.read_text())["complete"]
    student = {"stage": "distill", "parent": TEACHER, "parent_step": 6, "parent_lineage": None}
    pruned = {"stage": "prune", "parent": STUDENT, "parent_step": 6, "parent_lineage": student}
    assert config(STUDENT)["lineage"] == student and config(PRUNED)["lineage"] == pruned
    assert config(QUANT)["lineage"] == {"stage": "quantize", "parent": PRUNED, "parent_step": 6,
                                        "parent_lineage": pruned}
    assert RunDir(PRUNED).cache_params_path(6, 50).exists() and RunDir(QUANT).cache_params_path(1, 50).exists()
    score = json.loads(RunDir(QUANT).score_path(1).read_text())
    assert score["settings"]["bits"] == 9 and score["settings"]["n_cache"] == 50
    assert 0 < score["score"] < 1 and math.isfinite(score["test_ppl"])
    assert RunDir(QUANT).packed_path.stat().st_size > 0

    plot = tmp_path / "ppl_vs_score.png"
    nb = run_notebook("evaluate.ipynb", {"RESULTS_ROOT": str(results_root), "SAVE_PLOT": str(plot)}, tmp_path, kernel)
    text = outputs(nb)
    assert f"| {QUANT} | {PRUNED} | 1 |" in text and f"| {STUDENT} | {TEACHER} | 6 |" in text
    assert outputs(nb, "png") == 4 and plot.stat().st_size > 0  # components, ppl vs score, sweep, curves

    # Everything done: nothing runs.
    stamps = {p: mtime(p) for p in (manifest, RunDir(TEACHER).checkpoint_path(6), RunDir(STUDENT).checkpoint_path(6))}
    t0 = time.perf_counter()
    assert rerun(args, "re-run, all done") == ["skipped"] * 7 and time.perf_counter() - t0 < 20

    # A missing score: only the score stage runs.
    RunDir(QUANT).score_path(1).unlink()
    assert rerun(args, "re-run without the score") == ["skipped"] * 6 + ["ran"]
    assert json.loads(RunDir(QUANT).score_path(1).read_text())["score"] == score["score"]

    # An interrupted prune (its last checkpoint lost): prune resumes, the stages after it run again.
    RunDir(PRUNED).checkpoint_path(6).unlink()
    assert rerun(args, "re-run resuming prune") == ["skipped"] * 3 + ["ran"] * 3 + ["skipped"]
    assert f"resumed {RunDir(PRUNED).path} from step 3" in RunDir(PRUNED).log_path("prune").read_text()
    assert RunDir(PRUNED).latest_step() == 6 and all(mtime(p) == t for p, t in stamps.items())
    again = json.loads(RunDir(QUANT).score_path(1).read_text())
    assert mtime(RunDir(QUANT).score_path(1)) > mtime(RunDir(PRUNED).score_path(6))  # re-scored after the prune
    assert math.isfinite(again["score"]) and math.isfinite(again["test_ppl"])


# ----------------------------------------------------------------------------- plans (no training)

ORIGINAL = ["teacher_54M_cache0_hebbian", "teacher_54M_cache0_hebbian", "distill_8.3M_cache2000_hebbian",
            "prune0.358_distill_8.3M_cache2000_hebbian", "prune0.358_distill_8.3M_cache2000_hebbian",
            "quantize_prune0.358_distill_8.3M_cache2000_hebbian_step175000_cache3000_bits9",
            "quantize_prune0.358_distill_8.3M_cache2000_hebbian_step175000_cache3000_bits9"]


def test_original_lineage_plan_has_the_original_names_and_hyperparameters(results_root):
    rows = pipeline.run(compose_cfg("pipeline", ["lineage=original", "dry_run=true"]))
    assert [r["out"] for r in rows] == ORIGINAL
    teacher, student, pruned, quant = (config(n) for n in ORIGINAL[::2])
    assert teacher["model"]["d_model"] == 512 and teacher["hebbian"]["enabled"] and teacher["cache"]["n_cache"] == 0
    assert student["data"]["name"] == "wikitext-103" and student["train"]["batch_size"] == 10
    assert (student["train"]["steps"], student["train"]["chunk_len"], student["cache"]["n_cache"]) == (200000, 1152, 2000)
    assert student["distill"]["teacher"] == "teacher_54M_cache0_hebbian" and student["hebbian"]["enabled"]
    assert student["lineage"]["parent_step"] == 200000
    assert (pruned["prune"]["every"], pruned["prune"]["rounds"], pruned["train"]["steps"]) == (1000, 175, 175000)
    assert (pruned["train"]["batch_size"], pruned["optim"]["lr"]) == (9, 1e-4)
    assert quant["lineage"]["parent_step"] == 175000 and quant["lineage"]["parent_lineage"]["parent_lineage"] == \
        student["lineage"]
    assert compose_cfg("train", ["experiment=8.3M_cache2000_hebbian"]).train.batch_size == 14


@pytest.mark.parametrize("name", ["wt2", "wt2_nodistill", "original_nodistill", "wt2ref"])
def test_shipped_lineages_plan(results_root, name):
    lin = pipeline.load_lineage(compose_cfg("pipeline", [f"lineage={name}"]))
    assert lin.name == name
    steps = pipeline.plan(lin)
    assert [s.kind for s in steps][-4:] == ["prune", "cache_search", "quantize", "score"]
    assert steps[-1].out == steps[-2].out and steps[-2].out.startswith(f"quantize_{steps[-4].out}_step")


@pytest.mark.parametrize("name", ["original", "original_nodistill", "wt2", "wt2_nodistill"])
def test_committed_planned_configs_are_what_the_lineage_generates(results_root, name):
    """results/<run>/config.yaml of a run not started yet is generated from conf/: one source of truth."""
    pipeline.run(compose_cfg("pipeline", [f"lineage={name}", "dry_run=true"]))
    for planned in sorted(results_root.glob("*/config.yaml")):
        committed = PROJECT_ROOT / "results" / planned.parent.name / "config.yaml"
        have = yaml.safe_load(committed.read_text()) if committed.exists() else None
        if have is None or "code" in have:  # not committed, or a real run's own config
            continue
        assert have == yaml.safe_load(planned.read_text()), \
            f"{committed} is stale: regenerate it with python -m micronet.pipeline lineage={name} dry_run=true"


def test_dry_run_leaves_the_config_of_a_run_that_ran_alone(results_root):
    """A run that ran (config.yaml records its code) keeps its config.yaml, even with its checkpoints
    gone (committed results hold none): the plan never rewrites what a run recorded."""
    rd = RunDir(ORIGINAL[0])
    rd.path.mkdir(parents=True)
    own = "train:\n  steps: 7\ncode:\n  commit: abc\n  dirty: false\n"
    rd.config_path.write_text(own)
    pipeline.run(compose_cfg("pipeline", ["lineage=original", "dry_run=true"]))
    assert rd.config_path.read_text() == own


def test_until_stops_after_the_named_run(results_root):
    rows = pipeline.run(compose_cfg("pipeline", ["lineage=tiny", "lineage.vars.corpus=/nowhere", "dry_run=true",
                                                 f"until={STUDENT}"]))
    assert [r["out"] for r in rows] == [TEACHER, TEACHER, STUDENT]
    with pytest.raises(ConfigError, match="no stage of lineage tiny writes results/nope"):
        pipeline.run(compose_cfg("pipeline", ["lineage=tiny", "lineage.vars.corpus=/x", "dry_run=true", "until=nope"]))


def fake_run(name: str, step: int = 5) -> RunDir:
    rd = RunDir(name)
    rd.models_dir.mkdir(parents=True)
    rd.checkpoint_path(step).write_bytes(b"not a checkpoint")
    return rd


def lineage_cfg(*stages: dict):
    return OmegaConf.create({"dry_run": True, "until": None, "lineage": {"name": "x", "stages": list(stages)}})


@pytest.mark.parametrize("stage,match", [
    ({"stage": "prune", "args": ["name=t", "prune=0.358"], "out": "prune0.5_t"},
     "writes results/prune0.358_t, but the lineage says out: prune0.5_t"),
    ({"stage": "score", "args": ["name=nobody"]}, "reads results/nobody, which no earlier stage makes"),
    ({"stage": "distill", "args": ["experiment=wt2_8.3M"]}, "a distill stage needs distill.teacher"),
    ({"stage": "bake", "args": []}, "unknown stage 'bake'"),
    ({"stage": "score", "args": ["nam=t"]}, r"lineage stage 1 \(score nam=t\): Could not override 'nam'"),
])
def test_bad_lineages_are_refused_before_anything_runs(results_root, stage, match):
    fake_run("t")
    with pytest.raises(ConfigError, match=match):
        pipeline.run(lineage_cfg(stage))


def test_a_failing_stage_stops_the_pipeline_with_one_line(results_root):
    fake_run("t")  # a damaged checkpoint: the score stage fails
    cfg = lineage_cfg({"stage": "score", "args": ["name=t"]})
    cfg.dry_run = False
    with pytest.raises(MicronetError, match=r"stage 1/1 \(score -> results/t\) failed with exit code 2"):
        pipeline.run(cfg)


def test_configs_of_started_runs_are_never_rewritten(results_root):
    rd = fake_run("t")
    rd.config_path.write_text("name: t\ntrain: {steps: 5}\n")
    assert pipeline.write_config("t", {"name": "t", "train": {"steps": 5}}) == "up to date"
    assert "DIFFERS" in pipeline.write_config("t", {"name": "t", "train": {"steps": 7}})
    assert rd.config_path.read_text() == "name: t\ntrain: {steps: 5}\n"
    assert pipeline.write_config("u", {"name": "u"}) == "written" and config("u") == {"name": "u"}
    assert pipeline.write_config("u", {"name": "u", "x": 1}) == "rewritten (changed: x)"
