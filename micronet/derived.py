"""Runs derived from another run (prune, quantize): lineage records and the closing evaluate + score.

A derived run's ``config.yaml`` and checkpoints carry ``lineage = {stage, parent, parent_step,
parent_lineage}`` (the parent's own lineage chained in), so a quantized run of a pruned run of a
trained run can be traced back to its root.
"""

from __future__ import annotations

from omegaconf import OmegaConf

from micronet.results import CheckpointError, RunDir


def lineage(stage: str, parent: RunDir, parent_step: int) -> dict:
    """The ``lineage`` entry of a derived run's config.yaml and checkpoints (the parent's chained in)."""
    up = None
    if parent.config_path.exists():
        up = (OmegaConf.to_container(OmegaConf.load(parent.config_path)) or {}).get("lineage")
    return {"stage": stage, "parent": parent.name, "parent_step": int(parent_step), "parent_lineage": up}


def recorded_parent_step(rd: RunDir, parent: RunDir, step: int | None) -> int | None:
    """The parent step to use: the one recorded by an earlier invocation when resuming."""
    if not rd.steps() or not rd.config_path.exists():
        return step
    rec = (OmegaConf.to_container(OmegaConf.load(rd.config_path)) or {}).get("lineage") or {}
    if rec.get("parent") != parent.name:
        raise CheckpointError(f"results/{rd.name} was derived from {rec.get('parent')!r}, not {parent.name!r}")
    if step is not None and rec.get("parent_step") != step:
        raise CheckpointError(f"results/{rd.name} was derived from step {rec.get('parent_step')} of {parent.name}; "
                              f"resume with that step or remove the directory")
    return rec.get("parent_step")


def evaluate_and_score(name: str, step: int, splits: list[str], chunk_len: int, n_cache: int = 0,
                       device: str = "auto") -> dict:
    """Evaluate ``splits`` (eval_step<S>.json) then score (score_step<S>.json) a finished run."""
    from micronet import evaluate, score

    if splits:
        evaluate.run(OmegaConf.create({"name": name, "step": step, "splits": list(splits), "chunk_len": chunk_len,
                                       "device": device, "n_cache": n_cache}))
    return score.run(OmegaConf.create({"name": name, "step": step, "convention": "paper", "n_cache": n_cache,
                                       "bits": None, "free_16bit": False}))
