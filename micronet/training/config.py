"""Typed configuration of the train stage: optimizer, loop, learning-rate schedule, model identity.

Separate from :mod:`micronet.train` so that the stages built on training (prune, quantize, distill)
and the benches can read the settings without the loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from micronet.data.corpus import Corpus
from micronet.model.transformer import ModelConfig
from micronet.runs.config import ConfigError, typed


@dataclass
class OptimConfig:
    """Adam, linear warmup then cosine to ``min_lr`` at the last step, grad-norm clipping."""

    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 1000
    min_lr: float = 0.0
    clip: float = 0.5  # 0: no clipping

    def validate(self) -> None:
        if self.lr <= 0 or self.warmup_steps < 0 or self.clip < 0:
            raise ValueError("optim: lr must be > 0, warmup_steps and clip >= 0")


@dataclass
class TrainConfig:
    """The training loop."""

    steps: int = 200_000
    batch_size: int = 14
    chunk_len: int = 1152  # tokens per sequence per step (segments of model.segment_len)
    eval_every: int = 1000
    save_every: int = 1000
    val_tokens: int = 0  # periodic validation on the first N valid tokens; 0 = whole split
    eval_chunk_len: int = 4032
    seed: int = 0
    device: str = "auto"
    amp: str = "none"  # none | bf16 | fp16 (fp16 on CUDA only)
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    stop_after: int = 0  # stop (with a checkpoint) after this many steps in this invocation; 0 = run to the end
    max_bad_steps: int = 0  # skip up to this many steps with a non-finite loss/gradient (per run); 0 = stop at the first

    def validate(self) -> None:
        for k in ("steps", "batch_size", "chunk_len", "eval_every", "save_every", "eval_chunk_len"):
            if getattr(self, k) < 1:
                raise ValueError(f"train.{k} must be a positive integer, got {getattr(self, k)}")
        if self.max_bad_steps < 0:
            raise ValueError(f"train.max_bad_steps must be >= 0, got {self.max_bad_steps}")
        if self.amp not in ("none", "bf16", "fp16"):
            raise ValueError(f"train.amp must be none, bf16 or fp16, got {self.amp!r}")


def lr_at(step: int, optim: OptimConfig, total: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): warmup then cosine to min_lr."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    progress = (step - optim.warmup_steps) / max(1, total - optim.warmup_steps)
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def build_model_config(node: Any, corpus: Corpus) -> ModelConfig:
    """Model config from Hydra, with ``vocab_size: 0`` filled in from the data."""
    raw = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    if not raw.get("vocab_size"):
        raw["vocab_size"] = corpus.vocab_size
    elif raw["vocab_size"] != corpus.vocab_size:
        raise ConfigError(f"model.vocab_size={raw['vocab_size']} but the data has {corpus.vocab_size} words")
    return typed(ModelConfig, raw, "model")


# Settings that change speed, not the function the model computes (segmented attention equals the
# whole-sequence computation for any segment length: tests/test_model.py), so a resume may change them.
SPEED_ONLY_MODEL_KEYS = ("segment_len",)


def same_model(a: dict | None, b: dict) -> bool:
    """Whether two model configs describe the same network (speed-only settings ignored)."""
    if a is None:
        return False
    strip = lambda d: {k: v for k, v in d.items() if k not in SPEED_ONLY_MODEL_KEYS}  # noqa: E731
    return strip(a) == strip(b)
