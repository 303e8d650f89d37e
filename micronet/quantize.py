"""Quantize stage: symmetric uniform N-bit weights and activations, calibration or QAT, packed export.

    python -m micronet.quantize name=<run> bits=<b> [act_bits=<a>] [n_cache=N] [step=S] [quant.steps=K]
    python -m micronet.quantize -m name=<run> bits=8,9,10

Creates ``results/quantize_<name>_step<S>_cache<N>_bits<b>/`` (spec section 6) with the fake quantizers
of :mod:`micronet.compress.quantize` (pruning masks of a pruned parent kept under them).
``quant.steps <= 1``: calibration (the original's single step): a few training batches in forward mode
set the activation ranges. ``quant.steps > 1``: QAT through :class:`~micronet.training.trainer.Trainer`.
The checkpoint holds the parametrized state (full-precision originals, masks, quantizer buffers) and
``ckpt["quant"]``, from which :func:`~micronet.compress.checkpoint.load_model` rebuilds the structure.
The job copies the parent's searched cache parameters, evaluates, writes the packed export
``packed.safetensors`` (:mod:`micronet.compress.export`, verified by reloading), scores, and writes
``quantize_step<S>.json`` (export size next to the counted storage).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf

from micronet.compress.checkpoint import model_from_checkpoint
from micronet.compress.export import export_packed
from micronet.compress.prune import MaskHolder, sparse_masks
from micronet.compress.quantize import calibrate, check_bits, prepare
from micronet.data.corpus import DataConfig, load_corpus
from micronet.model.cache import checkpoint_cache_config, read_cache_params, write_cache_params
from micronet.model.transformer import ModelConfig
from micronet.runs.cli import setup_logging, stage_main
from micronet.runs.config import ConfigError, MicronetError, typed
from micronet.runs.device import pick_device
from micronet.runs.lineage import lineage, quantized_name
from micronet.runs.results import (CheckpointError, RunDir, atomic_write_text, code_version, searched_caches,
                                   truncate_csv, write_json)
from micronet.stagekit.released import require_run
from micronet.stagekit.score_run import evaluate_and_score
from micronet.training.config import OptimConfig, TrainConfig
from micronet.training.trainer import Trainer

log = logging.getLogger(__name__)


@dataclass
class QuantConfig:
    """The ``quant`` node: calibration or QAT."""

    steps: int = 1  # <= 1: calibration only (the original's single step); > 1: QAT steps through the Trainer
    calib_batches: int = 4
    calib_batch_size: int = 1
    calib_chunk_len: int = 1152
    ema: float = 0.999  # activation range EMA

    def validate(self) -> None:
        if self.calib_batches < 1 or self.calib_batch_size < 1 or self.calib_chunk_len < 1:
            raise ValueError("quant.calib_batches, calib_batch_size and calib_chunk_len must be positive")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"quant.ema must be in [0, 1), got {self.ema}")


@dataclass
class QuantizeStageConfig:
    """Top-level keys of ``conf/quantize.yaml``."""

    name: str = "???"
    step: int | str | None = None  # None: newest checkpoint
    bits: int = 9
    act_bits: int | None = None  # None: = bits
    n_cache: int | None = None  # None: the largest searched cache of that step (cache_step<S>_n<N>.yaml), else 0
    eval_splits: list[str] = field(default_factory=lambda: ["valid", "test"])
    eval_chunk_len: int = 4032
    device: str = "auto"

    def validate(self) -> None:
        check_bits(self.bits)
        if self.act_bits is not None:
            check_bits(self.act_bits, "act_bits")
        if self.n_cache is not None and self.n_cache < 0:
            raise ValueError(f"n_cache must be >= 0, got {self.n_cache}")


def run(cfg: DictConfig) -> dict:
    """Quantize a run's checkpoint into its own results dir; returns the quantize summary JSON."""
    top = {k: cfg.get(k) for k in QuantizeStageConfig.__dataclass_fields__ if k in cfg}
    qs = typed(QuantizeStageConfig, top, "quantize")
    qc = typed(QuantConfig, cfg.get("quant"), "quant")
    act_bits = qs.act_bits if qs.act_bits is not None else qs.bits
    parent = require_run(qs.name)  # a run, or a released model
    ckpt = parent.load(qs.step)
    if ckpt.get("quant"):
        raise ConfigError(f"{parent.name} is already quantized; quantize its full-precision parent")
    pstep = int(ckpt["step"])
    n_cache = qs.n_cache if qs.n_cache is not None else max(searched_caches(parent, pstep), default=0)
    rd = RunDir(quantized_name(parent.name, pstep, n_cache, qs.bits))
    qat = qc.steps > 1
    pick_device(qs.device if not qat else (cfg.get("train") or {}).get("device", "auto"))  # before rd exists
    with rd.guard("quantize"):
        setup_logging(rd.log_path("quantize"))
        have = rd.steps()
        if have and (max(have) > max(qc.steps, 1) or (not qat and have != [1])):
            raise CheckpointError(f"results/{rd.name} holds checkpoints {have} of other quant.steps; remove it "
                                  f"or use the same settings")
        data_cfg = typed(DataConfig, ckpt["data_config"], "data")
        corpus = load_corpus(data_cfg)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        resolved["lineage"] = lineage("quantize", parent, pstep)
        if qat:
            train_cfg = typed(TrainConfig, {**(cfg.get("train") or {}), "steps": qc.steps}, "train")
            trainer = Trainer(rd, train_cfg, typed(OptimConfig, cfg.get("optim"), "optim"),
                              ModelConfig(**ckpt["model_config"]), data_cfg, corpus, resolved,
                              cache_cfg=checkpoint_cache_config(ckpt))
            trainer.model.load_state_dict(ckpt["model"])
            masks = sparse_masks(trainer.model)
            info = prepare(trainer.model, qs.bits, act_bits, qc.ema, masks)
            trainer.after_step = (*trainer.after_step, MaskHolder(trainer.model, list(masks), trainer.optimizer))
            trainer.extra_state = {"quant": {**info, "steps": qc.steps}, "lineage": resolved["lineage"]}
            trainer.resume()  # parametrized keys: the structure is in place before loading
            truncate_csv(rd, trainer.step)
            trainer.train()
            if trainer.step < qc.steps:
                print(f"stopped at step {trainer.step}; results in {rd.path}")
                return {}
            model, step = trainer.model, trainer.step
        else:
            device = pick_device(qs.device)
            model = model_from_checkpoint(ckpt).to(device)
            info = prepare(model, qs.bits, act_bits, qc.ema, sparse_masks(model))
            tokens = calibrate(model, corpus.train, qc.calib_batches, qc.calib_batch_size, qc.calib_chunk_len,
                               device=device)
            step = 1
            rd.save(step, {"model": model.state_dict(), "model_config": ckpt["model_config"],
                           "data_config": ckpt["data_config"], "cache_config": ckpt.get("cache_config"),
                           "data_manifest": ckpt.get("data_manifest"), "tokens": tokens, "code": code_version(),
                           "quant": {**info, "steps": 1}, "lineage": resolved["lineage"]})
        del ckpt
        log.info("quantized %s step %d: %d-bit weights, %d-bit activations (%d quantizers), %d masked tensors",
                 parent.name, pstep, qs.bits, act_bits, info["n_act_quantizers"], len(info["masked"]))
        resolved["code"] = code_version()
        atomic_write_text(rd.config_path, OmegaConf.to_yaml(resolved))
        if n_cache:
            src = parent.cache_params_path(pstep, n_cache)
            if src.exists():
                lam, theta = read_cache_params(src)
                write_cache_params(rd.cache_params_path(step, n_cache), n_cache, lam, theta,
                                   source=f"{parent.name}/{src.name}")
            else:
                log.warning("%s has no %s: the evaluation cache uses learned or default lambda/theta",
                            parent.name, src.name)
        model.cpu().eval()
        nbytes = export_packed(model, rd.packed_path, {**info, "steps": qc.steps}, resolved["lineage"])  # verified
        scored = evaluate_and_score(rd.name, step, qs.eval_splits, qs.eval_chunk_len, n_cache, qs.device)
        setup_logging(rd.log_path("quantize"))
        counted = {c: v["params"] * 4 for c, v in scored["conventions"].items()}  # 32-bit equivalents -> bytes
        out = {"name": rd.name, "step": step, "parent": parent.name, "parent_step": pstep, "bits": qs.bits,
               "act_bits": act_bits, "n_act_quantizers": info["n_act_quantizers"], "n_cache": n_cache,
               "qat_steps": qc.steps, "export_file": rd.packed_path.name, "export_bytes": nbytes,
               "counted_bytes": counted, "export_over_counted": {c: nbytes / v for c, v in counted.items() if v},
               "score": scored["score"], "test_ppl": scored.get("test_ppl")}
        write_json(rd.quantize_path(step), out)
    log.info("%s: packed.safetensors %s bytes; counted storage %s bytes (paper) / %s (strict)", rd.name, f"{nbytes:,}",
             f"{counted.get('paper', math.nan):,.0f}", f"{counted.get('strict', math.nan):,.0f}")
    print(f"{rd.name} step {step}: score {out['score']:.6f}, packed.safetensors {nbytes:,} bytes; results in {rd.path}")
    return out


main = stage_main("quantize", run)

if __name__ == "__main__":
    main()
