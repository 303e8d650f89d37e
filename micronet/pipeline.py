"""One command for a whole lineage: teacher -> soft labels -> distill -> prune -> cache search -> quantize -> score.

    python -m micronet.pipeline lineage=<name> [dry_run=true] [until=<results name>]

A lineage, ``conf/lineage/<name>.yaml``, lists stages in order; each is the command line of one stage::

    name: wt2                               # = the file name
    description: ...
    vars: {}                                # free values for ${lineage.vars.<key>} in args
    stages:
      - stage: train                        # train | distill | soft_labels | prune | cache_search | quantize
        args: [experiment=wt2_teacher]      #   | score | evaluate; args: Hydra overrides, as on the command line
      - stage: prune
        args: [name=distill_wt2_8.3M, prune=0.358]
        out: prune0.358_distill_wt2_8.3M    # optional: the results dir it writes, checked

``distill`` is the train stage with ``distill.teacher`` set. Every stage's config is composed up front
(a typo in the last stage fails before the first one trains); the results dir each stage writes follows
from its config by the stage's own naming rule, and each stage must read a run that an earlier stage
makes or that exists.

A stage is skipped when its outputs are complete (train/distill: newest checkpoint at ``train.steps``;
soft labels: manifest complete; prune: final checkpoint and its score; cache search: the yaml; quantize:
``quantize_step<S>.json``, written after its score; score/evaluate: their json) and newer than any
rewrite, earlier in this invocation, of the run it reads. Otherwise it runs as ``python -m
micronet.<module> <args>`` in a subprocess (own memory and signal handling; its one-line error shows
above the pipeline's) and resumes itself. Meanwhile the pipeline ignores SIGINT (Ctrl-C reaches the
stage through the process group; it saves and exits 130, and so does the pipeline) and forwards SIGTERM.

``dry_run=true`` runs nothing: it prints each stage's state and command and writes the resolved
``config.yaml`` of every run the lineage creates (train, distill, prune, quantize: what the stage itself
writes, minus its run records ``code`` and ``corpus``) into ``results/<name>/``. The lineage and
experiment files are the one source of truth; those files are generated from them. A config.yaml of a
run with checkpoints is never rewritten (a difference is reported instead).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml
from omegaconf import DictConfig, OmegaConf

from micronet.report.data_setup import format_table
from micronet.report.runs import collect_runs, runs_table
from micronet.runs.cli import stage_main
from micronet.runs.config import MicronetError, typed
from micronet.runs.results import RUN_RECORDS, GuardError, RunDir, atomic_write_text
from micronet.stagekit.plan import MODULES, Step, load_lineage, plan


@dataclass
class PipelineConfig:
    """Top-level keys of ``conf/pipeline.yaml``."""

    dry_run: bool = False
    until: str | None = None  # stop after the last stage that writes results/<until>/


@contextlib.contextmanager
def _child_signals(proc: subprocess.Popen) -> Iterator[None]:
    """Ctrl-C reaches the child through the process group: ignore it here; forward SIGTERM."""
    def forward(signum: int, frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    try:
        old = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
               signal.SIGTERM: signal.signal(signal.SIGTERM, forward)}
    except ValueError:  # not the main thread: leave signals alone
        old = {}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run_stage(step: Step, n: int) -> None:
    """``python -m micronet.<module> <args>`` in a subprocess; its exit code becomes ours."""
    proc = subprocess.Popen([sys.executable, "-m", f"micronet.{MODULES[step.kind]}", *step.args])
    with _child_signals(proc):
        rc = proc.wait()
    if rc == 0:
        return
    if rc in (130, -signal.SIGINT):
        raise KeyboardInterrupt
    what = f"stage {step.index}/{n} ({step.kind} -> results/{step.out})"
    if rc in (143, -signal.SIGTERM):
        print(f"micronet.pipeline: {what} was terminated; run the pipeline again to resume", file=sys.stderr)
        sys.exit(143)
    raise MicronetError(f"{what} failed with exit code {rc} (its error is above): {step.command}")


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _changed_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in sorted(set(a) | set(b), key=str) for k in _changed_keys(a.get(key), b.get(key),
                                                                                      f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]


def write_config(name: str, content: dict) -> str:
    """Write ``results/<name>/config.yaml`` as planned unless the run has started; returns what happened."""
    rd = RunDir(name)
    old = None
    if rd.config_path.exists():
        try:
            old = yaml.safe_load(rd.config_path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            old = {"damaged": True}
        ran = "code" in old  # the config.yaml of a run that ran (its checkpoints may not be here)
        for key in RUN_RECORDS:
            old.pop(key, None)
        if old == content:
            return "up to date"
        keys = ", ".join(_changed_keys(old, content)[:6])
        if rd.steps() or ran:
            return f"DIFFERS from the planned config ({keys}); the run has started, so it is left alone"
    try:
        with rd.guard("pipeline"):
            if rd.steps():  # the run started since we looked
                return "left alone (the run has started)"
            atomic_write_text(rd.config_path, OmegaConf.to_yaml(content))
    except GuardError as e:
        return f"not written: {e}"
    return "written" if old is None else f"rewritten (changed: {keys})"


def _summary(steps: list[Step], rows: list[dict]) -> None:
    cols = [("index", "#", str), ("kind", "stage", str), ("out", "results", str), ("state", "state before", str),
            ("action", "action", str), ("seconds", "seconds", lambda x: f"{x:.1f}")]
    print("\n" + format_table(rows, cols, "text"))
    names = [n for n in dict.fromkeys(s.out for s in steps) if RunDir(n).exists()]
    if names:
        print("\n" + runs_table(collect_runs(names), fmt="text"), flush=True)


def run(cfg: DictConfig) -> list[dict]:
    """Run (or with ``dry_run``, plan) a lineage; returns one row per stage (state, action, seconds)."""
    pc = typed(PipelineConfig, {k: cfg.get(k) for k in ("dry_run", "until") if k in cfg}, "pipeline")
    lin = load_lineage(cfg)
    steps = plan(lin, pc.until)
    n = len(steps)
    print(f"lineage {lin.name}: {lin.description or ''} ({n} stages{', dry run' if pc.dry_run else ''})", flush=True)
    rows: list[dict] = []
    started: dict[str, float] = {}  # results name -> when the latest stage that wrote it (this invocation) began
    t_all = time.perf_counter()
    for st in steps:
        head = f"[{st.index}/{n}] {st.kind} {st.out}"
        complete, state = st.check()
        row = {"index": st.index, "kind": st.kind, "out": st.out, "state": "done" if complete else state,
               "action": "", "seconds": 0.0}
        rows.append(row)
        if pc.dry_run:
            note = f"; config.yaml {write_config(st.out, st.config())}" if st.config is not None else ""
            row["action"] = "planned"
            print(f"{head}: {row['state']}{note}\n    {st.command}", flush=True)
            continue
        # Outputs older than a rewrite of what the stage reads (earlier in this invocation) are stale.
        stale = [r for r in st.reads if r in started and _mtime(st.marker()) < started[r]] if complete else []
        if complete and not stale:
            row["action"] = "skipped"
            print(f"{head}: skipped (done)", flush=True)
            continue
        if stale:
            row["state"] = f"done before results/{', '.join(stale)} changed"
        print(f"{head}: running ({row['state']}): {st.command}", flush=True)
        t0, started[st.out] = time.perf_counter(), time.time()
        run_stage(st, n)
        row["seconds"], row["action"] = time.perf_counter() - t0, "ran"
        complete, state = st.check()
        if not complete:
            raise MicronetError(f"stage {st.index}/{n} ({st.kind} -> results/{st.out}) stopped at {state}; "
                                f"run the pipeline again to continue")
    _summary(steps, rows)
    if not pc.dry_run:
        print(f"lineage {lin.name}: {n} stages in {time.perf_counter() - t_all:.1f} s", flush=True)
    return rows


main = stage_main("pipeline", run)

if __name__ == "__main__":
    main()
