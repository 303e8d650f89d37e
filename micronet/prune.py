"""Prune stage: per-tensor magnitude pruning on the AGP cubic schedule while fine-tuning.

    python -m micronet.prune name=<trained run> [prune=<schedule>] [step=S] [finetune=wt2|wt103]
    python -m micronet.prune -m name=<trained run> prune=0.239,0.358,0.477

Creates ``results/prune<s>_<name>/`` (s = the schedule's name) from checkpoint S (default: the
newest) of ``<name>`` and fine-tunes it with :class:`~micronet.training.trainer.Trainer` (same loop,
resume, guard, checkpoints, CSV, progress bar), the :class:`~micronet.compress.prune.AGPPruner`
recomputing the masks as a step hook; after step ``E * every`` training continues with fixed masks to
``train.steps``. Schedules (conf/prune/): the original's ``0.239`` / ``0.358`` / ``0.477``, ``uniform``
and ``sensitivity`` (see :mod:`micronet.compress.prune`).

Checkpoint format: plain TransformerLM keys holding the masked weights; a pruned tensor's mask is
``weight != 0`` (its originals are exactly 0 where masked), so evaluate / score / quantize load pruned
runs like any other. ``ckpt["prune"]`` records the schedule, ``ckpt["lineage"]`` the parent.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf

from micronet.compress.prune import AGPPruner, PruneConfig, schedule_targets
from micronet.data.corpus import DataConfig, load_corpus
from micronet.model.cache import checkpoint_cache_config
from micronet.model.transformer import ModelConfig
from micronet.runs.cli import normalize_argv, setup_logging, stage_main
from micronet.runs.config import ConfigError, typed
from micronet.runs.device import pick_device
from micronet.runs.lineage import lineage, pruned_name, recorded_parent_step
from micronet.runs.results import RunDir, atomic_write_text, code_version, truncate_csv
from micronet.stagekit.released import require_run
from micronet.stagekit.score_run import evaluate_and_score
from micronet.training.config import OptimConfig, TrainConfig
from micronet.training.trainer import Trainer

log = logging.getLogger(__name__)


@dataclass
class PruneStageConfig:
    """Top-level keys of ``conf/prune.yaml``."""

    name: str = "???"  # the trained (parent) run
    step: int | str | None = None  # parent checkpoint; None = newest (when resuming: the recorded one)
    eval_splits: list[str] = field(default_factory=lambda: ["valid", "test"])  # evaluated at the end
    eval_chunk_len: int = 4032
    finetune_data: str | None = None  # the data the finetune preset is meant for (a warning if not)


def run(cfg: DictConfig) -> dict:
    """Prune-and-fine-tune (or resume) ``results/prune<s>_<name>``; returns the score JSON (or {})."""
    st = typed(PruneStageConfig, {k: cfg.get(k) for k in PruneStageConfig.__dataclass_fields__ if k in cfg},
               "prune stage")
    pcfg = typed(PruneConfig, cfg.get("prune"), "prune")
    train_cfg = typed(TrainConfig, cfg.get("train"), "train")
    optim_cfg = typed(OptimConfig, cfg.get("optim"), "optim")
    if train_cfg.steps < pcfg.every * pcfg.rounds:
        raise ConfigError(f"train.steps={train_cfg.steps} < prune.every x prune.rounds = {pcfg.every * pcfg.rounds}: "
                          "the final sparsity would never be reached")
    parent = require_run(st.name)  # a run, or a released model
    pick_device(train_cfg.device)  # an unavailable device fails before results/<name> exists
    rd = RunDir(pruned_name(pcfg.name, parent.name))
    with rd.guard("prune"):
        setup_logging(rd.log_path("prune"))
        ckpt = parent.load(recorded_parent_step(rd, parent, parent.resolve_step(st.step)))
        if ckpt.get("quant"):
            raise ConfigError(f"{parent.name} is a quantized run; prune its full-precision parent instead")
        pstep = int(ckpt["step"])
        model_cfg = ModelConfig(**ckpt["model_config"])
        data_cfg = typed(DataConfig, ckpt["data_config"], "data")
        if st.finetune_data and st.finetune_data != data_cfg.name:
            log.warning("the finetune preset is meant for %s but %s was trained on %s (finetune=wt103 gives the "
                        "original's hyperparameters)", st.finetune_data, parent.name, data_cfg.name)
        targets = schedule_targets(pcfg, model_cfg, parent)
        corpus = load_corpus(data_cfg)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        resolved["lineage"] = lineage("prune", parent, pstep)
        trainer = Trainer(rd, train_cfg, optim_cfg, model_cfg, data_cfg, corpus, resolved,
                          cache_cfg=checkpoint_cache_config(ckpt))  # training cache on iff the parent had it
        if not trainer.resume():  # resume first: the checkpoint has plain keys, masks = weights != 0
            trainer.model.load_state_dict(ckpt["model"])
            log.info("pruning %s step %d with schedule %s over %d tensors", parent.name, pstep, pcfg.name, len(targets))
        del ckpt
        pruner = AGPPruner(trainer.model, targets, pcfg.every, pcfg.rounds, trainer.optimizer)
        pruner.start(trainer.step)
        trainer.after_step = (*trainer.after_step, pruner)
        trainer.extra_state = {"prune": {"schedule": pcfg.name, "kind": pcfg.kind, "every": pcfg.every,
                                         "rounds": pcfg.rounds, "targets": {k: list(v) for k, v in targets.items()}},
                               "lineage": resolved["lineage"]}
        truncate_csv(rd, trainer.step)
        resolved["code"] = code_version()
        atomic_write_text(rd.config_path, OmegaConf.to_yaml(resolved))
        trainer.train()
        for name, s in pruner.measured().items():
            log.info("sparsity %-28s %.4f (target %.4f)", name, s, targets[name][1])
        if trainer.step < train_cfg.steps:
            print(f"stopped at step {trainer.step}; results in {rd.path}")
            return {}
        out = evaluate_and_score(rd.name, trainer.step, st.eval_splits, st.eval_chunk_len, device=train_cfg.device)
    print(f"{rd.name} step {out['step']}: score {out['score']:.6f}; results in {rd.path}")
    return out


def main() -> None:
    """Entry point of ``python -m micronet.prune``."""
    sys.argv[1:] = normalize_argv(sys.argv[1:])
    stage_main("prune", run)()


if __name__ == "__main__":
    main()
