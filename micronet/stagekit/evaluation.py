"""Evaluate stage: batch-1 online perplexity with memory carried over the whole split.

    python -m micronet.evaluate name=<run> [step=S] [splits=[valid,test]] [fast=true]

Writes ``results/<name>/eval_step<S>.json`` (``eval_step<S>_n<N>.json`` with ``n_cache=N``) with loss (mean NLL, nats), ppl and tokens per split.
``fast=true`` evaluates the CPU inference model of :mod:`micronet.compress.fast_infer` (int8 kernels, no fake
quantization) instead, into ``eval_step<S>[_n<N>]_fast.json``: the reference files (which ``score`` reads)
keep the exact model's figures.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from omegaconf import DictConfig
from torch.nn.utils import parametrize

from micronet.model.cache import EvalCache, attach_cache, checkpoint_cache_config, eval_cache_for
from micronet.runs.cli import setup_logging, stage_main
from micronet.runs.config import ConfigError, typed
from micronet.data.corpus import DataConfig, load_corpus
from micronet.compress.fast_infer import build_fast_model
from micronet.model.transformer import ModelConfig, TransformerLM
from micronet.runs.progress import bar
from micronet.runs.results import CheckpointError, RunDir, write_json

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """Settings of the evaluate stage."""

    name: str = "???"
    step: int | None = None  # None: newest checkpoint
    splits: list[str] = field(default_factory=lambda: ["valid", "test"])
    chunk_len: int = 4032  # tokens per forward pass; memory is carried between chunks
    device: str = "auto"
    n_cache: int = 0  # evaluation cache size (independent of training's); 0 = off
    fast: bool = False  # evaluate micronet.compress.fast_infer's int8 CPU inference model; results in *_fast.json

    def validate(self) -> None:
        if self.chunk_len < 1 or self.n_cache < 0:
            raise ValueError(f"chunk_len must be positive and n_cache >= 0, got {self.chunk_len}, {self.n_cache}")
        bad = [s for s in self.splits if s not in ("train", "valid", "test")]
        if bad:
            raise ValueError(f"splits must be among train/valid/test, got {bad}")


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def evaluate_stream(model: TransformerLM, tokens: np.ndarray, chunk_len: int = 4032,
                    device: torch.device | str = "cpu", desc: str = "eval",
                    cache: EvalCache | None = None) -> tuple[float, int]:
    """Sum of NLL (nats) and number of predicted tokens over ``tokens``, batch 1, online.

    Token t is predicted from tokens < t only; keys/values of the last ``n_seq`` positions are
    carried (detached) from chunk to chunk, exactly as in token-by-token evaluation. With
    ``cache``, its entries persist across chunks too; it is reset here (one call = one split).
    """
    was_training = model.training
    model.eval()
    data = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    n_pred = len(data) - 1
    total, mem, start = 0.0, None, 0
    if cache is not None:
        cache.reset()
    t0 = time.perf_counter()
    # cached(): parametrized weights (pruning masks, fake quantization) are computed once, not per use
    with bar(n_pred, desc, "tok") as pbar, parametrize.cached():
        while start < n_pred:
            end = min(start + chunk_len, n_pred)
            x = data[start:end].to(device)[None]  # (1, T)
            y = data[start + 1 : end + 1].to(device)[None]  # (1, T)
            h, mem = model(x, mem)
            mem = mem.detach()
            lp = model.target_log_probs(h, y)  # (1, T)
            if cache is not None:
                lp = cache(h, y, lp)
            total -= lp.double().sum().item()
            pbar.update(end - start, status=f"{(end) / (time.perf_counter() - t0):,.0f} tok/s")
            start = end
    model.train(was_training)
    return total, n_pred


def load_model(run: RunDir, step: int | None, device: torch.device | str = "cpu") -> tuple[TransformerLM, dict]:
    """Rebuild the model of a checkpoint and load its weights."""
    run.require()
    ckpt = run.load(step, map_location="cpu")
    try:
        model = TransformerLM(ModelConfig(**ckpt["model_config"]))
        attach_cache(model, checkpoint_cache_config(ckpt))  # its learned lambda/theta are in the state
        if ckpt.get("quant"):  # a quantized run: rebuild its masks and quantizers before loading their state
            from micronet.compress.quantize import prepare_from_checkpoint  # (micronet.quantize imports this module)

            prepare_from_checkpoint(model, ckpt["quant"])
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint step {ckpt.get('step')} of {run.name} does not fit the model: {e}") from None
    return model.to(device), ckpt


def run(cfg: DictConfig) -> dict:
    """Evaluate a run's checkpoint on the requested splits; returns the JSON written."""
    ecfg = typed(EvalConfig, cfg, "evaluate")
    rd = RunDir(ecfg.name).require()
    setup_logging(rd.log_path("evaluate"))
    if ecfg.fast and ecfg.device not in ("auto", "cpu"):
        raise ConfigError(f"fast=true is a CPU inference path (int8 CPU kernels); use device=cpu, not {ecfg.device}")
    device = torch.device("cpu") if ecfg.fast else pick_device(ecfg.device)
    model, ckpt = load_model(rd, ecfg.step, device)
    step = int(ckpt["step"])
    data_cfg = typed(DataConfig, ckpt["data_config"], "data")
    corpus = load_corpus(data_cfg)
    if corpus.vocab_size != model.cfg.vocab_size:
        raise CheckpointError(f"data vocab {corpus.vocab_size} != model vocab {model.cfg.vocab_size}")
    cache, cache_info = eval_cache_for(rd, step, ecfg.n_cache, model)  # (None, {"n_cache": 0}) when off
    if cache is not None:
        log.info("evaluation cache: %s", cache_info)
    out: dict = {"name": rd.name, "step": step}
    path = rd.eval_path(step, ecfg.n_cache)
    if ecfg.fast:
        model = build_fast_model(model)  # the checkpoint's effective weights (== its model.mnq's, if quantized)
        out["fast"] = model.fast
        path = path.with_name(f"{path.stem}_fast.json")
        log.info("fast inference model: %s", model.fast)
    if path.exists():  # keep results of splits not evaluated this time
        out = {**json.loads(path.read_text()), **out}
    for split in ecfg.splits:
        t0 = time.perf_counter()
        nll, n = evaluate_stream(model, corpus.split(split), ecfg.chunk_len, device, desc=split, cache=cache)
        secs = time.perf_counter() - t0
        out[split] = {"loss": nll / n, "ppl": math.exp(nll / n), "tokens": n, "tokens_per_s": n / secs,
                      "cache": cache_info}
        log.info("%s step %d %s: ppl %.3f over %d tokens (%.0f tok/s)", rd.name, step, split,
                 out[split]["ppl"], n, n / secs)
    write_json(path, out)
    print(f"{rd.name} step {step}: " + ", ".join(f"{s} ppl {out[s]['ppl']:.2f}" for s in ecfg.splits))
    return out


main = stage_main("evaluate", run)

if __name__ == "__main__":
    main()
