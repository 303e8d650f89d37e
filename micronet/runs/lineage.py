"""Runs derived from another run (prune, quantize; a distilled student from its teacher): lineage records
and the names of derived results directories. (Their closing evaluate + score is
:func:`micronet.stagekit.score_run.evaluate_and_score`.)

A derived run's ``config.yaml`` and checkpoints carry ``lineage = {stage, parent, parent_step,
parent_lineage}`` (the parent's own lineage chained in), so a quantized run of a pruned run of a
trained run can be traced back to its root.
"""

from __future__ import annotations

import logging

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


def pruned_name(schedule: str, parent: str) -> str:
    """Results name of ``parent`` pruned with schedule ``schedule`` (the prune stage's, and the pipeline's)."""
    return f"prune{schedule}_{parent}"


def quantized_name(parent: str, step: int, n_cache: int, bits: int) -> str:
    """Results name of step ``step`` of ``parent`` quantized to ``bits`` (the quantize stage's, and the pipeline's)."""
    return f"quantize_{parent}_step{int(step)}_cache{int(n_cache)}_bits{int(bits)}"
