"""Planning a lineage (``conf/lineage/<name>.yaml``) for the pipeline stage, :mod:`micronet.pipeline`.

Every stage's config is composed up front (a typo in the last stage fails before the first one
trains); the results dir each stage writes follows from its config by the stage's own naming rule
(:mod:`micronet.runs.lineage`), and each stage must read a run that an earlier stage makes or that
exists. :class:`Step` knows, per planned stage, when its outputs are complete and which file says so.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from micronet.runs.cli import normalize_argv
from micronet.runs.config import ConfigError, typed
from micronet.runs.lineage import lineage, pruned_name, quantized_name
from micronet.runs.paths import CONF_DIR
from micronet.runs.results import RunDir, searched_caches
from micronet.training.soft_labels import read_manifest, soft_label_dir

MODULES = {"train": "train", "distill": "train", "soft_labels": "soft_labels", "prune": "prune",
           "cache_search": "cache_search", "quantize": "quantize", "score": "score", "evaluate": "evaluate"}


@dataclass
class StageSpec:
    """One entry of a lineage's ``stages``."""

    stage: str = "???"
    args: list[str] = field(default_factory=list)
    out: str | None = None  # the results dir it writes; checked when given


@dataclass
class LineageConfig:
    """The ``lineage`` node (``conf/lineage/<name>.yaml``)."""

    name: str = "???"
    description: str = ""
    vars: dict[str, Any] = field(default_factory=dict)
    stages: list[StageSpec] = field(default_factory=list)


@dataclass
class Step:
    """A planned stage: its composed config, the results dir it writes and how to tell it is done."""

    index: int
    kind: str
    args: list[str]
    cfg: DictConfig
    out: str
    reads: list[str]
    check: Callable[[], tuple[bool, str]]  # -> (complete, state), evaluated when asked
    marker: Callable[[], Path]  # the file whose presence (and mtime) says the stage is done
    config: Callable[[], dict] | None = None  # the config.yaml the stage writes (minus its run records, ``RUN_RECORDS``)

    @property
    def command(self) -> str:
        return shlex.join(["python", "-m", f"micronet.{MODULES[self.kind]}", *self.args])


def compose_stage(config_name: str, overrides: list[str]) -> DictConfig:
    """A stage's config as its command line would compose it; also works inside a running ``@hydra.main``."""
    gh = GlobalHydra.instance()
    running = gh.hydra
    gh.clear()  # compose needs its own initialisation; the running app's is put back below
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name=config_name, overrides=overrides)
    finally:
        GlobalHydra.instance().hydra = running


class Plan:
    """The stages planned so far and what they will have made (final steps, searched caches)."""

    def __init__(self) -> None:
        self.steps: list[Step] = []
        self.final: dict[str, int] = {}  # results name -> the checkpoint step its run ends at
        self.caches: dict[tuple[str, int], set[int]] = {}  # (results name, step) -> searched n_cache

    def makes(self, name: str) -> bool:
        return any(s.out == name for s in self.steps)

    def step_of(self, name: str, step: Any) -> int | None:
        """``step`` if given, else the run's planned final step, else its newest checkpoint on disk.

        ``best`` is the run's best-validation checkpoint once the run has validations on disk; before
        that the plan can only name its final step (the pipeline plans again when it runs).
        """
        if step == "best":
            rd = RunDir(name)
            if rd.train_csv.exists() and rd.steps():
                return rd.best_step()
            step = None
        elif step == "latest":
            step = None
        if step is not None:
            return int(step)
        return self.final[name] if name in self.final else RunDir(name).latest_step()


def _resolved(cfg: DictConfig, **extra: Any) -> Callable[[], dict]:
    return lambda: {**OmegaConf.to_container(cfg, resolve=True), **{k: f() for k, f in extra.items()}}


def _need_step(plan: Plan, name: str, step: Any, where: str) -> int:
    s = plan.step_of(name, step)
    if s is None:
        raise ConfigError(f"{where}: results/{name} has no checkpoint and no earlier stage trains it")
    return s


