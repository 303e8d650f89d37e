"""Rebuild the model of any checkpoint: plain, pruned (plain keys) or quantized (parametrized keys).

The one place that knows how a checkpoint's model is put back together, so evaluate, score,
cache search, sensitivity and soft labels read every kind of run alike. Checkpoints hold tensors
and plain values only (``torch.load(weights_only=True)``, see :mod:`micronet.runs.results`): the
structure comes from ``model_config``, ``cache_config`` and ``quant``, never from pickled classes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from micronet.compress.export import load_packed
from micronet.compress.mnq import is_mnq, load_mnq
from micronet.compress.quantize import prepare_from_checkpoint
from micronet.model.cache import attach_cache, checkpoint_cache_config
from micronet.model.transformer import ModelConfig, TransformerLM
from micronet.runs.config import MicronetError
from micronet.runs.results import CheckpointError, RunDir


def model_from_checkpoint(ckpt: dict, where: str = "checkpoint") -> TransformerLM:
    """The model of a loaded checkpoint dict, weights loaded (on the CPU)."""
    try:
        model = TransformerLM(ModelConfig(**ckpt["model_config"]))
        attach_cache(model, checkpoint_cache_config(ckpt))  # its learned lambda/theta are in the state
        if ckpt.get("quant"):  # a quantized run: rebuild its masks and quantizers before loading their state
            prepare_from_checkpoint(model, ckpt["quant"])
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{where} does not fit the model: {e}") from None
    return model


def load_model(run: RunDir, step: int | None, device: torch.device | str = "cpu") -> tuple[TransformerLM, dict]:
    """Rebuild the model of checkpoint ``step`` (None: the newest good one) of ``run`` and load its weights."""
    run.require()
    ckpt = run.load(step, map_location="cpu")
    model = model_from_checkpoint(ckpt, f"checkpoint step {ckpt.get('step')} of {run.name}")
    return model.to(device), ckpt


def load_export(path: Path) -> TransformerLM:
    """A quantized run's export: ``packed.safetensors`` or a legacy ``model.mnq`` (by content)."""
    path = Path(path)
    if not path.is_file():
        raise MicronetError(f"no exported model at {path}")
    return load_mnq(path) if is_mnq(path) else load_packed(path)
