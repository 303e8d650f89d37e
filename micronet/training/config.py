"""Typed configuration of the train stage: optimizer, loop, learning-rate schedule, model identity.

Separate from :mod:`micronet.train` so that the stages built on training (prune, quantize, distill)
and the benches can read the settings without the loop.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from micronet.data.corpus import Corpus
from micronet.model.transformer import ModelConfig
from micronet.runs.config import ConfigError, typed

log = logging.getLogger(__name__)


AMP_MODES = ("auto", "none", "bf16", "fp16")


def fast_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matmuls natively: CPUs with avx512_bf16 or AMX, CUDA GPUs with bf16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def resolve_amp(amp: str, device: torch.device) -> str:
    """The training precision of ``train.amp`` on ``device``: ``auto`` becomes ``bf16`` where
    :func:`fast_bf16` (same quality as fp32: tests/test_bf16.py), else ``none``."""
    if amp != "auto":
        return amp
    return "bf16" if fast_bf16(device) else "none"


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
    amp: str = "auto"  # auto (bf16 where the device has fast bf16, else none) | none (exact fp32) | bf16 | fp16 (CUDA)
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    stop_after: int = 0  # stop (with a checkpoint) after this many steps in this invocation; 0 = run to the end
    max_bad_steps: int = 0  # skip up to this many steps with a non-finite loss/gradient (per run); 0 = stop at the first
    tensorboard: bool = False  # TensorBoard event files in results/<name>/tb/ (needs pip install -e '.[tb]')
    extend: bool = False  # allow resuming with another ``steps`` (the lr schedule changes from the resumed step on)

    def validate(self) -> None:
        for k in ("steps", "batch_size", "chunk_len", "eval_every", "save_every", "eval_chunk_len"):
            if getattr(self, k) < 1:
                raise ValueError(f"train.{k} must be a positive integer, got {getattr(self, k)}")
        if self.max_bad_steps < 0:
            raise ValueError(f"train.max_bad_steps must be >= 0, got {self.max_bad_steps}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"train.amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")


def lr_at(step: int, optim: OptimConfig, total: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): warmup then cosine to min_lr."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    progress = (step - optim.warmup_steps) / max(1, total - optim.warmup_steps)
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def build_model_config(node: Any, corpus: Corpus) -> ModelConfig:
    """Model config from Hydra, with ``vocab_size: 0`` filled in from the data (and the cutoffs fitted
    to it, :func:`fit_cutoffs`)."""
    raw = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    if not raw.get("vocab_size"):
        raw["vocab_size"] = corpus.vocab_size
        fit_cutoffs(raw)
    elif raw["vocab_size"] != corpus.vocab_size:
        raise ConfigError(f"model.vocab_size={raw['vocab_size']} but the data has {corpus.vocab_size} words")
    return typed(ModelConfig, raw, "model")


def fit_cutoffs(raw: dict) -> None:
    """Cutoffs follow a vocabulary too small for them, in place: the cutoffs at or above ``vocab_size``
    are dropped with their (rarest) bins and one line says so. ``[2000, 10000]`` with ``bin_dims
    [128, 32, 8]`` becomes ``[2000]``, ``[128, 32]`` for 10,000 words and ``[]``, ``[128]`` (one plain
    softmax) for 2,000 or fewer. Cutoffs that do not increase are left for validation to report."""
    cutoffs, dims, vocab = list(raw.get("cutoffs") or []), list(raw.get("bin_dims") or []), raw["vocab_size"]
    keep = next((i for i, c in enumerate(cutoffs) if c >= vocab), len(cutoffs))
    if keep == len(cutoffs) or len(dims) != len(cutoffs) + 1 or cutoffs != sorted(cutoffs):
        return
    raw["cutoffs"], raw["bin_dims"] = cutoffs[:keep], dims[: keep + 1]
    log.info("model.cutoffs %s do not fit a vocabulary of %s words: using cutoffs %s, bin_dims %s "
             "(the rarest bins dropped)", cutoffs, f"{vocab:,}", raw["cutoffs"], raw["bin_dims"])


# Settings that change speed, not the function the model computes (segmented attention equals the
# whole-sequence computation for any segment length: tests/test_model.py), so a resume may change them.
SPEED_ONLY_MODEL_KEYS = ("segment_len",)


def same_model(a: dict | None, b: dict) -> bool:
    """Whether two model configs describe the same network (speed-only settings ignored)."""
    if a is None:
        return False
    strip = lambda d: {k: v for k, v in d.items() if k not in SPEED_ONLY_MODEL_KEYS}  # noqa: E731
    return strip(a) == strip(b)