def plan_step(index: int, spec: StageSpec, plan: Plan) -> Step:
    """Compose stage ``spec`` and work out what it writes, reads and when it is complete."""
    where = f"lineage stage {index} ({spec.stage} {' '.join(spec.args)})"
    if spec.stage not in MODULES:
        raise ConfigError(f"{where}: unknown stage {spec.stage!r}; expected one of {', '.join(MODULES)}")
    kind, module = spec.stage, MODULES[spec.stage]
    try:
        cfg = compose_stage(module, normalize_argv(spec.args) if module == "prune" else list(spec.args))
        name = str(cfg.name)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"{where}: {str(e).splitlines()[0]}") from None
    teacher = OmegaConf.select(cfg, "distill.teacher") if module == "train" else None
    if kind == "distill" and not teacher:
        raise ConfigError(f"{where}: a distill stage needs distill.teacher (e.g. distill=wt2)")
    reads, config = ([teacher] if teacher else []) if module == "train" else [name], None
    for r in reads:
        if not plan.makes(r) and not RunDir(r).exists():
            raise ConfigError(f"{where}: reads results/{r}, which no earlier stage makes and which does not exist")
    if module == "train":
        out, final = name, int(cfg.train.steps)
        steps = final  # (the closures below read ``steps``)
        if teacher:
            tstep = _need_step(plan, teacher, cfg.distill.step, where)
            config = _resolved(cfg, lineage=lambda: lineage("distill", RunDir(teacher), tstep))
        else:
            config = _resolved(cfg)

        def check() -> tuple[bool, str]:
            last = RunDir(out).latest_step()
            return last is not None and last >= steps, f"step {last or 0}/{steps}"

        def marker() -> Path:
            return RunDir(out).checkpoint_path(RunDir(out).latest_step() or 0)
    elif kind == "soft_labels":
        out, final, topk = name, None, int(cfg.topk)
        s = _need_step(plan, name, cfg.step, where)

        def check() -> tuple[bool, str]:
            m = read_manifest(soft_label_dir(RunDir(name), topk, s))
            return bool(m and m.get("complete")), f"rows {m['rows_done']}/{m['tokens']}" if m else "not started"

        def marker() -> Path:
            return soft_label_dir(RunDir(name), topk, s) / "manifest.json"
    elif kind == "prune":
        out, steps = pruned_name(str(cfg.prune.name), name), int(cfg.train.steps)
        final, pstep = steps, _need_step(plan, name, cfg.step, where)
        config = _resolved(cfg, lineage=lambda: lineage("prune", RunDir(name), pstep))

        def check() -> tuple[bool, str]:
            rd = RunDir(out)
            last, scored = rd.latest_step(), rd.score_path(steps).exists()
            return last is not None and last >= steps and scored, \
                f"step {last or 0}/{steps}" + ("" if scored or (last or 0) < steps else ", not scored")

        def marker() -> Path:
            return RunDir(out).score_path(steps)
    elif kind == "cache_search":
        out, final, n = name, None, int(cfg.n_cache)
        s = _need_step(plan, name, cfg.step, where)
        plan.caches.setdefault((name, s), set()).add(n)

        def marker() -> Path:
            return RunDir(name).cache_params_path(s, n)

        def check() -> tuple[bool, str]:
            return marker().exists(), f"{marker().name} {'written' if marker().exists() else 'missing'}"
    elif kind == "quantize":
        pstep = _need_step(plan, name, cfg.step, where)
        searched = plan.caches.get((name, pstep), set()) | set(searched_caches(RunDir(name), pstep))
        n = int(cfg.n_cache) if cfg.n_cache is not None else max(searched, default=0)
        out, final = quantized_name(name, pstep, n, int(cfg.bits)), max(int(cfg.quant.steps), 1)
        config = _resolved(cfg, lineage=lambda: lineage("quantize", RunDir(name), pstep))

        def marker() -> Path:
            return RunDir(out).quantize_path(final)

        def check() -> tuple[bool, str]:
            done = marker().exists()
            return done, f"step {RunDir(out).latest_step() or 0}/{final}, {'summary written' if done else 'no summary'}"
    elif kind in ("score", "evaluate"):
        out, final = name, None
        s = _need_step(plan, name, cfg.step, where)
        path = RunDir(name).score_path(s) if kind == "score" else RunDir(name).eval_path(s, int(cfg.n_cache))
        splits = [] if kind == "score" else list(cfg.splits)

        def marker() -> Path:
            return path

        def check() -> tuple[bool, str]:
            try:
                have = json.loads(path.read_text()) if path.exists() else None
            except (OSError, ValueError):
                have = None
            done = isinstance(have, dict) and all(sp in have for sp in splits)
            return done, f"{path.name} {'written' if done else 'missing'}"
    if spec.out and spec.out != out:
        raise ConfigError(f"{where}: writes results/{out}, but the lineage says out: {spec.out}")
    if final is not None:
        plan.final[out] = final
    step = Step(index, kind, list(spec.args), cfg, out, reads, check, marker, config)
    plan.steps.append(step)
    return step


def load_lineage(cfg: DictConfig) -> LineageConfig:
    """The typed, resolved ``lineage`` node (``${lineage.vars.x}`` interpolations filled in)."""
    node = cfg.get("lineage")
    if node is None:
        raise ConfigError("lineage=<name> is required (conf/lineage/*.yaml)")
    try:
        raw = OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        key = f"lineage.{e.full_key}" if e.full_key and not str(e.full_key).startswith("lineage") else e.full_key
        raise ConfigError(f"{key} is required (add {key}=... to the command line)") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"lineage: {str(e).splitlines()[0]}") from None
    lin = typed(LineageConfig, raw, "lineage")
    if not lin.stages:
        raise ConfigError(f"lineage {lin.name} has no stages")
    return lin


def plan(lin: LineageConfig, until: str | None = None) -> list[Step]:
    """Every stage of ``lin`` (up to the last one writing results/<until>/), composed and checked."""
    p = Plan()
    for i, spec in enumerate(lin.stages, 1):
        plan_step(i, spec, p)
    if until is not None:
        last = [s.index for s in p.steps if s.out == until]
        if not last:
            raise ConfigError(f"until={until}: no stage of lineage {lin.name} writes results/{until} "
                              f"(they write: {', '.join(dict.fromkeys(s.out for s in p.steps))})")
        return p.steps[: last[-1]]
    return p.steps
