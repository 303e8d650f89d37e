"""Runs derived from another run (prune, quantize; a distilled student from its teacher): lineage records
and the closing evaluate + score.

A derived run's ``config.yaml`` and checkpoints carry ``lineage = {stage, parent, parent_step,
parent_lineage}`` (the parent's own lineage chained in), so a quantized run of a pruned run of a
trained run can be traced back to its root.
"""

from __future__ import annotations

import logging

from omegaconf import OmegaConf

from micronet.runs.config import MicronetError
from micronet.runs.results import CheckpointError, RunDir

log = logging.getLogger(__name__)


def lineage(stage: str, parent: RunDir, parent_step: int) -> dict:
    """The ``lineage`` entry of a derived run's config.yaml and checkpoints (the parent's chained in).

    A damaged parent ``config.yaml`` is a one-line error: the chain would silently lose its root.
    """
    up = (parent.read_config() or {}).get("lineage")
    return {"stage": stage, "parent": parent.name, "parent_step": int(parent_step), "parent_lineage": up}


def recorded_parent_step(rd: RunDir, parent: RunDir, step: int | None) -> int | None:
    """The parent step to use: the one recorded by an earlier invocation when resuming.

    Read from ``rd``'s config.yaml, or, if that is missing or damaged (the stage rewrites it), from
    the lineage in ``rd``'s newest checkpoint: a resumed run never switches to another parent step.
    """
    if not rd.steps():
        return step
    try:
        rec = (rd.read_config() or {}).get("lineage")
    except MicronetError as e:
        log.warning("%s; using the lineage in the newest checkpoint instead", str(e).split("; restore")[0])
        rec = None
    if rec is None:
        rec = rd.load().get("lineage") or {}
    if rec.get("parent") != parent.name:
        raise CheckpointError(f"results/{rd.name} was derived from {rec.get('parent')!r}, not {parent.name!r}")
    if step is not None and rec.get("parent_step") != step:
        raise CheckpointError(f"results/{rd.name} was derived from step {rec.get('parent_step')} of {parent.name}; "
                              f"resume with that step or remove the directory")
    return rec.get("parent_step")


def evaluate_and_score(name: str, step: int, splits: list[str], chunk_len: int, n_cache: int = 0,
                       device: str = "auto") -> dict:
    """Evaluate ``splits`` (eval_step<S>.json) then score (score_step<S>.json) a finished run."""
    from micronet.stagekit import evaluation as evaluate
    from micronet.scoring import counts as score

    if splits:
        evaluate.run(OmegaConf.create({"name": name, "step": step, "splits": list(splits), "chunk_len": chunk_len,
                                       "device": device, "n_cache": n_cache}))
    return score.run(OmegaConf.create({"name": name, "step": step, "convention": "paper", "n_cache": n_cache,
                                       "bits": None, "free_16bit": False}))
