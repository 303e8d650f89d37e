"""Train stage: the core language model.

    python -m micronet.train [experiment=<name>] [overrides]

Adam with linear warmup then cosine decay to 0, grad-norm clipping, random-start chunks,
periodic validation, checkpoints in ``results/<name>/models/``. Re-running the same command
resumes from the newest checkpoint and continues bit-for-bit.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from micronet.data.batches import check_chunk_len
from micronet.data.corpus import DataConfig, load_corpus
from micronet.model.cache import CacheConfig
from micronet.model.hebbian import HebbianConfig
from micronet.model.transformer import count_parameters
from micronet.runs.cli import setup_logging, stage_main
from micronet.runs.config import MicronetError, typed
from micronet.runs.device import pick_device
from micronet.runs.lineage import lineage
from micronet.runs.results import RunDir, atomic_write_text, code_version, truncate_csv
from micronet.training import distributed
from micronet.training.config import OptimConfig, TrainConfig, build_model_config
from micronet.training.distill import build_distiller
from micronet.training.tb_log import open_log
from micronet.training.trainer import Trainer

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    """Train (or resume) ``results/<cfg.name>``; returns the final validation row.

    Everything that can be checked before training (configuration, device, data, model, soft labels)
    is checked before ``results/<name>/`` is created, so a failed start leaves nothing behind.
    """
    train_cfg = typed(TrainConfig, cfg.train, "train")
    optim_cfg = typed(OptimConfig, cfg.optim, "optim")
    data_cfg = typed(DataConfig, cfg.data, "data")
    cache_cfg = typed(CacheConfig, cfg.get("cache"), "cache")
    hebbian_cfg = typed(HebbianConfig, cfg.get("hebbian"), "hebbian")
    rd = RunDir(cfg.name)
    device = pick_device(train_cfg.device)  # an unavailable device is one line, before anything exists
    # torchrun: join the process group; rank 0 alone holds the guard and writes results/<name>.
    distributed.check_batch(train_cfg.batch_size, distributed.env_world_size())  # before joining or writing
    with distributed.process_group(device), contextlib.ExitStack() as held:
        writer = distributed.is_main()

        def log_to(path: Path | None) -> None:
            setup_logging(path if writer else None)
            logging.getLogger().setLevel(logging.INFO if writer else logging.WARNING)  # rank 0 reports progress

        log_to(None)  # stderr until results/<name>/ exists
        if train_cfg.threads:
            torch.set_num_threads(train_cfg.threads)
        # Rank 0 first: it may build the data cache, which the others then read.
        corpus = distributed.on_main(lambda: load_corpus(data_cfg)) or load_corpus(data_cfg)
        check_chunk_len(corpus.train, train_cfg.chunk_len)
        model_cfg = build_model_config(cfg.model, corpus)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        resolved["model"].update(cutoffs=model_cfg.cutoffs, bin_dims=model_cfg.bin_dims)  # as used (fit_cutoffs)
        resolved["corpus"] = corpus.record()  # the corpus really used, whatever data.name says
        trainer = Trainer(rd, train_cfg, optim_cfg, model_cfg, data_cfg, corpus, resolved,
                          cache_cfg=cache_cfg, hebbian_cfg=hebbian_cfg)
        trainer.distill = build_distiller(cfg.get("distill"), corpus)
        if trainer.distill is not None:  # the teacher is a distilled student's parent (lineage, runs table)
            resolved["lineage"] = lineage("distill", RunDir(trainer.distill.cfg.teacher),
                                          int(trainer.distill.labels.manifest["step"]))
        distributed.on_main(lambda: held.enter_context(rd.guard("train")))
        log_to(rd.log_path("train"))
        resumed = trainer.resume(_planned_steps(rd))  # every rank loads the same newest checkpoint
        trainer.tb = open_log(train_cfg.tensorboard, rd, trainer.step, writer)  # rank 0: results/<name>/tb/
        if trainer.tb is not None:
            held.callback(trainer.tb.close)
        resolved["code"] = code_version()
        distributed.on_main(lambda: (truncate_csv(rd, trainer.step),
                                     atomic_write_text(rd.config_path, OmegaConf.to_yaml(resolved))))
        if not resumed:
            log.info("training %s: %s parameters, %s train tokens, vocab %d", rd.path,
                     f"{count_parameters(trainer.model):,}", f"{len(corpus.train):,}", corpus.vocab_size)
        try:
            last = trainer.train()
        finally:  # drop the DDP wrapper: process_group frees it before destroying the group
            trainer.objective = distributed.unwrap(trainer.objective)
    if writer:
        print(f"validation perplexity {last['val_ppl']:.2f} at step {last['step']}; results in {rd.path}" if last
              else f"stopped at step {trainer.step}; results in {rd.path}")
    return last


def _planned_steps(rd: RunDir) -> int | None:
    """``train.steps`` in the run's config.yaml (written by the previous invocation), for checkpoints
    older than ``train_steps`` in the checkpoint; None when unreadable."""
    try:
        steps = ((rd.read_config() or {}).get("train") or {}).get("steps")
    except (MicronetError, AttributeError):
        return None
    return int(steps) if isinstance(steps, int) else None


main = stage_main("train", run)

if __name__ == "__main__":
    main()
